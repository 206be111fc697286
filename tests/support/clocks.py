"""Clocks for tests, beside mailflow.clock.VirtualClock (time that moves only when told).

- `RecordingClock(now, instant=False)`: a VirtualClock that records every sleep asked of it in `sleeps`; with
  `instant` a sleep returns at once (a delay that is only counted, never waited).
- `qmgr_turn(qmgr, clock)`: wake qmgr and return once it has run a whole turn (operator poll, pump, scan) and
  asks its RecordingClock for the next sleep: whatever that turn was going to start has been started. An event
  to wait for instead of a fixed sleep when a test says "a wake-up finds nothing to do".
"""
from __future__ import annotations

from mailflow.clock import VirtualClock
from tests.support.waiting import eventually


class RecordingClock(VirtualClock):
    """The virtual clock, also recording every sleep asked of it."""

    def __init__(self, now: float = 1_700_000_000.0, instant: bool = False):
        super().__init__(now)
        self.instant = instant
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if not self.instant:
            await super().sleep(seconds)


async def qmgr_turn(qmgr, clock: RecordingClock, timeout: float = 5.0) -> None:
    """Wake `qmgr` and wait until it has finished that turn and sleeps again on `clock`."""
    asked = len(clock.sleeps)
    qmgr.wake()
    await eventually(lambda: len(clock.sleeps) > asked, timeout=timeout, what="qmgr finished a turn")
