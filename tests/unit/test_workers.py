"""mailflow.workers.BoundedWorkers: its bounded join at a stop."""
from __future__ import annotations

import asyncio
import threading
import time
from functools import partial

from mailflow.workers import BoundedWorkers


def named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def test_close_within_waits_for_the_work_under_way_at_most_its_bound():
    """The stop shut the content checks' pool with a join without bound: a walk stuck in a hung sqlite read held up
    the store's close and the queue lock's release. A call that does not end within the bound is left (False);
    queued calls are cancelled; a pool whose work ends is joined (True)."""
    workers = BoundedWorkers(1, 30, "stuck pool")
    release = threading.Event()
    stuck = workers.run(partial(release.wait, 30))
    hung = asyncio.ensure_future(stuck)
    await asyncio.sleep(0)  # (it takes the one thread)
    started = time.monotonic()
    assert await workers.close_within(0.2) is False
    assert 0.2 <= time.monotonic() - started < 2
    release.set()
    assert await hung is True

    quick = BoundedWorkers(1, 30, "quick pool")
    assert await quick.run(lambda: "done") == "done"
    assert await quick.close_within(5) is True
    assert named("quick-pool_") == []
