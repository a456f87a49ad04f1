"""The controller value: sparse signed log-gates plus metadata, and its file format.

A controller holds K gates, each a (layer, channel) key with a float32 `raw` value; the
log-gate is `s = max_log_gate * tanh(raw)` and the gated hidden state is `exp(s) * h`.
Canonical file: safetensors (tensors `layer`, `channel`, `raw`; JSON metadata). `.pt` files
hold plain tensors and a JSON-able dict and are always read with `weights_only=True`.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import ControllerError, ModelMismatchError

SCHEMA_VERSION = 1
MAX_GATES = int(os.environ.get("NTKMIRROR_MAX_GATES", 1 << 20))
DEFAULT_MAX_LOG_GATE = 0.05
# exp(s) multiplies hidden states: past ~e^10 a forward pass overflows into inf/NaN logits
MAX_LOG_GATE_LIMIT = 10.0


@dataclass
class Controller:
    layer: torch.Tensor  # (K,) int64 decoder-layer index
    channel: torch.Tensor  # (K,) int64 hidden channel
    raw: torch.Tensor  # (K,) float32, s = max_log_gate * tanh(raw)
    max_log_gate: float = DEFAULT_MAX_LOG_GATE
    n_layers: int = 0
    hidden_size: int = 0
    meta: dict = field(default_factory=dict)  # model identity, fit stats, data hash, ...

    def __post_init__(self):
        self.layer = torch.as_tensor(self.layer, dtype=torch.long).reshape(-1).cpu()
        self.channel = torch.as_tensor(self.channel, dtype=torch.long).reshape(-1).cpu()
        self.raw = torch.as_tensor(self.raw, dtype=torch.float32).reshape(-1).detach().cpu()
        self.max_log_gate = float(self.max_log_gate)

    # ------------------------------------------------------------ values
    @property
    def num_gates(self) -> int:
        return int(self.raw.numel())

    def log_gates(self) -> torch.Tensor:
        """Signed log-gates s, (K,) float32."""
        return self.max_log_gate * torch.tanh(self.raw)

    def keys(self) -> torch.Tensor:
        """Flat (layer * hidden + channel) keys, (K,) int64."""
        return self.layer * self.hidden_size + self.channel

    def to_dense(self) -> torch.Tensor:
        """Dense (n_layers, hidden_size) float32 log-gates."""
        dense = torch.zeros(self.n_layers * self.hidden_size)
        dense[self.keys()] = self.log_gates()
        return dense.view(self.n_layers, self.hidden_size)

    @classmethod
    def from_log_gates(cls, layer, channel, s, max_log_gate: float, **kw) -> "Controller":
        """Build from log-gates s (|s| <= max_log_gate); saturated values map to a large raw."""
        ratio = torch.as_tensor(s, dtype=torch.float32) / max_log_gate
        raw = torch.atanh(ratio.clamp(-1 + 1e-6, 1 - 1e-6))
        return cls(layer, channel, raw, max_log_gate, **kw)

    def identity(self) -> dict:
        """What the controller must match to be attached: model fingerprint and shape."""
        return {"model_fingerprint": self.meta.get("model_fingerprint"), "n_layers": self.n_layers,
                "hidden_size": self.hidden_size}

    # ------------------------------------------------------------ checks
    def validate(self, max_gates: int = MAX_GATES) -> "Controller":
        K = self.raw.numel()
        if not (self.layer.numel() == self.channel.numel() == K):
            raise ControllerError(f"layer/channel/raw lengths differ ({self.layer.numel()}, "
                                  f"{self.channel.numel()}, {K})")
        if not (math.isfinite(self.max_log_gate) and 0 < self.max_log_gate <= MAX_LOG_GATE_LIMIT):
            raise ControllerError(f"max_log_gate must be a positive number up to {MAX_LOG_GATE_LIMIT:g}, "
                                  f"got {self.max_log_gate}")
        if self.n_layers <= 0 or self.hidden_size <= 0:
            raise ControllerError("n_layers and hidden_size must be positive")
        if K > max_gates:
            raise ControllerError(f"too many gates: {K} > limit {max_gates}")
        if K > self.n_layers * self.hidden_size:
            raise ControllerError(f"too many gates: {K} > {self.n_layers} layers x {self.hidden_size} channels")
        if not torch.isfinite(self.raw).all():
            bad = int((~torch.isfinite(self.raw)).sum())
            raise ControllerError(f"{bad} gate value(s) are NaN or Inf")
        if K and (self.layer.min() < 0 or self.layer.max() >= self.n_layers):
            raise ControllerError(f"layer index out of range [0, {self.n_layers})")
        if K and (self.channel.min() < 0 or self.channel.max() >= self.hidden_size):
            raise ControllerError(f"channel index out of range [0, {self.hidden_size})")
        if torch.unique(self.keys()).numel() != K:
            raise ControllerError("duplicate (layer, channel) gates")
        return self

    def check_model(self, model, allow_model_mismatch: bool = False, tokenizer=None) -> "Controller":
        """Refuse to attach to a model with other weights or shape (or, given the tokenizer, one
        whose vocabulary or special tokens differ from the fit's), unless explicitly allowed."""
        from .models import find_decoder_layers, hidden_size, model_fingerprint, tokenizer_fingerprint

        n_layers = len(find_decoder_layers(model)[1])
        if (self.n_layers, self.hidden_size) != (n_layers, hidden_size(model)):
            raise ModelMismatchError(
                f"controller is for {self.n_layers} layers x {self.hidden_size} channels, "
                f"the model has {n_layers} x {hidden_size(model)}")
        want, have = self.meta.get("model_fingerprint"), model_fingerprint(model)
        if want != have and not allow_model_mismatch:
            raise ModelMismatchError(
                f"controller was fitted on another model (fingerprint {want} from "
                f"{self.meta.get('model_name')!r}, this model is {have}); "
                "pass --allow-model-mismatch / allow_model_mismatch=True to attach anyway")
        want = self.meta.get("tokenizer_fingerprint")  # absent in controllers made before it was recorded
        if tokenizer is not None and want and not allow_model_mismatch:
            have = tokenizer_fingerprint(tokenizer)
            if want != have:
                raise ModelMismatchError(
                    f"controller was fitted with another tokenizer (fingerprint {want}, EOS id "
                    f"{self.meta.get('eos_token_id')}; this one is {have}, EOS id {tokenizer.eos_token_id}); "
                    "pass --allow-model-mismatch / allow_model_mismatch=True to attach anyway")
        return self

    # ------------------------------------------------------------ files
    def _header(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "max_log_gate": self.max_log_gate,
                "n_layers": self.n_layers, "hidden_size": self.hidden_size, **self.meta}

    def to_bytes(self, fmt: str = "safetensors") -> bytes:
        # indices are stored as int32 (half the bytes of int64); read back as int64
        tensors = {"layer": self.layer.to(torch.int32).contiguous(), "channel": self.channel.to(torch.int32).contiguous(),
                   "raw": self.raw.contiguous()}
        if fmt == "safetensors":
            from safetensors.torch import save

            return save(tensors, metadata={"ntkmirror": json.dumps(self._header(), sort_keys=True)})
        if fmt == "pt":
            buf = io.BytesIO()
            torch.save({**tensors, "meta": self._header()}, buf)
            return buf.getvalue()
        raise ControllerError(f"unknown controller format {fmt!r} (safetensors or pt)")

    @classmethod
    def from_bytes(cls, data: bytes, fmt: str = "safetensors", source: str = "<bytes>") -> "Controller":
        try:
            if fmt == "safetensors":
                from safetensors.torch import load

                tensors = load(data)
                # metadata lives in the JSON header: 8-byte little-endian length, then JSON
                header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
                meta = json.loads(header.get("__metadata__", {}).get("ntkmirror", "{}"))
            elif fmt == "pt":
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                if not isinstance(obj, dict) or not isinstance(obj.get("meta", {}), dict):
                    raise ControllerError(f"{source}: not an ntkmirror controller")
                meta = obj.get("meta", {})
                tensors = {k: obj[k] for k in ("layer", "channel", "raw") if k in obj}
            else:
                raise ControllerError(f"unknown controller format {fmt!r}")
        except ControllerError:
            raise
        except pickle.UnpicklingError as e:
            raise ControllerError(f"{source}: refused: the file needs code to unpickle "
                                  f"(only plain tensors are loaded): {str(e).splitlines()[0]}") from None
        except Exception as e:  # truncated / garbage files
            raise ControllerError(f"{source}: not a readable {fmt} controller ({type(e).__name__}: {e})") from None
        missing = [k for k in ("layer", "channel", "raw") if k not in tensors]
        if missing:
            raise ControllerError(f"{source}: missing tensor(s) {missing}")
        if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ControllerError(f"{source}: layer/channel/raw must be tensors")
        # refuse what the constructor would silently coerce (float indices truncated, shapes flattened)
        t = {k: tensors[k] for k in ("layer", "channel", "raw")}
        if any(v.dim() != 1 for v in t.values()):
            raise ControllerError(f"{source}: layer/channel/raw must be 1-D tensors")
        if t["layer"].is_floating_point() or t["channel"].is_floating_point() or not t["raw"].is_floating_point():
            raise ControllerError(f"{source}: layer/channel must be integer tensors and raw a float tensor")
        if not isinstance(meta, dict):
            raise ControllerError(f"{source}: controller metadata must be a JSON object")
        meta = dict(meta)
        version = meta.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ControllerError(f"{source}: unsupported schema_version {version}")
        try:
            ctrl = cls(tensors["layer"], tensors["channel"], tensors["raw"],
                       max_log_gate=meta.pop("max_log_gate", DEFAULT_MAX_LOG_GATE),
                       n_layers=int(meta.pop("n_layers", 0)), hidden_size=int(meta.pop("hidden_size", 0)),
                       meta=meta)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ControllerError(f"{source}: bad controller fields ({e})") from None
        try:
            return ctrl.validate()
        except ControllerError as e:
            raise ControllerError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically; the format follows the suffix (.pt, else safetensors)."""
        path = Path(path)
        self.validate()
        data = self.to_bytes("pt" if path.suffix == ".pt" else "safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Controller":
        path = Path(path)
        if not path.is_file():
            raise ControllerError(f"{path}: no such controller file")
        return cls.from_bytes(path.read_bytes(), "pt" if path.suffix == ".pt" else "safetensors", str(path))

    def with_meta(self, **meta) -> "Controller":
        return replace(self, meta={**self.meta, **meta})


def new_meta(model, tokenizer=None, **extra) -> dict:
    """Identity metadata stamped on every controller made for `model` (and `tokenizer`)."""
    from .models import HOOK_SITE, find_decoder_layers, model_fingerprint, model_name, tokenizer_fingerprint

    if tokenizer is not None:
        extra = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                 **extra}
    return {"model_name": model_name(model),
            "model_revision": str(getattr(model.config, "_commit_hash", None) or ""),
            "model_fingerprint": model_fingerprint(model),
            "layer_path": find_decoder_layers(model)[0], "hook_site": HOOK_SITE,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
