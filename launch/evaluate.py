"""Score the policy against the reference on data.eval_files, without training.

    deepspeed launch/evaluate.py --config configs/demo.yaml
    python launch/evaluate.py --config configs/demo.yaml model.sft_model=output/demo/final model.ref_model=examples/tiny-qwen3

Prints one JSON object of TRL-named metrics (eval_loss, eval_rewards/accuracies, ...) as the last
line of stdout and writes the same object to output_dir/eval_results.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_dist.cli import run_main  # noqa: E402
from dpo_dist.engine import init_distributed  # noqa: E402
from dpo_dist.errors import UserError  # noqa: E402
from dpo_dist.trainer import Trainer  # noqa: E402


def main(config, args) -> int:
    if not config.data.eval_files:
        raise UserError("data.eval_files is empty: evaluate.py scores the policy on them")
    trainer = Trainer(config, init_distributed(config.deepspeed.timeout_minutes))
    trainer.setup(train=False)
    metrics = trainer.evaluate()
    trainer.logger.write_results("eval_results.json", metrics)  # rank 0's logger writes, the others' do nothing
    if trainer.dist.is_main:
        print(json.dumps(metrics), flush=True)
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    run_main(__doc__, main)
