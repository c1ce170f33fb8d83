"""Read preference records from disk and check their shape, naming file and line on any problem.

A record is `{"prompt": P, "chosen": C, "rejected": R}` where P is a string or a list of chat
messages (`{"role": ..., "content": ...}`, system/user/assistant/tool), and C, R are strings or
lists of assistant messages. A string completion under a chat prompt is taken as one assistant
message. As in TRL, the prompt may be implicit: without a "prompt" (or with a string prompt beside
chat-message completions, as some hub datasets have it) the prompt is what chosen and rejected share
at their start (`split_implicit_prompt`). Each record gets a `uid` from its content after that split,
so the same pair has the same id in every run, on every rank, and in the reference cache.

Formats: `.jsonl` is parsed here line by line (so errors give the line); `.json` and `.parquet`
go through `datasets` (errors give the row); a directory is a dataset saved with
`datasets.Dataset.save_to_disk`.

Several ranks read a split together (tokenization.py): `count_rows` gives each file's rows (a JSONL file's
lines, blank ones included, counted without parsing; a dataset's rows) and `read_records` with a `RowBlock`
parses and checks only the block's rows, so no rank parses or holds every JSONL record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dpo_dist.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
# What else a message may hold for chat templates to render: tool calls and their results, and an assistant turn's
# reasoning (Qwen3's template reads reasoning_content)
MESSAGE_EXTRAS = {"name", "tool_calls", "tool_call_id", "reasoning_content"}


class DataError(UserError):
    """A record that cannot be used; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Record:
    """One validated preference pair and where it came from."""

    uid: str
    location: str  # "file:line" or "file:row N", for error messages
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]
    # Chat records only, as TRL's dataset columns: the tool schemas and the keyword arguments (Qwen3's
    # enable_thinking, ...) the chat template renders the record with
    tools: list[dict] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def record_uid(prompt: Any, chosen: Any, rejected: Any, tools: Any = None, chat_template_kwargs: Any = None) -> str:
    """A stable id from the pair's content: canonical JSON, sha256, first 16 hex digits. The rendering options
    count only where given, so a record without them keeps the id it always had."""
    content = [prompt, chosen, rejected]
    if tools is not None or chat_template_kwargs is not None:
        content.append({"tools": tools, "chat_template_kwargs": chat_template_kwargs})
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _check_messages(value: Any, field: str, completion: bool) -> str | None:
    """The reason a message list is malformed, or None."""
    if not value:
        return f"'{field}' is an empty list"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} - MESSAGE_EXTRAS:
            return (f"'{field}[{i}]' must be a mapping with 'role' and 'content' (and optionally "
                    f"{', '.join(sorted(MESSAGE_EXTRAS))})")
        if message.get("role") not in ROLES:
            return f"'{field}[{i}].role' is {message.get('role')!r}; expected one of {', '.join(ROLES)}"
        # OpenAI-style tool calls leave the calling message's content null (Qwen's templates render it as empty)
        tool_call = message.get("content") is None and bool(message.get("tool_calls"))
        if not isinstance(message.get("content"), str) and not tool_call:
            return f"'{field}[{i}].content' must be a string (null only beside tool_calls)"
        # A completion is the assistant's turn: its messages, and in an agent's trajectory the tools' answers
        # between them (scored too, as TRL scores the whole rest of the conversation)
        completion_roles = ("assistant",) if i == 0 else ("assistant", "tool")
        if completion and message["role"] not in completion_roles:
            return (f"'{field}[{i}]' has role {message['role']!r}; a completion holds assistant messages (and tool "
                    "answers after the first)")
    return None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | str:
    """(prompt, chosen, rejected) from two sequences that both start with the prompt, or the reason there is none.

    TRL's rule (trl.extract_prompt), so both tools train on the same split: the prompt is the longest common
    prefix, in characters for strings and in whole messages for chat lists; a string prompt that would end
    in a space gives that space to the completions. validate then checks the three parts like any explicit
    record."""
    both_strings = isinstance(chosen, str) and isinstance(rejected, str)
    if not both_strings and not (_is_messages(chosen) and _is_messages(rejected)):
        return "'chosen' and 'rejected' must both be strings or both be chat message lists"
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if both_strings and 0 < shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0:
        return "no 'prompt', and 'chosen' and 'rejected' share no start to take it from: add a 'prompt' key"
    if chosen == rejected:
        return "no 'prompt', and 'chosen' and 'rejected' are the same (a tie): there is nothing to prefer"
    if shared == len(chosen) or shared == len(rejected):
        return "no 'prompt', and one of 'chosen' / 'rejected' is the start of the other: nothing is left to compare"
    return chosen[:shared], chosen[shared:], rejected[shared:]


RENDERING_COLUMNS = ("tools", "chat_template_kwargs")  # TRL's per-record columns for the chat template


