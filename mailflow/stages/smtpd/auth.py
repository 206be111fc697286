"""smtpd's AUTH: password hashes, the user table, failure slow-down, and sender-login ownership.

What it owns
- Password hashes are mailflow.passwords' (Argon2id with Dovecot's `{ARGON2ID}` prefix, mailflow's `$scrypt$`);
  `hash_password`, `parse_hash` and `verify_password` are re-exported here for the callers that know them here.
- `PasswordHasher(workers)`: its own small thread pool for the checks (never the loop's default executor, which
  mailbox writes use), so an AUTH flood uses at most `workers` cores and delays nothing else. `close()`.
- `FailureCounter`: failed AUTH attempts per client IP within a sliding window (anvil_rate_time_unit; a reload's
  through `retime`); one per server, shared by all listeners; bounded (at most `max_clients` addresses,
  `per_client` times each; stale ones swept first).
- Two back ends behind one `Backend.verify(login, password, secured=, client_ip=, local_ip=) -> Verdict`
  (login / failed / unavailable): `TableBackend` (smtpd.sasl_type "mailflow": the hash `sasl_user_maps` hold,
  `user HASH` lines or the account database, asked through `run`, TableCache.run, so a sqlite table waits in a
  worker thread) and `DovecotBackend` (sasl_type "dovecot": dovecot_auth.DovecotAuth asks Dovecot's auth server).
- `Authenticator`: the AUTH check around a back end. Before checking, an attempt waits
  `auth_failure_delay * 2**(failures-1)` (at most `auth_failure_delay_limit`) for the client's recent
  failures, so a flood is throttled before it costs CPU. The wait is on the `clock` it is given: the server
  gives it real time (the client waits on the wire, as for error_sleep_time), not its own clock, which may be a
  virtual one standing still; the failures' window is the FailureCounter's, on the server's clock. A user not
  in the table costs the same hash (no timing oracle). An AUTH PLAIN authorization identity other than the
  login is refused (as Cyrus and Dovecot do without proxy rights): 535 5.7.8. Each failure is logged in Postfix's words
  (`warning: host[ip]: SASL PLAIN authentication failed: REASON, sasl_username=…`; the reason is Cyrus's
  `authentication failure` for the tables, Dovecot's or `(reason unavailable)` for Dovecot, as Postfix logs them).
- `SenderLogins.refusal(sender, login, authenticated=, unauthenticated=, allow_unknown=)`: Postfix's
  reject_*sender_login_mismatch with `sender_login_maps` (sender address or @domain -> logins, separated by
  commas or spaces), asked the sender as `resolve` (given when built: trivial-rewrite's resolved_address) makes
  it, as Postfix's smtpd_resolve_addr (qualified, the percent hack applied): the one check behind the [smtpd]
  reject_sender_login_mismatch setting and the restriction items: a mismatch when the maps name owners and the
  client is not logged in, or when the client is logged in and its login does not own the sender. The null
  sender never mismatches. Without maps the items refuse nothing (Postfix); the setting's instance
  (`own_address_without_maps`) lets a login own only the address equal to it, as written or resolved.

Failure behaviour: a table that cannot answer, or a Dovecot that is down, silent past its timeout or answers
`temp`, raises nothing here: AUTH answers 454 4.7.0 (try later), logged with the reason, and the attempt does
not count as a failure; `refusal` lets `LookupRetry` through for the caller to
answer 451 4.3.0. Passwords never reach a log line.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable, Protocol, TypeVar

from mailflow import status
from mailflow.address import client_ip
from mailflow.clock import Clock
from mailflow.config import DEFAULTS
from mailflow.errors import LookupRetry
from mailflow.logs import SmtpdLog, printable
from mailflow.passwords import hash_password, parse_hash, verify_password  # noqa: F401 (re-exported)
from mailflow.stages.smtpd.dovecot_auth import DovecotAuth, Unavailable
from mailflow.tables import Table, find_address
from mailflow.tables.search import EXTERNAL_FIRST

log = logging.getLogger("mailflow.smtpd")

NO_DOVECOT_REASON = "(reason unavailable)"  # Postfix's words for a Dovecot FAIL without reason= (smtpd_sasl_glue.c)

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

    def retime(self, window: float) -> None:
        """A reload's anvil_rate_time_unit: the window of the failures counted from now on, those so far too."""
        self._window = window

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
    """Password checks (passwords.verify_password: Argon2id, scrypt) on a small pool of threads of their own.
    A user without a usable hash is checked against the last good hash seen (the same cost as a real user of
    the same table), so the time taken does not say whether the user exists."""

    def __init__(self, workers: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mailflow-auth")
        self._last_seen: str | None = None

    async def verify(self, password: bytes, stored: str | None) -> bool:
        if stored:
            self._last_seen = stored
        check = partial(verify_password, password, stored, dummy=self._last_seen)
        return await asyncio.get_running_loop().run_in_executor(self._pool, check)

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


@dataclass(frozen=True)
class Verdict:
    """A back end's answer: `login` on success (the name the session is logged in as); else `unavailable` is
    why it could not answer (454, not a failure), or "" for wrong credentials, and then `reason` the words of
    the failure's log line ("": Cyrus's `authentication failure`, as Postfix with Cyrus SASL logs it)."""

    login: str | None = None
    unavailable: str = ""
    reason: str = ""


class Backend(Protocol):
    async def verify(self, login: str, password: bytes, *, secured: bool, client_ip: str,
                     local_ip: str) -> Verdict: ...


T = TypeVar("T")
Runner = Callable[..., Awaitable[T]]


async def _inline(fn: Callable[..., T], *args) -> T:
    return fn(*args)


class TableBackend:
    """mailflow's own check (smtpd.sasl_type = "mailflow"): the hash sasl_user_maps hold for the login, checked
    by `hasher`. `run` asks the tables (TableCache.run: off the event loop when a table may block, e.g. sqlite)."""

    def __init__(self, tables: list[Table], hasher: PasswordHasher, run: Runner | None = None):
        self._tables = tables
        self._hasher = hasher
        self._run = run or _inline

    def stored_hash(self, login: str) -> str | None:
        """The hash the tables hold for `login` (None: no such user). Raises LookupRetry."""
        for table in self._tables:
            value = table.lookup(login)
            if value is not None:
                return value.strip()
        return None

    async def verify(self, login: str, password: bytes, *, secured: bool = True, client_ip: str = "",
                     local_ip: str = "") -> Verdict:
        try:
            stored = await self._run(self.stored_hash, login) if plausible_login(login) else None
        except LookupRetry as e:
            return Verdict(unavailable=f"user table: {e.reason}")
        return Verdict(login) if await self._hasher.verify(password, stored) else Verdict()


class DovecotBackend:
    """smtpd.sasl_type = "dovecot": Dovecot's auth server decides (dovecot_auth.DovecotAuth). A failure's reason
    for the log is Dovecot's, else `(reason unavailable)`, as Postfix logs it with Dovecot SASL."""

    def __init__(self, dovecot: DovecotAuth, timeout: float | None = None):
        self._dovecot = dovecot
        self._timeout = timeout  # this listener's sasl_timeout (None: the connection's)

    async def verify(self, login: str, password: bytes, *, secured: bool, client_ip: str = "",
                     local_ip: str = "") -> Verdict:
        if not plausible_login(login):
            return Verdict(reason=NO_DOVECOT_REASON)
        try:
            answer = await self._dovecot.ask(login.encode(), password, secured=secured, client_ip=client_ip,
                                             local_ip=local_ip, timeout=self._timeout)
        except Unavailable as e:
            return Verdict(unavailable=f"Dovecot auth server {self._dovecot.endpoint}: {e}")
        if answer.login is not None:
            return Verdict(answer.login)
        if answer.temporary:
            return Verdict(unavailable=f"Dovecot auth server {self._dovecot.endpoint}: temporary failure"
                                       + (f": {answer.reason}" if answer.reason else ""))
        return Verdict(reason=answer.reason or NO_DOVECOT_REASON)


class Authenticator:
    """Checks AUTH credentials with a back end (TableBackend over `tables` and `hasher` unless `backend` is
    given); slows down and logs failures per client IP. `failures` and `hasher` are the server's (shared by
    its listeners)."""

    def __init__(self, tables: list[Table] | None = None, *, clock: Clock, failures: FailureCounter,
                 hasher: PasswordHasher | None = None, delay: float, delay_limit: float,
                 smtpd_log: SmtpdLog | None = None, backend: Backend | None = None):
        if backend is None:
            assert tables is not None and hasher is not None, "a table back end needs tables and a hasher"
            backend = TableBackend(tables, hasher)
        self._backend = backend
        self._clock = clock
        self._delay = delay
        self._delay_limit = delay_limit
        self.failures = failures
        self._log = smtpd_log or SmtpdLog()

    async def check(self, client_ip: str, mechanism: str, login: bytes | None, password: bytes, *,
                    authzid: bytes = b"", client: str = "", secured: bool = True, local_ip: str = "") -> AuthOutcome:
        """`client` is `host[ip]` for the log (default `unknown[client_ip]`); `secured`: the session is on TLS;
        `login` None: the client gave no name it could be (a malformed PLAIN message, a LOGIN name with a NUL),
        a failure logged `sasl_username=(unavailable)`; an empty LOGIN name is logged empty, as Postfix logs
        them with Dovecot."""
        client = client or f"unknown[{client_ip}]"
        name = None if login is None else login.decode("utf-8", "replace")
        delay = failure_delay(self.failures.recent(client_ip), self._delay, self._delay_limit)
        if delay:
            await self._clock.sleep(delay)  # before the hash: a client that keeps failing costs no more CPU
        if authzid and authzid != login:
            return self._failed(client_ip, client, mechanism, name, "authorization identity differs from login")
        verdict = await self._backend.verify(name or "", password, secured=secured, client_ip=client_ip,
                                             local_ip=local_ip)
        if verdict.unavailable:
            log.warning("%s: SASL %s: %s", client, mechanism, verdict.unavailable)
            return AuthOutcome(None, status.AUTH_UNAVAILABLE)
        if verdict.login is not None:
            return AuthOutcome(verdict.login, status.AUTH_OK)
        return self._failed(client_ip, client, mechanism, name, verdict.reason or "authentication failure")

    def _failed(self, client_ip: str, client: str, mechanism: str, name: str | None, reason: str) -> AuthOutcome:
        self.failures.record(client_ip)
        self._log.auth_failed(client, mechanism, reason, None if name is None else printable(name[:64]))
        return AuthOutcome(None, status.AUTH_FAILED)


def plausible_login(name: str) -> bool:
    """A login a back end could know: 1 to 256 printable characters, no white space (Dovecot refuses the others
    before it asks for a password)."""
    return 0 < len(name) <= 256 and name.isprintable() and not any(c.isspace() for c in name)


# ---------------------------------------------------------------------------------------------- sender logins


def login_of(session) -> str | None:
    """The login of an authenticated aiosmtpd session (what Authenticator put in auth_data), else None."""
    data = session.auth_data
    return data if session.authenticated and isinstance(data, str) else None


class SenderLogins:
    """smtpd_sender_login_maps: which logins own a sender address, and the one check that asks them (`refusal`),
    for the [smtpd] reject_sender_login_mismatch setting (at MAIL, `own_address_without_maps`: without maps a
    login owns the address spelled like it) and for the restriction lists' reject_*sender_login_mismatch items
    (Postfix's: without maps they refuse nothing)."""

    def __init__(self, tables: list[Table], *, resolve: Callable[[str], str],
                 delimiter: str = DEFAULTS.recipient_delimiter, own_address_without_maps: bool = False):
        """`resolve(sender)`: the address the maps are asked (Postfix's smtpd_resolve_addr: qualified, the percent
        hack applied); may raise LookupRetry."""
        self._tables = tables
        self._resolve = resolve
        self._delimiter = delimiter
        self._own_address = own_address_without_maps

    def owners(self, sender: str) -> set[str] | None:
        """The logins the maps give for `sender` (lower case), or None when no map lists it. Raises LookupRetry."""
        found = (find_address(self._tables, sender, delimiter=self._delimiter, form=EXTERNAL_FIRST)
                 if self._tables else None)
        if found is None:
            return None
        _table, _key, value = found
        return {v.lower() for v in re.split(r"[\s,]+", value) if v}

    def refusal(self, sender: str, login: str | None, *, authenticated: bool = True, unauthenticated: bool = True,
                allow_unknown: bool = False) -> status.Reply | None:
        """Postfix's reject_*sender_login_mismatch for MAIL FROM `sender` ("" or "<>": the null sender, which
        passes) and the client's `login` (None: not logged in). `authenticated`: a logged-in client must own the
        sender (`allow_unknown`: unless no map lists it); `unauthenticated`: a client not logged in may not use a
        sender the maps give owners. The maps are asked the sender as resolved; without maps (the setting's
        instance) a login owns the sender as written or as resolved. 553 5.7.1 `not owned by user LOGIN` / `not logged
        in`, naming the sender as given, or None. Raises LookupRetry."""
        if sender in ("", "<>") or not (self._tables or self._own_address):
            return None
        resolved = self._resolve(sender)
        owners = self.owners(resolved) if self._tables else {sender.lower(), resolved.lower()}
        if login is None:
            refused = unauthenticated and owners is not None and bool(self._tables)
        else:
            refused = authenticated and not (owners is None and allow_unknown) and login.lower() not in (owners or ())
        return status.sender_login_mismatch(sender, login) if refused else None


def is_loopback(ip: str) -> bool:
    addr = client_ip(ip)
    return addr is not None and addr.is_loopback
