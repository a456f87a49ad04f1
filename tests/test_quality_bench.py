"""The quality benchmark's pieces: task packs, the random-gate control, the retain-KL term,
composition rules, and a tiny end-to-end run (fit, PEFT baseline, pairs, memory, retrieval, report)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ntkmirror.controller import Controller
from ntkmirror.data import Example, collate, encode_all, load_jsonl_examples, pad_id
from ntkmirror.errors import ConfigError
from ntkmirror.fit import FitConfig, PackedGates, fit_controllers, retain_divergence
from ntkmirror.gates import attach
from ntkmirror.objective import supervised_logits, token_losses
from tiny import arithmetic_rows

from benchmarks.quality import compose_rule
from benchmarks.tasks.generate import MAIN_TASKS, check_disjoint, generate, load_manifest


def test_task_pack_is_seeded_hashed_and_disjoint(tmp_path):
    a = generate(tmp_path / "a", seed=0, n_train=32, n_eval=16)
    b = generate(tmp_path / "b", seed=0, n_train=32, n_eval=16)
    c = generate(tmp_path / "c", seed=1, n_train=32, n_eval=16)
    assert a["files"] == b["files"]  # same seed, same bytes
    assert a["files"]["addition/train.jsonl"] != c["files"]["addition/train.jsonl"]
    assert set(MAIN_TASKS) <= set(a["tasks"]) and len(a["tasks"]) >= 8
    kinds = {a["tasks"][t]["kind"] for t in MAIN_TASKS}
    assert kinds == {"procedural", "output-format", "style", "preference"}
    for t, spec in a["tasks"].items():
        train = [json.loads(l) for l in (tmp_path / "a" / spec["train"]).read_text().splitlines()]
        evals = [json.loads(l) for l in (tmp_path / "a" / spec["eval"]).read_text().splitlines()]
        assert (len(train), len(evals)) == (32, 16)
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
        assert all(r["query"] in spec["memory"]["queries"] for r in evals) and spec["memory"]["text"]
    # nine interference probes, each in the manifest with 32 rows or more (I, verse, since run 12)
    assert [k for k in a if k.startswith("unrelated")] == ["unrelated"] + [f"unrelated_{c}" for c in "bcdefghi"]
    assert all(a["files"][a[k]]["rows"] >= 32 for k in a if k.startswith("unrelated"))
    load_manifest(tmp_path / "a")  # hashes verify
    (tmp_path / "a" / "addition" / "eval.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(ValueError, match="sha256"):
        load_manifest(tmp_path / "a")


def test_overlapping_eval_items_are_an_error():
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint("t", [("p1", "c"), ("p2", "c")], [("p3", "c"), ("p2", "c")])


def test_random_selection_is_a_seeded_control(model, tok):
    data = [Example(**r) for r in arithmetic_rows(16)]
    cfg = dict(gates=20, steps=2, batch_size=4, score_batches=2)
    sal = fit_controllers(model, tok, [data], FitConfig(**cfg), progress=False)[0]
    rnd = fit_controllers(model, tok, [data], FitConfig(**cfg, score="random"), progress=False)[0]
    rnd2 = fit_controllers(model, tok, [data], FitConfig(**cfg, score="random"), progress=False)[0]
    assert rnd.num_gates == sal.num_gates == 20
    assert not torch.equal(rnd.keys(), sal.keys())
    assert torch.equal(rnd.keys(), rnd2.keys())


def _token_kl(model, tok, ctrl: Controller, examples) -> torch.Tensor:
    """KL(base || gated) at each completion token of examples, computed here from the logits."""
    batch = collate(encode_all(tok, examples, 256, True), pad_id(tok))
    with torch.no_grad():
        base = F.log_softmax(supervised_logits(model, batch)[0], -1)
        with attach(model, ctrl):
            gated = F.log_softmax(supervised_logits(model, batch)[0], -1)
    return (base.exp() * (base - gated)).sum(-1)


def _retain_kl(model, tok, ctrl: Controller, examples) -> float:
    return float(_token_kl(model, tok, ctrl, examples).mean())


def test_retain_kl_keeps_unrelated_text_closer_to_base(model, tok):
    train = [Example(**r) for r in arithmetic_rows(16, seed=1)]
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant")]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=2,
               retain_samples=0)
    free = fit_controllers(model, tok, [train], FitConfig(**cfg, retain_kl=0.0, retain_nll=0.0), progress=False)[0]
    kept = fit_controllers(model, tok, [train], FitConfig(**cfg, retain_kl=10.0), progress=False, retain=retain)[0]
    assert torch.equal(free.keys(), kept.keys())  # same selection: only the objective differs
    assert _retain_kl(model, tok, kept, retain) < 0.5 * _retain_kl(model, tok, free, retain)


def _retain_nll(model, tok, ctrl: Controller | None, examples) -> float:
    batch = collate(encode_all(tok, examples, 256, True), pad_id(tok))
    with attach(model, ctrl):
        return float(token_losses(model, batch).nll.mean())


def _two_gate_sets(model) -> PackedGates:
    """Two packed controllers on layer 1, one on the even channels and one on the odd, every gate at 0."""
    H = model.config.hidden_size
    chans = [torch.arange(0, H, 2), torch.arange(1, H, 2)]
    return PackedGates([torch.zeros(len(c), dtype=torch.long) + 1 for c in chans], chans, H, 0.5, "cpu")


def _as_controller(model, gates: PackedGates, c: int) -> Controller:
    return gates.controller(c, n_layers=model.config.num_hidden_layers, hidden_size=model.config.hidden_size)


def test_retain_divergence_measures_kl_and_the_rise_of_the_texts_own_nll(model, tok):
    """retain_divergence's second number is the gated minus the base NLL of the retain text's own
    tokens, per controller; both numbers are 0 with every gate at 0."""
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant")]
    batch = collate(encode_all(tok, retain, 256, True), pad_id(tok))
    gates = _two_gate_sets(model)
    with torch.no_grad():
        kl, rise = retain_divergence(model, gates, batch)
        assert kl.abs().max() < 1e-6 and rise.abs().max() < 1e-5
        gates.raw.copy_(torch.randn(gates.raw.shape, generator=torch.Generator().manual_seed(0)))
        kl, rise = retain_divergence(model, gates, batch)
    base = _retain_nll(model, tok, None, retain)
    for c in range(2):
        assert float(rise[c]) == pytest.approx(_retain_nll(model, tok, _as_controller(model, gates, c),
                                                           retain) - base, abs=1e-4)
        assert float(kl[c]) == pytest.approx(_retain_kl(model, tok, _as_controller(model, gates, c),
                                                        retain), abs=1e-4)


def test_kl_power_mean_leans_on_the_tokens_moved_most(model, tok):
    """retain_kl_power p: the KL term is (mean KL^p)^(1/p) over each controller's retain tokens; at
    the base model (every KL 0) its gradient is finite; and a fit with it holds the worst token down."""
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant")]
    batch = collate(encode_all(tok, retain, 256, True), pad_id(tok))
    gates = _two_gate_sets(model)
    kl, _ = retain_divergence(model, gates, batch, kl_power=2.0)
    kl.sum().backward()
    assert torch.isfinite(gates.raw.grad).all()
    with torch.no_grad():
        gates.raw.copy_(torch.randn(gates.raw.shape, generator=torch.Generator().manual_seed(0)))
        mean_kl, _ = retain_divergence(model, gates, batch)
        for p in (2.0, 4.0):
            kl_p, _ = retain_divergence(model, gates, batch, kl_power=p)
            for c in range(2):
                k = _token_kl(model, tok, _as_controller(model, gates, c), retain)
                assert float(kl_p[c]) == pytest.approx(float(k.pow(p).mean() ** (1 / p)), rel=1e-3)
                assert float(kl_p[c]) > 1.01 * float(mean_kl[c])  # the tokens do not all move alike
    train = [Example(**r) for r in arithmetic_rows(16, seed=1)]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=2,
               retain_samples=0, retain_kl=2.0, retain_nll=0.0, selection_contrast=0.0)
    flat, tail = (fit_controllers(model, tok, [train], FitConfig(**cfg, retain_kl_power=p), progress=False,
                                  retain=retain)[0] for p in (1.0, 4.0))
    assert tail.meta["fit"]["retain_kl_power"] == 4.0
    assert _token_kl(model, tok, tail, retain).max() < 0.8 * _token_kl(model, tok, flat, retain).max()
    with pytest.raises(ConfigError, match="retain_kl_power"):
        FitConfig(retain_kl_power=0.5).check()


def test_retain_nll_keeps_the_retain_texts_nll_from_rising(model, tok):
    """retain_nll penalises a rise of the retain text's own NLL (a first-order change the KL, second
    order at the base model, barely resists): with it the rise is much smaller, same gates."""
    train = [Example(**r) for r in arithmetic_rows(16, seed=1)]
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant")]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=2,
               retain_samples=0, retain_kl=0.0, selection_contrast=0.0)
    free = fit_controllers(model, tok, [train], FitConfig(**cfg, retain_nll=0.0), progress=False, retain=retain)[0]
    kept = fit_controllers(model, tok, [train], FitConfig(**cfg, retain_nll=30.0), progress=False, retain=retain)[0]
    assert torch.equal(free.keys(), kept.keys())  # same selection: only the objective differs
    base = _retain_nll(model, tok, None, retain)
    rise_free, rise_kept = (_retain_nll(model, tok, c, retain) - base for c in (free, kept))
    assert rise_free > 0.05  # the task alone does move the retain text
    assert rise_kept < 0.5 * rise_free
    with pytest.raises(Exception, match="retain_nll"):
        FitConfig(retain_nll=-1.0).check()


def _row_nll(model, tok, ctrl: Controller | None, examples) -> torch.Tensor:
    """Each example's mean NLL over its completion tokens, computed here one row at a time."""
    with attach(model, ctrl):
        return torch.stack([token_losses(model, collate(encode_all(tok, [ex], 256, True), pad_id(tok))).nll.mean()
                            for ex in examples])


