"""`ntkmirror memory ...` end to end on a tiny model, against both store backends."""

from __future__ import annotations

import json

import pytest

from ntkmirror import Controller
from ntkmirror.cli import main

FAST = ["--gates", "16", "--steps", "10", "--score-batches", "1", "--batch-size", "4", "--lr", "0.05"]
PROMPT = "Question: 12 + 30 = ?\\nAnswer:"


def run(capsys, *args):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(params=["local", "redis"])
def store_url(request, tmp_path):
    return str(tmp_path / "memory") if request.param == "local" else request.getfixturevalue("redis_url")


def test_memory_cli_round_trip(tmp_path, capsys, store_url, tiny_model_dir, train_file, eval_file):
    S = ["--store", store_url]
    M = ["--model", tiny_model_dir]
    code, out, err = run(capsys, "memory", "add", "--id", "arith", "--train", train_file, "--text",
                         "Arithmetic: adding two-digit numbers", "--tags", "math,school", *M, *FAST, *S, "--json",
                         "--retain-rows", "3", "--selection-contrast", "0.5")
    assert code == 0, err
    item = json.loads(out)
    assert (item["version"], item["num_gates"], item["tags"]) == (1, 16, ["math", "school"])
    assert item["data_hash"] and item["model_fingerprint"] and item["fit"]["steps_run"] == 10

    ctrl = tmp_path / "arith.safetensors"
    code, out, _ = run(capsys, "memory", "get", "--id", "arith", "--out", ctrl, *S, "--json")
    assert code == 0 and ctrl.is_file() and json.loads(out)["id"] == "arith"
    fit = Controller.load(ctrl).meta["fit"]
    assert (fit["retain_rows"], fit["selection_contrast"]) == (3, 0.5)  # every fit option reaches memory add's fit
    code, out, err = run(capsys, "memory", "add", "--id", "poems", "--controller", ctrl, "--text",
                         "Writing haiku poems about autumn leaves", *S)
    assert code == 0 and "near-duplicate of memory 'arith'" in err and "stored default/poems v1" in out

    code, out, _ = run(capsys, "memory", "search", "--query", "sum of two numbers", *S, "--json")
    hits = json.loads(out)["hits"]
    assert code == 0 and hits[0]["item"]["id"] == "arith" and abs(sum(h["weight"] for h in hits) - 1) < 1e-6
    code, out, _ = run(capsys, "memory", "search", "--query", "sum of two numbers", *S)
    assert code == 0 and "arith" in out and "weight" in out  # the table
    code, out, _ = run(capsys, "memory", "search", "--query", "boiling point of mercury", *S)
    assert code == 0 and "no memory is relevant" in out
    code, out, _ = run(capsys, "memory", "search", "--query", "sum of two numbers", "--tenant", "other", *S, "--json")
    assert code == 0 and json.loads(out)["hits"] == []  # another tenant sees nothing
    code, out, _ = run(capsys, "memory", "similar", "--id", "arith", *S, "--json")
    assert code == 0 and json.loads(out)["hits"][0]["item"]["id"] == "poems"

    comp = tmp_path / "composed.safetensors"
    code, out, _ = run(capsys, "memory", "compose", "--query", "adding numbers", "--out", comp, *S, "--json")
    assert code == 0 and comp.is_file() and json.loads(out)["hits"][0]["item"]["id"] == "arith"
    code, out, err = run(capsys, "memory", "compose", "--query", "boiling point of mercury", "--out",
                         tmp_path / "none.safetensors", *S)
    assert code != 0 and "nothing to compose" in err and not (tmp_path / "none.safetensors").exists()

    # generation: retrieved memories composed in; with no hit, exactly the base model's output
    code, out, _ = run(capsys, "memory", "generate", "--prompt", PROMPT, "--query", "add two numbers", *M,
                       "--max-new-tokens", "4", *S, "--json")
    with_mem = json.loads(out)
    assert code == 0 and with_mem["memory"] == "composed" and with_mem["hits"][0]["item"]["id"] == "arith"
    code, out, _ = run(capsys, "memory", "generate", "--prompt", PROMPT, "--query", "boiling point of mercury", *M,
                       "--max-new-tokens", "4", *S, "--json")
    fallback = json.loads(out)
    assert fallback["memory"] == "none matched: base model" and fallback["hits"] == []
    code, out, _ = run(capsys, "generate", "--prompt", PROMPT, *M, "--max-new-tokens", "4", "--json")
    assert json.loads(out)["text"] == fallback["text"]
    code, out, err = run(capsys, "memory", "generate", "--prompt", PROMPT, "--query", "boiling point of mercury", *M,
                         "--max-new-tokens", "4", *S)
    assert code == 0 and "base model" in err

    code, out, _ = run(capsys, "memory", "eval", "--eval", eval_file, "--query", "adding two-digit numbers", *M,
                       "--max-new-tokens", "3", *S, "--json")
    res = json.loads(out)
    assert code == 0 and res["retrieval"]["rows_with_memories"] == 6 and "arith" in res["retrieval"]["memories_used"]
    assert res["memory"]["nll"] != res["base"]["nll"] and res["memory"]["examples"] == 6
    code, out, _ = run(capsys, "memory", "eval", "--eval", eval_file, "--query", "boiling point of mercury", *M,
                       "--no-exact-match", *S, "--json")
    res = json.loads(out)
    assert res["retrieval"]["rows_with_memories"] == 0 and res["memory"]["nll"] == res["base"]["nll"]

    # lifecycle
    code, out, _ = run(capsys, "memory", "list", *S, "--json")
    assert [i["id"] for i in json.loads(out)["items"]] == ["arith", "poems"]
    assert run(capsys, "memory", "delete", "--id", "poems", *S)[0] == 0
    code, out, _ = run(capsys, "memory", "list", "--tags", "math", *S, "--json")
    assert [i["id"] for i in json.loads(out)["items"]] == ["arith"]
    code, out, _ = run(capsys, "memory", "rollback", "--id", "poems", *S, "--json")
    assert code == 0 and json.loads(out)["version"] == 3
    code, out, _ = run(capsys, "memory", "get", "--id", "poems", "--versions", *S, "--json")
    assert [(v["version"], v["deleted"]) for v in json.loads(out)["versions"]] == [(1, False), (2, True), (3, False)]
    assert run(capsys, "memory", "delete", "--id", "poems", "--hard", *S)[0] == 0
    code, _, err = run(capsys, "memory", "get", "--id", "poems", *S)
    assert code == 5 and "no memory 'poems'" in err
    code, out, _ = run(capsys, "memory", "audit", *S, "--json")
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = run(capsys, "memory", "list", *S)
    assert code == 0 and "arith" in out


