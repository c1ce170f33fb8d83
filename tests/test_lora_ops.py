"""LoRA's hot path: lora.fused (one autograd function per adapted projection, the same numbers as PEFT's three
module calls) and the adapter reference's switch (the same numbers as PEFT's disable_adapter())."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_dist.config import LoRAConfig, ModelConfig, load_config
from dpo_dist.data import PreferenceExample, collate
from dpo_dist.engine import training_ds_config
from dpo_dist.errors import UserError
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.lora_ops import LoRALinearFunction, _fused_form
from dpo_dist.models import prepare_policy
from dpo_dist.reference import AdapterSwitch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_against_autograd_of_the_plain_formula(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    weight, bias = torch.randn(40, 24, dtype=dtype), torch.randn(40, dtype=dtype)
    lora_a = torch.randn(4, 24, dtype=dtype, requires_grad=True)
    lora_b = torch.randn(40, 4, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 5, 40, dtype=dtype)
    expected = torch.nn.functional.linear(x, weight, bias) + (x @ lora_a.t()) @ lora_b.t() * 0.5
    expected_grads = torch.autograd.grad(expected, (x, lora_a, lora_b), grad)
    got = LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, 0.5)
    got_grads = torch.autograd.grad(got, (x, lora_a, lora_b), grad)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    torch.testing.assert_close(got, expected, **tolerance)
    for name, a, b in zip(("x", "A", "B"), got_grads, expected_grads):
        torch.testing.assert_close(a, b, msg=name, **tolerance)


def test_fused_policy_trains_like_peft_and_falls_back_where_it_must(tiny_policy):
    """Log-probs and every adapter gradient equal PEFT's (fp32, to rounding); with the adapter disabled (the
    adapter reference) the fused layers run PEFT's own forward and score like the base model."""
    ids = list(range(3, 40))
    batch = collate([PreferenceExample("a", ids, 20, ids[:10] + [50 + i for i in range(20)], 10),
                     PreferenceExample("b", ids[:25], 15, ids[:25][::-1], 1)], 0)
    results = []
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
        torch.manual_seed(0)
        policy = prepare_policy(model, ModelConfig(base_model="x"), LoRAConfig(r=4, fused=fused)).train()
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
                torch.nn.init.normal_(param, std=0.05)
        layers = [m for m in policy.modules() if hasattr(m, "_peft_forward")]
        assert len(layers) == (14 if fused else 0)
        assert all(_fused_form(layer, {}) is not None for layer in layers)  # the fused form, not the fallback
        scorer = SequenceLogps(policy, 7)
        pair = forward_pair(scorer, batch)
        (pair.chosen_logps - 0.5 * pair.rejected_logps).sum().backward()
        with torch.no_grad(), AdapterSwitch(policy).off():
            reference = forward_pair(scorer, batch).chosen_logps
        grads = {name: param.grad for name, param in policy.named_parameters() if param.requires_grad}
        results.append((torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), grads, reference))
    (peft_logps, peft_grads, peft_reference), (fused_logps, fused_grads, fused_reference) = results
    torch.testing.assert_close(fused_logps, peft_logps, atol=1e-4, rtol=1e-6)
    assert not torch.allclose(peft_logps[:2], peft_reference, atol=1e-3)  # the adapter changes the scores
    assert torch.equal(fused_reference, peft_reference)  # disabled adapter: PEFT's own forward, the base model
    assert peft_grads.keys() == fused_grads.keys() and len(peft_grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_lora_refusals(tiny_policy, tmp_path):
    with pytest.raises(UserError, match="lora.fused=true with lora.dropout=0.05"):
        LoRAConfig(fused=True, dropout=0.05)
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{base_model: {tiny_policy}}}\nlora: {{r: 4, fused: true}}\n"
                    "deepspeed: {config: ds_configs/zero3.json, zero3_whole_layers: false}\n")
    with pytest.raises(UserError, match="lora.fused=true with ZeRO-3 .* and deepspeed.zero3_whole_layers=false"):
        training_ds_config(load_config(path), world_size=1)
    training_ds_config(load_config(path, ["deepspeed.zero3_whole_layers=true"]), world_size=1)  # accepted (the default)
    training_ds_config(load_config(path, ["deepspeed.config=ds_configs/zero2.json"]), world_size=1)  # accepted


def test_adapter_switch_scores_like_peft_disable_adapter_and_restores(tiny_policy):
    """AdapterSwitch.off() sets only the flag the LoRA layers' forward reads: the same log-probs as PEFT's
    disable_adapter() (the base model's), the adapter back on after it, requires_grad untouched; refused with
    grad on (it does not freeze the adapters); models with modules_to_save keep PEFT's own context manager."""
    ids = list(range(3, 40))
    batch = collate([PreferenceExample("a", ids, 20, ids[:10] + [50 + i for i in range(20)], 10)], 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    with torch.no_grad():
        base = forward_pair(SequenceLogps(model, 7), batch).chosen_logps
    policy = prepare_policy(model, ModelConfig(base_model="x"), LoRAConfig(r=4)).eval()
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    scorer, switch = SequenceLogps(policy, 7), AdapterSwitch(policy)
    assert len(switch.layers) == 14  # 7 projections x 2 layers
    with torch.no_grad():
        adapted = forward_pair(scorer, batch).chosen_logps
        with switch.off():
            off = forward_pair(scorer, batch).chosen_logps
            assert all(layer.disable_adapters for layer in switch.layers)
        after = forward_pair(scorer, batch).chosen_logps
        with policy.disable_adapter():
            peft_off = forward_pair(scorer, batch).chosen_logps
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(off, peft_off) and torch.equal(off, base)
    assert torch.equal(after, adapted)
    assert all(param.requires_grad for name, param in policy.named_parameters() if "lora_" in name)
    with pytest.raises(RuntimeError, match="under no_grad"), switch.off():
        pass

    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32),
                           PeftLoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert AdapterSwitch(saved).layers is None  # PEFT's disable_adapter(), which also swaps the saved modules
