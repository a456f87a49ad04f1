"""Write the bundled arithmetic examples (seeded, train/eval disjoint).

    python examples/make_examples.py            # -> examples/math_train.jsonl, examples/math_eval.jsonl
"""

import json
import random
from pathlib import Path


def rows(pairs):
    return [{"prompt": f"Question: {a} + {b} = ?\nAnswer:", "completion": f" {a + b}"} for a, b in pairs]


def main(out=Path(__file__).parent, n_train=256, n_eval=32, seed=0):
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if (a % 10) + (b % 10) >= 10]  # carrying
    rng.shuffle(pairs)
    train, evals = pairs[:n_train], pairs[n_train:n_train + n_eval]
    assert not set(train) & set(evals)
    for name, part in (("math_train.jsonl", train), ("math_eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows(part)))


if __name__ == "__main__":
    main()
