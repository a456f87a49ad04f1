"""The `ntkmirror` CLI end to end on a tiny model directory, and its bad-input contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from ntkmirror import Controller
from ntkmirror.cli import main
from ntkmirror.data import default_retain_examples
from ntkmirror.fit import FitConfig
from test_controller import make_controller
from tiny import tiny_model

FAST = ["--gates", "16", "--steps", "3", "--score-batches", "1", "--batch-size", "4"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_fit_eval_generate_compose_inspect(tmp_path, capsys, tiny_model_dir, train_file, eval_file):
    ctrl = tmp_path / "c.safetensors"
    code, out, _ = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl, *FAST,
                       "--validation", eval_file, "--json")
    assert code == 0, out
    rep = json.loads(out)
    assert rep["gates"] == 16 and rep["bytes"] == ctrl.stat().st_size and "train_nll_after" in rep
    assert Controller.load(ctrl).num_gates == 16

    code, out, _ = run(capsys, "eval", "--model", tiny_model_dir, "--controller", ctrl, "--eval", eval_file,
                       "--max-new-tokens", "3", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["base"]["examples"] == res["controller"]["examples"] == 6
    assert {"nll", "token_accuracy", "exact_match"} <= set(res["controller"])

    code, out, _ = run(capsys, "generate", "--model", tiny_model_dir, "--controller", ctrl,
                       "--prompt", "Question: 1 + 2 = ?\\nAnswer:", "--max-new-tokens", "3", "--json")
    assert code == 0 and json.loads(out)["prompt"] == "Question: 1 + 2 = ?\nAnswer:"

    pt = tmp_path / "c.pt"
    code, out, _ = run(capsys, "compose", "--controllers", ctrl, "--controllers", ctrl, "--out", pt,
                       "--weights", "1", "--weights", "0.5", "--report", tmp_path / "r.json")
    assert code == 0 and pt.exists() and json.loads((tmp_path / "r.json").read_text())["weights"] == [1.0, 0.5]

    code, out, _ = run(capsys, "inspect", "--controllers", ctrl, "--controllers", pt, "--json")
    assert code == 0 and len(json.loads(out)["controllers"]) == 2
    code, out, _ = run(capsys, "inspect", "--controllers", ctrl)
    assert code == 0 and "controllers" in out  # the human-readable table


def test_shift_ranks_rows_and_agrees_with_eval(tmp_path, capsys, tiny_model_dir, train_file, eval_file):
    ctrl = tmp_path / "c.safetensors"
    assert run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl, *FAST, "--lr", "0.1",
               "--max-log-gate", "1")[0] == 0
    code, out, _ = run(capsys, "shift", "--model", tiny_model_dir, "--controller", ctrl, "--data", eval_file,
                       "--rows", "4", "--top", "2", "--json")
    assert code == 0, out
    res = json.loads(out)
    moved = [r["nll_gated"] - r["nll_base"] for r in res["rows"]]
    assert res["examples"] == 6 and len(moved) == 4 and moved == sorted(moved, reverse=True)
    assert all(len(r["raised"]) == 2 for r in res["rows"])
    _, out, _ = run(capsys, "eval", "--model", tiny_model_dir, "--controller", ctrl, "--eval", eval_file,
                    "--no-exact-match", "--json")
    ev = json.loads(out)
    assert res["nll_base"] == pytest.approx(ev["base"]["nll"], rel=1e-5)
    assert res["nll_gated"] == pytest.approx(ev["controller"]["nll"], rel=1e-5)
    assert res["relative_change"] == pytest.approx((res["nll_gated"] - res["nll_base"]) / res["nll_base"])
    code, out, _ = run(capsys, "shift", "--model", tiny_model_dir, "--controller", ctrl, "--data", eval_file)
    assert code == 0 and "rows moved most" in out
    # bad input: a clear error and a non-zero exit
    code, _, err = run(capsys, "shift", "--model", tiny_model_dir, "--controller", ctrl, "--data", eval_file,
                       "--rows", "0")
    assert code != 0 and "--rows" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": 3\n')
    code, _, err = run(capsys, "shift", "--model", tiny_model_dir, "--controller", ctrl, "--data", bad)
    assert code != 0 and "bad.jsonl:2" in err


def test_every_command_has_help():
    for cmd in ([], ["fit"], ["eval"], ["shift"], ["generate"], ["compose"], ["inspect"]):
        r = subprocess.run([sys.executable, "-m", "ntkmirror.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage" in r.stdout, (cmd, r.stderr)


@pytest.fixture()
def bad_inputs(tmp_path):
    d = {}
    d["malformed"] = write_jsonl(tmp_path / "malformed.jsonl", ['{"prompt": "a", "completion": " b"}', '{"prompt":'])
    d["schema"] = write_jsonl(tmp_path / "schema.jsonl", [{"foo": "bar"}])
    d["empty"] = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "completion": ""}])
    return d


def test_fit_compile_flag_reaches_the_fit(tmp_path, capsys, tiny_model_dir, train_file):
    """--compile sets FitConfig.compile (recorded in the controller); 0 steps: nothing to compile here."""
    ctrl = tmp_path / "c.safetensors"
    code, out, _ = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl, *FAST,
                       "--steps", "0", "--compile", "--json")
    assert code == 0, out
    assert Controller.load(ctrl).meta["fit"]["compile"] is True


def test_controller_from_another_tokenizer_is_refused(tmp_path, capsys, tiny_model_dir, train_file, eval_file):
    """Same weights, a tokenizer with another EOS (as two transformers versions gave the embedded
    GGUF): eval exits 1 naming the tokenizer; --allow-model-mismatch attaches anyway."""
    import copy
    import shutil

    from tiny import tiny_tokenizer

    ctrl = tmp_path / "c.safetensors"
    assert run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl, *FAST, "--json")[0] == 0
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-tok")
    tok = copy.deepcopy(tiny_tokenizer())  # the shared (cached) tokenizer stays as it is
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(other)
    args = ("eval", "--controller", ctrl, "--eval", eval_file, "--max-new-tokens", "2", "--json")
    code, _, err = run(capsys, *args, "--model", other)
    assert code != 0 and "another tokenizer" in err
    assert run(capsys, *args, "--model", other, "--allow-model-mismatch")[0] == 0
    assert run(capsys, *args, "--model", tiny_model_dir)[0] == 0


def test_fit_retain_options(tmp_path, capsys, tiny_model_dir, train_file):
    """--retain-file/--contrast-file/--retain-tokens/--retain-rows/--selection-contrast reach the fit;
    bad values exit 1 with the place."""
    retain = tmp_path / "retain.jsonl"
    retain.write_text('{"prompt": "Hello", "completion": " world"}\n{"prompt": "", "completion": "The quick fox."}\n'
                      '{"prompt": "user", "completion": " assistant"}\n')
    ctrl = tmp_path / "c.safetensors"
    code, out, _ = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl, *FAST,
                       "--retain-file", retain, "--retain-tokens", "all", "--retain-rows", "2",
                       "--selection-contrast", "0.5", "--retain-samples", "0", "--retain-nll", "0.5", "--json")
    assert code == 0, out
    fit = Controller.load(ctrl).meta["fit"]
    assert fit["retain_nll"] == 0.5
    assert (fit["retain_examples"], fit["retain_tokens"], fit["retain_rows"], fit["retain_samples"]) == (3, "all", 2, 0)
    assert fit["selection_contrast"] == 0.5 and fit["contrast_examples"] == 32  # the bundled rows choose the gates
    ctrl2 = tmp_path / "c2.safetensors"
    code, out, _ = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl2, *FAST,
                       "--contrast-file", retain, "--json")
    assert code == 0, out
    fit2 = Controller.load(ctrl2).meta["fit"]
    assert fit2["contrast_examples"] == 3 and fit2["retain_samples"] == FitConfig().retain_samples
    assert fit2["retain_nll"] == FitConfig().retain_nll == 3.0
    n = len(default_retain_examples())  # the bundled rows + the model's own texts
    assert n == 160 and n < fit2["retain_examples"] <= n + FitConfig().retain_samples
    # --retain-add joins the bundled rows (or --retain-file's), once per file given
    for args, want in ((("--retain-add", retain, "--retain-add", retain), n + 3 + 3),
                       (("--retain-file", retain, "--retain-add", retain), 3 + 3)):
        code, out, _ = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", ctrl2, *FAST,
                           *args, "--retain-samples", "0", "--json")
        assert code == 0, out
        assert Controller.load(ctrl2).meta["fit"]["retain_examples"] == want, args
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": 3}\n')
    out2 = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--retain-file", bad)
    assert code != 0 and "bad.jsonl:2" in err and not out2.exists()
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--retain-add", bad)
    assert code != 0 and "bad.jsonl:2" in err and not out2.exists()
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--contrast-file", bad)
    assert code != 0 and "bad.jsonl:2" in err and not out2.exists()
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--retain-tokens", "prompt")
    assert code != 0 and "retain_tokens" in err and not out2.exists()
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--selection-contrast", "-1")
    assert code != 0 and "selection_contrast" in err and not out2.exists()
    code, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train_file, "--out", out2, *FAST,
                       "--retain-samples", "-1")
    assert code != 0 and "retain_samples" in err and not out2.exists()


@pytest.mark.parametrize("case, extra, message, code", [
    ("malformed", [], "malformed.jsonl:2: malformed JSON", 2),
    ("schema", [], "schema.jsonl:1: unknown row schema", 2),
    ("empty", [], "empty.jsonl:1: empty completion", 2),
    ("good", ["--max-length", "1"], "no supervised token left", 2),
    ("good", ["--layers", "first:3"], "unknown --layers spec", 2),
    ("missing", [], "no such file", 2),
    ("good", ["--gates", "0"], "--gates must be positive", 2),
])
def test_fit_bad_input_exits_nonzero_and_writes_nothing(tmp_path, capsys, tiny_model_dir, train_file, bad_inputs,
                                                        case, extra, message, code):
    train = {"good": train_file, "missing": tmp_path / "missing.jsonl"}.get(case) or bad_inputs[case]
    out = tmp_path / "out.safetensors"
    rc, _, err = run(capsys, "fit", "--model", tiny_model_dir, "--train", train, "--out", out, *FAST, *extra)
    assert rc == code and message in " ".join(err.split()), err
    assert not out.exists() and "Traceback" not in err


def test_bad_controllers_are_refused_by_eval(tmp_path, capsys, tiny_model_dir, eval_file):
    model = tiny_model()  # same weights as tiny_model_dir
    good = make_controller(model)
    cases = {}
    for name, mutate in {"nan": lambda c: c.raw.__setitem__(0, float("nan")),
                         "range": lambda c: c.channel.__setitem__(0, 10_000),
                         "dup": lambda c: (c.layer.__setitem__(1, c.layer[0]), c.channel.__setitem__(1, c.channel[0]))
                         }.items():
        c = make_controller(model)
        mutate(c)
        cases[name] = tmp_path / f"{name}.safetensors"
        cases[name].write_bytes(c.to_bytes())
    other = make_controller(tiny_model(seed=7))
    cases["other-model"] = other.save(tmp_path / "other.safetensors")
    messages = {"nan": "NaN", "range": "channel index out of range", "dup": "duplicate",
                "other-model": "fitted on another model"}
    for name, path in cases.items():
        rc, out, err = run(capsys, "eval", "--model", tiny_model_dir, "--controller", path, "--eval", eval_file)
        assert rc == 3 and messages[name] in " ".join(err.split()), (name, err)
    rc, _, _ = run(capsys, "eval", "--model", tiny_model_dir, "--controller", cases["other-model"], "--eval",
                   eval_file, "--allow-model-mismatch", "--no-exact-match", "--json")
    assert rc == 0
    good.save(tmp_path / "good.safetensors")
    rc, _, err = run(capsys, "generate", "--model", tiny_model_dir, "--controller", tmp_path / "nope.safetensors",
                     "--prompt", "x")
    assert rc == 3 and "no such controller file" in err


def test_compose_bad_input_writes_nothing(tmp_path, capsys):
    a = make_controller(tiny_model()).save(tmp_path / "a.safetensors")
    b = make_controller(tiny_model(seed=4)).save(tmp_path / "b.safetensors")
    out = tmp_path / "ab.safetensors"
    rc, _, err = run(capsys, "compose", "--controllers", a, "--controllers", b, "--out", out)
    assert rc == 3 and "different models" in err and not out.exists()
    rc, _, err = run(capsys, "compose", "--controllers", a, "--controllers", a, "--weights", "1", "--out", out)
    assert rc == 2 and "weights" in err and not out.exists()


def test_console_script_exit_code(tmp_path):
    script = Path(sys.executable).parent / "ntkmirror"  # the installed console script
    r = subprocess.run([str(script), "inspect", "--controllers", str(tmp_path / "missing.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "no such controller file" in r.stderr and "Traceback" not in r.stderr


def test_fit_option_defaults_are_fitconfigs():
    """The CLI writes its fit defaults as literals (--help imports no torch): each must be FitConfig's."""
    import inspect

    from ntkmirror import cli

    cfg = FitConfig()
    options = {**cli.FIT_OPTIONS, **{name: p.default for name, p in inspect.signature(cli.fit).parameters.items()}}
    checked = [name for name in options if hasattr(cfg, name) and name != "compile"]
    assert {"gates", "retain_kl", "retain_samples", "retain_rows", "selection_contrast"} <= set(checked)
    for name in checked:
        assert options[name].default == getattr(cfg, name), name
