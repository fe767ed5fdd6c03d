"""Adapters for libraries rlfb did not write, each an optional extra.

* :mod:`rlfb.integrations.reasoning_gym`: reasoning-gym's datasets as tasks, scored by its ``score_answer``
  (``pip install 'rlfb[reasoning-gym]'``).
* :mod:`rlfb.integrations.textarena`: TextArena's single-player games as protocols of ``rlfb/MultiTurn-v0``
  (``pip install 'rlfb[textarena]'``).

Importing an adapter registers its task, reward or protocol; the library itself is imported only when one
is used, and its absence is a one-line error naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from rlfb.errors import ConfigError

__all__ = ["import_optional"]


def import_optional(module: str, extra: str, needed_by: str, package: str | None = None) -> Any:
    """Import ``module``, or raise a ConfigError naming what needs it, the package (default: the extra's
    name) and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{needed_by} needs the {package or extra} package ({error}); install it with "
                          f"pip install 'rlfb[{extra}]'") from None
