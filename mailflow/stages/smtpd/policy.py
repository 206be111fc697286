"""The Postfix policy delegation protocol (SMTPD_POLICY_README), client side: `check_policy_service`.

Owns: the connections to one endpoint (`inet:host:port` or `unix:/path`, parsed by `mailflow.syntax.parse_endpoint`)
and the queries over them: `name=value` lines and an empty line out, `action=...` (plus any other attributes,
ignored) and an empty line back.

    PolicyClient(spec, timeout, max_idle=, max_ttl=, request_limit=).query(attributes) -> action text
                                                                                        raises PolicyError
    PolicyClient.close()      the idle connections now, the busy ones when their query ends (shutdown, reload)
    policy_service(arg, smtpd) -> PolicyService(client, default_action, context)
                              check_policy_service's argument (an endpoint, or `{ endpoint, name=value, ... }`:
                              mailflow.syntax.parse_policy_service) with smtpd's policy_service_* settings, the
                              service's own values over them (Postfix 3.0's per-service overrides); try_limit and
                              retry_delay are taken and checked, and the retry rule below stays

Connections are kept and reused, as Postfix's attr_clnt/auto_clnt keep one per smtpd process: the protocol is
lock-step, so a connection carries one query at a time and concurrent queries use up to CONNECTION_LIMIT
connections (more wait for one, within their timeout). An idle connection is closed after `max_idle`
(smtpd_policy_service_max_idle), any after `max_ttl` from its opening (smtpd_policy_service_max_ttl) and after
`request_limit` queries when that is not 0 (smtpd_policy_service_request_limit). A kept connection that the
server closed, or that has unasked-for data waiting, is dropped before use (Postfix: `readable()` before the
request). A query that fails on a reused connection (the server may close an idle one at any moment) is retried
once, at once, on a new connection; a query on a new connection is not retried (Postfix retries any failure
once, a second later: smtpd_policy_service_try_limit, retry_delay).

Failure behaviour: a refused connection, a timeout (`timeout` bounds the whole query: the wait for a connection,
the retry), a closed connection, an oversized or malformed reply all raise `PolicyError`, and the connection is
closed; the caller answers with smtpd's `policy_service_default_action` (Postfix: 451 4.3.5 Server configuration
problem). Attribute values never carry a line end (they are replaced by spaces), so a client cannot inject
attributes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import NamedTuple

from mailflow.syntax import parse_endpoint, parse_policy_service

log = logging.getLogger("mailflow.smtpd")

MAX_REPLY_BYTES = 64 * 1024  # a reply beyond this is a broken server, not a long action
CONNECTION_LIMIT = 20  # connections to one endpoint at a time (Postfix: one per smtpd process)


class PolicyError(Exception):
    """The policy server could not be asked or gave no usable answer."""


def encode_request(attributes: dict[str, str]) -> bytes:
    lines = [f"{name}={_one_line(value)}\n" for name, value in attributes.items()]
    return ("".join(lines) + "\n").encode("utf-8", "replace")


def _one_line(value: object) -> str:
    return re.sub(r"[\r\n\0]", " ", str(value))


def parse_reply(lines: list[str]) -> str:
    """The first `action` attribute of a reply (empty if its value is: Postfix takes that as OK); PolicyError when
    there is none. The name is what stands before the `=`, as Postfix's attr_scan_plain reads it: ` action` and
    `action ` name other attributes, so such a reply has no action (the default action answers)."""
    for line in lines:
        name, eq, value = line.partition("=")
        if eq and name == "action":
            return value.strip()
    raise PolicyError("reply without an action")


class _Connection(asyncio.Protocol):
    """One connection to the server: a request written, the reply's lines read up to its empty line."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.opened = loop.time()
        self.requests = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._scanned = 0  # the buffer's lines before this offset hold no empty one
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES and self._transport is not None:  # (ask() says why)
            self._transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def usable(self) -> bool:
        """Open, and nothing unasked-for from the server waiting (its close, or a stray reply)."""
        return not self._closed and not self._buffer and self._transport is not None

    def close(self) -> None:
        self._closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self._transport is not None and not self.loop.is_closed():
            self._transport.close()

    async def ask(self, request: bytes) -> list[str]:
        """The reply's lines. ConnectionError when the server closes first, PolicyError for an oversized reply."""
        assert self._transport is not None
        self._transport.write(request)
        while (lines := self._reply()) is None:
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise PolicyError(f"reply longer than {MAX_REPLY_BYTES} bytes")
            if self._closed:
                raise ConnectionResetError("the policy server closed the connection")
            self._waiter = self.loop.create_future()
            await self._waiter
        return lines

    def _reply(self) -> list[str] | None:
        """The reply's lines once its empty line has come (taken from the buffer), else None. Each arrival looks
        only at the lines that are new (`_scanned`: where they begin): a reply dribbled a line at a time costs its
        length, not its length at every arrival."""
        buffer, start = self._buffer, self._scanned
        while (end := buffer.find(b"\n", start)) >= 0:
            if not buffer[start:end].rstrip(b"\r"):  # the empty line: the lines before it are the reply
                lines = [line.decode("utf-8", "replace").rstrip("\r") for line in buffer[:start].split(b"\n")[:-1]]
                del buffer[:end + 1]
                self._scanned = 0
                return lines
            start = end + 1
        self._scanned = start
        return None


