"""Tokenized splits kept on disk (data.cache_tokenized): a second load maps the first one's pairs without
tokenizing, the key moves with everything the pairs depend on, and nothing half-written or damaged is trusted."""

import json

import pytest

from conftest import MIXED_RECORDS, PLAIN_RECORD, write_jsonl
from dpo_dist import tokenization
from dpo_dist import split_cache
from dpo_dist.records import validate, validate_sft


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


def records(count):
    """Chat and plain pairs (the first four), then plain ones with longer and longer chosen sides."""
    return [MIXED_RECORDS[i] if i < len(MIXED_RECORDS) else PLAIN_RECORD | {"chosen": " 2 7" + " 2" * i} for i in range(count)]


def load(path, tokenizer, root, write=True, max_len=40, logger=None):
    logger = logger or Lines()
    store = tokenization.load_examples([str(path)], tokenizer, max_len, "keep_start", False, logger, "train", validate, root, write)
    return store, logger.lines


def test_second_load_maps_the_first_ones_pairs_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", records(9))
    first, first_lines = load(path, tokenizer, tmp_path / "tokenized")
    assert any("truncated" in line for line in first_lines)  # the report has more than the count
    [stored] = list((tmp_path / "tokenized").iterdir())
    assert stored.name.startswith("train-")

    monkeypatch.setattr(tokenization, "tokenize_records", lambda *a, **k: pytest.fail("tokenized again"))
    second, second_lines = load(path, tokenizer, tmp_path / "tokenized")
    assert list(second) == list(first) and second.token_counts == first.token_counts
    assert second_lines == first_lines + [f"train: tokenized pairs mapped from {stored}"]


def test_only_the_writing_rank_writes_and_a_failed_write_is_logged_not_fatal(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(3))
    plain, _ = load(path, tokenizer, tmp_path / "other_rank", write=False)
    assert not (tmp_path / "other_rank").exists()
    (tmp_path / "a_file").write_text("not a directory")
    store, lines = load(path, tokenizer, tmp_path / "a_file" / "tokenized")
    assert list(store) == list(plain) and "could not keep the tokenized pairs" in lines[-1]


def test_key_moves_with_what_the_pairs_depend_on(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(3))

    def key(files=(str(path),), tok=tokenizer, max_len=40, mode="keep_start", skip=False, kind="validate"):
        description = split_cache.describe(list(files), tok, max_len, mode, skip, kind)
        return split_cache.key_of(description) if description is not None else None

    base = key()
    assert base == key() and len(base) == 16
    other_template = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other_template.chat_template = tokenizer.chat_template + " "
    changed = [key(max_len=41), key(mode="keep_end"), key(skip=True), key(kind=validate_sft.__name__), key(tok=other_template)]
    assert base not in changed and len(set(changed)) == len(changed)
    write_jsonl(path, records(3)[:2] + [records(3)[2] | {"rejected": "other"}])  # same file name, other content
    assert key() != base
    assert key(files=[str(tmp_path / "missing.jsonl")]) is None  # reading it gives the real error


def test_half_written_or_damaged_split_is_not_trusted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(5))
    root = tmp_path / "tokenized"
    first, _ = load(path, tokenizer, root)
    [stored] = list(root.iterdir())
    # a write killed midway leaves only its temp directory, which no key names
    (root / f".{stored.name}.tmp-123").mkdir()
    assert split_cache.read(root / f".{stored.name}.tmp-123") is None
    # damaged on disk: the arrays disagree with each other, so the split is tokenized again (and rewritten)
    tokens = stored / "tokens.i32"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    assert split_cache.read(stored) is None
    again, lines = load(path, tokenizer, root, write=False)
    assert list(again) == list(first) and not any("mapped from" in line for line in lines)
    json.loads((stored / "report.json").read_text())  # the report itself was not touched


def test_differences_name_what_two_ranks_read_differently(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(3))

    def describe(files=(str(path),), tok=tokenizer, max_len=40):
        return split_cache.describe(list(files), tok, max_len, "keep_start", False, "validate")

    base = describe()
    assert split_cache.differences(base, describe()) == []
    other_template = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other_template.chat_template = tokenizer.chat_template + " "
    assert split_cache.differences(base, describe(tok=other_template)) == ["the chat template"]
    other_vocab = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other_vocab.add_tokens(["<an_added_token>"])
    assert split_cache.differences(base, describe(tok=other_vocab)) == ["the tokenizer"]
    assert split_cache.differences(base, describe(max_len=41)) == [
        "the settings (max_seq_length, truncation_mode, skip_invalid, kind, chat_template_kwargs: [40, 'keep_start', "
        "False, 'validate', {}] vs [41, 'keep_start', False, 'validate', {}])"
    ]
    renamed = write_jsonl(tmp_path / "copy.jsonl", records(3))
    assert split_cache.differences(base, describe(files=[str(renamed)])) == [
        f"the data files the config names ({path} vs {renamed})"
    ]
    other_code = base | {"code": "0" * 64}
    assert split_cache.differences(base, other_code) == ["dpo-dist's code (another version installed)"]
    import transformers

    other_libraries = base | {"libraries": ["transformers 4.57.1", base["libraries"][1]]}
    assert split_cache.differences(base, other_libraries) == [
        f"the installed libraries (transformers {transformers.__version__}, {base['libraries'][1]} vs transformers "
        f"4.57.1, {base['libraries'][1]})"
    ]
    assert split_cache.key_of(other_libraries) != split_cache.key_of(base)  # another directory: tokenized again
    write_jsonl(path, records(3)[:2] + [records(3)[2] | {"rejected": "other"}])  # another node's copy of the file
    changed = describe(max_len=41)
    assert split_cache.differences(base, changed)[0] == f"the contents of {path}" and len(split_cache.differences(base, changed)) == 2


def test_a_new_copy_says_how_many_older_copies_of_its_split_are_left_beside_it(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(5))
    root = tmp_path / "tokenized"
    _, first_lines = load(path, tokenizer, root)
    assert not any("older tokenized" in line for line in first_lines)
    eval_logger = Lines()  # another split beside it is not an older copy of this one
    tokenization.load_examples([str(path)], tokenizer, 40, "keep_start", False, eval_logger, "eval", validate, root, True)
    assert not any("older tokenized" in line for line in eval_logger.lines)
    [older] = root.glob("train-*")
    older_bytes = sum(p.stat().st_size for p in older.iterdir())
    _, lines = load(path, tokenizer, root, max_len=41)  # another key: stored beside the first
    assert lines[-1] == (f"train: {root} also holds 1 older tokenized copy of this split ({older_bytes / 2**20:.1f} MiB) "
                         "that this config no longer reads; delete them unless another run needs them")
    assert older.is_dir()  # only said, never removed
    _, mapped_lines = load(path, tokenizer, root, max_len=41)
    assert not any("older tokenized" in line for line in mapped_lines)  # nothing written, nothing to say
