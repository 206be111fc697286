"""LmtpTransport against real sockets: an in-process LMTP server (aiosmtpd.lmtp.LMTP on the test's loop) whose
RCPT replies and per-recipient replies after DATA are scripted, over TCP on 127.0.0.1 and over a UNIX socket.

aiosmtpd pushes whatever handle_DATA returns as it is, so "\\r\\n".join(one reply per recipient) is LMTP's answer;
`hang_after=n` pushes n of them and then stops answering (a server that hangs mid-reply)."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP

from mailflow.config import LmtpConfig, config_from_dict
from mailflow.content import Content
from mailflow.errors import ConfigError
from mailflow.logs import SyslogFormatter
from mailflow.model import ConnStats, DeliveryRequest, Outcome, Recipient
from mailflow.transports.lmtp import LmtpTransport
from mailflow.transports.smtp import proto, trouble
from mailflow.transports.smtp.addr import Nexthop, Peer, parse_nexthop

from tests.support import big_message, eventually, free_port, spooled
from tests.support.stalls import LoopTurns
from tests.support.peers import garbling_lmtp

HELO = "mx.mailflow.test"
CONTENT = (
    b"From: a@remote.test\r\n"
    b"To: b@example.test\r\n"
    b"Subject: byte exact\r\n"
    b"\r\n"
    b".leading dot must survive dot-stuffing\r\n"
    b"..two dots too\r\n"
    b"8-bit \xc3\xa9t\xc3\xa9 body\r\n"
    b".\r\n"
    b"last line\r\n"
)


# ---------------------------------------------------------------------------------------------------- the server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    helo: str


@dataclass
class LmtpHandler:
    """Accepts everything unless scripted; after DATA answers each accepted recipient with `final_replies[rcpt]`
    (default 250). `pipelining` adds PIPELINING to the LHLO reply."""

    pipelining: bool = False
    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    final_replies: dict[str, str] = field(default_factory=dict)
    hang_after: int | None = None
    rset_reply: str = "250 2.0.0 Ok"
    rset_silent: bool = False  # RSET is never answered (until the test is over)
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.commands.append(f"MAIL {address}")
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.commands.append(f"RCPT {address}")
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server, session, envelope):
        self.commands.append("RSET")
        if self.rset_silent:
            await self.release.wait()
        return self.rset_reply

    async def handle_QUIT(self, server, session, envelope):
        self.commands.append("QUIT")
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                      list(envelope.mail_options), session.host_name))
        replies = [self.final_replies.get(r, f"250 2.0.0 <{r}> Saved") for r in envelope.rcpt_tos]
        if self.hang_after is not None:
            for reply in replies[: self.hang_after]:
                await server.push(reply)
            await self.release.wait()
            raise ConnectionResetError("the test is over")
        return "\r\n".join(replies)


@dataclass
class LmtpPeer:
    handler: LmtpHandler
    server: asyncio.AbstractServer
    connections: list[LMTP]
    port: int = 0

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


@pytest.fixture
async def lmtp_peer():
    peers: list[LmtpPeer] = []
    loop = asyncio.get_running_loop()

    async def start(unix_path: Path | None = None, **lmtp_kwargs) -> LmtpPeer:
        handler = LmtpHandler(pipelining=lmtp_kwargs.pop("pipelining", False))
        connections: list[LMTP] = []
        lmtp_kwargs.setdefault("hostname", "lmtp.test")

        def protocol() -> LMTP:
            connections.append(LMTP(handler, **lmtp_kwargs))
            return connections[-1]

        if unix_path is not None:
            server = await loop.create_unix_server(protocol, str(unix_path))
            peer = LmtpPeer(handler, server, connections)
        else:
            server = await loop.create_server(protocol, "127.0.0.1", 0)
            peer = LmtpPeer(handler, server, connections, server.sockets[0].getsockname()[1])
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.handler.release.set()
        peer.server.close()
        await peer.server.wait_closed()


def make_transport(port: int = 24, timeout: float = 2.0, **settings) -> LmtpTransport:
    config = LmtpConfig(port=port, connect_timeout=timeout, command_timeout=timeout, data_timeout=timeout, **settings)
    return LmtpTransport(config, helo_name=HELO)


def make_request(nexthop: str, *recipients: str, sender: str = "a@remote.test", content: bytes = CONTENT, **kw):
    rcpts = tuple(Recipient(i, address, address) for i, address in enumerate(recipients or ("b@example.test",)))
    return DeliveryRequest("Q1", sender, rcpts, nexthop, Content.of(content), **kw)


async def deliver(transport: LmtpTransport, request: DeliveryRequest):
    try:
        return await asyncio.wait_for(transport.deliver(request), 5)
    finally:
        await transport.close()


async def deliver_to_script(script, timeout: float = 2.0):
    """One delivery to a scripted server on 127.0.0.1 (`script(reader, writer)` per connection): (report, port)."""
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await deliver(make_transport(timeout=timeout), make_request(f"[127.0.0.1]:{port}")), port
    finally:
        server.close()
        await server.wait_closed()


def outcomes(report) -> list[tuple[str, Outcome, str]]:
    return [(r.recipient.address, r.outcome, r.dsn) for r in report.results]


# ---------------------------------------------------------------------------------------------------- delivery


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
async def test_each_recipient_gets_its_own_reply_after_data(lmtp_peer, pipelining):
    peer = await lmtp_peer(pipelining=pipelining)
    peer.handler.final_replies = {
        "busy@example.test": "452 4.2.2 <busy@example.test> Mailbox is full",
        "gone@example.test": "550 5.1.1 <gone@example.test> User doesn't exist",
    }
    request = make_request(f"[127.0.0.1]:{peer.port}", "ok@example.test", "busy@example.test", "gone@example.test",
                           body_type="8BITMIME")
    report = await deliver(make_transport(), request)

    assert outcomes(report) == [
        ("ok@example.test", Outcome.SENT, "2.0.0"),
        ("busy@example.test", Outcome.DEFERRED, "4.2.2"),
        ("gone@example.test", Outcome.BOUNCED, "5.1.1"),
    ]
    relay = f"127.0.0.1[127.0.0.1]:{peer.port}"
    assert [r.text for r in report.results] == [
        "250 2.0.0 <ok@example.test> Saved",
        "host 127.0.0.1[127.0.0.1] said: 452 4.2.2 <busy@example.test> Mailbox is full "
        "(in reply to end of DATA command)",
        "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <gone@example.test> User doesn't exist "
        "(in reply to end of DATA command)",
    ]
    assert {r.relay for r in report.results} == {relay}
    assert report.site_ok
    [message] = peer.messages  # one transaction for all three
    assert message.rcpt_tos == ["ok@example.test", "busy@example.test", "gone@example.test"]
    assert message.content == CONTENT  # dot-stuffed on the wire, un-stuffed by the server: byte exact
    assert message.mail_from == "a@remote.test"
    assert message.helo == HELO
    assert f"SIZE={len(CONTENT)}" in message.mail_options and "BODY=8BITMIME" in message.mail_options


async def test_connect_timeout_0_leaves_the_connection_to_the_system_s_limit(lmtp_peer):
    """Postfix's lmtp_connect_timeout (and smtp's) 0: no timer of its own. mailflow refused it for lmtp, and for
    smtp took 0 as a timer that ran out at once (every connection failed: `connect to …: timed out`)."""
    peer = await lmtp_peer()
    config = LmtpConfig(port=peer.port, connect_timeout=0, command_timeout=2, data_timeout=2)
    report = await deliver(LmtpTransport(config, helo_name=HELO), make_request(f"[127.0.0.1]:{peer.port}"))
    assert [(address, outcome) for address, outcome, _ in outcomes(report)] == [("b@example.test", Outcome.SENT)]
    assert len(peer.messages) == 1


async def test_refused_rcpt_gets_the_rcpt_reply_and_the_others_are_delivered(lmtp_peer):
    peer = await lmtp_peer()
    peer.handler.rcpt_replies = {
        "gone@example.test": "550 5.1.1 <gone@example.test> User doesn't exist",
        "later@example.test": "451 4.3.0 <later@example.test> Temporary user lookup failure",
    }
    request = make_request(f"[127.0.0.1]:{peer.port}", "gone@example.test", "ok@example.test", "later@example.test")
    report = await deliver(make_transport(), request)

    assert outcomes(report) == [
        ("gone@example.test", Outcome.BOUNCED, "5.1.1"),
        ("ok@example.test", Outcome.SENT, "2.0.0"),
        ("later@example.test", Outcome.DEFERRED, "4.3.0"),
    ]
    assert report.results[0].text == ("host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <gone@example.test> User doesn't "
                                      "exist (in reply to RCPT TO command)")
    assert [m.rcpt_tos for m in peer.messages] == [["ok@example.test"]]
    assert report.site_ok


async def test_all_rcpts_refused_sends_no_data(lmtp_peer):
    peer = await lmtp_peer(pipelining=True)
    peer.handler.rcpt_replies = {"gone@example.test": "550 5.1.1 <gone@example.test> User doesn't exist"}
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", "gone@example.test"))
    assert outcomes(report) == [("gone@example.test", Outcome.BOUNCED, "5.1.1")]
    assert peer.messages == []


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
async def test_refused_mail_from_decides_every_recipient(lmtp_peer, pipelining):
    peer = await lmtp_peer(pipelining=pipelining)
    peer.handler.mail_reply = "553 5.7.1 <a@remote.test> Sender address rejected"
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", "b@example.test",
                                                          "c@example.test"))
    assert outcomes(report) == [("b@example.test", Outcome.BOUNCED, "5.7.1"),
                                ("c@example.test", Outcome.BOUNCED, "5.7.1")]
    assert all(r.text.endswith("Sender address rejected (in reply to MAIL FROM command)") for r in report.results)
    assert report.site_ok
    assert peer.messages == []
    if not pipelining:
        assert peer.handler.commands == ["MAIL a@remote.test"]  # no RCPT after a refused MAIL


async def test_null_sender_and_seven_bit_message(lmtp_peer):
    peer = await lmtp_peer()
    request = make_request(f"[127.0.0.1]:{peer.port}", sender="", content=b"Subject: x\r\n\r\nhi\r\n")
    report = await deliver(make_transport(), request)
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0")]
    assert peer.messages[0].mail_from == "<>"
    assert not any(o.startswith("BODY=") for o in peer.messages[0].mail_options)


async def test_8bit_content_is_converted_for_a_server_without_8bitmime(lmtp_peer):
    peer = await lmtp_peer(decode_data=True)  # aiosmtpd offers 8BITMIME only when it does not decode
    content = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n")
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", content=content,
                                                          body_type="8BITMIME"))
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0")]
    [message] = peer.messages
    assert not any(o.startswith("BODY=") for o in message.mail_options)
    assert message.content.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n")


async def test_bracketed_host_without_port_uses_the_configured_port(lmtp_peer):
    peer = await lmtp_peer()
    report = await deliver(make_transport(port=peer.port), make_request("[127.0.0.1]"))
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0")]


async def test_host_name_nexthop_is_resolved(lmtp_peer):
    peer = await lmtp_peer()
    report = await deliver(make_transport(), make_request(f"localhost:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"localhost[127.0.0.1]:{peer.port}"


async def test_unix_socket_nexthop(lmtp_peer):
    directory = Path(tempfile.mkdtemp(prefix="lmtp-", dir="/tmp"))  # short: sun_path holds 108 bytes
    try:
        socket_path = directory / "lmtp.sock"
        peer = await lmtp_peer(unix_path=socket_path)
        report = await deliver(make_transport(), make_request(f"unix:{socket_path}", "b@example.test",
                                                              "c@example.test"))
        assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0"),
                                    ("c@example.test", Outcome.SENT, "2.0.0")]
        assert report.results[0].relay == f"{HELO}[{socket_path}]"
        assert [m.content for m in peer.messages] == [CONTENT]
    finally:
        shutil.rmtree(directory)


async def test_smtputf8_needed_but_not_offered_bounces(lmtp_peer):
    peer = await lmtp_peer(enable_SMTPUTF8=False)
    request = make_request(f"[127.0.0.1]:{peer.port}", "jürgen@exämple.test", smtputf8=True)
    report = await deliver(make_transport(), request)
    assert outcomes(report) == [("jürgen@exämple.test", Outcome.BOUNCED, "5.6.7")]
    assert report.results[0].text == "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert peer.handler.commands == []


async def test_smtputf8_is_used_when_offered(lmtp_peer):
    peer = await lmtp_peer(enable_SMTPUTF8=True)
    request = make_request(f"[127.0.0.1]:{peer.port}", "jürgen@exämple.test", sender="andré@remote.test",
                           smtputf8=True)
    report = await deliver(make_transport(), request)
    assert outcomes(report) == [("jürgen@exämple.test", Outcome.SENT, "2.0.0")]
    assert peer.messages[0].rcpt_tos == ["jürgen@exämple.test"]
    assert "SMTPUTF8" in peer.messages[0].mail_options


async def test_message_bigger_than_advertised_size_bounces(lmtp_peer):
    peer = await lmtp_peer(data_size_limit=64)
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}"))
    assert outcomes(report) == [("b@example.test", Outcome.BOUNCED, "5.3.4")]
    assert peer.messages == []


# ---------------------------------------------------------------------------------------------------- addresses


async def test_crlf_in_an_address_bounces_and_never_reaches_the_wire(lmtp_peer):
    peer = await lmtp_peer()
    evil = "x@example.test>\r\nRCPT TO:<injected@example.test"
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", evil, "ok@example.test"))
    assert outcomes(report) == [(evil, Outcome.BOUNCED, "5.1.3"), ("ok@example.test", Outcome.SENT, "2.0.0")]
    assert report.results[0].text == "<x@example.test>??RCPT TO:<injected@example.test>: Bad recipient address syntax"
    assert peer.handler.commands == ["MAIL a@remote.test", "RCPT ok@example.test"]


async def test_only_bad_addresses_means_no_connection(lmtp_peer):
    peer = await lmtp_peer()
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", "a\nb@example.test"))
    assert outcomes(report) == [("a\nb@example.test", Outcome.BOUNCED, "5.1.3")]
    bad_sender = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", sender="s\x00@x.test"))
    assert outcomes(bad_sender) == [("b@example.test", Outcome.BOUNCED, "5.1.7")]
    assert peer.connections == []


# ---------------------------------------------------------------------------------------------------- site failures


def client_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailflow.lmtp"]


async def test_connection_refused_defers_and_fails_the_site(caplog):
    unused_port = free_port()
    with caplog.at_level(logging.INFO, "mailflow.lmtp"):
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{unused_port}", "b@example.test",
                                                              "c@example.test"))
    # besides the result lines, Postfix's lmtp logs the failure alone, without the queue id (smtp_connect_inet)
    assert client_lines(caplog) == [f"connect to 127.0.0.1[127.0.0.1]:{unused_port}: Connection refused"]
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.4.1"),
                                ("c@example.test", Outcome.DEFERRED, "4.4.1")]
    assert report.results[0].text == f"connect to 127.0.0.1[127.0.0.1]:{unused_port}: Connection refused"
    assert report.results[0].relay == "none"
    assert not report.site_ok
    assert report.site_reason == report.results[0].text


async def test_a_peer_that_never_greets_is_dated_as_connection_set_up():
    """As smtp's, lmtp's failure before MAIL FROM (Postfix's smtp_bulk_fail, shared by lmtp) dates the set-up that
    never ended at the failure, on qmgr's clock (`now`): the log's `delays=` count that wait as connection set-up
    (c), not transmission (d)."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)  # no greeting, then the connection closed
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = LmtpConfig(port=port, connect_timeout=2, command_timeout=2, data_timeout=2)
    try:
        report = await deliver(LmtpTransport(config, helo_name=HELO, now=lambda: 500.0),
                               make_request(f"[127.0.0.1]:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    assert [(r.outcome, r.conn) for r in report.results] == [(Outcome.DEFERRED, ConnStats(setup_done=500.0))]
    assert "while receiving the initial server greeting" in report.results[0].text


async def test_missing_unix_socket_defers(caplog):
    with caplog.at_level(logging.INFO, "mailflow.lmtp"):
        report = await deliver(make_transport(), make_request("unix:/nonexistent/lmtp"))
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.4.1")]
    assert report.results[0].text == f"connect to {HELO}[/nonexistent/lmtp]: No such file or directory"
    assert not report.site_ok
    assert client_lines(caplog) == []  # (Postfix's smtp_connect_local: the result line says it)


async def test_server_that_stops_answering_after_data_times_out(lmtp_peer):
    peer = await lmtp_peer()
    peer.handler.hang_after = 1  # answers the first recipient, then nothing
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = await deliver(make_transport(timeout=0.5), make_request(f"[127.0.0.1]:{peer.port}", "b@example.test",
                                                                     "c@example.test"))
    assert loop.time() - started < 2.0
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0"),  # its answer stands
                                ("c@example.test", Outcome.DEFERRED, "4.4.2")]
    assert report.results[1].text == ("conversation with 127.0.0.1[127.0.0.1] timed out while sending end of data "
                                      "-- message may be sent more than once")
    assert not report.site_ok


async def test_silent_server_after_greeting_times_out_at_lhlo():
    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 silent LMTP\r\n")
        await reader.read()  # until the client gives up
        writer.close()

    report, _ = await deliver_to_script(greet_then_listen, timeout=0.3)
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.4.2")]
    assert report.results[0].text == ("conversation with 127.0.0.1[127.0.0.1] timed out while performing the LHLO "
                                      "handshake")
    assert not report.site_ok


async def test_connection_closed_before_final_replies_defers():
    async def close_after_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp.test LMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"LHLO"):
                writer.write(b"250-lmtp.test\r\n250 PIPELINING\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
            elif line == b".\r\n":
                break
            elif line[:4] in (b"MAIL", b"RCPT"):
                writer.write(b"250 2.1.0 Ok\r\n")
        writer.close()

    report, _ = await deliver_to_script(close_after_data)
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.4.2")]
    assert report.results[0].text.startswith("lost connection with 127.0.0.1[127.0.0.1] while sending end of data")
    assert not report.site_ok


async def refuse_to_talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"554 5.3.2 no service today\r\n")
    await writer.drain()
    writer.close()


async def test_refused_greeting_defers_and_fails_the_site(caplog):
    with caplog.at_level(logging.INFO, "mailflow.lmtp"):
        report, _ = await deliver_to_script(refuse_to_talk)
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.3.2")]
    assert report.results[0].text == "host 127.0.0.1[127.0.0.1] refused to talk to me: 554 5.3.2 no service today"
    assert not report.site_ok
    assert client_lines(caplog) == []  # at the last address the result line is the only one, as Postfix's


class TwoAddresses(LmtpTransport):
    """Its next hop's host has two addresses: 127.0.0.2 on `first_port`, then 127.0.0.1 on `second_port`."""

    first_port = second_port = 0

    async def _peers(self, nexthop: Nexthop) -> list[Peer]:
        return [Peer("lmtp.test", "127.0.0.2", self.first_port), Peer("lmtp.test", "127.0.0.1", self.second_port)]


async def test_an_address_that_failed_before_another_is_tried_is_logged_with_the_queue_id(lmtp_peer, caplog):
    """Postfix's smtp_bulk_fail at a server that is not the final one: `QID: reason`, then the next address."""
    refusing = await asyncio.start_server(refuse_to_talk, "127.0.0.2", 0)
    peer = await lmtp_peer()
    transport = TwoAddresses(LmtpConfig(), helo_name=HELO)
    transport.first_port, transport.second_port = refusing.sockets[0].getsockname()[1], peer.port
    try:
        with caplog.at_level(logging.INFO, "mailflow.lmtp"):
            report = await deliver(transport, make_request("lmtp.test"))
    finally:
        refusing.close()
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0")]
    assert client_lines(caplog) == ["Q1: host lmtp.test[127.0.0.2] refused to talk to me: 554 5.3.2 no service today"]


async def test_the_lines_an_lmtp_session_writes_through_the_smtp_core_are_lmtp_s(caplog):
    """The lines the SMTP client's core writes for an LMTP session are named `lmtp` in the log, as Postfix's lmtp(8)
    writes them (a private Postfix 3.7.11 through this server: `postfix/lmtp[pid]: host 127.0.0.1[127.0.0.1] offers
    SMTPUTF8 support, but not 8BITMIME`, `postfix/lmtp[pid]: warning: QID: non-LMTP response from
    127.0.0.1[127.0.0.1]:port: hello, this is not LMTP`); none under `smtp`."""
    with caplog.at_level(logging.INFO, "mailflow"):
        report, port = await deliver_to_script(garbling_lmtp)
    assert outcomes(report) == [("b@example.test", Outcome.SENT, "2.0.0")]
    syslog = SyslogFormatter("mx.mailflow.test", "postfix-mailflow", pid=7)
    assert [syslog.format(r).split(" ", 2)[2] for r in caplog.records] == [
        "postfix-mailflow/lmtp[7]: host 127.0.0.1[127.0.0.1] offers SMTPUTF8 support, but not 8BITMIME",
        f"postfix-mailflow/lmtp[7]: warning: Q1: non-LMTP response from 127.0.0.1[127.0.0.1]:{port}: hello, this is "
        f"not LMTP"]


async def test_a_5xx_to_lhlo_bounces_with_the_reply_naming_the_peer():
    """A hard refusal of LHLO by the only address: bounced with its reply, as Postfix's lmtp does at the final
    server; the server answered, so the site is not failed."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp.test LMTP\r\n")
        await reader.readline()
        writer.write(b"550 5.7.1 not for you\r\n")
        await writer.drain()
        writer.close()

    report, port = await deliver_to_script(refuse)
    assert outcomes(report) == [("b@example.test", Outcome.BOUNCED, "5.7.1")]
    assert report.results[0].text == "host 127.0.0.1[127.0.0.1] refused to talk to me: 550 5.7.1 not for you"
    assert report.results[0].relay == f"127.0.0.1[127.0.0.1]:{port}" and report.site_ok


async def test_bad_nexthop_defers_as_configuration_error():
    report = await deliver(make_transport(), make_request("unix:"))
    assert outcomes(report) == [("b@example.test", Outcome.DEFERRED, "4.3.5")]
    assert not report.site_ok


async def test_a_bad_nexthop_fails_a_job_s_recipients_a_slice_a_turn(monkeypatch):
    """A bad next hop (as the lookup failures of lmtp_generic_maps and the header checks) failed every recipient
    of the job in one loop turn (50 000: 0.18 s): SLICE a turn, the same results."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    failed: list[tuple[int, int]] = []
    fail = trouble.Outcomes.fail
    async with LoopTurns() as turns:
        monkeypatch.setattr(trouble.Outcomes, "fail", lambda self, rcpts, *args: failed.append(
            (turns.count, len(rcpts))) or fail(self, rcpts, *args))
        report = await deliver(make_transport(), make_request("unix:", *recipients))
    assert [size for _, size in failed] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in failed}) == 5, "the loop had no turn between the slices"
    assert [r.recipient.address for r in report.results] == recipients
    assert {(r.outcome, r.dsn) for r in report.results} == {(Outcome.DEFERRED, "4.3.5")} and not report.site_ok


