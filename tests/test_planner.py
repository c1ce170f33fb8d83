"""The memory planner: exact parameter counts from config.json, each part reacting to the setting that
should move it, the trainer's refusal of a run that cannot fit, and the plan against peaks measured on CPU."""

import dataclasses
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from conftest import write_jsonl
from dpo_dist.config import LoRAConfig, load_config
from dpo_dist.data import PreferenceExample, collate, collate_packed
from dpo_dist.errors import UserError
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.models import prepare_policy
from dpo_dist.planner import DTYPE_BYTES, GIB, ModelShape, activation_bytes, check_memory, plan_memory
from launching import ROOT, assert_ok, python_launch, run, write_config
from make_tiny_qwen3 import make_checkpoint

QWEN3_4B = ModelShape(vocab=151936, hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8, head_dim=128, tied=True)


def test_parameter_count_is_exact(tiny_policy):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    assert ModelShape.from_hf_config(model.config).parameters() == sum(p.numel() for p in model.parameters())
    untied = Qwen3Config(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(untied).parameters())
    assert ModelShape.from_hf_config(untied).parameters() == real


def test_qwen3_4b_shape():
    # Qwen3-4B's config.json: 36 layers, hidden 2560, intermediate 9728, 32 heads / 8 kv heads of 128, tied, vocab 151936
    assert QWEN3_4B.parameters() == pytest.approx(4.02e9, rel=0.01)


def test_each_part_moves_with_its_setting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {base_model: x}\ntraining: {batch_size: 2, max_seq_length: 2048}\n")
    config = load_config(path)
    shape = QWEN3_4B
    zero2 = {"zero_optimization": {"stage": 2}}
    zero3 = {"zero_optimization": {"stage": 3}}
    base = plan_memory(config, shape, zero2, 8, "bfloat16", 80 * GIB)
    n = shape.parameters()
    assert base.parts["weights"] == n * 2 and base.parts["gradients"] == n * 2 / 8 and base.parts["optimizer"] == n * 12 / 8
    assert base.parts["reference"] == n * 2
    sharded = plan_memory(config, shape, zero3, 8, "bfloat16", 80 * GIB)
    assert sharded.parts["weights"] == n * 2 / 8 and sharded.parts["reference"] == n * 2 / 8
    checkpointed = plan_memory(dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=True)),
                               shape, zero2, 8, "bfloat16", 80 * GIB)
    assert checkpointed.parts["activations"] < base.parts["activations"] / 4
    lora = plan_memory(dataclasses.replace(config, lora=LoRAConfig()), shape, zero2, 8, "bfloat16", 80 * GIB)
    assert lora.parts["reference"] == 0 and lora.parts["optimizer"] < 0.01 * base.parts["optimizer"]
    # 8 x 40 GiB: 47 GiB of activations do not fit; checkpointing them (re-planned) does
    small = plan_memory(config, shape, zero2, 8, "bfloat16", 40 * GIB)
    assert not small.fits and "model.gradient_checkpointing=true" in small.advice
    assert "twice as many GPUs" not in small.advice  # activations do not shrink with more GPUs
    hopeless = plan_memory(config, shape, zero2, 1, "bfloat16", 4 * GIB)
    assert not hopeless.fits and hopeless.advice[0].startswith("no single change fits")
    # Activations and the optimizer step's temporaries are never alive together: the peak counts the larger.
    assert base.total == pytest.approx(sum(base.parts.values()) - min(base.phases.values()))
    assert base.phases["step"] == base.parts["gradients"] + base.parts["step"]


