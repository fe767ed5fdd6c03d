"""Agents learn on a toy bandit, resume exactly, skip degenerate updates, and explain bad configs."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from conftest import contains_token, make_rollout, sample_rollout, tiny_policy

from rlfb.agents import (
    DegenerateUpdateError,
    PPOAgent,
    PPOConfig,
    ReinforceAgent,
    evaluate_rollout,
    make_agent,
)
from rlfb.agents.base import masked_mean
from rlfb.agents.rollout import ROWS_PER_PASS, forward_rollout
from rlfb.errors import ConfigError

TARGET_TOKEN = 5


def perturb_adapter(policy, seed: int = 0) -> None:
    """Move the adapter (and value head) off zero, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.trainable_parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def mean_reward(policy, generator: torch.Generator, group_size: int = 1) -> float:
    rollout = sample_rollout(policy, contains_token(TARGET_TOKEN), 64, generator, group_size=group_size)
    return float(rollout.scores.mean())


# Settings reach >= 0.66 on each of seeds 0-5 (measured); the threshold leaves room for sampler changes.
@pytest.mark.parametrize(
    ("agent_name", "options", "updates"),
    [
        ("ppo", {"learning_rate": 1e-2}, 10),
        ("reinforce", {"learning_rate": 1e-2}, 16),
        ("rloo", {"learning_rate": 2e-2, "group_size": 8}, 20),
        ("grpo", {"learning_rate": 2e-2, "group_size": 8}, 20),
    ],
)
def test_agent_learns_to_emit_the_rewarded_token(agent_name: str, options: dict, updates: int) -> None:
    # Reward 1 when the 4-token completion contains token 5: about 10% of random completions do.
    policy = tiny_policy(seed=0, value_head=agent_name == "ppo")
    agent = make_agent(agent_name, policy, options)
    group_size = getattr(agent.config, "group_size", 1)
    generator = torch.Generator().manual_seed(0)
    before = mean_reward(policy, torch.Generator().manual_seed(123), group_size)
    for _ in range(updates):
        agent.update(sample_rollout(policy, contains_token(TARGET_TOKEN), 32, generator, group_size=group_size))
    after = mean_reward(policy, torch.Generator().manual_seed(123), group_size)
    assert before < 0.3
    assert after > 0.5, f"{agent_name}: mean reward {before:.2f} -> {after:.2f}"


def test_ppo_update_raises_the_probability_of_the_rewarded_completion() -> None:
    policy = tiny_policy(seed=1)
    agent = PPOAgent(policy, PPOConfig(learning_rate=1e-2, kl_coef=0.0, kl_target=None))
    completions = torch.tensor([[5, 0], [7, 0], [8, 0], [9, 0]]).repeat(2, 1)
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 0.0, 0.0, 0.0] * 2))
    before = policy.forward_logprobs_values(rollout.input_ids, rollout.attention_mask, 1).logprobs[0, 0]
    metrics = agent.update(rollout)
    after = policy.forward_logprobs_values(rollout.input_ids, rollout.attention_mask, 1).logprobs[0, 0]
    assert after > before + 0.5
    assert metrics["train/epochs"] == 4.0
    assert metrics["train/skipped_updates"] == 0.0
    assert {"train/policy_loss", "train/value_loss", "train/clip_fraction", "train/kl", "train/kl_coef"} <= set(metrics)


def test_early_stop_on_approximate_kl_cuts_the_epochs() -> None:
    policy = tiny_policy(seed=1)
    agent = PPOAgent(policy, PPOConfig(learning_rate=0.1, early_stop_kl=1e-6, kl_target=None))
    completions = torch.tensor([[5, 0], [7, 0], [8, 0], [9, 0]])
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert agent.update(rollout)["train/epochs"] == 1.0


