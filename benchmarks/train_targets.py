"""Measure the training targets of the shipped configs: several seeds, mean and std.

    python benchmarks/train_targets.py                         # all three configs, seeds 0 1 2
    python benchmarks/train_targets.py configs/sentiment_ppo.yaml --seeds 0
    python benchmarks/train_targets.py configs/calculator_grpo.yaml --seeds 0 1 --jobs 2 --threads 1   # in parallel
    python benchmarks/train_targets.py configs/sentiment_ppo.yaml --minutes 20 --seeds 0   # stability run
    python benchmarks/train_targets.py configs/sentiment_ppo.yaml --stability-updates 4000 --seeds 0   # the same,
                                               # as a number of updates (what 20 quiet minutes fit): load-proof

For every run it prints the held-out evaluation before and after training (the config's first reward
component), the KL to the reference, distinct-2 relative to the base model, and wall time; then the mean
and std over seeds, and whether each target is met. ``--minutes M`` trains for M minutes whatever the
config's update budget and evaluates every ``--eval-every`` updates to check stability: the KL stays
within 2x the agent's target and the base model's log-likelihood per token (``eval/fluency``) never
falls more than 1 nat below its start. ``--stability-updates N`` is the same check over a fixed number of
updates, so that a loaded machine (fewer updates in M minutes) cannot make a run look steadier. A
stability run samples each held-out prompt ``--eval-completions`` times (default 6): the KL of single
completions has a heavy tail (roughly one in several thousand is a digit string over 100 nats from the base
model), so a mean over the 39 completions of one pass jumps by 3-4 nats when one of them is drawn, while
the policy has not moved (benchmarks/RESULTS.md). Runs use the config's ``threads`` key, as ``rlfb train``
does, unless ``--threads`` says otherwise.

Targets (on 2 CPU cores, the base model already built):
    sentiment_ppo        <= 5 min; sentiment >= 0.7; KL <= 4 nats; distinct-2 >= 0.6x the base model's
    sentiment_reinforce  <= 5 min; sentiment >= 0.6
    arithmetic_grpo      <= 10 min; exact-match accuracy +15 points or more
    calculator_grpo      <= 10 min; held-out exact match +20 points (tool use printed before and after)
    calculator_ppo       <= 10 min; the same with PPO
    guess_number_grpo    <= 10 min; share of games solved +30% relative
    reasoning_gym_grpo   <= 10 min; reasoning-gym's score +10 points (needs the reasoning-gym extra)

For a multi-turn config the measure is the share of held-out episodes the protocol ended with a success.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfb.cpu_threads import configure_threads

configure_threads(None)  # OpenMP's sleeping wait policy, as rlfb train sets it: before torch is imported

from rlfb.config import load_config  # noqa: E402
from rlfb.logging import read_metrics  # noqa: E402
from rlfb.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["configs/sentiment_ppo.yaml", "configs/sentiment_reinforce.yaml", "configs/arithmetic_grpo.yaml"]


@dataclass
class Target:
    """What one config must reach (None: not a target of that config)."""

    max_minutes: float
    min_after: float | None = None  # held-out mean of the main reward component after training
    min_gain: float | None = None  # after - before
    min_relative_gain: float | None = None  # (after - before) / before
    max_kl: float | None = None  # nats per completion
    min_distinct2_ratio: float | None = None  # distinct-2 after / before


TARGETS = {
    "sentiment_ppo": Target(max_minutes=5, min_after=0.7, max_kl=4.0, min_distinct2_ratio=0.6),
    "sentiment_reinforce": Target(max_minutes=5, min_after=0.6),
    "arithmetic_grpo": Target(max_minutes=10, min_gain=0.15),
    # Issue 12 (multi-turn), on rlfb-tiny-multiturn: held-out exact match (the calculator), games solved.
    "calculator_grpo": Target(max_minutes=10, min_gain=0.20),
    "calculator_ppo": Target(max_minutes=10, min_gain=0.20),
    "guess_number_grpo": Target(max_minutes=10, min_relative_gain=0.30),
    "reasoning_gym_grpo": Target(max_minutes=10, min_gain=0.10),
}


def run_once(config_path: str, seed: int, output_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one seed; return its measures."""
    config = load_config(ROOT / config_path if not Path(config_path).exists() else config_path,
                         [f"seed={seed}", f"output_dir={output_dir}", "logging.progress_bar=false",
                          "logging.tensorboard=false", *overrides])
    configure_threads(config.threads)
    started = time.perf_counter()
    result = Trainer(config).train()
    wall_s = time.perf_counter() - started
    assert result.before is not None and result.after is not None, "the config evaluates no prompts"
    rows = read_metrics(result.run_dir)
    train_kl = [row["train/kl"] for row in rows if "train/kl" in row]
    fluency = [row["eval/fluency"] for row in rows if "eval/fluency" in row]
    eval_kl = [row["eval/kl"] for row in rows if "eval/kl" in row]
    kl_target = config.agent.params.get("kl_target", 3.0)
    before, after = main_measure(config, result.before), main_measure(config, result.after)
    return {
        "before": before,
        "after": after,
        "gain": after - before,
        "relative_gain": (after - before) / before if before else float("nan"),
        # The share of held-out episodes that called a tool (NaN where the protocol has no tool).
        "tool_use_before": result.before.episodes.get("tool_use", float("nan")),
        "tool_use_after": result.after.episodes.get("tool_use", float("nan")),
        "kl": result.after.kl,
        # Undefined where completions are too short to have bigrams (arithmetic answers).
        "distinct2_ratio": (result.after.distinct_2 / result.before.distinct_2 if result.before.distinct_2
                            else float("nan")),
        "fluency_drop": result.before.fluency - min(fluency),
        "max_eval_kl": max(eval_kl),
        # A 10-update moving average: single batches of 32 are noisy, drift is what matters.
        "max_train_kl_avg10": max(_moving_average(train_kl, 10), default=float("nan")),
        "kl_target": float(kl_target) if kl_target is not None else float("nan"),
        "updates": result.step,
        "train_s": max((row["time/elapsed_s"] for row in rows if "time/elapsed_s" in row), default=float("nan")),
        "wall_s": wall_s,
        "run_dir": str(result.run_dir),
    }


