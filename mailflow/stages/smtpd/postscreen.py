"""postscreen: Postfix's zombie screen (postscreen(8)) in front of an mta listener's smtpd, `[smtpd.postscreen]`.

    Postscreen(config, mynetworks=, tables=, resolver=, cache=, clock=, hostname=, banner=, smtpd_timeout=,
               smtpd_connection_limit=, smtpd_forbid_cmds=, engine=)   one per listener (built with it); smtpd's
                                    settings it takes as Postfix's postscreen_* defaults
        .screen(conn, client) -> Verdict   run before smtpd's "connect from": PASS (smtpd takes the client) or
                                    the end
    EngineTraits(message_size_limit, session_time_limit, disable_vrfy, helo_required, tls, tls_loglevel,
                 discard_ehlo_keywords, discard_ehlo_keyword_address_maps, reject_footer, soft_bounce)   what
                                    the dummy engine takes from smtpd's settings; .from_config(smtpd, soft_bounce):
                                    a listener's (postscreen's own settings, else smtpd's)
    PassCache(limit)                the clients that passed, per test with its expiry (postscreen_cache_map; one
                                    per server, in memory; beyond `limit` the expired dropped first, then the
                                    least recently used); .resize(limit, now): a reload's cache_limit
        .due(ip, tests, now) -> tests | None   those without an unexpired pass (None: not in the cache); .passed
        .record(ip, {test: expiry}, now)   passes added; .expiry(ip, test), .complete(ip, tests): each passed once;
        .entry(ip): a copy of its passes

What it does, in Postfix 3.7's order and words (src/postscreen/postscreen.c, _early.c, _dnsbl.c, _smtpd.c, _misc.c;
lines logged as `postscreen`, `[ip]:port` as postscreen writes a client):
- `CONNECT from [ip]:port to [ip]:port`; beyond client_connection_count_limit connections of one client in the
  screen at once: `NOQUEUE: reject: CONNECT from [ip]:port: too many connections`, `421 4.7.0 Error: too many
  connections`, `DISCONNECT [ip]:port`.
- the access list (postscreen_access_list: permit_mynetworks, tables answering permit / reject / dunno; the first
  answer wins): permit -> `ALLOWLISTED [ip]:port`, to smtpd at once; reject -> `DENYLISTED [ip]:port` and
  denylist_action (Postfix 3.7's respectful_logging words).
- the cache: a client whose every enabled test passed within its TTL: `PASS OLD [ip]:port`, to smtpd at once; a
  cached client meets only its expired tests (the pregreet test not due: no teaser, no read, the wait ends with the
  DNSBL answers), then `PASS OLD`. A client's connections in the screen at once share one record of what they
  passed (Postfix's client_info->expire_time; the first's copy of its cache entry): a connection that comes while
  another is there meets only the tests that record has not passed (none: to smtpd, with no PASS line), each pass
  is written there at once, and a session's end caches the whole record (psc_conclude).
- allowlist_interfaces: a listener address outside it: `ALLOWLIST VETO [ip]:port`; the client meets the tests but
  never smtpd (the dummy engine, every deep test on) nor the cache.
- beyond `pre_queue_limit` clients in the tests at once on the listener (the access list and the cache come first):
  `reject: connect from [ip]:port: all screening ports busy`, `421 4.3.2 All screening ports are busy`,
  `DISCONNECT [ip]:port`.
- the early tests: the `220-` teaser (greet_banner: `$smtpd_banner` is smtpd's text, "" none), the DNSBL queries
  (dnsbl_sites, A records as dnsblog, all at once, each bounded by dnsbl_timeout, shared by the connections of one
  client in the tests at once; what has not answered by the end of the greet wait does
  not count, as Postfix's partial score) and the wait of greet_wait for input: input before it is `PREGREET n after
  t from [ip]:port: text` and greet_action; a score at or above dnsbl_threshold is `DNSBL rank n for [ip]:port` and
  dnsbl_action; a score at or below a negative dnsbl_allowlist_threshold ends the wait and passes every other test,
  the deep ones included, until the DNSBL pass expires at least (psc_allowlist_non_dnsbl: to smtpd at once). A
  client that closes meanwhile: `HANGUP after t from [ip]:port in tests before SMTP handshake`, `DISCONNECT
  [ip]:port`.
- actions: ignore (logged only; the test is repeated next time, the others' passes are cached; a denylisted client
  under ignore may still PASS OLD), drop (`521 …` and `DISCONNECT`), enforce (the
  dummy SMTP engine: greeting, HELO/EHLO, MAIL, then every RCPT gets the refusal, logged as `NOQUEUE: reject:
  RCPT from [ip]:port: 550 5.7.1 …; from=<s>, to=<r>, proto=ESMTP, helo=<h>`; DATA and BDAT `554 5.5.1 Error: no
  valid recipients`; the client never reaches smtpd). The replies are postscreen's: pregreet `5xx 5.5.1 Protocol
  error`, denylist `5xx 5.3.2 Service currently unavailable`, DNSBL `5xx 5.7.1 Service unavailable; client [ip]
  blocked using <the site of the highest weight, or its dnsbl_reply_map text>`.
- all tests passed: `PASS NEW [ip]:port`, the cache updated (greet_ttl; the DNSBL pass for dnsbl_max_ttl clamped
  to dnsbl_min_ttl, the resolver reports no TTLs; for dnsbl_min_ttl when a list failed or none answered), to smtpd,
  which greets with its own `220`. A DNS failure is logged as dnsblog's `dnsblog_query: lookup error for DNS query`.
- the deep protocol tests (pipelining, non_smtp_command, bare_newline; when enabled and not passed): the dummy
  engine after the early tests, the tests on each command line (`BARE NEWLINE from`, `NON-SMTP COMMAND from`,
  `COMMAND PIPELINING from`), each with its action (ignore: passed for the least TTL of all; enforce: RCPT gets
  `550 5.5.1 Protocol error`; drop: its 521 and the end); a client that gets to RCPT passes those not failed (each
  for its TTL), gets `450 4.3.2 Service currently unavailable`, and at its end `PASS NEW`, cached: its next
  connection goes to smtpd. A client that failed a test (or was vetoed) meets all three, whatever is enabled.
- the end of the dummy engine is psc_conclude's: the passes cached and `PASS NEW` unless a test failed, the final
  reply (221 to QUIT, 554 to DATA/BDAT: `DATA without valid RCPT from`), `DISCONNECT`.

- the dummy engine's STARTTLS (postscreen_tls_security_level, unset: smtpd's; smtpd's certificate, the connection's
  `tls_handshake`, as Postfix's tlsproxy: its `CONNECT from`, `DISCONNECT` and failure lines logged as `tlsproxy`),
  the session then over TLS with its HELO and MAIL forgotten, the deep tests on; encrypt: `530 5.7.0` before it but
  for HELO, EHLO, STARTTLS, NOOP, QUIT. Its EHLO leaves out discard_ehlo_keywords or the address maps' answer
  (asked at each EHLO with a name, as psc_ehlo_cmd; logged `[ip]port: discarding EHLO keywords: ...`, as 3.7's
  "[%s]%s"); command_filter rewrites each line
  (`[ip]:port: replacing command "a" with "b"`); reject_footer goes under every 4xx/5xx postscreen sends, with
  postscreen's four macros (psc_send_reply, psc_expand_lookup), or the footer reject_footer_maps gives for that
  reply (looked up with the whole reply, before soft_bounce); the macros' values kept to expansion_filter.

Under soft_bounce every 5xx postscreen sends goes out (and is logged at RCPT) as a 4xx, as psc_send_reply.

A command filter or EHLO discard map that cannot answer (Postfix's postscreen stops) is logged through a
faults.FailureLog per table (once, then a count a minute; told it works again only when it was asked, as a table
after the one that answered is not), the client getting the 421 or the default keywords.

Not built: a persistent cache_map. Deliberate: without smtpd's certificate the dummy engine offers no STARTTLS
(Postfix's postscreen offers it and answers 454 under an explicit may: docs/security.md says why not here).

Bounded: at most pre_queue_limit clients in the tests at once per listener, and client_connection_count_limit
connections of one client in the screen; the DNSBL queries by their deadline and the greet wait; the dummy engine by
command_time_limit per command (`COMMAND TIME LIMIT`; smtpd's `timeout` unless set), smtpd's session_time_limit for
the whole session, its line length (`COMMAND LENGTH LIMIT`) and command_count_limit (`COMMAND COUNT LIMIT`; so its
replies a client does not read stay a few KiB); the cache by `cache_limit` (its expiry heap by twice that); the
clients seen per listener (connection counts, `PASS NEW` once) by the connections open. Stress mode
(postscreen_state.c: from 90 % of pre_queue_limit taken, `entering STRESS mode with n connections`, until 70 %,
`leaving ...`): a new client's greet wait is stress_greet_wait and each command's limit stress_command_time_limit
(Postfix's `${stress?{2}:{6}}s` and `${stress?{10}:{300}}s`). Nothing runs for a listener with postscreen off.
"""
from __future__ import annotations

