"""`mailflow sendmail` as a user runs it: a real child process writing the maildrop, a real server picking it up.

The server is the in-process `mailflow_server` fixture; the command reads the same settings from the TOML file
`write_config` makes, so both use one queue directory.
"""
from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailflow.maildrop import maildrop_names, read_maildrop, wake_pickup
from mailflow.sendmail.settings import CACHE_NAME, cached_settings
from mailflow.sendmail import LINE_PIECE
from tests.support import ServerProcess, big_message, eventually, free_port, maildir_messages, queue_becomes

VENV_SCRIPT = Path(sys.executable).parent / "mailflow"


@pytest.fixture
def cfg(tmp_path, write_config):
    def make(**settings):
        queue = tmp_path / "queue"
        if not queue.exists():  # as on an installed system: the queue directory is there, server or not
            queue.mkdir()
        return write_config(tmp_path / "mailflow.toml", **settings)

    return make


async def run(config: Path | None, *args: str, stdin: bytes = b"", program: list[str] | None = None,
              env: dict | None = None) -> tuple[int, bytes, str]:
    command = (program or [sys.executable, "-m", "mailflow", "sendmail"]) + (["-C", str(config)] if config else [])
    proc = await asyncio.create_subprocess_exec(*command, *args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    return proc.returncode, out, err.decode()


def inbox(tmp_path: Path, user: str) -> list[bytes]:
    return maildir_messages(tmp_path / "mail" / user / "Maildir")


async def delivered(tmp_path: Path, user: str, count: int = 1, timeout: float = 20.0) -> list[bytes]:
    await eventually(lambda: len(inbox(tmp_path, user)) >= count, timeout=timeout)
    return inbox(tmp_path, user)


async def test_t_delivers_to_the_maildir_with_the_server_running(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    rc, _, err = await run(cfg(), "-t", stdin=b"To: alice@local.test\nSubject: hi\n\nbody\n")
    assert rc == 0 and err == "", err  # a server owns the queue: no warning
    [message] = await delivered(tmp_path, "alice")
    assert b"Subject: hi" in message and message.endswith(b"body\n")
    assert f"(mailflow, from userid {os.getuid()})".encode() in message


async def test_mail_waits_in_maildrop_and_is_delivered_by_the_scan_at_start(mailflow_server, cfg, tmp_path):
    config = cfg()
    rc, _, err = await run(config, "bob@local.test", stdin=b"Subject: later\n\nwaiting\n")
    assert rc == 0, err
    assert f"warning: no mailflow server is running on {tmp_path / 'queue'}" in err  # stored, but said
    drop = tmp_path / "queue" / "maildrop"
    assert len(maildrop_names(drop)) == 1
    # the periodic scan an hour away: only the one at the start can find the file (whatever the machine's pace)
    await mailflow_server(sendmail={"pickup_interval": 3600})
    [message] = await delivered(tmp_path, "bob")
    assert b"waiting" in message and maildrop_names(drop) == []


async def test_corrupt_file_is_moved_aside_and_reported_and_the_next_delivered(mailflow_server, cfg, tmp_path, caplog):
    config = cfg()
    drop = tmp_path / "queue" / "maildrop"
    drop.mkdir(parents=True)
    (drop / "0000000000000000GARBAGE").write_bytes(b"\x00\x01 not a maildrop file")
    rc, _, err = await run(config, "bob@local.test", stdin=b"Subject: good\n\ngood\n")
    assert rc == 0, err
    await mailflow_server()
    [message] = await delivered(tmp_path, "bob")
    assert b"good" in message
    assert (tmp_path / "queue" / "corrupt" / "0000000000000000GARBAGE").exists()
    assert any("GARBAGE: corrupt" in r.getMessage() for r in caplog.records)


async def test_t_with_bcc_removes_the_header_and_delivers_to_the_bcc_recipient(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    rc, _, err = await run(cfg(), "-t", stdin=b"To: alice@local.test\nBcc: bob@local.test\nSubject: b\n\nx\n")
    assert rc == 0, err
    for user in ("alice", "bob"):
        [message] = await delivered(tmp_path, user)
        assert b"Bcc" not in message.split(b"\n\n")[0]


async def test_a_resent_bcc_makes_a_resent_message_and_is_removed(mailflow_server, cfg, tmp_path):
    """cleanup sees the Resent-Bcc before it removes it (message_drop_headers), as Postfix's does: the message gets
    the Resent- fields it lacks, not Message-ID, Date and From (sendmail removed the field itself, so that cleanup
    never saw it; checked against Postfix 3.7.11: tests/interop/test_cleanup_content_vs_postfix.py)."""
    await mailflow_server()
    rc, _, err = await run(cfg(), "alice@local.test", stdin=b"Resent-Bcc: bob@local.test\nSubject: b\n\nx\n")
    assert rc == 0, err
    [message] = await delivered(tmp_path, "alice")
    head = message.split(b"\n\n")[0]
    assert b"Resent-Bcc" not in head
    assert [line.split(b":")[0] for line in head.split(b"\n")[-4:]] == [b"Subject", b"Resent-Message-ID",
                                                                      b"Resent-Date", b"Resent-From"]


async def test_t_adds_command_line_recipients(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    rc, _, err = await run(cfg(), "-t", "bob@local.test", stdin=b"To: alice@local.test\n\nx\n")
    assert rc == 0, err
    assert await delivered(tmp_path, "alice") and await delivered(tmp_path, "bob")


async def test_t_takes_a_quoted_local_part_with_a_space(mailflow_server, smtp_peer, cfg):
    """`To: "john smith"@relay.test` is a valid address: Postfix's sendmail -t sends to it; mailflow used to refuse
    the whole message (exit 64, bad address syntax)."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rc, _, err = await run(cfg(), "-t", stdin=b'To: "john smith"@relay.test, b@relay.test\nSubject: q\n\nx\n')
    assert rc == 0, err
    await eventually(lambda: len(peer.messages) == 1)
    assert sorted(peer.messages[0].rcpt_tos) == ['"john smith"@relay.test', "b@relay.test"]
    await queue_becomes(mf.store, {})


async def test_a_command_line_recipient_is_an_address_list(mailflow_server, smtp_peer, cfg):
    """Postfix's sendmail parses each recipient argument as an RFC 822 address list: `Joe <joe@x>` is joe@x,
    `x@y (comment)` is x@y, and `"a,b"@x` is one address. mailflow refused the first two (exit 64) and split the
    third at its comma, sending to two made-up addresses."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rc, _, err = await run(cfg(), "Joe User <joe@relay.test>", '"a,b"@relay.test', "c@relay.test (comment), d",
                           stdin=b"Subject: list\n\nx\n")
    assert rc == 0, err
    # (two deliveries: the relay.test recipients go by relay_transport, d@mx.mailflow.test by default_transport)
    await eventually(lambda: sum(len(m.rcpt_tos) for m in peer.messages) == 4)
    assert sorted(r for m in peer.messages for r in m.rcpt_tos) == ['"a,b"@relay.test', "c@relay.test",
                                                                    "d@mx.mailflow.test", "joe@relay.test"]
    await queue_becomes(mf.store, {})
    rc, _, err = await run(cfg(), "a@relay.test, <b@relay.test", stdin=b"Subject: list\n\nx\n")
    assert rc == 64 and "'a@relay.test, <b@relay.test': bad address syntax" in err  # none dropped unsaid


async def test_a_cr_inside_a_line_becomes_a_space_and_never_a_line_end(mailflow_server, smtp_peer, cfg):
    """Postfix stores a CR that is not part of a line end as a space (seen in its mbox and at its next hop:
    `Subject: hi Bcc: c@relay.test`). mailflow kept it, so -t took `Bcc: c@relay.test` for a header and added a
    recipient, and the next hop saw CR CR as the end of the header section (mailflow's From landed in the body)."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rc, _, err = await run(cfg(), "-t", stdin=b"To: a@relay.test\nSubject: hi\rBcc: c@relay.test\n\nbody\r\r.\rend\n")
    assert rc == 0, err
    rc, out, err = await run(cfg(), "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n"
                                                b"Subject: bs\r\rX: y\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert rc == 0 and b"250 2.0.0 Ok: queued" in out, (out, err)
    await eventually(lambda: len(peer.messages) == 2)
    by_rcpt = {tuple(m.rcpt_tos): m.content for m in peer.messages}
    head, _, body = by_rcpt[("a@relay.test",)].partition(b"\r\n\r\n")
    assert b"\r\nSubject: hi Bcc: c@relay.test\r\n" in head and b"\r\nFrom: " in head
    assert body == b"body  . end\r\n"
    assert b"\r\nSubject: bs  X: y\r\n" in by_rcpt[("b@relay.test",)].partition(b"\r\n\r\n")[0]
    await queue_becomes(mf.store, {})


async def test_bs_labels_the_mbox_from_lines_data_starts_with(mailflow_server, smtp_peer, cfg):
    """Under -bs, as Postfix's smtpd there: the `From ` lines (`>From ` too) DATA's content starts with become
    `X-Mailbox-Line:` header fields; the header fields after them were taken for the body."""
    peer = await smtp_peer()
    await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rc, out, err = await run(cfg(), "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n"
                                                b"From a@x.test Fri Dec  4\r\n>From b\r\nSubject: bs\r\n\r\n"
                                                b"From x\r\n.\r\nQUIT\r\n")
    assert rc == 0 and b"250 2.0.0 Ok: queued" in out, (out, err)
    await eventually(lambda: peer.messages, timeout=5)
    head, _, body = peer.messages[0].content.partition(b"\r\n\r\n")
    assert b"\r\nX-Mailbox-Line: From a@x.test Fri Dec  4\r\nX-Mailbox-Line: >From b\r\nSubject: bs\r\n" in head
    assert body == b"From x\r\n"


async def test_bs_leaves_from_lines_as_body_when_labelled_they_pass_header_size_limit(mailflow_server, smtp_peer,
                                                                                        cfg):
    """smtpd's DATA rule under -bs (mailflow.message.mailbox_line_room), decided on the whole line: a 200 KB From
    line was labelled on its first 64 KiB piece and the message bounced (header size exceeds limit) where DATA took
    it for body; 9000 `From a@b` lines (90 KB, 234 KB labelled) were all labelled and refused: as many as fit,
    labelled, are. Postfix labels them all and truncates a header field past header_size_limit (mime_state);
    mailflow, which refuses a header section past it, keeps the rest as body and queues both."""
    peer = await smtp_peer()
    await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    dialogue = b"HELO x\r\n"
    for rcpt, content in ((b"a", b"From " + b"x" * 200_000 + b"\r\n"), (b"b", b"From a@b\r\n" * 9000)):
        dialogue += b"MAIL FROM:<>\r\nRCPT TO:<%s@relay.test>\r\nDATA\r\n%sSubject: s\r\n\r\nb\r\n.\r\n" % (
            rcpt, content)
    rc, out, err = await run(cfg(), "-bs", stdin=dialogue + b"QUIT\r\n")
    assert rc == 0 and out.count(b"250 2.0.0 Ok: queued") == 2, (out, err)
    await eventually(lambda: len(peer.messages) == 2, timeout=10)
    by_rcpt = {tuple(m.rcpt_tos): m.content.partition(b"\r\n\r\n") for m in peer.messages}
    head, _, body = by_rcpt[("a@relay.test",)]
    assert b"X-Mailbox-Line" not in head  # (the long line reaches the peer folded at smtp_line_length_limit)
    assert body.replace(b"\r\n ", b"") == b"From " + b"x" * 200_000 + b"\r\nSubject: s\r\n\r\nb\r\n"
    labelled = 102_400 // len(b"X-Mailbox-Line: From a@b\r\n")  # (as many as fit, labelled, as smtpd's DATA)
    head, _, body = by_rcpt[("b@relay.test",)]
    assert head.count(b"\r\nX-Mailbox-Line: From a@b") == labelled
    assert body == b"From a@b\r\n" * (9000 - labelled) + b"Subject: s\r\n\r\nb\r\n"


async def test_bs_leaves_from_lines_as_body_when_the_fields_after_them_pass_header_size_limit(mailflow_server,
                                                                                          smtp_peer, cfg):
    """As smtpd's DATA (labelled_mailbox_lines): a From line that fits, labelled, followed by header fields that then
    pass header_size_limit, is left unlabelled (the whole content body, as cleanup takes a first line that is no
    field) and the message queued; -bs kept the label and the message was refused. Postfix queues it too (it labels
    the line and cuts the header section at the limit)."""
    peer = await smtp_peer()
    await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    fields = b"".join(b"X-Big-%d: %s\r\n" % (n, b"y" * 900) for n in range(120))  # (about 110 KB)
    content = b"From a@x.test Fri Dec  4\r\n" + fields + b"Subject: s\r\n\r\nb\r\n"
    rc, out, err = await run(cfg(), "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<b@relay.test>\r\nDATA\r\n"
                                                + content + b".\r\nQUIT\r\n")
    assert rc == 0 and b"250 2.0.0 Ok: queued" in out, (out, err)
    await eventually(lambda: peer.messages, timeout=10)
    head, _, body = peer.messages[0].content.partition(b"\r\n\r\n")
    assert b"X-Mailbox-Line" not in head
    assert body == content


async def test_bs_tests_the_mbox_lines_as_sent_and_ends_the_header_section_at_a_blank_after_them(
        mailflow_server, smtp_peer, cfg):
    """As Postfix's smtpd under -bs: `.From` is tested before unstuffing (a body line), and a line starting with a
    blank right after the From lines gets the empty line before it (Postfix ends the header section there; it was
    folded into the label, the Subject after it kept as a header)."""
    peer = await smtp_peer()
    await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    dialogue = b"HELO x\r\n"
    for rcpt, content in ((b"a", b".From a@x.test\r\nSubject: dot\r\n"), (b"b", b"From a@x.test\r\n cont\r\n"
                                                                            b"Subject: blank\r\n")):
        dialogue += b"MAIL FROM:<>\r\nRCPT TO:<%s@relay.test>\r\nDATA\r\n%s\r\nb\r\n.\r\n" % (rcpt, content)
    rc, out, err = await run(cfg(), "-bs", stdin=dialogue + b"QUIT\r\n")
    assert rc == 0 and out.count(b"250 2.0.0 Ok: queued") == 2, (out, err)
    await eventually(lambda: len(peer.messages) == 2, timeout=5)
    by_rcpt = {tuple(m.rcpt_tos): m.content.partition(b"\r\n\r\n") for m in peer.messages}
    head, _, body = by_rcpt[("a@relay.test",)]
    assert b"X-Mailbox-Line" not in head and body == b"From a@x.test\r\nSubject: dot\r\n\r\nb\r\n"
    head, _, body = by_rcpt[("b@relay.test",)]
    assert b"\r\nX-Mailbox-Line: From a@x.test\r\n" in head + b"\r\n"
    assert body == b" cont\r\nSubject: blank\r\n\r\nb\r\n"


async def test_bs_scripted_smtp_dialogue(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    script = (b"EHLO script.test\r\nMAIL FROM:<>\r\nRSET\r\nNOOP\r\nMAIL FROM:<root@mx.mailflow.test>\r\n"
              b"RCPT TO:<alice@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n"
              b"Subject: via -bs\r\n\r\n..dot-stuffed line\r\n.\r\nBOGUS\r\nQUIT\r\n")
    rc, out, err = await run(cfg(), "-bs", stdin=script)
    assert rc == 0, err
    codes = [line[:3] for line in out.decode().splitlines() if line[3:4] == " "]
    assert codes == [b"220"[:3].decode(), "250", "250", "250", "250", "250", "250", "250", "354", "250", "500",
                     "221"]
    assert "queued as" in out.decode()
    for user in ("alice", "bob"):
        [message] = await delivered(tmp_path, user)
        assert b"\n.dot-stuffed line\n" in message


async def test_bs_slows_down_past_the_soft_error_limit_and_ends_the_session_at_the_hard_one(cfg):
    """As Postfix's smtpd under -bs: from soft_error_limit errors on each reply waits error_sleep_time (the
    replies that are not errors too), and at hard_error_limit the session ends with a 421, the rest unread."""
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "soft_error_limit": 1, "hard_error_limit": 2,
                        "error_sleep_time": 0.25})
    started = time.monotonic()
    rc, out, _ = await run(config, "-bs", stdin=b"BOGUS\r\nNOOP\r\nNOOP\r\nBOGUS\r\nMAIL FROM:<>\r\nQUIT\r\n")
    elapsed = time.monotonic() - started
    assert rc == 0 and out.decode().splitlines()[1:] == [
        "500 5.5.2 Error: command not recognized", "250 2.0.0 Ok", "250 2.0.0 Ok",
        "500 5.5.2 Error: command not recognized", "421 4.7.0 mx.mailflow.test Error: too many errors"]
    assert elapsed >= 4 * 0.25  # the two NOOPs, the second error and the 421 each waited


async def test_bs_offers_size_and_refuses_a_message_declared_too_big(cfg):
    """Postfix's smtpd under -bs offers SIZE with message_size_limit and answers a bigger SIZE= at MAIL."""
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 1000})
    rc, out, _ = await run(config, "-bs", stdin=b"EHLO x\r\nMAIL FROM:<> SIZE=1001\r\nMAIL FROM:<> SIZE=1000\r\n"
                                              b"QUIT\r\n")
    assert rc == 0 and b"\r\n250-SIZE 1000\r\n" in out
    assert b"552 5.3.4 Message size exceeds fixed limit\r\n250 2.1.0" in out