def main_measure(config: Any, evaluation: Any) -> float:
    """The figure a config's target is about: the held-out mean of its first reward component, or for a
    multi-turn run the share of held-out episodes the protocol ended with a success (a right final answer,
    a solved game)."""
    if config.env.kind == "multi_turn":
        return evaluation.episodes["success_rate"]
    return evaluation.rewards[config.rewards[0].label or config.rewards[0].name]


def _moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[i - window:i]) / window for i in range(window, len(values) + 1)]


def summarize(name: str, runs: list[dict[str, Any]], target: Target | None, stability: bool) -> bool:
    keys = ["before", "after", "gain", "relative_gain", "tool_use_before", "tool_use_after", "kl",
            "distinct2_ratio", "fluency_drop", "max_eval_kl", "max_train_kl_avg10", "updates", "train_s", "wall_s"]
    print(f"\n== {name}: {len(runs)} seed(s)")
    for key in keys:
        values = [run[key] for run in runs]
        if any(math.isnan(value) for value in values):  # not measured for this config (a protocol without tools)
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = "  ".join(f"{value:.3f}" for value in values)
        print(f"{key:>20}: mean {statistics.mean(values):8.3f}  std {spread:7.3f}   seeds: {per_seed}")
    checks: list[tuple[str, bool]] = []
    mean = {key: statistics.mean(run[key] for run in runs) for key in keys}
    if stability:
        kl_target = runs[0]["kl_target"]
        checks.append((f"max eval KL {mean['max_eval_kl']:.2f} <= 2 x target {2 * kl_target:.1f}",
                       all(run["max_eval_kl"] <= 2 * kl_target for run in runs)))
        checks.append((f"max 10-update mean train KL {mean['max_train_kl_avg10']:.2f} <= {2 * kl_target:.1f}",
                       all(run["max_train_kl_avg10"] <= 2 * kl_target for run in runs)))
        checks.append((f"fluency drop {mean['fluency_drop']:.2f} <= 1 nat/token",
                       all(run["fluency_drop"] <= 1.0 for run in runs)))
    elif target is not None:
        checks.append((f"wall time {mean['wall_s'] / 60:.1f} min <= {target.max_minutes} min",
                       mean["wall_s"] <= target.max_minutes * 60))
        if target.min_after is not None:
            checks.append((f"after {mean['after']:.3f} >= {target.min_after}", mean["after"] >= target.min_after))
        if target.min_gain is not None:
            checks.append((f"gain {mean['gain']:.3f} >= {target.min_gain}", mean["gain"] >= target.min_gain))
        if target.min_relative_gain is not None:
            checks.append((f"relative gain {mean['relative_gain']:.1%} >= {target.min_relative_gain:.0%}",
                           mean["relative_gain"] >= target.min_relative_gain))
        if target.max_kl is not None:
            checks.append((f"KL {mean['kl']:.2f} <= {target.max_kl}", mean["kl"] <= target.max_kl))
        if target.min_distinct2_ratio is not None:
            checks.append((f"distinct-2 ratio {mean['distinct2_ratio']:.2f} >= {target.min_distinct2_ratio}",
                           mean["distinct2_ratio"] >= target.min_distinct2_ratio))
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")
    return all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="run configs (default: all three)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=None,
                        help="train this long whatever the update budget (stability run)")
    parser.add_argument("--stability-updates", type=int, default=None, metavar="N",
                        help="a stability run of N updates, whatever the time it takes (load-proof --minutes)")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="updates between evaluations of a stability run")
    parser.add_argument("--eval-completions", type=int, default=6, metavar="K",
                        help="completions per held-out prompt in a stability run's evaluations (default 6: "
                             "234 for the sentiment task's 39 openings; see the module docstring)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the config's `threads` key, as rlfb train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default=None, help="where runs go (default: a temporary directory)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds trained at a time, each in its own process (2 on 2 cores with threads=1)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    stability = args.minutes is not None or args.stability_updates is not None
    if args.minutes is not None and args.stability_updates is not None:
        parser.error("give --minutes or --stability-updates, not both")
    if args.minutes is not None:
        overrides += ["budget.updates=null", f"budget.time_limit_s={args.minutes * 60}"]
    if args.stability_updates is not None:
        overrides += [f"budget.updates={args.stability_updates}", "budget.time_limit_s=null"]
    if stability:
        overrides += [f"eval.every={args.eval_every}", f"eval.completions_per_prompt={args.eval_completions}",
                      "checkpoint.every=0"]
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="rlfb-bench-"))
    print(f"runs in {output_dir}; overrides {overrides}")
    all_ok = True
    for config_path in args.configs:
        name = Path(config_path).stem
        runs = []
        # spawn, not fork: each seed trains in a fresh interpreter, not in a copy of this one's torch state
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(run_once, *zip(*[(config_path, seed, output_dir, overrides) for seed in args.seeds],
                                              strict=True))
            for seed, measures in zip(args.seeds, results, strict=True):
                print(f"{name} seed {seed}: " + ", ".join(
                    f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in measures.items()), flush=True)
                runs.append(measures)
        all_ok &= summarize(name, runs, TARGETS.get(name), stability=stability)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
