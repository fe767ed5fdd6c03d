"""The engine of ``rlfb/MultiTurn-v0``: settings, rendering texts into tokens, one conversation's state.

A conversation is a list of token segments, in order: the **opening** (the protocol's first message),
then alternately a **model turn** (the action's tokens, verbatim) and an **environment reply**. Each
segment is tokenized on its own (no merges across segment boundaries), so the observation holds exactly
the tokens the model produced and the tokens it was shown, and :meth:`Conversation.spans` says which is
which.

Rendering (:class:`TurnRenderer`):

* with a chat template (the tokenizer has one and ``use_chat_template`` is not False): the opening is
  ``apply_chat_template([{"role": "user", "content": opening}], add_generation_prompt=True)``; a reply is
  what the template adds for a user message after an assistant message, generation prompt included, and
  it starts by closing the model's turn the way the template closes an assistant message (after the
  end-of-turn token when the model emitted it; the whole closing text when its turn was cut short).
  For prefix-stable templates (ChatML, Llama 3, ...) the observation decodes to exactly the template's
  rendering of the conversation (a test checks it).
* plain (no template, e.g. rlfb-tiny): the opening as text (the tokenizer's special tokens added), each
  model turn verbatim, each reply as ``reply_template.format(reply=text)`` (default ``"\\n{reply}\\n"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces

from rlfb.envs.core import PromptTruncationWarning, resolve_tokenizer
from rlfb.envs.protocol import MultiTurnProtocol, Reply, make_protocol
from rlfb.envs.tasks import SPLITS, Task, make_task
from rlfb.errors import ConfigError

if TYPE_CHECKING:
    from rlfb.rewards import RewardSet

__all__ = ["ACTION_TYPES", "DEFAULT_REPLY_TEMPLATE", "TRUNCATION_REASONS", "Conversation", "FinalScorer",
           "MultiTurnSettings", "TurnRenderer", "TurnResult", "choose_row", "warn_truncated_opening"]

ACTION_TYPES = ("tokens", "text")
DEFAULT_REPLY_TEMPLATE = "\n{reply}\n"
# Why an episode was truncated, in the order they are checked when several hold on one step.
TRUNCATION_REASONS = ("turn_cap", "token_cap", "context_window")
# Context window when the tokenizer states none (its model_max_length is then a huge placeholder).
DEFAULT_CONTEXT_TOKENS = 256
_UNSET_MODEL_MAX_LENGTH = 1_000_000
# Stands for the assistant's text when the chat template is rendered once to find how it closes a turn.
_ASSISTANT_MARKER = "RLFB_ASSISTANT_TURN"


class TurnRenderer:
    """Tokenizes the opening and the replies, with the tokenizer's chat template or plain separators.

    Args:
        tokenizer: The tokenizer.
        use_chat_template: True / False, or None for "when the tokenizer has one".
        reply_template: Plain rendering of a reply: a format string with ``{reply}``.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool | None, reply_template: str) -> None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ConfigError("use_chat_template=True but the tokenizer has no chat template; set "
                              "tokenizer.chat_template, or leave use_chat_template=None for plain rendering")
        if "{reply}" not in reply_template:
            raise ConfigError(f"reply_template must contain '{{reply}}', got {reply_template!r}")
        self.tokenizer = tokenizer
        self.chat = has_template if use_chat_template is None else use_chat_template
        self.reply_template = reply_template
        if self.chat:
            self._base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _ASSISTANT_MARKER}]
            self._base_text = self._render(self._base, generation_prompt=False)
            if _ASSISTANT_MARKER not in self._base_text:
                raise ConfigError("the chat template does not show an assistant message's content; "
                                  "use_chat_template=False renders the conversation as plain text")
            self._closing = self._base_text[self._base_text.rindex(_ASSISTANT_MARKER) + len(_ASSISTANT_MARKER):]
            eos = tokenizer.eos_token or ""
            self._closing_after_eos = self._closing[len(eos):] if eos and self._closing.startswith(eos) \
                else self._closing

    def opening_ids(self, text: str) -> list[int]:
        """The opening's tokens (with the generation prompt when a template is used); never empty."""
        if self.chat:
            rendered = self._render([{"role": "user", "content": text}], generation_prompt=True)
            ids = list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tokenizer(text)["input_ids"])
        if not ids:  # an empty opening still needs a token for the model to continue
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else self.tokenizer.eos_token_id]
        return ids

    def reply_ids(self, text: str, turn_closed: bool) -> list[int]:
        """The tokens of a reply; ``turn_closed``: the model's turn ended with its end-of-turn token."""
        if not self.chat:
            return list(self.tokenizer(self.reply_template.format(reply=text), add_special_tokens=False)["input_ids"])
        rendered = self._render([*self._base, {"role": "user", "content": text}], generation_prompt=True)
        if not rendered.startswith(self._base_text):
            raise ConfigError("the chat template renders earlier messages differently once a user message follows "
                              "(not prefix-stable), so replies cannot be appended token-exactly; use "
                              "use_chat_template=False")
        closing = self._closing_after_eos if turn_closed else self._closing
        return list(self.tokenizer(closing + rendered[len(self._base_text):], add_special_tokens=False)["input_ids"])

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt))


