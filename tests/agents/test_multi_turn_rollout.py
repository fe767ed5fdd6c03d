"""collect_episodes plays the multi-turn vector env with the policy: its rollout is the env's record of each
conversation (tokens, action mask, turn ends, turn rewards, final score), finished rows leave the batch,
groups start alike, and the sampled log-probs equal the training forward pass's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlfb  # noqa: F401  (registers the environments)
from rlfb.agents.multi_turn import collect_episodes
from rlfb.agents.rollout import evaluate_rollout
from rlfb.envs.protocol import MultiTurnProtocol, Reply
from rlfb.errors import ConfigError
from rlfb.models import sampler as sampler_module
from rlfb.models.decoding import ForwardDecoder, GPT2Decoder
from rlfb.models.policy import LoraSettings, Policy
from rlfb.models.sampler import SamplingConfig
from rlfb.models.turn_sampler import TurnSampler


class Countdown(MultiTurnProtocol[dict]):
    """Ends after the row's ``stop`` turns; turn n pays 0.5 * n and is answered with " ok" n times."""

    def start(self, row: Any, rng: np.random.Generator) -> tuple[str, dict]:
        return row["prompt"], {"stop": int(row["stop"]), "turns": 0}

    def respond(self, state: dict, turn: str) -> Reply:
        state["turns"] += 1
        count = state["turns"]
        return Reply(" ok" * count, reward=0.5 * count, done=count >= state["stop"])


