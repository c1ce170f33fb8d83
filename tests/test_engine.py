"""DeepSpeed config filling, batch arithmetic, the optimizer and the learning-rate schedule."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from dpo_dist.config import LoRAConfig, TrainingConfig
from dpo_dist.engine import fill_ds_config, lr_multiplier, read_ds_config, reference_ds_config, zero_stage
from dpo_dist.errors import UserError
from dpo_dist.planner import ModelShape


# Qwen3-1.7B's shape: a decoder layer holds q 2048x2048, k and v 2048x1024, o 2048x2048, gate, up and down
# 2048x6144, the q/k norms (128 each) and the two layer norms (2048 each).
QWEN3_1_7B = ModelShape(vocab=151936, hidden=2048, intermediate=6144, layers=28, heads=16, kv_heads=8, head_dim=128, tied=True)
LAYER_1_7B = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144 + 2 * 128 + 2 * 2048
TINY = ModelShape(vocab=1000, hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)


def test_auto_fields_are_filled_from_the_run_config():
    training = TrainingConfig(batch_size=2, gradient_accumulation_steps=8, max_grad_norm=0.5)
    ds = fill_ds_config(read_ds_config("ds_configs/zero3.json"), training, torch.bfloat16, QWEN3_1_7B, 4, lora=None)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 2 * 8 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 20480
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == LAYER_1_7B  # the next layer, whole
    # One gradient bucket per decoder layer (full fine-tuning), one per backward with LoRA (all its elements:
    # r x (fan-in + fan-out) for the 7 projections of 28 layers)
    assert ds["zero_optimization"]["reduce_bucket_size"] == LAYER_1_7B == 50_336_000
    lora = LoRAConfig(r=16)
    adapters = 28 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 1024) + 3 * (2048 + 6144))
    ds = fill_ds_config(read_ds_config("ds_configs/zero2.json"), training, torch.bfloat16, QWEN3_1_7B, 4, lora=lora)
    assert ds["zero_optimization"]["reduce_bucket_size"] == adapters == 17_432_576
    explicit = read_ds_config("zero2.json")
    explicit["zero_optimization"]["reduce_bucket_size"] = 12345  # a number in the JSON is kept
    assert fill_ds_config(explicit, training, torch.bfloat16, QWEN3_1_7B, 4, lora)["zero_optimization"]["reduce_bucket_size"] == 12345


def test_zero3_optimizer_sub_groups_are_one_layer_unless_the_optimizer_is_offloaded():
    training = TrainingConfig(batch_size=2)
    filled = lambda raw: fill_ds_config(raw, training, torch.bfloat16, QWEN3_1_7B, 8, None)["zero_optimization"]  # noqa: E731
    assert filled(read_ds_config("zero3.json"))["sub_group_size"] == LAYER_1_7B
    # Offloaded, DeepSpeed's CPU Adam streams sub-groups through the host: its default size
    assert filled(read_ds_config("zero3_offload.json"))["sub_group_size"] == 10**9
    explicit = read_ds_config("zero3.json")
    explicit["zero_optimization"]["sub_group_size"] = 12345
    assert filled(explicit)["sub_group_size"] == 12345
    assert "sub_group_size" not in filled(read_ds_config("zero2.json"))  # ZeRO-1/2 step whole parameter groups


# OpenRLHF's get_train_ds_config at stage 2 with --adam_offload, as its users bring it: one file for every stage
OPENRLHF_ZERO2_OFFLOAD = {
    "steps_per_print": 100,
    "zero_optimization": {"stage": 2, "offload_param": {"device": "none"},
                          "offload_optimizer": {"device": "cpu", "pin_memory": True}, "sub_group_size": "auto",
                          "stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto",
                          "reduce_bucket_size": "auto", "zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                          "zero_quantized_gradients": False},
    "bf16": {"enabled": False}, "fp16": {"enabled": False}, "gradient_clipping": 1.0, "prescale_gradients": False,
    "wall_clock_breakdown": False, "data_types": {"grad_accum_dtype": None}, "checkpoint": {"load_universal": False},
}


def test_an_openrlhf_config_loads_at_every_stage_with_its_optimizer_offloaded():
    """Its ZeRO-3 settings are "auto" at every stage: below 3 DeepSpeed reads none of them (dropped), at 3 the two
    dpo-dist has no rule for get DeepSpeed's defaults. With the optimizer offloaded DeepSpeed would refuse the
    client optimizer dpo-dist hands it (a traceback) unless zero_force_ds_cpu_optimizer is false."""
    training = TrainingConfig(batch_size=2)
    zero2 = fill_ds_config(OPENRLHF_ZERO2_OFFLOAD, training, torch.float32, TINY, 2, None)
    assert not [key for key in zero2["zero_optimization"] if "stage3" in key or key == "sub_group_size"]
    assert zero2["zero_force_ds_cpu_optimizer"] is False and zero2["gradient_clipping"] == 1.0
    stage3 = json.loads(json.dumps(OPENRLHF_ZERO2_OFFLOAD))
    stage3["zero_optimization"]["stage"] = 3
    zero3 = fill_ds_config(stage3, training, torch.float32, TINY, 2, None)["zero_optimization"]
    assert zero3["stage3_max_live_parameters"] == zero3["stage3_max_reuse_distance"] == 10**9
    assert zero3["sub_group_size"] == 10**9 and zero3["stage3_param_persistence_threshold"] == 640
    not_offloaded = fill_ds_config(read_ds_config("zero2.json"), training, torch.float32, TINY, 2, None)
    assert "zero_force_ds_cpu_optimizer" not in not_offloaded
    forced = json.loads(json.dumps(OPENRLHF_ZERO2_OFFLOAD)) | {"zero_force_ds_cpu_optimizer": True}
    with pytest.raises(UserError, match="sets zero_force_ds_cpu_optimizer: true, which makes DeepSpeed refuse"):
        fill_ds_config(forced, training, torch.float32, TINY, 2, None)


def probe_output(probe: Path) -> dict:
    """Run a probe script in a process of its own (DeepSpeed's engine wants its own process group) and read the
    JSON line it prints last."""
    from launching import assert_ok, run

    result = run([sys.executable, str(probe)])
    assert_ok(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ds_name", ["zero1.json", "zero2.json", "openrlhf_zero2_offload.json"])
def test_the_optimizer_is_torchs_fused_adamw(tmp_path, ds_name):
    """One update through the engine (ZeRO-1 and ZeRO-2, a process of its own; also ZeRO-2 with the optimizer
    offloaded, as an OpenRLHF file has it) is Adam's formula, written out here
    (decoupled weight decay, bias-corrected moments), by the fused implementation: the one whose step keeps
    no temporaries (planner.step_bytes)."""
    from launching import ROOT

    ds_path = tmp_path / ds_name
    ds_path.write_text(json.dumps(OPENRLHF_ZERO2_OFFLOAD if ds_name.startswith("openrlhf") else read_ds_config(ds_name)))
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from dpo_dist.config import TrainingConfig\n"
        "from dpo_dist.engine import TrainEngine, fill_ds_config, init_distributed, read_ds_config\n"
        "from dpo_dist.planner import ModelShape\n"
        "init_distributed(1.0)\n"
        "torch.manual_seed(0)\n"
        "module = torch.nn.Linear(3, 2, bias=False)\n"
        "training = TrainingConfig(batch_size=1, learning_rate=0.1, weight_decay=0.01, warmup_ratio=0.0)\n"
        "shape = ModelShape(vocab=10, hidden=3, intermediate=4, layers=1, heads=1, kv_heads=1, head_dim=3, tied=True)\n"
        f"engine = TrainEngine(module, fill_ds_config(read_ds_config({str(ds_path)!r}), training, torch.float32, shape, 1, None),\n"
        "                     training, total_steps=1000)\n"
        "inputs = torch.randn(4, 3)\n"
        "before = module.weight.detach().clone().tolist()\n"
        "engine.backward(engine(inputs).pow(2).sum())\n"
        "engine.step()\n"
        "print(json.dumps({'fused': engine.engine.optimizer.optimizer.defaults['fused'], 'inputs': inputs.tolist(),\n"
        "                  'before': before, 'after': module.weight.detach().tolist()}))\n"
    )
    out = probe_output(probe)
    assert out["fused"] is True
    inputs, before = torch.tensor(out["inputs"]), torch.tensor(out["before"])
    grad = 2 * (inputs @ before.T).T @ inputs  # d/dW of sum((x W^T)^2)
    training = TrainingConfig()
    beta1, beta2, eps, lr = training.adam_beta1, training.adam_beta2, training.adam_epsilon, 0.1  # no warmup: full lr
    grad = grad * min(1.0, training.max_grad_norm / grad.norm().item())  # the engine clips at max_grad_norm
    m, v = (1 - beta1) * grad, (1 - beta2) * grad * grad
    expected = before * (1 - lr * 0.01) - lr * (m / (1 - beta1)) / ((v / (1 - beta2)).sqrt() + eps)
    assert torch.allclose(torch.tensor(out["after"]), expected, atol=1e-6), (out["after"], expected)


def test_overlap_comm_is_off_on_one_process_under_zero1_and_zero2():
    """One process has no reduction to overlap; the file's setting stands on several, and under ZeRO-3 (whose
    one-process runs get a note instead)."""
    training = TrainingConfig(batch_size=2, gradient_accumulation_steps=4)
    zero2 = read_ds_config("ds_configs/zero2.json")
    assert zero2["zero_optimization"]["overlap_comm"] is True
    assert fill_ds_config(zero2, training, torch.bfloat16, TINY, 1, None)["zero_optimization"]["overlap_comm"] is False
    assert fill_ds_config(zero2, training, torch.bfloat16, TINY, 2, None)["zero_optimization"]["overlap_comm"] is True
    zero1 = {"zero_optimization": {"stage": 1, "overlap_comm": True}}
    assert fill_ds_config(zero1, training, torch.bfloat16, TINY, 1, None)["zero_optimization"]["overlap_comm"] is False
    zero3 = read_ds_config("ds_configs/zero3.json")
    assert fill_ds_config(zero3, training, torch.bfloat16, TINY, 1, None)["zero_optimization"]["overlap_comm"] is True


def test_deepspeeds_throughput_timer_runs_on_host_clocks_unless_the_file_says_otherwise():
    """Its device synchronizes (two per micro-batch) stall the step; a file that asks for them keeps them. The
    reference's engine gets the same setting (it never calls step(), so its timer never synchronized anyway)."""
    training = TrainingConfig(batch_size=2, gradient_accumulation_steps=4)
    filled = fill_ds_config(read_ds_config("ds_configs/zero2.json"), training, torch.bfloat16, TINY, 2, None)
    assert filled["timers"] == {"throughput": {"synchronized": False}}
    assert reference_ds_config(filled, offload=False)["timers"] == filled["timers"]
    asked = {**read_ds_config("ds_configs/zero2.json"), "timers": {"throughput": {"enabled": True, "synchronized": True}}}
    assert fill_ds_config(asked, training, torch.bfloat16, TINY, 2, None)["timers"]["throughput"]["synchronized"] is True
    empty = {**read_ds_config("ds_configs/zero2.json"), "timers": None}  # a key written with nothing under it
    assert fill_ds_config(empty, training, torch.bfloat16, TINY, 2, None)["timers"] == filled["timers"]


