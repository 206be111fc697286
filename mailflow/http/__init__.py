"""The one HTTP layer: an aiohttp application on the server's own loop (no thread), serving the routes that the
features register: the capture API of `[sink]` (mailflow.capture.mailpit) on `[http] listen`, the admin API, the
queue page and /metrics (mailflow.admin) on `[admin] listen`. One implementation, one set of limits, one place
that starts and stops each listener.

    HttpServer(listen, middlewares=(), read_timeout=READ_TIMEOUT, send_timeout=SEND_TIMEOUT)
                                            `listen`: "host:port" addresses (loopback by default); `middlewares`:
                                            aiohttp middlewares run for every request (the admin's access checks)
        add_routes(feature, routes)         a feature's aiohttp route definitions (web.RouteTableDef or a list),
                                            before start(); a path registered twice is refused (ValueError)
        await start()                       binds every address (port 0: an ephemeral one)
        addresses -> [(host, port)]         what was bound
        await stop()                        closes the listeners and the open connections
        features -> [name]

Loaded only by what serves HTTP (aiohttp takes a third of a second to import): `Mailflow` imports it when a
feature is enabled.

Limits (a slow or hostile client holds a connection for a bounded time and costs no more than these):
at most MAX_CONNECTIONS open connections per server (all its addresses together): one more is answered 503 and
closed at once, with one warning per BUSY_LOG_INTERVAL while it lasts;
request bodies up to MAX_BODY bytes (413 beyond, at once when Content-Length says so); READ_TIMEOUT seconds
(Mailpit's ReadTimeout) for a request's line and headers, counted from the connection or the end of the previous
response (the connection is then closed: an idle keep-alive one too), and again for its body (408: the body is
read whole before the handler runs, which has it from request.read(), .json() or a urlencoded .post(), not as a
stream: `can_read_body` is then false, `body_exists` still true); and SEND_TIMEOUT seconds (nginx's
send_timeout) between two acknowledgements of an answer's bytes while the connection's send buffer is full, else
the connection is cut (`_SendDeadline`: without it, one that never read kept its connection and the answer's
bytes for ever). A client's kernel acknowledges in steps of its receive window (64-95 KB with default buffers), so
a client is served however long its answer takes if it reads at least such a step every SEND_TIMEOUT (about 1.5 KB/s);
an answer's body is written SEND_SLICE at a time as the client
takes it (`_sent_in_slices`), so that a slow client holds no copy of it; no access
log, and a client's broken request (a bad request line, headers over aiohttp's limits, a body cut short, a
peer gone mid-response) is logged in one line at debug: a client must not be able to fill the log; a
credential in the header line aiohttp quotes is not logged. A handler that raises gets 500 and one logged
traceback (aiohttp's). A refusal raised as an HTTPException (by the router, a middleware or a handler) is returned
as the same response by the outermost middleware (`response_of`), not left to aiohttp, which would keep the raised
one in a reference cycle with its frames.

Failure behaviour: `start` raises OSError when an address cannot be bound (the caller stops the server);
`stop` never raises.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import re
import socket
import struct
import termios
from typing import Callable, Iterable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mailflow.errors import detached
from mailflow.listening import listen
from mailflow.syntax import parse_hostport

log = logging.getLogger("mailflow.http")

MAX_BODY = 1024 * 1024
SEND_SLICE = 64 * 1024
READ_TIMEOUT = 30.0
SEND_TIMEOUT = 60.0
MAX_CONNECTIONS = 256
BUSY_LOG_INTERVAL = 60.0
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n"
                 b"Connection: close\r\n\r\ntoo many connections\n")


# credentials in the header line aiohttp quotes when it refuses one (a bad character, a line too long)
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"]+")


def _broken(error: BaseException) -> str:
    """What the log says of a broken request: aiohttp's reason on one line, at most 200 characters, without the
    credentials of the header line it may quote (`Authorization: Bearer <token>\\x01`)."""
    return _CREDENTIALS.sub(r"\1\2<redacted>", " ".join(str(error).split()))[:200]


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger: a request the client broke (HttpProcessingError: aiohttp's 400 for a bad
    request line or headers; a connection lost mid-request or mid-response) is one line at debug, without a
    traceback and without credentials (`_broken`); anything else (a handler that raised) keeps aiohttp's logged
    traceback."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, (HttpProcessingError, ConnectionError)):
            self.debug(msg + ": %s", *args, _broken(exc_info))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


@web.middleware
async def _sent_in_slices(request: web.Request, handler):
    """An answer whose body is bytes past SEND_SLICE is written SEND_SLICE at a time, each once the connection's
    send buffer has room: aiohttp writes a body whole, and the transport copies what the client has not taken yet
    (ten slow readers of a 4 MB answer held 14 MB; MAX_CONNECTIONS of a captured 10 MB message's /raw would hold
    gigabytes). A slow client then costs its answer's own bytes (the mailbox's, for a captured message) and about
    128 KB of buffer. The answer's cookies go with it; one to be compressed, or chunked, is left to aiohttp."""
    response = await handler(request)
    body = response.body if type(response) is web.Response else None
    if (not isinstance(body, (bytes, bytearray)) or len(body) <= SEND_SLICE or request.method == "HEAD"
            or response.compression or response.chunked):
        return response
    sliced = web.StreamResponse(status=response.status, reason=response.reason, headers=response.headers)
    sliced.content_length = len(body)
    for name, morsel in response.cookies.items():
        sliced.cookies[name] = morsel
    if response.keep_alive is False:
        sliced.force_close()
    await sliced.prepare(request)
    whole = memoryview(body)
    for at in range(0, len(body), SEND_SLICE):
        await sliced.write(whole[at:at + SEND_SLICE])
    await sliced.write_eof()
    return sliced


