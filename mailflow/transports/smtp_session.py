"""An open SMTP client session after its handshake, and the cache that keeps idle ones for the next message.

Owns the wire once aiosmtplib has connected, greeted, said EHLO, negotiated STARTTLS and AUTH: from then on
`ReplyReader` is the connection's protocol (`transport.set_protocol`). aiosmtplib's own protocol keeps at most
one reply and drops bytes that arrive while no command waits, which loses replies when commands are
pipelined (RFC 2920); the reader queues every complete reply in order instead. Nothing here is global.

    Session(client, peer, tls=..., opened=...)  takes over client's connection
      .supports(ext) .size_limit .alive .idle_clean .aborted .uses .transaction_open
      .send(bytes) .send_many([bytes])               write now (raises SMTPServerDisconnected when closed)
      await .drain(timeout)                          until the peer has taken enough of what was written
                                                     (flow control); TimeoutError, SMTPServerDisconnected
      await .reply(timeout) -> SMTPResponse          the next reply, in order; TimeoutError,
                                                     SMTPServerDisconnected, SMTPResponseException (garbage)
      .quit()   .abort()                             polite and impolite ends; both idempotent
    SessionCache(time_limit, reuse_count_limit, reuse_time_limit, clock)
      .take(key) -> Session | None                   an idle session for that destination, or None
      .accepts(session) -> bool   .put(key, session) keep it for `time_limit` seconds (a loop timer that QUITs it)
      .close()                                       QUIT every idle session, cancel the timers; no task is ever
                                                     started, so nothing runs on afterwards

Postfix's smtp(8) semantics: a session is kept for `connection_cache_time_limit` after its last delivery
(smtp_connection_cache_time_limit), used at most 1 + `connection_reuse_count_limit` times (0: no limit) and
not after `connection_reuse_time_limit` since it was opened. At most MAX_IDLE sessions wait in all; beyond
that a session is closed instead. An idle session that received anything (a 421 before the peer hung up)
or was closed is never handed out.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

import aiosmtplib
from aiosmtplib import SMTPResponse

log = logging.getLogger("mailflow.smtp")

MAX_IDLE = 200
MAX_REPLY_BYTES = 64 * 1024  # one reply, continuation lines included; more is not SMTP
CRLF = b"\r\n"


class ReplyReader(asyncio.Protocol):
    """Parses replies as they arrive and queues them; forwards connection loss to aiosmtplib's protocol so
    that the aiosmtplib client knows it is closed."""

    def __init__(self, previous: asyncio.BaseProtocol):
        self._previous = previous
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None  # set while the transport's write buffer is too full

    # -- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (reply := self._next_complete_reply()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as e:
            self._fail(e)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._previous.connection_lost(exc)

    # -- reading

    @property
    def buffered(self) -> bool:
        return bool(self._buffer or self._replies)

    @property
    def failed(self) -> bool:
        return self._error is not None

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes writes again (or raise the connection's failure)."""
        if self._error is not None:
            raise self._error
        if self._writable is not None:
            await asyncio.wait_for(asyncio.shield(self._writable), timeout)
        if self._error is not None:
            raise self._error

    async def reply(self, timeout: float) -> SMTPResponse:
        if not self._replies and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        self.resume_writing()  # a writer waiting for room learns of the failure

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done() and (self._replies or self._error):
            self._waiter.set_result(None)

    def _next_complete_reply(self) -> SMTPResponse | None:
        """One reply from the front of the buffer (`ddd-text` lines up to a `ddd text` line), or None."""
        offset, lines = 0, []
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset:end]).rstrip(b"\r")
            offset = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {line[:80]!r}")
            lines.append(line)
            if line[3:4] != b"-":
                del self._buffer[:offset]
                text = b"\n".join(part[4:].strip() for part in lines)
                return SMTPResponse(int(lines[0][:3]), text.decode("utf-8", "surrogateescape"))
        if len(self._buffer) > MAX_REPLY_BYTES:
            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        return None


class Session:
    """One SMTP session with one peer, past EHLO (and STARTTLS, AUTH), ready for mail transactions."""

    def __init__(self, client: aiosmtplib.SMTP, peer, *, tls: bool, opened: float):
        assert client.protocol is not None and client.protocol.transport is not None
        self.peer = peer
        self.tls = tls
        self.opened = opened
        self.uses = 0
        self.aborted = False  # closed by us (a timeout, a 421, the end): nothing more is read or sent
        self.transaction_open = False  # MAIL accepted, end of data not yet answered: RSET before reuse
        self._extensions = dict(client.esmtp_extensions)
        self._client = client
        self._transport = client.protocol.transport
        self._reader = ReplyReader(client.protocol)
        self._transport.set_protocol(self._reader)

    def supports(self, extension: str) -> bool:
        return extension.lower() in self._extensions

    @property
    def size_limit(self) -> int:
        """The peer's SIZE limit; 0 = none advertised or unlimited."""
        value = self._extensions.get("size", "").strip()
        return int(value) if value.isdigit() else 0

    @property
    def alive(self) -> bool:
        return not self.aborted and not self._transport.is_closing() and not self._reader.failed

    @property
    def idle_clean(self) -> bool:
        """Alive, and nothing arrived since the last reply was read (a waiting session must hear nothing)."""
        return self.alive and not self._reader.buffered

    def send(self, data: bytes) -> None:
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    def send_many(self, pieces: list[bytes]) -> None:
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.writelines(pieces)

    async def drain(self, timeout: float) -> None:
        await self._reader.drain(timeout)

    async def reply(self, timeout: float) -> SMTPResponse:
        return await self._reader.reply(timeout)

    def quit(self) -> None:
        """QUIT and close, without waiting for the reply (Postfix's smtp_skip_quit_response = yes: the results
        are final already, and a peer slow to answer QUIT must not hold them up). Idempotent."""
        try:
            if self.alive:
                self.send(b"QUIT" + CRLF)
        except (aiosmtplib.SMTPException, OSError) as e:
            log.debug("QUIT to %s: %r", self.peer.relay, e)
        self.abort()  # a graceful close: what was written is still sent

    def abort(self) -> None:
        self.aborted = True
        self._client.close()  # closes the transport and resets aiosmtplib's state
        if not self._transport.is_closing():
            self._transport.close()


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
        if self._closed or self._time_limit <= 0 or not session.alive or self._too_old(session):
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
