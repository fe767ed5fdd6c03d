"""rlfb: reinforcement learning from feedback for language models.

Importing rlfb registers its Gymnasium environments (``rlfb/TextGeneration-v0``, ``rlfb/Completion-v0``,
``rlfb/MultiTurn-v0``) and makes the reward registry available as :mod:`rlfb.rewards`.

Example:
    >>> import gymnasium as gym
    >>> import rlfb
    >>> "rlfb/TextGeneration-v0" in gym.registry
    True
"""

from __future__ import annotations

from rlfb import envs, rewards  # noqa: F401  (envs registers the Gymnasium ids on import)

__version__ = "0.1.0"

__all__ = ["__version__", "envs", "rewards"]
