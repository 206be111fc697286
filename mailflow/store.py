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

- The file's size: `auto_vacuum = INCREMENTAL` (an older queue is converted when the server opens it),
  `maintain()` gives free pages back and truncates the WAL after a burst; `journal_size_limit` caps the WAL
  kept after a checkpoint.

Contract
- `insert(msg)` returns only after the transaction is on disk (`synchronous=FULL`): smtpd may then say 250.
  A message with a content file is durable whole: the file is fsynced, linked under its queue id and the
  directory fsynced before the transaction that adds its row commits; a failed commit removes the link.
  Content that is neither in memory nor one file part at the end is first copied into a spool file.
- `content(id)` returns the Content (its file part read lazily) or None when the row or its file is missing.
- Removing a message (`finish`, `delete_messages`) removes its content file after the commit.
- `sweep()` (at server start, before anything is received) removes temporary spool files and content files
  whose row is gone: what a crash between a commit and an unlink left behind.
- `claim(ids, now)` is qmgr's atomic taking of messages: only rows still incoming, or deferred and due, become
  `active`; it returns the ids it took, and qmgr admits only those.
- `record_results(queue_id, rows)` marks recipients as each delivery job ends (Postfix's deliver_completed);
  a recipient whose failure/success notice is still owed keeps a flag until `finish()` queues the notices,
  clears the flags and defers or removes the message, all in one transaction. So a stop between the two
  repeats no delivery and loses no notice.
- `recover()` at start-up moves messages left `active` by a crash back to `incoming`: start-up is recovery
  (a message whose recipients are all done is finished by qmgr's next scan).
- Failures raise `sqlite3.Error` with SQLite's own message (or `Overloaded` when the write backlog is over its
  limit); nothing is half-written, because each batch is one transaction that is rolled back whole on error.
  `store_fault(error)` tells a fault of the whole store (locked, disk full, I/O) from a bad request: a batch
  failing for a store fault fails every request in it at once; one failing for another reason is retried
  request by request, so one bad request does not fail its neighbours.
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
from typing import Callable, Iterable, Sequence

import aiosqlite

from mailflow.config import DEFAULTS
from mailflow.content import Content, FilePart, Spool, is_spool_name
from mailflow.errors import Overloaded
from mailflow.model import Delivered, Outcome, QueuedMessage, QueueId, RcptResult, Recipient

log = logging.getLogger("mailflow.store")

SCHEMA_VERSION = 3
_MAX_VARS = 500  # ids per IN (...) query
CONTENT_DIRECTORY = "content"  # beside the database: content files of big messages, temporary spool files
# Pseudo-statements the writer handles itself: link content files in before the transaction, unlink after.
_LINK_CONTENT = "-- link content files"
_DELETE_CONTENT = "DELETE FROM content WHERE message_id = ?"
BUSY_TIMEOUT = 5.0  # seconds a connection waits for another one's lock before the statement fails
WAL_KEEP = 4 << 20  # bytes of WAL kept after a checkpoint (journal_size_limit)
VACUUM_PAGES = 4096  # free pages given back per maintain() call, so one call holds the lock briefly


def store_fault(error: BaseException) -> bool:
    """True for a fault of the whole store (busy or locked, disk full, I/O error, read-only, cannot open) rather
    than of one request (a constraint, a bad statement): retrying anything before it clears is useless."""
    return isinstance(error, (sqlite3.OperationalError, OSError)) or type(error) is sqlite3.DatabaseError


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

    def open(self, busy_timeout: float, owner: bool) -> None:
        con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect when the file is created
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            con.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            con.execute(f"PRAGMA journal_size_limit = {WAL_KEEP}")
            _migrate(con)
            if owner and con.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                _convert_to_incremental_vacuum(con, self._path)
        except BaseException:
            con.close()
            raise
        self._con = con

    def transaction(self, merged: dict[str, list[tuple]], calls: Sequence[_Call | None] = ()) -> list:
        """The statements, then each call (its result in the list returned, None for no call); one commit.
        Content files are linked in (and the directory fsynced) before it, so a committed row always has its
        file; they are unlinked again if it fails. Files of removed content go after it."""
        con = self._con
        linked = self._link_contents(merged.get(_LINK_CONTENT, ()))
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in merged.items():
                    if rows and sql != _LINK_CONTENT:
                        con.executemany(sql, rows)
                results = [call(con) if call else None for call in calls]
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
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
        return results

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

    def maintain(self, free_share: float, min_free: int) -> int:
        """Give free pages back when they are many (at least `min_free`, and `free_share` of the file), then
        truncate the WAL. Returns the pages given back."""
        con = self._con
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        if free < min_free or free < pages * free_share:
            return 0
        # executescript steps the pragma to its end (execute() would free a single page)
        con.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return free - con.execute("PRAGMA freelist_count").fetchone()[0]
        con = self._con
        linked = self._link_contents(merged.get(_LINK_CONTENT, ()))
        try:
            for sql, rows in merged.items():
                if rows:
                    con.executemany(sql, rows)
            results = [call(con) if call else None for call in calls]
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return results

    def maintain(self, free_share: float, min_free: int) -> int:
        """Give free pages back when they are many (at least `min_free`, and `free_share` of the file), then
        truncate the WAL. Returns the pages given back."""
        con = self._con
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        if free < min_free or free < pages * free_share:
            return 0
        # executescript steps the pragma to its end (execute() would free a single page)
        con.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return free - con.execute("PRAGMA freelist_count").fetchone()[0]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


def _convert_to_incremental_vacuum(con: sqlite3.Connection, path: Path) -> None:
    """A queue made before auto_vacuum is rebuilt once, by its server. It needs about the file's size free: when
    that fails (a full disk) the server starts anyway and tries again at its next start."""
    log.info("store: converting %s to incremental vacuum (once)", path)
    try:
        con.execute("VACUUM")
    except sqlite3.OperationalError as e:
        log.warning("store: %s stays without incremental vacuum for now: %s", path, e)


def _claim(con: sqlite3.Connection, ids: list[QueueId], now: float) -> list[QueueId]:
    """incoming, or deferred and due -> active (inside a transaction); the ids that moved. One statement per id:
    cheaper than an IN list with RETURNING, and each row count says whether that id was taken."""
    sql = ("UPDATE message SET queue = 'active' WHERE id = ?"
           " AND (queue = 'incoming' OR (queue = 'deferred' AND next_attempt <= ?))")
    return [qid for qid in ids if con.execute(sql, (qid, now)).rowcount == 1]


def _rollback(con: sqlite3.Connection) -> None:
    """Undo a failed transaction without hiding why it failed: SQLite has already rolled back after some
    errors (SQLITE_FULL, SQLITE_IOERR), and a second ROLLBACK would raise "cannot rollback - no transaction is
    active" in place of the real error."""
    if not con.in_transaction:
        return
    try:
        con.execute("ROLLBACK")
    except sqlite3.Error as e:
        log.warning("store: rollback after a failed write also failed: %s", e)


_Call = Callable[[sqlite3.Connection], object]  # run inside a batch's transaction; its result goes to its caller


class _GroupCommitter:
    """Runs write requests (lists of `(sql, rows)`, and optionally a call that needs the connection, such as an
    UPDATE … RETURNING) in shared transactions, one commit per batch."""

    def __init__(self, writer: _Writer, batch_limit: int, backlog_limit: int):
        self._writer = writer
        self._batch_limit = batch_limit
        self._backlog_limit = backlog_limit
        self._pending: asyncio.Queue[tuple[list[_Op], _Call | None, asyncio.Future]] = asyncio.Queue()
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

    async def write(self, ops: list[_Op], *, may_refuse: bool = False, call: _Call | None = None):
        """Commit `ops` (and run `call`, whose result is returned) in the next batch's transaction."""
        if may_refuse and self._pending.qsize() >= self._backlog_limit:
            raise Overloaded()
        fut = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((ops, call, fut))
        return await fut

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

    async def _commit(self, batch: list[tuple[list[_Op], _Call | None, asyncio.Future]]) -> None:
        try:
            results = await self._run_transaction([(ops, call) for ops, call, _ in batch])
        except Exception as e:
            if len(batch) == 1 or store_fault(e):  # the store itself is failing: each alone would fail too
                for *_, fut in batch:
                    _settle(fut, e)
                return
            # One bad request must not fail the innocent ones that shared its batch: retry each alone.
            for ops, call, fut in batch:
                try:
                    [result] = await self._run_transaction([(ops, call)])
                except Exception as one:
                    log.error("store: a write failed on its own: %s", one)
                    _settle(fut, one)
                else:
                    _settle(fut, None, result)
            return
        for (*_, fut), result in zip(batch, results):
            _settle(fut, None, result)

    async def _run_transaction(self, requests: list[tuple[list[_Op], _Call | None]]) -> list:
        """Every statement's rows from every request, one executemany per statement, then the calls; one commit."""
        merged: dict[str, list[tuple]] = {}
        for ops, _ in requests:
            for sql, rows in ops:
                merged.setdefault(sql, []).extend(rows)
        results = await self._writer.call(self._writer.transaction, merged, [call for _, call in requests])
        self.commits += 1
        return results


def _settle(fut: asyncio.Future, error: Exception | None, result: object = None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
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
    async def open(cls, path: str | Path, *, batch_limit: int = DEFAULTS.queue.commit_batch_limit,
                   backlog_limit: int = DEFAULTS.queue.incoming_backlog_limit,
                   busy_timeout: float = BUSY_TIMEOUT, owner: bool = False) -> "Store":
        """`owner`: the caller holds the queue's lock (the server); only then is an old file converted to
        incremental vacuum, which needs the database to itself."""
        path = Path(path)
        (path.parent / CONTENT_DIRECTORY).mkdir(mode=0o700, parents=True, exist_ok=True)
        writer = _Writer(path)
        try:
            await writer.call(writer.open, busy_timeout, owner)
            reader = await aiosqlite.connect(path)
        except BaseException:
            await writer.call(writer.close)
            writer.shutdown()  # its thread would otherwise keep the process alive
            raise
        await reader.execute("PRAGMA query_only = ON")
        await reader.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
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

    async def claim(self, ids: Sequence[QueueId], now: float) -> list[QueueId]:
        """Take messages for delivery: each of `ids` still incoming, or deferred and due at `now`, becomes active,
        atomically. Returns the ids taken (an operator's hold or delete, or another taker, wins over a stale read)."""
        return await self._committer.write([], call=lambda con: _claim(con, list(ids), now))

    async def record_results(self, queue_id: QueueId, rows: Sequence[tuple[RcptResult, bool]]) -> None:
        """Record what one delivery job did, as soon as it is back: each `(result, notice_owed)` marks its
        recipient sent / bounced, or keeps it pending with its last reason; `notice_owed` flags a recipient whose
        failure or success notice `finish()` must still queue. Only pending recipients change, so recording a
        result twice does no harm."""
        await self._committer.write([_record_op(queue_id, rows)])

    async def finish(self, done: Delivered, notices: Sequence[NewMessage] = (),
                     results: Sequence[RcptResult] = ()) -> None:
        """The end of one attempt of a message, in one transaction: the last job's `results` (as
        `record_results`; their notices are among `notices`), recipients past the queue lifetime become
        bounced, the owed notices (`done.noticed`) are cleared as `notices` are queued, and the message is
        deferred until `done.next_attempt`, or removed when that is None.

        A message deferred here stays where an operator put it meanwhile (hold, deleted): only an `active`
        message becomes `deferred`.
        """
        qid = done.queue_id
        ops: list[_Op] = [_record_op(qid, [(r, False) for r in results])]  # first: the statements below see these
        if done.expired:
            ops.append(("UPDATE recipient SET status = 'bounced', dsn = ?, reason = ?, relay = ?, notice = 0"
                        " WHERE message_id = ? AND idx = ? AND status = 'pending'",
                        [(r.dsn, r.text, r.relay, qid, r.recipient.index) for r in done.expired]))
        if done.noticed:
            ops.append(("UPDATE recipient SET notice = 0 WHERE message_id = ? AND idx = ?",
                        [(qid, i) for i in done.noticed]))
        if done.next_attempt is None:
            ops += _remove_ops([(qid,)])
        else:
            ops.append(("UPDATE message SET queue = 'deferred', next_attempt = ?, attempts = attempts + 1,"
                        " warned = max(warned, ?) WHERE id = ? AND queue = 'active'",
                        [(done.next_attempt, int(done.warned), qid)]))
        if notices:
            ops += _insert_ops(notices)
        await self._committer.write(ops)

    async def mark_corrupt(self, ids: Sequence[QueueId]) -> None:
        await self._committer.write([("UPDATE message SET queue = 'corrupt' WHERE id = ?", [(i,) for i in ids])])

    async def maintain(self, *, free_share: float = 0.25, min_free: int = 256) -> int:
        """Give space back after a burst: when at least `min_free` pages and `free_share` of the file are free,
        an incremental vacuum (a bounded number of pages per call) and a WAL truncation. Returns the pages freed."""
        return await self._writer.call(self._writer.maintain, free_share, min_free)

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
        pending, owed = await self._recipients_to_do([r[0] for r in rows])
        return [_queued_message(row, pending.get(row[0], ()), owed.get(row[0], ())) for row in rows]

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

    async def _recipients_to_do(self, ids: list[QueueId]
                                ) -> tuple[dict[QueueId, list[Recipient]], dict[QueueId, list[RcptResult]]]:
        """Per message: the pending recipients, and the recorded results whose notice is still owed."""
        pending: dict[QueueId, list[Recipient]] = {}
        owed: dict[QueueId, list[RcptResult]] = {}
        for chunk in _chunks(ids, _MAX_VARS):
            rows = await self._reader.execute_fetchall(
                f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipient WHERE (status = 'pending' OR notice = 1)"
                f" AND message_id IN ({_marks(len(chunk))}) ORDER BY message_id, idx", tuple(chunk))
            for qid, *fields in rows:
                if fields[5] == "pending":
                    pending.setdefault(qid, []).append(Recipient(*fields[:5]))
                else:
                    owed.setdefault(qid, []).append(_recorded_result(fields))
        return pending, owed

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


_STATUS = {Outcome.SENT: "sent", Outcome.BOUNCED: "bounced", Outcome.DEFERRED: "pending"}
_OUTCOME = {status: outcome for outcome, status in _STATUS.items()}
_RECIPIENT_COLUMNS = "idx, address, original, notify, orcpt, status, dsn, reason, relay"


def _recorded_result(row) -> RcptResult:
    idx, address, original, notify, orcpt, status, dsn, reason, relay = row
    return RcptResult(Recipient(idx, address, original, notify, orcpt), _OUTCOME[status], dsn, reason, relay)


def _record_op(queue_id: QueueId, rows: Sequence[tuple[RcptResult, bool]]) -> _Op:
    """Recipients' results; only pending rows change, so a result recorded twice does no harm. Every write that
    holds it holds it first (statements merge in order of first appearance in a batch)."""
    return ("UPDATE recipient SET status = ?, dsn = ?, reason = ?, relay = ?, notice = ?"
            " WHERE message_id = ? AND idx = ? AND status = 'pending'",
            [(_STATUS[r.outcome], r.dsn, r.text, r.relay, int(owed), queue_id, r.recipient.index) for r, owed in rows])

_MESSAGE_COLUMNS = "id, sender, arrival, size, smtputf8, body_type, attempts, envid, ret, warned"


def _queued_message(row: tuple, recipients, owed) -> QueuedMessage:
    qid, sender, arrival, size, utf8, body_type, attempts, envid, ret, warned = row
    return QueuedMessage(qid, sender, arrival, size, bool(utf8), body_type, attempts, tuple(recipients),
                         envid=envid, ret=ret, warned=bool(warned), owed=tuple(owed))


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


# Steps for queues made by an older mailflow: MIGRATIONS[v] takes schema version v to v + 1.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # a content row may keep its body apart, or in a file (a v1 `data` stays the whole message)
    1: ("ALTER TABLE content ADD COLUMN body BLOB",
        "ALTER TABLE content ADD COLUMN file_offset INTEGER"),
    # results recorded per delivery job: the relay of each recipient and whether its notice is still owed
    2: ("ALTER TABLE recipient ADD COLUMN relay TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE recipient ADD COLUMN notice INTEGER NOT NULL DEFAULT 0"),
}


def _migrate(con: sqlite3.Connection) -> None:
    version = _schema_version(con)
    if version is not None and version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"queue schema version {version} is newer than this mailflow ({SCHEMA_VERSION})")
    if version is not None and version < SCHEMA_VERSION:
        con.execute("BEGIN IMMEDIATE")
        try:
            version = _schema_version(con)  # again, under the lock: another process may have done it
            for step in range(version, SCHEMA_VERSION):
                for sql in MIGRATIONS[step]:
                    con.execute(sql)
            con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        log.info("store: queue schema upgraded from version %d to %d", version, SCHEMA_VERSION)
    con.executescript(resources.files("mailflow").joinpath("schema.sql").read_text())  # new tables, indexes
    if version is None:
        con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


def _schema_version(con: sqlite3.Connection) -> int | None:
    """None for a new file (no schema_version table or no row yet)."""
    if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchall():
        return None
    rows = con.execute("SELECT version FROM schema_version").fetchall()
    return rows[0][0] if rows else None
