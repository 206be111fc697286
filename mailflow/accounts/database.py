"""The changes `mailflow account …` makes to the account database, each checked and in one transaction.

    AccountDatabase.open(path, create=False)       create: make the file (0640) and its tables when missing
    domains: add_domain, remove_domain (refused while mailboxes or aliases use it), list_domains
    mailboxes: check_new_user(address), add_user(address, password, quota=0), remove_user, set_password, set_enabled,
               set_quota, get_user, list_users(domain=None)
    aliases: add_alias(address, targets), remove_alias(address, targets=()), list_aliases(domain=None)
    sender logins: add_sender(login, sender), remove_sender, list_senders(login=None)
    check_password(password, address, min_length) -> reason | None     the "weak input" rules
    parse_size("1G") -> bytes                                          quotas: 0, 500M, 1G (units of 1024), at
                                                                       most MAX_SIZE
    close()

Addresses and domains are stored in lower case, domains as IDNA A-labels (mailflow.address.normalise_domain).
A mailbox's home is `domain/local` under virtual_mailbox_base; its password is hashed here
(mailflow.passwords.argon2id_password), never stored or logged as given.

Failure behaviour: a refusal raises `AccountError(message, code)`: code 1 for what conflicts with the database
(unknown domain, duplicate user, no such user, a domain still in use), 2 for bad input (address syntax, weak
password, bad size); 75 (EX_TEMPFAIL) when the database is locked past the timeout or cannot be written; 1 when
the file is missing (without `create`) or is not an account database.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from mailflow.accounts import schema
from mailflow.address import mailbox_syntax_error, normalise_domain
from mailflow.passwords import argon2id_password, text_problem

LOCK_TIMEOUT = 5.0  # seconds a change waits for another writer (or a reader) to finish
MAX_PASSWORD = 1024  # bytes
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = (1 << 63) - 1  # the largest quota the database can hold

EX_CONFLICT, EX_INPUT, EX_TEMPFAIL = 1, 2, 75


class AccountError(Exception):
    def __init__(self, message: str, code: int = EX_CONFLICT):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Mailbox:
    address: str
    domain: str
    home: str
    quota: int
    enabled: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Alias:
    address: str
    targets: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"address": self.address, "targets": list(self.targets)}


def parse_size(text: str) -> int:
    """`0`, `1048576`, `500M`, `1G` (units of 1024, an optional trailing B) -> bytes. Raises AccountError."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and not value[-1:].isdigit() else ""
    number = value[:-1] if unit else value
    if not (number.isascii() and number.isdigit()):
        raise AccountError(f"{text!r} is not a size (bytes, or a number with K, M, G or T: 500M, 1G)", EX_INPUT)
    size = int(number) * _SIZE_UNITS[unit]
    if size > MAX_SIZE:  # (SQLite's INTEGER: a bigger one was an OverflowError, a traceback or an HTTP 500)
        raise AccountError(f"{text!r} is too big a size (at most {MAX_SIZE} bytes)", EX_INPUT)
    return size


def check_password(password: str, address: str, min_length: int) -> str | None:
    """Why `password` may not be used for `address` (too short, too long, the address or its local part, a
    character AUTH PLAIN cannot carry), or None."""
    if len(password) < min_length:
        return f"too short: at least {min_length} characters"
    problem = text_problem(password)
    if problem:
        return problem
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        return f"too long: at most {MAX_PASSWORD} bytes"
    if password.lower() in (address.lower(), address.partition("@")[0].lower()):
        return "the same as the address"
    return None


def _domain(text: str) -> str:
    domain = normalise_domain(text)
    if not domain or domain.startswith("[") or mailbox_syntax_error(f"x@{domain}"):
        raise AccountError(f"{text!r} is not a domain name", EX_INPUT)
    return domain


def _address(text: str) -> tuple[str, str, str]:
    """(address, local, domain), normalised; the local part must also be a safe directory name."""
    local, at, domain_text = text.strip().rpartition("@")
    if not at or mailbox_syntax_error(text.strip()):
        raise AccountError(f"{text!r} is not an address (local@domain)", EX_INPUT)
    local = local.lower()
    if local.startswith((".", '"', "-")) or "/" in local:
        raise AccountError(f"{text!r}: the local part cannot name a mailbox directory (a leading '.', '-' or "
                           "'\"', or a '/')", EX_INPUT)
    domain = _domain(domain_text)
    return f"{local}@{domain}", local, domain


