"""The greylist's triplet store on its own: a real SQLite file, time from a VirtualClock."""
from __future__ import annotations

import sqlite3

from mailflow.clock import VirtualClock
from mailflow.config.filters import GreylistConfig
from mailflow.filters import greylist
from mailflow.filters.greylist import Greylist


def rows(path, table: str = "triplet") -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def test_triplets_that_never_passed_go_once_their_retry_window_is_over(tmp_path, monkeypatch):
    """A flood of one-off triplets (a spam run: every sender new) is not kept for `lifetime` (35 days) but, as
    postgrey's maintenance does, once a retry could no longer pass: the database stays bounded."""
    monkeypatch.setattr(greylist, "SWEEP_EVERY", 100)
    clock = VirtualClock()
    path = tmp_path / "greylist.db"
    grey = Greylist(GreylistConfig(delay=300, retry_window=3600, lifetime=35 * 86400), path, clock)
    try:
        for n in range(300):  # one flood
            assert not await grey.check("192.0.2.7", f"spam{n}@remote.test", "alice@local.test")
        assert rows(path) == 300
        clock.advance(300 + 3600 + 1)  # past delay + retry_window: none of them can pass any more
        for n in range(100):  # the next flood reaches the sweep
            assert not await grey.check("198.51.100.7", f"spam{n}@remote.test", "alice@local.test")
        assert rows(path) == 100
    finally:
        grey.close()


async def test_auto_whitelisting_counts_one_pass_an_hour(tmp_path):
    """postgrey's --auto-whitelist-clients: 'only one attempt per hour counts', so a client retrying many
    triplets at once (a bot that learnt to retry) is not whitelisted after one round."""
    clock = VirtualClock()
    grey = Greylist(GreylistConfig(delay=60, auto_whitelist_count=2), tmp_path / "greylist.db", clock)

    async def passes(sender: str) -> bool:
        return await grey.check("192.0.2.7", sender, "alice@local.test")

    try:
        for n in range(3):
            assert not await passes(f"s{n}@remote.test")
        clock.advance(61)
        assert await passes("s0@remote.test") and await passes("s1@remote.test")  # two passes, the same hour
        assert not await passes("new@remote.test")  # counted once: not whitelisted yet
        clock.advance(3600)
        assert await passes("s2@remote.test")  # a pass an hour later counts
        assert await passes("another@remote.test")  # whitelisted
    finally:
        grey.close()
