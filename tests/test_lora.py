"""LoRA with the implicit reference (the policy with its adapter disabled) on 2 real ranks, ZeRO-2
and ZeRO-3, fp32 and bf16, gradient checkpointing on and off; adapter and merged exports."""

import math
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist.data import collate
from dpo_dist.tokenization import TokenizeStats, tokenize_record
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.reference import AdapterReference
from launching import assert_ok, deepspeed_launch, read_metrics, run, torchrun_launch, write_config
from test_logps import make_record, naive_completion_logps
from conftest import CHAT_RECORD, PLAIN_RECORD

pytestmark = pytest.mark.multirank
LN2 = math.log(2.0)


def lora_config(tmp_path, policy, name, **sections):
    training = {"max_steps": 8, **sections.pop("training", {})}
    return write_config(tmp_path / f"{name}.yaml", policy, None, tmp_path / name, lora={"r": 8, "alpha": 16},
                        training=training, **sections)


def check_starts_at_ln2_and_learns(output_dir, dtype_tolerance):
    train, evals = read_metrics(output_dir)
    # lora_B starts at zero: the adapter is a no-op, the policy IS the reference, every reward is 0
    assert train[1]["loss"] == pytest.approx(LN2, abs=1e-7)
    assert train[1]["rewards/chosen"] == 0.0 and train[1]["rewards/margins"] == 0.0
    assert abs(train[max(train)]["rewards/margins"]) > dtype_tolerance  # after training a real gap appears
    return train, evals