@pytest.mark.parametrize("agent_name", ["ppo", "grpo"])
def test_state_dict_round_trip_gives_an_identical_next_update(agent_name: str) -> None:
    options = {"learning_rate": 1e-2, "group_size": 2} if agent_name == "grpo" else {"learning_rate": 1e-2}
    policy = tiny_policy(seed=2, value_head=agent_name == "ppo")
    agent = make_agent(agent_name, policy, options)
    generator = torch.Generator().manual_seed(0)
    reward = contains_token(TARGET_TOKEN)
    agent.update(sample_rollout(policy, reward, 8, generator, group_size=2))
    next_rollout = sample_rollout(policy, reward, 8, generator, group_size=2)

    # Resume: a fresh policy with the same weights and a fresh agent loaded from the state dict.
    resumed_policy = tiny_policy(seed=99, value_head=agent_name == "ppo")
    resumed_policy.model.load_state_dict(policy.model.state_dict())
    if policy.value_head is not None:
        resumed_policy.value_head.load_state_dict(policy.value_head.state_dict())
    resumed = make_agent(agent_name, resumed_policy, options)
    resumed.load_state_dict(copy.deepcopy(agent.state_dict()))

    original_metrics = agent.update(next_rollout)
    resumed_metrics = resumed.update(next_rollout)
    assert resumed_metrics == original_metrics
    for (name, a), b in zip(policy.model.named_parameters(), resumed_policy.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_nan_scores_skip_the_update_and_consecutive_ones_stop_the_run() -> None:
    policy = tiny_policy(seed=3)
    agent = make_agent("ppo", policy, {"max_consecutive_skips": 2})
    completions = torch.tensor([[5, 0], [7, 0]])
    good = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 0.0]))
    bad = make_rollout(completions, torch.ones_like(completions), torch.tensor([float("nan"), 0.0]))
    weights = {name: p.detach().clone() for name, p in policy.model.named_parameters()}

    with pytest.warns(RuntimeWarning, match="skipping a degenerate update: loss is nan"):
        metrics = agent.update(bad)
    assert metrics["train/skipped_updates"] == 1.0
    assert all(torch.equal(p, weights[name]) for name, p in policy.model.named_parameters())

    agent.update(good)  # a good update resets the consecutive count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        agent.update(bad)
        with pytest.raises(DegenerateUpdateError, match="2 updates in a row .* Try a lower learning_rate"):
            agent.update(bad)


def test_reinforce_skips_infinite_loss() -> None:
    policy = tiny_policy(seed=3, value_head=False)
    agent = ReinforceAgent(policy)
    completions = torch.tensor([[5, 0], [7, 0]])
    bad = make_rollout(completions, torch.ones_like(completions), torch.tensor([float("inf"), 0.0]))
    with pytest.warns(RuntimeWarning, match="degenerate"):
        assert agent.update(bad)["train/skipped_updates"] == 1.0


def test_unknown_agent_option_or_baseline_is_explained() -> None:
    policy = tiny_policy(value_head=False)
    with pytest.raises(ConfigError, match="unknown agent 'ppo2'; known: ppo, reinforce, rloo, grpo"):
        make_agent("ppo2", policy, {})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'lr' for agent 'reinforce'; known: .*learning_rate"):
        make_agent("reinforce", policy, {"lr": 0.1})
    with pytest.raises(ConfigError, match="unknown baseline 'mean'; known: ema, rloo, grpo"):
        make_agent("reinforce", policy, {"baseline": "mean"})
    with pytest.raises(ConfigError, match="needs group_size >= 2"):
        make_agent("grpo", policy, {"group_size": 1})
    with pytest.raises(ConfigError, match="PPO needs a policy with a value head"):
        make_agent("ppo", policy, {})
    with pytest.raises(ConfigError, match="lr_schedule 'linear' needs total_updates"):
        make_agent("reinforce", policy, {"lr_schedule": "linear"})


def test_group_agent_rejects_rows_that_do_not_share_a_prompt() -> None:
    agent = make_agent("rloo", tiny_policy(value_head=False), {"group_size": 2})
    completions = torch.tensor([[5, 0], [7, 0], [8, 0], [9, 0]])
    rollout = make_rollout(
        completions, torch.ones_like(completions), torch.zeros(4), prompts=["a", "a", "b", "c"]
    )
    with pytest.raises(ConfigError, match="rows 2..3 of the rollout do not share one prompt.*group_size=2"):
        agent.update(rollout)


def test_linear_schedule_decays_the_learning_rate() -> None:
    agent = make_agent("reinforce", tiny_policy(value_head=False), {"lr_schedule": "linear", "total_updates": 4})
    completions = torch.tensor([[5, 0], [7, 0]])
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 0.0]))
    rates = [agent.update(rollout)["train/learning_rate"] for _ in range(3)]
    assert rates == pytest.approx([1e-3, 0.75e-3, 0.5e-3])


