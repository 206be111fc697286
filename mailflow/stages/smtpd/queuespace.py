"""The queue's free space as smtpd asks it at every MAIL (Postfix's smtpd_check_queue), read off the event loop.

What it owns: one reading of the queue file system's free bytes shared by every listener and session, and the
rate of the warning that says the queue is short of space.

- `QueueSpace(read, clock, max_age=MAX_AGE)`: `await free()` returns the bytes free, or None when they cannot be
  read (statvfs failed: logged, and the caller takes the mail: the commit will say whether the disk works). The
  read runs in a worker thread (`asyncio.to_thread`), so a queue file system that stops answering stops only the
  sessions that wait for it, not the event loop; one read at a time: callers that come while one is under way
  wait for it (a hung file system holds one thread, not one per MAIL); an answer is kept `max_age` seconds of
  `clock` (about 1 s: the hot path does not hop threads at every MAIL).
- `warn_short(free)`: Postfix's `warning: not enough free space in mail queue: N bytes < 1.5*message size limit`,
  at most once per `REPORT_INTERVAL` (faults.py's rule: a fault costs a few lines a minute, never one per MAIL);
  the refusals themselves are logged one by one (`NOQUEUE: reject: MAIL from …`, the handler).

Failure behaviour: an OSError of the read is a warning (at most once per REPORT_INTERVAL too) and None; a
cancelled caller does not cancel the shared read.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from mailflow.clock import Clock
from mailflow.faults import REPORT_INTERVAL

log = logging.getLogger("mailflow.smtpd")

MAX_AGE = 1.0  # seconds an answer is kept


class QueueSpace:
    def __init__(self, read: Callable[[], int], clock: Clock, max_age: float | None = None):
        self._read = read
        self._clock = clock
        self._max_age = MAX_AGE if max_age is None else max_age
        self._answer: int | None = None
        self._read_at = 0.0
        self._reading: asyncio.Future[int] | None = None
        self._warned_at: dict[str, float] = {}  # each warning's last time (short of space, cannot read)

    async def free(self) -> int | None:
        now = self._clock.time()
        if self._answer is not None and now - self._read_at < self._max_age:
            return self._answer
        if self._reading is None:
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._reading.add_done_callback(self._done)
        try:
            return await asyncio.shield(self._reading)
        except OSError as e:
            self._warn("cannot read the queue's free space: %s", e)
            return None

    def _done(self, reading: asyncio.Future[int]) -> None:
        self._reading = None
        if not reading.cancelled() and reading.exception() is None:
            self._answer, self._read_at = reading.result(), self._clock.time()

    def warn_short(self, free: int) -> None:
        """Postfix's words (smtpd_check_queue's msg_warn), so that alerts written for Postfix's log find them."""
        self._warn("not enough free space in mail queue: %d bytes < 1.5*message size limit", free)

    def _warn(self, text: str, *args: object) -> None:
        now = self._clock.time()
        last = self._warned_at.get(text)
        if last is None or now - last >= REPORT_INTERVAL:
            self._warned_at[text] = now
            log.warning(text, *args)
