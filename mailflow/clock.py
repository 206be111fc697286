"""Time as a value passed to constructors, so tests can drive hours of schedule in milliseconds.

`Clock.time()` is wall-clock seconds (queue arrival, next attempt, log delays); `Clock.sleep()` waits.
`SystemClock` is the real one. No module reads the time any other way.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """Time that moves only when told: `advance(seconds)` wakes every sleeper whose deadline has passed.

    For tests and simulations: hours of retry schedule run in milliseconds. `next_deadline()` says when
    the earliest sleeper wants to wake, so a driver can jump straight there.
    """

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in self._sleepers:
            if deadline <= self.now and not fut.done():
                fut.set_result(None)

    def next_deadline(self) -> float | None:
        pending = [deadline for deadline, fut in self._sleepers if not fut.done()]
        return min(pending) if pending else None