async def test_a_job_s_end_of_data_replies_in_one_write_are_taken_a_slice_a_turn(monkeypatch, lmtp_peer):
    """The LMTP peer answers the end of DATA for every recipient in one write (aiosmtpd's handle_DATA's answer):
    read ahead, they came without a wait and made their results in one loop turn; SLICE a turn, each its own."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    peer = await lmtp_peer(pipelining=True)
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    made: list[int] = []  # the loop turn of each end-of-DATA reply's result
    reply_results = proto.reply_results

    def results(answered, reply, peer, command, **kw):
        if command == "end of DATA":
            made.append(turns.count)
        return reply_results(answered, reply, peer, command, **kw)

    async with LoopTurns() as turns:
        monkeypatch.setattr(proto, "reply_results", results)
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", *recipients))
    assert len(made) == 45 and len(set(made)) >= 5, "the loop had no turn between the slices"
    assert [(r.recipient.address, r.outcome, r.text) for r in report.results] == [
        (a, Outcome.SENT, f"250 2.0.0 <{a}> Saved") for a in recipients]


# ---------------------------------------------------------------------------------------------------- pure parts


def test_nexthop_forms():
    assert parse_nexthop("[127.0.0.1]:2424", 24, lmtp=True) == Nexthop(host="127.0.0.1", port=2424)
    assert parse_nexthop("[127.0.0.1]", 24, lmtp=True) == Nexthop(host="127.0.0.1", port=24)
    assert parse_nexthop("Mail.Example.:24", 99, lmtp=True) == Nexthop(host="mail.example", port=24)
    assert parse_nexthop("inet:[::1]:24", 99, lmtp=True) == Nexthop(host="::1", port=24)
    assert parse_nexthop("unix:/run/dovecot/lmtp", 24, lmtp=True) == Nexthop(path="/run/dovecot/lmtp")
    for bad in ("unix:", "[]:24", "host:port", "host:99999"):
        with pytest.raises(ValueError):
            parse_nexthop(bad, 24, lmtp=True)


def test_lmtp_settings_take_durations_and_refuse_a_zero_timeout():
    assert config_from_dict({"lmtp": {"data_timeout": "2m", "port": 2424}}).lmtp == LmtpConfig(
        port=2424, data_timeout=120.0)
    with pytest.raises(ConfigError, match="lmtp.command_timeout"):
        config_from_dict({"lmtp": {"command_timeout": "0s"}})
    assert config_from_dict({"lmtp": {"connect_timeout": "0s"}}).lmtp.connect_timeout == 0  # the system's limit


async def test_a_spooled_message_is_streamed_and_arrives_byte_exact(lmtp_peer, tmp_path):
    data = big_message(long_line=False)
    peer = await lmtp_peer(pipelining=True)
    request = DeliveryRequest("Q1", "a@remote.test", (Recipient(0, "b@example.test", "b@example.test"),),
                              f"[127.0.0.1]:{peer.port}", spooled(tmp_path, data))
    report = await deliver(make_transport(), request)
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    [message] = peer.messages
    assert message.content == data and f"SIZE={len(data)}" in message.mail_options


async def test_lmtp_header_and_body_checks_edit_the_content_as_it_goes_out(lmtp_peer, tmp_path, caplog):
    from mailflow.tables import TableCache
    from mailflow.transports.smtp_checks import OutboundChecks
    peer = await lmtp_peer()
    (tmp_path / "header").write_text("/^Subject:/ IGNORE\n/^To:/ REJECT\n")
    (tmp_path / "body").write_text("/^last line$/ REPLACE final line\n")
    tables = TableCache()
    checks = OutboundChecks(tables.open([f"regexp:{tmp_path}/header"]), [], [],
                            tables.open([f"regexp:{tmp_path}/body"]), program="lmtp")
    caplog.set_level(logging.INFO, "mailflow.lmtp")
    transport = LmtpTransport(LmtpConfig(connect_timeout=2, command_timeout=2, data_timeout=2), helo_name=HELO,
                              checks=checks)
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}", "b@example.test"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    [message] = peer.messages
    assert message.content == CONTENT.replace(b"Subject: byte exact\r\n", b"").replace(b"last line", b"final line")
    lines = [r.getMessage() for r in caplog.records]
    assert "unsupported command in lmtp_header_checks map: REJECT" in lines
    assert "Q1: replace: body last line: final line" in lines


async def test_a_header_check_table_that_may_wait_is_asked_off_the_event_loop(lmtp_peer):
    """lmtp_header_checks on a table whose lookup may wait (sqlite:, unix:): the in-memory header section is
    checked in a worker thread, never on the loop every session shares."""
    import threading

    from mailflow.transports.smtp_checks import OutboundChecks
    asked_in: list[int] = []

    class WaitingTable:  # (a sqlite: table's shape: blocking, answers after a wait)
        name, fixed, blocking = "sqlite:/etc/x.cf", False, True

        def lookup(self, key: str) -> str | None:
            asked_in.append(threading.get_ident())
            return "IGNORE" if key.startswith("Subject:") else None

    peer = await lmtp_peer()
    transport = LmtpTransport(LmtpConfig(port=peer.port), helo_name=HELO,
                              checks=OutboundChecks([WaitingTable()], [], [], [], program="lmtp"))
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    assert [outcome for _, outcome, _ in outcomes(report)] == [Outcome.SENT]
    assert asked_in and threading.get_ident() not in asked_in
    assert b"Subject:" not in peer.messages[0].content


async def test_lmtp_generic_maps_map_what_the_lmtp_client_sends_as_smtps_do(lmtp_peer, caplog):
    """lmtp_generic_maps (`lmtp.generic_maps`, wired by build_transports): MAIL FROM, RCPT TO and the header's
    address fields go out mapped, as smtp_generic_maps maps them for the SMTP client; the results keep the queued
    addresses. A value that cannot go on the wire defers the delivery, named as Postfix names the parameter."""
    from mailflow.clock import VirtualClock
    from mailflow.dns import StaticResolver
    from mailflow.routing.router import Router
    from mailflow.transports import build_transports

    peer = await lmtp_peer()
    table = ("inline:{ {joe@box.local = joe.user@example.com}, {@box.local = @example.com},"
             " {bad@box.local = a@b>SMTPUTF8} }")
    config = config_from_dict({"myhostname": "box.local", "mydestination": ["box.local"],
                               "lmtp": {"port": peer.port, "generic_maps": [table]}})
    transport = build_transports(config, StaticResolver(), VirtualClock(), Router(config))["lmtp"]
    content = b"From: Joe <joe@box.local>\r\nTo: ann@box.local\r\nSubject: joe@box.local\r\n\r\njoe@box.local\r\n"
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}", "ann@box.local", "b@example.test",
                                                   sender="joe@box.local", content=content))
    assert outcomes(report) == [("ann@box.local", Outcome.SENT, "2.0.0"), ("b@example.test", Outcome.SENT, "2.0.0")]
    [received] = peer.messages
    assert (received.mail_from, received.rcpt_tos) == ("joe.user@example.com", ["ann@example.com", "b@example.test"])
    assert received.content.startswith(b"From: Joe <joe.user@example.com>\r\nTo: ann@example.com\r\n"
                                       b"Subject: joe@box.local\r\n")  # (a subject, and the body, stay)
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}", sender="bad@box.local"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.DEFERRED, "4.3.0")]
    assert report.results[0].text.startswith("lmtp_generic_maps lookup error: table ")
    assert len(peer.messages) == 1
    assert any(r.name == "mailflow.lmtp" and "Q1: lmtp_generic_maps: table " in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------- connection cache


async def test_messages_to_one_next_hop_share_one_cached_session_quit_at_close(lmtp_peer):
    """Postfix's lmtp(8) connection cache (lmtp_connection_cache_time_limit, 2s): three messages one after the
    other, one session (conn_use 1, 2, 3), each reuse after its RSET probe (Postfix's lmtp sends MAIL … DATA, RSET,
    MAIL … to such a peer); close() QUITs it."""
    peer = await lmtp_peer(pipelining=True)
    transport = make_transport()
    try:
        reports = [await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", f"u{n}@example.test"))
                   for n in range(3)]
        assert [outcomes(r) for r in reports] == [[(f"u{n}@example.test", Outcome.SENT, "2.0.0")] for n in range(3)]
        assert [r.results[0].conn.use for r in reports] == [1, 2, 3]
        assert len(peer.connections) == 1 and len(peer.messages) == 3
        assert peer.handler.commands == ["MAIL a@remote.test", "RCPT u0@example.test", "RSET", "MAIL a@remote.test",
                                         "RCPT u1@example.test", "RSET", "MAIL a@remote.test", "RCPT u2@example.test"]
    finally:
        await transport.close()
    await eventually(lambda: peer.handler.commands[-1:] == ["QUIT"], what="the cached session QUIT at close")


async def test_a_session_whose_end_of_data_was_refused_is_cached_without_rset_and_probed_before_reuse(lmtp_peer):
    """The final replies end the transaction, a refusal among them too (RFC 2033): no RSET before the session is
    cached (it would hold the results back), as Postfix's lmtp; its RSET probe before it is used again."""
    peer = await lmtp_peer()
    peer.handler.final_replies = {"full@example.test": "452 4.2.2 <full@example.test> Mailbox is full"}
    transport = make_transport()
    try:
        first = await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "ok@example.test",
                                                     "full@example.test"))
        second = await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "u@example.test"))
    finally:
        await transport.close()
    assert [r.outcome for r in first.results] == [Outcome.SENT, Outcome.DEFERRED]
    assert outcomes(second) == [("u@example.test", Outcome.SENT, "2.0.0")]
    assert len(peer.connections) == 1
    assert peer.handler.commands[3:] == ["RSET", "MAIL a@remote.test", "RCPT u@example.test"]


