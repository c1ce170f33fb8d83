"""Preference losses as pure functions: per-pair log-probs in, per-pair losses and rewards out.

No reduction, no config objects, no `.item()`: the caller weights and averages. Each loss is a
separate function taking `PreferenceInputs` and its own hyper-parameters by keyword; `LOSSES`
registers them with whether they need reference log-probs (SimPO and ORPO do not, and then no
reference is loaded at all); `combine` sums a weighted list of them per pair, as TRL's multi-loss
`loss_type` does. The margin-based ones compare `inputs.scores()`: the log-ratios, or f-DPO's
f'(pi/pi_ref) under another divergence (`divergence_scores`). Conventions follow TRL's DPOTrainer /
CPOTrainer / ORPOTrainer so numbers compare; where they normalise by length, the docstring says so.
"""

from __future__ import annotations

import math
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
    f_divergence: str = "reverse_kl"  # dpo.f_divergence_type: what `scores` makes of the log-ratios
    f_alpha: float = 0.5  # dpo.f_alpha_divergence_coef
    # (B,) bool, False for eval padding pairs (weight 0): the batch-level losses (AOT) sort the real pairs only.
    # None: every pair is real.
    real_pairs: torch.Tensor | None = None

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi/pi_ref for chosen and rejected."""
        return self.policy_chosen_logps - self.ref_chosen_logps, self.policy_rejected_logps - self.ref_rejected_logps

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the margin-based losses compare, chosen's minus rejected's: the log-ratios under DPO's reverse KL,
        f'(pi/pi_ref) under another divergence (`divergence_scores`)."""
        chosen_logratios, rejected_logratios = self.logratios()
        return (divergence_scores(chosen_logratios, self.f_divergence, self.f_alpha),
                divergence_scores(rejected_logratios, self.f_divergence, self.f_alpha))

    def mean_token_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs (average over completion tokens)."""
        return (
            self.policy_chosen_logps / self.chosen_tokens.clamp(min=1),
            self.policy_rejected_logps / self.rejected_tokens.clamp(min=1),
        )


def divergence_scores(logratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(t) at t = pi/pi_ref (log t = `logratios`), the reward f-DPO puts where DPO has log t (Wang et al. 2023,
    "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
    Table 1), as TRL 1.16 computes it:
    reverse_kl: log t (DPO);  forward_kl: 1 - 1/t;  js_divergence: log 2 + log sigmoid(log t);
    alpha_divergence: (t^(alpha-1) - 1) / (alpha - 1), log t when alpha = 1, its exponent capped at 80 as TRL's
    (float32), so that exp stays finite."""
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratios
        exponent = torch.clamp((f_alpha - 1.0) * logratios.float(), max=80.0)
        return ((torch.exp(exponent) - 1.0) / (f_alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"unknown f-divergence {f_divergence!r}")  # config.F_DIVERGENCES lists the known ones


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
    chosen_scores, rejected_scores = inputs.scores()
    return _dpo_rewards(inputs, beta, -F.logsigmoid(beta * (chosen_scores - rejected_scores)))


def robust_loss(inputs: PreferenceInputs, *, beta: float, label_smoothing: float, **_) -> PreferenceLoss:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8): unbiased under a label
    flip rate eps = label_smoothing < 0.5.

    loss = ((1 - eps) * -log sigmoid(beta z) - eps * -log sigmoid(-beta z)) / (1 - 2 eps)
    """
    chosen_scores, rejected_scores = inputs.scores()
    z = beta * (chosen_scores - rejected_scores)
    eps = label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return _dpo_rewards(inputs, beta, losses)


def hinge_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """SLiC-HF hinge (Zhao et al. 2023, Eq. 1 with the DPO log-ratio margin): relu(1 - beta z)."""
    chosen_scores, rejected_scores = inputs.scores()
    return _dpo_rewards(inputs, beta, torch.relu(1 - beta * (chosen_scores - rejected_scores)))


def ipo_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17), with tau = beta.

    loss = (h - 1 / (2 beta))^2 where h is the log-ratio margin AVERAGED PER TOKEN (chosen and
    rejected each divided by their completion length), as TRL computes it.
    """
    chosen_scores, rejected_scores = inputs.scores()
    h = chosen_scores / inputs.chosen_tokens.clamp(min=1) - rejected_scores / inputs.rejected_tokens.clamp(min=1)
    return _dpo_rewards(inputs, beta, (h - 1 / (2 * beta)) ** 2)


