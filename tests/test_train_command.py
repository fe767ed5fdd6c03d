"""`rlfb train`'s config preparation: switching agents with --set, resume errors, reward scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rlfb.rewards
from rlfb.agents import AGENTS
from rlfb.commands.train import prepare_config
from rlfb.config import config_from_dict
from rlfb.errors import ConfigError
from rlfb.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml") if not path.name.startswith(("reward_model", "pipeline")))
PIPELINE_CONFIGS = sorted(CONFIGS.glob("pipeline_*.yaml"))


# Options an agent cannot do without, given on the command line of the switch.
REQUIRED_OPTIONS = {"distillation": ["agent.teacher=rlfb-tiny"]}
# Configs of optional extras: the library each needs (their checks import it).
NEEDS_LIBRARY = {"textarena_guess_grpo": "textarena", "reasoning_gym_grpo": "reasoning_gym",
                 "reference_chrf_grpo": "sacrebleu"}


@pytest.mark.parametrize("agent", list(AGENTS))
@pytest.mark.parametrize("config_path", RUN_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_switches_to_every_agent(config_path: Path, agent: str, tmp_path: Path) -> None:
    if config_path.stem in NEEDS_LIBRARY:
        pytest.importorskip(NEEDS_LIBRARY[config_path.stem])
    config = prepare_config(str(config_path), [f"agent.name={agent}", *REQUIRED_OPTIONS.get(agent, []),
                                               f"output_dir={tmp_path}"], None)
    trainer = Trainer(config)  # checks the agent's options; loads no model
    assert trainer.config.agent.name == agent
    assert list(tmp_path.iterdir()) == []


def test_the_switch_drops_only_the_file_options_the_new_agent_lacks_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS / "sentiment_ppo.yaml"
    config = prepare_config(str(path), ["agent.name=grpo", f"output_dir={tmp_path}"], None)
    assert config.agent.params == {"kl_target": 3.0}  # early_stop_kl (PPO only) dropped, kl_target kept
    assert capsys.readouterr().err.strip() == (
        "rlfb train: note: --set agent.name=grpo replaces agent 'ppo'; dropped the config file's options "
        "that grpo does not have: early_stop_kl")
    # Without a switch nothing is dropped and nothing is said.
    assert prepare_config(str(path), [f"output_dir={tmp_path}"], None).agent.params["early_stop_kl"] == 0.02
    assert capsys.readouterr().err == ""
    # An option given on the same command line is the user's: kept, so the agent rejects it by name, before
    # anything is loaded.
    with pytest.raises(ConfigError, match=r"unknown key 'agent.epochs'"):
        prepare_config(str(path), ["agent.name=grpo", "agent.epochs=2", f"output_dir={tmp_path}"], None)


def test_a_kl_target_switched_to_an_agent_whose_kl_is_off_by_default_keeps_the_file_agents_kl_coef(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = prepare_config(str(CONFIGS / "sentiment_ppo.yaml"), ["agent.name=self_training",
                                                                  f"output_dir={tmp_path}"], None)
    assert config.agent.params == {"kl_target": 3.0, "kl_coef": 0.1}  # ppo's default beta, adapted toward 3 nats
    assert "kept ppo's kl_coef 0.1 with the file's kl_target" in capsys.readouterr().err


def test_resume_of_a_directory_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--resume '.*' has no config.yaml, so it is not a run directory") as error:
        prepare_config(None, [], str(tmp_path))
    assert "ready configs" not in str(error.value)


@rlfb.rewards.register("test_completion_characters")
def completion_characters(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """The length of the completion in characters: a reward that varies across samples."""
    return [float(len(text)) for text in completions]


def first_update_metrics(model_dir: Path, output_dir: Path, *overrides: str) -> dict[str, float]:
    config = config_from_dict({
        "task": "sentiment", "model": str(model_dir), "rewards": ["test_completion_characters"],
        "agent": {"name": "reinforce"}, "lora": {"r": 2, "alpha": 4}, "sampling": {"max_new_tokens": 6},
        "budget": {"updates": 1, "num_envs": 8}, "eval": {"num_prompts": 0}, "checkpoint": {"every": 0},
        "logging": {"progress_bar": False, "tensorboard": False}, "device": "cpu",
        "output_dir": str(output_dir), "seed": 0}, list(overrides))
    seen: list[dict[str, float]] = []
    Trainer(config, callbacks=[lambda step, metrics: seen.append(metrics)]).train()
    return seen[0]


def test_reward_scale_keys_change_the_rewards_the_agent_sees(tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plain = first_update_metrics(tiny_model_dir, tmp_path)
    normalized = first_update_metrics(tiny_model_dir, tmp_path, "reward_scale.normalize=true")
    clipped = first_update_metrics(tiny_model_dir, tmp_path, "reward_scale.clip=1.5")
    assert plain["rollout/reward_mean"] > 2 and plain["rollout/reward_std"] > 0.1  # characters: varied
    # The first batch is normalized with its own statistics: mean 0, standard deviation 1.
    assert normalized["rollout/reward_mean"] == pytest.approx(0.0, abs=1e-6)
    assert normalized["rollout/reward_std"] == pytest.approx(1.0, abs=1e-6)
    assert clipped["rollout/reward_mean"] == pytest.approx(1.5)  # every completion has >= 2 characters
    # The component is logged in its own units either way (same seed, same samples).
    raw = plain["rollout/reward/test_completion_characters"]
    assert normalized["rollout/reward/test_completion_characters"] == raw
    assert clipped["rollout/reward/test_completion_characters"] == raw


@pytest.mark.parametrize("config_path", PIPELINE_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_pipeline_config_plans_and_rlfb_train_refuses_it_naming_the_command(config_path: Path) -> None:
    from rlfb.pipeline import load_pipeline_config, plan

    config = load_pipeline_config(config_path)
    assert {run.stage.kind for run in plan(config, rounds=2)} >= {"sft", "reward_model", "rl", "eval"}
    with pytest.raises(ConfigError, match="is a pipeline config .*`rlfb pipeline "):
        prepare_config(str(config_path), [], None)
