"""Core numbers on CPU for the embedded default model: model load time (first, cached), fit time
per step and peak RSS (the default gates, batch 8), the time to write the KL text's own samples,
controller file size.

    python benchmarks/core_cpu.py [--steps 10] [--threads 2] [--out runs/bench/core_cpu.json]

Each load is timed in a fresh subprocess; "first" uses an empty cache directory, so it includes
dequantising the GGUF and writing the safetensors cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = "import time; t=time.perf_counter(); from ntkmirror import load_model; load_model(); print(time.perf_counter()-t)"


def timed_load(cache: str) -> float:
    env = {**os.environ, "NTKMIRROR_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row (examples padded/cut to this)")
    ap.add_argument("--out", default="runs/bench/core_cpu.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache)
        cached = timed_load(cache)

    from ntkmirror import FitConfig, fit_controller, load_model
    from ntkmirror.data import Example

    model, tok = load_model()
    # rows of about seq_len tokens: a long prompt and a short completion, like a worked answer
    filler = " ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(200))
    ids = tok(filler, add_special_tokens=False)["input_ids"][: args.seq_len - 8]
    prompt = tok.decode(ids)
    train = [Example(prompt + f"\nQuestion: {a} + 17 = ?\nAnswer:", f" {a + 17}") for a in range(10, 74)]

    # time the real optimiser step (ntkmirror.fit.train_step) on the selected gates (FitConfig's default count)
    from dataclasses import replace

    from ntkmirror.data import collate, encode_all, pad_id
    from ntkmirror.fit import PackedGates, kl_text, train_step

    cfg = FitConfig(batch_size=8, score_batches=2, max_length=args.seq_len, steps=0, stats_examples=8)
    t0 = time.perf_counter()
    kl_rows = kl_text(model, tok, cfg)  # the bundled rows + the model's own texts, as every fit makes them
    kl_text_s = time.perf_counter() - t0
    c = fit_controller(model, tok, train, replace(cfg, retain_samples=0), progress=False)  # selection only
    enc = encode_all(tok, train[:8], args.seq_len)
    batch, row_ctrl = collate(enc, pad_id(tok)), torch.zeros(8, dtype=torch.long)
    pick = torch.randperm(len(kl_rows), generator=torch.Generator().manual_seed(0))[: cfg.retain_rows].tolist()
    retain = collate(encode_all(tok, [kl_rows[i] for i in pick], args.seq_len), pad_id(tok))

    def per_step(retain_kl: float, retain_nll: float) -> float:
        gates = PackedGates([c.layer], [c.channel], c.hidden_size, cfg.max_log_gate, "cpu")
        opt = torch.optim.AdamW([gates.raw], lr=cfg.lr, weight_decay=0.0)
        train_step(model, gates, opt, batch, row_ctrl, cfg.l2, retain, retain_kl, retain_nll=retain_nll)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, gates, opt, batch, row_ctrl, cfg.l2, retain, retain_kl, retain_nll=retain_nll)
        return (time.perf_counter() - t0) / args.steps

    per_step_seed = per_step(0.0, 0.0)  # the seed's objective
    per_step_kl = per_step(cfg.retain_kl, 0.0)  # + KL on the retain rows (run 11's default)
    per_step_default = per_step(cfg.retain_kl, cfg.retain_nll)  # + the rise of their NLL (the default, same pass)
    with tempfile.TemporaryDirectory() as d:
        size_st = c.save(Path(d) / "c.safetensors").stat().st_size
        size_pt = c.save(Path(d) / "c.pt").stat().st_size
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux

    res = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
           "load_first_s": first, "load_cached_s": cached, "fit_step_s": per_step_seed,
           "fit_step_retain_kl_s": per_step_kl, "fit_step_default_s": per_step_default,
           "retain_rows": cfg.retain_rows, "kl_text_s": kl_text_s,
           "kl_text_rows": len(kl_rows), "batch": 8, "seq_len": args.seq_len, "gates": c.num_gates,
           "peak_rss_mib": peak_rss,
           "controller_bytes_safetensors": size_st, "controller_bytes_pt": size_pt}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'metric':<34}{'value':>12}")
    for k, label, fmt in [("load_first_s", "model load, first (s)", "{:.1f}"),
                          ("load_cached_s", "model load, cached (s)", "{:.1f}"),
                          ("fit_step_s", f"fit step, {c.num_gates} gates, 8x{args.seq_len} (s)", "{:.2f}"),
                          ("fit_step_retain_kl_s", f"  same + KL on {cfg.retain_rows} rows (s)", "{:.2f}"),
                          ("fit_step_default_s", "  same + their NLL rise (default) (s)", "{:.2f}"),
                          ("kl_text_s", f"KL text, {cfg.retain_samples} own texts (s)", "{:.1f}"),
                          ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
                          ("controller_bytes_safetensors", "controller file, safetensors (B)", "{}"),
                          ("controller_bytes_pt", "controller file, .pt (B)", "{}")]:
        print(f"{label:<34}{fmt.format(res[k]):>12}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
