"""Predict per-GPU memory of a run from the model's config.json alone (no weights are loaded).

    python launch/plan.py --config configs/qwen3_8b_full_zero3.yaml --nodes 1 --gpus-per-node 8 --gpu-mem 80
    python launch/plan.py --config my.yaml --nodes 4 --gpus-per-node 8 model.gradient_checkpointing=false

Prints each part (weights, gradients, optimizer, reference, activations, logits, the optimizer step's
temporaries, overhead) with the phase it lives in, the peak (held parts + the larger of the backward
and step phases), whether it fits in --gpu-mem GiB, and single changes that would make it fit; then what
offload puts in host memory, per rank and per node (whether it fits in --host-mem GiB per node, when given).
Exit status 0 when it fits, 3 when it does not. dtype auto plans bf16. dpo_dist/planner.py documents the formula.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_dist.cli import EXIT_USER_ERROR  # noqa: E402
from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.engine import fill_ds_config, read_ds_config  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.models import read_model_config  # noqa: E402
from dpo_dist.planner import (  # noqa: E402
    GIB, HostPlan, ModelShape, host_memory, plan_memory, single_rank_note, zero_stage,
)

EXIT_DOES_NOT_FIT = 3


def read_shape(model) -> tuple[ModelShape, str | None]:
    """The policy's shape, and a note when it comes from model.base_model: a plan is often made before the SFT
    model it starts from exists, and SFT keeps the base model's shape."""
    try:
        return ModelShape.from_hf_config(read_model_config(model.policy_path)), None
    except UserError as err:
        if not model.sft_model or not model.base_model:
            raise
        shape = ModelShape.from_hf_config(read_model_config(model.base_model))
        why = "does not exist yet" if not Path(model.sft_model).expanduser().exists() else f"could not be read ({err})"
        return shape, (f"model.sft_model {model.sft_model} {why}: planned with model.base_model's shape "
                       f"({model.base_model}), which SFT keeps")


def check_positive(args: argparse.Namespace) -> None:
    for flag in ("nodes", "gpus_per_node", "gpu_mem", "host_mem"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number, got {value}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage block would bury the one line that says what is wrong
        print(f"error: {message} (--help lists the options)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--host-mem", type=float, default=None, help="GiB of host memory per node (checked when given)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    try:
        check_positive(args)
        config = load_config(args.config, args.overrides)
        shape, shape_note = read_shape(config.model)
        dtype_name = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
        import torch

        world = args.nodes * args.gpus_per_node
        ds = fill_ds_config(read_ds_config(config.deepspeed.config), config.training, getattr(torch, dtype_name), shape, world, config.lora)
        plan = plan_memory(config, shape, ds, world, dtype_name, args.gpu_mem * GIB)
        host = HostPlan(host_memory(config, shape, ds, world, dtype_name), args.gpus_per_node,
                        args.host_mem * GIB if args.host_mem is not None else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    active = f" ({(shape.parameters() - shape.idle_expert_elements()) / 1e9:.2f}B active per token)" if shape.experts else ""
    print(f"{config.model.policy_path}: {shape.parameters() / 1e9:.2f}B parameters{active}, {dtype_name}, {world} GPU(s), "
          f"reference {config.reference_mode}, ZeRO-{zero_stage(ds)}")
    if shape_note:
        print(f"  note: {shape_note}")
    print(plan.describe())
    note = single_rank_note(ds, world, on_gpu=True, lora=config.lora is not None)
    if note:
        print(f"  note: {note}")
    print(host.describe())
    sys.exit(0 if plan.fits and host.fits else EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    main()
