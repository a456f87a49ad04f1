"""Fast greedy generation for serving, with a different gate row (controller) per batch row.

Per-step overhead, not arithmetic, dominates small-batch decoding: `model.generate` spends
most of each step in Python and kernel launches. This engine removes it:

- a static KV cache, preallocated once for (max_batch, max_seq_len), written in place;
- prefill runs eagerly (only the last position's logits are computed);
- each decode step (forward, argmax, EOS bookkeeping, cache and position advance) reads and
  writes only persistent buffers, so on CUDA it is captured once in a CUDA graph (after
  `torch.compile` fuses it, by default) and then replayed;
- the per-row gate tensor is one of those buffers: (max_batch, n_layers, H) float32
  log-gates (and their exp), copied into before each call. Every row can carry a different composed
  controller and a new set of controllers never needs a re-capture. Gates use the same hook
  (`ntkmirror.gates`) as training and evaluation; zero rows are exactly the identity.

On CPU, or with graphs off, the same step runs eagerly and gives the same tokens as
`ntkmirror.evaluate.generate` (greedy).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from .controller import Controller
from .data import encode_prompt, pad_id
from .errors import ConfigError, ControllerError
from .evaluate import Generation, nonempty_prompt, to_generation
from .gates import RowGates, attach, controller_gates
from .models import find_decoder_layers, hidden_size


class _StaticKV:
    """Preallocated K/V per layer, (B, kv_heads, S, head_dim), written at positions `pos`.

    Duck-types the one call transformers' attention makes on a cache: update(k, v, layer).
    Allocated on first use, from the shapes and dtype the model produces."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: torch.Tensor | None = None  # (T,) long: cache slots the next forward writes
        self.span: int | None = None  # prefill: attend over the first `span` slots only

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.k[layer_idx] is None:
            B, h, _, d = key.shape
            self.k[layer_idx] = key.new_zeros(B, h, self.max_len, d)
            self.v[layer_idx] = value.new_zeros(B, h, self.max_len, value.shape[-1])
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.index_copy_(2, self.pos, key)
        v.index_copy_(2, self.pos, value)
        if self.span is not None:
            return k[:, :, : self.span], v[:, :, : self.span]
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # positions are always passed explicitly
        return 0


