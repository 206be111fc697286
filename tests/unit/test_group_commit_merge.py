"""engine._merged: a batch's statements merged into one executemany per statement wherever that keeps every
request's own order (a request's statement never runs before one it ran earlier), found by a search over where
each statement already is (a scan with a generator per statement cost 4-8x the CPU on the event loop for a
batch of 500 requests)."""
from __future__ import annotations

import random

from mailflow.store.engine import Request, _merged


def _reference(requests: list[Request]) -> list[tuple[str, list]]:
    """The rule said plainly: each statement goes to the first executemany of its SQL at or after the one its
    request's previous statement went to, or to a new one at the end."""
    merged: list[tuple[str, list]] = []
    for request in requests:
        last = 0
        for sql, rows in request.ops:
            at = next((i for i in range(last, len(merged)) if merged[i][0] == sql), None)
            if at is None:
                at = len(merged)
                merged.append((sql, []))
            merged[at][1].extend(rows)
            last = at
    return merged


def _request(rng: random.Random, n: int) -> Request:
    statements = ["INSERT message", "INSERT recipient", "UPDATE recipient", "DELETE message", "UPDATE warned"]
    return Request([(rng.choice(statements), [(n, k)]) for k in range(rng.randint(1, 5))], None, None, False)


def test_the_merge_is_the_rule_for_random_batches_of_every_kind_of_request():
    rng = random.Random(7)
    for _ in range(200):
        requests = [_request(rng, n) for n in range(rng.randint(1, 60))]
        merged, calls = _merged(requests)
        assert merged == _reference(requests)
        assert calls == [None] * len(requests)


def test_a_request_that_runs_a_statement_after_a_later_one_gets_an_executemany_after_it():
    a = Request([("UPDATE warned", [(1,)]), ("INSERT message", [(1,)])], None, None, False)
    b = Request([("INSERT message", [(2,)]), ("UPDATE warned", [(2,)])], None, None, False)
    merged, _ = _merged([a, b])
    assert merged == [("UPDATE warned", [(1,)]), ("INSERT message", [(1,), (2,)]), ("UPDATE warned", [(2,)])]