async def test_bs_splits_mail_parameters_at_ascii_white_space_only(cfg):
    """As smtpd (Postfix's smtpd_token): `SIZE=1001<U+00A0>BODY=8BITMIME` is one malformed SIZE, a vertical tab
    separates the path from its parameters."""
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 1000})
    rc, out, _ = await run(config, "-bs", stdin="EHLO x\r\nMAIL FROM:<> SIZE=1\u00a0BODY=8BITMIME\r\n"
                                              "MAIL FROM:<>\x0bSIZE=1001\r\nQUIT\r\n".encode())
    assert rc == 0 and b"\r\n501 5.5.4 Bad message size syntax\r\n552 5.3.4 Message size exceeds fixed limit\r\n" in out


async def test_bs_keeps_body_as_the_body_type_and_offers_dsn_whose_parameters_go_to_the_maildrop(cfg, tmp_path):
    """BODY= is the message's body type, as -B (Postfix's smtpd records it as the encoding). DSN is offered, as
    Postfix's smtpd offers it under -bs: MAIL's RET and ENVID and each recipient's NOTIFY and ORCPT are kept in
    the maildrop file, a malformed one refused in Postfix's words, a recipient without them kept without."""
    script = (b"EHLO x\r\nMAIL FROM:<> RET=HDRS RET=FULL\r\nMAIL FROM:<> BODY=7BIT RET=hdrs ENVID=batch+2B7\r\n"
              b"RCPT TO:<bob@local.test> NOTIFY=SOMETIMES\r\n"
              b"RCPT TO:<bob@local.test> NOTIFY=success,failure ORCPT=rfc822;first+40x.test\r\n"
              b"RCPT TO:<alice@local.test>\r\nDATA\r\n\r\nx\r\n.\r\nQUIT\r\n")
    rc, out, _ = await run(cfg(), "-bs", stdin=script)
    assert rc == 0 and b"\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n" in out, out
    assert b"501 5.5.4 Bad RET parameter syntax\r\n250 2.1.0 Ok\r\n" \
        b"501 5.5.4 Error: Bad NOTIFY parameter syntax\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n" in out, out
    maildrop = tmp_path / "queue" / "maildrop"
    [stored] = [read_maildrop(maildrop / name) for name in maildrop_names(maildrop)]
    assert (stored.body_type, stored.ret, stored.envid) == ("7BIT", "HDRS", "batch+7")
    assert (stored.recipients, stored.rcpt_notify, stored.rcpt_orcpt) == (
        ("bob@local.test", "alice@local.test"), ("SUCCESS,FAILURE", ""), ("rfc822;first@x.test", ""))


