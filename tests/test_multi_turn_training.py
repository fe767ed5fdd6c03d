"""`rlfb train` on multi-turn episodes (env.kind: multi_turn): every agent updates from whole conversations,
the episode metrics and the held-out evaluation are logged, a killed run resumes bit-identically, and the
env section's mistakes fail before torch is imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run_checks import assert_one_line_errors_before_torch
from test_trainer import reproducible
from wiring_helpers import move_adapter

from rlfb.checkpoint import find_checkpoint, read_trainer_state
from rlfb.config import RunConfig, config_from_dict
from rlfb.logging import read_metrics
from rlfb.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def guess_config(model_dir: Path, output_dir: Path, *overrides: str, agent: str = "grpo",
                 protocol: str = "guess_number") -> RunConfig:
    """Guess the number on the tiny random model: 4 episodes of up to 3 turns of 3 tokens per update.

    A random model never guesses right, so a reward on the last turn (a vowel in it) gives the agents a
    gradient on top of the protocol's reward. ``protocol="calculator"`` plays sums instead: their openings
    differ from episode to episode (guess_number's secret changes nothing a random model writes).
    """
    task = {"guess_number": "guess_number", "calculator": "arithmetic"}[protocol]
    data = {
        "task": task, "model": str(model_dir),
        "env": {"kind": "multi_turn", "protocol": protocol, "max_turns": 3, "max_turn_tokens": 3},
        "rewards": [{"name": "regex", "kwargs": {"pattern": "[aeiou]"}, "label": "vowel"}],
        "agent": {"name": agent, "learning_rate": 1e-2},
        "lora": {"r": 4, "alpha": 8},
        "budget": {"updates": 4, "num_envs": 4, "group_size": 1 if agent == "ppo" else 2},
        "eval": {"num_prompts": 4},
        "logging": {"progress_bar": False, "tensorboard": False, "samples_every": 2},
        "checkpoint": {"every": 2, "keep_last": 2},
        "device": "cpu", "output_dir": str(output_dir), "seed": 3,
    }
    return config_from_dict(data, list(overrides))


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_every_agent_trains_on_whole_episodes(tiny_model_dir: Path, tmp_path: Path, agent: str) -> None:
    seen: list[dict[str, float]] = []
    result = Trainer(guess_config(tiny_model_dir, tmp_path, "budget.updates=2", agent=agent),
                     callbacks=[lambda step, metrics: seen.append(metrics)]).train()
    assert result.step == 2 and result.run_dir.name.startswith("guess_number__")
    rows = read_metrics(result.run_dir)
    updates = [row for row in rows if "rollout/reward_mean" in row]
    assert [row["step"] for row in updates] == [1, 2]
    for row in updates:
        assert 1 <= row["rollout/turns"] <= 3 and row["rollout/success_rate"] == 0.0  # random guesses miss
        assert row["rollout/episode_truncated"] == 1.0  # so the turn cap ends every episode
        # The total reward is the protocol's turn rewards (none here) plus the weighted final score.
        assert row["rollout/reward_mean"] == pytest.approx(row["rollout/reward/protocol"] + row["rollout/reward/vowel"])
    if agent == "ppo":
        assert "train/value_loss" in updates[0] and "train/explained_variance" in updates[0]
    assert seen[1]["train/kl"] != 0.0  # the first update moved the adapter
    evaluations = [row for row in rows if "eval/kl" in row]
    assert [row["step"] for row in evaluations] == [0, 2]
    for key in ("eval/reward/total", "eval/reward/protocol", "eval/reward/vowel", "eval/success_rate", "eval/turns"):
        assert key in evaluations[0], key
    assert result.before is not None and result.before.kl == pytest.approx(0.0, abs=1e-6)
    assert result.after is not None and abs(result.after.kl) > 1e-4  # the policy left the reference
    # Held-out episodes are the same before and after: the same openings, seeds and sampling noise.
    assert [s["prompt"] for s in result.before.samples] == [s["prompt"] for s in result.after.samples]
    saved = json.loads((result.run_dir / "eval.json").read_text())
    assert set(saved["after"]["episodes"]) == {"success_rate", "turns"}


def test_held_out_evaluation_replays_the_same_episodes_and_measures_model_tokens(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    config = guess_config(tiny_model_dir, tmp_path, "budget.updates=1", "eval.num_prompts=3")
    trainer = Trainer(config)
    trainer._build()
    move_adapter(trainer.policy.model, scale=0.3)  # policy != reference: a KL to measure
    first, _ = trainer._measure()
    conversations = trainer.eval_venv.unwrapped.conversations
    secrets = [conversation.state.secret for conversation in conversations]
    second, _ = trainer._measure()
    assert first.to_dict() == second.to_dict()
    # The episodes' secrets come from eval.seed (episode i is reset with eval.seed + i): the same each time.
    assert [conversation.state.secret for conversation in trainer.eval_venv.unwrapped.conversations] == secrets
    assert len(set(secrets)) > 1 and first.num_prompts == 3 and len(first.prompt_rewards["vowel"]) == 3

    # Oracle: one plain forward pass per conversation, at temperature 1, over the model's tokens only.
    policy, kl, reference_logprobs, model_tokens = trainer.policy, [], [], []
    with torch.no_grad():
        for conversation in trainer.eval_venv.unwrapped.conversations:
            tokens = torch.tensor([conversation.tokens])
            logprobs = torch.log_softmax(policy.model(tokens).logits[0, :-1].float(), -1)
            with policy.reference():
                reference = torch.log_softmax(policy.model(tokens).logits[0, :-1].float(), -1)
            positions = [p for start, end in conversation.spans("model") for p in range(start, end)]
            targets = tokens[0, positions]
            policy_values = logprobs[[p - 1 for p in positions], targets]
            reference_values = reference[[p - 1 for p in positions], targets]
            kl.append(float((policy_values - reference_values).sum()))
            reference_logprobs += reference_values.tolist()
            model_tokens.append(len(positions))
    assert first.kl == pytest.approx(sum(kl) / len(kl), abs=1e-4) and abs(first.kl) > 1e-2
    assert first.fluency == pytest.approx(sum(reference_logprobs) / len(reference_logprobs), abs=1e-4)
    assert first.completion_length == pytest.approx(sum(model_tokens) / len(model_tokens))
    assert first.episodes["turns"] == pytest.approx(
        sum(len(conversation.turns) for conversation in conversations) / 3)


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path,
                                                            agent: str) -> None:
    straight = Trainer(guess_config(tiny_model_dir, tmp_path / "straight", agent=agent,
                                    protocol="calculator")).train()

    def ctrl_c_after_update_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    config = guess_config(tiny_model_dir, tmp_path / "resumed", "checkpoint.every=0", agent=agent,
                          protocol="calculator")
    interrupted = Trainer(config, callbacks=[ctrl_c_after_update_2]).train()
    assert interrupted.interrupted and read_trainer_state(find_checkpoint(interrupted.run_dir))["step"] == 2
    resumed = Trainer(config, resume_from=interrupted.run_dir).train()
    assert resumed.step == 4
    straight_rows = reproducible(read_metrics(straight.run_dir))
    assert reproducible(read_metrics(resumed.run_dir)) == straight_rows
    # Not trivially equal: the episodes differ from update to update.
    update_rows = [row for row in straight_rows if "rollout/reward_mean" in row]
    assert len({row["rollout/reward_mean"] for row in update_rows}) > 1, update_rows


def test_a_rollout_interrupted_mid_way_resumes_from_the_last_complete_update(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = Trainer(guess_config(tiny_model_dir, tmp_path / "straight", protocol="calculator")).train()
    import rlfb.agents.multi_turn as multi_turn

    real_collect = multi_turn.collect_episodes
    calls = []

    def collect_then_interrupt(*args, **kwargs):
        result = real_collect(*args, **kwargs)  # the env's generator has moved on, as in a half-done rollout
        calls.append(kwargs.get("options"))  # None for a training rollout, the eval split for an evaluation
        if calls.count(None) == 3:
            raise KeyboardInterrupt
        return result

    config = guess_config(tiny_model_dir, tmp_path / "resumed", "checkpoint.every=0", protocol="calculator")
    monkeypatch.setattr(multi_turn, "collect_episodes", collect_then_interrupt)
    trainer = Trainer(config)
    assert trainer.train().interrupted
    monkeypatch.setattr(multi_turn, "collect_episodes", real_collect)
    assert read_trainer_state(find_checkpoint(trainer.run_dir))["step"] == 2
    resumed = Trainer(config, resume_from=trainer.run_dir).train()
    assert reproducible(read_metrics(resumed.run_dir)) == reproducible(read_metrics(straight.run_dir))


def test_env_section_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    config = str(CONFIGS / "guess_number_grpo.yaml")
    cases = {
        "unknown kind": (["--set", "env.kind=multiturn"], "'env.kind' is 'multiturn' (did you mean 'multi_turn'?)"),
        "unknown protocol": (["--set", "env.protocol=guess_numbr"],
                             "unknown protocol 'guess_numbr' in 'env.protocol' (did you mean 'guess_number'?)"),
        "no protocol": (["--set", "env.protocol=null"], "'env.kind' is 'multi_turn' but 'env.protocol' is not set"),
        "protocol on a single-turn run": (["--set", "env.kind=single_turn"],
                                          "'env.protocol' is set but 'env.kind' is 'single_turn'"),
        "bad protocol option": (["--set", "env.protocol_options={hihg: 50}"],
                                "env.protocol_options: protocol 'guess_number': bad protocol_options"),
        "unknown env key": (["--set", "env.max_turn=3"], "unknown key 'env.max_turn' (did you mean 'env.max_turns'?)"),
        "turn cap": (["--set", "env.max_turns=0"], "'env.max_turns' is 0; it must be >= 1"),
        "window below a turn": (["--set", "env.max_context_tokens=4"],
                                "'env.max_context_tokens' is 4; it must be above env.max_turn_tokens (4)"),
        "reply template": (["--set", "env.reply_template=no reply"], "'env.reply_template' is 'no reply'"),
        "single-turn needs a reward": (["--set", "env={kind: single_turn}", "--set", "rewards=[]"],
                                       "'rewards' is empty and task 'guess_number' declares no default reward"),
    }
    assert_one_line_errors_before_torch(
        {case: (["train", config, *args], message) for case, (args, message) in cases.items()}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_reward_functions_is_scored_by_its_protocol(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Three updates: as many unscored rollouts in a row would stop a run (trainer.UNSCORED_ROLLOUTS_LIMIT).
    config = guess_config(tiny_model_dir, tmp_path, "rewards=[]", "budget.updates=3", "checkpoint.every=1")
    result = Trainer(config).train()
    assert result.step == 3
    updates = [row for row in read_metrics(result.run_dir) if "rollout/reward_mean" in row]
    assert all(row["rollout/scored_fraction"] == 1.0 and row["rollout/reward_mean"] == 0.0 for row in updates)
    assert not any(key.startswith("rollout/reward/") and key != "rollout/reward/protocol" for key in updates[0])
    resumed = Trainer(guess_config(tiny_model_dir, tmp_path, "rewards=[]", "budget.updates=4"),
                      resume_from=result.run_dir).train()
    assert resumed.step == 4


def test_rlfb_eval_of_a_multi_turn_run_replays_its_held_out_episodes(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlfb.cli import main

    result = Trainer(guess_config(tiny_model_dir, tmp_path, "budget.updates=2", "checkpoint.every=1",
                                  protocol="calculator")).train()
    assert result.before is not None and result.after is not None and result.after.episodes
    capsys.readouterr()
    assert main(["eval", str(result.run_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    # The same episodes as the trainer's final evaluation, played by the same adapter: the same measures.
    assert evaluated["after"]["episodes"] == pytest.approx(result.after.episodes)
    assert evaluated["after"]["rewards"] == pytest.approx(result.after.rewards)
    assert evaluated["after"]["kl"] == pytest.approx(result.after.kl, abs=1e-6)
    assert evaluated["before"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference: the adapter switched off
    assert evaluated["before"]["episodes"] == pytest.approx(result.before.episodes)
