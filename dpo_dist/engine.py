"""Everything DeepSpeed: process group, config filling, the training and inference engines.

The trainer never imports deepspeed; it gets a `TrainEngine` with forward/backward/step and the
numbers it logs. DeepSpeed JSONs in `ds_configs/` hold "auto" where a value follows from the
run config (batch sizes, clipping, precision, bucket sizes); `fill_ds_config` resolves them and
checks the batch arithmetic, so the JSON and the YAML can never disagree silently.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpo_dist.config import Config, LoRAConfig, TrainingConfig
from dpo_dist.errors import UserError
from dpo_dist.planner import (ModelShape, decoder_layer_elements, offloads_optimizer, reduce_bucket_elements, sub_group_elements,
                              zero_stage)
from dpo_dist.tokenization import TokenizeShards

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_on_this_node() -> int:
    """How many ranks share this node (and its host memory): torchrun's LOCAL_WORLD_SIZE, else the deepspeed
    launcher's LOCAL_SIZE (it sets only that one), else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# torch 2.13 renamed two collectives and warns on the old names, which DeepSpeed 0.19 calls inside ZeRO (its
# partitioned parameters and gradients): one FutureWarning per name on every rank of every job, about code that
# is not ours and works. Only these two messages are silenced; any other warning still shows.
_DEEPSPEED_COLLECTIVE_RENAMES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def init_distributed(timeout_minutes: float) -> DistInfo:
    """Join the process group made by deepspeed/torchrun/srun, or make a one-process group for plain python."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    warnings.filterwarnings("ignore", message=_DEEPSPEED_COLLECTIVE_RENAMES, category=FutureWarning)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    elif not os.environ.get("LOCAL_SIZE") and "LOCAL_WORLD_SIZE" in os.environ:
        # DeepSpeed's CPU accelerator answers device_count() from LOCAL_SIZE, which only the deepspeed
        # launcher sets; without it every call runs `numactl --hardware` in a subprocess, and ZeRO-3 asks
        # once per gradient reduction: a fork per layer per micro-batch under python/torchrun/srun (a
        # third of a ZeRO-3 step of the 28-layer CPU bench). torchrun's LOCAL_WORLD_SIZE is the same number.
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=timedelta(minutes=timeout_minutes),
    )
    import torch.distributed as dist

    if accelerator.device_name() == "cpu":  # every size: with LOCAL_SIZE set, one rank maps a buffer too
        _release_shm_buffer_name(dist.get_rank())
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"),
    )


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp) maps for `rank` of this job."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def _release_shm_buffer_name(rank: int) -> None:
    """Remove this rank's /dev/shm name once every rank has mapped every buffer.

    DeepSpeed's CPU accelerator gives each rank of a one-machine job a 66 MB shared-memory file for its
    all-reduce and never removes it: every multi-process run on CPU left 66 MB per rank in RAM after it
    ended (17 GB after a day of this project's tests on one machine). All ranks have opened all files
    when init_distributed returns on all of them (the barrier); the mappings outlive the names, so
    removing them changes nothing while the job runs and frees the memory when it ends."""
    import torch.distributed as dist

    dist.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Destroy the process groups while the interpreter is still whole: pending work is waited for and the
    groups are unregistered. Groups that other code still holds (DeepSpeed keeps one) live on with their
    threads, which is why the launch scripts then leave without the interpreter's teardown
    (`cli.exit_process`). Local to this process: no collective, so a rank that exits early does not wait
    for the others."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class LaggedVote:
    """Agree across ranks on a flag (MAX) without stalling the step, one call late.

    A blocking all-reduce + read per optimizer step drains the device queue: the host waits for the
    step's kernels before it can launch the next step's. Here each call starts this call's all-reduce without
    waiting and returns the result of the previous call's, which has had a whole step to finish; its
    device-to-host copy was queued right behind it, so reading it waits for that point of the queue
    only. Every rank reads the same vote at the same call, so all stop at the same step. One rank:
    the flag itself, no collective and no copy."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.device = device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._pending = None  # (work, host copy, event) of the vote in flight

    def __call__(self, flag: bool, wait: bool = False) -> bool:
        """The previous call's vote; with `wait`, also this call's (blocking: for the last step)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        previous = self._read()
        value = torch.full((1,), 1.0 if flag else 0.0, device=self.device)  # a fill kernel: no blocking host copy
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self.device.type == "cuda":
            work.wait()  # makes the current stream wait for the collective; does not block the host
            value = value.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (work, value, event)
        return previous or (wait and self._read())

    def _read(self) -> bool:
        if self._pending is None:
            return False
        work, value, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        else:
            work.wait()
        return bool(value.item())

    def drain(self) -> None:
        """Finish the vote in flight (before collectives that must not interleave with it, and at exit)."""
        self._read()


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (any picklable object), so that all ranks act on one decision."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_from_each(value) -> list:
    """Every rank's `value` (any picklable object) on every rank, in rank order; `[value]` in a world of one.

    One broadcast per rank rather than one all-gather: an all-gather pads every rank's bytes to the largest
    and holds all of them at once on the device, twice over, where this holds one rank's value in flight.
    For setup-time exchanges (tokenized data), not the hot path."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = []
    for source in range(dist.get_world_size()):
        holder = [value if source == dist.get_rank() else None]
        dist.broadcast_object_list(holder, src=source)
        values.append(holder[0])
    return values


# Bytes staged through the device per piece when a host array is broadcast over a GPU backend.
_STAGING_BYTES = 256 * 2**20


def broadcast_array(array: np.ndarray, source: int, device: torch.device) -> None:
    """`source`'s contents of `array` (contiguous, the same size on every rank) written into every rank's `array`
    in place. On CPU (gloo) the host memory itself is sent and received; a GPU backend gets it staged through
    the device, at most 256 MiB at a time. For setup-time exchanges (tokenized data), not the hot path."""
    import torch.distributed as dist

    if not array.flags.c_contiguous:  # a reshaped copy would be filled instead, and the data silently lost
        raise ValueError("broadcast_array fills its array in place: pass a contiguous one")
    if not dist.is_initialized() or dist.get_world_size() == 1 or array.size == 0:
        return
    host = torch.from_numpy(array.reshape(-1).view(np.uint8))
    if device.type == "cpu":
        dist.broadcast(host, src=source)
        return
    for first in range(0, host.numel(), _STAGING_BYTES):
        piece = host[first : first + _STAGING_BYTES]
        staged = piece.to(device)
        dist.broadcast(staged, src=source)
        piece.copy_(staged.cpu())


def tokenize_shards(dist_info: DistInfo) -> TokenizeShards:
    """How this job's ranks tokenize a split together (tokenization.TokenizeShards), over its process group."""
    return TokenizeShards(dist_info.rank, dist_info.world_size, gather_from_each,
                          functools.partial(broadcast_array, device=dist_info.device))


def reduce_floats(values: list[float], op: str, device: torch.device) -> list[float]:
    """`values` combined over the ranks ("sum" or "max"), the same list on every rank; as they are in a world
    of one. For host numbers (counts, timings) off the hot path: a blocking collective, on the rank's device
    (`DistInfo.device`: what the backend communicates from)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.cpu().tolist()


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' -> bfloat16 on a CUDA device that supports it, float32 elsewhere (CPU tests, old GPUs)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling the config and the cache fingerprint use."""
    return str(dtype).removeprefix("torch.")


def read_ds_config(path_text: str) -> dict:
    """Load a DeepSpeed JSON: the path as given, else relative to the project (ds_configs/zero3.json)."""
    for candidate in (Path(path_text), PROJECT_ROOT / path_text, PROJECT_ROOT / "ds_configs" / path_text):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"{candidate}: not valid JSON ({err}); deepspeed.config must name a DeepSpeed JSON")
    raise UserError(f"deepspeed.config: {path_text} not found (shipped: {', '.join(sorted(p.name for p in (PROJECT_ROOT / 'ds_configs').glob('*.json')))})")


