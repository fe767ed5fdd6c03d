"""What ``rlfb bench`` writes: the per-design summary, the reward-hacking flag, results.md/.csv and plots.

Every run of the bench leaves an evaluation curve: one :class:`EvalPoint` per evaluation step, measured
on the same held-out prompts with the same sampling seed. This module turns the curves of all designs
and seeds into

* ``results.md``: one row per design, mean +- std over seeds of the final evaluation, and a flag;
* ``results.csv``: the same numbers, one column per mean and per std;
* ``runs.csv``: one row per design and seed (the raw numbers behind the means);
* ``gold_vs_step.png``: gold reward against training update, one line per design (std shaded);
* ``gold_vs_kl.png``: gold reward against KL to the reference, each design's path over training,
  its final point marked: the reward/KL frontier.

Reward hacking: a design is flagged when the reward it trains on rises from its first to its last
evaluation while the gold reward falls over the same span (both averaged over seeds first):

    hacking  <=>  design[-1] - design[0] > tolerance  and  gold[-1] - gold[0] < -tolerance

Example:
    >>> is_reward_hacking(design=[0.1, 0.5, 0.9], gold=[0.2, 0.1, 0.0])
    True
    >>> is_reward_hacking(design=[0.1, 0.5, 0.9], gold=[0.2, 0.4, 0.6])
    False
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Columns of the results, in order: (key in EvalPoint.values, heading in results.md).
MEASURES: tuple[tuple[str, str], ...] = (
    ("design_reward", "trained reward"),
    ("kl", "KL (nats)"),
    ("fluency", "fluency"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("completion_length", "length"),
)
HACKING_TOLERANCE = 0.0  # any rise of the trained reward together with any fall of the gold reward


@dataclass
class EvalPoint:
    """One held-out evaluation of one run: the update it followed and every measure by name."""

    step: int
    values: dict[str, float]


@dataclass
class RunRecord:
    """One trained design/seed: its evaluation curve and its training time."""

    design: str
    seed: int
    points: list[EvalPoint]
    train_seconds: float
    run_dir: str = ""

    @property
    def final(self) -> EvalPoint:
        return self.points[-1]


@dataclass
class DesignSummary:
    """A design's runs aggregated over seeds; ``curves`` maps a measure to (steps, mean, std)."""

    name: str
    seeds: list[int]
    final_mean: dict[str, float]
    final_std: dict[str, float]
    curves: dict[str, tuple[list[int], list[float], list[float]]]
    train_seconds: float
    hacking: bool
    gold_peak_drop: float = 0.0
    notes: list[str] = field(default_factory=list)


def is_reward_hacking(design: Sequence[float], gold: Sequence[float], tolerance: float = HACKING_TOLERANCE) -> bool:
    """True when the trained reward rose from first to last evaluation while the gold reward fell.

    Args:
        design: the design's own (trained) reward at each evaluation, in order.
        gold: the gold reward at the same evaluations.
        tolerance: changes no larger than this count as flat (evaluation noise).
    """
    if len(design) < 2 or len(gold) < 2:
        return False
    return (design[-1] - design[0]) > tolerance and (gold[-1] - gold[0]) < -tolerance


