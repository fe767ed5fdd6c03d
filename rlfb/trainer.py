"""The training loop: rollout -> rewards -> update -> log -> checkpoint, in one readable place.

    config -> task, policy (base LM + LoRA + value head), rewards, agent, vector env
    evaluate on held-out prompts ("before")
    repeat until the budget is spent:
        rollout = agent.collect(sample)   # sample: collect_rollout(venv, policy, sampling, generator), the
                  env scoring each completion (env.kind: multi_turn -> collect_episodes: whole conversations,
                  see rlfb/agents/multi_turn.py); one batch, or one per member of an ES population
        metrics = agent.update(rollout)
        log metrics, samples; evaluate every eval.every updates; checkpoint every checkpoint.every
    save final/, evaluate again ("after"), print the before/after table

Determinism: every random number comes from a seeded generator (Python, NumPy, torch, the sampling
generator, the env's ``np_random``, the agent's minibatch generator), and a checkpoint stores all their
states, so on CPU a resumed run writes the same metrics as an uninterrupted one (the ``time/`` metrics
aside). Evaluation draws from its own generator and never moves the training streams.

Interrupts: the first Ctrl-C lets the current update finish, then saves a checkpoint and returns
(``TrainResult.interrupted``); a second one stops at once. A ``KeyboardInterrupt`` raised while the
rollout is collected or between updates also saves (the state of the last completed update).

Failures: the run directory is created only once the run can start: everything is loaded and checked,
and the "before" evaluation (the first call of the rewards) has run. An error after that leaves a
``FAILED`` file in the run directory (the update reached and the error); ``--resume`` says so, continues
from the last checkpoint and removes it.

Several ranks (``torchrun --nproc-per-node N -m rlfb train CONFIG``; docs/distributed.md): the trainer
joins the process group the launcher describes. ``budget.num_envs`` is the global batch; each rank
collects its share (whole groups) of the prompts one process would draw, with its own sampling stream
(:func:`rlfb.distributed.rank_seed`); the agents average gradients and reduce batch-wide statistics over
the ranks (ES splits its population instead: each rank evaluates its members on full batches). Rank 0
alone creates the run directory, logs, writes checkpoints (holding every rank's RNG state) and evaluates;
stop decisions (budget time, callbacks, Ctrl-C, unscored rollouts) are agreed, so every rank stops after
the same update. A rank that dies or hangs ends the others with a :class:`rlfb.distributed.RankFailure`
naming it (rank 0 marks the run ``FAILED``); ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfb import checkpoint as checkpointing
from rlfb import distributed, run_directory
from rlfb.agents.configs import POPULATION_AGENTS, agent_spec, check_world_size, run_agent
from rlfb.agents.trajectory import last_action_index
from rlfb.config import MODEL_DTYPES, RunConfig, load_config
from rlfb.errors import ConfigError, RewardError
from rlfb.evaluation import EvalResult, comparison_table, evaluate_episodes, evaluate_policy
from rlfb.files import write_text_atomically
from rlfb.logging import ConsoleWriter, JsonlWriter, Logger, TensorBoardWriter, make_run_dir
from rlfb.rewards.registry import TRUST_ALL, ImportTrust
from rlfb.rewards.reward_set import LOGGED_METRIC_PREFIX

EVAL_FILE = run_directory.EVAL_FILE
FAILED_FILE = "FAILED"  # in a run directory whose training stopped on an error: {"step": N, "error": "..."}
SAMPLES_LOGGED = 4  # rollout completions written to TensorBoard every logging.samples_every updates
# Rollouts in a row that no reward scored before the run stops: one such batch can be bad luck (every
# completion missed a format), several mean the rewards cannot score this task and training learns nothing.
UNSCORED_ROLLOUTS_LIMIT = 3
DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}

# A multi-turn run's eval env has at most this many rows (episodes per evaluation batch).
EVAL_BATCH = 64

# A callback sees the update number and its metrics after each update; returning False stops training.
Callback = Callable[[int, dict[str, float]], "bool | None"]


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns."""

    run_dir: Path
    step: int
    before: EvalResult | None
    after: EvalResult | None
    interrupted: bool = False
    checkpoint: Path | None = None


