"""The SMTP client's connection cache (Postfix smtp_reuse and scache): idle sessions kept for the next message
to the same next hop. Nothing here is global; no task is ever started.

    SessionCache(time_limit, reuse_count_limit, reuse_time_limit, clock, max_idle=MAX_IDLE)
      .take(key) -> Session | None                   an idle session for that destination, or None
      .accepts(session) -> bool   .put(key, session) keep it for `time_limit` seconds (a loop timer that QUITs it)
      .close()                                       QUIT every idle session, cancel the timers; afterwards
                                                     nothing is cached again

Postfix's smtp(8) semantics: a session is kept for `connection_cache_time_limit` after its last delivery
(smtp_connection_cache_time_limit), used at most 1 + `connection_reuse_count_limit` times (0: no limit) and
not after `connection_reuse_time_limit` since it was opened. At most MAX_IDLE sessions wait in all; beyond
that a session is closed instead. An idle session that received anything (a 421 before the peer hung up)
or was closed is never handed out; one that met a reply with garbage in it (`garbled`) is not kept.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from mailflow.transports.smtp.chat import Session

MAX_IDLE = 200


class SessionCache:
    """Idle sessions by destination key, each on a loop timer that QUITs it after `time_limit` seconds."""

    def __init__(
        self,
        time_limit: float,
        reuse_count_limit: int,
        reuse_time_limit: float,
        clock: Callable[[], float] = time.monotonic,
        max_idle: int = MAX_IDLE,
    ):
        self._time_limit = time_limit
        self._reuse_count_limit = reuse_count_limit
        self._reuse_time_limit = reuse_time_limit
        self._clock = clock
        self._max_idle = max_idle
        self._idle: dict[str, list[tuple[Session, asyncio.TimerHandle]]] = {}
        self._closed = False

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: str) -> Session | None:
        """The most recently used idle session for `key` that is still usable; stale ones are closed."""
        waiting = self._idle.get(key, [])
        while waiting:
            session, timer = waiting.pop()
            timer.cancel()
            if session.idle_clean and not self._too_old(session):
                self._forget_if_empty(key)
                return session
            session.abort()
        self._forget_if_empty(key)
        return None

    def accepts(self, session: Session) -> bool:
        """May this session wait for another message? (Cache on, limits not reached, still alive.)"""
        if self._closed or self._time_limit <= 0 or not session.alive or session.garbled or \
                self._too_old(session):
            return False
        if self._reuse_count_limit and session.uses > self._reuse_count_limit:
            return False
        return self.idle_count < self._max_idle

    def put(self, key: str, session: Session) -> None:
        timer = asyncio.get_running_loop().call_later(self._time_limit, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, timer))

    def close(self) -> None:
        self._closed = True
        for waiting in self._idle.values():
            for session, timer in waiting:
                timer.cancel()
                session.quit()
        self._idle.clear()

    def _too_old(self, session: Session) -> bool:
        return self._clock() - session.opened >= self._reuse_time_limit

    def _expire(self, key: str, session: Session) -> None:
        waiting = self._idle.get(key, [])
        self._idle[key] = [(s, t) for s, t in waiting if s is not session]
        self._forget_if_empty(key)
        session.quit()

    def _forget_if_empty(self, key: str) -> None:
        if key in self._idle and not self._idle[key]:
            del self._idle[key]
