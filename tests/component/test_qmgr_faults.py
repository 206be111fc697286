"""qmgr (mailflow.stages.qmgr) against store faults and stops: results recorded as each job ends, records retried
while the store is locked or full, notices owed across a crash sent exactly once, atomic claims, loops that back
off instead of spinning. Real Store, fake transports (tests.support.transports), virtual or real clock.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
import sqlite3

import pytest

from mailflow.content import Content
from mailflow.clock import SystemClock
from mailflow.config import Config, PipeService
from mailflow.logs import MailLog
from mailflow.model import DeliveryReport, Outcome, RcptResult, Recipient
import mailflow.stages.qmgr as qmgr_module
from mailflow.stages.qmgr import RESULT_SLICE, QueueManager
from mailflow.stages.qmgr.destination import Job
from mailflow.transports.pipe import PipeTransport
from mailflow.routing.rewrite import Rewriter
from mailflow.store import NewMessage, Store
from tests.component.test_qmgr_policy import T0, Sim, notices_in, report_fields
from tests.support import BlockingTransport, RecordingClock, RecordingTransport, eventually, qmgr_turn
from tests.support.stalls import LoopTurns

HOST = "mx.example.test"


_INFO_LOGGER = logging.getLogger("tests.qmgr_faults.mail")
_INFO_LOGGER.setLevel(logging.INFO)


class Setup:
    """A store, two fake transports, and a QueueManager to start (and start again, as after a restart)."""

    def __init__(self, tmp_path, clock=None, busy_timeout: float = 5.0):
        self.path = tmp_path / "queue.db"
        self.clock = clock or RecordingClock(T0)
        self.busy_timeout = busy_timeout
        self.local = RecordingTransport("local")
        self.smtp = RecordingTransport("smtp")
        self.store: Store | None = None
        self.qmgr: QueueManager | None = None
        self.mail_log: list[str] = []

    async def start(self, queue: dict | None = None, **kw) -> QueueManager:
        """`queue`: [queue] settings besides the backoff times."""
        if self.store is None:
            self.store = await Store.open(self.path, busy_timeout=self.busy_timeout)
        config = Config(myhostname=HOST, mydestination=("example.test",),
                        queue={"minimal_backoff_time": 300, "maximal_backoff_time": 4000, **(queue or {})})
        log = MailLog(_INFO_LOGGER)  # lines are made only when the level lets them through
        log._emit = lambda queue_id, event, text, **fields: self.mail_log.append(f"{queue_id}: {text}")
        self.qmgr = QueueManager(self.store, resolve=Rewriter(config).resolve,
                                 transports={"local": self.local, "smtp": self.smtp}, config=config.queue,
                                 clock=self.clock, rng=random.Random(0), log=log, **kw)
        await self.qmgr.start()
        return self.qmgr

    async def queue(self, qid: str, *recipients: str) -> str:
        await self.store.insert(NewMessage(qid, "sender@remote.test", self.clock.time(),
                                           Content.of(f"Subject: {qid}\r\n\r\nbody\r\n".encode()),
                                           tuple(Recipient(i, r, r) for i, r in enumerate(recipients))))
        self.qmgr.wake()
        return qid

    def logged(self, *words: str) -> list[str]:
        return [line for line in self.mail_log if all(w in line for w in words)]

    async def stop(self, grace: float = 0.2) -> None:
        if self.qmgr:
            await self.qmgr.stop(grace=grace)
            self.qmgr = None

    async def close(self) -> None:
        await self.stop()
        if self.store:
            await self.store.close()
            self.store = None


@pytest.fixture
async def s(tmp_path):
    setup = Setup(tmp_path)
    yield setup
    await setup.close()


def sent_to(transport: RecordingTransport) -> list[str]:
    return [r.address for req in transport.requests for r in req.recipients]


# ---------------------------------------------------------------------------------------------- as each job ends


async def test_a_result_is_recorded_and_logged_when_its_job_ends_not_when_the_message_does(s):
    s.smtp = BlockingTransport("smtp")
    await s.start()
    await s.queue("Q1", "a@example.test", "b@remote.test")
    await eventually(lambda: s.local.requests and s.smtp.in_flight)
    rows = await eventually(lambda: _recipients_if(s, "Q1", lambda rows: rows[0][1] == "sent"))
    assert [r[:2] for r in rows] == [("a@example.test", "sent"), ("b@remote.test", "pending")]
    await eventually(lambda: s.logged("Q1: to=<a@example.test>", "status=sent"))  # logged after the commit
    assert await s.store.counts() == {"active": 1}
    s.smtp.release.set()
    await eventually(lambda: _counts_are(s, {}))


async def _recipients_if(s, qid, predicate):
    rows = await s.store.recipients(qid)
    return rows if rows and predicate(rows) else None


async def _counts_are(s, counts) -> bool:
    return await s.store.counts() == counts


async def test_a_stop_repeats_only_the_delivery_it_interrupted(s):
    s.smtp = BlockingTransport("smtp")
    await s.start()
    await s.queue("Q1", "a@example.test", "b@remote.test")
    await eventually(lambda: s.smtp.in_flight)
    await eventually(lambda: s.logged("to=<a@example.test>", "status=sent"))
    await s.stop(grace=0.05)  # the slow delivery is cut off

    s.smtp = RecordingTransport("smtp")
    await s.start()  # the next start
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.local) == ["a@example.test"], "the finished delivery was repeated"
    assert sent_to(s.smtp) == ["b@remote.test"]


class OneByOne:
    """An agent that delivers its recipients one after another (as local and virtual do): `deliver_each` yields
    each result (bounced for a `bad-` local part, else sent), then waits for `release` before the next one; with
    `fail_at` it raises instead of delivering that recipient."""

    program = "local"
    delivers_each = True

    def __init__(self, fail_at: str = ""):
        self.release = asyncio.Event()
        self.fail_at = fail_at
        self.delivered: list[str] = []

    async def deliver_each(self, request):
        for rcpt in request.recipients:
            if rcpt.address == self.fail_at:
                raise RuntimeError("the agent died")
            self.delivered.append(rcpt.address)
            bad = rcpt.address.startswith("bad-")
            yield RcptResult(rcpt, Outcome.BOUNCED if bad else Outcome.SENT, "5.1.1" if bad else "2.0.0",
                             "no such user" if bad else "delivered", relay="local")
            await self.release.wait()

    async def deliver(self, request):
        raise AssertionError("qmgr asks deliver_each of an agent that has it")

    async def close(self) -> None:
        pass


class AllAtOnce:
    """An agent that delivers its recipients one after another, each answered at once (an unknown local user needs
    no wait): `deliver_each` yields each result without a pause of its own; `turns` (a LoopTurns) is told of each."""

    program = "local"
    delivers_each = True

    def __init__(self, turns):
        self.turns = turns

    async def deliver_each(self, request):
        for rcpt in request.recipients:
            self.turns.seen.append(self.turns.count)
            yield RcptResult(rcpt, Outcome.BOUNCED, "5.1.1", "unknown user", relay="local")

    async def deliver(self, request):
        raise AssertionError("qmgr asks deliver_each of an agent that has it")

    async def close(self) -> None:
        pass


async def test_an_agent_answering_each_recipient_at_once_has_the_loop_handed_back_every_slice(s):
    """A local job has no recipient limit: 100 000 unknown users (one message through virtual aliases), each
    answered at once, held the loop 6.6 s while qmgr took their results. It is handed back every RESULT_SLICE."""
    async with LoopTurns() as turns:
        s.local = AllAtOnce(turns)
        await s.start()
        n = 3 * RESULT_SLICE + 1
        await s.queue("Q1", *(f"u{i:04d}@example.test" for i in range(n)))
        await eventually(lambda: _counts_are(s, {}))
    assert len(turns.seen) == n and len(set(turns.seen)) >= 4, "the loop had no turn between the slices"


class CutOffAtASlice:
    """An agent that delivers its recipients one after another, waiting on I/O between them; the delivery is
    cancelled (as a stop cancels it) in the loop turn after its RESULT_SLICE-th result is given."""

    program = "local"
    delivers_each = True

    def __init__(self):
        self.delivered: list[str] = []

    async def deliver_each(self, request):
        for rcpt in request.recipients:
            self.delivered.append(rcpt.address)
            if len(self.delivered) == RESULT_SLICE:
                asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)
            yield RcptResult(rcpt, Outcome.SENT, "2.0.0", "delivered", relay="local")
            await asyncio.sleep(0.001)

    async def deliver(self, request):
        raise AssertionError("qmgr asks deliver_each of an agent that has it")

    async def close(self) -> None:
        pass


async def test_a_delivery_cancelled_as_the_loop_is_handed_back_keeps_the_result_given_before(s):
    """The loop was handed back between an agent's result and its recording: a stop's cancel there dropped a
    result the agent had delivered (100 delivered, 99 recorded), to be delivered again after the start. Each
    result given is recorded before the loop is handed back."""
    s.local = agent = CutOffAtASlice()
    await s.start()
    await s.queue("Q1", *(f"u{i:04d}@example.test" for i in range(RESULT_SLICE + 50)))
    await eventually(lambda: len(agent.delivered) >= RESULT_SLICE, what="the agent cut off")
    await eventually(lambda: not s.qmgr.busy, what="its records written")
    sent = [address for address, status, *_ in await s.store.recipients("Q1") if status == "sent"]
    assert agent.delivered == sent and len(sent) == RESULT_SLICE


def test_a_job_whose_results_were_recorded_as_they_came_makes_none_for_them_at_its_end(monkeypatch):
    """At the end of a job of 100 000 recipients recorded one by one, a "reported no result" deferral was made for
    each of them, then dropped as recorded: 0.5 s on the loop. Only those neither reported nor recorded get one."""
    made: list[str] = []

    class Counted(RcptResult):
        def __init__(self, *args, **kwargs):
            made.append(args[3])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(qmgr_module, "RcptResult", Counted)
    rcpts = tuple(Recipient(i, f"u{i}@example.test", f"u{i}@example.test") for i in range(1000))
    job = Job("Q1", "local", "example.test", rcpts)
    last = RcptResult(rcpts[-1], Outcome.SENT, "2.0.0", "delivered", relay="local")
    results = qmgr_module._complete(job, DeliveryReport((last,)), None, taken=set(range(998)))
    assert [(r.recipient.index, r.outcome) for r in results] == [(999, Outcome.SENT), (998, Outcome.DEFERRED)]
    assert made == ["delivery agent reported no result"]


async def test_an_agent_delivering_one_recipient_after_another_has_each_result_recorded_as_it_comes(s):
    """Postfix's local(8) and virtual(8) cross each recipient off as it is delivered (deliver_completed): a crash
    repeats only the one in flight. mailflow recorded a job's results when the whole job ended, so a stop in the
    middle of a local job with many recipients delivered the finished ones again."""
    s.local = OneByOne()
    await s.start()
    await s.queue("Q1", "a@example.test", "b@example.test", "c@example.test")
    rows = await eventually(lambda: _recipients_if(s, "Q1", lambda rows: rows[0][1] == "sent"))
    assert [r[:2] for r in rows] == [("a@example.test", "sent"), ("b@example.test", "pending"),
                                     ("c@example.test", "pending")]
    await eventually(lambda: s.logged("Q1: to=<a@example.test>", "status=sent"))  # logged after its commit
    await s.stop(grace=0.05)  # cut off while b's delivery is under way (its result not given yet)

    s.local = RecordingTransport("local")
    await s.start()
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.local) == ["b@example.test", "c@example.test"], "a recorded delivery was repeated"


async def test_a_recipient_after_an_agent_died_midway_is_deferred_and_those_before_stand(s):
    """The results given before the agent raised are recorded (a bounce's notice owed, its flag kept); the rest of
    the job is deferred 4.3.0, the job's last recipient too."""
    s.local = OneByOne(fail_at="c@example.test")
    s.local.release.set()
    await s.start()
    await s.queue("Q1", "a@example.test", "bad-b@example.test", "c@example.test", "d@example.test")
    await eventually(lambda: _counts_are(s, {"deferred": 1}))
    rows = await s.store.recipients("Q1")
    assert [r[:3] for r in rows] == [("a@example.test", "sent", "2.0.0"), ("bad-b@example.test", "bounced", "5.1.1"),
                                     ("c@example.test", "pending", "4.3.0"), ("d@example.test", "pending", "4.3.0")]
    assert len(s.logged("Q1: to=<", "status=")) == 4  # each once
    assert s.local.delivered == ["a@example.test", "bad-b@example.test"]


class Stepped(OneByOne):
    """OneByOne that delivers the next recipient only when told (`steps`); `cut_off` is set when a stop cancels it
    while it waits."""

    def __init__(self):
        super().__init__()
        self.steps = asyncio.Semaphore(0)

        self.cut_off = asyncio.Event()

    async def deliver_each(self, request):
        for rcpt in request.recipients:
            try:
                await self.steps.acquire()
            except asyncio.CancelledError:
                self.cut_off.set()
                raise
            self.delivered.append(rcpt.address)
            yield RcptResult(rcpt, Outcome.SENT, "2.0.0", "delivered", relay="local")


class GatedRecords:
    """The store's `record_results`, its first call held until `open` is set (a slow commit), the calls counted."""

    def __init__(self, store, gated: bool = True):
        self.record_results = store.record_results
        self.open = asyncio.Event()
        if not gated:
            self.open.set()
        self.calls: list[list[str]] = []
        store.record_results = self

    async def __call__(self, queue_id, rows):
        self.calls.append([r.recipient.address for r, _ in rows])
        if len(self.calls) == 1:
            await self.open.wait()
        await self.record_results(queue_id, rows)


async def test_results_that_end_while_a_record_is_written_go_together_in_the_next_write(s):
    """One record in flight a message: a local job of 5 recipients whose first record is slow. Each result had a
    write (and a commit) of its own, so 100 local recipients cost 78-100 commits where the job had cost 1 (+23 %
    time); now those that end during a write wait for it, and the job's last ones go with the end of the attempt."""
    s.local = Stepped()
    await s.start()
    records = GatedRecords(s.store)
    committer = s.store._committer
    await s.queue("Q1", *[f"u{i}@example.test" for i in range(5)])
    s.local.steps.release()
    await eventually(lambda: records.calls)  # u0's record, held
    before = committer.commits
    for i in range(1, 5):  # every other recipient delivered while it is written
        s.local.steps.release()
        await eventually(lambda: len(s.local.delivered) == i + 1)
    await eventually(lambda: not s.qmgr.destinations())  # the job is over
    assert records.calls == [["u0@example.test"]]
    records.open.set()
    await eventually(lambda: _counts_are(s, {}))
    assert records.calls == [["u0@example.test"]], "a result that ended during a write was written on its own"
    assert committer.commits - before == 2  # u0's record, then the end of the attempt with u1..u4
    await eventually(lambda: len(s.logged("Q1: to=<", "status=sent")) == 5)


async def test_a_result_after_a_record_is_written_starts_the_next_one_and_the_job_end_takes_the_rest(s):
    """Durability kept: results that end while no record is in flight are written at once (a stop repeats only
    those not committed yet), those that waited are written together; the last one goes with the attempt's end."""
    s.local = Stepped()
    await s.start()
    records = GatedRecords(s.store)
    await s.queue("Q1", *[f"u{i}@example.test" for i in range(4)])
    s.local.steps.release()
    await eventually(lambda: records.calls)
    s.local.steps.release()
    s.local.steps.release()
    await eventually(lambda: len(s.local.delivered) == 3)
    records.open.set()
    rows = await eventually(lambda: _recipients_if(s, "Q1", lambda rows: rows[2][1] == "sent"))
    assert [r[1] for r in rows] == ["sent", "sent", "sent", "pending"]
    assert records.calls == [["u0@example.test"], ["u1@example.test", "u2@example.test"]]
    await s.stop(grace=0.05)  # u3's delivery cut off

    s.local = RecordingTransport("local")
    await s.start()
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.local) == ["u3@example.test"]


