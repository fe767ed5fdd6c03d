"""rlfb.agents: PPO, REINFORCE with moving-average or group baselines, self-training, evolution strategies,
on-policy distillation, KL controllers, rollouts (single- and multi-turn episodes).

The names below are imported on first use, so ``rlfb.agents.configs`` (the agents' options, checked
before a run loads anything) is importable without torch.

Example:
    >>> from rlfb.agents import make_agent
    >>> make_agent("sac", policy=None)
    Traceback (most recent call last):
    ...
    rlfb.errors.ConfigError: unknown agent 'sac'; known: ppo, reinforce, rloo, grpo, ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlfb.agents.base import Agent, DegenerateUpdateError, GradientStepper, make_agent
    from rlfb.agents.configs import (
        AGENTS,
        AgentSpec,
        DistillationConfig,
        ESConfig,
        PPOConfig,
        ReinforceConfig,
        SelfTrainingConfig,
        agent_config,
        register_agent,
    )
    from rlfb.agents.distillation import DistillationAgent
    from rlfb.agents.es import ESAgent
    from rlfb.agents.kl import AdaptiveKLController, FixedKLController, make_kl_controller
    from rlfb.agents.multi_turn import EpisodeBatch, collect_episodes
    from rlfb.agents.ppo import PPOAgent
    from rlfb.agents.reinforce import ReinforceAgent
    from rlfb.agents.rollout import (
        RolloutEvaluation,
        collect_rollout,
        evaluate_rollout,
        rollout_reference_logprobs,
    )
    from rlfb.agents.self_training import SelfTrainingAgent
    from rlfb.agents.trajectory import Rollout, Segment, build_rollout

_MODULE_OF = {
    "AGENTS": "configs", "AgentSpec": "configs", "ESConfig": "configs", "ESAgent": "es", "PPOConfig": "configs",
    "ReinforceConfig": "configs", "SelfTrainingConfig": "configs",
    "agent_config": "configs", "register_agent": "configs",
    "Agent": "base", "DegenerateUpdateError": "base", "GradientStepper": "base", "make_agent": "base",
    "AdaptiveKLController": "kl", "FixedKLController": "kl", "make_kl_controller": "kl",
    "PPOAgent": "ppo", "ReinforceAgent": "reinforce", "SelfTrainingAgent": "self_training",
    "DistillationAgent": "distillation", "DistillationConfig": "configs",
    "EpisodeBatch": "multi_turn", "collect_episodes": "multi_turn",
    "RolloutEvaluation": "rollout", "collect_rollout": "rollout", "evaluate_rollout": "rollout",
    "rollout_reference_logprobs": "rollout",
    "Rollout": "trajectory", "Segment": "trajectory", "build_rollout": "trajectory",
}

__all__ = [
    "AGENTS",
    "AgentSpec",
    "AdaptiveKLController",
    "Agent",
    "DegenerateUpdateError",
    "ESAgent",
    "ESConfig",
    "DistillationAgent",
    "DistillationConfig",
    "EpisodeBatch",
    "FixedKLController",
    "GradientStepper",
    "PPOAgent",
    "PPOConfig",
    "ReinforceAgent",
    "ReinforceConfig",
    "Rollout",
    "RolloutEvaluation",
    "Segment",
    "SelfTrainingAgent",
    "SelfTrainingConfig",
    "agent_config",
    "build_rollout",
    "collect_episodes",
    "collect_rollout",
    "evaluate_rollout",
    "make_agent",
    "make_kl_controller",
    "register_agent",
    "rollout_reference_logprobs",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'rlfb.agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rlfb.agents.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
