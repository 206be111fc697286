"""smtpd's AUTH against Dovecot's authentication server (`smtpd.sasl_type = "dovecot"`): the client side of
Dovecot's auth protocol 1.x, as Postfix's xsasl_dovecot speaks it, so that one dovecot-auth answers for IMAP,
POP3 and submission alike.

What it owns
- The protocol, sans-IO: `handshake_request(pid)`, `auth_request(id, login, password, ...)` (always PLAIN with
  the initial response: secure.py has already run the client's PLAIN or LOGIN exchange, so Dovecot is asked one
  question, `\\0login\\0password`, whichever mechanism the client used), `parse_line(line)` -> `Reply(command,
  id, args)`, `Handshake` (reads the server's lines up to DONE: VERSION must be major 1, MECH lines name the
  mechanisms, the rest is ignored, as Postfix does).
- `DovecotAuth(endpoint, timeout, clock)`: one connection for the whole server, shared by every session and
  listener; requests carry ids and may be in flight together (a reader task hands each answer to its request).
  `await verify(login, password, secured=, client_ip=, local_ip=) -> Verdict` (auth.Verdict): OK -> the
  login Dovecot names (`user=`), FAIL -> failed, FAIL with `temp` -> unavailable. `await close()`.
  `endpoint`: a unix socket path (`/run/dovecot/auth-mailflow`, also `unix:/path`) or `inet:host:port`.

Failure behaviour: never raises to its caller and never accepts a login it was not told OK for. A Dovecot that is
down (connect refused, socket missing), that answers nothing within `timeout` (connect, handshake or request),
that speaks another major version, offers no PLAIN, or closes the connection: the request is "unavailable"
(smtpd answers 454 4.7.0, the attempt does not count as a failure), the connection is dropped and made again at
the next request. A request that times out fails alone: the connection stays while it answers other requests
(Dovecot delays some answers: auth_failure_delay, a client IP's auth penalty up to 15 s); one silent since the
request was sent is retired (later requests go to a new connection; it is closed once the requests waiting on it
are answered or time out; past MAX_RETIRED of them the oldest is closed, its requests unavailable), so one
session's slow answer never fails another's request. A fault on a connection
(it closes, a write fails, a line over MAX_LINE) fails the requests on that connection only, never those on
another; a CONT (PLAIN with a response needs none) fails its request alone. Such faults are logged
through a FailureLog: the first at once, then once a minute with a count,
then "works again". Lines longer than MAX_LINE end the connection (bounded memory); a reply to an id nobody waits
for (its request timed out), or whose id is no number, is dropped (Postfix's xsasl_dovecot skips it too).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import os
import re
from dataclasses import dataclass, field

from mailflow.clock import Clock
from mailflow.faults import FailureLog
from mailflow.syntax import parse_hostport

log = logging.getLogger("mailflow.smtpd")

PROTOCOL_MAJOR, PROTOCOL_MINOR = 1, 2
MAX_LINE = 65536  # bytes of one line from the auth server
MAX_HANDSHAKE_LINES = 1000
MAX_RETIRED = 4  # retired connections kept open for their requests; past it the oldest is closed, its requests fail
REQUEST_ID = re.compile(r"[0-9]{1,10}")  # an id this client can have sent (str.isdigit takes "²", int() does not)
SERVICE = "smtp"


# ---------------------------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Reply:
    command: str  # OK, FAIL, CONT (or anything else, ignored)
    id: int | None
    args: dict[str, str] = field(default_factory=dict)  # `key=value` arguments; a bare word maps to ""


def handshake_request(pid: int) -> bytes:
    return f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}\nCPID\t{pid}\n".encode()


def auth_request(request_id: int, login: bytes, password: bytes, *, secured: bool, client_ip: str,
                 local_ip: str) -> bytes:
    """One AUTH line: PLAIN with the initial response; `secured` when the client is on TLS (Dovecot refuses
    plaintext mechanisms otherwise, disable_plaintext_auth); `nologin`: a credentials check, not a login."""
    response = base64.b64encode(b"\0" + login + b"\0" + password).decode()
    fields = [f"AUTH\t{request_id}\tPLAIN\tservice={SERVICE}\tnologin"]
    fields += [f"lip={_clean(local_ip)}"] if local_ip else []
    fields += [f"rip={_clean(client_ip)}"] if client_ip else []
    fields += ["secured"] if secured else []
    fields += [f"resp={response}"]
    return ("\t".join(fields) + "\n").encode()


def _clean(value: str) -> str:
    return "".join(c for c in value if c not in "\t\n\r")


def parse_line(line: bytes) -> Reply:
    """`OK\\t7\\tuser=alice@example.test` -> Reply("OK", 7, {"user": "alice@example.test"})."""
    words = line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
    command, rest = words[0], words[1:]
    request_id = int(rest[0]) if rest and REQUEST_ID.fullmatch(rest[0]) else None  # (else no request's: skipped)
    args = {}
    for word in rest[1:]:
        key, _, value = word.partition("=")
        args[key] = value
    return Reply(command, request_id, args)


class HandshakeError(Exception):
    pass


class Handshake:
    """The server's side of the handshake, fed line by line: `feed(line) -> True` once DONE came."""

    def __init__(self) -> None:
        self.version: tuple[int, int] | None = None
        self.mechanisms: list[str] = []

    def feed(self, line: bytes) -> bool:
        words = line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
        if words[0] == "VERSION":
            try:
                self.version = (int(words[1]), int(words[2]))
            except (IndexError, ValueError):
                raise HandshakeError(f"bad VERSION line {line[:80]!r}") from None
            if self.version[0] != PROTOCOL_MAJOR:
                raise HandshakeError(f"protocol version {self.version[0]}, mailflow speaks {PROTOCOL_MAJOR}")
        elif words[0] == "MECH" and len(words) > 1:
            self.mechanisms.append(words[1].upper())
        elif words[0] == "DONE":
            if self.version is None:
                raise HandshakeError("no VERSION before DONE")
            if "PLAIN" not in self.mechanisms:
                raise HandshakeError(f"no PLAIN mechanism (offered: {' '.join(self.mechanisms) or 'none'}); "
                                     "set auth_mechanisms = plain login")
            return True
        return False


