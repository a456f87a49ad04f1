"""The serving engine gives exactly the tokens of ntkmirror.evaluate.generate (greedy), with a
different composed controller on every row, ragged prompts and more prompts than one batch."""

import warnings

import pytest
import torch

from ntkmirror.engine import GenerationEngine
from ntkmirror.errors import ConfigError, ControllerError
from ntkmirror.evaluate import generate
from ntkmirror.gates import RowGates, row_gates
from test_controller import make_controller
from tiny import tiny_model

PROMPTS = ["Question: 12 + 30 = ?\nAnswer:", "Hello", "The quick brown fox jumps over the lazy dog. Hello world!",
           "Answer: 7", "Question: 99 + 1", "user assistant system", "x"]


def controllers(model, n=3):
    return [make_controller(model, k=48, seed=i, scale=3.0, max_log_gate=1.5) for i in range(n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_engine_matches_generate_with_mixed_row_gates(tok, attn):
    model = tiny_model(layers=3)
    model.config._attn_implementation = attn
    a, b, c = controllers(model)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    rows = [[(a, 1.0)], [], [(b, 1.0), (c, 0.5)], [(c, -1.0)], [(a, 0.5), (b, 0.5)], [(b, 2.0)], []]
    gates = row_gates(rows, L, H)
    engine = GenerationEngine(model, tok, max_batch=4, max_seq_len=80)  # 7 prompts: two batches
    want = generate(model, tok, PROMPTS, gates, max_new_tokens=12, batch_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert engine.generate(PROMPTS, gates, max_new_tokens=12) == want
    # the cache goes in under the argument name this transformers reads (`past_key_values` is deprecated in 5.2x)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    base = generate(model, tok, PROMPTS, None, max_new_tokens=12, batch_size=3)
    assert engine.generate(PROMPTS, None, max_new_tokens=12) == base
    # the gates really act, and a later call with other gates leaves no stale state behind
    assert sum(w != g for w, g in zip(want, base)) >= 3
    assert engine.generate(PROMPTS, gates, max_new_tokens=12) == want


def test_engine_shared_controller_and_token_ids(tok):
    model = tiny_model(layers=2)
    c = controllers(model, 1)[0]
    engine = GenerationEngine(model, tok, max_batch=8, max_seq_len=80)
    assert engine.generate(PROMPTS[:4], c, max_new_tokens=6) == generate(model, tok, PROMPTS[:4], c, max_new_tokens=6)
    # without an EOS the engine runs every row to max_new_tokens; with one it stops each row there
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    full = engine.generate_ids(ids, None, max_new_tokens=9, eos_token_id=None)
    assert [len(r) for r in full] == [9, 9, 9]
    stop = full[0][3]
    cut = engine.generate_ids(ids, None, max_new_tokens=9, eos_token_id=stop)
    assert cut[0] == full[0][: full[0].index(stop) + 1]


def test_engine_generations_match_generate_rows(tok):
    """What the Serve generator returns per row (text, token count, stopped) through the engine
    equals transformers' generate path, with one limit per row and an empty prompt."""
    from ntkmirror.data import encode_prompt
    from ntkmirror.evaluate import generate_rows

    model = tiny_model(layers=2)
    a, b, _ = controllers(model)
    prompts = PROMPTS[:5] + [""]
    rows = [[(a, 1.0)], [], [(b, 1.0)], [(a, -0.5), (b, 0.5)], [], [(a, 1.0)]]
    gates = row_gates(rows, model.config.num_hidden_layers, model.config.hidden_size)
    limits = [3, 12, 7, 1, 12, 5]
    engine = GenerationEngine(model, tok, max_batch=8, max_seq_len=80)
    got = engine.generations([encode_prompt(tok, p) for p in prompts], gates, limits)
    want = generate_rows(model, tok, prompts, gates, max_new_tokens=limits, batch_size=len(prompts))
    assert got == want
    assert all(g.new_tokens == k or g.stopped for g, k in zip(got, limits))  # each row cut to its own limit
    # a batch where no row has a controller (what the Serve generator builds then): the base model
    empty = row_gates([[], []], model.config.num_hidden_layers, model.config.hidden_size)
    ids = [encode_prompt(tok, p) for p in prompts[:2]]
    assert engine.generations(ids, empty, 6) == generate_rows(model, tok, prompts[:2], None, max_new_tokens=6)


def test_engine_rejects_bad_input(tok):
    model = tiny_model(layers=2)
    engine = GenerationEngine(model, tok, max_batch=2, max_seq_len=16)
    with pytest.raises(ConfigError, match="max_seq_len"):
        engine.generate(["Question: 12 + 30 = ? and a long prompt"], None, max_new_tokens=8)
    with pytest.raises(ControllerError, match="rows"):
        engine.generate(["a", "b", "c"], RowGates([0], torch.zeros(2, 1, model.config.hidden_size)), 2)
    with pytest.raises(ControllerError, match="layers"):
        engine.generate(["a"], RowGates([5], torch.zeros(1, model.config.hidden_size)), 2)
    with pytest.raises(ConfigError, match="CUDA"):
        GenerationEngine(model, tok, graphs=True)


def test_compiled_step_keeps_modes_apart(tok):
    """torch.compile does not guard on forward hooks: a gated call must not reuse the ungated
    compiled step (or the reverse), and new gates in the buffer must take effect."""
    model = tiny_model(layers=2)
    a, b, c = controllers(model)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    g1 = row_gates([[(a, 1.0)], [], [(b, 1.0), (c, 0.5)], [(c, -1.0)]], L, H)
    g2 = row_gates([[(b, 1.0)], [(a, 1.0)], [], [(c, 1.0)]], L, H)
    engine = GenerationEngine(model, tok, max_batch=4, max_seq_len=80, compile=True)
    for gates in (None, g1, g2, None):
        assert engine.generate(PROMPTS[:4], gates, 8) == generate(model, tok, PROMPTS[:4], gates, 8, batch_size=4)
