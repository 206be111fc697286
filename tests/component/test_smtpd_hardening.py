"""The front door against a new user's mistakes and an attacker's tricks, over real sockets:

- failed, abandoned and repeated STARTTLS handshakes give back the session slot and the per-client count;
- addresses beginning with '-' never reach a pipe(8) command's argv (allow_min_user);
- invalid UTF-8 is a 500 syntax error, never a 451 or a traceback;
- client strings reach the log only through printable();
- AUTH: one failure table per server, hashing on its own threads, authzid, LOGIN prompts, no deprecated API;
- forbid_bare_newline = false normalises bare LF in DATA without letting `\\n.\\n` end it;
- MAIL/RCPT path syntax as Postfix takes it; recipients past the limit do not end the session;
- the Received header's protocol word (RFC 3848);
- a client that never reads its replies loses its session at its timeout.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import socket
import ssl
import threading
import time
import warnings

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.testing import Sink
from tests.support import (LOOPBACK_CLIENT, LOOPBACK_NAME, SmtpClient, eventually, maildir_messages, queue_becomes,
                           script_dir)

MSG = b"Subject: t\r\n\r\nbody\r\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def alice_mail(tmp_path) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / "alice" / "Maildir")


# ---------------------------------------------------------------------------------------------- STARTTLS


async def _failed_handshake(port: int) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.send(b"EHLO this is not a TLS record\r\n")
    assert await c.closed()


async def _abandoned_handshake(port: int) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("STARTTLS"))[0] == 220
    await c.close()


async def _starttls_twice(port: int, ctx: ssl.SSLContext) -> None:
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.starttls(ctx)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("STARTTLS") == status.TLS_ALREADY_ACTIVE
    await c.close()


async def test_failed_and_abandoned_starttls_give_back_the_slot_and_the_client_count(mailflow_server, pki):
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "max_sessions": 100,
                                      "client_connection_count_limit": 50})
    port = mf.smtp_addresses[0][1]
    kinds = [lambda: _failed_handshake(port), lambda: _abandoned_handshake(port), lambda: _starttls_twice(port, ctx)]
    for batch in range(8):  # 200 sessions, 25 at a time: far past both limits if any of them leaked
        await asyncio.gather(*(kinds[(batch * 25 + i) % 3]() for i in range(25)))
    listener = mf.smtpd.listeners[0]
    await eventually(lambda: listener.anvil.sessions("127.0.0.1") == 0 and not mf.smtpd.sessions)
    c = await SmtpClient.connect(port)  # greeted: 220
    assert (await c.send_message()).code == 250
    await c.close()


async def test_starttls_inside_a_transaction_is_refused(mailflow_server, pki):
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd("STARTTLS") == status.TRANSACTION_IN_PROGRESS
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250  # the transaction goes on in plaintext
    await c.close()


async def test_starttls_after_the_client_closed_its_side_ends_the_session_at_once(mailflow_server, pki):
    """The client's end of input is read before its pipelined STARTTLS is (here the tarpit's sleep lets it in
    first): no handshake can follow, so the session ends then, not after asyncio's 60 s handshake timeout."""
    _, cert, _ = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "forbid_unauth_pipelining": False,
                                      "soft_error_limit": 1, "error_sleep_time": "0.3s"})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.send(b"EHLO client.test\r\nNOT-A-COMMAND\r\nSTARTTLS\r\n")
    c.writer.write_eof()
    replies = await c.rest(timeout=10)  # the session ends (before the fix: only after 60 s)
    assert b"500 5.5.2" in replies
    await eventually(lambda: not mf.smtpd.sessions, timeout=2)


# ---------------------------------------------------------------------------------------------- allow_min_user


RECORD_ARGV = 'printf "%s\\n" "$@" >> {out}/argv\n'


