"""Preference losses as pure functions: (B,) log-prob tensors in, per-pair losses and rewards out.

No reduction, no config objects, no `.item()`: the caller weights and averages. Each loss is a
separate function registered in `LOSSES`; the trainer looks its function up once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    """Per-pair outputs, all (B,). Rewards are detached: they are metrics, not part of the graph."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w|x) - log pi_ref(y_w|x))
    rejected_rewards: torch.Tensor  # beta * (log pi(y_l|x) - log pi_ref(y_l|x))


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7).

    loss = -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))
    Written with `F.logsigmoid`, which is stable for large margins of either sign.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return PreferenceLoss(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


LossFn = Callable[..., PreferenceLoss]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
}
