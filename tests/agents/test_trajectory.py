"""Multi-turn rollouts: the structure (action mask, turn ends, turn rewards), its single-turn case, and the
math that reads it (per-token rewards, GAE over model tokens, the rollout metrics)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, make_rollout, multi_turn_rollout

from rlfb.agents.ppo import generalized_advantages, token_rewards
from rlfb.agents.trajectory import Rollout, Segment, build_rollout
from rlfb.trainer import rollout_metrics


# ------------------------------------------------------------------------------- the structure
def test_build_rollout_marks_model_tokens_turn_ends_and_turn_rewards() -> None:
    rollout = multi_turn_rollout()
    assert rollout.prompt_ids.tolist() == [[3, 4, 5], [3, 4, 5], [EOS, 5, 6], [EOS, 5, 6]]
    assert rollout.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert rollout.completion_ids.tolist() == [
        [6, 7, 8, 9, 10, EOS], [11, 12, 13, 14, 2, EOS], [7, 8, 9, EOS, EOS, EOS], [1, 2, 3, 4, EOS, EOS]]
    assert rollout.completion_mask.tolist() == [[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert rollout.action_mask.tolist() == [
        [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0]]
    assert rollout.turn_ends.tolist() == [[1, 5], [0, 5], [3, -1], [0, 2]]
    torch.testing.assert_close(rollout.turn_rewards, torch.tensor([[0.3, 0.0], [0.0, -0.2], [0.0, 0.0], [0.0, 0.1]]))
    assert rollout.num_turns.tolist() == [2, 2, 1, 2]
    assert rollout.scores.tolist() == [1.0, -1.0, 0.5, -0.5]
    # A minibatch keeps each row's structure.
    rows = rollout.select(torch.tensor([3, 0]))
    assert rows.turn_ends.tolist() == [[0, 2], [1, 5]] and rows.action_mask.tolist()[0] == [1, 0, 1, 0, 0, 0]
    assert rows.turn_rewards[:, 1].tolist() == pytest.approx([0.1, 0.0])


def test_build_rollout_places_sampled_logprobs_and_leaves_unscored_episodes_nan() -> None:
    rollout = build_rollout(
        [[1]], [[Segment([2, 3], True, 0.0, [-0.5, -1.5]), Segment([4], False), Segment([5], True, 1.0, [-2.0])]],
        [None], pad_token_id=0)
    assert rollout.sampled_logprobs.tolist() == [[-0.5, -1.5, 0.0, -2.0]]  # 0 at the environment token
    assert rollout.scores.tolist() == [0.0] and torch.isnan(rollout.reward_components["score"]).all()
    assert not rollout.scored.any()


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ([([2], True), ([3], False, 1.0)], "environment reply carries reward 1.0; credit it to the model turn"),
        ([([], True)], "episode 0 has an empty model turn"),
        ([([2], False)], "episode 0 has no model turn"),
        ([([2], True, 0.0, [-1.0, -2.0])], "a model turn of 1 tokens came with 2 log-probs"),
    ],
)
def test_build_rollout_explains_malformed_episodes(segments: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_rollout([[1]], [segments], [0.0], pad_token_id=0)


def test_a_single_turn_rollout_is_the_one_turn_case() -> None:
    completions = torch.tensor([[5, 6, EOS], [7, EOS, EOS]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    plain = make_rollout(completions, mask, torch.tensor([1.0, 0.0]))  # the fields of a single-turn rollout
    assert plain.action_mask is plain.completion_mask  # the same tensor: no copy on the collector's path
    assert plain.turn_ends.tolist() == [[2], [1]] and plain.turn_rewards.tolist() == [[0.0], [0.0]]
    built = build_rollout([[1], [1]], [[([5, 6, EOS], True)], [([7, EOS], True)]], [1.0, 0.0], pad_token_id=EOS)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "action_mask", "turn_ends",
                 "turn_rewards", "scores"):
        assert torch.equal(getattr(built, name), getattr(plain, name)), name


# ------------------------------------------------------------------------------- per-token rewards
def test_token_rewards_pay_each_turn_at_its_end_and_the_score_at_the_last_model_token() -> None:
    # One row: model, env, env, model, model, env, pad. KL 0.5 per model token; beta 0.2 -> -0.1 each.
    # Turn 1 (ends at 0) pays 0.3, turn 2 (ends at 4) pays 0.1 and the score 2.0 comes on top of it there.
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    logprobs = torch.full((1, 7), -1.0)
    reference = torch.full((1, 7), -1.5)
    reference[0, [1, 2, 5, 6]] = -9.0  # the reference's view of environment tokens and padding: ignored
    rewards, kl = token_rewards(torch.tensor([2.0]), logprobs, reference, mask, 0.2,
                                turn_ends=torch.tensor([[0, 4]]), turn_rewards=torch.tensor([[0.3, 0.1]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 + 0.3, 0.0, 0.0, -0.1, -0.1 + 0.1 + 2.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------- GAE over model tokens
def test_gae_steps_over_environment_tokens() -> None:
    # test_math's hand-computed row (gamma 0.9, lambda 0.5; rewards 1, 0, 2; values 0.5, 1.0, 0.5 ->
    # A = 1.45625, 0.125, 1.5) with environment tokens between its model tokens, whose rewards and values are
    # garbage: the model tokens' advantages are the same, every other position gets 0.
    rewards = torch.tensor([[1.0, 7.0, 0.0, 7.0, 7.0, 2.0, 7.0]])
    values = torch.tensor([[0.5, 9.0, 1.0, 9.0, 9.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 0, 1, 0, 0, 1, 0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.45625, 0.0, 0.125, 0.0, 0.0, 1.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.95625, 0.0, 1.125, 0.0, 0.0, 2.0, 0.0]]))


def slow_gae(rewards: list[float], values: list[float], gamma: float, gae_lambda: float) -> list[float]:
    """GAE over one row's consecutive steps, in plain Python: the oracle."""
    advantages = [0.0] * len(rewards)
    next_advantage = next_value = 0.0
    for t in reversed(range(len(rewards))):
        next_advantage = rewards[t] + gamma * next_value - values[t] + gamma * gae_lambda * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages


