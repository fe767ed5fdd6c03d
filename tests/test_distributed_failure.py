"""A rank killed (SIGKILL) mid-run on 2 gloo ranks: the other stops within seconds naming it; --resume continues.

The ranks are plain processes launched as a launcher without an agent would (the torch.distributed
variables by hand, rank 0 holding the rendezvous store), so what ends the survivor is rlfb's heartbeat
check (rlfb/distributed.py), not torchrun's agent tearing the job down. Killing rank 0 takes the store
with it; killing rank 1 leaves the store up and its heartbeat still.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import free_port
from test_trainer import reproducible, tiny_config

from rlfb.distributed import HEARTBEAT_SILENCE_S, RankFailure
from rlfb.errors import RlfbError
from rlfb.logging import read_metrics
from rlfb.trainer import FAILED_FILE, Trainer

# Sampled, not greedy: the resumed ranks must restore their own sampling streams from the checkpoint.
OVERRIDES = ("budget.updates=5", "budget.num_envs=8", "agent.num_minibatches=1", "checkpoint.every=2",
             "eval.num_prompts=0")
KILLED_AFTER_UPDATE = 3  # the last checkpoint is update 2's
# What the issue allows between a rank's death and the others' exit.
EXIT_WITHIN_S = 60.0


def worker(rank: int, port: int, model_dir: str, output_dir: str, plan: str, killed_rank: int,
           out_dir: str) -> None:
    """Train as ``plan`` says; write what happened to ``out_dir/rank{rank}.json``.

    "straight_then_killed": an uninterrupted run under ``output_dir/straight``, then one under
    ``output_dir/killed`` in which ``killed_rank`` kills itself after update KILLED_AFTER_UPDATE.
    "resume RUN_DIR": continue RUN_DIR.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    report = Path(out_dir) / f"rank{rank}.json"
    if plan.startswith("resume "):
        config = tiny_config(Path(model_dir), Path(output_dir) / "killed", *OVERRIDES)
        result = Trainer(config, resume_from=plan.removeprefix("resume ")).train()
        report.write_text(json.dumps({"run_dir": str(result.run_dir), "step": result.step}))
        return
    straight = Trainer(tiny_config(Path(model_dir), Path(output_dir) / "straight", *OVERRIDES)).train()

    def kill_mid_run(step: int, metrics: dict) -> None:
        if rank == killed_rank and step == KILLED_AFTER_UPDATE:
            report.write_text(json.dumps({"straight": str(straight.run_dir), "killed_at": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        Trainer(tiny_config(Path(model_dir), Path(output_dir) / "killed", *OVERRIDES), callbacks=[kill_mid_run]).train()
    except RankFailure as failure:
        report.write_text(json.dumps({"straight": str(straight.run_dir), "error": str(failure),
                                      "failed_at": time.time(), "is_rlfb_error": isinstance(failure, RlfbError)}))
        os._exit(1)  # what the CLI does after printing the error: leave, without waiting for the dead rank


def launch(tmp_path: Path, model_dir: Path, plan: str, killed_rank: int = -1) -> list[dict]:
    """Two rank processes (spawned, no launcher agent) training under ``tmp_path``; each rank's report once
    both have exited."""
    out_dir = tmp_path / f"reports-{len(list(tmp_path.glob('reports-*')))}"
    out_dir.mkdir()
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, str(model_dir), str(tmp_path), plan,
                                                      killed_rank, str(out_dir))) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    alive = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not alive, f"rank(s) {alive} still running 180 s after the launch: a hang"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


# Rank 0 killed: the store goes with it (another code path, and the FAILED file is not written); slow.
@pytest.mark.parametrize("killed_rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_rank_stops_the_other_naming_it_and_resume_continues_like_an_uninterrupted_run(
        tiny_model_dir: Path, tmp_path: Path, killed_rank: int) -> None:
    killed, survivor = killed_rank, 1 - killed_rank
    reports = launch(tmp_path, tiny_model_dir, "straight_then_killed", killed_rank)
    failure = reports[survivor]
    assert failure["error"].startswith(f"rank {killed} of 2 died or hung")
    assert f"while rank {survivor} waited in" in failure["error"] and "--resume" in failure["error"]
    assert "\n" not in failure["error"] and failure["is_rlfb_error"]  # the CLI prints it as one line
    seconds = failure["failed_at"] - reports[killed]["killed_at"]
    assert 0 < seconds < min(EXIT_WITHIN_S, HEARTBEAT_SILENCE_S + 10)  # measured: 1 s (rank 0 killed), 5-6 s (1)

    (run_dir,) = (tmp_path / "killed").iterdir()
    if survivor == 0:  # rank 0 owns the run directory: it marks the failure, naming the rank
        assert f"rank {killed} of 2 died" in json.loads((run_dir / FAILED_FILE).read_text())["error"]
    resumed = launch(tmp_path, tiny_model_dir, f"resume {run_dir}")
    assert [report["step"] for report in resumed] == [5, 5]
    assert not (run_dir / FAILED_FILE).exists()
    assert reproducible(read_metrics(run_dir)) == reproducible(read_metrics(Path(failure["straight"])))


@pytest.mark.slow
def test_under_torchrun_a_killed_rank_ends_rank_0_with_the_line_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """torchrun's agent SIGTERMs the survivors at once; rank 0 still prints rlfb's line and marks FAILED."""
    psutil = pytest.importorskip("psutil")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config(tiny_model_dir, tmp_path / "runs", "budget.updates=500", "budget.num_envs=8",
                                       "checkpoint.every=2", "eval.num_prompts=0").to_yaml())
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "rlfb", "train", str(config_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "runs").glob("*/checkpoints/step_*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        (rank_1,) = [child for child in psutil.Process(launcher.pid).children(recursive=True)
                     if child.environ().get("RANK") == "1"]
        killed_at = time.monotonic()
        rank_1.kill()
        _, stderr = launcher.communicate(timeout=EXIT_WITHIN_S)
    finally:
        launcher.kill()
    assert time.monotonic() - killed_at < EXIT_WITHIN_S
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("rlfb train: error:")]
    assert len(lines) == 1 and lines[0].startswith("rlfb train: error: rank 1 of 2 died or hung"), stderr[-2000:]
    assert "exitcode  : -9" in stderr  # torchrun's own report names the root cause too
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "rank 1 of 2 died" in json.loads((run_dir / FAILED_FILE).read_text())["error"]
