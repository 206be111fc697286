"""100 000 queued messages: the active set stays within active_limit and serve's memory stays flat."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from mailflow.content import Content
from mailflow.model import Recipient
from mailflow.store import NewMessage, Store
from tests.support import queue_counts
from tests.support.raw import rss_mb

MESSAGES = 100_000
ACTIVE_LIMIT = 1000
RSS_LIMIT_MB = 200
# the drain's pace is the machine's: 101 s (and 27 s to fill the queue) beside two CPU hogs and
# other tests on 2 cores; what is bounded is how long the queue may stay without shrinking (the start included),
# and the whole wait
STALL_LIMIT = 60.0
WAIT_LIMIT = 400.0



async def fill(db, n: int) -> None:
    store = await Store.open(db)
    body = Content.of(b"Subject: scale\r\n\r\n" + b"x" * 200 + b"\r\n")
    for start in range(0, n, 5000):
        await store.insert_many([
            NewMessage(f"S{i:07d}", "sender@remote.test", 1_700_000_000.0 + i, body,
                       (Recipient(0, f"r{i}@dest{i % 100}.test", f"r{i}@dest{i % 100}.test"),))
            for i in range(start, min(n, start + 5000))])
    await store.close()


@pytest.mark.timeout(WAIT_LIMIT + 120)  # (the fill, the start and the stop besides)
async def test_a_hundred_thousand_queued_messages_keep_active_bounded_and_memory_flat(tmp_path, write_config):
    db = tmp_path / "queue" / "queue.db"
    await fill(db, MESSAGES)
    cfg = write_config(tmp_path / "scale.toml", default_transport="discard:", log={"level": "warning"},
                       queue={"active_limit": ACTIVE_LIMIT, "queue_run_delay": "1s"})
    errors = tmp_path / "server.err"  # a file, not a pipe nobody reads while the server runs
    with open(errors, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err)
    peak_active = peak_rss = 0.0
    started = time.monotonic()
    try:
        left, shrank = MESSAGES, time.monotonic()
        while left and time.monotonic() - shrank < STALL_LIMIT and time.monotonic() - started < WAIT_LIMIT:
            await asyncio.sleep(0.25)
            assert proc.poll() is None, errors.read_text()[-2000:]
            counts = queue_counts(db)
            peak_active = max(peak_active, counts.get("active", 0))
            peak_rss = max(peak_rss, rss_mb(proc.pid))
            if sum(counts.values()) < left:
                left, shrank = sum(counts.values()), time.monotonic()
        assert not left, f"{left} messages left: the queue did not shrink for {STALL_LIMIT}s, or {WAIT_LIMIT}s passed"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"\n100k: peak active {peak_active:.0f}, peak RSS {peak_rss:.0f} MB, drained in "
          f"{time.monotonic() - started:.0f}s")
    assert 0 < peak_active <= ACTIVE_LIMIT
    assert peak_rss < RSS_LIMIT_MB, f"RSS peaked at {peak_rss:.0f} MB"