async def test_bs_takes_no_dsn_or_body_type_from_the_command_line(cfg, tmp_path):
    """-N, -R, -V and -B do not apply to mail given under -bs, as Postfix's smtpd there takes none of them (its
    queue file has no notify_flags nor ret_flags): what the dialogue says is all, per recipient."""
    script = (b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.test> NOTIFY=SUCCESS\r\nRCPT TO:<alice@local.test>\r\n"
              b"DATA\r\n\r\nx\r\n.\r\nQUIT\r\n")
    rc, out, _ = await run(cfg(), "-N", "never", "-R", "hdrs", "-V", "cmdline", "-B", "8BITMIME", "-bs", stdin=script)
    assert rc == 0 and b"queued as" in out, out
    maildrop = tmp_path / "queue" / "maildrop"
    [stored] = [read_maildrop(maildrop / name) for name in maildrop_names(maildrop)]
    assert (stored.notify, stored.ret, stored.envid, stored.body_type) == ("", "", "", "")
    assert stored.rcpt_notify == ("SUCCESS", "")


async def test_bs_dsn_is_queued_and_asked_for_notices_carry_orcpt_and_envid(mailflow_server, cfg, tmp_path):
    """NOTIFY=SUCCESS to a local mailbox: the sender gets a success notice naming the ORCPT and the ENVID, as a
    notice for mail taken over SMTP does; the recipient still waiting shows its DSN parameters in `queue show`."""
    mf = await mailflow_server(relayhost="[127.0.0.1]:9")  # (refused: relay.test's mail stays deferred)
    config = cfg()
    script = (b"EHLO x\r\nMAIL FROM:<alice@local.test> ENVID=batch+2B7 RET=HDRS\r\n"
              b"RCPT TO:<bob@local.test> NOTIFY=SUCCESS ORCPT=rfc822;first+40x.test\r\n"
              b"RCPT TO:<carol@relay.test> NOTIFY=FAILURE ORCPT=utf-8;\\x{E9}@x.test\r\n"
              b"DATA\r\nSubject: dsn via -bs\r\n\r\nx\r\n.\r\nQUIT\r\n")
    rc, out, err = await run(config, "-bs", stdin=script)
    assert rc == 0 and b"queued as" in out, (out, err)
    [notice] = await delivered(tmp_path, "alice")
    assert b"Original-Envelope-Id: batch+7\n" in notice, notice
    assert b"Final-Recipient: rfc822; bob@local.test\nOriginal-Recipient: rfc822;first@x.test\n" \
        b"Action: delivered\n" in notice
    assert b"carol" not in notice and b"Subject: dsn via -bs" in notice
    [message] = await eventually(lambda: mf.store.message_page(queues=("deferred",)), timeout=10)
    rc, shown, _ = await run(None, "queue", "show", message.queue_id, "--headers-only", "-c", str(config),
                             program=[sys.executable, "-m", "mailflow"])
    assert rc == 0, shown
    assert "dsn:            envid=batch+7 ret=HDRS\n" in shown.decode()
    assert "recipient:      carol@relay.test\n  dsn:          notify=FAILURE orcpt=utf-8;\u00e9@x.test\n" \
        in shown.decode()


