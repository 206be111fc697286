"""Fault containment for the background work of the server: faults slow things down, they never spin.

What it owns: how long a failing piece of work waits before its next try, and how the failures are told.

- `Backoff(first, cap)`: `failed() -> seconds` doubles from `first` up to `cap`; `succeeded()` starts over.
- `FailureLog(logger, what, clock, interval)`: a failing job's voice. The first failure of a run is logged at
  once with the real error (a traceback only for an error that is not an I/O, store or table error, i.e. a probable
  bug); later ones are counted and told once per `interval` with the count; the first success after failures
  says so. A fault costs a few lines a minute, never one per turn of a loop. `since` (the clock time of the run's
  first failure, None when not failing) and `describe_run()` (what fails, how long, how often, the last error)
  tell the run to a driver that waits on the job (the Sink's settle and wait_for).
- `ErrorKindLog(logger, what, clock, interval)`: the voice of a job that fails for some of its inputs and works for
  others in between (a delivery agent that raises for one message's content, interleaved with good mail). Each
  kind of error (its type and the place it was raised: the last frame's file:line) is logged with its traceback
  (for a probable bug, as above) and what it failed for (`failed(error, subject)`: a queue id) when it was not seen
  for an `interval`; the failures of kinds seen lately are counted, and the count told an `interval` after the
  first of them ("in the last …": the time since it) by the next failure, success or `tick()` (the owner's periodic
  call), or whatever its time by `flush()` (at stop). A success does not start this over (the next bad input would
  log its traceback again); it says the job works again only after a run of failures a count line was written
  during once it was more than one failure long, that line's total taking in the count not told yet.
- `Guard(what, clock, logger)`: one periodic chore of a loop (a scan, a poll, a snapshot). `await run(fn)`
  calls `fn()` unless the chore is backing off after a failure (then it does nothing and returns False);
  a failure is caught, logged through a FailureLog and backs the chore off. `resume_at` is when it is tried
  again, for the loop's sleep; `retry_now()` ends the wait early (evidence that the fault is over).
- `Retrier(clock, logger, shared)`: `await run(op, what)` calls `op()` until it succeeds, waiting a backoff
  between tries; for results that must be written and must not be given up (qmgr's records). An error that
  `shared(error)` calls a fault of the whole store (locked, disk full, I/O) puts every caller behind one probe:
  while it lasts a single caller tries per backoff interval and the others wait for its verdict, so a store
  fault costs one failed attempt per interval, not one per waiting message. Other errors back off their own
  caller only. Cancellation (server stop) ends the wait. For a driver of a virtual clock (the Sink) it tells
  whether its callers wait for the clock alone (`resting`: each asleep until a retry time still to come, or in
  line behind a probe that is), which tasks they are (`callers`), the next retry time (`next_retry`) and the run
  of store faults they wait out (`failure`).

Time is the injected clock's, so tests drive the intervals with a virtual clock.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from typing import Awaitable, Callable, TypeVar

from mailflow.clock import Clock
from mailflow.errors import LookupRetry

T = TypeVar("T")

FIRST_DELAY = 0.5  # seconds before the first retry
MAX_DELAY = 10.0  # the cap: a fault that clears is noticed within this long
REPORT_INTERVAL = 60.0  # a repeating failure is told once per this many seconds
# faults of the world, not of the code (a table that cannot answer too): no traceback
EXPECTED = (sqlite3.Error, OSError, asyncio.TimeoutError, LookupRetry)
IN_LINE = math.inf  # a Retrier's caller waiting for another's probe, not for a time of its own


def describe(error: BaseException) -> str:
    """The error as an operator needs it: SQLite's own words and code ("database or disk is full (SQLITE_FULL)")."""
    code = getattr(error, "sqlite_errorname", "")
    text = error.reason if isinstance(error, LookupRetry) else str(error) or type(error).__name__
    return f"{text} ({code})" if code else text


