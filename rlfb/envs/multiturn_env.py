"""``MultiTurnEnv`` (``rlfb/MultiTurn-v0``): a conversation as a gymnasium.Env, one whole model turn per step.

The environment side is a :class:`~rlfb.envs.protocol.MultiTurnProtocol` (built-ins: ``calculator``,
``guess_number``; see :mod:`rlfb.envs.builtin_protocols`). Its batched form,
:class:`~rlfb.envs.multiturn_vector_env.MultiTurnVectorEnv`, comes from ``gymnasium.make_vec(...,
vectorization_mode="vector_entry_point")``. Token layout and rendering: :mod:`rlfb.envs.conversation`.

Example:
    >>> import gymnasium as gym, rlfb
    >>> env = gym.make("rlfb/MultiTurn-v0", protocol="calculator", model="rlfb-tiny", action_type="text",
    ...                charset="0123456789+<>/calc ")
    >>> obs, info = env.reset(seed=0, options={"prompt": {"prompt": "17+25=", "answer": "42"}})
    >>> obs, reward, terminated, truncated, info = env.step("<calc>17+25</calc>")
    >>> info["reply"], reward, terminated
    ('42', 0.0, False)
    >>> obs, reward, terminated, truncated, info = env.step("42")
    >>> reward, terminated, truncated, info["used_tool"]
    (1.0, True, False, True)
    >>> print(env.unwrapped.render_text())
    17+25=<calc>17+25</calc><|endoftext|>
    42
    42<|endoftext|>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

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

__all__ = ["MultiTurnEnv"]

RESET_OPTIONS = ("split", "prompt", "index")


class MultiTurnEnv(gym.Env[dict[str, np.ndarray], Any]):
    """One episode = one conversation between the model and a protocol; one step = one whole model turn.

    * Observation: ``{"input_ids", "attention_mask"}``, int64 arrays of ``max_context_tokens`` columns: the
      conversation so far (opening, model turns, replies), **left-padded** so that it ends at the last
      column, where the next turn continues (the observation is a ready prompt for a sampler).
      ``attention_mask`` is 1 exactly on the conversation's tokens. A ``Box`` per key (not ``Sequence``):
      fixed shapes batch into ``(N, max_context_tokens)`` arrays and pass ``check_env``.
    * Action with ``action_type="tokens"``: ``MultiDiscrete([vocab_size] * max_turn_tokens)``, the turn's
      token ids; the turn is the tokens up to and including the first EOS (the rest is ignored; a shorter
      1-D sequence is accepted). A turn without EOS is a turn cut at its length: it still counts.
    * Action with ``action_type="text"``: a string of ``Text(max_chars, charset=charset)``; its tokens plus
      EOS become the turn, and the protocol sees the text exactly as given.
    * Reward: the protocol's reward for the turn; on the last step, plus the score of ``rewards`` (if any).
    * ``terminated``: the protocol said done. ``truncated`` (otherwise): ``max_turns`` turns taken, or
      ``max_model_tokens`` model tokens taken, or no room left in the context window (a turn longer than the
      room left is cut to it; a reply that does not fit is dropped). ``info["truncation"]`` says which.
    * ``info``: see docs/envs.md (turn and reply texts, ``reward/<name>`` components, ``model_spans`` /
      ``reply_spans`` and ``model_token_mask`` (which tokens were the model's), the episode's texts at the end).

    Args:
        protocol: A registered protocol name ("calculator", "guess_number"), a protocol class or object.
        task: Task name, config mapping or Task; default: the protocol's ``default_task``.
        model: Model name or path whose tokenizer is used (the model itself is never loaded).
        tokenizer: A ready tokenizer instead of ``model``.
        protocol_options: Keyword options for a protocol given by name or class.
        rewards: Reward functions (anything :class:`rlfb.rewards.RewardSet` accepts) that score each finished
            episode once; default none: the protocol's rewards only.
        action_type: "tokens" or "text".
        max_turns: Model turns before truncation (>= 1).
        max_turn_tokens: Tokens of one turn (the action's length); below the context window.
        max_model_tokens: Model tokens over the whole episode before truncation; None = no cap.
        max_context_tokens: The context window: the conversation's longest length; default the tokenizer's
            ``model_max_length`` when it states one (64 for rlfb-tiny), else 256.
        split: "train" or "eval": where task rows are drawn from.
        use_chat_template: None (use the tokenizer's chat template when it has one), True or False.
        reply_template: Plain rendering of a reply (no chat template), a format string with ``{reply}``.
        charset: Characters of the text action space; each must survive tokenize -> decode (default:
            printable ASCII without tabs and newlines).
        max_chars: Longest text action (default ``max_turn_tokens``).
        vocab_size: Size of the token action space; default ``len(tokenizer)``.
        render_mode: None or "ansi" (``render()`` returns the conversation as text).
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, protocol: str | MultiTurnProtocol[Any] | type[MultiTurnProtocol[Any]] = "calculator",
                 task: str | Mapping[str, Any] | Task | None = None, model: str | None = "rlfb-tiny", *,
                 tokenizer: Any | None = None, protocol_options: Mapping[str, Any] | None = None,
                 rewards: Any = None, action_type: str = "tokens", max_turns: int = 8, max_turn_tokens: int = 24,
                 max_model_tokens: int | None = None, max_context_tokens: int | None = None, split: str = "train",
                 use_chat_template: bool | None = None, reply_template: str = "\n{reply}\n",
                 charset: str | None = None, max_chars: int | None = None, vocab_size: int | None = None,
                 render_mode: str | None = None) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; supported: {self.metadata['render_modes']}")
        self.settings = MultiTurnSettings.from_kwargs(
            protocol=protocol, protocol_options=protocol_options, task=task, model=model, tokenizer=tokenizer,
            rewards=rewards, action_type=action_type, max_turns=max_turns, max_turn_tokens=max_turn_tokens,
            max_model_tokens=max_model_tokens, max_context_tokens=max_context_tokens, split=split,
            use_chat_template=use_chat_template, reply_template=reply_template, charset=charset,
            max_chars=max_chars, vocab_size=vocab_size)
        self.render_mode = render_mode
        self.observation_space = self.settings.observation_space()  # type: ignore[assignment]
        self.action_space = self.settings.action_space()
        self._scorer = FinalScorer(self.settings)
        self._conversation: Conversation | None = None
        self._warned = False
        self.num_truncated_openings = 0

    @property
    def protocol(self) -> MultiTurnProtocol[Any]:
        """The protocol that answers the model's turns."""
        return self.settings.protocol

    @property
    def tokenizer(self) -> Any:
        """The tokenizer."""
        return self.settings.tokenizer

    @property
    def conversation(self) -> Conversation | None:
        """The current episode (tokens, segments, texts, the protocol's state); None before the first reset."""
        return self._conversation

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a conversation on a task row drawn from ``self.np_random``; the protocol opens it with the same generator.

        Options:
            split: "train" or "eval" for this episode.
            prompt: Pin the row: a string or a row dict ``{"prompt": ..., **columns}``.
            index: Pin the row of the split by index.
        """
        super().reset(seed=seed)
        options = check_options(options, RESET_OPTIONS)
        row, prompt_index = choose_row(self.settings.task, self.settings.split, self.np_random, options)
        self._conversation = Conversation.open(self.settings, row, prompt_index, self.np_random)
        self.num_truncated_openings += self._conversation.opening_was_truncated
        self._warned = warn_truncated_opening(self._conversation, self._warned)
        return self._conversation.observation(), self._conversation.reset_info()

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Take one model turn; the protocol replies. See the class docstring for rewards and ends."""
        conversation = self._conversation
        if conversation is None or not conversation.active:
            raise RuntimeError("the episode has ended (or was never started); call reset() first")
        turn_ids, text = self.settings.read_action(action)
        result = conversation.take_turn(turn_ids, text)
        reward = result.reward
        info = conversation.step_info(result)
        if not conversation.active:
            final_reward, final_info = self._scorer.score([conversation])[0]
            reward += final_reward
            info.update(final_info)
        return conversation.observation(), float(reward), result.terminated, result.truncated, info

    def render(self) -> str | None:
        """With ``render_mode="ansi"``: the conversation so far as text (see :meth:`render_text`)."""
        return self.render_text() if self.render_mode == "ansi" else None

    def render_text(self) -> str:
        """The conversation so far, decoded with its special tokens (so each turn's end shows)."""
        if self._conversation is None:
            return ""
        return self.settings.tokenizer.decode(self._conversation.tokens, skip_special_tokens=False)
