"""Faults injected into a live system, and what must survive them.

- Redis (started from deploy/redis.conf: append-only, fsync on every write) is SIGKILLed and
  restarted under the Serve app, idle and in the middle of a write-heavy load: while it is
  down every request fails cleanly with a 503, afterwards everything answers again, and every
  acknowledged write is still there.
- Serve replicas crash (the generator's process SIGKILLed, the retrieval actor ray.killed):
  Serve replaces them and the service answers again; meanwhile requests get 503s, not 500s.
- A local-store writer is SIGKILLed between the steps of a write: the previous version stays
  readable and searchable, audit reports the leftovers, and the next write succeeds.
- A clean load run (benchmarks/load.py's clients): no error at all, no write lost.

A replica killed during a batch-fit job is tests/test_cluster_jobs.py::
test_replicas_dying_mid_job_lose_nothing_and_store_once (every item stored exactly once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from benchmarks.load import RedisServer, controller_b64, run_load, setup_tenants, verify_writes
from conftest import serve_app, write_counts

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "faults-admin-" + "z" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SHAPE = (2, 32)  # the tiny model's layers x channels
COUNTS: Counter = Counter()


def clean_503(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text[:300])
    assert r.json()["error"]["type"] == "service_unavailable" and r.headers.get("retry-after"), r.text
    assert "Traceback" not in r.text and "/tmp/" not in r.text and str(ROOT) not in r.text, r.text


# ---------------------------------------------------------------- Redis with the shipped persistence


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("aof-redis")).start()
    yield server
    server.stop()


def test_shipped_redis_config_fsyncs_every_write(aof_redis):
    import redis

    r = redis.Redis.from_url(aof_redis.url)
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("appendfsync")["appendfsync"] == "always"  # "everysec" could lose the last second
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_acknowledged_store_writes_survive_kill_9(aof_redis):
    """Straight through the RedisStore: 4 writers, SIGKILL right after the last acknowledgement."""
    from memory_store.redis import RedisStore
    from ntkmirror.controller import Controller

    emb = np.ones(384, np.float32)
    acked = []

    def writer(w: int):
        with RedisStore(aof_redis.url, prefix="durable") as s:
            for i in range(25):
                c = Controller(torch.tensor([0, 1]), torch.tensor([w, i]), torch.tensor([1.0, -1.0]), 0.5, *SHAPE)
                item = s.put_many(f"t{w}", [dict(id=f"m{i}", controller=c, text=f"note {i}", embedding=emb)])[0]
                acked.append((item.tenant, item.id, item.controller_sha256))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    aof_redis.kill()  # no shutdown save: only the append-only file can bring these back
    aof_redis.start()
    with RedisStore(aof_redis.url, prefix="durable") as s:
        found = [(t, id, sha) for t, id, sha in acked if s.get(t, id).controller_sha256 == sha]
        assert len(found) == len(acked) == 100 and s.audit()["ok"]
    COUNTS["redis kill -9 (store level)"] += 1
    COUNTS["writes acknowledged"] += len(acked)
    COUNTS["writes found"] += len(found)


# ---------------------------------------------------------------- the Serve app on that Redis


@pytest.fixture(scope="module")
def app(aof_redis, tiny_model_dir):
    from services.app import Quotas

    with serve_app(aof_redis.url, tiny_model_dir, ADMIN_KEY, served_model_name="tiny-model", max_new_tokens=16,
                   batch_wait_timeout_s=0.005, generate_timeout_s=60,
                   quotas=Quotas(requests_per_minute=1_000_000, max_memories=100_000)) as base:
        yield base


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tenants(app):
    return setup_tenants(app, ADMIN, n=2, memories=3, shape=SHAPE, prefix="faults")


@pytest.mark.ray
def test_load_run_has_no_errors_and_loses_no_write(app, tenants):
    res = run_load(app, tenants, clients=4, seconds=6, shape=SHAPE, max_new_tokens=4)
    writes = verify_writes(app, tenants)
    assert res["server_errors"] == 0 and set(res["statuses"]) <= {"200", "201"}, res["statuses"]
    assert res["ops"]["write"]["ok"] > 0 and res["ops"]["generate"]["ok"] > 0 and res["ops"]["search"]["ok"] > 0
    assert writes["lost"] == writes["applied_twice"] == 0 and writes["found"] == writes["acknowledged"], writes
    COUNTS["load smoke requests"] += res["requests"]


def probes(tenant_headers: dict) -> list[tuple[str, str, dict]]:
    """One request per endpoint that needs Redis (auth, state, store)."""
    return [("GET", "/v1/models", {}), ("GET", "/v1/memories", {}), ("GET", "/v1/memories/seed-0", {}),
            ("POST", "/v1/search", {"json": {"query": "chess openings"}}),
            ("POST", "/v1/generate", {"json": {"prompt": "Hello", "query": "chess openings", "max_new_tokens": 2}}),
            ("POST", "/v1/chat/completions", {"json": {"model": "tiny-model", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "chess?"}]}}),
            ("POST", "/v1/memories", {"json": {"id": "during", "text": "t", "allow_model_mismatch": True,
                                               "controller": controller_b64(*SHAPE, seed=5)}}),
            ("DELETE", "/v1/memories/during", {}), ("GET", "/v1/jobs/job-" + "0" * 24, {})]


@pytest.mark.ray
def test_redis_restart_while_serving_is_503_then_recovers(app, http, aof_redis, tenants):
    h = tenants[0].headers
    before = http.get("/v1/memories", headers=h).json()["data"]
    aof_redis.kill()
    try:
        for method, path, kw in probes(h):
            t0 = time.perf_counter()
            r = http.request(method, path, headers=h, **kw)
            clean_503(r)
            assert time.perf_counter() - t0 < 15, f"{path} took {time.perf_counter() - t0:.1f}s to fail"
            COUNTS["requests during outages (all 503)"] += 1
        clean_503(http.get("/healthz"))
        clean_503(http.post("/v1/admin/tenants", headers=ADMIN, json={"tenant": "while-down"}))
    finally:
        aof_redis.start()
    COUNTS["redis kill -9 (serving)"] += 1
    deadline = time.time() + 60
    while http.get("/healthz").status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    codes = [http.request(m, p, headers=h, **kw).status_code for m, p, kw in probes(h)]
    assert codes == [200, 200, 200, 200, 200, 200, 201, 204, 404], codes
    assert http.get("/v1/memories", headers=h).json()["data"] == before  # "during" was added, then deleted


@pytest.mark.ray
def test_redis_killed_during_writes_loses_no_acknowledged_write(app, http, aof_redis, tenants):
    """A write-heavy load; Redis is SIGKILLed 2 s in and restarted 2 s later."""
    events = {}

    def fault():
        time.sleep(2)
        aof_redis.kill()
        events["down"] = time.time()
        time.sleep(2)
        aof_redis.start()
        events["up"] = time.time()

    killer = threading.Thread(target=fault)
    killer.start()
    res = run_load(app, tenants, clients=4, seconds=9, shape=SHAPE, mix=(1, 1, 4), max_new_tokens=2, seed=1)
    killer.join()
    writes = verify_writes(app, tenants)
    assert set(res["statuses"]) <= {"200", "201", "503"}, (res["statuses"], res["error_messages"])
    assert res["statuses"].get("503", 0) > 0, "the outage was not observed"
    assert writes["lost"] == writes["applied_twice"] == 0 and writes["acknowledged"] == writes["found"], writes
    r = http.post("/v1/memories", headers=tenants[1].headers, json={
        "id": "after", "text": "written after the restart", "allow_model_mismatch": True,
        "controller": controller_b64(*SHAPE, seed=9)})
    assert r.status_code == 201, r.text
    COUNTS["redis kill -9 (during writes)"] += 1
    COUNTS["requests during outages (all 503)"] += res["statuses"]["503"]
    COUNTS["writes acknowledged"] += writes["acknowledged"]
    COUNTS["writes found"] += writes["found"]
    print(f"\nwrites during a Redis kill -9: {writes}; statuses {res['statuses']}")


# ---------------------------------------------------------------- Serve replicas crashing


def replica_actor(deployment: str, timeout: float = 120):
    """(handle, pid) of the app's live replica of `deployment`."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::ntkmirror#{deployment}#"):
                try:
                    actor = ray.get_actor(a["name"], namespace="serve")
                    return actor, ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10)
                except Exception:  # a dead replica's name, not yet gone
                    continue
        time.sleep(0.5)
    raise AssertionError(f"no live {deployment} replica")


