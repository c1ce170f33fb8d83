"""Reference log-probs behind one interface: `reference.logps(batch) -> PairLogps`.

This module holds the separate frozen model strategy: a second `SequenceLogps` in eval mode
(dropout off), with `requires_grad` off and no optimizer, scored under `torch.no_grad()`. Under
ZeRO-3 it is sharded across ranks like the policy; with `reference.offload` its parameters stay in
CPU memory (ZeRO-3 param offload) and are streamed in per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from dpo_dist.data import PairBatch
from dpo_dist.logps import PairLogps, forward_pair


class ModelReference:
    """A frozen reference model; `scorer` is a `SequenceLogps` or a DeepSpeed inference engine around one."""

    def __init__(self, scorer: nn.Module):
        self.scorer = scorer

    @torch.no_grad()
    def logps(self, batch: PairBatch) -> PairLogps:
        return forward_pair(self.scorer, batch)
