"""What one lm_head chunk of the log-prob head costs, forward and backward under its checkpoint, by setting.

    python bench/logps_chunk.py                      # vocabulary 151,936, 220 tokens (the default chunk), one thread
    python bench/logps_chunk.py --iters 3 --vocab 4096 --tokens 64
    python bench/logps_chunk.py --device cuda --dtype bfloat16 --hidden 2048 --iters 50   # a GPU: adds peak memory
    python bench/logps_chunk.py --total-tokens 4096 --tokens 883   # a micro-batch's head, in chunks of 883
    python bench/logps_chunk.py --frozen-head ...   # the lm_head takes no gradient, as in a LoRA run

Each chunk also costs the host ~1.4-2 ms (the checkpoint, the autograd functions, the launches), about what an H200
spends on a 220-token chunk's arithmetic: `--total-tokens` times a micro-batch's completion tokens chunk by chunk,
so that chunk sizes can be compared by what a step pays for them.

`SequenceLogps` runs the lm_head over chunks of completion positions, each checkpointed, so backward recomputes
the chunk's logits. Per setting, interleaved, the median wall time of `--iters` runs of one chunk (or of
`--total-tokens`):
- `recompute-as-forward`: the checkpoint recomputes exactly what the forward ran (`_chunk_token_stats` with the
  per-token metrics: argmax, an exp pass over the vocabulary), as before `_CheckpointedChunk`;
- `metrics`: with the metrics, the recompute taking the plain logsumexp (`_CheckpointedChunk`, the default);
- `no-metrics`: `training.token_metrics: false`;
- `compiled-metrics`, `compiled-no-metrics`: the same with `model.compile`'s head (`compiled_head.py`: the
  vocabulary-wide math in three compiled kernels, logits kept in the model's dtype), compiled in the warm-up.
`--frozen-head` leaves the lm_head weight without a gradient, as a LoRA run without an lm_head adapter has it. On a
GPU that is what shows a chunk's own peak: the weight's gradient (V x H, and the accumulation of each chunk's into
it) is larger than a chunk's logits (n x V) whenever n < H, and otherwise sets the peak for every setting alike.
Then the normaliser alone on one chunk's logits (the metrics' max + exp + sum against `torch.logsumexp`). Exits
non-zero if an eager setting's gradients differ from `recompute-as-forward`'s (they are meant to be bit-identical)
or a compiled one's by more than rounding (relative norm of the difference: 1e-5 in fp32, 1e-2 in bf16).
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

from dpo_dist import compiled_head  # noqa: E402
from dpo_dist.logps import _CheckpointedChunk, _chunk_token_stats, default_chunk_tokens  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens in the chunk (default: the eager head's default chunk, 220 at Qwen's vocabulary)")
    parser.add_argument("--total-tokens", type=int, default=None,
                        help="time the head over this many tokens in chunks of --tokens, as SequenceLogps runs a "
                             "micro-batch (default: one chunk)")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--frozen-head", action="store_true",
                        help="no gradient for the lm_head weight (a LoRA run's head): the peak is the chunk's own")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokens = args.tokens or default_chunk_tokens(args.vocab)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_gpu = device.type == "cuda"
    lm_head = nn.Linear(args.hidden, args.vocab, bias=False).to(device, dtype)
    lm_head.weight.requires_grad_(not args.frozen_head)
    total = args.total_tokens or tokens
    hidden = torch.randn(total, args.hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, args.vocab, (total,), device=device)

    def over_chunks(one_chunk):
        """The head over all `total` tokens, chunk after chunk, the log-probs concatenated (as SequenceLogps)."""
        def run_all():
            logps = [one_chunk(hidden[start : start + tokens], targets[start : start + tokens])[0]
                     for start in range(0, total, tokens)]
            return torch.cat(logps), None, None
        return run_all

    def chunk(head, token_metrics: bool):
        def one_chunk(part, part_targets):
            return checkpoint(_CheckpointedChunk(head, token_metrics, False), lm_head, part, part_targets,
                              use_reentrant=False)
        return over_chunks(one_chunk)

    settings = {
        "recompute-as-forward": over_chunks(lambda part, part_targets: checkpoint(
            _chunk_token_stats, lm_head, part, part_targets, True, False, use_reentrant=False)),
        "metrics": chunk(_chunk_token_stats, True),
        "no-metrics": chunk(_chunk_token_stats, False),
        "compiled-metrics": chunk(compiled_head.chunk_token_stats, True),
        "compiled-no-metrics": chunk(compiled_head.chunk_token_stats, False),
    }

    def run(setting: str) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """(ms, peak MB above what was allocated before, hidden's gradient, the lm_head's)."""
        lm_head.zero_grad()
        hidden.grad = None
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if on_gpu else 0
        start = time.perf_counter()
        logps, _, _ = settings[setting]()
        logps.sum().backward()
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1e3
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if on_gpu else float("nan")
        weight_grad = None if args.frozen_head else lm_head.weight.grad.clone()
        return elapsed, peak, hidden.grad.clone(), weight_grad

    first = {setting: run(setting) for setting in settings}  # warm-up (and compile), and the gradients to compare
    times = {setting: [] for setting in settings}
    for _ in range(args.iters):
        for setting in settings:
            times[setting].append(run(setting)[0])
    what = f"one chunk: {tokens} tokens"
    if args.total_tokens:
        what = f"{total} tokens in {-(-total // tokens)} chunks of {tokens}"
    frozen = ", lm_head frozen" if args.frozen_head else ""
    print(f"{what} x vocabulary {args.vocab:,}, hidden {args.hidden}, {args.dtype} on {device}{frozen}, "
          f"{args.threads} thread(s), median of {args.iters} interleaved runs")
    baseline = statistics.median(times["recompute-as-forward"])
    for setting, runs in times.items():
        median = statistics.median(runs)
        memory = f"  peak +{first[setting][1]:,.0f} MB" if on_gpu else ""
        print(f"  {setting:22s} {median:9.2f} ms  {median / baseline - 1:+.1%}{memory}")

    logits = torch.randn(tokens, args.vocab, device=device)

    def metrics_normalizer():
        max_logits, _ = logits.max(dim=-1)
        return max_logits + (logits - max_logits.unsqueeze(-1)).exp_().sum(dim=-1).log()

    normalizers = {"max + exp + sum": metrics_normalizer, "torch.logsumexp": lambda: torch.logsumexp(logits, dim=-1)}
    normalizer_times = {name: [] for name in normalizers}
    for _ in range(args.iters):
        for name, fn in normalizers.items():
            start = time.perf_counter()
            fn()
            if on_gpu:
                torch.cuda.synchronize()
            normalizer_times[name].append((time.perf_counter() - start) * 1e3)
    for name, runs in normalizer_times.items():
        print(f"  normaliser, {name:16s} {statistics.median(runs):9.1f} ms")

    reference = first["recompute-as-forward"]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    differ = []
    for setting, (_, _, hidden_grad, weight_grad) in first.items():
        pairs = [(hidden_grad, reference[2])] + ([] if args.frozen_head else [(weight_grad, reference[3])])
        if setting.startswith("compiled"):
            errors = [((got.float() - want.float()).norm() / want.float().norm()).item() for got, want in pairs]
            print(f"  {setting}: gradients' relative difference from eager {max(errors):.2e}")
            if max(errors) > tolerance:
                differ.append(setting)
        elif not all(torch.equal(got, want) for got, want in pairs):
            differ.append(setting)
    print("gradients alike across settings" if not differ else f"gradients DIFFER: {', '.join(differ)}")
    sys.exit(1 if differ else 0)

if __name__ == "__main__":
    main()
