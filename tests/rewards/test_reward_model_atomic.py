"""A reward model appears in its output directory complete or not at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlfb.rewards import feedback, training
from rlfb.rewards.training import METADATA_FILE, RewardModelConfig, train_reward_model


def test_a_failure_while_saving_leaves_the_previous_model_untouched(
        tiny_base_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"prompt": "The plot was", "completion": f" {word}.", "label": label}
            for word, label in [("great", 1), ("dull", 0)] * 8]
    feedback.write_jsonl(rows, tmp_path / "rows.jsonl")
    output_dir = tmp_path / "rm"
    config = RewardModelConfig(kind="pointwise", data=str(tmp_path / "rows.jsonl"), output_dir=str(output_dir),
                               base_model=tiny_base_model, epochs=1, batch_size=8, device="cpu")
    train_reward_model(config)
    previous = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    assert METADATA_FILE in previous

    def crash(*args, **kwargs):
        raise OSError("disk full")  # after the weights were written, before the metadata

    monkeypatch.setattr(training, "evaluate_reward_model", crash)
    with pytest.raises(OSError, match="disk full"):
        train_reward_model(dataclasses.replace(config, seed=1))  # other weights than the saved ones
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rm", "rows.jsonl"]  # no temporary left