async def test_bs_keeps_a_line_longer_than_its_read_limit_whole(cfg, tmp_path):
    """A DATA line past the 64 KB that -bs reads at a time stays one line (it was cut in two with a CRLF put in
    between), as Postfix's smtpd keeps it; a CR at the cut is still half of the line end, and a long line
    that starts with a dot is unstuffed once."""
    long_line = b"c" * (LINE_PIECE - 1) + b"\r"  # (the read stops right after the CR of the line end)
    script = (b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n\r\n" + long_line + b"\n"
              + b".." + b"d" * LINE_PIECE + b"\r\n.\r\nQUIT\r\n")
    rc, out, _ = await run(cfg(), "-bs", stdin=script)
    assert rc == 0 and b"250 2.0.0 Ok: queued as" in out, out
    [name] = maildrop_names(tmp_path / "queue" / "maildrop")
    stored = (tmp_path / "queue" / "maildrop" / name).read_bytes()
    assert stored.endswith(b"\n\r\n" + long_line[:-1] + b"\r\n." + b"d" * LINE_PIECE + b"\r\n")


async def test_bs_answers_a_command_line_too_long_once(cfg):
    """A command line past `[smtpd] max_line_length` is read to its end and answered once, as smtpd answers it:
    one past the 64 KB read at a time was taken as two commands (two replies: a pipelining client's replies no
    longer matched its commands), and a shorter one was taken whole (a 3000-byte address)."""
    script = (b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<" + b"l" * 3000 + b"@local.test>\r\nRCPT TO:<" + b"m" * 70000
              + b"@local.test>\r\nRCPT TO:<" + b"n" * 2025 + b"@local.test>\r\nNOOP\r\nQUIT\r\n")
    rc, out, _ = await run(cfg(), "-bs", stdin=script)  # (the last RCPT: 2048 bytes with its CRLF, taken)
    assert rc == 0
    assert out.split(b"\r\n")[3:7] == [b"500 5.5.2 Error: line too long"] * 2 + [b"250 2.1.5 Ok", b"250 2.0.0 Ok"]


async def test_bs_answers_vrfy_as_postfixs_stand_alone_smtpd(cfg):
    """Under -bs Postfix's smtpd runs no restriction list: VRFY's argument is checked for syntax only and named in
    the 252 (`Joe <a@b>` as written, a last SMTPUTF8 word dropped); disable_vrfy_command applies there too."""
    rc, out, _ = await run(cfg(), "-bs", stdin=b"HELO x\r\nVRFY a@local.test\r\nQUIT\r\n")
    assert b"\r\n502 5.5.1 VRFY command is disabled\r\n" in out, out  # (mailflow's default)
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "disable_vrfy_command": False})
    rc, out, _ = await run(config, "-bs", stdin=b"HELO x\r\nVRFY Joe  <nobody@local.test> SMTPUTF8\r\nVRFY\r\n"
                                              b"VRFY <a b@local.test>\r\nQUIT\r\n")
    assert rc == 0
    assert b"\r\n252 2.0.0 Joe <nobody@local.test>\r\n501 5.5.4 Syntax: VRFY address [SMTPUTF8]\r\n" \
           b"501 5.1.3 Bad recipient address syntax\r\n221 " in out, out


async def test_bs_refuses_a_sender_the_user_may_not_use(cfg, tmp_path):
    config = cfg(sendmail={"local_login_sender_maps": ["inline:{nobody-else=*}"]})
    rc, out, _ = await run(config, "-bs", stdin=b"HELO x\r\nMAIL FROM:<ceo@bank.test>\r\nQUIT\r\n")
    assert rc == 0 and b"553 5.7.1" in out