def _fill(section: dict, key: str, value) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def training_ds_config(config: Config, world_size: int) -> tuple[torch.dtype, dict]:
    """The run's parameter dtype and its filled DeepSpeed config (read from the policy's HF config)."""
    from dpo_dist.models import read_model_config

    dtype = resolve_dtype(config.model.dtype)
    shape = ModelShape.from_hf_config(read_model_config(config.model.policy_path))
    ds = fill_ds_config(read_ds_config(config.deepspeed.config), config.training, dtype, shape, world_size, config.lora)
    check_compile_fits(config, ds)
    check_fused_lora_fits(config, ds)
    plain_linear_under_whole_layers(config, ds)
    return dtype, ds


def plain_linear_under_whole_layers(config: Config, ds: dict) -> None:
    """Under ZeRO-3 with whole-layer gathering, use torch's own F.linear: turn off DeepSpeed's replacement of it
    (`zero_optimization.memory_efficient_linear`, on by DeepSpeed's default), which zero.Init installs for the
    whole process. An explicit true in the JSON is kept for eager runs and refused with model.compile.

    The replacement is an autograd function that re-gathers a weight in backward if no hook has; with
    whole-layer gathering the layer's hooks have gathered its weights for forward and backward, so it only
    adds a Python autograd function per projection call and saves nothing (the weights are in the model's
    dtype, no autocast copy to keep). Eager on one CPU process of 28 small layers (bench/RESULTS.md): identical
    losses, ~30 MB less peak, speed within the run-to-run noise. Compiled layers need it off: dynamo traces its
    backward, which reads each weight's `ds_id`, and torch 2.11 guarded on the id's value, so every layer needed
    its own graph until the recompile limit left the rest eager (8 of 28 Qwen3-1.7B layers compiled on an
    H200). Per-submodule gathering keeps DeepSpeed's default."""
    if zero_stage(ds) != 3 or not config.deepspeed.zero3_whole_layers:
        return
    zero = ds["zero_optimization"]
    if zero.get("memory_efficient_linear", "auto") is True:
        if config.model.compile:
            raise UserError(
                f"model.compile=true with zero_optimization.memory_efficient_linear=true in {config.deepspeed.config}: "
                "DeepSpeed's linear makes compiled layers recompile per layer. Remove the key (dpo-dist turns it off "
                "under whole-layer gathering) or set it to false, or set model.compile=false"
            )
        return
    zero["memory_efficient_linear"] = False


