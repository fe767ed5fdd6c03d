"""Every registered rlfb id passes Gymnasium's env checker with no warnings."""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs import ENV_IDS

RLFB_IDS = sorted(env_id for env_id in gym.registry if env_id.startswith("rlfb/"))

# Constructor arguments per id beyond the model and the reward (one entry per variant to check).
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "rlfb/TextGeneration-v0": [{"max_new_tokens": 6}, {"task": "sentiment", "render_mode": "ansi", "max_new_tokens": 6}],
    "rlfb/Completion-v0": [{"max_new_tokens": 6}, {"action_type": "text", "max_new_tokens": 6}],
    "rlfb/MultiTurn-v0": [{"protocol": "calculator"}, {"protocol": "calculator", "action_type": "text"},
                          {"protocol": "guess_number", "task": None, "render_mode": "ansi"},
                          {"protocol": "guess_number", "task": None, "action_type": "text", "max_context_tokens": 32}],
}


def test_every_registered_id_is_listed_here() -> None:
    assert RLFB_IDS == sorted(ENV_IDS) == sorted(VARIANTS)


@pytest.mark.parametrize(("env_id", "extra"), [(env_id, extra) for env_id in RLFB_IDS for extra in VARIANTS[env_id]])
def test_check_env_passes_without_warnings(env_id: str, extra: dict[str, Any], env_model_path: str,
                                           token_count_reward: Any) -> None:
    kwargs = {"task": "arithmetic", "model": env_model_path, "rewards": [token_count_reward], **extra}
    env = gym.make(env_id, disable_env_checker=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    env.close()


def test_make_with_the_passive_checker_raises_no_warning(env_model_path: str, token_count_reward: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make("rlfb/TextGeneration-v0", task="arithmetic", model=env_model_path,
                       rewards=[token_count_reward], max_new_tokens=3)
        env.reset(seed=0)
        terminated = truncated = False
        while not (terminated or truncated):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
