"""The store's side of a requeue (mailflow/store/requeue.py) against a real SQLite file: an operator's requeue
moves mail to the maildrop queue, which qmgr never takes; pickup reads it with its pending recipients only and
replaces it by its copy in one transaction, which a kill in the middle leaves undone whole."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from mailflow import queue_tools as qt
from mailflow.clock import SystemClock
from mailflow.content import Content
from mailflow.model import ClientAttributes, Delivered, Outcome, RcptResult, Recipient
from mailflow.stages.pickup import Pickup
from mailflow.store import NewMessage, Store, requeue, schema
from tests.support import big_message
from tests.support.content import spooled

T0 = 1_700_000_000.0
ATTRIBUTES = ClientAttributes("mail.remote.test", "192.0.2.7", "4242", "helo.remote.test", "ESMTP")


def new(qid: str, *rcpts: Recipient, content: Content | None = None, **kw) -> NewMessage:
    rcpts = rcpts or (Recipient(0, "b@example.test", "b@example.test"),)
    return NewMessage(qid, "a@remote.test", T0, content or Content.of(b"Subject: s\r\n\r\nbody\r\n"), rcpts, **kw)


def copy_of(old_id: str, new_id: str, content: Content, recipients) -> NewMessage:
    """What cleanup would make of a requeued message: a new id, one more header field, the same body."""
    return NewMessage(new_id, "a@remote.test", T0, Content((b"Received: again\r\n", *content.parts)),
                      tuple(recipients))


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "q" / "queue.db")
    yield s
    await s.close()


async def test_requeued_mail_waits_in_the_maildrop_queue_with_only_its_pending_recipients(store):
    dsn = Recipient(1, "two@example.test", "orig-two@example.test", "SUCCESS,DELAY", "rfc822;orig-two@x.test")
    await store.insert(new("Q1", Recipient(0, "one@example.test", "one@example.test"), dsn,
                           envid="env-1", ret="HDRS", client="mail.remote.test[192.0.2.7]",
                           client_attributes=ATTRIBUTES))
    [taken] = await store.take(T0, 10)
    sent = RcptResult(taken.recipients[0], Outcome.SENT, "2.0.0", "ok")
    await store.finish(Delivered("Q1", T0 + 3600, warned=True), results=[sent])

    await store.requeue_messages(["Q1"], T0 + 60)
    assert await store.counts() == {"maildrop": 1}
    assert await store.take(T0 + 7200, 10) == []  # qmgr never takes it: pickup copies it
    [requeued] = await store.requeued_messages()
    assert (requeued.queue_id, requeued.sender, requeued.arrival) == ("Q1", "a@remote.test", T0)
    assert (requeued.envid, requeued.ret, requeued.client) == ("env-1", "HDRS", "mail.remote.test[192.0.2.7]")
    assert requeued.client_attributes == ATTRIBUTES
    assert requeued.recipients == (dsn,)  # the one delivered is not copied
    assert requeued.warned  # its "delayed" notice went out


async def test_the_copy_of_a_message_whose_delay_notice_went_out_sends_none_again(store):
    await store.insert(new("OLD1"))
    await store.insert(new("OLD2"))
    await store.take(T0, 10)
    await store.finish(Delivered("OLD1", T0 + 3600, warned=True))
    await store.finish(Delivered("OLD2", T0 + 3600))
    await store.requeue_messages(["OLD1", "OLD2"], T0)
    for requeued, new_id in zip(await store.requeued_messages(), ("NEW1", "NEW2")):
        content = await store.content(requeued.queue_id)
        await store.replace_requeued(requeued.queue_id, copy_of(requeued.queue_id, new_id, content,
                                                                requeued.recipients), warned=requeued.warned)
    assert {m.queue_id: m.warned for m in await store.take(T0, 10)} == {"NEW1": True, "NEW2": False}


async def test_a_copy_committed_with_another_message_s_delay_notice_keeps_its_notice_sent(store):
    """The group commit ran each statement once for the whole batch, in the order it first appeared: qmgr's end of
    an attempt that queues a delay notice runs `UPDATE message SET warned = 1` before its INSERTs, so a requeued
    copy committed in the same batch had its own UPDATE run before its row was inserted, and its sender got the
    "delayed" notice again (seen in the kill campaign). A request's statements now run in its own order."""
    await store.insert(new("OLD1"))
    await store.insert(new("OTHER"))
    await store.take(T0, 10)
    await store.finish(Delivered("OLD1", T0 + 3600, warned=True))
    await store.requeue_messages(["OLD1"], T0)
    [requeued] = await store.requeued_messages()
    content = await store.content("OLD1")
    notice = new("NOTICE", content=Content.of(b"Subject: Delayed Mail\r\n\r\nlater\r\n"))
    await asyncio.gather(  # one loop turn: one batch
        store.finish(Delivered("OTHER", T0 + 3600, warned=True), [notice]),
        store.replace_requeued("OLD1", copy_of("OLD1", "NEW1", content, requeued.recipients), warned=True))
    assert {m.queue_id: m.warned for m in await store.take(T0 + 7200, 10)} == \
        {"NEW1": True, "OTHER": True, "NOTICE": False}


