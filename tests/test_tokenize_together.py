"""A split's first load is tokenized by all ranks together (a block of records each, then exchanged): two real
ranks (torchrun, gloo) must end with exactly the pairs, report and errors of one process tokenizing alone,
which this test computes in its own process as the independent reference."""

import dataclasses
import json
import socket
import sys

from conftest import MIXED_RECORDS, PLAIN_RECORD, write_jsonl
from dpo_dist import tokenization
from dpo_dist.errors import UserError
from dpo_dist.records import validate
from launching import ROOT, assert_ok, free_port, run

WORKER = """
import dataclasses, json, os, sys
import torch.distributed
from pathlib import Path
sys.path.insert(0, {root!r})
from transformers import AutoTokenizer
from dpo_dist import tokenization
from dpo_dist.engine import init_distributed, shutdown_distributed, tokenize_shards
from dpo_dist.records import validate

class Lines:
    def __init__(self):
        self.lines = []
    def info(self, message):
        self.lines.append(message)

def broken_tokenize(*args, **kwargs):
    raise ValueError("a bug in this rank's tokenizing")

work = Path(sys.argv[1])
info = init_distributed(2)
shards = tokenize_shards(info)
real_tokenize, results = tokenization.tokenize_records, {{}}
for case in json.loads((work / "cases.json").read_text()):
    tokenization.tokenize_records = broken_tokenize if case.get("bug_on_rank") == info.rank else real_tokenize
    tokenizer, logger = AutoTokenizer.from_pretrained(case["tokenizer"]), Lines()
    root = case["roots"][info.rank]
    os.chdir(case.get("cwd", [str(work), str(work)])[info.rank])  # a relative data path: each "node" its own copy
    try:
        files = case["data"] if isinstance(case["data"], list) else [case["data"]]
        store = tokenization.load_examples(files, tokenizer, 40, "keep_start", case["skip_invalid"], logger, "train",
                                       validate, Path(root) if root else None, info.is_main, shards)
        results[case["name"]] = {{"pairs": [dataclasses.astuple(e) for e in store], "lines": logger.lines}}
    except Exception as err:
        results[case["name"]] = {{"error": f"{{type(err).__name__}}: {{err}}", "lines": logger.lines}}
    # A real restart is a new launch, after rank 0 stored the split: don't let rank 1 look before the rename
    torch.distributed.barrier()
(work / f"rank{{info.rank}}.json").write_text(json.dumps(results))
shutdown_distributed()
"""


def records(count, chat_at=()):
    """Plain pairs whose chosen sides grow (some truncated at 40 tokens), with chat pairs at `chat_at`."""
    return [MIXED_RECORDS[0] if i in chat_at else PLAIN_RECORD | {"chosen": " 2 7" + " 2" * (3 * i)} for i in range(count)]


def alone(case):
    """What one process tokenizing the whole split gets: (pairs, report lines) or the error text."""
    from transformers import AutoTokenizer

    class Lines:
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)

    logger = Lines()
    try:
        files = case["data"] if isinstance(case["data"], list) else [case["data"]]
        store = tokenization.load_examples(files, AutoTokenizer.from_pretrained(case["tokenizer"]), 40, "keep_start",
                                       case["skip_invalid"], logger, "train", validate)
    except UserError as err:
        return f"{type(err).__name__}: {err}"
    return [list(dataclasses.astuple(e)) for e in store], logger.lines


