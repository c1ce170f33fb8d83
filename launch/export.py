"""Turn a DeepSpeed checkpoint (any ZeRO stage) into the Hugging Face layout of a final export.

    python launch/export.py --checkpoint output/run/checkpoint-400                  # -> output/run/checkpoint-400/hf
    python launch/export.py --checkpoint output/run/checkpoint-400 --out /models/x --merge

One process, CPU: the checkpoint's partitions are consolidated (DeepSpeed's zero_to_fp32), loaded
into the policy as the run's saved config.yaml describes it (base checkpoint, LoRA), cast to the
run's dtype and written like output_dir/final: full safetensors, or a PEFT adapter (plus
`merged/` with --merge or export.merge).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_dist.checkpoint import consolidated_checkpoint_state, export_hf  # noqa: E402
from dpo_dist.cli import EXIT_USER_ERROR  # noqa: E402
from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.engine import DistInfo, resolve_dtype  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.models import load_causal_lm, load_tokenizer, prepare_policy  # noqa: E402


def export_checkpoint(checkpoint: Path, out: Path, merge: bool) -> Path:
    if not (checkpoint / "config.yaml").is_file():
        raise UserError(f"{checkpoint}: not a dpo-dist checkpoint (no config.yaml); give output_dir/checkpoint-<step>")
    config = load_config(checkpoint / "config.yaml")
    dtype = resolve_dtype(config.model.dtype)
    model = prepare_policy(load_causal_lm(config.model.policy_path, config.model, dtype, None), config.model, config.lora)
    state = consolidated_checkpoint_state(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "base_model.model.lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise UserError(f"{checkpoint}: its weights do not fit {config.model.policy_path} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(dtype)
    one_process = DistInfo(rank=0, world_size=1, local_rank=0, device=model.device)
    return export_hf(model, load_tokenizer(config.model.policy_path), out, one_process,
                     merge or config.export.merge, config.export.max_shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/hf")
    parser.add_argument("--merge", action="store_true", help="LoRA: also write the merged full model")
    args = parser.parse_args()
    try:
        path = export_checkpoint(args.checkpoint, args.out or args.checkpoint / "hf", args.merge)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(f"exported {args.checkpoint} to {path}")


if __name__ == "__main__":
    main()
