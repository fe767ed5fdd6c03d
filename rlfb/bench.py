"""``rlfb bench CONFIG``: train one task with several reward designs and judge them by the same gold metrics.

A bench config names a task, a base model, an agent, a budget, seeds, the held-out evaluation, the
*gold* rewards (what the user really wants, never trained on unless a design says so) and a list of
*designs*, each a reward list plus a KL setting (and optionally a ``reward_scale`` section, as in a run
config: ``{normalize: true}`` puts a reward model's arbitrary scale at unit variance). A design may also
train with its own ``agent`` (a name and options; the shared agent's options apply only to the same agent)
and change keys of the shared ``budget`` (``group_size``, ``time_limit_s``), so one bench compares agents
on one reward as well as rewards under one agent (``benchmarks/sentiment_agents.yaml``):

    task: sentiment
    model: rlfb-tiny
    agent: {name: ppo}
    budget: {updates: 40, num_envs: 32}
    seeds: [0, 1]
    eval: {num_prompts: 64, every: 10}
    gold: [sentiment]
    designs:
      - {name: vader, rewards: [sentiment]}
      - {name: vader_no_kl, rewards: [sentiment], kl: off}
      - name: rm_200
        rewards: [{name: reward_model, train_reward_model: {kind: pairwise, size: 200}}]

For every design and seed the bench derives a run config and trains it with :class:`rlfb.trainer.Trainer`
(the one training loop); a trainer callback evaluates the policy on the held-out prompts every
``eval.every`` updates with :func:`rlfb.evaluation.evaluate_policy`, scoring each completion with the gold
rewards *and* the design's own rewards, so the two curves come from the same samples. Before training
(update 0) every policy equals the base model (LoRA starts at zero), so update 0 is measured once per
design on the base model. Reward models given as a ``train_reward_model`` recipe are synthesized and
trained first (:mod:`rlfb.rewards.feedback`, :mod:`rlfb.rewards.training`) and cached in
``OUTPUT/reward_models``. Outputs: see :mod:`rlfb.bench_plots`; run directories (TensorBoard, metrics,
adapters) go to ``OUTPUT/runs/{design}__seed{seed}``. A finished run is reused when the bench is rerun.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlfb.bench_plots import EvalPoint, RunRecord, results_markdown, summarize, write_csv, write_plots
from rlfb.bench_verdict import PROXY_KEY, VerdictBounds
from rlfb.config import (
    RewardConfig,
    RewardScaleConfig,
    RunConfig,
    check_section,
    config_from_dict,
    parse_yaml,
)
from rlfb.errors import ConfigError

RUNS_DIR = "runs"
REWARD_MODELS_DIR = "reward_models"
RUN_EVAL_FILE = "bench_eval.json"
# Run-config sections a bench config shares with every run (checked by rlfb.config).
SHARED_SECTIONS = ("task", "model", "lora", "agent", "sampling", "budget", "device")
# Bench KL keys -> agent hyper-parameters (rlfb.agents.PPOConfig / ReinforceConfig).
KL_KEYS = {"coef": "kl_coef", "target": "kl_target", "horizon": "kl_horizon", "penalty": "kl_penalty"}
NO_KL = {"kl_coef": 0.0, "kl_target": None}
# The default KL bound of the verdict, in units of the bench agent's kl_target: the adaptive controller
# holds the KL near its target, so twice the target is a policy the controller failed to hold (the same
# bound as RESULTS.md's stability runs).
KL_BOUND_PER_TARGET = 2.0


@dataclass
class BenchEvalConfig:
    """Held-out evaluation of every run."""

    num_prompts: int = 64
    every: int = 10
    seed: int = 1234
    perturb: list[str] | None = None  # also evaluate on perturbed held-out prompts (rlfb/envs/perturbations.py)
    perturb_rate: float = 0.1


@dataclass
class KLSettings:
    """A design's KL penalty; unset keys keep the agent's defaults. ``kl: off`` means coef 0, no target."""

    coef: float | None = None
    target: float | None = None
    horizon: float | None = None
    penalty: str | None = None


@dataclass
class RewardModelRecipe:
    """A reward model the bench trains first: feedback synthesized from the task's gold, then training."""

    kind: str = "pairwise"
    size: int = 2000
    noise: float = 0.1
    seed: int = 0
    epochs: float = 2.0
    learning_rate: float = 1e-3
    batch_size: int = 32
    from_model: bool = False  # sample the completions from the base model instead of the grammar