async def test_addresses_beginning_with_a_dash_never_reach_a_pipe_command(mailflow_server):
    with script_dir() as scripts:
        s = scripts.script("list.sh", RECORD_ARGV.format(out=scripts.out))
        mf = await mailflow_server(relay_domains=["lists.test"], transport_maps=["inline:{lists.test=lists:}"],
                                   pipe={"lists": {"argv": [str(s), "${extension}", "${recipient}"]}})
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert await c.cmd("MAIL FROM:<-oQ/tmp/x@remote.test>") == status.SENDER_SYNTAX
        assert (await c.cmd("MAIL FROM:<>"))[0] == 250
        assert await c.cmd("RCPT TO:<-oQ/some/dir@lists.test>") == status.RECIPIENT_SYNTAX
        assert (await c.cmd("RCPT TO:<list+-oQ/tmp@lists.test>"))[0] == 250  # a dash inside: smtpd lets it in
        assert (await c.cmd("RCPT TO:<list@lists.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        await c.close()
        # pipe bounced the recipient whose ${extension} begins with '-' (the null sender's notice goes to
        # postmaster, deferred here for want of DNS); the other one ran, with no option
        await queue_becomes(mf.store, {"deferred": 1})
        assert scripts.read("argv").splitlines() == ["", "list@lists.test"]


async def test_allow_min_user_lets_such_addresses_through(mailflow_server):
    with script_dir() as scripts:
        s = scripts.script("list.sh", RECORD_ARGV.format(out=scripts.out))
        mf = await mailflow_server(relay_domains=["lists.test"], transport_maps=["inline:{lists.test=lists:}"],
                                   allow_min_user=True, pipe={"lists": {"argv": [str(s), "--", "${recipient}"]}})
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert (await c.cmd("MAIL FROM:<>"))[0] == 250
        assert (await c.cmd("RCPT TO:<-dash@lists.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        await c.close()
        await queue_becomes(mf.store, {})
        assert scripts.read("argv").splitlines() == ["--", "-dash@lists.test"]


# ---------------------------------------------------------------------------------------------- UTF-8


@pytest.mark.parametrize("line", [b"HELO \xff\xfe.test", b"EHLO caf\xe9.test", b"MAIL FROM:<\xff@remote.test>",
                                  b"RCPT TO:<alice\xc3@local.test>", b"NOOP \xed\xa0\x80"])
async def test_invalid_utf8_is_a_syntax_error_and_the_session_goes_on(mailflow_server, tmp_path, caplog, line):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    if line.startswith(b"RCPT"):
        assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd(line) == status.BAD_UTF8
    if line.startswith(b"RCPT"):
        assert (await c.cmd("RSET"))[0] == 250
    assert (await c.send_message(ehlo=False)).code == 250  # never 451: the session is whole
    await c.close()
    await eventually(lambda: alice_mail(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_utf8_helo_is_kept_and_printed_in_received(mailflow_server, tmp_path):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO café.test".encode()))[0] == 250
    assert (await c.send_message(ehlo=False)).code == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert f"Received: from café.test ({LOOPBACK_NAME} [127.0.0.1])".encode() in messages[0]


@pytest.mark.parametrize("command, helo", [
    ("EHLO", "evil.test (trusted.example [192.0.2.1])"),  # a forged comment
    ("HELO", "a\x01b\x7fc\x1b[31m<x@y>;\"q\"\\"),  # controls and the characters Postfix neuters
])
async def test_the_helo_name_cannot_forge_the_received_header(mailflow_server, tmp_path, command, helo):
    """As Postfix keeps a HELO name (printable(), then neuter() of ` <>()\\";@`): what the Received header
    says of the client cannot be forged by the name, nor carry control characters."""
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd(f"{command} {helo}"))[0] == 250
    assert (await c.send_message(ehlo=False)).code == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    received = messages[0].split(b"\n\tby ", 1)[0].decode()
    expected = "".join("?" if not ch.isprintable() or ch in ' <>()\\";@' else ch for ch in helo)
    assert received.endswith(f"Received: from {expected} ({LOOPBACK_NAME} [127.0.0.1])")


# ---------------------------------------------------------------------------------------------- log injection

HOSTILE = "evil\x1b[2J\x08\u0085\u2028.test"


async def test_client_strings_reach_the_log_printable(mailflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd(f"EHLO {HOSTILE}".encode()))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<x@elsewhere.test>"))[0] == 554  # logged: NOQUEUE: reject ... helo=<…>
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(f"Message-ID: <{HOSTILE}>\r\n\r\nbody\r\n.\r\n".encode())
    assert (await c.reply())[0] == 250
    await c.close()
    await eventually(lambda: alice_mail(tmp_path))
    lines = [r.getMessage() for r in caplog.records]
    assert any("helo=<evil?[2J???.test>" in line for line in lines), lines
    assert any("message-id=<evil?[2J???.test>" in line for line in lines), lines
    assert not [line for line in lines if any(ch in line for ch in "\x1b\x08\u0085\u2028")]


# ---------------------------------------------------------------------------------------------- AUTH


def auth_door(users: str, **smtpd) -> dict:
    return {"smtpd": {"sasl_auth_enable": True, "sasl_user_maps": [users], "allow_plaintext_auth_on_loopback": True,
                      **smtpd}}


async def test_auth_failures_are_one_table_shared_by_the_listeners(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0.3,
                                           listeners=[{"address": "127.0.0.1:0"}]))
    first, second = (port for _, port in mf.smtp_addresses)
    a = await SmtpClient.connect(first)
    assert (await a.cmd("EHLO client.test"))[0] == 250
    assert (await a.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")))[0] == 535
    b = await SmtpClient.connect(second)
    assert (await b.cmd("EHLO client.test"))[0] == 250
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await b.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    assert loop.time() - started >= 0.3  # the failure on the other listener slows this client down here too
    assert mf.smtpd.auth_failures.recent("127.0.0.1") == 1
    await a.close()
    await b.close()


async def test_a_reload_puts_a_new_anvil_rate_time_unit_in_force_for_auth_failures(mailflow_server, users):
    """The AUTH failures are the server's, kept across reloads: a reload's anvil_rate_time_unit is their window from
    then on, as it is the listeners' anvil's (the failures kept the window the server started with)."""
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0.01, anvil_rate_time_unit=3600))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0wrong")))[0] == 535
    await c.close()
    assert mf.smtpd.auth_failures.recent("127.0.0.1") == 1
    smtpd = mf.config.smtpd.model_dump() | {"anvil_rate_time_unit": 0.3}
    await mf.reload(config_from_dict(mf.config.model_dump() | {"smtpd": smtpd}))
    await eventually(lambda: mf.smtpd.auth_failures.recent("127.0.0.1") == 0, timeout=3)


async def test_auth_hashing_does_not_wait_for_the_default_executor(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blockers = [loop.run_in_executor(None, release.wait, 10) for _ in range(64)]  # every default worker busy
    try:
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert (await asyncio.wait_for(c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")), 3))[0] == 235
        await c.close()
    finally:
        release.set()
        await asyncio.gather(*blockers)


async def test_auth_plain_with_another_authorization_identity_is_refused(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("AUTH PLAIN " + b64(b"bob\0alice\0s3cret")) == status.AUTH_FAILED
    assert (await c.cmd("AUTH PLAIN " + b64(b"alice\0alice\0s3cret")))[0] == 235
    await c.close()


async def test_auth_arguments_are_split_at_ascii_white_space_only(mailflow_server, users):
    """As Postfix's smtpd_token: U+00A0 joins the mechanism and its response into one unknown mechanism, and a
    trailing \\x1c is part of the response (not base64); a tab separates them."""
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    response = b64(b"\0alice\0s3cret")
    assert await c.cmd("AUTH PLAIN\u00a0" + response) == status.AUTH_UNKNOWN_MECHANISM
    assert await c.cmd("AUTH PLAIN " + response + "\x1c") == status.AUTH_BAD_BASE64
    assert (await c.cmd("AUTH PLAIN\t" + response))[0] == 235
    await c.close()


async def test_auth_login_prompts_and_no_deprecated_api(mailflow_server, users):
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert await c.cmd("AUTH LOGIN") == (334, "334 " + b64(b"Username:"))
        assert await c.cmd(b64(b"alice")) == (334, "334 " + b64(b"Password:"))
        assert await c.cmd(b64(b"s3cret")) == status.AUTH_OK
        assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
    assert not [w for w in caught if "deprecated" in str(w.message)]
    await c.close()


# ---------------------------------------------------------------------------------------------- bare LF


async def test_forbid_bare_newline_off_is_postfix_no_a_dot_line_ends_data_whatever_its_line_ends(mailflow_server,
                                                                                                  smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", smtpd={"forbid_bare_newline": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.send(b"EHLO client.test\n")  # a command line may end in a bare LF too
    assert (await c.reply())[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<r@relay.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    # "\n.\n" ends DATA, as Postfix's smtpd_forbid_bare_newline = no ends it: what follows is a second transaction
    # (such a client is outside the smuggling guard: docs/security.md)
    await c.send(b"Subject: lf\n\nline one\n..dot\n.\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<r@relay.test>\r\n"
                 b"DATA\r\n")
    replies = [await c.reply() for _ in range(4)]
    assert [code for code, _ in replies] == [250, 250, 250, 354]
    await c.send(b"Subject: two\r\n\r\nx\r\n.\n")
    assert (await c.reply())[0] == 250
    await c.close()
    await eventually(lambda: len(peer.messages) == 2)
    first = next(m.content for m in peer.messages if b"Subject: lf" in m.content)
    assert first.endswith(b"\r\n\r\nline one\r\n.dot\r\n")
    assert all(m.content.count(b"\n") == m.content.count(b"\r\n") for m in peer.messages)


async def _client_at_data(mf) -> SmtpClient:
    """A client past EHLO, MAIL (s@remote.test), RCPT (alice@local.test) and DATA's 354."""
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    for command, code in (("EHLO client.test", 250), ("MAIL FROM:<s@remote.test>", 250),
                          ("RCPT TO:<alice@local.test>", 250), ("DATA", 354)):
        assert (await c.cmd(command))[0] == code, command
    return c


async def test_forbid_bare_newline_off_labels_bare_lf_from_lines_within_the_header_limit(mailflow_server, tmp_path):
    # a bare-LF From line is stored with CRLF, a byte more than sent: counted as sent, 5000 of them made a labelled
    # header section past header_size_limit (refused 552 5.3.4, then kept unlabelled); counted as stored, as many
    # as fit are labelled (102 400 // 26: 3938, as with CRLF) and the rest is body
    mf = await mailflow_server(smtpd={"forbid_bare_newline": False})
    c = await _client_at_data(mf)
    await c.send(b"From a@b\n" * 5000 + b"Subject: s\n\nbody\r\n.\r\n")
    code, text = await c.reply()
    assert code == 250, text
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert messages[0].count(b"X-Mailbox-Line: From a@b\n") == 102_400 // 26


TAKES_BARE_LF = {"forbid_bare_newline false": {"smtpd": {"forbid_bare_newline": False}},
                 "excluded through mynetworks": {"mynetworks": ["127.0.0.0/8"]}}  # (the exclusions' default)
STRAY_CR = b"Subject: x\rBcc: y\r\n\r\nhi\r.\r\na\r\r\nb\r \r\n"  # (a header field, a `\r.` line, CRs before a LF)


@pytest.mark.parametrize("settings", TAKES_BARE_LF.values(), ids=TAKES_BARE_LF)
@pytest.mark.parametrize("chunks", [None, [STRAY_CR], [STRAY_CR[:3], STRAY_CR[3:-3], STRAY_CR[-3:]]],
                         ids=["DATA", "BDAT", "BDAT in three"])
async def test_a_stray_cr_is_stored_as_postfix_stores_it_where_a_bare_lf_is_taken(mailflow_server, tmp_path,
                                                                                   settings, chunks):
    """Postfix 3.7.11 (cleanup_replace_stray_cr_lf): a space, the CRs before a LF dropped; before header parsing
    (one Subject field, no Bcc recipient), in DATA and BDAT alike; it was refused (521 and the session closed)."""
    mf = await mailflow_server(**settings)
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>"):
        assert (await c.cmd(command)).code == 250, command
    if chunks is None:
        assert (await c.cmd("DATA")).code == 354
        await c.send(STRAY_CR + b".\r\n")
    else:
        for n, chunk in enumerate(chunks, 1):
            await c.send(f"BDAT {len(chunk)}{' LAST' if n == len(chunks) else ''}\r\n".encode() + chunk)
            assert n == len(chunks) or (await c.reply()).code == 250
    reply = await c.reply()
    assert reply.code == 250, reply
    assert (await c.cmd("NOOP")).code == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert b"Subject: x Bcc: y\n" in messages[0] and messages[0].endswith(b"\n\nhi .\na\nb  \n"), messages[0]


# ---------------------------------------------------------------------------------------------- MAIL/RCPT syntax


LONG_LOCAL = "SRS0=HHHH=TT=sender-domain.example=" + "x" * 60  # 95 octets


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<s@remote.test", status.SENDER_SYNTAX),
    ("MAIL FROM:<s@remote.test>junk", status.SENDER_SYNTAX),
    ("MAIL FROM:<s b@remote.test>", status.SENDER_SYNTAX),
    ("MAIL FROM:<s\\b@remote.test>", status.SENDER_SYNTAX),
    ("MAIL FROM:<s(x)@remote.test>", status.SENDER_OK),  # the comment dropped, as Postfix's extract_addr drops it
    ("MAIL <s@remote.test>", status.syntax("MAIL FROM:<address>")),
    ("MAIL FROM:<s@remote.test> FOO=bar", status.unsupported_option("FOO=bar")),
    ("MAIL FROM:<s@remote.test> SIZE=12x", status.BAD_SIZE_SYNTAX),
    ("MAIL FROM:<s@remote.test> SIZE=99999999999", status.SIZE_EXCEEDS_LIMIT),
    ("MAIL FROM:<s@remote.test> BODY=BINARYMIME", status.unsupported_option("BODY=BINARYMIME")),
    ("MAIL FROM:s@remote.test", status.SENDER_OK),  # Postfix (strict_rfc821_envelope = no) takes it
    ("MAIL FROM: <s@remote.test>", status.SENDER_OK),
    ("MAIL FROM:<s@remote.test.> SIZE=100 BODY=8BITMIME AUTH=<>", status.SENDER_OK),
    # a second AUTH= once one named a sender (as a private Postfix 3.7 answered; one after AUTH=<> is taken)
    ("MAIL FROM:<s@remote.test> AUTH=a@x.test AUTH=b@x.test", status.MULTIPLE_AUTH),
    ("MAIL FROM:<s@remote.test> AUTH=a@x.test AUTH=<>", status.MULTIPLE_AUTH),
    ("MAIL FROM:<s@remote.test> AUTH=<> AUTH=b@x.test", status.SENDER_OK),
    ("MAIL FROM:<s@remote.test> AUTH= AUTH=", status.MULTIPLE_AUTH),  # an empty value names a sender (Postfix's)
    # an SRS / VERP sender longer than RFC 5321's 64-octet local part: Postfix takes it, so must we
    (f"MAIL FROM:<{LONG_LOCAL}@remote.test>", status.SENDER_OK),
    ("MAIL FROM:<" + "s" * 250 + "@remote.test>", status.SENDER_SYNTAX),  # a path longer than RFC 5321's 256
    # an empty local part before an IPv6 literal: internally `@[IPv6:...]`, a source route to Postfix 3.7.11's
    # trivial-rewrite, which refuses it (501); before an IPv4 literal or a name it is taken by both
    ('MAIL FROM:<""@[IPv6:2001:db8::1]>', status.SENDER_SYNTAX),
    ('MAIL FROM:<""@[127.0.0.1]>', status.SENDER_OK),
    ('MAIL FROM:<""@remote.test>', status.SENDER_OK),
    ('MAIL FROM:<"@x"@[IPv6:::1]>', status.SENDER_SYNTAX),  # (the literal's first `:` ends that route)
    ('MAIL FROM:<"@x:y"@remote.test>', status.SENDER_OK),  # (a `:` in the local part: taken, as by Postfix)
    ('MAIL FROM:<"@x:y"@[127.0.0.1]>', status.SENDER_OK),  # (`y@[127.0.0.1]`, see test_rcpt_path_syntax)
])
async def test_mail_path_syntax(mailflow_server, command, reply):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd(command) == reply
    await c.close()


@pytest.mark.parametrize("command, reply", [
    ("RCPT TO:<alice@local.test", status.RECIPIENT_SYNTAX),
    ("RCPT TO:<a b@local.test>", status.RECIPIENT_SYNTAX),
    ("RCPT TO:<a\\b@local.test>", status.RECIPIENT_SYNTAX),
    ("RCPT TO:<alice@>", status.RECIPIENT_SYNTAX),
    ('RCPT TO:<""@[IPv6:::1]>', status.RECIPIENT_SYNTAX),  # (see test_mail_path_syntax)
    ("RCPT TO:<>", status.RECIPIENT_SYNTAX),
    ("RCPT TO:<alice@local.test> NOTIFY=NEVER FOO", status.unsupported_option("FOO")),
    ("RCPT <alice@local.test>", status.syntax("RCPT TO:<address>")),
    ("RCPT TO:<alice@local.test.>", status.RCPT_OK),
    ("RCPT TO:<@hop.test,@other.test:alice@local.test>", status.RCPT_OK),
    # a quoted local part that is a source route and more is that route's end, as Postfix's quote_822_local leaves
    # the route bare in the internal form (`@a.test:alice@local.test`) and its rewrite_tree drops it
    ('RCPT TO:<"@a.test:alice"@local.test>', status.RCPT_OK),
    ('RCPT TO:<"@a.test:alice">', status.relay_denied("@a.test:alice")),  # (alice@$myorigin, not 501)
    ("RCPT TO:alice@local.test", status.RCPT_OK),
    ('RCPT TO:<"a b"@local.test>', status.user_unknown('a b@local.test')),  # named in Postfix's internal form
    (f"RCPT TO:<{LONG_LOCAL}@local.test>", status.user_unknown(f"{LONG_LOCAL}@local.test")),  # syntax passes
    ("RCPT TO:<" + "a" * 250 + "@local.test>", status.RECIPIENT_SYNTAX),
])
async def test_rcpt_path_syntax(mailflow_server, command, reply):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd(command) == reply
    await c.close()


async def test_a_client_that_never_says_hello_is_served_as_postfix_serves_it(mailflow_server, tmp_path):
    # smtpd_helo_required = no (Postfix's default): MAIL, RCPT and DATA without HELO/EHLO
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.SENDER_OK
    assert await c.cmd("RCPT TO:<alice@local.test>") == status.RCPT_OK
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(b"Subject: no hello\r\n\r\nbody\r\n."))[0] == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert b"Subject: no hello" in messages[0]


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<s@remote.test>", status.NEED_HELO),
    # no transaction can exist before HELO: what is missing first is MAIL or RCPT (Postfix's answers)
    ("RCPT TO:<alice@local.test>", status.NEED_MAIL),
    ("DATA", status.no_recipients(False)),
    # a refused BDAT leaves its state even before HELO: MAIL asks for HELO before "MAIL after BDAT" (mail_cmd)
    ("BDAT 0", status.NULL_BDAT),
])
async def test_helo_required_refuses_a_transaction_before_hello(mailflow_server, command, reply):
    mf = await mailflow_server(smtpd={"helo_required": True})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd(command) == reply
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.NEED_HELO
    assert (await c.cmd("HELO client.test"))[0] == 250
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.SENDER_OK
    await c.close()


async def test_helo_required_answers_a_bdat_before_hello_as_data(mailflow_server):
    # as DATA and Postfix's bdat_cmd: recipients first, `503 5.5.1 Error: need RCPT command` (it was NEED_HELO;
    # the restriction differential's extended seed 31); the chunk (`ab` and cmd's CRLF: 4 octets) read and dropped
    mf = await mailflow_server(smtpd={"helo_required": True, "forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd("BDAT 4 LAST\r\nab") == status.no_recipients(False)
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.NEED_HELO
    await c.close()


async def test_an_unqualified_sender_is_taken_and_qualified_like_a_recipient(mailflow_server, tmp_path):
    # Postfix takes MAIL FROM:<user> and cleanup appends @$myorigin
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("MAIL FROM:<bob>") == status.SENDER_OK
    assert await c.cmd("RCPT TO:<alice@local.test>") == status.RCPT_OK
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert messages[0].startswith(f"Return-Path: <bob@{mf.config.origin}>".encode()), messages[0][:200]


async def test_starttls_where_it_is_not_offered_is_not_implemented(mailflow_server):
    mf = await mailflow_server()  # no certificate: STARTTLS is not in the EHLO keywords
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    ehlo = await c.cmd("EHLO client.test")
    assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines
    assert await c.cmd("STARTTLS") == status.NOT_IMPLEMENTED
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.SENDER_OK  # the session goes on
    await c.close()


async def test_esmtp_parameters_after_helo_are_taken_as_postfix_takes_them(mailflow_server):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("HELO client.test"))[0] == 250
    assert await c.cmd("MAIL FROM:<s@remote.test> SIZE=100") == status.SENDER_OK
    assert await c.cmd("RCPT TO:<alice@local.test>\tNOTIFY=NEVER") == status.RCPT_OK
    assert (await c.cmd("RSET"))[0] == 250
    assert await c.cmd("MAIL FROM:<s@remote.test> SIZE=99999999999") == status.SIZE_EXCEEDS_LIMIT  # still checked
    await c.close()


@pytest.mark.parametrize("rcpt", ["postmaster", "Postmaster", "POSTMASTER"])
async def test_the_bare_postmaster_is_always_taken(mailflow_server, rcpt):
    # RFC 5321 4.5.1; Postfix takes it before any restriction. This client is not in mynetworks, and
    # postmaster@myorigin is not a local domain here: any other recipient there is refused.
    mf = await mailflow_server(mynetworks=["192.0.2.0/24"])
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.SENDER_OK
    assert (await c.cmd("RCPT TO:<abuse>"))[0] == 554
    assert await c.cmd(f"RCPT TO:<{rcpt}>") == status.RCPT_OK
    await c.close()


@pytest.mark.parametrize("line", ["GET / HTTP/1.1", "POST /submit HTTP/1.0", "CONNECT mail.example:25 HTTP/1.1",
                                  "Subject: content sent after a refused DATA", "X-Header:no-space"])
async def test_a_line_that_is_not_smtp_ends_the_session(mailflow_server, line, caplog):
    # Postfix's smtpd_forbid_cmds (CONNECT GET POST) and its rule for a message header sent as a command
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    with caplog.at_level(logging.WARNING, logger="mailflow"):
        assert await c.cmd(line) == status.NON_SMTP_COMMAND
        assert await c.closed()
    assert f"non-SMTP command from localhost[127.0.0.1]: {line}" in caplog.text or \
        f"non-SMTP command from {LOOPBACK_CLIENT}: {line}" in caplog.text, caplog.text


@pytest.mark.parametrize("ending", [b"BDAT 0 LAST\r\n", b"DATA\r\nSubject: late\r\n\r\nbody\r\n.\r\n"])
async def test_nothing_sent_after_a_closing_refusal_is_taken(mailflow_server, tmp_path, ending):
    # The server said goodbye (221, non-SMTP command): what the client had pipelined after it is never read as
    # commands. It used to be, until the close took effect, so a message completed in that input was queued
    # although the client never got its 250 (found by the fuzz test).
    mf = await mailflow_server(smtpd={"forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.envelope()
    opening = b"BDAT 4\r\nab\r\n" if ending.startswith(b"BDAT") else b""
    await c.send(opening + b"Subject: f\r\n" + ending + b"NOOP\r\n")
    said = (await c.rest()).decode()
    assert said.endswith(f"{status.NON_SMTP_COMMAND}\r\n"), said
    assert "queued" not in said
    await asyncio.sleep(0.3)
    assert await mf.store.counts() == {} and alice_mail(tmp_path) == []


async def test_improper_pipelining_is_logged_once_even_when_it_is_not_refused(mailflow_server, caplog):
    # Postfix's smtpd_flag_ill_pipelining logs the first violation of a session whatever
    # smtpd_forbid_unauth_pipelining says (which only decides the 554): fail2ban's postfix filter bans on it
    mf = await mailflow_server(smtpd={"forbid_unauth_pipelining": False})
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.send(b"HELO client.test\r\nMAIL FROM:<a@remote.test>\r\n")
    assert [(await c.reply()).code, (await c.reply()).code] == [250, 250]
    await c.send(b"RSET\r\nNOOP\r\n")
    assert [(await c.reply()).code, (await c.reply()).code] == [250, 250]
    await c.close()
    lines = [r.getMessage() for r in caplog.records if "improper command pipelining" in r.getMessage()]
    assert lines == [f"improper command pipelining after HELO from {LOOPBACK_CLIENT}: MAIL FROM:<a@remote.test>\\r\\n"]


async def test_an_unknown_command_is_not_taken_for_one_that_is_not_smtp(mailflow_server):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd("XYZZY a:b") == status.NOT_RECOGNIZED  # the colon is not in the command word
    assert await c.cmd("NOOP") == status.OK
    await c.close()


async def test_quit_with_an_argument_still_ends_the_session(mailflow_server):
    # RFC 5321's QUIT takes none, but a client that sends one wants to leave: Postfix says 221 and closes
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("QUIT now") == status.BYE
    assert await c.closed()


async def test_a_trailing_dot_is_dropped_from_the_domain(mailflow_server, tmp_path):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.send_message(rcpt="alice@local.test.")).code == 250
    await c.close()
    messages = await eventually(lambda: alice_mail(tmp_path))
    assert b"Delivered-To: alice@local.test\n" in messages[0]


# ---------------------------------------------------------------------------------------------- recipient limit


async def test_recipients_past_the_limit_do_not_end_the_session(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", smtpd={"recipient_limit": 100})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    codes = [(await c.cmd(f"RCPT TO:<r{i}@relay.test>"))[0] for i in range(150)]
    assert codes == [250] * 100 + [452] * 50
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    await c.close()
    await eventually(lambda: sum(len(m.rcpt_tos) for m in peer.messages) == 100)
    assert sorted(r for m in peer.messages for r in m.rcpt_tos) == sorted(f"r{i}@relay.test" for i in range(100))
    assert [len(m.rcpt_tos) for m in peer.messages] == [50, 50]  # (queue.destination_recipient_limit)


async def test_past_the_overshoot_limit_the_452s_count_as_errors(mailflow_server):
    mf = await mailflow_server(smtpd={"recipient_limit": 1, "recipient_overshoot_limit": 2, "hard_error_limit": 3})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    codes = [(await c.cmd("RCPT TO:<alice@local.test>"))[0] for _ in range(7)]
    assert codes == [250, 452, 452, 452, 452, 452, 421]  # 2 free, then 3 errors reach the hard limit
    await c.close()


# ---------------------------------------------------------------------------------------------- Received


async def test_received_names_the_protocol_as_rfc_3848_says(mailflow_server, tmp_path, pki, users, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    _, cert, ctx = pki
    mf = await mailflow_server(**auth_door(users, tls_cert_file=cert))
    port = mf.smtp_addresses[0][1]
    plain = await SmtpClient.connect(port)
    assert (await plain.cmd("HELO client.test"))[0] == 250
    assert (await plain.send_message(ehlo=False)).code == 250
    await plain.close()
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.starttls(ctx)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.send_message(ehlo=False)).code == 250
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    assert (await c.cmd("MAIL FROM:<s@remote.test> SMTPUTF8"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    await c.close()
    messages = await eventually(lambda: len(alice_mail(tmp_path)) == 3 and alice_mail(tmp_path))
    withs = sorted(m.split(b" with ", 1)[1].split(b" ", 1)[0] for m in messages)
    assert withs == [b"ESMTPS", b"SMTP", b"UTF8SMTPSA"]
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith(f": client={LOOPBACK_CLIENT}, sasl_method=PLAIN, sasl_username=alice")
               for line in lines), lines


async def test_the_client_line_names_the_auth_sender_as_postfix_does(mailflow_server, caplog):
    # a private Postfix 3.7 logged "client=localhost[127.0.0.1], sasl_sender=x+2By@local.test" for this MAIL
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.envelope(mail_params=" AUTH=x+2By@local.test")
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    await c.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith(f": client={LOOPBACK_CLIENT}, sasl_sender=x+2By@local.test") for line in lines), lines


async def test_the_client_line_names_an_empty_auth_sender_as_postfix_does(mailflow_server, caplog):
    # a private Postfix 3.7.11 logged "client=localhost[127.0.0.1], sasl_sender=" for `AUTH=` (its cleanup then
    # warned of a spurious null attribute and ignored it), and no sasl_sender= for `AUTH=<>`
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server()
    for params in (" AUTH=", " AUTH=<>"):
        c = await SmtpClient.connect(mf.smtp_addresses[0][1])
        await c.envelope(mail_params=params)
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG + b"."))[0] == 250
        await c.close()
    lines = [r.getMessage() for r in caplog.records if ": client=" in r.getMessage()]
    assert [line.split(": ", 1)[1] for line in lines] == [f"client={LOOPBACK_CLIENT}, sasl_sender=",
                                                         f"client={LOOPBACK_CLIENT}"], lines


async def test_auth_pipelined_with_mail_is_taken_as_postfix_takes_it(mailflow_server, users):
    # Postfix's smtpd does not count AUTH among the commands that end a pipelined group (smtpd.c's command
    # table): a client sending `AUTH PLAIN <response>` and MAIL in one write gets 235 and 250, not 554
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"AUTH PLAIN " + b64(b"\0alice\0s3cret").encode() + b"\r\nMAIL FROM:<alice@local.test>\r\n")
    assert await c.reply() == status.AUTH_OK
    assert (await c.reply())[0] == 250
    await c.close()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])  # LOGIN with its user name in the same write
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"AUTH LOGIN\r\n" + b64(b"bob").encode() + b"\r\n")
    assert [await c.reply() for _ in range(2)] == [(334, "334 " + b64(b"Username:")), (334, "334 " + b64(b"Password:"))]
    assert await c.cmd(b64(b"hunter2")) == status.AUTH_OK
    await c.close()


async def test_auth_before_starttls_is_not_enabled_as_in_postfix(mailflow_server, users, pki):
    # Postfix with smtpd_tls_auth_only = yes has no SASL before TLS: AUTH sent anyway gets 503 5.5.1 "Error:
    # authentication not enabled", the reply AUTH gets where it is off (not RFC 4954's historical 538 5.7.11)
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"tls_cert_file": cert, "sasl_auth_enable": True, "sasl_user_maps": [users]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert "AUTH" not in (await c.cmd("EHLO client.test")).text
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")) == status.AUTH_NOT_ENABLED
    assert await c.cmd("AUTH LOGIN") == status.AUTH_NOT_ENABLED
    await c.starttls(ctx)
    assert "AUTH PLAIN LOGIN" in (await c.cmd("EHLO client.test")).text
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")) == status.AUTH_OK
    await c.close()


async def test_an_aborted_auth_is_answered_and_logged_in_postfixs_words(mailflow_server, users, caplog):
    # Postfix (smtpd_sasl_glue.c): "501 5.7.0 Authentication aborted" and "warning: host[ip]: SASL LOGIN
    # authentication aborted"; the abort is not a failed login
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("AUTH LOGIN"))[0] == 334
    assert await c.cmd("*") == (501, "501 5.7.0 Authentication aborted")
    assert (await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")))[0] == 235
    await c.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.smtpd"]
    assert f"{LOOPBACK_CLIENT}: SASL LOGIN authentication aborted" in lines, lines
    assert not [line for line in lines if "authentication failed" in line]
    assert mf.smtpd.auth_failures.recent("127.0.0.1") == 0


async def test_auth_answers_are_bounded_by_postfixs_sasl_response_limit(mailflow_server, users):
    # Postfix reads an answer to a 334 up to smtpd_sasl_response_limit (12288) bytes, past the command line
    # limit; a longer one is skipped and answered "500 5.5.6 SASL response limit exceeded", the session goes on
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    assert await c.cmd(b64(b"\0alice\0" + b"x" * 6000)) == status.AUTH_FAILED  # 8000 bytes: read and checked
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    assert await c.cmd("A" * 12289) == (500, "500 5.5.6 SASL response limit exceeded")
    assert (await c.cmd("NOOP"))[0] == 250
    assert (await c.cmd("AUTH LOGIN " + b64(b"alice")))[0] == 334
    assert await c.cmd(b64(b"s3cret")) == status.AUTH_OK
    await c.close()


async def test_base64_with_padding_it_does_not_need_is_refused(mailflow_server, users):
    # Dovecot (behind Postfix) refuses `<blob>=` as "Invalid base64 data"; RFC 4954 says 501 for a response
    # that is not base64. Python's decoder alone took it, and the login with it.
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    good = b64(b"\0bob\0hunter2")  # 12 bytes: 16 characters, no padding
    assert await c.cmd("AUTH PLAIN " + good + "=") == status.AUTH_BAD_BASE64
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    assert await c.cmd(good + "==") == status.AUTH_BAD_BASE64
    assert await c.cmd("AUTH LOGIN " + b64(b"alice")) == (334, "334 " + b64(b"Password:"))
    assert await c.cmd(b64(b"s3cret") + "=") == status.AUTH_BAD_BASE64
    assert await c.cmd("AUTH PLAIN " + good) == status.AUTH_OK
    await c.close()


@pytest.mark.parametrize("response", ["=", b64(b"alice\0s3cret"), b64(b"\0\0s3cret"), b64(b"\0alice\0s3cret\0x")])
async def test_a_malformed_plain_message_is_a_failed_login(mailflow_server, users, caplog, response):
    # Dovecot behind Postfix: 535 5.7.8 and "SASL PLAIN authentication failed: ..., sasl_username=(unavailable)"
    # (a line fail2ban counts), not a 501 that neither slows the client down nor reaches the log
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("AUTH PLAIN " + response) == status.AUTH_FAILED
    await c.close()
    assert mf.smtpd.auth_failures.recent("127.0.0.1") == 1
    assert f"{LOOPBACK_CLIENT}: SASL PLAIN authentication failed: authentication failure, " \
           "sasl_username=(unavailable)" in [r.getMessage() for r in caplog.records], caplog.text


@pytest.mark.parametrize("name, logged", [(b"", "sasl_username="), (b"a\0b", "sasl_username=(unavailable)"),
                                          (b"a b", "sasl_username=a b")])
async def test_a_login_name_that_cannot_be_one_fails_at_once_logged_as_postfix_logs_it(mailflow_server, users, caplog,
                                                                                       name, logged):
    # Postfix with Dovecot SASL: 535 before the password is asked; an empty name logged empty, one with a NUL
    # (which Dovecot does not name back) `(unavailable)`
    mf = await mailflow_server(**auth_door(users, auth_failure_delay=0))
    async with await SmtpClient.connect(mf.smtp_addresses[0][1]) as c:
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert await c.cmd("AUTH LOGIN " + (b64(name) or "=")) == status.AUTH_FAILED
    assert f"{LOOPBACK_CLIENT}: SASL LOGIN authentication failed: authentication failure, {logged}" in [
        r.getMessage() for r in caplog.records], caplog.text


async def test_auth_inside_a_transaction_is_refused_as_such_even_when_logged_in(mailflow_server, users):
    # Postfix's smtpd_sasl_auth_cmd checks the transaction before the login: "503 5.5.1 Error: MAIL transaction
    # in progress" also for a client already logged in
    mf = await mailflow_server(**auth_door(users))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")) == status.AUTH_OK
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")) == status.ALREADY_AUTHENTICATED
    assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
    assert await c.cmd("AUTH PLAIN " + b64(b"\0alice\0s3cret")) == status.TRANSACTION_IN_PROGRESS
    await c.close()


async def test_a_client_silent_after_auth_is_told_timeout_exceeded(mailflow_server, users, caplog):
    # Postfix's smtpd, at smtpd_timeout: "421 4.4.2 <host> Error: timeout exceeded", then it closes the session
    # and logs "timeout after AUTH from host[ip]"
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(**auth_door(users, timeout="1s"))
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("AUTH PLAIN"))[0] == 334
    assert await c.reply(timeout=5) == status.session_timeout(mf.config.myhostname)
    assert await c.closed()
    assert f"timeout after AUTH from {LOOPBACK_CLIENT}" in [r.getMessage() for r in caplog.records], caplog.text


