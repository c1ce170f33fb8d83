"""Every preference loss against values worked out by hand (closed forms via `math`, not torch)."""

import inspect
import math

import pytest
import torch

from dpo_dist.config import LABEL_SMOOTHING_LOSSES, LOSS_TYPES, REFERENCE_FREE_LOSSES
from dpo_dist.losses import (
    router_balance_loss,
    LOSSES,
    PreferenceInputs,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    chosen_nll,
    combine,
    discopop_loss,
    divergence_scores,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)"""
    return math.log1p(math.exp(x))


def pair(pc, pr, rc=None, rr=None, nc=1, nr=1, grad=False):
    t = lambda v: torch.tensor([float(v)], requires_grad=grad)  # noqa: E731
    return PreferenceInputs(
        policy_chosen_logps=t(pc), policy_rejected_logps=t(pr),
        chosen_tokens=torch.tensor([nc]), rejected_tokens=torch.tensor([nr]),
        ref_chosen_logps=None if rc is None else t(rc), ref_rejected_logps=None if rr is None else t(rr),
    )


# The standard case: chosen log-ratio -1 - (-2) = 1, rejected log-ratio -3 - (-2) = -1, margin 2.
STANDARD = dict(pc=-1.0, pr=-3.0, rc=-2.0, rr=-2.0)


def test_sigmoid_closed_form():
    # z = beta * margin = 0.1 * 2 = 0.2; loss = log(1 + e^-0.2) = 0.5981389
    out = sigmoid_loss(pair(**STANDARD), beta=0.1)
    assert out.losses.item() == pytest.approx(0.5981389, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_sigmoid_equal_policy_and_reference_gives_ln2_and_large_margins_stay_finite():
    logps = torch.tensor([-5.0, -7.5, -0.25])
    same = PreferenceInputs(logps, logps - 1, torch.ones(3), torch.ones(3), logps, logps - 1)
    assert torch.allclose(sigmoid_loss(same, beta=0.5).losses, torch.full((3,), math.log(2.0)))
    huge = sigmoid_loss(pair(0.0, -4000.0, 0.0, 0.0), beta=0.5).losses.item()
    assert huge == pytest.approx(0.0, abs=1e-12)
    flipped = sigmoid_loss(pair(0.0, 4.0, 0.0, 0.0), beta=0.5).losses.item()
    assert flipped == pytest.approx(softplus(2.0), abs=1e-6)  # z = -2: log(1 + e^2) = 2.126928


def test_sigmoid_gradient_signs():
    """Descending the loss raises the chosen log-prob and lowers the rejected one."""
    inputs = pair(-2.0, -2.0, -2.0, -2.0, grad=True)
    sigmoid_loss(inputs, beta=0.1).losses.sum().backward()
    # d/dchosen of -log sigmoid(beta (c - r)) at c = r is -beta * sigmoid(0) = -0.05
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(-0.05)
    assert inputs.policy_rejected_logps.grad.item() == pytest.approx(0.05)


def test_robust():
    # z = 0.2, eps = 0.1: ((0.9 * log(1+e^-0.2)) - 0.1 * log(1+e^0.2)) / 0.8 = 0.5731389
    expected = (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8
    assert expected == pytest.approx(0.5731389, abs=1e-6)
    assert robust_loss(pair(**STANDARD), beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(expected, abs=1e-6)
    # eps = 0 is plain DPO
    assert robust_loss(pair(**STANDARD), beta=0.1, label_smoothing=0.0).losses.item() == pytest.approx(0.5981389, abs=1e-6)


def test_hinge():
    # relu(1 - 0.1 * 2) = 0.8; a margin past 1/beta costs nothing
    assert hinge_loss(pair(**STANDARD), beta=0.1).losses.item() == pytest.approx(0.8)
    assert hinge_loss(pair(0.0, -20.0, 0.0, 0.0), beta=0.1).losses.item() == 0.0


def test_ipo_is_length_normalised():
    # per-token margin h = 1/2 - (-1)/4 = 0.75; (0.75 - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625
    assert ipo_loss(pair(**STANDARD, nc=2, nr=4), beta=0.1).losses.item() == pytest.approx(18.0625)


def test_simpo_reference_free():
    # mean logps -2/2 = -1 and -8/4 = -2; z = 2 * 1 - 0.5 = 1.5; loss = log(1 + e^-1.5) = 0.2014133
    out = simpo_loss(pair(-2.0, -8.0, nc=2, nr=4), beta=2.0, simpo_gamma=0.5)
    assert out.losses.item() == pytest.approx(0.2014133, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-2.0) and out.rejected_rewards.item() == pytest.approx(-4.0)


def test_orpo_reference_free():
    # p_w = -1, p_l = -2; log odds = p - log(1 - e^p): -0.5413249 and -1.8545865, difference 1.3132617
    # loss = -p_w + beta * log(1 + e^-1.3132617) = 1 + 0.1 * log(1.2689414) = 1 + 0.1 * 0.2381830 = 1.0238183
    log_odds = (-1 - math.log(1 - math.exp(-1))) - (-2 - math.log(1 - math.exp(-2)))
    assert log_odds == pytest.approx(1.3132617, abs=1e-6)
    expected = 1.0 + 0.1 * softplus(-log_odds)
    assert expected == pytest.approx(1.0238183, abs=1e-6)
    assert orpo_loss(pair(-2.0, -6.0, nc=2, nr=3), beta=0.1).losses.item() == pytest.approx(expected, abs=1e-6)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# STANDARD at beta 0.1: rewards r_w = 0.1, r_l = -0.1, z = beta * margin = 0.2. Each line: the loss, its value
# worked out with `math` from the paper's formula (as TRL 1.16 writes it).
PER_PAIR_CLOSED_FORMS = {
    # EXO, eps = 1e-3: KL((q_w, q_l) || (1 - eps, eps)), q_w = sigmoid(z)
    "exo_pair": (exo_pair_loss, dict(label_smoothing=1e-3),
                 sigmoid(0.2) * (math.log(sigmoid(0.2)) - math.log(1 - 1e-3))
                 + sigmoid(-0.2) * (math.log(sigmoid(-0.2)) - math.log(1e-3))),
    # NCA: -log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l) = softplus(-0.1) + 0.5 softplus(0.1) + 0.5 softplus(-0.1)
    "nca_pair": (nca_pair_loss, {}, 1.5 * softplus(-0.1) + 0.5 * softplus(0.1)),
    # BCO: -log s(r_w) - log s(-r_l) = 2 softplus(-0.1)
    "bco_pair": (bco_pair_loss, {}, 2 * softplus(-0.1)),
    # SPPO hard: (1 - 5)^2 + (-1 + 5)^2 = 32
    "sppo_hard": (sppo_hard_loss, {}, 32.0),
    # APO-zero: 1 - s(0.1) + s(-0.1) = 2 s(-0.1)
    "apo_zero": (apo_zero_loss, {}, 2 * sigmoid(-0.1)),
    # APO-down: s(r_w) + 1 - s(z)
    "apo_down": (apo_down_loss, {}, sigmoid(0.1) + 1 - sigmoid(0.2)),
    # DiscoPOP, tau 0.05: (1 - s(z / tau)) softplus(-z) + s(z / tau) e^-z
    "discopop": (discopop_loss, dict(discopop_tau=0.05), (1 - sigmoid(4.0)) * softplus(-0.2) + sigmoid(4.0) * math.exp(-0.2)),
}


@pytest.mark.parametrize("name", sorted(PER_PAIR_CLOSED_FORMS))
def test_trl_pair_losses_closed_form(name):
    loss_fn, settings, expected = PER_PAIR_CLOSED_FORMS[name]
    out = loss_fn(pair(**STANDARD), beta=0.1, **settings)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
    assert LOSSES[name].fn is loss_fn and LOSSES[name].needs_reference


def test_sigmoid_norm_is_length_normalised():
    # per-token margin h = 1/2 - (-1)/4 = 0.75 (as IPO's); loss = log(1 + e^-(0.1 * 0.75))
    out = sigmoid_norm_loss(pair(**STANDARD, nc=2, nr=4), beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.075), abs=1e-6)


def test_discopop_stays_finite_where_its_exponential_overflows():
    # z = 0.5 * -4000 = -2000: e^-z overflows, s(z / tau) underflows; the blend is the logistic part, softplus(2000)
    out = discopop_loss(pair(0.0, 4000.0, 0.0, 0.0), beta=0.5, discopop_tau=0.05)
    assert out.losses.item() == pytest.approx(2000.0)
    inputs = pair(0.0, 4000.0, 0.0, 0.0, grad=True)
    discopop_loss(inputs, beta=0.5, discopop_tau=0.05).losses.sum().backward()
    assert inputs.policy_chosen_logps.grad.item() == pytest.approx(-0.5)  # d/dc softplus(-0.5 (c - r)) = -0.5 s(2000)


def test_divergence_scores_closed_form():
    t = torch.tensor([0.5, -2.0])
    cases = {
        "reverse_kl": [0.5, -2.0],
        "forward_kl": [1 - math.exp(-0.5), 1 - math.exp(2.0)],  # 1 - 1/t
        "js_divergence": [math.log(2) - softplus(-0.5), math.log(2) - softplus(2.0)],  # log(2t / (t + 1))
        "alpha_divergence": [(math.exp(-0.25) - 1) / -0.5, (math.exp(1.0) - 1) / -0.5],  # (t^(a-1) - 1) / (a - 1), a = 0.5
    }
    for name, expected in cases.items():
        assert divergence_scores(t, name, 0.5).tolist() == pytest.approx(expected, abs=1e-6), name
    assert divergence_scores(t, "alpha_divergence", 1.0).tolist() == pytest.approx([0.5, -2.0])  # the limit: log t
    capped = divergence_scores(torch.tensor([100.0]), "alpha_divergence", 3.0).item()  # exponent 200 capped at 80
    assert capped == pytest.approx((math.exp(80.0) - 1) / 2, rel=1e-5) and math.isfinite(capped)


def test_f_divergence_replaces_the_log_ratios_in_the_margin_only():
    # js: score = log 2 + log s(log t); the margin log s(1) - log s(-1) = 1 exactly, so z = 0.1 * 1
    inputs = pair(**STANDARD)
    inputs.f_divergence = "js_divergence"
    out = sigmoid_loss(inputs, beta=0.1)
    assert out.losses.item() == pytest.approx(softplus(-0.1), abs=1e-6)
    # The rewards stay beta x log-ratio, as TRL logs them under any divergence
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_mpo_mix_is_the_weighted_sum_per_pair():
    # MPO (TRL's example): [sigmoid, bco_pair, sft] weighted [0.8, 0.2, 1.0]; sft = the chosen NLL per token
    inputs = pair(**STANDARD, nc=2, nr=4)
    parts = [(sigmoid_loss(inputs, beta=0.1), 0.8), (bco_pair_loss(inputs, beta=0.1), 0.2), (sft_loss(inputs, beta=0.1), 1.0)]
    out = combine(parts)
    assert out.losses.item() == pytest.approx(0.8 * softplus(-0.2) + 0.2 * 2 * softplus(-0.1) + 1.0 * 0.5, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)


def batch(pc, pr, rc, rr, real=None, grad=False):
    t = lambda values: torch.tensor([float(v) for v in values], requires_grad=grad)  # noqa: E731
    ones = torch.ones(len(pc), dtype=torch.long)
    return PreferenceInputs(t(pc), t(pr), ones, ones, t(rc), t(rr),
                            real_pairs=None if real is None else torch.tensor(real))


# Three pairs. Policy margins logp_w - logp_l: 2, -1, 0.5; reference margins: 0, 1, -3. Log-ratios: chosen
# -1 - (-2) = 1, -4 - (-1) = -3, -2 - (-1.5) = -0.5; rejected -3 - (-2) = -1, -3 - (-2) = -1, -2.5 - (1.5) = -4.
AOT_BATCH = dict(pc=[-1.0, -4.0, -2.0], pr=[-3.0, -3.0, -2.5], rc=[-2.0, -1.0, -1.5], rr=[-2.0, -2.0, 1.5])


def smoothed(z: float, eps: float) -> float:
    return (1 - eps) * softplus(-z) + eps * softplus(z)


def test_aot_compares_sorted_margins_rank_by_rank():
    """AOT (paired): sorted policy margins (-1, 0.5, 2) minus sorted reference margins (-3, 0, 1) = (2, 0.5, 1),
    rank by rank: NOT pair by pair (pair 0 alone would compare 2 with 0)."""
    out = aot_loss(batch(**AOT_BATCH), beta=0.5, label_smoothing=0.1)
    expected = [smoothed(0.5 * d, 0.1) for d in (2.0, 0.5, 1.0)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -1.5, -0.25])  # beta x log-ratio, per pair, as TRL
    assert LOSSES["aot"].fn is aot_loss and LOSSES["aot"].needs_reference


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_apart():
    """Chosen log-ratios sorted (-3, -0.5, 1), rejected sorted (-4, -1, -1): differences (1, 0.5, 2)."""
    out = aot_unpaired_loss(batch(**AOT_BATCH), beta=0.5, label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx([softplus(-0.5 * d) for d in (1.0, 0.5, 2.0)], abs=1e-6)
    assert LOSSES["aot_unpaired"].fn is aot_unpaired_loss


@pytest.mark.parametrize("loss_fn", [aot_loss, aot_unpaired_loss])
def test_aot_leaves_eval_padding_pairs_out_of_the_sort(loss_fn):
    """An eval batch's weight-0 padding pairs (here a middle one with extreme values, and one at the end) change
    none of the real pairs' losses, and gradients stay finite."""
    plain = loss_fn(batch(**AOT_BATCH), beta=0.5, label_smoothing=0.1).losses
    padded_values = {key: [v[0], -90.0, v[1], v[2], 50.0] for key, v in AOT_BATCH.items()}
    real = [True, False, True, True, False]
    padded_inputs = batch(**padded_values, real=real, grad=True)
    padded = loss_fn(padded_inputs, beta=0.5, label_smoothing=0.1).losses
    assert padded[torch.tensor(real)].tolist() == pytest.approx(plain.tolist(), abs=1e-6)
    (padded * torch.tensor([float(r) for r in real])).sum().backward()
    assert torch.isfinite(padded_inputs.policy_chosen_logps.grad).all()
    assert padded_inputs.policy_chosen_logps.grad[1] == 0 and padded_inputs.policy_chosen_logps.grad[4] == 0


