"""Export judgments to the JSONL formats ``rlfb reward-model train`` reads, and import such files.

=============  ====================================================================================
export kind    rows made from
=============  ====================================================================================
``pairwise``   choice judgments ``{prompt, chosen, rejected}``; edits that changed the text, as
               ``chosen = edited, rejected = original``
``pointwise``  binary judgments ``{prompt, completion, label}``
``rating``     rating judgments ``{prompt, completion, rating}`` (the rating on its server's scale)
``token``      edits ``{prompt, completion, segments}``: the original's pieces labelled kept (1) or
               changed (0) (see :mod:`rlfb.feedback.edits`); imported token rows as they were
``sft``        edits ``{prompt, completion}`` with the edited text: supervised targets
=============  ====================================================================================

Import reads the four reward-model kinds (:func:`rlfb.rewards.feedback.read_feedback` checks them) into
judgments (pairwise -> choice with the chosen first, pointwise -> binary, rating -> rating, token ->
token); exporting what was imported gives the file back row for row.

Stale judgments: ``max_staleness`` keeps only those made on a policy at most that many updates older
than ``current_step`` (imported judgments and those on the base model count as step 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlfb.feedback.edits import edit_segments
from rlfb.feedback.store import FeedbackStore, Judgment

EXPORT_KINDS: tuple[str, ...] = ("pairwise", "pointwise", "rating", "token", "sft")
# The judgment kinds each export kind is made from.
SOURCES: dict[str, tuple[str, ...]] = {"pairwise": ("choice", "edit"), "pointwise": ("binary",),
                                       "rating": ("rating",), "token": ("edit", "token"), "sft": ("edit",)}


def rows_of(judgment: Judgment, kind: str) -> Iterator[dict[str, Any]]:
    """The rows of export ``kind`` one judgment makes (none when it says nothing of that kind)."""
    prompt, completions, value = judgment.prompt, judgment.completions, judgment.value
    if judgment.kind == "choice" and kind == "pairwise":
        chosen = value["chosen"]
        yield {"prompt": prompt, "chosen": completions[chosen], "rejected": completions[1 - chosen]}
    elif judgment.kind == "binary" and kind == "pointwise":
        yield {"prompt": prompt, "completion": completions[0], "label": value["label"]}
    elif judgment.kind == "rating" and kind == "rating":
        yield {"prompt": prompt, "completion": completions[0], "rating": value["rating"]}
    elif judgment.kind == "token" and kind == "token":
        yield {"prompt": prompt, "completion": completions[0], "segments": value["segments"]}
    elif judgment.kind == "edit":
        original, edited = completions[0], value["text"]
        if kind == "sft":
            yield {"prompt": prompt, "completion": edited}
        elif kind == "pairwise" and edited != original:
            yield {"prompt": prompt, "chosen": edited, "rejected": original}
        elif kind == "token" and original:
            yield {"prompt": prompt, "completion": original, "segments": edit_segments(original, edited)}


def export_rows(store: FeedbackStore, kind: str, current_step: int | None = None,
                max_staleness: int | None = None) -> list[dict[str, Any]]:
    """Every row of export ``kind`` the store's judgments make, oldest judgment first."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; expected one of {', '.join(EXPORT_KINDS)}")
    rows = []
    for judgment in store.judgments(SOURCES[kind]):
        if max_staleness is not None and current_step is not None \
                and current_step - (judgment.policy_step or 0) > max_staleness:
            continue
        rows.extend(rows_of(judgment, kind))
    return rows


def import_rows(store: FeedbackStore, rows: Iterable[dict[str, Any]], kind: str, rater: str) -> int:
    """Store reward-model feedback rows of ``kind`` as judgments by ``rater``; returns how many."""
    records: list[tuple[str, list[str], str, dict[str, Any]]] = []
    for row in rows:
        if kind == "pairwise":
            records.append((row["prompt"], [row["chosen"], row["rejected"]], "choice", {"chosen": 0}))
        elif kind == "pointwise":
            records.append((row["prompt"], [row["completion"]], "binary", {"label": row["label"]}))
        elif kind == "rating":
            records.append((row["prompt"], [row["completion"]], "rating", {"rating": row["rating"]}))
        elif kind == "token":
            records.append((row["prompt"], [row["completion"]], "token", {"segments": row["segments"]}))
        else:
            raise ValueError(f"cannot import {kind!r} rows; expected pairwise, pointwise, rating or token")
    return store.import_judgments(records, rater)


def import_file(store: FeedbackStore, path: str | Path, kind: str, rater: str) -> int:
    """Read a feedback JSONL file (checked as ``rlfb reward-model train`` checks it) into the store."""
    from rlfb.rewards.feedback import read_feedback

    return import_rows(store, read_feedback(path, kind), kind, rater)
