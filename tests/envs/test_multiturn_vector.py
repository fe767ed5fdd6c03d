"""MultiTurn-v0 batched: Gymnasium's checks, equality with SyncVectorEnv, rows that finish apart, batched scoring."""

from __future__ import annotations

import copy
import warnings
from itertools import combinations
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_equivalence
from gymnasium.utils.passive_env_checker import data_shares_objects
from gymnasium.vector import AutoresetMode

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs.multiturn_vector_env import MultiTurnVectorEnv
from rlfb.models.loading import load_tokenizer

TOKENIZER = load_tokenizer("rlfb-tiny")
EOS = TOKENIZER.eos_token_id
VARIANTS = [{"protocol": "calculator"}, {"protocol": "calculator", "action_type": "text"},
            {"protocol": "guess_number"}, {"protocol": "guess_number", "action_type": "text", "max_turns": 3}]


def make_venv(num_envs: int = 4, **kwargs: Any) -> MultiTurnVectorEnv:
    return gym.make_vec("rlfb/MultiTurn-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", model=None,
                        tokenizer=TOKENIZER, **kwargs)


def turn(text: str) -> list[int]:
    return [*TOKENIZER(text, add_special_tokens=False)["input_ids"], EOS]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_the_vector_form_passes_the_checks_gymnasium_has_for_vector_envs(kwargs: dict[str, Any]) -> None:
    """Gymnasium 1.4 has no check_env for vector envs: make_vec's metadata check, plus check_env's checks redone."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        venv = make_venv(**kwargs)  # make_vec warns when the autoreset mode is missing or not an AutoresetMode
        assert venv.metadata["autoreset_mode"] is AutoresetMode.DISABLED
        assert venv.single_observation_space == gym.make(
            "rlfb/MultiTurn-v0", model=None, tokenizer=TOKENIZER, **kwargs).observation_space
        assert venv.observation_space == gym.vector.utils.batch_space(venv.single_observation_space, 4)
        # reset with a seed is deterministic; another seed differs somewhere; returned data is never shared
        venv.action_space.seed(0)
        actions = venv.action_space.sample()
        first = venv.reset(seed=123)
        assert first[0] in venv.observation_space and isinstance(first[1], dict)
        step_1 = venv.step(actions)
        again = venv.reset(seed=123)
        step_2 = venv.step(actions)
        assert data_equivalence(first, again, exact=True) and data_equivalence(step_1, step_2, exact=True)
        assert step_1[0] in venv.observation_space
        assert step_1[1].dtype == np.float64 and step_1[2].dtype == step_1[3].dtype == np.bool_
        assert not step_1[3].any(), "no row may truncate on its first step (check_env's rule)"
        calls = [first, again, (step_1[0], step_1[4]), (step_2[0], step_2[4]), venv.reset(seed=123, options={})]
        for (obs_1, info_1), (obs_2, info_2) in combinations(calls, 2):
            assert not data_shares_objects(obs_1, obs_2) and not data_shares_objects(info_1, info_2)
        # check_env compares generators after a different seed; here: the episodes they started
        starts = [(conversation.row, repr(conversation.state)) for conversation in venv.conversations]
        venv.reset(seed=456)
        assert [(conversation.row, repr(conversation.state)) for conversation in venv.conversations] != starts


def test_a_single_env_with_a_chat_template_passes_check_env() -> None:
    tokenizer = copy.deepcopy(TOKENIZER)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.model_max_length = 128
    env = gym.make("rlfb/MultiTurn-v0", disable_env_checker=True, protocol="guess_number", model=None,
                   tokenizer=tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


@pytest.mark.parametrize("kwargs", [{"protocol": "guess_number", "max_turns": 4, "rewards": ["exact_match"],
                                     "task": "arithmetic"},
                                    {"protocol": "calculator", "action_type": "text", "charset": "0123456789<>/calc+*"}])
def test_every_row_plays_what_sync_vector_env_plays_with_the_same_seeds(kwargs: dict[str, Any]) -> None:
    """The oracle: Gymnasium's SyncVectorEnv over single envs (DISABLED autoreset, ended rows reset by mask)."""
    num_envs = 3
    ours = make_venv(num_envs, **kwargs)
    sync = gym.make_vec("rlfb/MultiTurn-v0", num_envs=num_envs, vectorization_mode="sync", model=None,
                        tokenizer=TOKENIZER, vector_kwargs={"autoreset_mode": AutoresetMode.DISABLED}, **kwargs)
    assert data_equivalence(ours.reset(seed=5), sync.reset(seed=5), exact=True)
    ours.action_space.seed(1)
    scripted = ["<calc>1+2</calc>", "3", "7", "<calc>9*9</calc>"]
    episodes_ended = 0
    for step in range(12):
        if kwargs.get("action_type") == "text":
            actions = tuple(scripted[(step + row) % len(scripted)] for row in range(num_envs))
        else:
            actions = ours.action_space.sample()
        ours_step, sync_step = ours.step(actions), sync.step(actions)
        assert data_equivalence(ours_step, sync_step, exact=True), f"step {step}"
        ended = ours_step[2] | ours_step[3]
        episodes_ended += int(ended.sum())
        if ended.any():  # what Gymnasium's DISABLED mode asks: reset the rows that ended before stepping on
            assert data_equivalence(ours.reset(options={"reset_mask": ended}),
                                    sync.reset(options={"reset_mask": ended.copy()}), exact=True)
    assert episodes_ended >= num_envs