@pytest.mark.parametrize("idle_timeout", [None, 0.2], ids=["dropped", "421-on-idle"])
async def test_a_cached_session_the_server_closed_costs_no_deferral(lmtp_peer, idle_timeout):
    """The server ends an idle session (hangs up; or says 421 at its idle timeout, as Dovecot's lmtp and aiosmtpd
    do): the next message finds it dead at its RSET probe and goes over a new session, delivered, no deferral."""
    peer = await lmtp_peer(pipelining=True, **({"timeout": idle_timeout} if idle_timeout else {}))
    transport = make_transport(connection_cache_time_limit=30)
    try:
        first = await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "one@example.test"))
        assert "QUIT" not in peer.handler.commands  # (cached)
        if idle_timeout is None:
            peer.connections[0].transport.close()
        await eventually(lambda: peer.connections[0].transport is None or peer.connections[0].transport.is_closing(),
                         what="the server closed the idle session")
        second = await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "two@example.test"))
    finally:
        await transport.close()
    assert outcomes(first) + outcomes(second) == [("one@example.test", Outcome.SENT, "2.0.0"),
                                                  ("two@example.test", Outcome.SENT, "2.0.0")]
    assert second.site_ok and second.results[0].conn.use == 1
    assert len(peer.connections) == 2 and [m.rcpt_tos for m in peer.messages] == [["one@example.test"],
                                                                                  ["two@example.test"]]