def check_fused_lora_fits(config: Config, ds: dict) -> None:
    """lora.fused reads the projections' weights directly, past the hooks on base_layer, lora_A and lora_B
    (lora_ops.py): under ZeRO-3 that needs whole-layer gathering, whose hooks sit on the decoder layer."""
    if config.lora is not None and config.lora.fused and zero_stage(ds) == 3 and not config.deepspeed.zero3_whole_layers:
        raise UserError(
            f"lora.fused=true with ZeRO-3 ({config.deepspeed.config}) and deepspeed.zero3_whole_layers=false: the "
            "fused projections read their weights past ZeRO-3's per-submodule gathering. Set "
            "deepspeed.zero3_whole_layers=true (the default), use a ZeRO-0/1/2 config, or lora.fused=false"
        )


def check_compile_fits(config: Config, ds: dict) -> None:
    """Refuse model.compile where a model runs under ZeRO-3 hooks inside its layers (deepspeed.zero3_whole_layers
    =false, an offloaded reference model), and with flex_attention off a GPU.

    ZeRO-3 gathers and releases parameters in hooks; on every submodule, a compiled decoder layer would
    trace into them, break its graph at each one and recompile the hooks per module until torch's recompile
    limit sends them back to eager. With whole-layer gathering the hooks sit on the layer itself, outside
    its compiled forward, and the layer is one clean graph (as under ZeRO-0/1/2)."""
    if not config.model.compile:
        return
    if zero_stage(ds) == 3 and not config.deepspeed.zero3_whole_layers:
        raise UserError(
            f"model.compile=true with ZeRO-3 ({config.deepspeed.config}) and deepspeed.zero3_whole_layers=false: "
            "DeepSpeed's per-submodule parameter hooks break every compiled layer apart. Set "
            "deepspeed.zero3_whole_layers=true, use a ZeRO-0/1/2 config (ds_configs/zero2.json), or model.compile=false"
        )
    if config.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise UserError(
            "model.compile=true with model.attn_implementation=flex_attention needs a GPU: on CPU torch's inductor "
            "fails to build FlexAttention's kernel inside a compiled layer (torch 2.13, also for transformers' own "
            "masks). Use sdpa on CPU, or model.compile=false"
        )
    if config.reference.offload and config.reference_mode in ("model", "precomputed"):  # precompute loads it too
        raise UserError(
            "model.compile=true with reference.offload=true: the offloaded reference runs under ZeRO-3 parameter "
            "offload, whose per-module hooks break every compiled layer apart. Set one of them to false"
        )