async def test_results_that_waited_behind_a_record_are_recorded_by_a_stop_that_cuts_the_job_off(s):
    """The results that came back while a record was written are written after it even when a stop cuts the job
    off meanwhile (within the stop's grace for records): the next start repeats only the delivery in flight."""
    s.local = Stepped()
    await s.start()
    records = GatedRecords(s.store)
    await s.queue("Q1", *[f"u{i}@example.test" for i in range(4)])
    for i in range(3):
        s.local.steps.release()
        await eventually(lambda: len(s.local.delivered) == i + 1)
    assert records.calls == [["u0@example.test"]]  # u1 and u2 wait behind it
    stop = asyncio.ensure_future(s.stop(grace=0.3))
    await s.local.cut_off.wait()  # u3's delivery cancelled
    records.open.set()
    await stop
    assert records.calls == [["u0@example.test"], ["u1@example.test", "u2@example.test"]]

    s.local = RecordingTransport("local")
    await s.start()
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.local) == ["u3@example.test"]


class SaysTwiceThenHangs(RecordingTransport):
    """Says each recipient sent as final (`DeliveryRequest.settled`) and hands on the same results to come
    (`settled_late`), then never reports: a delivery a stop cuts off."""

    async def deliver(self, request):
        self.record(request)
        results = [RcptResult(r, Outcome.SENT, "2.0.0", "delivered", relay="local") for r in request.recipients]
        request.settled(results)

        async def late():
            return results
        request.settled_late(late)
        await asyncio.Event().wait()


