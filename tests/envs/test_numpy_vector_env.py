"""NumpyVectorEnv: the batched TextGeneration-v0 in NumPy, for plain NumPy loops and Gymnasium's vector wrappers."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers.vector import NormalizeReward, RecordEpisodeStatistics

import rlfb  # noqa: F401  (registers the ids)
from rlfb.envs import NumpyVectorEnv

NUM_ENVS = 4
MAX_NEW_TOKENS = 4


def per_token_reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                     **kwargs: Any) -> list[list[float]]:
    """A dense reward: 0.25 per token, so info carries ``token_rewards`` of each episode's length."""
    return [[0.25] * len(ids) for ids in completion_ids]


@pytest.fixture
def make_torch_venv(env_model_path: str, token_count_reward: Any) -> Any:
    def make(**kwargs: Any) -> Any:
        options = {"task": "arithmetic", "model": env_model_path, "rewards": [token_count_reward],
                   "max_new_tokens": MAX_NEW_TOKENS, "max_prompt_tokens": 12, "device": "cpu", **kwargs}
        return gym.make_vec("rlfb/TextGeneration-v0", num_envs=NUM_ENVS, vectorization_mode="vector_entry_point",
                            **options)

    return make


@pytest.fixture
def errors_on_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def eos_then_random_actions(venv: Any, seed: int) -> Iterator[np.ndarray]:
    """Seeded actions with EOS on row 0's second step, so episodes end on different steps (and some terminate)."""
    rng = np.random.default_rng(seed)
    eos = venv.unwrapped.eos_token_id
    for step in range(MAX_NEW_TOKENS):
        actions = rng.integers(0, venv.single_action_space.n - 1, size=NUM_ENVS)
        actions[actions >= eos] += 1  # never EOS by chance
        if step == 1:
            actions[0] = eos
        yield actions


def run_numpy_loop(venv: Any, seed: int = 0) -> dict[str, Any]:
    """The loop NumPy code writes: step until every row is done, summing rewards per row."""
    obs, reset_info = venv.reset(seed=seed)
    done = np.zeros(venv.num_envs, dtype=bool)
    returns = np.zeros(venv.num_envs)
    infos = []
    for actions in eos_then_random_actions(venv, seed):
        if done.all():
            break
        obs, rewards, terminated, truncated, info = venv.step(actions)
        done |= terminated | truncated
        returns += rewards
        infos.append(info)
    return {"obs": obs, "reset_info": reset_info, "done": done, "returns": returns, "infos": infos,
            "rewards": rewards, "terminated": terminated}


def episode_lengths(infos: list[dict[str, Any]]) -> np.ndarray:
    """Per row, the tokens its episode took, from ``info["length"]`` of the step it ended on."""
    lengths = np.zeros(NUM_ENVS, dtype=np.int64)
    for info in infos:
        if "_length" in info:
            lengths[info["_length"]] = info["length"][info["_length"]]
    return lengths


def test_plain_numpy_loop_runs_every_episode_to_its_scored_end(make_torch_venv: Any,
                                                                  errors_on_warnings: None) -> None:
    venv = NumpyVectorEnv(make_torch_venv())
    result = run_numpy_loop(venv)
    assert result["done"].all()
    lengths = episode_lengths(result["infos"])
    assert lengths.tolist() == [2, MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_NEW_TOKENS]  # row 0 took EOS at step 2
    np.testing.assert_array_equal(result["returns"], lengths)  # the reward counts the tokens taken
    obs = result["obs"]
    assert venv.observation_space.contains(obs)
    for key, space in venv.observation_space.spaces.items():
        assert type(obs[key]) is np.ndarray and obs[key].dtype == space.dtype
    assert type(result["rewards"]) is np.ndarray and result["rewards"].dtype == np.float32
    assert type(result["terminated"]) is np.ndarray and result["terminated"].dtype == np.bool_


def test_numpy_outputs_equal_the_torch_outputs(make_torch_venv: Any) -> None:
    """Same seed and actions: every output of the wrapper equals the torch env's, converted."""
    torch_venv = make_torch_venv(rewards=[per_token_reward])
    numpy_venv = NumpyVectorEnv(make_torch_venv(rewards=[per_token_reward]))
    torch_obs, torch_info = torch_venv.reset(seed=3)
    numpy_obs, numpy_info = numpy_venv.reset(seed=3)
    assert numpy_info["prompt"].tolist() == torch_info["prompt"].tolist()
    for actions in eos_then_random_actions(numpy_venv, seed=3):
        torch_step = torch_venv.step(actions)
        numpy_step = numpy_venv.step(actions)
        for key in torch_step[0]:
            np.testing.assert_array_equal(numpy_step[0][key], torch_step[0][key].numpy())
        for torch_array, numpy_array in zip(torch_step[1:4], numpy_step[1:4], strict=True):
            np.testing.assert_array_equal(numpy_array, torch_array.numpy())
        torch_info, numpy_info = torch_step[4], numpy_step[4]
        assert sorted(numpy_info) == sorted(torch_info)
        if "_completion" in torch_info:
            mask = torch_info["_completion"]
            assert numpy_info["completion"][mask].tolist() == torch_info["completion"][mask].tolist()
            assert (numpy_info["completion"][~mask] == "").all()
            for row in np.flatnonzero(mask):  # per-token rewards, zero-padded to max_new_tokens
                taken = torch_info["token_rewards"][row]
                np.testing.assert_array_equal(numpy_info["token_rewards"][row, :len(taken)], taken)
                assert (numpy_info["token_rewards"][row, len(taken):] == 0).all()
            np.testing.assert_array_equal(numpy_info["score"], torch_info["score"])


