"""mailflow.listening: the accept loop of every server of the process, against real loopback sockets.

Covered: a connection reaches its protocol; out of descriptors (EMFILE injected into a real listening socket's
accept) the socket is left alone for a pause that doubles while it lasts, with one warning, and once a connection
is accepted again, one line saying so; a protocol factory that raises costs that connection only, and a plaintext
transport that cannot be made (a peer gone) that connection only, at debug level; a plaintext
connection gets its transport in the accept callback itself (no task per connection: two turns of the loop fewer),
and a loop without the selector loop's private way to make one still serves it (through a task); wait_closed()
returns once every connection accepted has reached its protocol, one accepted in the turn it is called too.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket

from mailflow.listening import ACCEPT_PAUSE, Listening, listen
from tests.support import eventually


class OutOfDescriptors(socket.socket):
    """A listening socket whose accept() fails with EMFILE `failures` times first, as a process with no descriptor
    left sees it; `tries` counts the calls."""

    failures = 0
    tries = 0

    def accept(self):
        self.tries += 1
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


class Recorded(asyncio.Protocol):
    def __init__(self, made: list):
        self._made = made

    def connection_made(self, transport) -> None:
        self._made.append(transport)
        transport.close()


def listening_socket(sock: socket.socket) -> socket.socket:
    sock.bind(("127.0.0.1", 0))
    sock.listen(10)
    sock.setblocking(False)
    return sock


async def test_a_connection_reaches_its_protocol():
    made: list = []
    server = await listen(lambda: Recorded(made), "127.0.0.1", 0, logger=logging.getLogger("test"))
    try:
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        await eventually(lambda: made, timeout=5)
        writer.close()
    finally:
        server.close()
    assert server.sockets == []


async def test_out_of_descriptors_it_pauses_doubling_warns_once_and_says_when_it_accepts_again(caplog):
    caplog.set_level(logging.INFO)
    made: list = []
    sock = listening_socket(OutOfDescriptors())
    sock.failures = 3
    where = "127.0.0.1:%d" % sock.getsockname()[1]
    server = Listening([sock], lambda: Recorded(made), logger=logging.getLogger("test"))
    server.serve()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        await eventually(lambda: made, timeout=5)
        waited = loop.time() - started
        writer.close()
    finally:
        server.close()
    # three failures, one try after each pause (no spinning on the ready socket), the connection, none left waiting
    assert sock.tries == 5
    assert waited >= ACCEPT_PAUSE * (1 + 2 + 4)  # 50, 100 and 200 ms
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "cannot accept" in line] == [
        f"{where}: cannot accept connections: Too many open files (EMFILE); retrying within 0.05s"]
    assert len([line for line in lines if "accepting connections again" in line]) == 1


async def test_a_protocol_factory_that_fails_costs_that_connection_only(caplog):
    made: list = []
    calls = 0

    def factory():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a session's constructor")
        return Recorded(made)

    server = await listen(factory, "127.0.0.1", 0, logger=logging.getLogger("test"))
    address = server.sockets[0].getsockname()[:2]
    try:
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not left open
        writer.close()
        _, writer = await asyncio.open_connection(*address)
        await eventually(lambda: made, timeout=5)
        writer.close()
    finally:
        server.close()
    assert "cannot begin a session" in caplog.text and "a bug in a session's constructor" in caplog.text


async def _tasks_while_a_connection_is_served(server: Listening) -> list[str]:
    """The coroutines of the tasks the loop made while one connection reached its protocol."""
    loop = asyncio.get_running_loop()
    made_tasks: list[str] = []

    def factory(loop, coro, **kwargs):
        made_tasks.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    made: list = []
    server._factory = lambda: Recorded(made)
    previous = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        await eventually(lambda: made, timeout=5)
        writer.close()
    finally:
        loop.set_task_factory(previous)
        server.close()
    return made_tasks


async def test_a_plaintext_connection_gets_its_transport_without_a_task():
    server = await listen(asyncio.Protocol, "127.0.0.1", 0, logger=logging.getLogger("test"))
    assert "Listening._connect" not in await _tasks_while_a_connection_is_served(server)


async def test_a_loop_without_the_private_transport_maker_serves_through_connect_accepted_socket():
    server = await listen(asyncio.Protocol, "127.0.0.1", 0, logger=logging.getLogger("test"))
    server._make_transport = None  # (as on a loop that lacks _make_socket_transport)
    assert "Listening._connect" in await _tasks_while_a_connection_is_served(server)


async def test_wait_closed_returns_once_a_connection_accepted_in_its_turn_has_reached_its_protocol():
    """A plaintext connection's connection_made is queued on the loop by its accept: a stop woken in that same turn
    (here by a callback queued just before it) closes the listener and waits; the connection is its protocol's by
    then, so that the stop drains it with the others."""
    loop = asyncio.get_running_loop()
    made: list = []
    server = await listen(lambda: Recorded(made), "127.0.0.1", 0, logger=logging.getLogger("test"))
    woken = loop.create_future()

    async def stop_once_woken() -> int:
        await woken
        server.close()
        await server.wait_closed()
        return len(made)

    stopping = asyncio.create_task(stop_once_woken())
    await asyncio.sleep(0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])  # accepted in the next turn
    loop.call_soon(woken.set_result, None)  # queued before that accept: the stop resumes in its turn
    try:
        assert await asyncio.wait_for(stopping, 5) == 1
    finally:
        client.close()


async def test_a_plaintext_transport_that_cannot_be_made_closes_that_connection_at_debug_level(caplog):
    """A peer gone before its transport is made (an OSError from the selector loop's transport maker) is the
    public path's "connection closed before its session began", at debug level: not the factory's fault, with a
    traceback. The next connection is served."""
    caplog.set_level(logging.DEBUG, logger="test")
    made: list = []
    server = await listen(lambda: Recorded(made), "127.0.0.1", 0, logger=logging.getLogger("test"))
    make_transport = server._make_transport
    failures = [OSError(errno.ENOTCONN, "Transport endpoint is not connected")]

    def failing_once(conn, protocol):
        if failures:
            raise failures.pop()
        return make_transport(conn, protocol)

    server._make_transport = failing_once
    address = server.sockets[0].getsockname()[:2]
    try:
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not left open
        writer.close()
        _, writer = await asyncio.open_connection(*address)
        await eventually(lambda: made, timeout=5)
        writer.close()
    finally:
        server.close()
    [record] = [r for r in caplog.records if "session" in r.getMessage()]
    assert (record.levelno, record.exc_info) == (logging.DEBUG, None)
    assert record.getMessage().endswith("connection closed before its session began: "
                                        "[Errno 107] Transport endpoint is not connected")
