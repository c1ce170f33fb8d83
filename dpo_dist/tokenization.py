"""Records -> tokenized pairs, the way TRL's DPOTrainer tokenizes them; a split loaded, stored and shared.

Rendering follows TRL so the numbers of the two tools compare:
- chat records: the prompt is rendered with the chat template and the generation prompt; the
  prompt + completion conversation is rendered in full. The rendered prompt must be a prefix of
  the rendered conversation (a template that renders the prompt differently alone, as Qwen3's
  thinking tags can, fails here with the record's location instead of training on a context the
  model never sees at inference).
- plain strings: the prompt and prompt + completion are tokenized as text; EOS is appended to a
  completion that does not already end with it.
The completion starts where the tokenized prompt and the tokenized prompt + completion first
differ (usually right after the prompt; earlier when tokens merge across the boundary).

Truncation (as TRL's collator): each prompt + completion sequence is cut to `max_seq_length`,
keeping its start (`keep_start`, the default) or its end (`keep_end`). With `keep_start`, a pair
whose prompt alone fills the budget has no completion left; it is dropped and counted (the
count is logged), never silently. With `keep_end` a completion longer than the budget keeps none of
its prompt; such pairs are counted and logged too.

`load_examples` reads, validates and tokenizes one split into an `ExampleStore`, logging what was skipped,
cut or dropped; it maps a split stored before instead (split_cache.py), and on several ranks has them
tokenize a block of the records each and exchange the blocks (`TokenizeShards`). The batches made from the
pairs are data.py's.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2  # what transformers renders chat templates with; torch requires it, so it is always installed
import numpy as np

from dpo_dist import split_cache
from dpo_dist.errors import UserError
from dpo_dist.examples import ExampleStore, PreferenceExample, common_prefix_length
from dpo_dist.records import DataError, Record, RowBlock, count_rows, read_records, validate

# Records rendered and encoded together: one tokenizer call per side for this many records (a fast tokenizer
# encodes a batch on all its threads; one text per call runs on one) while the texts held stay small.
ENCODE_BATCH_RECORDS = 256


@dataclass
class TokenizeStats:
    total: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    prompt_cut_off: int = 0  # keep_end: pairs with a side whose whole prompt the cut removed
    boundary_merges: int = 0  # pairs whose completion starts before the end of the tokenized prompt

    def add(self, other: "TokenizeStats") -> None:
        for counter in dataclasses.fields(self):
            setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))


@dataclass(frozen=True)
class TokenizeShards:
    """The ranks that tokenize a split together: rank `rank` of `count` tokenizes one contiguous block of the
    records; `gather` (engine.gather_from_each) hands every rank each rank's small object, and `broadcast`
    (engine.broadcast_array) fills a numpy array on every rank with one rank's contents, in place. Both are
    collectives every rank calls alike."""

    rank: int
    count: int
    gather: Callable[[object], list]
    broadcast: Callable[[np.ndarray, int], None]

    def block(self, num_records: int) -> tuple[int, int]:
        """[first, end) of the records this rank tokenizes."""
        return num_records * self.rank // self.count, num_records * (self.rank + 1) // self.count


def render_texts(record: Record, tokenizer) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text, rendered as TRL renders them."""
    if not record.conversational:
        eos = tokenizer.eos_token
        chosen = record.chosen if record.chosen.endswith(eos) else record.chosen + eos
        rejected = record.rejected if record.rejected.endswith(eos) else record.rejected + eos
        return record.prompt, record.prompt + chosen, record.prompt + rejected
    if tokenizer.chat_template is None:
        raise DataError(
            f"{record.location}: the record is a chat conversation but the tokenizer has no chat template; "
            "use a tokenizer with one (Qwen's instruct tokenizers have it) or plain-string records"
        )
    options = {"tools": record.tools, **(record.chat_template_kwargs or {})}  # as TRL passes a record's columns
    try:
        prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True, **options)
        full_chosen = tokenizer.apply_chat_template(record.prompt + record.chosen, tokenize=False, **options)
        full_rejected = tokenizer.apply_chat_template(record.prompt + record.rejected, tokenize=False, **options)
    except TypeError as err:  # a chat_template_kwargs key that apply_chat_template itself takes, with a wrong value
        raise DataError(f"{record.location}: the chat template cannot render it with chat_template_kwargs "
                        f"{record.chat_template_kwargs}: {err}") from None
    except jinja2.TemplateError as err:  # the template's own refusal (raise_exception), or a message it cannot read
        raise DataError(f"{record.location}: the tokenizer's chat template cannot render it: "
                        f"{type(err).__name__}: {err}") from None
    for name, full in (("chosen", full_chosen), ("rejected", full_rejected)):
        if not full.startswith(prompt):
            raise DataError(
                f"{record.location}: the chat template renders the prompt (with the generation prompt) "
                f"differently from the start of prompt + {name}, so the completion has no clean start. "
                f"Prompt ends with {prompt[-40:]!r}; the conversation continues {full[len(prompt) - 40:len(prompt)]!r}. "
                "Qwen3's template does this with thinking tags: give every record the same "
                "\"chat_template_kwargs\": {\"enable_thinking\": ...}, or use a template whose generation prompt "
                "matches how it renders the assistant turn"
            )
    return prompt, full_chosen, full_rejected


