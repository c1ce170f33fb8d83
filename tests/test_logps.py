"""Chunked completion log-probs against a naive full-vocabulary log-softmax of the same model."""


import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CHAT_RECORD, PLAIN_RECORD
from dpo_dist.data import PairBatch, collate
from dpo_dist.tokenization import TokenizeStats, tokenize_record
from dpo_dist.logps import SequenceLogps, forward_pair
from dpo_dist.records import Record, record_uid, validate


def make_record(raw, location="test:1"):
    normalised, reason = validate(raw)
    assert reason is None, reason
    return Record(uid=record_uid(**normalised), location=location, **normalised)


def host_reads(prof) -> list[str]:
    """The profiled ops that make the host wait for a GPU: a scalar read, or a selection whose size only the
    device knows. Counted on CPU, where they run all the same."""
    return [event.name for event in prof.events() if event.name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")]


def naive_completion_logps(model, input_ids, attention_mask, completion_mask):
    """Plain PyTorch: full logits, full log_softmax, gather, sum over completion targets."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (2B, T, V)
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    token_logps = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def assert_gradients_match_naive(model, batch) -> None:
    """The model's gradients (of chosen's log-probs minus half of rejected's, just computed) against the naive
    graph's; leaves the gradients zeroed."""
    computed = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    naive = naive_completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    half = batch.num_pairs
    (naive[:half].sum() - 0.5 * naive[half:].sum()).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(computed[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


@pytest.fixture(scope="module")
def model(tiny_policy):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def examples(tokenizer):
    records = [
        make_record(CHAT_RECORD),  # multi-turn chat with a system message
        make_record(PLAIN_RECORD),
        make_record({"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2 " * 6}], "chosen": "1 2 3", "rejected": "3 2 1 " * 9}),
    ]
    stats = TokenizeStats()
    # max length 64 truncates only the long rejected side of the third pair (keep_start): padding AND truncation
    examples = [tokenize_record(r, tokenizer, 64, "keep_start", stats) for r in records]
    assert stats.truncated == 1
    return examples


@pytest.fixture(scope="module")
def batch(examples, tokenizer):
    return collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("compiled_head", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_matches_naive_full_softmax(model, batch, chunk_tokens, compiled_head):
    scorer = SequenceLogps(model, chunk_tokens=chunk_tokens, compiled_head=compiled_head)
    with torch.no_grad():
        pair = forward_pair(scorer, batch)
        expected = naive_completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    got = torch.cat([pair.chosen_logps, pair.rejected_logps])
    assert batch.attention_mask.min() == 0  # the batch really is padded
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    counts = torch.cat([pair.chosen_tokens, pair.rejected_tokens])
    assert torch.equal(counts, batch.completion_mask[:, 1:].sum(dim=1))


@pytest.mark.parametrize("compiled_head", [False, True])
@pytest.mark.parametrize("chunk_tokens", [3, 4096])
def test_wpo_log_weights_match_naive_full_softmax(model, batch, chunk_tokens, compiled_head):
    """WPO's per-sequence log weight: the mean over completion tokens of log p(token) - log sum_v p_v^2."""
    scorer = SequenceLogps(model, chunk_tokens=chunk_tokens, probability_weights=True, compiled_head=compiled_head)
    with torch.no_grad():
        pair = forward_pair(scorer, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
        probs = torch.softmax(logits, dim=-1)
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        aligned = token_logps - torch.log((probs * probs).sum(dim=-1))
        mask = batch.completion_mask[:, 1:].float()
        expected = (aligned * mask).sum(dim=1) / mask.sum(dim=1)
    torch.testing.assert_close(torch.cat([pair.chosen_log_weights, pair.rejected_log_weights]), expected, atol=1e-5, rtol=0)
    assert forward_pair(SequenceLogps(model, chunk_tokens), batch).chosen_log_weights is None  # off by default


def test_prompt_and_padding_tokens_are_never_counted(model, batch):
    """Only completion positions are scored: a row whose completion mask is cleared sums to exactly 0."""
    completion_mask = batch.completion_mask.clone()
    completion_mask[0] = 0
    masked = PairBatch(batch.input_ids, batch.attention_mask, completion_mask, batch.pair_weight, batch.uids)
    with torch.no_grad():
        pair = forward_pair(SequenceLogps(model, 5), masked)
    assert pair.chosen_logps[0].item() == 0.0 and pair.chosen_tokens[0].item() == 0
    # and the first scored token of each row is the first completion token, not a prompt token
    first = batch.completion_mask.argmax(dim=1)
    assert (first > 0).all()


@pytest.mark.parametrize("token_metrics, wpo", [(False, False), (True, False), (False, True), (True, True)])
def test_gradients_match_naive(model, batch, token_metrics, wpo, monkeypatch):
    """The checkpointed chunks recompute logits in backward; gradients equal the naive graph's. The token metrics
    and WPO's sum p^2 come after TargetLogProb in each chunk, so backward's recomputation stops before them: their
    dot products run once per chunk in forward and never in backward. The recomputation takes the plain normaliser
    (logsumexp) whatever the forward took: once per chunk in backward."""
    import dpo_dist.logps as logps_module

    calls, normalizers = [], []
    real_dot, real_normalizer = logps_module._rowwise_dot, logps_module._log_normalizer
    monkeypatch.setattr(logps_module, "_rowwise_dot", lambda a, b: calls.append(a.shape[0]) or real_dot(a, b))
    monkeypatch.setattr(logps_module, "_log_normalizer", lambda x: normalizers.append(x.shape[0]) or real_normalizer(x))
    scorer = SequenceLogps(model, chunk_tokens=5, probability_weights=wpo)
    model.zero_grad()
    pair = forward_pair(scorer, batch, token_metrics=token_metrics)
    scored = int(batch.completion_mask[:, 1:].sum())
    chunks = -(-scored // 5)
    dots_per_chunk = int(token_metrics) + int(wpo)
    assert len(calls) == dots_per_chunk * chunks and sum(calls) == dots_per_chunk * scored
    assert len(normalizers) == (0 if token_metrics or wpo else chunks)
    calls.clear()
    normalizers.clear()
    (pair.chosen_logps.sum() - 0.5 * pair.rejected_logps.sum()).backward()
    assert calls == [] and len(normalizers) == chunks and sum(normalizers) == scored
    assert_gradients_match_naive(model, batch)


@pytest.mark.parametrize("compiled_head", [False, True])
@pytest.mark.parametrize("chunk_tokens", [3, 4096])
def test_token_metrics_match_naive_full_softmax(model, batch, chunk_tokens, compiled_head):
    """TRL's per-token metrics, summed per sequence over completion tokens, against a float64 softmax over the full
    logits: the mean-over-vocab logit (logits/*), the entropy in nats (entropy) and whether the target is the argmax
    (mean_token_accuracy, chosen only)."""
    with torch.no_grad():
        pair = forward_pair(SequenceLogps(model, chunk_tokens, compiled_head=compiled_head), batch, token_metrics=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()[:, :-1]
    mask = batch.completion_mask[:, 1:].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    is_top1 = (logits.argmax(dim=-1) == batch.input_ids[:, 1:]).double()
    expected_logits = (logits.mean(dim=-1) * mask).sum(dim=1)
    expected_entropy = (entropy * mask).sum(dim=1)
    half = batch.num_pairs
    expected_top1 = (is_top1 * mask).sum(dim=1)[:half]
    got_logits = torch.cat([pair.chosen_logits_sum, pair.rejected_logits_sum]).double()
    got_entropy = torch.cat([pair.chosen_entropy_sum, pair.rejected_entropy_sum]).double()
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_entropy, expected_entropy, atol=1e-4, rtol=0)
    assert pair.chosen_top1_tokens.tolist() == expected_top1.tolist()
    # a reference's forward computes none of them
    with torch.no_grad():
        plain = forward_pair(SequenceLogps(model, chunk_tokens, compiled_head=compiled_head), batch)
    assert plain.chosen_logits_sum is None and plain.chosen_entropy_sum is None and plain.chosen_top1_tokens is None
    torch.testing.assert_close(plain.chosen_logps, pair.chosen_logps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("compiled_head", [False, True])
def test_token_stats_of_hand_made_logits(compiled_head):
    """`_chunk_token_stats` (and its compiled twin) on logits chosen by hand (an identity lm_head): the target is the
    argmax in row 0, not in row 1; rows 2 and 3 tie two maxima, and only the first of a tie counts (TRL's argmax
    rule). Entropy and log p against float64."""
    from dpo_dist import compiled_head as compiled_head_lib
    from dpo_dist.logps import _chunk_token_stats

    head = compiled_head_lib.chunk_token_stats if compiled_head else _chunk_token_stats
    logits = torch.tensor([[4.0, 1.0, 0.0, -2.0], [4.0, 1.0, 0.0, -2.0], [0.5, 3.0, 3.0, 1.0], [0.5, 3.0, 3.0, 1.0]])
    targets = torch.tensor([0, 1, 2, 1])
    identity = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4))
        logps, stats, log_sum_squares = head(identity, logits, targets, token_metrics=True, probability_weights=True)
    probs = torch.softmax(logits.double(), dim=-1)
    assert stats[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(stats[:, 0], logits.mean(dim=-1))
    torch.testing.assert_close(stats[:, 1].double(), -(probs * probs.log()).sum(dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(logps.double(), probs.log().gather(-1, targets[:, None]).squeeze(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_sum_squares.double(), (probs * probs).sum(dim=-1).log(), atol=1e-6, rtol=0)


def test_packed_equals_padded(model, tokenizer):
    """Packing (one row, position_ids restarting per sequence, no padding) gives the padded log-probs:
    attention stays inside each sequence, and a sequence's last token never scores the next one's first
    (here a keep_end pair whose prompt is cut away entirely, so its completion starts the sequence)."""
    from dpo_dist.data import collate_packed

    records = [make_record(CHAT_RECORD), make_record(PLAIN_RECORD), make_record(PLAIN_RECORD | {"chosen": " 2 7 7 7 7"})]
    stats = TokenizeStats()
    examples = [tokenize_record(r, tokenizer, 1024, "keep_start", stats) for r in records]
    examples.append(tokenize_record(records[0], tokenizer, 5, "keep_end", stats))
    assert examples[-1].chosen_prompt_len == 0  # completion from the first token on
    sft = [examples[1]]
    padded, packed = collate(examples, tokenizer.pad_token_id, None, sft), collate_packed(examples, tokenizer.pad_token_id, None, sft)
    assert packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] == int(padded.attention_mask.sum())
    with torch.no_grad():
        a = forward_pair(SequenceLogps(model, 5), padded, token_metrics=True)
        b = forward_pair(SequenceLogps(model, 5), packed, token_metrics=True)
    for name in ("chosen_logps", "rejected_logps", "chosen_logits_sum", "rejected_entropy_sum", "chosen_top1_tokens",
                 "sft_logps"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0, msg=name)
    assert torch.equal(a.chosen_tokens, b.chosen_tokens) and torch.equal(a.sft_tokens, b.sft_tokens)
    with torch.no_grad():  # the reference's view drops the SFT sequence in both layouts alike
        torch.testing.assert_close(forward_pair(SequenceLogps(model, 5), packed.pairs_only()).rejected_logps, a.rejected_logps, atol=1e-5, rtol=0)


def test_padded_forward_and_backward_never_wait_for_the_device(model, batch):
    """No op that makes the host wait for a GPU (a scalar read, or a boolean-mask selection whose size only
    the device knows) runs in the policy's forward and backward of a padded batch: the scored positions
    come with the batch and transformers is handed its causal-only mask. Counted on CPU, where they would sync."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pair = forward_pair(SequenceLogps(model, 5), batch, token_metrics=True)
        (pair.chosen_logps.sum() - pair.rejected_logps.sum()).backward()
    model.zero_grad()
    assert host_reads(prof) == []


def test_flex_attention_keeps_packed_sequences_apart(model, examples, batch, tokenizer, tiny_policy):
    """flex_attention (block-sparse on a GPU) scores a packed row, its sequences told apart only by
    position_ids, like a naive full softmax over padded rows. Forward only: torch has no CPU backward."""
    from dpo_dist.data import collate_packed

    packed = collate_packed(examples, tokenizer.pad_token_id)
    flex = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32, attn_implementation="flex_attention").eval()
    with torch.no_grad():
        naive = naive_completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        pair = forward_pair(SequenceLogps(flex, 5), packed)
    torch.testing.assert_close(torch.cat([pair.chosen_logps, pair.rejected_logps]), naive, atol=1e-5, rtol=0)


def test_target_log_prob_function_against_float64_log_softmax():
    """The in-place backward of TargetLogProb equals autograd through log_softmax + gather (float64),
    for a logit scale where softmax is far from uniform and with repeated targets."""
    from dpo_dist.logps import TargetLogProb

    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 1000, generator=generator) * 8).requires_grad_(True)
    targets = torch.randint(0, 1000, (9,), generator=generator)
    targets[1] = targets[0]
    upstream = torch.randn(9, generator=generator)

    reference_input = logits.detach().double().requires_grad_(True)
    expected = torch.log_softmax(reference_input, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * upstream.double()).sum().backward()

    fused_input = logits.detach().clone().requires_grad_(True)
    logits_buffer = fused_input * 1.0  # a fresh tensor, as lm_head(h).float() is; the function overwrites it
    got = TargetLogProb.apply(logits_buffer, targets, torch.logsumexp(logits.detach(), dim=-1))
    (got * upstream).sum().backward()

    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fused_input.grad.double(), reference_input.grad, atol=1e-6, rtol=1e-5)


def test_length_desensitized_weights_by_hand():
    """Two pairs and one SFT sequence, owners listed as prefix sharing lists them (pair by pair, SFT last):
    pair 0 chosen 3 tokens, rejected 5; pair 1 chosen 2, rejected 1; SFT 4. Past the shorter answer: alpha."""
    from dpo_dist.data import length_desensitized_weights

    owners = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 1, 1, 3, 4, 4, 4, 4])
    got = length_desensitized_weights(owners, num_pairs=2, ld_alpha=0.25)
    expected = [1, 1, 1, 1, 1, 1, 0.25, 0.25, 1, 0.25, 1, 1, 1, 1, 1]
    assert got.tolist() == expected


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix-shared", "prefix-shared-packed"])
def test_ld_alpha_sums_match_trls_shared_and_tail_split(model, tokenizer, layout):
    """LD-DPO (dpo.ld_alpha) in every layout: each pair's log-probs equal TRL's formula on a plain full softmax,
    shared + alpha x tail, where a token is shared while its place in its completion (a cumulative sum of the
    completion mask) is at most min(chosen length, rejected length); the SFT sequence and the counts unweighted."""
    from dpo_dist.data import collate_for

    records = [make_record(CHAT_RECORD), make_record(PLAIN_RECORD), make_record(PLAIN_RECORD | {"chosen": " 2 7 7 7 7"})]
    stats = TokenizeStats()
    examples = [tokenize_record(r, tokenizer, 1024, "keep_start", stats) for r in records]
    sft = [examples[1]]
    padded = collate(examples, tokenizer.pad_token_id, None, sft)
    with torch.no_grad():  # TRL's way, on the padded rows
        logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits.float()
        token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, padded.input_ids[:, 1:, None]).squeeze(-1)
    mask = padded.completion_mask[:, 1:]
    token_logps = token_logps * mask
    place, lengths = mask.cumsum(dim=1), mask.sum(dim=1)
    pairs = len(examples)
    shared_length = torch.minimum(lengths[:pairs], lengths[pairs : 2 * pairs]).repeat(2)
    place, mask = place[: 2 * pairs], mask[: 2 * pairs]
    shared = ((place > 0) & (place <= shared_length[:, None])).float()
    alpha = 0.3
    expected = (token_logps[: 2 * pairs] * (shared + alpha * (1 - shared) * mask)).sum(dim=1)
    assert (lengths[:pairs] != lengths[pairs : 2 * pairs]).tolist() == [False, True, True]  # tails on either side

    packing, sharing = layout.endswith("packed") or layout == "packed", layout.startswith("prefix")
    batch = collate_for(packing, sharing, ld_alpha=alpha)(examples, tokenizer.pad_token_id, None, sft)
    with torch.no_grad():
        got = forward_pair(SequenceLogps(model, 5), batch)
        reference_view = forward_pair(SequenceLogps(model, 5), batch.pairs_only())
    torch.testing.assert_close(torch.cat([got.chosen_logps, got.rejected_logps]), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference_view.rejected_logps, expected[pairs:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sft_logps, token_logps[2 * pairs :].sum(dim=1), atol=1e-5, rtol=0)
    assert torch.equal(torch.cat([got.chosen_tokens, got.rejected_tokens]), lengths[: 2 * pairs])


def test_compiled_head_gradients_match_naive(model, batch):
    """model.compile's head (compiled_head.py: its own backward, one kernel over the saved logits) gives the naive
    graph's gradients, with every extra computed in forward and chunks of 1 token (a graph of its own) and of 5."""
    for chunk_tokens in (1, 5):
        model.zero_grad()
        pair = forward_pair(SequenceLogps(model, chunk_tokens, probability_weights=True, compiled_head=True), batch,
                            token_metrics=True)
        (pair.chosen_logps.sum() - 0.5 * pair.rejected_logps.sum()).backward()
        assert_gradients_match_naive(model, batch)


def test_compiled_head_in_bf16_scores_policy_and_reference_alike(tiny_policy, batch):
    """A bf16 model: the compiled head's log-probs are the eager head's (which projects to fp32 first) up to fp32
    summation order, its gradients the eager head's up to bf16 rounding, and the policy's forward (grad, metrics)
    and a reference's (no grad, no metrics) give bit-identical log-probs, as the eager head's do."""
    bf16_model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.bfloat16).eval()
    scored = {}
    for compiled_head in (False, True):
        scorer = SequenceLogps(bf16_model, chunk_tokens=5, compiled_head=compiled_head)
        bf16_model.zero_grad()
        policy = forward_pair(scorer, batch, token_metrics=True)
        (policy.chosen_logps.sum() - policy.rejected_logps.sum()).backward()
        grads = {name: param.grad.float() for name, param in bf16_model.named_parameters()}
        with torch.no_grad():
            reference = forward_pair(scorer, batch)
        assert torch.equal(policy.chosen_logps.detach(), reference.chosen_logps), compiled_head
        assert torch.equal(policy.rejected_logps.detach(), reference.rejected_logps), compiled_head
        scored[compiled_head] = (torch.cat([reference.chosen_logps, reference.rejected_logps]), grads)
    (eager_logps, eager_grads), (logps, grads) = scored[False], scored[True]
    torch.testing.assert_close(logps, eager_logps, atol=1e-4, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=2e-2, rtol=2e-2, msg=name)


def test_default_chunk_fills_one_budget_whatever_the_head_holds(tiny_policy):
    """The default chunk: as many tokens as fit 256 MiB of the head's vocabulary-wide buffers, 8 bytes per logit
    for the eager head (fp32 logits and an fp32 temporary, whatever the model's dtype), the lm_head's dtype alone for
    the compiled head. Qwen's vocabulary: 220 eager, 883 compiled in bf16 (what launch/plan.py counts)."""
    from dpo_dist.logps import default_chunk_tokens

    assert (default_chunk_tokens(151936), default_chunk_tokens(151936, 2)) == (220, 883)
    for dtype, compiled_head, bytes_per_logit in ((torch.float32, False, 8), (torch.bfloat16, False, 8),
                                                   (torch.float32, True, 4), (torch.bfloat16, True, 2)):
        causal_lm = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=dtype)
        scorer = SequenceLogps(causal_lm, compiled_head=compiled_head)
        expected = 256 * 2**20 // (bytes_per_logit * causal_lm.config.vocab_size)
        assert scorer.chunk_tokens == expected, (dtype, compiled_head)
        assert SequenceLogps(causal_lm, chunk_tokens=7, compiled_head=compiled_head).chunk_tokens == 7
    # A LoRA adapter on the lm_head: three bf16 logit-sized tensors as PEFT adds, more than the compiled head's one
    from dpo_dist.config import LoRAConfig, ModelConfig
    from dpo_dist.models import prepare_policy

    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.bfloat16)
    policy = prepare_policy(causal_lm, ModelConfig(base_model="x"), LoRAConfig(r=2, target_modules=["q_proj", "lm_head"]))
    for compiled_head in (False, True):
        expected = 256 * 2**20 // (8 if not compiled_head else 3 * 2) // causal_lm.config.vocab_size
        assert SequenceLogps(policy, compiled_head=compiled_head).chunk_tokens == expected, compiled_head


def peak_live_bytes(step) -> int:
    """The most bytes held at once while `step()` runs, from the profiler's record of every allocation and free."""
    with torch.profiler.profile(profile_memory=True, activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    changes = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]")
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapted", [False, True], ids=["plain", "lora"])
def test_head_bytes_per_logit_is_what_a_chunk_holds_at_its_peak(dtype, adapted):
    """The rule the default chunk and the planner share, against the bytes a chunk's forward and backward hold at
    once (the profiler's allocations; the chunk's backward recomputes its forward with grad, so this is the
    checkpointed chunk's peak): the eager head 8 per (token, vocabulary entry), the compiled head its logits in
    the model's dtype, a PEFT LoRA lm_head (adapters in the model's dtype, as models.prepare_policy leaves them)
    three logit-sized tensors in that dtype where that is more."""
    import peft

    from dpo_dist import compiled_head as compiled_head_lib
    from dpo_dist.logps import _chunk_token_stats, head_bytes_per_logit

    torch._dynamo.reset()  # other tests' graphs could have reached the recompile limit (see the test below)
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 96, 8, 20_000  # the weight's gradient (V H) small beside the logits (n V)
    model = torch.nn.Sequential(torch.nn.Linear(hidden_size, vocab, bias=False))
    if adapted:
        adapter = peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
        model = peft.get_peft_model(model, adapter).base_model.model
    lm_head = model.to(dtype)[0]
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    for compiled, head in ((False, _chunk_token_stats), (True, compiled_head_lib.chunk_token_stats)):
        step = lambda: head(lm_head, hidden, targets, True, False)[0].sum().backward()  # noqa: E731
        step()  # compile outside the profile
        measured = peak_live_bytes(step) / (tokens * vocab)
        rule = head_bytes_per_logit(compiled, dtype.itemsize, adapted)
        assert rule <= measured <= rule + 0.5, (compiled, measured, rule)


def test_compiled_head_allocates_no_fp32_logits():
    """A bf16 head over a 20,000-token vocabulary, forward and backward: the eager head allocates (n, V) fp32
    buffers (the projection's fp32 copy), the compiled one nothing of that size: its logits stay bf16."""
    from dpo_dist import compiled_head as compiled_head_lib
    from dpo_dist.logps import _chunk_token_stats

    # The head's functions, compiled by this worker's other tests (other dtypes, vocabularies, 1-token chunks), could
    # be at dynamo's recompile limit, past which they run eagerly: start afresh
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 24, 16, 20_000
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(torch.bfloat16)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    fp32_logits = tokens * vocab * 4
    largest = {}
    for head in (_chunk_token_stats, compiled_head_lib.chunk_token_stats):
        head(lm_head, hidden, targets, True, True)[0].sum().backward()  # compile outside the profile
        with torch.profiler.profile(profile_memory=True) as prof:
            logps, stats, log_sum_squares = head(lm_head, hidden, targets, True, True)
            logps.sum().backward()
        largest[head] = max(event.cpu_memory_usage for event in prof.events())
    assert largest[_chunk_token_stats] >= fp32_logits > largest[compiled_head_lib.chunk_token_stats]
    assert largest[compiled_head_lib.chunk_token_stats] >= fp32_logits // 2  # the bf16 logits themselves


def test_compiled_head_compiles_once_for_every_chunk_size(model, batch):
    """Dynamic in the token count: after chunks of 1 token (a size dynamo specializes) and of 2, scoring with chunks
    of 3, 5, 7 and 11 tokens (last chunks of other sizes again) adds no graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # past the recompile limit (other tests' graphs) nothing would compile, vacuously

    def score(chunk_tokens):
        with torch.no_grad():
            forward_pair(SequenceLogps(model, chunk_tokens, compiled_head=True), batch, token_metrics=True)

    score(1)
    score(2)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    for chunk_tokens in (3, 5, 7, 11):
        score(chunk_tokens)
    assert counters["stats"]["unique_graphs"] == graphs
