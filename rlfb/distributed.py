"""Ranks, reductions and agreed decisions over ``torch.distributed``, for data-parallel training.

rlfb runs one process per rank (``torchrun --nproc-per-node N -m rlfb train CONFIG``, or ``accelerate
launch``). Each rank collects its share of the batch and computes gradients on it; what is batch-wide by
definition is reduced across ranks here, so that N ranks with a batch of B/N each compute what one
process with a batch of B would:

* :func:`all_reduce_gradients` averages the trainable parameters' gradients (the LoRA and value-head
  parameters are a small fraction of the model, so one flat buffer per step is cheap);
* :func:`global_masked_moments` gives the means and variances of masked tensors over every rank's
  elements (advantage whitening, a batch's statistics), from two all-reduces of sums and counts;
* :func:`mean_across_ranks` averages logged scalars (a rank's metrics are means over its share);
* :func:`agree` turns per-rank stop wishes (time limit, Ctrl-C, a callback returning False) into one
  decision every rank takes, so that no rank waits forever in a collective another has left;
* :func:`rank_seed` derives each rank's seed from the run seed.

With one process (no process group), every function is the identity: single-process code pays nothing.
The process group is created by :func:`init_from_environment` from the variables torchrun and accelerate
set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL when
the device is CUDA.

A rank that dies must not leave the others waiting in a collective. Each rank beats a heartbeat (a
counter in the launcher's rendezvous store, bumped every ``HEARTBEAT_S`` by a daemon thread). A killed
rank's sockets close at once and the collective fails; on gloo, a collective that waits reads the other
ranks' counters every ``HEARTBEAT_S`` and gives up as soon as one stands still for ``HEARTBEAT_SILENCE_S``
(a rank stopped, or hung with its whole process); a rank alive but not arriving is waited for up to
``DEFAULT_TIMEOUT_S``. The ranks whose counter stays still are named in a one-line :class:`RankFailure`,
and every survivor stops with it.

Example:
    >>> import torch
    >>> context = DistributedContext.single()
    >>> context.world_size, context.is_main, rank_seed(7, context.rank)
    (1, True, 7)
    >>> mean_across_ranks({"loss": 2.0})
    {'loss': 2.0}
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlfb.errors import RlfbError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedContext",
    "RankFailure",
    "agree",
    "all_reduce_gradients",
    "average_across_ranks",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "gather_objects",
    "gather_rows",
    "global_masked_moments",
    "init_from_environment",
    "launcher_stop_failure",
    "mean_across_ranks",
    "pop_collective_seconds",
    "rank_seed",
    "token_shares",
    "world_size",
]

# A collective waits this long for a rank that is alive (its heartbeat going) but has not arrived: rank 0
# evaluating or checkpointing alone while the others wait can take minutes on a large model. A rank that dies
# or stops ends the wait much sooner: its connections close at once (gloo raises), or, on gloo, its heartbeat
# stands still for HEARTBEAT_SILENCE_S while the others wait (:func:`_await`).
DEFAULT_TIMEOUT_S = 600.0
# Each rank bumps its heartbeat this often (a store round trip: ~0.1 ms).
HEARTBEAT_S = 0.5
# A rank whose heartbeat stays still this long has died or hung: ten beats, so a loaded machine's
# scheduling delays never name a live rank. The survivors of a failed collective wait this long at most.
HEARTBEAT_SILENCE_S = 5.0
# Store round trips that fail in a row before a heartbeat stops beating, or a waiting rank gives the store up.
STORE_FAILURES = 3
# Large enough that rank r's seed never collides with another run seed's rank 0 for r < 1000 ranks.
_RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank, the number of ranks, and its device's local index."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @classmethod
    def single(cls) -> DistributedContext:
        """One process, no process group."""
        return cls(rank=0, world_size=1, local_rank=0, backend=None)

    @classmethod
    def current(cls) -> DistributedContext:
        """The initialized process group's view, or :meth:`single` when there is none."""
        if not active():
            return cls.single()
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=str(dist.get_backend()))

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the run directory, the logs and the checkpoints."""
        return self.rank == 0


class RankFailure(RlfbError, RuntimeError):
    """A collective failed because a rank died or hung (or, with every rank alive, timed out)."""


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks of the initialized process group (1 without one)."""
    return dist.get_world_size() if active() else 1