@dataclass
class Design:
    """One reward design: its rewards (run-config reward entries) and its KL agent parameters."""

    name: str
    rewards: list[RewardConfig]
    agent_kl: dict[str, Any]
    recipes: dict[int, RewardModelRecipe] = field(default_factory=dict)  # reward index -> recipe
    reward_scale: dict[str, Any] = field(default_factory=dict)  # the run config's reward_scale section
    agent: dict[str, Any] = field(default_factory=dict)  # the design's own agent section (another agent, options)
    budget: dict[str, Any] = field(default_factory=dict)  # keys of the shared budget this design changes
    task: Any = None  # the design's own training task (e.g. perturbed prompts); None: the shared one


@dataclass
class BenchConfig:
    """A validated bench config (see the module docstring)."""

    shared: dict[str, Any]
    eval: BenchEvalConfig
    gold: list[RewardConfig]
    designs: list[Design]
    seeds: list[int]
    output_dir: str
    raw: dict[str, Any]
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    verdict: VerdictBounds = field(default_factory=VerdictBounds)  # max_kl resolved (see _verdict_bounds)
    verdict_note: str = ""  # where the bounds came from, for results.md

    @property
    def task_name(self) -> str:
        task = self.shared.get("task", "sentiment")
        return task if isinstance(task, str) else str(task.get("name", "sentiment"))

    def run_config(self, design: Design, seed: int, runs_dir: str | Path = "runs",
                   progress_bar: bool = True) -> RunConfig:
        """The run config of ``design`` with ``seed``: shared sections, the design's rewards and KL."""
        data: dict[str, Any] = {key: _plain(value) for key, value in self.shared.items()}
        agent = data.get("agent", {"name": "ppo"})
        agent = {"name": agent} if isinstance(agent, str) else dict(agent)
        if design.agent.get("name", agent.get("name", "ppo")) != agent.get("name", "ppo"):
            agent = {}  # another agent: the shared agent's options are not its options
        agent.update(design.agent)
        agent.update(design.agent_kl)
        budget = {**data.get("budget", {}), **design.budget}
        if design.task is not None:
            data["task"] = design.task
        data.update(
            agent=agent, budget=budget, seed=seed, output_dir=str(runs_dir),
            rewards=[dataclasses.asdict(reward) for reward in design.rewards], reward_scale=dict(design.reward_scale),
            # Held-out evaluation is the bench's (gold + design rewards on the same samples), not the trainer's.
            eval={"num_prompts": 0, "seed": self.eval.seed},
            logging={"run_name": run_name(design.name, seed), "progress_bar": progress_bar},
            checkpoint={"every": 0, "keep_last": 1})
        return config_from_dict(data)


# A design's keys: its rewards and KL, and optionally its own agent (to compare agents on one reward), the
# budget keys it changes (a group size, a time limit) and its own training task (perturbed prompts); every
# design is evaluated on the held-out prompts of its own task's eval split.
DESIGN_KEYS = ("name", "rewards", "kl", "reward_scale", "agent", "budget", "task")
TOP_LEVEL_KEYS = (*SHARED_SECTIONS, "eval", "gold", "designs", "seeds", "output_dir", "threads", "verdict")


