"""Every agent learns from model tokens only: on a hand-made multi-turn rollout the gradient of its loss is
exactly zero at prompt, environment and padding positions and nonzero at model tokens, and what the policy,
the reference or the value head say at those positions changes nothing in an update."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import multi_turn_rollout, tiny_policy

import rlfb.agents.ppo as ppo_module
import rlfb.agents.reinforce as reinforce_module
from rlfb.agents import make_agent
from rlfb.agents.rollout import RolloutEvaluation, evaluate_rollout
from rlfb.agents.trajectory import Rollout
from rlfb.models.policy import Policy, PolicyForward

# One gradient step over the whole batch each (so one forward pass with gradients), every loss term on:
# an entropy bonus, the KL in the reward (PPO, REINFORCE, RLOO) or in the loss (GRPO).
AGENTS = {
    "ppo": {"learning_rate": 1e-2, "epochs": 1, "num_minibatches": 1, "entropy_coef": 0.01, "kl_target": None},
    "reinforce": {"learning_rate": 1e-2, "entropy_coef": 0.01, "kl_target": None},
    "rloo": {"learning_rate": 1e-2, "group_size": 2, "entropy_coef": 0.01, "kl_target": None},
    "grpo": {"learning_rate": 1e-2, "group_size": 2, "entropy_coef": 0.01, "kl_target": None},
}


def moved_policy(value_head: bool) -> Policy:
    """The tiny policy with its adapter (and value head) off zero: KL and values are not 0."""
    policy = tiny_policy(seed=4, value_head=value_head)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return policy


class GradientProbe:
    """Keeps the input ids, logits (B, T+1, V) and values (B, T, 1) of every forward pass with gradients, and
    the gradients of the loss with respect to those logits and values."""

    def __init__(self, policy: Policy) -> None:
        self.input_ids: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.handles = [
            policy.model.register_forward_pre_hook(self._keep_input_ids, with_kwargs=True),
            policy.model.get_output_embeddings().register_forward_hook(self._keep(self.logits)),
        ]
        if policy.value_head is not None:
            self.handles.append(policy.value_head.register_forward_hook(self._keep(self.values)))

    def _keep_input_ids(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():
            self.input_ids.append(kwargs["input_ids"])

    @staticmethod
    def _keep(into: list[torch.Tensor]) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if output.requires_grad:  # the no-grad reference and old-policy passes are not the loss's
                output.retain_grad()
                into.append(output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def rows_of(self, rollout: Rollout) -> list[int]:
        """The rollout row of each row of the one pass (the pass orders rows by length, for speed)."""
        (pass_ids,) = self.input_ids
        assert pass_ids.shape == rollout.input_ids.shape  # nothing trimmed: positions are the rollout's
        return [next(i for i, ids in enumerate(rollout.input_ids) if torch.equal(ids, row)) for row in pass_ids]


def predicted_token_is_model(rollout: Rollout) -> torch.Tensor:
    """(B, L) bool over the full sequence: position i's logits predict a model token (token i + 1 is one)."""
    mask = torch.zeros(rollout.input_ids.shape, dtype=torch.bool)
    mask[:, rollout.completion_start - 1 : -1] = rollout.action_mask.bool()
    return mask


@pytest.mark.parametrize("agent_name", list(AGENTS))
def test_loss_gradient_is_zero_through_prompt_environment_and_padding_positions(agent_name: str) -> None:
    rollout = multi_turn_rollout()
    policy = moved_policy(value_head=agent_name == "ppo")
    agent = make_agent(agent_name, policy, AGENTS[agent_name])
    probe = GradientProbe(policy)
    metrics = agent.update(rollout)
    probe.remove()
    assert metrics["train/skipped_updates"] == 0.0
    assert len(probe.logits) == 1  # the one gradient step's forward pass
    logits = probe.logits[0]
    assert logits.grad is not None
    batch, length = rollout.input_ids.shape
    # The pass computes logits only from the last prompt position on (the earlier ones predict prompt
    # tokens and do not exist in the graph): lay their gradient out over the full sequence.
    kept = logits.shape[1]
    assert kept == rollout.completion_ids.shape[1] + 1
    rows = probe.rows_of(rollout)
    assert sorted(rows) == list(range(batch))
    gradient = torch.zeros(batch, length, logits.shape[2])
    gradient[rows, length - kept :] = logits.grad
    per_position = gradient.abs().sum(-1)  # (B, L)
    expected = predicted_token_is_model(rollout)
    assert per_position[~expected].eq(0).all(), per_position * ~expected  # exactly zero, not small
    assert per_position[expected].gt(0).all(), per_position * expected
    if agent_name == "ppo":
        values = probe.values[0]  # (B, T, 1): V(s_t) before each completion token
        assert values.grad is not None
        value_gradient = torch.zeros(rollout.action_mask.shape)
        value_gradient[rows] = values.grad.squeeze(-1)
        action = rollout.action_mask.bool()
        assert value_gradient[~action].eq(0).all() and value_gradient[action].ne(0).all(), value_gradient


