"""collect_rollout drives the real vector env; its log-probs agree with the training forward pass."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest
import torch

import rlfb  # noqa: F401  (registers the environments)
from rlfb.agents import evaluate_rollout, make_agent
from rlfb.agents.rollout import collect_rollout
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig


def words(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """Sequence reward: the number of words of the completion."""
    return [float(len(text.split())) for text in completions]


def per_token_half(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: object):
    """Dense reward: 0.5 on every token."""
    return [[0.5] * len(ids) for ids in completion_ids]


@pytest.fixture
def policy(tiny_model_dir: Path) -> Policy:
    torch.manual_seed(0)
    return Policy.from_pretrained(str(tiny_model_dir), LoraSettings(r=4), value_head=True, device="cpu")


def make_venv(tiny_model_dir: Path, rewards: list, group_size: int = 2) -> gym.vector.VectorEnv:
    return gym.make_vec(
        "rlfb/TextGeneration-v0", num_envs=4, vectorization_mode="vector_entry_point", task="sentiment",
        model=str(tiny_model_dir), rewards=rewards, group_size=group_size, max_new_tokens=6, device="cpu",
    )  # fmt: skip


def test_rollout_matches_the_env_and_the_training_forward_pass(tiny_model_dir: Path, policy: Policy) -> None:
    venv = make_venv(tiny_model_dir, [words])
    rollout = collect_rollout(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), seed=0)

    assert rollout.completion_ids.shape == rollout.completion_mask.shape == rollout.sampled_logprobs.shape
    assert rollout.completion_ids.shape[0] == 4 and rollout.completion_ids.shape[1] <= 6
    assert rollout.group_size == 2
    assert rollout.prompts[0] == rollout.prompts[1] and rollout.prompts[2] == rollout.prompts[3]
    for row in range(4):
        ids = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        assert rollout.completions[row] == policy.tokenizer.decode(ids, skip_special_tokens=True)
        assert rollout.scores[row].item() == float(len(rollout.completions[row].split()))
    torch.testing.assert_close(rollout.reward_components["words"], rollout.scores)
    assert rollout.per_token_rewards is None
    # Single-turn: every completion token is the model's (the same tensor, no copy), one turn ending at the
    # last token, no turn reward besides the score.
    assert rollout.action_mask is rollout.completion_mask
    assert rollout.turn_ends.tolist() == (rollout.completion_mask.sum(1, keepdim=True) - 1).tolist()
    assert rollout.turn_rewards.eq(0).all() and rollout.num_turns.eq(1).all()

    # Sampled (KV cache, step by step) and recomputed (full sequence) log-probs agree: the ratio starts at 1.
    evaluation = evaluate_rollout(policy, rollout)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(evaluation.logprobs[mask], rollout.sampled_logprobs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(evaluation.reference_logprobs, evaluation.logprobs)  # adapter B starts at 0


def test_dense_rewards_land_on_their_tokens(tiny_model_dir: Path, policy: Policy) -> None:
    venv = make_venv(tiny_model_dir, [words, per_token_half], group_size=1)
    rollout = collect_rollout(venv, policy, SamplingConfig(), torch.Generator().manual_seed(1), seed=1)
    assert rollout.per_token_rewards is not None
    torch.testing.assert_close(rollout.per_token_rewards, 0.5 * rollout.completion_mask.float())
    assert rollout.scores.tolist() == [float(len(text.split())) for text in rollout.completions]


def test_an_agent_updates_from_a_collected_rollout(tiny_model_dir: Path, policy: Policy) -> None:
    venv = make_venv(tiny_model_dir, [words])
    agent = make_agent("ppo", policy, {"learning_rate": 1e-2})
    rollout = collect_rollout(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), seed=0)
    metrics = agent.update(rollout)
    assert metrics["train/skipped_updates"] == 0.0
    after = evaluate_rollout(policy, rollout)
    assert not torch.allclose(after.logprobs, after.reference_logprobs)
