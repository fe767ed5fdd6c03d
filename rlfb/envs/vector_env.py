"""``TextGenerationVectorEnv``: N token-per-step text episodes batched as torch tensors on one device.

Reached with ``gymnasium.make_vec("rlfb/TextGeneration-v0", num_envs=N, vectorization_mode="vector_entry_point")``.
The environment holds tokens, never the policy model: the agent's :class:`rlfb.models.sampler.TokenSampler`
keeps the KV cache and picks the tokens.

Autoreset mode: :attr:`gymnasium.vector.AutoresetMode.DISABLED`. A row that ends (EOS -> ``terminated``,
``max_new_tokens`` tokens -> ``truncated``) reports it on that one step, then ignores its actions and pays
0 reward until it is reset, by ``reset()`` (all rows) or ``reset(options={"reset_mask": mask})`` (some).
That makes the usual collection loop (reset every row, step until :attr:`all_finished`) exact and cheap.

NumPy code and Gymnasium's vector wrappers take it wrapped in :class:`rlfb.envs.NumpyVectorEnv`, which
returns NumPy arrays (and plain-array info) instead of tensors.

Example:
    >>> import gymnasium as gym, rlfb, torch
    >>> from rlfb.models.sampler import SamplingConfig, TokenSampler
    >>> venv = gym.make_vec("rlfb/TextGeneration-v0", num_envs=4, vectorization_mode="vector_entry_point",
    ...                     task="sentiment", model="rlfb-tiny", rewards=["sentiment"], group_size=2,
    ...                     max_new_tokens=8, device="cpu")  # doctest: +SKIP
    >>> obs, info = venv.reset(seed=0)  # doctest: +SKIP
    >>> sampler = TokenSampler(policy_model, SamplingConfig(max_new_tokens=8), eos_token_id=venv.eos_token_id)  # doctest: +SKIP
    >>> sampler.start(obs["input_ids"], obs["attention_mask"])  # doctest: +SKIP
    >>> while not venv.all_finished:  # doctest: +SKIP
    ...     tokens, logprobs = sampler.sample()
    ...     obs, rewards, terminated, truncated, info = venv.step(tokens)
    ...     if not venv.all_finished:
    ...         sampler.advance(tokens)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlfb.envs.core import EpisodeScores, TextEnvProperties, TextEnvSettings, check_options, observation_space
from rlfb.envs.episodes import Completions, DenseReward, TokenEpisodes
from rlfb.envs.tasks import Task
from rlfb.errors import ConfigError

__all__ = ["TextGenerationVectorEnv"]

RESET_OPTIONS = ("split", "prompts", "indices", "reset_mask")


class TextGenerationVectorEnv(TextEnvProperties, VectorEnv):
    """N text-generation episodes, one token per row per step, as torch tensors on ``device``.

    Spaces: ``single_action_space = Discrete(vocab_size)``, ``action_space = MultiDiscrete([vocab_size] * N)``;
    observations are dicts of (N, max_prompt_tokens + max_new_tokens) int64 tensors ``input_ids`` and
    ``attention_mask`` (left-padded prompt, then the completion so far; see :mod:`rlfb.envs.core`).
    ``step`` returns rewards (N,) float32, terminated (N,) bool and truncated (N,) bool tensors on the device,
    and ``info`` as a dict of NumPy arrays with ``_key`` masks.

    Args:
        num_envs: N, the number of rows (episodes per batch).
        task: Task name, config mapping or :class:`~rlfb.envs.tasks.Task` ("sentiment", "arithmetic", "dataset").
        model: Model name or path whose tokenizer the environment uses (the model itself is never loaded).
        tokenizer: A ready tokenizer instead of ``model``.
        rewards: Anything :class:`rlfb.rewards.RewardSet` accepts, or a RewardSet; default: the task's.
        max_new_tokens: Tokens per episode before truncation.
        max_prompt_tokens: Width of the prompt region; longer prompts are left-truncated (counted, warned
            once). Default: 64, or less when the tokenizer's context window needs room for max_new_tokens.
        group_size: Consecutive groups of this many rows share one prompt (group-baseline agents).
        split: "train" or "eval": where prompts are drawn from (a reset option can override it once).
        device: "auto" (CUDA when available), "cpu", "cuda", ... Put it where the policy model lives.
        dense_reward: Optional per-token reward ``fn(tokens, observation) -> (N,)`` paid on every step.
        vocab_size: Size of the action space; default ``len(tokenizer)``.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, num_envs: int = 1, task: str | Mapping[str, Any] | Task = "sentiment",
                 model: str | None = "rlfb-tiny", *, tokenizer: Any | None = None, rewards: Any = None,
                 max_new_tokens: int = 32, max_prompt_tokens: int | None = None, group_size: int = 1, split: str = "train",
                 device: str | torch.device = "auto", dense_reward: DenseReward | None = None,
                 vocab_size: int | None = None) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
        if group_size < 1 or num_envs % group_size:
            raise ConfigError(f"num_envs ({num_envs}) must be a positive multiple of group_size ({group_size})")
        from rlfb.models.loading import resolve_device

        self.settings = TextEnvSettings.from_kwargs(task, model, tokenizer, rewards, max_prompt_tokens,
                                                    max_new_tokens, split, vocab_size)
        self.num_envs = num_envs
        self.group_size = group_size
        self.device = resolve_device(device)
        self._episodes = TokenEpisodes(self.settings, num_envs, self.device, dense_reward)
        self._prompts = self._episodes.prompts
        self.single_observation_space = observation_space(self.settings)
        self.single_action_space = spaces.Discrete(self.settings.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

    # ---- the things agents read (task, tokenizer, rewards, token ids, lengths: TextEnvProperties) -------
    @property
    def finished(self) -> torch.Tensor:
        """(N,) bool: rows whose episode has ended (or never started)."""
        return ~self._episodes.active

    @property
    def all_finished(self) -> bool:
        """Whether every row's episode has ended."""
        return not bool(self._episodes.active.any())

    # ---- Gymnasium API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Start new episodes on every row (or on the rows of ``options["reset_mask"]``).

        Options:
            split: "train" or "eval" for this reset only.
            prompts: Pin the prompts: one string or row dict (``{"prompt": ..., **columns}``) per group.
            indices: Pin rows of the split by index, one per group (e.g. to sweep the eval split in order).
            reset_mask: (N,) bool NumPy array: reset only these rows (whole groups); the others continue.

        Returns:
            The observation of every row and info ``{"prompt", "prompt_index"}`` (with ``_`` masks) for the
            rows that were reset.
        """
        super().reset(seed=seed)
        options = check_options(options, RESET_OPTIONS)
        row_numbers = self._rows_to_reset(options.get("reset_mask"))
        rows, prompt_index = self._prompts.choose(
            self.np_random, len(row_numbers) // self.group_size, split=options.get("split"),
            indices=options.get("indices"), prompts=options.get("prompts"))
        self._episodes.start(row_numbers, rows, prompt_index, self.group_size)
        reset_rows = np.zeros(self.num_envs, dtype=np.bool_)
        reset_rows[row_numbers] = True
        prompts = np.full(self.num_envs, None, dtype=object)
        prompts[row_numbers] = [self._episodes.rows[row]["prompt"] for row in row_numbers]
        info = {"prompt": prompts, "_prompt": reset_rows,
                "prompt_index": np.where(reset_rows, self._episodes.prompt_index, -1), "_prompt_index": reset_rows.copy()}
        return self._episodes.observation(), info

    def step(self, actions: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                                          dict[str, Any]]:
        """Append one token to every unfinished row.

        Args:
            actions: (N,) token ids (tensor, array or list). Rows that have ended ignore theirs.

        Returns:
            observation, rewards (N,) float32, terminated (N,) bool, truncated (N,) bool (tensors on the
            device) and info. On an episode's last step its reward is the sequence reward (plus any dense
            reward of that token) and info carries, under ``_key`` masks: ``prompt``, ``completion``,
            ``score``, ``length``, ``reward/<label>`` per reward component, and ``token_rewards`` when a
            reward function is dense.
        """
        result = self._episodes.step(actions)
        info = self._episode_end_info(result.ended_rows, result.scores) if result.scores is not None else {}
        return self._episodes.observation(), result.rewards, result.terminated, result.truncated, info

    def take_completions(self, completion_ids: torch.Tensor | np.ndarray) -> Completions:
        """Append whole completions at once, (N, T) token ids: what :meth:`step` on each column in turn
        does to the episodes (each row takes its tokens up to its first EOS or ``max_new_tokens``; the rest
        is padding), with the rows that end scored in one call of the reward functions.

        Not part of Gymnasium's API: the agents' rollout core (:func:`rlfb.agents.rollout.collect_rollout`)
        samples whole completions and hands them over this way. It returns the episodes' scores directly
        (:class:`~rlfb.envs.episodes.Completions`) instead of :meth:`step`'s observation and info arrays.
        """
        return self._episodes.take_completions(completion_ids)

    # ---- helpers ---------------------------------------------------------------------------------------
    def _rows_to_reset(self, reset_mask: Any) -> list[int]:
        if reset_mask is None:
            return list(range(self.num_envs))
        mask = np.asarray(reset_mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"reset option 'reset_mask' must be a bool array of shape ({self.num_envs},), "
                             f"got {mask.dtype} {mask.shape}")
        groups = mask.reshape(-1, self.group_size)
        if not (groups.all(axis=1) | ~groups.any(axis=1)).all():
            raise ValueError(f"reset option 'reset_mask' must cover whole groups of {self.group_size} rows "
                             "(rows of a group share one prompt)")
        if not mask.any():
            raise ValueError("reset option 'reset_mask' selects no row; set at least one True")
        return np.flatnonzero(mask).tolist()

    def _episode_end_info(self, ended_rows: list[int], scores: EpisodeScores) -> dict[str, Any]:
        mask = np.zeros(self.num_envs, dtype=np.bool_)
        mask[ended_rows] = True
        lengths = np.zeros(self.num_envs, dtype=np.int64)
        lengths[ended_rows] = self._episodes.num_tokens[ended_rows].tolist()
        columns: dict[str, np.ndarray] = {
            "prompt": self._object_column(ended_rows, scores.prompts),
            "completion": self._object_column(ended_rows, scores.completions),
            "score": self._float_column(ended_rows, scores.score),
            "length": lengths,
        }
        for name, values in scores.components.items():
            columns[f"reward/{name}"] = self._float_column(ended_rows, values)
        if scores.token_rewards is not None:
            columns["token_rewards"] = self._object_column(
                ended_rows, [np.asarray(values, dtype=np.float64) for values in scores.token_rewards])
        info: dict[str, Any] = {}
        for key, values in columns.items():
            info[key], info[f"_{key}"] = values, mask.copy()
        return info

    def _object_column(self, rows: list[int], values: list[Any]) -> np.ndarray:
        column = np.full(self.num_envs, None, dtype=object)
        for row, value in zip(rows, values, strict=True):
            column[row] = value
        return column

    def _float_column(self, rows: list[int], values: np.ndarray) -> np.ndarray:
        column = np.zeros(self.num_envs, dtype=np.float64)
        column[rows] = values
        return column
