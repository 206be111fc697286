"""The one HTTP layer (mailflow.http) against hostile clients, over raw sockets: a slow client is cut off after
the read timeout, and so is one that reads none of its answer; an oversized body is refused at once, other
clients are answered meanwhile, and a broken
request is answered 400 and logged in one line at debug, never with a traceback."""
from __future__ import annotations

import asyncio
import logging
import socket
import tracemalloc

import aiohttp
import pytest
from aiohttp import web

from mailflow.http import MAX_BODY, HttpServer

READ_TIMEOUT = 0.3
SEND_TIMEOUT = 0.3  # for a client that takes none of its answer
BIG = b"x" * (4 * 1024 * 1024)  # an answer far past what the sockets' buffers hold


@pytest.fixture
async def server():
    http = HttpServer(["127.0.0.1:0"], read_timeout=READ_TIMEOUT, send_timeout=SEND_TIMEOUT)
    table = web.RouteTableDef()

    @table.get("/hello")
    async def hello(request):
        return web.Response(text="hi")

    @table.put("/echo")
    async def echo(request):
        return web.Response(body=await request.read())

    @table.get("/big")
    async def big(request):
        return web.Response(body=BIG)

    http.add_routes("test", table)
    await http.start()
    try:
        yield http.addresses[0]
    finally:
        await http.stop()


async def exchange(address, data: bytes, *, limit: float = 5.0, first_line: bool = False) -> bytes:
    """Sends `data`; what the server said until it closed (or its first line), within `limit` seconds."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readline() if first_line else reader.read(), limit)
    finally:
        writer.close()


async def test_slow_clients_are_cut_off_and_others_are_answered(server):
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow = [asyncio.ensure_future(exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: a"))
            for _ in range(20)]  # headers never finished
    idle = asyncio.ensure_future(exchange(server, b""))  # says nothing
    body = asyncio.ensure_future(exchange(server, b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
                                          first_line=True))
    await asyncio.sleep(0.05)
    answer = await exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", limit=1)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hi")
    assert all(reply == b"" for reply in await asyncio.gather(*slow, idle))  # closed, not left open
    assert (await body).startswith(b"HTTP/1.1 408")
    assert loop.time() - started < 3


async def test_an_oversized_body_is_refused_before_it_comes(server):
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await exchange(server, b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (MAX_BODY + 1),
                            limit=1, first_line=True)
    assert answer.startswith(b"HTTP/1.1 413") and loop.time() - started < 1
    chunked = b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer = await exchange(server, chunked + b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello")


async def test_broken_requests_get_400_and_one_debug_line(server, caplog):
    caplog.set_level(logging.DEBUG)
    secret = b"0123456789abcdef0123456789abcdef"  # an admin token: never logged, even in a header aiohttp refuses
    for request in [b"GET /hello HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
                    b"GET /hello HTTP/9.9\r\nHost: x\r\n\r\n",
                    b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET /hello HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(200)) + b"\r\n",
                    b"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"\x01\r\n\r\n",
                    b"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret + b"a" * 9000 + b"\r\n\r\n",
                    b"GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + secret + b"\x7f\r\n\r\n"]:
        assert (await exchange(server, request)).startswith(b"HTTP/1.0 400"), request[:40]
    reader, writer = await asyncio.open_connection(*server)  # gone in the middle of its body
    writer.write(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()
    await asyncio.sleep(0.1)
    assert [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []
    assert sum("Error handling request" in r.getMessage() for r in caplog.records) >= 7
    assert not [r for r in caplog.records if secret[:12].decode() in r.getMessage()]


async def test_connections_past_the_limit_get_503_and_one_warning(caplog):
    """Each connection is limited in time, and their number too: past the limit a new one is answered 503 at
    once and closed, logged once; a connection that closes makes room again."""
    caplog.set_level(logging.WARNING, logger="mailflow.http")
    http = HttpServer(["127.0.0.1:0"], read_timeout=5, max_connections=3)
    table = web.RouteTableDef()

    @table.get("/hello")
    async def hello(request):
        return web.Response(text="hi")

    http.add_routes("test", table)
    await http.start()
    held = []
    try:
        for _ in range(3):
            held.append(await asyncio.open_connection(*http.addresses[0]))
        await asyncio.sleep(0.05)  # aiohttp counts a connection at the loop's next turn
        request = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for _ in range(5):
            assert (await exchange(http.addresses[0], request)).startswith(b"HTTP/1.1 503")
        assert [r.getMessage() for r in caplog.records] == [
            "HTTP: 3 connections open, the limit: refusing more (503)"]
        reader, writer = held.pop()
        writer.close()
        await asyncio.sleep(0.05)
        assert (await exchange(http.addresses[0], request)).endswith(b"hi")
    finally:
        for _, writer in held:
            writer.close()
        await http.stop()


async def small_buffer_connection(address, size: int = 4096) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose socket (and reader) receives at most about `size` bytes the client has not read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.connect(address)
    return await asyncio.open_connection(sock=sock, limit=size)


async def test_a_client_that_reads_none_of_its_answer_is_cut_off(server):
    """A client that asks for a big answer and reads nothing of it must not keep its connection, and the
    answer's bytes in the server's send buffer, for ever (past MAX_CONNECTIONS of them, nobody else is served)."""
    request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    stalled = [await small_buffer_connection(server) for _ in range(3)]
    for _, writer in stalled:
        writer.write(request)
    await asyncio.sleep(READ_TIMEOUT * 4)  # reads nothing
    answer = await exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", limit=1)
    assert answer.endswith(b"hi")
    for reader, writer in stalled:
        try:
            got = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            got = b""
        finally:
            writer.close()
        assert len(got) < len(BIG)  # cut off: the rest was never sent


async def test_a_client_that_reads_slowly_but_steadily_gets_its_whole_answer(server):
    """The deadline is on progress, not on the whole answer: one that reads a little at a time, some within each
    read timeout, gets all of it, however long that takes in all."""
    loop = asyncio.get_running_loop()
    reader, writer = await small_buffer_connection(server, 16 * 1024)
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    started, got = loop.time(), bytearray()
    try:
        while len(got) < 1024 * 1024 and (chunk := await asyncio.wait_for(reader.read(64 * 1024), 5)):
            got += chunk
            await asyncio.sleep(READ_TIMEOUT / 6)
        got += await asyncio.wait_for(reader.read(), 5)  # the rest at once
    finally:
        writer.close()
    assert got.endswith(b"\r\n\r\n" + BIG) and loop.time() - started > READ_TIMEOUT * 2


async def test_a_slow_steady_reader_with_default_buffers_is_served_past_the_read_timeout():
    """With default socket buffers a client's kernel acknowledges in steps of its receive window (64-95 KB): a
    reader of 60 KB/s shows no progress for a second at a time. Cut when nothing was acknowledged for the read
    timeout (0.3 s here; 30 s in service cut a 2-4 KB/s reader of a 30 MB answer), it was cut; with a send
    timeout of its own (60 s in service, nginx's), counted on the acknowledged bytes, it gets its whole answer."""
    http = HttpServer(["127.0.0.1:0"], read_timeout=READ_TIMEOUT, send_timeout=2.0)
    table = web.RouteTableDef()

    @table.get("/big")
    async def big(request):
        return web.Response(body=BIG)

    http.add_routes("test", table)
    await http.start()
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*http.addresses[0])
    writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    started, got = loop.time(), bytearray()
    try:
        while loop.time() - started < 3.0:
            got += await asyncio.wait_for(reader.read(3 * 1024), 5)
            await asyncio.sleep(0.05)
        got += await asyncio.wait_for(reader.read(), 5)  # the rest at once
    finally:
        writer.close()
        await http.stop()
    assert got.endswith(b"\r\n\r\n" + BIG)


