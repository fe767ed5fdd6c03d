"""Collecting a single-turn rollout: whole completions handed to the env at once against stepping it per token.

    python benchmarks/collect.py                  # rlfb-tiny, 32 rows (4 per prompt), up to 20 tokens, VADER
    python benchmarks/collect.py --rows 64 --max-new-tokens 32 --repeats 9

Both sides draw the same prompts (the env reset with the same seed) and the same tokens (the sampler seeded
alike), so they do the same work and end with the same scores (checked). ``whole``:
:func:`rlfb.agents.rollout.collect_rollout`, what the agents run: the sampler samples every row to its end,
then ``take_completions`` hands the (N, T) completions to the env, which scores the batch in one call of the
reward functions. ``per token``: the lockstep loop of docs/envs.md that collect_rollout ran until session 12,
``venv.step`` once per token (observation copied every step, rows scored on the step they end, the scores
read back from the info arrays). Each time is the median of ``--repeats`` rounds, the sides taking turns,
of this process's CPU time with one torch thread (wall time on an idle core).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import rlfb  # noqa: F401  (registers the environments)
from rlfb.agents.rollout import collect_rollout
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig, TokenSampler
from rlfb.rewards import RewardSet


def per_token(venv: Any, policy: Policy, sampling: SamplingConfig, generator: torch.Generator, seed: int) -> list[float]:
    """The lockstep loop: reset, then sample and step one token per row until every row has ended."""
    env = venv.unwrapped
    observation, _ = venv.reset(seed=seed)
    width = env.max_prompt_tokens
    sampler = TokenSampler(policy.model, sampling, generator, eos_token_id=env.eos_token_id,
                           pad_token_id=env.pad_token_id)
    scores = np.zeros(env.num_envs)
    sampler.start(observation["input_ids"][:, :width], observation["attention_mask"][:, :width])
    while not env.all_finished:
        tokens, _ = sampler.sample()
        _, _, _, _, info = venv.step(tokens)
        if "_score" in info:
            scores[info["_score"]] = info["score"][info["_score"]]
        if not sampler.done:
            sampler.advance(tokens)
    return scores.astype(np.float32).tolist()  # the rollout's scores are float32


def whole(venv: Any, policy: Policy, sampling: SamplingConfig, generator: torch.Generator, seed: int) -> list[float]:
    return collect_rollout(venv, policy, sampling, generator, seed=seed).scores.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="rlfb-tiny")
    parser.add_argument("--rows", type=int, default=32, help="rows per rollout")
    parser.add_argument("--group-size", type=int, default=4, help="rows per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="rounds; the median is reported")
    parser.add_argument("--per-round", type=int, default=10, help="rollouts per side per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = Policy.from_pretrained(args.model, lora=LoraSettings(r=8, alpha=16), value_head=False, device="cpu")
    venv = gym.make_vec("rlfb/TextGeneration-v0", num_envs=args.rows, vectorization_mode="vector_entry_point",
                        task="sentiment", tokenizer=policy.tokenizer, model=None, rewards=RewardSet(["sentiment"]),
                        group_size=args.group_size, max_new_tokens=args.max_new_tokens, device="cpu")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    sides = {"per token": per_token, "whole": whole}
    milliseconds: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        scores = {}
        for name, collect in sides.items():
            started = time.process_time()
            for offset in range(args.per_round):
                seed = 1000 * round_index + offset
                scores[name, offset] = collect(venv, policy, sampling, torch.Generator().manual_seed(seed), seed)
            if round_index:
                milliseconds[name].append((time.process_time() - started) / args.per_round * 1e3)
        for offset in range(args.per_round):
            if scores["per token", offset] != scores["whole", offset]:
                raise SystemExit(f"the two sides scored rollout {offset} of round {round_index} differently")
    medians = {name: statistics.median(values) for name, values in milliseconds.items()}
    print(f"{args.model}, {args.rows} rows ({args.group_size} per prompt), <= {args.max_new_tokens} tokens, VADER; "
          f"median of {args.repeats} rounds of {args.per_round} rollouts, CPU ms per rollout, one thread")
    for name, value in medians.items():
        print(f"{name:>10}: {value:7.1f} ms   (rounds: {', '.join(f'{v:.1f}' for v in milliseconds[name])})")
    print(f"whole completions / per token: {medians['whole'] / medians['per token']:.2f}x the time; same scores")


if __name__ == "__main__":
    main()