@dataclass
class _Interruption:
    """How the loop stopped on Ctrl-C.

    Attributes:
        consistent: False when an update was cut half-way (nothing consistent to save).
        state: RNG and reward-normalization state to save instead of the current one (an interrupted
            rollout had already drawn from the streams), or None for the current state.
    """

    consistent: bool
    state: dict[str, Any] | None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialized ``torch.distributed`` group."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0)


class _NoRewards:
    """The reward set of a multi-turn run whose ``rewards`` list is empty: the protocol alone scores."""

    names: list[str] = []
    needs_scorer = False

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass

    def pop_logged(self) -> Any:
        from rlfb.rewards.reward_set import RewardLogs

        return RewardLogs()


class Trainer:
    """Trains a LoRA adapter as the run config says; see the module docstring for the loop.

    Args:
        config: the run config.
        resume_from: a run directory (or checkpoint) to continue; its metrics files are kept and
            continued. ``None`` starts a fresh run directory under ``config.output_dir``.
        callbacks: called after each update with (update, metrics); returning False stops training.
        import_trust: the modules the config's ``module:attr`` reward names may import; the default
            trusts any (the config is the caller's own), :meth:`resume` trusts only those allowed.

    Example:
        >>> from rlfb.config import load_config  # doctest: +SKIP
        >>> result = Trainer(load_config("configs/sentiment_ppo.yaml")).train()  # doctest: +SKIP
    """

    def __init__(self, config: RunConfig, resume_from: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), import_trust: ImportTrust = TRUST_ALL) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        # Everything checkable without loading a model is checked here, before a run directory exists.
        check_world_size(config, distributed.world_size() if distributed.active()
                         else distributed.launched_world_size())
        self.run_agent = run_agent(config)
        self.context = distributed.init_from_environment(config.device)  # single without a launcher
        self.is_main_process = self.context.is_main and is_main_process()
        self.world_size = self.context.world_size
        self.group_size = self.run_agent.group_size
        # ES ranks split the population (each evaluates its members on full batches), the others the batch.
        self.rank_batch = config.budget.num_envs if config.agent.name in POPULATION_AGENTS \
            else config.budget.num_envs // self.world_size
        self.import_trust = import_trust
        for reward in config.rewards:
            import_trust.check(reward.name)
        self.resume_checkpoint = checkpointing.find_checkpoint(resume_from) if resume_from is not None else None
        self._run_dir: Path | None = None
        self.config_changes: list[run_directory.ConfigChange] = []
        if self.resume_checkpoint is not None:
            self._run_dir = self.resume_checkpoint.parent
            if self._run_dir.name == checkpointing.CHECKPOINTS_DIR:
                self._run_dir = self._run_dir.parent
            saved = load_config(self.resume_checkpoint / checkpointing.CONFIG_FILE)
            self.config_changes = run_directory.config_changes(saved, config)  # refuses shape changes
        self.step = 0
        self.elapsed_s = 0.0  # training time (rollouts + updates) of this run, across resumes
        self._stop_requested = False
        self._phase = "setup"
        self._unscored_rollouts = 0  # consecutive rollouts no reward scored

    @property
    def run_dir(self) -> Path:
        """The run directory (created when :meth:`train` starts a fresh run)."""
        if self._run_dir is None:
            raise RuntimeError("the run directory is created when train() starts")
        return self._run_dir

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = (),
               allow_imports: Sequence[str] = ()) -> Trainer:
        """Continue a run from its own saved config (plus ``overrides``, e.g. a larger budget).

        Its ``module:attr`` reward names may import only the modules in ``allow_imports``.
        """
        config_path = Path(run_dir) / checkpointing.CONFIG_FILE
        return cls(load_config(config_path, overrides), resume_from=run_dir, callbacks=callbacks,
                   import_trust=run_directory.import_trust(config_path, allow_imports))

    # ------------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        """Task, rewards, policy, agent, vector env, generators: everything seeded from ``config.seed``."""
        import gymnasium

        from rlfb.agents import make_agent
        from rlfb.agents.rollout import collect_rollout
        from rlfb.envs.tasks import make_task
        from rlfb.models.policy import LoraSettings, Policy, resolve_device
        from rlfb.models.sampler import SamplingConfig
        from rlfb.rewards import RewardSet

        config = self.config
        seed_everything(config.seed)  # before the policy: LoRA's A matrices are drawn from torch's RNG
        self.device = resolve_device(config.device)
        self._collect_rollout = collect_rollout
        task_spec: Any = {"name": config.task.name, **config.task.kwargs}
        self.task = make_task(task_spec)
        self.multi_turn = config.env.kind == "multi_turn"
        self.reward_set: Any = _NoRewards() if not config.rewards else RewardSet(
            run_directory.reward_specs(config.rewards, self.import_trust),
            normalize=config.reward_scale.normalize, clip=config.reward_scale.clip)
        lora = config.lora
        agent_name = config.agent.name
        self.policy = Policy.from_pretrained(
            config.model.name,
            lora=LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                              target_modules=lora.target_modules),
            value_head=agent_spec(agent_name).needs_value_head, device=self.device,
            dtype=DTYPES.get(config.model.dtype or ""))
        if lora.init_from is not None and self.resume_checkpoint is None:  # a resume loads its checkpoint's adapter
            self.policy.load_adapter(init_adapter(lora.init_from), require_value_head=False)
        distributed.broadcast_parameters(self.policy.trainable_parameters())  # identical on every rank
        if self.reward_set.needs_scorer:
            self.reward_set.bind_scorer(self.policy.scorer)
        if self.resume_checkpoint is None:
            self._say(self.policy.describe())  # the adapted modules and the sampling path, once per run
        self.agent = make_agent(agent_name, self.policy, self.run_agent.options)
        self.sampling = SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                                       top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_new_tokens)
        self.eval_venv = None
        if self.multi_turn:
            self.venv = self._multi_turn_venv(config.budget.num_envs, "train")
            if config.eval.num_prompts:
                self.eval_venv = self._multi_turn_venv(min(config.eval.num_prompts, EVAL_BATCH), "eval")
        else:
            self.venv = gymnasium.make_vec(
                "rlfb/TextGeneration-v0", num_envs=self.rank_batch,
                vectorization_mode="vector_entry_point",
                task=self.task, model=config.model.name, tokenizer=self.policy.tokenizer, rewards=self.reward_set,
                group_size=self.group_size,
                max_new_tokens=config.sampling.max_new_tokens, max_prompt_tokens=config.sampling.max_prompt_tokens,
                device=str(self.device))
        # Seeds the env's np_random; rollouts then reset without a seed (a multi-turn rollout draws its
        # groups' seeds from it).
        self.venv.reset(seed=config.seed)
        # Rank r samples from its own stream; rank 0's is a single-process run's.
        self.generator = torch.Generator(device=self.device).manual_seed(
            distributed.rank_seed(config.seed, self.context.rank))
        # Several ranks: every rank draws the global batch's prompts as one process's env would (same seed,
        # same call) and takes its slice; see :meth:`_prompt_indices`.
        self.prompt_rng = None
        if self.rank_batch < config.budget.num_envs:
            self.prompt_rng = gymnasium.utils.seeding.np_random(config.seed)[0]
            self._prompt_indices()  # the draw of the seeding reset above, as one process's env makes it
        self.eval_rows = [row for row in list(self.task.eval_rows())[: config.eval.num_prompts]
                          for _ in range(config.eval.completions_per_prompt)]  # a prompt's copies side by side

    def _multi_turn_venv(self, num_envs: int, split: str) -> Any:
        """A ``rlfb/MultiTurn-v0`` vector env as the ``env`` section says, in the model's context window."""
        from rlfb.agents.multi_turn import make_multi_turn_venv

        return make_multi_turn_venv(self.config, self.policy, self.task,
                                    self.reward_set if self.config.rewards else None, num_envs, split)

    def _collect(self, *, generator: torch.Generator | None = None,
                 seed: int | None = None) -> tuple[Any, dict[str, float]]:
        """One rollout, and the episode metrics of a multi-turn one (none for single-turn completions).

        The agent's ``collect`` calls it (:class:`rlfb.agents.base.Sample`): ``generator`` replaces the
        sampling generator and ``seed`` reseeds the env's reset for this batch; by default the streams go on.
        """
        generator = self.generator if generator is None else generator
        if not self.multi_turn:
            options = {"indices": self._prompt_indices()} if self.prompt_rng is not None and seed is None else None
            return self._collect_rollout(self.venv, self.policy, self.sampling, generator, seed=seed,
                                         options=options), {}
        from rlfb.agents.multi_turn import collect_episodes

        batch = collect_episodes(self.venv, self.policy, self.sampling, generator, group_size=self.group_size,
                                 seed=seed)
        return batch.rollout, batch.metrics()

    def _prompt_indices(self) -> np.ndarray:
        """This rank's slice of the global batch's prompt indices (train split), one per group."""
        assert self.prompt_rng is not None
        return rank_prompt_indices(self.prompt_rng, len(self.task.train), self.config.budget.num_envs // self.group_size,
                                   self.context.rank, self.world_size)

    def _numpy_generators(self) -> dict[str, np.random.Generator]:
        generators = {"env": self.venv.unwrapped.np_random}
        if self.prompt_rng is not None:
            generators["prompts"] = self.prompt_rng
        return generators

    def _capture(self) -> dict[str, Any]:
        """Everything that changes during one iteration besides the weights: RNG streams, reward stats
        (this rank's)."""
        return {"rng": checkpointing.capture_rng_state({"sampling": self.generator}, self._numpy_generators()),
                "rewards": self.reward_set.state_dict()}

    def _checkpoint_state(self, captured: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a checkpoint saves besides the weights, with every rank's RNG state (a collective: every
        rank calls it). One process saves its state as it is; W ranks save ``{"world_size": W, "ranks":
        [state of rank 0, ...]}``."""
        captured = captured or self._capture()
        if self.world_size == 1:
            return captured
        return {**captured, "rng": {"world_size": self.world_size, "ranks": distributed.gather_objects(captured["rng"])}}

    def _restore_rng(self, saved: dict[str, Any]) -> None:
        """This rank's RNG state from a checkpoint's; one-line error when it was saved with another world size."""
        saved_world = int(saved["world_size"]) if "ranks" in saved else 1
        if saved_world != self.world_size:
            raise ConfigError(f"the checkpoint was saved by {saved_world} rank(s) and this run has {self.world_size}; "
                              f"resume with the same number of ranks (torchrun --nproc-per-node {saved_world})")
        state = saved["ranks"][self.context.rank] if "ranks" in saved else saved
        checkpointing.restore_rng_state(state, {"sampling": self.generator}, self._numpy_generators())

    # ------------------------------------------------------------------------------------- checkpoints
    def _write_checkpoint(self, directory: Path, captured: dict[str, Any]) -> None:
        """Write one checkpoint's files (rank 0); ``captured`` is :meth:`_checkpoint_state`'s."""
        self.policy.save(directory / "adapter")  # peft adapter files + value_head.safetensors
        checkpointing.save_torch_state(directory / checkpointing.AGENT_STATE_FILE,
                              {"agent": self.agent.state_dict(), "rewards": captured["rewards"]})
        checkpointing.save_torch_state(directory / checkpointing.RNG_STATE_FILE, captured["rng"])
        (directory / checkpointing.CONFIG_FILE).write_text(self.config.to_yaml())
        checkpointing.write_trainer_state(directory, {"step": self.step, "elapsed_s": self.elapsed_s})

    def save_checkpoint(self, captured: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoints/step_N`` atomically (the state of the last completed update); every rank calls it."""
        captured = self._checkpoint_state(captured)
        manager = checkpointing.CheckpointManager(self.run_dir, self.config.checkpoint.keep_last,
                                                  self.is_main_process)
        return manager.save(self.step, lambda directory: self._write_checkpoint(directory, captured))

    def _restore(self, checkpoint: Path) -> None:
        self.policy.load_adapter(checkpoint / "adapter")
        state = checkpointing.load_torch_state(checkpoint / checkpointing.AGENT_STATE_FILE)
        self.agent.load_state_dict(state["agent"])
        self.reward_set.load_state_dict(state["rewards"])
        self._restore_rng(checkpointing.load_torch_state(checkpoint / checkpointing.RNG_STATE_FILE))
        trainer_state = checkpointing.read_trainer_state(checkpoint)
        self.step, self.elapsed_s = int(trainer_state["step"]), float(trainer_state["elapsed_s"])

    # ------------------------------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        """Run until ``budget.updates`` or ``budget.time_limit_s``; see the module docstring."""
        config = self.config
        if self.resume_checkpoint is not None:
            self._say("resuming: " + "; ".join(run_directory.describe_inputs(config, self.resume_checkpoint)))
        self._build()
        resumed = self.resume_checkpoint is not None
        before = None
        if self.resume_checkpoint is not None:
            # Every input is read and checked before the run directory is touched.
            self._restore(self.resume_checkpoint)
            before = self._load_eval("before")
        try:
            # Measured before a fresh run directory exists: the first call of the rewards (one that raises)
            # and the first prompts fail here and leave nothing behind.
            measured = self._measure() if before is None else None
        except BaseException:
            self._close_envs()
            raise
        if self._run_dir is None:  # rank 0 creates it, every rank learns its path
            self._run_dir = distributed.broadcast_object(
                make_run_dir(config.output_dir, config.task.name, config.agent.name, config.seed,
                             config.logging.run_name) if self.is_main_process else None)
        self.logger = self._make_logger(truncate_after=self.step if resumed else None)  # reads, then truncates
        try:
            if resumed:
                self._clear_failure()
            if self.is_main_process and (not resumed or self.config_changes):
                write_text_atomically(self.run_dir / checkpointing.CONFIG_FILE, config.to_yaml())
            if self.config_changes:
                self._say(run_directory.describe_changes(self.config_changes,
                                                         self.run_dir / checkpointing.CONFIG_FILE))
            if before is None:
                self.logger.log_hyperparameters(config.to_dict())
                before = self._record_eval(measured, step=0, label="before")
            with self._graceful_interrupts():
                interruption = self._loop()
            if interruption is not None:
                saved = self.save_checkpoint(interruption.state) if interruption.consistent else None
                distributed.barrier()  # every rank returns once rank 0's checkpoint is on disk
                self._say(f"interrupted at update {self.step}; "
                          + (f"saved {saved}. " if saved else "the update in progress was lost. ")
                          + f"Continue with: rlfb train CONFIG --resume {self.run_dir}")
                return TrainResult(self.run_dir, self.step, before, None, interrupted=True, checkpoint=saved)
            final_state = self._checkpoint_state()  # every rank's part, gathered before rank 0 writes
            final = checkpointing.save_atomically(self.run_dir / checkpointing.FINAL_DIR,
                                                  lambda directory: self._write_checkpoint(directory, final_state)) \
                if self.is_main_process else None
            distributed.barrier()  # final/ is on disk before any rank returns (rank 0 then evaluates alone)
            after = self._evaluate(step=self.step, label="after")
            if before is not None and after is not None:
                table = comparison_table(before, after)
                self.logger.log_text("eval/comparison", f"```\n{table}\n```", self.step)
                self._say(table)
            return TrainResult(self.run_dir, self.step, before, after, checkpoint=final)
        except distributed.RankFailure as failure:
            self._mark_failed(failure)
            raise distributed.RankFailure(f"{failure}; continue from the last checkpoint with: rlfb train CONFIG "
                                          f"--resume {self.run_dir} (on as many ranks)") from failure
        except Exception as error:
            self._mark_failed(error)
            raise
        finally:
            self.logger.close()
            self._close_envs()

    def _close_envs(self) -> None:
        self.venv.close()
        if self.eval_venv is not None:
            self.eval_venv.close()

    def _mark_failed(self, error: Exception) -> None:
        """Write ``RUN_DIR/FAILED`` (the update reached and the error), so the run directory says it failed."""
        if self.is_main_process:
            failure = {"step": self.step, "error": f"{type(error).__name__}: {error}"}
            write_text_atomically(self.run_dir / FAILED_FILE, json.dumps(failure, indent=2) + "\n")

    def _clear_failure(self) -> None:
        """On resume, say that the run had failed (and how), and remove its FAILED mark."""
        path = self.run_dir / FAILED_FILE
        if self.is_main_process and path.is_file():
            failure = json.loads(path.read_text())
            self._say(f"{self.run_dir} had failed at update {failure['step']} ({failure['error']}); "
                      f"continuing from its checkpoint at update {self.step}")
            path.unlink()

    def _loop(self) -> _Interruption | None:
        """Updates until the budget is spent or a callback says stop (None), or until Ctrl-C."""
        config = self.config
        progress = self._progress_bar()
        captured: dict[str, Any] | None = None
        try:
            while not self._budget_spent():
                captured = self._capture()
                self._phase = "rollout"
                started = time.perf_counter()
                rollout, episode_metrics = self.agent.collect(self._collect)
                rollout_s = time.perf_counter() - started
                reward_logs = self.reward_set.pop_logged()
                self._check_scored(rollout)  # agreed: every rank raises together
                self._phase = "update"
                metrics = self.agent.update(rollout)
                update_s = time.perf_counter() - started - rollout_s
                self.step += 1
                self.elapsed_s += rollout_s + update_s
                self._phase = "log"
                metrics.update(metrics_of_rows(distributed.gather_rows(rollout_rows(
                    rollout, self.reward_set.names, self.policy.tokenizer.eos_token_id)), self.reward_set.names))
                metrics.update(episode_metrics)
                metrics.update({f"rollout/{LOGGED_METRIC_PREFIX}{name}": value
                                for name, value in reward_logs.metrics.items()})
                tokens = float(rollout.action_mask.sum())  # sampled: the model's, not the environment's
                if self.world_size > 1:  # of the rollout and the update (what the rows' gathering below costs aside)
                    metrics["time/collective_s"] = distributed.pop_collective_seconds()
                metrics.update({"time/rollout_s": rollout_s, "time/update_s": update_s,
                                "time/tokens_per_s": tokens / max(rollout_s, 1e-9),
                                "time/elapsed_s": self.elapsed_s})
                # Several ranks: the agent's and the rollout's metrics are already the batch's; the rest
                # (reward-logged means, times) are averaged over the ranks.
                metrics = distributed.mean_across_ranks(metrics)
                self._log(metrics, rollout, reward_logs.extra)
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}",
                                     kl=f"{metrics.get('train/kl', float('nan')):.2f}", refresh=False)
                if config.eval.every and self.step % config.eval.every == 0 and not self._budget_spent():
                    self._evaluate(self.step, label=None)
                if config.checkpoint.every and self.step % config.checkpoint.every == 0 \
                        and not self._budget_spent():
                    started = time.perf_counter()
                    self.save_checkpoint()
                    self.logger.record("time/checkpoint_s", time.perf_counter() - started)
                keep_going = [callback(self.step, metrics) for callback in self.callbacks]
                if distributed.agree(any(result is False for result in keep_going)):  # one rank's stop stops all
                    break
                if distributed.agree(self._stop_requested):
                    return _Interruption(consistent=True, state=None)
        except KeyboardInterrupt:
            # Mid-rollout, the weights are those of the last update but the RNG streams have moved on:
            # save the streams as they were before the rollout. Mid-update, nothing consistent is left.
            return _Interruption(consistent=self._phase != "update",
                                 state=captured if self._phase == "rollout" else None)
        finally:
            progress.close()
            self._phase = "done"
        return None

    def _check_scored(self, rollout: Any) -> None:
        """Stop with a :class:`RewardError` after ``UNSCORED_ROLLOUTS_LIMIT`` rollouts in a row no reward scored.

        Raises:
            RewardError: naming the rewards, how many rollouts, and what their None meant.
        """
        scored_somewhere = distributed.agree(bool(rollout.scored.any()))  # a row of any rank
        self._unscored_rollouts = 0 if scored_somewhere else self._unscored_rollouts + 1
        if self._unscored_rollouts < UNSCORED_ROLLOUTS_LIMIT:
            return
        count, first = self._unscored_rollouts, self.step + 2 - self._unscored_rollouts
        names = ", ".join(repr(name) for name in self.reward_set.names)
        raise RewardError(
            f"reward(s) {names} returned None for every sample of {count} rollouts in a row (updates {first} to "
            f"{self.step + 1}, {count * rollout.batch_size} completions). None means 'no score for this sample' "
            "(TRL's contract), so these batches carry no reward signal and training would learn nothing; make the "
            "reward return a float for the samples it can judge (check the task columns it reads), or add a "
            "reward that scores every sample")

    def _budget_spent(self) -> bool:
        """Whether the budget is spent; agreed over the ranks (each measures its own time; any rank past
        ``time_limit_s`` stops every rank)."""
        budget = self.config.budget
        spent = budget.updates is not None and self.step >= budget.updates
        if budget.time_limit_s is not None:
            spent = distributed.agree(spent or self.elapsed_s >= budget.time_limit_s)
        return spent

    def _log(self, metrics: dict[str, float], rollout: Any, reward_extra: list[dict[str, Any]]) -> None:
        logging_config = self.config.logging
        if self.step % logging_config.log_every == 0:
            self.logger.record_many(metrics)
            self.logger.dump(self.step)
        if logging_config.samples_every and self.step % logging_config.samples_every == 0:
            # A row no reward scored shows NaN, as in the metrics, not the 0 the agent was given.
            scores = torch.where(rollout.scored, rollout.scores, float("nan")).tolist()
            self.logger.log_samples("samples/rollout", rollout.prompts[:SAMPLES_LOGGED],
                                    rollout.completions[:SAMPLES_LOGGED], scores[:SAMPLES_LOGGED], self.step)
            if reward_extra:
                self.logger.log_text("samples/reward_extra", extra_markdown(reward_extra[:SAMPLES_LOGGED]),
                                     self.step)

    def _evaluate(self, step: int, label: str | None) -> EvalResult | None:
        """Evaluate on the held-out prompts, log ``eval/...`` at ``step``; label it in eval.json if given."""
        return self._record_eval(self._measure(), step, label)

    def _measure(self) -> tuple[EvalResult, float] | None:
        """The held-out evaluation and its seconds (None without eval prompts, or off the main process)."""
        if not self.eval_rows or not self.is_main_process:
            return None
        started = time.perf_counter()
        eval_config = self.config.eval
        if self.eval_venv is not None:
            result = evaluate_episodes(self.policy, self.eval_venv, self.sampling, seed=eval_config.seed,
                                       num_episodes=eval_config.num_prompts, num_samples=eval_config.num_samples)
        else:
            result = evaluate_policy(self.policy, self.eval_rows, self.reward_set, self.sampling,
                                     seed=eval_config.seed, num_samples=eval_config.num_samples,
                                     max_prompt_tokens=self.venv.unwrapped.max_prompt_tokens)
        return result, time.perf_counter() - started

    def _record_eval(self, measured: tuple[EvalResult, float] | None, step: int,
                     label: str | None) -> EvalResult | None:
        """Log what :meth:`_measure` returned at ``step``; keep it in eval.json under ``label`` if given."""
        if measured is None:
            return None
        result, seconds = measured
        self.logger.record_many(result.metrics())
        self.logger.record("time/eval_s", seconds)
        self.logger.dump(step)
        self.logger.log_samples("samples/eval", [s["prompt"] for s in result.samples],
                                [s["completion"] for s in result.samples],
                                [s["reward"] for s in result.samples], step)
        if label is not None:
            saved = run_directory.read_evaluations(self.run_dir)
            saved[label] = {"step": step, **result.to_dict()}
            write_text_atomically(self.run_dir / EVAL_FILE, json.dumps(saved, indent=2) + "\n")
        return result

    def _load_eval(self, label: str) -> EvalResult | None:
        if label not in (saved := run_directory.read_evaluations(self.run_dir)):
            return None
        data = dict(saved[label])
        data.pop("step", None)
        return EvalResult(**data)

    # ------------------------------------------------------------------------------------- user-facing
    def _make_logger(self, truncate_after: int | None) -> Logger:
        if not self.is_main_process:  # other ranks neither open nor truncate rank 0's files
            return Logger([], is_main_process=False)
        writers: list[Any] = [JsonlWriter(self.run_dir, truncate_after=truncate_after)]
        if self.config.logging.tensorboard:
            purge_step = truncate_after + 1 if truncate_after is not None else None
            writers.append(TensorBoardWriter(self.run_dir, purge_step=purge_step))
        if not self.config.logging.progress_bar:
            writers.append(ConsoleWriter())
        return Logger(writers, is_main_process=self.is_main_process)

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.config.budget.updates, initial=self.step, unit="update", dynamic_ncols=True,
                    desc=self.run_dir.name,
                    disable=not (self.config.logging.progress_bar and self.is_main_process))

    def _say(self, text: str) -> None:
        if self.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(text)

    @contextlib.contextmanager
    def _graceful_interrupts(self) -> Iterator[None]:
        """First Ctrl-C: finish the current update, then stop and save. Second: stop now.

        Several ranks: a SIGTERM (torchrun's agent stopping the job because a rank died) raises a
        :class:`rlfb.distributed.RankFailure` naming the dead rank, so that the run ends as when a collective
        finds it (rank 0 marks it FAILED, one line); a second SIGTERM ends the process at once.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True
            signal.signal(signal.SIGINT, previous)
            self._say("Ctrl-C: stopping after this update and saving a checkpoint (Ctrl-C again to stop now)")

        def stopped_by_launcher(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise distributed.launcher_stop_failure()

        previous = signal.signal(signal.SIGINT, request_stop)
        previous_terminate = signal.signal(signal.SIGTERM, stopped_by_launcher) if self.world_size > 1 else None
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            if previous_terminate is not None:
                signal.signal(signal.SIGTERM, previous_terminate)


def init_adapter(init_from: str | Path) -> Path:
    """The adapter ``lora.init_from`` names; a run directory's newest *intact* checkpoint's (verified)."""
    from rlfb.preflight import init_adapter_directory

    path = Path(init_from)
    if (path / run_directory.CONFIG_FILE).is_file() and not (path / "adapter_config.json").is_file():
        return checkpointing.find_checkpoint(path) / "adapter"
    return init_adapter_directory(path)


def rank_prompt_indices(rng: np.random.Generator, table_size: int, groups: int, rank: int,
                        world_size: int) -> np.ndarray:
    """Rank ``rank``'s prompt indices of a global batch of ``groups`` groups, drawn from ``rng``.

    Every rank draws the whole batch's prompts from the same generator, seeded and called as one
    process's env draws them (``rng.choice(table_size, size=groups, replace=groups > table_size)`` in
    :meth:`rlfb.envs.core.PromptSource.choose`, with the env's ``np_random(seed)``), and rank r keeps groups
    r * G / W .. (r + 1) * G / W - 1: the ranks' batches, joined in rank order, are the batch one process
    collects. A group never spans ranks.
    """
    chosen = rng.choice(table_size, size=groups, replace=groups > table_size).astype(np.int64)
    share = groups // world_size
    return chosen[rank * share:(rank + 1) * share]


def rollout_metrics(rollout: Any, reward_names: Sequence[str], eos_token_id: int) -> dict[str, float]:
    """``rollout/...`` metrics of one batch: total reward, each component, length, turns, truncations.

    The total reward of an episode is its final score plus its turn rewards (a multi-turn episode's return;
    a single-turn completion has no turn reward). The reward statistics are over the rows some reward scored
    (NaN when none was): a row every reward returned None for is not a reward of 0, whatever the agents
    are given for it. Lengths count the model's tokens (all its turns; environment replies left out); an
    episode is truncated when its last model token is not EOS (a single-turn completion that hit
    ``max_new_tokens``). With several ranks the trainer joins every rank's :func:`rollout_rows` first.
    """
    return metrics_of_rows(rollout_rows(rollout, reward_names, eos_token_id), reward_names)


def rollout_rows(rollout: Any, reward_names: Sequence[str], eos_token_id: int) -> dict[str, torch.Tensor]:
    """The per-row values :func:`metrics_of_rows` summarises (each (B,)), so ranks can join their rows."""
    mask = rollout.action_mask.bool()
    last = last_action_index(mask).unsqueeze(1)  # (B, 1) each episode's last model token
    ended = ((rollout.completion_ids.gather(1, last) == eos_token_id) & mask.gather(1, last)).squeeze(1)
    rows = {"score": rollout.scores.double() + rollout.turn_rewards.double().sum(1),  # final score + turn rewards
            "scored": rollout.scored, "length": mask.sum(1), "ended": ended, "turns": rollout.num_turns}
    rows.update({f"reward/{name}": rollout.reward_components[name] for name in reward_names})
    return rows


def metrics_of_rows(rows: dict[str, torch.Tensor], reward_names: Sequence[str]) -> dict[str, float]:
    """The ``rollout/...`` metrics (see :func:`rollout_metrics`) of :func:`rollout_rows`' values."""
    scores = rows["score"][rows["scored"]]
    nan = float("nan")
    metrics = {"rollout/reward_mean": float(scores.mean()) if scores.numel() else nan,
               "rollout/reward_std": float(scores.std(unbiased=False)) if scores.numel() else nan,
               "rollout/scored_fraction": float(rows["scored"].double().mean()),
               "rollout/completion_length": float(rows["length"].double().mean()),
               "rollout/truncated_fraction": float((~rows["ended"]).double().mean()),
               "rollout/turns": float(rows["turns"].double().mean())}
    for name in reward_names:
        values = rows[f"reward/{name}"].double()
        finite = values[~torch.isnan(values)]
        metrics[f"rollout/reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
    return metrics


def extra_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the rows of :attr:`RewardLogs.extra`: prompt, completion, then each logged column."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["|" + "|".join(columns) + "|", "|" + "-|" * len(columns)]
    lines += ["|" + "|".join(cell(row.get(column)) for column in columns) + "|" for row in rows]
    return "\n".join(lines)
