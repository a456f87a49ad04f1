"""Where in a probe's answer a composed pair's leak falls (issue 7, docs/results.md run 9).

Fits one config's controllers on the main tasks (one packed fit, as benchmarks.quality does), then
scores every interference probe token by token under each controller and each composed pair:
the NLL change on the answer's first token, on its later word pieces and on its final punctuation,
the change in log P(EOS) at the answer's tokens (every task is trained to stop), and the tokens the
controllers raise most where the answer begins. Prints a table and writes JSON (+ the controllers).

    python -m benchmarks.probe_shift --tasks runs/tasks --out runs/probe_shift [--config default]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from statistics import mean

import torch

from ntkmirror.compose import compose
from ntkmirror.data import collate, encode_all, load_jsonl_examples, pad_id
from ntkmirror.evaluate import row_shifts
from ntkmirror.fit import fit_controllers
from ntkmirror.gates import attach, controller_gates
from ntkmirror.objective import supervised_logits

from .quality import CONFIGS, fit_config, fit_texts, load_benchmark_model, probe_examples
from .tasks.generate import load_manifest


@torch.no_grad()
def token_scores(model, tok, examples, controller=None, batch_size: int = 32) -> list[dict]:
    """Per answer token (no EOS appended): its row, its place in the answer, its log-prob and the
    log-prob of EOS there."""
    device = next(model.parameters()).device
    gates = controller_gates(controller, device) if controller is not None else None
    enc = encode_all(tok, examples, 1024, add_eos=False)
    eos, out = tok.eos_token_id, []
    for lo in range(0, len(enc), batch_size):
        batch = collate(enc[lo: lo + batch_size], pad_id(tok)).to(device)
        with attach(model, gates):
            logits, targets, row = supervised_logits(model, batch)
        lp = logits.float().log_softmax(-1)
        for r in row.unique().tolist():
            mine = (row == r).nonzero()[:, 0]
            for j, i in enumerate(mine.tolist()):
                piece = tok.decode([int(targets[i])])
                place = "first" if j == 0 else ("punct" if j == len(mine) - 1 and not piece.strip().isalnum()
                                                else "later")
                out.append({"row": lo + r, "place": place, "lp": float(lp[i, targets[i]]), "lp_eos": float(lp[i, eos])})
    return out


def shift(base: list[dict], gated: list[dict], starts: list[dict]) -> dict:
    """The NLL change per place in the answer (mean over tokens, nats and % of the base NLL there),
    the mean change in log P(EOS), and the tokens raised most where answers begin, counted over the
    rows of `starts` (ntkmirror.evaluate.row_shifts)."""
    res = {}
    for place in ("first", "later", "punct"):
        pairs = [(b, g) for b, g in zip(base, gated) if b["place"] == place]
        if pairs:
            nll_b = mean(-b["lp"] for b, _ in pairs)
            d = mean(b["lp"] - g["lp"] for b, g in pairs)
            res[place] = {"tokens": len(pairs), "nll_base": nll_b, "delta": d, "rel": d / nll_b if nll_b else None}
    res["eos_logprob_delta"] = mean(g["lp_eos"] - b["lp_eos"] for b, g in zip(base, gated))
    res["all_rel"] = sum(b["lp"] - g["lp"] for b, g in zip(base, gated)) / -sum(b["lp"] for b in base)
    res["raised_at_start"] = Counter(t["token"] for row in starts for t in row["raised"]).most_common(8)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="runs/tasks")
    ap.add_argument("--out", default="runs/probe_shift")
    ap.add_argument("--config", default="default", help="a benchmarks.quality config name")
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rows", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    args = ap.parse_args(argv)
    if args.config not in CONFIGS:
        ap.error(f"unknown config {args.config!r}")
    manifest = load_manifest(args.tasks)
    root = Path(manifest["root"])
    model, tok = load_benchmark_model(args.model, args.tokenizer, args.tiny, args.device)
    main_tasks = manifest["main_tasks"]
    train = [load_jsonl_examples(root / manifest["tasks"][t]["train"], tok)[: args.train_rows or None]
             for t in main_tasks]
    retain = load_jsonl_examples(root / manifest["retain"], tok)
    cfg = fit_config(CONFIGS[args.config], args, 0)
    fit_cfg, fit_retain, contrast = fit_texts(args.config, cfg, retain, tok, model)
    ctrls = dict(zip(main_tasks, fit_controllers(model, tok, train, fit_cfg, retain=fit_retain, contrast=contrast)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for t, c in ctrls.items():
        c.save(out / f"{t}.safetensors")
    conditions = {t: c for t, c in ctrls.items()}
    conditions.update({f"{a}+{b}": compose([ctrls[a], ctrls[b]])[0] for a, b in combinations(main_tasks, 2)})
    results = {"config": args.config, "fit_config": asdict(cfg), "probes": {}}
    print("| probe | condition | first | later | punct | all | Δ log P(EOS) | raised at start |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in probe_examples(manifest, tok).items():
        base = token_scores(model, tok, rows)
        per = {cond: shift(base, token_scores(model, tok, rows, c), row_shifts(model, tok, rows, c, add_eos=False))
               for cond, c in conditions.items()}
        results["probes"][name] = per
        for group, conds in (("single", list(ctrls)), ("pair", [c for c in conditions if "+" in c])):
            cells = []
            for place in ("first", "later", "punct"):
                rel = [per[c][place]["rel"] for c in conds if place in per[c]]
                cells.append(f"{100 * mean(rel):+.1f} %" if rel else "–")
            raised = Counter()
            for c in conds:
                raised.update(dict(per[c]["raised_at_start"]))
            print(f"| {name} | {group} mean | " + " | ".join(cells) +
                  f" | {100 * mean(per[c]['all_rel'] for c in conds):+.1f} % | "
                  f"{mean(per[c]['eos_logprob_delta'] for c in conds):+.3f} | "
                  + ", ".join(repr(t) for t, _ in raised.most_common(4)) + " |")
    (out / "probe_shift.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'probe_shift.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
