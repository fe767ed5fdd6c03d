"""rlfb pipeline: keys reach exactly the runs downstream of a change, finished runs are skipped, a killed
or failed run is done again to the same result, and the status says which is which."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rlfb.errors import ConfigError
from rlfb.pipeline import pipeline_config_from_dict, pipeline_status, plan, run_pipeline, status_table
from rlfb.pipeline.runner import STAGE_FILE, STAGES_DIR

RUN = {"task": "sentiment", "model": "rlfb-tiny", "lora": {"r": 4, "alpha": 8}, "sampling": {"max_new_tokens": 8}}
# Small enough for the default suite: a synthesized reward model, two RL stages, simulated feedback, eval.
STAGES: list[dict[str, Any]] = [
    {"name": "rm", "kind": "reward_model", "source": "synthesized", "feedback_kind": "pairwise", "size": 40, "epochs": 1},
    {"name": "rl", "kind": "rl", "agent": {"name": "grpo"}, "budget": {"updates": 2, "num_envs": 8},
     "checkpoint": {"every": 1, "keep_last": 1}},
    {"name": "rate", "kind": "feedback", "judgments": 12},
    {"name": "rm_people", "kind": "reward_model", "source": "feedback", "epochs": 1},
    {"name": "rl_people", "kind": "rl", "agent": {"name": "ppo"}, "budget": {"updates": 2, "num_envs": 8},
     "checkpoint": {"every": 1, "keep_last": 1}},
    {"name": "eval", "kind": "eval", "num_prompts": 6, "completions_per_prompt": 1},
]
ROUNDS = {"repeat": ["rate", "rm_people", "rl_people", "eval"], "max_rounds": 2}


def config_data(**changes: Any) -> dict[str, Any]:
    data = {"seed": 0, "run": RUN, "gold": ["sentiment"], "stages": json.loads(json.dumps(STAGES)), "rounds": ROUNDS}
    data.update(changes)
    return data


def final_eval(out: Path) -> dict[str, float]:
    return json.loads((out / STAGES_DIR / "eval@2" / STAGE_FILE).read_text())["metrics"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("pipeline") / "out"
    result = run_pipeline(pipeline_config_from_dict(config_data()), out, say=lambda line: None)
    return out, result


# ------------------------------------------------------------------------------------------- plan
def test_rounds_expand_and_each_run_reads_the_newest_artefact_before_it() -> None:
    runs = {run.name: run for run in plan(pipeline_config_from_dict(config_data()), rounds=2)}
    assert list(runs) == ["rm", "rl", "rate@1", "rm_people@1", "rl_people@1", "eval@1",
                          "rate@2", "rm_people@2", "rl_people@2", "eval@2"]
    assert runs["rl"].inputs == {"reward_model": ["rm"]}  # no adapter yet: a fresh LoRA
    assert runs["rate@1"].inputs == {"adapter": ["rl"]}
    assert runs["rl_people@2"].inputs == {"adapter": ["rl_people@1"], "reward_model": ["rm_people@2"]}
    assert runs["rm_people@2"].inputs == {"feedback": ["rate@1", "rate@2"]}  # rounds: all (the default)
    assert runs["rate@2"].seed != runs["rate@1"].seed  # a round's feedback is on new samples


def test_a_changed_learning_rate_changes_the_keys_of_that_stage_and_what_follows_only() -> None:
    before = {run.name: run.key for run in plan(pipeline_config_from_dict(config_data()), rounds=2)}
    changed = config_data()
    changed["stages"][4]["agent"]["learning_rate"] = 3e-4  # rl_people
    after = {run.name: run.key for run in plan(pipeline_config_from_dict(changed), rounds=2)}
    rerun = [name for name in before if before[name] != after[name]]
    assert rerun == ["rl_people@1", "eval@1", "rate@2", "rm_people@2", "rl_people@2", "eval@2"]


def test_latest_reads_only_the_newest_feedback() -> None:
    data = config_data()
    data["stages"][3]["rounds"] = "latest"
    runs = {run.name: run for run in plan(pipeline_config_from_dict(data), rounds=2)}
    assert runs["rm_people@2"].inputs == {"feedback": ["rate@2"]}


# -------------------------------------------------------------------------------------------- runs
def test_a_finished_pipeline_is_skipped_whole_and_says_done(finished: tuple[Path, Any]) -> None:
    out, first = finished
    assert first.skipped == [] and "max_rounds" in first.stop_reason
    again = run_pipeline(pipeline_config_from_dict(config_data()), out, say=lambda line: None)
    assert again.skipped == [run.name for run in again.runs]
    assert again.final_metrics == first.final_metrics == final_eval(out)
    assert {status.state for status in pipeline_status(pipeline_config_from_dict(config_data()), out)} == {"done"}
    summary = (out / "summary.md").read_text()
    adapter = "/".join([STAGES_DIR, "rl_people@2", "work", "run", "final", "adapter"])  # relative to the pipeline
    assert "| 2 | eval@2 |" in summary and adapter in summary


def test_rerunning_a_finished_pipeline_imports_no_torch(finished: tuple[Path, Any]) -> None:
    """What keeps a rerun within seconds: nothing is loaded when every stage is done."""
    import subprocess
    import sys

    out, _ = finished
    script = ("import json, sys; from rlfb.pipeline import pipeline_config_from_dict, run_pipeline; "
              "result = run_pipeline(pipeline_config_from_dict(json.loads(sys.argv[1])), sys.argv[2], "
              "say=lambda line: None); print(len(result.skipped), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(config_data()), str(out)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(len(plan(pipeline_config_from_dict(config_data()), rounds=2))), "False"]


def test_the_summary_plot_is_drawn_again_only_when_its_rows_change(finished: tuple[Path, Any],
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    copy = tmp_path / "out"
    shutil.copytree(finished[0], copy)
    plot = copy / "summary.png"
    plot.write_bytes(b"not redrawn")
    run_pipeline(pipeline_config_from_dict(config_data()), copy, say=lambda line: None)
    assert plot.read_bytes() == b"not redrawn"
    (copy / "summary.csv").write_text("round,eval\n")  # what an older round table looked like
    run_pipeline(pipeline_config_from_dict(config_data()), copy, say=lambda line: None)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_feedback_stage_stores_the_judgments_the_simulated_rater_gave(finished: tuple[Path, Any]) -> None:
    from rlfb.feedback.store import FeedbackStore

    out, _ = finished
    store = FeedbackStore(out / STAGES_DIR / "rate@1" / "work" / "store.sqlite")
    try:
        judgments = list(store.judgments())
    finally:
        store.close()
    assert len(judgments) == 12 and {judgment.kind for judgment in judgments} == {"choice"}
    rows = (out / STAGES_DIR / "rm_people@2" / "work" / "feedback_pairwise.jsonl").read_text().splitlines()
    assert len(rows) == 24  # both rounds' choices


def test_the_second_rl_stage_continues_the_first_adapter(finished: tuple[Path, Any]) -> None:
    out, _ = finished
    config = json.loads(json.dumps(
        __import__("yaml").safe_load((out / STAGES_DIR / "rl_people@1" / "work" / "run" / "config.yaml").read_text())))
    assert config["lora"]["init_from"] == str(out / STAGES_DIR / "rl" / "work" / "run" / "final" / "adapter")
    assert config["rewards"][0]["kwargs"]["path"] == str(out / STAGES_DIR / "rm_people@1" / "work" / "reward_model")


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(finished: tuple[Path, Any], tmp_path: Path) -> None:
    out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    # What kill -9 after rl_people@2's first checkpoint leaves: no stage.json, no final/, a checkpoint.
    stage = copy / STAGES_DIR / "rl_people@2"
    (stage / STAGE_FILE).unlink()
    shutil.rmtree(stage / "work" / "run" / "final")
    checkpoints = stage / "work" / "run" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["step_00000001"]
    (copy / STAGES_DIR / "eval@2" / STAGE_FILE).unlink()  # and what followed it never ran
    lines: list[str] = []
    again = run_pipeline(pipeline_config_from_dict(config_data()), copy, say=lines.append)
    assert [run for run in again.runs if run.name not in again.skipped][0].name == "rl_people@2"
    assert any("resuming run/checkpoints/step_00000001" in line for line in lines)
    assert final_eval(copy) == first.final_metrics


def test_a_failed_stage_is_reported_with_its_error_and_runs_again(finished: tuple[Path, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from rlfb.pipeline import stages

    out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / STAGES_DIR / "eval@2" / STAGE_FILE).unlink()

    def broken(context: Any) -> Any:
        raise RuntimeError("the disk\nis full")

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "eval", broken)
    with pytest.raises(RuntimeError, match="disk"):
        run_pipeline(pipeline_config_from_dict(config_data()), copy, say=lambda line: None)
    statuses = pipeline_status(pipeline_config_from_dict(config_data()), copy)
    assert [(status.name, status.state) for status in statuses if status.state != "done"] == [("eval@2", "failed")]
    assert status_table(statuses).splitlines()[-1].split()[:3] == ["eval@2", "eval", "failed"]
    assert status_table(statuses).endswith("RuntimeError: the disk is full")
    monkeypatch.undo()
    run_pipeline(pipeline_config_from_dict(config_data()), copy, say=lambda line: None)
    assert final_eval(copy) == first.final_metrics


def test_a_changed_stage_shows_stale_until_it_runs_again(finished: tuple[Path, Any], tmp_path: Path) -> None:
    out, _ = finished
    changed = config_data()
    changed["stages"][5]["num_prompts"] = 5
    states = {status.name: status.state for status in pipeline_status(pipeline_config_from_dict(changed), out)}
    assert states["eval@1"] == states["eval@2"] == "stale"
    assert {states[name] for name in states if not name.startswith("eval")} == {"done"}


def test_sft_stage_trains_an_adapter_that_fits_its_rows_better_than_the_base(tmp_path: Path) -> None:
    import torch

    from rlfb.models.policy import LoraSettings, Policy

    data = {"seed": 0, "run": RUN, "stages": [{"name": "sft", "kind": "sft", "size": 32, "epochs": 4, "learning_rate": 5e-3}]}
    run_pipeline(pipeline_config_from_dict(data), tmp_path / "out", say=lambda line: None)
    stage = tmp_path / "out" / STAGES_DIR / "sft"
    sft = json.loads((stage / STAGE_FILE).read_text())
    rows = [json.loads(line) for line in (stage / "work" / "sft.jsonl").read_text().splitlines()]
    assert sft["metrics"]["rows"] == len(rows) == 32
    policy = Policy.from_pretrained("rlfb-tiny", lora=LoraSettings(r=4, alpha=8), value_head=False, device="cpu")
    policy.load_adapter(tmp_path / "out" / sft["outputs"]["adapter"])
    batch = policy.tokenizer([row["prompt"] + row["completion"] for row in rows], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        tuned = policy.model(**batch, labels=labels).loss
        with policy.reference():
            base = policy.model(**batch, labels=labels).loss
    assert tuned < base - 0.05, (float(tuned), float(base))


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("change", "message"), [
    ({"stages": [{"name": "x", "kind": "rlhf"}]}, "'stages.0.kind' is 'rlhf' (did you mean 'rl'?)"),
    ({"stages": [{"name": "rl", "kind": "rl", "budget": {"updates": 1}}]},
     "stage 'rl' has no rewards and no reward_model stage comes before it"),
    ({"stages": [{"name": "rm", "kind": "reward_model", "source": "feedback"}]},
     "stage 'rm' trains on the pipeline's feedback but no feedback stage comes before it"),
    ({"rounds": {"repeat": ["rate", "eval"]}}, "'rounds.repeat' is ['rate', 'eval']; it must be stages that follow"),
    ({"rounds": {"repeat": ["rte"]}}, "names stage 'rte' (did you mean 'rate'?)"),
    ({"run": {**RUN, "seed": 3}}, "'run.seed' is set by the pipeline"),
    ({"stages": [{"name": "rl", "kind": "rl", "rewards": ["sentiment"], "agent": {"name": "ppo", "lr": 1}}]},
     "stage 'rl': "),
    ({"stages": [{"name": "rl", "kind": "rl", "rewards": ["sentiment"], "budgte": {}}]},
     "unknown key 'stages.0.budgte' (did you mean 'budget'?)"),
    ({"stages": [{"name": "e", "kind": "eval", "num_prompts": 0}]}, "'stages.0.num_prompts' is 0; it must be >= 1"),
    ({"rounds": {**ROUNDS, "min_rounds": 3}}, "'rounds.max_rounds' is 2; it must be >= rounds.min_rounds (3)"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(change: dict[str, Any], message: str) -> None:
    data = config_data(**change)
    if "stages" in change and "rounds" not in change:
        data.pop("rounds")
    with pytest.raises(ConfigError) as error:
        pipeline_config_from_dict(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_directory_that_is_not_a_pipeline_is_refused(tmp_path: Path) -> None:
    from rlfb.pipeline.runner import check_pipeline_directory

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no pipeline"):
        check_pipeline_directory(tmp_path)


@pytest.mark.parametrize(("rule", "golds", "stops"), [
    ({"gold_at_least": 0.7}, [0.75], True),
    ({"gold_at_least": 0.7, "min_rounds": 2}, [0.75], False),  # the rule is asked only from min_rounds on
    ({"gold_at_least": 0.7, "min_rounds": 2}, [0.75, 0.72], True),
    ({"gold_at_least": 0.7, "min_rounds": 2}, [0.75, 0.65], False),
    ({"patience": 1, "min_rounds": 3, "max_rounds": 5}, [0.5, 0.4], False),
    ({"patience": 1, "min_rounds": 3, "max_rounds": 5}, [0.5, 0.4, 0.3], True),
    ({"max_rounds": 3}, [0.1, 0.2], False),
    ({"max_rounds": 3}, [0.1, 0.2, 0.3], True),
])
def test_the_rounds_stop_when_a_rule_holds_and_not_before_min_rounds(rule: dict[str, Any], golds: list[float],
                                                                        stops: bool) -> None:
    from rlfb.pipeline.runner import _stop_reason

    config = pipeline_config_from_dict(config_data(rounds={**ROUNDS, "max_rounds": 4, **rule}))
    rounds = [{"round": number, "gold": gold} for number, gold in enumerate(golds, start=1)]
    assert bool(_stop_reason(config, rounds)) is stops
