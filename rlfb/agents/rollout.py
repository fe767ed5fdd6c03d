"""Rollouts: collecting a batch of episodes, and the policy's view of them.

:func:`collect_rollout` samples whole completions for the token vector env's prompts with a KV-cached
sampler, scores them through the env in one call and returns a single-turn
:class:`~rlfb.agents.trajectory.Rollout` (the batch structure every agent reads, defined in
rlfb/agents/trajectory.py with its multi-turn fields). :func:`evaluate_rollout` then recomputes, in no-grad
passes over the full sequences, the log-probs and values the agents need (see its docstring for why the
sampler's own log-probs are not used); :func:`rollout_reference_logprobs` computes the reference's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rlfb.agents.trajectory import Rollout
from rlfb.models.policy import Policy, PolicyForward
from rlfb.models.sampler import SamplingConfig, TokenSampler


class RolloutEvaluation(NamedTuple):
    """The policy's view of a rollout before the update; every tensor is (B, T), no grad, 0 wherever
    ``rollout.action_mask`` is 0 (environment tokens and padding are not actions).

    Attributes:
        logprobs: log pi_old(a_t | s_t) under the training forward pass (PPO's "old" log-probs).
        reference_logprobs: log pi_ref(a_t | s_t), the adapter disabled.
        values: V_old(s_t), or None without a value head.
    """

    logprobs: torch.Tensor
    reference_logprobs: torch.Tensor
    values: torch.Tensor | None


# Rows per forward pass over a rollout: rows sorted by completion length, each pass trimmed to its own
# width. On rlfb-tiny with 32 rows of a sentiment rollout (35% of the padded batch is padding), two passes of 16
# took 17 ms instead of 20 (no grad) and 39 instead of 45 (forward and backward); more, smaller passes gain
# little more on a small model, where each call has a fixed cost.
ROWS_PER_PASS = 16


def forward_rollout(
    policy: Policy,
    rollout: Rollout,
    *,
    reference: bool = False,
    max_rows_per_pass: int | None = None,
    share_prompts: bool | None = False,
    **forward_options: Any,
) -> PolicyForward:
    """:meth:`Policy.forward_logprobs_values` over a rollout, in passes of rows of similar length.

    A rollout is padded to its longest prompt and its longest completion; the padding costs as much compute
    as real tokens. Rows are sorted by completion length and split into passes of at most
    ``ROWS_PER_PASS`` (and ``max_rows_per_pass``) rows; each pass drops the prompt columns none of its rows
    uses and the completion columns past its longest completion. Outputs are put back in the rollout's row
    order, 0 past each pass's width; gradients flow as from one pass.

    Args:
        policy: The policy.
        rollout: The batch.
        reference: Run the reference (adapter disabled, no grad) instead of the policy.
        max_rows_per_pass: Also bound the rows per pass (memory).
        share_prompts: Encode a prompt once for the rows of a pass that share it
            (:meth:`Policy.forward_logprobs_values`); ``None``: when that pays. Passes group rows by
            completion length, so the choice can differ between two calls over the same rows in other
            groupings, by float rounding: only a pass whose outputs are not compared with another pass's
            may use it (the reference's, or a gradient step's forward that is also its own pi_old).
        **forward_options: ``temperature``, ``with_values``, ``with_entropy``, ``entropy_grad``.

    Returns:
        A :class:`~rlfb.models.policy.PolicyForward` of (B, T) tensors.
    """
    batch_size, width = rollout.batch_size, rollout.completion_ids.shape[1]
    rows_per_pass = min(ROWS_PER_PASS, max_rows_per_pass or batch_size)
    order = torch.argsort(rollout.completion_mask.sum(1), stable=True)
    if reference:  # the adapter switched off once for all passes (peft visits every module to switch it)
        forward_options.update(with_values=False, with_entropy=False)
    passes: list[PolicyForward] = []
    with policy.reference() if reference else contextlib.nullcontext(), torch.set_grad_enabled(
        torch.is_grad_enabled() and not reference
    ):
        for rows in order.split(rows_per_pass):
            prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
            first = int(prompt_mask.bool().any(0).nonzero()[0])  # the first prompt column a row of this pass uses
            length = int(completion_mask.sum(1).max())
            input_ids = torch.cat([rollout.prompt_ids[rows, first:], rollout.completion_ids[rows, :length]], 1)
            attention_mask = torch.cat([prompt_mask[:, first:], completion_mask[:, :length]], 1)
            start = rollout.completion_start - first
            passes.append(policy.forward_logprobs_values(input_ids, attention_mask, start,
                                                         share_prompts=share_prompts, **forward_options))

    back = torch.argsort(order)  # sorted position of each row of the rollout

    def assemble(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.pad(part, (0, width - part.shape[1])) for part in parts])[back]

    values = [part.values for part in passes if part.values is not None]
    entropy = [part.entropy for part in passes if part.entropy is not None]
    return PolicyForward(
        logprobs=assemble([part.logprobs for part in passes]),
        values=assemble(values) if values else None,
        entropy=assemble(entropy) if entropy else None,
    )


@torch.no_grad()
def evaluate_rollout(
    policy: Policy, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None
) -> RolloutEvaluation:
    """Old log-probs, reference log-probs and values of a rollout, in no-grad passes over full sequences.

    Why not reuse ``rollout.sampled_logprobs``: the sampler computes them step by step with a KV cache, and
    (on GPU, in bf16) cached and full-sequence attention round differently. PPO's ratio
    pi_new / pi_old must be exactly 1 before the first gradient step, so pi_old comes from the same
    full-sequence forward the update uses. The reference and the values come from the same kind of pass.

    An agent whose first gradient step takes the whole batch in one forward pass does not need this: that
    forward *is* pi_old (same weights, same inputs), so it detaches its outputs and calls only
    :func:`rollout_reference_logprobs`, one pass fewer per update (TRL's GRPOTrainer skips the old-log-prob
    pass for the same reason when ``num_iterations == 1``).

    Args:
        policy: The policy (adapter enabled = current policy; disabled = reference).
        rollout: The batch.
        temperature: The sampling temperature (logits are divided by it).
        chunk_size: Rows per forward pass, to bound memory; ``None`` is the whole batch.

    Returns:
        A :class:`RolloutEvaluation`.
    """
    forward = forward_rollout(
        policy, rollout, max_rows_per_pass=chunk_size, temperature=temperature, with_entropy=False
    )
    mask = rollout.action_mask.to(forward.logprobs.dtype)
    return RolloutEvaluation(
        logprobs=forward.logprobs * mask,
        reference_logprobs=rollout_reference_logprobs(policy, rollout, temperature, chunk_size),
        values=forward.values * mask if forward.values is not None else None,
    )


@torch.no_grad()
def rollout_reference_logprobs(
    policy: Policy, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None
) -> torch.Tensor:
    """(B, T) log pi_ref of the model tokens (adapter disabled), 0 at environment tokens and padding.

    Args:
        policy: The policy; its reference is the same model with the LoRA adapter switched off.
        rollout: The batch.
        temperature: The sampling temperature (logits are divided by it).
        chunk_size: Rows per forward pass, to bound memory; ``None`` is the whole batch.
    """
    forward = forward_rollout(  # compared with no other reference pass: a group's prompt once when that pays
        policy, rollout, reference=True, max_rows_per_pass=chunk_size, temperature=temperature, share_prompts=None
    )
    return forward.logprobs * rollout.action_mask.to(forward.logprobs.dtype)


def collect_rollout(
    venv: Any,
    policy: Policy,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
) -> Rollout:
    """Reset the vector env, sample every row's whole completion with a KV-cached sampler, hand the
    completions to the env at once and read their scores.

    The env is not stepped token by token: the sampler stops each row where the env would end it (EOS, or
    the env's ``max_new_tokens``), and :meth:`~rlfb.envs.vector_env.TextGenerationVectorEnv.take_completions`
    then does what stepping each column in turn does, with one call of the reward functions for the batch.

    Args:
        venv: A ``rlfb/TextGeneration-v0`` vector env (``gymnasium.make_vec(...,
            vectorization_mode="vector_entry_point")``), on the policy's device.
        policy: Samples the tokens (adapter enabled).
        sampling: Temperature, top-k, top-p; the token budget is the env's ``max_new_tokens``.
        generator: Randomness of the sampler (on the policy's device).
        seed: Passed to ``venv.reset`` (seeds the prompt choice).
        options: Passed to ``venv.reset`` (e.g. ``{"split": "eval"}`` or pinned prompts).

    Returns:
        A single-turn :class:`Rollout` (every completion token is the model's; one turn). Scores are the
        env's ``score`` (NaN, where no reward applied, -> 0).
        ``per_token_rewards`` holds the dense rewards (per-token reward functions and the env's
        ``dense_reward``) at their tokens; None when there are none.
    """
    env = venv.unwrapped
    budget = dataclasses.replace(sampling, max_new_tokens=env.max_new_tokens)
    observation, _ = venv.reset(seed=seed, options=options)
    prompt_width = env.max_prompt_tokens
    prompt_ids = observation["input_ids"][:, :prompt_width]
    prompt_mask = observation["attention_mask"][:, :prompt_width]
    # Columns no row attends to (the prompt region is padded to a fixed width) cost compute in every
    # later forward pass; drop them.
    first_used = int(prompt_mask.bool().any(0).nonzero()[0])
    prompt_ids, prompt_mask = prompt_ids[:, first_used:], prompt_mask[:, first_used:]

    sampler = TokenSampler(
        policy.model, budget, generator, eos_token_id=env.eos_token_id, pad_token_id=env.pad_token_id
    )
    with policy.autocast():  # the scoring too, as when the env was stepped here (a reward model's numerics)
        sampler.start(prompt_ids, prompt_mask)
        generation = sampler.sample_to_end()
        ended = env.take_completions(generation.completion_ids)
    sampled_lengths = generation.completion_mask.sum(1).to(ended.taken.device)
    if ended.scores is None or len(ended.ended_rows) != env.num_envs or not torch.equal(ended.taken, sampled_lengths):
        raise RuntimeError(f"the env ended {len(ended.ended_rows)} of {env.num_envs} episodes, not where the sampler "
                           "ended them; its EOS token or max_new_tokens differ from the sampler's")
    episode_scores = ended.scores  # rows 0 .. N - 1 in order: every row ended

    device = policy.device
    completion_mask = generation.completion_mask.to(device)  # (B, T)
    scores = torch.as_tensor(np.nan_to_num(episode_scores.score, nan=0.0), dtype=torch.float32, device=device)
    components = {name: torch.as_tensor(values, dtype=torch.float32, device=device)
                  for name, values in episode_scores.components.items()}
    # One turn: the Rollout's defaults make action_mask the completion_mask itself (no copy) and end the
    # turn at the last token.
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=generation.completion_ids.to(device),
        completion_mask=completion_mask,
        sampled_logprobs=generation.logprobs.float().to(device),
        scores=scores,
        reward_components=components,
        per_token_rewards=_dense_rewards(ended.dense_rewards, episode_scores.token_rewards, completion_mask),
        prompts=list(episode_scores.prompts),
        completions=list(episode_scores.completions),
        group_size=int(getattr(env, "group_size", 1)),
    )


def _dense_rewards(env_rewards: torch.Tensor | None, token_rewards: list[np.ndarray] | None,
                   mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) dense rewards at their tokens, or None when there are none: the env's ``dense_reward`` of each
    token plus the reward functions' per-token rewards, each at the token that earned it (better credit for
    the value function than the episode's end)."""
    if token_rewards is None and (env_rewards is None or bool((env_rewards.abs() < 1e-6).all())):
        return None
    dense = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if env_rewards is not None:
        dense[:, : env_rewards.shape[1]] += env_rewards.to(mask.device)
    for row, values in enumerate(token_rewards or []):
        if values is not None and len(values):
            dense[row, : len(values)] += torch.as_tensor(np.asarray(values, dtype=np.float32), device=mask.device)
    return dense * mask