def launched_world_size() -> int:
    """The number of ranks the launcher asked for (``WORLD_SIZE``; 1 when not launched by one), torch-free to read."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    """Whether this process was started by a launcher of several ranks (torchrun, accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str | torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the process group the launcher described, if it described one; else stay single.

    The backend is NCCL for a CUDA device and gloo otherwise. Each CUDA rank takes the device of its
    ``LOCAL_RANK``.

    Raises:
        RuntimeError: The launcher's variables are incomplete (``MASTER_ADDR`` / ``MASTER_PORT`` missing).
    """
    if active():
        return DistributedContext.current()
    if not launched_distributed():
        return DistributedContext.single()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; launch "
                           "with torchrun --nproc-per-node N -m rlfb train CONFIG (or accelerate launch)")
    cuda = torch.cuda.is_available() if str(device) == "auto" else torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _Heartbeat.start(dist.get_rank(), dist.get_world_size(), timeout_s)
    return DistributedContext.current()


class _Heartbeat:
    """This rank's heartbeat in the rendezvous store (``MASTER_ADDR:MASTER_PORT``) and the others' readings.

    The store is the launcher's (torchrun's agent holds it, so it outlives any rank) or, launched by hand
    with the env variables, rank 0's process's. The beats go through a client of their own, with a short
    timeout, so that reading them never waits as long as a collective does.
    """

    current: _Heartbeat | None = None

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.store_held_by_rank_0 = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=HEARTBEAT_SILENCE_S), wait_for_workers=False)
        # A launcher that restarts the ranks keeps its store: each attempt beats under keys of its own.
        self.prefix = f"rlfb/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
                      f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.store.add(self.key(rank), 1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="rlfb-heartbeat", daemon=True)

    def stop(self) -> None:
        """End the beats and wait for the thread (at most one store timeout, if a beat is in flight)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=HEARTBEAT_SILENCE_S + 1)

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float) -> None:
        if world_size == 1:
            return
        cls.current = heartbeat = cls(rank, world_size, timeout_s)
        heartbeat.thread.start()
        # Stopped before the interpreter finalizes: a daemon thread caught inside the store's C++ client at
        # that moment is ended by pthread_exit, which aborts the process (SIGABRT, "terminate called without
        # an active exception"), seen when a rank exits while the store's server is going away.
        atexit.register(heartbeat.stop)

    def key(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def beat(self) -> None:
        """Bump this rank's counter every HEARTBEAT_S until stopped or the store goes away (the job is over)."""
        failures = 0  # in a row: one slow or failed round trip must not silence a live rank for good
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.store.add(self.key(self.rank), 1)
                failures = 0
            except RuntimeError:
                failures += 1
                if failures >= STORE_FAILURES:
                    return

    def readings(self) -> dict[int, int] | None:
        """Every other rank's counter now (one store round trip each); None when the store cannot be reached."""
        try:
            return {rank: self.store.add(self.key(rank), 0) for rank in range(self.world_size) if rank != self.rank}
        except RankFailure:  # raised by a SIGTERM while reading (see Trainer._graceful_interrupts): not the store's
            raise
        except RuntimeError:
            return None

    def silent_ranks(self) -> list[int] | None:
        """The other ranks whose counter did not move in HEARTBEAT_SILENCE_S (live ones move within a beat
        or two); None when the store cannot be reached."""
        first = self.readings()
        if first is None:
            return None
        deadline = time.monotonic() + HEARTBEAT_SILENCE_S
        silent = set(first)
        while silent and time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S / 2)
            now = self.readings()
            if now is None:
                return None
            silent = {rank for rank in silent if now[rank] == first[rank]}
        return sorted(silent)


