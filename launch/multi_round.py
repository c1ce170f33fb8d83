"""Iterative DPO: several rounds, each starting from and referenced to the previous round's policy.

    deepspeed --num_gpus 8 launch/multi_round.py --config my.yaml     # my.yaml has rounds: {train_files: [r0.jsonl, r1.jsonl]}
    python launch/multi_round.py --config my.yaml rounds.precompute_reference=true

Rerun the same command after an interruption: finished rounds are skipped, an interrupted round
resumes from its newest checkpoint. Exit status as launch/train.py (75: stopped by a signal).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_dist.checkpoint import EXIT_PREEMPTED  # noqa: E402
from dpo_dist.cli import run_main  # noqa: E402
from dpo_dist.config import check_label_smoothing  # noqa: E402
from dpo_dist.engine import barrier, init_distributed  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.metrics import make_logger  # noqa: E402
from dpo_dist.precompute import run_precompute  # noqa: E402
from dpo_dist.rounds import check_round_files, round_config, round_dir, round_is_done  # noqa: E402
from dpo_dist.trainer import Trainer  # noqa: E402


def main(config, args) -> int:
    check_label_smoothing(config.dpo)
    if config.rounds is None or not config.rounds.train_files:
        raise UserError("rounds.train_files is empty: list one training file per round (rounds: {train_files: [...]})")
    check_round_files(config)
    dist_info = init_distributed(config.deepspeed.timeout_minutes)
    for index in range(len(config.rounds.train_files)):
        this_round = round_config(config, index)
        if round_is_done(config, index):
            if dist_info.is_main:
                print(f"round {index}: already done ({round_dir(config, index)})", flush=True)
            continue
        if config.rounds.precompute_reference:
            logger = make_logger(dist_info.rank, this_round.reference_cache_dir)
            run_precompute(this_round, dist_info, logger)
            logger.close()
        trainer = Trainer(this_round, dist_info)
        trainer.setup(train=True)
        outcome = trainer.train()
        trainer.cleanup()
        del trainer  # free this round's engines before the next round builds its own
        barrier()
        if outcome == "preempted":
            return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    run_main(__doc__, main)
