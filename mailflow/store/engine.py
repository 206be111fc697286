"""The store's commit engine: connections on threads of their own, group commit, coalesced reads.

What it owns
- `Connection`: one sqlite3 connection used only on a thread of its own. `call(fn, *args)` runs `fn(*args)`
  there: one thread hop, however many statements `fn` runs; `submit(fn, args, done)` the same with a callback
  called on the loop with (error, result) instead of a future to await. `hops` counts them.
- `Writer`: the one writing connection (WAL). `transaction(ops, calls)` is a whole
  `BEGIN IMMEDIATE; executemany…; calls; COMMIT` in one hop, so the lock is held only while SQLite works (never
  across event-loop turns, where a stalled loop would hold it against the operator tools); it returns once the
  commit is on disk (`synchronous=FULL`: the WAL is fsynced), every commit alike. (Committing what follows a
  250 with `synchronous=NORMAL` was tried: switching the setting costs a statement each way, and each statement
  is a moment the writer waits for the GIL while the loop works; one fsync more per commit was cheaper, at
  every cell of `make bench` — docs/performance.md, "Fourth pass".)
  `maintain()` gives free pages back and truncates the WAL after a burst.
- `Reader`: the query-only connection (WAL lets it read while the writer writes), through aiosqlite: one
  statement per call, each call one hop to aiosqlite's thread (`hops` counts them); a read that needs more
  than one thing asks for it in one statement (Store.due: JSON aggregation and joins).
- `GroupCommitter`: every write goes through it. Requests (lists of `(sql, rows)`, and optionally a call that
  needs the connection, such as a claim) that arrive while a commit is running are merged into the next
  transaction, so N concurrent sessions cost one fsync, not N: a statement's rows from every request in one
  executemany, wherever that keeps each request's statements in its own order (`_merged`). No task of its own:
  the first request of an idle committer starts a batch at the end of the loop turn (with every request made in
  that turn), and the writer's
  answer settles every request of the batch at once and starts the next batch with those that came meanwhile.
  Requests in one batch must be independent: a caller waits for its request before sending one that depends on
  it (every caller does: each write is awaited). Past `backlog_limit` waiting requests, a write that
  `may_refuse` raises `Overloaded`. `on_commit(requests, seconds)`, when set, is told each commit's size and how
  long it took (the metrics).
  A write that may `linger` (a delivery's result: nobody is waiting for its 250) made while the committer is
  idle waits up to `LINGER` for company, as PostgreSQL's commit_delay: the next write that may not linger (new
  mail, whose client waits) starts a batch at once and takes it along, so one fsync and one writer wake-up
  serve both; alone, it commits when `LINGER` is over. Behind a busy committer every write joins the next
  batch as before. (Relaying one session's mail, the writer ran each delivery's transaction while the loop
  served the next client, and each of its statements took the GIL from the loop, a cross-CPU wake-up each
  time on a VM; merged, the server spends about 15 % less CPU per message at one session —
  docs/performance.md, "Fifth pass".) `stop()` commits a lingering write at once.
- Text that is not UTF-8 in a row (edited by hand) fails a read in Python's sqlite3: the reader retries that read
  with `fetch_leniently` (store/damage.py names such text as damaged), so one bad row stops no scan or listing;
  the failed read's statement is reset at once (`fetch_rows`), so it leaves no snapshot open behind it.
- `BatchLoader`: `load(key)` calls made in the same loop turn become one `fetch_many(keys)` call.
- Opening the writer brings an older queue to the current schema (`schema.py`), unless told not to (the
  operator tools: an older queue is refused instead, the server running on it may be older too).
- Content files in a transaction: the pseudo-statement `LINK_CONTENT` hard-links `(source file, queue id)`
  rows in as `content/<queue id>` (fsync of the directory) before the transaction, and they are unlinked again
  if it fails; the files of rows deleted by `DELETE_CONTENT` (see `remove_ops`) go after the commit. A source
  file that is gone (a session whose client hung up discarded its spool while its insert waited) raises
  `ContentVanished`: only that insert fails, the others of its batch are retried alone and commit.

Failure behaviour
- Failures raise `sqlite3.Error` with SQLite's own message; nothing is half-written, because each batch is one
  transaction that is rolled back whole on error (`rollback` never hides the first error behind "cannot
  rollback"). `store_fault(error)` tells a fault of the whole store (locked, disk full, I/O) from a bad
  request: a batch failing for a store fault fails every request in it at once; one failing for another
  reason is retried request by request, so one bad request does not fail its neighbours. `corruption(error)`:
  SQLite found the pages read malformed (a store fault, but a read may meet it in one message's rows alone).
"""
from __future__ import annotations

