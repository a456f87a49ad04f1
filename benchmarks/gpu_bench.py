"""GPU performance of ntkmirror, side by side in one run (issue 8).

    python3 benchmarks/gpu_bench.py --out runs/gpu_bench.json      # on a GPU host
    python3 benchmarks/gpu_bench.py --smoke                         # tiny configs on CPU

bf16 models built from real configs with random weights (speed does not depend on them):
Qwen2.5-0.5B and Qwen2.5-7B. Everything timed goes through the project's own code:
`ntkmirror.fit.PackedGates` + `train_step` (the fit loop's step), `ntkmirror.objective`,
`ntkmirror.gates.row_gates` (per-row composition), `ntkmirror.engine.GenerationEngine`,
and `cluster.ReplicaPool` for scale-out. Sections:

  env     bf16 matmul rate measured here (the MFU denominator), fused-gate bit-exactness
  fit     one step on 8 x 256 tokens: 5000-gate controller vs PEFT LoRA r=8 (all linear) vs IA3,
          eager and compiled (`ntkmirror.fit.compiled_fit`: decoder layers + head loss, FitConfig.compile)
  pack    C controllers packed in one step (8 rows x 256 tokens each): controllers/s and MFU, eager and compiled
  ablate  the fit-path optimisations switched off one at a time (fused gate, chunked loss)
  serve   prefill 32 x 512 and decode 64 x 64 with a different composed controller per row
          vs no controller, same engine; engine vs plain `model.generate` at batch 64
          (the torch.compile'd engine runs last, on the first model: compiling takes minutes)
  scale   the batch-fit path over a Ray ReplicaPool on 2 GPUs vs 1 (needs 2 GPUs and Ray)

Prints a table last and writes every number to JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ntkmirror import gates as gates_mod  # noqa: E402
from ntkmirror import objective  # noqa: E402
from ntkmirror.controller import Controller  # noqa: E402
from ntkmirror.engine import GenerationEngine  # noqa: E402
from ntkmirror.fit import PackedGates, _pack, compiled_fit, train_step  # noqa: E402
from ntkmirror.gates import RowGates, row_gates  # noqa: E402
from ntkmirror.objective import group_means, token_losses  # noqa: E402

# Real configs (from the models' config.json), written here: no hub access on the GPU hosts.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
                  bos_token_id=151643, eos_token_id=151643)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False,
                 bos_token_id=151643, eos_token_id=151643)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
            use_sliding_window=False, bos_token_id=1, eos_token_id=2)

RESULTS: dict = {"rows": [], "errors": {}}
T0 = time.perf_counter()


# ---------------------------------------------------------------------------- helpers
class Settings:
    def __init__(self, smoke: bool, compile_fit: bool = True):
        self.smoke = smoke
        self.compile_fit = compile_fit
        self.device = "cpu" if smoke else "cuda"
        self.models = {"tiny-a": TINY, "tiny-b": {**TINY, "num_hidden_layers": 4}} if smoke else \
            {"qwen2.5-0.5b": QWEN25_05B, "qwen2.5-7b": QWEN25_7B}
        self.rows, self.seq, self.completion = (2, 32, 16) if smoke else (8, 256, 128)
        self.gates = 200 if smoke else 5000
        self.packs = {"tiny-a": [1, 2, 4], "tiny-b": [1, 2]} if smoke else {"qwen2.5-0.5b": [1, 8, 32],
                                                                           "qwen2.5-7b": [1, 4, 8]}
        self.warmup, self.iters = (1, 2) if smoke else (3, 10)
        self.prefill = (4, 24) if smoke else (32, 512)
        self.decode = (4, 16, 8) if smoke else (64, 128, 64)  # batch, prompt length, new tokens
        self.first = next(iter(self.models))


def row(section, model, arm, metric, value, target=None, ok=None, **extra):
    r = {"section": section, "model": model, "arm": arm, "metric": metric, "value": value, "target": target,
         "ok": ok, **extra}
    RESULTS["rows"].append(r)
    v = f"{value:.4g}" if isinstance(value, float) else value
    print(f"[{time.perf_counter() - T0:6.1f}s] {section:6s} {model:14s} {arm:34s} {metric:22s} {v}", flush=True)
    return r


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, settings, warmup=None, iters=None) -> float:
    """Median seconds per call after warm-up (host timer around a device sync)."""
    for _ in range(settings.warmup if warmup is None else warmup):
        fn()
    sync(settings.device)
    times = []
    for _ in range(settings.iters if iters is None else iters):
        t = time.perf_counter()
        fn()
        sync(settings.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def variants(settings):
    """(label, context factory) of the fit paths timed: eager, and compiled (FitConfig.compile)."""
    out = [("", lambda model: contextlib.nullcontext())]
    if settings.compile_fit:
        out.append((", compiled", compiled_fit))
    return out


def timed_first(fn, settings) -> tuple[float, float]:
    """(first call s, median s): the first call of a compiled path includes its compile."""
    t = time.perf_counter()
    fn()
    sync(settings.device)
    return time.perf_counter() - t, timed(fn, settings)


def peak_reset(dev):
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None


def build_model(name, cfg, settings):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(settings.device):
            model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.name_or_path = name
    return model.eval().requires_grad_(False)


def free(*objs):
    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_rows(n, settings, vocab, seed):
    """n encoded examples (ids, n_prompt): random tokens, `completion` supervised tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, settings.seq), generator=g).tolist()
    return [(x, settings.seq - settings.completion) for x in ids]


