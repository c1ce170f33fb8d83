"""Exact resume: a run killed with kill -9 (or stopped by SIGUSR1 on one rank) and resumed with
resume_from=auto gives bitwise the same per-step losses and final weights as a straight run.

Real 2-rank runs, fp32 on CPU, dropout on (attention_dropout=0.1, so the RNG states matter),
shuffling on, and an epoch of 100 pairs that is not a multiple of the global batch of 16.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_dist.errors import UserError
from launching import ROOT, assert_ok, deepspeed_launch, logged_steps, read_metrics, run, run_here, torchrun_launch, write_config
from make_tiny_qwen3 import make_checkpoint

pytestmark = pytest.mark.multirank
STEPS = 18  # 3 epochs of 6 steps (100 pairs // 16)


@pytest.fixture(scope="module")
def dropout_policy(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "dropout_policy", seed=0, attention_dropout=0.1)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """100 train pairs; 48 eval pairs, scored after every step so that a run takes long enough to be
    killed part-way (eval draws no random numbers and changes nothing the comparison looks at)."""
    folder = tmp_path_factory.mktemp("data")
    lines = (ROOT / "examples/data/demo_train.jsonl").read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:100]))
    (folder / "eval.jsonl").write_text("".join(lines[100:148]))
    return folder


def config_for(tmp_path, name, policy, reference, data, ds_config):
    return write_config(
        tmp_path / f"{name}.yaml", policy, reference, tmp_path / name,
        data={"train_files": [str(data / "train.jsonl")], "eval_files": [str(data / "eval.jsonl")]},
        training={"num_epochs": 3, "gradient_accumulation_steps": 2, "save_steps": 4, "save_total_limit": 2,
                  "eval_steps": 1, "keep_best_checkpoint": True},
        deepspeed={"config": ds_config},
    )


def start(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def kill_9_everything(process) -> None:
    """SIGKILL the launcher and every worker: torchrun starts its workers in sessions of their own,
    so killing the launcher's process group alone would leave them running."""
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    psutil.wait_procs([psutil.Process(pid) for pid in family if psutil.pid_exists(pid)], timeout=30)