def exo_pair_loss(inputs: PreferenceInputs, *, beta: float, label_smoothing: float, **_) -> PreferenceLoss:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16):
    KL(q || p) between the policy's implied preference q = softmax(beta * log-ratios) over {chosen, rejected}
    and the smoothed label p = (1 - eps, eps), eps = label_smoothing > 0 (the paper uses 1e-3).

    loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),  q_w = sigmoid(beta z), q_l = sigmoid(-beta z)
    """
    chosen_scores, rejected_scores = inputs.scores()
    z = beta * (chosen_scores - rejected_scores)
    eps = label_smoothing
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return _dpo_rewards(inputs, beta, losses)


def nca_pair_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment", Eq. 12 with K = 1): each completion's
    reward r = beta * log-ratio is scored on its own, not only against the other, so the chosen one's
    likelihood is pushed up rather than only the margin.

    loss = -log sigmoid(r_w) - 0.5 log sigmoid(-r_w) - 0.5 log sigmoid(-r_l)
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
    return _dpo_rewards(inputs, beta, -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l))


def bco_pair_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", Eq. 5, without the reward shift
    delta, as TRL 1.16 computes it): chosen classified as good, rejected as bad, each by its own reward.

    loss = -log sigmoid(r_w) - log sigmoid(-r_l),  r = beta * log-ratio
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    return _dpo_rewards(inputs, beta, -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios))


def sppo_hard_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7 with P = 1 for the
    winner and 0 for the loser): each log-ratio regressed onto +-1 / (2 beta).

    loss = (log-ratio_w - 1 / (2 beta))^2 + (log-ratio_l + 1 / (2 beta))^2
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    target = 0.5 / beta
    return _dpo_rewards(inputs, beta, (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2)


def apo_zero_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7): for chosen answers
    better than the model's own; raises the chosen likelihood and lowers the rejected one, each on its own.

    loss = (1 - sigmoid(r_w)) + sigmoid(r_l),  r = beta * log-ratio
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    return _dpo_rewards(inputs, beta, 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios))


def apo_down_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """APO-down (the same paper, Eq. 8): for chosen answers worse than the model's own; lowers the chosen
    likelihood, and the rejected one more.

    loss = sigmoid(r_w) + (1 - sigmoid(r_w - r_l)),  r = beta * log-ratio
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    return _dpo_rewards(inputs, beta, losses)


def discopop_loss(inputs: PreferenceInputs, *, beta: float, discopop_tau: float, **_) -> PreferenceLoss:
    """DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms", Eq. 5): the logistic
    (DPO) loss and the exponential loss blended by sigmoid(z / tau), z = beta * log-ratio margin.

    loss = (1 - sigmoid(z / tau)) * -log sigmoid(z) + sigmoid(z / tau) * exp(-z)
    The second product is taken as exp(-z + log sigmoid(z / tau)): for a very negative z, exp(-z) alone
    overflows to inf and inf x 0 would be nan, where the product itself is ~0.
    """
    chosen_scores, rejected_scores = inputs.scores()
    z = beta * (chosen_scores - rejected_scores)
    losses = torch.sigmoid(-z / discopop_tau) * -F.logsigmoid(z) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    return _dpo_rewards(inputs, beta, losses)


def sorted_over_pairs(values: torch.Tensor, real_pairs: torch.Tensor | None) -> torch.Tensor:
    """`values` (B,) with the real pairs' entries sorted ascending among themselves, in the real pairs' places;
    padding pairs keep theirs (they weigh 0). Differentiable: sorting only permutes. No host sync (no boolean
    indexing): padding sorts after every real value, and the k-th smallest goes to the k-th real pair's place."""
    if real_pairs is None:
        return torch.sort(values).values
    ranked = torch.sort(torch.where(real_pairs, values, torch.inf)).values
    places = torch.sort((~real_pairs).to(torch.int8), stable=True).indices  # real pairs' places first, in order
    placed = torch.empty_like(values).scatter(0, places, ranked)
    return torch.where(real_pairs, placed, values)


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """cDPO's label-smoothed logistic loss: (1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def aot_loss(inputs: PreferenceInputs, *, beta: float, label_smoothing: float, **_) -> PreferenceLoss:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    Eq. 11 with the logistic loss): the policy's chosen-minus-rejected log-prob margins must dominate the
    reference's in distribution, so both are sorted over the micro-batch's pairs and compared rank by rank.
    A BATCH-LEVEL loss, as in TRL: pair i's loss depends on the other pairs of its micro-batch.

    d = sort_i(logp_w - logp_l) - sort_i(logp_ref_w - logp_ref_l);  loss = (1 - eps) * -log sigmoid(beta d) + eps * -log sigmoid(-beta d)
    """
    margins = sorted_over_pairs(inputs.policy_chosen_logps - inputs.policy_rejected_logps, inputs.real_pairs)
    ref_margins = sorted_over_pairs(inputs.ref_chosen_logps - inputs.ref_rejected_logps, inputs.real_pairs)
    return _dpo_rewards(inputs, beta, _smoothed_sigmoid(beta * (margins - ref_margins), label_smoothing))


