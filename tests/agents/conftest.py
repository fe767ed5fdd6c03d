"""Tiny policies and synthetic rollouts for the agent tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlfb.agents.trajectory import Rollout, build_rollout
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig, generate

VOCAB_SIZE = 16
EOS = 0


def tiny_policy(seed: int = 0, value_head: bool = True, r: int = 8, dropout: float = 0.0) -> Policy:
    """A 2-layer, 32-wide random GPT-2 over 16 tokens with a LoRA adapter (``dropout``: its LoRA dropout)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE, n_positions=32, initializer_range=0.2,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    return Policy(GPT2LMHeadModel(config), tokenizer=None, lora=LoraSettings(r=r, dropout=dropout), value_head=value_head, device="cpu")


def make_rollout(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    scores: torch.Tensor,
    prompt_ids: torch.Tensor | None = None,
    prompts: list[str] | None = None,
    group_size: int = 1,
) -> Rollout:
    """A rollout from hand-written completions (prompt: a single token 1 unless given)."""
    batch = completion_ids.shape[0]
    if prompt_ids is None:
        prompt_ids = torch.ones(batch, 1, dtype=torch.long)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=torch.ones_like(prompt_ids),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampled_logprobs=torch.zeros(completion_ids.shape),
        scores=scores.float(),
        reward_components={"score": scores.float()},
        per_token_rewards=None,
        prompts=prompts or ["p"] * batch,
        completions=[" ".join(map(str, row.tolist())) for row in completion_ids],
        group_size=group_size,
    )


def sample_rollout(
    policy: Policy,
    reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    max_new_tokens: int = 4,
    group_size: int = 1,
) -> Rollout:
    """Sample completions of prompt [1] (or of k-groups of prompts 1, 2, ...) and score them."""
    if group_size > 1:
        prompt_ids = (torch.arange(batch_size) // group_size % (VOCAB_SIZE - 1) + 1).unsqueeze(1)
    else:
        prompt_ids = torch.ones(batch_size, 1, dtype=torch.long)
    generation = generate(
        policy.model, prompt_ids, torch.ones_like(prompt_ids), SamplingConfig(max_new_tokens=max_new_tokens),
        eos_token_id=EOS, pad_token_id=EOS, generator=generator,
    )  # fmt: skip
    rollout = make_rollout(
        generation.completion_ids,
        generation.completion_mask,
        reward(generation.completion_ids, generation.completion_mask),
        prompt_ids=prompt_ids,
        prompts=[str(int(p)) for p in prompt_ids[:, 0]],
        group_size=group_size,
    )
    return rollout._replace(sampled_logprobs=generation.logprobs)


def contains_token(token: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Reward 1 when the completion contains ``token``, else 0."""

    def reward(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        return ((completion_ids == token) & completion_mask.bool()).any(1).float()

    return reward


def multi_turn_rollout() -> Rollout:
    """Four hand-made episodes in two groups of two (prompts "a", "b"), with padding on both sides.

    Completion positions (M model, E environment, . padding):

        row 0: M M E E M M    turns end at 1 and 5; turn 1 reward 0.3
        row 1: M E E E M M    turns end at 0 and 5; turn 2 reward -0.2
        row 2: M M M M . .    one turn (a single-turn episode in the same batch); prompt left-padded
        row 3: M E M E E .    ends on an environment reply (its last token is EOS); turn 2 reward 0.1;
                              prompt left-padded
    """
    return build_rollout(
        prompt_ids=[[3, 4, 5], [3, 4, 5], [5, 6], [5, 6]],
        segments=[
            [([6, 7], True, 0.3), ([8, 9], False), ([10, EOS], True)],
            [([11], True), ([12, 13, 14], False), ([2, EOS], True, -0.2)],
            [([7, 8, 9, EOS], True)],
            [([1], True), ([2], False), ([3], True, 0.1), ([4, EOS], False)],
        ],
        scores=[1.0, -1.0, 0.5, -0.5],
        pad_token_id=EOS,
        prompts=["a", "a", "b", "b"],
        group_size=2,
    )
