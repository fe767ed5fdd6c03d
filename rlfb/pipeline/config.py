"""The pipeline config: a list of stages, optional rounds, checked before anything is loaded (no torch).

    output_dir: pipelines/sentiment
    seed: 0
    run: {task: sentiment, model: rlfb-tiny, lora: {r: 16}}    # run-config sections every stage shares
    gold: [sentiment]                                           # what evaluation stages measure
    stages:
      - {name: sft, kind: sft, size: 512}
      - {name: rm, kind: reward_model, source: synthesized, size: 1000}
      - {name: rl, kind: rl, agent: {name: ppo}, budget: {updates: 100}}
      - {name: rate, kind: feedback, source: simulated, judgments: 300}
      - {name: rm_people, kind: reward_model, source: feedback}
      - {name: rl_people, kind: rl, budget: {updates: 100}}
      - {name: eval, kind: eval}
    rounds: {repeat: [rate, rm_people, rl_people, eval], max_rounds: 3, gold_at_least: 0.7}

Each stage kind has a dataclass of options below (written flat in the stage's mapping, beside ``name`` and
``kind``); an ``rl`` stage's options are run-config sections (:class:`rlfb.config.RunConfig`) merged over
``run``. ``rounds.repeat`` names a contiguous run of stages that is played again, round after round, until
a stop rule holds. What each stage reads is the newest artefact of the kind it needs among the stages
before it (see :mod:`rlfb.pipeline.plan`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlfb.config import RewardConfig, RunConfig, check_section, config_from_dict, parse_yaml
from rlfb.errors import ConfigError

STAGE_KINDS = ("base", "sft", "reward_model", "rl", "feedback", "eval")
FEEDBACK_SOURCES = ("simulated", "people")
REWARD_MODEL_SOURCES = ("synthesized", "feedback", "file")
SFT_SOURCES = ("grammar", "edits", "file")
# Run-config sections an rl stage may set over the pipeline's shared `run` sections.
RL_STAGE_SECTIONS = ("agent", "budget", "rewards", "reward_scale", "sampling", "env", "checkpoint", "eval")
# Run-config sections that belong to the pipeline, not to a stage or to `run`.
PIPELINE_OWNED = ("output_dir", "seed", "logging")
TOP_LEVEL_KEYS = ("output_dir", "seed", "run", "gold", "stages", "rounds")


@dataclass
class BaseStage:
    """The base model every later stage adapts: ``run.model`` as it is, or the built-in model rebuilt."""

    rebuild: bool = False  # train the built-in model again from its corpus (rlfb models build), in the stage


@dataclass
class SftStage:
    """Supervised fine-tuning of the LoRA adapter with TRL's SFTTrainer (prompt-completion rows)."""

    source: str = "grammar"  # grammar: the built-in task's gold-filtered text; edits: people's; file: a JSONL
    path: str | None = None  # source file: JSONL of {prompt, completion}
    size: int = 512  # rows drawn from the grammar
    min_gold: float = 0.3  # grammar rows kept: gold score above this
    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 64


@dataclass
class RewardModelStage:
    """A reward model (rlfb.rewards.training) from synthesized feedback, the pipeline's feedback, or a file."""

    feedback_kind: str = "pairwise"  # what it learns from: pairwise, pointwise, rating or token
    source: str = "synthesized"
    size: int = 2000  # synthesized rows
    noise: float = 0.1  # synthesized: share of corrupted labels
    from_model: bool = False  # synthesized: sample completions from the base model instead of the grammar
    path: str | None = None  # file: JSONL in the kind's format
    rounds: str = "all"  # feedback: every feedback stage so far (all) or only the newest (latest)
    epochs: float = 2.0
    learning_rate: float = 1e-3
    batch_size: int = 32


@dataclass
class FeedbackStage:
    """Judgments of the current policy's completions, through the feedback HTTP API, into a SQLite store."""

    source: str = "simulated"  # simulated: the VADER rater; people: the web page, until `judgments` are in
    judgments: int = 300
    noise: float = 0.1  # simulated: share of random judgments
    kinds: list[str] = field(default_factory=lambda: ["choice"])  # judgment kinds asked for (rlfb.feedback)
    host: str = "127.0.0.1"  # people: where the page is served
    port: int = 8000
    wait_s: float = 86400.0  # people: longest wait for the judgments


