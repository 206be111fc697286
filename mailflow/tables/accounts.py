"""`accounts:PATH#MAP` tables: one map of the account database (mailflow.accounts.schema: domains, mailboxes,
aliases, passwords, senders, quotas), read the way the routing stages read any table.

    AccountsTable(name, path, map_name, clock)     fixed, not blocking; load(), lookup(key)

How it stays fresh and cheap:
- Answers (found or not) are kept in memory per key, so a key asked again costs a dict lookup.
- At most once per CHECK_INTERVAL of the injected clock, a lookup first asks SQLite whether the file changed
  (`PRAGMA data_version`, plus the file's inode: a database replaced by another file counts as a change); if so,
  every kept answer goes. So a change made by `mailflow account …` is seen by a running server within
  CHECK_INTERVAL seconds, never later, without a restart and without a file check per lookup.
- A key not kept yet costs one indexed query on the calling thread (microseconds). It waits for a lock only while
  `mailflow account` commits a change (milliseconds), at most TIMEOUT seconds; so the table answers from the event
  loop (`blocking = False`, TableCache.run keeps calling inline) like the in-memory types.
- At most KEPT_LIMIT bytes of answers are kept, as memory counts them (sys.getsizeof of key and value, which
  includes the 4 bytes a character of a string with an emoji takes and the UTF-8 copy SQLite's binding leaves in
  the key, plus ENTRY_COST for the dict's slot): past that they are all dropped and kept again as asked. A limit
  in bytes, not in answers: the keys are what clients send (an SMTPUTF8 address of up to 254 UTF-8 bytes, an
  AUTH login of up to 256 characters): 100 000 such addresses held 32 MiB (ASCII) to 130 MiB (an emoji in each)
  per table, and counted in characters a limit of 16 MiB held 53 MiB of them (logins: 82 MiB).

Failure behaviour: a missing or unreadable database, a file that is not an account database (or a newer schema),
a lock held past TIMEOUT, or any SQLite error raise `LookupRetry` naming the table (callers defer: 451 4.3.0,
454 4.7.0 for AUTH); for CHECK_INTERVAL the same failure is answered without touching the file, then the
database is opened again. A bad spec raises ConfigError when the
table is opened.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn

from mailflow.accounts import schema
from mailflow.errors import ConfigError, LookupRetry

CHECK_INTERVAL = 0.5  # seconds between two looks at whether the database changed
TIMEOUT = 1.0  # seconds a lookup waits for a writer's lock
KEPT_LIMIT = 16 * 2**20  # bytes of answers kept in memory per table (about 100 000 answers of short addresses)
ENTRY_COST = 40  # what one kept answer costs beyond sys.getsizeof of its key and value (the dict's slot)


def parse_spec(spec: str, name: str) -> tuple[str, str]:
    """`accounts:/var/lib/mailflow/accounts.db#mailboxes` -> (path, map). Raises ConfigError."""
    path, hash_mark, map_name = name.strip().rpartition("#")
    if not hash_mark or not path.strip():
        raise ConfigError("", spec, "expected accounts:PATH#MAP (e.g. accounts:/var/lib/mailflow/accounts.db"
                                    f"#mailboxes; MAP one of {', '.join(schema.MAPS)})")
    if map_name not in schema.MAPS:
        raise ConfigError("", spec, f"unknown account map {map_name!r}; the maps are {', '.join(schema.MAPS)}")
    return path.strip(), map_name


class AccountsTable:
    fixed = True
    blocking = False  # a dict lookup, or one indexed query (see the module doc)

    def __init__(self, name: str, path: Path, map_name: str, clock: Callable[[], float]):
        self.name = name
        self._path = path
        self._map = map_name
        self._clock = clock
        self._lock = threading.Lock()  # lookups may come from worker threads too (TableCache.run)
        self._conn: sqlite3.Connection | None = None
        self._seen: tuple[int, int] | None = None  # (data_version, inode) the kept answers belong to
        self._checked: float | None = None
        self._error = ""  # why the last look failed (until the next look, CHECK_INTERVAL later)
        self._kept: dict[str, str | None] = {}
        self._kept_bytes = 0  # of _kept's answers, as KEPT_LIMIT counts them

    def load(self) -> None:
        """Open the database and check it now (TableCache.preload calls it off the event loop). A database that
        cannot be read does not stop a server from starting: its lookups answer LookupRetry until it can."""
        with self._lock:
            try:
                self._fresh()
            except LookupRetry:
                pass

    def lookup(self, key: str) -> str | None:
        key = key.lower()
        with self._lock:
            self._fresh()
            if key in self._kept:
                return self._kept[key]
            try:
                value = schema.lookup(self._connection(), self._map, key)
            except sqlite3.Error as e:
                self._fail(e)
            self._keep(key, value)
            return value

    def _keep(self, key: str, value: str | None) -> None:
        size = sys.getsizeof(key) + (0 if value is None else sys.getsizeof(value)) + ENTRY_COST
        if self._kept_bytes + size > KEPT_LIMIT:
            self._forget()
        self._kept[key] = value
        self._kept_bytes += size

    def _forget(self) -> None:
        self._kept.clear()
        self._kept_bytes = 0

    def _fresh(self) -> None:
        """Drop the kept answers when the database changed (looked at once per CHECK_INTERVAL)."""
        now = self._clock()
        if self._checked is not None and now - self._checked < CHECK_INTERVAL:
            if self._error:
                raise LookupRetry(self._error)  # failed a moment ago: not asked again before the interval
            if self._conn is not None:
                return
        self._checked, self._error = now, ""
        try:
            inode = os.stat(self._path).st_ino
            if self._seen is not None and inode != self._seen[1]:
                self._close()  # another file now: read that one
            version = self._connection().execute("PRAGMA data_version").fetchone()[0]
        except (OSError, sqlite3.Error) as e:
            self._fail(e)
        if (version, inode) != self._seen:
            self._forget()
            self._seen = (version, inode)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = schema.connect(self._path, readonly=True, timeout=TIMEOUT)
            try:
                found = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.Error:
                conn.close()
                raise
            if found != schema.SCHEMA_VERSION:
                conn.close()
                raise sqlite3.DatabaseError(f"not an account database of schema {schema.SCHEMA_VERSION} "
                                            f"(user_version {found})")
            self._conn = conn
        return self._conn

    def _fail(self, error: BaseException) -> NoReturn:
        self._close()
        reason = getattr(error, "strerror", None) or str(error)
        self._error = f"table {self.name}: account database {self._path}: {reason}"
        raise LookupRetry(self._error) from None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._seen = None
        self._forget()