def aot_unpaired_loss(inputs: PreferenceInputs, *, beta: float, label_smoothing: float, **_) -> PreferenceLoss:
    """AOT, unpaired (the same paper, Eq. 10): the chosen log-ratios must dominate the rejected ones in
    distribution, each sorted over the micro-batch on its own (for data whose chosen and rejected answers
    are not matched pairs). Batch-level, as `aot_loss`.

    d = sort_i(log-ratio_w) - sort_i(log-ratio_l);  loss as `aot_loss`
    """
    chosen_logratios, rejected_logratios = inputs.logratios()
    delta = (sorted_over_pairs(chosen_logratios, inputs.real_pairs)
             - sorted_over_pairs(rejected_logratios, inputs.real_pairs))
    return _dpo_rewards(inputs, beta, _smoothed_sigmoid(beta * delta, label_smoothing))


def sigmoid_norm_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """DPO on log-ratios averaged per completion token (TRL's sigmoid_norm): the sigmoid loss without its
    pull toward long chosen / short rejected answers.

    loss = -log sigmoid(beta * (log-ratio_w / |y_w| - log-ratio_l / |y_l|))
    """
    chosen_scores, rejected_scores = inputs.scores()
    h = chosen_scores / inputs.chosen_tokens.clamp(min=1) - rejected_scores / inputs.rejected_tokens.clamp(min=1)
    return _dpo_rewards(inputs, beta, -F.logsigmoid(beta * h))


def sft_loss(inputs: PreferenceInputs, *, beta: float, **_) -> PreferenceLoss:
    """The chosen answers' NLL as a loss of its own, for mixes such as MPO (`dpo.loss_type: [sigmoid, bco_pair,
    sft]`), as TRL 1.16 computes it: averaged over ALL chosen tokens of the micro-batch's real pairs, not per pair
    first (so a long answer weighs more than a short one). Batch-level, written per pair so that the pairs' mean is
    that token mean: pair i's share is -logp(y_w_i) / mean_j |y_w_j|. (`dpo.sft_weight` adds RPO's per-pair form,
    `chosen_nll`; the two agree where chosen answers are equally long.)"""
    real = inputs.real_pairs.float() if inputs.real_pairs is not None else torch.ones_like(inputs.policy_chosen_logps)
    mean_tokens = (inputs.chosen_tokens * real).sum() / real.sum().clamp(min=1)
    return _dpo_rewards(inputs, beta, -inputs.policy_chosen_logps / mean_tokens.clamp(min=1))


def combine(parts: list[tuple[PreferenceLoss, float]]) -> PreferenceLoss:
    """A weighted sum of several losses of the same pairs (`dpo.loss_type` as a list, `dpo.loss_weights`), as
    TRL combines them; the rewards are the first loss's (every reference-based loss logs beta * log-ratio)."""
    first = parts[0][0]
    losses = sum(weight * part.losses for part, weight in parts)
    return PreferenceLoss(losses, first.chosen_rewards, first.rejected_rewards)


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
    """(B,) negative log-likelihood per completion token of the chosen answer, each pair on its own: the term
    `dpo.sft_weight` adds (RPO, Pang et al. 2024, Eq. 3, normalised by |y_w|) and the `nll_loss` metric."""
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
    "exo_pair": LossSpec(exo_pair_loss, needs_reference=True),
    "nca_pair": LossSpec(nca_pair_loss, needs_reference=True),
    "bco_pair": LossSpec(bco_pair_loss, needs_reference=True),
    "sppo_hard": LossSpec(sppo_hard_loss, needs_reference=True),
    "apo_zero": LossSpec(apo_zero_loss, needs_reference=True),
    "apo_down": LossSpec(apo_down_loss, needs_reference=True),
    "discopop": LossSpec(discopop_loss, needs_reference=True),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, needs_reference=True),
    "aot": LossSpec(aot_loss, needs_reference=True),
    "aot_unpaired": LossSpec(aot_unpaired_loss, needs_reference=True),
    "sft": LossSpec(sft_loss, needs_reference=True),
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