import asyncio
import enum
import functools
import heapq
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Coroutine, Protocol

from mailflow import status
from mailflow.address import quoted_local
from mailflow.clock import Clock
from mailflow.config.smtpd import SMTPD_BANNER, PostscreenConfig, SmtpdConfig
from mailflow.dnsbl_sites import DnsblSite, parse_dnsbl_site
from mailflow.dns import NotFound, failure_text
from mailflow.ehlo_keywords import SILENT, discard_names, discard_set
from mailflow.errors import LookupRetry
from mailflow.faults import FailureLog
from mailflow.logs import SmtpdLog, escaped, format_tv, printable
from mailflow.message import starts_header_field
from mailflow.reply_footer import footer_gripe, footer_lines, postscreen_footer_values, unescaped
from mailflow.stages.smtpd.anvil import Places
from mailflow.stages.smtpd.command_filter import replacement
from mailflow.stages.smtpd.dns_checks import rbl_query_name
from mailflow.stages.smtpd.wire import Wire, WireError
from mailflow.tables import TableCache
from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.postscreen")
tls_log = logging.getLogger("mailflow.tlsproxy")  # the lines Postfix's tlsproxy writes for postscreen's STARTTLS

PREGREET, DNSBL = "pregreet", "dnsbl"
PIPELINING, NON_SMTP, BARE_NEWLINE = "pipelining", "non_smtp_command", "bare_newline"
DEEP_TESTS = (PIPELINING, NON_SMTP, BARE_NEWLINE)  # after the 220, in the dummy engine (postscreen_smtpd.c)
ALL_TESTS = (PREGREET, DNSBL) + DEEP_TESTS
PREGREET_READ = 1023  # bytes of early input counted in the PREGREET line (Postfix's PSC_READ_BUF_SIZE - 1)
PREGREET_LOGGED = 100  # characters of it quoted, escaped (Postfix's %.100s)
DUMMY_LINE_LIMIT = 2048  # the dummy engine's command line limit
QUOTED = 100  # bytes of a command or of pending input a deep test's log line quotes (Postfix's 100)
# the commands the dummy engine knows (Postfix's command_table: XCLIENT, XFORWARD and AUTH known but disabled)
KNOWN_COMMANDS = ("HELO", "EHLO", "STARTTLS", "XCLIENT", "XFORWARD", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET",
                  "NOOP", "VRFY", "ETRN", "QUIT")
PRE_TLS = ("HELO", "EHLO", "STARTTLS", "NOOP", "QUIT")  # encrypt answers these before STARTTLS (_FLAG_PRE_TLS)
_LETTER = re.compile(rb"[A-Za-z]")  # smtpd_forbidden_commands' regexp:{{/^[^A-Z]/ Bogus}} (case-insensitive)


class Verdict(enum.Enum):
    PASS = "pass"  # smtpd takes the client
    DONE = "done"  # the connection is over


class Connection(Protocol):
    """What the screen needs of a session: its addresses, its input, a way to write and to close."""

    @property
    def wire(self) -> Wire: ...

    def send(self, text: str) -> None: ...

    def hang_up(self) -> None: ...

    async def tls_handshake(self, timeout: float, client: str, lines: SmtpdLog | None) -> tuple[bool, str]:
        """The server side of a TLS handshake with smtpd's certificate, within `timeout`: (True, "") once done, the
        connection then over TLS, tls_misc.c's summary written to `lines` (None: not written) as `client`'s;
        (False, why, in tls_server.c's words) when it failed (the connection is then over)."""
        ...


@dataclass
class Client:
    ip: str
    port: str
    server_ip: str
    server_port: str

    @property
    def where(self) -> str:
        return f"[{self.ip}]:{self.port}"


class PassCache:
    """ip -> {test: expiry}: the tests each client passed, until when. Beyond `limit` clients, a client whose every
    pass has expired is dropped first (Postfix's cache cleanup removes those), else the one least recently used (a
    `PASS OLD` lookup or a new pass counts as a use)."""

    def __init__(self, limit: int):
        self._limit = limit
        self._entries: OrderedDict[str, dict[str, float]] = OrderedDict()  # least recently used first
        self._expiries: list[tuple[float, str]] = []  # heap of (an entry's latest expiry, ip); stale ones skipped

    def passed(self, ip: str, tests: tuple[str, ...], now: float) -> bool:
        return self.due(ip, tests, now) == ()

    def due(self, ip: str, tests: tuple[str, ...], now: float) -> tuple[str, ...] | None:
        """The tests of `tests` the client has no unexpired pass for; None when it is not in the cache at all. A
        client with none due is used (kept over those not seen since)."""
        entry = self._entries.get(ip)
        if entry is None:
            return None
        due = tuple(test for test in tests if entry.get(test, 0.0) <= now)
        if not due:
            self._entries.move_to_end(ip)
        return due

    def entry(self, ip: str) -> dict[str, float]:
        """A copy of the client's passes (empty: not in the cache)."""
        return dict(self._entries.get(ip, {}))

    def expiry(self, ip: str, test: str) -> float:
        """Until when the client's pass of `test` holds (0: never passed, or not in the cache)."""
        return self._entries.get(ip, {}).get(test, 0.0)

    def complete(self, ip: str, tests: tuple[str, ...]) -> bool:
        """Whether the client has passed each of `tests` once at least, expired or not (Postfix: no test of its
        cache entry is still "new"; its PASS after the tests is then `PASS OLD`)."""
        entry = self._entries.get(ip)
        return entry is not None and all(test in entry for test in tests)

    def record(self, ip: str, expiries: dict[str, float], now: float) -> None:
        entry = self._entries.pop(ip, {})
        entry.update(expiries)
        self._entries[ip] = entry
        heapq.heappush(self._expiries, (max(entry.values(), default=0.0), ip))
        self._trim(now)

    @property
    def limit(self) -> int:
        return self._limit

    def resize(self, limit: int, now: float) -> None:
        """A reload's cache_limit: beyond it, clients are dropped now as `record` drops them."""
        self._limit = limit
        self._trim(now)

    def _trim(self, now: float) -> None:
        while len(self._entries) > self._limit:
            self._entries.pop(self._expired(now) or next(iter(self._entries)))
        if len(self._expiries) > 2 * len(self._entries) + 16:  # (the stale heap items: rebuilt, bounded)
            self._expiries = [(max(entry.values(), default=0.0), ip) for ip, entry in self._entries.items()]
            heapq.heapify(self._expiries)

    def _expired(self, now: float) -> str | None:
        """A client whose every pass has expired by `now`, if there is one."""
        while self._expiries:
            latest, ip = self._expiries[0]
            entry = self._entries.get(ip)
            if entry is not None and max(entry.values(), default=0.0) == latest:
                return ip if latest <= now else None
            heapq.heappop(self._expiries)  # (stale: the client was dropped, or passed again since)
        return None


class _SharedPasses(dict):
    """A session's passes, each also written to the results its client's connections in the screen share
    (Postfix's client_info->expire_time: one process, one record per client while it has connections there)."""

    def __init__(self, shared: dict[str, float]):
        super().__init__()
        self.shared = shared

    def __setitem__(self, test: str, until: float) -> None:
        super().__setitem__(test, until)
        self.shared[test] = until


