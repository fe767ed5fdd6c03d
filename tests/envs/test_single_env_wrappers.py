"""The single environments under Gymnasium's own wrappers (RecordEpisodeStatistics, NormalizeReward, TimeLimit)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import NormalizeReward, RecordEpisodeStatistics, TimeLimit

import rlfb  # noqa: F401  (registers the ids)

ENV_IDS = ["rlfb/TextGeneration-v0", "rlfb/Completion-v0"]
MAX_NEW_TOKENS = 4


@pytest.fixture
def make_env(env_model_path: str, token_count_reward: Any) -> Any:
    def make(env_id: str, **kwargs: Any) -> gym.Env:
        options = {"task": "arithmetic", "model": env_model_path, "rewards": [token_count_reward],
                   "max_new_tokens": MAX_NEW_TOKENS, **kwargs}
        return gym.make(env_id, **options)

    return make


@pytest.fixture(autouse=True)
def errors_on_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def run_episode(env: gym.Env, seed: int = 0) -> list[tuple[Any, ...]]:
    """Reset, then step seeded random actions until the episode ends; every step's (reward, terminated, truncated, info)."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    steps = []
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        steps.append((reward, terminated, truncated, info))
    return steps


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_record_episode_statistics_records_the_return_of_the_steps(make_env: Any, env_id: str) -> None:
    steps = run_episode(RecordEpisodeStatistics(make_env(env_id)))
    for reward, terminated, truncated, _ in steps:
        assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    rewards = [reward for reward, *_ in steps]
    last_info = steps[-1][3]
    assert last_info["episode"]["r"] == sum(rewards) == last_info["reward/length_reward"] > 0
    assert last_info["episode"]["l"] == len(steps)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_normalize_reward_divides_the_paid_reward_by_its_running_std(make_env: Any, env_id: str) -> None:
    env = NormalizeReward(make_env(env_id), gamma=0.9)
    steps = run_episode(env)
    reward, *_, info = steps[-1]
    scale = np.sqrt(env.return_rms.var + env.epsilon)
    assert scale != 1.0
    np.testing.assert_allclose(reward * scale, info["reward/length_reward"], rtol=1e-6)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_a_time_limit_at_least_max_new_tokens_leaves_episodes_scored(make_env: Any, env_id: str) -> None:
    unwrapped_steps = run_episode(make_env(env_id))
    limited_steps = run_episode(TimeLimit(make_env(env_id), max_episode_steps=MAX_NEW_TOKENS))
    assert [step[:3] for step in limited_steps] == [step[:3] for step in unwrapped_steps]
    assert limited_steps[-1][3]["score"] == unwrapped_steps[-1][3]["score"]


def test_a_shorter_time_limit_ends_the_episode_unscored(make_env: Any) -> None:
    """What docs/envs.md says: TimeLimit below max_new_tokens truncates before the env scores; reward 0 throughout."""
    env = make_env("rlfb/TextGeneration-v0", max_episode_steps=2)
    env.reset(seed=0)
    no_eos = (env.unwrapped.eos_token_id + 1) % env.action_space.n
    steps = [env.step(no_eos) for _ in range(2)]
    assert [(reward, terminated, truncated) for _, reward, terminated, truncated, _ in steps] == [
        (0.0, False, False), (0.0, False, True)]
    assert "score" not in steps[-1][4] and "completion" not in steps[-1][4]

    scored = make_env("rlfb/TextGeneration-v0", max_new_tokens=2)  # the fix: cap the length in the env itself
    scored.reset(seed=0)
    _, reward, _, truncated, info = [scored.step(no_eos) for _ in range(2)][-1]
    assert truncated and reward == info["reward/length_reward"] == 2.0

    one_step = make_env("rlfb/Completion-v0", max_episode_steps=1)  # its episodes are one step: always scored
    one_step.reset(seed=0)
    _, reward, terminated, truncated, info = one_step.step(np.full(MAX_NEW_TOKENS, no_eos))
    assert terminated and truncated and reward == info["reward/length_reward"] == MAX_NEW_TOKENS
