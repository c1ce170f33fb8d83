"""The Qwen families beside Qwen3, on tiny random checkpoints made by examples/make_tiny_qwen3.py --family:
- Qwen2.5 (transformers' Qwen2ForCausalLM): q/k/v projections with biases, no q/k norms, untied output
  embedding (as Qwen2.5-7B and larger), no head_dim in config.json;
- Qwen3-MoE (Qwen3MoeForCausalLM, as Qwen3-30B-A3B): every layer's MLP is routed experts (3-d weights, a
  router; transformers 4 holds them as one MLP per expert), and the decoder builds one attention mask for all
  layers (no layer_types).
The paths that touch the model's modules give the numbers an independent computation gives, as
tests/test_logps.py, test_lora_ops.py, test_lean_ops.py and test_multirank.py check them for Qwen3; the
planner's counts for these families are in tests/test_planner.py."""

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MIXED_RECORDS
from dpo_dist.config import LoRAConfig, ModelConfig
from dpo_dist.data import collate, collate_packed, collate_shared_prefix
from dpo_dist.tokenization import TokenizeStats, tokenize_record
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.lora_ops import _fused_form
from dpo_dist.models import load_causal_lm, prepare_policy
from launching import assert_ok, held_by_rank_0, python_launch, read_metrics, run, run_here, torchrun_launch, write_config
from make_tiny_qwen3 import make_checkpoint
from test_logps import make_record, naive_completion_logps

STEPS = 6
# transformers 5 holds a MoE layer's 8 experts as 3-d weights (gate_up, down), transformers 4 as 8 MLPs of 3 Linears
FUSED_EXPERTS = int(transformers.__version__.split(".")[0]) >= 5
# Per family: the class of its causal LM, parameters only it has (their gradients are checked, and training
# must move them), and the LoRA layers lora.fused makes (7 projections; a MoE layer's 4 attention ones, where PEFT
# adapts the experts' 3-d weights itself, or those and its experts' 8 x 3 Linears) and the adapter tensors, A and B
# (2 layers).
CAUSAL_LM = {"qwen2.5": "Qwen2ForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM"}
EXPERT_PARAMETERS = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
if not FUSED_EXPERTS:
    EXPERT_PARAMETERS = ["model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight"]
OWN_PARAMETERS = {"qwen2.5": ["model.layers.0.self_attn.q_proj.bias", "lm_head.weight"],
                  "qwen3-moe": [*EXPERT_PARAMETERS, "model.layers.0.mlp.gate.weight", "lm_head.weight"]}
MOE_LORA_LAYERS = 4 if FUSED_EXPERTS else 4 + 8 * 3
FUSED_LAYERS = {"qwen2.5": 2 * 7, "qwen3-moe": 2 * MOE_LORA_LAYERS}
# MoE under transformers 5: gate_up and down, one adapter each beside the fused attention's
ADAPTER_TENSORS = {"qwen2.5": 2 * 7 * 2, "qwen3-moe": 2 * (MOE_LORA_LAYERS + 2 * FUSED_EXPERTS) * 2}


@pytest.fixture(scope="module", params=sorted(CAUSAL_LM))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def policy_dir(family, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(family) / "policy", seed=0, family=family)


@pytest.fixture(scope="module")
def reference_dir(family, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(family) / "reference", seed=1, family=family)


