"""Queue policy under a virtual clock: days of retry schedule, lifetime and bounces, delay notices,
null-sender mail, and per-destination slow start / throttle / dead-site memory.

The qmgr runs with a real Store, cleanup and notices, and scripted transports (tests.support.transports);
`Sim.run_until()` jumps the virtual clock from one sleeper deadline to the next, letting the loop settle in between.
"""
from __future__ import annotations

import asyncio
import logging
import email
import email.policy
import random
import re
import threading
import tracemalloc

import pytest

from mailflow.clock import VirtualClock
from mailflow.config import Config, config_from_dict
from mailflow.logs import MailLog
from mailflow.content import Content
from mailflow.model import (ClientInfo, DeliveryReport, Envelope, Outcome, OwnedFailure, QueuedMessage, RcptResult,
                            Recipient, Submission)
from mailflow.stages.cleanup import Cleanup
from mailflow.stages import qmgr as qmgr_module
from mailflow.stages.qmgr import QueueManager, _soft_bounced
from mailflow.stages.qmgr import notices as notices_module
from mailflow.stages.qmgr.notices import Notices, Postmaster, _notice_recipient, plan
from mailflow.routing.rewrite import Rewriter
from mailflow.store import Store
from tests.support import BlockingTransport, always, eventually
from tests.support.stalls import LoopTurns

T0 = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0


SENT = always(Outcome.SENT, "2.0.0", "250 ok")


def scripted(clock) -> BlockingTransport:
    """A transport answering from its script (SENT until a test changes it), released: a test that wants its
    deliveries held clears `release`."""
    transport = BlockingTransport("smtp", clock=clock, script=SENT, relay="mx.remote.test[192.0.2.1]:25")
    transport.release.set()
    return transport


class Sim:
    def __init__(self, tmp_path, tick: float = DAY, soft_bounce: bool = False, observer=None, **queue):
        self.tick = tick
        self.observer = observer  # qmgr's MailLog's (`observer(queue_id, event, fields)`), None: nobody
        settings = {"myhostname": "mx.local.test", "mydestination": ["local.test", "mx.local.test"],
                    "soft_bounce": soft_bounce,
                    "queue": {"minimal_backoff_time": 300, "maximal_backoff_time": 4000, **queue}}
        self.config: Config = config_from_dict(settings)
        self.tmp_path = tmp_path
        self.clock = VirtualClock(T0)
        self.smtp = scripted(self.clock)
        self.local = scripted(self.clock)

    async def start(self):
        self.store = await Store.open(self.tmp_path / "queue.db")
        self.cleanup = Cleanup(self.store, myhostname="mx.local.test", clock=self.clock, rng=random.Random(1),
                               log=MailLog(), on_queued=lambda: self.qmgr.wake())
        notices = Notices(self.cleanup.prepare, myhostname="mx.local.test", config=self.config.queue)
        self.qmgr = QueueManager(self.store, resolve=Rewriter(self.config).resolve,
                                 transports={"smtp": self.smtp, "local": self.local}, config=self.config.queue,
                                 clock=self.clock, rng=random.Random(2), log=MailLog(observer=self.observer),
                                 notices=notices,
                                 tick=self.tick, soft_bounce=self.config.soft_bounce)
        await self.qmgr.start()
        return self

    async def stop(self):
        await self.qmgr.stop(grace=1)
        await self.store.close()

    async def submit(self, sender: str, *rcpts: str, body: bytes = b"hello\r\n") -> str:
        content = b"Subject: test\r\nFrom: <" + sender.encode() + b">\r\n\r\n" + body
        sub = Submission(Envelope(sender, tuple(rcpts)), Content.of(content),
                         ClientInfo("192.0.2.9", helo="client.test"))
        return await self.cleanup.submit(sub)

    async def settle(self):
        """Let the loop run until qmgr sleeps with nothing under way (bounded)."""
        quiet = 0
        for _ in range(2000):
            await asyncio.sleep(0.001)
            quiet = quiet + 1 if not self.qmgr.busy and self.clock.next_deadline() is not None else 0
            if quiet >= 3:
                return
        raise AssertionError("qmgr never settled")

    async def run_until(self, horizon: float, stop=lambda: False):
        """Advance virtual time deadline by deadline up to `horizon` (absolute) or until `stop()`."""
        for _ in range(100_000):
            await self.settle()
            if stop():
                return
            deadline = self.clock.next_deadline()
            if deadline is None or deadline > horizon:
                self.clock.advance(max(0.0, horizon - self.clock.now))
                await self.settle()
                return
            self.clock.advance(deadline - self.clock.now)
        raise AssertionError("too many steps")


@pytest.fixture
async def sim(tmp_path):
    sims = []

    async def make(tick: float = DAY, soft_bounce: bool = False, observer=None, **queue) -> Sim:
        s = await Sim(tmp_path, tick, soft_bounce, observer, **queue).start()
        sims.append(s)
        return s

    yield make
    for s in sims:
        await s.stop()


def notices_in(script: BlockingTransport) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(req.content.to_bytes(), policy=email.policy.default)
            for _, req in script.calls if req.sender in ("", ) or req.sender.startswith("double-bounce@")]


def report_fields(notice) -> list:
    """The per-recipient field blocks of the message/delivery-status part."""
    status = next(p for p in notice.walk() if p.get_content_type() in ("message/delivery-status",
                                                                        "message/global-delivery-status"))
    return status.get_payload()[1:]


# ------------------------------------------------------------------------------------------ retry policy


async def test_retry_times_over_five_days_follow_the_backoff_policy_then_bounce(sim):
    # Queue runs a day apart, not every 300 s: each retry then comes from the message's own due time alone (a
    # retry left to the next queue run would be up to a day late), and the five days take 107 steps, not 1 520.
    s = await sim(queue_run_delay=DAY)
    s.smtp.script = lambda req, now: ((Outcome.DEFERRED, "4.4.1", "connection timed out", True)
                                      if req.sender else (Outcome.SENT, "2.0.0", "250 ok", True))
    await s.submit("alice@remote.test", "bob@far.test")
    await s.run_until(T0 + 5 * DAY + 2 * HOUR)

    attempts = [t for t, req in s.smtp.calls if req.sender == "alice@remote.test"]
    assert attempts[0] == T0
    for earlier, later in zip(attempts, attempts[1:]):
        expected = min(max(earlier - T0, 300.0), 4000.0)
        assert expected <= later - earlier <= expected * 1.1 + 1e-6, (earlier - T0, later - earlier)
    assert attempts[-1] - T0 >= 5 * DAY, "gave up before the queue lifetime"
    assert attempts[-2] - T0 < 5 * DAY
    assert 100 < len(attempts) < 130  # ~ 5 days / 4000 s plus the doubling start

    [bounce] = notices_in(s.smtp)
    assert bounce["To"].addresses[0].addr_spec == "alice@remote.test"
    assert bounce.get_content_type() == "multipart/report"
    [fields] = report_fields(bounce)
    assert fields["Action"] == "failed" and fields["Status"] == "4.4.1"
    assert "bob@far.test" in fields["Final-Recipient"]
    assert await s.store.counts() == {}