def _encode(tokenizer, texts: list[str], conversational: bool) -> list[list[int]]:
    # Chat text already holds its special tokens; plain text gets the tokenizer's own (TRL does the same).
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=not conversational)["input_ids"]


def _truncate(ids: list[int], prompt_len: int, max_len: int, mode: str) -> tuple[list[int], int]:
    if len(ids) <= max_len:
        return ids, prompt_len
    if mode == "keep_start":
        return ids[:max_len], min(prompt_len, max_len)
    cut = len(ids) - max_len
    return ids[cut:], max(prompt_len - cut, 0)


def example_from_ids(record: Record, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                     max_seq_length: int, truncation_mode: str, stats: TokenizeStats) -> PreferenceExample | None:
    """One record's encoded prompt, prompt + chosen and prompt + rejected -> `PreferenceExample`, or None when
    truncation leaves no completion token."""
    prompt_len = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    stats.total += 1
    stats.boundary_merges += prompt_len < len(prompt_ids)
    if len(chosen_ids) == prompt_len or len(rejected_ids) == prompt_len:
        raise DataError(f"{record.location}: a completion renders to no tokens")
    if prompt_len == 0 and min(len(chosen_ids), len(rejected_ids)) == 1:  # e.g. an empty prompt and answer: the EOS
        raise DataError(f"{record.location}: the prompt renders to no tokens and a completion to one, which then has "
                        "no token before it to be predicted from (its log-prob would be an empty sum): give a prompt")
    stats.truncated += max(len(chosen_ids), len(rejected_ids)) > max_seq_length
    chosen_ids, chosen_prompt_len = _truncate(chosen_ids, prompt_len, max_seq_length, truncation_mode)
    rejected_ids, rejected_prompt_len = _truncate(rejected_ids, prompt_len, max_seq_length, truncation_mode)
    if chosen_prompt_len >= len(chosen_ids) or rejected_prompt_len >= len(rejected_ids):
        stats.dropped_prompt_too_long += 1
        return None
    stats.prompt_cut_off += prompt_len > 0 and min(chosen_prompt_len, rejected_prompt_len) == 0
    return PreferenceExample(record.uid, chosen_ids, chosen_prompt_len, rejected_ids, rejected_prompt_len)


def tokenize_record(record: Record, tokenizer, max_seq_length: int, truncation_mode: str, stats: TokenizeStats):
    """One record -> `PreferenceExample`, or None when truncation leaves no completion token."""
    texts = render_texts(record, tokenizer)
    prompt_ids, chosen_ids, rejected_ids = _encode(tokenizer, list(texts), record.conversational)
    return example_from_ids(record, prompt_ids, chosen_ids, rejected_ids, max_seq_length, truncation_mode, stats)


def _encode_rendered(tokenizer, rendered: list[tuple[Record, tuple[str, str, str]]]) -> list[tuple[list[int], ...]]:
    """The (prompt, chosen, rejected) ids of each rendered record, in the records' order: one tokenizer call per
    side for the chat records and one for the plain ones (they differ in special tokens)."""
    encoded: list[tuple[list[int], ...]] = [()] * len(rendered)
    for conversational in (True, False):
        positions = [i for i, (record, _) in enumerate(rendered) if record.conversational == conversational]
        sides = [_encode(tokenizer, [rendered[i][1][side] for i in positions], conversational) for side in range(3)]
        for i, ids in zip(positions, zip(*sides)):
            encoded[i] = ids
    return encoded


