"""Tasks: where the prompts of an environment come from.

A task holds two splits of rows, ``train`` and ``eval`` (held out, for evaluation). Every row is a dict
with a ``"prompt"`` string and any extra per-prompt columns (the ``arithmetic`` task adds ``"answer"``);
the environments pass those columns to the reward functions by name, as TRL does.

Built-ins:
    * ``sentiment``: openings of review sentences from the built-in grammar ("The acting was"); the aim is
      a positive continuation. Default reward: ``sentiment``.
    * ``arithmetic``: sums such as ``"17+25="`` with the ``answer`` column; the eval sums never occur in
      the built-in model's pretraining corpus. Default reward: ``exact_match``.
    * ``guess_number``: one row, ``"Guess 1-20:"`` with ``low`` / ``high`` columns, for the ``guess_number``
      protocol of ``rlfb/MultiTurn-v0`` (it draws the secret). No default reward.
    * ``dataset``: any source :func:`datasets.load_dataset` reads: a local JSON / JSONL / CSV / Parquet /
      text file or directory, or a hub id where there is internet. No default reward. A path that
      looks local (a file suffix, a leading ``.``, ``/`` or ``~``, or a directory part that exists) is
      never tried on the hub: when it is missing, the error says so at once. In a run config, relative
      paths are read from the config file's directory. `datasets` keeps its Arrow copies of the files
      under rlfb's cache (``$RLFB_HOME/datasets``, by default ``~/.cache/rlfb/datasets``).

Example:
    >>> task = make_task("arithmetic")
    >>> task.eval_rows()[0]["prompt"].endswith("="), task.columns
    (True, ('answer',))
    >>> make_task({"name": "sentiment", "num_eval": 3}).eval_prompts() == make_task(
    ...     {"name": "sentiment", "num_eval": 3}).eval_prompts()
    True
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlfb.errors import ConfigError, DatasetError

__all__ = ["DATASET_PATH_OPTIONS", "SPLITS", "Task", "check_task", "list_tasks", "make_task", "register_task", "resolve_dataset_path",
           "task_default_rewards"]

Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = ("train", "eval")
TaskBuilder = Callable[..., "Task"]

_BUILDERS: dict[str, TaskBuilder] = {}
_DEFAULT_REWARDS: dict[str, tuple[str, ...] | Callable[[Mapping[str, Any]], tuple[str, ...]]] = {}

# Openings of a split are drawn without repetition until the split is used up, so deduplicating a draw
# this long recovers every opening of the split (the grammar has a few hundred).
_OPENINGS_DRAW = 20_000

# Options of the dataset task that name files or directories.
DATASET_PATH_OPTIONS = ("path", "eval_path")

# File suffix -> the `datasets` builder that reads it.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class Task:
    """A named source of train and held-out eval prompts, plus extra per-prompt columns.

    Attributes:
        name: Short name (shown in logs and run names).
        train: Rows of the train split; each a dict with "prompt" and the extra columns.
        eval: Rows of the held-out evaluation split, same columns.
        default_rewards: Reward names used when an environment is given no ``rewards``.
        description: One line for listings.
    """

    name: str
    train: tuple[dict[str, Any], ...]
    eval: tuple[dict[str, Any], ...]
    default_rewards: tuple[str, ...] = ()
    description: str = ""
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        columns: dict[str, None] = {}
        for split in SPLITS:
            rows = getattr(self, split)
            if not rows:
                raise DatasetError(f"task {self.name!r}: the {split} split has no prompts; give it at least one row")
            for index, row in enumerate(rows):
                prompt = row.get("prompt") if isinstance(row, Mapping) else None
                if not isinstance(prompt, str):
                    raise DatasetError(
                        f"task {self.name!r}: {split} row {index} needs a 'prompt' string, got {_preview(row)}")
                columns.update(dict.fromkeys(key for key in row if key != "prompt"))
        object.__setattr__(self, "columns", tuple(columns))

    def rows(self, split: str) -> list[dict[str, Any]]:
        """The rows of ``split`` ("train" or "eval"), as fresh dicts."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return [dict(row) for row in getattr(self, split)]

    def train_rows(self) -> list[dict[str, Any]]:
        """Rows of the train split."""
        return self.rows("train")

    def eval_rows(self) -> list[dict[str, Any]]:
        """Rows of the held-out evaluation split."""
        return self.rows("eval")

    def train_prompts(self) -> list[str]:
        """Prompts of the train split."""
        return [row["prompt"] for row in self.train]

    def eval_prompts(self) -> list[str]:
        """Prompts of the held-out evaluation split."""
        return [row["prompt"] for row in self.eval]