# -------------------------------------------------------------------------------------------- a client that never reads


async def _connect_unread(port: int) -> socket.socket:
    """A non-blocking client socket with a small receive buffer (set before connect: no window scaling past it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return s


async def _pipeline_until(s: socket.socket, repeated: bytes, done: asyncio.Event, within: float = 20.0) -> None:
    """Send `repeated` again and again, never reading a reply, until `done` is set (the server's side says it
    stopped reading); fail after `within` seconds. (Whether a send goes through says nothing of the server: on
    loopback the kernel's buffers take megabytes of commands and replies, which a server short of CPU works
    through for seconds after.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    waiting = asyncio.ensure_future(done.wait())
    try:
        while not done.is_set() and loop.time() < deadline:
            sending = asyncio.ensure_future(loop.sock_sendall(s, repeated))
            await asyncio.wait({sending, waiting}, timeout=deadline - loop.time(),
                               return_when=asyncio.FIRST_COMPLETED)
            sending.cancel()
    finally:
        waiting.cancel()
    if not done.is_set():
        raise AssertionError(f"the server still read after {within} s")


async def test_a_client_that_never_reads_its_replies_loses_its_session_at_its_timeout(mailflow_server):
    # asyncio's close() waits for the replies to be flushed first: a session whose client did not read them stayed
    # open for good (its slot, its per-client count, its socket) after its timeout, however short the timeout.
    # (The error limits raised, as the floods of test_smtpd_hostile.py raise them: with the defaults a session
    # is ended by its errors before its replies overflow the kernel's socket buffers.) The test waits on events:
    # the server's transport pausing the session's writes (its command loop waits in drain, its deadline no longer
    # moves), then connection_lost; the 20 s bounds only a failure (before the fix: never).
    mf = await mailflow_server(smtpd={"timeout": "1s", "forbid_unauth_pipelining": False,
                                      "recipient_overshoot_limit": 10**9, "hard_error_limit": 10**9})
    writes_paused, lost = asyncio.Event(), asyncio.Event()

    def watch(session) -> None:
        pause_writing, connection_lost = session.pause_writing, session.connection_lost
        session.pause_writing = lambda: (writes_paused.set(), pause_writing())
        session.connection_lost = lambda error: (lost.set(), connection_lost(error))
        # fewer replies taken by the kernel (up to 4 MB on loopback): the session's writes wait sooner
        session.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    s = await _connect_unread(mf.smtp_addresses[0][1])
    try:
        await asyncio.get_running_loop().sock_sendall(s, b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n")
        await eventually(lambda: len(mf.smtpd.sessions) == 1, timeout=20)
        watch(next(iter(mf.smtpd.sessions)))
        await _pipeline_until(s, b"RCPT TO:<alice@local.test>\r\n" * 2000, writes_paused)
        listener = mf.smtpd.listeners[0]
        assert listener.anvil.sessions("127.0.0.1") == 1
        try:
            await asyncio.wait_for(lost.wait(), 20)  # at the timeout, 1 s after the writes paused
        except TimeoutError:
            raise AssertionError("the connection outlived its session's timeout (1 s) by 20 s") from None
        await eventually(lambda: not mf.smtpd.sessions and listener.anvil.sessions("127.0.0.1") == 0, timeout=20)
        await eventually(lambda: _closed_by_server(s), timeout=20)
    finally:
        s.close()


def _closed_by_server(s: socket.socket) -> bool:
    """The server reset the connection (its unread replies dropped): the client's next send fails."""
    try:
        s.send(b"NOOP\r\n")
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


def _read_reply(s: socket.socket | ssl.SSLSocket) -> bytes:
    """One whole reply (its last line `ddd `), read a byte at a time: nothing after it is taken."""
    data = b""
    while not (data.endswith(b"\r\n") and data.rsplit(b"\r\n", 2)[-2][3:4] == b" "):
        chunk = s.recv(1)
        if not chunk:
            raise AssertionError(f"closed after {data!r}")
        data += chunk
    return data


def _client_up_to_the_flood(port: int, how: str, ctx: ssl.SSLContext | None) -> socket.socket | ssl.SSLSocket:
    """A blocking client (`how`: plain, starttls, implicit) with a small receive buffer, greeted and, over TLS, past
    its handshake."""
    s: socket.socket | ssl.SSLSocket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connect: no window scaling past it)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    if how == "implicit":
        assert ctx is not None
        s = ctx.wrap_socket(s, server_hostname="localhost")
    assert _read_reply(s).startswith(b"220")
    if how == "starttls":
        assert ctx is not None
        s.sendall(b"EHLO client.test\r\n")
        assert _read_reply(s).startswith(b"250")
        s.sendall(b"STARTTLS\r\n")
        assert _read_reply(s).startswith(b"220")
        s = ctx.wrap_socket(s, server_hostname="localhost")
    return s


async def _end_leaving_replies_unread(smtpd, client) -> asyncio.WriteTransport:
    """The one session on `smtpd` (plaintext) ends by QUIT with its replies unread by `client` and left in its
    socket's buffers (raised: the client's flow control never pauses the session): its socket, returned, lingers."""
    await eventually(lambda: len(smtpd.sessions) == 1, timeout=5)
    raw = next(iter(smtpd.sessions)).transport
    raw.set_write_buffer_limits(high=1 << 24)
    raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await asyncio.to_thread(client.sendall, b"EHLO client.test\r\n" + b"NOOP\r\n" * 20000 + b"QUIT\r\n")
    await eventually(lambda: not smtpd.sessions, timeout=5)
    assert raw.get_write_buffer_size() and smtpd.lingering, "the replies were all sent: nothing tested"
    return raw


@pytest.mark.parametrize("how", ["plain", "starttls", "implicit"])
async def test_replies_left_unread_after_quit_do_not_keep_the_socket_past_the_timeout(mailflow_server, pki, users,
                                                                                      how):
    # The session ends (QUIT) with replies still in asyncio's buffers (the client reads none of them, its flow
    # control never paused the session: the buffer limits are raised): its slot and per-client count are given
    # back, and asyncio's close() waits to write them, for good in plaintext, for its 30 s SSL shutdown timeout under
    # TLS (for good there too once the client sends its close_notify). One client could hold any number of sockets.
    # Now what is left unsent gets one timeout.
    _, cert, ctx = pki
    listeners = [{"address": "127.0.0.1:0", "role": "submissions"}] if how == "implicit" else []
    mf = await mailflow_server(smtpd={"timeout": "1s", "forbid_unauth_pipelining": False, "tls_cert_file": cert,
                                      "junk_command_limit": 10**9, "listeners": listeners, "sasl_user_maps": [users]})
    port = mf.smtpd.address_of("submissions")[1] if how == "implicit" else mf.smtp_addresses[0][1]
    client = await asyncio.to_thread(_client_up_to_the_flood, port, how, ctx)
    try:
        await eventually(lambda: len(mf.smtpd.sessions) == 1 and (
            how == "plain" or next(iter(mf.smtpd.sessions)).session.ssl is not None), timeout=5)
        session = next(iter(mf.smtpd.sessions))
        lost = asyncio.Event()
        connection_lost = session.connection_lost
        session.connection_lost = lambda error: (lost.set(), connection_lost(error))
        transports = {session.transport, session._original_transport} - {None}
        for transport in transports:
            transport.set_write_buffer_limits(high=1 << 24)
        raw = session._original_transport or session.transport
        raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await asyncio.to_thread(client.sendall, b"EHLO client.test\r\n" + b"NOOP\r\n" * 20000 + b"QUIT\r\n")
        await eventually(lambda: not mf.smtpd.sessions, timeout=5)
        assert raw.get_write_buffer_size(), "the replies were all sent: nothing tested"
        await asyncio.wait_for(lost.wait(), 3)  # the timeout is 1 s (before: never, or after 30 s under TLS)
    finally:
        client.close()


@pytest.mark.parametrize("how", ["starttls", "implicit"])
async def test_a_silent_tls_client_loses_its_session_at_its_timeout_after_its_421(mailflow_server, pki, users, how):
    # Over TLS the timeout's close() is asyncio's SSL shutdown: it waits for the client's close_notify, which a
    # silent client never sends, for 30 s (ssl_shutdown_timeout), the session, its slot and its per-client count held
    # meanwhile. Now the 421 and the server's close_notify are written and the connection is dropped then.
    _, cert, ctx = pki
    listeners = [{"address": "127.0.0.1:0", "role": "submissions"}] if how == "implicit" else []
    mf = await mailflow_server(smtpd={"timeout": "1s", "tls_cert_file": cert, "listeners": listeners,
                                      "sasl_user_maps": [users]})
    port = mf.smtpd.address_of("submissions")[1] if how == "implicit" else mf.smtp_addresses[0][1]
    client = await asyncio.to_thread(_client_up_to_the_flood, port, how, ctx)
    try:
        await eventually(lambda: len(mf.smtpd.sessions) == 1, timeout=5)
        raw = next(iter(mf.smtpd.sessions))._original_transport
        await eventually(lambda: not mf.smtpd.sessions and not any(
            listener.anvil.sessions("127.0.0.1") for listener in mf.smtpd.listeners), timeout=3)
        await eventually(lambda: raw.get_extra_info("socket").fileno() == -1, timeout=1)  # the socket is gone too
        assert await asyncio.to_thread(_read_reply, client) == \
            (str(status.session_timeout(mf.config.myhostname)) + "\r\n").encode()
    finally:
        client.close()


def _read_slowly(s: socket.socket | ssl.SSLSocket, rate: int, within: float = 20.0, slowly: float = math.inf) -> bytes:
    """Everything until the server closes, about `rate` bytes a second (a tenth of it every 0.1 s), the first
    `slowly` seconds' worth of it (after that at once)."""
    data, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        tick = len(data) + rate // 10 if len(data) < rate * slowly else math.inf
        while len(data) < tick:  # (over TLS a recv returns one record: a reply)
            chunk = s.recv(min(tick - len(data), 65536))
            if not chunk:
                return data
            data += chunk
        time.sleep(0.1)  # (pacing the reader, not waiting for an event)
    raise AssertionError(f"still open after {within} s, {len(data)} bytes read")


@pytest.mark.parametrize("how", ["plain", "starttls"])
async def test_a_client_reading_slowly_but_steadily_gets_every_reply_and_its_221(mailflow_server, pki, users, how):
    # Postfix's smtpd_timeout bounds each write, not the time a client takes to read all its replies: the replies
    # of 6000 pipelined NOOPs (about 84 KB; over TLS each reply is a record of 36 bytes: 4000 NOOPs) fill the
    # write buffers (30 KB) at once, and the client reads them at 20 KB/s (8 KB/s) for 1.3 s: the session's wait in
    # drain takes longer than the 1 s timeout. Before, the connection was dropped at the first timeout, no 221
    # sent. (The client reads the rest at once after 1.3 s, within that wait: the session's end, after it, leaves
    # little unsent; what is left after the end gets one timeout in all, as the next test shows.)
    _, cert, ctx = pki
    mf = await mailflow_server(smtpd={"timeout": "1s", "forbid_unauth_pipelining": False, "tls_cert_file": cert,
                                      "junk_command_limit": 10**9, "sasl_user_maps": [users]})
    client = await asyncio.to_thread(_client_up_to_the_flood, mf.smtp_addresses[0][1], how, ctx)
    try:
        await eventually(lambda: len(mf.smtpd.sessions) == 1 and (
            how == "plain" or next(iter(mf.smtpd.sessions)).session.ssl is not None), timeout=5)
        session = next(iter(mf.smtpd.sessions))
        for transport in {session.transport, session._original_transport} - {None}:
            transport.set_write_buffer_limits(high=30000, low=0)
        raw = session._original_transport or session.transport
        raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        noops, rate = (6000, 20000) if how == "plain" else (4000, 8000)
        await asyncio.to_thread(client.sendall, b"EHLO client.test\r\n" + b"NOOP\r\n" * noops + b"QUIT\r\n")
        started = time.monotonic()
        replies = await asyncio.to_thread(_read_slowly, client, rate, slowly=1.3)
        assert replies.count(b"250 2.0.0 Ok\r\n") == noops and replies.endswith(b"221 2.0.0 Bye\r\n"), replies[-200:]
        assert time.monotonic() - started > 1.2, "read faster than the timeout: nothing tested"
        # (over TLS the client's end of input is the server's close_notify, which can come before the server's
        # socket has sent the rest and closed: its connection_lost may come a little later)
        await eventually(lambda: not mf.smtpd.sessions and not session.transport, timeout=2)
    finally:
        client.close()


async def test_a_socket_left_sending_after_its_session_gets_one_timeout_however_steadily_its_client_reads(
        mailflow_server):
    # What an ended session left unsent (a QUIT's reply behind the replies of 20000 NOOPs, about 280 KB, the
    # buffers raised: the session ends with it all buffered) was sent for as long as its client took some in each
    # timeout: read at 20 KB/s, 14 s here, and a client taking a few bytes a timeout kept the socket for good.
    # Now it gets one timeout in all (1 s): Postfix's close() hands what is left to the kernel and holds nothing.
    mf = await mailflow_server(smtpd={"timeout": "1s", "forbid_unauth_pipelining": False,
                                      "junk_command_limit": 10**9})
    client = await asyncio.to_thread(_client_up_to_the_flood, mf.smtp_addresses[0][1], "plain", None)
    try:
        await eventually(lambda: len(mf.smtpd.sessions) == 1, timeout=5)
        session = next(iter(mf.smtpd.sessions))
        lost = asyncio.Event()
        connection_lost = session.connection_lost
        session.connection_lost = lambda error: (lost.set(), connection_lost(error))
        raw = session.transport
        raw.set_write_buffer_limits(high=1 << 24, low=0)
        raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await asyncio.to_thread(client.sendall, b"EHLO client.test\r\n" + b"NOOP\r\n" * 20000 + b"QUIT\r\n")
        reading = asyncio.ensure_future(asyncio.to_thread(_read_slowly, client, 20000))
        await eventually(lambda: not mf.smtpd.sessions, timeout=5)
        assert mf.smtpd.lingering, "the replies were all sent: nothing tested"
        try:
            await asyncio.wait_for(lost.wait(), 4)  # one timeout (1 s) after the end; before: when all was read
        except TimeoutError:
            raise AssertionError("the socket was kept while its client read, past the timeout (1 s)") from None
        assert not reading.done(), "the client read everything: nothing tested"
        assert not mf.smtpd.lingering
        client.shutdown(socket.SHUT_RDWR)  # (the reader's recv returns: the rest in the kernel's buffers unread)
        with contextlib.suppress(OSError):
            await reading
    finally:
        client.close()


async def test_a_socket_left_sending_after_its_session_still_counts_as_one_of_its_clients_connections(
        mailflow_server):
    # A session ended (QUIT) with its replies unread gave back its per-client count while its socket went on
    # sending them: one client held any number of sockets past client_connection_count_limit. Now the count is
    # given back when the socket is gone.
    mf = await mailflow_server(smtpd={"client_connection_count_limit": 1, "timeout": "60s",
                                      "forbid_unauth_pipelining": False, "junk_command_limit": 10**9})
    port = mf.smtp_addresses[0][1]
    client = await asyncio.to_thread(_client_up_to_the_flood, port, "plain", None)
    try:
        await _end_leaving_replies_unread(mf.smtpd, client)
        second = await SmtpClient.connect(port, greet=False)
        assert await second.reply() == status.too_many_connections(mf.config.myhostname, "127.0.0.1")
        await second.close()
    finally:
        client.close()  # its replies unread: the kernel resets the connection, the server's socket is gone
    await eventually(lambda: not mf.smtpd.lingering, timeout=5)
    third = await SmtpClient.connect(port)  # greeted: 220
    await third.close()


async def test_a_socket_left_sending_after_its_session_keeps_its_session_slot(mailflow_server):
    # The slot was given back at the session's end while its socket went on sending: clients from many addresses
    # (each within client_connection_count_limit) could pile up sockets past max_sessions. Now the slot is held
    # until the socket is gone, as a Postfix smtpd blocked writing to its client holds its process.
    mf = await mailflow_server(smtpd={"max_sessions": 1, "timeout": "60s", "forbid_unauth_pipelining": False,
                                      "junk_command_limit": 10**9})
    port = mf.smtp_addresses[0][1]
    slots = mf.smtpd.listeners[0].slots
    client = await asyncio.to_thread(_client_up_to_the_flood, port, "plain", None)
    try:
        await _end_leaving_replies_unread(mf.smtpd, client)
        second = await SmtpClient.connect(port, greet=False)
        await eventually(lambda: slots.waiting == 1, timeout=5)  # no greeting: it waits for the slot
    finally:
        client.close()  # its replies unread: the kernel resets the connection, the server's socket is gone
    assert (await second.reply())[0] == 220  # greeted once the socket is gone
    await second.close()


async def test_a_socket_left_sending_after_its_session_is_dropped_at_the_stop(mailflow_server, pki, users):
    # A session ended (QUIT) with its replies unread leaves its socket sending, for a timeout without progress: past
    # stop() before, with the server gone (its timer firing later, or the socket left to the garbage collector).
    # Now stop() drops it.
    mf = await mailflow_server(smtpd={"timeout": "60s", "forbid_unauth_pipelining": False,
                                      "junk_command_limit": 10**9})
    client = await asyncio.to_thread(_client_up_to_the_flood, mf.smtp_addresses[0][1], "plain", None)
    try:
        raw = await _end_leaving_replies_unread(mf.smtpd, client)
        await asyncio.wait_for(mf.smtpd.stop(grace=0.5), 3)
        assert not mf.smtpd.lingering
        await eventually(lambda: raw.get_extra_info("socket").fileno() == -1, timeout=1)  # (closed: its fd given back)
    finally:
        client.close()


async def test_a_socket_left_sending_after_its_session_is_dropped_when_the_sink_stops():
    # The testing Sink's stop is the server's: a socket still sending an ended session's replies is not left behind.
    async with Sink(smtpd={"forbid_unauth_pipelining": False, "junk_command_limit": 10**9}) as sink:
        smtpd = sink.server.smtpd
        client = await asyncio.to_thread(_client_up_to_the_flood, sink.port, "plain", None)
        try:
            raw = await _end_leaving_replies_unread(smtpd, client)
            await asyncio.wait_for(sink.stop(), 5)
            assert not smtpd.lingering
            await eventually(lambda: raw.get_extra_info("socket").fileno() == -1, timeout=1)
        finally:
            client.close()
