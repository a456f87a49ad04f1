import pytest
import torch

from ntkmirror import ForwardFineTuner
from ntkmirror.data import collate, encode_prompt
from ntkmirror.errors import ConfigError
from ntkmirror.gates import RowGates, attach, parse_layers, row_gates
from test_controller import make_controller
from tiny import tiny_model


def test_per_row_gates_match_each_row_alone(model, tok):
    prompts = ["Question: 12 + 30 = ?", "Answer: 77", "Hello world! The quick"]
    ctrls = [make_controller(model, k=40, seed=i, scale=3.0) for i in range(3)]
    ids = [encode_prompt(tok, p) for p in prompts]
    batch = collate([(x, 0) for x in ids], tok.pad_token_id)
    rg = row_gates([[(c, 1.0)] for c in ctrls], model.config.num_hidden_layers, model.config.hidden_size)
    with attach(model, rg):
        together = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    for i, (c, x) in enumerate(zip(ctrls, ids)):
        with attach(model, c):
            alone = model(torch.tensor([x])).logits[0]
        torch.testing.assert_close(together[i, : len(x)], alone, atol=1e-5, rtol=1e-5)
    # and the rows really differ from the base model
    base = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(together, base)


def test_row_composition_is_weighted_sum_clipped(model):
    a, b = make_controller(model, k=30, seed=0), make_controller(model, k=30, seed=1)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    rg = row_gates([[(a, 1.0), (b, 0.5)], [], [(a, 2.0)]], L, H)
    dense = torch.zeros(3, L, H)
    dense[0] = (a.to_dense() + 0.5 * b.to_dense()).clamp(-0.05, 0.05)
    dense[2] = (2 * a.to_dense()).clamp(-0.05, 0.05)
    full = torch.zeros(3, L, H)
    full[:, rg.layers] = rg.values
    torch.testing.assert_close(full, dense)


def test_hooks_removed_after_exception(model, tok):
    c = make_controller(model)
    ids = tok("Question: 1 + 1", return_tensors="pt").input_ids
    base = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with attach(model, c):
            model(ids)
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert torch.equal(model(ids).logits, base)


def test_base_model_is_never_a_child_of_the_controller(model, tok):
    tuner = ForwardFineTuner(model, tok, gates=8)
    assert not isinstance(tuner, torch.nn.Module)
    c = make_controller(model)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(c).values())
    ids = tok("x", return_tensors="pt").input_ids
    with attach(model, c) as hooks:
        model(ids)
        assert not isinstance(hooks, torch.nn.Module)
    assert sum(1 for _ in model.modules()) == sum(1 for _ in tiny_model().modules())


def test_bf16_small_gate_changes_output(tok):
    """|s| = 0.002: exp(s) rounds to exactly 1.0 in bf16, so the multiply must run in float32."""
    m = tiny_model(dtype=torch.bfloat16)
    H = m.config.hidden_size
    assert torch.exp(torch.tensor(0.002, dtype=torch.bfloat16)) == 1.0  # the pitfall is real
    ids = tok("Question: 12 + 30 = ?", return_tensors="pt").input_ids
    base = m(ids).logits
    gates = RowGates([0, 1], torch.full((2, H), 0.002))
    with attach(m, gates):
        gated = m(ids).logits
    assert not torch.equal(gated, base)


@pytest.mark.parametrize("spec, want", [("all", [0, 1, 2, 3]), ("last", [3]), ("last:2", [2, 3]),
                                        ("first:3", [0, 1, 2]), ("0,-1", [0, 3]), ("1", [1])])
def test_parse_layers(spec, want):
    assert parse_layers(spec, 4) == want


@pytest.mark.parametrize("spec", ["first", "last:0", "last:9", "first:0", "first:5", "first:x", "7", "a,b", ""])
def test_parse_layers_rejects(spec):
    with pytest.raises(ConfigError, match="unknown --layers spec"):
        parse_layers(spec, 4)


def test_row_gates_validate_in_memory_controllers(model):
    from ntkmirror.errors import ControllerError

    L, H = model.config.num_hidden_layers, model.config.hidden_size
    bad = make_controller(model)
    bad.raw[0] = float("nan")
    with pytest.raises(ControllerError, match="NaN"):
        row_gates([[(bad, 1.0)]], L, H)
    wide = make_controller(model)
    wide.layer[0] = L + 3
    with pytest.raises(ControllerError, match="layer index out of range"):
        row_gates([[(wide, 1.0)]], L, H)
    with pytest.raises(ControllerError, match="weights must be finite"):
        row_gates([[(make_controller(model), float("inf"))]], L, H)