async def test_requeued_mail_is_listed_as_sound_in_the_maildrop_queue(store):
    """maildrop is a queue a row may name: the listings do not take it for a hand-edited value."""
    await store.insert(new("Q1"))
    await store.requeue_messages(["Q1"], T0)
    [row] = await store.message_page(queues=["maildrop"])
    assert (row.queue_id, row.queue, row.damage) == ("Q1", "maildrop", "")
    detail = await store.message_detail("Q1")
    assert (detail.queue, detail.damage) == ("maildrop", "")


async def test_requeues_waiting_are_counted_on_their_own_index(store):
    """Counted every second while a requeue waits: the marked messages only (a partial index), not a look at
    every incoming and active row (24 ms a count with 100 000 incoming)."""
    plan = await store._reader.fetchall("EXPLAIN QUERY PLAN " + requeue.REQUEUES_WAITING)
    details = " | ".join(row[-1] for row in plan)
    assert "INDEX message_requeue" in details, details
    await store.insert(new("Q1"))
    await store.insert(new("Q2"))
    await store.take(T0, 10)
    await store.requeue_messages(["Q1"], T0)
    assert await store.requeues_waiting() == 1


async def test_pickup_walks_the_maildrop_queue_oldest_requeue_first_on_its_index_without_a_sort(store):
    """A page is one range of the (queue, next_attempt) index after the last one's key: reading 100 000 requeued
    messages costs a page's rows each time, not a sort of them all (id order: a scan and a temporary B-tree each
    page, quadratic over the walk)."""
    plan = await store._reader.fetchall("EXPLAIN QUERY PLAN " + requeue.REQUEUED_PAGE, (0.0, "", 100))
    details = " | ".join(row[-1] for row in plan)
    assert "USING COVERING INDEX message_due" in details or "USING INDEX message_due" in details, details
    assert "TEMP B-TREE" not in details, details
    for qid, when in (("Q1", T0 + 30), ("Q2", T0 + 10), ("Q3", T0 + 20), ("Q4", T0 + 20)):
        await store.insert(new(qid))
        await store.requeue_messages([qid], when)
    walked, after = [], (-math.inf, "")
    while page := await store.requeued_messages(after=after, limit=1):
        walked.append(page[0].queue_id)
        after = (page[0].requeued_at, page[0].queue_id)
    assert walked == ["Q2", "Q3", "Q4", "Q1"]


async def test_an_active_message_requeued_reaches_the_maildrop_queue_when_its_attempt_ends(store):
    """No copy while a delivery may be under way: the message is marked, and the end of its attempt (or, after a
    crash, the start's recovery) moves it to maildrop instead of deferred (incoming)."""
    await store.insert(new("Q1", Recipient(0, "one@example.test", "one@example.test"),
                           Recipient(1, "two@example.test", "two@example.test")))
    await store.insert(new("Q2"))
    [q1, q2] = await store.take(T0, 10)
    await store.requeue_messages(["Q1", "Q2"], T0)
    assert await store.counts() == {"active": 2} and await store.requeues_waiting() == 2
    assert await store.requeued_messages() == []
    sent = RcptResult(q1.recipients[0], Outcome.SENT, "2.0.0", "ok")
    deferred = RcptResult(q1.recipients[1], Outcome.DEFERRED, "4.2.0", "busy")
    await store.finish(Delivered("Q1", T0 + 3600), results=[sent, deferred])
    assert await store.counts() == {"active": 1, "maildrop": 1} and await store.requeues_waiting() == 1
    [requeued] = await store.requeued_messages()
    assert [r.address for r in requeued.recipients] == ["two@example.test"]
    assert await store.recover() == 1  # Q2, active when the process stopped
    assert await store.counts() == {"maildrop": 2} and await store.requeues_waiting() == 0