async def test_a_cached_session_that_refuses_its_rset_probe_is_dropped_for_a_new_one(lmtp_peer):
    """Postfix's smtp_reuse_common: a session whose RSET probe is not answered 2xx is not used."""
    peer = await lmtp_peer()
    transport = make_transport()
    try:
        await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "one@example.test"))
        peer.handler.rset_reply = "421 4.3.2 Shutting down"
        second = await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", "two@example.test"))
    finally:
        await transport.close()
    assert outcomes(second) == [("two@example.test", Outcome.SENT, "2.0.0")] and second.results[0].conn.use == 1
    assert len(peer.connections) == 2


async def test_one_cached_session_at_most_is_probed_per_delivery(lmtp_peer):
    """Postfix's smtp_connect_local: one cached session (smtp_reuse_nexthop), its RSET probe, then a new session.
    A server whose idle sessions all stop answering RSET (old lmtp processes stuck on a lock) costs a delivery one
    probe timeout, not one per cached session."""
    peer = await lmtp_peer()
    transport = make_transport(timeout=0.5)
    nexthop = f"[127.0.0.1]:{peer.port}"
    try:
        first = await asyncio.gather(*(transport.deliver(make_request(nexthop, f"u{n}@example.test"))
                                       for n in range(3)))
        assert [r.results[0].outcome for r in first] == [Outcome.SENT] * 3 and len(peer.connections) == 3
        peer.handler.rset_silent = True
        started = asyncio.get_running_loop().time()
        report = await asyncio.wait_for(transport.deliver(make_request(nexthop, "late@example.test")), 5)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await transport.close()
    assert outcomes(report) == [("late@example.test", Outcome.SENT, "2.0.0")] and report.results[0].conn.use == 1
    assert peer.handler.commands.count("RSET") == 1 and len(peer.connections) == 4
    assert elapsed < 3 * 0.5  # one probe timeout (0.5s), not three (the rest is headroom for a loaded host)


