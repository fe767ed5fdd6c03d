"""Reading a run directory back (``--resume``, ``rlfb eval``, ``rlfb generate``) without trusting it blindly.

A run directory is data that may have been copied from elsewhere or edited, so what is read from it is
checked before anything is written or run (docs/run_directory.md lists every file):

* code: the reward names of its config are resolved under an :class:`~rlfb.rewards.registry.ImportTrust`
  (:func:`reward_specs`); a ``module:attr`` name imports only modules the user allowed;
* models and data: what its config will load (base model, adapter, teacher, dataset, reward models) is said
  before it is loaded (:func:`describe_inputs`);
* config changes on resume: a change to a key that shapes the saved weights is refused, any other
  change is listed and recorded in the run's ``config.yaml`` (:func:`config_changes`);
* ``eval.json``: read and checked as a whole before a resumed run touches the directory (:func:`read_evaluations`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfb.cpu_threads import configure_threads
from rlfb.errors import ConfigError, RlfbError
from rlfb.logging import flatten
from rlfb.rewards.registry import ImportTrust, resolve

# File names of a run directory that are read before torch is imported (the rest: rlfb/checkpoint.py).
CONFIG_FILE = "config.yaml"
TRAINER_STATE_FILE = "trainer_state.json"

if TYPE_CHECKING:
    from rlfb.config import RewardConfig, RunConfig
    from rlfb.rewards import RewardSpec

EVAL_FILE = "eval.json"

# Keys whose change alters the shape of what a checkpoint holds: the base model's weights, the LoRA
# matrices, the value head and optimizer state (an agent switch). Resuming across them cannot work.
SHAPE_KEYS = ("model.name", "lora.r", "lora.target_modules", "agent.name")
# Keys a resumed run may change and still continue exactly as an uninterrupted run would (budget,
# bookkeeping, hardware); a change to any other key is allowed but breaks that equality, and is said so.
EXACT_RESUME_KEYS = ("budget.updates", "budget.time_limit_s", "eval.", "logging.", "checkpoint.", "device",
                     "output_dir")


def import_trust(run_config_path: str | Path, allowed_modules: Sequence[str]) -> ImportTrust:
    """The trust of a config read from a run directory: only the modules the user allowed."""
    return ImportTrust.only(allowed_modules, source=str(run_config_path))


def reward_specs(rewards: Sequence[RewardConfig], trust: ImportTrust) -> list[RewardSpec]:
    """The config's reward entries as :class:`~rlfb.rewards.RewardSpec`, each name resolved under ``trust``.

    Raises:
        UntrustedImportError: a ``module:attr`` name's module is not trusted (nothing was imported).
    """
    from rlfb.rewards import RewardSpec

    specs = []
    for reward in rewards:
        spec = RewardSpec(name=reward.name, kwargs=dict(reward.kwargs), weight=reward.weight, label=reward.label)
        # Resolved here, under the caller's trust, so the RewardSet receives objects and imports nothing.
        specs.append(replace(spec, name=resolve(reward.name, trust), label=spec.label or spec.default_label()))
    return specs


def open_run(target: str | Path, command: str) -> tuple[Path, RunConfig] | None:
    """The checkpoint and config a run directory (or checkpoint) resolves to, with what it will load
    said on stderr; None when ``target`` is not a run (a model name or directory). Sets torch's threads
    to the run's ``threads``.

    Raises:
        CheckpointNotFoundError: a run directory without an intact checkpoint.
    """
    from rlfb.checkpoint import find_checkpoint
    from rlfb.config import load_config

    path = Path(target)
    if not (path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / TRAINER_STATE_FILE).is_file())):
        return None
    checkpoint = find_checkpoint(path, report=lambda line: print(f"rlfb {command}: {line}", file=sys.stderr))
    config = load_config(checkpoint / CONFIG_FILE)
    configure_threads(config.threads)  # a run is read with the torch threads it trained with
    for line in describe_inputs(config, checkpoint):
        print(f"rlfb {command}: {line}", file=sys.stderr)
    return checkpoint, config


def describe_inputs(config: RunConfig, checkpoint: Path | None) -> list[str]:
    """One line per thing a run's config makes rlfb load, with where it will be loaded from."""
    lines = []
    if checkpoint is not None:
        lines.append(f"checkpoint: {checkpoint}")
    lines.append(f"base model: {_model_where(config.model.name)}")
    if isinstance(teacher := config.agent.params.get("teacher"), str):
        lines.append(f"teacher (agent.teacher): {_model_where(teacher)}")
    for key in ("path", "eval_path"):
        if isinstance(value := config.task.kwargs.get(key), str):
            lines.append(f"dataset ({'task.kwargs.' + key}): {_where(value)}")
    for index, reward in enumerate(config.rewards):
        if isinstance(value := reward.kwargs.get("path"), str):  # a reward model's directory
            lines.append(f"reward {reward.name!r} (rewards.{index}.kwargs.path): {_where(value)}")
        if isinstance(value := reward.kwargs.get("teacher"), str):  # teacher_logprob's teacher
            lines.append(f"reward {reward.name!r} (rewards.{index}.kwargs.teacher): {_model_where(value)}")
    return lines