import asyncio
import functools
from bisect import bisect_left
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, NamedTuple, Sequence, cast

import aiosqlite

from mailflow.errors import Overloaded
from mailflow.store.damage import lenient_text, undecodable
from mailflow.store.schema import convert_to_incremental_vacuum, migrate

log = logging.getLogger("mailflow.store")

MAX_VARS = 500  # ids per IN (...) query
CONTENT_DIRECTORY = "content"  # beside the database: content files of big messages, temporary spool files
# Pseudo-statements the writer handles itself: link content files in before the transaction, unlink after.
LINK_CONTENT = "-- link content files"
DELETE_CONTENT = "DELETE FROM content WHERE message_id = ?"
BUSY_TIMEOUT = 5.0  # seconds a connection waits for another one's lock before the statement fails
WAL_KEEP = 4 << 20  # bytes of WAL kept after a checkpoint (journal_size_limit)
VACUUM_PAGES = 4096  # free pages given back per maintain() call, so one call holds the lock briefly

Op = tuple[str, list[tuple]]  # a statement and its rows (one executemany)
Call = Callable[[sqlite3.Connection], object]  # run inside a batch's transaction; its result goes to its caller


def store_fault(error: BaseException) -> bool:
    """True for a fault of the whole store (busy or locked, disk full, I/O error, read-only, cannot open) rather
    than of one request (a constraint, a bad statement): retrying anything before it clears is useless."""
    return isinstance(error, (sqlite3.OperationalError, OSError)) or type(error) is sqlite3.DatabaseError


