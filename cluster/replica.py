"""One frozen model replica: fit packs of controllers, evaluate, generate, diagnose.

`Replica` is a plain class (usable in process); `ModelReplica` is the same class as a Ray
actor that Ray restarts when its process dies and whose interrupted calls it retries. The
model is loaded once per process; every call ships its data (examples as rows, controllers
as bytes) and returns plain values, so any replica can serve any call.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections import OrderedDict
from dataclasses import fields
from typing import Sequence

import ray
import torch
from transformers.utils import logging as hf_logging

from ntkmirror.controller import Controller
from ntkmirror.data import encode_all, example_from_row
from ntkmirror.errors import ConfigError, DataError, NtkMirrorError
from ntkmirror.fit import FitConfig

_FIT_FIELDS = {f.name for f in fields(FitConfig)}


def fit_config(config: FitConfig | dict | None) -> FitConfig:
    """A FitConfig from a dict of its fields (what travels between driver and replicas)."""
    if config is None or isinstance(config, FitConfig):
        return config or FitConfig()
    unknown = set(config) - _FIT_FIELDS
    if unknown:
        raise ConfigError(f"unknown fit option(s): {', '.join(sorted(unknown))}")
    return FitConfig(**config)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Replica:
    """Holds one frozen model and tokenizer; stateless between calls apart from caches."""

    def __init__(self, model: str | None = None, dtype: str | None = None, device: str | None = None,
                 threads: int | None = None):
        from ntkmirror.models import find_decoder_layers, hidden_size, load_model, model_fingerprint

        if threads:  # Ray gives each actor num_cpus cores; torch would otherwise use every core
            torch.set_num_threads(int(threads))
        if device is None:  # Ray hides GPUs from actors that did not ask for one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per replica start is noise in job logs
        t0 = time.perf_counter()
        self.model, self.tok = load_model(model, device=device, dtype=dtype)
        self.model_arg, self.device = model, device
        self.n_layers, self.hidden = len(find_decoder_layers(self.model)[1]), hidden_size(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self.load_seconds = time.perf_counter() - t0
        self.started = time.time()
        self.calls = 0
        self._controllers: OrderedDict[str, Controller] = OrderedDict()  # bytes sha -> parsed, LRU

    # ------------------------------------------------------------------ fit
    def fit_pack(self, items: Sequence[dict], config: FitConfig | dict | None = None,
                 retain: Sequence[dict] | None = None, contrast: Sequence[dict] | None = None) -> list[dict]:
        """Fit one controller per item in one batched loop.

        An item is {"id", "examples": [row dicts], "meta": {...}} (meta is merged into the
        controller's metadata). Each item is validated and encoded first, so a bad item is
        returned as an error and the rest of the pack is still fitted. `retain`: row dicts of the
        KL text, `contrast`: of the text gate selection avoids (default: the library's). Returns one
        result per item, in order: {"id", "status": "ok"|"error", "controller": bytes, "data_hash",
        "gates", "train_nll_before", "train_nll_after", "seconds", "error"}.
        """
        from ntkmirror.fit import fit_controllers

        self.calls += 1
        cfg = fit_config(config)
        retain_ex, contrast_ex = ([example_from_row(r, self.tok, f"{name} row {k + 1}") for k, r in enumerate(rows or ())]
                                  or None for name, rows in (("retain", retain), ("contrast", contrast)))
        results: dict[int, dict] = {}
        good: list[tuple[int, list]] = []
        for i, item in enumerate(items):
            try:
                good.append((i, self._examples(item, cfg)))
            except Exception as e:  # one bad item must not sink the pack
                results[i] = _error(item, e)

        def fit(group: list[tuple[int, list]]) -> None:
            t0 = time.perf_counter()
            try:
                cs = fit_controllers(self.model, self.tok, [ex for _, ex in group], cfg, progress=False,
                                     extra_meta=[dict(items[i].get("meta") or {}) for i, _ in group],
                                     retain=retain_ex, contrast=contrast_ex)
            except Exception as e:
                if len(group) == 1:
                    results[group[0][0]] = _error(items[group[0][0]], e)
                else:  # find the culprit: fit the pack's items one at a time
                    for g in group:
                        fit([g])
                return
            share = (time.perf_counter() - t0) / len(group)  # the pack's time, amortised per item
            for (i, _), c in zip(group, cs):
                results[i] = _ok(items[i], c, share)

        if good:
            fit(good)
        return [results[i] for i in range(len(items))]

    def _examples(self, item: dict, cfg: FitConfig) -> list:
        rows = item.get("examples")
        if not isinstance(rows, (list, tuple)) or not rows:
            raise DataError(f"item {item.get('id')!r}: 'examples' must be a non-empty list of rows")
        wheres = item.get("where") or [f"{item.get('id')} example {k}" for k in range(len(rows))]
        examples = [example_from_row(r, self.tok, w) for r, w in zip(rows, wheres)]
        encode_all(self.tok, examples, cfg.max_length, cfg.add_eos)  # raises on e.g. nothing to supervise
        return examples

    # ------------------------------------------------------------------ use controllers
    def controller(self, data: bytes, allow_model_mismatch: bool = False) -> Controller:
        """Parse (cached by content) and check against this replica's model (every call: the flag may differ)."""
        key = hashlib.sha256(data).hexdigest()
        c = self._controllers.get(key)
        if c is None:
            c = self._controllers[key] = Controller.from_bytes(data, source=f"controller {key[:12]}")
            if len(self._controllers) > 256:
                self._controllers.popitem(last=False)
        self._controllers.move_to_end(key)
        return c.check_model(self.model, allow_model_mismatch, self.tok)

    def evaluate(self, examples: Sequence[dict], controller: bytes | None = None, allow_model_mismatch: bool = False,
                 **kw) -> dict:
        """ntkmirror.evaluate.evaluate on example rows, base model when controller is None."""
        from ntkmirror.evaluate import evaluate

        self.calls += 1
        exs = [example_from_row(r, self.tok, f"example {k}") for k, r in enumerate(examples)]
        c = self.controller(controller, allow_model_mismatch) if controller is not None else None
        return evaluate(self.model, self.tok, exs, c, **kw)

    def generate(self, prompts: Sequence[str], rows: Sequence[Sequence[tuple[bytes, float]]] | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, max_log_gate: float | None = None,
                 allow_model_mismatch: bool = False, batch_size: int = 8) -> list[str]:
        """Greedy (or sampled) continuations; rows[r] = [(controller bytes, weight), ...] for prompt r."""
        from ntkmirror.evaluate import generate, is_greedy
        from ntkmirror.gates import row_gates

        self.calls += 1
        rows = rows if rows is not None else [[] for _ in prompts]
        if len(rows) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(rows)} gate rows")
        parsed = [[(self.controller(b, allow_model_mismatch), float(w)) for b, w in row] for row in rows]
        gates = row_gates(parsed, self.n_layers, self.hidden, max_log_gate, self.device) if any(parsed) else None
        if is_greedy(temperature) and str(self.device).startswith("cuda"):  # static KV cache, CUDA-graph decode
            return self._engine().generate(list(prompts), gates, max_new_tokens=max_new_tokens)
        return generate(self.model, self.tok, list(prompts), gates, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, temperature=temperature)

    def _engine(self):
        """The GPU generator, built on first use (its graphs are captured then, once)."""
        if getattr(self, "_generation_engine", None) is None:
            from ntkmirror.engine import GenerationEngine

            self._generation_engine = GenerationEngine(self.model, self.tok)
        return self._generation_engine

    def diagnose(self, controllers: Sequence[bytes | None], support: Sequence[dict],
                 calibration: Sequence[dict] | None = None, config: dict | None = None,
                 allow_model_mismatch: bool = False) -> list[dict]:
        """NTK-dual diagnostics (ntkmirror.dual.diagnose_many), one report per controller.

        None stands for a fresh gate basis selected on `support`. A controller that cannot be
        read or does not fit this model gets {"error"} instead of a report.
        """
        try:
            from ntkmirror.dual import DualConfig, diagnose_many
        except ImportError as e:
            raise NtkMirrorError(f"dual diagnostics are not available: {e}") from None
        self.calls += 1
        cfg = DualConfig(**(config or {}))
        sup = [example_from_row(r, self.tok, f"support {k}") for k, r in enumerate(support)]
        cal = [example_from_row(r, self.tok, f"calibration {k}") for k, r in enumerate(calibration or [])] or None
        out: list[dict | None] = [None] * len(controllers)
        todo, parsed = [], []
        for i, b in enumerate(controllers):
            try:
                parsed.append(self.controller(b, allow_model_mismatch) if b is not None else None)
                todo.append(i)
            except NtkMirrorError as e:
                out[i] = {"error": error_text(e)}
        for i, rep in zip(todo, diagnose_many(self.model, self.tok, parsed, sup, cal, cfg) if todo else []):
            rep.pop("index", None)
            out[i] = rep
        return out

    @ray.method(concurrency_group="health")
    def health(self) -> dict:
        """Answered on its own thread, so it replies even while a fit is running."""
        return {"ok": True, "pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device),
                "model": self.model_arg or "default", "fingerprint": self.fingerprint, "calls": self.calls,
                "load_seconds": round(self.load_seconds, 3), "uptime": round(time.time() - self.started, 3)}


def _ok(item: dict, c: Controller, seconds: float) -> dict:
    f = c.meta["fit"]
    return {"id": item.get("id"), "status": "ok", "controller": c.to_bytes(), "data_hash": c.meta["data_hash"],
            "gates": c.num_gates, "train_nll_before": f["train_nll_before"], "train_nll_after": f["train_nll_after"],
            "seconds": seconds, "error": None}


def _error(item: dict, e: BaseException) -> dict:
    return {"id": item.get("id"), "status": "error", "controller": None, "data_hash": None, "gates": None,
            "train_nll_before": None, "train_nll_after": None, "seconds": None, "error": error_text(e)}


# The actor: Ray restarts a dead replica process (reloading the model) and retries the calls it
# was running. Health checks get their own thread (a concurrency group).
ModelReplica = ray.remote(max_restarts=3, max_task_retries=2, concurrency_groups={"health": 1})(Replica)
