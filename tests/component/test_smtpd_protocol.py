"""smtpd's protocol layer over real sockets, byte-exact: strict CRLF (smuggling), DATA and BDAT content,
pipelining discipline, DSN parameters, VRFY, error limits, line and size limits.

Each test speaks raw SMTP to a running mailflow (or, for limits the listener does not yet take from config, to an
`SmtpSession` listener built on a running mailflow's handler) and checks both the replies and what was queued.
"""
from __future__ import annotations

import asyncio
import cProfile
import email
import logging
import pstats
import re
import email.policy
import socket
import threading

import pytest

from mailflow import content as content_module, status
from mailflow.config import DEFAULTS
from mailflow.stages.smtpd.session import ProtocolLimits, SmtpSession
from tests.support import SmtpClient, big_message, eventually, maildir_messages, sessions_over

MSG = b"Subject: t\r\n\r\nbody\r\n"
HOST = "mx.mailflow.test"


async def _server(mailflow_server, **overrides):
    mf = await mailflow_server(**overrides)
    return mf, mf.smtp_addresses[0][1]


def _alice_mail(tmp_path) -> list[bytes]:
    """alice's Maildir messages (stored with LF line ends, as Maildir wants)."""
    return maildir_messages(tmp_path / "mail" / "alice" / "Maildir")


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --- strict CRLF and smuggling ------------------------------------------------------------------------------

