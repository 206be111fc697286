"""postscreen: Postfix's zombie screen (postscreen(8)) in front of an mta listener's smtpd, `[smtpd.postscreen]`.

    Postscreen(config, mynetworks, tables, resolver, cache, clock)   one per listener (built with it)
        .screen(conn) -> Verdict    run before smtpd's "connect from": PASS (smtpd takes the client) or the end
    PassCache(limit)                the clients that passed, per test with its expiry (postscreen_cache_map; one
                                    per server, in memory, the oldest dropped beyond `limit`)

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
  DNSBL answers), then `PASS OLD`.
- beyond `pre_queue_limit` clients in the tests at once on the listener (the access list and the cache come first):
  `reject: connect from [ip]:port: all screening ports busy`, `421 4.3.2 All screening ports are busy`,
  `DISCONNECT [ip]:port`.
- the early tests: the `220-` teaser (greet_banner: `$smtpd_banner` is smtpd's text, "" none), the DNSBL queries
  (dnsbl_sites, A records as dnsblog, all at once, each bounded by dnsbl_timeout, shared by the connections of one
  client in the tests at once; what has not answered by the end of the greet wait does
  not count, as Postfix's partial score) and the wait of greet_wait for input: input before it is `PREGREET n after
  t from [ip]:port: text` and greet_action; a score at or above dnsbl_threshold is `DNSBL rank n for [ip]:port` and
  dnsbl_action; a score at or below a negative dnsbl_allowlist_threshold ends the wait and passes the greet test. A
  client that closes meanwhile: `HANGUP after t from [ip]:port in tests before SMTP handshake`, `DISCONNECT
  [ip]:port`.
- actions: ignore (logged only; the test is repeated next time, the others' passes are cached; a denylisted client
  under ignore may still PASS OLD), drop (`521 …` and `DISCONNECT`), enforce (the
  dummy SMTP engine: greeting, HELO/EHLO, MAIL, then every RCPT gets the refusal, logged as `NOQUEUE: reject:
  RCPT from [ip]:port: 550 5.7.1 …; from=<s>, to=<r>, proto=ESMTP, helo=<h>`; DATA and BDAT `554 5.5.1 Error: no
  valid recipients`; the client never reaches smtpd). The replies are postscreen's: pregreet `5xx 5.5.1 Protocol
  error`, denylist `5xx 5.3.2 Service currently unavailable`, DNSBL `5xx 5.7.1 Service unavailable; client [ip]
  blocked using <the site of the highest weight>`.
- all tests passed: `PASS NEW [ip]:port`, the cache updated (greet_ttl; the DNSBL pass for dnsbl_max_ttl clamped
  to dnsbl_min_ttl, the resolver reports no TTLs; for dnsbl_min_ttl when a list failed or none answered), to smtpd,
  which greets with its own `220`. A DNS failure is logged as dnsblog's `dnsblog_query: lookup error for DNS query`.

Not built (Postfix's deep protocol tests: pipelining, non_smtp_command, bare_newline, which need the client to
reconnect; postscreen_dnsbl_reply_map; a persistent cache_map; postscreen_allowlist_interfaces).

Bounded: at most pre_queue_limit clients in the tests at once per listener, and client_connection_count_limit
connections of one client in the screen; the DNSBL queries by their deadline and the greet wait; the dummy engine by
smtpd's `timeout` per command, its line length (`COMMAND LENGTH LIMIT`) and command_count_limit (`COMMAND COUNT
LIMIT`; so its replies a client does not read stay a few KiB); the cache by `cache_limit`. Nothing runs for a
listener with postscreen off.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Coroutine, Protocol

from mailflow import status
from mailflow.clock import Clock
from mailflow.config.smtpd import SMTPD_BANNER, PostscreenConfig
from mailflow.dnsbl_sites import DnsblSite, parse_dnsbl_site
from mailflow.dns import NotFound
from mailflow.errors import LookupRetry
from mailflow.logs import escaped, format_tv, printable
from mailflow.stages.smtpd.anvil import Places
from mailflow.stages.smtpd.dns_checks import rbl_query_name
from mailflow.stages.smtpd.wire import Wire, WireError
from mailflow.tables import TableCache
from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.postscreen")

PREGREET, DNSBL = "pregreet", "dnsbl"
PREGREET_READ = 1023  # bytes of early input counted in the PREGREET line (Postfix's PSC_READ_BUF_SIZE - 1)
PREGREET_LOGGED = 100  # characters of it quoted, escaped (Postfix's %.100s)
DUMMY_LINE_LIMIT = 2048  # the dummy engine's command line limit


class Verdict(enum.Enum):
    PASS = "pass"  # smtpd takes the client
    DONE = "done"  # the connection is over


class Connection(Protocol):
    """What the screen needs of a session: its addresses, its input, a way to write and to close."""

    @property
    def wire(self) -> Wire: ...

    def send(self, text: str) -> None: ...

    def hang_up(self) -> None: ...


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
    """ip -> {test: expiry}: the tests each client passed, until when; the oldest client dropped beyond `limit`."""

    def __init__(self, limit: int):
        self._limit = limit
        self._entries: OrderedDict[str, dict[str, float]] = OrderedDict()

    def passed(self, ip: str, tests: tuple[str, ...], now: float) -> bool:
        return self.due(ip, tests, now) == ()

    def due(self, ip: str, tests: tuple[str, ...], now: float) -> tuple[str, ...] | None:
        """The tests of `tests` the client has no unexpired pass for; None when it is not in the cache at all."""
        entry = self._entries.get(ip)
        if entry is None:
            return None
        return tuple(test for test in tests if entry.get(test, 0.0) <= now)

    def record(self, ip: str, expiries: dict[str, float]) -> None:
        entry = self._entries.pop(ip, {})
        entry.update(expiries)
        self._entries[ip] = entry
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)


@dataclass
class _Screening:
    """One client's state while it is screened."""

    client: Client
    rcpt_reply: status.Reply | None = None  # enforce: what every RCPT gets
    failed: bool = False  # a test failed under drop or enforce (ignore: PSC_UNFAIL_SESSION_STATE, not failed)
    passes: dict[str, float] | None = None  # the tests passed this session, until when
    due: tuple[str, ...] = ()  # a cached client's expired tests, the ones it meets (): all
    known: bool = False  # in the cache: its PASS after the tests is `PASS OLD` (Postfix's PSC_STATE_FLAG_NEW unset)

    def fail(self, action: str, reply_for: Callable[[int], status.Reply], conn: Connection) -> bool:
        """Apply `action` to a failed test; True when the connection was dropped. ignore: logged only, the test
        not passed (repeated next time), the others' passes kept."""
        if action == "ignore":
            return False
        self.failed = True
        if action == "drop":
            _drop(conn, self.client, reply_for(521))
            return True
        self.rcpt_reply = self.rcpt_reply or reply_for(550)
        return False


