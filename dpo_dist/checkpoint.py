"""Exports of the trained policy in Hugging Face layout.

`export_hf` gathers the parameters one at a time (under ZeRO-3 each is all-gathered, copied to CPU
on rank 0, and released), so no rank ever needs the whole model on its device. Rank 0 writes
safetensors + config + tokenizer to a temporary directory and renames it into place: a reader
never sees half an export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dpo_dist.engine import DistInfo, barrier


def gathered_state_dict(model: nn.Module, dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """Full CPU copies of `model`'s parameters and persistent buffers on rank 0 (empty elsewhere)."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if dist_info.is_main:
                state[name] = param.detach().to("cpu", copy=True)
    non_persistent = {
        f"{module_name}.{buffer}" if module_name else buffer
        for module_name, module in model.named_modules()
        for buffer in getattr(module, "_non_persistent_buffers_set", ())
    }
    for name, buffer in model.named_buffers():
        if dist_info.is_main and name not in non_persistent:
            state[name] = buffer.detach().to("cpu", copy=True)
    return state


def export_hf(causal_lm: nn.Module, tokenizer, out_dir: str | os.PathLike, dist_info: DistInfo) -> Path:
    """Write `causal_lm` to `out_dir`, loadable by `from_pretrained`. Collective: every rank calls it.

    A plain model is written as full safetensors weights with its config; a PEFT model as its
    adapter (`peft.PeftModel.from_pretrained` loads it). The tokenizer goes beside either.
    """
    out_dir = Path(out_dir)
    state = gathered_state_dict(causal_lm, dist_info)
    if dist_info.is_main:
        tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if hasattr(causal_lm, "peft_config"):
            causal_lm.save_pretrained(tmp_dir, state_dict=state)
        else:
            causal_lm.save_pretrained(tmp_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp_dir, out_dir)
    barrier()
    return out_dir