async def test_a_recipient_said_final_early_and_late_by_a_job_a_stop_cuts_off_is_recorded_once(s):
    """A job cut off by a stop has its early word (`settled`) and its late one (`settled_late`) each recorded
    within the stop's grace; a recipient in both was recorded, and logged sent, twice (each took a copy of the
    indexes recorded)."""
    s.local = SaysTwiceThenHangs("local")
    await s.start()
    await s.queue("Q1", "a@example.test")
    await eventually(lambda: s.local.requests)
    await s.stop(grace=0.3)
    assert len(s.logged("Q1: to=<a@example.test>", "status=sent")) == 1
    assert [row[:2] for row in await s.store.recipients("Q1")] == [("a@example.test", "sent")]


@pytest.mark.parametrize("flags, records", [("", 0), ("D", 1)])
async def test_a_pipe_run_for_all_recipients_at_once_has_them_recorded_with_the_job_end(s, flags, records):
    """A pipe service without D or O runs its command once for the job: its results come all at once and go with
    the end of the attempt (one write); the first was recorded on its own before, a write and a commit more. With
    D (one run per recipient, one after another) the first run's result is recorded as it comes."""
    s.local = PipeTransport(PipeService(argv=("/bin/true",), flags=flags), name="local")
    await s.start()
    calls = GatedRecords(s.store, gated=False)
    await s.queue("Q1", "a@example.test", "b@example.test", "c@example.test")
    await eventually(lambda: _counts_are(s, {}))
    assert calls.calls[:1] == [["a@example.test"]][:records]  # no record but the attempt's end, without D


