"""The trainer on bad input: rewards that score nothing, rewards that log, long prompts, failed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_trainer import one_thread, tiny_config  # noqa: F401 (one_thread is an autouse fixture)

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
