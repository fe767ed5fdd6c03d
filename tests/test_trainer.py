"""The trainer end to end on a tiny random model: files, determinism, resume, Ctrl-C, CLI, peft loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rlfb.checkpoint import find_checkpoint, read_trainer_state
from rlfb.cli import main as cli_main
from rlfb.config import RunConfig, config_from_dict
from rlfb.errors import ConfigError
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer


def tiny_config(model_dir: Path, output_dir: Path, *overrides: str, agent: str = "ppo") -> RunConfig:
    """A run that takes a second or two: 4 completions of 6 tokens per update.

    The reward (a vowel anywhere in the completion) varies across a random model's samples, unlike
    sentiment, so the adapter gets a gradient.
    """
    data = {
        "task": "sentiment", "model": str(model_dir),
        "rewards": [{"name": "regex", "kwargs": {"pattern": "[aeiou]"}, "label": "vowel"}],
        "agent": {"name": agent, "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8},
        "sampling": {"max_new_tokens": 6},
        "budget": {"updates": 4, "num_envs": 4},
        "eval": {"num_prompts": 4},
        "logging": {"progress_bar": False, "tensorboard": False, "samples_every": 2},
        "checkpoint": {"every": 2, "keep_last": 2},
        "device": "cpu", "output_dir": str(output_dir), "seed": 3,
    }
    return config_from_dict(data, list(overrides))


def reproducible(rows: list[dict]) -> list[dict]:
    """Metrics rows without the wall-clock family."""
    return [{key: value for key, value in row.items() if not key.startswith("time/")} for row in rows]


def test_train_writes_metrics_checkpoints_final_adapter_and_eval(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = Trainer(tiny_config(tiny_model_dir, tmp_path, "eval.every=2")).train()
    run_dir = result.run_dir
    assert result.step == 4 and not result.interrupted
    assert run_dir.name.startswith("sentiment__ppo__3__")
    rows = read_metrics(run_dir)
    update_rows = [row for row in rows if "rollout/reward_mean" in row]
    assert [row["step"] for row in update_rows] == [1, 2, 3, 4]
    for key in ("train/kl", "train/policy_loss", "train/value_loss", "train/clip_fraction", "train/approx_kl",
                "train/entropy", "train/explained_variance", "rollout/reward/vowel",
                "rollout/completion_length", "time/tokens_per_s", "time/rollout_s", "time/update_s"):
        assert key in update_rows[0], key
    assert [row["step"] for row in rows if "eval/kl" in row] == [0, 2, 4]  # before, every 2, after
    assert result.before is not None and result.before.kl == pytest.approx(0.0, abs=1e-6)
    assert result.after is not None and result.after.kl != result.before.kl  # the adapter moved
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    assert (run_dir / "final" / "adapter" / "adapter_config.json").is_file()
    assert read_trainer_state(find_checkpoint(run_dir))["step"] == 4
    saved = json.loads((run_dir / "eval.json").read_text())
    assert set(saved) == {"before", "after"} and len(saved["after"]["samples"]) == 3
    # The one periodic save (step 2), logged with the next update's row as docs/metrics.md says.
    assert [row["step"] for row in rows if "time/checkpoint_s" in row] == [3]
    # The policy left the reference. (The k1 estimate over a few completions may be of either sign.)
    assert abs(result.after.kl) > 1e-4, result.after.kl


def test_same_seed_gives_identical_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = Trainer(tiny_config(tiny_model_dir, tmp_path / "a", "budget.updates=3")).train()
    second = Trainer(tiny_config(tiny_model_dir, tmp_path / "b", "budget.updates=3")).train()
    other = Trainer(tiny_config(tiny_model_dir, tmp_path / "c", "budget.updates=3", "seed=4")).train()
    assert reproducible(read_metrics(first.run_dir)) == reproducible(read_metrics(second.run_dir))
    assert reproducible(read_metrics(first.run_dir)) != reproducible(read_metrics(other.run_dir))


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path,
                                                            agent: str) -> None:
    overrides = ("budget.num_envs=4", "budget.group_size=2") if agent == "grpo" else ()
    straight = Trainer(tiny_config(tiny_model_dir, tmp_path / "straight", *overrides, agent=agent)).train()

    def ctrl_c_after_update_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    config = tiny_config(tiny_model_dir, tmp_path / "resumed", *overrides, "checkpoint.every=0", agent=agent)
    interrupted = Trainer(config, callbacks=[ctrl_c_after_update_2]).train()
    assert interrupted.interrupted and interrupted.step == 2
    assert read_trainer_state(find_checkpoint(interrupted.run_dir))["step"] == 2  # Ctrl-C saved it
    resumed = Trainer(config, resume_from=interrupted.run_dir).train()
    assert resumed.run_dir == interrupted.run_dir and resumed.step == 4
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(read_metrics(straight.run_dir))


def test_interrupt_during_a_rollout_saves_the_last_complete_update(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    straight = Trainer(tiny_config(tiny_model_dir, tmp_path / "straight")).train()
    config = tiny_config(tiny_model_dir, tmp_path / "resumed", "checkpoint.every=0")
    trainer = Trainer(config)
    import rlfb.agents.rollout as rollout_module

    real_collect = rollout_module.collect_rollout
    calls = []

    def collect_then_interrupt(*args, **kwargs):
        calls.append(1)
        result = real_collect(*args, **kwargs)  # consume randomness, as a real half-finished rollout does
        if len(calls) == 3:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(rollout_module, "collect_rollout", collect_then_interrupt)
    assert trainer.train().interrupted
    monkeypatch.setattr(rollout_module, "collect_rollout", real_collect)
    assert read_trainer_state(find_checkpoint(trainer.run_dir))["step"] == 2
    resumed = Trainer(config, resume_from=trainer.run_dir).train()
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(read_metrics(straight.run_dir))


def test_final_adapter_loads_with_plain_peft_and_generates_like_rlfb_generate(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfb.models.sampler import SamplingConfig, generate

    run_dir = Trainer(tiny_config(tiny_model_dir, tmp_path)).train().run_dir
    prompt = "The acting was"
    capsys.readouterr()
    assert cli_main(["generate", str(run_dir), "--prompt", prompt, "--seed", "7", "--max-new-tokens", "6"]) == 0
    rlfb_text = capsys.readouterr().out

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_dir / "final" / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = tokenizer([prompt], return_tensors="pt")
    generation = generate(model, encoded["input_ids"], encoded["attention_mask"],
                          SamplingConfig(max_new_tokens=6), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(7))
    ids = generation.completion_ids[0][generation.completion_mask[0].bool()]
    assert rlfb_text == prompt + tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    with torch.no_grad():
        trained = model(**encoded).logits
        with model.disable_adapter():
            original = model(**encoded).logits
    assert not torch.allclose(trained, original)  # the saved adapter is the trained one, not an identity


def test_cli_train_eval_and_errors(tiny_model_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", "--show-keys"]) == 0
    assert re.search(r"\nbudget\.updates +an integer or null: number of rollout \+ update", capsys.readouterr().out)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(tiny_config(tiny_model_dir, tmp_path / "runs").to_yaml())
    assert cli_main(["train", str(config_path), "--set", "budget.updates=2", "--set", "logging.run_name=cli"]) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation on 4 prompts" in out and "reward/vowel" in out
    run_dir = tmp_path / "runs" / "cli"
    assert read_trainer_state(find_checkpoint(run_dir))["step"] == 2
    assert cli_main(["eval", str(run_dir), "--n", "3", "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["before"]["kl"] == pytest.approx(0.0, abs=1e-6) and evaluation["after"]["num_prompts"] == 3
    assert cli_main(["train", str(run_dir / "config.yaml"), "--resume", str(run_dir),
                     "--set", "budget.updates=3"]) == 0
    assert read_trainer_state(find_checkpoint(run_dir))["step"] == 3
    capsys.readouterr()
    assert cli_main(["train", str(config_path), "--set", "budget.updatse=2"]) == 1
    assert "unknown key 'budget.updatse' (did you mean 'budget.updates'?)" in capsys.readouterr().err


def test_agent_options_are_checked_by_the_agent(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'agent.learning_rat' \(did you mean 'agent.learning_rate'"):
        Trainer(tiny_config(tiny_model_dir, tmp_path, "agent.learning_rat=0.1")).train()
    with pytest.raises(ConfigError, match="'agent.epochs' must be an integer, got str 'four'"):
        Trainer(tiny_config(tiny_model_dir, tmp_path, "agent.epochs=four")).train()
    with pytest.raises(ConfigError, match="unknown key 'agent.baseline'"):  # a REINFORCE option, not PPO's
        Trainer(tiny_config(tiny_model_dir, tmp_path, "agent.baseline=ema")).train()
    with pytest.raises(ConfigError, match="'agent.temperature' is 0.5 but 'sampling.temperature' is 1.0"):
        Trainer(tiny_config(tiny_model_dir, tmp_path, "agent.temperature=0.5")).train()


def test_ctrl_c_signal_finishes_the_update_then_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    import signal

    def press_ctrl_c(step: int, metrics: dict) -> None:
        if step == 1:
            signal.raise_signal(signal.SIGINT)  # what a terminal sends; the handler only sets a flag

    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    result = Trainer(tiny_config(tiny_model_dir, tmp_path), callbacks=[press_ctrl_c]).train()
    assert result.interrupted and result.step == 1
    assert result.checkpoint is not None and read_trainer_state(result.checkpoint)["step"] == 1
    assert signal.getsignal(signal.SIGINT) is before  # the handler was removed, the one before put back


def test_interrupt_inside_an_update_saves_nothing_half_done(tiny_model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from rlfb.agents.ppo import PPOAgent

    real_update = PPOAgent.update

    def update_interrupted_at_3(agent: PPOAgent, rollout):
        if agent.updates == 2:
            raise KeyboardInterrupt  # a second Ctrl-C while the weights are changing
        return real_update(agent, rollout)

    monkeypatch.setattr(PPOAgent, "update", update_interrupted_at_3)
    result = Trainer(tiny_config(tiny_model_dir, tmp_path)).train()
    assert result.interrupted and result.step == 2 and result.checkpoint is None
    assert read_trainer_state(find_checkpoint(result.run_dir))["step"] == 2  # the periodic one is intact


def test_eval_and_generate_work_on_a_plain_model(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["eval", str(tiny_model_dir), "--n", "3", "--reward", "length", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "on 3 prompts" in out and "reward/length" in out and "kl" in out
    assert cli_main(["generate", str(tiny_model_dir), "--prompt", "The plot was", "-n", "2", "--device", "cpu",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("The plot was") == 2
    assert cli_main(["generate", str(tiny_model_dir), "--prompt", "x", "-n", "0"]) == 1
    assert "-n is 0; it must be >= 1" in capsys.readouterr().err
