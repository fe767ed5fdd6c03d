"""The token-per-step episode state of N rows, as torch tensors: the engine of both token environments.

Each row is one episode. ``step`` writes the row's token into its observation, ends the row on EOS
(terminated) or after ``max_new_tokens`` tokens (truncated), and scores all rows that ended on this step
with one call of the reward functions. ``take_completions`` does what stepping each column of a (N, T)
matrix in turn does, with one call of the reward functions for the whole batch: the rollout core samples
whole completions and hands them over at once. A row that has ended ignores further tokens until it is
started again; no text is decoded until an episode ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rlfb.envs.core import EpisodeScorer, EpisodeScores, PromptSource, TextEnvSettings

__all__ = ["Completions", "DenseReward", "StepResult", "TokenEpisodes"]

DenseReward = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""``fn(tokens (B,), observation) -> (B,)`` reward of each token just taken; ``observation`` already holds
it (``input_ids`` / ``attention_mask`` of shape (B, L); read-only)."""


class StepResult:
    """What one step produced: (N,) tensors plus the scores of the episodes that ended on it."""

    __slots__ = ("ended_rows", "rewards", "scores", "terminated", "truncated")

    def __init__(self, rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                 ended_rows: list[int], scores: EpisodeScores | None) -> None:
        self.rewards = rewards
        self.terminated = terminated
        self.truncated = truncated
        self.ended_rows = ended_rows
        self.scores = scores


class Completions:
    """What :meth:`TokenEpisodes.take_completions` produced: per row, the tokens taken and how it ended.

    Attributes:
        taken: (N,) tokens each row took (EOS included; 0 for rows that had already ended).
        dense_rewards: (N, T) the env's dense reward of each token taken (0 elsewhere), or None without one.
        terminated, truncated: (N,) bool, rows that ended on EOS, or at ``max_new_tokens``.
        ended_rows: The rows that ended, in order; ``scores`` holds theirs, in that order (None if none).
    """

    __slots__ = ("dense_rewards", "ended_rows", "scores", "taken", "terminated", "truncated")

    def __init__(self, taken: torch.Tensor, dense_rewards: torch.Tensor | None, terminated: torch.Tensor,
                 truncated: torch.Tensor, ended_rows: list[int], scores: EpisodeScores | None) -> None:
        self.taken = taken
        self.dense_rewards = dense_rewards
        self.terminated = terminated
        self.truncated = truncated
        self.ended_rows = ended_rows
        self.scores = scores