async def test_without_i_a_lone_dot_ends_the_message_and_with_i_it_does_not(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    text = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert (await run(cfg(), "alice@local.test", stdin=text))[0] == 0
    assert (await run(cfg(), "-oi", "bob@local.test", stdin=text))[0] == 0
    [cut] = await delivered(tmp_path, "alice")
    [whole] = await delivered(tmp_path, "bob")
    assert b"before" in cut and b"after" not in cut
    assert whole.endswith(b"before\n.\nafter\n")


async def test_f_and_F_set_the_sender_and_the_from_header(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    rc, _, err = await run(cfg(), "-f", "alice@local.test", "-F", "Alice Liddell", "bob@local.test",
                           stdin=b"Subject: s\n\nx\n")
    assert rc == 0, err
    [message] = await delivered(tmp_path, "bob")
    assert b"Return-Path: <alice@local.test>" in message
    assert b"From: Alice Liddell <alice@local.test>" in message


async def test_f_takes_the_address_of_a_mailbox_as_postfix_parses_it(mailflow_server, cfg, tmp_path):
    """Postfix's sendmail parses -f as an address list and takes the first address: `Joe <joe@x>` and
    `joe@x (Joe)` are joe@x (more than one: a warning, the first). mailflow exited 64, bad address syntax."""
    await mailflow_server()
    rc, _, err = await run(cfg(), "-f", "Alice <alice@local.test>", "bob@local.test", stdin=b"Subject: 1\n\nx\n")
    assert rc == 0 and err == "", err
    rc, _, err = await run(cfg(), "-r", "alice@local.test (Alice), carol@local.test", "bob@local.test",
                           stdin=b"Subject: 2\n\nx\n")
    assert rc == 0, err
    assert err == ("sendmail: warning: -f option specified malformed sender: alice@local.test (Alice), "
                   "carol@local.test\n")
    messages = await delivered(tmp_path, "bob", count=2)
    assert all(b"Return-Path: <alice@local.test>\n" in m for m in messages)


async def test_r_is_f(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    assert (await run(cfg(), "-r", "alice@local.test", "bob@local.test", stdin=b"\nx\n"))[0] == 0
    [message] = await delivered(tmp_path, "bob")
    assert b"Return-Path: <alice@local.test>" in message


async def test_a_sender_the_login_does_not_own_is_refused_with_77(cfg, tmp_path):
    config = cfg(sendmail={"local_login_sender_maps": ["inline:{nobody-else=*}"]})
    rc, _, err = await run(config, "-f", "ceo@bank.test", "bob@local.test", stdin=b"\nx\n")
    assert rc == 77 and "local_login_sender_maps" in err
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []


async def test_a_user_not_in_authorized_submit_users_gets_77(cfg, tmp_path):
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    rc, _, err = await run(cfg(sendmail={"authorized_submit_users": [f"!{me}", "static:anyone"]}), "bob@local.test",
                           stdin=b"\nx\n")
    assert rc == 77 and "authorized_submit_users" in err


async def test_no_recipients_is_a_usage_error(cfg):
    rc, _, err = await run(cfg(), stdin=b"\nx\n")
    assert rc == 64 and "no recipients" in err
    rc, _, err = await run(cfg(), "-t", stdin=b"Subject: nobody\n\nx\n")
    assert rc == 64 and "no recipient addresses found in the message header (-t)" in err
    for empty in ("", ","):  # an address list without an address: no word of -t, which was not given
        rc, _, err = await run(cfg(), empty, stdin=b"Subject: nobody\n\nx\n")
        assert rc == 64 and "sendmail: no recipient addresses found on the command line" in err, err


async def test_an_empty_recipient_is_refused_not_stored_for_pickup_to_set_aside(cfg, tmp_path):
    """`sendmail '<>'` (or `RCPT TO:< >` under -bs) must not exit 0 with a maildrop file pickup can only call
    corrupt: the null address is no recipient."""
    config = cfg()
    for arg in ("<>", "< >"):
        rc, _, err = await run(config, arg, stdin=b"Subject: x\n\nbody\n")
        assert rc == 64 and "bad address syntax" in err
    rc, out, _ = await run(config, "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:< >\r\nQUIT\r\n")
    assert b"\r\n501 " in out or b"\r\n553 " in out
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []


async def test_bytes_that_are_not_utf8_on_the_command_line_are_a_usage_error_or_kept(cfg, tmp_path):
    """A recipient or -f with a byte that is not UTF-8 is bad address syntax (64), not a traceback (exit 1);
    such a byte in -F or $NAME is kept in the stored full name (`fullname_bytes`, base64: the byte itself, which
    cleanup writes in the From it adds, as Postfix's; `fullname` has U+FFFD for it, for an older pickup)."""
    config = cfg()
    bad = os.fsdecode(b"b\xffob@local.test")
    for args in ((bad,), ("-f", bad, "bob@local.test")):
        rc, _, err = await run(config, *args, stdin=b"Subject: x\n\nbody\n")
        assert rc == 64 and "bad address syntax" in err and "Traceback" not in err
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []
    rc, _, err = await run(config, "-F", os.fsdecode(b"N\xffame"), "bob@local.test", stdin=b"\nbody\n")
    assert rc == 0, err
    [name] = maildrop_names(tmp_path / "queue" / "maildrop")
    assert '"fullname": "N\ufffdame"' in (tmp_path / "queue" / "maildrop" / name).read_text("utf-8")
    assert read_maildrop(tmp_path / "queue" / "maildrop" / name).fullname.encode(
        "utf-8", "surrogateescape") == b"N\xffame"


async def test_sendmail_terminated_mid_message_leaves_no_file_in_the_maildrop(cfg, tmp_path):
    """SIGTERM (or SIGHUP) while the message is read: the unfinished hidden file is removed, as Postfix's postdrop
    removes its own; it used to stay in maildrop/ for ever."""
    config = cfg()
    drop = tmp_path / "queue" / "maildrop"
    for number in (signal.SIGTERM, signal.SIGHUP):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailflow", "sendmail", "-C", str(config),
                                                    "bob@local.test", stdin=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(b"Subject: half\n\n" + b"x" * 100_000 + b"\n")
        await proc.stdin.drain()
        await eventually(lambda: drop.is_dir() and os.listdir(drop), timeout=10)  # being written
        proc.send_signal(number)
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode == -number
        assert os.listdir(drop) == []


async def test_sendmail_under_nohup_ignores_a_hangup_and_stores_the_message(cfg, tmp_path):
    """A SIGHUP the caller ignores (nohup) stays ignored, as with Postfix's postdrop: the message is stored."""
    drop = tmp_path / "queue" / "maildrop"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg()),
                                                "bob@local.test", stdin=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.stdin is not None
    proc.stdin.write(b"Subject: nohup\n\n" + b"x" * 100_000 + b"\n")
    await proc.stdin.drain()
    await eventually(lambda: drop.is_dir() and os.listdir(drop), timeout=10)  # being written
    proc.send_signal(signal.SIGHUP)
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0
    assert len(maildrop_names(drop)) == 1


async def test_bs_refuses_recipients_past_the_recipient_limit(cfg, tmp_path):
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "recipient_limit": 2})
    rcpts = b"".join(b"RCPT TO:<u%d@local.test>\r\n" % i for i in range(3))
    rc, out, _ = await run(config, "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\n" + rcpts + b"QUIT\r\n")
    assert rc == 0 and out.count(b"250 2.1.5") == 2 and b"452 4.5.3 Error: too many recipients" in out


def test_bs_ends_quietly_when_the_client_stops_reading_the_replies(cfg):
    """A script that closes its end of sendmail -bs's standard output: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg()), "-bs"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.read(3) == b"220"
    proc.stdout.close()
    _, err = proc.communicate(b"HELO x\r\n" + b"NOOP\r\n" * 2000 + b"QUIT\r\n", timeout=20)
    assert proc.returncode == 0 and b"Traceback" not in err and b"Exception" not in err, err


def test_bv_to_a_reader_that_goes_away_exits_1_without_a_traceback(cfg):
    """`sendmail -bv … | head -1`: a BrokenPipeError traceback; click's commands (`mailflow address`) exit 1."""
    proc = subprocess.Popen([sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg()), "-bv",
                             *(f"u{n}@remote.test" for n in range(2000))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"address:")
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err) == (1, b"")


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_stored_message_exits_0_though_its_warnings_cannot_be_written(cfg, tmp_path, verbose):
    """Standard error on a pipe nobody reads: the warning that no server runs (and -v's line), written after the
    message is stored, fail with EPIPE. The exit code says the mail is stored (0): a caller that retried on 1
    would send it twice."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg()), *verbose,
                               "bob@local.test"], input=b"Subject: once\n\nbody\n", stderr=write_end, timeout=20)
    finally:
        os.close(write_end)
    assert done.returncode == 0
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1


def test_closed_standard_streams_are_dev_null(cfg, tmp_path):
    """Run with standard input (or error) closed, as cron jobs and daemons may: an empty message is queued (and
    an error is reported nowhere, with its exit code), as Postfix's sendmail does; it was a traceback."""
    command = [sys.executable, "-m", "mailflow", "sendmail", "-C", str(cfg())]
    closing = ["sh", "-c", 'exec "$@" <&-', "sh"]  # the shell closes standard input, then runs the command
    done = subprocess.run(closing + command + ["bob@local.test"], stderr=subprocess.PIPE, timeout=20)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1
    closing[2] = 'exec "$@" <&- 2>&-'
    assert subprocess.run(closing + command + ["<a@local.test"], timeout=20).returncode == 64