def corruption(error: BaseException) -> bool:
    """True for SQLite's word that the pages a statement read are malformed (SQLITE_CORRUPT, "database disk image
    is malformed"): a `store_fault` to a write, but a read of one message's rows may meet it while the rest of the
    store reads well, and reading them again meets it again."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF == sqlite3.SQLITE_CORRUPT


class ContentVanished(Exception):
    """A content file to link in was removed before its transaction (its session went away and discarded it):
    the fault of that request alone, so its batch is retried request by request (not a store fault)."""


class Connection:
    """One sqlite3 connection, used only on a thread of its own (opened there by `open`, closed by `close`).

    A call is put on a queue the thread takes from, and its result comes back with `call_soon_threadsafe`: the
    least a hop can cost (measured: about half the CPU of `run_in_executor`). Calls run one at a time, in order.
    """

    def __init__(self, path: Path, name: str):
        self._path = path
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._con: sqlite3.Connection | None = None
        self.hops = 0  # calls made on the thread

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """`fn(*args)` on the connection's thread: one hop."""
        fut = asyncio.get_running_loop().create_future()
        self.submit(fn, args, functools.partial(_settle, fut))
        try:
            return await fut
        finally:
            del fut  # a failure raised here holds this frame (its traceback): then not the future that holds it

    def submit(self, fn: Callable[..., Any], args: tuple, done: Callable[[BaseException | None, Any], None],
               loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`fn(*args)` on the connection's thread: one hop; then `done(error, result)` on `loop` (default: the
        running one)."""
        self.hops += 1
        self._calls.put((loop or asyncio.get_running_loop(), done, fn, args))

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise sqlite3.ProgrammingError("the store's connection is not open")
        return self._con

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, done, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the caller
                result, error = None, e
            try:
                loop.call_soon_threadsafe(done, error, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            con.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        except BaseException:
            con.close()
            raise
        return con

    async def close(self) -> None:
        """Close the connection and end its thread."""
        try:
            await self.call(self._close)
        finally:
            self._calls.put(None)
            self._thread.join()

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class Reader:
    """The reading connection: query-only, through aiosqlite (its thread; one hop per statement)."""

    def __init__(self, path: Path):
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self.hops = 0  # statements run (each one thread hop)

    async def open(self, busy_timeout: float) -> None:
        pending = aiosqlite.connect(self._path, isolation_level=None)
        # aiosqlite's thread is not a daemon: a loop that ends without close() (an embedding test that never
        # stops its Sink) would hang the interpreter at exit. A daemon, like the writer's thread.
        pending._thread.daemon = True
        db = await pending
        try:
            await db.executescript(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}; PRAGMA query_only = ON;")
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def fetchall(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple]:
        """The rows of one statement: one hop."""
        if self._db is None:
            raise sqlite3.ProgrammingError("the store's reader is not open")
        self.hops += 1
        # on aiosqlite's thread, which owns the connection (aiosqlite's own way to run a function there): nothing
        # else runs between a lenient retry's change of the text_factory and its undoing
        rows = await self._db._execute(_read, self._db._conn, sql, params)
        return cast(list[tuple], rows)  # (no row_factory: sqlite3 gives tuples)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()


class Writer(Connection):
    """The one writing connection: each `transaction` call is a whole transaction, in one hop."""

    def __init__(self, path: Path):
        super().__init__(path, "store-writer")
        self._content_dir = path.parent / CONTENT_DIRECTORY

    def open(self, busy_timeout: float, owner: bool, upgrade: bool = True) -> None:
        """Open, migrate an older queue (`upgrade`; else refuse it: `schema.migrate`), and (`owner`: the caller
        holds the queue's lock) convert a file made before auto_vacuum, which needs the database to itself. The
        owner (the server) also takes the write lock once, so that a database another process keeps locked fails
        the open (the server's start waits and tries again) rather than its first write; the operator tools take
        it only to change something."""
        con = self._connect(busy_timeout)
        try:
            # A new file takes auto_vacuum only before anything writes its first page; the owner's write lock below
            # writes it (taken first, every new queue was rebuilt by a VACUUM at its first start, logged as a
            # conversion).
            if con.execute("PRAGMA page_count").fetchone()[0] == 0:
                con.execute("PRAGMA auto_vacuum = INCREMENTAL")
            if owner:
                con.execute("BEGIN IMMEDIATE")
                con.execute("COMMIT")
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            con.execute(f"PRAGMA journal_size_limit = {WAL_KEEP}")
            migrate(con, upgrade)
            if owner and con.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                convert_to_incremental_vacuum(con, self._path)
        except BaseException:
            con.close()
            raise
        self._con = con

    def transaction(self, ops: Sequence[Op], calls: Sequence[Call | None] = ()) -> list:
        """The statements in order, then each call (its result in the list returned, None for no call); one
        commit, on disk when it returns. Content files are linked in (and the directory fsynced) before it,
        so a committed row always has its file; they are unlinked again if it fails. Files of removed content
        go after it."""
        con = self._connection()
        linked = self._link_contents(_rows_of(ops, LINK_CONTENT))
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                removed = _content_files(con, _rows_of(ops, DELETE_CONTENT))  # before the rows go
                for sql, rows in ops:
                    if rows and sql != LINK_CONTENT:
                        con.executemany(sql, rows)
                results = [call(con) if call else None for call in calls]
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise
        except BaseException:
            for path in linked:
                path.unlink(missing_ok=True)
            raise
        for queue_id in removed:
            try:
                os.unlink(os.path.join(self._content_dir, queue_id))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("store: cannot remove content file %s: %s (removed at the next start)", queue_id, e)
        return results

    def _link_contents(self, rows: Iterable[tuple]) -> list[Path]:
        """Hard-link each (source file, queue id) in as content/<queue id>; one fsync of the directory."""
        linked: list[Path] = []
        try:
            for source, queue_id in rows:
                target = self._content_dir / queue_id
                try:
                    os.link(source, target)  # FileExistsError: the name is another message's; never replaced
                except FileNotFoundError as e:
                    if os.path.exists(source):  # (the content directory is gone: the store's own fault)
                        raise
                    raise ContentVanished(f"{queue_id}: its content file {source} is gone") from e
                linked.append(target)
            if linked:
                fsync_path(self._content_dir)
        except BaseException:
            for path in linked:
                path.unlink(missing_ok=True)
            raise
        return linked

    def maintain(self, free_share: float, min_free: int) -> int:
        """Give free pages back when they are many (at least `min_free`, and `free_share` of the file), then
        truncate the WAL. Returns the pages given back."""
        con = self._connection()
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        if free < min_free or free < pages * free_share:
            return 0
        # executescript steps the pragma to its end (execute() would free a single page)
        con.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return free - con.execute("PRAGMA freelist_count").fetchone()[0]


def _content_files(con: sqlite3.Connection, id_rows: Sequence[tuple]) -> list[str]:
    """Of the messages in `id_rows` (`(queue id,)`), those whose content has a file (the others' content is all in
    their rows: no file to remove, no system call to make)."""
    found: list[str] = []
    ids = [queue_id for (queue_id,) in id_rows]
    for chunk in chunks(ids, MAX_VARS):
        found += [queue_id for (queue_id,) in con.execute(
            f"SELECT message_id FROM content WHERE file_offset IS NOT NULL AND message_id IN ({marks(len(chunk))})",
            chunk)]
    return found


def fetch_rows(con: sqlite3.Connection, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple]:
    """The rows of one read, its statement reset whatever happens: a read that fails midway (as one that meets
    text that is not UTF-8 does) would otherwise keep its snapshot, an open read transaction, until the garbage
    collector frees the cursor its traceback holds, and the connection's later reads would not see newer commits."""
    cursor = con.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def fetch_leniently(con: sqlite3.Connection, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple]:
    """The rows of a read again, after it met text that is not UTF-8 (`damage.undecodable`), that text as
    damage.NotUtf8 for `damage.checked` to name. Only on the connection's own thread; its text_factory is back
    to the default when it returns."""
    con.text_factory = lenient_text
    try:
        return fetch_rows(con, sql, params)
    finally:
        con.text_factory = str


def _read(con: sqlite3.Connection, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple]:
    """The reader's read: `fetch_rows`, again leniently when it meets text that is not UTF-8."""
    try:
        return fetch_rows(con, sql, params)
    except sqlite3.OperationalError as e:
        if not undecodable(e):
            raise
    return fetch_leniently(con, sql, params)


def rollback(con: sqlite3.Connection) -> None:
    """Undo a failed transaction without hiding why it failed: SQLite has already rolled back after some
    errors (SQLITE_FULL, SQLITE_IOERR), and a second ROLLBACK would raise "cannot rollback - no transaction is
    active" in place of the real error."""
    if not con.in_transaction:
        return
    try:
        con.execute("ROLLBACK")
    except sqlite3.Error as e:
        log.warning("store: rollback after a failed write also failed: %s", e)


def remove_ops(id_rows: list[tuple]) -> list[Op]:
    """The statements that remove messages (`(queue id,)` rows): recipients, content (and its file, after the
    commit) and the message row."""
    return [
        ("DELETE FROM recipient WHERE message_id = ?", id_rows),
        (DELETE_CONTENT, id_rows),
        ("DELETE FROM message WHERE id = ?", id_rows),
    ]


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Request(NamedTuple):
    """One write waiting for its batch."""

    ops: list[Op]
    call: "Call | None"
    fut: asyncio.Future  # the caller's
    patient: bool  # a write that may linger: settled after those whose callers wait (a client's 250)


LINGER = 0.002  # seconds a write that may linger waits, on an idle committer, for one that may not


class GroupCommitter:
    """Runs write requests (lists of `(sql, rows)`, and optionally a call that needs the connection, such as an
    UPDATE … RETURNING) in shared transactions, one commit per batch (see the module doc)."""

    def __init__(self, writer: Writer, batch_limit: int, backlog_limit: int):
        self._writer = writer
        self._batch_limit = batch_limit
        self._backlog_limit = backlog_limit
        self._waiting: list[Request] = []  # not yet at the writer
        self._busy = False  # a batch is at the writer, or one is about to start
        self._lingering: asyncio.TimerHandle | None = None  # idle, with only writes that may linger waiting
        self._idle: list[asyncio.Future] = []  # stop() waiting for the last batch
        self._retries: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the requests come from
        self.commits = 0
        self.on_commit: Callable[[int, float], None] | None = None
        self._batch_started = 0.0

    async def stop(self) -> None:
        """Finish every request already submitted."""
        if self._lingering is not None:
            self._start_batch()
        while self._busy:
            fut = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
            await fut

    def backlog(self) -> int:
        return len(self._waiting)

    async def write(self, ops: list[Op], *, may_refuse: bool = False, call: Call | None = None,
                    linger: bool = False):
        """Commit `ops` (and run `call`, whose result is returned) in the next batch's transaction; return once
        it is on disk. `linger`: on an idle committer, wait up to LINGER for a write that may not."""
        if may_refuse and len(self._waiting) >= self._backlog_limit:
            raise Overloaded()
        self._loop = loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(Request(ops, call, fut, linger))
        if not self._busy:
            if not linger:
                self._start_batch()
            elif self._lingering is None:
                self._lingering = loop.call_later(LINGER, self._start_batch)
        try:
            return await fut
        finally:
            del fut  # (as in Connection.call)

    def _start_batch(self) -> None:
        """Become busy: a batch starts at the end of this loop turn, with every request made in it."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        self._busy = True
        loop = self._loop  # (set by the write that starts the batch, or leaves a lingering one)
        assert loop is not None
        loop.call_soon(self._next_batch)

    def _next_batch(self) -> None:
        """Send what is waiting (batch_limit requests at most) to the writer, or become idle."""
        if not self._waiting:
            self._busy = False
            idle, self._idle = self._idle, []
            for fut in idle:
                _settle(fut, None)
            return
        batch = self._waiting[:self._batch_limit]
        del self._waiting[:self._batch_limit]
        try:
            args = _merged(batch)
        except Exception as e:  # a malformed request: its batch fails, the committer goes on
            self._committed(batch, e, None)
            return
        self._batch_started = time.perf_counter()  # (one batch at a time)
        self._writer.submit(self._writer.transaction, args, functools.partial(self._committed, batch), self._loop)

    def _committed(self, batch: list[Request], error: BaseException | None, results: list | None) -> None:
        """The writer's answer for a batch (on the loop): settle its requests (a client waiting for its 250 before
        a lingering result), then go on with the next batch."""
        if error is None:
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit(len(batch), time.perf_counter() - self._batch_started)
            for request, result in sorted(zip(batch, results or ()), key=lambda answered: answered[0].patient):
                _settle(request.fut, None, result)
        elif len(batch) == 1 or store_fault(error) or not isinstance(error, Exception):
            for request in batch:  # the store itself is failing: each alone would fail too
                _settle(request.fut, error)
        else:  # one bad request must not fail the innocent ones that shared its batch: retry each alone
            task = asyncio.ensure_future(self._one_by_one(batch))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        self._next_batch()

    async def _one_by_one(self, batch: list[Request]) -> None:
        try:
            for request in batch:
                fut = request.fut
                try:
                    [result] = await self._writer.call(self._writer.transaction, *_merged([request]))
                except Exception as one:
                    log.error("store: a write failed on its own: %s", one)
                    _settle(fut, one)
                else:
                    self.commits += 1
                    _settle(fut, None, result)
        finally:
            self._next_batch()


def _merged(requests: list[Request]) -> tuple[list[Op], list]:
    """Writer.transaction's arguments for requests run together: their statements, one executemany for the rows
    of every request that runs it wherever that keeps each request's own order, and the calls. A statement a
    request runs after one the batch runs later gets an executemany of its own, after that one: a requeued copy's
    `UPDATE message SET warned` after its INSERT, even when a request before it in the batch ran that UPDATE
    before its own INSERTs (the end of an attempt that queues a delay notice), which ran the copy's too soon."""
    if len(requests) == 1:  # (one session's commit, the common case: its statements as they are, in order)
        return list(requests[0].ops), [requests[0].call]
    merged: list[Op] = []
    places: dict[str, list[int]] = {}  # where each statement is in `merged`, in order
    for request in requests:
        last = 0  # where this request's previous statement went: the next one goes there or later
        for sql, rows in request.ops:
            spots = places.get(sql)
            if spots is None or spots[-1] < last:  # a new executemany, after every one this request ran so far
                at = len(merged)
                merged.append((sql, []))
                places.setdefault(sql, []).append(at)
            else:  # the first at or after `last` (a search, not a scan: a big batch is one loop turn's CPU)
                at = spots[0] if spots[0] >= last else spots[bisect_left(spots, last)]  # (the shortcut: measured)
            merged[at][1].extend(rows)
            last = at
    return merged, [request.call for request in requests]


def _rows_of(ops: Sequence[Op], sql: str) -> list[tuple]:
    """The rows of every executemany of `sql` in `ops`."""
    return [row for statement, rows in ops if statement == sql for row in rows]


def _settle(fut: asyncio.Future, error: BaseException | None, result: object = None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


class BatchLoader:
    """Coalesces `load(key)` calls made in the same loop turn into one `fetch_many(keys)` call (per MAX_VARS
    keys); a key it does not answer loads as None."""

    def __init__(self, fetch_many: Callable[[Sequence[str]], Awaitable[dict]]):
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
            for chunk in chunks(keys, MAX_VARS):
                found.update(await self._fetch_many(chunk))
        except Exception as e:
            for futs in waiting.values():
                for f in futs:
                    _settle(f, e)
            return
        for key, futs in waiting.items():
            for f in futs:
                _settle(f, None, found.get(key))


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def marks(n: int) -> str:
    """`?,?,…` for an IN list of n values."""
    return ",".join("?" * n)