def test_one_process_takes_the_same_steps_under_zero1_and_zero2_without_synchronizing_the_device(tmp_path):
    """What the one-process changes rest on (overlap_comm off, planner.single_rank_note's ZeRO-1 advice): three
    optimizer steps of 4 accumulated micro-batches, fp32 and bf16, through DeepSpeed's engine in one process,
    leave the same parameters bit for bit under ZeRO-2 with overlap_comm, ZeRO-2 without it and ZeRO-1. A
    reduce bucket smaller than the model makes ZeRO-2 reduce in several buckets per backward, as a real model does.
    And none of those steps synchronizes the device (DeepSpeed's accelerator call, counted), where DeepSpeed's own
    throughput timer does twice per micro-batch from its third step on: 8 times in the third step here. (On CPU
    DeepSpeed runs overlap_comm's reduction without a side stream or its synchronize: what the overlap_comm
    runs compare here is its double buffering; on CUDA the kernels are the same, on another stream.)"""
    from launching import ROOT

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "from dpo_dist.config import TrainingConfig\n"
        "from dpo_dist.engine import TrainEngine, fill_ds_config, init_distributed, read_ds_config\n"
        "from dpo_dist.planner import ModelShape\n"
        "init_distributed(1.0)\n"
        "accelerator, synchronizes = get_accelerator(), []\n"
        "synchronize = accelerator.synchronize\n"
        "accelerator.synchronize = lambda *args: synchronizes.append(1) or synchronize(*args)\n"
        "training = TrainingConfig(batch_size=1, gradient_accumulation_steps=4, learning_rate=0.01, warmup_ratio=0.0)\n"
        "shape = ModelShape(vocab=10, hidden=64, intermediate=128, layers=1, heads=1, kv_heads=1, head_dim=64, tied=True)\n"
        "final, counted = {}, {}\n"
        "runs = [(dtype, name, file, overlap) for dtype in (torch.float32, torch.bfloat16)\n"
        "        for name, file, overlap in (('zero2', 'zero2.json', True), ('zero2-no-overlap', 'zero2.json', False),\n"
        "                                    ('zero1', 'zero1.json', False))]\n"
        "for dtype, name, file, overlap in runs + [(torch.float32, 'deepspeed-timer', 'zero2.json', False)]:\n"
        "    torch.manual_seed(0)\n"
        "    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(dtype)\n"
        "    ds = fill_ds_config(read_ds_config(file), training, dtype, shape, 1, None)\n"
        "    ds['zero_optimization'].update(overlap_comm=overlap, reduce_bucket_size=5000)\n"
        "    if name == 'deepspeed-timer':\n"
        "        del ds['timers']\n"
        "    engine = TrainEngine(module, ds, training, total_steps=1000)\n"
        "    inputs = torch.Generator().manual_seed(1)\n"
        "    synchronizes.clear()\n"
        "    for step in range(3):\n"
        "        for micro in range(4):\n"
        "            engine.backward(engine(torch.randn(8, 64, generator=inputs).to(dtype)).float().pow(2).mean())\n"
        "            engine.step()  # DeepSpeed's: called per micro-batch, steps at the 4th\n"
        "    final[f'{name} {dtype}'] = [p.detach().float().flatten().tolist() for p in module.parameters()]\n"
        "    counted[f'{name} {dtype}'] = len(synchronizes)\n"
        "print(json.dumps({'final': final, 'synchronizes': counted}))\n"
    )
    out = probe_output(probe)
    final, synchronizes = out["final"], out["synchronizes"]
    for dtype in ("torch.float32", "torch.bfloat16"):
        reference = final[f"zero2 {dtype}"]
        for name in ("zero2-no-overlap", "zero1"):
            assert final[f"{name} {dtype}"] == reference, (name, dtype)
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    moved = torch.tensor(final["zero2 torch.float32"][0]) - start[0].weight.detach().flatten()
    assert moved.abs().max() > 0.02  # three steps of lr 0.01 moved them: the comparison above compares steps taken
    assert synchronizes.pop("deepspeed-timer torch.float32") == 8
    assert set(synchronizes.values()) == {0}, synchronizes


