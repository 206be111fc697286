#!/usr/bin/env python3
"""How long one qmgr scheduling pass takes as the queue grows (it should stay nearly flat: index range
scans, never a full scan).

A pass is what `QueueManager._scan` asks of the store: `due(now, room)` (which also reads the content of the
small messages it returns, so that their deliveries need no read of their own), `claim(ids, now)` for what it
got, and `next_due_time()`. Measured for N queued messages, N = 1 000, 10 000, 100 000, in two shapes:
- "all due": N incoming messages, the pass takes the first `room` (1 000) of them;
- "none due": N deferred messages whose retry time is in the future, the pass finds nothing to do.
Prints the median of RUNS passes per cell, in milliseconds.

    python bench/scheduling.py [--sizes 1000,10000,100000] [--runs 5]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from mailflow.content import Content
from mailflow.model import Recipient
from mailflow.store import NewMessage, Store

T0 = 1_700_000_000.0
ROOM = 1000


async def filled_store(path: Path, n: int, deferred: bool) -> Store:
    store = await Store.open(path)
    body = Content.of(b"Subject: bench\r\n\r\n" + b"x" * 200 + b"\r\n")
    for start in range(0, n, 5000):
        await store.insert_many([
            NewMessage(f"B{i:07d}", "s@source.test", T0 + i, body,
                       (Recipient(0, f"r{i}@d{i % 100}.test", f"r{i}@d{i % 100}.test"),))
            for i in range(start, min(n, start + 5000))])
    if deferred:  # every message deferred to a time after "now"
        later = "UPDATE message SET queue = 'deferred', next_attempt = next_attempt + 1e6"
        await store._committer.write([(later, [()])])
    return store


async def one_pass(store: Store, now: float) -> float:
    t0 = time.perf_counter()
    due = await store.due(now, ROOM)
    if due:
        await store.claim([m.queue_id for m in due], now)
    await store.next_due_time()
    elapsed = time.perf_counter() - t0
    if due:  # put them back for the next run
        await store._committer.write([("UPDATE message SET queue = 'incoming' WHERE queue = 'active'", [()])])
    return elapsed


async def measure(n: int, deferred: bool, runs: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        store = await filled_store(Path(d) / "queue.db", n, deferred)
        try:
            times = [await one_pass(store, T0 + n + 1) for _ in range(runs)]
        finally:
            await store.close()
    return statistics.median(times) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(f"{'queued':>8} | {'pass, all due (ms)':>19} | {'pass, none due (ms)':>20}")
    for n in (int(x) for x in a.sizes.split(",")):
        due_ms = await measure(n, False, a.runs)
        idle_ms = await measure(n, True, a.runs)
        print(f"{n:>8} | {due_ms:>19.2f} | {idle_ms:>20.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