# ---------------------------------------------------------------------------------------------- records that fail


async def test_a_start_up_recovery_the_store_refused_is_done_by_a_later_scan_and_takes_back_nothing_in_hand(
        tmp_path):
    """The disk full at start: recovery (what the last run left active is due again) failed and the start with it.
    Now the start goes on, no scan and no hand-over happens before recovery is done, and the scans retry it: the
    mail left active and the mail that came meanwhile are each delivered once."""
    s = Setup(tmp_path, clock=SystemClock())
    s.store = await Store.open(s.path)
    await s.store.insert(NewMessage("LEFT", "sender@remote.test", T0, Content.of(b"Subject: l\r\n\r\nb\r\n"),
                                    (Recipient(0, "left@remote.test", "left@remote.test"),)))
    assert [m.queue_id for m in await s.store.take(T0 + 1, 10)] == ["LEFT"]  # active when the last run stopped
    works, tries = s.store.recover, []

    async def recover():
        tries.append(1)
        if len(tries) <= 2:
            raise sqlite3.OperationalError("database or disk is full")
        return await works()
    s.store.recover = recover
    try:
        await s.start(backoff=(0.05, 0.1))
        assert not s.qmgr.reserve(1), "a hand-over before recovery"
        await s.queue("NEW", "new@remote.test")
        await eventually(lambda: _counts_are(s, {}), timeout=10)
        assert len(tries) == 3 and sorted(sent_to(s.smtp)) == ["left@remote.test", "new@remote.test"]
    finally:
        await s.close()


