"""Helpers of the wiring tests (tests/test_*_wiring.py and friends): tiny policies, hand-made rollouts,
a policy whose adapter has moved away from the reference, and short training runs on a tiny model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from test_trainer import tiny_config
from transformers import GPT2Config, GPT2LMHeadModel

from rlfb.agents import make_agent
from rlfb.agents.base import Agent
from rlfb.agents.rollout import Rollout
from rlfb.config import RunConfig
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig, generate

VOCAB_SIZE = 16
EOS = 0


def tiny_lm(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide random GPT-2 over 16 tokens whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE, n_positions=32,
                        initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


def tiny_policy(value_head: bool = True, moved: bool = False, seed: int = 0) -> Policy:
    """A :func:`tiny_lm` with a rank-4 LoRA adapter; ``moved`` gives the adapter random B matrices, so the
    policy differs from its reference (a fresh adapter is zero, the policy equal to the reference)."""
    policy = Policy(tiny_lm(seed), tokenizer=None, lora=LoraSettings(r=4, alpha=8), value_head=value_head,
                    device="cpu")
    if moved:
        move_adapter(policy.model)
    return policy


def move_adapter(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Give every LoRA B matrix of ``model`` seeded random values (the adapter stops being zero)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def hand_rollout(scores: list[float], lengths: list[int], width: int = 5, group_size: int = 1,
                 seed: int = 0) -> Rollout:
    """A rollout of completions of the given lengths (EOS last where shorter than ``width``) and scores.

    Prompts are one token; rows of one group share it. Tokens are drawn from 1..15 with a seeded generator.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = len(scores)
    completion_ids = torch.randint(1, VOCAB_SIZE, (batch, width), generator=generator)
    completion_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        completion_mask[row, :length] = 1
        if length < width:
            completion_ids[row, length - 1] = EOS
            completion_ids[row, length:] = EOS
    prompt_ids = (torch.arange(batch) // group_size + 1).unsqueeze(1)
    score_tensor = torch.tensor(scores, dtype=torch.float32)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
        completion_mask=completion_mask, sampled_logprobs=torch.zeros(batch, width), scores=score_tensor,
        reward_components={"score": score_tensor}, per_token_rewards=None,
        prompts=[str(int(p)) for p in prompt_ids[:, 0]], completions=[""] * batch, group_size=group_size)


def sampled_rollout(policy: Policy, scores_of: Any, batch_size: int = 8, max_new_tokens: int = 6,
                    seed: int = 0) -> Rollout:
    """Completions of prompt [1] sampled from ``policy``, scored by ``scores_of(completion_ids, mask)``."""
    prompt_ids = torch.ones(batch_size, 1, dtype=torch.long)
    generation = generate(policy.model, prompt_ids, torch.ones_like(prompt_ids),
                          SamplingConfig(max_new_tokens=max_new_tokens), eos_token_id=EOS, pad_token_id=EOS,
                          generator=torch.Generator().manual_seed(seed))
    scores = scores_of(generation.completion_ids, generation.completion_mask).float()
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=generation.completion_ids,
        completion_mask=generation.completion_mask, sampled_logprobs=generation.logprobs, scores=scores,
        reward_components={"score": scores}, per_token_rewards=None, prompts=["1"] * batch_size,
        completions=[""] * batch_size)


def agent_for(name: str, options: Mapping[str, Any], moved: bool = False) -> Agent:
    """A fresh agent on a fresh :func:`tiny_policy` (the same weights every call)."""
    return make_agent(name, tiny_policy(value_head=name == "ppo", moved=moved), dict(options))


def trainable_state(agent: Agent) -> torch.Tensor:
    """The agent's trainable parameters, flattened into one detached vector."""
    parameters = [p for p in agent.policy.model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    return torch.cat([p.detach().flatten().clone() for p in parameters])


def run_config(model_dir: Path, output_dir: Path, *overrides: str, agent: str = "ppo") -> RunConfig:
    """tests/test_trainer.py's tiny run (a vowel reward on the random tiny model), cut to 2 updates with no
    samples or checkpoints unless ``overrides`` ask for them."""
    return tiny_config(model_dir, output_dir, "budget.updates=2", "logging.samples_every=0", "checkpoint.every=0",
                       *overrides, agent=agent)


def eos_prone_copy(model_dir: Path, destination: Path, scale: float = 60.0) -> Path:
    """A copy of the saved model at ``model_dir`` whose EOS logit is scaled up (the output embedding is tied
    to the input one), so that some completions end with EOS and others run to the length cap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= scale
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return destination