@pytest.mark.parametrize("content, char", [
    (b"Subject: x\r\n\r\nline\nmore\r\n.\r\n", "LF"),
    (b"Subject: x\r\n\r\nline\rmore\r\n.\r\n", "CR"),
    # the classic smuggling shapes: none may end DATA or start a second message
    (b"Subject: x\r\n\r\nhi\r\n\n.\nMAIL FROM:<evil@remote.test>\r\n.\r\n", "LF"),
    (b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@remote.test>\r\n.\r\n", "LF"),
    (b"Subject: x\r\n\r\nhi\r\n.\nRSET\r\n.\r\n", "LF"),
    (b"Subject: x\r\n\r\nhi\r.\r\nRSET\r\n.\r\n", "CR"),
    (b"Subject: x\r\n\r\nhi\r\n.\r\r\nRSET\r\n.\r\n", "CR"),
])
async def test_bare_newline_in_data_is_refused_and_nothing_is_queued(mailflow_server, tmp_path, content, char):
    mf, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(content)
    assert await c.reply() == status.bare_newline(HOST, char)
    assert await c.closed()
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


@pytest.mark.parametrize("command", ["BDAT", "BDAT x", "BDAT 1 FOO", "BDAT -1 LAST", "BDAT 1 LAST extra",
                                     "BDAT 1\x1cLAST", "BDAT 1\u00a0LAST", "BDAT 1\u2003LAST"])
async def test_a_malformed_bdat_ends_the_session(mailflow_server, tmp_path, command):
    # Postfix: 521 and hang up. The chunk's size is unknown, so what follows could only be read as commands:
    # here a whole transaction that must not be queued.
    mf, port = await _server(mailflow_server, smtpd={"listen": ["127.0.0.1:0"], "forbid_unauth_pipelining": False})
    c = await SmtpClient.connect(port)
    await c.envelope()
    await c.send(f"{command}\r\n".encode() + b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n"
                 b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    assert await c.reply() == status.BDAT_SYNTAX
    assert str(status.BDAT_SYNTAX) == "521 5.5.4 Syntax: BDAT count [LAST]"
    assert await c.rest() == b""
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


@pytest.mark.parametrize("line", [b"NOOP\n", b"EHLO a\rb\r\n", b"NOOP\r\r\n"])
async def test_bare_newline_in_a_command_is_refused(mailflow_server, line):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.send(line)
    code, text = await c.reply()
    assert code == 521 and "5.5.2" in text and "bare <" in text
    assert await c.closed()


@pytest.mark.parametrize("mynetworks, exclusions, spared", [
    (["127.0.0.0/8"], None, True),  # unset: mynetworks, as Postfix's smtpd_forbid_bare_newline_exclusions
    (["127.0.0.0/8"], [], False),
    (["127.0.0.0/8"], ["192.0.2.0/24"], False),  # a list of its own replaces mynetworks
    ([], ["127.0.0.1"], True),
])
async def test_a_client_in_forbid_bare_newline_exclusions_may_end_lines_with_a_bare_lf(
        mailflow_server, tmp_path, mynetworks, exclusions, spared):
    """Postfix 3.7.11 spares $mynetworks from smtpd_forbid_bare_newline by default: a local application's bare LF
    ends its line there (commands and DATA, stored as CRLF). mailflow refused every client with 521."""
    smtpd = {} if exclusions is None else {"forbid_bare_newline_exclusions": exclusions}
    mf, port = await _server(mailflow_server, mynetworks=mynetworks, smtpd=smtpd)
    c = await SmtpClient.connect(port)
    await c.send(b"EHLO client.test\n")
    code, _ = await c.reply()
    if not spared:
        assert code == 521 and await c.closed()
        return
    assert code == 250
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: bare\n\nline\nmore\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.cmd("QUIT")
    await sessions_over(mf)
    [message] = await eventually(lambda: _alice_mail(tmp_path), timeout=10)
    assert message.endswith(b"line\nmore\n")


async def test_dot_stuffing_is_undone_and_content_arrives_byte_exact(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    body = b".leading\r\n..two\r\n.\r\nnot the end? it is stuffed below\r\nlast\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..").replace(b".leading", b"..leading", 1)
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: dots\r\n\r\n" + stuffed + b".\r\nNOOP\r\n")  # NOOP pipelined after "." is legal
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 250
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert msgs and msgs[0].endswith(b"\n\n" + lf(body))


async def test_nul_in_content_is_refused_and_the_session_goes_on(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: x\r\n\r\nnul \0 here\r\n.\r\n")
    assert await c.reply() == status.NUL_IN_DATA
    assert (await c.cmd("NOOP"))[0] == 250
    await c.close()
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


async def test_message_over_size_limit_is_552_after_the_terminator(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server, smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 10_000})
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 200 + b".\r\n")
    assert await c.reply() == status.MESSAGE_TOO_BIG
    assert (await c.cmd("RSET"))[0] == 250
    await c.close()
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


async def test_overlong_command_line_is_500_and_the_session_goes_on(mailflow_server):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert await c.cmd(b"NOOP " + b"x" * 5000) == status.LINE_TOO_LONG
    assert (await c.cmd("NOOP"))[0] == 250


async def test_a_long_content_line_and_a_message_split_across_reads_arrive_intact(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    body = b"z" * 200_000 + b"\r\n" + b"short\r\n"
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    data = b"Subject: long\r\n\r\n" + body + b".\r\n"
    for i in range(0, len(data), 7001):  # pieces that cut CRLF pairs and the terminator apart
        await c.send(data[i:i + 7001])
        await asyncio.sleep(0)
    assert (await c.reply())[0] == 250
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert msgs and msgs[0].endswith(lf(body))


# --- pipelining discipline ----------------------------------------------------------------------------------

async def test_client_talking_before_the_greeting_is_refused_in_its_place(mailflow_server):
    """Postfix's smtpd: the 554 is the first and only reply (smtpd_proto checks for early talk before its 220)."""
    _, port = await _server(mailflow_server)
    sock = socket.create_connection(("127.0.0.1", port))  # blocking: the server has not even accepted yet
    sock.sendall(b"EHLO early.test\r\n")
    c = await SmtpClient.connect(port, sock=sock, greet=False)
    assert await c.reply() == status.PROTOCOL_SYNC
    assert str(status.PROTOCOL_SYNC) == "554 5.5.0 Error: SMTP protocol synchronization"
    assert await c.closed()


async def test_content_pipelined_before_354_is_refused_and_not_queued(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n" + MSG + b".\r\n")
    assert [(await c.reply())[0] for _ in range(3)] == [250, 250, 554]
    assert await c.closed()
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


async def test_pipelining_after_helo_or_ehlo_is_refused(mailflow_server):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.send(b"EHLO client.test\r\nMAIL FROM:<s@remote.test>\r\n")
    assert (await c.reply())[0] == 554
    assert await c.closed()
    c = await SmtpClient.connect(port)
    assert (await c.cmd("HELO client.test"))[0] == 250
    await c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n")
    assert (await c.reply())[0] == 554
    assert await c.closed()


async def test_quit_is_out_of_sync_with_input_behind_it_after_helo_not_after_ehlo(mailflow_server):
    """Postfix's command table does not mark QUIT as ending a group: after EHLO it is never checked (what follows
    is not read); after HELO, as every command of an SMTP session, it is."""
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("HELO client.test"))[0] == 250
    await c.send(b"QUIT\r\nNOOP\r\n")
    assert await c.reply() == status.PROTOCOL_SYNC
    assert await c.closed()
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"QUIT\r\nNOOP\r\n")
    assert (await c.reply())[0] == 221
    assert await c.closed()


async def test_a_failed_helo_after_ehlo_leaves_the_session_esmtp(mailflow_server, monkeypatch):
    mf, port = await _server(mailflow_server)

    async def failing_helo(*args):
        raise RuntimeError("a milter went away")

    monkeypatch.setattr(mf.smtpd.listeners[0].handler, "handle_HELO", failing_helo)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("HELO client.test"))[0] == 451
    await c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\n")  # ESMTP may pipeline these
    assert [(await c.reply())[0] for _ in range(2)] == [250, 250]
    await c.close()


