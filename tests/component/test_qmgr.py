"""qmgr (mailflow.stages.qmgr) with a real Store, a Rewriter from a Config, fake transports and a fake clock.

The fake transports (tests.support.transports) implement the Transport contract; the clock is a RecordingClock.
Everything is polled with bounded loops; "nothing happens" is checked after a whole qmgr turn (`qmgr_turn`).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import random
import sqlite3
from collections import Counter

import pytest

from mailflow.config import Config
from mailflow.errors import LookupRetry
from mailflow.logs import MailLog
from mailflow.content import Content
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
import mailflow.stages.qmgr as qmgr_module
import mailflow.store.daemon as store_daemon
from mailflow.stages.qmgr import ADMIT_SLICE, TICK, QueueManager
from mailflow.routing.rewrite import Rewriter
from mailflow.store import NewMessage, Store
from tests.support import (BlockingTransport, RecordingClock, RecordingTransport, ScriptedTransport, always,
                           eventually, qmgr_turn)
from tests.support.stalls import LoopTurns

T0 = 1_700_000_000.0
HOST = "mx.example.test"
MIN_BACKOFF = 300.0


def within_jitter(when: float, now: float, delay: float) -> bool:
    """A retry time is `now + delay` plus up to 10 % jitter."""
    return now + delay <= when <= now + delay * 1.1


def started(h: "Harness") -> int:
    """Deliveries qmgr has started and not yet seen end, over every destination."""
    return sum(row[3] for row in h.qmgr.destinations())


class Harness:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.clock = RecordingClock(T0)
        self.local = RecordingTransport("local")
        self.smtp = RecordingTransport("smtp")
        self.store: Store | None = None
        self.qmgr: QueueManager | None = None
        self.content_loads: list[str] = []
        self._n = 0

    async def open_store(self) -> Store:
        if self.store is None:
            self.store = await Store.open(self.tmp_path / "queue.db")
            load = self.store.content

            async def counting(queue_id):
                self.content_loads.append(queue_id)
                return await load(queue_id)

            self.store.content = counting
        return self.store

    async def start(self, transports: dict | None = None, resolve=None, log: MailLog | None = None,
                    tick: float = TICK, **queue) -> QueueManager:
        config = Config(myhostname=HOST, mydestination=("example.test",),
                        queue={"minimal_backoff_time": MIN_BACKOFF, "maximal_backoff_time": 4000, **queue})
        await self.open_store()
        self.qmgr = QueueManager(
            self.store, resolve=resolve or Rewriter(config).resolve,
            transports=transports if transports is not None else {"local": self.local, "smtp": self.smtp},
            config=config.queue, clock=self.clock, rng=random.Random(0), log=log or MailLog(),
            recipient_delimiter=config.recipient_delimiter, tick=tick)
        await self.qmgr.start()
        return self.qmgr

    async def queue(self, *recipients: str, arrival: float | None = None, wake: bool = True,
                    content: bytes | None = None) -> str:
        self._n += 1
        qid = f"Q{self._n:04d}"
        await self.store.insert(NewMessage(
            qid, "sender@remote.test", self.clock.now if arrival is None else arrival,
            Content.of(content if content is not None else f"Subject: {qid}\r\n\r\nbody of {qid}\r\n".encode()),
            tuple(Recipient(i, r, r) for i, r in enumerate(recipients))))
        if wake:
            self.qmgr.wake()
        return qid

    async def counts(self) -> dict:
        return await self.store.counts()

    async def stop(self) -> None:
        if self.qmgr:
            await self.qmgr.stop(grace=0.5)
        if self.store:
            await self.store.close()


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


def addresses(request: DeliveryRequest) -> list[str]:
    return [r.address for r in request.recipients]


async def queue_is_empty(h: Harness) -> bool:
    return await h.counts() == {}


async def _is(h: Harness, counts: dict) -> bool:
    return await h.counts() == counts


async def attempts_over(h: Harness) -> None:
    """Until qmgr holds no message: an attempt ends in qmgr just after the commit that concludes it (the queue can be
    seen empty or deferred before)."""
    await eventually(lambda: h.qmgr.active_count == 0, what="no message in qmgr's hands")


async def warned_of(queue_id: str, caplog) -> None:
    """Until a record names `queue_id`: the warning of a move to the corrupt queue follows the move's commit (the
    corrupt queue can be seen before it)."""
    await eventually(lambda: any(queue_id in r.getMessage() for r in caplog.records), what=f"a line naming {queue_id}")


# ---------------------------------------------------------------------------------------------- dispatch


async def test_one_request_per_destination_with_its_recipients_and_content_loaded_once(h):
    await h.start()
    content = b"Subject: multi\r\n\r\none body, \xc3\xa9 8-bit\r\n"
    qid = await h.queue("a@example.test", "b@remote.test", "c@other.test", "d@remote.test", "e@EXAMPLE.test",
                        content=content)
    await eventually(lambda: queue_is_empty(h))

    [local] = h.local.requests
    assert (local.nexthop, addresses(local)) == (HOST, ["a@example.test", "e@EXAMPLE.test"])
    by_nexthop = {r.nexthop: r for r in h.smtp.requests}
    assert len(h.smtp.requests) == 2
    assert addresses(by_nexthop["remote.test"]) == ["b@remote.test", "d@remote.test"]
    assert addresses(by_nexthop["other.test"]) == ["c@other.test"]
    assert by_nexthop["remote.test"].recipients[1] == Recipient(3, "d@remote.test", "d@remote.test")
    for request in [local, *h.smtp.requests]:
        assert request.queue_id == qid
        assert request.sender == "sender@remote.test"
        assert request.content.to_bytes() == content
        assert request.arrival == T0
    assert h.content_loads == [qid]


async def test_all_sent_removes_the_message(h):
    await h.start()
    qid = await h.queue("b@remote.test", "c@remote.test")
    await eventually(lambda: queue_is_empty(h))
    assert await h.store.recipients(qid) == []
    assert await h.store.content(qid) is None
    await attempts_over(h)
    [request] = h.smtp.requests
    assert addresses(request) == ["b@remote.test", "c@remote.test"]


async def test_messages_are_delivered_once_each(h):
    await h.start()
    ids = [await h.queue(f"u{i}@remote.test") for i in range(20)]
    await eventually(lambda: queue_is_empty(h))
    assert sorted(r.queue_id for r in h.smtp.requests) == ids


async def test_recipients_of_a_queued_message_are_resolved_through_rewrite(h):
    await h.start()
    await h.queue("unqualified")  # user@mx.example.test: not in mydestination, so smtp to mx.example.test
    await eventually(lambda: queue_is_empty(h))
    [request] = h.smtp.requests
    assert request.nexthop == HOST
    assert addresses(request) == [f"unqualified@{HOST}"]  # the resolved form goes out, as Postfix's qmgr sends it


async def test_the_percent_hack_address_goes_out_as_resolved(h):
    await h.start()
    await h.queue("dave%remote.test@example.test")
    await eventually(lambda: queue_is_empty(h))
    [request] = h.smtp.requests
    assert (request.nexthop, addresses(request)) == ("remote.test", ["dave@remote.test"])


# ---------------------------------------------------------------------------------------------- deferral


async def test_one_deferred_recipient_defers_the_message_and_the_sent_one_is_not_retried(h):
    await h.start()
    h.smtp.outcomes["c@other.test"] = (Outcome.DEFERRED, "4.4.1", "connection refused")
    qid = await h.queue("b@remote.test", "c@other.test")
    await eventually(lambda: _is(h, {"deferred": 1}))
    assert within_jitter(await h.store.next_due_time(), T0, MIN_BACKOFF)  # age 0 clamps to minimal_backoff_time
    assert await h.store.recipients(qid) == [
        ("b@remote.test", "sent", "2.0.0", "delivered"),
        ("c@other.test", "pending", "4.4.1", "connection refused"),
    ]
    await attempts_over(h)

    # not due yet: a wake-up finds nothing to do
    h.clock.now = T0 + MIN_BACKOFF - 1  # before the earliest possible retry
    await qmgr_turn(h.qmgr, h.clock)
    assert not h.qmgr.busy and len(h.smtp.requests) == 2

    # due: only the pending recipient is tried again
    del h.smtp.outcomes["c@other.test"]
    h.clock.now = T0 + MIN_BACKOFF * 1.1  # past the latest jittered retry time
    h.qmgr.wake()
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 3
    assert addresses(h.smtp.requests[-1]) == ["c@other.test"]
    assert sum(addresses(r).count("b@remote.test") for r in h.smtp.requests) == 1


async def test_backoff_is_the_age_of_the_message(h):
    await h.start()
    h.smtp.outcomes["b@remote.test"] = (Outcome.DEFERRED, "4.4.1", "try later")
    await h.queue("b@remote.test", arrival=T0 - 1000)
    await eventually(lambda: _is(h, {"deferred": 1}))
    assert within_jitter(await h.store.next_due_time(), T0, 1000)


async def test_backoff_is_capped_at_maximal(h):
    await h.start()
    h.smtp.outcomes["b@remote.test"] = (Outcome.DEFERRED, "4.4.1", "try later")
    await h.queue("b@remote.test", arrival=T0 - 86400)
    await eventually(lambda: _is(h, {"deferred": 1}))
    assert within_jitter(await h.store.next_due_time(), T0, 4000)


async def test_bounced_recipient_is_not_retried_and_does_not_keep_the_message(h):
    await h.start()
    h.smtp.outcomes["x@remote.test"] = (Outcome.BOUNCED, "5.1.1", "user unknown")
    await h.queue("x@remote.test", "y@remote.test")
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 1


async def test_a_raising_transport_defers_its_recipients_with_4_3_0(h):
    await h.start()
    h.smtp.error = RuntimeError("agent crashed")
    qid = await h.queue("b@remote.test", "c@remote.test", "a@example.test")
    await eventually(lambda: _is(h, {"deferred": 1}))
    rows = {addr: (st, dsn, reason) for addr, st, dsn, reason in await h.store.recipients(qid)}
    assert rows["a@example.test"] == ("sent", "2.0.0", "delivered")
    for addr in ("b@remote.test", "c@remote.test"):
        st, dsn, reason = rows[addr]
        assert (st, dsn) == ("pending", "4.3.0")
        assert "agent crashed" in reason
    assert within_jitter(await h.store.next_due_time(), T0, MIN_BACKOFF)


async def test_an_unknown_transport_defers_as_postfix_s_qmgr(h, caplog):
    """Postfix's qmgr_deliver: 4.3.0 "mail transport unavailable", and a warning naming the transport."""
    caplog.set_level(logging.WARNING, logger="mailflow.qmgr")
    await h.start(transports={"local": h.local})  # no smtp transport at all
    qid = await h.queue("b@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}))
    [(addr, st, dsn, reason)] = await h.store.recipients(qid)
    assert (st, dsn, reason) == ("pending", "4.3.0", "mail transport unavailable")
    assert any("'smtp' is not defined" in r.getMessage() for r in caplog.records)


async def test_missing_content_moves_the_message_to_corrupt(h):
    await h.open_store()
    await h.start()
    qid = await h.queue("b@remote.test", wake=False)
    with sqlite3.connect(h.tmp_path / "queue.db") as db:
        db.execute("DELETE FROM content WHERE message_id = ?", (qid,))
    h.qmgr.wake()
    await eventually(lambda: _is(h, {"corrupt": 1}))
    assert h.smtp.requests == []
    assert [addr for addr, *_ in await h.store.recipients(qid)] == ["b@remote.test"]  # kept for inspection


@pytest.mark.parametrize("damage, said", [
    ("UPDATE message SET arrival = 'x' WHERE id = :qid", "arrival is 'x', not a time"),
    ("UPDATE message SET size = -5, next_attempt = 'y' WHERE id = :qid",  # (a text next_attempt: taken last)
     "size is -5, not a size"),
    ("UPDATE recipient SET status = 'odd', notice = 1 WHERE message_id = :qid",
     "recipient 0: status is 'odd', not pending, sent or bounced"),
    # (no notice owed: the scan read only pending rows and those owing one, so the message, its one recipient
    # unseen, was removed as done: lost without a word)
    ("UPDATE recipient SET status = 'odd' WHERE message_id = :qid",
     "recipient 0: status is 'odd', not pending, sent or bounced"),
    ("UPDATE recipient SET reason = x'ff' WHERE message_id = :qid", "recipient 0: reason is {'blob': 'FF'}, not text"),
    ("UPDATE message SET sender = CAST(x'ff61' AS TEXT) WHERE id = :qid",  # (Python's sqlite3 cannot decode it)
     "sender is b'\\xffa', not text"),
    ("UPDATE recipient SET address = CAST(x'ff62' AS TEXT) WHERE message_id = :qid",  # (inside DUE's JSON)
     "recipient 0: address is b'\\xffb', not text"),
    ("UPDATE recipient SET owned = '[[\"o@x\"' WHERE message_id = :qid",  # (the failures told to list owners)
     "recipient 0: owned is '[[\"o@x\"', not failures told to list owners (JSON)"),
], ids=["arrival", "size-and-next-attempt", "recipient-status", "recipient-status-no-notice", "blob",
        "sender-not-utf8", "address-not-utf8", "owned-not-json"])
async def test_a_message_with_damaged_queue_rows_goes_to_corrupt_and_the_others_are_delivered(h, caplog, damage,
                                                                                            said):
    """A row edited by hand (values of the wrong kind) neither stops qmgr's loop nor the other deliveries: the
    message is moved to the corrupt queue with a warning naming it and what is wrong (Postfix's qmgr saves a
    queue file it cannot read in `corrupt`)."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    await h.open_store()
    before = await h.queue("a@remote.test", wake=False)
    bad = await h.queue("b@remote.test", wake=False)
    after = await h.queue("c@remote.test", wake=False)
    with sqlite3.connect(h.tmp_path / "queue.db") as db:
        db.execute("PRAGMA ignore_check_constraints = 1")  # (the schema's CHECK keeps out an unknown status)
        db.execute(damage, {"qid": bad})
    await h.start()
    await eventually(lambda: _is(h, {"corrupt": 1}))
    await warned_of(bad, caplog)
    assert sorted(req.queue_id for req in h.smtp.requests) == [before, after]
    said_of_it = [(r.levelname, r.getMessage()) for r in caplog.records if bad in r.getMessage()]
    assert said_of_it == [("WARNING", f"{bad}: moved to the corrupt queue: damaged queue row: {said}")], said_of_it
    h.clock.advance(3600)
    await qmgr_turn(h.qmgr, h.clock)  # the loop goes on: a later scan neither retries it nor stops
    assert await h.counts() == {"corrupt": 1} and len(h.smtp.requests) == 2


async def test_a_message_whose_recipients_are_corrupt_goes_to_corrupt_and_the_others_are_delivered(h, caplog,
                                                                                               monkeypatch):
    """SQLite finds the pages of a big message's recipients malformed (read after the claim): the message is moved
    to the corrupt queue and the others are delivered. (The whole scan was given back and the next one took the
    same oldest message first: nothing was delivered again.)"""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    monkeypatch.setattr(store_daemon, "RECIPIENTS_IN_SCAN", 3)
    await h.open_store()
    bad = await h.queue(*(f"u{i}@remote.test" for i in range(5)), wake=False)
    others = [await h.queue(f"s{i}@remote.test", wake=False) for i in range(3)]
    read = h.store._reader.fetchall

    async def corrupt_bad(sql, params=()):
        if sql == store_daemon._FIRST_RECIPIENTS and params[0] == bad:
            error = sqlite3.DatabaseError("database disk image is malformed")
            error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # (as Python's sqlite3 raises SQLITE_CORRUPT)
            raise error
        return await read(sql, params)

    monkeypatch.setattr(h.store._reader, "fetchall", corrupt_bad)
    await h.start()
    await eventually(lambda: _is(h, {"corrupt": 1}))
    await warned_of(bad, caplog)
    await eventually(lambda: len(h.smtp.requests) == 3, what="the other messages delivered")
    assert sorted(req.queue_id for req in h.smtp.requests) == others
    said_of_it = [(r.levelname, r.getMessage()) for r in caplog.records if bad in r.getMessage()]
    assert said_of_it == [("WARNING", f"{bad}: moved to the corrupt queue: damaged queue row: its recipients cannot"
                                      " be read: database disk image is malformed")], said_of_it


@pytest.mark.parametrize("next_attempt, said", [("'y'", "'y'"), ("x'00'", "b'\\x00'")], ids=["text", "blob"])
async def test_a_deferred_message_whose_next_attempt_is_no_time_goes_to_corrupt(h, caplog, next_attempt, said):
    """SQLite sorts text and BLOBs above every number, so a deferred message whose next_attempt was set to one by
    hand is never due: qmgr never took it, and it stayed deferred for ever, unseen. A timed scan (the first at
    start) sets it aside as the other damaged messages are; a sound deferred message is delivered."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    await h.open_store()
    sound = await h.queue("a@remote.test", wake=False)
    bad = await h.queue("b@remote.test", wake=False)
    with sqlite3.connect(h.tmp_path / "queue.db") as db:
        db.execute("UPDATE message SET queue = 'deferred', next_attempt = ? WHERE id = ?", (h.clock.time(), sound))
        db.execute(f"UPDATE message SET queue = 'deferred', next_attempt = {next_attempt} WHERE id = ?", (bad,))
    await h.start()
    await eventually(lambda: _is(h, {"corrupt": 1}))
    await warned_of(bad, caplog)
    assert [req.queue_id for req in h.smtp.requests] == [sound]
    said_of_it = [(r.levelname, r.getMessage()) for r in caplog.records if bad in r.getMessage()]
    assert said_of_it == [("WARNING", f"{bad}: moved to the corrupt queue: damaged queue row: next_attempt is {said},"
                                      " not a time")], said_of_it


@pytest.mark.parametrize("queue, said", [("'bogus'", "'bogus'"), ("'zzz'", "'zzz'"), ("7", "'7'"),
                                         ("x'00'", "b'\\x00'")], ids=["between", "above", "number", "blob"])
async def test_a_message_in_no_known_queue_goes_to_corrupt(h, caplog, queue, said):
    """A message whose queue is none of the store's (a database edited with its checks off) was never taken,
    listed nor told of: it stayed for ever, unseen. A timed scan (the first at start) sets it aside as the other
    damaged messages are."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    await h.open_store()
    sound = await h.queue("a@remote.test", wake=False)
    bad = await h.queue("b@remote.test", wake=False)
    with sqlite3.connect(h.tmp_path / "queue.db") as db:
        db.execute("PRAGMA ignore_check_constraints = 1")
        db.execute(f"UPDATE message SET queue = {queue} WHERE id = ?", (bad,))
    await h.start()
    await eventually(lambda: _is(h, {"corrupt": 1}))
    assert [req.queue_id for req in h.smtp.requests] == [sound]
    said_of_it = [(r.levelname, r.getMessage()) for r in caplog.records if bad in r.getMessage()]
    assert said_of_it == [("WARNING", f"{bad}: moved to the corrupt queue: damaged queue row: queue is {said}, not one"
                                      " of incoming, active, deferred, hold, corrupt, maildrop")], said_of_it


# ---------------------------------------------------------------------------------------------- concurrency


async def test_destination_concurrency_limit_is_respected(h):
    blocking = BlockingTransport("smtp")
    await h.start(transports={"smtp": blocking}, default_destination_concurrency_limit=2)
    for i in range(5):
        await h.queue(f"u{i}@remote.test")
    await eventually(lambda: blocking.in_flight == 2)
    await qmgr_turn(h.qmgr, h.clock)  # every message taken: a third delivery would have been started
    assert started(h) == 2 and blocking.max_in_flight == 2
    assert h.qmgr.active_count == 5
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    assert blocking.max_in_flight == 2
    assert len(blocking.requests) == 5


async def test_destination_limit_is_per_destination(h):
    blocking = BlockingTransport("smtp")
    await h.start(transports={"smtp": blocking}, default_destination_concurrency_limit=1)
    for domain in ("a.test", "b.test", "c.test", "a.test"):
        await h.queue(f"u@{domain}")
    await eventually(lambda: blocking.in_flight == 3)
    await qmgr_turn(h.qmgr, h.clock)
    assert started(h) == 3 and blocking.max_in_flight == 3  # one each for a.test, b.test, c.test
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))


async def test_delivery_concurrency_limit_caps_all_destinations(h):
    blocking = BlockingTransport("smtp")
    await h.start(transports={"smtp": blocking}, delivery_concurrency_limit=3)
    for i in range(6):
        await h.queue(f"u@d{i}.test")
    await eventually(lambda: blocking.in_flight == 3)
    await qmgr_turn(h.qmgr, h.clock)
    assert started(h) == 3 and blocking.max_in_flight == 3
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    assert len(blocking.requests) == 6


async def deliveries_in_order(h: Harness, big: list[str], late: str, **queue) -> list[str]:
    """A message to `big`, then one to `late`, both queued before qmgr starts (one scan takes both); the first
    recipient of each delivery, in the order the agents were handed them (`h.order`), once the queue is empty."""
    await h.open_store()
    await h.queue(*big, wake=False)
    await h.queue(late, wake=False)
    await h.start(**queue)
    await eventually(lambda: queue_is_empty(h))
    return h.order


@pytest.mark.parametrize("late, queue", [
    ("late@example.test", {"transport_destination_recipient_limit": {"smtp": 1}}),  # another transport
    ("late@other.test", {"destination_recipient_limit": 50}),  # another destination of the same transport
    ("late@other.test", {"destination_recipient_limit": 1}),  # a destination per recipient: messages take turns
], ids=["transports-take-turns", "destinations-take-turns", "messages-take-turns"])
async def test_a_big_message_holds_back_no_later_mail_once_the_delivery_cap_binds(h, late, queue):
    """Once `delivery_concurrency_limit` is reached each freed slot went back to the first transport and
    destination in line: at a recipient limit of 1 a local message waited behind all 120 remote deliveries of a
    bigger one (Postfix's qmgr round-robins its transports); at a limit of 50 a message to another.test waited
    behind every slice, and at a limit of 1 behind all 120 per-recipient destinations of the same transport.
    They take turns now: the later message is among the first deliveries."""
    h.order = []
    for transport in (h.smtp, h.local):
        deliver = transport.deliver

        async def recording(request, _deliver=deliver):
            h.order.append(addresses(request)[0])
            return await _deliver(request)

        transport.deliver = recording
    order = await deliveries_in_order(h, [f"u{i}@remote.test" for i in range(120)], late,
                                      delivery_concurrency_limit=2, **queue)
    assert late in order[:3], f"the later message was delivery {order.index(late) + 1} of {len(order)}"


async def test_a_destination_that_missed_its_mark_is_served_at_the_next_tick(h, caplog):
    """The ready set is a safety-netted optimisation: a destination with a job to start that was not marked
    ready (a bug) waited for ever; the tick's walk over the destinations marks it, with a warning."""
    await h.start()
    mark, missed = h.qmgr._mark, []
    h.qmgr._mark = lambda dest: mark(dest) if missed else missed.append(dest.key)  # the first mark is lost
    await h.queue("u@remote.test")
    await qmgr_turn(h.qmgr, h.clock)
    assert missed == [("smtp", "remote.test")] and h.smtp.requests == []
    h.clock.advance(TICK)
    await qmgr_turn(h.qmgr, h.clock)
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 1
    assert "destination smtp:remote.test could start a job but was not marked ready" in caplog.text


async def test_active_limit_bounds_messages_in_hand(h):
    blocking = BlockingTransport("smtp")
    await h.start(transports={"smtp": blocking}, active_limit=2)
    for i in range(5):
        await h.queue(f"u@d{i}.test")
    await eventually(lambda: blocking.in_flight == 2)
    await qmgr_turn(h.qmgr, h.clock)
    assert h.qmgr.active_count == 2
    assert (await h.counts()).get("active") == 2
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    assert len(blocking.requests) == 5


async def test_a_big_scan_hands_the_loop_back_while_it_admits_the_messages(h):
    # a flush of 10 000 deferred messages: routing them all in one turn held every session and delivery 0.4 s
    store = await h.open_store()
    n = 3 * ADMIT_SLICE
    await store.insert_many([NewMessage(f"B{i:04d}", "sender@remote.test", T0, Content.of(b"Subject: b\r\n\r\nb\r\n"),
                                        (Recipient(0, f"u{i}@d{i % 7}.test", f"u{i}@d{i % 7}.test"),))
                             for i in range(n)])
    turns = 0

    async def bystander():  # another task on the loop: counts the turns it gets
        nonlocal turns
        for _ in range(1_000_000):
            turns += 1
            await asyncio.sleep(0)

    resolve = Rewriter(Config(myhostname=HOST, mydestination=("example.test",))).resolve
    seen: list[int] = []  # at each recipient routed, how many turns the bystander had had

    def counting(address: str, sender: str, memo: dict):
        seen.append(turns)
        return resolve(address, sender, memo)

    other = asyncio.create_task(bystander())
    try:
        await h.start(resolve=counting)
        await eventually(lambda: queue_is_empty(h))
    finally:
        other.cancel()
    assert len(seen) == n and len(h.smtp.requests) == n
    assert max(Counter(seen).values()) <= ADMIT_SLICE


# ---------------------------------------------------------------------------------------------- store is the state


async def test_start_recovers_messages_left_active(h):
    store = await h.open_store()
    await store.insert(NewMessage("CRASHED", "s@remote.test", T0 - 60, Content.of(b"\r\nx\r\n"),
                                  (Recipient(0, "b@remote.test", "b@remote.test"),)))
    await store.claim(["CRASHED"], T0)
    await h.start()
    await eventually(lambda: queue_is_empty(h))
    assert [r.queue_id for r in h.smtp.requests] == ["CRASHED"]


async def test_a_message_held_on_arrival_logs_its_from_line_each_time_it_enters_the_active_queue(h):
    """Postfix's qmgr logs `from=<s>, size=, nrcpt= (queue active)` as a message enters the active queue; of a
    message held on arrival mailflow logs it when the message is first taken (`opened`), and again on a retry."""
    events: list[tuple[str, str]] = []
    h.smtp.outcomes["b@remote.test"] = (Outcome.DEFERRED, "4.4.1", "later")
    await h.start(log=MailLog(observer=lambda queue_id, event, fields: events.append((queue_id, event))))
    await h.store.insert(NewMessage("HELD", "s@remote.test", T0, Content.of(b"\r\nx\r\n"),
                                    (Recipient(0, "b@remote.test", "b@remote.test"),), queue="hold"))
    await qmgr_turn(h.qmgr, h.clock)  # held: not taken
    await h.store.release_messages(["HELD"], T0)
    h.qmgr.wake()
    await eventually(lambda: ("HELD", "deferred") in events)  # (released, it was deferred already: not that)
    del h.smtp.outcomes["b@remote.test"]
    h.clock.advance(MIN_BACKOFF * 1.2)  # past the jittered retry
    await eventually(lambda: ("HELD", "sent") in events)  # (its line follows the commit that empties the queue)
    assert await queue_is_empty(h)
    assert [r.queue_id for r in h.smtp.requests] == ["HELD", "HELD"]
    assert [event for _, event in events if event in ("opened", "deferred", "sent")] == [
        "opened", "deferred", "opened", "sent"]


async def test_mail_queued_without_a_wake_up_is_found_by_the_timer(h):
    await h.start(queue_run_delay=30)
    await eventually(lambda: h.clock.sleeps)  # the first scan is over; qmgr sleeps until its next run
    await h.queue("b@remote.test", wake=False)
    await asyncio.sleep(0.05)
    assert h.smtp.requests == [], "found before its queue run"
    h.clock.advance(30)
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 1


async def test_a_deferral_comes_due_without_a_wake_up(h):
    # a backoff above MIN_RESCAN (a timed scan that overlapped the deferral sleeps at least that long)
    await h.start(minimal_backoff_time=0.5, maximal_backoff_time=0.5)
    h.smtp.outcomes["b@remote.test"] = (Outcome.DEFERRED, "4.4.1", "later")
    await h.queue("b@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}))
    del h.smtp.outcomes["b@remote.test"]
    h.clock.advance(0.6)  # time moves past the jittered retry; nobody calls wake()
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 2


class TwoSeconds(RecordingTransport):
    """A delivery agent whose every delivery takes two seconds of `clock`."""

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        self.clock.advance(2.0)
        return await super().deliver(request)


def timed_lines(events: list[dict]):
    """A MailLog observer keeping the fields of each result line (those with `delays`) in `events`. A line is logged
    just after the commit of its result: a test waits for the lines, not for the queue to be empty (on a loaded
    machine the empty queue was seen before either line)."""
    return lambda queue_id, event, fields: events.append(fields) if "delays" in fields else None


async def test_the_log_times_each_stage_of_an_attempt_as_postfix_does(h):
    """delay= and delays=a/b/c/d as Postfix's: a is the time before the active queue, from arrival to this
    attempt's entry into it (on a retry: all the time the message waited), d the agent's work; delay runs from
    arrival to the agent's end, not to the line's later record: the job that ends first is recorded by itself,
    and its line (here a second later, the other job's agent between) still ends where its agent ended."""
    events: list[dict] = []
    await h.open_store()
    record = h.store.record_results

    async def slow_record(*args, **kwargs):
        h.clock.advance(1.0)
        return await record(*args, **kwargs)

    h.store.record_results = slow_record
    smtp = TwoSeconds("smtp", clock=h.clock)
    smtp.outcomes["b@remote.test"] = (Outcome.DEFERRED, "4.4.1", "later")
    await h.start(transports={"smtp": smtp, "local": h.local}, log=MailLog(observer=timed_lines(events)))
    await h.queue("a@example.test", "b@remote.test", arrival=T0 - 100)  # arrived 100 s ago, taken now
    await eventually(lambda: _is(h, {"deferred": 1}))
    del smtp.outcomes["b@remote.test"]
    h.clock.advance(MIN_BACKOFF * 1.2)  # past the jittered retry
    waited = h.clock.now - (T0 - 100)  # until the retry entered the active queue
    await eventually(lambda: len(events) == 3, what="the three result lines")
    assert await queue_is_empty(h)
    assert [(e["to"], e["status"], e["delay"], e["delays"]) for e in events] == [
        ("a@example.test", "sent", 100.0, [100.0, 0.0, 0.0, 0.0]),
        ("b@remote.test", "deferred", 102.0, [100.0, 0.0, 0.0, 2.0]),
        ("b@remote.test", "sent", waited + 2, [waited, 0.0, 0.0, 2.0])]


async def test_the_wait_for_a_delivery_agent_is_the_log_lines_b(h):
    """delays=a/b/c/d's b: the time from the entry into the active queue to the hand-off to a delivery agent,
    here a job held behind its destination's concurrency of 1 while the first one's agent works."""
    events: list[dict] = []
    await h.open_store()
    await h.queue("b@remote.test", arrival=T0 - 100, wake=False)
    await h.queue("c@remote.test", arrival=T0 - 100, wake=False)  # both taken by the first scan
    await h.start(transports={"smtp": TwoSeconds("smtp", clock=h.clock), "local": h.local},
                  log=MailLog(observer=timed_lines(events)), default_destination_concurrency_limit=1)
    await eventually(lambda: len(events) == 2, what="the two result lines")
    assert await queue_is_empty(h)
    assert [(e["to"], e["delay"], e["delays"]) for e in events] == [
        ("b@remote.test", 102.0, [100.0, 0.0, 0.0, 2.0]), ("c@remote.test", 104.0, [100.0, 2.0, 0.0, 2.0])]


async def test_stop_closes_each_transport_once(h):
    await h.start(transports={"smtp": h.smtp, "relay": h.smtp, "local": h.local})
    await h.qmgr.stop()
    h.qmgr = None
    assert h.smtp.closed and h.local.closed


# ---------------------------------------------------------------------------------- failures that must not strand mail


async def test_a_content_read_error_defers_the_message(h):
    await h.open_store()
    load = h.store.content
    failures = []

    async def flaky(queue_id):
        if not failures:
            failures.append(queue_id)
            raise sqlite3.OperationalError("disk I/O error")
        return await load(queue_id)

    h.store.content = flaky
    await h.start()
    await h.queue("b@remote.test")
    await eventually(lambda: failures)
    await eventually(lambda: _is(h, {"deferred": 1}), timeout=0.3)


async def test_a_lookup_failure_defers_that_recipient_and_strands_nothing(h):
    config = Config(myhostname=HOST, mydestination=("example.test",))
    rewriter = Rewriter(config)

    def resolve(addr, sender, memo):
        if addr == "bad@remote.test":
            raise LookupRetry("transport table unavailable")
        return rewriter.resolve(addr, sender, memo)

    await h.start(resolve=resolve)
    bad = await h.queue("bad@remote.test", arrival=T0 - 10, wake=False)
    good = await h.queue("good@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}), timeout=0.3)
    assert [r.queue_id for r in h.smtp.requests] == [good]
    [(_, st, dsn, _)] = await h.store.recipients(bad)
    assert (st, dsn) == ("pending", "4.3.0")


async def test_a_recipient_missing_from_the_report_stays_queued(h):
    class ForgetfulTransport(RecordingTransport):
        async def deliver(self, request):
            report = await super().deliver(request)
            return DeliveryReport(report.results[:1])

    forgetful = ForgetfulTransport("smtp")
    await h.start(transports={"smtp": forgetful})
    qid = await h.queue("b@remote.test", "c@remote.test")
    await eventually(lambda: forgetful.requests)
    await eventually(lambda: h.qmgr.active_count == 0)
    assert await h.counts() == {"deferred": 1}
    assert [row[:2] for row in await h.store.recipients(qid)] == [("b@remote.test", "sent"),
                                                                  ("c@remote.test", "pending")]


async def test_qmgr_waits_through_the_injected_clock(h):
    await h.start()
    await eventually(lambda: h.clock.sleeps, timeout=0.3)


# ---------------------------------------------------------------------------------------------- reload


async def test_a_reload_sends_new_jobs_to_the_new_transports_and_closes_the_old_after_their_deliveries(h):
    old = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": old})
    first = await h.queue("a@remote.test")
    await eventually(lambda: len(old.requests) == 1, what="the first delivery under way")

    new = RecordingTransport("smtp")
    config = Config(myhostname=HOST, mydestination=("example.test",))
    h.qmgr.reconfigure(resolve=Rewriter(config).resolve, transports={"local": h.local, "smtp": new},
                       config=config.queue, notices=None, soft_bounce=False)
    second = await h.queue("b@remote.test")
    await eventually(lambda: len(new.requests) == 1, what="the second message to the new transport")
    assert [r.queue_id for r in new.requests] == [second]
    assert not old.closed and not h.local.closed  # a delivery still uses it; local was kept

    old.release.set()
    await eventually(lambda: queue_is_empty(h), what="the first delivery ended")
    await eventually(lambda: old.closed, what="the replaced transport closed")
    assert [r.queue_id for r in old.requests] == [first] and not new.closed and not h.local.closed


async def test_the_per_transport_in_flight_count_holds_only_transports_with_a_delivery_under_way(h):
    """A transport a reload removed (a client service taken out of the configuration) or one a routing table named
    but nothing defines leaves no count behind once its deliveries end: the counts are bounded by the deliveries in
    flight, not by every transport name ever routed to."""
    old = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": old})
    await h.queue("a@remote.test")
    await eventually(lambda: len(old.requests) == 1, what="a delivery under way")
    assert h.qmgr._in_flight_by_transport == {"smtp": 1}

    config = Config(myhostname=HOST, mydestination=("example.test",))
    h.qmgr.reconfigure(resolve=Rewriter(config).resolve, transports={"local": h.local}, config=config.queue,
                       notices=None, soft_bounce=False)
    old.release.set()
    await eventually(lambda: old.closed, what="the removed transport's delivery ended")
    await eventually(lambda: h.qmgr._in_flight == 0, what="no delivery in flight")
    assert h.qmgr._in_flight_by_transport == {}


class SlowToClose(RecordingTransport):
    """A transport whose close waits (as local's for a /file append under way) until every transport of `closing`
    is closing, at most `bound` s: `together` says whether they all were."""

    def __init__(self, name: str, closing: dict[str, asyncio.Event], bound: float = 2.0):
        super().__init__(name)
        self.closing, self.bound, self.together = closing, bound, None
        closing[name] = asyncio.Event()

    async def close(self) -> None:
        self.closing[self.name].set()
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self.closing.values())), self.bound)
        except TimeoutError:
            self.together = False
        else:
            self.together = True
        self.closed = True


async def test_the_stop_and_a_reload_close_their_transports_together_each_grace_at_once(h):
    """The stop closed the transports one after another, each close waiting its own grace (local's for a /file
    append under way): N transports made the stop N graces. A reload's retired transports were closed so too.
    They close together: one grace in all."""
    closing: dict[str, asyncio.Event] = {}
    old = [SlowToClose("local", closing), SlowToClose("smtp", closing)]
    await h.start(transports={"local": old[0], "smtp": old[1]})
    current: dict[str, asyncio.Event] = {}
    new = [SlowToClose("local", current), SlowToClose("smtp", current)]
    config = Config(myhostname=HOST, mydestination=("example.test",))
    h.qmgr.reconfigure(resolve=Rewriter(config).resolve, transports={"local": new[0], "smtp": new[1]},
                       config=config.queue, notices=None, soft_bounce=False)
    await eventually(lambda: all(t.together is not None for t in old), what="the retired transports closed",
                     timeout=10)
    assert [t.together for t in old] == [True, True]
    await h.qmgr.stop(grace=0.5)
    h.qmgr = None  # (stopped)
    assert [t.together for t in new] == [True, True]



class CountingClose(RecordingTransport):
    """Counts its closes; raises `failure` from each when one is given."""

    def __init__(self, name: str, failure: BaseException | None = None):
        super().__init__(name)
        self.failure, self.closes = failure, 0

    async def close(self) -> None:
        self.closes += 1
        if self.failure is not None:
            raise self.failure


async def test_a_close_that_fails_at_a_reload_or_the_stop_is_logged_once_and_the_stop_goes_on(h, caplog):
    """A retired close that raised kept every retired transport in `_retired` (closed again at the stop), left
    "Task exception was never retrieved", and the stop raised it, skipping the transcripts and the store close.
    Each failure is logged once with the transport's name; each transport closes once; the stop ends."""
    old = [CountingClose("local", OSError("disk gone")), CountingClose("smtp"),
           CountingClose("lmtp", asyncio.CancelledError())]
    await h.start(transports={"local": old[0], "smtp": old[1], "lmtp": old[2]})
    new = [CountingClose("local", OSError("still gone")), CountingClose("smtp")]
    config = Config(myhostname=HOST, mydestination=("example.test",))
    with caplog.at_level(logging.WARNING, logger="mailflow.qmgr"):
        h.qmgr.reconfigure(resolve=Rewriter(config).resolve, transports={"local": new[0], "smtp": new[1]},
                           config=config.queue, notices=None, soft_bounce=False)
        await eventually(lambda: not h.qmgr._retirements, what="the retirement ended")
        assert h.qmgr._retired == []
        await h.qmgr.stop(grace=0.5)  # raises nothing
        h.qmgr = None  # (stopped)
    assert [t.closes for t in old + new] == [1, 1, 1, 1, 1]
    lines = [r.getMessage() for r in caplog.records if "close" in r.getMessage()]
    assert sorted(lines) == ["transport lmtp: close cancelled", "transport local: close failed: disk gone",
                             "transport local: close failed: still gone"]


class HangsOnFirstClose(CountingClose):
    """Its first close waits until cancelled (`closing` set once it began); later ones return at once."""

    def __init__(self, name: str):
        super().__init__(name)
        self.closing = asyncio.Event()

    async def close(self) -> None:
        self.closes += 1
        if self.closes == 1:
            self.closing.set()
            await asyncio.Event().wait()


async def test_a_stop_during_a_reload_s_closes_closes_again_only_the_transports_whose_close_did_not_end(h):
    """The stop cancels a retirement still closing: a transport whose close ended is not closed again; one whose
    close was cancelled is, within the stop, and the stop raises nothing."""
    hangs, quick = HangsOnFirstClose("local"), CountingClose("smtp")
    await h.start(transports={"local": hangs, "smtp": quick})
    config = Config(myhostname=HOST, mydestination=("example.test",))
    h.qmgr.reconfigure(resolve=Rewriter(config).resolve, transports={"local": CountingClose("local"),
                       "smtp": CountingClose("smtp")}, config=config.queue, notices=None, soft_bounce=False)
    await asyncio.wait_for(hangs.closing.wait(), 5)
    await eventually(lambda: quick.closes == 1, what="the quick retired close ended")
    await h.qmgr.stop(grace=0.5)
    h.qmgr = None  # (stopped)
    assert (hangs.closes, quick.closes) == (2, 1)

def relaying(relayhost: str, **queue) -> tuple:
    """The routing and the [queue] settings of a configuration that relays everything else to `relayhost`."""
    config = Config(myhostname=HOST, mydestination=("example.test",), relayhost=relayhost,
                    queue={"minimal_backoff_time": MIN_BACKOFF, "maximal_backoff_time": 4000, **queue})
    return Rewriter(config).resolve, config.queue


def reload_to(h: Harness, relayhost: str, transports: dict, **queue) -> None:
    resolve, config = relaying(relayhost, **queue)
    h.qmgr.reconfigure(resolve=resolve, transports=transports, config=config, notices=None, soft_bounce=False)


async def test_a_reload_reroutes_the_jobs_waiting_for_a_window_and_lets_the_one_in_flight_end_once(h):
    """As Postfix's qmgr, restarted by `postfix reload`, resolves its active queue again with the new main.cf."""
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    resolve, _ = relaying("[old.test]")
    await h.start(transports=transports, resolve=resolve, default_destination_concurrency_limit=1)
    first, *waiting = [await h.queue(f"u{i}@remote.test") for i in range(3)]
    await eventually(lambda: blocking.in_flight == 1, what="the first delivery under way")
    await qmgr_turn(h.qmgr, h.clock)
    assert h.qmgr.active_count == 3  # two wait for the old relay's window

    reload_to(h, "[new.test]", transports, default_destination_concurrency_limit=1)
    await eventually(lambda: blocking.in_flight == 2, what="a waiting message started to the new relay")
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h), what="every message delivered")
    went = sorted((r.queue_id, r.nexthop) for r in blocking.requests)
    assert went == [(first, "[old.test]")] + [(qid, "[new.test]") for qid in waiting], went


