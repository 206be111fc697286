"""smtpd's postmaster notices (stages/smtpd/postmaster.py): the classes of refusals, the wrapping, the bounds."""
from __future__ import annotations

import asyncio

from mailflow import status
from mailflow.config import DEFAULTS
from mailflow.stages.bounce import line_wrap
from mailflow.stages.smtpd.postmaster import BYTE_LIMIT, FLUSH_THRESHOLD, PENDING_LIMIT, SessionNotices
from mailflow.stages.smtpd.transcript import Transcript


def test_the_catalogue_files_refusals_in_postfixs_classes():
    """Each refusal carries the class Postfix's smtpd gives it where it makes it (smtpd.c's error_mask,
    smtpd_check.c's smtpd_check_reject, smtpd_sasl_glue.c): never derived from the reply's words."""
    host = "mx.test"
    assert {str(r): r.error_class for r in (
        status.relay_denied('"due to local problem"@elsewhere.test'), status.non_fqdn_helo("client"),
        status.invalid_helo("c_l"), status.non_fqdn_address("s@remote", "Sender address"),
        status.user_unknown("nobody@local.test"), status.AUTH_FAILED, status.AUTH_UNAVAILABLE,
        status.too_many_errors(host), status.TOO_MANY_RECIPIENTS, status.local_data_error(host),
        status.proxy_failed(host), status.NOT_RECOGNIZED, status.NESTED_MAIL, status.RECIPIENT_SYNTAX,
        status.INSUFFICIENT_STORAGE, status.QUEUE_ERROR, status.lookup_failed("a@b.test"),
        status.SERVER_CONFIGURATION_ERROR, status.session_timeout(host), status.shutting_down(host),
        status.NEED_HELO, status.MESSAGE_TOO_BIG, status.VRFY_DISABLED,
    )} == {
        '554 5.7.1 <"due to local problem"@elsewhere.test>: Relay access denied': "policy",
        "504 5.5.2 <client>: Helo command rejected: need fully-qualified hostname": "policy",
        "501 5.5.2 <c_l>: Helo command rejected: Invalid name": "policy",
        "504 5.5.2 <s@remote>: Sender address rejected: need fully-qualified address": "policy",
        "550 5.1.1 <nobody@local.test>: Recipient address rejected: User unknown in local recipient table": "bounce",
        "535 5.7.8 Error: authentication failed": None, "454 4.7.0 Temporary authentication failure": None,
        "421 4.7.0 mx.test Error: too many errors": "protocol", "452 4.5.3 Error: too many recipients": None,
        "421 4.3.0 mx.test Server local data error": "data", "421 4.3.0 mx.test Server local error": None,
        "500 5.5.2 Error: command not recognized": "protocol", "503 5.5.1 Error: nested MAIL command": "protocol",
        "501 5.1.3 Bad recipient address syntax": "protocol", "452 4.3.1 Insufficient system storage": "resource",
        "451 4.3.0 Error: queue file write error": "resource", "451 4.3.0 <a@b.test>: Temporary lookup failure": "data",
        "451 4.3.5 Server configuration error": "software", "421 4.4.2 mx.test Error: timeout exceeded": None,
        "421 4.3.2 mx.test Service shutting down, closing transmission channel": None,
        "503 5.5.1 Error: send HELO/EHLO first": "policy", "552 5.3.4 Error: message file too big": "bounce",
        "502 5.5.1 VRFY command is disabled": "policy",
    }


def test_line_wrap_is_postfixs():
    """Postfix's line_wrap(str, 78, 4): break before the word that passes the width, never inside a word."""
    assert line_wrap("Out: short", 78, 4) == ["Out: short"]
    long = "In:  RCPT TO:<" + "y" * 70 + "> NOTIFY=NEVER"
    assert line_wrap(long, 78, 4) == ["In:  RCPT", "    TO:<" + "y" * 70 + ">", "    NOTIFY=NEVER"]
    words = " ".join(["word"] * 30)
    wrapped = line_wrap(words, 78, 4)
    assert all(len(line) <= 78 for line in wrapped) and " ".join(wrapped).split() == words.split()


class _Config:
    def __init__(self, classes):
        self.myhostname = "mx.test"
        self.queue = DEFAULTS.queue.model_copy(update={"notify_classes": classes})


def _policy_session() -> tuple[SessionNotices, Transcript, list[str]]:
    """Notices for the class `policy`, a session begun (220 sent) and the bodies of the notices it queues."""
    submitted: list[str] = []

    async def submit(submission):
        submitted.append(b"".join(submission.content.parts).decode())
        return "Q1"

    notices = SessionNotices(_Config(("policy",)), submit)
    t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
    t.started()
    t.reply("220 mx.test ESMTP")
    return notices, t, submitted


