"""A failure kept or raised again after its `except` clause leaves no reference cycle behind.

An exception's traceback holds the frames it passed through; a frame that holds the exception in turn (a local
that keeps it for the result, one it is raised from, an object's attribute raised from its method) makes a
reference cycle: the exception, the frames of the failed attempt and all their locals (sockets, requests,
buffers) wait for the garbage collector; so does asyncio.wait_for (3.11), whose frame keeps the task it made,
which keeps the failure. Each test runs real failures (refused connections, peers that hang up or fall silent,
a DNS server that says NXDOMAIN or SERVFAIL, a broken signature, a table or an HTTP refusal) with the collector
off and counts the failure objects that only a collection frees.
"""
from __future__ import annotations

import asyncio
import gc
import re
import sqlite3
import types
from typing import Awaitable

import aiohttp
import pytest
from aiohttp import web

from mailflow.clock import VirtualClock
from mailflow.config import LmtpConfig, SmtpConfig, SpamdConfig
from mailflow.content import Content, Spool
from mailflow.dns import AiodnsResolver, NotFound, StaticResolver
from mailflow.errors import LookupRetry
from mailflow.filters.milter.client import (
    MilterConnection,
    MilterFailed,
    MilterSettings,
)
from mailflow.filters.scanners import Spamd
from mailflow.http import HttpServer
from mailflow.message import read_header
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.signing import keygen
from mailflow.signing.dkim import BodyHashMismatch, checkers, verify
from mailflow.stages.smtpd.dovecot_auth import DovecotAuth, Unavailable
from mailflow.store import Store
from mailflow.tables import TableCache
from mailflow.transports.lmtp import LmtpTransport
from mailflow.transports.smtp import SmtpTransport
from mailflow.transports.smtp.chat import Wire
from mailflow.transports.smtp.trouble import SiteFailure
from tests.support import free_port
from tests.support.deliverability import dkim_signed, make_key

ROUNDS = 3
MESSAGE = b"Subject: failing\r\n\r\nbody\r\n"


def alive(cls: type) -> int:
    return sum(isinstance(o, cls) for o in gc.get_objects())


def in_cycles(cls: type) -> int:
    """How many objects of `cls` only the garbage collector frees (those still in use are not counted)."""
    before = alive(cls)
    gc.collect()
    return before - alive(cls)


@pytest.fixture
def collector_off():
    """The collector is off for the test, so that what is left is what reference counting did not free."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def request(nexthop: str) -> DeliveryRequest:
    return DeliveryRequest("Q1", "a@remote.test", (Recipient(0, "b@example.test", "b@example.test"),), nexthop,
                           Content.of(MESSAGE), queued_for=0.0)


async def test_a_refused_connection_kept_for_the_result_is_freed(collector_off):
    transport = SmtpTransport(SmtpConfig(connect_timeout=2.0, tls_security_level="none"), resolver=StaticResolver(),
                              helo_name="client.mailflow.test")
    unused_port = free_port()
    for _ in range(ROUNDS):
        report = await transport.deliver(request(f"[127.0.0.1]:{unused_port}"))
        assert report.results[0].outcome is Outcome.DEFERRED
        assert report.results[0].text == f"connect to 127.0.0.1[127.0.0.1]:{unused_port}: Connection refused"
    await transport.close()
    assert in_cycles(SiteFailure) == 0


async def hangs_up_at_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 peer.test ESMTP\r\n")
    while (line := await reader.readline()) and not line.upper().startswith(b"MAIL"):
        writer.write(b"250 peer.test\r\n")
    writer.close()


async def falls_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 peer.test ESMTP\r\n")
    await reader.read()
    writer.close()


@pytest.mark.parametrize("peer, text", [(hangs_up_at_mail, "lost connection with 127.0.0.1[127.0.0.1] while "
                                         "sending MAIL FROM"),
                                        (falls_silent, "conversation with 127.0.0.1[127.0.0.1] timed out while "
                                         "performing the EHLO handshake")],
                         ids=["lost", "timeout"])
async def test_a_connection_that_fails_mid_session_is_freed(collector_off, peer, text):
    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    transport = SmtpTransport(SmtpConfig(helo_timeout=0.2, command_timeout=0.2, tls_security_level="none"),
                              resolver=StaticResolver(), helo_name="client.mailflow.test")
    try:
        for _ in range(ROUNDS):
            report = await transport.deliver(request(f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"))
            assert report.results[0].text == text
    finally:
        await transport.close()
        server.close()
    assert in_cycles(Wire) == 0


async def breaks_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Offers STARTTLS, then answers the client's handshake with plaintext."""
    writer.write(b"220 peer.test ESMTP\r\n")
    while line := await reader.readline():
        if line.upper().startswith(b"EHLO"):
            writer.write(b"250-peer.test\r\n250 STARTTLS\r\n")
        elif line.upper().startswith(b"STARTTLS"):
            writer.write(b"220 2.0.0 Ready to start TLS\r\n")
            await reader.read(10)
            writer.write(b"this is no TLS record\r\n" * 20)
            break
    await writer.drain()
    writer.close()


