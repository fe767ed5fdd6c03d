"""The metrics logger: prefixed keys, JSONL and TensorBoard writers, run directory names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlfb.errors import ConfigError, RlfbError
from rlfb.logging import (
    METRICS_FILE,
    SAMPLES_FILE,
    JsonlWriter,
    Logger,
    TensorBoardWriter,
    flatten,
    make_run_dir,
    read_metrics,
    samples_markdown,
)


def test_dump_writes_one_row_per_step_and_clears(tmp_path: Path) -> None:
    logger = Logger([JsonlWriter(tmp_path)])
    logger.record("rollout/reward_mean", torch.tensor(0.25))
    logger.record_many({"policy_loss": 1.5, "time/rollout_s": 2}, prefix="train/")
    assert logger.dump(step=1) == {"rollout/reward_mean": 0.25, "train/policy_loss": 1.5, "time/rollout_s": 2.0}
    assert logger.dump(step=2) == {}  # nothing recorded since: no row
    logger.record("train/kl", 0.1)
    logger.dump(step=3)
    logger.close()
    assert read_metrics(tmp_path) == [
        {"step": 1, "rollout/reward_mean": 0.25, "train/policy_loss": 1.5, "time/rollout_s": 2.0},
        {"step": 3, "train/kl": 0.1}]


def test_non_numbers_are_rejected_with_the_key(tmp_path: Path) -> None:
    logger = Logger([])
    with pytest.raises(TypeError, match="metric 'rollout/completion' must be a number"):
        logger.record("rollout/completion", "hello")


def test_resume_truncates_rows_after_the_checkpoint(tmp_path: Path) -> None:
    writer = JsonlWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write_scalars({"x": float(step)}, step)
    writer.write_text("samples", "text", 3)
    writer.close()
    JsonlWriter(tmp_path, truncate_after=2).close()
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "samples.jsonl").read_text() == ""


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    logger = Logger([JsonlWriter(tmp_path)], is_main_process=False)
    logger.record("train/kl", 1.0)
    logger.dump(1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_scalars_and_text_are_readable(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger([TensorBoardWriter(tmp_path)])
    logger.log_hyperparameters({"agent": {"name": "ppo"}, "seed": 1})
    for step in (1, 2):
        logger.record("rollout/reward_mean", step / 10)
        logger.dump(step)
    logger.log_samples("samples/rollout", ["The film was"], ["great."], [0.6], step=2)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [e.value for e in events.Scalars("rollout/reward_mean")] == pytest.approx([0.1, 0.2])
    assert {"hyperparameters/text_summary", "samples/rollout/text_summary"} <= set(events.Tags()["tensors"])


def test_run_dir_names_are_unique(tmp_path: Path) -> None:
    first = make_run_dir(tmp_path, "sentiment", "ppo", 0, run_name="demo")
    second = make_run_dir(tmp_path, "sentiment", "ppo", 0, run_name="demo")
    assert (first.name, second.name) == ("demo", "demo-2")
    default = make_run_dir(tmp_path, "dataset:my/file", "ppo", 7)
    assert default.name.startswith("dataset-my-file__ppo__7__")


def test_helpers_flatten_and_escape() -> None:
    assert flatten({"a": {"b": 1}, "r": [{"name": "x"}], "c": []}) == {"a.b": 1, "r.0.name": "x", "c": []}
    assert "a \\| b" in samples_markdown(["p"], ["a | b"], [1.0])


def test_resume_drops_a_partial_last_line(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    JsonlWriter(tmp_path, truncate_after=2).close()  # the partial row is what a kill mid-write leaves
    assert (tmp_path / METRICS_FILE).read_text() == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n'
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]


def test_a_damaged_line_before_the_last_stops_the_resume_before_anything_changes(tmp_path: Path) -> None:
    metrics = '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.0}\n'
    samples = '{"step": 1, "tag": "t", "text": "x"}\n{"ste\n{"step": 3, "tag": "t", "text": "z"}\n'
    (tmp_path / METRICS_FILE).write_text(metrics)
    (tmp_path / SAMPLES_FILE).write_text(samples)
    with pytest.raises(RlfbError, match=r"line 2 of '.*samples.jsonl' is not a JSON row with a 'step' "
                                        r"\('\{\"ste'\); nothing was changed: remove that line"):
        JsonlWriter(tmp_path, truncate_after=2)
    assert (tmp_path / METRICS_FILE).read_text() == metrics  # read before either file was rewritten
    assert (tmp_path / SAMPLES_FILE).read_text() == samples


@pytest.mark.parametrize("run_name", ["../escape", "/tmp/absolute", "a/b", "..", ".", "", "c:\\x"])
def test_a_run_name_outside_output_dir_is_refused_before_anything_is_created(tmp_path: Path, run_name: str) -> None:
    from rlfb.config import config_from_dict

    with pytest.raises(ConfigError, match=r"'logging.run_name' is .*; it must be one directory name inside "
                                          r"output_dir"):
        config_from_dict({"logging": {"run_name": run_name}})
    with pytest.raises(ConfigError, match="'logging.run_name'"):
        make_run_dir(tmp_path / "runs", "sentiment", "ppo", 0, run_name)
    assert not (tmp_path / "runs").exists()
