"""What each stage kind does: read its inputs, write its artefact into its work directory, return it.

Every function takes a :class:`StageContext` and returns ``(outputs, metrics)``: ``outputs`` maps the
artefact's role (``adapter``, ``reward_model``, ...) to a path inside the work directory (the runner
records it relative to the pipeline directory), ``metrics`` are numbers for the summary. A stage is
deterministic given its key on CPU (everything is seeded from the run's seed), so a stage killed half
way and run again from the start writes the same artefact; an ``rl`` stage resumes from its newest
checkpoint instead, which the trainer makes exact (docs/run_directory.md).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfb.errors import ConfigError
from rlfb.pipeline.config import PipelineConfig
from rlfb.pipeline.plan import StageRun

Outputs = tuple[dict[str, Path], dict[str, float]]


@dataclass
class StageContext:
    """A stage run with its resolved inputs: role -> artefact paths (oldest first), as recorded upstream."""

    config: PipelineConfig
    run: StageRun
    work: Path
    inputs: dict[str, list[Path]]
    say: Callable[[str], None]

    @property
    def model_name(self) -> str:
        """The base model: a base stage's artefact, else ``run.model``."""
        if "model" in self.inputs:
            return str(self.inputs["model"][0])
        model = self.config.run.get("model", "rlfb-tiny")
        return model if isinstance(model, str) else str(model.get("name", "rlfb-tiny"))

    @property
    def adapter(self) -> Path | None:
        return self.inputs["adapter"][0] if "adapter" in self.inputs else None

    @property
    def task_name(self) -> str:
        task = self.config.run.get("task", "sentiment")
        return task if isinstance(task, str) else str(task.get("name", "sentiment"))

    def run_config(self) -> Any:
        """The shared run config (``run`` with the pipeline's keys): the LoRA, sampling and task settings."""
        return self.config.shared_run_config(self.work, self.run.seed)


# ------------------------------------------------------------------------------------------- base
def run_base(context: StageContext) -> Outputs:
    """``run.model`` as it is, or (``rebuild: true``) the built-in model trained again from its corpus."""
    if not context.run.stage.options.rebuild:
        return {"model": Path(context.model_name)}, {}
    from rlfb.models.builtin import BUILTIN_RECIPES, build_model

    if context.model_name not in BUILTIN_RECIPES:
        raise ConfigError(f"stage '{context.run.name}': rebuild is for the built-in models "
                          f"({', '.join(BUILTIN_RECIPES)}); run.model is {context.model_name!r}: remove rebuild")
    directory = context.work / "model"
    directory.mkdir(parents=True, exist_ok=True)
    record = build_model(BUILTIN_RECIPES[context.model_name], directory, name=context.model_name)
    return {"model": directory}, {key: float(value) for key, value in record.items()
                                  if isinstance(value, (int, float)) and not isinstance(value, bool)}


