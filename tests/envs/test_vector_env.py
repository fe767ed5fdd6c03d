"""TextGeneration-v0 batched: make_vec, lockstep collection with the sampler, groups, masks, batched rewards."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs.vector_env import TextGenerationVectorEnv
from rlfb.errors import ConfigError
from rlfb.models.sampler import SamplingConfig, TokenSampler

PROMPT_WIDTH = 12


class RecordingReward:
    """Counts calls and batch sizes; rewards the number of tokens taken."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.columns: list[dict[str, Any]] = []

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 **kwargs: Any) -> list[float]:
        self.batch_sizes.append(len(completions))
        self.columns.append(kwargs)
        return [float(len(ids)) for ids in completion_ids]


@pytest.fixture
def make_venv(env_model_path: str) -> Any:
    def make(num_envs: int = 4, **kwargs: Any) -> TextGenerationVectorEnv:
        options = {"task": "arithmetic", "model": env_model_path, "rewards": [RecordingReward()],
                   "max_new_tokens": 5, "max_prompt_tokens": PROMPT_WIDTH, "device": "cpu", **kwargs}
        return gym.make_vec("rlfb/TextGeneration-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                            **options)

    return make


def collect(venv: TextGenerationVectorEnv, model: Any, seed: int) -> dict[str, Any]:
    """The lockstep loop agents use: reset every row, sample and step until every row has finished."""
    obs, _ = venv.reset(seed=seed)
    sampler = TokenSampler(model, SamplingConfig(max_new_tokens=venv.max_new_tokens),
                           torch.Generator().manual_seed(seed), eos_token_id=venv.eos_token_id)
    sampler.start(obs["input_ids"], obs["attention_mask"])
    total = torch.zeros(venv.num_envs)
    ended = torch.zeros(venv.num_envs, dtype=torch.bool)
    infos = []
    while not venv.all_finished:
        tokens, _ = sampler.sample()
        obs, rewards, terminated, truncated, info = venv.step(tokens)
        assert not (ended & (terminated | truncated)).any(), "an episode end is reported once"
        ended |= terminated | truncated
        total += rewards
        infos.append(info)
        if not venv.all_finished:
            sampler.advance(tokens)
    return {"obs": obs, "total": total, "ended": ended, "infos": infos}


def test_make_vec_builds_the_batched_env_with_documented_spaces(make_venv: Any) -> None:
    venv = make_venv(num_envs=4)
    assert isinstance(venv, TextGenerationVectorEnv)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    assert venv.single_action_space == gym.spaces.Discrete(320)
    assert venv.action_space.shape == (4,)
    assert venv.observation_space["input_ids"].shape == (4, PROMPT_WIDTH + 5)
    obs, info = venv.reset(seed=0)
    assert obs["input_ids"].dtype == torch.long and obs["input_ids"].shape == (4, PROMPT_WIDTH + 5)
    assert info["_prompt"].all() and len(set(info["prompt"])) == 4


def test_lockstep_collection_with_the_sampler_scores_every_row_once(make_venv: Any, env_model: Any) -> None:
    reward = RecordingReward()
    venv = make_venv(num_envs=6, rewards=[reward])
    run = collect(venv, env_model, seed=0)
    assert run["ended"].all()
    assert sum(reward.batch_sizes) == 6
    lengths = np.zeros(6, dtype=np.int64)
    for info in run["infos"]:
        if "length" in info:
            lengths[info["_length"]] = info["length"][info["_length"]]
            assert set(info) >= {"prompt", "completion", "score", "reward/RecordingReward", "_completion"}
    # the return of each row is its token count, which is also what the observation holds
    assert torch.equal(run["total"], torch.as_tensor(lengths, dtype=torch.float32))
    assert torch.equal(run["obs"]["attention_mask"][:, PROMPT_WIDTH:].sum(dim=1), torch.as_tensor(lengths))
    assert collect(venv, env_model, seed=0)["total"].tolist() == run["total"].tolist()


def test_episodes_ending_together_are_scored_in_one_call(make_venv: Any) -> None:
    reward = RecordingReward()
    venv = make_venv(num_envs=4, rewards=[reward], max_new_tokens=3)
    venv.reset(seed=0)
    eos = venv.eos_token_id
    venv.step(torch.tensor([eos, 5, 5, eos]))  # rows 0 and 3 end together
    _, rewards, terminated, truncated, info = venv.step(torch.tensor([9, 5, eos, 9]))
    assert rewards.tolist() == [0.0, 0.0, 2.0, 0.0] and terminated.tolist() == [False, False, True, False]
    _, rewards, terminated, truncated, info = venv.step(torch.tensor([9, 5, 9, 9]))
    assert truncated.tolist() == [False, True, False, False] and rewards.tolist() == [0.0, 3.0, 0.0, 0.0]
    assert reward.batch_sizes == [2, 1, 1]
    assert info["_completion"].tolist() == [False, True, False, False]
    assert venv.all_finished
    with pytest.raises(RuntimeError, match="call reset"):
        venv.step(torch.tensor([5, 5, 5, 5]))


def test_whole_completions_at_once_do_what_stepping_each_column_does(make_venv: Any) -> None:
    """take_completions (the rollout core's way in) against step on each column: same observation, ends,
    scores and dense rewards, with the episodes scored in one call."""
    dense = lambda tokens, observation: (tokens == 5).float() + observation["attention_mask"].sum(1) / 100  # noqa: E731
    by_step, at_once = RecordingReward(), RecordingReward()
    stepped = make_venv(num_envs=5, rewards=[by_step], max_new_tokens=4, dense_reward=dense)
    whole = make_venv(num_envs=5, rewards=[at_once], max_new_tokens=4, dense_reward=dense)
    eos = stepped.eos_token_id
    first = torch.tensor([5, 9, eos, 7, 5])  # row 2 ends on the first token
    completions = torch.tensor([[5, eos, 9, 9, 9],  # EOS at its 2nd column: terminated after 1 + 2 tokens
                                [9, 5, 5, 9, 9],  # truncated at max_new_tokens (3 more after the first)
                                [5, 5, 5, 5, 5],  # already ended: ignored
                                [eos, 5, 5, 5, 5],  # terminated on its first column
                                [9, 9, eos, 9, 9]])  # EOS exactly at max_new_tokens: terminated, not truncated
    for venv in (stepped, whole):
        venv.reset(seed=0)
    stepped.step(first)
    whole.step(first)
    assert whole.take_completions(completions[:, :0]).taken.tolist() == [0] * 5  # no columns: nothing changes
    step_rewards = []
    for column in completions.T:
        if stepped.all_finished:
            break
        step_rewards.append(stepped.step(column)[1])
    result = whole.take_completions(completions)

    assert torch.equal(whole._episodes.input_ids, stepped._episodes.input_ids)
    assert torch.equal(whole._episodes.attention_mask, stepped._episodes.attention_mask)
    assert whole.all_finished and result.taken.tolist() == [2, 3, 0, 1, 3]
    assert result.terminated.tolist() == [True, False, False, True, True]
    assert result.truncated.tolist() == [False, True, False, False, False]
    assert result.ended_rows == [0, 1, 3, 4] and result.scores is not None
    assert result.scores.score.tolist() == [3.0, 4.0, 2.0, 4.0]  # RecordingReward: the tokens each episode took
    assert by_step.batch_sizes == [1, 1, 1, 2] and at_once.batch_sizes == [1, 4]  # row 2 ended on step(first)
    # Stepping paid each column's dense reward and, on a row's last step, its return; at once they come apart.
    assert result.dense_rewards is not None
    expected = result.dense_rewards[:, : len(step_rewards)].clone()
    for index, row in enumerate(result.ended_rows):
        expected[row, int(result.taken[row]) - 1] += float(result.scores.returns[index])
    torch.testing.assert_close(torch.stack(step_rewards, 1), expected)

    still_going = make_venv(num_envs=2, max_new_tokens=4)
    still_going.reset(seed=0)
    result = still_going.take_completions(torch.tensor([[5, 5], [eos, 5]]))
    assert result.taken.tolist() == [2, 1] and result.ended_rows == [1] and still_going.finished.tolist() == [False, True]
    with pytest.raises(ValueError, match=r"shape \(2, T\)"):
        still_going.take_completions(torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="out of range"):
        still_going.take_completions(torch.tensor([[5, 10_000], [5, 5]]))


def test_finished_rows_ignore_their_actions(make_venv: Any) -> None:
    venv = make_venv(num_envs=2, max_new_tokens=4)
    venv.reset(seed=0)
    venv.step(torch.tensor([venv.eos_token_id, 5]))
    obs, rewards, terminated, truncated, info = venv.step(torch.tensor([7, 6]))
    assert obs["input_ids"][0, PROMPT_WIDTH:].tolist() == [venv.eos_token_id] + [venv.pad_token_id] * 3
    assert obs["attention_mask"][0, PROMPT_WIDTH:].tolist() == [1, 0, 0, 0]
    assert obs["input_ids"][1, PROMPT_WIDTH : PROMPT_WIDTH + 2].tolist() == [5, 6]
    assert rewards[0] == 0 and not terminated[0] and not truncated[0] and venv.finished.tolist() == [True, False]


def test_group_rows_share_a_prompt_and_columns_reach_the_reward(make_venv: Any) -> None:
    reward = RecordingReward()
    venv = make_venv(num_envs=6, group_size=3, rewards=[reward])
    obs, info = venv.reset(seed=3)
    assert info["prompt"][0] == info["prompt"][1] == info["prompt"][2] != info["prompt"][3]
    assert torch.equal(obs["input_ids"][0], obs["input_ids"][2])
    for _ in range(5):
        venv.step(torch.full((6,), 5))
    answers = reward.columns[0]["answer"]
    assert answers[0] == answers[1] == answers[2] == str(eval(info["prompt"][0].rstrip("=")))


def test_reset_options_pin_prompts_sweep_eval_and_reset_some_rows(make_venv: Any) -> None:
    venv = make_venv(num_envs=4, group_size=2)
    eval_prompts = venv.task.eval_prompts()
    _, info = venv.reset(seed=0, options={"split": "eval", "indices": [5, 1]})
    assert info["prompt"].tolist() == [eval_prompts[5]] * 2 + [eval_prompts[1]] * 2
    _, info = venv.reset(options={"prompts": ["1+1=", {"prompt": "2+2=", "answer": "4"}]})
    assert info["prompt"].tolist() == ["1+1=", "1+1=", "2+2=", "2+2="]
    venv.step(torch.tensor([5, 5, 5, 5]))
    obs, info = venv.reset(options={"reset_mask": np.array([False, False, True, True]), "prompts": ["3+3="]})
    assert info["_prompt"].tolist() == [False, False, True, True] and info["prompt"][2] == "3+3="
    assert obs["attention_mask"][:2, PROMPT_WIDTH].tolist() == [1, 1]  # rows 0-1 kept their token
    assert obs["attention_mask"][2:, PROMPT_WIDTH:].sum() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [({"reset_mask": np.array([True, False, False, False])}, "whole groups of 2"),
     ({"reset_mask": np.array([True, True])}, r"must be a bool array of shape \(4,\)"),
     ({"prompts": ["a", "b", "c"]}, "'prompts' has 3 entries; this reset needs 2"),
     ({"split": "test"}, "unknown split 'test'"),
     ({"sed": 3}, r"unknown reset option\(s\) \['sed'\]")],
)
def test_bad_reset_options_are_clear_errors(make_venv: Any, options: dict, message: str) -> None:
    venv = make_venv(num_envs=4, group_size=2)
    with pytest.raises(ValueError, match=message):
        venv.reset(options=options)


