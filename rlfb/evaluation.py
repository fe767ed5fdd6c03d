"""Evaluation on held-out prompts: rewards, KL to the reference, fluency, length, diversity, samples.

The trainer evaluates before training, every ``eval.every`` updates, and at the end, always on the same
prompts with the same sampling seed, so "before" and "after" differ only by the adapter. ``rlfb eval``
runs the same function on a run directory or a base model.

What is measured (docs/metrics.md has healthy values):

* ``reward/LABEL``: mean of each reward component, and ``reward/total`` (the weighted sum);
  :attr:`EvalResult.prompt_rewards` keeps each component's value per prompt (for standard errors).
* ``reward_metric/NAME``: what the rewards logged with ``log_metric`` while scoring.
* ``kl``: mean over completions of sum_t [log pi(a_t|s_t) - log pi_ref(a_t|s_t)] at temperature 1, the
  k1 estimate of KL(pi || pi_ref) in nats per completion (0 before training: the adapter starts at zero).
* ``fluency``: mean over all completion tokens of log pi_ref(a_t|s_t), the base model's log-likelihood
  per token; a collapsing policy writes text the base model finds unlikely, and this falls.
* ``completion_length``: mean tokens per completion, EOS included.
* ``distinct_1`` / ``distinct_2``: distinct word uni/bigrams over all completions divided by their count
  (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models").

A multi-turn run (``env.kind: multi_turn``) is evaluated by :func:`evaluate_episodes`: held-out episodes
played to their end: ``reward/total`` is the mean episode return (turn rewards and final score),
``reward/protocol`` the turn rewards' part; the same measures over the model's tokens only (KL, fluency and
length over all its turns; distinct n-grams over its turns' text); and the episodes' ``success_rate``,
``turns`` and, for a protocol that reports it, ``tool_use`` (:attr:`EvalResult.episodes`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlfb.checkpoint import CONFIG_FILE, TRAINER_STATE_FILE, find_checkpoint
from rlfb.config import RunConfig, load_config
from rlfb.models.sampler import SamplingConfig, generate
from rlfb.rewards.reward_set import LOGGED_METRIC_PREFIX

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@dataclass
class EvalResult:
    """Held-out evaluation of one policy; :meth:`metrics` gives the logged scalars."""

    rewards: dict[str, float]
    kl: float
    fluency: float
    completion_length: float
    distinct_1: float
    distinct_2: float
    num_prompts: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    reward_metrics: dict[str, float] = field(default_factory=dict)
    # Reward component -> its value on each held-out row, in row order (NaN where the reward gave None).
    prompt_rewards: dict[str, list[float]] = field(default_factory=dict)
    # Multi-turn evaluations only: success_rate, turns (and tool_use), means over the episodes.
    episodes: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Scalar metrics named as in docs/metrics.md (``eval/reward/sentiment``, ``eval/kl``, ...)."""
        result = {f"{prefix}reward/{name}": value for name, value in self.rewards.items()}
        result.update({f"{prefix}{LOGGED_METRIC_PREFIX}{name}": value for name, value in self.reward_metrics.items()})
        result.update({f"{prefix}kl": self.kl, f"{prefix}fluency": self.fluency,
                       f"{prefix}completion_length": self.completion_length,
                       f"{prefix}distinct_1": self.distinct_1, f"{prefix}distinct_2": self.distinct_2})
        result.update({f"{prefix}{name}": value for name, value in self.episodes.items()})
        return result

    def to_dict(self) -> dict[str, Any]:
        data = {"rewards": self.rewards, "kl": self.kl, "fluency": self.fluency,
                "completion_length": self.completion_length, "distinct_1": self.distinct_1,
                "distinct_2": self.distinct_2, "num_prompts": self.num_prompts, "samples": self.samples,
                "reward_metrics": self.reward_metrics}
        if self.episodes:  # a single-turn eval.json keeps its keys
            data["episodes"] = self.episodes
        return data


