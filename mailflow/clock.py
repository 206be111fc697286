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