# ------------------------------------------------------------------------------- garbage off the model tokens
def garbage(like: torch.Tensor, mask: torch.Tensor, low: float, high: float, seed: int) -> torch.Tensor:
    """``like`` plus uniform values in [low, high) wherever ``mask`` is 0 (prompt and padding aside)."""
    generator = torch.Generator().manual_seed(seed)
    noise = low + (high - low) * torch.rand(like.shape, generator=generator)
    return like + noise * (1 - mask.to(like.dtype))


@pytest.fixture
def garbage_off_model_tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every no-grad pass and every forward pass of the agents return garbage at environment and padding
    positions: log-probs far below anything real (exp would overflow), references and values anywhere."""
    real_evaluate, real_reference = evaluate_rollout, ppo_module.rollout_reference_logprobs

    def evaluate(policy: Policy, rollout: Rollout, *args: Any, **kwargs: Any) -> RolloutEvaluation:
        old = real_evaluate(policy, rollout, *args, **kwargs)
        mask = rollout.action_mask
        return RolloutEvaluation(
            logprobs=garbage(old.logprobs, mask, -300.0, -100.0, 1),
            reference_logprobs=garbage(old.reference_logprobs, mask, -5.0, 5.0, 2),
            values=None if old.values is None else garbage(old.values, mask, -50.0, 50.0, 3),
        )

    def reference(policy: Policy, rollout: Rollout, *args: Any, **kwargs: Any) -> torch.Tensor:
        return garbage(real_reference(policy, rollout, *args, **kwargs), rollout.action_mask, -5.0, 5.0, 4)

    def wrap_forward(real_forward: Any) -> Any:
        def forward(self: Any, batch: Rollout, **options: Any) -> PolicyForward:
            out, mask = real_forward(self, batch, **options), batch.action_mask
            return PolicyForward(
                logprobs=garbage(out.logprobs, mask, -300.0, -100.0, 5),
                values=None if out.values is None else garbage(out.values, mask, -50.0, 50.0, 6),
                entropy=None if out.entropy is None else garbage(out.entropy, mask, 0.0, 50.0, 7),
            )

        return forward

    for module in (ppo_module, reinforce_module):
        monkeypatch.setattr(module, "evaluate_rollout", evaluate)
        monkeypatch.setattr(module, "rollout_reference_logprobs", reference)
    monkeypatch.setattr(ppo_module.PPOAgent, "_forward", wrap_forward(ppo_module.PPOAgent._forward))
    monkeypatch.setattr(reinforce_module.ReinforceAgent, "_forward",
                        wrap_forward(reinforce_module.ReinforceAgent._forward))
    yield


def update_twice(agent_name: str, options: dict[str, Any]) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
    policy = moved_policy(value_head=agent_name == "ppo")
    agent = make_agent(agent_name, policy, options)
    metrics = [agent.update(multi_turn_rollout()) for _ in range(2)]
    return metrics, [p.detach().clone() for p in policy.trainable_parameters()]


# PPO also with several minibatches and epochs (old log-probs and values from the no-grad pass), and the
# adaptive KL controller, whose observed KL must be the model tokens' too.
GARBAGE_CASES = {**AGENTS, "ppo_minibatches": {"learning_rate": 1e-2, "num_minibatches": 2, "epochs": 2},
                 "grpo_adaptive_kl": {"learning_rate": 1e-2, "group_size": 2, "kl_target": 0.5}}


@pytest.mark.parametrize("case", list(GARBAGE_CASES))
def test_what_is_said_about_non_model_tokens_changes_nothing(case: str, request: pytest.FixtureRequest) -> None:
    agent_name = case.split("_")[0]
    clean_metrics, clean_parameters = update_twice(agent_name, GARBAGE_CASES[case])
    request.getfixturevalue("garbage_off_model_tokens")
    noisy_metrics, noisy_parameters = update_twice(agent_name, GARBAGE_CASES[case])
    assert noisy_metrics == clean_metrics  # KL, KL penalty, returns, values, losses: every number
    for clean, noisy in zip(clean_parameters, noisy_parameters, strict=True):
        assert torch.equal(clean, noisy)


@pytest.mark.parametrize("agent_name", ["ppo", "reinforce"])
def test_observed_kl_sums_over_model_tokens(agent_name: str) -> None:
    rollout = multi_turn_rollout()
    policy = moved_policy(value_head=agent_name == "ppo")
    before = evaluate_rollout(policy, rollout)
    metrics = make_agent(agent_name, policy, AGENTS[agent_name]).update(rollout)
    mask = rollout.action_mask.float()
    expected = ((before.logprobs - before.reference_logprobs) * mask).sum(1).mean()
    assert metrics["train/kl"] == pytest.approx(float(expected), rel=1e-5)
    assert float(((before.logprobs - before.reference_logprobs) * (rollout.completion_mask - mask)).abs().sum()) == 0


def without_final_reply(rollout: Rollout) -> Rollout:
    """``multi_turn_rollout()`` with row 3's closing environment reply (after its last model turn) turned
    into padding: same shapes, same model tokens, each seeing the same context."""
    completion_mask, completion_ids = rollout.completion_mask.clone(), rollout.completion_ids.clone()
    completion_mask[3, 3:] = 0
    completion_ids[3, 3:] = completion_ids[3, -1]  # the padding token
    return rollout._replace(completion_mask=completion_mask, completion_ids=completion_ids)


@pytest.mark.parametrize("case", list(GARBAGE_CASES))
def test_a_closing_environment_reply_counts_as_padding(case: str) -> None:
    # No statistic (whitening, token means, entropy, KL, value loss, the token count) may count environment
    # tokens: a reply after the episode's last model token then changes nothing, as padding would not.
    agent_name = case.split("_")[0]
    rollout = multi_turn_rollout()
    padded = without_final_reply(rollout)
    assert padded.action_mask.equal(rollout.action_mask) and not padded.completion_mask.equal(rollout.completion_mask)
    updates = []
    for batch in (rollout, padded):
        policy = moved_policy(value_head=agent_name == "ppo")
        metrics = make_agent(agent_name, policy, GARBAGE_CASES[case]).update(batch)
        updates.append((metrics, torch.cat([p.detach().flatten() for p in policy.trainable_parameters()])))
    (with_reply, reply_parameters), (with_padding, padding_parameters) = updates
    # Not bit-identical: row 3 is shorter with padding, so the passes are ordered and trimmed differently,
    # and Adam's first steps magnify rounding (measured: up to 1.3e-6 on a parameter). Counting the two
    # environment tokens in any statistic moves the update by far more.
    assert with_reply == pytest.approx(with_padding, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(reply_parameters, padding_parameters, rtol=1e-4, atol=1e-5)


def test_reinforce_return_adds_every_turn_reward_to_the_score() -> None:
    rollout = multi_turn_rollout()
    agent = make_agent("reinforce", moved_policy(value_head=False), {"kl_coef": 0.0, "kl_target": None})
    metrics = agent.update(rollout)
    # scores 1, -1, 0.5, -0.5; turn rewards 0.3 (row 0), -0.2 (row 1), 0.1 (row 3)
    assert metrics["train/return_mean"] == pytest.approx((1.3 - 1.2 + 0.5 - 0.4) / 4)
    assert metrics["train/baseline"] == 0.0


def test_ppo_returns_pay_turn_rewards_at_turn_ends_and_discount_over_model_tokens_only() -> None:
    # A fresh policy: its value head is zero-initialised (V = 0) and the adapter is zero (KL = 0), so with
    # lambda 1 the return of model token t is sum_k gamma^k r_(t+k) over the row's *model* tokens from t on.
    # gamma 0.5; rewards at model tokens (turn rewards and the score at their tokens):
    #   row 0, tokens 0 1 4 5: 0, 0.3, 0, 1.0      -> returns 0.275, 0.55, 0.5, 1.0
    #   row 1, tokens 0 4 5:   0, 0, -0.2 - 1.0    -> returns -0.3, -0.6, -1.2
    #   row 2, tokens 0 1 2 3: 0, 0, 0, 0.5        -> returns 0.0625, 0.125, 0.25, 0.5
    #   row 3, tokens 0 2:     0, 0.1 - 0.5        -> returns -0.2, -0.4
    # (Counting row 0's two environment tokens as steps would give its token 1 0.3 + 0.5^4 = 0.3625, not
    # 0.3 + 0.5^2 = 0.55.)
    returns = [0.275, 0.55, 0.5, 1.0, -0.3, -0.6, -1.2, 0.0625, 0.125, 0.25, 0.5, -0.2, -0.4]
    options = {"kl_coef": 0.0, "kl_target": None, "gamma": 0.5, "gae_lambda": 1.0, "num_minibatches": 2}
    metrics = make_agent("ppo", tiny_policy(seed=4), options).update(multi_turn_rollout())
    assert metrics["train/value_mean"] == 0.0
    assert metrics["train/return_mean"] == pytest.approx(sum(returns) / len(returns), rel=1e-6)
    assert metrics["train/advantage_mean"] == pytest.approx(sum(returns) / len(returns), rel=1e-6)
