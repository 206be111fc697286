"""The Sink's virtual clock and qmgr's own timers: a destination's rate-delay pause and its dead-site memory are
timers qmgr sets on the clock, not due times in the store; `advance` stops at each of them on the way and `settle`
counts mail that waits only for one as settled (nothing can happen before the clock moves). So is the retry of a
record the store refused. What a client waits for on the wire (the AUTH failure delay) is real time."""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time

import aiosmtplib
import pytest

from mailflow.capture.mailbox import WaitTimeout
from mailflow.testing import Sink


RELAY = {"relay_domains": ["example.com"], "relay_transport": "smtp",
         "queue": {"minimal_backoff_time": "5m", "maximal_backoff_time": "1h", "initial_destination_concurrency": 1}}


async def send(sink: Sink, rcpt: str, subject: str) -> None:
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("app@shop.test", [rcpt], f"Subject: {subject}\r\n\r\nHello.\r\n".encode())


def sent_times(sink: Sink) -> list[float]:
    history = sink.server.capture.history._events
    return sorted(e.time for events in history.values() for e in events if e.event == "sent")


def reasons(sink: Sink) -> list[str]:
    history = sink.server.capture.history._events
    return [e.fields.get("reason", "") for events in history.values() for e in events if e.event == "deferred"]


async def test_advance_delivers_rate_delayed_mail_the_delay_apart():
    """settle() and advance() raised TimeoutError ({'active': 2}): the paused jobs waited on qmgr's timer, which
    advance never stepped to, while settle counted them as busy."""
    async with Sink(virtual_time=True, queue={"destination_rate_delay": "10s"}) as sink:
        start = sink.clock.time()
        for n in range(3):
            await send(sink, "bob@example.org", f"n{n}")
        await sink.settle()  # the first delivered, the others paused: settled, as nothing happens before 10 s
        assert len(sink.messages) == 1
        await sink.advance(30)
        assert len(sink.messages) == 3
        first, second, third = sent_times(sink)
        assert first - start < 1 and (second - first, third - second) == (10, 10)
        assert sink.clock.time() == start + 30


async def test_settle_returns_while_mail_waits_out_the_rate_delay():
    async with Sink(virtual_time=True, queue={"destination_rate_delay": "1h"}) as sink:
        for n in range(2):
            await send(sink, "bob@example.org", f"n{n}")
        await sink.settle(timeout=5)
        assert len(sink.messages) == 1
        await sink.advance(minutes=59)
        assert len(sink.messages) == 1
        await sink.advance(minutes=1)
        assert len(sink.messages) == 2


async def test_a_dead_destination_s_memory_runs_out_under_advance():
    """A destination that refused is dead for minimal_backoff_time: mail for it then is deferred unattempted, and
    once that time is over under advance() qmgr holds it dead no longer."""
    async with Sink(virtual_time=True, **RELAY) as sink:
        dest = sink.destination("example.com")
        dest.refuses().times(1).then(250)
        start = sink.clock.time()
        await send(sink, "bob@example.com", "first")
        await sink.settle()
        [(_, _, _, _, _, failures, dead_until, _, _)] = sink.server.qmgr.destinations()
        assert failures == 1 and dead_until >= start + 300
        await sink.advance(minutes=2)
        await send(sink, "carol@example.com", "second")  # deferred unattempted: the site is held dead
        await sink.settle()
        assert dest.messages == [] and any("delivery temporarily suspended" in reason for reason in reasons(sink))
        await sink.advance(seconds=dead_until - sink.clock.time())
        assert sink.server.qmgr.destinations() == []  # its memory ran out on time: alive, forgotten
        await sink.advance(minutes=10)
        assert sorted(m.rcpt_tos[0] for m in dest.messages) == ["bob@example.com", "carol@example.com"]


async def test_advance_fires_pauses_and_retries_in_order():
    """The rate delay's pauses (qmgr's timers) and a deferred message's retry (the store's due time) in one span:
    each happens at its own time, in order."""
    settings = {**RELAY, "queue": {**RELAY["queue"], "transport_destination_rate_delay": {"smtp": "10s"}}}
    async with Sink(virtual_time=True, **settings) as sink:
        dest = sink.destination("example.com")
        dest.answers(451, "4.2.0 Try later").times(1).then(250)
        start = sink.clock.time()
        for user in ("ann", "bob", "cat"):
            await send(sink, f"{user}@example.com", user)
        await sink.advance(minutes=10)
        assert [m.rcpt_tos for m in dest.messages] == [["bob@example.com"], ["cat@example.com"], ["ann@example.com"]]
        first, second, retried = (t - start for t in sent_times(sink))
        assert (first, second) == (10, 20) and 300 <= retried <= 340


