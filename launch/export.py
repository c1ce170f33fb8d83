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

from dpo_dist.checkpoint import CHECKPOINT_PREFIX, ENGINE_TAG, consolidated_checkpoint_state, export_hf  # noqa: E402
from dpo_dist.cli import EXIT_USER_ERROR  # noqa: E402
from dpo_dist.config import load_config  # noqa: E402
from dpo_dist.engine import DistInfo, resolve_dtype  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.models import load_causal_lm, load_tokenizer, prepare_policy  # noqa: E402


def check_paths(checkpoint: Path, out: Path, default_out: Path) -> None:
    """Refuse what export would get wrong or destroy. It writes `out` whole (a temp dir renamed over it), so an
    --out that holds anything else (a run's output_dir, a model, the checkpoint itself) would be deleted; only
    the default, <checkpoint>/hf, is replaced by a new export."""
    if not (checkpoint / "config.yaml").is_file() or not (checkpoint / ENGINE_TAG).is_dir():
        newest = sorted(checkpoint.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda path: path.stat().st_mtime)
        hint = f" (this directory holds {newest[-1].name})" if newest else ""
        raise UserError(f"{checkpoint}: not a dpo-dist checkpoint (no config.yaml and engine/); give "
                        f"output_dir/checkpoint-<step>{hint}")
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or target in source.parents:
        raise UserError(f"--out {out}: the export would replace the checkpoint it reads; choose another directory")
    if target != default_out.resolve() and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty, and export replaces the whole directory; choose a new "
                        "directory, or remove this one first")


def export_checkpoint(checkpoint: Path, out: Path, merge: bool) -> Path:
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
    default_out = args.checkpoint / "hf"
    try:
        check_paths(args.checkpoint, args.out or default_out, default_out)
        path = export_checkpoint(args.checkpoint, (args.out or default_out).resolve(), args.merge)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    print(f"exported {args.checkpoint} to {path}")


if __name__ == "__main__":
    main()
