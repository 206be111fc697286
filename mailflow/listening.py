"""Listening sockets and the accept loop behind every server of the process (smtpd's listeners, the HTTP server,
the test destinations of mailflow.testing), in place of asyncio's `create_server`.

Why not asyncio's: when accept() fails for lack of resources (EMFILE, ENFILE: no file descriptor left; ENOBUFS,
ENOMEM), Python 3.11's loop logs a traceback and schedules a retry for each of up to 100 tries of the same wake-up,
and each retry does the same: one measurement with 60 descriptors and 150 clients logged 87 788 tracebacks in five
seconds while the loop served nothing else. One flooding client must not take the whole process with it.

What `Listening` owns: the sockets bound for one address (one per address family `host` resolves to, as
create_server binds them), listening from the moment `listen()` returns (connections wait in the kernel's queue
until `start_serving()`), and the accepting. Each accepted connection gets its protocol from `factory()` on a
transport of its own: made at once in plaintext (the selector loop's own way, `_make_socket_transport`: no task
per connection), through `loop.connect_accepted_socket` with TLS from the first byte (`ssl` given) or on a loop
without that method. `wait_closed()` returns once every connection accepted so far has reached its protocol
(connection_made called), so that a stop can drain the sessions of them all.

Failure behaviour:
- accept() out of resources: the socket is not watched for a pause (ACCEPT_PAUSE, doubling up to MAX_PAUSE while
  it goes on; the waiting connections stay in the kernel's queue, their clients see a later greeting), then tried
  again. Logged as a warning at the first failure, then at most once per LOG_INTERVAL with the count of failures
  since; once accepting works again, that is logged too.
- a connection aborted before it was accepted (ECONNABORTED, EPROTO...): skipped.
- any other accept error: logged (same interval) and paused as above; the listener never stops for good.
- a transport that cannot be set up (a TLS handshake that fails, a peer gone: an OSError, on either path): that
  connection is closed, at debug level; no other is affected. A protocol factory that raises anything else: the
  same, logged as an error with its traceback.
- `listen()` raises OSError naming the address when it cannot be bound.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as ssl_module
from typing import Callable

LISTEN_BACKLOG = 100  # connections the kernel queues for a socket (asyncio's create_server default)
ACCEPT_BATCH = 100  # accepts per wake-up at most, as asyncio's loop does, so that a burst cannot hold the loop
ACCEPT_PAUSE = 0.05  # seconds without accepting after a failed accept ...
MAX_PAUSE = 1.0  # ... doubling while failures go on, up to this
LOG_INTERVAL = 60.0  # seconds between two warnings about failing accepts
# accept() errors that mean the connection went away before it was taken: the next one is tried at once
# (Linux's accept(2) also passes on the new connection's pending network errors: they are retried too)
ABORTED = {errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
           errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}


class Listening(asyncio.AbstractServer):
    """One configured address: its listening sockets and their accepting. `sockets`, `start_serving()`,
    `is_serving()`, `close()`, `wait_closed()`, `get_loop()` (what asyncio.Server offers its users here)."""

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.BaseProtocol], *,
                 logger: logging.Logger, ssl: ssl_module.SSLContext | None = None):
        self.sockets = sockets
        self._factory = factory
        self._ssl = ssl
        self._log = logger
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._pause = ACCEPT_PAUSE
        self._resume: dict[int, asyncio.TimerHandle] = {}
        self._failures = 0  # failed accepts not yet logged
        self._logged_at: float | None = None
        self._failing = False  # since the last failure, nothing accepted yet
        self._warned = False  # a warning was written since accepting last worked
        self._connecting: set[asyncio.Task] = set()
        # asyncio's selector loop makes a plaintext transport with this private method; connect_accepted_socket
        # awaits it in a task of its own, which costs every connection two turns of the loop more (the task's
        # step, and its done callback) and a future. Another loop (or a later asyncio without it) takes the public
        # path (`_connect`), which TLS listeners take anyway (their handshake is awaited there).
        self._make_transport: Callable | None = getattr(self._loop, "_make_socket_transport", None)

    @property
    def where(self) -> str:
        """The bound address, for logs: `127.0.0.1:25`, `[::1]:25`."""
        host, port = self.sockets[0].getsockname()[:2] if self.sockets else ("?", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -------------------------------------------------------------------------------- serving

    # start_serving, is_serving, get_loop, serve_forever: asyncio.AbstractServer's interface (aiohttp's sites)

    async def start_serving(self) -> None:
        self.serve()

    def serve(self) -> None:
        """Accept from now on (what start_serving does, for a caller that is not a coroutine)."""
        if self._serving or not self.sockets:
            return
        self._serving = True
        for sock in self.sockets:
            self._watch(sock)

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def serve_forever(self) -> None:
        self.serve()
        await self._loop.create_future()  # until cancelled

    def close(self) -> None:
        """Stop accepting and close the sockets (connections already accepted go on)."""
        self._serving = False
        for handle in self._resume.values():
            handle.cancel()
        self._resume.clear()
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []

    async def wait_closed(self) -> None:
        """Wait until every connection accepted so far has reached its protocol (connection_made called). A
        plaintext connection's connection_made was queued on the loop by its accept (`_begin`), possibly in this
        very turn: giving up one turn lets every one queued run first (the loop runs its ready callbacks first in,
        first out). A connection on the public path (TLS) reaches it in its task, waited for here."""
        await asyncio.sleep(0)
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    def _watch(self, sock: socket.socket) -> None:
        self._loop.add_reader(sock.fileno(), self._accept, sock)

    # -------------------------------------------------------------------------------- accepting

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in ABORTED:
                    continue
                self._paused(sock, e)
                return
            if self._failing:
                self._recovered()
            conn.setblocking(False)
            if self._ssl is None and self._make_transport is not None:
                self._begin(conn, self._make_transport)
                continue
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _begin(self, conn: socket.socket, make_transport: Callable) -> None:
        """A plaintext connection's protocol and transport, made now (what connect_accepted_socket does without
        its task: the protocol's connection_made and the socket's reading are on the loop's next turn either way)."""
        try:
            make_transport(conn, self._factory())
        except Exception as e:
            self._not_begun(conn, e)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except Exception as e:
            self._not_begun(conn, e)

    def _not_begun(self, conn: socket.socket, error: Exception) -> None:
        """A connection whose session could not begin is closed, and no other is affected. An OSError is the
        peer's (gone already, a TLS handshake that failed or took too long): debug level; anything else is the
        protocol factory's fault: logged with its traceback."""
        if isinstance(error, OSError):
            self._log.debug("%s: connection closed before its session began: %s", self.where, error)
        else:
            self._log.error("%s: cannot begin a session", self.where, exc_info=error)
        conn.close()

    def _paused(self, sock: socket.socket, error: OSError) -> None:
        """Stop watching `sock` for a pause (doubling while failures go on), then watch it again."""
        self._loop.remove_reader(sock.fileno())
        self._failures += 1
        self._failing = True
        self._warn(error)
        self._resume[sock.fileno()] = self._loop.call_later(self._pause, self._resumed, sock)
        self._pause = min(self._pause * 2, MAX_PAUSE)

    def _resumed(self, sock: socket.socket) -> None:
        self._resume.pop(sock.fileno(), None)
        if self._serving:
            self._watch(sock)

    def _warn(self, error: OSError) -> None:
        now = self._loop.time()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return
        self._logged_at, self._warned = now, True
        name = errno.errorcode.get(error.errno or 0, "error")
        since = f" ({self._failures} failed accepts since the last warning)" if self._failures > 1 else ""
        self._log.warning("%s: cannot accept connections: %s (%s); retrying within %.2gs%s", self.where,
                          error.strerror or error, name, self._pause, since)
        self._failures = 0

    def _recovered(self) -> None:
        self._failing = False
        self._pause = ACCEPT_PAUSE
        if self._warned:  # (at most once per warning: a listener that keeps failing logs two lines an interval)
            self._warned = False
            self._log.info("%s: accepting connections again", self.where)


async def listen(factory: Callable[[], asyncio.BaseProtocol], host: str | None, port: int, *,
                 logger: logging.Logger, ssl: ssl_module.SSLContext | None = None,
                 backlog: int = LISTEN_BACKLOG, start_serving: bool = True) -> Listening:
    """Bind `host`:`port` (every address `host` resolves to, as asyncio's create_server: None or "" for all of
    the host's, IPv6 sockets v6-only, SO_REUSEADDR) and listen there; serve at once unless `start_serving` is
    False. Raises OSError naming the address when it cannot be bound (the sockets bound for it are closed)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host lacks (IPv6 turned off): the others are bound, as create_server
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {address!r}: "
                                       f"{(e.strerror or '').lower()}") from None
            sock.setblocking(False)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host or '*'}:{port} can be used on this host")
    listening = Listening(sockets, factory, logger=logger, ssl=ssl)
    if start_serving:
        await listening.start_serving()
    return listening


def serve_socket(sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol], *,
                 logger: logging.Logger) -> Listening:
    """Serve, from now on, a socket that is bound and listening already (the caller's)."""
    sock.setblocking(False)
    listening = Listening([sock], factory, logger=logger)
    listening.serve()
    return listening
