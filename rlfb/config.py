"""Typed run configs: one YAML file per run, ``--set key=value`` overrides, errors that name the key.

A run config has one section per concern (task, model, lora, rewards, reward_scale, agent, env, sampling,
budget, eval, logging, checkpoint) plus ``seed``, ``device``, ``threads`` and ``output_dir``. Every field
has a type and a help text; loading checks both, so a typo or a wrong type fails before any model is
loaded. This module imports neither torch nor transformers, so those errors come in a fraction of a second:

    unknown key 'budget.updatse'; did you mean 'budget.updates'? valid keys in 'budget': ...

A relative dataset path (``task: {name: dataset, kwargs: {path: prompts.jsonl}}``, and ``eval_path``)
is read from where it was written: in the config file, from the file's directory (not the working
directory); in a ``--set`` override, from the working directory. Either way it is stored absolute.

Example:
    >>> config = config_from_dict({"task": "sentiment", "agent": {"name": "ppo"}},
    ...                           overrides=["budget.updates=3", "lora.r=4"])
    >>> config.task.name, config.budget.updates, config.lora.r
    ('sentiment', 3, 4)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from rlfb.cpu_threads import DEFAULT_THREADS
from rlfb.envs.tasks import DATASET_PATH_OPTIONS, resolve_dataset_path, task_default_rewards
from rlfb.errors import ConfigError
from rlfb.logging import check_run_name


def _help(text: str) -> dict[str, str]:
    """Field metadata holding the help text shown by docs and error messages."""
    return {"help": text}


MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the torch dtypes model.dtype may name

@dataclass
class TaskConfig:
    """Where prompts come from. YAML shorthand: ``task: sentiment``."""

    name: str = field(default="sentiment", metadata=_help(
        "built-in task (sentiment, arithmetic) or 'dataset'"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "task options, e.g. {path: my.jsonl, prompt_column: text} for 'dataset' (a relative path is read "
        "from the config file's directory, or from the working directory when given with --set)"))


@dataclass
class ModelConfig:
    """The base model the LoRA adapter is trained on. YAML shorthand: ``model: rlfb-tiny``."""

    name: str = field(default="rlfb-tiny", metadata=_help(
        "built-in model name (see `rlfb models`), local directory or hub id"))
    dtype: str | None = field(default=None, metadata=_help(
        "torch dtype of the base weights (float32, bfloat16, float16); default: the model's own"))


@dataclass
class LoraConfig:
    """The LoRA adapter (Hu et al. 2021): ``W + (alpha / r) * B @ A`` on the target modules."""

    r: int = field(default=16, metadata=_help("rank of the update matrices"))
    alpha: float = field(default=32.0, metadata=_help("scale numerator: the update is scaled by alpha / r"))
    dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input during training"))
    target_modules: list[str] | None = field(default=None, metadata=_help(
        "module names to adapt, e.g. [c_attn, c_proj, c_fc] for GPT-2 attention + MLP; default: the "
        "attention projections peft knows for the model family (GPT-2: c_attn)"))
    init_from: str | None = field(default=None, metadata=_help(
        "start from this trained LoRA adapter instead of a fresh one: a peft adapter directory (an SFT result) "
        "or a run directory (its newest checkpoint's adapter); r, alpha and target_modules must match it; the "
        "KL reference stays the base model (docs/pipelines.md). A relative path is read like a dataset path"))


@dataclass
class RewardConfig:
    """One reward component. YAML shorthand: ``- sentiment``."""

    name: str = field(default="", metadata=_help(
        "registered reward (see `rlfb rewards`) or 'package.module:function'"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help("arguments of the reward"))
    weight: float = field(default=1.0, metadata=_help("weight of this component in the total reward"))
    label: str | None = field(default=None, metadata=_help("logged name; default: name"))


@dataclass
class RewardScaleConfig:
    """What happens to the weighted total reward before the agent sees it (see docs/rewards.md)."""

    normalize: bool = field(default=False, metadata=_help(
        "subtract a running mean and divide by a running standard deviation of the total reward "
        "(statistics over every training sample so far, saved in checkpoints, frozen during evaluation)"))
    clip: float | None = field(default=None, metadata=_help(
        "clip the total reward to [-clip, clip], after normalization; null: no clipping"))


@dataclass
class AgentConfig:
    """The learning algorithm: ``name`` plus its hyper-parameters, written flat in YAML.

    ``agent: {name: ppo, learning_rate: 1.0e-4}`` keeps ``learning_rate`` in :attr:`params`; the agent's
    own config dataclass checks the names and types of :attr:`params` when the agent is built.
    """

    name: str = field(default="ppo", metadata=_help("ppo, reinforce, rloo or grpo"))
    params: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "hyper-parameters of the agent (see docs/algorithms.md)"))


@dataclass
class SamplingConfig:
    """How completions are sampled during rollouts and evaluation."""

    temperature: float = field(default=1.0, metadata=_help("softmax temperature"))
    top_k: int = field(default=0, metadata=_help("keep the k most likely tokens; 0 keeps all"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling mass; 1.0 keeps all"))
    max_new_tokens: int = field(default=32, metadata=_help("longest completion, in tokens"))
    max_prompt_tokens: int | None = field(default=None, metadata=_help(
        "prompt window, in tokens: a longer prompt keeps its last tokens, in training and evaluation alike; "
        "null: 64, or less when the model's context window needs room for max_new_tokens"))


ENV_KINDS = ("single_turn", "multi_turn")  # the env sections a run may collect its rollouts from


@dataclass
class EnvConfig:
    """Where rollouts come from: one completion per prompt (default), or multi-turn episodes (docs/envs.md).

    ``env: {kind: multi_turn, protocol: guess_number, max_turns: 6}`` plays conversations of
    ``rlfb/MultiTurn-v0``: the task's rows open them, the protocol answers each model turn and pays its
    reward; ``rewards`` (which may then be empty) score each finished episode on top.
    """

    kind: str = field(default="single_turn", metadata=_help(
        "single_turn: one completion per prompt (rlfb/TextGeneration-v0); multi_turn: conversations with a "
        "protocol, one whole model turn per step (rlfb/MultiTurn-v0)"))
    protocol: str | None = field(default=None, metadata=_help(
        "multi_turn: the registered protocol that answers the model's turns (calculator, guess_number)"))
    protocol_options: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "multi_turn: options of the protocol, e.g. {high: 50} for guess_number"))
    max_turns: int = field(default=8, metadata=_help("multi_turn: model turns before an episode is truncated"))
    max_turn_tokens: int = field(default=24, metadata=_help(
        "multi_turn: longest model turn, in tokens (sampling.max_new_tokens is not used)"))
    max_model_tokens: int | None = field(default=None, metadata=_help(
        "multi_turn: model tokens over a whole episode before it is truncated; null: no cap"))
    max_context_tokens: int | None = field(default=None, metadata=_help(
        "multi_turn: longest conversation, in tokens; null: the model's context window"))
    reply_template: str = field(default="\n{reply}\n", metadata=_help(
        "multi_turn: how a reply is written without a chat template (a format string with {reply})"))
    use_chat_template: bool | None = field(default=None, metadata=_help(
        "multi_turn: render with the tokenizer's chat template; null: when it has one"))


@dataclass
class BudgetConfig:
    """How much to train: stops at whichever of ``updates`` and ``time_limit_s`` comes first."""

    updates: int | None = field(default=100, metadata=_help("number of rollout + update iterations"))
    time_limit_s: float | None = field(default=None, metadata=_help(
        "wall-clock limit of the training loop in seconds (evaluation excluded)"))
    num_envs: int = field(default=16, metadata=_help("completions per rollout (the batch size)"))
    group_size: int | None = field(default=None, metadata=_help(
        "completions per prompt (consecutive rows share one); null: the agent's default "
        "(4 for rloo and grpo, 1 otherwise)"))


@dataclass
class EvalConfig:
    """Evaluation on held-out prompts, before training, every ``every`` updates and at the end."""

    num_prompts: int = field(default=64, metadata=_help("held-out prompts per evaluation (at most the task's eval split)"))
    completions_per_prompt: int = field(default=1, metadata=_help(
        "completions sampled per held-out prompt (single-turn); more give steadier means of KL and rewards"))
    every: int = field(default=0, metadata=_help("evaluate every N updates; 0: only before and after"))
    num_samples: int = field(default=3, metadata=_help("sample completions shown in the report"))
    seed: int = field(default=1234, metadata=_help(
        "seed of evaluation sampling, so 'before' and 'after' see the same prompts and noise"))


@dataclass
class LoggingConfig:
    """Where metrics go: TensorBoard and metrics.jsonl under the run directory, and the console."""

    run_name: str | None = field(default=None, metadata=_help(
        "run directory name; default {task}__{agent}__{seed}__{timestamp}"))
    log_every: int = field(default=1, metadata=_help("write metrics every N updates"))
    samples_every: int = field(default=10, metadata=_help("write sample completions every N updates"))
    tensorboard: bool = field(default=True, metadata=_help("write TensorBoard event files"))
    progress_bar: bool = field(default=True, metadata=_help("show a tqdm progress bar"))


@dataclass
class CheckpointConfig:
    """Checkpoints under ``RUN_DIR/checkpoints``, written atomically."""

    every: int = field(default=50, metadata=_help("save every N updates; 0: only at the end"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept on disk (older ones are deleted)"))


FEEDBACK_KINDS = ("pairwise", "pointwise", "rating", "token")  # what an online reward model trains on
FEEDBACK_REWARD_MODEL_DIR = "reward_model"  # under feedback.dir


@dataclass
class FeedbackConfig:
    """Online training from people's judgments (docs/feedback.md); off while ``dir`` is null.

    ``rlfb feedback serve CONFIG`` serves the page over ``dir``'s store and the adapter this run publishes;
    the run trains its reward model from the store and retrains it as judgments come in. The run's
    ``rewards`` must score with that model: ``- {name: reward_model, kwargs: {path: DIR/reward_model}}``.
    """

    dir: str | None = field(default=None, metadata=_help(
        "feedback directory: store.sqlite (the judgments), policy/ (the adapter published for the server), "
        "reward_model/ (trained from the store); null: no online feedback"))
    kind: str = field(default="pairwise", metadata=_help(
        "what the reward model learns from: pairwise (choices and edits), pointwise (thumbs), rating, token (edits)"))
    retrain_every: int = field(default=100, metadata=_help(
        "new judgments between reward-model retrainings (0: only by retrain_minutes)"))
    retrain_minutes: float | None = field(default=None, metadata=_help(
        "also retrain when this many minutes passed and some judgment is new; null: by count only"))
    min_judgments: int = field(default=50, metadata=_help(
        "judgments the first reward model needs; training waits for them (the server shows the base policy)"))
    wait_s: float = field(default=3600.0, metadata=_help("longest wait for min_judgments before the run fails"))
    max_staleness: int | None = field(default=None, metadata=_help(
        "train on judgments of policies at most this many updates old; null: all judgments"))
    publish_every: int = field(default=5, metadata=_help("updates between publications of the adapter to the server"))
    reward_model: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "reward-model training options (epochs, learning_rate, batch_size, max_length, base_model, seed; "
        "see docs/rewards.md)"))


@dataclass
class RunConfig:
    """Everything one training run needs; saved resolved as ``RUN_DIR/config.yaml``."""

    task: TaskConfig = field(default_factory=TaskConfig, metadata=_help("prompt source"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_help("base model"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_help("LoRA adapter"))
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [RewardConfig(name="sentiment")], metadata=_help("reward components"))
    reward_scale: RewardScaleConfig = field(default_factory=RewardScaleConfig, metadata=_help(
        "normalization and clipping of the total reward"))
    agent: AgentConfig = field(default_factory=AgentConfig, metadata=_help("learning algorithm"))
    env: EnvConfig = field(default_factory=EnvConfig, metadata=_help(
        "the environment: single-turn completions or multi-turn episodes"))
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata=_help("sampling"))
    budget: BudgetConfig = field(default_factory=BudgetConfig, metadata=_help("training budget"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("held-out evaluation"))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_help("logging"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=_help("checkpoints"))
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig, metadata=_help(
        "online training from people's judgments (off unless feedback.dir is set)"))
    seed: int = field(default=0, metadata=_help("seed of every random number generator"))
    device: str = field(default="auto", metadata=_help(
        "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps"))
    threads: int | None = field(default=DEFAULT_THREADS, metadata=_help(
        f"CPU threads of torch (default {DEFAULT_THREADS}: on the built-in model a second thread buys "
        "little on an idle machine and costs a lot on a busy one, see rlfb/cpu_threads.py); "
        "null: torch's own default (one per core)"))
    output_dir: str = field(default="runs", metadata=_help("parent directory of run directories"))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data, agent params written flat as in the YAML file."""
        data = dataclasses.asdict(self)
        agent = data.pop("agent")
        data["agent"] = {"name": agent["name"], **agent["params"]}
        return data

    def to_yaml(self) -> str:
        """The config as YAML text that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Sections a YAML scalar may stand for: `task: sentiment` means `task: {name: sentiment}`.
_SHORTHAND_SECTIONS = (TaskConfig, ModelConfig, RewardConfig, AgentConfig)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-4`` as a float (YAML 1.2 does, PyYAML's 1.1 does not)."""


