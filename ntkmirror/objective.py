"""Teacher-forced loss on completion tokens, one mean per group of rows.

Logits are computed only at supervised positions (the LM head is most of a small model's
FLOPs at long sequence lengths) and upcast to float32.
"""

from __future__ import annotations

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


def supervised_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, V) in at least float32, targets (N,), row (N,)) at every supervised position."""
    targets_all = batch.labels[:, 1:]
    mask = targets_all != -100  # (B, T-1)
    row = torch.arange(batch.labels.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    head = model.get_output_embeddings()
    plain = head is not None and not any(getattr(model.config, k, None) for k in _LOGIT_POSTPROCESS)
    if plain:
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state  # (B, T, H)
        logits = head(hidden[:, :-1][mask])  # (N, V)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits[:, :-1][mask]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets_all[mask], row


def token_losses(model, batch: Batch) -> TokenLoss:
    """Per-token NLL at every supervised position (labels shifted by one)."""
    logits, targets, row = supervised_logits(model, batch)
    nll = F.cross_entropy(logits, targets, reduction="none")
    return TokenLoss(nll, logits.argmax(-1) == targets, row)


def group_means(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `values` within each group id in [0, n_groups); empty groups give 0."""
    sums = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(0, group, values)
    counts = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(
        0, group, torch.ones_like(values))
    return sums / counts.clamp_min(1)