def test_rows_finish_at_different_turns_and_finished_rows_stay_still() -> None:
    venv = make_venv(3, protocol="calculator")
    venv.reset(seed=0, options={"prompts": [{"prompt": "1+2=", "answer": "3"}] * 3})
    observation, rewards, terminated, truncated, info = venv.step([turn("3"), turn("<calc>1+2</calc>"), turn("4")])
    assert terminated.tolist() == [True, False, True] and rewards.tolist() == [1.0, 0.0, 0.0]
    assert venv.finished.tolist() == [True, False, True] and not venv.all_finished
    observation_2, rewards, terminated, truncated, info = venv.step([None, turn("3"), None])
    assert rewards.tolist() == [0.0, 1.0, 0.0] and terminated.tolist() == [False, True, False]
    assert info["_reply"].tolist() == [False, True, False]
    assert (observation_2["input_ids"][[0, 2]] == observation["input_ids"][[0, 2]]).all()
    assert info["used_tool"][1] and venv.all_finished
    with pytest.raises(RuntimeError, match="every episode has ended"):
        venv.step([None, None, None])
    _, info = venv.reset(options={"reset_mask": np.array([False, True, False])})
    assert info["_opening"].tolist() == [False, True, False] and venv.finished.tolist() == [True, False, True]


def test_the_share_of_episodes_that_call_the_tool_is_the_mean_of_used_tool() -> None:
    venv = make_venv(4, protocol="calculator")
    venv.reset(seed=0, options={"prompts": [{"prompt": "1+2=", "answer": "3"}] * 4})
    venv.step([turn("<calc>1+2</calc>"), turn("3"), turn("3"), turn("3")])
    _, _, _, _, info = venv.step([turn("3"), None, None, None])
    assert info["used_tool"][info["_used_tool"]].tolist() == [True]
    venv.reset(seed=0, options={"prompts": [{"prompt": "1+2=", "answer": "3"}] * 4})
    _, _, terminated, _, info = venv.step([turn("<calc>1+2</calc>"), turn("3"), turn("<calc>1+1</calc>"), turn("3")])
    ends = [info]
    ends.append(venv.step([turn("3"), None, turn("2"), None])[4])
    used = np.concatenate([end["used_tool"][end["_used_tool"]] for end in ends])
    assert used.mean() == 0.5


class CountingReward:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        self.batch_sizes.append(len(completions))
        return [float(len(turns)) for turns in kwargs["turns"]]


def test_rows_that_end_on_the_same_step_are_scored_in_one_call() -> None:
    counting = CountingReward()
    venv = make_venv(4, protocol="calculator", rewards=[counting])
    venv.reset(seed=0, options={"prompts": [{"prompt": "1+2=", "answer": "3"}] * 4})
    _, rewards, *_ = venv.step([turn("3"), turn("4"), turn("<calc>1+2</calc>"), turn("<calc>1+2</calc>")])
    assert counting.batch_sizes == [2] and rewards.tolist() == [1.0 + 1.0, 0.0 + 1.0, 0.0, 0.0]
    _, rewards, _, _, info = venv.step([None, None, turn("3"), turn("0")])
    assert counting.batch_sizes == [2, 2] and rewards.tolist() == [0.0, 0.0, 1.0 + 2.0, 0.0 + 2.0]
    assert info["score"][2:].tolist() == [2.0, 2.0]


def test_rows_given_the_same_seed_play_the_same_episode() -> None:
    venv = make_venv(4, protocol="guess_number")
    venv.reset(seed=[7, 7, 8, 8])
    secrets = [conversation.state.secret for conversation in venv.conversations]
    assert secrets[0] == secrets[1] and secrets[2] == secrets[3]
    single = gym.make("rlfb/MultiTurn-v0", protocol="guess_number", model=None, tokenizer=TOKENIZER).unwrapped
    single.reset(seed=8)
    assert single.conversation.state.secret == secrets[2]
    venv.reset()  # unseeded: each row's generator goes on, so the groups stay identical
    secrets = [conversation.state.secret for conversation in venv.conversations]
    assert secrets[0] == secrets[1] and secrets[2] == secrets[3]


def test_bad_vector_calls_are_clear_errors() -> None:
    venv = make_venv(2, protocol="calculator")
    with pytest.raises(ValueError, match="needs one per row"):
        venv.reset(seed=[1, 2, 3])
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="one turn per row"):
        venv.step([turn("3")])
    with pytest.raises(ValueError, match=r"reset option 'prompts' has 1 entries; this reset starts 2 rows"):
        venv.reset(options={"prompts": ["1+1="]})
    with pytest.raises(ValueError, match="reset_mask"):
        venv.reset(options={"reset_mask": np.array([0, 1])})