async def test_a_queue_directory_that_does_not_exist_is_refused_naming_it(write_config, tmp_path):
    """A wrong configuration (or a relative path taken from the wrong place) must not strand mail where no server
    looks: nothing is stored, exit 73."""
    config = write_config(tmp_path / "mailflow.toml", queue_directory=str(tmp_path / "nowhere"))
    rc, _, err = await run(config, "bob@local.test", stdin=b"\nx\n")
    assert rc == 73
    assert f"the queue directory {tmp_path / 'nowhere'} does not exist" in err and "queue_directory" in err
    assert not (tmp_path / "nowhere").exists()


async def test_a_maildrop_that_is_a_symbolic_link_is_never_followed(cfg, tmp_path):
    """Whoever may write in the queue directory (its owner) could make maildrop/ a link to root's directories (a
    cron.d): root's sendmail wrote its file there. Refused, 73, as pickup refuses to scan it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "queue").mkdir(exist_ok=True)
    (tmp_path / "queue" / "maildrop").symlink_to(elsewhere)
    rc, _, err = await run(cfg(), "bob@local.test", stdin=b"Subject: x\n\nx\n")
    assert rc == 73 and "maildrop is not a directory (a symbolic link is never followed)" in err, err
    assert list(elsewhere.iterdir()) == []


async def test_a_message_that_cannot_be_stored_exits_73_with_a_reason(cfg, tmp_path):
    (tmp_path / "queue").write_text("not a directory")
    rc, _, err = await run(cfg(), "bob@local.test", stdin=b"\nx\n")
    assert rc == 73 and "message not stored" in err


async def test_a_message_over_the_size_limit_exits_65_and_leaves_nothing(cfg, tmp_path):
    config = cfg(smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": 100_000})
    rc, _, err = await run(config, "bob@local.test", stdin=b"Subject: big\n\n" + b"y" * 79 * 5_000 + b"\n")
    assert rc == 65 and "message file too big" in err and "message_size_limit" in err
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []
    rc, out, _ = await run(config, "-bs", stdin=b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n"
                           + b"y" * 78 * 2_000 + b"\r\n.\r\nNOOP\r\nQUIT\r\n")
    codes = [line[:3] for line in out.decode().splitlines() if line[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "354", "552", "250", "221"]  # the rest of DATA read, not run
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []


async def test_a_big_message_is_streamed_through_to_the_mailbox(mailflow_server, cfg, tmp_path):
    await mailflow_server()
    data = big_message()
    rc, _, err = await run(cfg(), "-i", "alice@local.test", stdin=data)
    assert rc == 0, err
    [message] = await delivered(tmp_path, "alice", timeout=10)
    assert message.endswith(data.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))


async def test_N_never_and_success(mailflow_server, cfg, tmp_path):
    mf = await mailflow_server()
    assert (await run(cfg(), "-f", "alice@local.test", "-N", "success", "bob@local.test", stdin=b"\nx\n"))[0] == 0
    [notice] = await delivered(tmp_path, "alice")
    assert b"Action: delivered" in notice
    assert (await run(cfg(), "-f", "alice@local.test", "-N", "never", "nosuchuser@local.test", stdin=b"\nx\n"))[0] == 0
    # picked up (the maildrop file goes after the commit), then done with: a notice would be queued before that
    await eventually(lambda: maildrop_names(tmp_path / "queue" / "maildrop") == [])
    await queue_becomes(mf.store, {})
    assert len(inbox(tmp_path, "alice")) == 1  # the bounce NOTIFY=NEVER asked not to get


async def test_bad_dsn_option_values_are_warned_about_and_the_mail_still_goes(mailflow_server, cfg, tmp_path):
    """Postfix's sendmail warns about a bad -N or -R value ("bad -N option value -- ignored") and sends the mail;
    mailflow exited 64 and the mail was lost. An ENVID of printable ASCII with spaces is taken, as Postfix does."""
    await mailflow_server()
    rc, _, err = await run(cfg(), "-N", "sometimes", "-R", "most", "-V", "batch 7", "alice@local.test",
                           stdin=b"Subject: dsn typo\n\nx\n")
    assert rc == 0, err
    assert err.splitlines() == ["sendmail: warning: bad -N option value -- ignored",
                                "sendmail: warning: bad -R option value -- ignored"]
    [message] = await delivered(tmp_path, "alice")
    assert b"Subject: dsn typo" in message


async def test_a_recipient_with_nothing_after_the_at_bounces_at_once_as_bad_syntax(mailflow_server, cfg, tmp_path):
    """`sendmail bob@`: Postfix takes it (exit 0) and bounces it at once, 5.1.3 bad address syntax; it used to be
    deferred, "bad SMTP nexthop", until the queue lifetime ran out."""
    mf = await mailflow_server()
    rc, _, err = await run(cfg(), "-f", "alice@local.test", "bob@", stdin=b"Subject: lost\n\nx\n")
    assert rc == 0, err
    [notice] = await delivered(tmp_path, "alice")
    assert b"Status: 5.1.3" in notice and b"bad address syntax" in notice
    await queue_becomes(mf.store, {})


async def test_a_recipient_whose_domain_is_a_bad_address_literal_bounces_at_once(mailflow_server, cfg, tmp_path):
    """`sendmail bob@[1.2.3]`: Postfix's resolve flags a domain that is no host name nor address literal
    (valid_ipv4_hostaddr: "invalid octet count") and its qmgr bounces it, 5.1.3 bad address syntax; mailflow
    deferred it ("mail system configuration error: bad SMTP nexthop") until the queue lifetime ran out."""
    mf = await mailflow_server()
    rc, _, err = await run(cfg(), "-f", "alice@local.test", "bob@[1.2.3]", stdin=b"Subject: lost\n\nx\n")
    assert rc == 0, err
    [notice] = await delivered(tmp_path, "alice", timeout=30)  # (returns as soon as the notice is there)
    assert b"Status: 5.1.3" in notice and b"bad address syntax" in notice
    await queue_becomes(mf.store, {})


async def test_a_literal_never_closed_is_queued_closed_as_postfix_queues_it(cfg, tmp_path):
    """`sendmail bob@[192.0.2.1`: Postfix 3.7's tokenizer closes the literal and queues bob@[192.0.2.1] (exit 0);
    mailflow stored it unclosed and bounced it 5.1.3."""
    rc, _, err = await run(cfg(), "bob@[192.0.2.1", '"joe@x.test', stdin=b"Subject: closed\n\nx\n")
    assert rc == 0, err
    drop = tmp_path / "queue" / "maildrop"
    [name] = maildrop_names(drop)
    assert read_maildrop(drop / name).recipients == ("bob@[192.0.2.1]", "joe@x.test")


@pytest.mark.parametrize("args", [["-t"], ["bob@local.test"]])
async def test_a_header_section_past_header_size_limit_is_refused_at_once(cfg, tmp_path, args):
    """-t missed every recipient past the limit (`no recipient addresses found`, or a Cc dropped and the message
    bounced by cleanup after exit 0); without -t cleanup bounced it after exit 0. Now 65, nothing stored. mailflow's
    own limit: Postfix's applies to each field (its sendmail -t queued this, exit 0), mailflow's cleanup bounds the
    section it holds (docs/sendmail.md)."""
    head = b"To: bob@local.test\n" + b"".join(b"X-H%d: %070d\n" % (n, 0) for n in range(2000))
    rc, _, err = await run(cfg(), *args, stdin=head + b"Cc: alice@local.test\n\nbody\n")
    assert rc == 65 and "the header section is larger than header_size_limit (102400 bytes)" in err, err
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []


async def test_a_long_first_body_line_is_body_and_delivered(mailflow_server, cfg, tmp_path):
    """`sendmail bob < report.log`: a first line longer than header_size_limit that is no header field is the
    body's (Postfix's is_header); cleanup took it for an endless header section and bounced the message 5.3.4."""
    await mailflow_server()
    document = b"2026-12-06 04:00:01 backup done: " + b"7, " * 100_000 + b"0\n"
    rc, _, err = await run(cfg(), "alice@local.test", stdin=document)
    assert rc == 0, err
    [message] = await delivered(tmp_path, "alice", timeout=5)
    assert message.endswith(b"\n\n" + document)


async def test_a_recipient_beginning_with_a_dash_bounces_whatever_its_transport(mailflow_server, smtp_peer, cfg,
                                                                                 tmp_path):
    """`sendmail -- -oQ@relay.test`: Postfix takes it (exit 0) and bounces it, 5.1.3 bad address syntax, because
    its trivial-rewrite flags an address beginning with '-' (allow_min_user = no) whatever the transport; mailflow
    used to relay it to the next hop, which may hand it to a command as an option."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    rc, _, err = await run(cfg(), "-f", "alice@local.test", "--", "-oQ@relay.test", stdin=b"Subject: dash\n\nx\n")
    assert rc == 0, err
    [notice] = await delivered(tmp_path, "alice")
    assert b"Status: 5.1.3" in notice and b"bad address syntax" in notice and b"<-oQ@relay.test>" in notice
    await queue_becomes(mf.store, {})
    assert peer.messages == []


