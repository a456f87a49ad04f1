import pickle

import pytest
import torch

from ntkmirror import Controller, ForwardFineTuner
from ntkmirror.controller import new_meta
from ntkmirror.errors import ControllerError, ModelMismatchError
from ntkmirror.gates import attach
from tiny import tiny_model


def make_controller(model, k=10, seed=0, scale=1.0, max_log_gate=0.05):
    g = torch.Generator().manual_seed(seed)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    keys = torch.randperm(n_layers * hidden, generator=g)[:k]
    return Controller(keys // hidden, keys % hidden, scale * torch.randn(k, generator=g), max_log_gate,
                      n_layers=n_layers, hidden_size=hidden, meta=new_meta(model)).validate()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip_is_exact(tmp_path, model, tok, suffix):
    c = make_controller(model, k=20)
    path = c.save(tmp_path / f"c{suffix}")
    d = Controller.load(path)
    assert torch.equal(d.layer, c.layer) and torch.equal(d.channel, c.channel) and torch.equal(d.raw, c.raw)
    assert d.meta == c.meta and d.max_log_gate == c.max_log_gate
    ids = tok("Question: 12 + 30 = ?", return_tensors="pt").input_ids
    with attach(model, c):
        a = model(ids).logits
    with attach(model, d):
        b = model(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, model(ids).logits)  # the controller does something


def test_file_size_is_kilobytes(tmp_path, model):
    path = make_controller(model, k=60).save(tmp_path / "c.safetensors")
    assert path.stat().st_size < 4096


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.raw.__setitem__(0, float("nan")), "NaN or Inf"),
    (lambda c: c.raw.__setitem__(1, float("inf")), "NaN or Inf"),
    (lambda c: c.layer.__setitem__(0, 99), "layer index out of range"),
    (lambda c: c.channel.__setitem__(0, -1), "channel index out of range"),
    (lambda c: (c.layer.__setitem__(1, c.layer[0]), c.channel.__setitem__(1, c.channel[0])), "duplicate"),
])
def test_invalid_controller_files_are_refused(tmp_path, model, mutate, message):
    c = make_controller(model)
    mutate(c)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(c.to_bytes())  # bypass save()'s validation to get a bad file on disk
    with pytest.raises(ControllerError, match=message):
        Controller.load(path)


def test_too_many_gates(model):
    c = make_controller(model, k=50)
    with pytest.raises(ControllerError, match="too many gates"):
        c.validate(max_gates=10)


def test_truncated_and_missing_files(tmp_path, model):
    data = make_controller(model).to_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ControllerError, match="not a readable"):
        Controller.load(tmp_path / "t.safetensors")
    with pytest.raises(ControllerError, match="no such controller file"):
        Controller.load(tmp_path / "nope.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def test_pickle_that_needs_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"layer": torch.zeros(1), "channel": torch.zeros(1), "raw": torch.zeros(1), "x": _Evil(str(marker))},
               path)
    assert not marker.exists()
    with pytest.raises(ControllerError, match="refused"):
        Controller.load(path)
    assert not marker.exists()
    # and a raw pickle (not a torch zip) is refused the same way
    (tmp_path / "evil2.pt").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ControllerError):
        Controller.load(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_fingerprint_mismatch_refused_unless_allowed(tmp_path, model, tok):
    c = make_controller(model)
    other = tiny_model(seed=1)  # same shape, other weights
    with pytest.raises(ModelMismatchError, match="fitted on another model"):
        c.check_model(other)
    assert c.check_model(other, allow_model_mismatch=True) is c
    with pytest.raises(ModelMismatchError, match="layers"):
        c.check_model(tiny_model(layers=3))
    path = c.save(tmp_path / "c.safetensors")
    with pytest.raises(ModelMismatchError):
        ForwardFineTuner(other, tok).load(path)


def test_tokenizer_mismatch_refused_unless_allowed(tmp_path, model, tok):
    """A fit records the tokenizer (vocabulary, EOS, BOS); attaching under a tokenizer with another
    EOS is refused (the controller learned to stop with a different token), here and over the CLI."""
    import copy

    from ntkmirror import FitConfig, fit_controller
    from ntkmirror.data import example_from_row
    from ntkmirror.models import tokenizer_fingerprint
    from tiny import arithmetic_rows

    c = fit_controller(model, tok, [example_from_row(r) for r in arithmetic_rows(8)],
                       FitConfig(gates=8, steps=1, batch_size=4, score_batches=1, retain_kl=0.0, retain_nll=0.0),
                       progress=False)
    assert c.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and c.meta["eos_token_id"] == tok.eos_token_id
    assert c.check_model(model, tokenizer=tok) is c
    other = copy.deepcopy(tok)
    other.eos_token = "<|im_end|>"  # same vocabulary, another stop token: the cached fingerprint must not stick
    assert other.eos_token_id != tok.eos_token_id and tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    with pytest.raises(ModelMismatchError, match="another tokenizer"):
        c.check_model(model, tokenizer=other)
    assert c.check_model(model, allow_model_mismatch=True, tokenizer=other) is c
    assert c.check_model(model) is c  # no tokenizer given: the weights decide
    legacy = Controller(c.layer, c.channel, c.raw, c.max_log_gate, c.n_layers, c.hidden_size,
                        {k: v for k, v in c.meta.items() if k != "tokenizer_fingerprint"})
    assert legacy.check_model(model, tokenizer=other) is legacy  # made before the field existed
    path = c.save(tmp_path / "c.safetensors")
    with pytest.raises(ModelMismatchError, match="another tokenizer"):
        ForwardFineTuner(model, other).load(path)
    assert Controller.load(path).meta["tokenizer_fingerprint"] == c.meta["tokenizer_fingerprint"]


def test_fingerprint_is_dtype_independent(model):
    from ntkmirror.models import model_fingerprint

    fp32 = model_fingerprint(model)
    assert model_fingerprint(tiny_model(dtype=torch.bfloat16)) == fp32
    assert model_fingerprint(tiny_model(seed=3)) != fp32
