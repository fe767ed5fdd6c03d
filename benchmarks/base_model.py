"""Benchmark of the built-in base model ``rlfb-tiny``: build time, reproducibility, and sample quality.

Builds the model twice, each into a fresh temporary ``RLFB_HOME`` (so nothing comes from the cache), and
prints:

* the wall time of each build and the sha256 of each build's weights (equal hashes: reproducible);
* the parameter count;
* of 200 sampled continuations of held-out review openings, the share that use only corpus vocabulary
  *and* end a sentence ("." or "!"), and their mean VADER compound score (~0 for a balanced corpus);
* the greedy exact-match accuracy on the held-out sums (never in the pretraining corpus).

Targets (issue 2): build <= 180 s on 2 CPU cores, same hash twice, >= 80% vocabulary + sentence end,
arithmetic accuracy between 20% and 80%.

Usage:
    python benchmarks/base_model.py                  # two fresh builds, then the quality figures
    python benchmarks/base_model.py --builds 1 --set steps=1200 --set n_embd=96   # try a recipe variant
    python benchmarks/base_model.py --builds 1 --also-hash ~/.cache/rlfb/models/rlfb-tiny-...  # vs. the cache
    python benchmarks/base_model.py --builds 0 --model ~/.cache/rlfb/models/rlfb-tiny-...      # quality only

The build time is wall time, so it depends on what else runs on the machine: the load average before and
after each build is printed next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlfb.models import builtin, corpus

BUILD_SECONDS_TARGET = 180.0
VOCABULARY_TARGET = 0.80
ARITHMETIC_RANGE = (0.20, 0.80)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """Turns ``["steps=1200", "learning_rate=0.002"]`` into typed recipe overrides."""
    fields = {field.name: field.type for field in dataclasses.fields(builtin.TinyModelRecipe)}
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown recipe field {key!r}; fields: {', '.join(fields)}")
        overrides[key] = float(value) if fields[key] in ("float", float) else int(value)
    return overrides


def build_fresh(recipe: builtin.TinyModelRecipe) -> tuple[Path, float]:
    """Builds into a new temporary RLFB_HOME; returns (model dir, seconds)."""
    os.environ["RLFB_HOME"] = tempfile.mkdtemp(prefix="rlfb-bench-")
    started = time.perf_counter()
    path = builtin.ensure_built("rlfb-tiny", recipe)
    return path, time.perf_counter() - started


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, greedy: bool, max_new_tokens: int, seed: int = 0,
             batch_size: int = 100) -> list[str]:
    """Continues each prompt (left-padded batches); returns the decoded continuations."""
    torch.manual_seed(seed)
    continuations: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        output = model.generate(**batch, do_sample=not greedy, max_new_tokens=max_new_tokens,
                                top_p=1.0, temperature=1.0 if not greedy else None,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        continuations += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return continuations


def review_quality(model, tokenizer, n: int = 200) -> tuple[float, float, list[str]]:
    """(share using only corpus words and ending a sentence, mean VADER compound, the samples)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    openings = corpus.review_openings("eval", n, seed=0)
    continuations = generate(model, tokenizer, openings, greedy=False, max_new_tokens=40)
    vocabulary = corpus.corpus_vocabulary()
    good = [set(corpus.words(text)) <= vocabulary and text.rstrip().endswith((".", "!"))
            for text in continuations]
    analyzer = SentimentIntensityAnalyzer()
    compound = [analyzer.polarity_scores(text)["compound"] for text in continuations]
    samples = [f"{opening}|{text}" for opening, text in zip(openings, continuations, strict=True)]
    return sum(good) / n, statistics.mean(compound), samples


def arithmetic_accuracy(model, tokenizer) -> float:
    """Greedy exact match on the held-out sums."""
    problems = corpus.arithmetic_problems("eval")
    answers = generate(model, tokenizer, [prompt for prompt, _ in problems], greedy=True, max_new_tokens=6)
    return sum(answer.strip() == expected for answer, (_, expected) in zip(answers, problems, strict=True)) / len(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=int, default=2, help="fresh builds to time and hash (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the rlfb-tiny recipe (for trying variants)")
    parser.add_argument("--show", type=int, default=8, help="sampled continuations to print")
    parser.add_argument("--also-hash", action="append", default=[], type=Path, metavar="DIR",
                        help="an existing build of the same recipe whose weights hash joins the comparison")
    parser.add_argument("--model", type=Path, help="evaluate this model directory (default: the first build)")
    args = parser.parse_args()

    recipe = dataclasses.replace(builtin.BUILTIN_RECIPES["rlfb-tiny"], **parse_overrides(args.set))
    print(f"recipe: {recipe}")
    print(f"machine: {os.cpu_count()} CPUs visible, recipe uses {recipe.num_threads} threads")
    paths, seconds = [], []
    for index in range(args.builds):
        load_before = os.getloadavg()[0]
        path, elapsed = build_fresh(recipe)
        paths.append(path)
        seconds.append(elapsed)
        record = builtin.read_marker(path) or {}
        print(f"build {index + 1}: {elapsed:.1f} s (target <= {BUILD_SECONDS_TARGET:.0f} s; load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after), weights sha256 "
              f"{builtin.weights_sha256(path)}, final loss {record.get('final_loss', 0):.3f}", flush=True)
    for path in args.also_hash:
        print(f"existing build {path.name}: weights sha256 {builtin.weights_sha256(path)}")
    hashes = {builtin.weights_sha256(path) for path in paths + args.also_hash}
    if len(paths) + len(args.also_hash) > 1:
        print(f"reproducible: {len(hashes) == 1} ({len(paths) + len(args.also_hash)} builds, "
              f"{len(hashes)} distinct hash(es))")
    evaluated = args.model or (paths[0] if paths else None)
    if evaluated is None:
        return 0

    from rlfb.models.loading import load_model

    model, tokenizer = load_model(str(evaluated), device="cpu")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}, vocabulary: {len(tokenizer)}")
    with builtin._torch_threads(recipe.num_threads):
        vocabulary_rate, mean_compound, samples = review_quality(model, tokenizer)
        accuracy = arithmetic_accuracy(model, tokenizer)
    print(f"review continuations with corpus vocabulary and a sentence end: {vocabulary_rate:.1%} "
          f"(target >= {VOCABULARY_TARGET:.0%})")
    print(f"mean VADER compound of the continuations: {mean_compound:+.3f} (want ~0)")
    print(f"held-out sums, greedy exact match: {accuracy:.1%} "
          f"(target {ARITHMETIC_RANGE[0]:.0%}-{ARITHMETIC_RANGE[1]:.0%})")
    for sample in samples[: args.show]:
        print(f"  sample: {sample}")
    met = {
        "build time": bool(seconds) and max(seconds) <= BUILD_SECONDS_TARGET,
        "same hash": len(hashes) == 1 and len(paths) + len(args.also_hash) > 1,
        "vocabulary + sentence end": vocabulary_rate >= VOCABULARY_TARGET,
        "arithmetic in range": ARITHMETIC_RANGE[0] <= accuracy <= ARITHMETIC_RANGE[1],
    }
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