async def test_v_reports_the_maildrop_file(cfg):
    rc, _, err = await run(cfg(), "-v", "bob@local.test", stdin=b"\nx\n")
    assert rc == 0 and "queued as maildrop/" in err


async def test_sendmail_only_options_are_ignored_and_unknown_ones_refused(cfg, tmp_path):
    rc, _, err = await run(cfg(), "-oem", "-odb", "-U", "-L", "lbl", "--", "bob@local.test", stdin=b"\nx\n")
    assert rc == 0, err
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1
    rc, _, err = await run(cfg(), "-Z", "bob@local.test", stdin=b"\nx\n")  # as Postfix's getopt refuses it
    assert rc == 64 and err.startswith("sendmail: invalid option -- 'Z'\n"), err
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1


async def test_bh_exits_at_once_without_reading_or_storing(cfg, tmp_path):
    rc, out, err = await run(cfg(), "-bh", "bob@local.test", stdin=b"\nx\n")
    assert (rc, out, err) == (0, b"", "")
    assert maildrop_names(tmp_path / "queue" / "maildrop") == []


async def test_bp_lists_the_queue(mailflow_server, cfg, tmp_path):
    await mailflow_server(relayhost="[127.0.0.1]:9")
    assert (await run(cfg(), "someone@relay.test", stdin=b"\nx\n"))[0] == 0
    async def listed():
        rc, out, _ = await run(cfg(), "-bp")
        return rc == 0 and b"someone@relay.test" in out

    await eventually(listed, step=0.1, what="the message in `sendmail -bp`")


async def test_q_flushes_deferred_mail_silently(mailflow_server, cfg):
    """As Postfix's `sendmail -q`: nothing on stdout (cron mails any output), the deferred mail retried now."""
    mf = await mailflow_server(relayhost="[127.0.0.1]:9")
    assert (await run(cfg(), "someone@relay.test", stdin=b"\nx\n"))[0] == 0
    await queue_becomes(mf.store, {"deferred": 1})
    [qid] = await mf.store.message_ids(queues=("deferred",))
    tried = (await mf.store.message_detail(qid)).attempts
    assert await run(cfg(), "-q") == (0, b"", "")

    async def retried():
        return (await mf.store.message_detail(qid)).attempts > tried

    await eventually(retried, step=0.1, what="the flushed message tried again")


async def test_bv_explains_the_route(cfg):
    rc, out, _ = await run(cfg(), "-bv", "alice@local.test")
    assert rc == 0 and b"transport:" in out and b"local" in out


async def test_bv_routes_as_mail_from_the_f_sender(cfg):
    config = cfg(relayhost="[192.0.2.1]", sender_dependent_relayhost_maps=["inline:{ {@acct.test = [192.0.2.2]} }"])
    rc, out, _ = await run(config, "-bv", "-f", "alice@acct.test", "x@remote.test")
    assert rc == 0 and b"nexthop:     [192.0.2.2]" in out, out
    rc, out, _ = await run(config, "-bv", "x@remote.test")
    assert rc == 0 and b"nexthop:     [192.0.2.1]  (relayhost)" in out, out


async def test_bv_without_f_routes_as_mail_from_the_login_name(cfg):
    login = pwd.getpwuid(os.getuid()).pw_name
    config = cfg(myorigin="origin.test", relayhost="[192.0.2.1]",
                 sender_dependent_relayhost_maps=[f"inline:{{ {{{login}@origin.test = [192.0.2.3]}} }}"])
    rc, out, _ = await run(config, "-bv", "x@remote.test")
    assert rc == 0 and b"nexthop:     [192.0.2.3]" in out, out


async def test_bi_newaliases_succeeds(cfg):
    assert (await run(cfg(), "-bi"))[0] == 0


async def test_invoked_as_sendmail_and_mailq_through_links(cfg, tmp_path):
    if not VENV_SCRIPT.exists():
        pytest.fail(f"{VENV_SCRIPT} missing: install the package into the venv (pip install -e .)")
    for name in ("sendmail", "mailq"):
        (tmp_path / name).symlink_to(VENV_SCRIPT)
    env = {"MAILFLOW_CONFIG": str(cfg())}
    rc, _, err = await run(None, "-t", stdin=b"To: bob@local.test\n\nx\n", program=[str(tmp_path / "sendmail")],
                           env=env)
    assert rc == 0, err
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1
    rc, out, err = await run(None, program=[str(tmp_path / "mailq")], env=env)
    assert "no queue database" in err  # it ran mailq (nothing has been queued yet), not sendmail


async def test_under_soft_bounce_a_refused_message_stays_in_the_maildrop_unreturned(mailflow_server, cfg, tmp_path,
                                                                                   caplog):
    """Postfix 3.7.11 with soft_bounce: cleanup cannot bounce a sendmail message it refuses (seen on a private
    Postfix with a header_checks REJECT), so it stays in the maildrop, refused again at each scan, and nobody gets a
    notice. Here a mail loop (hopcount_limit) is the refusal."""
    settings = {"soft_bounce": True, "hopcount_limit": 1}
    config = cfg(**settings)
    mf = await mailflow_server(**settings)
    rc, _, err = await run(config, "bob@local.test", stdin=b"Received: from a\nReceived: from b\nSubject: loop\n\nx\n")
    assert rc == 0, err
    await eventually(lambda: "not returned to <" in caplog.text, timeout=5)
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1
    assert "sender non-delivery notification" not in caplog.text
    assert await mf.store.counts() == {}
    for _ in range(3):  # wake-up scans (a sendmail each) pass a kept file by: no work, no log line each
        await mf.pickup.scan()
    assert caplog.text.count("not returned to <") == 1


