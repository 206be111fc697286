"""mailflow.store against a real SQLite file in tmp_path: queue states, recording results, group commit."""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from mailflow.content import Content
from mailflow.model import ClientAttributes, Delivered, OwnedFailure, Outcome, QueuedMessage, RcptResult, Recipient
from mailflow.errors import Overloaded
from mailflow.stages.qmgr.notices import plan
from mailflow.store import SCHEMA_VERSION, NewMessage, Store
from mailflow.store import daemon
from mailflow.store import engine
from mailflow.store.engine import LINGER
from mailflow.store.schema import MIGRATIONS
from tests.support import big_message
from tests.support.stalls import LoopTurns

T0 = 1_700_000_000.0


def new(qid: str, *rcpts: str, arrival: float = T0, content: bytes | None = None, sender: str = "a@remote.test",
        **kw) -> NewMessage:
    rcpts = rcpts or ("b@example.test",)
    data = content if content is not None else f"Subject: {qid}\r\n\r\nbody\r\n".encode()
    recipients = tuple(Recipient(i, r, r.upper()) for i, r in enumerate(rcpts))
    return NewMessage(qid, sender, arrival, Content.of(data), recipients, **kw)


async def content_of(store: Store, queue_id: str) -> bytes | None:
    content = await store.content(queue_id)
    return None if content is None else content.to_bytes()


def result(msg: QueuedMessage, idx: int, outcome: Outcome, dsn: str = "", text: str = "") -> RcptResult:
    rcpt = next(r for r in msg.recipients if r.index == idx)
    dsn = dsn or {Outcome.SENT: "2.0.0", Outcome.DEFERRED: "4.4.1", Outcome.BOUNCED: "5.1.1"}[outcome]
    return RcptResult(rcpt, outcome, dsn, text or outcome.value)


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "q" / "queue.db")
    yield s
    await s.close()


async def only(store: Store, now: float = T0) -> QueuedMessage:
    [msg] = await store.due(now, 100)
    return msg


# ---------------------------------------------------------------------------------------------- insert / due


async def test_insert_then_due_returns_it_with_recipients(store):
    await store.insert(new("Q1", "x@example.test", "y@example.test", smtputf8=True, body_type="8BITMIME",
                           client="c[192.0.2.1]"))
    msg = await only(store)
    assert msg == QueuedMessage("Q1", "a@remote.test", T0, len(b"Subject: Q1\r\n\r\nbody\r\n"), True, "8BITMIME", 0,
                                (Recipient(0, "x@example.test", "X@EXAMPLE.TEST"),
                                 Recipient(1, "y@example.test", "Y@EXAMPLE.TEST")), nrcpt=2)
    assert await store.counts() == {"incoming": 1}
    assert await content_of(store, "Q1") == b"Subject: Q1\r\n\r\nbody\r\n"
    assert await store.recipients("Q1") == [("x@example.test", "pending", "", ""),
                                            ("y@example.test", "pending", "", "")]


async def test_incoming_is_due_whatever_the_time(store):
    await store.insert(new("Q1", arrival=T0 + 1000))
    assert [m.queue_id for m in await store.due(T0, 10)] == ["Q1"]


async def test_due_respects_the_limit_oldest_first(store):
    for i in (3, 1, 2):
        await store.insert(new(f"Q{i}", arrival=T0 + i))
    assert [m.queue_id for m in await store.due(T0, 2)] == ["Q1", "Q2"]
    assert await store.due(T0, 0) == []


async def test_null_sender_and_empty_content_round_trip(store):
    await store.insert(new("Q1", sender="", content=b""))
    msg = await only(store)
    assert (msg.sender, msg.size) == ("", 0)
    assert await content_of(store, "Q1") == b""


async def test_duplicate_queue_id_is_refused(store):
    await store.insert(new("Q1"))
    with pytest.raises(sqlite3.IntegrityError):
        await store.insert(new("Q1"))
    assert await store.counts() == {"incoming": 1}


# ---------------------------------------------------------------------------------------------- claim / recover


async def test_claim_hides_from_due(store):
    await store.insert(new("Q1"))
    await store.insert(new("Q2"))
    assert await store.claim(["Q1"], T0) == ["Q1"]
    assert [m.queue_id for m in await store.due(T0 + 10**6, 10)] == ["Q2"]
    assert await store.counts() == {"active": 1, "incoming": 1}


async def test_claim_takes_only_incoming_or_due_deferred_mail(store):
    """The atomic taking: a message already active (another taker), held, or deferred and not yet due is not
    claimed, whatever an earlier read said."""
    for q in ("NEW", "TAKEN", "HELD", "LATER", "DUE"):
        await store.insert(new(q))
    await store.claim(["TAKEN"], T0)
    await store.hold_messages(["HELD"])
    for q, when in (("LATER", T0 + 300), ("DUE", T0 - 1)):
        [msg] = [m for m in await store.due(T0, 10) if m.queue_id == q]
        await store.claim([q], T0)
        await store.finish(Delivered(q, when))
    claimed = await store.claim(["NEW", "TAKEN", "HELD", "LATER", "DUE", "GONE"], T0)
    assert sorted(claimed) == ["DUE", "NEW"]
    assert await store.claim(["NEW", "DUE"], T0) == []  # a second taker gets nothing
    assert await store.counts() == {"active": 3, "hold": 1, "deferred": 1}


async def test_recover_turns_active_back_into_incoming(store):
    for q in ("Q1", "Q2", "Q3"):
        await store.insert(new(q))
    await store.claim(["Q1", "Q2"], T0)
    assert await store.recover() == 2
    assert await store.counts() == {"incoming": 3}
    assert len(await store.due(T0, 10)) == 3
    assert await store.recover() == 0


# ---------------------------------------------------------------------------------------------- record


async def record(store: Store, msg: QueuedMessage, *results: RcptResult, owed: bool = False) -> None:
    await store.record_results(msg.queue_id, [(r, owed) for r in results])


async def test_results_recorded_per_job_then_finish_removes_message_recipients_and_content(store):
    await store.insert(new("Q1", "x@example.test", "y@example.test"))
    await store.insert(new("Q2"))
    msg = next(m for m in await store.due(T0, 10) if m.queue_id == "Q1")
    await store.claim(["Q1"], T0)
    await record(store, msg, result(msg, 0, Outcome.SENT))
    assert [r[1] for r in await store.recipients("Q1")] == ["sent", "pending"]  # at once, before the other job
    await record(store, msg, result(msg, 1, Outcome.SENT))
    await store.finish(Delivered("Q1", None))
    assert await store.counts() == {"incoming": 1}
    assert await store.recipients("Q1") == []
    assert await store.content("Q1") is None
    assert await store.content("Q2") is not None  # the neighbour is untouched
    assert [m.queue_id for m in await store.due(T0 + 10**6, 10)] == ["Q2"]


async def test_a_recorded_result_is_final(store):
    """Recording twice (a retried write) never turns a sent recipient back into pending or bounced."""
    await store.insert(new("Q1"))
    msg = await only(store)
    await record(store, msg, result(msg, 0, Outcome.SENT))
    await record(store, msg, result(msg, 0, Outcome.BOUNCED))
    await record(store, msg, result(msg, 0, Outcome.DEFERRED))
    assert await store.recipients("Q1") == [("b@example.test", "sent", "2.0.0", "sent")]


async def test_finish_defers_and_due_only_returns_pending_recipients_once_due(store):
    await store.insert(new("Q1", "x@example.test", "y@example.test", "z@example.test"))
    msg = await only(store)
    retry = T0 + 300
    await store.claim(["Q1"], T0)
    await record(store, msg, result(msg, 0, Outcome.SENT),
                 result(msg, 1, Outcome.DEFERRED, "4.4.1", "connection refused"),
                 result(msg, 2, Outcome.BOUNCED, "5.1.1", "user unknown"))
    await store.finish(Delivered("Q1", retry))
    assert await store.counts() == {"deferred": 1}
    assert await store.next_due_time() == retry
    assert await store.due(retry - 0.001, 10) == []
    again = await only(store, retry)
    assert again.recipients == (Recipient(1, "y@example.test", "Y@EXAMPLE.TEST"),)
    assert again.attempts == 1
    assert await store.recipients("Q1") == [
        ("x@example.test", "sent", "2.0.0", "sent"),
        ("y@example.test", "pending", "4.4.1", "connection refused"),
        ("z@example.test", "bounced", "5.1.1", "user unknown"),
    ]
    assert await store.content("Q1") is not None


