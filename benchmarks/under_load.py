"""Time per update of ``rlfb train configs/sentiment_ppo.yaml`` on a quiet machine and on a busy one.

"Busy" means one CPU-bound process per core (``--busy``, default: as many as there are cores), started
by this script: plain Python busy loops (``--load python``) or one-thread torch matrix products
(``--load torch``). Each thread setting trains a short budget (``--updates``, capped at
``--time-limit`` seconds of training) quiet, then busy, then quiet again..., the sides taking turns
(``--rounds``) so that a change in the machine's background load hits both. The time per update is the
median over the run's updates (after ``--warmup`` of them) of ``time/rollout_s + time/update_s`` from
its metrics.jsonl, so model loading and evaluation do not count.

Settings compared (``--settings``):

* ``rlfb``: the shipped defaults, ``threads: 1`` and OpenMP's ``PASSIVE`` wait policy;
* ``torch-threads``: ``threads: null`` (torch's default, one per core), still ``PASSIVE``;
* ``torch-defaults``: ``threads: null`` and OpenMP's own wait policy (spin, then sleep): what rlfb
  did before it chose its threads.

Prints one row per setting: quiet and busy seconds per update and their ratio (target: at most 3).

Usage:
    nice -n 10 python benchmarks/under_load.py [--updates 40] [--rounds 1] [--load python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sentiment_ppo.yaml"

# Setting name -> (extra --set overrides, environment changes). An empty OMP_WAIT_POLICY is one rlfb
# leaves alone and OpenMP ignores, which gives OpenMP's own default.
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "rlfb": ([], {}),
    "torch-threads": (["threads=null"], {}),
    "torch-defaults": (["threads=null"], {"OMP_WAIT_POLICY": ""}),
}

LOADS = {
    "python": "while True:\n    pass\n",
    "torch": "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a\n",
}


@contextmanager
def busy_processes(count: int, load: str) -> Iterator[None]:
    """``count`` CPU-bound processes for the duration of the block, ended by their own handles."""
    processes = [subprocess.Popen([sys.executable, "-c", LOADS[load]]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them start (and torch import) before the measured run does
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def seconds_per_update(setting: str, updates: int, time_limit_s: float, warmup: int) -> tuple[float, int]:
    """(median seconds per update, updates done) of one short training run with ``setting``."""
    overrides, environment_changes = SETTINGS[setting]
    with tempfile.TemporaryDirectory(prefix="rlfb-under-load-") as output_dir:
        sets = [f"budget.updates={updates}", f"budget.time_limit_s={time_limit_s}", "eval.num_prompts=0",
                "checkpoint.every=0", "logging.progress_bar=false", "logging.tensorboard=false",
                "logging.samples_every=0", "device=cpu", f"output_dir={output_dir}", *overrides]
        command = [sys.executable, "-m", "rlfb", "train", str(CONFIG), *[p for s in sets for p in ("--set", s)]]
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
        environment.update(PYTHONPATH=str(REPO), **environment_changes)
        subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        (metrics_file,) = Path(output_dir).rglob("metrics.jsonl")
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    times = [row["time/rollout_s"] + row["time/update_s"] for row in rows if "time/update_s" in row]
    measured = times[warmup:] or times
    return statistics.median(measured), len(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=40, help="updates per run (default 40)")
    parser.add_argument("--time-limit", type=float, default=90.0,
                        help="cap on each run's training seconds (a slow setting on a busy machine stops early)")
    parser.add_argument("--warmup", type=int, default=3, help="first updates left out of the median")
    parser.add_argument("--rounds", type=int, default=1, help="quiet/busy pairs per setting")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    parser.add_argument("--load", choices=sorted(LOADS), default="python", help="what the busy processes run")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; busy side: "
          f"{args.busy} {args.load} processes; {args.updates} updates per run (cap {args.time_limit:g} s)")
    results: dict[str, dict[str, list[float]]] = {name: {"quiet": [], "busy": []} for name in args.settings}
    done: dict[str, dict[str, list[int]]] = {name: {"quiet": [], "busy": []} for name in args.settings}
    for round_index in range(args.rounds):
        for setting in args.settings:
            for side in ("quiet", "busy") if round_index % 2 == 0 else ("busy", "quiet"):
                if side == "busy":
                    with busy_processes(args.busy, args.load):
                        seconds, count = seconds_per_update(setting, args.updates, args.time_limit, args.warmup)
                else:
                    seconds, count = seconds_per_update(setting, args.updates, args.time_limit, args.warmup)
                results[setting][side].append(seconds)
                done[setting][side].append(count)
                print(f"  round {round_index + 1} {setting:<15} {side:<5}: {seconds:.3f} s/update "
                      f"({count} updates)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("setting | quiet s/update | busy s/update | busy / quiet | updates done (quiet, busy)")
    for setting in args.settings:
        quiet, busy = (statistics.median(results[setting][side]) for side in ("quiet", "busy"))
        counts = f"{min(done[setting]['quiet'])}, {min(done[setting]['busy'])}"
        print(f"{setting} | {quiet:.3f} | {busy:.3f} | {busy / quiet:.1f}x | {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
