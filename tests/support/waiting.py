"""Waiting in tests: for something to happen (bounded polling that fails with a message), and for the moment after
which something that did not happen never will (an event, not a fixed sleep).

- `eventually(predicate, timeout=20, step=0.02, what=None)`: call `predicate` (plain or async) until it returns
  something truthy and return that; after `timeout` seconds raise AssertionError naming `what` (or the predicate's
  source line) and the last value. Never returns a false value, so a test cannot forget to assert it. A deadline
  only bounds a failure (a pass returns at the event), so every default here is generous: on a loaded machine
  (CI: 2 vCPUs, `-n 2`) a private Postfix's log line or a server's own 2 s timer can run seconds late. Every
  default (20 s) stays below each Postfix default timer (30 s milter, 100 s policy, 300 s smtpd), so a server
  that ignores a configured timer for its default never meets it. Pass a shorter `timeout` only where the test
  asserts a time limit.
- `queue_becomes(store, counts)`: the store's per-queue counts reach `counts` (then returns them).
- `lines_logged(caplog, *words, count=1)`: until `count` captured records hold every one of `words`; returns every
  record's message. A result's line follows the commit of the result: the queue's counts can be seen before it.
- `sessions_over(mf)`: every smtpd session of a running Mailflow has ended. Whatever a session queued was
  committed before its reply, so a test that saw a refusal and then this can say "nothing was queued" at once.
- `ScanWatch(store)`: wraps `store.take` to see qmgr's queue scans; `await watch.scan_after(when)` returns once
  a scan has looked at the queue as of (clock) time `when` or later, and `watch.found` holds the queue id of
  every message a scan brought: a message not among them after such a scan was passed over on purpose (held,
  not yet due), without waiting to see whether a delivery follows.
- `timed(awaitable)`: (its result, the seconds it took). `as_prompt_as(waited, reference, what)`: asserts that a
  wait for a server's own timer (mailflow's) took no more than 1.5 x `reference` + 1 s, `reference` being the
  same wait measured at Postfix in the same run (both sides under the same load) or the configured timer: a
  timer 3x too long fails (2 s -> 6 s), a loaded machine's lateness, which both sides share, does not.
- `settled_in(*paths)`: the seconds until every one of `paths` was last changed (mtime, ctime) longer ago than
  mailflow.tables.files.RACY_MARGIN: a table file read from then on has a stamp a reload trusts (takes the table
  over when unchanged); read sooner, a reload reads it again.
- `LoopLag()`: `async with LoopLag() as lag:` runs a ticker on the loop meanwhile; `lag.longest` is the longest it
  waited for its turn past its 10 ms sleep (what the work done meanwhile cost every other session).
"""
from __future__ import annotations

import asyncio
import inspect
import os
import time
from typing import Any, Awaitable, Callable


def _describe(predicate: Callable) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


def settled_in(*paths) -> float:
    """See the module docstring."""
    from mailflow.tables.files import RACY_MARGIN

    newest = max(max(os.stat(path).st_mtime_ns, os.stat(path).st_ctime_ns) for path in paths)
    return max(0.0, (newest + RACY_MARGIN - time.time_ns()) / 1e9 + 0.05)


async def eventually(predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 20.0, step: float = 0.02,
                     what: str | None = None) -> Any:
    """Poll `predicate` until it is truthy (returned), or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what or _describe(predicate)} (last value {value!r})")
        await asyncio.sleep(step)


async def lines_logged(caplog, *words: str, count: int = 1, timeout: float = 20.0) -> list[str]:
    """Until `count` records caplog captured hold every one of `words`; then the messages of all its records."""
    def matching() -> int:
        return sum(all(w in r.getMessage() for w in words) for r in caplog.records)

    await eventually(lambda: matching() >= count, timeout=timeout, what=f"{count} line(s) with {words}")
    return [r.getMessage() for r in caplog.records]


async def queue_becomes(store, expected: dict, timeout: float = 20.0) -> dict:
    """Poll the store's per-queue counts until they equal `expected`; returns them."""
    last: dict = {}

    async def reached() -> bool:
        nonlocal last
        last = await store.counts()
        return last == expected

    try:
        await eventually(reached, timeout=timeout)
    except AssertionError:
        raise AssertionError(f"the queue never became {expected} within {timeout}s: {last}") from None
    return last


async def sessions_over(mf, timeout: float = 20.0) -> None:
    """Every smtpd session of `mf` (a running Mailflow) has ended."""
    await eventually(lambda: not mf.smtpd.sessions, timeout=timeout, what="every smtpd session ended")


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    """The awaitable's result and the seconds (loop clock) it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await awaitable
    return result, loop.time() - started


def as_prompt_as(waited: float, reference: float, what: str) -> None:
    """`waited` (seconds mailflow took for a reply that follows one of its timers) is within 1.5 x `reference` + 1 s
    (Postfix's wait for the same timer in the same run, or the timer configured): see the module doc."""
    assert waited <= 1.5 * reference + 1.0, f"{what}: mailflow waited {waited:.1f}s, Postfix's {reference:.1f}s"


class ScanWatch:
    """Sees qmgr's queue scans through the store it reads (`store.take(now, room)` is called once per scan)."""

    def __init__(self, store):
        self.times: list[float] = []
        self.found: set[str] = set()
        take = store.take

        async def watched(now, *args, **kwargs):
            found = await take(now, *args, **kwargs)
            self.found.update(message.queue_id for message in found)
            self.times.append(now)
            return found

        store.take = watched

    async def scan_after(self, when: float, timeout: float = 20.0) -> None:
        """Wait for a scan, finished, that looked at the queue as of `when` or later."""
        await eventually(lambda: any(t >= when for t in self.times), timeout=timeout,
                         what=f"a queue scan at or after {when}")


class LoopLag:
    """See the module docstring."""

    TICK = 0.01

    def __init__(self):
        self.longest = 0.0

    async def __aenter__(self) -> "LoopLag":
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK)
            self.longest = max(self.longest, loop.time() - before - self.TICK)
