"""Distillation in the trainer: a finished run as the teacher, exact resume, the teacher_logprob reward,
and a teacher of another tokenizer refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trainer import reproducible, tiny_config

from rlfb.errors import ConfigError, RewardError
from rlfb.evaluation import load_policy
from rlfb.logging import read_metrics
from rlfb.rewards import build_reward
from rlfb.trainer import Trainer


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-update REINFORCE run on the tiny model: a teacher whose adapter is not the identity."""
    output = tmp_path_factory.mktemp("teacher")
    return Trainer(tiny_config(tiny_model_dir, output, "budget.updates=2", "checkpoint.every=0", "eval.num_prompts=0",
                               "logging.run_name=teacher", agent="reinforce")).train().run_dir


def distillation_config(model_dir: Path, output: Path, teacher: Path | str, *overrides: str):
    return tiny_config(model_dir, output, f"agent.teacher={teacher}", "eval.num_prompts=0", *overrides,
                       agent="distillation")


def test_a_student_distils_a_finished_run_and_resumes_exactly(tiny_model_dir: Path, teacher_run: Path,
                                                               tmp_path: Path) -> None:
    straight = Trainer(distillation_config(tiny_model_dir, tmp_path / "straight", teacher_run,
                                           "budget.updates=3")).train()
    rows = [row for row in read_metrics(straight.run_dir) if "train/divergence" in row]
    assert len(rows) == 3 and all(row["train/divergence"] > 0 for row in rows)
    assert rows[-1]["train/reverse_kl"] < rows[0]["train/reverse_kl"]  # the student moves toward the teacher

    first = Trainer(distillation_config(tiny_model_dir, tmp_path / "resumed", teacher_run, "budget.updates=1",
                                        "checkpoint.every=1")).train()
    resumed = Trainer(distillation_config(tiny_model_dir, tmp_path / "resumed", teacher_run, "budget.updates=3"),
                      resume_from=first.run_dir).train()
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(read_metrics(straight.run_dir))


def test_teacher_logprob_scores_the_completion_under_the_run_adapter(teacher_run: Path) -> None:
    reward = build_reward("teacher_logprob", {"teacher": str(teacher_run), "device": "cpu"})
    policy, _ = load_policy(teacher_run, device="cpu")  # the unmerged adapter, scored by hand below
    tokenizer = policy.tokenizer
    prompts, completions = ["The film was", "I thought"], [" good and", " the plot was"]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    scores = reward(prompts, completions, completion_ids=completion_ids)
    for score, prompt, completion in zip(scores, prompt_ids, completion_ids, strict=True):
        with torch.no_grad():
            logits = policy.model(input_ids=torch.tensor([prompt + completion])).logits[0]
        log_probs = torch.log_softmax(logits.double(), -1)
        by_hand = [float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(completion)]
        assert score == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


@pytest.fixture(scope="module")
def other_tokenizer_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights saved with a tokenizer of the same size trained on other text."""
    from transformers import GPT2LMHeadModel

    from rlfb.models.builtin import train_tokenizer
    from rlfb.models.corpus import pretraining_corpus

    path = tmp_path_factory.mktemp("other-tokenizer")
    GPT2LMHeadModel.from_pretrained(tiny_model_dir).save_pretrained(path)
    train_tokenizer(list(pretraining_corpus(200, seed=7)), vocab_size=300).save_pretrained(path)
    return path


def test_a_teacher_of_another_tokenizer_is_refused_in_one_line(tiny_model_dir: Path, other_tokenizer_model: Path,
                                                                tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has a different tokenizer from the student's \(\d+ of \d+ tokens differ"
                       ) as error:
        Trainer(distillation_config(tiny_model_dir, tmp_path, other_tokenizer_model, "budget.updates=1")).train()
    assert "\n" not in str(error.value)
    reward = build_reward("teacher_logprob", {"teacher": str(other_tokenizer_model), "device": "cpu"})
    student_tokenizer = load_policy(tiny_model_dir, device="cpu")[0].tokenizer
    text = " the plot was good"
    with pytest.raises(RewardError, match="it has another tokenizer"):
        reward(["The film was"], [text], completion_ids=[student_tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_multi_turn_episodes_are_distilled(tiny_model_dir: Path, teacher_run: Path, tmp_path: Path) -> None:
    from test_multi_turn_training import guess_config

    config = guess_config(tiny_model_dir, tmp_path, f"agent.teacher={teacher_run}", "budget.updates=2",
                          "budget.group_size=1", "eval.num_prompts=0", agent="distillation")
    result = Trainer(config).train()
    rows = [row for row in read_metrics(result.run_dir) if "train/divergence" in row]
    assert len(rows) == 2 and all(row["train/divergence"] > 0 and row["rollout/turns"] > 1 for row in rows)


def test_a_run_directory_says_which_teacher_it_will_load(tiny_model_dir: Path, teacher_run: Path,
                                                         tmp_path: Path) -> None:
    from rlfb.run_directory import describe_inputs

    config = distillation_config(tiny_model_dir, tmp_path, teacher_run, "rewards=[{name: teacher_logprob, "
                                 "kwargs: {teacher: rlfb-tiny}}]")
    lines = describe_inputs(config, None)
    assert f"teacher (agent.teacher): {str(teacher_run)!r} (local directory {teacher_run})" in lines
    assert "reward 'teacher_logprob' (rewards.0.kwargs.teacher): 'rlfb-tiny' (built-in)" in lines
