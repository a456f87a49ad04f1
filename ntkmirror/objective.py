"""Teacher-forced loss on completion tokens, one mean per group of rows.

Logits are computed only at supervised positions (the LM head is most of a small model's
FLOPs at long sequence lengths) and upcast to float32. When the (N, V) float32 logits would be
large (big vocabularies, many packed controllers) they are made chunk by chunk, with each
chunk's gradient taken at once, so they never exist all at once.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Batch

# Configs whose heads post-process logits; for these we run the full model instead.
_LOGIT_POSTPROCESS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TokenLoss:
    nll: torch.Tensor  # (N,) float32 per supervised token
    correct: torch.Tensor  # (N,) bool argmax == target
    row: torch.Tensor  # (N,) row index of each token


# Above this many logits per batch the loss is computed in chunks of this size (256 MiB float32).
LOGITS_CHUNK = 2**26


def _plain_head(model):
    """The output projection when logits are just head(hidden), else None."""
    head = model.get_output_embeddings()
    return head if head is not None and not any(getattr(model.config, k, None) for k in _LOGIT_POSTPROCESS) else None


def supervised_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) in at least float32, targets (N,), row (N,)) at every supervised position."""
    row, col, targets = _positions(batch)
    return _logits_at(model, batch, row, col), targets, row


def token_losses(model, batch: Batch) -> TokenLoss:
    """Per-token NLL at every supervised position (labels shifted by one)."""
    head = _plain_head(model)
    row, col, targets = _positions(batch)
    fusable = head is not None and getattr(head, "bias", None) is None and not head.weight.requires_grad
    if not fusable or len(targets) * head.weight.shape[0] <= LOGITS_CHUNK:
        logits = _logits_at(model, batch, row, col)
        return TokenLoss(F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets, row)
    hidden = _hidden(model, batch)[row, col]  # (N, H)
    step = max(1, LOGITS_CHUNK // head.weight.shape[0])
    parts = [_HeadNLL.apply(hidden[i: i + step], head.weight, targets[i: i + step])
             for i in range(0, len(targets), step)]
    return TokenLoss(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), row)


def _logits_at(model, batch: Batch, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    head = _plain_head(model)
    if head is not None:
        logits = head(_hidden(model, batch)[row, col])  # (N, V)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits[row, col]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, col, target) of every supervised prediction (col predicts the token at col + 1),
    found before the forward pass so that its one host sync does not wait on a queued forward."""
    targets_all = batch.labels[:, 1:]
    row, col = (targets_all != -100).nonzero(as_tuple=True)  # (N,), (N,) row-major order
    return row, col, targets_all[row, col]


def _hidden(model, batch: Batch) -> torch.Tensor:
    return model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            use_cache=False).last_hidden_state  # (B, T, H)


def _lse_nll_correct(logits, targets):
    """logsumexp, NLL and argmax == target of float32 logits (n, V)."""
    lse = logits.logsumexp(-1)
    return lse, lse - logits.gather(1, targets[:, None]).squeeze(1), logits.argmax(-1) == targets


def _head_stats(logits, targets, need_grad: bool):
    """(nll, correct, softmax - onehot or None) of one chunk of logits, in float32; eager: in place."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n, V)
    lse, nll, correct = _lse_nll_correct(logits, targets)
    if not need_grad:
        return nll, correct, None
    p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
    p[torch.arange(len(targets), device=p.device), targets] -= 1
    return nll, correct, p


def _head_stats_fusable(logits, targets, need_grad: bool):
    """The same numbers written for torch.compile: a fused pass or two over the chunk instead of
    ~8, and softmax - onehot written straight in the logits' own dtype."""
    dtype = logits.dtype
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    lse, nll, correct = _lse_nll_correct(logits, targets)
    if not need_grad:
        return nll, correct, None
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return nll, correct, ((logits - lse[:, None]).exp() - onehot.to(logits.dtype)).to(dtype)


_HEAD_STATS = contextvars.ContextVar("head_stats", default=_head_stats)
_COMPILED_HEAD_STATS: dict = {}  # compile options -> compiled _head_stats_fusable, made once per process


@contextmanager
def compiled_head_loss(**compile_kw):
    """Within the block, the chunked head loss runs its element-wise math compiled (the first
    call pays the compile)."""
    key = tuple(sorted(compile_kw.items()))
    if key not in _COMPILED_HEAD_STATS:
        _COMPILED_HEAD_STATS[key] = torch.compile(_head_stats_fusable, dynamic=True, **compile_kw)
    token = _HEAD_STATS.set(_COMPILED_HEAD_STATS[key])
    try:
        yield
    finally:
        _HEAD_STATS.reset(token)


class _HeadNLL(torch.autograd.Function):
    """Per-token NLL (and argmax == target) of a frozen head on a chunk of hidden states.

    nll_i depends on hidden_i alone, so d nll_i / d hidden_i = (softmax_i - onehot_i) @ W is
    made here, in forward, while the chunk's logits exist; backward only scales it by the
    upstream per-token gradient. The (n, V) logits are never kept, nor recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        nll, correct, p = _HEAD_STATS.get()(F.linear(hidden, weight), targets, ctx.needs_input_grad[0])
        if p is not None:
            ctx.save_for_backward(p.to(weight.dtype) @ weight)  # (n, H)
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, _):
        (d_hidden,) = ctx.saved_tensors
        return (grad_nll[:, None] * d_hidden).to(d_hidden.dtype), None, None


def group_means(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` within each group id in [0, n_groups); empty groups give 0."""
    sums = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(0, group, values)
    counts = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(
        0, group, torch.ones_like(values))
    return sums / counts.clamp_min(1)
