"""Prompt perturbations: character noise, distractor prefixes and case noise, for adversarial training and
for measuring robustness.

A policy trained on clean prompts may fall apart on a typo or an unrelated sentence in front of the prompt.
:func:`perturb_prompt` makes such prompts, deterministically from a generator; the ``perturbed`` task
(:mod:`rlfb.envs.tasks`) trains on them, and the bench's ``eval.robustness`` measures the gold reward on
perturbed held-out prompts against clean ones (the robustness gap).

Kinds:
    * ``typos``: each letter, with probability ``rate``, is swapped with the next one, dropped or doubled
      (one of the three, equally likely): keyboard-style character noise.
    * ``distractor``: a short sentence that says nothing about the task is put in front of the prompt.
    * ``case``: each letter's case is flipped with probability ``rate``.

Example:
    >>> import numpy as np
    >>> perturb_prompt("The acting was", ("typos",), 0.3, np.random.default_rng(0))
    'Teh cating was'
    >>> perturb_prompt("The acting was", ("distractor",), 0.3, np.random.default_rng(1)).endswith("The acting was")
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlfb.errors import ConfigError

__all__ = ["DISTRACTORS", "PERTURBATIONS", "check_perturbation", "perturb_prompt"]

PERTURBATIONS = ("typos", "distractor", "case")
# Neutral sentences of the built-in model's register (reviews and sums), none of them about the prompt.
DISTRACTORS = (
    "I watched it on a Tuesday.", "The cinema was half empty.", "My friend brought popcorn.",
    "It was raining outside.", "17+25=42.", "The ticket cost ten dollars.", "I saw it twice.",
    "The film is two hours long.", "We sat in the back row.", "3+4=7.",
)


def check_perturbation(kinds: Sequence[str], rate: float) -> None:
    """Raise ConfigError for an unknown kind, no kinds, or a rate outside [0, 1]."""
    if not kinds:
        raise ConfigError(f"perturbation kinds must not be empty; choose from {', '.join(PERTURBATIONS)}")
    unknown = [kind for kind in kinds if kind not in PERTURBATIONS]
    if unknown:
        raise ConfigError(f"unknown perturbation {unknown[0]!r}; known: {', '.join(PERTURBATIONS)}")
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"perturbation rate must be in [0, 1], got {rate}")


def perturb_prompt(prompt: str, kinds: Sequence[str], rate: float, rng: np.random.Generator) -> str:
    """``prompt`` with each perturbation of ``kinds`` applied in order, drawing from ``rng``."""
    for kind in kinds:
        if kind == "typos":
            prompt = _typos(prompt, rate, rng)
        elif kind == "distractor":
            prompt = f"{DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]} {prompt}"
        elif kind == "case":
            flips = rng.random(len(prompt)) < rate
            prompt = "".join(char.swapcase() if flip and char.isalpha() else char
                             for char, flip in zip(prompt, flips, strict=True))
        else:
            raise ConfigError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    return prompt


def _typos(text: str, rate: float, rng: np.random.Generator) -> str:
    chars = list(text)
    out: list[str] = []
    index = 0
    while index < len(chars):
        char = chars[index]
        if char.isalpha() and rng.random() < rate:
            action = int(rng.integers(3))
            if action == 0 and index + 1 < len(chars) and chars[index + 1].isalpha():  # swap with the next letter
                out += [chars[index + 1], char]
                index += 2
                continue
            if action == 1:  # drop
                index += 1
                continue
            out += [char, char]  # double (also a swap that had no letter to swap with)
            index += 1
            continue
        out.append(char)
        index += 1
    return "".join(out)