def summarize(runs: Sequence[RunRecord], gold_key: str) -> DesignSummary:
    """Aggregate the runs of one design (all seeds) into means, stds, curves and the hacking flag."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    keys = sorted({key for run in runs for point in run.points for key in point.values})
    steps = sorted(set.intersection(*({point.step for point in run.points} for run in runs)))
    # A time limit can end the seeds at different updates; their final evaluations still close the curve,
    # placed at the mean final update.
    final_steps = [run.final.step for run in runs]
    ragged_end = any(step not in steps for step in final_steps)
    curves = {}
    for key in keys:
        means, stds = [], []
        for step in steps:
            values = [_value_at(run, step, key) for run in runs]
            means.append(_nanmean(values))
            stds.append(_nanstd(values))
        curve_steps = list(steps)
        if ragged_end:
            finals = [run.final.values.get(key, math.nan) for run in runs]
            curve_steps.append(round(float(np.mean(final_steps))))
            means.append(_nanmean(finals))
            stds.append(_nanstd(finals))
        curves[key] = (curve_steps, means, stds)
    final_mean = {key: _nanmean([run.final.values.get(key, math.nan) for run in runs]) for key in keys}
    final_std = {key: _nanstd([run.final.values.get(key, math.nan) for run in runs]) for key in keys}
    gold_curve = curves.get(gold_key, ([], [], []))[1]
    hacking = is_reward_hacking(curves.get("design_reward", ([], [], []))[1], gold_curve)
    peak_drop = (max(gold_curve) - gold_curve[-1]) if gold_curve else 0.0
    return DesignSummary(name=runs[0].design, seeds=[run.seed for run in runs], final_mean=final_mean,
                         final_std=final_std, curves=curves,
                         train_seconds=float(np.mean([run.train_seconds for run in runs])),
                         hacking=hacking, gold_peak_drop=float(peak_drop))


def results_markdown(summaries: Sequence[DesignSummary], gold_keys: Sequence[str], title: str,
                     base: dict[str, float] | None = None, notes: Sequence[str] = ()) -> str:
    """``results.md``: one row per design, ``mean ± std`` over seeds of the final evaluation."""
    headings = [_gold_heading(key) for key in gold_keys] + [heading for _, heading in MEASURES]
    lines = [f"# {title}", "", "Final held-out evaluation of every design, mean ± std over seeds "
             f"({', '.join(str(s) for s in summaries[0].seeds) if summaries else ''}). Gold columns are the "
             "metrics the designs were judged by, not trained on. 'gold peak drop' is how far the final gold "
             "reward sits below the best one seen during training (over-optimization).", ""]
    lines.append("| design | " + " | ".join(headings) + " | gold peak drop | train s/seed | flag |")
    lines.append("|" + "---|" * (len(headings) + 4))
    if base:
        cells = [_fmt(base.get(key, math.nan)) for key in gold_keys] + [_fmt(base.get(key, math.nan))
                                                                        for key, _ in MEASURES]
        lines.append("| *base model (before training)* | " + " | ".join(cells) + " | | | |")
    for summary in summaries:
        cells = [_fmt(summary.final_mean.get(key, math.nan), summary.final_std.get(key, math.nan))
                 for key in list(gold_keys) + [key for key, _ in MEASURES]]
        flag = "**reward hacking**" if summary.hacking else ""
        lines.append(f"| {summary.name} | " + " | ".join(cells)
                     + f" | {summary.gold_peak_drop:.3f} | {summary.train_seconds:.0f} | {flag} |")
    lines += ["", "'trained reward' is each design's own reward (its weighted sum) on the held-out prompts; "
              "'base model' has no trained reward of its own (blank). A design is flagged **reward hacking** "
              "when its trained reward rose from the first to the last evaluation while the first gold "
              "reward fell.", "", "Plots: gold_vs_step.png, gold_vs_kl.png. TensorBoard: "
              "`tensorboard --logdir runs` in this directory."]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_csv(summaries: Sequence[DesignSummary], runs: Sequence[RunRecord], directory: Path) -> None:
    """``results.csv`` (per design: ``KEY_mean``, ``KEY_std``) and ``runs.csv`` (per design and seed)."""
    keys = sorted({key for summary in summaries for key in summary.final_mean})
    with (directory / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["design", "seeds"] + [f"{key}_{stat}" for key in keys for stat in ("mean", "std")]
                        + ["gold_peak_drop", "train_seconds", "reward_hacking"])
        for summary in summaries:
            writer.writerow([summary.name, len(summary.seeds)]
                            + [_csv(value) for key in keys
                               for value in (summary.final_mean.get(key), summary.final_std.get(key))]
                            + [_csv(summary.gold_peak_drop), _csv(summary.train_seconds), int(summary.hacking)])
    run_keys = sorted({key for run in runs for key in run.final.values})
    with (directory / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["design", "seed", "step"] + run_keys + ["train_seconds", "run_dir"])
        for run in runs:
            writer.writerow([run.design, run.seed, run.final.step]
                            + [_csv(run.final.values.get(key)) for key in run_keys]
                            + [_csv(run.train_seconds), run.run_dir])


def write_plots(summaries: Sequence[DesignSummary], gold_key: str, directory: Path) -> list[Path]:
    """``gold_vs_step.png`` and ``gold_vs_kl.png`` (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = _gold_heading(gold_key)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for summary in summaries:
        steps, mean, std = summary.curves.get(gold_key, ([], [], []))
        line, = axes.plot(steps, mean, marker="o", markersize=3, label=summary.name)
        axes.fill_between(steps, np.subtract(mean, std), np.add(mean, std), color=line.get_color(), alpha=0.15)
    axes.set(xlabel="update", ylabel=label, title=f"{label} on held-out prompts during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    step_path = directory / "gold_vs_step.png"
    figure.savefig(step_path, dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for summary in summaries:
        _, gold, _ = summary.curves.get(gold_key, ([], [], []))
        _, kl, _ = summary.curves.get("kl", ([], [], []))
        line, = axes.plot(kl, gold, alpha=0.5, linewidth=1)
        axes.errorbar([summary.final_mean.get("kl", math.nan)], [summary.final_mean.get(gold_key, math.nan)],
                      xerr=[summary.final_std.get("kl", 0.0)], yerr=[summary.final_std.get(gold_key, 0.0)],
                      marker="o", color=line.get_color(), label=summary.name, capsize=3)
    # Symmetric log scale: a design without a KL penalty can drift 10-100x further than the rest, and the
    # k1 estimate of a small KL can be slightly negative.
    axes.set_xscale("symlog", linthresh=1.0)
    axes.set(xlabel="KL to the reference (nats per completion, symlog scale)", ylabel=label,
             title=f"{label} against KL (line: path during training; dot: final, ± std)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    kl_path = directory / "gold_vs_kl.png"
    figure.savefig(kl_path, dpi=120)
    plt.close(figure)
    return [step_path, kl_path]


def _gold_heading(key: str) -> str:
    return "gold " + key.removeprefix("gold/")


def _value_at(run: RunRecord, step: int, key: str) -> float:
    for point in run.points:
        if point.step == step:
            return point.values.get(key, math.nan)
    return math.nan


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanstd(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.std(finite)) if finite else math.nan


def _fmt(mean: float, std: float | None = None) -> str:
    if mean is None or math.isnan(mean):
        return ""
    if std is None or math.isnan(std):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def _csv(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"
