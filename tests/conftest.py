"""Shared fixtures: tiny models/tokenizers, example files, and (below) service fixtures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from tiny import arithmetic_rows, tiny_model, tiny_tokenizer  # noqa: E402


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + tokenizer saved like any HF model directory (for --model DIR)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=1))


@pytest.fixture()
def eval_file(tmp_path):
    return write_jsonl(tmp_path / "eval.jsonl", arithmetic_rows(6, seed=2))


# ---------------------------------------------------------------- Redis (memory store, services)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port in a tmp dir, for the whole session; yields its URL."""
    import shutil
    import subprocess
    import time

    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        pytest.skip("redis-server is not installed")
    import redis

    d = tmp_path_factory.mktemp("redis")
    for _ in range(5):  # the port may be taken between picking and binding: retry
        port = _free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                                 "--appendonly", "no", "--logfile", str(d / "redis.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            if proc.poll() is not None:
                break
            try:
                redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"could not start redis-server (see {d / 'redis.log'})")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture()
def redis_url(redis_server):
    """The session's Redis, emptied (FLUSHALL) for each test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


# ---------------------------------------------------------------- markers (reliability suite)


def pytest_configure(config):
    config.addinivalue_line("markers", "schemathesis: schema-driven HTTP fuzzing (bounded; "
                                       "NTKMIRROR_SCHEMATHESIS_EXAMPLES examples per operation and mode)")


# ---------------------------------------------------------------- a Serve app for a test module


def create_tenant(http, admin: dict, name: str, **quotas) -> dict:
    """Create a tenant (with quotas) and a key over HTTP; return its bearer headers."""
    r = http.post("/v1/admin/tenants", headers=admin, json={"tenant": name, "quotas": quotas})
    assert r.status_code in (200, 201), r.text
    r = http.post(f"/v1/admin/tenants/{name}/keys", headers=admin, json={"name": "test"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def wait_healthy(base: str, timeout: float = 240) -> None:
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} did not become healthy in {timeout}s")


def serve_app(store: str, model_dir, admin_key: str, **app_args):
    """Context manager: the services app on a module-local Ray cluster (2 CPUs) and a free
    loopback port; yields its base URL and shuts Serve and Ray down afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def run():
        import ray
        from ray import serve

        from services.app import AppArgs, build_app

        os.environ["NTKMIRROR_ADMIN_KEY"] = admin_key  # before ray.init: the replicas inherit it
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(AppArgs(model=str(model_dir), store=store, **app_args)), name="ntkmirror",
                      route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base)
            yield base
        finally:
            serve.shutdown()
            ray.shutdown()

    return run()


def write_counts(counts, name: str, label: str) -> None:
    """Save a reliability module's tallies to runs/reliability/<name>.json (docs/reliability.md quotes them)."""
    if counts:
        out = Path(__file__).resolve().parents[1] / "runs" / "reliability"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(dict(counts), indent=2))
        print(f"\n{label}:", dict(counts))