class FlakyWrites:
    """Makes the store's qmgr writes fail with a store fault while `broken` is set; counts the tries."""

    def __init__(self, store: Store, error: str = "database is locked"):
        self.broken = True
        self.tries = 0
        for name in ("record_results", "finish", "claim", "save_destinations"):
            setattr(store, name, self._wrap(getattr(store, name), error))

    def _wrap(self, method, error):
        async def flaky(*args, **kw):
            self.tries += 1
            if self.broken:
                raise sqlite3.OperationalError(error)
            return await method(*args, **kw)
        return flaky


async def test_a_failed_record_is_retried_while_the_server_runs_and_nothing_is_delivered_twice(s):
    s.smtp = BlockingTransport("smtp")
    await s.start(backoff=(1.0, 8.0))
    await s.queue("Q1", "a@example.test", "b@remote.test")
    await eventually(lambda: s.smtp.in_flight)
    faults = FlakyWrites(s.store)
    s.smtp.release.set()
    await eventually(lambda: faults.tries >= 1)
    for _ in range(60):  # ten virtual minutes of a broken store
        s.clock.advance(10)
        await asyncio.sleep(0.002)
    assert faults.tries < 150, f"{faults.tries} tries in 10 minutes: no backoff"
    assert await s.store.counts() == {"active": 1}  # owned by qmgr, not forgotten, not taken again
    faults.broken = False
    s.clock.advance(10)
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.local) == ["a@example.test"] and sent_to(s.smtp) == ["b@remote.test"]
    await eventually(lambda: len(s.logged("status=sent")) >= 2)  # (each line follows its result's commit)
    assert len(s.logged("status=sent")) == 2


