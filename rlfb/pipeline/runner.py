"""Run a pipeline: each stage run once per key, its artefact kept, finished runs skipped on a rerun.

The pipeline directory::

    PIPELINE/
      pipeline.yaml            the config as given (with overrides)
      state.json               the rounds played and their gold, the stop decision
      summary.md, summary.csv  per round: gold rewards, KL, fluency; per stage run: key, time, artefacts
      summary.png              gold, KL and fluency per round
      stages/NAME/             one per stage run (NAME: the stage, or stage@round in the rounds)
        key.json               the run's key, written when it starts
        running.json           while it runs: pid and start time
        failed.json            after a failure: the error, one line
        stage.json             written last, atomically: key, inputs, outputs (paths relative to PIPELINE),
                               metrics, seconds. A run counts as done only with this file and its key.
        work/                  what the stage writes (an adapter, a reward model, a run directory, a store)

A rerun compares each run's key (:mod:`rlfb.pipeline.plan`) with its ``stage.json``: equal, the run is
skipped; different (its config or an input changed), its directory is replaced. A run killed half way
(no ``stage.json``) is run again from the start, except an ``rl`` run, which resumes its newest checkpoint.
One process at a time: ``PIPELINE/.lock`` is held (``flock``) while a pipeline runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlfb.errors import ConfigError, RlfbError
from rlfb.files import write_text_atomically
from rlfb.pipeline.config import PipelineConfig
from rlfb.pipeline.plan import PRODUCES, StageRun, plan

STAGES_DIR = "stages"
STAGE_FILE = "stage.json"
KEY_FILE = "key.json"
RUNNING_FILE = "running.json"
FAILED_FILE = "failed.json"
STATE_FILE = "state.json"
WORK_DIR = "work"
LOCK_FILE = ".lock"


class PipelineBusyError(RlfbError):
    """Another process is running this pipeline directory."""


@dataclass
class StageStatus:
    """What ``--status`` shows of one stage run."""

    name: str
    kind: str
    state: str  # done, stale, running, failed, pending
    key: str
    seconds: float | None = None
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: the runs in order, which were skipped, the rounds' gold, the stop."""

    directory: Path
    runs: list[StageRun]
    skipped: list[str]
    rounds: list[dict[str, Any]]
    stop_reason: str
    final_metrics: dict[str, float]