def test_sft_is_the_token_mean_over_the_batchs_chosen_answers():
    """TRL 1.16's sft: the chosen answers' NLL averaged over all their tokens at once. Chosen answers of 2, 4 and 6
    tokens with log-probs -2, -12, -6: (2 + 12 + 6) / 12 tokens, not the per-pair mean (1 + 3 + 1) / 3; a weight-0
    eval padding pair changes nothing."""
    def inputs(logps, tokens, real=None):
        t = torch.tensor(logps)
        return PreferenceInputs(t, t, torch.tensor(tokens), torch.tensor(tokens), t, t,
                                real_pairs=None if real is None else torch.tensor(real))

    out = sft_loss(inputs([-2.0, -12.0, -6.0], [2, 4, 6]), beta=0.1)
    assert out.losses.mean().item() == pytest.approx(20 / 12)
    assert chosen_nll(inputs([-2.0, -12.0, -6.0], [2, 4, 6])).mean().item() == pytest.approx(5 / 3)  # RPO's, per pair
    padded = sft_loss(inputs([-2.0, -12.0, -6.0, -1000.0], [2, 4, 6, 100], [True, True, True, False]), beta=0.1)
    assert padded.losses[:3].sum().item() / 3 == pytest.approx(20 / 12)


def test_chosen_nll_is_per_token():
    assert chosen_nll(pair(-6.0, -1.0, nc=3)).item() == pytest.approx(2.0)


