"""mailflow's lmtp transport against a real Dovecot (LMTP in, IMAP out): the private instance of the `dovecot`
fixture (tests/support/dovecot.py). Mail is read back with stdlib imaplib."""
from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import re

import pytest

from tests.support import eventually, lines_logged, lmtp_route, queue_becomes, send
from tests.support.dovecot import stop, wait_for_listeners  # noqa: F401 (imported from here by other interop tests)

pytestmark = pytest.mark.interop

MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.test, bob@example.test\r\n"
    b"Subject: lmtp interop\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"Message-ID: <lmtp-interop-1@remote.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9\r\n"
    b"last line\r\n"
)
def added_headers(stored: bytes, original: bytes) -> list[str]:
    """The header fields put before `original` on the way (asserting that `stored` is exactly them + original)."""
    assert stored.endswith(original), stored
    prefix = stored[: len(stored) - len(original)].decode()
    assert prefix.endswith("\r\n") or prefix == ""
    fields = re.split(r"\r\n(?![ \t])", prefix.removesuffix("\r\n")) if prefix else []
    assert all(re.match(r"[!-9;-~]+:", f) for f in fields), fields
    return [f.split(":", 1)[0] for f in fields]


# ---------------------------------------------------------------------------------------------------- tests


async def test_one_transaction_for_two_mailboxes_read_back_byte_exact(mailflow_server, dovecot, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server(relay_domains=["example.test"], transport_maps=lmtp_route(dovecot))
    await send(mf.smtp_addresses[0][1], "sender@remote.test", ["alice@example.test", "bob@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])
    await queue_becomes(mf.store, {}, timeout=15)

    for user in ("alice@example.test", "bob@example.test"):
        [stored] = await asyncio.to_thread(dovecot.fetch_all, user)
        names = added_headers(stored, MESSAGE)
        # Dovecot's Return-Path and Received (naming our LHLO), then mailflow's Received, then the original as sent
        assert names == ["Return-Path", "Received", "Received"], names
        assert stored.startswith(b"Return-Path: <sender@remote.test>\r\nReceived: from mx.mailflow.test ([127.0.0.1])")
        assert b"with LMTP" in stored.split(b"\r\nReceived: from localhost")[0]
        assert b"by mx.mailflow.test (mailflow) with ESMTP" in stored

    relay = f"relay=127.0.0.1[127.0.0.1]:{dovecot.lmtp_port}"
    sent = [line for line in await lines_logged(caplog, "status=sent", count=2) if "status=sent" in line]
    assert len(sent) == 2 and all(relay in line for line in sent), sent
    assert len({line.split(":")[0] for line in sent}) == 1  # one queue id, one delivery
    # Dovecot's log: both saves in one LMTP session (same session id, bob's is ":R2"), and exactly one LMTP session
    # that got past the greeting (the other connection is the readiness probe), ended by QUIT
    logged_out = await eventually(lambda: dovecot.log.count("Disconnect from 127.0.0.1: Logged out"))
    assert logged_out == 1, dovecot.log
    assert len(re.findall(r"lmtp\(\d+\): Info: Connect from 127.0.0.1", dovecot.log)) == 2, dovecot.log
    saves = re.findall(r"lmtp\((\S+?)\)<\d+><([^>:]+)[^>]*>: Info: msgid=<lmtp-interop-1@remote.test>: "
                       r"saved mail to INBOX",
                       dovecot.log)
    assert sorted(user for user, _ in saves) == ["alice@example.test", "bob@example.test"], dovecot.log
    assert len({session for _, session in saves}) == 1, dovecot.log


async def test_unknown_user_bounces_with_dovecots_5_1_1(mailflow_server, dovecot, smtp_peer):
    sender_mx = await smtp_peer()
    routes = lmtp_route(dovecot, **{"remote.test": f"smtp:[127.0.0.1]:{sender_mx.port}"})
    mf = await mailflow_server(relay_domains=["example.test"], transport_maps=routes)
    await send(mf.smtp_addresses[0][1], "sender@remote.test", ["nobody@example.test", "alice@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])

    bounces = await eventually(lambda: [m for m in sender_mx.messages if m.mail_from == "<>"], timeout=15)
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["sender@remote.test"]
    await queue_becomes(mf.store, {}, timeout=15)
    notice = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    status = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status").get_payload()
    [fields] = status[1:]
    assert fields["Final-Recipient"] == "rfc822; nobody@example.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test"
    readable = next(p for p in notice.walk() if p.get_content_type() == "text/plain").get_content()
    assert "User doesn't exist" in readable
    # the known recipient of the same message was delivered
    [stored] = await asyncio.to_thread(dovecot.fetch_all, "alice@example.test")
    assert stored.endswith(MESSAGE)


async def test_local_mailbox_transport_hands_the_mailbox_to_dovecot_after_the_aliases(mailflow_server, dovecot,
                                                                                        caplog):
    """Postfix's `mailbox_transport = lmtp:...`: example.test is a local domain; `info` is an alias of alice, whose
    mailbox Dovecot keeps; ghost gets past RCPT (local_recipient_maps) and Dovecot refuses it. The results are
    the LMTP client's, about the address local passed (`to=<alice@…>, orig_to=<info@…>`, relay= Dovecot)."""
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server(mydestination=["example.test", "mx.mailflow.test"], myorigin="example.test",
                               relay_domains=[],
                               local_recipient_maps=["inline:{info=ok, ghost=ok}"], alias_maps=["inline:{info=alice}"],
                               local={"mailbox_transport": f"lmtp:[127.0.0.1]:{dovecot.lmtp_port}"})
    await send(mf.smtp_addresses[0][1], "", ["info@example.test", "ghost@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])
    await queue_becomes(mf.store, {}, timeout=15)

    [stored] = await asyncio.to_thread(dovecot.fetch_all, "alice@example.test")
    assert stored.endswith(MESSAGE)
    lines = [line for line in await lines_logged(caplog, "to=<alice@example.test>", "status=sent")
             if "to=<" in line or "passing <" in line]
    relay = f"relay=127.0.0.1[127.0.0.1]:{dovecot.lmtp_port}"
    assert any(re.search(r": passing <alice@example\.test> to transport=lmtp$", line) for line in lines), lines
    [sent] = [line for line in lines if "status=sent" in line]
    assert "to=<alice@example.test>, orig_to=<info@example.test>, " + relay in sent, sent
    assert re.search(r"status=sent \(250 2\.0\.0 <alice@example\.test> \S+ Saved\)$", sent), sent
    [bounced] = [line for line in lines if "to=<ghost@" in line and "status=bounced" in line]
    assert "to=<ghost@example.test>, " + relay in bounced and "User doesn't exist" in bounced, bounced


@pytest.mark.skipif(os.geteuid() != 0, reason="dovecot-lda writes the mailbox as the private Dovecot's mail user")
async def test_local_mailbox_command_runs_dovecot_lda(mailflow_server, dovecot, caplog):
    """Postfix's `mailbox_command = /usr/lib/dovecot/dovecot-lda -f "$SENDER" -a "$RECIPIENT"`: the message reaches
    the user's Dovecot INBOX through dovecot-lda (run as default_privs, nobody: the private Dovecot's mail user),
    with local's Return-Path, X-Original-To and Delivered-To, the From_ line taken by dovecot-lda."""
    caplog.set_level(logging.INFO, logger="mailflow")
    lda = (f"/usr/lib/dovecot/dovecot-lda -c {dovecot.root}/dovecot.conf -o log_path=/dev/stderr "
           '-o info_log_path=/dev/stderr -o stats_writer_socket_path= -d "$USER@$DOMAIN" -f "$SENDER" -a "$RECIPIENT"')
    mf = await mailflow_server(mydestination=["example.test"], myorigin="example.test", relay_domains=[],
                               local_recipient_maps=["inline:{alice=ok}"], local={"mailbox_command": lda})
    await send(mf.smtp_addresses[0][1], "sender@remote.test", ["alice@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])
    await queue_becomes(mf.store, {}, timeout=15)
    await lines_logged(caplog, "to=<alice@example.test>")

    [stored] = await asyncio.to_thread(dovecot.fetch_all, "alice@example.test")
    assert stored.startswith(b"Return-Path: <sender@remote.test>\r\nX-Original-To: alice@example.test\r\n"
                             b"Delivered-To: alice@example.test\r\nReceived: from "), stored[:300]
    assert stored.endswith(MESSAGE) and b"\nFrom sender" not in stored
    [sent] = [r.getMessage() for r in caplog.records if "to=<alice@example.test>" in r.getMessage()]
    assert sent.endswith("status=sent (delivered to command: " + lda + ")"), sent


async def test_messages_one_after_the_other_share_one_cached_lmtp_session_quit_at_stop(mailflow_server, dovecot,
                                                                                      caplog):
    """Postfix's lmtp(8) connection cache: three messages to Dovecot, each sent once the one before is delivered,
    go over one LMTP session (conn_use=2, 3; one session id in Dovecot's saves), which stop() ends with QUIT."""
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server(relay_domains=["example.test"], transport_maps=lmtp_route(dovecot),
                               lmtp={"connection_cache_time_limit": "30s"})
    for n in range(3):
        await send(mf.smtp_addresses[0][1], "sender@remote.test", ["alice@example.test"],
                   MESSAGE.replace(b"lmtp-interop-1@", f"lmtp-cache-{n}@".encode()))
        await queue_becomes(mf.store, {}, timeout=15)
        await lines_logged(caplog, "status=sent", count=n + 1)  # (before the next message: a line follows the commit)
    sent = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert [m[1] if (m := re.search(r", conn_use=(\d+),", line)) else None for line in sent] == [None, "2", "3"], sent
    assert "Logged out" not in dovecot.log  # (the session waits in the cache)
    await mf.stop()
    await eventually(lambda: dovecot.log.count("Disconnect from 127.0.0.1: Logged out") == 1)
    assert len(re.findall(r"lmtp\(\d+\): Info: Connect from 127.0.0.1", dovecot.log)) == 2, dovecot.log  # (+ probe)
    sessions = re.findall(r"lmtp\(alice@example.test\)<\d+><([^>:]+)[^>]*>: Info: msgid=<lmtp-cache-\d@remote.test>: "
                          r"saved mail to INBOX", dovecot.log)
    assert len(sessions) == 3 and len(set(sessions)) == 1, dovecot.log