async def test_clients_that_read_slowly_hold_no_copy_of_their_answers(server):
    """aiohttp writes a body whole and the transport keeps a copy of what the client has not taken: ten clients
    slow to read a 4 MB answer held 14 MB (what the kernel's buffers did not take; traced here). Written a slice at
    a time as the client takes it, an answer costs its own bytes and about 128 KB of buffer a client."""
    tracemalloc.start()
    try:
        slow = [await small_buffer_connection(server) for _ in range(10)]
        for _, writer in slow:
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(READ_TIMEOUT / 2)  # what the server sent meanwhile fills the socket buffers
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, bytes]:
        try:
            return await reader.readuntil(b"\r\n\r\n"), await reader.readexactly(len(BIG))
        finally:
            writer.close()

    for head, body in await asyncio.wait_for(asyncio.gather(*(answer(*each) for each in slow)), 10):
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % len(BIG) in head and body == BIG
    assert held < 10 * 250_000


async def test_a_sliced_answer_keeps_its_cookies_and_a_compressed_one_is_compressed():
    """An answer past SEND_SLICE is written a slice at a time: its cookies were dropped, and so was the
    compression a handler asked for."""
    http = HttpServer(["127.0.0.1:0"])
    table = web.RouteTableDef()

    @table.get("/cookie")
    async def cookie(request):
        response = web.Response(body=BIG)
        response.set_cookie("session", "s1")
        return response

    @table.get("/compressed")
    async def compressed(request):
        response = web.Response(body=BIG)
        response.enable_compression()
        return response

    http.add_routes("test", table)
    await http.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{http.addresses[0][1]}") as client:
            async with client.get("/cookie") as response:
                assert response.cookies["session"].value == "s1" and await response.read() == BIG
            async with client.get("/compressed", headers={"Accept-Encoding": "gzip"}) as response:
                assert response.headers["Content-Encoding"] == "gzip" and await response.read() == BIG
    finally:
        await http.stop()