def test_row_hinge_lets_no_retain_row_pay_for_another(model, tok):
    """retain_nll_hinge "row": the rise term is the mean over rows of each row's own mean rise hinged
    at 0 (checked against rows scored one by one), so a row whose NLL falls does not offset one whose
    NLL rises; and a fit with it holds the worst row's rise lower than the hinge on the whole text."""
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant"),
              Example("Paris is the capital of", " France, and Rome that of Italy.")]
    batch = collate(encode_all(tok, retain, 256, True), pad_id(tok))
    gates = _two_gate_sets(model)
    base = _row_nll(model, tok, None, retain)
    with torch.no_grad():
        gates.raw.copy_(torch.randn(gates.raw.shape, generator=torch.Generator().manual_seed(0)))
        _, text_rise = retain_divergence(model, gates, batch)
        _, row_rise = retain_divergence(model, gates, batch, hinge_rows=True)
        for c in range(2):
            rises = _row_nll(model, tok, _as_controller(model, gates, c), retain) - base
            assert float(row_rise[c]) == pytest.approx(float(rises.clamp_min(0).mean()), abs=1e-4)
        assert (row_rise >= text_rise.clamp_min(0) - 1e-6).all()  # a hinge inside the mean never weighs less
    train = [Example(**r) for r in arithmetic_rows(16, seed=1)]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=3,
               retain_samples=0, retain_kl=0.0, retain_nll=3.0, selection_contrast=0.0)
    text, per_row = (fit_controllers(model, tok, [train], FitConfig(**cfg, retain_nll_hinge=h), progress=False,
                                     retain=retain)[0] for h in ("text", "row"))
    assert per_row.meta["fit"]["retain_nll_hinge"] == "row" and torch.equal(text.keys(), per_row.keys())
    worst = [float((_row_nll(model, tok, c, retain) - base).max()) for c in (text, per_row)]
    assert worst[1] < worst[0]
    with pytest.raises(ConfigError, match="retain_nll_hinge"):
        FitConfig(retain_nll_hinge="token").check()


def test_pair_kl_keeps_a_composed_pair_closer_to_base(model, tok):
    """pair_kl takes the retain KL under each controller composed with a pack partner: the
    composed pair then moves the retain text less than a pair fitted with the single KL only."""
    from ntkmirror.compose import compose

    rows = [[Example(**r) for r in arithmetic_rows(16, seed=s)] for s in (1, 2)]
    sets = [rows[0], [Example(e.prompt, e.completion.upper()) for e in rows[1]]]
    retain = [Example("", "The quick brown fox jumps over the lazy dog."), Example("Hello", " world! user assistant")]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=2,
               retain_kl=1.0, selection_contrast=0.0)
    single = fit_controllers(model, tok, sets, FitConfig(**cfg), progress=False, retain=retain)
    paired = fit_controllers(model, tok, sets, FitConfig(**cfg, pair_kl=20.0), progress=False, retain=retain)
    assert all(torch.equal(a.keys(), b.keys()) for a, b in zip(single, paired))  # only the objective differs
    assert _retain_kl(model, tok, compose(paired)[0], retain) < 0.5 * _retain_kl(model, tok, compose(single)[0], retain)
    # a pack of one has no partner: pair_kl changes nothing
    alone = [fit_controllers(model, tok, sets[:1], FitConfig(**cfg, pair_kl=w), progress=False, retain=retain)[0]
             for w in (0.0, 20.0)]
    assert torch.equal(alone[0].raw, alone[1].raw)
    with pytest.raises(Exception, match="pair_kl"):
        FitConfig(pair_kl=-1.0).check()