def run_pipeline(config: PipelineConfig, directory: str | Path | None = None,
                 say: Callable[[str], None] = print) -> PipelineResult:
    """Run every stage whose artefact is missing or stale, in order, playing the rounds to their stop rule."""
    from rlfb.cpu_threads import torch_threads

    out = Path(directory or config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every stage runs with the config's threads, whoever calls: the results depend on the count.
    with _locked(out), torch_threads(config.shared_run_config(out, config.seed).threads):
        write_text_atomically(out / "pipeline.yaml", yaml.safe_dump(config.raw, sort_keys=False))
        skipped: list[str] = []
        finished: set[str] = set()

        def go(run: StageRun) -> None:
            if run.name not in finished:
                finished.add(run.name)
                if _execute(config, out, run, runs, say):
                    skipped.append(run.name)

        rounds: list[dict[str, Any]] = []
        number, stop_reason = 1, "no rounds"
        while True:
            runs = plan(config, number)
            for run in _runs_up_to_round(config, runs):
                go(run)
            if config.rounds is None:
                break
            rounds.append(_round_record(config, out, runs, number))
            stop_reason = _stop_reason(config, rounds)
            if stop_reason:
                say(f"pipeline: rounds stop: {stop_reason}")
                break
            number += 1
        for run in runs:  # the stages after the rounds follow the last round played
            go(run)
        _write_state(out, rounds, stop_reason)
        from rlfb.pipeline.summary import write_summary

        final = _final_metrics(out, runs)
        write_summary(config, out, runs, rounds)
        return PipelineResult(directory=out, runs=runs, skipped=skipped, rounds=rounds, stop_reason=stop_reason,
                              final_metrics=final)


def _runs_up_to_round(config: PipelineConfig, runs: list[StageRun]) -> list[StageRun]:
    """The runs before the rounds and those of the rounds planned (not the stages after the rounds)."""
    if config.rounds is None:
        return runs
    return [run for run in runs if run.round is not None or _before_rounds(config, run)]


def _before_rounds(config: PipelineConfig, run: StageRun) -> bool:
    assert config.rounds is not None
    names = [stage.name for stage in config.stages]
    return names.index(run.stage.name) < names.index(config.rounds.repeat[0])


def _execute(config: PipelineConfig, out: Path, run: StageRun, runs: list[StageRun],
             say: Callable[[str], None]) -> bool:
    """Run ``run`` unless its artefact is there with its key; True when it was skipped."""
    from rlfb.pipeline.stages import STAGE_FUNCTIONS, StageContext

    if _is_done(out, run):
        return True
    directory = out / STAGES_DIR / run.name
    if directory.exists() and _read_json(directory / KEY_FILE).get("key") != run.key:
        say(f"pipeline: {run.name}: its config or an input changed; running it again")
        _remove(directory)
    work = directory / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    if run.kind != "rl":  # only rl resumes what a killed run left; the others start again
        shutil.rmtree(work)
        work.mkdir()
    write_text_atomically(directory / KEY_FILE, json.dumps({"key": run.key}) + "\n")
    write_text_atomically(directory / RUNNING_FILE, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
    (directory / FAILED_FILE).unlink(missing_ok=True)
    inputs = {role: [_output_path(out, name, PRODUCES[_kind_of(runs, name)]) for name in names]
              for role, names in run.inputs.items()}
    say(f"pipeline: {run.name} ({run.kind}) ...")
    started = time.perf_counter()
    try:
        outputs, metrics = STAGE_FUNCTIONS[run.kind](StageContext(config, run, work, inputs, say))
    except BaseException as error:
        message = " ".join(str(error).split()) or type(error).__name__
        write_text_atomically(directory / FAILED_FILE,
                              json.dumps({"key": run.key, "error": f"{type(error).__name__}: {message}"}) + "\n")
        (directory / RUNNING_FILE).unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    record = {"name": run.name, "kind": run.kind, "round": run.round, "key": run.key, "inputs": run.inputs,
              "outputs": {role: _relative(path, out) for role, path in outputs.items()},
              "metrics": metrics, "seconds": round(seconds, 3)}
    write_text_atomically(directory / STAGE_FILE, json.dumps(record, indent=1) + "\n")
    (directory / RUNNING_FILE).unlink(missing_ok=True)
    say(f"pipeline: {run.name} done in {seconds:.1f} s"
        + ("".join(f", {key} {value:.3f}" for key, value in metrics.items() if "/" in key or key == "kl")
           if run.kind == "eval" else ""))
    return False


def _is_done(out: Path, run: StageRun) -> bool:
    record = _read_json(out / STAGES_DIR / run.name / STAGE_FILE)
    return record.get("key") == run.key and all((out / path).exists() for path in record.get("outputs", {}).values()
                                                if not _is_name(path))


def _is_name(path: str) -> bool:
    """A base stage's output may be a model name (rlfb-tiny, a hub id), not a path in the pipeline."""
    return not path.startswith(STAGES_DIR + "/")


def _output_path(out: Path, name: str, role: str) -> Path:
    value = _read_json(out / STAGES_DIR / name / STAGE_FILE)["outputs"][role]
    return Path(value) if _is_name(value) else out / value


def _relative(path: Path, out: Path) -> str:
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:  # a base stage's model name or a path outside the pipeline
        return str(path)


def _kind_of(runs: list[StageRun], name: str) -> str:
    return next(run.kind for run in runs if run.name == name)


def _round_record(config: PipelineConfig, out: Path, runs: list[StageRun], number: int) -> dict[str, Any]:
    """The metrics of the round's eval stage (the last one in the round), with the gold used by the stop rule."""
    evals = [run for run in runs if run.round == number and run.kind == "eval"]
    metrics = _read_json(out / STAGES_DIR / evals[-1].name / STAGE_FILE).get("metrics", {}) if evals else {}
    from rlfb.bench import gold_key

    gold = metrics.get(gold_key(config.gold[0]))
    return {"round": number, "eval": evals[-1].name if evals else None, "gold": gold, "metrics": metrics}


def _stop_reason(config: PipelineConfig, rounds: list[dict[str, Any]]) -> str:
    """Why the rounds stop after the last one played, or '' to play another."""
    assert config.rounds is not None
    rule, last = config.rounds, rounds[-1]
    if last["round"] < rule.min_rounds:
        return ""
    if rule.gold_at_least is not None and last["gold"] is not None and last["gold"] >= rule.gold_at_least:
        return f"gold {last['gold']:.3f} >= rounds.gold_at_least {rule.gold_at_least:g} in round {last['round']}"
    if rule.patience is not None and len(rounds) > rule.patience:
        golds = [record["gold"] for record in rounds if record["gold"] is not None]
        best_before = max(golds[: -rule.patience], default=float("-inf"))
        if golds and max(golds[-rule.patience:]) <= best_before:
            return f"no better gold for {rule.patience} rounds (rounds.patience)"
    if last["round"] >= rule.max_rounds:
        return f"rounds.max_rounds ({rule.max_rounds}) played"
    return ""


def _final_metrics(out: Path, runs: list[StageRun]) -> dict[str, float]:
    evals = [run for run in runs if run.kind == "eval" and _is_done(out, run)]
    return _read_json(out / STAGES_DIR / evals[-1].name / STAGE_FILE).get("metrics", {}) if evals else {}


def _write_state(out: Path, rounds: list[dict[str, Any]], stop_reason: str) -> None:
    write_text_atomically(out / STATE_FILE, json.dumps({"rounds": rounds, "stop_reason": stop_reason}, indent=1) + "\n")


# -------------------------------------------------------------------------------------------- status
def pipeline_status(config: PipelineConfig, directory: str | Path | None = None) -> list[StageStatus]:
    """Each stage run of the pipeline (as many rounds as were played, at least one) and its state."""
    out = Path(directory or config.output_dir)
    played = len(_read_json(out / STATE_FILE).get("rounds", [])) if config.rounds is not None else 1
    running_now = _lock_held(out)
    statuses = []
    for run in plan(config, max(1, played)):
        directory_of_run = out / STAGES_DIR / run.name
        record = _read_json(directory_of_run / STAGE_FILE)
        failed = _read_json(directory_of_run / FAILED_FILE)
        if _is_done(out, run):
            state = "done"
        elif (directory_of_run / RUNNING_FILE).is_file() and _read_json(directory_of_run / KEY_FILE).get("key") == run.key:
            state = "running" if running_now else "interrupted"
        elif failed.get("key") == run.key:
            state = "failed"
        elif record:
            state = "stale"
        else:
            state = "pending"
        statuses.append(StageStatus(name=run.name, kind=run.kind, state=state, key=run.key[:10],
                                    seconds=record.get("seconds") if state == "done" else None,
                                    error=failed.get("error") if state == "failed" else None,
                                    outputs=record.get("outputs", {}) if state == "done" else {},
                                    metrics=record.get("metrics", {}) if state == "done" else {}))
    return statuses


def status_table(statuses: list[StageStatus]) -> str:
    """``--status`` as aligned text: stage, kind, state, key, seconds, and the error of a failed stage."""
    width = max(len(status.name) for status in statuses)
    lines = []
    for status in statuses:
        seconds = f"{status.seconds:8.1f} s" if status.seconds is not None else " " * 10
        line = f"{status.name:<{width}}  {status.kind:<12}  {status.state:<11}  {status.key}  {seconds}"
        if status.error:
            line += f"  {status.error}"
        lines.append(line.rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    import fcntl

    with (out / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusyError(f"another process is running the pipeline in {out}; wait for it, or look at "
                                    "it with --status") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_held(out: Path) -> bool:
    if not (out / LOCK_FILE).is_file():
        return False
    import fcntl

    with (out / LOCK_FILE).open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _remove(directory: Path) -> None:
    """Delete a stale stage run's directory: renamed aside first, so a crash never leaves half of it."""
    aside = directory.with_name(f".stale-{directory.name}-{os.getpid()}")
    directory.rename(aside)
    shutil.rmtree(aside)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_pipeline_directory(out: Path) -> None:
    """Refuse an output directory that is a file or holds something other than a pipeline."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir '{out}' is a file; set output_dir to a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "pipeline.yaml").is_file():
        raise ConfigError(f"output_dir '{out}' is not empty and holds no pipeline (no pipeline.yaml); choose "
                          "another output_dir, so nothing there is overwritten")
