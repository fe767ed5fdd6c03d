"""Rollouts: a batch of sampled completions with their rewards, and the policy's view of them.

:func:`collect_rollout` drives the token-per-step vector env with a KV-cached sampler and returns a
:class:`Rollout`. :func:`evaluate_rollout` then recomputes, in no-grad passes over the full sequences, the
log-probs and values the agents need (see its docstring for why the sampler's own log-probs are not used).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from rlfb.models.policy import Policy


class Rollout(NamedTuple):
    """A batch of B completions. Token tensors are on the policy's device.

    Attributes:
        prompt_ids: (B, P) prompt token ids, left-padded.
        prompt_mask: (B, P) 1 for real prompt tokens.
        completion_ids: (B, T) completion token ids, right-padded after EOS.
        completion_mask: (B, T) 1 for real completion tokens (EOS included).
        sampled_logprobs: (B, T) log-probs of the sampled tokens under the sampling distribution.
        scores: (B,) float32 total sequence reward (weighted sum of the reward components).
        reward_components: name -> (B,) float32 unweighted component, NaN where a reward returned None.
        per_token_rewards: (B, T) float32 weighted sum of dense (per-token) rewards, or None.
        prompts: Decoded prompts.
        completions: Decoded completions.
        group_size: k when consecutive groups of k rows share one prompt (group baselines), else 1.
    """

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
    group_size: int = 1

    @property
    def batch_size(self) -> int:
        return int(self.completion_ids.shape[0])

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
        )


class RolloutEvaluation(NamedTuple):
    """The policy's view of a rollout before the update; every tensor is (B, T), no grad.

    Attributes:
        logprobs: log pi_old(a_t | s_t) under the training forward pass (PPO's "old" log-probs).
        reference_logprobs: log pi_ref(a_t | s_t), the adapter disabled.
        values: V_old(s_t), or None without a value head.
    """

    logprobs: torch.Tensor
    reference_logprobs: torch.Tensor
    values: torch.Tensor | None


@torch.no_grad()
def evaluate_rollout(
    policy: Policy, rollout: Rollout, temperature: float = 1.0, chunk_size: int | None = None
) -> RolloutEvaluation:
    """Old log-probs, reference log-probs and values of a rollout, in no-grad passes over full sequences.

    Why not reuse ``rollout.sampled_logprobs``: the sampler computes them step by step with a KV cache, and
    (on GPU, in bf16) cached and full-sequence attention round differently. PPO's ratio
    pi_new / pi_old must be exactly 1 before the first gradient step, so pi_old comes from the same
    full-sequence forward the update uses. The reference and the values come from the same kind of pass.

    Args:
        policy: The policy (adapter enabled = current policy; disabled = reference).
        rollout: The batch.
        temperature: The sampling temperature (logits are divided by it).
        chunk_size: Rows per forward pass, to bound memory; ``None`` is the whole batch.

    Returns:
        A :class:`RolloutEvaluation`.
    """
    chunk_size = chunk_size or rollout.batch_size
    input_ids, attention_mask, start = rollout.input_ids, rollout.attention_mask, rollout.completion_start
    logprobs, reference, values = [], [], []
    for first in range(0, rollout.batch_size, chunk_size):
        rows = slice(first, first + chunk_size)
        forward = policy.forward_logprobs_values(
            input_ids[rows], attention_mask[rows], start, temperature=temperature, with_entropy=False
        )
        logprobs.append(forward.logprobs)
        values.append(forward.values)
        reference.append(
            policy.reference_logprobs(input_ids[rows], attention_mask[rows], start, temperature=temperature)
        )
    mask = rollout.completion_mask.to(logprobs[0].dtype)
    return RolloutEvaluation(
        logprobs=torch.cat(logprobs) * mask,
        reference_logprobs=torch.cat(reference) * mask,
        values=None if values[0] is None else torch.cat(values) * mask,
    )


def _as_float_tensor(values: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)
