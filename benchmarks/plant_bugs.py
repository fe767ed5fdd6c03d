"""Mutation check: plant one realistic single-line bug at a time and see whether the tests notice.

    python benchmarks/plant_bugs.py                 # every planted bug, its named test files, one job
    python benchmarks/plant_bugs.py --only trainer-callback-stop --full
    python benchmarks/plant_bugs.py --jobs 2 --list

Each bug is a (file, exact source snippet, replacement) triple. For each one the tree is copied to a
temporary directory (rlfb/, tests/, docs/, configs/ and the packaging files), the snippet is replaced
(it must occur exactly once, otherwise the script stops and says "snippet no longer present"), and the
bug's named test files run one after another with ``-x -q -p no:cacheprovider``; the first failing test
"caught" the bug (the table names it, so a flaky failure can be told from a real catch). ``--full`` also runs the whole default suite for bugs the named files missed. The
table at the end lists every bug, the test file that caught it (or "SURVIVED"), and the catch rate.

The bugs cover how the trainer, the agents, the sampler, evaluation and the bench *use* the math:
cadences and budgets, the value of every logged metric, every agent option and sampling setting, every
evaluation measure and every bench column (the bench's verdict flag is left out). A bug that a test
catches only because the code no longer imports does not count for much; they are all meant to change
behaviour quietly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("rlfb", "tests", "docs", "configs", "benchmarks", "setup.cfg", "pyproject.toml")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider")
TEST_TIMEOUT_S = 600  # a planted bug that makes a test hang counts as caught (by the timeout)


@dataclass(frozen=True)
class PlantedBug:
    """One single-line change that breaks a documented behaviour.

    Attributes:
        id: Short unique name (``--only`` takes it).
        behaviour: The class of behaviour broken (trainer, metric, agent-option, sampling, evaluation, bench).
        path: File to change, relative to the repository root.
        snippet: Exact source text; must occur exactly once in the file.
        replacement: What the snippet becomes.
        tests: Test files expected to catch it, tried in order.
    """

    id: str
    behaviour: str
    path: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]


TRAINER = "rlfb/trainer.py"
PPO = "rlfb/agents/ppo.py"
REINFORCE = "rlfb/agents/reinforce.py"
SAMPLER = "rlfb/models/sampler.py"
DECODING = "rlfb/models/decoding.py"
EVALUATION = "rlfb/evaluation.py"
BENCH = "rlfb/bench.py"
BENCH_PLOTS = "rlfb/bench_plots.py"
AGENT_CONFIGS = "rlfb/agents/configs.py"

TRAINER_TESTS = ("tests/test_trainer_wiring.py", "tests/test_trainer.py")
METRIC_TESTS = ("tests/test_metrics_values.py", "tests/test_trainer.py")
AGENT_TESTS = ("tests/test_agent_options.py", "tests/agents/test_agents.py", "tests/agents/test_math.py")
SAMPLING_TESTS = ("tests/test_sampling_settings.py", "tests/models/test_sampler.py",
                  "tests/models/test_decoding.py")
EVALUATION_TESTS = ("tests/test_evaluation_metrics.py", "tests/test_trainer.py")
BENCH_TESTS = ("tests/test_bench_columns.py", "tests/test_bench.py")


def _bug(id: str, behaviour: str, path: str, snippet: str, replacement: str,
         tests: tuple[str, ...]) -> PlantedBug:
    return PlantedBug(id, behaviour, path, snippet, replacement, tests)


BUGS: tuple[PlantedBug, ...] = (
    # ----------------------------------------------------------------------------------- trainer
    _bug("trainer-budget-updates", "trainer", TRAINER,
         "spent = budget.updates is not None and self.step >= budget.updates",
         "spent = budget.updates is not None and self.step > budget.updates", TRAINER_TESTS),
    _bug("trainer-time-limit", "trainer", TRAINER,
         "spent = distributed.agree(spent or self.elapsed_s >= budget.time_limit_s)",
         "spent = distributed.agree(spent or self.step >= budget.time_limit_s)", TRAINER_TESTS),
    _bug("trainer-elapsed-not-accumulated", "trainer", TRAINER,
         "self.elapsed_s += rollout_s + update_s", "self.elapsed_s = rollout_s + update_s", TRAINER_TESTS),
    _bug("trainer-callback-stop", "trainer", TRAINER,
         "if distributed.agree(any(result is False for result in keep_going)):",
         "if distributed.agree(all(result is False for result in keep_going)):", TRAINER_TESTS),
    _bug("trainer-log-every", "trainer", TRAINER,
         "if self.step % logging_config.log_every == 0:",
         "if (self.step - 1) % logging_config.log_every == 0:", TRAINER_TESTS),
    _bug("trainer-samples-every", "trainer", TRAINER,
         "if logging_config.samples_every and self.step % logging_config.samples_every == 0:",
         "if logging_config.samples_every and self.step % logging_config.log_every == 0:", TRAINER_TESTS),
    _bug("trainer-eval-every", "trainer", TRAINER,
         "if config.eval.every and self.step % config.eval.every == 0 and not self._budget_spent():",
         "if config.eval.every and self.step % config.checkpoint.every == 0 and not self._budget_spent():",
         TRAINER_TESTS),
    _bug("trainer-checkpoint-every", "trainer", TRAINER,
         "if config.checkpoint.every and self.step % config.checkpoint.every == 0 \\",
         "if config.checkpoint.every and self.step % config.eval.every == 0 \\", TRAINER_TESTS),
    _bug("trainer-eval-seed", "trainer", TRAINER,
         "seed=eval_config.seed, num_samples=eval_config.num_samples,",
         "seed=self.config.seed, num_samples=eval_config.num_samples,", TRAINER_TESTS),
    _bug("trainer-eval-num-samples", "trainer", TRAINER,
         "seed=eval_config.seed, num_samples=eval_config.num_samples,",
         "seed=eval_config.seed,", TRAINER_TESTS),
    _bug("trainer-sampling-temperature", "trainer", TRAINER,
         "SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,",
         "SamplingConfig(top_k=config.sampling.top_k,", TRAINER_TESTS),
    _bug("trainer-sampling-top-k", "trainer", TRAINER,
         "SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,",
         "SamplingConfig(temperature=config.sampling.temperature,", TRAINER_TESTS),
    _bug("trainer-sampling-top-p", "trainer", TRAINER,
         "top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_new_tokens)",
         "max_new_tokens=config.sampling.max_new_tokens)", TRAINER_TESTS),
    _bug("trainer-agent-temperature", "trainer", AGENT_CONFIGS,
         'decided = {"temperature": config.sampling.temperature,', 'decided = {"temperature": 1.0,',
         TRAINER_TESTS),
    _bug("trainer-agent-total-updates", "trainer", AGENT_CONFIGS,
         '"total_updates": config.budget.updates,', '"total_updates": config.budget.num_envs,', TRAINER_TESTS),
    # ----------------------------------------------------------------------------------- rollout metrics
    _bug("metric-reward-mean", "metric", TRAINER,
         '"rollout/reward_mean": float(scores.mean()) if', '"rollout/reward_mean": float(scores.median()) if',
         METRIC_TESTS),
    _bug("metric-reward-std", "metric", TRAINER,
         "float(scores.std(unbiased=False))", "float(scores.std())", METRIC_TESTS),
    _bug("metric-completion-length", "metric", TRAINER,
         '"length": mask.sum(1)', '"length": mask.sum(1) - 1', METRIC_TESTS),
    _bug("metric-truncated-fraction", "metric", TRAINER,
         'float((~rows["ended"]).double().mean())', 'float(rows["ended"].double().mean())', METRIC_TESTS),
    _bug("metric-reward-component", "metric", TRAINER,
         'values = rows[f"reward/{name}"].double()', 'values = rows["score"].double()', METRIC_TESTS),
    _bug("metric-ppo-kl-penalty", "metric", PPO,
         '"train/kl_penalty": float(-kl_coef * sequence_kl_tensor),',
         '"train/kl_penalty": float(-kl_coef * kl.mean()),', METRIC_TESTS + AGENT_TESTS),
    _bug("metric-ppo-advantage-mean", "metric", PPO,
         "raw_advantage_mean = float(advantage_moments[0])",
         "raw_advantage_mean = float(advantages.mean())", METRIC_TESTS + AGENT_TESTS),
    _bug("metric-ppo-explained-variance", "metric", PPO,
         '"train/explained_variance": explained_variance(residual_variance, return_variance),',
         '"train/explained_variance": explained_variance(return_variance, residual_variance),', METRIC_TESTS + AGENT_TESTS),
    _bug("metric-reinforce-return-mean", "metric", REINFORCE,
         '"train/return_mean": mean_return,', '"train/return_mean": float(rollout.scores.mean()),',
         METRIC_TESTS + AGENT_TESTS),
    _bug("metric-reinforce-advantage-std", "metric", REINFORCE,
         '"train/advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0}',
         '"train/advantage_std": float(advantages.abs().mean()) if advantages.numel() > 1 else 0.0}',
         METRIC_TESTS + AGENT_TESTS),
    _bug("metric-reinforce-baseline", "metric", REINFORCE,
         'metrics["train/baseline"] = baseline_used', 'metrics["train/baseline"] = self.baseline_value',
         METRIC_TESTS + AGENT_TESTS),
    # ----------------------------------------------------------------------------------- agent options
    _bug("ppo-learning-rate", "agent-option", PPO,
         "learning_rate=c.learning_rate,", "learning_rate=1e-3,", AGENT_TESTS),
    _bug("ppo-lr-schedule", "agent-option", PPO,
         "lr_schedule=c.lr_schedule,", 'lr_schedule="constant",', AGENT_TESTS),
    _bug("ppo-epochs", "agent-option", PPO,
         "for _ in range(c.epochs):", "for _ in range(c.num_minibatches):", AGENT_TESTS),
    _bug("ppo-num-minibatches", "agent-option", PPO,
         "minibatch_size = max(1, batch_size // c.num_minibatches)", "minibatch_size = max(1, batch_size // c.epochs)",
         AGENT_TESTS),
    _bug("ppo-gamma", "agent-option", PPO,
         "generalized_advantages(rewards, old_values, mask, c.gamma, c.gae_lambda)",
         "generalized_advantages(rewards, old_values, mask, 1.0, c.gae_lambda)", AGENT_TESTS),
    _bug("ppo-gae-lambda", "agent-option", PPO,
         "generalized_advantages(rewards, old_values, mask, c.gamma, c.gae_lambda)",
         "generalized_advantages(rewards, old_values, mask, c.gamma, 0.95)", AGENT_TESTS),
    _bug("ppo-clip-range", "agent-option", PPO,
         "forward.logprobs, old_logprobs, advantages, mask, c.clip_range",
         "forward.logprobs, old_logprobs, advantages, mask, 0.2", AGENT_TESTS),
    _bug("ppo-value-clip-range", "agent-option", PPO,
         "forward.values, old_values, returns, mask, c.value_clip_range",
         "forward.values, old_values, returns, mask, c.clip_range", AGENT_TESTS),
    _bug("ppo-vf-coef", "agent-option", PPO,
         "loss = policy_loss + c.vf_coef * value_loss - c.entropy_coef * entropy",
         "loss = policy_loss + 0.1 * value_loss - c.entropy_coef * entropy", AGENT_TESTS),
    _bug("ppo-entropy-coef", "agent-option", PPO,
         "loss = policy_loss + c.vf_coef * value_loss - c.entropy_coef * entropy",
         "loss = policy_loss + c.vf_coef * value_loss", AGENT_TESTS),
    _bug("ppo-max-grad-norm", "agent-option", PPO,
         "max_grad_norm=c.max_grad_norm,", "max_grad_norm=1.0,", AGENT_TESTS),
    _bug("ppo-whiten-advantages", "agent-option", PPO,
         "if c.whiten_advantages:", "if True:", AGENT_TESTS),
    _bug("ppo-kl-coef", "agent-option", PPO,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(0.1, c.kl_target, c.kl_horizon)",
         AGENT_TESTS),
    _bug("ppo-kl-target", "agent-option", PPO,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(c.kl_coef, 3.0, c.kl_horizon)",
         AGENT_TESTS),
    _bug("ppo-kl-horizon", "agent-option", PPO,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(c.kl_coef, c.kl_target, 2000.0)",
         AGENT_TESTS),
    _bug("ppo-early-stop-kl", "agent-option", PPO,
         'stats["train/approx_kl"] > c.early_stop_kl:', 'stats["train/approx_kl"] > c.clip_range:', AGENT_TESTS),
    _bug("ppo-temperature-reference", "agent-option", PPO,
         "reference_logprobs = rollout_reference_logprobs(self.policy, rollout, c.temperature)",
         "reference_logprobs = rollout_reference_logprobs(self.policy, rollout)", AGENT_TESTS),
    _bug("ppo-temperature-policy", "agent-option", PPO,
         "return forward_rollout(self.policy, batch, temperature=c.temperature, entropy_grad=c.entropy_coef != 0)",
         "return forward_rollout(self.policy, batch, entropy_grad=c.entropy_coef != 0)", AGENT_TESTS),
    _bug("ppo-max-consecutive-skips", "agent-option", PPO,
         "max_consecutive_skips=c.max_consecutive_skips,", "max_consecutive_skips=3,", AGENT_TESTS),
    _bug("ppo-seed", "agent-option", PPO,
         "self.generator = torch.Generator().manual_seed(c.seed)", "self.generator = torch.Generator().manual_seed(0)",
         AGENT_TESTS),
    _bug("reinforce-learning-rate", "agent-option", REINFORCE,
         "learning_rate=c.learning_rate,", "learning_rate=1e-3,", AGENT_TESTS),
    _bug("reinforce-lr-schedule", "agent-option", REINFORCE,
         "lr_schedule=c.lr_schedule,", 'lr_schedule="constant",', AGENT_TESTS),
    _bug("reinforce-rloo-baseline", "agent-option", REINFORCE,
         "return rloo_advantages(returns, c.group_size)", "return grpo_advantages(returns, c.group_size)",
         AGENT_TESTS),
    _bug("reinforce-group-size", "agent-option", REINFORCE,
         "return grpo_advantages(returns, c.group_size)", "return grpo_advantages(returns, rollout.batch_size)",
         AGENT_TESTS),
    _bug("reinforce-baseline-decay", "agent-option", REINFORCE,
         "c.baseline_decay * self.baseline_value + (1 - c.baseline_decay) * mean_return",
         "0.9 * self.baseline_value + (1 - 0.9) * mean_return", AGENT_TESTS),
    _bug("reinforce-kl-coef", "agent-option", REINFORCE,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(0.1, c.kl_target, c.kl_horizon)",
         AGENT_TESTS),
    _bug("reinforce-kl-target", "agent-option", REINFORCE,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(c.kl_coef, 3.0, c.kl_horizon)",
         AGENT_TESTS),
    _bug("reinforce-kl-horizon", "agent-option", REINFORCE,
         "make_kl_controller(c.kl_coef, c.kl_target, c.kl_horizon)", "make_kl_controller(c.kl_coef, c.kl_target, 2000.0)",
         AGENT_TESTS),
    _bug("reinforce-kl-penalty-loss", "agent-option", REINFORCE,
         'if c.kl_penalty == "loss":', 'if c.kl_penalty == "reward" and False:', AGENT_TESTS),
    _bug("reinforce-entropy-coef", "agent-option", REINFORCE,
         "loss = policy_loss - c.entropy_coef * entropy", "loss = policy_loss", AGENT_TESTS),
    _bug("reinforce-max-grad-norm", "agent-option", REINFORCE,
         "max_grad_norm=c.max_grad_norm,", "max_grad_norm=1.0,", AGENT_TESTS),
    _bug("reinforce-temperature-reference", "agent-option", REINFORCE,
         "reference_logprobs = rollout_reference_logprobs(self.policy, rollout, c.temperature)",
         "reference_logprobs = rollout_reference_logprobs(self.policy, rollout)", AGENT_TESTS),
    _bug("reinforce-minibatch-size", "agent-option", REINFORCE,
         "chunk = c.minibatch_size or rollout.batch_size", "chunk = rollout.batch_size", AGENT_TESTS),
    _bug("reinforce-max-consecutive-skips", "agent-option", REINFORCE,
         "max_consecutive_skips=c.max_consecutive_skips,", "max_consecutive_skips=3,", AGENT_TESTS),
    # ----------------------------------------------------------------------------------- sampling
    _bug("sampler-temperature", "sampling", SAMPLER,
         "scaled = logits if sampling.temperature in (0, 1) else logits / sampling.temperature",
         "scaled = logits", SAMPLING_TESTS),
    _bug("sampler-top-k-dropped", "sampling", SAMPLER,
         "filter_logits(scaled, sampling.top_k, sampling.top_p)", "filter_logits(scaled, 0, sampling.top_p)",
         SAMPLING_TESTS),
    _bug("sampler-top-p-dropped", "sampling", SAMPLER,
         "filter_logits(scaled, sampling.top_k, sampling.top_p)", "filter_logits(scaled, sampling.top_k)",
         SAMPLING_TESTS),
    _bug("sampler-filter-condition", "sampling", SAMPLER,
         "if sampling.top_k or sampling.top_p < 1.0:", "if sampling.top_k and sampling.top_p < 1.0:",
         SAMPLING_TESTS),
    _bug("sampler-top-p-boundary", "sampling", SAMPLER,
         "drop_sorted = mass_before >= top_p", "drop_sorted = mass_before > top_p", SAMPLING_TESTS),
    _bug("sampler-max-new-tokens", "sampling", SAMPLER,
         "if self.num_generated >= self.sampling.max_new_tokens or all_finished:",
         "if self.num_generated > self.sampling.max_new_tokens or all_finished:", SAMPLING_TESTS),
    _bug("sampler-eos-list", "sampling", SAMPLER,
         "just_finished = torch.isin(active_tokens, self._eos)",
         "just_finished = torch.isin(active_tokens, self._eos[:1])", SAMPLING_TESTS),
    _bug("sampler-pad-token", "sampling", SAMPLER,
         "self.pad_token_id = int(pad) if isinstance(pad, int) else self.eos_token_ids[0]",
         "self.pad_token_id = self.eos_token_ids[0]", SAMPLING_TESTS),
    _bug("decoder-adapter-disabled", "sampling", DECODING,
         "isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:",
         "isinstance(module, LoraLayer) and not module.merged:", SAMPLING_TESTS),
    # ----------------------------------------------------------------------------------- evaluation
    _bug("eval-component-means", "evaluation", EVALUATION,
         "rewards.update({name: _nanmean(values) for name, values in result.components.items()})",
         "rewards.update({name: _nanmean(result.total) for name, values in result.components.items()})",
         EVALUATION_TESTS),
    _bug("eval-fluency-under-policy", "evaluation", EVALUATION,
         "batch_reference = reference.tolist()", "batch_reference = logprobs.tolist()", EVALUATION_TESTS),
    _bug("eval-fluency-padding", "evaluation", EVALUATION,
         "reference_logprobs_all.extend(batch_reference[row][:length])",
         "reference_logprobs_all.extend(batch_reference[row])", EVALUATION_TESTS),
    _bug("eval-kl-per-token", "evaluation", EVALUATION,
         "kl_per_completion.extend(((logprobs - reference) * maskf).sum(1).tolist())",
         "kl_per_completion.extend(((logprobs - reference) * maskf).mean(1).tolist())", EVALUATION_TESTS),
    _bug("eval-length-padding", "evaluation", EVALUATION,
         "ids = batch_completion_ids[row][:length]", "ids = batch_completion_ids[row]", EVALUATION_TESTS),
    _bug("eval-distinct-2", "evaluation", EVALUATION,
         "distinct_2=distinct_n(completions, 2),", "distinct_2=distinct_n(completions, 1),", EVALUATION_TESTS),
    _bug("eval-distinct-case", "evaluation", EVALUATION,
         "(_WORD.findall(text.lower()) for text in texts)", "(_WORD.findall(text) for text in texts)",
         EVALUATION_TESTS),
    _bug("eval-seed", "evaluation", EVALUATION,
         "generator = torch.Generator(device=policy.device).manual_seed(seed)\n    prompts, completions",
         "generator = torch.Generator(device=policy.device)\n    prompts, completions", EVALUATION_TESTS),
    _bug("eval-sampling-settings", "evaluation", EVALUATION,
         "        generation = generate(policy.model, input_ids, attention_mask, sampling,",
         "        generation = generate(policy.model, input_ids, attention_mask, "
         "SamplingConfig(max_new_tokens=sampling.max_new_tokens),", EVALUATION_TESTS),
    # ----------------------------------------------------------------------------------- bench columns
    _bug("bench-gold-kwargs", "bench", BENCH,
         "gold_specs = [RewardSpec(name=r.name, kwargs=dict(r.kwargs), label=gold_key(r)) for r in config.gold]",
         "gold_specs = [RewardSpec(name=r.name, label=gold_key(r)) for r in config.gold]", BENCH_TESTS),
    _bug("bench-design-reward-weight", "bench", BENCH,
         "sum((spec.weight * result.rewards[str(spec.label)] for spec in design_specs), 0.0)",
         "sum((result.rewards[str(spec.label)] for spec in design_specs), 0.0)", BENCH_TESTS),
    _bug("bench-fluency-column", "bench", BENCH,
         "values.update(kl=result.kl, fluency=result.fluency,", "values.update(kl=result.kl, fluency=result.kl,",
         BENCH_TESTS),
    _bug("bench-distinct-2-column", "bench", BENCH,
         "distinct_2=result.distinct_2,", "distinct_2=result.distinct_1,", BENCH_TESTS),
    _bug("bench-eval-top-k", "bench", BENCH,
         "temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,",
         "temperature=sampling.temperature, top_p=sampling.top_p,", BENCH_TESTS),
    _bug("bench-eval-seed", "bench", BENCH,
         "result = evaluate_policy(policy, rows, rewards, eval_sampling, seed=config.eval.seed, num_samples=0)",
         "result = evaluate_policy(policy, rows, rewards, eval_sampling, seed=run_config.seed, num_samples=0)",
         BENCH_TESTS),
    _bug("bench-final-evaluation", "bench", BENCH,
         "if last or (config.eval.every and step % config.eval.every == 0):",
         "if config.eval.every and step % config.eval.every == 0:", BENCH_TESTS),
    _bug("bench-final-is-last-point", "bench", BENCH_PLOTS,
         "final_mean = {key: _nanmean([run.final.values.get(key, math.nan) for run in runs]) for key in keys}",
         "final_mean = {key: _nanmean([run.points[0].values.get(key, math.nan) for run in runs]) for key in keys}",
         BENCH_TESTS),
    _bug("bench-gold-peak-drop", "bench", BENCH_PLOTS,
         "peak_drop = (max(gold_curve) - gold_curve[-1])", "peak_drop = (max(gold_curve) - gold_curve[0])",
         BENCH_TESTS),
    _bug("bench-column-heading", "bench", BENCH_PLOTS,
         '("distinct_1", "distinct-1"),', '("distinct_2", "distinct-1"),', BENCH_TESTS),
)


class SnippetError(RuntimeError):
    """A planted bug's snippet is missing from its file, or occurs more than once."""