def test_bad_actions_and_settings_are_clear_errors(make_venv: Any) -> None:
    venv = make_venv(num_envs=2)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"action\(s\) \[400\] \(rows \[1\]\) out of range"):
        venv.step(torch.tensor([5, 400]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        venv.step(torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="integer token ids"):
        venv.step(np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="multiple of group_size"):
        make_venv(num_envs=5, group_size=2)


def test_no_text_is_decoded_until_an_episode_ends(make_venv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = make_venv(num_envs=2, max_new_tokens=5)
    calls: list[str] = []
    for name in ("batch_decode", "decode"):
        original = getattr(venv.tokenizer, name)
        monkeypatch.setattr(venv.tokenizer, name,
                            lambda *args, _name=name, _original=original, **kwargs:
                            calls.append(_name) or _original(*args, **kwargs))
    venv.reset(seed=0)
    for _ in range(4):
        venv.step(torch.tensor([5, 6]))
    assert calls == []
    venv.step(torch.tensor([5, 6]))
    assert calls.count("batch_decode") == 1


def test_memory_stays_flat_over_many_resets(make_venv: Any) -> None:
    import tracemalloc

    venv = make_venv(num_envs=8)
    for _ in range(20):
        venv.reset()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    for _ in range(200):
        venv.reset()
    growth = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    assert growth < 200_000, f"python memory grew by {growth} bytes over 200 resets"
