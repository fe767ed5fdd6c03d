"""From a rater's edit to training signal: a supervised target, token labels from the diff, an SFT loss.

An edit replaces a completion ``y`` by the rater's text ``y'``. It says two things:

* ``y'`` is what the policy should have written: a supervised (SFT) target, trained with the negative
  log-likelihood of its tokens given the prompt (:func:`sft_loss`), and the preferred side of a pair
  ``(chosen=y', rejected=y)`` when the text changed.
* Which parts of ``y`` were wrong: the tokens of ``y`` that the rater kept are labelled 1, those deleted or
  replaced 0 (:func:`edit_segments`), a row of the ``token`` feedback format that trains the token-level
  reward model. The diff is difflib's longest-matching-blocks alignment (Ratcliff and Obershelp 1988) of
  the two token sequences, compared without their surrounding whitespace, so re-spacing is not a change.
  Text the rater only inserted changes no token of ``y``: the tokens around it stay 1.

Example:
    >>> edit_segments(" the food was awful, sadly.", " the food was lovely.")
    [[' the', 1], [' food', 1], [' was', 1], [' awful', 0], [',', 0], [' sadly', 0], ['.', 1]]
    >>> edit_segments(" awful food", " good food", pieces=[" aw", "ful", " fo", "od"])
    [[' aw', 0], ['ful', 0], [' fo', 1], ['od', 1]]
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

# Words with their leading space, runs of punctuation, runs of white space: pieces that cover any text.
_PIECE = re.compile(r"\s*[A-Za-z0-9']+|\s*[^A-Za-z0-9'\s]+|\s+")


def text_pieces(text: str) -> list[str]:
    """Split ``text`` into word and punctuation pieces that concatenate back to it."""
    return _PIECE.findall(text)


def edit_labels(original: Sequence[str], edited: Sequence[str]) -> list[int]:
    """One label per piece of ``original``: 1 if the diff keeps it in ``edited``, 0 if deleted or replaced."""
    matcher = difflib.SequenceMatcher(None, [piece.strip() for piece in original],
                                      [piece.strip() for piece in edited], autojunk=False)
    labels = [0] * len(original)
    for block in matcher.get_matching_blocks():
        labels[block.a:block.a + block.size] = [1] * block.size
    return labels


def edit_segments(original: str, edited: str, pieces: Sequence[str] | None = None) -> list[list[Any]]:
    """The ``token`` feedback row's segments of an edit: ``original`` cut into pieces, each labelled kept (1)
    or changed (0); white space is unlabelled.

    The diff is over words and punctuation (:func:`text_pieces`) of both texts. Given other ``pieces``
    (e.g. the texts of ``original``'s tokens under some tokenizer), a piece is kept only if every
    non-space character of it lies in a kept word, as :func:`rlfb.rewards.pointwise.token_labels` reads
    segments (a token is good only if all of it is).
    """
    words = text_pieces(original)
    character_labels: list[int | None] = []
    for word, label in zip(words, edit_labels(words, text_pieces(edited)), strict=True):
        character_labels += [None if character.isspace() else label for character in word]
    if pieces is None:
        pieces = words
    if "".join(pieces) != original:
        raise ValueError("the pieces do not concatenate to the original completion")
    segments: list[list[Any]] = []
    start = 0
    for piece in pieces:
        labels = [label for label in character_labels[start:start + len(piece)] if label is not None]
        segments.append([piece, min(labels) if labels else None])
        start += len(piece)
    return segments


def sft_loss(model: Any, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
             pad_token_id: int) -> Any:
    """Mean negative log-likelihood of the edited targets given their prompts (the SFT loss of edits).

        L = -(1 / sum_i |y'_i|) * sum_i sum_t log pi(y'_{i,t} | x_i, y'_{i,<t})

    Args:
        model: a causal LM (a peft model trains its adapter).
        prompt_ids: token ids of each prompt ``x_i``.
        target_ids: token ids of each edited completion ``y'_i`` (at least one token each).
        pad_token_id: fills the right of shorter rows (masked out).

    Returns:
        The loss, a scalar tensor with gradients to the model's trainable parameters.
    """
    import torch

    rows = [list(prompt) + list(target) for prompt, target in zip(prompt_ids, target_ids, strict=True)]
    length = max(len(row) for row in rows)
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for index, (row, prompt) in enumerate(zip(rows, prompt_ids, strict=True)):
        input_ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, :len(row)] = 1
        target_mask[index, len(prompt):len(row)] = True
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
    # Token t is predicted from position t - 1.
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    mask = target_mask[:, 1:]
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)
