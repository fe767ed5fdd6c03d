"""Measure the evolution-strategies agent's targets on the built-in model (issue 13, item 1).

    python benchmarks/es.py                       # everything below, seeds 0 and 1
    python benchmarks/es.py --only train --seeds 0 1 2
    python benchmarks/es.py --only memory
    python benchmarks/es.py --only scaling --population-sizes 10 20 40 --rounds 3
    python benchmarks/es.py --only train --seeds 0 --set agent.kl_coef=0.05   # a tuning run

Targets (2 CPU cores, rlfb-tiny, configs/sentiment_es.yaml):
    train    held-out VADER (task sentiment) from the base (~ -0.06) to >= 0.5 in <= 10 minutes, each seed,
             within the bounds of a policy worth claiming (as benchmarks/train_targets.py checks PPO's):
             held-out KL to the base <= 6 nats per completion at every evaluation, and a fluency drop
             (the base model's log-likelihood per token of the completions, before minus its lowest
             evaluation) <= 1 nat per token
    memory   peak resident memory of an ES run <= that of PPO on the same task (configs/sentiment_ppo.yaml)
    scaling  CPU seconds per update linear in the population size (three sizes; the ratio s / member is flat)

Every run is a fresh subprocess (``--one``), so its peak RSS (``ru_maxrss``) is its own; the wall time of a
run counts loading, the "before" and "after" evaluations and training. Timings depend on the machine's
load: say what else was running next to the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ES_CONFIG = "configs/sentiment_es.yaml"
PPO_CONFIG = "configs/sentiment_ppo.yaml"
TARGET_AFTER, TARGET_MINUTES = 0.5, 10.0
MAX_KL, MAX_FLUENCY_DROP = 6.0, 1.0  # nats per completion (2 x PPO's target of 3); nats per token
MEMORY_UPDATES = 20  # updates of the memory runs: the peak is reached in the first update of either agent
SCALING_UPDATES = 5  # updates per run of the scaling measure (the first is left out: warm-up)


def run_one(config_path: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Train in this process; the measures as a dict (held-out sentiment before/after, wall time, peak RSS)."""
    import tempfile

    from rlfb.cpu_threads import configure_threads

    configure_threads(None)  # as rlfb train does, before torch is imported
    from rlfb.config import load_config
    from rlfb.logging import read_metrics
    from rlfb.trainer import Trainer

    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(ROOT / config_path, [f"seed={seed}", f"output_dir={output_dir}",
                                                 "logging.progress_bar=false", "logging.tensorboard=false",
                                                 *overrides])
        configure_threads(config.threads)
        update_ends = [time.process_time()]  # this process's CPU seconds at the start and after each update

        def mark(step: int, metrics: dict[str, float]) -> None:
            update_ends.append(time.process_time())

        started = time.perf_counter()
        result = Trainer(config, callbacks=[mark]).train()
        wall_s = time.perf_counter() - started
        rows = read_metrics(result.run_dir)
    update_s = [row["time/rollout_s"] + row["time/update_s"] for row in rows if "time/rollout_s" in row]
    update_cpu_s = [end - start for start, end in zip(update_ends[1:-1], update_ends[2:], strict=True)]
    measures: dict[str, Any] = {"config": config_path, "seed": seed, "overrides": overrides, "wall_s": wall_s,
                                "updates": result.step, "update_s": update_s, "update_cpu_s": update_cpu_s,
                                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if result.before is not None and result.after is not None:
        measures["before"] = result.before.metrics()["eval/reward/sentiment"]
        measures["after"] = result.after.metrics()["eval/reward/sentiment"]
        measures["kl_after"] = result.after.kl
        evaluations = [row for row in rows if "eval/kl" in row]  # every evaluation, "before" and "after" included
        measures["max_eval_kl"] = max(row["eval/kl"] for row in evaluations)
        measures["fluency_drop"] = result.before.fluency - min(row["eval/fluency"] for row in evaluations)
        measures["curve"] = [(row["step"], row["eval/reward/sentiment"], row["eval/kl"], row["eval/fluency"])
                             for row in evaluations]
    return measures


def in_subprocess(config_path: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """:func:`run_one` in a fresh interpreter (its own peak memory), same Python and CPU affinity."""
    command = [sys.executable, __file__, "--one", config_path, "--seed", str(seed), "--", *overrides]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def train_target(seeds: list[int], overrides: list[str]) -> bool:
    runs = [in_subprocess(ES_CONFIG, seed, overrides) for seed in seeds]
    for run in runs:
        print(f"seed {run['seed']}: held-out sentiment {run['before']:+.3f} -> {run['after']:+.3f} "
              f"(KL {run['kl_after']:.2f} nats, largest {run['max_eval_kl']:.2f}; fluency drop "
              f"{run['fluency_drop']:.2f} nats/token), {run['updates']} updates, {run['wall_s'] / 60:.1f} min wall, "
              f"peak RSS {run['peak_rss_mb']:.0f} MB")
        print("    update, VADER, KL, fluency: " + "; ".join(f"{step} {vader:+.3f} {kl:.2f} {fluency:.2f}"
                                                           for step, vader, kl, fluency in run["curve"]))
    after = [run["after"] for run in runs]
    spread = statistics.stdev(after) if len(after) > 1 else 0.0
    met = all(run["after"] >= TARGET_AFTER and run["wall_s"] <= TARGET_MINUTES * 60 and run["max_eval_kl"] <= MAX_KL
              and run["fluency_drop"] <= MAX_FLUENCY_DROP for run in runs)
    print(f"after: {statistics.mean(after):.3f} +- {spread:.3f} over {len(runs)} seeds; target >= {TARGET_AFTER} "
          f"in <= {TARGET_MINUTES:.0f} min, KL <= {MAX_KL:.0f} nats and fluency drop <= {MAX_FLUENCY_DROP:.0f} "
          f"nat/token on every seed: {'met' if met else 'NOT met'}")
    return met


def memory_target() -> bool:
    short = [f"budget.updates={MEMORY_UPDATES}", "eval.every=0", "checkpoint.every=0"]
    es = in_subprocess(ES_CONFIG, 0, short)
    ppo = in_subprocess(PPO_CONFIG, 0, short)
    met = es["peak_rss_mb"] <= ppo["peak_rss_mb"]
    print(f"peak RSS over {MEMORY_UPDATES} updates: ES {es['peak_rss_mb']:.0f} MB, PPO {ppo['peak_rss_mb']:.0f} MB "
          f"(ES / PPO = {es['peak_rss_mb'] / ppo['peak_rss_mb']:.2f}); target ES <= PPO: {'met' if met else 'NOT met'}")
    return met


def linear_fit(sizes: list[float], seconds: list[float]) -> tuple[float, float, float]:
    """Least squares seconds = a + b * N: (a, b, R^2).

    Example:
        >>> [round(value, 6) for value in linear_fit([10, 20, 40], [1.5, 2.5, 4.5])]
        [0.5, 0.1, 1.0]
    """
    mean_n, mean_s = statistics.mean(sizes), statistics.mean(seconds)
    slope = (sum((n - mean_n) * (t - mean_s) for n, t in zip(sizes, seconds, strict=True))
             / sum((n - mean_n) ** 2 for n in sizes))
    intercept = mean_s - slope * mean_n
    residual = sum((t - intercept - slope * n) ** 2 for n, t in zip(sizes, seconds, strict=True))
    total = sum((t - mean_s) ** 2 for t in seconds)
    return intercept, slope, 1.0 - residual / total if total else 1.0


def scaling_target(population_sizes: list[int], rounds: int) -> bool:
    """Seconds per update at each population size, the sizes taking turns in ``rounds`` rounds.

    The figure is CPU seconds of the one-thread training process per update (``time.process_time`` between
    the trainer's update callbacks; updates 2 and later, the first being warm-up): on a machine other
    processes load, wall time per update swings 3-5x within minutes, CPU time much less. Wall seconds are
    printed beside it. Each size's figure is the median over every timed update of its rounds.
    """
    cpu: dict[int, list[float]] = {size: [] for size in population_sizes}
    wall: dict[int, list[float]] = {size: [] for size in population_sizes}
    for _ in range(rounds):
        for size in population_sizes:
            run = in_subprocess(ES_CONFIG, 0, [f"agent.population_size={size}", f"budget.updates={SCALING_UPDATES}",
                                               "eval.num_prompts=0", "eval.every=0", "checkpoint.every=0"])
            cpu[size] += run["update_cpu_s"]
            wall[size] += run["update_s"][1:]
    seconds = [statistics.median(cpu[size]) for size in population_sizes]
    for size, median in zip(population_sizes, seconds, strict=True):
        print(f"population {size:3d}: {median:.3f} CPU s per update (median of {len(cpu[size])} updates over "
              f"{rounds} rounds; wall {statistics.median(wall[size]):.2f} s), {1000 * median / size:.1f} ms per member")
    intercept, slope, r_squared = linear_fit([float(size) for size in population_sizes], seconds)
    per_member = [median / size for size, median in zip(population_sizes, seconds, strict=True)]
    spread = max(per_member) / min(per_member)
    met = spread <= 1.5
    print(f"fit: CPU s per update = {intercept:.3f} + {slope:.4f} x N (R^2 {r_squared:.4f}); largest / smallest "
          f"time per member: {spread:.2f} (linear: ~1; target <= 1.5): {'met' if met else 'NOT met'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "memory", "scaling"], action="append")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--population-sizes", type=int, nargs=3, default=[10, 20, 40])
    parser.add_argument("--rounds", type=int, default=3, help="scaling: rounds in which the sizes take turns")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of configs/sentiment_es.yaml in the train runs (as rlfb train --set)")
    parser.add_argument("--one", metavar="CONFIG", help=argparse.SUPPRESS)  # one run in this process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seed, args.overrides)))
        return 0
    parts = args.only or ["train", "memory", "scaling"]
    results = []
    if "train" in parts:
        results.append(train_target(args.seeds, args.settings))
    if "memory" in parts:
        results.append(memory_target())
    if "scaling" in parts:
        results.append(scaling_target(args.population_sizes, args.rounds))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
