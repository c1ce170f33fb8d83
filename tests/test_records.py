"""Bad records fail with file:line and the reason, or are skipped and counted; uids are stable."""

import json

import pytest

from conftest import CHAT_RECORD, PLAIN_RECORD, write_jsonl
from dpo_dist.records import DataError, read_records, record_uid


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"prompt": "x", "chosen": "y"', "not valid JSON"),
        (json.dumps({"prompt": "x", "chosen": "y"}), "missing key(s) 'rejected'"),
        (json.dumps({"prompt": "x", "chosen": 3, "rejected": "z"}), "'chosen' must be a string"),
        (json.dumps({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}), "role' is 'robot'"),
        (json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}), "content' must be a string"),
        (json.dumps({"prompt": [], "chosen": "a", "rejected": "b"}), "'prompt' is an empty list"),
        (json.dumps({"prompt": 5, "chosen": "a", "rejected": "b"}), "'prompt' must be a string or a list"),
        (
            json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
            "'chosen[0]' has role 'user'; a completion holds assistant messages (and tool answers after the first)",
        ),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": [{"role": "user", "content": "q", "mood": "x"}], "chosen": "a", "rejected": "b"}),
         "'prompt[0]' must be a mapping with 'role' and 'content' (and optionally name, reasoning_content, tool_call_id, tool_calls)"),
        (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "tool", "content": "1"}], "rejected": "b"}),
         "'chosen[0]' has role 'tool'; a completion holds assistant messages"),
        (json.dumps({**CHAT_RECORD, "tools": "[{"}), "'tools' is a string but not JSON"),
        (json.dumps({**CHAT_RECORD, "tools": {"name": "f"}}), "'tools' must be a list of tool schemas"),
        (json.dumps({**CHAT_RECORD, "chat_template_kwargs": ["enable_thinking"]}), "'chat_template_kwargs' must be a mapping"),
        # Implicit prompts (no "prompt"): chosen and rejected must share a start and both go on past it.
        (json.dumps({"chosen": "blue", "rejected": "green"}), "share no start to take it from: add a 'prompt' key"),
        (json.dumps({"chosen": "Sky? Blue", "rejected": "Sky? Blue."}), "one of 'chosen' / 'rejected' is the start of the other"),
        (json.dumps({"chosen": "Sky? Blue", "rejected": "Sky? Blue"}), "'chosen' and 'rejected' are the same (a tie)"),
        (json.dumps({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"}),
         "'prompt[0].content' must be a string (null only beside tool_calls)"),
        (json.dumps({"chosen": "Sky? Blue", "rejected": [{"role": "assistant", "content": "x"}]}), "both be strings or both be chat"),
        (
            json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}),
            "'prompt' is a string but 'chosen' and 'rejected' are chat messages",
        ),
        (
            json.dumps({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}],
                        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "y"}]}),
            "ends with an assistant message; the last prompt turn must be from the user (the prompt was taken as what",
        ),
    ],
)
def test_bad_record_names_file_line_and_reason(tmp_path, bad_line, reason):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(PLAIN_RECORD) + "\n\n" + bad_line + "\n")
    with pytest.raises(DataError) as err:
        read_records([str(path)], skip_invalid=False)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ")  # blank line 2 is skipped, the count stays true
    assert reason in message
    assert "data.skip_invalid" in message


def test_skip_invalid_counts_instead_of_failing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PLAIN_RECORD, "{oops", {"prompt": "x"}, CHAT_RECORD, "{bad"])
    records, skipped = read_records([str(path)], skip_invalid=True)
    assert [r.location for r in records] == [f"{path}:1", f"{path}:4"]
    assert sum(skipped.values()) == 3 and skipped["not valid JSON"] == 2


def test_lines_that_are_not_text_are_bad_records_of_their_own(tmp_path):
    """A line that is not UTF-8, or whose JSON escapes an unpaired surrogate (valid JSON, no character), is
    refused with its file and line like any bad record, or skipped and counted; the lines around it load."""
    path = tmp_path / "train.jsonl"
    good = json.dumps(PLAIN_RECORD).encode()
    not_utf8 = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'  # latin-1, as some exports write it
    surrogate = b'{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}'
    for line, reason in ((not_utf8, f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 16)"),
                         (surrogate, f"{path}:2: holds an unpaired UTF-16 surrogate escape")):
        path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
        with pytest.raises(DataError) as err:
            read_records([str(path)], skip_invalid=False)
        assert str(err.value).startswith(reason) and "data.skip_invalid" in str(err.value)
    path.write_bytes(b"\n".join([good, not_utf8, surrogate, good]) + b"\n")
    records, skipped = read_records([str(path)], skip_invalid=True)
    assert [r.location for r in records] == [f"{path}:1", f"{path}:4"]
    assert skipped == {"not valid UTF-8": 1, "holds an unpaired UTF-16 surrogate escape": 1}