@pytest.mark.parametrize("kl_penalty", ["loss", "reward"])
def test_reinforce_minibatches_accumulate_the_whole_batch_gradient(kl_penalty: str) -> None:
    # Rows of different lengths: the loss is normalised by the batch's token count, so chunking must not
    # change the gradient (a per-chunk normalisation would scale the chunks differently). The whole batch
    # takes pi_old from its gradient step's own forward pass, the chunks from a separate no-grad pass: the
    # two must agree, in the loss and in the return (kl_penalty="reward" puts pi_old in the advantages).
    completions = torch.tensor([[5, 0, 0], [7, 8, 0], [8, 9, 1], [9, 0, 0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    rollout = make_rollout(completions, mask, torch.tensor([1.0, 0.0, 2.0, -1.0]))

    def gradient_and_metrics(minibatch_size: int | None) -> tuple[list[torch.Tensor], dict[str, float]]:
        policy = tiny_policy(seed=4, value_head=False)
        perturb_adapter(policy)  # a KL to the reference, so pi_old matters to the loss or the return
        options = {"minibatch_size": minibatch_size, "kl_penalty": kl_penalty, "entropy_coef": 0.1}
        agent = make_agent("reinforce", policy, options)
        captured: list[torch.Tensor] = []
        apply_gradients = agent.stepper.step

        def capture_then_step(riders: torch.Tensor | None = None) -> bool:
            captured.extend(p.grad.clone() for p in agent.stepper.parameters)
            return apply_gradients(riders)

        agent.stepper.step = capture_then_step
        return captured, agent.update(rollout)

    whole, whole_metrics = gradient_and_metrics(None)
    chunked, chunked_metrics = gradient_and_metrics(1)
    assert sum(g.abs().sum() for g in whole) > 1e-3  # the comparison below means something
    for a, b in zip(whole, chunked, strict=True):  # passes of other shapes round differently (~1e-6)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert abs(whole_metrics["train/kl"]) > 1e-2
    for key in ("train/policy_loss", "train/entropy", "train/kl_loss", "train/kl", "train/return_mean"):
        assert chunked_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-7), key


def test_ppo_with_one_minibatch_takes_pi_old_from_its_first_step() -> None:
    # One minibatch: the first gradient step's forward pass doubles as the no-grad "old" pass. It must be
    # the same numbers: the ratio is exactly 1 in that step (no clipping, approx KL 0), and the KL and
    # value statistics equal those of evaluate_rollout on the weights before the update.
    policy = tiny_policy(seed=5)
    perturb_adapter(policy)
    agent = PPOAgent(policy, PPOConfig(epochs=1, num_minibatches=1, kl_target=None))
    completions = torch.tensor([[5, 0, 0], [7, 8, 0], [8, 9, 1], [9, 0, 0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    rollout = make_rollout(completions, mask, torch.tensor([1.0, 0.0, 2.0, -1.0]))
    before = evaluate_rollout(policy, rollout)
    metrics = agent.update(rollout)
    expected_kl = float(((before.logprobs - before.reference_logprobs) * mask).sum(1).mean())
    assert abs(expected_kl) > 1e-2
    assert metrics["train/kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert metrics["train/value_mean"] == pytest.approx(float(masked_mean(before.values, mask.float())), rel=1e-5)
    assert metrics["train/approx_kl"] == 0.0 and metrics["train/clip_fraction"] == 0.0
    assert metrics["train/value_clip_fraction"] == 0.0


def test_ema_baseline_is_used_before_it_absorbs_the_batch() -> None:
    # b_0 = 0; decay 0.5; batch mean return 2 -> advantages use b_0, then b_1 = 0.5 * 0 + 0.5 * 2 = 1.
    agent = make_agent("reinforce", tiny_policy(value_head=False),
                       {"baseline_decay": 0.5, "kl_coef": 0.0, "kl_target": None})  # fmt: skip
    completions = torch.tensor([[5, 0], [7, 0]])
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 3.0]))
    first = agent.update(rollout)
    assert (first["train/baseline"], first["train/advantage_mean"], first["train/return_mean"]) == (0.0, 2.0, 2.0)
    assert agent.baseline_value == 1.0
    second = agent.update(rollout)
    assert (second["train/baseline"], second["train/advantage_mean"]) == (1.0, 1.0)
    assert agent.baseline_value == 1.5


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_reinforce_kl_penalty_enters_the_return_or_the_loss(kl_penalty: str) -> None:
    agent = make_agent("reinforce", tiny_policy(value_head=False),
                       {"learning_rate": 0.05, "kl_coef": 0.5, "kl_target": None, "kl_penalty": kl_penalty})  # fmt: skip
    completions = torch.tensor([[5, 0], [7, 0]])
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 3.0]))
    agent.update(rollout)  # the policy leaves the reference, so the second update sees a KL
    metrics = agent.update(rollout)
    assert abs(metrics["train/kl"]) > 1e-3
    if kl_penalty == "reward":  # R = score - beta * sum_t kl_t
        assert metrics["train/return_mean"] == pytest.approx(2.0 - 0.5 * metrics["train/kl"], rel=1e-5)
        assert metrics["train/kl_loss"] == 0.0
    else:  # the return is the score; the k3 KL is a loss term
        assert metrics["train/return_mean"] == 2.0
        assert metrics["train/kl_loss"] > 0.0


