"""The trainer on bad input: rewards that score nothing, rewards that log, long prompts, failed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_trainer import tiny_config

from rlfb.agents.rollout import Rollout
from rlfb.errors import RewardError
from rlfb.logging import read_metrics
from rlfb.rewards import register
from rlfb.trainer import Trainer, rollout_metrics


@register("test_never_scores")
def never_scores(prompts: list[str], completions: list[str], **kwargs: object) -> list[None]:
    """None for every sample: a reward that cannot judge this task."""
    return [None] * len(completions)


@register("test_logs_vowels")
def logs_vowels(prompts: list[str], completions: list[str], log_metric, log_extra, **kwargs: object) -> list[float]:
    """1 for a completion with a vowel, else 0; logs the batch's fraction and a per-completion column."""
    scores = [float(any(letter in "aeiou" for letter in text)) for text in completions]
    log_metric("vowel_fraction", sum(scores) / len(scores))
    log_extra("has_vowel", [bool(score) for score in scores])
    return scores


@register("test_raises")
def raises(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """Fails on every call, as a reward with a bug does."""
    raise KeyError("score")


def hand_rollout(scores: list[float], components: dict[str, list[float]]) -> Rollout:
    """A rollout of one-token completions (token 1, never EOS) with the given rewards."""
    batch = len(scores)
    ids = torch.ones(batch, 1, dtype=torch.long)
    return Rollout(prompt_ids=ids, prompt_mask=ids, completion_ids=ids, completion_mask=ids,
                   sampled_logprobs=torch.zeros(batch, 1), scores=torch.tensor(scores),
                   reward_components={name: torch.tensor(values) for name, values in components.items()},
                   per_token_rewards=None, prompts=["p"] * batch, completions=["c"] * batch)


def test_reward_metrics_leave_out_rows_no_reward_scored() -> None:
    nan = float("nan")
    rollout = hand_rollout([1.0, 0.0, 3.0, 0.0], {"a": [1.0, nan, 3.0, nan]})
    metrics = rollout_metrics(rollout, ["a"], eos_token_id=0)
    assert metrics["rollout/reward_mean"] == pytest.approx(2.0)  # not 1.0: the two zeros are "no score"
    assert metrics["rollout/reward_std"] == pytest.approx(1.0)
    assert metrics["rollout/scored_fraction"] == pytest.approx(0.5)
    assert metrics["rollout/reward/a"] == pytest.approx(2.0)
    unscored = rollout_metrics(hand_rollout([0.0, 0.0], {"a": [nan, nan]}), ["a"], eos_token_id=0)
    assert math.isnan(unscored["rollout/reward_mean"]) and math.isnan(unscored["rollout/reward_std"])
    assert unscored["rollout/scored_fraction"] == 0.0


@pytest.mark.filterwarnings("ignore:reward 'test_never_scores' returned None:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:every reward returned None:RuntimeWarning")
def test_a_reward_that_never_scores_stops_the_run_after_three_rollouts(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, "rewards=[test_never_scores]", "budget.updates=10",
                         "eval.num_prompts=0")
    trainer = Trainer(config)
    with pytest.raises(RewardError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith("reward(s) 'test_never_scores' returned None for every sample of 3 rollouts in a "
                              "row (updates 1 to 3, 12 completions). None means 'no score for this sample'")
    assert trainer.step == 2  # the third unscored rollout was not trained on
    rows = [row for row in read_metrics(trainer.run_dir) if "rollout/reward_mean" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isnan(row["rollout/reward_mean"]) and row["rollout/scored_fraction"] == 0.0 for row in rows)
    failure = json.loads((trainer.run_dir / "FAILED").read_text())
    assert failure["step"] == 2 and failure["error"] == f"RewardError: {message}"
    samples = [json.loads(line) for line in (trainer.run_dir / "samples.jsonl").read_text().splitlines()]
    (table,) = [entry["text"] for entry in samples if entry["tag"] == "samples/rollout"]
    assert table.count("|nan|") == 4  # an unscored completion shows no reward, not the 0 the agent got


def test_what_a_reward_logs_reaches_metrics_jsonl_at_its_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, "rewards=[test_logs_vowels]", "budget.num_envs=8")
    run_dir = Trainer(config).train().run_dir
    rows = read_metrics(run_dir)
    updates = [row for row in rows if "rollout/reward_mean" in row]
    assert [row["step"] for row in updates] == [1, 2, 3, 4]
    # The env scores a rollout in several calls, as completions end; the logged fraction is the batch's.
    for row in updates:
        assert row["rollout/reward_metric/vowel_fraction"] == pytest.approx(row["rollout/reward/test_logs_vowels"])
    assert len({row["rollout/reward_metric/vowel_fraction"] for row in updates}) > 1  # not one constant
    evaluations = [row for row in rows if "eval/kl" in row]
    assert [row["step"] for row in evaluations] == [0, 4]
    for row in evaluations:
        assert row["eval/reward_metric/vowel_fraction"] == pytest.approx(row["eval/reward/test_logs_vowels"])
    extra = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    tables = [entry for entry in extra if entry["tag"] == "samples/reward_extra"]
    assert [entry["step"] for entry in tables] == [2, 4]  # with samples/rollout, every samples_every updates
    assert tables[0]["text"].startswith("|prompt|completion|has_vowel|\n|-|-|-|\n|")


def long_prompt_task(tmp_path: Path) -> str:
    """A dataset task of 4 prompts, each far longer than the tiny model's 64-position context."""
    path = tmp_path / "long.jsonl"
    sentence = "the acting was wonderful and the plot kept me guessing until the very end "
    path.write_text("".join(json.dumps({"prompt": f"{index} {sentence * 8}"}) + "\n" for index in range(4)))
    return f"task={{name: dataset, kwargs: {{path: {path}, eval_fraction: 0}}}}"


def test_prompts_longer_than_the_context_are_truncated_alike_in_training_and_evaluation(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlfb.envs.core import PromptTruncationWarning

    config = tiny_config(tiny_model_dir, tmp_path / "runs", long_prompt_task(tmp_path), "budget.updates=1",
                         "sampling.max_prompt_tokens=20")
    with pytest.warns(PromptTruncationWarning) as caught:
        result = Trainer(config).train()
    messages = [str(warning.message) for warning in caught if warning.category is PromptTruncationWarning]
    assert any(message.startswith("a prompt of") and "max_prompt_tokens=20" in message for message in messages)
    assert any(message.startswith("4 of 4 prompts are longer than max_prompt_tokens=20") for message in messages)
    assert all("`sampling.max_prompt_tokens` in a run config" in message for message in messages)  # a real key
    assert result.step == 1 and result.after is not None and result.after.num_prompts == 4


def test_a_prompt_window_the_context_cannot_hold_fails_before_the_run_directory(tiny_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    from rlfb.errors import ConfigError

    config = tiny_config(tiny_model_dir, tmp_path / "runs", "sampling.max_prompt_tokens=60")
    with pytest.raises(ConfigError, match="max_prompt_tokens \\+ max_new_tokens = 66 exceeds the model's context "
                                          "window of 64 tokens; lower one of them \\(`sampling.max_prompt_tokens`"):
        Trainer(config).train()
    assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("ignore:reward 'test_never_scores' returned None:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:every reward returned None:RuntimeWarning")
def test_resuming_a_failed_run_says_so_and_clears_the_mark(tiny_model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    failing = Trainer(tiny_config(tiny_model_dir, tmp_path, "rewards=[test_never_scores]", "budget.updates=10",
                                  "checkpoint.every=1", "eval.num_prompts=0"))
    with pytest.raises(RewardError):
        failing.train()
    run_dir = failing.run_dir
    fixed = tiny_config(tiny_model_dir, tmp_path, "budget.updates=3", "checkpoint.every=1", "eval.num_prompts=0")
    capsys.readouterr()
    result = Trainer(fixed, resume_from=run_dir).train()
    assert f"{run_dir} had failed at update 2 (RewardError: reward(s) 'test_never_scores' returned None" \
        in capsys.readouterr().out
    assert result.step == 3 and not (run_dir / "FAILED").exists()


def test_a_reward_that_raises_fails_before_the_run_directory_exists(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path / "runs", "rewards=[test_raises]")
    with pytest.raises(RewardError, match="reward 'test_raises' raised KeyError: 'score'"):
        Trainer(config).train()
    assert not (tmp_path / "runs").exists()