async def test_many_messages_waiting_are_rerouted_by_a_reload_each_once(h):
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    resolve, _ = relaying("[old.test]")
    await h.start(transports=transports, resolve=resolve, default_destination_concurrency_limit=1)
    queued = await asyncio.gather(*(h.queue(f"u{i}@remote.test", f"v{i}@example.test") for i in range(200)))
    await eventually(lambda: h.qmgr.active_count == 200 and len(h.local.requests) == 200, timeout=20,
                     what="every message taken, its local recipient delivered")
    assert len(blocking.requests) == 1  # the old relay's window holds the rest

    reload_to(h, "[new.test]", transports)
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h), timeout=20, what="every message delivered")
    relayed = sorted((r.queue_id, r.nexthop, tuple(addresses(r))) for r in blocking.requests)
    assert [qid for qid, *_ in relayed] == sorted(queued)  # each message relayed, once
    assert sum(nexthop == "[old.test]" for _, nexthop, _ in relayed) == 1
    assert all(rcpts == (f"u{int(qid[1:]) - 1}@remote.test",) for qid, _, rcpts in relayed)
    assert sorted(r.queue_id for r in h.local.requests) == sorted(queued)  # the local ones were not repeated


async def test_a_reload_whose_routing_cannot_answer_defers_the_waiting_recipients_and_strands_nothing(h):
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    resolve, _ = relaying("[old.test]")
    await h.start(transports=transports, resolve=resolve, default_destination_concurrency_limit=1)
    first, unresolved, routed = [await h.queue(f"u{i}@remote.test") for i in range(3)]
    await eventually(lambda: blocking.in_flight == 1 and h.qmgr.active_count == 3, what="two waiting")

    new, _ = relaying("[new.test]")

    def failing(address: str, sender: str, memo: dict):
        if address == "u1@remote.test":
            raise LookupRetry("transport_maps: table is locked")
        return new(address, sender, memo)

    h.qmgr.reconfigure(resolve=failing, transports=transports, config=relaying("[new.test]")[1], notices=None,
                         soft_bounce=False)
    await eventually(lambda: _is(h, {"active": 2, "deferred": 1}), what="the unresolved one deferred")
    assert [(a, dsn) for a, _, dsn, *_ in await h.store.recipients(unresolved)] == [("u1@remote.test", "4.3.0")]
    blocking.release.set()
    await eventually(lambda: _is(h, {"deferred": 1}), what="the others delivered")
    assert sorted((r.queue_id, r.nexthop) for r in blocking.requests) == [(first, "[old.test]"), (routed, "[new.test]")]


