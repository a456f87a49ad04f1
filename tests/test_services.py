"""The Ray Serve app over HTTP: a real local Serve app on 127.0.0.1, a real Redis, a tiny model.

One app for the module (Redis store); the first test instead starts the app the way
`serve run deploy/serve.yaml` does (from the shipped YAML, with a tiny model and a tmp local
store), and tears Serve down again before the module's app starts.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from conftest import create_tenant, wait_healthy

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-" + "x" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_BODY = 64 * 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_clean(r: httpx.Response) -> dict:
    """Error bodies: OpenAI's error shape, no traceback, no file path."""
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code, body
    text = r.text
    assert "Traceback" not in text and "/tmp" not in text and str(ROOT) not in text, text
    return body["error"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (2 CPUs) shared by the module; Serve is started per app."""
    import ray

    os.environ["NTKMIRROR_ADMIN_KEY"] = ADMIN_KEY  # before ray.init: workers inherit it
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a logical GPU: see `app`
    try:
        yield {"port": _free_port(), "address": ray.get_runtime_context().gcs_address}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model_ref(tiny_model_dir):
    """The served model as the test sees it: controllers made here carry its fingerprint."""
    from ntkmirror.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def app(cluster, redis_server, tiny_model_dir):
    import redis
    from ray import serve

    from services.app import AppArgs, Quotas, build_app

    redis.Redis.from_url(redis_server).flushall()
    serve.start(http_options={"host": "127.0.0.1", "port": cluster["port"]})
    # engine="on": greedy batches take the GPU path (ntkmirror.engine) here on CPU too; the other
    # Serve apps of the suite (test_bad_inputs, test_faults) keep the default, transformers' generate
    args = AppArgs(model=str(tiny_model_dir), store=redis_server, max_batch_size=8, batch_wait_timeout_s=0.25,
                   max_new_tokens=64, max_body_bytes=MAX_BODY, generate_timeout_s=60, engine="on",
                   num_gpus=0.5,  # placement only: Ray gives the replicas the logical GPU; torch (CPU build) runs on CPU
                   quotas=Quotas(max_memories=50, max_gates=4096, requests_per_minute=10_000))
    serve.run(build_app(args), name="ntkmirror", route_prefix="/")
    base = f"http://127.0.0.1:{cluster['port']}"
    wait_healthy(base)
    try:
        yield base
    finally:
        serve.delete("ntkmirror")


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app, timeout=120) as c:
        yield c


def new_tenant(http, name: str, **quotas) -> dict:
    return create_tenant(http, ADMIN, name, **quotas)


def controller_b64(model_ref, seed: int, gates: int = 48, meta: dict | None = None) -> str:
    """A strong random controller for the served model (so different memories give different text)."""
    from ntkmirror.controller import Controller, new_meta
    from ntkmirror.models import find_decoder_layers, hidden_size

    model, _ = model_ref
    L, H = len(find_decoder_layers(model)[1]), hidden_size(model)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(L * H, generator=g)[:gates]
    c = Controller(keys // H, keys % H, 3 * torch.randn(gates, generator=g), 0.5, L, H, meta or new_meta(model))
    return base64.b64encode(c.to_bytes()).decode()


def register(http, headers, model_ref, id: str, text: str, seed: int, **extra) -> httpx.Response:
    return http.post("/v1/memories", headers=headers, json={"id": id, "text": text,
                                                            "controller": controller_b64(model_ref, seed), **extra})


# ---------------------------------------------------------------- the shipped Serve config


def test_serve_yaml_starts_the_app(cluster, tiny_model_dir, tmp_path):
    """`serve run deploy/serve.yaml` (non-blocking, into this cluster) with a tiny model and a tmp local store."""
    from ray import serve

    cfg = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = cluster["port"]
    cfg["applications"][0]["args"].update(model=str(tiny_model_dir), store=str(tmp_path / "store"))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    env = {**os.environ, "NTKMIRROR_ADMIN_KEY": ADMIN_KEY, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([exe, "run", "--non-blocking", "--address", cluster["address"], str(path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    base = f"http://127.0.0.1:{cluster['port']}"
    try:
        wait_healthy(base)
        with httpx.Client(base_url=base, timeout=120) as c:
            alice = new_tenant(c, "yaml-tenant")
            assert c.get("/v1/models", headers=alice).json()["data"][0]["id"] == tiny_model_dir.name
            r = c.post("/v1/memories", headers=alice, json={"id": "m1", "text": "the local store works",
                                                            "controller": _local_controller(tiny_model_dir)})
            assert r.status_code == 201, r.text
            r = c.post("/v1/generate", headers=alice, json={"prompt": "Hello", "memory_ids": ["m1"],
                                                            "max_new_tokens": 4})
            assert r.status_code == 200 and r.json()["memories"][0]["id"] == "m1", r.text
        # the local store and its service state (tenants, hashed keys) are on disk, keys never in clear
        state = (tmp_path / "store" / ".services" / "state.json").read_text()
        assert "yaml-tenant" in state and "ntk-" not in state
    finally:
        serve.shutdown()


def _local_controller(model_dir) -> str:
    from ntkmirror.models import load_model

    return controller_b64(load_model(str(model_dir), device="cpu"), seed=99)


# ---------------------------------------------------------------- auth and administration


def test_auth_and_admin(http):
    r = http.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert_clean(r)
    for bad in ("nonsense", "ntk-0123456789abcdef-" + "A" * 43, ADMIN_KEY):
        r = http.get("/v1/models", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, (bad, r.text)
    key_headers = new_tenant(http, "acme")
    assert http.get("/v1/models", headers=key_headers).status_code == 200
    # tenant keys cannot administer; re-posting a tenant updates it (200)
    r = http.post("/v1/admin/tenants", headers=key_headers, json={"tenant": "evil"})
    assert r.status_code == 401
    r = http.post("/v1/admin/tenants", headers=ADMIN, json={"tenant": "acme", "quotas": {"max_memories": 7}})
    assert r.status_code == 200 and r.json()["quotas"]["max_memories"] == 7
    assert http.post("/v1/admin/tenants/nobody/keys", headers=ADMIN, json={}).status_code == 404
    # a revoked key stops working at once
    r = http.post("/v1/admin/tenants/acme/keys", headers=ADMIN, json={})
    key, key_id = r.json()["key"], r.json()["key_id"]
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert http.delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=ADMIN).status_code == 204
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_keys_are_stored_hashed(http, redis_server):
    import redis

    headers = new_tenant(http, "hashed")
    secret = headers["Authorization"].split()[1]
    r = redis.Redis.from_url(redis_server)
    dump = b"".join(r.get(k) or b"" for k in r.scan_iter("ntkmirror:svc:*") if r.type(k) == b"string")
    key_secret = secret.split("-", 2)[2]  # ntk-<key_id>-<secret>; the secret itself may hold "-"
    assert len(key_secret) == 43 and b"hashed" in dump and secret.encode() not in dump
    assert key_secret.encode() not in dump


# ---------------------------------------------------------------- memories, search, generation


def test_memory_lifecycle(http, model_ref):
    h = new_tenant(http, "life")
    r = register(http, h, model_ref, "pirate", "the user likes pirate speak and talk like a sailor", 1,
                 tags=["style"], metadata={"source": "test"})
    assert r.status_code == 201, r.text
    item = r.json()
    assert item["version"] == 1 and item["num_gates"] == 48 and item["tags"] == ["style"]
    assert register(http, h, model_ref, "metric", "convert miles to kilometres in every answer", 2).status_code == 201

    assert sorted(m["id"] for m in http.get("/v1/memories", headers=h).json()["data"]) == ["metric", "pirate"]
    assert [m["id"] for m in http.get("/v1/memories", headers=h, params={"tag": "style"}).json()["data"]] == ["pirate"]
    got = http.get("/v1/memories/pirate", headers=h, params={"controller": "true"}).json()
    from hashlib import sha256

    assert sha256(base64.b64decode(got["controller"])).hexdigest() == item["controller_sha256"]

    hits = http.post("/v1/search", headers=h, json={"query": "talk like a pirate sailor", "top_k": 2}).json()["data"]
    assert hits[0]["memory"]["id"] == "pirate" and abs(sum(x["weight"] for x in hits) - 1) < 1e-6

    r = http.post("/v1/generate", headers=h, json={"prompt": "Tell me about the sea.", "query": "pirate sailor talk",
                                                   "top_k": 1, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    gen = r.json()
    assert [m["id"] for m in gen["memories"]] == ["pirate"] and gen["memories"][0]["weight"] == pytest.approx(1.0)
    assert gen["usage"]["completion_tokens"] <= 8 and gen["finish_reason"] in ("stop", "length")

    # overwrite makes a new version; delete hides it; everything then answers 404
    assert register(http, h, model_ref, "pirate", "the user likes pirate speak", 3).json()["version"] == 2
    assert http.delete("/v1/memories/pirate", headers=h).status_code == 204
    for r in (http.get("/v1/memories/pirate", headers=h), http.delete("/v1/memories/pirate", headers=h),
              http.post("/v1/generate", headers=h, json={"prompt": "x", "memory_ids": ["pirate"]})):
        assert r.status_code == 404, r.text
        assert_clean(r)
    assert [m["id"] for m in http.get("/v1/memories", headers=h).json()["data"]] == ["metric"]
    assert http.delete("/v1/memories/metric", headers=h, params={"hard": "true"}).status_code == 204
    assert http.get("/v1/memories", headers=h).json()["data"] == []


def test_idempotency_key_makes_registration_safe_to_retry(http, model_ref):
    """A client that got no answer (timeout, 503) repeats the POST with the same Idempotency-Key:
    one version is stored and both answers name it; the key with another body is a 422."""
    h = new_tenant(http, "idem")
    body = {"id": "once", "text": "stored once", "controller": controller_b64(model_ref, 7)}
    r1 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "k-1"}, json=body)
    r2 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "k-1"}, json=body)
    assert r1.status_code == r2.status_code == 201, (r1.text, r2.text)
    assert r1.json()["version"] == r2.json()["version"] == 1
    assert http.get("/v1/memories/once", headers=h).json()["version"] == 1  # no second version was written
    r3 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "k-1"}, json={**body, "text": "other"})
    assert r3.status_code == 422 and "already used" in r3.json()["error"]["message"]
    assert http.post("/v1/memories", headers=h, json=body).json()["version"] == 2  # no key: a new version


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_state_put_if_absent_keeps_the_first_value(backend, tmp_path, request):
    from services.state import StateStore

    state = StateStore.from_url(str(tmp_path) if backend == "file" else request.getfixturevalue("redis_url"))
    key = f"k:{tmp_path.name}"
    assert state.put_if_absent(key, {"v": 1}) is None
    assert state.put_if_absent(key, {"v": 2}) == {"v": 1}
    assert state.get(key) == {"v": 1}
    assert state.delete(key) and state.put_if_absent(key, {"v": 3}) is None and state.get(key) == {"v": 3}


def test_idempotency_key_makes_a_fit_request_safe_to_retry(http):
    """A retried fit request with the same Idempotency-Key gets the first request's job (one fit,
    one memory version); the key with another body is a 422 and starts nothing."""
    from tiny import arithmetic_rows

    h = new_tenant(http, "idemfit")
    body = {"id": "adder", "text": "two-digit addition", "examples": arithmetic_rows(4),
            "fit": {"gates": 8, "steps": 2, "score_batches": 1, "batch_size": 4}}
    r1 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "fit-1"}, json=body)
    r2 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "fit-1"}, json=body)
    assert r1.status_code == r2.status_code == 202, (r1.text, r2.text)
    assert r1.json()["id"] == r2.json()["id"]
    r3 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "fit-1"}, json={**body, "text": "other"})
    assert r3.status_code == 422 and "already used" in assert_clean(r3)["message"]
    job, deadline = r1.json(), time.time() + 120
    while job["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
        job = http.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert job["status"] == "succeeded", job
    r4 = http.post("/v1/memories", headers={**h, "Idempotency-Key": "fit-1"}, json=body)
    assert r4.status_code == 202 and r4.json()["id"] == job["id"] and r4.json()["status"] == "succeeded"
    time.sleep(1.0)  # a second fit, had one started, would have stored version 2 by now
    assert http.get("/v1/memories/adder", headers=h).json()["version"] == 1


def test_fit_job_runs_to_completion(http):
    from tiny import arithmetic_rows

    h = new_tenant(http, "fitter")
    r = http.post("/v1/memories", headers=h, json={
        "id": "adder", "text": "two-digit addition", "examples": arithmetic_rows(8),
        "fit": {"gates": 16, "steps": 8, "score_batches": 2, "batch_size": 4}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["memory_id"] == "adder"
    deadline = time.time() + 120
    while job["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
        job = http.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert job["status"] == "succeeded", job
    assert job["memory"]["id"] == "adder" and job["memory"]["num_gates"] == 16
    assert http.get("/v1/memories/adder", headers=h).json()["controller_sha256"] == job["memory"]["controller_sha256"]
    r = http.post("/v1/generate", headers=h, json={"prompt": "Question: 12 + 30 = ?\nAnswer:",
                                                   "memory_ids": ["adder"], "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["memories"][0]["id"] == "adder"
    # bad fit options fail at submission, not inside the job
    r = http.post("/v1/memories", headers=h, json={"id": "bad", "text": "t", "examples": arithmetic_rows(2),
                                                   "fit": {"layers": "7,8,9"}})
    assert r.status_code == 422 and "layers" in assert_clean(r)["message"]
    r = http.post("/v1/memories", headers=h, json={"id": "bad", "text": "t", "examples": arithmetic_rows(2),
                                                   "fit": {"retain_nll": -1}})
    assert r.status_code == 422 and "retain_nll" in str(assert_clean(r))
    for bad_fit in ({"retain_rows": 0}, {"retain_tokens": "some"}):
        r = http.post("/v1/memories", headers=h, json={"id": "bad", "text": "t", "examples": arithmetic_rows(2),
                                                       "fit": bad_fit})
        assert r.status_code == 422 and next(iter(bad_fit)) in str(assert_clean(r)), bad_fit
    # 'retain' rows join the bundled KL text of the fit; a bad row or one without examples is a 422
    from ntkmirror.controller import Controller

    retain = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "", "completion": "Good morning."}]
    job = http.post("/v1/memories", headers=h, json={
        "id": "adder-kl", "text": "two-digit addition", "examples": arithmetic_rows(8), "retain": retain,
        "fit": {"gates": 16, "steps": 2, "score_batches": 1, "batch_size": 4, "retain_samples": 0,
                "retain_nll": 0.5, "retain_rows": 2, "retain_tokens": "all"}}).json()
    while job["status"] in ("queued", "running") and time.time() < deadline + 120:
        time.sleep(0.5)
        job = http.get(f"/v1/jobs/{job['id']}", headers=h).json()
    assert job["status"] == "succeeded", job
    got = http.get("/v1/memories/adder-kl", headers=h, params={"controller": "true"}).json()["controller"]
    fitted = Controller.from_bytes(base64.b64decode(got)).meta["fit"]
    assert (fitted["retain_examples"], fitted["retain_nll"], fitted["retain_rows"], fitted["retain_tokens"]) == (
        160 + 2, 0.5, 2, "all")
    for bad in ({"examples": arithmetic_rows(2), "retain": [{"prompt": "x", "completion": "  "}]},
                {"controller": "AAAA", "retain": retain}, {"examples": arithmetic_rows(2), "retain": []}):
        r = http.post("/v1/memories", headers=h, json={"id": "bad", "text": "t", **bad})
        assert r.status_code == 422 and "retain" in str(assert_clean(r)), bad


def test_openai_client_chat_completions(app, http, model_ref):
    import openai

    h = new_tenant(http, "chat")
    key = h["Authorization"].split()[1]
    assert register(http, h, model_ref, "alice-style", "alice wants answers in pirate speak", 4,
                    user="alice").status_code == 201
    assert register(http, h, model_ref, "house-rules", "always be polite and concise", 5).status_code == 201

    client = openai.OpenAI(base_url=f"{app}/v1", api_key=key, max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "answer in pirate speak please"}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=6, user="alice")
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert isinstance(resp.choices[0].message.content, str) and resp.usage.completion_tokens <= 6
    used = {m["id"] for m in resp.model_extra["memories"]}
    assert "alice-style" in used
    # bob is another end user of the same tenant: alice's memory is not his
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=6, user="bob")
    assert "alice-style" not in {m["id"] for m in resp.model_extra["memories"]}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, stream=True)
    assert e.value.status_code in (400, 422)
    r = http.post("/v1/chat/completions", headers=h, json={"model": model, "messages": messages, "n": 2})
    assert r.status_code == 422


def test_two_tenants_never_see_each_other(http, model_ref):
    a, b = new_tenant(http, "tenant-a"), new_tenant(http, "tenant-b")
    ra = register(http, a, model_ref, "notes", "tenant a secret project codename falcon", 6).json()
    rb = register(http, b, model_ref, "notes", "tenant b grocery list apples", 7).json()
    assert ra["controller_sha256"] != rb["controller_sha256"]
    assert register(http, a, model_ref, "a-only", "falcon launch date is friday", 8).status_code == 201

    assert http.get("/v1/memories/notes", headers=a).json()["controller_sha256"] == ra["controller_sha256"]
    assert http.get("/v1/memories/notes", headers=b).json()["controller_sha256"] == rb["controller_sha256"]
    assert {m["id"] for m in http.get("/v1/memories", headers=b).json()["data"]} == {"notes"}
    for r in (http.get("/v1/memories/a-only", headers=b), http.delete("/v1/memories/a-only", headers=b),
              http.post("/v1/generate", headers=b, json={"prompt": "x", "memory_ids": ["a-only"]})):
        assert r.status_code == 404, r.text
    hits = http.post("/v1/search", headers=b, json={"query": "falcon launch codename", "top_k": 5}).json()["data"]
    assert all(h["memory"]["text"].startswith("tenant b") for h in hits)
    # B deleting its "notes" leaves A's untouched
    assert http.delete("/v1/memories/notes", headers=b).status_code == 204
    assert http.get("/v1/memories/notes", headers=a).json()["version"] == 1
    # jobs are tenant-scoped too
    job = http.post("/v1/memories", headers=a, json={"id": "j", "text": "t", "examples": [
        {"prompt": "a", "completion": " b"}], "fit": {"gates": 4, "steps": 1, "score_batches": 1}}).json()
    assert http.get(f"/v1/jobs/{job['id']}", headers=b).status_code == 404
    assert http.get(f"/v1/jobs/{job['id']}", headers=a).status_code == 200


def test_concurrent_requests_batch_and_match_sequential(http, model_ref):
    """Requests with different memories share generate calls and give the texts they give alone."""
    h = new_tenant(http, "batch")
    for i in range(5):
        assert register(http, h, model_ref, f"mem{i}", f"memory {i}", 100 + i).status_code == 201
    reqs = [{"prompt": "Question: 12 + 30 = ?\nAnswer:", "memory_ids": [f"mem{i}"], "max_new_tokens": 10}
            for i in range(5)]
    reqs.append({"prompt": "Hello world", "top_k": 0, "max_new_tokens": 6})  # no memory: the base model
    reqs.append({"prompt": "The quick brown fox jumps", "memory_ids": ["mem0", "mem1"], "weights": [0.7, -0.4],
                 "max_new_tokens": 12})
    reqs.append({"prompt": "Question: 47 + 36 = ?\nAnswer:", "memory_ids": ["mem3"], "max_new_tokens": 3})

    def send(body):
        r = http.post("/v1/generate", headers=h, json=body)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    before = http.get("/v1/admin/stats", headers=ADMIN).json()
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(send, reqs))
    after = http.get("/v1/admin/stats", headers=ADMIN).json()
    alone = [send(body) for body in reqs]
    assert together == alone
    assert len(set(together[:5])) > 1, "different memories should change the text"
    assert after["engine_calls"] > before["engine_calls"]  # greedy batches went through ntkmirror.engine
    assert after["gpu_ids"] == ["0"]  # num_gpus reached the generator's placement (Ray hides GPUs otherwise)
    new_batches = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in new_batches.items() if v > 0) > 1, new_batches


# ---------------------------------------------------------------- errors


def test_error_statuses(http, model_ref):
    h = new_tenant(http, "errs")
    # 413: by Content-Length, and by counting a chunked body that declares none
    r = http.post("/v1/generate", headers={**h, "Content-Type": "application/json"}, content=b" " * (MAX_BODY + 1))
    assert r.status_code == 413
    assert_clean(r)

    def chunks():
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    r = http.post("/v1/generate", headers={**h, "Content-Type": "application/json"}, content=chunks())
    assert r.status_code == 413
    # 422: unknown fields, wrong types, bad ids, bad base64, another model's controller, limits
    from tiny import tiny_model

    from ntkmirror.controller import new_meta

    other = controller_b64(model_ref, 1, meta=new_meta(tiny_model(seed=5)))
    bad_bodies = [
        ("/v1/generate", {"prompt": "x", "unknown": 1}),
        ("/v1/generate", {"prompt": 5}),
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 10_000}),
        ("/v1/generate", {"prompt": "x", "memory_ids": ["../etc"]}),
        ("/v1/search", {"query": ""}),
        ("/v1/memories", {"id": "a/b", "text": "t", "controller": "AAAA"}),
        ("/v1/memories", {"id": "ok", "text": "t", "controller": "not base64!"}),
        ("/v1/memories", {"id": "ok", "text": "t", "controller": base64.b64encode(b"garbage").decode()}),
        ("/v1/memories", {"id": "ok", "text": "t", "controller": other}),
        ("/v1/memories", {"id": "ok", "text": "t"}),
        ("/v1/memories", {"id": "ok", "text": "t", "tags": ["has space"], "controller": other}),
    ]
    for path, body in bad_bodies:
        r = http.post(path, headers=h, json=body)
        assert r.status_code == 422, (path, body, r.text)
        assert_clean(r)
    r = http.post("/v1/generate", headers={**h, "Content-Type": "text/plain"}, content=b"prompt=x")
    assert r.status_code == 422
    assert http.get("/v1/memories", headers=h).json()["data"] == []  # nothing was stored
    r = http.get("/v1/memories/..", headers=h)
    assert r.status_code == 404
    assert http.get("/v1/jobs/job-../../etc", headers=h).status_code == 404


def test_quotas_answer_429(http, model_ref):
    h = new_tenant(http, "small", max_memories=1, max_gates=10)
    assert register(http, h, model_ref, "one", "first", 1, ).status_code == 429  # 48 gates > 10
    r = http.post("/v1/memories", headers=h, json={"id": "one", "text": "first",
                                                   "controller": _small_controller(model_ref)})
    assert r.status_code == 201, r.text
    r = http.post("/v1/memories", headers=h, json={"id": "two", "text": "second",
                                                   "controller": _small_controller(model_ref)})
    assert r.status_code == 429
    assert_clean(r)
    r = http.post("/v1/memories", headers=h, json={"id": "one", "text": "first, v2",
                                                   "controller": _small_controller(model_ref)})
    assert r.status_code == 201 and r.json()["version"] == 2  # overwriting is not a new memory
    # request rate: fixed one-minute windows, so 8 quick requests cross at most one boundary
    h = new_tenant(http, "chatty", requests_per_minute=3)
    codes = [http.get("/v1/memories", headers=h) for _ in range(8)]
    limited = [r for r in codes if r.status_code == 429]
    assert len(limited) >= 2 and all(r.status_code in (200, 429) for r in codes)
    assert int(limited[0].headers["retry-after"]) >= 1


def _small_controller(model_ref) -> str:
    return controller_b64(model_ref, 3, gates=8)


def test_store_unavailable_is_503_then_recovers(http, redis_server, model_ref):
    """Redis stops answering (CLIENT PAUSE): requests fail cleanly with 503, then succeed again."""
    import redis

    h = new_tenant(http, "outage")
    r = redis.Redis.from_url(redis_server)
    r.execute_command("CLIENT", "PAUSE", 6000, "ALL")
    try:
        resp = http.get("/v1/memories", headers=h)
        assert resp.status_code == 503 and "retry-after" in resp.headers
        assert_clean(resp)
        assert http.get("/healthz").status_code == 503
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
    assert http.get("/v1/memories", headers=h).status_code == 200
    assert http.get("/healthz").status_code == 200


def test_openapi_and_health(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/memories", "/v1/memories/{memory_id}", "/v1/jobs/{job_id}", "/v1/search", "/v1/generate",
                 "/v1/chat/completions", "/v1/models", "/healthz"):
        assert path in spec["paths"], path
    assert http.get("/healthz").json() == {"status": "ok"}


def test_metrics_reach_prometheus(http):
    """Request counts, latency and batch sizes are exported through Ray's Prometheus endpoint."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    want = {"ray_ntkmirror_http_requests_total", "ray_ntkmirror_http_latency_s_count", "ray_ntkmirror_batch_size_count"}
    deadline = time.time() + 60
    while True:  # replicas push metrics every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_ntkmirror_")}
        if want <= names or time.time() > deadline:
            break
        time.sleep(2)
    assert want <= names, names
    assert 'route="/v1/generate"' in text and 'status="200"' in text


def test_cli_serve_is_registered(capsys):
    from ntkmirror.cli import main

    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--store" in out and "--admin-key" in out and "--port" in out