async def queue_counts_of(sink: Sink) -> dict:
    return {queue: n for queue, n in (await sink.server.store.counts()).items() if n}


class StoreFault:
    """The store's `method` fails with a store fault (disk full) while `broken` is set, or only for its first
    `times` calls when given; counts the tries."""

    def __init__(self, sink: Sink, method: str, times: int | None = None):
        store = sink.server.store
        works = getattr(store, method)
        self.broken, self.tries = True, 0

        async def failing(*args, **kw):
            self.tries += 1
            if self.broken and (times is None or self.tries <= times):
                raise sqlite3.OperationalError("database or disk is full")
            return await works(*args, **kw)
        setattr(store, method, failing)


async def test_records_retried_after_a_store_fault_wait_on_the_virtual_clock():
    """settle() raised TimeoutError ({'active': 1}) when the store refused qmgr's record of a delivery: the record's
    retry sleeps on the virtual clock, which nothing moved while settle waited, and advance() settles first. Now the
    retry is a timer like the others: settle counts records waiting for it (one asleep until the retry, the other in
    line behind its probe) as settled, and advance steps to it."""
    async with Sink(virtual_time=True) as sink:
        faults = StoreFault(sink, "finish")
        await send(sink, "bob@example.org", "one")
        await send(sink, "carol@example.org", "two")
        await sink.settle(timeout=5)
        assert len(sink.messages) == 2 and faults.tries == 1  # delivered; the second record in line behind the probe
        assert await queue_counts_of(sink) == {"active": 2}
        await sink.advance(2)  # the store still fails: one probe at +0.5 s, one at +1.5 s (the backoff doubles)
        assert faults.tries == 3 and await queue_counts_of(sink) == {"active": 2}
        faults.broken = False
        await sink.advance(10)  # the probe at +3.5 s finds the store working: both recorded then
        assert faults.tries == 5 and await queue_counts_of(sink) == {}
        assert len(sink.messages) == 2  # delivered once each


RECORD_FAILURE = "qmgr: recording delivery results failed {tries} times in a row, for {span}s: database or disk is full"


async def test_settle_names_a_store_that_kept_refusing_the_results_for_its_scan_failure_timeout_of_the_clock():
    """Under a lasting store fault the delivered mail's results wait for their retry, which settle() counts as
    settled under virtual time: it returned without an error however long the store refused them (the test saw
    its mail captured and never learnt the queue kept it active). Now, as for a failing scan, a settle after
    `scan_failure_timeout` of the clock raises, naming the failure, once for the run of failures."""
    async with Sink(virtual_time=True) as sink:
        faults = StoreFault(sink, "finish")
        await send(sink, "bob@example.org", "kept")
        await sink.settle(timeout=5)
        await asyncio.wait_for(sink.advance(40), 5)  # probes at +0.5, 1.5, 3.5, 7.5, 15.5, 25.5, 35.5
        assert faults.tries == 8 and await queue_counts_of(sink) == {"active": 1}
        with pytest.raises(TimeoutError) as lasting:
            await sink.settle(timeout=1)
        assert str(lasting.value) == ("the queue did not settle within 30s of its clock: delivery results wait to be "
                                      f"recorded: {RECORD_FAILURE.format(tries=8, span=40)}; {{'active': 1}}")
        await sink.settle()  # (told once: settle goes on)
        faults.broken = False
        await sink.advance(10)
        assert await queue_counts_of(sink) == {} and len(sink.messages) == 1


async def test_settle_in_real_time_waits_for_results_the_store_refused_and_names_a_lasting_refusal():
    """In real time a refused record's retry comes by itself: settle() returned at once with the message still
    active (counted as settled, as it must be under virtual time). Now it waits for the record, and a refusal
    that outlasts `timeout` is named."""
    async with Sink() as sink:
        faults = StoreFault(sink, "finish", times=2)  # refused at once and at the probe 0.5 s later
        await send(sink, "bob@example.org", "one")
        await sink.settle(timeout=10)
        assert faults.tries == 3 and await queue_counts_of(sink) == {}
        faults = StoreFault(sink, "finish")
        await send(sink, "bob@example.org", "two")
        with pytest.raises(TimeoutError) as lasting:
            await sink.settle(timeout=1)
        assert re.fullmatch(r"the queue did not settle within 1s: \{'active': 1\}; qmgr: recording delivery results "
                            r"failed (once|\d+ times in a row), for [\d.]+s: database or disk is full",
                            str(lasting.value))
        faults.broken = False
        await sink.settle(timeout=15)
        assert await queue_counts_of(sink) == {} and len(sink.messages) == 2


