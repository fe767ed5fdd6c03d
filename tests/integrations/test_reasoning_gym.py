"""reasoning-gym's datasets as a task, scored by its own score_answer (the optional extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rlfb.envs.tasks import check_task, make_task
from rlfb.errors import ConfigError
from rlfb.integrations.reasoning_gym import ReasoningGymReward

SUMS = {"name": "reasoning_gym", "dataset": "basic_arithmetic", "num_train": 40, "num_eval": 8, "seed": 3,
        "config": {"min_terms": 2, "max_terms": 2, "max_digits": 2, "operators": ["+"],
                   "allow_parentheses": False, "allow_negation": False}}


def test_without_the_library_the_task_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'rlfb\[reasoning-gym\]'"):
        make_task(SUMS)


def test_task_options_are_checked_before_anything_is_generated() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        check_task({**SUMS, "num_problems": 3})
    with pytest.raises(ConfigError, match="must contain '{question}'"):
        make_task({**SUMS, "prompt_template": "Q:"})


rg = pytest.importorskip("reasoning_gym")


def test_rows_carry_the_question_the_answer_and_the_entry_and_eval_is_held_out() -> None:
    task = make_task({**SUMS, "prompt_template": "{question} Answer:"})
    assert task.columns == ("answer", "rg_entry") and task.default_rewards == ("reasoning_gym",)
    assert len(task.eval) == 8 and 0 < len(task.train) <= 40
    for row in task.eval_rows():
        entry = json.loads(row["rg_entry"])
        assert row["prompt"] == f"{entry['question']} Answer:" and row["answer"] == entry["answer"]
        left, right = entry["metadata"]["expression"].split(" + ")
        assert int(row["answer"]) == int(left) + int(right)
    eval_questions = {json.loads(row["rg_entry"])["question"] for row in task.eval_rows()}
    assert not eval_questions & {json.loads(row["rg_entry"])["question"] for row in task.train_rows()}
    assert [row["answer"] for row in make_task(SUMS).eval_rows()] == [row["answer"] for row in task.eval_rows()]
    assert [row["answer"] for row in make_task({**SUMS, "seed": 4}).eval_rows()] != [row["answer"] for row in task.eval_rows()]


def test_the_reward_is_reasoning_gyms_own_score_of_the_extracted_answer() -> None:
    rows = make_task(SUMS).eval_rows()[:3]
    entries = [row["rg_entry"] for row in rows]
    answers = [row["answer"] for row in rows]
    prompts = [row["prompt"] for row in rows]
    line = ReasoningGymReward()
    assert line(prompts, [f" {a} \nignored" for a in answers], rg_entry=entries) == [1.0, 1.0, 1.0]
    # reasoning-gym's default scorer gives partial credit len(oracle) / len(answer) when the oracle is inside.
    dataset = rg.create_dataset("basic_arithmetic", size=1, seed=0)
    wrong = [f"{a}00" for a in answers]
    expected = [dataset.score_answer(w, json.loads(e)) for w, e in zip(wrong, entries, strict=True)]
    assert line(prompts, wrong, rg_entry=entries) == expected and all(0 < value < 1 for value in expected)
    tag = ReasoningGymReward(answer_format="tag")
    assert tag(prompts, [f"think <answer>{a}</answer>" for a in answers], rg_entry=entries) == [1.0, 1.0, 1.0]
    assert tag(prompts, answers, rg_entry=entries) == [0.0, 0.0, 0.0]  # no tags: no answer
    with pytest.raises(ConfigError, match="rg_entry"):
        line(prompts, answers, answer=answers)


def test_a_run_on_a_reasoning_gym_task_trains_and_evaluates(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlfb.config import config_from_dict
    from rlfb.logging import read_metrics
    from rlfb.trainer import Trainer

    config = config_from_dict({
        "task": {"name": "reasoning_gym", "kwargs": {k: v for k, v in SUMS.items() if k != "name"}}, "model": str(tiny_model_dir), "agent": {"name": "grpo"}, "lora": {"r": 4, "alpha": 8},
        "sampling": {"max_new_tokens": 4}, "budget": {"updates": 2, "num_envs": 4, "group_size": 2},
        "eval": {"num_prompts": 4}, "logging": {"progress_bar": False, "tensorboard": False},
        "device": "cpu", "output_dir": str(tmp_path), "seed": 0})
    result = Trainer(config).train()
    rows = read_metrics(result.run_dir)
    assert [row["step"] for row in rows if "rollout/reward_mean" in row] == [1, 2]
    assert result.after is not None and "reasoning_gym" in result.after.rewards
