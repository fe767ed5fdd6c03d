"""The trainer's loop as configured: the budget in updates and in time, callbacks that stop it, and the
exact updates at which metrics rows, samples, evaluations and checkpoints appear (docs/metrics.md).
Sampling and agent settings of the run config reach the rollouts, the evaluation and the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wiring_helpers import run_config

import rlfb.trainer as trainer_module
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


def update_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir) if "rollout/reward_mean" in row]


def texts(run_dir: Path, tag: str) -> list[dict]:
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["tag"] == tag]


def test_logging_samples_evaluation_and_checkpoints_follow_their_cadences(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    config = run_config(tiny_model_dir, tmp_path, "budget.updates=5", "logging.log_every=2",
                        "logging.samples_every=3", "eval.every=3", "checkpoint.every=2", "checkpoint.keep_last=1")
    result = Trainer(config).train()
    rows = read_metrics(result.run_dir)
    assert result.step == 5
    assert update_steps(result.run_dir) == [2, 4]  # every log_every updates
    assert [row["step"] for row in texts(result.run_dir, "samples/rollout")] == [3]
    assert [row["step"] for row in rows if "eval/kl" in row] == [0, 3, 5]  # before, every 3, after
    # Saved at 2 and 4; keep_last 1 leaves only the newest.
    assert [path.name for path in (result.run_dir / "checkpoints").iterdir()] == ["step_00000004"]


def test_a_callback_returning_false_stops_training_whatever_the_others_return(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    seen = []

    def keep_going(step: int, metrics: dict) -> None:
        seen.append(step)

    def stop_at_two(step: int, metrics: dict) -> bool:
        return step < 2

    result = Trainer(run_config(tiny_model_dir, tmp_path, "budget.updates=5"),
                     callbacks=[keep_going, stop_at_two]).train()
    assert (result.step, seen, update_steps(result.run_dir)) == (2, [1, 2], [1, 2])
    assert not result.interrupted and result.after is not None  # a normal end: final evaluation done


class _FakeClock:
    """``time`` for the trainer: every perf_counter() call advances one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_time_limit_counts_training_seconds(tiny_model_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Each update reads the clock thrice: 1 s of rollout + 1 s of update = 2 training seconds.
    monkeypatch.setattr(trainer_module, "time", _FakeClock())
    # budget.updates=8 is a backstop: a broken time limit ends there instead of never.
    config = run_config(tiny_model_dir, tmp_path, "budget.updates=8", "budget.time_limit_s=5",
                        "eval.num_prompts=0")
    result = Trainer(config).train()
    assert result.step == 3  # elapsed 2, 4, 6: the limit of 5 s is passed after the third update
    assert [row["time/elapsed_s"] for row in read_metrics(result.run_dir)] == [2.0, 4.0, 6.0]


def test_evaluation_uses_eval_seed_and_num_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    def before(seed: int, eval_seed: int) -> dict:
        config = run_config(tiny_model_dir, tmp_path / f"{seed}-{eval_seed}", "budget.updates=1", f"seed={seed}",
                            f"eval.seed={eval_seed}", "eval.num_samples=2")
        result = Trainer(config).train()
        assert result.before is not None and len(result.before.samples) == 2
        return result.before.to_dict()

    # Before training every seed's policy is the base model: only the evaluation seed changes the samples.
    assert before(seed=3, eval_seed=11) == before(seed=4, eval_seed=11)
    assert before(seed=3, eval_seed=11)["samples"] != before(seed=3, eval_seed=12)["samples"]


@pytest.mark.parametrize("setting", ["sampling.top_k=1", "sampling.top_p=0.000001", "sampling.temperature=0.001"])
def test_sampling_settings_reach_rollouts_and_evaluation(tiny_model_dir: Path, tmp_path: Path,
                                                         setting: str) -> None:
    # GRPO with one group of 4: the four rollout completions share a prompt. A setting that makes
    # sampling (nearly) greedy makes them identical, and evaluation independent of its seed.
    def run(*overrides: str) -> Trainer:
        config = run_config(tiny_model_dir, tmp_path / str(len(list(tmp_path.iterdir()))), "budget.updates=1",
                            "budget.group_size=4", "logging.samples_every=1", *overrides, agent="grpo")
        trainer = Trainer(config)
        trainer.train()
        return trainer

    greedy = run(setting)
    rollout_text = texts(greedy.run_dir, "samples/rollout")[0]["text"]
    completions = {line.split("|")[2] for line in rollout_text.splitlines()[2:]}
    assert len(completions) == 1, rollout_text
    other_seed = run(setting, "eval.seed=99")
    assert json.loads((greedy.run_dir / "eval.json").read_text())["before"]["samples"] == \
        json.loads((other_seed.run_dir / "eval.json").read_text())["before"]["samples"]
    plain = run()
    plain_text = texts(plain.run_dir, "samples/rollout")[0]["text"]
    assert len({line.split("|")[2] for line in plain_text.splitlines()[2:]}) > 1  # the check has teeth


def test_run_config_decides_the_agents_temperature_and_schedule_length(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    config = run_config(tiny_model_dir, tmp_path, "budget.updates=3", "sampling.temperature=0.7",
                        "agent.lr_schedule=linear", "eval.num_prompts=0")
    trainer = Trainer(config)
    result = trainer.train()
    assert trainer.agent.config.temperature == 0.7
    rates = [row["train/learning_rate"] for row in read_metrics(result.run_dir)]
    assert rates == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])  # linear decay over budget.updates


def test_completions_per_prompt_samples_each_held_out_prompt_that_many_times(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    def before(copies: int) -> dict:
        config = run_config(tiny_model_dir, tmp_path / str(copies), "budget.updates=1", "eval.num_prompts=3",
                            f"eval.completions_per_prompt={copies}", "eval.num_samples=6")
        result = Trainer(config).train()
        assert result.before is not None
        return result.before.to_dict()

    once, thrice = before(1), before(3)
    assert once["num_prompts"] == 3 and thrice["num_prompts"] == 9  # every completion counts in the means
    prompts = [sample["prompt"] for sample in thrice["samples"]]
    assert prompts[:3] == [prompts[0]] * 3 and prompts[3:6] == [prompts[3]] * 3 and prompts[0] != prompts[3]
    assert len({sample["completion"] for sample in thrice["samples"][:3]}) > 1  # independent samples
    assert thrice["kl"] == 0.0 and thrice["rewards"] != once["rewards"]  # the base model, a larger sample


def test_rlfb_eval_of_a_run_samples_as_many_completions_per_prompt_as_its_evaluation(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlfb.cli import main

    config = run_config(tiny_model_dir, tmp_path, "eval.num_prompts=2", "eval.completions_per_prompt=3")
    result = Trainer(config).train()
    assert result.after is not None and result.after.num_prompts == 6
    capsys.readouterr()
    assert main(["eval", str(result.run_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # The same rows, seed and adapter as the trainer's final evaluation: the same measures.
    assert evaluated["after"]["num_prompts"] == 6
    assert evaluated["after"]["rewards"] == pytest.approx(result.after.rewards)
    assert evaluated["after"]["kl"] == pytest.approx(result.after.kl, abs=1e-6)
