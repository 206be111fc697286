"""A message in, durably queued, delivered out: local Maildir, relay to a capture peer, relay refusal."""
from __future__ import annotations

from pathlib import Path

import aiosmtplib
import pytest

from tests.support import SmtpClient, eventually, maildir_messages, queue_becomes, send

BODY = b".leading dot\r\n..two dots\r\nplain line\r\n.\tdot tab\r\nlast line\r\n"
MESSAGE = b"Subject: skeleton\r\nTo: <alice@local.test>\r\n\r\n" + BODY


def header_block(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[0]


async def test_local_recipient_lands_in_maildir_intact(mailflow_server, tmp_path):
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    refused, reply = await send(port, "sender@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]

    maildir = tmp_path / "mail" / "alice" / "Maildir"
    files = await eventually(lambda: maildir_messages(maildir))
    assert len(files) == 1
    data = files[0]
    head = header_block(data)
    assert data.endswith(b"\n\n" + BODY.replace(b"\r\n", b"\n")), "body not byte-exact (LF on disk)"
    assert head.startswith(b"Return-Path: <sender@remote.test>\nX-Original-To: alice@local.test\n"
                           b"Delivered-To: alice@local.test\nReceived: from ")
    assert f"with ESMTP id {queue_id}".encode() in head
    for name in (b"\nMessage-ID: <", b"\nDate: ", b"\nFrom: sender@remote.test", b"\nSubject: skeleton"):
        assert name in head
    assert not list((maildir / "tmp").iterdir())


async def test_headers_the_client_sent_are_not_duplicated(mailflow_server, tmp_path):
    mf = await mailflow_server()
    msg = (b"From: Someone <s@remote.test>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <given@remote.test>\r\n\r\nhello\r\n")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], msg)
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    files = await eventually(lambda: maildir_messages(maildir))
    head = header_block(files[0])
    assert head.count(b"\nFrom:") == 1 and head.count(b"\nDate:") == 1 and head.count(b"\nMessage-ID:") == 1
    assert b"Message-ID: <given@remote.test>" in head


async def test_mbox_from_lines_starting_data_become_header_fields(mailflow_server, tmp_path):
    """As Postfix's smtpd (receive_data_message) keeps them: the `From ` lines (`>From ` too) that DATA's content
    starts with are labelled `X-Mailbox-Line: `, so that the fields after them stay the header section (they were
    taken for the first line of the body, the Subject with them; checked against Postfix 3.7.11:
    tests/interop/test_cleanup_content_vs_postfix.py). A field name's blanks before its colon go, as Postfix's
    cleanup writes it."""
    mf = await mailflow_server()
    msg = b"From s@remote.test Fri Dec  4 12:00:00 2026\r\n>From again\r\nSubject : mbox\r\n\r\nFrom body\r\n"
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], msg)
    files = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    head, body = files[0].split(b"\n\n", 1)
    assert b"\nX-Mailbox-Line: From s@remote.test Fri Dec  4 12:00:00 2026\nX-Mailbox-Line: >From again\n" \
           b"Subject: mbox\nMessage-ID: <" in head
    assert body == b"From body\n"


async def test_bdat_content_keeps_its_mbox_from_lines_unlabelled(mailflow_server, tmp_path):
    """Postfix's smtpd labels the mbox lines of DATA only (receive_data_message); BDAT's content is stored as sent:
    its first line, no header field, starts the body."""
    mf = await mailflow_server()
    content = b"From s@x Fri\r\nSubject: bdat\r\n\r\nb\r\n"
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await client.cmd("RCPT TO:<alice@local.test>")).code == 250
    await client.send(b"BDAT %d LAST\r\n" % len(content) + content)
    assert (await client.reply(timeout=10)).code == 250
    await client.close()
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"X-Mailbox-Line" not in data and data.endswith(b"\n\nFrom s@x Fri\nSubject: bdat\n\nb\n")


