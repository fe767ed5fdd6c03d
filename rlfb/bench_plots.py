"""What ``rlfb bench`` writes: the per-design summary and verdict, results.md/.csv and plots.

Every run of the bench leaves an evaluation curve: one :class:`EvalPoint` per evaluation step, measured
on the same held-out prompts with the same sampling seed. This module turns the curves of all designs
and seeds into

* ``results.md``: one row per design, mean +- std over seeds of the final evaluation, and the verdict
  (:mod:`rlfb.bench_verdict`: hacked, over-optimized, off-distribution, and why);
* ``results.csv``: the same numbers, one column per mean and per std, the verdict and its reason;
* ``runs.csv``: one row per design and seed (the raw numbers behind the means);
* ``gold_vs_step.png``: gold reward against training update, one line per design (std shaded);
* ``gold_vs_kl.png``: gold reward against KL to the reference, each design's path over training,
  its final point marked: the reward/KL frontier;
* ``proxy_gold_vs_sqrt_kl.png``: per design, the change of its trained (proxy) reward and of the gold
  reward against sqrt(KL), as in Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization").
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlfb.bench_verdict import PROXY_KEY, Verdict, VerdictBounds, judge

# Columns of the results, in order: (key in EvalPoint.values, heading in results.md).
MEASURES: tuple[tuple[str, str], ...] = (
    ("design_reward", "trained reward"),
    ("kl", "KL (nats)"),
    ("fluency", "fluency"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("completion_length", "length"),
)
# Shown when a bench measures them (eval.perturb): the first gold reward on perturbed held-out prompts
# subtracted from the clean one.
OPTIONAL_MEASURES: tuple[tuple[str, str], ...] = (("robustness_gap", "robustness gap"),)


@dataclass
class EvalPoint:
    """One held-out evaluation of one run: the update it followed, every measure by name, and the gold and
    trained rewards per held-out prompt (the prompt noise of :mod:`rlfb.bench_verdict`)."""

    step: int
    values: dict[str, float]
    prompt_values: dict[str, list[float]] = field(default_factory=dict)


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
    verdict: Verdict
    gold_peak_drop: float = 0.0


def summarize(runs: Sequence[RunRecord], gold_key: str, bounds: VerdictBounds | None = None) -> DesignSummary:
    """Aggregate the runs of one design (all seeds) into means, stds, curves and the verdict."""
    if not runs:
        raise ValueError("summarize needs at least one run")
    keys = sorted({key for run in runs for point in run.points for key in point.values})
    evaluations = aligned_evaluations(runs)
    steps = [step for step, _ in evaluations]
    curves = {}
    for key in keys:
        values = [[point.values.get(key, math.nan) for point in points] for _, points in evaluations]
        curves[key] = (steps, [_nanmean(v) for v in values], [_nanstd(v) for v in values])
    final_mean = {key: _nanmean([run.final.values.get(key, math.nan) for run in runs]) for key in keys}
    final_std = {key: _nanstd([run.final.values.get(key, math.nan) for run in runs]) for key in keys}
    gold_curve = curves.get(gold_key, ([], [], []))[1]
    peak_drop = (max(gold_curve) - gold_curve[-1]) if gold_curve else 0.0
    verdict = judge([points for _, points in evaluations], gold_key, bounds or VerdictBounds())
    return DesignSummary(name=runs[0].design, seeds=[run.seed for run in runs], final_mean=final_mean,
                         final_std=final_std, curves=curves,
                         train_seconds=float(np.mean([run.train_seconds for run in runs])),
                         verdict=verdict, gold_peak_drop=float(peak_drop))


def aligned_evaluations(runs: Sequence[RunRecord]) -> list[tuple[int, list[EvalPoint]]]:
    """The evaluations every seed made, as (update, one point per seed), in order.

    A time limit can end the seeds at different updates; their final evaluations still close the curve,
    placed at the mean final update.
    """
    steps = sorted(set.intersection(*({point.step for point in run.points} for run in runs)))
    evaluations = [(step, [_point_at(run, step) for run in runs]) for step in steps]
    final_steps = [run.final.step for run in runs]
    if any(step not in steps for step in final_steps):
        evaluations.append((round(float(np.mean(final_steps))), [run.final for run in runs]))
    return evaluations


def results_markdown(summaries: Sequence[DesignSummary], gold_keys: Sequence[str], title: str,
                     base: dict[str, float] | None = None, notes: Sequence[str] = (),
                     bounds: VerdictBounds | None = None) -> str:
    """``results.md``: one row per design, ``mean ± std`` over seeds of the final evaluation, and its verdict."""
    measures = list(MEASURES) + [measure for measure in OPTIONAL_MEASURES
                                 if any(measure[0] in summary.final_mean for summary in summaries)]
    headings = [_gold_heading(key) for key in gold_keys] + [heading for _, heading in measures]
    lines = [f"# {title}", "", "Final held-out evaluation of every design, mean ± std over seeds "
             f"({', '.join(str(s) for s in summaries[0].seeds) if summaries else ''}). Gold columns are the "
             "metrics the designs were judged by, not trained on. 'gold peak drop' is how far the final gold "
             "reward sits below the best one seen during training (over-optimization).", ""]
    lines.append("| design | " + " | ".join(headings) + " | gold peak drop | train s/seed | verdict |")
    lines.append("|" + "---|" * (len(headings) + 4))
    if base:
        cells = [_fmt(base.get(key, math.nan)) for key in gold_keys] + [_fmt(base.get(key, math.nan))
                                                                        for key, _ in measures]
        lines.append("| *base model (before training)* | " + " | ".join(cells) + " | | | |")
    for summary in summaries:
        cells = [_fmt(summary.final_mean.get(key, math.nan), summary.final_std.get(key, math.nan))
                 for key in list(gold_keys) + [key for key, _ in measures]]
        verdict = summary.verdict.reason
        if summary.verdict.flagged:
            verdict = f"**{verdict}**"
        lines.append(f"| {summary.name} | " + " | ".join(cells)
                     + f" | {summary.gold_peak_drop:.3f} | {summary.train_seconds:.0f} | {verdict} |")
    lines += ["", "'trained reward' is each design's own reward (its weighted sum) on the held-out prompts; "
              "'base model' has no trained reward of its own (blank). The verdict (docs/benchmarks.md) "
              "compares the evaluations of the design, averaged over seeds, with their noise (z standard "
              "errors over seeds and held-out prompts): **hacked** when the trained reward rose from the base "
              "model to the last evaluation while the first gold reward did not; **over-optimized** when the "
              "gold rose to a peak and then fell; **off-distribution** when the last evaluation passes a drift "
              "bound. " + _bounds_text(bounds), "", "Plots: gold_vs_step.png, gold_vs_kl.png, "
              "proxy_gold_vs_sqrt_kl.png. TensorBoard: `tensorboard --logdir runs` in this directory."]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_csv(summaries: Sequence[DesignSummary], runs: Sequence[RunRecord], directory: Path) -> None:
    """``results.csv`` (per design: ``KEY_mean``, ``KEY_std``) and ``runs.csv`` (per design and seed)."""
    keys = sorted({key for summary in summaries for key in summary.final_mean})
    with (directory / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["design", "seeds"] + [f"{key}_{stat}" for key in keys for stat in ("mean", "std")]
                        + ["gold_peak_drop", "train_seconds", "verdict", "verdict_reason"])
        for summary in summaries:
            writer.writerow([summary.name, len(summary.seeds)]
                            + [_csv(value) for key in keys
                               for value in (summary.final_mean.get(key), summary.final_std.get(key))]
                            + [_csv(summary.gold_peak_drop), _csv(summary.train_seconds),
                               "; ".join(summary.verdict.findings), summary.verdict.reason])
    run_keys = sorted({key for run in runs for key in run.final.values})
    with (directory / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["design", "seed", "step"] + run_keys + ["train_seconds", "run_dir"])
        for run in runs:
            writer.writerow([run.design, run.seed, run.final.step]
                            + [_csv(run.final.values.get(key)) for key in run_keys]
                            + [_csv(run.train_seconds), run.run_dir])


def write_plots(summaries: Sequence[DesignSummary], gold_key: str, directory: Path) -> list[Path]:
    """``gold_vs_step.png``, ``gold_vs_kl.png`` and ``proxy_gold_vs_sqrt_kl.png`` (matplotlib, Agg backend)."""
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
    return [step_path, kl_path, _plot_proxy_gold_vs_sqrt_kl(plt, summaries, gold_key, directory)]


def _plot_proxy_gold_vs_sqrt_kl(plt: Any, summaries: Sequence[DesignSummary], gold_key: str, directory: Path) -> Path:
    """Gao et al. 2022's view, one panel per design: proxy and gold reward, as changes from the base model,
    against sqrt(KL) (their d, the distance from the initial policy); over-optimization shows as gold
    turning down while the proxy keeps rising."""
    columns = min(3, len(summaries))
    rows = math.ceil(len(summaries) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, summary in zip(axes.flat, summaries, strict=False):
        _, kl, _ = summary.curves.get("kl", ([], [], []))
        distance = np.sqrt(np.clip(kl, 0.0, None))  # the k1 estimate of a small KL can be slightly negative
        for key, label, style in ((PROXY_KEY, "trained (proxy)", "--"), (gold_key, _gold_heading(gold_key), "-")):
            _, mean, std = summary.curves.get(key, ([], [], []))
            if not mean:
                continue
            change = np.subtract(mean, mean[0])
            line, = axis.plot(distance, change, style, marker="o", markersize=3, label=label)
            axis.fill_between(distance, change - np.asarray(std), change + np.asarray(std),
                              color=line.get_color(), alpha=0.15)
        axis.axhline(0.0, color="grey", linewidth=0.5)
        flagged = ", ".join(summary.verdict.findings) if summary.verdict.flagged else ""
        axis.set_title(summary.name + (f" ({flagged})" if flagged else ""), fontsize=9)
        axis.set_xlabel("sqrt(KL to the base model), sqrt(nats)", fontsize=8)
        axis.set_ylabel("reward change from update 0", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(summaries):]:
        axis.set_visible(False)
    figure.suptitle("Proxy and gold reward against sqrt(KL) (Gao et al. 2022)", fontsize=10)
    figure.tight_layout()
    path = directory / "proxy_gold_vs_sqrt_kl.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _bounds_text(bounds: VerdictBounds | None) -> str:
    bounds = bounds or VerdictBounds()
    kl = f"KL <= {bounds.max_kl:g} nats" if bounds.max_kl is not None else "no KL bound"
    fluency = (f"fluency drop <= {bounds.max_fluency_drop:g} nats/token" if bounds.max_fluency_drop is not None
               else "no fluency bound")
    return f"Noise z = {bounds.noise_z:g}; bounds: {kl}, {fluency}."


def _gold_heading(key: str) -> str:
    return "gold " + key.removeprefix("gold/")


def _point_at(run: RunRecord, step: int) -> EvalPoint:
    return next(point for point in run.points if point.step == step)


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
