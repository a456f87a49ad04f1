"""PEFT baselines (LoRA, IA3) fitted on exactly what a controller sees: the same examples, the
same seeded batch order (ntkmirror's BatchSampler), the same number of AdamW steps and the same
loss (ntkmirror.objective.token_losses: mean NLL over completion tokens)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ntkmirror.data import Example, collate, encode_all, pad_id
from ntkmirror.fit import BatchSampler
from ntkmirror.objective import token_losses

# lr per method: LoRA 1e-3 as in DESIGN.md section 6; IA3's scaling vectors need a larger step.
DEFAULT_LR = {"lora": 1e-3, "ia3": 1e-2}


def peft_config(method: str):
    from peft import IA3Config, LoraConfig

    if method == "lora":  # r=8 on every linear layer except the LM head
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none")
    if method == "ia3":  # the IA3 paper's sites: keys, values and the MLP's down projection
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    raise ValueError(f"unknown PEFT method {method!r}; use lora or ia3")


def fit_peft(model, tokenizer, examples: Sequence[Example], method: str, steps: int, batch_size: int = 8,
             lr: float | None = None, seed: int = 0, max_length: int = 1024, add_eos: bool = True,
             progress: bool = True):
    """Fit a PEFT adapter on a copy of `model`; returns (adapted model, stats)."""
    from peft import get_peft_model
    from tqdm.auto import tqdm

    lr = lr or DEFAULT_LR[method]
    device = next(model.parameters()).device
    work = copy.deepcopy(model).requires_grad_(False)  # the caller's model stays untouched
    _sync(device)
    mem0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    peft_model = get_peft_model(work, peft_config(method))  # injects the adapter into `work` in place
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    enc = encode_all(tokenizer, examples, max_length, add_eos)
    sampler = BatchSampler(len(enc), batch_size, seed + 1)  # the controller fit's training order
    pad = pad_id(tokenizer)
    for step in tqdm(range(steps), desc=method, disable=not progress, leave=False):
        batch = collate([enc[i] for i in sampler.next()], pad).to(device)
        loss = token_losses(work, batch).nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    work.eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        stored = sum(f.stat().st_size for f in Path(d).glob("adapter_model.*"))
    stats = {"seconds": seconds, "steps": steps, "lr": lr, "trainable_params": sum(p.numel() for p in params),
             "stored_bytes": stored, "peak_mem_mb": peak / 2**20 or None,
             "adapt_mem_mb": (peak - mem0) / 2**20 if peak else None}
    return work, stats


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
