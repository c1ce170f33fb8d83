"""Tokenized splits kept on disk, so a restart maps them instead of tokenizing again.

Tokenizing is the slow part of a start on a big dataset (a few ms a pair, even shared by the ranks), and a
job that is preempted and requeued starts many times. The first run of a config tokenizes (the ranks a
block of the records each, `tokenization.TokenizeShards`); rank 0 also writes each split to
`<output_dir>/tokenized/<split>-<key>/` (a temp directory, renamed into place when complete, so a
directory that exists is whole). A later run whose key matches maps those files read-only
(`ExampleStore.open`): no tokenizing, and the ranks of a node share one copy of the ids.

The key is the sha256 of everything the tokenized pairs depend on: the data files' contents, the
tokenizer and its chat template, max_seq_length, truncation_mode, skip_invalid, the record kind
(preference or SFT), data.chat_template_kwargs, the source of the code that reads and tokenizes, and the
transformers and tokenizers versions (so a change to that code never meets an old cache). A key that differs
is simply another directory. The same description (`describe`, before it is hashed) is what the ranks compare
to make sure they all read the same split (`differences` says what differs, for the error).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dpo_dist.cache import fsync_path, sha256_file, sha256_text, tokenizer_changes, tokenizer_fingerprint
from dpo_dist.examples import ExampleStore

FORMAT = 1
# The modules whose code decides the tokenized pairs (not the batching and attention code, data.py and
# prefix_sharing.py: a change there keeps users' tokenized splits)
_CODE = ("records.py", "tokenization.py", "examples.py")


def _content_sha256(path: Path) -> str:
    """A file's sha256, or a saved dataset directory's: every file in it, by relative path."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_text(json.dumps([[str(p.relative_to(path)), sha256_file(p)] for p in files]))


def describe(files: list[str], tokenizer, max_seq_length: int, truncation_mode: str, skip_invalid: bool,
             record_kind: str, chat_template_kwargs: dict | None = None) -> dict | None:
    """Everything the tokenized pairs depend on, as hashes (small enough to exchange between ranks), or None
    when a data file is missing (reading it says so)."""
    paths = [Path(name) for name in files]
    if not all(path.exists() for path in paths):
        return None
    import tokenizers
    import transformers

    package = Path(__file__).parent
    return {
        "format": FORMAT,
        "code": sha256_text("".join((package / name).read_text() for name in _CODE)),
        # chat templates render, and special tokens split, by these libraries' code
        "libraries": [f"transformers {transformers.__version__}", f"tokenizers {tokenizers.__version__}"],
        "files": [[name, _content_sha256(path)] for name, path in zip(files, paths)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": [max_seq_length, truncation_mode, skip_invalid, record_kind, chat_template_kwargs or {}],
    }


def key_of(description: dict) -> str:
    """16 hex digits naming the tokenized split `description` describes: its directory's suffix."""
    return sha256_text(json.dumps(description, sort_keys=True))[:16]


def differences(first: dict, second: dict) -> list[str]:
    """What differs between two ranks' descriptions of one split, in words a user can act on."""
    found = []
    first_names, second_names = [name for name, _ in first["files"]], [name for name, _ in second["files"]]
    if first_names != second_names:  # each node brought its own config
        found.append(f"the data files the config names ({', '.join(first_names)} vs {', '.join(second_names)})")
    else:
        for (name, first_hash), (_, second_hash) in zip(first["files"], second["files"]):
            if first_hash != second_hash:
                found.append(f"the contents of {name}")
    found.extend(tokenizer_changes(first["tokenizer"], second["tokenizer"]))
    if first["settings"] != second["settings"]:
        found.append(f"the settings (max_seq_length, truncation_mode, skip_invalid, kind, chat_template_kwargs: "
                     f"{first['settings']} vs {second['settings']})")
    if first["libraries"] != second["libraries"]:
        found.append(f"the installed libraries ({', '.join(first['libraries'])} vs {', '.join(second['libraries'])})")
    if first["code"] != second["code"] or first["format"] != second["format"]:
        found.append("dpo-dist's code (another version installed)")
    return found


def read(directory: Path) -> tuple[ExampleStore, list[str]] | None:
    """The stored split and the lines its tokenization logged, or None when there is none to trust."""
    if not (directory / "report.json").is_file():
        return None
    try:
        report = json.loads((directory / "report.json").read_text())
        return ExampleStore.open(directory), report["lines"]
    except (OSError, ValueError, KeyError):  # damaged by hand or by the file system: tokenize again
        return None


def write(directory: Path, examples: ExampleStore, lines: list[str]) -> str | None:
    """Store the split under `directory` (temp directory, then rename). Returns a reason when it could not:
    the run goes on without a cache, and a later run tokenizes again."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        examples.save(tmp)
        (tmp / "report.json").write_text(json.dumps({"format": FORMAT, "pairs": len(examples), "lines": lines}))
        for path in [*tmp.iterdir(), tmp]:  # on disk before the name says "whole", as cache.write_atomic does
            fsync_path(path)
        os.replace(tmp, directory)
        fsync_path(directory.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if directory.is_dir():  # another run wrote the same key first: the same pairs
            return None
        return f"{type(err).__name__}: {err}"
    return None


def older_copies(directory: Path) -> tuple[int, int]:
    """(how many, bytes) of the other stored copies of `directory`'s split beside it: keys this run no longer
    makes (the data, tokenizer, settings or dpo-dist changed since). Never removed here: another run may still
    read one, and only the user knows."""
    split = directory.name.rsplit("-", 1)[0]  # the split names (train, eval, sft) hold no "-"
    count = size = 0
    for other in directory.parent.glob(f"{split}-*"):  # temp directories start with "." and are not matched
        if other != directory and other.is_dir():
            count += 1
            size += sum(path.stat().st_size for path in other.iterdir() if path.is_file())
    return count, size

