"""check_greylist: the triplet store (SQLite, its own file, its own thread) and the greylisting rule.

    Greylist(config.greylist, path, clock)
    await greylist.check(client_ip, sender, recipient) -> bool     True: pass; False: defer (450 4.2.0)
    greylist.close()

The rule (postgrey's): the triplet (client network: the address within `ipv4_prefix`/`ipv6_prefix`, sender,
recipient) seen for the first time is deferred; a retry after `delay` and within `retry_window` of the first
attempt passes, and the triplet then passes for `lifetime` after its last use; a retry too late starts again.
Never greylisted: clients in `whitelist_networks`, senders of `whitelist_domains` (and their subdomains), and a
client network that passed `auto_whitelist_count` times (0: off; as postgrey, one pass an hour counts). Rows
unused for `lifetime`, and triplets that never passed and can no longer pass (past `delay` + `retry_window`),
are removed now and then, so a flood of one-off triplets is kept for days, not for `lifetime`.

The database is opened (created) by the greylist's one worker thread; every question is one short transaction
there, so the event loop never waits for the disk (synchronous=NORMAL: a crash may forget the last triplets,
which costs one more delay, never a message).

Failure behaviour: a database that cannot be made, read or written lets the mail pass (logged once per minute):
greylisting fails open, it never holds up mail on its own fault.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import sqlite3
import time
from pathlib import Path

from mailflow.address import client_ip, normalise_domain
from mailflow.address import split as split_address
from mailflow.files import keep_private
from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.smtpd")

SCHEMA = """
CREATE TABLE IF NOT EXISTS triplet (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (network, sender, recipient)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS client (
    network TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID;
"""
SWEEP_EVERY = 1000  # checks between removals of old rows
AUTO_WHITELIST_EVERY = 3600.0  # a client's passes count for auto-whitelisting once an hour at most (postgrey)


class Greylist:
    """See the module doc."""

    def __init__(self, config, path: str | Path, clock):
        self._config = config
        self._path = str(path)
        self._clock = clock
        self._networks = NetworkList.from_items(config.whitelist_networks, setting="greylist.whitelist_networks")
        self._domains = tuple(normalise_domain(d) for d in config.whitelist_domains)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="greylist")
        self._db: sqlite3.Connection | None = None  # the worker thread's
        self._checks = 0
        self._failed_at = 0.0

    async def check(self, client_addr: str, sender: str, recipient: str) -> bool:
        ip = client_ip(client_addr)
        if ip is None or self._networks.contains(client_addr) or self._whitelisted_sender(sender):
            return True
        prefix = self._config.ipv4_prefix if ip.version == 4 else self._config.ipv6_prefix
        network = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._check, network, sender.lower(), recipient.lower(),
                                              self._clock.time())
        except (sqlite3.Error, OSError) as e:  # OSError: its folder cannot be made
            if time.monotonic() - self._failed_at > 60:
                self._failed_at = time.monotonic()
                log.error("greylist %s: %s (mail passes ungreylisted)", self._path, e)
            return True

    def close(self) -> None:
        self._pool.submit(self._close)
        self._pool.shutdown(wait=True)

    def _whitelisted_sender(self, sender: str) -> bool:
        domain = normalise_domain(split_address(sender)[1]) if sender else ""
        return bool(domain) and any(domain == d or domain.endswith("." + d) for d in self._domains)

    # -------------------------------------------------------------------------------- the worker thread

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            keep_private(Path(self._path))  # (in the queue directory, which local users traverse, by default)
            db = sqlite3.connect(self._path, timeout=5, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _check(self, network: str, sender: str, recipient: str, now: float) -> bool:
        c = self._config
        db = self._connection()
        self._checks += 1
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._checks % SWEEP_EVERY == 0:
                # unused for `lifetime`, or never passed and too old to pass (a retry starts again anyway:
                # postgrey's maintenance); one scan of the table
                db.execute("DELETE FROM triplet WHERE last_seen < ? OR (passed = 0 AND first_seen < ?)",
                           (now - c.lifetime, now - c.delay - c.retry_window))
                db.execute("DELETE FROM client WHERE last_seen < ?", (now - c.lifetime,))
            passed = self._decide(db, network, sender, recipient, now)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return passed

    def _decide(self, db: sqlite3.Connection, network: str, sender: str, recipient: str, now: float) -> bool:
        c = self._config
        if c.auto_whitelist_count:
            row = db.execute("SELECT passes FROM client WHERE network = ?", (network,)).fetchone()
            if row is not None and row[0] >= c.auto_whitelist_count:
                db.execute("UPDATE client SET last_seen = ? WHERE network = ?", (now, network))
                return True
        key = (network, sender, recipient)
        row = db.execute("SELECT first_seen, last_seen, passed FROM triplet WHERE network = ? AND sender = ? AND"
                         " recipient = ?", key).fetchone()
        if row is not None:
            first_seen, last_seen, passed = row
            if passed and now - last_seen <= c.lifetime:
                db.execute("UPDATE triplet SET last_seen = ? WHERE network = ? AND sender = ? AND recipient = ?",
                           (now, *key))
                return True
            if not passed and c.delay <= now - first_seen <= c.delay + c.retry_window:
                db.execute("UPDATE triplet SET last_seen = ?, passed = 1 WHERE network = ? AND sender = ? AND"
                           " recipient = ?", (now, *key))
                db.execute("INSERT INTO client (network, passes, last_seen) VALUES (?, 1, ?) ON CONFLICT (network)"
                           " DO UPDATE SET passes = passes + 1, last_seen = excluded.last_seen"
                           " WHERE excluded.last_seen >= client.last_seen + ?", (network, now, AUTO_WHITELIST_EVERY))
                return True
            if not passed and now - first_seen < c.delay:
                return False  # too early: the first attempt's time stands
        db.execute("INSERT OR REPLACE INTO triplet (network, sender, recipient, first_seen, last_seen, passed)"
                   " VALUES (?, ?, ?, ?, ?, 0)", (*key, now, now))
        return False
