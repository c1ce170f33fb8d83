"""Does the policy's forward score a batch exactly as the reference's does, per forward mode, eager and compiled?

At step 1 the policy IS the reference, so DPO's first loss is exactly ln 2 when the policy's forward (train
mode, grad on, adapter on) and the reference's (eval mode, no grad, adapter off) compute the same numbers. In
bf16 any last-bit difference inside the decoder moves a sequence's log-prob (a sum over ~1,000 tokens) by about
a nat. On CPU eager and compiled layers agree exactly. On an H200, compiled layers with eager's rounding alone
disagreed by up to 2.8 nats between graphs (a 4B LoRA run began at loss 0.7315 where TRL's began at ln 2): inductor
timed each graph's reduction kernels and kept the fastest block sizes, which sum in different orders. Its
deterministic mode (dpo-dist's default since 2026-11-28) brought them within run-to-run noise (bench/RESULTS.md).

One random Qwen3-shaped model per variant (the same weights for every variant), one micro-batch of random pairs
(half prompt) in each layout (padded; prefix sharing), and the sequence log-probs of each forward mode:

    policy      train, grad, adapter on           (the trainer's policy forward; run again: run-to-run noise)
    reference   eval, no grad, adapter off        (the trainer's adapter reference; a separate one: no adapter)
    no_grad     train, no grad, adapter on
    ref_grad    eval, grad, adapter off           (the reference through a grad-mode graph)
(train and eval differ only in a flag: dropout is 0). Variants as in bench/decoder_ceiling.py, plus `nodet`:
compiled layers without inductor's deterministic mode, as before 2026-11-28 (the compiled log-prob head,
`dpo_dist/compiled_head.py`, compiles once per process, in deterministic mode, for every compiled variant).

    python bench/compile_parity.py --device cuda --preset qwen3-4b --lora-r 16 --variants eager,lean+compile,lean+compile+nodet
    python bench/compile_parity.py --variants eager,lean+compile                      # tiny, CPU (~5 min)

Prints per variant, layout and mode: the largest |log-prob - policy's| of a chosen and of a rejected sequence,
the mean (rejected - chosen) of those differences (a bias a first loss sees) and the first loss it gives at
beta 0.1 (ln 2 = 0.693147 when the mode matches the policy). The `eager` column, when `eager` is among the
variants (it runs first): each other variant's policy log-probs' largest difference from the eager variant's.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

from decoder_ceiling import build_model
from workload import PRESETS, apply_preset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed

MODES = ("policy", "reference", "no_grad", "ref_grad")
BETA = 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--lora-r", type=int, default=16, help="0 = full-parameter (the reference: the same weights)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens of a side (prompt + completion)")
    parser.add_argument("--variants", default="eager,lean+compile")
    parser.add_argument("--layouts", default="padded,shared")
    args = parser.parse_args()
    args.vocab_size, args.hidden, args.intermediate, args.layers = 151936, 64, None, 2
    args.heads, args.kv_heads, args.head_dim, args.untied = None, None, 32, False
    args.dtype = "bfloat16"  # what the GPU runs train in; on CPU bf16 is what showed the rounding fault
    if args.device == "cpu" and not args.preset:
        args.seq_len = min(args.seq_len, 256)
    apply_preset(args)
    return args


def random_pairs(args) -> list:
    from dpo_dist.examples import PreferenceExample

    rng = random.Random(0)
    pairs = []
    for index in range(args.pairs):
        prompt = [rng.randrange(5000) for _ in range(args.seq_len // 2)]
        chosen = prompt + [rng.randrange(5000) for _ in range(args.seq_len - len(prompt) - 7 * index)]
        rejected = prompt + [rng.randrange(5000) for _ in range(args.seq_len - len(prompt) - 11 * index)]
        pairs.append(PreferenceExample(str(index), chosen, len(prompt), rejected, len(prompt)))
    return pairs


def mode_logps(model, scorer, batch, mode: str):
    """(chosen, rejected) sequence log-probs, float64 on the host, of one forward in `mode`."""
    import contextlib

    import torch

    from dpo_dist.logps import forward_pair
    from dpo_dist.reference import AdapterSwitch

    grad = mode in ("policy", "ref_grad")
    adapter_off = mode in ("reference", "ref_grad") and hasattr(model, "disable_adapter")
    if adapter_off:  # AdapterSwitch (the trainer's) refuses grad mode; PEFT's own switch allows it
        switch = model.disable_adapter() if grad else AdapterSwitch(model).off()
    else:
        switch = contextlib.nullcontext()
    model.train(mode in ("policy", "no_grad"))
    try:
        with torch.set_grad_enabled(grad), switch:
            pair = forward_pair(scorer, batch)
    finally:
        model.train()
    return pair.chosen_logps.detach().double().cpu(), pair.rejected_logps.detach().double().cpu()


def first_loss(chosen_gain, rejected_gain) -> float:
    """DPO's loss, pair mean, when the policy's log-probs exceed the reference's by these gains."""
    margins = BETA * (chosen_gain - rejected_gain)
    return sum(-math.log(1 / (1 + math.exp(-m))) for m in margins.tolist()) / len(margins)


def main() -> None:
    import torch

    from dpo_dist.data import collate, collate_shared_prefix
    from dpo_dist.logps import SequenceLogps

    torch._dynamo.config.recompile_limit = 64  # four modes x two layouts of one layer graph each
    args = parse_args()
    pairs = random_pairs(args)
    layouts = {"padded": collate, "shared": collate_shared_prefix}
    batches = {name: layouts[name](pairs, 0).to(args.device) for name in args.layouts.split(",")}
    print(f"{args.preset or 'tiny'} {args.dtype} on {args.device}, {'LoRA r%d' % args.lora_r if args.lora_r else 'full'}, "
          f"{args.pairs} pairs x {args.seq_len} tokens a side; first loss at beta {BETA} (ln 2 = {math.log(2):.6f})")
    print(f"{'variant':<14} {'layout':<7} {'mode':<10} {'max|d chosen|':>13} {'max|d rejected|':>15} "
          f"{'mean(dr - dc)':>13} {'first loss':>10} {'eager':>9}")
    eager_policy = {}
    for variant in sorted(args.variants.split(","), key=lambda name: name != "eager"):  # eager first: the last column
        model = build_model(args, variant).to(args.device)
        scorer = SequenceLogps(model, compiled_head="compile" in variant.split("+"))  # as training builds it
        for layout, batch in batches.items():
            policy_chosen, policy_rejected = mode_logps(model, scorer, batch, "policy")
            if variant == "eager":
                eager_policy[layout] = torch.cat([policy_chosen, policy_rejected])
            for mode in MODES:
                chosen, rejected = mode_logps(model, scorer, batch, mode)
                chosen_gain, rejected_gain = policy_chosen - chosen, policy_rejected - rejected
                vs_eager = ""
                if layout in eager_policy and mode == "policy":
                    vs_eager = f"{(torch.cat([chosen, rejected]) - eager_policy[layout]).abs().max().item():9.3g}"
                print(f"{variant:<14} {layout:<7} {mode:<10} {chosen_gain.abs().max().item():13.4g} "
                      f"{rejected_gain.abs().max().item():15.4g} {(rejected_gain - chosen_gain).mean().item():13.4g} "
                      f"{first_loss(chosen_gain, rejected_gain):10.6f} {vs_eager}")
        del model, scorer
        torch._dynamo.reset()  # the next variant compiles afresh
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
