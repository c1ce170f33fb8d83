"""Rendering, tokenization, truncation and batching of preference pairs."""

import json

import pytest

from conftest import CHAT_RECORD, MIXED_RECORDS, PLAIN_RECORD
from dpo_dist import tokenization
from dpo_dist.data import collate, epoch_order, eval_batches, rank_step_indices, steps_per_epoch
from dpo_dist.tokenization import TokenizeStats, render_texts, tokenize_record, tokenize_records
from dpo_dist.examples import ExampleStore, PreferenceExample
from dpo_dist.records import DataError, validate, validate_sft
from test_logps import make_record


def test_plain_completion_gets_eos_once(tokenizer):
    prompt, chosen, rejected = render_texts(make_record(PLAIN_RECORD), tokenizer)
    assert chosen == PLAIN_RECORD["prompt"] + PLAIN_RECORD["chosen"] + tokenizer.eos_token
    already = make_record(PLAIN_RECORD | {"chosen": " 2 7" + tokenizer.eos_token})
    assert render_texts(already, tokenizer)[1].count(tokenizer.eos_token) == 1


def test_an_empty_plain_completion_is_the_eos_alone(tokenizer):
    """TRL appends the EOS to "" as to any plain completion and trains on it: so does dpo-dist (the pair still
    compares two answers, one of which stops at once)."""
    record = make_record(PLAIN_RECORD | {"rejected": ""})
    example = tokenize_record(record, tokenizer, 1024, "keep_start", TokenizeStats())
    assert example.rejected_ids[example.rejected_prompt_len :] == [tokenizer.eos_token_id]
    assert example.rejected_ids[: example.rejected_prompt_len] == example.chosen_ids[: example.chosen_prompt_len]
    sft, reason = validate_sft({"prompt": "q", "completion": ""})  # SFT records too: the EOS alone is learned
    assert reason is None and sft["chosen"] == sft["rejected"] == ""
    # With an empty prompt too (Qwen's tokenizer adds no BOS) nothing precedes the EOS: no token could be scored
    with pytest.raises(DataError, match="test:1: the prompt renders to no tokens and a completion to one"):
        tokenize_record(make_record({"prompt": "", "chosen": "", "rejected": " 1"}), tokenizer, 1024, "keep_start",
                        TokenizeStats())