def _rendering_options(raw: dict) -> tuple[dict, str | None]:
    """A record's optional `tools` (a list of tool schemas, or that list as a JSON string, as TRL reads it) and
    `chat_template_kwargs` (a mapping), for `Record`; absent or null ones are left out."""
    options = {}
    tools = raw.get("tools") or None  # an empty list (or string) renders as none: the record keeps its uid
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            return {}, f"'tools' is a string but not JSON ({err.msg} at column {err.colno})"
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            return {}, "'tools' must be a list of tool schemas (JSON objects), or that list as a JSON string"
        options["tools"] = tools
    kwargs = raw.get("chat_template_kwargs")
    if kwargs:
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            return {}, ("'chat_template_kwargs' must be a mapping of the chat template's arguments, e.g. "
                        "{\"enable_thinking\": false}")
        options["chat_template_kwargs"] = kwargs
    return options, None


def validate(raw: Any) -> tuple[dict | None, str | None]:
    """Check one parsed record. Returns (normalised record, None) or (None, reason). A chat record keeps its
    rendering options (`_rendering_options`); a plain-string one has no template to pass them to (TRL's rule too)."""
    if not isinstance(raw, dict):
        return None, f"expected a JSON object, got {type(raw).__name__}"
    record, reason = _validate_pair(raw)
    if record is None or not isinstance(record["prompt"], list):
        return record, reason
    options, reason = _rendering_options(raw)
    return (None, reason) if reason else (record | options, None)