@dataclass
class EvalStage:
    """Held-out gold rewards, KL to the base model and fluency of the current policy."""

    num_prompts: int = 64
    completions_per_prompt: int = 4
    seed: int = 1234


STAGE_OPTIONS: dict[str, type] = {"base": BaseStage, "sft": SftStage, "reward_model": RewardModelStage,
                                  "feedback": FeedbackStage, "eval": EvalStage}


@dataclass
class StageConfig:
    """One stage: a unique name, its kind and its options (an ``rl`` stage: run-config sections)."""

    name: str
    kind: str
    options: Any  # the kind's dataclass, or for rl the stage's run-config sections as plain data


@dataclass
class RoundsConfig:
    """Repeat the stages ``repeat`` (contiguous) until a stop rule holds; round 1 is the first pass."""

    repeat: list[str] = field(default_factory=list)
    min_rounds: int = 1  # the stop rules are asked only from this round on
    max_rounds: int = 2
    gold_at_least: float | None = None  # stop once the last eval of a round reaches this (first gold reward)
    patience: int | None = None  # stop after this many rounds without a better gold than the best so far


@dataclass
class PipelineConfig:
    """A validated pipeline (see the module docstring)."""

    output_dir: str
    seed: int
    run: dict[str, Any]
    gold: list[RewardConfig]
    stages: list[StageConfig]
    rounds: RoundsConfig | None
    raw: dict[str, Any]

    def stage(self, name: str) -> StageConfig:
        return next(stage for stage in self.stages if stage.name == name)

    def shared_run_config(self, output_dir: str | Path, seed: int) -> RunConfig:
        """``run`` alone as a run config: the task, model, LoRA and sampling settings every stage shares."""
        data = {**json.loads(json.dumps(self.run)), "seed": seed, "output_dir": str(output_dir)}
        data.setdefault("rewards", [{"name": "sentiment"}])  # a run config needs a reward; no stage reads it
        return config_from_dict(data)

    def run_config(self, stage: StageConfig, output_dir: str | Path, init_from: str | None,
                   rewards: list[dict[str, Any]] | None, seed: int) -> RunConfig:
        """The run config of an ``rl`` stage: ``run``, the stage's sections over it, the pipeline's own keys."""
        data = _merged(json.loads(json.dumps(self.run)), json.loads(json.dumps(stage.options)))
        if rewards is not None and "rewards" not in stage.options:
            data["rewards"] = rewards
            data.setdefault("reward_scale", {"normalize": True})  # a reward model's scale is arbitrary
        lora = dict(data.get("lora") or {})
        lora["init_from"] = init_from
        data.update(lora=lora, seed=seed, output_dir=str(output_dir),
                    logging={"run_name": "run", "progress_bar": False})
        data.setdefault("eval", {"num_prompts": 0})  # the pipeline's eval stages measure
        data.setdefault("checkpoint", {"every": 25, "keep_last": 1})  # a killed stage resumes from here
        return config_from_dict(data)


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read and check a pipeline YAML file, with ``key=value`` overrides (``stages.2.agent.learning_rate=1e-4``).

    Raises:
        ConfigError: one line naming the key, the value and the fix.
    """
    from rlfb.bench import _set_dotted

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config '{path}' does not exist; an example is configs/pipeline_sentiment.yaml")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"pipeline config '{path}' is not valid YAML: {error}") from error
    if not isinstance(data, Mapping):
        raise ConfigError(f"a pipeline config must be a mapping with 'stages', got {type(data).__name__}")
    data = json.loads(json.dumps(data))
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override '{override}' is not of the form key=value, e.g. stages.2.budget.updates=10")
        _set_dotted(data, key.strip(), parse_yaml(value) if value.strip() else None)
    return pipeline_config_from_dict(data, base_dir=path.parent)


def pipeline_config_from_dict(data: Mapping[str, Any], base_dir: Path = Path()) -> PipelineConfig:
    """Check plain pipeline data; relative file paths in stages are read from ``base_dir``."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in the pipeline config{hint}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    run = _mapping(data.get("run", {}), "run")
    for key in run:
        if key in PIPELINE_OWNED:
            raise ConfigError(f"'run.{key}' is set by the pipeline (each stage writes into its own directory); "
                              f"remove it" + ("; set the pipeline's top-level 'seed' instead" if key == "seed" else ""))
    config_from_dict({**run, "rewards": run.get("rewards", ["sentiment"])})  # keys and types of the shared sections
    seed = data.get("seed", 0)
    _require(type(seed) is int, "seed", seed, "an integer")
    from rlfb.bench import _reward_entry

    gold = [_reward_entry(entry, f"gold.{i}") for i, entry in enumerate(_list(data.get("gold", ["sentiment"]), "gold"))]
    stages = [_stage(entry, f"stages.{i}", base_dir) for i, entry in enumerate(_list(data.get("stages"), "stages"))]
    names = [stage.name for stage in stages]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    _require(not duplicates, "stages", duplicates, "stages with distinct names")
    rounds = _rounds(data.get("rounds"), names)
    output_dir = data.get("output_dir", "pipelines/pipeline")
    _require(isinstance(output_dir, str) and bool(output_dir), "output_dir", output_dir, "a directory path")
    config = PipelineConfig(output_dir=output_dir, seed=seed, run=run, gold=gold, stages=stages, rounds=rounds,
                            raw=dict(data))
    _check_order(config)
    for stage in stages:
        if stage.kind == "rl":  # every derived run config must be valid before anything trains
            try:
                rewards = None if "rewards" in stage.options else [{"name": "sentiment"}]
                run_config = config.run_config(stage, "runs", None, rewards, seed)
                from rlfb.preflight import check_run_inputs

                check_run_inputs(run_config)
            except ConfigError as error:
                raise ConfigError(f"stage '{stage.name}': {error}") from error
    return config