async def test_a_claim_given_back_is_deferred_without_counting_an_attempt(store):
    """give_back: a scan's claim that landed after an attempt's end was written (or a stale claim) leaves the row
    active with nobody holding it; it is deferred again, but the attempt was counted by that end (a stale claim
    made none): counted twice, `queue show` said 2 attempts after one."""
    await store.insert(new("Q1"))
    await only(store)
    await store.claim(["Q1"], T0)
    await store.finish(Delivered("Q1", T0 + 300))
    await store.claim(["Q1"], T0 + 300)  # (the scan's claim, after the end's write)
    await store.give_back("Q1", T0 + 600)
    assert await store.counts() == {"deferred": 1}
    again = await only(store, T0 + 600)
    assert again.attempts == 1


async def test_second_deferral_counts_attempts_and_moves_next_attempt(store):
    await store.insert(new("Q1"))
    await only(store)
    await store.claim(["Q1"], T0)
    await store.finish(Delivered("Q1", T0 + 300))
    await only(store, T0 + 300)
    await store.claim(["Q1"], T0 + 300)
    await store.finish(Delivered("Q1", T0 + 900))
    assert await store.due(T0 + 899, 10) == []
    assert (await only(store, T0 + 900)).attempts == 2
    assert await store.next_due_time() == T0 + 900


async def test_next_due_time_is_none_without_deferred_mail(store):
    assert await store.next_due_time() is None
    await store.insert(new("Q1"))
    assert await store.next_due_time() is None


async def test_finishes_of_several_messages_share_a_commit(store):
    for q in ("Q1", "Q2"):
        await store.insert(new(q))
    await store.claim(["Q1", "Q2"], T0)
    before = store.commits
    await asyncio.gather(store.finish(Delivered("Q1", None)), store.finish(Delivered("Q2", T0 + 60)))
    assert store.commits - before == 1
    assert await store.counts() == {"deferred": 1}
    assert (await only(store, T0 + 60)).queue_id == "Q2"


