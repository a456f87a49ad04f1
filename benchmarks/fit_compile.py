"""End-to-end fit time, eager vs FitConfig(compile=True), on the quality benchmark's task packs.

    python benchmarks/fit_compile.py [--model M] [--steps 240] [--tasks runs/tasks] [--out runs/bench/fit_compile.json]

Fits the four main tasks' controllers in one packed fit (the default FitConfig: 5000 gates, the
retain-KL term), first eager, then compiled, on the same model in one process, and reports wall
seconds (the compiled run includes its compile), seconds per step after the first 10 steps' share,
and each controller's training NLL after the fit under both paths (they should agree closely).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.tasks.generate import generate, load_manifest  # noqa: E402
from ntkmirror.data import load_jsonl_examples  # noqa: E402
from ntkmirror.fit import FitConfig, fit_controllers  # noqa: E402
from ntkmirror.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--tasks", default="runs/tasks", help="task pack dir (generated with seed 0 if missing)")
    ap.add_argument("--out", default="runs/bench/fit_compile.json")
    args = ap.parse_args()
    if not (Path(args.tasks) / "manifest.json").exists():
        generate(Path(args.tasks), seed=0)
    manifest = load_manifest(args.tasks)
    root = Path(manifest["root"])
    model, tok = load_model(args.model, dtype=args.dtype)
    device = next(model.parameters()).device
    data = [load_jsonl_examples(root / manifest["tasks"][t]["train"], tok) for t in manifest["main_tasks"]]
    rows = {}
    for compiled in (False, True):
        cfg = replace(FitConfig(steps=args.steps), compile=compiled)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctrls = fit_controllers(model, tok, data, cfg, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows["compiled" if compiled else "eager"] = {
            "seconds": time.perf_counter() - t0,
            "train_nll_after": [c.meta["fit"]["train_nll_after"] for c in ctrls]}
    res = {"what": f"packed fit of {len(data)} controllers, {args.steps} steps, default FitConfig",
           "model": args.model or "embedded SmolLM2-135M-Instruct", "device": str(device),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
           "tasks": manifest["main_tasks"], "rows": rows,
           "speedup_incl_compile": rows["eager"]["seconds"] / rows["compiled"]["seconds"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"| path | seconds ({len(data)} controllers, {args.steps} steps) | train NLL after, per task |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {', '.join(f'{x:.4f}' for x in r['train_nll_after'])} |")
    print(f"eager / compiled (compile included): {res['speedup_incl_compile']:.2f}x on {res['gpu'] or 'cpu'}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
