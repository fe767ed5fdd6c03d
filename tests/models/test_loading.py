"""One loading path for built-in names, local directories and hub ids, with errors that name the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rlfb.errors import ModelNotFoundError
from rlfb.models import builtin, loading

TINY = builtin.TinyModelRecipe(n_documents=300, vocab_size=280, n_layer=1, n_embd=16, n_head=2,
                               n_positions=48, steps=5, batch_size=8, warmup_steps=2)


@pytest.fixture
def rlfb_home(rlfb_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The empty RLFB_HOME of conftest.py, with rlfb-tiny built from the small TINY recipe."""
    monkeypatch.setitem(builtin.BUILTIN_RECIPES, "rlfb-tiny", TINY)
    return rlfb_home


@pytest.mark.parametrize("name", ["./no/such/model", "../no/such/model", "/no/such/dir", "models/../missing/x",
                                  "~/nope"])
def test_missing_path_says_the_path_does_not_exist(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match=rf"model path '{name}' does not exist \(looked for "
                                                 rf"{Path(name).expanduser().absolute()}\); name an existing model "
                                                 r"directory, a hub id \(org/name\) or a built-in model \(rlfb-tiny, rlfb-tiny-multiturn\)"):
        loading.resolve_model_path(name)


@pytest.mark.parametrize("name", ["", "has space", "bad:name"])
def test_name_that_is_neither_path_nor_hub_id_lists_builtins(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match=rf"model '{name}' not found.*built-in models: rlfb-tiny"):
        loading.resolve_model_path(name)


@pytest.mark.parametrize("hub_id", ["gpt2", "openai-community/gpt2", "EleutherAI/pythia-14m"])
def test_hub_ids_pass_through_unchanged(hub_id: str) -> None:
    assert loading.resolve_model_path(hub_id) == hub_id


def test_unreachable_hub_id_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(name: str, **kwargs: object) -> None:  # what transformers raises without network or cache
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelNotFoundError, match=r"could not load model 'rlfb-org/no-such-model' "
                                                 r"\(We couldn't connect.*built-in models: rlfb-tiny"):
        loading.load_tokenizer("rlfb-org/no-such-model")


def test_builtin_name_builds_on_first_use_into_rlfb_home(rlfb_home: Path) -> None:
    path = loading.resolve_model_path("rlfb-tiny", progress=False)
    assert Path(path) == builtin.cache_path("rlfb-tiny", TINY) and Path(path).parent == rlfb_home / "models"
    model, tokenizer = loading.load_model("rlfb-tiny", device="cpu")
    assert model.config.n_embd == 16 and not model.training


def test_local_directory_loads_through_the_same_code(tiny_model_dir: Path) -> None:
    assert loading.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    model, tokenizer = loading.load_model(str(tiny_model_dir), device="cpu", dtype=torch.float64)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.dtype == torch.float64 and model.config.pad_token_id == tokenizer.pad_token_id
    assert not model.training and model.device == torch.device("cpu")


def test_left_padding_lets_a_batch_continue_at_the_right_edge(tiny_model_dir: Path) -> None:
    model, tokenizer = loading.load_model(str(tiny_model_dir), device="cpu")
    batch = tokenizer(["1+2=", "The plot of this film was"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]


def test_directory_without_config_says_it_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError) as raised:
        loading.load_model(str(tmp_path), device="cpu")
    assert str(raised.value) == (
        f"model directory '{tmp_path}' has no config.json, so it is not a model; a model directory (as written by "
        "save_pretrained) holds config.json, the weights (model.safetensors) and the tokenizer files "
        "(tokenizer.json, tokenizer_config.json)")


def test_directory_without_config_names_the_models_inside_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "final")
    with pytest.raises(ModelNotFoundError, match=rf"these directories inside it are models: {tmp_path}/run/final$"):
        loading.resolve_model_path(str(tmp_path / "run"))


def test_directory_with_config_but_no_weights_gets_no_network_hint(tmp_path: Path, tiny_model_dir: Path) -> None:
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match=rf"could not load model directory '{tmp_path}' \(.*\); it needs "
                                                 r"the files save_pretrained writes") as raised:
        loading.load_model(str(tmp_path), device="cpu")
    assert "network" not in str(raised.value) and "hub" not in str(raised.value)


def test_truncated_rlfb_build_given_as_a_path_is_damaged_not_loaded(tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelNotFoundError, match=rf"model directory '{copy}' is a damaged rlfb build \(model."
                                                 rf"safetensors is 100 bytes, [\d,]+ recorded\); delete it"):
        loading.load_model(str(copy), device="cpu")


def test_half_written_cache_entry_is_not_loaded_as_a_path(rlfb_home: Path) -> None:
    partial = builtin.cache_path("rlfb-tiny", TINY)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="unfinished rlfb build"):
        loading.resolve_model_path(str(partial))
    # by name, the same entry is detected as half-written and rebuilt
    assert builtin.is_complete(Path(loading.resolve_model_path("rlfb-tiny", progress=False)), TINY)


def test_resolve_device() -> None:
    assert loading.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loading.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        loading.resolve_device("gpu0")


def test_tokenizer_context_is_capped_at_the_model_positions(tiny_model_dir: Path) -> None:
    # The built tokenizer saves a placeholder model_max_length larger than the model's 48 positions.
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    assert tokenizer.model_max_length == TINY.n_positions
