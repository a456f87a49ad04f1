import pytest
import torch

from ntkmirror import FitConfig, ForwardFineTuner, fit_controller, fit_controllers
from ntkmirror.data import example_from_row
from ntkmirror.errors import ConfigError
from ntkmirror.fit import lr_factor
from ntkmirror.evaluate import exact_match, row_shifts, teacher_forced
from tiny import arithmetic_rows, tiny_model


def examples(n, seed):
    return [example_from_row(r) for r in arithmetic_rows(n, seed)]


def test_fit_lowers_training_nll(model, tok):
    train = examples(24, 1)
    cfg = FitConfig(gates=48, steps=40, lr=5e-2, max_log_gate=1.0, score_batches=2, batch_size=8)
    c = fit_controller(model, tok, train, cfg, progress=False)
    f = c.meta["fit"]
    assert f["train_nll_after"] < f["train_nll_before"] - 0.05
    assert c.num_gates == 48 and c.meta["data_hash"] and c.meta["model_fingerprint"]
    # the reported numbers are real: recompute them
    assert abs(teacher_forced(model, tok, train, c)["nll"] - f["train_nll_after"]) < 1e-4


def test_batched_multi_controller_fit_equals_separate_fits(tok):
    model = tiny_model().double()  # float64 makes the comparison crisp
    sets = [examples(12, s) for s in (1, 2, 3)]
    cfg = FitConfig(gates=20, steps=6, lr=1e-2, max_log_gate=0.3, score_batches=2, batch_size=4)
    together = fit_controllers(model, tok, sets, cfg, progress=False)
    for ds, c in zip(sets, together):
        alone = fit_controller(model, tok, ds, cfg, progress=False)
        assert torch.equal(alone.layer, c.layer) and torch.equal(alone.channel, c.channel)
        torch.testing.assert_close(alone.raw, c.raw, atol=1e-5, rtol=1e-4)
    # different data gives different gates: the pack did not share parameters
    assert not torch.allclose(together[0].raw, together[1].raw)


def test_validation_restores_best_and_seed_is_deterministic(model, tok):
    train, val = examples(16, 1), examples(8, 9)
    kw = dict(gates=16, steps=8, lr=5e-2, max_log_gate=0.5, score_batches=1, batch_size=4, eval_every=2)
    a = ForwardFineTuner(model, tok, **kw).fit(train, validation=val, progress=False)
    b = ForwardFineTuner(model, tok, **kw).fit(train, validation=val, progress=False)
    assert torch.equal(a.raw, b.raw)
    assert abs(teacher_forced(model, tok, val, a)["nll"] - a.meta["fit"]["val_nll_best"]) < 1e-4


def test_coherent_selection_rule_differs(model, tok):
    train = examples(16, 1)
    kw = dict(gates=10, steps=0, score_batches=2, batch_size=8)
    a = fit_controller(model, tok, train, FitConfig(score="abs", **kw), progress=False)
    b = fit_controller(model, tok, train, FitConfig(score="coherent", **kw), progress=False)
    assert a.num_gates == b.num_gates == 10
    assert not (torch.equal(a.layer, b.layer) and torch.equal(a.channel, b.channel))


def test_exact_match_reads_the_first_answer():
    assert exact_match(" 41\nQuestion: 1 + 1 = ?\nAnswer: 2", " 41")
    assert not exact_match(" 14 + 27 = 41", " 41")
    assert not exact_match(" 40\n41", " 41")
    assert exact_match("Step 1: 7\n  Answer:   41 ", "Step 1: 7\nAnswer: 41")
    assert not exact_match("", " 41")


def test_tuner_generate_and_evaluate(model, tok):
    tuner = ForwardFineTuner(model, tok, gates=16, lr=5e-2, max_log_gate=0.5, score_batches=1)
    tuner.fit(examples(8, 1), steps=3, progress=False)
    out = tuner.generate("Question: 12 + 30 = ?\nAnswer:", max_new_tokens=4)
    assert isinstance(out, str)
    res = tuner.evaluate(examples(4, 5), max_new_tokens=4)
    assert set(res) == {"base", "controller"}
    for r in res.values():
        assert {"nll", "token_accuracy", "exact_match", "examples"} <= set(r) and r["examples"] == 4
    assert res["base"]["nll"] != res["controller"]["nll"]


def test_contrast_scores_prefer_task_specific_channels():
    from ntkmirror.selection import contrast_scores

    task = torch.tensor([[[10.0, 10.0, 1.0, 1.0]]])  # channels 0, 1 matter for the task
    generic = torch.tensor([[10.0, 0.1, 1.0, 1.0]])  # channel 0 matters for every text
    plain = contrast_scores(task, generic, 0.0)
    assert torch.allclose(plain, task / task.mean())  # weight 0: the task's own ranking
    scored = contrast_scores(task, generic, 1.0)[0, 0]
    assert scored.argmax() == 1 and scored[0] < scored[1]