async def test_owed_notices_are_kept_until_finish_queues_them(store):
    """A bounce recorded when its job ended, then a crash: the row still says a notice is owed, with what the
    notice needs; finish clears the flag in the transaction that queues the notice."""
    await store.insert(new("Q1", "x@example.test", "y@example.test"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    bounced = RcptResult(msg.recipients[0], Outcome.BOUNCED, "5.1.1", "no such user", "mx.test[192.0.2.1]:25")
    await record(store, msg, bounced, owed=True)
    await record(store, msg, result(msg, 1, Outcome.SENT))
    assert await store.recover() == 1  # the crash
    [again] = await store.due(T0, 10)
    assert (again.recipients, again.owed) == ((), (bounced,))
    await store.claim(["Q1"], T0)
    await store.finish(Delivered("Q1", None, noticed=(0,)), notices=[new("BOUNCE1", sender="")])
    assert [m.queue_id for m in await store.due(T0, 10)] == ["BOUNCE1"]
    assert await store.recipients("Q1") == []


async def test_an_owed_success_notice_keeps_whether_the_recipient_was_relayed(store):
    """A success handed to a gateway (a pipe service without flag X) owes a notice saying `relayed`: the row keeps
    that across a stop, as Postfix's trace service keeps the action it was given."""
    await store.insert(new("Q1", "x@example.test", "y@example.test"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    relayed = RcptResult(msg.recipients[0], Outcome.SENT, "2.0.0", "delivered via gate service", "gate", relayed=True)
    delivered = RcptResult(msg.recipients[1], Outcome.SENT, "2.0.0", "delivered via final service", "final")
    await record(store, msg, relayed, delivered, owed=True)
    assert await store.recover() == 1  # a stop before the end of the attempt
    [again] = await store.due(T0, 10)
    assert again.owed == (relayed, delivered)


async def after_a_stop(store: Store, path) -> QueuedMessage:
    """The one message of `store` after a stop before the end of its attempt: closed, opened again, recovered."""
    await store.close()
    store = await Store.open(path)
    try:
        assert await store.recover() == 1
        [again] = await store.due(T0, 10)
    finally:
        await store.close()
    return again

async def test_an_owed_notice_keeps_how_local_delivery_expanded_the_recipient_across_a_reopen(tmp_path):
    """local's results say whom a list's failure notice goes to (`owner`) and that an alias's success was an
    expansion ("alias expanded", `Action: expanded`), and which member a result is about (`expanded`): qmgr
    records a local job's results at once but plans their notices when the attempt ends, so a restart between
    must not send the list's failure (its command's output, its paths) to the sender instead of the owner."""
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    rcpts = (Recipient(0, "list@example.test", "LIST@EXAMPLE.TEST"),
             Recipient(1, "team@example.test", "TEAM@EXAMPLE.TEST", "SUCCESS"),
             Recipient(2, "solo@example.test", "SOLO@EXAMPLE.TEST", "SUCCESS"))
    await store.insert(NewMessage("Q1", "a@remote.test", T0, Content.of(b"Subject: x\r\n\r\nbody\r\n"), rcpts))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    failed = RcptResult(rcpts[0], Outcome.BOUNCED, "5.3.0", "Command died with status 1", "local",
                        owner="owner-list@example.test")
    expanded = RcptResult(rcpts[1], Outcome.SENT, "2.0.0", "delivered to maildir (2 times)", "local",
                          expansion="alias")
    sole = RcptResult(rcpts[2], Outcome.SENT, "2.0.0", "delivered to maildir", "local", expanded="bob@example.test")
    await record(store, msg, failed, expanded, sole, owed=True)
    again = await after_a_stop(store, path)
    assert again.owed == (failed, expanded, sole)
    notices = plan(again, list(again.owed), warn_delay=False, myhostname="mx.example.test",
                   double_bounce_recipient="postmaster", now=T0)
    assert [(n.kind, n.to) for n in notices] == [("failure", "owner-list@example.test"), ("success", "a@remote.test")]
    told = {n.recipient.address: (n.action, n.diagnostic) for n in notices[1].recipients}
    assert told == {"team@example.test": ("expanded", "alias expanded"),
                    "bob@example.test": ("delivered", "delivered to maildir")}


async def test_an_owed_failure_notice_keeps_the_commands_x_unix_diagnostic_across_a_reopen(tmp_path):
    """A failed command's result carries Postfix's Diagnostic-Code (`x-unix; <its output>`, pipe_command's
    dsb_unix), and an alias of two lists whose commands failed the failures each list's owner is told
    (`owned`): recorded with the result, so the notices planned after a restart say the same and go to the same
    owners, not `X-Mailflow;` and the human text to the sender."""
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    rcpts = (Recipient(0, "cmd@example.test", "CMD@EXAMPLE.TEST"), Recipient(1, "all@example.test", ""))
    await store.insert(NewMessage("Q1", "a@remote.test", T0, Content.of(b"Subject: x\r\n\r\nbody\r\n"), rcpts))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    failed = RcptResult(rcpts[0], Outcome.BOUNCED, "5.3.0", 'Command died with status 1: "x". Command output: no',
                        "local", diagnostic="x-unix; no")
    owned = (OwnedFailure("o1@example.test", "l1@example.test", "5.3.0", "Command died", "x-unix; one"),
             OwnedFailure("o2@example.test", "l2@example.test", "5.1.1", "user unknown", "x-unix; user unknown"))
    lists = RcptResult(rcpts[1], Outcome.BOUNCED, "5.3.0", "Command died; user unknown", "local", owned=owned)
    await record(store, msg, failed, lists, owed=True)
    again = await after_a_stop(store, path)
    assert again.owed == (failed, lists)
    notices = plan(again, list(again.owed), warn_delay=False, myhostname="mx.example.test",
                   double_bounce_recipient="postmaster", now=T0)
    assert [(n.to, [(r.recipient.address, r.status, r.diagnostic_code) for r in n.recipients]) for n in notices] == [
        ("o1@example.test", [("l1@example.test", "5.3.0", "x-unix; one")]),
        ("o2@example.test", [("l2@example.test", "5.1.1", "x-unix; user unknown")]),
        ("a@remote.test", [("cmd@example.test", "5.3.0", "x-unix; no")])]


async def test_finish_can_record_the_last_jobs_results_in_the_same_transaction(store):
    await store.insert(new("Q1", "x@example.test", "y@example.test"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    await record(store, msg, result(msg, 0, Outcome.SENT))
    before = store.commits
    await store.finish(Delivered("Q1", T0 + 60), results=[result(msg, 1, Outcome.DEFERRED, "4.4.1", "later")])
    assert store.commits - before == 1
    assert await store.recipients("Q1") == [("x@example.test", "sent", "2.0.0", "sent"),
                                            ("y@example.test", "pending", "4.4.1", "later")]


async def test_finish_bounces_expired_recipients(store):
    await store.insert(new("Q1", "x@example.test"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    expired = result(msg, 0, Outcome.BOUNCED, "4.4.1", "message expired: connection refused")
    await store.finish(Delivered("Q1", None, expired=(expired,)))
    assert await store.counts() == {}


async def test_the_rows_of_many_results_are_made_a_slice_at_a_time_and_written_in_one_commit(store, monkeypatch):
    """The rows of 100 000 results (a record, the end of an attempt) were made in one loop turn, 0.4 s: past
    ROWS_SLICE they are made a slice a turn; each write is still one request, committed once, every row in it."""
    monkeypatch.setattr(daemon, "ROWS_SLICE", 10)
    await store.insert(new("Q1", *(f"u{i:02d}@example.test" for i in range(35))))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    async with LoopTurns() as turns:
        record_op = daemon._record_op
        monkeypatch.setattr(daemon, "_record_op", lambda qid, rows: turns.seen.append((turns.count, len(rows)))
                            or record_op(qid, rows))
        before = store.commits
        await record(store, msg, *(result(msg, i, Outcome.SENT) for i in range(12)))
        recorded, turns.seen[:] = list(turns.seen), []
        await store.finish(Delivered("Q1", T0 + 60, expired=tuple(
                               result(msg, i, Outcome.BOUNCED, "4.4.1", "message expired") for i in range(23, 35))),
                           results=[result(msg, i, Outcome.DEFERRED, "4.4.1", "later") for i in range(12, 23)])
        assert store.commits - before == 2
    assert [size for _, size in recorded] == [10, 2] and len({turn for turn, _ in recorded}) == 2
    assert [size for _, size in turns.seen] == [10, 1] and len({turn for turn, _ in turns.seen}) == 2
    statuses = [(status, reason) for _, status, _, reason in await store.recipients("Q1")]
    assert statuses == [("sent", "sent")] * 12 + [("pending", "later")] * 11 + [("bounced", "message expired")] * 12


# ---------------------------------------------------------------------------------------------- corrupt


async def test_mark_corrupt_hides_from_due_but_keeps_the_message(store):
    await store.insert(new("Q1"))
    await store.insert(new("Q2"))
    await store.mark_corrupt(["Q1"])
    assert [m.queue_id for m in await store.due(T0 + 10**6, 10)] == ["Q2"]
    assert await store.counts() == {"corrupt": 1, "incoming": 1}
    assert await store.content("Q1") is not None  # kept for inspection
    assert await store.recover() == 0  # corrupt is not active


# ---------------------------------------------------------------------------------------------- group commit


async def test_concurrent_inserts_share_commits(store):
    before = store.commits
    await asyncio.gather(*(store.insert(new(f"Q{i:03d}", f"r{i}@example.test")) for i in range(200)))
    commits = store.commits - before
    assert 1 <= commits <= 10  # group commit: far fewer than one per message
    assert await store.counts() == {"incoming": 200}
    due = {m.queue_id: m.recipients for m in await store.due(T0, 1000)}
    assert due == {f"Q{i:03d}": (Recipient(0, f"r{i}@example.test", f"R{i}@EXAMPLE.TEST"),) for i in range(200)}


async def test_sequential_inserts_commit_one_by_one(store):
    before = store.commits
    for i in range(5):
        await store.insert(new(f"Q{i}"))
    assert store.commits - before == 5


async def test_batch_limit_bounds_a_commit(tmp_path):
    store = await Store.open(tmp_path / "queue.db", batch_limit=10)
    try:
        await asyncio.gather(*(store.insert(new(f"Q{i:03d}")) for i in range(100)))
        assert store.commits >= 10
        assert await store.counts() == {"incoming": 100}
    finally:
        await store.close()


async def test_backlog_over_the_limit_is_refused_with_overloaded(tmp_path):
    store = await Store.open(tmp_path / "queue.db", backlog_limit=5)
    try:
        outcomes = await asyncio.gather(*(store.insert(new(f"Q{i:02d}")) for i in range(50)),
                                        return_exceptions=True)
        refused = [i for i, o in enumerate(outcomes) if isinstance(o, Overloaded)]
        accepted = [i for i, o in enumerate(outcomes) if o is None]
        assert refused and accepted and len(refused) + len(accepted) == 50
        ids = {m.queue_id for m in await store.due(T0, 100)}
        assert ids == {f"Q{i:02d}" for i in accepted}
        await store.insert(new("LATER"))  # once drained, inserts are accepted again
    finally:
        await store.close()


async def test_internal_writes_are_never_refused_for_backlog(tmp_path):
    store = await Store.open(tmp_path / "queue.db", backlog_limit=1)
    try:
        for q in ("Q1", "Q2", "Q3"):
            await store.insert(new(q))
        await asyncio.gather(store.claim(["Q1"], T0), store.mark_corrupt(["Q2"]), store.claim(["Q3"], T0))
        assert await store.counts() == {"active": 2, "corrupt": 1}
    finally:
        await store.close()


async def test_a_bad_insert_does_not_fail_innocent_inserts_in_the_same_batch(store):
    await store.insert(new("DUP"))
    outcomes = await asyncio.gather(store.insert(new("DUP")), store.insert(new("INNOCENT")), return_exceptions=True)
    assert isinstance(outcomes[0], sqlite3.IntegrityError)
    assert outcomes[1] is None


async def test_failed_batch_writes_nothing(store):
    await store.insert(new("DUP"))
    await asyncio.gather(store.insert(new("DUP")), store.insert(new("OTHER")), return_exceptions=True)
    # whatever the callers were told, the database holds exactly what succeeded: no half-written message
    ids = {m.queue_id for m in await store.due(T0, 10)}
    assert ids in ({"DUP"}, {"DUP", "OTHER"})
    for qid in ids:
        assert await store.content(qid) is not None
        assert len(await store.recipients(qid)) == 1
    assert await store.recipients("OTHER") == ([] if ids == {"DUP"} else [("b@example.test", "pending", "", "")])


# ---------------------------------------------------------------------------------------------- content


async def test_concurrent_content_reads_each_get_their_own(store):
    ids = [f"Q{i:04d}" for i in range(600)]  # more than one IN (...) chunk
    await asyncio.gather(*(store.insert(new(q, content=f"content of {q}\r\n".encode() * (i % 7 + 1)))
                           for i, q in enumerate(ids)))
    got = await asyncio.gather(*(content_of(store, q) for q in ids + ["MISSING", ids[5]]))
    for i, q in enumerate(ids):
        assert got[i] == f"content of {q}\r\n".encode() * (i % 7 + 1)
    assert got[-2] is None
    assert got[-1] == got[5]


async def test_content_is_bytes_exact(store):
    data = bytes(range(256)) * 4 + b"\r\n.\r\n\x00"
    await store.insert(new("Q1", content=data))
    assert await content_of(store, "Q1") == data


# ---------------------------------------------------------------------------------------------- reopen


async def test_reopened_store_still_has_the_rows(tmp_path):
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    await store.insert(new("Q1", "x@example.test", "y@example.test"))
    await store.insert(new("Q2"))
    msg = next(m for m in await store.due(T0, 10) if m.queue_id == "Q1")
    await store.claim(["Q1"], T0)
    await record(store, msg, result(msg, 0, Outcome.SENT), result(msg, 1, Outcome.DEFERRED))
    await store.finish(Delivered("Q1", T0 + 60))
    await store.claim(["Q2"], T0)
    await store.close()

    store = await Store.open(path)
    try:
        assert await store.counts() == {"deferred": 1, "active": 1}
        assert await store.recover() == 1
        due = {m.queue_id: m for m in await store.due(T0 + 60, 10)}
        assert set(due) == {"Q1", "Q2"}
        assert due["Q1"].recipients == (Recipient(1, "y@example.test", "Y@EXAMPLE.TEST"),)
        assert await content_of(store, "Q2") == b"Subject: Q2\r\n\r\nbody\r\n"
    finally:
        await store.close()


async def test_close_finishes_writes_already_submitted(tmp_path):
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    tasks = [asyncio.create_task(store.insert(new(f"Q{i}"))) for i in range(20)]
    await asyncio.sleep(0)  # every insert has queued its write
    await store.close()
    await asyncio.gather(*tasks)
    store = await Store.open(path)
    try:
        assert await store.counts() == {"incoming": 20}
    finally:
        await store.close()


async def newer_schema(path):
    await (await Store.open(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")


async def not_a_database(path):
    path.write_bytes(b"this is not an SQLite file" * 100)


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "queue.db"
    await newer_schema(path)
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        await Store.open(path)


async def test_a_damaged_database_file_is_refused(tmp_path):
    path = tmp_path / "queue.db"
    await not_a_database(path)
    with pytest.raises(sqlite3.DatabaseError):
        await Store.open(path)


def connection_threads() -> set[threading.Thread]:
    """Every live thread (the store's connections run on threads of their own: the writer's, aiosqlite's)."""
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.mark.parametrize("damage", [newer_schema, not_a_database])
async def test_a_failed_open_leaves_no_connection_behind(tmp_path, damage):
    """A process that cannot open its queue must be able to exit (a leaked writer's thread would block it)."""
    path = tmp_path / "queue.db"
    await damage(path)
    before = connection_threads()
    with pytest.raises(sqlite3.DatabaseError):
        await Store.open(path)
    left = connection_threads() - before
    for thread in left:
        thread.join(0.2)
    assert not [t for t in left if t.is_alive()]
    

async def test_a_hold_made_during_delivery_stands(store):
    await store.insert(new("Q1"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    await store.hold_messages(["Q1"])  # an operator
    await record(store, msg, result(msg, 0, Outcome.DEFERRED))
    await store.finish(Delivered("Q1", T0 + 300))
    assert await store.counts() == {"hold": 1}


async def test_the_from_line_is_owed_each_time_a_message_enters_the_active_queue_again(store):
    """qmgr logs the `from=` line each time a message enters the active queue (Postfix's opened()): owed after a
    hold on arrival and its release, a deferral and a start's recovery; not for new mail cleanup logged it for
    (a requeued message's copy is such new mail), nor again for a message taken without leaving the active
    queue."""
    await store.insert(new("Q1", queue="hold"))
    await store.insert(new("Q2"))
    assert [(m.queue_id, m.from_logged) for m in await store.take(T0, 10)] == [("Q2", True)]  # Q1 held
    await store.release_messages(["Q1"], T0)
    [released] = await store.take(T0, 10)
    await store.finish(Delivered("Q1", T0 + 300))
    [deferred] = await store.take(T0 + 300, 10)
    await store.finish(Delivered("Q1", T0 + 600))
    [again] = await store.take(T0 + 600, 10)
    assert await store.recover() == 2  # Q1 and Q2, active when the process stopped
    taken = {m.queue_id: m.from_logged for m in await store.take(T0, 10)}
    assert [m.from_logged for m in (released, deferred, again)] == [False, False, False]
    assert taken == {"Q1": False, "Q2": False}


async def test_due_alternates_new_and_deferred_mail(store):
    for i in range(3):
        await store.insert(new(f"OLD{i}", arrival=T0 - 100 + i))
    for m in await store.due(T0, 10):
        await store.claim([m.queue_id], T0)
        await store.finish(Delivered(m.queue_id, T0 - 1))
    for i in range(3):
        await store.insert(new(f"NEW{i}", arrival=T0 + i))
    assert [m.queue_id for m in await store.due(T0 + 10, 4)] == ["NEW0", "OLD0", "NEW1", "OLD1"]


# ---------------------------------------------------------------------------------------------- content files

async def spooled_message(store: Store, qid: str, data: bytes) -> NewMessage:
    """A message whose content came in through a spool (as smtpd writes it), with cleanup's header part."""
    spool = store.new_spool()
    for i in range(0, len(data), 65536):
        spool.append(data[i:i + 65536])
        await spool.drain()
    content = await spool.finish()
    assert not content.in_memory
    head = data.index(b"\r\n\r\n") + 2
    return NewMessage(qid, "a@remote.test", T0, Content((b"Received: x\r\n" + data[:head], *content.after(head).parts)),
                      (Recipient(0, "b@example.test", "b@example.test"),)), spool


def spool_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.content_dir.iterdir())


async def test_a_big_message_is_linked_in_read_back_in_pieces_and_its_file_removed_with_it(store):
    data = big_message()
    msg, spool = await spooled_message(store, "Q1", data)
    await store.insert(msg)
    spool.discard()  # smtpd's part; the queue's own name for the file stays
    assert spool_files(store) == ["Q1"] and (store.content_dir / "Q1").stat().st_nlink == 1
    back = await store.content("Q1")
    assert not back.in_memory and back.size == len(data) + len(b"Received: x\r\n")
    assert back.to_bytes() == b"Received: x\r\n" + data
    queued = await only(store)
    assert queued.size == back.size
    assert await store.claim(["Q1"], T0) == ["Q1"]
    await store.finish(Delivered("Q1", None), results=[result(queued, 0, Outcome.SENT)])
    assert spool_files(store) == [] and await store.content("Q1") is None


async def test_a_deleted_message_loses_its_file_and_a_missing_file_reads_as_missing(store):
    for qid in ("Q1", "Q2"):
        msg, spool = await spooled_message(store, qid, big_message())
        await store.insert(msg)
        spool.discard()
    await store.delete_messages(["Q1"])
    assert spool_files(store) == ["Q2"]
    (store.content_dir / "Q2").unlink()
    assert await store.content("Q2") is None


async def test_a_truncated_or_grown_content_file_reads_as_missing_not_as_a_shorter_message(store):
    """A content file cut short (a file system repaired after a crash, a full disk elsewhere, an operator) or
    grown must not be delivered as if it were the message: it reads as missing, so qmgr moves it to corrupt
    (Postfix: a queue file without its end record is corrupt)."""
    data = big_message()
    for qid in ("Q1", "Q2", "Q3"):
        msg, spool = await spooled_message(store, qid, data)
        await store.insert(msg)
        spool.discard()
    os.truncate(store.content_dir / "Q1", len(data) // 2)
    os.truncate(store.content_dir / "Q2", 10)  # shorter than the header section the row keeps
    with open(store.content_dir / "Q3", "ab") as f:
        f.write(b"junk\r\n")
    assert [await store.content(q) for q in ("Q1", "Q2", "Q3")] == [None, None, None]


async def test_a_spool_file_gone_before_its_batch_fails_only_its_own_insert(store, monkeypatch):
    """A session whose client hung up discards its spool file while its insert waits for the next batch: only
    that insert fails; the message sharing its batch is committed (a vanished file is not a store fault)."""
    gone, spool1 = await spooled_message(store, "Q1", big_message())
    kept, spool2 = await spooled_message(store, "Q2", big_message(seed=2))
    committer = store._committer
    real = committer.write
    arrived: list[int] = []
    both = asyncio.Event()

    async def write(ops, **kw):  # both inserts join one batch
        arrived.append(1)
        if len(arrived) == 2:
            spool1.discard()  # the cancelled session's finally, before the writer links the file in
            both.set()
        await both.wait()
        return await real(ops, **kw)

    monkeypatch.setattr(committer, "write", write)
    results = await asyncio.gather(store.insert(gone), store.insert(kept), return_exceptions=True)
    assert isinstance(results[0], Exception) and results[1] is None, results
    spool2.discard()
    assert await store.counts() == {"incoming": 1}
    assert spool_files(store) == ["Q2"]


async def test_a_failed_insert_never_takes_another_messages_file(store):
    msg, spool = await spooled_message(store, "Q1", big_message())
    await store.insert(msg)
    again, spool2 = await spooled_message(store, "Q1", big_message(seed=2))  # the same queue id: refused
    with pytest.raises(Exception):
        await store.insert(again)
    spool.discard()
    spool2.discard()
    assert (await store.content("Q1")).to_bytes().endswith(big_message().split(b"\r\n\r\n", 1)[1])
    assert spool_files(store) == ["Q1"]


async def test_sweep_removes_temporary_and_orphaned_files_only(store):
    msg, spool = await spooled_message(store, "Q1", big_message())
    await store.insert(msg)
    assert sum(name.startswith(".spool-") for name in spool_files(store)) == 1  # left by a "crash"
    (store.content_dir / "0123456789ABC000").write_bytes(b"a file whose row is gone")
    assert await store.sweep() == 2
    assert spool_files(store) == ["Q1"]
    assert await store.content("Q1") is not None


async def test_a_version_1_queue_is_upgraded_and_its_messages_read(tmp_path):
    path = tmp_path / "q" / "queue.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as con:
        con.executescript(V1_SCHEMA)  # the content row holds the whole message
    store = await Store.open(path)
    try:
        assert (await store.content("OLD1")).to_bytes() == b"\r\nxy\r\n"
        msg, spool = await spooled_message(store, "NEW", big_message())
        await store.insert(msg)
        spool.discard()
        assert (await store.content("NEW")).size == msg.content.size
    finally:
        await store.close()
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]



# ---------------------------------------------------------------------------------------------- faults, space, schema


async def test_a_failed_write_reports_sqlites_own_error_not_the_rollback(store):
    """SQLite rolls a transaction back itself after some errors (SQLITE_FULL at commit, I/O errors); a second
    ROLLBACK must not replace the real reason with "cannot rollback - no transaction is active"."""
    store._writer._con.execute("CREATE TEMP TRIGGER full BEFORE INSERT ON message"
                               " BEGIN SELECT RAISE(ROLLBACK, 'database or disk is full'); END")
    with pytest.raises(sqlite3.Error, match="database or disk is full"):
        await store.insert(new("Q1"))
    store._writer._con.execute("DROP TRIGGER full")
    await store.insert(new("Q2"))  # the connection is usable afterwards
    assert await store.counts() == {"incoming": 1}


async def test_a_store_fault_fails_a_whole_batch_at_once(tmp_path):
    """Locked by another process: every request of the batch gets the error after one wait, not one wait each."""
    path = tmp_path / "queue.db"
    store = await Store.open(path, busy_timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcomes = await asyncio.gather(*(store.insert(new(f"Q{i}")) for i in range(20)), return_exceptions=True)
        assert all(isinstance(o, sqlite3.OperationalError) and "locked" in str(o) for o in outcomes)
        assert loop.time() - started < 1.5  # 20 requests retried one by one would wait 20 x 0.2 s
        holder.execute("COMMIT")
        await store.insert(new("AFTER"))
    finally:
        holder.close()
        await store.close()


async def test_maintain_gives_the_space_of_a_drained_burst_back(tmp_path):
    path = tmp_path / "queue.db"
    store = await Store.open(path, owner=True)
    try:
        big = b"Subject: burst\r\n\r\n" + b"x" * 8000 + b"\r\n"
        await store.insert_many([new(f"B{i:04d}", content=big) for i in range(1500)])
        full = path.stat().st_size
        assert full > 10_000_000
        await store.delete_messages([f"B{i:04d}" for i in range(1500)])
        assert path.stat().st_size == full  # deleting alone gives nothing back
        freed = 0
        for _ in range(10):
            step = await store.maintain()
            freed += step
            if not step:
                break
        assert freed > 2000
        assert path.stat().st_size < full / 5
        assert Path(f"{path}-wal").stat().st_size < 1_000_000  # the WAL truncated too
        assert await store.maintain() == 0  # nothing more to do: a cheap check
        await store.insert(new("AFTER"))
        assert await store.counts() == {"incoming": 1}
    finally:
        await store.close()


V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE message (id TEXT PRIMARY KEY, queue TEXT NOT NULL DEFAULT 'incoming'
    CHECK (queue IN ('incoming', 'active', 'deferred', 'hold', 'corrupt')), sender TEXT NOT NULL,
    arrival REAL NOT NULL, next_attempt REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL DEFAULT 0, body_type TEXT NOT NULL DEFAULT '7BIT', client TEXT NOT NULL DEFAULT '',
    envid TEXT NOT NULL DEFAULT '', ret TEXT NOT NULL DEFAULT '', warned INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE INDEX message_due ON message (queue, next_attempt);
CREATE TABLE recipient (message_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL,
    original TEXT NOT NULL, notify TEXT NOT NULL DEFAULT '', orcpt TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'bounced')),
    dsn TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (message_id, idx)) WITHOUT ROWID;
CREATE TABLE content (message_id TEXT PRIMARY KEY, data BLOB NOT NULL);
INSERT INTO message (id, queue, sender, arrival, next_attempt, size)
    VALUES ('OLD1', 'active', 'a@remote.test', 1, 1, 6);
INSERT INTO recipient (message_id, idx, address, original, status)
    VALUES ('OLD1', 0, 'x@example.test', 'x@example.test', 'sent');
INSERT INTO recipient (message_id, idx, address, original) VALUES ('OLD1', 1, 'y@example.test', 'y@example.test');
INSERT INTO content VALUES ('OLD1', x'0d0a78790d0a');
"""


async def test_a_new_queue_is_made_for_incremental_vacuum_not_rebuilt_at_its_first_start(tmp_path, caplog):
    """The server's write lock (BEGIN IMMEDIATE) wrote a new file's first page before auto_vacuum was set, so every
    new queue was rebuilt by a VACUUM at its first start and logged as a conversion of an old queue."""
    caplog.set_level(logging.INFO, logger="mailflow.store")
    path = tmp_path / "queue.db"
    store = await Store.open(path, owner=True)
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)
    assert not [r for r in caplog.records if "incremental vacuum" in r.getMessage()], caplog.messages


async def test_a_queue_made_by_the_previous_version_is_migrated_and_converted(tmp_path):
    path = tmp_path / "queue.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    store = await Store.open(path, owner=True)
    try:
        assert await store.recover() == 1
        [msg] = await store.due(T0, 10)
        left = (Recipient(1, "y@example.test", "y@example.test"),)
        assert (msg.queue_id, msg.recipients, msg.owed) == ("OLD1", left, ())
        await store.claim(["OLD1"], T0)
        await record(store, msg, result(msg, 1, Outcome.BOUNCED), owed=True)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # rebuilt once for incremental vacuum
        assert db.execute("SELECT status, notice FROM recipient ORDER BY idx").fetchall() == [("sent", 0),
                                                                                            ("bounced", 1)]


async def test_a_queue_of_schema_11_gets_the_destination_snapshot_with_its_pause(tmp_path):
    """Schema 12 adds when a destination's rate-delay pause ends to qmgr's destination snapshot: the old snapshot
    (rewritten by qmgr at each start anyway) is dropped, and the table made again with the column."""
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE destination")
        db.execute("CREATE TABLE destination (transport TEXT NOT NULL, nexthop TEXT NOT NULL, window INTEGER NOT NULL,"
                   " in_flight INTEGER NOT NULL, queued INTEGER NOT NULL, failures INTEGER NOT NULL,"
                   " dead_until REAL NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '', updated REAL NOT NULL,"
                   " PRIMARY KEY (transport, nexthop)) WITHOUT ROWID")
        db.execute("INSERT INTO destination VALUES ('smtp', 'old.test', 1, 0, 0, 0, 0, '', 1)")
        db.execute("UPDATE schema_version SET version = 11")
    store = await Store.open(path)
    try:
        assert await store.destination_rows() == []
        await store.save_destinations([("smtp", "slow.test", 1, 0, 3, 0, 0.0, "", T0 + 60)], T0)
        [row] = await store.destination_rows()
        assert (row.nexthop, row.queued, row.paused_until, row.updated) == ("slow.test", 3, T0 + 60, T0)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def test_an_older_queue_is_refused_not_upgraded_when_upgrading_is_not_ours(tmp_path):
    """The operator tools open without `upgrade`: an older server may still run on the queue, and a queue moved on
    under it would keep it from starting again after a rollback (and its destination rows were dropped)."""
    path = tmp_path / "queue.db"
    await (await Store.open(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 11")
        db.execute("INSERT INTO destination (transport, nexthop, window, in_flight, queued, failures, updated)"
                   " VALUES ('smtp', 'old.test', 1, 0, 0, 0, 1)")
    with pytest.raises(sqlite3.DatabaseError, match=r"version 11 is older than this mailflow .*restart"):
        await Store.open(path, upgrade=False)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(11,)]
        assert db.execute("SELECT nexthop FROM destination").fetchall() == [("old.test",)]
    await (await Store.open(path, owner=True)).close()  # the server's start upgrades it
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


async def test_a_queue_of_schema_4_upgrades_its_messages_keeping_empty_client_attributes(tmp_path):
    """The client attributes (Postfix's client_name ... sasl_sender) are message columns added by a migration:
    mail queued before has them empty, as a Postfix queue file without them; new mail keeps them."""
    path = tmp_path / "queue.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        for step in (1, 2, 3):
            for sql in MIGRATIONS[step]:
                db.execute(sql)
        db.execute("UPDATE schema_version SET version = 4")
    attributes = ClientAttributes("mail.example.test", "IPv6:2001:db8::1", "4242", "helo.example.test", "ESMTP",
                                  "PLAIN", "alice", "list+2Bowner@example.test")
    store = await Store.open(path)
    try:
        await store.recover()
        await store.insert(new("NEW1", arrival=T0 + 1, client_attributes=attributes))
        taken = {m.queue_id: m.client_attributes for m in await store.take(T0 + 1, 10)}
        assert taken == {"OLD1": ClientAttributes(), "NEW1": attributes}
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


# ---------------------------------------------------------------------------------------------- thread hops


async def test_a_scan_is_one_read_and_hands_out_the_content_of_small_messages_it_claimed(store):
    from mailflow.store.daemon import SCAN_CONTENT_SIZE

    big = b"Subject: big\r\n\r\n" + b"x" * SCAN_CONTENT_SIZE
    await store.insert_many([new("S1", "a@x.test", "b@x.test"), new("S2"), new("B1", content=big)])
    reads = store.reads
    messages = await store.due(T0, 10)
    assert sorted(m.queue_id for m in messages) == ["B1", "S1", "S2"] and store.reads == reads + 1
    assert await store.claim(["S1", "S2", "B1"], T0) == ["S1", "S2", "B1"]
    reads = store.reads
    assert await content_of(store, "S1") == b"Subject: S1\r\n\r\nbody\r\n"
    assert await content_of(store, "S2") == b"Subject: S2\r\n\r\nbody\r\n"
    assert store.reads == reads, "read with the scan"
    assert await content_of(store, "B1") == big and store.reads == reads + 1
    assert await content_of(store, "S1") == b"Subject: S1\r\n\r\nbody\r\n" and store.reads == reads + 2, "once"


async def test_take_is_one_write_that_claims_what_is_due_and_hands_out_its_content(store):
    """qmgr's scan: read and claim in one writer transaction (no reader hop); held or not-yet-due mail stays."""
    await store.insert_many([new("N1", arrival=T0 + 1), new("N2", arrival=T0 + 2), new("HELD"), new("LATER")])
    await store.hold_messages(["HELD"])
    await store.claim(["LATER"], T0)
    await store.finish(Delivered("LATER", T0 + 300))
    reads, commits = store.reads, store.commits
    taken = await store.take(T0 + 10, 10)
    assert [m.queue_id for m in taken] == ["N1", "N2"]
    assert (store.reads, store.commits) == (reads, commits + 1)
    assert await content_of(store, "N1") == b"Subject: N1\r\n\r\nbody\r\n" and store.reads == reads, "read with it"
    assert await store.counts() == {"active": 2, "hold": 1, "deferred": 1}
    assert await store.take(T0 + 10, 10) == []  # a second scan takes nothing
    assert [m.queue_id for m in await store.take(T0 + 300, 1)] == ["LATER"]


def decoded_on_threads(monkeypatch) -> list[int]:
    """The threads in which each DUE row is turned into a message, from now on."""
    decoded_on: list[int] = []
    decode = daemon._due_message

    def spy(row):
        decoded_on.append(threading.get_ident())
        return decode(row)

    monkeypatch.setattr(daemon, "_due_message", spy)
    return decoded_on


async def test_a_big_scan_is_decoded_off_the_event_loop(store, monkeypatch):
    """Turning 10 000 taken rows into messages held the loop 0.1 s: past DECODE_INLINE rows it is a worker's."""
    decoded_on = decoded_on_threads(monkeypatch)
    n = 2 * daemon.DECODE_INLINE
    await store.insert_many([new(f"N{i:04d}", arrival=T0 + i) for i in range(n)])
    taken = await store.take(T0 + n, n)
    assert [m.queue_id for m in taken] == [f"N{i:04d}" for i in range(n)]
    assert len(decoded_on) == n and threading.get_ident() not in decoded_on
    assert await content_of(store, "N0007") == b"Subject: N0007\r\n\r\nbody\r\n"


async def test_one_message_of_many_recipients_is_decoded_off_the_event_loop(store, monkeypatch):
    """One row can be as long as 10 000 (virtual aliases may expand each of 1 000 recipients to 1 000): a
    message of 100 000 recipients held the loop 2 s. Past DECODE_INLINE_TEXT of recipients it is a worker's,
    however few the rows; a message of a few recipients stays on the loop."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10_000)  # (their JSON in the row, as for up to 1 000)
    decoded_on = decoded_on_threads(monkeypatch)
    await store.insert_many([new("FEW", "a@example.test", "b@example.test"),
                             new("MANY", *(f"user{i:05d}@example.test" for i in range(2000)), arrival=T0 + 1)])
    [few] = await store.take(T0 + 1, 1)
    assert few.queue_id == "FEW" and decoded_on == [threading.get_ident()]
    [many] = await store.take(T0 + 1, 1)
    assert many.queue_id == "MANY" and len(many.recipients) == 2000
    assert many.recipients[1999].address == "user01999@example.test"
    assert decoded_on[1:] != [threading.get_ident()]


async def test_a_message_of_many_recipients_is_read_a_slice_at_a_time(store, monkeypatch):
    """Past RECIPIENTS_IN_SCAN a message's recipients are not one JSON text in its scan row (for 1 000 000
    recipients SQLite built 100 MB of it, and its str and lists came on top: the process's peak): they are read
    RECIPIENT_SLICE rows a reader hop and made into Recipients as they come. What a take holds beyond the message
    it returns is one slice, not a copy of every recipient; the recipients are those to do, in envelope order,
    the owed ones as results, and a damaged row still names the message damaged."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 100)
    monkeypatch.setattr(daemon, "RECIPIENT_SLICE", 500)
    count = 20_000
    await store.insert_many([new("BIG", *(f"user{i:05d}@example.test" for i in range(count)))])
    [big] = await store.take(T0, 1)
    await store.record_results("BIG", [(RcptResult(big.recipients[3], Outcome.SENT, "2.0.0", "ok"), False),
                                       (RcptResult(big.recipients[4], Outcome.BOUNCED, "5.1.1", "no"), True)])
    await store.finish(Delivered("BIG", T0))
    reads = store.reads
    tracemalloc.start()
    try:
        [big] = await store.take(T0 + 1, 1)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - kept < 1 << 20, f"{peak - kept} bytes held beyond the message taken"  # (the JSON way: ~9 MB)
    assert [r.index for r in big.recipients] == [i for i in range(count) if i not in (3, 4)]
    assert big.recipients[-1] == Recipient(count - 1, f"user{count - 1:05d}@example.test",
                                           f"USER{count - 1:05d}@EXAMPLE.TEST")
    assert [(r.recipient.index, r.outcome) for r in big.owed] == [(4, Outcome.BOUNCED)]
    assert big.nrcpt == count and not big.damage
    assert store.reads - reads == -(-(count - 1) // 500)  # (19 999 to do, the owed one too: the last slice short)
    await store.finish(Delivered("BIG", T0 + 1))
    await store._writer.call(lambda: store._writer._connection().execute(
        "UPDATE recipient SET address = x'ff' WHERE message_id = 'BIG' AND idx = 7000"))
    [big] = await store.take(T0 + 2, 1)
    assert "recipient 7000: address is" in big.damage, big.damage


async def test_every_commit_is_on_disk_and_concurrent_writes_share_one(store):
    """What follows a 250 (a scan's claim, the end of an attempt) is fsynced like the insert itself: the
    connection stays synchronous=FULL; an end of attempt and an insert made together share one commit."""
    synchronous = lambda: store._writer._connection().execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
    FULL = 2
    await store.insert(new("Q1"))
    assert await store._writer.call(synchronous) == FULL
    await store.take(T0, 10)
    assert await store._writer.call(synchronous) == FULL
    commits = store.commits
    await asyncio.gather(store.finish(Delivered("Q1", None)), store.insert(new("Q2")))
    assert store.commits == commits + 1 and await store._writer.call(synchronous) == FULL
    assert await store.counts() == {"incoming": 1}


async def test_a_result_on_an_idle_committer_waits_for_new_mail_and_shares_its_commit(store, monkeypatch):
    """A delivery's result does not wake the writer alone when new mail may follow: the insert that comes
    within LINGER starts the batch at once and takes the result along (one commit). (LINGER made long here, so
    that "at once" is told from "when the linger ends" whatever an fsync costs on a busy machine.)"""
    linger = 1.0
    monkeypatch.setattr(engine, "LINGER", linger)
    await store.insert(new("Q1"))
    await store.insert(new("Q2"))
    await store.claim(["Q1"], T0)
    commits = store.commits
    finishing = asyncio.create_task(store.finish(Delivered("Q1", None)))
    await asyncio.sleep(linger / 10)
    assert store.commits == commits and not finishing.done()  # lingering
    started = time.monotonic()
    await store.insert(new("Q3"))
    assert time.monotonic() - started < linger / 2  # the insert did not wait for the linger to end
    await finishing
    assert store.commits == commits + 1
    assert await store.counts() == {"incoming": 2}


async def test_a_client_waiting_for_its_250_hears_of_the_commit_before_a_lingering_result(store):
    await store.insert(new("Q1"))
    await store.claim(["Q1"], T0)
    resumed: list[str] = []

    async def then(name: str, write) -> None:
        await write
        resumed.append(name)

    finishing = asyncio.create_task(then("result", store.finish(Delivered("Q1", None))))
    await asyncio.sleep(0)  # lingering, first in the batch
    await asyncio.gather(finishing, then("new mail", store.insert(new("Q2"))))
    assert resumed == ["new mail", "result"]


async def test_a_result_alone_is_committed_when_the_linger_is_over(store):
    await store.insert(new("Q1"))
    msg = await only(store)
    await store.claim(["Q1"], T0)
    commits = store.commits
    started = time.monotonic()
    await record(store, msg, result(msg, 0, Outcome.SENT))
    assert LINGER * 0.9 <= time.monotonic() - started < 1.0
    assert store.commits == commits + 1
    assert [r[1] for r in await store.recipients("Q1")] == ["sent"]


async def test_closing_commits_a_lingering_result_at_once(tmp_path):
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    await store.insert(new("Q1"))
    await store.claim(["Q1"], T0)
    finishing = asyncio.create_task(store.finish(Delivered("Q1", None)))
    await asyncio.sleep(0)  # the write is lingering
    await asyncio.wait_for(store.close(), 5)
    await asyncio.wait_for(finishing, 5)
    store = await Store.open(path)
    try:
        assert await store.counts() == {}
    finally:
        await store.close()


async def test_a_scan_reads_content_in_queue_order_up_to_its_budget(store, monkeypatch):
    from mailflow.store import daemon

    monkeypatch.setattr(daemon, "SCAN_CONTENT_BUDGET", 5000)  # half for new mail
    await store.insert_many([new(f"M{i}", arrival=T0 + i, content=b"Subject: m\r\n\r\n" + b"x" * 1000)
                             for i in range(4)])
    messages = await store.due(T0 + 10, 10)
    assert [m.queue_id for m in messages] == ["M0", "M1", "M2", "M3"]
    assert await store.claim(["M0", "M1", "M2", "M3"], T0 + 10) == ["M0", "M1", "M2", "M3"]
    reads = store.reads
    assert [await content_of(store, f"M{i}") is not None for i in range(2)] == [True, True]
    assert store.reads == reads, "the first two fit in the budget: read with the scan"
    assert await content_of(store, "M2") is not None and store.reads == reads + 1


async def test_scanned_content_is_handed_out_only_for_a_claimed_message_still_queued(store):
    await store.insert_many([new("H1"), new("F1"), new("D1")])
    await store.hold_messages(["H1"])
    await store.insert(new("H1X"))
    await store.due(T0, 10)
    await store.hold_messages(["H1X"])  # an operator, between the scan and the claim
    assert await store.claim(["F1", "D1", "H1X"], T0) == ["F1", "D1"]
    await store.finish(Delivered("F1", None), results=[])
    await store.delete_messages(["D1"])
    reads = store.reads
    assert [await store.content(q) for q in ("F1", "D1")] == [None, None]
    assert await content_of(store, "H1X") == b"Subject: H1X\r\n\r\nbody\r\n"
    assert store.reads == reads + 3  # each read from the rows


async def test_content_reads_in_one_loop_turn_are_one_read(store):
    await store.insert_many([new(f"C{i}") for i in range(5)])
    reads = store.reads
    contents = await asyncio.gather(*(store.content(f"C{i}") for i in range(5)), store.content("MISSING"))
    assert [c.to_bytes() for c in contents[:5]] == [f"Subject: C{i}\r\n\r\nbody\r\n".encode() for i in range(5)]
    assert contents[5] is None and store.reads == reads + 1


async def test_a_read_that_met_text_not_utf8_leaves_no_snapshot_behind(store, tmp_path):
    """A read that fails midway on text that is not UTF-8 (a row edited by hand) is made again leniently; the
    failed one must not keep its snapshot open (until the garbage collector frees its cursor): the connection's
    next reads see what was committed since (else pickup saw a requeued message it had set aside as still
    requeued, and set it aside again at every scan)."""
    import gc

    db = tmp_path / "q" / "queue.db"
    for qid in ("A1", "B2"):
        await store.insert(NewMessage(qid, "s@x.test", 1.0, Content.of(b"Subject: s\r\n\r\nb\r\n"),
                                      (Recipient(0, "r@x.test", "r@x.test"),)))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE message SET sender = CAST(x'ff61' AS TEXT) WHERE id = 'B2'")
    gc.disable()  # (only it would free the cursor of the failed read)
    try:
        assert len(await store.message_page(queues=["incoming"])) == 2
        with sqlite3.connect(db) as con:
            con.execute("UPDATE message SET queue = 'hold' WHERE id = 'A1'")
        assert [row.queue_id for row in await store.message_page(queues=["hold"])] == ["A1"]
    finally:
        gc.enable()


async def test_never_due_finds_both_kinds_of_unreachable_message_in_one_read(store, tmp_path):
    """A deferred message whose next_attempt is no time and one in no known queue, with what is wrong, in one
    reader hop (it was two queries, each a hop, at every timed scan)."""
    for qid in ("A1", "B2", "C3"):
        await store.insert(NewMessage(qid, "s@x.test", 1.0, Content.of(b"Subject: s\r\n\r\nb\r\n"),
                                      (Recipient(0, "r@x.test", "r@x.test"),)))
    with sqlite3.connect(tmp_path / "q" / "queue.db") as con:
        con.execute("PRAGMA ignore_check_constraints = 1")
        con.execute("UPDATE message SET queue = 'deferred', next_attempt = 'y' WHERE id = 'A1'")
        con.execute("UPDATE message SET queue = 'bogus' WHERE id = 'B2'")
        con.execute("UPDATE message SET queue = 'deferred', next_attempt = 5.0 WHERE id = 'C3'")
    before = store.reads
    found = await store.never_due()
    assert store.reads == before + 1
    assert sorted(found) == [("A1", "next_attempt is 'y', not a time"),
                             ("B2", "queue is 'bogus', not one of incoming, active, deferred, hold, corrupt, maildrop")]


async def test_a_take_whose_recipients_cannot_be_read_gives_its_rows_back(store, monkeypatch):
    """A big message's recipients are read after the claim: when that read fails, the claimed rows are given back
    before the error goes on to the scan, instead of staying active with nobody holding them; each as it was, in
    its own queue: new mail is not made deferred (a listing would show it deferred for no reason, and qmgr would
    log a second from= line for it), a deferred message keeps its time."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert_many([new("BIG", *(f"user{i:02d}@example.test" for i in range(20))),
                             new("SMALL", "a@example.test", arrival=T0 + 1)])
    await store.claim(["BIG"], T0)
    await store.finish(Delivered("BIG", T0 + 5))
    read = store._reader.fetchall
    failing_recipient_reads(store, monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        await store.take(T0 + 10, 10)
    assert await store.counts() == {"incoming": 1, "deferred": 1}
    monkeypatch.setattr(store._reader, "fetchall", read)
    assert await store._reader.fetchall("SELECT id, next_attempt FROM message WHERE queue = 'deferred'") == [
        ("BIG", T0 + 5)]
    taken = {m.queue_id: m for m in await store.take(T0 + 10, 10)}
    assert sorted(taken) == ["BIG", "SMALL"]
    assert len(taken["BIG"].recipients) == 20
    assert (taken["SMALL"].from_logged, taken["BIG"].from_logged) == (True, False)


def failing_recipient_reads(store: Store, monkeypatch) -> None:
    """The store's reads of a big message's recipients fail (a disk error) until undone."""
    read = store._reader.fetchall

    async def failing(sql, params=()):
        if sql == daemon._FIRST_RECIPIENTS:
            raise sqlite3.OperationalError("disk I/O error")
        return await read(sql, params)

    monkeypatch.setattr(store._reader, "fetchall", failing)


async def test_a_message_whose_recipients_are_corrupt_is_handed_out_damaged_and_the_others_go(store, monkeypatch):
    """SQLite finds the pages of one big message's recipients malformed: that message is handed out damaged (qmgr
    moves it to the corrupt queue) and the scan's other messages are handed out, not given back with it; the scan
    after does not take it again. (Given back, it was the oldest: every scan took it first, failed, and handed out
    nothing.)"""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert_many([new("BIG", *(f"user{i:02d}@example.test" for i in range(20))),
                             *(new(f"S{i}", "a@example.test", arrival=T0 + 1 + i) for i in range(5))])
    read = store._reader.fetchall

    async def corrupt_big(sql, params=()):
        if sql == daemon._FIRST_RECIPIENTS and params[0] == "BIG":
            raise corrupt_pages()
        return await read(sql, params)

    monkeypatch.setattr(store._reader, "fetchall", corrupt_big)
    taken = {m.queue_id: m for m in await store.take(T0 + 10, 100)}
    assert sorted(taken) == ["BIG", "S0", "S1", "S2", "S3", "S4"]
    assert taken["BIG"].damage == "its recipients cannot be read: database disk image is malformed"
    assert taken["BIG"].recipients == ()
    assert [m.damage for qid, m in taken.items() if qid != "BIG"] == [""] * 5
    assert await store.counts() == {"active": 6}
    assert await store.take(T0 + 11, 100) == []


def corrupt_pages() -> sqlite3.DatabaseError:
    """The error Python's sqlite3 raises for SQLITE_CORRUPT."""
    error = sqlite3.DatabaseError("database disk image is malformed")
    error.sqlite_errorcode, error.sqlite_errorname = sqlite3.SQLITE_CORRUPT, "SQLITE_CORRUPT"
    return error


async def requeued_owing_a_notice(store: Store, qid: str) -> QueuedMessage:
    """`qid` taken, a bounce recorded with its notice owed, requeued while active: marked, as a stop leaves it."""
    [msg] = await store.take(T0, 1)
    await record(store, msg, RcptResult(msg.recipients[0], Outcome.BOUNCED, "5.1.1", "no such user"), owed=True)
    await store.requeue_messages([qid], T0 + 1)
    return msg


async def queue_requeue_owed(store: Store, qid: str) -> tuple:
    [(queue, requeue)] = await store._reader.fetchall("SELECT queue, requeue FROM message WHERE id = ?", (qid,))
    [(owed,)] = await store._reader.fetchall("SELECT count(*) FROM recipient WHERE message_id = ? AND notice = 1",
                                             (qid,))
    return queue, requeue, owed


async def test_a_requeued_message_owing_notices_is_given_back_to_incoming_still_marked(store, monkeypatch):
    """A message requeued while it owes notices waits in incoming, marked, for the end of an attempt to queue them
    (requeue.py). A take that cannot read its recipients gives it back there, not to maildrop, where pickup would
    copy its pending recipients alone and the bounce notice would never be sent."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert(new("BIG", *(f"user{i:02d}@example.test" for i in range(20))))
    await requeued_owing_a_notice(store, "BIG")
    await store.recover()  # (a stop: marked, owing, it is incoming again)
    assert await queue_requeue_owed(store, "BIG") == ("incoming", 1, 1)
    failing_recipient_reads(store, monkeypatch)
    with pytest.raises(sqlite3.OperationalError):
        await store.take(T0 + 2, 5)
    assert await queue_requeue_owed(store, "BIG") == ("incoming", 1, 1)
    assert await store.requeued_messages() == []


async def test_a_message_given_back_owing_notices_stays_marked_in_incoming(store):
    """qmgr's give_back follows the same rule: requeued and owing notices, the message is not sent to maildrop."""
    await store.insert(new("Q1"))
    await requeued_owing_a_notice(store, "Q1")
    await store.give_back("Q1", T0 + 600)
    assert await queue_requeue_owed(store, "Q1") == ("incoming", 1, 1)


async def test_rows_a_failed_take_could_not_give_back_are_given_back_by_the_next_take(store, monkeypatch, caplog):
    """The read of a big message's recipients fails, and so does the write giving the claimed rows back (a disk
    full): the rows are not left active with nobody holding them until the next start; the next take's transaction
    gives them back before its scan, which takes them."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert_many([new("BIG", *(f"user{i:02d}@example.test" for i in range(20))),
                             new("SMALL", "a@example.test", arrival=T0 + 1)])
    read, write = store._reader.fetchall, store._committer.write

    async def failing_give_back(ops, **kw):
        if ops and ops[0][0] == daemon._GIVE_BACK:
            raise sqlite3.OperationalError("database or disk is full")
        return await write(ops, **kw)

    failing_recipient_reads(store, monkeypatch)
    monkeypatch.setattr(store._committer, "write", failing_give_back)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        await store.take(T0 + 1, 10)
    assert await store.counts() == {"active": 2}
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mailflow.store"] == [
        ("ERROR", "store: giving back 2 claimed messages (BIG, SMALL) failed: database or disk is full; the next scan"
                  " gives them back")]
    monkeypatch.setattr(store._reader, "fetchall", read)
    monkeypatch.setattr(store._committer, "write", write)
    taken = await store.take(T0 + 1, 10)
    assert sorted(m.queue_id for m in taken) == ["BIG", "SMALL"]
    assert len(next(m for m in taken if m.queue_id == "BIG").recipients) == 20
    assert await store.counts() == {"active": 2}
    assert await store.take(T0 + 1, 10) == []  # (given back once: nothing is given back again)


async def test_rows_still_to_give_back_outlast_a_next_take_that_fails_too(store, monkeypatch):
    """The give-back of a failed take fails, and so does the whole transaction of the next take (the store locked),
    which was to give them back first: they are still to give back, and the take after that gives them back and
    takes them (dropped, they would stay active, held by nobody, until the next start)."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert_many([new("BIG", *(f"user{i:02d}@example.test" for i in range(20))),
                             new("SMALL", "a@example.test", arrival=T0 + 1)])
    read, write = store._reader.fetchall, store._committer.write

    async def failing_give_back(ops, **kw):
        if ops and ops[0][0] == daemon._GIVE_BACK:
            raise sqlite3.OperationalError("database or disk is full")
        return await write(ops, **kw)

    async def locked(ops, **kw):
        raise sqlite3.OperationalError("database is locked")

    failing_recipient_reads(store, monkeypatch)
    monkeypatch.setattr(store._committer, "write", failing_give_back)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        await store.take(T0 + 1, 10)
    monkeypatch.setattr(store._reader, "fetchall", read)
    monkeypatch.setattr(store._committer, "write", locked)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await store.take(T0 + 1, 10)
    assert await store.counts() == {"active": 2}
    monkeypatch.setattr(store._committer, "write", write)
    taken = await store.take(T0 + 1, 10)
    assert sorted(m.queue_id for m in taken) == ["BIG", "SMALL"]
    assert await store.counts() == {"active": 2}


async def test_a_give_back_that_committed_but_failed_does_not_undo_a_later_claim(store, monkeypatch):
    """The give-back of a failed take commits but reports an error (an fsync after the commit): its rows are kept
    to give back again. A claim() of the message then gives them back first, in its own transaction: the next
    take does not give the claimed message back under its taker and hand it out a second time."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    await store.insert(new("BIG", *(f"user{i:02d}@example.test" for i in range(20))))
    read, write = store._reader.fetchall, store._committer.write

    async def committed_then_failed(ops, **kw):
        done = await write(ops, **kw)
        if ops and ops[0][0] == daemon._GIVE_BACK:
            raise OSError("fsync failed after the commit")
        return done

    failing_recipient_reads(store, monkeypatch)
    monkeypatch.setattr(store._committer, "write", committed_then_failed)
    with pytest.raises(sqlite3.OperationalError):
        await store.take(T0 + 1, 10)
    monkeypatch.setattr(store._reader, "fetchall", read)
    monkeypatch.setattr(store._committer, "write", write)
    assert await store.counts() == {"incoming": 1}
    assert await store.claim(["BIG"], T0 + 2) == ["BIG"]
    assert await store.take(T0 + 3, 10) == []
    assert await store.counts() == {"active": 1}


async def test_recipients_of_one_original_in_a_row_share_its_str(store, monkeypatch):
    """The members of an expanded list, in a row, share one str for their original, whether their rows came as the
    scan's JSON or in slices after it (a dict of every distinct original grew with them)."""
    monkeypatch.setattr(daemon, "RECIPIENTS_IN_SCAN", 10)
    for qid, count in (("SMALL", 5), ("BIG", 20)):
        await store.insert(NewMessage(qid, "a@remote.test", T0, Content.of(b"Subject: s\r\n\r\nb\r\n"),
                                      tuple(Recipient(i, f"m{i:02d}@example.test", "list@example.test")
                                            for i in range(count))))
    for message in await store.take(T0, 10):
        first = message.recipients[0].original
        assert all(r.original is first for r in message.recipients), message.queue_id
        assert [r.index for r in message.recipients] == list(range(len(message.recipients)))


def test_a_log_line_about_several_messages_names_the_first_ten():
    from mailflow.store.daemon import _some_ids
    assert _some_ids(iter(["A", "B"])) == "A, B"
    assert _some_ids(f"Q{i}" for i in range(12)) == ", ".join(f"Q{i}" for i in range(10)) + " and more"
