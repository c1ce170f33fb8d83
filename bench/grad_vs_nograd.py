"""Does the policy's grad-enabled forward score a batch exactly as the reference's no-grad forward does?

At step 1 the policy IS the reference, so DPO's first loss is exactly ln 2 when both forwards compute
the same numbers. On an H200 in bf16, dpo-dist's first loss was within 3e-4 of ln 2 (TRL's exact); on
CPU it is exact. This finds out why on the machine it runs on: one random Qwen3-shaped model, one
padded batch, sequence log-probs through `SequenceLogps` with gradients on and off, first with
torch's own choice of attention kernel, then with each sdpa backend forced in turn.

    python bench/grad_vs_nograd.py --device cuda --preset qwen3-0.6b     # bf16 on a GPU (~1 min)
    python bench/grad_vs_nograd.py                                       # a tiny fp32 model on CPU

Prints, per kernel choice, the largest |grad - no_grad| difference of a sequence log-prob (0 means the
first loss is exactly ln 2) or why that backend cannot run the batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from workload import PRESETS, apply_preset, make_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dpo_dist, also when not installed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4, help="rows of the padded batch (2 pairs = 4 rows)")
    args = parser.parse_args()
    # the shape flags workload.py reads; a preset overwrites them
    args.vocab_size, args.hidden, args.intermediate, args.layers = 151936, 64, None, 2
    args.heads, args.kv_heads, args.head_dim, args.untied = None, None, 32, False
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and not args.preset:
        args.seq_len = min(args.seq_len, 256)
    apply_preset(args)
    return args


def scored_logps(scorer, batch, grad: bool):
    import torch

    from dpo_dist.logps import forward_pair

    with torch.set_grad_enabled(grad):
        pair = forward_pair(scorer, batch)
    return torch.cat([pair.chosen_logps, pair.rejected_logps]).detach().double()


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from dpo_dist.data import PairBatch
    from dpo_dist.logps import SequenceLogps

    args = parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir = make_model(Path(work) / "model", args)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model.to(args.device).train()  # as the policy: train mode, parameters requiring grad
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 500, (args.rows, args.seq_len), generator=generator)
    lengths = [args.seq_len - 37 * row for row in range(args.rows)]  # right-padded rows of different lengths
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        completion_mask[row, length // 2 : length] = 1
    batch = PairBatch(input_ids, attention_mask, completion_mask, torch.ones(args.rows // 2)).to(args.device)
    scorer = SequenceLogps(model)

    choices = [("torch's choice", None)] + [(backend.name, backend) for backend in
                                            (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                             SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)]
    print(f"{args.preset or 'tiny'} {args.dtype} on {args.device}, {args.rows} rows x {args.seq_len} tokens")
    for name, backend in choices:
        try:
            if backend is None:
                with_grad, without = scored_logps(scorer, batch, True), scored_logps(scorer, batch, False)
            else:
                with sdpa_kernel([backend]):
                    with_grad, without = scored_logps(scorer, batch, True), scored_logps(scorer, batch, False)
        except RuntimeError as err:  # the backend cannot run this batch (dtype, device, shape)
            print(f"  {name:<22} cannot run: {str(err).splitlines()[0][:100]}")
            continue
        print(f"  {name:<22} max |grad - no_grad| = {(with_grad - without).abs().max().item():.3e}"
              f"   (log-probs ~{without.abs().mean().item():.1f})")


if __name__ == "__main__":
    main()
