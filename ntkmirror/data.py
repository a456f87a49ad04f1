"""Examples, JSONL loading and teacher-forced batches.

Data flows JSONL -> `Example` -> token ids -> padded `Batch`. Loss is taken on completion
tokens only; prompt and completion are tokenised separately without special tokens, so
generation can encode prompts exactly as training did (`encode_prompt`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import DataError

# Row schemas accepted in JSONL, as (prompt key, completion key).
ROW_SCHEMAS = (("prompt", "completion"), ("instruction", "response"), ("question", "answer"))


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    source: str = ""  # "file:line" for error messages

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion}


def example_from_row(row: object, tokenizer=None, where: str = "") -> Example:
    """Normalise one JSON row into an Example; raise DataError naming `where`."""
    at = f"{where}: " if where else ""
    if not isinstance(row, dict):
        raise DataError(f"{at}expected a JSON object, got {type(row).__name__}")
    for p_key, c_key in ROW_SCHEMAS:
        if p_key in row or c_key in row:
            prompt, completion = row.get(p_key), row.get(c_key)
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f"{at}{p_key!r} and {c_key!r} must both be strings")
            return _checked(Example(prompt, completion, where), at)
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{at}'text' must be a string")
        return _checked(Example("", row["text"], where), at)
    if "messages" in row:
        return _checked(_from_messages(row["messages"], tokenizer, at, where), at)
    keys = ", ".join(sorted(map(str, row))) or "no keys"
    raise DataError(
        f"{at}unknown row schema ({keys}); expected one of prompt/completion, "
        "instruction/response, question/answer, text, messages"
    )


def _checked(ex: Example, at: str) -> Example:
    if not ex.completion.strip():
        raise DataError(f"{at}empty completion: nothing to supervise")
    return ex


def _from_messages(messages: object, tokenizer, at: str, where: str) -> Example:
    """The last assistant turn is the completion; everything before it is the prompt."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok:
        raise DataError(f"{at}'messages' must be a non-empty list of {{role, content}} strings")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{at}the last message must have role 'assistant'")
    context, answer = messages[:-1], messages[-1]["content"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant:"
        answer = " " + answer
    return Example(prompt, answer, where)


def load_jsonl_examples(path: str | Path, tokenizer=None) -> list[Example]:
    """Read a JSONL file of examples. Errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
        examples.append(example_from_row(row, tokenizer, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


RETAIN_FILES = ("retain.jsonl", "retain_clauses.jsonl", "retain_longwords.jsonl", "retain_codeswitch.jsonl")


def default_retain_examples() -> list[Example]:
    """Generic text bundled with the package: what fitting keeps each controller's outputs close to
    the base model on (FitConfig.retain_kl) when the caller gives no retain set. The 32 rows of
    retain.jsonl; 32 clauses that stop where an answer begins ("The weather today is" -> " sunny."),
    where the first 32 left controllers free to push their own answer format (docs/results.md, runs
    5-6); 48 English sentences that end in a long word split into several tokens and 48 that end in a
    phrase of another language, where every controller shifted the later pieces of a word alike (run 11)."""
    return [ex for name in RETAIN_FILES for ex in load_jsonl_examples(Path(__file__).with_name(name))]


def retain_with(base: Sequence[Example] | None, added: Sequence[Example]) -> list[Example] | None:
    """The caller's KL text: `base` (None: the bundled set) then `added`. None when both are empty:
    fit.kl_text then uses the bundled set (the model's own texts join it either way)."""
    if not added:
        return None if base is None else list(base)
    return [*(default_retain_examples() if base is None else base), *added]


def retain_text(file: Path | None = None, added: Sequence[Path] = (), tokenizer=None) -> list[Example] | None:
    """retain_with from files (the CLIs' --retain-file / --retain-add)."""
    return retain_with(load_jsonl_examples(file, tokenizer) if file is not None else None,
                       [ex for f in added for ex in load_jsonl_examples(f, tokenizer)])


def default_contrast_examples() -> list[Example]:
    """The bundled generic text whose channels gate selection avoids (FitConfig.selection_contrast)
    unless the caller names another: retain.jsonl alone (a larger contrast set measured worse)."""
    return load_jsonl_examples(Path(__file__).with_name("retain.jsonl"))


def data_hash(examples: Iterable[Example]) -> str:
    """Content hash of a training set (order-sensitive): identifies what a controller saw."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- tokenisation


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []


def encode_example(tokenizer, ex: Example, max_length: int, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of prompt+completion (left-truncated) and the number of prompt tokens kept."""
    prompt = encode_prompt(tokenizer, ex.prompt)
    completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    ids = prompt + completion
    n_prompt = len(prompt)
    if len(ids) > max_length:  # truncate from the left: keep the completion
        cut = len(ids) - max_length
        ids, n_prompt = ids[cut:], max(0, n_prompt - cut)
    # position 0 is never predicted, so at least one completion token must sit after it
    if len(ids) - max(n_prompt, 1) < 1:
        where = f"{ex.source}: " if ex.source else ""
        raise DataError(f"{where}no supervised token left after truncation to max_length={max_length}")
    return ids, n_prompt


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right padded
    attention_mask: torch.Tensor  # (B, T) from lengths, never from the pad id
    labels: torch.Tensor  # (B, T) -100 on prompt and padding

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else pid


def collate(encoded: Sequence[tuple[list[int], int]], pad: int) -> Batch:
    T = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        attention_mask[i, :n] = 1
        labels[i, n_prompt:n] = input_ids[i, n_prompt:n]
    return Batch(input_ids, attention_mask, labels)


def encode_all(tokenizer, examples: Sequence[Example], max_length: int, add_eos: bool = True):
    return [encode_example(tokenizer, ex, max_length, add_eos) for ex in examples]
