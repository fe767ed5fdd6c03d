"""Checkpoints: atomic writes, keep-last-K, latest resolution, RNG capture and restore."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfb.checkpoint import (
    CheckpointDamagedError,
    CheckpointManager,
    CheckpointNotFoundError,
    capture_rng_state,
    find_checkpoint,
    read_trainer_state,
    restore_rng_state,
    save_atomically,
    verify_checkpoint,
    write_trainer_state,
)


def write_step(step: int):
    def write(directory: Path) -> None:
        (directory / "payload.txt").write_text(f"step {step}")
        write_trainer_state(directory, {"step": step})
    return write


def test_keeps_the_last_k_and_resolves_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, write_step(step))
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000003"]
    assert find_checkpoint(tmp_path) == manager.latest()
    assert read_trainer_state(find_checkpoint(tmp_path))["step"] == 3


def test_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, write_step(1))

    def crash(directory: Path) -> None:
        (directory / "payload.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(2, crash)
    assert [p.name for p in manager.checkpoints()] == ["step_00000001"]
    assert (find_checkpoint(tmp_path) / "payload.txt").read_text() == "step 1"


def test_a_killed_process_leaves_only_an_ignored_temporary(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, write_step(1))
    leftover = manager.directory / ".tmp-step_00000002-99999"  # what a SIGKILL mid-write leaves
    leftover.mkdir()
    (leftover / "payload.txt").write_text("half")
    assert find_checkpoint(tmp_path).name == "step_00000001"
    manager.save(2, write_step(2))
    assert not leftover.exists()
    assert [p.name for p in manager.checkpoints()] == ["step_00000002"]


def test_save_atomically_replaces_only_when_complete(tmp_path: Path) -> None:
    save_atomically(tmp_path / "final", write_step(1))
    with pytest.raises(RuntimeError):
        save_atomically(tmp_path / "final", lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (tmp_path / "final" / "payload.txt").read_text() == "step 1"
    save_atomically(tmp_path / "final", write_step(2))
    assert (tmp_path / "final" / "payload.txt").read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert verify_checkpoint(tmp_path / "final") is None


def test_final_counts_as_latest_when_newer(tmp_path: Path) -> None:
    CheckpointManager(tmp_path).save(4, write_step(4))
    save_atomically(tmp_path / "final", write_step(6))
    assert find_checkpoint(tmp_path).name == "final"


def test_missing_checkpoint_error_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="holds no checkpoint"):
        find_checkpoint(tmp_path)


def test_rng_states_round_trip(tmp_path: Path) -> None:
    sampling = torch.Generator().manual_seed(5)
    env_random = np.random.default_rng(6)
    state = capture_rng_state({"sampling": sampling}, {"env": env_random})
    torch.save(state, tmp_path / "rng.pt")

    def draw() -> tuple:
        return (random.random(), np.random.rand(), torch.rand(1).item(),
                torch.rand(1, generator=sampling).item(), env_random.random())

    first = draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), {"sampling": sampling}, {"env": env_random})
    assert draw() == first


def test_a_damaged_newest_checkpoint_is_skipped_with_the_reason(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save(step, write_step(step))
    save_atomically(tmp_path / "final", write_step(3))
    payload = tmp_path / "final" / "payload.txt"
    payload.write_text("st")  # a truncated copy
    reports: list[str] = []
    assert find_checkpoint(tmp_path, report=reports.append).name == "step_00000002"
    assert reports == ["skipped damaged checkpoint final: payload.txt is 2 bytes but was written with 6; "
                       "using checkpoints/step_00000002 instead"]
    (manager.directory / "step_00000002" / "payload.txt").unlink()
    (manager.directory / "step_00000001" / "payload.txt").write_text("step X")  # same size, other bytes
    with pytest.raises(CheckpointDamagedError) as error:
        find_checkpoint(tmp_path, report=reports.append)
    assert str(error.value) == (
        f"no intact checkpoint in '{tmp_path}': final: payload.txt is 2 bytes but was written with 6; "
        "checkpoints/step_00000002: payload.txt is missing; checkpoints/step_00000001: payload.txt changed "
        "since it was written (its sha256 differs); restore the files from a copy, or start the run again")


def test_an_unreadable_trainer_state_or_manifest_is_damage(tmp_path: Path) -> None:
    save_atomically(tmp_path / "a", write_step(1))
    (tmp_path / "a" / "trainer_state.json").write_text("")
    assert verify_checkpoint(tmp_path / "a").startswith("trainer_state.json is 0 bytes but was written with")
    save_atomically(tmp_path / "b", write_step(1))
    (tmp_path / "b" / "manifest.json").write_text('{"files": {"payload.txt": ')
    assert verify_checkpoint(tmp_path / "b").startswith("manifest.json is unreadable (JSONDecodeError")
    with pytest.raises(CheckpointDamagedError, match=r"checkpoint '.*b' is damaged: manifest.json is unreadable"):
        find_checkpoint(tmp_path / "b")  # a checkpoint named itself is not swapped for another
    (tmp_path / "legacy").mkdir()
    write_step(1)(tmp_path / "legacy")  # written before manifests: only its trainer state is checked
    assert verify_checkpoint(tmp_path / "legacy") is None


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / ".tmp-final-999999999"  # a save killed before its rename
    retired = tmp_path / ".tmp-final-old-999999999"
    live = tmp_path / f".tmp-final-{os.getppid()}"  # a process that runs (this one's parent)
    for path in (dead, retired, live):
        path.mkdir()
        (path / "agent.pt").write_bytes(b"half")
    save_atomically(tmp_path / "final", write_step(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["final", live.name])