@dataclass
class _Screening:
    """One client's state while it is screened."""

    client: Client
    rcpt_reply: status.Reply | None = None  # enforce: what every RCPT gets (the last test failed decides)
    failed: bool = False  # a test failed under drop or enforce (ignore: PSC_UNFAIL_SESSION_STATE, not failed)
    vetoed: bool = False  # not on an allowlist interface: never to smtpd, nothing cached (PSC_STATE_FLAG_ALLIST_FAIL)
    silent: bool = False  # the pregreet test failed under enforce: the dummy engine sends no greeting
    # the tests passed this session, until when (its client's shared record set in _screen, before any test)
    passes: _SharedPasses = field(default_factory=lambda: _SharedPasses({}))
    nothing_due: bool = False  # another connection of the client passed every test meanwhile (no cache lookup)
    due: tuple[str, ...] = ()  # a cached client's expired tests, the ones it meets (): all
    known: bool = False  # has passed every test once: its PASS is `PASS OLD` (Postfix's PSC_STATE_FLAG_NEW unset)

    def fail(self, action: str, reply_for: Callable[[int], status.Reply], conn: Connection) -> bool:
        """Apply `action` to a failed test; True when the connection was dropped. ignore: logged only, the test
        not passed (repeated next time), the others' passes kept."""
        if action == "ignore":
            return False
        self.failed = True
        if action == "drop":
            _drop(conn, self.client, reply_for(521))
            return True
        self.rcpt_reply = reply_for(550)  # (PSC_ENFORCE_SESSION_STATE: the last one counts)
        return False


def _drop(conn: Connection, client: Client, reply: status.Reply) -> None:
    conn.send(f"{reply}\r\n")
    log.info("DISCONNECT %s", client.where)
    conn.hang_up()