def random_packed(C, model, settings, k, layer_lo=0, seed=0):
    """C controllers of k gates each at random (layer, channel) keys in layers >= layer_lo."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    lsets, csets = [], []
    for _ in range(C):
        keys = torch.randperm((L - layer_lo) * H, generator=g)[: min(k, (L - layer_lo) * H)].sort().values
        lsets.append(keys // H + layer_lo)
        csets.append(keys % H)
    return PackedGates(lsets, csets, H, 0.05, settings.device)


def flops_per_step(cfg, rows, seq, n_sup, grad_from_layer=0):
    """Useful FLOPs of one frozen-weight forward + backward (input gradients only, from the
    lowest gated layer up; no weight gradients exist to compute)."""
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    per_layer_w = H * H + 2 * H * kv + H * H + 3 * H * I  # q, k, v, o, gate, up, down
    tok = rows * seq
    attn = 2 * rows * seq * seq * H  # QK^T and AV, causal half, per layer (forward)
    head = 2 * H * cfg["vocab_size"] * n_sup
    fwd = L * (2 * per_layer_w * tok + attn) + head
    lb = L - grad_from_layer
    bwd = lb * (2 * per_layer_w * tok + 2 * attn) + head
    return fwd + bwd


def guarded(section, settings, budget_s):
    """Run a section; record a failure instead of dying; skip when the time budget is spent."""
    def wrap(fn):
        def run(*a, **kw):
            if time.perf_counter() - T0 > budget_s:
                RESULTS["errors"][section] = "skipped: time budget spent"
                print(f"skip {section}: time budget spent", flush=True)
                return None
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - a benchmark records and goes on
                RESULTS["errors"][section] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                free()
                return None
        return run
    return wrap


# ---------------------------------------------------------------------------- sections
def env_section(settings):
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": settings.device}
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    peak = None
    if settings.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        n = 8192
        a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                                   dtype=torch.bfloat16)
        t = timed(lambda: a @ b, settings, warmup=3, iters=10)
        peak = 2 * n**3 / t
        free(a, b)
        row("env", "-", "bf16 matmul 8192^3", "TFLOP/s", peak / 1e12)
    env["matmul_flops"] = peak
    # the fused low-precision gate is bit-identical to the float32 reference, on this device
    h = torch.randn(32, 512, 896, device=settings.device, dtype=torch.bfloat16, requires_grad=True)
    s = (0.05 * torch.randn(32, 896, device=settings.device)).requires_grad_()
    out = gates_mod._gated(h, s)
    gr = torch.randn_like(out)
    out.backward(gr)
    h2, s2 = h.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = (h2.float() * torch.exp(s2[:, None, :])).to(torch.bfloat16)
    ref.backward(gr)
    exact = bool(torch.equal(out, ref) and torch.equal(h.grad, h2.grad))
    s_err = float((s.grad - s2.grad).abs().max() / s2.grad.abs().max())
    row("env", "-", "fused gate vs float32 expression", "bit-identical fwd+dh", exact, True, exact, ds_rel_err=s_err)
    free(h, s, h2, s2, out, ref, gr)
    # the gate multiply alone, prefill-sized (32 x 512 x 896 bf16): each way of writing it
    h = torch.randn(*settings.prefill, 896, device=settings.device, dtype=torch.bfloat16)
    g = torch.exp(0.05 * torch.randn(settings.prefill[0], 1, 896, device=settings.device))
    gb = g.to(torch.bfloat16)
    ways = {"3 passes: (h.float()*g).to(bf16)": lambda: (h.float() * g).to(torch.bfloat16),
            "1 pass: mul(h, g, out=bf16) (used)": lambda: torch.mul(h, g, out=torch.empty_like(h)),
            "bf16*bf16 (bandwidth reference)": lambda: h * gb}
    if settings.device == "cuda":  # what a compiled (Triton) kernel gives, for comparison
        comp = torch.compile(lambda h, g: (h.float() * g).to(h.dtype), dynamic=True)
        ways["1 pass compiled (not used)"] = lambda: comp(h, g)
    for label, fn in ways.items():
        t = timed(fn, settings, warmup=3, iters=20)
        row("env", "-", f"gate multiply {label}", "us", t * 1e6, gbps=2 * h.numel() * 2 / t / 1e9)
    free(h, g, gb)
    RESULTS["env"] = env
    return peak


def fit_section(name, cfg, model, settings):
    """One step on the same 8 x 256 batch: controller (all layers; top quarter) vs LoRA vs IA3,
    each eager and (controller, LoRA) compiled."""
    dev = settings.device
    rows = synthetic_rows(settings.rows, settings, cfg["vocab_size"], 1)
    batch, row_ctrl = _pack([rows], [list(range(settings.rows))], 0)
    batch, row_ctrl = batch.to(dev), row_ctrl.to(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = {}
    L = cfg["num_hidden_layers"]
    arms = (("controller 5000 gates, all layers", 0), ("controller 5000 gates, top 1/4 layers", L - max(1, L // 4)))
    for label, regional in variants(settings):
        torch._dynamo.reset()
        for arm, lo in arms:
            peak_reset(dev)
            pg = random_packed(1, model, settings, settings.gates, layer_lo=lo)
            opt = torch.optim.AdamW([pg.raw], lr=5e-3, weight_decay=0.0)
            with regional(model):
                first, t = timed_first(lambda: train_step(model, pg, opt, batch, row_ctrl, 1e-5), settings)
            out[arm + label] = (t, peak_gib(dev))
            row("fit", name, arm + label, "step s", t, first_call_s=first)
            row("fit", name, arm + label, "peak GiB", out[arm + label][1], weights_gib=weights)
            free(pg, opt)
    from peft import get_peft_model

    for method in ("lora", "ia3"):
        pm = get_peft_model(model, _peft_config(method))
        inner = pm.get_base_model()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            tl = token_losses(inner, batch)
            loss = group_means(tl.nll, row_ctrl[tl.row], 1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for label, regional in variants(settings) if method == "lora" else variants(settings)[:1]:
            torch._dynamo.reset()
            peak_reset(dev)
            arm = {"lora": "PEFT LoRA r=8 all-linear", "ia3": "PEFT IA3 (k, v, down)"}[method] + label
            with regional(inner):
                first, t = timed_first(step, settings)
            out[arm] = (t, peak_gib(dev))
            n_params = sum(p.numel() for p in params)
            row("fit", name, arm, "step s", t, trainable=n_params, first_call_s=first)
            row("fit", name, arm, "peak GiB", out[arm][1])
        pm.unload()  # the base model, adapters removed, weights untouched
        free(pm, inner, opt, params)
        model.requires_grad_(False)
    lora = out["PEFT LoRA r=8 all-linear"]
    for label, _ in variants(settings):
        for arm, short in (("controller 5000 gates, all layers", "controller"),
                           ("controller 5000 gates, top 1/4 layers", "controller (top 1/4)")):
            c = out[arm + label]
            for lora_label in {"", label}:  # vs eager LoRA; compiled vs compiled LoRA too
                ref = out["PEFT LoRA r=8 all-linear" + lora_label]
                ratio = c[0] / ref[0]
                row("fit", name, f"{short}{label} / LoRA{lora_label or ' (eager)'}", "step time ratio", ratio,
                    "<= 0.5", ratio <= 0.5)
        c = out["controller 5000 gates, all layers" + label]
        if c[1] is not None:
            row("fit", name, f"controller{label} / LoRA (eager)", "peak memory ratio", c[1] / lora[1], "< 1",
                c[1] < lora[1])


def _peft_config(method):
    try:
        from benchmarks.baselines import peft_config  # the quality benchmark's exact configs
        return peft_config(method)
    except ImportError:
        from peft import IA3Config, LoraConfig
        if method == "lora":
            return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none")
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def pack_section(name, cfg, model, settings, peak):
    """C controllers in one step, equal work each (8 rows x 256 tokens): controllers/s and MFU,
    eager and compiled (FitConfig.compile)."""
    dev = settings.device
    best = 0.0
    for label, regional in variants(settings):
        torch._dynamo.reset()
        per_c = {}
        for C in settings.packs[name]:
            peak_reset(dev)
            sets = [synthetic_rows(settings.rows, settings, cfg["vocab_size"], 100 + c) for c in range(C)]
            batch, row_ctrl = _pack(sets, [list(range(settings.rows))] * C, 0)
            batch, row_ctrl = batch.to(dev), row_ctrl.to(dev)
            pg = random_packed(C, model, settings, settings.gates, seed=C)
            opt = torch.optim.AdamW([pg.raw], lr=5e-3, weight_decay=0.0)
            arm = f"C={C}{label}"
            try:
                with regional(model):
                    first, t = timed_first(lambda: train_step(model, pg, opt, batch, row_ctrl, 1e-5), settings)
            except torch.OutOfMemoryError:
                row("pack", name, arm, "step s", "OOM")
                free(pg, opt, batch)
                continue
            n_sup = C * settings.rows * settings.completion
            fl = flops_per_step(cfg, C * settings.rows, settings.seq, n_sup)
            per_c[C] = t
            row("pack", name, arm, "step s", t, peak_gib=peak_gib(dev), first_call_s=first)
            row("pack", name, arm, "controller-steps/s", C / t)
            row("pack", name, arm, "controllers/s (240 steps)", C / t / 240)
            if peak:
                row("pack", name, arm, "MFU", fl / t / peak, useful_tflop=fl / 1e12)
                best = max(best, fl / t / peak)
            free(pg, opt, batch)
        if 1 in per_c and 8 in per_c:
            gain = 8 * per_c[1] / per_c[8]
            row("pack", name, f"C=8 vs C=1{label}", "controllers/s ratio", gain, ">= 4", gain >= 4)
    if peak and best:
        first = name == settings.first
        row("pack", name, "best C, either path", "MFU", best, ">= 0.40" if first else None,
            best >= 0.40 if first else None)


def ablate_section(name, cfg, model, settings):
    """Each fit-path optimisation switched off alone, C=8 (or the largest smoke pack)."""
    dev = settings.device
    C = 8 if not settings.smoke else 2
    sets = [synthetic_rows(settings.rows, settings, cfg["vocab_size"], 200 + c) for c in range(C)]
    batch, row_ctrl = _pack(sets, [list(range(settings.rows))] * C, 0)
    batch, row_ctrl = batch.to(dev), row_ctrl.to(dev)

    def measure(arm):
        peak_reset(dev)
        pg = random_packed(C, model, settings, settings.gates, seed=7)
        opt = torch.optim.AdamW([pg.raw], lr=5e-3, weight_decay=0.0)
        t = timed(lambda: train_step(model, pg, opt, batch, row_ctrl, 1e-5), settings)
        row("ablate", name, f"C={C} {arm}", "step s", t, peak_gib=peak_gib(dev))
        free(pg, opt)

    measure("all optimisations")
    gates_mod._LowPrecisionGate.apply = staticmethod(  # the plain float32 expression instead
        lambda h, g: (h.float() * g).to(h.dtype))
    try:
        measure("unfused gate (h.float()*g).to(bf16)")
    finally:
        del gates_mod._LowPrecisionGate.apply  # back to autograd.Function.apply
    rows_fn = PackedGates.rows
    PackedGates.rows = lambda self, rc: _without_scale(rows_fn(self, rc))
    try:
        measure("exp(s) per layer (no precomputed scale)")
    finally:
        PackedGates.rows = rows_fn
    chunk = objective.LOGITS_CHUNK
    objective.LOGITS_CHUNK = 2**62
    try:
        measure("unchunked float32 logits")
    finally:
        objective.LOGITS_CHUNK = chunk


def _without_scale(rg):
    return RowGates(rg.layers, rg.values)


def _serving_gates(model, n_rows, settings, seed=0):
    """A different composition of two random 5000-gate controllers on every row."""
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    ctrls = []
    for _ in range(n_rows + 1):
        keys = torch.randperm(L * H, generator=g)[: min(settings.gates, L * H)].sort().values
        ctrls.append(Controller(keys // H, keys % H, torch.randn(len(keys), generator=g), 0.05,
                                n_layers=L, hidden_size=H, meta={}))
    rows = [[(ctrls[r], 0.7), (ctrls[r + 1], 0.3)] for r in range(n_rows)]
    t = time.perf_counter()
    rg = row_gates(rows, L, H, device=settings.device)
    sync(settings.device)
    return rg, time.perf_counter() - t


def prefill_rows(name, model, settings):
    """Prefill 32 x 512 through the engine, a different composed controller per row vs none."""
    V, g = model.config.vocab_size, torch.Generator().manual_seed(4)
    Bp, Tp = settings.prefill
    prompts = torch.randint(10, V, (Bp, Tp), generator=g).tolist()
    eng = GenerationEngine(model, None, max_batch=Bp, max_seq_len=Tp + 8, compile=False, graphs=False)
    rg, t_compose = _serving_gates(model, Bp, settings)
    row("serve", name, f"compose {Bp} rows x 2 controllers", "row_gates s", t_compose)
    tp = {}
    for arm, gates in (("no controller", None), ("per-row controllers", rg)):
        t = timed(lambda: eng.generate_ids(prompts, gates, 1, eos_token_id=None), settings)
        tp[arm] = Bp * Tp / t
        row("serve", name, f"prefill {Bp}x{Tp} {arm}", "tokens/s", tp[arm])
    r = tp["per-row controllers"] / tp["no controller"]
    row("serve", name, "prefill gated / ungated", "throughput ratio", r, ">= 0.98", r >= 0.98)
    free(eng)


def serve_section(name, cfg, model, settings, compile_engine: bool):
    dev = settings.device
    V = cfg["vocab_size"]
    g = torch.Generator().manual_seed(5)
    if not compile_engine:
        prefill_rows(name, model, settings)
    # decode: batch 64, 64 new tokens; engine (graphs, +-compile) vs model.generate
    Bd, Td, n_new = settings.decode
    prompts = torch.randint(10, V, (Bd, Td), generator=g).tolist()
    rg, _ = _serving_gates(model, Bd, settings, seed=1)

    def decode_rate(run):  # new tokens/s of the decode phase: (time(n) - time(1)) over (n - 1) steps
        t_n = timed(lambda: run(n_new), settings, warmup=1, iters=3)
        t_1 = timed(lambda: run(1), settings, warmup=1, iters=3)
        return Bd * (n_new - 1) / max(t_n - t_1, 1e-9), Bd * n_new / t_n

    variants = [("eager", False, False)] if dev == "cpu" else [("CUDA graph", False, True)]
    if compile_engine:  # run on its own, last: compiling costs minutes
        variants = [("CUDA graph + compile", True, True) if dev == "cuda" else ("compile", True, False)]
    rates = {}
    for label, comp, graphs in variants:
        eng = GenerationEngine(model, None, max_batch=Bd, max_seq_len=Td + n_new, compile=comp, graphs=graphs)
        for arm, gates in (("no controller", None), ("per-row controllers", rg)):
            t = time.perf_counter()
            eng.generate_ids(prompts, gates, 2, eos_token_id=None)  # first call captures (and compiles)
            row("serve", name, f"engine[{label}] {arm} first call", "s", time.perf_counter() - t)
            dec, total = decode_rate(lambda n: eng.generate_ids(prompts, gates, n, eos_token_id=None))
            rates[(label, arm)] = dec
            row("serve", name, f"decode {Bd}x{n_new} engine[{label}] {arm}", "decode tok/s", dec, total_tok_s=total)
        rr = rates[(label, "per-row controllers")] / rates[(label, "no controller")]
        row("serve", name, f"decode engine[{label}] gated / ungated", "throughput ratio", rr, ">= 0.98", rr >= 0.98)
        free(eng)

    # plain transformers generate (dynamic cache, eager), same prompts, no gates
    if name not in SERVE_HF:
        model.generation_config.eos_token_id = None
        ids = torch.tensor(prompts, device=dev)
        mask = torch.ones_like(ids)

        def hf(n):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                           top_p=None, top_k=None, temperature=None)

        SERVE_HF[name] = decode_rate(hf)
        row("serve", name, f"decode {Bd}x{n_new} model.generate", "decode tok/s", SERVE_HF[name][0],
            total_tok_s=SERVE_HF[name][1])
    for label, _, _ in variants:
        sp = rates[(label, "per-row controllers")] / SERVE_HF[name][0]
        row("serve", name, f"engine[{label}] gated / model.generate", "decode speed-up", sp, ">= 5", sp >= 5)


SERVE_HF: dict = {}  # model -> (decode tok/s, total tok/s) of plain model.generate


def scale_section(settings):
    """Batch fit over a Ray ReplicaPool, one replica per GPU: items/s on 1, 2, 4, ... up to every
    visible GPU, each vs 1 (the target is on 2 vs 1). Needs 2+ GPUs and Ray."""
    n_gpu = torch.cuda.device_count() if settings.device == "cuda" else 0
    try:
        import ray  # noqa: F401
        from cluster.pool import ReplicaPool, ray_session
    except ImportError as e:
        row("scale", "-", "2 GPUs vs 1", "items/s ratio", "not run", ">= 1.8",
            reason=f"Ray/cluster not importable here ({e}); and {n_gpu} GPU(s) visible")
        return
    if n_gpu < 2:
        row("scale", "-", "2 GPUs vs 1", "items/s ratio", "not run", ">= 1.8",
            reason=f"{n_gpu} GPU(s) visible: multi-GPU machine kinds were withheld this session")
        return
    import tempfile

    model_dir = Path(tempfile.mkdtemp(prefix="ntk-bench-model-"))
    m = build_model("qwen2.5-0.5b-random", QWEN25_05B, settings)
    m.save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    free(m)
    items = [{"id": f"item-{i}", "examples": [{"prompt": f"Question: {a} + {i} = ?\nAnswer:", "completion": f" {a + i}"}
                                              for a in range(10, 26)]} for i in range(64)]
    cfg = {"gates": 5000, "steps": 30, "score_batches": 2, "batch_size": 8, "lr": 5e-3}
    per_call = 8  # items packed per replica call
    rates = {}
    counts = sorted({n for n in (1, 2, 4, 8, 16) if n <= n_gpu} | {n_gpu})
    for n in counts:
        with ray_session(num_gpus=n, num_cpus=4 * n):
            pool = ReplicaPool(n, model=str(model_dir), dtype="bfloat16", num_gpus_per_replica=1)
            calls = [(items[i: i + per_call], cfg) for i in range(0, len(items), per_call)]
            list(pool.map("fit_pack", calls[:n]))  # warm up each replica
            t = time.perf_counter()
            results = [r for _, r in pool.map("fit_pack", calls)]
            rates[n] = len(items) / (time.perf_counter() - t)
            bad = sum(1 for res in results if isinstance(res, BaseException))
            row("scale", "qwen2.5-0.5b", f"{n} GPU(s)", "items/s", rates[n], failed_calls=bad)
    for n in counts[1:]:
        r = rates[n] / rates[1]
        target = ">= 1.8" if n == 2 else None
        row("scale", "qwen2.5-0.5b", f"{n} GPUs vs 1", "items/s ratio", r, target, r >= 1.8 if n == 2 else None)


def _tokenizer():
    """A small byte-level BPE tokenizer built offline (ids fit any model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Question: {a} + {b} = ?\nAnswer: {a + b}" for a in range(10, 60) for b in range(10, 30)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------- main
def print_table():
    rows = RESULTS["rows"]
    print("\n| section | model | arm | metric | value | target | ok |\n|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["value"]
        v = f"{v:.4g}" if isinstance(v, float) else str(v)
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        print(f"| {r['section']} | {r['model']} | {r['arm']} | {r['metric']} | {v} | {r['target'] or ''} | {ok} |")
    for k, e in RESULTS["errors"].items():
        print(f"error in {k}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU (checks the script runs)")
    ap.add_argument("--out", default=None, help="JSON path (default: runs/gpu_bench[_smoke].json)")
    ap.add_argument("--only", default="env,fit,pack,ablate,serve,scale", help="comma list of sections")
    ap.add_argument("--models", default=None, help="comma list of model keys (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile engine variant")
    ap.add_argument("--no-compile-fit", action="store_true", help="skip the compiled fit variants (FitConfig.compile)")
    ap.add_argument("--serve-models", default=None, help="models for the serve section (default: all)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later sections are skipped after it")
    args = ap.parse_args(argv)
    settings = Settings(args.smoke, compile_fit=not args.no_compile_fit)
    if settings.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    only = set(args.only.split(","))
    models = args.models.split(",") if args.models else list(settings.models)
    serve_models = args.serve_models.split(",") if args.serve_models else list(settings.models)
    out = Path(args.out or ROOT / "runs" / ("gpu_bench_smoke.json" if settings.smoke else "gpu_bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    RESULTS["settings"] = {"smoke": settings.smoke, "rows": settings.rows, "seq": settings.seq,
                           "completion": settings.completion, "gates": settings.gates, "packs": settings.packs,
                           "prefill": settings.prefill, "decode": settings.decode, "argv": sys.argv[1:]}

    def save():
        RESULTS["seconds"] = time.perf_counter() - T0
        out.write_text(json.dumps(RESULTS, indent=1, default=str))

    peak = None
    if "env" in only:
        peak = guarded("env", settings, args.budget)(env_section)(settings)
        save()
    late = []  # (section, model): compile-heavy work, after every other number is in
    for name in models:
        cfg = settings.models[name]
        model = guarded(f"build {name}", settings, args.budget)(build_model)(name, cfg, settings)
        if model is None:
            continue
        if "fit" in only:
            guarded(f"fit {name}", settings, args.budget)(fit_section)(name, cfg, model, settings)
            save()
        if "pack" in only:
            guarded(f"pack {name}", settings, args.budget)(pack_section)(name, cfg, model, settings, peak)
            save()
        if "ablate" in only and name == settings.first:
            guarded(f"ablate {name}", settings, args.budget)(ablate_section)(name, cfg, model, settings)
            save()
        if "serve" in only and name in serve_models:
            guarded(f"serve {name}", settings, args.budget)(serve_section)(name, cfg, model, settings, False)
            save()
        if name == settings.first:
            late.append((name, cfg, model))  # keep it for the compiled runs
        else:
            free(model)
    for name, cfg, model in late:
        if "serve" in only and not args.no_compile:
            guarded(f"serve-compile {name}", settings, args.budget)(serve_section)(name, cfg, model, settings, True)
            save()
    late.clear()
    if "scale" in only:
        guarded("scale", settings, args.budget)(scale_section)(settings)
    save()
    print_table()
    print(f"\nwrote {out} ({time.perf_counter() - T0:.0f}s)")


if __name__ == "__main__":
    main()