async def test_pipelined_envelope_after_ehlo_is_accepted(mailflow_server, tmp_path):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n")
    assert [(await c.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
    await c.send(MSG + b".\r\nQUIT\r\n")
    assert (await c.reply())[0] == 250
    assert (await c.reply())[0] == 221
    await eventually(lambda: _alice_mail(tmp_path))


async def test_starttls_pipelined_with_plaintext_is_refused(mailflow_server):
    """Commands pipelined after STARTTLS (CVE-2011-0411/CVE-2024-34083) never run; with no TLS configured
    the STARTTLS command itself is unknown, and the pipelining is refused either way."""
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await c.send(b"STARTTLS\r\nNOOP\r\nRSET\r\n")
    code, _ = await c.reply()
    assert code is not None and code >= 500
    assert await c.closed()


@pytest.mark.parametrize("segments", [[b"STARTTLS\r\nMAIL FROM:<inj@evil.test>\r\n"],
                                      [b"STARTTLS\r\n", b"MAIL FROM:<inj@evil.test>\r\n"]],
                         ids=["one packet", "own segment"])
async def test_a_command_injected_behind_starttls_never_runs_inside_tls(mailflow_server, pki, segments):
    """CVE-2011-0411 with TLS on: a MAIL pipelined behind STARTTLS, in its packet or in a segment of its own sent
    before the 220 is read, is plaintext read ahead of the handshake and discarded; inside TLS a RCPT finds no
    MAIL (503), as Postfix's purge of its read buffer at the 220."""
    _, cert_file, client_ctx = pki
    _, port = await _server(mailflow_server, smtpd={"listen": ["127.0.0.1:0"], "tls_cert_file": cert_file})
    async with await SmtpClient.connect(port) as c:
        assert (await c.cmd("EHLO client.test"))[0] == 250
        c.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for segment in segments:  # (no await between them: all are sent before the server reads any)
            c.writer.write(segment)
        assert (await c.reply())[0] == 220
        await c.writer.start_tls(client_ctx, server_hostname="localhost")
        assert await c.cmd("RCPT TO:<alice@local.test>") == status.NEED_MAIL


# --- ESMTP: EHLO keywords, VRFY, DSN, BDAT ----------------------------------------------------------------

async def test_ehlo_advertises_dsn_and_chunking_and_vrfy_is_disabled(mailflow_server):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    code, text = await c.cmd("EHLO client.test")
    keywords = [line[4:].split(" ")[0] for line in text.splitlines()[1:]]
    assert code == 250 and "DSN" in keywords and "CHUNKING" in keywords and "PIPELINING" in keywords
    assert text.splitlines()[-1].startswith("250 ") and all(l.startswith("250-") for l in text.splitlines()[:-1])
    assert await c.cmd("VRFY alice@local.test") == status.VRFY_DISABLED
    assert await c.cmd("VRFY nobody@local.test") == status.VRFY_DISABLED


@pytest.mark.parametrize("limit, offered", [(1000, "SIZE 1000"), (0, "SIZE")])
async def test_ehlo_offers_size_with_the_limit_or_bare_without_one(mailflow_server, limit, offered):
    """RFC 1870: SIZE without a number means no fixed maximum (Postfix offers it so with message_size_limit 0)."""
    _, port = await _server(mailflow_server, smtpd={"message_size_limit": limit})
    c = await SmtpClient.connect(port)
    code, text = await c.cmd("EHLO client.test")
    assert code == 250 and offered in [line[4:] for line in text.splitlines()[1:]]
    assert (await c.cmd("MAIL FROM:<s@remote.test> SIZE=99999"))[0] == (552 if limit else 250)


@pytest.mark.parametrize("command", [
    "MAIL FROM:<s@remote.test> RET=ALL",
    "MAIL FROM:<s@remote.test> ENVID=bad+zz",
    "MAIL FROM:<s@remote.test> RET=FULL RET=HDRS",
    # RFC 3461 4.4: an ENVID is printable US-ASCII (Postfix: allprint()); CR LF would go into a notice's header
    "MAIL FROM:<s@remote.test> ENVID=a+0D+0ABcc:+20x@evil.test",
    "MAIL FROM:<s@remote.test> ENVID=a+09b",
    "MAIL FROM:<s@remote.test> ENVID=caf+C3+A9",
])
async def test_bad_mail_dsn_parameters_are_501(mailflow_server, command):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.cmd("EHLO client.test")
    code, text = await c.cmd(command)
    assert code == 501 and text.startswith("501 5.5.4 ")


@pytest.mark.parametrize("params", [" NOTIFY=NEVER,SUCCESS", " NOTIFY=SOMETIMES", " ORCPT=alice@local.test",
                                    " NOTIFY=", " ORCPT=rfc822;a+4"])
async def test_bad_rcpt_dsn_parameters_are_501(mailflow_server, params):
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.cmd("EHLO client.test")
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    code, text = await c.cmd(f"RCPT TO:<alice@local.test>{params}")
    assert code == 501 and text.startswith("501 5.5.4 ")


async def test_keywords_are_compared_in_ascii_only_as_postfixs_strcasecmp(mailflow_server):
    """Python's str.upper() maps `ſ` to S, `ı` to I and `ﬆ` to ST: none of them spells a keyword in Postfix."""
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.cmd("EHLO client.test")
    for params in (" \u017fIZE=10", " BODY=8b\u0131tm\u0131me", " \u017fMTPUTF8"):
        assert (await c.cmd(f"MAIL FROM:<s@remote.test>{params}"))[0] == 555, params
    assert await c.cmd("MAIL FROM:<s@remote.test> RET=HDR\u017f") == status.BAD_RET
    assert (await c.cmd("MAIL FROM:<s@remote.test> size=10 body=8bitmime ret=hdrs"))[0] == 250
    assert await c.cmd("RCPT TO:<alice@local.test> NOTIFY=\u017fuccess") == status.BAD_NOTIFY
    assert (await c.cmd("RCPT TO:<alice@local.test> notify=success"))[0] == 250
    assert await c.cmd("BDAT 1 LA\ufb06") == status.BDAT_SYNTAX


async def test_dsn_parameters_are_queued_and_notify_success_gets_a_success_notice(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf, port = await _server(mailflow_server, relayhost=f"[127.0.0.1]:{peer.port}")
    c = await SmtpClient.connect(port)
    await c.envelope("ok@relay.test", " RET=HDRS ENVID=env+2Bid-1",
                     " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2Bx@relay.test")
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG + b"."))[0] == 250
    notices = await eventually(lambda: [m for m in peer.messages if m.mail_from == "<>"], timeout=10)
    assert [m.rcpt_tos for m in notices] == [["s@remote.test"]]
    report = email.message_from_bytes(notices[0].content, policy=email.policy.default)
    status_part = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    per_message, per_rcpt = status_part.get_payload()[0], status_part.get_payload()[1]
    assert per_message["Original-Envelope-Id"] == "env+id-1"
    assert per_rcpt["Action"] in ("delivered", "relayed")  # relayed: the peer does not offer DSN
    assert per_rcpt["Original-Recipient"].replace(" ", "") == "rfc822;Orig+x@relay.test"
    assert any(m.rcpt_tos == ["ok@relay.test"] and m.mail_from != "<>" for m in peer.messages)


async def test_bdat_chunks_are_delivered_byte_exact(mailflow_server, tmp_path):
    _, port = await _server(mailflow_server)
    part1, part2 = b"Subject: chunks\r\n\r\n.dot stays\r\n", b"second chunk\r\n"
    c = await SmtpClient.connect(port)
    await c.envelope()
    await c.send(f"BDAT {len(part1)}\r\n".encode() + part1)
    assert await c.reply() == status.bdat_chunk(len(part1))
    await c.send(f"BDAT {len(part2)} LAST\r\n".encode() + part2)
    assert (await c.reply())[0] == 250
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert msgs and msgs[0].endswith(b"\n\n.dot stays\nsecond chunk\n")


async def test_bdat_mixed_with_data_size_limit_and_no_rcpt(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server, smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 1000})
    c = await SmtpClient.connect(port)
    await c.envelope()
    await c.send(b"BDAT 5\r\nhello")
    assert (await c.reply())[0] == 250
    assert (await c.cmd("DATA"))[0] == 503
    assert (await c.cmd("RSET"))[0] == 250
    # the size limit holds across chunks
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    await c.send(b"BDAT 600\r\n" + b"a" * 600)
    assert (await c.reply())[0] == 250
    await c.send(b"BDAT 600 LAST\r\n" + b"b" * 600)
    assert await c.reply() == status.MESSAGE_TOO_BIG
    # without recipients the chunk is read and dropped, never taken for commands
    await c.send(b"BDAT 6 LAST\r\nQUIT\r\n")
    assert (await c.reply())[0] == 503
    assert (await c.cmd("NOOP"))[0] == 250
    await c.close()
    await sessions_over(mf)
    assert await mf.store.counts() == {} and _alice_mail(tmp_path) == []