class Backoff:
    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY):
        self._first = first
        self._cap = cap
        self._next = first

    def failed(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay

    def succeeded(self) -> None:
        self._next = self._first


class _ReportedFailures:
    """What FailureLog and ErrorKindLog share: whose failures they tell, on which clock and how often, and the line
    that tells one whole (with its traceback, unless the error is an EXPECTED one)."""

    def __init__(self, logger: logging.Logger, what: str, clock: Clock, interval: float = REPORT_INTERVAL):
        self._logger = logger
        self._what = what
        self._clock = clock
        self._interval = interval

    def _tell_whole(self, failed: str, error: BaseException) -> None:
        """`WHAT failed…: error`, `failed` the words after WHAT."""
        bug = not isinstance(error, EXPECTED)
        self._logger.error("%s %s: %s", self._what, failed, describe(error), exc_info=error if bug else None)


class FailureLog(_ReportedFailures):
    def __init__(self, logger: logging.Logger, what: str, clock: Clock, interval: float = REPORT_INTERVAL):
        super().__init__(logger, what, clock, interval)
        self._failures = 0  # in this run of failures
        self._untold = 0  # since the last line
        self._told_at = 0.0
        self._since = 0.0  # the clock time of this run's first failure
        self._last = ""  # its last error, described

    @property
    def failing(self) -> bool:
        return self._failures > 0

    @property
    def since(self) -> float | None:
        return self._since if self._failures else None

    def describe_run(self) -> str:
        """`qmgr: queue scan failed 10 times in a row, for 55.5s: database or disk is full (SQLITE_FULL)`."""
        times = "once" if self._failures == 1 else f"{self._failures} times in a row"
        return f"{self._what} failed {times}, for {self._clock.time() - self._since:g}s: {self._last}"

    def failed(self, error: BaseException) -> None:
        now = self._clock.time()
        self._failures += 1
        self._last = describe(error)
        if self._failures == 1:
            self._since = now
            self._tell_whole("failed", error)
            self._told_at, self._untold = now, 0
            return
        self._untold += 1
        if now - self._told_at >= self._interval:
            self._logger.error("%s failed %d more time%s in the last %.0fs (%d in a row): %s", self._what,
                               self._untold, "" if self._untold == 1 else "s", now - self._told_at, self._failures,
                               describe(error))
            self._told_at, self._untold = now, 0

    def succeeded(self) -> None:
        if self._failures:
            self._logger.warning("%s works again after %d failure%s", self._what, self._failures,
                                 "" if self._failures == 1 else "s")
        self._failures = self._untold = 0


class ErrorKindLog(_ReportedFailures):
    def __init__(self, logger: logging.Logger, what: str, clock: Clock, interval: float = REPORT_INTERVAL):
        super().__init__(logger, what, clock, interval)
        self._seen: dict[tuple[str, str], float] = {}  # a kind of error -> when it last happened
        self._untold = 0  # failures counted and not told yet
        self._untold_since = 0.0  # the first of them's time: the count is told an interval after it
        self._last = ""  # the last failure counted, described
        self._in_row = 0  # failures since the last success
        self._counted_in_run = False  # a count line was written in this run of failures, once it was one

    def failed(self, error: BaseException, subject: str) -> None:
        """`subject`: what failed this time (a queue id), named in the line of a kind told whole."""
        now = self._clock.time()
        self._in_row += 1
        self._forget_before(now - self._interval)
        kind = error_kind(error)
        known = kind in self._seen
        self._seen[kind] = now
        if known:
            if not self._untold:
                self._untold_since = now
            self._untold += 1
            self._last = describe(error)
        self.tick()
        if not known:
            self._tell_whole(f"failed for {subject}", error)

    def succeeded(self) -> None:
        """Says the job works again after a run of failures long enough to be counted (not after the two jobs of
        one bad message, each a domain's, failing back to back); that line's total takes in the count not told
        yet. Else a count whose interval has passed is told."""
        self.tick()
        if self._counted_in_run and self._in_row > 1:
            self._logger.warning("%s works again after %d failures in a row", self._what, self._in_row)
            self._untold = 0
        self._in_row, self._counted_in_run = 0, False

    def tick(self) -> None:
        """Tells the count once its interval has passed since its first failure (called by the job's owner
        periodically too: a count is told when failures stop, not at the next one, days later)."""
        if self._untold and self._clock.time() - self._untold_since >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Tells the count not told yet, if any, whatever its time (the server stops)."""
        if not self._untold:
            return
        self._logger.error("%s failed %d more time%s in the last %.0fs: %s", self._what, self._untold,
                           "" if self._untold == 1 else "s", self._clock.time() - self._untold_since, self._last)
        self._untold = 0
        self._counted_in_run = self._in_row > 1  # (told at a run's first failure, it counts earlier ones)

    def _forget_before(self, time: float) -> None:
        for kind in [k for k, seen in self._seen.items() if seen < time]:
            del self._seen[kind]


def error_kind(error: BaseException) -> tuple[str, str]:
    """An error's type and the place it was raised (`file:line` of its traceback's last frame; "" without one)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return type(error).__qualname__, place


class Guard:
    def __init__(self, what: str, clock: Clock, logger: logging.Logger, *, first: float = FIRST_DELAY,
                 cap: float = MAX_DELAY):
        self._clock = clock
        self._backoff = Backoff(first, cap)
        self.log = FailureLog(logger, what, clock)
        self.resume_at = 0.0

    @property
    def backing_off(self) -> bool:
        return self.log.failing and self._clock.time() < self.resume_at

    def retry_now(self) -> None:
        """Something showed the fault may be over (the store just took a commit): the next run tries."""
        self.resume_at = 0.0

    async def run(self, fn: Callable[[], Awaitable[object]]) -> bool:
        """True when `fn` ran and succeeded."""
        if self.backing_off:
            return False
        try:
            await fn()
        except Exception as e:
            self.resume_at = self._clock.time() + self._backoff.failed()
            self.log.failed(e)
            return False
        self._backoff.succeeded()
        self.log.succeeded()
        return True