# ZeRO-3's live-parameter and reuse-distance limits, as DeepSpeed 0.19's zero/config.py defaults them
ZERO3_DEEPSPEED_DEFAULTS = {"stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9}
ZERO3_ONLY = ("sub_group_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
              "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save")


def fill_ds_config(raw: dict, training: TrainingConfig, dtype: torch.dtype, shape: ModelShape, world_size: int,
                   lora: LoRAConfig | None) -> dict:
    """Resolve "auto" fields from the run config and the model's shape, and check micro x accumulation x world =
    global batch."""
    ds = copy.deepcopy(raw)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"the DeepSpeed config (deepspeed.config) sets zero_optimization.stage to {stage!r}; ZeRO's "
                        "stages are 0, 1, 2 and 3")
    _drop_auto_optimizer_sections(ds)
    micro, accumulation = training.batch_size, training.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro)
    _fill(ds, "gradient_accumulation_steps", accumulation)
    _fill(ds, "train_batch_size", micro * accumulation * world_size)
    _fill(ds, "gradient_clipping", training.max_grad_norm)
    if (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) != (micro, accumulation):
        raise UserError(
            f"the DeepSpeed config (deepspeed.config) sets train_micro_batch_size_per_gpu "
            f"{ds['train_micro_batch_size_per_gpu']} and gradient_accumulation_steps {ds['gradient_accumulation_steps']}, "
            f"but training.batch_size={micro} and training.gradient_accumulation_steps={accumulation}; set those "
            "fields to \"auto\" in the JSON (the run config then decides)"
        )
    if ds["train_batch_size"] != micro * accumulation * world_size:
        raise UserError(
            f"the DeepSpeed config's (deepspeed.config) train_batch_size {ds['train_batch_size']} != "
            f"training.batch_size {micro} x training.gradient_accumulation_steps {accumulation} x world size "
            f"{world_size}; set it to \"auto\" in the JSON"
        )
    for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", enabled)
        if section["enabled"] != enabled:
            raise UserError(f"the DeepSpeed config sets {key}.enabled={section['enabled']} but model.dtype is {dtype}")
    zero = ds.setdefault("zero_optimization", {})
    # The reduce bucket: one decoder layer (planner.reduce_bucket_elements says why). The ZeRO-3 prefetch
    # bucket: one decoder layer too. DeepSpeed prefetches upcoming parameters until the bucket is full;
    # transformers' 0.9 hidden^2 is less than one of a Qwen3 layer's matrices, so with whole-layer gathering
    # only the next layer's first matrix was prefetched and the rest gathered while the GPU waited.
    # (DeepSpeed's own default, 5e7, is about one Qwen3-1.7B layer.) The persistence threshold as transformers'.
    # ZeRO-3's optimizer sub-group: one decoder layer too (planner.sub_group_elements says why).
    _fill(zero, "reduce_bucket_size", reduce_bucket_elements(shape, lora))
    if stage == 3:
        _fill(zero, "stage3_prefetch_bucket_size", decoder_layer_elements(shape))
        _fill(zero, "stage3_param_persistence_threshold", 10 * shape.hidden)
        _fill(zero, "sub_group_size", sub_group_elements(shape, offloads_optimizer(ds)))
        for key, default in ZERO3_DEEPSPEED_DEFAULTS.items():  # OpenRLHF's files leave these "auto": DeepSpeed's own
            _fill(zero, key, default)
    else:  # ZeRO-3's settings in a file shared by every stage (OpenRLHF's): DeepSpeed reads none of them below 3
        for key in [key for key, value in zero.items() if value == "auto" and key in ZERO3_ONLY]:
            del zero[key]
    # DeepSpeed's throughput timer, on unless a file says otherwise, synchronizes the device at the start of every
    # forward and the end of every step() call to time them: twice per micro-batch, each time leaving the device idle
    # until the host has launched the next kernels. dpo-dist prints none of its numbers (tokens_per_second is its
    # own, timed between optimizer steps), so it runs on host clocks, without the synchronizes.
    timers = ds["timers"] = ds.get("timers") or {}
    throughput = timers["throughput"] = timers.get("throughput") or {}
    throughput.setdefault("synchronized", False)
    if world_size == 1 and stage in (1, 2) and zero.get("overlap_comm"):
        # One process has no gradient reduction to overlap with the backward, but overlap_comm still makes DeepSpeed
        # synchronize the device at the end of every backward and keep a second reduce bucket: on an H200 (Qwen3-1.7B
        # full, ZeRO-2, compiled layers) turning it off ran 1.17x the tokens/s. The kernels are the same, on the
        # default stream instead of a side one (bit for bit the same steps on CPU: tests/test_engine.py), and one
        # reduce bucket is allocated instead of two; on several processes the file's setting stands.
        zero["overlap_comm"] = False
    if offloads_optimizer(ds):
        # DeepSpeed refuses a client optimizer beside ZeRO-Offload unless told to keep it; dpo-dist always hands it
        # torch's AdamW (TrainEngine), which steps the offloaded fp32 partitions on the host
        if ds.setdefault("zero_force_ds_cpu_optimizer", False) is not False:
            raise UserError("the DeepSpeed config (deepspeed.config) sets zero_force_ds_cpu_optimizer: "
                            f"{json.dumps(ds['zero_force_ds_cpu_optimizer'])}, which makes DeepSpeed refuse the optimizer "
                            "dpo-dist builds from training.* (torch's AdamW); remove the key")
    leftover = [key for key, value in _walk(ds) if value == "auto"]
    if leftover:
        raise UserError(f"the DeepSpeed config has \"auto\" values dpo-dist cannot fill: {', '.join(leftover)}")
    return ds