def wait_for_checkpoint(output_dir: Path, step: int, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (output_dir / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert process.poll() is None, f"run ended before checkpoint-{step}:\n{process.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)


def assert_same_run(straight_dir: Path, resumed_dir: Path, resumed_from: int) -> None:
    straight, _ = read_metrics(straight_dir)
    resumed, _ = read_metrics(resumed_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # every step logged once: none lost, none repeated
    # At accumulation 2 each step logs the rate it trained with (transformers 5 / TRL), not the next one: linear
    # decay from the peak over 18 steps, no warmup
    assert [straight[step]["learning_rate"] for step in (1, 2, STEPS)] == pytest.approx([1e-3, 1e-3 * 17 / 18, 1e-3 / 18])
    for step in range(resumed_from + 1, STEPS + 1):
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert resumed[step][key] == straight[step][key], (step, key)  # bitwise
    a = load_file(straight_dir / "final" / "model.safetensors")
    b = load_file(resumed_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_step(output: str) -> int:
    line = next(line for line in output.splitlines() if line.startswith("resumed from"))
    return int(line.split(" at step ")[1].split()[0])


def test_zero2_kill_9_and_resume_is_bitwise_exact(dropout_policy, tiny_reference, small_data, tmp_path):
    straight = config_for(tmp_path, "straight", dropout_policy, tiny_reference, small_data, "ds_configs/zero2.json")
    assert_ok(run(torchrun_launch("train.py", straight)))
    assert (tmp_path / "straight" / "checkpoint-18").exists() and not (tmp_path / "straight" / "checkpoint-8").exists()

    killed = config_for(tmp_path, "killed", dropout_policy, tiny_reference, small_data, "ds_configs/zero2.json")
    process = start(torchrun_launch("train.py", killed))
    wait_for_checkpoint(tmp_path / "killed", 8, process)
    kill_9_everything(process)
    assert not (tmp_path / "killed" / "final").exists()
    # what a kill during a save leaves behind: a half-written .tmp directory, never trusted
    partial = tmp_path / "killed" / "checkpoint-99.tmp"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")

    result = run(torchrun_launch("train.py", killed, "training.resume_from=auto"))
    assert_ok(result)
    step = resumed_step(result.stdout)
    assert 8 <= step < STEPS and not partial.exists()
    assert "train: tokenized pairs mapped from" in result.stdout  # data.cache_tokenized: the restart did not tokenize
    assert_same_run(tmp_path / "straight", tmp_path / "killed", step)
    # train_results.json sums up each invocation: the straight run's every step, the resumed one's from its checkpoint
    for name, steps in (("straight", STEPS), ("killed", STEPS - step)):
        assert json.loads((tmp_path / name / "train_results.json").read_text())["train_steps"] == steps, name
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*"))
    best = json.loads((tmp_path / "killed" / "checkpoint-18" / "trainer_state.json").read_text())["best_step"]
    assert kept == sorted({16, 18} | ({best} if best % 4 == 0 else set()))  # newest 2, plus the best when saved

    # a checkpoint saved by 2 processes is refused on 1, with how to start over from its weights
    with pytest.raises(UserError, match="saved by 2 processes") as refusal:
        run_here("train.py", killed, "training.resume_from=auto")
    assert f"launch/export.py --checkpoint {tmp_path / 'killed'}/checkpoint-" in str(refusal.value)
    # a checkpoint path that is not there is said to be missing, with the ones that are
    missing = tmp_path / "killed" / "checkpoint-9"
    with pytest.raises(UserError) as refusal:
        run_here("train.py", killed, f"training.resume_from={missing}")
    assert str(refusal.value) == (f"training.resume_from: {missing} does not exist (checkpoints in {tmp_path / 'killed'}: "
                                  f"{', '.join(f'checkpoint-{step}' for step in kept)}; training.resume_from=auto takes the newest)")


def test_zero3_kill_and_sigusr1_on_one_rank_resume_exactly(dropout_policy, tiny_reference, small_data, tmp_path):
    """One interrupted run, twice: killed with kill -9 after checkpoint-4 and resumed; the resumed run stopped by
    SIGUSR1 to one rank and resumed again; it ends as the straight run did."""
    straight = config_for(tmp_path, "straight", dropout_policy, tiny_reference, small_data, "ds_configs/zero3.json")
    assert_ok(run(deepspeed_launch("train.py", straight)))

    # kill -9 of the whole process group after checkpoint-4 (mostly mid-step)
    interrupted = config_for(tmp_path, "interrupted", dropout_policy, tiny_reference, small_data, "ds_configs/zero3.json")
    process = start(deepspeed_launch("train.py", interrupted))
    wait_for_checkpoint(tmp_path / "interrupted", 4, process)
    kill_9_everything(process)

    # resumed (from step 4, periodic saves off), then SIGUSR1 to ONE rank a few steps on: every rank finishes
    # the step, a checkpoint is written, exit status 75
    resume = ("training.resume_from=auto", "training.save_steps=100")
    process = start(deepspeed_launch("train.py", interrupted, *resume))
    deadline = time.time() + 300
    while max(logged_steps(tmp_path / "interrupted"), default=0) < 7:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output[-3000:]
    assert resumed_step(output) == 4
    assert not (tmp_path / "interrupted" / "final").exists()
    *_, stop_step = checkpoints = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "interrupted").glob("checkpoint-*"))
    assert checkpoints == [4, stop_step] and 7 <= stop_step < STEPS  # the killed run's, and the signal's
    result = run(deepspeed_launch("train.py", interrupted, *resume))
    assert_ok(result)
    assert resumed_step(result.stdout) == stop_step
    assert_same_run(tmp_path / "straight", tmp_path / "interrupted", 4)
    state = json.loads((tmp_path / "interrupted" / "checkpoint-18" / "trainer_state.json").read_text())
    assert state["consumed_pairs"] == STEPS * 16 and state["step"] == STEPS

    # DeepSpeed keeps ZeRO-3's optimizer state per sub-group: a run whose sub-groups differ is refused before
    # loading, with the size to set (DeepSpeed itself would fail inside torch's load_state_dict)
    layer = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(dropout_policy).model.layers[0].parameters())
    assert state["zero3_sub_group_size"] == layer  # "auto": one decoder layer
    other = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    other["zero_optimization"]["sub_group_size"] = 10**9
    (tmp_path / "zero3_1e9.json").write_text(json.dumps(other))
    result = run(deepspeed_launch("train.py", interrupted, *resume, f"deepspeed.config={tmp_path / 'zero3_1e9.json'}"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f'Set "sub_group_size": {layer} under zero_optimization' in result.stderr
    assert "Traceback" not in result.stderr
