"""Reading a run directory back: damaged checkpoints, damaged logs, config changes on resume, hostile configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from test_trainer import reproducible, tiny_config

from rlfb.checkpoint import write_manifest
from rlfb.cli import main as cli_main
from rlfb.config import load_config
from rlfb.errors import ConfigError, RlfbError
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


def interrupted_run(model_dir: Path, output_dir: Path, stop_at: int, *overrides: str) -> tuple[Trainer, Path]:
    """A run stopped by Ctrl-C after update ``stop_at`` (saved then), with the config to resume it."""
    def ctrl_c(step: int, metrics: dict) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    config = tiny_config(model_dir, output_dir, *overrides)
    result = Trainer(config, callbacks=[ctrl_c]).train()
    assert result.interrupted
    return Trainer(config, resume_from=result.run_dir), result.run_dir


def hashes(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_resume_skips_a_damaged_newest_checkpoint_and_a_partial_log_line(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    straight = Trainer(tiny_config(tiny_model_dir, tmp_path / "straight")).train()
    _, run_dir = interrupted_run(tiny_model_dir, tmp_path / "resumed", 3, "checkpoint.every=1", "checkpoint.keep_last=3")
    agent_state = run_dir / "checkpoints" / "step_00000003" / "agent.pt"
    agent_state.write_bytes(agent_state.read_bytes()[:100])  # a truncated copy of the newest checkpoint
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "rollout/rew')  # what a kill during a write leaves
    capsys.readouterr()
    resumed = Trainer(tiny_config(tiny_model_dir, tmp_path / "resumed", "checkpoint.every=1",
                                  "checkpoint.keep_last=3"), resume_from=run_dir).train()
    assert resumed.step == 4
    assert ("skipped damaged checkpoint checkpoints/step_00000003: agent.pt is 100 bytes but was written with "
            in capsys.readouterr().err)
    # Continued from update 2, the run still equals one that never stopped.
    assert reproducible(read_metrics(run_dir)) == reproducible(read_metrics(straight.run_dir))


def test_a_truncated_eval_json_stops_the_resume_before_any_file_changes(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer, run_dir = interrupted_run(tiny_model_dir, tmp_path, 2)
    evaluations = run_dir / "eval.json"
    evaluations.write_text(evaluations.read_text()[:50])
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 3, "rollout/reward_mean": 0.5}\n')  # logged after the checkpoint: dropped on resume
    before = hashes(run_dir)
    with pytest.raises(RlfbError, match=r"eval.json' is damaged \(.*\); nothing in the run was changed"):
        trainer.train()
    assert hashes(run_dir) == before


def test_resume_refuses_a_shape_change_and_records_other_changes(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir = interrupted_run(tiny_model_dir, tmp_path, 2)
    with pytest.raises(ConfigError) as error:
        Trainer.resume(run_dir, ["lora.r=8"])
    assert str(error.value) == ("cannot resume with 'lora.r' changed from 4 to 8: the checkpoint's weights have "
                                "the old shape; resume with lora.r=4, or start a new run without --resume")
    capsys.readouterr()
    trainer = Trainer.resume(run_dir, ["agent.learning_rate=0.02", "budget.updates=3"])
    assert trainer.train().step == 3
    out = capsys.readouterr().out
    assert (f"resuming with a changed config: agent.learning_rate 0.01 -> 0.02, budget.updates 4 -> 3 (recorded "
            f"in {run_dir / 'config.yaml'}, so the next resume uses it too); because of agent.learning_rate "
            "0.01 -> 0.02 the run will not match an uninterrupted one") in out
    assert trainer.agent.stepper.learning_rate == 0.02  # applied, not only printed
    recorded = load_config(run_dir / "config.yaml")
    assert recorded.agent.params["learning_rate"] == 0.02 and recorded.budget.updates == 3


def test_a_run_directory_config_cannot_run_code(tiny_model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir = interrupted_run(tiny_model_dir, tmp_path, 2)
    marker = tmp_path / "PWNED"
    for path in [run_dir / "config.yaml", *run_dir.glob("checkpoints/*/config.yaml")]:
        config = yaml.safe_load(path.read_text())
        config["rewards"] = [{"name": "os:system", "kwargs": {"command": f"touch {marker}"}}]
        path.write_text(yaml.safe_dump(config))
        if path.parent != run_dir:
            write_manifest(path.parent)  # a manifest is no signature: whoever edits can rewrite it
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("rlfb eval: error: reward 'os:system' in "
                        f"{run_dir / 'checkpoints' / 'step_00000002' / 'config.yaml'} would import and run module "
                        "'os'; rlfb does not run code a run directory names: if you trust it, pass "
                        "--allow-import os\n")
    assert f"rlfb eval: base model: {str(tiny_model_dir)!r} (local directory {tiny_model_dir})" in err
    assert cli_main(["train", "--resume", str(run_dir)]) == 1
    assert "rlfb train: error: reward 'os:system' in " in capsys.readouterr().err
    assert not marker.exists()


def test_the_adapter_records_the_model_name_as_given(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rlfb.models import builtin, loading
    from rlfb.models.policy import Policy

    # A built-in name that resolves to a directory elsewhere, as rlfb-tiny resolves to the package copy.
    monkeypatch.setitem(loading.BUILTIN_MODELS, "cached-tiny", "a test stand-in for rlfb-tiny")
    monkeypatch.setattr(builtin, "locate", lambda name, progress=True: tiny_model_dir)
    policy = Policy.from_pretrained("cached-tiny", device="cpu")

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("saving an adapter looked its base model up on the hub")

    # peft's default looks a base name that is not a local directory up on the hub at every save.
    monkeypatch.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub", no_hub)
    policy.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "cached-tiny"


def test_resume_does_not_import_a_module_planted_in_the_run_directory(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks before torch loads resolve every reward: they too must refuse, not import, an untrusted module.
    _, run_dir = interrupted_run(tiny_model_dir, tmp_path, 2)
    marker = tmp_path / "IMPORTED"
    (run_dir / "planted_reward.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef reward(prompts, completions, **kwargs):\n"
        "    return [0.0] * len(completions)\n")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["rewards"] = ["planted_reward:reward"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.syspath_prepend(str(run_dir))  # importable, as from a run directory used as working directory
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run_dir)]) == 1
    assert "would import and run module 'planted_reward'" in capsys.readouterr().err
    assert not marker.exists()


def test_eval_and_generate_read_a_run_with_its_own_threads(tiny_model_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    run_dir = Trainer(tiny_config(tiny_model_dir, tmp_path, "threads=2")).train().run_dir
    torch.set_num_threads(1)
    assert cli_main(["generate", str(run_dir), "--prompt", "The film", "--max-new-tokens", "2"]) == 0
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert cli_main(["eval", str(run_dir), "--n", "2"]) == 0
    assert torch.get_num_threads() == 2