def test_info_holds_only_plain_numpy_arrays(make_torch_venv: Any) -> None:
    venv = NumpyVectorEnv(make_torch_venv(rewards=[per_token_reward]))
    result = run_numpy_loop(venv, seed=1)
    infos = [result["reset_info"], *result["infos"]]
    assert any("token_rewards" in info for info in infos)
    for info in infos:
        for key, value in info.items():
            assert type(value) is np.ndarray and value.dtype.kind in "biufU", (key, value.dtype)
            assert len(value) == NUM_ENVS
    assert all(info["token_rewards"].shape == (NUM_ENVS, MAX_NEW_TOKENS) for info in infos if "token_rewards" in info)


def test_record_episode_statistics_records_the_returns_the_loop_sums(make_torch_venv: Any,
                                                                      errors_on_warnings: None) -> None:
    venv = RecordEpisodeStatistics(NumpyVectorEnv(make_torch_venv()))
    result = run_numpy_loop(venv)
    recorded = np.zeros(NUM_ENVS)
    recorded_lengths = np.zeros(NUM_ENVS, dtype=np.int64)
    for info in result["infos"]:
        if "episode" in info:
            recorded[info["_episode"]] = info["episode"]["r"][info["_episode"]]
            recorded_lengths[info["_episode"]] = info["episode"]["l"][info["_episode"]]
    np.testing.assert_array_equal(recorded, result["returns"])
    np.testing.assert_array_equal(recorded_lengths, episode_lengths(result["infos"]))
    assert list(venv.return_queue) == [2, MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_NEW_TOKENS]  # in the order they ended

    # a partial reset (the autoreset-disabled way to start new episodes on some rows) is recorded too
    mask = np.array([True, True, False, False])
    venv.reset(options={"reset_mask": mask})
    returns = np.zeros(NUM_ENVS)
    done = ~mask
    while not done.all():
        _, rewards, terminated, truncated, info = venv.step(np.full(NUM_ENVS, 7))
        done |= terminated | truncated
        returns += rewards
    assert info["_episode"].tolist() == mask.tolist()
    np.testing.assert_array_equal(info["episode"]["r"][mask], [MAX_NEW_TOKENS, MAX_NEW_TOKENS])
    np.testing.assert_array_equal(returns, [MAX_NEW_TOKENS, MAX_NEW_TOKENS, 0, 0])


def test_normalize_reward_scales_the_rewards_the_env_pays(make_torch_venv: Any, errors_on_warnings: None) -> None:
    normalized = NormalizeReward(NumpyVectorEnv(make_torch_venv()), gamma=0.9)
    normalized.reset(seed=0)
    scales = []
    for actions in eos_then_random_actions(normalized, seed=0):
        _, rewards, _, _, info = normalized.step(actions)
        paid = np.where(info.get("_length", False), info.get("length", 0), 0)  # the reward counts the tokens
        scale = np.sqrt(normalized.return_rms.var + normalized.epsilon)  # the running std it divided by
        np.testing.assert_allclose(rewards * scale, paid, rtol=1e-6)
        scales.append(scale)
    assert scales[-1] != 1.0


def test_numpy_actions_of_any_integer_dtype_are_accepted(make_torch_venv: Any) -> None:
    venv = NumpyVectorEnv(make_torch_venv())
    venv.reset(seed=0)
    obs, *_ = venv.step(np.array([5, 6, 7, 8], dtype=np.int32))
    start = venv.unwrapped.max_prompt_tokens
    assert obs["input_ids"][:, start].tolist() == [5, 6, 7, 8]
    obs, *_ = venv.step(venv.action_space.sample())
    assert obs["attention_mask"][:, start + 1].tolist() == [1] * NUM_ENVS


def test_wrapping_another_vector_env_is_a_clear_error() -> None:
    other = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync")
    with pytest.raises(TypeError, match=r"NumpyVectorEnv wraps the vector env of gym\.make_vec\('rlfb/"
                                        r"TextGeneration-v0'.*got SyncVectorEnv"):
        NumpyVectorEnv(other)
