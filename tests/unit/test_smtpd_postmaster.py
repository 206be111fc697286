"""smtpd's postmaster notices (stages/smtpd/postmaster.py): the classes of refusals, the wrapping, the bounds."""
from __future__ import annotations

import asyncio

from mailflow import status
from mailflow.config import DEFAULTS
from mailflow.stages.smtpd.postmaster import LINE_LIMIT, PENDING_LIMIT, SessionNotices, line_wrap, session_reason
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
        "421 4.3.0 mx.test Server local data error": "data", "421 4.3.0 mx.test Server local error": "software",
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
    assert line_wrap("Out: short") == ["Out: short"]
    long = "In:  RCPT TO:<" + "y" * 70 + "> NOTIFY=NEVER"
    assert line_wrap(long) == ["In:  RCPT", "    TO:<" + "y" * 70 + ">", "    NOTIFY=NEVER"]
    words = " ".join(["word"] * 30)
    assert all(len(line) <= 78 for line in line_wrap(words)) and " ".join(line_wrap(words)).split() == words.split()


def test_the_reason_of_an_aborted_session():
    assert session_reason([("C", "QUIT"), ("S", "221 2.0.0 Bye")]) == ""
    assert session_reason([("C", "RCPT TO:<a@b>"), ("S", "554 5.7.1 no")]) == "lost connection"
    assert session_reason([("S", "421 4.4.2 mx Error: timeout exceeded")]) == "timeout"
    assert session_reason([("S", "421 4.7.0 mx Error: too many errors")]) == "too many errors"


class _Config:
    def __init__(self, classes):
        self.myhostname = "mx.test"
        self.queue = DEFAULTS.queue.model_copy(update={"notify_classes": classes})


async def test_a_transcript_is_bounded_and_so_are_the_notices_waiting_for_the_queue():
    """A session's record keeps LINE_LIMIT lines (its notice says how many more there were); past
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
        for _ in range(LINE_LIMIT):
            t.command(b"RCPT TO:<x@elsewhere.test>")
            t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
        assert t.lines == []  # (the notices keep their own record)
        t.ended()
    await asyncio.sleep(0)  # (the submissions start)
    assert len(submitted) == PENDING_LIMIT
    body = b"".join(submitted[0].content.parts)
    assert body.count(b"\r\n In:  RCPT") == LINE_LIMIT // 2 and b" (200 more lines of the session not kept)" in body
    release.set()
    await notices.close()

    notices.reconfigure(_Config(("2bounce", "delay")))  # (no class of smtpd's)
    assert not notices.active  # (a session makes no transcript for it)
    t = Transcript(notices, "c.test[192.0.2.1]", lambda: None)
    t.started()
    t.reply("554 5.7.1 <x@elsewhere.test>: Relay access denied", "policy")
    t.ended()
    assert len(submitted) == PENDING_LIMIT
