"""How many CPU threads torch uses: chosen deliberately, not left to torch's defaults.

torch's defaults are one intra-op thread per core and OpenMP threads that spin (busy-wait) for a while
after each parallel region. On a machine whose cores other processes also use, that is the worst case:
each of rlfb's small matrix products is split across threads that wait for a core, and the spinning
threads take cores from the threads doing the work. A user saw PPO on the built-in model run 35x slower
with torch's default threads than with one thread on a busy 2-core machine.

rlfb therefore runs torch with ``threads`` intra-op threads (a run config key, :data:`DEFAULT_THREADS`
unless set) and with OpenMP's ``PASSIVE`` wait policy (threads sleep instead of spinning) unless the
user set ``OMP_WAIT_POLICY`` themselves. ``benchmarks/under_load.py`` measures the effect.

The wait policy is read once, when the OpenMP runtime starts (when torch is imported), so
:func:`configure_threads` must run before the first ``import torch`` to set it; the CLI does so.

Example:
    >>> import os
    >>> configure_threads(None)  # torch's own thread count, OpenMP threads sleep when idle
    >>> os.environ["OMP_WAIT_POLICY"]
    'PASSIVE'
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# One thread: rlfb-tiny's matrices are too small for a second thread to pay much on an idle machine, and
# on a busy one extra threads multiply the time per update (benchmarks/under_load.py measures both).
# A larger model on an idle many-core machine wants more: `--set threads=N` or `threads: null`.
DEFAULT_THREADS = 1

_WAIT_POLICY = "PASSIVE"


def configure_threads(threads: int | None) -> None:
    """Use ``threads`` torch intra-op threads (None: torch's default) and a sleeping OpenMP wait policy.

    Before torch is imported this only sets environment variables (``OMP_NUM_THREADS``, read by torch
    on import), so calling it keeps a command's start fast; afterwards it calls ``torch.set_num_threads``.

    Args:
        threads: Intra-op threads, >= 1, or None to leave torch's default (which honours a user's
            ``OMP_NUM_THREADS``).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", _WAIT_POLICY)
    if threads is None:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """``count`` torch intra-op threads inside the block (None: as they are), the previous count restored after.

    For library functions whose results must not depend on the caller's thread count (a float reduction
    split over two threads rounds differently than over one). Before torch is imported it imports nothing
    and sets the count torch will start with, as :func:`configure_threads` does: a block that needs no
    torch (a rerun of a finished pipeline) stays fast.
    """
    if "torch" not in sys.modules:
        configure_threads(count)
        yield
        return
    torch = sys.modules["torch"]
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
