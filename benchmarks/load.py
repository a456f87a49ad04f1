"""Load test: N concurrent clients mixing generate, search and memory writes against the Serve app.

    python benchmarks/load.py [--clients 8] [--seconds 30] [--mix 3:4:3] [--tenants 4]
                              [--model DIR | --tiny] [--max-new-tokens 8] [--out runs/load/load.json]

Loopback only and bounded (at most 64 clients, 600 s, --max-requests requests). Starts its own
redis-server (deploy/redis.conf: append-only, fsync on every write; moved to a temporary
directory and a free port) and `ntkmirror serve` on that Redis (local Ray; the embedded
SmolLM2-135M-Instruct unless --model, or --tiny for a random two-layer model), creates tenants
and seeds each with memories, then runs the clients for a fixed time. Every acknowledged write
(201) is read back afterwards. Prints a table, writes JSON, and exits non-zero on any 5xx or
any lost write.

`run_load()` is the reusable part: tests/test_faults.py drives it against its own app, with
Redis killed in the middle.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_process import free_port, running_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["sailing and pirate speak", "metric unit conversion", "french cooking recipes", "python programming tips",
          "medieval history facts", "gardening in small spaces", "jazz music theory", "mountain hiking safety",
          "chess openings", "astronomy for beginners", "personal finance budgeting", "coffee brewing methods"]
OPS = ("generate", "search", "write")
LIMITS = {"clients": 64, "seconds": 600}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def controller_b64(n_layers: int, hidden: int, seed: int, gates: int = 64) -> str:
    """A random controller shaped like the served model (registered with allow_model_mismatch)."""
    import torch

    from ntkmirror.controller import Controller

    g = torch.Generator().manual_seed(seed)
    gates = min(gates, n_layers * hidden // 2)
    keys = torch.randperm(n_layers * hidden, generator=g)[:gates]
    c = Controller(keys // hidden, keys % hidden, torch.randn(gates, generator=g), 0.05, n_layers, hidden,
                   {"model_name": "load-benchmark-random"})
    return base64.b64encode(c.to_bytes()).decode()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------- the load itself


@dataclass
class Tenant:
    name: str
    headers: dict
    acked: dict = field(default_factory=dict)  # id -> (controller_sha256, version) of every acknowledged write
    unacked: set = field(default_factory=set)  # ids whose write got no 201 (may or may not exist)


def setup_tenants(base: str, admin: dict, n: int, memories: int, shape: tuple[int, int], prefix: str = "load"
                  ) -> list[Tenant]:
    """n tenants (no rate limit to speak of), each seeded with `memories` memories."""
    out = []
    with httpx.Client(base_url=base, timeout=120) as c:
        for t in range(n):
            name = f"{prefix}-{t}"
            c.post("/v1/admin/tenants", headers=admin, json={"tenant": name, "quotas": {
                "requests_per_minute": 1_000_000, "max_memories": 1_000_000}}).raise_for_status()
            key = c.post(f"/v1/admin/tenants/{name}/keys", headers=admin, json={}).json()["key"]
            tenant = Tenant(name, {"Authorization": f"Bearer {key}"})
            for i in range(memories):
                r = c.post("/v1/memories", headers=tenant.headers, json={
                    "id": f"seed-{i}", "text": TOPICS[i % len(TOPICS)], "allow_model_mismatch": True,
                    "controller": controller_b64(*shape, seed=1000 * t + i)})
                r.raise_for_status()
                tenant.acked[f"seed-{i}"] = (r.json()["controller_sha256"], r.json()["version"])
            out.append(tenant)
    return out


def run_load(base: str, tenants: list[Tenant], clients: int, seconds: float, shape: tuple[int, int],
             mix: tuple[float, float, float] = (3, 4, 3), max_new_tokens: int = 8, max_requests: int = 100_000,
             seed: int = 0) -> dict:
    """Run `clients` threads for `seconds`; each picks generate / search / write by `mix`.
    Returns per-op latencies and statuses, and fills each tenant's acked/unacked writes."""
    if urlparse(base).hostname not in LOOPBACK:
        raise SystemExit(f"load.py runs against loopback only, not {base}")
    clients, seconds = min(clients, LIMITS["clients"]), min(seconds, LIMITS["seconds"])
    lat: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    messages: Counter = Counter()
    budget = iter(range(max_requests))
    lock = threading.Lock()
    t_end = time.perf_counter() + seconds

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        tenant = tenants[cid % len(tenants)]
        with httpx.Client(base_url=base, timeout=120) as c:
            for n in budget:
                if time.perf_counter() > t_end:
                    return
                op = rng.choices(OPS, weights=mix)[0]
                topic = rng.choice(TOPICS)
                if op == "generate":
                    req = ("/v1/generate", {"prompt": f"Tell me about {topic}.", "query": topic, "top_k": 2,
                                            "max_new_tokens": max_new_tokens})
                elif op == "search":
                    req = ("/v1/search", {"query": topic, "top_k": 3})
                else:
                    id = f"w{cid}-{n}"
                    req = ("/v1/memories", {"id": id, "text": f"{topic}: note {n}", "allow_model_mismatch": True,
                                            "controller": controller_b64(*shape, seed=n + 7)})
                t0 = time.perf_counter()
                try:
                    r = c.post(req[0], headers=tenant.headers, json=req[1])
                    status = r.status_code
                except httpx.HTTPError as e:  # no answer at all: counted, never retried
                    r, status = None, f"no response ({type(e).__name__})"
                dt = time.perf_counter() - t0
                with lock:
                    statuses[op][status] += 1
                    if status in (200, 201):
                        lat[op].append(dt)
                    elif r is not None:
                        try:
                            messages[f"{status} {r.json()['error']['message'][:70]}"] += 1
                        except (ValueError, KeyError, TypeError):
                            messages[f"{status} {r.text[:70]}"] += 1
                    if op == "write":
                        if status == 201:
                            tenant.acked[id] = (r.json()["controller_sha256"], r.json()["version"])
                        else:
                            tenant.unacked.add(id)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    wall = time.perf_counter() - t0
    total = sum(sum(s.values()) for s in statuses.values())
    by_status = Counter()
    for s in statuses.values():
        by_status.update(s)
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": total,
            "requests_per_s": total / wall if wall else 0.0,
            "ops": {op: {"requests": sum(statuses[op].values()), "ok": len(lat[op]),
                         "p50_s": percentile(lat[op], 50), "p99_s": percentile(lat[op], 99),
                         "mean_s": statistics.mean(lat[op]) if lat[op] else float("nan"),
                         "statuses": {str(k): v for k, v in sorted(statuses[op].items(), key=str)}} for op in OPS},
            "all_ok_latency": {"p50_s": percentile([x for v in lat.values() for x in v], 50),
                               "p99_s": percentile([x for v in lat.values() for x in v], 99)},
            "statuses": {str(k): v for k, v in sorted(by_status.items(), key=str)},
            "server_errors": sum(v for k, v in by_status.items() if not isinstance(k, int) or k >= 500),
            "error_messages": dict(messages.most_common(20))}


