"""Evaluation (teacher-forced NLL, token accuracy, exact match) and greedy generation.

Generation encodes prompts exactly as training did (no special tokens), left-pads the
batch, and may carry a different gate row per prompt.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .controller import Controller
from .data import Example, collate, encode_all, encode_prompt, pad_id
from .errors import ConfigError
from .gates import RowGates, attach, controller_gates
from .objective import supervised_logits, token_losses


def _device(model):
    return next(model.parameters()).device


def _slice(gates: RowGates | None, lo: int, hi: int) -> RowGates | None:
    if gates is None or gates.values.dim() == 2:  # shared by every row
        return gates
    return RowGates(gates.layers, gates.values[lo:hi])


def _as_gates(model, gates: RowGates | Controller | None) -> RowGates | None:
    return controller_gates(gates, _device(model)) if isinstance(gates, Controller) else (
        gates.to(_device(model)) if gates is not None else None)


@torch.no_grad()
def teacher_forced(model, tokenizer, examples: Sequence[Example], gates: RowGates | Controller | None = None,
                   batch_size: int = 8, max_length: int = 1024, add_eos: bool = True) -> dict:
    """Token-weighted NLL and token accuracy on completion tokens."""
    gates = _as_gates(model, gates)
    enc = encode_all(tokenizer, examples, max_length, add_eos)
    nll_sum, correct, n = 0.0, 0, 0
    for lo in range(0, len(enc), batch_size):
        batch = collate(enc[lo: lo + batch_size], pad_id(tokenizer)).to(_device(model))
        with attach(model, _slice(gates, lo, lo + batch_size)):
            tl = token_losses(model, batch)
        nll_sum += tl.nll.sum().item()
        correct += int(tl.correct.sum())
        n += tl.nll.numel()
    return {"nll": nll_sum / max(n, 1), "token_accuracy": correct / max(n, 1), "tokens": n}


@torch.no_grad()
def row_shifts(model, tokenizer, examples: Sequence[Example], gates: RowGates | Controller,
               batch_size: int = 8, max_length: int = 1024, add_eos: bool = True, top: int = 5) -> list[dict]:
    """Where gates move text and toward what: per example, the completion's summed NLL without and
    with the gates, and the `top` next tokens whose probability they raise most where the
    completion begins (e.g. a memory that makes plain answers open like its own format)."""
    gates = _as_gates(model, gates)
    enc = encode_all(tokenizer, examples, max_length, add_eos)
    rows = []
    for lo in range(0, len(enc), batch_size):
        batch = collate(enc[lo: lo + batch_size], pad_id(tokenizer)).to(_device(model))
        base, targets, row = supervised_logits(model, batch)  # (N, V) at every completion token
        with attach(model, _slice(gates, lo, lo + batch_size)):
            gated = supervised_logits(model, batch)[0]
        lp_base, lp_gated = base.log_softmax(-1), gated.log_softmax(-1)
        nll_base = -lp_base.gather(1, targets[:, None])[:, 0]
        nll_gated = -lp_gated.gather(1, targets[:, None])[:, 0]
        for r in range(batch.input_ids.shape[0]):
            mine = (row == r).nonzero()[:, 0]
            first = mine[0]  # row-major: the position that predicts the completion's first token
            p_base, p_gated = lp_base[first].exp(), lp_gated[first].exp()
            raised = (p_gated - p_base).topk(min(top, len(p_base))).indices.tolist()
            ex = examples[lo + r]
            rows.append({"index": lo + r, "prompt": ex.prompt, "completion": ex.completion, "tokens": len(mine),
                         "nll_base": float(nll_base[mine].sum()), "nll_gated": float(nll_gated[mine].sum()),
                         "raised": [{"token": tokenizer.decode([t]), "p_base": float(p_base[t]),
                                     "p_gated": float(p_gated[t])} for t in raised]})
    return rows


@dataclass
class Generation:
    text: str  # the new text only
    new_tokens: int  # generated tokens, EOS excluded
    stopped: bool  # ended on EOS (else it ran to its max_new_tokens)


# Temperatures at or below this decode greedily: sampling at T -> 0 is greedy decoding, and logits / T
# overflow float32 for T near the smallest doubles (found by schemathesis: T = 2.2e-311 crashed a request).
GREEDY_BELOW = 1e-4


def is_greedy(temperature: float) -> bool:
    return not temperature > GREEDY_BELOW  # NaN counts as greedy too


def nonempty_prompt(ids: Sequence[int], tokenizer) -> list[int]:
    """A prompt's token ids, or a lone BOS (else EOS) for an empty prompt: generation needs one."""
    return list(ids) or [tokenizer.bos_token_id or tokenizer.eos_token_id]