async def test_a_requeued_message_that_owes_notices_queues_them_in_an_attempt_before_it_is_copied(store):
    """A recipient bounced (its notice owed), then the process stopped before the attempt's end queued the notice.
    Requeued (while active, or once recovered), the message does not go to maildrop, whose copy takes pending
    recipients only (the notice would be lost): it is incoming, marked, and the end of its next attempt queues the
    notice and then moves it to maildrop."""
    two = (Recipient(0, "gone@example.test", "gone@example.test"), Recipient(1, "later@example.test",
                                                                          "later@example.test"))
    await store.insert(new("Q1", *two))
    await store.insert(new("Q2", *two))
    taken = await store.take(T0, 10)
    for msg in taken:
        await store.record_results(msg.queue_id, [(RcptResult(msg.recipients[0], Outcome.BOUNCED, "5.1.1", "no"),
                                                   True)])
    await store.requeue_messages(["Q1"], T0)  # active: marked
    assert await store.recover() == 2  # (the process stopped: Q1 marked, Q2 not)
    await store.requeue_messages(["Q2"], T0)  # recovered, then requeued while no server runs
    assert await store.counts() == {"incoming": 2} and await store.requeues_waiting() == 2
    assert await store.requeued_messages() == []

    for msg in await store.take(T0, 10):
        assert [r.recipient.index for r in msg.owed] == [0] and [r.index for r in msg.recipients] == [1]
        notice = NewMessage(f"N{msg.queue_id}", "", T0, Content.of(b"Subject: failed\r\n\r\nx\r\n"),
                            (Recipient(0, "a@remote.test", "a@remote.test"),))
        await store.finish(Delivered(msg.queue_id, T0 + 3600, noticed=(0,)), [notice])
    assert await store.counts() == {"maildrop": 2, "incoming": 2}  # the notices queued; the messages to copy
    assert [[r.address for r in m.recipients] for m in await store.requeued_messages()] == [["later@example.test"]] * 2


async def test_a_hold_after_a_requeue_of_an_active_message_wins(store):
    """The operator's last word: held, the message stays held after its attempt, and once released it is
    delivered as any other, not requeued then."""
    await store.insert(new("Q1"))
    await store.take(T0, 10)
    await store.requeue_messages(["Q1"], T0)
    await store.hold_messages(["Q1"])
    await store.finish(Delivered("Q1", T0 + 60))
    assert await store.counts() == {"hold": 1}
    await store.release_messages(["Q1"], T0 + 60)
    await store.take(T0 + 60, 10)
    await store.finish(Delivered("Q1", T0 + 120))
    assert await store.counts() == {"deferred": 1}


async def test_the_copy_replaces_the_old_message_in_one_transaction_its_file_linked_anew(store, tmp_path):
    data = big_message(300_000)
    await store.insert(new("OLD1", content=spooled(tmp_path, data)))
    await store.requeue_messages(["OLD1"], T0)
    [requeued] = await store.requeued_messages()
    content = await store.content("OLD1")
    assert content is not None and not content.in_memory

    await store.replace_requeued("OLD1", copy_of("OLD1", "NEW1", content, requeued.recipients))
    assert await store.counts() == {"incoming": 1}
    assert await store.content("OLD1") is None and await store.recipients("OLD1") == []
    assert sorted(p.name for p in store.content_dir.iterdir()) == ["NEW1"]
    back = await store.content("NEW1")
    assert back is not None and back.to_bytes() == b"Received: again\r\n" + data
    [taken] = await store.take(T0, 10)
    assert (taken.queue_id, [r.address for r in taken.recipients]) == ("NEW1", ["b@example.test"])


