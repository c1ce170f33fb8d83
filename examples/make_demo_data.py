"""Make the demo preference data: sort a list of numbers ascending.

The preference is LEARNABLE and generalises to held-out prompts: the chosen answer is the
numbers in ascending order, the rejected answer is the same numbers in a different order. A tiny
model trained with DPO on the train split raises held-out reward accuracy well above 0.5.
Records are chat message lists (some with a system message, some multi-turn); a few use plain
strings, so both formats go through the demo.

    python examples/make_demo_data.py      # rewrites examples/data/demo_{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data"


def _pair(rng: random.Random) -> dict:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    ordered = sorted(numbers)
    rejected = ordered[:]
    while rejected == ordered:
        rng.shuffle(rejected)
    question = "Sort ascending: " + " ".join(map(str, numbers))
    chosen_text = " ".join(map(str, ordered))
    rejected_text = " ".join(map(str, rejected))
    style = rng.random()
    if style < 0.15:  # plain strings: the completion gets EOS appended, as in TRL
        return {"prompt": question + "\nAnswer:", "chosen": " " + chosen_text, "rejected": " " + rejected_text}
    prompt = [{"role": "user", "content": question}]
    if style < 0.35:
        prompt.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    elif style < 0.5:  # multi-turn: an earlier exchange before the question
        warmup = sorted(rng.sample(range(100), 2))
        prompt = [
            {"role": "user", "content": "Sort ascending: " + " ".join(map(str, reversed(warmup)))},
            {"role": "assistant", "content": " ".join(map(str, warmup))},
        ] + prompt
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen_text}],
        "rejected": [{"role": "assistant", "content": rejected_text}],
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("demo_train.jsonl", 512, 0), ("demo_eval.jsonl", 64, 1)):
        rng = random.Random(seed)
        lines = [json.dumps(_pair(rng)) for _ in range(count)]
        (OUT / name).write_text("\n".join(lines) + "\n")
        print(f"wrote {OUT / name} ({count} pairs)")


if __name__ == "__main__":
    main()
