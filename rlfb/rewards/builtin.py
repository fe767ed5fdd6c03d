"""Built-in text rewards: sentiment, answers of the arithmetic task, length, keywords, repetition, format.

Each is a class registered by name; a config builds it with its ``kwargs`` and calls the instance with
TRL's keyword arguments. Every one returns one float per completion.

Example:
    >>> from rlfb.rewards.builtin import KeywordReward, NumericMatchReward
    >>> KeywordReward(include=["great"], avoid=["boring"])([""] * 2, ["a great film", "great but boring"])
    [1.0, 0.0]
    >>> NumericMatchReward()(["2+2="] * 3, ["4", " 4 apples", "5"], answer=["4", "4", "4"])
    [1.0, 1.0, 0.0]
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from rlfb.rewards.registry import register

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"\w+(?:'\w+)?")
# Keyword arguments every reward gets that are not task columns (left out of "columns given" messages).
NOT_COLUMNS = frozenset({"prompts", "completions", "completion_ids", "prompt_ids", "log_metric", "log_extra",
                          "trainer_state"})


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment score of ``text``, in [-1, 1] (Hutto & Gilbert 2014)."""
    return float(_vader().polarity_scores(text)["compound"])


@register("sentiment")
class SentimentReward:
    """VADER compound sentiment of the completion, in [-1, 1] (positive = 1)."""

    def __init__(self, include_prompt: bool = False, target: Literal["positive", "negative"] = "positive") -> None:
        if target not in ("positive", "negative"):
            raise ValueError(f"sentiment target must be 'positive' or 'negative', got {target!r}")
        self.include_prompt = include_prompt
        self.sign = 1.0 if target == "positive" else -1.0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)] if self.include_prompt else completions
        return [self.sign * vader_compound(text) for text in texts]


def _answers(kwargs: dict[str, Any], column: str, reward: str) -> Sequence[Any]:
    if column not in kwargs:
        columns = sorted(key for key in kwargs if key not in NOT_COLUMNS)
        raise ValueError(f"{reward} needs the task column {column!r} (the arithmetic task has 'answer'); "
                       f"columns given: {columns}")
    return kwargs[column]


@register("exact_match")
class ExactMatchReward:
    """1.0 when the stripped completion equals the task's answer column, else 0.0."""

    def __init__(self, answer_column: str = "answer", case_sensitive: bool = True) -> None:
        self.answer_column = answer_column
        self.case_sensitive = case_sensitive

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        answers = _answers(kwargs, self.answer_column, "exact_match")
        normalize = (lambda text: text.strip()) if self.case_sensitive else (lambda text: text.strip().lower())
        return [float(normalize(c) == normalize(str(a))) for c, a in zip(completions, answers, strict=True)]


@register("numeric_match")
class NumericMatchReward:
    """1.0 when the first number in the completion equals the answer (optional partial credit by distance)."""

    def __init__(self, answer_column: str = "answer", tolerance: float = 1e-6, partial_credit: bool = False,
                 missing: float = 0.0) -> None:
        self.answer_column = answer_column
        self.tolerance = tolerance
        self.partial_credit = partial_credit
        self.missing = missing

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        answers = _answers(kwargs, self.answer_column, "numeric_match")
        return [self._score(completion, float(answer))
                for completion, answer in zip(completions, answers, strict=True)]

    def _score(self, completion: str, answer: float) -> float:
        match = _NUMBER.search(completion)
        if match is None:
            return self.missing
        distance = abs(float(match.group()) - answer)
        if distance <= self.tolerance:
            return 1.0
        # partial credit 1 / (1 + |error|): 0.5 for off by one, falling off smoothly.
        return 1.0 / (1.0 + distance) if self.partial_credit else 0.0


def _units(completion: str, ids: Sequence[int] | None, unit: str) -> int:
    if unit == "tokens":
        if ids is None:
            raise ValueError("length with unit='tokens' needs completion_ids")
        return len(ids)
    if unit == "words":
        return len(completion.split())
    return len(completion)


@register("length")
class LengthReward:
    """Minus the distance of the completion's length to a target, relative to it: -|n - target| / target."""

    def __init__(self, target: int = 16, unit: Literal["tokens", "words", "chars"] = "tokens") -> None:
        if unit not in ("tokens", "words", "chars"):
            raise ValueError(f"length unit must be tokens, words or chars, got {unit!r}")
        if target < 1:
            raise ValueError(f"length target must be at least 1, got {target}")
        self.target = target
        self.unit = unit

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        ids = completion_ids if completion_ids is not None else [None] * len(completions)
        return [-abs(_units(text, token_ids, self.unit) - self.target) / self.target
                for text, token_ids in zip(completions, ids, strict=True)]


@register("keyword")
class KeywordReward:
    """Fraction of `include` words present minus fraction of `avoid` words present (whole words)."""

    def __init__(self, include: Sequence[str] = (), avoid: Sequence[str] = (), case_sensitive: bool = False) -> None:
        if not include and not avoid:
            raise ValueError("keyword needs at least one word in 'include' or 'avoid'")
        flags = 0 if case_sensitive else re.IGNORECASE
        self.include = [re.compile(rf"\b{re.escape(word)}\b", flags) for word in include]
        self.avoid = [re.compile(rf"\b{re.escape(word)}\b", flags) for word in avoid]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        return [self._score(text) for text in completions]

    def _score(self, text: str) -> float:
        score = 0.0
        if self.include:
            score += sum(bool(pattern.search(text)) for pattern in self.include) / len(self.include)
        if self.avoid:
            score -= sum(bool(pattern.search(text)) for pattern in self.avoid) / len(self.avoid)
        return score


@register("repetition")
class RepetitionReward:
    """Distinct-n: unique n-grams / all n-grams of the completion, in [0, 1] (1 = no repetition)."""

    def __init__(self, n: int = 2, unit: Literal["words", "tokens"] = "words") -> None:
        if n < 1:
            raise ValueError(f"repetition n must be at least 1, got {n}")
        if unit not in ("words", "tokens"):
            raise ValueError(f"repetition unit must be words or tokens, got {unit!r}")
        self.n = n
        self.unit = unit

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        if self.unit == "tokens":
            if completion_ids is None:
                raise ValueError("repetition with unit='tokens' needs completion_ids")
            sequences: list[Sequence[Any]] = list(completion_ids)
        else:
            sequences = [_WORD.findall(text.lower()) for text in completions]
        return [self._distinct(items) for items in sequences]

    def _distinct(self, items: Sequence[Any]) -> float:
        ngrams = [tuple(items[i:i + self.n]) for i in range(len(items) - self.n + 1)]
        return len(set(ngrams)) / len(ngrams) if ngrams else 1.0


@register("regex")
class RegexReward:
    """`match` (1.0) when the completion matches a regular expression, else `miss` (0.0)."""

    def __init__(self, pattern: str, mode: Literal["search", "fullmatch"] = "search", match: float = 1.0,
                 miss: float = 0.0) -> None:
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"regex mode must be search or fullmatch, got {mode!r}")
        try:
            self.pattern = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"regex pattern {pattern!r} does not compile: {error}") from error
        self.mode = mode
        self.match, self.miss = float(match), float(miss)
        if not (math.isfinite(self.match) and math.isfinite(self.miss)):
            raise ValueError("regex match and miss values must be finite")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        test = self.pattern.search if self.mode == "search" else self.pattern.fullmatch
        return [self.match if test(text) else self.miss for text in completions]