async def test_a_retry_that_ends_while_a_timed_scan_reads_the_next_due_time_keeps_its_time(sim, monkeypatch):
    # The timed scan that takes a deferred message starts its delivery, then reads the earliest due time to set the
    # next scan's. Under load (a reader thread descheduled) the read can be made before the attempt's deferral is
    # committed and come back after qmgr has acted on it: the retry it set must still ring, not wait a queue run.
    s = await sim(queue_run_delay=DAY)
    s.smtp.script = lambda req, now: (Outcome.DEFERRED, "4.4.1", "connection timed out", True)
    await s.submit("alice@remote.test", "bob@far.test")
    await s.run_until(T0 + 60)  # the first attempt: deferred, due again ~300 s after arrival
    read, finished = asyncio.Event(), asyncio.Event()
    next_due_time, finish = Store.next_due_time, Store.finish

    async def read_early_answer_late(store):  # (the next timed scan's read only)
        if read.is_set():
            return await next_due_time(store)
        due = await next_due_time(store)  # before the deferral's commit ...
        read.set()
        await finished.wait()  # ... answered after qmgr acted on it
        return due

    async def finish_after_the_read(store, *args, **kwargs):
        await read.wait()
        try:
            return await finish(store, *args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(Store, "next_due_time", read_early_answer_late)
    monkeypatch.setattr(Store, "finish", finish_after_the_read)
    await s.run_until(T0 + HOUR)

    attempts = [t - T0 for t, req in s.smtp.calls]
    assert finished.is_set() and len(attempts) >= 4, attempts  # 0, ~300, ~600, ~1200, ~2400 s: not a day later
    for earlier, later in zip(attempts, attempts[1:]):
        expected = min(max(earlier, 300.0), 4000.0)
        assert expected <= later - earlier <= expected * 1.1 + 1e-6, attempts


async def test_a_bounce_reports_each_recipient_with_its_own_status(sim):
    s = await sim()

    s.smtp.script = None  # each recipient from `outcomes`, the others sent
    s.smtp.outcomes = {"gone@far.test": (Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user"),
                       "full@far.test": (Outcome.BOUNCED, "5.2.2", "552 5.2.2 mailbox full")}
    await s.submit("alice@remote.test", "gone@far.test", "ok@far.test", "full@far.test")
    await s.run_until(T0 + 60)
    [bounce] = notices_in(s.smtp)
    got = {f["Final-Recipient"].split(";")[1].strip(): (f["Action"], f["Status"]) for f in report_fields(bounce)}
    assert got == {"gone@far.test": ("failed", "5.1.1"), "full@far.test": ("failed", "5.2.2")}


async def test_the_bounce_of_many_recipients_is_written_off_the_event_loop(sim, monkeypatch):
    # a thousand bouncing recipients cost bounce.build_notice about 90 ms: on the loop, every session and delivery
    # would wait for it
    built_on: list[int] = []
    build = notices_module.build_notice

    def spy(**fields):
        built_on.append(threading.get_ident())
        return build(**fields)

    monkeypatch.setattr(notices_module, "build_notice", spy)
    s = await sim()
    s.smtp.script = lambda req, now: ((Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user", True)
                                      if req.sender else (Outcome.SENT, "2.0.0", "250 ok", True))
    rcpts = [f"r{i}@far.test" for i in range(200)]
    await s.submit("alice@remote.test", *rcpts)
    await s.run_until(T0 + 60)
    [bounce] = notices_in(s.smtp)
    # (in the order of their delivery: Postfix's qmgr order, r1, r10, r100, r101…)
    assert [f["Final-Recipient"].split(";")[1].strip() for f in report_fields(bounce)] == sorted(rcpts)
    assert built_on and threading.get_ident() not in built_on


async def test_one_delay_notice_then_the_bounce(sim):
    s = await sim(delay_warning_time=4 * HOUR, maximal_queue_lifetime=DAY, queue_run_delay=DAY)  # (as above)
    s.smtp.script = lambda req, now: ((Outcome.DEFERRED, "4.4.1", "no route", True) if req.sender
                                      else (Outcome.SENT, "2.0.0", "250 ok", True))
    await s.submit("alice@remote.test", "bob@far.test")
    await s.run_until(T0 + 2 * DAY)
    notices = notices_in(s.smtp)
    kinds = [report_fields(n)[0]["Action"] for n in notices]
    assert kinds == ["delayed", "failed"]
    assert "Will-Retry-Until" in report_fields(notices[0])[0]


async def test_jobs_of_one_message_that_end_differently_make_one_notice_and_one_retry(sim):
    """A recipient limit of 2 makes 5 recipients three jobs: the first two bounce, the third is deferred. One
    failure notice lists the four bounced recipients; the retry delivers the fifth alone; then the message is
    gone."""
    s = await sim(transport_destination_recipient_limit={"smtp": 2})
    first = {"r0@far.test": (Outcome.BOUNCED, "5.1.1", "550 no such user", True),
             "r2@far.test": (Outcome.BOUNCED, "5.1.1", "550 no such user", True),
             "r4@far.test": (Outcome.DEFERRED, "4.4.1", "451 try later", True)}
    tried: set[str] = set()

    def answer(req, now):
        head = req.recipients[0].address
        if not req.sender or head in tried:
            return (Outcome.SENT, "2.0.0", "250 ok", True)
        tried.add(head)
        return first[head]
    s.smtp.script = answer
    await s.submit("alice@remote.test", *(f"r{n}@far.test" for n in range(5)))
    await s.run_until(T0 + 2 * HOUR, stop=lambda: False)
    [notice] = notices_in(s.smtp)
    assert sorted((f["Final-Recipient"], f["Action"]) for f in report_fields(notice)) == [
        (f"rfc822; r{n}@far.test", "failed") for n in range(4)]
    jobs = [[r.address for r in req.recipients] for _, req in s.smtp.calls if req.sender]
    assert sorted(jobs) == [["r0@far.test", "r1@far.test"], ["r2@far.test", "r3@far.test"], ["r4@far.test"],
                            ["r4@far.test"]]
    assert await s.store.counts() == {}


# ----------------------------------------------------------------------------------- null sender


async def test_null_sender_mail_is_never_returned_but_a_double_bounce_goes_to_postmaster(sim):
    s = await sim()
    s.smtp.script = always(Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user")
    await s.submit("", "gone@far.test")
    await s.run_until(T0 + 60)
    senders = [req.sender for _, req in s.smtp.calls + s.local.calls]
    assert senders.count("") == 1, "the null-sender message is delivered once and never returned"
    [postmaster] = [req for _, req in s.local.calls]
    assert [r.address for r in postmaster.recipients] == ["postmaster@mx.local.test"]
    assert postmaster.sender == "double-bounce@mx.local.test"


async def test_double_bounces_can_be_dropped(sim):
    s = await sim(double_bounce_recipient="")
    s.smtp.script = always(Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user")
    await s.submit("", "gone@far.test")
    await s.run_until(T0 + 60)
    assert len(s.smtp.calls) == 1 and s.local.calls == []
    assert await s.store.counts() == {}


async def test_null_sender_mail_expires_after_the_bounce_lifetime(sim):
    s = await sim(bounce_queue_lifetime=HOUR, double_bounce_recipient="")
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "timed out")
    await s.submit("", "x@far.test")
    await s.run_until(T0 + 3 * HOUR)
    assert s.smtp.calls[-1][0] - T0 < 2 * HOUR
    assert await s.store.counts() == {}


async def test_expiry_is_logged_once_as_postfix_qmgr_logs_it(sim, caplog):
    s = await sim(maximal_queue_lifetime=HOUR, double_bounce_recipient="")
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "timed out")
    queue_id = await s.submit("a@remote.test", "x@far.test", "y@far.test")
    with caplog.at_level(logging.INFO, logger="mailflow.mail"):
        await s.run_until(T0 + 3 * HOUR)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.mail"]
    assert lines.count(f"{queue_id}: from=<a@remote.test>, status=expired, returned to sender") == 1, lines


async def test_a_big_message_past_its_lifetime_is_returned_record_slice_at_a_time(sim, monkeypatch, caplog):
    """The 100 000 pending recipients of a message past its lifetime were each made a returned result (0.5 s) and
    told to the observers (1 s) in one loop turn: both go RECORD_SLICE a turn, every recipient once, the lines and
    events in the same order, the message removed and its sender told once."""
    monkeypatch.setattr(qmgr_module, "RECORD_SLICE", 10)
    events: list[tuple[int, str, str]] = []  # (loop turn, event, to)
    turns = LoopTurns()
    s = await sim(maximal_queue_lifetime=HOUR, double_bounce_recipient="",
                  observer=lambda queue_id, event, fields: events.append((turns.count, event, fields.get("to", ""))))
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "timed out")
    made: list[tuple[int, int]] = []  # (loop turn, returned results made)
    expire = qmgr_module._expire

    def expiring(pending):
        made.append((turns.count, len(pending)))
        return expire(pending)

    monkeypatch.setattr(qmgr_module, "_expire", expiring)
    addresses = [f"u{i:02d}@far.test" for i in range(45)]
    queue_id = await s.submit("a@remote.test", *addresses)
    async with turns:
        with caplog.at_level(logging.INFO, logger="mailflow.mail"):
            await s.run_until(T0 + 3 * HOUR)
    assert [size for _, size in made] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in made}) == 5, "the loop had no turn between the slices"
    after = [i for i, (_, event, _) in enumerate(events) if event == "expired"]
    assert len(after) == 1
    returned = events[after[0] + 1:after[0] + 46]
    assert sorted(to for _, _, to in returned) == addresses and {event for _, event, _ in returned} == {"bounced"}
    assert len({turn for turn, _, _ in returned}) == 5, "the observers were told of them in one turn"
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.mail"]
    assert lines.count(f"{queue_id}: from=<a@remote.test>, status=expired, returned to sender") == 1
    assert lines.index(f"{queue_id}: removed") > lines.index(
        f"{queue_id}: from=<a@remote.test>, status=expired, returned to sender")
    assert not any("status=bounced" in line for line in lines)  # (told to the observers only, as before)
    assert await s.store.queue_states([queue_id]) == {}
    failures = {m["Message-ID"]: m for m in notices_in(s.smtp) if m["To"] == "a@remote.test"}  # (tried again)
    assert len(failures) == 1 and all(a in m.as_string() for m in failures.values() for a in addresses)


