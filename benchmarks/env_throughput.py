"""Throughput and memory of the token-per-step vector environment with rlfb's sampler.

Prints the three targets of the environment issue, each a ratio measured in this one run:

1. 64 episodes of up to 32 new tokens (sentiment prompts) through ``rlfb/TextGeneration-v0`` (vector env +
   :class:`TokenSampler`) against ``model.generate`` on the same prompts and sampling settings
   (temperature 1, no top-k / top-p, max_new_tokens 32, stop at EOS): speed-up >= 1.2x.
   Both sides stop each row at its EOS; ``generate`` keeps computing finished rows until the longest one
   ends, rlfb's sampler drops them from the batch. The mean completion length of each side is printed
   to show the two do the same work. A second line repeats the race with EOS disabled (every row runs
   exactly 32 tokens), which isolates the per-step overhead.
2. The rollout with ``max_new_tokens`` 64 instead of 32, EOS disabled so that every row really runs that
   long: time ratio <= 2.3x (a KV cache keeps the cost per token nearly flat; recomputing the whole
   sequence each step would cost ~4x).
3. 1,000 resets of the 64-row vector env: resident memory and Python heap stay flat.

"EOS disabled" swaps the episodes' end-of-text token for a new special token the model has no logit for.
Each time is the median of ``--repeats`` interleaved runs (seeds 1, 2, ...; both sides draw the same
prompts) after one warm-up run. On CPU the clock is this process's CPU time with ``--threads`` torch
threads (default 1): on a machine shared with other jobs, wall time measures the neighbours; with one
thread, CPU time equals wall time on an idle machine. On CUDA the clock is wall time.

Usage:
    python benchmarks/env_throughput.py                 # the built-in model rlfb-tiny (built on first use)
    python benchmarks/env_throughput.py --model gpt2 --device cuda
    python benchmarks/env_throughput.py --random-model  # random weights of rlfb-tiny's shape, no build needed
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch

import rlfb  # noqa: F401  (registers the environments)
from rlfb.models.sampler import SamplingConfig, TokenSampler

NUM_ENVS = 64
PROMPT_TOKENS = 16  # the sentiment openings are 3-8 tokens; 16 leaves room without wasting the context
NEVER_TOKEN = "<|rlfb-benchmark-never|>"  # stands in for EOS so that every row runs to max_new_tokens
SPEEDUP_TARGET, SCALING_TARGET = 1.2, 2.3


def token_count(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                **kwargs: Any) -> list[float]:
    """A reward that costs nothing, so the rollout time is the environment's and the sampler's."""
    return [float(len(ids)) for ids in completion_ids]


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from rlfb.models.loading import load_model, resolve_device

    device = resolve_device(args.device)
    if not args.random_model:
        model, tokenizer = load_model(args.model, device=device)
        return model.eval(), tokenizer, args.model
    from transformers import GPT2Config

    from rlfb.models.builtin import BUILTIN_RECIPES, train_tokenizer
    from rlfb.models.corpus import pretraining_corpus

    recipe = BUILTIN_RECIPES["rlfb-tiny"]
    tokenizer = train_tokenizer(list(pretraining_corpus(5000, seed=0)), vocab_size=recipe.vocab_size)
    tokenizer.padding_side = "left"
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=PROMPT_TOKENS + 64, n_embd=recipe.n_embd,
                        n_layer=recipe.n_layer, n_head=recipe.n_head, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    return random_model(config, device), tokenizer, "random GPT-2 of rlfb-tiny's shape"


def random_model(config: Any, device: torch.device) -> Any:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device).eval()


def long_enough(model: Any, new_tokens: int) -> tuple[Any, str]:
    """The model itself when its context fits a prompt plus ``new_tokens``; else a random model of the same
    shape (the same compute per token) with a longer context, so the scaling of the cache can be measured."""
    config = model.config
    if config.n_positions >= PROMPT_TOKENS + new_tokens:
        return model, ""
    longer = config.__class__.from_dict({**config.to_dict(), "n_positions": PROMPT_TOKENS + new_tokens})
    note = (f"\n   [the model's context is {config.n_positions} positions, too short for {new_tokens} new tokens: "
            f"measured on a random model of the same shape with {longer.n_positions} positions]")
    return random_model(longer, next(model.parameters()).device), note


def make_venv(tokenizer: Any, device: torch.device, max_new_tokens: int) -> Any:
    return gym.make_vec("rlfb/TextGeneration-v0", num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                        task="sentiment", model=None, tokenizer=tokenizer, rewards=[token_count],
                        max_new_tokens=max_new_tokens, max_prompt_tokens=PROMPT_TOKENS, device=device)


def env_rollout(venv: Any, model: Any, sampling: SamplingConfig, seed: int) -> int:
    """Reset every row, sample and step until every row has finished; returns the tokens generated."""
    obs, _ = venv.reset(seed=seed)
    sampler = TokenSampler(model, sampling, torch.Generator(device=venv.device).manual_seed(seed),
                           eos_token_id=venv.eos_token_id, pad_token_id=venv.pad_token_id)
    sampler.start(obs["input_ids"], obs["attention_mask"])
    while not venv.all_finished:
        tokens, _ = sampler.sample()
        obs, *_ = venv.step(tokens)
        if not venv.all_finished:
            sampler.advance(tokens)
    return int(obs["attention_mask"][:, PROMPT_TOKENS:].sum())


def hf_generate(venv: Any, model: Any, sampling: SamplingConfig, seed: int) -> int:
    """``model.generate`` on the prompts the environment draws for the same seed; returns the tokens generated."""
    obs, _ = venv.reset(seed=seed)
    input_ids = obs["input_ids"][:, :PROMPT_TOKENS]
    attention_mask = obs["attention_mask"][:, :PROMPT_TOKENS]
    first = int(attention_mask.any(dim=0).nonzero()[0])  # same trimming of all-padding columns as the sampler
    torch.manual_seed(seed)
    output = model.generate(input_ids=input_ids[:, first:], attention_mask=attention_mask[:, first:],
                            do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                            eos_token_id=venv.eos_token_id, pad_token_id=venv.pad_token_id)
    completions = output[:, PROMPT_TOKENS - first:]
    is_eos = completions == venv.eos_token_id
    # tokens up to and including each row's first EOS (all of them when there is none)
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.shape[1])
    return int(lengths.sum())


def race(runs: dict[str, Callable[[int], int]], repeats: int,
         device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Median time and mean tokens per row of each run; interleaved so that load hits all alike."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            generated = run(repeat)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat > 0:  # the first round warms up
                times[name].append(clock() - start)
                tokens[name].append(generated)
    return ({name: statistics.median(values) for name, values in times.items()},
            {name: statistics.mean(values) / NUM_ENVS for name, values in tokens.items()})


def resident_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rlfb-tiny", help="model name or path (default: rlfb-tiny)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--resets", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see the docstring)")
    parser.add_argument("--random-model", action="store_true",
                        help="time a randomly initialized GPT-2 of rlfb-tiny's shape instead (no build needed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, label = load(args)
    device = next(model.parameters()).device
    parameters = sum(parameter.numel() for parameter in model.parameters())
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"model: {label} ({parameters / 1e6:.2f}M parameters) on {device}, torch threads "
          f"{torch.get_num_threads()}, clock: {clock}, median of {args.repeats} runs")
    forced_tokenizer = copy.deepcopy(tokenizer)
    forced_tokenizer.add_special_tokens({"eos_token": NEVER_TOKEN})  # no logit in the model: never sampled
    # The 64-token runs use `scaling_model`, which has room for them even when the loaded model does not.
    forced_tokenizer.model_max_length = max(forced_tokenizer.model_max_length, PROMPT_TOKENS + 64)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32)
    long_sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64)
    venv = make_venv(tokenizer, device, 32)
    forced_32, forced_64 = make_venv(forced_tokenizer, device, 32), make_venv(forced_tokenizer, device, 64)
    scaling_model, note = long_enough(model, 64)

    times, lengths = race({
        "env": lambda seed: env_rollout(venv, model, sampling, seed),
        "generate": lambda seed: hf_generate(venv, model, sampling, seed),
        "env_forced": lambda seed: env_rollout(forced_32, model, sampling, seed),
        "generate_forced": lambda seed: hf_generate(forced_32, model, sampling, seed),
        "scaling_32": lambda seed: env_rollout(forced_32, scaling_model, sampling, seed),
        "scaling_64": lambda seed: env_rollout(forced_64, scaling_model, long_sampling, seed),
    }, args.repeats, device)
    speedup = times["generate"] / times["env"]
    forced_speedup = times["generate_forced"] / times["env_forced"]
    scaling = times["scaling_64"] / times["scaling_32"]
    print(f"1. {NUM_ENVS} episodes x up to 32 tokens, stop at EOS: vector env + rlfb sampler {times['env']:.3f} s "
          f"(mean {lengths['env']:.1f} tokens/row), model.generate {times['generate']:.3f} s "
          f"(mean {lengths['generate']:.1f} tokens/row) -> speed-up {speedup:.2f}x (target >= {SPEEDUP_TARGET}x) "
          f"{'PASS' if speedup >= SPEEDUP_TARGET else 'MISS'}")
    print(f"   EOS disabled, every row 32 tokens: {times['env_forced']:.3f} s vs {times['generate_forced']:.3f} s "
          f"-> {forced_speedup:.2f}x (per-step overhead alone)")
    print(f"2. max_new_tokens 64 vs 32 (EOS disabled): {times['scaling_64']:.3f} s / {times['scaling_32']:.3f} s = "
          f"{scaling:.2f}x (target <= {SCALING_TARGET}x) {'PASS' if scaling <= SCALING_TARGET else 'MISS'}{note}")

    for _ in range(100):
        venv.reset()
    gc.collect()
    tracemalloc.start()
    resident_before, heap_before = resident_mib(), tracemalloc.get_traced_memory()[0]
    for _ in range(args.resets):
        venv.reset()
    gc.collect()
    resident_after, heap_after = resident_mib(), tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ratio = resident_after / resident_before
    heap_growth_kib = (heap_after - heap_before) / 1024
    flat = ratio <= 1.01 and heap_growth_kib < 256
    print(f"3. {args.resets} resets of {NUM_ENVS} rows: resident memory {resident_before:.1f} -> "
          f"{resident_after:.1f} MiB ({ratio:.3f}x), Python heap {heap_growth_kib:+.1f} KiB "
          f"(target: flat, <= 1.01x and < 256 KiB) {'PASS' if flat else 'MISS'}")


if __name__ == "__main__":
    main()