def load_bench_config(path: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read and validate a bench YAML file, with ``key=value`` overrides (``budget.updates=2``, ``seeds=[0]``).

    Raises:
        ConfigError: naming the offending key, e.g. ``'designs.1.kl.coef' must be a number``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench config '{path}' does not exist; an example is benchmarks/sentiment_reward_designs.yaml")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"bench config '{path}' is not valid YAML: {error}") from error
    return bench_config_from_dict(data if data is not None else {}, overrides)


def bench_config_from_dict(data: Any, overrides: Sequence[str] = ()) -> BenchConfig:
    """Validate plain bench data (as read from YAML); see :func:`load_bench_config`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a bench config must be a mapping of sections, got {type(data).__name__}")
    data = json.loads(json.dumps(data))  # a deep copy that overrides may edit
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"override '{override}' is not of the form key=value, e.g. budget.updates=2")
        _set_dotted(data, key.strip(), parse_yaml(value) if value.strip() else None)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in the bench config{hint}; valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("gold", "designs"):
        if not data.get(key):
            raise ConfigError(f"the bench config needs '{key}': a non-empty list (see docs/benchmarks.md)")
    eval_config = BenchEvalConfig(**check_section(BenchEvalConfig, _mapping(data.get("eval", {}), "eval"), "eval"))
    _require(eval_config.num_prompts >= 1, "eval.num_prompts", eval_config.num_prompts, ">= 1")
    _require(eval_config.every >= 0, "eval.every", eval_config.every, ">= 0 (0: only before and after)")
    if eval_config.perturb is not None:
        from rlfb.envs.perturbations import check_perturbation

        try:
            check_perturbation(eval_config.perturb, eval_config.perturb_rate)
        except ConfigError as error:
            raise ConfigError(f"eval.perturb: {error}") from None
    seeds = data.get("seeds", [0])
    _require(isinstance(seeds, list) and bool(seeds) and all(type(s) is int for s in seeds)
             and len(set(seeds)) == len(seeds), "seeds", seeds, "a non-empty list of distinct integers")
    gold = [_reward_entry(entry, f"gold.{i}") for i, entry in enumerate(_list(data["gold"], "gold"))]
    designs = [_design(entry, f"designs.{i}") for i, entry in enumerate(_list(data["designs"], "designs"))]
    names = [design.name for design in designs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    _require(not duplicates, "designs", duplicates, "distinct design names")
    threads = data.get("threads", 0)
    _require(type(threads) is int and threads >= 0, "threads", threads, "an integer >= 0 (0: torch's default)")
    shared = {key: data[key] for key in SHARED_SECTIONS if key in data}
    config = BenchConfig(shared=shared, eval=eval_config, gold=gold, designs=designs, seeds=seeds,
                         output_dir=str(data.get("output_dir", "bench")), raw=data, threads=threads)
    for design in designs:  # every derived run config must be valid before anything trains
        try:
            run_config = config.run_config(design, seeds[0])
            _check_agent(run_config)
        except ConfigError as error:
            raise ConfigError(f"design '{design.name}': {error}") from error
    if any(design.recipes for design in designs) and config.task_name not in ("sentiment", "arithmetic"):
        raise ConfigError(f"train_reward_model synthesizes feedback for the built-in tasks sentiment and "
                          f"arithmetic only; the task is '{config.task_name}'. Give a trained model instead: "
                          "{name: reward_model, kwargs: {path: DIR}}")
    config.verdict, config.verdict_note = _verdict_bounds(_mapping(data.get("verdict", {}), "verdict"), config)
    return config


def _verdict_bounds(section: dict[str, Any], config: BenchConfig) -> tuple[VerdictBounds, str]:
    """The ``verdict`` section checked, ``max_kl`` (unset or null) defaulting to twice the bench agent's ``kl_target``."""
    bounds = VerdictBounds(**check_section(VerdictBounds, section, "verdict"))
    _require(bounds.noise_z > 0, "verdict.noise_z", bounds.noise_z, "> 0 (standard errors; 2 is about 95%)")
    _require(bounds.max_kl is None or bounds.max_kl > 0, "verdict.max_kl", bounds.max_kl,
             "> 0, or null for twice the agent's kl_target")
    _require(bounds.max_fluency_drop is None or bounds.max_fluency_drop > 0, "verdict.max_fluency_drop",
             bounds.max_fluency_drop, "> 0, or null for no bound")
    if bounds.max_kl is not None:
        return bounds, "KL bound as configured (verdict.max_kl)."
    from rlfb.agents.configs import agent_config_class

    # The bench's agent without any design's KL settings: one bound for every design, so they compare.
    shared = config.run_config(dataclasses.replace(config.designs[0], agent_kl={}), config.seeds[0])
    defaults = {f.name: f.default for f in dataclasses.fields(agent_config_class(shared.agent.name))}
    kl_target = shared.agent.params.get("kl_target", defaults.get("kl_target"))
    if kl_target is None:
        return bounds, "No KL bound: the agent has no kl_target; set verdict.max_kl."
    return (dataclasses.replace(bounds, max_kl=KL_BOUND_PER_TARGET * kl_target),
            f"KL bound {KL_BOUND_PER_TARGET:g} x the agent's kl_target {kl_target:g} (verdict.max_kl overrides it).")


def _design(entry: Any, where: str) -> Design:
    entry = _mapping(entry, where)
    unknown = sorted(set(entry) - set(DESIGN_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}'; valid keys in a design: {', '.join(DESIGN_KEYS)}")
    name = entry.get("name")
    _require(isinstance(name, str) and bool(name) and name.replace("_", "").replace("-", "").isalnum(),
             f"{where}.name", name, "a name of letters, digits, '_' or '-'")
    rewards, recipes = [], {}
    for index, reward in enumerate(_list(entry.get("rewards"), f"{where}.rewards")):
        reward = {"name": reward} if isinstance(reward, str) else _mapping(reward, f"{where}.rewards.{index}")
        recipe = reward.pop("train_reward_model", None) if isinstance(reward, dict) else None
        if recipe is not None:
            recipes[index] = RewardModelRecipe(**check_section(
                RewardModelRecipe, _mapping(recipe, f"{where}.rewards.{index}.train_reward_model"),
                f"{where}.rewards.{index}.train_reward_model"))
            _check_recipe(recipes[index], f"{where}.rewards.{index}.train_reward_model")
            reward.setdefault("name", "reward_model")
        rewards.append(_reward_entry(reward, f"{where}.rewards.{index}",
                                     needs_path=recipe is None))
    reward_scale = check_section(RewardScaleConfig, _mapping(entry.get("reward_scale", {}), f"{where}.reward_scale"),
                                 f"{where}.reward_scale")
    agent = entry.get("agent", {})
    agent = {"name": agent} if isinstance(agent, str) else _mapping(agent, f"{where}.agent")
    return Design(name=name, rewards=rewards, agent_kl=_kl(entry.get("kl"), f"{where}.kl"), recipes=recipes,
                  reward_scale=reward_scale, agent=agent, budget=_mapping(entry.get("budget", {}), f"{where}.budget"),
                  task=entry.get("task"))


def _kl(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if value is False or (isinstance(value, str) and value.lower() in ("off", "none")):
        return dict(NO_KL)
    settings = check_section(KLSettings, _mapping(value, where), where)
    return {KL_KEYS[key]: setting for key, setting in settings.items()}


def _reward_entry(entry: Any, where: str, needs_path: bool = True) -> RewardConfig:
    from rlfb.rewards.registry import resolve

    entry = {"name": entry} if isinstance(entry, str) else dict(_mapping(entry, where))
    reward = RewardConfig(**check_section(RewardConfig, entry, where))
    _require(bool(reward.name), f"{where}.name", reward.name, "a registered reward (see `rlfb rewards`)")
    try:
        resolve(reward.name)
    except ConfigError as error:
        raise ConfigError(f"'{where}.name': {error}") from error
    if reward.name == "reward_model" and needs_path and "path" not in reward.kwargs:
        raise ConfigError(f"'{where}' is a reward_model without kwargs.path; give {{kwargs: {{path: DIR}}}} "
                          "or a train_reward_model recipe {kind: pairwise, size: 2000, noise: 0.1}")
    return reward


def _check_recipe(recipe: RewardModelRecipe, where: str) -> None:
    from rlfb.rewards.feedback import KINDS

    _require(recipe.kind in KINDS, f"{where}.kind", recipe.kind, f"one of {', '.join(KINDS)}")
    _require(recipe.size >= 10, f"{where}.size", recipe.size, ">= 10 feedback rows")
    _require(0.0 <= recipe.noise <= 1.0, f"{where}.noise", recipe.noise, "in [0, 1]")


def _check_agent(config: RunConfig) -> None:
    """The checks the trainer makes before loading anything (agent name, hyper-parameter names and types)."""
    from rlfb.trainer import Trainer

    Trainer(config)


# --------------------------------------------------------------------------------------------- running
Progress = Callable[[str], None]


def run_bench(config: BenchConfig, output_dir: str | Path | None = None, say: Progress = print,
              progress_bar: bool = True) -> Path:
    """Train and evaluate every design with every seed, then write the results; returns the output directory."""
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(output_dir or config.output_dir)
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    (out / "bench_config.yaml").write_text(yaml.safe_dump(config.raw, sort_keys=False))
    designs = [prepare_reward_models(config, design, out / REWARD_MODELS_DIR, say) for design in config.designs]
    say(f"bench: {len(designs)} designs x {len(config.seeds)} seeds on task '{config.task_name}', "
        f"{config.run_config(designs[0], config.seeds[0]).budget.updates} updates each; output {out}")
    started = time.perf_counter()
    base_policy = _base_policy(config)
    base_points = {design.name: _evaluate(config, config.run_config(design, config.seeds[0]), design, base_policy, 0)
                   for design in designs}
    del base_policy
    clock = _Clock(total=len(designs) * len(config.seeds), started=started)
    records = []
    for design in designs:
        for seed in config.seeds:
            say(f"bench: [{clock.done + 1}/{clock.total}] design '{design.name}' seed {seed}"
                f"{clock.left_text()}")
            records.append(run_design(config, design, seed, out / RUNS_DIR, base_points[design.name],
                                      progress_bar=progress_bar, say=say, clock=clock))
            clock.finish_run()
    write_results(config, records, base_points, out)
    say(f"bench: done in {(time.perf_counter() - started) / 60:.1f} min; results in {out / 'results.md'}")
    return out


def prepare_reward_models(config: BenchConfig, design: Design, directory: Path, say: Progress = print) -> Design:
    """``design`` with every ``train_reward_model`` recipe replaced by the path of a trained (cached) model."""
    if not design.recipes:
        return design
    rewards = list(design.rewards)
    for index, recipe in design.recipes.items():
        path = train_recipe(recipe, config.task_name, _model_name(config), directory, say)
        reward = rewards[index]
        rewards[index] = dataclasses.replace(reward, kwargs={**reward.kwargs, "path": str(path)})
    return dataclasses.replace(design, rewards=rewards, recipes={})


def train_recipe(recipe: RewardModelRecipe, task: str, base_model: str, directory: Path,
                 say: Progress = print) -> Path:
    """Synthesize feedback and train a reward model as ``recipe`` says, unless it is cached in ``directory``.

    The training is the pipeline's reward_model stage (:func:`rlfb.pipeline.stages.build_reward_model`).
    """
    from rlfb.pipeline.config import RewardModelStage
    from rlfb.pipeline.stages import build_reward_model
    from rlfb.rewards.training import METADATA_FILE

    key = json.dumps({"recipe": dataclasses.asdict(recipe), "task": task, "model": base_model}, sort_keys=True)
    path = directory / f"{task}_{recipe.kind}_{recipe.size}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (path / "reward_model" / METADATA_FILE).is_file():
        say(f"bench: reusing the reward model {path}")
        return path / "reward_model"
    say(f"bench: training a {recipe.kind} reward model on {recipe.size} synthesized rows (noise {recipe.noise})")
    path.mkdir(parents=True, exist_ok=True)
    stage = RewardModelStage(feedback_kind=recipe.kind, source="synthesized", size=recipe.size, noise=recipe.noise,
                             from_model=recipe.from_model, epochs=recipe.epochs, learning_rate=recipe.learning_rate,
                             batch_size=recipe.batch_size)
    metrics = build_reward_model(stage, task, base_model, recipe.seed, path)
    say("bench: reward model held-out " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "rows"))
    return path / "reward_model"


def _base_policy(config: BenchConfig) -> Any:
    """The policy at update 0 of every run: the base model with a fresh LoRA adapter, which is zero."""
    from rlfb.models.policy import LoraSettings, Policy

    run_config = config.run_config(config.designs[0], config.seeds[0])
    lora = run_config.lora
    return Policy.from_pretrained(run_config.model.name, value_head=False, device=run_config.device,
                                  lora=LoraSettings(r=lora.r, alpha=lora.alpha, target_modules=lora.target_modules))


def _same_run_config(run_dir: Path, run_config: RunConfig) -> bool:
    """Whether the run in ``run_dir`` was trained with ``run_config`` (the progress bar aside)."""
    from rlfb.checkpoint import CONFIG_FILE
    from rlfb.config import load_config

    try:
        saved = load_config(run_dir / CONFIG_FILE)
    except (OSError, ConfigError):
        return False
    def comparable(config: RunConfig) -> RunConfig:
        return dataclasses.replace(config, logging=dataclasses.replace(config.logging, progress_bar=True))
    return comparable(saved) == comparable(run_config)


def run_design(config: BenchConfig, design: Design, seed: int, runs_dir: Path, base: EvalPoint,
               progress_bar: bool = True, say: Progress = print, clock: _Clock | None = None) -> RunRecord:
    """Train ``design`` with ``seed`` (or reuse a finished run) and return its evaluation curve.

    The training is the pipeline's rl stage (:func:`rlfb.pipeline.stages.rl_stage_trainer`), each
    evaluation its eval stage's (:func:`rlfb.pipeline.stages.evaluate_gold`) with the design's rewards added.
    """
    from rlfb.pipeline.stages import rl_stage_trainer
    from rlfb.trainer import Trainer

    run_dir = runs_dir / run_name(design.name, seed)
    saved = run_dir / RUN_EVAL_FILE
    run_config = config.run_config(design, seed, runs_dir, progress_bar=progress_bar)
    if saved.is_file():
        record = _load_record(saved)
        if record is not None and _same_run_config(run_dir, run_config):
            say(f"bench: reusing the finished run {run_dir}")
            return record
        if record is not None:
            say(f"bench: the config of {run_dir.name} changed since it ran; training it again")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run from an interrupted bench, or a stale one: start it again
    points = [base]
    trainer: Trainer | None = None

    def evaluate_during_training(step: int, metrics: dict[str, float]) -> None:
        assert trainer is not None
        if clock is not None:
            clock.update(step, run_config.budget.updates)
        if step == 1:  # update 0 goes to TensorBoard too, so each run's curves start at the base model
            trainer.logger.record_many(_as_metrics(base.values))
            trainer.logger.dump(0)
        last = (run_config.budget.updates is not None and step >= run_config.budget.updates) or (
            run_config.budget.time_limit_s is not None and trainer.elapsed_s >= run_config.budget.time_limit_s)
        if last or (config.eval.every and step % config.eval.every == 0):
            point = _evaluate(config, run_config, design, trainer.policy, step)
            points.append(point)
            values = point.values
            trainer.logger.record_many(_as_metrics(values))
            trainer.logger.dump(step)
            say(f"bench: '{design.name}' seed {seed} update {step}: "
                + ", ".join(f"{key} {values[key]:.3f}" for key in _headline(config, values))
                + (clock.left_text() if clock is not None else ""))

    trainer = rl_stage_trainer(run_config, run_dir, callbacks=[evaluate_during_training], say=say)
    result = trainer.train()
    if result.interrupted:  # the trainer saved a checkpoint; the bench reruns this run from the start
        raise KeyboardInterrupt
    record = RunRecord(design=design.name, seed=seed, points=points, train_seconds=trainer.elapsed_s,
                       run_dir=str(Path(RUNS_DIR) / result.run_dir.name))
    saved.write_text(json.dumps({"design": record.design, "seed": seed, "train_seconds": record.train_seconds,
                                 "run_dir": record.run_dir,
                                 "points": [dataclasses.asdict(point) for point in points]}, indent=1))
    return record


def write_results(config: BenchConfig, records: Sequence[RunRecord], base_points: Mapping[str, EvalPoint],
                  out: Path) -> None:
    """``results.md``, ``results.csv``, ``runs.csv`` and the plots in ``out``."""
    gold_keys = [gold_key(reward) for reward in config.gold]
    summaries = [summarize([r for r in records if r.design == design.name], gold_keys[0], config.verdict)
                 for design in config.designs]
    base = dict(next(iter(base_points.values())).values)
    base.pop(PROXY_KEY, None)  # the base model has no trained reward of its own
    title = f"Reward designs on the {config.task_name} task"
    (out / "results.md").write_text(results_markdown(summaries, gold_keys, title, base=base,
                                                     notes=[config.verdict_note], bounds=config.verdict))
    write_csv(summaries, records, out)
    write_plots(summaries, gold_keys[0], out)


def gold_key(reward: RewardConfig) -> str:
    """The measure name of a gold reward: ``gold/LABEL``."""
    return f"gold/{reward.label or reward.name}"


def run_name(design: str, seed: int) -> str:
    return f"{design}__seed{seed}"


# --------------------------------------------------------------------------------------------- helpers
def _evaluate(config: BenchConfig, run_config: RunConfig, design: Design, policy: Any, step: int) -> EvalPoint:
    """Gold rewards, the design's own reward and the text measures, all on one set of held-out samples.

    The gold and trained rewards are kept per prompt too: the verdict's prompt noise needs them.
    """
    from rlfb.envs.tasks import make_task
    from rlfb.pipeline.stages import evaluate_gold
    from rlfb.rewards import RewardSpec

    task = run_config.task
    rows = list(make_task({"name": task.name, **task.kwargs} if task.kwargs else task.name).eval_rows())
    rows = rows[: config.eval.num_prompts]
    design_specs = [RewardSpec(name=r.name, kwargs=dict(r.kwargs), weight=r.weight,
                               label=f"design/{r.label or r.name}") for r in design.rewards]

    def measure(prompt_rows: Sequence[Mapping[str, Any]]) -> Any:  # the pipeline's eval stage, on these rows
        return evaluate_gold(policy, run_config, config.gold, num_prompts=len(prompt_rows), seed=config.eval.seed,
                             extra=design_specs, rows=[dict(row) for row in prompt_rows])

    result = measure(rows)
    values = {gold_key(r): result.rewards[gold_key(r)] for r in config.gold}
    # The design's reward is its weighted sum; the evaluation's "total" mixes in the gold rewards.
    values[PROXY_KEY] = sum((spec.weight * result.rewards[str(spec.label)] for spec in design_specs), 0.0)
    values.update(kl=result.kl, fluency=result.fluency, distinct_1=result.distinct_1, distinct_2=result.distinct_2,
                  completion_length=result.completion_length)
    if config.eval.perturb:  # the same prompts perturbed, the same sampling seed: the robustness gap
        perturbed = measure(_perturbed(rows, config.eval.perturb, config.eval.perturb_rate, config.eval.seed))
        first_gold = gold_key(config.gold[0])
        values["gold_perturbed"] = perturbed.rewards[first_gold]
        values["robustness_gap"] = result.rewards[first_gold] - perturbed.rewards[first_gold]
    prompt_values = {gold_key(r): result.prompt_rewards[gold_key(r)] for r in config.gold}
    prompt_values[PROXY_KEY] = [sum(spec.weight * result.prompt_rewards[str(spec.label)][row] for spec in design_specs)
                                for row in range(len(rows))]
    return EvalPoint(step, {key: float(value) for key, value in values.items()}, prompt_values)


def _perturbed(rows: Sequence[Mapping[str, Any]], kinds: Sequence[str], rate: float, seed: int) -> list[dict[str, Any]]:
    """``rows`` with perturbed prompts, each drawn from its own generator (the same at every evaluation)."""
    import numpy as np

    from rlfb.envs.perturbations import perturb_prompt

    return [{**row, "prompt": perturb_prompt(str(row["prompt"]), kinds, rate, np.random.default_rng([seed, index]))}
            for index, row in enumerate(rows)]


def _as_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """Bench measures as logged metric names: ``eval/gold/sentiment``, ``eval/design_reward``, ``eval/kl``..."""
    return {f"eval/{key}": value for key, value in values.items() if not math.isnan(value)}


def _headline(config: BenchConfig, values: Mapping[str, float]) -> list[str]:
    return [gold_key(config.gold[0]), PROXY_KEY, "kl"]


def _load_record(path: Path) -> RunRecord | None:
    try:
        data = json.loads(path.read_text())
        return RunRecord(design=data["design"], seed=int(data["seed"]), train_seconds=float(data["train_seconds"]),
                         run_dir=data.get("run_dir", ""),
                         points=[EvalPoint(int(p["step"]), dict(p["values"]), dict(p.get("prompt_values", {})))
                                 for p in data["points"]])
    except (ValueError, KeyError, TypeError):
        return None


def _model_name(config: BenchConfig) -> str:
    model = config.shared.get("model", "rlfb-tiny")
    return model if isinstance(model, str) else str(model.get("name", "rlfb-tiny"))


class _Clock:
    """Time left, from the wall-clock time per update so far (evaluation included)."""

    def __init__(self, total: int, started: float) -> None:
        self.total, self.started, self.done = total, started, 0
        self.updates_done = 0  # updates of finished runs
        self.current = 0  # updates of the running run
        self.per_run = 0

    def update(self, step: int, updates_per_run: int | None) -> None:
        self.current, self.per_run = step, updates_per_run or 0

    def finish_run(self) -> None:
        self.done += 1
        self.updates_done += self.current
        self.current = 0

    def left_text(self) -> str:
        done = self.updates_done + self.current
        if not done or not self.per_run:
            return ""
        rate = (time.perf_counter() - self.started) / done
        left = rate * (self.total * self.per_run - done)
        return f" (about {left / 60:.1f} min left)"


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' is {value!r}; it must be {accepted}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{where}' must be a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'{where}' must be a non-empty list, got {type(value).__name__} {value!r}")
    return value


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts and lists (missing mappings are created)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"'{'.'.join(parts[:depth + 1])}': index {part} is out of range "
                                  f"(the list has {len(node)} items)")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and not isinstance(node.get(part), (dict, list)):
                node[part] = {"name": node[part]} if isinstance(node.get(part), str) else {}
        else:
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[:depth])}' is {node!r}, not a section")
        if last:
            node[index] = value
            return
        node = node[index]
