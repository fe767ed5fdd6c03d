"""rlfb.distributed on 2 gloo ranks: reductions equal the single-process computation over the joined batch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlfb import distributed
from rlfb.distributed import (
    HEARTBEAT_SILENCE_S,
    DistributedContext,
    RankFailure,
    agree,
    all_reduce_gradients,
    global_masked_moments,
    rank_seed,
    token_shares,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rank_values(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's share: different values and a different number of masked-in elements per rank."""
    generator = torch.Generator().manual_seed(rank)
    values = torch.randn(3, 5, generator=generator)
    mask = (torch.rand(3, 5, generator=generator) > 0.3 + 0.2 * rank).float()
    return values, mask


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = distributed.init_from_environment("auto", timeout_s=30)  # a config's default device: gloo on CPU
    values, mask = rank_values(rank)
    # Two pairs in the same all-reduces: the masked values, and every value of the first row doubled.
    moments = global_masked_moments([(values, mask), (2 * values[0], torch.ones_like(values[0]))])
    (mean, variance), (row_mean, row_variance) = moments
    # A gradient that differs by rank; rank 1 leaves one parameter without a gradient (counts as zero).
    weights = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))]
    (weights[0].sum() * (rank + 1) + (weights[1].sum() * 5 if rank == 0 else 0)).backward()
    riders = all_reduce_gradients(weights, riders=torch.tensor([float(rank), 4.0 * rank]))
    shares = token_shares([mask, mask[:1]])
    result = {"context": (context.rank, context.world_size, context.backend, context.is_main),
              "mean": mean, "variance": variance, "row_moments": (row_mean, row_variance), "grads": [weight.grad for weight in weights], "riders": riders,
              "shares": shares,
              "metrics": distributed.mean_across_ranks({"b": float(rank), "a": 10.0 * rank}),
              "agree_one": agree(rank == 1), "agree_none": agree(False)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_reduce_like_one_process_over_the_joined_batch(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [result["context"] for result in results] == [(0, 2, "gloo", True), (1, 2, "gloo", False)]
    joined_values = torch.cat([rank_values(rank)[0] for rank in range(2)])
    joined_mask = torch.cat([rank_values(rank)[1] for rank in range(2)]).bool()
    expected = joined_values[joined_mask]
    for result in results:
        torch.testing.assert_close(result["mean"], expected.mean(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result["variance"], expected.var(unbiased=False), atol=1e-6, rtol=1e-6)
        rows = 2 * torch.cat([rank_values(rank)[0][0] for rank in range(2)])
        torch.testing.assert_close(result["row_moments"], (rows.mean(), rows.var(unbiased=False)), atol=1e-6, rtol=1e-6)
        # d/dw of sum(w) * (r + 1), averaged over r = 0, 1: 1.5; the second parameter: (5 + 0) / 2.
        torch.testing.assert_close(result["grads"][0], torch.full((2, 2), 1.5))
        torch.testing.assert_close(result["grads"][1], torch.full((3,), 2.5))
        assert result["metrics"] == {"a": 5.0, "b": 0.5}
        torch.testing.assert_close(result["riders"], torch.tensor([0.5, 2.0]))  # averaged with the gradients
    # N_r * W / N: each rank's share of each mask's elements, times 2 ranks (the whole mask, its first row).
    counts = [[float(rank_values(rank)[1].sum()), float(rank_values(rank)[1][:1].sum())] for rank in range(2)]
    for rank, result in enumerate(results):
        expected_shares = [counts[rank][k] * 2 / (counts[0][k] + counts[1][k]) for k in range(2)]
        torch.testing.assert_close(result["shares"], torch.tensor(expected_shares))
        assert result["agree_one"] is True and result["agree_none"] is False


def nonfinite_worker(rank: int, port: int, out_dir: str) -> None:
    """Step 1: rank 1's loss is NaN, rank 0's finite; step 2: both finite (the ranks must still be in step)."""
    from rlfb.agents.base import GradientStepper

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_environment("cpu", timeout_s=30)
    weight = torch.nn.Parameter(torch.ones(3))
    stepper = GradientStepper([weight], learning_rate=0.1)
    taken = []
    for loss_scale in (float("nan") if rank == 1 else 1.0, 1.0):
        finite_here = stepper.backward(weight.sum() * loss_scale)
        with pytest.warns(RuntimeWarning, match="another rank") if len(taken) == 0 else contextlib.nullcontext():
            taken.append((finite_here, stepper.step(riders=torch.tensor([float(rank)]))))
        taken.append(weight.detach().clone())
        taken.append(stepper.averaged_riders)
    torch.save(taken, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(nonfinite_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, (first, weight_after_first, riders_first, second, weight_after_second, _) in enumerate(results):
        assert first == (rank == 0, False)  # rank 1's loss was NaN: neither rank steps
        torch.testing.assert_close(weight_after_first, torch.ones(3))
        torch.testing.assert_close(riders_first, torch.tensor([0.5]))  # the riders still averaged
        assert second == (True, True)  # the next step, finite on both, is taken together
        assert bool((weight_after_second < 1.0).all())
    torch.testing.assert_close(results[0][4], results[1][4])


def test_one_process_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_environment("cpu") == DistributedContext.single()
    values, mask = rank_values(0)
    ((mean, variance),) = global_masked_moments([(values, mask)])
    torch.testing.assert_close(mean, values[mask.bool()].mean())
    torch.testing.assert_close(variance, values[mask.bool()].var(unbiased=False))
    assert agree(True) and not agree(False)
    assert token_shares([mask]) is None
    riders = torch.tensor([1.0, 2.0])
    assert all_reduce_gradients([torch.nn.Parameter(torch.ones(2))], riders) is riders
    assert [rank_seed(5, rank) for rank in range(3)] == [5, 5 + 1_000_003, 5 + 2_000_006]


def test_an_incomplete_launch_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT is not set; launch with torchrun"):
        distributed.init_from_environment("cpu")


def stalling_worker(rank: int, port: int, stall: str, out_dir: str, timeout_s: float = 3,
                    waits_in: str = "agree") -> None:
    """Rank 1 stalls before its second collective: ``stopped`` (SIGSTOP: it hangs, heartbeat and all),
    ``slow`` (alive, past the collective timeout) or ``busy`` (alive, 2 x HEARTBEAT_SILENCE_S, within the
    timeout: rank 0 evaluating alone, say); rank 0 reports the error it stopped with, or that it went on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    distributed.init_from_environment("cpu", timeout_s=timeout_s)
    agree(False)
    if rank == 1:
        (Path(out_dir) / "stalled_at").write_text(str(time.time()))
        if stall == "stopped":
            os.kill(os.getpid(), signal.SIGSTOP)
        if stall == "busy":
            time.sleep(2 * HEARTBEAT_SILENCE_S)
            agree(True)
            os._exit(0)
        time.sleep(timeout_s + HEARTBEAT_SILENCE_S + 5)
        os._exit(0)
    try:
        agreed = agree(False) if waits_in == "agree" else distributed.gather_objects(0)
    except RankFailure as failure:
        (Path(out_dir) / "rank0.json").write_text(json.dumps({"error": str(failure), "failed_at": time.time()}))
    else:
        (Path(out_dir) / "rank0.json").write_text(json.dumps({"agreed": agreed, "returned_at": time.time()}))
    os._exit(0)


def run_stalling_ranks(tmp_path: Path, stall: str, timeout_s: float, waits_in: str = "agree") -> tuple[dict, float]:
    """Rank 0's report, and the seconds from rank 1's stall to rank 0's failure (or return)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=stalling_worker, args=(rank, port, stall, str(tmp_path), timeout_s,
                                                                     waits_in))
                 for rank in range(2)]
    for process in processes:
        process.start()
    processes[0].join(timeout=90)
    for process in processes:
        process.kill()  # a stopped process ends on SIGKILL
    report = json.loads((tmp_path / "rank0.json").read_text())
    ended = report.get("failed_at", report.get("returned_at"))
    return report, ended - float((tmp_path / "stalled_at").read_text())


@pytest.mark.parametrize(("stall", "message"), [
    ("stopped", "rank 1 of 2 died or hung (no heartbeat for 5 s) while rank 0 waited in all_reduce (agreed decision); "
                "every rank stops"),
    ("slow", "every rank is alive but all_reduce (agreed decision) failed on rank 0 of 2 ("),
])
def test_a_hung_or_slow_rank_ends_the_others_collective_at_the_timeout_with_a_line_saying_which(
        tmp_path: Path, stall: str, message: str) -> None:
    report, seconds = run_stalling_ranks(tmp_path, stall, timeout_s=3)
    assert report["error"].startswith(message)
    # The 3 s timeout, or HEARTBEAT_SILENCE_S of a still heartbeat (and a loaded machine's delays).
    assert min(3, HEARTBEAT_SILENCE_S) <= seconds < 3 + HEARTBEAT_SILENCE_S + 10
    if stall == "slow":
        assert "a rank spent longer than the 3 s collective timeout between two collectives" in report["error"]


def test_a_stopped_rank_is_named_long_before_the_collective_timeout_and_a_busy_one_is_waited_for(
        tmp_path: Path) -> None:
    """The others' wait watches the heartbeats: a rank whose process stopped is named after about
    HEARTBEAT_SILENCE_S, not after the 60 s timeout; a live rank that takes twice that is waited for."""
    report, seconds = run_stalling_ranks(tmp_path / "stopped", "stopped", timeout_s=60)
    assert report["error"].startswith("rank 1 of 2 died or hung (no heartbeat for 5 s) while rank 0 waited in "
                                      "all_reduce (agreed decision)")
    assert HEARTBEAT_SILENCE_S <= seconds < HEARTBEAT_SILENCE_S + 10
    report, seconds = run_stalling_ranks(tmp_path / "busy", "busy", timeout_s=60)
    assert report.get("agreed") is True, report
    assert seconds >= 2 * HEARTBEAT_SILENCE_S
    # An object collective (pickles, no slices to wait in) is preceded by a watched barrier.
    report, seconds = run_stalling_ranks(tmp_path / "gather", "stopped", timeout_s=60, waits_in="gather")
    assert report["error"].startswith("rank 1 of 2 died or hung (no heartbeat for 5 s) while rank 0 waited in "
                                      "all_gather_object")
    assert HEARTBEAT_SILENCE_S <= seconds < HEARTBEAT_SILENCE_S + 10