"""Secant check: how far has a finished controller left the tangent chart at s = 0?

Along the controller's ray t * s_c, the real displacement D(t) = F(t s_c) - F(0) is compared
with the tangent prediction t * B(0) s_c (secant error, cosine). Tangent drift compares
B(s_c) s_c with B(0) s_c, and the midpoint error compares D(1) with B(s_c / 2) s_c, the
second-order (pathwise) linearisation. A large secant error with a small midpoint error
says the chart bends, not that the field is unreachable by gates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .controller import Controller
from .data import Example, collate, encode_all, pad_id
from .dual import JVP_MODES, GateBasis, Observable, Tangent, _check_model, _cos, _device, _dtype, _rel
from .errors import ConfigError


@dataclass
class SecantConfig:
    projection: str = "target"  # target | topk | full
    top_k: int = 32
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    jvp_mode: str = "exact"
    fd_eps: float = 1e-3
    batch_size: int = 8
    max_length: int = 1024
    add_eos: bool = True

    def validate(self) -> "SecantConfig":
        if self.jvp_mode not in JVP_MODES:
            raise ConfigError(f"jvp_mode must be one of {', '.join(JVP_MODES)}, got {self.jvp_mode!r}")
        if not self.fractions or not all(0 < f for f in self.fractions):
            raise ConfigError(f"fractions must be positive numbers, got {self.fractions}")
        for name in ("top_k", "fd_eps", "batch_size", "max_length"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        return self


def secant_check(model, tokenizer, controller: Controller, examples: Sequence[Example],
           config: SecantConfig | None = None) -> dict:
    """Secant errors and cosines along the controller ray, tangent drift and midpoint error."""
    cfg = (config or SecantConfig()).validate()
    t0 = time.perf_counter()
    _check_model(model)
    basis = GateBasis.from_controller(controller, model)
    batch = collate(encode_all(tokenizer, examples[: cfg.batch_size], cfg.max_length, cfg.add_eos),
                    pad_id(tokenizer))
    obs = Observable(model, batch, basis, cfg.projection, cfg.top_k)
    s_c = controller.log_gates().to(_device(model), _dtype(model))
    zero = torch.zeros_like(s_c)
    tangent = lambda at: Tangent(obs, at, cfg.jvp_mode, cfg.fd_eps).jvp(s_c)  # noqa: E731  B(at) s_c
    with torch.no_grad():
        F0 = obs(zero)
        T0, T1, Tmid = tangent(zero), tangent(s_c), tangent(0.5 * s_c)
        rows = []
        for t in cfg.fractions:
            D = obs(t * s_c) - F0
            rows.append({"fraction": t, "displacement_norm": D.norm().item(), "tangent_norm": t * T0.norm().item(),
                         "secant_error": _rel(D - t * T0, D), "cosine": _cos(D, T0)})
        D1 = obs(s_c) - F0
    s_max = s_c.abs().max().item() if basis.size else 0.0
    return {"gates": basis.size, "s_norm": s_c.norm().item(), "s_max_abs": s_max,
            "projection": cfg.projection, "observable_dim": F0.numel(), "calibration_tokens": obs.tokens,
            "jvp_mode": cfg.jvp_mode, "fractions": rows,
            "tangent_drift": _rel(T1 - T0, T0), "tangent_drift_cosine": _cos(T1, T0),
            "midpoint_error": _rel(D1 - Tmid, D1), "elapsed_seconds": time.perf_counter() - t0}