def until_ok(send, timeout: float = 240) -> Counter:
    """Send until a 2xx; every answer on the way must be a clean 503 (or a 2xx)."""
    seen: Counter = Counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = send()
        seen[r.status_code] += 1
        if r.status_code < 300:
            return seen
        clean_503(r)
        time.sleep(0.25)
    raise AssertionError(f"no success in {timeout}s: {seen}")


@pytest.mark.ray
def test_crashed_replicas_are_replaced_and_the_service_answers_again(app, http, tenants):
    import ray

    h = tenants[0].headers
    gen = {"prompt": "Hello", "memory_ids": ["seed-0"], "max_new_tokens": 4}
    assert http.post("/v1/generate", headers=h, json=gen).status_code == 200
    _, pid = replica_actor("Generator")
    os.kill(pid, signal.SIGKILL)  # the model replica's process dies
    seen = until_ok(lambda: http.post("/v1/generate", headers=h, json=gen))
    assert replica_actor("Generator")[1] != pid
    actor, pid = replica_actor("Retrieval")
    ray.kill(actor, no_restart=True)  # the store's replica dies for good: Serve must start another
    seen += until_ok(lambda: http.get("/v1/memories/seed-0", headers=h))
    assert replica_actor("Retrieval")[1] != pid
    assert http.post("/v1/search", headers=h, json={"query": "chess openings"}).status_code == 200
    assert http.post("/v1/generate", headers=h, json=gen).status_code == 200
    COUNTS["serve replicas killed and replaced"] += 2
    print(f"\nanswers while replicas were replaced: {dict(seen)}")