def verify_writes(base: str, tenants: list[Tenant]) -> dict:
    """Read back every acknowledged write: the same controller at the same version (each id is
    written once, so a later version means a write applied twice). Unacknowledged writes may
    or may not have landed (the connection died after the commit); they are counted."""
    acked = found = landed = 0
    lost, doubled = [], []
    with httpx.Client(base_url=base, timeout=60) as c:
        for t in tenants:
            for id, (sha, version) in t.acked.items():
                acked += 1
                r = c.get(f"/v1/memories/{id}", headers=t.headers)
                if r.status_code == 200 and r.json()["controller_sha256"] == sha:
                    found += 1
                    if r.json()["version"] != version:
                        doubled.append((t.name, id, version, r.json()["version"]))
                else:
                    lost.append((t.name, id, r.status_code))
            for id in t.unacked:
                r = c.get(f"/v1/memories/{id}", headers=t.headers)
                landed += r.status_code == 200
                if r.status_code == 200 and r.json()["version"] != 1:
                    doubled.append((t.name, id, 1, r.json()["version"]))
    return {"acknowledged": acked, "found": found, "lost": len(lost), "lost_examples": lost[:10],
            "applied_twice": len(doubled), "applied_twice_examples": doubled[:10],
            "unacknowledged": sum(len(t.unacked) for t in tenants), "unacknowledged_but_stored": landed}


# ---------------------------------------------------------------- a private Redis and server