async def test_a_kept_file_is_tried_every_pickup_interval_however_many_wake_ups_come(mailflow_server, cfg,
                                                                                      tmp_path, caplog):
    """Only a scan that no wake-up came before was periodic: a sendmail (any user's) every interval or more often
    put the periodic scan off for good, and a file kept for the periodic scans (soft_bounce here; one that could
    not be read) was never tried again. The periodic scan is due every pickup_interval whatever the wake-ups."""
    settings = {"soft_bounce": True, "hopcount_limit": 1, "sendmail": {"pickup_interval": 1}}
    config = cfg(**settings)
    mf = await mailflow_server(**settings)
    rc, _, err = await run(config, "bob@local.test", stdin=b"Received: from a\nReceived: from b\nSubject: loop\n\nx\n")
    assert rc == 0, err
    await eventually(lambda: "not returned to <" in caplog.text, timeout=5)
    end = time.monotonic() + 3.5
    while time.monotonic() < end:  # a wake-up every 0.3 s, as sendmail gives (wake_pickup)
        assert wake_pickup(mf.config.queue_path)
        await asyncio.sleep(0.3)
    assert 3 <= caplog.text.count("not returned to <") <= 6  # the first, then about one a second
    assert len(maildrop_names(tmp_path / "queue" / "maildrop")) == 1


LOADED_MODULES = """\
import atexit, sys
atexit.register(lambda: print("loaded:", " ".join(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["mailflow", "sendmail"] + sys.argv[1:]
from mailflow.cli import main
main()
"""


@pytest.mark.parametrize("args, stdin", [(("-t",), b"To: bob@local.test\n\nx\n"), (("-bs",), b"QUIT\r\n")])
async def test_deliver_and_bs_start_without_typer_or_the_server(cfg, tmp_path, args, stdin):
    """sendmail runs once per message: its entry (mailflow.cli.main) hands deliver and -bs their arguments before
    the command table loads typer, and neither loads the server (stages, store, app, queue tools, router) nor the
    libraries only the server uses (docs/performance.md, "Start-up of the command-line tools")."""
    rc, _, err = await run(cfg(), *args, stdin=stdin, program=[sys.executable, "-c", LOADED_MODULES])
    assert rc == 0, err
    [loaded] = [line.split()[1:] for line in err.splitlines() if line.startswith("loaded:")]
    heavy = ("typer", "click", "aiosmtpd", "aiosqlite", "aiohttp", "mailflow.cli.commands", "mailflow.cli.server",
             "mailflow.cli.queue", "mailflow.stages", "mailflow.store", "mailflow.app", "mailflow.queue_tools",
             "mailflow.routing", "mailflow.transports")
    assert [m for m in loaded if m.split(".")[0] in heavy or any(m == h or m.startswith(h + ".") for h in heavy)] == []
    assert "mailflow.sendmail" in loaded and "mailflow.config" in loaded  # (it did run sendmail)


@pytest.mark.parametrize("args, stdin, code", [(("-t",), b"To: bob@local.test\n\nx\n", 78), (("-bs",), b"QUIT\r\n", 78),
                                               (("-bv", "bob@local.test"), b"", 2), (("-bi",), b"", 2)])
async def test_a_bad_configuration_names_file_key_and_reason(tmp_path, args, stdin, code):
    """Deliver and -bs exit 78 (EX_CONFIG); the modes that are other commands keep the command's exit code (2)."""
    config = tmp_path / "bad.toml"
    config.write_text('myhostname = "mx.test"\n[queue]\nqueue_run_delay = "soon"\n')
    rc, out, err = await run(config, *args, stdin=stdin)
    assert (rc, out) == (code, b"")
    assert err.startswith(f"mailflow: {config}: queue.queue_run_delay: "), err


BS_DIALOGUE = (b"EHLO client.test\r\nMAIL FROM:<root@local.test>\r\nRCPT TO:<bob@local.test>\r\nVRFY x\r\nRSET\r\n"
               b"QUIT\r\n")


async def test_serve_records_sendmails_settings_and_sendmail_then_starts_without_the_model(tmp_path, write_config):
    """`mailflow serve` records the settings of its configuration file at its start and at each reload
    (mailflow/sendmail/settings.py); deliver and -bs then load neither pydantic nor mailflow.config, say what
    they say without the record, and the mail goes through."""
    port = free_port()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": [f"127.0.0.1:{port}"]})
    record = tmp_path / "queue" / CACHE_NAME
    server = ServerProcess(config, tmp_path / "server.log", port)
    await server.start()
    try:
        await eventually(record.exists, timeout=10, what="the settings recorded at the start")
        for args, stdin in (("-t",), b"To: bob@local.test\nSubject: fast\n\nx\n"), (("-bs",), b"QUIT\r\n"):
            rc, _, err = await run(config, *args, stdin=stdin, program=[sys.executable, "-c", LOADED_MODULES])
            assert rc == 0, err
            [loaded] = [line.split()[1:] for line in err.splitlines() if line.startswith("loaded:")]
            model = [m for m in loaded if m.split(".")[0] == "pydantic" or m.split(".")[:2] == ["mailflow", "config"]]
            assert model == []  # (mailflow.config_source, a leaf, is not the model)
            assert "mailflow.sendmail" in loaded
        [message] = await delivered(tmp_path, "bob")
        assert b"Subject: fast" in message

        config.write_text(config.read_text().replace('myhostname = "mx.mailflow.test"', 'myhostname = "mx2.test"'))
        assert cached_settings(str(config)) is None  # (changed: until the server has read it again)
        server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: cached_settings(str(config)), timeout=10, what="the settings recorded at reload")
        assert cached_settings(str(config)).myhostname == "mx2.test"
    finally:
        await server.terminate()
    fast = await run(config, "-bs", stdin=BS_DIALOGUE)
    record.unlink()  # the full path: the same words
    assert fast == await run(config, "-bs", stdin=BS_DIALOGUE)
    assert b"220 mx2.test ESMTP" in fast[1] and b"250 2.1.5 Ok" in fast[1]


async def test_a_refused_message_is_returned_without_its_bcc(mailflow_server, cfg, tmp_path):
    """Postfix's cleanup returns a message it refuses (header_checks REJECT) from its queue file, whose Bcc it had
    removed (message_drop_headers): the notice to the sender quotes no Bcc (mailflow's quoted the maildrop file's
    header section, Bcc and all)."""
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: nope/ REJECT refused\n")
    await mailflow_server(checks={"header_checks": [f"regexp:{checks}"]})
    rc, _, err = await run(cfg(checks={"header_checks": [f"regexp:{checks}"]}), "-f", "alice@local.test", "-t",
                           stdin=b"To: carol@elsewhere.test\nBcc: secret@elsewhere.test\nSubject: nope\n\nx\n")
    assert rc == 0, err
    [notice] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"), timeout=10)
    assert b"Subject: nope" in notice and b"To: carol@elsewhere.test" in notice
    assert b"\nBcc:" not in notice