async def test_a_reload_forgets_dead_destinations_as_postfix_qmgr_restart_does(h):
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "connect to old.test: refused", False))
    transports = {"local": h.local, "smtp": failing}
    resolve, _ = relaying("[old.test]")
    await h.start(transports=transports, resolve=resolve, initial_destination_concurrency=1)
    await h.queue("a@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}), what="the first message deferred")
    await h.queue("b@remote.test")  # the destination is dead: deferred without an attempt
    await eventually(lambda: _is(h, {"deferred": 2}), what="the second message deferred")
    assert len(failing.requests) == 1

    reload_to(h, "[old.test]", transports, initial_destination_concurrency=1)
    await qmgr_turn(h.qmgr, h.clock)
    assert len(failing.requests) == 1  # the deferred ones keep their next attempt: a reload is no flush
    third = await h.queue("c@remote.test")
    await eventually(lambda: len(failing.requests) == 2, what="the destination tried again")
    assert failing.requests[-1].queue_id == third
    await eventually(lambda: _is(h, {"deferred": 3}), what="the third message deferred")


async def test_mail_for_a_dead_destination_is_deferred_with_the_status_of_the_failure_that_killed_it(h):
    """Postfix's qmgr keeps the delivery agent's status and reason (queue->dsn) and defers what waits for a dead
    site with both, "delivery temporarily suspended: " before the reason: a refused greeting's 4.7.1 stays 4.7.1
    (mailflow said 4.4.1 whatever the failure)."""
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.7.1", "host mx refused to talk to me", False))
    await h.start(transports={"local": h.local, "smtp": failing}, initial_destination_concurrency=1)
    first = await h.queue("a@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}), what="the destination dead")
    second = await h.queue("b@remote.test")
    await eventually(lambda: _is(h, {"deferred": 2}), what="the second message deferred without an attempt")
    assert [r.queue_id for r in failing.requests] == [first]
    assert await h.store.recipients(second) == [
        ("b@remote.test", "pending", "4.7.1", "delivery temporarily suspended: host mx refused to talk to me")]


async def test_mail_for_a_dead_destination_is_deferred_at_once_while_every_delivery_slot_is_taken(h):
    """The jobs of a dead destination are deferred without an attempt, and at once: they waited for a free slot
    under `delivery_concurrency_limit` (the loop stopped at the cap before it reached them)."""
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "connect to remote.test: refused", False))
    holding = BlockingTransport("local")
    await h.start(transports={"local": holding, "smtp": failing}, delivery_concurrency_limit=1,
                  initial_destination_concurrency=1)
    await h.queue("a@remote.test")
    await eventually(lambda: _is(h, {"deferred": 1}), what="the destination dead")
    await h.queue("x@example.test")
    await eventually(lambda: holding.in_flight == 1, what="the only slot taken")
    await h.queue("b@remote.test")
    await eventually(lambda: _is(h, {"deferred": 2, "active": 1}), what="deferred while the slot is taken")
    assert len(failing.requests) == 1
    holding.release.set()
    await eventually(lambda: _is(h, {"deferred": 2}))