def test_check_memory_refuses_with_the_planners_advice(tmp_path):
    """The check the trainer runs before loading weights, with the device's memory passed in."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {base_model: x}\ntraining: {batch_size: 2, max_seq_length: 2048}\n")
    zero2 = {"zero_optimization": {"stage": 2}}
    with pytest.raises(UserError) as err:
        check_memory(load_config(path), QWEN3_4B, zero2, 8, "bfloat16", 40 * GIB)
    message = str(err.value)
    assert "more than the device's 40.0 GiB" in message and "try: model.gradient_checkpointing=true" in message
    assert "training.memory_check=false" in message and "\n" not in message  # one `error:` line
    assert check_memory(load_config(path), QWEN3_4B, zero2, 8, "bfloat16", 80 * GIB).fits
    assert check_memory(load_config(path, ["training.memory_check=false"]), QWEN3_4B, zero2, 8, "bfloat16", 40 * GIB) is None
    assert check_memory(load_config(path), QWEN3_4B, zero2, 8, "bfloat16", None) is None  # a CPU has no device limit


def test_plan_command(tiny_policy, tmp_path):
    result = run(python_launch("plan.py", ROOT / "configs" / "demo.yaml", f"model.base_model={tiny_policy}")[:2]
                 + ["--config", str(ROOT / "configs" / "demo.yaml"), "--gpu-mem", "80", f"model.base_model={tiny_policy}"])
    assert result.returncode == 0 and "fits in 80.0 GiB" in result.stdout and "optimizer" in result.stdout
    result = run(python_launch("plan.py", ROOT / "configs" / "demo.yaml")[:2]
                 + ["--config", str(ROOT / "configs" / "demo.yaml"), "--gpu-mem", "0.5", f"model.base_model={tiny_policy}"])
    assert result.returncode == 3 and "does NOT fit" in result.stdout


@pytest.mark.parametrize("overrides", [[], ["lora.r=8"], ["data.packing=true"], ["model.attn_implementation=eager"],
                                       ["model.dtype=bfloat16"]])
def test_activations_are_what_autograd_saves(tmp_path, overrides):
    """The activation term against the bytes autograd saves in the policy's forward (unique storages
    that are not parameters, seen through saved-tensor hooks): any change in transformers' Qwen3 code or
    in SequenceLogps that saves more or less shows here first."""
    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)
    model_dir = make_checkpoint(tmp_path / "model", seed=0, **shape)
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{base_model: {model_dir}, dtype: float32}}\ntraining: {{batch_size: 2, max_seq_length: 256}}\n")
    config = load_config(path, overrides)
    dtype = getattr(torch, config.model.dtype)  # bfloat16: RMSNorm saves fp32 upcasts beside bf16 tensors
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=config.model.attn_implementation)
    policy = prepare_policy(model, config.model, config.lora).train()
    ids = list(range(1, 257))
    pairs = [PreferenceExample(f"u{i}", ids, 192, ids, 192) for i in range(2)]  # full rows: the plan's micro-batch
    batch = (collate_packed if config.data.packing else collate)(pairs, 0)
    parameters = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_pair(SequenceLogps(policy, 64), batch)
    planned = activation_bytes(config, ModelShape.from_hf_config(model.config), DTYPE_BYTES[config.model.dtype])
    assert planned == pytest.approx(sum(saved.values()), rel=0.05)


# Qwen3-0.6B's proportions (q heads x head_dim = 2 x hidden, 2 query heads per KV head, MLP 3 x hidden) at
# half width, 4 layers, a 32k vocabulary: 32.5M parameters, so every modeled term is tens to hundreds of MB.
MEASURED_SHAPE = dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128)
MEASURED_RUNS = [  # (name, max_seq_length, config sections): each is dominated by a different part
    ("full, ZeRO-2, reference model", 512, {}),
    ("full, ZeRO-2, grad checkpointing", 512, {"model": {"gradient_checkpointing": True}}),
    ("LoRA r=16, adapter reference", 1024, {"lora": {"r": 16, "alpha": 32}}),
    ("full, ZeRO-3, reference model", 512, {"deepspeed": {"config": "ds_configs/zero3.json"}}),
]


def long_pairs(path, seq: int, completion: int):
    """16 plain-text pairs: a prompt of seq - completion one-token numbers, a chosen completion cut at
    seq by truncation, a rejected one 30 tokens shorter (so the batch is padded)."""
    numbers = lambda start, count, step: " ".join(str((start + step * k) % 100) for k in range(count))  # noqa: E731
    return write_jsonl(path, [{"prompt": numbers(i, seq - completion, 1), "chosen": " " + numbers(i, seq, 7),
                               "rejected": " " + numbers(i, completion - 30, 3)} for i in range(16)])


def test_plan_is_within_25_percent_of_the_measured_cpu_peak(tmp_path):
    """Real training steps (tests/measure_peak.py: launch/train.py's Trainer, one process, fp32) against
    plan_memory(on_gpu=False) with the trainer's own DeepSpeed config; measured is the peak resident set
    above a pre-load baseline (the method is in measure_peak.py's docstring)."""
    model = make_checkpoint(tmp_path / "model", seed=0, **MEASURED_SHAPE)
    rows = []
    for index, (name, seq, sections) in enumerate(MEASURED_RUNS):
        data = long_pairs(tmp_path / f"pairs{seq}.jsonl", seq, completion=seq // 4)
        sections = {**sections, "model": {"logps_chunk_tokens": 256, **sections.get("model", {})}}
        config = write_config(tmp_path / f"{index}.yaml", model, None, tmp_path / f"out{index}",
                              **{**sections, "training": {"batch_size": 2, "max_seq_length": seq},
                                 "data": {"train_files": [str(data)], "eval_files": []}})
        result = run([sys.executable, "tests/measure_peak.py", "--config", str(config)])
        assert_ok(result)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        error = (record["predicted_mb"] - record["measured_mb"]) / record["measured_mb"]
        rows.append((name, record["predicted_mb"], record["measured_mb"], error, record["measured_phase"]))
    print(f"\n{'run':34} {'predicted MB':>12} {'measured MB':>12} {'error':>7}  measured peak")
    for name, predicted, measured, error, phase in rows:
        print(f"{name:34} {predicted:12.0f} {measured:12.0f} {error:+7.1%}  {phase}")
    assert all(abs(error) <= 0.25 for _, _, _, error, _ in rows), rows
