"""SmtpTransport against real sockets on loopback: a capturing aiosmtpd peer and a dnslib zone server."""
from __future__ import annotations

import quopri

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import ssl
import struct
import time
import tracemalloc
from dataclasses import dataclass
from functools import partial

import pytest
import trustme
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult

from mailflow.app import Mailflow
from mailflow.clock import VirtualClock
from mailflow.config import Config, SmtpConfig, config_from_dict
from mailflow.dns import MX, AiodnsResolver, StaticResolver
from mailflow.content import Content
from mailflow.model import ConnStats, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.routing.router import Router
from mailflow.transports import build_transports
from mailflow.transports.smtp import SmtpTransport
from mailflow.transports.smtp import chat, commands, proto, trouble
from mailflow.tables.search import EXTERNAL_FIRST, address_search
from mailflow.transports.smtp.addr import MX_HOST_LIMIT, exchangers, order_exchangers, parse_nexthop
from tests.support import CaptureHandler, SmtpClient, base_settings, big_message, eventually, free_port, merged, spooled
from tests.support.peers import recording_peer
from tests.support.stalls import LoopTurns

HELO = "client.mailflow.test"
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


def make_transport(resolver=None, port: int = 25, tls: str = "none", timeout: float = 2.0, rng=None,
                   plaintext_after: float = 0.0, own_addresses: frozenset = frozenset(),
                   own_ports: frozenset = frozenset(), now=time.time, soft_bounce: bool = False,
                   **settings) -> SmtpTransport:
    config = SmtpConfig(
        port=port, connect_timeout=timeout, helo_timeout=timeout, command_timeout=timeout, data_timeout=timeout,
        tls_security_level=tls, **settings,
    )
    return SmtpTransport(config, resolver=resolver or StaticResolver(), helo_name=HELO, rng=rng,
                         plaintext_after=plaintext_after, own_addresses=own_addresses, own_ports=own_ports, now=now,
                         soft_bounce=soft_bounce)


def make_request(nexthop: str, *recipients: str, sender: str = "a@remote.test", content: bytes = CONTENT, **kw):
    rcpts = tuple(Recipient(i, address, address) for i, address in enumerate(recipients or ("b@example.test",)))
    return DeliveryRequest("Q1", sender, rcpts, nexthop, Content.of(content), **kw)


def mx_zone(*lines: str) -> str:
    return "\n".join(lines) + "\n"


@pytest.fixture
async def zone_resolver(dns_zone):
    """`zone_resolver(*records, servfail=(), garbled=(), rcodes=None)`: a resolver asking an in-process DNS server
    that holds `records` (servfail: names it answers SERVFAIL for; garbled: whose replies it cuts short; rcodes:
    {name: "FORMERR"}); closed at the end of the test."""
    made: list[AiodnsResolver] = []

    def make(*records: str, servfail: tuple[str, ...] = (), garbled: tuple[str, ...] = (),
             rcodes: dict[str, str] | None = None) -> AiodnsResolver:
        nameserver = dns_zone(mx_zone(*records), servfail, garbled=garbled, rcodes=rcodes)
        made.append(AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1))
        return made[-1]

    yield make
    for resolver in made:
        await resolver.close()


async def deliver(transport: SmtpTransport, request: DeliveryRequest):
    try:
        return await asyncio.wait_for(transport.deliver(request), 5)
    finally:
        await transport.close()


# ---------------------------------------------------------------------------------------------------- delivery


async def test_envelope_unchanged_and_content_byte_exact(smtp_peer):
    peer = await smtp_peer()
    request = make_request(
        f"[127.0.0.1]:{peer.port}", "b@example.test", "c+ext@example.test", body_type="8BITMIME"
    )
    report = await deliver(make_transport(), request)

    assert [m.content for m in peer.messages] == [CONTENT]
    message = peer.messages[0]
    assert message.mail_from == "a@remote.test"
    assert message.rcpt_tos == ["b@example.test", "c+ext@example.test"]
    assert message.helo == HELO
    assert "BODY=8BITMIME" in message.mail_options
    assert f"SIZE={len(CONTENT)}" in message.mail_options
    assert "SMTPUTF8" not in message.mail_options
    assert report.site_ok
    for result, recipient in zip(report.results, request.recipients):
        assert result.recipient == recipient
        assert result.outcome is Outcome.SENT
        assert result.dsn == "2.0.0"
        assert result.text == "250 2.0.0 Ok: queued as Q1"
        assert result.relay == f"127.0.0.1[127.0.0.1]:{peer.port}"


async def test_an_address_probe_says_mail_and_rcpt_and_delivers_nothing(smtp_peer):
    """Postfix's smtp with the verify flag: each recipient's RCPT reply is its result; no DATA."""
    peer = await smtp_peer()
    peer.handler.rcpt_replies["c@example.test"] = "550 5.1.1 <c@example.test>: User unknown"
    request = make_request(f"[127.0.0.1]:{peer.port}", "b@example.test", "c@example.test", verify=True)
    report = await deliver(make_transport(), request)
    assert [(r.outcome, r.text) for r in report.results] == [
        (Outcome.SENT, "250 2.1.5 Ok"),
        (Outcome.BOUNCED, "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <c@example.test>: User unknown (in reply to "
                          "RCPT TO command)")]
    assert peer.messages == []


