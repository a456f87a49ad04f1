"""Fitting controllers: C independent controllers in one forward/backward per step.

Each controller has its own examples, its own gate set, its own seeded batch order and its
own loss mean; AdamW is element-wise, so one optimiser over a (C, K) tensor is C separate
fits done together. C = 1 is the ordinary single fit.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .controller import MAX_LOG_GATE_LIMIT, Controller, new_meta
from .data import (Batch, Example, collate, data_hash, default_contrast_examples, default_retain_examples, encode_all,
                   pad_id)
from .errors import ConfigError, DataError
from .evaluate import opener_kinds, sampled_retain_examples
from .gates import RowGates, attach, parse_layers
from .models import compiled_layers, find_decoder_layers, hidden_size
from .objective import compiled_head_loss, group_means, supervised_logits, token_losses
from .selection import contrast_scores, random_scores, saliency_scores, top_gates


LR_SCHEDULES = ("constant", "cosine")
NLL_HINGES = ("text", "row")  # where retain_nll's hinge is taken (retain_divergence)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiple of lr used at `step` (0-based) of `steps`."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
    return 1.0


@dataclass
class FitConfig:
    gates: int = 10000  # with the model's own texts in the KL text (run 8): room to fit the task as well
    steps: int = 240
    lr: float = 2e-2  # lr, max_log_gate, retain_kl, selection_contrast, ...: measured together in docs/results.md
    lr_schedule: str = "constant"  # "constant", or "cosine": lr decays to 0 over `steps` (fewer noisy last steps)
    max_log_gate: float = 0.2
    layers: str = "all"
    score_batches: int = 16
    batch_size: int = 8
    max_length: int = 1024
    seed: int = 0
    score: str = "abs"  # selection rule: "abs" (seed), "coherent", or "random" (a control arm)
    selection_contrast: float = 1.0  # minus this x the contrast text's saliency at selection (selection.contrast_scores)
    add_eos: bool = True  # append EOS to completions so the model learns to stop
    l2: float = 1e-5  # weight of mean(s^2)
    weight_decay: float = 0.0  # AdamW's decoupled decay of the raw gates: pulls gates the loss does not hold to 0
    eval_every: int = 0  # validation interval in steps (0: steps // 10)
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    stats_examples: int = 32  # training examples used for the before/after NLL
    retain_kl: float = 10.0  # weight of KL(base || gated) on the KL text (kl_text)
    retain_rows: int = 16  # rows of the KL text per step, seen by every controller
    retain_samples: int = 96  # short texts the model writes itself (seeded), added to the KL text
    retain_sample_tokens: int = 16  # tokens in each of those texts
    retain_openers: str = "generic"  # where those texts start (evaluate.retain_openers): generic, none, vocab, languages
    retain_tokens: str = "completion"  # where the KL is taken: "completion" tokens or "all" tokens of a row
    retain_kl_power: float = 1.0  # the KL term is the power mean (mean KL^p)^(1/p) over tokens: p > 1 leans on the worst
    retain_nll: float = 3.0  # weight of the rise of the KL text's own NLL (hinged at 0), a first-order term (run 13)
    retain_nll_hinge: str = "text"  # hinge the rise of the step's KL text as a whole ("text") or of each row ("row")
    pair_kl: float = 0.0  # weight of the same KL under each controller composed with another of its pack
    compile: bool = False  # compile the fit step (compiled_fit): for long GPU fits of larger models / packs

    @property
    def uses_retain_text(self) -> bool:
        """A term on the KL text is on for every fit (pair_kl also needs a pack of two or more)."""
        return self.retain_kl > 0 or self.retain_nll > 0

    def check(self) -> "FitConfig":
        """Refuse settings that would fail late, silently do nothing, or never end."""
        for name, lo in (("gates", 1), ("steps", 0), ("batch_size", 1), ("score_batches", 1), ("max_length", 1),
                         ("retain_rows", 1), ("retain_samples", 0), ("retain_sample_tokens", 1)):
            if not getattr(self, name) >= lo:
                raise ConfigError(f"{name} must be at least {lo}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (0 < self.max_log_gate <= MAX_LOG_GATE_LIMIT):
            raise ConfigError(f"max_log_gate must be in (0, {MAX_LOG_GATE_LIMIT:g}], got {self.max_log_gate!r}")
        for name in ("retain_kl", "retain_nll", "selection_contrast", "pair_kl", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        if not (math.isfinite(self.retain_kl_power) and self.retain_kl_power >= 1):
            raise ConfigError(f"retain_kl_power must be a number >= 1, got {self.retain_kl_power!r}")
        opener_kinds(self.retain_openers)
        if self.retain_nll_hinge not in NLL_HINGES:
            raise ConfigError(f"retain_nll_hinge must be one of {', '.join(NLL_HINGES)}, got {self.retain_nll_hinge!r}")
        if self.retain_tokens not in ("completion", "all"):
            raise ConfigError(f"retain_tokens must be completion or all, got {self.retain_tokens!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.score not in ("abs", "coherent", "random"):
            raise ConfigError(f"score must be abs, coherent or random, got {self.score!r}")
        return self


class BatchSampler:
    """Seeded epoch shuffling: every example once per epoch, wrapping for tiny sets."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list[int]:
        while len(self.queue) < self.batch_size:
            self.queue += torch.randperm(self.n, generator=self.gen).tolist()
        out, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size:]
        return out


