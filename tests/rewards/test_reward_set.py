"""RewardSet: the contract, TRL compatibility, combination, validation errors, normalization."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import rlfb.rewards
from rlfb.errors import ConfigError, RewardError
from rlfb.rewards import RewardSet, RewardSpec, list_rewards, register

PROMPTS = ["The film was", "The plot felt"]
COMPLETIONS = [" great and fun.", " dull dull dull."]
COMPLETION_IDS = [[10, 11, 12, 13], [20, 20, 20, 21]]


def constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def test_weighted_sum_and_unweighted_components():
    rewards = RewardSet([{"name": constant(1.0), "label": "one", "weight": 2.0},
                         {"name": constant(0.5), "label": "half", "weight": -1.0}])
    result = rewards(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert rewards.names == ["one", "half"]
    np.testing.assert_allclose(result.total, [1.5, 1.5])
    np.testing.assert_allclose(result.components["half"], [0.5, 0.5])
    assert result.per_token is None
    assert result.scored.all()


def test_extra_columns_are_passed_by_name_and_signature_filters_keywords():
    seen = {}

    def strict(completions, answer):  # no **kwargs: gets only what it names
        seen["answer"] = answer
        return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]

    result = RewardSet(strict)(["1+1=", "2+2="], ["2", "5"], completion_ids=[[1], [2]], answer=["2", "4"])
    assert seen["answer"] == ["2", "4"]
    np.testing.assert_allclose(result.components["strict"], [1.0, 0.0])


def test_none_is_left_out_not_zero_and_all_none_row_is_nan():
    def partial(prompts, completions, **kwargs):
        return [None, 1.0]

    def sometimes(prompts, completions, **kwargs):
        return [2.0, None]

    result = RewardSet([{"name": partial, "weight": 1.0}, {"name": sometimes, "weight": 3.0}])(
        PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    np.testing.assert_allclose(result.total, [6.0, 1.0])
    assert math.isnan(result.components["partial"][0])

    with pytest.warns(RuntimeWarning, match="every reward returned None for 1 of 2"):
        result = RewardSet(partial)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert math.isnan(result.total[0]) and result.total[1] == 1.0
    assert result.scored.tolist() == [False, True]


def test_whole_batch_none_warns_naming_the_reward():
    def abstain(prompts, completions, **kwargs):
        return [None] * len(prompts)

    with pytest.warns(RuntimeWarning, match="reward 'abstain' returned None for every sample"):
        RewardSet([abstain, constant(1.0)])(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)


def test_async_rewards_are_awaited():
    async def slow_positive(prompts, completions, **kwargs):
        return [0.25] * len(prompts)

    result = RewardSet([slow_positive, "length"])(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    np.testing.assert_allclose(result.components["slow_positive"], [0.25, 0.25])


def test_dense_rewards_go_to_per_token_and_components_hold_their_sum():
    def per_token(prompts, completions, completion_ids, **kwargs):
        return [[0.5] * len(ids) for ids in completion_ids]

    result = RewardSet([{"name": per_token, "weight": 2.0}, constant(1.0)])(
        PROMPTS, COMPLETIONS, completion_ids=[[1, 2, 3], [4]])
    np.testing.assert_allclose(result.per_token[0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(result.per_token[1], [1.0])
    np.testing.assert_allclose(result.components["per_token"], [1.5, 0.5])
    np.testing.assert_allclose(result.total, [1.0, 1.0])  # dense rewards are not in the total


@pytest.mark.parametrize("output, problem", [
    ([1.0], "returned 1 scores for 2 completions"),
    ([1.0, float("nan")], "returned nan"),
    ([float("inf"), 0.0], "returned inf"),
    (["good", 1.0], "returned 'good'"),
    (3.0, "returned a float, expected a list"),
])
def test_bad_output_raises_reward_error_naming_reward_and_sample(output, problem):
    def broken(prompts, completions, **kwargs):
        return output

    with pytest.raises(RewardError, match=problem) as error:
        RewardSet(broken)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert "reward 'broken'" in str(error.value)
    assert "prompt: 'The" in str(error.value) and "completion: '" in str(error.value)


def test_nan_error_shows_the_offending_sample():
    def second_is_nan(prompts, completions, **kwargs):
        return [0.0, float("nan")]

    with pytest.raises(RewardError, match=r"sample 1 completion: ' dull dull dull.'"):
        RewardSet(second_is_nan)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)


def test_exception_inside_reward_is_wrapped():
    def crashes(prompts, completions, **kwargs):
        raise ZeroDivisionError("oops")

    with pytest.raises(RewardError, match="reward 'crashes' raised ZeroDivisionError: oops") as error:
        RewardSet(crashes)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert isinstance(error.value.__cause__, ZeroDivisionError)


def test_dense_length_mismatch_is_an_error():
    def wrong_dense(prompts, completions, completion_ids, **kwargs):
        return [[0.0], [0.0]]

    with pytest.raises(RewardError, match="returned 1 per-token rewards for a completion of 4 tokens"):
        RewardSet(wrong_dense)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)


def test_unknown_reward_lists_registered_names():
    with pytest.raises(ConfigError, match=r"unknown reward 'sentimnt'; registered: .*sentiment"):
        RewardSet(["sentimnt"])


def test_bad_config_entries():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['wieght'\]"):
        RewardSet([{"name": "sentiment", "wieght": 2}])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        RewardSet(["no_such_module:reward"])
    with pytest.raises(ConfigError, match="bad kwargs"):
        RewardSet([{"name": "length", "kwargs": {"tarrget": 3}}])
    with pytest.raises(ConfigError, match="share the label"):
        RewardSet(["sentiment", "sentiment"])


def test_register_and_list_and_path_resolution():
    @register("test_shout")
    def shout(prompts, completions, **kwargs):
        """Upper-case fraction."""
        return [sum(ch.isupper() for ch in c) / max(len(c), 1) for c in completions]

    assert list_rewards()["test_shout"] == "Upper-case fraction."
    by_path = RewardSet([{"name": "rlfb.rewards.builtin:SentimentReward", "kwargs": {"target": "negative"}}])
    assert by_path.names == ["SentimentReward"]
    result = by_path(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert result.total[0] < 0  # "great and fun" is positive, so its negative-target score is below zero


def test_kwargs_of_a_plain_reward_function_are_bound():
    def scaled(prompts, completions, scale=1.0, **kwargs):
        return [scale] * len(prompts)

    result = RewardSet([RewardSpec(name=scaled, kwargs={"scale": 3.0})])(PROMPTS, COMPLETIONS,
                                                                         completion_ids=COMPLETION_IDS)
    np.testing.assert_allclose(result.total, [3.0, 3.0])


def test_trl_rewards_work_unchanged():
    rewards = RewardSet(["trl.rewards:think_format_reward",
                         {"name": "trl.rewards:get_repetition_penalty_reward", "kwargs": {"ngram_size": 2}},
                         {"name": "trl.rewards:get_soft_overlong_punishment",
                          "kwargs": {"max_completion_len": 4, "soft_punish_cache": 2}}])
    result = rewards(["Q1", "Q2"], ["<think>step</think> answer", "no thinking"],
                     completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5]])
    np.testing.assert_allclose(result.components["think_format_reward"], [1.0, 0.0])
    np.testing.assert_allclose(result.components["get_repetition_penalty_reward"], [0.0, -0.75])
    # overlong: length 4 is inside the cache window (penalty -(4-2)/2 = -1.0 at the limit), length 5 beyond it
    np.testing.assert_allclose(result.components["get_soft_overlong_punishment"], [-1.0, -1.0])


def test_trl_log_metric_and_log_extra_are_collected():
    def logging_reward(prompts, completions, log_metric=None, log_extra=None, **kwargs):
        log_metric("mean_length", 2.5)
        log_extra("seen", list(completions))
        return [1.0] * len(prompts)

    result = RewardSet(logging_reward)(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    assert result.metrics == {"mean_length": 2.5}
    assert result.extra == {"seen": COMPLETIONS}


def test_logged_metrics_are_kept_across_calls_until_popped_weighted_by_batch_size():
    def fraction_long(prompts, completions, log_metric, log_extra, **kwargs):
        long = [len(text) > 3 for text in completions]
        log_metric("long_fraction", sum(long) / len(long))
        log_metric("calls", 1.0)
        log_metric("calls", 3.0)  # logged twice in one call: their mean, as TRL averages
        log_extra("long", long)
        return [1.0] * len(completions)

    rewards = RewardSet(fraction_long)
    first = rewards(["a"], ["four"])  # 1 of 1 long
    rewards(["b", "c", "d"], ["no", "longer", "x"])  # 1 of 3 long, as an env scores a batch as rows end
    assert first.metrics == {"long_fraction": 1.0, "calls": 2.0}
    logs = rewards.pop_logged()
    assert logs.metrics == {"long_fraction": pytest.approx(2 / 4), "calls": 2.0}  # the batch of 4's fraction
    assert logs.extra == [{"prompt": "a", "completion": "four", "long": True},
                          {"prompt": "b", "completion": "no", "long": False},
                          {"prompt": "c", "completion": "longer", "long": True},
                          {"prompt": "d", "completion": "x", "long": False}]
    empty = rewards.pop_logged()
    assert empty.metrics == {} and empty.extra == []


def test_log_extra_with_the_wrong_number_of_values_is_a_reward_error():
    def short_column(prompts, completions, log_extra, **kwargs):
        log_extra("seen", completions[:1])
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"log_extra\('seen', values\) got 1 values for 2 completions"):
        RewardSet(short_column)(PROMPTS, COMPLETIONS)


def test_clip_and_running_normalization_with_checkpointable_state():
    values = iter([[0.0, 10.0], [20.0, 30.0]])

    def batch_values(prompts, completions, **kwargs):
        return next(values)

    rewards = RewardSet(batch_values, normalize=True, clip=1.0)
    first = rewards(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    np.testing.assert_allclose(first.total, [-1.0, 1.0], atol=1e-6)  # mean 5, std 5
    rewards.clip = None
    second = rewards(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    all_values = np.array([0.0, 10.0, 20.0, 30.0])
    np.testing.assert_allclose(second.total, (np.array([20.0, 30.0]) - all_values.mean()) / all_values.std(),
                               atol=1e-6)
    restored = RewardSet(constant(15.0), normalize=True)
    restored.load_state_dict(rewards.state_dict())
    restored.update_normalization = False
    np.testing.assert_allclose(restored(PROMPTS, COMPLETIONS).total, [0.0, 0.0], atol=1e-6)


def test_likelihood_without_scorer_says_what_to_do():
    rewards = RewardSet(["likelihood"])
    assert rewards.needs_scorer
    with pytest.raises(RewardError, match="bind_scorer"):
        rewards(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)


def test_every_builtin_is_registered_and_text_rewards_do_not_warn():
    assert {"likelihood", "sentiment", "exact_match", "numeric_match", "length", "keyword", "repetition",
            "regex", "reward_model"} <= set(rlfb.rewards.list_rewards())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RewardSet(["sentiment", "repetition"])(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)


def test_conversational_entries_get_chat_messages():
    def chat_length(prompts, completions, **kwargs):
        assert prompts[0][0]["role"] == "user"
        return [float(len(message[0]["content"])) for message in completions]

    result = RewardSet([{"name": chat_length, "conversational": True, "kwargs": {"unused": 1}}])(
        PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
    np.testing.assert_allclose(result.total, [len(COMPLETIONS[0]), len(COMPLETIONS[1])])


def test_async_rewards_work_inside_a_running_event_loop_and_failures_name_the_reward():
    import asyncio

    async def fine(prompts, completions, **kwargs):
        return [1.0] * len(prompts)

    async def failing(prompts, completions, **kwargs):
        raise RuntimeError("judge offline")

    async def caller():  # e.g. a notebook, where an event loop is already running
        return RewardSet([fine])(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)

    np.testing.assert_allclose(asyncio.run(caller()).total, [1.0, 1.0])
    with pytest.raises(RewardError, match="reward 'failing' raised RuntimeError: judge offline"):
        RewardSet([fine, failing])(PROMPTS, COMPLETIONS, completion_ids=COMPLETION_IDS)
