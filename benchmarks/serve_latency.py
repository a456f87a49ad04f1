"""End-to-end latency of `POST /v1/generate` through the Serve app, at 1 and N concurrent clients.

    python benchmarks/serve_latency.py [--clients 1 8] [--requests 32] [--max-new-tokens 32]
                                       [--store DIR|redis://...] [--model M] [--out runs/bench/serve_latency.json]

Starts `ntkmirror serve` (local Ray, the embedded default model unless --model) on a free
loopback port, registers one memory per client (random 5000-gate controllers, each a
different composition), and sends greedy requests that retrieve and compose them. Every
level is bounded in requests and in seconds. Reports p50/p99/mean latency, requests/s,
tokens/s and the generate batch sizes the server observed at that level.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_process import running_serve  # noqa: E402

TOPICS = ["sailing and pirate speak", "metric unit conversion", "french cooking recipes", "python programming tips",
          "medieval history facts", "gardening in small spaces", "jazz music theory", "mountain hiking safety",
          "chess openings", "astronomy for beginners", "personal finance budgeting", "coffee brewing methods",
          "marathon training plans", "watercolor painting", "birdwatching in spring", "home electrical repair"]


def random_controller(n_layers: int, hidden: int, seed: int, gates: int = 5000) -> str:
    import torch

    from ntkmirror.controller import Controller

    g = torch.Generator().manual_seed(seed)
    gates = min(gates, n_layers * hidden // 2)  # tiny test models have few channels
    keys = torch.randperm(n_layers * hidden, generator=g)[:gates]
    c = Controller(keys // hidden, keys % hidden, torch.randn(gates, generator=g), 0.05, n_layers, hidden,
                   {"model_name": "benchmark-random"})
    return base64.b64encode(c.to_bytes()).decode()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def run_level(base: str, headers: dict, admin: dict, clients: int, requests: int, seconds: float,
              max_new_tokens: int) -> dict:
    before = httpx.get(f"{base}/v1/admin/stats", headers=admin).json()
    deadline = time.perf_counter() + seconds
    lat, tokens, errors = [], [], {}
    counter = iter(range(requests))

    def client(cid: int):
        with httpx.Client(base_url=base, timeout=300) as c:
            for i in counter:  # shared iterator: `requests` in total across the clients
                if time.perf_counter() > deadline:
                    return
                body = {"prompt": f"Here is a long story about {TOPICS[(cid + i) % len(TOPICS)]}. Once upon a time,",
                        "query": TOPICS[(cid * 3 + i) % len(TOPICS)], "top_k": 2, "max_new_tokens": max_new_tokens}
                t0 = time.perf_counter()
                r = c.post("/v1/generate", headers=headers, json=body)
                if r.status_code != 200:
                    key = f"{r.status_code} {r.json().get('error', {}).get('message', '')[:80]}"
                    errors[key] = errors.get(key, 0) + 1
                    continue
                lat.append(time.perf_counter() - t0)
                tokens.append(r.json()["usage"]["completion_tokens"])

    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    with cf.ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    after = httpx.get(f"{base}/v1/admin/stats", headers=admin).json()
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    n_batches = sum(sizes.values())
    return {"clients": clients, "requests": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "wall_s": wall,
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "mean_s": statistics.mean(lat),
            "requests_per_s": len(lat) / wall, "completion_tokens_mean": statistics.mean(tokens),
            "tokens_per_s": sum(tokens) / wall, "batch_sizes": sizes,
            "mean_batch_size": sum(k * v for k, v in sizes.items()) / n_batches if n_batches else 0.0,
            "max_batch_size": max(sizes, default=0),
            "load_avg_1m": [load_before, os.getloadavg()[0]]}  # the host's load: other work skews CPU timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=32, help="requests per level (all clients together)")
    ap.add_argument("--seconds", type=float, default=300, help="time bound per level")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the generator replica (on a busy host 2 threads ran 10-20x slower than 1)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--store", default=None, help="default: a fresh temporary local store")
    ap.add_argument("--gpus", type=float, default=None, help="GPUs per generator/fitter replica (ntkmirror serve --gpus)")
    ap.add_argument("--out", default="runs/bench/serve_latency.json")
    args = ap.parse_args()

    admin_key = "bench-admin-" + secrets.token_hex(16)
    admin = {"Authorization": f"Bearer {admin_key}"}
    tmp = tempfile.mkdtemp(prefix="ntk-serve-bench-")
    store = args.store or str(Path(tmp) / "store")
    serve_args = ["--store", store, "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms",
                  str(args.batch_wait_ms), "--threads", str(args.threads)] + (["--model", args.model] if args.model else []) \
        + (["--gpus", str(args.gpus)] if args.gpus is not None else [])
    with running_serve(serve_args, admin_key, Path(tmp) / "serve.log") as (base, startup):
        httpx.post(f"{base}/v1/admin/tenants", headers=admin, json={"tenant": "bench"}).raise_for_status()
        key = httpx.post(f"{base}/v1/admin/tenants/bench/keys", headers=admin, json={}).json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        # one memory per topic: random 5000-gate controllers shaped like the served model
        from transformers import AutoConfig

        from ntkmirror.models import embedded_model_dir

        cfg = AutoConfig.from_pretrained(args.model or embedded_model_dir())
        for i, topic in enumerate(TOPICS):
            r = httpx.post(f"{base}/v1/memories", headers=headers, timeout=60, json={
                "id": f"m{i}", "text": topic, "allow_model_mismatch": True,
                "controller": random_controller(cfg.num_hidden_layers, cfg.hidden_size, seed=i)})
            r.raise_for_status()
        # warm up (first-call costs: tokenizer, kernels, the embedding model)
        httpx.post(f"{base}/v1/generate", headers=headers, timeout=300,
                   json={"prompt": "Hello", "query": TOPICS[0], "max_new_tokens": 4}).raise_for_status()
        levels = [run_level(base, headers, admin, c, args.requests, args.seconds, args.max_new_tokens)
                  for c in args.clients]
        device = httpx.get(f"{base}/v1/admin/stats", headers=admin).json().get("device", "?")

    import torch

    res = {"what": "POST /v1/generate end to end (retrieve top 2 + compose + greedy generate), loopback",
           "model": args.model or "embedded SmolLM2-135M-Instruct", "device": device, "cpus": os.cpu_count(),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "torch_threads": args.threads, "max_new_tokens": args.max_new_tokens,
           "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
           "store": "redis" if store.startswith("redis") else "local", "startup_s": startup,
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "levels": levels}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'clients':>7} {'reqs':>5} {'err':>4} {'p50 s':>7} {'p99 s':>7} {'mean s':>7} {'req/s':>6} "
          f"{'tok/s':>6} {'batch mean/max':>15}  batch sizes")
    for lv in levels:
        print(f"{lv['clients']:>7} {lv['requests']:>5} {lv['errors']:>4} {lv['p50_s']:>7.2f} {lv['p99_s']:>7.2f} "
              f"{lv['mean_s']:>7.2f} {lv['requests_per_s']:>6.2f} {lv['tokens_per_s']:>6.1f} "
              f"{lv['mean_batch_size']:>9.2f}/{lv['max_batch_size']:<5}  {lv['batch_sizes']}")
    for lv in levels:
        for kind, n in lv["error_kinds"].items():
            print(f"  {lv['clients']} clients: {n} x {kind}")
    print(f"host load average (1 min) before/after each level: "
          f"{[tuple(round(x, 1) for x in lv['load_avg_1m']) for lv in levels]} on {os.cpu_count()} CPUs")
    print(f"startup {startup:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