def _failure_message(collective: str, error: BaseException | None, silent: list[int] | None = None) -> str:
    """One line: which ranks died or hung while this rank waited in ``collective``, read from their heartbeats
    (or given: ``silent``, the ranks :func:`_await` saw stand still; ``error`` None then)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cause = (str(error).splitlines()[0] if str(error) else type(error).__name__) if error is not None else "no reply"
    where = f"while rank {rank} waited in {collective}; every rank stops"
    heartbeat = _Heartbeat.current
    if heartbeat is None:  # a process group rlfb did not create: no heartbeats to read
        return f"{collective} failed on rank {rank} of {world} ({cause}); every rank stops"
    if error is not None:
        silent = heartbeat.silent_ranks()
    if silent:
        names = ", ".join(str(dead) for dead in silent)
        return f"rank {names} of {world} died or hung (no heartbeat for {HEARTBEAT_SILENCE_S:g} s) {where}"
    if silent is None and heartbeat.store_held_by_rank_0:
        return f"rank 0 of {world} died or hung (the rendezvous store it holds is unreachable) {where}"
    if silent is None:
        return f"the launcher's rendezvous store is unreachable ({cause}) {where}"
    return (f"every rank is alive but {collective} failed on rank {rank} of {world} ({cause}): a rank spent "
            f"longer than the {heartbeat.timeout_s:g} s collective timeout between two collectives; every rank "
            "stops")


_waited_s = 0.0  # seconds this rank spent in collectives since the last pop_collective_seconds()


def pop_collective_seconds() -> float:
    """Seconds this rank spent in collectives (transfers, and waiting for slower ranks) since the last call."""
    global _waited_s
    waited, _waited_s = _waited_s, 0.0
    return waited


def launcher_stop_failure() -> RankFailure:
    """The error of a rank its launcher stopped (SIGTERM: torchrun's agent stops every rank when one dies),
    naming the ranks whose heartbeat stopped, read for at most HEARTBEAT_SILENCE_S."""
    rank, world = dist.get_rank(), dist.get_world_size()
    heartbeat = _Heartbeat.current
    silent = heartbeat.silent_ranks() if heartbeat is not None else None
    where = f"the launcher stopped rank {rank} (SIGTERM); every rank stops"
    if silent:
        names = ", ".join(str(dead) for dead in silent)
        return RankFailure(f"rank {names} of {world} died or hung (no heartbeat for {HEARTBEAT_SILENCE_S:g} s) and "
                           f"{where}")
    return RankFailure(f"{where}, with every other rank's heartbeat going (a stop asked of the job, not a failed rank)")


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Run one collective, timed; turn its failure into a :class:`RankFailure` naming the ranks that died or
    hung."""
    global _waited_s
    started = time.perf_counter()
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as error:
        raise RankFailure(_failure_message(name, error)) from error
    finally:
        _waited_s += time.perf_counter() - started


def _await(work: Any, collective: str) -> None:
    """Wait for an asynchronous collective (``async_op=True``), watching the other ranks' heartbeats.

    On gloo the wait goes in slices of HEARTBEAT_S; after each slice still waiting, the other ranks'
    counters are read, and a rank whose counter stood still for HEARTBEAT_SILENCE_S (stopped, or hung with
    its whole process: its sockets stay open, so gloo itself would wait the full timeout) ends the wait with
    a :class:`RankFailure` naming it. A collective that completes within the first slice (nearly all of
    them) costs what a blocking one does. NCCL, or a process group without rlfb's heartbeats: a plain wait.
    """
    heartbeat = _Heartbeat.current
    if heartbeat is None or dist.get_backend() != "gloo":
        work.wait()
        return
    still_since: dict[int, tuple[int, float]] = {}  # rank -> (its counter, when it was first read so)
    store_failures = 0  # readings in a row that could not reach the store
    while True:
        try:
            work.wait(timeout=datetime.timedelta(seconds=HEARTBEAT_S))
            return
        except RankFailure:  # raised by a SIGTERM while waiting (see Trainer._graceful_interrupts)
            raise
        except RuntimeError:
            if work.is_completed():  # done since the slice ran out (then this returns), or failed (this raises:
                work.wait()  # a rank's connection closed, or gloo's own timeout)
                return
        readings, now = heartbeat.readings(), time.monotonic()
        if readings is None:  # the store is gone (with rank 0, which holds it when launched by hand)?
            store_failures += 1
            if store_failures >= STORE_FAILURES:
                raise RankFailure(_failure_message(collective, None, silent=None))
            continue
        store_failures = 0
        for rank, count in readings.items():
            if still_since.get(rank, (None, 0.0))[0] != count:
                still_since[rank] = (count, now)
        silent = sorted(rank for rank, (_, since) in still_since.items() if now - since >= HEARTBEAT_SILENCE_S)
        if silent:
            raise RankFailure(_failure_message(collective, None, silent=silent))


def _arrive(collective: str) -> None:
    """A watched barrier before a collective that cannot be waited for in slices (the object collectives):
    every rank arrives under :func:`_await`'s watch, so the collective itself then waits for no one."""
    _await(dist.barrier(async_op=True), collective)


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s seed: the run seed on rank 0 (so one process reproduces a single-process run), and
    seeds that differ between ranks (so ranks do not draw the same rollouts)."""
    return seed + rank * _RANK_SEED_STRIDE


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter],
                         riders: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients of ``parameters`` over the ranks, in place (one flat all-reduce).

    A parameter without a gradient on this rank counts as a zero gradient, so every rank reduces the
    same buffer shape. ``riders``, a 1-d tensor of statistics every rank holds, are averaged in the same
    all-reduce (a collective saved: each one waits for the slowest rank) and returned, in float64 when
    they are float64 (the gradients then reduced in float64 too), float32 otherwise; ``riders`` itself
    with one process.
    """
    if not active() or dist.get_world_size() == 1:
        return riders
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    grads = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters]
    # float64 when the riders are (statistics summed in float64 stay so; LoRA gradients are few numbers)
    dtype = torch.float64 if riders is not None and riders.dtype == torch.float64 else torch.float32
    pieces = [grad.reshape(-1).to(dtype) for grad in grads] + ([riders.detach().reshape(-1).to(dtype)]
                                                               if riders is not None else [])
    if not pieces:
        return riders
    flat = torch.cat(pieces)
    with _collective("all_reduce (gradients)"):
        _await(dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (gradients)")
    flat /= dist.get_world_size()
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        reduced = flat[offset:offset + count].view_as(parameter).to(parameter.dtype)
        if parameter.grad is None:
            parameter.grad = reduced.clone()
        else:
            parameter.grad.copy_(reduced)
        offset += count
    return flat[offset:] if riders is not None else None


def global_masked_moments(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mean and (biased) variance of each ``(values, mask)`` pair's ``values`` where its ``mask`` is 1,
    over every rank's elements.

    Two passes, as one process computes them (the mean, then the mean square deviation from it), each one
    all-reduce for every pair together: a batch's statistics cost two collectives, however many there are
    (each collective waits for the slowest rank). With one process exactly ``masked_mean(values, mask)``
    and ``masked_mean((values - mean) ** 2, mask)`` of rlfb/agents/base.py, in ``values``' dtype.
    """
    weights = [mask.to(values.dtype) for values, mask in pairs]
    totals = [(values * weight).sum() for (values, _), weight in zip(pairs, weights, strict=True)]
    counts = [weight.sum() for weight in weights]
    if world_size() > 1:
        sums = torch.stack(totals + counts).detach().double()
        with _collective("all_reduce (masked means)"):
            _await(dist.all_reduce(sums, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (masked means)")
        totals, counts = list(sums[: len(pairs)]), list(sums[len(pairs) :])
    means = [(total / count.clamp(min=1)).to(values.dtype)
             for total, count, (values, _) in zip(totals, counts, pairs, strict=True)]
    squares = [(((values - mean) ** 2) * weight).sum()
               for (values, _), mean, weight in zip(pairs, means, weights, strict=True)]
    if world_size() > 1:
        summed = torch.stack(squares).detach().double()
        with _collective("all_reduce (masked variances)"):
            _await(dist.all_reduce(summed, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (masked variances)")
        squares = list(summed)
    variances = [(square / count.clamp(min=1)).to(values.dtype)
                 for square, count, (values, _) in zip(squares, counts, pairs, strict=True)]
    return list(zip(means, variances, strict=True))


def mean_across_ranks(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each scalar averaged over the ranks that report it (key sets may differ between ranks).

    Keys come back in the order rank 0 reports them, then any only other ranks report. A value equal on
    every rank comes back unchanged (``(a + a) / 2 == a`` in floating point).
    """
    if world_size() == 1:
        return dict(metrics)
    reported = gather_objects({key: float(value) for key, value in metrics.items()})
    keys = list(dict.fromkeys(key for rank_metrics in reported for key in rank_metrics))
    averaged = {}
    for key in keys:
        values = [rank_metrics[key] for rank_metrics in reported if key in rank_metrics]
        averaged[key] = sum(values) / len(values)
    return averaged


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` with one process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    with _collective("all_gather_object"):
        _arrive("all_gather_object")
        dist.all_gather_object(gathered, value)
    return gathered


def gather_rows(rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row tensors (first dimension: this rank's rows) joined over the ranks in rank order, as the
    batch of one process would hold them; ``rows`` itself with one process."""
    if world_size() == 1:
        return dict(rows)
    gathered = gather_objects({key: value.detach().cpu() for key, value in rows.items()})
    return {key: torch.cat([rank_rows[key] for rank_rows in gathered]).to(value.device)
            for key, value in rows.items()}


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the run directory rank 0 created)."""
    if world_size() == 1:
        return value
    holder = [value]
    with _collective("broadcast_object_list"):
        _arrive("broadcast_object_list")
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of ``parameters`` to every rank (the trainable weights start identical)."""
    if world_size() == 1:
        return
    with torch.no_grad(), _collective("broadcast (parameters)"):
        for work in [dist.broadcast(parameter.data, src=0, async_op=True) for parameter in parameters]:
            _await(work, "broadcast (parameters)")


def average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged element-wise over the ranks (a new tensor); ``tensor`` itself with one process."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    with _collective("all_reduce (average)"):
        _await(dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (average)")
    return total / dist.get_world_size()


def token_shares(masks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Each of ``masks``' share of the batch's masked elements times the number of ranks, N_r,k * W / N_k
    (one per mask, e.g. per minibatch of an epoch), from one all-reduce of this rank's counts.

    A loss that is a masked mean over this rank's tokens, multiplied by its share, has gradients whose
    average over the ranks (what :func:`all_reduce_gradients` computes) is the gradient of the masked mean
    over every rank's tokens: (1/W) sum_r (N_r W / N) (g_r / N_r) = sum_r g_r / N, whatever the ranks' token
    counts. None with one process (nothing to scale).
    """
    if world_size() == 1:
        return None
    local = torch.stack([mask.sum() for mask in masks]).to(torch.float64)
    totals = local.clone()
    with _collective("all_reduce (token counts)"):
        _await(dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True), "all_reduce (token counts)")
    return (local * dist.get_world_size() / totals.clamp(min=1)).to(torch.float32)


def _collective_device() -> torch.device:
    """Where a tensor created for a collective must live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint); nothing with one process."""
    if world_size() > 1:
        with _collective("barrier"):
            _await(dist.barrier(async_op=True), "barrier")


def agree(wish: bool) -> bool:
    """True on every rank when any rank wishes it (a stop decision every rank takes together)."""
    if not active() or dist.get_world_size() == 1:
        return wish
    flag = torch.tensor([1.0 if wish else 0.0], device=_collective_device())
    with _collective("all_reduce (agreed decision)"):
        _await(dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), "all_reduce (agreed decision)")
    return bool(flag.item() > 0)