async def deferred_once(sink: Sink) -> float:
    """A message for example.com deferred by its first attempt (a 451); the time its retry is due."""
    sink.destination("example.com").answers(451, "4.2.0 Try later").times(1).then(250)
    await send(sink, "bob@example.com", "retried")
    await sink.settle()
    due = await sink.server.store.next_due_time()
    assert due is not None and await queue_counts_of(sink) == {"deferred": 1}
    return due


async def test_a_failed_queue_scan_is_retried_on_the_virtual_clock():
    """The scan that takes due mail failed (a store fault) and backed off, but settle() woke qmgr again and again
    while the mail was due, so the scan was retried at once, as fast as settle looped, whatever its backoff (and a
    lasting fault kept settle spinning to its TimeoutError). Now the backoff is a timer on the virtual clock: the
    scan fails at the due time, is tried again 0.5 s and 1 s later, and the third try delivers. (The times asserted
    are the virtual clock's: a backoff waited in real time would leave the scan untried when advance() ends and
    the delivery off due + 1.5; a bound on the real time taken said nothing more, and a loaded machine broke it.)"""
    async with Sink(virtual_time=True, **RELAY) as sink:
        due = await deferred_once(sink)
        scans = StoreFault(sink, "take", times=2)
        await sink.advance(seconds=due - sink.clock.time())
        assert scans.tries == 1 and await queue_counts_of(sink) == {"deferred": 1}  # waits for the scan's retry
        await sink.advance(minutes=1)
        assert scans.tries >= 3 and len(sink.destination("example.com").messages) == 1
        assert sent_times(sink) == [pytest.approx(due + 0.5 + 1.0)]
        assert await queue_counts_of(sink) == {}


SCAN_FAILURE = "qmgr: queue scan failed {tries} times in a row, for {span}s: database or disk is full"


async def test_advance_rides_through_a_disk_full_for_five_minutes_and_the_mail_goes_once_it_clears():
    """Mail due while the scan backs off is settled: advance() retries the scan on its backoff (0.5 s doubling to
    10 s) through the whole span, as the server would; the mail goes once the fault clears. (advance raised
    TimeoutError 35.5 s into the span, the clock left there.)"""
    async with Sink(virtual_time=True, **RELAY) as sink:
        due = await deferred_once(sink)
        scans = StoreFault(sink, "take")
        await asyncio.wait_for(sink.advance(seconds=due - sink.clock.time()), 5)
        await asyncio.wait_for(sink.advance(minutes=5), 10)  # tries at +0.5, 1.5, 3.5, 7.5, 15.5, 25.5, ... 295.5
        assert sink.clock.time() == pytest.approx(due + 300)
        assert scans.tries == 34 and await queue_counts_of(sink) == {"deferred": 1}
        scans.broken = False
        await sink.advance(10)
        assert sent_times(sink) == [pytest.approx(due + 305.5)] and await queue_counts_of(sink) == {}


async def test_settle_names_a_queue_scan_failure_that_lasted_its_scan_failure_timeout_of_the_clock():
    """settle()'s `timeout` is real seconds; what mail may wait for a failing scan under virtual time is its own
    `scan_failure_timeout` (30 s of the clock by default): settle(timeout=1) does not raise after 3 s of failure;
    a settle after 40 s does, naming the failure, once for the run of failures."""
    async with Sink(virtual_time=True, **RELAY) as sink:
        due = await deferred_once(sink)
        scans = StoreFault(sink, "take")
        await asyncio.wait_for(sink.advance(seconds=due - sink.clock.time()), 5)
        await asyncio.wait_for(sink.advance(3), 5)  # tries at +0, 0.5, 1.5
        await sink.settle(timeout=1)
        await asyncio.wait_for(sink.advance(37), 5)  # tries at +3.5, 7.5, 15.5, 25.5, 35.5
        assert scans.tries == 8
        await sink.settle(scan_failure_timeout=60)
        with pytest.raises(TimeoutError) as lasting:
            await sink.settle(timeout=1)
        assert str(lasting.value) == ("the queue did not settle within 30s of its clock: mail waits for the queue "
                                      f"scan: {SCAN_FAILURE.format(tries=8, span=40)}; {{'deferred': 1}}")
        await sink.settle()  # (told once: settle goes on)