async def test_a_reload_puts_the_new_destination_concurrency_in_force_where_mail_waits(h):
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    resolve, _ = relaying("[relay.test]")
    await h.start(transports=transports, resolve=resolve, default_destination_concurrency_limit=1)
    for i in range(5):
        await h.queue(f"u{i}@remote.test")
    await eventually(lambda: blocking.in_flight == 1 and h.qmgr.active_count == 5, what="four waiting")

    reload_to(h, "[relay.test]", transports, default_destination_concurrency_limit=3)
    await eventually(lambda: blocking.in_flight == 3, what="the new limit in force")
    await qmgr_turn(h.qmgr, h.clock)
    assert blocking.in_flight == 3  # the one in flight counts against the new window
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h), what="every message delivered")
    assert len(blocking.requests) == 5 and blocking.max_in_flight == 3


async def test_resolve_gets_the_envelope_sender_and_its_tables_are_asked_once_a_message(h):
    config = Config(myhostname=HOST, mydestination=("example.test",),
                    sender_dependent_relayhost_maps=["inline:{ {sender@remote.test = [relay.test]} }"])
    rewriter = Rewriter(config)
    asked: list[str] = []
    senders: list[str] = []
    override = rewriter.sender_override

    def counting_override(tables, sender, null_key):
        asked.extend([sender] if tables else [])  # (the default transport's table, unset, is never searched)
        return override(tables, sender, null_key)

    def resolve(address: str, sender: str, memo: dict):
        senders.append(sender)
        return rewriter.resolve(address, sender, memo)

    rewriter.sender_override = counting_override  # type: ignore[method-assign]
    await h.start(resolve=resolve)
    await h.queue("a@remote.test", "b@other.test", "c@third.test")
    await eventually(lambda: queue_is_empty(h))
    assert senders == ["sender@remote.test"] * 3
    assert asked == ["sender@remote.test"]  # once for the message, not once per recipient
    assert [(r.nexthop, addresses(r)) for r in h.smtp.requests] == [
        ("[relay.test]", ["b@other.test", "a@remote.test", "c@third.test"])]  # (Postfix's order: by domain)


