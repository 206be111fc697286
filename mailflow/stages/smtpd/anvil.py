"""smtpd's per-client limits (Postfix anvil(8) and master.cf maxproc), one set per listener.

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
- `Anvil.event(kind, ip, limit)`: counts one of a session's events, "mail" (MAIL), "rcpt" (RCPT, VRFY), "auth"
  (AUTH) or "newtls" (a TLS handshake that did not resume a session, a failed one too), against the session's
  `limit` (0: not counted, as Postfix's smtpd asks anvil only for a limit it has); a `Refusal` once the client has
  more than `limit` in its time unit. All of a client's counts share one time unit (anvil.c's ANVIL_REMOTE: the
  first event after the last unit, a connection included, starts the next one and sets every count to zero), so when
  `count_events` is set its connections are counted in it too, rate limit or not. `new_tls_over(ip, limit)` only
  looks (Postfix's newtls_stat, asked before a handshake).
  Memory: one record per client (a start time and its counts, changed in place); past STALE_SWEEP_SIZE clients,
  those whose time unit is over are dropped when a new one comes, and the next sweep waits until the table has
  doubled (so many clients live at once cost one scan per doubling, not one per connection).
- `SessionSlots`: the listener's sessions at once (`max_sessions`). A connection beyond it waits, without a
  greeting, for a slot to free (back-pressure, as a Postfix service at its process limit leaves connections in
  the listen queue); when as many are already waiting, it is refused (the caller answers 421 4.3.2).
  `resize(limit)`: a reload's limit, for new connections; the sessions above a lowered one are not cut.
- `Places(limit)`: at most `limit` of something at once, never waited for: `take()` is False when all are in
  use, `give_back()` returns one (server.py: the TLS handshakes of implicit-TLS connections being refused).

Failure behaviour: pure bookkeeping, no I/O; a refusal is a `Refusal` (the caller logs it and answers: 421 and
close for a connection or a new TLS session, 450 4.7.1 for the other events).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, NamedTuple

from mailflow.clock import Clock

STALE_SWEEP_SIZE = 10_000  # clients remembered for the rate before those whose time unit is over are swept


class EventLimit(NamedTuple):
    setting: str  # the [smtpd] setting that limits the event per anvil_rate_time_unit
    words: str  # what Postfix's anvil warning calls it


# A session's events counted per client and time unit
EVENT_LIMITS = {"mail": EventLimit("client_message_rate_limit", "Message delivery request rate"),
                "rcpt": EventLimit("client_recipient_rate_limit", "Recipient address rate"),
                "auth": EventLimit("client_auth_rate_limit", "AUTH command rate"),
                "newtls": EventLimit("client_new_tls_session_rate_limit", "New TLS session rate")}
_INDEX = {kind: i for i, kind in enumerate(("connect", *EVENT_LIMITS))}  # where a _Window keeps each count


class Refusal(NamedTuple):
    """Why a connection or an event was refused, in Postfix's words: `limit` ("Connection concurrency",
    "Connection rate", or one of EVENT_LIMITS) and the client's `number` (of connections at once, or of such
    events in the time unit) with this one."""

    limit: str
    number: int


class _Window:
    """One client's time unit: when it began and its counts since (connections, then EVENT_LIMITS' events)."""

    __slots__ = ("start", "counts")

    def __init__(self, start: float):
        self.start = start
        self.counts = [0] * len(_INDEX)

    def add(self, kind: str, now: float, time_unit: float) -> int:
        """Count one `kind` at `now` (every count from zero once the unit is over); the count with it."""
        if self.start + time_unit < now:
            self.start = now
            self.counts[:] = [0] * len(_INDEX)
        index = _INDEX[kind]
        self.counts[index] += 1
        return self.counts[index]

    def current(self, kind: str, now: float, time_unit: float) -> int:
        return 0 if self.start + time_unit < now else self.counts[_INDEX[kind]]


class Anvil:
    def __init__(self, *, count_limit: int, rate_limit: int, time_unit: float, clock: Clock,
                 exempt: Callable[[str], bool] = lambda ip: False, count_events: bool = False):
        """`count_events`: the listener limits some session event (EVENT_LIMITS), so connections are counted in
        every client's time unit even without a rate limit."""
        self._count_limit = count_limit
        self._rate_limit = rate_limit
        self._time_unit = time_unit
        self._clock = clock
        self._exempt = exempt
        self._count_events = count_events
        self._sessions: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}  # per client: its time unit and its counts in it
        self._sweep_at = STALE_SWEEP_SIZE  # clients in _windows at which stale ones are swept next

    def adopt_limits(self, other: "Anvil") -> None:
        """A reload: `other`'s limits and exemptions from now on; the counts so far stay."""
        self._count_limit, self._rate_limit = other._count_limit, other._rate_limit
        self._time_unit, self._exempt = other._time_unit, other._exempt
        self._count_events = other._count_events

    def admit(self, ip: str) -> Refusal | None:
        """None: admitted (and counted; call release later). Else why not."""
        if self._exempt(ip):
            return None
        rate = self._add(ip, "connect") if self._rate_limit or self._count_events else 0
        too_fast = self._rate_limit and rate > self._rate_limit  # (counted whichever limit refuses it)
        if self._count_limit and self._sessions.get(ip, 0) >= self._count_limit:  # named first, as Postfix does
            return Refusal("Connection concurrency", self._sessions[ip] + 1)
        if too_fast:
            return Refusal("Connection rate", rate)
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
        """Connections of `ip` counted in its current time unit (refused ones included); 0 once it is over (for
        the operator's view and the tests: the limits count with `admit`)."""
        return self._current(ip, "connect")

    def event(self, kind: str, ip: str, limit: int) -> Refusal | None:
        """Count event `kind` (a key of EVENT_LIMITS) of `ip`, unless `limit` is 0 or `ip` exempt; a Refusal
        when it makes more than `limit` in the client's time unit (refused ones count too, as in Postfix)."""
        if not limit or self._exempt(ip):
            return None
        count = self._add(ip, kind)
        return Refusal(EVENT_LIMITS[kind].words, count) if count > limit else None

    def new_tls_over(self, ip: str, limit: int) -> bool:
        """`ip` has had more than `limit` new TLS sessions in its time unit (0: no limit); nothing is counted."""
        return bool(limit) and not self._exempt(ip) and self._current(ip, "newtls") > limit

    def _add(self, ip: str, kind: str) -> int:
        """Count one `kind` of `ip` (anvil.c's ANVIL_REMOTE_INCR_RATE: every count starts again at the first event
        after the time unit); its count in the unit with this one."""
        now = self._clock.time()
        window = self._windows.get(ip)
        if window is None:
            if len(self._windows) >= self._sweep_at:
                self._forget_stale(now)
                self._sweep_at = max(STALE_SWEEP_SIZE, 2 * len(self._windows))
            window = self._windows[ip] = _Window(now)
        return window.add(kind, now, self._time_unit)

    def _current(self, ip: str, kind: str) -> int:
        window = self._windows.get(ip)
        return window.current(kind, self._clock.time(), self._time_unit) if window is not None else 0

    def _forget_stale(self, now: float) -> None:
        """Drop clients whose time unit is over (bounds memory under many client IPs)."""
        for ip in [ip for ip, window in self._windows.items() if window.start + self._time_unit < now]:
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


class Places:
    """At most `limit` at once; `take()` never waits (False: none free), `give_back()` frees one."""

    def __init__(self, limit: int):
        self._limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self._limit:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1
