"""`module:attr` reward names import only trusted modules: the trust is the caller's, checked before importing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rlfb.config import RewardConfig
from rlfb.rewards.registry import TRUST_ALL, ImportTrust, UntrustedImportError, build_reward, resolve
from rlfb.run_directory import reward_specs


@pytest.fixture
def planted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module `planted_reward` that leaves a marker file when imported."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "planted_reward.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "def reward(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_reward", raising=False)
    return marker


def test_an_untrusted_module_is_refused_without_importing_it(planted_module: Path) -> None:
    trust = ImportTrust.only([], source="runs/x/config.yaml")
    with pytest.raises(UntrustedImportError) as error:
        build_reward("planted_reward:reward", trust=trust)
    assert str(error.value) == ("reward 'planted_reward:reward' in runs/x/config.yaml would import and run module "
                                "'planted_reward'; rlfb does not run code a run directory names: if you trust "
                                "it, pass --allow-import planted_reward")
    assert not planted_module.exists() and "planted_reward" not in sys.modules
    with pytest.raises(UntrustedImportError, match="would import and run module 'os'"):
        resolve("os:system", trust)  # already imported, still not the run directory's to call


def test_allowed_modules_and_registered_names_resolve(planted_module: Path) -> None:
    trust = ImportTrust.only(["planted_reward"], source="runs/x/config.yaml")
    assert build_reward("planted_reward:reward", trust=trust)([""], ["a"]) == [1.0]
    assert planted_module.exists()
    nothing_trusted = ImportTrust.only([], source="runs/x/config.yaml")
    assert build_reward("regex", {"pattern": "b"}, trust=nothing_trusted)([""], ["ab", "a"]) == [1.0, 0.0]
    assert ImportTrust.only(["pkg"], "s").allows("pkg.sub") and not ImportTrust.only(["pkg"], "s").allows("pkgx")
    assert TRUST_ALL.allows("anything")


def test_reward_specs_resolve_under_the_callers_trust_and_keep_the_config_label(planted_module: Path) -> None:
    entries = [RewardConfig(name="planted_reward:reward", weight=2.0)]
    with pytest.raises(UntrustedImportError):
        reward_specs(entries, ImportTrust.only([], source="cfg"))
    assert not planted_module.exists()
    (spec,) = reward_specs(entries, TRUST_ALL)
    assert callable(spec.name) and spec.label == "reward" and spec.weight == 2.0