@pytest.mark.parametrize("meanwhile", ["hold", "delete"])
async def test_a_hold_or_delete_during_the_slices_of_an_expiry_returns_nothing(sim, monkeypatch, meanwhile):
    """An operator's hold or delete that lands while a big message's expired results are made wins, as one before
    the attempt's end does: held, its recipients stay pending and nobody is told; deleted, it is gone and nobody is
    told. What this shows is that `_conclude` reads the queue's state after the expiry, not before: the test puts
    its own `_expire_in_slices` in place, which makes the first slice with qmgr's, acts (awaiting the store's
    write, which the real slices' bare turns could not be relied on to let land in time), then makes the rest with
    qmgr's; that the real slices hand the loop back is shown by the test before."""
    monkeypatch.setattr(qmgr_module, "RECORD_SLICE", 10)
    s = await sim(maximal_queue_lifetime=HOUR, double_bounce_recipient="")
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "timed out")
    expire_in_slices, expire = qmgr_module._expire_in_slices, qmgr_module._expire
    steps: list[str | int] = []  # the slices made (their sizes) and the operator's act, in order

    async def expiring(pending):  # (the first slice, the act, then the rest, each sliced by qmgr's own function)
        first = await expire_in_slices(pending[:10])
        await (s.store.hold_messages if meanwhile == "hold" else s.store.delete_messages)([queue_id])
        steps.append(meanwhile)
        return first + await expire_in_slices(pending[10:])

    monkeypatch.setattr(qmgr_module, "_expire_in_slices", expiring)
    monkeypatch.setattr(qmgr_module, "_expire", lambda pending: steps.append(len(pending)) or expire(pending))
    queue_id = await s.submit("a@remote.test", *(f"u{i:02d}@far.test" for i in range(45)))
    await s.run_until(T0 + 3 * HOUR)
    assert steps == [10, meanwhile, 10, 10, 10, 5] and notices_in(s.smtp) == []
    if meanwhile == "hold":
        assert await s.store.counts() == {"hold": 1}
        rows = await s.store.recipients(queue_id)
        assert [status for _, status, _, _ in rows] == ["pending"] * 45
    else:
        assert await s.store.counts() == {}
    assert s.qmgr.active_count == 0 and s.qmgr.taken_count == 0


async def team_delivered_locally(s, caplog, answer) -> tuple[str, list[str]]:
    """alice@remote.test's mail to team@local.test, local(8) answering each recipient `answer(recipient)`: the queue
    id and the `relay=local` lines the first attempt logs."""

    def respond(request):
        s.local.record(request)
        return DeliveryReport(tuple(answer(r) for r in request.recipients))
    s.local.respond = respond
    with caplog.at_level(logging.INFO, logger="mailflow.mail"):
        queue_id = await s.submit("alice@remote.test", "team@local.test")
        await s.run_until(T0 + 60)
    return queue_id, [r.getMessage() for r in caplog.records
                      if r.name == "mailflow.mail" and "relay=local" in r.getMessage()]


async def team_deferred_with_ghost_bounced(s, caplog) -> list[str]:
    """team_delivered_locally with team deferred (4.3.0) and its member ghost bounced (5.1.1, `owned`): the two
    `relay=local` lines, asserted team's then ghost's."""
    ghost = OwnedFailure("", "ghost@local.test", "5.1.1", 'unknown user: "ghost"')
    queue_id, lines = await team_delivered_locally(s, caplog, lambda r: RcptResult(
        r, Outcome.DEFERRED, "4.3.0", "temporary failure", relay="local", owned=(ghost,)))
    assert [line.partition(", relay")[0] for line in lines] == [
        f"{queue_id}: to=<team@local.test>", f"{queue_id}: to=<ghost@local.test>, orig_to=<team@local.test>"]
    return lines


async def test_a_deferred_recipients_bounced_parts_are_logged_and_told_at_once(sim, caplog):
    """local(8) logs a part that bounced when it bounces and bounce(8) sends its notice at the end of the attempt,
    while another part keeps the recipient for the retry (Postfix's qmgr_active_done flushes the bounce log of a
    message that stays queued): `status=bounced` about the member after the recipient's deferred line, a failure
    notice about that member now, the recipient queued; the retry that delivers it tells nothing more."""
    s = await sim()
    lines = await team_deferred_with_ghost_bounced(s, caplog)
    assert lines[0].endswith("status=deferred (temporary failure)")
    assert lines[1].endswith('dsn=5.1.1, status=bounced (unknown user: "ghost")')
    [notice] = notices_in(s.smtp)
    assert [(f["Final-Recipient"], f["Action"], f["Status"]) for f in report_fields(notice)] == [
        ("rfc822; ghost@local.test", "failed", "5.1.1")]
    assert await s.store.counts() == {"deferred": 1}
    s.local.respond = lambda request: DeliveryReport(tuple(RcptResult(r, Outcome.SENT, "2.0.0", "delivered",
                                                                      relay="local") for r in request.recipients))
    await s.run_until(T0 + HOUR)
    assert await s.store.counts() == {} and len(notices_in(s.smtp)) == 1


async def test_a_bounced_recipients_delivered_parts_have_a_line_beside_its_failures(sim, caplog):
    """A recipient whose failures are logged apart (`owned`) also logs what was delivered (`status=sent`), as
    local(8) logs each delivery: log tools count both."""
    s = await sim()
    failures = (OwnedFailure("", "ghost@local.test", "5.1.1", 'unknown user: "ghost"'),
                OwnedFailure("", "team@local.test", "5.1.1", "user unknown"))
    queue_id, lines = await team_delivered_locally(s, caplog, lambda r: RcptResult(
        r, Outcome.BOUNCED, "5.1.1", "…", relay="local", owned=failures, delivered="delivered to maildir"))
    assert [(line.partition(",")[0], line.rpartition("status=")[2]) for line in lines] == [
        (f"{queue_id}: to=<ghost@local.test>", 'bounced (unknown user: "ghost")'),
        (f"{queue_id}: to=<team@local.test>", "bounced (user unknown)"),
        (f"{queue_id}: to=<team@local.test>", "sent (delivered to maildir)")]


# ------------------------------------------------------------------------------ soft_bounce


def test_a_soft_bounced_result_keeps_no_list_failures():
    """A deferral tells no owner anything: the failures a bounce would have told each list's owner are not kept
    (nor stored at every retry); the next try works them out again."""
    owned = (OwnedFailure("owner-l1@x.test", "l1@x.test", "5.3.0", "Command died"),) * 2
    bounced = RcptResult(Recipient(0, "all@x.test", ""), Outcome.BOUNCED, "5.3.0", "Command died", owned=owned)
    kept = _soft_bounced(bounced)
    assert (kept.outcome, kept.dsn, kept.owned, kept.soft_bounced) == (Outcome.DEFERRED, "4.3.0", (), True)