class PackedGates:
    """Trainable raw values for C controllers, scattered into per-row dense gates."""

    def __init__(self, layer_sets: Sequence[torch.Tensor], channel_sets: Sequence[torch.Tensor],
                 hidden: int, max_log_gate: float, device):
        self.layers = sorted({int(l) for ls in layer_sets for l in ls.tolist()})
        pos = {l: j for j, l in enumerate(self.layers)}
        self.hidden, self.m = hidden, max_log_gate
        self.sizes = [len(ls) for ls in layer_sets]
        scratch = len(self.layers) * hidden  # padding slots write here and are dropped
        idx = torch.full((len(layer_sets), max(self.sizes)), scratch, dtype=torch.long)
        for c, (ls, cs) in enumerate(zip(layer_sets, channel_sets)):
            idx[c, : len(ls)] = torch.tensor([pos[int(l)] for l in ls]) * hidden + cs
        self.idx = idx.to(device)
        self.layer_sets, self.channel_sets = layer_sets, channel_sets
        self.raw = torch.zeros(idx.shape, device=device, requires_grad=True)  # (C, K) float32

    def log_gates(self) -> torch.Tensor:
        return self.m * torch.tanh(self.raw)  # (C, K)

    def rows(self, row_ctrl: torch.Tensor, partner: torch.Tensor | None = None) -> RowGates:
        """Row r gated by controller row_ctrl[r], or by it and partner[r] composed as `compose`
        does (clipped sum)."""
        C = self.raw.shape[0]
        dense = torch.zeros(C, len(self.layers) * self.hidden + 1, device=self.raw.device)
        dense = dense.scatter(1, self.idx, self.log_gates())[:, :-1]
        values = dense[row_ctrl] if partner is None else (dense[row_ctrl] + dense[partner]).clamp(-self.m, self.m)
        values = values.view(-1, len(self.layers), self.hidden)  # (B, L_g, H)
        return RowGates(self.layers, values, torch.exp(values))  # one exp for all layers

    def controller(self, c: int, raw: torch.Tensor | None = None, **kw) -> Controller:
        raw = self.raw if raw is None else raw
        return Controller(self.layer_sets[c], self.channel_sets[c], raw[c, : self.sizes[c]].detach().cpu(),
                          self.m, **kw)


def _pack(encoded_sets, picks: Sequence[Sequence[int]], pad: int) -> tuple[Batch, torch.Tensor]:
    """One batch holding picks[c] rows of controller c; returns (batch, row -> controller)."""
    rows, owner = [], []
    for c, idxs in enumerate(picks):
        rows += [encoded_sets[c][i] for i in idxs]
        owner += [c] * len(idxs)
    return collate(rows, pad), torch.tensor(owner)


@torch.no_grad()
def packed_nll(model, encoded_sets, gates: PackedGates | None, pad: int, rows_per_step: int = 32) -> list[float]:
    """Token-weighted mean NLL of each controller on its own examples (no gates: base model)."""
    device = next(model.parameters()).device
    C = len(encoded_sets)
    sums, counts = torch.zeros(C, device=device, dtype=torch.float64), torch.zeros(C, device=device, dtype=torch.float64)
    jobs = [(c, i) for c, enc in enumerate(encoded_sets) for i in range(len(enc))]
    for start in range(0, len(jobs), rows_per_step):
        chunk = jobs[start: start + rows_per_step]
        batch = collate([encoded_sets[c][i] for c, i in chunk], pad).to(device)
        row_ctrl = torch.tensor([c for c, _ in chunk], device=device)
        with attach(model, gates.rows(row_ctrl) if gates is not None else None):
            tl = token_losses(model, batch)
        owner = row_ctrl[tl.row]
        sums.index_add_(0, owner, tl.nll.double())  # float64: exact for float64 models too
        counts.index_add_(0, owner, torch.ones_like(sums[owner]))
    return (sums / counts.clamp_min(1)).tolist()


