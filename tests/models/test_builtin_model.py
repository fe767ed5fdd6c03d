"""Building rlfb-tiny: loadable output, reproducibility, and a cache that survives crashes and races.

Every test builds a much smaller variant of the recipe (a few seconds), never the full model.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfb.cli import main
from rlfb.models import builtin

TINY = builtin.TinyModelRecipe(n_documents=400, vocab_size=300, n_layer=1, n_embd=16, n_head=2,
                               n_positions=48, steps=12, batch_size=8, warmup_steps=3, learning_rate=1e-2)


def test_build_output_loads_with_plain_transformers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 1
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    # digits are single tokens, so "17+25=" is 6 tokens whatever the merges learned
    assert tokenizer.convert_ids_to_tokens(tokenizer("17+25=")["input_ids"]) == ["1", "7", "+", "2", "5", "="]
    assert tokenizer.decode(tokenizer("The plot was great.")["input_ids"]) == "The plot was great."
    record = json.loads((tiny_model_dir / builtin.MARKER_FILE).read_text())
    assert record["recipe_hash"] == TINY.fingerprint()
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["weights_sha256"] == builtin.weights_sha256(tiny_model_dir)


def test_pretraining_lowers_the_loss(tiny_model_dir: Path) -> None:
    record = json.loads((tiny_model_dir / builtin.MARKER_FILE).read_text())
    assert record["final_loss"] < 5.0  # log(300) = 5.7 is the loss of a uniform guess


def test_same_recipe_gives_identical_weights_and_another_seed_does_not(tiny_model_dir: Path, tmp_path: Path) -> None:
    again, other_seed = tmp_path / "again", tmp_path / "other"
    again.mkdir()
    other_seed.mkdir()
    builtin.build_model(TINY, again, progress=False)
    builtin.build_model(builtin.TinyModelRecipe(**{**TINY.__dict__, "seed": 1}), other_seed, progress=False)
    assert builtin.weights_sha256(again) == builtin.weights_sha256(tiny_model_dir)
    assert builtin.weights_sha256(other_seed) != builtin.weights_sha256(tiny_model_dir)


def test_cache_lives_under_rlfb_home_and_is_reused(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    assert path.parent == rlfb_home / "models" and path.name == f"rlfb-tiny-{TINY.fingerprint()[:12]}"

    def no_second_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete cache entry was rebuilt")

    monkeypatch.setattr(builtin, "build_model", no_second_build)
    assert builtin.ensure_built("rlfb-tiny", TINY, progress=False) == path
    assert [entry.name for entry in path.parent.iterdir()] == [path.name]  # no staging dirs left behind


def test_half_written_entry_is_rebuilt_not_loaded(rlfb_home: Path) -> None:
    final = builtin.cache_path("rlfb-tiny", TINY)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{ truncated")  # a crash mid-copy: files but no marker
    assert not builtin.is_complete(final, TINY)
    path = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    assert path == final and builtin.is_complete(path, TINY)
    assert AutoModelForCausalLM.from_pretrained(path).config.n_embd == 16


def test_staging_dirs_of_killed_builds_are_removed_and_live_ones_kept(rlfb_home: Path) -> None:
    models = rlfb_home / "models"
    killed = models / ".rlfb-tiny-0123456789ab.tmp-999999999-abc123"  # no such process
    running = models / f".rlfb-tiny-0123456789ab.tmp-{os.getpid()}-def456"
    for staging in (killed, running):
        staging.mkdir(parents=True)
    path = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    assert not killed.exists() and running.exists() and builtin.is_complete(path, TINY)
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)  # readable like any model directory


def test_entry_of_another_recipe_is_not_complete(tiny_model_dir: Path) -> None:
    assert builtin.is_complete(tiny_model_dir, TINY)
    assert not builtin.is_complete(tiny_model_dir, builtin.TinyModelRecipe(**{**TINY.__dict__, "steps": 31}))


def test_concurrent_builds_leave_one_valid_entry(rlfb_home: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(builtin.ensure_built("rlfb-tiny", TINY, progress=False))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert builtin.is_complete(results[0], TINY)
    assert [entry.name for entry in (rlfb_home / "models").iterdir()] == [results[0].name]
    # the entry holds whole, loadable weights
    assert AutoModelForCausalLM.from_pretrained(results[0]).transformer.wte.weight.shape == (300, 16)


def test_publish_keeps_the_entry_of_a_build_that_finished_first(rlfb_home: Path, tmp_path: Path) -> None:
    final = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    winner = json.loads((final / builtin.MARKER_FILE).read_text())["built_at"]
    late = final.parent / ".late-build"
    late.mkdir()
    builtin.build_model(TINY, late, progress=False)
    (late / builtin.MARKER_FILE).write_text(json.dumps({"recipe_hash": TINY.fingerprint(), "built_at": "late"}))
    builtin._publish(late, final, TINY, replace=False)
    assert json.loads((final / builtin.MARKER_FILE).read_text())["built_at"] == winner


def test_rebuild_replaces_the_entry(rlfb_home: Path) -> None:
    first = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    (first / "stale.txt").write_text("from the old build")
    second = builtin.ensure_built("rlfb-tiny", TINY, rebuild=True, progress=False)
    assert second == first and not (second / "stale.txt").exists() and builtin.is_complete(second, TINY)


def test_cli_builds_prints_the_path_and_lists_the_cache(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(builtin.BUILTIN_RECIPES, "rlfb-tiny", TINY)
    assert main(["models", "list"]) == 0
    assert "not built" in capsys.readouterr().out
    assert main(["models", "build", "rlfb-tiny", "--quiet"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(builtin.cache_path("rlfb-tiny", TINY))
    assert main(["models", "list"]) == 0
    assert f"cached  {printed}" in capsys.readouterr().out


def test_cli_unknown_model_lists_the_builtins(rlfb_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "build", "rlfb-huge"]) == 1
    assert "unknown built-in model 'rlfb-huge'; built-in models: rlfb-tiny" in capsys.readouterr().err