async def test_the_rset_probe_s_garbage_is_logged_with_the_queue_id_of_the_message_it_precedes(lmtp_peer, caplog):
    """The probe belongs to the delivery that reuses the session: a line that is no LMTP reply before RSET's 250
    is warned about (Postfix's smtp_chat_resp, a PIPELINING peer) under that message's queue id, not the one the
    session carried before."""
    peer = await lmtp_peer(pipelining=True)
    transport = make_transport()
    nexthop = f"[127.0.0.1]:{peer.port}"
    try:
        await transport.deliver(replace(make_request(nexthop, "one@example.test"), queue_id="FIRSTQID"))
        peer.handler.rset_reply = "garbage-from-rset\r\n250 2.0.0 Ok"
        with caplog.at_level(logging.WARNING, "mailflow.lmtp"):
            second = await transport.deliver(replace(make_request(nexthop, "two@example.test"), queue_id="SECONDQID"))
    finally:
        await transport.close()
    assert outcomes(second) == [("two@example.test", Outcome.SENT, "2.0.0")] and second.results[0].conn.use == 2
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.lmtp"] == [
        f"SECONDQID: non-LMTP response from 127.0.0.1[127.0.0.1]:{peer.port}: garbage-from-rset"]


async def test_to_a_pipelining_server_the_rset_probe_goes_with_mail_in_one_round_trip():
    """RFC 2920 (which RFC 2033 servers offer): RSET goes in MAIL's write, as the SMTP client sends it. This server
    answers RSET only once MAIL has come: a client that waited for RSET's reply alone would time out, drop the
    session and open another."""
    connections: list[list[bytes]] = []

    async def holds_rset_until_mail(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard: list[bytes] = []
        connections.append(heard)
        writer.write(b"220 lmtp.test LMTP\r\n")
        replies = {b"LHLO": b"250-lmtp.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n", b"MAIL": b"250 2.1.0 Ok\r\n",
                   b"RCPT": b"250 2.1.5 Ok\r\n", b"DATA": b"354 go on\r\n", b"QUIT": b"221 2.0.0 Bye\r\n"}
        while line := await reader.readline():
            verb = line[:4].upper()
            heard.append(verb)
            if verb == b"RSET":
                continue  # (answered with MAIL's reply)
            writer.write((b"250 2.0.0 Ok\r\n" if heard[-2:-1] == [b"RSET"] else b"") + replies.get(verb, b""))
            if verb == b"DATA":
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 Ok: delivered\r\n")
        writer.close()

    server = await asyncio.start_server(holds_rset_until_mail, "127.0.0.1", 0)
    nexthop = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
    transport = make_transport(timeout=0.5)
    try:
        reports = [await asyncio.wait_for(transport.deliver(make_request(nexthop, f"u{n}@example.test")), 5)
                   for n in range(2)]
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert [(r.results[0].outcome, r.results[0].conn.use) for r in reports] == [(Outcome.SENT, 1), (Outcome.SENT, 2)]
    assert len(connections) == 1 and connections[0][4:7] == [b"RSET", b"MAIL", b"RCPT"]


async def test_a_delivery_cancelled_during_the_rset_probe_closes_the_session(lmtp_peer):
    """The cached session is the delivery's once it is taken: cancelled while its probe waits, it is closed (the
    server sees the connection end), not leaked."""
    peer = await lmtp_peer()
    transport = make_transport()
    nexthop = f"[127.0.0.1]:{peer.port}"
    try:
        await transport.deliver(make_request(nexthop, "one@example.test"))
        peer.handler.rset_silent = True
        delivery = asyncio.create_task(transport.deliver(make_request(nexthop, "two@example.test")))
        await eventually(lambda: "RSET" in peer.handler.commands, what="the RSET probe")
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
        await eventually(lambda: peer.connections[0].transport is None or peer.connections[0].transport.is_closing(),
                         timeout=2, what="the probed session closed at once")
    finally:
        await transport.close()


async def test_with_the_cache_off_each_message_has_a_session_of_its_own(lmtp_peer):
    peer = await lmtp_peer()
    transport = make_transport(connection_cache_time_limit=0)
    try:
        for n in range(2):
            await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", f"u{n}@example.test"))
    finally:
        await transport.close()
    assert len(peer.connections) == 2 and len(peer.messages) == 2


async def test_a_unix_socket_next_hop_is_cached_too(lmtp_peer):
    folder = Path(tempfile.mkdtemp(prefix="mf-lmtp-"))
    try:
        peer = await lmtp_peer(unix_path=folder / "lmtp")
        transport = make_transport()
        try:
            for n in range(2):
                report = await transport.deliver(make_request(f"unix:{folder}/lmtp", f"u{n}@example.test"))
                assert report.results[0].outcome is Outcome.SENT
        finally:
            await transport.close()
        assert len(peer.connections) == 1 and len(peer.messages) == 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)
