"""rlfb bench: config validation, summaries over seeds, and a tiny end-to-end bench (the verdict: test_bench_verdict.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from rlfb.bench import bench_config_from_dict, load_bench_config, run_bench
from rlfb.bench_plots import EvalPoint, RunRecord, summarize
from rlfb.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def bench_data(model: str = "rlfb-tiny", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task": "sentiment", "model": model, "lora": {"r": 4, "alpha": 8},
        "agent": {"name": "grpo", "learning_rate": 1e-2},
        "sampling": {"max_new_tokens": 6}, "budget": {"updates": 2, "num_envs": 4, "group_size": 2},
        "seeds": [0], "eval": {"num_prompts": 4, "every": 1},
        "gold": ["sentiment"],
        "designs": [{"name": "vader", "rewards": ["sentiment"]},
                    {"name": "vader_no_kl", "rewards": ["sentiment", {"name": "length", "weight": 0.1}], "kl": "off"}],
    }
    data.update(changes)
    return data


# --------------------------------------------------------------------------------------------- config
def test_valid_config_derives_one_run_config_per_design_with_its_kl() -> None:
    config = bench_config_from_dict(bench_data(), overrides=["budget.updates=3", "designs.0.kl.coef=0.05"])
    first = config.run_config(config.designs[0], seed=7)
    second = config.run_config(config.designs[1], seed=7)
    assert (first.budget.updates, first.seed, first.agent.params["kl_coef"]) == (3, 7, 0.05)
    assert second.agent.params["kl_coef"] == 0.0 and second.agent.params["kl_target"] is None
    assert [r.name for r in second.rewards] == ["sentiment", "length"]
    assert first.eval.num_prompts == 0  # held-out evaluation is the bench's, with gold rewards


def test_verdict_kl_bound_defaults_to_twice_the_bench_agents_kl_target() -> None:
    agent = {"name": "grpo", "learning_rate": 1e-2, "kl_target": 1.5}
    # The design without KL (kl: off) does not move the bound: every design is held to the same one.
    config = bench_config_from_dict(bench_data(agent=agent))
    assert (config.verdict.max_kl, config.verdict.max_fluency_drop, config.verdict.noise_z) == (3.0, 1.0, 2.0)
    assert config.verdict_note == "KL bound 2 x the agent's kl_target 1.5 (verdict.max_kl overrides it)."
    assert bench_config_from_dict(bench_data()).verdict.max_kl == 6.0  # the agent's default kl_target, 3
    config = bench_config_from_dict(bench_data(agent=agent, verdict={"max_kl": 10, "max_fluency_drop": None}))
    assert (config.verdict.max_kl, config.verdict.max_fluency_drop) == (10.0, None)
    assert bench_config_from_dict(bench_data(agent=agent, verdict={"max_kl": None})).verdict.max_kl == 3.0
    config = bench_config_from_dict(bench_data(agent={**agent, "kl_target": None}))
    assert config.verdict.max_kl is None and "set verdict.max_kl" in config.verdict_note


@pytest.mark.parametrize(("changes", "message"), [
    ({"sedes": [0]}, r"unknown key 'sedes'.*did you mean 'seeds'"),
    ({"designs": []}, r"needs 'designs'"),
    ({"gold": ["sentimnt"]}, r"'gold.0.name'.*unknown reward 'sentimnt'"),
    ({"seeds": [0, 0]}, r"'seeds' is \[0, 0\]; it must be a non-empty list of distinct integers"),
    ({"designs": [{"name": "a", "rewards": ["sentiment"], "kl": {"coef": "big"}}]}, r"'designs.0.kl.coef' must be"),
    ({"designs": [{"name": "a", "rewards": ["sentiment"], "kl": {"coff": 1}}]}, r"'designs.0.kl.coff'.*did you mean 'designs.0.kl.coef'"),
    ({"designs": [{"name": "a", "rewards": ["sentiment"]}, {"name": "a", "rewards": ["length"]}]},
     r"distinct design names"),
    ({"designs": [{"name": "a", "rewards": [{"name": "reward_model"}]}]}, r"reward_model without kwargs.path"),
    ({"designs": [{"name": "a", "rewards": [{"name": "reward_model", "train_reward_model": {"kind": "votes"}}]}]},
     r"'designs.0.rewards.0.train_reward_model.kind' is 'votes'"),
    ({"budget": {"updatse": 3}}, r"design 'vader': unknown key 'budget.updatse'.*did you mean 'budget.updates'"),
    ({"agent": {"name": "grpo", "lerning_rate": 1.0}}, r"design 'vader':.*agent.lerning_rate"),
    ({"eval": {"num_prompts": 0}}, r"'eval.num_prompts' is 0"),
    ({"threads": -1}, r"'threads' is -1; it must be an integer >= 0"),
    ({"verdict": {"max_kll": 3}}, r"'verdict.max_kll'.*did you mean 'verdict.max_kl'"),
    ({"verdict": {"noise_z": 0}}, r"'verdict.noise_z' is 0.0; it must be > 0"),
    ({"verdict": {"max_fluency_drop": -1}}, r"'verdict.max_fluency_drop' is -1.0; it must be > 0, or null"),
])
def test_invalid_config_names_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        bench_config_from_dict(bench_data(**changes))


def test_shipped_sentiment_bench_config_is_valid() -> None:
    config = load_bench_config(REPO / "benchmarks" / "sentiment_reward_designs.yaml")
    names = [design.name for design in config.designs]
    assert {"vader", "rm_2000", "rm_200", "likelihood", "vader_likelihood", "vader_no_kl", "words"} <= set(names)
    words = next(design for design in config.designs if design.name == "words")
    # Hackable on purpose: the word target lies beyond what max_new_tokens can write, so more words always pay.
    assert words.rewards[0].name == "length" and words.rewards[0].kwargs["target"] > config.shared["sampling"]["max_new_tokens"]
    assert words.rewards[0].weight == words.rewards[0].kwargs["target"]  # n - target: words per completion
    assert config.verdict.max_kl == 6.0  # the shipped null: twice PPO's kl_target 3
    assert len(config.seeds) == 2
    sizes = {design.name: recipe.size for design in config.designs for recipe in design.recipes.values()}
    assert sizes == {"rm_2000": 2000, "rm_200": 200}


def test_a_design_may_train_its_own_agent_with_its_own_budget_keys() -> None:
    designs = [{"name": "shared", "rewards": ["sentiment"]},
               {"name": "tuned", "rewards": ["sentiment"], "agent": {"learning_rate": 3e-3}},
               {"name": "ppo", "rewards": ["sentiment"], "agent": {"name": "ppo", "epochs": 2},
                "budget": {"group_size": None, "num_envs": 6}, "kl": {"target": 2.0}}]
    config = bench_config_from_dict(bench_data(designs=designs))
    shared, tuned, ppo = (config.run_config(design, seed=0) for design in config.designs)
    assert (shared.agent.name, shared.agent.params) == ("grpo", {"learning_rate": 1e-2})
    assert tuned.agent.params == {"learning_rate": 3e-3}  # the same agent: its options over the shared ones
    # Another agent: the shared (GRPO) options do not apply, the design's and its KL setting do.
    assert (ppo.agent.name, ppo.agent.params) == ("ppo", {"epochs": 2, "kl_target": 2.0})
    assert (ppo.budget.num_envs, ppo.budget.group_size, ppo.budget.updates) == (6, None, 2)
    assert (shared.budget.num_envs, shared.budget.group_size) == (4, 2)
    with pytest.raises(ConfigError, match=r"design 'ppo':.*agent.epoch"):
        bench_config_from_dict(bench_data(designs=[{**designs[2], "agent": {"name": "ppo", "epoch": 2}}]))
    with pytest.raises(ConfigError, match=r"valid keys in a design: name, rewards, kl, reward_scale, agent, budget, task"):
        bench_config_from_dict(bench_data(designs=[{"name": "a", "rewards": ["sentiment"], "agents": "ppo"}]))


def test_shipped_adversarial_bench_config_trains_one_design_on_perturbed_prompts() -> None:
    config = load_bench_config(REPO / "benchmarks" / "sentiment_adversarial.yaml")
    clean, perturbed, half = (config.run_config(design, seed=0) for design in config.designs)
    assert (clean.task.name, perturbed.task.name, half.task.kwargs["fraction"]) == ("sentiment", "perturbed", 0.5)
    assert perturbed.task.kwargs["task"] == "sentiment" and config.eval.perturb == ["typos", "distractor"]
    assert clean.agent == perturbed.agent and clean.budget == perturbed.budget


def test_shipped_agents_bench_config_compares_agents_on_one_reward(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the teacher path is read from the working directory
    with pytest.raises(ConfigError, match=r"design 'distillation': .*teacher './runs/distillation_teacher' does not "
                                          r"exist.*benchmarks/distillation.py --teacher-only builds one"):
        load_bench_config(REPO / "benchmarks" / "sentiment_agents.yaml")
    (tmp_path / "runs" / "distillation_teacher").mkdir(parents=True)  # what --teacher-only builds (not read here)
    config = load_bench_config(REPO / "benchmarks" / "sentiment_agents.yaml")
    agents = {design.name: config.run_config(design, seed=0).agent.name for design in config.designs}
    assert agents == {"ppo": "ppo", "grpo": "grpo", "rloo": "rloo", "self_training": "self_training", "es": "es",
                      "distillation": "distillation"}
    assert all([reward.name for reward in design.rewards] == ["sentiment"] for design in config.designs)


# --------------------------------------------------------------------------------------------- summary
def test_summary_averages_seeds_before_judging() -> None:
    def run(seed: int, design: list[float], gold: list[float]) -> RunRecord:
        points = [EvalPoint(step, {"design_reward": d, "gold/sentiment": g, "kl": float(step)})
                  for step, d, g in zip((0, 5, 10), design, gold, strict=True)]
        return RunRecord(design="rm_200", seed=seed, points=points, train_seconds=1.0)

    # Seed 0 alone would not be hacked (gold rises), but the mean over seeds falls.
    summary = summarize([run(0, [0.0, 0.5, 1.0], [0.2, 0.25, 0.3]), run(1, [0.0, 0.6, 1.2], [0.4, 0.1, -0.2])],
                        "gold/sentiment")
    assert summary.verdict.findings == ("hacked",)
    assert summary.final_mean["gold/sentiment"] == pytest.approx(0.05)
    assert summary.final_std["gold/sentiment"] == pytest.approx(0.25)
    assert summary.curves["kl"][0] == [0, 5, 10]

    # A time limit stopped seed 1 at update 8: the curve ends with both final evaluations at update 9.
    cut = run(1, [0.0, 0.6, 1.2], [0.4, 0.1, -0.2])
    cut.points[-1].step = 8
    summary = summarize([run(0, [0.0, 0.5, 1.0], [0.2, 0.25, 0.3]), cut], "gold/sentiment")
    steps, means, _ = summary.curves["gold/sentiment"]
    assert steps == [0, 5, 9] and means[-1] == pytest.approx(0.05)


# --------------------------------------------------------------------------------------------- end to end
def test_tiny_bench_writes_results_plots_and_tensorboard_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = bench_config_from_dict(bench_data(model=str(tiny_model_dir)))
    lines: list[str] = []
    out = run_bench(config, output_dir=tmp_path / "bench", say=lines.append, progress_bar=False)

    table = (out / "results.md").read_text()
    assert "| vader |" in table and "| vader_no_kl |" in table and "base model" in table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["design"] for row in rows] == ["vader", "vader_no_kl"]
    assert -1.0 <= float(rows[0]["gold/sentiment_mean"]) <= 1.0
    for row in rows:  # the verdict's reason, with its numbers, in the CSV and in the table's last column
        assert row["verdict_reason"].startswith(row["verdict"].split("; ")[0] + ": ")
        assert next(line for line in table.splitlines() if line.startswith(f"| {row['design']} |")).endswith(
            row["verdict_reason"] + ("** |" if row["verdict"] not in ("ok", "no gain") else " |"))
    assert "KL bound 2 x the agent's kl_target 3" in table
    for plot in ("gold_vs_step.png", "gold_vs_kl.png", "proxy_gold_vs_sqrt_kl.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    # Every evaluation keeps the gold and trained rewards per held-out prompt; their means are the measures.
    saved = json.loads((out / "runs" / "vader_no_kl__seed0" / "bench_eval.json").read_text())
    for point in saved["points"]:
        for key in ("gold/sentiment", "design_reward"):
            assert len(point["prompt_values"][key]) == 4
            assert np.mean(point["prompt_values"][key]) == pytest.approx(point["values"][key])
    for name in ("vader__seed0", "vader_no_kl__seed0"):
        assert list((out / "runs" / name / "tensorboard").glob("events.out.tfevents.*"))
        metrics = [yaml.safe_load(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert {0, 1, 2} <= {row["step"] for row in metrics if "eval/gold/sentiment" in row}
    assert any("design 'vader_no_kl' seed 0" in line for line in lines)

    # A rerun into the same directory reuses the finished runs instead of training again.
    lines.clear()
    run_bench(config, output_dir=out, say=lines.append, progress_bar=False)
    assert sum("reusing the finished run" in line for line in lines) == 2

    # A design whose config changed (here its reward_scale) is trained again; the others are reused.
    data = bench_data(model=str(tiny_model_dir))
    data["designs"][1]["reward_scale"] = {"normalize": True}
    changed = bench_config_from_dict(data)
    assert changed.run_config(changed.designs[1], 0).reward_scale.normalize
    lines.clear()
    run_bench(changed, output_dir=out, say=lines.append, progress_bar=False)
    assert sum("reusing the finished run" in line for line in lines) == 1
    assert any("the config of vader_no_kl__seed0 changed since it ran" in line for line in lines)


def test_cli_check_lists_the_runs_and_reports_errors_with_exit_code_1(capsys: pytest.CaptureFixture[str]) -> None:
    from rlfb.cli import main

    config = str(REPO / "benchmarks" / "sentiment_reward_designs.yaml")
    assert main(["bench", config, "--check", "--set", "seeds=[3]"]) == 0
    out = capsys.readouterr().out
    assert "7 designs x 1 seeds" in out and "vader_no_kl: 1*sentiment; KL kl_coef=0.0, kl_target=None" in out
    assert main(["bench", config, "--check", "--set", "budget.num_envs=0"]) == 1
    assert "'budget.num_envs' is 0" in capsys.readouterr().err


def test_eval_perturb_adds_the_robustness_gap_on_perturbed_held_out_prompts(tiny_model_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import rlfb.evaluation
    from rlfb.bench import _evaluate
    from rlfb.models.policy import LoraSettings, Policy

    data = bench_data(model=str(tiny_model_dir), eval={"num_prompts": 4, "every": 1, "perturb": ["distractor"]})
    config = bench_config_from_dict(data)
    calls: list[tuple[list[str], float]] = []
    original = rlfb.evaluation.evaluate_policy

    def recording(policy: Any, rows: Any, reward_set: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(policy, rows, reward_set, *args, **kwargs)
        calls.append(([row["prompt"] for row in rows], result.rewards["gold/sentiment"]))
        return result

    monkeypatch.setattr(rlfb.evaluation, "evaluate_policy", recording)
    policy = Policy.from_pretrained(str(tiny_model_dir), lora=LoraSettings(r=2), value_head=False, device="cpu")
    point = _evaluate(config, config.run_config(config.designs[0], 0), config.designs[0], policy, step=0)
    (clean, clean_gold), (perturbed, perturbed_gold) = calls
    assert all(noisy.endswith(" " + prompt) and noisy != prompt for noisy, prompt in zip(perturbed, clean, strict=True))
    assert point.values["gold_perturbed"] == perturbed_gold
    assert point.values["robustness_gap"] == pytest.approx(clean_gold - perturbed_gold)
    with pytest.raises(ConfigError, match="eval.perturb: unknown perturbation 'typo'"):
        bench_config_from_dict(bench_data(eval={"num_prompts": 4, "perturb": ["typo"]}))
