"""Metrics logging: a small logger with prefixed keys and pluggable writers.

Keys carry their family as a prefix (``rollout/``, ``train/``, ``eval/``, ``time/``); every name is
documented in docs/metrics.md. A :class:`Logger` collects the values of one update and hands them to
its writers at :meth:`Logger.dump`: TensorBoard event files (:class:`TensorBoardWriter`), a
``metrics.jsonl`` file that tests and benchmarks read (:class:`JsonlWriter`), the console
(:class:`ConsoleWriter`). Only the main process writes, so multi-process training can share the code.

Example:
    >>> import tempfile, json, pathlib
    >>> run_dir = pathlib.Path(tempfile.mkdtemp())
    >>> logger = Logger([JsonlWriter(run_dir)])
    >>> logger.record_many({"rollout/reward_mean": 0.5, "train/kl": 0.01})
    >>> logger.dump(step=1)
    {'rollout/reward_mean': 0.5, 'train/kl': 0.01}
    >>> logger.close()
    >>> json.loads((run_dir / "metrics.jsonl").read_text())
    {'step': 1, 'rollout/reward_mean': 0.5, 'train/kl': 0.01}
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rlfb.errors import ConfigError, RlfbError
from rlfb.files import write_text_atomically

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter(Protocol):
    """Where a :class:`Logger` sends metrics. Implement the three methods to add a backend."""

    def write_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Write one update's scalar metrics."""

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Write a piece of text (sample completions, a table, hyper-parameters)."""

    def close(self) -> None:
        """Flush and release files."""


class Logger:
    """Collects prefixed scalar metrics and writes them with every writer on :meth:`dump`.

    Args:
        writers: the backends.
        is_main_process: when False (a non-zero rank) nothing is written, so every rank can call the
            same logging code.
    """

    def __init__(self, writers: Sequence[MetricWriter], is_main_process: bool = True) -> None:
        self.writers = list(writers) if is_main_process else []
        self._pending: dict[str, float] = {}

    def record(self, key: str, value: Any) -> None:
        """Remember ``value`` (a Python, NumPy or 0-d torch number) under ``key`` until the next dump."""
        self._pending[key] = _to_float(key, value)

    def record_many(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """:meth:`record` each item, with ``prefix`` prepended to names that do not have a ``/`` family."""
        for key, value in metrics.items():
            self.record(key if "/" in key or not prefix else f"{prefix}{key}", value)

    def dump(self, step: int) -> dict[str, float]:
        """Write the recorded metrics at ``step`` and clear them; returns what was written."""
        metrics, self._pending = self._pending, {}
        if metrics:
            for writer in self.writers:
                writer.write_scalars(metrics, step)
        return metrics

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Write ``text`` (markdown in TensorBoard) under ``tag``."""
        for writer in self.writers:
            writer.write_text(tag, text, step)

    def log_samples(self, tag: str, prompts: Sequence[str], completions: Sequence[str],
                    rewards: Sequence[float], step: int) -> None:
        """Write sample completions with their rewards as a markdown table."""
        self.log_text(tag, samples_markdown(prompts, completions, rewards), step)

    def log_hyperparameters(self, config: Mapping[str, Any], step: int = 0) -> None:
        """Write the flattened run config as a two-column markdown table (CleanRL's habit)."""
        rows = "\n".join(f"|{key}|{value}|" for key, value in flatten(config).items())
        self.log_text("hyperparameters", f"|parameter|value|\n|-|-|\n{rows}", step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class JsonlWriter:
    """Appends one JSON object per dump to ``RUN_DIR/metrics.jsonl`` (``{"step": n, key: value, ...}``).

    Text goes to ``RUN_DIR/samples.jsonl``. On resume, pass the checkpoint's step as
    ``truncate_after``: lines written after that step by the interrupted run are dropped, so the file
    reads as if the run had never stopped. Both files are read and checked before either is rewritten
    (each atomically); a partial last line, what a kill during a write leaves, is dropped.
    """

    def __init__(self, run_dir: str | Path, truncate_after: int | None = None) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        self.samples_path = run_dir / SAMPLES_FILE
        if truncate_after is not None:
            kept = {path: [line for line, row in _read_rows(path) if row["step"] <= truncate_after]
                    for path in (self.path, self.samples_path) if path.exists()}
            for path, lines in kept.items():
                write_text_atomically(path, "".join(lines))
        self._file = self.path.open("a")
        self._samples = self.samples_path.open("a")

    def write_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        self._samples.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._file.close()
        self._samples.close()


class TensorBoardWriter:
    """TensorBoard scalars and text under ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``).

    ``purge_step`` (the resumed checkpoint's step + 1) makes TensorBoard hide events the interrupted run
    wrote after its last checkpoint.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def write_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class ConsoleWriter:
    """Prints a few headline metrics per dump, for runs without a progress bar (logs, CI).

    Args:
        keys: metric names to print, in order; those missing from a dump are skipped.
        print_fn: where lines go (``tqdm.write`` keeps a progress bar intact).
    """

    DEFAULT_KEYS = ("rollout/reward_mean", "train/kl", "train/policy_loss", "rollout/completion_length",
                    "time/tokens_per_s")

    def __init__(self, keys: Iterable[str] = DEFAULT_KEYS, print_fn: Any = print) -> None:
        self.keys = tuple(keys)
        self.print_fn = print_fn

    def write_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        shown = [f"{key.split('/', 1)[-1]}={metrics[key]:.4g}" for key in self.keys if key in metrics]
        if shown:
            self.print_fn(f"update {step}: " + "  ".join(shown))

    def write_text(self, tag: str, text: str, step: int) -> None:
        """Text is left to TensorBoard and samples.jsonl; the console stays one line per update."""

    def close(self) -> None:
        """Nothing to release."""


def make_run_dir(output_dir: str | Path, task: str, agent: str, seed: int, run_name: str | None = None) -> Path:
    """Create and return a fresh run directory ``{task}__{agent}__{seed}__{timestamp}`` (or ``run_name``).

    A name already taken gets a ``-2``, ``-3``... suffix rather than mixing two runs' files.

    Raises:
        ConfigError: ``run_name`` is not one directory name (see :func:`check_run_name`).
    """
    check_run_name(run_name)
    name = run_name or f"{_slug(task)}__{_slug(agent)}__{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    candidate, suffix = output_dir / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = output_dir / f"{name}-{suffix}"


def check_run_name(run_name: str | None) -> None:
    """Refuse a ``logging.run_name`` that is not one plain directory name inside ``output_dir``.

    Raises:
        ConfigError: the name is empty, ``.`` or ``..``, or holds a path separator or a drive (it would
            put the run outside ``output_dir``, e.g. ``../x`` or ``/tmp/x``).
    """
    if run_name is None:
        return
    if run_name.strip() in ("", ".", "..") or any(mark in run_name for mark in ("/", "\\", ":")):
        raise ConfigError(f"'logging.run_name' is {run_name!r}; it must be one directory name inside output_dir "
                          "(no '/', '\\', ':', '.' or '..'), e.g. logging.run_name=my-run; set output_dir to "
                          "choose where runs go")


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``RUN_DIR/metrics.jsonl``, in order (what tests and benchmarks compare).

    A partial last line (a kill during a write) is left out.
    """
    return [row for _, row in _read_rows(Path(run_dir) / METRICS_FILE)]


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, parsed row) of each complete line of a JSONL log; a partial last line is left out.

    Raises:
        RlfbError: a line before the last is not a JSON object with a ``step`` (the file was edited or
            damaged otherwise than by a kill).
    """
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if number == len(lines):
                break  # written when the run was killed: the row was never complete
            raise RlfbError(f"line {number} of '{path}' is not a JSON row with a 'step' ({line.strip()[:80]!r}); "
                            "nothing was changed: remove that line to continue the run")
        rows.append((line if line.endswith("\n") else line + "\n", row))
    return rows


def samples_markdown(prompts: Sequence[str], completions: Sequence[str], rewards: Sequence[float]) -> str:
    """A markdown table of prompt | completion | reward (pipes and newlines escaped)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"|{cell(p)}|{cell(c)}|{r:.3f}|" for p, c, r in zip(prompts, completions, rewards, strict=True)]
    return "|prompt|completion|reward|\n|-|-|-|\n" + "\n".join(rows)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (lists of mappings get their index as a key)."""
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            result.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            for index, item in enumerate(value):
                result.update(flatten(item, f"{name}.{index}."))
        else:
            result[name] = value
    return result


def _to_float(key: str, value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric '{key}' must be a number, got {type(value).__name__} {value!r}") from None
    return number


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"
