"""``CompletionEnv`` (``rlfb/Completion-v0``): one step is a whole completion; the reward comes back at once.

For sequence-level agents (bandit-style methods, evolution strategies, an LLM behind an API, a human):
observe a prompt, answer with a completion, receive its reward. The episode always ends after that one
step (``terminated=True``).

Example:
    >>> import gymnasium as gym, rlfb
    >>> env = gym.make("rlfb/Completion-v0", task="arithmetic", model="rlfb-tiny", rewards=["exact_match"],
    ...                action_type="text")  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    >>> _, reward, terminated, _, info = env.step("89")  # doctest: +SKIP
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rlfb.envs.core import (
    EpisodeScorer,
    PromptSource,
    TextEnvProperties,
    TextEnvSettings,
    check_options,
    choose_single_prompt,
    observation_space,
)
from rlfb.envs.tasks import Task
from rlfb.errors import ConfigError

__all__ = ["DEFAULT_CHARSET", "CompletionEnv"]

RESET_OPTIONS = ("split", "prompt", "index")
ACTION_TYPES = ("tokens", "text")
DEFAULT_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
"""Printable ASCII without tabs and newlines: what the ``text`` action space samples from by default."""


class CompletionEnv(TextEnvProperties, gym.Env[dict[str, np.ndarray], Any]):
    """A prompt in, a whole completion as the action, its reward out.

    * Action with ``action_type="tokens"``: ``MultiDiscrete([vocab_size] * max_new_tokens)``; the completion is
      the tokens up to and including the first EOS (the rest is ignored). A shorter 1-D sequence is accepted.
    * Action with ``action_type="text"``: a string in ``Text(max_chars, charset=charset)``, tokenized for
      the reward functions' ``completion_ids``.
    * Observation: as in ``rlfb/TextGeneration-v0``: ``input_ids`` / ``attention_mask`` of length
      ``max_prompt_tokens + max_new_tokens``, the prompt left-padded, then (after the step) the completion.
    * Reward: the sequence reward plus the sum of any dense per-token rewards. ``info`` holds ``prompt`` and
      ``prompt_index`` on reset; ``prompt``, ``completion``, ``score``, ``reward/<label>`` (and
      ``token_rewards`` for dense rewards) after the step.

    Args:
        task, model, tokenizer, rewards, max_new_tokens, max_prompt_tokens, split, vocab_size: as for
            :class:`~rlfb.envs.token_env.TextGenerationEnv`.
        action_type: "tokens" or "text".
        charset: Characters of the text action space (default :data:`DEFAULT_CHARSET`).
        max_chars: Longest text action (default ``8 * max_new_tokens``).
        render_mode: None or "ansi".
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, task: str | Mapping[str, Any] | Task = "sentiment", model: str | None = "rlfb-tiny", *,
                 tokenizer: Any | None = None, rewards: Any = None, action_type: str = "tokens",
                 max_new_tokens: int = 32, max_prompt_tokens: int | None = None, split: str = "train",
                 charset: str | None = None, max_chars: int | None = None, vocab_size: int | None = None,
                 render_mode: str | None = None) -> None:
        if action_type not in ACTION_TYPES:
            raise ConfigError(f"unknown action_type {action_type!r}; expected one of {list(ACTION_TYPES)}")
        self._check_render_mode(render_mode)
        self.settings = TextEnvSettings.from_kwargs(task, model, tokenizer, rewards, max_prompt_tokens,
                                                    max_new_tokens, split, vocab_size)
        self.action_type = action_type
        self.render_mode = render_mode
        self._prompts = PromptSource(self.settings)
        self._scorer = EpisodeScorer(self.settings)
        self.observation_space = observation_space(self.settings)  # type: ignore[assignment]
        if action_type == "tokens":
            self.action_space: spaces.Space[Any] = spaces.MultiDiscrete(
                np.full(max_new_tokens, self.settings.vocab_size, dtype=np.int64))
        else:
            charset = DEFAULT_CHARSET if charset is None else charset
            if not charset:
                raise ConfigError("charset must not be empty")
            self.action_space = spaces.Text(max_length=max_chars or 8 * max_new_tokens, min_length=0,
                                            charset=charset)
        self._row: dict[str, Any] | None = None
        self._observation: dict[str, np.ndarray] | None = None
        self._text = ""
        self._done = True

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw a prompt from ``self.np_random`` (options ``split``, ``prompt``, ``index`` as for TextGeneration-v0)."""
        super().reset(seed=seed)
        options = check_options(options, RESET_OPTIONS)
        rows, prompt_index = choose_single_prompt(self._prompts, self.np_random, options)
        self._row = rows[0]
        prompt_ids, prompt_mask = self._prompts.encode(rows)
        length = self.settings.max_new_tokens
        self._observation = {
            "input_ids": np.concatenate([prompt_ids[0], np.full(length, self.settings.pad_token_id, np.int64)]),
            "attention_mask": np.concatenate([prompt_mask[0], np.zeros(length, np.int64)]),
        }
        self._text, self._done = "", False
        return self._copy_observation(), {"prompt": self._row["prompt"], "prompt_index": int(prompt_index[0])}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Score one completion; the episode ends (``terminated=True``)."""
        if self._done or self._row is None or self._observation is None:
            raise RuntimeError("the episode has ended (or was never started); call reset() first")
        if self.action_type == "tokens":
            completion_ids, texts = self._token_action(action), None
        else:
            completion_ids, texts = self._text_action(action), [action]
        scores = self._scorer.score([self._row], [completion_ids], texts)
        shown = completion_ids[: self.settings.max_new_tokens]
        start = self.settings.max_prompt_tokens
        self._observation["input_ids"][start:start + len(shown)] = shown
        self._observation["attention_mask"][start:start + len(shown)] = 1
        self._text, self._done = scores.completions[0], True
        return self._copy_observation(), float(scores.returns[0]), True, False, self._scorer.info(scores, 0)

    def render(self) -> str | None:
        """With ``render_mode="ansi"``: the prompt and the completion (once given)."""
        if self.render_mode != "ansi":
            return None
        return "" if self._row is None else f"{self._row['prompt']}{self._text}"

    def _token_action(self, action: Any) -> list[int]:
        tokens = np.asarray(action)
        vocab_size, limit = self.settings.vocab_size, self.settings.max_new_tokens
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or not 1 <= tokens.size <= limit:
            raise ValueError(f"a tokens action is a 1-D sequence of 1 to {limit} integer token ids, got {action!r}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"token ids {tokens[(tokens < 0) | (tokens >= vocab_size)].tolist()} out of range: "
                             f"a token id must be in [0, {vocab_size})")
        ids = tokens.tolist()
        eos = self.settings.eos_token_id
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    def _text_action(self, action: Any) -> list[int]:
        space = self.action_space
        assert isinstance(space, spaces.Text)
        if not isinstance(action, str):
            raise ValueError(f"a text action is a string, got {type(action).__name__} {action!r}")
        if len(action) > space.max_length:
            raise ValueError(f"the text action has {len(action)} characters; at most {space.max_length} allowed "
                             "(max_chars)")
        outside = sorted(set(action) - set(space.characters))
        if outside:
            raise ValueError(f"the text action uses characters outside the charset: {outside}; widen charset=")
        ids = self.settings.tokenizer(action, add_special_tokens=False)["input_ids"]
        return list(ids)

    def _copy_observation(self) -> dict[str, np.ndarray]:
        assert self._observation is not None
        return {key: value.copy() for key, value in self._observation.items()}
