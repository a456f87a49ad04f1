"""The fit path's speed-ups compute the same function as the plain code they replace."""

import pytest
import torch

from ntkmirror import objective
from ntkmirror.data import collate, encode_all, example_from_row
from ntkmirror.gates import RowGates, _gated, attach
from tiny import arithmetic_rows, tiny_model


@pytest.mark.parametrize("shape", [(3, 64), (64,), (1, 64)])
@pytest.mark.parametrize("precomputed", [False, True])
def test_fused_low_precision_gate_is_bit_identical(shape, precomputed):
    """bf16 h: one pass, no float32 copy, yet the same bits as (h.float() * exp(s)).to(bf16),
    forward and backward, including through a precomputed exp(s)."""
    g = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(3, 10, 64, generator=g).bfloat16().requires_grad_()
    s = (0.05 * torch.randn(*shape, generator=g)).requires_grad_()
    out = _gated(h, s, torch.exp(s) if precomputed else None)
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    h2, s2 = h.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    ref = (h2.float() * torch.exp(s2[:, None, :] if s2.dim() == 2 else s2)).to(torch.bfloat16)
    ref.backward(grad)
    assert torch.equal(out, ref) and torch.equal(h.grad, h2.grad) and torch.equal(s.grad, s2.grad)
    assert not torch.equal(out, h)  # the gate acted


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_loss_matches_plain_loss(tok, monkeypatch, compiled):
    """Above LOGITS_CHUNK logits the loss goes chunk by chunk with the gradient made in forward:
    same NLL, accuracy and gate gradients (float64: exact up to rounding), eager or compiled
    (the compiled element-wise math of FitConfig.compile; aot_eager here: same graph, no codegen)."""
    import contextlib

    model = tiny_model().double()
    batch = collate(encode_all(tok, [example_from_row(r) for r in arithmetic_rows(6)], 1024), tok.pad_token_id)

    def run(chunk):
        monkeypatch.setattr(objective, "LOGITS_CHUNK", chunk)
        s = torch.zeros(6, 2, 32, dtype=torch.float64, requires_grad=True)
        ctx = objective.compiled_head_loss(backend="aot_eager") if compiled and chunk < 2**40 else contextlib.nullcontext()
        with attach(model, RowGates([0, 1], s)), ctx:
            tl = objective.token_losses(model, batch)
        w = torch.rand(len(tl.nll), dtype=tl.nll.dtype, generator=torch.Generator().manual_seed(0))
        (tl.nll * w).sum().backward()  # any per-token upstream gradient, as group means give
        return tl, s.grad

    plain, g_plain = run(2**40)
    chunked, g_chunked = run(3 * model.config.vocab_size)  # three tokens a chunk
    assert len(plain.nll) > 6
    torch.testing.assert_close(chunked.nll, plain.nll, rtol=1e-12, atol=1e-12)
    assert torch.equal(chunked.correct, plain.correct) and torch.equal(chunked.row, plain.row)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation takes the same path without making gradients
        assert torch.equal(objective.token_losses(model, batch).correct, plain.correct)
    assert not compiled or (("backend", "aot_eager"),) in objective._COMPILED_HEAD_STATS


def test_backward_stops_below_the_lowest_gated_layer(tok):
    """Frozen weights: only the gated layer and those above it join the autograd graph."""
    model = tiny_model(layers=3)
    seen = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.requires_grad))
               for i, layer in enumerate(model.model.layers)]
    ids = torch.tensor([tok("Question: 1 + 2 = ?", add_special_tokens=False)["input_ids"]])
    s = torch.zeros(1, 1, 32, requires_grad=True)
    try:
        with attach(model, RowGates([1], s)):
            model(ids).logits.sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert seen == {0: False, 1: False, 2: True}  # layer 1's output joins the graph at its gate
    assert s.grad is not None and all(p.grad is None for p in model.parameters())


def test_compiled_layers_compute_the_same_gated_function_and_compile_once(tok):
    """Regional compilation: per-row gates still act (hooks stay outside the compiled forward),
    loss and gate gradients match eager, new gates and new shapes do not compile per layer
    or per step, and the model is eager again afterwards."""
    from torch._dynamo.utils import counters

    from ntkmirror.models import compiled_layers

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(layers=3)
    batches = [collate(encode_all(tok, [example_from_row(r) for r in arithmetic_rows(n, seed=n)], 1024),
                       tok.pad_token_id) for n in (4, 4, 4, 6)]
    g = torch.Generator().manual_seed(0)
    gates = [0.1 * torch.randn(b.input_ids.shape[0], 2, 32, generator=g) for b in batches]

    def step(batch, s):
        s = s.clone().requires_grad_()
        with attach(model, RowGates([0, 2], s)):
            tl = objective.token_losses(model, batch)
        tl.nll.sum().backward()
        return tl.nll.detach(), s.grad

    eager = [step(b, s) for b, s in zip(batches, gates)]
    with compiled_layers(model, backend="aot_eager"):
        compiled = [step(b, s) for b, s in zip(batches, gates)]
        with torch.no_grad():
            ungated = objective.token_losses(model, batches[0]).nll
    for (nll, grad), (nll_c, grad_c) in zip(eager, compiled):
        torch.testing.assert_close(nll_c, nll)
        torch.testing.assert_close(grad_c, grad)
    assert not torch.allclose(ungated, eager[0][0])  # the gates changed the loss under compile too
    # 3 layers x 4 steps + 1 no-grad pass; one graph per (input needs grad or not) x (static, then
    # dynamic shapes), plus the no-grad one: not one per layer or per step
    assert counters["stats"]["unique_graphs"] <= 5
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    torch.testing.assert_close(step(batches[0], gates[0])[0], eager[0][0])
