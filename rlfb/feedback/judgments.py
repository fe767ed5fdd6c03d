"""What a judgment is: its kinds, their values, and the checks every judgment passes before it is stored.

Four kinds a rater gives on the page (and any HTTP client through the API), one imported kind:

* ``binary``: thumbs up or down on one completion; value ``{"label": 0 | 1}`` (1 = good).
* ``rating``: a score on the server's scale; value ``{"rating": x, "low": a, "high": b}``, ``a <= x <= b``.
* ``choice``: which of two completions is better; value ``{"chosen": 0 | 1}`` (the completion's index).
* ``edit``: the rater's corrected text of the completion; value ``{"text": str}``.
* ``token``: labelled segments of a completion, only from imported token files; value ``{"segments": [...]}``.

An item shows one completion (``single``: binary, rating and edit judgments) or two (``pair``: choice
judgments). A judgment of another kind than its item takes is refused (:class:`JudgmentError`, 422).

This module imports nothing heavy: the server, the store's import and the tests share it.

Example:
    >>> check_value("rating", {"rating": 4}, item_mode="single", scale=(1, 5))
    {'rating': 4.0, 'low': 1.0, 'high': 5.0}
    >>> check_value("choice", {"chosen": 1}, item_mode="single", scale=(1, 5))
    Traceback (most recent call last):
    ...
    rlfb.feedback.judgments.JudgmentError: a choice judgment needs an item with two completions; this item shows one (give binary, rating or edit)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rlfb.errors import RlfbError

RATER_KINDS: tuple[str, ...] = ("binary", "rating", "choice", "edit")
KINDS: tuple[str, ...] = (*RATER_KINDS, "token")
ITEM_MODES: dict[str, tuple[str, ...]] = {"single": ("binary", "rating", "edit"), "pair": ("choice",)}
VALUE_FIELDS: dict[str, tuple[str, ...]] = {"binary": ("label",), "rating": ("rating",), "choice": ("chosen",),
                                            "edit": ("text",)}

# Size limits: far above what a rater types, far below what could fill a disk or a server's memory.
MAX_TEXT_CHARS = 4000  # an edit's text (and an imported prompt or completion)
MAX_NAME_CHARS = 64  # a rater's name
MAX_ID_CHARS = 64  # an item id or a client's request id
MAX_BODY_BYTES = 32_768  # one HTTP request body


class JudgmentError(RlfbError, ValueError):
    """A judgment the store must not take: the message says what was wrong; ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def check_value(kind: str, value: Mapping[str, Any], item_mode: str, scale: tuple[float, float]) -> dict[str, Any]:
    """The checked, normalized value of a judgment of ``kind`` on an item of ``item_mode``.

    Raises:
        JudgmentError: an unknown kind, a kind the item does not take, a missing or extra field, or a
            value of the wrong type or out of range.
    """
    if kind not in RATER_KINDS:
        raise JudgmentError(f"unknown judgment kind {kind!r}; expected one of {', '.join(RATER_KINDS)}")
    if kind not in ITEM_MODES[item_mode]:
        shown = "one" if item_mode == "single" else "two"
        needs = "an item with two completions" if kind == "choice" else "an item with one completion"
        raise JudgmentError(f"a {kind} judgment needs {needs}; this item shows {shown} "
                            f"(give {' or '.join(_or_list(ITEM_MODES[item_mode]))})")
    expected = VALUE_FIELDS[kind]
    extra = sorted(set(value) - set(expected))
    if extra:
        raise JudgmentError(f"field(s) {extra} do not belong to a {kind} judgment; it takes {list(expected)}")
    missing = [name for name in expected if value.get(name) is None]
    if missing:
        raise JudgmentError(f"a {kind} judgment needs {missing[0]!r}")
    if kind in ("binary", "choice"):
        (name,) = expected
        number = value[name]
        if isinstance(number, bool) or not isinstance(number, int) or number not in (0, 1):
            meaning = "1 = thumbs up, 0 = down" if kind == "binary" else "the index of the better completion"
            raise JudgmentError(f"{name!r} must be 0 or 1 ({meaning}), got {number!r}")
        return {name: number}
    if kind == "rating":
        rating = value["rating"]
        low, high = scale
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating) \
                or not low <= rating <= high:
            raise JudgmentError(f"'rating' must be a number from {low:g} to {high:g}, got {rating!r}")
        return {"rating": float(rating), "low": float(low), "high": float(high)}
    text = value["text"]
    if not isinstance(text, str):
        raise JudgmentError(f"'text' must be a string (the edited completion), got {type(text).__name__}")
    check_text(text, "'text'")
    return {"text": text}


def check_text(text: str, what: str, limit: int = MAX_TEXT_CHARS) -> None:
    """Refuse text over ``limit`` characters or with control characters other than tab and newline."""
    if len(text) > limit:
        raise JudgmentError(f"{what} is {len(text)} characters; the limit is {limit}", status=413)
    if any(ord(character) < 32 and character not in "\t\n\r" for character in text) or "\x7f" in text:
        raise JudgmentError(f"{what} contains control characters; send plain text")


def check_name(name: str) -> str:
    """A rater's name: 1 to 64 letters, digits, '.', '-' or '_' (it appears in exports and logs)."""
    if not (0 < len(name) <= MAX_NAME_CHARS) or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise JudgmentError(f"rater name {name!r} must be 1 to {MAX_NAME_CHARS} letters, digits, '.', '-' or '_'")
    return name


def _or_list(kinds: tuple[str, ...]) -> list[str]:
    return [", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else list(kinds)
