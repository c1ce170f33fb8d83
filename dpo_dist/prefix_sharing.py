"""Prefix sharing (`data.prefix_sharing`): a pair's chosen and rejected sequences share their prompt, so
the decoder runs over the prompt ONCE per pair instead of twice.

A pair becomes one sequence: the tokens chosen and rejected have in common (the prompt, and any
identical start of the two completions), then chosen's own tokens, then rejected's own tokens.
Each token carries a branch (0 shared, 1 chosen, 2 rejected) and its position in its own sequence,
so rejected's tokens take the positions they have in rejected alone. Attention: causal, and a token
of one branch never sees the other branch's tokens. Every token then sees exactly what it sees in its
own unshared sequence, at the same positions, so the hidden states, and the log-probs, are the same.

The last shared token predicts the first own token of both branches: that one position is scored
twice, for chosen and for rejected, with different targets. So the scored entries carry their target
token explicitly (`scored_targets`) instead of "the next token in the row".

Layouts: padded (one row per pair, right-padded; SFT examples one row each) or packed (every pair
and SFT example back to back in one row; `documents` keeps them apart). The layout is built on the
host, like the rest of a batch; the attention masks are built on the device from the small per-token
tensors, for the kernel in use: one additive mask in the model's dtype for sdpa and eager, shared by
every layer, or a BlockMask for flex_attention (which skips whole blocks that are masked). flash-attention's varlen kernel cannot
express "see the shared prefix but not the other branch", so that kernel is refused in the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHARED, CHOSEN, REJECTED = 0, 1, 2
# Rows are padded to a multiple of 16 tokens: CUDA's memory-efficient sdpa kernel wants the mask's last
# dimension aligned so, and copies (per layer) a mask that is not.
WIDTH_MULTIPLE = 16


@dataclass
class SharedDocument:
    """One pair (or one SFT example) laid out as a single token sequence."""

    token_ids: list[int]
    position_ids: list[int]  # the position each token has in its own (unshared) sequence
    branch: list[int]  # SHARED / CHOSEN / REJECTED per token
    completion: list[int]  # 1 where the token is a completion token of a sequence that contains it
    scored: list[tuple[int, int, int]]  # (offset in this document, target token id, owning sequence)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _scored_offsets(prompt_len: int, length: int) -> range:
    """Positions of a sequence whose next token is a completion token (token 0 has no predictor)."""
    return range(max(prompt_len, 1) - 1, length - 1)


def pair_document(chosen_ids: list[int], chosen_prompt_len: int, rejected_ids: list[int], rejected_prompt_len: int,
                  chosen_owner: int, rejected_owner: int) -> SharedDocument:
    """Chosen and rejected of one pair as one document: shared prefix, chosen's rest, rejected's rest."""
    shared = common_prefix_length(chosen_ids, rejected_ids)
    own_chosen, own_rejected = len(chosen_ids) - shared, len(rejected_ids) - shared
    position_ids = list(range(len(chosen_ids))) + list(range(shared, len(rejected_ids)))
    branch = [SHARED] * shared + [CHOSEN] * own_chosen + [REJECTED] * own_rejected
    completion = [int(p >= chosen_prompt_len or p >= rejected_prompt_len) for p in range(shared)]
    completion += [int(p >= chosen_prompt_len) for p in range(shared, len(chosen_ids))]
    completion += [int(p >= rejected_prompt_len) for p in range(shared, len(rejected_ids))]

    def rejected_offset(position: int) -> int:  # where rejected's token at `position` sits in the document
        return position if position < shared else len(chosen_ids) + position - shared

    scored = [(t, chosen_ids[t + 1], chosen_owner) for t in _scored_offsets(chosen_prompt_len, len(chosen_ids))]
    scored += [(rejected_offset(t), rejected_ids[t + 1], rejected_owner)
               for t in _scored_offsets(rejected_prompt_len, len(rejected_ids))]
    return SharedDocument(chosen_ids + rejected_ids[shared:], position_ids, branch, completion, scored)


def single_document(ids: list[int], prompt_len: int, owner: int) -> SharedDocument:
    """An SFT example: one sequence, all of it on the shared branch (it has no other)."""
    return SharedDocument(list(ids), list(range(len(ids))), [SHARED] * len(ids),
                          [int(p >= prompt_len) for p in range(len(ids))],
                          [(t, ids[t + 1], owner) for t in _scored_offsets(prompt_len, len(ids))])


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


def place_documents(documents: list[SharedDocument], pad_token_id: int, packed: bool) -> SharedLayout:
    """Padded: document d in row d, right-padded. Packed: all documents back to back in one row."""
    lengths = [len(doc.token_ids) for doc in documents]
    rows, width = (1, sum(lengths)) if packed else (len(documents), max(lengths))
    width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    grid = {name: torch.zeros((rows, width), dtype=torch.long)
            for name in ("input_ids", "attention_mask", "completion_mask", "position_ids", "branch")}
    grid["input_ids"].fill_(pad_token_id)
    document_index = torch.full((rows, width), -1, dtype=torch.long) if packed else None
    positions, targets, owners = [], [], []
    start = 0
    for index, doc in enumerate(documents):
        row, column = (0, start) if packed else (index, 0)
        span = slice(column, column + len(doc.token_ids))
        grid["input_ids"][row, span] = torch.tensor(doc.token_ids, dtype=torch.long)
        grid["attention_mask"][row, span] = 1
        grid["completion_mask"][row, span] = torch.tensor(doc.completion, dtype=torch.long)
        grid["position_ids"][row, span] = torch.tensor(doc.position_ids, dtype=torch.long)
        grid["branch"][row, span] = torch.tensor(doc.branch, dtype=torch.long)
        if packed:
            document_index[row, span] = index
        for offset, target, owner in doc.scored:
            positions.append(row * width + column + offset)
            targets.append(target)
            owners.append(owner)
        start += len(doc.token_ids)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SharedLayout(**grid, documents=document_index, scored_positions=as_tensor(positions),
                        scored_targets=as_tensor(targets), scored_owners=as_tensor(owners))


def allowed(branch: torch.Tensor, documents: torch.Tensor | None, position_ids: torch.Tensor,
            sliding_window: int | None, b, q, k):
    """May query offset q of row b attend key offset k? Works on broadcast index tensors (dense masks) and on
    FlexAttention's scalar indices alike, so the dense and the block-sparse masks are one definition."""
    branch_k = branch[b, k]
    visible = (k <= q) & ((branch_k == SHARED) | (branch_k == branch[b, q]))
    if documents is not None:
        visible = visible & (documents[b, q] == documents[b, k])
    if sliding_window is not None:  # as transformers' sliding layers: positions less than the window apart
        visible = visible & (position_ids[b, q] - position_ids[b, k] < sliding_window)
    return visible


