"""An ended smtpd session is freed by reference counting, not left to the garbage collector.

A session that stayed in a reference cycle after its end (its bound methods held by its wire, its log or its
transcript; the stream writer's protocol) was carried with its socket and buffers through the collector's
generations: at ten sessions the collector then spent a few per cent of the server's time walking hundreds of
ended sessions. Each test runs real sessions with the collector off and counts the session objects left.
"""
from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from mailflow.app import Mailflow
from mailflow.stages.smtpd.protocol import ProtocolCore
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript
from tests.support import SmtpClient, eventually, merged, sessions_over


class KeepingObserver(SessionObserver):
    """Keeps every transcript it is given, as the capture API's recorder keeps its records."""

    line_limit = 10
    byte_limit = 1024

    def __init__(self) -> None:
        self.kept: list[Transcript] = []

    def started(self, transcript: Transcript) -> None:
        self.kept.append(transcript)


def sessions_alive() -> int:
    return sum(isinstance(o, ProtocolCore) for o in gc.get_objects())


async def some_sessions(port: int) -> None:
    """A message and QUIT; a client that drops the connection mid-envelope; one that drops after the message;
    one that resets the connection mid-DATA (the session's task is cancelled); one left to time out."""
    client = await SmtpClient.connect(port)
    assert (await client.send_message()).code == 250
    assert (await client.cmd("QUIT")).code == 221
    client.writer.close()
    dropped = await SmtpClient.connect(port)
    await dropped.envelope()
    dropped.writer.close()
    sent = await SmtpClient.connect(port)
    assert (await sent.send_message()).code == 250
    sent.writer.close()
    reset = await SmtpClient.connect(port)
    await reset.envelope()
    assert (await reset.cmd("DATA")).code == 354
    await reset.send(b"Subject: cut\r\n")
    reset.writer.transport.abort()
    idle = await SmtpClient.connect(port)
    assert (await idle.reply(timeout=5)).code == 421  # the command timeout's
    idle.writer.close()


@pytest.fixture
def server(mailflow_server):
    async def start(observer: SessionObserver | None = None, **overrides) -> Mailflow:
        settings = merged({"mynetworks": ["127.0.0.0/8"], "smtpd": {"timeout": "1s"}}, overrides)
        return await mailflow_server(session_observer=observer, **settings)

    return start


@pytest.mark.parametrize("observer", [None, KeepingObserver()], ids=["plain", "with-transcripts"])
async def test_ended_sessions_are_freed_without_the_collector(server, observer):
    mf = await server(observer)
    gc.collect()
    gc.disable()
    try:
        await some_sessions(mf.smtp_addresses[0][1])
        await sessions_over(mf)
        await eventually(lambda: sessions_alive() == 0, timeout=5.0, what="every ended session freed")
    finally:
        gc.enable()
    if observer is not None:
        assert len(observer.kept) == 5
    await asyncio.sleep(0)


async def test_a_session_whose_message_header_checks_refused_is_freed_without_the_collector(server, tmp_path):
    """The refusal was raised from a frame that held it: its traceback held that frame, and the frames of the
    session's command loop with it."""
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: refused/ REJECT not this one\n")
    mf = await server(checks={"header_checks": [f"regexp:{checks}"]})
    gc.collect()
    gc.disable()
    try:
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        reply = await client.send_message(b"Subject: refused\r\n\r\nbody\r\n")
        assert reply.code == 550 and reply.text.endswith(" not this one")
        assert (await client.cmd("QUIT")).code == 221
        client.writer.close()
        await sessions_over(mf)
        await eventually(lambda: sessions_alive() == 0, timeout=5.0, what="the session freed")
    finally:
        gc.enable()


async def test_health_checks_of_a_load_balancer_are_freed_without_the_collector(server):
    """A connection that closes before its PROXY header ends in NoProxyHeader, which the header's deadline
    (asyncio.wait_for) held in a cycle with the frames of the session that read it."""
    mf = await server(smtpd={"listeners": [{"address": "127.0.0.1:0", "role": "mta", "overrides": {
        "upstream_proxy_protocol": "haproxy", "upstream_proxy_timeout": "5s"}}]})
    port = mf.smtpd.listeners[-1].server.sockets[0].getsockname()[1]
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            check = await SmtpClient.connect(port, greet=False)  # connect, then close: a TCP health check
            check.writer.close()
        await sessions_over(mf)
        await eventually(lambda: sessions_alive() == 0, timeout=5.0, what="every checking session freed")
    finally:
        gc.enable()


async def failed_handshakes(mf) -> None:
    """On the submissions port: plaintext where TLS was due; a client that leaves in the handshake. On the mta
    port: STARTTLS, then plaintext."""
    implicit = mf.smtpd.address_of("submissions")[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", implicit)
    writer.write(b"EHLO plaintext.test\r\n")
    assert await reader.read() == b""  # the server gave up on the handshake
    writer.close()
    _, leaving = await asyncio.open_connection("127.0.0.1", implicit)
    leaving.close()
    client = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await client.cmd("STARTTLS")).code == 220
    await client.send(b"EHLO plaintext.test\r\n")
    assert await client.closed()
    client.writer.close()


async def test_sessions_whose_tls_handshake_failed_are_freed_without_the_collector(server, pki, users):
    """The handshake's failure, raised in the session's frame, held that frame through its traceback (and asyncio's
    frames, in a cycle of their own); such a session gets no connection_lost, which drops asyncio's stream writer."""
    _, cert_file, _ = pki
    mf = await server(smtpd={"tls_cert_file": cert_file, "sasl_user_maps": [users], "listeners": [
        {"address": "127.0.0.1:0", "role": "mta"}, {"address": "127.0.0.1:0", "role": "submissions"}]})
    gc.collect()
    gc.disable()
    try:
        await failed_handshakes(mf)
        await sessions_over(mf)
        await eventually(lambda: sessions_alive() == 0, timeout=5.0, what="every session freed")
    finally:
        gc.enable()


class LateTransport:
    """A TLS transport whose handshake completed after the session had ended (it only needs closing)."""

    closed = False

    def close(self) -> None:
        self.closed = True


async def test_a_handshake_completing_after_the_end_is_closed(server):
    mf = await server()
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    (session,) = mf.smtpd.sessions
    assert (await client.cmd("QUIT")).code == 221
    await sessions_over(mf)
    late = LateTransport()
    session.connection_made(late)  # as asyncio's TLS protocol would call it
    assert late.closed


async def test_letting_go_keeps_the_end_of_session_lines(server, caplog):
    """The lines written as the session ends still name where it was (content bytes) and the client."""
    caplog.set_level(logging.INFO)
    mf = await server()
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.envelope()
    assert (await client.cmd("DATA")).code == 354
    await client.send(b"Subject: cut\r\n")
    await asyncio.sleep(0.1)  # the 14 bytes are read before the connection goes
    client.writer.close()
    await sessions_over(mf)
    lines = [r.getMessage() for r in caplog.records]
    assert "lost connection after DATA (14 bytes) from localhost[127.0.0.1]" in lines
    assert any(line.startswith("disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=0/1") for line in lines)
