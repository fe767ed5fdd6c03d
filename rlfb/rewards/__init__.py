"""Reward functions: the plug-in contract, the registry, combination, built-ins and learned reward models.

A reward is any callable ``fn(prompts, completions, **kwargs) -> list[float | None]`` called with TRL's
keyword arguments (``prompts``, ``completions``, ``completion_ids`` and every extra task column by name),
so reward functions written for TRL's ``GRPOTrainer`` work unchanged. See docs/rewards.md.

Example:
    >>> import rlfb.rewards
    >>> @rlfb.rewards.register("ends_with_period")
    ... def ends_with_period(prompts, completions, **kwargs):
    ...     '''1.0 when the completion ends with a full stop.'''
    ...     return [float(text.rstrip().endswith(".")) for text in completions]
    >>> rewards = rlfb.rewards.RewardSet(["ends_with_period", {"name": "sentiment", "weight": 0.5}])
    >>> result = rewards(["The film was"], [" great."], completion_ids=[[1, 2]])
    >>> result.components["ends_with_period"].tolist()
    [1.0]
    >>> round(float(result.total[0]), 3)
    1.312
"""

from __future__ import annotations

# The built-in modules register themselves on import; they import torch / transformers lazily so that
# `import rlfb` (and `rlfb --help`) stays fast.
from rlfb.integrations import reasoning_gym as _reasoning_gym  # noqa: F401  (registers its reward)
from rlfb.rewards import builtin, likelihood, reference, reward_model  # noqa: F401
from rlfb.rewards.registry import RewardFunction, build_reward, get_registered, list_rewards, register
from rlfb.rewards.reward_set import RewardResult, RewardSet, RewardSpec

__all__ = ["RewardFunction", "RewardResult", "RewardSet", "RewardSpec", "build_reward", "get_registered",
           "list_rewards", "register"]