async def test_the_store_locked_by_another_connection_during_delivery(tmp_path):
    """The short variant of the long lock of tests/e2e/test_faults.py, with injected timeouts: real time, a
    real SQLite lock held by another connection."""
    s = Setup(tmp_path, clock=SystemClock(), busy_timeout=0.1)
    try:
        s.smtp = BlockingTransport("smtp")
        await s.start(backoff=(0.05, 0.2), tick=0.05)
        for n in range(3):
            await s.queue(f"Q{n}", f"r{n}@remote.test", "a@example.test")
        await eventually(lambda: s.smtp.in_flight == 3)
        holder = sqlite3.connect(s.path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        snapshots = 0
        save = s.store.save_destinations

        async def counting(*args):
            nonlocal snapshots
            snapshots += 1
            return await save(*args)

        s.store.save_destinations = counting
        s.smtp.release.set()
        await asyncio.sleep(1.5)
        assert snapshots <= 15, f"{snapshots} snapshot writes tried in 1.5 s of a locked store"
        assert await s.store.counts() == {"active": 3}
        holder.execute("COMMIT")
        holder.close()
        await eventually(lambda: _counts_are(s, {}), timeout=3)
        assert sorted(sent_to(s.smtp)) == ["r0@remote.test", "r1@remote.test", "r2@remote.test"]
        assert sent_to(s.local) == ["a@example.test"] * 3
    finally:
        await s.close()


async def test_a_failing_scan_backs_off_instead_of_spinning_and_new_mail_retries_it_at_once(s):
    await s.start(backoff=(1.0, 8.0))
    calls = []
    take = s.store.take

    async def broken(*args):
        calls.append(s.clock.time())
        raise sqlite3.OperationalError("database or disk is full")

    s.store.take = broken
    for _ in range(300):  # 30 virtual seconds in small steps: the loop turns every tick
        await step_the_clock(s.qmgr, s.clock, 0.1)
    assert 3 <= len(calls) <= 10, f"{len(calls)} scans in 30 s of a broken store"
    assert s.qmgr._scanning.backing_off
    s.store.take = take
    await s.queue("Q1", "b@remote.test")  # a commit: the store works, the scan need not wait out its backoff
    await eventually(lambda: _counts_are(s, {}))  # with the clock standing still


async def step_the_clock(qmgr: QueueManager, clock: RecordingClock, seconds: float) -> None:
    """Move `clock` on by `seconds`; when that wakes qmgr's loop (or it is awake), return once it sleeps again: the
    clock never runs ahead of a turn. (Steps 1 ms of real time apart let a loaded machine's qmgr see 30 s of the
    clock go by in one turn: one scan where the backoff allows four.)"""
    asked, deadline = len(clock.sleeps), clock.next_deadline()
    clock.advance(seconds)
    if deadline is None or deadline <= clock.now:
        await eventually(lambda: len(clock.sleeps) > asked and clock.next_deadline() is not None, step=0.001,
                         what="qmgr asleep on the clock again")


# ---------------------------------------------------------------------------------------------- claims


async def test_a_message_held_as_the_scan_begins_is_not_delivered(s):
    """The scan reads and claims in one transaction: an operator's hold that commits just before it wins."""
    await s.start()
    take = s.store.take
    scans = []

    async def racing(*args):
        await s.store.hold_messages(["Q1"])  # an operator, at that moment
        scans.append(await take(*args))
        return scans[-1]

    s.store.take = racing
    await s.queue("Q1", "b@remote.test")
    await eventually(lambda: scans)
    await qmgr_turn(s.qmgr, s.clock)  # the scan that raced the hold is over; it took nothing
    assert scans[0] == [] and await s.store.counts() == {"hold": 1}
    assert s.smtp.requests == [] and s.qmgr.active_count == 0


class HoldsOneJob(RecordingTransport):
    """Answers every job at once but the one whose first recipient is `held`, which never ends."""

    def __init__(self, held: str):
        super().__init__("smtp")
        self.held = held

    async def deliver(self, request):
        self.record(request)
        if request.recipients[0].address == self.held:
            await asyncio.Event().wait()
        return self.respond(request)


async def test_a_stop_between_the_jobs_of_one_message_repeats_only_the_job_it_interrupted(s):
    """A recipient limit of 2: the first job's recipients are recorded as it ends; after the stop only the
    second job's are delivered again."""
    s.smtp = HoldsOneJob("a2@remote.test")
    await s.start(queue={"destination_recipient_limit": 2})
    await s.queue("Q1", *(f"a{n}@remote.test" for n in range(4)))
    await eventually(lambda: _recipients_if(s, "Q1", lambda rows: [r[1] for r in rows].count("sent") == 2))
    await s.stop()
    s.smtp = RecordingTransport("smtp")
    await s.start(queue={"destination_recipient_limit": 2})
    await eventually(lambda: _counts_are(s, {}))
    assert sent_to(s.smtp) == ["a2@remote.test", "a3@remote.test"]


# ---------------------------------------------------------------------------------------------- notices across a crash


async def crashed_with_a_bounce_owed(tmp_path, *pending: str) -> None:
    """A message whose first recipient bounced and was recorded (its failure notice owed) when the process died."""
    store = await Store.open(tmp_path / "queue.db")
    rcpts = ("gone@far.test", *pending)
    await store.insert(NewMessage("CRASH1", "alice@remote.test", T0, Content.of(b"Subject: hi\r\n\r\nbody\r\n"),
                                  tuple(Recipient(i, r, r) for i, r in enumerate(rcpts))))
    [msg] = await store.due(T0, 10)
    await store.claim(["CRASH1"], T0)
    bounced = RcptResult(msg.recipients[0], Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user",
                         "mx.far.test[192.0.2.1]:25")
    await store.record_results("CRASH1", [(bounced, True)])
    await store.close()


def failure_reports(sim) -> list[list[str]]:
    return [[str(block.get("Final-Recipient")) for block in report_fields(n)] for n in notices_in(sim.smtp)]


@pytest.mark.parametrize("pending", [(), ("ok@far.test",)], ids=["all-done", "one-pending"])
async def test_a_notice_owed_before_a_crash_is_sent_once(tmp_path, pending):
    """The per-message step never ran: the next start finishes the message (delivering what is pending), and the
    owed bounce goes out exactly once, also across a further restart."""
    await crashed_with_a_bounce_owed(tmp_path, *pending)
    sims = []
    for _ in range(2):  # the start after the crash, then one more
        sim = await Sim(tmp_path).start()
        sims.append(sim)
        try:
            await sim.run_until(T0 + 600)
        finally:
            await sim.stop()
        assert await _empty(tmp_path)
    delivered = [r.address for sim in sims for _, req in sim.smtp.calls for r in req.recipients if req.sender]
    assert delivered == list(pending)
    assert [report for sim in sims for report in failure_reports(sim)] == [["rfc822; gone@far.test"]]


async def _empty(tmp_path) -> bool:
    store = await Store.open(tmp_path / "queue.db")
    try:
        return await store.counts() == {}
    finally:
        await store.close()


async def test_an_agent_that_fails_for_every_message_is_logged_once_then_counted_once_a_minute(s, caplog):
    """An agent that raises for every message it is given (a bug that some content, or every one, sets off): each
    recipient is deferred 4.3.0 with the error, and the error is logged with its traceback at the first failure
    only; the next ones are counted, told once a minute, and its first success after them says so. It logged a
    traceback per message (30 messages: 30 tracebacks), as Postfix's master throttles a service whose processes
    keep dying, not logging each."""
    s.smtp.error = RuntimeError("the agent died")
    await s.start()
    with caplog.at_level(logging.INFO, logger="mailflow.qmgr"):
        for i in range(30):
            await s.queue(f"Q{i}", f"r{i}@remote.test")
        await eventually(lambda: len(s.logged("status=deferred", "delivery agent smtp failed: the agent died")) == 30)
        told = [r for r in caplog.records if r.name == "mailflow.qmgr" and r.levelno >= logging.WARNING]
        assert len(told) == 1 and told[0].exc_info, [r.getMessage() for r in told]
        assert re.fullmatch(r"qmgr: delivery agent smtp failed for Q\d+: the agent died", told[0].getMessage())
        what = "qmgr: delivery agent smtp"

        s.clock.advance(61)
        await s.queue("Q30", "r30@remote.test")
        await eventually(lambda: s.logged("Q30: to=<r30@remote.test>", "status=deferred"))
        told = [r.getMessage() for r in caplog.records if r.name == "mailflow.qmgr" and r.levelno >= logging.WARNING]
        assert told[1:] == [f"{what} failed 29 more times in the last 61s: the agent died",
                            f"{what} failed for Q30: the agent died"], told
        assert caplog.records[-1].exc_info  # (not seen for a minute: told again whole)

        s.smtp.error = None
        await s.queue("Q31", "r31@remote.test")
        await eventually(lambda: s.logged("Q31: to=<r31@remote.test>", "status=sent"))
        told = [r.getMessage() for r in caplog.records if r.name == "mailflow.qmgr" and r.levelno >= logging.WARNING]
        assert told[3:] == [f"{what} works again after 31 failures in a row"], told


class Poisoned(RecordingTransport):
    """Raises for a recipient named bad… (a bug some content sets off), another error for one named key…, and
    delivers the others."""

    def respond(self, request):
        name = request.recipients[0].address
        if name.startswith("bad"):
            raise RuntimeError(f"poisoned by {name}")
        if name.startswith("key"):
            raise KeyError("another bug")
        return super().respond(request)


def agent_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "mailflow.qmgr" and r.levelno >= logging.WARNING]


