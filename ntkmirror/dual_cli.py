"""CLI commands of the NTK-dual research harness (dual-diagnose, fit-dual, secant).

Thin over `ntkmirror.dual` and `ntkmirror.secant`. `cli.py` imports this module while it is
itself being imported, so everything from `cli` is imported inside `register`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _write_json(path: Optional[Path], data: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def register(app) -> None:
    """Add the research commands to the `ntkmirror` Typer app."""
    from rich import box
    from rich.table import Table

    from .cli import FIT_OPTIONS, DeviceOpt, JsonOpt, MismatchOpt, ModelOpt, emit, load, load_controller, out
    from .errors import ConfigError

    opt = dict(  # options shared by dual-diagnose and fit-dual
        projection=typer.Option("target", "--projection", help="target | topk | full"),
        top_k=typer.Option(32, "--top-k", help="non-teacher tokens per position for --projection topk"),
        eta=typer.Option(1e-5, "--target-step-size", help="eta of the reversible full-weight SGD step"),
        jvp_mode=typer.Option("exact", "--jvp-mode", help="exact (forward-mode AD) | fd (finite differences)"),
        metric=typer.Option("identity", "--metric", help="identity | activation (M = mean h^2 * e^(2s))"),
        ridge=typer.Option(1e-4, "--ridge"),
        cg_iters=typer.Option(16, "--cg-iters"),
        cg_tol=typer.Option(1e-5, "--cg-tol"),
        param_filter=typer.Option(None, "--param-filter", help="regex: parameters that take the SGD step"),
        probes=typer.Option(2, "--probes", help="random probes for adjoint_error and symmetry_error"),
        dtype=typer.Option("float32", "--dtype", help="weights dtype (the step needs float32 or float64)"),
    )

    def config(cls, projection, top_k, eta, jvp_mode, metric, ridge, cg_iters, cg_tol, param_filter, probes, gates,
               layers, max_log_gate, score, score_batches, batch_size, max_length, seed, no_eos, **extra):
        return cls(projection=projection, top_k=top_k, target_step_size=eta, jvp_mode=jvp_mode, metric=metric,
                   ridge=ridge, cg_iters=cg_iters, cg_tol=cg_tol, param_filter=param_filter, probes=probes, gates=gates,
                   layers=layers, max_log_gate=max_log_gate, score=score, score_batches=score_batches,
                   batch_size=batch_size, max_length=max_length, seed=seed, add_eos=not no_eos, **extra).validate()

    @app.command("dual-diagnose")
    def dual_diagnose_cmd(
        support: Path = typer.Option(..., "--support", help="support JSONL: the batch of the SGD step"),
        calibration: Optional[Path] = typer.Option(None, "--calibration", help="JSONL where F is measured "
                                                   "(default: --support)"),
        controller: Optional[Path] = typer.Option(None, "--controller", help="gate basis and point s "
                                                  "(default: a fresh basis at s = 0)"),
        out_path: Optional[Path] = typer.Option(None, "--out", help="write the report as JSON"),
        model: Optional[str] = ModelOpt,
        projection: str = opt["projection"], top_k: int = opt["top_k"], eta: float = opt["eta"],
        jvp_mode: str = opt["jvp_mode"], metric: str = opt["metric"], ridge: float = opt["ridge"],
        cg_iters: int = opt["cg_iters"], cg_tol: float = opt["cg_tol"],
        param_filter: Optional[str] = opt["param_filter"], probes: int = opt["probes"],
        gates: int = FIT_OPTIONS["gates"], layers: str = FIT_OPTIONS["layers"],
        max_log_gate: float = FIT_OPTIONS["max_log_gate"], score: str = FIT_OPTIONS["score"],
        score_batches: int = FIT_OPTIONS["score_batches"], batch_size: int = FIT_OPTIONS["batch_size"],
        max_length: int = FIT_OPTIONS["max_length"], seed: int = FIT_OPTIONS["seed"],
        no_eos: bool = FIT_OPTIONS["no_eos"], allow_model_mismatch: bool = MismatchOpt,
        device: Optional[str] = DeviceOpt, dtype: str = opt["dtype"], as_json: bool = JsonOpt,
    ):
        """Can the gate basis realise the full-weight SGD logit field? (NTK-dual audit)"""
        from .data import load_jsonl_examples
        from .dual import DualConfig, dual_diagnose

        cfg = config(DualConfig, projection, top_k, eta, jvp_mode, metric, ridge, cg_iters, cg_tol, param_filter,
                     probes, gates, layers, max_log_gate, score, score_batches, batch_size, max_length, seed, no_eos)
        m, tok = load(model, device, dtype, quiet=as_json)
        c = load_controller(controller, m, allow_model_mismatch, tok) if controller else None
        sup = load_jsonl_examples(support, tok)
        cal = load_jsonl_examples(calibration, tok) if calibration else None
        rep = dual_diagnose(m, tok, sup, cal, c, cfg, progress=not as_json)
        rep["controller_path"] = str(controller) if controller else None
        _write_json(out_path, rep)
        emit(rep, as_json, lambda d: out.print(diagnosis_table(d, Table)))

    @app.command("fit-dual")
    def fit_dual_cmd(
        train: Path = typer.Option(..., "--train", help="training JSONL (support batches)"),
        out_path: Path = typer.Option(..., "--out", help="controller file (.safetensors or .pt)"),
        calibration: Optional[Path] = typer.Option(None, "--calibration", help="JSONL where F is measured "
                                                   "(default: --train)"),
        steps: int = typer.Option(8, "--steps", help="field-locked steps (one solve each)"),
        report: Optional[Path] = typer.Option(None, "--report", help="write the per-step report as JSON"),
        model: Optional[str] = ModelOpt,
        projection: str = opt["projection"], top_k: int = opt["top_k"], eta: float = opt["eta"],
        jvp_mode: str = opt["jvp_mode"], metric: str = opt["metric"], ridge: float = opt["ridge"],
        cg_iters: int = opt["cg_iters"], cg_tol: float = opt["cg_tol"],
        param_filter: Optional[str] = opt["param_filter"], probes: int = opt["probes"],
        gates: int = FIT_OPTIONS["gates"], layers: str = FIT_OPTIONS["layers"],
        max_log_gate: float = FIT_OPTIONS["max_log_gate"], score: str = FIT_OPTIONS["score"],
        score_batches: int = FIT_OPTIONS["score_batches"], batch_size: int = FIT_OPTIONS["batch_size"],
        max_length: int = FIT_OPTIONS["max_length"], seed: int = FIT_OPTIONS["seed"],
        no_eos: bool = FIT_OPTIONS["no_eos"],
        device: Optional[str] = DeviceOpt, dtype: str = opt["dtype"], as_json: bool = JsonOpt,
    ):
        """Field-locked pathwise fit: match the full-weight SGD field step by step, save a controller."""
        from .data import load_jsonl_examples
        from .dual import FitDualConfig, fit_dual

        if steps < 0:
            raise ConfigError(f"--steps must be >= 0, got {steps}")
        cfg = config(FitDualConfig, projection, top_k, eta, jvp_mode, metric, ridge, cg_iters, cg_tol, param_filter,
                     probes, gates, layers, max_log_gate, score, score_batches, batch_size, max_length, seed, no_eos,
                     steps=steps)
        m, tok = load(model, device, dtype, quiet=as_json)
        tr = load_jsonl_examples(train, tok)
        cal = load_jsonl_examples(calibration, tok) if calibration else None
        c, rep = fit_dual(m, tok, tr, cfg, cal, progress=not as_json)
        c.save(out_path)
        rep = {"out": str(out_path), "bytes": out_path.stat().st_size, **rep}
        _write_json(report, rep)

        def render(d):
            t = Table(title=f"fit-dual: {d['gates']} gates, projection {projection}, metric {metric}",
                      box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
            cols = {"step": "step", "support_nll": "NLL", "d_norm": "|d|", "u_norm": "|u|", "cg_iterations": "CG",
                    "range_residual": "range", "realized_residual": "realised", "field_residual": "field",
                    "clip_fraction": "clipped", "elapsed_seconds": "s"}
            for name in cols.values():
                t.add_column(name, justify="right")
            for r in d["steps"]:
                t.add_row(*(_g(r[k]) for k in cols))
            out.print(t)
            out.print(f"saved {d['gates']} gates to {d['out']} ({d['bytes']} bytes) in {d['seconds']:.1f}s; "
                      f"train NLL {d['train_nll_before']:.4f} -> {d['train_nll_after']:.4f}")

        emit(rep, as_json, render)

    @app.command("secant")
    def secant_cmd(
        controller: Path = typer.Option(..., "--controller"),
        eval_path: Path = typer.Option(..., "--eval", help="JSONL where F is measured"),
        fractions: str = typer.Option("0.25,0.5,1.0", "--fractions", help="points t on the ray t * s"),
        out_path: Optional[Path] = typer.Option(None, "--out", help="write the report as JSON"),
        model: Optional[str] = ModelOpt,
        projection: str = opt["projection"], top_k: int = opt["top_k"], jvp_mode: str = opt["jvp_mode"],
        batch_size: int = FIT_OPTIONS["batch_size"], max_length: int = FIT_OPTIONS["max_length"],
        no_eos: bool = FIT_OPTIONS["no_eos"], allow_model_mismatch: bool = MismatchOpt,
        device: Optional[str] = DeviceOpt, dtype: str = opt["dtype"], as_json: bool = JsonOpt,
    ):
        """Secant vs tangent along the controller ray, and tangent drift."""
        from .data import load_jsonl_examples
        from .secant import SecantConfig, secant_check

        try:
            fr = tuple(float(x) for x in fractions.split(","))
        except ValueError:
            raise ConfigError(f"--fractions must be a comma list of numbers, got {fractions!r}") from None
        cfg = SecantConfig(projection=projection, top_k=top_k, fractions=fr, jvp_mode=jvp_mode,
                           batch_size=batch_size, max_length=max_length, add_eos=not no_eos).validate()
        m, tok = load(model, device, dtype, quiet=as_json)
        c = load_controller(controller, m, allow_model_mismatch, tok)
        rep = secant_check(m, tok, c, load_jsonl_examples(eval_path, tok), cfg)
        rep["controller_path"] = str(controller)
        _write_json(out_path, rep)

        def render(d):
            t = Table(title=f"secant along t * s ({d['gates']} gates, |s| = {d['s_norm']:.3g}, "
                            f"projection {d['projection']})")
            for col in ("t", "|F(ts) - F(0)|", "|t B(0) s|", "secant error", "cosine"):
                t.add_column(col, justify="right")
            for r in d["fractions"]:
                t.add_row(_g(r["fraction"]), _g(r["displacement_norm"]), _g(r["tangent_norm"]),
                          _g(r["secant_error"]), _g(r["cosine"]))
            out.print(t)
            out.print(f"tangent drift |B(s)s - B(0)s|/|B(0)s| = {_g(d['tangent_drift'])} "
                      f"(cosine {_g(d['tangent_drift_cosine'])}); midpoint error {_g(d['midpoint_error'])}")

        emit(rep, as_json, render)


def diagnosis_table(d: dict, Table):
    """The dual-diagnose report as a table, rows in reading order."""
    t = Table(title=f"NTK-dual diagnosis: {d['gates']} gates, F in R^{d['observable_dim']} "
                    f"(projection {d['projection']}), metric {d['metric']}, jvp {d['jvp_mode']}")
    for col in ("read", "number", "value"):
        t.add_column(col)
    h, rh = d["cg_residuals"], d["cg_range_residuals"]
    rows = [
        ("1 instrument", "adjoint_error", d["adjoint_error"]), ("", "symmetry_error", d["symmetry_error"]),
        ("2 CG", "cg_iterations", f"{d['cg_iterations']} ({'converged' if d['cg_converged'] else 'not converged'})"),
        ("", "cg_residuals", f"{_g(h[0])} -> {_g(h[-1])}"), ("", "cg_true_residual", d["cg_true_residual"]),
        ("", "cg_range_residuals", f"{_g(rh[0])} -> {_g(rh[-1])} (best {_g(min(rh))}, iteration {rh.index(min(rh))})"),
        ("3 range", "range_residual", d["range_residual"]), ("", "range_cosine", d["range_cosine"]),
        ("4 realisation", "realized_residual", d["realized_residual"]), ("", "realized_cosine", d["realized_cosine"]),
        ("5 clipping", "clip_fraction", d["clip_fraction"]), ("", "clip_norm_fraction", d["clip_norm_fraction"]),
        ("", "range_residual_clipped", d["range_residual_clipped"]), ("", "field_residual", d["field_residual"]),
        ("norms", "|d|  |u|  |Bu|  |u_clipped|",
         "  ".join(_g(d[k]) for k in ("d_norm", "u_norm", "Bu_norm", "u_clipped_norm"))),
        ("context", "support NLL / |grad|", f"{_g(d['support_nll'])} / {_g(d['grad_norm'])}"),
        ("", "step params / tokens (support, calibration)",
         f"{d['step_params']} / {d['support_tokens']}, {d['calibration_tokens']}"),
        ("", "elapsed_seconds", d["elapsed_seconds"]),
    ]
    for r in rows:
        t.add_row(r[0], r[1], _g(r[2]))
    return t
