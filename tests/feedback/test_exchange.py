"""Export to the reward-model JSONL formats and import of them: a round trip `rlfb reward-model train` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlfb.feedback.exchange import export_rows, import_file
from rlfb.feedback.store import FeedbackStore, Item
from rlfb.rewards.feedback import KINDS, read_feedback, synthesize, write_jsonl


@pytest.mark.parametrize("kind", KINDS)
def test_import_then_export_gives_the_file_back(tmp_path: Path, kind: str) -> None:
    source = tmp_path / f"{kind}.jsonl"
    write_jsonl(synthesize("sentiment", kind, size=12, seed=3), source)
    store = FeedbackStore(tmp_path / "store.sqlite")
    assert import_file(store, source, kind, rater="synthetic") == 12
    exported = tmp_path / f"{kind}-out.jsonl"
    write_jsonl(export_rows(store, kind), exported)
    assert read_feedback(exported, kind) == read_feedback(source, kind)


def _judged_store(tmp_path: Path) -> FeedbackStore:
    store = FeedbackStore(tmp_path / "store.sqlite")
    store.add_items([Item("pair", "P", [" good.", " bad."], "step_2", 2, "pair"),
                     Item("single", "S", [" awful food."], "step_9", 9, "single"),
                     Item("thumb", "T", [" fine."], "base", 0, "single")])
    store.add_judgment("pair", "ada", "choice", {"chosen": 1})
    store.add_judgment("single", "ada", "edit", {"text": " lovely food."})
    store.add_judgment("single", "bob", "rating", {"rating": 2.0, "low": 1.0, "high": 5.0})
    store.add_judgment("thumb", "ada", "binary", {"label": 1})
    return store


def test_each_judgment_kind_becomes_the_rows_it_means(tmp_path: Path) -> None:
    store = _judged_store(tmp_path)
    assert export_rows(store, "pairwise") == [{"prompt": "P", "chosen": " bad.", "rejected": " good."},
                                              {"prompt": "S", "chosen": " lovely food.", "rejected": " awful food."}]
    assert export_rows(store, "pointwise") == [{"prompt": "T", "completion": " fine.", "label": 1}]
    assert export_rows(store, "rating") == [{"prompt": "S", "completion": " awful food.", "rating": 2.0}]
    assert export_rows(store, "token") == [{"prompt": "S", "completion": " awful food.",
                                            "segments": [[" awful", 0], [" food", 1], [".", 1]]}]
    assert export_rows(store, "sft") == [{"prompt": "S", "completion": " lovely food."}]


def test_stale_judgments_are_dropped(tmp_path: Path) -> None:
    store = _judged_store(tmp_path)
    assert [row["prompt"] for row in export_rows(store, "pairwise", current_step=10, max_staleness=5)] == ["S"]
    assert len(export_rows(store, "pairwise", current_step=10, max_staleness=8)) == 2


def test_the_cli_exports_what_reward_model_train_trains_on(tmp_path: Path) -> None:
    from rlfb.cli import main
    from rlfb.rewards.training import load_reward_model_config, train_reward_model

    source = tmp_path / "pairs.jsonl"
    write_jsonl(synthesize("sentiment", "pointwise", size=16, seed=1), source)
    store = str(tmp_path / "store.sqlite")
    assert main(["feedback", "import", str(source), "--kind", "pointwise", "--store", store]) == 0
    out = tmp_path / "export.jsonl"
    assert main(["feedback", "export", "--kind", "pointwise", "--out", str(out), "--store", store]) == 0
    config = tmp_path / "rm.yaml"
    config.write_text(json.dumps({"kind": "pointwise", "data": str(out), "output_dir": str(tmp_path / "rm"),
                                  "epochs": 1, "batch_size": 8, "device": "cpu", "max_length": 32}))
    report = train_reward_model(load_reward_model_config(config))
    assert report.train_rows + report.eval_rows == 16
    assert (tmp_path / "rm" / "config.json").is_file()