def _drop_auto_optimizer_sections(ds: dict) -> None:
    """transformers' DeepSpeed configs (the ones TRL users bring) have optimizer and scheduler sections whose
    params are "auto", for the Trainer to fill. dpo-dist builds both itself from training.* (torch's AdamW and
    `lr_multiplier`'s schedule: `TrainEngine`), and DeepSpeed ignores a config's sections when it is handed them,
    so a value written there would silently not apply: sections with only "auto" params (an Adam type at most) are
    dropped, any other refused."""
    for section in ("optimizer", "scheduler"):
        if section not in ds:
            continue
        spec = ds[section] if isinstance(ds[section], dict) else {"params": {"": ds[section]}}  # not a section: refused
        params = spec.get("params", {})
        written = [f"{section}.params.{name}={value}" for name, value in params.items() if value != "auto"]
        kind = str(spec.get("type", ""))
        if section == "optimizer" and kind.lower() not in ("", "adam", "adamw"):
            written.insert(0, f"optimizer.type={kind}")
        if written:
            raise UserError(
                f"the DeepSpeed config (deepspeed.config) sets {', '.join(written)}: dpo-dist builds the optimizer "
                "(torch's AdamW) and the learning-rate schedule from training.* (learning_rate, adam_beta1, adam_beta2, "
                f"adam_epsilon, weight_decay, lr_scheduler, warmup_ratio). Set them there, and remove the {section} "
                "section from the JSON (or make its params \"auto\")"
            )
        del ds[section]


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def reference_ds_config(train_ds: dict, offload: bool) -> dict:
    """Config of the frozen reference: ZeRO-3 sharded like the policy when the policy is ZeRO-3,
    or when offloaded (ZeRO-3 param offload keeps its weights in CPU memory); no optimizer."""
    ds = {
        key: copy.deepcopy(train_ds[key])
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16",
                    "timers")
        if key in train_ds
    }
    train_zero = train_ds.get("zero_optimization", {})
    if zero_stage(train_ds) == 3 or offload:
        zero = {"stage": 3}
        # memory_efficient_linear too: each zero.Init with it on replaces F.linear for the whole process
        for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "reduce_bucket_size",
                    "memory_efficient_linear"):
            if key in train_zero:
                zero[key] = train_zero[key]
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_optimization"] = zero
    else:
        ds["zero_optimization"] = {"stage": 0}
    return ds


