"""Checkpoints: written atomically, the last K kept, everything needed to resume a run exactly.

Layout of a run directory::

    RUN_DIR/
      config.yaml                     the resolved run config
      metrics.jsonl, samples.jsonl    see rlfb.logging
      tensorboard/                    TensorBoard event files
      checkpoints/
        step_00000010/                one complete checkpoint per saved update
          adapter/                    the LoRA adapter in peft format (adapter_config.json, safetensors)
            value_head.safetensors    when the agent has a value head
          agent.pt                    optimizer, scheduler, KL controller, baseline (agent.state_dict())
          rng.pt                      Python, NumPy, torch (CPU and CUDA), sampling and env generators
          trainer_state.json          step, elapsed time, token count
          config.yaml
          manifest.json               every other file's size and sha256, written last (see verify_checkpoint)
      final/                          the same contents at the end of training
      eval.json                       the before/after evaluation

Atomicity: a checkpoint is written into a hidden temporary directory next to its destination, every
file is fsync'ed, and only then is the directory renamed into place (a rename within one file system is
atomic). A crash at any moment leaves either the old set of checkpoints or the old set plus the new
one, never a half-written ``step_*`` directory; the previous checkpoint is deleted only after the new
one is in place. A temporary directory whose writer died (its process id is in its name) is deleted
by the next save into the same parent directory.

Verification: a run directory resolves to its newest checkpoint that :func:`verify_checkpoint` accepts
(every file the manifest lists is there, with its size and sha256), so a checkpoint damaged after it was
written (a truncated copy, a deleted file) is skipped, with the reason, in favour of an older intact one.
See docs/run_directory.md for every file of a run directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfb.errors import RlfbError
from rlfb.files import (
    fsync_directory,
    fsync_tree,
    remove_abandoned_temporaries,
    sha256_of_file,
    temporary_sibling,
)
from rlfb.run_directory import CONFIG_FILE, TRAINER_STATE_FILE  # noqa: F401 (part of this module's API)

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
AGENT_STATE_FILE = "agent.pt"
RNG_STATE_FILE = "rng.pt"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointNotFoundError(RlfbError, FileNotFoundError):
    """A path given to ``--resume``, ``rlfb eval`` or ``rlfb generate`` holds no checkpoint."""


class CheckpointDamagedError(CheckpointNotFoundError):
    """Every checkpoint there is damaged (a file missing, truncated or changed since it was written)."""


def save_atomically(destination: str | Path, write: Callable[[Path], None]) -> Path:
    """Create directory ``destination`` by letting ``write`` fill a temporary one, then renaming it.

    After ``write``, a :data:`MANIFEST_FILE` recording every file's size and sha256 is added, so a
    reader can later tell the directory is still as written (:func:`verify_checkpoint`). Temporaries that
    killed processes left next to ``destination`` are deleted first.

    Args:
        destination: the directory to create; an existing one is replaced only once the new one is complete.
        write: fills the directory it is given.

    Returns:
        ``destination``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temporaries(destination.parent)
    temporary = temporary_sibling(destination)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        write(temporary)
        write_manifest(temporary)
        fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if destination.exists():
        # os.replace cannot replace a non-empty directory: move the old one aside first, delete it last.
        retired = temporary_sibling(destination, "old")
        os.replace(destination, retired)
        os.replace(temporary, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, destination)
    fsync_directory(destination.parent)
    return destination


def write_manifest(directory: str | Path) -> None:
    """Record the size and sha256 of every file under ``directory`` in its :data:`MANIFEST_FILE`."""
    directory = Path(directory)
    files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of_file(path)}
             for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n")


def verify_checkpoint(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be used, or None when it is intact.

    Intact: every file its manifest lists is there with the recorded size and sha256, and
    ``trainer_state.json`` holds a step. A checkpoint written before manifests existed is only checked
    for its trainer state.
    """
    checkpoint = Path(checkpoint)
    manifest = checkpoint / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return f"{MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"
        missing = [name for name in expected if not (checkpoint / name).is_file()]
        if missing:
            return f"{', '.join(missing[:3])}{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} " \
                   f"{'is' if len(missing) == 1 else 'are'} missing"
        for name, (size, digest) in expected.items():
            path = checkpoint / name
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes but was written with {size}"
            if sha256_of_file(path) != digest:
                return f"{name} changed since it was written (its sha256 differs)"
    try:
        int(read_trainer_state(checkpoint)["step"])
    except FileNotFoundError:
        return f"{TRAINER_STATE_FILE} is missing"
    except (ValueError, KeyError, TypeError) as error:
        return f"{TRAINER_STATE_FILE} is unreadable ({type(error).__name__}: {error})"
    return None


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
        save_atomically(path, write)
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories (renamed into place, so complete when written), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(match.group(1)), path) for path in self.directory.iterdir()
                 if (match := _STEP_DIR.match(path.name)) and path.is_dir()]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint directory, or None (see :func:`find_checkpoint` for the newest intact one)."""
        found = self.checkpoints()
        return found[-1] if found else None


def _to_stderr(message: str) -> None:
    print(f"rlfb: {message}", file=sys.stderr)


def find_checkpoint(path: str | Path, report: Callable[[str], None] = _to_stderr) -> Path:
    """Resolve a run directory, a ``checkpoints`` directory or a checkpoint to one intact checkpoint.

    A run directory resolves to its newest intact checkpoint (``final/`` counts, and wins a tie); each
    newer damaged one is skipped with a line to ``report`` saying why. A checkpoint directory given
    itself must be intact.

    Raises:
        CheckpointNotFoundError: nothing there holds a checkpoint.
        CheckpointDamagedError: every checkpoint there is damaged (the message lists each and why).
    """
    path = Path(path)
    if (path / TRAINER_STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CheckpointDamagedError(f"checkpoint '{path}' is damaged: {problem}; pass its run directory "
                                         "to use the newest intact checkpoint instead")
        return path
    if path.name == CHECKPOINTS_DIR:
        path = path.parent
    candidates = [(int(_STEP_DIR.match(step.name).group(1)), 0, step)  # type: ignore[union-attr]
                  for step in CheckpointManager(path).checkpoints()]
    final = path / FINAL_DIR
    if final.is_dir():
        try:
            final_step = float(read_trainer_state(final)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            final_step = float("inf")  # written last: judged first, and its problem reported
        candidates.append((final_step, 1, final))
    if not candidates:
        raise CheckpointNotFoundError(
            f"'{path}' holds no checkpoint (expected {CHECKPOINTS_DIR}/step_*/ or {FINAL_DIR}/ with "
            f"{TRAINER_STATE_FILE}); pass a run directory written by `rlfb train`")
    skipped: list[str] = []
    for _, _, candidate in sorted(candidates, reverse=True):
        problem = verify_checkpoint(candidate)
        if problem is None:
            for line in skipped:
                report(f"{line}; using {candidate.relative_to(path)} instead")
            return candidate
        skipped.append(f"skipped damaged checkpoint {candidate.relative_to(path)}: {problem}")
    raise CheckpointDamagedError(f"no intact checkpoint in '{path}': " + "; ".join(
        line.removeprefix("skipped damaged checkpoint ") for line in skipped)
        + "; restore the files from a copy, or start the run again")


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