def test_selection_contrast_moves_gates_off_generic_channels(model, tok):
    """With selection_contrast, the chosen gates carry less saliency on the retain text than the
    plain top-k, and two controllers on different data share fewer gates."""
    from ntkmirror.data import Example, collate, default_contrast_examples, encode_all, pad_id
    from ntkmirror.gates import parse_layers
    from ntkmirror.models import find_decoder_layers, hidden_size
    from ntkmirror.selection import saliency_scores

    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world, how are you?"),
              Example("Question: what is 2 + 2?\nAnswer:", " 4")]
    sets = [examples(16, 1), [Example(e.prompt, e.completion.upper()) for e in examples(16, 2)]]
    kw = dict(gates=24, steps=0, score_batches=2, batch_size=8, retain_kl=0.0, retain_nll=0.0)
    plain = fit_controllers(model, tok, sets, FitConfig(**kw, selection_contrast=0.0), progress=False, contrast=retain)
    apart = fit_controllers(model, tok, sets, FitConfig(**kw, selection_contrast=2.0), progress=False, contrast=retain)
    layers = parse_layers("all", len(find_decoder_layers(model)[1]))
    enc = encode_all(tok, retain, 1024, True)
    generic = saliency_scores(model, [(collate(enc, pad_id(tok)), torch.zeros(len(enc), dtype=torch.long))],
                              1, layers, hidden_size(model))[0]

    def on_generic(c):
        return generic[c.layer, c.channel].sum().item()

    def shared(a, b):
        return len(set(zip(a.layer.tolist(), a.channel.tolist())) & set(zip(b.layer.tolist(), b.channel.tolist())))

    for p, a in zip(plain, apart):
        assert a.num_gates == p.num_gates == 24 and on_generic(a) < 0.8 * on_generic(p)
    assert shared(*apart) < shared(*plain)
    # the contrast text is apart from the KL's retain text: given as `contrast`, it alone chooses; not
    # given, the bundled contrast text does, whatever the retain text
    other = [Example("", "Colourless green ideas sleep furiously.")]
    cfg = FitConfig(**kw, selection_contrast=2.0)
    same = fit_controllers(model, tok, sets, cfg, progress=False, retain=other, contrast=retain)
    assert all(torch.equal(a.keys(), s.keys()) for a, s in zip(apart, same))
    assert same[0].meta["fit"]["contrast_examples"] == 3 and same[0].meta["fit"]["retain_examples"] == 0
    bundled = fit_controllers(model, tok, sets, cfg, progress=False, contrast=default_contrast_examples())
    for given in (other, retain, None):
        moved = fit_controllers(model, tok, sets, cfg, progress=False, retain=given)
        assert all(torch.equal(b.keys(), m.keys()) for b, m in zip(bundled, moved))
        assert moved[0].meta["fit"]["contrast_examples"] == 32
    assert not all(torch.equal(a.keys(), b.keys()) for a, b in zip(apart, bundled))
    with __import__("pytest").raises(Exception, match="selection_contrast"):
        FitConfig(selection_contrast=-1.0).check()


def test_row_shifts_add_up_to_the_teacher_forced_nll(model, tok):
    """Per-row shifts are the same numbers as teacher_forced, split by row, and each row's raised
    tokens are the largest probability gains at the completion's first position, largest first."""
    train, probe = examples(16, 1), examples(6, 7)
    c = fit_controller(model, tok, train, FitConfig(gates=32, steps=10, lr=5e-2, max_log_gate=0.5, score_batches=1,
                                                    batch_size=4), progress=False)
    rows = row_shifts(model, tok, probe, c, batch_size=4, top=3)  # 4: rows cross a batch boundary
    assert [r["index"] for r in rows] == list(range(6))
    tokens = sum(r["tokens"] for r in rows)
    for key, gates in (("nll_base", None), ("nll_gated", c)):
        tf = teacher_forced(model, tok, probe, gates)
        assert tf["tokens"] == tokens and abs(sum(r[key] for r in rows) / tokens - tf["nll"]) < 1e-4
    assert sum(abs(r["nll_gated"] - r["nll_base"]) for r in rows) > 1e-3  # the controller does move them
    for r in rows:
        gains = [x["p_gated"] - x["p_base"] for x in r["raised"]]
        assert len(gains) == 3 and gains == sorted(gains, reverse=True) and gains[0] > 0


def test_weight_decay_pulls_gates_the_loss_does_not_hold_toward_zero(model, tok):
    train = examples(16, 1)
    kw = dict(gates=32, steps=30, lr=5e-2, max_log_gate=0.5, score_batches=1, batch_size=8, retain_kl=0.0,
              retain_nll=0.0, selection_contrast=0.0)
    plain = fit_controller(model, tok, train, FitConfig(**kw), progress=False)
    decayed = fit_controller(model, tok, train, FitConfig(**kw, weight_decay=5.0), progress=False)
    assert torch.equal(plain.channel, decayed.channel)  # decay acts on the fit, not on the selection
    assert decayed.log_gates().abs().mean() < 0.8 * plain.log_gates().abs().mean()
    assert decayed.meta["fit"]["weight_decay"] == 5.0
    with pytest.raises(ConfigError, match="weight_decay"):
        FitConfig(weight_decay=-0.1).check()


def test_cosine_schedule_decays_the_step_size_to_zero(model, tok):
    assert lr_factor("cosine", 0, 40) == 1.0 and lr_factor("cosine", 20, 40) == pytest.approx(0.5)
    assert lr_factor("cosine", 39, 40) < 0.01 and lr_factor("constant", 39, 40) == 1.0
    train = examples(16, 1)
    kw = dict(gates=32, steps=30, lr=2e-2, max_log_gate=0.5, score_batches=1, batch_size=8, retain_kl=0.0,
              retain_nll=0.0, selection_contrast=0.0)
    plain = fit_controller(model, tok, train, FitConfig(**kw), progress=False)
    cosine = fit_controller(model, tok, train, FitConfig(**kw, lr_schedule="cosine"), progress=False)
    assert torch.equal(plain.channel, cosine.channel)  # the schedule acts on the fit, not on the selection
    # Adam moves each value about lr a step: the decayed steps add up to about half the distance
    assert cosine.raw.abs().mean() < 0.75 * plain.raw.abs().mean()
    assert cosine.meta["fit"]["lr_schedule"] == "cosine"
    assert cosine.meta["fit"]["train_nll_after"] < cosine.meta["fit"]["train_nll_before"]
    with pytest.raises(ConfigError, match="lr_schedule"):
        FitConfig(lr_schedule="linear").check()