def _drop(conn: Connection, client: Client, reply: status.Reply) -> None:
    conn.send(f"{reply}\r\n")
    log.info("DISCONNECT %s", client.where)
    conn.hang_up()


class Postscreen:
    """One listener's screen (see the module doc)."""

    def __init__(self, config: PostscreenConfig, *, mynetworks: NetworkList, tables: TableCache, resolver,
                 cache: PassCache, clock: Clock, hostname: str, banner: str, smtpd_timeout: float,
                 smtpd_connection_limit: int = 0):
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
        self._timeout = smtpd_timeout
        self._screening = Places(config.pre_queue_limit)
        limit = config.client_connection_count_limit
        self._connection_limit = smtpd_connection_limit if limit is None else limit
        self._connections: dict[str, int] = {}  # ip -> its connections in the screen now (none: no key)
        self._dnsbl_in_flight: dict[str, _DnsblQueries] = {}  # ip -> the DNSBL queries its connections share
        self._tests = (PREGREET, DNSBL) if self._sites else (PREGREET,)

    async def screen(self, conn: Connection, client: Client) -> Verdict:
        log.info("CONNECT from %s to [%s]:%s", client.where, client.server_ip, client.server_port)
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

    def _leave(self, ip: str) -> None:
        count = self._connections.pop(ip) - 1
        if count:
            self._connections[ip] = count

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
        if not state.failed:
            due = self._cache.due(client.ip, self._tests, self._clock.time())
            if due == ():
                log.info("PASS OLD %s", client.where)
                return Verdict.PASS
            if due is not None:  # (psc_parse_tests: only the expired tests run again)
                state.due, state.known = due, True
        if not self._screening.take():
            log.info("reject: connect from %s: all screening ports busy", client.where)
            _drop(conn, client, status.SCREENING_PORTS_BUSY)
            return Verdict.DONE
        try:
            return await self._tests_of(conn, state)
        finally:
            self._screening.give_back()

    async def _tests_of(self, conn: Connection, state: _Screening) -> Verdict:
        """The early tests, then the dummy engine (enforce), or smtpd: `PASS NEW` when every test passed
        (psc_conclude), the passes cached (those of the tests not failed under ignore too)."""
        client = state.client
        if not await self._early_tests(conn, state):
            return Verdict.DONE
        if state.rcpt_reply is not None:
            await self._dummy_engine(conn, state)
            return Verdict.DONE
        passes = state.passes or {}
        if all(test in passes for test in state.due or self._tests):
            log.info("PASS %s %s", "OLD" if state.known else "NEW", client.where)
        if passes:
            self._cache.record(client.ip, passes)
        return Verdict.PASS

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
        deadline = asyncio.get_running_loop().time() + config.greet_wait
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
                if state.fail(config.greet_action, status.postscreen_pregreet, conn):
                    return False  # (drop: at once, the DNSBL answers not waited for)
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
        passes: dict[str, float] = {}
        # (an allowlisting score that came too late to end the wait: a failed test stays failed, as Postfix)
        if not early and PREGREET in due:
            passes[PREGREET] = self._clock.time() + config.greet_ttl
            if cut_short and queries is not None:  # psc_allowlist_non_dnsbl: passed until the DNSBL pass expires
                passes[PREGREET] = self._clock.time() + self._dnsbl_pass_ttl(queries)
        if queries is not None:
            score, site = queries.score(self._sites)
            if score >= config.dnsbl_threshold:
                log.info("DNSBL rank %d for %s", score, client.where)
                if state.fail(config.dnsbl_action, lambda code: status.postscreen_dnsbl(code, client.ip, site), conn):
                    return False
            else:
                passes[DNSBL] = self._clock.time() + self._dnsbl_pass_ttl(queries)
        state.passes = passes
        return True

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
            log.warning("dnsblog_query: lookup error for DNS query %s: %s", query, e.reason)
            return None

    # -- enforce: the dummy SMTP engine

    async def _dummy_engine(self, conn: Connection, state: _Screening) -> None:
        """postscreen_smtpd.c: answer as an SMTP server that refuses every recipient; never hand over."""
        dialogue = _Dummy(self._hostname, state)
        conn.send(f"{status.greeting(self._hostname, self._banner)}\r\n")
        started = self._clock.time()
        try:
            while not dialogue.over:
                async with asyncio.timeout(self._timeout):
                    line = await conn.wire.read_lenient_line(DUMMY_LINE_LIMIT)
                if line is None or not self._within_count(dialogue, line):
                    log.info("COMMAND %s LIMIT from %s after %s", "LENGTH" if line is None else "COUNT",
                             state.client.where, dialogue.where)
                    conn.send(f"{status.postscreen_unavailable(self._hostname)}\r\n")
                    break
                conn.send(dialogue.answer(line.decode("utf-8", "replace")))
                await asyncio.sleep(0)  # a client that pipelines its commands does not hold the loop
        except TimeoutError:
            log.info("COMMAND TIME LIMIT from %s after %s", state.client.where, dialogue.where)
            conn.send(f"{status.session_timeout(self._hostname)}\r\n")
        except (ConnectionError, WireError):
            log.info("HANGUP after %s from %s in tests after SMTP handshake",
                     format_tv(self._clock.time() - started), state.client.where)
        log.info("DISCONNECT %s", state.client.where)
        conn.hang_up()


    def _within_count(self, dialogue: "_Dummy", line: bytes) -> bool:
        """Postfix's command count limit: command_count_limit commands, QUIT always answered. (A line of
        `DUMMY_LINE_LIMIT` bytes without its end is the COMMAND LENGTH LIMIT: both end with a 421.)"""
        dialogue.commands += 1
        return dialogue.commands <= self._config.command_count_limit or _verb(line) == "QUIT"