# ---------------------------------------------------------------- a local-store writer killed mid-write

CRASH = r"""
import os, signal, sys
import numpy as np, torch
import memory_store.local as local
from ntkmirror.controller import Controller

root, point = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_write = local.LocalStore._write_file

def write(self, path, data, sync):
    kind = "record" if path.name == local.RECORD else "blob"
    if point == f"mid-{kind}":  # half of the temporary file, then the crash
        path.with_name(f"{local.TMP_PREFIX}{path.name}.crashed").write_bytes(data[: len(data) // 2])
        die()
    if point == "after-journal" and kind == "record":
        die()
    return real_write(self, path, data, sync)

local.LocalStore._write_file = write
if point == "after-blob":
    local.LocalStore._journal = lambda self, *a, **k: die()
c = Controller(torch.tensor([1, 1]), torch.tensor([3, 4]), torch.tensor([2.0, -2.0]), 0.5, 2, 32, {"v": 2})
local.LocalStore(root).put_many("default", [dict(id="a", controller=c, text="version two", embedding=np.ones(384))])
print("not killed")
"""

LEFTOVERS = {"mid-blob": ["stale_tmp"], "after-blob": ["orphan_blob"], "after-journal": ["orphan_blob"],
             "mid-record": ["orphan_blob", "stale_tmp"]}


@pytest.mark.parametrize("point", list(LEFTOVERS))
def test_local_writer_killed_between_steps_keeps_the_previous_version(tmp_path, point):
    from memory_store.local import LocalStore
    from ntkmirror.controller import Controller

    root = tmp_path / "store"
    v1 = Controller(torch.tensor([0, 1]), torch.tensor([5, 6]), torch.tensor([1.0, -1.0]), 0.5, *SHAPE, {"v": 1})
    emb = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    LocalStore(root).put_many("default", [dict(id="a", controller=v1, text="version one", embedding=emb)])
    out = subprocess.run([sys.executable, "-c", CRASH, str(root), point], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL and "not killed" not in out.stdout, out.stderr[-2000:]

    s = LocalStore(root, lock_timeout=5)  # a lock held by the dead writer would time out here
    item = s.get("default", "a")
    assert (item.version, item.text) == (1, "version one")
    assert torch.equal(s.get_controller("default", "a").raw, v1.raw)
    assert [v.version for v in s.versions("default", "a")] == [1]
    assert [(h.item.id, h.item.version) for h in s.search("default", "first", query_embedding=emb / np.linalg.norm(
        emb))] == [("a", 1)]
    assert sorted(p["kind"] for p in s.audit()["problems"]) == LEFTOVERS[point]
    v2 = Controller(torch.tensor([1]), torch.tensor([7]), torch.tensor([0.5]), 0.5, *SHAPE, {"v": 2})
    assert s.put_many("default", [dict(id="a", controller=v2, text="v2", embedding=emb)])[0].version == 2
    COUNTS["local writers killed mid-write"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    write_counts(COUNTS, "faults", "faults")
