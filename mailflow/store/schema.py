"""The queue's schema: `mailflow/schema.sql` is the one schema, `SCHEMA_VERSION` its version.

What it owns
- `migrate(con)`: a new file gets the schema; an older queue is brought to it by `MIGRATIONS` (each step takes
  version v to v + 1), all steps in one transaction under the write lock, checked again once the lock is held
  (another process may have done it). Tables and indexes added since are created by `schema.sql` itself
  (`IF NOT EXISTS`).
- `convert_to_incremental_vacuum(con, path)`: a queue made before auto_vacuum is rebuilt once, by its server.

Failure behaviour
- A file of a newer schema is refused, naming both versions (`sqlite3.DatabaseError`); a failed migration is
  rolled back whole and raised. A conversion that fails (it needs about the file's size free: a full disk) is
  logged; the server starts anyway and tries again at its next start.
"""
from __future__ import annotations

import logging
import sqlite3
from importlib import resources
from pathlib import Path

log = logging.getLogger("mailflow.store")

SCHEMA_VERSION = 12

# The message table as schema version 9 made it, and the columns version 8 had (migration 8 copies them).
_MESSAGE_V8_COLUMNS = ("id, queue, sender, arrival, next_attempt, attempts, size, smtputf8, body_type, client, envid,"
                       " ret, warned, filter, client_name, client_address, client_port, helo_name, protocol_name,"
                       " sasl_method, sasl_username, sasl_sender, from_logged")
_MESSAGE_V9 = """CREATE TABLE message (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL DEFAULT 'incoming'
          CHECK (queue IN ('incoming', 'active', 'deferred', 'hold', 'corrupt', 'maildrop')),
    sender TEXT NOT NULL, arrival REAL NOT NULL, created REAL NOT NULL, next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL, smtputf8 INTEGER NOT NULL DEFAULT 0, body_type TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '', envid TEXT NOT NULL DEFAULT '', ret TEXT NOT NULL DEFAULT '',
    warned INTEGER NOT NULL DEFAULT 0, filter TEXT NOT NULL DEFAULT '',
    client_name TEXT NOT NULL DEFAULT '', client_address TEXT NOT NULL DEFAULT '',
    client_port TEXT NOT NULL DEFAULT '', helo_name TEXT NOT NULL DEFAULT '', protocol_name TEXT NOT NULL DEFAULT '',
    sasl_method TEXT NOT NULL DEFAULT '', sasl_username TEXT NOT NULL DEFAULT '', sasl_sender TEXT NOT NULL DEFAULT '',
    from_logged INTEGER NOT NULL DEFAULT 1, requeue INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID"""

# Steps for queues made by an older mailflow: MIGRATIONS[v] takes schema version v to v + 1.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # a content row may keep its body apart, or in a file (a v1 `data` stays the whole message)
    1: ("ALTER TABLE content ADD COLUMN body BLOB",
        "ALTER TABLE content ADD COLUMN file_offset INTEGER"),
    # results recorded per delivery job: the relay of each recipient and whether its notice is still owed
    2: ("ALTER TABLE recipient ADD COLUMN relay TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE recipient ADD COLUMN notice INTEGER NOT NULL DEFAULT 0"),
    # the after-queue content filter a message goes to (content_filter, FILTER actions)
    3: ("ALTER TABLE message ADD COLUMN filter TEXT NOT NULL DEFAULT ''",),
    # the client attributes Postfix keeps with a message, for the delivery agents ('' for mail queued before)
    4: tuple(f"ALTER TABLE message ADD COLUMN {column} TEXT NOT NULL DEFAULT ''" for column in (
        "client_name", "client_address", "client_port", "helo_name", "protocol_name", "sasl_method",
        "sasl_username", "sasl_sender")),
    # whether qmgr's from= line is logged yet (a message held on arrival gets it when it enters the active queue)
    5: ("ALTER TABLE message ADD COLUMN from_logged INTEGER NOT NULL DEFAULT 1",),
    # whether a recipient sent went to a gateway, for the action of its success notice owed (RcptResult.relayed)
    6: ("ALTER TABLE recipient ADD COLUMN relayed INTEGER NOT NULL DEFAULT 0",),
    # 7BIT now means BODY=7BIT was given (the SMTP client passes it on); before, it meant that or no BODY at all
    7: ("UPDATE message SET body_type = '' WHERE body_type = '7BIT'",),
    # a requeued message waits in the 'maildrop' queue for pickup to copy it (a new queue id), one requeued while
    # active is marked (`requeue`) until its attempt ends, and the copy's queue lifetime and backoff count from
    # `created` (a message queued before from its arrival): SQLite changes a CHECK constraint only by rebuilding
    # the table (its index comes back from schema.sql)
    8: ("ALTER TABLE message RENAME TO message_v8",
        "DROP INDEX IF EXISTS message_due",
        _MESSAGE_V9,
        f"INSERT INTO message ({_MESSAGE_V8_COLUMNS}, created) SELECT {_MESSAGE_V8_COLUMNS}, arrival FROM message_v8",
        "DROP TABLE message_v8"),
    # how local delivery expanded a recipient, for its notice owed (RcptResult.expanded, .expansion, .owner)
    9: tuple(f"ALTER TABLE recipient ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
             for column in ("expanded", "expansion", "owner")),
    # a command's Diagnostic-Code (x-unix; its output) and the failures told to several lists' owners, for the
    # notice owed (RcptResult.diagnostic, .owned)
    10: tuple(f"ALTER TABLE recipient ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
              for column in ("diagnostic", "owned")),
    # when a destination's rate delay pause ends, for `mailflow queue destinations`: the table is qmgr's snapshot,
    # written anew at each start, and older queues may not have it yet; schema.sql makes it again with the column
    11: ("DROP TABLE IF EXISTS destination",),
}


def migrate(con: sqlite3.Connection, upgrade: bool = True) -> None:
    """Bring the queue to SCHEMA_VERSION (create it when new). Without `upgrade` (an operator tool, which may run
    beside an older server still serving the queue) an older queue is refused rather than changed under that
    server, which would then not start again after a rollback: the server upgrades it when it starts."""
    version = _schema_version(con)
    if version is not None and version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"queue schema version {version} is newer than this mailflow ({SCHEMA_VERSION})")
    if version is not None and version < SCHEMA_VERSION and not upgrade:
        raise sqlite3.DatabaseError(f"queue schema version {version} is older than this mailflow ({SCHEMA_VERSION}):"
                                    " the server upgrades it when it starts (restart it with this mailflow first);"
                                    " the queue tools do not change it")
    if version is not None and version < SCHEMA_VERSION:
        con.execute("BEGIN IMMEDIATE")
        try:
            version = _schema_version(con) or version  # again, under the lock: another process may have done it
            for step in range(version, SCHEMA_VERSION):
                for sql in MIGRATIONS[step]:
                    con.execute(sql)
            con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:  # (SQLite has already rolled back after some errors)
                con.execute("ROLLBACK")
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


def convert_to_incremental_vacuum(con: sqlite3.Connection, path: Path) -> None:
    """A queue made before auto_vacuum is rebuilt once, by its server. It needs about the file's size free: when
    that fails (a full disk) the server starts anyway and tries again at its next start."""
    log.info("store: converting %s to incremental vacuum (once)", path)
    try:
        con.execute("PRAGMA auto_vacuum = INCREMENTAL")  # the VACUUM makes it so
        con.execute("VACUUM")
    except sqlite3.OperationalError as e:
        log.warning("store: %s stays without incremental vacuum for now: %s", path, e)
