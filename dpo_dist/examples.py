"""Tokenized preference pairs, and a compact store of many of them.

Every rank holds every pair of its splits (each epoch reshuffles which pairs a rank trains on). As Python
lists of ints, a token costs 36 bytes where Qwen's 151,936-token vocabulary puts nearly every id above
Python's small-int cache (an 8-byte list slot and a 28-byte int): 100k pairs of 2 x 3k tokens are ~22 GB per
rank, eight ranks to a node. `ExampleStore` keeps the ids in one int32 array (4 bytes a token) and hands
out `PreferenceExample`s with lists only for the pairs a batch asks for. `save` writes the arrays as raw
files and `ExampleStore.open` maps them read-only, so the ranks of a node share one copy in the page cache.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The arrays on disk: file name, array typecode, numpy dtype (native byte order).
_FILES = (("tokens.i32", "i", np.int32), ("starts.i64", "q", np.int64), ("shape.i32", "i", np.int32))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids two sequences share: where a completion starts (tokenization) and where a pair's
    chosen and rejected sequences part (prefix sharing)."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized pair: each side is prompt + completion ids after truncation."""

    uid: str
    chosen_ids: list[int]
    chosen_prompt_len: int  # tokens of chosen_ids before the completion
    rejected_ids: list[int]
    rejected_prompt_len: int

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


class ExampleStore(Sequence):
    """An immutable sequence of `PreferenceExample`s whose token ids live in one int32 array.

    Indexing builds the example (two list copies of its ids); `token_counts` and `uids` answer without
    building any. Fill one with `append`/`extend`, then read it; one that `open` mapped or `from_arrays` made is read-only."""

    def __init__(self, examples: Iterable[PreferenceExample] = ()):
        self._uids: list[str] = []
        self._tokens = array("i")  # per pair: chosen ids, then rejected ids
        self._starts = array("q", [0])  # pair i's ids are _tokens[_starts[i]:_starts[i + 1]]
        self._shape = array("i")  # per pair: len(chosen_ids), chosen_prompt_len, rejected_prompt_len
        self.extend(examples)

    def save(self, directory: Path) -> None:
        """The arrays as raw files and the uids as JSON, in `directory` (which the caller renames into place)."""
        for (name, _, _), part in zip(_FILES, (self._tokens, self._starts, self._shape)):
            (directory / name).write_bytes(part.tobytes())
        (directory / "uids.json").write_text(json.dumps(self._uids))

    @classmethod
    def open(cls, directory: Path) -> "ExampleStore":
        """A read-only store over the files `save` wrote, memory-mapped (an empty array is read, not mapped)."""
        parts = []
        for name, typecode, dtype in _FILES:
            path = directory / name
            parts.append(np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else array(typecode))
        try:
            return cls.from_arrays(json.loads((directory / "uids.json").read_text()), *parts)
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from None

    @classmethod
    def from_arrays(cls, uids: list[str], tokens, starts, shape) -> "ExampleStore":
        """A read-only store over filled arrays (as `arrays` gives them: numpy or `array`), checked to agree."""
        if not (len(starts) == len(uids) + 1 == len(shape) // 3 + 1 and starts[0] == 0 and starts[-1] == len(tokens)):
            raise ValueError("the stored arrays do not agree with each other")
        store = cls()
        store._uids, store._tokens, store._starts, store._shape = uids, tokens, starts, shape
        return store

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, pair starts, per-pair shape) as numpy arrays over the store's own memory (no copy)."""
        return tuple(np.frombuffer(part, dtype=dtype) if isinstance(part, array) else part
                     for part, (_, _, dtype) in zip((self._tokens, self._starts, self._shape), _FILES))

    def append(self, example: PreferenceExample) -> None:
        self._uids.append(example.uid)
        self._tokens.extend(example.chosen_ids)
        self._tokens.extend(example.rejected_ids)
        self._starts.append(len(self._tokens))
        self._shape.extend((len(example.chosen_ids), example.chosen_prompt_len, example.rejected_prompt_len))

    def extend(self, examples: Iterable[PreferenceExample]) -> None:
        for example in examples:
            self.append(example)

    def __len__(self) -> int:
        return len(self._uids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        start, end = int(self._starts[index]), int(self._starts[index + 1])
        chosen_len, chosen_prompt_len, rejected_prompt_len = (int(n) for n in self._shape[3 * index : 3 * index + 3])
        return PreferenceExample(
            self._uids[index],
            self._tokens[start : start + chosen_len].tolist(),
            chosen_prompt_len,
            self._tokens[start + chosen_len : end].tolist(),
            rejected_prompt_len,
        )

    @property
    def uids(self) -> list[str]:
        return list(self._uids)

    def completion_lengths(self) -> Iterator[tuple[str, int, int]]:
        """(uid, chosen completion tokens, rejected completion tokens) of every pair, without building any."""
        for index, uid in enumerate(self._uids):
            chosen_len, chosen_prompt_len, rejected_prompt_len = (int(n) for n in self._shape[3 * index : 3 * index + 3])
            rejected_len = int(self._starts[index + 1] - self._starts[index]) - chosen_len
            yield uid, chosen_len - chosen_prompt_len, rejected_len - rejected_prompt_len

    @property
    def token_counts(self) -> list[int]:
        """`num_tokens` of every pair (chosen + rejected), without building the examples."""
        return [int(self._starts[i + 1] - self._starts[i]) for i in range(len(self))]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (token ids and the per-pair numbers); the uid strings come on top."""
        return sum(part.itemsize * len(part) for part in (self._tokens, self._starts, self._shape))