# -------------------------------------------------------------------------------------------- sft
def run_sft(context: StageContext) -> Outputs:
    """TRL's SFTTrainer on the policy's own LoRA adapter (the rl stages continue this adapter)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlfb.trainer import seed_everything

    options = context.run.stage.options
    rows = _sft_rows(context)
    if not rows:
        raise ConfigError(f"stage '{context.run.name}': no supervised rows (source {options.source}); "
                          "with source: edits, the feedback stages need edit judgments (kinds: [edit])")
    from rlfb.rewards.feedback import write_jsonl

    write_jsonl(rows, context.work / "sft.jsonl")  # what the adapter was trained on
    seed_everything(context.run.seed)  # LoRA's A matrices are drawn from torch's RNG
    policy = _policy(context, value_head=False, with_adapter=False)
    args = SFTConfig(output_dir=str(context.work / "trl"), num_train_epochs=options.epochs,
                     per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate,
                     max_length=options.max_length, seed=context.run.seed, data_seed=context.run.seed,
                     report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True, use_cpu=True
                     if str(policy.device) == "cpu" else False, dataloader_num_workers=0)
    trainer = SFTTrainer(model=policy.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=policy.tokenizer)
    result = trainer.train()
    policy.model.eval()
    adapter = context.work / "adapter"
    policy.save(adapter)
    shutil.rmtree(context.work / "trl", ignore_errors=True)
    return {"adapter": adapter}, {"train_loss": float(result.training_loss), "rows": float(len(rows))}


def _sft_rows(context: StageContext) -> list[dict[str, str]]:
    """prompt-completion rows: the grammar's completions above ``min_gold``, people's edits, or a file."""
    options = context.run.stage.options
    if options.source == "file":
        return [{"prompt": str(row["prompt"]), "completion": str(row["completion"])}
                for row in _read_jsonl(Path(options.path))]
    if options.source == "edits":
        from rlfb.feedback.exchange import export_rows
        from rlfb.feedback.store import FeedbackStore

        rows = []
        for path in context.inputs.get("feedback", []):
            store = FeedbackStore(path)
            try:
                rows += list(export_rows(store, "sft"))
            finally:
                store.close()
        return rows
    from rlfb.rewards.feedback import TASKS, _completion, _prompts, gold_score

    task = context.task_name
    if task not in TASKS:
        raise ConfigError(f"stage '{context.run.name}': source grammar writes the built-in tasks' text "
                          f"({', '.join(TASKS)}), not {task!r}; use source: file")
    rng = random.Random(context.run.seed)
    rows = []
    while len(rows) < options.size:
        for prompt in _prompts(task, "train", rng, options.size):
            completion = _completion(task, rng, prompt)
            if gold_score(task, prompt, completion) > options.min_gold and len(rows) < options.size:
                rows.append({"prompt": prompt, "completion": completion})
    return rows


# ------------------------------------------------------------------------------------ reward model
def run_reward_model(context: StageContext) -> Outputs:
    """Train a reward model on synthesized feedback, the pipeline's feedback stores, or a file."""
    options = context.run.stage.options
    metrics = build_reward_model(options, context.task_name, context.model_name, context.run.seed, context.work,
                                 feedback_stores=context.inputs.get("feedback", []))
    context.say(f"pipeline: {context.run.name}: reward model on {metrics['rows']:.0f} rows, held-out "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "rows"))
    return {"reward_model": context.work / "reward_model"}, metrics


def build_reward_model(options: Any, task: str, base_model: str, seed: int, work: Path,
                       feedback_stores: Sequence[Path] = ()) -> dict[str, float]:
    """The one way rlfb makes a reward model from feedback (pipeline stages and ``rlfb bench`` recipes).

    Writes ``work/feedback_KIND.jsonl`` (the rows) and ``work/reward_model`` (the model).

    Args:
        options: a :class:`rlfb.pipeline.config.RewardModelStage`.
        task: the task whose gold synthesizes feedback and scores the held-out rows (built-in tasks).
        base_model: the causal LM the reward model starts from.
        seed: seeds the synthesis, the split and the training.
        work: the directory written.
        feedback_stores: SQLite feedback stores (``source: feedback``), oldest first.

    Returns:
        ``rows`` and the reward model's held-out metrics.
    """
    from rlfb.rewards import feedback
    from rlfb.rewards.training import RewardModelConfig, train_reward_model

    kind = options.feedback_kind
    if options.source == "synthesized":
        rows = feedback.synthesize(task, kind, options.size, noise=options.noise, seed=seed,
                                   model=base_model if options.from_model else None)
    elif options.source == "feedback":
        rows = _exported(feedback_stores, kind)
    else:
        rows = feedback.read_feedback(options.path, kind)
    if len(rows) < 2:
        raise ConfigError(f"{len(rows)} {kind} rows to train a reward model on; the feedback stages must give "
                          f"judgments that export as {kind} (choice or edit judgments for pairwise)")
    data = work / f"feedback_{kind}.jsonl"
    feedback.write_jsonl(rows, data)
    report = train_reward_model(RewardModelConfig(
        kind=kind, data=str(data), output_dir=str(work / "reward_model"), base_model=base_model,
        gold=task if task in feedback.TASKS else "", epochs=options.epochs, learning_rate=options.learning_rate,
        batch_size=options.batch_size, seed=seed))
    return {"rows": float(len(rows)), **{key: float(value) for key, value in report.metrics.items()}}