async def test_wait_for_names_a_failing_queue_scan_under_virtual_time():
    async with Sink(virtual_time=True, **RELAY) as sink:
        due = await deferred_once(sink)
        StoreFault(sink, "take")
        await sink.advance(seconds=due - sink.clock.time())
        with pytest.raises(WaitTimeout) as waited:
            await sink.wait_for(to="bob@example.com", timeout=0.2)
        assert str(waited.value).endswith(
            "\n  the queue's mail waits for it: qmgr: queue scan failed once, for 0s: database or disk is full")


async def test_settle_and_wait_for_in_real_time_name_a_failing_queue_scan():
    """In real time settle() waited out its timeout with the due mail behind a scan that kept failing and said only
    the queue's counts; wait_for() said only what had arrived. Both now name the failure."""
    relay = {**RELAY, "queue": {**RELAY["queue"], "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"}}
    async with Sink(**relay) as sink:
        due = await deferred_once(sink)
        StoreFault(sink, "take")
        await asyncio.sleep(max(0.0, due - time.time()) + 0.05)
        with pytest.raises(TimeoutError) as settling:
            await sink.settle(timeout=1)
        assert re.fullmatch(r"the queue did not settle within 1s: \{'deferred': 1\}; qmgr: queue scan failed "
                            r"(once|\d+ times in a row), for [\d.]+s: database or disk is full", str(settling.value))
        with pytest.raises(WaitTimeout) as waited:
            await sink.wait_for(to="bob@example.com", timeout=0.5)
        assert re.search(r"\n  the queue's mail waits for it: qmgr: queue scan failed (once|\d+ times in a row), "
                         r"for [\d.]+s: database or disk is full$", str(waited.value))


async def test_settle_in_real_time_waits_for_due_mail_behind_a_failed_queue_scan():
    """In real time the clock ends a failed scan's backoff by itself: settle() returned at once with the due mail
    still deferred (counting the backoff as settled, as it must under virtual time). Now it waits, and the mail
    goes."""
    relay = {**RELAY, "queue": {**RELAY["queue"], "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"}}
    async with Sink(**relay) as sink:
        due = await deferred_once(sink)
        scans = StoreFault(sink, "take", times=1)
        await asyncio.sleep(max(0.0, due - time.time()) + 0.05)
        await sink.settle(timeout=10)
        assert scans.tries >= 2 and len(sink.destination("example.com").messages) == 1
        assert await queue_counts_of(sink) == {}


async def test_a_damaged_message_set_aside_after_a_store_fault_under_virtual_time():
    """A scan took a message whose queue row was damaged (by hand) and set it aside, but the store refused the move
    to the corrupt queue: the message, active in the store and not in qmgr's hands, kept settle() from returning
    (TimeoutError, {'active': 1}) while the write waited for its retry on the virtual clock. Now the write's retry
    is a timer as the records' are: advance() steps to it and the message reaches the corrupt queue."""
    async with Sink(virtual_time=True, **RELAY) as sink:
        due = await deferred_once(sink)
        with sqlite3.connect(sink.directory / "queue" / "queue.db") as db:
            db.execute("UPDATE message SET arrival = 'x'")
        moves = StoreFault(sink, "mark_corrupt", times=2)
        await asyncio.wait_for(sink.advance(seconds=due - sink.clock.time()), 5)
        assert moves.tries == 1 and await queue_counts_of(sink) == {"active": 1}
        await asyncio.wait_for(sink.advance(2), 5)  # retried at +0.5 s (refused again) and +1.5 s
        assert moves.tries == 3 and await queue_counts_of(sink) == {"corrupt": 1}


async def test_the_auth_failure_delay_passes_in_real_time_under_virtual_time():
    """The wait before an AUTH that follows a failed one slept on the server's clock: under virtual time the client's
    next AUTH was never answered (nothing moves that clock while a client waits for its reply). The client on the
    wire waits real time, as it does for smtpd's error_sleep_time and for the Sink's slow()."""
    async with Sink(virtual_time=True, users={"app": "pw"}, smtpd={"auth_failure_delay": 0.2}) as sink:
        loop = asyncio.get_running_loop()
        async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, timeout=5) as client:
            await client.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain("app", "wrong")
            started = loop.time()
            await client.auth_plain("app", "pw")
            assert loop.time() - started >= 0.2
