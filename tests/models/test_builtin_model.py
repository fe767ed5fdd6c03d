"""rlfb-tiny: the shipped copy, and building: loadable output, reproducibility, and a cache that survives
crashes, truncation and races.

Every test builds a much smaller variant of the recipe (a few seconds), never the full model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfb.cli import main
from rlfb.errors import ModelNotFoundError
from rlfb.models import builtin, corpus

TINY = builtin.TinyModelRecipe(n_documents=400, vocab_size=300, n_layer=1, n_embd=16, n_head=2,
                               n_positions=48, steps=12, batch_size=8, warmup_steps=3, learning_rate=1e-2)


def entries(models: Path) -> list[str]:
    """The cache's entries and leftovers, without the lock files builds take turns on."""
    return sorted(entry.name for entry in models.iterdir() if not entry.name.endswith(".lock"))


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
    assert entries(path.parent) == [path.name]  # no staging dirs left behind


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


def test_concurrent_builds_build_once_and_share_the_entry(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []
    builds: list[int] = []
    real_build = builtin.build_model
    start_together = threading.Barrier(2)

    def counted_build(*args: object, **kwargs: object) -> object:
        builds.append(threading.get_ident())
        time.sleep(0.3)  # both threads are past their first cache check before either entry exists
        return real_build(*args, **kwargs)

    def build() -> None:
        try:
            start_together.wait()
            results.append(builtin.ensure_built("rlfb-tiny", TINY, progress=False))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    monkeypatch.setattr(builtin, "build_model", counted_build)
    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(builds) == 1  # the second waited on the lock, then used the first one's entry
    assert builtin.is_complete(results[0], TINY)
    assert entries(rlfb_home / "models") == [results[0].name]
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


@pytest.fixture
def shipped_tiny(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shipped copy of the TINY build in a temporary package data dir, with TINY registered as rlfb-tiny."""
    monkeypatch.setitem(builtin.BUILTIN_RECIPES, "rlfb-tiny", TINY)
    monkeypatch.setattr(builtin, "SHIPPED_DIR", tmp_path / "shipped")
    shutil.copytree(tiny_model_dir, tmp_path / "shipped" / "rlfb-tiny")
    return tmp_path / "shipped" / "rlfb-tiny"


def no_build(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built")


def test_rlfb_tiny_loads_the_shipped_copy_with_no_build(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlfb.models.loading import load_model, resolve_model_path

    monkeypatch.setattr(builtin, "build_model", no_build)  # the load time itself: benchmarks/base_model.py
    model, tokenizer = load_model("rlfb-tiny", device="cpu")
    assert resolve_model_path("rlfb-tiny") == str(builtin.shipped_path("rlfb-tiny"))
    assert model.config.n_embd == builtin.BUILTIN_RECIPES["rlfb-tiny"].n_embd and len(tokenizer) == 512
    assert not rlfb_home.exists()  # nothing was written to the cache


@pytest.mark.parametrize("name", sorted(builtin.BUILTIN_RECIPES))
def test_shipped_copy_is_a_build_of_the_registered_recipe_with_its_recorded_weights(name: str) -> None:
    shipped = builtin.shipped_path(name)
    recipe = builtin.BUILTIN_RECIPES[name]
    record = builtin.read_marker(shipped)
    assert record is not None and record["recipe_hash"] == recipe.fingerprint()
    assert record["recipe"] == recipe.fields() and record["torch_version"]
    assert builtin.weights_sha256(shipped) == record["weights_sha256"]
    assert builtin.verify_entry(shipped, recipe) is None
    assert builtin.directory_size(shipped) < 5e6  # a few MB of package data


def test_every_builtin_model_is_listed_with_a_description() -> None:
    from rlfb.models.loading import BUILTIN_MODELS

    assert set(BUILTIN_MODELS) == set(builtin.BUILTIN_RECIPES)


def test_build_goes_to_the_cache_not_the_package_and_says_it_matches(
        rlfb_home: Path, shipped_tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {file.name: file.read_bytes() for file in shipped_tiny.iterdir()}
    assert main(["models", "build", "rlfb-tiny", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(builtin.cache_path("rlfb-tiny", TINY))
    assert "the rebuild matches the shipped weights of rlfb-tiny" in err
    assert {file.name: file.read_bytes() for file in shipped_tiny.iterdir()} == before
    from rlfb.models.loading import resolve_model_path
    assert resolve_model_path("rlfb-tiny") == str(shipped_tiny)  # the name still means the shipped copy


def test_build_that_differs_from_the_shipped_copy_says_how_to_train_on_it(
        rlfb_home: Path, shipped_tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = json.loads((shipped_tiny / builtin.MARKER_FILE).read_text())
    record["weights_sha256"] = "0" * 64  # as if built on another CPU
    (shipped_tiny / builtin.MARKER_FILE).write_text(json.dumps(record))
    assert main(["models", "build", "rlfb-tiny", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "the rebuild differs from the shipped weights of rlfb-tiny" in err
    assert f"`model: rlfb-tiny` still loads the shipped copy; to train on this build, name its directory as " \
           f"the model (`model: {out.strip()}`)" in err


def test_cli_lists_the_shipped_copy_and_the_cache(rlfb_home: Path, shipped_tiny: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"shipped  {shipped_tiny}  ok (" in out and "`rlfb-tiny` loads the shipped copy" in out
    assert "no rebuilds (`rlfb models build rlfb-tiny` builds one into" in out
    entry = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    assert main(["models", "list"]) == 0
    assert f"  {entry.name}  ok (" in (out := capsys.readouterr().out)
    assert out.count("same weights as the shipped copy") == 1


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def test_truncated_entry_is_damaged_listed_so_and_rebuilt_by_name(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    entry = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    size = (entry / "model.safetensors").stat().st_size
    truncate(entry / "model.safetensors")
    assert builtin.verify_entry(entry, TINY) == f"model.safetensors is {size // 2:,} bytes, {size:,} recorded"
    monkeypatch.setitem(builtin.BUILTIN_RECIPES, "rlfb-tiny", TINY)
    assert main(["models", "list"]) == 0
    assert f"{entry.name}  damaged: model.safetensors is {size // 2:,} bytes" in capsys.readouterr().out
    assert builtin.ensure_built("rlfb-tiny", TINY, progress=False) == entry
    assert (entry / "model.safetensors").stat().st_size == size and builtin.is_complete(entry, TINY)


def test_changed_weights_of_the_same_size_fail_the_sha256_check(rlfb_home: Path) -> None:
    entry = builtin.ensure_built("rlfb-tiny", TINY, progress=False)
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    (entry / "model.safetensors").write_bytes(bytes(data))
    assert builtin.verify_entry(entry, TINY, check_weights=False) is None  # sizes alone cannot see it
    assert "the weights' sha256 is" in builtin.verify_entry(entry, TINY)


def test_damaged_shipped_copy_is_reported_not_loaded(rlfb_home: Path, shipped_tiny: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    truncate(shipped_tiny / "model.safetensors")
    monkeypatch.setattr(builtin, "build_model", no_build)
    with pytest.raises(ModelNotFoundError, match=rf"the shipped copy of rlfb-tiny in {shipped_tiny} is damaged "
                                                 r"\(model.safetensors is .* recorded\); reinstall rlfb"):
        builtin.locate("rlfb-tiny")


def test_cli_unknown_model_lists_the_builtins(rlfb_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "build", "rlfb-huge"]) == 1
    assert "unknown built-in model 'rlfb-huge'; built-in models: rlfb-tiny" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["calculator", "game"])
def test_transcripts_are_tokenized_as_the_multi_turn_environment_renders_them(kind: str) -> None:
    # rlfb-tiny-multiturn learns the formats of rlfb/MultiTurn-v0 only if its corpus rows are token for token
    # what the environment shows a model: each part tokenized alone, EOS closing each model turn.
    import random

    import gymnasium as gym
    import numpy as np

    from rlfb.models.loading import load_tokenizer

    tokenizer = load_tokenizer("rlfb-tiny-multiturn")
    if kind == "calculator":
        transcript = corpus.calculator_transcript(17, 25)
        options = {"protocol": "calculator"}
        row = {"prompt": transcript.opening, "answer": "42"}
    else:
        transcript = corpus.guess_game(random.Random(3), 1, 20, careful=True)
        options = {"protocol": "guess_number", "task": "guess_number"}
        secret = int(transcript.turns[-1])  # a range of one number fixes the secret; the replies are the game's
        row = {"prompt": transcript.opening, "low": secret, "high": secret}
    assert len(transcript.turns) >= 2
    [expected] = builtin._encode_documents([transcript], tokenizer, 64)
    env = gym.make("rlfb/MultiTurn-v0", model="rlfb-tiny-multiturn", max_turns=8, max_turn_tokens=16, **options)
    env.reset(seed=0, options={"prompt": row})
    for turn in transcript.turns:
        observation, _, terminated, truncated, _ = env.step(
            np.array(tokenizer(turn)["input_ids"] + [tokenizer.eos_token_id]))
    assert terminated and not truncated
    tokens = observation["input_ids"][observation["attention_mask"] == 1].tolist()
    # A game ends on the "correct" reply, after which the corpus row closes with end-of-text.
    closing = [tokenizer.eos_token_id] if kind == "game" else []
    assert tokens + closing == expected, (tokenizer.decode(tokens), tokenizer.decode(expected))
