"""``MultiTurnVectorEnv``: N conversations of ``rlfb/MultiTurn-v0`` batched, one whole turn per row per step.

Reached with ``gymnasium.make_vec("rlfb/MultiTurn-v0", num_envs=N, vectorization_mode="vector_entry_point",
...)``; NumPy in and out, like Gymnasium's own vector environments.

Row ``i`` plays exactly the episode that ``MultiTurnEnv`` plays: it has its own generator, seeded as
``SyncVectorEnv`` seeds its sub-environments (``reset(seed=s)`` gives row ``i`` the seed ``s + i``; a list
gives one seed per row; ``None`` keeps each row's generator going). Observations, rewards, flags and info
(batched by Gymnasium's ``VectorEnv._add_info``, with ``_key`` masks) equal those of
``gymnasium.make_vec(..., vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.DISABLED})``
(a test checks it), while the reward functions of ``rewards=`` score all rows that end on a step in one call.
Rows that share a seed play the same episode: ``seed=[s] * k + [t] * k`` makes groups of ``k`` identical
starts for group-baseline agents.

Autoreset mode: :attr:`gymnasium.vector.AutoresetMode.DISABLED`. Rows finish at different turns: a row that
ends reports ``terminated`` or ``truncated`` on that one step, then ignores its actions, keeps its last
observation and pays 0 until it is reset by ``reset()`` (every row) or ``reset(options={"reset_mask": mask})``
(some rows; what Gymnasium's DISABLED mode asks of its users). Stepping when every row has ended is an error.

Example:
    >>> import gymnasium as gym, rlfb
    >>> venv = gym.make_vec("rlfb/MultiTurn-v0", num_envs=2, vectorization_mode="vector_entry_point",
    ...                     protocol="guess_number", model="rlfb-tiny", action_type="text", charset="0123456789")
    >>> obs, info = venv.reset(seed=0)
    >>> obs["input_ids"].shape
    (2, 64)
    >>> obs, rewards, terminated, truncated, info = venv.step(["10", "10"])
    >>> info["reply"].tolist(), rewards.tolist(), terminated.tolist()
    (['higher', 'correct'], [0.0, 1.0], [False, True])
    >>> obs, rewards, terminated, truncated, info = venv.step(["15", None])  # row 1 has finished
    >>> info["reply"].tolist(), info["_reply"].tolist()
    (['higher', None], [True, False])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlfb.envs.conversation import (
    Conversation,
    FinalScorer,
    MultiTurnSettings,
    choose_row,
    warn_truncated_opening,
)
from rlfb.envs.core import check_options
from rlfb.envs.protocol import MultiTurnProtocol
from rlfb.envs.tasks import Task
from rlfb.errors import ConfigError

__all__ = ["MultiTurnVectorEnv"]

RESET_OPTIONS = ("split", "prompts", "indices", "reset_mask")


class MultiTurnVectorEnv(VectorEnv):
    """N conversations with one protocol; each step takes one turn per unfinished row.

    Spaces: ``single_observation_space`` / ``single_action_space`` are those of ``MultiTurnEnv``;
    ``observation_space`` holds (N, max_context_tokens) int64 arrays; ``action_space`` is
    ``MultiDiscrete`` of shape (N, max_turn_tokens) for token turns, a ``Tuple`` of N ``Text`` spaces for
    text turns. ``step`` also accepts a sequence of N 1-D token sequences of different lengths, and ignores
    the actions of finished rows (any value, ``None`` included). Rewards are (N,) float64, flags (N,) bool.

    Args:
        num_envs: N, the number of conversations.
        protocol, task, model, ...: as for :class:`~rlfb.envs.multiturn_env.MultiTurnEnv` (no ``render_mode``).
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, num_envs: int = 1,
                 protocol: str | MultiTurnProtocol[Any] | type[MultiTurnProtocol[Any]] = "calculator",
                 task: str | Mapping[str, Any] | Task | None = None, model: str | None = "rlfb-tiny", *,
                 tokenizer: Any | None = None, protocol_options: Mapping[str, Any] | None = None,
                 rewards: Any = None, action_type: str = "tokens", max_turns: int = 8, max_turn_tokens: int = 24,
                 max_model_tokens: int | None = None, max_context_tokens: int | None = None, split: str = "train",
                 use_chat_template: bool | None = None, reply_template: str = "\n{reply}\n",
                 charset: str | None = None, max_chars: int | None = None, vocab_size: int | None = None) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
        self.settings = MultiTurnSettings.from_kwargs(
            protocol=protocol, protocol_options=protocol_options, task=task, model=model, tokenizer=tokenizer,
            rewards=rewards, action_type=action_type, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
            max_model_tokens=max_model_tokens, max_context_tokens=max_context_tokens, split=split,
            use_chat_template=use_chat_template, reply_template=reply_template, charset=charset,
            max_chars=max_chars, vocab_size=vocab_size)
        self.num_envs = num_envs
        self.single_observation_space = self.settings.observation_space()
        self.single_action_space = self.settings.action_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._scorer = FinalScorer(self.settings)
        self._conversations: list[Conversation | None] = [None] * num_envs
        self._row_generators: list[np.random.Generator | None] = [None] * num_envs
        self._warned = False
        self.num_truncated_openings = 0

    # ---- what agents read -------------------------------------------------------------------------------
    @property
    def protocol(self) -> MultiTurnProtocol[Any]:
        """The protocol that answers every row's turns."""
        return self.settings.protocol

    @property
    def tokenizer(self) -> Any:
        """The tokenizer."""
        return self.settings.tokenizer

    @property
    def conversations(self) -> list[Conversation | None]:
        """Each row's current episode (None before its first reset)."""
        return list(self._conversations)

    @property
    def finished(self) -> np.ndarray:
        """(N,) bool: rows whose episode has ended (or never started)."""
        return np.array([conversation is None or not conversation.active for conversation in self._conversations])

    @property
    def all_finished(self) -> bool:
        """Whether every row's episode has ended."""
        return bool(self.finished.all())

    # ---- Gymnasium API -----------------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start new conversations on every row (or on the rows of ``options["reset_mask"]``).

        Args:
            seed: None, an int ``s`` (row ``i`` gets ``s + i``) or one seed (or None) per row.
            options: ``split`` ("train" / "eval" for this reset); ``prompts`` (one pinned row, a string or
                ``{"prompt": ..., **columns}``, per row being reset); ``indices`` (one row index of the split
                per row being reset); ``reset_mask`` ((N,) bool NumPy array: reset only these rows).

        Returns:
            The observation of every row and the reset info of the rows that were reset.
        """
        super().reset(seed=seed if isinstance(seed, int) else None)
        options = check_options(options, RESET_OPTIONS)
        seeds = self._row_seeds(seed)
        row_numbers = self._rows_to_reset(options.get("reset_mask"))
        prompts = self._per_row_option(options, "prompts", len(row_numbers))
        indices = self._per_row_option(options, "indices", len(row_numbers))
        infos: dict[str, Any] = {}
        for offset, row_number in enumerate(row_numbers):
            generator = self._row_generators[row_number]
            if seeds[row_number] is not None or generator is None:
                generator, _ = seeding.np_random(seeds[row_number])
                self._row_generators[row_number] = generator
            row, prompt_index = choose_row(self.settings.task, self.settings.split, generator,
                                           {"split": options.get("split"), "prompt": prompts[offset],
                                            "index": indices[offset]})
            conversation = Conversation.open(self.settings, row, prompt_index, generator)
            self._conversations[row_number] = conversation
            self.num_truncated_openings += conversation.opening_was_truncated
            self._warned = warn_truncated_opening(conversation, self._warned)
            infos = self._add_info(infos, conversation.reset_info(), row_number)
        return self._observations(), infos

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Take one turn on every unfinished row; finished rows ignore their action and pay 0."""
        active = [number for number, conversation in enumerate(self._conversations)
                  if conversation is not None and conversation.active]
        if not active:
            raise RuntimeError("every episode has ended; call reset() before stepping again")
        row_actions = self._row_actions(actions)
        turns = {number: self.settings.read_action(row_actions[number]) for number in active}  # all checked first
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        truncated = np.zeros(self.num_envs, dtype=np.bool_)
        row_infos: dict[int, dict[str, Any]] = {}
        ended: list[int] = []
        for number in active:
            conversation = self._conversations[number]
            assert conversation is not None
            result = conversation.take_turn(*turns[number])
            rewards[number], terminated[number], truncated[number] = result.reward, result.terminated, result.truncated
            row_infos[number] = conversation.step_info(result)
            if not conversation.active:
                ended.append(number)
        finished = [self._conversations[number] for number in ended]
        for number, (final_reward, final_info) in zip(ended, self._scorer.score(finished), strict=True):  # type: ignore[arg-type]
            rewards[number] += final_reward
            row_infos[number].update(final_info)
        infos: dict[str, Any] = {}
        for number in active:
            infos = self._add_info(infos, row_infos[number], number)
        return self._observations(), rewards, terminated, truncated, infos

    # ---- helpers ---------------------------------------------------------------------------------------
    def _observations(self) -> dict[str, np.ndarray]:
        width = self.settings.max_context_tokens
        input_ids = np.full((self.num_envs, width), self.settings.pad_token_id, dtype=np.int64)  # (N, L)
        attention_mask = np.zeros((self.num_envs, width), dtype=np.int64)  # (N, L)
        for number, conversation in enumerate(self._conversations):
            if conversation is not None:
                observation = conversation.observation()
                input_ids[number], attention_mask[number] = observation["input_ids"], observation["attention_mask"]
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _row_seeds(self, seed: int | Sequence[int | None] | None) -> list[int | None]:
        """One seed per row, as SyncVectorEnv derives them."""
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int):
            return [seed + number for number in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"a list of seeds needs one per row ({self.num_envs}), got {len(seeds)}")
        return seeds

    def _rows_to_reset(self, reset_mask: Any) -> list[int]:
        if reset_mask is None:
            return list(range(self.num_envs))
        if not isinstance(reset_mask, np.ndarray) or reset_mask.dtype != np.bool_ \
                or reset_mask.shape != (self.num_envs,):
            raise ValueError(f"reset option 'reset_mask' must be a ({self.num_envs},) bool NumPy array, got "
                             f"{reset_mask!r}")
        if not reset_mask.any():
            raise ValueError("reset option 'reset_mask' has no True entry; mark at least one row to reset")
        return np.flatnonzero(reset_mask).tolist()

    @staticmethod
    def _per_row_option(options: Mapping[str, Any], name: str, count: int) -> list[Any]:
        values = options.get(name)
        if values is None:
            return [None] * count
        values = list(values)
        if len(values) != count:
            raise ValueError(f"reset option {name!r} has {len(values)} entries; this reset starts {count} rows "
                             "(one entry per row being reset)")
        return values

    def _row_actions(self, actions: Any) -> list[Any]:
        if isinstance(actions, np.ndarray) and actions.dtype != object:
            if actions.ndim != 2 or actions.shape[0] != self.num_envs:
                raise ValueError(f"expected one turn per row: an array of shape ({self.num_envs}, T), got "
                                 f"{actions.shape}")
            return list(actions)
        if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence | np.ndarray):
            raise ValueError(f"expected a sequence of {self.num_envs} turns (one per row), got "
                             f"{type(actions).__name__} {actions!r}")
        row_actions = list(actions)
        if len(row_actions) != self.num_envs:
            raise ValueError(f"expected one turn per row ({self.num_envs}), got {len(row_actions)}")
        return row_actions
