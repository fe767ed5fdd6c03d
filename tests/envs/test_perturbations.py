"""Prompt perturbations and the perturbed task (adversarial prompts)."""

from __future__ import annotations

import numpy as np
import pytest

from rlfb.config import config_from_dict
from rlfb.envs.perturbations import DISTRACTORS, perturb_prompt
from rlfb.envs.tasks import make_task
from rlfb.errors import ConfigError

PROMPT = "The acting of this film was"


def test_each_kind_does_what_it_says_and_the_generator_decides() -> None:
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    assert perturb_prompt(PROMPT, ("typos",), 0.0, rng()) == PROMPT
    assert perturb_prompt(PROMPT, ("case",), 0.0, rng()) == PROMPT
    typos = perturb_prompt(PROMPT, ("typos",), 1.0, rng())
    assert typos != PROMPT  # at rate 1 every letter is swapped, dropped or doubled
    assert typos.count(" ") == PROMPT.count(" ")  # only letters are touched
    assert perturb_prompt(PROMPT, ("case",), 1.0, rng()) == PROMPT.swapcase()
    distracted = perturb_prompt(PROMPT, ("distractor",), 0.5, rng())
    prefix = distracted[: -len(PROMPT) - 1]
    assert distracted.endswith(" " + PROMPT) and prefix in DISTRACTORS
    both = perturb_prompt(PROMPT, ("typos", "distractor"), 0.2, rng())
    assert both == perturb_prompt(PROMPT, ("typos", "distractor"), 0.2, rng())  # same generator, same text
    assert both != perturb_prompt(PROMPT, ("typos", "distractor"), 0.2, np.random.default_rng(4))


def test_the_perturbed_task_perturbs_train_prompts_only_by_default_and_keeps_columns() -> None:
    clean = make_task({"name": "arithmetic", "num_eval": 5, "num_train": 20})
    task = make_task({"name": "perturbed", "task": {"name": "arithmetic", "num_eval": 5, "num_train": 20},
                      "kinds": ["distractor"]})
    assert task.eval_rows() == clean.eval_rows()  # held-out evaluation stays clean
    for noisy, row in zip(task.train_rows(), clean.train_rows(), strict=True):
        assert noisy["answer"] == row["answer"] and noisy["prompt"].endswith(" " + row["prompt"])
    both = make_task({"name": "perturbed", "task": "sentiment", "kinds": ["case"], "rate": 1.0,
                      "splits": ["train", "eval"]})
    assert [row["prompt"] for row in both.eval_rows()] == [p.swapcase() for p in make_task("sentiment").eval_prompts()]
    assert make_task({"name": "perturbed", "seed": 1}).train_prompts() != make_task({"name": "perturbed"}).train_prompts()
    half = make_task({"name": "perturbed", "kinds": ["distractor"], "fraction": 0.5}).train_prompts()
    clean_prompts = make_task("sentiment").train_prompts()
    kept = sum(prompt == original for prompt, original in zip(half, clean_prompts, strict=True))
    assert 0.3 * len(half) < kept < 0.7 * len(half)  # about half keep their clean prompt


def test_bad_options_and_default_rewards() -> None:
    with pytest.raises(ConfigError, match="unknown perturbation 'typo'"):
        make_task({"name": "perturbed", "kinds": ["typo"]})
    with pytest.raises(ConfigError, match=r"rate must be in \[0, 1\]"):
        make_task({"name": "perturbed", "rate": 2.0})
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
        make_task({"name": "perturbed", "fraction": 0.0})
    with pytest.raises(ConfigError, match="splits"):
        make_task({"name": "perturbed", "splits": ["test"]})
    arithmetic = config_from_dict({"task": {"name": "perturbed", "kwargs": {"task": "arithmetic"}}})
    assert [reward.name for reward in arithmetic.rewards] == ["exact_match"]  # the wrapped task's defaults
