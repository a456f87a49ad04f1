"""Regenerate the bad-input corpus: `python tests/bad_inputs/make_corpus.py`.

Every file here is small and wrong in exactly one way; tests/test_bad_inputs.py drives each
through the CLI, the Python API, the store and the HTTP API and names the error it expects.
Controllers are shaped for the tests' tiny model (2 layers x 32 channels). The `.pt` whose
unpickling would run code is not stored here: tests build it in a fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save

HERE = Path(__file__).parent
L, H = 2, 32  # tests/tiny.py's default tiny model
META = {"schema_version": 1, "max_log_gate": 0.5, "n_layers": L, "hidden_size": H, "model_name": "tiny-llama-0",
        "model_fingerprint": "", "created": "2026-01-01T00:00:00Z"}  # fingerprint: filled in by the tests

# ---------------------------------------------------------------- training data (JSONL)
JSONL = {
    "malformed.jsonl": b'{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion" " b"}\n',
    "truncated.jsonl": b'{"prompt": "a", "completion": " b"}\n{"prompt": "Question: 1 + 2 = ?", "compl',
    "wrong_types.jsonl": b'{"prompt": 3, "completion": " b"}\n',
    "not_an_object.jsonl": b'[1, 2, 3]\n',
    "unknown_schema.jsonl": b'{"input": "a", "output": " b"}\n',
    "empty_completion.jsonl": b'{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": "   "}\n',
    "empty.jsonl": b"",
    "blank_lines.jsonl": b"\n\n  \n",
    "invalid_utf8.jsonl": b'{"prompt": "a", "completion": " b"}\n{"prompt": "caf\xe9 \xff", "completion": " b"}\n',
    "chat_ends_with_user.jsonl": b'{"messages": [{"role": "user", "content": "hi"}, '
                                 b'{"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]}\n',
    "chat_wrong_types.jsonl": b'{"messages": [{"role": "user", "content": 5}]}\n',
}


def controller(layer, channel, raw, meta=None, index_dtype=torch.int32) -> bytes:
    tensors = {"layer": torch.as_tensor(layer, dtype=index_dtype), "channel": torch.as_tensor(channel, dtype=index_dtype),
               "raw": torch.as_tensor(raw, dtype=torch.float32)}
    return save(tensors, metadata={"ntkmirror": json.dumps({**META, **(meta or {})})})


def controllers() -> dict[str, bytes]:
    ok = dict(layer=[0, 1, 1], channel=[3, 4, 5], raw=[1.0, -1.0, 0.5])
    good = controller(**ok)
    every = torch.arange(L * H)
    return {
        "nan.safetensors": controller([0, 1], [0, 1], [float("nan"), 1.0]),
        "inf.safetensors": controller([0, 1], [0, 1], [1.0, float("-inf")]),
        "layer_out_of_range.safetensors": controller([0, L], [0, 1], [1.0, 1.0]),
        "channel_out_of_range.safetensors": controller([0, 1], [0, H], [1.0, 1.0]),
        "negative_index.safetensors": controller([0, 1], [-1, 1], [1.0, 1.0]),
        "huge_index.safetensors": controller([0, 1], [2**40, 1], [1.0, 1.0], index_dtype=torch.int64),
        "duplicate_gates.safetensors": controller([1, 1], [7, 7], [1.0, -1.0]),
        "too_many_gates.safetensors": controller(torch.cat([every // H, every[:1] // H]),
                                                 torch.cat([every % H, every[:1] % H]), torch.ones(L * H + 1)),
        "length_mismatch.safetensors": controller([0, 1, 1], [0, 1], [1.0, 1.0]),
        "float_indices.safetensors": save({"layer": torch.tensor([0.5, 1.7]), "channel": torch.tensor([0, 1]),
                                           "raw": torch.tensor([1.0, 1.0])},
                                          metadata={"ntkmirror": json.dumps(META)}),
        "two_dimensional.safetensors": save({"layer": torch.tensor([[0, 1]]), "channel": torch.tensor([[0, 1]]),
                                             "raw": torch.tensor([[1.0, 1.0]])},
                                            metadata={"ntkmirror": json.dumps(META)}),
        "negative_max_log_gate.safetensors": controller(**ok, meta={"max_log_gate": -0.5}),
        "huge_max_log_gate.safetensors": controller(**ok, meta={"max_log_gate": 1e30}),
        "wrong_field_type.safetensors": controller(**ok, meta={"n_layers": "two"}),
        "metadata_not_object.safetensors": save({"layer": torch.tensor([0]), "channel": torch.tensor([0]),
                                                 "raw": torch.tensor([1.0])}, metadata={"ntkmirror": "[1, 2]"}),
        "metadata_not_json.safetensors": save({"layer": torch.tensor([0]), "channel": torch.tensor([0]),
                                               "raw": torch.tensor([1.0])}, metadata={"ntkmirror": "{not json"}),
        "future_schema.safetensors": controller(**ok, meta={"schema_version": 99}),
        "missing_raw.safetensors": save({"layer": torch.tensor([0]), "channel": torch.tensor([0])},
                                        metadata={"ntkmirror": json.dumps(META)}),
        "truncated.safetensors": good[: len(good) // 2],
        "header_too_large.safetensors": (2**62).to_bytes(8, "little") + b"{}",
        "garbage.safetensors": bytes(range(256)) * 4,
        "empty.safetensors": b"",
        # valid files, wrong model: another model's weights, and another model's shape
        "other_model.safetensors": controller(**ok, meta={"model_name": "someone-elses-model",
                                                          "model_fingerprint": "0" * 32}),
        "other_shape.safetensors": controller([0, 3], [0, 63], [1.0, 1.0], meta={"n_layers": 4, "hidden_size": 64}),
    }


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    (HERE / "jsonl").mkdir(exist_ok=True)
    (HERE / "controllers").mkdir(exist_ok=True)
    for name, data in JSONL.items():
        (HERE / "jsonl" / name).write_bytes(data)
    for name, data in controllers().items():
        (HERE / "controllers" / name).write_bytes(data)
    buf = __import__("io").BytesIO()
    torch.save([1, 2, 3], buf)  # a plain, safe pickle that is not a controller
    (HERE / "controllers" / "not_a_controller.pt").write_bytes(buf.getvalue())
    ids = ["../x", "../../etc/passwd", "a/b", "a\\b", "/abs", "..", ".", ".hidden", "", " ", "a b", "a:b", "a\nb",
           "a\x00b", "caf\u00e9", "%2e%2e", "x" * 129, "-lead", "ok/..", "CON\\..\\x"]
    (HERE / "ids.json").write_text(json.dumps(ids, indent=0) + "\n")


if __name__ == "__main__":
    main()