def tokenize_records(records: list[Record], tokenizer, max_seq_length: int, truncation_mode: str, skip_invalid: bool):
    """All records -> an `ExampleStore`, plus stats. A record that cannot render fails (or is skipped and counted).

    The same result as `tokenize_record` on each record in turn, in the same order, the same first error
    included; the texts are encoded ENCODE_BATCH_RECORDS records at a time."""
    stats = TokenizeStats()
    examples = ExampleStore()
    render_failures = 0
    for first in range(0, len(records), ENCODE_BATCH_RECORDS):
        rendered: list[tuple[Record, tuple[str, str, str]]] = []
        render_error = None
        for record in records[first : first + ENCODE_BATCH_RECORDS]:
            try:
                rendered.append((record, render_texts(record, tokenizer)))
            except DataError as err:
                if not skip_invalid:
                    render_error = err  # raised once the records rendered before it had their say (their errors come first)
                    break
                render_failures += 1
        for (record, _), (prompt_ids, chosen_ids, rejected_ids) in zip(rendered, _encode_rendered(tokenizer, rendered)):
            try:
                example = example_from_ids(record, prompt_ids, chosen_ids, rejected_ids, max_seq_length, truncation_mode, stats)
            except DataError:
                if not skip_invalid:
                    raise
                render_failures += 1
                continue
            if example is not None:
                examples.append(example)
        if render_error is not None:
            raise render_error
    return examples, stats, render_failures


def load_examples(files: list[str], tokenizer, max_seq_length: int, truncation_mode: str, skip_invalid: bool, logger,
                  split: str, validator=validate, cache_root: Path | None = None, write_cache: bool = False,
                  shards: TokenizeShards | None = None, chat_template_kwargs: dict | None = None) -> ExampleStore:
    """Read, validate and tokenize one split; report everything that was skipped or cut.
    SFT files (`validator=validate_sft`) become examples whose chosen side is the completion.
    `chat_template_kwargs` (data.chat_template_kwargs): for chat records without their own.

    With `cache_root`, a split tokenized before with the same data, tokenizer, settings and code is mapped
    from there instead (split_cache.py), its report logged again; `write_cache` (rank 0) stores a new one.
    With `shards` (more than one rank, all calling this alike), a split that has to be tokenized is tokenized
    by all of them, a block of records each, and exchanged: every rank gets the same pairs, the same report
    and the same error as one process would, for 1/count of the tokenizing. The ranks first check that they
    all read the same split (data contents, tokenizer, settings, code) and refuse to start if not."""
    together = shards is not None and shards.count > 1
    description = None
    if cache_root is not None or together:
        description = split_cache.describe(files, tokenizer, max_seq_length, truncation_mode, skip_invalid,
                                           validator.__name__, chat_template_kwargs or {})
    directory = cache_root / f"{split}-{split_cache.key_of(description)}" if cache_root and description else None
    cached = split_cache.read(directory) if directory else None
    if together:
        views = shards.gather((description, cached is not None, socket.gethostname()))
        _refuse_different_splits(split, views)
        if not all(has_copy for _, has_copy, _ in views):
            cached = None  # a rank without the copy (another node's output_dir, a missing file): tokenize together
    if cached is not None:
        examples, lines = cached
        lines = lines + [f"{split}: tokenized pairs mapped from {directory}"]
    else:
        examples, lines = _tokenize_split(files, tokenizer, max_seq_length, truncation_mode, skip_invalid, split, validator,
                                          shards if together else None, chat_template_kwargs)
    for line in lines:
        logger.info(line)
    if cached is None and together:
        logger.info(f"{split}: tokenized by {shards.count} ranks, a block of the records each")
    if not examples:
        raise UserError(f"{split}: no usable preference pairs in {', '.join(files)}")
    if cached is None and directory and write_cache:
        problem = split_cache.write(directory, examples, lines)
        if problem:
            logger.info(f"{split}: could not keep the tokenized pairs in {directory} ({problem}); a restart tokenizes again")
        count, size = split_cache.older_copies(directory)
        if count:
            copies = "copy" if count == 1 else "copies"
            logger.info(f"{split}: {directory.parent} also holds {count} older tokenized {copies} of this split "
                        f"({size / 2**20:.1f} MiB) that this config no longer reads; delete them unless another run needs them")
    return examples


