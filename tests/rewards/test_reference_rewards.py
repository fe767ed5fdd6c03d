"""BLEU, chrF and ROUGE rewards against a task's reference column: hand-known values, the libraries called
directly, the column reaching them from a dataset, and the one-line error of a missing extra."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import pytest

import rlfb  # noqa: F401  (registers the env ids)
from rlfb.config import load_config
from rlfb.envs.tasks import make_task
from rlfb.errors import ConfigError
from rlfb.rewards import build_reward
from rlfb.rewards.reference import BleuReward, ChrfReward, RougeReward

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "reference_chrf_grpo.yaml"
COMPLETIONS = [" the acting was great and the cast", "a warm film, and funny", "great great great"]
REFERENCES = ["the acting was great and the cast was wonderful", "a warm and funny film", "the plot was dull"]


@pytest.mark.parametrize(("name", "perfect"), [("bleu", 100.0), ("chrf", 100.0), ("rouge", 1.0)])
def test_identical_text_scores_the_top_of_the_scale_and_disjoint_text_zero(name: str, perfect: float) -> None:
    reward = build_reward(name)
    scores = reward(
        ["p", "p"], [" the cast was wonderful", "xyz qwv"], reference=["the cast was wonderful", "abc"]
    )
    assert scores == [pytest.approx(perfect), 0.0]


def test_scores_equal_the_libraries_called_directly() -> None:
    prompts = ["p"] * len(COMPLETIONS)
    stripped = [completion.strip() for completion in COMPLETIONS]
    bleu = BleuReward(lowercase=True)(prompts, COMPLETIONS, reference=REFERENCES)
    chrf = ChrfReward(word_order=2)(prompts, COMPLETIONS, reference=REFERENCES)
    rouge = RougeReward(rouge_type="rouge2", measure="recall", use_stemmer=True)(
        prompts, COMPLETIONS, reference=REFERENCES
    )
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    for index, (completion, reference) in enumerate(zip(stripped, REFERENCES, strict=True)):
        assert bleu[index] == sacrebleu.sentence_bleu(completion, [reference], lowercase=True).score
        assert chrf[index] == sacrebleu.sentence_chrf(completion, [reference], word_order=2).score
        assert rouge[index] == scorer.score(reference, completion)["rouge2"].recall
    assert 0 < bleu[0] < 100 and 0 < chrf[1] < 100 and 0 < rouge[0] < 1  # partial overlaps, not the extremes


def test_several_references_per_row_and_rows_without_one() -> None:
    references = [["the plot was dull", "a warm and funny film"], None, [], ""]
    completions = ["a warm and funny film"] * 4
    assert ChrfReward()(["p"] * 4, completions, reference=references) == [100.0, None, None, None]
    assert BleuReward()(["p"], completions[:1], reference=references[:1]) == [
        sacrebleu.sentence_bleu(completions[0], references[0]).score
    ]
    assert RougeReward()(["p"], ["the plot was fine"], reference=references[:1]) == [
        rouge_scorer.RougeScorer(["rougeL"])
        .score_multi(references[0], "the plot was fine")["rougeL"]
        .fmeasure
    ]


def test_the_reference_column_is_named_by_the_option_and_a_missing_one_names_the_columns() -> None:
    assert RougeReward(reference_column="summary")(["p"], ["a b"], summary=["a b"]) == [1.0]
    with pytest.raises(
        ValueError, match=r"bleu needs the task column 'reference' .* columns given: \['answer'\]"
    ):
        BleuReward()(["p"], ["a b"], answer=["a b"], completion_ids=[[1, 2]])
    with pytest.raises(ValueError, match=r"rouge_type must be one of rouge1, rouge2, rougeL, rougeLsum"):
        RougeReward(rouge_type="rougeX")


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("bleu", "sacrebleu", "sacrebleu"),
        ("chrf", "sacrebleu", "sacrebleu"),
        ("rouge", "rouge_score.rouge_scorer", "rouge-score"),
    ],
)
def test_a_missing_library_is_one_line_naming_the_extra(
    name: str, module: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the extra imports
    with pytest.raises(ConfigError) as error:
        build_reward(name)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"the {name} reward needs the {package} package")
    assert message.endswith("install it with pip install 'rlfb[reference]'")


def test_the_example_dataset_reaches_the_rewards_through_the_env_with_its_reference_column() -> None:
    config = load_config(CONFIG)
    task = {"name": config.task.name, **config.task.kwargs}
    assert make_task(task).columns == ("reference",)
    env = gym.make(
        "rlfb/Completion-v0",
        disable_env_checker=True,
        task=task,
        model="rlfb-tiny",
        rewards=[{"name": "chrf", "weight": 0.01}, {"name": "rouge", "weight": 0.0}],
        action_type="text",
        max_chars=64,
        max_new_tokens=16,
    ).unwrapped
    row = make_task(task).eval_rows()[0]
    env.reset(options={"prompt": row})
    _, reward, *_ = env.step(row["reference"])  # the reference itself: chrF 100, weighted 0.01
    assert reward == pytest.approx(1.0)
    env.reset(options={"prompt": {**row, "reference": "qqq zzz"}})
    assert env.step(row["reference"])[1] == 0.0