def _exported(stores: list[Path], kind: str) -> list[dict[str, Any]]:
    from rlfb.feedback.exchange import export_rows
    from rlfb.feedback.store import FeedbackStore

    rows: list[dict[str, Any]] = []
    for path in stores:
        store = FeedbackStore(path)
        try:
            rows += list(export_rows(store, kind))
        finally:
            store.close()
    return rows


# -------------------------------------------------------------------------------------------- rl
def run_rl(context: StageContext) -> Outputs:
    """Train with ``rlfb.trainer.Trainer`` from the previous adapter; a killed stage resumes its checkpoint."""
    stage = context.run.stage
    rewards = None
    if "reward_model" in context.inputs:
        rewards = [{"name": "reward_model", "kwargs": {"path": str(context.inputs["reward_model"][0])}}]
    config = context.config.run_config(stage, context.work, str(context.adapter) if context.adapter else None,
                                       rewards, context.run.seed)
    if "model" in context.inputs:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=context.model_name))
    run_dir = context.work / "run"
    trainer = rl_stage_trainer(config, run_dir, say=lambda line: context.say(f"pipeline: {context.run.name}: {line}"))
    result = trainer.train()
    if result.interrupted:
        raise KeyboardInterrupt
    metrics = {"updates": float(result.step), "train_seconds": float(trainer.elapsed_s)}
    logged = _last_logged(run_dir)
    metrics.update({key: logged[key] for key in RL_SUMMARY_METRICS if isinstance(logged.get(key), (int, float))})
    return {"adapter": run_dir / "final" / "adapter", "run": run_dir}, metrics


def rl_stage_trainer(config: Any, run_dir: Path, callbacks: Sequence[Any] = (),
                     say: Callable[[str], None] = print) -> Any:
    """The trainer of an rl stage: ``config`` trained into ``run_dir``, resumed from its newest checkpoint.

    ``config.output_dir`` must be ``run_dir``'s parent and ``config.logging.run_name`` its name. A run
    directory without a checkpoint (killed before its first) is removed and started again. The bench's
    runs are made here too, so pipelines and ``rlfb bench`` chain the same stages.
    """
    from rlfb.checkpoint import CheckpointNotFoundError, find_checkpoint
    from rlfb.trainer import Trainer

    resume = None
    if run_dir.is_dir():
        try:
            resume = find_checkpoint(run_dir, report=lambda line: None)
            say(f"resuming {resume.relative_to(run_dir.parent)}")
        except CheckpointNotFoundError:
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start it again
    return Trainer(config, resume_from=run_dir if resume is not None else None, callbacks=callbacks)


RL_SUMMARY_METRICS = ("rollout/reward_mean", "train/kl")  # from the last logged update (docs/metrics.md)