async def test_soft_bounce_keeps_a_bounce_deferred_and_logs_it_as_postfix_does(sim, caplog):
    """Postfix 3.7.11 with soft_bounce = yes logs `dsn=4.1.1, status=SOFTBOUNCE (text)` where it would bounce,
    keeps the recipient in its deferred queue with that text, and sends no bounce."""
    s = await sim(soft_bounce=True)
    s.smtp.script = None
    s.smtp.outcomes = {"gone@far.test": (Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user")}
    with caplog.at_level(logging.INFO, logger="mailflow.mail"):
        queue_id = await s.submit("alice@remote.test", "gone@far.test", "ok@far.test")
        await s.run_until(T0 + 60)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.mail"]
    [line] = [line for line in lines if "to=<gone@far.test>" in line]
    assert line.startswith(f"{queue_id}: to=<gone@far.test>, relay=mx.remote.test[192.0.2.1]:25, ")
    assert line.endswith(", dsn=4.1.1, status=SOFTBOUNCE (550 5.1.1 no such user)")
    assert [m["Subject"] for m in notices_in(s.smtp)] == []
    assert await s.store.counts() == {"deferred": 1}
    [row] = [r for r in await s.store.recipients(queue_id) if r[0] == "gone@far.test"]
    assert row[2:] == ("4.1.1", "550 5.1.1 no such user")
    s.smtp.outcomes = {}  # the configuration fixed: the next attempt delivers it
    await s.run_until(T0 + HOUR)
    assert await s.store.counts() == {}


async def test_soft_bounce_logs_a_deferred_recipients_bounced_parts_as_softbounce(sim, caplog):
    """Postfix's bounce_append under soft_bounce hands a part that would bounce to the defer service, logged
    `dsn=4.X.X, status=SOFTBOUNCE`: a deferred recipient's bounced part gets that line after its deferred one, and
    nobody a notice."""
    s = await sim(soft_bounce=True)
    lines = await team_deferred_with_ghost_bounced(s, caplog)
    assert lines[0].endswith("dsn=4.3.0, status=deferred (temporary failure)")
    assert lines[1].endswith('dsn=4.1.1, status=SOFTBOUNCE (unknown user: "ghost")')
    assert [m["Subject"] for m in notices_in(s.smtp)] == []
    assert await s.store.counts() == {"deferred": 1}


async def test_soft_bounced_mail_is_still_returned_at_the_end_of_its_lifetime(sim, caplog):
    """Postfix's qmgr returns a message past maximal_queue_lifetime whatever soft_bounce says (defer_flush)."""
    s = await sim(soft_bounce=True, maximal_queue_lifetime=HOUR)
    s.smtp.script = lambda req, now: ((Outcome.BOUNCED, "5.1.1", "550 5.1.1 no such user", True) if req.sender
                                      else (Outcome.SENT, "2.0.0", "250 ok", True))
    with caplog.at_level(logging.INFO, logger="mailflow.mail"):
        queue_id = await s.submit("alice@remote.test", "gone@far.test")
        await s.run_until(T0 + 3 * HOUR)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.mail"]
    assert f"{queue_id}: from=<alice@remote.test>, status=expired, returned to sender" in lines
    [bounce] = notices_in(s.smtp)
    [fields] = report_fields(bounce)
    assert fields["Action"] == "failed" and fields["Status"] == "4.1.1"
    assert await s.store.counts() == {}


# ------------------------------------------------------------------------------ destinations


async def test_window_grows_under_success(sim):
    s = await sim(initial_destination_concurrency=2, default_destination_concurrency_limit=6)
    s.smtp.release.clear()
    s.smtp.linger = 0.001  # stay in flight a moment once released, so deliveries overlap as real ones do
    for n in range(40):
        await s.submit("a@remote.test", f"r{n}@far.test")
    await eventually(lambda: waiting(s, "far.test") == (2, 38))  # every message taken, the window full
    assert s.smtp.max_in_flight == 2, "starts at the initial concurrency"
    s.smtp.release.set()
    await s.run_until(T0 + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert s.smtp.max_in_flight == 6, "grew to the limit"


async def test_site_failures_kill_a_destination_others_keep_delivering_and_it_comes_back(sim):
    s = await sim(minimal_backoff_time=600, maximal_backoff_time=600, initial_destination_concurrency=1)
    down = {"value": True}

    def answer(req, now):
        if req.nexthop == "dead.test" and down["value"]:
            return (Outcome.DEFERRED, "4.4.1", "connect to dead.test: Connection refused", False)
        return (Outcome.SENT, "2.0.0", "250 ok", True)
    s.smtp.script = answer
    for n in range(5):
        await s.submit("a@remote.test", f"r{n}@dead.test")
        await s.submit("a@remote.test", f"r{n}@good.test")
    await s.run_until(T0 + 1)

    tried_dead = [req for _, req in s.smtp.calls if req.nexthop == "dead.test"]
    assert len(tried_dead) == 1, "one failure with window 1 is a failed cohort: the rest is not tried"
    assert sorted(r.recipients[0].address for _, r in s.smtp.calls if r.nexthop == "good.test") == \
        [f"r{n}@good.test" for n in range(5)]
    [row] = [d for d in s.qmgr.destinations() if d[1] == "dead.test"]
    assert row[2] == 0 and row[6] == T0 + 600 and "Connection refused" in row[7]
    assert await s.store.counts() == {"deferred": 5}

    down["value"] = False
    await s.run_until(T0 + 2000, stop=lambda: False)
    assert await s.store.counts() == {}
    revived = [t for t, req in s.smtp.calls if req.nexthop == "dead.test"][1]
    assert revived >= T0 + 600


async def test_a_dead_destination_with_nothing_queued_is_forgotten_when_its_dead_time_is_over(sim):
    """Its timer brings it back to the queue manager's attention: `queue destinations` stops showing it dead."""
    s = await sim(minimal_backoff_time=600, maximal_backoff_time=4000, initial_destination_concurrency=1)
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "connection refused", site_ok=False)
    await s.submit("a@remote.test", "r@dead.test")
    await s.run_until(T0 + 1)
    assert [row[6] for row in s.qmgr.destinations()] == [T0 + 600]
    await s.run_until(T0 + 601, stop=lambda: False)
    assert s.qmgr.destinations() == []


async def test_recipient_refusals_do_not_move_the_window(sim):
    s = await sim(initial_destination_concurrency=1, destination_concurrency_failed_cohort_limit=1)
    s.smtp.script = always(Outcome.BOUNCED, "5.1.1", "550 no such user", site_ok=True)
    for n in range(5):
        await s.submit("", f"r{n}@far.test")
    await s.run_until(T0 + 1)
    assert len(s.smtp.calls) == 5, "per-recipient refusals never made the destination dead"


# ------------------------------------------------------------------------------ operator changes


async def test_a_flush_revives_a_dead_destination(sim):
    s = await sim(tick=1.0, minimal_backoff_time=3600, maximal_backoff_time=3600, initial_destination_concurrency=1)
    s.smtp.script = always(Outcome.DEFERRED, "4.4.1", "connection refused", site_ok=False)
    qid = await s.submit("a@remote.test", "r@dead.test")
    await s.run_until(T0 + 1)
    [row] = s.qmgr.destinations()
    assert row[6] == T0 + 3600, "dead for an hour"

    s.smtp.script = SENT
    await s.store.flush_messages([qid], s.clock.now)  # what `mailflow queue flush` does
    await s.run_until(T0 + 2 + 86400, stop=lambda: len(s.smtp.calls) == 2)
    assert s.clock.now < T0 + 60, "tried again at the next tick, not when the dead timer ran out"
    assert await s.store.counts() == {}


def waiting(s: Sim, nexthop: str) -> tuple[int, int] | None:
    """(deliveries in flight, jobs waiting) of the smtp destination `nexthop`, as qmgr keeps them."""
    rows = [row for row in s.qmgr.destinations() if row[:2] == ("smtp", nexthop)]
    return (rows[0][3], rows[0][4]) if rows else None


async def one_in_flight_one_waiting(s: Sim, outcome: tuple) -> tuple[str, str, asyncio.Event]:
    """Window 1; the first message's delivery blocks until the returned event is set (then answers
    `outcome`), the second waits in memory for its turn. Returns (first, second, release)."""
    s.smtp.release.clear()
    s.smtp.script = always(*outcome)
    first = await s.submit("a@remote.test", "one@far.test")
    second = await s.submit("a@remote.test", "two@far.test")
    await eventually(lambda: waiting(s, "far.test") == (1, 1))
    return first, second, s.smtp.release


async def test_a_message_held_while_waiting_for_its_destination_is_not_delivered(sim):
    s = await sim(initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    first, second, release = await one_in_flight_one_waiting(s, (Outcome.SENT, "2.0.0", "ok"))
    assert [req.queue_id for _, req in s.smtp.calls] == [first], "window 1: the second waits in memory"

    await s.store.hold_messages([second])  # what `mailflow queue hold` does
    s.clock.advance(86400)  # the tick notices the change
    await eventually(lambda: waiting(s, "far.test") == (1, 0))  # its job withdrawn
    release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.queue_id for _, req in s.smtp.calls] == [first]
    assert await s.store.counts() == {"hold": 1}
    [(_, status, dsn, _)] = await s.store.recipients(second)
    assert status == "pending"


async def test_holding_many_active_messages_asks_each_destination_once_not_once_per_message(sim, monkeypatch):
    """A hold of N active messages, each waiting at a destination of its own (a recipient limit of 1), withdraws
    their jobs in one pass over the destinations: asking every destination about every message cost N x N calls
    (8 000 held messages stalled the loop for 25 s)."""
    from mailflow.stages.qmgr.destination import Destination
    asked = []
    for name in ("withdraw", "withdraw_many"):
        if hasattr(Destination, name):
            original = getattr(Destination, name)
            monkeypatch.setattr(Destination, name, lambda self, ids, _o=original: asked.append(ids) or _o(self, ids))
    s = await sim(delivery_concurrency_limit=1, destination_recipient_limit=1)
    s.smtp.release.clear()
    s.smtp.script = always(Outcome.SENT, "2.0.0", "ok")
    ids = [await s.submit("a@remote.test", f"u{i}@far.test") for i in range(40)]
    await eventually(lambda: len(s.qmgr.destinations()) == 40)  # one in flight, 39 waiting at their own
    await s.store.hold_messages(ids[1:])
    s.clock.advance(86400)  # the tick notices the holds
    await eventually(lambda: sum(row[4] for row in s.qmgr.destinations()) == 0)
    assert len(asked) <= 40, f"{len(asked)} withdrawals for 39 held messages at 40 destinations"
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert await s.store.counts() == {"hold": 39}


async def test_a_message_held_while_active_past_its_lifetime_stays_held_and_bounces_nothing(sim):
    """An operator's hold wins over the queue lifetime: a message held while in delivery (or waiting for its
    destination) is not returned to its sender as expired at the end of that attempt; it stays on hold."""
    s = await sim(initial_destination_concurrency=1, default_destination_concurrency_limit=1,
                  maximal_queue_lifetime=HOUR)
    first, second, release = await one_in_flight_one_waiting(s, (Outcome.DEFERRED, "4.4.1", "try later"))
    await s.store.hold_messages([first, second])
    s.clock.advance(DAY)  # the tick notices the holds; both messages are past their lifetime
    await eventually(lambda: waiting(s, "far.test") == (1, 0))
    release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.queue_id for _, req in s.smtp.calls] == [first], "no bounce was sent"
    assert await s.store.counts() == {"hold": 2}
    for queue_id in (first, second):
        [(_, status, _, _)] = await s.store.recipients(queue_id)
        assert status == "pending"


async def one_in_delivery(s, outcome: tuple) -> str:
    """A message to one@far.test whose delivery waits on `s.smtp.release`, then ends with `outcome`; the notices
    to its sender are delivered. Returns its queue id once the delivery is under way."""
    s.smtp.release.clear()
    s.smtp.script = lambda req, now: outcome if req.sender else (Outcome.SENT, "2.0.0", "250 ok", True)
    queue_id = await s.submit("a@remote.test", "one@far.test")
    await eventually(lambda: waiting(s, "far.test") == (1, 0))
    return queue_id


async def test_a_hold_that_qmgr_has_not_polled_yet_still_keeps_an_expired_message_from_bouncing(sim):
    s = await sim(maximal_queue_lifetime=HOUR)  # the tick (a day) never comes: the hold is not noticed
    queue_id = await one_in_delivery(s, (Outcome.DEFERRED, "4.4.1", "try later", True))
    await s.store.hold_messages([queue_id])
    s.clock.advance(2 * HOUR)
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.queue_id for _, req in s.smtp.calls] == [queue_id], "no bounce was sent"
    assert await s.store.counts() == {"hold": 1}


