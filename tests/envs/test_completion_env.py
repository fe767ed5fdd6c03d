"""Completion-v0: a whole completion per step, as token ids or as text, rewarded at once."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import rlfb  # noqa: F401  (registers the ids)
from rlfb.errors import ConfigError


@pytest.fixture
def make_env(env_model_path: str) -> Any:
    def make(**kwargs: Any) -> Any:
        options = {"task": "arithmetic", "model": env_model_path, "rewards": ["exact_match"], "max_new_tokens": 6,
                   "max_prompt_tokens": 12, **kwargs}
        return gym.make("rlfb/Completion-v0", disable_env_checker=True, **options).unwrapped

    return make


def test_token_completion_is_cut_at_eos_and_rewarded_at_once(make_env: Any, env_tokenizer: Any) -> None:
    env = make_env()
    env.reset(seed=0, options={"prompt": {"prompt": "3+4=", "answer": "7"}})
    seven = env_tokenizer("7")["input_ids"]
    action = np.array(seven + [env_tokenizer.eos_token_id] + [5] * (6 - len(seven) - 1))
    obs, reward, terminated, truncated, info = env.step(action)
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["completion"] == "7" and info["reward/exact_match"] == 1.0
    assert obs["attention_mask"][12:].sum() == len(seven) + 1
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(action)


def test_text_completion_uses_the_text_space_and_keeps_the_exact_text(make_env: Any) -> None:
    env = make_env(action_type="text", charset="0123456789 ", max_chars=5)
    assert isinstance(env.action_space, gym.spaces.Text) and env.action_space.max_length == 5
    env.reset(options={"prompt": {"prompt": "3+4=", "answer": "7"}})
    _, reward, *_, info = env.step(" 7")
    assert reward == 1.0 and info["completion"] == " 7"
    env.reset(options={"prompt": {"prompt": "3+4=", "answer": "7"}})
    assert env.step("8")[1] == 0.0


def test_bad_completions_are_clear_errors(make_env: Any) -> None:
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"token ids \[999\] out of range"):
        env.step(np.array([5, 999]))
    with pytest.raises(ValueError, match="1 to 6 integer token ids"):
        env.step(np.arange(7))
    text_env = make_env(action_type="text", charset="0123456789")
    text_env.reset(seed=0)
    with pytest.raises(ValueError, match=r"outside the charset: \['a'\]"):
        text_env.step("7a")
    with pytest.raises(ConfigError, match="unknown action_type 'words'"):
        make_env(action_type="words")
