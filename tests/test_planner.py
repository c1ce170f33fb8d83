"""The memory planner's arithmetic: exact parameter counts from config.json, and each part reacting to
the setting that should move it. (Its agreement with measured peaks is issue 8's open work.)"""

import dataclasses

import pytest
from transformers import AutoModelForCausalLM, Qwen3Config

from dpo_dist.config import LoRAConfig, load_config
from dpo_dist.planner import GIB, ModelShape, plan_memory
from launching import ROOT, python_launch, run


def test_parameter_count_is_exact(tiny_policy):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    assert ModelShape.from_hf_config(model.config).parameters() == sum(p.numel() for p in model.parameters())
    untied = Qwen3Config(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(untied).parameters())
    assert ModelShape.from_hf_config(untied).parameters() == real


def test_qwen3_4b_shape():
    # Qwen3-4B's config.json: 36 layers, hidden 2560, intermediate 9728, 32 heads / 8 kv heads of 128, tied, vocab 151936
    shape = ModelShape(vocab=151936, hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8, head_dim=128, tied=True)
    assert shape.parameters() == pytest.approx(4.02e9, rel=0.01)


def test_each_part_moves_with_its_setting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {base_model: x}\ntraining: {batch_size: 2, max_seq_length: 2048}\n")
    config = load_config(path)
    shape = ModelShape(vocab=151936, hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8, head_dim=128, tied=True)
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
    # 8 x 40 GiB: 35 GiB of activations do not fit; checkpointing them (re-planned) does
    small = plan_memory(config, shape, zero2, 8, "bfloat16", 40 * GIB)
    assert not small.fits and "model.gradient_checkpointing=true" in small.advice
    assert "twice as many GPUs" not in small.advice  # activations do not shrink with more GPUs
    hopeless = plan_memory(config, shape, zero2, 1, "bfloat16", 4 * GIB)
    assert not hopeless.fits and hopeless.advice[0].startswith("no single change fits")


def test_plan_command(tiny_policy, tmp_path):
    result = run(python_launch("plan.py", ROOT / "configs" / "demo.yaml", f"model.base_model={tiny_policy}")[:2]
                 + ["--config", str(ROOT / "configs" / "demo.yaml"), "--gpu-mem", "80", f"model.base_model={tiny_policy}"])
    assert result.returncode == 0 and "fits in 80.0 GiB" in result.stdout and "optimizer" in result.stdout
    result = run(python_launch("plan.py", ROOT / "configs" / "demo.yaml")[:2]
                 + ["--config", str(ROOT / "configs" / "demo.yaml"), "--gpu-mem", "0.5", f"model.base_model={tiny_policy}"])
    assert result.returncode == 3 and "does NOT fit" in result.stdout