async def test_refused_bdat_requests_are_logged_in_postfixs_words_by_queue_id(mailflow_server, caplog):
    """bdat_cmd's warnings: a null BDAT, a chunk past the size limit, a malformed BDAT (its line as sent); NOQUEUE
    until the transaction has its queue id (its first accepted recipient)."""
    mf, port = await _server(mailflow_server, smtpd={"message_size_limit": 1000})
    caplog.set_level(logging.INFO, logger="mailflow")
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert await c.cmd("BDAT 0") == status.NULL_BDAT
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    await c.send(b"BDAT 2000\r\n" + b"a" * 2000)
    assert await c.reply() == status.CHUNK_TOO_BIG
    assert await c.cmd("bdat  1 FIRST") == status.BDAT_SYNTAX
    await c.close()
    await sessions_over(mf)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    queue_id = re.search(r"(\w+): client=localhost", caplog.text)[1]
    assert lines == ["NOQUEUE: null BDAT request from localhost[127.0.0.1]",
                     f"{queue_id}: BDAT request from localhost[127.0.0.1] exceeds message size limit",
                     f"{queue_id}: malformed BDAT command syntax from localhost[127.0.0.1]: bdat  1 FIRST"]


async def test_a_bdat_last_refused_for_its_size_ends_the_whole_transaction(mailflow_server):
    """Its recipients too: a BDAT or DATA after it needs a new MAIL and RCPT (503). Postfix 3.7.11 keeps its
    recipient state there: a second oversized chunk 552, a DATA or a BDAT without LAST kills its smtpd
    (docs/security.md; tests/interop/test_dialogue_vs_postfix.py)."""
    mf, port = await _server(mailflow_server, smtpd={"message_size_limit": 1000})
    c = await SmtpClient.connect(port)
    await c.envelope()
    for after in (b"BDAT 2000 LAST\r\n" + b"a" * 1998, b"BDAT 4\r\nab", b"DATA"):  # (cmd() adds a CRLF)
        await c.send(b"BDAT 2000 LAST\r\n" + b"a" * 2000)
        assert await c.reply() == status.CHUNK_TOO_BIG
        assert await c.cmd(after) == status.NEED_RCPT
        assert (await c.cmd("RSET"))[0] == 250
        await c.envelope(ehlo=False)
    await c.close()