def characters(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """Final score: the number of characters of the last model turn."""
    return [float(len(text)) for text in completions]


STOPS = [1, 2, 3, 5]  # with max_turns=3 the last row is cut by the turn cap
PINNED = [{"prompt": f"Row {row} says", "stop": stop} for row, stop in enumerate(STOPS)]


@pytest.fixture
def policy(tiny_model_dir: Path) -> Policy:
    torch.manual_seed(0)
    return Policy.from_pretrained(str(tiny_model_dir), LoraSettings(r=4), value_head=False, device="cpu")


def countdown_venv(policy: Policy, **kwargs: Any) -> Any:
    options = {"protocol": Countdown, "task": "sentiment", "tokenizer": policy.tokenizer, "model": None,
               "rewards": [characters], "max_turns": 3, "max_turn_tokens": 4, "max_context_tokens": 64, **kwargs}
    return gym.make_vec("rlfb/MultiTurn-v0", num_envs=len(STOPS), vectorization_mode="vector_entry_point", **options)


def test_the_rollout_is_the_envs_record_of_each_conversation(policy: Policy,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sampled_rows = []
    real_sample_turns = TurnSampler.sample_turns

    def counting_sample_turns(sampler: TurnSampler, rows: list[int], *args: Any) -> Any:
        sampled_rows.append(len(rows))
        return real_sample_turns(sampler, rows, *args)

    monkeypatch.setattr(TurnSampler, "sample_turns", counting_sample_turns)
    venv = countdown_venv(policy)
    batch = collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), seed=0,
                             options={"prompts": PINNED})
    rollout = batch.rollout
    assert sampled_rows == [4, 3, 2]  # a row that has ended is not sampled again
    assert rollout.num_turns.tolist() == [1, 2, 3, 3]

    tokenizer = policy.tokenizer
    for row, conversation in enumerate(venv.unwrapped.conversations):
        (_, _, opening_end), *segments = conversation.segments
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        assert prompt == conversation.tokens[:opening_end] and rollout.prompts[row] == PINNED[row]["prompt"]
        length = int(rollout.completion_mask[row].sum())
        assert rollout.completion_ids[row, :length].tolist() == conversation.tokens[opening_end:]
        assert rollout.completion_mask[row, length:].eq(0).all()
        expected_mask = [0] * length
        expected_ends = []
        for role, start, end in segments:
            if role == "model":
                expected_mask[start - opening_end:end - opening_end] = [1] * (end - start)
                expected_ends.append(end - 1 - opening_end)
        assert rollout.action_mask[row, :length].tolist() == expected_mask
        turns = len(expected_ends)
        assert rollout.turn_ends[row, :turns].tolist() == expected_ends and rollout.turn_ends[row, turns:].eq(-1).all()
        assert rollout.turn_rewards[row, :turns].tolist() == [0.5 * (turn + 1) for turn in range(turns)]
        last_turn = tokenizer.decode(conversation.turn_ids[-1], skip_special_tokens=True)
        assert rollout.scores[row].item() == float(len(last_turn))
        assert rollout.reward_components["characters"][row].item() == float(len(last_turn))
        # The episode's return is every turn's reward plus the final score, as the env paid it.
        assert batch.returns[row] == pytest.approx(sum(0.5 * (turn + 1) for turn in range(turns)) + len(last_turn))
        assert rollout.reward_components["protocol"][row].item() == pytest.approx(0.25 * turns * (turns + 1))
        # Environment tokens carry no sampled log-prob; model tokens do.
        assert rollout.sampled_logprobs[row][rollout.action_mask[row] == 0].eq(0).all()
        assert rollout.sampled_logprobs[row][rollout.action_mask[row].bool()].lt(0).all()
    assert batch.truncated.tolist() == [False, False, False, True]
    assert batch.success.tolist() == [True, True, True, False]  # terminated on a paying turn
    assert rollout.scored.all()


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=20)])
def test_sampled_logprobs_equal_the_training_forward_pass(policy: Policy, sampling: SamplingConfig, lean: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The turns are sampled with each conversation's cache kept across turns (the lean decoder's, or the
    model's own forward and its transformers cache): the log-probs are still the training forward's."""
    if not lean:
        monkeypatch.setattr(sampler_module, "decoder_for", lambda model, lean=True: ForwardDecoder(model))
    with torch.no_grad():  # a nonzero adapter: the policy differs from the reference
        for parameter in policy.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    venv = countdown_venv(policy, max_turn_tokens=6)
    rollout = collect_episodes(venv, policy, sampling, torch.Generator().manual_seed(2), seed=3,
                               options={"prompts": PINNED}).rollout
    evaluation = evaluate_rollout(policy, rollout, temperature=sampling.temperature)
    mask = rollout.action_mask.bool()
    assert int(mask.sum()) > 20
    torch.testing.assert_close(evaluation.logprobs[mask], rollout.sampled_logprobs[mask], atol=1e-5, rtol=0)


def test_each_turn_prefills_only_the_reply_and_ended_rows_leave(policy: Policy,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokens fed to the model: the openings once, then per turn, for the rows still playing only, the
    previous turn's last token (sampled, not yet fed) and the environment's reply."""
    encoded: list[tuple[str, list[int]]] = []  # (call, real tokens fed per row)
    real_prefill, real_extend = GPT2Decoder.prefill, GPT2Decoder.extend

    def counting_prefill(self: GPT2Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         *args: Any) -> Any:
        encoded.append(("prefill", attention_mask.sum(1).tolist()))
        return real_prefill(self, input_ids, attention_mask, *args)

    def counting_extend(self: GPT2Decoder, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> Any:
        encoded.append(("extend", attention_mask[:, -input_ids.shape[1]:].sum(1).tolist()))
        return real_extend(self, input_ids, position_ids, attention_mask)

    monkeypatch.setattr(GPT2Decoder, "prefill", counting_prefill)
    monkeypatch.setattr(GPT2Decoder, "extend", counting_extend)
    venv = countdown_venv(policy)
    pinned = [PINNED[0], {**PINNED[1], "prompt": PINNED[0]["prompt"]}, *PINNED[2:]]  # rows 0, 1 open alike
    collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), seed=0,
                     options={"prompts": pinned})
    conversations = venv.unwrapped.conversations
    openings = [conversation.segments[0][2] for conversation in conversations]
    assert encoded[0] == ("prefill", [openings[0], openings[2], openings[3]])

    def reply_length(row: int, turn: int) -> int:
        replies = [end - start for role, start, end in conversations[row].segments if role == "env"]
        return replies[turn]

    # Row 0 ends after turn 1, row 1 after turn 2, row 2 after turn 3; row 3 is cut by the turn cap.
    assert [call for call, _ in encoded] == ["prefill", "extend", "extend"]
    assert encoded[1][1] == [1 + reply_length(row, 0) for row in (1, 2, 3)]
    assert encoded[2][1] == [1 + reply_length(row, 1) for row in (2, 3)]


@pytest.mark.parametrize(("cap", "reason"), [({"max_context_tokens": 24}, "context_window"),
                                             ({"max_model_tokens": 11}, "token_cap")])
