"""Prefix sharing (`data.prefix_sharing`): a pair's chosen and rejected sequences share their prompt, so
the decoder's linear layers run over the prompt ONCE per pair instead of twice.

A pair becomes one document: the tokens chosen and rejected have in common (the prompt, and any
identical start of the two completions), then chosen's own tokens, then rejected's own tokens. Each
token keeps the position it has in its own sequence, so rejected's tokens take the positions they
have in rejected alone. Everything but attention works token by token, so it runs on the document.
Attention must give every token exactly what it sees in its own unshared sequence; two ways:

- gather (sdpa, eager, flash_attention_2): each layer gathers q, k, v into the unshared sequences
  (right-padded rows, chosen i, rejected B + i, SFT 2B + k), runs the model's own kernel on them
  as on any padded batch (causal, no mask, KV heads grouped), and scatters each document token's
  output back from its sequence (a shared token from chosen's row). Attention does the unshared
  work; the projections, norms and MLP do the shared work. In a compiled layer both moves are
  `GatherRows`, whose backward gathers as well (`backward_sources`), where index_select's own
  scatter-adds with atomics.
- block mask (flex_attention): one document-grid attention with a BlockMask from `allowed` (causal,
  same document, never the other branch), so masked blocks are skipped and the shared prompt's
  attention is done once too.

Either way the hidden states, and the log-probs, are the unshared ones. The last shared token
predicts the first own token of both branches: that one position is scored twice, for chosen and
for rejected, with different targets, so scored entries carry their target token explicitly.

Layouts: padded (one row per document) or packed (all documents back to back in one row). The
layout and its gather/scatter indices are built on the host, like the rest of a batch.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpo_dist.examples import common_prefix_length

SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class SharedDocument:
    """One pair (or one SFT example) laid out as a single token sequence."""

    token_ids: list[int]
    position_ids: list[int]  # the position each token has in its own (unshared) sequence
    branch: list[int]  # SHARED / CHOSEN / REJECTED per token
    completion: list[int]  # 1 where the token is a completion token of a sequence that contains it
    scored: list[tuple[int, int, int]]  # (offset in this document, target token id, owning sequence)
    sequences: list[tuple[int, list[int]]]  # (sequence, the offsets of its tokens in this document, in order)
    output_from: list[tuple[int, int]]  # per token: (sequence, position) whose attention output it takes


def _scored_offsets(prompt_len: int, length: int) -> range:
    """Positions of a sequence whose next token is a completion token (token 0 has no predictor)."""
    return range(max(prompt_len, 1) - 1, length - 1)


def _flags(length: int, first_set: int) -> list[int]:
    """[0] * first_set + [1] * (length - first_set), clipped to `length`."""
    first_set = min(max(first_set, 0), length)
    return [0] * first_set + [1] * (length - first_set)


def _scored_entries(offsets: Sequence[int], ids: list[int], scored: range, owner: int) -> list[tuple[int, int, int]]:
    """(document offset, target, owner) for each scored position of a sequence whose tokens sit at `offsets`."""
    targets = ids[scored.start + 1 : scored.stop + 1]
    return list(zip(offsets[scored.start : scored.stop], targets, itertools.repeat(owner)))


# The builders below make their lists with range, zip and repeat rather than per-token Python expressions: a
# micro-batch of 2 pairs x 2,048 tokens is built on the host between optimizer steps, while the device waits.
def pair_document(chosen_ids: list[int], chosen_prompt_len: int, rejected_ids: list[int], rejected_prompt_len: int,
                  chosen_owner: int, rejected_owner: int) -> SharedDocument:
    """Chosen and rejected of one pair as one document: shared prefix, chosen's rest, rejected's rest."""
    shared = common_prefix_length(chosen_ids, rejected_ids)
    chosen_len, rejected_len = len(chosen_ids), len(rejected_ids)
    own_chosen, own_rejected = chosen_len - shared, rejected_len - shared
    position_ids = list(range(chosen_len)) + list(range(shared, rejected_len))
    branch = [SHARED] * shared + [CHOSEN] * own_chosen + [REJECTED] * own_rejected
    # a shared token is a completion token if it is one in either sequence
    completion = _flags(shared, min(chosen_prompt_len, rejected_prompt_len))
    completion += _flags(own_chosen, chosen_prompt_len - shared)
    completion += _flags(own_rejected, rejected_prompt_len - shared)
    chosen_offsets = range(chosen_len)
    # where rejected's token at each position sits in the document: the shared prefix, then its own after chosen's
    rejected_offsets = list(range(shared)) + list(range(chosen_len, chosen_len + own_rejected))
    scored = _scored_entries(chosen_offsets, chosen_ids, _scored_offsets(chosen_prompt_len, chosen_len), chosen_owner)
    scored += _scored_entries(rejected_offsets, rejected_ids, _scored_offsets(rejected_prompt_len, rejected_len),
                              rejected_owner)
    sequences = [(chosen_owner, list(chosen_offsets)), (rejected_owner, rejected_offsets)]
    output_from = list(zip(itertools.repeat(chosen_owner), range(chosen_len)))
    output_from += list(zip(itertools.repeat(rejected_owner), range(shared, rejected_len)))
    return SharedDocument(chosen_ids + rejected_ids[shared:], position_ids, branch, completion, scored, sequences, output_from)


def single_document(ids: list[int], prompt_len: int, owner: int) -> SharedDocument:
    """An SFT example: one sequence, all of it on the shared branch (it has no other)."""
    offsets = range(len(ids))
    return SharedDocument(list(ids), list(offsets), [SHARED] * len(ids), _flags(len(ids), prompt_len),
                          _scored_entries(offsets, ids, _scored_offsets(prompt_len, len(ids)), owner),
                          [(owner, list(offsets))], list(zip(itertools.repeat(owner), offsets)))


@dataclass
class SharedLayout:
    """Documents placed in a (rows, T) grid, as host tensors; scored entries in document order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 on real tokens
    completion_mask: torch.Tensor
    position_ids: torch.Tensor
    branch: torch.Tensor
    documents: torch.Tensor | None  # packed only: which document each token belongs to
    scored_positions: torch.Tensor  # flat indices into the (rows, T) grid
    scored_targets: torch.Tensor
    scored_owners: torch.Tensor
    attention_gather: torch.Tensor  # (S, L) flat grid index of each token of each unshared sequence (pads: its first's)
    attention_scatter: torch.Tensor  # (rows * T,) flat (S, L) index each grid cell takes its attention output from