def test_data_chat_template_kwargs_reach_chat_records_without_their_own(tokenizer, tmp_path):
    """data.chat_template_kwargs: the same pairs as the per-record column (compared with TRL in test_trl_parity),
    for every chat record without one; a record's own wins, plain records have none, and the split cache keeps the
    settings apart."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from conftest import write_jsonl
    from test_trl_parity import THINKING_TEMPLATE

    template_dir = shutil.copytree(Path(tokenizer.name_or_path), tmp_path / "tok")
    (template_dir / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    thinking = AutoTokenizer.from_pretrained(template_dir)
    own = {"enable_thinking": True}
    lines = [CHAT_RECORD, CHAT_RECORD | {"chat_template_kwargs": own}, PLAIN_RECORD]
    off = {"enable_thinking": False}

    class Quiet:
        def info(self, line):
            pass

    def load(records, name, defaults=None, cache_root=None):
        return list(tokenization.load_examples([str(write_jsonl(tmp_path / f"{name}.jsonl", records))], thinking, 1024,
                                               "keep_start", False, Quiet(), "train", cache_root=cache_root,
                                               write_cache=cache_root is not None, chat_template_kwargs=defaults))

    by_config = load(lines, "config", off)
    by_column = load([CHAT_RECORD | {"chat_template_kwargs": off}, lines[1], PLAIN_RECORD], "column")
    assert by_config == by_column
    unset = load(lines, "unset")
    assert unset[0] != by_config[0] and unset[1:] == by_config[1:]  # the defaults moved the bare chat record only
    completion = thinking.decode(by_config[0].chosen_ids[by_config[0].chosen_prompt_len:])
    assert completion == "1 4 9<|im_end|>\n"  # non-thinking: the empty thinking block is prompt, not completion
    cache = tmp_path / "cache"
    assert load(lines, "cached", off, cache) == by_config and load(lines, "cached", None, cache) == unset
    assert len(list(cache.iterdir())) == 2  # two keys: the settings differ


def test_chat_completion_is_the_assistant_turn(tokenizer):
    example = tokenize_record(make_record(CHAT_RECORD), tokenizer, 1024, "keep_start", TokenizeStats())
    completion = tokenizer.decode(example.chosen_ids[example.chosen_prompt_len :])
    assert completion == "1 4 9<|im_end|>\n"
    prompt = tokenizer.decode(example.chosen_ids[: example.chosen_prompt_len])
    assert prompt.endswith("<|im_start|>assistant\n") and "Sort ascending: 5 3" in prompt  # multi-turn kept


def test_completions_that_merge_with_the_prompt_are_counted_in_the_report(tokenizer, tmp_path):
    """A prompt ending in a space tokenizes "is " + "42" as "is", " 42": the prompt's last token belongs to the
    completion's first. Those pairs train (as TRL tokenizes them) and the split's report says how many."""
    path = tmp_path / "train.jsonl"
    records = [{"prompt": "The answer is ", "chosen": "42", "rejected": "43"}, PLAIN_RECORD,
               {"prompt": "Count: 1 2 3", "chosen": " 4", "rejected": "4"}]  # "3" + "4" tokenizes as " 34"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    examples, lines = tokenization._tokenize_split([str(path)], tokenizer, 1024, "keep_start", False, "train", validate)
    assert len(examples) == 3
    assert [line for line in lines if "merges" in line] == [
        "train: 2 pair(s) whose completion merges with the prompt's last token when tokenized together (a prompt "
        "ending in a space, a completion continuing the prompt's last word): those prompt tokens are scored as part "
        "of the completion"]
    prompt_ids = tokenizer("The answer is ")["input_ids"]
    assert examples[0].chosen_prompt_len == len(prompt_ids) - 1  # the trailing space's token is the completion's


def test_template_that_breaks_the_prefix_fails_clearly(tokenizer, tmp_path):
    broken = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Like Qwen3 with thinking: the generation prompt adds an empty think block the full render lacks.
    broken.chat_template = tokenizer.chat_template.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
    )
    with pytest.raises(DataError, match=r"test:1: the chat template renders the prompt"):
        render_texts(make_record(CHAT_RECORD), broken)


def test_batched_tokenization_equals_one_text_at_a_time_in_file_order(tokenizer, monkeypatch):
    """tokenize_records encodes a batch of records per tokenizer call, chat and plain apart: the ids, prompt
    lengths, truncation and order are those of encoding each text alone (the independent computation here)."""
    monkeypatch.setattr(tokenization, "ENCODE_BATCH_RECORDS", 3)  # batches end inside the data, and mix both kinds
    raws = [MIXED_RECORDS[i % len(MIXED_RECORDS)] | {"rejected": MIXED_RECORDS[i % len(MIXED_RECORDS)]["rejected"] * (1 + i % 2)}
            for i in range(10)]
    records = [make_record(raw, f"test:{i}") for i, raw in enumerate(raws)]
    max_len = 48
    store, stats, failures = tokenize_records(records, tokenizer, max_len, "keep_start", skip_invalid=False)
    expected = []
    for record in records:
        prompt, chosen, rejected = (tokenizer(text, add_special_tokens=not record.conversational)["input_ids"]
                                    for text in render_texts(record, tokenizer))
        prompt_len = 0
        while prompt_len < len(prompt) and prompt[prompt_len] == chosen[prompt_len] == rejected[prompt_len]:
            prompt_len += 1
        if prompt_len < max_len:
            expected.append((record.uid, chosen[:max_len], prompt_len, rejected[:max_len], prompt_len))
    assert [(e.uid, e.chosen_ids, e.chosen_prompt_len, e.rejected_ids, e.rejected_prompt_len) for e in store] == expected
    assert isinstance(store, ExampleStore) and failures == 0 and stats.total == len(records)
    assert stats.truncated > 0 and {r.conversational for r in records} == {True, False}


def test_the_first_bad_record_of_a_batch_is_the_one_reported(tokenizer):
    """Rendering a batch's records runs before their encoded ids are checked; an unrenderable record must still not
    be reported ahead of an earlier record whose completion renders to no tokens (one process and the ranks' blocks,
    whose batches start elsewhere, report the same record: the first in file order)."""
    odd = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # An assistant turn saying "nothing" renders as its bare header, which the generation prompt also ends with (no
    # completion tokens); a conversation opened by a system message gets a generation prompt its render lacks.
    odd.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content != 'nothing' %}{{ m.content }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if messages[0].role == 'system' %}<think>{% endif %}{% endif %}"
    )
    user = [{"role": "user", "content": "Sort: 3 1"}]
    empty = make_record({"prompt": user, "chosen": [{"role": "assistant", "content": "nothing"}],
                         "rejected": [{"role": "assistant", "content": "1 3"}]}, "test:1")
    unrenderable = make_record({"prompt": [{"role": "system", "content": "Be brief."}] + user,
                                "chosen": [{"role": "assistant", "content": "1 3"}],
                                "rejected": [{"role": "assistant", "content": "3 1"}]}, "test:2")
    with pytest.raises(DataError, match="test:2: the chat template renders the prompt"):
        tokenize_records([unrenderable], odd, 64, "keep_start", skip_invalid=False)
    with pytest.raises(DataError, match="test:1: a completion renders to no tokens"):
        tokenize_records([empty, unrenderable], odd, 64, "keep_start", skip_invalid=False)
    store, _, failures = tokenize_records([empty, unrenderable], odd, 64, "keep_start", skip_invalid=True)
    assert len(store) == 0 and failures == 2


def test_example_store_holds_four_bytes_a_token_and_gives_back_the_pairs():
    """Qwen's vocabulary puts ids far above Python's small-int cache; the store keeps them as int32 and returns
    each pair as it went in, by index, negative index and slice; lengths come without building pairs."""
    examples = [PreferenceExample(f"u{i}", [151_935 - i, 7, 151_643] * (i + 1), i + 1, [100_000 + i] * (2 * i + 3), i + 1)
                for i in range(6)]
    store = ExampleStore(examples)
    assert len(store) == 6 and list(store) == examples and store[-1] == examples[5] and store[1:4] == examples[1:4]
    assert store.token_counts == [e.num_tokens for e in examples] and store.uids == [e.uid for e in examples]
    assert list(store.completion_lengths()) == [
        (e.uid, len(e.chosen_ids) - e.chosen_prompt_len, len(e.rejected_ids) - e.rejected_prompt_len) for e in examples]
    tokens = sum(e.num_tokens for e in examples)
    assert store.nbytes <= 4 * tokens + 8 * (len(examples) + 1) + 4 * 3 * len(examples)
    with pytest.raises(IndexError):
        store[6]


def test_keep_start_truncation_and_too_long_prompt_dropped(tokenizer):
    record = make_record(CHAT_RECORD)
    full = tokenize_record(record, tokenizer, 10_000, "keep_start", TokenizeStats())
    budget = full.chosen_prompt_len + 2
    stats = TokenizeStats()
    cut = tokenize_record(record, tokenizer, budget, "keep_start", stats)
    assert cut.chosen_ids == full.chosen_ids[:budget] and cut.chosen_prompt_len == full.chosen_prompt_len
    assert stats.truncated == 1
    stats = TokenizeStats()
    assert tokenize_record(record, tokenizer, full.chosen_prompt_len, "keep_start", stats) is None
    assert stats.dropped_prompt_too_long == 1


def test_keep_end_truncation_keeps_the_completion(tokenizer):
    record = make_record(CHAT_RECORD)
    full = tokenize_record(record, tokenizer, 10_000, "keep_start", TokenizeStats())
    cut = tokenize_record(record, tokenizer, 8, "keep_end", TokenizeStats())
    assert cut.chosen_ids == full.chosen_ids[-8:]
    completion_len = len(full.chosen_ids) - full.chosen_prompt_len
    assert len(cut.chosen_ids) - cut.chosen_prompt_len == completion_len
    # Cut to fewer tokens than a completion holds, a side loses its whole prompt: counted, and logged by load_examples
    stats = TokenizeStats()
    gone = tokenize_record(record, tokenizer, completion_len - 1, "keep_end", stats)
    assert min(gone.chosen_prompt_len, gone.rejected_prompt_len) == 0 and stats.prompt_cut_off == 1
    stats = TokenizeStats()
    tokenize_record(record, tokenizer, 8, "keep_end", stats)
    assert stats.truncated == 1 and stats.prompt_cut_off == 0


def test_collate_masks(tokenizer):
    examples = [tokenize_record(make_record(r), tokenizer, 1024, "keep_start", TokenizeStats()) for r in (CHAT_RECORD, PLAIN_RECORD)]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 4 and batch.num_pairs == 2
    for row, (ids, prompt_len) in enumerate(
        [(e.chosen_ids, e.chosen_prompt_len) for e in examples] + [(e.rejected_ids, e.rejected_prompt_len) for e in examples]
    ):
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        assert batch.attention_mask[row].sum() == len(ids)
        assert batch.completion_mask[row].nonzero().flatten().tolist() == list(range(prompt_len, len(ids)))
    assert batch.uids == [e.uid for e in examples]


def test_rank_step_indices_partition_the_global_batch():
    order = epoch_order(50, epoch=3, seed=7, shuffle=True)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == epoch_order(50, epoch=3, seed=7, shuffle=True) != epoch_order(50, epoch=4, seed=7, shuffle=True)
    world, micro, accumulation = 2, 3, 2
    assert steps_per_epoch(50, micro * world * accumulation) == 4
    for step in range(4):
        seen = [i for rank in range(world) for mb in rank_step_indices(order, step, rank, world, micro, accumulation) for i in mb]
        assert sorted(seen) == sorted(order[step * 12 : (step + 1) * 12])
        # one process with micro*world pairs per micro-batch sees the same pairs
        single = [i for mb in rank_step_indices(order, step, 0, 1, micro * world, accumulation) for i in mb]
        assert sorted(single) == sorted(seen)


def test_eval_batches_score_every_pair_once_across_ranks(tokenizer):
    examples = [tokenize_record(make_record(PLAIN_RECORD | {"chosen": f" {i}"}), tokenizer, 64, "keep_start", TokenizeStats()) for i in range(7)]
    world, micro = 2, 3
    per_rank = [list(eval_batches(examples, rank, world, micro, tokenizer.pad_token_id)) for rank in range(world)]
    assert len(per_rank[0]) == len(per_rank[1])  # collective forwards stay in step under ZeRO-3
    real = [uid for batches in per_rank for b in batches for uid, w in zip(b.uids, b.pair_weight) if w == 1.0]
    assert sorted(real) == sorted(e.uid for e in examples)
    assert sum(float(b.pair_weight.sum()) for batches in per_rank for b in batches) == 7
    # TRL's token count of the eval pairs: each chosen and rejected sequence in full; the weight-0 copies none
    tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert sum(b.num_tokens for batches in per_rank for b in batches) == tokens


def test_sft_indices_mix_at_the_ratio_and_split_across_ranks():
    from dpo_dist.data import sft_indices

    world, accumulation, micro, ratio, n = 2, 2, 4, 0.25, 7
    per_micro = []
    for step in range(5):
        for micro_step in range(accumulation):
            ranks = [sft_indices(step, micro_step, r, world, accumulation, micro, ratio, n, seed=1) for r in range(world)]
            assert len(ranks[0]) == len(ranks[1])  # every rank the same count
            per_micro.append(ranks)
    assert sum(len(r[0]) for r in per_micro) == int(10 * micro * ratio)  # 0.25 per pair on average
    stream = [i for ranks in per_micro for r in ranks for i in r]
    assert sorted(stream[:n]) == list(range(n))  # the first cycle is a permutation of the SFT set
    assert per_micro == [[sft_indices(s, m, r, world, accumulation, micro, ratio, n, seed=1) for r in range(world)]
                         for s in range(5) for m in range(accumulation)]  # a pure function of the position