def _refuse_different_splits(split: str, views: list[tuple]) -> None:
    """Every rank must read the same split (nodes with their own copies of the data, tokenizer, config or code
    can drift apart); a rank that does not would train on pairs the others never see, or join blocks of two
    datasets. `views` are every rank's (description, has stored copy, host); a missing file (None) is left to
    reading, which names it."""
    described = [(rank, view[0], view[2]) for rank, view in enumerate(views) if view[0] is not None]
    if not described:
        return
    first_rank, first, first_host = described[0]
    for rank, description, host in described[1:]:
        if description != first:
            differing = split_cache.differences(first, description) or ["what the split is made of"]
            raise UserError(
                f"{split}: rank {rank} on {host} does not read what rank {first_rank} on {first_host} reads: "
                f"{'; '.join(differing)} differ. Give every node the same data files, tokenizer, config and "
                "dpo-dist version (copy them alike, or put them on a shared file system)"
            )


def _tokenize_split(files: list[str], tokenizer, max_seq_length: int, truncation_mode: str, skip_invalid: bool,
                    split: str, validator, shards: TokenizeShards | None = None,
                    chat_template_kwargs: dict | None = None) -> tuple[ExampleStore, list[str]]:
    """The split's pairs and the lines that report what was skipped, cut or dropped."""

    def read_block() -> tuple[list[Record], dict[str, int]]:
        """This rank's block of the rows (several ranks); what stops it, as a `_BlockError`."""
        file_rows, unopened = count_rows(files)
        block = RowBlock(*shards.block(sum(file_rows)), tuple(file_rows))
        try:
            records, skipped = read_records(files[: len(file_rows)], skip_invalid, validator, block,
                                            chat_template_kwargs)
        except DataError as err:
            raise _BlockError(0, err) from None
        if unopened is not None:  # after every counted row, as reading alone would meet it
            raise _BlockError(1, unopened)
        return records, skipped

    def tokenize(records: list[Record]) -> tuple[ExampleStore, TokenizeStats, int]:
        return tokenize_records(records, tokenizer, max_seq_length, truncation_mode, skip_invalid)

    if shards is None:
        records, skipped = read_records(files, skip_invalid, validator, chat_template_kwargs=chat_template_kwargs)
        examples, stats, render_failures = tokenize(records)
    else:
        examples, stats, render_failures, skipped = _tokenize_together(read_block, tokenize, shards)
    lines = [f"{split}: {len(examples)} pairs from {len(files)} file(s)"]
    for reason, count in skipped.items():
        lines.append(f"{split}: skipped {count} invalid record(s): {reason}")
    if render_failures:
        lines.append(f"{split}: skipped {render_failures} record(s) the chat template could not render cleanly")
    if stats.truncated:
        lines.append(f"{split}: {stats.truncated} pair(s) longer than training.max_seq_length were truncated")
    if stats.prompt_cut_off:  # as TRL's keep_end, each side is cut on its own: the two may keep different prompt
        lines.append(f"{split}: {stats.prompt_cut_off} pair(s) lost their whole prompt to data.truncation_mode=keep_end "
                     "(a completion is then scored without its context; keep_start drops such pairs instead)")
    if stats.boundary_merges:  # TRL warns of these too; its tokenization is the same
        lines.append(
            f"{split}: {stats.boundary_merges} pair(s) whose completion merges with the prompt's last token when "
            "tokenized together (a prompt ending in a space, a completion continuing the prompt's last word): those "
            "prompt tokens are scored as part of the completion"
        )
    if stats.dropped_prompt_too_long:
        lines.append(
            f"{split}: dropped {stats.dropped_prompt_too_long} pair(s) whose prompt alone fills "
            f"training.max_seq_length={max_seq_length} (no completion token left)"
        )
    return examples, lines


