"""One connection of the SMTP and LMTP clients (Postfix smtp_chat): commands out, replies in, in order.

Owns the wire from connect to close. `Wire` is the connection's asyncio protocol: it feeds what arrives to the
sans-IO `ReplyParser` and queues the complete replies in order, so that replies to pipelined commands (RFC 2920)
are never lost; it applies flow control both ways (a writer waits while the peer is not reading; reading pauses
while READ_AHEAD replies wait unread, the rest of what was read parsed as they are taken) and stays the protocol
across STARTTLS. `Session` is one peer's session over it; every I/O problem becomes a `SiteFailure` naming the
peer and what was being done (see trouble). The wire keeps its failure and raises it at every later read; told as
a SiteFailure, it keeps no traceback (which would hold the wire's frames, and they the wire: a reference cycle per
failed connection).

    Timeouts(connect, helo, command, data)            the limit of each stage of a session, in seconds
    Session(wire, peer, opened, log=None)             (built by connect.open_session; `log`: its client's logger)
      .send(data, activity) .send_many(pieces, activity)   write now (a big piece is not copied into a join)
      await .drain(timeout, activity)                 until the peer has taken enough of what was written
      await .reply(timeout, activity) -> Reply        the next reply in order; a 421 closes the session
                                                      (RFC 5321 3.8: what would follow on it is lost); a reply
                                                      with garbage lines in it (reply.garbage) sets `garbled`
                                                      and, once PIPELINING was offered, logs Postfix's warning
                                                      "Q: non-ESMTP response from h[ip]:port: line" (non-LMTP for
                                                      LMTP) for each line, made printable (logs.printable), at
                                                      most GARBAGE_KEPT a reply: the rest in one line that counts
                                                      them (a hostile peer makes no unbounded log)
      await .command(line, timeout, activity) -> Reply
      await .start_tls(context, server_hostname, timeout)   TLS on the same connection; whatever arrived before
                                                      is dropped (RFC 3207 4.2); raises ssl.SSLError, OSError,
                                                      TimeoutError (the caller decides what they mean)
      .extensions (what EHLO/LHLO offered) .tls .peercert .peercert_der .cipher .tls_version
      .alive .idle_clean .aborted .uses .transaction_open .opened
      .garbled           a reply had garbage in it: the session is not cached (Postfix's DONT_CACHE_THIS_SESSION)
      .queue_id .dialect the message the session is busy with and "ESMTP" or "LMTP", for its log lines
      .log               the logger of its lines: its client's (`log`: client_log(program), so that a relay
                         session's lines are `relay/smtp`'s, as every line of Postfix's relay process), else the
                         dialect's service (CLIENT_LOGS): an LMTP session's lines `lmtp`, as Postfix's lmtp(8) writes
                         them, an SMTP one's `smtp`
      .quit() .abort()                                polite and impolite ends; both idempotent
    client_log(program) -> Logger                     the logger whose lines are `program`'s (logs.service_of)

`quit` sends QUIT and closes without waiting for the reply (Postfix smtp_skip_quit_response and
lmtp_skip_quit_response: the results are final already, a peer slow to answer QUIT must not hold them up); what
was written is still sent. `abort` closes at once, dropping what was not sent yet (a peer that stopped reading
must not keep the connection open).
"""
from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Callable

from mailflow.errors import detached
from mailflow.logs import printable
from mailflow.transports.smtp.addr import Peer
from mailflow.transports.smtp.commands import Extensions
from mailflow.transports.smtp.reply import MalformedReply, Reply, ReplyFilterError, ReplyParser
from mailflow.transports.smtp.trouble import stream_failure

# The logger of a session's lines by its dialect: the service the log names (logs.service_of), Postfix's smtp(8) or
# lmtp(8), whose lines these are when it speaks it
def client_log(program: str) -> logging.Logger:
    """See the module docstring (`relay/smtp`: mailflow.relay/smtp, whose lines logs.service_of names so)."""
    return logging.getLogger(f"mailflow.{program}")


CLIENT_LOGS = {dialect: client_log(program) for dialect, program in (("ESMTP", "smtp"), ("LMTP", "lmtp"))}


READ_AHEAD = 64  # complete replies waiting to be read before reading pauses
JOIN_LIMIT = 16384  # send_many joins pieces smaller than this; a bigger one is written as it is (not copied)
CRLF = b"\r\n"
LOST = "Connection lost"


@dataclass(frozen=True)
class Timeouts:
    """connect: TCP; helo: the greeting and EHLO/HELO/LHLO; command: STARTTLS, AUTH, MAIL, each RCPT, DATA, RSET;
    data: writing the content and the reply (or, LMTP, each reply) after it."""

    connect: float
    helo: float
    command: float
    data: float


class ConnectionClosed(ConnectionError):
    """The peer closed the connection, or it was lost."""