class Postscreen:
    """One listener's screen (see the module doc)."""

    def __init__(self, config: PostscreenConfig, *, mynetworks: NetworkList, tables: TableCache, resolver,
                 cache: PassCache, clock: Clock, hostname: str, banner: str, smtpd_timeout: float,
                 smtpd_connection_limit: int = 0, smtpd_forbid_cmds: tuple[str, ...] = (),
                 engine: "EngineTraits | None" = None):
        self._config = config
        self._mynetworks = mynetworks
        self._table_cache = tables
        self._tables = [(item, None if item == "permit_mynetworks" else tables.open([item])[0])
                        for item in config.access_list]
        self._resolver = resolver
        self._sites: list[DnsblSite] = [parse_dnsbl_site(entry) for entry in config.dnsbl_sites]
        self._cache = cache
        self._clock = clock
        self._hostname = hostname
        self._banner = banner
        self._command_time_limit = smtpd_timeout if config.command_time_limit is None else config.command_time_limit
        self._screening = Places(config.pre_queue_limit)
        # stress mode (postscreen_state.c): entered at 90 % of the screening places taken, left at 70 %
        self._stress_high = max(1, int(0.9 * config.pre_queue_limit))
        self._stress_low = int(0.7 * config.pre_queue_limit)
        self._stressed = False
        limit = config.client_connection_count_limit
        self._connection_limit = smtpd_connection_limit if limit is None else limit
        self._connections: dict[str, int] = {}  # ip -> its connections in the screen now (none: no key)
        self._passed_new: set[str] = set()  # clients with a connection in the screen that logged `PASS NEW`
        # ip -> test -> until when: what its connections in the screen passed, shared (client_info->expire_time)
        self._shared: dict[str, dict[str, float]] = {}
        self._dnsbl_in_flight: dict[str, _DnsblQueries] = {}  # ip -> the DNSBL queries its connections share
        self._deep = _deep_settings(config)
        deep = tuple(test for test in DEEP_TESTS if self._deep[test].enabled)
        self._tests = ((PREGREET, DNSBL) if self._sites else (PREGREET,)) + deep
        forbidden = smtpd_forbid_cmds if config.forbidden_commands is None else config.forbidden_commands
        self._forbidden = frozenset(word.upper() for word in forbidden)
        self._reply_map = tables.open([config.dnsbl_reply_map])[0] if config.dnsbl_reply_map else None
        self._interfaces = NetworkList.from_items(config.allowlist_interfaces, tables.open,
                                                  setting="smtpd.postscreen.allowlist_interfaces")
        # how long a deep test failed under ignore counts as passed (Postfix's psc_min_ttl: the least of the TTLs)
        self._min_ttl = min(config.greet_ttl, config.dnsbl_min_ttl, config.pipelining_ttl,
                            config.non_smtp_command_ttl, config.bare_newline_ttl)
        self._engine = engine or EngineTraits()
        self._discard_maps = tables.open(list(self._engine.discard_ehlo_keyword_address_maps))
        self._command_filter = tables.open(list(config.command_filter))
        # a table that cannot answer: told once per minute with a count, not once per client (faults.FailureLog)
        self._discard_failures = {table.name: FailureLog(log, f"postscreen_discard_ehlo_keyword_address_maps "
                                                              f"{table.name} lookup", clock)
                                  for table in self._discard_maps}
        self._filter_failures = {table.name: FailureLog(log, f"postscreen_command_filter {table.name} lookup", clock)
                                 for table in self._command_filter}
        self._footer_maps = tables.open(list(self._engine.reject_footer_maps))  # (none that waits: the config's)
        self._footer_failures = FailureLog(log, "postscreen_reject_footer_maps lookup", clock)
        # a footer a map gives that cannot go under a reply: told once, then once a minute with a count, not at
        # each reply (a client could make command_count_limit of them per connection); a reload starts over
        self._unusable_footers = FailureLog(log, "postscreen_reject_footer_maps footer", clock)

    async def screen(self, conn: Connection, client: Client) -> Verdict:
        log.info("CONNECT from %s to [%s]:%s", client.where, client.server_ip, client.server_port)
        if self._engine.reject_footer or self._engine.soft_bounce or self._footer_maps:
            conn = _Replies(conn, soft_bounce=self._engine.soft_bounce, template=self._engine.reject_footer,
                            values=functools.partial(postscreen_footer_values, self._hostname, client.ip, client.port),
                            mapped=self._mapped_footer if self._footer_maps else None,
                            allowed=self._engine.expansion_filter, unusable=self._unusable_footers)
        count = self._connections.get(client.ip, 0) + 1
        self._connections[client.ip] = count
        try:
            if 0 < self._connection_limit < count:
                log.info("NOQUEUE: reject: CONNECT from %s: too many connections", client.where)
                _drop(conn, client, status.SCREENING_TOO_MANY_CONNECTIONS)
                return Verdict.DONE
            return await self._screen(conn, _Screening(client))
        finally:
            self._leave(client.ip)

    def _mapped_footer(self, reply: str) -> str | None:
        """postscreen_reject_footer_maps' footer for `reply` (the whole reply, no CRLF): the first table that has it;
        None when none has it, or a table cannot answer (reject_footer then, as Postfix's psc_send_reply; told once,
        then once a minute with a count)."""
        for table in self._footer_maps:
            try:
                found = table.lookup(reply)
            except LookupRetry as e:
                self._footer_failures.failed(e)
                return None
            if found is not None:
                self._footer_failures.succeeded()
                return found
        self._footer_failures.succeeded()
        return None

    def _leave(self, ip: str) -> None:
        count = self._connections.pop(ip) - 1
        if count:
            self._connections[ip] = count
        else:
            self._passed_new.discard(ip)
            self._shared.pop(ip, None)

    async def _screen(self, conn: Connection, state: _Screening) -> Verdict:
        """Postfix's psc_endpt_lookup_done: the access list, the cache, then a screening place for the tests."""
        client = state.client
        access = await self._access(client.ip)
        if access == "permit":
            log.info("ALLOWLISTED %s", client.where)
            return Verdict.PASS
        if access == "reject":
            log.info("DENYLISTED %s", client.where)
            if state.fail(self._config.denylist_action, status.postscreen_denylisted, conn):
                return Verdict.DONE
        shared = self._shared.get(client.ip) if self._connections[client.ip] > 1 else None
        if shared is not None:  # (psc_todo_tests: another connection's results, not the cache's)
            self._due_from(state, shared)
        elif not state.failed:
            due = self._cache.due(client.ip, self._tests, self._clock.time())
            if due == ():
                log.info("PASS OLD %s", client.where)
                return Verdict.PASS
            if due is not None:  # (psc_parse_tests: only the expired tests run again)
                state.due, state.known = due, self._cache.complete(client.ip, self._tests)
        seed = {} if state.failed else self._cache.entry(client.ip)  # (failed: psc_new_tests, the cache unread)
        state.passes = _SharedPasses(self._shared.setdefault(client.ip, seed))
        if client.server_ip and not self._interfaces.contains(client.server_ip):  # (a table that fails: vetoed)
            log.info("ALLOWLIST VETO %s", client.where)
            state.vetoed = True
        if not self._take_place():
            log.info("reject: connect from %s: all screening ports busy", client.where)
            _drop(conn, client, status.SCREENING_PORTS_BUSY)
            return Verdict.DONE
        try:
            return await self._tests_of(conn, state)
        finally:
            self._give_back_place()

    def _due_from(self, state: _Screening, shared: dict[str, float]) -> None:
        """A client with another connection in the screen meets the tests their shared results have not passed
        (or whose pass expired); none: `nothing_due` (Postfix hands it over with no PASS line)."""
        now = self._clock.time()
        due = tuple(test for test in self._tests if shared.get(test, 0.0) <= now)
        state.due, state.nothing_due = due, not due
        state.known = all(test in shared for test in self._tests)

    def _take_place(self) -> bool:
        """A screening place (False: none free); stress mode entered when the places are 90 % taken."""
        if not self._screening.take():
            return False
        if not self._stressed and self._screening.taken >= self._stress_high:
            self._stressed = True
            log.info("entering STRESS mode with %d connections", self._screening.taken)
        return True

    def _give_back_place(self) -> None:
        """A screening place freed; stress mode left when the places are back to 70 % taken."""
        self._screening.give_back()
        if self._stressed and self._screening.taken <= self._stress_low:
            self._stressed = False
            log.info("leaving STRESS mode with %d connections", self._screening.taken)

    def _greet_wait_time(self) -> float:
        return self._config.stress_greet_wait if self._stressed else self._config.greet_wait

    def _command_time(self) -> float:
        """How long the dummy engine waits for a command now (Postfix's PSC_EFF_CMD_TIME_LIMIT)."""
        return self._config.stress_command_time_limit if self._stressed else self._command_time_limit

    async def _tests_of(self, conn: Connection, state: _Screening) -> Verdict:
        """The early tests, then the dummy engine (enforce, a veto, deep tests due: psc_early_event's end), or
        smtpd."""
        if state.nothing_due and not state.vetoed and state.rcpt_reply is None:  # (enforce: Postfix's NOFORWARD)
            return Verdict.PASS  # (psc_conclude: this session passed nothing, so no PASS line, no cache update)
        if not state.nothing_due and not await self._early_tests(conn, state):
            return Verdict.DONE
        if state.rcpt_reply is not None or state.vetoed or self._deep_due(state):
            await self._dummy_engine(conn, state)
            return Verdict.DONE
        self._conclude(state)
        return Verdict.PASS

    def _todo(self, state: _Screening) -> tuple[str, ...]:
        return state.due or self._tests

    def _deep_due(self, state: _Screening) -> tuple[str, ...]:
        """The deep tests of this session: those due, or all of them for a client that failed a test or was vetoed
        (psc_smtpd_tests: "turning on all after-220 tests when a bad client failed a before-220 test")."""
        if state.failed or state.vetoed:
            return DEEP_TESTS
        return tuple(test for test in self._todo(state) if test in DEEP_TESTS and test not in state.passes)

    def _conclude(self, state: _Screening) -> None:
        """psc_conclude: a client no test failed (nor vetoed) has its passes cached (those of tests failed under
        ignore too), and `PASS NEW` (or OLD) logged when it passed every test it met."""
        if state.failed or state.vetoed or not state.passes:
            return
        ip = state.client.ip
        if all(test in state.passes for test in self._todo(state)):
            new = not state.known and ip not in self._passed_new  # (pass_new_count: one NEW per client at once)
            log.info("PASS %s %s", "NEW" if new else "OLD", state.client.where)
            if new:
                self._passed_new.add(ip)
        # psc_print_tests: a test not enabled, never passed, is stored as passed long ago, so that enabling it later
        # does not make the client `PASS NEW` again
        disabled = {test: 0.0 for test in ALL_TESTS
                    if test not in self._tests and not self._cache.complete(ip, (test,))}
        # (psc_print_tests: the shared record)
        self._cache.record(ip, {**disabled, **state.passes.shared}, self._clock.time())

    async def _access(self, ip: str) -> str:
        """permit, reject or dunno: the first answer of the access list, as Postfix's server_acl_eval: a table's
        `dunno` goes on to the next item; a table that cannot answer, or an answer other than permit, reject or
        dunno (case counts), ends the list as dunno, with Postfix's warning."""
        for item, table in self._tables:
            if table is None:
                if self._mynetworks.contains(ip):
                    return "permit"
                continue
            try:
                found = await self._table_cache.run(table.lookup, ip)
            except LookupRetry:
                log.warning("postscreen_access_list: %s: table lookup error -- ignoring the remainder of this "
                            "access list", item)
                return "dunno"
            if found is None or found.strip() == "dunno":
                continue
            if found.strip() in ("permit", "reject"):
                return found.strip()
            log.warning("%s: unknown command: %s -- ignoring the remainder of this access list", item,
                        printable(found))
            return "dunno"
        return "dunno"

    # -- the early tests

    async def _early_tests(self, conn: Connection, state: _Screening) -> bool:
        """The teaser, the DNSBL queries and the greet wait, of the tests due (psc_early_tests: no pregreet test, no
        teaser and no read, the wait ends with the DNSBL answers); False when the connection is over."""
        client, config = state.client, self._config
        due = state.due or self._tests
        teaser = f"{self._hostname} {self._banner}" if config.greet_banner == SMTPD_BANNER else config.greet_banner
        if teaser and PREGREET in due:
            conn.send(f"220-{teaser}\r\n")
        started = self._clock.time()
        deadline = asyncio.get_running_loop().time() + self._greet_wait_time()
        queries = self._dnsbl_queries(client.ip) if DNSBL in due else None
        try:
            if PREGREET in due:
                early = await self._greet_wait(conn, queries, deadline)
            else:
                early = b""
                await _dnsbl_until(queries, deadline)
            if early:  # logged at the first read, as Postfix's psc_early_event (what came by then, when)
                log.info("PREGREET %d after %s from %s: %s", len(early), format_tv(self._clock.time() - started),
                         client.where, escaped(early)[:PREGREET_LOGGED])
                if state.fail(config.greet_action, status.postscreen_protocol_error, conn):
                    return False  # (drop: at once, the DNSBL answers not waited for)
                state.silent = config.greet_action == "enforce"  # (no 220 from the dummy engine)
                await _dnsbl_until(queries, deadline)  # (Postfix waits on for the DNSBL answers)
        finally:
            if queries is not None:
                self._dnsbl_done(client.ip, queries)  # (the answers not in by now do not count, as in Postfix)
        if early is None:
            log.info("HANGUP after %s from %s in tests before SMTP handshake",
                     format_tv(self._clock.time() - started), client.where)
            log.info("DISCONNECT %s", client.where)
            conn.hang_up()
            return False
        cut_short = asyncio.get_running_loop().time() < deadline  # (by a DNSBL allowlisting, or no pregreet test)
        # (an allowlisting score that came too late to end the wait: a failed test stays failed, as Postfix)
        if not early and PREGREET in due and not cut_short:  # (cut short: the allowlisting below sets it)
            state.passes[PREGREET] = self._clock.time() + config.greet_ttl
        return queries is None or await self._dnsbl_verdict(conn, state, queries, pregreeted=bool(early))

    async def _dnsbl_verdict(self, conn: Connection, state: _Screening, queries: "_DnsblQueries", *,
                             pregreeted: bool) -> bool:
        """The DNSBL test's outcome from the answers in by the end of the greet wait: at or above the threshold,
        `DNSBL rank` and dnsbl_action; else passed, and a score at or below a negative allowlist threshold passes
        the other tests too (not for a client that pregreeted); False when the connection was dropped."""
        client, config = state.client, self._config
        score, site = queries.score(self._sites)
        if score >= config.dnsbl_threshold:
            log.info("DNSBL rank %d for %s", score, client.where)
            shown = await self._dnsbl_reply_name(site)
            return not state.fail(config.dnsbl_action, lambda code: status.postscreen_dnsbl(code, client.ip, shown),
                                  conn)
        state.passes[DNSBL] = self._clock.time() + self._dnsbl_pass_ttl(queries)
        if score <= config.dnsbl_allowlist_threshold < 0 and not pregreeted:
            self._allowlist_non_dnsbl(state, self._dnsbl_pass_ttl(queries))
        return True

    def _allowlist_non_dnsbl(self, state: _Screening, ttl: float) -> None:
        """psc_allowlist_non_dnsbl: a client no test failed (nor vetoed) whose score allowlists it passes every other
        test, the deep ones included (straight to smtpd), each until at least the DNSBL pass expires; the tests
        not enabled too, so that turning one on later does not apply it to the client."""
        if state.failed or state.vetoed:
            return
        until = self._clock.time() + ttl
        for test in (PREGREET,) + DEEP_TESTS:
            state.passes[test] = max(until, state.passes.get(test, 0.0), self._cache.expiry(state.client.ip, test))

    async def _dnsbl_reply_name(self, site: str) -> str:
        """The DNSBL name a refusal shows: postscreen_dnsbl_reply_map's text for the site, else the site."""
        if self._reply_map is None:
            return site
        try:
            shown = await self._table_cache.run(self._reply_map.lookup, site)
        except LookupRetry as e:
            log.warning("%s lookup error for %s: %s", self._config.dnsbl_reply_map, site, e.reason)
            return site
        return site if shown is None else shown.strip()

    def _dnsbl_pass_ttl(self, queries: "_DnsblQueries") -> float:
        """How long a DNSBL pass is remembered: the resolver reports no TTLs, so dnsbl_max_ttl (clamped to
        dnsbl_min_ttl) when every list in by now answered (listed or not) and one at least did; dnsbl_min_ttl when
        none did or one failed (Postfix: no reply TTL, < 0, clamped up to postscreen_dnsbl_min_ttl)."""
        config = self._config
        answers = list(queries.answers().values())
        if answers and all(answer is not None for answer in answers):
            return max(config.dnsbl_max_ttl, config.dnsbl_min_ttl)
        return config.dnsbl_min_ttl

    async def _greet_wait(self, conn: Connection, queries: "_DnsblQueries | None",
                          deadline: float) -> bytes | None:
        """Wait until `deadline` for input (ended early by a DNSBL allowlisting once every list answered); the input
        that came (b"" none), as it is at its first arrival; None when the client closed."""
        arrival = asyncio.ensure_future(conn.wire.wait_input())
        waiting: set[asyncio.Future] = {arrival}
        if queries is not None and self._config.dnsbl_allowlist_threshold < 0:
            waiting.add(queries.all_in)
        try:
            while waiting:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                if arrival in done:
                    return conn.wire.peek(PREGREET_READ) if arrival.result() else None
                assert queries is not None
                waiting.discard(queries.all_in)
                if queries.score(self._sites)[0] <= self._config.dnsbl_allowlist_threshold:
                    return b""
        finally:
            arrival.cancel()
        return conn.wire.peek(PREGREET_READ) if conn.wire.pending() else b""

    def _dnsbl_queries(self, ip: str) -> "_DnsblQueries":
        """Every list asked at once, each within dnsbl_timeout; the queries of another connection of the same
        client still in its tests are shared (Postfix's psc_dnsbl_request: one score per client address)."""
        shared = self._dnsbl_in_flight.get(ip)
        if shared is not None:
            shared.users += 1
            return shared
        domains = sorted({site.domain for site in self._sites})
        queries = self._dnsbl_in_flight[ip] = _DnsblQueries({domain: self._listing(ip, domain) for domain in domains})
        return queries

    def _dnsbl_done(self, ip: str, queries: "_DnsblQueries") -> None:
        """One connection is done with the queries; the last one cancels what has not answered."""
        queries.users -= 1
        if queries.users == 0:
            queries.cancel()
            del self._dnsbl_in_flight[ip]

    async def _listing(self, ip: str, domain: str) -> list[str] | None:
        """The list's A records for `ip` ([]: not listed); None when the DNS failed (logged, as dnsblog); raises
        TimeoutError past dnsbl_timeout (no answer: nothing counts)."""
        query = rbl_query_name(ip, domain)
        if query is None or self._resolver is None:
            return []
        try:
            async with asyncio.timeout(self._config.dnsbl_timeout):
                return list(await self._resolver.ipv4_addresses(query))  # A only, as dnsblog
        except NotFound:
            return []
        except LookupRetry as e:
            log.warning("dnsblog_query: lookup error for DNS query %s: %s", query, failure_text(e))
            return None

    # -- the dummy SMTP engine: enforce, a veto, the deep protocol tests

    async def _dummy_engine(self, conn: Connection, state: _Screening) -> None:
        """postscreen_smtpd.c: answer as an SMTP server that refuses every recipient (`450 4.3.2` when no test
        failed: a client that passes is to come back), the deep tests on each command line; never hand over. Its
        end is psc_conclude's: the passes cached, `PASS NEW`, the final reply, `DISCONNECT`."""
        deep = _DeepTests(self._deep_due(state))
        dialogue = _Dummy(self._hostname, state, self._engine, self._engine.discard_ehlo_keywords)
        if not state.silent:  # (no banner for a client that failed the pregreet test)
            conn.send(f"{status.greeting(self._hostname, self._banner)}\r\n")
        started = self._clock.time()
        final: str | None = None
        session_limit = self._engine.session_time_limit
        try:
            async with asyncio.timeout(session_limit or None):  # (smtpd's session_time_limit bounds the whole)
                while final is None:
                    final = await self._next_command(conn, state, deep, dialogue)
                    await asyncio.sleep(0)  # a client that pipelines its commands does not hold the loop
        except TimeoutError:
            log.info("COMMAND TIME LIMIT from %s after %s", state.client.where, dialogue.where)
            final = f"{status.session_timeout(self._hostname)}\r\n"
        except (ConnectionError, WireError):
            log.info("HANGUP after %s from %s in tests after SMTP handshake",
                     format_tv(self._clock.time() - started), state.client.where)
        self._conclude(state)
        if final is not None:
            conn.send(final)
        log.info("DISCONNECT %s", state.client.where)
        if dialogue.tls_active:
            tls_log.info("DISCONNECT %s", state.client.where)
        conn.hang_up()

    async def _ehlo_discards(self, ip: str) -> tuple[frozenset[str], bool]:
        """The EHLO keywords an EHLO of the client's dummy session leaves out: the address maps' answer (True: it
        differs from postscreen_discard_ehlo_keywords, so the EHLO logs it, as psc_ehlo_cmd), else those. A map
        that cannot answer: the default, told once a minute with a count (a faults.FailureLog per map, told only of
        the lookups it was asked; Postfix's postscreen stops there)."""
        default = self._engine.discard_ehlo_keywords
        if not self._discard_maps:
            return default, False
        value, failure = await replacement(self._discard_maps, ip, self._table_cache.run,
                                           answered=lambda name: self._discard_failures[name].succeeded())
        if failure is not None:
            self._discard_failures[failure[0]].failed(failure[1])
            return default, False
        if value is None:
            return default, False
        words = discard_set([value], ignore_unknown=True)
        return words, words != default

    async def _next_command(self, conn: Connection, state: _Screening, deep: "_DeepTests",
                            dialogue: "_Dummy") -> str | None:
        """One command line read (within the command time limit), tested and answered, in psc_smtpd_read_event's
        order: the deep tests (_line_tests), the passes at RCPT, the command count; the final reply when the session
        ends (None: it goes on)."""
        client = state.client
        async with asyncio.timeout(self._command_time()):
            got = await conn.wire.read_lenient_line(DUMMY_LINE_LIMIT)
        if got is None:
            log.info("COMMAND LENGTH LIMIT from %s after %s", client.where, dialogue.where)
            return f"{status.postscreen_unavailable(self._hostname)}\r\n"
        line, bare = got
        received = line
        if self._command_filter:
            filtered = await self._filtered_command(client, line)
            if filtered is None:
                return f"{status.postscreen_unavailable(self._hostname)}\r\n"
            line = filtered
        command, _, rest = line.lstrip(b" ").partition(b" ")
        verb = command.decode("ascii", "replace").upper()
        after, dialogue.where = dialogue.where, verb if verb in KNOWN_COMMANDS else "UNIMPLEMENTED"
        dropped = self._line_tests(conn, state, deep, line, bare=bare, verb=verb, after=after, received=received)
        if dropped is not None:
            return dropped
        if verb == "RCPT":  # (the deep tests pass once the client got this far; a later command can still fail them)
            for test in deep.untried(state.passes):
                state.passes[test] = self._clock.time() + self._deep[test].ttl
        dialogue.commands += 1
        if dialogue.commands > self._config.command_count_limit and verb != "QUIT":
            log.info("COMMAND COUNT LIMIT from %s after %s", client.where, after)
            return f"{status.postscreen_unavailable(self._hostname)}\r\n"
        args = rest.decode("utf-8", "replace")
        if verb == "EHLO" and self._discard_maps and _token(args) is not None:  # (asked at each EHLO: psc_ehlo_cmd)
            dialogue.discard(*await self._ehlo_discards(client.ip))
        reply = dialogue.answer(verb, args)
        if dialogue.over:
            return reply
        conn.send(reply)
        if dialogue.tls_wanted:
            await self._start_tls(conn, client, dialogue)
        return None

    async def _filtered_command(self, client: Client, line: bytes) -> bytes | None:
        """postscreen_command_filter: the line (leading blanks skipped; not when it is not UTF-8) looked up, a value
        in its place, logged as psc_smtpd_read_event; None when the table could not answer (told once a minute
        with a count: faults.FailureLog, each table's told only of the lookups it was asked; Postfix's postscreen
        stops: the client gets the 421 and the end)."""
        try:
            key = line.lstrip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            return line
        value, failure = await replacement(self._command_filter, key, self._table_cache.run,
                                           answered=lambda name: self._filter_failures[name].succeeded())
        if failure is not None:
            self._filter_failures[failure[0]].failed(failure[1])
            return None
        if value is None:
            return line
        log.info('%s: replacing command "%s" with "%s"', client.where, printable(line.decode("utf-8"))[:QUOTED],
                 printable(value)[:QUOTED])
        return value.encode("utf-8")

    async def _start_tls(self, conn: Connection, client: Client, dialogue: "_Dummy") -> None:
        """STARTTLS answered 220: the handshake, as Postfix's tlsproxy does it for postscreen (with smtpd's
        certificate, within the command time limit), then the dialogue over TLS with its HELO and MAIL forgotten. A
        handshake that fails ends the session as a hangup (ConnectionResetError), tlsproxy's lines logged."""
        dialogue.tls_wanted = False
        tls_log.info("CONNECT from %s", client.where)
        summary = SmtpdLog(tls_log, service="tlsproxy") if self._engine.tls_loglevel >= 1 else None
        done, problem = await conn.tls_handshake(self._command_time_limit, client.where, summary)
        if not done:
            if problem:
                tls_log.warning("TLS library problem: %s", problem)
            tls_log.info("TLS handshake failed for service=smtpd peer=%s", client.where)
            tls_log.info("DISCONNECT %s", client.where)
            raise ConnectionResetError("the TLS handshake failed")
        dialogue.tls_started()

    def _line_tests(self, conn: Connection, state: _Screening, deep: "_DeepTests", line: bytes, *, bare: bool,
                    verb: str, after: str, received: bytes) -> str | None:
        """The deep tests of one command line (`bare`: it ended with a bare LF; `verb`: its first word, upper case;
        `after`: the command before it; `received`: the line before the command filter), in psc_smtpd_read_event's
        order: bare newline, non-SMTP command, pipelining; the final reply of a test failed under drop (None: the
        session goes on)."""
        client = state.client
        if bare and deep.due(BARE_NEWLINE):
            log.info("BARE NEWLINE from %s after %s", client.where, escaped(received[:QUOTED]))
            if self._deep_failed(state, deep, BARE_NEWLINE):
                return f"{status.postscreen_protocol_error(521)}\r\n"
        command, _, rest = line.lstrip(b" ").partition(b" ")
        shown = printable(command.decode("utf-8", "replace"))[:QUOTED]
        if verb not in KNOWN_COMMANDS and deep.due(NON_SMTP) and self._not_smtp(command):
            log.info("NON-SMTP COMMAND from %s after %s: %s %s", client.where, after, shown, escaped(rest[:QUOTED]))
            if self._deep_failed(state, deep, NON_SMTP):
                return f"{status.POSTSCREEN_NON_SMTP_DROP}\r\n"
        if verb != "BDAT" and deep.due(PIPELINING) and conn.wire.pending():
            log.info("COMMAND PIPELINING from %s after %s: %s", client.where, shown, escaped(conn.wire.peek(QUOTED)))
            if self._deep_failed(state, deep, PIPELINING):
                return f"{status.postscreen_protocol_error(521)}\r\n"
        return None

    def _not_smtp(self, command: bytes) -> bool:
        """The non-SMTP command test's rule for a command the engine does not know: it looks like a header label,
        is not UTF-8, is a forbidden_commands word, or does not begin with a letter."""
        if starts_header_field(command.decode("utf-8", "replace")):  # (Postfix's is_header: `Name<TAB>:` too)
            return True
        try:
            word = command.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return word.upper() in self._forbidden or (command != b"" and _LETTER.match(command) is None)

    def _deep_failed(self, state: _Screening, deep: "_DeepTests", test: str) -> bool:
        """A deep test failed, not to be tried again this session; its action: ignore (passed for the least TTL of
        all tests, psc_min_ttl), enforce (every RCPT then gets `550 5.5.1 Protocol error`), drop (True: the caller
        ends the session with its 521)."""
        deep.failed.add(test)
        state.passes.pop(test, None)
        state.passes.shared[test] = 0.0  # (expire_time[...] = PSC_TIME_STAMP_DISABLED, for every connection)
        action = self._deep[test].action
        if action == "ignore":
            state.passes[test] = self._clock.time() + self._min_ttl
            return False
        state.failed = True
        if action == "enforce":
            state.rcpt_reply = status.postscreen_protocol_error(550)
        return action == "drop"