async def test_a_hold_that_qmgr_has_not_polled_yet_sends_no_delay_notice_and_release_sends_just_one(sim):
    """A message held while in delivery past delay_warning_time is not warned about at the end of that attempt
    (qmgr had not seen the hold); after the release it is warned once. The notice went out and the flag that
    says so was dropped (only an active message was updated), so each release warned again: the kill campaign
    found senders with two or three delay notices for one message."""
    s = await sim(delay_warning_time=HOUR, maximal_queue_lifetime=DAY)  # the tick never comes
    queue_id = await one_in_delivery(s, (Outcome.DEFERRED, "4.4.1", "try later", True))
    await s.store.hold_messages([queue_id])
    s.clock.advance(2 * HOUR)
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert notices_in(s.smtp) == [], "no notice about a held message"
    assert await s.store.counts() == {"hold": 1}
    for _ in range(2):  # released, delayed again: one notice in all
        await s.store.release_messages([queue_id], s.clock.now)
        s.qmgr.wake()
        await s.run_until(s.clock.now + 600, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0
                          and len([c for c in s.smtp.calls if c[1].sender]) >= 2 + _)
    assert [report_fields(n)[0]["Action"] for n in notices_in(s.smtp)] == ["delayed"]


async def test_a_message_deleted_while_active_is_neither_delivered_nor_called_corrupt(sim, caplog):
    """Nor logged `removed` by qmgr: the operator's tool logs postsuper's line (and the metrics hear it once)."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    s = await sim(initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    first, second, release = await one_in_flight_one_waiting(s, (Outcome.BOUNCED, "5.1.1", "gone"))
    await s.store.delete_messages([first, second])  # `mailflow queue delete`, one of them in flight
    s.clock.advance(86400)
    await eventually(lambda: waiting(s, "far.test") == (1, 0))  # the waiting job withdrawn
    release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.queue_id for _, req in s.smtp.calls] == [first]
    assert await s.store.counts() == {}, "no bounce for a message the operator deleted"
    assert "corrupt" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.getMessage().endswith(": removed")] == []


async def test_a_message_deleted_in_delivery_before_qmgr_polled_gets_no_failure_notice(sim):
    """`queue delete` says no bounce is sent: a message deleted while its delivery was under way, that bounced,
    got its failure notice all the same when the attempt ended before qmgr's poll had seen the delete."""
    s = await sim()  # the tick (a day) never comes: the delete is not noticed
    queue_id = await one_in_delivery(s, (Outcome.BOUNCED, "5.1.1", "gone", True))
    await s.store.delete_messages([queue_id])
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.queue_id for _, req in s.smtp.calls] == [queue_id], "no notice was sent"
    assert await s.store.counts() == {}


