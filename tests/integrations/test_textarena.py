"""TextArena's games as a protocol of rlfb/MultiTurn-v0 (the optional extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rlfb.envs.protocol import make_protocol
from rlfb.errors import ConfigError

GUESS = {"env_id": "GuessTheNumber-v0", "opening": "row", "max_reply_chars": 40}


def test_without_the_library_the_protocol_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "textarena", None)
    with pytest.raises(ConfigError, match=r"pip install 'rlfb\[textarena\]'"):
        make_protocol("textarena", GUESS)


pytest.importorskip("textarena")


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="unknown game 'NoSuchGame-v0'"):
        make_protocol("textarena", {**GUESS, "env_id": "NoSuchGame-v0"})
    with pytest.raises(ConfigError, match="opening 'chat'"):
        make_protocol("textarena", {**GUESS, "opening": "chat"})


def test_the_game_answers_turns_pays_at_the_end_and_replays_from_the_seed() -> None:
    game = make_protocol("textarena", GUESS)
    opening, state = game.start({"prompt": "Guess 1-20:"}, np.random.default_rng(5))
    assert opening == "Guess 1-20:"
    secret = state.game.state.game_state["game_number"]
    _, replay = game.start({"prompt": "Guess 1-20:"}, np.random.default_rng(5))
    assert replay.game.state.game_state["game_number"] == secret  # the env's generator seeds the game
    wrong = 1 if secret != 1 else 2
    reply = game.respond(state, f"[{wrong}]")
    assert not reply.done and reply.reward == 0.0
    assert reply.text == f"The target number is {'higher' if secret > wrong else 'lower'}."  # no echo of the turn
    assert len(game.respond(state, "no number").text) <= 40  # the invalid-move notice, cut
    final = game.respond(state, f"[{secret}]")
    assert final.done and final.reward == 1.0 and final.components == {"game": 1.0}
    assert game.finish(state) == {"game_over": True}
    full = make_protocol("textarena", {**GUESS, "opening": "game", "max_reply_chars": None})
    assert "Guess The Number" in full.start({"prompt": ""}, np.random.default_rng(0))[0]


def test_a_multi_turn_run_plays_textarena_games(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlfb.config import config_from_dict
    from rlfb.logging import read_metrics
    from rlfb.trainer import Trainer

    config = config_from_dict({
        "task": "guess_number", "model": str(tiny_model_dir),
        "env": {"kind": "multi_turn", "protocol": "textarena", "protocol_options": GUESS, "max_turns": 2,
                "max_turn_tokens": 3},
        "agent": {"name": "grpo"}, "lora": {"r": 4, "alpha": 8},
        "budget": {"updates": 2, "num_envs": 4, "group_size": 2}, "eval": {"num_prompts": 2},
        "logging": {"progress_bar": False, "tensorboard": False}, "device": "cpu",
        "output_dir": str(tmp_path), "seed": 0})
    result = Trainer(config).train()
    updates = [row for row in read_metrics(result.run_dir) if "rollout/reward_mean" in row]
    assert [row["step"] for row in updates] == [1, 2]
    assert all(1 <= row["rollout/turns"] <= 2 for row in updates)