class AccountDatabase:
    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | Path, *, create: bool = False) -> "AccountDatabase":
        path = Path(path)
        if not path.exists() and not create:
            raise AccountError(f"no account database at {path} (`mailflow account init` creates it)")
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
            conn = schema.connect(path, readonly=False, timeout=LOCK_TIMEOUT)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                conn.execute("PRAGMA journal_mode = DELETE")
                with _transaction(conn):
                    for statement in schema.DDL.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")
                version = schema.SCHEMA_VERSION
        except FileExistsError:
            return cls.open(path, create=False)
        except (OSError, sqlite3.Error) as e:
            raise _failure(e, path) from None
        if version != schema.SCHEMA_VERSION:
            conn.close()
            raise AccountError(f"{path} is not an account database of schema {schema.SCHEMA_VERSION} "
                               f"(user_version {version})")
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    # -------------------------------------------------------------------------------- domains

    def add_domain(self, name: str) -> str:
        domain = _domain(name)
        with self._change():
            if self._one("SELECT 1 FROM domain WHERE name = ?", domain):
                raise AccountError(f"domain {domain} exists already")
            self._conn.execute("INSERT INTO domain (name, created) VALUES (?, ?)", (domain, int(time.time())))
        return domain

    def remove_domain(self, name: str) -> str:
        domain = _domain(name)
        with self._change():
            self._need_domain(domain)
            users = self._count("SELECT count(*) FROM mailbox WHERE domain = ?", domain)
            aliases = self._count("SELECT count(DISTINCT address) FROM alias WHERE domain = ?", domain)
            if users or aliases:
                raise AccountError(f"domain {domain} still has {users} mailbox(es) and {aliases} alias(es): "
                                   "remove them first")
            self._conn.execute("DELETE FROM domain WHERE name = ?", (domain,))
        return domain

    def list_domains(self) -> list[str]:
        return [row[0] for row in self._read("SELECT name FROM domain ORDER BY name")]

    # -------------------------------------------------------------------------------- mailboxes

    def check_new_user(self, address: str) -> str:
        """The normalised address, when a mailbox may be added for it (before asking for its password)."""
        addr, _, domain = _address(address)
        self._need_domain(domain)
        if self._one("SELECT 1 FROM mailbox WHERE address = ?", addr):
            raise AccountError(f"user {addr} exists already")
        return addr

    def add_user(self, address: str, password: str, *, quota: int = 0) -> Mailbox:
        addr, local, domain = _address(address)
        with self._change():
            self._need_domain(domain)
            if self._one("SELECT 1 FROM mailbox WHERE address = ?", addr):
                raise AccountError(f"user {addr} exists already")
            self._conn.execute(
                "INSERT INTO mailbox (address, domain, password, home, quota, enabled, created) "
                "VALUES (?, ?, ?, ?, ?, 1, ?)",
                (addr, domain, argon2id_password(password), f"{domain}/{local}", quota, int(time.time())))
        return self.get_user(addr)

    def remove_user(self, address: str) -> Mailbox:
        user = self.get_user(address)
        with self._change():
            self._conn.execute("DELETE FROM mailbox WHERE address = ?", (user.address,))
        return user

    def set_password(self, address: str, password: str) -> Mailbox:
        return self._update(address, "password = ?", argon2id_password(password))

    def set_enabled(self, address: str, enabled: bool) -> Mailbox:
        return self._update(address, "enabled = ?", int(enabled))

    def set_quota(self, address: str, quota: int) -> Mailbox:
        return self._update(address, "quota = ?", quota)

    def get_user(self, address: str) -> Mailbox:
        addr = _address(address)[0]
        rows = self._read("SELECT address, domain, home, quota, enabled FROM mailbox WHERE address = ?", addr)
        if not rows:
            raise AccountError(f"no such user: {addr}")
        return _mailbox(rows[0])

    def list_users(self, domain: str | None = None) -> list[Mailbox]:
        if domain is None:
            rows = self._read("SELECT address, domain, home, quota, enabled FROM mailbox ORDER BY domain, address")
        else:
            rows = self._read("SELECT address, domain, home, quota, enabled FROM mailbox WHERE domain = ? "
                              "ORDER BY address", _domain(domain))
        return [_mailbox(row) for row in rows]

    def _update(self, address: str, assignment: str, value: object) -> Mailbox:
        addr = _address(address)[0]
        with self._change():
            if self._conn.execute(f"UPDATE mailbox SET {assignment} WHERE address = ?", (value, addr)).rowcount == 0:
                raise AccountError(f"no such user: {addr}")
        return self.get_user(addr)

    # -------------------------------------------------------------------------------- aliases

    def add_alias(self, address: str, targets: list[str]) -> Alias:
        source, domain = self._alias_address(address)
        checked = []
        for target in targets:
            if mailbox_syntax_error(target.strip()):
                raise AccountError(f"alias target {target!r} is not an address (local@domain)", EX_INPUT)
            local, _, target_domain = target.strip().rpartition("@")
            checked.append(f"{local.lower()}@{normalise_domain(target_domain)}")
        if not checked:
            raise AccountError("an alias needs at least one target address", EX_INPUT)
        with self._change():
            self._need_domain(domain)
            for target in checked:
                self._conn.execute("INSERT OR IGNORE INTO alias (address, domain, target) VALUES (?, ?, ?)",
                                   (source, domain, target))
        return self._alias(source)

    def remove_alias(self, address: str, targets: Sequence[str] = ()) -> Alias:
        source, _ = self._alias_address(address)
        alias = self._alias(source)
        if not alias.targets:
            raise AccountError(f"no such alias: {source}")
        with self._change():
            if not targets:
                self._conn.execute("DELETE FROM alias WHERE address = ?", (source,))
            for target in targets:
                found = self._conn.execute("DELETE FROM alias WHERE address = ? AND target = ?",
                                           (source, target.strip().lower())).rowcount
                if not found:
                    raise AccountError(f"alias {source} has no target {target}")
        return alias

    def list_aliases(self, domain: str | None = None) -> list[Alias]:
        if domain is None:
            rows = self._read("SELECT address, target FROM alias ORDER BY domain, address, rowid")
        else:
            rows = self._read("SELECT address, target FROM alias WHERE domain = ? ORDER BY address, rowid",
                              _domain(domain))
        grouped: dict[str, list[str]] = {}
        for source, target in rows:
            grouped.setdefault(source, []).append(target)
        return [Alias(source, tuple(targets)) for source, targets in grouped.items()]

    def _alias(self, source: str) -> Alias:
        rows = self._read("SELECT target FROM alias WHERE address = ? ORDER BY rowid", source)
        return Alias(source, tuple(row[0] for row in rows))

    def _alias_address(self, text: str) -> tuple[str, str]:
        """`local@domain` or `@domain` (a catch-all) -> (normalised, domain)."""
        if text.strip().startswith("@"):
            domain = _domain(text.strip()[1:])
            return f"@{domain}", domain
        addr, _, domain = _address(text)
        return addr, domain

    # -------------------------------------------------------------------------------- sender logins

    def add_sender(self, login: str, sender: str) -> tuple[str, str]:
        user = self.get_user(login)
        owned, _ = self._alias_address(sender)
        with self._change():
            self._conn.execute("INSERT OR IGNORE INTO sender_login (sender, login) VALUES (?, ?)",
                               (owned, user.address))
        return owned, user.address

    def remove_sender(self, login: str, sender: str) -> tuple[str, str]:
        user = self.get_user(login)
        owned, _ = self._alias_address(sender)
        with self._change():
            if not self._conn.execute("DELETE FROM sender_login WHERE sender = ? AND login = ?",
                                      (owned, user.address)).rowcount:
                raise AccountError(f"{user.address} has no sender login {owned}")
        return owned, user.address

    def list_senders(self, login: str | None = None) -> list[tuple[str, str]]:
        if login is None:
            return [tuple(r) for r in self._read("SELECT sender, login FROM sender_login ORDER BY login, sender")]
        user = self.get_user(login)
        return [tuple(r) for r in self._read("SELECT sender, login FROM sender_login WHERE login = ? "
                                             "ORDER BY sender", user.address)]

    # -------------------------------------------------------------------------------- plumbing

    def _need_domain(self, domain: str) -> None:
        if not self._one("SELECT 1 FROM domain WHERE name = ?", domain):
            raise AccountError(f"unknown domain {domain} (`mailflow account domain add {domain}` adds it)")

    def _one(self, sql: str, *args: object) -> tuple | None:
        return self._conn.execute(sql, args).fetchone()

    def _count(self, sql: str, *args: object) -> int:
        """A `SELECT count(...)` (always one row)."""
        row = self._one(sql, *args)
        return int(row[0]) if row is not None else 0

    def _read(self, sql: str, *args: object) -> list[tuple]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise _failure(e, self.path) from None

    def _change(self):
        return _transaction(self._conn, self.path)


class _transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on any exception); SQLite errors become AccountError."""

    def __init__(self, conn: sqlite3.Connection, path: Path | None = None):
        self._conn = conn
        self._path = path

    def __enter__(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise _failure(e, self._path) from None

    def __exit__(self, kind, error, tb) -> None:
        try:
            self._conn.execute("COMMIT" if kind is None else "ROLLBACK")
        except sqlite3.Error as e:
            if kind is None:
                raise _failure(e, self._path) from None
        if isinstance(error, sqlite3.Error):
            raise _failure(error, self._path) from None


def _failure(error: BaseException, path: Path | None) -> AccountError:
    busy = isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
    reason = getattr(error, "strerror", None) or str(error)
    return AccountError(f"account database {path}: {reason}", EX_TEMPFAIL if busy or isinstance(error, OSError)
                        else EX_CONFLICT)


def _mailbox(row: tuple) -> Mailbox:
    address, domain, home, quota, enabled = row
    return Mailbox(address, domain, home, int(quota), bool(enabled))