def _verb(line: bytes) -> str:
    return line.strip().partition(b" ")[0].decode("ascii", "replace").upper()


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
    """The dummy engine's dialogue: one reply (with its CRLF) per command line."""

    def __init__(self, hostname: str, state: _Screening):
        self._hostname = hostname
        self._state = state
        self._helo = ""
        self._protocol = "SMTP"
        self._sender: str | None = None
        self.over = False
        self.commands = 0  # command lines read (postscreen_command_count_limit)
        self.where = "CONNECT"  # the last command (Postfix's state->where)

    def answer(self, line: str) -> str:
        verb, _, arg = line.strip().partition(" ")
        handler = self._COMMANDS.get(verb.upper())
        self.where = verb.upper() if handler is not None else "UNIMPLEMENTED"
        if handler is None:
            return "502 5.5.2 Error: command not recognized\r\n"
        return handler(self, arg.strip())

    def _helo_cmd(self, arg: str) -> str:
        if not arg:
            return "501 Syntax: HELO hostname\r\n"
        self._helo, self._protocol = arg, "SMTP"
        return f"250 {self._hostname}\r\n"

    def _ehlo_cmd(self, arg: str) -> str:
        if not arg:
            return "501 Syntax: EHLO hostname\r\n"
        self._helo, self._protocol = arg, "ESMTP"
        keywords = (self._hostname, "SIZE", "ETRN", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING")
        return "".join(f"250-{k}\r\n" for k in keywords[:-1]) + f"250 {keywords[-1]}\r\n"

    def _mail_cmd(self, arg: str) -> str:
        if not self._helo:
            return "503 5.5.1 Error: send HELO/EHLO first\r\n"
        if self._sender is not None:
            return "503 5.5.1 Error: nested MAIL command\r\n"
        if not arg.upper().startswith("FROM:"):
            return "501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        self._sender = _path(arg[5:])
        return "250 2.1.0 Ok\r\n"

    def _rcpt_cmd(self, arg: str) -> str:
        if self._sender is None:
            return "503 5.5.1 Error: need MAIL command\r\n"
        if not arg.upper().startswith("TO:"):
            return "501 5.5.4 Syntax: RCPT TO:<address>\r\n"
        reply = self._state.rcpt_reply
        log.info("NOQUEUE: reject: RCPT from %s: %s; from=<%s>, to=<%s>, proto=%s, helo=<%s>",
                 self._state.client.where, reply, printable(self._sender), printable(_path(arg[3:])),
                 self._protocol, printable(self._helo))
        return f"{reply}\r\n"

    def _data_cmd(self, arg: str) -> str:
        self.over = True
        if self._sender is None:
            return "503 5.5.1 Error: need RCPT command\r\n"
        return "554 5.5.1 Error: no valid recipients\r\n"

    def _rset_cmd(self, arg: str) -> str:
        self._sender = None
        return "250 2.0.0 Ok\r\n"

    def _noop_cmd(self, arg: str) -> str:
        return "250 2.0.0 Ok\r\n"

    def _quit_cmd(self, arg: str) -> str:
        self.over = True
        return "221 2.0.0 Bye\r\n"

    _COMMANDS: dict[str, Callable[["_Dummy", str], str]] = {
        "HELO": _helo_cmd, "EHLO": _ehlo_cmd, "MAIL": _mail_cmd, "RCPT": _rcpt_cmd, "DATA": _data_cmd,
        "BDAT": _data_cmd, "RSET": _rset_cmd, "NOOP": _noop_cmd, "QUIT": _quit_cmd,
    }


def _path(text: str) -> str:
    """The address of a MAIL FROM:/RCPT TO: argument (its parameters dropped, <> taken off)."""
    word = text.strip().split(" ")[0] if text.strip() else ""
    return word[1:-1] if word.startswith("<") and word.endswith(">") else word


__all__ = ["Client", "Connection", "PassCache", "Postscreen", "Verdict"]
