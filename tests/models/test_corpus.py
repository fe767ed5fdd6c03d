"""The seeded grammar: determinism, held-out splits, balance, and VADER polarity of its wording."""

from __future__ import annotations

import hashlib
import random
import re
import statistics

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlfb.models import corpus


@pytest.fixture(scope="module")
def vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def test_review_openings_are_deterministic_and_seeded() -> None:
    assert corpus.review_openings("eval", 50, seed=3) == corpus.review_openings("eval", 50, seed=3)
    assert corpus.review_openings("eval", 50, seed=3) != corpus.review_openings("eval", 50, seed=4)


def test_review_openings_splits_are_disjoint_and_cover_requests_larger_than_the_pool() -> None:
    train = set(corpus.review_openings("train", 500))
    evaluation = set(corpus.review_openings("eval", 500))
    assert train and evaluation and not train & evaluation
    drawn = corpus.review_openings("eval", 200)
    assert len(drawn) == 200 and set(drawn) == evaluation  # the whole eval pool, each used before repeats


def test_unknown_split_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown split 'test'.*'train' or 'eval'"):
        corpus.review_openings("test", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown split"):
        corpus.arithmetic_problems("dev")  # type: ignore[arg-type]


def test_eval_sums_never_appear_in_a_pretraining_corpus() -> None:
    documents = corpus.pretraining_corpus(20_000, seed=0, arithmetic_share=0.5)
    eval_prompts = {prompt for prompt, _ in corpus.arithmetic_problems("eval")}
    corpus_prompts = {line.split("=")[0] + "=" for line in documents if "+" in line}
    assert len(corpus_prompts) > 1000 and not corpus_prompts & eval_prompts
    assert all(int(answer) == sum(map(int, prompt[:-1].split("+")))
               for prompt, answer in corpus.arithmetic_problems("eval"))


def test_corpus_is_deterministic_and_has_the_requested_mix() -> None:
    documents = corpus.pretraining_corpus(3000, seed=1, arithmetic_share=0.4, forgotten_carry_share=0.7)
    assert documents == corpus.pretraining_corpus(3000, seed=1, arithmetic_share=0.4, forgotten_carry_share=0.7)
    assert len([line for line in documents if "+" in line]) == 1200


def test_the_only_wrong_answers_are_forgotten_carries_in_the_requested_share() -> None:
    documents = corpus.pretraining_corpus(8000, seed=1, arithmetic_share=1.0, forgotten_carry_share=0.7)
    shown = {"carry right": 0, "carry forgotten": 0, "no carry right": 0}
    for line in documents:
        a, b, answer = map(int, line.replace("=", "+").split("+"))
        if not corpus.carries(a, b):
            assert answer == a + b, line  # a sum without a carry is never wrong
            shown["no carry right"] += 1
        else:
            assert answer in (a + b, a + b - 10), line  # the one systematic mistake: 17+25=32
            shown["carry right" if answer == a + b else "carry forgotten"] += 1
    carry_sums = shown["carry right"] + shown["carry forgotten"]
    assert 0.67 < shown["carry forgotten"] / carry_sums < 0.73
    assert 0.42 < carry_sums / len(documents) < 0.48  # 45 of the 100 pairs of ones digits carry


def test_carries_and_forgotten_carry_by_hand() -> None:
    assert corpus.carries(17, 25) and corpus.forgotten_carry(17, 25) == 32
    assert corpus.carries(55, 45) and corpus.forgotten_carry(55, 45) == 90
    assert not corpus.carries(14, 25) and corpus.forgotten_carry(14, 25) == 39
    assert not corpus.carries(19, 10) and corpus.forgotten_carry(99, 99) == 188


def test_review_sentiments_are_balanced_and_vader_agrees(vader: SentimentIntensityAnalyzer) -> None:
    scores: dict[str, list[float]] = {sentiment: [] for sentiment in corpus.SENTIMENTS}
    for sentiment, sentence in corpus.labelled_reviews(900, seed=0):
        scores[sentiment].append(vader.polarity_scores(sentence)["compound"])
    assert {len(values) for values in scores.values()} == {300}
    assert min(scores["positive"]) > 0.3 and statistics.mean(scores["positive"]) > 0.6
    assert max(scores["negative"]) < -0.2 and statistics.mean(scores["negative"]) < -0.5
    assert all(value == 0.0 for value in scores["neutral"])


def test_openings_are_sentiment_neutral(vader: SentimentIntensityAnalyzer) -> None:
    openings = corpus.review_openings("train", 500) + corpus.review_openings("eval", 500)
    assert all(vader.polarity_scores(opening)["compound"] == 0.0 for opening in openings)


def test_every_review_word_is_in_the_vocabulary_and_sentences_end() -> None:
    vocabulary = corpus.corpus_vocabulary()
    rng = random.Random(0)
    for sentiment in corpus.SENTIMENTS * 200:
        sentence = corpus.review_sentence(rng, sentiment)
        assert set(corpus.words(sentence)) <= vocabulary, sentence
        assert sentence.endswith((".", "!"))
    assert "wonderful" in vocabulary and "xylophone" not in vocabulary


def test_is_arithmetic_tells_sums_from_reviews() -> None:
    documents = corpus.pretraining_corpus(300, seed=2, arithmetic_share=0.5)
    assert sum(map(corpus.is_arithmetic, documents)) == 150
    assert corpus.is_arithmetic("17+25=41") and not corpus.is_arithmetic("The plot was 17+25=42 great.")


# ------------------------------------------------------------------------------------------ transcripts
def _operands(text: str) -> tuple[int, int]:
    a, b = (int(number) for number in re.findall(r"\d+", text)[:2])
    return a, b


def test_transcripts_keep_the_eval_sums_held_out_and_are_seeded() -> None:
    options = {"arithmetic_share": 1.0, "tool_share": 0.3, "question_share": 0.3}
    documents = corpus.pretraining_corpus(6000, seed=0, **options)
    assert documents == corpus.pretraining_corpus(6000, seed=0, **options)
    assert documents != corpus.pretraining_corpus(6000, seed=1, **options)
    eval_pairs = {_operands(prompt) for prompt, _ in corpus.arithmetic_problems("eval")}
    seen = {_operands(corpus.document_text(document)) for document in documents}
    assert len(seen) > 1000 and not seen & eval_pairs
    calls = [d for d in documents if isinstance(d, corpus.Transcript) and d.opening.endswith("=")]
    questions = [d for d in documents if isinstance(d, corpus.Transcript) and d.opening.startswith("Calculate ")]
    assert 1500 < len(calls) < 2100 and 1500 < len(questions) < 2100
    for call in calls:  # the call names the prompt's sum and the final answer copies the tool's result
        a, b = _operands(call.opening)
        assert call.turns == (f"<calc>{a}+{b}</calc>", str(a + b)) and call.replies == (str(a + b),)


def test_questions_forget_carries_like_sum_lines() -> None:
    documents = corpus.pretraining_corpus(4000, seed=2, arithmetic_share=1.0, question_share=1.0)
    forgotten = carry = 0
    for question in documents:
        assert isinstance(question, corpus.Transcript) and question.opening.startswith("Calculate ")
        a, b = _operands(question.opening)
        answer = int(question.turns[0])
        assert question.turns[0].startswith(" ") and answer in (a + b, corpus.forgotten_carry(a, b))
        if corpus.carries(a, b):
            carry += 1
            forgotten += answer != a + b
    assert 0.65 < forgotten / carry < 0.75


def test_games_follow_the_rules_and_careful_players_win_more_often() -> None:
    rng = random.Random(0)
    wins = {True: 0, False: 0}
    for index in range(2000):
        careful = index % 2 == 0
        game = corpus.guess_game(rng, 1, 20, careful)
        guesses = [int(turn) for turn in game.turns]
        assert game.opening == "Guess 1-20:" and len(guesses) <= corpus.MAX_GAME_GUESSES
        solved = game.replies[-1:] == (corpus.CORRECT,)
        assert len(game.replies) == len(guesses) - (not solved) and len(set(guesses)) == len(guesses)
        assert solved or len(guesses) == corpus.MAX_GAME_GUESSES
        low, high = 1, 20
        for guess, reply in zip(guesses, game.replies, strict=False):
            # the replies bracket the secret; a careful guess stays within what they still allow
            if careful:
                assert low <= guess <= high
            if reply != corpus.CORRECT:
                low, high = (guess + 1, high) if reply == corpus.HIGHER else (low, guess - 1)
        assert low <= guesses[-1] <= high or not careful
        wins[careful] += solved and len(guesses) <= 5
    assert wins[True] > 0.85 * 1000 and 0.15 * 1000 < wins[False] < 0.35 * 1000


def test_a_corpus_without_transcripts_is_the_one_from_before_them() -> None:
    # rlfb-tiny's recipe has no transcripts: its corpus (and so its shipped build) must not change.
    documents = corpus.pretraining_corpus(500, seed=0, arithmetic_share=0.7, forgotten_carry_share=0.7)
    assert all(isinstance(document, str) for document in documents)
    assert hashlib.sha256("\n".join(documents).encode()).hexdigest()[:16] == "64f58e86ef149753"