@web.middleware
async def _refusals_returned(request: web.Request, handler):
    """A refusal raised as an HTTPException (the router's 404 and 405, a feature's own) is returned as the response
    it describes: raised on, aiohttp would keep it in a reference cycle with the frames it passed (its request
    handler's `resp = exc`; the router's 404 keeps its exception), ~35 objects a refusal for the garbage collector."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        return response_of(detached(e))


def response_of(error: web.HTTPException) -> web.Response:
    """The response `error` describes: its status, reason, headers and body; the connection closed after it
    when `error` said so (`_closing`)."""
    response = web.Response(status=error.status, reason=error.reason, headers=error.headers, body=error.body)
    if error.keep_alive is False:
        response.force_close()
    return response


def _closing(error: web.HTTPException) -> web.HTTPException:
    """`error` with `Connection: close`: answered at once, the connection closed after aiohttp's lingering
    time (what the client still sends is read and dropped, so that it reads the answer)."""
    error.force_close()
    return error


class _Busy(asyncio.Protocol):
    """A connection past the limit: 503, closed."""

    def connection_made(self, transport) -> None:
        transport.write(BUSY_RESPONSE)
        transport.close()


def _unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """What of the answers written to `transport` the client has not taken yet: the transport's buffer and, where
    the system says (Linux's SIOCOUTQ), what the kernel still holds, unacknowledged (its send buffer grows to
    megabytes: the transport's own drains only when a third of it is free)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, AttributeError):
            pass
    return unsent


def _acknowledged_bytes(transport: asyncio.WriteTransport) -> int | None:
    """How many bytes the peer has acknowledged on the connection so far (Linux's TCP_INFO tcpi_bytes_acked, a
    running count); None where the system does not say."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_ACKED + 8)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_BYTES_ACKED + 8:
        return None
    return struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0]


_TCP_INFO_BYTES_ACKED = 120  # the offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (4.1 on)


def _progress(transport: asyncio.WriteTransport) -> int:
    """A count that grows as the client takes its answers: the bytes it acknowledged; where the system does not
    say, less the unsent bytes (which a slice written meanwhile can make grow, hiding the client's progress)."""
    acknowledged = _acknowledged_bytes(transport)
    return acknowledged if acknowledged is not None else -_unsent_bytes(transport)


class _SendDeadline(asyncio.Protocol):
    """aiohttp's protocol for one connection (`inner`), every event passed on, with a deadline on sending: while
    the transport's send buffer is past its high-water mark (writing paused: the client is not reading the
    answer as fast as it comes), the client must acknowledge more of it (`_progress`) every `timeout` seconds,
    else the connection is aborted (aiohttp's handler then ends as for a peer gone mid-response: a
    ConnectionError, one line at debug). A deadline on progress, not on the whole answer: a slow reader of a big
    one is served however long it takes."""

    def __init__(self, inner: asyncio.Protocol, timeout: float):
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.WriteTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._progress = 0  # _progress when the deadline was set

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._set_deadline()
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_deadline()
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._inner.connection_lost(exc)

    def _set_deadline(self) -> None:
        assert self._transport is not None
        self._progress = _progress(self._transport)
        self._deadline = asyncio.get_running_loop().call_later(self._timeout, self._check)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check(self) -> None:
        """The deadline came with writing still paused: a client that read some of the buffer meanwhile has
        another `timeout`; one that read nothing is cut off."""
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if _progress(transport) > self._progress:
            self._set_deadline()
            return
        log.debug("HTTP: %s took none of its answer for %gs: connection cut", transport.get_extra_info("peername"),
                  self._timeout)
        transport.abort()


class _CappedSite(web.TCPSite):
    """aiohttp's TCPSite, its listener's protocol factory asking `admit()` first and giving each connection its
    `_SendDeadline` (aiohttp offers no hook: this repeats TCPSite.start with the factory wrapped), on
    mailflow.listening's sockets."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, admit: Callable[[], bool],
                 send_timeout: float):
        super().__init__(runner, host, port)
        self._admit = admit
        self._send_timeout = send_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        admit, send_timeout = self._admit, self._send_timeout

        def protocol() -> asyncio.Protocol:
            return _SendDeadline(server(), send_timeout) if admit() else _Busy()

        # mailflow.listening's accept loop, not asyncio's: out of file descriptors, it pauses and logs once
        self._server = await listen(protocol, self._host, self._port, logger=log, ssl=self._ssl_context,
                                    backlog=self._backlog)


class HttpServer:
    """See the module docstring."""

    def __init__(self, listen: Iterable[str], middlewares: Iterable = (), read_timeout: float = READ_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, send_timeout: float = SEND_TIMEOUT):
        self._listen = [parse_hostport(item) for item in listen]
        self._read_timeout = read_timeout
        self._send_timeout = send_timeout
        self._max_connections = max_connections
        self._busy_logged_at: float | None = None
        self._app = web.Application(client_max_size=MAX_BODY,
                                    middlewares=[_sent_in_slices, _refusals_returned, *middlewares,
                                                 self._read_body])
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self.features: list[str] = []

    def add_routes(self, feature: str, routes: Iterable[web.AbstractRouteDef]) -> None:
        if self._runner is not None:
            raise RuntimeError("routes are added before the HTTP server starts")
        try:
            self._app.router.add_routes(routes)
        except RuntimeError as e:  # aiohttp: a route that is already registered
            raise ValueError(f"{feature}: {e}") from None
        self.features.append(feature)

    @web.middleware
    async def _read_body(self, request: web.Request, handler):
        """The body read whole before the handler runs (request.read() keeps it for .json() and .post()),
        within READ_TIMEOUT; after the features' middlewares (the admin's access checks), so that a client that
        may not ask sends nothing the server waits for."""
        if request.can_read_body:
            if (request.content_length or 0) > MAX_BODY:
                raise _closing(web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length or 0))
            try:
                async with asyncio.timeout(self._read_timeout):
                    await request.read()
            except TimeoutError:
                raise _closing(web.HTTPRequestTimeout(
                    text=f"the body did not come within {self._read_timeout:g}s")) from None
        return await handler(request)

    @property
    def app(self) -> web.Application:
        """The application, for a feature that keeps state in it (`app[key]`) or adds a cleanup."""
        return self._app

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self._read_timeout, logger=_ServerLog(log, {}))
        await self._runner.setup()
        try:
            for host, port in self._listen:
                site = _CappedSite(self._runner, host, port, self._admit, self._send_timeout)
                await site.start()
                self._sites.append(site)
        except BaseException:
            await self.stop()
            raise
        log.info("HTTP listening on %s for %s", ", ".join(f"{h}:{p}" for h, p in self.addresses),
                 ", ".join(self.features) or "nothing")

    def _admit(self) -> bool:
        """May one more connection in? (A burst accepted in one loop turn may pass the limit by that burst: a
        connection counts once aiohttp has it, at the loop's next turn.)"""
        server = self._runner.server if self._runner is not None else None
        if server is None or len(server.connections) < self._max_connections:
            return True
        now = asyncio.get_running_loop().time()
        if self._busy_logged_at is None or now - self._busy_logged_at >= BUSY_LOG_INTERVAL:
            self._busy_logged_at = now
            log.warning("HTTP: %d connections open, the limit: refusing more (503)", self._max_connections)
        return False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [tuple(a[:2]) for a in self._runner.addresses] if self._runner is not None else []

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                await runner.cleanup()
            except Exception:
                log.exception("stopping the HTTP server")
        self._sites = []