def place_documents(documents: list[SharedDocument], pad_token_id: int, packed: bool) -> SharedLayout:
    """Padded: document d in row d, right-padded. Packed: all documents back to back in one row."""
    lengths = [len(doc.token_ids) for doc in documents]
    rows, width = (1, sum(lengths)) if packed else (len(documents), max(lengths))
    grid = {name: torch.zeros((rows, width), dtype=torch.long)
            for name in ("input_ids", "attention_mask", "completion_mask", "position_ids", "branch")}
    grid["input_ids"].fill_(pad_token_id)
    document_index = torch.full((rows, width), -1, dtype=torch.long) if packed else None
    scored = []
    num_sequences = sum(len(doc.sequences) for doc in documents)
    sequence_length = max(len(offsets) for doc in documents for _, offsets in doc.sequences)
    gather = torch.zeros((num_sequences, sequence_length), dtype=torch.long)
    scatter = torch.zeros(rows * width, dtype=torch.long)  # padding cells take sequence 0's first output: never used
    start = 0
    for index, doc in enumerate(documents):
        row, column = (0, start) if packed else (index, 0)
        first = row * width + column  # the document's first cell
        readers = torch.zeros(len(doc.token_ids), dtype=torch.long)
        for sequence, offsets in doc.sequences:
            offsets = torch.tensor(offsets, dtype=torch.long)
            readers[offsets] += 1  # offsets within a sequence are distinct
            # Its padding repeats its own first token: finite, never attended (causal), and told from a real token by
            # that alone (`backward_sources`)
            gather[sequence].fill_(first + int(offsets[0]))
            gather[sequence, : len(offsets)] = first + offsets
        if int(readers.max()) > 2:  # backward_sources keeps two readers per cell
            raise RuntimeError(f"a document token is in {int(readers.max())} sequences; prefix sharing allows 2")
        output_from = torch.tensor(doc.output_from, dtype=torch.long)  # (tokens, 2): sequence, position
        scatter[first : first + len(doc.token_ids)] = output_from[:, 0] * sequence_length + output_from[:, 1]
        span = slice(column, column + len(doc.token_ids))
        grid["input_ids"][row, span] = torch.tensor(doc.token_ids, dtype=torch.long)
        grid["attention_mask"][row, span] = 1
        grid["completion_mask"][row, span] = torch.tensor(doc.completion, dtype=torch.long)
        grid["position_ids"][row, span] = torch.tensor(doc.position_ids, dtype=torch.long)
        grid["branch"][row, span] = torch.tensor(doc.branch, dtype=torch.long)
        if packed:
            document_index[row, span] = index
        scored.append(torch.tensor(doc.scored, dtype=torch.long).reshape(-1, 3))  # offset, target, owner
        scored[-1][:, 0] += first
        start += len(doc.token_ids)
    positions, targets, owners = torch.cat(scored).unbind(dim=1)
    return SharedLayout(**grid, documents=document_index, scored_positions=positions.contiguous(),
                        scored_targets=targets.contiguous(), scored_owners=owners.contiguous(),
                        attention_gather=gather, attention_scatter=scatter)


