"""Feedback data: the JSONL formats, a gold reward per built-in task, and synthetic feedback from that gold.

Four kinds of feedback, one JSON object per line:

* ``pairwise``: ``{"prompt": str, "chosen": str, "rejected": str}``: the chosen completion is preferred.
* ``pointwise``: ``{"prompt": str, "completion": str, "label": 0 | 1}``: a binary judgement (1 = good).
* ``rating``: ``{"prompt": str, "completion": str, "rating": float}``: a scalar score.
* ``token``: ``{"prompt": str, "completion": str, "segments": [[text, label], ...]}``: the segments' texts
  concatenate to the completion; each label is 0, 1, or null (unlabelled).

The gold rewards: VADER's compound score of the completion for ``sentiment``; correctness of the sum for
``arithmetic`` (``"17+25="`` -> ``"42"``), with partial credit 1 / (1 + |error|) for ratings. A synthetic
data set flips a chosen share of the gold labels (``noise``): a pair is swapped, a binary label or a token
label flipped, a rating replaced by a uniform draw from the gold's range.

Example:
    >>> rows = synthesize("sentiment", "pairwise", size=3, noise=0.0, seed=0)
    >>> all(gold_score("sentiment", r["prompt"], r["chosen"]) > gold_score("sentiment", r["prompt"], r["rejected"])
    ...     for r in rows)
    True
    >>> gold_score("arithmetic", "17+25=", "42"), gold_score("arithmetic", "17+25=", "43")
    (1.0, 0.0)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from rlfb.errors import DatasetError
from rlfb.models import corpus
from rlfb.rewards.builtin import vader_compound

Task = Literal["sentiment", "arithmetic"]
Kind = Literal["pairwise", "pointwise", "rating", "token"]
TASKS: tuple[str, ...] = ("sentiment", "arithmetic")
KINDS: tuple[str, ...] = ("pairwise", "pointwise", "rating", "token")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "pointwise": ("prompt", "completion", "label"),
    "rating": ("prompt", "completion", "rating"),
    "token": ("prompt", "completion", "segments"),
}
MIN_PAIR_MARGIN = 0.05  # sentiment pairs closer than this in VADER score are redrawn: no clear preference
_SUM = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)\s*=\s*$")
_NUMBER = re.compile(r"-?\d+")
_WORD_SEGMENT = re.compile(r"\s*[A-Za-z']+|\s*[^A-Za-z'\s]+|\s+")


# ------------------------------------------------------------------------------------------------ gold
def _sum_answer(prompt: str) -> int:
    match = _SUM.search(prompt)
    if match is None:
        raise DatasetError(f"arithmetic prompt {prompt!r} does not end with 'a+b='")
    return int(match.group(1)) + int(match.group(2))


def gold_score(task: str, prompt: str, completion: str, *, partial_credit: bool = False) -> float:
    """The gold reward: VADER compound (sentiment) or correctness of the sum (arithmetic)."""
    if task == "sentiment":
        return vader_compound(completion)
    if task == "arithmetic":
        match = _NUMBER.search(completion)
        if match is None:
            return 0.0
        error = abs(int(match.group()) - _sum_answer(prompt))
        return 1.0 / (1.0 + error) if partial_credit else float(error == 0)
    raise DatasetError(f"unknown task {task!r} for gold feedback; expected one of {list(TASKS)}")


def gold_label(task: str, prompt: str, completion: str) -> int:
    """The gold binary judgement: positive sentiment (compound > 0), or a correct sum."""
    return int(gold_score(task, prompt, completion) > 0)


def gold_rating(task: str, prompt: str, completion: str) -> float:
    """The gold rating: VADER compound in [-1, 1], or partial credit in (0, 1] for sums."""
    return gold_score(task, prompt, completion, partial_credit=True)


def gold_segments(task: str, prompt: str, completion: str) -> list[list[Any]]:
    """The gold token-level labels as segments of the completion.

    Sentiment: each word is labelled 1 if VADER's lexicon rates it positive, 0 if negative, null otherwise.
    Arithmetic: each character of the answer is labelled 1 if it is the right digit in its place.
    """
    if task == "sentiment":
        lexicon = _vader_lexicon()
        segments = []
        for piece in _WORD_SEGMENT.findall(completion):
            valence = lexicon.get(piece.strip().lower())
            segments.append([piece, None if valence is None else int(valence > 0)])
        return segments
    if task == "arithmetic":
        answer = str(_sum_answer(prompt))
        stripped = completion.lstrip()
        lead = completion[:len(completion) - len(stripped)]
        segments = [[lead, None]] if lead else []
        for position, character in enumerate(stripped):
            correct = position < len(answer) and character == answer[position]
            segments.append([character, int(correct)])
        return segments
    raise DatasetError(f"unknown task {task!r} for gold feedback; expected one of {list(TASKS)}")


def _vader_lexicon() -> dict[str, float]:
    from rlfb.rewards.builtin import _vader

    return _vader().lexicon


# ------------------------------------------------------------------------------------------ completions
def _sentiment_clause(rng: random.Random, sentiment: corpus.Sentiment, after_subject_i: bool) -> str:
    if after_subject_i:
        return f"{rng.choice(corpus.VERBS[sentiment])} the {rng.choice(corpus.ASPECTS)}"
    adjective = rng.choice(corpus.ADJECTIVES[sentiment])
    return f"{rng.choice(corpus.ADVERBS)} {adjective}" if rng.random() < 0.5 else adjective


def sentiment_completion(rng: random.Random, prompt: str) -> str:
    """A continuation of a review opening in the built-in grammar's words, with mixed sentiment.

    The first clause and an optional second one draw their sentiment independently, so VADER scores
    spread over [-1, 1] instead of clustering at three values.
    """
    first = rng.choice(corpus.SENTIMENTS)
    text = " " + _sentiment_clause(rng, first, prompt.rstrip().endswith(" I"))
    if rng.random() < 0.6:
        second = rng.choice(corpus.SENTIMENTS)
        joiner = rng.choice((", and", ", but"))
        if rng.random() < 0.7:
            text += f"{joiner} the {rng.choice(corpus.ASPECTS)} was {_sentiment_clause(rng, second, False)}"
        else:
            text += f"{joiner} {rng.choice(corpus.VERDICTS[second])}"
    return text + ("!" if rng.random() < 0.2 else ".")


def arithmetic_completion(rng: random.Random, prompt: str, correct: bool) -> str:
    """The right sum or a plausible mistake (a dropped carry, a digit off by one)."""
    match = _SUM.search(prompt)
    assert match is not None  # prompts come from corpus.arithmetic_problems
    a, b = int(match.group(1)), int(match.group(2))
    return str(a + b if correct else corpus.wrong_answer(rng, a, b))


def _prompts(task: str, split: corpus.Split, rng: random.Random, size: int) -> list[str]:
    if task == "sentiment":
        return corpus.review_openings(split, size, seed=rng.randrange(2**31))
    problems = corpus.arithmetic_problems(split)
    return [rng.choice(problems)[0] for _ in range(size)]


def _completion(task: str, rng: random.Random, prompt: str) -> str:
    if task == "sentiment":
        return sentiment_completion(rng, prompt)
    return arithmetic_completion(rng, prompt, correct=rng.random() < 0.5)


# ------------------------------------------------------------------------------------------- synthesis
def synthesize(task: str, kind: str, size: int, noise: float = 0.1, seed: int = 0,
               split: corpus.Split = "train", model: str | None = None,
               max_new_tokens: int = 24) -> list[dict[str, Any]]:
    """Make ``size`` feedback rows of one kind for a built-in task, labelled by its gold with noise.

    Args:
        task: "sentiment" or "arithmetic".
        kind: "pairwise", "pointwise", "rating" or "token".
        size: Number of rows.
        noise: Share of labels corrupted (see the module docstring), in [0, 1].
        seed: Seeds everything; the same arguments give the same rows.
        split: Which prompts: "train" or the held-out "eval" openings / sums.
        model: Sample the completions from this causal LM (name, directory or hub id) instead of the
            built-in grammar, so the feedback is about what a policy really writes.
        max_new_tokens: Longest sampled completion (with ``model``).

    Returns:
        The rows, each a dict in the JSONL format of its kind.
    """
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}; feedback can be synthesized for {list(TASKS)}")
    if kind not in KINDS:
        raise DatasetError(f"unknown feedback kind {kind!r}; expected one of {list(KINDS)}")
    if not 0.0 <= noise <= 1.0:
        raise DatasetError(f"noise must be in [0, 1], got {noise}")
    rng = random.Random(seed)
    if model is not None:
        return _synthesize_from_model(task, kind, size, noise, rng, split, model, max_new_tokens)
    rows = []
    for prompt in _prompts(task, split, rng, size):
        if kind == "pairwise":
            rows.append(_pairwise_row(prompt, *_pair(task, rng, prompt), rng, noise))
        else:
            rows.append(_labelled_row(task, kind, prompt, _completion(task, rng, prompt), rng, noise))
    return rows


def _pairwise_row(prompt: str, chosen: str, rejected: str, rng: random.Random, noise: float) -> dict[str, Any]:
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _labelled_row(task: str, kind: str, prompt: str, completion: str, rng: random.Random,
                  noise: float) -> dict[str, Any]:
    """A pointwise, rating or token row labelled by the gold, with ``noise`` of the labels corrupted."""
    if kind == "pointwise":
        label = gold_label(task, prompt, completion)
        return {"prompt": prompt, "completion": completion, "label": 1 - label if rng.random() < noise else label}
    if kind == "rating":
        rating = gold_rating(task, prompt, completion)
        if rng.random() < noise:
            rating = rng.uniform(-1.0, 1.0) if task == "sentiment" else rng.uniform(0.0, 1.0)
        return {"prompt": prompt, "completion": completion, "rating": round(rating, 4)}
    segments = gold_segments(task, prompt, completion)
    for segment in segments:
        if segment[1] is not None and rng.random() < noise:
            segment[1] = 1 - segment[1]
    return {"prompt": prompt, "completion": completion, "segments": segments}


PAIR_CANDIDATES = 4  # samples per prompt when sampling pairs from a model; the best and worst make the pair
MAX_SAMPLING_ROUNDS = 20


def _synthesize_from_model(task: str, kind: str, size: int, noise: float, rng: random.Random, split: corpus.Split,
                           model_name: str, max_new_tokens: int) -> list[dict[str, Any]]:
    """Feedback on completions sampled from a model; prompts whose samples all tie are skipped for pairs."""
    import torch

    from rlfb.models.loading import load_model

    model, tokenizer = load_model(model_name)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    samples_per_prompt = PAIR_CANDIDATES if kind == "pairwise" else 1
    rows: list[dict[str, Any]] = []
    for _ in range(MAX_SAMPLING_ROUNDS):
        if len(rows) >= size:
            break
        prompts = _prompts(task, split, rng, size - len(rows))
        candidates = sample_completions(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, generator)
        for prompt, completions in zip(prompts, candidates, strict=True):
            if kind != "pairwise":
                rows.append(_labelled_row(task, kind, prompt, completions[0], rng, noise))
                continue
            ranked = sorted(completions, key=lambda text: gold_score(task, prompt, text))
            best, worst = ranked[-1], ranked[0]
            if gold_score(task, prompt, best) - gold_score(task, prompt, worst) >= MIN_PAIR_MARGIN:
                rows.append(_pairwise_row(prompt, best, worst, rng, noise))
    if len(rows) < size:
        raise DatasetError(f"sampled only {len(rows)} of {size} {kind} rows from {model_name!r}: its samples for a "
                           "prompt rarely differ in gold score; use the grammar (no --model) or a smaller --size")
    return rows[:size]


def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[str], samples_per_prompt: int,
                       max_new_tokens: int, generator: Any, batch_size: int = 64) -> list[list[str]]:
    """``samples_per_prompt`` completions of each prompt, sampled at temperature 1 and stopping at EOS."""
    import torch

    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    texts: list[str] = []
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    with torch.no_grad():
        for start in range(0, len(repeated), batch_size):
            batch = tokenizer(repeated[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            # transformers' sampling draws from torch's global RNG; seed it from the generator for reproducibility
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            output = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i:i + samples_per_prompt] for i in range(0, len(texts), samples_per_prompt)]


def _pair(task: str, rng: random.Random, prompt: str) -> tuple[str, str]:
    """Two completions with a clear gold preference, best first."""
    if task == "arithmetic":
        return arithmetic_completion(rng, prompt, True), arithmetic_completion(rng, prompt, False)
    while True:
        first, second = sentiment_completion(rng, prompt), sentiment_completion(rng, prompt)
        margin = vader_compound(first) - vader_compound(second)
        if abs(margin) >= MIN_PAIR_MARGIN:
            return (first, second) if margin > 0 else (second, first)


# ----------------------------------------------------------------------------------------------- files
def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as JSON lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_feedback(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """Read a feedback JSONL file and check every row has the fields of ``kind``.

    Raises:
        DatasetError: the file is missing or empty, a line is not JSON, or a row lacks a field.
    """
    if kind not in KINDS:
        raise DatasetError(f"unknown feedback kind {kind!r}; expected one of {list(KINDS)}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"feedback file {str(path)!r} does not exist; make one with `rlfb feedback synthesize`")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path.name} line {number} is not JSON: {error}") from None
            missing = [name for name in REQUIRED_FIELDS[kind] if name not in row]
            if missing:
                raise DatasetError(f"{path.name} line {number}: a {kind} row needs {list(REQUIRED_FIELDS[kind])}, "
                                   f"missing {missing}")
            if kind == "token" and "".join(text for text, _ in row["segments"]) != row["completion"]:
                raise DatasetError(f"{path.name} line {number}: the segments do not concatenate to the completion")
            rows.append(row)
    if not rows:
        raise DatasetError(f"feedback file {str(path)!r} has no rows")
    return rows


def segment_spans(segments: Sequence[Sequence[Any]]) -> list[tuple[int, int, int | None]]:
    """Character spans ``(start, end, label)`` of a token row's segments within its completion."""
    spans, start = [], 0
    for text, label in segments:
        spans.append((start, start + len(text), label))
        start += len(text)
    return spans
