"""`ntkmirror` command line: fit, eval, shift, generate, compose, inspect (+ plugged-in groups).

Thin over the library. Errors from the library's error tree become one line on stderr and
the error's exit code; nothing is written when a command fails. Other packages of the
project (memory store, jobs, serving) add command groups through the `ntkmirror.cli`
entry-point group, so this core module never imports them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ConfigError, NtkMirrorError

app = typer.Typer(help="LoRA-free forward-pass fine-tuning with signed log-gate controllers.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

ModelOpt = typer.Option(None, "--model", help="HF id, local dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
JsonOpt = typer.Option(False, "--json", help="machine-readable JSON output")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
DtypeOpt = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: the model's)")
MismatchOpt = typer.Option(False, "--allow-model-mismatch", help="attach a controller fitted on another model")


def emit(data: dict, as_json: bool, render) -> None:
    if as_json:
        out.print_json(json.dumps(data, default=str))
    else:
        render(data)


def load(model: Optional[str], device=None, dtype=None, quiet: bool = False):
    from .models import load_model

    t0 = time.perf_counter()
    with err.status(f"loading {model or 'embedded SmolLM2-135M-Instruct'}...", spinner="dots") if not quiet else _null():
        m, tok = load_model(model, device=device, dtype=dtype)
    if not quiet:
        err.print(f"[dim]model loaded in {time.perf_counter() - t0:.1f}s[/dim]")
    return m, tok


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fit_config(gates, steps, lr, max_log_gate, layers, score_batches, batch_size, max_length, seed, score,
               no_eos, eval_every, patience, **optional):
    """A checked FitConfig from the fit options; `optional`: the other FIT_OPTIONS (None: FitConfig's default)."""
    from .fit import FitConfig

    for name, v in (("gates", gates), ("steps", steps), ("batch-size", batch_size), ("max-length", max_length),
                    ("score-batches", score_batches)):
        if v < (0 if name == "steps" else 1):
            raise ConfigError(f"--{name} must be positive, got {v}")
    if not (lr > 0 and max_log_gate > 0):
        raise ConfigError("--lr and --max-log-gate must be positive")
    if score not in ("abs", "coherent"):
        raise ConfigError(f"--score must be abs or coherent, got {score!r}")
    return FitConfig(gates=gates, steps=steps, lr=lr, max_log_gate=max_log_gate, layers=layers,
                     score_batches=score_batches, batch_size=batch_size, max_length=max_length, seed=seed,
                     score=score, add_eos=not no_eos, eval_every=eval_every, patience=patience,
                     **{k: v for k, v in optional.items() if v is not None}).check()


# Option declarations reused by every command that fits (fit, memory add, jobs fit).
FIT_OPTIONS = dict(
    gates=typer.Option(10000, "--gates", help="number of (layer, channel) log-gates"),
    steps=typer.Option(240, "--steps", help="AdamW steps on the gate values"),
    lr=typer.Option(2e-2, "--lr", help="learning rate"),
    max_log_gate=typer.Option(0.2, "--max-log-gate", help="bound on each signed log-gate"),
    layers=typer.Option("all", "--layers", help="all | last | last:N | first:N | comma list (negatives from the end)"),
    score_batches=typer.Option(16, "--score-batches", help="batches used to select gates"),
    batch_size=typer.Option(8, "--batch-size"),
    max_length=typer.Option(1024, "--max-length", help="truncate sequences from the left"),
    seed=typer.Option(0, "--seed"),
    score=typer.Option("abs", "--score", help="selection rule: abs (sum |g*h|) or coherent (|sum g*h|)"),
    no_eos=typer.Option(False, "--no-eos", help="do not append EOS to completions"),
    eval_every=typer.Option(0, "--eval-every", help="validation interval in steps (0: steps/10)"),
    patience=typer.Option(0, "--patience", help="early stop after N evaluations without gain (0: off)"),
    retain_kl=typer.Option(10.0, "--retain-kl", help="weight of KL-to-base on generic text: the bundled rows (or a "
                                                     "retain file) and the model's own samples (0: off)"),
    retain_samples=typer.Option(96, "--retain-samples", help="short texts the model writes itself, added to the "
                                                             "KL text (0: none)"),
    retain_nll=typer.Option(3.0, "--retain-nll", help="weight of the rise of the KL text's own NLL, a first-order "
                                                       "term beside the KL (0: off; with --retain-kl 0: the seed "
                                                       "objective)"),
    retain_rows=typer.Option(16, "--retain-rows", help="rows of the KL text per step"),
    retain_tokens=typer.Option("completion", "--retain-tokens", help="KL on the retain rows' completion tokens or "
                                                                     "on all their tokens"),
    selection_contrast=typer.Option(1.0, "--selection-contrast",
                                    help="choose gates away from channels the contrast text leans on: weight of its "
                                         "saliency subtracted at selection (0: off)"),
)


# the KL text from files, for every fitting command (data.retain_text)
RetainFileOpt = typer.Option(None, "--retain-file", help="JSONL of text to keep close to the base model "
                                                         "(default: the bundled set)")
RetainAddOpt = typer.Option(None, "--retain-add", help="JSONL added to that text (repeatable): the bundled set "
                                                       "or --retain-file stays")
ContrastFileOpt = typer.Option(None, "--contrast-file", help="JSONL whose channels gate selection avoids "
                                                             "(default: the bundled 32 rows)")


@app.command()
def fit(
    train: Path = typer.Option(..., "--train", help="training JSONL"),
    out_path: Path = typer.Option(..., "--out", help="controller file (.safetensors or .pt)"),
    validation: Optional[Path] = typer.Option(None, "--validation", help="validation JSONL (best checkpoint)"),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    as_json: bool = JsonOpt,
    gates: int = FIT_OPTIONS["gates"], steps: int = FIT_OPTIONS["steps"], lr: float = FIT_OPTIONS["lr"],
    max_log_gate: float = FIT_OPTIONS["max_log_gate"], layers: str = FIT_OPTIONS["layers"],
    score_batches: int = FIT_OPTIONS["score_batches"], batch_size: int = FIT_OPTIONS["batch_size"],
    max_length: int = FIT_OPTIONS["max_length"], seed: int = FIT_OPTIONS["seed"], score: str = FIT_OPTIONS["score"],
    no_eos: bool = FIT_OPTIONS["no_eos"], eval_every: int = FIT_OPTIONS["eval_every"],
    patience: int = FIT_OPTIONS["patience"], retain_kl: float = FIT_OPTIONS["retain_kl"],
    retain_samples: int = FIT_OPTIONS["retain_samples"], retain_nll: float = FIT_OPTIONS["retain_nll"],
    retain_rows: int = FIT_OPTIONS["retain_rows"], retain_tokens: str = FIT_OPTIONS["retain_tokens"],
    selection_contrast: float = FIT_OPTIONS["selection_contrast"],
    compile_fit: bool = typer.Option(False, "--compile", help="torch.compile the fit step: for long GPU fits of "
                                                               "larger models (the compile costs tens of seconds)"),
    retain_file: Optional[Path] = RetainFileOpt, retain_add: Optional[list[Path]] = RetainAddOpt,
    contrast_file: Optional[Path] = ContrastFileOpt,
):
    """Fit a controller on teacher-forced examples and save it."""
    from .data import load_jsonl_examples, retain_text
    from .fit import fit_controller
    from .gates import parse_layers
    from .models import find_decoder_layers

    cfg = fit_config(gates, steps, lr, max_log_gate, layers, score_batches, batch_size, max_length, seed, score,
                     no_eos, eval_every, patience, retain_kl=retain_kl, retain_samples=retain_samples,
                     retain_nll=retain_nll, retain_rows=retain_rows, retain_tokens=retain_tokens,
                     selection_contrast=selection_contrast, compile=compile_fit)  # checked before the model loads
    m, tok = load(model, device, dtype, quiet=as_json)
    parse_layers(layers, len(find_decoder_layers(m)[1]))  # fail before any work
    train_ex = load_jsonl_examples(train, tok)
    val_ex = load_jsonl_examples(validation, tok) if validation else None
    retain_ex = retain_text(retain_file, retain_add or (), tok)
    contrast_ex = load_jsonl_examples(contrast_file, tok) if contrast_file else None
    c = fit_controller(m, tok, train_ex, cfg, val_ex, progress=not as_json, retain=retain_ex, contrast=contrast_ex)
    c.save(out_path)
    f = c.meta["fit"]
    emit({"out": str(out_path), "gates": c.num_gates, "bytes": out_path.stat().st_size, **f}, as_json,
         lambda d: out.print(f"saved {d['gates']} gates to {d['out']} ({d['bytes']} bytes) in {d['seconds']:.1f}s; "
                             f"train NLL {d['train_nll_before']:.4f} -> {d['train_nll_after']:.4f}"))


def _metrics_table(title: str, rows: dict) -> Table:
    t = Table(title=title)
    for col in ("", "NLL", "token acc", "exact match", "examples"):
        t.add_column(col)
    for name, r in rows.items():
        t.add_row(name, f"{r['nll']:.4f}", f"{r['token_accuracy']:.3f}",
                  f"{r['exact_match']:.3f}" if "exact_match" in r else "-", str(r["examples"]))
    return t


def load_controller(path: Path, m, allow_mismatch: bool, tok=None):
    from .controller import Controller

    return Controller.load(path).check_model(m, allow_mismatch, tok)


@app.command("eval")
def eval_cmd(
    controller: Path = typer.Option(..., "--controller"),
    eval_path: Path = typer.Option(..., "--eval", help="evaluation JSONL"),
    model: Optional[str] = ModelOpt,
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(1024, "--max-length"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="for exact match (default: auto)"),
    no_exact: bool = typer.Option(False, "--no-exact-match", help="skip greedy generation"),
    no_eos: bool = typer.Option(False, "--no-eos"),
    allow_model_mismatch: bool = MismatchOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt,
):
    """Base vs controller on the same examples: NLL, token accuracy, exact match."""
    from .data import load_jsonl_examples
    from .evaluate import evaluate

    m, tok = load(model, device, dtype, quiet=as_json)
    c = load_controller(controller, m, allow_model_mismatch, tok)
    exs = load_jsonl_examples(eval_path, tok)
    kw = dict(batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens, exact=not no_exact,
              add_eos=not no_eos)
    res = {"base": evaluate(m, tok, exs, None, **kw), "controller": evaluate(m, tok, exs, c, **kw)}
    emit(res, as_json, lambda d: out.print(_metrics_table(f"{eval_path}", d)))


@app.command()
def shift(
    controller: Path = typer.Option(..., "--controller"),
    data: Path = typer.Option(..., "--data", help="JSONL of text the controller should leave alone"),
    model: Optional[str] = ModelOpt,
    rows: int = typer.Option(10, "--rows", help="rows to show, most moved first"),
    top: int = typer.Option(5, "--top", help="raised next tokens shown per row"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(1024, "--max-length"),
    no_eos: bool = typer.Option(False, "--no-eos", help="do not score an appended EOS"),
    allow_model_mismatch: bool = MismatchOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt,
):
    """Which rows a controller moves most (completion NLL, base vs gated) and which next tokens it
    raises where each completion begins: why a memory interferes with unrelated text."""
    from .data import load_jsonl_examples
    from .evaluate import row_shifts

    for name, value in (("--rows", rows), ("--top", top), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    m, tok = load(model, device, dtype, quiet=as_json)
    c = load_controller(controller, m, allow_model_mismatch, tok)
    exs = load_jsonl_examples(data, tok)
    per_row = row_shifts(m, tok, exs, c, batch_size, max_length, add_eos=not no_eos, top=top)
    tokens = sum(r["tokens"] for r in per_row)
    base, gated = sum(r["nll_base"] for r in per_row), sum(r["nll_gated"] for r in per_row)
    res = {"data": str(data), "examples": len(per_row), "tokens": tokens, "nll_base": base / tokens,
           "nll_gated": gated / tokens, "relative_change": (gated - base) / base if base else 0.0,
           "rows": sorted(per_row, key=lambda r: r["nll_base"] - r["nll_gated"])[:rows]}

    def render(d):
        out.print(f"{d['data']}: {d['examples']} rows, {d['tokens']} tokens, NLL {d['nll_base']:.4f} -> "
                  f"{d['nll_gated']:.4f} ({d['relative_change']:+.1%})")
        t = Table(title="rows moved most (NLL summed over the completion; raised: p base -> gated)")
        for col in ("#", "prompt", "completion", "NLL base", "gated", "change", "raised most"):
            t.add_column(col, overflow="fold")
        for r in d["rows"]:
            t.add_row(str(r["index"]), escape(repr(r["prompt"][-40:])), escape(repr(r["completion"][:24])),
                      f"{r['nll_base']:.2f}", f"{r['nll_gated']:.2f}", f"{r['nll_gated'] - r['nll_base']:+.2f}",
                      escape(", ".join(f"{x['token']!r} {x['p_base']:.3f}->{x['p_gated']:.3f}" for x in r["raised"])))
        out.print(t)

    emit(res, as_json, render)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt"),
    controller: Optional[Path] = typer.Option(None, "--controller", help="omit for the base model"),
    model: Optional[str] = ModelOpt,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
    full: bool = typer.Option(False, "--full", help="print prompt + continuation"),
    allow_model_mismatch: bool = MismatchOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, as_json: bool = JsonOpt,
):
    """Generate from a prompt with a controller attached (greedy by default)."""
    from .evaluate import generate as gen

    prompt = prompt.encode().decode("unicode_escape") if "\\n" in prompt else prompt
    m, tok = load(model, device, dtype, quiet=as_json)
    c = load_controller(controller, m, allow_model_mismatch, tok) if controller else None
    text = gen(m, tok, [prompt], c, max_new_tokens, temperature=temperature)[0]
    emit({"prompt": prompt, "text": text, "controller": str(controller) if controller else None}, as_json,
         lambda d: out.print((d["prompt"] if full else "") + d["text"], markup=False, highlight=False))


@app.command()
def compose(
    controllers: List[Path] = typer.Option(..., "--controllers", help="controller files"),
    out_path: Path = typer.Option(..., "--out"),
    weights: Optional[List[float]] = typer.Option(None, "--weights", help="one per controller (default 1)"),
    max_log_gate: Optional[float] = typer.Option(None, "--max-log-gate", help="clip (default: largest input's)"),
    budget: Optional[int] = typer.Option(None, "--budget", help="keep only the largest |s| gates"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the composition report as JSON"),
    as_json: bool = JsonOpt,
):
    """Add signed log-gates of several controllers, clip, and save the result."""
    from .compose import compose as do_compose
    from .controller import Controller

    cs = [Controller.load(p) for p in controllers]
    c, rep = do_compose(cs, weights or None, max_log_gate, budget)
    rep["inputs_paths"] = [str(p) for p in controllers]
    c.save(out_path)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(rep, indent=2))

    def render(d):
        out.print(f"composed {d['inputs']} controllers -> {d['output_gates']} gates in {out_path}; "
                  f"clipped {d['clip_fraction']:.2%}")
        for w in d["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")

    emit(rep, as_json, render)


@app.command()
def inspect(
    controllers: List[Path] = typer.Option(..., "--controllers", help="controller files"),
    as_json: bool = JsonOpt,
):
    """Per-controller stats and pairwise overlap, Jaccard, cosine, opposing signs."""
    from .compose import inspect_controllers
    from .controller import Controller

    rep = inspect_controllers([Controller.load(p) for p in controllers])

    def render(d):
        t = Table(title="controllers")
        for col in ("#", "file", "gates", "L2", "max |s|", "saturation", "layers used"):
            t.add_column(col)
        for i, (p, s) in enumerate(zip(controllers, d["controllers"])):
            t.add_row(str(i), str(p), str(s["gates"]), f"{s['l2']:.4f}", f"{s['max_abs']:.4f}",
                      f"{s['saturation']:.1%}", str(sum(1 for x in s["layer_histogram"] if x)))
        out.print(t)
        if d["pairs"]:
            t = Table(title="pairs")
            for col in ("a", "b", "overlap", "Jaccard", "cosine", "opposing"):
                t.add_column(col)
            for p in d["pairs"]:
                t.add_row(str(p["a"]), str(p["b"]), str(p["overlap"]), f"{p['jaccard']:.3f}", f"{p['cosine']:.3f}",
                          f"{p['opposing_sign_overlap']:.1%}")
            out.print(t)
        for w in d["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {escape(w)}")

    emit(rep, as_json, render)


from .dual_cli import register as _register_dual  # noqa: E402  research commands

_register_dual(app)


@functools.cache  # once per process: main() may run many times (tests), each copy rebuilt per call
def _plug_in_groups() -> None:
    """Add command groups that other installed packages register (memory, jobs, serve, ...)."""
    for ep in entry_points(group="ntkmirror.cli"):
        try:
            obj = ep.load()
        except ImportError as e:  # optional extras not installed
            app.command(ep.name, help=f"(unavailable: {e})")(_unavailable(ep.name, str(e)))
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            app.command(ep.name)(obj)


def _unavailable(name: str, reason: str):
    """A stand-in command for a group whose optional packages are missing."""
    def command():
        raise NtkMirrorError(f"'{name}' needs optional packages: {reason}")
    return command


def main(argv: list[str] | None = None) -> int:
    _plug_in_groups()
    try:
        app(args=argv, standalone_mode=False)
    except NtkMirrorError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