def allowed(branch: torch.Tensor, documents: torch.Tensor | None, position_ids: torch.Tensor,
            sliding_window: int | None, b, q, k):
    """May query offset q of row b attend key offset k (on the document grid)? FlexAttention's mask_mod; written
    with tensor ops only, so it also evaluates densely on broadcast index tensors (how the tests check it)."""
    branch_k = branch[b, k]
    visible = (k <= q) & ((branch_k == SHARED) | (branch_k == branch[b, q]))
    if documents is not None:
        visible = visible & (documents[b, q] == documents[b, k])
    if sliding_window is not None:  # as transformers' sliding layers: positions less than the window apart
        visible = visible & (position_ids[b, q] - position_ids[b, k] < sliding_window)
    return visible


@dataclass
class SharedAttention:
    """What one layer type's attention gets in place of a mask (transformers passes it through untouched)."""

    gather: torch.Tensor  # (S, L), see SharedLayout
    scatter: torch.Tensor  # (rows * T,)
    mask: torch.Tensor | None  # for the unshared rows: causal (+ window) where the kernel needs it spelled out
    gather_sources: torch.Tensor | None = None  # (rows * T, 2), see backward_sources
    scatter_sources: torch.Tensor | None = None  # (S * L, 1)


def backward_sources(gather: torch.Tensor, scatter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the gradient of each side of the attention's gather and scatter comes from, as rows to gather (-1:
    none), so that backward gathers instead of scatter-adding.

    - A grid cell's gradient through the gather is the sum over the sequence cells that read it: at most two, since
      a shared token sits in chosen's and rejected's sequence, any other token in one. Padding cells of a sequence
      (they repeat its first token, `place_documents`) are left out: they are never attended (causal, right-padded)
      and their outputs are never read, so their gradient is exactly zero. (rows * T, 2).
    - A sequence cell's gradient through the scatter comes from the one grid cell that reads its output, if any:
      rejected's shared tokens and the padding are read by none, and padding grid cells (which read sequence cell 0)
      never reach anything scored, so their gradient is zero too. (S * L, 1).

    Device ops only, once per forward with grad (no host read); min and max make the choice of the two readers
    deterministic. `place_documents` checks that no cell has more than two."""
    cells, slots = scatter.numel(), gather.numel()
    slot_ids = torch.arange(slots, device=gather.device)
    padding = torch.zeros_like(gather, dtype=torch.bool)
    padding[:, 1:] = gather[:, 1:] == gather[:, :1]
    reads = torch.where(padding, cells, gather).reshape(-1)  # padding reads a spare cell past the grid
    first = torch.full((cells + 1,), slots, device=gather.device).scatter_reduce_(0, reads, slot_ids, "amin")[:cells]
    last = torch.full((cells + 1,), -1, device=gather.device).scatter_reduce_(0, reads, slot_ids, "amax")[:cells]
    first = torch.where(first == slots, -1, first)
    last = torch.where(last == first, -1, last)
    flat_gather = gather.reshape(-1)
    taken = scatter.index_select(0, flat_gather) == slot_ids  # the cell holding this token reads its output here
    return torch.stack([first, last], dim=1), torch.where(taken, flat_gather, -1).unsqueeze(1)


def _rows_or_zero(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """states[rows], with zero where rows is -1."""
    picked = states.index_select(0, rows.clamp(min=0))
    keep = (rows >= 0).view(-1, *([1] * (states.dim() - 1)))
    return torch.where(keep, picked, torch.zeros((), dtype=states.dtype, device=states.device))


class GatherRows(torch.autograd.Function):
    """`states.index_select(0, index)` whose backward gathers each source row's gradient from its (at most k)
    readers, `sources` (rows of states, k), instead of scatter-adding it. A scatter-add is an atomic add per
    element on a GPU (bf16 ones on an H200), a kernel inductor cannot fuse; this is a gather it fuses into one
    kernel. The same sum, exactly: at most two nonzero terms, and zeros add nothing."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, index: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(sources)
        return states.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (sources,) = ctx.saved_tensors
        total = _rows_or_zero(grad, sources[:, 0])
        for column in range(1, sources.shape[1]):
            total = total + _rows_or_zero(grad, sources[:, column])
        return total, None, None