async def test_the_copy_keeps_the_first_arrival_and_counts_its_lifetime_from_its_making(store):
    """Postfix's cleanup keeps a requeued file's time record (delay=) and writes a new create_time (the queue
    lifetime and backoff): `created`."""
    await store.insert(new("OLD1"))
    await store.requeue_messages(["OLD1"], T0 + 86400)
    [requeued] = await store.requeued_messages()
    copy = copy_of("OLD1", "NEW1", await store.content("OLD1"), requeued.recipients)
    await store.replace_requeued("OLD1", dataclasses.replace(copy, created=T0 + 86400))
    [taken] = await store.take(T0 + 86400, 10)
    assert (taken.arrival, taken.lifetime_base) == (T0, T0 + 86400)
    assert (await store.message_detail("NEW1")).arrival == T0


async def test_a_message_deleted_before_its_copy_commits_is_not_copied(store, tmp_path):
    await store.insert(new("OLD1"))
    await store.requeue_messages(["OLD1"], T0)
    [requeued] = await store.requeued_messages()
    await store.delete_messages(["OLD1"])
    copy = new("NEW1", *requeued.recipients, content=spooled(tmp_path, big_message(300_000)))  # (a file of its own)
    assert not await store.replace_requeued("OLD1", copy)
    assert await store.counts() == {} and await store.recipients("NEW1") == []
    assert list(store.content_dir.iterdir()) == []  # the copy's link went too


async def test_a_copy_of_a_deleted_message_does_not_fail_the_writes_it_shares_a_commit_with(store, caplog):
    """The copy of a message deleted meanwhile is undone inside the group commit's transaction: the other writes
    of its batch commit with it, not one by one after a failed batch (with an ERROR logged)."""
    await store.insert(new("OLD1"))
    await store.requeue_messages(["OLD1"], T0)
    [requeued] = await store.requeued_messages()
    content = await store.content("OLD1")
    await store.delete_messages(["OLD1"])
    commits = store._committer.commits
    replaced, _ = await asyncio.gather(
        store.replace_requeued("OLD1", copy_of("OLD1", "NEW1", content, requeued.recipients)),
        store.insert(new("OTHER1")))
    assert not replaced and await store.counts() == {"incoming": 1}
    assert store._committer.commits == commits + 1  # one batch, committed whole
    assert "a write failed on its own" not in caplog.text


KILLED_IN_THE_MIDDLE = textwrap.dedent("""
    import asyncio, os, signal, sys
    from mailflow.content import Content
    from mailflow.model import NewMessage
    from mailflow.store import Store, requeue

    def killed(con, old_id, new_id):  # the old rows deleted, the new ones written: the process dies, uncommitted
        con.execute("DELETE FROM message WHERE id = ?", (old_id,))
        con.execute("DELETE FROM recipient WHERE message_id = ?", (old_id,))
        os.kill(os.getpid(), signal.SIGKILL)

    requeue._replace_requeued = killed

    async def main():
        store = await Store.open(sys.argv[1])
        [old] = await store.requeued_messages()
        content = await store.content(old.queue_id)
        copy = NewMessage("NEW1", old.sender, old.arrival, Content((b"Received: again\\r\\n", *content.parts)),
                          old.recipients)
        await store.replace_requeued(old.queue_id, copy)

    asyncio.run(main())
""")


async def test_a_kill_in_the_middle_of_the_replacement_leaves_the_old_message_whole_and_no_copy(tmp_path):
    """The process is killed inside the transaction (the copy written and the old row deleted, not committed):
    the old message is still requeued, whole, and there is no copy; its hard link is swept at the next start,
    and the copy made then is the only one."""
    path = tmp_path / "q" / "queue.db"
    data = big_message(300_000)
    store = await Store.open(path)
    await store.insert(new("OLD1", content=spooled(tmp_path, data)))
    await store.requeue_messages(["OLD1"], T0)
    await store.close()

    child = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", KILLED_IN_THE_MIDDLE, str(path)],
                                    capture_output=True, timeout=30)
    assert child.returncode == -9, child.stderr.decode()
    store = await Store.open(path, owner=True)
    try:
        assert await store.counts() == {"maildrop": 1}
        await store.sweep()  # the copy's link into content/, made before its transaction, has no row
        assert sorted(p.name for p in store.content_dir.iterdir()) == ["OLD1"]
        [old] = await store.requeued_messages()
        content = await store.content("OLD1")
        assert content is not None and content.to_bytes() == data
        await store.replace_requeued("OLD1", copy_of("OLD1", "NEW1", content, old.recipients))
        assert await store.counts() == {"incoming": 1}
        assert (await store.content("NEW1")).to_bytes() == b"Received: again\r\n" + data
    finally:
        await store.close()


