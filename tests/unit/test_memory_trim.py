"""`mailflow serve` gives memory back after a burst of mail (mailflow.app.return_memory_when_idle): once the
server is idle and only after mail moved, never while sessions or deliveries are under way."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mailflow.app import _malloc_trim, return_memory_when_idle
from tests.support import eventually


class Store:
    """The store's commit counter, counting how often the trimming loop looked at it (once a turn)."""

    def __init__(self):
        self.looks = 0
        self.value = 0

    @property
    def commits(self) -> int:
        self.looks += 1
        return self.value


async def turns(store: Store, n: int = 2) -> None:
    """Let the loop look `n` more times: what it was going to do about the state before, it has done."""
    seen = store.looks
    await eventually(lambda: store.looks >= seen + n, timeout=2)


async def test_trims_once_per_burst_and_only_when_idle():
    store = Store()
    mf = SimpleNamespace(store=store, idle=False)
    trims: list[int] = []
    task = asyncio.create_task(return_memory_when_idle(mf, interval=0.01, trim=trims.append))
    try:
        await turns(store)
        assert trims == []  # nothing moved yet
        store.value = 5  # a burst, still busy
        await turns(store)
        assert trims == []
        mf.idle = True
        await eventually(lambda: trims == [0], timeout=2)
        await turns(store)
        assert trims == [0]  # idle, nothing new: no second trim
        store.value = 6
        await eventually(lambda: trims == [0, 0], timeout=2)
    finally:
        task.cancel()


def test_glibc_malloc_trim_is_found_here():
    trim = _malloc_trim()
    assert trim is not None and trim(0) in (0, 1)