def register_task(name: str, default_rewards: Sequence[str] | Callable[[Mapping[str, Any]], tuple[str, ...]] = (),
                  ) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a task builder under ``name``: a function of keyword options returning a :class:`Task`.

    ``default_rewards`` are the rewards a run config of this task uses when it lists none (single-turn
    runs); declare them here, where a config can read them without building the task (or give a function
    of the task's options that returns them, as the ``perturbed`` task does for the task it wraps).

    Example:
        >>> @register_task("greetings")
        ... def greetings() -> Task:
        ...     '''Say hello.'''
        ...     return Task("greetings", train=({"prompt": "Hello,"},), eval=({"prompt": "Hi,"},))
        >>> make_task("greetings").eval_prompts()
        ['Hi,']
    """

    def decorator(builder: TaskBuilder) -> TaskBuilder:
        _BUILDERS[name] = builder
        _DEFAULT_REWARDS[name] = default_rewards if callable(default_rewards) else tuple(default_rewards)
        return builder

    return decorator


def task_default_rewards(name: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The rewards registered task ``name`` (with ``options``) declared as its defaults (none if unknown)."""
    declared = _DEFAULT_REWARDS.get(name, ())
    return tuple(declared(dict(options or {}))) if callable(declared) else declared


def _wrapped_task_rewards(options: Mapping[str, Any]) -> tuple[str, ...]:
    inner = options.get("task", "sentiment")
    if isinstance(inner, Mapping):
        return task_default_rewards(str(inner.get("name", "")), {k: v for k, v in inner.items() if k != "name"})
    return task_default_rewards(str(inner))


def list_tasks() -> dict[str, str]:
    """Registered task name -> first line of its builder's docstring."""
    return {name: (inspect.getdoc(builder) or "").splitlines()[0] for name, builder in sorted(_BUILDERS.items())}


def make_task(name_or_spec: str | Mapping[str, Any] | Task, **options: Any) -> Task:
    """Build a task from its name, a config mapping (``{"name": ..., **options}``), or pass a Task through.

    Args:
        name_or_spec: "sentiment", "arithmetic", "dataset", any registered name, a mapping with a
            "name" key and the builder's options, or a ready :class:`Task`.
        **options: More builder options (override the mapping's).

    Raises:
        ConfigError: Unknown task name or option.
        DatasetError: The prompt source is empty, unreadable or lacks the prompt column.
    """
    if isinstance(name_or_spec, Task):
        if options:
            raise ConfigError(f"options {sorted(options)} cannot be applied to a ready Task {name_or_spec.name!r}")
        return name_or_spec
    name, options = check_task(name_or_spec, **options)
    return _BUILDERS[name](**options)


def check_task(name_or_spec: str | Mapping[str, Any], **options: Any) -> tuple[str, dict[str, Any]]:
    """Check a task's name, its option names and (for ``dataset``) that its local files exist, reading nothing.

    Returns:
        The task name and its options, as :func:`make_task` passes them to the builder.

    Raises:
        ConfigError: Unknown task name or option.
        DatasetError: A dataset path that looks local does not exist.
    """
    if isinstance(name_or_spec, Mapping):
        spec = dict(name_or_spec)
        if "name" not in spec:
            raise ConfigError(f"a task mapping needs a 'name' key (one of {sorted(_BUILDERS)}), got {spec}")
        name = spec.pop("name")
        options = {**spec, **options}
    else:
        name = name_or_spec
    if name not in _BUILDERS:
        raise ConfigError(f"unknown task {name!r}; registered: {', '.join(sorted(_BUILDERS))}")
    builder = _BUILDERS[name]
    parameters = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ConfigError(f"task {name!r} got unknown option(s) {unknown}; options: {', '.join(parameters) or 'none'}")
    if builder is dataset_task:
        for option in DATASET_PATH_OPTIONS:
            if isinstance(options.get(option), str):
                _check_local_source(options[option], option)
    return name, options


def _check_local_source(path: str, option: str) -> None:
    """Check a dataset path that looks local: it exists, and a file is of a known type, not blank, valid JSONL."""
    local = Path(path).expanduser()
    if _looks_local(path) and not local.exists():
        raise DatasetError(f"dataset file {path!r} (task option {option}) does not exist; check the path "
                           "(a relative path in a run config is read from the config file's directory)")
    if not local.is_file():
        return
    if local.suffix.lower() not in _FILE_BUILDERS:
        raise DatasetError(f"cannot read {path!r}: unknown file type {local.suffix!r}; use one of "
                           f"{sorted(_FILE_BUILDERS)}")
    if _is_blank(local):
        raise DatasetError(f"dataset {path!r} is empty; it needs at least one prompt")
    if local.suffix.lower() == ".jsonl":
        _check_json_lines(local)


def resolve_dataset_path(path: str, directory: str | Path) -> str:
    """``path`` read relative to ``directory`` when it is a relative local path; hub ids stay as they are.

    A name that does not look local (``imdb``, ``stanfordnlp/imdb``) is a hub id unless a file or
    directory of that name exists in ``directory``.

    Example:
        >>> resolve_dataset_path("data/prompts.jsonl", "/project/configs")
        '/project/configs/data/prompts.jsonl'
        >>> resolve_dataset_path("stanfordnlp/imdb", "/project/configs"), resolve_dataset_path("/abs.csv", "/x")
        ('stanfordnlp/imdb', '/abs.csv')
    """
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = Path(directory) / expanded
    return str(candidate) if _looks_local(path, Path(directory)) or candidate.exists() else path


def _looks_local(path: str, directory: Path = Path(".")) -> bool:
    """Whether ``path`` names a local file or directory rather than a hub dataset id.

    Local: a file suffix rlfb reads (``.jsonl``...), a leading ``.``, ``/`` or ``~``, a backslash, more
    than one ``/``, or a first path part that is an existing directory (``data/prompts``).
    """
    if path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1:
        return True
    if Path(path).suffix.lower() in _FILE_BUILDERS:
        return True
    first, separator, _ = path.partition("/")
    return bool(separator) and (directory / first).is_dir()


# ---------------------------------------------------------------------------------------------- built-ins
@register_task("sentiment", default_rewards=("sentiment",))
def sentiment_task(num_train: int | None = None, num_eval: int | None = None, seed: int = 0) -> Task:
    """Openings of review sentences from the built-in grammar; the aim is positive continuations.

    Args:
        num_train: How many train openings; default: every train opening once.
        num_eval: How many held-out eval openings; default: every eval opening once.
        seed: Order of the openings.
    """
    from rlfb.models.corpus import review_openings

    def openings(split: Split, count: int | None) -> tuple[dict[str, Any], ...]:
        every = list(dict.fromkeys(review_openings(split, _OPENINGS_DRAW, seed=seed)))
        chosen = every if count is None or count <= len(every) else review_openings(split, count, seed=seed)
        return tuple({"prompt": text} for text in chosen[:count])

    return Task("sentiment", train=openings("train", num_train), eval=openings("eval", num_eval),
                default_rewards=("sentiment",), description="review openings; reward positive continuations")


@register_task("arithmetic", default_rewards=("exact_match",))
def arithmetic_task(num_train: int | None = None, num_eval: int | None = None, seed: int = 0) -> Task:
    """Sums such as "17+25=" with the right answer in the "answer" column.

    Args:
        num_train: Keep a seeded random subset of this many train sums; default: all.
        num_eval: Keep a seeded random subset of this many eval sums; default: all (held out from pretraining).
        seed: Seeds the subsets.
    """
    from rlfb.models.corpus import arithmetic_problems

    def problems(split: Split, count: int | None) -> tuple[dict[str, Any], ...]:
        rows = [{"prompt": prompt, "answer": answer} for prompt, answer in arithmetic_problems(split)]
        if count is not None and count < len(rows):
            keep = np.random.default_rng(seed).choice(len(rows), size=count, replace=False)
            rows = [rows[index] for index in sorted(keep)]
        return tuple(rows)

    return Task("arithmetic", train=problems("train", num_train), eval=problems("eval", num_eval),
                default_rewards=("exact_match",), description="two-digit sums; the answer is an extra column")


@register_task("guess_number")
def guess_number_task(low: int = 1, high: int = 20) -> Task:
    """One opening such as "Guess 1-20:" with its range; the guess_number protocol draws each secret.

    Both splits hold the same row: what varies between episodes is the secret, drawn from the
    environment's generator at every reset.

    Args:
        low, high: The range of the secret (inclusive).
    """
    if low > high:
        raise ConfigError(f"guess_number: low ({low}) must not exceed high ({high})")
    from rlfb.models.corpus import guess_opening  # the wording rlfb-tiny-multiturn's games were played in

    row = {"prompt": guess_opening(low, high), "low": low, "high": high}
    return Task("guess_number", train=(row,), eval=(dict(row),),
                description="a number range for the guess_number protocol of rlfb/MultiTurn-v0")


@register_task("dataset")
def dataset_task(
    path: str,
    prompt_column: str = "prompt",
    split: str = "train",
    eval_split: str | None = None,
    eval_path: str | None = None,
    eval_fraction: float = 0.1,
    columns: Sequence[str] | None = None,
    config_name: str | None = None,
    seed: int = 0,
) -> Task:
    """Prompts from any source datasets.load_dataset reads (local files, or a hub id with internet).

    Args:
        path: A local .json/.jsonl/.csv/.parquet/.txt file or directory, or a hub dataset id.
        prompt_column: The column that holds the prompts (renamed to "prompt").
        split: Split of ``path`` used for training (local files have only "train").
        eval_split: A split of ``path`` to evaluate on (e.g. "test").
        eval_path: A second file or directory to evaluate on.
        eval_fraction: Without eval_split / eval_path, hold out this seeded random fraction of the rows
            (at least one row); 0 evaluates on the train rows (no held-out data).
        columns: Extra columns to keep (default: all besides the prompt column).
        config_name: The dataset configuration name (hub datasets with several).
        seed: Seeds the held-out draw.
    """
    train = _load_rows(path, split, config_name, prompt_column, columns)
    if eval_split is not None and eval_path is not None:
        raise ConfigError("give eval_split or eval_path for the dataset task, not both")
    if eval_path is not None or eval_split is not None:
        source = eval_path if eval_path is not None else path
        held_out = _load_rows(source, eval_split or "train", config_name, prompt_column, columns)
    elif eval_fraction == 0:
        held_out = list(train)
    else:
        if not 0 < eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if len(train) < 2:
            raise DatasetError(f"dataset {path!r} has {len(train)} row; holding one out for evaluation needs at "
                               "least 2 (or set eval_fraction=0, eval_split or eval_path)")
        order = np.random.default_rng(seed).permutation(len(train))
        num_eval = min(len(train) - 1, max(1, round(len(train) * eval_fraction)))
        held_out = [train[index] for index in sorted(order[:num_eval])]
        train = [train[index] for index in sorted(order[num_eval:])]
    return Task(f"dataset:{Path(path).name or path}", train=tuple(train), eval=tuple(held_out),
                description=f"prompts from {path} (column {prompt_column!r})")


def _load_rows(path: str, split: str, config_name: str | None, prompt_column: str,
               columns: Sequence[str] | None) -> list[dict[str, Any]]:
    """Read one split of a dataset into rows with a "prompt" key and the chosen extra columns."""
    dataset = _load_split(path, split, config_name)
    if len(dataset) == 0:
        raise DatasetError(f"dataset {path!r} (split {split!r}) is empty; it needs at least one prompt")
    available = list(dataset.column_names)
    if prompt_column not in available:
        raise DatasetError(f"dataset {path!r} has no column {prompt_column!r}; its columns are {available}. "
                           "Set prompt_column to the one that holds the prompts")
    extra = [name for name in available if name not in (prompt_column, "prompt")] if columns is None else list(columns)
    missing = [name for name in extra if name not in available]
    if missing:
        raise DatasetError(f"dataset {path!r} has no column(s) {missing}; its columns are {available}")
    rows = []
    for index, record in enumerate(dataset.select_columns([prompt_column, *extra]).to_list()):
        prompt = record.pop(prompt_column)
        if not isinstance(prompt, str):
            raise DatasetError(f"dataset {path!r}, row {index}: column {prompt_column!r} holds "
                               f"{type(prompt).__name__} {_preview(prompt)}, expected text")
        rows.append({"prompt": prompt, **record})
    return rows


def _load_split(path: str, split: str, config_name: str | None) -> Any:
    import datasets

    from rlfb.models.builtin import rlfb_home

    cache_dir = str(rlfb_home() / "datasets")  # Arrow copies of the files: rlfb's cache, not ~/.cache/huggingface
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = _FILE_BUILDERS[local.suffix.lower()]  # check_task made sure of the suffix
            return datasets.load_dataset(builder, data_files=str(local), split=split, cache_dir=cache_dir)
        if local.is_dir():
            return datasets.load_dataset(str(local), split=split, cache_dir=cache_dir)
        return datasets.load_dataset(path, config_name, split=split, cache_dir=cache_dir)
    except DatasetError:
        raise
    except ValueError as error:
        if "corresponds to no data" in str(error):  # how `datasets` says a split has no rows
            raise DatasetError(f"dataset {path!r} (split {split!r}) is empty; it needs at least one prompt") \
                from error
        raise DatasetError(f"could not load dataset {path!r} (split {split!r}): {error}") from error
    except Exception as error:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        raise DatasetError(f"could not load dataset {path!r} (split {split!r}): {type(error).__name__}: {error}") \
            from error


def _check_json_lines(path: Path) -> None:
    """Raise naming the file and line of the first line that is not a JSON object (`datasets` names neither)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"dataset file {str(path)!r}, line {number}: not valid JSON ({error.msg} at "
                                   f"column {error.colno}): {_preview(line.strip())}") from None
            if not isinstance(record, dict):
                raise DatasetError(f"dataset file {str(path)!r}, line {number}: a JSON Lines row must be an "
                                   f"object such as {{\"prompt\": \"...\"}}, got {_preview(record)}")


def _is_blank(path: Path) -> bool:
    """Whether a small file holds nothing but whitespace (`datasets` fails obscurely on those)."""
    return path.stat().st_size <= 65536 and not path.read_bytes().strip()


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@register_task("perturbed", default_rewards=_wrapped_task_rewards)
def perturbed_task(task: str | Mapping[str, Any] = "sentiment", kinds: Sequence[str] = ("typos", "distractor"),
                   rate: float = 0.1, seed: int = 0, splits: Sequence[str] = ("train",), fraction: float = 1.0) -> Task:
    """Another task's rows with perturbed prompts (typos, distractor prefixes, case noise): adversarial training.

    Each row of the perturbed ``splits`` (default: train only, so held-out evaluation stays clean) gets its
    prompt perturbed once, deterministically from ``seed`` and its index (:mod:`rlfb.envs.perturbations`);
    the other columns are unchanged. The task's default rewards are the wrapped task's; a run config of
    this task that lists none uses them.

    Args:
        task: The wrapped task: a name or ``{name, kwargs}``-style mapping, as ``make_task`` takes.
        kinds: Perturbations to apply, in order.
        rate: Per-character probability of typos and case flips.
        seed: Seeds the perturbations.
        splits: Which splits to perturb.
        fraction: The share of each perturbed split's rows that are perturbed (chosen at random from
            ``seed``); the others keep their clean prompt, so training sees both.
    """
    from rlfb.envs.perturbations import check_perturbation, perturb_prompt

    check_perturbation(kinds, rate)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"perturbed: fraction must be in (0, 1], got {fraction}")
    bad = [split for split in splits if split not in SPLITS]
    if bad or not splits:
        raise ConfigError(f"perturbed: splits {list(splits)} must be some of {', '.join(SPLITS)}")
    inner = make_task(task if isinstance(task, str) else dict(task))

    def perturbed(split: Split) -> tuple[dict[str, Any], ...]:
        rows = inner.rows(split)
        if split not in splits:
            return tuple(rows)
        offset = SPLITS.index(split) * 1_000_003
        chosen = np.random.default_rng([seed, offset, 7]).random(len(rows)) < fraction
        return tuple({**row, "prompt": perturb_prompt(row["prompt"], kinds, rate,
                                                      np.random.default_rng([seed, offset + index]))}
                     if chosen[index] else row for index, row in enumerate(rows))

    return Task(f"perturbed_{inner.name}", train=perturbed("train"), eval=perturbed("eval"),
                default_rewards=inner.default_rewards,
                description=f"{inner.name} with {', '.join(kinds)} in its {', '.join(splits)} prompts")


# Tasks of optional libraries (the library is imported when the task is made).
from rlfb.integrations.reasoning_gym import reasoning_gym_task  # noqa: E402

register_task("reasoning_gym", default_rewards=("reasoning_gym",))(reasoning_gym_task)