async def test_a_failed_starttls_handshake_is_freed(collector_off):
    server = await asyncio.start_server(breaks_tls, "127.0.0.1", 0)
    transport = SmtpTransport(SmtpConfig(helo_timeout=2.0, starttls_timeout=2.0, tls_security_level="may"),
                              resolver=StaticResolver(), helo_name="client.mailflow.test",
                              plaintext_after=3600)  # new mail: deferred, not sent in plaintext
    try:
        for _ in range(ROUNDS):
            report = await transport.deliver(request(f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"))
            assert (report.results[0].outcome, report.results[0].dsn) == (Outcome.DEFERRED, "4.7.5")
    finally:
        await transport.close()
        server.close()
    assert in_cycles(Wire) == 0


async def test_a_refused_lmtp_connection_raised_again_is_freed(collector_off):
    transport = LmtpTransport(LmtpConfig(connect_timeout=2.0), helo_name="client.mailflow.test")
    unused_port = free_port()
    for _ in range(ROUNDS):
        report = await transport.deliver(request(f"[127.0.0.1]:{unused_port}"))
        assert report.results[0].text == f"connect to 127.0.0.1[127.0.0.1]:{unused_port}: Connection refused"
    await transport.close()
    assert in_cycles(SiteFailure) == 0


@pytest.mark.parametrize("name, failure", [("nowhere.test", NotFound), ("broken.test", LookupRetry)],
                         ids=["nxdomain", "servfail"])
async def test_a_failed_address_lookup_is_freed(dns_zone, collector_off, name, failure):
    zone = "known.test. 300 IN A 127.0.0.1\n"
    resolver = AiodnsResolver(nameservers=(dns_zone(zone, servfail=("broken.test",)),), timeout=1.0, tries=1)
    try:
        for _ in range(ROUNDS):
            assert await raised(resolver.addresses(name)) is failure
    finally:
        await resolver.close()
    assert in_cycles(failure) == 0


async def raised(call: Awaitable) -> type[BaseException] | None:
    """The class of what `call` raised (the exception itself is not kept: the caller counts what is left)."""
    try:
        await call
    except Exception as e:
        return type(e)
    return None


async def test_a_scanner_that_is_down_leaves_the_scanned_content_freed(collector_off):
    spamd = Spamd(SpamdConfig(address=f"127.0.0.1:{free_port()}"))
    for _ in range(ROUNDS):
        result = await spamd.check(Content.of(MESSAGE))
        assert result.failed.startswith("spamd: ConnectionRefusedError")
    assert in_cycles(Content) == 0


async def test_a_dkim_signature_that_fails_leaves_no_cycle(collector_off, tmp_path):
    key = make_key(tmp_path, "sig.test", "sel")
    record = "".join(re.findall(r'"([^"]*)"', keygen.txt_record(key, 300)))
    resolver = StaticResolver(txt={"sel._domainkey.sig.test": [record]})
    signed = dkim_signed(key, b"From: a@sig.test\r\nSubject: hi\r\n\r\nhello\r\n")
    content = Content.of(signed.replace(b"hello", b"HELLO"))  # the body changed after signing
    head, _ = read_header(content, 1_000_000)
    workers = checkers()
    for _ in range(ROUNDS):
        [result] = await verify(head, content.after(len(head)), resolver, timeout=5, workers=workers)
        assert result.result == "fail"
    # the checking thread lets go of the failure it raised just after the caller hears of it: counted once it has
    # ended, or a failure it still held at the first count (freed by it, not by the collector) would look cyclic
    assert await workers.close_within(5)
    assert in_cycles(BodyHashMismatch) == 0


async def test_a_dovecot_auth_server_that_is_down_leaves_no_cycle_per_login(collector_off, tmp_path):
    dovecot = DovecotAuth(str(tmp_path / "no-auth-socket"), timeout=2.0, clock=VirtualClock())
    for _ in range(ROUNDS):
        assert await raised(dovecot.ask(b"alice", b"s3cret", secured=True)) is Unavailable
    assert in_cycles(FileNotFoundError) == 0


async def test_a_milter_that_is_down_leaves_no_cycle_per_session(collector_off):
    unused_port = free_port()
    for _ in range(ROUNDS):
        milter = MilterConnection(f"inet:127.0.0.1:{unused_port}", MilterSettings("tempfail", 6, 2.0, 2.0, 2.0))
        assert await raised(milter.open()) is MilterFailed
    assert in_cycles(ConnectionRefusedError) == 0


async def test_a_table_lookup_that_fails_in_a_worker_thread_leaves_no_cycle(collector_off, tmp_path):
    db = tmp_path / "users.db"
    sqlite3.connect(db).close()
    (tmp_path / "users.cf").write_text(f"dbpath = {db}\nquery = SELECT dest FROM nosuchtable WHERE email='%s'\n")
    cache = TableCache()
    [table] = cache.open([f"sqlite:{tmp_path / 'users.cf'}"])
    for _ in range(ROUNDS):
        assert await raised(cache.run(table.lookup, "joe@example.com")) is LookupRetry
    # The worker thread drops its reference to the failure a few bytecodes after handing it over (concurrent.futures'
    # `self = None`); on a loaded machine that can fall between in_cycles' two counts, a release by reference
    # counting taken for the collector's. The executor's threads joined first, nothing is in flight.
    await asyncio.get_running_loop().shutdown_default_executor()
    assert in_cycles(LookupRetry) == 0


async def test_an_http_refusal_raised_by_a_handler_leaves_no_cycle(collector_off):
    http = HttpServer(["127.0.0.1:0"])
    table = web.RouteTableDef()

    @table.get("/message/{id}")
    async def message(request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text=f"no message {request.match_info['id']}", headers={"X-Why": "unknown id"})

    http.add_routes("test", table)
    await http.start()
    host, port = http.addresses[0]
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(ROUNDS):
                async with client.get(f"http://{host}:{port}/message/x1") as response:
                    assert (response.status, await response.text()) == (404, "no message x1")
                    assert response.headers["X-Why"] == "unknown id"
    finally:
        await http.stop()
    assert in_cycles(web.HTTPNotFound) == 0


async def test_the_admin_s_answer_to_an_unknown_path_keeps_no_traceback(mailflow_server, collector_off):
    """aiohttp's router keeps the 404 it raised (its route, a self-cycle of aiohttp's own, holds it); the admin
    answers it in its JSON shape and drops its traceback, which held the frames of the request's handling."""
    mf = await mailflow_server(admin={"enable": True, "listen": ["127.0.0.1:0"]})
    host, port = mf.admin.addresses[0]
    async with aiohttp.ClientSession() as client:
        for _ in range(ROUNDS):
            async with client.get(f"http://{host}:{port}/no/such/path") as response:
                assert (response.status, await response.json()) == (404, {"error": "404: Not Found"})
    assert in_cycles(types.TracebackType) == 0


async def test_a_store_write_that_fails_leaves_no_cycle(collector_off, tmp_path):
    """Another process holds the queue database locked: the writes fail (database is locked), through the group
    committer and through a writer call alike."""
    store = await Store.open(tmp_path / "queue.db", busy_timeout=0.05)
    holder = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(ROUNDS):
            assert await raised(store.mark_corrupt(["4A2B3C"])) is sqlite3.OperationalError
            assert await raised(store.maintain(free_share=0.0, min_free=0)) is sqlite3.OperationalError
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await store.close()
    assert in_cycles(sqlite3.OperationalError) == 0


async def test_a_spool_whose_file_cannot_be_written_keeps_its_failure_without_a_cycle(collector_off, tmp_path):
    """The spool keeps the failure for its reader (smtpd answers by its errno once the message has been read)."""
    for _ in range(ROUNDS):
        spool = Spool(tmp_path / "gone", memory_limit=10)  # the queue's content directory is missing
        spool.append(b"x" * 100)
        await spool.drain()
        assert isinstance(spool.failure, FileNotFoundError) and not spool.keeping
        spool.discard()
    del spool
    assert in_cycles(FileNotFoundError) == 0
