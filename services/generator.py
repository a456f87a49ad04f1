"""The generator deployment: one frozen model, concurrent requests batched across controllers.

Gates are batch data, so requests from different tenants with different memories share one
`generate` call: each request's (controller, weight) list becomes one row of a RowGates
tensor (`ntkmirror.gates.row_gates` composes and clips per row) and rows with no memories
run the base model. Only requests with different sampling temperatures are split; each row
keeps its own max_new_tokens.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from ray import serve

from ntkmirror.controller import Controller
from ntkmirror.data import encode_prompt
from ntkmirror.errors import DataError
from ntkmirror.evaluate import generate_rows, is_greedy
from ntkmirror.gates import row_gates
from ntkmirror.models import (DEFAULT_MODEL_NAME, find_decoder_layers, hidden_size, model_fingerprint,
                              tokenizer_fingerprint)

from .http import expected
from .retrieval import check_identity


def load_replica_model(args: dict):
    """The frozen model (and tokenizer) a replica serves; torch threads as configured."""
    import torch

    from ntkmirror.models import load_model

    if args.get("torch_threads"):
        torch.set_num_threads(int(args["torch_threads"]))
    return load_model(args.get("model"), device=args.get("device"), dtype=args.get("dtype"))


def served_name(args: dict) -> str:
    from pathlib import Path

    model = args.get("model")
    return args.get("served_model_name") or (Path(model).name if model else DEFAULT_MODEL_NAME)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's own chat template (generation prompt appended), or a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class GenTask:
    gates: list[tuple[Controller, float]]  # this row's memories and weights
    max_new_tokens: int
    temperature: float = 0.0
    prompt: str | None = None
    messages: list[dict] | None = None  # chat turns; rendered with the chat template
    _ids: list[int] = field(default_factory=list, repr=False)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, args: dict):
        self.model, self.tok = load_replica_model(args)
        self.name = served_name(args)
        self.max_prompt_tokens = int(args.get("max_prompt_tokens", 2048))
        self.n_layers, self.hidden = len(find_decoder_layers(self.model)[1]), hidden_size(self.model)
        self.max_batch = int(args.get("max_batch_size", 8))
        self.max_new_tokens = int(args.get("max_new_tokens", 512))
        self._batch.set_max_batch_size(self.max_batch)
        self._batch.set_batch_wait_timeout_s(float(args.get("batch_wait_timeout_s", 0.01)))
        self.sizes: collections.Counter[int] = collections.Counter()
        self._metrics = _batch_metrics()
        # greedy batches on the GPU go through the static-cache, CUDA-graph engine (issue 8: 9x
        # model.generate at batch 64); "on" forces it (e.g. on CPU, for tests), "off" never
        self.engine_mode = str(args.get("engine", "auto"))
        self._engine = None
        self.engine_calls = 0
        self._identity = {"model": self.name, "model_fingerprint": model_fingerprint(self.model),
                          "n_layers": self.n_layers, "hidden_size": self.hidden,
                          "tokenizer_fingerprint": tokenizer_fingerprint(self.tok)}  # frozen: made once

    def identity(self) -> dict:
        return self._identity

    def stats(self) -> dict:
        n = sum(self.sizes.values())
        return {"batches": n, "requests": sum(k * v for k, v in self.sizes.items()),
                "max_batch_size": max(self.sizes, default=0),
                "mean_batch_size": sum(k * v for k, v in self.sizes.items()) / n if n else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}, "engine_calls": self.engine_calls,
                "device": str(next(self.model.parameters()).device), "gpu_ids": _gpu_ids()}

    @expected
    async def generate(self, task: GenTask) -> dict:
        """Validate one request on its own (so a bad one cannot fail a batch), then join a batch."""
        identity = self.identity()
        for c, _ in task.gates:
            check_identity(c, identity, allow_model_mismatch=True)  # fingerprint was checked at registration
        if task.messages is not None:
            task.prompt = chat_prompt(self.tok, task.messages)
        task._ids = encode_prompt(self.tok, task.prompt or "")
        if len(task._ids) > self.max_prompt_tokens:
            raise DataError(f"prompt is {len(task._ids)} tokens, over the limit of {self.max_prompt_tokens}")
        return await self._batch(task)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, tasks: list[GenTask]) -> list[dict]:
        self.sizes[len(tasks)] += 1
        t0 = time.perf_counter()
        # Computed on the event loop on purpose: a compute thread in this process would hold the
        # GIL against request intake (measured: batches of ~1.5 instead of ~7 at 8 clients).
        # While it runs, arrivals wait in Ray's queue and form the next batch.
        out = self._run(tasks)
        self._metrics["size"].observe(len(tasks))
        self._metrics["seconds"].observe(time.perf_counter() - t0)
        return out

    def engine(self):
        """The generation engine, sized for this deployment's limits; built (and its graphs
        captured) on first use."""
        if self._engine is None:
            from ntkmirror.engine import GenerationEngine

            self._engine = GenerationEngine(self.model, self.tok, max_batch=self.max_batch,
                                            max_seq_len=self.max_prompt_tokens + self.max_new_tokens)
        return self._engine

    def _run(self, tasks: list[GenTask]) -> list[dict]:
        out: list[dict | None] = [None] * len(tasks)
        groups = collections.defaultdict(list)  # one generate call per sampling temperature
        for i, t in enumerate(tasks):
            groups[0.0 if is_greedy(t.temperature) else t.temperature].append(i)
        device = next(self.model.parameters()).device
        for temperature, idx in groups.items():
            gates = row_gates([tasks[i].gates for i in idx], self.n_layers, self.hidden, device=device)
            limits = [tasks[i].max_new_tokens for i in idx]
            if temperature == 0 and (self.engine_mode == "on" or (self.engine_mode == "auto" and device.type == "cuda")):
                rows = self.engine().generations([tasks[i]._ids for i in idx], gates, limits)
                self.engine_calls += 1
            else:
                rows = generate_rows(self.model, self.tok, [tasks[i].prompt for i in idx], gates,
                                     max_new_tokens=limits, batch_size=len(idx), temperature=temperature)
            for i, g in zip(idx, rows):
                out[i] = {"text": g.text, "prompt_tokens": len(tasks[i]._ids), "completion_tokens": g.new_tokens,
                          "finish_reason": "stop" if g.stopped else "length"}
        tokens = sum(o["completion_tokens"] for o in out)
        if tokens:  # Ray counters refuse increments of 0
            self._metrics["tokens"].inc(tokens)
        return out


def _gpu_ids() -> list[str]:
    """The GPUs Ray gave this replica (num_gpus > 0), else []."""
    import ray

    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def _batch_metrics() -> dict:
    from ray.serve.metrics import Counter, Histogram

    return {
        "size": Histogram("ntkmirror_batch_size", "requests per generate batch",
                          boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]),
        "seconds": Histogram("ntkmirror_batch_seconds", "seconds per generate batch",
                             boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]),
        "tokens": Counter("ntkmirror_generated_tokens", "completion tokens generated"),
    }