@dataclass(frozen=True)
class _DeepSetting:
    """A deep test's settings (postscreen_<test>_enable, _action, _ttl)."""

    enabled: bool
    action: str
    ttl: float


def _deep_settings(config: PostscreenConfig) -> dict[str, _DeepSetting]:
    """Each deep test's postscreen_<test>_enable, _action and _ttl."""
    return {PIPELINING: _DeepSetting(config.pipelining_enable, config.pipelining_action, config.pipelining_ttl),
            NON_SMTP: _DeepSetting(config.non_smtp_command_enable, config.non_smtp_command_action,
                                   config.non_smtp_command_ttl),
            BARE_NEWLINE: _DeepSetting(config.bare_newline_enable, config.bare_newline_action,
                                       config.bare_newline_ttl)}


@dataclass(frozen=True)
class EngineTraits:
    """What the dummy engine takes from smtpd's settings (Postfix's postscreen_* parameters default to smtpd's)."""

    message_size_limit: int = 0  # the EHLO reply's SIZE
    session_time_limit: float = 0.0  # smtpd's session_time_limit: a dummy session's whole time (0: none)
    disable_vrfy: bool = False  # postscreen_disable_vrfy_command
    helo_required: bool = False  # postscreen_helo_required: MAIL and ETRN need HELO/EHLO first
    tls: str = "none"  # postscreen_tls_security_level in force: none, may (STARTTLS offered), encrypt (required)
    tls_loglevel: int = 0  # tlsproxy_tls_loglevel ($smtpd_tls_loglevel): from 1 the handshake's summary
    discard_ehlo_keywords: frozenset[str] = frozenset()  # postscreen_discard_ehlo_keywords
    discard_ehlo_keyword_address_maps: tuple[str, ...] = ()  # postscreen_discard_ehlo_keyword_address_maps
    reject_footer: str = ""  # postscreen_reject_footer
    reject_footer_maps: tuple[str, ...] = ()  # postscreen_reject_footer_maps: a footer by reply, else reject_footer
    expansion_filter: str | None = None  # postscreen_expansion_filter, unescaped: what a macro's value keeps (None: the
    # default, a tab and printable ASCII)
    soft_bounce: bool = False  # every 5xx postscreen sends (and logs at RCPT) goes out as a 4xx

    @classmethod
    def from_config(cls, smtpd: SmtpdConfig, soft_bounce: bool = False) -> "EngineTraits":
        """A listener's: each postscreen setting left unset is smtpd's, as Postfix's defaults; no certificate, no
        STARTTLS."""
        screen = smtpd.postscreen
        level = (screen.tls_security_level or smtpd.tls_security_level) if smtpd.tls_cert_file else "none"
        discards = smtpd.discard_ehlo_keywords if screen.discard_ehlo_keywords is None else \
            screen.discard_ehlo_keywords
        maps = smtpd.discard_ehlo_keyword_address_maps if screen.discard_ehlo_keyword_address_maps is None else \
            screen.discard_ehlo_keyword_address_maps
        return cls(smtpd.message_size_limit, smtpd.session_time_limit, smtpd.disable_vrfy_command,
                   smtpd.helo_required, level, smtpd.tls_loglevel, frozenset(discards), tuple(maps),
                   smtpd.reject_footer if screen.reject_footer is None else screen.reject_footer,
                   tuple(screen.reject_footer_maps),
                   None if screen.expansion_filter is None else unescaped(screen.expansion_filter), soft_bounce)


