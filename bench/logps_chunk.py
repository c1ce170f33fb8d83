"""What one lm_head chunk of the log-prob head costs, forward and backward under its checkpoint, by setting.

    python bench/logps_chunk.py                      # vocabulary 151,936, 220 tokens (the default chunk), one thread
    python bench/logps_chunk.py --iters 3 --vocab 4096 --tokens 64

`SequenceLogps` runs the lm_head over chunks of completion positions, each checkpointed, so backward recomputes
the chunk's logits. Per setting, interleaved, the median wall time of `--iters` runs of one chunk:
- `recompute-as-forward`: the checkpoint recomputes exactly what the forward ran (`_chunk_token_stats` with the
  per-token metrics: argmax, an exp pass over the vocabulary), as before `_CheckpointedChunk`;
- `metrics`: with the metrics, the recompute taking the plain logsumexp (`_CheckpointedChunk`, the default);
- `no-metrics`: `training.token_metrics: false`.
Then the normaliser alone on one chunk's logits (the metrics' max + exp + sum against `torch.logsumexp`). Exits
non-zero if a setting's gradients differ from `recompute-as-forward`'s (they are meant to be bit-identical).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed

from dpo_dist.logps import _CheckpointedChunk, _chunk_token_stats, default_chunk_tokens  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=None, help="tokens in the chunk (default: the trainer's chunk)")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokens = args.tokens or default_chunk_tokens(args.vocab)
    lm_head = nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(tokens, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (tokens,))
    settings = {
        "recompute-as-forward": lambda: checkpoint(_chunk_token_stats, lm_head, hidden, targets, True, False,
                                                   use_reentrant=False),
        "metrics": lambda: checkpoint(_CheckpointedChunk(True, False), lm_head, hidden, targets, use_reentrant=False),
        "no-metrics": lambda: checkpoint(_CheckpointedChunk(False, False), lm_head, hidden, targets, use_reentrant=False),
    }

    def run(setting: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        lm_head.zero_grad()
        hidden.grad = None
        start = time.perf_counter()
        logps, _, _ = settings[setting]()
        logps.sum().backward()
        return (time.perf_counter() - start) * 1e3, hidden.grad.clone(), lm_head.weight.grad.clone()

    first = {setting: run(setting) for setting in settings}  # warm-up, and the gradients to compare
    times = {setting: [] for setting in settings}
    for _ in range(args.iters):
        for setting in settings:
            times[setting].append(run(setting)[0])
    print(f"one chunk: {tokens} tokens x vocabulary {args.vocab:,}, hidden {args.hidden}, {args.threads} thread(s), "
          f"median of {args.iters} interleaved runs")
    baseline = statistics.median(times["recompute-as-forward"])
    for setting, runs in times.items():
        median = statistics.median(runs)
        print(f"  {setting:22s} {median:9.1f} ms  {median / baseline - 1:+.1%}")

    logits = torch.randn(tokens, args.vocab)

    def metrics_normalizer():
        max_logits, _ = logits.max(dim=-1)
        return max_logits + (logits - max_logits.unsqueeze(-1)).exp_().sum(dim=-1).log()

    normalizers = {"max + exp + sum": metrics_normalizer, "torch.logsumexp": lambda: torch.logsumexp(logits, dim=-1)}
    normalizer_times = {name: [] for name in normalizers}
    for _ in range(args.iters):
        for name, fn in normalizers.items():
            start = time.perf_counter()
            fn()
            normalizer_times[name].append((time.perf_counter() - start) * 1e3)
    for name, runs in normalizer_times.items():
        print(f"  normaliser, {name:16s} {statistics.median(runs):9.1f} ms")

    reference = first["recompute-as-forward"]
    differ = [setting for setting, (_, hidden_grad, weight_grad) in first.items()
              if not (torch.equal(hidden_grad, reference[1]) and torch.equal(weight_grad, reference[2]))]
    print("gradients bit-identical across settings" if not differ else f"gradients DIFFER: {', '.join(differ)}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
