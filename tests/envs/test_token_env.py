"""TextGeneration-v0 (one token per step): reproducible resets, the observation layout, episode ends, rewards, errors."""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs.core import PromptTruncationWarning
from rlfb.envs.tasks import Task
from rlfb.errors import ConfigError

PROMPT_WIDTH = 16


@pytest.fixture
def make_env(env_model_path: str, token_count_reward: Any) -> Any:
    def make(**kwargs: Any) -> Any:
        options = {"task": "arithmetic", "model": env_model_path, "rewards": [token_count_reward],
                   "max_new_tokens": 4, "max_prompt_tokens": PROMPT_WIDTH, **kwargs}
        return gym.make("rlfb/TextGeneration-v0", disable_env_checker=True, **options).unwrapped

    return make


def test_seeded_reset_is_reproducible_and_seeds_differ(make_env: Any) -> None:
    env = make_env()
    prompts = [env.reset(seed=seed)[1]["prompt"] for seed in (1, 1, 2, 3, 4)]
    assert prompts[0] == prompts[1]
    assert len(set(prompts[1:])) > 1
    env.reset(seed=5)
    unseeded = [env.reset()[1]["prompt"] for _ in range(3)]
    env.reset(seed=5)
    assert [env.reset()[1]["prompt"] for _ in range(3)] == unseeded


def test_observation_is_a_left_padded_prompt_then_the_completion(make_env: Any, env_tokenizer: Any) -> None:
    env = make_env()
    obs, info = env.reset(seed=0, options={"prompt": "3+4="})
    prompt_ids = env_tokenizer("3+4=")["input_ids"]
    assert obs["input_ids"].shape == (PROMPT_WIDTH + 4,) and obs["input_ids"].dtype == np.int64
    assert obs["input_ids"][PROMPT_WIDTH - len(prompt_ids) : PROMPT_WIDTH].tolist() == prompt_ids
    assert obs["attention_mask"].tolist() == [0] * (PROMPT_WIDTH - len(prompt_ids)) + [1] * len(prompt_ids) + [0] * 4
    obs, reward, terminated, truncated, info = env.step(7)
    assert obs["input_ids"][PROMPT_WIDTH] == 7 and obs["attention_mask"][PROMPT_WIDTH] == 1
    assert obs["attention_mask"][PROMPT_WIDTH + 1 :].sum() == 0
    assert (reward, terminated, truncated, info) == (0.0, False, False, {})


def test_eos_terminates_with_the_reward_and_the_decoded_texts(make_env: Any, env_tokenizer: Any) -> None:
    env = make_env()
    env.reset(seed=0, options={"prompt": "3+4="})
    word = env_tokenizer("Hello")["input_ids"]
    for token in word:
        env.step(token)
    _, reward, terminated, truncated, info = env.step(env_tokenizer.eos_token_id)
    assert terminated and not truncated
    assert reward == len(word) + 1  # the length reward counts the EOS token too
    assert info["prompt"] == "3+4=" and info["completion"] == "Hello"
    assert info["reward/length_reward"] == info["score"] == reward
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(5)


def test_truncated_at_max_new_tokens(make_env: Any) -> None:
    env = make_env(max_new_tokens=3)
    env.reset(seed=0)
    outcomes = [env.step(5)[1:4] for _ in range(3)]
    assert outcomes == [(0.0, False, False), (0.0, False, False), (3.0, False, True)]


def test_task_columns_reach_the_reward_functions(make_env: Any, env_tokenizer: Any) -> None:
    env = make_env(rewards=["exact_match"])
    env.reset(seed=0, options={"prompt": {"prompt": "3+4=", "answer": "7"}})
    for token in env_tokenizer("7")["input_ids"]:
        env.step(token)
    *_, info = env.step(env_tokenizer.eos_token_id)
    assert info["reward/exact_match"] == 1.0
    env.reset(seed=0, options={"prompt": {"prompt": "3+4=", "answer": "8"}})
    for token in env_tokenizer("7")["input_ids"]:
        env.step(token)
    assert env.step(env_tokenizer.eos_token_id)[4]["reward/exact_match"] == 0.0


def test_eval_split_and_index_options(make_env: Any) -> None:
    env = make_env()
    eval_prompts = env.settings.task.eval_prompts()
    assert env.reset(seed=0, options={"split": "eval", "index": 3})[1]["prompt"] == eval_prompts[3]
    eval_env = make_env(split="eval")
    drawn = {eval_env.reset(seed=seed)[1]["prompt"] for seed in range(5)}
    assert drawn <= set(eval_prompts)