async def test_the_sender_dependent_choice_is_asked_once_for_a_message_resolved_in_slices(h):
    """A message of more than ROUTE_SLICE recipients is resolved a slice at a time: its sender's tables were asked
    once a slice (10 times for 5 000 recipients), not once a message as the module doc says."""
    config = Config(myhostname=HOST, mydestination=("example.test",),
                    sender_dependent_relayhost_maps=["inline:{ {sender@remote.test = [relay.test]} }"])
    rewriter = Rewriter(config)
    asked: list[str] = []
    override = rewriter.sender_override

    def counting_override(tables, sender, null_key):
        asked.extend([sender] if tables else [])
        return override(tables, sender, null_key)

    rewriter.sender_override = counting_override  # type: ignore[method-assign]
    await h.start(resolve=rewriter.resolve)
    n = 2 * qmgr_module.ROUTE_SLICE + 1
    await h.queue(*(f"u{i:05d}@remote.test" for i in range(n)))
    await eventually(lambda: queue_is_empty(h))
    assert asked == ["sender@remote.test"]
    assert {r.nexthop for r in h.smtp.requests} == {"[relay.test]"}
    assert sum(len(r.recipients) for r in h.smtp.requests) == n


async def test_a_destination_that_dies_with_many_jobs_queued_defers_them_a_slice_at_a_time(h, monkeypatch):
    """A destination that died with 2 000 jobs queued (one message of 100 000 recipients) held the loop 0.5 s
    deferring them: more than SUSPEND_SLICE are deferred by a task, the loop handed back between the slices, each
    with the failure that killed it."""
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.7.1", "host mx refused to talk to me", False))
    await h.start(transports={"local": h.local, "smtp": failing}, initial_destination_concurrency=1,
                  transport_destination_recipient_limit={"smtp": 2})
    jobs = 3 * qmgr_module.SUSPEND_SLICE + 2  # the first one tried, the others deferred unattempted
    async with LoopTurns() as turns:
        suspended = qmgr_module._suspended
        monkeypatch.setattr(qmgr_module, "_suspended", lambda *args: turns.seen.append(turns.count)
                            or suspended(*args))
        queue_id = await h.queue(*(f"u{i:04d}@remote.test" for i in range(2 * jobs)))
        await eventually(lambda: _is(h, {"deferred": 1}), what="the message deferred")
    assert len(failing.requests) == 1 and len(turns.seen) == jobs - 1
    assert len(set(turns.seen)) >= 4, "the loop had no turn between the slices"
    refused = "host mx refused to talk to me"
    reasons = [(status, dsn, reason) for _, status, dsn, reason in await h.store.recipients(queue_id)]
    assert sorted(set(reasons)) == [("pending", "4.7.1", f"delivery temporarily suspended: {refused}"),
                                    ("pending", "4.7.1", refused)]
    assert reasons.count(("pending", "4.7.1", refused)) == 2  # the job tried