async def test_bad_messages_among_good_ones_log_one_traceback_then_a_count(s, caplog):
    """A message that makes the agent raise, among good mail to the same transport (the usual way a content bug
    shows): its error is logged with its traceback once, the next bad messages' failures are counted and told once
    a minute, and no success says the agent works again after a single failure. A success started the count over:
    each bad message logged its traceback and a "works again" line (20 bad among 20 good: 40 records)."""
    s.smtp = Poisoned("smtp")
    await s.start()
    with caplog.at_level(logging.INFO, logger="mailflow.qmgr"):
        for i in range(20):
            await s.queue(f"B{i}", f"bad{i}@remote.test")
            await eventually(lambda: s.logged(f"B{i}: to=", "status=deferred", f"poisoned by bad{i}"))
            await s.queue(f"G{i}", f"good{i}@remote.test")
            await eventually(lambda: s.logged(f"G{i}: to=", "status=sent"))
        told = agent_lines(caplog)
        assert len(told) == 1 and told[0].exc_info, [r.getMessage() for r in told]

        s.clock.advance(61)
        await s.queue("B20", "bad20@remote.test")
        await eventually(lambda: s.logged("B20: to=", "status=deferred"))
        told = [r.getMessage() for r in agent_lines(caplog)]
        what = "qmgr: delivery agent smtp"
        assert told[1:] == [f"{what} failed 19 more times in the last 61s: poisoned by bad19@remote.test",
                            f"{what} failed for B20: poisoned by bad20@remote.test"], told
        assert agent_lines(caplog)[2].exc_info


