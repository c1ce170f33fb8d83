"""Metric reduction (weights, per-pair vs per-token means), FLOP counting, the train clock."""

import time

import pytest
import torch

from dpo_dist.logps import PairLogps
from dpo_dist.losses import PreferenceLoss
from dpo_dist.metrics import TOKEN_METRICS, MetricWindow, TrainClock, batch_sums, flops_per_token


def sums(chosen_rewards, rejected_rewards, weight, chosen_tokens, logits_sum, entropy_sum=None, top1=None):
    n = len(chosen_rewards)
    loss = PreferenceLoss(torch.ones(n), torch.tensor(chosen_rewards), torch.tensor(rejected_rewards))
    policy = PairLogps(
        chosen_logps=torch.full((n,), -2.0), rejected_logps=torch.full((n,), -3.0),
        chosen_tokens=torch.tensor(chosen_tokens), rejected_tokens=torch.ones(n, dtype=torch.long),
    )
    if logits_sum is not None:  # else as with training.token_metrics false: the forward computed none
        policy.chosen_logits_sum, policy.rejected_logits_sum = torch.tensor(logits_sum), torch.zeros(n)
        policy.chosen_entropy_sum = torch.tensor(entropy_sum or [0.0] * n)
        policy.rejected_entropy_sum = torch.full((n,), 0.5)
        policy.chosen_top1_tokens = torch.tensor(top1 or [0.0] * n)
    return batch_sums(loss, policy, torch.full((n,), 0.5), torch.tensor(weight), 10, torch.tensor(7))


def test_weighted_means_over_micro_batches():
    window = MetricWindow()
    window.add(sums([0.2, 0.0], [0.1, 0.0], [1.0, 1.0], [2, 2], [4.0, 2.0], [3.0, 1.0], [1.0, 2.0]))
    # the second pair is eval padding
    window.add(sums([0.0, 9.0], [0.5, 0.0], [1.0, 0.0], [6, 6], [6.0, 99.0], [9.0, 99.0], [3.0, 6.0]))
    means = window.reduce()
    assert means["num_pairs"] == 3 and means["num_tokens"] == 20 and means["num_processed_tokens"] == 14
    assert means["rewards/chosen"] == pytest.approx(0.2 / 3)
    assert means["rewards/accuracies"] == pytest.approx(1 / 3)  # strictly greater: the 0 == 0 tie does not count
    assert means["rewards/margins"] == pytest.approx((0.1 + 0.0 - 0.5) / 3)
    assert means["logits/chosen"] == pytest.approx((4 + 2 + 6) / (2 + 2 + 6))  # per token, not per pair
    # over chosen AND rejected tokens (each rejected completion: 1 token of entropy 0.5)
    assert means["entropy"] == pytest.approx((3 + 1 + 9 + 3 * 0.5) / (2 + 2 + 6 + 3))
    assert means["mean_token_accuracy"] == pytest.approx((1 + 2 + 3) / (2 + 2 + 6))  # over chosen tokens only
    assert means["nll_loss"] == pytest.approx(0.5) and "sft_nll_loss" not in means


def test_a_window_without_token_metrics_reports_the_rest_alike():
    """training.token_metrics false: the policy's PairLogps carry no per-token sums; the window leaves those four
    metrics out and every other mean is what it is with them."""
    token_metric_names = {"logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"}
    assert set(TOKEN_METRICS) == token_metric_names
    with_metrics, without, expecting_them = MetricWindow(), MetricWindow(token_metrics=False), MetricWindow()
    for chosen, rejected, weight in (([0.2, 0.0], [0.1, 0.0], [1.0, 1.0]), ([0.0, 9.0], [0.5, 0.0], [1.0, 0.0])):
        with_metrics.add(sums(chosen, rejected, weight, [2, 6], [4.0, 2.0]))
        batch = sums(chosen, rejected, weight, [2, 6], None)
        assert not token_metric_names & set(batch)
        without.add(batch)
        expecting_them.add(batch)
    expected, means = with_metrics.reduce(), without.reduce()
    assert set(expected) - set(means) == token_metric_names
    assert means == {name: value for name, value in expected.items() if name in means}
    assert means["rewards/margins"] == pytest.approx((0.1 + 0.0 - 0.5) / 3)
    # the names reduced follow the window's setting, not the sums at hand: a rank missing one fails, never shortens
    # the one all-reduce's tensor (which the other ranks would not)
    with pytest.raises(KeyError, match="logits/chosen"):
        expecting_them.reduce()


def test_flops_per_token():
    assert flops_per_token(100, 100, 100) == 800  # full fine-tuning + reference: 6N + 2N
    assert flops_per_token(100, 1, 0) == 402  # LoRA, precomputed reference: 4N + 2 N_trainable


def test_train_clock_excludes_paused_time():
    clock = TrainClock()
    time.sleep(0.05)
    clock.pause()
    time.sleep(0.2)
    clock.resume()
    time.sleep(0.05)
    assert 0.09 < clock.seconds() < 0.2
    clock.reset()
    assert clock.seconds() < 0.05


def test_tensorboard_tags_are_the_ones_transformers_writes_for_trl(tmp_path):
    """TRL's runs reach TensorBoard through transformers' callback, which files eval_x under eval/x and the rest
    under train/x (`rewrite_logs`): ours read back with the same tags, at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations.integration_utils import rewrite_logs

    from dpo_dist.metrics import RankZeroLogger

    logger = RankZeroLogger(tmp_path)
    train = {"loss": 0.69, "rewards/margins": 0.01, "learning_rate": 1e-6}
    evals = {"eval_loss": 0.68, "eval_rewards/accuracies": 0.5}
    logger.log(1, train)
    logger.log(2, evals)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    written = {tag: [(event.step, round(event.value, 6)) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = {tag: [(1 if tag.startswith("train/") else 2, value)] for tag, value in rewrite_logs({**train, **evals}).items()}
    assert written == expected and "train/rewards/margins" in written and "eval/loss" in written
