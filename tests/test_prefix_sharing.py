"""Prefix sharing (data.prefix_sharing): a pair's prompt runs once, and every number equals the unshared run's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MIXED_RECORDS, PLAIN_RECORD
from dpo_dist import logps, prefix_sharing
from dpo_dist.data import collate, collate_shared_prefix
from dpo_dist.tokenization import TokenizeStats, tokenize_record
from dpo_dist.logps import SequenceLogps, forward_pair
from launching import read_metrics, run_here, write_config
from test_logps import host_reads, make_record, naive_completion_logps


def test_pair_document_layout_by_hand():
    """chosen 1 2 | 3 4 5 and rejected 1 2 | 3 7 8 9 (prompt of 2) share 1 2 3: the '3' that starts both
    completions is shared too, so position 2 scores chosen's 4 and rejected's 7."""
    doc = prefix_sharing.pair_document([1, 2, 3, 4, 5], 2, [1, 2, 3, 7, 8, 9], 2, chosen_owner=0, rejected_owner=1)
    assert doc.token_ids == [1, 2, 3, 4, 5, 7, 8, 9]
    assert doc.position_ids == [0, 1, 2, 3, 4, 3, 4, 5]
    assert doc.branch == [0, 0, 0, 1, 1, 2, 2, 2]
    assert doc.completion == [0, 0, 1, 1, 1, 1, 1, 1]
    assert doc.scored == [(1, 3, 0), (2, 4, 0), (3, 5, 0), (1, 3, 1), (2, 7, 1), (5, 8, 1), (6, 9, 1)]
    # Who sees whom: row = query offset, column = key offset.
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen's 4
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected's 7: the shared prefix and itself, not chosen's 4 5
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    layout = prefix_sharing.place_documents([doc], pad_token_id=0, packed=False)
    # Attention runs on the unshared sequences: chosen is cells 0-4 (padded with its first cell), rejected the
    # shared 0-2 then its own 5-7; each cell reads its output back from chosen's row, rejected's own from rejected's.
    assert layout.attention_gather.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 5, 6, 7]]
    assert layout.attention_scatter.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]
    offsets = torch.arange(8)
    got = prefix_sharing.allowed(layout.branch, None, layout.position_ids, None, torch.zeros(1, 1, 1, dtype=torch.long),
                                 offsets[None, :, None], offsets[None, None, :])[0]
    assert torch.equal(got, expected)
    # Backward by gathering: grid cells 0-2 are read by chosen's and rejected's sequence cells (0-2 and 6-8), the
    # others by one, chosen's padding (5) by none; sequence cells 0-4 and 9-11 are read back by one grid cell each,
    # rejected's shared ones (6-8) and chosen's padding by none
    gather_sources, scatter_sources = prefix_sharing.backward_sources(layout.attention_gather, layout.attention_scatter)
    assert gather_sources.tolist() == [[0, 6], [1, 7], [2, 8], [3, -1], [4, -1], [9, -1], [10, -1], [11, -1]]
    assert scatter_sources.squeeze(1).tolist() == [0, 1, 2, 3, 4, -1, -1, -1, -1, 5, 6, 7]


def test_a_token_read_by_three_sequences_is_refused():
    """backward_sources keeps two readers per grid cell (what pair documents have): a document whose first token
    three sequences contain is refused where it is placed, not trained with a gradient missing a term."""
    doc = prefix_sharing.SharedDocument(
        token_ids=[1, 2, 3, 4], position_ids=[0, 1, 1, 1], branch=[0, 1, 2, 2], completion=[0, 1, 1, 1],
        scored=[(0, 2, 0)], sequences=[(0, [0, 1]), (1, [0, 2]), (2, [0, 3])],
        output_from=[(0, 0), (0, 1), (1, 1), (2, 1)])
    with pytest.raises(RuntimeError, match="in 3 sequences"):
        prefix_sharing.place_documents([doc], pad_token_id=0, packed=False)


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Chat and plain pairs of different lengths, a truncated one, a keep_end one whose prompt is cut away
    (its completion starts the sequence), and a pair whose completions share their first tokens."""
    records = [make_record(raw) for raw in MIXED_RECORDS]
    stats = TokenizeStats()
    examples = [tokenize_record(r, tokenizer, 64, "keep_start", stats) for r in records]
    examples.append(tokenize_record(records[0], tokenizer, 5, "keep_end", stats))
    assert stats.truncated == 2 and examples[-1].chosen_prompt_len == 0
    third = examples[2]
    assert prefix_sharing.common_prefix_length(third.chosen_ids, third.rejected_ids) > third.chosen_prompt_len
    return examples