class TokenEpisodes:
    """N lockstep token episodes on one device.

    Args:
        settings: The environment's settings (task, tokenizer, rewards, lengths).
        num_rows: N.
        device: Where the observation tensors live (the policy model's device).
        dense_reward: Optional per-token reward paid on every step (see :data:`DenseReward`).
    """

    def __init__(self, settings: TextEnvSettings, num_rows: int, device: torch.device,
                 dense_reward: DenseReward | None = None) -> None:
        self.settings = settings
        self.num_rows = num_rows
        self.device = device
        self.dense_reward = dense_reward
        self.prompts = PromptSource(settings)
        self.scorer = EpisodeScorer(settings)
        length = settings.observation_length
        self.input_ids = torch.full((num_rows, length), settings.pad_token_id, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros((num_rows, length), dtype=torch.long, device=device)
        self.num_tokens = torch.zeros(num_rows, dtype=torch.long, device=device)  # tokens taken per row
        self.active = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.rows: list[dict[str, Any]] = [{} for _ in range(num_rows)]
        self.prompt_index = np.full(num_rows, -1, dtype=np.int64)
        self._eos = torch.tensor([settings.eos_token_id], device=device)

    def start(self, row_numbers: Sequence[int], rows: Sequence[dict[str, Any]], prompt_index: np.ndarray,
              group_size: int = 1) -> None:
        """Start new episodes on ``row_numbers``; consecutive groups of ``group_size`` share each row of ``rows``.

        Args:
            row_numbers: Which of the N rows to (re)start, ``len(rows) * group_size`` of them.
            rows: One task row per group.
            prompt_index: Index of each task row in its split (-1 for pinned prompts).
            group_size: Rows per prompt.
        """
        prompt_ids, prompt_mask = self.prompts.encode(rows)  # (G, P) each, tokenized once per group
        prompt_ids = np.repeat(prompt_ids, group_size, axis=0)
        prompt_mask = np.repeat(prompt_mask, group_size, axis=0)
        width = self.settings.max_prompt_tokens
        selected = torch.as_tensor(list(row_numbers), dtype=torch.long, device=self.device)
        self.input_ids[selected] = self.settings.pad_token_id
        self.input_ids[selected, :width] = torch.as_tensor(prompt_ids, device=self.device)
        self.attention_mask[selected] = 0
        self.attention_mask[selected, :width] = torch.as_tensor(prompt_mask, device=self.device)
        self.num_tokens[selected] = 0
        self.active[selected] = True
        for offset, row_number in enumerate(row_numbers):
            self.rows[row_number] = rows[offset // group_size]
            self.prompt_index[row_number] = prompt_index[offset // group_size]

    def observation(self) -> dict[str, torch.Tensor]:
        """A copy of the current observation (callers may keep it; the state moves on)."""
        return {"input_ids": self.input_ids.clone(), "attention_mask": self.attention_mask.clone()}

    def step(self, tokens: torch.Tensor | np.ndarray | Sequence[int]) -> StepResult:
        """Take one token per row.

        Args:
            tokens: (N,) token ids; those of rows that already ended are ignored.

        Raises:
            ValueError: A token is out of ``[0, vocab_size)`` or the shape is wrong.
            RuntimeError: Every episode has already ended (call reset first).
        """
        settings = self.settings
        tokens = self._as_tokens(tokens)
        self._check_tokens(tokens)
        active = self.active
        # Write each active row's token at its own next completion column; ended rows keep their columns.
        columns = (settings.max_prompt_tokens + self.num_tokens).clamp(max=settings.observation_length - 1)[:, None]
        current_ids = self.input_ids.gather(1, columns).squeeze(1)
        current_mask = self.attention_mask.gather(1, columns).squeeze(1)
        self.input_ids.scatter_(1, columns, torch.where(active, tokens, current_ids)[:, None])
        self.attention_mask.scatter_(1, columns, torch.where(active, 1, current_mask)[:, None])
        self.num_tokens += active.long()

        terminated = active & torch.isin(tokens, self._eos)
        truncated = active & ~terminated & (self.num_tokens >= settings.max_new_tokens)
        rewards = torch.zeros(self.num_rows, dtype=torch.float32, device=self.device)
        if self.dense_reward is not None:
            observation = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
            dense = torch.as_tensor(self.dense_reward(tokens, observation), device=self.device, dtype=torch.float32)
            rewards = torch.where(active, dense.reshape(self.num_rows), rewards)
        ended = terminated | truncated
        self.active = active & ~ended

        ended_rows = ended.nonzero().flatten().tolist()  # syncs; empty on most steps
        scores = self._score(ended_rows) if ended_rows else None
        if scores is not None:
            rewards[ended_rows] += torch.as_tensor(scores.returns, dtype=torch.float32, device=self.device)
        return StepResult(rewards, terminated, truncated, ended_rows, scores)

    def take_completions(self, completion_ids: torch.Tensor | np.ndarray) -> Completions:
        """Take (N, T) tokens per row at once: what :meth:`step` on each column in turn does (the same
        observation, terminations and dense rewards), the episodes that end scored in one call of the reward
        functions instead of one per step.

        Each active row takes its columns up to and including its first EOS, or until ``max_new_tokens``;
        the columns after that are ignored (padding), and so are rows that had already ended. A row whose
        episode ends within none of the T columns stays active.

        Raises:
            ValueError: A token is out of ``[0, vocab_size)`` or the shape is not (N, T).
            RuntimeError: Every episode has already ended (call reset first).
        """
        settings = self.settings
        tokens = self._as_tokens(completion_ids, matrix=True)  # (N, T)
        self._check_tokens(tokens)
        width = tokens.shape[1]
        if width == 0:  # nothing to take: every row as it was
            none = torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
            return Completions(torch.zeros(self.num_rows, dtype=torch.long, device=self.device),
                               None if self.dense_reward is None else tokens.new_zeros(tokens.shape, dtype=torch.float32),
                               none, none.clone(), [], None)
        steps = torch.arange(width, device=self.device)  # (T,)
        room = (settings.max_new_tokens - self.num_tokens).clamp(min=0)  # (N,) tokens each row may still take
        is_eos = torch.isin(tokens, self._eos) & (steps < room[:, None])  # (N, T)
        terminated = self.active & is_eos.any(1)
        first_eos = is_eos.int().argmax(1)  # (N,) the first EOS column (0 where none; unused there)
        taken = torch.where(terminated, first_eos + 1, room.clamp(max=width)) * self.active  # (N,)
        truncated = self.active & ~terminated & (self.num_tokens + taken >= settings.max_new_tokens)
        takes = steps < taken[:, None]  # (N, T) the tokens taken
        start = settings.max_prompt_tokens + self.num_tokens  # (N,) each row's next completion column
        dense_rewards = None
        if self.dense_reward is None:  # every token written at once
            rows, columns = takes.nonzero(as_tuple=True)
            self.input_ids[rows, start[rows] + columns] = tokens[rows, columns]
            self.attention_mask[rows, start[rows] + columns] = 1
        else:  # column by column: the dense reward of column t sees the observation up to t, as step's does
            dense_rewards = torch.zeros(tokens.shape, dtype=torch.float32, device=self.device)
            all_rows = torch.arange(self.num_rows, device=self.device)
            for column in range(int(taken.max())):
                rows = all_rows[takes[:, column]]
                self.input_ids[rows, start[rows] + column] = tokens[rows, column]
                self.attention_mask[rows, start[rows] + column] = 1
                observation = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
                dense = torch.as_tensor(self.dense_reward(tokens[:, column], observation), device=self.device,
                                        dtype=torch.float32).reshape(self.num_rows)
                dense_rewards[:, column] = torch.where(takes[:, column], dense, 0.0)
        self.num_tokens += taken
        ended = terminated | truncated
        self.active = self.active & ~ended
        ended_rows = ended.nonzero().flatten().tolist()
        scores = self._score(ended_rows) if ended_rows else None
        return Completions(taken, dense_rewards, terminated, truncated, ended_rows, scores)

    def completion_ids(self, row_numbers: Sequence[int]) -> list[list[int]]:
        """The tokens rows took so far (EOS included when they terminated)."""
        start = self.settings.max_prompt_tokens
        lengths = self.num_tokens[list(row_numbers)].tolist()
        completions = self.input_ids[list(row_numbers), start:].tolist()
        return [ids[:length] for ids, length in zip(completions, lengths, strict=True)]

    def _score(self, ended_rows: list[int]) -> EpisodeScores:
        return self.scorer.score([self.rows[row] for row in ended_rows], self.completion_ids(ended_rows))

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        vocab_size = self.settings.vocab_size
        out_of_range = (tokens < 0) | (tokens >= vocab_size)
        any_bad, any_active = torch.stack([out_of_range.any(), self.active.any()]).tolist()  # one device sync
        if any_bad:
            rows = out_of_range.nonzero()[:, 0].unique().tolist()
            raise ValueError(f"action(s) {tokens[out_of_range].tolist()} (rows {rows}) out of range: a token id "
                             f"must be in [0, {vocab_size}) (Discrete({vocab_size}))")
        if not any_active:
            raise RuntimeError("every episode has ended; call reset() before stepping again")

    def _as_tokens(self, tokens: Any, matrix: bool = False) -> torch.Tensor:
        """(N,) token ids, or (N, T) with ``matrix``, as a long tensor on the device."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
                raise ValueError(f"actions must be integer token ids, got a {tokens.dtype} tensor")
            tokens = tokens.to(self.device, torch.long)
        else:
            array = np.asarray(tokens)
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"actions must be integer token ids, got {array.dtype} values {array!r}")
            tokens = torch.as_tensor(array.astype(np.int64), device=self.device)
        if matrix and (tokens.dim() != 2 or tokens.shape[0] != self.num_rows):
            raise ValueError(f"expected a row of tokens per episode, shape ({self.num_rows}, T), "
                             f"got {tuple(tokens.shape)}")
        if not matrix and tokens.shape != (self.num_rows,):
            raise ValueError(f"expected one token per episode, shape ({self.num_rows},), got {tuple(tokens.shape)}")
        return tokens
