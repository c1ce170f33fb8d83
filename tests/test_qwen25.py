"""Qwen2.5 (transformers' Qwen2ForCausalLM): q/k/v projections with biases, no q/k norms, untied output
embedding (as Qwen2.5-7B and larger), no head_dim in config.json. The paths that touch the model's modules
give the numbers an independent computation gives, as tests/test_logps.py, test_lora_ops.py,
test_lean_ops.py and test_multirank.py check them for Qwen3; the planner's counts for this family are in
tests/test_planner.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MIXED_RECORDS
from dpo_dist.config import LoRAConfig, ModelConfig
from dpo_dist.data import TokenizeStats, collate, collate_packed, collate_shared_prefix, tokenize_record
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.lora_ops import _fused_form
from dpo_dist.models import load_causal_lm, prepare_policy
from launching import assert_ok, read_metrics, run, python_launch, torchrun_launch, write_config
from make_tiny_qwen3 import make_checkpoint
from test_logps import make_record, naive_completion_logps

STEPS = 6


@pytest.fixture(scope="module")
def qwen25_policy(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen25") / "policy", seed=0, family="qwen2.5")


@pytest.fixture(scope="module")
def qwen25_reference(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen25") / "reference", seed=1, family="qwen2.5")


@pytest.fixture(scope="module")
def examples(qwen25_policy):
    """Chat and plain pairs of different lengths (padding), one truncated, one whose completions share their
    first tokens (prefix sharing shares past the prompt). A Qwen2 config.json makes transformers load the
    tokenizer as Qwen2Tokenizer, whose pre-tokenizer (Qwen's) splits numbers into digits: longer sequences than
    the Qwen3 tests' from the same tokenizer files, so 96 tokens here where they truncate at 64."""
    tokenizer = AutoTokenizer.from_pretrained(qwen25_policy)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    records = [make_record(raw) for raw in MIXED_RECORDS]
    stats = TokenizeStats()
    examples = [tokenize_record(r, tokenizer, 96, "keep_start", stats) for r in records]
    assert stats.truncated == 1
    return examples


def test_the_checkpoint_is_shaped_as_qwen25(qwen25_policy):
    model = AutoModelForCausalLM.from_pretrained(qwen25_policy)
    attention = model.model.layers[0].self_attn
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.model_type == "qwen2"
    assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None and not hasattr(attention, "q_norm")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix-shared"])
def test_log_probs_and_gradients_equal_a_full_log_softmax(qwen25_policy, examples, layout):
    """Chunked log-probs (5 tokens a chunk) in each batch layout against plain PyTorch on padded rows (full
    logits, full log-softmax); every gradient, the biases and the separate lm_head among them."""
    model = AutoModelForCausalLM.from_pretrained(qwen25_policy, dtype=torch.float32)
    build = {"padded": collate, "packed": collate_packed, "prefix-shared": collate_shared_prefix}[layout]
    batch, padded = build(examples, 0), collate(examples, 0)
    pair = forward_pair(SequenceLogps(model, 5), batch)
    (pair.chosen_logps.sum() - 0.5 * pair.rejected_logps.sum()).backward()
    got_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    naive = naive_completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
    half = padded.num_pairs
    (naive[:half].sum() - 0.5 * naive[half:].sum()).backward()
    torch.testing.assert_close(torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), naive.detach(), atol=1e-5, rtol=0)
    assert {"model.layers.0.self_attn.q_proj.bias", "lm_head.weight"} <= got_grads.keys()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_lora_on_biased_projections_with_lean_recomputed_layers_equals_plain_peft(qwen25_policy, examples):
    """lora.fused (the q/k/v projections' biases in the fused function), model.lean_activations and
    model.recompute_elementwise together against PEFT's adapters on the plain model: the same log-probs and
    adapter gradients, to fp32 rounding."""
    batch = collate(examples, 0)
    results = []
    for fast in (False, True):
        model_config = ModelConfig(base_model=str(qwen25_policy), lean_activations=fast, recompute_elementwise=fast)
        model = load_causal_lm(str(qwen25_policy), model_config, torch.float32, None)
        torch.manual_seed(0)  # the same adapter initialisation in both
        policy = prepare_policy(model, model_config, LoRAConfig(r=4, fused=fast)).train()
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
                torch.nn.init.normal_(param, std=0.05)
        fused_layers = [m for m in policy.modules() if hasattr(m, "_peft_forward")]
        assert len(fused_layers) == (14 if fast else 0)  # 7 projections x 2 layers
        assert all(_fused_form(layer, {}) is not None for layer in fused_layers)  # biased q/k/v too: fused, no fallback
        pair = forward_pair(SequenceLogps(policy, 7, recompute_elementwise=fast), batch)
        (pair.chosen_logps - 0.5 * pair.rejected_logps).sum().backward()
        grads = {name: param.grad for name, param in policy.named_parameters() if param.requires_grad}
        results.append((torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), grads))
    (plain_logps, plain_grads), (fast_logps, fast_grads) = results
    torch.testing.assert_close(fast_logps, plain_logps, atol=1e-4, rtol=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.multirank
def test_zero3_on_two_ranks_trains_like_one_process(qwen25_policy, qwen25_reference, tmp_path):
    """Full-parameter DPO against a separate Qwen2.5 reference: one process under ZeRO-2 (8 pairs a step),
    and two torchrun ranks under ZeRO-3 (4 pairs each; policy and reference sharded, whole-layer gathering,
    prefix sharing, lean activations with the elementwise recompute). Same losses (the first to 1e-6, later
    ones to 1e-4: all-reduce order), and the 2-rank export is a Qwen2ForCausalLM whose biases trained."""
    single = write_config(tmp_path / "one.yaml", qwen25_policy, qwen25_reference, tmp_path / "one",
                          training={"batch_size": 8, "max_steps": STEPS})
    assert_ok(run(python_launch("train.py", single)))
    sharded = write_config(tmp_path / "two.yaml", qwen25_policy, qwen25_reference, tmp_path / "two",
                           training={"max_steps": STEPS}, deepspeed={"config": "ds_configs/zero3.json"},
                           data={"prefix_sharing": True}, model={"lean_activations": True, "recompute_elementwise": True})
    result = run(torchrun_launch("train.py", sharded))
    assert_ok(result)
    for name in ("policy", "reference"):  # ZeRO-3 really shards: rank 0 holds part of each
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name}: rank 0 holds"))
        local, total = (int(x.replace(",", "")) for x in line.split("holds ")[1].split(" parameter")[0].split(" of "))
        assert local < 0.75 * total, line
    (one, _), (two, two_evals) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert two[1]["loss"] != pytest.approx(0.693147, abs=1e-3)  # the reference really differs
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-6)
    for step in range(2, STEPS + 1):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4), step
    assert two_evals[-1]["eval_loss"] < two_evals[0]["eval_loss"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    start = load_file(qwen25_policy / "model.safetensors")
    trained = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.bias", "lm_head.weight"):
        assert not torch.allclose(trained[name], start[name], atol=1e-6), name
