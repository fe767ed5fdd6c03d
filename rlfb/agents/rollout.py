"""Rollouts: a batch of episodes with their rewards, and the policy's view of them.

An episode is one token sequence: the prompt, then model turns and, between them, environment replies (a
tool's output, a game's next observation, a user's answer). :class:`Rollout` holds a batch of them with an
action mask (which tokens the model produced), the end of each turn and each turn's reward; a single-turn
episode (one prompt, one completion) is the one-turn case of the same structure. Agents compute log-probs,
KL, values and losses over model tokens only (docs/algorithms.md, "Multi-turn episodes").

:func:`collect_rollout` drives the token-per-step vector env with a KV-cached sampler and returns a
single-turn :class:`Rollout`; :func:`build_rollout` assembles one from per-row segments (a multi-turn
collector's output, or a test's). :func:`evaluate_rollout` then recomputes, in no-grad passes over the full
sequences, the log-probs and values the agents need (see its docstring for why the sampler's own log-probs
are not used); :func:`rollout_reference_logprobs` computes the reference's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rlfb.models.policy import Policy, PolicyForward
from rlfb.models.sampler import SamplingConfig, TokenSampler


class _RolloutFields(NamedTuple):
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    scores: torch.Tensor
    reward_components: dict[str, torch.Tensor]
    per_token_rewards: torch.Tensor | None
    prompts: list[str]
    completions: list[str]
    group_size: int
    action_mask: torch.Tensor
    turn_ends: torch.Tensor
    turn_rewards: torch.Tensor


class Rollout(_RolloutFields):
    """A batch of B episodes. Token tensors are on the policy's device.

    Each row is ``prompt | completion``; the completion is the episode after the prompt, model turns and
    environment replies in the order they happened, right-padded::

        completion:       [ turn 1 (model) | reply 1 (env) | turn 2 (model) | pad ]
        completion_mask:  [ 1 1 1          | 1 1           | 1 1            | 0   ]
        action_mask:      [ 1 1 1          | 0 0           | 1 1            | 0   ]
        turn_ends:        [ 2, 6 ]      (completion index of each turn's last model token)

    Model tokens are the actions; environment tokens are part of the state the next action sees. Rewards
    sit at model tokens: turn k's reward at ``turn_ends[:, k]``, the final score at the episode's last
    model token. A single-turn rollout is the one-turn case: ``action_mask`` is ``completion_mask``, one
    turn ends at the last real token, its turn reward is 0 (what the constructor fills in when
    ``action_mask``, ``turn_ends`` and ``turn_rewards`` are left out).

    Attributes:
        prompt_ids: (B, P) prompt token ids, left-padded.
        prompt_mask: (B, P) 1 for real prompt tokens.
        completion_ids: (B, T) the episode after the prompt (model and environment tokens), right-padded.
        completion_mask: (B, T) 1 for real tokens after the prompt, model's and environment's (EOS
            included); real tokens come first, padding only at the end.
        sampled_logprobs: (B, T) log-probs of the sampled tokens under the sampling distribution (0 at
            environment tokens, which were not sampled).
        scores: (B,) float32 final episode reward (weighted sum of the reward components), at the last model
            token; 0 where no reward scored the row (see :attr:`scored`).
        reward_components: name -> (B,) float32 unweighted component, NaN where a reward returned None.
        per_token_rewards: (B, T) float32 weighted sum of dense (per-token) rewards, or None. Only model
            tokens are actions: a value at an environment token is ignored.
        prompts: Decoded prompts.
        completions: Decoded completions (whole episodes after the prompt).
        group_size: k when consecutive groups of k rows share one prompt (group baselines), else 1.
        action_mask: (B, T) 1 for tokens the model produced: the only tokens that carry log-probs, KL,
            values and losses. A subset of ``completion_mask``.
        turn_ends: (B, K) int64 completion index of the last model token of each of the row's turns, in
            order; -1 past the row's last turn (K is the batch's largest number of turns).
        turn_rewards: (B, K) float32 reward of each turn, paid at its ``turn_ends`` token (0 past the row's
            last turn). The final ``scores`` come on top of the last turn's.

    Build a rollout with all its fields (``_replace`` does not recompute the defaults: replacing
    ``completion_mask`` of a rollout leaves its ``action_mask`` as it was).
    """

    __slots__ = ()

    def __new__(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        sampled_logprobs: torch.Tensor,
        scores: torch.Tensor,
        reward_components: dict[str, torch.Tensor],
        per_token_rewards: torch.Tensor | None,
        prompts: list[str],
        completions: list[str],
        group_size: int = 1,
        action_mask: torch.Tensor | None = None,
        turn_ends: torch.Tensor | None = None,
        turn_rewards: torch.Tensor | None = None,
    ) -> Rollout:
        # The one-turn defaults: a few tensor operations, no host synchronisation (the collector's hot path).
        if action_mask is None:
            action_mask = completion_mask
        if turn_ends is None:
            turn_ends = last_action_index(action_mask).unsqueeze(1)  # (B, 1)
        if turn_rewards is None:
            turn_rewards = torch.zeros(turn_ends.shape, dtype=torch.float32, device=turn_ends.device)
        return super().__new__(
            cls, prompt_ids, prompt_mask, completion_ids, completion_mask, sampled_logprobs, scores,
            reward_components, per_token_rewards, prompts, completions, group_size, action_mask, turn_ends,
            turn_rewards,
        )  # fmt: skip

    @property
    def batch_size(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def scored(self) -> torch.Tensor:
        """(B,) bool: some reward scored the row (at least one component is not NaN).

        A row no reward scored carries a score of 0 to the agents, as TRL's ``nansum`` gives it, but it is
        no evidence about the policy: metrics leave it out.
        """
        scored = torch.zeros(self.batch_size, dtype=torch.bool, device=self.scores.device)
        for values in self.reward_components.values():
            scored |= ~torch.isnan(values)
        return scored

    @property
    def num_turns(self) -> torch.Tensor:
        """(B,) int64 number of model turns of each episode."""
        return (self.turn_ends >= 0).sum(1)

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) prompt followed by completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) 1 for real tokens of prompt and completion."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_start(self) -> int:
        """Index of the first completion token in :attr:`input_ids` (the padded prompt length P)."""
        return int(self.prompt_ids.shape[1])

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a 1-D index tensor), e.g. a minibatch."""
        index = rows.tolist()
        return self._replace(
            prompt_ids=self.prompt_ids[rows],
            prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            sampled_logprobs=self.sampled_logprobs[rows],
            scores=self.scores[rows],
            reward_components={name: values[rows] for name, values in self.reward_components.items()},
            per_token_rewards=None if self.per_token_rewards is None else self.per_token_rewards[rows],
            prompts=[self.prompts[i] for i in index],
            completions=[self.completions[i] for i in index],
            group_size=1,
            action_mask=self.action_mask[rows],
            turn_ends=self.turn_ends[rows],
            turn_rewards=self.turn_rewards[rows],
        )


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 completion index of each row's last model token (0 for a row without one).

    Example:
        >>> last_action_index(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])).tolist()
        [1, 2]
    """
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    return (positions * action_mask.bool()).amax(1)


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
            passes.append(policy.forward_logprobs_values(input_ids, attention_mask, start, **forward_options))

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
    forward = forward_rollout(
        policy, rollout, reference=True, max_rows_per_pass=chunk_size, temperature=temperature
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
    """Reset the vector env and step it token by token with a KV-cached sampler until every row ends.

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
    ended_info: dict[str, np.ndarray] = {}
    tokens_per_step, logprobs_per_step, active_per_step, rewards_per_step = [], [], [], []
    with policy.autocast():
        sampler.start(prompt_ids, prompt_mask)
        while not env.all_finished:
            active_per_step.append(~env.finished)
            tokens, logprobs = sampler.sample()
            _, rewards, _, _, info = venv.step(tokens)
            tokens_per_step.append(tokens)
            logprobs_per_step.append(logprobs)
            rewards_per_step.append(torch.as_tensor(rewards, dtype=torch.float32))
            _merge_ended(ended_info, info)
            if not sampler.done:
                sampler.advance(tokens)

    device = policy.device
    completion_mask = torch.stack(active_per_step, 1).long().to(device)  # (B, T)
    scores = torch.as_tensor(np.nan_to_num(ended_info["score"], nan=0.0), dtype=torch.float32, device=device)
    components = {
        key.removeprefix("reward/"): torch.as_tensor(values, dtype=torch.float32, device=device)
        for key, values in ended_info.items()
        if key.startswith("reward/")
    }
    # One turn: the Rollout's defaults make action_mask the completion_mask itself (no copy) and end the
    # turn at the last token.
    return Rollout(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=torch.stack(tokens_per_step, 1).to(device),
        completion_mask=completion_mask,
        sampled_logprobs=torch.stack(logprobs_per_step, 1).float().to(device),
        scores=scores,
        reward_components=components,
        per_token_rewards=_dense_rewards(
            torch.stack(rewards_per_step, 1).to(device), completion_mask, scores, ended_info.get("token_rewards")
        ),
        prompts=[str(text) for text in ended_info["prompt"]],
        completions=[str(text) for text in ended_info["completion"]],
        group_size=int(getattr(env, "group_size", 1)),
    )


