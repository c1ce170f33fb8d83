"""Measure what the memory planner models on CPU: the peak memory of real training steps, and its plan.

    python tests/measure_peak.py --config run.yaml [section.key=value ...]
    python -m torch.distributed.run --nproc_per_node 2 tests/measure_peak.py --config run.yaml [...]

Runs `Trainer.setup()` and the first STEPS optimizer steps of `Trainer.train()` in each process (a world
of one under plain python, every rank of the group under torchrun / deepspeed, the config's ZeRO stage)
and each process prints one JSON line, tagged with its rank and the world size: the plan (`plan_memory`
with the trainer's own DeepSpeed config, world size and dtype, on_gpu=False), this rank's measured peak,
and the peak of each phase of each micro-step. tests/test_planner.py compares them.

Measured = the kernel's peak resident set (VmHWM) of this process over the steps minus its resident
set after the imports, the process group and a throwaway DeepSpeed engine, before setup: the
interpreter, torch, DeepSpeed and transformers' code and one-time state are not what the planner
models. The peak counter is reset right before the first step (writing 5 to /proc/self/clear_refs,
Linux >= 4.0), so loading transients do not count either; what loading leaves behind does (the
weights, and ~25 MB of lazily loaded code and buffers, the residue of a run with a 2-layer, 64-wide
model). glibc keeps freed memory below its mmap threshold (which grows with every large block freed,
up to 32 MB) in its heap, where the resident set still counts it; a fixed 64 KiB threshold (mallopt,
as MALLOC_MMAP_THRESHOLD_ would) sends every tensor larger than that back to the kernel when freed, so
the resident set follows live memory. Two steps: the first allocates Adam's states in its optimizer
step, the second runs forward and backward with them held.
"""

import ctypes
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peft  # noqa: E402,F401  (imported before the baseline: library code is not modeled)
import torch  # noqa: E402
import transformers.models.qwen3.modeling_qwen3  # noqa: E402,F401

from dpo_dist.cli import parse_args  # noqa: E402
from dpo_dist.config import TrainingConfig, load_config  # noqa: E402
from dpo_dist.engine import TrainEngine, dtype_name, init_distributed  # noqa: E402
from dpo_dist.models import read_model_config  # noqa: E402
from dpo_dist.planner import ModelShape, host_memory, optimizer_step_elements, plan_memory, trainable_groups  # noqa: E402
from dpo_dist.trainer import Trainer  # noqa: E402

STEPS = 2
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_tensors_to_the_kernel() -> None:
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: this measurement needs glibc")


def status_bytes(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def warm_up_deepspeed(world_size: int) -> None:
    """DeepSpeed's first `initialize` in a process imports and caches ~100 MB of code and state (measured
    with an 8 x 8 linear layer; later engines add nothing): library cost, paid before the baseline.
    Collective: every rank of the group runs it."""
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
                 "zero_optimization": {"stage": 2}}
    TrainEngine(torch.nn.Linear(8, 8), ds_config, TrainingConfig(), total_steps=1)


def engine_step_elements(zero_optimizer) -> int:
    """The most trainable elements DeepSpeed's optimizer steps at once on this rank, read from the optimizer it
    built: ZeRO-3's sub-groups, ZeRO-1/2's partitions of each parameter group."""
    if hasattr(zero_optimizer, "fp16_partitioned_groups_flat_numel"):
        return max(zero_optimizer.fp16_partitioned_groups_flat_numel)
    return max(int(size) for size in zero_optimizer.partition_size)


class Measured(Exception):
    """Raised after the last measured step: the rest of train() (checkpoint, export) is not measured."""


def main() -> None:
    return_freed_tensors_to_the_kernel()
    args = parse_args(__doc__)
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, init_distributed(config.deepspeed.timeout_minutes))
    warm_up_deepspeed(trainer.dist.world_size)
    baseline = status_bytes("VmRSS")
    trainer.setup(train=True)
    shape = ModelShape.from_hf_config(read_model_config(config.model.policy_path))
    plan = plan_memory(config, shape, trainer.ds_config, trainer.dist.world_size, dtype_name(trainer.dtype), None,
                       on_gpu=False)
    # On CPU the host is the device: what offload moves to the host is in the same resident set
    host = host_memory(config, shape, trainer.ds_config, trainer.dist.world_size, dtype_name(trainer.dtype))

    step_elements = {"planned": optimizer_step_elements(trainable_groups(shape, config.lora), trainer.ds_config,
                                                        trainer.dist.world_size),
                     "engine": engine_step_elements(trainer.policy.engine.optimizer)}
    phases = []  # (step, phase, peak bytes above the baseline); the counter restarts at each phase
    micro_steps = config.training.gradient_accumulation_steps
    position = {"step": 0, "micro": 0}  # the optimizer step (from 1) and micro-step in progress

    def close_phase(name: str) -> None:
        if micro_steps > 1:
            name = f"{name} {position['micro']}"
        phases.append((position["step"], name, status_bytes("VmHWM") - baseline))
        reset_peak()

    policy, train_step = trainer.policy, trainer.train_step
    backward, optimizer_step = policy.backward, policy.step

    def measured_backward(loss):
        position["micro"] += 1
        close_phase("forward")
        backward(loss)
        close_phase("backward")

    def measured_optimizer_step():  # after every micro-batch; DeepSpeed steps at the accumulation boundary
        optimizer_step()
        close_phase("step")

    def measured_train_step(micro_batches, window):
        if not phases:
            reset_peak()
        position["step"], position["micro"] = position["step"] + 1, 0
        train_step(micro_batches, window)
        if position["step"] == STEPS:
            raise Measured

    policy.backward, policy.step, trainer.train_step = measured_backward, measured_optimizer_step, measured_train_step
    try:
        trainer.train()
    except Measured:
        pass
    trainer.cleanup()
    peak = max(phases, key=lambda phase: phase[2])
    line = json.dumps({
        "rank": trainer.dist.rank,
        "world_size": trainer.dist.world_size,
        "predicted_mb": (plan.total + sum(host.values())) / MIB,
        "measured_mb": peak[2] / MIB,
        "measured_phase": f"{peak[1]} of step {peak[0]}",
        "predicted_phases_mb": {name: value / MIB for name, value in plan.phases.items()},
        "parts_mb": {name: value / MIB for name, value in plan.parts.items()},
        "host_parts_mb": {name: value / MIB for name, value in host.items()},
        "phases_mb": [[step, name, value / MIB] for step, name, value in phases],
        "step_elements": step_elements,
    })
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())  # one write: the ranks share the launcher's stdout


if __name__ == "__main__":
    main()
