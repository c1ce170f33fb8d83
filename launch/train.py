"""Train a policy with DPO.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml
    torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml
    python launch/train.py --config configs/demo.yaml training.num_epochs=1     # one process

Exit status: 0 done; 2 a user mistake (one `error:` line); 75 stopped by SIGTERM/SIGUSR1 after
writing a checkpoint (run again with training.resume_from=auto to continue).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dpo_dist.checkpoint import EXIT_PREEMPTED  # noqa: E402
from dpo_dist.cli import run_main  # noqa: E402
from dpo_dist.config import check_label_smoothing  # noqa: E402
from dpo_dist.engine import init_distributed  # noqa: E402
from dpo_dist.trainer import Trainer  # noqa: E402


def main(config, args) -> int:
    check_label_smoothing(config.dpo)
    trainer = Trainer(config, init_distributed(config.deepspeed.timeout_minutes))
    trainer.setup(train=True)
    outcome = trainer.train()
    trainer.cleanup()
    return EXIT_PREEMPTED if outcome == "preempted" else 0


if __name__ == "__main__":
    run_main(__doc__, main)