class GenerationEngine:
    """Greedy generation with per-row gates, a static KV cache and a CUDA-graph decode step.

    compile: "auto" (on CUDA only), True or False: torch.compile the decode step before
    capturing it. graphs: "auto" (on CUDA only), True or False: capture/replay the step.
    """

    def __init__(self, model, tokenizer, max_batch: int = 64, max_seq_len: int = 1024,
                 compile: bool | str = "auto", graphs: bool | str = "auto"):
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if graphs == "auto" else bool(graphs)
        self.compile = cuda if compile == "auto" else bool(compile)
        if self.use_graphs and not cuda:
            raise ConfigError("CUDA graphs need a CUDA model")
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or []):
            raise ConfigError("the generation engine supports full-attention models only "
                              "(this one has sliding-window layers); use ntkmirror.evaluate.generate")
        self.n_layers, self.hidden = len(find_decoder_layers(model)[1]), hidden_size(model)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.pad = pad_id(tokenizer) if tokenizer is not None else 0
        self.sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        B, S, dev = max_batch, max_seq_len, self.device
        self.kv = _StaticKV(self.n_layers, S)
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated there)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Persistent decode state: the captured graph reads and writes these addresses.
        self._gates = torch.zeros(B, self.n_layers, self.hidden, device=dev)  # float32 log-gates
        self._scale = torch.ones_like(self._gates)  # exp(_gates), made once per call, not per layer
        self._tok = torch.zeros(B, 1, dtype=torch.long, device=dev)  # last token of each row
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its cache slot
        self._position_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)  # its rotary position
        self._valid = torch.zeros(B, S, dtype=torch.bool, device=dev)  # cache slots a row attends to
        self._done = torch.zeros(B, dtype=torch.bool, device=dev)
        self._out = torch.zeros(B, S + 1, dtype=torch.long, device=dev)  # token at each position
        self._eos = torch.full((), -1, dtype=torch.long, device=dev)
        self._pad = torch.full((), self.pad, dtype=torch.long, device=dev)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._compiled: dict[bool, object] = {}

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str], gates: RowGates | Controller | None = None,
                 max_new_tokens: int = 128) -> list[str]:
        """Greedy continuation of each prompt (encoded as training does); only the new text."""
        return [g.text for g in self.generations([encode_prompt(self.tok, p) for p in prompts], gates, max_new_tokens)]

    def generations(self, prompt_ids: Sequence[Sequence[int]], gates: RowGates | Controller | None = None,
                    max_new_tokens: int | Sequence[int] = 128) -> list[Generation]:
        """`evaluate.generate_rows`' results from the engine: one limit per prompt if given (the
        batch runs to the largest; greedy decoding is causal, so a cut row equals a shorter run)."""
        eos = self.tok.eos_token_id
        limits = [max_new_tokens] * len(prompt_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        ids = [nonempty_prompt(p, self.tok) for p in prompt_ids]
        out = self.generate_ids(ids, gates, max(limits, default=1), eos_token_id=eos)
        return [to_generation(self.tok, new[:k], eos) for new, k in zip(out, limits)]

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], gates: RowGates | Controller | None = None,
                     max_new_tokens: int = 128, eos_token_id: int | None = None) -> list[list[int]]:
        """New token ids per prompt (up to and including EOS). `gates` rows follow the prompts
        (or one shared row); None runs the base model. eos_token_id None: never stop early."""
        if isinstance(gates, Controller):
            gates = controller_gates(gates, self.device)
        if gates is not None and not gates.layers:  # rows without controllers (row_gates of empty rows)
            gates = None
        if gates is not None:
            self._check_gates(gates, len(prompt_ids))
        out: list[list[int]] = []
        for lo in range(0, len(prompt_ids), self.max_batch):
            chunk = [list(map(int, p)) for p in prompt_ids[lo: lo + self.max_batch]]
            out += self._generate_batch(chunk, gates, lo, max_new_tokens, eos_token_id)
        return out

    # ------------------------------------------------------------------ one batch
    def _generate_batch(self, ids, gates, lo, n_new, eos):
        n = len(ids)
        if not all(ids):
            raise ConfigError("every prompt needs at least one token")
        T = max(map(len, ids))
        if n_new < 1 or T + n_new > self.max_seq_len:
            raise ConfigError(f"prompt length {T} + max_new_tokens {n_new} must be within "
                              f"max_seq_len {self.max_seq_len}")
        gated = gates is not None
        if gated:
            self._load_gates(gates, lo, n)
        self._eos.fill_(-1 if eos is None else eos)
        if self.use_graphs and gated not in self._graphs:
            self._capture(gated)  # before prefill: its warm-up runs overwrite the decode state

        with attach(self.model, self._row_gates() if gated else None):
            first = self._prefill(ids, T)
            self._out[:, T] = first
            self._tok[:, 0] = first
            self._done[:] = first == self._eos
            self._done[n:] = True  # padding rows never hold up an early stop
            for step in range(1, n_new):
                if self.use_graphs:
                    self._graphs[gated].replay()
                else:
                    self._step_fn(gated)()
                if eos is not None and (step % 8 == 0 or not self.use_graphs) and bool(self._done.all()):
                    break
        new = self._out[:n, T: T + n_new].tolist()
        return [row[: row.index(eos) + 1] if eos is not None and eos in row else row for row in new]

    def _prefill(self, ids, T) -> torch.Tensor:
        """Left-padded prompts through the model, cache slots [0, T); returns the first new token."""
        B, dev = self.max_batch, self.device
        rows = ids + [[self.pad]] * (B - len(ids))  # fixed batch: the graph was captured for it
        lens = torch.tensor([len(r) for r in rows], device=dev)
        input_ids = torch.tensor([[self.pad] * (T - len(r)) + r for r in rows], device=dev)
        t = torch.arange(T, device=dev)
        valid = t[None, :] >= (T - lens)[:, None]  # (B, T) real tokens
        self._valid.zero_()
        self._valid[:, :T] = valid
        position_ids = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)  # as transformers' generate
        # query q sees key k <= q when k is a real token; padding queries see themselves (no NaN rows)
        mask = (t[None, :] <= t[:, None])[None] & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=dev))
        self.kv.pos, self.kv.span = t, T
        try:
            logits = self.model(input_ids=input_ids, attention_mask=self._mask(mask[:, None]),
                                position_ids=position_ids, **{self._cache_arg: self.kv}, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
        finally:
            self.kv.pos, self.kv.span = self._pos, None
        self._pos.fill_(T)
        self._position_ids.copy_(position_ids[:, -1:] + 1)
        return logits.argmax(-1)

    def _step(self) -> None:
        """One decode step on the persistent buffers only (so it can be captured)."""
        p = self._pos
        self._valid.index_fill_(1, p, True)
        logits = self.model(input_ids=self._tok, attention_mask=self._mask(self._valid[:, None, None, :]),
                            position_ids=self._position_ids, **{self._cache_arg: self.kv}, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        nxt = torch.where(self._done, self._pad, logits.argmax(-1))  # finished rows emit padding
        self._done |= nxt == self._eos
        self._out.index_copy_(1, p + 1, nxt[:, None])
        self._tok.copy_(nxt[:, None])
        self._position_ids.add_(1)
        self._pos.add_(1)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4D mask as the attention implementation wants it (SDPA: bool; eager: additive)."""
        if self.sdpa:
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------------ gates
    def _row_gates(self) -> RowGates:
        return RowGates(list(range(self.n_layers)), self._gates, self._scale)

    def _check_gates(self, gates: RowGates, n: int) -> None:
        v = gates.values
        if v.shape[-1] != self.hidden or any(not 0 <= l < self.n_layers for l in gates.layers):
            raise ControllerError(f"gates for layers {gates.layers} x {v.shape[-1]} channels do not fit a model "
                                  f"with {self.n_layers} layers x {self.hidden}")
        if v.dim() == 3 and v.shape[0] != n:
            raise ControllerError(f"gate tensor has {v.shape[0]} rows for {n} prompts")

    def _load_gates(self, gates: RowGates, lo: int, n: int) -> None:
        v = gates.values.to(self.device, torch.float32)
        self._gates.zero_()  # identity for layers and rows without gates
        layers = torch.tensor(gates.layers, device=self.device)
        self._gates[:n, layers] = v[lo: lo + n] if v.dim() == 3 else v
        torch.exp(self._gates, out=self._scale)

    # ------------------------------------------------------------------ CUDA graphs
    def _step_gated(self) -> None:
        self._step()

    def _step_plain(self) -> None:
        self._step()

    def _step_fn(self, gated: bool):
        """The decode step for one mode. Compiled, each mode is its own function: dynamo keys
        its cache on the code object and does not guard on forward hooks, so one compiled step
        shared by both modes would silently run the other mode's graph."""
        if not self.compile:
            return self._step
        if gated not in self._compiled:
            self._compiled[gated] = torch.compile(self._step_gated if gated else self._step_plain, dynamic=False)
        return self._compiled[gated]

    def _capture(self, gated: bool) -> None:
        step = self._step_fn(gated)
        self._tok.fill_(self.pad)
        self._pos.zero_()
        self._valid.zero_()
        with attach(self.model, self._row_gates() if gated else None):
            self.kv.pos = self._pos
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (and compile) off the capture stream
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        self._graphs[gated] = graph