async def test_one_job_of_many_recipients_at_a_dead_destination_is_deferred_a_slice_at_a_time(h, monkeypatch):
    """SUSPEND_SLICE counts recipients, not jobs: one job of 100 000 recipients (no recipient limit) at a dead
    destination held the loop 1.2 s. Its recipients are deferred a part at a time, the loop handed back between the
    parts; the message is finished once, after the last part, every recipient deferred."""
    monkeypatch.setattr(qmgr_module, "SUSPEND_SLICE", 10)
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.7.1", "host mx refused to talk to me", False))
    await h.start(transports={"local": h.local, "smtp": failing}, initial_destination_concurrency=1,
                  transport_destination_recipient_limit={"smtp": 45})
    async with LoopTurns() as turns:
        suspended = qmgr_module._suspended
        monkeypatch.setattr(qmgr_module, "_suspended", lambda status, reason, rcpts: turns.seen.append(
            (turns.count, len(rcpts))) or suspended(status, reason, rcpts))
        queue_id = await h.queue(*(f"u{i:04d}@remote.test" for i in range(90)))  # two jobs: one tried
        await eventually(lambda: _is(h, {"deferred": 1}), what="the message deferred")
    assert len(failing.requests) == 1
    assert [size for _, size in turns.seen] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in turns.seen}) == 5, "the loop had no turn between the parts"
    reasons = Counter(reason for _, status, _, reason in await h.store.recipients(queue_id) if status == "pending")
    assert reasons == {"host mx refused to talk to me": 45,
                       "delivery temporarily suspended: host mx refused to talk to me": 45}


class PausingAsyncio:
    """A module's `asyncio` (qmgr's, the store's), whose sleep (the loop handed back between slices) waits while
    `running` is clear; `waiting`: how many sleeps wait so."""

    def __init__(self):
        self.running = asyncio.Event()
        self.running.set()
        self.waiting = 0

    def __getattr__(self, name):
        return getattr(asyncio, name)

    async def sleep(self, delay, result=None):
        self.waiting += 1
        try:
            await self.running.wait()
        finally:
            self.waiting -= 1
        return await asyncio.sleep(delay, result)


@pytest.mark.parametrize("operator", ["hold", "delete"])
async def test_a_hold_or_delete_between_the_parts_of_a_suspended_job_loses_nothing(h, monkeypatch, operator):
    """An operator's hold or delete seen between two parts of a dead destination's job (`_end_in_slices`):
    the parts left are still deferred, the message ends its attempt once (held: on hold, every recipient pending;
    deleted: gone) and qmgr holds nothing after."""
    monkeypatch.setattr(qmgr_module, "SUSPEND_SLICE", 10)
    pausing = PausingAsyncio()
    monkeypatch.setattr(qmgr_module, "asyncio", pausing)
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.7.1", "host mx refused to talk to me", False))
    await h.start(transports={"local": h.local, "smtp": failing}, initial_destination_concurrency=1,
                  transport_destination_recipient_limit={"smtp": 45})
    parts: list[int] = []
    suspended = qmgr_module._suspended

    def counting(status, reason, rcpts):
        parts.append(len(rcpts))
        if len(parts) == 2:
            pausing.running.clear()  # the suspension waits in its next hand-back of the loop
        return suspended(status, reason, rcpts)

    monkeypatch.setattr(qmgr_module, "_suspended", counting)
    queue_id = await h.queue(*(f"u{i:04d}@remote.test" for i in range(90)))  # two jobs: one tried
    await eventually(lambda: not pausing.running.is_set(), what="two parts deferred")
    await (h.store.hold_messages if operator == "hold" else h.store.delete_messages)([queue_id])
    await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
    assert parts == [10, 10]
    pausing.running.set()
    await attempts_over(h)
    assert parts == [10, 10, 10, 10, 5] and len(failing.requests) == 1
    assert h.qmgr.taken_count == 0
    rows = await h.store.recipients(queue_id)
    if operator == "delete":
        assert rows == [] and await h.counts() == {}
        return
    assert await h.counts() == {"hold": 1}
    assert Counter((status, reason) for _, status, _, reason in rows) == {
        ("pending", "host mx refused to talk to me"): 45,
        ("pending", "delivery temporarily suspended: host mx refused to talk to me"): 45}


@pytest.mark.parametrize("operator", ["hold", "delete"])
async def test_a_hold_or_delete_while_the_rows_of_an_attempts_end_are_made_loses_nothing(h, monkeypatch, operator):
    """The end of an attempt of many results makes its rows a slice a turn (the store's `_op_in_slices`) before its
    write: an operator's hold or delete seen meanwhile leaves the message held with every result recorded, or
    gone; qmgr holds nothing after, and nothing is tried again."""
    monkeypatch.setattr(store_daemon, "ROWS_SLICE", 10)
    pausing = PausingAsyncio()
    pausing.running.clear()
    monkeypatch.setattr(store_daemon, "asyncio", pausing)
    later = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "try later"))
    await h.start(transports={"local": h.local, "smtp": later}, transport_destination_recipient_limit={"smtp": 0})
    queue_id = await h.queue(*(f"u{i:02d}@remote.test" for i in range(35)))
    await eventually(lambda: pausing.waiting == 1, what="the end's rows half made")
    await (h.store.hold_messages if operator == "hold" else h.store.delete_messages)([queue_id])
    await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
    assert h.qmgr.in_hand(queue_id)
    pausing.running.set()
    await attempts_over(h)
    assert len(later.requests) == 1 and h.qmgr.taken_count == 0
    rows = await h.store.recipients(queue_id)
    if operator == "delete":
        assert rows == [] and await h.counts() == {}
        return
    assert await h.counts() == {"hold": 1}
    assert [(status, reason) for _, status, _, reason in rows] == [("pending", "try later")] * 35


@pytest.mark.parametrize("operator", ["hold", "delete"])
@pytest.mark.parametrize("meanwhile", ["nothing", "a reload", "the delivery's end"])
async def test_a_held_message_s_waiting_job_is_withdrawn_a_slice_at_a_time(h, monkeypatch, meanwhile, operator):
    """A hold withdrew every waiting job of a message in one loop turn (100 000 recipients: 0.35 s): they are
    deferred SUSPEND_SLICE recipients a turn, a job of more a part at a time, which alone ends the job with its
    last part. A reload or the end of the delivery under way between two parts loses nothing and delivers nothing
    twice: the message ends once, after its last part (held: on hold, the recipients withdrawn pending, "put on
    hold"; deleted: gone)."""
    monkeypatch.setattr(qmgr_module, "SUSPEND_SLICE", 10)
    pausing = PausingAsyncio()
    monkeypatch.setattr(qmgr_module, "asyncio", pausing)
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    await h.start(transports=transports, initial_destination_concurrency=1, default_destination_concurrency_limit=1,
                  transport_destination_recipient_limit={"smtp": 45})
    queue_id = await h.queue(*(f"u{i:02d}@remote.test" for i in range(90)))  # two jobs: one in flight
    await eventually(lambda: blocking.in_flight == 1, what="the first job in flight")
    parts: list[tuple[int, int, bool]] = []
    async with LoopTurns() as turns:
        job_withdrawn = h.qmgr._job_withdrawn

        def counting(job, part, last, state):
            parts.append((turns.count, len(part), last))
            if len(parts) == 2 and meanwhile != "nothing":
                pausing.running.clear()
            job_withdrawn(job, part, last, state)
            assert h.qmgr.in_hand(queue_id)  # (its job in flight, at least, is not over)

        h.qmgr._job_withdrawn = counting  # type: ignore[method-assign]
        await (h.store.hold_messages if operator == "hold" else h.store.delete_messages)([queue_id])
        poll = asyncio.create_task(h.qmgr._poll_operators())  # (the tick's: the clock stands still)
        if meanwhile != "nothing":
            await eventually(lambda: pausing.waiting == 1, what="two parts withdrawn")
            if meanwhile == "a reload":
                reload_to(h, "[relay.test]", transports, transport_destination_recipient_limit={"smtp": 45})
            else:
                blocking.release.set()
                await eventually(lambda: blocking.in_flight == 0, what="the delivery's end")
                assert h.qmgr.in_hand(queue_id)  # (the withdrawn job is not over)
            pausing.running.set()
        await poll
    assert [(size, last) for _, size, last in parts] == [(10, False)] * 4 + [(5, True)]
    assert len({turn for turn, _, _ in parts}) == 5, "the loop had no turn between the parts"
    blocking.release.set()
    await attempts_over(h)
    assert len(blocking.requests) == 1 and h.qmgr.taken_count == 0
    if operator == "delete":
        assert await h.counts() == {} and await h.store.recipients(queue_id) == []
        return
    assert await h.counts() == {"hold": 1}
    statuses = Counter((status, reason) for _, status, _, reason in await h.store.recipients(queue_id))
    assert statuses == {("sent", "delivered"): 45, ("pending", "delivery suspended: the message was put on hold"): 45}


