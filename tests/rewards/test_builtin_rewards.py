"""The built-in text rewards."""

from __future__ import annotations

import numpy as np
import pytest

from rlfb.errors import ConfigError, RewardError
from rlfb.rewards import RewardSet
from rlfb.rewards.builtin import (
    ExactMatchReward,
    KeywordReward,
    LengthReward,
    NumericMatchReward,
    RegexReward,
    RepetitionReward,
    SentimentReward,
    _vader,
)


def test_sentiment_orders_positive_above_negative_and_reuses_one_analyzer():
    reward = SentimentReward()
    scores = reward(["The film was"] * 3, [" wonderful and brilliant.", " quite long.", " awful and boring."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    assert _vader() is _vader()
    negative = SentimentReward(target="negative")(["x"], [" wonderful and brilliant."])
    assert negative[0] == pytest.approx(-scores[0])


def test_sentiment_can_include_the_prompt():
    with_prompt = SentimentReward(include_prompt=True)(["I hated it, but"], [" fine."])
    without = SentimentReward()(["I hated it, but"], [" fine."])
    assert with_prompt[0] != without[0]
    # The prompt's "hated" pulls the score down: prompt and completion are scored as one text.
    assert with_prompt[0] < 0 < without[0]
    assert with_prompt == SentimentReward()([""], ["I hated it, but fine."])


def test_exact_and_numeric_match_use_the_answer_column():
    completions = ["42", " 42 ", "41", "The answer is 42.", "none"]
    answers = ["42"] * 5
    assert ExactMatchReward()([""] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert NumericMatchReward()([""] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
    partial = NumericMatchReward(partial_credit=True, missing=-1.0)([""] * 5, completions, answer=answers)
    assert partial == [1.0, 1.0, 0.5, 1.0, -1.0]


def test_missing_answer_column_is_a_reward_error_naming_columns():
    with pytest.raises(RewardError, match=r"exact_match needs the task column 'answer'.*columns given: \['label'\]"):
        RewardSet(["exact_match"])(["1+1="], ["2"], completion_ids=[[5]], label=["2"])


def test_length_in_tokens_words_and_chars():
    ids = [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert LengthReward(target=4)(["", ""], ["a", "b"], completion_ids=ids) == [0.0, -1.0]
    assert LengthReward(target=2, unit="words")([""], ["one two three"]) == [-0.5]
    assert LengthReward(target=10, unit="chars")([""], ["12345"]) == [-0.5]


def test_keyword_include_and_avoid_whole_words_case_insensitive():
    reward = KeywordReward(include=["great", "fun"], avoid=["boring"])
    assert reward([""] * 3, ["Great and fun", "great but BORING", "greatest"]) == [1.0, -0.5, 0.0]


def test_repetition_is_distinct_n():
    reward = RepetitionReward(n=2)
    assert reward([""] * 3, ["a b c d", "a b a b a b", "a"]) == [1.0, 0.4, 1.0]
    tokens = RepetitionReward(n=1, unit="tokens")([""] * 2, ["", ""], completion_ids=[[1, 1, 1, 1], [1, 2]])
    assert tokens == [0.25, 1.0]


def test_regex_search_and_fullmatch():
    assert RegexReward(r"\d+")([""] * 2, ["is 42", "none"]) == [1.0, 0.0]
    assert RegexReward(r"\d+", mode="fullmatch", miss=-1.0)([""] * 2, ["is 42", "42"]) == [-1.0, 1.0]


@pytest.mark.parametrize("entry, message", [
    ({"name": "regex", "kwargs": {"pattern": "("}}, "does not compile"),
    ({"name": "length", "kwargs": {"target": 0}}, "target must be at least 1"),
    ({"name": "keyword"}, "at least one word"),
    ({"name": "repetition", "kwargs": {"unit": "letters"}}, "must be words or tokens"),
    ({"name": "sentiment", "kwargs": {"target": "happy"}}, "must be 'positive' or 'negative'"),
])
def test_bad_kwargs_of_builtins_are_config_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        RewardSet([entry])


def test_builtins_combine_in_one_set():
    rewards = RewardSet([{"name": "sentiment", "weight": 1.0},
                         {"name": "repetition", "weight": 0.5},
                         {"name": "regex", "kwargs": {"pattern": r"[.!]$"}, "weight": 0.25}])
    result = rewards(["The film was"] * 2, [" great great great great.", " awful"], completion_ids=[[1], [2]])
    assert result.total[0] > result.total[1]
    np.testing.assert_allclose(result.components["regex"], [1.0, 0.0])