# `device` values: resolved to a torch.device (and checked against the hardware) when a run starts.
_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text as rlfb does for configs and ``--set`` values (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key=value`` overrides, and check every key and type.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings, values parsed as YAML (``budget.updates=5``,
            ``rewards.0.weight=2``, ``lora.target_modules=[c_attn]``).

    Returns:
        The validated config.

    Raises:
        ConfigError: the file is missing or not a mapping, a key is unknown, or a value has the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist{_similar_file_hint(path)}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_one_line(error)}") from error
    if isinstance(data, Mapping):
        if "stages" in data and "task" not in data:
            raise ConfigError(f"'{path}' is a pipeline config (it has 'stages'); run it with `rlfb pipeline {path}`")
        data = _normalize(RunConfig, dict(data), "")
        if isinstance(data.get("task"), Mapping):
            data["task"] = {**data["task"], "kwargs": _dataset_paths_from(data["task"], path.parent)}
        lora = data.get("lora")
        if isinstance(lora, Mapping) and isinstance(lora.get("init_from"), str):
            data["lora"] = {**lora, "init_from": str(_absolute(lora["init_from"], path.parent))}
    config = config_from_dict(data if data is not None else {}, overrides)
    # Paths given with --set are the working directory's; made absolute, a saved config works from anywhere.
    kwargs = _dataset_paths_from({"name": config.task.name, "kwargs": config.task.kwargs}, Path.cwd())
    init_from = config.lora.init_from
    lora = dataclasses.replace(config.lora, init_from=None if init_from is None else str(_absolute(init_from, Path.cwd())))
    return dataclasses.replace(config, task=TaskConfig(name=config.task.name, kwargs=kwargs), lora=lora)


