"""The durable queue: SQLite in WAL mode, one writer, group commit. The only module that speaks SQL.

What it owns
- `message`, `recipient` and `content` rows (schema.sql) and the queue state of every message.
- One writer connection on a thread of its own (`_Writer`: a whole transaction per call). Every write goes
  through `_GroupCommitter`: requests that arrive while a commit is
  running are merged into the next transaction, so N concurrent sessions cost one fsync, not N.
  Requests in one batch must be independent: a caller waits for its request before sending one that
  depends on it (every caller here does, because each write is awaited).
- One reader connection (WAL lets it read while the writer writes). Content reads arriving in the same
  loop turn are coalesced into one query (`_BatchLoader`).
- Message content (`mailflow.content.Content`). A message up to MEMORY_LIMIT bytes lives in its `content` row:
  `data` (the header section cleanup wrote) and `body` (the rest), two BLOBs so that neither is copied into
  the other. A bigger one keeps `data` in the row and the rest in the file `content/<queue id>` beside the
  database (`file_offset`: where the rest starts in it). That file is a hard link to the spool file the
  message arrived in (or, for a forwarded copy, to the original's file): queuing never copies a big message.
  `new_spool(max_size)` gives the spool a stage writes arriving content to (`mailflow.content.Spool`).

Contract
- `insert(msg)` returns only after the transaction is on disk (`synchronous=FULL`): smtpd may then say 250.
  A message with a content file is durable whole: the file is fsynced, linked under its queue id and the
  directory fsynced before the transaction that adds its row commits; a failed commit removes the link.
  Content that is neither in memory nor one file part at the end is first copied into a spool file.
- `content(id)` returns the Content (its file part read lazily) or None when the row or its file is missing.
- Removing a message (`record`, `delete_messages`) removes its content file after the commit.
- `sweep()` (at server start, before anything is received) removes temporary spool files and content files
  whose row is gone: what a crash between a commit and an unlink left behind.
- `recover()` at start-up moves messages left `active` by a crash back to `incoming`: start-up is recovery.
- Failures raise `sqlite3.Error` (or `Overloaded` when the write backlog is over its limit); nothing is
  half-written, because each batch is one transaction that is rolled back whole on error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import aiosqlite

from mailflow.content import Content, FilePart, Spool, is_spool_name
from mailflow.model import Delivered, Outcome, QueuedMessage, QueueId, Recipient

log = logging.getLogger("mailflow.store")

SCHEMA_VERSION = 2
_MAX_VARS = 500  # ids per IN (...) query
CONTENT_DIRECTORY = "content"  # beside the database: content files of big messages, temporary spool files
# Pseudo-statements the writer handles itself: link content files in before the transaction, unlink after.
_LINK_CONTENT = "-- link content files"
_DELETE_CONTENT = "DELETE FROM content WHERE message_id = ?"


class Overloaded(Exception):
    """Too many writes are waiting: the caller should answer 451 and let the client retry."""


@dataclass(frozen=True)
class NewMessage:
    """A message as cleanup commits it. Recipient indexes are their positions in `recipients`."""

    queue_id: QueueId
    sender: str
    arrival: float
    content: Content
    recipients: tuple[Recipient, ...]
    smtputf8: bool = False
    body_type: str = "7BIT"
    client: str = ""
    envid: str = ""
    ret: str = ""
    queue: str = "incoming"  # "hold": committed on hold (an smtpd HOLD restriction); qmgr leaves it alone


_Op = tuple[str, list[tuple]]


class _Writer:
    """The one writing connection, on a thread of its own: each call runs a whole transaction there.

    aiosqlite hops to its thread once per statement, which would keep a transaction open across event-loop
    turns (a stalled loop would then hold the database lock against the operator tools). Here a batch is
    `BEGIN IMMEDIATE; executemany…; COMMIT` in one call, so the lock is held only while SQLite works.
    """

    def __init__(self, path: Path):
        self._path = path
        self._content_dir = path.parent / CONTENT_DIRECTORY
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._con: sqlite3.Connection | None = None

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def open(self) -> None:
        con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            con.execute("PRAGMA busy_timeout = 5000")
            _migrate(con)
        except BaseException:
            con.close()
            raise
        self._con = con

    def transaction(self, merged: dict[str, list[tuple]]) -> None:
        """One transaction. Content files are linked in (and the directory fsynced) before it, so a committed
        row always has its file; they are unlinked again if it fails. Files of removed content go after it."""
        con = self._con
        linked = self._link_contents(merged.get(_LINK_CONTENT, ()))
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in merged.items():
                    if rows and sql != _LINK_CONTENT:
                        con.executemany(sql, rows)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except BaseException:
            for path in linked:
                path.unlink(missing_ok=True)
            raise
        for (queue_id,) in merged.get(_DELETE_CONTENT, ()):
            try:
                (self._content_dir / queue_id).unlink()
            except FileNotFoundError:
                pass  # held in the database
            except OSError as e:
                log.error("store: cannot remove content file %s: %s (removed at the next start)", queue_id, e)

    def _link_contents(self, rows) -> list[Path]:
        """Hard-link each (source file, queue id) in as content/<queue id>; one fsync of the directory."""
        linked: list[Path] = []
        try:
            for source, queue_id in rows:
                target = self._content_dir / queue_id
                os.link(source, target)  # FileExistsError: the name is another message's; never replaced
                linked.append(target)
            if linked:
                _fsync_path(self._content_dir)
        except BaseException:
            for path in linked:
                path.unlink(missing_ok=True)
            raise
        return linked

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


class _GroupCommitter:
    """Runs write requests (lists of `(sql, rows)`) in shared transactions, one commit per batch."""

    def __init__(self, writer: _Writer, batch_limit: int, backlog_limit: int):
        self._writer = writer
        self._batch_limit = batch_limit
        self._backlog_limit = backlog_limit
        self._pending: asyncio.Queue[tuple[list[_Op], asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.commits = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        """Finish every request already submitted, then stop."""
        await self._pending.join()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def backlog(self) -> int:
        return self._pending.qsize()

    async def write(self, ops: list[_Op], *, may_refuse: bool = False) -> None:
        if may_refuse and self._pending.qsize() >= self._backlog_limit:
            raise Overloaded()
        fut = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((ops, fut))
        await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self._batch_limit and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._pending.task_done()

    async def _commit(self, batch: list[tuple[list[_Op], asyncio.Future]]) -> None:
        try:
            await self._run_transaction([ops for ops, _ in batch])
        except Exception as e:
            if len(batch) == 1:
                log.error("store: write failed: %s", e)
                _settle(batch[0][1], e)
                return
            # One bad request must not fail the innocent ones that shared its batch: retry each alone.
            for ops, fut in batch:
                try:
                    await self._run_transaction([ops])
                except Exception as one:
                    log.error("store: write failed: %s", one)
                    _settle(fut, one)
                else:
                    _settle(fut, None)
            return
        for _, fut in batch:
            _settle(fut, None)

    async def _run_transaction(self, requests: list[list[_Op]]) -> None:
        """Every statement's rows from every request, one executemany per statement, one commit."""
        merged: dict[str, list[tuple]] = {}
        for ops in requests:
            for sql, rows in ops:
                merged.setdefault(sql, []).extend(rows)
        await self._writer.call(self._writer.transaction, merged)
        self.commits += 1