@pytest.mark.parametrize("outcome", ["sent", "bounced", "deferred"])
@pytest.mark.parametrize("polled", [True, False], ids=["delete-polled", "delete-unpolled"])
async def test_a_message_deleted_during_its_delivery_still_logs_that_delivery(sim, caplog, polled, outcome):
    """`postsuper -d` of a message under delivery: Postfix 3.7.11's smtp(8) still logs its `to=<…>, …, status=sent`
    line for that attempt (after postsuper's `removed`; its qmgr logs no `removed` of its own), and pflogsumm
    counts it. mailflow logs the attempt's result line too, whether qmgr's poll saw the delete before the attempt
    ended or not (a bounce, owing a notice, has the end ask the store first: gone, no notice, its line still
    logged); nothing is delivered again. No second `removed`: when the poll had not seen the delete, the end's
    removal finds no message and warns, as Postfix's qmgr_active_done warns `remove QID from active: No such file
    or directory` (it logged qmgr's `removed` after the tool's); a deferral that finds none warns as its
    qmgr_active_defer does (it was silent)."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    s = await sim()
    reply = {"sent": (Outcome.SENT, "2.0.0", "250 ok", True), "bounced": (Outcome.BOUNCED, "5.1.1", "550 gone", True),
             "deferred": (Outcome.DEFERRED, "4.0.0", "451 later", True)}
    queue_id = await one_in_delivery(s, reply[outcome])
    await s.store.delete_messages([queue_id])  # `mailflow queue delete` while the delivery is under way
    if polled:
        s.clock.advance(DAY)  # the tick: qmgr's poll sees the delete
        await eventually(lambda: s.qmgr._active[queue_id].withdrawn == "deleted")
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: ")]
    results = [line for line in lines if "status=" in line]
    assert len(results) == 1 and results[0].startswith(f"{queue_id}: to=<one@far.test>,"), lines
    assert results[0].endswith(f"status={outcome} ({reply[outcome][2]})"), lines
    assert f"{queue_id}: removed" not in lines
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    gone = {"sent": f"qmgr_active_done: remove {queue_id} from active: No such file or directory",
            "deferred": f"qmgr_active_defer: rename {queue_id} from active to deferred: No such file or directory"}
    assert warnings == ([gone[outcome]] if not polled and outcome in gone else []), warnings
    assert [req.queue_id for _, req in s.smtp.calls] == [queue_id]
    assert await s.store.counts() == {}



async def test_a_message_released_during_its_attempt_whose_end_shares_the_scans_commit_is_not_stuck_active(sim):
    """Held and released while its delivery is under way, the message is due: the scan claims it (active) while
    qmgr still has it in hand, so it is left to the attempt. When that attempt's end lingered in the committer and
    went in the same commit as the scan's claim, the end's "defer if active" ran first (the row was not active
    yet: left alone) and the claim after it: the row stayed active once the attempt let go of it, and nothing took
    it again before a restart. Let go of, it is deferred as the end meant, and delivered at its next try."""
    s = await sim()
    later = (Outcome.DEFERRED, "4.4.1", "try later", True)
    queue_id = await one_in_delivery(s, later)
    tries = iter([later])
    s.smtp.script = lambda req, now: next(tries, (Outcome.SENT, "2.0.0", "250 ok", True))
    await s.store.hold_messages([queue_id])
    await s.store.release_messages([queue_id], s.clock.now)
    take, ended = s.store.take, []

    async def take_with_the_end_waiting(now: float, limit: int):
        if not ended:  # the attempt ends now: its lingering write waits for company, and the claim comes with it
            ended.append(s.smtp.release.set())
            for _ in range(200):  # (loop turns, not sleeps: it lingers for 2 ms only)
                if s.store._committer._waiting:
                    break
                await asyncio.sleep(0)
            assert s.store._committer._waiting, "the end's write waits in the committer"
        return await take(now, limit)

    s.store.take = take_with_the_end_waiting
    s.qmgr.wake()
    await s.run_until(s.clock.now + 2 * HOUR, stop=lambda: len(s.smtp.calls) == 2 and not s.qmgr.busy)
    assert [req.queue_id for _, req in s.smtp.calls] == [queue_id, queue_id], "tried again, once at a time"
    assert await s.store.counts() == {}, "delivered at its second try, not left active"



async def near_in_flight_far_waiting(s: Sim) -> str:
    """Window 1, deliveries waiting on `s.smtp.release` (then sent): another message's delivery to far.test under
    way, then one to y@near.test (its delivery under way) and z@far.test (its job waiting for far.test's window).
    Returns the latter's queue id."""
    s.smtp.release.clear()
    s.smtp.script = SENT
    await s.submit("a@remote.test", "x@far.test")
    await eventually(lambda: waiting(s, "far.test") == (1, 0))
    queue_id = await s.submit("a@remote.test", "y@near.test", "z@far.test")
    await eventually(lambda: waiting(s, "far.test") == (1, 1) and waiting(s, "near.test") == (1, 0))
    return queue_id


def delivered_to(s: Sim) -> list[list[str]]:
    return [[r.address for r in req.recipients] for _, req in s.smtp.calls]


async def in_queue(s: Sim, queue_id: str, queue: str) -> bool:
    return await s.store.queue_states([queue_id]) == {queue_id: queue}


async def held_released_and_claimed(s: Sim) -> str:
    """`near_in_flight_far_waiting`'s message held (the tick withdraws z's job), released, and claimed again by the
    scan while y's delivery is still under way; its queue id."""
    queue_id = await near_in_flight_far_waiting(s)
    await s.store.hold_messages([queue_id])
    s.clock.advance(1.0)
    await eventually(lambda: waiting(s, "far.test") == (1, 0), what="z's job withdrawn at the hold")
    await s.store.release_messages([queue_id], s.clock.now)
    s.clock.advance(1.0)
    await eventually(lambda: in_queue(s, queue_id, "active"), what="the scan's claim")
    return queue_id


async def test_a_message_released_during_its_attempt_after_its_hold_withdrew_a_job_is_due_at_once(sim):
    """The hold (seen at the tick) withdrew the job of z@far.test, not started yet; the release makes the message
    due now. The scan leaves it to the attempt under way, whose end deferred it with the normal backoff (328 s):
    z, never tried, waited for that as if its delivery had failed. Released, it is due at once."""
    s = await sim(tick=1.0, initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    await held_released_and_claimed(s)
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: len(s.smtp.calls) == 3 and not s.qmgr.busy)
    assert delivered_to(s) == [["x@far.test"], ["y@near.test"], ["z@far.test"]]
    assert await s.store.counts() == {}


async def test_a_hold_released_before_qmgr_polled_it_withdraws_no_job(sim):
    """Held and released within one tick, the message's row is deferred (due) when qmgr polls: its jobs are not
    withdrawn (they were, as for a hold, with "delivery suspended"), and the attempt goes on as if never held."""
    s = await sim(tick=1.0, initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    queue_id = await near_in_flight_far_waiting(s)
    await s.store.hold_messages([queue_id])
    await s.store.release_messages([queue_id], s.clock.now)
    s.clock.advance(1.0)
    await eventually(lambda: in_queue(s, queue_id, "active"), what="polled, then claimed by the scan")
    assert waiting(s, "far.test") == (1, 1), "z's job still waits for far.test's window"
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: len(s.smtp.calls) == 3 and not s.qmgr.busy)
    assert delivered_to(s) == [["x@far.test"], ["y@near.test"], ["z@far.test"]]
    assert await s.store.counts() == {}


async def test_the_jobs_of_a_message_requeued_during_its_attempt_are_deferred_saying_so(sim, caplog):
    """An operator holds, then requeues the message while its attempt is under way (to maildrop, for pickup to copy
    once the attempt is over): its job not started yet is withdrawn and deferred, and the reason said "put on hold"
    (for a move to the corrupt queue too). It names what became of the message."""
    caplog.set_level(logging.INFO)
    s = await sim(tick=1.0, initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    queue_id = await near_in_flight_far_waiting(s)
    await s.store.hold_messages([queue_id])
    await s.store.requeue_messages([queue_id], s.clock.now)
    s.clock.advance(1.0)
    await eventually(lambda: waiting(s, "far.test") == (1, 0), what="z's job withdrawn at the requeue")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: to=<z@far.test>")]
    assert len(lines) == 1 and "status=deferred (delivery suspended: the message was requeued)" in lines[0], lines


async def test_a_hold_released_within_a_tick_while_the_active_queue_is_full_is_deferred_at_its_attempts_end(sim):
    """Held and released before qmgr polled, its row deferred (due at the release) while its attempt goes on, and no
    room for a scan to claim it: the end's "defer if active" left the deferred row alone, due at once and the
    attempt not counted, so the recipients that attempt deferred were tried again at once. The attempt goes on as
    if never held, and its end defers it with the usual backoff."""
    s = await sim(active_limit=1)
    queue_id = await one_in_delivery(s, (Outcome.DEFERRED, "4.4.1", "try later", True))
    await s.store.hold_messages([queue_id])
    await s.store.release_messages([queue_id], s.clock.now)
    s.qmgr.wake()  # (the scan finds no room)
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: len(s.smtp.calls) > 1)
    assert [req.queue_id for _, req in s.smtp.calls] == [queue_id], "not tried again at once"
    [(queue, next_attempt, attempts)] = await s.store._reader.fetchall(
        "SELECT queue, next_attempt, attempts FROM message WHERE id = ?", (queue_id,))
    assert (queue, attempts) == ("deferred", 1) and next_attempt > s.clock.now


async def test_a_message_whose_attempt_ends_while_the_scan_that_took_it_decodes_is_not_delivered_again(sim):
    """Held and released during its delivery, the message is due: the scan claims it and reads its recipients, still
    pending, while its attempt is under way. The rows the scan took are decoded in a worker thread (a message of
    many recipients beside it); meanwhile that attempt ended (sent) and let go of it, and the scan admitted its stale
    copy: `to=<one@far.test> status=sent` twice. A copy read before its attempt let go of it is not admitted."""
    s = await sim()
    queue_id = await one_in_delivery(s, (Outcome.SENT, "2.0.0", "250 ok", True))
    await s.store.hold_messages([queue_id])
    await s.store.release_messages([queue_id], s.clock.now)
    await s.submit("b@remote.test", *[f"u{i}@big{i % 50}.test" for i in range(2000)])  # (decoded off the loop)
    s.smtp.release.set()
    s.qmgr.wake()
    await s.run_until(s.clock.now + 2 * HOUR, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.recipients[0].address for _, req in s.smtp.calls if req.queue_id == queue_id] == ["one@far.test"]
    assert await s.store.counts() == {}


async def test_a_message_being_given_back_is_not_admitted_beside_the_give_back(sim):
    """Released during its attempt after its hold withdrew a job, the message is due at once when that attempt
    ends; the end rouses the loop before the give-back's write (`_give_back`), and the scan claimed and admitted the
    message afresh: the give-back then deferred the row of that new attempt, in hand (the attempt counted, a later
    scan free to take it beside it). A message being given back is not admitted; it is given back again after."""
    s = await sim(tick=1.0, initial_destination_concurrency=1, default_destination_concurrency_limit=1)
    await held_released_and_claimed(s)
    deferred_in_hand = []
    give_back = s.store.give_back

    async def watched_give_back(qid, at):
        await s.store.queue_states([qid])  # (its write a reader hop later, as behind a busy committer)
        await give_back(qid, at)
        state = (await s.store.queue_states([qid])).get(qid)
        deferred_in_hand.append(state == "deferred" and s.qmgr.in_hand(qid))

    s.store.give_back = watched_give_back
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: len(s.smtp.calls) == 3 and not s.qmgr.busy)
    assert deferred_in_hand and not any(deferred_in_hand), "no give-back defers a message in hand"
    assert delivered_to(s) == [["x@far.test"], ["y@near.test"], ["z@far.test"]]
    assert await s.store.counts() == {}


