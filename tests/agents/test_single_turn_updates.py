"""A single-turn rollout, the one-turn case of a multi-turn one, updates every agent as before multi-turn
rollouts existed: the numbers of single_turn_cases.py's fixed-seed updates, recorded on that code."""

from __future__ import annotations

import json

import pytest
from single_turn_cases import CASES, RECORDED, run_case

# Bit-identical on the machine that recorded them (checked with rel=0 when they were recorded); the
# tolerance only absorbs another CPU's float rounding. Any change in what the updates compute (a token
# masked differently, a reward moved) changes these numbers by far more.
TOLERANCE = 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_single_turn_update_is_unchanged(case: str) -> None:
    recorded = json.loads(RECORDED.read_text())[case]
    replayed = run_case(case)
    assert len(replayed["updates"]) == len(recorded["updates"])
    for got, expected in zip(replayed["updates"], recorded["updates"], strict=True):
        assert set(got) == set(expected)
        assert got == pytest.approx(expected, rel=TOLERANCE, abs=1e-7)
    assert replayed["parameter_sums"] == pytest.approx(recorded["parameter_sums"], rel=TOLERANCE, abs=1e-7)