async def test_a_record_is_bounded_and_so_are_the_notices_waiting_for_the_queue(caplog):
    """A session's record keeps BYTE_LIMIT bytes of lines (its notice says how many more there were); past
    PENDING_LIMIT notices waiting for cleanup, more are dropped; none is kept while no class of smtpd's is named."""
    release = asyncio.Event()
    submitted = []

    async def submit(submission):
        submitted.append(submission)
        await release.wait()
        return "Q1"

    notices = SessionNotices(_Config(("policy",)), submit)
    for n in range(PENDING_LIMIT + 3):
        t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
        t.started()
        t.command(b"RCPT TO:<x@elsewhere.test>")
        t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
        t.command(b"NOOP " + b"x" * 2000)  # (cut at MAX_LINE: 1000 characters)
        assert t.lines == []  # (the notices keep their own record)
        t.ended()
    await asyncio.sleep(0)  # (the submissions start)
    assert len(submitted) == PENDING_LIMIT
    # three dropped, one warning: a client erring in every session makes no line each
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1
    release.set()
    await notices.close()

    submitted.clear()
    t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
    t.started()
    t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
    for _ in range(FLUSH_THRESHOLD // 2 - 1):
        t.reply("x" * 2000)  # (a reply line per command, no command: never flushed)
    t.ended()
    await notices.close()
    [notice] = submitted
    body = b"".join(notice.content.parts)
    kept = (BYTE_LIMIT - 56) // 1006  # ("Out: " and an end counted with each line)
    assert body.count(b"x\r\n") == kept and f" ({FLUSH_THRESHOLD // 2 - 1 - kept} more lines".encode() in body

    notices.reconfigure(_Config(("2bounce", "delay")))  # (no class of smtpd's)
    assert not notices.active  # (a session makes no transcript for it)
    t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
    t.started()
    t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
    t.ended()
    assert submitted == [notice]


async def test_a_long_session_is_flushed_at_postfixs_threshold_and_ends_with_its_own_reason():
    """Postfix's smtpd_history_flush_threshold: at a checkpoint (HELO, EHLO, RSET, the end of a message), a record
    past FLUSH_THRESHOLD lines sends its notice (the refusal in it, no reason: the session goes on) if its errors are
    of a named class, then starts again with none; at XCLIENT's, whatever its length; the session's end sends the
    rest only with a new error, its reason the one the session set."""
    notices, t, submitted = _policy_session()
    t.command(b"RCPT TO:<x@elsewhere.test>")
    t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
    for n in range(60):
        t.command(b"NOOP")
        t.reply("250 2.0.0 Ok")
        if n == 40:
            t.checkpoint()  # (under the threshold: nothing)
    t.command(b"RSET")
    t.checkpoint()
    t.reply("250 2.0.0 Ok")
    t.command(b"QUIT")
    t.reply("221 2.0.0 Bye")
    t.ended()
    await notices.close()
    [flushed] = submitted
    assert "554 5.7.1 <x@elsewhere.test>: Relay access denied" in flushed and "Session aborted" not in flushed
    assert flushed.count(" In:  NOOP") == 60 and flushed.endswith(
        " In:  RSET\r\n\r\n\r\nFor other details, see the local mail logfile\r\n")

    submitted.clear()
    t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
    t.started()
    t.command(b"RCPT TO:<x@elsewhere.test>")
    t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
    t.command(b"XCLIENT NAME=other.test")
    t.checkpoint(everything=True)
    t.command(b"RCPT TO:<y@elsewhere.test>")
    t.reply("554 5.7.1 <y@elsewhere.test>: Relay access denied", "policy")
    t.reason = "timeout"
    t.ended()
    await notices.close()
    assert ["x@" in n and "XCLIENT" in n and "y@" not in n and "Session aborted" not in n for n in submitted] + [
        "y@" in n and "x@" not in n and "Session aborted, reason: timeout" in n for n in submitted] == \
        [True, False, False, True]


async def test_the_stop_waits_for_a_stalled_queue_a_bounded_time_and_no_line_of_its_own_is_logged(caplog):
    """close(timeout): a notice the queue does not take in time is cancelled and counted in a warning, so a stalled
    store cannot hold up the stop; a notice queued logs nothing of smtpd's own (Postfix's smtpd logs none:
    cleanup's lines name the message)."""
    stalled = asyncio.Event()

    async def submit(submission):
        if submission.envelope.recipients == ("stall@mx.test",):
            await stalled.wait()
        return "Q1"

    caplog.set_level("INFO", logger="mailflow.smtpd")
    for to in ("pm@mx.test", "stall@mx.test"):
        config = _Config(("policy",))
        config.queue = config.queue.model_copy(update={"error_notice_recipient": to})
        notices = SessionNotices(config, submit)
        t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
        t.started()
        t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
        t.ended()
        await asyncio.wait_for(notices.close(timeout=0.05), 5)
    assert [r.getMessage() for r in caplog.records] == [
        "postmaster notify: 1 notices not queued at the stop (the queue did not take them within 0.05 s)"]


async def test_each_line_of_a_multi_line_reply_counts_toward_the_flush_threshold():
    """A record keeps one string a line ("Out: ..."): a reply with a footer is two lines, as in Postfix's history,
    so 34 such refusals (1 + 34 * 3 = 103 lines) pass the threshold at the next checkpoint."""
    notices, t, submitted = _policy_session()
    for _ in range(34):
        t.command(b"RCPT TO:<x@elsewhere.test>")
        t.reply("554-5.7.1 <x@elsewhere.test>: Relay access denied\r\n554 5.7.1 see https://mx.test/help", "policy")
    t.checkpoint()
    await notices.close()
    [notice] = submitted
    assert notice.count("\r\n Out: 554-5.7.1") == 34 and notice.count("\r\n Out: 554 5.7.1 see") == 34