@pytest.fixture(scope="module")
def sft(tokenizer):
    stats = TokenizeStats()
    return [tokenize_record(make_record(PLAIN_RECORD), tokenizer, 64, "keep_start", stats)]


def naive_logps(model, examples, tokenizer, sft=()):
    """Every sequence in its own padded row through the plain model: full logits, full log-softmax."""
    padded = collate(examples, tokenizer.pad_token_id, None, sft)
    return naive_completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("packed", [False, True])
def test_log_probs_and_gradients_equal_the_unshared_ones(tiny_policy, tokenizer, examples, sft, attn, packed):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32, attn_implementation=attn)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    batch = collate_shared_prefix(examples, tokenizer.pad_token_id, None, sft, packed=packed)
    unshared_tokens = sum(e.num_tokens for e in examples) + len(sft[0].chosen_ids)
    assert batch.num_tokens == unshared_tokens and int(batch.attention_mask.sum()) < unshared_tokens
    assert batch.input_ids.shape[0] == (1 if packed else len(examples) + 1)

    pair = forward_pair(SequenceLogps(model, 5), batch, token_metrics=True)
    naive = naive_logps(reference, examples, tokenizer, sft)
    n = len(examples)
    got = torch.cat([pair.chosen_logps, pair.rejected_logps, pair.sft_logps])
    torch.testing.assert_close(got, naive, atol=1e-5, rtol=0)
    unshared = collate(examples, tokenizer.pad_token_id, None, sft)
    counts = unshared.completion_mask[:, 1:].sum(dim=1)
    assert torch.equal(torch.cat([pair.chosen_tokens, pair.rejected_tokens, pair.sft_tokens]), counts)
    with torch.no_grad():  # the token metrics too (test_logps checks the padded layout's against float64)
        padded = forward_pair(SequenceLogps(reference, 5), unshared, token_metrics=True)
    for name in ("chosen_logits_sum", "rejected_logits_sum", "chosen_entropy_sum", "rejected_entropy_sum",
                 "chosen_top1_tokens"):
        torch.testing.assert_close(getattr(pair, name).detach(), getattr(padded, name), atol=1e-4, rtol=0, msg=name)

    (got * torch.linspace(1.0, -1.0, 2 * n + 1)).sum().backward()
    (naive * torch.linspace(1.0, -1.0, 2 * n + 1)).sum().backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_gathering_backward_gives_the_scatter_adds_gradients_bit_for_bit(tiny_policy, tokenizer, examples, sft, packed,
                                                                          dtype, monkeypatch):
    """Compiled layers run the attention's gather and scatter through GatherRows, whose backward gathers each row's
    gradient from its (at most two) readers, leaving out padding whose gradient is zero. Forced on eagerly here:
    every parameter's gradient equals index_select's scatter-add backward exactly, in fp32 and bf16, padded and
    packed, with a pair that shares no token at all (the keep_end one: its rejected sequence's padding repeats a
    token past chosen's), padded sequences and an SFT document."""
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=dtype, attn_implementation="sdpa")
    batch = collate_shared_prefix(examples, tokenizer.pad_token_id, None, sft, packed=packed)
    gradients = {}
    for gathering in (False, True):
        if gathering:  # as a compiled layer would, with the sources built for compiled layers
            monkeypatch.setattr(prefix_sharing, "_select_rows", prefix_sharing.GatherRows.apply)
            monkeypatch.setattr(logps, "has_compiled_layers", lambda causal_lm: True)
        model.zero_grad()
        pair = forward_pair(SequenceLogps(model, 5), batch)
        weights = torch.linspace(1.0, -1.0, batch.num_sequences)
        (torch.cat([pair.chosen_logps, pair.rejected_logps, pair.sft_logps]) * weights).sum().backward()
        gradients[gathering] = {name: param.grad.clone() for name, param in model.named_parameters()}
    for name, grad in gradients[True].items():
        assert torch.equal(grad, gradients[False][name]), name
    assert any(grad.abs().sum() > 0 for grad in gradients[True].values())


