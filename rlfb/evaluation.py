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

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Scalar metrics named as in docs/metrics.md (``eval/reward/sentiment``, ``eval/kl``, ...)."""
        result = {f"{prefix}reward/{name}": value for name, value in self.rewards.items()}
        result.update({f"{prefix}{LOGGED_METRIC_PREFIX}{name}": value for name, value in self.reward_metrics.items()})
        result.update({f"{prefix}kl": self.kl, f"{prefix}fluency": self.fluency,
                       f"{prefix}completion_length": self.completion_length,
                       f"{prefix}distinct_1": self.distinct_1, f"{prefix}distinct_2": self.distinct_2})
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"rewards": self.rewards, "kl": self.kl, "fluency": self.fluency,
                "completion_length": self.completion_length, "distinct_1": self.distinct_1,
                "distinct_2": self.distinct_2, "num_prompts": self.num_prompts, "samples": self.samples,
                "reward_metrics": self.reward_metrics}


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