async def test_a_spooled_data_message_has_its_mbox_lines_labelled_and_its_body_intact(mailflow_server, tmp_path):
    """A message big enough to go to a spool file (500 KB) is labelled as a small one, its body delivered whole."""
    mf = await mailflow_server()
    body = b"".join(b"line %06d " % i + b"x" * 90 + b"\r\n" for i in range(5000))
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"],
               b"From s@remote.test Fri Dec  4\r\n>From b\r\nSubject: big\r\n\r\n" + body)
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"), timeout=10)
    head, rest = data.split(b"\n\n", 1)
    assert b"\nX-Mailbox-Line: From s@remote.test Fri Dec  4\nX-Mailbox-Line: >From b\nSubject: big\n" in head
    assert rest == body.replace(b"\r\n", b"\n")


async def test_relay_domain_reaches_the_peer_with_envelope_unchanged(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rcpts = ["First.User@relay.test", "second+tag@relay.test"]
    await send(mf.smtp_addresses[0][1], "Sender@Remote.test", rcpts, MESSAGE)
    await eventually(lambda: peer.messages)
    assert len(peer.messages) == 1
    got = peer.messages[0]
    assert got.mail_from == "Sender@Remote.test" and got.rcpt_tos == rcpts
    assert got.content.endswith(b"\r\n\r\n" + BODY)
    assert got.content.startswith(b"Received: from ")


async def test_null_sender_is_relayed_as_null_sender(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "", ["x@relay.test"], MESSAGE)
    await eventually(lambda: peer.messages)
    assert peer.messages[0].mail_from == "<>"  # aiosmtpd's spelling of MAIL FROM:<>


async def test_foreign_recipient_from_untrusted_client_is_refused(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mf.smtp_addresses[0][1], start_tls=False) as c:
        await c.mail("spammer@remote.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await c.rcpt("victim@foreign.example")
    assert refused.value.code == 554 and refused.value.message.startswith("5.7.1 ")
    assert "Relay access denied" in refused.value.message


async def test_trusted_client_may_relay_anywhere(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"])
    await send(mf.smtp_addresses[0][1], "me@local.test", ["friend@foreign.example"], MESSAGE)
    await eventually(lambda: peer.messages)
    assert peer.messages[0].rcpt_tos == ["friend@foreign.example"]


async def test_unknown_local_user_is_refused_at_rcpt(mailflow_server):
    mf = await mailflow_server()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mf.smtp_addresses[0][1], start_tls=False) as c:
        await c.mail("s@remote.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await c.rcpt("nosuchuser@local.test")
    assert refused.value.code == 550 and refused.value.message.startswith("5.1.1 ")


async def test_temporary_failure_is_retried_until_delivered(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    peer.handler.mail_reply = "451 4.3.0 try again later"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["r@relay.test"], MESSAGE)
    await queue_becomes(mf.store, {"deferred": 1})
    assert peer.messages == []
    peer.handler.mail_reply = None
    await eventually(lambda: peer.messages, timeout=5)
    assert len(peer.messages) == 1
    await queue_becomes(mf.store, {})


async def test_message_to_local_and_relay_recipients_goes_both_ways(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test", "bob@local.test", "r@relay.test"],
               MESSAGE)
    await eventually(lambda: peer.messages)
    for user in ("alice", "bob"):
        await eventually(lambda: maildir_messages(tmp_path / "mail" / user / "Maildir"))
    assert peer.messages[0].rcpt_tos == ["r@relay.test"]


async def test_a_header_flood_is_refused_and_not_queued(mailflow_server):
    mf = await mailflow_server(header_size_limit=2048)
    flood = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"a" * 60) for i in range(40)) + b"\r\nbody\r\n"
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], flood)
    assert (refused.value.code, refused.value.message[:5]) == (552, "5.3.4")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], b"Subject: small\r\n\r\nok\r\n")
    await queue_becomes(mf.store, {})
    [only] = maildir_messages(Path(mf.config.local.maildir_base) / "alice" / "Maildir")
    assert only.endswith(b"\n\nok\n")
