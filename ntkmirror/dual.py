"""NTK-dual diagnostics: can a gate basis realise the frozen model's full-weight SGD logit field?

F(s) projects the logits of the gated model on one calibration batch; s is the (K,) vector
of log-gates of a gate basis (K selected (layer, channel) keys), parameterised directly.
The target field d = F(s; theta - eta g_S) - F(s; theta) is the change one full-weight SGD
step on the support batch makes (the weights are restored bit-exactly afterwards).
B = dF/ds. We solve (B M^-1 B^T + ridge I) a = d by matrix-free CG, take the M-minimum-norm
update u = M^-1 B^T a, and check it against real forwards at s + u and at the box-clipped
point. `fit-dual` repeats that solve along the path; `secant.py` checks a finished controller.
"""

from __future__ import annotations

import copy
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from .controller import Controller, new_meta
from .data import Batch, Example, collate, data_hash, encode_all, pad_id
from .errors import ConfigError, ModelMismatchError, NtkMirrorError
from .gates import RowGates, attach, parse_layers
from .models import find_decoder_layers, hidden_size
from .objective import supervised_logits, token_losses

PROJECTIONS = ("target", "topk", "full")
JVP_MODES = ("exact", "fd")
METRICS = ("identity", "activation")


@dataclass
class DualConfig:
    projection: str = "target"  # target | topk | full
    top_k: int = 32  # non-teacher tokens per position for `topk`
    target_step_size: float = 1e-5  # eta of the reversible full-weight SGD step
    jvp_mode: str = "exact"  # exact (forward-mode AD) | fd (central differences)
    metric: str = "identity"  # identity | activation (M = E[h^2] e^{2s})
    ridge: float = 1e-4
    cg_iters: int = 16
    cg_tol: float = 1e-5
    param_filter: str | None = None  # regex on parameter names that take the SGD step (None: all)
    batch_size: int = 8  # rows of the support and calibration batches
    max_length: int = 1024
    add_eos: bool = True
    gates: int = 5000  # size of a fresh gate basis (when no controller is given)
    layers: str = "all"
    score: str = "abs"
    score_batches: int = 16  # as fit
    max_log_gate: float = 0.05  # box of a fresh basis (a controller brings its own)
    probes: int = 2  # random probes for the adjoint and symmetry checks
    fd_eps: float = 1e-3  # largest |s| perturbation of an fd JVP
    seed: int = 0

    def validate(self) -> "DualConfig":
        for name, allowed in (("projection", PROJECTIONS), ("jvp_mode", JVP_MODES), ("metric", METRICS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("top_k", "target_step_size", "cg_iters", "batch_size", "max_length", "gates",
                    "score_batches", "max_log_gate", "probes", "fd_eps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ridge < 0 or self.cg_tol < 0:
            raise ConfigError("ridge and cg_tol must be >= 0")
        if self.param_filter:
            try:
                re.compile(self.param_filter)
            except re.error as e:
                raise ConfigError(f"bad param_filter regex {self.param_filter!r}: {e}") from None
        return self


@dataclass
class FitDualConfig(DualConfig):
    steps: int = 8
    stats_examples: int = 32  # training examples used for the before/after NLL


@contextmanager
def exact_attention():
    """The math SDPA kernel: the fused CPU/GPU kernels have no forward-mode AD or double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _check_model(model) -> None:
    dt = _dtype(model)
    if dt not in (torch.float32, torch.float64):
        raise ConfigError(f"NTK-dual diagnostics run in float32, the model is {dt} (an SGD step of size eta "
                          "rounds away in 16-bit weights); load it with dtype float32")
    model.requires_grad_(False)


# ---------------------------------------------------------------- gate basis and observable


class GateBasis:
    """K (layer, channel) gates; maps a (K,) log-gate vector to shared dense gates."""

    def __init__(self, layer, channel, n_layers: int, hidden: int, max_log_gate: float):
        self.layer = torch.as_tensor(layer, dtype=torch.long).cpu()
        self.channel = torch.as_tensor(channel, dtype=torch.long).cpu()
        self.n_layers, self.hidden, self.max_log_gate = n_layers, hidden, float(max_log_gate)
        self.layers = sorted(set(self.layer.tolist()))  # gated decoder layers
        pos = torch.full((n_layers,), -1, dtype=torch.long)
        pos[self.layers] = torch.arange(len(self.layers))
        self.flat = pos[self.layer] * hidden + self.channel  # (K,) into the (L_g * H) dense gates

    @property
    def size(self) -> int:
        return self.layer.numel()

    def gates(self, s: torch.Tensor) -> RowGates:
        """Dense (L_g, H) gates, differentiable (and dual-number safe) in s."""
        dense = s.new_zeros(len(self.layers) * self.hidden).index_add(0, self.flat.to(s.device), s)
        return RowGates(self.layers, dense.view(len(self.layers), self.hidden))

    @classmethod
    def from_controller(cls, c: Controller, model) -> "GateBasis":
        n_layers, hidden = len(find_decoder_layers(model)[1]), hidden_size(model)
        if (c.n_layers, c.hidden_size) != (n_layers, hidden):
            raise ModelMismatchError(f"controller is for {c.n_layers} layers x {c.hidden_size} channels, "
                                     f"the model has {n_layers} x {hidden}")
        return cls(c.layer, c.channel, n_layers, hidden, c.max_log_gate)

    def controller(self, s: torch.Tensor, meta: dict) -> Controller:
        return Controller.from_log_gates(self.layer, self.channel, s.detach().float().cpu(), self.max_log_gate,
                                         n_layers=self.n_layers, hidden_size=self.hidden, meta=meta).validate()


def select_basis(model, encoded, cfg: DualConfig, pad: int) -> GateBasis:
    """A fresh basis: the fit path's saliency selection on the support examples."""
    from .fit import BatchSampler
    from .selection import saliency_scores, top_gates

    n_layers, hidden = len(find_decoder_layers(model)[1]), hidden_size(model)
    layers = parse_layers(cfg.layers, n_layers)
    sampler = BatchSampler(len(encoded), cfg.batch_size, cfg.seed)
    batches = ((collate([encoded[i] for i in sampler.next()], pad), torch.zeros(cfg.batch_size, dtype=torch.long))
               for _ in range(cfg.score_batches))
    scores = saliency_scores(model, batches, 1, layers, hidden, cfg.score)[0]  # (L_g, H)
    layer, channel = top_gates(scores, layers, cfg.gates)
    return GateBasis(layer, channel, n_layers, hidden, cfg.max_log_gate)


class Observable:
    """F(s): projected logits of the gated model on one calibration batch, flattened to (m,)."""

    def __init__(self, model, batch: Batch, basis: GateBasis, projection: str = "target", top_k: int = 32):
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
        self.model, self.basis, self.projection = model, basis, projection
        self.batch = batch.to(_device(model))
        self.tokens = int((self.batch.labels[:, 1:] != -100).sum())
        self.index = None
        if projection == "topk":  # teacher + the base model's top-K other tokens, fixed once
            with torch.no_grad(), exact_attention():
                z0, y, _ = supervised_logits(model, self.batch)  # (N, V), (N,)
            k = min(top_k, z0.shape[1] - 1)
            others = z0.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices
            self.index = torch.cat([y[:, None], others], 1)  # (N, k + 1), teacher never repeated

    def with_basis(self, basis: GateBasis) -> "Observable":
        obs = copy.copy(self)
        obs.basis = basis
        return obs

    def project(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.projection == "target":  # centred teacher logit, (N,)
            return z.gather(1, y[:, None])[:, 0] - z.mean(1)
        if self.projection == "topk":  # recentred within the set, (N * (k + 1),)
            zs = z.gather(1, self.index)
            return (zs - zs.mean(1, keepdim=True)).reshape(-1)
        return (z - z.mean(1, keepdim=True)).reshape(-1)  # full, centred: (N * V,)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        with attach(self.model, self.basis.gates(s)), exact_attention():
            z, y, _ = supervised_logits(self.model, self.batch)
        return self.project(z, y)

    @torch.no_grad()
    def activation_metric(self, s: torch.Tensor) -> torch.Tensor:
        """(K,) E[h^2] e^{2s}: mean square of each gated channel over the batch's tokens."""
        with attach(self.model, self.basis.gates(s), record=True) as hooks, exact_attention():
            self.model.base_model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                                  use_cache=False)
            mask = self.batch.attention_mask.bool()
            msq = torch.stack([hooks.outputs[l][mask].to(s.dtype).pow(2).mean(0) for l in self.basis.layers])
        return msq.reshape(-1)[self.basis.flat.to(msq.device)]


class Tangent:
    """B = dF/ds at s. B^T y is an exact VJP through one retained graph; B v is an exact
    forward-mode JVP, or (mode "fd") a central difference with max |h v| = fd_eps."""

    def __init__(self, obs: Observable, s: torch.Tensor, mode: str = "exact", fd_eps: float = 1e-3):
        self.obs, self.s, self.mode, self.fd_eps = obs, s.detach(), mode, fd_eps
        self._s = self._F = None

    def vjp(self, y: torch.Tensor) -> torch.Tensor:
        if self._F is None:
            self._s = self.s.clone().requires_grad_(True)
            with torch.enable_grad():
                self._F = self.obs(self._s)
        return torch.autograd.grad(self._F, self._s, y, retain_graph=True)[0]

    @torch.no_grad()
    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "fd":
            h = self.fd_eps / max(v.abs().max().item(), 1e-30)
            return (self.obs(self.s + h * v) - self.obs(self.s - h * v)) / (2 * h)
        with fwAD.dual_level():
            return fwAD.unpack_dual(self.obs(fwAD.make_dual(self.s, v))).tangent


# ---------------------------------------------------------------- target field and solver


def target_field(model, obs: Observable, s: torch.Tensor, support: Batch, eta: float,
                 param_filter: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(d, F(s), info): d = F after one full-weight SGD step of size eta on the support NLL
    (gates at s) minus F before. The step is undone by copying saved weights back, so the
    model is bit-identical afterwards, also when a forward fails halfway."""
    named = [(n, p) for n, p in model.named_parameters() if not param_filter or re.search(param_filter, n)]
    if not named:
        raise ConfigError(f"param_filter {param_filter!r} matches no parameter of the model")
    params = [p for _, p in named]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with attach(model, obs.basis.gates(s.detach())), exact_attention():
            loss = token_losses(model, support.to(_device(model))).nll.mean()
            grads = torch.autograd.grad(loss, params)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        F0 = obs(s)
        try:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-eta)
            F1 = obs(s)
        finally:
            for p, w in zip(params, saved):
                p.copy_(w)
    info = {"support_nll": loss.item(), "grad_norm": math.sqrt(sum(g.double().pow(2).sum().item() for g in grads)),
            "step_tensors": len(params), "step_params": sum(p.numel() for p in params)}
    return F1 - F0, F0, info


def conjugate_gradient(matvec: Callable, b: torch.Tensor, iters: int, tol: float,
                       on_iter: Callable | None = None) -> tuple[torch.Tensor, list[float]]:
    """CG for a symmetric positive definite operator from x = 0; history of ||r|| / ||b||.

    on_iter(residual, x, Kx) sees every iterate with its image Kx (kept up to date for free)."""
    x, r, Kx = torch.zeros_like(b), b.clone(), torch.zeros_like(b)
    p, rr, bn = r.clone(), r @ r, b.norm().item()
    hist = [1.0 if bn > 0 else 0.0]
    while len(hist) <= iters and hist[-1] > tol:
        Kp = matvec(p)
        pKp = p @ Kp
        if pKp <= 0:  # not positive definite (an fd operator can be slightly off)
            break
        alpha = rr / pKp
        x += alpha * p
        Kx += alpha * Kp
        r -= alpha * Kp
        rr_new = r @ r
        hist.append(rr_new.sqrt().item() / bn)
        p = r + (rr_new / rr) * p
        rr = rr_new
        if on_iter:
            on_iter(hist[-1], x, Kx)
    return x, hist


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a|| / ||b||, 0 when both vanish."""
    na, nb = a.norm().item(), b.norm().item()
    return na / nb if nb > 0 else (0.0 if na == 0 else math.inf)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    return (a @ b).item() / (na * nb) if na > 0 and nb > 0 else float(na == nb)


def _mismatch(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """|a - b| / scale for scalars (0 when the scale vanishes)."""
    return abs(a.item() - b.item()) / scale.item() if scale > 0 else 0.0


def _probe_errors(tan: Tangent, K: Callable, m: int, k: int, like: torch.Tensor, n: int, gen) -> tuple[float, float]:
    """Worst relative adjoint error |<y,Bv> - <B^T y,v>| and symmetry error |<x,Ky> - <Kx,y>|."""
    rnd = lambda size: torch.randn(size, generator=gen, dtype=torch.float64).to(like)  # noqa: E731
    adj = sym = 0.0
    for _ in range(n):
        y, v = rnd(m), rnd(k)
        Bv, Bty = tan.jvp(v), tan.vjp(y)
        adj = max(adj, _mismatch(y @ Bv, Bty @ v, torch.maximum(y.norm() * Bv.norm(), Bty.norm() * v.norm())))
        x, y = rnd(m), rnd(m)
        Kx, Ky = K(x), K(y)
        sym = max(sym, _mismatch(x @ Ky, Kx @ y, torch.maximum(x.norm() * Ky.norm(), Kx.norm() * y.norm())))
    return adj, sym


def solve_step(model, obs: Observable, s: torch.Tensor, support: Batch, cfg: DualConfig,
               gen: torch.Generator | None = None, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """One field-locked solve at s against the measured SGD field; returns (report, clipped s + u)."""
    t0 = time.perf_counter()
    d, F0, field = target_field(model, obs, s, support, cfg.target_step_size, cfg.param_filter)
    report, s_box = solve_field(obs, s, d, F0, cfg, gen, progress)
    report.update(field, support_tokens=int((support.labels[:, 1:] != -100).sum()),
                  elapsed_seconds=time.perf_counter() - t0)
    return report, s_box


def solve_field(obs: Observable, s: torch.Tensor, d: torch.Tensor, F0: torch.Tensor, cfg: DualConfig,
                gen: torch.Generator | None = None, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Solve (B M^-1 B^T + ridge I) a = d at s (F0 = F(s)), u = M^-1 B^T a, and check u."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    m_box = obs.basis.max_log_gate
    tan = Tangent(obs, s, cfg.jvp_mode, cfg.fd_eps)
    metric = obs.activation_metric(s) if cfg.metric == "activation" else torch.ones_like(s)
    minv = 1.0 / metric.clamp_min(1e-12 * metric.mean().item() + 1e-30)

    def K(a):
        return tan.jvp(minv * tan.vjp(a)) + cfg.ridge * a

    adjoint_error, symmetry_error = _probe_errors(tan, K, d.numel(), s.numel(), d, cfg.probes, gen)
    bar = tqdm(total=cfg.cg_iters, desc="CG", disable=not progress, leave=False)
    range_hist = [1.0]  # ||d - B u_k|| / ||d|| of every iterate: B u_k = K a_k - ridge a_k

    def on_iter(r, a, Ka):
        range_hist.append(_rel(d - (Ka - cfg.ridge * a), d))
        bar.update(1)
        bar.set_postfix(residual=f"{r:.2e}", range=f"{range_hist[-1]:.2e}")

    a, hist = conjugate_gradient(K, d, cfg.cg_iters, cfg.cg_tol, on_iter)
    bar.close()
    u = minv * tan.vjp(a)  # the M-minimum-norm update
    Bu = tan.jvp(u)
    s_box = (s + u).clamp(-m_box, m_box)
    u_box = s_box - s
    Bu_box = tan.jvp(u_box)
    with torch.no_grad():
        real, real_box = obs(s + u) - F0, obs(s_box) - F0
    report = {
        "adjoint_error": adjoint_error, "symmetry_error": symmetry_error,
        "cg_iterations": len(hist) - 1, "cg_residuals": hist, "cg_converged": hist[-1] <= cfg.cg_tol,
        "cg_range_residuals": range_hist,
        "cg_true_residual": _rel(d - Bu - cfg.ridge * a, d),
        "range_residual": _rel(d - Bu, d), "range_cosine": _cos(Bu, d),
        "realized_residual": _rel(d - real, d), "realized_cosine": _cos(real, d),
        "clip_fraction": ((s + u).abs() > m_box).double().mean().item(),
        "clip_norm_fraction": _rel(u - u_box, u),
        "range_residual_clipped": _rel(d - Bu_box, d),
        "field_residual": _rel(d - real_box, d), "field_cosine": _cos(real_box, d),
        "d_norm": d.norm().item(), "u_norm": u.norm().item(), "u_max_abs": u.abs().max().item(),
        "Bu_norm": Bu.norm().item(), "u_clipped_norm": u_box.norm().item(), "s_norm": s.norm().item(),
        "observable_dim": d.numel(), "gates": s.numel(), "gate_layers": obs.basis.layers,
        "calibration_tokens": obs.tokens, "projection": obs.projection, "metric": cfg.metric, "jvp_mode": cfg.jvp_mode,
        "target_step_size": cfg.target_step_size, "ridge": cfg.ridge, "max_log_gate": m_box,
        "elapsed_seconds": time.perf_counter() - t0,
    }
    return report, s_box.detach()


# ---------------------------------------------------------------- public API


def _batch(tokenizer, examples: Sequence[Example], cfg: DualConfig) -> Batch:
    return collate(encode_all(tokenizer, examples[: cfg.batch_size], cfg.max_length, cfg.add_eos), pad_id(tokenizer))


def diagnose_many(model, tokenizer, controllers: Sequence[Controller | None], support: Sequence[Example],
                  calibration: Sequence[Example] | None = None, cfg: DualConfig | None = None,
                  progress: bool = False, raise_errors: bool = False) -> list[dict]:
    """One diagnosis report per controller (None: a fresh basis selected on `support`).

    Batches and the top-k token sets are built once and shared. A controller that does not
    fit the model gets {"index", "error"} instead of a report, unless raise_errors.
    """
    cfg = (cfg or DualConfig()).validate()
    _check_model(model)
    sup_batch = _batch(tokenizer, support, cfg)
    base_obs = Observable(model, _batch(tokenizer, calibration or support, cfg), None, cfg.projection, cfg.top_k)
    reports = []
    for i, c in enumerate(controllers):
        try:
            if c is None:
                enc = encode_all(tokenizer, support, cfg.max_length, cfg.add_eos)
                basis, s = select_basis(model, enc, cfg, pad_id(tokenizer)), None
            else:
                basis, s = GateBasis.from_controller(c, model), c.log_gates()
            s = (torch.zeros(basis.size) if s is None else s).to(_device(model), _dtype(model))
            rep, _ = solve_step(model, base_obs.with_basis(basis), s, sup_batch, cfg, progress=progress)
        except NtkMirrorError as e:
            if raise_errors:
                raise
            reports.append({"index": i, "error": str(e)})
            continue
        ident = {"index": i, "fresh_basis": c is None}
        if c is not None:
            ident.update(model_name=c.meta.get("model_name"), data_hash=c.meta.get("data_hash"))
        reports.append({**ident, **rep})
    return reports


def dual_diagnose(model, tokenizer, support: Sequence[Example], calibration: Sequence[Example] | None = None,
                  controller: Controller | None = None, config: DualConfig | None = None,
                  progress: bool = False) -> dict:
    """Diagnose one gate basis (the controller's, or a fresh one) at its current s."""
    return diagnose_many(model, tokenizer, [controller], support, calibration, config, progress, raise_errors=True)[0]


def fit_dual(model, tokenizer, train: Sequence[Example], config: FitDualConfig | None = None,
             calibration: Sequence[Example] | None = None, progress: bool = True) -> tuple[Controller, dict]:
    """Field-locked pathwise fit: each step re-measures d at the current s on the next support
    batch, solves, and applies the box-clipped u. Returns (controller, report)."""
    from tqdm.auto import tqdm

    from .evaluate import teacher_forced
    from .fit import BatchSampler

    cfg = (config or FitDualConfig()).validate()
    if cfg.steps < 0:
        raise ConfigError(f"steps must be >= 0, got {cfg.steps}")
    t0 = time.perf_counter()
    _check_model(model)
    pad = pad_id(tokenizer)
    enc = encode_all(tokenizer, train, cfg.max_length, cfg.add_eos)
    basis = select_basis(model, enc, cfg, pad)
    obs = Observable(model, _batch(tokenizer, calibration or train, cfg), basis, cfg.projection, cfg.top_k)
    s = torch.zeros(basis.size, device=_device(model), dtype=_dtype(model))
    stats = list(train[: cfg.stats_examples])
    nll = lambda gates: teacher_forced(model, tokenizer, stats, gates, cfg.batch_size, cfg.max_length,  # noqa: E731
                                       cfg.add_eos)["nll"]
    nll_before = nll(None)
    sampler, gen = BatchSampler(len(enc), cfg.batch_size, cfg.seed + 1), torch.Generator().manual_seed(cfg.seed)
    steps = []
    bar = tqdm(range(cfg.steps), desc="fit-dual", disable=not progress, leave=False)
    for step in bar:
        support = collate([enc[i] for i in sampler.next()], pad)
        rep, s = solve_step(model, obs, s, support, cfg, gen)
        steps.append({"step": step + 1, **rep})
        bar.set_postfix(field=f"{rep['field_residual']:.3f}", nll=f"{rep['support_nll']:.3f}")
    bar.close()
    nll_after = nll(basis.gates(s))
    seconds = time.perf_counter() - t0
    fit_stats = {**asdict(cfg), "method": "fit-dual", "steps_run": len(steps), "train_nll_before": nll_before,
                 "train_nll_after": nll_after, "seconds": seconds, "n_examples": len(train)}
    controller = basis.controller(s, {**new_meta(model, tokenizer), "fit": fit_stats, "data_hash": data_hash(train)})
    report = {"gates": basis.size, "gate_layers": basis.layers, "train_nll_before": nll_before,
              "train_nll_after": nll_after, "seconds": seconds, "steps": steps}
    return controller, report
