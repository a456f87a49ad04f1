"""Applying gates: per-row dense log-gate tensors and exception-safe forward hooks.

Gates are data passed with the batch, not parameters stored in the model: a batch carries a
dense float32 tensor of log-gates over the gated layers, shape (B, L_g, H) (or (L_g, H)
shared by every row), so every row may carry its own controller or composition.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from .controller import Controller
from .errors import ConfigError, ControllerError
from .models import find_decoder_layers


@dataclass
class RowGates:
    layers: list[int]  # gated decoder-layer indices, ascending
    values: torch.Tensor  # (B, L_g, H) or (L_g, H) float32 log-gates
    scale: torch.Tensor | None = None  # exp(values) made once (one kernel, not one per layer), or None

    def to(self, device) -> "RowGates":
        return RowGates(self.layers, self.values.to(device), None if self.scale is None else self.scale.to(device))


def row_gates(rows: Sequence[Sequence[tuple[Controller, float]]], n_layers: int, hidden: int,
              max_log_gate: float | None = None, device=None) -> RowGates:
    """Compose each row's weighted controllers straight into a dense per-row gate tensor.

    Row r gets clip(sum_i w_i * s_i, +-m) with m = max_log_gate or the row's largest input
    bound (the same rule as `compose`). A row with no controllers is the identity.
    """
    B = len(rows)
    for c in {id(c): c for row in rows for c, _ in row}.values():  # each distinct controller once
        c.validate()  # NaN gates or out-of-range keys would otherwise poison the whole batch
        if (c.n_layers, c.hidden_size) != (n_layers, hidden):
            raise ControllerError(f"controller shape {c.n_layers}x{c.hidden_size} does not "
                                  f"match the model's {n_layers}x{hidden}")
    if not all(math.isfinite(float(w)) for row in rows for _, w in row):
        raise ControllerError("composition weights must be finite")
    layers = sorted({int(l) for row in rows for c, _ in row for l in c.layer.unique().tolist()})
    pos = torch.full((n_layers,), -1, dtype=torch.long)
    pos[layers] = torch.arange(len(layers))
    flat = torch.zeros(B, len(layers) * hidden)
    for r, row in enumerate(rows):
        for c, w in row:
            flat[r].index_add_(0, pos[c.layer] * hidden + c.channel, float(w) * c.log_gates())
        if row:
            m = max_log_gate if max_log_gate is not None else max(c.max_log_gate for c, _ in row)
            flat[r].clamp_(-m, m)
    return RowGates(layers, flat.view(B, len(layers), hidden).to(device or "cpu"))


def _gated(h: torch.Tensor, s: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """exp(s) * h in at least float32, cast back: in bf16, exp(s) for |s| < ~0.004 rounds to 1.
    `g` is exp(s) when the caller made it already."""
    if s.dim() == 2:  # (B, H) per row -> broadcast over tokens
        if s.shape[0] not in (1, h.shape[0]):
            raise ControllerError(f"gate tensor has {s.shape[0]} rows, the batch has {h.shape[0]}")
        s = s[:, None, :]
        g = None if g is None else g[:, None, :]
    g = torch.exp(s) if g is None else g
    if h.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        return _LowPrecisionGate.apply(h, g)  # same numbers, one pass over h instead of three
    return (h.to(torch.promote_types(h.dtype, torch.float32)) * g).to(h.dtype)


class _LowPrecisionGate(torch.autograd.Function):
    """`(h.float() * g).to(h.dtype)` for bf16/fp16 h in one pass: `torch.mul(..., out=)` with a
    low-precision output computes in float32 and rounds once, so the result is bit-identical,
    without materialising a float32 copy of h (nor saving one for backward)."""

    @staticmethod
    def forward(ctx, h, g):
        ctx.save_for_backward(h, g)
        return torch.mul(h, g, out=torch.empty_like(h))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, g = ctx.saved_tensors
        grad_h = torch.mul(grad, g, out=torch.empty_like(grad)) if ctx.needs_input_grad[0] else None
        grad_g = (grad.float() * h).sum_to_size(g.shape) if ctx.needs_input_grad[1] else None
        return grad_h, grad_g


class GateHooks:
    """Forward hooks on decoder-layer outputs that multiply in `self.gates`.

    `gates` may be swapped between forward passes (e.g. by a serving engine). With
    `record=True` the gated outputs of each hooked layer are kept in `self.outputs`.
    """

    def __init__(self, model, gates: RowGates, record: bool = False):
        self.path, self.decoder_layers = find_decoder_layers(model)
        n = len(self.decoder_layers)
        bad = [l for l in gates.layers if not 0 <= l < n]
        if bad:
            raise ControllerError(f"gate layer(s) {bad} out of range for a model with {n} layers")
        self.gates = gates
        self.record = record
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def _hook(self, j: int, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # transformers 5: bare tensor
            s = self.gates.values[..., j, :]
            g = None if self.gates.scale is None else self.gates.scale[..., j, :]
            h2 = _gated(h, s, g)
            if self.record:
                self.outputs[layer] = h2
            return (h2,) + tuple(output[1:]) if isinstance(output, tuple) else h2

        return hook

    def __enter__(self) -> "GateHooks":
        try:
            for j, layer in enumerate(self.gates.layers):
                self._handles.append(self.decoder_layers[layer].register_forward_hook(self._hook(j, layer)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def attach(model, gates: RowGates | Controller | None, record: bool = False):
    """Attach gates (a RowGates, a single Controller, or None for the base model)."""
    if gates is None:
        yield None
        return
    if isinstance(gates, Controller):
        gates = controller_gates(gates, device=_device(model))
    with GateHooks(model, gates, record=record) as hooks:
        yield hooks


def controller_gates(c: Controller, device=None) -> RowGates:
    """A single controller as a shared (L_g, H) gate tensor."""
    rg = row_gates([[(c, 1.0)]], c.n_layers, c.hidden_size, max_log_gate=c.max_log_gate, device=device)
    return RowGates(rg.layers, rg.values[0])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all`, `last`, `last:N`, `first:N`, or a comma list of indices (negative counts from the end)."""
    spec = str(spec).strip()
    try:
        if spec == "all":
            return list(range(n_layers))
        if spec == "last":
            return [n_layers - 1]
        if spec.startswith(("last:", "first:")):
            k = int(spec.split(":", 1)[1])
            if not 1 <= k <= n_layers:
                raise ValueError
            return list(range(n_layers - k, n_layers)) if spec.startswith("last:") else list(range(k))
        out = set()
        for part in spec.split(","):
            i = int(part)
            if not -n_layers <= i < n_layers:
                raise ValueError
            out.add(i % n_layers)
        return sorted(out)
    except ValueError:
        raise ConfigError(f"unknown --layers spec {spec!r} for a model with {n_layers} layers; use "
                          "all, last, last:N, first:N or a comma list of indices such as 0,5,-1") from None