def retain_divergence(model, gates: PackedGates, retain: Batch, partners: torch.Tensor | None = None,
                      kl_power: float = 1.0, hinge_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each controller moves text it should leave alone, per retain token: (C,) mean
    KL(base || gated), and (C,) mean rise of the retain text's own NLL (gated - base). Every
    controller sees every retain row. With partners (C,), controller c is composed with controller
    partners[c]: how far the pair moves it. kl_power p > 1 takes the power mean (mean KL^p)^(1/p)
    instead: the same number when every token moves alike, more weight on the tokens moved most.
    hinge_rows: the second number is the mean over rows of each row's own mean rise hinged at 0, so a
    row whose NLL falls cannot pay for one whose NLL rises."""
    C, R = gates.raw.shape[0], retain.input_ids.shape[0]
    with torch.no_grad():
        base = F.log_softmax(supervised_logits(model, retain)[0], -1)  # (N, V)
    rows = Batch(*(t.repeat(C, 1) for t in (retain.input_ids, retain.attention_mask, retain.labels)))
    row_ctrl = torch.arange(C, device=retain.input_ids.device).repeat_interleave(R)  # (C * R,)
    with attach(model, gates.rows(row_ctrl, None if partners is None else partners[row_ctrl])):
        logits, targets, row = supervised_logits(model, rows)  # (C * N, V), controller-major like `rows`
    base, gated = base.repeat(C, 1), F.log_softmax(logits, -1)
    kl = (base.exp() * (base - gated)).sum(-1)  # (C * N,)
    rise = (base - gated).gather(1, targets[:, None])[:, 0]  # NLL gated - NLL base of the text's own tokens
    owner = row_ctrl[row]
    if kl_power == 1:
        kl_c = group_means(kl, owner, C)
    else:  # clamped away from 0: at the base model every KL is 0, where x^(1/p) has no finite slope
        kl_c = group_means(kl.clamp_min(0).pow(kl_power), owner, C).clamp_min(1e-30).pow(1 / kl_power)
    if hinge_rows:
        return kl_c, group_means(rise, row, C * R).clamp_min(0).view(C, R).mean(1)
    return kl_c, group_means(rise, owner, C)


def train_step(model, gates: PackedGates, opt, batch: Batch, row_ctrl: torch.Tensor, l2: float,
               retain: Batch | None = None, retain_kl: float = 0.0, partners: torch.Tensor | None = None,
               pair_kl: float = 0.0, retain_nll: float = 0.0, kl_power: float = 1.0,
               nll_hinge_rows: bool = False) -> torch.Tensor:
    """One optimiser step for all C packed controllers; returns each one's loss, (C,).

    Autograd starts at the lowest gated layer: the weights are frozen, so nothing below it
    needs a gradient and no graph is kept there."""
    C = gates.raw.shape[0]
    with attach(model, gates.rows(row_ctrl)):  # (B, L_g, H) gates, row r -> controller row_ctrl[r]
        tl = token_losses(model, batch)
    loss_c = group_means(tl.nll, row_ctrl[tl.row], C)  # (C,) each controller's own mean
    loss = loss_c.sum() + l2 * gates.log_gates().pow(2).mean(1).sum()
    if retain is not None and (retain_kl > 0 or retain_nll > 0):
        kl, rise = retain_divergence(model, gates, retain, kl_power=kl_power, hinge_rows=nll_hinge_rows)
        loss = loss + retain_kl * kl.sum()
        if retain_nll > 0:  # the KL is second order at the base model; real text's NLL moves at first order
            loss = loss + retain_nll * rise.clamp_min(0).sum()
    if retain is not None and partners is not None and pair_kl > 0:  # what a composed pair does to it
        loss = loss + pair_kl * retain_divergence(model, gates, retain, partners, kl_power)[0].sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss_c.detach()


@contextmanager
def compiled_fit(model, **compile_kw):
    """The fit step compiled where eager PyTorch spends its time on small kernels: the decoder
    layers (one shared compile, gate hooks outside) and the chunked head loss."""
    with compiled_layers(model, **compile_kw), compiled_head_loss(**compile_kw):
        yield model


def kl_text(model, tokenizer, config: FitConfig, retain: Sequence[Example] | None = None) -> list[Example]:
    """The text the KL term keeps each controller close to the base model on: `retain` (default: the
    bundled generic rows, data.default_retain_examples) plus config.retain_samples short texts the
    model writes itself from the starts config.retain_openers names (the generic openers by default;
    seeded by config.seed). Those reach genres no bundled row holds: names, other languages
    (docs/results.md, runs 8 and 9)."""
    rows = list(default_retain_examples() if retain is None else retain)
    if config.retain_samples:
        rows += sampled_retain_examples(model, tokenizer, config.retain_samples, config.retain_sample_tokens,
                                        seed=config.seed, openers=config.retain_openers)
    return rows


def fit_controllers(model, tokenizer, datasets: Sequence[Sequence[Example]], config: FitConfig | None = None,
                    validation: Sequence[Sequence[Example]] | None = None, progress: bool = True,
                    extra_meta: Sequence[dict] | None = None,
                    retain: Sequence[Example] | None = None,
                    contrast: Sequence[Example] | None = None) -> list[Controller]:
    """Fit one controller per dataset, all in the same forward/backward passes.

    With cfg.retain_kl > 0, each step also penalises each controller's KL divergence from the base
    model on cfg.retain_rows rows of kl_text: the `retain` examples (default: bundled generic text)
    and cfg.retain_samples texts the model writes, which keeps strong controllers composable and off
    unrelated prompts; cfg.retain_nll > 0 adds the hinged rise of that text's own NLL, a first-order term
    the KL (second order at the base model) lacks (docs/results.md, run 13: 3 by default). With cfg.selection_contrast > 0 the gates are chosen away from the channels that
    `contrast` leans on (default: data.default_contrast_examples, whatever the retain text: a larger
    or different contrast text measured worse, docs/results.md runs 4i and 6a),
    which keeps different memories on different channels. With cfg.pair_kl > 0 and two or more
    datasets, the KL is also taken under each controller composed with a partner from the pack,
    drawn each step (docs/results.md, run 5: not a default)."""
    from tqdm.auto import tqdm

    cfg = (config or FitConfig()).check()
    for i, ds in enumerate(datasets):
        if not ds:  # an empty dataset would make its batch sampler spin forever
            raise DataError(f"dataset {i} has no training examples")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    model.requires_grad_(False)
    n_layers, hidden = len(find_decoder_layers(model)[1]), hidden_size(model)
    layers = parse_layers(cfg.layers, n_layers)
    pad = pad_id(tokenizer)
    enc = [encode_all(tokenizer, ds, cfg.max_length, cfg.add_eos) for ds in datasets]
    C = len(enc)

    wants_contrast = cfg.selection_contrast > 0 and cfg.score != "random"
    wants_pairs = cfg.pair_kl > 0 and C > 1  # a single controller has no partner
    if not wants_contrast:
        contrast = None
    elif contrast is None:
        contrast = default_contrast_examples()
    wants_kl = cfg.uses_retain_text or wants_pairs
    retain = kl_text(model, tokenizer, cfg, retain) if wants_kl else None
    use_retain = bool(retain)

    def encode_generic(rows):
        if cfg.retain_tokens == "all":  # the prompt is text to leave alone too
            rows = [Example("", ex.prompt + ex.completion, ex.source) for ex in rows]
        return encode_all(tokenizer, rows, cfg.max_length, cfg.add_eos)

    retain_enc = encode_generic(retain) if use_retain else None

    # 1. select each controller's gates by saliency on its own data
    if cfg.score == "random":  # control arm: the same budget, gates drawn uniformly
        scores = random_scores(C, len(layers), hidden, cfg.seed)
    else:
        score_samplers = [BatchSampler(len(e), cfg.batch_size, cfg.seed) for e in enc]
        score_iter = (_pack(enc, [s.next() for s in score_samplers], pad) for _ in range(cfg.score_batches))
        scores = saliency_scores(model, score_iter, C, layers, hidden, cfg.score)  # (C, L_g, H)
        if contrast:  # prefer channels that generic text does not lean on
            contrast_enc = encode_generic(contrast)
            bs, n = cfg.batch_size, len(contrast_enc)
            chunks = [range(i, min(i + bs, n)) for i in range(0, n, bs)][: cfg.score_batches]
            generic = saliency_scores(model, (_pack([contrast_enc], [ch], pad) for ch in chunks),
                                      1, layers, hidden, cfg.score)[0]
            scores = contrast_scores(scores, generic, cfg.selection_contrast)
    picked = [top_gates(scores[c], layers, cfg.gates) for c in range(C)]
    gates = PackedGates([p[0] for p in picked], [p[1] for p in picked], hidden, cfg.max_log_gate, device)

    # 2. fit all raw values together
    stats_sets = [e[: cfg.stats_examples] for e in enc]
    nll_before = packed_nll(model, stats_sets, None, pad)
    val_enc = [encode_all(tokenizer, v, cfg.max_length, cfg.add_eos) for v in validation] if validation else None
    best_val, best_raw, stale = [float("inf")] * C, gates.raw.detach().clone(), 0
    eval_every = cfg.eval_every or max(1, cfg.steps // 10)
    opt = torch.optim.AdamW([gates.raw], lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg.lr_schedule, step, cfg.steps))
    samplers = [BatchSampler(len(e), cfg.batch_size, cfg.seed + 1) for e in enc]
    if use_retain:
        retain_sampler = BatchSampler(len(retain_enc), cfg.retain_rows, cfg.seed + 2)
    partner_gen = torch.Generator().manual_seed(cfg.seed + 3)
    steps_run = 0
    bar = tqdm(range(cfg.steps), desc=f"fit x{C}" if C > 1 else "fit", disable=not progress, leave=False)
    with compiled_fit(model) if cfg.compile else nullcontext():
        for step in bar:
            batch, row_ctrl = _pack(enc, [s.next() for s in samplers], pad)
            retain_batch = collate([retain_enc[i] for i in retain_sampler.next()], pad).to(device) if use_retain else None
            partners = None
            if wants_pairs:  # c's partner: c + k (mod C), k drawn per step, never c itself
                partners = (torch.arange(C) + torch.randint(1, C, (1,), generator=partner_gen)) % C
                partners = partners.to(device)
            loss_c = train_step(model, gates, opt, batch.to(device), row_ctrl.to(device), cfg.l2, retain_batch,
                                cfg.retain_kl, partners, cfg.pair_kl, cfg.retain_nll, cfg.retain_kl_power,
                                cfg.retain_nll_hinge == "row")
            schedule.step()
            steps_run = step + 1
            if progress and step % 10 == 0:  # .item() waits for the GPU: not every step
                bar.set_postfix(loss=f"{loss_c.mean().item():.4f}")
            if val_enc and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
                val = packed_nll(model, val_enc, gates, pad)
                improved = False
                for c in range(C):
                    if val[c] < best_val[c]:
                        best_val[c], improved = val[c], True
                        best_raw[c] = gates.raw.detach()[c]
                stale = 0 if improved else stale + 1
                if cfg.patience and stale >= cfg.patience:
                    break
    bar.close()
    if val_enc:  # restore each controller's best checkpoint
        with torch.no_grad():
            gates.raw.copy_(best_raw)
    nll_after = packed_nll(model, stats_sets, gates, pad)
    seconds = time.perf_counter() - t0

    base = new_meta(model, tokenizer)
    out = []
    for c in range(C):
        fit_stats = {**asdict(cfg), "steps_run": steps_run, "train_nll_before": nll_before[c],
                     "train_nll_after": nll_after[c], "seconds": seconds, "pack_size": C,
                     "n_examples": len(datasets[c]), "retain_examples": len(retain) if use_retain else 0,
                     "contrast_examples": len(contrast) if contrast else 0}
        if val_enc:
            fit_stats["val_nll_best"] = best_val[c]
        meta = {**base, "fit": fit_stats, "data_hash": data_hash(datasets[c]), **(extra_meta[c] if extra_meta else {})}
        out.append(gates.controller(c, n_layers=n_layers, hidden_size=hidden, meta=meta).validate())
    return out


def fit_controller(model, tokenizer, examples: Sequence[Example], config: FitConfig | None = None,
                   validation: Sequence[Example] | None = None, progress: bool = True,
                   retain: Sequence[Example] | None = None, contrast: Sequence[Example] | None = None) -> Controller:
    return fit_controllers(model, tokenizer, [examples], config, [validation] if validation else None, progress,
                           retain=retain, contrast=contrast)[0]