async def test_bdat_0_without_last_fails_the_transaction_as_postfix_does(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    await c.envelope()
    await c.send(b"BDAT 0\r\n")
    assert (await c.reply()).text == str(status.NULL_BDAT) == "551 5.7.1 Null BDAT request"
    await c.send(b"BDAT 5\r\nQUIT\r")  # read and discarded, never taken for a command
    assert (await c.reply()).text == "551 5.0.0 Discarded 5 bytes after earlier error"
    await c.send(b"BDAT 4 LAST\r\nab\r\n")  # the last chunk ends the failed transaction
    assert (await c.reply())[0] == 551
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 503  # no transaction any more
    await c.send_message(rcpt="alice@local.test")  # the next one is whole again
    await c.close()
    await sessions_over(mf)
    assert len(await eventually(lambda: _alice_mail(tmp_path))) == 1


# --- big content: spooled as it arrives ------------------------------------------------------------------------

def _spool_files(mf) -> list[str]:
    return sorted(p.name for p in mf.store.content_dir.iterdir())


async def _queued_content(mf, reply: str) -> bytes:
    queue_id = reply.rsplit(" ", 1)[1]
    content = await mf.store.content(queue_id)
    assert content is not None and not content.in_memory  # its body is in the queue's content file
    assert _spool_files(mf) == [queue_id]  # and the spool file it arrived in is gone
    return content.to_bytes()


async def test_big_data_is_spooled_queued_as_a_file_and_delivered_byte_exact(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    data = big_message()
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("RCPT TO:<bob@relay.test>"))[0] == 250  # no DNS: deferred, so the message stays queued
    assert (await c.cmd("DATA"))[0] == 354
    stuffed = re.sub(rb"(?m)^\.", b"..", data)
    for i in range(0, len(stuffed), 100_003):
        await c.send(stuffed[i:i + 100_003])
    await c.send(b".\r\n")
    code, reply = await c.reply()
    assert code == 250
    assert (await _queued_content(mf, reply)).endswith(data.split(b"\r\n\r\n", 1)[1])
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert msgs and msgs[0].endswith(lf(data.split(b"\r\n\r\n", 1)[1]))


async def test_big_bdat_content_is_spooled_too(mailflow_server, tmp_path):
    mf, port = await _server(mailflow_server)
    data = big_message(seed=3)
    c = await SmtpClient.connect(port)
    await c.envelope(rcpt="bob@relay.test")
    chunks = [data[i:i + 300_000] for i in range(0, len(data), 300_000)]
    for chunk in chunks[:-1]:
        await c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
        assert (await c.reply())[0] == 250
    await c.send(f"BDAT {len(chunks[-1])} LAST\r\n".encode() + chunks[-1])
    code, reply = await c.reply()
    assert code == 250
    assert (await _queued_content(mf, reply)).endswith(data.split(b"\r\n\r\n", 1)[1])


async def test_a_client_gone_in_the_middle_of_big_content_leaves_no_spool_file(mailflow_server):
    mf, port = await _server(mailflow_server)
    for command in ("DATA", "BDAT"):
        c = await SmtpClient.connect(port)
        await c.envelope()
        if command == "DATA":
            assert (await c.cmd("DATA"))[0] == 354
            await c.send(re.sub(rb"(?m)^\.", b"..", big_message()[:600_000]))
        else:
            await c.send(b"BDAT 600000\r\n" + big_message()[:300_000])
        await eventually(lambda: _spool_files(mf), timeout=5)  # past the memory limit: a file
        await c.close()
        await eventually(lambda: not _spool_files(mf), timeout=5)
    assert await mf.store.counts() == {}


@pytest.mark.parametrize("forbid_bare_newline", [True, False])
@pytest.mark.parametrize("text", [(b"y" * 998 + b"\r\n") * 400 + b"last line", b"L" * 400_000],
                         ids=["lines", "long-line"])
async def test_the_end_of_data_arriving_while_the_spool_writes_is_not_left_waiting(
        mailflow_server, tmp_path, monkeypatch, forbid_bare_newline, text):
    """The terminator can arrive while the DATA reader waits for its spool file's write (a thread): it must be
    looked at then, not only after more input that the client, waiting for its reply, never sends."""
    writing, release = threading.Event(), threading.Event()
    write_all = content_module._write_all

    def held_write(fd, data):  # the spool's first write waits until the test has sent the terminator
        if not writing.is_set():
            writing.set()
            release.wait(10)
        write_all(fd, data)

    monkeypatch.setattr(content_module, "_write_all", held_write)
    mf, port = await _server(mailflow_server, smtpd={"forbid_bare_newline": forbid_bare_newline})
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    body = b"Subject: t\r\n\r\n" + text
    await c.send(body)
    assert await asyncio.to_thread(writing.wait, 10)  # the reader waits for the write
    await c.send(b"\r\n.\r\n")
    await asyncio.sleep(0.2)  # the terminator is in the server's input buffer
    release.set()
    code, reply = await c.reply(timeout=5)
    assert code == 250, reply
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert msgs[0].endswith(lf(body.split(b"\r\n\r\n", 1)[1]) + b"\n")


# --- error limits (a listener with a fast tarpit, on a running mailflow's handler) ----------------------------

@pytest.fixture
async def limited_listener(mailflow_server):
    servers = []

    async def start(timeout: float = 30, **limits):
        mf = await mailflow_server()
        handler = mf.smtpd.listeners[0].handler
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SmtpSession(handler, sessions=set(), hostname=HOST, ident="ESMTP",
                                data_size_limit=10_000, enable_SMTPUTF8=True, decode_data=False, timeout=timeout,
                                protocol=ProtocolLimits.from_config(DEFAULTS.smtpd.model_copy(update=limits))),
            "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_hard_error_limit_disconnects_with_421(limited_listener):
    port = await limited_listener(soft_error_limit=2, hard_error_limit=5, error_sleep_time=0.05)
    c = await SmtpClient.connect(port)
    codes = [(await c.cmd("BOGUS"))[0] for _ in range(5)]
    assert codes == [500] * 5
    assert await c.cmd("NOOP") == status.too_many_errors(HOST)
    assert await c.closed()


async def test_a_session_past_session_time_limit_ends_at_its_next_command(limited_listener):
    port = await limited_listener(session_time_limit=0.6)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    replies = []
    for _ in range(10):  # a client that keeps a session alive with commands well inside the deadline
        reply = await c.cmd("NOOP")
        replies.append(reply[0])
        if reply[0] != 250:
            assert reply == status.session_too_long(HOST)
            break
        await asyncio.sleep(0.2)
    assert replies[-1] == 421 and 2 <= len(replies) <= 5
    assert await c.closed()


async def test_soft_error_limit_slows_every_reply_once_that_many_errors_were_made(limited_listener):
    """As Postfix (error_count >= smtpd_soft_error_limit): with a limit of 2, the first two errors are answered
    at once, and the reply after them waits error_sleep_time, whatever the command."""
    port = await limited_listener(soft_error_limit=2, hard_error_limit=50, error_sleep_time=0.3)
    c = await SmtpClient.connect(port)
    loop = asyncio.get_running_loop()

    async def timed(command: str) -> tuple[int | None, float]:
        t0 = loop.time()
        code = (await c.cmd(command))[0]
        return code, loop.time() - t0

    first, second = await timed("BOGUS"), await timed("BOGUS")
    assert first[0] == second[0] == 500 and first[1] < 0.3 and second[1] < 0.3
    code, waited = await timed("NOOP")
    assert code == 250 and waited >= 0.3


async def test_junk_commands_beyond_the_limit_count_as_errors(limited_listener):
    """As Postfix's `junk_cmds++ > limit` after each HELO, EHLO, NOOP, VRFY, RSET or ETRN: with a limit of 3 the
    fifth and sixth are errors, and the hard limit of 2 answers the seventh command 421."""
    port = await limited_listener(junk_command_limit=3, hard_error_limit=2, error_sleep_time=0)
    c = await SmtpClient.connect(port)
    codes = [(await c.cmd(line))[0] for line in ("EHLO client.test", "NOOP", "RSET", "HELO client.test", "NOOP",
                                                 "NOOP", "NOOP")]
    assert codes == [250] * 6 + [421]


async def _trickle(c: SmtpClient, piece: bytes, every: float, bound: float) -> float | None:
    """Send `piece` every `every` seconds until the server closes (returns when) or `bound` passes (None)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < bound:
        try:
            await c.send(piece)
            if await asyncio.wait_for(c.reader.read(4096), every) == b"":
                return loop.time() - t0
        except asyncio.TimeoutError:
            continue
        except OSError:
            return loop.time() - t0
    return None


async def test_command_trickle_is_cut_at_the_command_deadline(limited_listener):
    port = await limited_listener(timeout=0.5)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    took = await _trickle(c, b"x", 0.1, 3.0)
    assert took is not None and took < 1.5


async def test_slow_data_trickle_is_cut_by_the_data_rate(limited_listener):
    """Complete lines, but slower than min_data_rate: cut soon after `timeout` though input keeps coming."""
    port = await limited_listener(timeout=0.5, min_data_rate=500)
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    took = await _trickle(c, b"slow line\r\n", 0.1, 3.0)
    assert took is not None and took < 1.5


async def test_a_pipelined_burst_of_commands_gives_the_rest_of_the_server_its_turns(mailflow_server):
    """A thousand RCPTs in one write (RFC 2920) are answered from the input buffer without waiting for the client:
    the session hands the loop back every few dozen, so other sessions, deliveries and timers are not held up
    for the whole burst (Postfix's smtpd processes share only the CPU)."""
    mf, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).code == 250
    session = next(iter(mf.smtpd.sessions))
    await c.send(b"RCPT TO:<alice@local.test>\r\n" * 1000)
    taken, most_in_one_turn = 0, 0
    for _ in range(20_000):  # a loop turn each
        now = len(session.envelope.rcpt_tos)
        taken, most_in_one_turn = now, max(most_in_one_turn, now - taken)
        if taken == 1000:
            break
        await asyncio.sleep(0)
    assert taken == 1000
    assert most_in_one_turn <= 64, f"{most_in_one_turn} commands answered in one turn of the loop"


async def test_one_sessions_failure_does_not_touch_another_sessions_mail(mailflow_server, tmp_path):
    _, port = await _server(mailflow_server)
    good, bad = await SmtpClient.connect(port), await SmtpClient.connect(port)
    await good.envelope()
    await bad.envelope()
    assert (await good.cmd("DATA"))[0] == 354
    assert (await bad.cmd("DATA"))[0] == 354
    await good.send(b"Subject: good\r\n\r\npart one\r\n")
    await bad.send(b"Subject: bad\r\n\r\nevil\n.\n")
    assert (await bad.reply())[0] == 521
    await good.send(b"part two\r\n.\r\n")
    assert (await good.reply())[0] == 250
    msgs = await eventually(lambda: _alice_mail(tmp_path))
    assert len(msgs) == 1 and msgs[0].endswith(b"part one\npart two\n")


@pytest.mark.parametrize("site", ["relay.test.", "r\u00e9lay.test", "@relay.test.", "xn--rlay-bpa.test.",
                                  "relay.test\x1c", "relay.test\x1f", "relay.test\u0085", "relay.test\u00a0",
                                  "\u2003relay.test", "relay.test\x1ctail"])
async def test_etrn_takes_a_site_as_postfixs_valid_hostname_does(mailflow_server, site):
    """A trailing dot or a non-ASCII name is no host name to Postfix's ETRN (valid_hostname): 501, where mailflow
    used to start a flush of relay.test for `relay.test.` (checked against Postfix 3.7.11: test_smtpd_vs_postfix).
    The argument is split at ASCII white space only: \\x1c and U+00A0 are part of the site, as in Postfix."""
    mf = await mailflow_server(relay_domains=["relay.test"])
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    assert await client.cmd(f"ETRN {site}") == status.ETRN_BAD_SITE
    assert await client.cmd("ETRN relay.test") == status.ETRN_STARTED
    await client.close()


async def test_etrn_of_a_site_past_253_octets_is_no_flush_domain(mailflow_server):
    """Postfix's flush matches its domains with midna_domain_to_ascii's name, which refuses one past 253 octets: a
    254-octet site under relay.test, which valid_hostname takes, gets 459 (as Postfix 3.7.11: test_smtpd_vs_postfix)."""
    mf = await mailflow_server(relay_domains=["relay.test"])
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    for octets, expected in ((253, 250), (254, 459), (255, 459), (256, 501)):
        site = ".".join(["a" * 63] * 3 + ["b" * (octets - 203)]) + ".relay.test"
        assert len(site) == octets and (await client.cmd(f"ETRN {site}")).code == expected, octets
    await client.close()


async def test_mail_and_rcpt_parameters_are_split_at_ascii_white_space_only(mailflow_server):
    """`SIZE=1\\u00a0BODY=8BITMIME` is one malformed SIZE to Postfix (501), not two parameters."""
    _, port = await _server(mailflow_server)
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test> SIZE=1\u00a0BODY=8BITMIME")).code == 501
    assert (await c.cmd("MAIL FROM:<s@remote.test> SIZE=1\x0bBODY=8BITMIME")).code == 250  # (\\v is white space)
    assert (await c.cmd("RCPT TO:<alice@local.test> NOTIFY=NEVER\x1f")).code == 501
    assert (await c.cmd("RCPT TO:<alice@local.test> NOTIFY=NEVER")).code == 250
    await c.close()


async def test_replies_go_straight_to_the_transport_not_through_the_stream_writer(mailflow_server, monkeypatch):
    """A reply is written to the connection's transport itself (aiosmtpd's StreamWriter.write is a call more a
    reply, and its transport property another): the dialogue is the same, the server's stream writer unused, by
    the 421 of a timeout and of a stop too (one way to write a reply)."""
    mf, port = await _server(mailflow_server, smtpd={"timeout": "1s"})
    through_writer: list[int] = []
    write = asyncio.StreamWriter.write

    def recorded(writer, data):
        through_writer.append(writer.transport.get_extra_info("sockname")[1])
        write(writer, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", recorded)
    c = await SmtpClient.connect(port)
    await c.envelope()
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(MSG.decode() + "."))[0] == 250
    assert (await c.cmd("QUIT"))[0] == 221
    assert await c.closed()
    silent = await SmtpClient.connect(port)
    assert await silent.reply(timeout=5) == status.session_timeout(HOST)
    idle = await SmtpClient.connect(port)
    stopping = asyncio.create_task(mf.stop())
    assert await idle.reply() == status.shutting_down(HOST)
    await asyncio.wait_for(stopping, 3)
    assert port not in through_writer  # (the test client's own writes go through its stream writer)


async def test_only_a_command_already_followed_by_input_counts_toward_handing_the_loop_back(mailflow_server):
    """A client that waits for each reply never has the session count toward PIPELINED_TURN (the count starts
    again at each wait, with no call for it) nor ask the pipelining rules; one that pipelines has each command
    behind another counted, and all are answered."""
    mf, port = await _server(mailflow_server)

    def turns_taken(profile: cProfile.Profile, function: str = "_take_turns") -> int:
        return sum(calls for (file, _, name), (_, calls, *_rest) in pstats.Stats(profile).stats.items()
                   if name == function and file.endswith("protocol.py"))

    c = await SmtpClient.connect(port)
    profile = cProfile.Profile()
    profile.enable()
    try:
        await c.envelope()
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(MSG.decode() + "."))[0] == 250
        assert (await c.cmd("RSET"))[0] == 250
    finally:
        profile.disable()
    assert turns_taken(profile) == 0
    assert turns_taken(profile, "_out_of_sync") == 0  # (nor is the pipelining discipline asked: nothing waits)
    assert turns_taken(profile, "_on_input") <= 2  # (the data rate follows the content's reads, no command's)
    profile = cProfile.Profile()
    profile.enable()
    try:
        await c.send(b"RSET\r\n" * 70)
        assert [(await c.reply())[0] for _ in range(70)] == [250] * 70
    finally:
        profile.disable()
    assert turns_taken(profile) >= 60  # (each RSET whose successor had arrived by its reply)
    assert (await c.cmd("QUIT"))[0] == 221