@pytest.fixture(scope="module")
def examples(policy_dir):
    """Chat and plain pairs of different lengths (padding), one truncated, one whose completions share their
    first tokens (prefix sharing shares past the prompt). A Qwen2 config.json makes transformers load the
    tokenizer as Qwen2Tokenizer, whose pre-tokenizer (Qwen's) splits numbers into digits, so the length limit
    is set from the sequences: 5 tokens short of the longest, which only the long rejected side reaches."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    records = [make_record(raw) for raw in MIXED_RECORDS]
    whole = [tokenize_record(r, tokenizer, 100_000, "keep_start", TokenizeStats()) for r in records]
    max_length = max(len(e.rejected_ids) for e in whole) - 5
    stats = TokenizeStats()
    examples = [tokenize_record(r, tokenizer, max_length, "keep_start", stats) for r in records]
    assert stats.truncated == 1
    return examples


def test_the_checkpoints_are_shaped_as_their_family(family, policy_dir):
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    layer = model.model.layers[0]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    if family == "qwen2.5":
        assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.model_type == "qwen2"
        assert all(getattr(layer.self_attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
        assert layer.self_attn.o_proj.bias is None and not hasattr(layer.self_attn, "q_norm")
        # transformers 5 picks the model type's class for the generic tokenizer the script saves; 4 keeps the generic
        tokenizer_class = "Qwen2Tokenizer" if FUSED_EXPERTS else "PreTrainedTokenizerFast"
        assert type(AutoTokenizer.from_pretrained(policy_dir)).__name__ == tokenizer_class
    else:
        assert type(model).__name__ == "Qwen3MoeForCausalLM" and not getattr(model.config, "layer_types", None)
        assert layer.mlp.gate.weight.shape == (8, 64)
        if FUSED_EXPERTS:
            assert layer.mlp.experts.gate_up_proj.shape == (8, 64, 64)
        else:
            assert len(layer.mlp.experts) == 8 and layer.mlp.experts[0].gate_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix-shared"])
def test_log_probs_and_gradients_equal_a_full_log_softmax(family, policy_dir, examples, layout):
    """Chunked log-probs (5 tokens a chunk) in each batch layout against plain PyTorch on padded rows (full
    logits, full log-softmax); every gradient, the family's own parameters among them (biases, experts,
    router). Prefix-shared on Qwen3-MoE: the shared attention reaches every layer through its one mask."""
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    build = {"padded": collate, "packed": collate_packed, "prefix-shared": collate_shared_prefix}[layout]
    batch, padded = build(examples, 0), collate(examples, 0)
    pair = forward_pair(SequenceLogps(model, 5), batch)
    (pair.chosen_logps.sum() - 0.5 * pair.rejected_logps.sum()).backward()
    got_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    naive = naive_completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
    half = padded.num_pairs
    (naive[:half].sum() - 0.5 * naive[half:].sum()).backward()
    torch.testing.assert_close(torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), naive.detach(), atol=1e-5, rtol=1e-6)
    assert set(OWN_PARAMETERS[family]) <= got_grads.keys()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_lora_with_lean_recomputed_layers_equals_plain_peft(family, policy_dir, examples):
    """lora.fused (Qwen2.5: the q/k/v projections' biases in the fused function; Qwen3-MoE: the attention's,
    beside PEFT's own adapters on the experts), model.lean_activations and model.recompute_elementwise together
    against PEFT's adapters on the plain model: the same log-probs and adapter gradients, to fp32 rounding."""
    batch = collate(examples, 0)
    results = []
    for fast in (False, True):
        model_config = ModelConfig(base_model=str(policy_dir), lean_activations=fast, recompute_elementwise=fast)
        model = load_causal_lm(str(policy_dir), model_config, torch.float32, None)
        torch.manual_seed(0)  # the same adapter initialisation in both
        policy = prepare_policy(model, model_config, LoRAConfig(r=4, fused=fast)).train()
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter matter
                torch.nn.init.normal_(param, std=0.05)
        fused_layers = [m for m in policy.modules() if hasattr(m, "_peft_forward")]
        assert len(fused_layers) == (FUSED_LAYERS[family] if fast else 0)
        assert all(_fused_form(layer, {}) is not None for layer in fused_layers)  # biased q/k/v too: fused, no fallback
        pair = forward_pair(SequenceLogps(policy, 7, recompute_elementwise=fast), batch)
        (pair.chosen_logps - 0.5 * pair.rejected_logps).sum().backward()
        grads = {name: param.grad for name, param in policy.named_parameters() if param.requires_grad}
        results.append((torch.cat([pair.chosen_logps, pair.rejected_logps]).detach(), grads))
    (plain_logps, plain_grads), (fast_logps, fast_grads) = results
    torch.testing.assert_close(fast_logps, plain_logps, atol=1e-4, rtol=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) == ADAPTER_TENSORS[family]
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.multirank
def test_zero3_on_two_ranks_trains_like_one_process(family, policy_dir, reference_dir, tmp_path):
    """Full-parameter DPO against a separate reference of the family: one process under ZeRO-2 (8 pairs a
    step), and two torchrun ranks under ZeRO-3 (4 pairs each; policy and reference sharded, whole-layer
    gathering, prefix sharing, lean activations with the elementwise recompute). Same losses (the first to
    1e-6, later ones to 1e-4: all-reduce order); the 2-rank export is the family's causal LM, and its own
    parameters (biases; experts and router) trained. MoE ranks route their tokens to different experts: a
    layer's experts are one module that every rank runs, so no rank waits on a gather the other never starts,
    with whole-layer or per-submodule gathering (the same losses)."""
    single = write_config(tmp_path / "one.yaml", policy_dir, reference_dir, tmp_path / "one",
                          training={"batch_size": 8, "max_steps": STEPS})
    run_here("train.py", single)
    sharded = write_config(tmp_path / "two.yaml", policy_dir, reference_dir, tmp_path / "two",
                           training={"max_steps": STEPS}, deepspeed={"config": "ds_configs/zero3.json"},
                           data={"prefix_sharing": True}, model={"lean_activations": True, "recompute_elementwise": True})
    result = run(torchrun_launch("train.py", sharded))
    assert_ok(result)
    for name in ("policy", "reference"):  # ZeRO-3 really shards: rank 0 holds part of each
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name}: rank 0 holds"))
        local, total = held_by_rank_0(line)
        assert local < 0.75 * total, line
    # the policy trains every parameter, all of them counted under ZeRO-3 too (not the rank's shard)
    assert f"policy: trains every parameter (no lora: section): {total:,} trainable elements" in result.stdout
    (one, _), (two, two_evals) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert two[1]["loss"] != pytest.approx(0.693147, abs=1e-3)  # the reference really differs
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], abs=1e-6)
    for step in range(2, STEPS + 1):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4), step
    assert two_evals[-1]["eval_loss"] < two_evals[0]["eval_loss"]
    if family == "qwen3-moe":  # per-submodule gathering: the experts are one module that runs on every rank too
        per_module = run(torchrun_launch("train.py", sharded, "deepspeed.zero3_whole_layers=false",
                                         f"training.output_dir={tmp_path / 'per-module'}"))
        assert_ok(per_module)
        for step, metrics in read_metrics(tmp_path / "per-module")[0].items():
            assert metrics["loss"] == pytest.approx(two[step]["loss"], abs=1e-6), step
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert type(exported).__name__ == CAUSAL_LM[family]
    # written as the checkpoint came (Qwen3-MoE: one tensor per expert and projection, as on the hub, though
    # transformers holds each layer's experts fused), so other tools load it too
    assert load_file(tmp_path / "two" / "final" / "model.safetensors").keys() == load_file(policy_dir / "model.safetensors").keys()
    start, trained = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict(), exported.state_dict()
    for name in OWN_PARAMETERS[family]:
        assert not torch.allclose(trained[name], start[name], atol=1e-6), name


