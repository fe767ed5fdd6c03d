"""The reward registry: names -> reward functions or reward factories.

A registered object is either a reward function (``fn(prompts, completions, **kwargs) -> list``) or a
factory that builds one from keyword arguments (a class such as :class:`rlfb.rewards.builtin.LengthReward`,
or a function such as ``trl.rewards.get_repetition_penalty_reward``). :func:`build_reward` tells them
apart by their signature: a callable whose parameters name ``prompts``, ``completions`` or
``completion_ids`` is a reward function; anything else (and every class) is a factory.

Importing a ``package.module:attr`` name runs that module's code, so :func:`resolve` is the one place
such names are imported, and its caller says whose names they are with an :class:`ImportTrust`: the
user's own config file or code trusts every module (:data:`TRUST_ALL`); a config read back from a run
directory trusts only the modules the user allowed (``--allow-import MODULE``), so a run directory
edited by someone else cannot run code by being evaluated or resumed. Registered names never import.

Example:
    >>> from rlfb.rewards import register, list_rewards
    >>> @register("shouting")
    ... def shouting(prompts, completions, **kwargs):
    ...     '''Fraction of upper-case letters in the completion.'''
    ...     return [sum(c.isupper() for c in text) / max(len(text), 1) for text in completions]
    >>> list_rewards()["shouting"]
    'Fraction of upper-case letters in the completion.'
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rlfb.errors import ConfigError

RewardFunction = Callable[..., Any]
"""``fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]`` (or an awaitable of it)."""

_REGISTRY: dict[str, Callable[..., Any]] = {}

# Parameter names that mark a callable as a reward function rather than a factory (TRL's keyword arguments).
_REWARD_PARAMETERS = frozenset({"prompts", "completions", "completion_ids"})

T = TypeVar("T", bound=Callable[..., Any])


class UntrustedImportError(ConfigError):
    """A ``module:attr`` name from a source the user did not vouch for (a run directory) would import code."""


@dataclass(frozen=True)
class ImportTrust:
    """Which modules ``package.module:attr`` names may import, and where the names came from.

    Attributes:
        allowed_modules: modules (with their submodules) that may be imported; None allows any.
        source: where the names were read, for the refusal message (e.g. ``runs/x/config.yaml``).

    Example:
        >>> trust = ImportTrust.only(["my_rewards"], source="runs/x/config.yaml")
        >>> trust.allows("my_rewards.extra"), trust.allows("os")
        (True, False)
    """

    allowed_modules: frozenset[str] | None = None
    source: str = ""

    @classmethod
    def only(cls, modules: Iterable[str], source: str) -> ImportTrust:
        """Trust exactly ``modules`` (e.g. the ``--allow-import`` values) for names read from ``source``."""
        return cls(frozenset(modules), source)

    def allows(self, module_name: str) -> bool:
        """Whether ``module_name`` (or a package above it) is trusted."""
        if self.allowed_modules is None:
            return True
        parts = module_name.split(".")
        return any(".".join(parts[:length]) in self.allowed_modules for length in range(1, len(parts) + 1))

    def check(self, name: str) -> None:
        """Raise unless the reward ``name`` (registered, or ``module:attr``) may be resolved."""
        module_name = name.partition(":")[0]
        if ":" in name and not self.allows(module_name):
            raise UntrustedImportError(
                f"reward {name!r} in {self.source or 'a run directory'} would import and run module "
                f"{module_name!r}; rlfb does not run code a run directory names: if you trust it, pass "
                f"--allow-import {module_name}")


TRUST_ALL = ImportTrust()
"""The trust of names the user wrote themselves (their config file, their code): any module."""


def register(name: str) -> Callable[[T], T]:
    """Register a reward function or reward factory under ``name``.

    Args:
        name: The name configs use (``rewards: [{name: NAME, kwargs: {...}, weight: 1.0}]``).

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered to a different object.
    """

    def decorator(reward: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not reward and _qualified_name(existing) != _qualified_name(reward):
            raise ValueError(f"reward name {name!r} is already registered to {_qualified_name(existing)}; "
                             "choose another name")
        _REGISTRY[name] = reward
        return reward

    return decorator


def list_rewards() -> dict[str, str]:
    """Return every registered reward name with the first line of its docstring, sorted by name."""
    return {name: _summary(_REGISTRY[name]) for name in sorted(_REGISTRY)}


def get_registered(name: str) -> Callable[..., Any]:
    """Return the object registered under ``name``.

    Raises:
        ConfigError: no reward has that name (the message lists the registered names).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown reward {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
                          "(or give a 'package.module:attribute' path)") from None