async def test_a_bad_message_to_two_domains_among_good_ones_never_says_the_agent_works_again(s, caplog):
    """A bad message with recipients in two domains makes two jobs that raise back to back: among good mail, one
    traceback for the first and no "works again" line after the good message that follows (two failures in a row
    said it, five times for five such messages)."""
    s.smtp = Poisoned("smtp")
    await s.start()
    with caplog.at_level(logging.INFO, logger="mailflow.qmgr"):
        for i in range(5):
            await s.queue(f"B{i}", f"bad{i}@one.test", f"bad{i}@two.test")
            await eventually(lambda: len(s.logged(f"B{i}: to=", "status=deferred")) == 2)
            await s.queue(f"G{i}", f"good{i}@remote.test")
            await eventually(lambda: s.logged(f"G{i}: to=", "status=sent"))
    told = [r.getMessage() for r in agent_lines(caplog)]
    assert len(told) == 1 and re.fullmatch(r"qmgr: delivery agent smtp failed for B0: poisoned by bad0@(one|two)\.test",
                                           told[0]), told


async def test_a_count_is_told_at_the_tick_after_its_minute_and_at_stop_when_no_failure_follows(s, caplog):
    """Bad messages, then none: the count is told by qmgr's tick once its minute is over, and what is counted when
    the server stops is told then. Both waited for the next failure, and a stop lost them."""
    s.smtp = Poisoned("smtp")
    await s.start()
    what = "qmgr: delivery agent smtp"
    with caplog.at_level(logging.INFO, logger="mailflow.qmgr"):
        for qid in ("B0", "B1", "B2"):
            await s.queue(qid, f"bad{qid}@remote.test")
            await eventually(lambda: s.logged(f"{qid}: to=", "status=deferred"))
        s.clock.advance(61)
        await eventually(lambda: len(agent_lines(caplog)) == 2)
        assert agent_lines(caplog)[1].getMessage() == (
            f"{what} failed 2 more times in the last 61s: poisoned by badB2@remote.test")
        s.clock.advance(61)
        for qid in ("B3", "B4"):
            await s.queue(qid, f"bad{qid}@remote.test")
            await eventually(lambda: s.logged(f"{qid}: to=", "status=deferred"))
        await s.stop()
    assert [r.getMessage() for r in agent_lines(caplog)[2:]] == [
        f"{what} failed for B3: poisoned by badB3@remote.test",
        f"{what} failed 1 more time in the last 0s: poisoned by badB4@remote.test"]


async def test_a_second_bug_is_logged_for_its_own_message_not_counted_with_the_first(s, caplog):
    """Two different errors of one agent in a run: each is logged with its traceback, naming the message it failed
    for; the count lines name none (they count several). The second bug was counted as the first one's, under the
    first message's queue id ("(first for B0) failed 2 more times ...: 'another bug'"), its traceback never shown."""
    s.smtp = Poisoned("smtp")
    await s.start()
    with caplog.at_level(logging.INFO, logger="mailflow.qmgr"):
        for qid, rcpt in (("B0", "bad0"), ("K0", "key0"), ("B1", "bad1")):
            await s.queue(qid, f"{rcpt}@remote.test")
            await eventually(lambda: s.logged(f"{qid}: to=", "status=deferred"))
        s.clock.advance(61)
        await s.queue("K1", "key1@remote.test")
        await eventually(lambda: s.logged("K1: to=", "status=deferred"))
    told = agent_lines(caplog)
    assert [r.getMessage() for r in told] == [
        "qmgr: delivery agent smtp failed for B0: poisoned by bad0@remote.test",
        "qmgr: delivery agent smtp failed for K0: 'another bug'",
        "qmgr: delivery agent smtp failed 1 more time in the last 61s: poisoned by bad1@remote.test",
        "qmgr: delivery agent smtp failed for K1: 'another bug'"], [r.getMessage() for r in told]
    assert [bool(r.exc_info) for r in told] == [True, True, False, True]