def _select_rows(states: torch.Tensor, index: torch.Tensor, sources: torch.Tensor | None) -> torch.Tensor:
    """Compiled (inside a compiled layer), the gathering backward; eager, index_select's own (one scatter-add
    kernel, fewer than the gathers' several unfused ones)."""
    if sources is not None and torch.compiler.is_compiling():
        return GatherRows.apply(states, index, sources)
    return states.index_select(0, index)


ATTENTION_PREFIX = "dpo_dist_prefix_sharing_"


def base_implementation(name: str) -> str:
    """The attention kernel under the gathering wrapper (the name itself if unwrapped)."""
    return name.removeprefix(ATTENTION_PREFIX)


def _kernel(module, base: str):
    if base == "eager":  # not in the registry: each model file has its own
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def gathered_attention(module, query, key, value, attention_mask, *, base: str, **kwargs):
    """The model's `base` kernel, run on the unshared sequences when handed a `SharedAttention`.

    query/key/value are (rows, heads, T, D) on the document grid; the kernel returns (rows', T', heads, D)."""
    kernel = _kernel(module, base)
    layout = attention_mask if isinstance(attention_mask, SharedAttention) else getattr(attention_mask, SHARED_ATTRIBUTE, None)
    if layout is None:  # an ordinary batch through the same model
        return kernel(module, query, key, value, attention_mask, **kwargs)
    rows, _, width, _ = query.shape
    num_sequences, length = layout.gather.shape

    def unshared(states: torch.Tensor) -> torch.Tensor:  # (rows, heads, T, D) -> (S, heads, L, D)
        heads, dim = states.shape[1], states.shape[3]
        cells = states.transpose(1, 2).reshape(rows * width, heads, dim)
        picked = _select_rows(cells, layout.gather.reshape(-1), layout.gather_sources)
        return picked.view(num_sequences, length, heads, dim).transpose(1, 2)

    for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)  # they describe the document grid; flash-attention would read them as packing
    output, _ = kernel(module, unshared(query), unshared(key), unshared(value), layout.mask, **kwargs)
    heads, dim = output.shape[2], output.shape[3]
    cells = _select_rows(output.reshape(num_sequences * length, heads, dim), layout.scatter, layout.scatter_sources)
    return cells.view(rows, width, heads, dim), None