def _last_logged(run_dir: Path) -> dict[str, Any]:
    from rlfb.logging import METRICS_FILE

    lines = [line for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    updates = [row for row in rows if any(key.startswith("rollout/") for key in row)]
    return updates[-1] if updates else {}


# -------------------------------------------------------------------------------------- feedback
def run_feedback(context: StageContext) -> Outputs:
    """Judgments of the current policy through the feedback HTTP API, stored in ``work/store.sqlite``.

    ``simulated``: the VADER rater (:class:`rlfb.feedback.simulated.SimulatedRater`) judges through the
    API in this process (one rater, so the judgments come in a fixed order: the stage is deterministic).
    ``people``: the page is served on ``host:port`` with one printed rater token, until ``judgments`` are in.
    """
    from rlfb.feedback.items import ItemPool, PolicySource
    from rlfb.feedback.server import ServerSettings, create_app
    from rlfb.feedback.store import FeedbackStore

    options = context.run.stage.options
    policy = _policy(context, value_head=False, with_adapter=True)
    run_config = context.run_config()
    store_path = context.work / "store.sqlite"
    store = FeedbackStore(store_path)
    try:
        from rlfb.envs.tasks import make_task
        from rlfb.models.sampler import SamplingConfig

        task = run_config.task
        prompts = [str(row["prompt"]) for row in make_task({"name": task.name, **task.kwargs}).train_rows()]
        sampling = run_config.sampling
        source = PolicySource(policy, SamplingConfig(temperature=sampling.temperature, top_k=sampling.top_k,
                                                     top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens),
                              version=context.inputs["adapter"][0].parent.name if context.adapter else "base",
                              step=None, max_prompt_tokens=sampling.max_prompt_tokens, seed=context.run.seed)
        # Choices need two completions, the other kinds one: items come as the kinds asked for need them.
        pair_fraction = 1.0 if set(options.kinds) == {"choice"} else 0.0 if "choice" not in options.kinds else 0.5
        settings = ServerSettings(kinds=tuple(options.kinds), goal=options.judgments)
        if options.source == "simulated":
            # Every item made before the rater starts, in whole batches, in this thread: the items (and so the
            # judgments) do not depend on how a filler thread's timing would have cut the batches.
            batches = -(-options.judgments // ITEM_BATCH)
            pool = ItemPool(store, source, prompts, pair_fraction=pair_fraction, capacity=batches * ITEM_BATCH,
                            batch_size=ITEM_BATCH, seed=context.run.seed)
            while pool.fill_once():
                pass
            _simulated_judgments(context, store, create_app(store, pool, settings))
        else:
            pool = ItemPool(store, source, prompts, pair_fraction=pair_fraction, batch_size=ITEM_BATCH,
                            seed=context.run.seed)
            _people_judgments(context, store, pool, settings)
        counts = store.stats()
    finally:
        store.close()
    return {"feedback": store_path}, {"judgments": float(counts.get("judgments", options.judgments))}


ITEM_BATCH = 16  # prompts per generation call of the feedback stage's item pool


def _simulated_judgments(context: StageContext, store: Any, app: Any) -> None:
    from fastapi.testclient import TestClient

    from rlfb.feedback.simulated import SimulatedRater

    options = context.run.stage.options
    token = store.add_rater("simulated")
    url = "http://127.0.0.1"
    client = TestClient(app, base_url=url)
    rater = SimulatedRater(url, token, noise=options.noise, seed=context.run.seed, kinds=options.kinds, client=client)
    rater.run(options.judgments)


def _people_judgments(context: StageContext, store: Any, pool: Any, settings: Any) -> None:
    import threading
    import time

    import uvicorn

    from rlfb.feedback.server import LOOPBACK_HOSTS, create_app

    options = context.run.stage.options
    if options.host not in LOOPBACK_HOSTS:
        settings.loopback_only = False
    token = store.add_rater("rater")
    server = uvicorn.Server(uvicorn.Config(create_app(store, pool, settings), host=options.host, port=options.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="rlfb-pipeline-feedback", daemon=True)
    pool.start()
    thread.start()
    context.say(f"pipeline: {context.run.name}: rate at http://{options.host}:{options.port}/ with token {token} "
                f"(more raters: rlfb feedback add-rater {context.work / 'store.sqlite'}); waiting for "
                f"{options.judgments} judgments")
    deadline = time.monotonic() + options.wait_s
    try:
        while store.count() < options.judgments:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage '{context.run.name}': {store.count()} of {options.judgments} judgments "
                                   f"after {options.wait_s:.0f} s (wait_s); rerun the pipeline to keep waiting")
            if not thread.is_alive():
                raise RuntimeError(f"stage '{context.run.name}': the feedback server stopped (is port "
                                   f"{options.port} taken? set the stage's port)")
            time.sleep(1.0)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        pool.stop()


# ------------------------------------------------------------------------------------------ eval
def run_eval(context: StageContext) -> Outputs:
    """Gold rewards, KL to the base model and fluency on the task's held-out prompts."""
    from rlfb.bench import gold_key

    options = context.run.stage.options
    policy = _policy(context, value_head=False, with_adapter=True)
    gold = context.config.gold
    result = evaluate_gold(policy, context.run_config(), gold, num_prompts=options.num_prompts,
                           completions_per_prompt=options.completions_per_prompt, seed=options.seed, num_samples=5)
    metrics = {gold_key(r): float(result.rewards[gold_key(r)]) for r in gold}
    metrics.update(kl=result.kl, fluency=result.fluency, completion_length=result.completion_length,
                   distinct_2=result.distinct_2)
    path = context.work / "eval.json"
    path.write_text(json.dumps({"metrics": metrics, "samples": result.samples}, indent=1))
    return {"metrics": path}, metrics


def evaluate_gold(policy: Any, run_config: Any, gold: Sequence[Any], *, num_prompts: int, seed: int,
                  completions_per_prompt: int = 1, extra: Sequence[Any] = (), num_samples: int = 0,
                  rows: Sequence[dict[str, Any]] | None = None) -> Any:
    """The eval stage's measurement: ``policy`` on the first ``num_prompts`` held-out rows of the run's task.

    Gold rewards are labelled ``gold/NAME``; ``extra`` are more :class:`~rlfb.rewards.RewardSpec` scored on
    the same samples (the bench's design rewards); ``rows`` replaces the held-out rows (perturbed prompts).
    Sampling is the run's (temperature, top-k, top-p, lengths). Returns the
    :class:`~rlfb.evaluation.EvalResult`; the bench evaluates its runs' curves with it too.
    """
    from rlfb.bench import gold_key
    from rlfb.envs.tasks import make_task
    from rlfb.evaluation import evaluate_policy
    from rlfb.models.sampler import SamplingConfig
    from rlfb.rewards import RewardSet, RewardSpec

    if rows is None:
        task = run_config.task
        rows = list(make_task({"name": task.name, **task.kwargs}).eval_rows())[:num_prompts]
    rows = [row for row in rows for _ in range(completions_per_prompt)]
    rewards = RewardSet([RewardSpec(name=r.name, kwargs=dict(r.kwargs), label=gold_key(r)) for r in gold]
                        + list(extra))
    if rewards.needs_scorer:
        rewards.bind_scorer(policy.scorer)
    sampling = run_config.sampling
    return evaluate_policy(policy, rows, rewards, SamplingConfig(
        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens), seed=seed, num_samples=num_samples,
        max_prompt_tokens=sampling.max_prompt_tokens)


# --------------------------------------------------------------------------------------- helpers
def _policy(context: StageContext, value_head: bool, with_adapter: bool) -> Any:
    """The policy of this stage: the base model with the run's LoRA settings, and the newest adapter."""
    from rlfb.models.policy import LoraSettings, Policy

    lora = context.run_config().lora
    policy = Policy.from_pretrained(context.model_name, value_head=value_head, device=context.run_config().device,
                                    lora=LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                                      target_modules=lora.target_modules))
    if with_adapter and context.adapter is not None:
        policy.load_adapter(context.adapter, require_value_head=False)
    return policy


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from rlfb.errors import DatasetError

    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DatasetError(f"{path}, line {number}: not JSON ({error}); one JSON object per line") from None
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise DatasetError(f"{path}, line {number}: expected an object with 'prompt' and 'completion'")
        rows.append(row)
    return rows


STAGE_FUNCTIONS: dict[str, Callable[[StageContext], Outputs]] = {
    "base": run_base, "sft": run_sft, "reward_model": run_reward_model, "rl": run_rl, "feedback": run_feedback,
    "eval": run_eval}
