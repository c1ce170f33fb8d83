"""What building one micro-batch costs the host, by data layout.

    python bench/collate.py                        # 2 pairs x 2,048 tokens (half prompt), as the GPU cases
    python bench/collate.py --pairs 4 --seq-len 4096

The trainer collates each micro-batch on the host (`Trainer._micro_batches`): the first of a step when the step
starts, while the device has nothing to run; each later one once the micro-batch before it has queued its forward
and loss, before its backward (`Trainer.train_step`), so while the device runs them. Per layout, the median of
`--iters` builds of the same micro-batch of random token ids (prompt and each completion half of `--seq-len`, the
completions differing from their first token), in ms, and its ratio to the padded layout's (`collate`, which only
pads and stacks).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed

from dpo_dist.data import collate_for  # noqa: E402
from dpo_dist.examples import PreferenceExample  # noqa: E402

LAYOUTS = {"padded": (False, False), "packed": (True, False), "prefix-shared": (False, True),
           "prefix-shared packed": (True, True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    return parser.parse_args()


def random_pair(index: int, seq_len: int, rng: random.Random) -> PreferenceExample:
    prompt_len = seq_len // 2
    prompt = [rng.randrange(1, 30000) for _ in range(prompt_len)]
    chosen = prompt + [1] + [rng.randrange(1, 30000) for _ in range(seq_len - prompt_len - 1)]
    rejected = prompt + [2] + [rng.randrange(1, 30000) for _ in range(seq_len - prompt_len - 1)]
    return PreferenceExample(f"pair-{index}", chosen, prompt_len, rejected, prompt_len)


def main() -> None:
    args = parse_args()
    rng = random.Random(0)
    examples = [random_pair(i, args.seq_len, rng) for i in range(args.pairs)]
    medians = {}
    for name, (packing, prefix_sharing) in LAYOUTS.items():
        collate = collate_for(packing, prefix_sharing)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            collate(examples, 0, None, [])
            times.append((time.perf_counter() - start) * 1e3)
        medians[name] = statistics.median(times)
    print(f"one micro-batch: {args.pairs} pairs x {args.seq_len} tokens a side, median of {args.iters} builds")
    for name, median in medians.items():
        print(f"  {name:22s} {median:8.2f} ms  {median / medians['padded']:6.2f}x padded")


if __name__ == "__main__":
    main()
