"""`mailflow serve` gives memory back after a burst of mail (mailflow.app.return_memory_when_idle): once the
server is idle and only after mail moved, never while sessions or deliveries are under way."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mailflow.app import _malloc_trim, return_memory_when_idle
from tests.helpers import eventually


async def test_trims_once_per_burst_and_only_when_idle():
    mf = SimpleNamespace(store=SimpleNamespace(commits=0), idle=False)
    trims: list[int] = []
    task = asyncio.create_task(return_memory_when_idle(mf, interval=0.01, trim=trims.append))
    try:
        await asyncio.sleep(0.05)
        assert trims == []  # nothing moved yet
        mf.store.commits = 5  # a burst, still busy
        await asyncio.sleep(0.05)
        assert trims == []
        mf.idle = True
        assert await eventually(lambda: trims == [0], timeout=2)
        await asyncio.sleep(0.05)
        assert trims == [0]  # idle, nothing new: no second trim
        mf.store.commits = 6
        assert await eventually(lambda: trims == [0, 0], timeout=2)
    finally:
        task.cancel()


def test_glibc_malloc_trim_is_found_here():
    trim = _malloc_trim()
    assert trim is not None and trim(0) in (0, 1)
