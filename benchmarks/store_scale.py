"""Memory store at scale: N items (default 100,000) in one tenant, for each backend.

Text embeddings dominate adding (MiniLM on a shared 2-core CPU), so they are computed once,
cached under runs/bench/, and passed to put_many; the bench reports the embedder's own rate,
the store's add rate given embeddings (sketches, near-duplicate check, writes, index), and an
end-to-end put_many rate (embedding included) on a 2,000-item sample. Then: the first search
after the bulk add (index catch-up), search latency p50/p99 with and without embedding the
query, a cold start (a new process's first search), dense-candidate recall of the approximate
index against exact search, and memory: process RSS, Redis used_memory, bytes on disk. Each
backend runs in its own process; Redis is a private redis-server on a free port (no
persistence), started and stopped here.

    python benchmarks/store_scale.py [--n 100000] [--backend local|redis|both] [--out runs/bench/store_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["Ada", "Bram", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
         "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
TOPICS = ["tax returns", "sourdough baking", "marathon training", "kitchen renovation", "chess openings",
          "jazz piano", "home networking", "tomato gardening", "python debugging", "wedding planning", "bird watching",
          "mortgage refinancing", "spanish grammar", "car maintenance", "sleep hygiene", "watercolor painting",
          "startup fundraising", "rock climbing", "retirement savings", "dog training", "film photography",
          "medieval history", "kubernetes upgrades", "vegan recipes", "sailing lessons"]
STYLES = ["short answers", "step by step explanations", "a formal tone", "bullet points", "cost estimates",
          "answers in French", "safety warnings", "plenty of examples", "a cheerful tone", "cited sources"]
EXTRAS = ["on weekdays", "for beginners", "with metric units", "in the morning", "for a small budget",
          "for the team", "for the kids", "near the coast", "in winter", "for a side project"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(NAMES)} wants {rng.choice(STYLES)} about {rng.choice(TOPICS)} {rng.choice(EXTRAS)} "
            f"(note {i})" for i in range(n)]


def queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"how does {rng.choice(NAMES)} like {rng.choice(TOPICS)} explained, {rng.choice(EXTRAS)}? ({i})"
            for i in range(n)]


def controllers(n: int):
    import torch

    from ntkmirror.controller import Controller

    g = torch.Generator().manual_seed(0)
    keys = torch.stack([torch.randperm(30 * 576, generator=g)[:32] for _ in range(min(n, 512))])
    raw = torch.randn(n, 32, generator=g)
    meta = {"model_name": "bench", "model_fingerprint": "bench"}
    # SmolLM2-135M's shape (30 layers x 576); 512 distinct gate sets, every item its own values
    return [Controller(keys[i % 512] // 576, keys[i % 512] % 576, raw[i], n_layers=30, hidden_size=576, meta=meta)
            for i in range(n)]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cached_embeddings(all_texts: list[str]) -> np.ndarray:
    import hashlib

    from memory_store import embed

    key = hashlib.sha256("\n".join(all_texts).encode()).hexdigest()[:12]
    path = ROOT / "runs" / "bench" / f"scale_embeddings_{len(all_texts)}_{key}.npy"
    if path.is_file():
        return np.load(path)
    t0, out = time.perf_counter(), []
    for lo in range(0, len(all_texts), 5000):
        out.append(embed.embed(all_texts[lo: lo + 5000]))
        done = lo + len(out[-1])
        print(f"  embedded {done}/{len(all_texts)} ({done / (time.perf_counter() - t0):.0f} texts/s)", flush=True)
    vecs = np.concatenate(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def run_backend(backend: str, n: int, batch: int, n_queries: int) -> dict:
    """One backend, in this process."""
    from memory_store import embed
    from memory_store.base import MemoryStore

    res = {"backend": backend, "n": n, "batch": batch}
    tmp = Path(tempfile.mkdtemp(prefix="ntkm-scale-"))
    redis_proc = None
    try:
        if backend == "redis":
            port = free_port()
            redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                           "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    import redis

                    redis.Redis.from_url(url).ping()
                    break
                except Exception:
                    time.sleep(0.05)
        else:
            url = str(tmp / "store")
        embed.embed(["warm up"])
        all_texts, ctrls = texts(n), controllers(n)
        vecs = cached_embeddings(all_texts)
        store = MemoryStore.from_url(url)

        # 0. end to end, embedding included, on a sample (another tenant)
        sample = min(2000, n)
        t = time.perf_counter()
        store.put_many("e2e", [dict(id=f"m{i}", controller=ctrls[i], text=all_texts[i]) for i in range(sample)])
        res["e2e_add_items_per_s"] = sample / (time.perf_counter() - t)
        t = time.perf_counter()
        embed.embed(all_texts[:sample])
        res["embed_items_per_s"] = sample / (time.perf_counter() - t)
        store.delete("e2e", "m0", hard=True)
        store.close()
        store = MemoryStore.from_url(url)
        rss0 = rss_mb()

        # 1. bulk add, embeddings given
        t0 = time.perf_counter()
        warnings = 0
        for lo in range(0, n, batch):
            items = store.put_many("bench", [dict(id=f"m{i}", controller=ctrls[i], text=all_texts[i], embedding=vecs[i])
                                             for i in range(lo, min(n, lo + batch))])
            warnings += sum(bool(i.warnings) for i in items)
            if (lo // batch) % 10 == 0:
                done = min(n, lo + batch)
                print(f"  [{backend}] {done}/{n} added, {done / (time.perf_counter() - t0):.0f} items/s", flush=True)
        res["add_seconds"] = time.perf_counter() - t0
        res["add_items_per_s"] = n / res["add_seconds"]
        res["near_duplicate_warnings"] = warnings

        # 2. first search after the bulk add: the index catches up with the last batch
        qs = queries(n_queries)
        t = time.perf_counter()
        store.search("bench", qs[0])
        res["first_search_s"] = time.perf_counter() - t

        # 3. steady-state latency, with and without embedding the query (distinct queries: no cache)
        lat_embed, lat_vec = [], []
        qvecs = embed.embed(qs)
        for q, v in zip(qs[1:], qvecs[1:]):
            t = time.perf_counter()
            store.search("bench", q)
            lat_embed.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.search("bench", q + " ", query_embedding=v)
            lat_vec.append(time.perf_counter() - t)
        res["search_ms"] = {"with_embedding": {"p50": pct(lat_embed, 50), "p99": pct(lat_embed, 99)},
                            "precomputed_embedding": {"p50": pct(lat_vec, 50), "p99": pct(lat_vec, 99)}}

        # 4. the approximate index against exact search (dense candidates, top 10)
        ix = store._index("bench")
        res["index"] = type(ix.text.index).__name__
        rows = np.array(sorted(ix.row_of.values()))
        allv = ix.text.vectors(rows)
        agree = []
        for q, v in list(zip(qs, qvecs))[:100]:
            exact = {ix.ids[r] for r in rows[np.argsort(-(allv @ v))[:10]]}
            got = {h.item.id for h in store.search("bench", q, top_k=10, fusion="dense", min_score=-1,
                                                   query_embedding=v)}
            agree.append(len(exact & got) / 10)
        res["dense_recall@10_vs_exact"] = float(np.mean(agree))
        del allv
        res["rss_mb"] = {"before": rss0, "after": rss_mb()}
        store.close()

        # 5. cold start: a new process's first search (local: index snapshot + journal tail; redis: rebuild)
        cold = subprocess.run([sys.executable, __file__, "--cold", url], capture_output=True, text=True, check=True)
        res["cold_start"] = json.loads(cold.stdout.strip().splitlines()[-1])

        if backend == "redis":
            import redis

            info = redis.Redis.from_url(url).info("memory")
            res["redis_used_memory_mb"] = info["used_memory"] / 2**20
        else:
            res["disk_mb"] = sum(p.stat().st_size for p in (tmp / "store").rglob("*") if p.is_file()) / 2**20
            res["index_snapshot_mb"] = (tmp / "store" / "tenants" / "bench" / "index.npz").stat().st_size / 2**20
        return res
    finally:
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def cold_start(url: str) -> dict:
    from memory_store import embed
    from memory_store.base import MemoryStore

    embed.embed(["warm up"])
    rss0 = rss_mb()
    t = time.perf_counter()
    store = MemoryStore.from_url(url)
    store.search("bench", "what does Ada want about chess openings?")
    return {"first_search_s": time.perf_counter() - t, "index_rss_mb": rss_mb() - rss0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--backend", default="both", choices=["local", "redis", "both"])
    ap.add_argument("--out", default="runs/bench/store_scale.json")
    ap.add_argument("--cold", help=argparse.SUPPRESS)  # internal: the cold-start child
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one backend, JSON out
    args = ap.parse_args()
    if args.cold:
        print(json.dumps(cold_start(args.cold)))
        return
    if args.one:
        print(json.dumps(run_backend(args.backend, args.n, args.batch, args.queries)))
        return

    cached_embeddings(texts(args.n))  # once, shared by both backends' processes
    results = []
    for backend in (["local", "redis"] if args.backend == "both" else [args.backend]):
        print(f"{backend}: adding {args.n} items ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "--one", "--backend", backend, "--n", str(args.n),
                            "--batch", str(args.batch), "--queries", str(args.queries)],
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = p.stdout.strip().splitlines()
        print("\n".join(lines[:-1]))
        if p.returncode:
            raise SystemExit(f"{backend} run failed")
        results.append(json.loads(lines[-1]))

    print(f"\n{args.n} items in one tenant, {os.cpu_count()} CPU cores")
    head = ("backend", "add/s (given emb.)", "add/s (e2e)", "embed/s", "1st search s", "search p50/p99 ms",
            "precomputed p50/p99 ms", "cold start s", "RSS MB (+index)", "store MB", "ANN r@10")
    print(" | ".join(head))
    for r in results:
        s = r["search_ms"]
        store_mb = r.get("redis_used_memory_mb", r.get("disk_mb"))
        print(" | ".join([r["backend"], f"{r['add_items_per_s']:.0f}", f"{r['e2e_add_items_per_s']:.0f}",
                          f"{r['embed_items_per_s']:.0f}", f"{r['first_search_s']:.2f}",
                          f"{s['with_embedding']['p50']:.1f} / {s['with_embedding']['p99']:.1f}",
                          f"{s['precomputed_embedding']['p50']:.1f} / {s['precomputed_embedding']['p99']:.1f}",
                          f"{r['cold_start']['first_search_s']:.1f}",
                          f"{r['rss_mb']['after']:.0f} (+{r['rss_mb']['after'] - r['rss_mb']['before']:.0f})",
                          f"{store_mb:.0f}", f"{r['dense_recall@10_vs_exact']:.3f}"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average during the run (shared machine): {load[0]:.1f}")
    out.write_text(json.dumps({"n": args.n, "cpu_count": os.cpu_count(), "loadavg_end": load, "results": results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
