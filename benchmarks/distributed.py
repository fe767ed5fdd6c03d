"""Completions per second of data-parallel training: N ranks against 1, at the same batch per rank.

    python benchmarks/distributed.py                       # PPO and GRPO, 2 ranks vs 1, one thread each
    python benchmarks/distributed.py --agents grpo --updates 40 --rounds 2

Each side is a real ``torchrun --nproc-per-node N -m rlfb train`` of ``configs/sentiment_ppo.yaml`` (GRPO:
the same with ``agent.name=grpo`` and groups of 4) with ``threads: 1`` per rank, no evaluation and no
checkpoints, ``--updates`` updates; the global batch is ``--per-rank-envs`` x N, so every rank does the
same work as the single process. Completions per second are measured from the run's ``metrics.jsonl``
(``time/elapsed_s``: the training time of rank 0, rollouts and updates, after the first update, which is
warm-up). The sides take turns, ``--rounds`` times; the median is reported.

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

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sentiment_ppo.yaml"


def run(ranks: int, agent: str, args: argparse.Namespace, output_dir: Path) -> float:
    """One torchrun of ``ranks`` ranks; completions per second after the first update."""
    overrides = [f"budget.num_envs={args.per_rank_envs * ranks}", f"budget.updates={args.updates}",
                 "budget.time_limit_s=null", "eval.num_prompts=0", "checkpoint.every=0", "threads=1",
                 "logging.tensorboard=false", "logging.progress_bar=false", f"output_dir={output_dir}"]
    if agent == "grpo":
        overrides += ["agent.name=grpo", "budget.group_size=4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "rlfb", "train", str(args.config)] + [item for o in overrides for item in ("--set", o)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (run_dir,) = [path for path in output_dir.iterdir() if path.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [row["time/elapsed_s"] for row in rows if "time/elapsed_s" in row]
    completions = (len(elapsed) - 1) * args.per_rank_envs * ranks
    return completions / (elapsed[-1] - elapsed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--agents", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo"])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--per-rank-envs", type=int, default=32)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for agent in args.agents:
                for ranks in (1, args.ranks):
                    output_dir = Path(scratch) / f"{agent}-{ranks}-{round_index}"
                    output_dir.mkdir()
                    rate = run(ranks, agent, args, output_dir)
                    results.setdefault((agent, ranks), []).append(rate)
                    print(f"round {round_index + 1} {agent} {ranks} rank(s): {rate:.1f} completions/s", flush=True)
    print(f"\n{args.updates} updates, {args.per_rank_envs} completions per rank per update, one thread per rank")
    for agent in args.agents:
        one = statistics.median(results[(agent, 1)])
        many = statistics.median(results[(agent, args.ranks)])
        verdict = "met" if many / one >= 1.7 else "NOT met"
        print(f"{agent}: 1 rank {one:.1f}/s, {args.ranks} ranks {many:.1f}/s: {many / one:.2f}x (target >= 1.7x: {verdict})")


if __name__ == "__main__":
    main()
