"""qmgr backoff (pure): delay = age clamped to [minimal, maximal]; so it roughly doubles per attempt."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailflow.stages.qmgr.backoff import next_attempt, retry_delay

MIN, MAX = 300.0, 4000.0


@pytest.mark.parametrize("age, delay", [
    (0.0, MIN), (-5.0, MIN), (299.9, MIN), (300.0, 300.0), (1234.5, 1234.5), (4000.0, MAX), (4000.1, MAX),
    (10 * 86400.0, MAX),
])
def test_retry_delay_clamps_the_age(age, delay):
    assert retry_delay(age, MIN, MAX) == delay


@given(st.floats(-1e9, 1e9), st.floats(0, 1e6), st.floats(0, 1e6))
def test_retry_delay_stays_within_bounds(age, a, b):
    lo, hi = min(a, b), max(a, b)
    assert lo <= retry_delay(age, lo, hi) <= hi


def test_next_attempt_is_now_plus_the_clamped_age():
    assert next_attempt(1000.0, 1000.0, MIN, MAX) == 1300.0
    assert next_attempt(2000.0, 1000.0, MIN, MAX) == 3000.0
    assert next_attempt(100_000.0, 1000.0, MIN, MAX) == 104_000.0


def test_retries_of_one_message_roughly_double_from_minimal_to_maximal():
    arrival = now = 1_700_000_000.0
    delays = []
    for _ in range(12):
        retry = next_attempt(now, arrival, MIN, MAX)
        delays.append(retry - now)
        now = retry  # the next attempt happens exactly when it is due
    assert delays[:6] == [300.0, 300.0, 600.0, 1200.0, 2400.0, 4000.0]
    assert delays[0] == MIN and max(delays) == MAX
    assert delays == sorted(delays)  # never shrinks
    for a, b in zip(delays[1:], delays[2:]):
        assert b == min(2 * a, MAX)  # doubles until capped
    assert set(delays[5:]) == {MAX}


def test_jitter_adds_a_fraction_of_the_delay_from_the_rng():
    class Half:
        def random(self):
            return 0.5

    assert next_attempt(1000.0, 1000.0, MIN, MAX, jitter=0.2, rng=Half()) == 1000.0 + 300.0 * 1.1
    assert next_attempt(1000.0, 1000.0, MIN, MAX, jitter=0.2) == 1300.0  # no rng: no jitter
    assert next_attempt(1000.0, 1000.0, MIN, MAX, jitter=0.0, rng=Half()) == 1300.0


def test_jitter_spreads_retries_within_its_fraction():
    rng = random.Random(3)
    retries = {next_attempt(0.0, 0.0, MIN, MAX, jitter=0.1, rng=rng) for _ in range(200)}
    assert len(retries) > 100
    assert all(MIN <= r < MIN * 1.1 for r in retries)
