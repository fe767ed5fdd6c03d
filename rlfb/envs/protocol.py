"""The environment side of a multi-turn episode: a small protocol users implement in a few lines.

``rlfb/MultiTurn-v0`` (:mod:`rlfb.envs.multiturn_env`) plays a conversation between the model and a
:class:`MultiTurnProtocol`. The protocol never sees tokens, only text:

* :meth:`MultiTurnProtocol.start` opens an episode from a task row and the environment's random generator:
  it returns the opening text (the first user message) and the episode's state, any object you like;
* :meth:`MultiTurnProtocol.respond` answers one model turn (its text) with a :class:`Reply`: the text
  the environment appends, the turn's reward and named reward components, and whether the episode is done;
* :meth:`MultiTurnProtocol.finish` (optional) reports episode-level metrics once the episode ends, for
  whatever reason (done, turn cap, token cap, context window).

Rendering the texts into tokens (chat template or plain separators), the caps and the token spans are
the environment's job. Reward functions of the TRL contract (:mod:`rlfb.rewards`) can score the finished
episode on top (the environment's ``rewards=`` argument); the per-turn reward is the protocol's.

Example:
    >>> import numpy as np
    >>> class SayTheWord(MultiTurnProtocol[str]):
    ...     '''The environment names a word; the model must say it back.'''
    ...     def start(self, row, rng):
    ...         word = str(rng.choice(["red", "blue", "green"]))
    ...         return f"Say {word}:", word
    ...     def respond(self, state, turn):
    ...         right = turn.strip() == state
    ...         return Reply("yes" if right else f"no, say {state}", reward=float(right), done=right)
    >>> protocol = SayTheWord()
    >>> opening, word = protocol.start({"prompt": ""}, np.random.default_rng(0))
    >>> opening
    'Say green:'
    >>> protocol.respond(word, "red"), protocol.respond(word, " green").done
    (Reply(text='no, say green', reward=0.0, done=False, components={}, info={}), True)
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from rlfb.errors import ConfigError

__all__ = ["MultiTurnProtocol", "Reply", "list_protocols", "make_protocol", "register_protocol"]

State = TypeVar("State")

ProtocolFactory = Callable[..., "MultiTurnProtocol[Any]"]
_PROTOCOLS: dict[str, ProtocolFactory] = {}


@dataclass(frozen=True)
class Reply:
    """The environment's answer to one model turn.

    Attributes:
        text: What the environment says next (appended to the conversation; "" for nothing).
        reward: The turn's reward.
        done: Whether the episode ends here (``terminated`` in Gymnasium's words).
        components: Named parts of the reward, reported as ``info["reward/<name>"]`` (they need not sum
            to ``reward``).
        info: More entries for the step's ``info`` (e.g. ``{"tool_call": True}``).
    """

    text: str
    reward: float = 0.0
    done: bool = False
    components: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def checked(self, protocol: object) -> Reply:
        """This reply with plain Python types, or a clear error naming the protocol and the bad field."""
        name = type(protocol).__name__
        if not isinstance(self.text, str):
            raise TypeError(f"{name}.respond returned a Reply whose text is {type(self.text).__name__}, not str")
        reward = _finite(self.reward, f"{name}.respond: Reply.reward")
        components = {str(key): _finite(value, f"{name}.respond: Reply.components[{key!r}]")
                      for key, value in self.components.items()}
        return Reply(self.text, reward, bool(self.done), components, dict(self.info))


class MultiTurnProtocol(ABC, Generic[State]):
    """Subclass this to make a multi-turn environment: open an episode, answer each model turn.

    One protocol object serves many conversations at once (the vector environment's rows), so keep
    everything that belongs to one episode in the state :meth:`start` returns, not on ``self``.

    Attributes:
        default_task: The task the environment draws rows from when it is given none (e.g. "arithmetic").
    """

    default_task: ClassVar[str | None] = None

    @abstractmethod
    def start(self, row: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, State]:
        """Open an episode.

        Args:
            row: The task row of the episode: ``{"prompt": ..., **extra columns}`` (e.g. ``answer``).
            rng: The environment's generator (``env.np_random``): draw every random choice from it, so a
                seeded reset replays the same episode.

        Returns:
            The opening text (the first user message) and the episode's state.
        """

    @abstractmethod
    def respond(self, state: State, turn: str) -> Reply:
        """Answer one model turn.

        Args:
            state: The episode's state (mutate it as the conversation goes on).
            turn: The model's turn as text (special tokens, such as the end-of-turn token, removed).

        Returns:
            The reply, the turn's reward and whether the episode is done.
        """

    def finish(self, state: State) -> Mapping[str, Any]:
        """Entries for the last step's ``info`` once the episode ends, however it ends; default: none."""
        return {}


def register_protocol(name: str) -> Callable[[ProtocolFactory], ProtocolFactory]:
    """Register a protocol class (or any factory of keyword options) under ``name`` for ``protocol="name"``.

    Example:
        >>> @register_protocol("say_hello")
        ... class SayHello(MultiTurnProtocol[None]):
        ...     '''Pays 1 for saying hello.'''
        ...     def start(self, row, rng):
        ...         return row["prompt"], None
        ...     def respond(self, state, turn):
        ...         return Reply("", reward=float("hello" in turn), done=True)
        >>> type(make_protocol("say_hello")).__name__
        'SayHello'
    """

    def decorator(factory: ProtocolFactory) -> ProtocolFactory:
        _PROTOCOLS[name] = factory
        return factory

    return decorator


def list_protocols() -> dict[str, str]:
    """Registered protocol name -> first line of its docstring."""
    return {name: (inspect.getdoc(factory) or "").splitlines()[0] for name, factory in sorted(_PROTOCOLS.items())}


def make_protocol(protocol: str | MultiTurnProtocol[Any] | type[MultiTurnProtocol[Any]],
                  options: Mapping[str, Any] | None = None) -> MultiTurnProtocol[Any]:
    """A protocol object from a registered name, a protocol class, or a ready object.

    Args:
        protocol: "calculator", "guess_number", any registered name, a subclass of
            :class:`MultiTurnProtocol`, or an instance (passed through).
        options: Keyword options for the class (not for an instance).

    Raises:
        ConfigError: Unknown name, options for a ready object, or something that is not a protocol.
    """
    options = dict(options or {})
    if isinstance(protocol, MultiTurnProtocol):
        if options:
            raise ConfigError(f"protocol_options {sorted(options)} cannot be applied to a ready "
                              f"{type(protocol).__name__}; pass the class, or configure the object yourself")
        return protocol
    if isinstance(protocol, str):
        if protocol not in _PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; registered: {', '.join(sorted(_PROTOCOLS))}")
        factory: ProtocolFactory = _PROTOCOLS[protocol]
    elif isinstance(protocol, type) and issubclass(protocol, MultiTurnProtocol):
        factory = protocol
    else:
        raise ConfigError(f"protocol must be a registered name, a MultiTurnProtocol subclass or instance; got "
                          f"{type(protocol).__name__} {protocol!r}")
    try:
        made = factory(**options)
    except TypeError as error:
        raise ConfigError(f"protocol {protocol!r}: bad protocol_options {options}: {error}") from error
    if not isinstance(made, MultiTurnProtocol):
        raise ConfigError(f"protocol {protocol!r} made a {type(made).__name__}, not a MultiTurnProtocol")
    return made


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {number}")
    return number
