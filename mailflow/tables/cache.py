"""`TableCache`: each `type:name` opened once, and lookups that never hold up the event loop.

    TableCache(clock).open(specs, aliases=False) -> list[Table]   the tables of one setting, in order; a spec
                                                                  named twice is opened once (one reader, one
                                                                  reload)
    TableCache(clock, previous=generation)
                                       a reload's generation: a file table (texthash, regexp, pcre, cidr) that
                                       `generation` (the one in force, built) holds under the same
                                       `(spec, aliases)` is taken over, not read again, when its file is unchanged
                                       (files.Reloading.unchanged: the same device, inode, size, mtime and ctime
                                       as when it was read); any other table is opened anew (inline, static, fail
                                       and unix cost nothing; sqlite re-reads its .cf, accounts opens the database
                                       again: nothing of theirs is shared by two generations)
    TableCache.view() -> TableCache    one that opens from the same tables (a spec either opens is opened, and
                                       read, once) while its `run` and `preload` concern only those opened through
                                       it: a server's generation shares one set of tables among its parts (routing,
                                       content checks, each listener's restrictions) and each part's lookups stay
                                       inline unless a table of its own may block; a view holds only the tables
                                       opened through it, so that a part still in use after a reload (an open
                                       session, a delivery) keeps its own tables alive, not its generation's
    TableCache.built(check=None) -> list[Table]
                                       the generation is built: from now on each view opens its own tables; this
                                       cache keeps the tables its views opened (for file_tables and the next
                                       reload's takeover) but those only `check` (a view: a reload's check of every
                                       table its settings name) opened that are not file tables (they cost nothing
                                       to open again, or hold a connection), which it lets go: a file table only
                                       the check reads (a disabled postscreen's access list) is kept, not read
                                       again at every reload; returns the file tables the swap lets go (to retire,
                                       mailflow.tables.retire): the previous generation's it did not take over
    TableCache.abandoned() -> list[Table]
                                       the generation will not be built (its reload refused): the file tables it
                                       read itself, to retire; those it took over stay the previous generation's
    TableCache.taken_over() -> list[Table]
                                       the previous generation's file tables this one took over (a reload's report)
    TableCache.read_itself() -> list[Table]
                                       the file tables this one read itself: file_tables() but those taken over
    await TableCache.run(fn, *args, off_loop=False, workers=None)
                                       fn (which looks things up in this cache's tables): inline when every table
                                       opened here answers from memory (and not `off_loop`), else in a worker
                                       thread (the default executor's, or `workers(call)`'s), with a deadline when
                                       a table opened here may block
    await TableCache.preload()         read every file-backed table once, in a worker thread (a server calls
                                       it before it listens)
    TableCache.file_tables()           the tables read from a file, its views' too (what read_itself and the
                                       next generation's built() choose from; retire takes those lists)

Failure behaviour: `open` raises ConfigError for a bad spec; `run` raises LookupRetry past the slowest blocking
table's deadline (plus RUN_GRACE): in the default executor counted from the call to `run` (its wait for a thread
included: that pool is shared, and nothing else bounds the wait), with `workers` (a thread already reserved in
the caller's own pool, mailflow.workers.BoundedWorkers.slot, whose wait is bounded by its threads' progress) from
when `fn` is handed to it; exceptions of `fn` propagate.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Awaitable, Callable, TypeVar

from mailflow.errors import LookupRetry
from mailflow.tables.base import Table
from mailflow.tables.files import FromFile
from mailflow.tables.spec import open_table
from mailflow.tables.sqlite import SQLITE_TIMEOUT

RUN_GRACE = 0.5  # TableCache.run waits this much past the slowest blocking table's own deadline

T = TypeVar("T")


class TableCache:
    """Opens each `type:name` once (for itself and its views), so settings that name the same file share one
    reader (and one reload). `open(specs)` returns the tables of one setting, in order."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, shared: _Shared | None = None,
                 previous: TableCache | None = None):
        self._clock = clock
        self._previous = previous  # the generation this one replaces, until built (or abandoned)
        if previous is not None and shared is None:
            shared = _Shared({}, {key: t for key, t in previous._held().items() if _is_file_table(t)})
        self._shared = shared  # the views' (and this cache's) while they are being built; None: its own only
        self._open: dict[tuple[str, bool], Table] = {}  # those opened through this cache
        self._blocking: list[Table] = []  # those of _open that may wait on I/O (asked at every run())
        # what the views opened, once built (for file_tables and the next reload), the check's file tables too
        self._kept: dict[tuple[str, bool], Table] = {}

    def view(self) -> TableCache:
        """See the module docstring."""
        if self._shared is None:
            self._shared = _Shared(dict(self._open))
        return TableCache(self._clock, shared=self._shared)

    def open(self, specs, *, aliases: bool = False) -> list[Table]:
        tables = []
        for spec in specs:
            key = (spec, aliases)
            if key not in self._open:
                table = self._open[key] = self._opened(spec, aliases)
                if table.blocking:
                    self._blocking.append(table)
            tables.append(self._open[key])
        return tables

    def _opened(self, spec: str, aliases: bool) -> Table:
        shared = self._shared
        if shared is None or shared.tables is None:  # (a view of a built generation opens its own)
            return open_table(spec, clock=self._clock, aliases=aliases)
        key = (spec, aliases)
        if key not in shared.tables:
            taken = shared.take_over(key)  # (None, not a falsy table: an empty one is taken over too)
            shared.tables[key] = open_table(spec, clock=self._clock, aliases=aliases) if taken is None else taken
        shared.openers[key] = shared.openers.get(key, 0) + 1
        return shared.tables[key]

    def built(self, check: TableCache | None = None) -> list[Table]:
        """See the module docstring."""
        shared = self._shared
        if shared is None or shared.tables is None:
            return []
        checked_only = [key for key in (check._open if check is not None else ()) if shared.openers[key] == 1]
        for key in checked_only:  # (a file table stays, for the next reload to take over while its file is unchanged)
            if not _is_file_table(shared.tables[key]):
                del shared.tables[key]
        self._kept, shared.tables = shared.tables, None
        replaced = self._previous.file_tables() if self._previous is not None else []
        self._previous, shared.reusable = None, {}
        kept = {id(table) for table in self._held().values()}
        return [table for table in replaced if id(table) not in kept]

    def abandoned(self) -> list[Any]:
        """See the module docstring."""
        read = self.read_itself()
        self._previous = None
        if self._shared is not None:
            self._shared.reusable = {}
        return read

    def read_itself(self) -> list[Any]:
        """See the module docstring."""
        taken = {id(table) for table in self.taken_over()}
        return [table for table in self.file_tables() if id(table) not in taken]

    def taken_over(self) -> list[Any]:
        """See the module docstring."""
        held = self._held()
        return [held[key] for key in self._shared.taken if key in held] if self._shared is not None else []

    def file_tables(self) -> list[Any]:
        """The tables read from a file (texthash, regexp, pcre, cidr: files.FromFile) opened through this
        cache or its views."""
        return list({id(table): table for table in self._held().values() if _is_file_table(table)}.values())

    def _held(self) -> dict[tuple[str, bool], Table]:
        """The tables opened through this cache or (while being built, then those kept) its views."""
        shared = self._shared
        return {**self._open, **(self._kept if shared is None or shared.tables is None else shared.tables)}

    @property
    def blocking(self) -> bool:
        """Some table opened here may wait on I/O when asked (sqlite)."""
        return bool(self._blocking)

    async def run(self, fn: Callable[..., T], *args, off_loop: bool = False,
                  workers: Callable[[Callable[[], T]], Awaitable[T]] | None = None) -> T:
        """`fn(*args)` without holding up the event loop: called inline when every table opened here answers
        from memory (the common case costs nothing) unless `off_loop` (work too long for the loop whatever the
        tables: a list of thousands of members), else in a worker thread; with a blocking table opened here,
        waited for at most the slowest one's deadline (plus RUN_GRACE). Past that: LookupRetry. Exceptions of `fn`
        propagate. `workers(call)`: runs `call` in a thread of the caller's own pool, reserved before (a
        BoundedWorkers.slot's submit): the deadline covers the call, not the wait for that thread. Without it the
        deadline covers the wait for a thread of the default executor too (see the module docstring)."""
        blocking = self._blocking
        if not blocking and not off_loop:
            return fn(*args)
        import asyncio  # (here, not at the top: sendmail opens tables without a loop, and asyncio costs it ~20 ms)

        loop = asyncio.get_running_loop()
        call = partial(fn, *args)
        if not blocking:
            return await (loop.run_in_executor(None, call) if workers is None else workers(call))
        deadline = max(getattr(t, "timeout", SQLITE_TIMEOUT) for t in blocking) + RUN_GRACE
        try:  # (asyncio.timeout, not wait_for: its frame holds the future, and the future a failure holding it)
            async with asyncio.timeout(deadline):
                return await (loop.run_in_executor(None, call) if workers is None else workers(call))
        except TimeoutError:
            raise LookupRetry(f"table lookup took longer than {deadline:g}s") from None

    async def preload(self) -> None:
        """Read every file-backed table now, in a worker thread: the first lookups find them loaded."""
        import asyncio  # (as in `run`)

        files = [t for t in self._open.values() if _is_file_table(t)]
        if files:
            await asyncio.get_running_loop().run_in_executor(None, _load_all, files)