class _DeepTests:
    """One session's deep tests: those it runs (`todo`), and those it failed (under any action), not tried again."""

    def __init__(self, todo: tuple[str, ...]):
        self.todo = todo
        self.failed: set[str] = set()  # failed this session (under ignore too): not tried again

    def due(self, test: str) -> bool:
        return test in self.todo and test not in self.failed

    def untried(self, passes: dict[str, float]) -> list[str]:
        """The tests neither passed nor failed yet (at RCPT: passed)."""
        return [test for test in self.todo if test not in self.failed and test not in passes]


class _DnsblQueries:
    """One client's DNSBL queries, a task per list domain; the score counts the lists that answered by now
    (Postfix's partial score at the end of the greet wait)."""

    def __init__(self, lookups: dict[str, Coroutine[object, object, list[str] | None]]):
        self._tasks = {domain: asyncio.ensure_future(lookup) for domain, lookup in lookups.items()}
        self.users = 1  # the connections waiting on them
        self.all_in: asyncio.Future = asyncio.ensure_future(asyncio.wait(list(self._tasks.values())))

    def answers(self) -> dict[str, list[str] | None]:
        """domain -> its A records ([] not listed, None a DNS failure), for the lists that answered by now."""
        return {domain: task.result() for domain, task in self._tasks.items()
                if task.done() and not task.cancelled() and task.exception() is None}

    def score(self, sites: list[DnsblSite]) -> tuple[int, str]:
        """(score, the site of the highest weight among those listing the client): psc_dnsbl_receive, a site whose
        filter accepts any of its list's replies adds its weight once."""
        answers = self.answers()
        score, name, best = 0, "", 0
        for site in sites:
            if any(site.matches(reply) for reply in answers.get(site.domain) or ()):
                score += site.weight
                if not name or site.weight > best:
                    name, best = site.domain, site.weight
        return score, name

    def cancel(self) -> None:
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # (a timeout is retrieved: not logged as never retrieved)
        self.all_in.cancel()


