"""Exceptions rlfb raises for problems a user can fix.

The CLI prints these as one clear line instead of a traceback. Every message names what was wrong,
the offending value, and what to do about it.
"""

from __future__ import annotations


class RlfbError(Exception):
    """Base class of the errors a user can act on."""


class ConfigError(RlfbError, ValueError):
    """A run config has an unknown key, a wrong type or an invalid value."""


class ModelNotFoundError(RlfbError, FileNotFoundError):
    """A model name is neither a built-in model, a local directory, nor a reachable hub id."""


class RewardError(RlfbError, RuntimeError):
    """A reward function raised, or returned something rlfb cannot use (wrong length, NaN, inf)."""


class DatasetError(RlfbError, ValueError):
    """A task's prompt source is empty, unreadable or lacks the prompt column."""


class DivergedModelError(RlfbError, FloatingPointError):
    """The model's next-token probabilities are NaN or inf: its weights or logits have diverged."""
