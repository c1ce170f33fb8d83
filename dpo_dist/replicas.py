"""Ranks that each load a whole model from their own files must hold the same model.

On a multi-node job every node often has its own copy of the checkpoints (copied to local disk for speed).
Copies drift apart: a stale rsync, a re-exported SFT model on one node. Where each rank holds the whole model
(ZeRO 0-2; under ZeRO-3 only rank 0's files are read, see `models.py`) that would go unnoticed:
- the policy: DeepSpeed's training engine broadcasts rank 0's parameters, so every rank trains rank 0's weights,
  silently; a model of another shape fails in that broadcast with no hint why; `launch/evaluate.py` (no
  training engine) would score each rank's own copy;
- a separate reference model is no engine, so each rank would score with its own copy, and the "same" loss
  would differ by rank (and a precomputed cache would mix several references under rank 0's fingerprint).

`agree_with_main` compares each rank's model with rank 0's right after loading: its config, the names, shapes
and dtypes of its tensors, and an exact checksum of each tensor's bits. Another config or shape is a
`UserError` naming the ranks and hosts. Other values are not an error: rank 0's are broadcast into every copy,
so every rank uses rank 0's model, and the caller logs the line this returns so that the stale copy gets noticed.
The checksums cost one read of the weights per rank (1.3 s for a 4B model's 8 GB in host memory, on one core here),
and only with more than one rank; the broadcast happens only where copies differ.
"""

from __future__ import annotations

import hashlib
import socket

import numpy as np
import torch
from torch import nn

from dpo_dist.engine import broadcast_array, gather_from_each
from dpo_dist.errors import UserError

# Config entries that name where or with what a model was saved, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")

_SAME_SIZE_INTEGERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Elements summed per call on a device: torch widens a whole tensor to int64 at once (8 bytes per element).
_CHECKSUM_CHUNK = 2**24


def tensor_checksum(tensor: torch.Tensor) -> int:
    """The exact sum of the tensor's elements read as integers of the same width: any changed element changes
    it (barring an exact cancellation), and unlike a float sum it does not depend on the order the device adds
    in, so two nodes with different thread counts or GPUs agree on the same bits. (Where an int64 sum would
    overflow, past 2^48 bf16 or 2^32 fp32 elements in one tensor, it wraps modulo 2^64: still order-free.)"""
    if tensor.numel() == 0:
        return 0
    bits = tensor.detach().contiguous().reshape(-1).view(_SAME_SIZE_INTEGERS[tensor.element_size()])
    if bits.device.type == "cpu":  # numpy widens in small buffers, ~10x torch's CPU sum: ~1.3 s for a 4B model
        return int(bits.numpy().sum(dtype=np.int64))
    return chunked_sum(bits)


def chunked_sum(bits: torch.Tensor) -> int:
    """The int64 sum of a 1-D integer tensor, a chunk at a time (on a GPU, where the sum is fast anyway)."""
    return sum(int(chunk.sum(dtype=torch.int64)) for chunk in bits.split(_CHECKSUM_CHUNK))


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers (rotary frequencies live in buffers), each shared tensor once."""
    return list(model.named_parameters()) + list(model.named_buffers())


def describe(model: nn.Module) -> dict:
    """What must agree across ranks: the config (less provenance), a digest of the tensors' names, shapes and
    dtypes, and each tensor's checksum, in the order of `_named_tensors`."""
    settings = model.config.to_dict()
    for key in _PROVENANCE_KEYS:
        settings.pop(key, None)
    tensors = _named_tensors(model)
    layout = "\n".join(f"{name} {tuple(tensor.shape)} {tensor.dtype}" for name, tensor in tensors)
    return {
        "config": {key: repr(value) for key, value in settings.items()},
        "layout": hashlib.sha256(layout.encode()).hexdigest(),
        "tensors": len(tensors),
        "checksums": [tensor_checksum(tensor) for _, tensor in tensors],
    }


def shape_differences(first: dict, other: dict) -> list[str]:
    """What makes `other` another model than `first`, in words (the config entries, else the tensors' layout,
    which follows from the config); empty if nothing."""
    keys = sorted(set(first["config"]) | set(other["config"]))
    changed = [key for key in keys if first["config"].get(key) != other["config"].get(key)]
    differences = []
    if changed:
        shown = ", ".join(f"{key} ({first['config'].get(key, 'unset')} vs {other['config'].get(key, 'unset')})"
                          for key in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        differences.append(f"config.json differs in {shown}{more}")
    elif first["layout"] != other["layout"]:  # same config, other tensors: e.g. another transformers version
        counts = f" ({first['tensors']} vs {other['tensors']} tensors)" if first["tensors"] != other["tensors"] else ""
        differences.append(f"the tensors differ in name, shape or dtype{counts}")
    return differences


def differing_tensor_counts(views: list[dict]) -> dict[int, int]:
    """For each rank whose checksums differ from rank 0's, how many of its tensors differ."""
    main = views[0]["checksums"]
    counts = {}
    for rank, view in enumerate(views[1:], start=1):
        differing = sum(1 for mine, theirs in zip(main, view["checksums"]) if mine != theirs)
        if differing:
            counts[rank] = differing
    return counts


def _broadcast_from_main(model: nn.Module, device: torch.device) -> None:
    """Rank 0's values into every rank's tensors, in place; host tensors on a GPU backend go through `device`."""
    import torch.distributed as dist

    for _, tensor in _named_tensors(model):
        target = tensor.data
        staged = target if target.is_contiguous() else target.contiguous()
        data = staged.reshape(-1).view(torch.uint8)  # as bytes: any dtype, and a view of `staged`
        if data.device.type == "cpu":
            broadcast_array(data.numpy(), 0, device)
        else:
            dist.broadcast(data, src=0)
        if staged is not target:  # a strided tensor was received into a contiguous copy
            target.copy_(staged)


def agree_with_main(model: nn.Module, what: str, device: torch.device) -> str | None:
    """Make every rank's whole copy of `model` (named `what` in messages) rank 0's model.

    Raises `UserError` when a rank's config or tensor layout differs. Where only the values differ, broadcasts
    rank 0's into every copy and returns the line for the log; else returns None. Every rank reaches the same
    outcome; a world of one returns at once."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return None  # partitioned by ZeRO-3 at creation: only rank 0's files were read
    gathered = gather_from_each((describe(model), socket.gethostname()))
    views, hosts = [view for view, _ in gathered], [host for _, host in gathered]
    for rank, view in enumerate(views[1:], start=1):
        differences = shape_differences(views[0], view)
        if differences:
            raise UserError(
                f"{what}: rank {rank} on {hosts[rank]} loads another model than rank 0 on {hosts[0]}: "
                f"{'; '.join(differences)}. Give every node the same checkpoint (copy it alike, or put it on a "
                "shared file system)"
            )
    counts = differing_tensor_counts(views)
    if not counts:
        return None
    _broadcast_from_main(model, device)
    listed = ", ".join(f"rank {rank} on {hosts[rank]} ({count} of {views[0]['tensors']} tensors)"
                       for rank, count in sorted(counts.items()))
    return (f"{what}: the copies loaded by {listed} hold other weights than rank 0's on {hosts[0]}; every rank now "
            "uses rank 0's. Copy the same checkpoint to every node: as it is, which node rank 0 lands on decides "
            "which model trains")
