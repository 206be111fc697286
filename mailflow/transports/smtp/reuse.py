"""The SMTP and LMTP clients' connection cache (Postfix smtp_reuse and scache, which lmtp(8) shares): idle
sessions kept for the next message to the same next hop. Nothing here is global; no task is ever started.

    SessionCache.of(config, clock)                   the cache of a client's settings (connection_cache_time_limit,
                                                     connection_reuse_count_limit, connection_reuse_time_limit; its
                                                     RSET timeout min(RSET_TIMEOUT, command_timeout))
      .rset_timeout                                  how long a probe or a release waits for RSET's reply
      await .reuse(key, transaction) -> Session | None   `transaction(session)` (proto.send_message with
                                                     reused=True and its RSET probe, `probe=rset_timeout`) on one
                                                     idle session for `key`: that session, to be released; None
                                                     when none was idle or it had died or failed its probe
                                                     (StaleSession: closed, nothing delivered)
      await .release(key, session)                   keep the session (RSET first when its transaction is still
                                                     open) or QUIT it
      .close()                                       QUIT every idle session, cancel the timers; afterwards
                                                     nothing is cached again

Postfix's smtp(8) semantics: a session is kept for `connection_cache_time_limit` after its last delivery
(smtp_connection_cache_time_limit), used at most 1 + `connection_reuse_count_limit` times (0: no limit) and
not after `connection_reuse_time_limit` since it was opened. At most MAX_IDLE sessions wait in all; beyond
that a session is closed instead. An idle session that received anything (a 421 before the peer hung up)
or was closed is never handed out; one that met a reply with garbage in it (`garbled`) is not kept.

Postfix's smtp(8) and lmtp(8) alike send an RSET probe before each reuse (smtp_reuse_common: smtp_rset) and
try at most one cached session per lookup (smtp_reuse_nexthop; one per address for smtp_reuse_addr): a
session that fails its probe is dropped and the message goes over a new one. So does `reuse`: one session,
never the next idle one, so a peer whose idle sessions all stop answering costs one RSET timeout per delivery,
not one per session. A session cancelled while it is probed or RSET (the delivery cancelled) is closed.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Protocol

from mailflow.transports.smtp.chat import Session
from mailflow.transports.smtp.proto import reset
from mailflow.transports.smtp.trouble import StaleSession

MAX_IDLE = 200
# How long RSET's reply is waited for: the RSET probe's before each reuse (proto.send_message's `probe`) and the
# RSET's before a session whose transaction is still open is cached; a slow peer must not hold results back long.
RSET_TIMEOUT = 20.0  # Postfix smtp_rset_timeout, lmtp_rset_timeout


class CachingClient(Protocol):
    """The settings of an SMTP or LMTP client that its cache reads."""

    @property
    def connection_cache_time_limit(self) -> float: ...

    @property
    def connection_reuse_count_limit(self) -> int: ...

    @property
    def connection_reuse_time_limit(self) -> float: ...

    @property
    def command_timeout(self) -> float: ...


class SessionCache:
    """Idle sessions by destination key, each on a loop timer that QUITs it after `time_limit` seconds."""

    def __init__(
        self,
        time_limit: float,
        reuse_count_limit: int,
        reuse_time_limit: float,
        rset_timeout: float,
        clock: Callable[[], float],
        max_idle: int = MAX_IDLE,
    ):
        self.rset_timeout = rset_timeout
        self._time_limit = time_limit
        self._reuse_count_limit = reuse_count_limit
        self._reuse_time_limit = reuse_time_limit
        self._clock = clock
        self._max_idle = max_idle
        self._idle: dict[str, list[tuple[Session, asyncio.TimerHandle]]] = {}
        self._idle_total = 0  # the sessions in `_idle`, all keys: counted as they come and go, not summed per release
        self._closed = False

    @classmethod
    def of(cls, config: CachingClient, clock: Callable[[], float] = time.monotonic) -> SessionCache:
        """See the module docstring."""
        return cls(config.connection_cache_time_limit, config.connection_reuse_count_limit,
                   config.connection_reuse_time_limit, min(RSET_TIMEOUT, config.command_timeout), clock=clock)

    @property
    def idle_count(self) -> int:
        return self._idle_total

    def _take(self, key: str) -> Session | None:
        """The most recently used idle session for `key` that is still usable; stale ones are closed."""
        waiting = self._idle.get(key, [])
        while waiting:
            session, timer = waiting.pop()
            self._idle_total -= 1
            timer.cancel()
            if session.idle_clean and not self._too_old(session):
                self._forget_if_empty(key)
                return session
            session.abort()
        self._forget_if_empty(key)
        return None

    def _accepts(self, session: Session) -> bool:
        """May this session wait for another message? (Cache on, limits not reached, still alive.)"""
        if self._closed or self._time_limit <= 0 or not session.alive or session.garbled or \
                self._too_old(session):
            return False
        if self._reuse_count_limit and session.uses > self._reuse_count_limit:
            return False
        return self.idle_count < self._max_idle

    def _put(self, key: str, session: Session) -> None:
        """Keep it for `time_limit` seconds (a loop timer that QUITs it)."""
        timer = asyncio.get_running_loop().call_later(self._time_limit, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, timer))
        self._idle_total += 1

    async def reuse(self, key: str, transaction: Callable[[Session], Awaitable[None]]) -> Session | None:
        """See the module docstring."""
        session = self._take(key)
        if session is None:
            return None
        try:
            await transaction(session)
        except StaleSession:
            session.log.debug("%s: cached session with %s is gone; using a new one", session.queue_id,
                              session.peer.relay)
            session.abort()
            return None
        except BaseException:
            session.abort()
            raise
        return session

    async def release(self, key: str, session: Session) -> None:
        """See the module docstring."""
        if session.aborted or not self._accepts(session):
            session.quit()
            return
        try:
            reset_failed = session.transaction_open and not await reset(session, self.rset_timeout)
        except BaseException:
            session.abort()
            raise
        if reset_failed:
            session.abort()
            return
        if session.garbled:  # (RSET's reply had garbage in it)
            session.quit()
            return
        self._put(key, session)

    def close(self) -> None:
        self._closed = True
        for waiting in self._idle.values():
            for session, timer in waiting:
                timer.cancel()
                session.quit()
        self._idle.clear()
        self._idle_total = 0

    def _too_old(self, session: Session) -> bool:
        return self._clock() - session.opened >= self._reuse_time_limit

    def _expire(self, key: str, session: Session) -> None:
        waiting = self._idle.get(key, [])
        self._idle[key] = [(s, t) for s, t in waiting if s is not session]
        self._idle_total -= len(waiting) - len(self._idle[key])
        self._forget_if_empty(key)
        session.quit()

    def _forget_if_empty(self, key: str) -> None:
        if key in self._idle and not self._idle[key]:
            del self._idle[key]
