"""Built-in protocols of ``rlfb/MultiTurn-v0``: a calculator tool for sums, and guess-the-number.

``calculator`` (task ``arithmetic``): the opening is the task's prompt ("17+25="). A model turn that
contains ``<calc>EXPR</calc>`` is a tool call: the environment replies with the result (``42``), or with
``error`` when EXPR is not ``a+b``, ``a-b`` or ``a*b`` of two integers of at most ``max_operand`` in size
(spaces allowed; never ``eval``). Any other turn is the final answer: reward 1.0 when its stripped text
equals the task's ``answer``, else 0.0, and the episode ends. The last step's info says how many calls the
episode made (``tool_calls``) and whether it made any (``used_tool``); the share of episodes that used the
tool is the mean of ``used_tool`` over finished episodes.

``guess_number`` (task ``guess_number``): a secret integer in ``[low, high]`` (the row's columns) is drawn
from the environment's generator. A turn that is an integer (spaces around it allowed) is a guess: the reply
is ``higher`` (the secret is higher), ``lower``, or ``correct``, which pays ``success_reward`` and ends the
episode. Anything else gets ``number?`` and counts as a turn. The turn cap (``max_turns``) bounds the guesses.

Example:
    >>> import numpy as np
    >>> calculator = Calculator()
    >>> opening, state = calculator.start({"prompt": "17+25=", "answer": "42"}, np.random.default_rng(0))
    >>> calculator.respond(state, "<calc>17+25</calc>").text, calculator.respond(state, " 42").reward
    ('42', 1.0)
    >>> calculator.finish(state)
    {'tool_calls': 1, 'used_tool': True}
    >>> game = GuessNumber()
    >>> _, secret = game.start({"prompt": "Guess 1-20:", "low": 1, "high": 20}, np.random.default_rng(0))
    >>> [game.respond(secret, guess).text for guess in ["10", "19", "18"]], secret.secret
    (['higher', 'lower', 'correct'], 18)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlfb.envs.protocol import MultiTurnProtocol, Reply, register_protocol
from rlfb.errors import DatasetError
from rlfb.models import corpus

__all__ = ["Calculator", "CalculatorState", "GuessNumber", "GuessState", "evaluate_expression"]

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
# Two integers of at most 7 digits around one operator; the size bound is checked after parsing.
_EXPRESSION = re.compile(r"\s*(-?\d{1,7})\s*([-+*])\s*(-?\d{1,7})\s*")
_INTEGER = re.compile(r"\s*(-?\d{1,9})\s*")


def evaluate_expression(expression: str, max_operand: int = 1_000_000) -> int | None:
    """``a+b``, ``a-b`` or ``a*b`` of two integers with ``|a|, |b| <= max_operand``; None for anything else.

    Example:
        >>> evaluate_expression("17+25"), evaluate_expression(" 6 * -7 "), evaluate_expression("2**99")
        (42, -42, None)
    """
    match = _EXPRESSION.fullmatch(expression)
    if match is None:
        return None
    left, operator, right = int(match.group(1)), match.group(2), int(match.group(3))
    if abs(left) > max_operand or abs(right) > max_operand:
        return None
    if operator == "+":
        return left + right
    return left - right if operator == "-" else left * right


@dataclass
class CalculatorState:
    """One calculator episode: the expected answer and the calls made so far."""

    answer: str
    tool_calls: int = 0


@register_protocol("calculator")
class Calculator(MultiTurnProtocol[CalculatorState]):
    """Sums with a calculator tool: <calc>17+25</calc> gets the result; the final answer is scored.

    Args:
        answer_column: The task column that holds the expected answer.
        max_operand: Largest operand size the tool accepts.
        error_reply: The reply to a call it cannot evaluate.
    """

    default_task = "arithmetic"

    def __init__(self, answer_column: str = "answer", max_operand: int = 1_000_000, error_reply: str = "error") -> None:
        self.answer_column = answer_column
        self.max_operand = max_operand
        self.error_reply = error_reply

    def start(self, row: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, CalculatorState]:
        if row.get(self.answer_column) is None:
            raise DatasetError(f"the calculator protocol needs the answer in column {self.answer_column!r}; the row "
                               f"has {sorted(row)} (use task 'arithmetic', or a dataset with that column)")
        return row["prompt"], CalculatorState(answer=str(row[self.answer_column]).strip())

    def respond(self, state: CalculatorState, turn: str) -> Reply:
        call = CALL.search(turn)
        if call is not None:
            state.tool_calls += 1
            result = evaluate_expression(call.group(1), self.max_operand)
            return Reply(self.error_reply if result is None else str(result), info={"tool_call": True})
        correct = float(turn.strip() == state.answer)
        return Reply("", reward=correct, done=True, components={"correct": correct}, info={"tool_call": False})

    def finish(self, state: CalculatorState) -> dict[str, Any]:
        return {"tool_calls": state.tool_calls, "used_tool": state.tool_calls > 0}


@dataclass
class GuessState:
    """One guess-the-number episode."""

    secret: int
    guesses: int = 0
    solved: bool = False


@register_protocol("guess_number")
class GuessNumber(MultiTurnProtocol[GuessState]):
    """Guess the secret number; the environment answers higher, lower or correct.

    Args:
        success_reward: Paid by the turn that guesses the secret.
        low, high: The range when a row has no ``low`` / ``high`` columns.
    """

    default_task = "guess_number"
    # The same words as rlfb-tiny-multiturn's corpus games (rlfb/models/corpus.py), so its model knows them.
    HIGHER, LOWER, CORRECT, NOT_A_NUMBER = corpus.HIGHER, corpus.LOWER, corpus.CORRECT, "number?"

    def __init__(self, success_reward: float = 1.0, low: int = 1, high: int = 20) -> None:
        self.success_reward = success_reward
        self.low = low
        self.high = high

    def start(self, row: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, GuessState]:
        low, high = int(row.get("low", self.low)), int(row.get("high", self.high))
        if low > high:
            raise DatasetError(f"guess_number: low ({low}) must not exceed high ({high})")
        return row["prompt"], GuessState(secret=int(rng.integers(low, high + 1)))

    def respond(self, state: GuessState, turn: str) -> Reply:
        match = _INTEGER.fullmatch(turn)
        if match is None:
            return Reply(self.NOT_A_NUMBER)
        state.guesses += 1
        guess = int(match.group(1))
        if guess == state.secret:
            state.solved = True
            return Reply(self.CORRECT, reward=self.success_reward, done=True, components={"solved": 1.0})
        return Reply(self.HIGHER if guess < state.secret else self.LOWER)

    def finish(self, state: GuessState) -> dict[str, Any]:
        return {"guesses": state.guesses, "solved": state.solved}