def test_moe_load_balancing_loss_joins_the_loss_as_trl_adds_it(tiny_policy, tmp_path):
    """dpo.router_aux_loss_coef c: each step's loss is the DPO loss + c x aux_loss (TRL's metric name; step 1,
    same weights: to fp32 rounding), and the routers train differently. Unset, TRL's rule: on when the model's
    config.json sets output_router_logits, with its router_aux_loss_coef. On a dense model: one line, exit 2."""
    plain_dir = make_checkpoint(tmp_path / "moe", seed=0, family="qwen3-moe")
    flagged_dir = make_checkpoint(tmp_path / "moe-flagged", seed=0, family="qwen3-moe", output_router_logits=True,
                                  router_aux_loss_coef=0.05)
    runs = {}
    for name, model_dir, overrides in (("off", plain_dir, ["dpo.router_aux_loss_coef=0"]),
                                        ("on", plain_dir, ["dpo.router_aux_loss_coef=0.05"]),
                                        ("from-config", flagged_dir, [])):
        config = write_config(tmp_path / f"{name}.yaml", model_dir, None, tmp_path / name, training={"max_steps": 2})
        run_here("train.py", config, *overrides)
        runs[name] = read_metrics(tmp_path / name)[0]
    off, on, from_config = runs["off"], runs["on"], runs["from-config"]
    assert "aux_loss" not in off[1] and on[1]["aux_loss"] > 1.0  # top-2 of 8: 2.0 when balanced, more when not
    assert on[1]["loss"] == pytest.approx(off[1]["loss"] + 0.05 * on[1]["aux_loss"], abs=1e-6)
    for step in (1, 2):
        assert from_config[step]["loss"] == pytest.approx(on[step]["loss"], abs=1e-6)
        assert from_config[step]["aux_loss"] == pytest.approx(on[step]["aux_loss"], abs=1e-6)
    router = "model.layers.0.mlp.gate.weight"
    off_router = AutoModelForCausalLM.from_pretrained(tmp_path / "off" / "final").state_dict()[router]
    on_router = AutoModelForCausalLM.from_pretrained(tmp_path / "on" / "final").state_dict()[router]
    assert not torch.allclose(off_router, on_router, atol=1e-7)

    dense = write_config(tmp_path / "dense.yaml", tiny_policy, None, tmp_path / "dense")
    result = run(python_launch("train.py", dense, "dpo.router_aux_loss_coef=0.1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "dpo.router_aux_loss_coef=0.1" in result.stderr and "not a mixture-of-experts model" in result.stderr
