"""Real multi-process training on CPU (DeepSpeed's CPU accelerator, gloo): ZeRO-2 under torchrun,
ZeRO-3 under the deepspeed launcher, both against a one-process run on the same global batches,
and both again with the reference replaced by a cache precomputed on ONE process.

Tolerances: the first step's loss is computed from the initial weights on identical pairs, so
the runs agree to float32 rounding of the reduction order (1e-6). Later steps also depend on
all-reduced gradients, whose summation order differs between 1 and 2 ranks: we allow 1e-4.
Online vs precomputed reference on the same 2 ranks: the cached log-probs come from other
batches (other padding), so they differ from the online ones by float32 rounding; per-step
losses and rewards must agree to 1e-5 and the final weights to 1e-5.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import (
    assert_ok,
    deepspeed_launch,
    held_by_rank_0,
    read_metrics,
    run,
    run_here,
    torchrun_launch,
    write_config,
)

pytestmark = pytest.mark.multirank
STEPS = 12


@pytest.fixture(scope="module")
def single_process_run(tiny_policy, tiny_reference, tmp_path_factory):
    """One process, 8 pairs per micro-batch: the same global batch as 2 ranks x 4 pairs."""
    out = tmp_path_factory.mktemp("single")
    config = write_config(out / "c.yaml", tiny_policy, tiny_reference, out / "run", training={"batch_size": 8, "max_steps": STEPS})
    run_here("train.py", config)
    return read_metrics(out / "run")


@pytest.fixture(scope="module")
def precomputed_cache(tiny_policy, tiny_reference, tmp_path_factory):
    """The reference cache for the demo data, written by ONE process (training then runs on two)."""
    out = tmp_path_factory.mktemp("precompute")
    config = write_config(out / "c.yaml", tiny_policy, tiny_reference, out / "run", reference={"cache_dir": str(out / "cache")})
    run_here("precompute_ref.py", config)
    return out / "cache"


def check_precomputed_matches_online(online_dir, precomputed_dir, stdout):
    assert "no reference model loaded" in stdout and "reference: rank 0 holds" not in stdout
    online, online_evals = read_metrics(online_dir)
    cached, cached_evals = read_metrics(precomputed_dir)
    assert sorted(online) == sorted(cached) == list(range(1, STEPS + 1))
    for step in online:
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert cached[step][key] == pytest.approx(online[step][key], abs=1e-5), (step, key)
    assert cached_evals[-1]["eval_loss"] == pytest.approx(online_evals[-1]["eval_loss"], abs=1e-5)
    online_weights = load_file(online_dir / "final" / "model.safetensors")
    cached_weights = load_file(precomputed_dir / "final" / "model.safetensors")
    assert online_weights.keys() == cached_weights.keys()
    for name, tensor in online_weights.items():
        torch.testing.assert_close(cached_weights[name], tensor, atol=1e-5, rtol=0, msg=name)


def check_two_rank_run(output_dir, single_process_run):
    train, evals = read_metrics(output_dir)
    single_train, _ = single_process_run
    assert sorted(train) == list(range(1, STEPS + 1))
    assert train[1]["loss"] != pytest.approx(0.693147, abs=1e-3)  # the reference really differs
    assert train[1]["loss"] == pytest.approx(single_train[1]["loss"], abs=1e-6)
    assert train[1]["num_pairs"] == single_train[1]["num_pairs"] == 8
    for step in range(2, STEPS + 1):
        assert train[step]["loss"] == pytest.approx(single_train[step]["loss"], abs=1e-4), step
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == STEPS
    assert after["eval_loss"] < before["eval_loss"] - 0.01
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"] + 0.1
    assert after["eval_num_pairs"] == 64  # every eval pair exactly once across the two ranks
    return evals


def test_zero3_deepspeed_launcher_two_ranks(tiny_policy, tiny_reference, tmp_path, single_process_run, precomputed_cache):
    config = write_config(
        tmp_path / "c.yaml", tiny_policy, tiny_reference, tmp_path / "run",
        training={"max_steps": STEPS}, deepspeed={"config": "ds_configs/zero3.json"},
    )
    command = deepspeed_launch("train.py", config)
    result = run(command)
    assert_ok(result)
    evals = check_two_rank_run(tmp_path / "run", single_process_run)
    assert "ZeRO-3 on one process" not in result.stdout + result.stderr  # two ranks: ZeRO-3 shards
    # Each split was tokenized by the two ranks, a block each; the losses above equal one process's, step by step,
    # so both ranks trained on the same pairs in the same order.
    for split in ("train", "eval"):
        assert f"{split}: tokenized by 2 ranks, a block of the records each" in result.stdout
    # DeepSpeed's calls to the collectives torch 2.13 renamed warned on every rank; silenced (engine.py)
    assert "all_gather_into_tensor` is deprecated" not in result.stderr
    # Under the deepspeed launcher DeepSpeed's CPU all-reduce maps one /dev/shm file per rank and never removes
    # it (66 MB of RAM per rank per run, for good); the run removed its own.
    port = command[command.index("--master_port") + 1]
    assert [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")] == []
    # ZeRO-3 really shards: rank 0 holds part of the policy and part of the reference.
    for name in ("policy", "reference"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(f"{name}: rank 0 holds"))
        local, total = held_by_rank_0(line)
        assert local < 0.75 * total, line

    # The ZeRO-3 export loads with plain transformers and scores like the trained policy did (1 process now).
    eval_config = write_config(
        tmp_path / "e.yaml", tmp_path / "run" / "final", tiny_reference, tmp_path / "eval", training={"batch_size": 5}
    )
    printed = run_here("evaluate.py", eval_config)
    metrics = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert json.dumps(metrics) in printed.splitlines()  # and printed, on one line
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logits/rejected"):
        assert metrics[key] == pytest.approx(evals[-1][key], abs=1e-5), key

    # launch/export.py consolidates the ZeRO-3 partitions of the last checkpoint on one CPU process:
    # the same weights as the export the 2-rank run gathered.
    assert_ok(run([sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "run" / f"checkpoint-{STEPS}"),
                   "--out", str(tmp_path / "exported")]))
    gathered = load_file(tmp_path / "run" / "final" / "model.safetensors")
    consolidated = load_file(tmp_path / "exported" / "model.safetensors")
    assert gathered.keys() == consolidated.keys() and all(torch.equal(gathered[k], consolidated[k]) for k in gathered)

    # The same ZeRO-3 run with the reference read from the cache made on one process, the policy's batches
    # prefix-shared and packed (data.prefix_sharing: the same numbers from a different layout), and ZeRO-3's
    # per-submodule gathering instead of whole decoder layers (deepspeed.zero3_whole_layers, on above), and the
    # norms' outputs and the MLP's gate product rebuilt in backward (model.recompute_elementwise: the rebuilt
    # norms use a copy of their weight taken in forward, as ZeRO-3 releases each submodule's parameters).
    result = run(deepspeed_launch("train.py", config, "reference.mode=precomputed", f"reference.cache_dir={precomputed_cache}",
                                  f"training.output_dir={tmp_path / 'cached'}", "data.prefix_sharing=true", "data.packing=true",
                                  "deepspeed.zero3_whole_layers=false", "model.recompute_elementwise=true"))
    assert_ok(result)
    check_precomputed_matches_online(tmp_path / "run", tmp_path / "cached", result.stdout)


def test_zero2_torchrun_two_ranks(tiny_policy, tiny_reference, tmp_path, single_process_run, precomputed_cache):
    config = write_config(tmp_path / "c.yaml", tiny_policy, tiny_reference, tmp_path / "run", training={"max_steps": STEPS})
    assert_ok(run(torchrun_launch("train.py", config)))
    check_two_rank_run(tmp_path / "run", single_process_run)
    # Again with the cached reference, and without the per-token metrics (training.token_metrics: the two ranks
    # all-reduce the shorter list of sums their config names): the same losses, the four metrics gone.
    result = run(torchrun_launch("train.py", config, "reference.mode=precomputed", f"reference.cache_dir={precomputed_cache}",
                                 f"training.output_dir={tmp_path / 'cached'}", "training.token_metrics=false"))
    assert_ok(result)
    check_precomputed_matches_online(tmp_path / "run", tmp_path / "cached", result.stdout)
    (online, online_evals), (cached, cached_evals) = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "cached")
    token_metrics = {"logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"}
    assert token_metrics <= online[STEPS].keys() and not token_metrics & cached[STEPS].keys()
    assert {f"eval_{name}" for name in token_metrics} <= online_evals[-1].keys()
    assert not {f"eval_{name}" for name in token_metrics} & cached_evals[-1].keys()