def test_success_notices_say_relayed_only_for_a_remote_mta():
    rcpt = Recipient(0, "a@example.test", "a@example.test", notify="SUCCESS")
    remote = _notice_recipient(RcptResult(rcpt, Outcome.SENT, "2.0.0", "250 ok", "mx.example.test[192.0.2.1]:25"), 0)
    assert (remote.action, remote.remote_mta) == ("relayed", "mx.example.test")
    for relay in ("local", "virtual", "mlmmj", "none"):  # local agents and pipe services deliver, they do not relay
        here = _notice_recipient(RcptResult(rcpt, Outcome.SENT, "2.0.0", "done", relay), 0)
        assert (here.action, here.remote_mta) == ("delivered", ""), relay


def test_a_gateways_success_notice_says_action_relayed():
    """A success its agent marks relayed (a pipe(8) service without flag X: a gateway that may send no notice of
    its own, RFC 3464 2.3.3) is `Action: relayed` in its notice, though its relay is a local service's name."""
    from mailflow.model import QueuedMessage
    from mailflow.stages.bounce import build_notice

    rcpt = Recipient(0, "a@example.test", "a@example.test", notify="SUCCESS")
    message = QueuedMessage("Q1", "s@example.org", 0.0, 10, False, "7BIT", 1, (rcpt,))
    actions = []
    for relayed in (True, False):
        result = RcptResult(rcpt, Outcome.SENT, "2.0.0", "delivered via mlmmj service", "mlmmj", relayed=relayed)
        [notice] = plan(message, [result], warn_delay=False, myhostname="mx.test", double_bounce_recipient="pm",
                        now=0.0)
        raw = build_notice(kind=notice.kind, queue_id="Q1", sender=message.sender, arrival=0.0, envid="", ret="",
                           recipients=list(notice.recipients), original=b"Subject: s\r\n\r\nbody\r\n",
                           reporting_mta="mx.test", now=0.0, notice_id="Q1.success")
        actions.append(re.findall(rb"^Action: (\w+)\r$", raw, re.M))
    assert actions == [[b"relayed"], [b"delivered"]]


def test_a_lists_failure_goes_to_its_owner_and_an_aliass_success_says_expanded():
    """local(8): a failure whose agent names a list's owner (bounce_workaround) is that owner's notice, the others
    the sender's; a success of an expanded alias is `expanded` ("alias expanded"), of a list `delivered`."""
    from mailflow.model import QueuedMessage

    a, b, c = (Recipient(i, f"{n}@example.test", f"{n}@example.test", notify="SUCCESS,FAILURE")
               for i, n in enumerate("abc"))
    message = QueuedMessage("Q1", "s@example.org", 0.0, 10, False, "7BIT", 1, (a, b, c))
    kwargs = dict(warn_delay=False, myhostname="mx.test", double_bounce_recipient="postmaster", now=0.0)
    failures = [RcptResult(a, Outcome.BOUNCED, "5.3.0", "x", "local", owner="owner-a@example.test"),
                RcptResult(b, Outcome.BOUNCED, "5.3.0", "y", "local")]
    assert [(n.to, [r.recipient.address for r in n.recipients]) for n in plan(message, failures, **kwargs)] == [
        ("owner-a@example.test", ["a@example.test"]), ("s@example.org", ["b@example.test"])]
    successes = [RcptResult(a, Outcome.SENT, "2.0.0", "delivered to mailbox", "local", expansion="alias"),
                 RcptResult(b, Outcome.SENT, "2.0.0", "forwarded as Q2 to x@y", "local", expansion="list"),
                 RcptResult(c, Outcome.SENT, "2.0.0", "delivered to mailbox", "local")]
    [notice] = plan(message, successes, **kwargs)
    assert [(r.action, r.diagnostic) for r in notice.recipients] == [
        ("expanded", "alias expanded"), ("delivered", "alias expanded"), ("delivered", "delivered to mailbox")]


def test_no_success_notice_when_the_next_hop_offered_dsn_and_took_notify():
    """Postfix smtp_rcpt_done: a peer that announced DSN was given NOTIFY, so it reports success itself; one
    that did not gets a "relayed" notice from here."""
    from mailflow.model import QueuedMessage

    rcpt = Recipient(0, "a@example.test", "a@example.test", notify="SUCCESS,FAILURE")
    message = QueuedMessage("Q1", "s@example.org", 0.0, 10, False, "7BIT", 1, (rcpt,))
    relay = "mx.example.test[192.0.2.1]:25"
    with_dsn = RcptResult(rcpt, Outcome.SENT, "2.0.0", "250 ok", relay, next_hop_notifies=True)
    without = RcptResult(rcpt, Outcome.SENT, "2.0.0", "250 ok", relay)
    kwargs = dict(warn_delay=False, myhostname="mx.test", double_bounce_recipient="postmaster", now=0.0)
    assert plan(message, [with_dsn], **kwargs) == []
    [notice] = plan(message, [without], **kwargs)
    assert notice.kind == "success" and notice.recipients[0].action == "relayed"