async def _dnsbl_until(queries: _DnsblQueries | None, deadline: float) -> None:
    """After a pregreet: the rest of the greet wait for the DNSBL answers, if they are still to come."""
    left = deadline - asyncio.get_running_loop().time()
    if queries is not None and not queries.all_in.done() and left > 0:
        await asyncio.wait({queries.all_in}, timeout=left)


class _Dummy:
    """The dummy engine's dialogue: one reply (with its CRLF) per command (postscreen_smtpd.c's handlers)."""

    def __init__(self, hostname: str, state: _Screening, traits: EngineTraits, discards: frozenset[str] = frozenset()):
        self._hostname = hostname
        self._state = state
        self._traits = traits
        self._discards = discards  # the EHLO keywords left out
        # STARTTLS and BDAT refused for those only after an EHLO (Postfix 3.7's ehlo_discard_mask starts as 0)
        self._refused: frozenset[str] = frozenset()
        self._log_discards = False
        self.tls_wanted = False  # STARTTLS answered 220: the handshake is next
        self.tls_active = False
        self._helo: str | None = None
        self._protocol = "SMTP"
        self._sender: str | None = None
        self.over = False  # the reply is the last one (DATA, BDAT, QUIT)
        self.commands = 0  # command lines read (postscreen_command_count_limit)
        self.where = "CONNECT"  # the last command (Postfix's state->where)

    def answer(self, verb: str, args: str) -> str:
        handler = self._COMMANDS.get(verb)
        if handler is None:  # (XCLIENT, XFORWARD and AUTH too: known, not enabled)
            return f"{status.POSTSCREEN_NOT_RECOGNIZED}\r\n"
        if self._traits.tls == "encrypt" and not self.tls_active and verb not in PRE_TLS:
            return f"{status.STARTTLS_FIRST}\r\n"
        return handler(self, args)

    def discard(self, discards: frozenset[str], log_discards: bool) -> None:
        """The next EHLO leaves out `discards`, logged when `log_discards` (an address map's answer) unless
        silent-discard."""
        self._discards = discards
        self._log_discards = log_discards and bool(discards) and SILENT not in discards

    def tls_started(self) -> None:
        """The handshake is done: the session over TLS forgets its HELO and MAIL (psc_starttls_resume)."""
        self.tls_active = True
        self._helo, self._sender = None, None

    def _rcpt_reply(self) -> status.Reply:
        return self._state.rcpt_reply or status.POSTSCREEN_COME_BACK

    def _helo_cmd(self, args: str) -> str:
        name = _token(args)
        if name is None:
            return f"{status.hello_syntax('HELO')}\r\n"
        self._helo, self._sender = name, None  # (the protocol is not downgraded)
        return f"{status.helo_accepted(self._hostname)}\r\n"

    def _ehlo_cmd(self, args: str) -> str:
        name = _token(args)
        if name is None:
            return f"{status.hello_syntax('EHLO')}\r\n"
        self._helo, self._sender, self._protocol = name, None, "ESMTP"
        self._refused = self._discards
        if self._log_discards:
            client = self._state.client  # (`[ip]port`, no colon: Postfix 3.7's "[%s]%s" of PSC_CLIENT_ADDR_PORT)
            log.info("[%s]%s: discarding EHLO keywords: %s", client.ip, client.port, discard_names(self._discards))
        return "".join(f"{line}\r\n" for line in status.ehlo_lines(self._hostname, self._keywords()))

    def _keywords(self) -> list[str]:
        """The EHLO reply's keywords (psc_smtpd_format_ehlo_reply), the discarded ones left out."""
        limit = self._traits.message_size_limit
        offered = [("size", f"SIZE {limit}" if limit else "SIZE"), ("vrfy", not self._traits.disable_vrfy),
                   ("etrn", True), ("starttls", self._starttls_offered()), ("enhancedstatuscodes", True),
                   ("8bitmime", True), ("dsn", True), ("smtputf8", True), ("chunking", True)]
        return [word if isinstance(word, str) else name.upper() for name, word in offered
                if word and name not in self._discards]

    def _starttls_offered(self) -> bool:
        return self._traits.tls != "none" and not self.tls_active and "starttls" not in self._discards

    def _mail_cmd(self, args: str) -> str:
        if self._traits.helo_required and self._helo is None:
            return f"{status.NEED_HELO}\r\n"
        if self._sender is not None:
            return f"{status.NESTED_MAIL}\r\n"
        if ":" not in args:
            return f"{status.POSTSCREEN_MAIL_SYNTAX}\r\n"
        self._sender = _address(args.partition(":")[2])
        return f"{status.SENDER_OK}\r\n"

    def _rcpt_cmd(self, args: str) -> str:
        if self._sender is None:
            return f"{status.NEED_MAIL}\r\n"
        if ":" not in args:
            return f"{status.POSTSCREEN_RCPT_SYNTAX}\r\n"
        reply = self._rcpt_reply()
        logged = status.soft_bounced(str(reply)) if self._traits.soft_bounce else reply  # (psc_soften_reply)
        log.info("NOQUEUE: reject: RCPT from %s: %s; from=<%s>, to=<%s>, proto=%s, helo=<%s>",
                 self._state.client.where, logged, _logged(self._sender), _logged(_address(args.partition(":")[2])),
                 self._protocol, printable(self._helo or ""))
        return f"{reply}\r\n"

    def _data_cmd(self, args: str) -> str:
        log.info("DATA without valid RCPT from %s", self._state.client.where)
        self.over = True
        if _token(args) is not None:
            return f"{status.POSTSCREEN_DATA_SYNTAX}\r\n"
        if self._sender is None:
            return f"{status.NEED_RCPT}\r\n"
        return f"{status.NO_VALID_RECIPIENTS}\r\n"

    def _bdat_cmd(self, args: str) -> str:
        log.info("BDAT without valid RCPT from %s", self._state.client.where)
        self.over = True
        if "chunking" in self._refused:
            return f"{status.NOT_IMPLEMENTED}\r\n"
        if _token(args) is None:
            return f"{status.POSTSCREEN_BDAT_SYNTAX}\r\n"
        if self._sender is None:
            return f"{status.POSTSCREEN_BDAT_NEED_MAIL}\r\n"
        return f"{status.NO_VALID_RECIPIENTS}\r\n"

    def _rset_cmd(self, args: str) -> str:
        self._sender = None
        return f"{status.OK}\r\n"

    def _noop_cmd(self, args: str) -> str:
        return f"{status.OK}\r\n"

    def _vrfy_cmd(self, args: str) -> str:
        if _token(args) is None:
            return f"{status.POSTSCREEN_VRFY_SYNTAX}\r\n"
        if self._traits.disable_vrfy:
            return f"{status.VRFY_DISABLED}\r\n"
        return f"{self._rcpt_reply()}\r\n"

    def _etrn_cmd(self, args: str) -> str:
        if self._traits.helo_required and self._helo is None:
            return f"{status.NEED_HELO}\r\n"
        if _token(args) is None:
            return f"{status.postscreen_etrn_syntax()}\r\n"
        return f"{status.postscreen_etrn_refused()}\r\n"

    def _starttls_cmd(self, args: str) -> str:
        if _token(args) is not None:
            return f"{status.POSTSCREEN_STARTTLS_SYNTAX}\r\n"
        if self.tls_active:
            return f"{status.TLS_ALREADY_ACTIVE}\r\n"
        if self._traits.tls == "none" or "starttls" in self._refused:
            return f"{status.NOT_IMPLEMENTED}\r\n"
        self.tls_wanted = True
        return f"{status.READY_FOR_TLS}\r\n"

    def _quit_cmd(self, args: str) -> str:
        self.over = True
        return f"{status.BYE}\r\n"

    _COMMANDS: dict[str, Callable[["_Dummy", str], str]] = {
        "HELO": _helo_cmd, "EHLO": _ehlo_cmd, "STARTTLS": _starttls_cmd, "MAIL": _mail_cmd, "RCPT": _rcpt_cmd,
        "DATA": _data_cmd, "BDAT": _bdat_cmd, "RSET": _rset_cmd, "NOOP": _noop_cmd, "VRFY": _vrfy_cmd,
        "ETRN": _etrn_cmd, "QUIT": _quit_cmd,
    }