def _absolute(path: str, directory: Path) -> Path:
    """``path`` read from ``directory`` when relative (``~`` expanded)."""
    expanded = Path(path).expanduser()
    return Path(os.path.normpath(expanded if expanded.is_absolute() else (directory / expanded).absolute()))


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's error as one line: the problem and where (its own message quotes the file over lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _similar_file_hint(path: Path) -> str:
    """'; did you mean ...' naming a YAML file of the same directory with a close name, or ''."""
    directory = path.parent if path.parent.is_dir() else None
    names = sorted(p.name for p in directory.glob("*.y*ml")) if directory is not None else []
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean '{path.with_name(close[0])}'?" if close else ""


def _dataset_paths_from(task: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """A task section's kwargs with the dataset task's relative local paths read from ``directory``."""
    kwargs = dict(task.get("kwargs") or {})
    if task.get("name") == "dataset":
        for option in DATASET_PATH_OPTIONS:
            if isinstance(kwargs.get(option), str):
                kwargs[option] = resolve_dataset_path(kwargs[option], directory)
    return kwargs


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Build a :class:`RunConfig` from plain data (as read from YAML) and ``key=value`` overrides."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(data).__name__}")
    given = _normalize(RunConfig, dict(data), "")
    data = _normalize(RunConfig, _with_defaults(RunConfig().to_dict(), given), "")
    if "rewards" not in given:
        data["rewards"] = _default_rewards(data)
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override '{override}' is not of the form key=value, e.g. budget.updates=10")
        _set_dotted(data, key.strip(), parse_yaml(value) if value.strip() else None)
    if "rewards" not in given and not any(override.strip().startswith("rewards") for override in overrides):
        data["rewards"] = _default_rewards(data)  # the task or env.kind an override chose
    return validate(_build(RunConfig, _normalize(RunConfig, data, ""), ""))


