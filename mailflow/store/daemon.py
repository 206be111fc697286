"""`Store`: the queue database as the server uses it (the operator API is mixed in from operator.py, pickup's
side of a requeue from requeue.py).

Contract
- `Store.open(path)` opens (creating, or migrating an older queue) the database and its content directory;
  `close()` finishes every write already submitted, then closes. `owner=True` (the server, holding the queue's
  lock) also converts a queue made before auto_vacuum and keeps the database file 0600, whatever the umask (local
  users traverse the queue directory to reach the maildrop, so its known names must not be readable);
  `upgrade=False` (the operator tools) refuses an older
  queue instead of migrating it.
- `insert(msg)` returns only after the transaction is on disk (a durable commit): smtpd may then say 250. A
  message with a content file is durable whole: the file is fsynced, linked under its queue id and the
  directory fsynced before the transaction that adds its row commits; a failed commit removes the link.
  Content that is neither in memory nor one file part at the end is first copied into a spool file.
  `insert` may raise `Overloaded` (the write backlog is over its limit); `insert_many` (bulk loads) never does.
- `due(now, limit)`: up to `limit` messages due, new and deferred mail alternating, with their pending
  recipients, the recorded results whose notice is still owed and their client attributes; in the same reader
  hop, the content of the small ones, which `content()` hands out once each for a message `claim()` then took.
  A message whose rows hold values of the wrong kind (edited by hand: `arrival = 'x'`, an unknown recipient
  status, text that is not UTF-8) comes with stand-in values and `damage` saying what is wrong (store/damage.py):
  qmgr moves it to the corrupt queue instead of delivering it.
- `never_due()`: the deferred messages whose next_attempt is no number (text, a BLOB: by hand), which `due()`
  can never take (SQLite sorts them above every time), with what is wrong; qmgr sets them aside too.
- `claim(ids, now)` is an atomic taking of messages: only rows still incoming, or deferred and due, become
  `active`; it returns the ids it took.
- `take(now, limit)` is qmgr's scan: `due(now, limit)` and the claim of all of it, in one writer transaction
  (one hop; nothing can change between the read and the claim). Its content is handed out as due()'s. The rows
  of a big scan (more than DECODE_INLINE, or recipients past DECODE_INLINE_TEXT) become messages in a worker
  thread, outside the transaction. A message of more than RECIPIENTS_IN_SCAN recipients has them read apart,
  after the claim, RECIPIENT_SLICE rows a reader hop, each slice made into Recipients as it comes: what a scan
  holds beyond the messages it returns is a slice, not a second copy of a million recipients (their JSON text was
  the server's peak of memory). Nothing stops the rows changing between the claim and those reads: an
  operator's delete leaves fewer of them (the attempt then finds the message gone), and the attempt of a message
  qmgr still has in hand (held and released meanwhile, so claimed again) may record results (qmgr admits no such
  copy); a message whose recipients SQLite finds malformed (`corruption`)
  comes without them, damaged (qmgr sets it aside), and the others go; a read that fails otherwise gives the scan's
  claimed rows back as they were (each to its queue, due when it was) before the error is raised (a disk error,
  the store locked: the next scan tries them again); when that write fails too, the next take's (or claim's)
  transaction gives them back first (they would stay active, held by nobody, until the next start).
- `content(id)` returns the Content (its file part read lazily) or None when the row or its file is missing, or
  the file is not as long as the message's size says (damaged: qmgr moves it to corrupt);
  reads asked for in the same loop turn are one query. `reads` and `commits` count reader and writer hops;
  `watch_commits(f)` has `f(requests, seconds)` told of each commit (the metrics).
- `record_results(queue_id, rows)` marks recipients as each delivery job ends (Postfix's deliver_completed); a
  recipient whose failure/success notice is still owed keeps a flag until `finish()` queues the notices, clears
  the flags and defers or removes the message, all in one transaction. So a stop between the two repeats no
  delivery and loses no notice. Removing a message (`finish`, `delete_messages`) removes its content file
  after the commit; `finish` says whether there was a message left to remove (an operator may have deleted it).
  The rows of either's results are made ROWS_SLICE a loop turn (`_op_in_slices`: one message may have 100 000),
  the write sent once they all are.
- Durability: every write is on disk when it returns — what leads to a 250 (`insert`, `insert_many`) and what
  comes after it (claims, results, the end of an attempt with its notices, the destination snapshot,
  recovery). So each recipient's result is durable as soon as it is recorded: neither a killed process nor a
  power loss repeats a delivery whose result was recorded (Postfix's qmgr, which does not fsync a queue file
  after marking recipients done, can), and commits reach the disk in order. Results (`record_results`,
  `finish`) may linger: on an idle committer they wait up to engine.LINGER (2 ms) for new mail to share
  their commit, so a stop in that window repeats the delivery (never loses the mail).
- `recover()` at start-up moves messages left `active` by a crash back to `incoming` (to `maildrop` when an
  operator requeued them while active and they owe no notice: requeue.py): start-up is recovery (a message whose
  recipients are all done is finished by qmgr's next scan).
- `sweep()` (at server start, before anything is received) removes temporary spool files and content files
  whose row is gone: what a crash between a commit and an unlink left behind.
- `maintain()` gives free pages back and truncates the WAL after a burst.
- qmgr's view of the operator tools: `generation()` (bumped by every change a tool makes), `flush_requests()`,
  both in one read `operator_counters()`,
  `queue_states(ids)`; and its destination snapshot for them, `save_destinations()`. `queue_states_settled(ids)`
  answers once every write submitted before it is settled (cleanup follows an interrupted commit with it).
Failures raise `sqlite3.Error` with SQLite's own message (engine.py: what a failed batch does to its requests).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mailflow.config import DEFAULTS
from mailflow.content import MEMORY_LIMIT, Content, Spool
from mailflow.files import keep_private
from mailflow.model import (ClientAttributes, Delivered, NewMessage, Outcome, QueuedMessage, QueueId, OwnedFailure,
                            RcptResult, Recipient, replaced)
from mailflow.store.contents import CLIENT_COLUMNS, content_of, insert_ops, row_content, storable, sweep
from mailflow.store.damage import QUEUES, Columns, checked, sort_time, undecodable
from mailflow.store.engine import (BUSY_TIMEOUT, CONTENT_DIRECTORY, MAX_VARS, BatchLoader, GroupCommitter, Op,
                                   Reader, Writer, chunks, corruption, fetch_leniently, fetch_rows, marks, remove_ops)
from mailflow.store.operator import OperatorQueries
from mailflow.store.requeue import OWES_NOTICES, RequeueQueries

log = logging.getLogger("mailflow.store")


class Store(OperatorQueries, RequeueQueries):
    """The queue database. Open with `await Store.open(path)`; close with `await store.close()`."""

    def __init__(self, writer: Writer, reader: Reader, committer: GroupCommitter, content_dir: Path):
        self._writer = writer
        self._reader = reader
        self._committer = committer
        self._contents = BatchLoader(self._fetch_contents)
        self._scanned: dict[QueueId, Content] = {}  # small contents read by due(), for the ids claim() then took
        # _GIVE_BACK's rows a failed take could not write: the next take's (or claim's) transaction writes them first
        self._unreturned: list[tuple] = []
        self.content_dir = content_dir

    @classmethod
    async def open(cls, path: str | Path, *, batch_limit: int = DEFAULTS.queue.commit_batch_limit,
                   backlog_limit: int = DEFAULTS.queue.incoming_backlog_limit,
                   busy_timeout: float = BUSY_TIMEOUT, owner: bool = False, upgrade: bool = True) -> "Store":
        """`owner`: the caller holds the queue's lock (the server); only then is an old file converted to
        incremental vacuum, which needs the database to itself. `upgrade`: an older queue's schema is brought up
        to date; else it is refused (sqlite3.DatabaseError, "older than this mailflow"): the operator tools,
        which must not change it under an older server still running on it."""
        path = Path(path)
        (path.parent / CONTENT_DIRECTORY).mkdir(mode=0o700, parents=True, exist_ok=True)
        if owner:
            keep_private(path)
        writer, reader = Writer(path), Reader(path)
        try:
            await writer.call(writer.open, busy_timeout, owner, upgrade)  # first: it creates or migrates the schema
            await reader.open(busy_timeout)
        except BaseException:
            await reader.close()  # their threads would otherwise keep the process alive
            await writer.close()
            raise
        committer = GroupCommitter(writer, batch_limit, backlog_limit)
        return cls(writer, reader, committer, path.parent / CONTENT_DIRECTORY)

    async def close(self) -> None:
        await self._committer.stop()
        await self._reader.close()
        await self._writer.close()

    @property
    def commits(self) -> int:
        """Write transactions so far (each one writer thread hop)."""
        return self._committer.commits

    def watch_commits(self, on_commit) -> None:
        """`on_commit(requests, seconds)` is told of each group commit from now on (None: nobody)."""
        self._committer.on_commit = on_commit

    @property
    def reads(self) -> int:
        """Read calls so far (each one reader thread hop)."""
        return self._reader.hops

    # -- content files ----------------------------------------------------------------------------
    def new_spool(self, max_size: int | None = None) -> Spool:
        """Where a stage writes content as it arrives (kept in memory while small, else a file in content/)."""
        return Spool(self.content_dir, max_size=max_size)

    async def sweep(self) -> int:
        """Remove temporary spool files and content files without a row. Only at server start, before anything
        is received (a spool being written would go too). Returns how many files were removed."""
        kept = {qid for (qid,) in await self._reader.fetchall(
            "SELECT message_id FROM content WHERE file_offset IS NOT NULL")}
        return sweep(self.content_dir, kept)

    # -- writes ---------------------------------------------------------------------------------
    async def insert(self, msg: NewMessage) -> None:
        """Commit a new message (durably) in the incoming queue. May raise Overloaded."""
        await self.insert_many([msg], may_refuse=True)

    async def insert_many(self, messages: Sequence[NewMessage], *, may_refuse: bool = False) -> None:
        """Commit many new messages in one transaction (bulk loads: pickup, tests, benchmarks)."""
        temporaries: list[Spool] = []
        try:
            ready = [await storable(m, self.content_dir, temporaries) for m in messages]
            await self._committer.write(insert_ops(ready), may_refuse=may_refuse)
        finally:
            for spool in temporaries:
                spool.discard()

    async def claim(self, ids: Sequence[QueueId], now: float) -> list[QueueId]:
        """Take messages for delivery: each of `ids` still incoming, or deferred and due at `now`, becomes active,
        atomically. Returns the ids taken (an operator's hold or delete, or another taker, wins over a stale read).
        The rows a failed take could not give back are given back first, in the same transaction, as take() does:
        a give-back that reported an error but had committed would otherwise be written again by the next take,
        over this claim (the message handed out twice)."""
        taken = await self._after_give_backs(lambda con: _claim(con, list(ids), now))
        self._scanned = {qid: self._scanned[qid] for qid in taken if qid in self._scanned}
        return taken

    async def take(self, now: float, limit: int) -> list[QueuedMessage]:
        """qmgr's scan: what `due(now, limit)` returns, claimed (active) in the same transaction. The content
        read with it is handed out by `content()` as due()'s. When the messages cannot be made of the rows claimed
        (the read of a big one's recipients failed; but one SQLite finds corrupt is handed out damaged instead:
        `_recipients_or_damage`), the rows are given back as they were, each to the queue it
        came from, before the error is raised: nobody would hold them active until the next start. When that
        write fails too, the next take's transaction gives them back before its scan: only when qmgr calls take(),
        which it does not while it has no room (they stay active until then)."""
        rows = await self._after_give_backs(lambda con: _take(con, self._due_params(now, limit), limit, now))
        try:
            return await self._scan_result(rows)
        except Exception:
            await self._give_back_scanned([_as_scanned(row) for row in rows])
            raise

    async def _after_give_backs(self, call: Callable[[sqlite3.Connection], list]) -> list:
        """`call`'s result, run in a writer transaction that first gives back the rows a failed take could not
        (`_unreturned`); they are kept for the next one when the transaction fails."""
        unreturned, self._unreturned = self._unreturned, []
        try:
            return await self._committer.write([(_GIVE_BACK, unreturned)] if unreturned else [], call=call)
        except BaseException:
            self._unreturned = unreturned + self._unreturned
            raise

    async def _give_back_scanned(self, rows: list[tuple]) -> None:
        """_GIVE_BACK's `rows` written; kept for the next take's transaction when the write fails (the error that
        made them given back is the one raised)."""
        try:
            await self._committer.write([(_GIVE_BACK, rows)])
        except Exception as e:
            log.error("store: giving back %d claimed messages (%s) failed: %s; the next scan gives them back",
                      len(rows), _some_ids(row[-1] for row in rows), e)
            self._unreturned += rows

    async def record_results(self, queue_id: QueueId, rows: Sequence[tuple[RcptResult, bool]]) -> None:
        """Record what one delivery job did, as soon as it is back (lingering: see the module doc): each
        `(result, notice_owed)` marks its recipient sent / bounced, or keeps it pending with its last reason;
        `notice_owed` flags a recipient whose failure or success notice `finish()` must still queue. Only pending
        recipients change, so recording a result twice does no harm."""
        record = _record_op(queue_id, rows) if len(rows) <= ROWS_SLICE else \
            await _op_in_slices(lambda part: _record_op(queue_id, part), rows)
        await self._committer.write([record], linger=True)

    async def finish(self, done: Delivered, notices: Sequence[NewMessage] = (),
                     results: Sequence[RcptResult] = ()) -> bool:
        """The end of one attempt of a message, in one transaction: the attempt's `results` not recorded yet (as
        `record_results`; their notices are among `notices`), recipients past the queue lifetime become
        bounced, the owed notices (`done.noticed`) are cleared as `notices` are queued, and the message is
        deferred until `done.next_attempt`, or removed when that is None.

        A message deferred here stays where an operator put it meanwhile (hold, deleted): only an `active`
        message becomes `deferred` (`maildrop`, for pickup to copy, when an operator requeued it meanwhile), or a
        `deferred` one due before `done.next_attempt` (held and released during the attempt, not claimed since)
        gets that time, the attempt counted;
        `done.warned` is recorded wherever it is (its delay notice is queued here).
        Returns False when the message was gone already (an operator deleted it meanwhile: Postfix's qmgr finds no
        queue file to remove or to rename to deferred), else True.
        """
        qid = done.queue_id
        there: Callable[[sqlite3.Connection], bool] = partial(_deferred, done)  # (last, by the call: was it there?)
        if done.next_attempt is None:  # removed: what its recipient rows would have said goes with them
            *ops, (remove_message, _) = remove_ops([(qid,)])
            there = partial(_one_row, remove_message, qid)
        elif len(results) <= ROWS_SLICE and len(done.expired) <= ROWS_SLICE:
            ops = _deferral_ops(done, _unrecorded_op(qid, results), _expired_op(qid, done.expired))
        else:
            ops = _deferral_ops(done, await _op_in_slices(lambda part: _unrecorded_op(qid, part), results),
                                await _op_in_slices(lambda part: _expired_op(qid, part), done.expired))
        if notices:
            ops += insert_ops(notices)
        self._scanned.pop(qid, None)
        return await self._committer.write(ops, linger=True, call=there)

    async def give_back(self, queue_id: QueueId, next_attempt: float) -> None:
        """A message qmgr let go of after a scan claimed its row again while its attempt was under way (an operator
        released it meanwhile): the claim may have come after the end of the attempt was written (in the same
        commit, whose statements run before its calls), leaving the row active with nobody holding it. Still
        active, it is deferred until `next_attempt` (`maildrop` when requeued meanwhile; incoming, still marked,
        when it also owes notices, as `recover()` does), as `finish` would have done, but no attempt is counted
        (`finish` counted the attempt, or the claim was a stale one and made none); anywhere else (deferred by that
        `finish` already, held, gone) it stays."""
        self._scanned.pop(queue_id, None)
        await self._committer.write([(_GIVE_BACK, [("deferred", next_attempt, 0, queue_id)])])

    async def mark_corrupt(self, ids: Sequence[QueueId]) -> None:
        await self._committer.write([("UPDATE message SET queue = 'corrupt' WHERE id = ?", [(i,) for i in ids])])

    async def maintain(self, *, free_share: float = 0.25, min_free: int = 256) -> int:
        """Give space back after a burst: when at least `min_free` pages and `free_share` of the file are free,
        an incremental vacuum (a bounded number of pages per call) and a WAL truncation. Returns the pages freed."""
        return await self._writer.call(self._writer.maintain, free_share, min_free)

    async def recover(self) -> int:
        """Start-up: whatever was active when the process stopped is incoming again (maildrop, for pickup to copy,
        when an operator requeued it meanwhile; but one that still owes notices stays incoming, marked, so that
        the end of its next attempt queues them before it goes to maildrop). Returns how many."""
        [(n,)] = await self._reader.fetchall("SELECT count(*) FROM message WHERE queue = 'active'")
        await self._committer.write([(f"UPDATE message SET queue = CASE WHEN requeue AND NOT {OWES_NOTICES}"
                                      f" THEN 'maildrop' ELSE 'incoming' END, requeue = requeue AND {OWES_NOTICES},"
                                      " from_logged = 0 WHERE queue = 'active'", [()])])
        return n

    async def save_destinations(self, rows: Sequence[tuple], now: float,
                                gone: Sequence[tuple[str, str]] | None = None) -> None:
        """The destination snapshot: rows of (transport, nexthop, window, in_flight, queued, failures, dead_until,
        reason, paused_until), updated at `now`. `gone` None: `rows` replace it all; else they are the rows that
        changed and `gone` the (transport, nexthop) of those to remove (qmgr writes only what changed)."""
        clear = [("DELETE FROM destination", [()])] if gone is None else [
            ("DELETE FROM destination WHERE transport = ? AND nexthop = ?", list(gone))]
        await self._committer.write([
            *clear,
            ("INSERT OR REPLACE INTO destination (transport, nexthop, window, in_flight, queued, failures,"
             " dead_until, reason, paused_until, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [(*row, now) for row in rows]),
        ])

    # -- reads ----------------------------------------------------------------------------------
    async def due(self, now: float, limit: int) -> list[QueuedMessage]:
        """Up to `limit` messages due for delivery, new mail and deferred mail alternating (so a retry storm
        cannot starve fresh mail), each side oldest first. Two index range scans, never a full scan.

        One statement, one reader hop (`DUE`): the messages with their recipients (JSON) and the content of
        those held in their rows (up to SCAN_CONTENT_SIZE each, SCAN_CONTENT_BUDGET in all: half for new mail,
        half for deferred, each in its order); a message of more than RECIPIENTS_IN_SCAN recipients has them read
        after it, a hop each RECIPIENT_SLICE (`_with_recipients`).
        `content()` hands it out once, without a read of its own, for a message that `claim()` then took and
        `finish()` has not removed; the rest is dropped at the claim, and what is not asked for by the next
        `due()` then (a later `content()` reads the row)."""
        rows = await self._reader.fetchall(DUE, self._due_params(now, limit))
        return await self._scan_result(_due_order(rows, limit))

    @staticmethod
    def _due_params(now: float, limit: int) -> dict:
        return {"now": now, "limit": limit, "scan_size": SCAN_CONTENT_SIZE, "budget": SCAN_CONTENT_BUDGET // 2,
                "in_scan": RECIPIENTS_IN_SCAN}

    async def _scan_result(self, rows: list[tuple]) -> list[QueuedMessage]:
        """DUE rows (in due order) as messages; the content read with them is kept for `content()`. More than
        DECODE_INLINE rows (10 000 of them took 0.1 s), or recipients longer than DECODE_INLINE_TEXT in all (one
        message of 100 000 recipients, which virtual aliases may make, took 2 s), are decoded in a worker thread."""
        if len(rows) <= DECODE_INLINE and sum(len(row[_RECIPIENTS_AT] or "") for row in rows) <= DECODE_INLINE_TEXT:
            messages, scanned = _decoded(rows)
        else:
            messages, scanned = await asyncio.to_thread(_decoded, rows)
        self._scanned = scanned
        for at, row in enumerate(rows):
            if row[_RECIPIENTS_AT] is None:  # (more than RECIPIENTS_IN_SCAN: not in the row)
                messages[at] = await self._recipients_or_damage(messages[at])
        return messages

    async def _recipients_or_damage(self, message: QueuedMessage) -> QueuedMessage:
        """`_with_recipients`, or the message without them, damaged, when SQLite says their pages are malformed
        (`corruption`): qmgr sets it aside to the corrupt queue (Postfix's qmgr_active_corrupt of a queue file it
        cannot read) and delivers the others; raised, the error would give back the whole scan, and the next one
        would take the same message first and fail again, handing out nothing ever. Any other error is raised."""
        try:
            return await self._with_recipients(message)
        except sqlite3.DatabaseError as e:
            if not corruption(e):
                raise
            unreadable = f"its recipients cannot be read: {e}"
            return replaced(message, recipients=(), owed=(),
                            damage=f"{message.damage}; {unreadable}" if message.damage else unreadable)

    async def _with_recipients(self, message: QueuedMessage) -> QueuedMessage:
        """`message` (a DUE row of more than RECIPIENTS_IN_SCAN recipients) with its recipients, read
        RECIPIENT_SLICE rows a reader hop in envelope order and made into Recipients (and owed results) slice by
        slice: the rows as one JSON text (100 MB for 1 000 000 recipients, built by SQLite, then as a str, then
        decoded into lists) were the peak of the process's memory. These hops come after the message's row was read
        (in take(), after its claim), and nothing stops the rows changing in between: an operator's delete leaves
        fewer of them (the attempt then finds the message gone), and the attempt of a message qmgr still has in
        hand (held and released meanwhile, so claimed again) may record results; qmgr admits no such copy
        (its `_released_in_hand`, `_claimed_stale`). due() claims nothing: its hops read the rows as they are then."""
        pending: list[Recipient] = []
        owed: list[RcptResult] = []
        problems = [message.damage] if message.damage else []
        rows = await self._reader.fetchall(_FIRST_RECIPIENTS, (message.queue_id, RECIPIENT_SLICE))
        while True:
            _split_recipients(rows, pending, owed, problems)  # (in envelope order already: ORDER BY idx)
            if len(rows) < RECIPIENT_SLICE or type(rows[-1][0]) is not int:
                break  # (an idx that is no number sorts after them all, and makes the message damaged: set aside)
            rows = await self._reader.fetchall(_NEXT_RECIPIENTS, (message.queue_id, rows[-1][0], RECIPIENT_SLICE))
        return replaced(message, recipients=tuple(pending), owed=tuple(owed), damage="; ".join(problems))

    async def never_due(self) -> list[tuple[QueueId, str]]:
        """The messages no scan can ever take, each with what is wrong (set by hand, or a database made with its
        checks off): deferred ones whose next_attempt is text or a BLOB (SQLite sorts those above every number, so
        `next_attempt <= now` never holds and `due()` never sees them), and those in a queue that is none of
        QUEUES (no scan, listing or tool sees them). Index range scans (message_due: text and BLOBs sort after the
        numbers; the gaps between the queues' names), for qmgr's timed scans, not per message."""
        rows = await self._reader.fetchall(_NEVER_DUE)
        return [(qid, f"queue is {value!r}, not one of {', '.join(QUEUES)}" if misplaced
                 else checked((value,), _NEXT_ATTEMPT_KIND)[1]) for qid, misplaced, value in rows]

    async def next_due_time(self) -> float | None:
        rows = await self._reader.fetchall("SELECT min(next_attempt) FROM message WHERE queue = 'deferred'")
        earliest = sort_time(rows[0][0]) if rows and rows[0][0] is not None else None
        return earliest if earliest != float("inf") else None  # (only damaged rows: text sorts after numbers)

    async def content(self, queue_id: QueueId) -> Content | None:
        """The message content; None if the row or its file is missing (a corrupt entry). Read with `due()`
        for a small message just claimed, else in one query with the other reads asked for in this loop turn."""
        scanned = self._scanned.pop(queue_id, None)
        return scanned if scanned is not None else await self._contents.load(queue_id)

    async def queue_states_settled(self, ids: Sequence[QueueId]) -> dict[QueueId, str]:
        """`queue_states` once every write submitted before this call is settled (committed or failed): an empty
        write queued behind them is the barrier."""
        await self._committer.write([])
        return await self.queue_states(ids)

    async def queue_states(self, ids: Sequence[QueueId]) -> dict[QueueId, str]:
        """The queue each of `ids` is in now; an id missing from the answer was deleted."""
        out: dict[QueueId, str] = {}
        for chunk in chunks(list(ids), MAX_VARS):
            rows = await self._reader.fetchall(
                f"SELECT id, queue FROM message WHERE id IN ({marks(len(chunk))})", tuple(chunk))
            out.update(rows)
        return out

    async def generation(self) -> int:
        """The operator tools' change counter: a change bumps it, and qmgr rescans when it moves."""
        rows = await self._reader.fetchall("SELECT value FROM control WHERE key = 'generation'")
        return rows[0][0] if rows else 0

    async def flush_requests(self) -> int:
        """How many times `mailflow queue flush` ran: a change asks qmgr to revive dead destinations."""
        rows = await self._reader.fetchall("SELECT value FROM control WHERE key = 'flush'")
        return rows[0][0] if rows else 0

    async def operator_counters(self) -> tuple[int, int]:
        """(`generation()`, `flush_requests()`) in one read: what qmgr polls."""
        counters = dict(await self._reader.fetchall(
            "SELECT key, value FROM control WHERE key IN ('generation', 'flush')"))
        return counters.get("generation", 0), counters.get("flush", 0)

    async def counts(self) -> dict[str, int]:
        rows = await self._reader.fetchall("SELECT queue, count(*) FROM message GROUP BY queue")
        return {q: n for q, n in rows}

    async def recipients(self, queue_id: QueueId) -> list[tuple[str, str, str, str]]:
        """(address, status, dsn, reason) for every recipient of a message, in envelope order."""
        rows = await self._reader.fetchall(
            "SELECT address, status, dsn, reason FROM recipient WHERE message_id = ? ORDER BY idx", (queue_id,)
        )
        return [tuple(r) for r in rows]

    async def _fetch_contents(self, ids: Sequence[QueueId]) -> dict[QueueId, Content]:
        rows = await self._reader.fetchall(
            "SELECT c.message_id, c.data, c.body, c.file_offset, m.size FROM content c"
            f" LEFT JOIN message m ON m.id = c.message_id WHERE c.message_id IN ({marks(len(ids))})", tuple(ids))
        out = {}
        for qid, data, body, file_offset, size in rows:
            content = content_of(qid, data, body, file_offset, self.content_dir, size)
            if content is not None:
                out[qid] = content
        return out


# The columns DUE reads, each with its kind (store/damage.py): a message's, and each recipient's.
_MESSAGE_KINDS = Columns(("id", "text"), ("sender", "text"), ("arrival", "time"), ("size", "size"),
                         ("smtputf8", "flag"), ("body_type", "text"), ("attempts", "count"), ("envid", "text"),
                         ("ret", "text"), ("warned", "flag"), ("filter", "text"), ("from_logged", "flag"),
                         ("created", "time"),
                         *((name, "text") for name in CLIENT_COLUMNS))
_RECIPIENT_KINDS = Columns(("idx", "count"), ("address", "text"), ("original", "text"), ("notify", "text"),
                           ("orcpt", "text"), ("status", "status"), ("dsn", "text"), ("reason", "text"),
                           ("relay", "text"), ("relayed", "flag"), ("expanded", "text"), ("expansion", "text"),
                           ("owner", "text"), ("diagnostic", "text"), ("owned", "owned"))
# A recipient's columns in DUE's JSON; a BLOB (no code writes one; JSON cannot hold it, and the whole scan would fail)
# as {"blob": hex}, which damage.checked then names.
_RECIPIENT_COLUMNS = ", ".join(f"CASE typeof({c}) WHEN 'blob' THEN json_object('blob', hex({c})) ELSE {c} END"
                               for c in _RECIPIENT_KINDS.names)
_RECIPIENTS_AT = len(_MESSAGE_KINDS.names)  # a DUE row: the message's columns, its recipients (JSON), how many
_NRCPT_AT = _RECIPIENTS_AT + 1              # it had in all, side, next_attempt, the content row's data and body
_SIDE_AT = _NRCPT_AT + 1
_NEXT_ATTEMPT_KIND = Columns(("next_attempt", "time"))  # never_due()'s
# never_due(): a queue that is none of QUEUES, as ranges of the index message_due (below, between and above the
# names in order: numbers sort below text, BLOBs above it)
QUEUES_IN_ORDER = sorted(QUEUES)
_NO_QUEUE = " OR ".join([f"queue < '{QUEUES_IN_ORDER[0]}'", f"queue > '{QUEUES_IN_ORDER[-1]}'",
                         *(f"(queue > '{a}' AND queue < '{b}')" for a, b in zip(QUEUES_IN_ORDER, QUEUES_IN_ORDER[1:]))])
# never_due()'s one query: (id, 0, next_attempt) of each deferred message whose next_attempt is text or a BLOB
# (they sort after the numbers), then (id, 1, queue) of each in no queue of QUEUES; each part an index range scan
_NEVER_DUE = f"""
SELECT id, 0, next_attempt FROM message WHERE queue = 'deferred' AND next_attempt >= ''
UNION ALL
SELECT id, 1, queue FROM message WHERE {_NO_QUEUE}
"""
SCAN_CONTENT_SIZE = MEMORY_LIMIT  # bytes: a message kept in its row (this size at most) is read with due()
SCAN_CONTENT_BUDGET = 8 << 20  # bytes of content read with one due() at the most
DECODE_INLINE = 100  # rows of a due() or take() decoded on the event loop; more are decoded in a worker thread
DECODE_INLINE_TEXT = 64 << 10  # characters of their recipients' JSON (some 300 recipients) decoded on the loop
RECIPIENTS_IN_SCAN = 1000  # a message of more recipients has them read apart, not as JSON in its DUE row
RECIPIENT_SLICE = 2000  # rows of those a reader hop (`Store._with_recipients`)
# a recipient row still to do: pending, or with a notice owed (DUE's and _RECIPIENTS_TO_DO's)
_TO_DO = "(status NOT IN ('sent', 'bounced') OR notice = 1)"
# a slice of a message's recipients still to do, in envelope order (the primary key)
_RECIPIENTS_TO_DO = f"""
SELECT {_RECIPIENT_KINDS.select_list} FROM recipient
WHERE message_id = ? {{}} AND {_TO_DO} ORDER BY idx LIMIT ?
"""
_FIRST_RECIPIENTS = _RECIPIENTS_TO_DO.format("")
_NEXT_RECIPIENTS = _RECIPIENTS_TO_DO.format("AND idx > ?")  # (after the last one's idx, whatever its kind)


# due(): up to :limit new and up to :limit due deferred messages (each an index range scan on (queue,
# next_attempt)), each with its recipients still to do (pending, or with a notice owed) as a JSON array (NULL for a
# message of more than :in_scan recipients, read apart: `Store._with_recipients`), and the
# content of those kept in their rows (up to :scan_size each), each side in its own order until :budget bytes
# (the content rows of the others are not even read), and its count of recipients, done ones included (qmgr's
# `nrcpt=`). Rows come in any order: `side` (0 new, 1 deferred) and `next_attempt` order them; due() alternates the
# two sides.
DUE = f"""
SELECT {_MESSAGE_KINDS.select_list},
       CASE WHEN (SELECT count(*) FROM recipient WHERE message_id = m.id) <= :in_scan THEN
         (SELECT json_group_array(json_array({_RECIPIENT_COLUMNS})) FROM recipient
          WHERE message_id = m.id AND {_TO_DO}) END,
       (SELECT count(*) FROM recipient WHERE message_id = m.id),
       side, next_attempt, c.data, c.body
FROM (SELECT *, 0 AS side, sum(CASE WHEN size <= :scan_size THEN size ELSE 0 END)
                           OVER (ORDER BY next_attempt ROWS UNBOUNDED PRECEDING) AS scanned
      FROM (SELECT * FROM message WHERE queue = 'incoming' ORDER BY next_attempt LIMIT :limit)
      UNION ALL
      SELECT *, 1, sum(CASE WHEN size <= :scan_size THEN size ELSE 0 END)
                   OVER (ORDER BY next_attempt ROWS UNBOUNDED PRECEDING)
      FROM (SELECT * FROM message WHERE queue = 'deferred' AND next_attempt <= :now
            ORDER BY next_attempt LIMIT :limit)) AS m
LEFT JOIN content c ON m.size <= :scan_size AND m.scanned <= :budget AND c.message_id = m.id
                       AND c.file_offset IS NULL
"""


def _scan_order(row: tuple) -> tuple:
    """(side, next_attempt, id) of a DUE row; a next_attempt that is no time (a damaged row) sorts last."""
    return row[_SIDE_AT], sort_time(row[_SIDE_AT + 1]), row[0]


def _due_order(rows: list[tuple], limit: int) -> list[tuple]:
    """DUE rows as due() hands them out: new and deferred mail alternating, each oldest first, `limit` at most."""
    rows.sort(key=_scan_order)
    fresh = [row for row in rows if row[_SIDE_AT] == 0]
    return _alternate(fresh, rows[len(fresh):])[:limit]


def _take(con: sqlite3.Connection, params: dict, limit: int, now: float) -> list[tuple]:
    """Inside a transaction: the DUE rows due() would hand out, each claimed (read and claimed under the write
    lock: nothing can take them in between, so every one is claimed)."""
    rows = _due_order(_due_rows(con, params), limit)
    taken = set(_claim(con, [row[0] for row in rows], now))
    return [row for row in rows if row[0] in taken]


def _due_rows(con: sqlite3.Connection, params: dict) -> list[tuple]:
    """DUE's rows, on the writer's thread; a read that meets text which is not UTF-8 is made again leniently (that
    text then names its message damaged). A message whose id is such text is left out: it cannot be claimed (an
    id with surrogates cannot be bound), and stays where it is, listed as damaged by the queue tools."""
    try:
        return fetch_rows(con, DUE, params)
    except sqlite3.OperationalError as e:
        if not undecodable(e):
            raise
        return [row for row in fetch_leniently(con, DUE, params) if type(row[0]) is str]


def _decoded(rows: list[tuple]) -> tuple[list[QueuedMessage], dict[QueueId, Content]]:
    """DUE rows as messages, and the content read with them by queue id."""
    messages, scanned = [], {}
    for row in rows:
        message = _due_message(row)
        messages.append(message)
        if row[-2] is not None:
            scanned[message.queue_id] = row_content(row[-2], row[-1])
    return messages, scanned


def _due_message(row: tuple) -> QueuedMessage:
    """A row of DUE as a message: its pending recipients, and the recorded results whose notice is owed; with
    `damage` (and stand-ins) when a value is not of its kind."""
    pending: list[Recipient] = []
    owed: list[RcptResult] = []
    values, damage = checked(row[:_RECIPIENTS_AT], _MESSAGE_KINDS)
    problems = [damage] if damage else []
    text = row[_RECIPIENTS_AT]
    if text is not None:  # (None: more than RECIPIENTS_IN_SCAN, read apart: `Store._with_recipients`)
        suspect = type(text) is not str  # NotUtf8: the text of a recipient is not UTF-8
        _split_recipients(json.loads(text), pending, owed, problems, suspect=suspect)
    pending.sort(key=lambda r: r.index)  # (json_group_array keeps no order)
    owed.sort(key=lambda r: r.recipient.index)
    return _queued_message(values, pending, owed, row[_NRCPT_AT], "; ".join(problems))


def _split_recipients(rows: Iterable[Sequence], pending: list[Recipient], owed: list[RcptResult],
                      problems: list[str], *, suspect: bool = False) -> None:
    """Recipient rows (`_RECIPIENT_KINDS`) split into `pending` Recipients, `owed` results (recorded, their notice
    still owed) and `problems` (damaged rows), each in the rows' order. A pending recipient whose original is the
    one before's shares its str (an expanded list's members, in a row: one str, not one each)."""
    previous = None
    for fields in rows:
        fields, damage = checked(fields, _RECIPIENT_KINDS, suspect=suspect)
        if damage:
            problems.append(f"recipient {fields[0]}: {damage}")
        elif fields[5] == "pending":
            index, address, original, notify, orcpt = fields[:5]
            if original == previous:
                original = previous
            previous = original
            pending.append(Recipient(index, address, original, notify, orcpt))
        else:
            owed.append(_recorded_result(fields))


async def _op_in_slices(make: Callable[[Sequence], Op], items: Sequence) -> Op:
    """`make(items)` ROWS_SLICE items a loop turn: the statement, with the rows made from every slice (those of
    100 000 results, made in one turn, held the loop 0.4 s)."""
    sql, rows = make(items[:ROWS_SLICE])
    for start in range(ROWS_SLICE, len(items), ROWS_SLICE):
        await asyncio.sleep(0)
        rows += make(items[start:start + ROWS_SLICE])[1]
    return sql, rows


def _unrecorded_op(queue_id: QueueId, results: Sequence[RcptResult]) -> Op:
    """The results of an attempt's end not recorded yet, as `record_results` records them (their notices are queued
    with them)."""
    return _record_op(queue_id, [(r, False) for r in results])


def _expired_op(queue_id: QueueId, expired: Sequence[RcptResult]) -> Op:
    return ("UPDATE recipient SET status = 'bounced', dsn = ?, reason = ?, relay = ?, notice = 0"
            " WHERE message_id = ? AND idx = ? AND status = 'pending'",
            [(r.dsn, r.text, r.relay, queue_id, r.recipient.index) for r in expired])


def _deferral_ops(done: Delivered, unrecorded: Op, expired: Op) -> list[Op]:
    """`finish` for a message that stays: the results not recorded yet (`_unrecorded_op`), the expired
    (`_expired_op`) and noticed recipients; the message is deferred after them (`_deferred`)."""
    qid = done.queue_id
    ops: list[Op] = [unrecorded]  # first: the statements below see these
    if expired[1]:
        ops.append(expired)
    if done.noticed:
        ops.append(("UPDATE recipient SET notice = 0 WHERE message_id = ? AND idx = ?",
                    [(qid, i) for i in done.noticed]))
    if done.warned:  # wherever the message is now: the notice is queued with this transaction, and goes once
        ops.append(("UPDATE message SET warned = 1 WHERE id = ?", [(qid,)]))
    return ops


def _deferred(done: Delivered, con: sqlite3.Connection) -> bool:
    """The message of `done` deferred (`_DEFER_ACTIVE`, else `_DEFER_RELEASED`; inside the transaction of its
    `_deferral_ops`); whether its row was there (an operator's delete: not)."""
    if con.execute(_DEFER_ACTIVE, (done.next_attempt, done.queue_id)).rowcount:
        return True  # (the common case: one statement)
    con.execute(_DEFER_RELEASED, (done.next_attempt, done.queue_id, done.next_attempt))
    return con.execute("SELECT 1 FROM message WHERE id = ?", (done.queue_id,)).fetchone() is not None


# The end of an attempt of an active message: deferred (to maildrop when an operator requeued it while it was active:
# for pickup to copy), the attempt counted; one an operator moved meanwhile (hold, deleted) stays where it is.
_DEFER_ACTIVE = ("UPDATE message SET queue = CASE WHEN requeue THEN 'maildrop' ELSE 'deferred' END, requeue = 0,"
                 " next_attempt = ?, attempts = attempts + 1, from_logged = 0 WHERE id = ? AND queue = 'active'")

# A claimed row given back (`give_back`, a failed `take`): as _DEFER_ACTIVE, the attempt not counted again; but no
# notice was queued, so one an operator requeued that still owes notices goes to incoming, marked, as at `recover()`
# (in maildrop, pickup would copy only its pending recipients and the notices would be lost: requeue.py).
# Its parameters: the queue it goes back to (unless requeued), its next_attempt (None: kept), from_logged, the id.
_GIVE_BACK = (f"UPDATE message SET queue = CASE WHEN NOT requeue THEN ? WHEN {OWES_NOTICES} THEN 'incoming'"
              f" ELSE 'maildrop' END, requeue = requeue AND {OWES_NOTICES}, next_attempt = coalesce(?, next_attempt),"
              " from_logged = ? WHERE id = ? AND queue = 'active'")
_SIDES = ("incoming", "deferred")  # a DUE row's `side`: the queue it was claimed from
_FROM_LOGGED_AT = _MESSAGE_KINDS.names.index("from_logged")


def _some_ids(ids: Iterable[str], shown: int = 10) -> str:
    """The first `shown` queue ids, for a log line about several messages (and how many more)."""
    listed = list(itertools.islice(ids, shown + 1))
    more = " and more" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more


def _as_scanned(row: tuple) -> tuple:
    """_GIVE_BACK's parameters for a DUE row claimed by a take that could not hand it out: the row as it was before
    the claim, in its own queue (new mail stays new: no deferral a queue listing would show, no change of side in
    the alternation), due when it was, its from= line owed or not as before (new mail's was logged by cleanup)."""
    from_logged = row[_FROM_LOGGED_AT]
    return _SIDES[row[_SIDE_AT]], None, from_logged if type(from_logged) is int else 0, row[0]

# The end of an attempt of a message an operator held and released while it was in hand, and that no scan claimed
# since (no room): deferred and due at the release's time, it is deferred as the end means, the attempt counted. (A
# row the first statement deferred is not due before that time: left alone.)
_DEFER_RELEASED = ("UPDATE message SET next_attempt = ?, attempts = attempts + 1"
                   " WHERE id = ? AND queue = 'deferred' AND next_attempt < ?")


def _one_row(sql: str, queue_id: QueueId, con: sqlite3.Connection) -> bool:
    """`sql` run for `queue_id` (inside a transaction); whether it changed a row."""
    return con.execute(sql, (queue_id,)).rowcount == 1


def _claim(con: sqlite3.Connection, ids: list[QueueId], now: float) -> list[QueueId]:
    """incoming, or deferred and due -> active (inside a transaction); the ids that moved. One statement per id:
    cheaper than an IN list with RETURNING, and each row count says whether that id was taken."""
    sql = ("UPDATE message SET queue = 'active', from_logged = 1 WHERE id = ?"
           " AND (queue = 'incoming' OR (queue = 'deferred' AND next_attempt <= ?))")
    return [qid for qid in ids if con.execute(sql, (qid, now)).rowcount == 1]


ROWS_SLICE = 2000  # rows of one write's results made before the loop is handed back (`_op_in_slices`)
_STATUS = {Outcome.SENT: "sent", Outcome.BOUNCED: "bounced", Outcome.DEFERRED: "pending"}
_OUTCOME = {status: outcome for outcome, status in _STATUS.items()}


def _recorded_result(row) -> RcptResult:
    (idx, address, original, notify, orcpt, status, dsn, reason, relay, relayed, expanded, expansion, owner,
     diagnostic, owned) = row
    return RcptResult(Recipient(idx, address, original, notify, orcpt), _OUTCOME[status], dsn, reason, relay,
                      relayed=bool(relayed), expanded=expanded, expansion=expansion, owner=owner, diagnostic=diagnostic,
                      owned=_owned_of(owned))


def _owned_text(owned: tuple[OwnedFailure, ...]) -> str:
    """RcptResult.owned as the recipient row keeps it: a JSON array of arrays, '' for none (almost every row)."""
    return json.dumps([list(f) for f in owned]) if owned else ""


def _owned_of(text: str) -> tuple[OwnedFailure, ...]:
    """RcptResult.owned from its column ('' none), checked already (damage.checked: a value that is not what
    _owned_text writes makes the message damaged, as a bad column does, rather than its lists' failures going to
    the sender unsaid)."""
    return tuple(OwnedFailure(*f) for f in json.loads(text)) if text else ()


def _record_op(queue_id: QueueId, rows: Sequence[tuple[RcptResult, bool]]) -> Op:
    """Recipients' results; only pending rows change, so a result recorded twice does no harm. Every write that
    holds it holds it first: a batch merges a statement into its first executemany of it at or after where the
    request's previous statement went, so as every request's first statement they all share one."""
    return ("UPDATE recipient SET status = ?, dsn = ?, reason = ?, relay = ?, notice = ?, relayed = ?, expanded = ?,"
            " expansion = ?, owner = ?, diagnostic = ?, owned = ?"
            " WHERE message_id = ? AND idx = ? AND status = 'pending'",
            [(_STATUS[r.outcome], r.dsn, r.text, r.relay, int(owed), int(r.relayed), r.expanded, r.expansion, r.owner,
              r.diagnostic, _owned_text(r.owned), queue_id, r.recipient.index) for r, owed in rows])


def _queued_message(row: Sequence, recipients, owed, nrcpt: int, damage: str = "") -> QueuedMessage:
    (qid, sender, arrival, size, utf8, body_type, attempts, envid, ret, warned, content_filter, from_logged,
     created) = row[:13]
    return QueuedMessage(qid, sender, arrival, size, bool(utf8), body_type, attempts, tuple(recipients),
                         envid=envid, ret=ret, warned=bool(warned), owed=tuple(owed), content_filter=content_filter,
                         client_attributes=ClientAttributes(*row[13:]), from_logged=bool(from_logged), nrcpt=nrcpt,
                         damage=damage, created=None if created == arrival else created)  # (None: the arrival)


def _alternate(first: list, second: list) -> list:
    out: list = []
    for i in range(max(len(first), len(second))):
        out.extend(side[i] for side in (first, second) if i < len(side))
    return out
