"""Training reward models from each kind of feedback, and scoring with the `reward_model` reward."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml

from rlfb.cli import main
from rlfb.errors import ConfigError, ModelNotFoundError
from rlfb.rewards import RewardSet, feedback
from rlfb.rewards.training import (
    METADATA_FILE,
    RewardModelConfig,
    load_reward_model_config,
    train_reward_model,
)

GOOD = ("great", "wonderful", "brilliant", "lovely")
BAD = ("awful", "boring", "terrible", "dull")


def keyword_rows(kind: str, size: int, seed: int = 0) -> list[dict]:
    """Feedback a tiny random model can learn in seconds: good words are preferred, bad ones are not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        prompt = rng.choice(("The plot was", "The film was", "I thought the cast was"))
        good, bad = f" {rng.choice(GOOD)}.", f" {rng.choice(BAD)}."
        if kind == "pairwise":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
            continue
        positive = rng.random() < 0.5
        completion = good if positive else bad
        if kind == "pointwise":
            rows.append({"prompt": prompt, "completion": completion, "label": int(positive)})
        elif kind == "rating":
            rows.append({"prompt": prompt, "completion": completion, "rating": 1.0 if positive else -1.0})
        else:
            rows.append({"prompt": prompt, "completion": completion,
                         "segments": [[completion[:-1], int(positive)], [".", None]]})
    return rows


def train(kind: str, tiny_base_model: str, tmp_path, **options) -> tuple[RewardModelConfig, object]:
    data = tmp_path / f"{kind}.jsonl"
    feedback.write_jsonl(keyword_rows(kind, 96), data)
    eval_data = tmp_path / f"{kind}_eval.jsonl"
    feedback.write_jsonl(keyword_rows(kind, 40, seed=1), eval_data)
    settings = dict(kind=kind, data=str(data), eval_data=str(eval_data), output_dir=str(tmp_path / f"rm_{kind}"),
                    base_model=tiny_base_model, epochs=2, learning_rate=3e-3, batch_size=16, device="cpu")
    settings.update(options)
    config = RewardModelConfig(**settings)
    return config, train_reward_model(config)


def test_pairwise_training_with_trl_learns_and_saves_a_loadable_model(tiny_base_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    config, report = train("pairwise", tiny_base_model, tmp_path)
    assert report.metrics["accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(config.output_dir)
    assert model.config.num_labels == 1
    metadata = json.loads((tmp_path / "rm_pairwise" / METADATA_FILE).read_text())
    assert metadata["metrics"] == report.metrics and metadata["config"]["kind"] == "pairwise"
    rewards = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "device": "cpu"}}])
    result = rewards(["The plot was"] * 2, [" wonderful.", " terrible."])
    assert result.total[0] > result.total[1]


@pytest.mark.parametrize("kind, metric, threshold", [
    ("pointwise", "accuracy", 0.9),
    ("rating", "pearson", 0.8),
    ("token", "token_accuracy", 0.9),
])
def test_pointwise_kinds_learn(kind, metric, threshold, tiny_base_model, tmp_path):
    config, report = train(kind, tiny_base_model, tmp_path)
    assert report.metrics[metric] >= threshold, report.metrics
    rewards = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "device": "cpu"}}])
    scores = rewards(["The film was"] * 2, [" lovely.", " dull."]).total
    assert scores[0] > scores[1]


def test_token_model_gives_dense_rewards_aligned_to_completion_ids(tiny_base_model, tmp_path):
    from transformers import AutoTokenizer

    config, _ = train("token", tiny_base_model, tmp_path, epochs=1)
    tokenizer = AutoTokenizer.from_pretrained(config.output_dir)
    completions = [" great and awful.", " dull."]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    rewards = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "dense": True,
                                                             "device": "cpu"}}])
    result = rewards(["The film was"] * 2, completions, completion_ids=ids)
    assert [len(values) for values in result.per_token] == [len(i) for i in ids]
    short = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "dense": True,
                                                           "max_length": 2, "device": "cpu"}}])
    truncated = short(["The film was"] * 2, completions, completion_ids=ids).per_token
    assert [len(values) for values in truncated] == [len(i) for i in ids]
    assert truncated[0][0] == 0.0  # cut off by max_length: no score
    with pytest.raises(ConfigError, match="dense=true needs one trained with kind: token"):
        pairwise_dir = tmp_path / "seq"
        train("pointwise", tiny_base_model, tmp_path, epochs=0.1, output_dir=str(pairwise_dir))
        RewardSet([{"name": "reward_model", "kwargs": {"path": str(pairwise_dir), "dense": True}}])


