"""Gate selection: first-order saliency of every (layer, channel) at s = 0.

rule "abs" (the seed's):      score = sum over batches and positions of |dL/dh * h|
rule "coherent":              score = |sum over batches and positions of dL/dh * h| = |dL/ds|
rule "random":                uniform random scores (a control arm: same budget, no saliency)
Scores are computed for C controllers at once: each row carries its controller id, and
each controller's loss is its own mean, so the scores stay independent.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .data import Batch
from .gates import RowGates, attach
from .objective import group_means, token_losses

RULES = ("abs", "coherent", "random")


def saliency_scores(model, batches: Iterable[tuple[Batch, torch.Tensor]], n_ctrl: int,
                    layers: list[int], hidden: int, rule: str = "abs") -> torch.Tensor:
    """(n_ctrl, len(layers), hidden) float32 scores; batches yield (batch, row_ctrl)."""
    if rule not in ("abs", "coherent"):  # "random" needs no model: see random_scores
        raise ValueError(f"unknown saliency rule {rule!r}; use abs or coherent")
    device = next(model.parameters()).device
    total = torch.zeros(n_ctrl, len(layers), hidden, device=device)
    for batch, row_ctrl in batches:
        batch, row_ctrl = batch.to(device), row_ctrl.to(device)
        s = torch.zeros(batch.input_ids.shape[0], len(layers), hidden, device=device, requires_grad=True)
        with attach(model, RowGates(layers, s), record=(rule == "abs")) as hooks:
            tl = token_losses(model, batch)
            outs = [hooks.outputs[l] for l in layers] if rule == "abs" else []
            for h in outs:
                h.retain_grad()
            group_means(tl.nll, row_ctrl[tl.row], n_ctrl).sum().backward()
            if rule == "abs":
                per_row = torch.stack([(h.grad.float() * h.float()).abs().sum(1) for h in outs], 1)
            else:
                per_row = s.grad  # dL/ds at s = 0 is sum_t dL/dh * h, per row
        total.index_add_(0, row_ctrl, per_row.detach())
    return total.abs() if rule == "coherent" else total


def contrast_scores(task: torch.Tensor, generic: torch.Tensor, weight: float) -> torch.Tensor:
    """Task saliency minus `weight` x the saliency on generic (retain) text, each scaled to mean 1.

    Channels every text leans on (the large-activation ones) score high for every task, so plain
    top-k gives different memories mostly the same gates; subtracting the generic score sends each
    controller to channels that matter for its task more than for text it should leave alone."""
    task = task / task.mean((-2, -1), keepdim=True).clamp_min(1e-30)
    return task - weight * generic / generic.mean().clamp_min(1e-30)


def random_scores(n_ctrl: int, n_layers: int, hidden: int, seed: int) -> torch.Tensor:
    """(n_ctrl, n_layers, hidden) seeded uniform scores: top-k of these is a random gate set."""
    return torch.rand(n_ctrl, n_layers, hidden, generator=torch.Generator().manual_seed(seed))


def top_gates(scores: torch.Tensor, layers: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over (layer, channel) of one controller's (L_g, H) scores, no per-layer quota."""
    k = min(k, scores.numel())
    idx = torch.topk(scores.reshape(-1).cpu(), k).indices.sort().values
    hidden = scores.shape[1]
    return torch.tensor(layers)[idx // hidden], idx % hidden