def test_forward_rollout_in_passes_equals_one_padded_pass() -> None:
    # 20 rows in shuffled order: 16 short completions (1-3 of 6 columns) whose prompts are all left-padded,
    # 4 full-length ones with full prompts. Sorted by length, the first pass drops a prompt column and three
    # completion columns; both passes must give what one pass over the padded batch gives, in row order.
    generator = torch.Generator().manual_seed(0)
    batch, prompt_width, width = 20, 3, 6
    lengths = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 6, 6, 6, 6])
    padding = torch.tensor([1, 2] * 8 + [0] * 4)  # left padding of each prompt
    order = torch.randperm(batch, generator=generator)
    lengths, padding = lengths[order], padding[order]
    completion_mask = (torch.arange(width) < lengths[:, None]).long()
    prompt_mask = (torch.arange(prompt_width) >= padding[:, None]).long()
    completions = torch.randint(1, 16, (batch, width), generator=generator) * completion_mask
    prompt_ids = torch.randint(1, 16, (batch, prompt_width), generator=generator) * prompt_mask
    rollout = make_rollout(completions, completion_mask, torch.zeros(batch), prompt_ids=prompt_ids)
    rollout = rollout._replace(prompt_mask=prompt_mask)
    policy = tiny_policy(seed=6)
    perturb_adapter(policy)
    single = policy.forward_logprobs_values(rollout.input_ids, rollout.attention_mask, rollout.completion_start)

    widths: list[int] = []
    forward = policy.forward_logprobs_values

    def recording_forward(input_ids: torch.Tensor, *args: object, **kwargs: object):
        widths.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    policy.forward_logprobs_values = recording_forward  # type: ignore[method-assign]
    passes = forward_rollout(policy, rollout)
    reference = forward_rollout(policy, rollout, reference=True).logprobs
    assert ROWS_PER_PASS == 16 and widths == [2 + 3, 3 + 6] * 2  # trimmed, then full width; twice
    mask = completion_mask.float()
    for name in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(passes, name) * mask, getattr(single, name) * mask, atol=1e-5, rtol=1e-5)
    expected = policy.reference_logprobs(rollout.input_ids, rollout.attention_mask, rollout.completion_start)
    torch.testing.assert_close(reference * mask, expected * mask, atol=1e-5, rtol=1e-5)
    (passes.logprobs * mask).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("agent_name", "options", "expected"), [
    # the reference pass and the one-chunk step's forward (its own pi_old) share; nothing else runs
    ("grpo", {"group_size": 2}, {"reference": {None}, "policy": {None}}),
    # pi_old comes from a no-grad pass compared with the minibatches' forwards: both stay whole
    ("grpo", {"group_size": 2, "minibatch_size": 2}, {"reference": {None}, "policy": {False}}),
    ("ppo", {"num_minibatches": 2, "epochs": 1}, {"reference": {None}, "policy": {False}}),
    ("ppo", {"num_minibatches": 1, "epochs": 2}, {"reference": {None}, "policy": {False}}),
])
def test_only_passes_no_other_pass_is_compared_with_may_share_prompts(
        agent_name: str, options: dict, expected: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import rlfb.models.policy as policy_module

    policy = tiny_policy(value_head=agent_name == "ppo")
    calls: dict[str, list] = {"reference": [], "policy": []}
    real_forward, real_reference, in_reference = policy.forward_logprobs_values, policy.reference, [False]

    def spy(*args, share_prompts=False, **kwargs):
        calls["reference" if in_reference[0] else "policy"].append(share_prompts)
        return real_forward(*args, share_prompts=share_prompts, **kwargs)

    @contextlib.contextmanager
    def reference():
        in_reference[0] = True
        with real_reference():
            yield
        in_reference[0] = False

    monkeypatch.setattr(policy, "forward_logprobs_values", spy)
    monkeypatch.setattr(policy, "reference", reference)
    monkeypatch.setattr(policy_module, "MIN_SHARED_PROMPT_WORK", 0)  # sharing pays at any size
    completions = torch.tensor([[5, 0], [7, 0], [8, 9], [9, 0]])
    rollout = make_rollout(completions, torch.ones_like(completions), torch.tensor([1.0, 0.0, 2.0, -1.0]),
                           prompts=["a", "a", "b", "b"], group_size=2)
    make_agent(agent_name, policy, options).update(rollout)
    assert {kind: set(choices) for kind, choices in calls.items()} == expected  # every pass of each kind