@dataclass
class Outcome:
    bug: PlantedBug
    caught_by: str | None  # the first failing test ("suite: ..." with --full), None when it survived
    seconds: float
    missing_tests: tuple[str, ...] = ()


def check_snippet(bug: PlantedBug, root: Path = REPO) -> None:
    """Raise :class:`SnippetError` unless ``bug.snippet`` occurs exactly once in its file."""
    source = (root / bug.path).read_text()
    count = source.count(bug.snippet)
    if count != 1:
        what = "snippet no longer present" if count == 0 else f"snippet occurs {count} times"
        raise SnippetError(f"{bug.id}: {what} in {bug.path}: {bug.snippet!r}")


def _copy_tree(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, destination / name)


def _pytest(root: Path, targets: list[str]) -> str | None:
    """Run pytest in ``root``; None when everything passed, else the first failing test (or why it stopped)."""
    environment = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", *targets, *PYTEST_ARGS, "-rfE"]
    try:
        finished = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True,
                                  timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timeout after {TEST_TIMEOUT_S} s"
    if finished.returncode == 0:
        return None
    for line in finished.stdout.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return f"pytest exit code {finished.returncode}"


def run_bug(bug: PlantedBug, full: bool) -> Outcome:
    """Plant ``bug`` in a temporary copy of the tree and run its tests (and the suite with ``full``)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"plant-{bug.id}-") as temporary:
        root = Path(temporary)
        _copy_tree(root)
        check_snippet(bug, root)
        path = root / bug.path
        path.write_text(path.read_text().replace(bug.snippet, bug.replacement))
        present = [test for test in bug.tests if (root / test).is_file()]
        missing = tuple(test for test in bug.tests if test not in present)
        # One file per run: test files in different directories import their own `conftest` module.
        for test in present:
            failure = _pytest(root, [test])
            if failure is not None:
                return Outcome(bug, failure, time.perf_counter() - started, missing)
        if full:
            failure = _pytest(root, [])
            if failure is not None:
                return Outcome(bug, f"suite: {failure}", time.perf_counter() - started, missing)
    return Outcome(bug, None, time.perf_counter() - started, missing)


def control_failures(bugs: list[PlantedBug]) -> list[str]:
    """Run every named test file on an unmodified copy; the failures found there (a catch is meaningless
    when the test fails without any planted bug)."""
    with tempfile.TemporaryDirectory(prefix="plant-control-") as temporary:
        root = Path(temporary)
        _copy_tree(root)
        files = sorted({test for bug in bugs for test in bug.tests if (root / test).is_file()})
        return [f"{test}: {failure}" for test in files if (failure := _pytest(root, [test])) is not None]


def print_table(outcomes: list[Outcome]) -> None:
    width = max(len(outcome.bug.id) for outcome in outcomes)
    print(f"{'id':<{width}} | {'class':<12} | {'caught by':<60} | survived")
    print(f"{'-' * width}-|-{'-' * 12}-|-{'-' * 60}-|---------")
    for outcome in outcomes:
        caught = outcome.caught_by or ""
        print(f"{outcome.bug.id:<{width}} | {outcome.bug.behaviour:<12} | {caught:<60} | "
              f"{'SURVIVED' if outcome.caught_by is None else ''}")
    caught_count = sum(outcome.caught_by is not None for outcome in outcomes)
    print(f"\ncaught {caught_count} of {len(outcomes)} planted bugs: {100 * caught_count / len(outcomes):.0f}%")
    by_class: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_class.setdefault(outcome.bug.behaviour, []).append(outcome)
    for behaviour, group in by_class.items():
        print(f"  {behaviour}: {sum(o.caught_by is not None for o in group)}/{len(group)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="ID", help="run only this bug (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="bugs checked in parallel (default 1)")
    parser.add_argument("--full", action="store_true", help="also run the whole suite for bugs the named tests miss")
    parser.add_argument("--list", action="store_true", help="check every snippet and list the bugs, run nothing")
    args = parser.parse_args(argv)
    ids = [bug.id for bug in BUGS]
    if len(set(ids)) != len(ids):
        parser.error("planted bug ids must be unique")
    bugs = list(BUGS)
    if args.only:
        unknown = sorted(set(args.only) - set(ids))
        if unknown:
            parser.error(f"unknown bug id(s) {', '.join(unknown)}; known: {', '.join(ids)}")
        bugs = [bug for bug in bugs if bug.id in args.only]
    try:
        for bug in bugs:  # fail before spending minutes when the code moved under a snippet
            check_snippet(bug)
    except SnippetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.list:
        for bug in bugs:
            print(f"{bug.id:<36} {bug.behaviour:<12} {bug.path}  -> {', '.join(bug.tests)}")
        print(f"{len(bugs)} planted bugs, every snippet found exactly once")
        return 0
    failures = control_failures(bugs)
    if failures:
        print("error: these tests fail without any planted bug; fix them first:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda bug: run_bug(bug, args.full), bugs):
            verdict = f"caught by {outcome.caught_by}" if outcome.caught_by else "SURVIVED"
            print(f"[{len(outcomes) + 1}/{len(bugs)}] {outcome.bug.id}: {verdict} ({outcome.seconds:.0f} s)",
                  flush=True)
            outcomes.append(outcome)
    print()
    print_table(outcomes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
