"""Quality benchmark: base vs controllers vs a random-gate control vs PEFT LoRA / IA3 on one task
manifest; controllers composed on disjoint tasks; the memory benchmark; candidate defaults.

    python -m benchmarks.tasks.generate --out runs/tasks --seed 0
    python -m benchmarks.quality run --tasks runs/tasks --out runs/quality
    python -m benchmarks.quality retrieval runs/quality/<stamp>    # recall@1 through memory_store
    python -m benchmarks.quality report runs/quality/<stamp> [more run dirs] --img docs/img

`run` writes results.json (after every stage, so a run cut short keeps what it finished),
controllers.zip (the memory benchmark's controllers) and log.txt. Every arm trains on the same
manifest with the same number of optimizer steps and the same batch order. A config is a set
of FitConfig overrides (CONFIGS); each config fits one controller per task in one packed fit
(ntkmirror.fit.fit_controllers), then is scored on its own task, on the unrelated probe, and
in every pair of main tasks composed under each composition rule. `report` merges run
directories and writes results.csv, tables.md and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import torch

from ntkmirror.compose import compose, controller_stats
from ntkmirror.controller import Controller
from ntkmirror.data import collate, encode_all, load_jsonl_examples, pad_id
from ntkmirror.evaluate import exact_match, generate
from ntkmirror.fit import FitConfig, fit_controllers, kl_text
from ntkmirror.gates import attach, row_gates
from ntkmirror.models import find_decoder_layers, hidden_size

from .report import rank_configs, report, summarise
from .tasks.generate import PROBES, load_manifest, probe_hits

# FitConfig overrides per config. SEED pins the seed's defaults (the runs in docs/results.md were made
# with them); "default" is run 8's default (RUN8: its KL text, retain_nll 0), "library" FitConfig() with the
# library's own texts as they stand. Every named config pins the fields that later defaults changed; without
# a retain_set it fits with the manifest's retain.jsonl (the bundled 32 rows) for both the KL and the contrast.
# gates=-1: every channel of every gated layer.
SEED = {"lr": 5e-3, "max_log_gate": 0.05, "retain_kl": 0.0, "selection_contrast": 0.0, "retain_rows": 4, "gates": 5000,
        "retain_samples": 0, "retain_nll": 0.0}
STRONG = {**SEED, "lr": 2e-2, "max_log_gate": 0.2}
# "-c1b" configs: gates chosen away from the bundled 32 rows, whatever text the KL is taken on
C1B = {**STRONG, "selection_contrast": 1.0, "contrast_set": "ntkmirror/retain.jsonl"}
# The run-8 default's KL text, pinned (runs 8-11 measured against it under the name "default"): the 64 bundled
# rows of then, then the model's own texts as the library samples them ("own"); the library's own contrast
RUN8_KL_TEXT = "ntkmirror/retain.jsonl+ntkmirror/retain_clauses.jsonl+own"
LIBRARY_TEXTS = {"retain_set": RUN8_KL_TEXT, "contrast_set": "library"}
# the run-8 default: those texts, and the fields the library default changed since (run 13: retain_nll 0 -> 3)
RUN8 = {**LIBRARY_TEXTS, "retain_nll": 0.0}


def default_variant(name: str, seeds=(0, 1, 2), base=RUN8, **overrides) -> dict:
    """The run-8 default (or `base`) with `overrides`, one config per fit seed: `name`, `name-s1`, `name-s2`."""
    return {f"{name}{'' if seed == 0 else f'-s{seed}'}": {**base, **overrides, "seed": seed} for seed in seeds}


# run 12: run 11's KL text (the library default since) plus 48 English contexts that end in a proper
# noun (probe E's genre and shape: a descriptor and first names, then the surname; none of E's answer words)
RUN11_KL_TEXT = "+".join([RUN8_KL_TEXT, "ntkmirror/retain_longwords.jsonl", "ntkmirror/retain_codeswitch.jsonl"])
NAMES_KL_TEXT = RUN11_KL_TEXT + "+benchmarks/tasks/retain_names.jsonl"


def codeswitch_kl_text(times: int) -> str:
    """Run 11's KL text with its code-switch rows (probe F's shape) in it `times` times: drawn that much more often."""
    return RUN11_KL_TEXT + "+ntkmirror/retain_codeswitch.jsonl" * (times - 1)


CONFIGS = {
    "default": dict(RUN8),
    # the library's default as it stands: FitConfig() with fit_controllers' own KL and contrast text (run 11's
    # text since 2026-11-25, retain_nll 3 since run 13)
    **default_variant("library", base={}, retain_set="library", contrast_set="library"),
    "ctrl-512": {**SEED, "gates": 512},
    "ctrl-5000": SEED,
    "ctrl-all": {**SEED, "gates": -1},
    "random-5000": {**SEED, "score": "random"},
    "lr2e-2": {**SEED, "lr": 2e-2},
    "m0.1-lr2e-2": {**SEED, "lr": 2e-2, "max_log_gate": 0.1},
    "m0.2-lr2e-2": STRONG,
    "m0.2-lr2e-2-coherent": {**STRONG, "score": "coherent"},
    "m0.2-lr2e-2-kl1": {**STRONG, "retain_kl": 1.0},
    "m0.2-lr2e-2-kl5": {**STRONG, "retain_kl": 5.0},
    "m0.1-lr2e-2-kl1": {**SEED, "lr": 2e-2, "max_log_gate": 0.1, "retain_kl": 1.0},
    "m0.2-lr2e-2-g1000": {**STRONG, "gates": 1000},
    "m0.2-lr2e-2-g1000-kl1": {**STRONG, "gates": 1000, "retain_kl": 1.0},
    "m0.2-lr2e-2-last15": {**STRONG, "layers": "last:15"},
    "m0.2-lr2e-2-first15": {**STRONG, "layers": "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14"},
    # interference levers on top of the kl5 default: weight, KL on every token, more rows, a larger set
    "kl20": {**STRONG, "retain_kl": 20.0},
    "kl5-all16": {**STRONG, "retain_kl": 5.0, "retain_tokens": "all", "retain_rows": 16},
    "kl20-all16": {**STRONG, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 16},
    "kl50-all16": {**STRONG, "retain_kl": 50.0, "retain_tokens": "all", "retain_rows": 16},
    "kl20-all16-large": {**STRONG, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 16,
                         "retain_set": "benchmarks/tasks/retain_large.jsonl"},
    "kl50-all16-large": {**STRONG, "retain_kl": 50.0, "retain_tokens": "all", "retain_rows": 16,
                         "retain_set": "benchmarks/tasks/retain_large.jsonl"},
    # + generic fact sentences (none in a probe's templates: generate.check_retain_apart)
    "kl5-facts": {**STRONG, "retain_kl": 5.0, "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl5-all16-facts": {**STRONG, "retain_kl": 5.0, "retain_tokens": "all", "retain_rows": 16,
                        "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl10-all16-facts": {**STRONG, "retain_kl": 10.0, "retain_tokens": "all", "retain_rows": 16,
                         "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl20-all16-facts": {**STRONG, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 16,
                         "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl20-all32-facts": {**STRONG, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 32,
                         "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    # the model's own sampled text as the retain set (128 samples of 48 tokens from generic openers)
    "kl5-all16-self": {**STRONG, "retain_kl": 5.0, "retain_tokens": "all", "retain_rows": 16, "retain_set": "sampled:128"},
    "kl10-all16-self": {**STRONG, "retain_kl": 10.0, "retain_tokens": "all", "retain_rows": 16, "retain_set": "sampled:128"},
    "kl20-all16-self": {**STRONG, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 16, "retain_set": "sampled:128"},
    "kl20-all16-facts-lr3e-2": {**STRONG, "lr": 3e-2, "retain_kl": 20.0, "retain_tokens": "all", "retain_rows": 16,
                                "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    # run 4: gates chosen away from channels generic text leans on (FitConfig.selection_contrast),
    # the model's own text with the KL on completions only, and a second fit seed of the default
    "kl5-c1": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0},
    "kl5-c3": {**STRONG, "retain_kl": 5.0, "selection_contrast": 3.0},
    "kl5-self": {**STRONG, "retain_kl": 5.0, "retain_set": "sampled:128"},
    "kl5-all16-self-c1": {**STRONG, "retain_kl": 5.0, "retain_tokens": "all", "retain_rows": 16,
                          "retain_set": "sampled:128", "selection_contrast": 1.0},
    "kl5-c1.5": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.5},
    "kl5-c2": {**STRONG, "retain_kl": 5.0, "selection_contrast": 2.0},
    "kl5-c0.5": {**STRONG, "retain_kl": 5.0, "selection_contrast": 0.5},
    "kl10-c1": {**STRONG, "retain_kl": 10.0, "selection_contrast": 1.0},
    "kl5-c1-s1": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "seed": 1},
    "kl5-c1-s2": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "seed": 2},
    "kl5-c1-g2500": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "gates": 2500},
    "kl5-c1-g10000": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "gates": 10000},
    "kl10-c1-g10000": {**STRONG, "retain_kl": 10.0, "selection_contrast": 1.0, "gates": 10000},
    "kl20-c1-g10000": {**STRONG, "retain_kl": 20.0, "selection_contrast": 1.0, "gates": 10000},
    "kl20-c1-g10000-s1": {**STRONG, "retain_kl": 20.0, "selection_contrast": 1.0, "gates": 10000, "seed": 1},
    "kl20-c1-g10000-s2": {**STRONG, "retain_kl": 20.0, "selection_contrast": 1.0, "gates": 10000, "seed": 2},
    "kl40-c1-g10000": {**STRONG, "retain_kl": 40.0, "selection_contrast": 1.0, "gates": 10000},
    "kl5-c1-facts": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0,
                     "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl5-c1-r8": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "retain_rows": 8},
    "kl20-c1-g10000-facts": {**STRONG, "retain_kl": 20.0, "selection_contrast": 1.0, "gates": 10000,
                             "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl5-c1-m0.1": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "max_log_gate": 0.1},
    # run 5: the KL also under each controller composed with a partner from its pack (FitConfig.pair_kl);
    # "-split" fits addition + pirate and json + miles as two packs, so the worst pair was never fitted together
    "kl5-c1-p5": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "pair_kl": 5.0},
    "kl5-c1-p20": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "pair_kl": 20.0},
    "kl5-c1-p5-split": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "pair_kl": 5.0,
                        "packs": [["addition", "persona_pirate"], ["json_person", "preference_miles"]]},
    "kl5-c1-p20-split": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "pair_kl": 20.0,
                         "packs": [["addition", "persona_pirate"], ["json_person", "preference_miles"]]},
    # run 5b: the KL on a larger retain set, the contrast still on the bundled 32 rows ("-c1b")
    "kl5-c1b-facts": {**C1B, "retain_kl": 5.0, "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl10-c1b-facts": {**C1B, "retain_kl": 10.0, "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl5-c1b-all16-facts": {**C1B, "retain_kl": 5.0, "retain_tokens": "all", "retain_rows": 16,
                            "retain_set": "benchmarks/tasks/retain_facts.jsonl"},
    "kl5-c1b-large": {**C1B, "retain_kl": 5.0, "retain_set": "benchmarks/tasks/retain_large.jsonl"},
    # run 6: the KL text with 32 more rows shaped like an answer's start ("The weather today is" -> " sunny.";
    # retain_clauses.jsonl = the bundled 32 + those), 8 rows a step so the bundled rows are seen as often
    "kl5-c1b-clauses-r8": {**C1B, "retain_kl": 5.0, "retain_rows": 8,
                           "retain_set": "benchmarks/tasks/retain_clauses.jsonl"},
    "kl5-c1-clauses-r8": {**STRONG, "retain_kl": 5.0, "selection_contrast": 1.0, "retain_rows": 8,
                          "retain_set": "benchmarks/tasks/retain_clauses.jsonl"},
    **{f"kl{kl}-c1b-clauses-r8-g10000": {**C1B, "retain_kl": float(kl), "retain_rows": 8, "gates": 10000,
                                          "retain_set": "benchmarks/tasks/retain_clauses.jsonl"} for kl in (10, 20)},
    **{f"kl5-c1b-clauses-r8-s{seed}": {**C1B, "retain_kl": 5.0, "retain_rows": 8, "seed": seed,
                                        "retain_set": "benchmarks/tasks/retain_clauses.jsonl"} for seed in (1, 2)},
    # run 7: on top of the run-6 default, decoupled weight decay of the raw gates (what no loss term holds
    # drifts back to 0) and gates kept off the last layers (whose channels act on the logits directly)
    **{f"kl5-c1b-clauses-r8-{tag}": {**C1B, "retain_kl": 5.0, "retain_rows": 8,
                                      "retain_set": "benchmarks/tasks/retain_clauses.jsonl", **extra}
       for tag, extra in (("wd0.5", {"weight_decay": 0.5}), ("wd2", {"weight_decay": 2.0}),
                          ("first24", {"layers": "first:24"}), ("first20", {"layers": "first:20"}))},
    # run 7b: the KL text with 32 everyday phrases more (retain_phrases.jsonl = retain_clauses.jsonl + those,
    # probe D's shape; the new probe E holds out); 12 rows a step keep each earlier row as often as 8 of 64
    **{f"kl5-c1b-phrases-r{rows}{'' if seed == 0 else f'-s{seed}'}": {
        **C1B, "retain_kl": 5.0, "retain_rows": rows, "seed": seed, "retain_set": "benchmarks/tasks/retain_phrases.jsonl"}
       for rows, seed in ((12, 0), (8, 0), (12, 1), (12, 2))},
    # run 7c: the KL text with 96 short texts the model writes itself (16 tokens each) on top, against probe E
    **{f"kl{kl}-c1b-{text}-self-r16": {
        **C1B, "retain_kl": float(kl), "retain_rows": 16, "retain_set": f"benchmarks/tasks/retain_{text}.jsonl+sampled:96:16"}
       for kl, text in ((5, "phrases"), (10, "phrases"), (5, "clauses"))},
    # run 8: that broad KL text with more room to fit the task as well: twice the gates, twice the steps,
    # or 256 of the model's texts instead of 96
    **{f"kl{kl}-c1b-clauses-self{n}-r16-{tag}": {
        **C1B, "retain_kl": float(kl), "retain_rows": 16, **extra,
        "retain_set": f"benchmarks/tasks/retain_clauses.jsonl+sampled:{n or 96}:16"}
       for kl, n, tag, extra in ((5, "", "g10000", {"gates": 10000}), (10, "", "g10000", {"gates": 10000}),
                                 (5, "", "st480", {"steps": 480}), (10, 256, "g10000", {"gates": 10000}),
                                 (10, "", "g10000-s1", {"gates": 10000, "seed": 1}),
                                 (10, "", "g10000-s2", {"gates": 10000, "seed": 2}),
                                 (20, "", "g10000", {"gates": 10000}), (7, "", "g10000", {"gates": 10000}),
                                 (10, "", "g15000", {"gates": 15000}), (20, "", "g15000", {"gates": 15000}),
                                 (15, "", "g10000", {"gates": 10000}), (10, "", "g12000", {"gates": 12000}))},
    # run 8f: texts of 32 tokens instead of 16; 24 rows a step instead of 16; run 8h: 32 tokens, fit seeds 1
    # and 2; texts sampled at temperature 1.5 (more varied)
    **{f"kl10-c1b-clauses-self{kind}-r{rows}-g10000{tag}": {
        **C1B, "retain_kl": 10.0, "retain_rows": rows, "gates": 10000, **extra,
        "retain_set": f"benchmarks/tasks/retain_clauses.jsonl+sampled:96:{texts}"}
       for kind, texts, rows, tag, extra in (("x32", "32", 16, "", {}), ("", "16", 24, "", {}),
                                             ("x32", "32", 16, "-s1", {"seed": 1}), ("x32", "32", 16, "-s2", {"seed": 2}),
                                             ("t1.5", "16:1.5", 16, "", {}))},
    # run 9: the library default with its own texts started elsewhere than the generic openers
    # (FitConfig.retain_openers): unprompted ("none"), from a random vocabulary word, or the generic
    # openers' 96 texts and 96 unprompted ones together; run 9f: 96 more that start in other languages
    **{k: v for kind in ("none", "vocab", "generic+none", "generic+vocab", "generic+languages")
       for k, v in default_variant(f"default-open-{kind}", retain_openers=kind,
                                   **({"retain_samples": 192} if "+" in kind else {})).items()},
    **default_variant("default", seeds=(1, 2)),
    # run 9b-9d: as many texts, or twice or four times as many, from the generic openers alone
    **{k: v for n in (192, 384, 768) for k, v in default_variant(f"default-n{n}", retain_samples=n).items()},
    # run 10b-c: the library default with gates chosen with less, no or more steering away from generic channels
    **{k: v for w in (0.0, 0.5, 2.0, 3.0)
       for k, v in default_variant(f"default-c{w:g}", selection_contrast=w).items()},
    # run 10d: the library default without gates on the first layers (where a word split into pieces is put together)
    **{k: v for n in (26, 22) for k, v in default_variant(f"default-last{n}", layers=f"last:{n}").items()},
    # run 10e: the library default plus a first-order term, the hinged rise of the KL text's own NLL
    **{k: v for w in (1.0, 3.0, 10.0, 30.0) for k, v in default_variant(f"default-nll{w:g}", retain_nll=w).items()},
    **default_variant("default-nll3-lang", retain_nll=3.0, retain_openers="generic+languages", retain_samples=192),
    # run 11: run 8's default with a real pull of every gate towards 0 (l2: weight of mean(s^2), 1e-5 by
    # default; weight_decay: AdamW's decay of the raw gates), against gates the task barely needs drifting
    **{k: v for w in (1.0, 10.0, 100.0) for k, v in default_variant(f"default-l2-{w:g}", l2=w).items()},
    **{k: v for w in (0.1, 0.3) for k, v in default_variant(f"default-wd{w:g}", weight_decay=w).items()},
    # run 11c: run 8's default without gates on the last layers (whose output channels reach the logits
    # through the final norm alone: a gate there can act as a bias on every token's logits)
    **{k: v for n in (29, 28, 26, 24) for k, v in default_variant(f"default-first{n}", layers=f"first:{n}").items()},
    **default_variant("default-first26-wd0.1", layers="first:26", weight_decay=0.1),
    # run 11e: run 8's KL text plus 48 sentences in six other languages (written for it, no probe word in
    # them): text with the later pieces of foreign words that probe F leaks on, in real, not model-written, words
    **default_variant("default-langtext", retain_set=RUN8_KL_TEXT + "+benchmarks/tasks/retain_languages.jsonl"),
    **default_variant("default-langtext-nll3", retain_set=RUN8_KL_TEXT + "+benchmarks/tasks/retain_languages.jsonl",
                      retain_nll=3.0),
    # run 11f: run 8's KL text plus 48 English sentences that end in a long word split into pieces
    # (probe H's shape, none of its words or prompts), or 48 that end in a phrase of another language
    # (probe F's shape: an English context, then foreign words; none of F's words or its template), or both
    # (both: the library default since run 11; the two files are bundled with the package now)
    **{k: v for tag, files in (("longwords", ["retain_longwords"]), ("codeswitch", ["retain_codeswitch"]),
                               ("both", ["retain_longwords", "retain_codeswitch"]))
       for k, v in default_variant(f"default-{tag}", retain_set="+".join(
           [RUN8_KL_TEXT] + [f"ntkmirror/{f}.jsonl" for f in files])).items()},
    # run 12: run 11's KL text plus the names text (NAMES_KL_TEXT); with it, each KL row weighs a sixth
    # less (304 rows, not 256): KL weight 12 gives that back, 14 and 20 go further; or twice the KL rows
    # a step (32: less noise in which rows a step pulls back); at 20 with a larger step size (run 12f); or the
    # names in place of half the model's own texts (n48: 256 rows again, F's and H's shapes keep their share)
    **{k: v for tag, kw in (("", {}), ("-kl12", {"retain_kl": 12.0}), ("-kl14", {"retain_kl": 14.0}),
                            ("-kl20", {"retain_kl": 20.0}), ("-r32", {"retain_rows": 32}),
                            ("-kl20-lr3e-2", {"retain_kl": 20.0, "lr": 3e-2}), ("-n48", {"retain_samples": 48}))
       for k, v in default_variant(f"default-names{tag}", retain_set=NAMES_KL_TEXT, **kw).items()},
    # run 12f: KL weight 20 on run 11's text alone (does the names text matter at that weight?)
    **default_variant("default-both-kl20", retain_set=RUN11_KL_TEXT, retain_kl=20.0),
    # run 13: run 11's default (and with the names text, or at KL weight 20) with the step size decayed to 0
    # over the fit (cosine): the gates end where the loss is low on average, not where the last noisy steps
    # (16 KL rows, 8 task rows) left them; "-lr3e-2" starts higher, for the same distance covered
    **{k: v for tag, kw in (("", {}), ("-kl20", {"retain_kl": 20.0}), ("-lr3e-2", {"lr": 3e-2}))
       for k, v in default_variant(f"default-both-cos{tag}", retain_set=RUN11_KL_TEXT, lr_schedule="cosine",
                                   **kw).items()},
    **default_variant("default-names-cos", retain_set=NAMES_KL_TEXT, lr_schedule="cosine"),
    # run 13b: run 11's default with the KL term a power mean over the KL text's tokens, (mean KL^p)^(1/p):
    # the leak sits on few tokens (names' surnames, later pieces of split words), which a mean dilutes
    **{k: v for p in (2, 4) for k, v in default_variant(f"default-both-p{p}", retain_set=RUN11_KL_TEXT,
                                                         retain_kl_power=float(p)).items()},
    # run 13c: run 11's default with run 10's first-order term (retain_nll; tried on run 8's KL text only)
    **{k: v for w in (3, 10) for k, v in default_variant(f"default-both-nll{w}", retain_set=RUN11_KL_TEXT,
                                                          retain_nll=float(w)).items()},
    # run 13d: three more fit seeds (3-5) of run 11's default and of it with retain_nll 3: the 3-seed means differ
    # by less than one seed's spread
    **default_variant("default-both", seeds=(3, 4, 5), retain_set=RUN11_KL_TEXT),
    **default_variant("default-both-nll3", seeds=(3, 4, 5), retain_set=RUN11_KL_TEXT, retain_nll=3.0),
    # run 14b: the library default (retain_nll 3) with the names text, the one KL text that took addition's own
    # E leak under +2 % (run 12: +1.6 % alone, nll 0); six seeds, as the adoption rule of run 13 asks
    **default_variant("default-names-nll3", seeds=range(6), retain_set=NAMES_KL_TEXT, retain_nll=3.0),
    # run 15: the library default with retain_nll's hinge on each KL row instead of the step's KL text as a whole:
    # under a pair the default lowers probes A and C by 1.5 and 7.5 % while E and F rise (run 14), and a hinge on
    # the mean lets the rows that fall pay for the rows that rise; per row, none can. At weight 3 (every row's
    # rise counts, so more pull than the mean's hinge) and 1
    **{k: v for w in (3, 1) for k, v in default_variant(f"default-both-nll{w}-row", seeds=range(6),
                                                         retain_set=RUN11_KL_TEXT, retain_nll=float(w),
                                                         retain_nll_hinge="row").items()},
    # run 16: the code-switch rows drawn twice or three times as often, with either hinge: the row hinge took E
    # under +2 % and let F rise (run 15), and F's cells are what is left over +2 % under the text hinge (run 13)
    **{k: v for n in (2, 3) for hinge in ("row", "text") for k, v in default_variant(
        f"default-both-nll3{'-row' if hinge == 'row' else ''}-cs{n}", seeds=range(6), retain_set=codeswitch_kl_text(n),
        retain_nll=3.0, retain_nll_hinge=hinge).items()},
    # run 10g: per-controller budgets, more gates for the tasks that keep less of LoRA's gain
    **default_variant("default-budgets", task_gates={"addition": 12000, "json_person": 10000, "persona_pirate": 8000,
                                                     "preference_miles": 6000}),
    "kl5-s1": {**STRONG, "retain_kl": 5.0, "seed": 1},
    "kl5-s2": {**STRONG, "retain_kl": 5.0, "seed": 2},
}
# config keys the benchmark handles itself: a retain file other than the manifest's (for the KL, and
# for the selection contrast unless contrast_set names another); groups of tasks fitted as separate packs;
# a gate budget per task (each such task is then fitted as a pack of its own)
NOT_FIT_FIELDS = ("retain_set", "contrast_set", "packs", "task_gates")
MAIN_ARMS = ("ctrl-5000", "lora", "ia3", "ctrl-512", "ctrl-all", "random-5000")
PEFT = ("lora", "ia3")
RULES = ("sum", "max", "mean", "overlap-mean", "w0.8", "sign-max")  # composition rules compared (see compose_rule)


# ------------------------------------------------------------------ scoring


@dataclass
class Job:
    """Rows to score: `examples` under `gates` (None: none; else [(controller, weight), ...],
    composed per row by ntkmirror.gates.row_gates), with greedy exact match if `exact`."""
    key: tuple
    examples: list
    gates: list | None = None
    exact: bool = True
    add_eos: bool = True  # score the end-of-sequence token too (as trained); off for the unrelated probe


@torch.no_grad()
def score_jobs(model, tok, jobs: list[Job], batch_size: int = 128) -> dict[tuple, dict]:
    """Score many jobs in shared batches (every row carries its own gates): per-row NLL sum,
    token count, correct-token count (completion tokens, EOS included, as in training) and
    exact match of the first answer. Returns {job.key: rows}."""
    from ntkmirror.objective import token_losses

    device = next(model.parameters()).device
    n_layers, hidden = len(find_decoder_layers(model)[1]), hidden_size(model)
    flat = [(j, ex) for j, job in enumerate(jobs) for ex in job.examples]
    specs = [jobs[j].gates or [] for j, _ in flat]

    def gates_for(idx):
        rows = [specs[i] for i in idx]
        return row_gates(rows, n_layers, hidden, device=device) if any(rows) else None

    enc = [e for job in jobs for e in encode_all(tok, job.examples, 1024, job.add_eos)]
    nll, ntok, corr = [0.0] * len(flat), [0] * len(flat), [0] * len(flat)
    for lo in range(0, len(flat), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(flat))))
        batch = collate([enc[i] for i in idx], pad_id(tok)).to(device)
        with attach(model, gates_for(idx)):
            tl = token_losses(model, batch)
        row, B = tl.row.cpu(), len(idx)
        sums = torch.zeros(B, dtype=torch.float64).index_add(0, row, tl.nll.double().cpu()).tolist()
        counts = torch.bincount(row, minlength=B).tolist()
        good = torch.zeros(B, dtype=torch.long).index_add(0, row, tl.correct.long().cpu()).tolist()
        for k, i in enumerate(idx):
            nll[i], ntok[i], corr[i] = sums[k], counts[k], good[k]
    # greedy generation for exact match, rows of similar length together
    gen_idx = [i for i, (j, _) in enumerate(flat) if jobs[j].exact]
    limit = {i: len(tok(flat[i][1].completion, add_special_tokens=False)["input_ids"]) + 3 for i in gen_idx}
    gen_idx.sort(key=lambda i: limit[i])
    text = {}
    for lo in range(0, len(gen_idx), batch_size):
        idx = gen_idx[lo: lo + batch_size]
        outs = generate(model, tok, [flat[i][1].prompt for i in idx], gates_for(idx), [limit[i] for i in idx],
                        batch_size=len(idx))
        text.update(zip(idx, outs))
    out, pos = {}, 0
    for j, job in enumerate(jobs):
        span = range(pos, pos + len(job.examples))
        pos += len(job.examples)
        rows = {"nll_sum": [nll[i] for i in span], "tokens": [ntok[i] for i in span],
                "correct": [corr[i] for i in span]}
        if job.exact:
            rows["exact"] = [bool(exact_match(text[i], flat[i][1].completion)) for i in span]
            rows["sample"] = text[span[0]] if len(span) else ""
        out[job.key] = rows
    return out


def compose_rule(ctrls: list[Controller], rule: str) -> tuple[Controller, dict]:
    """sum: ntkmirror.compose (clipped sum, the default); mean: weights 1/n; w0.8: weights 0.8;
    max: on shared gates keep the input with the largest |s| (no adding); overlap-mean: on shared
    gates the mean of the inputs, elsewhere each input's own value; sign-max: the largest raise plus
    the largest lowering of each gate (inputs that agree do not add up, opposing ones cancel)."""
    if rule == "sum":
        return compose(ctrls)
    if rule in ("mean", "w0.8"):
        return compose(ctrls, weights=[1 / len(ctrls) if rule == "mean" else 0.8] * len(ctrls))
    if rule in ("max", "overlap-mean", "sign-max"):
        H = ctrls[0].hidden_size
        keys = torch.cat([c.keys() for c in ctrls])
        s = torch.cat([c.log_gates() for c in ctrls])
        uniq, inv = torch.unique(keys, return_inverse=True)
        if rule == "max":
            order = torch.argsort(s.abs(), descending=True, stable=True)
            first = torch.full((len(uniq),), len(keys), dtype=torch.long).scatter_reduce(
                0, inv[order], torch.arange(len(keys)), "amin")  # the largest |s| of each key
            value = s[order][first]
        elif rule == "sign-max":
            zero = torch.zeros(len(uniq))
            value = (zero.scatter_reduce(0, inv, s.clamp(min=0), "amax") +
                     zero.scatter_reduce(0, inv, s.clamp(max=0), "amin"))
        else:
            value = torch.zeros(len(uniq)).index_add_(0, inv, s) / torch.bincount(inv, minlength=len(uniq))
        base, report = compose(ctrls)
        out = Controller.from_log_gates(uniq // H, uniq % H, value, base.max_log_gate, n_layers=base.n_layers,
                                        hidden_size=H, meta=base.meta)
        return out, {**report, "clipped": 0, "clip_fraction": 0.0}
    raise ValueError(f"unknown composition rule {rule!r}")


# ------------------------------------------------------------------ the run


class Run:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.dir = Path(args.out) / (args.name or stamp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_f = open(self.dir / "log.txt", "a")
        self.results = {"meta": {}, "evals": [], "pairs": [], "memory": {}, "skipped": []}

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_f.write(line + "\n")
        self.log_f.flush()

    def save(self) -> None:
        tmp = self.dir / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.dir / "results.json")

    def time_left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.t0) if self.args.time_budget else float("inf")


def hardware(model) -> dict:
    import peft
    import transformers

    device = next(model.parameters()).device
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "dtype": str(next(model.parameters()).dtype)}


def fit_config(overrides: dict, args, n_all: int) -> FitConfig:
    cfg = FitConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    kw = {k: v for k, v in overrides.items() if k not in NOT_FIT_FIELDS}
    if kw.get("gates") == -1:
        kw["gates"] = n_all
    for k in kw:
        if k not in {f.name for f in fields(FitConfig)}:
            raise ValueError(f"config override {k!r} is not a FitConfig field")
    return FitConfig(**{**asdict(cfg), **kw})


def config_retain(name: str, retain: list, tok, model=None, key: str = "retain_set") -> list:
    """The retain examples a config fits with: the manifest's, or its own `retain_set`: a file, or
    `sampled:N[:T[:temperature]]`: N texts of T tokens (default 48; temperature 1) the model writes itself
    (ntkmirror.evaluate.sampled_retain_examples), or several of those joined by "+", or None for
    `library` (fit_controllers' own defaults); a part `own` adds the model's own texts after the rest, as the
    library samples them (fit.kl_text; done in fit_texts). key="contrast_set": the text its gate selection
    steers away from (default: the same)."""
    spec = CONFIGS.get(name, {}).get(key)
    if spec == "library":
        return None
    return [ex for part in spec.split("+") for ex in _retain_source(part, tok, model)] if spec else retain


def _retain_source(part: str, tok, model) -> list:
    if part == "own":
        return []  # fit_texts adds them, seeded as the library does
    if part.startswith("sampled:"):
        from ntkmirror.evaluate import sampled_retain_examples

        fields = part.split(":")[1:]
        n, tokens, temperature = fields + ["48", "1"][len(fields) - 1:]  # sampled:N[:T[:temperature]]
        return without_probes(sampled_retain_examples(model, tok, n=int(n), max_new_tokens=int(tokens),
                                                      temperature=float(temperature)))
    return load_jsonl_examples(Path(__file__).resolve().parents[1] / part, tok)


def without_probes(rows: list) -> list:
    """The rows that hold no probe's prompt or template: text the model wrote may, by chance, and a KL
    term on it would then train on the probe."""
    return [ex for ex in rows if not probe_hits([ex.prompt + ex.completion])]


def fit_texts(name: str, cfg: FitConfig, retain: list, tok, model) -> tuple[FitConfig, list | None, list | None]:
    """(config, retain, contrast) a config passes to fit_controllers (None: the library's default).
    Without a contrast_set the contrast is the config's retain text, as fit_controllers chose until run 7.
    The library's KL text (fit.kl_text) is made here when it holds the model's own samples, so that
    any sample holding a probe's prompt is dropped, as for `sampled:` sets."""
    wants_kl = cfg.uses_retain_text or cfg.pair_kl > 0
    fit_retain = config_retain(name, retain, tok, model) if wants_kl else None
    spec = CONFIGS.get(name, {}).get("retain_set", "")
    if wants_kl and cfg.retain_samples and (spec == "library" or "own" in spec.split("+")):
        fit_retain = without_probes(kl_text(model, tok, cfg, fit_retain))
        cfg = replace(cfg, retain_samples=0)  # they are in fit_retain now
    contrast = config_retain(name, retain, tok, model, "contrast_set") if "contrast_set" in CONFIGS[name] else fit_retain
    return cfg, fit_retain, contrast


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak(device, mem0):
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - mem0) / 2**20


def run(args) -> Path:
    R = Run(args)
    manifest = load_manifest(args.tasks)
    root = Path(manifest["root"])
    model, tok = load_benchmark_model(args.model, args.tokenizer, args.tiny, args.device, args.dtype)
    device = next(model.parameters()).device
    n_all = len(find_decoder_layers(model)[1]) * hidden_size(model)
    task_names = list(manifest["tasks"])
    main = args.main_tasks or [t for t in manifest["main_tasks"] if t in task_names]
    train = {t: load_jsonl_examples(root / manifest["tasks"][t]["train"], tok)[: args.train_rows or None]
             for t in task_names}
    evals = {t: load_jsonl_examples(root / manifest["tasks"][t]["eval"], tok)[: args.eval_rows or None]
             for t in task_names}
    unrelated = probe_examples(manifest, tok, args.eval_rows)
    retain = load_jsonl_examples(root / manifest["retain"], tok)
    queries = {t: [json.loads(line).get("query", "")
                   for line in (root / manifest["tasks"][t]["eval"]).read_text().splitlines()] for t in task_names}
    R.results["meta"] = {"command": " ".join(sys.argv), "started": datetime.now(timezone.utc).isoformat(),
                         "hardware": hardware(model), "model": args.model or "embedded SmolLM2-135M-Instruct",
                         "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                         "manifest": {k: v["sha256"] for k, v in manifest["files"].items()},
                         "main_tasks": main, "tasks": task_names, "arms": args.arms,
                         "configs": {c: CONFIGS[c] for c in args.arms if c in CONFIGS},
                         "fit_defaults": asdict(FitConfig()),
                         "tokenizer": {"eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
                                       "pad_token_id": tok.pad_token_id, "class": type(tok).__name__},
                         "probe_scores_eos": False}
    R.log(f"model on {device} ({R.results['meta']['hardware']['device']}), {len(task_names)} tasks, main {main}, "
          f"eos {tok.eos_token!r} = {tok.eos_token_id}")

    def record(config, task, rows, **extra):
        R.results["evals"].append({"config": config, "task": task, **summarise(rows), **extra,
                                   **({"sample": rows["sample"]} if "sample" in rows else {})})

    # --- base model
    if args.base:
        res = score_jobs(model, tok, [Job(("base", t), evals[t]) for t in main] +
                         [Job(("base", k), rows, exact=False, add_eos=False) for k, rows in unrelated.items()],
                         args.eval_batch)
        for (_, t), rows in res.items():
            record("base", t, rows)
        R.save()
        R.log("base: " + ", ".join(f"{e['task']} nll {e['nll']:.3f} em {e.get('exact_match', float('nan')):.2f}"
                                   for e in R.results["evals"] if e["config"] == "base"))

    # --- arms in the given order: controller configs (one packed fit each) and PEFT baselines
    last_fit, fitted = {"controller": 0.0, "peft": 0.0}, {}
    for name in args.arms:
        kind = "peft" if name in PEFT else "controller"
        reserve = 1.5 * last_fit["controller"] + 30 if "auto" in args.memory_configs else 0  # auto memory stage
        if R.time_left() < last_fit[kind] * 1.3 + 20 + reserve:
            R.results["skipped"].append(name)
            R.log(f"skip {name}: {R.time_left():.0f}s left")
            continue
        t0 = time.perf_counter()
        if kind == "peft":
            peft_arm(R, model, tok, name, main, train, evals, unrelated, args, record)
        else:
            ctrls = controller_arm(R, model, tok, name, main, task_names, train, evals, unrelated, retain, n_all,
                                   args, record)
            if name in args.memory_configs:
                memory_stage(R, model, tok, name, ctrls, evals, queries, manifest, args)
            fitted[name] = ctrls
        last_fit[kind] = time.perf_counter() - t0
    ranked = [c for c in rank_configs(R.results) if c in fitted and c not in args.memory_configs]
    if "auto" in args.memory_configs and ranked and R.time_left() > 30:  # the best candidate of this run
        best = ranked[0]
        R.log(f"memory benchmark for the best-ranked config: {best}")
        ctrls = fitted[best]
        if len(ctrls) < len(task_names):  # fit the remaining memories with the same config
            cfg = fit_config(CONFIGS[best], args, n_all)
            rest = [t for t in task_names if t not in ctrls]
            fit_cfg, fit_retain, contrast = fit_texts(best, cfg, retain, tok, model)
            more = fit_controllers(model, tok, [train[t] for t in rest], fit_cfg, progress=not args.quiet,
                                   retain=fit_retain, contrast=contrast)
            ctrls = {t: ctrls.get(t) or more[rest.index(t)] for t in task_names}
        memory_stage(R, model, tok, best, ctrls, evals, queries, manifest, args)
    R.results["meta"]["seconds"] = time.perf_counter() - R.t0
    R.save()
    R.log(f"done in {R.results['meta']['seconds']:.0f}s -> {R.dir}")
    return R.dir


def controller_arm(R, model, tok, name, main, task_names, train, evals, unrelated, retain, n_all, args, record):
    """One packed fit (every task's controller at once), then one batched scoring pass: each
    controller on its task and on the unrelated probe, and every pair of main tasks composed."""
    device = next(model.parameters()).device
    cfg = fit_config(CONFIGS[name], args, n_all)
    fit_tasks = task_names if (args.fit_all_tasks or name in args.memory_configs) else main
    packs = fit_packs(name, fit_tasks)
    fit_cfg, fit_retain, contrast = fit_texts(name, cfg, retain, tok, model)
    mem0 = _peak_reset(device)
    t0 = time.perf_counter()
    ctrls = {}
    budgets = CONFIGS.get(name, {}).get("task_gates", {})
    for pack in packs:
        pack_cfg = replace(fit_cfg, gates=budgets[pack[0]]) if pack[0] in budgets else fit_cfg
        ctrls.update(zip(pack, fit_controllers(model, tok, [train[t] for t in pack], pack_cfg, progress=not args.quiet,
                                               retain=fit_retain, contrast=contrast)))
    seconds = time.perf_counter() - t0
    peak, adapt = _peak(device, mem0)
    pack_of = {t: i for i, pack in enumerate(packs) for t in pack}
    jobs, reports = [], {}
    for t in main:
        jobs += [Job((t,), evals[t], [(ctrls[t], 1.0)]),
                 *[Job((t, k), rows, [(ctrls[t], 1.0)], exact=False, add_eos=False) for k, rows in unrelated.items()]]
    for a, b in combinations(main, 2):
        for rule in args.rules:
            comp, reports[a, b, rule] = compose_rule([ctrls[a], ctrls[b]], rule)
            ex = rule == "sum"  # exact match for the default rule only
            jobs += [Job((a, b, rule, "a"), evals[a], [(comp, 1.0)], ex),
                     Job((a, b, rule, "b"), evals[b], [(comp, 1.0)], ex),
                     *[Job((a, b, rule, k), rows, [(comp, 1.0)], exact=False, add_eos=False)
                       for k, rows in unrelated.items()]]
    t1 = time.perf_counter()
    res = score_jobs(model, tok, jobs, args.eval_batch)
    fit_info = {"seconds": seconds, "pack": max(map(len, packs)), "seconds_per_controller": seconds / len(fit_tasks),
                "peak_mem_mb": peak, "adapt_mem_mb": adapt, "arm": "controller", "fit_config": asdict(cfg)}
    for t in main:
        c = ctrls[t]
        st = controller_stats(c)  # how far the gates moved (run 11: the probes' leak does not grow with it)
        record(name, t, res[(t,)], **fit_info, gates=c.num_gates, stored_bytes=len(c.to_bytes("safetensors")),
               train_nll_after=c.meta["fit"]["train_nll_after"], gate_l2=st["l2"], saturation=st["saturation"])
        for k in unrelated:
            record(name, k, res[(t, k)], under=t, arm="controller")
    for (a, b, rule), rep in reports.items():
        pair = rep["pairs"][0]
        R.results["pairs"].append({"config": name, "rule": rule, "a": a, "b": b, "same_pack": pack_of[a] == pack_of[b],
                                   "eval_a": summarise(res[(a, b, rule, "a")]),
                                   "eval_b": summarise(res[(a, b, rule, "b")]),
                                   **{k: summarise(res[(a, b, rule, k)]) for k in unrelated},
                                   "clip_fraction": rep["clip_fraction"],
                                   "overlap": pair["overlap"], "jaccard": pair["jaccard"], "cosine": pair["cosine"],
                                   "opposing_sign_overlap": pair["opposing_sign_overlap"]})
    R.save()
    own = {e["task"]: e for e in R.results["evals"] if e["config"] == name and e["task"] in main}
    R.log(f"{name}: fit {seconds:.1f}s x{len(fit_tasks)}, scored in {time.perf_counter() - t1:.1f}s | " +
          ", ".join(f"{t} nll {own[t]['nll']:.3f} em {own[t]['exact_match']:.2f}" for t in main))
    return ctrls


def fit_packs(name: str, tasks: list[str]) -> list[list[str]]:
    """The groups of `tasks` a config fits as separate packs: one per task with its own gate budget
    (`task_gates`), then its `packs` (in task order, the rest as one more pack), or all of them as one."""
    budgets = CONFIGS.get(name, {}).get("task_gates", {})
    groups = [[t] for t in tasks if t in budgets]
    groups += [[t for t in tasks if t in g and t not in budgets] for g in CONFIGS.get(name, {}).get("packs", [])]
    rest = [t for t in tasks if not any(t in g for g in groups)]
    return [g for g in groups + [rest] if g]


def peft_arm(R, model, tok, method, main, train, evals, unrelated, args, record):
    from .baselines import fit_peft

    for t in main:
        adapted, stats = fit_peft(model, tok, train[t], method, args.steps, args.batch_size, seed=args.seed,
                                  progress=not args.quiet)
        res = score_jobs(adapted, tok, [Job(("own",), evals[t]),
                                        *[Job((k,), rows, exact=False, add_eos=False) for k, rows in unrelated.items()]],
                         args.eval_batch)
        del adapted
        record(method, t, res[("own",)], arm=method, pack=1, seconds_per_controller=stats["seconds"], **stats)
        e = R.results["evals"][-1]
        for k in unrelated:
            record(method, k, res[(k,)], under=t, arm=method)
        R.save()
        R.log(f"{method} {t}: {stats['seconds']:.1f}s nll {e['nll']:.4f} em {e['exact_match']:.2f}")


def memory_stage(R: Run, model, tok, config: str, ctrls: dict, evals: dict, queries: dict, manifest: dict, args):
    """Every memory controller on every task's rows (per row), plus base and all-composed. The
    conditions (gold, wrong, retrieved) are read from this matrix; retrieval itself runs in
    `retrieval` (it needs memory_store and the text embedder, which a GPU host may lack)."""
    tasks = list(ctrls)
    rows = {t: evals[t][: args.memory_rows] for t in tasks}
    t0 = time.perf_counter()
    everything, rep = compose(list(ctrls.values()))
    jobs = [Job((m, t), rows[t], [(ctrls[m], 1.0)]) for t in tasks for m in tasks]
    jobs += [Job(("base", t), rows[t]) for t in tasks] + [Job(("all", t), rows[t], [(everything, 1.0)]) for t in tasks]
    res = score_jobs(model, tok, jobs, args.eval_batch)
    R.results["memory"][config] = {
        "tasks": tasks, "ids": {t: manifest["tasks"][t]["memory"]["id"] for t in tasks},
        "texts": {t: manifest["tasks"][t]["memory"]["text"] for t in tasks},
        "queries": {t: queries[t][: len(rows[t])] for t in tasks},
        "prompts": {t: [e.prompt for e in rows[t]] for t in tasks},
        "wrong": {t: tasks[(i + 1) % len(tasks)] for i, t in enumerate(tasks)},  # a neighbour of the same family
        "matrix": {m: {t: res[(m, t)] for t in tasks} for m in tasks},
        "base": {t: res[("base", t)] for t in tasks}, "all_composed": {t: res[("all", t)] for t in tasks},
        "all_composed_report": {k: rep[k] for k in ("clip_fraction", "union_gates", "output_gates")},
        "seconds": time.perf_counter() - t0}
    with zipfile.ZipFile(R.dir / "controllers.zip", "a") as z:
        for t, c in ctrls.items():
            z.writestr(f"{config}/{t}.safetensors", c.to_bytes("safetensors"))
    R.save()
    R.log(f"memory ({config}): {len(tasks)} memories x {len(tasks)} tasks in {time.perf_counter() - t0:.1f}s")


def load_benchmark_model(model_ref=None, tokenizer=None, tiny: bool = False, device=None, dtype="float32"):
    """The model under test (default: the embedded one; tiny: a random smoke-test model) and its
    tokenizer, or the tokenizer files of `tokenizer` (e.g. a local cache's, so every host appends
    the same EOS)."""
    from ntkmirror.models import load_model

    model, tok = _tiny() if tiny else load_model(model_ref, device=device, dtype=dtype)
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    return model, tok


def probe_examples(manifest: dict, tok, rows: int = 0) -> dict[str, list]:
    """The interference probes a task pack holds (never trained on; older packs lack B and C)."""
    root = Path(manifest["root"])
    return {k: load_jsonl_examples(root / manifest[k], tok)[: rows or None] for k in PROBES if k in manifest}


def _tiny():
    """A tiny random model for smoke tests (tests/tiny.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    return tiny_model(layers=2, hidden=32), tiny_tokenizer()


# ------------------------------------------------------------------ retrieval (CPU is fine)


def retrieval(run_dir: Path, config: str | None = None, top_k: int = 3) -> dict:
    """Store every memory (its controller and text) in a fresh memory_store LocalStore, search with
    each eval row's query, and record the top-1 memory per row (recall@1 = top-1 is the gold)."""
    import tempfile

    from memory_store.base import MemoryStore

    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text())
    with zipfile.ZipFile(Path(run_dir) / "controllers.zip") as z:
        for cfg_name, mem in results["memory"].items():
            if config and cfg_name != config:
                continue
            with tempfile.TemporaryDirectory() as d, MemoryStore.from_url(d) as store:
                id_to_task = {}
                for t in mem["tasks"]:
                    c = Controller.from_bytes(z.read(f"{cfg_name}/{t}.safetensors"))
                    store.put("bench", mem["ids"][t], c, mem["texts"][t], tags=[t])
                    id_to_task[mem["ids"][t]] = t
                retrieved, scores, with_prompt = {}, {}, {}
                for t in mem["tasks"]:
                    retrieved[t], scores[t], with_prompt[t] = [], [], []
                    for q, p in zip(mem["queries"][t], mem["prompts"][t]):
                        hits = store.search("bench", q, top_k=top_k)
                        retrieved[t].append(id_to_task[hits[0].item.id] if hits else None)
                        scores[t].append([(id_to_task[h.item.id], h.score, h.weight) for h in hits])
                        hits = store.search("bench", f"{q}\n{p}", top_k=1)  # the request with the prompt pasted in
                        with_prompt[t].append(id_to_task[hits[0].item.id] if hits else None)
                mem["retrieval"] = {"retrieved": retrieved, "hits": scores, "query": "the row's paraphrased request",
                                    "retrieved_query_prompt": with_prompt, "store": type(store).__name__}
    path.write_text(json.dumps(results, indent=1, default=str))
    return results


