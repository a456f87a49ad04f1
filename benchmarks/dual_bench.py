"""Cost and instrument numbers of the NTK-dual harness on one model, CPU or GPU (issue 6).

    python benchmarks/dual_bench.py --out runs/dual_bench.json                  # embedded model, CPU
    python3 benchmarks/dual_bench.py --random-smollm2 --device cuda --out x.json  # GPU host, no weights there

--random-smollm2 builds SmolLM2-135M's architecture (30 layers, 576 wide, 49152-token head)
with random weights and the tests' tiny tokenizer: cost does not depend on the weights, and
the instrument checks (adjoint, symmetry, bit-exact restore) must hold for any weights.
Sections: `ops` (one F, one exact JVP, one VJP: what a CG iteration costs), `diagnose` (a
fresh basis per projection; every weight compared bit for bit afterwards), `fit-dual` and
`secant`. Prints a table last and writes every number to JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from ntkmirror.data import collate, encode_all, load_jsonl_examples, pad_id  # noqa: E402
from ntkmirror.dual import (DualConfig, FitDualConfig, Observable, Tangent, dual_diagnose, fit_dual,  # noqa: E402
                            select_basis)
from ntkmirror.secant import SecantConfig, secant_check  # noqa: E402

# SmolLM2-135M-Instruct's config.json (the embedded default), written here: no hub on GPU hosts.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")


def load(args):
    if not args.random_smollm2:
        from ntkmirror.models import load_model

        return load_model(args.model, device=args.device, dtype="float32")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(**SMOLLM2_135M, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().to(args.device or "cpu").eval().requires_grad_(False)
    model.config.name_or_path = "random-SmolLM2-135M"
    return model, tok


def timed(fn, device, n=3):
    fn()  # warm-up
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-smollm2", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--support", default=str(ROOT / "examples/math_train.jsonl"))
    ap.add_argument("--calibration", default=str(ROOT / "examples/math_eval.jsonl"))
    ap.add_argument("--projections", default="target,topk")
    ap.add_argument("--gates", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cg-iters", type=int, default=16)
    ap.add_argument("--metric", default="activation")
    ap.add_argument("--steps", type=int, default=2, help="fit-dual steps (0: skip fit-dual and secant)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = load(args)
    device = next(model.parameters()).device
    support, calibration = load_jsonl_examples(args.support, tok), load_jsonl_examples(args.calibration, tok)
    base = dict(gates=args.gates, batch_size=args.batch_size, score_batches=2, cg_iters=args.cg_iters,
                metric=args.metric)
    res = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "model": model.config.name_or_path, "args": vars(args)}

    # ops: what one CG iteration (a VJP then a JVP) costs on this batch
    cfg = DualConfig(**base)
    enc = encode_all(tok, support, cfg.max_length, cfg.add_eos)
    basis = select_basis(model, enc, cfg, pad_id(tok))
    batch = collate(encode_all(tok, calibration[: args.batch_size], cfg.max_length), pad_id(tok))
    res["ops"] = {}
    for proj in args.projections.split(","):
        obs = Observable(model, batch, basis, proj, cfg.top_k)
        s = torch.zeros(basis.size, device=device)
        tan = Tangent(obs, s)
        with torch.no_grad():
            y = torch.randn_like(obs(s))
        v = torch.randn_like(s)
        with torch.no_grad():
            f = timed(lambda: obs(s), device)
        res["ops"][proj] = {"observable_dim": y.numel(), "F_s": f, "jvp_s": timed(lambda: tan.jvp(v), device),
                            "vjp_s": timed(lambda: tan.vjp(y), device)}

    res["diagnose"] = {}
    for proj in args.projections.split(","):
        before = [p.detach().clone() for p in model.parameters()]
        t0 = time.perf_counter()
        rep = dual_diagnose(model, tok, support, calibration, None, DualConfig(projection=proj, **base))
        rep["wall_s"] = time.perf_counter() - t0
        rep["weights_bit_identical"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        del before
        res["diagnose"][proj] = rep

    if args.steps:
        t0 = time.perf_counter()
        c, rep = fit_dual(model, tok, support, FitDualConfig(steps=args.steps, **base), calibration, progress=False)
        res["fit_dual"] = {**rep, "wall_s": time.perf_counter() - t0}
        res["secant"] = secant_check(model, tok, c, calibration, SecantConfig(batch_size=args.batch_size))

    print(f"\nNTK-dual harness on {res['model']} ({res['gpu'] or res['cpu']}, {res['threads']} threads)")
    print(f"{'projection':>10} {'m':>6} {'F s':>8} {'JVP s':>8} {'VJP s':>8} {'diag s':>8} {'adjoint':>9} "
          f"{'symmetry':>9} {'CG':>3} {'range':>9} {'realised':>9} {'field':>9} {'bit-exact':>9}")
    for proj, o in res["ops"].items():
        d = res["diagnose"][proj]
        print(f"{proj:>10} {o['observable_dim']:>6} {o['F_s']:>8.3f} {o['jvp_s']:>8.3f} {o['vjp_s']:>8.3f} "
              f"{d['wall_s']:>8.1f} {d['adjoint_error']:>9.2e} {d['symmetry_error']:>9.2e} {d['cg_iterations']:>3} "
              f"{d['range_residual']:>9.2e} {d['realized_residual']:>9.2e} {d['field_residual']:>9.2e} "
              f"{str(d['weights_bit_identical']):>9}")
    if args.steps:
        f = res["fit_dual"]
        print(f"fit-dual {args.steps} steps: {f['wall_s']:.1f}s, NLL {f['train_nll_before']:.4f} -> "
              f"{f['train_nll_after']:.4f}; field residual per step "
              + ", ".join(f"{r['field_residual']:.3g}" for r in f["steps"]))
        print("secant error at t = " + ", ".join(f"{r['fraction']}: {r['secant_error']:.3g}"
                                                  for r in res["secant"]["fractions"])
              + f"; tangent drift {res['secant']['tangent_drift']:.3g}, midpoint {res['secant']['midpoint_error']:.3g}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