class _Again(Exception):
    """Internal: try again from the top (the store's health changed while this caller waited)."""


class Retrier:
    def __init__(self, clock: Clock, logger: logging.Logger, what: str, *,
                 shared: Callable[[BaseException], bool] = lambda e: False,
                 first: float = FIRST_DELAY, cap: float = MAX_DELAY):
        self._clock = clock
        self._logger = logger
        self._shared = shared
        self._first, self._cap = first, cap
        self._backoff = Backoff(first, cap)
        self._log = FailureLog(logger, what, clock)
        self._log_what = what
        self._healthy = True
        self._retry_at = 0.0
        self._probe = asyncio.Lock()
        # the callers by task: the clock time each is asleep until, IN_LINE behind a probe, None at work
        self._waits: dict[asyncio.Task | None, float | None] = {}

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def callers(self) -> frozenset[asyncio.Task | None]:
        """The tasks in `run` now."""
        return frozenset(self._waits)

    def resting(self) -> bool:
        """Every caller (if any) waits for the clock alone: asleep until a retry time still to come, or in line
        behind a probe that is (nothing it does can change before the clock moves)."""
        now = self._clock.time()
        for until in self._waits.values():
            if until is None or until <= now or (until == IN_LINE and not self._probe.locked()):
                return False
        return True

    @property
    def failure(self) -> FailureLog | None:
        """The run of store faults its callers wait out (`since`, `describe_run()`) while any waits, else None."""
        return self._log if self._log.failing and self._waits else None

    def next_retry(self) -> float | None:
        """The earliest clock time a sleeping caller tries again, or None."""
        return min((until for until in self._waits.values() if until is not None and until != IN_LINE), default=None)

    async def run(self, op: Callable[[], Awaitable[T]], what: str = "") -> T:
        """`op()`'s result, once it succeeds. `what` names this caller in its own failures' log lines."""
        task = asyncio.current_task()
        self._waits[task] = None
        try:
            return await self._run(op, what)
        finally:
            del self._waits[task]

    async def _nap(self, seconds: float) -> None:
        """The caller's backoff, on the clock (told to `resting` and `next_retry` while it lasts)."""
        task = asyncio.current_task()
        self._waits[task] = self._clock.time() + seconds
        try:
            await self._clock.sleep(seconds)
        finally:
            self._waits[task] = None

    async def _run(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        own: Backoff | None = None  # for errors of this caller alone (made on the first one: the usual call has none)
        own_log: FailureLog | None = None
        while True:
            probing = not self._healthy
            try:
                if probing:
                    result = await self._probe_once(op)
                else:
                    result = await op()
            except _Again:
                continue
            except Exception as e:
                if self._shared(e):
                    self._store_failed(e, probe=probing)
                    continue
                if probing:  # the store answered: only this caller has a problem
                    self._store_recovered()
                if own is None or own_log is None:
                    own = Backoff(self._first, self._cap)
                    own_log = FailureLog(self._logger, what or self._log_what, self._clock)
                own_log.failed(e)
                await self._nap(own.failed())
                continue
            if probing:
                self._store_recovered()
            if own_log is not None:
                own_log.succeeded()
            return result

    async def _probe_once(self, op: Callable[[], Awaitable[T]]) -> T:
        """One try while the store is failing: one caller at a time, at the retry time. Raises _Again when
        another caller's probe found the store working meanwhile (go the healthy way)."""
        task = asyncio.current_task()
        self._waits[task] = IN_LINE
        try:
            await self._probe.acquire()
        finally:
            self._waits[task] = None
        try:
            return await self._probe_held(op)
        finally:
            self._probe.release()

    async def _probe_held(self, op: Callable[[], Awaitable[T]]) -> T:
        """The probe, its lock held: wait for the retry time, then try."""
        if self._healthy:
            raise _Again()
        await self._nap(max(0.0, self._retry_at - self._clock.time()))
        if self._healthy:
            raise _Again()
        try:
            return await op()
        except Exception as e:
            if self._shared(e):  # record it before the next prober takes the lock
                self._store_failed(e, probe=True)
                raise _Again() from None
            raise

    def _store_failed(self, error: BaseException, *, probe: bool) -> None:
        if probe or self._healthy:  # callers already in flight when it broke do not push the retry further
            self._retry_at = self._clock.time() + self._backoff.failed()
        self._healthy = False
        self._log.failed(error)

    def _store_recovered(self) -> None:
        self._healthy = True
        self._backoff.succeeded()
        self._log.succeeded()