# transformers' documented ZeRO-3 config, as TRL users bring it: its optimizer and scheduler are the Trainer's to fill
HF_ZERO3 = {
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", "loss_scale": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_a_transformers_style_config_has_its_auto_optimizer_and_scheduler_left_to_the_run_config():
    """Their "auto" sections are dropped (dpo-dist builds both from training.*); a value written in them, which
    DeepSpeed would ignore beside the optimizer and scheduler it is handed, is refused naming it."""
    ds = fill_ds_config(HF_ZERO3, TrainingConfig(batch_size=2), torch.bfloat16, TINY, 2, None)
    assert "optimizer" not in ds and "scheduler" not in ds and ds["bf16"]["enabled"] and ds["train_batch_size"] == 4
    written = json.loads(json.dumps(HF_ZERO3))
    written["optimizer"]["params"]["lr"] = 2e-5
    with pytest.raises(UserError, match=r"sets optimizer.params.lr=2e-05: dpo-dist builds the optimizer \(torch's AdamW\) "
                                        r"and the learning-rate schedule from training.\*"):
        fill_ds_config(written, TrainingConfig(batch_size=2), torch.bfloat16, TINY, 2, None)
    lamb = json.loads(json.dumps(HF_ZERO3))
    lamb["optimizer"]["type"] = "Lamb"
    with pytest.raises(UserError, match="sets optimizer.type=Lamb"):
        fill_ds_config(lamb, TrainingConfig(batch_size=2), torch.bfloat16, TINY, 2, None)


def test_batch_arithmetic_mismatch_is_a_clear_error():
    raw = read_ds_config("zero2.json") | {"train_batch_size": 10}
    with pytest.raises(UserError, match=r"\(deepspeed.config\) train_batch_size 10 != training.batch_size 2 x "
                                        r"training.gradient_accumulation_steps 1 x world size 2"):
        fill_ds_config(raw, TrainingConfig(batch_size=2), torch.float32, TINY, 2, None)
    raw = read_ds_config("zero2.json") | {"train_micro_batch_size_per_gpu": 4}
    with pytest.raises(UserError, match=r"\(deepspeed.config\) sets train_micro_batch_size_per_gpu 4 and "
                                        r"gradient_accumulation_steps 1, but training.batch_size=2"):
        fill_ds_config(raw, TrainingConfig(batch_size=2), torch.float32, TINY, 1, None)


def test_precision_conflict_and_missing_file():
    raw = read_ds_config("zero2.json") | {"bf16": {"enabled": True}}
    with pytest.raises(UserError, match="bf16.enabled=True but model.dtype"):
        fill_ds_config(raw, TrainingConfig(), torch.float32, TINY, 1, None)
    with pytest.raises(UserError, match="deepspeed.config: nope.json not found"):
        read_ds_config("nope.json")


def test_reference_config_follows_the_policy_stage_and_offload():
    training = TrainingConfig()
    zero2 = fill_ds_config(read_ds_config("zero2.json"), training, torch.float32, TINY, 1, None)
    zero3 = fill_ds_config(read_ds_config("zero3.json"), training, torch.float32, TINY, 1, None)
    assert zero_stage(reference_ds_config(zero2, offload=False)) == 0
    assert zero_stage(reference_ds_config(zero3, offload=False)) == 3
    offloaded = reference_ds_config(zero2, offload=True)
    assert zero_stage(offloaded) == 3 and offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in offloaded


def test_lr_schedule_warmup_then_decay():
    # 10 steps, 2 warmup: 1/3, 2/3, then linear from 1 down toward 0
    values = [lr_multiplier(s, 2, 10, "linear") for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[-1] == pytest.approx(1 - 7 / 8)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert lr_multiplier(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, 2, 10, "constant") == 1.0


def test_decay_ends_at_min_lr_ratio_as_transformers_cosine_with_min_lr():
    """training.min_lr_ratio (OpenRLHF's min_lr_ratio): by hand, and against transformers' cosine_with_min_lr
    schedule (no warmup: the two warm up differently) over a whole run."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    assert lr_multiplier(6, 2, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(9, 2, 10, "linear", 0.1) == pytest.approx(0.1 + 0.9 * (1 - 7 / 8))
    assert lr_multiplier(50, 2, 10, "linear", 0.1) == pytest.approx(0.1)  # past the planned steps: the floor
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 0, 20, min_lr_rate=0.1)
    for step in range(20):
        assert lr_multiplier(step, 0, 20, "cosine", 0.1) == pytest.approx(theirs.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        theirs.step()


def _vote_worker(rank: int, port: int, results) -> None:
    """Two gloo ranks; only rank 1 raises its flag, at call 2 (0-based)."""
    import os

    import torch.distributed as dist

    from dpo_dist.engine import LaggedVote

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    vote = LaggedVote(torch.device("cpu"))
    seen = [vote(rank == 1 and call == 2) for call in range(5)]
    seen.append(vote(rank == 1, wait=True))  # a blocking vote sees this call's flag
    vote.drain()
    results[rank] = seen
    dist.destroy_process_group()


def test_lagged_vote_agrees_one_call_late_on_every_rank():
    import torch.multiprocessing as mp

    from dpo_dist.engine import _free_port

    results = mp.Manager().dict()
    mp.spawn(_vote_worker, args=(_free_port(), results), nprocs=2, join=True)
    expected = [False, False, False, True, False, True]  # call 2's flag is read at call 3
    assert results[0] == expected and results[1] == expected


def test_lagged_vote_on_one_rank_is_the_flag_itself():
    from dpo_dist.engine import LaggedVote

    vote = LaggedVote(torch.device("cpu"))  # no process group: a world of one
    assert [vote(False), vote(True), vote(False)] == [False, True, False]


def test_zero3_gathers_each_decoder_layer_whole(tiny_policy):
    """deepspeed.zero3_whole_layers marks every decoder layer as one ZeRO-3 unit, and nothing else; other stages
    gather nothing, so nothing is marked. (Training with it on is the ZeRO-3 multi-rank test; with it off, that
    test's second run.)"""
    from deepspeed.utils import get_z3_leaf_modules
    from transformers import AutoModelForCausalLM

    from dpo_dist.engine import gather_whole_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    assert gather_whole_layers(model, read_ds_config("zero2.json")) == 0
    assert get_z3_leaf_modules(model) == []
    layers = model.config.num_hidden_layers
    assert gather_whole_layers(model, read_ds_config("zero3.json")) == layers
    leaves = get_z3_leaf_modules(model)
    assert [type(leaf).__name__ for leaf in leaves] == ["Qwen3DecoderLayer"] * layers
    assert leaves[0] is model.model.layers[0]
    assert not hasattr(model.get_input_embeddings(), "_dpo_dist_requires_grad_hook")  # trainable embeddings

    # Frozen embeddings (LoRA): layer 0's input is made to require grad, or the per-layer gradient hook fires early.
    from dpo_dist.config import LoRAConfig, ModelConfig
    from dpo_dist.models import prepare_policy

    lora = prepare_policy(AutoModelForCausalLM.from_pretrained(tiny_policy), ModelConfig(base_model="x"), LoRAConfig(r=4))
    assert gather_whole_layers(lora, read_ds_config("zero3.json")) == layers
    assert lora.get_input_embeddings()._dpo_dist_requires_grad_hook


def test_cpu_ranks_count_their_node_without_running_numactl_and_leave_no_shm(tmp_path):
    """DeepSpeed's CPU accelerator answers device_count() from LOCAL_SIZE, which only its own launcher sets; without
    it each call runs `numactl --hardware` in a subprocess, and ZeRO-3 asks once per gradient reduction. Under
    torchrun (and plain python, a world of one), init_distributed takes the number from LOCAL_WORLD_SIZE: the
    right count, and no subprocess. With LOCAL_SIZE set DeepSpeed maps its shared-memory all-reduce buffer
    for every world size, one rank included: no /dev/shm file of the run may outlive it."""
    from launching import ROOT, assert_ok, free_port, run

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from dpo_dist.engine import init_distributed\n"
        "info = init_distributed(1.0)\n"
        "import deepspeed.utils.numa as numa\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "probes = []\n"
        "numa.get_numa_cores = lambda: probes.append(1) or []\n"
        "print(f'rank {info.rank} device_count {get_accelerator().device_count()} numa_probes {len(probes)} "
        "port {os.environ[\"MASTER_PORT\"]}')\n"
    )
    line = r"rank (\d) device_count (\d+) numa_probes (\d+) port (\d+)"
    port = free_port()
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(probe)],
                 timeout=120)
    assert_ok(result)
    reports = sorted(re.findall(line, result.stdout))  # the ranks' lines may interleave
    assert reports == [("0", "2", "0", str(port)), ("1", "2", "0", str(port))]
    alone = run([sys.executable, str(probe)], timeout=120)
    assert_ok(alone)
    [(rank, count, probes, alone_port)] = re.findall(line, alone.stdout)
    assert (rank, count, probes) == ("0", "1", "0")
    for used in (port, alone_port):
        assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{used}_*")) == []


