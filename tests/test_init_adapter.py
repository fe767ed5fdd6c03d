"""``lora.init_from``: RL continues a trained adapter (a run directory or an adapter directory), the KL
reference stays the base model, and a shape mismatch is one line before anything is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlfb.config import config_from_dict, load_config
from rlfb.errors import ConfigError
from rlfb.preflight import check_run_inputs
from rlfb.trainer import Trainer


def run_config(tmp_path: Path, name: str, **lora: object) -> dict[str, object]:
    return {"task": "sentiment", "agent": {"name": "grpo"}, "lora": {"r": 4, "alpha": 8, **lora},
            "budget": {"updates": 2, "num_envs": 8}, "sampling": {"max_new_tokens": 6}, "eval": {"num_prompts": 0},
            "logging": {"run_name": name, "progress_bar": False}, "checkpoint": {"every": 0},
            "output_dir": str(tmp_path)}


def lora_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in trainer.policy.model.named_parameters()
            if "lora_" in name}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tmp_path = tmp_path_factory.mktemp("init")
    trainer = Trainer(config_from_dict(run_config(tmp_path, "first")))
    result = trainer.train()
    return result.run_dir, lora_state(trainer)


@pytest.mark.parametrize("target", ["run", "adapter"])
def test_a_run_starts_from_the_adapter_it_names(first_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path,
                                                target: str) -> None:
    run_dir, trained = first_run
    init_from = run_dir if target == "run" else run_dir / "final" / "adapter"
    trainer = Trainer(config_from_dict(run_config(tmp_path, "second", init_from=str(init_from))))
    trainer._build()
    start = lora_state(trainer)
    assert start.keys() == trained.keys()
    assert all(torch.equal(start[name], trained[name]) for name in trained)
    # The reference is the base model: the adapter switched off gives the base logits, not the trained ones.
    ids = trainer.policy.tokenizer(["The movie was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = trainer.policy.model(input_ids=ids).logits
        with trainer.policy.reference():
            reference = trainer.policy.model(input_ids=ids).logits
    assert not torch.allclose(adapted, reference)


def test_a_fresh_run_does_not_start_from_it(first_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    _, trained = first_run
    trainer = Trainer(config_from_dict(run_config(tmp_path, "fresh")))
    trainer._build()
    assert not all(torch.equal(lora_state(trainer)[name], trained[name]) for name in trained)


def test_a_relative_path_is_read_from_the_config_file_directory(first_run: tuple[Path, dict[str, torch.Tensor]],
                                                                tmp_path: Path) -> None:
    run_dir, _ = first_run
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rl.yaml").write_text("lora: {r: 4, alpha: 8, init_from: ../adapter}\n")
    (tmp_path / "adapter").symlink_to(run_dir / "final" / "adapter")
    config = load_config(tmp_path / "configs" / "rl.yaml")
    assert config.lora.init_from == str((tmp_path / "adapter").absolute())


@pytest.mark.parametrize(("lora", "message"), [
    ({"r": 8}, "lora.r is 8 but the adapter in lora.init_from"),
    ({"alpha": 4}, "lora.alpha is 4.0 but the adapter in lora.init_from"),
    ({"target_modules": ["c_proj"]}, "lora.target_modules is ['c_proj'] but the adapter in lora.init_from"),
])
def test_a_mismatched_lora_section_is_refused_before_loading(first_run: tuple[Path, dict[str, torch.Tensor]],
                                                            tmp_path: Path, lora: dict[str, object],
                                                            message: str) -> None:
    run_dir, _ = first_run
    data = run_config(tmp_path, "bad", init_from=str(run_dir))
    data["lora"] = {**data["lora"], **lora}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        check_run_inputs(config_from_dict(data))


def test_a_path_without_an_adapter_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass a peft adapter directory"):
        check_run_inputs(config_from_dict(run_config(tmp_path, "x", init_from=str(tmp_path / "missing"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no LoRA adapter"):
        check_run_inputs(config_from_dict(run_config(tmp_path, "x", init_from=str(tmp_path / "empty"))))