@pytest.mark.parametrize("packed", [False, True])
def test_pairs_only_drops_the_sft_documents_without_reading_the_device(tiny_policy, tokenizer, examples, sft, packed):
    from torch.profiler import ProfilerActivity, profile

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    batch = collate_shared_prefix(examples, tokenizer.pad_token_id, None, sft, packed=packed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pairs = batch.pairs_only()
    assert host_reads(prof) == []
    assert pairs.num_sft == 0 and pairs.input_ids.numel() < batch.input_ids.numel()
    with torch.no_grad():
        got = forward_pair(SequenceLogps(model, 5), pairs)
        naive = naive_logps(model, examples, tokenizer)
    torch.testing.assert_close(torch.cat([got.chosen_logps, got.rejected_logps]), naive, atol=1e-5, rtol=0)


def test_unshared_pairs_only_slices_without_reading_the_device(tiny_policy, tokenizer, examples, sft):
    """The padded layout's reference view too: an SFT row longer than every pair is cut off, by host numbers."""
    from torch.profiler import ProfilerActivity, profile

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    long_sft = [examples[3]]  # longer than the others: the pairs-only grid is narrower
    batch = collate(examples[:3], tokenizer.pad_token_id, None, long_sft)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pairs = batch.pairs_only()
    assert host_reads(prof) == []
    assert pairs.input_ids.shape[1] < batch.input_ids.shape[1]
    with torch.no_grad():
        got = forward_pair(SequenceLogps(model, 5), pairs)
    torch.testing.assert_close(torch.cat([got.chosen_logps, got.rejected_logps]),
                               naive_logps(model, examples[:3], tokenizer), atol=1e-5, rtol=0)


def test_flex_attention_block_mask(tiny_policy, tokenizer, examples):
    """flex_attention gets a BlockMask from the same rule (forward only: torch has no CPU backward for it)."""
    flex = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32, attn_implementation="flex_attention").eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).eval()
    with torch.no_grad():
        for packed in (False, True):
            pair = forward_pair(SequenceLogps(flex, 5), collate_shared_prefix(examples, tokenizer.pad_token_id, packed=packed))
            torch.testing.assert_close(torch.cat([pair.chosen_logps, pair.rejected_logps]),
                                       naive_logps(plain, examples, tokenizer), atol=1e-5, rtol=0)


