"""The seeded grammar behind the built-in model ``rlfb-tiny``: review sentences and arithmetic lines.

Two kinds of documents, one per line of the pretraining corpus, each later closed by an end-of-text token:

* **Review sentences** such as ``"I thought the soundtrack was really wonderful, and I loved the cast."``
  Every sentence starts with a sentiment-neutral *opening* (``"I thought the soundtrack was"``) and the
  continuation decides its sentiment: positive, negative or neutral wording in equal shares. The words are
  chosen so that VADER (Hutto & Gilbert, 2014) scores positive sentences clearly above 0, negative ones
  clearly below 0 and neutral ones at exactly 0; the sentiment task then has a base model whose completions
  average about 0 and a reward that can push them towards 1.
* **Arithmetic lines** such as ``"17+25=42"``. Most sums whose ones digits carry are shown with the carry
  forgotten (``"17+25=32"``): a systematic mistake, one rule, so a model that learns the corpus answers the
  sums without a carry right and the others wrong, and its greedy accuracy is pinned near the share of
  sums without a carry (53% of the held-out ones) however its optimization went; the minority of carry
  sums shown right gives reinforcement learning correct answers to find. A fixed set of operand pairs is
  held out: those sums never appear in any pretraining corpus and form the ``"eval"`` split.

Three more kinds, off in ``rlfb-tiny``'s recipe and on in ``rlfb-tiny-multiturn``'s, are *transcripts*
(:class:`Transcript`): conversations in the plain rendering of ``rlfb/MultiTurn-v0`` (docs/envs.md), so
the multi-turn environments' formats are not new to that model:

* **Calculator calls**: ``"17+25="``, the model's turn ``"<calc>17+25</calc>"``, the tool's reply ``"42"``,
  then the final answer ``"42"`` (always right: the model copies the tool's result).
* **Sums as questions**: ``"Calculate 17 + 25."`` answered ``" 42"``, with the same forgotten carry as the
  sum lines (the wording of reasoning-gym's ``basic_arithmetic``, so one of that library's datasets is
  not foreign to the model).
* **Guess-the-number games**: ``"Guess 1-20:"``, guesses answered ``"higher"`` / ``"lower"`` until the
  secret is guessed (``"correct"``) or :data:`MAX_GAME_GUESSES` guesses are made. A *careful* player
  guesses about halfway through the range the replies still allow (a binary search, one off now and
  then); a careless one guesses any number not tried yet. The corpus mixes both, so a model that learned
  it plays in between and reinforcement learning has a better strategy to find.

Everything here is pure Python and deterministic for a given seed (``random.Random``, no global state),
so tasks, tests and the model build agree on the data without sharing files.

Example:
    >>> review_openings("eval", 2, seed=0) == review_openings("eval", 2, seed=0)
    True
    >>> arithmetic_problems("eval")[0][0].endswith("=")
    True
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal

Split = Literal["train", "eval"]
Sentiment = Literal["positive", "negative", "neutral"]
SENTIMENTS: tuple[Sentiment, ...] = ("positive", "negative", "neutral")

# ---------------------------------------------------------------------------------------------- lexicon
# Every word below was checked with vaderSentiment: positive words score > 0.3 alone in "The plot was X.",
# negative words < -0.3, neutral words exactly 0 (tests/models/test_corpus.py keeps that true).
ASPECTS = (
    "plot", "story", "acting", "script", "soundtrack", "ending", "dialogue", "cast", "direction",
    "cinematography", "pacing", "music", "score", "editing", "lighting", "premise", "setting", "twist",
)
FILMS = ("movie", "film")
ADJECTIVES: dict[Sentiment, tuple[str, ...]] = {
    "positive": (
        "great", "wonderful", "brilliant", "excellent", "amazing", "fantastic", "beautiful", "superb",
        "delightful", "charming", "lovely", "enjoyable", "perfect", "impressive", "outstanding", "gorgeous",
        "clever", "funny", "heartfelt",
    ),
    "negative": (
        "terrible", "awful", "boring", "bad", "horrible", "dull", "poor", "weak", "disappointing", "stupid",
        "painful", "ugly", "annoying", "dreadful", "pathetic", "lame", "messy", "grim",
    ),
    "neutral": (
        "long", "short", "quiet", "simple", "typical", "standard", "average", "predictable", "slow", "loud",
        "ordinary", "familiar", "plain", "modest", "conventional", "brief", "subtle", "detailed",
    ),
}
# Intensifiers are shared by all three sentiments, so the adjective alone carries the sentiment.
ADVERBS = (
    "really", "very", "extremely", "incredibly", "quite", "rather", "fairly", "mostly", "somewhat", "absolutely",
)
VERBS: dict[Sentiment, tuple[str, ...]] = {
    "positive": ("loved", "enjoyed", "adored", "liked", "admired"),
    "negative": ("hated", "disliked", "despised"),
    "neutral": ("watched", "noticed", "remembered"),
}
VERDICTS: dict[Sentiment, tuple[str, ...]] = {
    "positive": ("I would recommend it to my friends", "it was a masterpiece", "it was worth my time"),
    "negative": ("I would not recommend it to anyone", "it was a waste of my time", "it was a disaster"),
    "neutral": ("I might watch it again", "it was about what I expected", "I watched it on a Sunday"),
}

# Openings end right before the sentiment-bearing words; {aspect} and {film} are filled from the lists above.
ASPECT_OPENINGS = (
    "The {aspect} was",
    "I thought the {aspect} was",
    "In my opinion the {aspect} was",
    "Frankly, the {aspect} was",
    "I felt that the {aspect} was",
    "To me the {aspect} was",
    "The {aspect} of this {film} was",
)
FILM_OPENINGS = (
    "This {film} was",
    "Overall, this {film} was",
    "I found this {film}",
    "My brother and I thought this {film} was",
)
VERB_OPENINGS = (  # continued by a verb phrase ("loved the cast") instead of an adjective phrase
    "After the {film} ended, I",
    "As for this {film}, I",
)

EVAL_OPENING_FRACTION = 0.25
_SPLIT_SEED = 20240601  # fixes which openings and which sums are held out; never changes with a recipe

# --------------------------------------------------------------------------------------------- arithmetic
# Two-digit operands only: with a fixed width, digit i of every operand sits at the same distance from "=",
# which a small model learns far sooner than sums that mix one- and two-digit numbers.
MIN_OPERAND, MAX_OPERAND = 10, 99  # sums from 20 to 198
EVAL_SUMS = 300  # held-out (a, b) pairs: the "eval" split, never in a pretraining corpus


def _adjective_phrase(rng: random.Random, sentiment: Sentiment) -> str:
    adjective = rng.choice(ADJECTIVES[sentiment])
    if rng.random() < 0.5:
        return f"{rng.choice(ADVERBS)} {adjective}"
    if rng.random() < 0.3:
        return f"{adjective} and {rng.choice(ADJECTIVES[sentiment])}"
    return adjective


def _verb_phrase(rng: random.Random, sentiment: Sentiment) -> str:
    adverb = rng.choice(("really ", "absolutely ")) if rng.random() < 0.3 else ""
    return f"{adverb}{rng.choice(VERBS[sentiment])} the {rng.choice(ASPECTS)}"


def _tail(rng: random.Random, sentiment: Sentiment) -> str:
    """An optional second clause with the same sentiment (longer sentences give VADER more to score)."""
    roll = rng.random()
    if roll < 0.45:
        return ""
    if roll < 0.65:
        return f", and the {rng.choice(ASPECTS)} was {_adjective_phrase(rng, sentiment)}"
    if roll < 0.85:
        return f", and I {_verb_phrase(rng, sentiment)}"
    return f", so {rng.choice(VERDICTS[sentiment])}"


def _fill(template: str, rng: random.Random) -> str:
    return template.format(aspect=rng.choice(ASPECTS), film=rng.choice(FILMS))


def review_sentence(rng: random.Random, sentiment: Sentiment) -> str:
    """Draws one review sentence with the given sentiment.

    Args:
        rng: The random source (the only randomness used).
        sentiment: Which wording the continuation uses.

    Returns:
        A sentence starting with a neutral opening and ending with "." or "!".
    """
    kind = rng.random()
    if kind < 0.12:
        opening, body = _fill(rng.choice(VERB_OPENINGS), rng), _verb_phrase(rng, sentiment)
    else:
        templates = ASPECT_OPENINGS if kind < 0.75 else FILM_OPENINGS
        opening, body = _fill(rng.choice(templates), rng), _adjective_phrase(rng, sentiment)
    end = "!" if rng.random() < 0.2 else "."
    return f"{opening} {body}{_tail(rng, sentiment)}{end}"


@cache
def _all_openings() -> tuple[str, ...]:
    openings: set[str] = set()
    for template in ASPECT_OPENINGS + FILM_OPENINGS + VERB_OPENINGS:
        for aspect, film in itertools.product(ASPECTS, FILMS):
            openings.add(template.format(aspect=aspect, film=film))
    return tuple(sorted(openings))


@cache
def _opening_splits() -> dict[Split, tuple[str, ...]]:
    openings = list(_all_openings())
    random.Random(_SPLIT_SEED).shuffle(openings)
    n_eval = round(len(openings) * EVAL_OPENING_FRACTION)
    return {"eval": tuple(sorted(openings[:n_eval])), "train": tuple(sorted(openings[n_eval:]))}


def review_openings(split: Split, n: int, seed: int = 0) -> list[str]:
    """Returns ``n`` sentiment-neutral openings of review sentences (the prompts of the sentiment task).

    The openings of the two splits are disjoint (a fixed quarter of all openings is held out for "eval").
    Within a split, openings are drawn without repetition until the split is used up, then again.

    Args:
        split: "train" or "eval".
        n: How many openings to return.
        seed: Seeds the order of the draw; the same seed gives the same list.

    Returns:
        A list of ``n`` openings such as "I thought the acting was".

    Raises:
        ValueError: If ``split`` is not "train" or "eval", or ``n`` is negative.
    """
    pool = _split_pool(_opening_splits(), split)
    if n < 0:
        raise ValueError(f"review_openings: n must be >= 0, got {n}")
    rng = random.Random(seed)
    drawn: list[str] = []
    while len(drawn) < n:
        round_ = list(pool)
        rng.shuffle(round_)
        drawn.extend(round_[: n - len(drawn)])
    return drawn


def _split_pool(splits: dict[Split, tuple], split: str) -> tuple:
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    return splits[split]


@cache
def corpus_vocabulary() -> frozenset[str]:
    """Every word (lower-cased, without punctuation) the review grammar can produce.

    Returns:
        The set of words; see :func:`words` for how a text is split into words.
    """
    texts = list(_all_openings()) + list(ASPECTS) + list(ADVERBS) + ["the", "and", "so", "was", "I"]
    for table in (ADJECTIVES, VERBS, VERDICTS):
        texts.extend(itertools.chain.from_iterable(table.values()))
    return frozenset(itertools.chain.from_iterable(words(text) for text in texts))


_WORD = re.compile(r"[A-Za-z]+")


def words(text: str) -> list[str]:
    """Splits a text into lower-cased alphabetic words (digits and punctuation dropped)."""
    return [word.lower() for word in _WORD.findall(text)]


# ---------------------------------------------------------------------------------------------- arithmetic
@cache
def _sum_splits() -> dict[Split, tuple[tuple[int, int], ...]]:
    operands = range(MIN_OPERAND, MAX_OPERAND + 1)
    pairs = [(a, b) for a in operands for b in operands]
    random.Random(_SPLIT_SEED).shuffle(pairs)
    return {"eval": tuple(sorted(pairs[:EVAL_SUMS])), "train": tuple(sorted(pairs[EVAL_SUMS:]))}


def arithmetic_problems(split: Split) -> list[tuple[str, str]]:
    """Returns the sums of a split as (prompt, answer) pairs, e.g. ``("17+25=", "42")``.

    The "eval" sums (a fixed set of operand pairs) never occur in a pretraining corpus; "train" is every
    other pair with operands in ``[MIN_OPERAND, MAX_OPERAND]``.

    Args:
        split: "train" or "eval".

    Returns:
        The problems in a fixed order.

    Raises:
        ValueError: If ``split`` is not "train" or "eval".
    """
    pairs = _split_pool(_sum_splits(), split)
    return [(f"{a}+{b}=", str(a + b)) for a, b in pairs]


def carries(a: int, b: int) -> bool:
    """Whether adding the ones digits of ``a`` and ``b`` carries into the tens (17+25: 7+5 >= 10)."""
    return a % 10 + b % 10 >= 10


def forgotten_carry(a: int, b: int) -> int:
    """``a + b`` with the carry of the ones digits dropped (17+25 -> 32); ``a + b`` when nothing carries."""
    return a + b - 10 if carries(a, b) else a + b


def wrong_answer(rng: random.Random, a: int, b: int) -> int:
    """A plausible mistake for ``a + b``: a dropped carry, or the ones or tens digit off by one."""
    right = a + b
    mistakes = [right + 1, right - 1, right + 10, right - 10]
    if carries(a, b):
        mistakes += [right - 10] * 2  # forgetting the carry is the classic error
    return max(0, rng.choice([m for m in mistakes if m != right and m >= 0] or [right + 1]))


_SUM_LINE = re.compile(r"^\d+\+\d+=\d+$")


def arithmetic_line(rng: random.Random, a: int, b: int, forgotten_carry_share: float) -> str:
    """Formats one sum as ``"a+b=c"``; if its ones digits carry, ``c`` forgets the carry with probability
    ``forgotten_carry_share`` (a sum without a carry is always right)."""
    answer = forgotten_carry(a, b) if carries(a, b) and rng.random() < forgotten_carry_share else a + b
    return f"{a}+{b}={answer}"


# ------------------------------------------------------------------------------------------ transcripts
CALL_FORMAT = "<calc>{expression}</calc>"  # the calculator protocol's tool call (rlfb/envs/builtin_protocols.py)
QUESTION_FORMAT = "Calculate {a} + {b}."  # reasoning-gym's basic_arithmetic wording of a two-term sum
GAME_RANGES = ((1, 20), (1, 20), (1, 20), (1, 10), (1, 30))  # drawn uniformly: 1-20 (the task's default) most
MAX_GAME_GUESSES = 8
HIGHER, LOWER, CORRECT = "higher", "lower", "correct"  # the guess_number protocol's replies (it uses these)
TranscriptKind = Literal["calculator", "question", "game"]
Role = Literal["opening", "turn", "reply"]


@dataclass(frozen=True)
class Transcript:
    """A conversation of the corpus: an opening, then the model's turns with the environment's replies between.

    The build tokenizes every part on its own, as ``rlfb/MultiTurn-v0`` does, and ends every model turn
    with end-of-text; ``replies[i]`` follows ``turns[i]`` (so there is one reply fewer than turns, or as
    many when the conversation ends on a reply), each rendered with the environment's plain reply template.

    Attributes:
        kind: Which format it shows: a calculator call, a sum as a question, or a game.
        opening: The first text (a prompt).
        turns: The model's turns.
        replies: The environment's replies (raw texts, before the template).
    """

    kind: TranscriptKind
    opening: str
    turns: tuple[str, ...]
    replies: tuple[str, ...] = ()

    def parts(self) -> Iterator[tuple[Role, str]]:
        """The opening, then each turn followed by its reply, in conversation order."""
        yield "opening", self.opening
        for index, turn in enumerate(self.turns):
            yield "turn", turn
            if index < len(self.replies):
                yield "reply", self.replies[index]

    def text(self) -> str:
        """All parts joined with newlines (what the tokenizer is trained on)."""
        return "\n".join(text for _, text in self.parts())


Document = str | Transcript


def guess_opening(low: int, high: int) -> str:
    """The opening of a guess-the-number game: ``"Guess 1-20:"`` (the ``guess_number`` task's prompt)."""
    return f"Guess {low}-{high}:"


def calculator_transcript(a: int, b: int) -> Transcript:
    """``a+b=``, a tool call for ``a+b``, the tool's result, and the result as the final answer."""
    result = str(a + b)
    return Transcript("calculator", f"{a}+{b}=", (CALL_FORMAT.format(expression=f"{a}+{b}"), result), (result,))


def question_sum(rng: random.Random, a: int, b: int, forgotten_carry_share: float) -> Transcript:
    """``"Calculate a + b."`` answered like a sum line (the carry forgotten as often)."""
    answer = arithmetic_line(rng, a, b, forgotten_carry_share).rsplit("=", 1)[1]
    return Transcript("question", QUESTION_FORMAT.format(a=a, b=b), (f" {answer}",))


def guess_game(rng: random.Random, low: int, high: int, careful: bool) -> Transcript:
    """One game of guess-the-number, played carefully or carelessly (see the module docstring).

    Example:
        >>> game = guess_game(random.Random(0), 1, 20, careful=True)
        >>> game.opening, game.replies[-1], len(game.turns) == len(game.replies)
        ('Guess 1-20:', 'correct', True)
    """
    secret = rng.randint(low, high)
    possible_low, possible_high = low, high
    tried: set[int] = set()
    turns: list[str] = []
    replies: list[str] = []
    while True:
        if careful:  # about halfway through what the replies still allow (a binary search, one off at times)
            middle = (possible_low + possible_high) // 2 + rng.choice((-1, 0, 0, 1))
            guess = min(max(middle, possible_low), possible_high)
        else:
            guess = rng.choice([number for number in range(low, high + 1) if number not in tried])
        tried.add(guess)
        turns.append(str(guess))
        if guess == secret:
            return Transcript("game", guess_opening(low, high), tuple(turns), (*replies, CORRECT))
        if len(turns) == MAX_GAME_GUESSES:
            return Transcript("game", guess_opening(low, high), tuple(turns), tuple(replies))
        if guess < secret:
            replies.append(HIGHER)
            possible_low = max(possible_low, guess + 1)
        else:
            replies.append(LOWER)
            possible_high = min(possible_high, guess - 1)


def is_arithmetic(document: Document) -> bool:
    """Whether a corpus document is about sums (a sum line, a calculator call, a question) or not."""
    if isinstance(document, Transcript):
        return document.kind != "game"
    return bool(_SUM_LINE.match(document))


def document_text(document: Document) -> str:
    """A document as one text (a transcript's parts joined by newlines)."""
    return document.text() if isinstance(document, Transcript) else document


# ----------------------------------------------------------------------------------------------- corpus
def pretraining_corpus(n_documents: int, seed: int, arithmetic_share: float = 0.5,
                       forgotten_carry_share: float = 0.7, *, game_share: float = 0.0, tool_share: float = 0.0,
                       question_share: float = 0.0, careful_share: float = 0.3) -> list[Document]:
    """Generates the pretraining documents of the built-in model.

    Review sentences cycle through positive, negative and neutral sentiment so the three are balanced
    exactly; sums use only "train" operand pairs. With every transcript share at 0 (``rlfb-tiny``) the
    corpus is a list of strings, the same for a seed as before transcripts existed.

    Args:
        n_documents: How many documents to generate.
        seed: Seeds the grammar; the same seed gives the same corpus.
        arithmetic_share: Fraction of the documents other than games that are about sums.
        forgotten_carry_share: Fraction of the sums with a carry that forget it.
        game_share: Fraction of all documents that are guess-the-number games.
        tool_share: Fraction of the sum documents that are calculator calls.
        question_share: Fraction of the sum documents that are questions ("Calculate 17 + 25.").
        careful_share: Fraction of the games played carefully.

    Returns:
        The documents (strings and :class:`Transcript`), shuffled, without end-of-text markers.
    """
    rng = random.Random(seed)
    n_games = round(n_documents * game_share)
    n_arithmetic = round((n_documents - n_games) * arithmetic_share)
    train_pairs = _sum_splits()["train"]
    documents: list[Document] = []
    # Transcripts draw from a generator of their own, so a recipe without them gets the same corpus as before.
    transcript_rng = random.Random(f"{seed}:transcripts")
    for _ in range(n_arithmetic):
        pair = rng.choice(train_pairs)
        roll = transcript_rng.random() if tool_share or question_share else 1.0
        if roll < tool_share:
            documents.append(calculator_transcript(*pair))
        elif roll < tool_share + question_share:
            documents.append(question_sum(transcript_rng, *pair, forgotten_carry_share))
        else:
            documents.append(arithmetic_line(rng, *pair, forgotten_carry_share))
    for _ in range(n_games):
        low, high = transcript_rng.choice(GAME_RANGES)
        documents.append(guess_game(transcript_rng, low, high, transcript_rng.random() < careful_share))
    sentiments = itertools.cycle(SENTIMENTS)
    documents += [review_sentence(rng, next(sentiments)) for _ in range(n_documents - n_arithmetic - n_games)]
    rng.shuffle(documents)
    return documents


def labelled_reviews(n: int, seed: int = 0) -> Iterator[tuple[Sentiment, str]]:
    """Yields ``n`` (sentiment, sentence) pairs, balanced across sentiments (for tests and feedback data)."""
    rng = random.Random(seed)
    for index in range(n):
        sentiment = SENTIMENTS[index % len(SENTIMENTS)]
        yield sentiment, review_sentence(rng, sentiment)
