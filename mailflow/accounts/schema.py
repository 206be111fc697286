"""The account database's tables, and the maps the routing stages read from it.

Tables (addresses and domains stored in lower case, domains as IDNA A-labels):
    domain(name, created)                          the hosted (virtual mailbox) domains
    mailbox(address, domain, password, home, quota, enabled, created)
        password  a scheme-prefixed hash Dovecot verifies natively (`{ARGON2ID}$argon2id$…`, mailflow.passwords)
        home      `domain/local`, relative to virtual_mailbox_base; the Maildir is `home/Maildir/`
        quota     bytes, 0 = none;  enabled  0 = no login anywhere (SMTP AUTH, IMAP, POP3); mail still arrives
    alias(address, domain, target)                 `local@domain` or `@domain` (catch-all) -> one target per row
    sender_login(sender, login)                    `login` (a mailbox) may use MAIL FROM `sender` (an address
                                                   or `@domain`); every mailbox owns its own address besides
The file uses SQLite's rollback journal (not WAL), so that any reader with read access to the file alone
(Dovecot's auth worker, mailflow running as another user) can read it; `user_version` is SCHEMA_VERSION.

The maps (`MAPS`: name -> what a key finds), each a Postfix-style table keyed by address (or domain):
    domains    domain -> the domain                                   virtual_mailbox_domains
    mailboxes  address -> `home/Maildir/`                             virtual_mailbox_maps
    aliases    address or @domain -> targets, joined with ", "; a mailbox of a domain with a catch-all answers
               itself, so that the catch-all never swallows a real mailbox (virtual(5)'s advice)
                                                                      virtual_alias_maps
    passwords  address of an enabled mailbox -> its hash              smtpd.sasl_user_maps
    senders    sender address or @domain -> its logins, joined with ","  smtpd.sender_login_maps
    quotas     address -> quota bytes (mailboxes with a quota only)   virtual_mailbox_limit_maps

    connect(path, *, readonly, timeout) -> sqlite3.Connection
    lookup(conn, map, key) -> str | None          key as the tables give it (lower case)

Failure behaviour: `connect` and `lookup` raise sqlite3.Error (a missing file included: read-only opening does not
create one), `connect` OSError for a file that is not a regular file; the callers say what it means to their user.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import urllib.parse
from pathlib import Path

from mailflow.files import check_regular_file

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS domain (
    name TEXT PRIMARY KEY,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mailbox (
    address TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domain(name),
    password TEXT NOT NULL,
    home TEXT NOT NULL,
    quota INTEGER NOT NULL DEFAULT 0,
    enabled INTEGER NOT NULL DEFAULT 1,
    created INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS mailbox_domain ON mailbox(domain);
CREATE TABLE IF NOT EXISTS alias (
    address TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domain(name),
    target TEXT NOT NULL,
    PRIMARY KEY (address, target)
);
CREATE INDEX IF NOT EXISTS alias_domain ON alias(domain);
CREATE TABLE IF NOT EXISTS sender_login (
    sender TEXT NOT NULL,
    login TEXT NOT NULL REFERENCES mailbox(address) ON DELETE CASCADE,
    PRIMARY KEY (sender, login)
);
CREATE INDEX IF NOT EXISTS sender_login_login ON sender_login(login);
"""

MAILDIR = "Maildir/"  # under each mailbox's home

MAPS = {
    "domains": "virtual_mailbox_domains",
    "mailboxes": "virtual_mailbox_maps",
    "aliases": "virtual_alias_maps",
    "passwords": "smtpd.sasl_user_maps",
    "senders": "smtpd.sender_login_maps",
    "quotas": "virtual_mailbox_limit_maps",
}

_SINGLE = {
    "domains": "SELECT name FROM domain WHERE name = ?",
    "mailboxes": f"SELECT home || '/{MAILDIR}' FROM mailbox WHERE address = ?",
    "passwords": "SELECT password FROM mailbox WHERE address = ? AND enabled = 1",
    "quotas": "SELECT quota FROM mailbox WHERE address = ? AND quota > 0",
}
_ALIASES = "SELECT target FROM alias WHERE address = ? ORDER BY rowid"
_CATCH_ALL_MAILBOX = ("SELECT address FROM mailbox WHERE address = ? AND EXISTS "
                      "(SELECT 1 FROM alias WHERE alias.address = '@' || mailbox.domain)")
_SENDERS = ("SELECT login FROM sender_login WHERE sender = ?1 "
            "UNION SELECT address FROM mailbox WHERE address = ?1 ORDER BY 1")


def connect(path: Path | str, *, readonly: bool, timeout: float) -> sqlite3.Connection:
    """A connection to the database at `path`; `readonly` never creates nor changes it. `timeout`: seconds to
    wait for a writer's lock. Raises OSError (RefusedFile) for a file that is there but not a regular file: SQLite
    would wait at open() on a FIFO for ever."""
    if os.path.lexists(path):
        check_regular_file(path, sys.maxsize)
    mode = "ro" if readonly else "rwc"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False, isolation_level=None)
    if not readonly:
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def lookup(conn: sqlite3.Connection, map_name: str, key: str) -> str | None:
    """What `map_name` (one of MAPS) gives for `key`, or None. Raises sqlite3.Error."""
    if map_name in _SINGLE:
        row = conn.execute(_SINGLE[map_name], (key,)).fetchone()
        return None if row is None else str(row[0])
    if map_name == "aliases":
        targets = [row[0] for row in conn.execute(_ALIASES, (key,))]
        if targets:
            return ", ".join(targets)
        row = conn.execute(_CATCH_ALL_MAILBOX, (key,)).fetchone()
        return None if row is None else row[0]
    if map_name == "senders":
        logins = [row[0] for row in conn.execute(_SENDERS, (key,))]
        return ",".join(logins) if logins else None
    raise KeyError(map_name)
