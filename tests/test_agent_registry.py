"""The agent registry: an agent added with one register_agent call trains with no change to the trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from test_trainer import tiny_config

from rlfb.agents import AGENTS, Agent, AgentSpec, register_agent
from rlfb.agents.configs import run_agent
from rlfb.errors import ConfigError
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


@dataclasses.dataclass
class CountingConfig:
    """Options of the test agent; ``temperature`` and ``group_size`` are decided by the run config."""

    step_size: float = 1.0
    temperature: float = 1.0
    group_size: int = 1


class CountingAgent(Agent):
    """Changes nothing; counts its updates and reports the rollout's shape."""

    name = "counting"
    built: list[CountingAgent] = []

    def __init__(self, policy: Any, config: CountingConfig) -> None:
        self.policy, self.config, self.updates_seen = policy, config, 0
        CountingAgent.built.append(self)

    def update(self, rollout: Any) -> dict[str, float]:
        self.updates_seen += 1
        return {"train/rows": float(rollout.batch_size), "train/step_size": self.config.step_size}

    def state_dict(self) -> dict[str, Any]:
        return {"updates_seen": self.updates_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates_seen = int(state["updates_seen"])


@pytest.fixture
def counting_agent() -> Iterator[AgentSpec]:
    spec = register_agent(AgentSpec("counting", CountingConfig, f"{__name__}:CountingAgent",
                                    preset={"group_size": 2}, description="test agent"))
    CountingAgent.built.clear()
    yield spec
    del AGENTS["counting"]


def test_a_registered_agent_trains_with_its_options_preset_and_no_value_head(
        counting_agent: AgentSpec, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, "agent={name: counting, step_size: 0.5}", "budget.updates=3",
                         "sampling.temperature=0.7")
    resolved = run_agent(config)
    assert resolved.group_size == 2  # the preset's, as budget.group_size is unset
    assert resolved.options == {"step_size": 0.5, "temperature": 0.7, "group_size": 2}
    trainer = Trainer(config)
    result = trainer.train()
    assert result.step == 3
    (agent,) = CountingAgent.built
    assert agent.updates_seen == 3 and agent.config == CountingConfig(step_size=0.5, temperature=0.7, group_size=2)
    assert trainer.policy.value_head is None  # needs_value_head defaults to False
    rows = [row for row in read_metrics(result.run_dir) if "train/rows" in row]
    assert [row["train/rows"] for row in rows] == [4.0, 4.0, 4.0]  # its metrics reach the logs
    assert {row["train/step_size"] for row in rows} == {0.5}


def test_registry_refuses_a_taken_name_and_names_the_known_agents(counting_agent: AgentSpec,
                                                                   tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an agent named 'ppo' is already registered"):
        register_agent(AgentSpec("ppo", CountingConfig, f"{__name__}:CountingAgent"))
    # Every registered agent is named, the test's own last (the built-in list grows with each agent).
    with pytest.raises(ConfigError, match="unknown agent 'countin' in agent.name; known: ppo, reinforce, rloo, "
                                          "grpo, .*counting$"):
        run_agent(tiny_config(tiny_model_dir, tmp_path, "agent.name=countin"))
