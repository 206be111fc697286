"""Retry policy, pure: when a deferred message is tried again.

Postfix's rule (qmgr_active_done_3_generic): the delay equals the message's age, clamped to
[minimal_backoff_time, maximal_backoff_time], so it roughly doubles on each attempt. `jitter` spreads
retries of mail that arrived together (a fraction of the delay, drawn from the injected rng).
"""
from __future__ import annotations


def retry_delay(age: float, minimal: float, maximal: float) -> float:
    return min(max(age, minimal), maximal)


def next_attempt(now: float, arrival: float, minimal: float, maximal: float, *, jitter: float = 0.0, rng=None) -> float:
    delay = retry_delay(now - arrival, minimal, maximal)
    if jitter and rng is not None:
        delay += delay * jitter * rng.random()
    return now + delay