class RedisServer:
    """redis-server with deploy/redis.conf (persistence as shipped), in `workdir` on a free port."""

    def __init__(self, workdir: Path, conf: Path = ROOT / "deploy" / "redis.conf"):
        self.exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir, self.conf, self.port = Path(workdir), conf, free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen([self.exe, str(self.conf), "--dir", str(self.workdir), "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--daemonize", "no",
                                      "--logfile", str(self.workdir / "redis.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.workdir / 'redis.log'}")
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
                if client.ping() and client.info("persistence").get("loading", 0) == 0:
                    client.close()
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye; only what the append-only file holds survives."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def tiny_model_dir(path: Path) -> Path:
    """A random two-layer model (tests/tiny.py), saved like any HF model directory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--mix", default="3:4:3", help="generate:search:write weights")
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--memories", type=int, default=8, help="seed memories per tenant")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="serve a random two-layer model (fast, for smoke runs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the generator replica")
    ap.add_argument("--out", default=None, help="default: runs/load/load-<time>.json")
    args = ap.parse_args()
    if not (1 <= args.clients <= LIMITS["clients"] and 0 < args.seconds <= LIMITS["seconds"]):
        sys.exit(f"--clients must be 1..{LIMITS['clients']} and --seconds 1..{LIMITS['seconds']}")
    mix = tuple(float(x) for x in args.mix.split(":"))
    if len(mix) != 3 or min(mix) < 0 or not sum(mix):
        sys.exit("--mix needs three non-negative weights, e.g. 3:4:3")

    tmp = Path(tempfile.mkdtemp(prefix="ntk-load-"))
    model = str(tiny_model_dir(tmp / "tiny")) if args.tiny else args.model
    from transformers import AutoConfig

    from ntkmirror.models import embedded_model_dir

    cfg = AutoConfig.from_pretrained(model or embedded_model_dir())
    shape = (cfg.num_hidden_layers, cfg.hidden_size)
    redis_server = RedisServer(tmp / "redis").start()
    admin_key = "load-admin-" + secrets.token_hex(16)
    admin = {"Authorization": f"Bearer {admin_key}"}
    serve_args = ["--store", redis_server.url, "--threads", str(args.threads)] + (["--model", model] if model else [])
    try:
        with running_serve(serve_args, admin_key, tmp / "serve.log") as (base, startup):
            tenants = setup_tenants(base, admin, args.tenants, args.memories, shape)
            httpx.post(f"{base}/v1/generate", headers=tenants[0].headers, timeout=300,  # warm-up
                       json={"prompt": "Hello", "query": TOPICS[0], "max_new_tokens": 2}).raise_for_status()
            load_before = os.getloadavg()[0]
            res = run_load(base, tenants, args.clients, args.seconds, shape, mix, args.max_new_tokens, args.max_requests)
            res["writes"] = verify_writes(base, tenants)
            res["load_avg_1m"] = [load_before, os.getloadavg()[0]]
    finally:
        redis_server.stop()

    res.update(model="tiny (random, 2 layers x 32)" if args.tiny else (args.model or "embedded SmolLM2-135M-Instruct"),
               tenants=args.tenants, mix=dict(zip(OPS, mix)), max_new_tokens=args.max_new_tokens,
               startup_s=startup, cpus=os.cpu_count(), redis_conf="deploy/redis.conf (appendfsync always)",
               command=" ".join([Path(sys.executable).name, *sys.argv]))
    out = Path(args.out or ROOT / "runs" / "load" / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print_report(res)
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    if res["server_errors"] or res["writes"]["lost"] or res["writes"]["applied_twice"]:
        sys.exit(1)


def print_report(res: dict) -> None:
    print(f"\n{res['clients']} clients x {res['seconds']:.0f} s: {res['requests']} requests, "
          f"{res['requests_per_s']:.1f} req/s, p50 {res['all_ok_latency']['p50_s'] * 1e3:.0f} ms, "
          f"p99 {res['all_ok_latency']['p99_s'] * 1e3:.0f} ms (successful requests)")
    print(f"{'op':<9} {'reqs':>6} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}  statuses")
    for op, s in res["ops"].items():
        print(f"{op:<9} {s['requests']:>6} {s['ok']:>6} {s['p50_s'] * 1e3:>8.1f} {s['p99_s'] * 1e3:>8.1f} "
              f"{s['mean_s'] * 1e3:>8.1f}  {s['statuses']}")
    w = res.get("writes")
    if w:
        print(f"writes: {w['acknowledged']} acknowledged, {w['found']} found afterwards, {w['lost']} lost, "
              f"{w['applied_twice']} applied twice ({w['unacknowledged']} unacknowledged, "
              f"{w['unacknowledged_but_stored']} of them stored anyway)")
    print(f"5xx or no response: {res['server_errors']}; errors: {res['error_messages'] or 'none'}")


if __name__ == "__main__":
    main()