def test_packed_pair_gates_compose_like_compose(model):
    """The pair gates the fit trains through (PackedGates.rows with partners) are the clipped sum
    that serving applies (row_gates / compose) to the same two controllers."""
    from ntkmirror.gates import row_gates

    L, H = 2, 8
    keys = [torch.tensor([0, 3, 9, 12]), torch.tensor([3, 5, 12, 15])]  # two shared gates
    g = PackedGates([k // H for k in keys], [k % H for k in keys], H, 0.2, "cpu")
    with torch.no_grad():
        g.raw.copy_(torch.tensor([[3.0, 2.0, -1.0, 0.5], [3.0, 0.1, 0.4, -2.0]]))  # gate 3: sum clipped
    ctrls = [g.controller(c, n_layers=L, hidden_size=H) for c in range(2)]
    got = g.rows(torch.tensor([0, 1]), torch.tensor([1, 0])).values.detach()
    want = row_gates([[(ctrls[0], 1.0), (ctrls[1], 1.0)]] * 2, L, H).values
    torch.testing.assert_close(got, want)
    assert float(got.abs().max()) == pytest.approx(0.2)  # the clip is applied


def test_composition_rules():
    def ctrl(keys, s):
        keys = torch.tensor(keys)
        return Controller.from_log_gates(keys // 8, keys % 8, torch.tensor(s), 0.2, n_layers=2, hidden_size=8)

    a, b = ctrl([1, 2, 3], [0.15, -0.1, 0.05]), ctrl([2, 3, 9], [-0.05, 0.15, 0.1])
    summed, rep = compose_rule([a, b], "sum")
    biggest, _ = compose_rule([a, b], "max")
    half, _ = compose_rule([a, b], "mean")
    dense = lambda c: c.to_dense().reshape(-1)  # noqa: E731
    assert torch.allclose(dense(summed)[[1, 2, 3, 9]], torch.tensor([0.15, -0.15, 0.2, 0.1]), atol=1e-5)
    assert rep["clipped"] == 0  # 0.05 + 0.15 sits exactly on the bound
    assert torch.allclose(dense(biggest)[[1, 2, 3, 9]], torch.tensor([0.15, -0.1, 0.15, 0.1]), atol=1e-5)
    assert torch.allclose(dense(half), 0.5 * dense(summed), atol=1e-5)
    shrunk, _ = compose_rule([a, b], "w0.8")
    assert torch.allclose(dense(shrunk)[[1, 2, 3, 9]], torch.tensor([0.12, -0.12, 0.16, 0.08]), atol=1e-5)
    shared, _ = compose_rule([a, b], "overlap-mean")  # keys 2 and 3 are shared: their mean; 1 and 9 kept
    assert torch.allclose(dense(shared)[[1, 2, 3, 9]], torch.tensor([0.15, -0.075, 0.1, 0.1]), atol=1e-5)
    c = ctrl([2, 3], [-0.08, -0.1])  # agrees with b on key 2 (-0.05), opposes it on key 3 (+0.15)
    strongest, _ = compose_rule([b, c], "sign-max")  # agreeing: the stronger; opposing: they cancel
    assert torch.allclose(dense(strongest)[[2, 3, 9]], torch.tensor([-0.08, 0.05, 0.1]), atol=1e-5)
    same, _ = compose_rule([b, b], "sign-max")  # a controller composed with itself is itself
    assert torch.allclose(dense(same), dense(b), atol=1e-6)


def test_quality_run_end_to_end_on_a_tiny_model(tmp_path):
    from benchmarks import quality

    generate(tmp_path / "tasks", seed=0, n_train=8, n_eval=2)
    out = tmp_path / "q"
    assert quality.main(["run", "--tiny", "--tasks", str(tmp_path / "tasks"), "--out", str(out), "--name", "r",
                         "--steps", "2", "--arms", "ctrl-5000,lora,kl5-c1-p5-split", "--rules", "sum,max", "--memory-rows", "2",
                         "--quiet", "--eval-batch", "16"]) == 0
    run = out / "r"
    res = json.loads((run / "results.json").read_text())
    arms = {(e["config"], e["task"]) for e in res["evals"]}
    for t in MAIN_TASKS:
        assert {("base", t), ("ctrl-5000", t), ("lora", t)} <= arms
    ctrl = next(e for e in res["evals"] if e["config"] == "ctrl-5000" and e["task"] == "addition")
    assert ctrl["pack"] == 8 and ctrl["stored_bytes"] > 0 and 0 <= ctrl["exact_match"] <= 1
    assert ctrl["gate_l2"] > 0 and ctrl["saturation"] == 0  # two steps moved the gates, none to the bound
    assert len(res["pairs"]) == 2 * 6 * 2 and {p["rule"] for p in res["pairs"]} == {"sum", "max"}
    # a config with packs fits each group apart: pairs say whether they were fitted together
    split = {(p["a"], p["b"]): p["same_pack"] for p in res["pairs"] if p["config"] == "kl5-c1-p5-split"}
    assert sorted(k for k, same in split.items() if same) == [("addition", "persona_pirate"),
                                                               ("json_person", "preference_miles")]
    assert all(p["same_pack"] for p in res["pairs"] if p["config"] == "ctrl-5000")
    assert next(e for e in res["evals"] if e["config"] == "kl5-c1-p5-split" and e["task"] == "addition")["pack"] == 2
    mem = res["memory"]["ctrl-5000"]
    assert len(mem["tasks"]) >= 8 and set(mem["matrix"]) == set(mem["tasks"])
    assert quality.main(["retrieval", str(run)]) == 0
    text = (run / "tables.md").read_text()
    assert "recall_at_1" in text and "| lora |" in text
    for f in ("results.csv", "pairs.csv", "configs.csv", "memory.csv", "quality_arms.png", "quality_memory.png",
              "quality_probes.png"):
        assert (run / f).stat().st_size > 0
    # every probe gets its own columns, computed from its own rows
    from benchmarks.report import config_summary

    row = next(r for r in config_summary(res) if r["config"] == "ctrl-5000")
    for k in ("unrelated_b", "unrelated_c"):
        base = next(e["nll"] for e in res["evals"] if e["config"] == "base" and e["task"] == k)
        pairs = [(p[k]["nll"] - base) / base for p in res["pairs"] if p["config"] == "ctrl-5000" and p["rule"] == "sum"]
        assert row[f"{k}_change_mean"] == pytest.approx(sum(pairs) / len(pairs))
        assert row[f"{k}_change_max"] == pytest.approx(max(pairs))
    assert row["unrelated_b_change_mean"] != row["unrelated_c_change_mean"]
    from benchmarks.report import task_rows

    per_task = {r["task"]: r for r in task_rows(res) if r["config"] == "ctrl-5000"}
    assert set(per_task) == set(MAIN_TASKS)
    sums = [p for p in res["pairs"] if p["config"] == "ctrl-5000" and p["rule"] == "sum"]
    base = next(e["nll"] for e in res["evals"] if e["config"] == "base" and e["task"] == "unrelated_c")
    for t, r in per_task.items():  # each task's numbers come from the 3 pairs it is in
        mine = [p for p in sums if t in (p["a"], p["b"])]
        assert len(mine) == 3 and r["unrelated_c_change_max"] == pytest.approx(max(
            (p["unrelated_c"]["nll"] - base) / base for p in mine))
    assert (run / "tasks.csv").stat().st_size > 0
    from benchmarks.report import additivity_rows

    split = next(r for r in additivity_rows(res) if r["config"] == "ctrl-5000" and r["probe"] == "unrelated_c")
    alone = {e["under"]: e["nll"] for e in res["evals"] if e["config"] == "ctrl-5000" and e["task"] == "unrelated_c"
             and "under" in e}
    p = next(p for p in sums if (p["a"], p["b"]) == (split["a"], split["b"]))
    assert split["rest"] == pytest.approx((p["unrelated_c"]["nll"] - alone[p["a"]] - alone[p["b"]] + base) / base)
    assert quality.main(["additivity", str(run), "--config", "ctrl-5000"]) == 0
    # re-scoring the saved controllers reproduces the run's sum-rule pairs, and scores other rules too
    assert quality.main(["rules", str(run), "--config", "ctrl-5000", "--tiny", "--tasks", str(tmp_path / "tasks"),
                         "--rules", "sum,w0.8"]) == 0
    again = json.loads((run / "rules.json").read_text())
    assert len(again) == 6 * 2 and {r["rule"] for r in again} == {"sum", "w0.8"}
    from benchmarks.report import pair_rows

    for p in pair_rows(res, "ctrl-5000", "sum", "unrelated_c"):
        r = next(x for x in again if (x["a"], x["b"], x["rule"]) == (p["a"], p["b"], "sum"))
        assert r["unrelated_c_change"] == pytest.approx(p["unrelated_change"], rel=1e-3, abs=1e-5)  # other batching
        if p["retained_a"] is not None:
            assert r["retained_a"] == pytest.approx(p["retained_a"], rel=1e-3)


def test_default_fit_keeps_to_the_bundled_retain_set_and_the_models_own_texts(model, tok):
    from pathlib import Path

    from ntkmirror.data import default_contrast_examples, default_retain_examples
    from ntkmirror.evaluate import sampled_retain_examples
    from ntkmirror.fit import kl_text

    def rows(examples):
        return [(e.prompt, e.completion) for e in examples]

    bundled, contrast_text = rows(default_retain_examples()), rows(default_contrast_examples())
    assert FitConfig().retain_kl > 0 and (len(bundled), len(contrast_text)) == (160, 32)
    assert bundled[:32] == contrast_text  # the bundled KL text is the contrast text plus three more files
    # the adopted default is the configuration run 13 measured (default-both-nll3): run 8's text and run 11's two
    # files, with the first-order term at 3
    from benchmarks.quality import CONFIGS, RUN8_KL_TEXT, _retain_source, fit_config, fit_texts

    measured = CONFIGS["default-both-nll3"]
    root = Path(__file__).resolve().parents[1]
    parts = measured["retain_set"].split("+")
    assert measured["retain_set"].startswith(RUN8_KL_TEXT) and parts.count("own") == 1
    assert rows(x for f in parts if f != "own" for x in load_jsonl_examples(root / f)) == bundled
    assert measured["contrast_set"] == "library"
    args = type("A", (), {"steps": FitConfig().steps, "batch_size": FitConfig().batch_size, "seed": 0})
    assert fit_config(measured, args, 0) == FitConfig()
    cfg = FitConfig(retain_samples=5, retain_sample_tokens=4)
    own = sampled_retain_examples(model, tok, 5, 4, seed=0)
    assert rows(kl_text(model, tok, cfg)) == bundled + rows(own)
    assert rows(_retain_source("sampled:5:4", tok, model)) == rows(own)  # no sample holds a probe here
    # the benchmark makes the KL text itself (to drop probe rows) and fits without more samples: "library" is
    # the library's own text, "default" run 8's (the two files of run 11 not in it), both with the model's texts
    manifest_retain = [Example("", "text")]
    for name, text in (("library", bundled), ("default", bundled[:64])):
        fit_cfg, retain, contrast = fit_texts(name, cfg, manifest_retain, tok, model)
        assert fit_cfg == replace(cfg, retain_samples=0) and rows(retain) == text + rows(own) and contrast is None
    assert fit_texts("library", replace(cfg, retain_samples=0), manifest_retain, tok, model) == (
        replace(cfg, retain_samples=0), None, None)  # the library's own
    assert fit_texts("kl5-c1", cfg, manifest_retain, tok, model) == (cfg, manifest_retain, manifest_retain)
    data = [Example(**r) for r in arithmetic_rows(8)]
    kw = dict(gates=8, steps=1, batch_size=4, score_batches=1, retain_samples=3, retain_sample_tokens=4)
    on = fit_controllers(model, tok, [data], FitConfig(**kw), progress=False)[0]
    off = fit_controllers(model, tok, [data], FitConfig(**kw, retain_kl=0.0, retain_nll=0.0, selection_contrast=0.0),
                          progress=False)[0]
    n_own = len(sampled_retain_examples(model, tok, 3, 4, seed=0))
    assert 0 < n_own <= 3 and (on.meta["fit"]["retain_examples"], on.meta["fit"]["contrast_examples"]) == (160 + n_own, 32)
    assert off.meta["fit"]["retain_examples"] == off.meta["fit"]["contrast_examples"] == 0
    given = fit_controllers(model, tok, [data], FitConfig(**kw), progress=False, retain=manifest_retain)[0]
    assert given.meta["fit"]["retain_examples"] == 1 + n_own  # the samples join a caller's retain set too
    # the retain set chooses the gates even without the KL term, and the record says so
    chooses = fit_controllers(model, tok, [data], FitConfig(**kw, retain_kl=0.0, retain_nll=0.0), progress=False)[0]
    assert (chooses.meta["fit"]["retain_examples"], chooses.meta["fit"]["contrast_examples"]) == (0, 32)
    for bad in (dict(retain_kl=-1.0), dict(retain_samples=-1), dict(retain_sample_tokens=0)):
        with pytest.raises(Exception, match=next(iter(bad))):
            FitConfig(**bad).check()


def test_retain_kl_on_all_tokens_covers_the_prompt(model, tok):
    """retain_tokens="all" takes the KL on the prompt tokens of a retain row as well, so a
    controller moves a retain text's prompt less than with the KL on its completion alone."""
    train = [Example(**r) for r in arithmetic_rows(24)]
    retain = [Example("The quick brown fox jumps over the lazy dog. Hello world!", " ok"),
              Example("user assistant system. The lazy dog jumps over the quick brown fox.", " ok")]
    whole = [Example("", ex.prompt + ex.completion) for ex in retain]
    cfg = dict(gates=64, steps=25, batch_size=4, score_batches=2, lr=5e-2, max_log_gate=0.5, retain_rows=2,
               retain_kl=10.0, retain_samples=0)
    completion = fit_controllers(model, tok, [train], FitConfig(**cfg), progress=False, retain=retain)[0]
    everywhere = fit_controllers(model, tok, [train], FitConfig(**cfg, retain_tokens="all"), progress=False,
                                 retain=retain)[0]
    assert _retain_kl(model, tok, everywhere, whole) < 0.85 * _retain_kl(model, tok, completion, whole)  # measured 0.72
    with pytest.raises(Exception, match="retain_tokens"):
        FitConfig(retain_tokens="prompt").check()


def test_sampled_retain_examples_are_seeded_model_text(model, tok):
    """The model's own samples as a retain set: seeded (same seed, same texts), from the openers,
    and usable as a fit's retain set."""
    from ntkmirror.evaluate import RETAIN_OPENERS, sampled_retain_examples

    a = sampled_retain_examples(model, tok, n=6, max_new_tokens=8, seed=3, batch_size=4)
    b = sampled_retain_examples(model, tok, n=6, max_new_tokens=8, seed=3, batch_size=4)
    c = sampled_retain_examples(model, tok, n=6, max_new_tokens=8, seed=4, batch_size=4)
    assert a == b and a != c and 0 < len(a) <= 6
    assert all(ex.prompt in RETAIN_OPENERS and ex.completion.strip() for ex in a)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sampled_retain_examples(model, tok, n=2, max_new_tokens=4, seed=3)  # every fit does this: the caller's RNG stays
    assert torch.equal(torch.rand(3), expected)
    train = [Example(**r) for r in arithmetic_rows(8)]
    cfg = FitConfig(gates=16, steps=2, batch_size=4, score_batches=1, retain_kl=1.0, retain_tokens="all",
                    retain_samples=0)
    ctrl = fit_controllers(model, tok, [train], cfg, progress=False, retain=a)[0]
    assert ctrl.meta["fit"]["retain_examples"] == len(a)


def test_retain_openers_choose_where_the_models_own_texts_start(model, tok):
    """FitConfig.retain_openers: the generic openers, no start at all (the model's unprompted text), a
    seeded random word of the vocabulary, or several kinds sharing the texts; bad kinds are refused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ntkmirror.errors import ConfigError
    from ntkmirror.evaluate import (LANGUAGE_OPENERS, RETAIN_OPENERS, retain_openers, sampled_retain_examples,
                                    vocab_words)
    from ntkmirror.fit import kl_text

    assert retain_openers(tok, "generic", 3) == list(RETAIN_OPENERS[:3])
    assert retain_openers(tok, "generic+none", 5) == list(RETAIN_OPENERS[:3]) + ["", ""]
    assert retain_openers(tok, "languages", 2) == list(LANGUAGE_OPENERS[:2])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the garden cat sat on the warm mat with a sleepy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    words_tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    words = vocab_words(words_tok)
    assert {"garden", "sleepy", "cat"} <= set(words) and all(w.isalpha() and len(w) >= 3 for w in words)
    drawn = retain_openers(words_tok, "vocab", 8, seed=1)
    assert drawn == retain_openers(words_tok, "vocab", 8, seed=1) and set(drawn) <= set(words)
    assert drawn != retain_openers(words_tok, "vocab", 8, seed=2)
    with pytest.raises(ConfigError, match="no word tokens"):
        retain_openers(tok, "vocab", 2)  # the tiny tokenizer holds digits and symbols only
    for bad in ("random", "generic+", ""):
        with pytest.raises(ConfigError, match="retain_openers"):
            FitConfig(retain_openers=bad).check()
    unprompted = sampled_retain_examples(model, tok, n=4, max_new_tokens=6, seed=0, openers="none")
    assert unprompted and all(ex.prompt == "" and ex.completion.strip() for ex in unprompted)
    cfg = FitConfig(retain_samples=4, retain_sample_tokens=6, retain_openers="none")
    assert kl_text(model, tok, cfg)[len(kl_text(model, tok, replace(cfg, retain_samples=0))):] == unprompted


def test_config_retain_joins_a_file_and_the_models_own_samples(model, tok, monkeypatch):
    """retain_set "file+sampled:N:T": the file's rows, then N samples of at most T tokens."""
    from ntkmirror.evaluate import sampled_retain_examples

    from benchmarks import quality

    monkeypatch.setitem(quality.CONFIGS, "joined", {"retain_set": "ntkmirror/retain.jsonl+sampled:4:6"})
    rows = quality.config_retain("joined", [], tok, model)
    bundled = load_jsonl_examples(Path(quality.__file__).resolve().parents[1] / "ntkmirror/retain.jsonl", tok)
    assert len(bundled) == 32 and rows[:32] == bundled
    samples = rows[32:]
    assert 0 < len(samples) <= 4 and samples == sampled_retain_examples(model, tok, n=4, max_new_tokens=6)
    hot = quality._retain_source("sampled:4:6:1.5", tok, model)  # a third field: the sampling temperature
    assert hot == sampled_retain_examples(model, tok, n=4, max_new_tokens=6, temperature=1.5) and hot != samples
    assert quality.config_retain("kl5-c1", ["manifest rows"], tok, model) == ["manifest rows"]


def test_run8_text_plus_a_file_is_that_kl_text_with_the_files_rows(model, tok):
    """retain_set "<run 8's files>+own+file": run 8's bundled rows, the file's rows, then the model's own
    texts exactly as the library samples them."""
    from ntkmirror.fit import FitConfig, kl_text

    from benchmarks import quality

    root = Path(quality.__file__).resolve().parents[1]
    cfg = FitConfig(retain_samples=3, retain_sample_tokens=5, seed=1)
    fit_cfg, rows, contrast = quality.fit_texts("default-langtext", cfg, [], tok, model)
    langs = load_jsonl_examples(root / "benchmarks/tasks/retain_languages.jsonl", tok)
    run8 = [ex for f in ("retain.jsonl", "retain_clauses.jsonl") for ex in load_jsonl_examples(root / "ntkmirror" / f)]
    assert len(langs) == 48 and len(run8) == 64 and rows[:64] == run8 and rows[64:64 + 48] == langs
    assert rows == quality.without_probes(kl_text(model, tok, cfg, run8 + langs)) and len(rows) > 64 + 48
    assert fit_cfg.retain_samples == 0 and contrast is None  # the samples are in rows; the library's contrast


def test_named_configs_pin_every_default_that_changed():
    """A named config means what it meant when it was measured: each one pins the fields whose
    FitConfig default moved since (lr, max_log_gate, retain_kl, selection_contrast, retain_rows, gates,
    retain_samples)."""
    from benchmarks.quality import CONFIGS

    for name, overrides in CONFIGS.items():
        if not name.startswith(("default", "library")):  # those follow FitConfig's defaults (default*: run 8's KL text)
            assert {"lr", "max_log_gate", "retain_kl", "selection_contrast", "retain_rows", "gates",
                    "retain_samples"} <= overrides.keys(), name
    assert CONFIGS["m0.2-lr2e-2-kl5"]["selection_contrast"] == 0.0 and CONFIGS["kl5-c1"]["selection_contrast"] == 1.0


def test_retain_sets_stay_apart_from_every_probe():
    """A retain set that holds a probe's prompt or template would train the KL term on the probe:
    refused, for every probe; the bundled and benchmark retain sets pass."""
    from pathlib import Path

    import re

    from ntkmirror.data import RETAIN_FILES

    from benchmarks.quality import CONFIGS
    from benchmarks.tasks.generate import FOREIGN_WORDS, LONG_WORDS, NAMES, check_retain_apart, probe_hits

    root = Path(__file__).resolve().parents[1]
    named = {c[k] for c in CONFIGS.values() for k in ("retain_set", "contrast_set") if k in c}
    files = {f for spec in named for f in spec.split("+") if not f.startswith("sampled:") and f not in ("library", "own")}
    assert files >= {"ntkmirror/retain.jsonl", "benchmarks/tasks/retain_facts.jsonl", "benchmarks/tasks/retain_phrases.jsonl"}
    bundled = {f"ntkmirror/{name}" for name in RETAIN_FILES}
    for f in files | bundled | {"benchmarks/tasks/retain_large.jsonl"}:
        check_retain_apart((root / f).read_text().splitlines(), f)
    # the files of runs 11-12 in the languages or shapes of probes F, H and E hold none of their answers' words either
    for f, probe in (("ntkmirror/retain_codeswitch.jsonl", FOREIGN_WORDS), ("ntkmirror/retain_longwords.jsonl", LONG_WORDS),
                     ("benchmarks/tasks/retain_languages.jsonl", FOREIGN_WORDS),
                     ("benchmarks/tasks/retain_names.jsonl", NAMES)):
        answers = {re.sub(r"[^\w']", "", c).lower() for _, c in probe}
        words = {w.lower() for line in (root / f).read_text().splitlines()
                 for w in re.findall(r"\w+", " ".join(json.loads(line).values()))}
        assert len(answers) == 32 and not answers & words, f
    for text in ("The capital of Chile is Santiago.", "Once upon a time there was a fox.", "The plural of cat is cats.",
                 "import numpy as np", "She locked the door.", "The Taj Mahal.", "Twinkle, twinkle, little star."):
        assert probe_hits([text]), text
        with pytest.raises(ValueError, match="probe prompts"):
            check_retain_apart([json.dumps({"prompt": "", "completion": text})], "r.jsonl")
    assert probe_hits(["A week has seven days."]) == []


def test_per_task_rows_handle_a_controller_that_gained_nothing():
    """Retention is undefined for a task whose single controller did not beat base (old runs have
    such arms): the per-task table leaves it empty instead of failing, and keeps the probe numbers."""
    from benchmarks.report import task_rows

    ev = lambda config, task, nll, **kw: {"config": config, "task": task, "nll": nll, **kw}  # noqa: E731
    results = {"evals": [ev("base", "a", 1.0), ev("base", "b", 2.0), ev("base", "unrelated", 1.0),
                         ev("c", "a", 1.5), ev("c", "b", 1.0)],
               "pairs": [{"config": "c", "rule": "sum", "a": "a", "b": "b", "clip_fraction": 0.0, "overlap": 0,
                          "jaccard": 0.0, "cosine": 0.0, "opposing_sign_overlap": 0,
                          "eval_a": {"nll": 1.2}, "eval_b": {"nll": 1.5}, "unrelated": {"nll": 1.1}}]}
    rows = {r["task"]: r for r in task_rows(results)}
    assert rows["a"]["retention_mean"] is None  # a got worse alone: no gain to retain
    assert rows["b"]["retention_mean"] == pytest.approx(0.5)  # (2.0 - 1.5) / (2.0 - 1.0)
    assert rows["a"]["unrelated_change_mean"] == rows["b"]["unrelated_change_max"] == pytest.approx(0.1)


def test_a_run_on_chosen_main_tasks_fits_and_scores_only_those(tmp_path, capsys):
    from benchmarks import quality

    generate(tmp_path / "tasks", seed=0, n_train=8, n_eval=2)
    common = ["run", "--tiny", "--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "q"), "--steps", "1",
              "--arms", "default-names-nll3", "--memory-configs", "none", "--quiet", "--eval-batch", "16"]
    assert quality.main(common + ["--name", "one", "--main-tasks", "addition"]) == 0
    res = json.loads((tmp_path / "q" / "one" / "results.json").read_text())
    scored = {(e["config"], e["task"]) for e in res["evals"] if "under" not in e}
    assert scored == {("base", "addition"), ("default-names-nll3", "addition")} | {
        ("base", k) for k in quality.PROBES}
    assert {e["under"] for e in res["evals"] if "under" in e} == {"addition"} and res["pairs"] == []
    assert res["meta"]["main_tasks"] == ["addition"]
    with pytest.raises(SystemExit) as e:  # a task the pack does not have: refused before any model loads
        quality.main(common + ["--name", "bad", "--main-tasks", "addition,sums"])
    assert e.value.code == 2 and "no task sums" in capsys.readouterr().err
    assert not (tmp_path / "q" / "bad").exists()


def test_additivity_splits_a_pairs_probe_change_into_its_controllers_own_and_the_rest(tmp_path, capsys):
    """A pair's probe change = change under a alone + under b alone + the rest; fit seeds of one
    config pool, each seed's single counted once however many pairs it is in."""
    from benchmarks import quality
    from benchmarks.report import additivity_rows, additivity_summary, seed_group

    assert [seed_group(c) for c in ("default-s2", "default", "kl5-c1-s10", "m0.2-lr2e-2", "x-sb")] == \
        ["default", "default", "kl5-c1", "m0.2-lr2e-2", "x-sb"]
    ev = lambda config, task, nll, **kw: {"config": config, "task": task, "nll": nll, **kw}  # noqa: E731
    pair = lambda config, a, b, nll: {"config": config, "rule": "sum", "a": a, "b": b, "unrelated_e": {"nll": nll}}  # noqa: E731
    results = {"evals": [ev("base", "unrelated_e", 2.0),
                         ev("c", "unrelated_e", 2.2, under="a"), ev("c", "unrelated_e", 2.0, under="b"),
                         ev("c", "unrelated_e", 1.9, under="d"),
                         ev("c-s1", "unrelated_e", 2.1, under="a"), ev("c-s1", "unrelated_e", 2.1, under="b")],
               "pairs": [pair("c", "a", "b", 2.3), pair("c", "a", "d", 2.1), pair("c-s1", "a", "b", 2.2),
                         {**pair("c", "b", "d", 9.9), "rule": "max"}]}  # another rule: not counted
    rows = additivity_rows(results)
    assert len(rows) == 3
    ab = next(r for r in rows if (r["config"], r["a"], r["b"]) == ("c", "a", "b"))
    assert (ab["change_a"], ab["change_b"], ab["change_pair"]) == pytest.approx((0.1, 0.0, 0.15))
    assert ab["rest"] == pytest.approx(0.05)  # 0.15 - 0.1 - 0.0
    by_probe, by_task = additivity_summary(rows)
    (only,) = by_probe
    assert only["config"] == "c" and only["pairs"] == 3
    # rests: (c, a, b) 0.05; (c, a, d) 0.05 - 0.1 - (-0.05) = 0; (c-s1, a, b) 0.1 - 0.05 - 0.05 = 0
    assert only["rest"] == pytest.approx(0.05 / 3) and only["rest_max_abs"] == pytest.approx(0.05)
    a = next(r for r in by_task if r["task"] == "a")
    assert a["seeds"] == 2 and a["alone"] == pytest.approx((0.1 + 0.05) / 2)  # seed c once, though in two pairs
    assert (a["alone_min"], a["alone_max"]) == pytest.approx((0.05, 0.1))
    assert a["in_pairs"] == pytest.approx((0.15 + 0.05 + 0.1) / 3)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": {}, "memory": {}, "skipped": [], **results}))  # a results.json
    assert quality.main(["additivity", str(path), "--config", "c"]) == 0
    out = capsys.readouterr().out
    assert "| c | unrelated_e | 3 |" in out and "| c | a | unrelated_e | 2 | +7.50% | +5.00% | +10.00% | +10.00% |" in out
    with pytest.raises(SystemExit) as e:  # nothing to split: an error, not an empty table
        quality.main(["additivity", str(path), "--config", "other"])
    assert e.value.code == 2
    other = json.loads(path.read_text())  # another task draw: the same config names, other scores
    other["evals"][1]["nll"] = 2.5
    (tmp_path / "draw1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        quality.main(["additivity", str(path), str(tmp_path / "draw1.json")])
    assert e.value.code == 2 and "one task draw at a time" in capsys.readouterr().err


def test_targets_read_the_three_numbers_per_task_probe_and_cell_over_fit_seeds(tmp_path, capsys):
    """Two fit seeds of one config on three tasks: a (task, probe) cell is the task's pairs' mean change,
    averaged over seeds with its standard error; a cell whose mean less two standard errors is still
    over +2 % is clearly over, one within that spread only over."""
    from benchmarks import quality
    from benchmarks.report import target_rows

    ev = lambda config, task, nll: {"config": config, "task": task, "nll": nll}  # noqa: E731
    single = {"a": (0.2, 0.4), "b": (0.1, 0.1), "d": (0.1, 0.1)}  # per task: seed 0, seed 1
    evals = [ev("base", "a", 2.0), ev("base", "b", 1.0), ev("base", "d", 1.0), ev("base", "unrelated", 1.0),
             ev("base", "unrelated_e", 2.0)] + [ev("lora", t, 0.0) for t in single]
    evals += [ev(c, t, nll[i]) for t, nll in single.items() for i, c in enumerate(("c", "c-s1"))]
    e_nll = {"c": {("a", "b"): 2.10, ("a", "d"): 2.06, ("b", "d"): 2.06},  # probe E: +5 %, +3 %, +3 %
             "c-s1": {("a", "b"): 2.08, ("a", "d"): 2.06, ("b", "d"): 1.96}}  # +4 %, +3 %, -2 %
    pairs = []
    for c, by_pair in e_nll.items():
        for (a, b), nll in by_pair.items():
            i = 0 if c == "c" else 1
            eval_a = 0.38 if (c, a, b) == ("c", "a", "b") else single[a][i]  # keeps 0.9 of a's gain
            pairs.append({"config": c, "rule": "sum", "a": a, "b": b, "clip_fraction": 0.0, "overlap": 0, "jaccard": 0.0,
                          "cosine": 0.0, "opposing_sign_overlap": 0.0, "eval_a": {"nll": eval_a},
                          "eval_b": {"nll": single[b][i]}, "unrelated": {"nll": 1.0}, "unrelated_e": {"nll": nll}})
    results = {"meta": {}, "memory": {}, "skipped": [], "evals": evals, "pairs": pairs}
    by_task, by_probe, cells = target_rows(results, "c")
    cell = {(r["task"], r["probe"]): r for r in cells}
    assert len(cells) == 6 and all(r["seeds"] == 2 for r in cells)
    ae, be, de = cell[("a", "unrelated_e")], cell[("b", "unrelated_e")], cell[("d", "unrelated_e")]
    assert (ae["change"], ae["se"]) == pytest.approx((0.0375, 0.0025))  # seeds 4 % and 3.5 %
    assert ae["over"] and ae["clearly_over"]
    assert (be["change"], be["se"]) == pytest.approx((0.025, 0.015))  # seeds 4 % and 1 %: within 2 se of +2 %
    assert be["over"] and not be["clearly_over"]
    assert de["change"] == pytest.approx(0.0175) and not de["over"]
    assert cell[("a", "unrelated")]["change"] == 0
    task = {r["task"]: r for r in by_task}
    assert (task["a"]["gain_share"], task["a"]["gain_share_min"]) == pytest.approx((0.85, 0.8)) and task["a"]["vs_lora"]
    assert (task["a"]["retention"], task["a"]["retention_min"]) == pytest.approx((0.975, 0.9))
    assert (task["a"]["probes_mean"], task["a"]["probes_max"], task["a"]["cells_over"]) == pytest.approx(
        (0.01875, 0.0375, 1))
    (a_probe, e_probe) = by_probe
    assert e_probe["pairs"] == 6 and e_probe["change"] == pytest.approx(0.16 / 6) and e_probe["over"]
    assert e_probe["change_max"] == pytest.approx(0.05) and not a_probe["over"]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    assert quality.main(["targets", str(path), "--config", "c"]) == 0
    out = capsys.readouterr().out
    assert "per task (mean over probes) 3/3, per probe (mean over pairs) 1/2, per (task, probe) cell 4/6" in out
    assert "clearly over (mean - 2 se above): 1" in out and "| a | unrelated_e | 2 | +3.75% | 0.25% | yes | yes |" in out
    with pytest.raises(SystemExit) as e:  # no pairs for that config: an error, not empty tables
        quality.main(["targets", str(path), "--config", "other"])
    assert e.value.code == 2 and "no composed pairs" in capsys.readouterr().err
    other = json.loads(path.read_text())  # another task draw: the same names, another base score
    other["evals"][0]["nll"] = 2.5
    (tmp_path / "draw1.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        quality.main(["targets", str(path), str(tmp_path / "draw1.json"), "--config", "c"])
    assert e.value.code == 2 and "one task draw at a time" in capsys.readouterr().err


def test_every_gpu_mode_names_known_arms():
    """quality_gpu.sh's modes run on a GPU host after minutes of setup: an arm or memory config
    that no longer exists must fail here, not there."""
    import re
    from pathlib import Path

    from benchmarks.quality import CONFIGS, PEFT

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "quality_gpu.sh").read_text()
    modes = re.findall(r"^\s*([\w]+)\) args=\((.*?)\) ;;", script, re.S | re.M)
    assert len(modes) >= 20
    for mode, args in modes:
        for flag in ("--arms", "--memory-configs"):
            m = re.search(flag + r"\s+(\S+)", args)
            names = [] if m is None else [n for n in m.group(1).split(",") if n not in ("none", "auto")]
            unknown = [n for n in names if n not in CONFIGS and n not in PEFT]
            assert not unknown, (mode, flag, unknown)


def test_probe_shift_splits_a_probes_change_by_place_in_the_answer(model, tok, tmp_path):
    """benchmarks.probe_shift: every answer token in exactly one place (first / later / punct), the
    whole change equal to the benchmark's teacher-forced one, and the CLI's table and JSON over every
    probe, controller and composed pair."""
    from benchmarks import probe_shift
    from benchmarks.tasks.generate import PROBES
    from ntkmirror.evaluate import row_shifts, teacher_forced

    rows = [Example("The capital of France is", " Paris."), Example("One, two,", " three"),
            Example("In French, thank you is", " merci.")]
    cfg = FitConfig(gates=24, steps=3, batch_size=4, score_batches=1, retain_samples=0, lr=0.5)
    ctrl = fit_controllers(model, tok, [[Example(**r) for r in arithmetic_rows(8)]], cfg, progress=False)[0]
    base, gated = probe_shift.token_scores(model, tok, rows), probe_shift.token_scores(model, tok, rows, ctrl)
    res = probe_shift.shift(base, gated, row_shifts(model, tok, rows, ctrl, add_eos=False))
    tf_base = teacher_forced(model, tok, rows, add_eos=False)
    tf_gated = teacher_forced(model, tok, rows, ctrl, add_eos=False)
    assert res["all_rel"] == pytest.approx((tf_gated["nll"] - tf_base["nll"]) / tf_base["nll"], rel=1e-4, abs=1e-7)
    assert res["all_rel"] != 0  # the controller moves the probe at all
    assert res["first"]["tokens"] == len(rows)
    assert sum(res[p]["tokens"] for p in ("first", "later", "punct") if p in res) == tf_base["tokens"]
    assert [b["place"] for b in base if b["row"] == 1][-1] != "punct"  # "three" ends on a word, not a stop
    assert len(res["raised_at_start"]) > 0

    generate(tmp_path / "tasks", seed=0, n_train=8, n_eval=2)
    out = tmp_path / "ps"
    assert probe_shift.main(["--tiny", "--tasks", str(tmp_path / "tasks"), "--out", str(out), "--steps", "1"]) == 0
    saved = json.loads((out / "probe_shift.json").read_text())
    assert len(saved["probes"]) == len(PROBES) and all(len(per) == 4 + 6 for per in saved["probes"].values())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(f"{t}.safetensors" for t in MAIN_TASKS)


def test_per_task_gate_budgets_fit_each_such_task_as_its_own_pack():
    from benchmarks.quality import CONFIGS, fit_packs

    tasks = ["addition", "json_person", "persona_pirate", "preference_miles", "persona_butler"]
    assert fit_packs("default-budgets", tasks) == [[t] for t in tasks[:4]] + [["persona_butler"]]
    assert fit_packs("default", tasks) == [tasks]
    assert fit_packs("kl5-c1-p5-split", tasks[:4]) == [["addition", "persona_pirate"], ["json_person", "preference_miles"]]
    assert set(CONFIGS["default-budgets"]["task_gates"]) <= set(tasks)