def param_elements(module: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): under ZeRO-3 a rank holds a shard."""
    local = total = 0
    for param in module.parameters():
        if hasattr(param, "ds_tensor"):
            local += param.ds_tensor.numel()
            total += param.ds_numel
        else:
            local += param.numel()
            total += param.numel()
    return local, total


FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")  # torch's fused AdamW kernels (torch.optim.adam docs)


def fused_adamw_supported() -> bool:
    """Whether the optimizer's tensors live where torch has a fused AdamW kernel: DeepSpeed's accelerator (or the
    host, with optimizer offload, which is "cpu" and supported too).

    The fused step updates each element in one kernel, with no intermediate tensors. torch's default on a GPU, the
    foreach implementation, allocates sqrt(v) for everything it steps at once (4 bytes per element: up to 6.4 GiB
    for a Qwen3-1.7B on one rank), and the per-tensor one on a CPU two such buffers per tensor; on a
    full fine-tune with gradient checkpointing that step, not the backward, was the run's peak. It is also TRL's
    default (`optim="adamw_torch_fused"`), the same update (Adam's formula, per element, in fp32)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() in FUSED_ADAMW_DEVICES


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, floor: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over `warmup_steps`, then linear/cosine decay to `floor` (training.min_lr_ratio),
    or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    decayed = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * decayed


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights are 1-D (under ZeRO-3 the true shape is ds_shape)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # ZeRO's optimizers reject an empty group


def gather_whole_layers(module: nn.Module, ds_config: dict) -> int:
    """Under ZeRO-3, make each decoder layer one unit of parameter gathering (`deepspeed.zero3_whole_layers`);
    returns how many layers were marked.

    DeepSpeed hooks every submodule that holds parameters: in a Qwen3 layer the four projections, two
    norms, q/k norms and three MLP projections, each with a gather before
    and a release after it, in the policy's forward, its backward and the reference's forward. On one GPU
    that bookkeeping, not communication, is most of a ZeRO-3 step (bench/RESULTS.md). A layer marked as
    a z3 leaf is gathered whole by one hook and its submodules get none.

    DeepSpeed reduces a leaf layer's gradients in a full backward hook on it, which fires once its inputs'
    gradients exist; with frozen embeddings (LoRA) layer 0's input needs none, the hook fired before the
    layer's backward and the adapters' weights were gone when it ran. So with frozen embeddings their
    output is made to require grad (models.embeddings_output_requires_grad)."""
    if zero_stage(ds_config) != 3:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    from dpo_dist.models import embeddings_output_requires_grad

    layer_classes = {type(sub) for sub in module.modules() if type(sub).__name__.endswith("DecoderLayer")}
    if not layer_classes:
        return 0
    marked = len(set_z3_leaf_modules(module, list(layer_classes)))
    causal_lm = next(sub for sub in module.modules() if hasattr(sub, "get_input_embeddings"))
    if not any(param.requires_grad for param in causal_lm.get_input_embeddings().parameters()):
        embeddings_output_requires_grad(causal_lm)
    return marked


class TrainEngine:
    """A DeepSpeed engine around the policy `SequenceLogps`, with the optimizer and LR schedule."""

    def __init__(self, module: nn.Module, ds_config: dict, training: TrainingConfig, total_steps: int,
                 whole_layers: bool = False):
        import deepspeed

        if whole_layers:
            gather_whole_layers(module, ds_config)
        warmup_steps = math.ceil(training.warmup_ratio * total_steps)
        optimizer = torch.optim.AdamW(
            _param_groups(module, training.weight_decay),
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            fused=fused_adamw_supported(),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, training.lr_scheduler,
                                                  training.min_lr_ratio)
        )
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.scheduler = scheduler
        self._step_learning_rate: float | None = None  # the rate the last optimizer step trained with

    def __call__(self, *args):
        return self.engine(*args)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def step(self) -> None:
        # Read before the call: at the accumulation boundary the call steps the scheduler on to the next step's rate
        self._step_learning_rate = self.scheduler.get_last_lr()[0]
        self.engine.step()  # optimizer + scheduler step only at the accumulation boundary

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def learning_rate(self) -> float:
        """The rate the last optimizer step trained with, which transformers 5's Trainer (so TRL) logs for a step;
        before any step, the first step's."""
        if self._step_learning_rate is None:
            return self.scheduler.get_last_lr()[0]
        return self._step_learning_rate

    def save_state(self, directory: Path, tag: str) -> None:
        """Model, optimizer, scheduler and ZeRO partitions (collective; every rank writes its part)."""
        self.release_gathered_params()
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load_state(self, directory: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise UserError(f"{directory}: DeepSpeed found no engine state under tag '{tag}'")

    def release_gathered_params(self) -> None:
        """Under ZeRO-3, re-partition parameters left gathered or in flight by prefetching, so that
        an export can gather them one by one (a no-op for other stages)."""
        self.engine.empty_partition_cache()


def build_inference_engine(module: nn.Module, ds_config: dict, device: torch.device, whole_layers: bool = False) -> nn.Module:
    """A frozen model for scoring: ZeRO-3 sharded (and maybe CPU-offloaded) through DeepSpeed, else plain."""
    module.eval()
    module.requires_grad_(False)
    if zero_stage(ds_config) != 3:
        return module.to(device)
    import deepspeed

    if whole_layers:
        gather_whole_layers(module, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine
