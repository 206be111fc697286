"""Address verification: Postfix's verify(8) for smtpd's reject_unverified_recipient and reject_unverified_sender.

What it owns
- `Verifier(settings, probe, clock, log)`: the cache of what is known of each address and the probes under way.
  `query(addr, probe=True) -> Verdict` is verify(8)'s query: the cached status, or TODO ("Address verification
  in progress") when there is none or it expired; it starts a probe when the result needs refreshing and none
  is under way for the address. `await wait(addr, timeout)`: until that address's probe ends or `timeout`
  passes (smtpd's poll, as Postfix's address_verify_poll_count x address_verify_poll_delay). `await close()`
  cancels the probes under way and waits until they have ended (before the transports they use close); a query
  after it starts no probe. `reconfigure(settings, probe)` (a reload) keeps the cache. Each probe gets an id,
  `VRFY000001`… (the verifier's count: unique for the server's life, reloads included) and its verdict, whoever
  gave it, is one line of the mail log (`MailLog.verified`, under the agent that answered), as Postfix logs a
  probe's result through the agent's own line with the probe's queue id.
- `Prober(router, transports, sender, deliver)`: one probe as a callable, `await prober(addr, probe_id) ->
  Verdict`, along the address's route (cleanup's canonical and virtual alias maps, trivial-rewrite's
  transport and nexthop, transport_maps, relayhost, MX, the sender-dependent tables asked with the probe's sender;
  `router` is built with [address_verify]'s overrides of
  these, Postfix's address_verify_relayhost, _transport_maps, _*_transport): an SMTP or LMTP next hop gets a
  session with MAIL FROM:<sender>, RCPT TO:<addr> and no DATA (`DeliveryRequest.verify`: Postfix's smtp with the
  verify flag), so nothing is delivered. That session goes through qmgr (`deliver`: its `deliver_probe`), as
  Postfix's probe is a message qmgr schedules: a destination qmgr holds for dead is not tried, the probe is
  deferred "delivery temporarily suspended: <why>" (logged under qmgr); a probe's own failure makes no
  destination dead (nor does Postfix's: its smtp client reports the probe's deferral as recorded, so qmgr hears
  of no site failure). The error transport answers with its nexthop's status and text (deferred for 4.X.X); discard
  accepts. The local transport answers as Postfix's local(8) answers a probe, without delivering: an alias is
  deliverable ("aliased to <value>", not expanded), a local user too ("delivers to mailbox"), another name bounces
  (`unknown user: "name"`); the virtual transport as virtual(8): a virtual_mailbox_maps user is deliverable, another
  bounces. Other transports (pipe services, capture) are taken as deliverable, as Postfix's pipe(8) reports a probe.
  The route is `Router.queued`'s: an address that virtual alias expansion makes into more than one route is
  deliverable without a probe ("aliased to multiple recipients"), as Postfix's cleanup declares a one-to-many
  alias in a probe, so that the results of its members do not overwrite each other.
- `ProbeSender(sender, ttl, qualify, clock)`: the probes' envelope sender, with Postfix's time-dependent stamp
  (address_verify_sender_ttl), and the test smtpd uses to take this server's own probe sender unrefused.

The cache, as verify(8)'s (Postfix's lifetimes and its rules): an OK result is kept positive_expire_time and
probed again after positive_refresh_time; a failure (bounced or deferred; only with negative_cache) kept
negative_expire_time and probed again after negative_refresh_time; a failed probe never replaces an OK result
that has not expired (the address is probed again at the next query). It lives in memory, not in the queue
database: one process needs no daemon to share it, and a restart costs one "in progress" 450 per address in use
(Postfix with an empty address_verify_map does the same). Bounded: at most `cache_size` addresses and CACHE_BYTES
of them, as memory counts them (sys.getsizeof of the address, the text and the relay, which includes the 4 bytes
a character of a string with an emoji takes, plus ENTRY_COST; the least recently used are dropped). A client
chooses the addresses (up to 254 UTF-8 bytes, SMTPUTF8 too) and, with reject_unverified_sender, its own MX chooses
the text (a remote reply is up to ~4 KB); so the text kept is cut to TEXT_BYTES of memory, and a stranger needs
~33 000 probes, not ~4 000, to push the other addresses out. (Postfix's verify keeps the whole text, in its btree
file: the same 4xx reply, which shows 250 characters of it; a 5xx `undeliverable address` reply shows what is kept
here, there the whole text; the log line has it whole in both.) At most `probe_limit` probes at once (an address
beyond that is answered "in progress" and probed at a later query: a flood of random recipients starts no more
probes and holds no more memory; logged once, then again only after a probe has ended), one probe per address at a
time (queries for it while it runs share it). A probe ends within its transport's own timeouts; Postfix's 1000 s
probe time-to-live is not needed.

Failure behaviour: a probe that raises (a table that cannot answer: LookupRetry, an unexpected error) is a
deferred result with the error's text (a DeliveryError's reason, which names the table or the loop, logged as a
warning; another error with its traceback); nothing here raises for an address.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import partial
from typing import Awaitable, Callable, Mapping

from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.errors import DeliveryError
from mailflow.logs import MailLog
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, Recipient
from mailflow.transports import agent_of
from mailflow.under_way import UnderWay

log = logging.getLogger("mailflow.verify")

IN_PROGRESS = "Address verification in progress"  # verify(8)'s text while a probe is under way
PROBE_TRANSPORTS = ("smtp", "lmtp", "error", "discard")  # agents that answer a probe themselves, delivering nothing


class Status(enum.Enum):
    """verify(8)'s address status (Postfix's DEL_RCPT_STAT_*)."""

    OK = "deliverable"
    DEFER = "deferred"
    BOUNCE = "bounced"
    TODO = "in progress"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    text: str
    dsn: str = ""  # the probe's status code, for the log (_DSN_OF: by status when the agent gave none)
    relay: str = "none"  # who answered the probe, for the log
    agent: str = "verify"  # the delivery agent that answered: the log line's service


CACHE_BYTES = 64 * 2**20  # the cache's bytes at most, as _Entry.size counts them (cache_size short ones fit)
ENTRY_COST = 300  # an entry's bytes beyond sys.getsizeof of its address, text and relay (measured: 264-296)
TEXT_BYTES = 1024  # of memory, the most of a probe's text the cache keeps (a cut text says so at its end)


@dataclass(slots=True)
class _Entry:
    verdict: Verdict
    updated: float  # when the probe's result came
    size: int  # sys.getsizeof of its address, text and relay, plus ENTRY_COST


_OUTCOMES = {Outcome.SENT: Status.OK, Outcome.DEFERRED: Status.DEFER, Outcome.BOUNCED: Status.BOUNCE}
_DSN_OF = {Status.OK: "2.0.0", Status.DEFER: "4.0.0", Status.BOUNCE: "5.0.0"}


class Verifier:
    """See the module docstring. `settings`: an AddressVerifyConfig; `probe(addr, probe_id)`: a Prober (or a
    test's); `log`: the server's mail log."""

    def __init__(self, settings, probe: Callable[[str, str], Awaitable[Verdict]], clock: Clock,
                 log: MailLog | None = None):
        self.settings = settings
        self._probe = probe
        self._clock = clock
        self._log = log or MailLog()
        self._ids = itertools.count(1)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cache_bytes = 0  # the entries' sizes
        self._probes: dict[str, asyncio.Task] = {}
        self._probing = UnderWay()  # the probes under way, by the reload whose routes they take
        self._closed = False
        self._limit_logged = False  # probe_limit's line is written once, then again only after a probe has ended

    def query(self, addr: str, probe: bool = True) -> Verdict:
        """The address's status; a probe started when its result needs refreshing (`probe`)."""
        now = self._clock.time()
        entry = self._cache.get(addr)
        if entry is not None and self._expired(entry, now):  # unknown again, whether a probe runs or not
            self._drop(addr)
            entry = None
        if entry is not None:
            self._cache.move_to_end(addr)
        if probe and addr not in self._probes and (entry is None or self._refresh_due(entry, now)):
            self._start(addr)
        return entry.verdict if entry is not None else Verdict(Status.TODO, IN_PROGRESS)

    async def wait(self, addr: str, timeout: float) -> None:
        """Until the probe of `addr` ends (at once when none is under way) or `timeout` passes; the probe goes on
        if the waiter goes away."""
        task = self._probes.get(addr)
        if task is not None and timeout > 0:
            await asyncio.wait({task}, timeout=timeout)

    def reconfigure(self, settings, probe: Callable[[str, str], Awaitable[Verdict]]) -> None:
        """A reload: new settings and routes for the next probes; the cache is kept (probes under way finish)."""
        self.settings = settings
        self._probe = probe
        self._probing.reconfigured()
        self._trim()

    @property
    def retiring(self) -> bool:
        """A probe begun before the last reload (with the routes and transports it replaced) is still under way."""
        return self._probing.before_reload

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _expired(self, entry: _Entry, now: float) -> bool:
        s = self.settings
        lifetime = s.positive_expire_time if entry.verdict.status is Status.OK else s.negative_expire_time
        return entry.updated + lifetime < now

    def _refresh_due(self, entry: _Entry, now: float) -> bool:
        s = self.settings
        after = s.positive_refresh_time if entry.verdict.status is Status.OK else s.negative_refresh_time
        return entry.updated + after < now

    def _start(self, addr: str) -> None:
        if self._closed:
            return
        if len(self._probes) >= self.settings.probe_limit:
            if not self._limit_logged:
                log.info("address verification: %d probes under way (probe_limit); <%s> and the addresses after it "
                         "wait for a later query", len(self._probes), addr)
                self._limit_logged = True
            return
        task = asyncio.ensure_future(self._run(addr))
        self._probes[addr] = task
        task.add_done_callback(lambda _: self._ended(addr))

    def _ended(self, addr: str) -> None:
        self._probes.pop(addr, None)
        self._limit_logged = False

    async def _run(self, addr: str) -> None:
        probe_id = f"VRFY{next(self._ids):06X}"
        try:
            with self._probing.one():
                verdict = await self._probe(addr, probe_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a probe must not end without a result; the next query probes again
            text = e.text if isinstance(e, DeliveryError) else "address verification problem"
            if isinstance(e, DeliveryError):
                log.warning("%s: address verification of <%s>: %s", probe_id, addr, e.reason)
            else:
                log.exception("%s: address verification of <%s> failed", probe_id, addr)
            verdict = Verdict(Status.DEFER, text, getattr(e, "dsn", ""))
        self._logged(probe_id, addr, verdict)
        self._update(addr, verdict)

    def _logged(self, probe_id: str, addr: str, verdict: Verdict) -> None:
        """Postfix's verify_append: the agent's line, its status the probe's action."""
        action = "deliverable" if verdict.status is Status.OK else "undeliverable"
        if verdict.status is not Status.OK and not self.settings.negative_cache:
            action = "undeliverable-but-not-cached"
        self._log.verified(probe_id, addr, relay=verdict.relay, dsn=verdict.dsn or _DSN_OF[verdict.status],
                           status=action, text=verdict.text, agent=verdict.agent)

    def _update(self, addr: str, verdict: Verdict) -> None:
        """verify(8)'s update: a failure is cached only with negative_cache and never replaces an OK result that
        has not expired."""
        if verdict.status is not Status.OK:
            if not self.settings.negative_cache:
                return
            kept = self._cache.get(addr)
            if kept is not None and kept.verdict.status is Status.OK and not self._expired(kept, self._clock.time()):
                return
        if addr in self._cache:
            self._drop(addr)
        verdict = replace(verdict, text=kept_text(verdict.text))
        size = sys.getsizeof(addr) + sys.getsizeof(verdict.text) + sys.getsizeof(verdict.relay) + ENTRY_COST
        entry = self._cache[addr] = _Entry(verdict, self._clock.time(), size)
        self._cache_bytes += entry.size
        self._trim()

    def _drop(self, addr: str) -> None:
        self._cache_bytes -= self._cache.pop(addr).size

    def _trim(self) -> None:
        """The least recently used go until the cache is within cache_size and CACHE_BYTES."""
        while len(self._cache) > self.settings.cache_size or self._cache_bytes > CACHE_BYTES:
            self._drop(next(iter(self._cache)))


def kept_text(text: str) -> str:
    """`text` as the cache keeps it: at most TEXT_BYTES of memory (1024 characters, 512 with one past U+00FF,
    256 with one past U+FFFF, as Python stores them), a cut one ending in "..."."""
    if len(text) <= TEXT_BYTES // 4:
        return text
    widest = max(text)
    width = 1 if widest <= "\u00ff" else 2 if widest <= "\uffff" else 4
    keep = TEXT_BYTES // width
    return text if len(text) <= keep else text[:keep - 3] + "..."


STAMP_DIGITS = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # Postfix's safe_ultostr, base 31: no vowels, no lower case


class ProbeSender:
    """The probes' envelope sender: Postfix's address_verify_sender with address_verify_sender_ttl
    (verify_sender_addr.c). `sender`: as configured ("" or "<>": the null sender, never stamped); `ttl`: seconds
    (0: a fixed address); `qualify`: trivial-rewrite's (a bare name gets @myorigin); `clock`: the server's.

    `address()`: the sender of a probe starting now: with a ttl, the local part gets the number of ttl periods
    since the epoch, in base 31 (STAMP_DIGITS), appended without a delimiter (`double-bounce1C3F5@example.com`),
    so the address changes every ttl and does not end up on spammers' lists for good. `own(addr)`: when `addr`
    is this server's probe sender (the stamp, if any, within one ttl of now; any case), its address without the
    stamp, else None: smtpd takes it without its restrictions, as Postfix's smtpd, so that a site verifying the
    sender of our probes is not refused (no mutual negative caching)."""

    def __init__(self, sender: str, ttl: float, qualify: Callable[[str], str], clock: Clock):
        bare = sender.strip()
        self._bare = "" if bare == "<>" else bare
        self._ttl = int(ttl)
        self._qualify = qualify
        self._clock = clock
        self._plain = plain = qualify(self._bare) if self._bare else ""
        # what `own` compares (it runs at every MAIL and RCPT): the local part's length, the local part and the
        # '@domain', lower-cased
        self._local_length = plain.find("@") if "@" in plain else len(plain)
        self._local = plain[:self._local_length].lower()
        self._at_domain = plain[self._local_length:].lower()

    def address(self) -> str:
        if not self._bare or not self._ttl:
            return self._plain
        local, at, domain = self._bare.partition("@")
        return self._qualify(f"{local}{_stamp(self._epoch())}{at}{domain}")

    def own(self, addr: str) -> str | None:
        plain, length = self._plain, self._local_length
        if not plain:
            return None
        if addr[:length].lower() != self._local or _at_domain(addr).lower() != self._at_domain:
            return None
        rest = addr[length:].partition("@")[0]
        if not self._ttl:
            return plain if not rest else None
        epoch = _unstamp(rest)
        return plain if epoch is not None and abs(epoch - self._epoch()) <= 1 else None

    def _epoch(self) -> int:
        return int(self._clock.time()) // self._ttl


def _stamp(number: int) -> str:
    digits = ""
    while number:
        number, digit = divmod(number, len(STAMP_DIGITS))
        digits = STAMP_DIGITS[digit] + digits
    return digits


def _unstamp(text: str) -> int | None:
    if not text or any(c not in STAMP_DIGITS for c in text):
        return None
    number = 0
    for c in text:
        number = number * len(STAMP_DIGITS) + STAMP_DIGITS.index(c)
    return number


def _at_domain(addr: str) -> str:
    """`@domain` from the first '@' on, "" when there is none (as Postfix's strchr)."""
    at = addr.find("@")
    return addr[at:] if at >= 0 else ""


ProbeDelivery = Callable[[str, DeliveryRequest], Awaitable[tuple[DeliveryReport, str]]]


class Prober:
    """One probe along an address's route; see the module docstring. `router`: mailflow.routing.router.Router
    (the probes' routing: [address_verify]'s overrides applied); `transports`: qmgr's, by name; `sender`: a
    ProbeSender; `deliver(transport, request) -> (report, program)`: qmgr's `deliver_probe`, which runs the
    transport unless the destination is dead."""

    def __init__(self, router, transports: Mapping, sender: ProbeSender, deliver: ProbeDelivery):
        self._router = router
        self._transports = transports
        self._sender = sender
        self._deliver_by_qmgr = deliver

    async def __call__(self, addr: str, probe_id: str) -> Verdict:
        sender = self._sender.address()  # routes the probe too (sender-dependent tables), as it would mail from it
        queued = await self._router.tables.run(partial(self._router.queued, addr, sender=sender))
        if len(queued) > 1:  # Postfix's cleanup_out_recipient: a probe's one-to-many alias is not probed further
            return Verdict(Status.OK, "aliased to multiple recipients", "2.0.0", agent="cleanup")
        (_, res), = queued  # (virtual alias expansion leaves one address at least)
        return await self._deliver(probe_id, sender, res.address, res.transport, res.nexthop)

    async def _deliver(self, probe_id: str, sender: str, addr: str, transport_name: str, nexthop: str) -> Verdict:
        transport = self._transports.get(transport_name)
        if transport is None:  # qmgr answers for a transport that is not defined, as it answers for mail
            return await self._probe(probe_id, sender, addr, transport_name, nexthop)
        program = getattr(transport, "program", "")
        if agent_of(program) == "local":
            return await self._router.tables.run(self._local, addr)
        if agent_of(program) == "virtual":
            return await self._router.tables.run(self._virtual, addr)
        if agent_of(program) not in PROBE_TRANSPORTS:
            return Verdict(Status.OK, f"delivers to {program or transport_name}", "2.0.0", transport_name,
                           program or transport_name)
        return await self._probe(probe_id, sender, addr, transport_name, nexthop)

    async def _probe(self, probe_id: str, sender: str, addr: str, transport_name: str, nexthop: str) -> Verdict:
        """MAIL and RCPT to `addr` through qmgr's `deliver_probe`: its transport's verdict, or qmgr's own."""
        request = DeliveryRequest(queue_id=probe_id, sender=sender,
                                  recipients=(Recipient(0, addr, addr),), nexthop=nexthop, content=Content(),
                                  verify=True)
        report, agent = await self._deliver_by_qmgr(transport_name, request)
        result = report.results[0]
        return Verdict(_OUTCOMES[result.outcome], result.text, result.dsn, result.relay or "none", agent)

    def _local(self, addr: str) -> Verdict:
        """local(8) with the verify flag: aliases are not expanded, no mailbox is written."""
        rewriter = self._router.rewriter
        alias = rewriter.alias(addr)
        if alias is not None:
            return Verdict(Status.OK, f"aliased to {alias[2].strip()}", "2.0.0", "local", "local")
        refused = self._router.local.unknown_user(rewriter.local_user(addr), addr)
        if refused is not None:
            return Verdict(Status.BOUNCE, refused.text, refused.dsn, "local", "local")
        return Verdict(Status.OK, "delivers to mailbox", "2.0.0", "local", "local")

    def _virtual(self, addr: str) -> Verdict:
        if self._router.rewriter.virtual_mailbox(addr) is None:
            return Verdict(Status.BOUNCE, f"unknown user: \"{addr.lower()}\"", "5.1.1", "virtual", "virtual")
        return Verdict(Status.OK, "delivers to maildir", "2.0.0", "virtual", "virtual")