def use_gathered_attention(hf_config) -> None:
    """Point the model's attention at `gathered_attention` around its kernel (registered once per kernel, with
    the kernel's own mask builder, so other batches through the same model get the kernel and the masks they
    always got). The name is never saved with the model."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = hf_config._attn_implementation
    if name.startswith(ATTENTION_PREFIX):
        return
    if name not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"data.prefix_sharing cannot gather attention for attn_implementation={name}")
    wrapped = ATTENTION_PREFIX + name
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(wrapped, functools.partial(gathered_attention, base=name))
        AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    hf_config._attn_implementation = wrapped


def _unshared_mask(base: str, window: int | None, length: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Right-padded unshared rows need no mask where the kernel is causal by itself (sdpa, flash-attention);
    eager needs causality spelled out, and sdpa a sliding window (flash-attention takes the window as is)."""
    if base == "flash_attention_2" or (base == "sdpa" and window is None):
        return None
    offsets = torch.arange(length, device=device)
    visible = offsets[:, None] >= offsets[None, :]
    if window is not None:
        visible = visible & (offsets[:, None] - offsets[None, :] < window)
    return torch.zeros((1, 1, length, length), dtype=dtype, device=device).masked_fill_(~visible, torch.finfo(dtype).min)


def attention_masks(causal_lm, branch: torch.Tensor, documents: torch.Tensor | None, position_ids: torch.Tensor,
                    gather: torch.Tensor, scatter: torch.Tensor, compiled_layers: bool = False):
    """The decoder's per-layer-type "masks" (transformers takes such a dict as-is): BlockMasks for flex_attention,
    else `SharedAttention`s for the gathering wrapper (switched on here, on the first prefix-shared batch). A
    decoder with one mask for all its layers (no layer_types: Qwen3-MoE) gets that one mask instead.
    `compiled_layers`: the decoder's layers are compiled (`models.compile_decoder_layers`), so with grad their
    attention backward gathers (`GatherRows`) from `backward_sources`; eager layers never read those."""
    hf_config = causal_lm.config
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        windows = {layer_type: hf_config.sliding_window if layer_type == "sliding_attention" else None
                   for layer_type in set(layer_types)}
    else:  # Qwen3-MoE's decoder: every layer sliding when the config has a window, else none
        windows = {None: getattr(hf_config, "sliding_window", None)}
    if hf_config._attn_implementation == "flex_attention":
        masks = {layer_type: _block_mask(branch, documents, position_ids, window) for layer_type, window in windows.items()}
    else:
        use_gathered_attention(hf_config)
        base = base_implementation(hf_config._attn_implementation)
        dtype = causal_lm.get_input_embeddings().weight.dtype
        with_sources = compiled_layers and torch.is_grad_enabled()  # what only a compiled backward reads
        sources = backward_sources(gather, scatter) if with_sources else (None, None)
        masks = {}
        for layer_type, window in windows.items():
            mask = _unshared_mask(base, window, gather.shape[1], dtype, gather.device)
            masks[layer_type] = SharedAttention(gather, scatter, mask, *sources)
    return masks if layer_types else _one_mask_for_all_layers(masks[None])


SHARED_ATTRIBUTE = "dpo_dist_shared_attention"


def _one_mask_for_all_layers(mask):
    """A decoder without per-layer-type masks sends what it is given through transformers' mask builder, which
    returns a 4-d tensor or BlockMask untouched and fails on anything else. A BlockMask goes as it is; a
    SharedAttention rides as an attribute of an empty 4-d tensor, which reaches every layer's attention as
    the same object (also in non-reentrant checkpointing's recompute, which reuses the forward's arguments)."""
    if not isinstance(mask, SharedAttention):
        return mask
    carrier = torch.empty((0, 0, 0, 0), device=mask.gather.device)
    setattr(carrier, SHARED_ATTRIBUTE, mask)
    return carrier


def _block_mask(branch, documents, position_ids, window):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return allowed(branch, documents, position_ids, window, b, q, k)

    rows, width = branch.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=branch.device)