class _Replies:
    """A connection whose replies go out as psc_send_reply writes them: under soft_bounce a 5xx as a 4xx (the code's
    and the enhanced code's first digit), then under a 4xx or 5xx the footer `mapped(reply)` gives (the reply as
    sent to send(), before soft_bounce, without its CRLF; postscreen_reject_footer_maps), else `template`
    (postscreen_reject_footer; "" none), its macros' values kept to the characters `allowed` (None: the default
    expansion filter). A footer from a table that cannot be expanded is left out, told to `unusable` (a FailureLog:
    once, then once a minute with a count)."""

    def __init__(self, conn: Connection, *, soft_bounce: bool, template: str, values: Callable[[], dict[str, str]],
                 mapped: Callable[[str], str | None] | None = None, allowed: str | None = None,
                 unusable: FailureLog | None = None):
        self._conn = conn
        self._unusable = unusable
        self._soft_bounce = soft_bounce
        self._template = template
        self._values = values
        self._mapped = mapped
        self._allowed = allowed

    @property
    def wire(self) -> Wire:
        return self._conn.wire

    def send(self, text: str) -> None:
        template = self._footer(text) if text[:1] in ("4", "5") else ""
        if self._soft_bounce:
            text = status.soft_bounced(text)
        if template:
            text = status.with_footer(text.removesuffix("\r\n"), *template) + "\r\n"
        self._conn.send(text)

    def _footer(self, reply: str) -> tuple[bool, list[str]] | str:
        """The footer's lines for `reply` ("" none)."""
        found = self._mapped(reply.removesuffix("\r\n")) if self._mapped is not None else None
        if found:
            gripe = footer_gripe(found)
            try:
                if gripe is None:
                    return footer_lines(found, self._values(), _unknown_macro, self._allowed)
            except ValueError as e:
                gripe = str(e)
            if self._unusable is not None:
                shown = reply.removesuffix("\r\n")
                self._unusable.failed(UnusableFooter(f"footer for {shown!r} not used: {gripe}"))
            return ""
        return footer_lines(self._template, self._values(), _unknown_macro, self._allowed) if self._template else ""

    def hang_up(self) -> None:
        self._conn.hang_up()

    async def tls_handshake(self, timeout: float, client: str, lines: SmtpdLog | None) -> tuple[bool, str]:
        return await self._conn.tls_handshake(timeout, client, lines)


class UnusableFooter(LookupRetry):
    """A footer a postscreen_reject_footer_maps table gave that cannot go under a reply: a fault of the table's
    data, told through a FailureLog (no traceback) as the table's failures are."""


def _unknown_macro(name: str) -> None:
    """psc_expand_lookup's warning for a macro it does not know (smtpd's footer's others), as it is looked up."""
    log.warning('unknown macro name "%s" in expansion request', name)


def _logged(address: str) -> str:
    """An address as the log shows it (Postfix's info_log_addr_form: external, the local part quoted if it needs)."""
    if not address:
        return ""
    local, at, domain = address.rpartition("@")
    return printable(f"{quoted_local(local)}@{domain}" if at else quoted_local(address))


def _token(args: str) -> str | None:
    """The first word of a command's arguments (Postfix's mystrtok on spaces), None when there is none."""
    words = args.split(" ")
    return next((word for word in words if word), None)


def _address(text: str) -> str:
    """psc_extract_addr: the address after MAIL FROM:/RCPT TO: (spaces skipped; up to `>` after `<`, else up to a
    space; quotes dropped, a backslash taking the next character; a source route's `@a,@b:` dropped)."""
    text = text.lstrip(" ")
    stop = ">" if text.startswith("<") else " "
    chars, quoted, i = [], False, 1 if stop == ">" else 0
    while i < len(text):
        c = text[i]
        if not quoted and c == stop:
            break
        if c == '"':
            quoted = not quoted
        else:
            if c == "\\":
                i += 1
                if i == len(text):
                    break
                c = text[i]
            chars.append(c)
        i += 1
    address = "".join(chars)
    if address.startswith("@") and ":" in address:
        address = address.partition(":")[2]
    return address


__all__ = ["Client", "Connection", "EngineTraits", "PassCache", "Postscreen", "Verdict"]