def rescore_rules(run_dir: Path, config: str, rules: list[str], tasks: str, model_ref=None, tokenizer=None,
                  tiny: bool = False, rows: int = 0) -> list[dict]:
    """Re-score every pair of main tasks of one config's saved controllers (controllers.zip) under
    other composition rules: each task's retention and each probe's NLL change. Forward passes
    only (CPU is fine); writes rules.json into the run dir."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    manifest = load_manifest(tasks)
    root = Path(manifest["root"])
    model, tok = load_benchmark_model(model_ref, tokenizer, tiny)
    main = results["meta"]["main_tasks"]
    with zipfile.ZipFile(Path(run_dir) / "controllers.zip") as z:
        ctrls = {t: Controller.from_bytes(z.read(f"{config}/{t}.safetensors")) for t in main}
    evals = {t: load_jsonl_examples(root / manifest["tasks"][t]["eval"], tok)[: rows or None] for t in main}
    probes = probe_examples(manifest, tok, rows)
    pairs = list(combinations(main, 2))
    comps = {(a, b, r): compose_rule([ctrls[a], ctrls[b]], r)[0] for a, b in pairs for r in rules}
    jobs = ([Job(("base", t), evals[t], exact=False) for t in main] +
            [Job(("base", k), ex, exact=False, add_eos=False) for k, ex in probes.items()] +
            [Job((t,), evals[t], [(ctrls[t], 1.0)], exact=False) for t in main])
    for key, comp in comps.items():
        jobs += [Job((*key, t), evals[t], [(comp, 1.0)], exact=False) for t in key[:2]]
        jobs += [Job((*key, k), ex, [(comp, 1.0)], exact=False, add_eos=False) for k, ex in probes.items()]
    nll = {k: summarise(v)["nll"] for k, v in score_jobs(model, tok, jobs).items()}
    out = []
    for (a, b, r) in comps:
        row = {"config": config, "rule": r, "a": a, "b": b}
        for side, t in (("a", a), ("b", b)):
            gain = nll[("base", t)] - nll[(t,)]
            row[f"retained_{side}"] = (nll[("base", t)] - nll[(a, b, r, t)]) / gain if gain > 0 else None
        for k in probes:
            row[f"{k}_change"] = (nll[(a, b, r, k)] - nll[("base", k)]) / nll[("base", k)]
        out.append(row)
    (Path(run_dir) / "rules.json").write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fit and score every arm (GPU recommended)")
    r.add_argument("--tasks", default="runs/tasks", help="task pack directory (benchmarks.tasks.generate)")
    r.add_argument("--out", default="runs/quality")
    r.add_argument("--name", default=None, help="run directory name (default: a UTC timestamp)")
    r.add_argument("--model", default=None, help="HF id / dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default="float32")
    r.add_argument("--steps", type=int, default=240)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--arms", default=",".join(MAIN_ARMS),
                   help=f"arms in run order: controller configs ({', '.join(CONFIGS)}) and PEFT ({', '.join(PEFT)})")
    r.add_argument("--no-base", dest="base", action="store_false", help="skip the base-model scores")
    r.add_argument("--rules", default=",".join(RULES), help="composition rules for pairs")
    r.add_argument("--memory-configs", default="ctrl-5000", help="configs whose controllers form the memory benchmark")
    r.add_argument("--fit-all-tasks", action="store_true", help="fit every task (not only the main ones) per config")
    r.add_argument("--main-tasks", default="", help="comma list: fit and score these tasks only (default: the "
                                                    "manifest's main tasks; one task: no pairs, e.g. a CPU scout)")
    r.add_argument("--train-rows", type=int, default=0, help="limit training rows per task (0: all)")
    r.add_argument("--eval-rows", type=int, default=0, help="limit eval rows per task (0: all)")
    r.add_argument("--memory-rows", type=int, default=32, help="eval rows per task in the memory benchmark")
    r.add_argument("--eval-batch", type=int, default=64)
    r.add_argument("--time-budget", type=float, default=0, help="seconds; later stages are skipped past it (0: none)")
    r.add_argument("--tokenizer", default=None, help="load the tokenizer from this directory instead")
    r.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    q = sub.add_parser("retrieval", help="recall@1 and the retrieved condition, through memory_store")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--top-k", type=int, default=3)
    c = sub.add_parser("rules", help="re-score one config's saved pairs under other composition rules (CPU is fine)")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--config", required=True, help="a config whose controllers are in the run's controllers.zip")
    c.add_argument("--rules", default=",".join(RULES))
    c.add_argument("--tasks", default="runs/tasks", help="the run's task pack (checked by sha256)")
    c.add_argument("--model", default=None)
    c.add_argument("--tokenizer", default=None)
    c.add_argument("--rows", type=int, default=0, help="eval / probe rows per task (0: all)")
    c.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    a = sub.add_parser("additivity", help="is a pair's probe change the sum of its controllers' own? (CPU, JSON only)")
    a.add_argument("sources", type=Path, nargs="+", help="run dirs or results JSON files (docs/results/quality/*.json)")
    a.add_argument("--config", default=None, help="one config, its fit seeds (-s1, -s2, ...) pooled")
    t = sub.add_parser("targets", help="one config's three numbers against the issue's targets, per task, probe and "
                                       "(task, probe) cell, fit seeds pooled (CPU, JSON only)")
    t.add_argument("sources", type=Path, nargs="+", help="run dirs or results JSON files (one task draw; a run with "
                                                         "LoRA on it gives the gain share its reference)")
    t.add_argument("--config", required=True, help="the config; its fit seeds (-s1, -s2, ...) pooled")
    t.add_argument("--rule", default="sum", choices=RULES)
    p = sub.add_parser("report", help="tables (CSV, markdown) and plots from one or more run dirs")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--img", type=Path, default=None, help="also copy the plots here (e.g. docs/img)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
        args.arms, args.rules, args.memory_configs = split(args.arms), split(args.rules), split(args.memory_configs)
        bad = [c for c in args.arms if c not in CONFIGS and c not in PEFT] + [r for r in args.rules if r not in RULES]
        if bad:
            ap.error(f"unknown config or rule: {', '.join(bad)}")
        args.main_tasks = split(args.main_tasks)
        if args.main_tasks:
            known = load_manifest(args.tasks)["tasks"]
            if bad := [t for t in args.main_tasks if t not in known]:
                ap.error(f"--main-tasks: no task {', '.join(bad)} in {args.tasks} (it has {', '.join(known)})")
        run_dir = run(args)
        print(report([run_dir]))
    elif args.cmd == "rules":
        bad = [r for r in args.rules.split(",") if r not in RULES]
        if bad:
            ap.error(f"unknown rule: {', '.join(bad)}; choose from {', '.join(RULES)}")
        out = rescore_rules(args.run_dir, args.config, args.rules.split(","), args.tasks, args.model, args.tokenizer,
                            args.tiny, args.rows)
        cols = ["rule", "a", "b", "retained_a", "retained_b"] + [k for k in out[0] if k.endswith("_change")]
        from .report import _md

        print(_md(out, cols))
    elif args.cmd == "additivity":
        from .report import additivity_report

        try:
            print(additivity_report(args.sources, args.config))
        except (OSError, ValueError) as e:
            ap.error(str(e))
    elif args.cmd == "targets":
        from .report import targets_report

        try:
            print(targets_report(args.sources, args.config, args.rule))
        except (OSError, ValueError) as e:
            ap.error(str(e))
    elif args.cmd == "retrieval":
        retrieval(args.run_dir, top_k=args.top_k)
        print(report([args.run_dir]))
    else:
        print(report(args.run_dirs, img=args.img))
    return 0


if __name__ == "__main__":
    sys.exit(main())