async def test_a_queue_of_schema_8_takes_requeued_mail_after_its_migration(tmp_path):
    """Schema 9 adds the maildrop queue to the message table's CHECK (a rebuild of the table): the rows of
    schema 8 and its index survive it, their queue lifetime counting from their arrival (`created`)."""
    path = tmp_path / "queue.db"
    store = await Store.open(path)
    await store.insert(new("Q1", client_attributes=ATTRIBUTES))
    await store.close()
    with sqlite3.connect(path) as db:  # the message table as schema 8 made it
        db.execute("UPDATE schema_version SET version = 8")
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'message'").fetchone()[0]
        v8 = re.sub(r",\s*--[^\n]*\n\s*requeue [^\n]*", "", sql.replace(", 'maildrop'", ""))
        v8 = re.sub(r"\n\s*created [^\n]*\n\s*--[^\n]*", "", v8)
        db.executescript(f"ALTER TABLE message RENAME TO m9; DROP INDEX message_due; {v8};"
                         f" INSERT INTO message SELECT {schema._MESSAGE_V8_COLUMNS} FROM m9; DROP TABLE m9;"
                         " CREATE INDEX message_due ON message (queue, next_attempt);")
        for column in ("expanded", "expansion", "owner", "diagnostic", "owned"):  # the recipient table of schema 8
            db.execute(f"ALTER TABLE recipient DROP COLUMN {column}")
        assert not {"requeue", "created"} & {row[1] for row in db.execute("PRAGMA table_info(message)")}
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE message SET queue = 'maildrop'")
    store = await Store.open(path)
    try:
        await store.requeue_messages(["Q1"], T0)
        [requeued] = await store.requeued_messages()
        assert requeued.client_attributes == ATTRIBUTES
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT arrival, created FROM message").fetchall() == [(T0, T0)]
        assert db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'message' AND type = 'index'"
                          " AND name = 'message_due'").fetchall() == [("message_due",)]


async def test_a_pickup_given_the_store_must_be_told_what_qmgr_has_in_hand(store, tmp_path):
    """No default of "nothing in hand" once it copies requeued mail: it would copy a message under delivery."""
    with pytest.raises(TypeError, match="in_hand"):
        Pickup(tmp_path, cleanup=None, myhostname="h.test", clock=SystemClock(), store=store)
    Pickup(tmp_path, cleanup=None, myhostname="h.test", clock=SystemClock(), store=store, in_hand=lambda qid: False)


async def test_requeue_all_takes_the_messages_there_as_it_starts_not_the_copies_made_meanwhile(store):
    """pickup copies requeued mail under new, larger ids while a long `requeue ALL` walks the queue in id order:
    the walk stops at the largest id of its start, so no copy is requeued (and copied) again."""
    for i in range(5):
        await store.insert(new(f"A{i}"))
    requeue_messages, copies = store.requeue_messages, iter(range(100))

    async def requeued_then_copied(ids, now):  # (as a running server's pickup would, between two chunks)
        await requeue_messages(ids, now)
        for old in await store.requeued_messages():
            copy = copy_of(old.queue_id, f"B{next(copies):02}", await store.content(old.queue_id), old.recipients)
            await store.replace_requeued(old.queue_id, copy)
    store.requeue_messages = requeued_then_copied
    done, _ = await qt.apply(store, qt.ACTIONS["requeue"], qt.Selection(), T0, io.StringIO(), chunk=2)
    assert done == 5 and sorted(await store.message_ids(queues=["incoming"])) == [f"B{i:02}" for i in range(5)]