def resolve(name: str, trust: ImportTrust = TRUST_ALL) -> Callable[..., Any]:
    """Resolve a registered name or a ``package.module:attr`` path to the object it names.

    Args:
        name: the name.
        trust: the modules a path may import (see the module docstring); the default trusts any.

    Raises:
        UntrustedImportError: the path's module is not trusted (nothing is imported).
        ConfigError: the name is unknown or the path does not import.
    """
    if ":" not in name:
        return get_registered(name)
    trust.check(name)
    module_name, _, attribute_path = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward {name!r}: cannot import module {module_name!r} ({error})") from error
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise ConfigError(f"reward {name!r}: module {module_name!r} has no attribute {attribute_path!r}") from None
    if not callable(target):
        raise ConfigError(f"reward {name!r} names a {type(target).__name__}, not a callable")
    return target


def is_reward_function(candidate: Callable[..., Any]) -> bool:
    """Whether ``candidate`` is called with rewards' keyword arguments (as opposed to a factory).

    Classes are always factories. A callable whose signature names ``prompts``, ``completions`` or
    ``completion_ids``, or takes only ``**kwargs``, is a reward function.
    """
    if inspect.isclass(candidate):
        return False
    try:
        parameters = inspect.signature(candidate).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the plain contract
        return True
    names = {parameter.name for parameter in parameters}
    if names & _REWARD_PARAMETERS:
        return True
    return all(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters) and bool(names)


def check_reward_kwargs(target: Callable[..., Any], kwargs: Mapping[str, Any], label: str) -> None:
    """Check, without calling it, that a reward factory accepts ``kwargs`` (a reward function takes any).

    Raises:
        ConfigError: naming the reward, the keyword arguments and what the factory's signature refuses.
    """
    if is_reward_function(target):
        return
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as error:
        raise ConfigError(f"reward {label!r}: bad kwargs {dict(kwargs)}: {error}") from None
    except ValueError:  # no signature to check against: the call will tell
        return


def build_reward(name_or_callable: str | Callable[..., Any], kwargs: Mapping[str, Any] | None = None,
                 trust: ImportTrust = TRUST_ALL) -> RewardFunction:
    """Turn a config entry into a ready reward function.

    Args:
        name_or_callable: A registered name, a ``package.module:attr`` path, or a callable.
        kwargs: For a factory, its constructor arguments; for a reward function, fixed keyword
            arguments bound to every call (``functools.partial``).
        trust: the modules a path may import (see :func:`resolve`).

    Returns:
        A callable following the reward contract.

    Raises:
        ConfigError: the name is unknown, the path does not import or is not trusted, or the factory
            rejects ``kwargs``.
    """
    target = resolve(name_or_callable, trust) if isinstance(name_or_callable, str) else name_or_callable
    kwargs = dict(kwargs or {})
    label = name_or_callable if isinstance(name_or_callable, str) else _qualified_name(target)
    if is_reward_function(target):
        return functools.partial(target, **kwargs) if kwargs else target
    try:
        reward = target(**kwargs)
    except ConfigError:
        raise  # the factory's own message (a missing optional library, ...) names the problem and the fix
    except (TypeError, ValueError) as error:
        raise ConfigError(f"reward {label!r}: bad kwargs {kwargs}: {error}") from error
    if not callable(reward):
        raise ConfigError(f"reward {label!r}: the factory returned a {type(reward).__name__}, not a callable")
    return reward


def _summary(reward: Callable[..., Any]) -> str:
    doc = inspect.getdoc(reward) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(no description)"


def _qualified_name(target: Any) -> str:
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{name}"