class Wire(asyncio.Protocol):
    """See the module docstring."""

    def __init__(self, line_filter: Callable[[bytes], bytes] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = ReplyParser(line_filter)
        self._replies: deque[Reply] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None  # set while the transport's write buffer is too full
        self._reading_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # One timer for the replies waited for, moved rather than made again at each (as smtpd's deadline): the
        # current wait's end (inf: none), and when the timer set fires (None: no timer set)
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (a stream transport; uvloop's are not subclasses)
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self._error is not None and isinstance(self._error, (MalformedReply, ReplyFilterError)):
            return  # the parser is of no further use
        self._parser.receive_data(data)
        room = READ_AHEAD - len(self._replies)  # (READ_AHEAD at most: the rest of a read stays in the parser's
        try:  # bytes, `_parse_more`'s)
            while room > 0 and (reply := self._parser.next_reply()) is not None:
                self._replies.append(reply)
                room -= 1
        except (MalformedReply, ReplyFilterError) as e:
            self._fail(e)
        if room <= 0 and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def _parse_more(self) -> None:
        """The queue of replies refilled up to READ_AHEAD from what was read and not parsed yet: one read of
        pipelined replies (256 KB, ~18 000 replies to RCPT) was parsed whole in one loop turn (0.1-0.3 s)."""
        if isinstance(self._error, (MalformedReply, ReplyFilterError)):  # (the parser is of no further use)
            return
        try:
            while len(self._replies) < READ_AHEAD and (reply := self._parser.next_reply()) is not None:
                self._replies.append(reply)
        except (MalformedReply, ReplyFilterError) as e:
            self._fail(e)

    def eof_received(self) -> bool:
        self._fail(ConnectionClosed("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = ConnectionClosed(LOST)
        lost.__cause__ = exc
        self._fail(lost)
        if self._timer is not None:  # (the wire is let go at once, not when its timer would have fired)
            self._timer.cancel()
            self._timer = self._timer_at = None

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- reading

    @property
    def buffered(self) -> bool:
        return bool(self._replies) or self._parser.buffered

    @property
    def failed(self) -> bool:
        return self._error is not None

    def forget_buffered(self) -> None:
        self._parser.clear()
        self._replies.clear()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drain(self, timeout: float) -> None:
        """Wait until the transport takes writes again (or raise the connection's failure)."""
        if self._error is not None:
            raise self._error
        if self._writable is not None:
            await asyncio.wait_for(asyncio.shield(self._writable), timeout)
        if self._error is not None:
            raise self._error

    async def reply(self, timeout: float) -> Reply:
        if not self._replies and self._error is None:
            # One future, and the wire's one timer (wait_for adds a future and a loop turn, asyncio.timeout a task
            # lookup, and a timer made and cancelled at each wait is a dozen calls): see `_timer_fired`
            loop = self._loop or asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            self._deadline = loop.time() + timeout if timeout is not None else math.inf
            if self._deadline != math.inf and (self._timer_at is None or self._timer_at > self._deadline):
                self._set_timer(loop, self._deadline)
            try:
                await waiter
            finally:
                self._waiter = None
                self._deadline = math.inf
        if self._replies:
            reply = self._replies.popleft()
            if self._reading_paused and len(self._replies) < READ_AHEAD // 2 and self.transport is not None:
                self._parse_more()  # (reading stays paused while what was read holds more replies)
                if len(self._replies) < READ_AHEAD:
                    self._reading_paused = False
                    self.transport.resume_reading()
            return reply
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

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        """The timer set for a wait's end: the wait under way times out (TimeoutError) when its end has come; a
        later one's end sets the timer again; with no wait under way it is left unset."""
        self._timer = self._timer_at = None
        waiter, loop = self._waiter, self._loop or asyncio.get_running_loop()
        if waiter is None or waiter.done() or self._deadline == math.inf:
            return
        if loop.time() < self._deadline:
            self._set_timer(loop, self._deadline)
            return
        waiter.set_exception(TimeoutError())


class Session:
    """One session with one peer over one connection (see the module docstring)."""

    def __init__(self, wire: Wire, peer: Peer, opened: float, log: logging.Logger | None = None):
        assert wire.transport is not None
        self._log = log
        self.peer = peer
        self.opened = opened
        self.extensions = Extensions()
        self.tls = False
        self.uses = 0
        self.aborted = False  # closed by us (a timeout, a 421, the end): nothing more is read or sent
        self.transaction_open = False  # MAIL accepted, end of data not yet answered: RSET before it is cached
        self.garbled = False  # a reply had garbage in it: not to be cached
        self.queue_id = ""
        self.dialect = "ESMTP"
        self._wire = wire
        self._transport: asyncio.Transport = wire.transport

    @property
    def log(self) -> logging.Logger:
        """The logger of this session's lines (its client's; else its dialect's: set by connect.hello, before any
        line can be written)."""
        return self._log if self._log is not None else CLIENT_LOGS[self.dialect]

    @property
    def alive(self) -> bool:
        return not self.aborted and not self._transport.is_closing() and not self._wire.failed

    @property
    def idle_clean(self) -> bool:
        """Alive, and nothing arrived since the last reply was read (a waiting session must hear nothing)."""
        return self.alive and not self._wire.buffered

    @property
    def peercert(self) -> dict:
        return self._transport.get_extra_info("peercert") or {}

    @property
    def peercert_der(self) -> bytes:
        """The peer's certificate as DER, whether or not it was verified (DANE matches it against TLSA)."""
        ssl_object = self._transport.get_extra_info("ssl_object")
        return (ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None) or b""

    @property
    def cipher(self) -> tuple:
        return self._transport.get_extra_info("cipher") or ("?", "?", 0)

    @property
    def tls_version(self) -> str:
        """The protocol the TLS session uses ("TLSv1.3"), as the log names it."""
        ssl_object = self._transport.get_extra_info("ssl_object")
        return (ssl_object.version() if ssl_object is not None else None) or self.cipher[1]

    # -- writing

    def send(self, data: bytes, activity: str) -> None:
        self._check_open(activity)
        self._transport.write(data)

    def send_many(self, pieces: list[bytes], activity: str) -> None:
        """The pieces in order: small neighbours joined into one write, a big piece written as it is (asyncio's
        writelines would copy it into the join)."""
        self._check_open(activity)
        small: list[bytes] = []
        for piece in pieces:
            if len(piece) < JOIN_LIMIT:
                small.append(piece)
                continue
            if small:
                self._transport.write(b"".join(small))
                small = []
            self._transport.write(piece)
        if small:
            self._transport.write(b"".join(small))

    async def drain(self, timeout: float, activity: str) -> None:
        try:
            await self._wire.drain(timeout)
        except (OSError, TimeoutError, MalformedReply, ReplyFilterError) as e:
            self.abort()
            if isinstance(e, ReplyFilterError):
                self.log.warning("%s: %s", self.queue_id or "NOQUEUE", e)
            raise stream_failure(self.peer, activity, detached(e)) from None

    def _check_open(self, activity: str) -> None:
        if self.aborted or self._transport.is_closing():
            raise stream_failure(self.peer, activity, ConnectionClosed(LOST))

    # -- reading

    async def reply(self, timeout: float, activity: str) -> Reply:
        if self.aborted:
            raise stream_failure(self.peer, activity, ConnectionClosed(LOST))
        try:
            reply = await self._wire.reply(timeout)
        except (OSError, TimeoutError, MalformedReply, ReplyFilterError) as e:
            self.abort()
            if isinstance(e, ReplyFilterError):
                self.log.warning("%s: %s", self.queue_id or "NOQUEUE", e)
            raise stream_failure(self.peer, activity, detached(e)) from None
        if reply.code == 421:
            self.abort()
        if reply.garbage_count:
            self._saw_garbage(reply)
        return reply

    def _saw_garbage(self, reply: Reply) -> None:
        """Postfix's smtp_chat_resp: no more caching, and with PIPELINING a warning for each garbage line (a reply
        may have been taken for another's), the kept ones each, the rest counted in one."""
        self.garbled = True
        if not self.extensions.supports("pipelining"):
            return
        for line in reply.garbage:
            self.log.warning("%s: non-%s response from %s: %s", self.queue_id, self.dialect, self.peer.relay,
                             printable(line[:100]))
        unkept = reply.garbage_count - len(reply.garbage)
        if unkept:
            self.log.warning("%s: %d more non-%s response lines from %s", self.queue_id, unkept, self.dialect,
                             self.peer.relay)

    async def command(self, line: bytes, timeout: float, activity: str) -> Reply:
        self.send(line, activity)
        return await self.reply(timeout, activity)

    # -- TLS

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None, timeout: float) -> None:
        self._wire.forget_buffered()  # RFC 3207 4.2: nothing received before the handshake counts
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport = await loop.start_tls(self._transport, self._wire, context, server_side=False,
                                             server_hostname=server_hostname,
                                             ssl_handshake_timeout=timeout if timeout > 0 else None)
        if transport is None:
            raise ConnectionClosed("the connection closed during the TLS handshake")
        self._wire.transport = self._transport = transport
        self.tls = True
        self.extensions = Extensions()  # RFC 3207 4.2: forget what the server said in plaintext

    # -- the end

    def quit(self) -> None:
        if self.alive:
            self._transport.write(b"QUIT" + CRLF)
        self.aborted = True
        self._transport.close()  # what was written is still sent

    def abort(self) -> None:
        self.aborted = True
        self._transport.abort()