def test_notify_classes_decide_the_postmasters_copies():
    """Postfix's notify_classes (bounce_notify_service.c, bounce_warn_service.c): `bounce` copies a failure
    notice (headers only, every recipient whatever its NOTIFY) to bounce_notice_recipient, `delay` a delay notice
    to delay_notice_recipient, from the double-bounce sender; a failed notice (null sender) goes to the
    double-bounce recipient with `2bounce` or `bounce` only, whole; neither class: none of these."""
    from mailflow.stages.qmgr import _owes_notice

    never = Recipient(0, "a@example.test", "a@example.test", notify="NEVER")
    told = Recipient(1, "b@example.test", "b@example.test")
    message = QueuedMessage("Q1", "s@example.org", 0.0, 10, False, "7BIT", 1, (never, told))
    bounce = QueuedMessage("Q2", "", 0.0, 10, False, "7BIT", 1, (told,))
    failures = [RcptResult(r, Outcome.BOUNCED, "5.1.1", "no", "local") for r in (never, told)]
    delays = [RcptResult(r, Outcome.DEFERRED, "4.2.0", "busy", "local") for r in (never, told)]

    def notices(msg, results, classes, warn=False):
        pm = Postmaster(classes, bounce_to="bounces", delay_to="delays@example.net")
        return [(n.kind, n.sender, n.to, n.ret, [r.recipient.address for r in n.recipients])
                for n in plan(msg, results, warn_delay=warn, myhostname="mx.test", double_bounce_recipient="pm",
                              now=0.0, postmaster=pm)]

    copy = ("double-bounce@mx.test", "bounces@mx.test", "HDRS", ["a@example.test", "b@example.test"])
    assert notices(message, failures, ("bounce",)) == [
        ("failure", "", "s@example.org", None, ["b@example.test"]), ("failure", *copy)]
    assert notices(message, failures[:1], ("bounce",)) == [  # (no sender's notice: a copy all the same)
        ("failure", "double-bounce@mx.test", "bounces@mx.test", "HDRS", ["a@example.test"])]
    assert _owes_notice(failures[0], ("bounce",)) and not _owes_notice(failures[0], ("2bounce", "delay"))
    assert notices(message, failures, ("resource", "software", "2bounce", "delay")) == [
        ("failure", "", "s@example.org", None, ["b@example.test"])]
    assert notices(message, delays, ("delay",), warn=True) == [
        ("delay", "", "s@example.org", None, ["b@example.test"]),
        ("delay", "double-bounce@mx.test", "delays@example.net", "HDRS", ["a@example.test", "b@example.test"])]
    assert notices(message, delays, ("bounce",), warn=True) == [
        ("delay", "", "s@example.org", None, ["b@example.test"])]
    double = [("failure", "double-bounce@mx.test", "pm@mx.test", "FULL", ["b@example.test"])]
    assert notices(bounce, failures[1:], ("2bounce",)) == double
    assert notices(bounce, failures[1:], ("bounce",)) == double
    assert notices(bounce, failures[1:], ("resource", "software", "delay")) == []
    assert notices(bounce, delays[1:], ("delay",), warn=True) == [
        ("delay", "double-bounce@mx.test", "delays@example.net", "FULL", ["b@example.test"])]



def test_a_deferred_recipients_bounced_parts_get_the_postmasters_copy_and_double_bounce():
    """Postfix's bounce log holds a part that bounced while its recipient stays deferred (local(8)'s
    bounce_append), so bounce(8)'s flush copies it to bounce_notice_recipient (class bounce) and, for a notice
    that failed (null sender), to the double-bounce recipient, as a recipient that bounced whole."""
    team = Recipient(0, "team@example.test", "team@example.test")
    ghost = OwnedFailure("", "ghost@example.test", "5.1.1", 'unknown user: "ghost"')
    deferred = [RcptResult(team, Outcome.DEFERRED, "4.3.0", "busy", "local", owned=(ghost,))]
    message = QueuedMessage("Q1", "s@example.org", 0.0, 10, False, "7BIT", 1, (team,))
    bounce = QueuedMessage("Q2", "", 0.0, 10, False, "7BIT", 1, (team,))
    pm = Postmaster(("bounce",), bounce_to="bounces", delay_to="")
    kwargs = dict(warn_delay=False, myhostname="mx.test", double_bounce_recipient="pm", now=0.0, postmaster=pm)
    assert [(n.sender, n.to, n.ret, [r.recipient.address for r in n.recipients])
            for n in plan(message, deferred, **kwargs)] == [
        ("", "s@example.org", None, ["ghost@example.test"]),
        ("double-bounce@mx.test", "bounces@mx.test", "HDRS", ["ghost@example.test"])]
    assert [(n.sender, n.to, n.ret, [r.recipient.address for r in n.recipients])
            for n in plan(bounce, deferred, **kwargs)] == [
        ("double-bounce@mx.test", "pm@mx.test", "FULL", ["ghost@example.test"])]


@pytest.mark.parametrize("count", [notices_module.PLAN_INLINE, notices_module.PLAN_INLINE + 1])
async def test_the_notices_of_an_attempt_of_many_results_are_planned_in_a_worker_thread(monkeypatch, count):
    """100 000 bounced recipients (one message through virtual aliases) held the loop 0.9 s in `plan`: an attempt
    of more than PLAN_INLINE results is planned in a worker thread, one of fewer on the loop; the notice the same."""
    planned_on: list[int] = []
    monkeypatch.setattr(notices_module, "plan", lambda *args, **kw: planned_on.append(threading.get_ident())
                        or plan(*args, **kw))
    writer = notices_module.NoticeWriter(myhostname="mx.local.test", config=config_from_dict({}).queue)
    recipients = tuple(Recipient(i, f"u{i}@local.test", f"u{i}@local.test") for i in range(count))
    message = QueuedMessage("Q1", "s@remote.test", T0, 100, False, "", 1, recipients)
    results = [RcptResult(r, Outcome.BOUNCED, "5.1.1", "unknown user") for r in recipients]
    [(notice, submission)] = await writer.submissions(message, results, original=Content.of(b"Subject: x\r\n\r\n"),
                                                      now=T0 + 1)
    assert notice.kind == "failure" and len(notice.recipients) == count and submission.envelope.recipients == (
        "s@remote.test",)
    assert (planned_on == [threading.get_ident()]) is (count <= notices_module.PLAN_INLINE), planned_on


@pytest.mark.parametrize("sender", ["s@example.org", ""])
def test_a_plan_describes_the_recipients_once(sender):
    """notify_classes without `bounce` (Postfix's default is resource, software; mailflow's adds 2bounce) sends the
    postmaster no copy of a failure notice: the copy's description of every recipient was built all the same,
    then dropped, so 100 000 bounced recipients were described twice at once (the peak of planning the notices,
    a worker's). A failed notice (null sender) goes to the postmaster only (2bounce): the sender's description
    was built all the same, then dropped (peak 2.07 times). The plan's peak is now about what it keeps."""
    recipients = tuple(Recipient(i, f"u{i}@example.test", "list@example.test") for i in range(20_000))
    message = QueuedMessage("Q1", sender, 0.0, 10, False, "7BIT", 1, recipients)
    results = [RcptResult(r, Outcome.BOUNCED, "5.1.1", "unknown user", "local") for r in recipients]
    tracemalloc.start()
    try:
        [notice] = plan(message, results, warn_delay=False, myhostname="mx.test", double_bounce_recipient="pm",
                        now=0.0, postmaster=Postmaster(("2bounce", "resource", "software")))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert notice.to == (sender or "pm@mx.test") and len(notice.recipients) == 20_000
    assert peak < 1.3 * kept  # (2.07 times when a description was built and dropped)


async def test_a_message_released_during_its_attempt_without_room_to_be_claimed_expires_at_its_end(sim):
    """Held, then released during its attempt while the active queue is full (no scan claims it: its row stays
    deferred): the attempt's end concludes it as if it had never been held. Its queue lifetime over, it expired
    there; it was treated as still held (no bounce, another backoff's wait)."""
    s = await sim(active_limit=1, maximal_queue_lifetime=HOUR)
    queue_id = await one_in_delivery(s, (Outcome.DEFERRED, "4.4.1", "try later", True))
    await s.store.hold_messages([queue_id])
    await s.store.release_messages([queue_id], s.clock.now)
    s.qmgr.wake()  # (the scan finds no room)
    s.clock.advance(2 * HOUR)
    s.smtp.release.set()
    await s.run_until(s.clock.now + 60, stop=lambda: not s.qmgr.busy and s.qmgr.active_count == 0)
    assert [req.sender for _, req in s.smtp.calls] == ["a@remote.test", ""]  # the attempt, then its bounce
    assert await s.store.counts() == {}
