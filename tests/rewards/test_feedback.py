"""Feedback formats, gold rewards and synthetic feedback; the `rlfb feedback` and `rlfb rewards` commands."""

from __future__ import annotations

import json

import pytest

from rlfb.cli import main
from rlfb.errors import DatasetError
from rlfb.rewards import feedback


@pytest.mark.parametrize("task", feedback.TASKS)
@pytest.mark.parametrize("kind", feedback.KINDS)
def test_synthesize_is_seeded_and_rows_have_their_fields(task, kind, tmp_path):
    rows = feedback.synthesize(task, kind, size=20, noise=0.1, seed=3)
    assert rows == feedback.synthesize(task, kind, size=20, noise=0.1, seed=3)
    assert rows != feedback.synthesize(task, kind, size=20, noise=0.1, seed=4)
    path = tmp_path / "rows.jsonl"
    assert feedback.write_jsonl(rows, path) == 20
    assert feedback.read_feedback(path, kind) == rows


def test_clean_pairs_agree_with_gold_and_noise_flips_about_its_share():
    clean = feedback.synthesize("sentiment", "pairwise", size=400, noise=0.0, seed=0)
    noisy = feedback.synthesize("sentiment", "pairwise", size=400, noise=0.25, seed=0)

    def agrees(row):
        return feedback.gold_score("sentiment", row["prompt"], row["chosen"]) > \
            feedback.gold_score("sentiment", row["prompt"], row["rejected"])

    assert all(agrees(row) for row in clean)
    flipped = sum(not agrees(row) for row in noisy) / len(noisy)
    assert 0.18 < flipped < 0.32


def test_pointwise_labels_follow_gold_and_eval_split_uses_held_out_prompts():
    from rlfb.models import corpus

    rows = feedback.synthesize("arithmetic", "pointwise", size=200, noise=0.0, seed=0, split="eval")
    eval_prompts = {prompt for prompt, _ in corpus.arithmetic_problems("eval")}
    assert all(row["prompt"] in eval_prompts for row in rows)
    assert all(row["label"] == feedback.gold_label("arithmetic", row["prompt"], row["completion"]) for row in rows)
    assert 0.3 < sum(row["label"] for row in rows) / len(rows) < 0.7


def test_gold_segments_label_words_and_digits():
    segments = feedback.gold_segments("sentiment", "The plot was", " great, but boring.")
    assert "".join(text for text, _ in segments) == " great, but boring."
    assert [label for text, label in segments if label is not None] == [1, 0]
    assert feedback.gold_segments("arithmetic", "17+25=", "43") == [["4", 1], ["3", 0]]
    assert feedback.gold_rating("arithmetic", "17+25=", "43") == pytest.approx(0.5)


def test_read_feedback_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; make one with `rlfb feedback synthesize`"):
        feedback.read_feedback(tmp_path / "missing.jsonl", "pairwise")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: a pairwise row needs .* missing \['rejected'\]"):
        feedback.read_feedback(bad, "pairwise")
    bad.write_text(json.dumps({"prompt": "p", "completion": "ab", "segments": [["a", 1]]}) + "\n")
    with pytest.raises(DatasetError, match="do not concatenate"):
        feedback.read_feedback(bad, "token")
    with pytest.raises(DatasetError, match="noise must be in"):
        feedback.synthesize("sentiment", "pairwise", size=2, noise=1.5)


def test_feedback_synthesize_command(tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "synthesize", "--task", "sentiment", "--kind", "pairwise", "--size", "7",
                 "--noise", "0", "--out", str(out)]) == 0
    assert "wrote 7 pairwise rows for sentiment" in capsys.readouterr().out
    assert len(feedback.read_feedback(out, "pairwise")) == 7


def test_rewards_command_lists_one_line_each(capsys):
    assert main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sentiment = next(line for line in lines if line.startswith("sentiment "))
    assert "VADER" in sentiment
    assert any(line.startswith("likelihood ") for line in lines)


def test_feedback_from_model_samples_is_seeded_and_labelled_by_gold(tiny_base_model):
    rows = feedback.synthesize("arithmetic", "rating", size=6, noise=0.0, seed=1, model=tiny_base_model,
                               max_new_tokens=4)
    assert rows == feedback.synthesize("arithmetic", "rating", size=6, noise=0.0, seed=1, model=tiny_base_model,
                                       max_new_tokens=4)
    grammar = feedback.synthesize("arithmetic", "rating", size=6, noise=0.0, seed=1)
    assert [row["completion"] for row in rows] != [row["completion"] for row in grammar]
    assert all(row["rating"] == round(feedback.gold_rating("arithmetic", row["prompt"], row["completion"]), 4)
               for row in rows)