def _default_rewards(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rewards of a config that lists none: its task's declared defaults; none for a multi-turn run,
    whose episodes its protocol scores."""
    if data.get("env", {}).get("kind", "single_turn") != "single_turn":
        return []
    task = _normalize(TaskConfig, data.get("task", {}), "task")
    return [{"name": name} for name in task_default_rewards(task["name"], task.get("kwargs") or {})]


def check_section(cls: type, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Check free-form ``values`` (e.g. agent hyper-parameters) against the dataclass ``cls``.

    Returns:
        The values, converted where YAML is looser than Python (an integer where a float is expected).

    Raises:
        ConfigError: an unknown key (with the closest valid one) or a wrong type, named ``section.key``.
    """
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        _check_known(cls, str(key), section)
        checked[key] = _convert(hints[key], value, f"{section}.{key}")
    return checked


def field_help(cls: Any = RunConfig, prefix: str = "") -> dict[str, str]:
    """Every dotted key of a config class with its type and help text (for docs and errors)."""
    result = {}
    for config_field in dataclasses.fields(cls):
        key = f"{prefix}{config_field.name}"
        kind = typing.get_type_hints(cls)[config_field.name]
        if dataclasses.is_dataclass(kind):
            result.update(field_help(kind, f"{key}."))
        else:
            result[key] = f"{_type_name(kind)}: {config_field.metadata.get('help', '')}"
    return result


def _normalize(cls: Any, data: Any, where: str) -> Any:
    """Expand shorthands (``task: sentiment``) and gather agent params, so overrides see one shape."""
    if cls in _SHORTHAND_SECTIONS and isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    if cls is AgentConfig:
        params = dict(data.pop("params", None) or {})
        params.update({key: data.pop(key) for key in list(data) if key != "name"})
        data["params"] = params
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        kind = hints.get(name)
        if dataclasses.is_dataclass(kind):
            data[name] = _normalize(kind, value, f"{where}{name}.")
        elif _list_item_type(kind) is RewardConfig and isinstance(value, list):
            data[name] = [_normalize(RewardConfig, item, f"{where}{name}.{i}.") for i, item in enumerate(value)]
    return data


def _set_dotted(data: Any, key: str, value: Any) -> None:
    """Set ``a.b.c`` in the nested dicts/lists of a config; agent hyper-parameters go to ``agent.params``."""
    parts = key.split(".")
    if parts[0] == "agent" and len(parts) >= 2 and parts[1] not in ("name", "params"):
        parts.insert(1, "params")
    node: Any = data
    kind: Any = RunConfig  # the annotation of `node`; None inside free-form mappings (kwargs, params)
    for depth, part in enumerate(parts):
        so_far = ".".join(parts[: depth + 1])
        is_last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"'{so_far}': index {part} is out of range, the list has {len(node)} items")
            kind = _list_item_type(kind)
            if is_last:
                node[int(part)] = value
                return
            child = node[int(part)]
        else:
            if dataclasses.is_dataclass(kind):
                _check_known(kind, part, ".".join(parts[:depth]))
                kind = typing.get_type_hints(kind)[part]
            else:
                kind = None
            if is_last:
                node[part] = value
                return
            child = node.get(part)
            if child is None:
                child = node[part] = {}
        if isinstance(child, str) and kind in _SHORTHAND_SECTIONS:
            child = {"name": child}
            if isinstance(node, list):
                node[int(part)] = child
            else:
                node[part] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"cannot set '{key}': '{so_far}' is {child!r}, not a section")
        node = child


