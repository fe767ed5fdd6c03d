"""Multi-turn collection speed: each conversation's KV cache kept across turns, against encoding the whole
conversation again at every turn.

``collect_episodes`` plays 32 ``rlfb/MultiTurn-v0`` conversations (8 groups of 4) with the built-in model
``rlfb-tiny`` on two protocols, each with its config's caps (configs/guess_number_grpo.yaml: 5 turns of 4
tokens; configs/calculator_grpo.yaml: the arithmetic task, 3 turns of 16 tokens), temperature 1:

* **cached** (the library): :class:`~rlfb.models.turn_sampler.TurnSampler` encodes the openings once and
  before each later turn only the turn's last token and the environment's reply;
* **re-prefill** (what collection did before): the same sampler made to encode every live conversation
  from its opening at every turn (its fallback for caches it cannot take apart, forced here by reporting
  the lean decoder's cache as not rebuildable). This is a slightly faster baseline than the old loop,
  which also split a turn's rows into one batch per distinct room left.

Both sides sample the same tokens for the same seed (a float-rounding tie aside; the script prints whether
every conversation came out the same). Each round runs both sides on seed = the round, in alternating order
(interleaved, so load on a shared machine hits both alike), after one warm-up round; the clock is this
process's CPU time with one torch thread. Printed: the median seconds per collection of each side, the
ratio of the medians, and the range of the per-round ratios.

Usage:
    python benchmarks/multi_turn.py                    # both protocols, 7 rounds
    python benchmarks/multi_turn.py --rounds 3 --protocols guess_number
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import torch

import rlfb  # noqa: F401  (registers the environments)
from rlfb.agents.multi_turn import collect_episodes
from rlfb.models import decoding
from rlfb.models.policy import Policy
from rlfb.models.sampler import SamplingConfig

NUM_ENVS, GROUP_SIZE = 32, 4
# Each protocol's env settings, from its config in configs/.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "guess_number": {"protocol": "guess_number", "max_turns": 5, "max_turn_tokens": 4},
    "calculator": {"protocol": "calculator", "task": "arithmetic", "max_turns": 3, "max_turn_tokens": 16},
}


@contextlib.contextmanager
def re_prefill() -> Iterator[None]:
    """Within this block every decoder reports its cache as not rebuildable: the turn sampler encodes each
    conversation again from its opening at every turn."""
    original = decoding.Decoder.can_rebuild
    decoding.Decoder.can_rebuild = property(lambda self: False)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        decoding.Decoder.can_rebuild = original  # type: ignore[method-assign]


def collect(venv: Any, policy: Policy, seed: int, cached: bool) -> tuple[float, list[list[int]], int]:
    """One collection: CPU seconds, every conversation's tokens, and the model tokens sampled."""
    context = contextlib.nullcontext() if cached else re_prefill()
    with context:
        start = time.process_time()
        batch = collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(seed),
                                 group_size=GROUP_SIZE, seed=seed)
        seconds = time.process_time() - start
    conversations = [list(conversation.tokens) for conversation in venv.unwrapped.conversations]
    return seconds, conversations, int(batch.rollout.action_mask.sum())


def race(name: str, policy: Policy, rounds: int) -> None:
    settings = PROTOCOLS[name]
    venv = gym.make_vec("rlfb/MultiTurn-v0", num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                        tokenizer=policy.tokenizer, model=None, max_context_tokens=decoding_window(policy),
                        **settings)
    collect(venv, policy, 0, True)  # warm-up
    collect(venv, policy, 0, False)
    times: dict[bool, list[float]] = {True: [], False: []}
    same, tokens, lengths = True, 0, 0
    for round_index in range(1, rounds + 1):
        results = {}
        for cached in ((True, False) if round_index % 2 else (False, True)):
            seconds, conversations, model_tokens = collect(venv, policy, round_index, cached)
            times[cached].append(seconds)
            results[cached] = conversations
            if cached:
                tokens += model_tokens
                lengths += sum(len(conversation) for conversation in conversations)
        same &= results[True] == results[False]
    cached_median, prefill_median = statistics.median(times[True]), statistics.median(times[False])
    ratios = [old / new for old, new in zip(times[False], times[True], strict=True)]
    print(f"{name}: {NUM_ENVS} episodes ({NUM_ENVS // GROUP_SIZE} groups of {GROUP_SIZE}), "
          f"{settings['max_turns']} turns of <= {settings['max_turn_tokens']} tokens; "
          f"per collection {tokens / rounds / NUM_ENVS:.1f} model tokens and {lengths / rounds / NUM_ENVS:.1f} "
          f"conversation tokens per episode")
    print(f"  cached {cached_median * 1000:.0f} ms, re-prefill {prefill_median * 1000:.0f} ms (medians of {rounds}): "
          f"{prefill_median / cached_median:.2f}x faster collection (per-round ratios "
          f"{min(ratios):.2f}-{max(ratios):.2f}); same tokens on both sides: {'yes' if same else 'NO'}")


def decoding_window(policy: Policy) -> int:
    from rlfb.agents.multi_turn import model_context_window

    window = model_context_window(policy.model)
    assert window is not None
    return window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = Policy.from_pretrained("rlfb-tiny", value_head=False, device="cpu")
    policy.model.eval()
    print(f"rlfb-tiny, CPU, 1 torch thread, load average {os.getloadavg()[0]:.2f} at the start")
    for name in args.protocols:
        race(name, policy, args.rounds)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
