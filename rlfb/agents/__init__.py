"""rlfb.agents: PPO, REINFORCE with moving-average or group baselines, KL controllers, rollouts.

Example:
    >>> from rlfb.agents import make_agent
    >>> make_agent("sac", policy=None)
    Traceback (most recent call last):
    ...
    rlfb.errors.ConfigError: unknown agent 'sac'; known: ppo, reinforce, rloo, grpo
"""

from rlfb.agents.base import AGENT_PRESETS, Agent, DegenerateUpdateError, GradientStepper, make_agent
from rlfb.agents.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from rlfb.agents.ppo import PPOAgent, PPOConfig
from rlfb.agents.reinforce import ReinforceAgent, ReinforceConfig
from rlfb.agents.rollout import (
    Rollout,
    RolloutEvaluation,
    collect_rollout,
    evaluate_rollout,
    rollout_reference_logprobs,
)

__all__ = [
    "AGENT_PRESETS",
    "AdaptiveKLController",
    "Agent",
    "DegenerateUpdateError",
    "FixedKLController",
    "GradientStepper",
    "PPOAgent",
    "PPOConfig",
    "ReinforceAgent",
    "ReinforceConfig",
    "Rollout",
    "RolloutEvaluation",
    "collect_rollout",
    "evaluate_rollout",
    "make_agent",
    "make_kl_controller",
    "rollout_reference_logprobs",
]