async def two_jobs_one_in_flight(h, n: int) -> tuple[BlockingTransport, dict, dict, str]:
    """qmgr started relaying to [old.test], `n` recipients a job and one job at a time, with a message of 2n
    recipients queued and its first job in flight: (the smtp transport holding it, the transports, the recipient
    limit setting, the queue id)."""
    blocking = BlockingTransport("smtp")
    transports = {"local": h.local, "smtp": blocking}
    limit = {"transport_destination_recipient_limit": {"smtp": n}}
    resolve, _ = relaying("[old.test]")
    await h.start(resolve=resolve, transports=transports, initial_destination_concurrency=1,
                  default_destination_concurrency_limit=1, **limit)
    queue_id = await h.queue(*(f"u{i:04d}@remote.test" for i in range(2 * n)))  # two jobs: one in flight
    await eventually(lambda: blocking.in_flight == 1, what="the first job in flight")
    return blocking, transports, limit, queue_id


@pytest.mark.parametrize("meanwhile", ["nothing", "hold", "delete", "a second reload", "the delivery's end"])
async def test_a_reload_resolves_many_waiting_recipients_again_a_slice_at_a_time(h, monkeypatch, meanwhile):
    """A reload resolved every waiting recipient again in one loop turn (20 000: 0.22 s): past ROUTE_SLICE a task
    does it, ROUTE_SLICE a turn. While it does, the message's waiting jobs are in no destination: a hold or delete
    seen then ends them as withdrawn (none is delivered), a second reload starts the resolution over (all go where
    it sends them), the delivery under way ending finishes nothing early; each recipient is delivered once at most
    and the message ends once, qmgr holding nothing after."""
    n = 2 * qmgr_module.ROUTE_SLICE
    pausing = PausingAsyncio()
    monkeypatch.setattr(qmgr_module, "asyncio", pausing)
    blocking, transports, limit, queue_id = await two_jobs_one_in_flight(h, n)
    async with LoopTurns() as turns:
        reload_to(h, "[new.test]", transports, **limit)

        def counting(resolve):
            def resolving(*args):
                turns.seen.append(turns.count)
                if len(turns.seen) == qmgr_module.ROUTE_SLICE and meanwhile != "nothing":
                    pausing.running.clear()  # (after the first slice)
                return resolve(*args)
            return resolving

        h.qmgr._resolve = counting(h.qmgr._resolve)
        if meanwhile != "nothing":
            await eventually(lambda: pausing.waiting == 1, what="the first slice resolved again")
            if meanwhile in ("hold", "delete"):
                await (h.store.hold_messages if meanwhile == "hold" else h.store.delete_messages)([queue_id])
                await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
            elif meanwhile == "a second reload":
                reload_to(h, "[newer.test]", transports, **limit)
                h.qmgr._resolve = counting(h.qmgr._resolve)
            else:
                blocking.release.set()
                await eventually(lambda: blocking.in_flight == 0, what="the delivery's end")
                assert h.qmgr.in_hand(queue_id)
            pausing.running.set()
        await eventually(lambda: h.qmgr._rerouter is None, what="the reroute done")
    assert len(set(turns.seen)) >= 2, "the loop had no turn between the slices"
    assert len(turns.seen) == n + (qmgr_module.ROUTE_SLICE if meanwhile == "a second reload" else 0)  # (over once)
    blocking.release.set()
    await attempts_over(h)
    assert h.qmgr.taken_count == 0
    sent = [(request.nexthop, len(request.recipients)) for request in blocking.requests]
    if meanwhile in ("hold", "delete"):
        assert sent == [("[old.test]", n)]
        assert await h.counts() == ({"hold": 1} if meanwhile == "hold" else {})
        if meanwhile == "hold":
            statuses = Counter((status, reason) for _, status, _, reason in await h.store.recipients(queue_id))
            assert statuses == {("sent", "delivered"): n,
                                ("pending", "delivery suspended: the message was put on hold"): n}
        return
    assert sent == [("[old.test]", n), ("[newer.test]" if meanwhile == "a second reload" else "[new.test]", n)]
    assert await h.counts() == {}


async def first_in_flight_at_old_relay(h, monkeypatch) -> tuple[BlockingTransport, str]:
    """ROUTE_SLICE 10; qmgr started relaying to [old.test] one delivery at a time, the first message's under way
    (held by the transport): (that transport, the first message's queue id)."""
    monkeypatch.setattr(qmgr_module, "ROUTE_SLICE", 10)
    blocking = BlockingTransport("smtp")
    resolve, _ = relaying("[old.test]")
    await h.start(resolve=resolve, transports={"local": h.local, "smtp": blocking},
                  default_destination_concurrency_limit=1)
    first = await h.queue("u00@remote.test")
    await eventually(lambda: blocking.in_flight == 1, what="the first delivery under way")
    return blocking, first


@pytest.mark.parametrize("meanwhile", ["nothing", "hold", "delete"])
async def test_a_reload_resolves_many_small_waiting_messages_again_route_slice_recipients_a_turn(h, monkeypatch,
                                                                                                meanwhile):
    """The reroute task resolved one message a loop turn however small (10 000 waiting one-recipient messages: as
    many turns, their jobs in no destination meanwhile): the messages that fit in a turn's ROUTE_SLICE recipients
    go together, a turn a slice; each is delivered once, to the new relay. A message held or deleted after the
    first turn's batch, its jobs still in no destination, is never handed to the transport: it ends held, or
    gone."""
    pausing = PausingAsyncio()
    monkeypatch.setattr(qmgr_module, "asyncio", pausing)
    blocking, first = await first_in_flight_at_old_relay(h, monkeypatch)
    waiting = [await h.queue(f"u{i:02d}@remote.test", *([f"v{i:02d}@remote.test"] if i % 3 == 0 else []))
               for i in range(1, 41)]  # (every third message has two recipients)
    await eventually(lambda: h.qmgr.active_count == 41, what="every message taken")
    withdrawn = waiting[-2]  # (two recipients, far from the first batch)
    async with LoopTurns() as turns:
        reload_to(h, "[new.test]", {"local": h.local, "smtp": blocking})
        resolve_anew, paused = h.qmgr._resolve, []

        def resolving(*args):
            if meanwhile != "nothing" and not paused:
                paused.append(turns.count)
                pausing.running.clear()  # (the task waits at the end of its first turn)
            return resolve_anew(*args)

        h.qmgr._resolve = turns.at_each(resolving)
        if meanwhile != "nothing":
            await eventually(lambda: pausing.waiting == 1, what="the first batch resolved again")
            assert withdrawn in h.qmgr._rerouting
            await (h.store.hold_messages if meanwhile == "hold" else h.store.delete_messages)([withdrawn])
            await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
            pausing.running.set()
        await eventually(lambda: h.qmgr._rerouter is None, what="the reroute done")
    per_turn = Counter(turns.seen)
    assert sum(per_turn.values()) == 40 + 13 - (0 if meanwhile == "nothing" else 2)  # (a withdrawn one's: none)
    assert max(per_turn.values()) <= 10 and len(per_turn) <= 7, per_turn  # (not a turn a message)
    blocking.release.set()
    await attempts_over(h)
    delivered = [qid for qid in waiting if meanwhile == "nothing" or qid != withdrawn]
    assert sorted((r.queue_id, r.nexthop) for r in blocking.requests) == [(first, "[old.test]")] + [
        (qid, "[new.test]") for qid in delivered]
    assert await h.counts() == ({"hold": 1} if meanwhile == "hold" else {})
    if meanwhile == "hold":
        statuses = Counter((status, reason) for _, status, _, reason in await h.store.recipients(withdrawn))
        assert statuses == {("pending", "delivery suspended: the message was put on hold"): 2}


async def test_the_reroute_task_counts_every_recipient_of_a_message_against_a_turn_s_slice(h, monkeypatch):
    """A waiting job of one recipient, of a message of many (the others delivered): resolving it again indexes the
    message's whole list (`_queued_forms`), so the reroute task counts them all against a turn's ROUTE_SLICE, not
    the one (a turn took ten such messages of 100 000 recipients: a million indexed)."""
    blocking, first = await first_in_flight_at_old_relay(h, monkeypatch)
    waiting = [await h.queue(f"u{i:02d}@remote.test", *(f"l{i:02d}.{j}@example.test" for j in range(7)))
               for i in range(1, 9)]  # (8 recipients each: 7 delivered at once, one waits for the relay's window)
    await eventually(lambda: len(h.local.requests) == len(waiting), what="the local recipients delivered")
    indexed: list[tuple[int, int]] = []
    queued_forms = qmgr_module._queued_forms

    def indexing(message, jobs):
        indexed.append((turns.count, len(message.recipients)))
        return queued_forms(message, jobs)

    monkeypatch.setattr(qmgr_module, "_queued_forms", indexing)
    async with LoopTurns() as turns:
        reload_to(h, "[new.test]", {"local": h.local, "smtp": blocking})
        await eventually(lambda: h.qmgr._rerouter is None, what="the reroute done")
    per_turn: Counter[int] = Counter()
    for turn, size in indexed:
        per_turn[turn] += size
    assert len(indexed) == len(waiting) and max(per_turn.values()) <= 10, per_turn
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h), what="every message delivered")
    assert sorted((r.queue_id, r.nexthop) for r in blocking.requests) == [(first, "[old.test]")] + [
        (qid, "[new.test]") for qid in waiting]