def to_generation(tokenizer, new: Sequence[int], eos: int | None) -> Generation:
    """New token ids cut at the first EOS (not included), decoded."""
    new = list(new)
    stopped = eos is not None and eos in new
    n = new.index(eos) if stopped else len(new)
    return Generation(tokenizer.decode(new[:n], skip_special_tokens=True), n, stopped)


@torch.no_grad()
def generate_rows(model, tokenizer, prompts: Sequence[str], gates: RowGates | Controller | None = None,
                  max_new_tokens: int | Sequence[int] = 128, batch_size: int = 8, temperature: float = 0.0,
                  seed: int | None = None) -> list[Generation]:
    """Continue each prompt (greedy unless temperature > GREEDY_BELOW), with token counts.

    `max_new_tokens` may be one limit per prompt: a batch runs to its largest limit and each
    row is cut to its own (greedy decoding is causal, so the cut row equals a shorter run).
    """
    gates = _as_gates(model, gates)
    device, pad, eos = _device(model), pad_id(tokenizer), tokenizer.eos_token_id
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    results = []
    for lo in range(0, len(prompts), batch_size):
        ids = [nonempty_prompt(encode_prompt(tokenizer, p), tokenizer) for p in prompts[lo: lo + batch_size]]
        lim = limits[lo: lo + len(ids)]
        T = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
        sample = {"do_sample": False} if is_greedy(temperature) else {"do_sample": True, "temperature": temperature}
        with attach(model, _slice(gates, lo, lo + len(ids))):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(lim),
                                 pad_token_id=pad, eos_token_id=eos, top_p=None, top_k=None, **sample)
        results += [to_generation(tokenizer, row[T: T + k].tolist(), eos) for row, k in zip(out, lim)]
    return results


def generate(model, tokenizer, prompts: Sequence[str], gates: RowGates | Controller | None = None,
             max_new_tokens: int | Sequence[int] = 128, batch_size: int = 8, temperature: float = 0.0,
             seed: int | None = None) -> list[str]:
    """Continue each prompt (greedy unless temperature > 0); returns only the new text."""
    return [g.text for g in generate_rows(model, tokenizer, prompts, gates, max_new_tokens, batch_size,
                                          temperature, seed)]