def test_memory_cli_bad_input(tmp_path, capsys):
    S = ["--store", tmp_path / "memory"]
    ctrl = tmp_path / "missing.safetensors"
    for args, code_, msg in [
        (["add", "--id", "../x", "--controller", ctrl, "--text", "t"], 2, "invalid id"),
        (["add", "--id", "x", "--controller", ctrl, "--text", "t", "--tenant", "a/b"], 2, "invalid tenant"),
        (["add", "--id", "x", "--text", "t"], 2, "exactly one of --train"),
        (["add", "--id", "x", "--controller", ctrl, "--train", ctrl, "--text", "t"], 2, "exactly one of --train"),
        (["add", "--id", "x", "--controller", ctrl, "--text", "t", "--metadata", "{oops"], 2, "not valid JSON"),
        (["add", "--id", "x", "--controller", ctrl, "--text", "t"], 3, "no such controller file"),
        (["search", "--query", "q", "--fusion", "magic"], 2, "unknown fusion"),
        (["search", "--query", "q", "--tags", "bad tag"], 2, "invalid tag"),
        (["get", "--id", "nope"], 5, "no memory 'nope'"),
        (["rollback", "--id", "nope"], 5, "no memory 'nope'"),
        (["compose", "--out", tmp_path / "o.safetensors"], 2, "give --query"),
    ]:
        code, _, err = run(capsys, "memory", *args, *S)
        assert (code, msg in " ".join(err.split())) == (code_, True), (args, code, err)
    assert not (tmp_path / "memory" / "tenants").exists() or not any((tmp_path / "memory" / "tenants").rglob("*.json"))
    code, _, err = run(capsys, "memory", "list", "--store", "redis://127.0.0.1:1/0")
    assert code == 5 and "unavailable" in err


def test_memory_commands_have_help(capsys):
    for cmd in ("add", "search", "similar", "compose", "generate", "eval", "list", "get", "delete", "rollback",
                "audit"):
        code, out, _ = run(capsys, "memory", cmd, "--help")
        assert code == 0 and "Usage" in out and "--store" in out and "--json" in out, cmd
