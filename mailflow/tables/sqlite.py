"""`sqlite:/path.cf` tables (sqlite_table(5)): the one table type whose lookup may wait (`blocking = True`).

The .cf file: `dbpath = …`, `query = SELECT … WHERE k='%s'`; `%s` the key, `%u` its local part, `%d` its domain
(no domain or an empty local part: not found, no query), `%%` a percent sign; values SQL-quoted (quotes
doubled). The key is case-folded first (syntax.fold_key: `Straße@x` is asked as `strasse@x`), as Postfix folds
the key of every case-insensitive table under smtputf8_enable. The database is opened read-only; rows are joined
with commas. `timeout = seconds` (default SQLITE_TIMEOUT, as ldap_table(5)'s timeout): a query still running (or
waiting for a lock) past it is aborted. Callers on the event loop ask through `TableCache.run`, which moves the
lookup to a worker thread.

Failure behaviour: a bad .cf raises `ConfigError(cf file, key, reason)` when the table is opened; a database
error, a database file that is not a regular file (a FIFO would hold SQLite at open) or a query past its
deadline raises `LookupRetry` naming the table.
"""
from __future__ import annotations

import re
import sqlite3
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from mailflow.errors import ConfigError, LookupRetry
from mailflow.files import TEXT_LIMIT, check_regular_file, read_regular_file
from mailflow.syntax import fold_key
from mailflow.tables.base import resolve_path
from mailflow.tables.files import BLANKS, logical_lines

SQLITE_TIMEOUT = 5.0  # seconds a sqlite lookup may take, unless its .cf says `timeout = ...`

_SQLITE_KEYS = ("dbpath", "query", "timeout")
_SQLITE_REQUIRED = ("dbpath", "query")
_ESCAPES = re.compile(r"%(.?)", re.DOTALL)
_PROGRESS_STEPS = 1000  # SQLite VM instructions between two looks at the clock


class SqliteTable:
    """sqlite_table(5). The .cf file is read when the table is opened (a ConfigError if it is bad); the
    database is opened read-only at the first lookup in each thread (lookups run in worker threads, see
    TableCache.run) and again after any error. A query past its deadline is interrupted (SQLite's progress
    handler), a lock is waited for at most until the deadline (busy timeout): LookupRetry either way."""

    fixed = True
    blocking = True

    def __init__(self, name: str, cf: Path, base_dir: Path | None):
        self.name = name
        settings = _read_cf(name, cf)
        self._db = resolve_path(settings["dbpath"], base_dir)
        self._query = settings["query"]
        self.timeout = _timeout(cf, settings.get("timeout"))
        for m in _ESCAPES.finditer(self._query):
            if m.group(1) not in ("s", "u", "d", "%"):
                raise ConfigError(str(cf), "query", f"unknown expansion %{m.group(1)} (mailflow has %s, %u, "
                                                    "%d and %%)")
        self._local = threading.local()  # this thread's connection and the deadline of its query

    def lookup(self, key: str) -> str | None:
        key = fold_key(key)  # as Postfix's dict_utf8_check_fold folds a case-insensitive table's query key
        local, at, domain = key.rpartition("@")
        if not at:
            local, domain = key, ""
        values = {"s": key, "u": local, "d": domain, "%": "%"}
        if "\0" in key or (not local and "%u" in self._query) or (not domain and "%d" in self._query):
            return None  # sqlite_table(5): the query is suppressed; nothing can match
        sql = _ESCAPES.sub(lambda m: "%" if m.group(1) == "%" else values[m.group(1)].replace("'", "''"),
                           self._query)
        self._local.deadline = time.monotonic() + self.timeout
        try:
            rows = self._connection().execute(sql).fetchall()
        except sqlite3.Error as e:
            self._close()
            reason = f"no answer within {self.timeout:g}s" if self._late() else str(e)
            raise LookupRetry(f"table {self.name}: database {self._db}: {reason}") from None
        found = [str(row[0]) for row in rows if row and row[0] is not None]
        return ",".join(found) if found else None

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:  # SQLite would wait at open() on a FIFO for ever, and a device is no database
                check_regular_file(self._db, sys.maxsize)
            except OSError as e:
                raise LookupRetry(f"table {self.name}: database {self._db}: {e.strerror}") from None
            uri = f"file:{urllib.parse.quote(str(self._db))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, check_same_thread=False)
            conn.set_progress_handler(self._late, _PROGRESS_STEPS)
            self._local.conn = conn
        return conn

    def _late(self) -> bool:
        """SQLite's progress handler: True (abort the statement) once this thread's query is past its deadline."""
        return time.monotonic() > getattr(self._local, "deadline", float("inf"))

    def _close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _timeout(cf: Path, value: str | None) -> float:
    if value is None:
        return SQLITE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(str(cf), "timeout", f"expected seconds (more than 0, at most 3600), got {value!r}")
    return seconds


def _read_cf(name: str, cf: Path) -> dict[str, str]:
    try:
        text = read_regular_file(cf, TEXT_LIMIT).decode("utf-8")
        lines = logical_lines(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(cf), "", f"cannot read sqlite table config: {getattr(e, 'strerror', None) or e}")
    except ValueError as e:
        raise ConfigError(str(cf), "", str(e))
    settings: dict[str, str] = {}
    for number, line in lines:
        key, eq, value = line.partition("=")
        key = key.strip(BLANKS)
        if not eq:
            raise ConfigError(str(cf), f"line {number}", "expected 'name = value'")
        if key not in _SQLITE_KEYS:
            raise ConfigError(str(cf), key, f"unknown parameter (mailflow's sqlite tables have "
                                            f"{', '.join(_SQLITE_KEYS)})")
        settings[key] = value.strip(BLANKS)
    for key in _SQLITE_REQUIRED:
        if not settings.get(key):
            raise ConfigError(str(cf), key, "missing (sqlite tables need dbpath and query)")
    return settings