def _lines(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", l).strip().lower() for l in text.strip().splitlines() if l.strip()]


def exact_match(generated: str, target: str) -> bool:
    """Normalised compare that reads the *first* answer: the generation's first lines must equal
    the target's lines (whitespace and case folded); anything the model says after is ignored."""
    want = _lines(target)
    return bool(want) and _lines(generated)[: len(want)] == want


def evaluate(model, tokenizer, examples: Sequence[Example], gates: RowGates | Controller | None = None,
             batch_size: int = 8, max_length: int = 1024, max_new_tokens: int | None = None,
             exact: bool = True, add_eos: bool = True) -> dict:
    """NLL, token accuracy and (greedy) exact-match accuracy on the same examples."""
    out = teacher_forced(model, tokenizer, examples, gates, batch_size, max_length, add_eos)
    out["examples"] = len(examples)
    if exact:
        if max_new_tokens is None:  # enough for the longest target, and a little more
            max_new_tokens = max(len(tokenizer(e.completion, add_special_tokens=False)["input_ids"])
                                 for e in examples) + 8
        gens = generate(model, tokenizer, [e.prompt for e in examples], gates, max_new_tokens, batch_size)
        out["exact_match"] = sum(exact_match(g, e.completion) for g, e in zip(gens, examples)) / len(examples)
    return out


# Openers for sampled_retain_examples: many genres, so the samples spread over what the model writes.
RETAIN_OPENERS = ("The", "Once", "In the morning,", "My favourite", "Scientists", "Yesterday", "Here is", "How to",
                  "Dear", "I think", "When", "Today", "It was", "There are", "One of the", "If you",
                  "Question: Why", "Step 1:", "Note:", "We", "After the", "According to", "Many people",
                  "This recipe", "The history of", "In 1990,", "Please", "She said", "def", "A good",
                  "Welcome to", "Chapter 1")


# starts in six languages other than English (run 9f measures them against probe F, which they do not hold out)
LANGUAGE_OPENERS = ("Bonjour, je", "Le matin,", "Il était une fois", "Hola, me llamo", "En la ciudad", "Había una vez",
                    "Guten Tag, ich", "Im Sommer", "Es war einmal", "Ciao, sono", "Oggi", "C'era una volta", "Olá, eu",
                    "Hoje", "Hallo, ik", "Vandaag")
OPENER_KINDS = ("generic", "none", "vocab", "languages")


def opener_kinds(kinds: str) -> list[str]:
    """The "+"-joined opener kinds, each checked."""
    parts = kinds.split("+")
    if any(k not in OPENER_KINDS for k in parts):
        raise ConfigError(f"retain_openers must be {', '.join(OPENER_KINDS)} or several joined by '+', got {kinds!r}")
    return parts


def retain_openers(tokenizer, kinds: str, n: int, seed: int = 0) -> list[str]:
    """n starts for the model's own texts, split evenly across the "+"-joined `kinds`: "generic"
    (RETAIN_OPENERS in turn), "none" (no start: the model's unprompted text, from its BOS token),
    "vocab" (a whole word drawn from the tokenizer's vocabulary, seeded: the model picks the genre) or
    "languages" (LANGUAGE_OPENERS in turn)."""
    parts = opener_kinds(kinds)
    rng = random.Random(seed)
    out = []
    for j, kind in enumerate(parts):
        m = n // len(parts) + (j < n % len(parts))
        if kind in ("generic", "languages"):
            fixed = RETAIN_OPENERS if kind == "generic" else LANGUAGE_OPENERS
            out += [fixed[i % len(fixed)] for i in range(m)]
        elif kind == "none":
            out += [""] * m
        else:
            words = vocab_words(tokenizer)
            out += [rng.choice(words) for _ in range(m)]
    return out


def vocab_words(tokenizer) -> list[str]:
    """The vocabulary's tokens that are a whole word on their own: a space, then three or more letters
    of any script."""
    decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    words = sorted({t[1:] for t in decoded if t[:1] == " " and len(t) > 3 and t[1:].isalpha()})
    if not words:
        raise ConfigError("retain openers 'vocab': the tokenizer has no word tokens (a space, then letters)")
    return words


def sampled_retain_examples(model, tokenizer, n: int = 128, max_new_tokens: int = 48, temperature: float = 1.0,
                            seed: int = 0, batch_size: int = 32, openers: str = "generic") -> list[Example]:
    """Text the model itself writes from the given starts (`retain_openers`; sampled, seeded): a
    retain set that covers the model's own typical output, so the KL holds a controller to the base
    model wherever the base model is at home (cf. the random prefixes model-editing methods use for
    the same purpose). FitConfig.retain_samples adds these to every fit's KL text (fit.kl_text)."""
    prompts = retain_openers(tokenizer, openers, n, seed)
    device = _device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        rows = generate_rows(model, tokenizer, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             temperature=temperature, seed=seed)
    # after a start, the text continues it from a new word; unprompted text is kept as written
    return [Example(p, g.text if not p or g.text.startswith(" ") else " " + g.text.strip(), f"sampled:{i}")
            for i, (p, g) in enumerate(zip(prompts, rows)) if g.text.strip()]
