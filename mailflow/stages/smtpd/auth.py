"""smtpd's AUTH: password hashes, the user table, failure slow-down, and sender-login ownership.

What it owns
- The password hash format: `$scrypt$n=16384,r=8,p=1$SALT$HASH` (stdlib `hashlib.scrypt`; SALT and HASH in
  unpadded standard base64; a 16-byte salt and a 32-byte hash). `hash_password()` makes one (the CLI's
  `mailflow auth hash-password`), `verify_password()` checks one in constant time. Cost parameters above
  `MAX_N` or `MAX_R`/`MAX_P` are refused (a hostile table entry cannot pin the CPU).
- `PasswordHasher(workers)`: its own small thread pool for scrypt (never the loop's default executor, which
  mailbox writes use), so an AUTH flood uses at most `workers` cores and delays nothing else. `close()`.
- `FailureCounter`: failed AUTH attempts per client IP within a sliding window; one per server, shared by all
  listeners; bounded (at most `max_clients` addresses, `per_client` times each; stale ones swept first).
- `Authenticator`: checks a login and password against `sasl_user_maps` (`user HASH` lines, e.g. texthash).
  Before hashing, an attempt waits `auth_failure_delay * 2**(failures-1)` (at most `auth_failure_delay_limit`)
  for the client's recent failures, so a flood is throttled before it costs CPU. A user not in the table costs
  the same hash (no timing oracle). An AUTH PLAIN authorization identity other than the login is refused
  (as Cyrus and Dovecot do without proxy rights): 535 5.7.8. Each failure is logged in Postfix's words
  (`warning: host[ip]: SASL PLAIN authentication failed: …, sasl_username=…`).
- `SenderLogins.sender_login_mismatch(session, sender)`: Postfix's reject_sender_login_mismatch with
  `sender_login_maps` (sender address or @domain -> logins, separated by commas or spaces): a mismatch when the
  maps name owners and the client is not logged in as one of them, or when the client is logged in and its
  login does not own the sender. The null sender never mismatches. Without maps, a login owns only the
  address equal to it.

Failure behaviour: a table that cannot answer raises nothing here: AUTH answers 454 4.7.0 (try later) and the
attempt does not count as a failure; `sender_login_mismatch` lets `LookupRetry` through for the caller to
answer 451 4.3.0. Passwords never reach a log line.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import logging
import re
import secrets
from collections import deque
from dataclasses import dataclass

from mailflow import status
from mailflow.address import client_ip
from mailflow.clock import Clock
from mailflow.config import DEFAULTS
from mailflow.errors import LookupRetry
from mailflow.logs import SmtpdLog, printable
from mailflow.tables import Table, find_address

log = logging.getLogger("mailflow.smtpd")

DEFAULT_N, DEFAULT_R, DEFAULT_P = 16384, 8, 1
MAX_N, MAX_R, MAX_P = 1 << 20, 32, 16
SALT_BYTES, HASH_BYTES = 16, 32
_FORMAT = re.compile(r"\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


# ---------------------------------------------------------------------------------------------- hashes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * r * (n + p + 2))


def hash_password(password: str | bytes, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P,
                  salt: bytes | None = None) -> str:
    """`$scrypt$n=N,r=R,p=P$SALT$HASH` for `password` (UTF-8 when a str)."""
    secret = password.encode() if isinstance(password, str) else password
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p, HASH_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(encoded: str) -> ScryptHash | None:
    """The parts of a stored hash, or None when it is not one this module accepts."""
    m = _FORMAT.fullmatch(encoded.strip())
    if not m:
        return None
    n, r, p = (int(g) for g in m.group(1, 2, 3))
    if n < 2 or n & (n - 1) or n > MAX_N or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        return None
    salt, digest = _unb64(m.group(4)), _unb64(m.group(5))
    if not salt or len(digest) < 16:
        return None
    return ScryptHash(n, r, p, salt, digest)


_DUMMY = ScryptHash(DEFAULT_N, DEFAULT_R, DEFAULT_P, b"\0" * SALT_BYTES, b"\0" * HASH_BYTES)


def verify_password(password: bytes, encoded: str | None) -> bool:
    """True when `password` matches `encoded`. A missing or malformed hash costs a default-cost hash and is
    False, so the time taken does not say whether the user exists."""
    stored = parse_hash(encoded) if encoded else None
    check = stored or _DUMMY
    computed = _scrypt(password, check.salt, check.n, check.r, check.p, len(check.digest))
    return hmac.compare_digest(computed, check.digest) and stored is not None


# ---------------------------------------------------------------------------------------------- failures


class FailureCounter:
    """Failed AUTH attempts per client IP within a sliding window of `window` seconds, bounded in memory: at
    most `per_client` times per address (enough for the longest delay) and `max_clients` addresses (past it,
    addresses without a recent failure go first, then the oldest)."""

    def __init__(self, clock: Clock, window: float, *, max_clients: int = 10_000, per_client: int = 32):
        self._clock = clock
        self._window = window
        self._max_clients = max_clients
        self._per_client = per_client
        self._failures: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def recent(self, ip: str) -> int:
        times = self._failures.get(ip)
        if not times:
            return 0
        self._expire(times)
        if not times:
            del self._failures[ip]
        return len(times)

    def record(self, ip: str) -> int:
        """Count one failure; return the recent failures including this one."""
        count = self.recent(ip) + 1
        times = self._failures.pop(ip, None) or deque(maxlen=self._per_client)
        times.append(self._clock.time())
        self._failures[ip] = times  # (re)inserted last: the dict's order is least recently failed first
        if len(self._failures) > self._max_clients:
            self._shrink()
        return min(count, self._per_client)

    def _expire(self, times: deque[float]) -> None:
        horizon = self._clock.time() - self._window
        while times and times[0] <= horizon:
            times.popleft()

    def _shrink(self) -> None:
        for ip in list(self._failures):
            self._expire(self._failures[ip])
            if not self._failures[ip]:
                del self._failures[ip]
        while len(self._failures) > self._max_clients:
            del self._failures[next(iter(self._failures))]


class PasswordHasher:
    """scrypt checks on a small pool of threads of their own."""

    def __init__(self, workers: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mailflow-auth")

    async def verify(self, password: bytes, stored: str | None) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, verify_password, password, stored)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def failure_delay(failures: int, base: float, limit: float) -> float:
    """Seconds to wait before answering the `failures`-th recent failure: base, 2*base, 4*base … <= limit."""
    if failures <= 0 or base <= 0:
        return 0.0
    return min(limit, base * 2 ** min(failures - 1, 30))


# ---------------------------------------------------------------------------------------------- AUTH


@dataclass(frozen=True)
class AuthOutcome:
    login: str | None  # set when the password matched
    reply: status.Reply


class Authenticator:
    """Checks AUTH credentials against the user tables; slows down and logs failures per client IP.
    `failures` and `hasher` are the server's (shared by its listeners)."""

    def __init__(self, tables: list[Table], *, clock: Clock, failures: FailureCounter, hasher: PasswordHasher,
                 delay: float, delay_limit: float, smtpd_log: SmtpdLog | None = None):
        self._tables = tables
        self._clock = clock
        self._delay = delay
        self._delay_limit = delay_limit
        self.failures = failures
        self._hasher = hasher
        self._log = smtpd_log or SmtpdLog()

    def stored_hash(self, login: str) -> str | None:
        """The hash the tables hold for `login` (None: no such user). Raises LookupRetry."""
        for table in self._tables:
            value = table.lookup(login)
            if value is not None:
                return value.strip()
        return None

    async def check(self, client_ip: str, mechanism: str, login: bytes, password: bytes, *,
                    authzid: bytes = b"", client: str = "") -> AuthOutcome:
        """`client` is `host[ip]` for the log (default `unknown[client_ip]`)."""
        client = client or f"unknown[{client_ip}]"
        name = login.decode("utf-8", "replace")
        delay = failure_delay(self.failures.recent(client_ip), self._delay, self._delay_limit)
        if delay:
            await self._clock.sleep(delay)  # before the hash: a client that keeps failing costs no more CPU
        if authzid and authzid != login:
            return self._failed(client_ip, client, mechanism, name, "authorization identity differs from login")
        try:
            stored = self.stored_hash(name) if _plausible_login(name) else None
        except LookupRetry as e:
            log.warning("%s: SASL %s: user table: %s", client, mechanism, e.reason)
            return AuthOutcome(None, status.AUTH_UNAVAILABLE)
        if await self._hasher.verify(password, stored):
            return AuthOutcome(name, status.AUTH_OK)
        return self._failed(client_ip, client, mechanism, name, "authentication failure")

    def _failed(self, client_ip: str, client: str, mechanism: str, name: str, reason: str) -> AuthOutcome:
        self.failures.record(client_ip)
        self._log.auth_failed(client, mechanism, reason, printable(name[:64]))
        return AuthOutcome(None, status.AUTH_FAILED)


