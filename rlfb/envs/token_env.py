"""``TextGenerationEnv`` (``rlfb/TextGeneration-v0``): text generation, one token per step, as a gymnasium.Env.

For any Gymnasium agent. rlfb's own agents use the batched :class:`~rlfb.envs.vector_env.TextGenerationVectorEnv`
(same id, ``gymnasium.make_vec(..., vectorization_mode="vector_entry_point")``), which shares this logic.

Example:
    >>> import gymnasium as gym, rlfb
    >>> env = gym.make("rlfb/TextGeneration-v0", task="arithmetic", model="rlfb-tiny",
    ...                rewards=["exact_match"], max_new_tokens=4)  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
    >>> info["prompt"]  # doctest: +SKIP
    '58+31='
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from rlfb.envs.core import (
    TextEnvProperties,
    TextEnvSettings,
    check_options,
    choose_single_prompt,
    observation_space,
)
from rlfb.envs.episodes import DenseReward, TokenEpisodes
from rlfb.envs.tasks import Task

__all__ = ["TextGenerationEnv"]

RESET_OPTIONS = ("split", "prompt", "index")


class TextGenerationEnv(TextEnvProperties, gym.Env[dict[str, np.ndarray], np.int64]):
    """One episode = one completion of one prompt, built a token per step.

    * Action: ``Discrete(vocab_size)``, the next token id.
    * Observation: ``{"input_ids", "attention_mask"}``, int64 arrays of length
      ``max_prompt_tokens + max_new_tokens``: the prompt left-padded into the first ``max_prompt_tokens``
      columns, then the completion so far, then padding (``attention_mask`` is 1 on real tokens).
    * ``terminated`` when the action is EOS; ``truncated`` after ``max_new_tokens`` tokens.
    * Reward: 0 on every step but the last (plus ``dense_reward`` of each token when given); the last step
      pays the sequence reward of the configured reward functions on the decoded completion, plus the sum
      of the per-token rewards of any dense reward function.
    * ``info`` on reset: ``prompt``, ``prompt_index``. On the last step: ``prompt``, ``completion``, ``score``
      (the RewardSet's weighted total; NaN if no reward scored it), ``reward/<label>`` per component and,
      for dense reward functions, ``token_rewards`` (one value per token taken).

    Args:
        task: Task name, config mapping or Task ("sentiment", "arithmetic", "dataset").
        model: Model name or path whose tokenizer is used (the model itself is never loaded).
        tokenizer: A ready tokenizer instead of ``model``.
        rewards: Anything :class:`rlfb.rewards.RewardSet` accepts, or a RewardSet; default: the task's.
        max_new_tokens: Tokens before truncation (>= 2).
        max_prompt_tokens: Width of the prompt region; longer prompts are left-truncated (counted, warned
            once). Default: 64, or less when the tokenizer's context window needs room for max_new_tokens.
        split: "train" or "eval": where prompts are drawn from.
        dense_reward: Optional per-token reward ``fn(tokens (1,), observation) -> (1,)`` (torch tensors).
        vocab_size: Size of the action space; default ``len(tokenizer)``.
        render_mode: None or "ansi" (``render()`` returns the prompt and completion so far as text).
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, task: str | Mapping[str, Any] | Task = "sentiment", model: str | None = "rlfb-tiny", *,
                 tokenizer: Any | None = None, rewards: Any = None, max_new_tokens: int = 32,
                 max_prompt_tokens: int | None = None, split: str = "train", dense_reward: DenseReward | None = None,
                 vocab_size: int | None = None, render_mode: str | None = None) -> None:
        self._check_render_mode(render_mode)
        self.settings = TextEnvSettings.from_kwargs(task, model, tokenizer, rewards, max_prompt_tokens,
                                                    max_new_tokens, split, vocab_size)
        self.render_mode = render_mode
        self._episodes = TokenEpisodes(self.settings, 1, torch.device("cpu"), dense_reward)
        self._prompts = self._episodes.prompts
        self.observation_space = observation_space(self.settings)  # type: ignore[assignment]
        self.action_space = spaces.Discrete(self.settings.vocab_size)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode on a prompt drawn from ``self.np_random``.

        Options:
            split: "train" or "eval" for this episode.
            prompt: Pin the prompt: a string or a row dict ``{"prompt": ..., **columns}``.
            index: Pin the row of the split by index.
        """
        super().reset(seed=seed)
        options = check_options(options, RESET_OPTIONS)
        rows, prompt_index = choose_single_prompt(self._prompts, self.np_random, options)
        self._episodes.start([0], rows, prompt_index)
        return self._observation(), {"prompt": rows[0]["prompt"], "prompt_index": int(prompt_index[0])}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Append one token; see the class docstring for rewards and info."""
        if not bool(self._episodes.active[0]):
            raise RuntimeError("the episode has ended (or was never started); call reset() first")
        token = np.asarray(action)
        if token.shape != () or not np.issubdtype(token.dtype, np.integer):
            raise ValueError(f"action must be one integer token id, got {action!r}")
        result = self._episodes.step(token.reshape(1))
        info = self._episodes.scorer.info(result.scores, 0) if result.scores is not None else {}
        return (self._observation(), float(result.rewards[0]), bool(result.terminated[0]),
                bool(result.truncated[0]), info)

    def render(self) -> str | None:
        """With ``render_mode="ansi"``: the prompt and the completion so far, decoded."""
        if self.render_mode != "ansi":
            return None
        episodes = self._episodes
        if not episodes.rows[0]:
            return ""
        completion = self.settings.tokenizer.decode(episodes.completion_ids([0])[0])
        return f"{episodes.rows[0]['prompt']}{completion}"

    def _observation(self) -> dict[str, np.ndarray]:
        return {"input_ids": self._episodes.input_ids[0].numpy().copy(),
                "attention_mask": self._episodes.attention_mask[0].numpy().copy()}