class _Shared:
    """The tables the views of one cache opened while their generation is built (`tables`, None once built), how
    many views opened each, the previous generation's file tables not asked for yet (`reusable`, emptied once
    built) and which were taken over from it (`taken`: keys only, as `openers`: a view still in use after the
    generation's replacement holds its own tables, not these)."""

    def __init__(self, tables: dict[tuple[str, bool], Table],
                 reusable: dict[tuple[str, bool], Table] | None = None):
        self.tables: dict[tuple[str, bool], Table] | None = tables
        self.openers: dict[tuple[str, bool], int] = {}
        self.reusable: dict[tuple[str, bool], Any] = reusable or {}
        self.taken: set[tuple[str, bool]] = set()

    def take_over(self, key: tuple[str, bool]) -> Table | None:
        """The previous generation's table of `key` when its file is unchanged (a stat, in the caller's thread:
        the reload's check runs in a worker), else None."""
        table = self.reusable.pop(key, None)
        if table is None or not table.unchanged():
            return None
        self.taken.add(key)
        return table


def _is_file_table(table: Table) -> bool:
    """Read into memory from a file (texthash, regexp, pcre, cidr): a reload may take it over, and its retirement
    takes its contents apart (mailflow.tables.retire)."""
    return isinstance(table, FromFile)


def _load_all(tables: list) -> None:
    for table in tables:
        table.load()
