"""Whole turns of many conversations, the KV cache of each kept from turn to turn.

:class:`TurnSampler` is the :class:`~rlfb.models.sampler.TokenSampler` loop (the same filters, decoders and
log-probs) over a conversation's turns. The first call encodes the openings (rows with the same opening
once, their cache rows repeated). A turn is sampled for every live row until each has sampled EOS or taken
its budget; a row done with its turn leaves the compute batch as in the single-turn sampler, and its cache
rows are set aside. At the next call each live row's cache comes back (right-aligned, so that every row's
last cached token is in the last column; the rows of ended episodes are dropped with their caches) and only what the model has not seen is
prefilled: the turn's last token (sampled, never fed) and the environment's reply. A turn costs the turn and
the reply, not the conversation so far.

Positions count real tokens from the opening's first, as the training forward counts them
(:func:`~rlfb.agents.rollout.evaluate_rollout`), so the sampled log-probs are those of a forward pass over
the whole conversation, to float rounding. A cache whose columns cannot be taken apart exactly (a
transformers cache with sliding-window or other non-plain layers) is encoded again from the opening at
every turn, which is logged once per model type.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=32, n_embd=8, n_layer=1, n_head=2)).eval()
    >>> sampler = TurnSampler(model, SamplingConfig(), torch.Generator().manual_seed(0), eos_token_id=0)
    >>> first = sampler.sample_turns([0, 1], [[5, 6], [5, 6]], budgets=[3, 3])
    >>> conversation = [5, 6, *first[1][0], 9, 9]  # row 1's turn and a reply of two tokens; row 0 has ended
    >>> second = sampler.sample_turns([1], [conversation], budgets=[2])
    >>> turn, logprobs = second[0]
    >>> 1 <= len(turn) <= 2 and len(logprobs) == len(turn)
    True
    >>> sampler.cached_tokens(1) == len(conversation) + len(turn) - 1  # all but the turn's last token
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from rlfb.models.sampler import SamplingConfig, TokenSampler

__all__ = ["TurnSampler"]

logger = logging.getLogger(__name__)
_REPORTED: set[str] = set()


class _SetAside(NamedTuple):
    """Rows whose turn is over, with their cache, until the next turn."""

    rows: list[int]  # batch rows (positions in the first call's rows)
    cache: torch.Tensor  # (layers, 2, n, heads, W, head_dim)
    mask: torch.Tensor  # (n, W) 1 on the columns that hold real tokens


class TurnSampler(TokenSampler):
    """Samples one turn per live conversation per call, keeping each conversation's cache between calls.

    Args: those of :class:`~rlfb.models.sampler.TokenSampler`; a turn's length is each call's ``budgets``
    (``sampling.max_new_tokens`` is not used).
    """

    def __init__(self, model: Any, sampling: SamplingConfig, generator: torch.Generator | None = None, *,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 lean_decoder: bool = True) -> None:
        super().__init__(model, sampling, generator, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         lean_decoder=lean_decoder)
        self._batch_rows: dict[int, int] = {}  # the caller's row id -> batch row
        self._seen: list[list[int]] = []  # per batch row: the tokens of the conversation the sampler knows
        self._set_aside: list[_SetAside] = []
        self._turn_decoder: Any = None  # kept across turns (the sampler releases its own at a turn's end)

    def cached_tokens(self, row: int) -> int:
        """How many tokens of row ``row``'s conversation the model has encoded (its cache's real columns)."""
        batch_row = self._batch_rows[row]
        for aside in self._set_aside:
            if batch_row in aside.rows:
                return int(aside.mask[aside.rows.index(batch_row)].sum())
        return 0  # an ended row, or a cache that is encoded again at every turn

    def sample_turns(self, rows: Sequence[int], conversations: Sequence[Sequence[int]],
                     budgets: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """The next turn of each row: its token ids (EOS included when sampled) and their log-probs.

        Args:
            rows: The rows playing this turn. The first call names every conversation of the batch; each
                later call a subset of the previous one's rows (a row left out has ended: its cache goes).
            conversations: Each row's tokens so far, from the opening's first; after the first call they
                must extend what the sampler saw (the last turn it sampled, then the environment's reply).
            budgets: The most tokens each row's turn may take (>= 1): what the context window and the
                episode's token cap leave.

        Raises:
            ValueError: A conversation that does not extend the tokens the sampler saw, a row not in the
                previous call, or a budget below 1.
        """
        if len(rows) != len(conversations) or len(rows) != len(budgets):
            raise ValueError(f"rows, conversations and budgets differ in length: {len(rows)}, {len(conversations)},"
                             f" {len(budgets)}")
        if min(budgets) < 1:
            raise ValueError(f"every turn needs a budget of at least 1 token, got {list(budgets)}")
        if not self._batch_rows:
            self._batch_rows = {row: position for position, row in enumerate(rows)}
            self._seen = [list(tokens) for tokens in conversations]
            self._encode_whole(list(range(len(rows))), budgets)
        else:
            batch_rows = self._checked_rows(rows, conversations)
            if self._turn_decoder is not None and self._turn_decoder.can_rebuild:
                self._append_new_tokens(batch_rows, budgets)
            else:
                self._report_re_encoding()
                self._encode_whole(batch_rows, budgets)
        generation = self.sample_to_end()
        lengths = generation.completion_mask.sum(1).tolist()
        ids, logprobs = generation.completion_ids.tolist(), generation.logprobs.float().tolist()
        turns = []
        for row in rows:
            batch_row = self._batch_rows[row]
            length = lengths[batch_row]
            turns.append((ids[batch_row][:length], logprobs[batch_row][:length]))
            self._seen[batch_row].extend(ids[batch_row][:length])
        return turns

    def _checked_rows(self, rows: Sequence[int], conversations: Sequence[Sequence[int]]) -> list[int]:
        """The batch rows of ``rows``, each one's ``_seen`` set to its conversation (checked to extend it)."""
        batch_rows = []
        live = {row for aside in self._set_aside for row in aside.rows}
        for row, tokens in zip(rows, conversations, strict=True):
            batch_row = self._batch_rows.get(row)
            if batch_row is None or (self._set_aside and batch_row not in live):
                raise ValueError(f"row {row} did not play the previous turn; each call takes a subset of the "
                                 "previous call's rows")
            seen = self._seen[batch_row]
            if list(tokens[: len(seen)]) != seen:
                raise ValueError(f"row {row}'s conversation does not extend the tokens the sampler saw (its last "
                                 "turn, whole, then a reply); pass each row's tokens so far, from the opening's first")
            self._seen[batch_row] = list(tokens)
            batch_rows.append(batch_row)
        return batch_rows

    @torch.inference_mode()
    def _encode_whole(self, batch_rows: list[int], budgets: Sequence[int]) -> None:
        """Encode the rows' whole conversations (left-padded) into a fresh cache; the other rows are done."""
        width = max(len(self._seen[row]) for row in batch_rows)
        input_ids = torch.full((len(batch_rows), width), self.pad_token_id, dtype=torch.long)  # (A, L) left-padded
        attention_mask = torch.zeros((len(batch_rows), width), dtype=torch.long)
        for position, row in enumerate(batch_rows):
            tokens = self._seen[row]
            input_ids[position, width - len(tokens):] = torch.tensor(tokens)
            attention_mask[position, width - len(tokens):] = 1
        self._set_aside = []
        self.start(input_ids, attention_mask, max_new_tokens=budgets)
        self._rows = torch.tensor(batch_rows, device=self._rows.device)  # compute row i plays batch row batch_rows[i]
        self.finished = torch.ones(len(self._seen), dtype=torch.bool, device=self._rows.device)
        self.finished[self._rows] = False
        self._turn_decoder = self._decoder

    @torch.inference_mode()
    def _append_new_tokens(self, batch_rows: list[int], budgets: Sequence[int]) -> None:
        """Bring back the rows' caches (right-aligned in W columns) and prefill what is new.

        With n_r cached tokens (the real columns of the row's W) and t_r new ones (the last turn's last
        token, the reply) in a block of T = max t_r columns after the W cached ones, row r's new tokens sit
        right-aligned in the block at positions n_r .. n_r + t_r - 1; every row's last column is real, so the
        next-token logits are at the right edge. A row's T - t_r padding columns stay in its cache, unattended.
        """
        device = self._rows.device
        cache, cached_mask = self._gather_set_aside(batch_rows)
        cached = cached_mask.sum(1)  # (A,) n_r
        new_tokens = [self._seen[row][int(count):] for row, count in zip(batch_rows, cached.tolist(), strict=True)]
        block = max(len(tokens) for tokens in new_tokens)
        block_ids = torch.full((len(batch_rows), block), self.pad_token_id, dtype=torch.long)  # (A, T)
        block_mask = torch.zeros((len(batch_rows), block), dtype=torch.long)
        for position, tokens in enumerate(new_tokens):
            block_ids[position, block - len(tokens):] = torch.tensor(tokens)
            block_mask[position, block - len(tokens):] = 1
        block_ids, block_mask = block_ids.to(device), block_mask.to(device)
        block_positions = (cached[:, None] + block_mask.cumsum(1) - 1).clamp(min=0)  # (A, T)
        budget = torch.as_tensor(budgets, device=device).long()
        self._max_steps = int(budget.max())
        assert self._turn_decoder is not None
        self._turn_decoder.load(cache, extra_width=block + self._max_steps)
        width = cached_mask.shape[1] + block
        self._mask_buffer = cached_mask.new_zeros((len(batch_rows), width + self._max_steps))
        self._mask_buffer[:, :width] = torch.cat([cached_mask, block_mask], 1)
        self._mask_width = width
        logits = self._turn_decoder.extend(block_ids, block_positions, self._mask_buffer[:, :width])
        self._decoder = self._turn_decoder
        self._next_logits = logits.float()
        self._next_position = cached + block_mask.sum(1)
        self._budgets = budget
        self._rows = torch.tensor(batch_rows, device=device)
        self.finished = torch.ones(len(self._seen), dtype=torch.bool, device=device)
        self.finished[self._rows] = False
        self.num_generated = 0

    def _gather_set_aside(self, batch_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The set-aside caches of ``batch_rows``, in that order: (layers, 2, A, heads, W, head_dim), and their
        (A, W) mask. The rest of what was set aside is dropped.

        Rows set aside together share their columns; each group's W_p columns go to the last W_p of W (the
        widest group's), the columns before them unattended, as left padding. (Any placement before the new
        block would compute the same: positions are explicit and the mask says which columns are real.)
        """
        wanted = {row: position for position, row in enumerate(batch_rows)}
        width = max(aside.mask.shape[1] for aside in self._set_aside)
        first = self._set_aside[0].cache
        shape = list(first.shape)
        shape[2], shape[4] = len(batch_rows), width
        cache = first.new_zeros(shape)  # unattended columns still enter attention as 0 * value: no NaN there
        mask = self._set_aside[0].mask.new_zeros((len(batch_rows), width))
        for aside in self._set_aside:
            taken = [index for index, row in enumerate(aside.rows) if row in wanted]
            if not taken:
                continue
            device = aside.mask.device
            source = torch.tensor(taken, device=device)
            destination = torch.tensor([wanted[aside.rows[index]] for index in taken], device=device)
            piece_width = aside.mask.shape[1]
            cache[:, :, destination, :, width - piece_width:] = aside.cache[:, :, source]
            mask[destination, width - piece_width:] = aside.mask[source]
        self._set_aside = []
        return cache, mask

    def _drop_rows(self, keep: torch.Tensor) -> None:
        """Set aside the rows whose turn is over (with their cache), then drop them from the compute batch."""
        self._set_aside_rows((~keep).nonzero().flatten())
        super()._drop_rows(keep)

    def _release(self) -> None:
        """At the turn's end, set aside the rows still in the compute batch (their cache handed over, not
        copied), empty the decoder's, then release the batch."""
        self._set_aside_rows(None)
        if self._decoder is not None:
            self._decoder.select_rows(self._rows.new_zeros(0))
        super()._release()

    def _set_aside_rows(self, compute_rows: torch.Tensor | None) -> None:
        """Set aside ``compute_rows`` (None: all of them) with their cache and mask."""
        decoder = self._decoder
        if decoder is None or not decoder.can_rebuild or (compute_rows is not None and compute_rows.numel() == 0):
            return
        rows = self._rows if compute_rows is None else self._rows[compute_rows]
        mask = self._mask_buffer[:, : self._mask_width]
        self._set_aside.append(_SetAside(rows.tolist(), decoder.take_rows(compute_rows),
                                         mask if compute_rows is None else mask[compute_rows]))

    def _report_re_encoding(self) -> None:
        config = getattr(self.model, "config", None)
        model_type = str(getattr(config, "model_type", type(self.model).__name__))
        if model_type not in _REPORTED:
            _REPORTED.add(model_type)
            cache = getattr(self._turn_decoder, "cache", self._turn_decoder)
            logger.warning("sampling %s turns with the conversation encoded again at every turn: its cache (%s) "
                           "cannot be kept between turns exactly", model_type, type(cache).__name__)