def _merge_ended(collected: dict[str, np.ndarray], info: Mapping[str, Any]) -> None:
    """Copy the entries of rows that ended on this step (``_key`` masks) into ``collected``."""
    for key, values in info.items():
        if key.startswith("_") or f"_{key}" not in info:
            continue
        ended = np.asarray(info[f"_{key}"], dtype=bool)
        if key not in collected:
            collected[key] = np.array(values, copy=True)
        else:
            collected[key][ended] = np.asarray(values)[ended]


def _dense_rewards(
    step_rewards: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, token_rewards: np.ndarray | None
) -> torch.Tensor | None:
    """(B, T) dense rewards at their tokens, or None.

    The env pays each step its ``dense_reward`` and, on the last step, the score plus the sum of the reward
    functions' per-token rewards. Here the score goes back out (the agents add it themselves) and the
    per-token rewards go to the tokens that earned them, which gives the value function better credit.
    """
    last = (mask.sum(1) - 1).clamp(min=0)  # (B,)
    dense = step_rewards * mask
    paid_at_end = scores.clone()
    placed = torch.zeros_like(dense)
    if token_rewards is not None:
        for row, values in enumerate(token_rewards):
            if values is None or len(values) == 0:
                continue
            values_tensor = torch.as_tensor(np.asarray(values, dtype=np.float32), device=dense.device)
            placed[row, : len(values_tensor)] = values_tensor
            paid_at_end[row] += values_tensor.sum()
    dense = dense.scatter_add(1, last.unsqueeze(1), -paid_at_end.unsqueeze(1)) + placed
    if token_rewards is None and bool((dense.abs() < 1e-6).all()):
        return None
    return dense * mask
