"""Every column of the bench's tables holds the quantity its heading names (the verdict flag aside).

The end-to-end test re-measures a finished run's final adapter with :func:`rlfb.evaluation.evaluate_policy`
(same prompts, sampling settings and evaluation seed) and compares every column of runs.csv with it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlfb.bench import bench_config_from_dict, run_bench
from rlfb.bench_plots import EvalPoint, RunRecord, results_markdown, summarize
from rlfb.envs.tasks import make_task
from rlfb.evaluation import evaluate_policy, load_policy
from rlfb.models.sampler import SamplingConfig
from rlfb.rewards import RewardSet, RewardSpec

MEASURES = ("design_reward", "kl", "fluency", "distinct_1", "distinct_2", "completion_length")


def record(seed: int, offset: float) -> RunRecord:
    """A run whose measures differ by key and step: value = base + step + offset."""
    bases = {"gold/vowel": 0.1, **{key: 10.0 * (index + 1) for index, key in enumerate(MEASURES)}}
    points = [EvalPoint(step, {key: base + step + offset for key, base in bases.items()}) for step in (0, 2, 4)]
    points[1].values["gold/vowel"] = 9.0  # the gold peak, in the middle
    return RunRecord(design="d", seed=seed, points=points, train_seconds=5.0 + seed)


def test_results_table_columns_are_the_final_means_of_their_measures() -> None:
    summary = summarize([record(0, 0.0), record(1, 1.0)], "gold/vowel")
    assert summary.final_mean["kl"] == pytest.approx(20.0 + 4 + 0.5)  # the last evaluation, mean over seeds
    assert summary.gold_peak_drop == pytest.approx(9.0 - (0.1 + 4 + 0.5))  # best seen minus final
    assert summary.train_seconds == pytest.approx(5.5)
    table = results_markdown([summary], ["gold/vowel"], "t")
    lines = [line for line in table.splitlines() if line.startswith("|")]
    headings = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    by_heading = dict(zip(headings, cells, strict=True))
    expected = {"gold vowel": "gold/vowel", "trained reward": "design_reward", "KL (nats)": "kl",
                "fluency": "fluency", "distinct-1": "distinct_1", "distinct-2": "distinct_2", "length": "completion_length"}
    for heading, key in expected.items():
        mean, std = summary.final_mean[key], summary.final_std[key]
        assert by_heading[heading] == f"{mean:.3f} ± {std:.3f}", heading
    assert by_heading["gold peak drop"] == f"{summary.gold_peak_drop:.3f}"
    assert by_heading["train s/seed"] == "6"  # round(5.5) with Python's banker's rounding


def test_bench_columns_equal_a_fresh_evaluation_of_the_final_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    gold = {"name": "regex", "kwargs": {"pattern": "[aeiou]"}, "label": "vowel"}
    design_rewards = [{"name": "regex", "kwargs": {"pattern": "[st]"}, "label": "st"},
                      {"name": "length", "kwargs": {"target": 3}, "weight": 0.5}]
    config = bench_config_from_dict({
        "task": "sentiment", "model": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8},
        "agent": {"name": "grpo", "learning_rate": 5e-2},
        "sampling": {"max_new_tokens": 6, "top_k": 5}, "budget": {"updates": 3, "num_envs": 4, "group_size": 2},
        "seeds": [0], "eval": {"num_prompts": 6, "every": 2, "seed": 77},
        "gold": [gold], "designs": [{"name": "weighted", "rewards": design_rewards}],
    })
    out = run_bench(config, output_dir=tmp_path / "bench", say=lambda text: None, progress_bar=False)
    saved = json.loads((out / "runs" / "weighted__seed0" / "bench_eval.json").read_text())
    assert [point["step"] for point in saved["points"]] == [0, 2, 3]  # base, every 2, and the last update
    with (out / "runs.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))

    policy, _ = load_policy(out / "runs" / "weighted__seed0", device="cpu")
    held_out = list(make_task("sentiment").eval_rows())[:6]
    specs = [RewardSpec(name="regex", kwargs={"pattern": "[aeiou]"}, label="gold"),
             RewardSpec(name="regex", kwargs={"pattern": "[st]"}, label="st"),
             RewardSpec(name="length", kwargs={"target": 3}, label="length")]
    result = evaluate_policy(policy, held_out, RewardSet(specs), SamplingConfig(top_k=5, max_new_tokens=6),
                             seed=77, num_samples=0)
    expected = {"gold/vowel": result.rewards["gold"],
                "design_reward": result.rewards["st"] + 0.5 * result.rewards["length"],
                "kl": result.kl, "fluency": result.fluency, "distinct_1": result.distinct_1,
                "distinct_2": result.distinct_2, "completion_length": result.completion_length}
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert result.distinct_1 != result.distinct_2 and result.fluency != result.kl
