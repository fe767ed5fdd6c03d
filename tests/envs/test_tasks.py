"""Tasks: built-in splits, the dataset task on local files, and clear errors for bad sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlfb.envs.tasks import Task, list_tasks, make_task
from rlfb.errors import ConfigError, DatasetError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


QUESTIONS = [{"question": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(20)]


def test_builtin_tasks_are_listed() -> None:
    assert {"sentiment", "arithmetic", "dataset"} <= set(list_tasks())


def test_sentiment_splits_are_disjoint_and_reproducible() -> None:
    task = make_task("sentiment")
    assert set(task.train_prompts()).isdisjoint(task.eval_prompts())
    assert len(set(task.eval_prompts())) == len(task.eval_prompts()) > 10
    assert make_task({"name": "sentiment", "seed": 0}).eval_prompts() == task.eval_prompts()
    assert make_task("sentiment", num_eval=5).eval_prompts() == task.eval_prompts()[:5]
    assert task.default_rewards == ("sentiment",)


def test_arithmetic_rows_carry_the_right_answer() -> None:
    task = make_task("arithmetic", num_train=50, num_eval=10)
    assert len(task.train_rows()) == 50 and len(task.eval_rows()) == 10
    assert task.columns == ("answer",)
    for row in task.train_rows() + task.eval_rows():
        left, right = row["prompt"].rstrip("=").split("+")
        assert int(row["answer"]) == int(left) + int(right)
    assert set(task.train_prompts()).isdisjoint(make_task("arithmetic").eval_prompts())


def test_dataset_task_reads_jsonl_with_a_prompt_column_and_holds_rows_out(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    task = make_task({"name": "dataset", "path": str(path), "prompt_column": "question", "eval_fraction": 0.25})
    assert len(task.eval_rows()) == 5 and len(task.train_rows()) == 15
    assert task.columns == ("answer",)
    assert {row["prompt"] for row in task.train_rows()}.isdisjoint(task.eval_prompts())
    assert {row["prompt"]: row["answer"] for row in task.eval_rows() + task.train_rows()} == {
        record["question"]: record["answer"] for record in QUESTIONS}
    again = make_task({"name": "dataset", "path": str(path), "prompt_column": "question", "eval_fraction": 0.25})
    assert again.eval_rows() == task.eval_rows()


def test_dataset_task_reads_csv_and_parquet_and_a_separate_eval_file(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(QUESTIONS[:12]).to_csv(str(tmp_path / "train.csv"), index=False)
    datasets.Dataset.from_list(QUESTIONS[12:]).to_parquet(str(tmp_path / "eval.parquet"))
    task = make_task("dataset", path=str(tmp_path / "train.csv"), eval_path=str(tmp_path / "eval.parquet"),
                     prompt_column="question", columns=["answer"])
    assert task.train_prompts() == [record["question"] for record in QUESTIONS[:12]]
    assert task.eval_rows() == [{"prompt": r["question"], "answer": r["answer"]} for r in QUESTIONS[12:]]


def test_dataset_task_missing_prompt_column_names_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    with pytest.raises(DatasetError, match=r"no column 'prompt'; its columns are \['question', 'answer'\]"):
        make_task("dataset", path=str(path))


def test_dataset_task_rejects_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match="is empty"):
        make_task("dataset", path=str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="is empty"):
        make_task("dataset", path=str(tmp_path / "empty.jsonl"))


def test_dataset_task_rejects_non_text_prompts_and_missing_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": 3}, {"prompt": 4}])
    with pytest.raises(DatasetError, match="holds int 3, expected text"):
        make_task("dataset", path=str(path))
    with pytest.raises(DatasetError, match="does not exist"):
        make_task("dataset", path=str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(DatasetError, match="unknown file type '.docx'"):
        make_task("dataset", path=str(tmp_path / "notes.docx"))


def test_dataset_task_with_one_row_needs_an_explicit_eval_choice(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Hi"}])
    with pytest.raises(DatasetError, match="at least 2"):
        make_task("dataset", path=str(path))
    assert make_task("dataset", path=str(path), eval_fraction=0).eval_prompts() == ["Hi"]


def test_unknown_task_and_option_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown task 'sentimnt'; registered: .*sentiment"):
        make_task("sentimnt")
    with pytest.raises(ConfigError, match=r"task 'sentiment' got unknown option\(s\) \['num_prompts'\]"):
        make_task({"name": "sentiment", "num_prompts": 3})


def test_a_task_with_an_empty_split_is_rejected() -> None:
    with pytest.raises(DatasetError, match="the eval split has no prompts"):
        Task("mine", train=({"prompt": "a"},), eval=())
    with pytest.raises(DatasetError, match="train row 0 needs a 'prompt' string"):
        Task("mine", train=({"text": "a"},), eval=({"prompt": "b"},))


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a path reaches `datasets.load_dataset` (a missing local file would try the hub)."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset was called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.mark.parametrize("path", ["prompts.jsonl", "data/prompts.csv", "./prompts", "a/b/c", "~/nowhere.parquet"])
def test_a_missing_path_that_looks_local_is_reported_at_once_not_tried_on_the_hub(
        path: str, no_hub: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=f"dataset file '{path}' \\(task option path\\) does not exist"):
        make_task("dataset", path=path)


def test_an_existing_directory_part_makes_a_path_local(tmp_path: Path, no_hub: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match="'data/prompts' .* does not exist"):
        make_task("dataset", path="data/prompts")
    with pytest.raises(DatasetError, match="load_dataset was called"):  # an org/name hub id is still tried
        make_task("dataset", path="stanfordnlp/imdb")


def test_resolve_dataset_path_keeps_hub_ids_unless_the_directory_has_them(tmp_path: Path) -> None:
    from rlfb.envs.tasks import resolve_dataset_path

    assert resolve_dataset_path("imdb", tmp_path) == "imdb"
    (tmp_path / "imdb").mkdir()
    assert resolve_dataset_path("imdb", tmp_path) == str(tmp_path / "imdb")
    assert resolve_dataset_path("p.jsonl", tmp_path) == str(tmp_path / "p.jsonl")


def test_a_malformed_jsonl_line_is_named_with_file_and_line_number(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl', line 4: not valid JSON .*\{\"prompt\": \"c\","):
        make_task("dataset", path=str(path))
    path.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(DatasetError, match=r"line 2: a JSON Lines row must be an object"):
        make_task("dataset", path=str(path))


def test_datasets_arrow_copies_go_to_rlfbs_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLFB_HOME", str(tmp_path / "home"))
    make_task("dataset", path=str(write_jsonl(tmp_path / "q.jsonl", QUESTIONS)), prompt_column="question")
    assert list((tmp_path / "home" / "datasets").rglob("*.arrow"))
