"""NTK-dual harness on tiny exact problems (float64 tiny Llama where precision matters)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ntkmirror import Controller
from ntkmirror.cli import main
from ntkmirror.data import collate, encode_all, example_from_row, pad_id
from ntkmirror.dual import (DualConfig, FitDualConfig, GateBasis, Observable, Tangent, conjugate_gradient,
                            diagnose_many, dual_diagnose, fit_dual, solve_field, target_field)
from ntkmirror.errors import ConfigError
from ntkmirror.secant import SecantConfig, secant_check
from tiny import arithmetic_rows, tiny_model

# An exact instrument: tiny ridge and tolerance, enough CG iterations for the whole range.
EXACT = DualConfig(ridge=1e-8, cg_iters=40, cg_tol=1e-6)


def examples(n, seed=0):
    return [example_from_row(r) for r in arithmetic_rows(n, seed)]


def problem(tok, projection="target", max_log_gate=0.05, top_k=4, rows=2, gates=8):
    """A float64 tiny model, a calibration batch and a gate basis spread over both layers."""
    model = tiny_model(dtype=torch.float64)
    batch = collate(encode_all(tok, examples(rows, seed=5), 64), pad_id(tok))
    basis = GateBasis(torch.arange(gates) % 2, torch.arange(gates) * 3 % 32, 2, 32, max_log_gate)
    return model, Observable(model, batch, basis, projection, top_k)


def in_range_target(obs, scale=1e-3, seed=0):
    """s, a target d = B u* that lies in the gate range, and F(s)."""
    g = torch.Generator().manual_seed(seed)
    s = 0.01 * torch.randn(obs.basis.size, generator=g, dtype=torch.float64)
    u_star = scale * torch.randn(obs.basis.size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return s, Tangent(obs, s).jvp(u_star), obs(s)


@pytest.mark.parametrize("projection,metric", [("target", "identity"), ("topk", "activation"),
                                               ("full", "identity")])
def test_clean_instrument_on_an_in_range_target(tok, projection, metric):
    _, obs = problem(tok, projection)
    s, d, F0 = in_range_target(obs)
    cfg = replace(EXACT, metric=metric)
    rep, s_next = solve_field(obs, s, d, F0, cfg)
    assert rep["adjoint_error"] < 1e-5 and rep["symmetry_error"] < 1e-5
    assert rep["cg_converged"] and rep["range_residual"] < 1e-4 and rep["range_cosine"] > 1 - 1e-8
    assert rep["cg_range_residuals"][-1] == pytest.approx(rep["range_residual"], abs=1e-6)  # tracked for free
    assert rep["realized_residual"] < 5e-3
    assert rep["clip_fraction"] == 0 and rep["field_residual"] == rep["realized_residual"]
    assert rep["cg_residuals"][0] == 1.0 and rep["cg_residuals"][-1] <= 1e-6
    assert rep["observable_dim"] == d.numel() and (s_next - s).norm() == pytest.approx(rep["u_norm"])


def test_box_clipping_never_helps(tok):
    _, obs = problem(tok, max_log_gate=2e-3)  # s sits near the edge of a box smaller than u
    s, d, _ = in_range_target(obs, scale=2e-3)
    s = 1.9e-3 * s.sign()
    with torch.no_grad():
        F0 = obs(s)
    rep, s_next = solve_field(obs, s, d, F0, EXACT)
    assert rep["clip_fraction"] > 0 and rep["clip_norm_fraction"] > 0
    assert s_next.abs().max() <= 2e-3
    assert rep["range_residual_clipped"] >= rep["range_residual"]
    assert rep["field_residual"] >= rep["realized_residual"]
    assert rep["u_clipped_norm"] < rep["u_norm"]


def test_cg_matches_a_direct_solve_of_the_dense_operator(tok):
    _, obs = problem(tok, "topk", top_k=3)
    s, d, _ = in_range_target(obs)
    tan = Tangent(obs, s)
    k, m = obs.basis.size, d.numel()
    B = torch.stack([tan.jvp(e) for e in torch.eye(k, dtype=torch.float64)], 1)  # (m, K) by JVPs
    Bt = torch.stack([tan.vjp(e) for e in torch.eye(m, dtype=torch.float64)], 1)  # (K, m) by VJPs
    assert (B.T - Bt).abs().max() < 1e-6 * B.abs().max()  # RMSNorm computes in float32, even in float64 models
    minv, ridge = 1.0 / obs.activation_metric(s), 1e-2  # K well conditioned: float32 norms inside
    K = B @ torch.diag(minv) @ B.T + ridge * torch.eye(m, dtype=torch.float64)
    d = d + 1e-3 * torch.randn(m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # off-range too
    a_cg, hist = conjugate_gradient(lambda a: tan.jvp(minv * tan.vjp(a)) + ridge * a, d, 2 * m, 1e-10)
    a_direct = torch.linalg.solve(K, d)
    assert hist[-1] <= 1e-10 and len(hist) - 1 <= m + 1
    assert (a_cg - a_direct).norm() < 1e-5 * a_direct.norm()


def test_fd_jvp_approximates_the_exact_one(tok):
    _, obs = problem(tok)
    s, _, _ = in_range_target(obs)
    v = torch.randn(obs.basis.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = Tangent(obs, s).jvp(v)
    errors = [((exact - Tangent(obs, s, "fd", eps).jvp(v)).norm() / exact.norm()).item() for eps in (1e-1, 1e-2)]
    assert errors[1] < 1e-3 and errors[1] < errors[0]  # O(eps^2) truncation


def test_topk_sets_never_repeat_the_teacher(tok):
    model, obs = problem(tok, "topk", top_k=8)
    y = obs.batch.labels[:, 1:][obs.batch.labels[:, 1:] != -100]
    assert obs.index.shape == (obs.tokens, 9) and torch.equal(obs.index[:, 0], y)
    assert all(len(set(row.tolist())) == 9 for row in obs.index)
    all_tokens = Observable(model, obs.batch, obs.basis, "topk", top_k=10_000)  # clamps to V - 1 others
    V = model.config.vocab_size
    assert all_tokens.index.shape[1] == V and all(len(set(r.tolist())) == V for r in all_tokens.index)
    with torch.no_grad():
        F = obs(torch.zeros(obs.basis.size, dtype=torch.float64)).view(obs.tokens, 9)
    assert F.sum(1).abs().max() < 1e-10  # recentred within each set


def test_diagnosis_leaves_every_weight_bit_identical(tok):
    model = tiny_model()  # float32: the real setting
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = DualConfig(batch_size=3, gates=16, score_batches=1, cg_iters=4, target_step_size=1e-3)
    rep = dual_diagnose(model, tok, examples(6), examples(3, seed=9), None, cfg)
    assert rep["d_norm"] > 0 and rep["step_params"] == sum(p.numel() for p in before.values())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_weights_are_restored_when_a_forward_fails_mid_step(tok):
    model, obs = problem(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def fail_on_third(module, args, output):  # forwards: gradient, F before, F after the step
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("forward failed after the step")

    handle = model.model.norm.register_forward_hook(fail_on_third)
    support = collate(encode_all(tok, examples(2), 64), pad_id(tok))
    try:
        with pytest.raises(RuntimeError, match="after the step"):
            target_field(model, obs, torch.zeros(8, dtype=torch.float64), support, 1e-2)
    finally:
        handle.remove()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_param_filter_restricts_the_step(tok):
    model, obs = problem(tok)
    support = collate(encode_all(tok, examples(2), 64), pad_id(tok))
    d_mlp, _, info = target_field(model, obs, torch.zeros(8, dtype=torch.float64), support, 1e-3, r"\.mlp\.")
    assert info["step_tensors"] == 6 and d_mlp.norm() > 0
    with pytest.raises(ConfigError, match="matches no parameter"):
        target_field(model, obs, torch.zeros(8, dtype=torch.float64), support, 1e-3, "nothing-like-this")


def test_half_precision_weights_and_bad_configs_are_refused(tok):
    with pytest.raises(ConfigError, match="float32"):
        dual_diagnose(tiny_model(dtype=torch.bfloat16), tok, examples(2), config=DualConfig(gates=4))
    for bad in (dict(projection="logits"), dict(metric="fisher"), dict(jvp_mode="auto"), dict(ridge=-1),
                dict(cg_iters=0), dict(param_filter="(")):
        with pytest.raises(ConfigError):
            DualConfig(**bad).validate()


def test_fit_dual_saves_a_controller_and_secant_reads_it(tok, tmp_path):
    model = tiny_model()
    cfg = FitDualConfig(steps=2, batch_size=3, gates=24, score_batches=1, cg_iters=6, target_step_size=1e-2)
    c, rep = fit_dual(model, tok, examples(9), cfg, progress=False)
    assert len(rep["steps"]) == 2 and [r["step"] for r in rep["steps"]] == [1, 2]
    assert all(r["adjoint_error"] < 1e-4 and r["field_residual"] >= 0 for r in rep["steps"])
    assert c.num_gates == 24 and c.log_gates().abs().max() <= c.max_log_gate and c.log_gates().abs().sum() > 0
    assert c.meta["fit"]["method"] == "fit-dual" and c.meta["fit"]["steps_run"] == 2
    loaded = Controller.load(c.save(tmp_path / "c.safetensors")).check_model(model)
    sec = secant_check(model, tok, loaded, examples(3, seed=4), SecantConfig(batch_size=3, fractions=(0.25, 1.0)))
    quarter, full = sec["fractions"]
    assert quarter["secant_error"] <= full["secant_error"] and full["cosine"] > 0.9
    assert sec["midpoint_error"] < full["secant_error"]  # second order beats first order
    assert 0 <= sec["tangent_drift"] < 1 and sec["tangent_drift_cosine"] > 0.9


def test_diagnose_many_reports_each_controller_and_keeps_going(tok):
    model = tiny_model()
    wrong = Controller([0], [1], [0.1], 0.05, n_layers=3, hidden_size=32)
    mine = Controller([0, 1], [3, 4], [0.2, -0.3], 0.05, n_layers=2, hidden_size=32)
    cfg = DualConfig(batch_size=2, gates=8, score_batches=1, cg_iters=3, metric="activation", projection="topk",
                     top_k=4)
    reps = diagnose_many(model, tok, [None, wrong, mine], examples(4), None, cfg)
    assert [r["index"] for r in reps] == [0, 1, 2]
    assert reps[0]["fresh_basis"] and reps[0]["gates"] == 8 and reps[0]["s_norm"] == 0
    assert "error" in reps[1] and "3 layers" in reps[1]["error"]
    assert reps[2]["gates"] == 2 and reps[2]["s_norm"] > 0 and len(reps[2]["cg_residuals"]) >= 2


def test_cli_dual_diagnose_fit_dual_secant(tiny_model_dir, train_file, eval_file, tmp_path):
    common = ["--model", str(tiny_model_dir), "--batch-size", "2", "--max-length", "64"]
    small = ["--gates", "12", "--score-batches", "1", "--cg-iters", "3", "--probes", "1", "--json"]
    report = tmp_path / "report.json"
    assert main(["dual-diagnose", *common, *small, "--support", str(train_file), "--calibration", str(eval_file),
                 "--projection", "topk", "--top-k", "4", "--out", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["gates"] == 12 and rep["projection"] == "topk" and "field_residual" in rep

    ctrl = tmp_path / "dual.safetensors"
    assert main(["fit-dual", *common, *small, "--train", str(train_file), "--out", str(ctrl), "--steps", "2",
                 "--target-step-size", "1e-2"]) == 0
    assert Controller.load(ctrl).num_gates == 12

    sec = tmp_path / "secant.json"
    assert main(["secant", *common, "--controller", str(ctrl), "--eval", str(eval_file), "--fractions", "0.5,1",
                 "--out", str(sec)]) == 0
    assert [r["fraction"] for r in json.loads(sec.read_text())["fractions"]] == [0.5, 1.0]

    assert main(["dual-diagnose", *common, "--controller", str(ctrl), "--support", str(train_file),
                 "--cg-iters", "2"]) == 0  # human-readable table

    bad = tmp_path / "bad.json"
    assert main(["dual-diagnose", *common, "--support", str(train_file), "--projection", "logits",
                 "--out", str(bad)]) != 0
    assert main(["secant", *common, "--controller", str(ctrl), "--eval", str(eval_file), "--fractions", "a,b"]) != 0
    assert not bad.exists()