def test_ranks_tokenize_a_block_each_and_end_with_what_one_process_gets(tiny_policy, tokenizer, tmp_path):
    # A template whose generation prompt differs from how it renders the assistant turn: every chat pair fails
    # to render (after the records were read, so the error comes from one rank's block).
    broken = tokenizer.__class__.from_pretrained(tiny_policy)
    broken.chat_template = tokenizer.chat_template.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
    )
    broken.save_pretrained(tmp_path / "broken_tokenizer")
    good = str(write_jsonl(tmp_path / "good.jsonl", records(9, chat_at={2, 7})))
    late = str(write_jsonl(tmp_path / "late.jsonl", records(9, chat_at={6})))  # rows 4-8 are rank 1's block
    both = str(write_jsonl(tmp_path / "both.jsonl", records(9, chat_at={1, 6})))
    # Rows that cannot be read: each rank parses only its block of rows, yet the error is one process's (a record
    # that cannot be read, in rank 1's block, before one that cannot be rendered, in rank 0's) and the skip
    # counts are the sum of the blocks'.
    unreadable = records(9, chat_at={1})
    unreadable[7] = "not json"
    mixed = str(write_jsonl(tmp_path / "mixed.jsonl", unreadable))
    unreadable[2] = {"prompt": "x", "chosen": " y"}
    skippable = str(write_jsonl(tmp_path / "skippable.jsonl", unreadable))
    unreadable[2] = "not json either"
    twice = str(write_jsonl(tmp_path / "twice.jsonl", unreadable))  # an unreadable row in each block
    missing = str(tmp_path / "missing.jsonl")
    # Two files, the blocks' boundary inside the first, a blank line that counts as a row and is skipped
    (tmp_path / "first.jsonl").write_text(write_jsonl(tmp_path / "first.jsonl", records(9)[:7]).read_text() + "\n")
    two_files = [str(tmp_path / "first.jsonl"), str(write_jsonl(tmp_path / "second.jsonl", records(9)[7:]))]
    shared, node1 = str(tmp_path / "shared"), str(tmp_path / "node1")
    for node, chat_at in [("a", {2, 7}), ("a_copy", {2, 7}), ("b", {6})]:  # each "node"'s own train.jsonl
        (tmp_path / node).mkdir()
        write_jsonl(tmp_path / node / "train.jsonl", records(9, chat_at=chat_at))
    node_a, node_a_copy, node_b = str(tmp_path / "a"), str(tmp_path / "a_copy"), str(tmp_path / "b")
    cases = [
        {"name": "first", "data": good, "tokenizer": str(tiny_policy), "roots": [shared, shared], "skip_invalid": False},
        {"name": "restart", "data": good, "tokenizer": str(tiny_policy), "roots": [shared, shared], "skip_invalid": False},
        # rank 0 has the stored split, rank 1's node does not: both tokenize, neither waits on a collective alone
        {"name": "one_node_stored", "data": good, "tokenizer": str(tiny_policy), "roots": [shared, node1], "skip_invalid": False},
        {"name": "bad_in_rank1_block", "data": late, "tokenizer": str(tmp_path / "broken_tokenizer"), "roots": [None, None],
         "skip_invalid": False},
        {"name": "bad_in_both_blocks", "data": both, "tokenizer": str(tmp_path / "broken_tokenizer"), "roots": [None, None],
         "skip_invalid": False},
        {"name": "skipped_in_both_blocks", "data": both, "tokenizer": str(tmp_path / "broken_tokenizer"), "roots": [None, None],
         "skip_invalid": True},
        {"name": "unreadable_after_unrenderable", "data": mixed, "tokenizer": str(tmp_path / "broken_tokenizer"),
         "roots": [None, None], "skip_invalid": False},
        {"name": "unreadable_skipped", "data": skippable, "tokenizer": str(tmp_path / "broken_tokenizer"), "roots": [None, None],
         "skip_invalid": True},
        {"name": "two_files", "data": two_files, "tokenizer": str(tiny_policy), "roots": [None, None], "skip_invalid": False},
        {"name": "unreadable_in_both_blocks", "data": twice, "tokenizer": str(tiny_policy), "roots": [None, None],
         "skip_invalid": False},
        # a file that cannot be opened comes after the rows of the files before it (rank 1's unreadable one here)
        {"name": "missing_after_unreadable", "data": [mixed, missing], "tokenizer": str(tmp_path / "broken_tokenizer"),
         "roots": [None, None], "skip_invalid": False},
        {"name": "missing_after_unrenderable", "data": [late, missing], "tokenizer": str(tmp_path / "broken_tokenizer"),
         "roots": [None, None], "skip_invalid": False},
        # one row for two ranks: rank 0's block is empty
        {"name": "one_row", "data": str(write_jsonl(tmp_path / "one.jsonl", records(1))), "tokenizer": str(tiny_policy),
         "roots": [None, None], "skip_invalid": False},
        {"name": "bug_on_rank1", "data": good, "tokenizer": str(tiny_policy), "roots": [None, None], "skip_invalid": False,
         "bug_on_rank": 1},
        # each "node" has its own copy of train.jsonl: alike, they work as one file; different, every rank refuses
        {"name": "same_copies", "data": "train.jsonl", "tokenizer": str(tiny_policy), "roots": [None, None],
         "skip_invalid": False, "cwd": [node_a, node_a_copy]},
        {"name": "other_copy_on_rank1", "data": "train.jsonl", "tokenizer": str(tiny_policy), "roots": [None, None],
         "skip_invalid": False, "cwd": [node_a, node_b]},
        {"name": "other_copy_on_rank1_cached", "data": "train.jsonl", "tokenizer": str(tiny_policy), "roots": [shared, shared],
         "skip_invalid": False, "cwd": [node_a, node_b]},
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "worker.py").write_text(WORKER.format(root=str(ROOT)))
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  str(tmp_path / "worker.py"), str(tmp_path)], timeout=300)
    assert_ok(result)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    together = "train: tokenized by 2 ranks, a block of the records each"

    pairs, lines = alone(cases[0])
    # 9 records: the two chat prompts alone fill the 40 tokens (dropped, counted); some plain pairs are cut
    assert len(pairs) == 7 and any("truncated" in line for line in lines) and any("dropped 2" in line for line in lines)
    [stored] = (tmp_path / "shared").iterdir()
    for rank in ranks:
        assert rank["first"] == {"pairs": pairs, "lines": lines + [together]}
        assert rank["restart"] == {"pairs": pairs, "lines": lines + [f"train: tokenized pairs mapped from {stored}"]}
        assert rank["one_node_stored"] == {"pairs": pairs, "lines": lines + [together]}
    assert not (tmp_path / "node1").exists()  # only rank 0 writes

    late_error = alone(cases[3])
    assert "late.jsonl:7: the chat template renders the prompt" in late_error
    first_error = alone(cases[4])
    assert "both.jsonl:2: the chat template renders the prompt" in first_error
    skipped_pairs, skipped_lines = alone(cases[5])
    assert len(skipped_pairs) == 7 and "train: skipped 2 record(s) the chat template could not render cleanly" in skipped_lines
    for rank in ranks:
        assert rank["bad_in_rank1_block"] == {"error": late_error, "lines": []}
        assert rank["bad_in_both_blocks"] == {"error": first_error, "lines": []}
        assert rank["skipped_in_both_blocks"] == {"pairs": skipped_pairs, "lines": skipped_lines + [together]}
    unreadable_error = alone(cases[6])
    assert "mixed.jsonl:8: not valid JSON" in unreadable_error
    unreadable_pairs, unreadable_lines = alone(cases[7])
    assert "train: skipped 1 invalid record(s): not valid JSON" in unreadable_lines
    assert "train: skipped 1 invalid record(s): missing key(s) 'rejected'" in unreadable_lines
    assert "train: skipped 1 record(s) the chat template could not render cleanly" in unreadable_lines
    two_files_pairs, two_files_lines = alone(cases[8])
    assert len(two_files_pairs) == 9 and "train: 9 pairs from 2 file(s)" in two_files_lines
    twice_error = alone(cases[9])
    assert "twice.jsonl:3: not valid JSON" in twice_error
    assert alone(cases[10]) == unreadable_error
    missing_error = alone(cases[11])
    assert "missing.jsonl: data file does not exist" in missing_error
    one_row = alone(cases[12])
    assert len(one_row[0]) == 1
    for rank in ranks:
        assert rank["unreadable_in_both_blocks"] == {"error": twice_error, "lines": []}
        assert rank["missing_after_unreadable"] == {"error": unreadable_error, "lines": []}
        assert rank["missing_after_unrenderable"] == {"error": missing_error, "lines": []}
        assert rank["one_row"] == {"pairs": one_row[0], "lines": one_row[1] + [together]}
        assert rank["unreadable_after_unrenderable"] == {"error": unreadable_error, "lines": []}
        assert rank["unreadable_skipped"] == {"pairs": unreadable_pairs, "lines": unreadable_lines + [together]}
        assert rank["two_files"] == {"pairs": two_files_pairs, "lines": two_files_lines + [together]}
    assert ranks[1]["bug_on_rank1"]["error"] == "ValueError: a bug in this rank's tokenizing"
    assert ranks[0]["bug_on_rank1"]["error"] == (
        "RuntimeError: rank 1 failed while reading or tokenizing its block of the records (ValueError: a bug in this "
        "rank's tokenizing); its own output has the traceback"
    )
    host = socket.gethostname()
    refusal = (f"UserError: train: rank 1 on {host} does not read what rank 0 on {host} reads: the contents of train.jsonl "
               "differ. Give every node the same data files, tokenizer, config and dpo-dist version (copy them alike, or "
               "put them on a shared file system)")
    for rank in ranks:
        assert rank["same_copies"] == {"pairs": pairs, "lines": lines + [together]}
        assert rank["other_copy_on_rank1"] == {"error": refusal, "lines": []}
        assert rank["other_copy_on_rank1_cached"] == {"error": refusal, "lines": []}


def test_blocks_cover_the_records_once_in_order():
    for count in (0, 1, 2, 7, 9, 64):
        for ranks in (1, 2, 3, 8):
            blocks = [tokenization.TokenizeShards(rank, ranks, None, None).block(count) for rank in range(ranks)]
            assert [i for first, end in blocks for i in range(first, end)] == list(range(count))
            assert max(end - first for first, end in blocks) - min(end - first for first, end in blocks) <= 1


def test_broadcast_array_refuses_an_array_it_could_not_fill_in_place():
    import numpy as np
    import pytest
    import torch

    from dpo_dist.engine import broadcast_array

    with pytest.raises(ValueError, match="contiguous"):
        broadcast_array(np.arange(10, dtype=np.int32)[::2], 0, torch.device("cpu"))
    broadcast_array(np.arange(10, dtype=np.int32)[2:6], 0, torch.device("cpu"))  # a contiguous slice is fine
