"""SmtpTransport against real sockets on loopback: a capturing aiosmtpd peer and a dnslib zone server."""
from __future__ import annotations

import asyncio
import random
import ssl

import trustme

from mailflow.config import SmtpConfig
from mailflow.dns import MX, AiodnsResolver, StaticResolver
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports.smtp import SmtpTransport, order_exchangers

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


def make_transport(resolver=None, port: int = 25, tls: str = "none", timeout: float = 2.0, rng=None) -> SmtpTransport:
    config = SmtpConfig(
        port=port, connect_timeout=timeout, command_timeout=timeout, data_timeout=timeout, tls_security_level=tls
    )
    return SmtpTransport(config, resolver=resolver or StaticResolver(), helo_name=HELO, rng=rng)


def make_request(nexthop: str, *recipients: str, sender: str = "a@remote.test", content: bytes = CONTENT, **kw):
    rcpts = tuple(Recipient(i, address, address) for i, address in enumerate(recipients or ("b@example.test",)))
    return DeliveryRequest("Q1", sender, rcpts, nexthop, content, **kw)


def mx_zone(*lines: str) -> str:
    return "\n".join(lines) + "\n"


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


async def test_dead_first_mx_falls_back_to_second(smtp_peer, dns_zone):
    peer = await smtp_peer("127.0.0.1")  # nothing listens on 127.0.0.2 at this port
    nameserver = dns_zone(mx_zone(
        "example.test. 300 IN MX 10 mx1.example.test.",
        "example.test. 300 IN MX 20 mx2.example.test.",
        "mx1.example.test. 300 IN A 127.0.0.2",
        "mx2.example.test. 300 IN A 127.0.0.1",
    ))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request(f"example.test:{peer.port}"))
    finally:
        await resolver.close()
    assert report.site_ok
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"mx2.example.test[127.0.0.1]:{peer.port}"
    assert len(peer.messages) == 1


async def test_lower_preference_is_tried_first(smtp_peer, dns_zone):
    backup = await smtp_peer("127.0.0.1")
    primary = await smtp_peer("127.0.0.2", backup.port)
    nameserver = dns_zone(mx_zone(
        "example.test. 300 IN MX 20 backup.example.test.",
        "example.test. 300 IN MX 10 primary.example.test.",
        "backup.example.test. 300 IN A 127.0.0.1",
        "primary.example.test. 300 IN A 127.0.0.2",
    ))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request(f"example.test:{backup.port}"))
    finally:
        await resolver.close()
    assert report.results[0].relay == f"primary.example.test[127.0.0.2]:{backup.port}"
    assert (len(primary.messages), len(backup.messages)) == (1, 0)


async def test_implicit_mx_uses_the_domain_address(smtp_peer, dns_zone):
    peer = await smtp_peer()
    nameserver = dns_zone(mx_zone("implicit.test. 300 IN A 127.0.0.1"))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request(f"implicit.test:{peer.port}"))
    finally:
        await resolver.close()
    assert report.results[0].outcome is Outcome.SENT
    assert report.results[0].relay == f"implicit.test[127.0.0.1]:{peer.port}"


async def test_bad_greeting_on_first_mx_falls_back_to_second(smtp_peer):
    peer = await smtp_peer("127.0.0.1")

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


async def test_null_mx_bounces_every_recipient_with_5_1_10(dns_zone):
    nameserver = dns_zone(mx_zone("nullmx.test. 300 IN MX 0 ."))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request("nullmx.test", "a@nullmx.test", "b@nullmx.test"))
    finally:
        await resolver.close()
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.10")] * 2
    assert "nullmx.test does not accept mail" in report.results[0].text


async def test_nxdomain_bounces_with_5_1_2(dns_zone):
    nameserver = dns_zone(mx_zone("example.test. 300 IN A 127.0.0.1"))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request("nowhere.test", "x@nowhere.test"))
    finally:
        await resolver.close()
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.2")
    assert "Host or domain name not found" in result.text


async def test_dns_failure_defers_with_site_not_ok(dns_zone):
    nameserver = dns_zone(mx_zone("example.test. 300 IN A 127.0.0.1"), servfail=("broken.test",))
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)
    try:
        report = await deliver(make_transport(resolver), make_request("broken.test", "x@broken.test"))
    finally:
        await resolver.close()
    result = report.results[0]
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.4.3")
    assert not report.site_ok


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


async def test_sender_with_nul_bounces_everyone_without_connecting(unused_port):
    request = make_request(f"[127.0.0.1]:{unused_port}", "a@example.test", "b@example.test", sender="a\x00@remote.test")
    report = await deliver(make_transport(), request)
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.1.7")] * 2


# ---------------------------------------------------------------------------------------------------- unreachable


async def test_connection_refused_everywhere_defers_with_site_not_ok(unused_port):
    resolver = StaticResolver(
        mx={"example.test": [MX(10, "mx1.example.test"), MX(20, "mx2.example.test")]},
        addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.1"]},
    )
    request = make_request(f"example.test:{unused_port}", "a@example.test", "b@example.test")
    report = await deliver(make_transport(resolver), request)
    assert not report.site_ok
    assert [(r.outcome, r.dsn, r.relay) for r in report.results] == [(Outcome.DEFERRED, "4.4.1", "none")] * 2
    text = f"connect to mx2.example.test[127.0.0.1]:{unused_port}: Connection refused"
    assert report.results[0].text == text
    assert report.site_reason == text


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
