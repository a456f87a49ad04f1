"""Composition (weighted sum of signed log-gates, clipped) and controller inspection."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import torch

from .controller import Controller
from .errors import ConfigError, ModelMismatchError

WARN_CLIP, WARN_OPPOSING, WARN_COSINE = 0.02, 0.5, -0.1


def _check_same_model(controllers: Sequence[Controller]) -> None:
    ids = {(c.meta.get("model_fingerprint"), c.n_layers, c.hidden_size) for c in controllers}
    if len(ids) > 1:
        raise ModelMismatchError(
            "cannot compose controllers of different models: "
            + "; ".join(f"{c.meta.get('model_name')!r} {c.n_layers}x{c.hidden_size} "
                        f"fingerprint {c.meta.get('model_fingerprint')}" for c in controllers))


def compose(controllers: Sequence[Controller], weights: Sequence[float] | None = None,
            max_log_gate: float | None = None, budget: int | None = None) -> tuple[Controller, dict]:
    """s[key] = clip(sum_i w_i s_i[key], +-m) over the union of keys; optional budget keeps the
    largest |s|. m defaults to the inputs' largest max_log_gate. Returns (controller, report)."""
    if not controllers:
        raise ConfigError("compose needs at least one controller")
    weights = [1.0] * len(controllers) if weights is None else [float(w) for w in weights]
    if len(weights) != len(controllers):
        raise ConfigError(f"{len(weights)} weights for {len(controllers)} controllers")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError("weights must be finite numbers")
    _check_same_model(controllers)
    m = float(max_log_gate) if max_log_gate is not None else max(c.max_log_gate for c in controllers)
    if not (math.isfinite(m) and m > 0):
        raise ConfigError(f"max_log_gate must be positive, got {m}")
    H = controllers[0].hidden_size
    keys = torch.cat([c.keys() for c in controllers])
    union, inverse = torch.unique(keys, return_inverse=True)
    s = torch.zeros(union.numel())
    s.index_add_(0, inverse, torch.cat([w * c.log_gates() for c, w in zip(controllers, weights)]))
    clipped = s.abs() > m
    s = s.clamp(-m, m)
    dropped = 0
    if budget is not None and budget < union.numel():
        keep = torch.topk(s.abs(), budget).indices.sort().values
        dropped = union.numel() - budget
        union, s = union[keep], s[keep]
    nonzero = s != 0
    union, s = union[nonzero], s[nonzero]
    ref = controllers[0]
    out = Controller.from_log_gates(union // H, union % H, s, m, n_layers=ref.n_layers, hidden_size=H,
                                    meta={k: v for k, v in ref.meta.items() if k.startswith("model_") or
                                          k in ("layer_path", "hook_site")})
    out.meta["composed_from"] = [{"weight": w, "gates": c.num_gates, "data_hash": c.meta.get("data_hash")}
                                 for c, w in zip(controllers, weights)]
    report = {"inputs": len(controllers), "weights": weights, "max_log_gate": m,
              "input_gates": [c.num_gates for c in controllers], "union_gates": int(keys.unique().numel()),
              "output_gates": out.num_gates, "clipped": int(clipped.sum()),
              "clip_fraction": float(clipped.float().mean()) if clipped.numel() else 0.0,
              "budget": budget, "budget_dropped": dropped, "pairs": pair_stats(controllers)}
    report["warnings"] = pair_warnings(report["pairs"])
    if report["clip_fraction"] > WARN_CLIP:
        report["warnings"].append(f"{report['clip_fraction']:.1%} of composed gates were clipped to +-{m}")
    return out, report


def controller_stats(c: Controller) -> dict:
    s = c.log_gates()
    hist = torch.bincount(c.layer, minlength=c.n_layers).tolist()
    return {"gates": c.num_gates, "l2": float(s.norm()), "max_abs": float(s.abs().max()) if c.num_gates else 0.0,
            "max_log_gate": c.max_log_gate,
            "saturation": float((s.abs() >= 0.95 * c.max_log_gate).float().mean()) if c.num_gates else 0.0,
            "layer_histogram": hist, "model_name": c.meta.get("model_name"),
            "model_fingerprint": c.meta.get("model_fingerprint")}


def _pair(a: Controller, b: Controller) -> dict:
    ka, kb = a.keys(), b.keys()
    union = torch.unique(torch.cat([ka, kb]))
    dense = torch.zeros(2, union.numel())
    dense[0, torch.searchsorted(union, ka)] = a.log_gates()
    dense[1, torch.searchsorted(union, kb)] = b.log_gates()
    both = (dense[0] != 0) & (dense[1] != 0)
    overlap = int(torch.isin(ka, kb).sum())
    opposing = int((both & (dense[0] * dense[1] < 0)).sum())
    cos = torch.nn.functional.cosine_similarity(dense[0], dense[1], dim=0, eps=1e-12)
    return {"overlap": overlap, "jaccard": overlap / max(union.numel(), 1), "cosine": float(cos),
            "opposing_sign_overlap": opposing / max(overlap, 1)}


def pair_stats(controllers: Sequence[Controller]) -> list[dict]:
    return [{"a": i, "b": j, **_pair(controllers[i], controllers[j])}
            for i, j in combinations(range(len(controllers)), 2)]


def inspect_controllers(controllers: Sequence[Controller]) -> dict:
    """Per-controller stats, per-pair overlap/Jaccard/cosine/opposing sign, and warnings."""
    per = [controller_stats(c) for c in controllers]
    pairs = pair_stats(controllers)
    warnings = [f"controller {i}: {st['saturation']:.1%} of gates at the clip bound"
                for i, st in enumerate(per) if st["saturation"] > WARN_CLIP] + pair_warnings(pairs)
    if len({st["model_fingerprint"] for st in per}) > 1:
        warnings.append("controllers come from different models and cannot be composed")
    return {"controllers": per, "pairs": pairs, "warnings": warnings}


def pair_warnings(pairs: list[dict]) -> list[str]:
    warnings = []
    for p in pairs:
        if p["opposing_sign_overlap"] > WARN_OPPOSING:
            warnings.append(f"controllers {p['a']},{p['b']}: {p['opposing_sign_overlap']:.0%} of shared gates "
                            "pull in opposite directions")
        if p["cosine"] < WARN_COSINE:
            warnings.append(f"controllers {p['a']},{p['b']}: cosine {p['cosine']:.2f} < {WARN_COSINE}")
    return warnings

