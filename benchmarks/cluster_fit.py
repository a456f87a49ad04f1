"""Batch-fit throughput on a local Ray cluster: items/minute vs controllers packed per step.

    python benchmarks/cluster_fit.py                      # 16 tiny controllers, pack 1 vs 8, CPU
    python benchmarks/cluster_fit.py --model DIR --replicas 1 --packs 1,4,16

Runs the real job (`jobs.fit_controllers.run_fit_job`: manifest -> replica pool -> local
store -> Parquet report) for each pack size, interleaved repeats, against one shared, already
loaded pool, so the rate excludes cluster start and model loads. Prints a table (median of
the repeats) and writes JSON under runs/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the tests' tiny model and arithmetic data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--packs", default="1,8", help="comma list of pack sizes")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=2, help="local Ray cluster size")
    ap.add_argument("--model", default=None, help="model dir or id (default: a tiny 4-layer Llama, hidden 64)")
    ap.add_argument("--examples", type=int, default=16, help="training examples per item")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--gates", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="runs per pack size, interleaved (median reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "cluster_fit.json")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from tiny import arithmetic_rows, tiny_model, tiny_tokenizer

    from cluster.pool import ReplicaPool, ray_session
    from jobs.fit_controllers import run_fit_job
    from ntkmirror.fit import FitConfig

    work = Path(tempfile.mkdtemp(prefix="cluster-fit-"))
    model = args.model
    if model is None:
        model = str(work / "tiny")
        tiny_model(layers=4, hidden=64).save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
    manifest = work / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"tenant": "bench", "id": f"item-{k}", "text": f"item {k}",
                                            "examples": arithmetic_rows(args.examples, seed=k)}) + "\n"
                                for k in range(args.items)))
    cfg = FitConfig(gates=args.gates, steps=args.steps, score_batches=2, batch_size=args.batch_size)
    packs = [int(p) for p in args.packs.split(",")]

    results = []
    with ray_session(None, num_cpus=args.num_cpus):
        t0 = time.perf_counter()
        pool = ReplicaPool(args.replicas, model, num_gpus_per_replica=None,
                           num_cpus=max(1, args.num_cpus // args.replicas))
        ready = time.perf_counter() - t0
        device = pool.health()[0]["device"]
        rates: dict[int, list[float]] = {p: [] for p in packs}
        for rep in range(args.repeats):  # interleaved, so load changes hit every pack size alike
            for pack in packs:
                store = work / f"store-{pack}-{rep}"  # empty store: every item is fitted
                s = run_fit_job(manifest, str(store), work / f"report-{pack}-{rep}.parquet", args.replicas, pack,
                                cfg, pool=pool, progress=False)
                assert s["ok"] == args.items, s
                rates[pack].append(s["items_per_minute"])
        for pack in packs:
            r = sorted(rates[pack])
            results.append({"pack_size": pack, "items": args.items, "replicas": args.replicas,
                            "items_per_minute": statistics.median(r), "runs": r,
                            "fit_seconds": args.items / statistics.median(r) * 60})
        pool.shutdown()

    base = results[0]["items_per_minute"]
    print(f"\nbatch fit: {args.items} controllers, {args.replicas} replicas on {device}, {args.steps} steps, "
          f"{args.gates} gates, {args.examples} examples each (pool ready in {ready:.1f}s)")
    print(f"{'pack size':>9} | {'fit s':>7} | {'items/min':>9} | {'vs pack ' + str(packs[0]):>10} | runs (items/min)")
    for r in results:
        print(f"{r['pack_size']:>9} | {r['fit_seconds']:>7.2f} | {r['items_per_minute']:>9.1f} | "
              f"{r['items_per_minute'] / base:>9.2f}x | {', '.join(f'{x:.1f}' for x in r['runs'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "cluster_fit", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": args.model or "tiny llama 4x64", "device": device, "pool_ready_seconds": ready,
        "host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