async def test_a_reload_while_the_reroute_puts_a_message_in_order_resolves_it_again_a_slice_a_turn(h):
    """A reload that comes after the reroute task's last slice of a message, while it puts them in order: the
    message's recipients are resolved again by the new routing ROUTE_SLICE a turn (they were resolved all at once,
    20 000 holding the loop 1 s), and each is delivered once, where the last reload sends it."""
    n = 2 * qmgr_module.ROUTE_SLICE
    blocking, transports, limit, _ = await two_jobs_one_in_flight(h, n)
    put_in_order = h.qmgr._put_in_order
    reloads: list[int] = []
    async with LoopTurns() as turns:

        async def reloading(groups, keys):
            if h.qmgr._rerouter is not None and not reloads:
                reloads.append(turns.count)
                reload_to(h, "[newer.test]", transports, **limit)
                h.qmgr._resolve = turns.at_each(h.qmgr._resolve)
            return await put_in_order(groups, keys)

        h.qmgr._put_in_order = reloading  # type: ignore[method-assign]
        reload_to(h, "[new.test]", transports, **limit)
        h.qmgr._resolve = turns.at_each(h.qmgr._resolve)
        await eventually(lambda: h.qmgr._rerouter is None, what="the reroute done")
    assert len(reloads) == 1
    assert len(turns.seen) == 2 * n  # (the waiting job's recipients, resolved twice)
    assert max(Counter(turns.seen).values()) <= qmgr_module.ROUTE_SLICE, "resolved again in one turn"
    blocking.release.set()
    await attempts_over(h)
    assert [(request.nexthop, len(request.recipients)) for request in blocking.requests] == [
        ("[old.test]", n), ("[newer.test]", n)]
    assert await h.counts() == {} and h.qmgr.taken_count == 0


@pytest.mark.parametrize("meanwhile", ["nothing", "hold", "delete"])
async def test_a_job_s_report_of_many_results_is_taken_a_slice_at_a_time(h, monkeypatch, meanwhile):
    """The report of one job of 50 000 recipients was taken in (each result stamped with the job's transport and
    times) in one loop turn, 0.3 s: past REPORT_SLICE results it is taken that many a turn, the job done with the
    last slice. A hold or delete seen between two slices loses nothing: the message ends once, every result
    recorded (held) or gone (deleted), qmgr holding nothing after."""
    monkeypatch.setattr(qmgr_module, "REPORT_SLICE", 10)
    pausing = PausingAsyncio()
    monkeypatch.setattr(qmgr_module, "asyncio", pausing)
    later = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "try later"))
    await h.start(transports={"local": h.local, "smtp": later}, transport_destination_recipient_limit={"smtp": 0})
    slices: list[tuple[int, int]] = []
    async with LoopTurns() as turns:
        results_in = h.qmgr._results_in

        def counting(active, results):
            if results:
                slices.append((turns.count, len(results)))
                if len(slices) == 2 and meanwhile != "nothing":
                    pausing.running.clear()
            return results_in(active, results)

        h.qmgr._results_in = counting  # type: ignore[method-assign]
        queue_id = await h.queue(*(f"u{i:02d}@remote.test" for i in range(45)))
        if meanwhile != "nothing":
            await eventually(lambda: pausing.waiting == 1, what="two slices taken in")
            await (h.store.hold_messages if meanwhile == "hold" else h.store.delete_messages)([queue_id])
            await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
            pausing.running.set()
        else:
            await eventually(lambda: _is(h, {"deferred": 1}), what="the message deferred")
        await attempts_over(h)
    assert [size for _, size in slices] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in slices}) == 5, "the loop had no turn between the slices"
    assert len(later.requests) == 1 and h.qmgr.taken_count == 0
    rows = await h.store.recipients(queue_id)
    expected = {"nothing": {"deferred": 1}, "hold": {"hold": 1}, "delete": {}}[meanwhile]
    assert await h.counts() == expected
    if meanwhile != "delete":
        assert [(status, reason) for _, status, _, reason in rows] == [("pending", "try later")] * 45


class RepeatingTransport(ScriptedTransport):
    """A buggy agent: its report has each recipient's result twice in a row."""

    def respond(self, request: DeliveryRequest) -> DeliveryReport:
        report = super().respond(request)
        return DeliveryReport(tuple(result for result in report.results for _ in range(2)), site_ok=report.site_ok)


@pytest.mark.parametrize("count", [3, 45])
async def test_a_result_an_agent_repeats_is_taken_once(h, monkeypatch, caplog, count):
    """An agent that reports a recipient twice: its first result is taken, once, whether the report is taken in
    one turn (`_complete`) or REPORT_SLICE results a turn (`_job_done_in_slices`, which took every repeat within a
    slice): one result line for each recipient, the message deferred once."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    monkeypatch.setattr(qmgr_module, "REPORT_SLICE", 10)
    repeating = RepeatingTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "try later"))
    await h.start(transports={"local": h.local, "smtp": repeating},
                  transport_destination_recipient_limit={"smtp": 0})
    addresses = [f"u{i:02d}@remote.test" for i in range(count)]
    queue_id = await h.queue(*addresses)
    await eventually(lambda: _is(h, {"deferred": 1}), what="the message deferred")
    await attempts_over(h)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: to=<")]
    assert Counter(line.split(">", 1)[0].split("<", 1)[1] for line in lines) == Counter(addresses)
    assert len(repeating.requests) == 1


async def test_a_deleted_message_s_many_results_are_logged_once_and_none_recorded(h, monkeypatch, caplog):
    """A job of more than RECORD_SLICE results of a message the poll saw deleted during the delivery: every
    result's line is logged once (as Postfix's agent logs its status= lines for a queue file removed under it),
    RECORD_SLICE a loop turn, and none is recorded (all but the last slice were: the message is gone)."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    monkeypatch.setattr(qmgr_module, "RECORD_SLICE", 10)
    blocking = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": blocking}, transport_destination_recipient_limit={"smtp": 0})
    records: list[int] = []
    record = h.store.record_results

    async def recording(queue_id, rows):
        records.append(len(rows))
        return await record(queue_id, rows)

    monkeypatch.setattr(h.store, "record_results", recording)
    addresses = [f"u{i:02d}@remote.test" for i in range(45)]
    queue_id = await h.queue(*addresses)
    await eventually(lambda: blocking.in_flight == 1, what="the job in flight")
    await h.store.delete_messages([queue_id])
    await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
    async with LoopTurns() as turns:
        log_results = h.qmgr._log_results

        def counting(active, results, now):
            logged.append((turns.count, len(results)))
            return log_results(active, results, now)

        logged: list[tuple[int, int]] = []
        h.qmgr._log_results = counting  # type: ignore[method-assign]
        blocking.release.set()
        await attempts_over(h)
    assert records == []
    assert [size for _, size in logged] == [10, 10, 10, 10, 5]
    assert len({turn for turn, _ in logged}) == 5, "the loop had no turn between the slices"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{queue_id}: to=<")]
    assert sorted(line.split(">", 1)[0].split("<", 1)[1] for line in lines) == addresses
    assert all("status=sent" in line for line in lines)
    assert await h.counts() == {} and h.qmgr.taken_count == 0


@pytest.mark.parametrize("meanwhile", ["nothing", "hold", "delete"])
async def test_a_message_s_many_results_are_recorded_record_slice_at_a_time(h, monkeypatch, meanwhile):
    """100 000 results back together were recorded, their lines logged and their notices checked in one loop turn
    (about 30 us each): a record, or the end of the attempt, takes RECORD_SLICE at most, the rest in the records
    after it; every result is recorded once and the attempt ends once, after them, a hold or delete seen between
    two records too (held: every result recorded; deleted: gone, nothing recorded after the delete was seen)."""
    monkeypatch.setattr(qmgr_module, "RECORD_SLICE", 10)
    later = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "try later"))
    await h.start(transports={"local": h.local, "smtp": later}, transport_destination_recipient_limit={"smtp": 0})
    writes: list[tuple[str, int]] = []
    record, finish = h.store.record_results, h.store.finish
    second = asyncio.Event()
    go_on = asyncio.Event()
    if meanwhile == "nothing":
        go_on.set()

    async def recording(queue_id, rows):
        writes.append(("record", len(rows)))
        if len(writes) == 2:
            second.set()
            await go_on.wait()
        return await record(queue_id, rows)

    async def finishing(done, notices=(), results=()):
        writes.append(("finish", len(results)))
        return await finish(done, notices, results)

    monkeypatch.setattr(h.store, "record_results", recording)
    monkeypatch.setattr(h.store, "finish", finishing)
    queue_id = await h.queue(*(f"u{i:02d}@remote.test" for i in range(45)))
    await second.wait()
    if meanwhile != "nothing":
        await (h.store.hold_messages if meanwhile == "hold" else h.store.delete_messages)([queue_id])
        await h.qmgr._poll_operators()  # (the tick's: the clock stands still)
        go_on.set()
    await eventually(lambda: h.qmgr.active_count == 0 and not h.qmgr.busy, what="the attempt over")
    assert h.qmgr.taken_count == 0
    # (deleted: nothing recorded after the poll saw it, during the second record)
    assert writes == ([("record", 10)] * 4 + [("finish", 5)] if meanwhile != "delete" else [("record", 10)] * 2)
    assert await h.counts() == {"nothing": {"deferred": 1}, "hold": {"hold": 1}, "delete": {}}[meanwhile]
    rows = await h.store.recipients(queue_id)
    if meanwhile != "delete":
        assert [(status, reason) for _, status, _, reason in rows] == [("pending", "try later")] * 45


class HoldsOneDomain(RecordingTransport):
    """Answers at once (every recipient sent), but for the jobs of `held`, kept until `release` is set."""

    def __init__(self, held: str):
        super().__init__("smtp")
        self.held = held
        self.release = asyncio.Event()

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        if request.nexthop == self.held:
            await self.release.wait()
        return await super().deliver(request)


def results_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, RcptResult))


async def test_an_attempt_keeps_no_result_of_a_recipient_sent_or_bounced(h):
    """The end of an attempt needs its deferred results (they expire, or are warned of): the sent ones recorded
    while its other jobs run are not kept (a message of 1 000 000 recipients held them all, 250 MB, until its
    end). 2 000 recipients sent, one job held: the results alive then are not theirs; the message is removed
    once the held job ends, as before."""
    transport = HoldsOneDomain("held.test")
    await h.start(transports={"smtp": transport}, destination_recipient_limit=100)
    before = results_alive()
    sent = [f"u{i:04d}@sent.test" for i in range(2000)]
    qid = await h.queue(*sent, "last@held.test")
    await eventually(lambda: sorted(a for r in transport.requests for a in addresses(r)) == sorted(sent))
    await eventually(lambda: _sent_recorded(h, qid, 2000))
    assert h.qmgr.active_count == 1
    assert results_alive() - before < 100, "the sent results are still held"
    transport.release.set()
    await eventually(lambda: queue_is_empty(h))


async def _sent_recorded(h: Harness, qid: str, count: int) -> bool:
    return sum(status == "sent" for _, status, _, _ in await h.store.recipients(qid)) == count