def _stage(entry: Any, where: str, base_dir: Path) -> StageConfig:
    entry = dict(_mapping(entry, where))
    name, kind = entry.pop("name", None), entry.pop("kind", None)
    _require(isinstance(name, str) and bool(name) and name.replace("_", "").replace("-", "").isalnum(),
             f"{where}.name", name, "a name of letters, digits, '_' or '-'")
    if kind not in STAGE_KINDS:
        close = difflib.get_close_matches(str(kind), STAGE_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{where}.kind' is {kind!r}{hint}; it must be one of {', '.join(STAGE_KINDS)}")
    if kind == "rl":
        for key in entry:
            if key not in RL_STAGE_SECTIONS:
                close = difflib.get_close_matches(str(key), RL_STAGE_SECTIONS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown key '{where}.{key}'{hint}; an rl stage sets run-config sections: "
                                  f"{', '.join(RL_STAGE_SECTIONS)} (the rest comes from 'run')")
        return StageConfig(name=name, kind=kind, options=entry)
    options_class = STAGE_OPTIONS[kind]
    options = options_class(**check_section(options_class, entry, where))
    path = getattr(options, "path", None)
    if isinstance(path, str):
        absolute = Path(path).expanduser()
        options.path = str(absolute if absolute.is_absolute() else (base_dir / absolute).absolute())
    _check_options(options, where)
    return StageConfig(name=name, kind=kind, options=options)


def _check_options(options: Any, where: str) -> None:
    """Ranges and choices of a stage's options."""
    if isinstance(options, SftStage):
        _choice(options.source, SFT_SOURCES, f"{where}.source")
        _require(options.source != "file" or options.path is not None, f"{where}.path", options.path,
                 "a JSONL file of {prompt, completion} rows when source is file")
        _require(options.size >= 1, f"{where}.size", options.size, ">= 1")
        _require(options.epochs > 0 and options.learning_rate > 0 and options.batch_size >= 1, f"{where}.epochs",
                 options.epochs, "> 0 (with learning_rate > 0 and batch_size >= 1)")
    elif isinstance(options, RewardModelStage):
        from rlfb.rewards.feedback import KINDS

        _choice(options.feedback_kind, KINDS, f"{where}.feedback_kind")
        _choice(options.source, REWARD_MODEL_SOURCES, f"{where}.source")
        _choice(options.rounds, ("all", "latest"), f"{where}.rounds")
        _require(options.source != "file" or options.path is not None, f"{where}.path", options.path,
                 "a JSONL feedback file when source is file")
        if options.source == "file" and options.path is not None and not Path(options.path).is_file():
            raise ConfigError(f"'{where}.path': {options.path} does not exist; give a JSONL feedback file")
        _require(options.size >= 10, f"{where}.size", options.size, ">= 10 rows")
        _require(0.0 <= options.noise <= 1.0, f"{where}.noise", options.noise, "in [0, 1]")
    elif isinstance(options, FeedbackStage):
        from rlfb.feedback.judgments import RATER_KINDS

        _choice(options.source, FEEDBACK_SOURCES, f"{where}.source")
        _require(options.judgments >= 1, f"{where}.judgments", options.judgments, ">= 1")
        _require(0.0 <= options.noise <= 1.0, f"{where}.noise", options.noise, "in [0, 1]")
        _require(bool(options.kinds) and all(kind in RATER_KINDS for kind in options.kinds), f"{where}.kinds",
                 options.kinds, f"a non-empty list of {', '.join(RATER_KINDS)}")
    elif isinstance(options, EvalStage):
        _require(options.num_prompts >= 1, f"{where}.num_prompts", options.num_prompts, ">= 1")
        _require(options.completions_per_prompt >= 1, f"{where}.completions_per_prompt",
                 options.completions_per_prompt, ">= 1")


def _rounds(value: Any, names: list[str]) -> RoundsConfig | None:
    if value is None:
        return None
    rounds = RoundsConfig(**check_section(RoundsConfig, _mapping(value, "rounds"), "rounds"))
    _require(bool(rounds.repeat), "rounds.repeat", rounds.repeat, "a non-empty list of stage names")
    for name in rounds.repeat:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'rounds.repeat' names stage {name!r}{hint}, which is not among the stages: "
                              f"{', '.join(names)}")
    first = names.index(rounds.repeat[0])
    _require(names[first:first + len(rounds.repeat)] == rounds.repeat, "rounds.repeat", rounds.repeat,
             "stages that follow each other in 'stages', in that order")
    _require(rounds.min_rounds >= 1, "rounds.min_rounds", rounds.min_rounds, ">= 1")
    _require(rounds.max_rounds >= rounds.min_rounds, "rounds.max_rounds", rounds.max_rounds,
             f">= rounds.min_rounds ({rounds.min_rounds})")
    _require(rounds.patience is None or rounds.patience >= 1, "rounds.patience", rounds.patience, ">= 1, or null")
    return rounds