def test_launch_scripts_end_with_their_status_whatever_the_interpreter_teardown_would_do(tiny_policy, tmp_path):
    """Left to interpreter teardown, gloo's worker threads can abort the process ("terminate called without an
    active exception"): twice in CI this turned a run's status (0, and a SIGUSR1 stop's 75) into a crash.
    run_main destroys the group after the script's body, runs the exit functions and leaves without the
    teardown (cli.exit_process), on the normal path and after a user error. The probe leaves an all-reduce
    un-waited, sees no group left in its exit function, and holds an object whose destructor aborts the
    process when teardown reaches it: the status stays 75 (and 2), and nothing aborts. Plain python (a world
    of one, with gloo's threads all the same): a launcher would stop the other rank on the first non-zero status."""
    from launching import ROOT, run, write_config

    config = write_config(tmp_path / "c.yaml", tiny_policy, None, tmp_path / "out")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import atexit, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch, torch.distributed as dist\n"
        "from dpo_dist.cli import run_main\n"
        "from dpo_dist.engine import init_distributed\n"
        "from dpo_dist.errors import UserError\n"
        "class AbortsInTeardown:\n"
        "    def __del__(self, abort=os.abort):  # bound now: teardown may have cleared the module's globals\n"
        "        abort()  # as a C++ destructor that terminates would\n"
        "HELD_UNTIL_TEARDOWN = AbortsInTeardown()\n"
        "def body(config, args):\n"
        "    init_distributed(1.0)\n"
        "    atexit.register(lambda: print(f'group at exit: {dist.is_initialized()}', flush=True))\n"
        "    dist.all_reduce(torch.ones(1 << 16), async_op=True)  # left to gloo's threads\n"
        "    if config.training.seed == 7:\n"
        "        raise UserError('probe failure')\n"
        "    return 75\n"
        "run_main('probe', body)\n"
    )
    for seed, status in ((42, 75), (7, 2)):
        result = run([sys.executable, str(probe), "--config", str(config), f"training.seed={seed}"], timeout=120)
        assert result.returncode == status, result.stderr[-3000:]
        assert "group at exit: False" in result.stdout and "terminate called" not in result.stderr


def test_ranks_on_this_node_reads_either_launchers_variable(monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher only LOCAL_SIZE: the host-memory check must count
    the node's ranks under both (plain python: one)."""
    from dpo_dist.engine import ranks_on_this_node

    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert ranks_on_this_node() == 1
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert ranks_on_this_node() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_on_this_node() == 4