def attention_masks(hf_config, dtype: torch.dtype, branch: torch.Tensor, documents: torch.Tensor | None,
                    position_ids: torch.Tensor) -> dict:
    """The decoder's per-layer-type masks (transformers takes such a dict as-is) for the kernel in use."""
    implementation = hf_config._attn_implementation
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    masks = {}
    for layer_type in layer_types:
        window = hf_config.sliding_window if layer_type == "sliding_attention" else None
        masks[layer_type] = _mask(implementation, dtype, branch, documents, position_ids, window)
    return masks


def _mask(implementation: str, dtype: torch.dtype, branch, documents, position_ids, window):
    rows, width = branch.shape
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return allowed(branch, documents, position_ids, window, b, q, k)

        return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=branch.device)
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"data.prefix_sharing has no mask for attn_implementation={implementation}")
    offsets = torch.arange(width, device=branch.device)
    rows_index = torch.arange(rows, device=branch.device)[:, None, None]
    dense = allowed(branch, documents, position_ids, window, rows_index, offsets[None, :, None], offsets[None, None, :])
    # Additive, in the model's dtype, for sdpa too: sdpa turns a boolean mask into that in every layer, and
    # each layer's copy is kept for backward; this one tensor is shared by all layers.
    additive = torch.zeros((rows, 1, width, width), dtype=dtype, device=branch.device)
    return additive.masked_fill_(~dense.unsqueeze(1), torch.finfo(dtype).min)