def _check_order(config: PipelineConfig) -> None:
    """Every stage finds what it reads among the stages before it (the first pass of the rounds)."""
    have_feedback, have_reward_model = False, False
    for stage in config.stages:
        options = stage.options
        if stage.kind == "reward_model" and options.source == "feedback" and not have_feedback:
            raise ConfigError(f"stage '{stage.name}' trains on the pipeline's feedback but no feedback stage comes "
                              "before it; add one (kind: feedback) or set source: synthesized")
        if stage.kind == "sft" and options.source == "edits" and not have_feedback:
            raise ConfigError(f"stage '{stage.name}' trains on people's edits but no feedback stage comes before "
                              "it; add one (kind: feedback, kinds: [edit])")
        if stage.kind == "rl" and "rewards" not in options and not have_reward_model:
            raise ConfigError(f"stage '{stage.name}' has no rewards and no reward_model stage comes before it; "
                              "add one, or give the stage rewards: [...]")
        have_feedback |= stage.kind == "feedback"
        have_reward_model |= stage.kind == "reward_model"
    if config.rounds is not None and (config.rounds.gold_at_least is not None or config.rounds.patience is not None):
        if not any(config.stage(name).kind == "eval" for name in config.rounds.repeat):
            raise ConfigError("rounds.gold_at_least and rounds.patience read the gold of each round's eval stage; "
                              "add an eval stage to rounds.repeat")


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mappings merged key by key (lists and scalars replace)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def plain_options(stage: StageConfig) -> Any:
    """A stage's options as plain data (what its key hashes)."""
    return dataclasses.asdict(stage.options) if dataclasses.is_dataclass(stage.options) else stage.options


def _choice(value: Any, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'{key}' is {value!r}{hint}; it must be one of {', '.join(choices)}")


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {accepted}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{where}' must be a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'{where}' must be a non-empty list, got {type(value).__name__} {value!r}")
    return value