class _BlockError(Exception):
    """What stopped a rank's block, by the order a process alone would meet it in: `stage` 0, a record of the block
    that cannot be read; 1, a data file that cannot be opened (after every counted row: every rank sees it);
    2, a record of the block that cannot be tokenized (all records are read before any is tokenized)."""

    def __init__(self, stage: int, error: DataError):
        super().__init__(stage, error)
        self.stage, self.error = stage, error


def _tokenize_together(read_block: Callable[[], tuple], tokenize: Callable[[list[Record]], tuple], shards: TokenizeShards):
    """Every rank's block, read (`read_block` raises what stops it as `_BlockError` stage 0 or 1) and tokenized,
    joined in rank order (= file order). A bad record raises the same
    `DataError` on every rank, the one a process reading and tokenizing alone would raise: the first record that
    cannot be read, in file order, which is the lowest rank's that met one (a block stops at its first), else the
    first data file that cannot be opened, else the first record that cannot be tokenized (`_BlockError`'s
    stages). A bug on one rank still takes part in the exchange before it raises, so the others stop with it
    instead of waiting for its block until the collective timeout."""
    bug, block = None, None
    try:
        records, skipped = read_block()
        try:
            block, stats, render_failures = tokenize(records)
        except DataError as err:
            raise _BlockError(2, err) from None
        del records  # the block's texts, before the joined arrays are allocated
        outcome = (block.uids, len(block.arrays()[0]), stats, render_failures, skipped)
    except _BlockError as err:
        outcome = err
    except Exception as err:
        outcome, bug = f"{type(err).__name__}: {err}", err
    headers = shards.gather(outcome)
    if bug is not None:
        raise bug
    for rank, header in enumerate(headers):
        if isinstance(header, str):
            raise RuntimeError(f"rank {rank} failed while reading or tokenizing its block of the records ({header}); its own "
                               "output has the traceback")
    failed = [header for header in headers if isinstance(header, _BlockError)]
    if failed:
        raise min(failed, key=lambda header: header.stage).error  # min: the lowest rank's of the earliest stage
    examples = _join_blocks(block, headers, shards)
    stats, render_failures, skipped = TokenizeStats(), 0, {}
    for _, _, block_stats, block_failures, block_skipped in headers:
        stats.add(block_stats)
        render_failures += block_failures
        for reason, count in block_skipped.items():  # in rank order = the file order of each reason's first skip
            skipped[reason] = skipped.get(reason, 0) + count
    return examples, stats, render_failures, skipped


def _join_blocks(block: ExampleStore, headers: list[tuple], shards: TokenizeShards) -> ExampleStore:
    """One store of every rank's block, in rank order: this rank's copied into its place in the final arrays, the
    others' broadcast straight into theirs, so no rank holds the split twice. `headers` are every rank's
    (uids, token count, ...)."""
    pair_ends = np.cumsum([0] + [len(header[0]) for header in headers]).tolist()
    token_ends = np.cumsum([0] + [header[1] for header in headers]).tolist()
    tokens = np.empty(token_ends[-1], dtype=np.int32)
    starts = np.zeros(pair_ends[-1] + 1, dtype=np.int64)  # pair i's ids are tokens[starts[i]:starts[i + 1]]
    shape = np.empty(3 * pair_ends[-1], dtype=np.int32)
    first_pair, first_token = pair_ends[shards.rank], token_ends[shards.rank]
    own_tokens, own_starts, own_shape = block.arrays()
    tokens[first_token : first_token + len(own_tokens)] = own_tokens
    starts[first_pair + 1 : first_pair + len(own_starts)] = own_starts[1:] + first_token
    shape[3 * first_pair : 3 * first_pair + len(own_shape)] = own_shape
    for source in range(shards.count):
        first_pair, end_pair = pair_ends[source], pair_ends[source + 1]
        shards.broadcast(tokens[token_ends[source] : token_ends[source + 1]], source)
        shards.broadcast(starts[first_pair + 1 : end_pair + 1], source)
        shards.broadcast(shape[3 * first_pair : 3 * end_pair], source)
    return ExampleStore.from_arrays([uid for header in headers for uid in header[0]], tokens, starts, shape)
