"""Score the train and eval pairs with the reference once and write the verified log-prob cache.

    deepspeed --num_gpus 8 launch/precompute_ref.py --config my.yaml
    torchrun --nproc_per_node 2 launch/precompute_ref.py --config my.yaml
    python launch/precompute_ref.py --config my.yaml --verify     # re-hash weights and shards, check coverage
    deepspeed launch/train.py --config my.yaml reference.mode=precomputed

Killed at any point, a rerun with the same config continues from the shards already written.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_dist.cli import run_main  # noqa: E402
from dpo_dist.engine import init_distributed  # noqa: E402
from dpo_dist.metrics import make_logger  # noqa: E402
from dpo_dist.precompute import run_precompute, verify_cache  # noqa: E402

FLAGS = (
    ("--overwrite", "replace a cache made for other data or settings"),
    ("--verify", "check an existing cache fully (re-hash weights and shards) instead of computing"),
)


def main(config, args) -> int:
    dist_info = init_distributed(config.deepspeed.timeout_minutes)
    logger = make_logger(dist_info.rank, config.reference_cache_dir)
    if args.verify:
        verify_cache(config, dist_info, logger)
    else:
        run_precompute(config, dist_info, logger, overwrite=args.overwrite)
    logger.close()
    return 0


if __name__ == "__main__":
    run_main(__doc__, main, flags=FLAGS)
