"""The pipeline's summary: per round (or per eval stage) the gold rewards, KL and fluency; per stage run its
key, time and artefacts. ``summary.md`` and ``summary.csv``, and ``summary.png`` when matplotlib is there."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlfb.files import write_text_atomically
from rlfb.pipeline.config import PipelineConfig
from rlfb.pipeline.plan import StageRun

MEASURES = ("kl", "fluency")  # shown after the gold rewards


def evaluation_rows(config: PipelineConfig, out: Path, runs: Sequence[StageRun],
                    rounds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished eval stage run: its round, name, the gold rewards, KL and fluency."""
    from rlfb.bench import gold_key
    from rlfb.pipeline.runner import STAGE_FILE, STAGES_DIR

    keys = [gold_key(reward) for reward in config.gold] + list(MEASURES)
    rows = []
    for run in runs:
        if run.kind != "eval":
            continue
        path = out / STAGES_DIR / run.name / STAGE_FILE
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text()).get("metrics", {})
        rows.append({"round": run.round if run.round is not None else "", "eval": run.name,
                     **{key: metrics.get(key) for key in keys}})
    return rows


def write_summary(config: PipelineConfig, out: Path, runs: Sequence[StageRun],
                  rounds: Sequence[dict[str, Any]]) -> None:
    from rlfb.pipeline.runner import pipeline_status

    rows = evaluation_rows(config, out, runs, rounds)
    statuses = {status.name: status for status in pipeline_status(config, out)}
    lines = ["# Pipeline summary", ""]
    if rows:
        columns = list(rows[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    else:
        lines.append("No eval stage has finished yet.")
    lines += ["", "## Stage runs", "", "| stage | kind | state | key | seconds | inputs | artefacts |",
              "|---|---|---|---|---|---|---|"]
    for run in runs:
        status = statuses.get(run.name)
        if status is None:
            continue
        inputs = "; ".join(f"{role}: {', '.join(names)}" for role, names in run.inputs.items())
        artefacts = ", ".join(f"{role}: `{path}`" for role, path in status.outputs.items())
        lines.append(f"| {run.name} | {run.kind} | {status.state} | {status.key} | {_cell(status.seconds)} | "
                     f"{inputs} | {artefacts} |")
    write_text_atomically(out / "summary.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    csv_path, plot_path = out / "summary.csv", out / "summary.png"
    unchanged = csv_path.is_file() and csv_path.read_bytes() == buffer.getvalue().encode() and plot_path.is_file()
    write_text_atomically(csv_path, buffer.getvalue())
    if rows and not unchanged:  # the plot shows the csv's rows only; matplotlib costs a rerun seconds
        _plot(rows, plot_path)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Gold rewards, KL and fluency against the eval stage runs in order (matplotlib, Agg backend)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [key for key in rows[0] if key not in ("round", "eval")]
    labels = [row["eval"] for row in rows]
    figure, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures), 3.2), squeeze=False)
    for axis, measure in zip(axes[0], measures, strict=True):
        values = [row[measure] if row[measure] is not None else float("nan") for row in rows]
        axis.plot(range(len(values)), values, marker="o")
        axis.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(measure, fontsize=10)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    temporary.replace(path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