def test_gold_metrics_for_synthesized_feedback(tiny_base_model, tmp_path):
    data = tmp_path / "prefs.jsonl"
    feedback.write_jsonl(feedback.synthesize("arithmetic", "rating", size=60, noise=0.0, seed=0), data)
    config = RewardModelConfig(kind="rating", data=str(data), output_dir=str(tmp_path / "rm"),
                               base_model=tiny_base_model, gold="arithmetic", epochs=0.5, device="cpu",
                               eval_fraction=0.5)
    report = train_reward_model(config)
    assert report.train_rows == 30 and report.eval_rows == 30
    assert set(report.metrics) == {"pearson", "gold_pearson", "gold_spearman"}
    assert report.metrics["pearson"] == pytest.approx(report.metrics["gold_pearson"], abs=1e-3)  # no noise: gold


def test_reward_model_train_command_and_config_errors(tiny_base_model, tmp_path, capsys):
    data = tmp_path / "points.jsonl"
    feedback.write_jsonl(keyword_rows("pointwise", 40), data)
    config_path = tmp_path / "rm.yaml"
    config_path.write_text(yaml.safe_dump({"kind": "pointwise", "data": str(data), "base_model": tiny_base_model,
                                           "output_dir": str(tmp_path / "out"), "device": "cpu"}))
    assert main(["reward-model", "train", str(config_path), "--set", "epochs=0.5"]) == 0
    out = capsys.readouterr().out
    assert "trained a pointwise reward model on 36 rows" in out and "held-out (4 rows): accuracy" in out
    config_path.write_text(yaml.safe_dump({"kind": "pairs", "data": "x", "output_dir": "y"}))
    with pytest.raises(ConfigError, match="kind 'pairs' is not one of"):
        load_reward_model_config(config_path)
    config_path.write_text(yaml.safe_dump({"kind": "pairwise", "data": "x", "output_dir": "y", "epoch": 2}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\]"):
        load_reward_model_config(config_path)


def test_reward_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="train one with `rlfb reward-model train CONFIG`"):
        RewardSet([{"name": "reward_model", "kwargs": {"path": str(tmp_path / "nothing")}}])


def test_reward_model_scores_in_batches_like_one_by_one(tiny_base_model, tmp_path):
    config, _ = train("rating", tiny_base_model, tmp_path, epochs=0.5)
    completions = [" great.", " a much longer and rather dull completion.", " ok"]
    batched = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "batch_size": 3,
                                                              "device": "cpu"}}])
    single = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "batch_size": 1,
                                                             "device": "cpu"}}])
    prompts = ["The plot was"] * 3
    np.testing.assert_allclose(batched(prompts, completions).total, single(prompts, completions).total, atol=1e-5)


def test_pairwise_losses_on_a_hand_computed_batch():
    import torch

    from rlfb.rewards.training import pairwise_loss

    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.5, 1.0, 0.7])
    # max(0, 1 + 0.5 - 2) = 0, max(0, 1 + 1 - 0.5) = 1.5, max(0, 1 + 0.7 - 1) = 0.7: mean 2.2 / 3
    assert float(pairwise_loss(chosen, rejected, "margin_ranking", margin=1.0)) == pytest.approx(2.2 / 3)
    # margin 0.2: 0, 0.7, 0 -> 0.7 / 3
    assert float(pairwise_loss(chosen, rejected, "margin_ranking", margin=0.2)) == pytest.approx(0.7 / 3)
    bradley_terry = np.mean([np.log1p(np.exp(-(c - r))) for c, r in ((2.0, 0.5), (0.5, 1.0), (1.0, 0.7))])
    assert float(pairwise_loss(chosen, rejected, "bradley_terry")) == pytest.approx(bradley_terry)


def test_margin_ranking_training_learns_and_stops_pushing_past_the_margin(tiny_base_model, tmp_path):
    gaps = {}
    for loss in ("margin_ranking", "bradley_terry"):
        config, report = train("pairwise", tiny_base_model, tmp_path / loss, pairwise_loss=loss, margin=0.5)
        assert report.metrics["accuracy"] >= 0.9, loss
        rewards = RewardSet([{"name": "reward_model", "kwargs": {"path": config.output_dir, "device": "cpu"}}])
        good, bad = rewards(["The plot was"] * 2, [" wonderful.", " terrible."]).total
        gaps[loss] = good - bad
    # The hinge is 0 once the chosen reward leads by the margin, so the gap settles near it (0.52 measured);
    # Bradley-Terry keeps widening it (1.99 with the same data and steps).
    assert 0.25 < gaps["margin_ranking"] < 1.0 < gaps["bradley_terry"]


def test_pairwise_loss_options_are_checked():
    common = dict(data="x", output_dir="y")
    with pytest.raises(ConfigError, match=r"pairwise_loss 'hinge' is not one of \['bradley_terry', 'margin_ranking'\]"):
        RewardModelConfig(kind="pairwise", pairwise_loss="hinge", **common)
    with pytest.raises(ConfigError, match="pairwise_loss 'margin_ranking' needs kind 'pairwise', got 'rating'"):
        RewardModelConfig(kind="rating", pairwise_loss="margin_ranking", **common)
    with pytest.raises(ConfigError, match="margin must be > 0, got -1"):
        RewardModelConfig(kind="pairwise", pairwise_loss="margin_ranking", margin=-1, **common)
