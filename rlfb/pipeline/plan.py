"""From a pipeline config to the stage runs it makes: names, rounds, what each reads, and its key.

A stage run is one execution of a stage: ``rl`` once, or ``rl@2`` in round 2 of ``rounds.repeat``. What
a run reads is found by position: the newest artefact of each kind it needs among the runs before it.

=============  =====================================  =============================================
kind           reads                                  writes
=============  =====================================  =============================================
base           nothing                                ``model`` (``run.model``, or a rebuilt one)
sft            model; feedback (``source: edits``)    ``adapter``
reward_model   model; feedback (``source: feedback``) ``reward_model``
rl             model; adapter (if any); reward_model  ``adapter``
               (unless the stage lists ``rewards``)
feedback       model; adapter (if any)                ``feedback`` (a SQLite store)
eval           model; adapter (if any)                ``metrics``
=============  =====================================  =============================================

A run's **key** is a hash of its kind, its options, the shared ``run`` sections, its seed, the gold
rewards (eval only) and the keys of the runs it reads. So a change anywhere reaches exactly the runs
downstream of it: changing an rl stage's learning rate changes its key and the keys of every run that
reads its adapter, directly or through other runs, and of nothing before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from rlfb.pipeline.config import PipelineConfig, StageConfig, plain_options

# Per-round seed offset: round r of a repeated stage uses seed + (r - 1) * ROUND_SEED_STRIDE.
ROUND_SEED_STRIDE = 1000
# What each kind writes (the role later runs read it as).
PRODUCES = {"base": "model", "sft": "adapter", "reward_model": "reward_model", "rl": "adapter",
            "feedback": "feedback", "eval": "metrics"}


@dataclass(frozen=True)
class StageRun:
    """One execution of a stage: its name (``rl``, ``rl@2``), round (None outside the rounds), seed, inputs."""

    name: str
    stage: StageConfig
    round: int | None
    seed: int
    inputs: dict[str, list[str]]  # role -> the names of the runs read, oldest first
    key: str

    @property
    def kind(self) -> str:
        return self.stage.kind


def plan(config: PipelineConfig, rounds: int = 1) -> list[StageRun]:
    """The stage runs with ``rounds`` passes of ``rounds.repeat`` (the stages after it follow the last pass)."""
    names = [stage.name for stage in config.stages]
    if config.rounds is None:
        sequence = [(stage, None) for stage in config.stages]
    else:
        first = names.index(config.rounds.repeat[0])
        last = first + len(config.rounds.repeat)
        block = config.stages[first:last]
        sequence = [(stage, None) for stage in config.stages[:first]]
        sequence += [(stage, number) for number in range(1, rounds + 1) for stage in block]
        sequence += [(stage, None) for stage in config.stages[last:]]
    runs: list[StageRun] = []
    newest: dict[str, str] = {}  # role -> the newest run writing it
    feedback_runs: list[str] = []
    keys: dict[str, str] = {}
    for stage, number in sequence:
        name = stage.name if number is None else f"{stage.name}@{number}"
        inputs = _inputs(stage, newest, feedback_runs)
        seed = config.seed + ((number or 1) - 1) * ROUND_SEED_STRIDE
        key = _key(config, stage, seed, {role: [keys[run] for run in read] for role, read in inputs.items()})
        runs.append(StageRun(name=name, stage=stage, round=number, seed=seed, inputs=inputs, key=key))
        keys[name] = key
        newest[PRODUCES[stage.kind]] = name
        if stage.kind == "feedback":
            feedback_runs.append(name)
    return runs


def _inputs(stage: StageConfig, newest: dict[str, str], feedback_runs: list[str]) -> dict[str, list[str]]:
    """What a run of ``stage`` reads, given the newest runs of each role before it."""
    inputs: dict[str, list[str]] = {}
    if "model" in newest:
        inputs["model"] = [newest["model"]]
    options = stage.options
    if stage.kind in ("rl", "feedback", "eval") and "adapter" in newest:
        inputs["adapter"] = [newest["adapter"]]
    if stage.kind == "rl" and "rewards" not in options:
        inputs["reward_model"] = [newest["reward_model"]]
    wants_feedback = ((stage.kind == "reward_model" and options.source == "feedback")
                      or (stage.kind == "sft" and options.source == "edits"))
    if wants_feedback:
        latest_only = stage.kind == "reward_model" and options.rounds == "latest"
        inputs["feedback"] = feedback_runs[-1:] if latest_only else list(feedback_runs)
    return inputs


def _key(config: PipelineConfig, stage: StageConfig, seed: int, input_keys: dict[str, list[str]]) -> str:
    content: dict[str, Any] = {"kind": stage.kind, "options": plain_options(stage), "run": config.run,
                               "seed": seed, "inputs": input_keys}
    if stage.kind == "eval":
        content["gold"] = [dataclasses.asdict(reward) for reward in config.gold]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
