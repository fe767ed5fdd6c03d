"""Checkpoints: written atomically, the last K kept, everything needed to resume a run exactly.

Layout of a run directory::

    RUN_DIR/
      config.yaml                     the resolved run config
      metrics.jsonl, samples.jsonl    see rlfb.logging
      tensorboard/                    TensorBoard event files
      checkpoints/
        step_00000010/                one complete checkpoint per saved update
          adapter/                    the LoRA adapter in peft format (adapter_config.json, safetensors)
          value_head.safetensors      when the agent has a value head
          agent.pt                    optimizer, scheduler, KL controller, baseline (agent.state_dict())
          rng.pt                      Python, NumPy, torch (CPU and CUDA), sampling and env generators
          trainer_state.json          step, elapsed time, token count
          config.yaml
      final/                          the same contents at the end of training
      eval.json                       the before/after evaluation

Atomicity: a checkpoint is written into a hidden temporary directory next to its destination, every
file is fsync'ed, and only then is the directory renamed into place (a rename within one file system is
atomic). A crash at any moment leaves either the old set of checkpoints or the old set plus the new
one, never a half-written ``step_*`` directory; the previous checkpoint is deleted only after the new
one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfb.errors import RlfbError

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TRAINER_STATE_FILE = "trainer_state.json"
AGENT_STATE_FILE = "agent.pt"
RNG_STATE_FILE = "rng.pt"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"


class CheckpointNotFoundError(RlfbError, FileNotFoundError):
    """A path given to ``--resume``, ``rlfb eval`` or ``rlfb generate`` holds no checkpoint."""


def save_atomically(destination: str | Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``destination`` by letting ``write`` fill a temporary one, then renaming it.

    Args:
        destination: the directory to create; an existing one is replaced only once the new one is complete.
        write: fills the directory it is given.

    Returns:
        ``destination``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f"{_TEMPORARY_PREFIX}{destination.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        write(temporary)
        _fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if destination.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first, delete it last.
        retired = destination.parent / f"{_TEMPORARY_PREFIX}{destination.name}-old-{os.getpid()}"
        os.replace(destination, retired)
        os.replace(temporary, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, destination)
    _fsync_directory(destination.parent)
    return destination


class CheckpointManager:
    """Saves ``RUN_DIR/checkpoints/step_XXXXXXXX`` directories and keeps the newest ``keep_last``.

    Args:
        run_dir: the run directory.
        keep_last: complete checkpoints kept on disk.
        is_main_process: only the main process writes; others' :meth:`save` is a no-op.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2, is_main_process: bool = True) -> None:
        self.directory = Path(run_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.is_main_process = is_main_process

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write the checkpoint of ``step`` atomically, then delete the oldest beyond ``keep_last``."""
        path = self.directory / f"step_{step:08d}"
        if not self.is_main_process:
            return path
        self._remove_leftovers()
        save_atomically(path, write)
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.directory.iterdir()
                 if (match := _STEP_DIR.match(path.name)) and path.is_dir()]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def _remove_leftovers(self) -> None:
        """Delete temporary directories a crashed save left behind (never a complete checkpoint)."""
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(_TEMPORARY_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory, a ``checkpoints`` directory or a checkpoint to one checkpoint directory.

    A run directory resolves to its newest checkpoint, or to ``final/`` when that is newer.

    Raises:
        CheckpointNotFoundError: nothing there holds a checkpoint.
    """
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    candidates = []
    if path.name == CHECKPOINTS_DIR:
        path = path.parent
    latest = CheckpointManager(path).latest()
    if latest is not None:
        candidates.append(latest)
    if (path / FINAL_DIR / TRAINER_STATE_FILE).is_file():
        candidates.append(path / FINAL_DIR)
    if not candidates:
        raise CheckpointNotFoundError(
            f"'{path}' holds no checkpoint (expected {CHECKPOINTS_DIR}/step_*/ or {FINAL_DIR}/ with "
            f"{TRAINER_STATE_FILE}); pass a run directory written by `rlfb train`")
    return max(candidates, key=lambda candidate: read_trainer_state(candidate)["step"])


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (``step`` at least)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())


def write_trainer_state(checkpoint: str | Path, state: Mapping[str, Any]) -> None:
    (Path(checkpoint) / TRAINER_STATE_FILE).write_text(json.dumps(dict(state), indent=2) + "\n")


def save_torch_state(path: str | Path, state: Any) -> None:
    """``torch.save`` of plain containers, numbers, strings and tensors (loadable with ``weights_only``)."""
    torch.save(state, str(path))


def load_torch_state(path: str | Path) -> Any:
    """Load what :func:`save_torch_state` wrote, on CPU, without unpickling arbitrary objects."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def capture_rng_state(torch_generators: Mapping[str, torch.Generator] | None = None,
                      numpy_generators: Mapping[str, np.random.Generator] | None = None) -> dict[str, Any]:
    """Every random number generator state a run depends on, as plain data.

    Args:
        torch_generators: named ``torch.Generator`` objects (e.g. the sampling generator).
        numpy_generators: named ``np.random.Generator`` objects (e.g. the vector env's ``np_random``).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": _lists(random.getstate()),
        "numpy": [kind, np.asarray(keys).tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "torch_generators": {name: g.get_state() for name, g in (torch_generators or {}).items()},
        "numpy_generators": {name: g.bit_generator.state for name, g in (numpy_generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping[str, Any],
                      torch_generators: Mapping[str, torch.Generator] | None = None,
                      numpy_generators: Mapping[str, np.random.Generator] | None = None) -> None:
    """Put back what :func:`capture_rng_state` captured, into the global and the named generators.

    Raises:
        RlfbError: a named generator has no saved state (the run's setup changed since the checkpoint).
    """
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    for name, torch_generator in (torch_generators or {}).items():
        torch_generator.set_state(_saved(state["torch_generators"], name))
    for name, numpy_generator in (numpy_generators or {}).items():
        numpy_generator.bit_generator.state = _saved(state["numpy_generators"], name)


def _saved(states: Mapping[str, Any], name: str) -> Any:
    if name not in states:
        raise RlfbError(f"the checkpoint has no state for random generator '{name}' "
                        f"(saved: {', '.join(states) or 'none'}); was it written by another rlfb version?")
    return states[name]


def _lists(value: Any) -> Any:
    """Tuples as lists, recursively (Python's random state is nested tuples)."""
    return [_lists(item) for item in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_directory(Path(root))


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; some platforms (Windows) cannot open directories, which is harmless there."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
