"""The benchmark harness itself: bench/vs_trl.py runs TRL's DPOTrainer and dpo-dist on the same data and
reports both. Its numbers are for bench/RESULTS.md, not for assertions; what is checked is that the harness
works end to end and measures both tools alike."""

import json
import math
import sys

from launching import assert_ok, run


def test_vs_trl_runs_both_tools_on_the_same_tokens(tmp_path):
    """A tiny model, one process, ZeRO-3 in both: each run reports its numbers, and the two count the same
    tokens per step (non-padding chosen + rejected, counted by each tool's own code) and start at ln 2
    (policy = reference)."""
    out = tmp_path / "vs_trl.json"
    result = run([sys.executable, "bench/vs_trl.py", "--vocab-size", "2000", "--hidden", "64", "--layers", "2",
                  "--seq-len", "64", "--processes", "1", "--steps", "3", "--warmup-steps", "1", "--no-packing",
                  "--ds-config", "ds_configs/zero3.json", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert_ok(result)
    report = json.loads(out.read_text())
    trl, ours = report["results"]["trl"], report["results"]["dpo_dist"]
    assert trl["steps_measured"] == ours["steps_measured"] == 2
    assert trl["tokens_per_step_mean"] == ours["tokens_per_step_mean"] > 0
    assert math.isclose(trl["loss_first_step"], math.log(2), abs_tol=1e-5)
    assert math.isclose(ours["loss_first_step"], math.log(2), abs_tol=1e-5)
    assert trl["engines"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
    for key in ("tokens_per_second", "step_seconds_median", "peak_memory_mb_max_over_ranks"):
        assert report["ratios_dpo_dist_over_trl"]["dpo_dist"][key] > 0