def test_dense_reward_is_paid_every_step_and_per_token_rewards_land_in_info(make_env: Any) -> None:
    def per_token_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                         **kwargs: Any) -> list[list[float]]:
        return [[0.5] * len(ids) for ids in completion_ids]

    env = make_env(rewards=[per_token_reward], dense_reward=lambda tokens, obs: (tokens == 5).float(),
                   max_new_tokens=3)
    env.reset(seed=0)
    rewards = [env.step(token)[1] for token in (5, 6)]
    _, last_reward, _, truncated, info = env.step(5)
    assert rewards == [1.0, 0.0] and truncated
    # the last step pays its dense reward (1.0) plus the episode's per-token rewards (3 x 0.5)
    assert last_reward == 2.5
    np.testing.assert_allclose(info["token_rewards"], [0.5, 0.5, 0.5])
    assert info["reward/per_token_reward"] == 1.5


def test_long_prompt_is_left_truncated_counted_and_warned_about_once(make_env: Any, env_tokenizer: Any) -> None:
    long_prompt = "Hello world, this is a tiny tokenizer for tests. " * 4
    env = make_env()
    with pytest.warns(PromptTruncationWarning, match="max_prompt_tokens=16") as caught:
        obs, _ = env.reset(seed=0, options={"prompt": long_prompt})
        env.reset(seed=0, options={"prompt": long_prompt})
    assert len(caught) == 1 and env.num_truncated_prompts == 2
    assert obs["input_ids"][:PROMPT_WIDTH].tolist() == env_tokenizer(long_prompt)["input_ids"][-PROMPT_WIDTH:]
    assert obs["attention_mask"][:PROMPT_WIDTH].all()


@pytest.mark.parametrize("action", [320, -1, 10_000])
def test_out_of_range_action_is_an_error(make_env: Any, action: int) -> None:
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"out of range: a token id must be in \[0, 320\)"):
        env.step(action)


def test_non_integer_action_and_unknown_options_are_errors(make_env: Any) -> None:
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="one integer token id"):
        env.step(2.5)
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['promt'\]; known: split, prompt, index"):
        env.reset(options={"promt": "hi"})
    with pytest.raises(ValueError, match="out of range for the train split"):
        env.reset(options={"index": 10**6})


def test_bad_settings_are_clear_errors(make_env: Any, env_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="exceeds the model's context window of 256"):
        make_env(max_prompt_tokens=250, max_new_tokens=10)
    with pytest.raises(ConfigError, match="task 'plain' has no default reward"):
        make_env(task=Task("plain", train=({"prompt": "a"},), eval=({"prompt": "b"},)), rewards=None)
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 2"):
        make_env(max_new_tokens=1)
    with pytest.raises(ConfigError, match="max_new_tokens=300 leaves no room for a prompt"):
        make_env(max_prompt_tokens=None, max_new_tokens=300)


def test_default_prompt_width_leaves_room_for_the_completion(make_env: Any) -> None:
    assert make_env(max_prompt_tokens=None, max_new_tokens=32).max_prompt_tokens == 64
    assert make_env(max_prompt_tokens=None, max_new_tokens=220).max_prompt_tokens == 256 - 220


def test_tokenizer_object_works_without_a_model_name(env_tokenizer: Any, token_count_reward: Any) -> None:
    env = gym.make("rlfb/TextGeneration-v0", disable_env_checker=True, task="sentiment", model=None,
                   tokenizer=env_tokenizer, rewards=[token_count_reward], render_mode="ansi").unwrapped
    _, info = env.reset(seed=0)
    env.step(env_tokenizer("!")["input_ids"][0])
    assert env.render() == info["prompt"] + "!"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env.observation_space.contains(env.reset(seed=1)[0])


def test_reset_draws_only_from_np_random(make_env: Any) -> None:
    env = make_env()
    env.reset(seed=0)
    torch.manual_seed(123)
    np.random.seed(123)
    first = env.reset()[1]["prompt"]
    env.reset(seed=0)
    torch.manual_seed(999)
    np.random.seed(999)
    assert env.reset()[1]["prompt"] == first


def test_pinning_by_text_and_by_index_at_once_is_an_error(make_env: Any) -> None:
    with pytest.raises(ValueError, match="either by text or by index"):
        make_env().reset(options={"prompt": "1+1=", "index": 0})