def _validate_pair(raw: dict) -> tuple[dict | None, str | None]:
    """`validate` for the prompt, chosen and rejected."""
    missing = [key for key in ("chosen", "rejected") if raw.get(key) is None]
    if missing:
        return None, (f"missing key(s) {', '.join(repr(k) for k in missing)} (each record needs chosen and rejected, "
                      "and a prompt unless both start with it)")
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    # TRL also ignores a string prompt beside chat-message completions: such datasets repeat it inside both.
    if prompt is None or (isinstance(prompt, str) and _is_messages(chosen) and _is_messages(rejected)):
        split = split_implicit_prompt(chosen, rejected)
        if isinstance(split, str) and prompt is not None:
            return None, ("'prompt' is a string but 'chosen' and 'rejected' are chat messages that do not start with "
                          "the same turns: give 'prompt' as chat messages, or begin both completions with the prompt's turns")
        if isinstance(split, str):
            return None, split
        record, reason = _validate_pair(dict(zip(("prompt", "chosen", "rejected"), split)))
        return record, reason and f"{reason} (the prompt was taken as what 'chosen' and 'rejected' share at their start)"
    if isinstance(prompt, list):
        reason = _check_messages(prompt, "prompt", completion=False)
        if reason:
            return None, reason
        if prompt[-1]["role"] == "assistant":
            return None, "'prompt' ends with an assistant message; the last prompt turn must be from the user"
        # A plain-string completion under a chat prompt is one assistant turn.
        chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
        rejected = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, list):
                return None, f"'{name}' must be a string or a list of assistant messages"
            reason = _check_messages(value, name, completion=True)
            if reason:
                return None, reason
    elif isinstance(prompt, str):
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                return None, f"'{name}' must be a string when 'prompt' is a string"
            # An empty completion is kept, as TRL keeps it: with the EOS appended it is the answer "stop here"
    else:
        return None, "'prompt' must be a string or a list of chat messages"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def validate_sft(raw: Any) -> tuple[dict | None, str | None]:
    """An SFT record, `{"prompt": P, "completion": C}` or `{"messages": [...]}` (the last assistant turn is
    the completion), normalised as a pair whose chosen and rejected are both the completion."""
    if isinstance(raw, dict) and "messages" in raw and "prompt" not in raw:
        messages = raw["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            return None, "'messages' must be a chat list ending with an assistant turn"
        raw = {**raw, "prompt": messages[:-1], "completion": messages[-1:]}
    if not isinstance(raw, dict) or raw.get("prompt") is None or raw.get("completion") is None:
        return None, "an SFT record needs 'prompt' and 'completion' (or 'messages')"
    options = {key: raw[key] for key in RENDERING_COLUMNS if key in raw}
    return validate({"prompt": raw["prompt"], "chosen": raw["completion"], "rejected": raw["completion"], **options})


@dataclass(frozen=True)
class RowBlock:
    """Rows [first, end) of the files' rows taken in file order; `file_rows` is `count_rows`' answer for them."""

    first: int
    end: int
    file_rows: tuple[int, ...]

    def in_file(self, index: int) -> tuple[int, int]:
        """[first, end) of file `index`'s own rows that the block holds (first == end: none)."""
        offset, count = sum(self.file_rows[:index]), self.file_rows[index]
        return min(max(self.first - offset, 0), count), min(max(self.end - offset, 0), count)


# Files that are not JSON: `datasets`' JSON reader, which reads every other file here, would fail on them
NOT_JSON_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow", ".xlsx", ".xls")


def _check_exists(path: Path) -> None:
    if not path.exists():
        # org/name (dots allowed: tulu-2.5-preference-data), as TRL users pass a hub dataset's id to load_dataset
        hub_id = (not path.is_absolute() and len(path.parts) == 2 and not path.name.startswith(".")
                  and path.suffix.lower() not in (".jsonl", ".json", ".parquet", ".gz"))
        hint = (f"; a hub dataset? save it where it can be read: datasets.load_dataset('{path}', split='train')"
                ".save_to_disk(DIR), and give DIR" if hub_id else "")
        raise DataError(f"{path}: data file does not exist (check data.train_files / data.eval_files){hint}")
    if _is_jsonl(path) and not path.is_file():
        raise DataError(f"{path}: is not a file; a .jsonl path must be a JSONL file (check data.train_files / data.eval_files)")
    if path.is_file() and path.suffix.lower() in NOT_JSON_SUFFIXES:
        raise DataError(f"{path}: not a format read here (JSON Lines, JSON, Parquet, or a directory datasets' "
                        "save_to_disk wrote): convert it, e.g. datasets.load_dataset('csv', data_files=...)"
                        "['train'].to_json('data.jsonl')")


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


JSONL_COUNT_CHUNK = 1 << 24  # bytes read at a time while counting a JSONL file's lines


def count_rows(paths: list[str]) -> tuple[list[int], DataError | None]:
    """Each file's rows, as `read_records` numbers them: a JSONL file's lines (what iterating it yields; blank lines
    count and are skipped when read), counted from its bytes without parsing; a dataset's rows (`datasets` loads
    it). Stops at the first file that cannot be opened: the counts of the files before it, and its error, which a
    process reading alone would raise only after reading those files' rows."""
    counts = []
    for name in paths:
        path = Path(name)
        try:
            _check_exists(path)
            if not _is_jsonl(path):
                counts.append(len(_load_dataset(path)))
                continue
            lines, last = 0, b"\n"
            with path.open("rb") as handle:
                while chunk := handle.read(JSONL_COUNT_CHUNK):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
        except DataError as err:
            return counts, err
        counts.append(lines + (last != b"\n"))  # a last line without its newline is a line
    return counts, None


def _jsonl_rows(path: Path, first: int = 0, end: int | None = None) -> Iterator[tuple[str, Any, str | None]]:
    """Lines [first, end) (0-based; all by default), each as (location, parsed record, parse error)."""
    # Bytes, decoded line by line: one line that is not UTF-8 is that line's error, not the file's
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if line_number <= first:
                continue  # another rank's row: not decoded or parsed
            if end is not None and line_number > end:
                return
            location = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield location, None, f"not valid UTF-8 (byte 0x{raw_line[err.start]:02x} at byte {err.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line), None
            except json.JSONDecodeError as err:
                yield location, None, f"not valid JSON ({err.msg} at column {err.colno})"


def _load_dataset(path: Path):
    import datasets  # imported here: slow to import and only needed for these formats

    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        else:
            builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as a {path.suffix or 'saved'} dataset: {err}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: holds several splits ({', '.join(dataset)}); point at one split's directory")
    return dataset


def _dataset_rows(path: Path, first: int = 0, end: int | None = None) -> Iterator[tuple[str, Any, str | None]]:
    """Rows [first, end) (all by default), each as (location, record, None)."""
    dataset = _load_dataset(path)
    end = len(dataset) if end is None else end
    if (first, end) != (0, len(dataset)):
        dataset = dataset.select(range(first, end))
    for row, item in enumerate(dataset, start=first):
        yield f"{path}:row {row}", item, None


def read_records(paths: list[str], skip_invalid: bool, validator=validate, block: RowBlock | None = None,
                 chat_template_kwargs: dict | None = None) -> tuple[list[Record], dict[str, int]]:
    """All valid records from `paths` (only the rows of `block`, when given), in file order, and the count of
    skipped ones by reason. `chat_template_kwargs` (data.chat_template_kwargs) goes to every chat record that
    has none of its own, before its uid is made.

    Without `skip_invalid` the first bad record raises `DataError` naming its file and line.
    `validator` is `validate` for preference pairs, `validate_sft` for SFT records.
    """
    records: list[Record] = []
    skipped: dict[str, int] = {}
    for index, name in enumerate(paths):
        path = Path(name)
        _check_exists(path)  # every file, in or out of the block: every rank names the same missing one
        first, end = block.in_file(index) if block else (0, None)
        if block and first == end:
            continue
        rows = _jsonl_rows(path, first, end) if _is_jsonl(path) else _dataset_rows(path, first, end)
        for location, raw, parse_error in rows:
            normalised, reason = (None, parse_error) if parse_error else validator(raw)
            if not reason and chat_template_kwargs and isinstance(normalised["prompt"], list):
                normalised.setdefault("chat_template_kwargs", chat_template_kwargs)
            if not reason:
                try:
                    uid = record_uid(**normalised)
                except UnicodeEncodeError:  # JSON's "\\ud800" escapes parse to a lone surrogate, which is no character
                    reason = "holds an unpaired UTF-16 surrogate escape (such as \\ud800), which is no character"
            if reason:
                if not skip_invalid:
                    raise DataError(f"{location}: {reason}. Fix the record, or set data.skip_invalid: true to skip it")
                skipped[reason.split(" (")[0]] = skipped.get(reason.split(" (")[0], 0) + 1
                continue
            records.append(Record(uid=uid, location=location, **normalised))
    return records, skipped
