"""Preference losses as pure functions: per-pair log-probs in, per-pair losses and rewards out.

No reduction, no config objects, no `.item()`: the caller weights and averages. Each loss is a
separate function taking `PreferenceInputs` and its own hyper-parameters by keyword; `LOSSES`
registers them with whether they need reference log-probs (SimPO and ORPO do not, and then no
reference is loaded at all). Conventions follow TRL's DPOTrainer / CPOTrainer / ORPOTrainer so
numbers compare; where they normalise by length, the docstring says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PreferenceInputs:
    """All (B,). Log-probs are sums over completion tokens; token counts are completion lengths."""

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi/pi_ref for chosen and rejected."""
        return self.policy_chosen_logps - self.ref_chosen_logps, self.policy_rejected_logps - self.ref_rejected_logps

    def mean_token_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs (average over completion tokens)."""
        return (
            self.policy_chosen_logps / self.chosen_tokens.clamp(min=1),
            self.policy_rejected_logps / self.rejected_tokens.clamp(min=1),
        )


@dataclass
class PreferenceLoss:
    """Per-pair outputs, all (B,). Rewards are detached: they are metrics, not part of the graph."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _dpo_rewards(inputs: PreferenceInputs, beta: float, losses: torch.Tensor) -> PreferenceLoss:
    chosen_logratios, rejected_logratios = inputs.logratios()
    return PreferenceLoss(losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach())


def sigmoid_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7).

    loss = -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))
    Written with `F.logsigmoid`, which is stable for large margins of either sign.
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    return _dpo_rewards(inputs, beta, -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)))


def robust_loss(inputs: PreferenceInputs, *, beta: float, label_smoothing: float, **_) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8): unbiased under a label
    flip rate eps = label_smoothing < 0.5.

    loss = ((1 - eps) * -log sigmoid(beta z) - eps * -log sigmoid(-beta z)) / (1 - 2 eps)
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    z = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return _dpo_rewards(inputs, beta, losses)


def hinge_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """SLiC-HF hinge (Zhao et al. 2023, Eq. 1 with the DPO log-ratio margin): relu(1 - beta z)."""
    chosen_logratios, rejected_logratios = inputs.logratios()
    return _dpo_rewards(inputs, beta, torch.relu(1 - beta * (chosen_logratios - rejected_logratios)))


def ipo_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17), with tau = beta.

    loss = (h - 1 / (2 beta))^2 where h is the log-ratio margin AVERAGED PER TOKEN (chosen and
    rejected each divided by their completion length), as TRL computes it.
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    h = chosen_logratios / inputs.chosen_tokens.clamp(min=1) - rejected_logratios / inputs.rejected_tokens.clamp(min=1)
    return _dpo_rewards(inputs, beta, (h - 1 / (2 * beta)) ** 2)


def simpo_loss(inputs: PreferenceInputs, *, beta: float, simpo_gamma: float, **_) -> PreferenceLoss:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free: length-normalised log-probs and a margin.

    loss = -log sigmoid(beta * (mean logp(y_w) - mean logp(y_l)) - gamma); rewards = beta * mean logp.
    """
    chosen, rejected = inputs.mean_token_logps()
    losses = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def orpo_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """ORPO (Hong et al. 2024, Eq. 6-7), reference-free: NLL of the chosen completion plus
    beta (the paper's lambda) times -log sigmoid(log odds ratio), with per-token mean log-probs p:

    log odds(y) = p - log(1 - exp(p));  loss = -p(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l))
    rewards = beta * p (as TRL's ORPOTrainer logs them).
    """
    chosen, rejected = inputs.mean_token_logps()
    # log(1 - exp(p)) for p < 0, computed stably as log(-expm1(p))
    log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, (beta * chosen).detach(), (beta * rejected).detach())


def chosen_nll(inputs: PreferenceInputs) -> torch.Tensor:
    """(B,) negative log-likelihood per completion token of the chosen answer: the SFT term that
    `dpo.sft_weight` adds (TRL's rpo_alpha; RPO, Pang et al. 2024, Eq. 3)."""
    return -inputs.policy_chosen_logps / inputs.chosen_tokens.clamp(min=1)


LossFn = Callable[..., PreferenceLoss]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, needs_reference=True),
    "robust": LossSpec(robust_loss, needs_reference=True),
    "hinge": LossSpec(hinge_loss, needs_reference=True),
    "ipo": LossSpec(ipo_loss, needs_reference=True),
    "simpo": LossSpec(simpo_loss, needs_reference=False),
    "orpo": LossSpec(orpo_loss, needs_reference=False),
}


def router_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, real_tokens: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2022, eqs. 4-6) over a MoE model's layers, as
    transformers computes a Qwen3-MoE's aux_loss and TRL adds it: E x sum_e f_e P_e, where f_e is the share of
    top-k routing slots given to expert e and P_e the mean router probability of e, both over the real tokens
    (`real_tokens`, 1 on them, the layout's (rows, T) mask) of every layer. top_k when routing is uniform.

    `router_logits`: one (rows x T, E) tensor per layer. Weighted means rather than selecting the real tokens,
    so that the device is never asked how many there are."""
    logits = torch.cat(router_logits, dim=0).float()  # (layers x rows x T, E)
    num_experts = logits.shape[-1]
    weights = real_tokens.reshape(-1).to(logits.dtype).repeat(len(router_logits))  # (layers x rows x T,)
    probs = torch.softmax(logits, dim=-1)
    slots = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).to(logits.dtype)
    total = weights.sum()
    routed_share = (slots * weights[:, None, None]).sum(dim=0) / total  # (k, E)
    mean_prob = (probs * weights[:, None]).sum(dim=0) / total  # (E,)
    return num_experts * (routed_share * mean_prob).sum()