def test_registry_matches_the_config_choices():
    assert tuple(LOSSES) == LOSS_TYPES
    reads_smoothing = {name for name, spec in LOSSES.items() if "label_smoothing" in inspect.signature(spec.fn).parameters}
    assert reads_smoothing == set(LABEL_SMOOTHING_LOSSES)
    assert {name for name, spec in LOSSES.items() if not spec.needs_reference} == set(REFERENCE_FREE_LOSSES)
    chosen = torch.tensor([-1.0], requires_grad=True)
    out = LOSSES["sigmoid"].fn(PreferenceInputs(chosen, torch.tensor([-2.0]), torch.ones(1), torch.ones(1),
                                                torch.tensor([-1.5]), torch.tensor([-1.5])), beta=1.0)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_router_balance_loss_by_hand_and_against_transformers():
    """E x sum_e f_e P_e over real tokens. By hand: 2 experts, top-1, two real tokens routed one to each with
    probabilities (0.75, 0.25) and (0.25, 0.75): f = (1/2, 1/2), P = (1/2, 1/2), loss 2 x (1/4 + 1/4) = 1.0; a
    padding token routed anywhere changes nothing. Uniform routing gives top_k. Then random logits with padding
    against transformers' own Qwen3-MoE load_balancing_loss_func (its aux_loss, which TRL adds)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    half = math.log(3.0)  # softmax((log 3, 0)) = (0.75, 0.25)
    logits = (torch.tensor([[half, 0.0], [0.0, half], [9.0, 0.0]]),)
    assert router_balance_loss(logits, 1, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.0)
    assert router_balance_loss((torch.zeros(6, 8),), 3, torch.ones(2, 3)).item() == pytest.approx(3.0)
    torch.manual_seed(0)
    layers = tuple(torch.randn(4 * 5, 6) for _ in range(3))  # 3 layers, 4 rows of 5 tokens, 6 experts
    real = (torch.arange(5)[None, :] < torch.tensor([5, 3, 4, 1])[:, None]).long()
    got = router_balance_loss(layers, 2, real)
    assert got.item() == pytest.approx(load_balancing_loss_func(layers, 6, 2, real).item(), rel=1e-6)
    assert got.item() != pytest.approx(router_balance_loss(layers, 2, torch.ones_like(real)).item(), rel=1e-3)  # padding matters
