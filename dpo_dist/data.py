"""Tokenized pairs -> micro-batches: padded (`collate`), packed into one row (`collate_packed`) or one
document per pair (`collate_shared_prefix`), each carrying the positions it scores; the seeded epoch order,
length grouping and each rank's share of a global batch; eval batches padded so every rank runs the same
forwards; the SFT examples mixed into a micro-batch. How records become pairs is tokenization.py's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpo_dist import prefix_sharing
from dpo_dist.examples import PreferenceExample


def scoring_layout(input_ids: torch.Tensor, completion_mask: torch.Tensor, sequence_index: torch.Tensor | None):
    """(positions, targets, owners): the flat indices into the (rows, T) grid of the positions whose next token is
    a completion token of the same sequence, that next token, and the sequence each belongs to (row r when unpacked).

    Position t predicts token t+1, so a position is scored when token t+1 is a completion token and, in a
    packed row, of the same sequence (a sequence's last token must not predict the next one's first).
    Computed where the batch is built, on the host: selecting by a boolean mask on a GPU waits for the
    device to learn how many positions there are, and this runs in every forward."""
    rows, width = completion_mask.shape
    if sequence_index is None:  # padded: row r is sequence r
        sequence_index = torch.arange(rows, device=completion_mask.device).unsqueeze(1).expand(rows, width)
    scored = torch.zeros_like(completion_mask, dtype=torch.bool)
    scored[:, :-1] = completion_mask[:, 1:].bool() & (sequence_index[:, 1:] == sequence_index[:, :-1])
    positions = scored.flatten().nonzero().squeeze(1)
    return positions, input_ids.flatten()[positions + 1], sequence_index.flatten()[positions]


_TENSOR_FIELDS = ("input_ids", "attention_mask", "completion_mask", "pair_weight", "position_ids", "sequence_index",
                  "branch", "attention_gather", "attention_scatter", "scored_positions", "scored_targets", "scored_owners",
                  "scored_weights")


@dataclass
class PairBatch:
    """A micro-batch of B pairs as ONE batch through the decoder. Padded (`collate`): rows [0, B) chosen,
    [B, 2B) rejected, then S rows of SFT examples mixed in (`data.sft_files`), [2B, 2B + S). Packed
    (`collate_packed`): the same sequences back to back in one row. Prefix-shared (`collate_shared_prefix`):
    one document per pair, then per SFT example, in rows or packed (`dpo_dist.prefix_sharing`).
    Sequences are numbered the same in every layout: chosen i, rejected B + i, SFT 2B + k."""

    input_ids: torch.Tensor  # (rows, T) right-padded
    attention_mask: torch.Tensor  # (rows, T) 1 on real tokens
    completion_mask: torch.Tensor  # (rows, T) 1 on completion tokens
    pair_weight: torch.Tensor  # (B,) 1.0 for real pairs, 0.0 for eval padding pairs
    uids: list[str] = field(default_factory=list)
    num_sft: int = 0
    # Packed rows (`data.packing`), and prefix-shared rows (which need positions in every layout).
    position_ids: torch.Tensor | None = None  # (rows, T) each token's position in its own sequence
    sequence_index: torch.Tensor | None = None  # (1, L) packed: which sequence (prefix-shared: document) a token is in
    branch: torch.Tensor | None = None  # (rows, T) prefix-shared only: 0 shared, 1 chosen's own, 2 rejected's own
    attention_gather: torch.Tensor | None = None  # prefix-shared: (sequences, L) grid cells of each sequence's tokens
    attention_scatter: torch.Tensor | None = None  # prefix-shared: (rows * T,) the sequence cell each grid cell reads
    # What is scored, derived when the batch is built (on the host, see scoring_layout); pair entries come first.
    scored_positions: torch.Tensor | None = None  # (N,) flat indices into the (rows, T) grid
    scored_targets: torch.Tensor | None = None  # (N,) the token each position predicts
    scored_owners: torch.Tensor | None = None  # (N,) the sequence each scored position belongs to
    # (N,) float, LD-DPO (dpo.ld_alpha) only: each scored token's weight in its sequence's log-prob sum; None: 1 each
    scored_weights: torch.Tensor | None = None
    # Host numbers, so that metrics and pairs_only() never read the device.
    num_tokens: int | None = None  # tokens of the sequences, each counted in full (shared prompts twice)
    pair_rows: int | None = None  # rows [0, pair_rows) hold the pairs (packed: the one row)
    pair_width: int | None = None  # columns the pairs use (packed: their tokens), SFT rows left out
    pair_scored: int | None = None  # scored entries of the pairs (the first ones)
    pair_tokens: int | None = None  # num_tokens of the pairs alone

    def __post_init__(self) -> None:
        if self.scored_positions is None:
            self.scored_positions, self.scored_targets, self.scored_owners = scoring_layout(
                self.input_ids, self.completion_mask, self.sequence_index)
        if self.num_tokens is None:
            self.num_tokens = int(self.attention_mask.sum())
        if self.pair_scored is None:
            self._locate_pairs()

    def _locate_pairs(self) -> None:
        """Where the pair sequences end (padded or packed layouts built without prefix sharing)."""
        sequences = 2 * self.num_pairs
        self.pair_scored = int((self.scored_owners < sequences).sum())
        if self.packed:
            self.pair_rows, self.pair_width = 1, int((self.sequence_index[0] < sequences).sum())
            self.pair_tokens = self.pair_width
        else:
            self.pair_rows = min(sequences, self.input_ids.shape[0])
            self.pair_width = int(self.attention_mask[: self.pair_rows].sum(dim=1).max())
            self.pair_tokens = int(self.attention_mask[: self.pair_rows].sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        # non_blocking: a blocking host-to-GPU copy waits for the whole stream (the previous micro-batch's
        # backward) before it starts; from pageable memory CUDA stages the data at once, so the host batch
        # may be dropped right after.
        moved = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        moved = {name: t.to(device, non_blocking=True) if t is not None else None for name, t in moved.items()}
        return dataclasses.replace(self, **moved)

    @property
    def num_pairs(self) -> int:
        return self.pair_weight.shape[0]

    @property
    def packed(self) -> bool:
        return self.sequence_index is not None

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs + self.num_sft

    def pairs_only(self) -> "PairBatch":
        """The preference sequences alone (what a reference scores), without the SFT ones. Sliced by host
        numbers: no device read, on any layout."""
        if not self.num_sft:
            return self
        rows, width = self.pair_rows, self.pair_width
        grid = lambda t: t[:rows, :width] if t is not None else None  # noqa: E731
        old_width = self.input_ids.shape[1]
        narrower = lambda cells: cells // old_width * width + cells % old_width  # noqa: E731  the same cells, narrower grid
        gather, scatter = self.attention_gather, self.attention_scatter
        if gather is not None:  # keep the pair sequences; each grid cell still reads the same sequence cell
            gather = narrower(gather[: 2 * self.num_pairs])
            scatter = scatter.view(-1, old_width)[:rows, :width].reshape(-1)
        return dataclasses.replace(
            self, input_ids=grid(self.input_ids), attention_mask=grid(self.attention_mask),
            completion_mask=grid(self.completion_mask), position_ids=grid(self.position_ids),
            sequence_index=grid(self.sequence_index), branch=grid(self.branch), num_sft=0,
            attention_gather=gather, attention_scatter=scatter,
            scored_positions=narrower(self.scored_positions[: self.pair_scored]),
            scored_targets=self.scored_targets[: self.pair_scored],
            scored_owners=self.scored_owners[: self.pair_scored], num_tokens=self.pair_tokens,
            scored_weights=self.scored_weights[: self.pair_scored] if self.scored_weights is not None else None,
        )


def collate(
    examples: list[PreferenceExample],
    pad_token_id: int,
    pair_weight: list[float] | None = None,
    sft_examples: list[PreferenceExample] = (),
) -> PairBatch:
    """Right-pad chosen and rejected sequences (then SFT sequences: their chosen side) into one batch."""
    sequences = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples] + [e.chosen_ids for e in sft_examples]
    prompt_lens = (
        [e.chosen_prompt_len for e in examples]
        + [e.rejected_prompt_len for e in examples]
        + [e.chosen_prompt_len for e in sft_examples]
    )
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, prompt_len : len(ids)] = 1
    weights = torch.tensor(pair_weight if pair_weight is not None else [1.0] * len(examples), dtype=torch.float32)
    return PairBatch(input_ids, attention_mask, completion_mask, weights, [e.uid for e in examples], len(sft_examples))


def collate_packed(
    examples: list[PreferenceExample],
    pad_token_id: int,
    pair_weight: list[float] | None = None,
    sft_examples: list[PreferenceExample] = (),
) -> PairBatch:
    """All sequences of the micro-batch back to back in ONE row: no padding, so no FLOPs on padding.
    Same order as `collate` (chosen, rejected, SFT); attention stays inside each sequence."""
    padded = collate(examples, pad_token_id, pair_weight, sft_examples)
    lengths = padded.attention_mask.sum(dim=1)  # (S,)
    keep = padded.attention_mask.bool()
    input_ids = padded.input_ids[keep].unsqueeze(0)  # (1, L), row-major: sequence after sequence
    completion_mask = padded.completion_mask[keep].unsqueeze(0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    sequence_index = torch.repeat_interleave(torch.arange(len(lengths)), lengths).unsqueeze(0)
    return PairBatch(input_ids, torch.ones_like(input_ids), completion_mask, padded.pair_weight, padded.uids,
                     padded.num_sft, position_ids, sequence_index)


def collate_shared_prefix(
    examples: list[PreferenceExample],
    pad_token_id: int,
    pair_weight: list[float] | None = None,
    sft_examples: list[PreferenceExample] = (),
    packed: bool = False,
) -> PairBatch:
    """Each pair as ONE document whose prompt the decoder runs once (`dpo_dist.prefix_sharing`), then the SFT
    examples; one row per document, or all in one row when `packed`."""
    num_pairs = len(examples)
    documents = [
        prefix_sharing.pair_document(e.chosen_ids, e.chosen_prompt_len, e.rejected_ids, e.rejected_prompt_len, i, num_pairs + i)
        for i, e in enumerate(examples)
    ]
    documents += [prefix_sharing.single_document(e.chosen_ids, e.chosen_prompt_len, 2 * num_pairs + k)
                  for k, e in enumerate(sft_examples)]
    layout = prefix_sharing.place_documents(documents, pad_token_id, packed)
    pair_lengths = [len(doc.token_ids) for doc in documents[:num_pairs]]
    pair_tokens = sum(e.num_tokens for e in examples)  # counted unshared, as TRL counts
    weights = torch.tensor(pair_weight if pair_weight is not None else [1.0] * num_pairs, dtype=torch.float32)
    return PairBatch(
        layout.input_ids, layout.attention_mask, layout.completion_mask, weights, [e.uid for e in examples],
        len(sft_examples), layout.position_ids, layout.documents, layout.branch,
        layout.attention_gather, layout.attention_scatter,
        layout.scored_positions, layout.scored_targets, layout.scored_owners,
        num_tokens=pair_tokens + sum(len(e.chosen_ids) for e in sft_examples),
        pair_rows=1 if packed else num_pairs,
        pair_width=sum(pair_lengths) if packed else max(pair_lengths),
        pair_scored=sum(len(doc.scored) for doc in documents[:num_pairs]),
        pair_tokens=pair_tokens,
    )


def collate_for(packing: bool, prefix_sharing_on: bool, ld_alpha: float | None = None):
    """The collate function of a run's data layout (`data.packing`, `data.prefix_sharing`); with `ld_alpha`
    (dpo.ld_alpha) its batches carry LD-DPO's token weights (`length_desensitized_weights`)."""
    if prefix_sharing_on:
        layout = functools.partial(collate_shared_prefix, packed=packing)
    else:
        layout = collate_packed if packing else collate
    if ld_alpha is None:
        return layout

    def collate_weighted(*args, **kwargs) -> PairBatch:
        batch = layout(*args, **kwargs)
        batch.scored_weights = length_desensitized_weights(batch.scored_owners, batch.num_pairs, ld_alpha)
        return batch

    return collate_weighted