def test_zero3_fp32_gradient_checkpointing_adapter_reference_and_exports(tiny_policy, tmp_path):
    config = lora_config(tmp_path, tiny_policy, "z3", model={"gradient_checkpointing": True},
                         deepspeed={"config": "ds_configs/zero3.json"}, export={"merge": True},
                         reference={"offload": True})  # OpenRLHF's --ref_offload beside LoRA: said to do nothing
    result = run(deepspeed_launch("train.py", config))
    assert_ok(result)
    assert "reference: adapter" in result.stdout and "reference: rank 0 holds" not in result.stdout  # no second model
    assert "reference.offload: no reference model to offload (reference: adapter); the setting does nothing" in result.stdout
    assert "policy: trains a LoRA adapter (r 8, alpha 16, on q_proj, k_proj, v_proj, o_proj, gate_proj" in result.stdout
    _, evals = check_starts_at_ln2_and_learns(tmp_path / "z3", 1e-3)
    assert evals[0]["eval_loss"] == pytest.approx(LN2, abs=1e-7)
    assert evals[-1]["eval_loss"] < LN2 and evals[-1]["eval_rewards/accuracies"] > 0.5

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    examples = [tokenize_record(make_record(r), tokenizer, 256, "keep_start", TokenizeStats()) for r in (CHAT_RECORD, PLAIN_RECORD)]
    batch = collate(examples, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logps = naive_completion_logps(base, batch.input_ids, batch.attention_mask, batch.completion_mask)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32), tmp_path / "z3" / "final")
    scorer = SequenceLogps(adapted, chunk_tokens=4)
    adapted.train()  # the reference must switch dropout off and the adapter off by itself
    reference = AdapterReference(scorer, adapted).logps(batch)
    torch.testing.assert_close(torch.cat([reference.chosen_logps, reference.rejected_logps]), base_logps, atol=1e-5, rtol=0)
    assert adapted.training  # and put the policy back in train mode
    with torch.no_grad():
        adapter_logps = forward_pair(scorer.eval(), batch)
    assert not torch.allclose(adapter_logps.chosen_logps, base_logps[:2], atol=1e-4)  # the trained adapter matters

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "z3" / "final" / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch.input_ids).logits, adapted.eval()(batch.input_ids).logits, atol=1e-5, rtol=0)

    # launch/export.py turns the last DeepSpeed checkpoint into the same adapter
    export = [sys.executable, "launch/export.py", "--checkpoint", str(tmp_path / "z3" / "checkpoint-8"), "--out", str(tmp_path / "exported")]
    assert_ok(run(export))
    a = load_file(tmp_path / "z3" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, checkpointing", [("zero3", False), ("zero2", True)])
def test_bf16_two_ranks(tiny_policy, tmp_path, stage, checkpointing):
    config = lora_config(tmp_path, tiny_policy, stage, model={"dtype": "bfloat16", "gradient_checkpointing": checkpointing},
                         deepspeed={"config": f"ds_configs/{stage}.json"}, data={"eval_files": []})
    assert_ok(run(torchrun_launch("train.py", config)))
    check_starts_at_ln2_and_learns(tmp_path / stage, 1e-4)
    adapter = load_file(tmp_path / stage / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # lora_B moved off zero


def test_fused_projections_under_zero3_train_like_peft(tiny_policy, tmp_path):
    """lora.fused under ZeRO-3 with whole-layer gathering (the default): the fused projections read weights the
    layer's hook gathered, and their gradients reach ZeRO-3's per-layer reduction. 2 ranks, fp32: every step's
    loss and gradient norm equal PEFT's own modules' run."""
    metrics = {}
    for fused in (False, True):
        name = f"fused_{fused}".lower()
        config = write_config(tmp_path / f"{name}.yaml", tiny_policy, None, tmp_path / name,
                              lora={"r": 8, "alpha": 16, "fused": fused}, training={"max_steps": 4, "learning_rate": 1e-2},
                              data={"eval_files": []}, deepspeed={"config": "ds_configs/zero3.json"})
        result = run(torchrun_launch("train.py", config))
        assert_ok(result)
        assert ("lora.fused: 14 LoRA projections run as one autograd function each" in result.stdout + result.stderr) == fused
        train, _ = read_metrics(tmp_path / name)
        metrics[fused] = [(train[step]["loss"], train[step]["grad_norm"]) for step in sorted(train)]
    assert len(metrics[True]) == 4 and metrics[True][0][1] > 0
    for (loss, norm), (fused_loss, fused_norm) in zip(metrics[False], metrics[True]):
        assert fused_loss == pytest.approx(loss, abs=1e-6) and fused_norm == pytest.approx(norm, rel=1e-5)
    assert metrics[True][-1][0] != metrics[True][0][0]  # it trained


def test_every_target_module_must_name_a_module(tiny_policy):
    """PEFT trains a list whose other names match without a misspelt one's adapter (v_projj: silently no adapter on
    v_proj); refused, naming it. Names PEFT matches stay accepted: by path, and on Qwen3-MoE's fused experts (in
    transformers 5 parameters, not modules) the projections' names."""
    from transformers import Qwen3MoeConfig

    from dpo_dist.config import LoRAConfig, ModelConfig
    from dpo_dist.errors import UserError
    from dpo_dist.models import prepare_policy

    def prepare(model, targets):
        return prepare_policy(model, ModelConfig(base_model="x"), LoRAConfig(r=2, target_modules=targets))

    with pytest.raises(UserError, match=r"lora.target_modules: v_projj name no module of this model \(names, or their "
                                        r"ends after a dot; not regular expressions\); its linear and embedding modules "
                                        r"are down_proj, embed_tokens, gate_proj, k_proj, lm_head"):
        prepare(AutoModelForCausalLM.from_pretrained(tiny_policy), ["q_proj", "v_projj"])
    policy = prepare(AutoModelForCausalLM.from_pretrained(tiny_policy), ["layers.0.self_attn.q_proj", "lm_head"])
    assert sum(param.requires_grad for param in policy.parameters()) == 4  # A and B of each
    moe = Qwen3MoeConfig(vocab_size=500, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    policy = prepare(AutoModelForCausalLM.from_config(moe), ["q_proj", "gate_proj", "up_proj", "down_proj"])
    assert any("experts" in name for name, param in policy.named_parameters() if param.requires_grad)