# ---------------------------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Answer:
    """What Dovecot said to one request: `login` on OK; `temporary` on FAIL with `temp`; `reason` its words."""

    login: str | None
    temporary: bool = False
    reason: str = ""


class Unavailable(Exception):
    """Dovecot could not be asked (down, silent, closed, not speaking the protocol)."""


class UnexpectedReply(Exception):
    """An answer this client cannot use for its request (a CONT): that request fails, the connection stays."""


@dataclass(eq=False)
class _Connection:
    """One connection to the auth server and the requests waiting on it (by id); `heard`: lines read from it."""

    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[Answer]] = field(default_factory=dict)
    heard: int = 0
    retired: bool = False  # no new request is sent on it; closed once its last request is answered or given up
    reader_task: asyncio.Task | None = None

    def close(self) -> None:
        self.writer.close()
        if self.reader_task is not None and self.reader_task is not asyncio.current_task():
            self.reader_task.cancel()


class DovecotAuth:
    """The connection to one Dovecot auth socket, shared by the server's sessions (see the module doc)."""

    def __init__(self, endpoint: str, *, timeout: float, clock: Clock):
        self.endpoint = endpoint
        self._timeout = timeout
        self._faults = FailureLog(log, f"SASL: Dovecot auth server {endpoint}", clock)
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._current: _Connection | None = None
        self._retired: dict[_Connection, None] = {}  # oldest first

    async def ask(self, login: bytes, password: bytes, *, secured: bool, client_ip: str = "",
                  local_ip: str = "", timeout: float | None = None) -> Answer:
        """Dovecot's answer to `login`/`password` within `timeout` (the connection's own when None: listeners
        with their own sasl_timeout share one connection). Raises Unavailable (already logged)."""
        limit = self._timeout if timeout is None else timeout
        connection: _Connection | None = None  # where the request went, and what had been heard there then
        heard = 0
        try:  # (asyncio.timeout, not wait_for: its frame holds the task it made, the task a failure that holds it)
            async with asyncio.timeout(limit):
                connection = await self._connection()
                heard = connection.heard
                answer = await self._request(connection, login, password, secured, client_ip, local_ip)
        except TimeoutError:  # (an OSError: first)
            self._retire_if_silent(connection, heard)
            error = TimeoutError(f"no answer within {limit:g}s")
            self._faults.failed(error)
            raise Unavailable(str(error)) from None
        except UnexpectedReply as e:  # (that request alone: the connection goes on answering the others)
            self._faults.failed(ConnectionError(str(e)))
            raise Unavailable(str(e)) from None
        except (OSError, EOFError, HandshakeError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as e:
            if connection is not None:  # the one this request used, never another (a retired one's is not current)
                await self._discard(connection)
            self._faults.failed(e if isinstance(e, OSError) else ConnectionError(str(e) or type(e).__name__))
            raise Unavailable(str(e) or type(e).__name__) from None
        self._faults.succeeded()
        return answer

    async def _request(self, connection: _Connection, login: bytes, password: bytes, secured: bool,
                       client_ip: str, local_ip: str) -> Answer:
        request_id = next(self._ids)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = future
        try:
            connection.writer.write(auth_request(request_id, login, password, secured=secured, client_ip=client_ip,
                                                 local_ip=local_ip))
            await connection.writer.drain()
            return await future
        finally:
            connection.pending.pop(request_id, None)
            self._close_if_done(connection)

    def _close_if_done(self, connection: _Connection) -> None:
        """A retired connection no request waits on any more is closed."""
        if connection.retired and not connection.pending:
            self._retired.pop(connection, None)
            connection.close()

    def _retire_if_silent(self, connection: _Connection | None, heard: int) -> None:
        """One request timed out. A connection that answered others meanwhile stays: Dovecot delays some answers
        (auth_failure_delay, a client IP's auth penalty) and one slow answer must not fail the other sessions'
        requests. One silent since the request was sent is retired: new requests go to a new connection, and it
        is closed once the requests waiting on it are answered or time out. At most MAX_RETIRED stay open (each is
        one fd until its longest request ends): past it the oldest is closed and its requests are unavailable (454).
        `connection` None: it timed out connecting, nothing to retire."""
        if connection is None or connection.heard != heard or connection.retired:
            return
        if self._current is connection:
            self._current = None
        connection.retired = True
        self._retired[connection] = None
        self._close_if_done(connection)
        if len(self._retired) > MAX_RETIRED:  # (short and long sasl_timeouts mixed would retire one per timeout)
            oldest = next(iter(self._retired))
            del self._retired[oldest]
            for future in oldest.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"closed: more than {MAX_RETIRED} retired connections"))
            oldest.close()

    async def _connection(self) -> _Connection:
        async with self._connect_lock:
            if self._current is not None and not self._current.writer.is_closing():
                return self._current
            reader, writer = await self._open()
            try:
                writer.write(handshake_request(os.getpid()))
                await writer.drain()
                handshake = Handshake()
                for _ in range(MAX_HANDSHAKE_LINES):
                    line = await reader.readuntil(b"\n")
                    if handshake.feed(line):
                        break
                else:
                    raise HandshakeError(f"no DONE within {MAX_HANDSHAKE_LINES} lines")
            except BaseException:
                writer.close()
                raise
            connection = self._current = _Connection(writer)
            connection.reader_task = asyncio.create_task(self._read_replies(reader, connection), name="dovecot-auth")
            return connection

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        kind, _, rest = self.endpoint.partition(":")
        if kind == "inet":
            host, port = parse_hostport(rest)
            return await asyncio.open_connection(host, port, limit=MAX_LINE)
        path = rest if kind == "unix" else self.endpoint
        return await asyncio.open_unix_connection(path, limit=MAX_LINE)

    async def _read_replies(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        """Hand each OK/FAIL to its request; a CONT (PLAIN with a response needs none) fails it. At the end of
        the connection every request still waiting is failed: their callers answer 454."""
        error: BaseException = EOFError("the auth server closed the connection")
        try:
            while True:
                line = await reader.readuntil(b"\n")
                connection.heard += 1
                reply = parse_line(line)
                future = connection.pending.get(reply.id) if reply.id is not None else None
                if future is None or future.done():
                    continue
                if reply.command == "OK":
                    future.set_result(Answer(reply.args.get("user") or None))
                elif reply.command == "FAIL":
                    future.set_result(Answer(None, "temp" in reply.args, reply.args.get("reason", "")))
                elif reply.command == "CONT":
                    future.set_exception(UnexpectedReply("unexpected CONT to a PLAIN request with a response"))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            error = e if isinstance(e, OSError) else EOFError("the auth server closed the connection")
        except asyncio.CancelledError:
            error = EOFError("connection closed")
            raise
        finally:
            if self._current is connection:
                self._current = None
            self._retired.pop(connection, None)
            connection.writer.close()
            for future in connection.pending.values():
                if not future.done():
                    future.set_exception(error)

    async def _discard(self, connection: _Connection) -> None:
        """A fault on `connection` (a write failed; at its end the reader has already done this): it is closed and
        the requests waiting on it fail; the next request makes a new one if it was the current."""
        if self._current is connection:
            self._current = None
        self._retired.pop(connection, None)
        await self._close(connection)

    @staticmethod
    async def _close(connection: _Connection) -> None:
        connection.close()
        task = connection.reader_task
        if task is not None and task is not asyncio.current_task():
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        retired, self._retired = self._retired, {}
        for connection in retired:
            await self._close(connection)
        if self._current is not None:
            await self._discard(self._current)