def _plausible_login(name: str) -> bool:
    return 0 < len(name) <= 256 and name.isprintable() and not any(c.isspace() for c in name)


# ---------------------------------------------------------------------------------------------- sender logins


def login_of(session) -> str | None:
    """The login of an authenticated aiosmtpd session (what Authenticator put in auth_data), else None."""
    data = session.auth_data
    return data if session.authenticated and isinstance(data, str) else None


class SenderLogins:
    """smtpd_sender_login_maps: which logins own a sender address."""

    def __init__(self, tables: list[Table], *, delimiter: str = DEFAULTS.recipient_delimiter):
        self._tables = tables
        self._delimiter = delimiter

    def owners(self, sender: str) -> set[str] | None:
        """The logins the maps give for `sender` (lower case), or None when no map lists it. Raises LookupRetry."""
        found = find_address(self._tables, sender, delimiter=self._delimiter) if self._tables else None
        if found is None:
            return None
        _table, _key, value = found
        return {v.lower() for v in re.split(r"[\s,]+", value) if v}

    def sender_login_mismatch(self, session, sender: str) -> bool:
        """Postfix reject_sender_login_mismatch for MAIL FROM `sender` ("" or "<>": the null sender)."""
        if sender in ("", "<>"):
            return False
        login = login_of(session)
        if not self._tables:  # no maps: a login owns the address spelled like it
            owners = {sender.lower()}
        else:
            owners = self.owners(sender) or set()
        if login is None:
            return bool(owners) and bool(self._tables)  # the maps name an owner; the client is not logged in
        return login.lower() not in owners


def is_loopback(ip: str) -> bool:
    addr = client_ip(ip)
    return addr is not None and addr.is_loopback
