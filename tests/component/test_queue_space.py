"""Free space in the queue's file system (Postfix smtpd_check_size): MAIL is refused with 452 4.3.1 while the
queue is short of space and accepted again as soon as space returns; and pickup backs off while the store fails.

The free space is the server's `shutil.disk_usage(queue_directory)`, replaced here by a value the test sets.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import threading

import pytest

from mailflow.clock import SystemClock, VirtualClock
from mailflow.content import Spool
from mailflow.maildrop import MaildropMessage, write_maildrop
from mailflow.faults import REPORT_INTERVAL
from mailflow.stages.pickup import Pickup
from mailflow.stages.smtpd import queuespace
from mailflow.stages.smtpd.queuespace import QueueSpace
from mailflow.stages.smtpd.handler import short_of_space
from mailflow.status import INSUFFICIENT_STORAGE
from tests.support import Reply, SmtpClient, eventually

MB = 1_000_000


def test_postfix_rule_for_free_space():
    # at least max(queue_minfree, 1.5 x message_size_limit) stays free
    assert short_of_space(free=6 * MB, minfree=0, size_limit=4 * MB, declared=0)
    assert not short_of_space(free=6 * MB + 1, minfree=0, size_limit=4 * MB, declared=0)
    assert short_of_space(free=9 * MB, minfree=12 * MB, size_limit=4 * MB, declared=0)
    # a declared SIZE must leave that much, and take at most half of what is free
    assert not short_of_space(free=20 * MB, minfree=0, size_limit=4 * MB, declared=3 * MB)
    assert short_of_space(free=9 * MB, minfree=0, size_limit=4 * MB, declared=3_500_000)
    assert short_of_space(free=4 * MB, minfree=0, size_limit=0, declared=2 * MB)
    assert not short_of_space(free=4 * MB, minfree=0, size_limit=0, declared=0)  # no limit, no minimum


@pytest.fixture
def free_space(monkeypatch):
    """The queue's free bytes as the server sees them; the test changes `free_space.bytes` (read at every MAIL:
    smtpd keeps none of its answers here)."""
    real = shutil.disk_usage
    monkeypatch.setattr(queuespace, "MAX_AGE", 0.0)

    class Space:
        bytes = 20 * MB

    def disk_usage(path):
        usage = real(path)
        return type(usage)(usage.total, usage.total - Space.bytes, Space.bytes)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return Space


async def mail(port: int, *params: str) -> Reply:
    client = await SmtpClient.connect(port)
    try:
        await client.cmd("EHLO client.test")
        return await client.cmd(" ".join(["MAIL FROM:<s@remote.test>", *params]))
    finally:
        await client.close()


async def test_mail_is_refused_while_the_queue_is_short_of_space_and_accepted_when_it_returns(mailflow_server,
                                                                                             free_space):
    mf = await mailflow_server(smtpd={"message_size_limit": 4 * MB}, queue={"queue_minfree": 0})
    port = mf.smtp_addresses[0][1]
    refused = INSUFFICIENT_STORAGE
    assert str(INSUFFICIENT_STORAGE) == "452 4.3.1 Insufficient system storage"
    assert (await mail(port))[0] == 250
    assert (await mail(port, "SIZE=3000000"))[0] == 250
    free_space.bytes = 9 * MB
    assert (await mail(port))[0] == 250
    assert await mail(port, "SIZE=3500000") == refused  # it would not leave 1.5 x message_size_limit
    free_space.bytes = 5 * MB
    assert await mail(port) == refused
    free_space.bytes = 50 * MB  # space returns: no restart needed
    assert (await mail(port))[0] == 250


async def test_a_refusal_for_lack_of_space_is_logged_as_postfix_logs_it(mailflow_server, free_space, caplog):
    """Postfix's smtpd_check_queue logs each refusal (`NOQUEUE: reject: MAIL from …`) and warns how much is free;
    pflogsumm and disk alerts look for both. The warning comes once a minute at most, not at every MAIL; it was
    not logged at all, nor the refusal."""
    mf = await mailflow_server(smtpd={"message_size_limit": 4 * MB}, queue={"queue_minfree": 0})
    free_space.bytes = 5 * MB
    with caplog.at_level(logging.INFO, logger="mailflow"):
        for _ in range(3):
            assert await mail(mf.smtp_addresses[0][1]) == INSUFFICIENT_STORAGE
    rejects = [r.getMessage() for r in caplog.records if "reject: MAIL" in r.getMessage()]
    assert rejects == ["NOQUEUE: reject: MAIL from localhost[127.0.0.1]: 452 4.3.1 Insufficient system storage; "
                       "from=<s@remote.test> proto=ESMTP helo=<client.test>"] * 3
    warnings = [r for r in caplog.records if "free space" in r.getMessage()]
    assert [(w.levelname, w.getMessage()) for w in warnings] == [
        ("WARNING", "not enough free space in mail queue: 5000000 bytes < 1.5*message size limit")]


async def test_the_free_space_is_read_off_the_event_loop_once_for_all_waiting_sessions():
    """statvfs may block (a queue file system that stopped answering): it runs in a thread, one read at a time
    for every caller, so the loop and the sessions that need no answer go on. It ran on the loop at every MAIL."""
    release, reads = threading.Event(), []

    def read() -> int:
        reads.append(threading.get_ident())
        assert release.wait(5)
        return 7 * MB

    clock = VirtualClock()
    space = QueueSpace(read, clock)
    waiting = [asyncio.ensure_future(space.free()) for _ in range(3)]
    await eventually(lambda: len(reads) == 1, timeout=5)  # the loop runs while the read blocks
    assert not any(w.done() for w in waiting)
    release.set()
    assert await asyncio.gather(*waiting) == [7 * MB] * 3
    assert reads[0] != threading.get_ident() and len(reads) == 1
    assert await space.free() == 7 * MB and len(reads) == 1  # kept about a second
    clock.advance(queuespace.MAX_AGE)
    assert await space.free() == 7 * MB and len(reads) == 2


async def test_a_free_space_that_cannot_be_read_takes_the_mail_and_warns_once_a_minute(caplog):
    def read() -> int:
        raise OSError(5, "Input/output error")

    clock = VirtualClock()
    space = QueueSpace(read, clock)
    with caplog.at_level(logging.WARNING, logger="mailflow"):
        assert [await space.free() for _ in range(3)] == [None] * 3
        clock.advance(REPORT_INTERVAL)
        assert await space.free() is None
    assert [r.getMessage() for r in caplog.records] == [
        "cannot read the queue's free space: [Errno 5] Input/output error"] * 2


async def test_queue_minfree_raises_the_minimum(mailflow_server, free_space):
    mf = await mailflow_server(smtpd={"message_size_limit": 1 * MB}, queue={"queue_minfree": 30 * MB})
    assert (await mail(mf.smtp_addresses[0][1]))[0] == 452
    free_space.bytes = 31 * MB
    assert (await mail(mf.smtp_addresses[0][1]))[0] == 250


# ---------------------------------------------------------------------------------------------- pickup


class FailingCleanup:
    """cleanup whose commit fails with a store fault while `broken`; records the submissions it was given."""

    def __init__(self, spool_directory):
        self.broken = True
        self.tries = 0
        self.queued = []
        self._spool_directory = spool_directory

    def new_spool(self, max_size=None):
        return Spool(self._spool_directory, max_size=max_size)

    async def submit(self, submission, *, hold=False):
        self.tries += 1
        if self.broken:
            raise sqlite3.OperationalError("database or disk is full")
        self.queued.append(submission)
        return f"Q{len(self.queued)}"


async def test_pickup_backs_off_while_the_store_fails_and_loses_nothing(tmp_path, caplog):
    cleanup = FailingCleanup(tmp_path)
    pickup = Pickup(tmp_path, cleanup, myhostname="h.test", clock=SystemClock(), interval=60)
    for n in range(5):
        write_maildrop(tmp_path / "maildrop", MaildropMessage(
            sender="alice@h.test", recipients=("bob@h.test",), uid=os.getuid(), user="alice"),
            [f"Subject: {n}\r\n\r\nx\r\n".encode()])
    await pickup.start()
    try:
        for _ in range(150):  # 1.5 s, woken every 10 ms (sendmail after sendmail)
            pickup.wake()
            await asyncio.sleep(0.01)
        assert 2 <= cleanup.tries <= 5, f"{cleanup.tries} submissions tried in 1.5 s of a broken store"
        messages = [r.getMessage() for r in caplog.records if "pickup" in r.getMessage()]
        assert len(messages) <= 2 and "database or disk is full" in messages[0]
        assert len(os.listdir(tmp_path / "maildrop")) == 5
        cleanup.broken = False
        await eventually(lambda: len(cleanup.queued) == 5, timeout=5)
        assert os.listdir(tmp_path / "maildrop") == []
    finally:
        await pickup.stop(grace=1)


async def test_pickup_ends_when_cancelled_as_it_is_woken(tmp_path):
    """A cancellation that comes in the same loop turn as a wake-up ends pickup's task (asyncio.run cancels every
    task at its end: a Sink never stopped left the interpreter hanging there, pickup waiting for its next scan)."""
    pickup = Pickup(tmp_path, FailingCleanup(tmp_path), myhostname="h.test", clock=SystemClock(), interval=60)
    await pickup.start()
    for _ in range(5):
        await asyncio.sleep(0)  # its first scan is over; it waits for a wake-up
    task = pickup._task
    pickup.wake()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(task), 5)
    await pickup.stop()
