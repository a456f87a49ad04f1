import pytest
import torch

from ntkmirror import Controller, compose, inspect_controllers
from ntkmirror.errors import ConfigError, ModelMismatchError
from test_controller import make_controller
from tiny import tiny_model


def test_compose_math_clip_and_report(model):
    a, b = make_controller(model, k=30, seed=0, scale=2), make_controller(model, k=30, seed=1, scale=2)
    c, rep = compose([a, b], weights=[1.0, -0.5])
    want = (a.to_dense() - 0.5 * b.to_dense()).clamp(-0.05, 0.05)
    torch.testing.assert_close(c.to_dense(), want, atol=1e-6, rtol=0)
    union = torch.unique(torch.cat([a.keys(), b.keys()])).numel()
    assert rep["union_gates"] == union and rep["output_gates"] == c.num_gates <= union
    assert rep["weights"] == [1.0, -0.5] and rep["max_log_gate"] == 0.05
    assert 0 <= rep["clip_fraction"] <= 1 and rep["clipped"] == int(
        ((a.to_dense() - 0.5 * b.to_dense()).abs() > 0.05).sum())
    assert {"overlap", "jaccard", "cosine", "opposing_sign_overlap"} <= set(rep["pairs"][0])
    assert c.meta["model_fingerprint"] == a.meta["model_fingerprint"]


def test_compose_clip_override_and_budget(model):
    big = make_controller(model, k=30, seed=0, scale=2)
    c, _ = compose([big, big], max_log_gate=0.02)
    assert c.log_gates().abs().max() <= 0.02 + 1e-7 and c.max_log_gate == 0.02
    small = make_controller(model, k=30, seed=0, scale=0.1)  # no clipping: the budget decides alone
    c, rep = compose([small, small], budget=10)
    assert c.num_gates == 10 and rep["budget_dropped"] == 20 and rep["clipped"] == 0
    top = small.keys()[torch.topk(small.log_gates().abs(), 10).indices]
    assert set(c.keys().tolist()) == set(top.tolist())


def test_compose_refuses_other_models_and_bad_weights(model):
    a = make_controller(model)
    b = make_controller(tiny_model(seed=1))
    with pytest.raises(ModelMismatchError, match="different models"):
        compose([a, b])
    with pytest.raises(ConfigError, match="weights"):
        compose([a, a], weights=[1.0])
    with pytest.raises(ConfigError):
        compose([])


def test_inspect_stats_and_warnings(model):
    a = make_controller(model, k=30, seed=0, scale=5)
    neg = Controller(a.layer, a.channel, -a.raw, a.max_log_gate, a.n_layers, a.hidden_size, dict(a.meta))
    rep = inspect_controllers([a, neg])
    s = rep["controllers"][0]
    assert s["gates"] == 30 and sum(s["layer_histogram"]) == 30 and s["saturation"] > 0.5
    p = rep["pairs"][0]
    assert p["overlap"] == 30 and p["jaccard"] == 1.0 and p["cosine"] == pytest.approx(-1.0)
    assert p["opposing_sign_overlap"] == 1.0
    text = " ".join(rep["warnings"])
    assert "opposite directions" in text and "cosine" in text and "clip bound" in text