def _model_where(model: str) -> str:
    """A model name, and whether it is built in, a local directory (a model or a run) or a hub id."""
    from rlfb.models.loading import BUILTIN_MODELS

    if model in BUILTIN_MODELS:
        return f"{model!r} (built-in)"
    if Path(model).expanduser().is_dir():
        return f"{model!r} (local directory {Path(model).expanduser().resolve()})"
    return f"{model!r} (Hugging Face hub id: the local cache, or the network)"


def _where(path: str) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else f"{path!r} (not a local path: a hub id)"


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a checkpoint's config and the config a resume runs with."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def config_changes(saved: RunConfig, resumed: RunConfig) -> list[ConfigChange]:
    """The keys a resume changes, sorted; refuses a change to a :data:`SHAPE_KEYS` key.

    Raises:
        ConfigError: a change alters the shape of the checkpoint's weights (the message names the key,
            the saved value and the new one).
    """
    old, new = flatten(saved.to_dict()), flatten(resumed.to_dict())
    changes = [ConfigChange(key, old.get(key), new.get(key))
               for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    for change in changes:
        if change.key.startswith(SHAPE_KEYS):
            raise ConfigError(f"cannot resume with '{change.key}' changed from {change.old!r} to {change.new!r}: "
                              f"the checkpoint's weights have the old shape; resume with {change.key}="
                              f"{change.old!r}, or start a new run without --resume")
    return changes


def describe_changes(changes: Sequence[ConfigChange], recorded_in: Path) -> str:
    """The line a resume prints for its config changes, saying which break exact continuation."""
    inexact = [str(change) for change in changes if not change.key.startswith(EXACT_RESUME_KEYS)]
    text = (f"resuming with a changed config: {', '.join(map(str, changes))} (recorded in {recorded_in}, "
            "so the next resume uses it too)")
    if inexact:
        text += f"; because of {', '.join(inexact)} the run will not match an uninterrupted one"
    return text


def read_evaluations(run_dir: Path) -> dict[str, Mapping[str, Any]]:
    """The labelled evaluations of ``RUN_DIR/eval.json`` (``{}`` when there is none).

    Raises:
        RlfbError: the file is not a JSON object of evaluations (truncated or edited); nothing was changed.
    """
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RlfbError(f"'{path}' is damaged ({error}); nothing in the run was changed: restore it from a "
                        "copy, or start a new run") from None
    if not isinstance(saved, dict) or not all(isinstance(value, dict) for value in saved.values()):
        raise RlfbError(f"'{path}' is not a mapping of labelled evaluations; nothing in the run was changed: "
                        "restore it from a copy, or start a new run")
    return saved
