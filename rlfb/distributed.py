"""Ranks, reductions and agreed decisions over ``torch.distributed``, for data-parallel training.

rlfb runs one process per rank (``torchrun --nproc-per-node N -m rlfb train CONFIG``, or ``accelerate
launch``). Each rank collects its share of the batch and computes gradients on it; what is batch-wide by
definition is reduced across ranks here, so that N ranks with a batch of B/N each compute what one
process with a batch of B would:

* :func:`all_reduce_gradients` averages the trainable parameters' gradients (the LoRA and value-head
  parameters are a small fraction of the model, so one flat buffer per step is cheap);
* :func:`global_masked_mean_var` gives the mean and variance of a masked tensor over every rank's
  elements (advantage whitening, reward normalization), from all-reduced sums, counts and squares;
* :func:`mean_across_ranks` averages logged scalars (a rank's metrics are means over its share);
* :func:`agree` turns per-rank stop wishes (time limit, Ctrl-C, a callback returning False) into one
  decision every rank takes, so that no rank waits forever in a collective another has left;
* :func:`rank_seed` derives each rank's seed from the run seed.

With one process (no process group), every function is the identity: single-process code pays nothing.
The process group is created by :func:`init_from_environment` from the variables torchrun and accelerate
set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPU, NCCL when
the device is CUDA, with a timeout so that a dead rank ends the others' collectives with an error
instead of a hang.

Example:
    >>> import torch
    >>> context = DistributedContext.single()
    >>> context.world_size, context.is_main, rank_seed(7, context.rank)
    (1, True, 7)
    >>> mean_across_ranks({"loss": 2.0})
    {'loss': 2.0}
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedContext",
    "agree",
    "all_reduce_gradients",
    "global_masked_mean_var",
    "init_from_environment",
    "mean_across_ranks",
    "rank_seed",
]

# A collective that waits longer than this for a rank raises: a dead rank ends the job within a minute.
DEFAULT_TIMEOUT_S = 60.0
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


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (with more than one rank or not)."""
    return dist.is_available() and dist.is_initialized()


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
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext.current()


def rank_seed(seed: int, rank: int) -> int:
    """Rank ``rank``'s seed: the run seed on rank 0 (so one process reproduces a single-process run), and
    seeds that differ between ranks (so ranks do not draw the same rollouts)."""
    return seed + rank * _RANK_SEED_STRIDE


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over the ranks, in place (one flat all-reduce).

    A parameter without a gradient on this rank counts as a zero gradient, so every rank reduces the
    same buffer shape.
    """
    if not active() or dist.get_world_size() == 1:
        return
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not parameters:
        return
    grads = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters]
    flat = torch.cat([grad.reshape(-1).float() for grad in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
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


def global_masked_mean_var(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``values`` where ``mask`` is 1, over every rank's elements.

    With one process this is the masked mean and variance of ``values`` itself.
    """
    weights = mask.to(values.dtype)
    moments = torch.stack([(values * weights).sum(), (values * values * weights).sum(), weights.sum()]).double()
    if active() and dist.get_world_size() > 1:
        dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    total, squares, count = moments
    count = count.clamp(min=1.0)
    mean = total / count
    variance = (squares / count - mean * mean).clamp(min=0.0)
    return mean.to(values.dtype), variance.to(values.dtype)


def mean_across_ranks(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each scalar averaged over the ranks (the same keys on every rank, in any order)."""
    if not active() or dist.get_world_size() == 1 or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[key]) for key in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def agree(wish: bool) -> bool:
    """True on every rank when any rank wishes it (a stop decision every rank takes together)."""
    if not active() or dist.get_world_size() == 1:
        return wish
    flag = torch.tensor([1.0 if wish else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
