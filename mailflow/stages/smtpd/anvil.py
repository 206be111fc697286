"""smtpd's connection limits (Postfix anvil(8) and master.cf maxproc), one set per listener.

What it owns
- `Anvil.admit(ip)`: counts a new connection of client `ip` and says whether it may have a session: at most
  `client_connection_count_limit` at once and `client_connection_rate_limit` new ones per
  `anvil_rate_time_unit`. 0 turns a limit off. The rate is counted as Postfix's anvil counts it: from a client's
  first connection, for one time unit, then from zero again at its next connection (not a sliding window);
  refused attempts count too, so a client that keeps retrying is refused until its time unit is over, then
  admitted again for `client_connection_rate_limit` connections. A
  refusal names the limit and the count, as Postfix's warning does (past both, the concurrency: Postfix checks
  it first); the caller logs it and answers 421.
  Clients for which `exempt(ip)` is true (mynetworks, as Postfix's smtpd_client_event_limit_exceptions
  default) are never limited. `release(ip)` when an admitted session ends. `adopt_limits(other)`: a reload's
  limits, the counts kept.
- `SessionSlots`: the listener's sessions at once (`max_sessions`). A connection beyond it waits, without a
  greeting, for a slot to free (back-pressure, as a Postfix service at its process limit leaves connections in
  the listen queue); when as many are already waiting, it is refused (the caller answers 421 4.3.2).
  `resize(limit)`: a reload's limit, for new connections; the sessions above a lowered one are not cut.

Failure behaviour: pure bookkeeping, no I/O; a refusal is a `Refusal` (the caller logs it, sends the 421 and
closes).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, NamedTuple

from mailflow.clock import Clock

STALE_SWEEP_SIZE = 10_000  # clients remembered for the rate before those whose time unit is over are swept


class Refusal(NamedTuple):
    """Why a connection was refused, in Postfix's words: `limit` ("Connection concurrency", "Connection rate")
    and the client's `number` of connections (at once, or in the time unit) with this one."""

    limit: str
    number: int


class Anvil:
    def __init__(self, *, count_limit: int, rate_limit: int, time_unit: float, clock: Clock,
                 exempt: Callable[[str], bool] = lambda ip: False):
        self._count_limit = count_limit
        self._rate_limit = rate_limit
        self._time_unit = time_unit
        self._clock = clock
        self._exempt = exempt
        self._sessions: dict[str, int] = {}
        self._windows: dict[str, tuple[float, int]] = {}  # per client: when its time unit began, connections since

    def adopt_limits(self, other: "Anvil") -> None:
        """A reload: `other`'s limits and exemptions from now on; the counts so far stay."""
        self._count_limit, self._rate_limit = other._count_limit, other._rate_limit
        self._time_unit, self._exempt = other._time_unit, other._exempt

    def admit(self, ip: str) -> Refusal | None:
        """None: admitted (and counted; call release later). Else why not."""
        if self._exempt(ip):
            return None
        too_fast = self._rate_limit and self._rate_exceeded(ip)  # (counted whichever limit refuses it)
        if self._count_limit and self._sessions.get(ip, 0) >= self._count_limit:  # named first, as Postfix does
            return Refusal("Connection concurrency", self._sessions[ip] + 1)
        if too_fast:
            return Refusal("Connection rate", self.rate(ip))
        self._sessions[ip] = self._sessions.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        left = self._sessions.get(ip, 0) - 1
        if left > 0:
            self._sessions[ip] = left
        else:
            self._sessions.pop(ip, None)

    def sessions(self, ip: str) -> int:
        return self._sessions.get(ip, 0)

    def rate(self, ip: str) -> int:
        """Connections of `ip` counted in its current time unit (refused ones included); 0 once it is over."""
        start, count = self._windows.get(ip, (0.0, 0))
        return count if not self._over(start, self._clock.time()) else 0

    def _rate_exceeded(self, ip: str) -> bool:
        """Count a connection of `ip`; True when it passes the rate limit (anvil.c's ANVIL_REMOTE_INCR_RATE: the
        count starts again at the first connection after the time unit)."""
        now = self._clock.time()
        start, count = self._windows.get(ip, (now, 0))
        if self._over(start, now):
            start, count = now, 0
        elif ip not in self._windows and len(self._windows) >= STALE_SWEEP_SIZE:
            self._forget_stale(now)
        self._windows[ip] = (start, count + 1)
        return count + 1 > self._rate_limit

    def _over(self, start: float, now: float) -> bool:
        return start + self._time_unit < now

    def _forget_stale(self, now: float) -> None:
        """Drop clients whose time unit is over (bounds memory under many client IPs)."""
        for ip in [ip for ip, (start, _) in self._windows.items() if self._over(start, now)]:
            del self._windows[ip]


class SessionSlots:
    """At most `limit` sessions at once; up to `limit` more wait for a slot; beyond that, refused. A reload's
    `resize(limit)` applies to the connections to come: sessions above a lowered limit go on, and until enough
    of them end a new connection waits; a raised limit admits those waiting at once (Postfix's master applies a
    changed process limit at a reload)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def limit(self) -> int:
        return self._limit

    async def acquire(self) -> bool:
        """Wait for a slot; False (at once) when `limit` connections are already waiting."""
        if self._held < self._limit and not self._waiters:
            self._held += 1
            return True
        if len(self._waiters) >= self._limit:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot just as it was cancelled: give it back
                self.release()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return True

    def release(self) -> None:
        self._held -= 1
        self._hand_over()

    def resize(self, limit: int) -> None:
        self._limit = limit
        self._hand_over()

    def _hand_over(self) -> None:
        """The free slots to the connections waiting, first come first served."""
        while self._waiters and self._held < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # (a cancelled one: its connection went away)
                self._held += 1
                waiter.set_result(None)