async def test_bracketed_host_without_port_uses_the_configured_port(smtp_peer):
    peer = await smtp_peer()
    report = await deliver(make_transport(port=peer.port), make_request("[127.0.0.1]"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert len(peer.messages) == 1


async def test_bracketed_name_is_not_looked_up_as_mx(smtp_peer):
    peer = await smtp_peer()
    resolver = StaticResolver(mx={"relay.test": [MX(10, "elsewhere.test")]}, addresses={"relay.test": ["127.0.0.1"]})
    report = await deliver(make_transport(resolver), make_request(f"[relay.test]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"relay.test[127.0.0.1]:{peer.port}"


async def test_an_ipv6_literal_nexthop_with_its_tag_is_the_address(smtp_peer):
    """transport_maps `smtp:[IPv6:::1]:port` (and user@[IPv6:::1]'s next hop): the tag goes, as Postfix's host_port
    drops it; no DNS lookup."""
    peer = await smtp_peer("::1")
    report = await deliver(make_transport(), make_request(f"[IPv6:::1]:{peer.port}"))
    assert (report.results[0].outcome, report.results[0].relay) == (Outcome.SENT, f"::1[::1]:{peer.port}")
    bad = await deliver(make_transport(), make_request("[IPv6:127.0.0.1]"))
    assert (bad.results[0].outcome, bad.results[0].dsn) == (Outcome.DEFERRED, "4.3.5")


async def test_seven_bit_message_is_sent_without_body_parameter(smtp_peer):
    peer = await smtp_peer()
    await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", content=b"Subject: x\r\n\r\nhi\r\n"))
    assert not any(o.startswith("BODY=") for o in peer.messages[0].mail_options)


async def test_null_sender_is_sent_as_empty_path(smtp_peer):
    peer = await smtp_peer()
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", sender=""))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.messages[0].mail_from == "<>"  # aiosmtpd's spelling of the null reverse-path
    assert peer.messages[0].content == CONTENT


async def test_smtputf8_address_is_delivered_with_smtputf8(smtp_peer):
    peer = await smtp_peer(enable_SMTPUTF8=True)
    request = make_request(
        f"[127.0.0.1]:{peer.port}", "jürgen@exämple.test", sender="andré@remote.test", smtputf8=True
    )
    report = await deliver(make_transport(), request)
    assert report.results[0].outcome is Outcome.SENT
    message = peer.messages[0]
    assert message.smtputf8
    assert "SMTPUTF8" in message.mail_options
    assert message.mail_from == "andré@remote.test"
    assert message.rcpt_tos == ["jürgen@exämple.test"]


async def test_smtputf8_needed_but_not_offered_bounces(smtp_peer):
    peer = await smtp_peer(enable_SMTPUTF8=False)
    request = make_request(f"[127.0.0.1]:{peer.port}", "jürgen@exämple.test", smtputf8=True)
    report = await deliver(make_transport(), request)
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.6.7")
    assert result.text == "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert report.site_ok
    assert peer.messages == []


async def test_smtputf8_flag_with_ascii_message_is_downgraded(smtp_peer):
    peer = await smtp_peer(enable_SMTPUTF8=False)
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", smtputf8=True))
    assert report.results[0].outcome is Outcome.SENT
    assert "SMTPUTF8" not in peer.messages[0].mail_options


async def test_smtputf8_mail_with_utf8_only_in_a_mime_part_header_bounces_where_smtputf8_is_not_offered(smtp_peer):
    """Postfix's cleanup flags a non-ASCII header field of any header section (a MIME part's too: SMTPUTF8_FLAG_HEADER),
    and its smtp(8) bounces SMTPUTF8 mail so flagged at a peer without SMTPUTF8 (5.6.7); 8-bit bytes in a body alone
    do not, nor do they in a part's header of mail that did not ask for SMTPUTF8."""
    part = (b"From: a@remote.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Disposition: attachment; filename=\"%s.txt\"\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n--b--\r\n")
    peer = await smtp_peer(enable_SMTPUTF8=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    report = await deliver(make_transport(), make_request(nexthop, content=part % b"K\xc3\xb6ln", smtputf8=True))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.6.7")
    assert result.text == "SMTPUTF8 is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    for content, smtputf8 in ((part % b"Koeln", True), (part % b"K\xc3\xb6ln", False)):
        report = await deliver(make_transport(), make_request(nexthop, content=content, smtputf8=smtputf8))
        assert report.results[0].outcome is Outcome.SENT
    assert len(peer.messages) == 2


async def test_message_bigger_than_advertised_size_bounces(smtp_peer):
    peer = await smtp_peer(data_size_limit=64)
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.3.4")
    assert f"message size {len(CONTENT)} exceeds size limit 64" in result.text
    assert peer.messages == []


async def test_starttls_is_used_when_offered_and_level_is_may(smtp_peer):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("peer.test").configure_cert(server_context)
    peer = await smtp_peer(tls_context=server_context)
    report = await deliver(make_transport(tls="may"), make_request(f"[127.0.0.1]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.messages[0].tls
    assert peer.messages[0].content == CONTENT


# ---------------------------------------------------------------------------------------------------- MX routing


async def test_dead_first_mx_falls_back_to_second(smtp_peer, zone_resolver):
    peer = await smtp_peer("127.0.0.1")  # nothing listens on 127.0.0.2 at this port
    resolver = zone_resolver(
        "example.test. 300 IN MX 10 mx1.example.test.",
        "example.test. 300 IN MX 20 mx2.example.test.",
        "mx1.example.test. 300 IN A 127.0.0.2",
        "mx2.example.test. 300 IN A 127.0.0.1",
    )
    report = await deliver(make_transport(resolver), make_request(f"example.test:{peer.port}"))
    assert report.site_ok
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"mx2.example.test[127.0.0.1]:{peer.port}"
    assert len(peer.messages) == 1


async def test_a_temporary_refusal_by_a_peer_that_is_not_the_last_leaves_the_recipient_to_the_next(
        smtp_peer, zone_resolver):
    """Postfix's smtp_rcpt_fail / smtp_mesg_fail: a soft error at a server that is not the final one keeps the
    recipient for the next (greylisted at MX 10, taken by MX 20); a 5xx is final wherever it comes from; the
    second session is the last (smtp_mx_session_limit = 2)."""
    primary = await smtp_peer("127.0.0.2", free_port())
    backup = await smtp_peer("127.0.0.3", primary.port)
    third = await smtp_peer("127.0.0.4", primary.port)
    primary.handler.rcpt_replies = {"grey@example.test": "450 4.2.0 greylisted", "gone@example.test": "550 5.1.1 no",
                                    "later@example.test": "451 4.3.0 later"}
    backup.handler.rcpt_replies = {"later@example.test": "452 4.3.1 full"}
    resolver = zone_resolver(
        "example.test. 300 IN MX 10 mx1.example.test.", "example.test. 300 IN MX 20 mx2.example.test.",
        "example.test. 300 IN MX 30 mx3.example.test.", "mx1.example.test. 300 IN A 127.0.0.2",
        "mx2.example.test. 300 IN A 127.0.0.3", "mx3.example.test. 300 IN A 127.0.0.4",
    )
    report = await deliver(make_transport(resolver, port=primary.port), make_request(
        "example.test", "ok@example.test", "grey@example.test", "gone@example.test", "later@example.test"))
    got = {r.recipient.address: (r.outcome, r.dsn, r.relay.partition("[")[0]) for r in report.results}
    assert got == {
        "ok@example.test": (Outcome.SENT, "2.0.0", "mx1.example.test"),
        "grey@example.test": (Outcome.SENT, "2.0.0", "mx2.example.test"),
        "gone@example.test": (Outcome.BOUNCED, "5.1.1", "mx1.example.test"),
        "later@example.test": (Outcome.DEFERRED, "4.3.1", "mx2.example.test"),  # the second session is the last
    }
    assert [m.rcpt_tos for m in primary.messages + backup.messages] == [
        ["ok@example.test"], ["grey@example.test"]]
    assert third.messages == [] and report.site_ok


async def greylisting_primary(smtp_peer, zone_resolver, *more_records: str):
    """MX 10 at 127.0.0.2, which answers grey@example.test 450, and MX 20 at 127.0.0.3: (primary, backup,
    a resolver for example.test and `more_records`)."""
    primary = await smtp_peer("127.0.0.2", free_port())
    backup = await smtp_peer("127.0.0.3", primary.port)
    primary.handler.rcpt_replies = {"grey@example.test": "450 4.2.0 greylisted"}
    resolver = zone_resolver(
        "example.test. 300 IN MX 10 mx1.example.test.", "example.test. 300 IN MX 20 mx2.example.test.",
        "mx1.example.test. 300 IN A 127.0.0.2", "mx2.example.test. 300 IN A 127.0.0.3", *more_records,
    )
    return primary, backup, resolver


async def test_what_a_cached_session_defers_goes_on_to_the_next_peer(smtp_peer, zone_resolver):
    """The cached session is the delivery's first: a greylisting refusal there sends the recipient to MX 20."""
    primary, backup, resolver = await greylisting_primary(smtp_peer, zone_resolver)
    transport = make_transport(resolver, port=primary.port)
    try:
        first = await transport.deliver(make_request("example.test", "ok@example.test"))
        second = await transport.deliver(make_request("example.test", "grey@example.test"))
    finally:
        await transport.close()
    assert [r.relay.partition("[")[0] for r in first.results + second.results] == [
        "mx1.example.test", "mx2.example.test"]
    assert second.results[0].outcome is Outcome.SENT and second.site_ok
    assert [m.rcpt_tos for m in backup.messages] == [["grey@example.test"]]


async def test_a_soft_error_is_logged_on_its_own_line_only_when_another_peer_is_tried(smtp_peer, zone_resolver, caplog):
    """Postfix's smtp_rcpt_fail logs `QID: host ... said: 4xx ...` for a server that is not the final one (the
    recipient goes on to the next); at the final server the result line is the only one."""
    primary, backup, resolver = await greylisting_primary(smtp_peer, zone_resolver,
                                                          "single.test. 300 IN MX 10 mx1.example.test.")
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        await deliver(make_transport(resolver, port=primary.port), make_request("example.test", "grey@example.test"))
        await deliver(make_transport(resolver, port=primary.port), make_request("single.test", "grey@example.test"))
    assert [r.getMessage() for r in caplog.records if "said:" in r.getMessage()] == [
        "Q1: host mx1.example.test[127.0.0.2] said: 450 4.2.0 greylisted (in reply to RCPT TO command)"]
    assert [m.rcpt_tos for m in backup.messages] == [["grey@example.test"]]


class TurnLines(logging.Handler):
    """The messages of mailflow.smtp's records, each with the loop turn (`turns.count`) it came in."""

    def __init__(self, turns: LoopTurns):
        super().__init__(logging.INFO)
        self.turns, self.lines = turns, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.turns.count, record.getMessage()))


async def test_a_soft_error_s_many_lines_at_a_server_that_is_not_the_final_one_take_a_slice_a_turn(
        monkeypatch, smtp_peer, zone_resolver):
    """The lines of a soft error for every recipient of a job at a server that is not the final one (`QID: host
    ... said: 451 ...`, one per recipient) were logged in one loop turn (50 000: 0.5 s), and their results taken
    back in one (with the choice of those that go on, twice: 72 ms): SLICE a turn, each once, in order, the
    recipients then delivered by the next server."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    taken: list[int] = []  # the loop turn of each result taken back

    class Taking(dict):
        def pop(self, key, *default):
            taken.append(turns.count)
            return super().pop(key, *default)

    monkeypatch.setattr(commands, "Outcomes", lambda: trouble.Outcomes(Taking()))  # (screen_envelope's)
    primary, backup, resolver = await greylisting_primary(smtp_peer, zone_resolver)
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    primary.handler.rcpt_replies = {r: "451 4.3.0 later" for r in recipients}
    logger = logging.getLogger("mailflow.smtp")
    async with LoopTurns() as turns:
        handler = TurnLines(turns)
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            report = await deliver(make_transport(resolver, port=primary.port), make_request("example.test",
                                                                                            *recipients))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    said = [(turn, line) for turn, line in handler.lines if " said: " in line]
    assert [line for _, line in said] == [
        "Q1: host mx1.example.test[127.0.0.2] said: 451 4.3.0 later (in reply to RCPT TO command)"] * 45
    assert len({turn for turn, _ in said}) == 5, "the loop had no turn between the slices"
    assert len(taken) == 45 and len(set(taken)) == 5, "the loop had no turn between the slices"
    assert [(r.recipient.address, r.outcome) for r in report.results] == [(a, Outcome.SENT) for a in recipients]
    assert [m.rcpt_tos for m in backup.messages] == [recipients] and report.site_ok


async def test_under_soft_bounce_a_refusal_at_a_server_that_is_not_the_final_one_tries_the_next(smtp_peer,
                                                                                                 zone_resolver, caplog):
    """Postfix's smtp_rcpt_fail with soft_bounce: a 5.X.X is a soft error, so a server that is not the final one
    does not have the last word (logged on its own line); at the final server the refusal stands (qmgr then keeps
    it deferred). Without soft_bounce the first server's 550 bounces it."""
    primary, backup, resolver = await greylisting_primary(smtp_peer, zone_resolver,
                                                          "single.test. 300 IN MX 10 mx1.example.test.")
    primary.handler.rcpt_replies = {"gone@example.test": "550 5.1.1 no such user"}
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        soft = await deliver(make_transport(resolver, port=primary.port, soft_bounce=True),
                             make_request("example.test", "gone@example.test", "ok@example.test"))
        single = await deliver(make_transport(resolver, port=primary.port, soft_bounce=True),
                               make_request("single.test", "gone@example.test"))
    hard = await deliver(make_transport(resolver, port=primary.port), make_request("example.test", "gone@example.test"))
    assert [(r.recipient.address, r.outcome, r.relay.partition("[")[0]) for r in soft.results] == [
        ("gone@example.test", Outcome.SENT, "mx2.example.test"), ("ok@example.test", Outcome.SENT, "mx1.example.test")]
    assert [m.rcpt_tos for m in backup.messages] == [["gone@example.test"]]
    assert [r.getMessage() for r in caplog.records if "said:" in r.getMessage()] == [
        "Q1: host mx1.example.test[127.0.0.2] said: 550 5.1.1 no such user (in reply to RCPT TO command)"]
    [r] = single.results
    assert (r.outcome, r.dsn) == (Outcome.BOUNCED, "5.1.1")
    [r] = hard.results
    assert (r.outcome, r.dsn, r.relay.partition("[")[0]) == (Outcome.BOUNCED, "5.1.1", "mx1.example.test")
    assert len(backup.messages) == 1


async def test_a_temporary_failure_whose_next_peer_cannot_be_reached_gets_that_peers_failure(smtp_peer, zone_resolver):
    """As Postfix's left-over recipients: the last reason is the unreachable backup's; with no backup at all,
    the reply of the only peer stands."""
    primary = await smtp_peer("127.0.0.2")
    primary.handler.mail_reply = "451 4.3.0 try later"
    resolver = zone_resolver(
        "example.test. 300 IN MX 10 mx1.example.test.", "example.test. 300 IN MX 20 mx2.example.test.",
        "mx1.example.test. 300 IN A 127.0.0.2", "mx2.example.test. 300 IN A 127.0.0.3",  # nothing there
        "single.test. 300 IN MX 10 mx1.example.test.",
    )
    both = await deliver(make_transport(resolver, port=primary.port), make_request("example.test"))
    single = await deliver(make_transport(resolver, port=primary.port), make_request("single.test"))
    [r] = both.results
    assert (r.outcome, r.dsn, r.relay) == (Outcome.DEFERRED, "4.4.1", "none")
    assert r.text == f"connect to mx2.example.test[127.0.0.3]:{primary.port}: Connection refused"
    assert not both.site_ok
    [r] = single.results
    assert (r.outcome, r.dsn) == (Outcome.DEFERRED, "4.3.0") and single.site_ok
    assert r.text == "host mx1.example.test[127.0.0.2] said: 451 4.3.0 try later (in reply to MAIL FROM command)"


async def test_lower_preference_is_tried_first(smtp_peer, zone_resolver):
    backup = await smtp_peer("127.0.0.1", free_port())
    primary = await smtp_peer("127.0.0.2", backup.port)
    resolver = zone_resolver(
        "example.test. 300 IN MX 20 backup.example.test.",
        "example.test. 300 IN MX 10 primary.example.test.",
        "backup.example.test. 300 IN A 127.0.0.1",
        "primary.example.test. 300 IN A 127.0.0.2",
    )
    report = await deliver(make_transport(resolver), make_request(f"example.test:{backup.port}"))
    assert report.results[0].relay == f"primary.example.test[127.0.0.2]:{backup.port}"
    assert (len(primary.messages), len(backup.messages)) == (1, 0)


async def test_implicit_mx_uses_the_domain_address(smtp_peer, zone_resolver):
    peer = await smtp_peer()
    resolver = zone_resolver("implicit.test. 300 IN A 127.0.0.1")
    report = await deliver(make_transport(resolver), make_request(f"implicit.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"implicit.test[127.0.0.1]:{peer.port}"


async def test_an_mx_host_that_is_a_cname_is_followed(smtp_peer, zone_resolver):
    """Postfix tolerates an MX target that is an alias (RFC 5321 5.1 forbids it, real zones have it); the peer keeps
    the MX host's name."""
    peer = await smtp_peer()
    resolver = zone_resolver(
        "example.test. 300 IN MX 10 alias.example.test.",
        "alias.example.test. 300 IN CNAME real.example.test.",
        "real.example.test. 300 IN A 127.0.0.1",
    )
    report = await deliver(make_transport(resolver), make_request(f"example.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"alias.example.test[127.0.0.1]:{peer.port}"


async def test_bad_greeting_on_first_mx_falls_back_to_second(smtp_peer):
    peer = await smtp_peer("127.0.0.1", free_port())

    async def busy(reader, writer):
        writer.write(b"421 4.3.2 busy, come back later\r\n")
        await writer.drain()
        writer.close()

    busy_server = await asyncio.start_server(busy, "127.0.0.2", peer.port)
    resolver = StaticResolver(
        mx={"example.test": [MX(10, "busy.example.test"), MX(20, "ok.example.test")]},
        addresses={"busy.example.test": ["127.0.0.2"], "ok.example.test": ["127.0.0.1"]},
    )
    try:
        report = await deliver(make_transport(resolver), make_request(f"example.test:{peer.port}"))
    finally:
        busy_server.close()
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"ok.example.test[127.0.0.1]:{peer.port}"


async def test_mx_without_address_is_skipped(smtp_peer):
    peer = await smtp_peer()
    resolver = StaticResolver(
        mx={"example.test": [MX(10, "ghost.example.test"), MX(20, "ok.example.test")]},
        addresses={"ok.example.test": ["127.0.0.1"]},
    )
    report = await deliver(make_transport(resolver), make_request(f"example.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT


def test_equal_preferences_are_shuffled_by_the_injected_rng():
    records = [MX(10, "a"), MX(10, "b"), MX(10, "c"), MX(5, "first"), MX(20, "last")]
    orders = {tuple(m.host for m in order_exchangers(records, random.Random(seed))) for seed in range(20)}
    assert all(order[0] == "first" and order[-1] == "last" for order in orders)
    assert len(orders) > 1
    assert order_exchangers(records, random.Random(7)) == order_exchangers(records, random.Random(7))


async def test_the_hosts_kept_of_a_huge_mx_set_do_not_depend_on_the_shuffle():
    """Past MX_HOST_LIMIT hosts the most preferred are kept, and at the limit's preference those first in the
    answer (Postfix's dns_rr_append keeps the first records): the 101st host of a tie is never tried, whatever the
    RNG, and a better host late in the answer always is; a host listed twice counts once, at its best."""
    records = [MX(10, f"h{i}.test") for i in range(MX_HOST_LIMIT)] + [MX(10, "late.test"), MX(5, "best.test"),
                                                                      MX(1, "h7.test")]
    resolver = StaticResolver(mx={"example.test": records})
    for seed in range(5):
        hosts = await exchangers(resolver, parse_nexthop("example.test", 25), random.Random(seed),
                                 logging.getLogger("mailflow.smtp"))
        names = [mx.host for mx in hosts]
        assert len(names) == MX_HOST_LIMIT and names[:2] == ["h7.test", "best.test"]
        assert set(names) == {"h7.test", "best.test"} | {f"h{i}.test" for i in range(MX_HOST_LIMIT - 1) if i != 7}


async def test_an_mx_answer_past_the_record_limit_is_logged_once_in_postfix_words(smtp_peer, zone_resolver,
                                                                                       caplog):
    """Postfix's dns_rr_append_with_limit (src/dns/dns_rr.c) warns when an answer has more records than
    dns_rr_list_limit (100) and drops the rest; mailflow keeps MX_HOST_LIMIT hosts, and says so as Postfix does,
    once per lookup (none at the limit), naming the name it asked (an IDN's A-labels), before a null MX among the
    records bounces the mail (Postfix's dns_lookup collects the answer before smtp_addr looks at it)."""
    peer = await smtp_peer()
    resolver = zone_resolver("mx0.many.test. 300 IN A 127.0.0.1",
                             *(f"many.test. 300 IN MX {i} mx{i}.many.test." for i in range(MX_HOST_LIMIT + 1)),
                             *(f"enough.test. 300 IN MX {i} mx{i}.many.test." for i in range(MX_HOST_LIMIT)),
                             *(f"xn--bcher-kva.test. 300 IN MX {i} mx{i}.many.test." for i in range(MX_HOST_LIMIT + 1)),
                             "null.test. 300 IN MX 0 .",
                             *(f"null.test. 300 IN MX {i} mx{i}.many.test." for i in range(1, MX_HOST_LIMIT + 1)))
    with caplog.at_level(logging.WARNING, "mailflow.smtp"):
        reports = [await deliver(make_transport(resolver, port=peer.port), make_request(nexthop))
                   for nexthop in ("many.test", "enough.test", "bücher.test", "null.test")]
    assert [r.outcome for report in reports for r in report.results] == [Outcome.SENT] * 3 + [Outcome.BOUNCED]
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records if "limit" in r.getMessage()] == [
        ("mailflow.smtp", "WARNING", "DNS record count limit (100) exceeded -- dropping excess record(s) after "
                                     f"qname={name} qtype=MX") for name in ("many.test", "xn--bcher-kva.test",
                                                                             "null.test")]


async def test_the_addresses_of_one_host_are_tried_in_random_order(smtp_peer):
    """Postfix's smtp_randomize_addresses (default yes): a host with several addresses does not load the first."""
    first = await smtp_peer("127.0.0.2", free_port())
    for n in (3, 4):
        await smtp_peer(f"127.0.0.{n}", first.port)
    resolver = StaticResolver(addresses={"mx.example.test": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})
    relays = []
    for seed in range(8):
        report = await deliver(make_transport(resolver, port=first.port, rng=random.Random(seed)),
                               make_request("[mx.example.test]"))
        relays.append(report.results[0].relay)
    assert len(set(relays)) > 1
    again = await deliver(make_transport(resolver, port=first.port, rng=random.Random(0)),
                          make_request("[mx.example.test]"))
    assert again.results[0].relay == relays[0]


class LastFirst(random.Random):
    """An RNG whose shuffle puts the last first (reverses), and keeps what it was given to order."""

    def __init__(self):
        super().__init__(0)
        self.ordered: list[list] = []

    def shuffle(self, x) -> None:  # type: ignore[override]
        self.ordered.append(list(x))
        x.reverse()


async def test_a_servers_rng_orders_its_smtp_clients_equal_mx_hosts(smtp_peer, tmp_path):
    """Mailflow(rng=...) (a Sink's seed) is the RNG its SMTP clients order equal MX preferences with, so that a
    seeded server delivers the same way each run: the clients drew from unseeded RNGs of their own."""
    hosts = [f"mx{n}.relay.test" for n in range(4)]
    peers = [await smtp_peer("127.0.0.2", free_port())]
    peers += [await smtp_peer(f"127.0.0.{n + 2}", peers[0].port) for n in range(1, len(hosts))]
    resolver = StaticResolver(mx={"relay.test": [MX(10, host) for host in hosts]},
                              addresses={host: [f"127.0.0.{n + 2}"] for n, host in enumerate(hosts)})
    rng = LastFirst()
    mf = Mailflow(config_from_dict(merged(base_settings(tmp_path), {"smtp": {"port": peers[0].port}})),
                  rng=rng, resolver=resolver, shutdown_grace=2.0)
    await mf.start()
    try:
        client = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await client.send_message(rcpt="b@relay.test")).code == 250
        await eventually(lambda: peers[-1].messages, what="the last MX host (first after the shuffle) has it")
    finally:
        await mf.stop()
    assert [mx.host for mx in rng.ordered[0]] == hosts
    assert [len(peer.messages) for peer in peers] == [0, 0, 0, 1]


async def test_null_mx_bounces_every_recipient_with_5_1_10(zone_resolver):
    resolver = zone_resolver("nullmx.test. 300 IN MX 0 .")
    report = await deliver(make_transport(resolver), make_request("nullmx.test", "a@nullmx.test", "b@nullmx.test"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.10")] * 2
    assert "nullmx.test does not accept mail" in report.results[0].text


async def test_a_null_mx_beside_other_mx_records_still_bounces_without_connecting(smtp_peer, zone_resolver):
    """RFC 7505 3: a null MX MUST be the only MX; Postfix's dns_lookup takes any "." in the RRset as a null MX."""
    peer = await smtp_peer()
    resolver = zone_resolver(
        "mixed.test. 300 IN MX 0 .", "mixed.test. 300 IN MX 10 mx.mixed.test.", "mx.mixed.test. 300 IN A 127.0.0.1",
    )
    report = await deliver(make_transport(resolver), make_request(f"mixed.test:{peer.port}", "a@mixed.test"))
    [result] = report.results
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.10")
    assert result.text == "Domain mixed.test does not accept mail (nullMX)"
    assert peer.messages == []


async def test_nxdomain_bounces_with_5_4_4_as_postfix(zone_resolver):
    """Postfix's smtp_domain_addr: an MX lookup that finds no such name goes on to the name's addresses
    (smtp_host_addr), whose "Host not found" bounces with 5.4.4. Of its A and AAAA lookups (inet_protocols = all,
    Postfix's default) dns_lookup_rv reports the last of equal failures: AAAA's, also for a name without either."""
    resolver = zone_resolver("example.test. 300 IN A 127.0.0.1", "bare.test. 300 IN MX 10 txt.test.",
                             'txt.test. 300 IN TXT "no address"')
    report = await deliver(make_transport(resolver), make_request("nowhere.test", "x@nowhere.test"))
    result = report.results[0]
    assert (result.outcome, result.dsn, result.relay) == (Outcome.BOUNCED, "5.4.4", "none")
    assert result.text == ("Host or domain name not found. Name service error for name=nowhere.test type=AAAA: "
                           "Host not found")
    assert report.site_ok
    [bare] = (await deliver(make_transport(resolver), make_request("bare.test", "x@bare.test"))).results
    assert (bare.outcome, bare.dsn, bare.text) == (
        Outcome.BOUNCED, "5.4.4",
        "Host or domain name not found. Name service error for name=txt.test type=AAAA: "
        "Host found but no data record of requested type")


async def test_dns_failure_defers_with_site_not_ok(zone_resolver):
    resolver = zone_resolver("example.test. 300 IN A 127.0.0.1", servfail=("broken.test",))
    report = await deliver(make_transport(resolver), make_request("broken.test", "x@broken.test"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.3")
    assert not report.site_ok


async def test_mx_hosts_without_addresses_give_the_last_lookups_words_deferred_after_a_dns_failure(zone_resolver):
    """Postfix's smtp_addr_one: the last host lookup's text stands, and after a temporary failure a later "not
    found" is soft too (4.4.4): one MX host whose DNS failed may have an address after all."""
    resolver = zone_resolver("soft-first.test. 300 IN MX 10 broken.test.", "soft-first.test. 300 IN MX 20 gone.test.",
                             "soft-last.test. 300 IN MX 10 gone.test.", "soft-last.test. 300 IN MX 20 broken.test.",
                             servfail=("broken.test",))
    results = [(await deliver(make_transport(resolver), make_request(nexthop))).results[0]
               for nexthop in ("soft-first.test", "soft-last.test")]
    assert [(r.outcome, r.dsn, r.text) for r in results] == [
        (Outcome.DEFERRED, "4.4.4",
         "Host or domain name not found. Name service error for name=gone.test type=AAAA: Host not found"),
        (Outcome.DEFERRED, "4.4.3",
         "Host or domain name not found. Name service error for name=broken.test type=AAAA: Host not found, try again"),
    ]


async def test_an_unreadable_or_invalid_mx_reply_is_deferred_or_bounced_in_postfix_s_words(zone_resolver):
    """posttls-finger (Postfix 3.7.11's dns_lookup, its resolver pointed at a server giving these replies) said
    "Name service error for name=garbled.test type=MX: Malformed or unexpected name server reply" for a reply cut
    short and the same for an MX host that is no host name (after "malformed domain name in resource data of MX
    record for badmx.test: bad-.example.test"), without the "Host or domain name not found." of a resolver's error.
    smtp_domain_addr defers the first (DNS_RETRY: 4.4.3) and bounces the second (DNS_INVAL: 5.4.4). mailflow
    deferred the first in c-ares's words ("Misformatted DNS reply") and looked the bad host up."""
    resolver = zone_resolver("garbled.test. 300 IN MX 10 mx.example.test.",
                             "badmx.test. 300 IN MX 10 bad-.example.test.", "bad-.example.test. 300 IN A 127.0.0.1",
                             garbled=("garbled.test",))
    results = [(await deliver(make_transport(resolver), make_request(nexthop, f"r@{nexthop}"))).results[0]
               for nexthop in ("garbled.test", "badmx.test")]
    assert [(r.outcome, r.dsn, r.text) for r in results] == [
        (Outcome.DEFERRED, "4.4.3",
         "Name service error for name=garbled.test type=MX: Malformed or unexpected name server reply"),
        (Outcome.BOUNCED, "5.4.4",
         "Name service error for name=badmx.test type=MX: Malformed or unexpected name server reply")]


async def test_formerr_bounces_and_refused_or_notimp_defer_in_postfix_s_words(zone_resolver):
    """posttls-finger (as above) said "Host or domain name not found. Name service error for name=formerr.test
    type=MX: Non-recoverable error" (the system's resolver's NO_RECOVERY: DNS_FAIL, which smtp_domain_addr bounces
    5.4.3) and "...: Host not found, try again" for REFUSED and NOTIMP (the resolver tries the next server, then
    says TRY_AGAIN: deferred 4.4.3). mailflow deferred all three in c-ares's words."""
    resolver = zone_resolver("example.test. 300 IN A 127.0.0.1",
                             rcodes={"formerr.test": "FORMERR", "refused.test": "REFUSED", "notimp.test": "NOTIMP"})
    results = [(await deliver(make_transport(resolver), make_request(nexthop, f"r@{nexthop}"))).results[0]
               for nexthop in ("formerr.test", "refused.test", "notimp.test")]
    said = "Host or domain name not found. Name service error for name={} type=MX: {}"
    assert [(r.outcome, r.dsn, r.text) for r in results] == [
        (Outcome.BOUNCED, "5.4.3", said.format("formerr.test", "Non-recoverable error")),
        (Outcome.DEFERRED, "4.4.3", said.format("refused.test", "Host not found, try again")),
        (Outcome.DEFERRED, "4.4.3", said.format("notimp.test", "Host not found, try again"))]


async def test_a_servfail_or_a_silent_name_server_is_worded_as_postfix(zone_resolver):
    """Postfix's dns_query reports the resolver's TRY_AGAIN (a SERVFAIL, a timeout) in dns_strerror's words."""
    servfail = zone_resolver("example.test. 300 IN A 127.0.0.1", servfail=("broken.test",))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        timeout = AiodnsResolver(nameservers=(f"127.0.0.1:{silent.getsockname()[1]}",), timeout=0.2, tries=1)
        try:
            results = [(await deliver(make_transport(resolver), make_request(nexthop))).results[0]
                       for resolver, nexthop in ((servfail, "broken.test"), (timeout, "silent.test"))]
        finally:
            await timeout.close()
    assert [(r.outcome, r.dsn, r.text) for r in results] == [
        (Outcome.DEFERRED, "4.4.3",
         "Host or domain name not found. Name service error for name=broken.test type=MX: Host not found, try again"),
        (Outcome.DEFERRED, "4.4.3",
         "Host or domain name not found. Name service error for name=silent.test type=MX: Host not found, try again"),
    ]


# ---------------------------------------------------------------------------------------------------- loops


@pytest.fixture
async def own_and_others(smtp_peer):
    """This server at 127.0.0.1 and two other MX hosts (127.0.0.2, 127.0.0.3), all listening on one port, the
    one this server's smtpd listens on (Postfix's loop detection is about port 25 only)."""
    me = await smtp_peer("127.0.0.1", free_port())
    others = [await smtp_peer(f"127.0.0.{n}", me.port) for n in (2, 3)]
    return me, others


def loop_transport(port: int, seed: int = 3, **mx: list[MX]) -> SmtpTransport:
    addresses = {"me.test": ["127.0.0.1"], "other.test": ["127.0.0.2"], "third.test": ["127.0.0.3"]}
    resolver = StaticResolver(mx={**mx, "ghost.test": []}, addresses=addresses)
    return make_transport(resolver, port=port, rng=random.Random(seed),
                          own_addresses=frozenset({ipaddress.ip_address("127.0.0.1")}), own_ports=frozenset({port}))


@pytest.mark.parametrize("records", [
    [MX(10, "me.test"), MX(20, "other.test")],
    [MX(10, "other.test"), MX(10, "me.test")],  # an equal preference is no better (RFC 5321 5.1)
])
async def test_mail_for_a_domain_whose_best_mx_is_this_server_bounces_as_a_loop(own_and_others, records):
    """Postfix's smtp_domain_addr: "mail for X loops back to myself", 5.4.6, and no MX host is tried."""
    me, others = own_and_others
    for seed in range(4):  # whichever of equal preferences comes first
        report = await deliver(loop_transport(me.port, seed, **{"example.test": records}), make_request("example.test"))
        [r] = report.results
        assert (r.outcome, r.dsn, r.text) == (Outcome.BOUNCED, "5.4.6", "mail for example.test loops back to myself")
    assert me.messages == others[0].messages == []


async def test_as_a_backup_mx_only_better_mx_hosts_are_tried(own_and_others):
    """Postfix's smtp_truncate_self: hosts at or after this server's preference are dropped; when no better one has
    an address, "unable to find primary relay", 4.4.4."""
    me, (other, third) = own_and_others
    other.handler.mail_reply = "451 4.3.0 later"
    records = [MX(10, "other.test"), MX(20, "me.test"), MX(30, "third.test")]
    deferred = await deliver(loop_transport(me.port, **{"example.test": records}), make_request("example.test"))
    assert (deferred.results[0].outcome, deferred.results[0].dsn) == (Outcome.DEFERRED, "4.3.0")
    assert third.messages == [] and me.messages == []
    other.handler.mail_reply = None
    sent = await deliver(loop_transport(me.port, **{"example.test": records}), make_request("example.test"))
    assert sent.results[0].relay == f"other.test[127.0.0.2]:{me.port}"
    no_primary = await deliver(loop_transport(me.port, **{"example.test": [MX(10, "ghost.test"), MX(20, "me.test")]}),
                               make_request("example.test"))
    [r] = no_primary.results
    assert (r.outcome, r.dsn, r.text) == (Outcome.DEFERRED, "4.4.4", "unable to find primary relay for example.test")


async def test_a_bracketed_next_hop_that_is_this_server_is_a_loop_but_another_port_is_not(own_and_others, smtp_peer):
    """Postfix's smtp_host_addr checks [host] too, on the SMTP port only: a content filter listening on this host
    at another port is no loop."""
    me, _ = own_and_others
    loop = await deliver(loop_transport(me.port), make_request("[127.0.0.1]"))
    assert (loop.results[0].dsn, loop.results[0].text) == ("5.4.6", "mail for 127.0.0.1 loops back to myself")
    content_filter = await smtp_peer("127.0.0.1")
    filtered = await deliver(loop_transport(me.port), make_request(f"[127.0.0.1]:{content_filter.port}"))
    assert filtered.results[0].outcome is Outcome.SENT and len(content_filter.messages) == 1


async def test_the_smtp_transport_takes_smtpds_listeners_as_itself(smtp_peer):
    """Wired from the configuration: smtpd's listener addresses and ports (here the peer stands in for it)."""
    peer = await smtp_peer("127.0.0.1")
    config = Config(smtpd={"listen": [f"127.0.0.1:{peer.port}"]}, smtp={"port": peer.port})
    smtp = build_transports(config, StaticResolver(), VirtualClock(), Router(config))["smtp"]
    report = await deliver(smtp, make_request("[127.0.0.1]"))
    assert report.results[0].dsn == "5.4.6" and peer.messages == []
    elsewhere = Config(smtpd={"listen": ["127.0.0.1:0"]}, smtp={"port": peer.port})  # its port is not this one
    smtp = build_transports(elsewhere, StaticResolver(), VirtualClock(), Router(elsewhere))["smtp"]
    report = await deliver(smtp, make_request("[127.0.0.1]"))
    assert report.results[0].outcome is Outcome.SENT and len(peer.messages) == 1


class ConcurrencyResolver(StaticResolver):
    """A StaticResolver that records the hosts whose addresses are asked for and the most lookups at once."""

    def __init__(self, **tables):
        super().__init__(**tables)
        self.asked: list[str] = []
        self.running = self.most = 0

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(host)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)
            return await super().addresses(host)
        finally:
            self.running -= 1


async def test_looking_for_this_server_among_the_mx_hosts_goes_by_preference_and_stops_early(own_and_others):
    """Postfix's smtp_find_self and smtp_truncate_self drop the hosts at and after this server's preference, so
    the loop check looks them up group by group: none after the group with this server, none once
    smtp_mx_address_limit addresses are known, and never a hostile MX set's hundred at once."""
    me, (other, _) = own_and_others
    crowd = [f"h{i}.test" for i in range(100)]
    addresses = {"me.test": ["127.0.0.1"], "other.test": ["127.0.0.2"], **{h: ["127.0.0.3"] for h in crowd}}
    own = dict(own_addresses=frozenset({ipaddress.ip_address("127.0.0.1")}), own_ports=frozenset({me.port}))
    backup = ConcurrencyResolver(mx={"example.test": [MX(10, "other.test"), MX(20, "me.test")]
                                     + [MX(30, h) for h in crowd]}, addresses=addresses)
    sent = await deliver(make_transport(backup, port=me.port, **own), make_request("example.test"))
    assert sent.results[0].relay == f"other.test[127.0.0.2]:{me.port}"
    assert backup.asked == ["other.test", "me.test"]
    enough = ConcurrencyResolver(mx={"example.test": [MX(10 + i, h) for i, h in enumerate(crowd)]},
                                 addresses=addresses)
    await deliver(make_transport(enough, port=me.port, **own), make_request("example.test"))
    assert enough.asked == crowd[:5]
    for seed in range(3):  # this server is among the MX_HOST_LIMIT hosts kept, wherever the shuffle puts it
        hostile = ConcurrencyResolver(mx={"example.test": [MX(10, h) for h in crowd[1:]] + [MX(10, "me.test")]},
                                      addresses=addresses)
        transport = make_transport(hostile, port=me.port, rng=random.Random(seed), **own)
        [r] = (await deliver(transport, make_request("example.test"))).results
        assert (r.dsn, r.text) == ("5.4.6", "mail for example.test loops back to myself")
        assert hostile.most <= 5


async def test_a_relayhost_that_does_not_resolve_or_loops_defers_4_3_5_as_postfix():
    """Postfix's smtp_connect_inet: a hard error before any session with the relayhost is a configuration problem
    (deferred 4.3.5, the diagnostic kept); the same next hop that is not the relayhost bounces. Deferred, it
    throttles the destination as any failure before a session does (smtp_connect's smtp_sess_fail)."""
    config = Config(relayhost="[relay.test]", smtpd={"listen": ["127.0.0.1:2525"]}, smtp={"port": 2525},
                    mydestination=("local.test",))
    resolver = StaticResolver(addresses={"me.test": ["127.0.0.1"]})
    smtp = build_transports(config, resolver, VirtualClock(), Router(config))["smtp"]
    text = "Host or domain name not found. Name service error for name=relay.test type=AAAA: Host not found"
    report = await deliver(smtp, make_request("[relay.test]"))
    [r] = report.results
    assert (r.outcome, r.dsn, r.text, report.site_ok) == (Outcome.DEFERRED, "4.3.5", text, False)
    report = await deliver(smtp, make_request("[relay.test]:2526"))  # not the relayhost as written
    assert (report.results[0].outcome, report.results[0].dsn, report.site_ok) == (Outcome.BOUNCED, "5.4.4", True)
    looping = Config(relayhost="me.test", smtpd={"listen": ["127.0.0.1:2525"]}, smtp={"port": 2525})
    smtp = build_transports(looping, resolver, VirtualClock(), Router(looping))["smtp"]
    report = await deliver(smtp, make_request("me.test"))
    [r] = report.results
    assert (r.outcome, r.dsn, r.text, report.site_ok) == (
        Outcome.DEFERRED, "4.3.5", "mail for me.test loops back to myself", False)


async def test_a_relayhost_whose_mx_hosts_did_not_resolve_after_a_dns_failure_is_no_configuration_problem(
        zone_resolver, caplog):
    """Postfix makes the relayhost's error 4.3.5 only when it is hard; a "not found" after a DNS failure is soft
    (4.4.4) and stays as it is, with no configuration warning."""
    resolver = zone_resolver("relay.test. 300 IN MX 10 broken.test.", "relay.test. 300 IN MX 20 gone.test.",
                             servfail=("broken.test",))
    smtp = SmtpTransport(SmtpConfig(), resolver=resolver, helo_name=HELO, relayhost="relay.test")
    with caplog.at_level(logging.WARNING, "mailflow.smtp"):
        [r] = (await deliver(smtp, make_request("relay.test"))).results
    assert (r.outcome, r.dsn, r.text) == (
        Outcome.DEFERRED, "4.4.4",
        "Host or domain name not found. Name service error for name=gone.test type=AAAA: Host not found")
    assert "relayhost configuration problem" not in caplog.text


# ---------------------------------------------------------------------------------------------------- refusals


async def test_per_recipient_refusals(smtp_peer):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@example.test"] = "550 5.1.1 <gone@example.test>: user unknown"
    peer.handler.rcpt_replies["full@example.test"] = "450 4.2.2 <full@example.test>: mailbox full"
    request = make_request(
        f"[127.0.0.1]:{peer.port}", "ok1@example.test", "gone@example.test", "full@example.test", "ok2@example.test"
    )
    report = await deliver(make_transport(), request)

    sent1, gone, full, sent2 = report.results
    assert report.site_ok
    assert (sent1.outcome, sent2.outcome) == (Outcome.SENT, Outcome.SENT)
    assert (gone.outcome, gone.dsn) == (Outcome.BOUNCED, "5.1.1")
    assert gone.text == (
        "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <gone@example.test>: user unknown (in reply to RCPT TO command)"
    )
    assert gone.relay == f"127.0.0.1[127.0.0.1]:{peer.port}"
    assert (full.outcome, full.dsn) == (Outcome.DEFERRED, "4.2.2")
    assert "450 4.2.2 <full@example.test>: mailbox full" in full.text
    assert peer.messages[0].rcpt_tos == ["ok1@example.test", "ok2@example.test"]


async def test_refusal_without_enhanced_code_gets_a_class_code(smtp_peer):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@example.test"] = "550 no such user"
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", "gone@example.test"))
    assert (report.results[0].outcome, report.results[0].dsn) == (Outcome.BOUNCED, "5.0.0")
    assert "said: 550 no such user (in reply to RCPT TO command)" in report.results[0].text


async def test_mail_from_refused_with_451_defers_everyone_site_ok(smtp_peer):
    peer = await smtp_peer()
    peer.handler.mail_reply = "451 4.3.0 try again later"
    request = make_request(f"[127.0.0.1]:{peer.port}", "a@example.test", "b@example.test")
    report = await deliver(make_transport(), request)
    assert report.site_ok
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.DEFERRED, "4.3.0")] * 2
    assert report.results[0].text.endswith("451 4.3.0 try again later (in reply to MAIL FROM command)")
    assert peer.messages == []


async def test_data_refused_with_554_bounces_accepted_recipients(smtp_peer):
    peer = await smtp_peer()
    peer.handler.data_reply = "554 5.6.0 content rejected"
    peer.handler.rcpt_replies["later@example.test"] = "450 4.2.0 later"
    request = make_request(f"[127.0.0.1]:{peer.port}", "a@example.test", "later@example.test")
    report = await deliver(make_transport(), request)
    assert report.site_ok
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.6.0"), (Outcome.DEFERRED, "4.2.0")]
    assert "554 5.6.0 content rejected" in report.results[0].text


async def test_421_mid_dialogue_defers_the_rest_as_site_failure(smtp_peer):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["a@example.test"] = "421 4.3.2 shutting down"
    request = make_request(f"[127.0.0.1]:{peer.port}", "a@example.test", "b@example.test")
    report = await deliver(make_transport(), request)
    first, second = report.results
    assert (first.outcome, first.dsn) == (Outcome.DEFERRED, "4.3.2")
    assert (second.outcome, second.dsn) == (Outcome.DEFERRED, "4.4.2")
    assert "lost connection with 127.0.0.1[127.0.0.1] while sending RCPT TO" in second.text
    assert not report.site_ok


async def test_address_with_crlf_is_refused_before_sending(smtp_peer):
    peer = await smtp_peer()
    request = make_request(f"[127.0.0.1]:{peer.port}", "ok@example.test", "evil@example.test>\r\nRCPT TO:<x@y.test")
    report = await deliver(make_transport(), request)
    ok, evil = report.results
    assert ok.outcome is Outcome.SENT
    assert (evil.outcome, evil.dsn) == (Outcome.BOUNCED, "5.1.3")
    assert peer.messages[0].rcpt_tos == ["ok@example.test"]


async def test_sender_with_nul_bounces_everyone_without_connecting():
    unused_port = free_port()
    request = make_request(f"[127.0.0.1]:{unused_port}", "a@example.test", "b@example.test", sender="a\x00@remote.test")
    report = await deliver(make_transport(), request)
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.7")] * 2


# ---------------------------------------------------------------------------------------------------- unreachable


async def test_connection_refused_everywhere_defers_with_site_not_ok(caplog):
    unused_port = free_port()
    resolver = StaticResolver(
        mx={"example.test": [MX(10, "mx1.example.test"), MX(20, "mx2.example.test")]},
        addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.1"]},
    )
    request = make_request(f"example.test:{unused_port}", "a@example.test", "b@example.test")
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        report = await deliver(make_transport(resolver), request)
    # each on a line of its own, at once, without the queue id (Postfix's smtp_connect: a connection's)
    peers = (("mx1.example.test", "127.0.0.2"), ("mx2.example.test", "127.0.0.1"))
    assert client_lines(caplog) == [f"connect to {mx}[{ip}]:{unused_port}: Connection refused" for mx, ip in peers]
    assert not report.site_ok
    assert [(r.outcome, r.dsn, r.relay) for r in report.results] == [(Outcome.DEFERRED, "4.4.1", "none")] * 2
    text = f"connect to mx2.example.test[127.0.0.1]:{unused_port}: Connection refused"
    assert report.results[0].text == text
    assert report.site_reason == text


def sliced(monkeypatch, turns) -> tuple[list[tuple[int, int]], list[int]]:
    """Two lists filled as a job's recipients fail: (loop turn, recipients) of each Outcomes.fail, and the loop
    turn of each result trouble.replaced stamps."""
    failed: list[tuple[int, int]] = []
    stamped: list[int] = []
    fail, replaced = trouble.Outcomes.fail, trouble.replaced
    monkeypatch.setattr(trouble.Outcomes, "fail", lambda self, rcpts, *args: failed.append(
        (turns.count, len(rcpts))) or fail(self, rcpts, *args))
    monkeypatch.setattr(trouble, "replaced", lambda result, **kw: stamped.append(turns.count) or replaced(
        result, **kw))
    return failed, stamped


async def test_a_dead_site_s_many_recipients_are_failed_and_reported_a_slice_a_turn(monkeypatch):
    """The results of a job of 50 000 recipients at a site that refused every connection were made in one loop
    turn (0.3 s) and its report in another (0.4 s): SLICE recipients a turn each, the same results."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    unused_port = free_port()
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    request = make_request(f"[127.0.0.1]:{unused_port}", *recipients)
    async with LoopTurns() as turns:
        failed, reported = sliced(monkeypatch, turns)
        report = await deliver(make_transport(), request)
    assert [size for _, size in failed] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in failed}) == 5, "the loop had no turn between the slices"
    assert len(reported) == 45 and len(set(reported)) == 5, "the loop had no turn between the slices"
    assert [r.recipient.address for r in report.results] == recipients
    text = f"connect to 127.0.0.1[127.0.0.1]:{unused_port}: Connection refused"
    assert {(r.outcome, r.dsn, r.text) for r in report.results} == {(Outcome.DEFERRED, "4.4.1", text)}
    assert not report.site_ok and len({id(r.conn) for r in report.results}) == 1


@pytest.mark.parametrize("path", ["a bad next hop", "a null MX", "a peer that hangs up at RCPT"])
async def test_every_way_a_job_s_recipients_fail_takes_a_slice_a_turn(monkeypatch, smtp_peer, zone_resolver, path):
    """A bad next hop, a null MX (DNS, loops, no relay: one path), a peer that hangs up in the transaction: each
    failed every recipient of the job in one loop turn (50 000: 0.18 s), and the hang-up stamped them all in
    another (0.22 s with `pending`): SLICE recipients a turn, the same results."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    resolver = zone_resolver("nullmx.test. 300 IN MX 0 .")
    if path == "a peer that hangs up at RCPT":
        peer = await smtp_peer()
        peer.handler.rcpt_replies[recipients[0]] = "421 4.3.2 shutting down"
        nexthop, failed_sizes = f"[127.0.0.1]:{peer.port}", [9, 10, 10, 10, 5]
    else:
        nexthop, failed_sizes = ("[127.0.0.1" if path == "a bad next hop" else "nullmx.test"), [10, 10, 10, 10, 5]
    async with LoopTurns() as turns:
        failed, stamped = sliced(monkeypatch, turns)
        report = await deliver(make_transport(resolver), make_request(nexthop, *recipients))
    assert [size for _, size in failed] == failed_sizes
    assert len({turn for turn, _ in failed}) == 5, "the loop had no turn between the slices"
    assert len(stamped) == 45 and len(set(stamped)) == 5, "the loop had no turn between the slices"
    assert [r.recipient.address for r in report.results] == recipients
    expected = {"a bad next hop": (Outcome.DEFERRED, "4.3.5"), "a null MX": (Outcome.BOUNCED, "5.1.10"),
                "a peer that hangs up at RCPT": (Outcome.DEFERRED, "4.4.2")}[path]
    assert {(r.outcome, r.dsn) for r in report.results[1:]} == {expected}


async def test_a_job_s_many_rcpt_commands_are_made_a_slice_a_turn(monkeypatch, smtp_peer):
    """The RCPT commands of a job of 50 000 recipients were made in one loop turn (0.24 s with DSN's parameters):
    SLICE a turn, then sent as before, in order, and every recipient delivered once."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    peer = await smtp_peer()
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    made: list[int] = []  # the loop turn of each RCPT command made
    rcpt_command = proto.rcpt_command
    async with LoopTurns() as turns:
        monkeypatch.setattr(proto, "rcpt_command", lambda *args, **kw: made.append(turns.count) or rcpt_command(
            *args, **kw))
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", *recipients))
    assert len(made) == 45 and len(set(made)) == 5, "the loop had no turn between the slices"
    assert [(r.recipient.address, r.outcome) for r in report.results] == [(a, Outcome.SENT) for a in recipients]
    assert [m.rcpt_tos for m in peer.handler.messages] == [recipients]


@contextlib.asynccontextmanager
async def batching_peer(mail_reply: bytes, rcpt_reply: bytes):
    """A PIPELINING peer that answers a pipelined group (MAIL, the RCPTs, DATA) in one write once DATA is in, as
    a Postfix smtpd whose input holds the whole group flushes its replies together: the client reads them all
    ahead, and has each without a wait. Its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        group: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-peer.test\r\n250 PIPELINING\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                group.append(mail_reply if verb == b"MAIL" else rcpt_reply)
            elif verb == b"DATA":
                going = mail_reply.startswith(b"2") and rcpt_reply.startswith(b"2")
                writer.write(b"".join(group) + (b"354 go ahead\r\n" if going else b"554 5.5.1 no recipients\r\n"))
                group = []
                if going:
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", ["accepted", "each refused", "MAIL refused"])
async def test_a_job_s_many_replies_are_taken_a_slice_a_turn(monkeypatch, answer):
    """One reply for all of a job's recipients (the end of DATA's, a refused MAIL's) made their results in one loop
    turn (50 000 accepted: 0.57 s), and the RCPT replies read ahead (had without a wait) were taken all in one:
    SLICE recipients a turn, the same results."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    mail, rcpt, outcome, sizes = {
        "accepted": (b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", Outcome.SENT, [10, 10, 10, 10, 5]),
        "each refused": (b"250 2.1.0 Ok\r\n", b"450 4.2.0 greylisted\r\n", Outcome.DEFERRED, [1] * 45),
        "MAIL refused": (b"451 4.3.0 later\r\n", b"250 2.1.5 Ok\r\n", Outcome.DEFERRED, [10, 10, 10, 10, 5])}[answer]
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    made: list[tuple[int, int]] = []  # (loop turn, results made from one reply)
    reply_results = proto.reply_results
    async with batching_peer(mail, rcpt) as port, LoopTurns() as turns:
        monkeypatch.setattr(proto, "reply_results", lambda recipients, *args, **kw: made.append(
            (turns.count, len(recipients))) or reply_results(recipients, *args, **kw))
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}", *recipients))
    assert [size for _, size in made] == sizes
    assert len({turn for turn, _ in made}) == 5, "the loop had no turn between the slices"
    assert [(r.recipient.address, r.outcome) for r in report.results] == [(a, outcome) for a in recipients]


async def test_the_rcpt_replies_a_refused_mail_leaves_are_read_a_slice_a_turn(monkeypatch):
    """A MAIL refused in a pipelined group leaves the RCPT replies read ahead to read (`_abandon_pipelined`): they
    came without a wait, all in one loop turn; SLICE a turn, every one read, the session then ended cleanly."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    recipients = [f"u{i:02d}@example.test" for i in range(45)]
    read: list[int] = []  # the loop turn of each RCPT reply read
    reply = chat.Session.reply

    async def reading(session, timeout, activity):
        if activity == proto.RCPT:
            read.append(turns.count)
        return await reply(session, timeout, activity)

    async with batching_peer(b"451 4.3.0 later\r\n", b"250 2.1.5 Ok\r\n") as port, LoopTurns() as turns:
        monkeypatch.setattr(chat.Session, "reply", reading)
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}", *recipients))
    assert len(read) == 45 and len(set(read)) >= 5, "the loop had no turn between the slices"
    assert {(r.outcome, r.dsn) for r in report.results} == {(Outcome.DEFERRED, "4.3.0")} and report.site_ok


class CountingResolver(StaticResolver):
    """A StaticResolver that counts its address lookups."""

    lookups = 0

    async def addresses(self, host: str) -> list[str]:
        self.lookups += 1
        return await super().addresses(host)


async def test_a_huge_mx_set_is_tried_for_five_addresses_and_looked_up_for_at_most_100_hosts():
    """Postfix's smtp_mx_address_limit (5 addresses per delivery) and dns_rr_list_limit (100 records): 1000 MX
    records make neither 1000 connections nor 1000 lookups."""
    connections = []

    async def busy(reader, writer):
        connections.append(1)
        writer.write(b"421 4.3.2 busy\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(busy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hosts = [f"mx{i}.example.test" for i in range(1000)]
    reachable = CountingResolver(mx={"example.test": [MX(10, h) for h in hosts]},
                                 addresses={h: ["127.0.0.1"] for h in hosts})
    unknown = CountingResolver(mx={"example.test": [MX(10, h) for h in hosts]})  # no MX host exists
    try:
        busy_report = await deliver(make_transport(reachable), make_request(f"example.test:{port}"))
        unknown_report = await deliver(make_transport(unknown), make_request(f"example.test:{port}"))
    finally:
        server.close()
    assert (len(connections), reachable.lookups) == (5, 5)
    [r] = busy_report.results
    assert (r.outcome, r.dsn) == (Outcome.DEFERRED, "4.3.2")
    assert r.text.endswith("[127.0.0.1] refused to talk to me: 421 4.3.2 busy")
    assert unknown.lookups == 100
    assert (unknown_report.results[0].outcome, unknown_report.results[0].dsn) == (Outcome.BOUNCED, "5.4.4")


async def test_silent_peer_times_out_and_defers():
    async def silent(reader, writer):
        await reader.read()  # never greets; returns when the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        report = await deliver(make_transport(timeout=0.3), make_request(f"[127.0.0.1]:{port}"))
    finally:
        server.close()
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.2")
    assert result.text == "conversation with 127.0.0.1[127.0.0.1] timed out while receiving the initial server greeting"
    assert not report.site_ok


async def test_bad_nexthop_defers_as_configuration_error():
    report = await deliver(make_transport(), make_request("[unclosed:25"))
    assert (report.results[0].outcome, report.results[0].dsn) == (Outcome.DEFERRED, "4.3.5")


# ---------------------------------------------------------------------------------------------- peers for what follows


class CountingSMTP(AiosmtpdSMTP):
    """aiosmtpd's server, recording each connection in `opened` (and whether it is still open)."""

    def __init__(self, opened: list, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opened.append(self)


@dataclass
class CountedPeer:
    port: int
    handler: CaptureHandler
    opened: list
    server: asyncio.AbstractServer

    @property
    def messages(self):
        return self.handler.messages

    @property
    def connections(self) -> int:
        return len(self.opened)

    @property
    def still_open(self) -> int:
        return sum(1 for s in self.opened if s.transport is not None)

    def hang_up_all(self) -> None:
        for session in self.opened:
            if session.transport is not None:
                session.transport.close()


@pytest.fixture
async def counted_peer():
    """Like smtp_peer, but counts connections (aiosmtpd sessions): `.connections`, `.still_open`."""
    started: list[CountedPeer] = []
    loop = asyncio.get_running_loop()

    async def start(host: str = "127.0.0.1", port: int = 0, **smtp_kwargs) -> CountedPeer:
        handler, opened = CaptureHandler(), []
        smtp_kwargs.setdefault("hostname", "peer.test")
        server = await loop.create_server(lambda: CountingSMTP(opened, handler, **smtp_kwargs), host, port)
        peer = CountedPeer(server.sockets[0].getsockname()[1], handler, opened, server)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.hang_up_all()
        peer.server.close()
        await peer.server.wait_closed()


class ScriptedPeer:
    """A line-level SMTP server for what aiosmtpd cannot be told to do: offer PIPELINING and prove it is used
    (`hold_mail_reply`: MAIL is answered only once every RCPT of the transaction has arrived, so a client that
    waits for each reply never gets one), stay silent at one command (`silent_at`), refuse by address, refuse
    the end of data (`dot_replies`, one per message, then 250) and keep a refused transaction open until RSET
    (`refusal_keeps_transaction`: aiosmtpd does when its DATA handler fails), answer RSET with `rset_reply`, only
    once the next command has come (`hold_rset_reply`: a client that waits for it before MAIL never gets it)."""

    def __init__(self, extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"), *, hold_mail_reply=0,
                 silent_at: str = "", mail_reply="250 2.1.0 Ok", rcpt_replies=None, dot_replies=(),
                 refusal_keeps_transaction=False, rset_reply="250 2.0.0 Ok", hold_rset_reply=False):
        self.extensions = extensions
        self.hold_mail_reply = hold_mail_reply
        self.silent_at = silent_at
        self.mail_reply = mail_reply
        self.rcpt_replies = rcpt_replies or {}
        self.dot_replies = list(dot_replies)
        self.refusal_keeps_transaction = refusal_keeps_transaction
        self.rset_reply = rset_reply
        self.hold_rset_reply = hold_rset_reply
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.hang_up_all()
        self.server.close()
        await self.server.wait_closed()

    def hang_up_all(self, last_words: bytes = b"") -> None:
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(last_words)
                writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        held: list[bytes] = []
        accepted: int | None = None  # recipients accepted in the transaction; None: no MAIL yet
        stuck = False  # a refused transaction kept open (refusal_keeps_transaction) until RSET
        rset_held = b""  # RSET's reply, until the next command (hold_rset_reply)
        try:
            writer.write(b"220 scripted.test ESMTP\r\n")
            while line := await reader.readline():
                command = line.decode().strip()
                self.commands.append(command)
                verb = command.split(" ", 1)[0].upper()
                writer.write(rset_held)
                rset_held = b""
                if self.silent_at and command.upper().startswith(self.silent_at):
                    await reader.read()  # until the client gives up
                    return
                if verb == "EHLO":
                    lines = ["scripted.test", *self.extensions, "HELP"]
                    writer.write("".join(f"250-{x}\r\n" for x in lines[:-1]).encode() + f"250 {lines[-1]}\r\n".encode())
                elif verb == "MAIL" and stuck:
                    writer.write(b"503 5.5.1 Error: nested MAIL command\r\n")
                elif verb == "MAIL":
                    accepted = 0 if self.mail_reply.startswith("2") else None
                    held = [self.mail_reply.encode() + b"\r\n"]
                    if not self.hold_mail_reply:
                        writer.write(held.pop())
                elif verb == "RCPT":
                    address = command.split(":", 1)[1].strip().strip("<>")
                    reply = self.rcpt_replies.get(address, "250 2.1.5 Ok")
                    if accepted is None:
                        reply = "503 5.5.1 Error: need MAIL command"
                    if reply.startswith("2"):
                        accepted += 1
                    if held:
                        held.append(reply.encode() + b"\r\n")
                        if len(held) > self.hold_mail_reply:
                            writer.write(b"".join(held))
                            held = []
                    else:
                        writer.write(reply.encode() + b"\r\n")
                elif verb == "DATA":
                    if not accepted:
                        writer.write(b"554 5.5.1 Error: no valid recipients\r\n")
                        continue
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    content = b""
                    while (data_line := await reader.readline()) not in (b".\r\n", b""):
                        content += data_line
                    self.messages.append(content)
                    accepted = None
                    if self.silent_at == "END OF DATA":
                        await reader.read()
                        return
                    reply = self.dot_replies.pop(0) if self.dot_replies else "250 2.0.0 Ok: queued"
                    stuck = self.refusal_keeps_transaction and not reply.startswith("2")
                    writer.write(reply.encode() + b"\r\n")
                elif verb == "RSET":
                    accepted, stuck = None, False
                    if self.hold_rset_reply:
                        rset_held = self.rset_reply.encode() + b"\r\n"
                    else:
                        writer.write(self.rset_reply.encode() + b"\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def scripted_peer():
    started: list[ScriptedPeer] = []

    async def start(**kwargs) -> tuple[ScriptedPeer, int]:
        peer = ScriptedPeer(**kwargs)
        started.append(peer)
        return peer, await peer.start()

    yield start
    for peer in started:
        await peer.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def ca_file(ca: trustme.CA, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def mx_resolver(*hosts: str, domain: str = "example.test") -> StaticResolver:
    """`domain` with MX records for `hosts` in order (all at 127.0.0.1 unless a host is given as name=ip)."""
    pairs = [h.partition("=")[::2] for h in hosts]
    return StaticResolver(
        mx={domain: [MX(10 * (i + 1), name) for i, (name, _) in enumerate(pairs)]},
        addresses={name: [ip or "127.0.0.1"] for name, ip in pairs},
    )


# ---------------------------------------------------------------------------------------------------- TLS policy


async def test_encrypt_without_starttls_defers_4_7_4(smtp_peer):
    peer = await smtp_peer()
    report = await deliver(make_transport(tls="encrypt"), make_request(f"[127.0.0.1]:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.4")
    assert result.text == "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert not report.site_ok
    assert peer.messages == []


async def test_encrypt_skips_an_mx_without_starttls(smtp_peer, ca):
    plain = await smtp_peer("127.0.0.2")
    secure = await smtp_peer("127.0.0.1", plain.port, tls_context=server_tls(ca, "whatever.test"))
    resolver = mx_resolver("plain.example.test=127.0.0.2", "secure.example.test=127.0.0.1")
    report = await deliver(make_transport(resolver, tls="encrypt"), make_request(f"example.test:{plain.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"secure.example.test[127.0.0.1]:{plain.port}"
    assert (plain.messages, [m.tls for m in secure.messages]) == ([], [True])


async def test_verify_accepts_a_trusted_certificate_naming_the_mx_host(smtp_peer, ca, tmp_path):
    peer = await smtp_peer(tls_context=server_tls(ca, "mx.example.test"))
    transport = make_transport(mx_resolver("mx.example.test"), tls="verify", tls_ca_file=ca_file(ca, tmp_path))
    report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.messages[0].tls and peer.messages[0].content == CONTENT


def client_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailflow.smtp"]


async def test_verify_refuses_a_certificate_for_another_name(smtp_peer, ca, tmp_path, caplog):
    """Postfix's status text, and the reason on a line of its own (tls_verify.c's, OpenSSL's error 62)."""
    peer = await smtp_peer(tls_context=server_tls(ca, "other.test"))
    transport = make_transport(mx_resolver("mx.example.test"), tls="verify", tls_ca_file=ca_file(ca, tmp_path))
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.7.5", "Server certificate not verified")
    assert client_lines(caplog) == [f"server certificate verification failed for mx.example.test[127.0.0.1]:"
                                    f"{peer.port}: num=62:hostname mismatch"]
    assert not report.site_ok
    assert peer.messages == []


async def test_verify_refuses_a_certificate_from_an_unknown_ca(smtp_peer, ca, tmp_path, caplog):
    peer = await smtp_peer(tls_context=server_tls(trustme.CA(), "mx.example.test"))
    transport = make_transport(mx_resolver("mx.example.test"), tls="verify", tls_ca_file=ca_file(ca, tmp_path))
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.7.5", "Server certificate not verified")
    assert client_lines(caplog) == [f"certificate verification failed for mx.example.test[127.0.0.1]:{peer.port}: "
                                    f"untrusted issuer <unknown>"]
    assert peer.messages == []


async def test_secure_refuses_a_self_signed_certificate(smtp_peer, ca, tmp_path, caplog):
    """OpenSSL's error 18, in tls_verify.c's words."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*self_signed(tmp_path))
    peer = await smtp_peer(tls_context=context)
    transport = make_transport(mx_resolver("mx.example.test"), tls="secure", tls_ca_file=ca_file(ca, tmp_path))
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    assert report.results[0].text == "Server certificate not verified"
    assert client_lines(caplog) == [f"certificate verification failed for mx.example.test[127.0.0.1]:{peer.port}: "
                                    f"self-signed certificate"]


def self_signed(tmp_path) -> tuple[str, str]:
    """A self-signed certificate (a CA's own, which names no host) and its key: the two files' paths."""
    other = trustme.CA()
    cert_path, key_path = tmp_path / "self.pem", tmp_path / "self.key"
    other.cert_pem.write_to_path(str(cert_path))
    other.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("loglevel", [0, 1])
async def test_the_tls_summary_line_is_written_from_tls_loglevel_1(smtp_peer, ca, tmp_path, caplog, loglevel):
    """Postfix's smtp_tls_loglevel: 0 (the default) writes no line for a session that went well."""
    peer = await smtp_peer(tls_context=server_tls(ca, "mx.example.test"))
    transport = make_transport(mx_resolver("mx.example.test"), tls="verify", tls_ca_file=ca_file(ca, tmp_path),
                               tls_loglevel=loglevel)
    with caplog.at_level(logging.INFO, "mailflow.smtp"):
        report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    summaries = [line for line in client_lines(caplog) if " TLS connection established to " in line]
    assert [line.partition(": TLSv1")[0] for line in summaries] == [
        f"Verified TLS connection established to mx.example.test[127.0.0.1]:{peer.port}"][:loglevel]


async def test_verify_of_a_bracketed_nexthop_matches_the_host(smtp_peer, ca, tmp_path):
    peer = await smtp_peer(tls_context=server_tls(ca, "relay.example.test"))
    resolver = StaticResolver(addresses={"relay.example.test": ["127.0.0.1"]})
    transport = make_transport(resolver, tls="verify", tls_ca_file=ca_file(ca, tmp_path))
    report = await deliver(transport, make_request(f"[relay.example.test]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT


async def test_policy_table_raises_the_level_for_the_subdomains_of_a_dot_entry(smtp_peer):
    peer = await smtp_peer()  # no STARTTLS
    resolver = StaticResolver(addresses={"example.test": ["127.0.0.1"], "sub.example.test": ["127.0.0.1"]})
    policy = ("inline:{ .example.test=encrypt }",)
    sub = await deliver(make_transport(resolver, port=peer.port, tls_policy_maps=policy),
                        make_request("sub.example.test"))
    parent = await deliver(make_transport(resolver, port=peer.port, tls_policy_maps=policy),
                           make_request("example.test"))
    assert (sub.results[0].outcome, sub.results[0].dsn) == (Outcome.DEFERRED, "4.7.4")
    assert parent.results[0].outcome is Outcome.SENT  # ".example.test" covers subdomains only
    assert len(peer.messages) == 1


async def test_policy_table_key_is_the_nexthop_as_written(smtp_peer, ca, tmp_path):
    peer = await smtp_peer(tls_context=server_tls(ca, "other.test"))
    key = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(
        tls="verify", tls_ca_file=ca_file(ca, tmp_path),
        tls_policy_maps=(f"inline:{{ {{{key} = verify match=other.test}} }}",),
    )
    report = await deliver(transport, make_request(key))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.messages[0].tls


async def test_policy_none_turns_tls_off_for_one_nexthop(smtp_peer, ca):
    peer = await smtp_peer(tls_context=server_tls(ca, "peer.test"))
    key = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="encrypt", tls_policy_maps=(f"inline:{{ {{{key} = none}} }}",))
    report = await deliver(transport, make_request(key))
    assert report.results[0].outcome is Outcome.SENT
    assert not peer.messages[0].tls


async def test_unusable_policy_defers_without_connecting():
    unused_port = free_port()
    key = f"[127.0.0.1]:{unused_port}"
    transport = make_transport(tls_policy_maps=(f"inline:{{ {{{key} = fingerprint}} }}",))
    report = await deliver(transport, make_request(key))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.0")
    assert result.text.startswith("client TLS configuration problem: unsupported TLS security level 'fingerprint'")
    assert report.site_ok  # our configuration, not the destination


async def test_may_falls_back_to_plaintext_when_the_handshake_fails(counted_peer):
    broken = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
    peer = await counted_peer(tls_context=broken)
    report = await deliver(make_transport(tls="may"), make_request(f"[127.0.0.1]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert [m.tls for m in peer.messages] == [False]
    assert peer.connections == 2  # the failed TLS attempt, then plaintext


async def test_may_sends_new_mail_in_plaintext_only_once_it_has_waited_the_minimal_backoff(counted_peer):
    """Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE: a failed handshake defers mail queued for less
    than minimal_backoff_time (4.7.5, the peer's relay); its retry, later, goes in plaintext."""
    peer = await counted_peer(tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    nexthop = f"[127.0.0.1]:{peer.port}"
    report = await deliver(make_transport(tls="may", plaintext_after=300), make_request(nexthop, queued_for=1.5))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")
    assert result.text == "Cannot start TLS: handshake failure"
    assert result.relay == f"127.0.0.1[127.0.0.1]:{peer.port}" and not report.site_ok
    assert (peer.connections, peer.messages) == (1, [])
    report = await deliver(make_transport(tls="may", plaintext_after=300), make_request(nexthop, queued_for=300))
    assert report.results[0].outcome is Outcome.SENT and [m.tls for m in peer.messages] == [False]


async def test_no_reply_to_starttls_fails_the_conversation_and_is_not_retried_in_plaintext(scripted_peer):
    """A timeout waiting for the reply to STARTTLS (starttls_timeout) is the conversation's failure, as Postfix's
    smtp_stream_except words it, not TLS's: at level may, even for mail that has waited long enough for a
    plaintext retry after a failed handshake, the peer is not tried again in plaintext."""
    peer, port = await scripted_peer(extensions=("STARTTLS", "PIPELINING"), silent_at="STARTTLS")
    transport = make_transport(tls="may", plaintext_after=0, starttls_timeout=0.5)
    report = await deliver(transport, make_request(f"[127.0.0.1]:{port}", queued_for=300))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.2")
    assert result.text == "conversation with 127.0.0.1[127.0.0.1] timed out while receiving the STARTTLS response"
    assert (peer.connections, peer.messages) == (1, [])


async def test_encrypt_handshake_failure_defers_4_7_5(counted_peer):
    peer = await counted_peer(tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    report = await deliver(make_transport(tls="encrypt"), make_request(f"[127.0.0.1]:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")
    assert result.text == "Cannot start TLS: handshake failure"  # Postfix's words (relay= names the peer)
    assert (peer.connections, peer.messages) == (1, [])


async def test_may_continues_in_plaintext_when_starttls_is_refused(scripted_peer):
    peer, port = await scripted_peer(extensions=("STARTTLS", "PIPELINING"))  # answers STARTTLS with 502
    report = await deliver(make_transport(tls="may"), make_request(f"[127.0.0.1]:{port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.connections == 1 and "STARTTLS" in peer.commands


async def test_encrypt_refused_starttls_by_the_last_peer_bounces_with_the_reply(scripted_peer):
    """A 5xx to STARTTLS when TLS is required is a hard error of that peer: with no other peer left the mail
    bounces with it (Postfix smtp_site_fail at the final server); the peer is the recipient's relay."""
    peer, port = await scripted_peer(extensions=("STARTTLS",))
    report = await deliver(make_transport(tls="encrypt"), make_request(f"[127.0.0.1]:{port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn, result.relay) == (Outcome.BOUNCED, "5.5.2", f"127.0.0.1[127.0.0.1]:{port}")
    assert result.text == ("TLS is required, but host 127.0.0.1[127.0.0.1] refused to start TLS: "
                           "502 5.5.2 Error: command not recognized")
    assert report.site_ok and peer.messages == []


@contextlib.asynccontextmanager
async def helo_refused_by_mx1(smtp_peer, zone_resolver):
    """(resolver, port, good peer): example.test's MX 10 (127.0.0.2) refuses EHLO and HELO with 5xx, its MX 20
    (127.0.0.3) is a good peer on the same port; single.test has only MX 10."""
    refusing = await asyncio.start_server(refuse_helo, "127.0.0.2", 0)
    port = refusing.sockets[0].getsockname()[1]
    try:
        good = await smtp_peer("127.0.0.3", port)
        yield zone_resolver("example.test. 300 IN MX 10 mx1.example.test.",
                            "example.test. 300 IN MX 20 mx2.example.test.",
                            "mx1.example.test. 300 IN A 127.0.0.2", "mx2.example.test. 300 IN A 127.0.0.3",
                            "single.test. 300 IN MX 10 mx1.example.test."), port, good
    finally:
        refusing.close()


async def test_a_5xx_to_helo_bounces_at_once_and_no_other_peer_is_tried(smtp_peer, zone_resolver):
    """EHLO and HELO refused with 5xx: the mail bounces with that reply, MX 20 is not tried (Postfix's
    smtp_bulk_fail bounces a hard error wherever it comes from); a 5xx greeting is skipped like a 4xx."""
    async with helo_refused_by_mx1(smtp_peer, zone_resolver) as (resolver, port, good):
        report = await deliver(make_transport(resolver, port=port), make_request("example.test"))
        result = report.results[0]
        assert (result.outcome, result.dsn, result.relay) == (Outcome.BOUNCED, "5.5.4",
                                                              f"mx1.example.test[127.0.0.2]:{port}")
        assert result.text == "host mx1.example.test[127.0.0.2] refused to talk to me: 501 5.5.4 not you"
        assert report.site_ok and good.messages == []


async def test_under_soft_bounce_a_5xx_to_helo_tries_the_next_peer(smtp_peer, zone_resolver, caplog):
    """Postfix's smtp_bulk_fail with soft_bounce: the hard handshake error of a server that is not the final one is
    soft (logged on its own line), so MX 20 gets the mail; the final server's stands."""
    async with helo_refused_by_mx1(smtp_peer, zone_resolver) as (resolver, port, good):
        with caplog.at_level(logging.INFO, "mailflow.smtp"):
            report = await deliver(make_transport(resolver, port=port, soft_bounce=True),
                                   make_request("example.test"))
        single = await deliver(make_transport(resolver, port=port, soft_bounce=True), make_request("single.test"))
    assert (report.results[0].outcome, report.results[0].relay) == (Outcome.SENT, f"mx2.example.test[127.0.0.3]:{port}")
    assert len(good.messages) == 1
    assert "Q1: host mx1.example.test[127.0.0.2] refused to talk to me: 501 5.5.4 not you" in caplog.messages
    assert (single.results[0].outcome, single.results[0].dsn) == (Outcome.BOUNCED, "5.5.4")


async def test_a_refused_greeting_or_helo_is_followed_by_quit_as_postfix_says_it():
    heard: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 go away\r\n" if not heard else b"220 peer.test\r\n")
        heard.append(b"(greeting)")
        while line := await reader.readline():
            heard.append(line)
            writer.write(b"550 5.7.1 no\r\n")
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for _ in range(2):  # a 554 greeting; then EHLO and HELO refused
            report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}"))
            assert report.results[0].outcome is not Outcome.SENT
        await eventually(lambda: heard.count(b"QUIT\r\n") == 2, timeout=2)
    finally:
        server.close()
    assert heard == [b"(greeting)", b"QUIT\r\n", b"(greeting)", b"EHLO client.mailflow.test\r\n",
                     b"HELO client.mailflow.test\r\n", b"QUIT\r\n"]


async def refuse_helo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 refusing.test ESMTP\r\n")
    while line := await reader.readline():
        writer.write(b"500 5.5.1 no\r\n" if line.startswith(b"EHLO") else b"501 5.5.4 not you\r\n")
    writer.close()


async def test_client_certificate_is_presented_when_configured(smtp_peer, ca, tmp_path):
    context = server_tls(ca, "peer.test")
    context.verify_mode = ssl.CERT_REQUIRED  # the peer insists on a client certificate from its CA
    ca.configure_trust(context)
    peer = await smtp_peer(tls_context=context)
    ca.issue_cert("client.mailflow.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    transport = make_transport(tls="encrypt", tls_cert_file=str(tmp_path / "client.pem"))
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert peer.messages[0].tls


async def test_unreadable_ca_file_defers_before_sending_in_the_clear(smtp_peer, ca, tmp_path):
    peer = await smtp_peer(tls_context=server_tls(ca, "peer.test"))
    transport = make_transport(tls="verify", tls_ca_file=str(tmp_path / "missing.pem"))
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.5")
    assert result.text.startswith("TLS is required, but our TLS engine is unavailable")
    assert report.site_ok and peer.messages == []


async def test_a_policy_table_that_cannot_answer_defers_4_3_0():
    unused_port = free_port()
    report = await deliver(make_transport(tls_policy_maps=("fail:policy",)), make_request(f"[127.0.0.1]:{unused_port}"))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.0")
    assert result.text.startswith(f"TLS policy lookup for [127.0.0.1]:{unused_port}:")
    assert report.site_ok


# ---------------------------------------------------------------------------------------------------- AUTH


class Authenticator:
    """aiosmtpd authenticator accepting one user/password; records every attempt as (mechanism, user, password).
    A refusal must be AuthResult(success=False, handled=False) or aiosmtpd sends no reply at all."""

    def __init__(self, user: str = "relayuser", password: str = "s3cret:with colon"):
        self.accepted = (user.encode(), password.encode())
        self.attempts: list[tuple[str, str, str]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        self.attempts.append((mechanism, auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=(auth_data.login, auth_data.password) == self.accepted, handled=False)


async def relay_peer(counted_peer, ca, **kwargs):
    auth = Authenticator()
    peer = await counted_peer(tls_context=server_tls(ca, "relay.test"), require_starttls=True, authenticator=auth,
                              auth_required=True, **kwargs)
    return peer, auth


def passwords(*entries: tuple[str, str]) -> tuple[str, ...]:
    return ("inline:{ " + ", ".join(f"{{{key} = {value}}}" for key, value in entries) + " }",)


async def test_auth_plain_to_a_relay_after_starttls(counted_peer, ca):
    peer, auth = await relay_peer(counted_peer, ca)
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="may", sasl_password_maps=passwords((nexthop, "relayuser:s3cret:with colon")))
    report = await deliver(transport, make_request(nexthop))
    assert report.results[0].outcome is Outcome.SENT
    assert auth.attempts == [("PLAIN", "relayuser", "s3cret:with colon")]
    assert peer.messages[0].tls


async def test_auth_credentials_are_found_by_mx_host_name(counted_peer, ca):
    peer, auth = await relay_peer(counted_peer, ca)
    transport = make_transport(mx_resolver("smarthost.example.test"), tls="may",
                               sasl_password_maps=passwords(("smarthost.example.test", "relayuser:s3cret:with colon")))
    report = await deliver(transport, make_request(f"example.test:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert len(auth.attempts) == 1


async def test_auth_refused_defers_with_the_servers_words_as_4xx(counted_peer, ca):
    peer, auth = await relay_peer(counted_peer, ca)
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="may", sasl_password_maps=passwords((nexthop, "relayuser:wrong")))
    report = await deliver(transport, make_request(nexthop))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.8")
    assert result.text == ("SASL authentication failed; server 127.0.0.1[127.0.0.1] said: "
                           "535 5.7.8 Authentication credentials invalid")
    assert not report.site_ok
    assert peer.messages == []


async def test_auth_password_is_not_sent_without_tls(counted_peer):
    auth = Authenticator()
    peer = await counted_peer(authenticator=auth, auth_required=True, auth_require_tls=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="may", sasl_password_maps=passwords((nexthop, "relayuser:s3cret:with colon")))
    report = await deliver(transport, make_request(nexthop))
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.7.0")
    assert result.text == ("SASL authentication failed; cannot authenticate to server 127.0.0.1[127.0.0.1]: "
                           "the session is not encrypted (sasl_tls_required)")
    assert auth.attempts == []


async def test_auth_over_plaintext_when_allowed(counted_peer):
    auth = Authenticator()
    peer = await counted_peer(authenticator=auth, auth_required=True, auth_require_tls=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(sasl_tls_required=False,
                               sasl_password_maps=passwords((nexthop, "relayuser:s3cret:with colon")))
    report = await deliver(transport, make_request(nexthop))
    assert report.results[0].outcome is Outcome.SENT
    assert auth.attempts == [("PLAIN", "relayuser", "s3cret:with colon")]


async def test_no_credentials_for_the_destination_means_no_auth(counted_peer):
    auth = Authenticator()
    peer = await counted_peer(authenticator=auth, auth_require_tls=False)
    transport = make_transport(sasl_tls_required=False, sasl_password_maps=passwords(("[elsewhere.test]", "a:b")))
    report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    assert report.results[0].outcome is Outcome.SENT
    assert auth.attempts == []


async def test_may_does_not_fall_back_to_plaintext_when_it_would_authenticate(counted_peer):
    peer = await counted_peer(tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                              authenticator=Authenticator(), auth_require_tls=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="may", sasl_password_maps=passwords((nexthop, "relayuser:x")))
    report = await deliver(transport, make_request(nexthop))
    assert (report.results[0].outcome, report.results[0].dsn) == (Outcome.DEFERRED, "4.7.5")
    assert peer.connections == 1


async def test_auth_login_when_plain_is_not_offered(counted_peer, ca):
    peer, auth = await relay_peer(counted_peer, ca, auth_exclude_mechanism=["PLAIN"])
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(tls="may", sasl_password_maps=passwords((nexthop, "relayuser:s3cret:with colon")))
    report = await deliver(transport, make_request(nexthop))
    assert report.results[0].outcome is Outcome.SENT
    assert auth.attempts == [("LOGIN", "relayuser", "s3cret:with colon")]


async def test_a_password_table_that_cannot_answer_defers_4_3_0(counted_peer):
    peer = await counted_peer(authenticator=Authenticator(), auth_require_tls=False)
    report = await deliver(make_transport(sasl_password_maps=("fail:passwords",)),
                           make_request(f"[127.0.0.1]:{peer.port}"))
    assert (report.results[0].outcome, report.results[0].dsn) == (Outcome.DEFERRED, "4.3.0")
    assert report.site_ok and peer.messages == []


async def test_sender_dependent_authentication_logs_in_as_each_senders_account_on_a_session_of_its_own(counted_peer):
    """Postfix's smtp_sender_dependent_authentication: sasl_password_maps by the envelope sender (user@domain, then
    @domain) before the next hop; a cached session serves mail from its own sender only (Postfix keys its connection
    cache by sender then); the null sender and an unlisted one use the next hop's credentials."""
    auth = Authenticator()
    accounts = {(b"alice", b"pw-a"), (b"acct", b"pw-d"), (b"relayuser", b"pw-r")}

    def any_account(server, session, envelope, mechanism, auth_data):
        auth(server, session, envelope, mechanism, auth_data)  # (recorded)
        return AuthResult(success=(auth_data.login, auth_data.password) in accounts, handled=False)

    peer = await counted_peer(authenticator=any_account, auth_require_tls=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    config = SmtpConfig(tls_security_level="none", sasl_tls_required=False, sender_dependent_authentication=True,
                        sasl_password_maps=passwords(("alice@acct.test", "alice:pw-a"), ("@acct.test", "acct:pw-d"),
                                                     (nexthop, "relayuser:pw-r")))
    keys = partial(address_search, delimiter="+")
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name=HELO, sender_keys=keys)
    senders = ["alice@acct.test", "bob@acct.test", "alice@acct.test", "", "carol@plain.test", "alice+tag@acct.test"]
    reports = await deliver_several(transport, *(make_request(nexthop, sender=s) for s in senders))
    assert [r.results[0].outcome for r in reports] == [Outcome.SENT] * 6
    assert [user for _, user, _ in auth.attempts] == ["alice", "acct", "relayuser", "relayuser", "alice"]
    assert peer.connections == 5  # alice's second message took her cached session; "" and carol each their own


async def test_a_pattern_password_table_is_asked_the_sender_the_host_and_the_next_hop(counted_peer, tmp_path):
    """Postfix's smtp_sasl_passwd_lookup asks a regexp or pcre table the sender (mail_addr_find's FULL keys: the
    address quoted, then in internal form), the host name, then the next hop as written (maps_find: FULL). mailflow
    asked such a table the quoted sender and the host name only."""
    auth = Authenticator()
    accounts = {(b"acct", b"pw-d"), (b"relayuser", b"pw-r")}

    def any_account(server, session, envelope, mechanism, auth_data):
        auth(server, session, envelope, mechanism, auth_data)  # (recorded)
        return AuthResult(success=(auth_data.login, auth_data.password) in accounts, handled=False)

    peer = await counted_peer(authenticator=any_account, auth_require_tls=False)
    nexthop = f"[127.0.0.1]:{peer.port}"
    table = tmp_path / "passwords.regexp"
    table.write_text(f"/^a b@acct\\.test$/ acct:pw-d\n/^\\[127\\.0\\.0\\.1\\]:{peer.port}$/ relayuser:pw-r\n")
    config = SmtpConfig(tls_security_level="none", sasl_tls_required=False, sender_dependent_authentication=True,
                        sasl_password_maps=(f"regexp:{table}",))
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name=HELO,
                              sender_keys=partial(address_search, delimiter="+", form=EXTERNAL_FIRST))
    reports = await deliver_several(transport, *(make_request(nexthop, sender=s)
                                                 for s in ('"a b"@acct.test', "carol@plain.test")))
    assert [r.results[0].outcome for r in reports] == [Outcome.SENT] * 2
    assert [user for _, user, _ in auth.attempts] == ["acct", "relayuser"]


def test_the_servers_sender_keys_are_mail_addr_finds_and_only_when_sender_dependent_authentication_is_on():
    from mailflow.transports import sasl_sender_keys

    on = Config(mydestination=("local.test",), smtp={"sender_dependent_authentication": True,
                                                     "sasl_password_maps": ["inline:{a=b}"]})
    keys = sasl_sender_keys(on.smtp, Router(on))
    assert keys("al+x@local.test") == (["al+x@local.test", "al@local.test", "al+x", "al", "@local.test"], (0,))
    assert keys("al+x@remote.test") == (["al+x@remote.test", "al@remote.test", "@remote.test"], (0,))
    assert keys('"a b"@remote.test') == (['"a b"@remote.test', "a b@remote.test", "@remote.test"], (0, 1))
    assert sasl_sender_keys(Config(smtp={"sasl_password_maps": ["inline:{a=b}"]}).smtp, Router(Config())) is None
    assert sasl_sender_keys(Config(smtp={"sender_dependent_authentication": True}).smtp, Router(Config())) is None


# ---------------------------------------------------------------------------------------------------- connection cache


async def deliver_several(transport: SmtpTransport, *requests: DeliveryRequest):
    """Deliver one request after the other on one transport (the connection cache lives between them)."""
    try:
        return [await asyncio.wait_for(transport.deliver(r), 5) for r in requests]
    finally:
        await transport.close()


async def test_one_connection_carries_several_messages_and_close_quits_it(counted_peer):
    peer = await counted_peer()
    transport = make_transport()
    nexthop = f"[127.0.0.1]:{peer.port}"
    reports = [await transport.deliver(make_request(nexthop, f"r{i}@example.test")) for i in range(3)]
    assert [r.results[0].outcome for r in reports] == [Outcome.SENT] * 3
    assert (peer.connections, peer.still_open) == (1, 1)
    await transport.close()
    await eventually(lambda: peer.still_open == 0, timeout=2)
    assert [m.rcpt_tos for m in peer.messages] == [["r0@example.test"], ["r1@example.test"], ["r2@example.test"]]


async def test_reuse_count_limit_bounds_the_uses_of_one_connection(counted_peer):
    peer = await counted_peer()
    nexthop = f"[127.0.0.1]:{peer.port}"
    reports = await deliver_several(make_transport(connection_reuse_count_limit=1),
                                    *(make_request(nexthop) for _ in range(5)))
    assert all(r.results[0].outcome is Outcome.SENT for r in reports)
    assert peer.connections == 3  # limit N: each connection is used N+1 times


async def test_a_transaction_s_results_carry_its_session_set_up_time_and_use(counted_peer):
    """Postfix's conn_setup_done and reuse_count, for the log's `delays=` (c, d) and `conn_use=`: the time on the
    clock given (qmgr's) as MAIL FROM goes out, and which use of its connection the transaction was; without a
    session, the time of the failure, as Postfix's smtp_bulk_fail dates a set-up that never ended (its time is c,
    not d)."""
    peer = await counted_peer()
    nexthop = f"[127.0.0.1]:{peer.port}"
    ticks = iter(range(100, 110))
    transport = make_transport(connection_reuse_count_limit=1, now=lambda: float(next(ticks)))
    reports = await deliver_several(transport, *(make_request(nexthop, "a@example.test", "b@example.test")
                                                 for _ in range(3)))
    assert [[(r.outcome, r.conn) for r in report.results] for report in reports] == [
        [(Outcome.SENT, ConnStats(100.0, 1))] * 2, [(Outcome.SENT, ConnStats(101.0, 2))] * 2,
        [(Outcome.SENT, ConnStats(102.0, 1))] * 2]  # (the limit: a new connection for the third)
    refused = await deliver(make_transport(now=lambda: 200.0), make_request(f"[127.0.0.1]:{free_port()}"))
    assert [(r.outcome, r.conn) for r in refused.results] == [(Outcome.DEFERRED, ConnStats(200.0, 1))]


async def test_idle_session_is_closed_after_the_cache_time_limit(counted_peer):
    peer = await counted_peer()
    transport = make_transport(connection_cache_time_limit=0.2)
    try:
        await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}"))
        assert peer.still_open == 1
        await eventually(lambda: peer.still_open == 0, timeout=2)
        await transport.deliver(make_request(f"[127.0.0.1]:{peer.port}"))
    finally:
        await transport.close()
    assert (peer.connections, len(peer.messages)) == (2, 2)


async def test_cache_off_quits_after_each_message(counted_peer):
    peer = await counted_peer()
    nexthop = f"[127.0.0.1]:{peer.port}"
    transport = make_transport(connection_cache_time_limit=0)
    try:
        await transport.deliver(make_request(nexthop))
        await eventually(lambda: peer.still_open == 0, timeout=2)
        await transport.deliver(make_request(nexthop))
    finally:
        await transport.close()
    assert peer.connections == 2


async def test_sessions_are_cached_per_nexthop(counted_peer):
    first, second = await counted_peer(), await counted_peer()
    reports = await deliver_several(make_transport(), make_request(f"[127.0.0.1]:{first.port}"),
                                    make_request(f"[127.0.0.1]:{second.port}"),
                                    make_request(f"[127.0.0.1]:{first.port}"))
    assert all(r.results[0].outcome is Outcome.SENT for r in reports)
    assert (first.connections, second.connections) == (1, 1)
    assert (len(first.messages), len(second.messages)) == (2, 1)


async def test_a_cached_session_the_peer_dropped_is_replaced_without_a_failure(scripted_peer):
    peer, port = await scripted_peer()
    transport = make_transport()
    try:
        await transport.deliver(make_request(f"[127.0.0.1]:{port}"))
        peer.hang_up_all(b"421 4.4.2 scripted.test Error: timeout exceeded\r\n")
        await asyncio.sleep(0.05)
        report = await transport.deliver(make_request(f"[127.0.0.1]:{port}"))
    finally:
        await transport.close()
    assert report.site_ok
    assert report.results[0].outcome is Outcome.SENT
    assert (peer.connections, len(peer.messages)) == (2, 2)


async def test_a_cached_session_that_dies_at_mail_from_is_replaced(scripted_peer):
    peer, port = await scripted_peer(extensions=("8BITMIME",))  # no PIPELINING: MAIL goes alone
    transport = make_transport(timeout=0.3)
    try:
        await transport.deliver(make_request(f"[127.0.0.1]:{port}"))
        peer.silent_at = "MAIL"  # the cached connection now never answers MAIL: it dies by timeout
        delivery = asyncio.create_task(transport.deliver(make_request(f"[127.0.0.1]:{port}")))
        await eventually(lambda: sum(c.startswith("MAIL") for c in peer.commands) == 2, timeout=2)
        peer.silent_at = ""  # the fresh connection works
        report = await asyncio.wait_for(delivery, 5)
    finally:
        await transport.close()
    assert report.site_ok and report.results[0].outcome is Outcome.SENT
    assert (peer.connections, len(peer.messages)) == (2, 2)


async def test_rset_after_an_unfinished_transaction_before_reuse(scripted_peer):
    peer, port = await scripted_peer(rcpt_replies={"gone@example.test": "550 5.1.1 no such user"})
    reports = await deliver_several(make_transport(), make_request(f"[127.0.0.1]:{port}", "gone@example.test"),
                                    make_request(f"[127.0.0.1]:{port}", "ok@example.test"))
    assert [r.results[0].outcome for r in reports] == [Outcome.BOUNCED, Outcome.SENT]
    assert peer.connections == 1
    # RSET after the refused RCPT (before caching), then the RSET probe of the reuse, pipelined with MAIL
    assert peer.commands[4:8] == ["RSET", "RSET", "MAIL FROM:<a@remote.test>", "RCPT TO:<ok@example.test>"]


async def test_rset_after_a_refused_end_of_data_before_reuse(scripted_peer):
    """A refused end of data ends the transaction: no RSET before caching (Postfix's SMTP_STATE_DOT). A peer that
    keeps it anyway (aiosmtpd when its handler fails) is cleared by the RSET probe before the session is reused,
    or the next message's MAIL would get 503 and bounce."""
    peer, port = await scripted_peer(dot_replies=["554 5.7.1 no thanks"], refusal_keeps_transaction=True)
    reports = await deliver_several(make_transport(), make_request(f"[127.0.0.1]:{port}", "a@example.test"),
                                    make_request(f"[127.0.0.1]:{port}", "b@example.test"))
    assert [r.results[0].outcome for r in reports] == [Outcome.BOUNCED, Outcome.SENT]
    assert peer.connections == 1 and peer.commands.count("RSET") == 1  # (the reuse's RSET probe alone)


async def test_a_session_whose_rset_reply_was_garbled_is_not_kept(scripted_peer):
    """Postfix caches no session after a reply with garbage in it, RSET's (the one before caching: every recipient
    refused, the transaction left open) too."""
    peer, port = await scripted_peer(rcpt_replies={"a@example.test": "550 5.1.1 no such user"},
                                     rset_reply="oops\r\n250 2.0.0 Ok")
    reports = await deliver_several(make_transport(), make_request(f"[127.0.0.1]:{port}", "a@example.test"),
                                    make_request(f"[127.0.0.1]:{port}", "b@example.test"))
    assert [r.results[0].outcome for r in reports] == [Outcome.BOUNCED, Outcome.SENT]
    assert peer.connections == 2 and peer.commands.count("RSET") == 1


async def deliver_twice(peer: ScriptedPeer, port: int, transport: SmtpTransport, between=None):
    """One message, then (after `between(peer)`) another over the cached session: the second's report."""
    try:
        await transport.deliver(make_request(f"[127.0.0.1]:{port}", "one@example.test"))
        if between is not None:
            between(peer)
        return await asyncio.wait_for(transport.deliver(make_request(f"[127.0.0.1]:{port}", "two@example.test")), 5)
    finally:
        await transport.close()


def transaction(rcpt: str) -> list[str]:
    return ["MAIL FROM:<a@remote.test>", f"RCPT TO:<{rcpt}>", "DATA"]


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME"), ("8BITMIME",)], ids=["pipelined", "lone"])
async def test_a_cached_session_is_reused_after_its_rset_probe_as_postfix_s(scripted_peer, extensions):
    """Postfix's smtp_reuse_common: RSET before every reuse of a cached session (smtp_rset)."""
    peer, port = await scripted_peer(extensions=extensions)
    report = await deliver_twice(peer, port, make_transport())
    assert report.site_ok and report.results[0].outcome is Outcome.SENT
    assert peer.connections == 1
    assert peer.commands[1:8] == [*transaction("one@example.test"), "RSET", *transaction("two@example.test")]


async def test_to_a_pipelining_peer_the_rset_probe_goes_with_mail_rcpt_and_data_in_one_round_trip(scripted_peer):
    """RFC 2920: RSET may be anywhere in a group. The peer answers RSET only once MAIL has come: a client that
    waited for RSET's reply (as Postfix's does) would time out, drop the session and open another."""
    peer, port = await scripted_peer(hold_rset_reply=True)
    report = await deliver_twice(peer, port, make_transport(timeout=0.5))
    assert report.site_ok and report.results[0].outcome is Outcome.SENT
    assert peer.connections == 1 and peer.commands.count("RSET") == 1


async def test_without_pipelining_the_rset_probe_waits_for_its_reply(scripted_peer):
    """As Postfix's: RSET alone; MAIL only after its reply (a peer that holds it back gets no MAIL on that session:
    the probe times out, the session is dropped and the message goes over a new one)."""
    peer, port = await scripted_peer(extensions=("8BITMIME",), hold_rset_reply=True)
    report = await deliver_twice(peer, port, make_transport(timeout=0.3))
    assert report.site_ok and report.results[0].outcome is Outcome.SENT
    assert peer.connections == 2
    assert peer.commands[peer.commands.index("RSET") + 1] == "EHLO client.mailflow.test"  # (the new session's)


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME"), ("8BITMIME",)], ids=["pipelined", "lone"])
@pytest.mark.parametrize("rset_reply", ["421 4.3.2 Shutting down", "452 4.3.1 Busy", "502 5.5.2 No RSET", None],
                         ids=["421", "4xx", "5xx", "silent"])
async def test_a_cached_session_that_fails_its_rset_probe_is_dropped_without_a_deferral(scripted_peer, extensions,
                                                                                        rset_reply, caplog):
    """Postfix's smtp_reuse_common: a session whose probe fails (a reply other than 2xx, none in time, a lost
    connection) is not used; the message goes over a new one, nothing deferred, no failure counted, no line
    logged but debug ones (smtp_rset fails quietly)."""
    peer, port = await scripted_peer(extensions=extensions)

    def probe_fails(peer: ScriptedPeer) -> None:
        if rset_reply is None:
            peer.silent_at = "RSET"
        else:
            peer.rset_reply = rset_reply

    with caplog.at_level(logging.INFO, "mailflow"):
        report = await deliver_twice(peer, port, make_transport(timeout=0.3), probe_fails)
    assert report.site_ok and [(r.outcome, r.conn.use) for r in report.results] == [(Outcome.SENT, 1)]
    assert peer.connections == 2
    assert [m for m in peer.messages if m] == [CONTENT.replace(b"\r\n.", b"\r\n..")] * 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []


@pytest.mark.parametrize("extensions", [("PIPELINING", "8BITMIME"), ("8BITMIME",)], ids=["pipelined", "lone"])
async def test_one_cached_session_at_most_is_probed_per_delivery(scripted_peer, extensions):
    """Postfix's smtp_reuse_nexthop: one cached session per lookup, its RSET probe, then a new session. A peer whose
    idle sessions all stop answering RSET costs a delivery one probe timeout, not one per cached session."""
    peer, port = await scripted_peer(extensions=extensions)
    transport = make_transport(timeout=0.4)
    nexthop = f"[127.0.0.1]:{port}"
    try:
        first = await asyncio.gather(*(transport.deliver(make_request(nexthop, f"u{n}@example.test"))
                                       for n in range(3)))
        assert [r.results[0].outcome for r in first] == [Outcome.SENT] * 3 and peer.connections == 3
        peer.silent_at = "RSET"
        started = asyncio.get_running_loop().time()
        report = await asyncio.wait_for(transport.deliver(make_request(nexthop, "late@example.test")), 5)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await transport.close()
    assert report.site_ok and [(r.outcome, r.conn.use) for r in report.results] == [(Outcome.SENT, 1)]
    assert peer.commands.count("RSET") == 1 and peer.connections == 4
    assert elapsed < 3 * 0.4  # one probe timeout (0.4s), not three (the rest is headroom for a loaded host)


# ---------------------------------------------------------------------------------------------------- PIPELINING


async def test_pipelining_sends_mail_and_every_rcpt_before_reading(scripted_peer):
    # The peer answers MAIL only after all three RCPTs arrived: a client waiting for each reply would time out.
    peer, port = await scripted_peer(hold_mail_reply=3, rcpt_replies={"b@example.test": "550 5.1.1 unknown"})
    request = make_request(f"[127.0.0.1]:{port}", "a@example.test", "b@example.test", "c@example.test")
    report = await deliver(make_transport(timeout=1.0), request)
    assert [(r.outcome, r.dsn) for r in report.results] == [
        (Outcome.SENT, "2.0.0"), (Outcome.BOUNCED, "5.1.1"), (Outcome.SENT, "2.0.0")]
    assert "550 5.1.1 unknown (in reply to RCPT TO command)" in report.results[1].text
    assert peer.messages == [CONTENT.replace(b"\r\n.", b"\r\n..")]


async def test_pipelined_rcpt_replies_after_a_refused_mail_are_read_and_the_session_reused(scripted_peer):
    peer, port = await scripted_peer(mail_reply="451 4.3.0 try later")
    transport = make_transport()
    try:
        first = await transport.deliver(make_request(f"[127.0.0.1]:{port}", "a@example.test", "b@example.test"))
        peer.mail_reply = "250 2.1.0 Ok"
        second = await transport.deliver(make_request(f"[127.0.0.1]:{port}", "a@example.test"))
    finally:
        await transport.close()
    assert [r.dsn for r in first.results] == ["4.3.0", "4.3.0"]
    assert second.results[0].outcome is Outcome.SENT
    assert peer.connections == 1


async def test_without_pipelining_each_command_waits_for_its_reply(scripted_peer):
    peer, port = await scripted_peer(extensions=("8BITMIME",), hold_mail_reply=1)
    report = await deliver(make_transport(timeout=0.3), make_request(f"[127.0.0.1]:{port}"))
    assert report.results[0].text == "conversation with 127.0.0.1[127.0.0.1] timed out while sending MAIL FROM"
    assert peer.commands[-1].startswith("MAIL FROM")  # RCPT never went out ahead of the reply


# ---------------------------------------------------------------------------------------------------- stage timeouts


async def test_each_stage_names_itself_when_it_times_out(scripted_peer):
    expected = {
        "EHLO": "performing the EHLO handshake",
        "RCPT": "sending RCPT TO",
        "DATA": "sending DATA command",
        "END OF DATA": "sending end of data -- message may be sent more than once",
    }
    for silent_at, activity in expected.items():
        peer, port = await scripted_peer(silent_at=silent_at)
        report = await deliver(make_transport(timeout=0.2), make_request(f"[127.0.0.1]:{port}"))
        result = report.results[0]
        assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.2"), silent_at
        assert result.text == f"conversation with 127.0.0.1[127.0.0.1] timed out while {activity}"
        assert not report.site_ok


async def test_connect_timeout_bounds_the_tcp_connection():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once the queue is full, new connections hang in SYN
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        config = SmtpConfig(connect_timeout=0.3, helo_timeout=5, command_timeout=5)
        transport = SmtpTransport(config, resolver=StaticResolver(), helo_name=HELO)
        try:
            report = await deliver(transport, make_request(f"[127.0.0.1]:{port}"))
        finally:
            for filler in fillers:
                filler.close()
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.1")
    assert result.text == f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection timed out"
    assert not report.site_ok


async def test_data_timeout_bounds_the_end_of_data_reply_only(scripted_peer):
    peer, port = await scripted_peer(silent_at="END OF DATA")
    config = SmtpConfig(command_timeout=5, helo_timeout=5, data_timeout=0.2)
    transport = SmtpTransport(config, resolver=StaticResolver(), helo_name=HELO)
    started = asyncio.get_running_loop().time()
    report = await deliver(transport, make_request(f"[127.0.0.1]:{port}"))
    assert "timed out while sending end of data" in report.results[0].text
    assert asyncio.get_running_loop().time() - started < 2


# ---------------------------------------------------------------------------------------------------- 8BITMIME


EIGHT_BIT_MIME = (
    b"From: a@remote.test\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= menu\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XYZ\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Le caf\xc3\xa9 est pr\xc3\xaat.\r\n"
    b".\r\n"
    b"--XYZ\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAwQ=\r\n"
    b"--XYZ--\r\n"
    b"epilogue\r\n"
)


async def test_8bitmime_goes_as_it_is_to_a_peer_that_offers_it(smtp_peer):
    peer = await smtp_peer()
    await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", content=EIGHT_BIT_MIME,
                                                  body_type="8BITMIME"))
    assert peer.messages[0].content == EIGHT_BIT_MIME
    assert "BODY=8BITMIME" in peer.messages[0].mail_options


async def test_8bitmime_is_converted_to_quoted_printable_for_a_peer_without_it(smtp_peer):
    import email

    peer = await smtp_peer(decode_data=True)  # aiosmtpd offers 8BITMIME only when it does not decode
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}", content=EIGHT_BIT_MIME,
                                                           body_type="8BITMIME"))
    assert report.results[0].outcome is Outcome.SENT
    received = peer.messages[0].content
    assert not any(o.startswith("BODY=") for o in peer.messages[0].mail_options)
    assert received.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nLe caf=C3=A9 est pr=C3=AAt.\r\n" in received
    assert b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n--XYZ--\r\nepilogue\r\n" in received
    text_part = email.message_from_bytes(received).get_payload()[0]
    assert text_part.get_payload(decode=True) == "Le café est prêt.\r\n.".encode()  # its last CRLF: the boundary's


async def test_content_labelled_8bit_is_converted_for_a_peer_without_8bitmime_whatever_body_the_client_gave(
        scripted_peer):
    """A client that said nothing about a message with a part labelled 8bit: Postfix's smtp client converts it for
    a peer without 8BITMIME (seen with a private Postfix 3.7.11); mailflow sent the 8-bit bytes to the 7-bit peer
    as they were. (One that said BODY=7BIT: cleanup marks it 8BITMIME by the label, as Postfix's does.)"""
    peer, port = await scripted_peer(extensions=("ENHANCEDSTATUSCODES",))
    report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}", content=EIGHT_BIT_MIME))
    assert report.results[0].outcome is Outcome.SENT
    [received] = peer.messages
    assert received.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nLe caf=C3=A9 est pr=C3=AAt.\r\n" in received


async def test_a_message_said_7bit_goes_with_body_7bit_and_unconverted(scripted_peer):
    """Postfix's smtp_proto passes BODY=7BIT on to a peer that offers 8BITMIME and converts nothing for one that
    does not (SMTP_MIME_DOWNGRADE: not for encoding 7bit); SIZE is announced to both."""
    content = b"Subject: x\r\n\r\nsaid 7BIT, caf\xc3\xa9\r\n"
    plain, port = await scripted_peer(extensions=("SIZE 10240000",))
    taking, port_8bit = await scripted_peer(extensions=("SIZE 10240000", "8BITMIME"))
    for port_ in (port, port_8bit):
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port_}", content=content,
                                                               body_type="7BIT"))
        assert report.results[0].outcome is Outcome.SENT
    assert [c for c in plain.commands if c.startswith("MAIL")] == [f"MAIL FROM:<a@remote.test> SIZE={len(content)}"]
    assert [c for c in taking.commands if c.startswith("MAIL")] == [
        f"MAIL FROM:<a@remote.test> SIZE={len(content)} BODY=7BIT"]
    assert plain.messages == taking.messages == [content]


async def test_size_is_not_announced_for_content_that_is_converted_on_the_way(scripted_peer):
    """The size of converted content is not the size queued: Postfix's smtp_proto ("Don't announce SIZE if we're
    going to MIME downgrade") leaves SIZE out then, as a private Postfix 3.7.11 did to a peer without 8BITMIME."""
    converting, port = await scripted_peer(extensions=("SIZE 10240000",))
    taking, port_8bit = await scripted_peer(extensions=("SIZE 10240000", "8BITMIME"))
    for port_ in (port, port_8bit):
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port_}", content=EIGHT_BIT_MIME,
                                                               body_type="8BITMIME"))
        assert report.results[0].outcome is Outcome.SENT
    [mail] = [c for c in converting.commands if c.startswith("MAIL")]
    assert mail == "MAIL FROM:<a@remote.test>"
    [mail] = [c for c in taking.commands if c.startswith("MAIL")]
    assert mail == f"MAIL FROM:<a@remote.test> SIZE={len(EIGHT_BIT_MIME)} BODY=8BITMIME"


async def test_a_peer_offering_smtputf8_without_8bitmime_gets_8bit_content_as_it_is(scripted_peer, caplog):
    """RFC 6531 3.1: a server that offers SMTPUTF8 takes 8-bit content. Postfix's smtp_proto (Fix 20140706) takes
    such a server as offering 8BITMIME, logs it, and sends BODY=8BITMIME with the content unconverted."""
    peer, port = await scripted_peer(extensions=("SMTPUTF8", "ENHANCEDSTATUSCODES"))
    with caplog.at_level("INFO"):
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}", content=EIGHT_BIT_MIME,
                                                               body_type="8BITMIME"))
    assert report.results[0].outcome is Outcome.SENT
    [mail] = [c for c in peer.commands if c.startswith("MAIL")]
    assert mail.endswith(" BODY=8BITMIME")
    assert peer.messages[0] == EIGHT_BIT_MIME.replace(b"\r\n.\r\n", b"\r\n..\r\n")  # (as sent: dot-stuffed)
    # smtp_proto.c's line, without a queue id (a private Postfix 3.7.11's lmtp wrote it so; smtp shares the code)
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.smtp"] == [
        "host 127.0.0.1[127.0.0.1] offers SMTPUTF8 support, but not 8BITMIME"]


# ---------------------------------------------------------------------------------------------------- big messages

async def test_a_spooled_message_is_streamed_dot_stuffed_and_arrives_byte_exact(smtp_peer, tmp_path):
    data = big_message(long_line=False)
    peer = await smtp_peer()
    request = DeliveryRequest("Q1", "a@remote.test", (Recipient(0, "b@example.test", "b@example.test"),),
                              f"[127.0.0.1]:{peer.port}", spooled(tmp_path, data))
    [result] = (await deliver(make_transport(), request)).results
    assert result.outcome is Outcome.SENT
    assert peer.messages[0].content == data


async def test_a_spooled_8bit_message_is_converted_on_the_way_for_a_peer_without_8bitmime(smtp_peer, tmp_path):
    head = b"Subject: 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    body = big_message(long_line=False).split(b"\r\n\r\n", 1)[1]
    data = head + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
    peer = await smtp_peer(decode_data=True)  # aiosmtpd offers 8BITMIME only when it does not decode
    request = DeliveryRequest("Q1", "a@remote.test", (Recipient(0, "b@example.test", "b@example.test"),),
                              f"[127.0.0.1]:{peer.port}", spooled(tmp_path, data), body_type="8BITMIME")
    [result] = (await deliver(make_transport(), request)).results
    assert result.outcome is Outcome.SENT
    received = peer.messages[0].content
    assert received.isascii() and b"Content-Transfer-Encoding: quoted-printable" in received
    assert quopri.decodestring(received.split(b"\r\n\r\n", 1)[1]) == body


# ---------------------------------------------------------------------------------------------------- hostile peers


async def line_server(session) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def garbling_peer(mail_reply: bytes, sessions: list[list[bytes]]):
    """A peer that greets with a garbage line first, offers PIPELINING and answers MAIL with `mail_reply`; what it
    heard in each session goes to `sessions`."""
    async def garbling(reader, writer):
        heard: list[bytes] = []
        sessions.append(heard)
        writer.write(b"Welcome, friend\r\n220 garbled.test ESMTP\r\n")
        in_data = False
        while line := await reader.readline():
            heard.append(line)
            verb = line[:4].upper()
            if in_data:
                in_data = line != b".\r\n"
                if not in_data:
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"EHLO":
                writer.write(b"250-garbled.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                writer.write(mail_reply)
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                in_data = True
            elif verb == b"QUIT":
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        writer.close()

    return garbling


async def test_a_line_that_is_no_reply_is_read_past_warned_of_and_the_session_not_kept(caplog):
    """Postfix's smtp_chat_resp: garbage before a reply is part of it (the reply's code stands), a warning names it
    when PIPELINING is on, and the session is not cached (DONT_CACHE_THIS_SESSION): QUIT, a new one next time."""
    sessions: list[list[bytes]] = []
    server, port = await line_server(garbling_peer(b"hello, this is not SMTP\r\n250 2.1.0 Ok\r\n", sessions))
    transport = make_transport(connection_cache_time_limit=30.0)
    try:
        with caplog.at_level(logging.WARNING, logger="mailflow.smtp"):
            reports = [await transport.deliver(make_request(f"[127.0.0.1]:{port}")) for _ in range(2)]
        await eventually(lambda: len(sessions) == 2 and all(heard[-1] == b"QUIT\r\n" for heard in sessions),
                         timeout=2, what="each message its own session, ended by QUIT")
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert [r.results[0].outcome for r in reports] == [Outcome.SENT, Outcome.SENT]
    assert caplog.messages == [f"Q1: non-ESMTP response from 127.0.0.1[127.0.0.1]:{port}: hello, this is not SMTP"] * 2


async def test_each_garbage_line_is_warned_of_printable_and_a_reply_s_many_in_a_few_lines(caplog):
    """Postfix warns of every garbage line (its smtp_chat_resp warns in its read loop), the text made printable;
    mailflow warns of the first GARBAGE_KEPT lines of a reply and counts the rest in one line: a peer that sends
    a reply of a thousand garbage lines makes a few lines of log, not a thousand."""
    junk = [b"first \x1b[31mred", b"second"] + [b"more junk"] * 10
    server, port = await line_server(garbling_peer(b"\r\n".join(junk) + b"\r\n250 2.1.0 Ok\r\n", []))
    transport = make_transport()
    try:
        with caplog.at_level(logging.WARNING, logger="mailflow.smtp"):
            report = await transport.deliver(make_request(f"[127.0.0.1]:{port}"))
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()
    assert report.results[0].outcome == Outcome.SENT
    relay = f"127.0.0.1[127.0.0.1]:{port}"
    assert caplog.messages == [f"Q1: non-ESMTP response from {relay}: first ?[31mred",
                               f"Q1: non-ESMTP response from {relay}: second",
                               f"Q1: non-ESMTP response from {relay}: more junk",
                               f"Q1: 9 more non-ESMTP response lines from {relay}"]


async def test_a_dripping_greeting_is_cut_by_helo_timeout_and_a_reset_is_a_lost_connection():
    """The timeout bounds the whole reply, not each read (Postfix's smtp_per_record_deadline): a peer that sends one
    byte at a time keeps nobody past helo_timeout. A connection reset before the greeting is a lost one."""
    async def dripping(reader, writer):
        with contextlib.suppress(ConnectionError):
            for byte in b"220 drip.test ESMTP slowly\r\n" * 10:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.02)
        writer.close()

    async def resetting(reader, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        writer.close()

    results = []
    for session in (dripping, resetting):
        server, port = await line_server(session)
        started = asyncio.get_running_loop().time()
        try:
            report = await deliver(make_transport(timeout=0.3), make_request(f"[127.0.0.1]:{port}"))
        finally:
            server.close()
            await server.wait_closed()
        assert asyncio.get_running_loop().time() - started < 1.5
        results.append((report.results[0].outcome, report.results[0].dsn, report.results[0].text, report.site_ok))
    assert results == [
        (Outcome.DEFERRED, "4.4.2", "conversation with 127.0.0.1[127.0.0.1] timed out while receiving the initial "
                                    "server greeting", False),
        (Outcome.DEFERRED, "4.4.2", "lost connection with 127.0.0.1[127.0.0.1] while receiving the initial server "
                                    "greeting", False)]


async def test_a_reply_that_never_ends_defers_naming_it_and_fails_the_site():
    async def endless(reader, writer):
        writer.write(b"220 endless.test ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-endless.test\r\n250 8BITMIME\r\n")
            elif line.startswith(b"MAIL"):
                with contextlib.suppress(ConnectionError):
                    while True:  # 250- forever, but that much is not a reply
                        writer.write(b"250-more\r\n" * 100)
                        await writer.drain()
        writer.close()

    server, port = await line_server(endless)
    try:
        report = await deliver(make_transport(), make_request(f"[127.0.0.1]:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.5.0")
    assert result.text == ("host 127.0.0.1[127.0.0.1] sent a malformed reply while sending MAIL FROM: "
                           "reply too long (over 1000 lines)")
    assert not report.site_ok


async def test_a_reply_line_that_never_ends_is_no_reply_and_holds_neither_memory_nor_another_delivery(smtp_peer):
    """EHLO answered "250 " and 100 MB with no line end: Postfix's smtp_get reads past the rest of an overlong line
    before it returns it, so the EHLO reply never comes and the helo timeout defers the mail at the handshake (not
    at a MAIL FROM sent after a reply taken as complete). Nothing past the line limit is kept, and a delivery to
    another peer meanwhile is sent."""
    async def endless_line(reader, writer):
        writer.write(b"220 endless.test ESMTP\r\n")
        await reader.readline()
        with contextlib.suppress(ConnectionError):
            writer.write(b"250 ")
            for _ in range(100):
                writer.write(b"x" * 1_000_000)
                await writer.drain()
            await reader.read()
        writer.close()

    server, port = await line_server(endless_line)
    good = await smtp_peer()
    tracemalloc.start()
    try:
        started = asyncio.get_running_loop().time()
        endless, other = await asyncio.gather(
            deliver(make_transport(timeout=1.0), make_request(f"[127.0.0.1]:{port}")),
            deliver(make_transport(timeout=1.0), make_request(f"[127.0.0.1]:{good.port}")))
        elapsed = asyncio.get_running_loop().time() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        server.close()
        await server.wait_closed()
    result = endless.results[0]
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.DEFERRED, "4.4.2", "conversation with 127.0.0.1[127.0.0.1] timed out while performing the EHLO "
                                   "handshake")
    assert elapsed < 3 and peak < 10_000_000, (elapsed, peak)  # (the peer's own writes are 1 MB each)
    assert other.results[0].outcome == Outcome.SENT and len(good.messages) == 1


async def test_plaintext_sent_with_the_starttls_reply_is_never_read_as_a_reply(ca):
    """CVE-2011-0411, client side: bytes that arrive with "220 go ahead" (injected by a man in the middle) must
    not answer the commands sent after the TLS handshake (RFC 3207 4.2)."""
    context = server_tls(ca, "peer.test")
    seen: list[str] = []

    async def injecting(reader, writer):
        writer.write(b"220 inject.test ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode().strip()
            seen.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                writer.write(b"250-inject.test\r\n250 STARTTLS\r\n" if len(seen) == 1 else b"250 inject.test\r\n")
            elif verb == "STARTTLS":
                writer.write(b"220 go ahead\r\n250-injected\r\n250 INJECTED\r\n")
                await writer.drain()
                await writer.start_tls(context)
            elif verb in ("MAIL", "RCPT"):
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == "DATA":
                writer.write(b"354 go\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 Ok: queued over TLS\r\n")
            elif verb == "QUIT":
                break
            await writer.drain()
        writer.close()

    server, port = await line_server(injecting)
    try:
        report = await deliver(make_transport(tls="encrypt"), make_request(f"[127.0.0.1]:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    assert (report.results[0].outcome, report.results[0].text) == (Outcome.SENT, "250 2.0.0 Ok: queued over TLS")
    assert [c.split(" ")[0] for c in seen[:6]] == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize("keywords", [("DSN",), ("DSN", "SMTPUTF8")], ids=["without-smtputf8", "with-smtputf8"])
async def test_a_non_ascii_orcpt_goes_as_postfixs_smtp_client_quotes_it(keywords):
    """Postfix's smtp_proto quotes a queued ORCPT by its type, whether or not the next hop offers SMTPUTF8: an
    `rfc822;` one as xtext (+HH of the UTF-8 bytes, plain ASCII any server takes), a `utf-8;` one with \\x{HEX}."""
    rcpts = (Recipient(0, "one@example.test", "jöe@bücher.test", orcpt="rfc822;jöe@bücher.test"),
             Recipient(1, "two@example.test", "two@example.test", orcpt="utf-8;jöe@bücher.test"))
    async with recording_peer(*keywords) as (port, lines):
        request = DeliveryRequest("Q1", "a@remote.test", rcpts, f"[127.0.0.1]:{port}", Content.of(CONTENT),
                                  smtputf8=True)
        report = await deliver(make_transport(), request)
    assert [r.outcome for r in report.results] == [Outcome.SENT] * 2
    assert [line for line in lines if line.startswith(b"RCPT")] == [
        b"RCPT TO:<one@example.test> ORCPT=rfc822;j+C3+B6e@b+C3+BCcher.test",
        b"RCPT TO:<two@example.test> ORCPT=utf-8;j\\x{F6}e@b\\x{FC}cher.test",
    ]


async def test_a_cancel_as_the_end_of_data_s_results_are_told_still_tells_them_all_stamped(monkeypatch, smtp_peer):
    """The stop's cancel comes as the first SLICE of the end of DATA's results is told to qmgr (a job of many
    recipients): every recipient the peer took is told all the same (the parts left at once, not cut between two),
    each with the transaction's ConnStats, so the cut job's lines split `delays=` as a reported job's do."""
    monkeypatch.setattr(trouble, "SLICE", 10)
    peer = await smtp_peer()
    recipients = [f"u{i:02d}@example.test" for i in range(25)]
    told: list[RcptResult] = []

    def settled(results) -> None:
        if not told:
            delivery.cancel()  # (the stop's, landing at the delivery's next wait)
        told.extend(results)

    transport = make_transport()
    delivery = asyncio.ensure_future(transport.deliver(make_request(f"[127.0.0.1]:{peer.port}", *recipients,
                                                                     on_settled=settled)))
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(delivery, 5)
    finally:
        await transport.close()
    assert [(r.recipient.address, r.outcome) for r in told] == [(a, Outcome.SENT) for a in recipients]
    assert {r.conn.use if r.conn else None for r in told} == {1}
    assert [m.rcpt_tos for m in peer.handler.messages] == [recipients]
