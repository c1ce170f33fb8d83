"""model.lean_activations: the same forward bit for bit, the same gradients, less saved for backward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_dist.lean_ops import RMSNormFunction, SiluMulFunction, apply_lean_activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_against_autograd_of_the_plain_formulas(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64, dtype=dtype)

    def plain_norm(x, weight):  # transformers' Qwen3RMSNorm.forward, written out
        x32 = x.to(torch.float32)
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    expected = plain_norm(x, weight)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad)
    got = RMSNormFunction.apply(x, weight, 1e-6)
    got_grads = torch.autograd.grad(got, (x, weight), grad)
    assert torch.equal(got, expected)  # the forward is the same computation
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for name, a, b in zip(("x", "weight"), got_grads, expected_grads):
        torch.testing.assert_close(a, b, msg=name, **tolerance)

    gate, up = torch.randn(4, 96, dtype=dtype, requires_grad=True), torch.randn(4, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 96, dtype=dtype)
    expected = torch.nn.functional.silu(gate) * up
    expected_grads = torch.autograd.grad(expected, (gate, up), grad)
    got = SiluMulFunction.apply(gate, up)
    assert torch.equal(got, expected)
    for a, b in zip(torch.autograd.grad(got, (gate, up), grad), expected_grads):
        assert torch.equal(a, b)  # autograd's own kernels, the same order


def test_lean_model_scores_and_backpropagates_like_the_plain_one(tiny_policy):
    """Every RMSNorm (4 per layer + the final one) and MLP is swapped; outputs are identical, gradients equal."""
    from test_logps import naive_completion_logps
    from conftest import CHAT_RECORD, PLAIN_RECORD
    from test_logps import make_record
    from dpo_dist.data import collate
    from dpo_dist.tokenization import TokenizeStats, tokenize_record
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    stats = TokenizeStats()
    batch = collate([tokenize_record(make_record(r), tokenizer, 64, "keep_start", stats) for r in (CHAT_RECORD, PLAIN_RECORD)],
                    tokenizer.pad_token_id)
    plain = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    lean = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    layers = plain.config.num_hidden_layers
    assert apply_lean_activations(lean) == 5 * layers + 1
    outputs = []
    for model in (plain, lean):
        logps = naive_completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        (logps * torch.tensor([1.0, 0.5, -1.0, 2.0])).sum().backward()
        outputs.append(logps.detach())
    assert torch.equal(outputs[0], outputs[1])
    for (name, a), b in zip(lean.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_liger_kernels_refused_with_compile_and_off_a_gpu(tiny_policy):
    """Liger's Triton kernels need CUDA (one clear error here), and compiled layers would be split by them; the
    compiler also picks its own recomputation, so recompute_elementwise is refused with it too."""
    from dpo_dist.config import ModelConfig
    from dpo_dist.errors import UserError
    from dpo_dist.models import load_causal_lm

    with pytest.raises(UserError, match="model.liger_kernels=true with model.compile=true"):
        ModelConfig(base_model=str(tiny_policy), liger_kernels=True, compile=True)
    with pytest.raises(UserError, match="model.recompute_elementwise=true with model.compile=true"):
        ModelConfig(base_model=str(tiny_policy), recompute_elementwise=True, compile=True)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU refusal does not apply")
    config = ModelConfig(base_model=str(tiny_policy), liger_kernels=True)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_causal_lm(str(tiny_policy), config, torch.float32, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel runs on CUDA only")
@pytest.mark.parametrize("family", ["qwen3", "qwen2.5", "qwen3-moe"])
def test_liger_model_scores_and_backpropagates_like_the_plain_one(tiny_policy, tmp_path, family):
    """On a GPU: with Liger's norm, SiLU gate and rotary kernels, fp32 log-probs and gradients match the plain
    model's, for each Qwen family (the rotary kernel replaces its transformers module's function)."""
    pytest.importorskip("liger_kernel")
    import sys

    from dpo_dist.config import ModelConfig
    from dpo_dist.models import load_causal_lm
    from make_tiny_qwen3 import make_checkpoint
    from test_logps import naive_completion_logps

    model_dir = tiny_policy if family == "qwen3" else make_checkpoint(tmp_path / family, seed=0, family=family)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    modeling = sys.modules[type(plain).__module__]
    rotary = modeling.apply_rotary_pos_emb
    try:
        liger = load_causal_lm(str(model_dir), ModelConfig(base_model=str(model_dir), liger_kernels=True),
                               torch.float32, None).cuda()
        assert modeling.apply_rotary_pos_emb is not rotary
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, plain.config.vocab_size, (4, 48), generator=generator).cuda()
        attention_mask = torch.ones_like(input_ids)
        completion_mask = torch.zeros_like(input_ids)
        completion_mask[:, 20:] = 1
        outputs = []
        for model in (liger, plain):
            if model is plain:  # transformers' own rotary embedding for the plain model
                modeling.apply_rotary_pos_emb = rotary
            logps = naive_completion_logps(model, input_ids, attention_mask, completion_mask)
            (logps * torch.tensor([1.0, 0.5, -1.0, 2.0], device="cuda")).sum().backward()
            outputs.append(logps.detach())
    finally:
        modeling.apply_rotary_pos_emb = rotary
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-5)
    for (name, a), b in zip(liger.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_recompute_elementwise_gives_the_same_gradients(tiny_policy, lora):
    """model.recompute_elementwise: the norms' outputs and SiLU(gate) x up are rebuilt in backward instead of kept
    (tests/test_planner.py measures what is kept); log-probs and every gradient are the same, bit for bit."""
    from dpo_dist.config import LoRAConfig, ModelConfig
    from dpo_dist.data import PreferenceExample, collate
    from dpo_dist.logps import SequenceLogps, forward_pair
    from dpo_dist.models import prepare_policy

    ids = list(range(3, 40))
    pairs = [PreferenceExample("a", ids, 20, ids[:10] + [50 + i for i in range(20)], 10),
             PreferenceExample("b", ids[:25], 15, ids[:25][::-1], 1)]
    batch = collate(pairs, 0)
    results = []
    for recompute in (False, True):
        model_config = ModelConfig(base_model=str(tiny_policy), recompute_elementwise=recompute, lean_activations=True)
        model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
        apply_lean_activations(model)
        torch.manual_seed(0)  # the same adapter initialisation in both
        policy = prepare_policy(model, model_config, LoRAConfig(r=4) if lora else None).train()
        if lora:  # PEFT starts B at zero; make the adapter matter
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
        pair = forward_pair(SequenceLogps(policy, 7, recompute_elementwise=recompute), batch)
        (pair.chosen_logps - 0.5 * pair.rejected_logps).sum().backward()
        grads = {name: param.grad for name, param in policy.named_parameters() if param.requires_grad}
        results.append((torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), grads))
    (plain_logps, plain_grads), (recomputed_logps, recomputed_grads) = results
    assert torch.equal(plain_logps, recomputed_logps)
    assert plain_grads.keys() == recomputed_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert torch.equal(grad, recomputed_grads[name]), name