def test_gae_over_a_multi_turn_row_equals_gae_over_the_row_with_environment_tokens_deleted() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([
        [1, 1, 0, 0, 1, 1, 1, 0, 1, 0],  # three turns, the last one token
        [0, 0, 1, 1, 0, 1, 0, 0, 0, 0],  # starts with an environment reply, ends with one, then padding
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # single-turn
        [1, 0, 1, 0, 1, 0, 1, 0, 1, 0],  # alternating
    ])  # fmt: skip
    rewards = torch.randn(mask.shape, generator=generator)
    values = torch.randn(mask.shape, generator=generator)
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    for row in range(mask.shape[0]):
        model = mask[row].nonzero().squeeze(1)
        expected = slow_gae(rewards[row, model].tolist(), values[row, model].tolist(), 0.9, 0.8)
        assert advantages[row, model].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert returns[row, model].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, model].tolist(), strict=True)], rel=1e-5, abs=1e-6)
        others = mask[row] == 0
        assert advantages[row, others].eq(0).all() and returns[row, others].eq(0).all()


# ------------------------------------------------------------------------------- rollout metrics
def test_rollout_metrics_count_model_tokens_turns_and_the_last_turn_s_eos() -> None:
    metrics = rollout_metrics(multi_turn_rollout(), ["score"], eos_token_id=EOS)
    assert metrics["rollout/completion_length"] == pytest.approx((4 + 3 + 4 + 2) / 4)  # model tokens only
    assert metrics["rollout/turns"] == pytest.approx((2 + 2 + 1 + 2) / 4)
    # Rows 0-2 end their last model turn with EOS; row 3's last model token is 3 (the EOS it shows is the
    # environment's reply): 1 of 4 truncated.
    assert metrics["rollout/truncated_fraction"] == pytest.approx(0.25)


def test_rollout_is_still_a_named_tuple_of_its_fields() -> None:
    rollout = multi_turn_rollout()
    assert isinstance(rollout, Rollout) and rollout._fields[-3:] == ("action_mask", "turn_ends", "turn_rewards")
    assert torch.equal(rollout._replace(scores=rollout.scores * 2).action_mask, rollout.action_mask)
