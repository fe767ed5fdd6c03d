"""Every agent option makes the difference it documents to one update (PPOConfig, ReinforceConfig).

Each test changes one option and checks a value: a logged metric against a hand computation, the number
of gradient steps, or how far the weights moved. An option that is silently ignored fails its test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from wiring_helpers import agent_for, hand_rollout, sampled_rollout, tiny_policy, trainable_state

from rlfb.agents import DegenerateUpdateError, make_agent

FIXED_KL = {"kl_target": None, "kl_coef": 0.0}
ONE_STEP = {"epochs": 1, "num_minibatches": 1}


def uneven_rollout(group_size: int = 1) -> Any:
    """Four completions of lengths 5, 3, 4, 2 (EOS-terminated where shorter than 5) with distinct scores."""
    return hand_rollout([1.0, -0.5, 0.25, 2.0], [5, 3, 4, 2], group_size=group_size)


def gradient_steps(agent: Any, rollout: Any) -> tuple[dict[str, float], int]:
    """One update; returns its metrics and how many optimizer steps it took."""
    steps = []
    handle = agent.stepper.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    metrics = agent.update(rollout)
    handle.remove()
    return metrics, len(steps)


def policy_values(agent: Any, rollout: Any) -> torch.Tensor:
    """(B, T) value-head predictions on the rollout before any update, 0 past each completion."""
    with torch.no_grad():
        forward = agent.policy.forward_logprobs_values(rollout.input_ids, rollout.attention_mask,
                                                       rollout.completion_start, with_entropy=False)
    return forward.values * rollout.completion_mask


# ------------------------------------------------------------------------------------------ both agents
@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_learning_rate_is_logged_and_scales_the_step(name: str) -> None:
    rollout = uneven_rollout()
    moves = {}
    for learning_rate in (1e-2, 1e-4):
        agent = agent_for(name, {"learning_rate": learning_rate, **FIXED_KL, **ONE_STEP}
                          if name == "ppo" else {"learning_rate": learning_rate, **FIXED_KL})
        before = trainable_state(agent)
        metrics = agent.update(rollout)
        assert metrics["train/learning_rate"] == pytest.approx(learning_rate)
        moves[learning_rate] = float((trainable_state(agent) - before).abs().max())
    # Adam's first step moves each weight by about the learning rate, whatever the gradient's scale.
    assert moves[1e-2] > 30 * moves[1e-4]


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_linear_schedule_decays_the_learning_rate_over_total_updates(name: str) -> None:
    agent = agent_for(name, {"learning_rate": 1e-2, "lr_schedule": "linear", "total_updates": 4, **FIXED_KL})
    rollout = uneven_rollout()
    rates = [agent.update(rollout)["train/learning_rate"] for _ in range(3)]
    assert rates == pytest.approx([1e-2, 0.75e-2, 0.5e-2])  # lr * (1 - u / U) at update u


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_max_grad_norm_clips_the_step(name: str) -> None:
    rollout = uneven_rollout()
    moves = {}
    for max_grad_norm in (None, 1e-9):
        options = {"learning_rate": 1e-2, "max_grad_norm": max_grad_norm, **FIXED_KL}
        agent = agent_for(name, {**options, **ONE_STEP} if name == "ppo" else options)
        before = trainable_state(agent)
        agent.update(rollout)
        moves[max_grad_norm] = float((trainable_state(agent) - before).abs().max())
    # A gradient clipped to 1e-9 sits far below Adam's epsilon (1e-5): the step almost vanishes.
    assert moves[1e-9] < 0.01 * moves[None]


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_fixed_kl_coef_is_the_logged_beta(name: str) -> None:
    agent = agent_for(name, {"kl_coef": 0.37, "kl_target": None})
    rollout = uneven_rollout()
    assert [agent.update(rollout)["train/kl_coef"] for _ in range(2)] == pytest.approx([0.37, 0.37])


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_adaptive_kl_follows_its_target_and_horizon(name: str) -> None:
    policy = tiny_policy(value_head=name == "ppo", moved=True)
    rollout = sampled_rollout(policy, lambda ids, mask: (ids == 3).any(1), batch_size=8)
    probe = agent_for(name, {"kl_coef": 0.2, "kl_target": None}, moved=True)
    observed_kl = probe.update(rollout)["train/kl"]
    assert observed_kl > 0.1  # the adapter moved: the k1 estimate on the policy's own samples is positive
    target, horizon = observed_kl / 1.1, 16.0  # proportional error +0.1: inside the +-0.2 clip
    agent = agent_for(name, {"kl_coef": 0.2, "kl_target": target, "kl_horizon": horizon}, moved=True)
    first = agent.update(rollout)
    second = agent.update(rollout)
    assert first["train/kl"] == pytest.approx(observed_kl)
    # beta_{t+1} = beta_t * (1 + clip(KL / target - 1, -0.2, 0.2) * B / horizon)   (Ziegler et al. 2019)
    expected = 0.2 * (1 + max(-0.2, min(0.2, observed_kl / target - 1)) * rollout.batch_size / horizon)
    assert first["train/kl_coef"] == pytest.approx(0.2)
    assert second["train/kl_coef"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_temperature_reaches_the_policy_and_the_reference(name: str) -> None:
    # A fresh adapter is zero: policy and reference are the same model, so at any temperature the KL of
    # the first update is exactly 0 -- unless one of the two forward passes forgets the temperature.
    rollout = uneven_rollout()
    options = {"temperature": 0.5, "kl_coef": 0.1, "kl_target": None}
    agent = agent_for(name, {**options, **ONE_STEP} if name == "ppo" else options)
    metrics = agent.update(rollout)
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)
    # The entropy is that of softmax(logits / T) over the completion tokens.
    reference = tiny_policy(value_head=False)
    with torch.no_grad():
        entropy = reference.forward_logprobs_values(rollout.input_ids, rollout.attention_mask,
                                                    rollout.completion_start, temperature=0.5,
                                                    with_values=False).entropy
    mask = rollout.completion_mask.float()
    expected = float((entropy * mask).sum() / mask.sum())
    assert metrics["train/entropy"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["ppo", "reinforce"])
def test_max_consecutive_skips_stops_at_the_configured_count(name: str) -> None:
    rollout = hand_rollout([float("nan")] * 4, [5, 3, 4, 2])
    with pytest.warns(RuntimeWarning, match="degenerate"):
        agent_for(name, {"max_consecutive_skips": 2}).update(rollout)  # one skip of two allowed
    agent = agent_for(name, {"max_consecutive_skips": 1})
    with pytest.warns(RuntimeWarning, match="degenerate"), pytest.raises(DegenerateUpdateError, match="1 updates"):
        agent.update(rollout)


# ------------------------------------------------------------------------------------------ PPO
def test_ppo_epochs_and_minibatches_set_the_number_of_gradient_steps() -> None:
    rollout = uneven_rollout()
    metrics, steps = gradient_steps(agent_for("ppo", {"epochs": 3, "num_minibatches": 1}), rollout)
    assert (steps, metrics["train/epochs"]) == (3, 3.0)
    metrics, steps = gradient_steps(agent_for("ppo", {"epochs": 1, "num_minibatches": 2}), rollout)
    assert (steps, metrics["train/epochs"]) == (2, 1.0)


def test_ppo_gamma_discounts_the_returns() -> None:
    # gamma = 0: R_t = r_t, so with no KL penalty the return is the score at each row's last token, 0 elsewhere.
    rollout = uneven_rollout()
    agent = agent_for("ppo", {"gamma": 0.0, "gae_lambda": 1.0, **FIXED_KL, **ONE_STEP})
    metrics = agent.update(rollout)
    mask = rollout.completion_mask.float()
    assert metrics["train/return_mean"] == pytest.approx(float(rollout.scores.sum() / mask.sum()), rel=1e-5)


def test_ppo_gae_lambda_mixes_in_the_values() -> None:
    # gamma = 1, lambda = 0: A_t = delta_t, so R_t = r_t + V_{t+1} (V past the last token is 0).
    rollout = uneven_rollout()
    agent = agent_for("ppo", {"gamma": 1.0, "gae_lambda": 0.0, **FIXED_KL, **ONE_STEP})
    values = policy_values(agent, rollout)
    mask = rollout.completion_mask.float()
    lengths = mask.sum(1).long()
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(4), lengths - 1] = rollout.scores
    next_values = torch.cat([values[:, 1:], torch.zeros(4, 1)], dim=1) * mask
    expected = float(((rewards + next_values) * mask).sum() / mask.sum())
    assert agent.update(rollout)["train/return_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_ppo_returns_values_and_explained_variance_match_a_hand_computation() -> None:
    # gamma = lambda = 1 and no KL: every token's return is its row's score.
    rollout = uneven_rollout()
    agent = agent_for("ppo", {"gamma": 1.0, "gae_lambda": 1.0, **FIXED_KL, **ONE_STEP})
    with torch.no_grad():  # a value head that predicts something (zero-initialised, every value is 0)
        agent.policy.value_head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    values = policy_values(agent, rollout)
    mask = rollout.completion_mask.bool()
    returns = rollout.scores[:, None].expand_as(values)[mask].double()
    predicted = values[mask].double()
    metrics = agent.update(rollout)
    assert metrics["train/return_mean"] == pytest.approx(float(returns.mean()), rel=1e-5)
    assert metrics["train/value_mean"] == pytest.approx(float(predicted.mean()), rel=1e-4, abs=1e-6)
    residual = returns - predicted
    explained = 1 - residual.var(unbiased=False) / returns.var(unbiased=False)
    assert abs(float(explained)) > 0.5  # far from the 0 of a head that predicts nothing
    assert metrics["train/explained_variance"] == pytest.approx(float(explained), rel=1e-4)


@pytest.mark.parametrize(("option", "metric"), [("clip_range", "train/clip_fraction"),
                                                ("value_clip_range", "train/value_clip_fraction")])
def test_ppo_clip_ranges_decide_what_is_clipped(option: str, metric: str) -> None:
    rollout = uneven_rollout()
    fractions = {}
    for value in (1e-6, 100.0):
        agent = agent_for("ppo", {option: value, "learning_rate": 5e-2, "epochs": 3, "num_minibatches": 1,
                                  "whiten_advantages": False, **FIXED_KL})
        fractions[value] = agent.update(rollout)[metric]
    assert fractions[100.0] == 0.0
    assert fractions[1e-6] > 0.1  # after the first step, almost every ratio / value leaves a 1e-6 band


def test_ppo_loss_weighs_value_loss_and_entropy_by_their_coefficients() -> None:
    # One step: train/loss is that step's policy + vf_coef * value - entropy_coef * entropy.
    agent = agent_for("ppo", {"vf_coef": 0.7, "entropy_coef": 0.3, **FIXED_KL, **ONE_STEP})
    metrics = agent.update(uneven_rollout())
    expected = metrics["train/policy_loss"] + 0.7 * metrics["train/value_loss"] - 0.3 * metrics["train/entropy"]
    assert metrics["train/value_loss"] > 0 and metrics["train/entropy"] > 0
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("whiten", [False, True])
def test_ppo_whitening_of_advantages(whiten: bool) -> None:
    # First step: the ratio is 1, so the surrogate loss is -mean_t A_t over the completion tokens.
    agent = agent_for("ppo", {"whiten_advantages": whiten, **FIXED_KL, **ONE_STEP})
    metrics = agent.update(uneven_rollout())
    assert abs(metrics["train/advantage_mean"]) > 0.1  # raw advantages of these scores are far from 0
    expected = 0.0 if whiten else -metrics["train/advantage_mean"]
    assert metrics["train/policy_loss"] == pytest.approx(expected, abs=1e-5)


def test_ppo_kl_penalty_is_minus_beta_times_the_sequence_kl() -> None:
    policy = tiny_policy(moved=True)
    rollout = sampled_rollout(policy, lambda ids, mask: (ids == 3).any(1))
    agent = make_agent("ppo", policy, {"kl_coef": 0.3, "kl_target": None})
    metrics = agent.update(rollout)
    assert abs(metrics["train/kl"]) > 0.1
    assert metrics["train/kl_penalty"] == pytest.approx(-0.3 * metrics["train/kl"], rel=1e-5)


def test_ppo_early_stop_kl_ends_the_epochs() -> None:
    rollout = uneven_rollout()
    options = {"epochs": 4, "num_minibatches": 2, "learning_rate": 5e-2}
    assert agent_for("ppo", options).update(rollout)["train/epochs"] == 4.0
    # The second minibatch is measured after the first step moved the policy: approx KL > 0 stops there.
    assert agent_for("ppo", {**options, "early_stop_kl": 1e-12}).update(rollout)["train/epochs"] == 1.0


def test_ppo_seed_decides_the_minibatch_order() -> None:
    rollout = uneven_rollout()
    options = {"epochs": 1, "num_minibatches": 2, "learning_rate": 5e-2}

    def weights_after(seed: int) -> torch.Tensor:
        agent = agent_for("ppo", {**options, "seed": seed})
        agent.update(rollout)
        return trainable_state(agent)

    reference = weights_after(0)
    assert torch.equal(weights_after(0), reference)
    assert any(not torch.allclose(weights_after(seed), reference) for seed in (1, 2, 3))


# ------------------------------------------------------------------------------------------ REINFORCE
def test_rloo_advantages_leave_one_out() -> None:
    rollout = uneven_rollout(group_size=2)
    metrics = agent_for("rloo", {"group_size": 2, **FIXED_KL}).update(rollout)
    scores = rollout.scores.view(2, 2)
    advantages = (scores - scores.flip(1)).flatten()  # k = 2: the other completion is the baseline
    assert metrics["train/advantage_mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["train/advantage_std"] == pytest.approx(float(advantages.std()), rel=1e-5)


def test_grpo_normalises_within_each_group_of_group_size() -> None:
    rollout = hand_rollout([1.0, 0.0, 5.0, 4.0, 0.0, 3.0], [5, 3, 4, 2, 5, 5], group_size=3)
    metrics = agent_for("grpo", {"group_size": 3, **FIXED_KL}).update(rollout)
    groups = rollout.scores.view(2, 3)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    assert metrics["train/advantage_std"] == pytest.approx(float(advantages.std()), rel=1e-4)


def test_ema_baseline_is_used_then_updated_with_baseline_decay() -> None:
    rollout = uneven_rollout()
    agent = agent_for("reinforce", {"baseline": "ema", "baseline_decay": 0.5, **FIXED_KL})
    first = agent.update(rollout)
    second = agent.update(rollout)
    mean_score = float(rollout.scores.mean())
    assert first["train/return_mean"] == pytest.approx(mean_score)
    assert first["train/baseline"] == 0.0  # b_0, the baseline before any return was seen
    assert second["train/baseline"] == pytest.approx(0.5 * 0.0 + 0.5 * mean_score)  # d b + (1 - d) mean R
    assert second["train/advantage_mean"] == pytest.approx(mean_score - second["train/baseline"], rel=1e-5)


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_kl_penalty_goes_to_the_return_or_to_the_loss(kl_penalty: str) -> None:
    policy = tiny_policy(value_head=False, moved=True)
    rollout = sampled_rollout(policy, lambda ids, mask: (ids == 3).any(1))
    agent = make_agent("reinforce", policy, {"kl_penalty": kl_penalty, "kl_coef": 0.3, "kl_target": None})
    metrics = agent.update(rollout)
    mean_score = float(rollout.scores.mean())
    assert abs(metrics["train/kl"]) > 0.1
    if kl_penalty == "reward":  # R = score - beta * sum_t kl_t
        assert metrics["train/return_mean"] == pytest.approx(mean_score - 0.3 * metrics["train/kl"], rel=1e-5)
        assert metrics["train/kl_loss"] == 0.0
    else:  # R = score; beta * mean_t k3_t in the loss, and k3 > 0 where the policy left the reference
        assert metrics["train/return_mean"] == pytest.approx(mean_score, rel=1e-6)
        assert metrics["train/kl_loss"] > 0.01


def test_reinforce_entropy_coef_is_the_only_gradient_when_advantages_are_zero() -> None:
    # Equal scores within each pair: leave-one-out advantages are 0, so only the entropy bonus moves weights.
    rollout = hand_rollout([1.0, 1.0, -2.0, -2.0], [5, 3, 4, 2], group_size=2)
    moved = {}
    for entropy_coef in (0.0, 0.5):
        agent = agent_for("rloo", {"group_size": 2, "entropy_coef": entropy_coef, **FIXED_KL})
        before = trainable_state(agent)
        agent.update(rollout)
        moved[entropy_coef] = float((trainable_state(agent) - before).abs().max())
    assert moved[0.0] == 0.0
    assert moved[0.5] > 1e-4


@pytest.mark.parametrize("name", ["reinforce", "ppo"])
def test_minibatches_bound_the_rows_of_every_forward_pass(name: str) -> None:
    rollout = uneven_rollout()
    options = {"minibatch_size": 2} if name == "reinforce" else {"num_minibatches": 2, "epochs": 1}
    agent = agent_for(name, {**options, **FIXED_KL})
    rows = []
    handle = agent.policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True)
    agent.update(rollout)
    handle.remove()
    assert rows and max(rows) == 2
    if name == "reinforce":  # chunks accumulate gradients into one step: the same update as one chunk
        whole = agent_for(name, FIXED_KL)
        whole.update(rollout)
        assert torch.allclose(trainable_state(agent), trainable_state(whole), atol=1e-6)