def encode_for_generation(tokenizer: Any, prompts: Sequence[str], sampling: SamplingConfig,
                          max_prompt_tokens: int | None, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt ids and mask under training's prompt rule, P trimmed to the longest prompt.

    The rule is the environments' (:func:`rlfb.envs.core.encode_prompts` at the width
    :func:`rlfb.envs.core.prompt_width` gives): a prompt longer than the window keeps its last tokens, with
    a :class:`~rlfb.envs.core.PromptTruncationWarning`, so evaluation sees what training saw.
    """
    from rlfb.envs.core import TRUNCATION_FIX, PromptTruncationWarning, encode_prompts, prompt_width

    width = prompt_width(max_prompt_tokens, sampling.max_new_tokens, tokenizer)
    input_ids, attention_mask, truncated = encode_prompts(tokenizer, prompts, width)
    if truncated:
        warnings.warn(f"{len(truncated)} of {len(prompts)} prompts are longer than max_prompt_tokens={width} "
                      f"(the longest: {max(truncated)} tokens); keeping their last tokens (left truncation), as "
                      f"training does; {TRUNCATION_FIX}", PromptTruncationWarning, stacklevel=3)
    first_used = int(attention_mask.any(0).argmax())  # columns no prompt uses cost compute; drop them
    return (torch.as_tensor(input_ids[:, first_used:], device=device),
            torch.as_tensor(attention_mask[:, first_used:], device=device))


@torch.no_grad()
def evaluate_policy(policy: Any, rows: Sequence[Mapping[str, Any]], reward_set: Any,
                    sampling: SamplingConfig, seed: int, batch_size: int = 64,
                    num_samples: int = 3, max_prompt_tokens: int | None = None) -> EvalResult:
    """Sample one completion per held-out row and measure it.

    Args:
        policy: a :class:`rlfb.models.policy.Policy` (adapter enabled = the policy, disabled = reference).
        rows: task rows, ``{"prompt": str, **extra columns}`` (extra columns go to the rewards).
        reward_set: a :class:`rlfb.rewards.RewardSet`; its running normalization is left untouched.
        sampling: how to sample (the run's sampling settings).
        seed: seed of a generator used only here, so evaluation never moves the training RNG streams.
        batch_size: prompts per generation batch.
        num_samples: completions kept as text samples.
        max_prompt_tokens: the prompt window (the run's ``sampling.max_prompt_tokens``); a longer prompt
            keeps its last tokens, as in training. None: the environments' default for the tokenizer.

    Returns:
        The :class:`EvalResult`.
    """
    if not rows:
        raise ValueError("evaluation needs at least one held-out prompt")
    tokenizer = policy.tokenizer
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    prompts, completions, completion_ids = [], [], []
    kl_per_completion, reference_logprobs_all = [], []
    for first in range(0, len(rows), batch_size):
        batch_rows = rows[first:first + batch_size]
        batch_prompts = [row["prompt"] for row in batch_rows]
        input_ids, attention_mask = encode_for_generation(tokenizer, batch_prompts, sampling, max_prompt_tokens,
                                                          policy.device)  # (B, P) each, left-padded
        generation = generate(policy.model, input_ids, attention_mask, sampling,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              generator=generator)
        mask = generation.completion_mask.to(policy.device)  # (B, T)
        full_ids = torch.cat([input_ids, generation.completion_ids.to(policy.device)], dim=1)
        full_mask = torch.cat([attention_mask, mask], dim=1)
        start = input_ids.shape[1]
        # KL and fluency are properties of the models, so both are measured at temperature 1.
        logprobs = policy.forward_logprobs_values(full_ids, full_mask, start, with_values=False,
                                                  with_entropy=False).logprobs  # (B, T)
        reference = policy.reference_logprobs(full_ids, full_mask, start)  # (B, T)
        maskf = mask.float()
        kl_per_completion.extend(((logprobs - reference) * maskf).sum(1).tolist())
        # One host copy per tensor for the batch, not several per row.
        lengths = mask.sum(1).tolist()
        batch_completion_ids = generation.completion_ids.tolist()
        batch_reference = reference.tolist()
        for row, length in enumerate(lengths):
            ids = batch_completion_ids[row][:length]
            completion_ids.append(ids)
            completions.append(tokenizer.decode(ids, skip_special_tokens=True))
            reference_logprobs_all.extend(batch_reference[row][:length])
        prompts.extend(batch_prompts)

    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    updating = getattr(reward_set, "update_normalization", None)
    if updating is not None:
        reward_set.update_normalization = False  # evaluation must not shift the training reward scale
    try:
        result = reward_set(prompts, completions, completion_ids=completion_ids, **columns)
    finally:
        if updating is not None:
            reward_set.update_normalization = updating
    reward_set.pop_logged()  # what the rewards logged here is in the result, not for the next rollout's logs
    rewards = {"total": _nanmean(result.total)}
    rewards.update({name: _nanmean(values) for name, values in result.components.items()})
    lengths = [len(ids) for ids in completion_ids]
    samples = [{"prompt": p, "completion": c, "reward": float(r)}
               for p, c, r in list(zip(prompts, completions, result.total, strict=True))[:num_samples]]
    return EvalResult(
        rewards=rewards,
        kl=float(np.mean(kl_per_completion)),
        fluency=float(np.mean(reference_logprobs_all)) if reference_logprobs_all else float("nan"),
        completion_length=float(np.mean(lengths)),
        distinct_1=distinct_n(completions, 1),
        distinct_2=distinct_n(completions, 2),
        num_prompts=len(rows),
        samples=samples,
        reward_metrics=result.metrics,
        prompt_rewards={name: np.asarray(values, dtype=np.float64).tolist()
                        for name, values in result.components.items()},
    )


# Episodes per batch of a multi-turn evaluation (the eval env's rows).
EVAL_EPISODES_PER_BATCH = 64


@torch.no_grad()
def evaluate_episodes(policy: Any, venv: Any, sampling: SamplingConfig, seed: int, num_episodes: int,
                      num_samples: int = 3) -> EvalResult:
    """Play ``num_episodes`` held-out episodes of a multi-turn vector env to their end and measure them.

    Episode i opens on row ``i mod R`` of the task's eval split (R rows) and is reset with seed
    ``seed + i``, so every evaluation of a run plays the same episodes (the same sums, the same secret
    numbers) with the same sampling noise; only the adapter differs. The env's batches are of its
    ``num_envs`` rows; the rows past ``num_episodes`` in the last batch are dropped.

    Args:
        policy: A :class:`rlfb.models.policy.Policy`.
        venv: A ``rlfb/MultiTurn-v0`` vector env (token actions), used for evaluation only (it is reset).
        sampling: How to sample each turn (the run's sampling settings).
        seed: Seeds the episodes and a sampling generator used only here.
        num_episodes: Episodes to play.
        num_samples: Episodes kept as text samples.

    Returns:
        An :class:`EvalResult`: ``rewards`` holds ``total`` (the mean episode return), ``protocol`` (the turn
        rewards' sum) and each reward function's mean final score; KL, fluency and length over the model's
        tokens; :attr:`EvalResult.episodes` the episode measures.
    """
    from rlfb.agents.multi_turn import collect_episodes
    from rlfb.agents.rollout import evaluate_rollout

    if num_episodes < 1:
        raise ValueError("evaluation needs at least one episode")
    env = venv.unwrapped
    eval_rows = len(env.settings.task.eval)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    reward_set = env.settings.rewards
    updating = getattr(reward_set, "update_normalization", None)
    if updating is not None:
        reward_set.update_normalization = False  # evaluation must not shift the training reward scale
    per_episode: dict[str, list[float]] = {}
    texts: list[str] = []
    samples: list[dict[str, Any]] = []
    try:
        for first in range(0, num_episodes, env.num_envs):
            indices = [(first + row) % eval_rows for row in range(env.num_envs)]
            batch = collect_episodes(venv, policy, sampling, generator, seed=seed + first,
                                     options={"split": "eval", "indices": indices})
            keep = min(env.num_envs, num_episodes - first)
            rollout = batch.rollout
            evaluation = evaluate_rollout(policy, rollout)  # KL and fluency: properties of the models, at T = 1
            mask = rollout.action_mask.float()
            values = {
                "return": batch.returns, "success": batch.success.astype(np.float64),
                "turns": rollout.num_turns.double().cpu().numpy(),
                "kl": ((evaluation.logprobs - evaluation.reference_logprobs) * mask).sum(1).double().cpu().numpy(),
                "reference_logprob_sum": evaluation.reference_logprobs.sum(1).double().cpu().numpy(),
                "model_tokens": mask.sum(1).double().cpu().numpy(),
                **{f"reward/{name}": values.double().cpu().numpy()
                   for name, values in rollout.reward_components.items()},
            }
            if batch.used_tool is not None:
                values["tool_use"] = batch.used_tool.astype(np.float64)
            for name, array in values.items():
                per_episode.setdefault(name, []).extend(np.asarray(array)[:keep].tolist())
            conversations = env.conversations[:keep]
            texts += [" ".join(conversation.turns) for conversation in conversations]
            samples += [{"prompt": rollout.prompts[row], "completion": rollout.completions[row],
                         "reward": float(batch.returns[row])} for row in range(keep)]
    finally:
        if updating is not None:
            reward_set.update_normalization = updating
    if reward_set is not None:
        reward_set.pop_logged()  # what the rewards logged here is not for the next rollout's logs
    rewards = {"total": float(np.mean(per_episode["return"]))}
    rewards.update({name.removeprefix("reward/"): _nanmean(np.asarray(values))
                    for name, values in per_episode.items() if name.startswith("reward/")})
    episodes = {"success_rate": float(np.mean(per_episode["success"])), "turns": float(np.mean(per_episode["turns"]))}
    if "tool_use" in per_episode:
        episodes["tool_use"] = float(np.mean(per_episode["tool_use"]))
    model_tokens = float(np.sum(per_episode["model_tokens"]))
    return EvalResult(
        rewards=rewards,
        kl=float(np.mean(per_episode["kl"])),
        fluency=float(np.sum(per_episode["reference_logprob_sum"])) / model_tokens if model_tokens else float("nan"),
        completion_length=float(np.mean(per_episode["model_tokens"])),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        num_prompts=num_episodes,
        samples=samples[:num_samples],
        prompt_rewards={name.removeprefix("reward/"): values
                        for name, values in per_episode.items() if name.startswith("reward/")},
        episodes=episodes,
    )


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all ``texts`` / total n-grams (0 when there are none).

    Example:
        >>> distinct_n(["the film was good", "the film was bad"], 2)
        0.6666666666666666
    """
    grams = [tuple(words[i:i + n]) for words in (_WORD.findall(text.lower()) for text in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def comparison_table(before: EvalResult, after: EvalResult) -> str:
    """A plain-text table of every measure before and after training, then sample completions."""
    rows = [(f"reward/{name}", before.rewards.get(name, math.nan), after.rewards.get(name, math.nan))
            for name in after.rewards]
    rows += [("kl (nats/completion)", before.kl, after.kl),
             ("fluency (base log-lik/token)", before.fluency, after.fluency),
             ("completion length (tokens)", before.completion_length, after.completion_length),
             ("distinct-1", before.distinct_1, after.distinct_1),
             ("distinct-2", before.distinct_2, after.distinct_2)]
    rows += [(name, before.episodes.get(name, math.nan), value) for name, value in after.episodes.items()]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"held-out evaluation on {after.num_prompts} prompts",
             f"{'':<{width}}  {'before':>9}  {'after':>9}  {'change':>9}"]
    lines += [f"{name:<{width}}  {old:>9.3f}  {new:>9.3f}  {new - old:>+9.3f}" for name, old, new in rows]
    for label, result in (("before", before), ("after", after)):
        lines.append(f"samples {label}:")
        lines += [f"  [{s['reward']:+.2f}] {s['prompt']}|{s['completion']}" for s in result.samples]
    return "\n".join(lines)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def load_policy(run_dir_or_model: str | Path, device: str = "auto") -> tuple[Any, RunConfig | None]:
    """The trained policy of a run directory (or checkpoint), or a base model with an identity adapter.

    A run directory resolves to its newest checkpoint (``final/`` at the end of training); the adapter is
    loaded with ``PeftModel.from_pretrained``, exactly as plain peft code would.

    Returns:
        (policy without a value head, the run's config or None for a base model).
    """
    from peft import PeftModel

    from rlfb.models.loading import load_model
    from rlfb.models.policy import Policy

    path = Path(run_dir_or_model)
    if path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / TRAINER_STATE_FILE).is_file()):
        checkpoint = find_checkpoint(path)
        config = load_config(checkpoint / CONFIG_FILE)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            config.model.dtype or "")
        base, tokenizer = load_model(config.model.name, device=device, dtype=dtype)
        adapted = PeftModel.from_pretrained(base, str(checkpoint / "adapter"))
        return Policy(adapted, tokenizer, value_head=False, device=device), config
    model, tokenizer = load_model(str(run_dir_or_model), device=device)
    return Policy(model, tokenizer, value_head=False, device=device), None


@torch.no_grad()
def sample_completions(policy: Any, prompts: Sequence[str], sampling: SamplingConfig, seed: int,
                       num_samples: int = 1, max_prompt_tokens: int | None = None) -> list[list[str]]:
    """``num_samples`` completions of each prompt, reproducible from ``seed``; prompts as in :func:`evaluate_policy`.

    Returns:
        One list of ``num_samples`` completions per prompt.
    """
    tokenizer = policy.tokenizer
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]
    input_ids, attention_mask = encode_for_generation(tokenizer, repeated, sampling, max_prompt_tokens,
                                                      policy.device)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    generation = generate(policy.model, input_ids, attention_mask, sampling,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          generator=generator)
    texts = [tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
             for ids, mask in zip(generation.completion_ids, generation.completion_mask, strict=True)]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