def _check_known(cls: Any, key: str, section: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key in names:
        return
    full = f"{section}.{key}" if section else key
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""
    where = f"'{section}'" if section else "a run config"
    raise ConfigError(f"unknown key '{full}'{hint}; valid keys in {where}: {', '.join(names)}")


def _build(cls: Any, data: Any, where: str) -> Any:
    """Check ``data`` against the dataclass ``cls`` field by field and construct it."""
    section = where.rstrip(".") or "the run config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{section}' must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    for key in data:
        _check_known(cls, str(key), where.rstrip("."))
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{where}{name}")
    return cls(**values)


def _convert(kind: Any, value: Any, key: str) -> Any:
    """Return ``value`` checked against the annotation ``kind``, or raise naming the key."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.")
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(error)
        raise _type_error(key, kind, value)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, kind, value)
        (item_kind,) = typing.get_args(kind)
        return [_convert(item_kind, item, f"{key}.{i}") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, kind, value)
        return {str(k): v for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise _type_error(key, kind, value)
    return value


def _type_error(key: str, kind: Any, value: Any) -> ConfigError:
    return ConfigError(f"'{key}' must be {_type_name(kind)}, got {type(value).__name__} {value!r}")


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(kind))
    if origin is list:
        item = typing.get_args(kind)[0]
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return "a list of " + plural.get(item, "mappings")
    if origin is dict:
        return "a mapping"
    if kind is type(None):
        return "null"
    if dataclasses.is_dataclass(kind):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _with_defaults(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with missing keys filled from ``defaults``, recursively through mappings (lists replace)."""
    merged = dict(defaults)
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _with_defaults(dict(merged[key]), dict(value))
        else:
            merged[key] = value
    return merged


def validate(config: RunConfig) -> RunConfig:
    """Check the values that types alone cannot (ranges, budgets); return ``config`` unchanged.

    Raises:
        ConfigError: naming the key, its value and the accepted range.
    """
    def require(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"'{key}' is {value!r}; it must be {accepted}")

    require(bool(_DEVICE_PATTERN.fullmatch(config.device)), "device", config.device,
            "auto, cpu, cuda, cuda:N (N: the GPU index) or mps")
    require(config.threads is None or config.threads >= 1, "threads", config.threads,
            ">= 1, or null for torch's default")
    clip = config.reward_scale.clip
    require(clip is None or clip > 0, "reward_scale.clip", clip, "> 0, or null for no clipping")
    budget = config.budget
    require(budget.updates is None or budget.updates >= 1, "budget.updates", budget.updates, ">= 1 or null")
    require(budget.time_limit_s is None or budget.time_limit_s > 0, "budget.time_limit_s",
            budget.time_limit_s, "> 0 or null")
    if budget.updates is None and budget.time_limit_s is None:
        raise ConfigError("'budget.updates' and 'budget.time_limit_s' are both null; set at least one "
                          "so training ends, e.g. --set budget.updates=100")
    group_size = budget.group_size or 1
    require(group_size >= 1, "budget.group_size", budget.group_size, ">= 1 or null")
    require(budget.num_envs >= 1 and budget.num_envs % group_size == 0, "budget.num_envs",
            budget.num_envs, f"a positive multiple of budget.group_size ({group_size})")
    sampling = config.sampling
    require(sampling.temperature > 0, "sampling.temperature", sampling.temperature, "> 0")
    require(0 < sampling.top_p <= 1, "sampling.top_p", sampling.top_p, "in (0, 1]")
    require(sampling.top_k >= 0, "sampling.top_k", sampling.top_k, ">= 0 (0 keeps all tokens)")
    require(sampling.max_new_tokens >= 1, "sampling.max_new_tokens", sampling.max_new_tokens, ">= 1")
    require(sampling.max_prompt_tokens is None or sampling.max_prompt_tokens >= 1, "sampling.max_prompt_tokens",
            sampling.max_prompt_tokens, ">= 1 or null")
    require(config.model.dtype is None or config.model.dtype in MODEL_DTYPES, "model.dtype", config.model.dtype,
            f"one of {', '.join(MODEL_DTYPES)}, or null for the model's own")
    require(config.lora.r >= 1, "lora.r", config.lora.r, ">= 1")
    require(0 <= config.lora.dropout < 1, "lora.dropout", config.lora.dropout, "in [0, 1)")
    _validate_env(config)
    if config.env.kind == "single_turn":  # a multi-turn episode is scored by its protocol, rewards optional
        if not config.rewards:
            raise ConfigError(f"'rewards' is empty and task '{config.task.name}' declares no default reward; list "
                              "at least one, e.g. rewards: [sentiment] (`rlfb rewards` lists the registered ones)")
    for index, reward in enumerate(config.rewards):
        require(bool(reward.name), f"rewards.{index}.name", reward.name, "a registered reward name")
    require(config.eval.num_prompts >= 0, "eval.num_prompts", config.eval.num_prompts, ">= 0")
    require(config.eval.completions_per_prompt >= 1, "eval.completions_per_prompt",
            config.eval.completions_per_prompt, ">= 1")
    if config.env.kind == "multi_turn" and config.eval.completions_per_prompt != 1:
        raise ConfigError("'eval.completions_per_prompt' applies to single-turn runs; a multi-turn run evaluates "
                          "eval.num_prompts episodes: raise that instead")
    require(config.eval.every >= 0, "eval.every", config.eval.every, ">= 0 (0: only before and after)")
    check_run_name(config.logging.run_name)
    require(config.logging.log_every >= 1, "logging.log_every", config.logging.log_every, ">= 1")
    require(config.logging.samples_every >= 0, "logging.samples_every", config.logging.samples_every, ">= 0")
    require(config.checkpoint.every >= 0, "checkpoint.every", config.checkpoint.every, ">= 0 (0: only at the end)")
    require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", config.checkpoint.keep_last, ">= 1")
    _validate_feedback(config)
    return config


# Reward-model training options the feedback section may set (the rest come from the store and the run).
FEEDBACK_REWARD_MODEL_OPTIONS = ("base_model", "epochs", "learning_rate", "warmup_ratio", "weight_decay",
                                 "batch_size", "max_length", "seed", "eval_fraction", "gold")


def _validate_feedback(config: RunConfig) -> None:
    """The ``feedback`` section: known kind, counts in range, and a reward that scores with its reward model."""
    feedback = config.feedback
    if feedback.dir is None:
        return

    def require(ok: bool, key: str, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"'feedback.{key}' is {getattr(feedback, key)!r}; it must be {accepted}")

    require(feedback.kind in FEEDBACK_KINDS, "kind", f"one of {', '.join(FEEDBACK_KINDS)}")
    require(feedback.retrain_every >= 0, "retrain_every", ">= 0 (0: only by retrain_minutes)")
    require(feedback.retrain_minutes is None or feedback.retrain_minutes > 0, "retrain_minutes", "> 0, or null")
    require(feedback.retrain_every > 0 or feedback.retrain_minutes is not None, "retrain_every",
            "> 0 when feedback.retrain_minutes is null (else the reward model is never retrained)")
    require(feedback.min_judgments >= 2, "min_judgments", ">= 2 (one is held out to evaluate the reward model)")
    require(feedback.wait_s > 0, "wait_s", "> 0")
    require(feedback.max_staleness is None or feedback.max_staleness >= 0, "max_staleness", ">= 0, or null")
    require(feedback.publish_every >= 1, "publish_every", ">= 1")
    for key in feedback.reward_model:
        if key not in FEEDBACK_REWARD_MODEL_OPTIONS:
            close = difflib.get_close_matches(key, FEEDBACK_REWARD_MODEL_OPTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key 'feedback.reward_model.{key}'{hint}; valid keys: "
                              f"{', '.join(FEEDBACK_REWARD_MODEL_OPTIONS)}")
    path = str(Path(feedback.dir) / FEEDBACK_REWARD_MODEL_DIR)
    if not any(reward.name == "reward_model" and str(reward.kwargs.get("path")) == path for reward in config.rewards):
        raise ConfigError(f"feedback.dir is {feedback.dir!r}, but no reward scores with its reward model; add "
                          f"{{name: reward_model, kwargs: {{path: {path}}}}} to rewards")


def _validate_env(config: RunConfig) -> None:
    """The ``env`` section: a known kind, a registered protocol for multi-turn runs only, caps in range."""
    from rlfb.envs.protocol import list_protocols

    env = config.env
    if env.kind not in ENV_KINDS:
        close = difflib.get_close_matches(env.kind, ENV_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"'env.kind' is {env.kind!r}{hint}; it must be one of {', '.join(ENV_KINDS)}")
    if env.kind == "single_turn":
        for key in ("protocol", "protocol_options"):
            if getattr(env, key):
                raise ConfigError(f"'env.{key}' is set but 'env.kind' is 'single_turn'; set env.kind: multi_turn "
                                  f"to play a protocol, or remove env.{key}")
        return
    protocols = list_protocols()
    if env.protocol is None:
        raise ConfigError(f"'env.kind' is 'multi_turn' but 'env.protocol' is not set; name one of: "
                          f"{', '.join(protocols)}")
    if env.protocol not in protocols:
        close = difflib.get_close_matches(env.protocol, list(protocols), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown protocol {env.protocol!r} in 'env.protocol'{hint}; registered: "
                          f"{', '.join(protocols)}")

    def require(ok: bool, key: str, accepted: str) -> None:
        if not ok:
            raise ConfigError(f"'env.{key}' is {getattr(env, key)!r}; it must be {accepted}")

    require(env.max_turns >= 1, "max_turns", ">= 1")
    require(env.max_turn_tokens >= 1, "max_turn_tokens", ">= 1")
    require(env.max_model_tokens is None or env.max_model_tokens >= 1, "max_model_tokens", ">= 1, or null for no cap")
    require(env.max_context_tokens is None or env.max_context_tokens > env.max_turn_tokens, "max_context_tokens",
            f"above env.max_turn_tokens ({env.max_turn_tokens}), or null for the model's context window")
    require("{reply}" in env.reply_template, "reply_template", "a format string containing {reply}")


def _list_item_type(kind: Any) -> Any:
    if typing.get_origin(kind) is list:
        return typing.get_args(kind)[0]
    return None