def test_a_turn_never_runs_past_the_room_the_caps_leave(policy: Policy, cap: dict, reason: str) -> None:
    venv = countdown_venv(policy, max_turns=8, max_turn_tokens=8, **cap)
    batch = collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), seed=0,
                             options={"prompts": [{"prompt": "Row says", "stop": 8}] * 4})
    # The cap ends every episode. Had a turn been sampled past the room, the env would have cut it and its
    # log-probs would outnumber its tokens (build_rollout refuses that).
    assert batch.truncated.all()
    for row, conversation in enumerate(venv.unwrapped.conversations):
        assert conversation.truncation == reason
        assert int(batch.rollout.action_mask[row].sum()) == conversation.num_model_tokens


def test_rows_of_a_group_play_the_same_episode(tiny_model_dir: Path, policy: Policy) -> None:
    venv = gym.make_vec("rlfb/MultiTurn-v0", num_envs=6, vectorization_mode="vector_entry_point",
                        protocol="guess_number", tokenizer=policy.tokenizer, model=None, max_context_tokens=64,
                        max_turns=2, max_turn_tokens=3, protocol_options={"high": 1000})
    venv.reset(seed=5)
    batch = collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(0), group_size=3)
    secrets = [conversation.state.secret for conversation in venv.unwrapped.conversations]
    assert secrets[0] == secrets[1] == secrets[2] and secrets[3] == secrets[4] == secrets[5]
    assert secrets[0] != secrets[3]
    assert batch.rollout.group_size == 3
    # The groups' seeds come from the env's own generator: seeding it again replays the rollout's starts.
    venv.reset(seed=5)
    collect_episodes(venv, policy, SamplingConfig(), torch.Generator().manual_seed(9), group_size=3)
    assert [conversation.state.secret for conversation in venv.unwrapped.conversations] == secrets


def test_an_env_wider_than_the_model_is_refused(policy: Policy) -> None:
    policy.tokenizer.model_max_length = 128  # a tokenizer that states a window the model does not have
    venv = countdown_venv(policy, max_context_tokens=None)
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions; make the env with max_context_tokens=64"):
        collect_episodes(venv, policy, SamplingConfig(), seed=0, options={"prompts": PINNED})
    text_venv = countdown_venv(policy, action_type="text")
    with pytest.raises(ConfigError, match="action_type='tokens'"):
        collect_episodes(text_venv, policy, SamplingConfig(), seed=0, options={"prompts": PINNED})


def test_tool_use_success_and_returns_on_the_calculator(policy: Policy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scripted turns (the policy's sampling replaced) exercise every outcome: a tool call then the right
    answer, the right answer at once, a wrong answer, and two calls then a wrong answer."""
    from rlfb.trainer import rollout_metrics

    script = [["<calc>17+25</calc>", "42"], ["42"], ["41"], ["<calc>17+25</calc>", "<calc>1+1</calc>", "2"]]
    venv = gym.make_vec("rlfb/MultiTurn-v0", num_envs=4, vectorization_mode="vector_entry_point",
                        protocol="calculator", tokenizer=policy.tokenizer, model=None, max_context_tokens=64,
                        max_turns=3, max_turn_tokens=20)
    tokenizer = policy.tokenizer

    def scripted_turns(sampler: TurnSampler, rows: list[int], *args: Any) -> list[tuple[list[int], list[float]]]:
        turns = []
        for row in rows:
            text = script[row][len(venv.unwrapped.conversations[row].turns)]
            ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            turns.append((ids, [-1.0] * len(ids)))
        return turns

    monkeypatch.setattr(TurnSampler, "sample_turns", scripted_turns)
    batch = collect_episodes(venv, policy, SamplingConfig(), seed=0,
                             options={"prompts": [{"prompt": "17+25=", "answer": "42"}] * 4})
    assert batch.rollout.num_turns.tolist() == [2, 1, 1, 3]
    assert batch.rollout.turn_rewards.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0] * 3, [0.0] * 3]
    assert batch.used_tool is not None and batch.used_tool.tolist() == [True, False, False, True]
    assert batch.success.tolist() == [True, True, False, False]
    assert batch.returns.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert batch.metrics() == {"rollout/success_rate": 0.5, "rollout/episode_truncated": 0.0,
                               "rollout/reward/protocol": 0.5, "rollout/tool_use": 0.5}
    # The trainer's reward statistics count the turn rewards: the mean return of the episodes.
    metrics = rollout_metrics(batch.rollout, [], tokenizer.eos_token_id)
    assert metrics["rollout/reward_mean"] == 0.5 and metrics["rollout/reward_std"] == 0.5
    assert metrics["rollout/turns"] == 1.75 and metrics["rollout/scored_fraction"] == 1.0