@dataclass
class MultiTurnSettings:
    """Everything a multi-turn environment derives from its keyword arguments, checked once."""

    task: Task
    protocol: MultiTurnProtocol[Any]
    tokenizer: Any
    renderer: TurnRenderer
    rewards: RewardSet | None
    action_type: str
    charset: str
    max_chars: int
    max_turns: int
    max_turn_tokens: int
    max_model_tokens: int | None
    max_context_tokens: int
    split: str
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    @classmethod
    def from_kwargs(cls, *, protocol: Any, protocol_options: Mapping[str, Any] | None, task: Any, model: str | None,
                    tokenizer: Any | None, rewards: Any, action_type: str, max_turns: int, max_turn_tokens: int,
                    max_model_tokens: int | None, max_context_tokens: int | None, split: str,
                    use_chat_template: bool | None, reply_template: str, charset: str | None, max_chars: int | None,
                    vocab_size: int | None) -> MultiTurnSettings:
        if action_type not in ACTION_TYPES:
            raise ConfigError(f"unknown action_type {action_type!r}; expected one of {list(ACTION_TYPES)}")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {max_turns}")
        if max_model_tokens is not None and max_model_tokens < 1:
            raise ConfigError(f"max_model_tokens must be >= 1 (or None for no cap), got {max_model_tokens}")
        made_protocol = make_protocol(protocol, protocol_options)
        if task is None:
            if made_protocol.default_task is None:
                raise ConfigError(f"protocol {type(made_protocol).__name__} has no default task; pass task=")
            task = made_protocol.default_task
        tokenizer = resolve_tokenizer(model, tokenizer)
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token (it ends a model turn)")
        context = _context_window(tokenizer, max_context_tokens)
        if not 1 <= max_turn_tokens < context:
            raise ConfigError(f"max_turn_tokens must be in [1, {context}) (the context window is "
                              f"{context} tokens), got {max_turn_tokens}")
        eos_token_id = int(tokenizer.eos_token_id)
        pad_token_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_token_id
        charset = _checked_charset(tokenizer, charset) if action_type == "text" else ""
        rewards_set = None
        if rewards is not None:
            from rlfb.rewards import RewardSet

            rewards_set = RewardSet.coerce(rewards)
        return cls(task=make_task(task), protocol=made_protocol, tokenizer=tokenizer,
                   renderer=TurnRenderer(tokenizer, use_chat_template, reply_template), rewards=rewards_set,
                   action_type=action_type, charset=charset,
                   max_chars=max_turn_tokens if max_chars is None else max_chars, max_turns=max_turns,
                   max_turn_tokens=max_turn_tokens, max_model_tokens=max_model_tokens, max_context_tokens=context,
                   split=split, vocab_size=int(vocab_size) if vocab_size is not None else len(tokenizer),
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def observation_space(self) -> spaces.Dict:
        """``input_ids`` / ``attention_mask``: int64 arrays of ``max_context_tokens`` columns, left-padded."""
        length = self.max_context_tokens
        return spaces.Dict({
            "input_ids": spaces.Box(0, self.vocab_size - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        })

    def action_space(self) -> spaces.Space[Any]:
        """One whole turn: ``max_turn_tokens`` token ids, or a string of the charset."""
        if self.action_type == "tokens":
            return spaces.MultiDiscrete(np.full(self.max_turn_tokens, self.vocab_size, dtype=np.int64))
        return spaces.Text(max_length=self.max_chars, min_length=0, charset=self.charset)

    def read_action(self, action: Any) -> tuple[list[int], str | None]:
        """The turn's token ids (at most ``max_turn_tokens``) and, for a text action, its text.

        Token actions: the tokens up to and including the first EOS (a shorter 1-D sequence is accepted).
        Text actions: the text's tokens followed by EOS, as if the model had written it and stopped.
        """
        if self.action_type == "text":
            text = self._checked_text(action)
            ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], self.eos_token_id]
            if len(ids) > self.max_turn_tokens:
                return ids[: self.max_turn_tokens], None  # cut: the protocol gets the text of what was kept
            return ids, text
        tokens = np.asarray(action)
        limit = self.max_turn_tokens
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or not 1 <= tokens.size <= limit:
            raise ValueError(f"a tokens action is a 1-D sequence of 1 to {limit} integer token ids, got {action!r}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            bad = tokens[(tokens < 0) | (tokens >= self.vocab_size)].tolist()
            raise ValueError(f"token ids {bad} out of range: a token id must be in [0, {self.vocab_size})")
        ids = tokens.tolist()
        return (ids[: ids.index(self.eos_token_id) + 1] if self.eos_token_id in ids else ids), None

    def _checked_text(self, action: Any) -> str:
        if not isinstance(action, str):
            raise ValueError(f"a text action is a string, got {type(action).__name__} {action!r}")
        if len(action) > self.max_chars:
            raise ValueError(f"the text action has {len(action)} characters; at most {self.max_chars} allowed "
                             "(max_chars)")
        outside = sorted(set(action) - set(self.charset))
        if outside:
            raise ValueError(f"the text action uses characters outside the charset: {outside}; widen charset=")
        return action


def _context_window(tokenizer: Any, max_context_tokens: int | None) -> int:
    stated = getattr(tokenizer, "model_max_length", None)
    stated = stated if isinstance(stated, int) and stated < _UNSET_MODEL_MAX_LENGTH else None
    if max_context_tokens is None:
        return stated if stated is not None else DEFAULT_CONTEXT_TOKENS
    if max_context_tokens < 2:
        raise ConfigError(f"max_context_tokens must be >= 2, got {max_context_tokens}")
    if stated is not None and max_context_tokens > stated:
        raise ConfigError(f"max_context_tokens={max_context_tokens} exceeds the model's context window of {stated} "
                          "tokens; lower it (or leave it None to use the whole window)")
    return max_context_tokens


def _checked_charset(tokenizer: Any, charset: str | None) -> str:
    """The text-action charset; every character must survive tokenize -> decode without an unknown token."""
    from rlfb.envs.completion_env import DEFAULT_CHARSET

    charset = DEFAULT_CHARSET if charset is None else charset
    if not charset:
        raise ConfigError("charset must not be empty")
    unknown = tokenizer.unk_token_id
    lost = []
    for character in dict.fromkeys(charset):
        ids = tokenizer(character, add_special_tokens=False)["input_ids"]
        if not ids or (unknown is not None and unknown in ids) or tokenizer.decode(ids) != character:
            lost.append(character)
    if lost:
        raise ConfigError(f"the tokenizer cannot write the charset's characters {lost} (they do not survive "
                          "tokenize -> decode); leave them out of charset=")
    return "".join(dict.fromkeys(charset))


def choose_row(task: Task, split: str, rng: np.random.Generator,
               options: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The task row of a reset (options ``split``, ``prompt``, ``index``) and its index (-1 when pinned).

    A random row is ``rng.choice(len(rows))``, so a seeded reset replays the same row.
    """
    split = options.get("split") or split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    prompt, index = options.get("prompt"), options.get("index")
    if prompt is not None and index is not None:
        raise ValueError("pin the row either by 'prompt' or by 'index' in one reset, not both")
    if prompt is not None:
        if isinstance(prompt, str):
            return {"prompt": prompt}, -1
        if isinstance(prompt, Mapping) and isinstance(prompt.get("prompt"), str):
            return dict(prompt), -1
        raise ValueError(f"reset option 'prompt' must be a string or a mapping with a 'prompt' string, got {prompt!r}")
    rows = getattr(task, split)
    if index is None:
        index = int(rng.choice(len(rows)))
    elif not 0 <= int(index) < len(rows):
        raise ValueError(f"reset option 'index' {index} out of range for the {split} split of task {task.name!r} "
                         f"({len(rows)} rows)")
    return dict(rows[int(index)]), int(index)


@dataclass
class TurnResult:
    """What one model turn did to a conversation."""

    reward: float
    terminated: bool
    truncated: bool
    reply: Reply
    truncation: str = ""  # one of TRUNCATION_REASONS when truncated


@dataclass
class Conversation:
    """One episode: the tokens so far, their segments, the texts, the protocol's state.

    Use :meth:`open` to start one and :meth:`take_turn` for each model turn.
    """

    settings: MultiTurnSettings
    row: dict[str, Any]
    prompt_index: int
    opening: str
    state: Any
    tokens: list[int]
    opening_was_truncated: bool = False
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (role, start, end), positions
    turns: list[str] = field(default_factory=list)
    turn_ids: list[list[int]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    num_model_tokens: int = 0
    active: bool = True
    truncation: str = ""

    @classmethod
    def open(cls, settings: MultiTurnSettings, row: dict[str, Any], prompt_index: int,
             rng: np.random.Generator) -> Conversation:
        """Start an episode on ``row``: the protocol opens it with ``rng``; the opening is tokenized.

        An opening longer than ``max_context_tokens - 1`` keeps its last tokens (room for one model token).
        """
        opening, state = settings.protocol.start(row, rng)
        if not isinstance(opening, str):
            raise TypeError(f"{type(settings.protocol).__name__}.start must return (opening text, state); the "
                            f"opening is {type(opening).__name__} {opening!r}")
        ids = settings.renderer.opening_ids(opening)
        keep = settings.max_context_tokens - 1
        conversation = cls(settings, row, prompt_index, opening, state, ids[-keep:], len(ids) > keep)
        conversation.segments.append(("opening", 0, len(conversation.tokens)))
        return conversation

    def take_turn(self, turn_ids: list[int], text: str | None) -> TurnResult:
        """Append one model turn, ask the protocol for its reply, append the reply, apply the caps.

        The turn is cut to the room left (context window, token cap). The reply is appended when the
        episode goes on or the reply has text, and only if it fits whole. ``truncated`` (when not
        terminated) names the first cap that holds: ``max_turns`` turns taken ("turn_cap"),
        ``max_model_tokens`` model tokens taken ("token_cap"), or no room left for a model token after
        the reply, or the reply did not fit ("context_window").
        """
        settings = self.settings
        room = settings.max_context_tokens - len(self.tokens)
        if settings.max_model_tokens is not None:
            room = min(room, settings.max_model_tokens - self.num_model_tokens)
        if len(turn_ids) > room:
            turn_ids, text = turn_ids[:room], None
        if text is None:
            text = settings.tokenizer.decode(turn_ids, skip_special_tokens=True)
        self._append("model", turn_ids)
        self.turns.append(text)
        self.turn_ids.append(list(turn_ids))
        self.num_model_tokens += len(turn_ids)

        reply = settings.protocol.respond(self.state, text)
        if not isinstance(reply, Reply):
            raise TypeError(f"{type(settings.protocol).__name__}.respond must return a Reply, got "
                            f"{type(reply).__name__} {reply!r}")
        reply = reply.checked(settings.protocol)
        self.replies.append(reply.text)
        terminated = reply.done
        reply_fits = True
        if not terminated or reply.text:
            turn_closed = bool(turn_ids) and turn_ids[-1] == settings.eos_token_id
            reply_ids = settings.renderer.reply_ids(reply.text, turn_closed)
            reply_fits = len(self.tokens) + len(reply_ids) <= settings.max_context_tokens
            if reply_fits:
                self._append("env", reply_ids)

        truncation = ""
        if not terminated:
            if len(self.turns) >= settings.max_turns:
                truncation = "turn_cap"
            elif settings.max_model_tokens is not None and self.num_model_tokens >= settings.max_model_tokens:
                truncation = "token_cap"
            elif not reply_fits or len(self.tokens) >= settings.max_context_tokens:
                truncation = "context_window"
        self.truncation = truncation
        self.active = not (terminated or truncation)
        return TurnResult(reply.reward, terminated, bool(truncation), reply, truncation)

    def _append(self, role: str, ids: Sequence[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(int(token) for token in ids)
        self.segments.append((role, start, len(self.tokens)))

    # ---- what the environment hands out (fresh objects on every call) ----------------------------------
    def observation(self) -> dict[str, np.ndarray]:
        """The conversation left-padded into ``max_context_tokens`` columns (it ends at the last column)."""
        settings = self.settings
        width = settings.max_context_tokens
        input_ids = np.full(width, settings.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros(width, dtype=np.int64)
        input_ids[width - len(self.tokens):] = self.tokens
        attention_mask[width - len(self.tokens):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def spans(self, role: str) -> list[tuple[int, int]]:
        """``[start, end)`` positions (0 = the opening's first token) of the segments of ``role``."""
        return [(start, end) for kind, start, end in self.segments if kind == role]

    def model_token_mask(self) -> np.ndarray:
        """(max_context_tokens,) int64, aligned with the observation's columns: 1 on the model's tokens."""
        width = self.settings.max_context_tokens
        offset = width - len(self.tokens)
        mask = np.zeros(width, dtype=np.int64)
        for start, end in self.spans("model"):
            mask[offset + start: offset + end] = 1
        return mask

    def layout_info(self) -> dict[str, Any]:
        """The info entries that describe the tokens: length, spans and the model-token mask."""
        return {"length": len(self.tokens), "model_spans": self.spans("model"), "reply_spans": self.spans("env"),
                "model_token_mask": self.model_token_mask()}

    def reset_info(self) -> dict[str, Any]:
        """The info of the reset that opened this conversation."""
        return {"prompt": self.row["prompt"], "prompt_index": self.prompt_index, "opening": self.opening,
                **self.layout_info()}

    def step_info(self, result: TurnResult) -> dict[str, Any]:
        """The info of the step that produced ``result`` (episode-end entries included when it ended)."""
        info: dict[str, Any] = {"turn": self.turns[-1], "reply": result.reply.text, "num_turns": len(self.turns),
                                "turn_reward": result.reward, **self.layout_info()}
        for name, value in result.reply.components.items():
            info[f"reward/{name}"] = value
        self._merge(info, result.reply.info, "respond")
        if not self.active:
            info.update({"opening": self.opening, "turns": list(self.turns), "replies": list(self.replies),
                         "truncation": self.truncation})
            self._merge(info, self.settings.protocol.finish(self.state), "finish")
        return info

    def _merge(self, info: dict[str, Any], extra: Mapping[str, Any], method: str) -> None:
        clash = sorted(set(extra) & set(info))
        if clash:
            raise ValueError(f"{type(self.settings.protocol).__name__}.{method} reports info keys {clash} that the "
                             "environment already uses; rename them")
        info.update(extra)


class FinalScorer:
    """Scores finished episodes with the environment's reward functions, once per batch (TRL's contract).

    The reward functions get ``prompts`` (the openings), ``completions`` (each episode's last model turn, its
    final answer), ``completion_ids`` (that turn's tokens), every task column by name, and ``turns`` (every
    model turn's text), ``replies`` (every reply) and ``conversation`` (the text after the opening).
    """

    def __init__(self, settings: MultiTurnSettings) -> None:
        self.settings = settings

    def score(self, conversations: Sequence[Conversation]) -> list[tuple[float, dict[str, Any]]]:
        """Per episode: what the last step adds to its reward, and the info entries ``score``, ``score/<label>``."""
        rewards = self.settings.rewards
        if rewards is None or not conversations:
            return [(0.0, {}) for _ in conversations]
        tokenizer = self.settings.tokenizer
        column_names = dict.fromkeys(self.settings.task.columns)
        for conversation in conversations:
            column_names.update(dict.fromkeys(key for key in conversation.row if key != "prompt"))
        columns = {name: [conversation.row.get(name) for conversation in conversations] for name in column_names}
        after_opening = [conversation.tokens[conversation.segments[0][2]:] for conversation in conversations]
        result = rewards([conversation.opening for conversation in conversations],
                         [conversation.turns[-1] for conversation in conversations],
                         completion_ids=[conversation.turn_ids[-1] for conversation in conversations],
                         **columns,
                         turns=[list(conversation.turns) for conversation in conversations],
                         replies=[list(conversation.replies) for conversation in conversations],
                         conversation=tokenizer.batch_decode(after_opening, skip_special_tokens=True))
        returns = np.nan_to_num(np.asarray(result.total, dtype=np.float64), nan=0.0)
        if result.per_token is not None:
            returns = returns + np.array([float(np.sum(tokens)) for tokens in result.per_token])
        scored = []
        for index in range(len(conversations)):
            info = {"score": float(result.total[index])}
            info.update({f"score/{label}": float(values[index]) for label, values in result.components.items()})
            scored.append((float(returns[index]), info))
        return scored


def warn_truncated_opening(conversation: Conversation, already_warned: bool) -> bool:
    """Warn (once per environment) that an opening lost its first tokens; returns whether it has warned."""
    if conversation.opening_was_truncated and not already_warned:
        warnings.warn(f"an opening is longer than max_context_tokens - 1 = "
                      f"{conversation.settings.max_context_tokens - 1} tokens; keeping its last tokens. Shorten "
                      "the protocol's opening or raise max_context_tokens", PromptTruncationWarning, stacklevel=3)
        return True
    return already_warned
