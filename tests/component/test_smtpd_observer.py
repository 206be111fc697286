"""smtpd's session observer (transcripts) and in-process policy hook, on a real server (tests.conftest's
`mailflow_server` and a Mailflow built the same way), seen from a real client.

The observer is off unless a consumer asks: without one no session keeps a transcript.
"""
from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from mailflow.stages.smtpd.transcript import SessionObserver, Transcript
from tests.support import LOOPBACK_CLIENT, eventually, send

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


class Recorder(SessionObserver):
    line_limit = 30
    byte_limit = 4096

    def __init__(self, fail: bool = False):
        self.events: list[tuple] = []
        self.fail = fail

    def started(self, transcript: Transcript) -> None:
        self.events.append(("started", transcript.client))

    def replied(self, transcript: Transcript, line: str) -> None:
        if self.fail:
            raise RuntimeError("an observer's bug")

    def queued(self, transcript: Transcript, queue_id: str) -> None:
        self.events.append(("queued", queue_id, transcript.snapshot()))

    def ended(self, transcript: Transcript) -> None:
        self.events.append(("ended", transcript.snapshot()))

    async def session_over(self) -> None:
        """Until the server has ended the session (after the client's QUIT: its end is the server's to see)."""
        await eventually(lambda: self.events and self.events[-1][0] == "ended", timeout=5, what="the session ended")


class Policy:
    """An in-process policy hook: refuses what its table says, per stage."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.asked: list[tuple] = []

    async def check(self, stage, facts, recipients):
        self.asked.append((stage, facts.sender, facts.recipient, recipients))
        return self.answers.get((stage, facts.recipient or facts.sender))


@pytest.fixture
def server(mailflow_server):
    async def start(observer=None, policy=None, **settings):
        return await mailflow_server(session_observer=observer, smtpd_policy=policy,
                                     **{"mynetworks": ["127.0.0.0/8"], **settings})

    return start


async def test_a_session_transcript_is_keyed_to_each_queued_message(server):
    recorder = Recorder()
    mf = await server(observer=recorder)
    port = mf.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("s@remote.test", ["alice@local.test"], MESSAGE)
        await client.sendmail("s@remote.test", ["bob@local.test"], MESSAGE)
        await client.sendmail("s@remote.test", ["bob@local.test"], MESSAGE)
    await recorder.session_over()
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["started", "queued", "queued", "queued", "ended"]
    (_, first_id, first), (_, second_id, second) = recorder.events[1:3]
    assert first.lines[-1] == ("S", f"250 2.0.0 Ok: queued as {first_id}")
    assert second.lines[-1] == ("S", f"250 2.0.0 Ok: queued as {second_id}")
    assert first.helo and first.client == LOOPBACK_CLIENT
    ended = recorder.events[-1][1]
    assert len(ended.lines) == Recorder.line_limit and ended.omitted > 0  # bounded: the rest is counted
    assert ("C", "RCPT TO:<alice@local.test>") in first.lines


async def test_without_peername_lookup_every_client_is_unknown(server, caplog):
    caplog.set_level("INFO", logger="mailflow")
    recorder = Recorder()
    mf = await server(observer=recorder, smtpd={"listen": ["127.0.0.1:0"], "peername_lookup": False})
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=mf.smtp_addresses[0][1]) as client:
        await client.sendmail("s@remote.test", ["alice@local.test"], MESSAGE)
    await recorder.session_over()
    assert recorder.events[1][2].client == "unknown[127.0.0.1]"
    assert "connect from unknown[127.0.0.1]" in caplog.text


async def test_no_observer_no_transcript(server):
    """No observer and notify_classes without a class of smtpd's (its default, resource and software, asks for
    the sessions, as Postfix's smtpd keeps their history for its postmaster notices): no transcript at all."""
    mf = await server(queue={"notify_classes": ["2bounce"]})
    port = mf.smtp_addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    [session] = list(mf.smtpd.sessions)
    assert session.transcript is None
    writer.close()


async def test_an_observer_that_fails_changes_nothing(server, caplog):
    mf = await server(observer=Recorder(fail=True))
    refused, reply = await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert reply.startswith("2.0.0 Ok: queued as")
    assert "session observer" in caplog.text


async def test_the_observer_can_hang_up_a_session(server):
    class HangUp(Recorder):
        def replied(self, transcript, line):
            if line.startswith("354"):
                transcript.hang_up()

    mf = await server(observer=HangUp())
    with pytest.raises(aiosmtplib.SMTPException):
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE + b"x" * 50_000)
    assert await mf.store.counts() == {}


async def test_the_policy_hook_answers_at_mail_rcpt_and_data(server):
    policy = Policy({("mail", "bad@remote.test"): "REJECT go away",
                     ("rcpt", "bob@local.test"): "450 4.2.0 Mailbox busy",
                     ("data", "alice@local.test"): "554 5.7.1 Spam",
                     ("rcpt", "alice@local.test"): "DUNNO"})
    mf = await server(policy=policy)
    port = mf.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as mail:
            await client.sendmail("bad@remote.test", ["alice@local.test"], MESSAGE)
        refusal = "5.7.1 <bad@remote.test>: Sender address rejected: go away"
        assert (mail.value.code, mail.value.message) == (554, refusal)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as rcpt:
            await client.sendmail("s@remote.test", ["bob@local.test"], MESSAGE)
        assert rcpt.value.recipients[0].code == 450
        assert rcpt.value.recipients[0].message == "4.2.0 <bob@local.test>: Recipient address rejected: Mailbox busy"
        with pytest.raises(aiosmtplib.SMTPDataError) as data:
            await client.sendmail("s@remote.test", ["alice@local.test"], MESSAGE)
        assert (data.value.code, data.value.message) == (554, "5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Spam")
    assert ("data", "s@remote.test", "alice@local.test", ("alice@local.test",)) in policy.asked
    assert await mf.store.counts() == {}


async def test_the_policy_hook_comes_before_the_restriction_lists(server):
    """A hook that has no opinion lets the usual checks decide (here: the unknown user)."""
    policy = Policy({})
    mf = await server(policy=policy, mynetworks=[])
    refused, _ = await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as unknown:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["nobody@local.test"], MESSAGE)
    assert unknown.value.recipients[0].code == 550
    assert [a[0] for a in policy.asked] == ["mail", "rcpt", "data", "mail", "rcpt"]


async def test_the_policy_hooks_warn_and_info_name_the_command_they_answer(server, caplog):
    """Postfix's log_whatsup names the command being checked: a WARN or INFO of the hook at MAIL is logged as `MAIL
    from`, one at RCPT as `RCPT from` (log watchers count them by command)."""
    caplog.set_level("INFO", logger="mailflow.smtpd")
    policy = Policy({("mail", "s@remote.test"): "WARN at mail", ("rcpt", "alice@local.test"): "INFO at rcpt"})
    mf = await server(policy=policy)
    refused, _ = await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    assert refused == {}
    lines = [r.getMessage() for r in caplog.records if ": warn: " in r.getMessage() or ": info: " in r.getMessage()]
    assert [line.split(" from ")[0] for line in lines] == ["NOQUEUE: warn: MAIL", "NOQUEUE: info: RCPT"]
    assert lines[0].startswith(f"NOQUEUE: warn: MAIL from {LOOPBACK_CLIENT}: at mail; from=<s@remote.test> proto=")
