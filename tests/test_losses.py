"""The sigmoid DPO loss against values worked out by hand."""

import math

import pytest
import torch

from dpo_dist.losses import LOSSES, sigmoid_loss


def test_closed_form_value():
    # beta=0.1; chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1
    # z = 0.1 * (1 - (-1)) = 0.2; loss = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    out = sigmoid_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert out.losses.item() == pytest.approx(0.5981389, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_equal_policy_and_reference_gives_ln2():
    logps = torch.tensor([-5.0, -7.5, -0.25])
    out = sigmoid_loss(logps, logps - 1, logps, logps - 1, beta=0.5)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(out.chosen_rewards, torch.zeros(3))


def test_per_pair_values_and_large_margins_are_finite():
    # z = beta * margin: 0.5 * 4 = 2 -> log(1+e^-2) = 0.126928; 0.5 * -4 = -2 -> log(1+e^2) = 2.126928
    out = sigmoid_loss(
        torch.tensor([0.0, 0.0, 0.0]),
        torch.tensor([-4.0, 4.0, -4000.0]),
        torch.zeros(3),
        torch.zeros(3),
        beta=0.5,
    )
    assert out.losses[0].item() == pytest.approx(0.126928, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(2.126928, abs=1e-6)
    assert out.losses[2].item() == pytest.approx(0.0, abs=1e-12)  # margin 2000: no overflow, no NaN


def test_gradient_signs():
    """Descending the loss raises the chosen log-prob and lowers the rejected one."""
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    out = sigmoid_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    out.losses.sum().backward()
    # d/dchosen of -log sigmoid(beta*(c - r)) at c = r is -beta * sigmoid(0) = -0.05
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


def test_rewards_are_detached_and_registry_names_sigmoid():
    chosen = torch.tensor([-1.0], requires_grad=True)
    out = LOSSES["sigmoid"](chosen, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=1.0)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