def test_sliding_window_layers(tmp_path, tokenizer, examples):
    """A model with sliding-window layers (window 4, shorter than the prompts): the window holds in the gathered
    attention, and ordinary padded batches through the same model afterwards still get transformers' own masks."""
    from make_tiny_qwen3 import make_checkpoint

    path = make_checkpoint(tmp_path / "sliding", seed=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert "sliding_attention" in model.config.layer_types
    with torch.no_grad():
        pair = forward_pair(SequenceLogps(model, 5), collate_shared_prefix(examples, tokenizer.pad_token_id))
        naive = naive_logps(model, examples, tokenizer)
        full_window = naive_logps(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, sliding_window=10_000).eval(),
                                  examples, tokenizer)
    assert (naive - full_window).abs().max() > 1e-3  # the window really changes the numbers
    torch.testing.assert_close(torch.cat([pair.chosen_logps, pair.rejected_logps]), naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", [
    {},  # full fine-tuning, separate reference model
    # LoRA with the adapter-disabled reference (the PEFT model's config is the one switched over), packed,
    # lean activations on the shared side only
    {"lora": {"r": 8, "alpha": 16}, "shared": {"model": {"lean_activations": True}, "data": {"packing": True}}},
], ids=["full", "lora-packed-lean"])
def test_training_with_prefix_sharing_equals_training_without(tiny_policy, tmp_path, recipe):
    """Same losses, gradient norms and evals over 3 steps (ZeRO-2, SFT mixed in, gradient checkpointing:
    backward recomputes the gathered attention); the same num_tokens (the sequences' tokens), fewer
    processed by the decoder."""
    from conftest import write_jsonl

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Sort ascending: {a} {b}\nAnswer:", "completion": f" {min(a, b)} {max(a, b)}"}
                                               for a, b in zip(range(10), range(50, 60))])
    runs = {}
    for shared in (False, True):
        out = tmp_path / f"shared-{shared}"
        extra = recipe.get("shared", {}) if shared else {}
        sections = {"lora": recipe["lora"]} if "lora" in recipe else {}
        config = write_config(tmp_path / f"{shared}.yaml", tiny_policy, None, out, **sections,
                              model={"gradient_checkpointing": True, **extra.get("model", {})},
                              training={"max_steps": 3, "learning_rate": 3e-2 if "lora" in recipe else 1e-2, "warmup_ratio": 0.0},
                              data={"prefix_sharing": shared, "sft_files": [str(sft)], "sft_ratio": 0.5, **extra.get("data", {})})
        run_here("train.py", config)
        runs[shared] = read_metrics(out)
    (plain_train, plain_eval), (shared_train, shared_eval) = runs[False], runs[True]
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "sft_nll_loss")
    for step in plain_train:
        for key in keys:
            assert shared_train[step][key] == pytest.approx(plain_train[step][key], abs=1e-5), (step, key)
        assert shared_train[step]["num_tokens"] == plain_train[step]["num_tokens"]
        assert shared_train[step]["num_processed_tokens"] < plain_train[step]["num_processed_tokens"]
    assert plain_train[max(plain_train)]["loss"] != pytest.approx(plain_train[min(plain_train)]["loss"], abs=1e-4)
    assert len(plain_eval) == len(shared_eval) == 2  # before and after training
    for plain, shared in zip(plain_eval, shared_eval):
        assert shared["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-5)
        assert shared["eval_num_tokens"] == plain["eval_num_tokens"]


def test_shared_forward_and_backward_never_wait_for_the_device(tiny_policy, tokenizer, examples):
    """Gathered attention, its indices and the scoring all come with the batch: no op in the forward and
    backward of a prefix-shared batch reads a device value on the host (counted on CPU, where they would sync)."""
    from torch.profiler import ProfilerActivity, profile

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    batch = collate_shared_prefix(examples, tokenizer.pad_token_id)
    forward_pair(SequenceLogps(model, 5), batch)  # the first call switches the model's attention over
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pair = forward_pair(SequenceLogps(model, 5), batch)
        (pair.chosen_logps.sum() - pair.rejected_logps.sum()).backward()
    assert host_reads(prof) == []


def test_compiled_gather_backward_gathers_and_scatters_nothing():
    """Inside a compiled graph `_select_rows` takes GatherRows: the backward graph AOTAutograd hands the compiler
    gathers rows and has no scatter-add (what index_select's own backward is, atomic adds on a GPU). Its gradient
    is index_select's, on the hand-made layout's attention gather with gradient only where real tokens read."""
    from torch._dynamo.backends.common import aot_autograd

    doc = prefix_sharing.pair_document([1, 2, 3, 4, 5], 2, [1, 2, 3, 7, 8, 9], 2, chosen_owner=0, rejected_owner=1)
    layout = prefix_sharing.place_documents([doc], pad_token_id=0, packed=False)
    gather_sources, _ = prefix_sharing.backward_sources(layout.attention_gather, layout.attention_scatter)
    index = layout.attention_gather.reshape(-1)
    backward_ops = []

    def keep_backward(graph, example_inputs):
        backward_ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph

    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=keep_backward)
    generator = torch.Generator().manual_seed(0)
    cells = torch.randn(8, 2, 3, generator=generator)
    upstream = torch.randn(12, 2, 3, generator=generator)
    upstream[5] = 0.0  # chosen's padding: never attended, so no gradient reaches it in a real layer

    def select(states, selected):
        return (selected(states) * upstream).sum()

    compiled_states = cells.clone().requires_grad_(True)
    torch.compile(select, backend=backend, fullgraph=True)(
        compiled_states, lambda states: prefix_sharing._select_rows(states, index, gather_sources)).backward()
    eager_states = cells.clone().requires_grad_(True)
    select(eager_states, lambda states: states.index_select(0, index)).backward()
    assert torch.equal(compiled_states.grad, eager_states.grad)
    scattering = [op for op in backward_ops if any(word in op for word in ("scatter", "index_add", "index_put"))]
    assert backward_ops and not scattering, backward_ops


def test_backward_sources_are_built_only_for_compiled_layers_with_grad(tiny_policy, tokenizer, examples):
    """Only a compiled layer's attention backward reads `backward_sources` (`_select_rows`), so the masks carry them
    only there, in grad mode: eager layers and no-grad forwards (a reference, evaluation) spend no kernels on them.
    `SequenceLogps` learns which from the decoder, marked by `compile_decoder_layers`."""
    from dpo_dist.models import compile_decoder_layers, has_compiled_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    batch = collate_shared_prefix(examples, tokenizer.pad_token_id)
    layout = (batch.branch, batch.sequence_index, batch.position_ids, batch.attention_gather, batch.attention_scatter)
    for compiled_layers, grad, built in ((False, True, False), (True, False, False), (True, True, True)):
        with torch.set_grad_enabled(grad):
            masks = prefix_sharing.attention_masks(model, *layout, compiled_layers=compiled_layers)
        assert masks and all((mask.gather_sources is not None) == built for mask in masks.values())
        assert all((mask.scatter_sources is not None) == built for mask in masks.values())
    assert not has_compiled_layers(model)
    compile_decoder_layers(model)
    assert has_compiled_layers(model)
