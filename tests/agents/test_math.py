"""The agents' math on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from rlfb.agents.base import masked_mean, masked_whiten
from rlfb.agents.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from rlfb.agents.ppo import (
    clipped_surrogate_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    token_rewards,
)
from rlfb.agents.reinforce import grpo_advantages, rloo_advantages
from rlfb.errors import ConfigError


def test_gae_matches_hand_computation() -> None:
    # Row 0, gamma 0.9, lambda 0.5, values (0.5, 1.0, 0.5), rewards (1, 0, 2):
    #   t=2: delta = 2 - 0.5 = 1.5;                 A = 1.5
    #   t=1: delta = 0 + 0.9*0.5 - 1.0 = -0.55;     A = -0.55 + 0.45*1.5 = 0.125
    #   t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;       A = 1.4 + 0.45*0.125 = 1.45625
    # Row 1 ends after two tokens: V past the end counts as 0, the masked column gets A = 0.
    #   t=1: delta = 3 - 2 = 1;                     A = 1
    #   t=0: delta = 0 + 0.9*2 - 1 = 0.8;           A = 0.8 + 0.45*1 = 1.25
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 0.5], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.45625, 0.125, 1.5], [1.25, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.95625, 1.125, 2.0], [2.25, 3.0, 0.0]]))


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go() -> None:
    rewards = torch.tensor([[0.5, -1.0, 2.0]])
    advantages, _ = generalized_advantages(rewards, torch.zeros(1, 3), torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.5, 1.0, 2.0]]))


def test_token_rewards_put_score_on_last_real_token_and_penalise_kl() -> None:
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    reference = torch.tensor([[-2.0, -1.0, -0.5], [-1.0, -1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([10.0, 20.0]), logprobs, reference, mask, kl_coef=0.5)
    torch.testing.assert_close(kl, torch.tensor([[1.0, 0.0, -0.5], [0.0, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, 0.0, 10.25], [0.0, 20.5, 0.0]]))


def test_clipped_surrogate_on_hand_made_ratios() -> None:
    # ratios 1.5, 0.5, 1.1 with advantages 1, 1, -1 and eps 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped: no credit beyond 1 + eps)
    #   token 1: max(-0.5, -0.8) = -0.5 (pessimistic: the unclipped term)
    #   token 2: max(1.1, 1.1)  = 1.1
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clip_fraction, approx_kl = clipped_surrogate_loss(new, old, advantages, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    # V = 2, V_old = 1, R = 3, eps 0.2: V_clip = 1.2; errors 1 and 3.24 -> 0.5 * 3.24
    loss, clip_fraction = clipped_value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.2
    )
    assert loss.item() == pytest.approx(1.62)
    assert clip_fraction.item() == 1.0


def test_masked_statistics_ignore_masked_entries() -> None:
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    # 1 - Var(residual) / Var(target): a perfect prediction explains all, predicting the mean nothing.
    assert explained_variance(torch.tensor(0.0), torch.tensor(4.0)) == 1.0
    assert explained_variance(torch.tensor(4.0), torch.tensor(4.0)) == 0.0


def test_rloo_and_grpo_advantages_on_hand_made_groups() -> None:
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Leave-one-out: row 0 -> 1 - (0 + 0 + 1) / 3 = 2/3; row 1 -> 0 - (1 + 0 + 1) / 3 = -2/3
    torch.testing.assert_close(
        rloo_advantages(returns, 4), torch.tensor([2, -2, -2, 2, 0, 0, 0, 0], dtype=torch.float32) / 3
    )
    # Group-normalised: mean 0.5, sample std sqrt(1/3) -> +-0.5 * sqrt(3); a constant group -> 0
    half_root_three = 0.5 * math.sqrt(3.0)
    expected = torch.tensor([1, -1, -1, 1, 0, 0, 0, 0], dtype=torch.float32) * half_root_three
    torch.testing.assert_close(grpo_advantages(returns, 4), expected, atol=1e-3, rtol=0)


def test_adaptive_kl_controller_moves_beta_toward_the_target() -> None:
    controller = AdaptiveKLController(initial_coef=0.2, target=6.0, horizon=10000)
    controller.update(observed_kl=12.0, num_samples=512)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000))
    high = controller.value
    controller.update(observed_kl=3.0, num_samples=512)  # error -0.5 clipped to -0.2
    assert controller.value == pytest.approx(high * (1 - 0.2 * 512 / 10000))
    before = controller.value
    controller.update(observed_kl=6.6, num_samples=512)  # error +0.1, not clipped
    assert controller.value == pytest.approx(before * (1 + 0.1 * 512 / 10000))


def test_fixed_kl_controller_never_moves_and_factory_picks_by_target() -> None:
    fixed = make_kl_controller(0.05, target=None, horizon=1000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(observed_kl=100.0, num_samples=1000)
    assert fixed.value == 0.05
    assert isinstance(make_kl_controller(0.05, target=2.0, horizon=1000), AdaptiveKLController)
    with pytest.raises(ConfigError, match="kl target must be > 0"):
        make_kl_controller(0.05, target=0.0, horizon=1000)
