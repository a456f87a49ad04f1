"""Retrieval quality of the memory store on a generated paraphrase set.

Memories are (topic x style) preferences of a named person, e.g. "When Belvaro asks about
Italian cooking, answer in two sentences at most."; every memory has hard negatives (same
topic other style, same style other topic). Three kinds of queries, all seeded:
  paraphrase  the same topic and style in other words ("Short reply please: a noodle dinner?"):
              no content word shared with the memory by construction;
  partial     a paraphrase that keeps one content word of the memory (how people often ask);
  named       the person's name plus a paraphrased topic, no style ("What does Belvaro want
              for a noodle dinner?"): names are rare exact terms, lexical territory.
Unrelated queries (other subjects, with and without a style phrase) test the relevance floor.

Reports recall@1 / recall@3 for lexical (BM25), dense, hybrid RRF and hybrid min-max (no
floor), then calibrates the floor (dense-cosine threshold, plus the lexical rule) on one half
of the queries and reports it on the other half.

    python benchmarks/retrieval_bench.py [--seed 0] [--queries-per-memory 2] [--out runs/bench/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# topic: (memory-side phrasings, query-side phrasings) -- the two sides share no content word
TOPICS = [
    (["Italian cooking", "pasta recipes", "cooking Italian food"], ["making spaghetti", "a noodle dinner", "what to make with linguine and tomato sauce"]),
    (["car maintenance", "engine repair", "servicing an automobile"], ["fixing my vehicle", "my sedan won't start", "a strange noise under the hood"]),
    (["income tax filing", "tax returns", "filing taxes"], ["paying the IRS", "deductions on my yearly statement", "what I owe the revenue service in April"]),
    (["gardening", "growing vegetables", "a vegetable garden"], ["planting tomatoes in my backyard", "keeping herbs alive outdoors", "soil and seedlings"]),
    (["dog training", "teaching a puppy obedience", "training dogs"], ["getting my pup to sit", "stopping my hound from barking", "leash manners for my pet"]),
    (["strength training", "weightlifting workouts", "lifting weights"], ["building muscle at the gym", "a barbell routine", "bench press and squats"]),
    (["travel in Japan", "visiting Tokyo", "a holiday in Japan"], ["a trip to Kyoto", "touring Osaka and Hiroshima", "sightseeing in Hokkaido"]),
    (["personal budgeting", "saving money", "household finances"], ["managing my monthly spending", "putting cash aside each paycheck", "cutting expenses"]),
    (["debugging software", "fixing code errors", "software bugs"], ["my program crashes", "an exception in my app", "a stack trace I can't read"]),
    (["buying a house", "home mortgages", "purchasing a home"], ["a loan for my first property", "real estate down payment", "closing on a condo"]),
    (["insomnia", "sleep problems", "sleeping badly"], ["I can't fall asleep at night", "waking up at 3am", "restless nights"]),
    (["learning Spanish", "Spanish grammar", "studying Spanish"], ["practicing espanol", "conjugating verbs before my trip to Madrid", "talking with people in Mexico"]),
    (["wedding planning", "organizing a wedding", "planning a marriage ceremony"], ["my big day next June", "getting hitched", "choosing a bridal venue"]),
    (["job interviews", "preparing for an interview", "interviewing for jobs"], ["meeting a recruiter", "questions an employer might ask", "landing the position"]),
    (["climate change", "global warming", "the climate crisis"], ["rising temperatures on the planet", "carbon emissions", "melting glaciers"]),
    (["newborn care", "caring for a baby", "infant care"], ["my infant's feeding schedule", "diapers and naps for my son", "a two month old crying"]),
    (["chess strategy", "chess openings", "playing chess"], ["the Sicilian defence", "checkmating with a rook", "a king and queen endgame"]),
    (["photography", "taking photographs", "camera technique"], ["shooting portraits", "exposure settings on my DSLR", "aperture and shutter speed"]),
    (["kitchen renovation", "remodeling a kitchen", "renovating the house"], ["redoing my cabinets and countertops", "fixing up the place", "new tiles and flooring"]),
    (["diabetes management", "blood sugar control", "managing diabetes"], ["keeping my glucose stable", "insulin doses", "carb counting for type 2"]),
]

# style: (memory-side phrasings, query-side phrasings)
STYLES = [
    (["answer in two sentences at most", "keep answers brief"], ["short reply please", "tl;dr version", "just the gist"]),
    (["use a formal, professional tone", "write formally"], ["sound polite and businesslike", "like a corporate letter", "in an official register"]),
    (["explain step by step", "give numbered instructions"], ["walk me through each stage", "a sequence of actions in order", "one thing after another"]),
    (["assume the user is a beginner", "avoid jargon"], ["I'm a total newbie", "explain like I'm five", "no technical terms"]),
    (["include cost estimates", "mention prices"], ["how much will it set me back", "what's the damage in dollars", "how expensive is it"]),
    (["answer in French", "respond in French"], ["reply en francais", "write it in the language of Paris", "in the tongue of Quebec"]),
    (["warn about safety risks", "mention the dangers"], ["what could hurt me", "hazards I should watch for", "anything hazardous"]),
    (["use bullet points", "format the answer as a list"], ["a bulleted reply", "itemized format", "dot points"]),
    (["be encouraging and upbeat", "use a cheerful tone"], ["cheer me on", "motivate me", "pep talk style"]),
    (["cite scientific sources", "reference research studies"], ["back it up with papers", "evidence from academic journals", "peer-reviewed proof"]),
    (["include a joke", "add some humor"], ["make me laugh", "something witty", "a funny twist"]),
    (["compare the options in a table", "show pros and cons"], ["advantages versus disadvantages", "weigh the alternatives side by side", "tradeoffs of each choice"]),
]

MEMORY_TEMPLATES = ["When {n} asks about {t}, {s}.", "{n}'s preference for {t}: {s}.", "For {n}'s questions on {t}, {s}.",
                    "{n}, {t}: {s}."]
QUERY_TEMPLATES = ["{s}: {t}?", "Can you help with {t}? {s}.", "{t} -- {s}", "I need advice on {t}, {s}."]
NAMED_TEMPLATES = ["What does {n} want for {t}?", "{n} is asking about {t}.", "Help {n} with {t}."]
SYLLABLES = ["bel", "var", "ok", "ru", "zan", "to", "mi", "dre", "ka", "lo", "sen", "ti", "quor", "fa", "nel", "ish"]

# unrelated subjects (no topic above)
UNRELATED = ["the boiling point of mercury", "who won the 1998 football world cup", "the plot of Hamlet",
             "how black holes evaporate", "the history of the Byzantine empire", "the capital of Mongolia",
             "how to tune a violin", "the rules of cricket", "the life cycle of a butterfly", "how volcanoes erupt",
             "the works of Frida Kahlo", "the speed of light in glass", "the migration of arctic terns",
             "the invention of the printing press", "how tides work", "the tallest mountain in Africa",
             "the chemistry of rust", "the meaning of a haiku", "the orbit of Neptune", "the Roman senate",
             "jazz chord progressions", "the anatomy of an octopus", "how glaciers carve valleys",
             "the French revolution", "prime numbers", "the origin of the Olympic games",
             "how bees make honey", "medieval castles", "the Great Barrier Reef", "how radar works"]
UNRELATED_TEMPLATES = ["Tell me about {u}.", "What do you know about {u}?", "{u}?", "Explain {u}."]


def names(rng: random.Random, n: int) -> list[str]:
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    out = sorted(out)  # not set order: that changes with PYTHONHASHSEED
    rng.shuffle(out)
    return out


def generate(seed: int, queries_per_memory: int):
    """(memories [(id, text)], queries [(text, id, kind)], unrelated, unrelated-with-style)."""
    rng = random.Random(seed)
    memories, queries = [], []
    people = iter(names(rng, len(TOPICS) * len(STYLES)))
    cap = lambda q: q[0].upper() + q[1:]  # noqa: E731
    for ti, (tm, tq) in enumerate(TOPICS):
        for si, (sm, sq) in enumerate(STYLES):
            mid, who = f"m{ti:02d}-{si:02d}", next(people)
            t, s = rng.choice(tm), rng.choice(sm)
            memories.append((mid, rng.choice(MEMORY_TEMPLATES).format(n=who, t=t, s=s)))
            for tqi, sqi in rng.sample([(a, b) for a in tq for b in sq], queries_per_memory):
                queries.append((cap(rng.choice(QUERY_TEMPLATES).format(t=tqi, s=sqi)), mid, "paraphrase"))
            # partial: keep one content word of the memory's topic or style phrase
            word = rng.choice([w for w in (t + " " + s).replace(",", "").split() if len(w) > 3])
            tqi, sqi = rng.choice(tq), rng.choice(sq)
            if rng.random() < 0.5:
                tqi = f"{tqi} ({word})"
            else:
                sqi = f"{sqi}, {word}"
            queries.append((cap(rng.choice(QUERY_TEMPLATES).format(t=tqi, s=sqi)), mid, "partial"))
            queries.append((rng.choice(NAMED_TEMPLATES).format(n=who, t=rng.choice(tq)), mid, "named"))
    unrelated = [t.format(u=u) for u in UNRELATED for t in UNRELATED_TEMPLATES]
    # the hard kind: an off-topic question that carries a style phrase the memories also talk about
    styled = [rng.choice(QUERY_TEMPLATES).format(t=u, s=rng.choice(rng.choice(STYLES)[1]))
              for u in UNRELATED for _ in range(4)]
    return memories, queries, unrelated, styled


def overlap(a: str, b: str) -> float:
    from memory_store.retrieval import tokenize

    x, y = set(tokenize(a)), set(tokenize(b))
    return len(x & y) / max(len(x | y), 1)


def random_controller(i: int):
    import torch

    from ntkmirror.controller import Controller

    g = torch.Generator().manual_seed(i)
    keys = torch.randperm(8 * 64, generator=g)[:32]
    return Controller(keys // 64, keys % 64, torch.randn(32, generator=g), n_layers=8, hidden_size=64,
                      meta={"model_name": "bench", "model_fingerprint": "bench"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries-per-memory", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/retrieval.json")
    args = ap.parse_args()

    from memory_store import embed
    from memory_store.local import LocalStore
    from memory_store.retrieval import FUSIONS, RARE_DF

    memories, queries, unrelated, styled = generate(args.seed, args.queries_per_memory)
    text_of = dict(memories)
    kinds = sorted({k for _, _, k in queries})
    jaccard = {k: float(np.mean([overlap(q, text_of[m]) for q, m, kk in queries if kk == k])) for k in kinds}
    print(f"{len(memories)} memories; queries: " + ", ".join(
        f"{sum(k == kk for *_, kk in queries)} {k} (content-word Jaccard with the memory {jaccard[k]:.3f})"
        for k in kinds) + f"; {len(unrelated)} unrelated, {len(styled)} unrelated-with-style")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        store = LocalStore(d, durable=False)
        store.put_many("bench", [dict(id=m, controller=random_controller(i), text=t) for i, (m, t) in enumerate(memories)])
        add_s = time.perf_counter() - t0
        qvec = {q: v for q, v in zip([q for q, *_ in queries] + unrelated + styled,
                                     embed.embed([q for q, *_ in queries] + unrelated + styled))}

        def run(q, fusion, floor=-1.0, k=3, rare_df=RARE_DF):
            store.rare_df = rare_df
            return store.search("bench", q, top_k=k, fusion=fusion, min_score=floor, query_embedding=qvec[q])

        # 1. ranking quality, no floor
        recall = {}
        for fusion in ("lexical", "dense", "rrf", "minmax"):
            assert fusion in FUSIONS
            got = [(kind, [h.item.id for h in run(q, fusion)], m) for q, m, kind in queries]
            recall[fusion] = {k: {"recall@1": float(np.mean([ids[:1] == [m] for kk, ids, m in got if kk == k])),
                                  "recall@3": float(np.mean([m in ids for kk, ids, m in got if kk == k]))}
                              for k in kinds}
            recall[fusion]["all"] = {"recall@1": float(np.mean([ids[:1] == [m] for _, ids, m in got])),
                                     "recall@3": float(np.mean([m in ids for _, ids, m in got]))}
        # the default is the better hybrid over all queries (the brief: rrf or min-max, by this benchmark)
        best = max(("rrf", "minmax"), key=lambda f: (recall[f]["all"]["recall@1"], recall[f]["all"]["recall@3"]))

        # 2. relevance floor: calibrate on half the queries, report on the other half
        rng = random.Random(args.seed + 1)
        idx = list(range(len(queries)))
        rng.shuffle(idx)
        cal, test = set(idx[: len(idx) // 2]), set(idx[len(idx) // 2:])
        negatives = unrelated + styled
        neg_idx = list(range(len(negatives)))
        rng.shuffle(neg_idx)
        neg_cal, neg_test = set(neg_idx[: len(neg_idx) // 2]), set(neg_idx[len(neg_idx) // 2:])
        # top dense cosine and whether the right memory is retrieved, per query, without floor
        top_dense = {q: max([h.dense for h in run(q, "dense", k=1)] or [0.0]) for q in qvec}

        def rates(floor, pos, neg, rare_df=RARE_DF):
            """kept: the right memory is among the hits; rejected: an unrelated query gets none."""
            kept = np.mean([queries[i][1] in [h.item.id for h in run(queries[i][0], best, floor, rare_df=rare_df)]
                            for i in pos])
            rejected = np.mean([not run(negatives[i], best, floor, rare_df=rare_df) for i in neg]) if neg else 0.0
            return float(kept), float(rejected)

        grid = [round(x, 2) for x in np.arange(0.20, 0.61, 0.025)]
        cal_rows = []
        for floor in grid:
            kept, rejected = rates(floor, cal, neg_cal)
            cal_rows.append({"floor": floor, "kept": kept, "rejected": rejected})
        # the requirement is "an unrelated query gets no hits": the lowest floor that rejects at
        # least 95% of the calibration half's unrelated queries (so it keeps the most)
        chosen = min([r for r in cal_rows if r["rejected"] >= 0.95] or cal_rows[-1:], key=lambda r: r["floor"])["floor"]
        kept, rejected = rates(chosen, test, neg_test)
        kept_by_kind = {k: rates(chosen, [i for i in test if queries[i][2] == k], [])[0] for k in kinds}
        no_lex_kept, no_lex_rejected = rates(chosen, test, neg_test, rare_df=-1.0)  # dense floor alone
        store.close()

    print(f"\nrecall@1 / recall@3 (no floor), {len(queries)} queries over {len(memories)} memories:")
    print(f"{'method':<10}" + "".join(f"{k:>16}" for k in kinds + ["all"]))
    for f, r in recall.items():
        print(f"{f:<10}" + "".join(f"{r[k]['recall@1']:>9.3f} / {r[k]['recall@3']:.3f}" for k in kinds + ["all"]))
    print(f"-> default fusion: {best}")
    print(f"\nrelevance floor on the dense cosine ({best}), calibration half:")
    print(f"{'floor':>6}{'kept':>8}{'rejected':>10}   (chosen: the lowest floor rejecting >= 95%)")
    for r in cal_rows:
        print(f"{r['floor']:>6.3f}{r['kept']:>8.3f}{r['rejected']:>10.3f}" + ("  <-" if r["floor"] == chosen else ""))
    print(f"\nheld-out half at floor {chosen}: right memory kept (retrieved and above the floor) {kept:.3f}, "
          f"unrelated queries answered with no hits {rejected:.3f} "
          f"(dense floor without the rare-term rule: kept {no_lex_kept:.3f}, rejected {no_lex_rejected:.3f}); "
          "kept by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in kept_by_kind.items()))
    pos_cos = [top_dense[q] for q, *_ in queries]
    print(f"top dense cosine: paraphrased queries median {np.median(pos_cos):.3f} (p10 {np.percentile(pos_cos, 10):.3f}); "
          f"unrelated median {np.median([top_dense[q] for q in unrelated]):.3f} "
          f"(p90 {np.percentile([top_dense[q] for q in unrelated], 90):.3f}); "
          f"unrelated-with-style median {np.median([top_dense[q] for q in styled]):.3f} "
          f"(p90 {np.percentile([top_dense[q] for q in styled], 90):.3f})")

    res = {"memories": len(memories), "queries": {k: sum(k == kk for *_, kk in queries) for k in kinds},
           "unrelated": len(unrelated), "styled_unrelated": len(styled), "seed": args.seed, "content_jaccard": jaccard,
           "recall": recall, "default_fusion": best, "floor_calibration": cal_rows, "chosen_floor": chosen,
           "rare_df": RARE_DF, "held_out": {"kept": kept, "rejected": rejected, "kept_by_kind": kept_by_kind,
                                                    "dense_floor_only": {"kept": no_lex_kept, "rejected": no_lex_rejected}},
           "add_seconds": add_s}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
