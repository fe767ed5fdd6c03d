"""The ``Example:`` sections of rlfb's docstrings run, and say what they print."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import rlfb

MODULES = sorted(info.name for info in pkgutil.walk_packages(rlfb.__path__, prefix="rlfb."))
# Adapters whose examples need their optional library (the extra may not be installed).
NEEDS_LIBRARY = {"rlfb.integrations.reasoning_gym": "reasoning_gym", "rlfb.integrations.textarena": "textarena",
                 "rlfb.rewards.reference": "sacrebleu"}


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str) -> None:
    if module_name in NEEDS_LIBRARY:
        pytest.importorskip(NEEDS_LIBRARY[module_name])
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {module_name}"
