"""Data-parallel training: completions per second of N ranks against one, PPO, GRPO and ES (issue 16).

    python benchmarks/distributed.py --updates 30 --rounds 2

Each run is ``torchrun --standalone --nproc-per-node N -m rlfb train CONFIG`` with one thread per rank, no
evaluation and no checkpoints, ``--updates`` updates, and the same work per rank as the single process:
PPO and GRPO (configs/sentiment_ppo.yaml; GRPO in groups of 4) a global batch of ``--per-rank-envs`` x N,
ES (configs/sentiment_es.yaml) a population of ``--per-rank-members`` x N members, each on a batch of
``--per-rank-envs`` / ``--per-rank-members`` completions (the ranks split the population). Completions
per second are measured from the run's ``metrics.jsonl`` (``time/elapsed_s``: the training time of rank 0,
rollouts and updates, after the first update, which is warm-up); ``time/collective_s`` gives the share of
that time the ranks spent in collectives (transfers and waiting for the slower rank). The sides take
turns, ``--rounds`` times; the median is reported, with the load average before and after.

``--independent`` also runs, each round, ``--ranks`` single processes of one rank's work at once (seeds
0, 1, ...; no process group, no collectives): their completions per second added up are what the machine
allows ``--ranks`` ranks, the ceiling of the ratio on a shared machine.

Target (issue 16, 2 CPU cores): 2 ranks reach at least 1.7x the completions per second of 1 rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
AGENTS = ("ppo", "grpo", "es")
TARGET = 1.7
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def agent_overrides(agent: str, ranks: int, args: argparse.Namespace) -> tuple[Path, list[str], int]:
    """The config, its overrides and the completions per update of ``agent`` on ``ranks`` ranks."""
    if agent == "es":
        members = args.per_rank_members * ranks
        per_member = args.per_rank_envs // args.per_rank_members
        return (CONFIGS / "sentiment_es.yaml",
                [f"agent.population_size={members}", f"budget.num_envs={per_member}"], members * per_member)
    overrides = [f"budget.num_envs={args.per_rank_envs * ranks}"]
    if agent == "grpo":
        overrides += ["agent.name=grpo", "budget.group_size=4"]
    return CONFIGS / "sentiment_ppo.yaml", overrides, args.per_rank_envs * ranks


def train_command(ranks: int, agent: str, args: argparse.Namespace, output_dir: Path,
                  launcher: bool = True, seed: int | None = None) -> list[str]:
    """``torchrun ... -m rlfb train`` on ``ranks`` ranks (``launcher``), or one plain process with one
    rank's work (and ``seed``)."""
    config, overrides, _ = agent_overrides(agent, ranks if launcher else 1, args)
    overrides += [f"budget.updates={args.updates}", "budget.time_limit_s=null", "eval.num_prompts=0",
                  "checkpoint.every=0", "threads=1", "logging.tensorboard=false", "logging.progress_bar=false",
                  f"output_dir={output_dir}"] + ([f"seed={seed}"] if seed is not None else [])
    start = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if launcher else []
    return [sys.executable, *start, "-m", "rlfb", "train", str(config)] + [item for o in overrides
                                                                           for item in ("--set", o)]


def measured(output_dir: Path, completions_per_update: int) -> tuple[float, float]:
    """Completions per second after the first update of the run in ``output_dir``, and the share of that
    time spent in collectives."""
    (run_dir,) = [path for path in output_dir.iterdir() if path.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "time/elapsed_s" in row]
    seconds = rows[-1]["time/elapsed_s"] - rows[0]["time/elapsed_s"]
    waited = sum(row.get("time/collective_s", 0.0) for row in rows[1:])
    return (len(rows) - 1) * completions_per_update / seconds, waited / seconds


def run(ranks: int, agent: str, args: argparse.Namespace, output_dir: Path) -> tuple[float, float]:
    """One torchrun of ``ranks`` ranks: completions per second after the first update, and the share of
    that time spent in collectives."""
    subprocess.run(train_command(ranks, agent, args, output_dir), check=True, env=ENVIRONMENT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return measured(output_dir, agent_overrides(agent, ranks, args)[2])


def run_independent(ranks: int, agent: str, args: argparse.Namespace, output_dir: Path) -> float:
    """``ranks`` single-process runs of one rank's work at once (seeds 0, 1, ...; nothing shared, no
    collectives): their completions per second added up, what this machine allows ``ranks`` ranks."""
    directories = [output_dir / f"process-{index}" for index in range(ranks)]
    processes = []
    for index, directory in enumerate(directories):
        directory.mkdir()
        processes.append(subprocess.Popen(train_command(1, agent, args, directory, launcher=False, seed=index),
                                          env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for process in processes:
        _, error = process.communicate()
        if process.returncode:
            raise SystemExit(f"an independent run failed: {error.decode()[-2000:]}")
    return sum(measured(directory, agent_overrides(agent, 1, args)[2])[0] for directory in directories)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--per-rank-envs", type=int, default=32)
    parser.add_argument("--per-rank-members", type=int, default=4, help="ES members per rank")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--independent", action="store_true",
                        help="also run --ranks independent single processes at once each round: the machine's "
                             "ceiling for --ranks ranks, with no collectives")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rates: dict[tuple[str, int], list[float]] = {}
    waits: dict[str, list[float]] = {}
    ceilings: dict[str, list[float]] = {}  # --independent: N single processes at once
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for agent in args.agents:
                for ranks in (1, args.ranks):
                    output_dir = Path(scratch) / f"{agent}-{ranks}-{round_index}"
                    output_dir.mkdir()
                    rate, waited = run(ranks, agent, args, output_dir)
                    rates.setdefault((agent, ranks), []).append(rate)
                    if ranks > 1:
                        waits.setdefault(agent, []).append(waited)
                    print(f"round {round_index + 1} {agent} {ranks} rank(s): {rate:.1f} completions/s, "
                          f"{waited:.0%} of the time in collectives (load {os.getloadavg()[0]:.1f})", flush=True)
                if args.independent:
                    output_dir = Path(scratch) / f"{agent}-independent-{round_index}"
                    output_dir.mkdir()
                    rate = run_independent(args.ranks, agent, args, output_dir)
                    one = rates[(agent, 1)][-1]
                    ceilings.setdefault(agent, []).append(rate)
                    print(f"round {round_index + 1} {agent} {args.ranks} independent processes: {rate:.1f} "
                          f"completions/s in all, {rate / one:.2f}x the 1-rank run (load {os.getloadavg()[0]:.1f})",
                          flush=True)
    print(f"\n{args.updates} updates, {args.per_rank_envs} completions per rank per update, one thread per rank; "
          f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    for agent in args.agents:
        one = statistics.median(rates[(agent, 1)])
        many = statistics.median(rates[(agent, args.ranks)])
        verdict = "met" if many / one >= TARGET else "NOT met"
        print(f"{agent}: 1 rank {one:.1f}/s, {args.ranks} ranks {many:.1f}/s: {many / one:.2f}x "
              f"(target >= {TARGET}x: {verdict}); {args.ranks} ranks in collectives "
              f"{statistics.median(waits[agent]):.0%} of the time")
        if args.independent:
            ceiling = statistics.median(ceilings[agent])
            print(f"{agent}: {args.ranks} independent processes at once {ceiling:.1f}/s: {ceiling / one:.2f}x "
                  "(what this machine allows, with no collectives)")


if __name__ == "__main__":
    main()