class PolicyService(NamedTuple):
    """One check_policy_service's client, and what its requests and failures use."""

    client: PolicyClient
    default_action: str  # the action when the server cannot be asked (policy_service_default_action)
    context: str  # the requests' policy_context attribute


def policy_service(arg: str, smtpd) -> PolicyService:
    """See the module doc; `arg` was checked by the configuration (ValueError otherwise)."""
    endpoint, own = parse_policy_service(arg)
    settings = {name: getattr(smtpd, f"policy_service_{name}") for name in
                ("timeout", "max_idle", "max_ttl", "request_limit", "default_action", "policy_context")}
    settings.update((name, value) for name, value in own.items() if name in settings)
    client = PolicyClient(endpoint, float(settings["timeout"]), max_idle=float(settings["max_idle"]),
                          max_ttl=float(settings["max_ttl"]), request_limit=int(settings["request_limit"]))
    return PolicyService(client, str(settings["default_action"]), str(settings["policy_context"]))


class PolicyClient:
    """The connections to one policy endpoint; see the module doc."""

    def __init__(self, spec: str, timeout: float, *, max_idle: float = 300.0, max_ttl: float = 1000.0,
                 request_limit: int = 0, connection_limit: int = CONNECTION_LIMIT):
        self.spec = spec
        self._endpoint = parse_endpoint(spec)
        self._timeout = timeout
        self._max_idle = max_idle
        self._max_ttl = max_ttl
        self._request_limit = request_limit
        self._slots = asyncio.Semaphore(connection_limit)
        self._idle: list[_Connection] = []  # the most recently used last
        self._closed = False

    async def query(self, attributes: dict[str, str]) -> str:
        request = encode_request(attributes)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    return parse_reply(await self._exchange(request))
        except TimeoutError:
            raise PolicyError(f"timeout after {self._timeout:g}s") from None
        except (OSError, ValueError) as e:
            raise PolicyError(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        """No more reuse: the idle connections are closed now, a busy one when its query ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def _exchange(self, request: bytes) -> list[str]:
        kept = self._reusable()
        if kept is not None:
            try:
                return await self._ask(kept, request)
            except OSError as e:  # the server closed it while it was idle, or went away: one new connection
                log.info("policy service %s: reused connection failed (%s); asking on a new one", self.spec, e)
        return await self._ask(await self._connect(), request)

    async def _ask(self, connection: _Connection, request: bytes) -> list[str]:
        try:
            lines = await connection.ask(request)
        except BaseException:  # a failure, or the timeout's cancellation: the exchange is in an unknown state
            connection.close()
            raise
        self._release(connection)
        return lines

    def _reusable(self) -> _Connection | None:
        """The most recently used idle connection that can still serve; the others met on the way are closed."""
        loop = asyncio.get_running_loop()
        while self._idle:
            connection = self._idle.pop()
            if connection.idle_timer is not None:
                connection.idle_timer.cancel()
            if connection.loop is loop and connection.usable and loop.time() - connection.opened < self._max_ttl:
                return connection
            connection.close()
        return None

    def _release(self, connection: _Connection) -> None:
        """Kept for the next query, unless it has served its time or its count, or the client is closed."""
        connection.requests += 1
        age = connection.loop.time() - connection.opened
        if self._closed or not connection.usable or age >= self._max_ttl or \
                0 < self._request_limit <= connection.requests:
            connection.close()
            return
        wait = min(self._max_idle, self._max_ttl - age)
        connection.idle_timer = connection.loop.call_later(wait, self._expire, connection)
        self._idle.append(connection)

    def _expire(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(connection)
        connection.idle_timer = None
        connection.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        kind, where, port = self._endpoint
        if kind == "unix":
            _, connection = await loop.create_unix_connection(lambda: _Connection(loop), where)
        else:
            _, connection = await loop.create_connection(lambda: _Connection(loop), where, port)
        return connection