def test_missing_file_is_named(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nope.jsonl: data file does not exist"):
        read_records([str(tmp_path / "nope.jsonl")], skip_invalid=False)
    monkeypatch.chdir(tmp_path)  # a hub dataset's id, as TRL users pass it to load_dataset
    for hub_id in ("trl-lib/ultrafeedback_binarized", "allenai/tulu-2.5-preference-data"):
        with pytest.raises(DataError, match=rf"{hub_id}: data file does not exist .*; a hub dataset\? save it where it "
                                            rf"can be read: datasets.load_dataset\('{hub_id}'"):
            read_records([hub_id], skip_invalid=False)
    for path in ("data/train.jsonl", "/data"):  # a missing file, and an absolute path: no hint
        with pytest.raises(DataError) as err:
            read_records([path], skip_invalid=False)
        assert "hub dataset" not in str(err.value)


def test_json_lines_under_other_names_are_read(tmp_path):
    """Suffixes in any case (a .JSONL is parsed line by line, with line numbers), and JSON Lines under other
    names (.ndjson, none) through datasets, as before the formats were checked."""
    lines = [PLAIN_RECORD, CHAT_RECORD]
    for name in ("upper.JSONL", "d.ndjson", "noext", "d.Json"):
        path = write_jsonl(tmp_path / name, lines)
        records, _ = read_records([str(path)], skip_invalid=False)
        assert [record.prompt for record in records] == [PLAIN_RECORD["prompt"], CHAT_RECORD["prompt"]], name
    assert records[0].location == f"{tmp_path / 'd.Json'}:row 0"
    (upper,), _ = read_records([str(write_jsonl(tmp_path / "one.JSONL", [PLAIN_RECORD]))], skip_invalid=False)
    assert upper.location == f"{tmp_path / 'one.JSONL'}:1"


def test_a_format_datasets_is_not_asked_to_read_is_refused(tmp_path):
    """A .csv went to datasets' JSON reader, which printed its own failure before ours."""
    (tmp_path / "hh.csv").write_text("prompt,chosen,rejected\nq,a,b\n")
    with pytest.raises(DataError, match="hh.csv: not a format read here .*convert it"):
        read_records([str(tmp_path / "hh.csv")], skip_invalid=False)


def test_uid_is_stable_and_content_derived(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [CHAT_RECORD, PLAIN_RECORD])
    b = write_jsonl(tmp_path / "b.jsonl", [PLAIN_RECORD])
    records_a, _ = read_records([str(a)], False)
    records_b, _ = read_records([str(b)], False)
    assert records_a[1].uid == records_b[0].uid  # same content, other file and line: same uid
    assert records_a[0].uid != records_a[1].uid
    assert records_b[0].uid == record_uid(PLAIN_RECORD["prompt"], PLAIN_RECORD["chosen"], PLAIN_RECORD["rejected"])
    assert len(records_b[0].uid) == 16


def test_chat_records_keep_their_rendering_options_in_record_and_uid(tmp_path):
    """TRL's `tools` (a list, or a JSON string of it) and `chat_template_kwargs` columns: kept on chat records, and
    part of the uid (they change the tokens, so the reference cache must not serve one for the other); absent or
    null they change nothing, uid included; a plain-string record has no template to give them to."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    lines = [CHAT_RECORD, {**CHAT_RECORD, "tools": json.dumps(tools), "chat_template_kwargs": {"enable_thinking": False}},
             {**CHAT_RECORD, "tools": None, "chat_template_kwargs": None}, {**PLAIN_RECORD, "chat_template_kwargs": {"x": 1}}]
    records, _ = read_records([str(write_jsonl(tmp_path / "d.jsonl", lines))], skip_invalid=False)
    bare, options, nulls, plain = records
    assert (options.tools, options.chat_template_kwargs) == (tools, {"enable_thinking": False})
    assert bare.tools is None and bare.chat_template_kwargs is None and nulls.uid == bare.uid != options.uid
    assert plain.chat_template_kwargs is None
    # Empty options render as none: the record keeps its uid; a plain record's columns are not read at all
    (empty, junk), _ = read_records([str(write_jsonl(tmp_path / "e.jsonl", [
        {**CHAT_RECORD, "tools": [], "chat_template_kwargs": {}}, {**PLAIN_RECORD, "tools": "not json"}]))], skip_invalid=False)
    assert empty.uid == bare.uid and junk.uid == plain.uid
    # SFT records in messages form keep them too (TRL's agent SFT format)
    from dpo_dist.records import validate_sft

    sft, _ = validate_sft({"messages": CHAT_RECORD["prompt"] + CHAT_RECORD["chosen"], "tools": tools,
                           "chat_template_kwargs": {"enable_thinking": False}})
    assert sft["tools"] == tools and sft["chat_template_kwargs"] == {"enable_thinking": False}
    # A tool-calling turn, the tool's answer and a reasoning assistant turn, as chat templates read them
    calling = {"prompt": [{"role": "user", "content": "Sort 3 1"},
                          {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
                          {"role": "tool", "content": "1 3", "tool_call_id": "call_0"}],
               "chosen": [{"role": "assistant", "content": "1 3", "reasoning_content": "The tool sorted them."}],
               "rejected": [{"role": "assistant", "content": "3 1"}], "tools": tools}
    # and an agent's trajectory as the completion: a tool call, the tool's answer, the answer (TRL trains on it whole)
    trajectory = {"prompt": calling["prompt"][:1], "chosen": calling["prompt"][1:] + calling["chosen"],
                  "rejected": calling["rejected"]}
    (record, agent), _ = read_records([str(write_jsonl(tmp_path / "tools.jsonl", [calling, trajectory]))], skip_invalid=False)
    assert record.prompt[2]["tool_call_id"] == "call_0" and record.chosen[0]["reasoning_content"]
    assert [message["role"] for message in agent.chosen] == ["assistant", "tool", "assistant"]
    assert plain.uid == record_uid(PLAIN_RECORD["prompt"], PLAIN_RECORD["chosen"], PLAIN_RECORD["rejected"])


def test_string_completion_under_chat_prompt_becomes_assistant_turn(tmp_path):
    raw = {"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"}
    records, _ = read_records([str(write_jsonl(tmp_path / "c.jsonl", [raw]))], False)
    assert records[0].chosen == [{"role": "assistant", "content": "yes"}]
    assert records[0].conversational


def _implicit(record: dict) -> dict:
    return {"chosen": record["prompt"] + record["chosen"], "rejected": record["prompt"] + record["rejected"]}


USER = {"role": "user", "content": "What colour is the sky?"}
IMPLICIT_RECORDS = [
    _implicit(PLAIN_RECORD),
    _implicit(CHAT_RECORD),
    # hh-rlhf style: the completions share their first words, which TRL's split puts in the prompt
    {"chosen": "\n\nHuman: Sky?\n\nAssistant: It is blue.", "rejected": "\n\nHuman: Sky?\n\nAssistant: It is green."},
    # ultrafeedback_binarized style: a string prompt, and the whole conversation in chosen and rejected
    {"prompt": USER["content"], "chosen": [USER, {"role": "assistant", "content": "Blue."}],
     "rejected": [USER, {"role": "assistant", "content": "Green."}]},
]


def test_implicit_prompt_is_split_as_trl_splits_it(tmp_path):
    """Records whose prompt is only inside chosen and rejected get the prompt, chosen and rejected TRL's
    DPOTrainer trains on (trl.maybe_extract_prompt, the independent computation), and a pair written both
    ways has one uid, so a reference cache made from either serves both."""
    from trl.data_utils import maybe_extract_prompt

    path = write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT_RECORDS)
    records, _ = read_records([str(path)], skip_invalid=False)
    assert len(records) == len(IMPLICIT_RECORDS)
    for record, raw in zip(records, IMPLICIT_RECORDS):
        expected = maybe_extract_prompt(dict(raw))
        assert (record.prompt, record.chosen, record.rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    assert records[2].prompt.endswith("Assistant: It is") and records[2].chosen == " blue."
    explicit, _ = read_records([str(write_jsonl(tmp_path / "explicit.jsonl", [PLAIN_RECORD, CHAT_RECORD]))], False)
    assert [r.uid for r in records[:2]] == [r.uid for r in explicit]


def test_json_and_parquet_through_datasets(tmp_path):
    import datasets

    rows = [PLAIN_RECORD, PLAIN_RECORD | {"chosen": " 2 7 !"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.parquet", "saved"):
        records, _ = read_records([str(tmp_path / name)], False)
        assert [r.chosen for r in records] == [" 2 7", " 2 7 !"], name
        assert records[1].location == f"{tmp_path / name}:row 1"


def test_row_blocks_read_each_row_once_in_file_order(tmp_path):
    """What several ranks reading a split together rely on: `count_rows` numbers rows as reading does (a blank line
    is a row, a last line without its newline is one), and the blocks of any split of the rows, read one after
    the other, give exactly what reading everything gives, with the same locations and the same skips."""
    import datasets

    from dpo_dist.records import RowBlock, count_rows

    rows = [PLAIN_RECORD | {"chosen": f" 2 7{' 1' * i}"} for i in range(8)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows[:3] + ["", '{"prompt": "x"', rows[3]])
    no_newline = tmp_path / "b.jsonl"
    no_newline.write_text(json.dumps(rows[4]) + "\n" + json.dumps(rows[5]))
    datasets.Dataset.from_list(rows[6:]).to_parquet(str(tmp_path / "c.parquet"))
    files = [str(jsonl), str(no_newline), str(tmp_path / "c.parquet")]
    counts, unopened = count_rows(files)
    assert counts == [6, 2, 2] and unopened is None
    whole, skipped = read_records(files, skip_invalid=True)
    assert [r.chosen for r in whole] == [r["chosen"] for r in rows] and skipped == {"not valid JSON": 1}
    total = sum(counts)
    for parts in (2, 3, 4, 10):
        read, skips = [], {}
        for part in range(parts):
            block = RowBlock(total * part // parts, total * (part + 1) // parts, tuple(counts))
            block_records, block_skipped = read_records(files, True, block=block)
            read += block_records
            for reason, count in block_skipped.items():
                skips[reason] = skips.get(reason, 0) + count
        assert [(r.uid, r.location) for r in read] == [(r.uid, r.location) for r in whole], parts
        assert list(skips.items()) == list(skipped.items()), parts  # the reasons in file order too
    # The first file that cannot be opened ends the count: the rows before it, and its error
    counts, unopened = count_rows([str(jsonl), str(tmp_path / "nope.jsonl"), str(no_newline)])
    assert counts == [6] and "nope.jsonl: data file does not exist" in str(unopened)
    (tmp_path / "dir.jsonl").mkdir()
    counts, unopened = count_rows([str(tmp_path / "dir.jsonl")])
    assert counts == [] and "dir.jsonl: is not a file" in str(unopened)


@pytest.mark.parametrize("content", [b"", b"\n", b"\n\n", b"a", b"a\n", b"a\r\nb\r\n", b"a\rb\n", b"abcdefgh\nij",
                                     b"abcdefg\n", b"abcdefgh", b"abc\ndefgh\n\nijklmnopq\nr"])
def test_count_rows_counts_the_lines_reading_yields(tmp_path, monkeypatch, content):
    """Across the counting's read boundaries too (8-byte reads here): a line is what iterating the file yields."""
    from dpo_dist import records

    monkeypatch.setattr(records, "JSONL_COUNT_CHUNK", 8)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with path.open("rb") as handle:
        lines = sum(1 for _ in handle)
    assert records.count_rows([str(path)]) == ([lines], None)


def test_a_tool_call_with_null_content_is_read_and_a_template_that_cannot_render_it_names_the_record(tiny_policy, tmp_path):
    """OpenAI-style tool calls leave the calling message's content null (Qwen's templates render it as empty). A
    template that cannot read it raises inside jinja; that is the record's error, with its line, not a traceback."""
    from transformers import AutoTokenizer

    from dpo_dist.tokenization import tokenize_records

    calling = {"prompt": [{"role": "user", "content": "Sort 3 1"},
                          {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
                          {"role": "tool", "content": "1 3"}],
               "chosen": [{"role": "assistant", "content": "1 3"}], "rejected": [{"role": "assistant", "content": "3 1"}]}
    records, _ = read_records([str(write_jsonl(tmp_path / "calls.jsonl", [PLAIN_RECORD, calling]))], skip_invalid=False)
    assert records[1].prompt[1]["content"] is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)  # its short template reads message['content'] as a string
    with pytest.raises(DataError, match=r"calls.jsonl:2: the tokenizer's chat template cannot render it: UndefinedError"):
        tokenize_records(records, tokenizer, 256, "keep_start", skip_invalid=False)
    examples, _, failures = tokenize_records(records, tokenizer, 256, "keep_start", skip_invalid=True)
    assert len(examples) == 1 and failures == 1
