"""Fixtures of the model tests: an empty RLFB_HOME, and a small rlfb-tiny built once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfb.models import builtin


@pytest.fixture
def rlfb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty RLFB_HOME (where built-in models are cached) for this test."""
    monkeypatch.setenv("RLFB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the model of the test module's ``TINY`` recipe, built once for the module."""
    output = tmp_path_factory.mktemp("tiny")
    builtin.build_model(request.module.TINY, output, progress=False)
    return output
