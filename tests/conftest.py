"""Shared fixtures: a tiny random Qwen3 policy and a DIFFERENT tiny reference, saved to disk once per
session and loaded through `from_pretrained` like a real checkpoint; small preference files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from launching import thread_share  # noqa: E402

# A pytest-xdist worker's torch gets its share of the cores (read at torch's first import: the next import). Only
# in the workers: they inherit the environment of the controller, which cannot know its share.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_share(1)))

from make_tiny_qwen3 import make_checkpoint  # noqa: E402

DEMO_TRAIN = ROOT / "examples" / "data" / "demo_train.jsonl"
DEMO_EVAL = ROOT / "examples" / "data" / "demo_eval.jsonl"


# Modules of over a minute on 2 cores (`pytest --durations`), longest first: pytest-xdist's workers take whole
# modules in collection order, so these start first and the short ones fill in at the end, when a long module
# left last would keep one worker busy alone.
LONGEST_MODULES = ("test_planner.py", "test_slurm.py", "test_resume.py", "test_lora.py", "test_multirank.py",
                   "test_compile.py", "test_model_families.py", "test_precompute.py")


def pytest_collection_modifyitems(items):
    order = {name: position for position, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("models") / "policy", seed=0)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("models") / "reference", seed=1)


@pytest.fixture(scope="session")
def tokenizer(tiny_policy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CHAT_RECORD = {
    "prompt": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Sort ascending: 5 3"},
        {"role": "assistant", "content": "3 5"},
        {"role": "user", "content": "Sort ascending: 9 1 4"},
    ],
    "chosen": [{"role": "assistant", "content": "1 4 9"}],
    "rejected": [{"role": "assistant", "content": "9 4 1"}],
}
PLAIN_RECORD = {"prompt": "Sort ascending: 7 2\nAnswer:", "chosen": " 2 7", "rejected": " 7 2 7 2"}
# Pairs of different lengths: chat and plain, completions that share their first tokens (prefix sharing shares
# past the prompt), and a long prompt with a much longer rejected side (truncated by a short max_seq_length).
MIXED_RECORDS = [
    CHAT_RECORD,
    PLAIN_RECORD,
    PLAIN_RECORD | {"chosen": " 2 7 and done", "rejected": " 2 7 2"},
    {"prompt": [{"role": "user", "content": "Sort ascending: 3 1 2 " * 6}], "chosen": "1 2 3", "rejected": "3 2 1 " * 9},
]