def _settle(fut: asyncio.Future, error: Exception | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class _BatchLoader:
    """Coalesces `load(key)` calls made in the same loop turn into one `fetch_many(keys)` call."""

    def __init__(self, fetch_many):
        self._fetch_many = fetch_many
        self._waiting: dict[str, list[asyncio.Future]] = {}
        self._scheduled = False
        self._flushes: set[asyncio.Task] = set()  # keep a reference until each flush is done

    async def load(self, key: str):
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(fut)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await fut

    def _start_flush(self) -> None:
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        waiting, self._waiting, self._scheduled = self._waiting, {}, False
        keys = list(waiting)
        try:
            found: dict = {}
            for chunk in _chunks(keys, _MAX_VARS):
                found.update(await self._fetch_many(chunk))
        except Exception as e:
            for futs in waiting.values():
                for f in futs:
                    f.done() or f.set_exception(e)
            return
        for key, futs in waiting.items():
            for f in futs:
                f.done() or f.set_result(found.get(key))


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Store:
    """The queue database. Open with `await Store.open(path)`; close with `await store.close()`."""

    def __init__(self, writer: _Writer, reader: aiosqlite.Connection, committer: _GroupCommitter, content_dir: Path):
        self._writer = writer
        self._reader = reader
        self._committer = committer
        self._contents = _BatchLoader(self._fetch_contents)
        self.content_dir = content_dir

    @classmethod
    async def open(cls, path: str | Path, *, batch_limit: int = 500, backlog_limit: int = 5000) -> "Store":
        path = Path(path)
        (path.parent / CONTENT_DIRECTORY).mkdir(mode=0o700, parents=True, exist_ok=True)
        writer = _Writer(path)
        try:
            await writer.call(writer.open)
            reader = await aiosqlite.connect(path)
        except BaseException:
            await writer.call(writer.close)
            writer.shutdown()  # its thread would otherwise keep the process alive
            raise
        await reader.execute("PRAGMA query_only = ON")
        await reader.execute("PRAGMA busy_timeout = 5000")
        committer = _GroupCommitter(writer, batch_limit, backlog_limit)
        committer.start()
        return cls(writer, reader, committer, path.parent / CONTENT_DIRECTORY)

    async def close(self) -> None:
        await self._committer.stop()
        await self._reader.close()
        await self._writer.call(self._writer.close)
        self._writer.shutdown()

    @property
    def commits(self) -> int:
        return self._committer.commits

    # -- content files ----------------------------------------------------------------------------
    def new_spool(self, max_size: int | None = None) -> Spool:
        """Where a stage writes content as it arrives (kept in memory while small, else a file in content/)."""
        return Spool(self.content_dir, max_size=max_size)

    async def sweep(self) -> int:
        """Remove temporary spool files and content files without a row. Only at server start, before anything
        is received (a spool being written would go too). Returns how many files were removed."""
        kept = {qid for (qid,) in await self._reader.execute_fetchall(
            "SELECT message_id FROM content WHERE file_offset IS NOT NULL")}
        removed = 0
        for entry in os.scandir(self.content_dir):
            if is_spool_name(entry.name) or entry.name not in kept:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError as e:
                    log.error("store: cannot remove %s: %s", entry.path, e)
        if removed:
            log.info("store: removed %d content files left by an earlier run", removed)
        return removed

    async def _storable(self, msg: NewMessage, temporaries: list[Spool]) -> NewMessage:
        """`msg` with content the writer can link in: its file part (if any) last, whole, in content/, and
        fsynced. Anything else is copied into a new spool file first (added to `temporaries`)."""
        content = msg.content
        if content.in_memory:
            return msg
        if not _linkable(content, self.content_dir):
            head = b"".join(p for p in _leading_bytes(content.parts))
            spool = Spool(self.content_dir, memory_limit=0)
            temporaries.append(spool)
            async for chunk in content.after(len(head)).stream():
                spool.append(chunk)
                await spool.drain()
            content = Content((head, *(await spool.finish()).parts))
            msg = dataclasses.replace(msg, content=content)
        await asyncio.to_thread(_fsync_path, content.parts[-1].path)
        return msg

    # -- writes ---------------------------------------------------------------------------------
    async def insert(self, msg: NewMessage) -> None:
        """Commit a new message (durably) in the incoming queue. May raise Overloaded."""
        await self.insert_many([msg], may_refuse=True)

    async def insert_many(self, messages: Sequence[NewMessage], *, may_refuse: bool = False) -> None:
        """Commit many new messages in one transaction (bulk loads: pickup, tests, benchmarks)."""
        temporaries: list[Spool] = []
        try:
            ready = [await self._storable(m, temporaries) for m in messages]
            await self._committer.write(_insert_ops(ready), may_refuse=may_refuse)
        finally:
            for spool in temporaries:
                spool.discard()

    async def activate(self, ids: Sequence[QueueId]) -> None:
        """Move messages into the active queue (qmgr has taken them in hand)."""
        await self._committer.write([("UPDATE message SET queue = 'active' WHERE id = ?", [(i,) for i in ids])])

    async def record(self, outcomes: Sequence[Delivered], notices: Sequence[NewMessage] = ()) -> None:
        """Record delivery attempts in one transaction: recipient results, then defer or remove each message,
        and queue the `notices` (bounces, delay warnings) those results call for, so none is lost between.

        A message deferred here stays where an operator put it meanwhile (hold, deleted): only an `active`
        message becomes `deferred`.
        """
        rcpt_rows, defer_rows, remove_rows = [], [], []
        for d in outcomes:
            for r in d.results:
                status = {Outcome.SENT: "sent", Outcome.BOUNCED: "bounced", Outcome.DEFERRED: "pending"}[r.outcome]
                rcpt_rows.append((status, r.dsn, r.text, d.queue_id, r.recipient.index))
            if d.next_attempt is None:
                remove_rows.append((d.queue_id,))
            else:
                defer_rows.append((d.next_attempt, int(d.warned), d.queue_id))
        await self._committer.write([
            ("UPDATE recipient SET status = ?, dsn = ?, reason = ? WHERE message_id = ? AND idx = ?", rcpt_rows),
            ("UPDATE message SET queue = 'deferred', next_attempt = ?, attempts = attempts + 1,"
             " warned = max(warned, ?) WHERE id = ? AND queue = 'active'", defer_rows),
            *_remove_ops(remove_rows),
            *_insert_ops(notices),
        ])

    async def mark_corrupt(self, ids: Sequence[QueueId]) -> None:
        await self._committer.write([("UPDATE message SET queue = 'corrupt' WHERE id = ?", [(i,) for i in ids])])

    async def recover(self) -> int:
        """Start-up: whatever was active when the process stopped is incoming again. Returns how many."""
        async with self._reader.execute("SELECT count(*) FROM message WHERE queue = 'active'") as cur:
            (n,) = await cur.fetchone()
        await self._committer.write([("UPDATE message SET queue = 'incoming' WHERE queue = 'active'", [()])])
        return n

    # -- reads ----------------------------------------------------------------------------------
    async def due(self, now: float, limit: int) -> list[QueuedMessage]:
        """Up to `limit` messages due for delivery, new mail and deferred mail alternating (so a retry storm
        cannot starve fresh mail), each side oldest first. Two index range scans, never a full scan."""
        fresh = await self._reader.execute_fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE queue = 'incoming' ORDER BY next_attempt LIMIT ?",
            (limit,))
        retry = await self._reader.execute_fetchall(
            f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE queue = 'deferred' AND next_attempt <= ?"
            " ORDER BY next_attempt LIMIT ?", (now, limit))
        rows = _alternate(fresh, retry)[:limit]
        pending = await self._pending_recipients([r[0] for r in rows])
        return [_queued_message(row, pending.get(row[0], ())) for row in rows]

    async def next_due_time(self) -> float | None:
        rows = await self._reader.execute_fetchall("SELECT min(next_attempt) FROM message WHERE queue = 'deferred'")
        return rows[0][0] if rows else None

    async def content(self, queue_id: QueueId) -> Content | None:
        """The message content; None if the row or its file is missing (a corrupt entry)."""
        return await self._contents.load(queue_id)

    async def queue_states(self, ids: Sequence[QueueId]) -> dict[QueueId, str]:
        """The queue each of `ids` is in now; an id missing from the answer was deleted."""
        out: dict[QueueId, str] = {}
        for chunk in _chunks(list(ids), _MAX_VARS):
            rows = await self._reader.execute_fetchall(
                f"SELECT id, queue FROM message WHERE id IN ({_marks(len(chunk))})", tuple(chunk))
            out.update(rows)
        return out

    async def generation(self) -> int:
        """The operator tools' change counter (see `bump_generation`)."""
        rows = await self._reader.execute_fetchall("SELECT value FROM control WHERE key = 'generation'")
        return rows[0][0] if rows else 0

    async def bump_generation(self) -> None:
        """Tell a running qmgr that the queue was changed from outside: it rescans within a second."""
        await self._committer.write([(
            "INSERT INTO control (key, value) VALUES ('generation', 1)"
            " ON CONFLICT (key) DO UPDATE SET value = value + 1", [()])])

    async def save_destinations(self, rows: Sequence[tuple], now: float) -> None:
        """Replace the destination snapshot: rows of (transport, nexthop, window, in_flight, queued, failures,
        dead_until, reason)."""
        await self._committer.write([
            ("DELETE FROM destination", [()]),
            ("INSERT INTO destination (transport, nexthop, window, in_flight, queued, failures, dead_until,"
             " reason, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*row, now) for row in rows]),
        ])

    async def counts(self) -> dict[str, int]:
        rows = await self._reader.execute_fetchall("SELECT queue, count(*) FROM message GROUP BY queue")
        return {q: n for q, n in rows}

    async def recipients(self, queue_id: QueueId) -> list[tuple[str, str, str, str]]:
        """(address, status, dsn, reason) for every recipient of a message, in envelope order."""
        rows = await self._reader.execute_fetchall(
            "SELECT address, status, dsn, reason FROM recipient WHERE message_id = ? ORDER BY idx", (queue_id,)
        )
        return [tuple(r) for r in rows]

    async def _pending_recipients(self, ids: list[QueueId]) -> dict[QueueId, list[Recipient]]:
        out: dict[QueueId, list[Recipient]] = {}
        for chunk in _chunks(ids, _MAX_VARS):
            rows = await self._reader.execute_fetchall(
                f"SELECT message_id, idx, address, original, notify, orcpt FROM recipient"
                f" WHERE status = 'pending' AND message_id IN ({_marks(len(chunk))}) ORDER BY message_id, idx",
                tuple(chunk),
            )
            for qid, *fields in rows:
                out.setdefault(qid, []).append(Recipient(*fields))
        return out

    async def _fetch_contents(self, ids: Sequence[QueueId]) -> dict[QueueId, Content]:
        rows = await self._reader.execute_fetchall(
            f"SELECT message_id, data, body, file_offset FROM content WHERE message_id IN ({_marks(len(ids))})",
            tuple(ids))
        out = {}
        for qid, data, body, file_offset in rows:
            parts = [data, body] if body is not None else [data]
            if file_offset is not None:
                path = self.content_dir / qid
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    log.error("%s: content file %s is missing", qid, path)
                    continue
                parts.append(FilePart(str(path), file_offset, size - file_offset))
            out[qid] = Content(parts)
        return out

    # -- operator tools ---------------------------------------------------------------------------
    # For `mailflow queue …` (mailflow/queue_tools.py), which opens the queue in a process of its own
    # beside a running server. A selection is: `queues`, and optionally `ids`, `sender` (exact, any case),
    # `rcpt_domain` (the domain of a pending recipient) and `arrived_before` (unix time). Reads go in
    # pages keyed on the queue id (the primary key; ids are time-ordered), so walking 100 000 messages
    # never holds more than one page. Every change is one transaction per chunk that also bumps the
    # generation counter, so a running qmgr notices within a second. Only `message_detail` readers
    # touch content (through `content()`).

    _TOOL_MESSAGE = "id, queue, size, arrival, sender, next_attempt, attempts"
    # The domain after the LAST '@' (rtrim drops every character but '@' from the right), lower-cased.
    _RCPT_DOMAIN = "lower(rtrim(replace({a}, rtrim({a}, replace({a}, '@', '')), ''), '.'))"
    _BUMP_GENERATION = ("INSERT INTO control (key, value) VALUES ('generation', 1)"
                        " ON CONFLICT (key) DO UPDATE SET value = value + 1")

    @classmethod
    def _tool_where(cls, queues: Sequence[str], ids: Sequence[QueueId] | None, after: str, sender: str | None,
                    rcpt_domain: str | None, arrived_before: float | None) -> tuple[str, list]:
        # `+queue` keeps the planner on the primary key, so pages come in id order without a sort.
        clauses, params = [f"+queue IN ({_marks(len(queues))})"], list(queues)
        if ids is not None:
            clauses.append(f"id IN ({_marks(len(ids))})")
            params += ids
        if after:
            clauses.append("id > ?")
            params.append(after)
        if sender is not None:
            clauses.append("lower(sender) = lower(?)")
            params.append(sender)
        if rcpt_domain is not None:
            clauses.append("EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = message.id"
                           f" AND r.status = 'pending' AND {cls._RCPT_DOMAIN.format(a='r.address')} = lower(?))")
            params.append(rcpt_domain)
        if arrived_before is not None:
            clauses.append("arrival < ?")
            params.append(arrived_before)
        return " AND ".join(clauses), params

    async def message_page(self, *, queues: Sequence[str], ids: Sequence[QueueId] | None = None, after: str = "",
                           limit: int = 1000, sender: str | None = None, rcpt_domain: str | None = None,
                           arrived_before: float | None = None) -> list[tuple]:
        """Up to `limit` selected messages with ids after `after`, in id order: rows of
        (id, queue, size, arrival, sender, next_attempt, attempts). `ids` at most 500."""
        where, params = self._tool_where(queues, ids, after, sender, rcpt_domain, arrived_before)
        rows = await self._reader.execute_fetchall(
            f"SELECT {self._TOOL_MESSAGE} FROM message WHERE {where} ORDER BY id LIMIT ?", (*params, limit))
        return [tuple(r) for r in rows]

    async def message_ids(self, **selection) -> list[QueueId]:
        """The ids of `message_page(**selection)`."""
        return [row[0] for row in await self.message_page(**selection)]

    async def count_messages(self, *, queues: Sequence[str], sender: str | None = None,
                             rcpt_domain: str | None = None, arrived_before: float | None = None) -> int:
        where, params = self._tool_where(queues, None, "", sender, rcpt_domain, arrived_before)
        rows = await self._reader.execute_fetchall(f"SELECT count(*) FROM message WHERE {where}", params)
        return rows[0][0]

    async def recipients_of(self, ids: Sequence[QueueId], *, pending_only: bool = False
                            ) -> dict[QueueId, list[tuple[str, str, str, str, str]]]:
        """(address, original, status, dsn, reason) of each message's recipients, in envelope order."""
        out: dict[QueueId, list] = {}
        only = " AND status = 'pending'" if pending_only else ""
        for chunk in _chunks(list(ids), _MAX_VARS):
            rows = await self._reader.execute_fetchall(
                f"SELECT message_id, address, original, status, dsn, reason FROM recipient"
                f" WHERE message_id IN ({_marks(len(chunk))}){only} ORDER BY message_id, idx", tuple(chunk))
            for qid, *fields in rows:
                out.setdefault(qid, []).append(tuple(fields))
        return out

    async def message_detail(self, queue_id: QueueId) -> tuple | None:
        """(id, queue, size, arrival, sender, next_attempt, attempts, client, envid, ret, smtputf8, body_type,
        warned) of one message, or None."""
        rows = await self._reader.execute_fetchall(
            f"SELECT {self._TOOL_MESSAGE}, client, envid, ret, smtputf8, body_type, warned FROM message"
            " WHERE id = ?", (queue_id,))
        return tuple(rows[0]) if rows else None

    async def hold_messages(self, ids: Sequence[QueueId]) -> None:
        """incoming/deferred/active -> hold. An active message's delivery finishes; `record` keeps it held."""
        await self._tool_write("UPDATE message SET queue = 'hold'"
                               " WHERE id = ? AND queue IN ('incoming', 'deferred', 'active')", [(i,) for i in ids])

    async def release_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """hold -> deferred, due `now`."""
        await self._tool_write("UPDATE message SET queue = 'deferred', next_attempt = ?"
                               " WHERE id = ? AND queue = 'hold'", [(now, i) for i in ids])

    async def requeue_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """incoming/deferred/hold -> incoming, due `now` (qmgr resolves every recipient again)."""
        await self._tool_write("UPDATE message SET queue = 'incoming', next_attempt = ?"
                               " WHERE id = ? AND queue IN ('incoming', 'deferred', 'hold')", [(now, i) for i in ids])

    async def flush_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """Deferred messages due `now`; also counts a flush request (`flush_requests`)."""
        await self._tool_write("UPDATE message SET next_attempt = ? WHERE id = ? AND queue = 'deferred'",
                               [(now, i) for i in ids],
                               ("INSERT INTO control (key, value) VALUES ('flush', 1)"
                                " ON CONFLICT (key) DO UPDATE SET value = value + 1", [()]))

    async def delete_messages(self, ids: Sequence[QueueId]) -> None:
        """Remove messages in any state: message, recipient and content rows."""
        id_rows = [(i,) for i in ids]
        await self._committer.write([*_remove_ops(id_rows), (self._BUMP_GENERATION, [()])])

    async def flush_requests(self) -> int:
        """How many times `mailflow queue flush` ran: a change asks qmgr to revive dead destinations."""
        rows = await self._reader.execute_fetchall("SELECT value FROM control WHERE key = 'flush'")
        return rows[0][0] if rows else 0

    async def _tool_write(self, sql: str, rows: list[tuple], *more: _Op) -> None:
        await self._committer.write([(sql, rows), *more, (self._BUMP_GENERATION, [()])])

    async def shape_counts(self, queues: Sequence[str], now: float, limits: Sequence[float]
                           ) -> list[tuple[str, int, int]]:
        """(recipient domain, age bucket, pending recipients), aggregated in SQL. Bucket i (1-based) holds
        ages below limits[i-1] seconds; bucket len(limits)+1 the rest."""
        cases = " ".join(f"WHEN ? - m.arrival < ? THEN {i}" for i in range(1, len(limits) + 1))
        case_params = [p for limit in limits for p in (now, limit)]
        rows = await self._reader.execute_fetchall(
            f"SELECT {self._RCPT_DOMAIN.format(a='r.address')} AS domain,"
            f" CASE {cases} ELSE {len(limits) + 1} END AS bucket, count(*)"
            f" FROM message m JOIN recipient r ON r.message_id = m.id"
            f" WHERE m.queue IN ({_marks(len(queues))}) AND r.status = 'pending' GROUP BY domain, bucket",
            (*case_params, *queues))
        return [tuple(r) for r in rows]

    async def destination_rows(self) -> list[tuple]:
        """qmgr's last destination snapshot: (transport, nexthop, window, in_flight, queued, failures,
        dead_until, reason, updated)."""
        rows = await self._reader.execute_fetchall(
            "SELECT transport, nexthop, window, in_flight, queued, failures, dead_until, reason, updated"
            " FROM destination ORDER BY transport, nexthop")
        return [tuple(r) for r in rows]


_MESSAGE_COLUMNS = "id, sender, arrival, size, smtputf8, body_type, attempts, envid, ret, warned"


def _queued_message(row: tuple, recipients) -> QueuedMessage:
    qid, sender, arrival, size, utf8, body_type, attempts, envid, ret, warned = row
    return QueuedMessage(qid, sender, arrival, size, bool(utf8), body_type, attempts, tuple(recipients),
                         envid=envid, ret=ret, warned=bool(warned))


def _alternate(first: list, second: list) -> list:
    out = []
    for i in range(max(len(first), len(second))):
        out.extend(side[i] for side in (first, second) if i < len(side))
    return out


def _insert_ops(messages: Sequence[NewMessage]) -> list[_Op]:
    content_rows, links = [], []
    for m in messages:
        data, body, file = _content_row(m.content)
        content_rows.append((m.queue_id, data, body, None if file is None else file.offset))
        if file is not None:
            links.append((file.path, m.queue_id))
    return [
        ("INSERT INTO message (id, queue, sender, arrival, next_attempt, size, smtputf8, body_type, client,"
         " envid, ret) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
         [(m.queue_id, m.queue, m.sender, m.arrival, m.arrival, m.content.size, int(m.smtputf8), m.body_type,
           m.client, m.envid, m.ret) for m in messages]),
        ("INSERT INTO recipient (message_id, idx, address, original, notify, orcpt) VALUES (?, ?, ?, ?, ?, ?)",
         [(m.queue_id, r.index, r.address, r.original, r.notify, r.orcpt) for m in messages for r in m.recipients]),
        (_LINK_CONTENT, links),
        ("INSERT INTO content (message_id, data, body, file_offset) VALUES (?, ?, ?, ?)", content_rows),
    ]


def _content_row(content: Content) -> tuple:
    """(data, body, file part) of a content row. In memory: the first part and the rest (joined only when
    there are several); with a file: every part before it (the header section) and the file part, last."""
    parts = content.parts
    if not parts or not isinstance(parts[-1], FilePart):
        if any(isinstance(p, FilePart) for p in parts):
            raise ValueError(f"content not prepared for the store: {content!r}")
        rest = parts[1:]
        body = None if not rest else rest[0] if len(rest) == 1 else b"".join(rest)
        return (parts[0] if parts else b""), body, None
    head = parts[:-1]
    if any(isinstance(p, FilePart) for p in head):
        raise ValueError(f"content not prepared for the store: {content!r}")
    return (head[0] if len(head) == 1 else b"".join(head)), None, parts[-1]


def _leading_bytes(parts) -> list:
    out = []
    for part in parts:
        if isinstance(part, FilePart):
            break
        out.append(part)
    return out


def _linkable(content: Content, content_dir: Path) -> bool:
    """Whether the writer can hard-link the content's file part as it is: the only file part, last, in the
    content directory and running to the file's end."""
    *head, last = content.parts
    if not isinstance(last, FilePart) or any(isinstance(p, FilePart) for p in head):
        return False
    path = Path(last.path)
    return path.parent == content_dir and os.stat(path).st_size == last.offset + last.length


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_ops(id_rows: list[tuple]) -> list[_Op]:
    return [
        ("DELETE FROM recipient WHERE message_id = ?", id_rows),
        (_DELETE_CONTENT, id_rows),
        ("DELETE FROM message WHERE id = ?", id_rows),
    ]


def _migrate(con: sqlite3.Connection) -> None:
    schema = resources.files("mailflow").joinpath("schema.sql").read_text()
    con.executescript(schema)
    rows = con.execute("SELECT version FROM schema_version").fetchall()
    if not rows:
        con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return
    version = rows[0][0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"queue schema version {version} is newer than this mailflow ({SCHEMA_VERSION})")
    for step in range(version, SCHEMA_VERSION):
        con.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[step](con)
            con.execute("UPDATE schema_version SET version = ?", (step + 1,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        log.info("store: queue schema upgraded to version %d", step + 1)


def _content_v2(con: sqlite3.Connection) -> None:
    """1 -> 2: a content row may keep its body apart, or in a file (the v1 `data` stays the whole message)."""
    con.execute("ALTER TABLE content ADD COLUMN body BLOB")
    con.execute("ALTER TABLE content ADD COLUMN file_offset INTEGER")


_MIGRATIONS = {1: _content_v2}  # version -> the step that upgrades a queue from it