def length_desensitized_weights(scored_owners: torch.Tensor, num_pairs: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's token weights (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    as TRL's ld_alpha): in pair i, the first min(|y_w|, |y_l|) completion tokens of chosen and of rejected weigh
    1, the longer answer's tokens after them `ld_alpha`, so the excess length counts less. SFT sequences
    (owners 2B and up) weigh 1.

    `scored_owners` (N,) is the batch's scored-token owners (host tensor), each sequence's tokens in order of
    position, as every layout lists them; a token's place in its completion is how many of its owner's tokens
    come before it."""
    owners = scored_owners.cpu()
    lengths = torch.bincount(owners, minlength=2 * num_pairs)  # every sequence's, SFT ones too (owners up to the max)
    shared = lengths.clone()  # SFT sequences: all of it
    pair_shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs : 2 * num_pairs])
    shared[:num_pairs], shared[num_pairs : 2 * num_pairs] = pair_shared, pair_shared
    order = torch.sort(owners, stable=True).indices  # grouped by owner, each group in position order
    first_of_owner = torch.cumsum(lengths, 0) - lengths
    place = torch.empty_like(owners)
    place[order] = torch.arange(owners.numel()) - first_of_owner[owners[order]]
    weights = torch.ones(owners.numel(), dtype=torch.float32)
    weights[place >= shared[owners]] = ld_alpha
    return weights


def length_grouped_order(order: list[int], lengths: list[int], group_size: int, trained: int) -> list[int]:
    """Within each window of `group_size` indices of a shuffled order, sort by length (longest first),
    so micro-batches hold similar lengths and padding shrinks; the windows keep the shuffle's mixing.

    Only the first `trained` indices (the epoch's whole global batches) are grouped; the rest, the pairs the
    epoch leaves out, stay at the end as the shuffle put them. Sorted into the last window they would be its
    shortest pairs: the same ones left out every epoch."""
    grouped = []
    for start in range(0, trained, group_size):
        window = order[start : min(start + group_size, trained)]
        grouped.extend(sorted(window, key=lambda i: -lengths[i]))
    return grouped + order[trained:]


def epoch_order(num_examples: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The example order of one epoch: a seeded permutation, the same on every rank."""
    if not shuffle:
        return list(range(num_examples))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def steps_per_epoch(num_examples: int, global_batch_pairs: int) -> int:
    """Optimizer steps in one epoch; the last partial global batch is left out (a different one each epoch)."""
    return num_examples // global_batch_pairs


def rank_step_indices(
    order: list[int], step: int, rank: int, world_size: int, micro_batch: int, accumulation: int
) -> list[list[int]]:
    """Example indices of this rank's micro-batches for optimizer step `step` of the epoch.

    Global batch `step` is order[step*G : (step+1)*G] with G = micro_batch * world_size * accumulation;
    micro-step m gives rank r the slice starting at m*micro_batch*world_size + r*micro_batch. One
    process with micro_batch*world_size pairs per micro-batch sees the same global batch.
    """
    global_batch = micro_batch * world_size * accumulation
    start = step * global_batch
    micro_batches = []
    for micro_step in range(accumulation):
        offset = start + micro_step * micro_batch * world_size + rank * micro_batch
        micro_batches.append(order[offset : offset + micro_batch])
    return micro_batches


def eval_batches(examples: Sequence[PreferenceExample], rank: int, world_size: int, micro_batch: int, pad_token_id: int,
                 collate_fn=collate):
    """This rank's share of the eval set as batches; every example is scored exactly once overall.

    All ranks get the same number of micro-batches (ZeRO-3 forwards are collective), so short
    ranks are filled with weight-0 copies of the first example that add nothing to the metrics.
    """
    per_round = micro_batch * world_size
    rounds = -(-len(examples) // per_round)
    for round_index in range(rounds):
        start = round_index * per_round + rank * micro_batch
        chunk = examples[start : start + micro_batch]
        weights = [1.0] * len(chunk) + [0.0] * (micro_batch - len(chunk))
        batch = collate_fn(chunk + [examples[0]] * (micro_batch - len(chunk)), pad_token_id, weights)
        batch.num_tokens = sum(example.num_tokens for example in chunk)  # the eval pairs' (the copies ran, count nowhere)
        yield batch


def sft_indices(step: int, micro_step: int, rank: int, world_size: int, accumulation: int,
                pairs_per_micro: int, ratio: float, num_sft: int, seed: int) -> list[int]:
    """SFT examples mixed into one micro-batch: on average `ratio` per preference pair.

    A pure function of the position (so resume is exact): micro-batch m (counted over the whole
    run) gets floor((m+1) B r) - floor(m B r) examples on every rank, taken from one stream that
    walks seeded permutations of the SFT set, each rank its own consecutive slice.
    """
    m = step * accumulation + micro_step
    before, upto = int(m * pairs_per_micro * ratio), int((m + 1) * pairs_per_micro * ratio)
    count = upto - before
    indices = []
    for j in range(count):
        position = before * world_size + rank * count + j
        cycle, offset = divmod(position, num_sft)
        indices.append(_sft_cycle_order(num_sft, seed, cycle)[offset])
    return indices


@functools.lru_cache(maxsize=2)
def _sft_cycle_order(num_sft: int, seed: int, cycle: int) -> list[int]:
    """One pass over the SFT set in seeded order; cached because every micro-batch reads from it."""
    generator = torch.Generator().manual_seed(seed * 7919 + cycle)
    return torch.randperm(num_sft, generator=generator).tolist()
