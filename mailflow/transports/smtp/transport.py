"""The SMTP client transport (Postfix smtp(8)): one delivery from its next hop to every recipient's result.

Owns the order of things (the package docstring says what each recipient gets): screen the envelope, parse the
next hop and find its TLS policy, use a cached session for it when one is idle, else find the peers (addr) and
open a session with the first that completes the handshake (connect), run the transaction (proto), then cache
the session (reuse) or QUIT it; recipients a session deferred go on to the next peer while sessions remain
(MX_SESSION_LIMIT: see the package docstring); with `soft_bounce` (the main setting) the recipients it refused for
good (5xx) go on too, and a 5xx refusal of the handshake tries the next peer, as Postfix's smtp_trouble treats a
5.X.X as soft under soft_bounce at a server that is not the final one (at the last one it stands, and qmgr keeps
it deferred). A peer's soft failure, in its handshake or its transaction, is logged
on a line of its own (`QID: reason`) only when another peer is tried after it, as Postfix logs a server's that is
not the final one (at the final one the recipients' result lines are the only ones); a failed connection at once,
without the queue id (`connect to h[ip]:port: Connection refused`, Postfix's smtp_connect: a connection is not a
message's).
At most MX_ADDRESS_LIMIT (5) addresses are tried per delivery, a cached session's counting (Postfix
smtp_mx_address_limit), however many MX hosts and addresses DNS gives.
`own_addresses` (ipaddress values: mailflow.routing.rewrite.own_addresses) and `own_ports` (smtpd's listener
ports) are this server: Postfix's loop detection, for a next hop on one of those ports, bounces a destination
whose best MX host (or whose [host]) has one of those addresses with 5.4.6 "mail for X loops back to myself";
MX hosts no better than this server are not tried (`_without_myself`). A request whose next hop is `relayhost`
(as written) defers 4.3.5 where DNS or the loop check would bounce it: a configuration problem, as Postfix
(and, deferred, a site failure).
smtp.fallback_relay (Postfix's smtp_fallback_relay; `Site`): after the next hop, each fallback relay in turn is a
site of its own (its TLS policy, cached sessions, MX_ADDRESS_LIMIT and MX_SESSION_LIMIT), for the recipients the
site before left: those its last peer deferred (or could not be talked to; under soft_bounce those refused too),
or all of them when its DNS lookup failed or found nothing (Postfix tries the fallback for a destination not
found, a null MX included). A 5xx reply bounces at once, as without a fallback. No fallback when mail for the next
hop loops back to this server (5.4.6) or this server is one of its MX hosts (Postfix's i_am_mx: no mail loop
between MX and fallback hosts). Only the final site's failures are the recipients' results and the site
verdict; one that is not the final one logs each soft error on a line of its own (`QID: host h[ip] said: 451
...`; trouble.SLICE lines a loop turn). A permanent DNS or loop failure of the last fallback relay defers 4.3.5
with its text, logged `warning: smtp_fallback_relay configuration problem`.

    SmtpTransport(config, *, resolver, helo_name, rng=None, clock=time.monotonic, tables=None, mta_sts=None,
                  plaintext_after=0.0, own_addresses=frozenset(), own_ports=frozenset(), relayhost="",
                  now=time.time, generic=None, checks=None, sender_keys=None, soft_bounce=False,
                  level_source="smtp.tls_security_level", program="smtp")
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
`now`: qmgr's clock, for the time each transaction's session was set up (proto's ConnStats; the log's delays),
and for a delivery that fails before MAIL FROM the time it failed (its set-up dated then, as smtp_bulk_fail).
`plaintext_after` (qmgr's minimal_backoff_time, as Postfix's var_min_backoff_time): at TLS level may, a failed
handshake goes on in plaintext only for a message queued at least this long (`request.queued_for`); new mail is
deferred 4.7.5 instead (see connect). `generic` (mailflow.transports.generic.GenericMaps, None: smtp.generic_maps
unset, nothing asked): the envelope and header addresses as they go on the wire, found once per delivery before
any session (a table that cannot answer defers every recipient, 4.3.0), in a worker thread when the content is
spooled or bigger than GENERIC_ON_LOOP_SIZE (its header is read and parsed). `checks`
(mailflow.transports.smtp_checks.OutboundChecks, None: smtp.header_checks and the like unset, nothing asked): the
header section checked there too (before generic maps), the body's encoder made for each transaction; a header
check that cannot answer defers every recipient, 4.3.0. `sender_keys` (None: off): Postfix's
smtp_sender_dependent_authentication, sasl_password_maps asked by the envelope sender first (these keys), and a
cached session reused only for mail from the same sender (connect's Destination.cache_key), as Postfix keys its
connection cache by sender then. `level_source`: the key config.tls_security_level is set by, as the TLS
policy names it ("smtp.tls_security_level", "smtp.services.NAME.tls_security_level" when the service sets it).
`program`: what its lines are logged under, every one (its results, connections, TLS, the `QID: host ... said` of
a server that is not the final one, smtp_reply_filter's; `relay/smtp` for the relay transport, as Postfix's stock
master.cf gives `relay` `-o syslog_name=postfix/$service_name`, which names every line of that process; `generic`
and `checks` are given the same logger by the registry).
    await close()                                 QUITs the cached sessions; no task or timer is left behind

The TLS policy of a next hop (`tls_policy`, also for `mailflow address`): a tls_policy_maps entry; else, for a domain
next hop (MX lookup) with MTA-STS on (`mta_sts`, smtp.mtasts), the domain's policy in enforce or testing mode; else
smtp.tls_security_level. With level dane or dane-only, DANE decides per MX host (smtp.dane) and the MTA-STS policy
is what dane falls back to; the MX records' DNSSEC status is asked once per delivery, only for those levels.
Table lookups (tls_policy_maps, sasl_password_maps) go through `TableCache.run` (mailflow.tables): Postfix's
search order, pattern tables asked the full key only, a table that may block in a worker thread.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import time
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from typing import AsyncGenerator, Callable, Sequence

from mailflow.config import SmtpConfig
from mailflow.dns import MX, NotFound, Resolver, failure_text
from mailflow.errors import DeliveryError, LookupRetry, PermanentError, TemporaryError, detached
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, Recipient
from mailflow.slices import in_slices
from mailflow.tables import Table, TableCache, find
from mailflow.transports.smtp.addr import (
    Nexthop,
    Peer,
    exchangers,
    host_lookup_failure,
    no_address_failure,
    parse_nexthop,
    unique,
)
from mailflow.transports.smtp.chat import Timeouts, client_log
from mailflow.transports.generic import GenericMaps, WireForm
from mailflow.transports.smtp.reply_filter import ReplyFilter
from mailflow.transports.smtp_checks import OutboundChecks, outbound_wire_form
from mailflow.transports.smtp.commands import screen_envelope
from mailflow.transports.smtp.connect import Destination, SmtpHandshake, SourceAddress, log_connect_failure
from mailflow.transports.smtp.mtasts import MtaSts
from mailflow.transports.smtp.proto import send_message
from mailflow.transports.smtp.reuse import SessionCache
from mailflow.transports.smtp.tls import TlsContexts, TlsPolicy, default_policy, parse_policy, policy_keys
from mailflow.transports.smtp import trouble
from mailflow.transports.smtp.trouble import (
    ConnectFailure,
    LocalProblem,
    Outcomes,
    SiteFailure,
    record_unreachable,
)

# Sessions (completed handshakes) per delivery: a temporary failure in one that is not the last of them leaves
# its recipients for the next peer (Postfix smtp_mx_session_limit).
MX_SESSION_LIMIT = 2
# Addresses tried per delivery, whatever the size of the MX set (Postfix smtp_mx_address_limit).
MX_ADDRESS_LIMIT = 5
# Address lookups at once while the loop check looks for this server among MX hosts of one preference.
LOOKUP_BATCH = MX_ADDRESS_LIMIT
# A message bigger than this may have a header section whose generic mapping (read and parsed: ~3 ms per 20 KB of
# addresses) is too long for the event loop: it is done in a worker thread, as for a spooled message.
GENERIC_ON_LOOP_SIZE = 16 * 1024
# Next hops kept parsed (the transport's; the whole set is dropped when it is full).
NEXTHOP_CACHE = 1024
Candidate = tuple[MX, list[str] | None]  # an MX host and its addresses, None: not looked up yet


class SmtpTransport:
    """See the module docstring."""

    program: str  # what its result lines are logged under: `smtp`, or `relay/smtp` (see the module docstring)

    def __init__(
        self,
        config: SmtpConfig,
        *,
        resolver: Resolver,
        helo_name: str,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        tables: TableCache | None = None,
        mta_sts: MtaSts | None = None,
        plaintext_after: float = 0.0,
        own_addresses: frozenset = frozenset(),
        own_ports: frozenset[int] = frozenset(),
        relayhost: str = "",
        now: Callable[[], float] = time.time,
        generic: GenericMaps | None = None,
        checks: OutboundChecks | None = None,
        sender_keys: Callable[[str], tuple[list[str], tuple[int, ...]]] | None = None,
        soft_bounce: bool = False,
        level_source: str = "smtp.tls_security_level",
        program: str = "smtp",
    ):
        self.program = program
        self._log = client_log(program)
        self._config = config
        self._generic = generic
        self._checks = checks
        self._soft_bounce = soft_bounce
        self._now = now
        self._relayhost = relayhost
        self._fallback_relays = config.fallback_relay
        self._own_addresses = own_addresses
        self._own_ports = own_ports
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()
        self._tables = tables or TableCache()
        self._policy_tables: list[Table] = self._tables.open(config.tls_policy_maps)
        self._default_policy = default_policy(config.tls_security_level, level_source)
        self._mta_sts = mta_sts
        self._timeouts = Timeouts(config.connect_timeout, config.helo_timeout, config.command_timeout,
                                  config.data_timeout)
        self._handshake = SmtpHandshake(
            config=config, helo_name=helo_name,
            tls=TlsContexts(config.tls_ca_file, config.tls_cert_file, config.tls_key_file),
            password_tables=self._tables.open(config.sasl_password_maps), tables=self._tables, clock=clock,
            resolver=resolver, plaintext_after=plaintext_after, sender_keys=sender_keys,
            source=SourceAddress.of(config, "smtp"), log=self._log,
            reply_filter=ReplyFilter(self._tables.open(config.reply_filter), self._log) if config.reply_filter
            else None)
        self._cache = SessionCache.of(config, clock)
        self._nexthops: dict[str, Nexthop] = {}  # next hops as written -> parsed (usable ones; NEXTHOP_CACHE at most)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes, sendable = screen_envelope(request)
        if not sendable:
            return await outcomes.report(request, self._now)
        wire = None
        if self._generic is not None or self._checks is not None:
            try:
                screened = dataclasses.replace(request, recipients=tuple(sendable))  # (a refused one is not mapped)
                wire = await self._tables.run(outbound_wire_form, screened, self._checks, self._generic,
                                              off_loop=_header_may_be_big(request) or (
                                                  self._checks is not None and self._checks.long_head(
                                                      request.content)))
            except LookupRetry as e:  # (smtp_generic_maps, or TableCache.run's deadline: a table that may wait)
                error = TemporaryError("4.3.0", f"{self._waited_for()} lookup error: {e.text}")
                await outcomes.fail_in_slices(sendable, error)
                return await outcomes.report(request, self._now)
            except TemporaryError as e:  # (smtp_header_checks)
                await outcomes.fail_in_slices(sendable, e)
                return await outcomes.report(request, self._now)
        await self._deliver_to_nexthop(request, sendable, outcomes, wire)
        return await outcomes.report(request, self._now)

    def _waited_for(self) -> str:
        """What a lookup error before the session names: smtp_generic_maps unless only the header checks have a
        table that may wait (their own failures are TemporaryErrors already)."""
        checks_wait = self._checks is not None and self._checks.blocking
        generic_waits = self._generic is not None and self._generic.blocking
        if checks_wait and not generic_waits:
            return "smtp header checks"
        return "smtp_generic_maps or smtp header checks" if checks_wait else "smtp_generic_maps"

    async def close(self) -> None:
        """QUIT every cached session; afterwards no session is cached again."""
        self._cache.close()

    # -- routing

    async def _deliver_to_nexthop(self, request: DeliveryRequest, recipients: list[Recipient],
                                  outcomes: Outcomes, wire: WireForm | None) -> None:
        """The request's next hop, then each of smtp.fallback_relay in turn for the recipients the one before left
        (Postfix's smtp_connect_inet over its list of sites)."""
        sites = (request.nexthop, *self._fallback_relays)
        for index, written in enumerate(sites):
            site = Site(written, final=index == len(sites) - 1, fallback=index > 0)
            recipients = await self._deliver_to_site(site, request, recipients, outcomes, wire)
            if not recipients:
                return

    async def _deliver_to_site(self, site: Site, request: DeliveryRequest, recipients: list[Recipient],
                               outcomes: Outcomes, wire: WireForm | None) -> list[Recipient]:
        """Deliver to one site (the next hop or a fallback relay); returns the recipients left for the next site
        (none when `site` is the final one): those a temporary failure left (see the module docstring)."""
        try:
            destination = await self._destination(site.written)
            if self._handshake.sender_keys is not None:  # sender-dependent authentication: the sender's sessions
                destination = dataclasses.replace(destination, sender=request.sender)
        except ValueError:
            error = TemporaryError("4.3.5", f"mail system configuration error: bad SMTP nexthop {site.written!r}")
            (await outcomes.fail_in_slices(recipients, error)).site_failed(error)
            return []
        except LocalProblem as e:
            await outcomes.fail_in_slices(recipients, e)
            return []
        cached = await self._deliver_on_cached_session(destination, request, recipients, outcomes, wire)
        kept: Outcomes | None = None
        if cached is not None:  # a session like any other: what it deferred goes on to the next peer
            recipients = self._for_next_peer(recipients, outcomes)
            if not recipients or MX_SESSION_LIMIT <= 1:
                if site.final or not recipients:  # (nothing to hand on)
                    return []
                return await self._left_for_next_site(request, recipients, outcomes)
            kept = await outcomes.take_back(recipients)
        dns_failures: list[DeliveryError] = []
        try:
            hosts = await exchangers(self._resolver, destination.nexthop, self._rng, self._log)
            if destination.policy.dane and destination.nexthop.mx_lookup:
                destination = dataclasses.replace(destination, mx_secure=await self._mx_secure(destination))
            candidates, myself = await self._without_myself(hosts, destination.nexthop, dns_failures)
        except (LookupRetry, DeliveryError) as e:
            if not site.final and not _is_loop(e):  # Postfix: a site not found is no reason to skip the fallback
                if kept is not None:
                    await self._log_results(request, recipients, kept)
                return recipients
            if kept is not None:
                outcomes.restore(kept)
            elif isinstance(e, LookupRetry):
                lookup = SiteFailure("4.4.3", failure_text(e))
                (await outcomes.fail_in_slices(recipients, lookup)).site_failed(lookup)
            else:  # null MX (5.1.10), loops back to myself (5.4.6), unable to find primary relay (4.4.4)
                failure = self._unless_misconfigured(site, request, e)
                await outcomes.fail_in_slices(recipients, failure)
                if not failure.permanent:  # deferred: the destination is throttled, as Postfix's smtp_sess_fail
                    outcomes.site_failed(failure)
            return []
        if myself:  # this server is an MX host of the site: no fallback relay (Postfix's i_am_mx: no mail loop)
            site = dataclasses.replace(site, final=True)
        try:
            return await self._deliver_to_first_reachable(candidates, destination, request, recipients, outcomes,
                                                          dns_failures, wire, site, kept=kept, used=cached)
        except LocalProblem as e:
            await outcomes.fail_pending_in_slices(recipients, e)
            return []

    async def _left_for_next_site(self, request: DeliveryRequest, recipients: list[Recipient],
                                  outcomes: Outcomes) -> list[Recipient]:
        """At a site that is not the final one, the recipients its last session left (`recipients`, not empty:
        deferred; refused too under soft_bounce: `_for_next_peer`'s), their results forgotten and logged on lines of
        their own (`QID: host h[ip] said: 451 ...`), as Postfix logs a soft error at a server that is not the final
        one. (Its callers return [] themselves at the final site or with none left: no call on a delivery's path.)"""
        await self._log_results(request, recipients, await outcomes.take_back(recipients))
        return recipients

    async def _log_results(self, request: DeliveryRequest, recipients: list[Recipient], taken: Outcomes) -> None:
        """The results `taken` back from a server or site that is not the final one, a line each (`QID: host h[ip]
        said: 451 ...`), trouble.SLICE lines a loop turn (50 000 took 0.5 s in one)."""
        await in_slices(recipients, lambda part: self._log_lines(request, part, taken), trouble.SLICE)

    def _log_lines(self, request: DeliveryRequest, recipients: list[Recipient], taken: Outcomes) -> None:
        for r in recipients:
            self._log.info("%s: %s", request.queue_id, taken.results[r].text)

    def _nexthop(self, written: str) -> Nexthop:
        """parse_nexthop's answer for a next hop as written, parsed once (the port default is this transport's
        own); raises ValueError for an unusable one, each time."""
        nexthop = self._nexthops.get(written)
        if nexthop is None:
            nexthop = parse_nexthop(written, self._config.port)
            if len(self._nexthops) >= NEXTHOP_CACHE:
                self._nexthops.clear()
            self._nexthops[written] = nexthop
        return nexthop

    async def _destination(self, written: str) -> Destination:
        """Raises ValueError (no usable next hop) or LocalProblem (the TLS policy cannot be had)."""
        nexthop = self._nexthop(written)
        policy = await self._table_policy(written, nexthop)
        if policy is not None:
            return Destination(nexthop, written, policy)
        sts = None
        if self._mta_sts is not None and nexthop.mx_lookup:
            sts = await self._sts_policy(self._mta_sts, nexthop)
        if self._default_policy.dane:
            return Destination(nexthop, written, self._default_policy, fallback=sts)
        return Destination(nexthop, written, sts or self._default_policy)

    async def tls_policy(self, written: str) -> Destination:
        """The next hop and its TLS policy as a delivery would find them now (`mailflow address`). Raises
        ValueError or LocalProblem."""
        return await self._destination(written)

    async def _table_policy(self, written: str, nexthop: Nexthop) -> TlsPolicy | None:
        if not self._policy_tables:
            return None
        try:
            found = await self._tables.run(find, self._policy_tables, policy_keys(written, nexthop.host))
        except LookupRetry as e:
            raise LocalProblem("4.3.0", f"TLS policy lookup for {written.strip()}: {e.text}") from None
        if found is None:
            return None
        try:
            return dataclasses.replace(parse_policy(found[2]), source=f"tls_policy_maps: {found[1]}")
        except ValueError as e:
            self._log.warning("TLS policy for %s: %s", written.strip(), e)
            raise LocalProblem("4.7.0", f"client TLS configuration problem: {e}") from None

    async def _sts_policy(self, mta_sts: MtaSts, nexthop: Nexthop) -> TlsPolicy | None:
        """MTA-STS enforce: verify (trusted chain, the MX host's name) and only the MX hosts listed; testing: the
        level as configured, with what enforce would refuse logged. None without a policy (or mode none)."""
        sts = await mta_sts.policy(nexthop.host, self._log)
        if sts is None or sts.mode == "none":
            return None
        source = f"MTA-STS {sts.mode}, policy id {sts.id}"
        if sts.mode == "enforce":
            return TlsPolicy("verify", ("hostname",), mx_patterns=sts.mx, source=source)
        return dataclasses.replace(self._default_policy, mx_patterns=sts.mx, testing=True, source=source)

    async def _mx_secure(self, destination: Destination) -> bool:
        """Were the next hop's MX records DNSSEC-validated? NXDOMAIN and NODATA count as no (DANE does not apply);
        a lookup that fails raises LookupRetry, the destination deferred as for its MX lookup (RFC 7672 2.1.1: an
        error is not "insecure"; Postfix's one MX lookup carries the status)."""
        try:
            return await self._resolver.validated(destination.nexthop.host, "MX")
        except NotFound:
            return False

    async def _deliver_on_cached_session(self, destination: Destination, request: DeliveryRequest,
                                         recipients: list[Recipient], outcomes: Outcomes,
                                         wire: WireForm | None) -> Peer | None:
        """Deliver over a cached session when one is idle for this next hop, after its RSET probe (proto): its peer;
        None when none could be used."""
        session = await self._cache.reuse(destination.cache_key, lambda s: send_message(
            s, request, recipients, outcomes, self._timeouts, self._now, reused=True, wire=wire,
            probe=self._cache.rset_timeout))
        if session is None:
            return None
        await self._cache.release(destination.cache_key, session)
        return session.peer

    async def _deliver_to_first_reachable(self, candidates: Sequence[Candidate], destination: Destination,
                                          request: DeliveryRequest, recipients: list[Recipient],
                                          outcomes: Outcomes, dns_failures: list[DeliveryError],
                                          wire: WireForm | None, site: Site, *, kept: Outcomes | None = None,
                                          used: Peer | None = None) -> list[Recipient]:
        """`kept`: what a cached session with `used` deferred (that peer is not tried again). `dns_failures`:
        those of looking up `candidates` so far. Returns the recipients left for the next site: at a `site` that
        is not the final one, those its last peer failed or deferred, with no result (a session's reasons logged
        on lines of their own, as Postfix logs a soft error at a server that is not the final one)."""
        peer_failure: DeliveryError | None = None
        sessions = 0 if kept is None else 1
        # `kept`: temporary failures of a session that may not be the last; `unlogged`: the same, logged (as
        # Postfix logs a non-final server's soft errors) once another peer is tried, i.e. it was not the last
        unlogged = kept
        unlogged_failure: SiteFailure | None = None  # a session's failure, likewise logged once another peer is tried
        async with aclosing(self._peers(candidates, destination.nexthop.port, used, dns_failures)) as peers:
            async for peer in peers:
                if unlogged is not None:
                    await self._log_results(request, recipients, unlogged)
                    unlogged = None
                if unlogged_failure is not None:
                    self._log.info("%s: %s", request.queue_id, unlogged_failure.text)
                    unlogged_failure = None
                try:
                    session = await self._handshake.open(peer, destination, request.queue_id, request.queued_for)
                except SiteFailure as e:
                    peer_failure = detached(e)  # kept for the result: no traceback through this frame
                    if e.hard and not self._soft_bounce:  # a 5xx: Postfix bounces at once (but for a 5xx
                        await record_unreachable(outcomes, recipients, e, [])  # greeting; under soft_bounce, as a 4xx)
                        return []
                    if isinstance(e, ConnectFailure):  # Postfix's smtp_connect_inet: at once, no queue id
                        log_connect_failure(e, self._log)
                    elif e.relay == "none" or not site.final:  # refused before connecting (DANE, MTA-STS), or
                        self._log.info("%s: %s", request.queue_id, e.text)  # a server that is not the final one
                    else:  # Postfix's smtp_bulk_fail: at the final server the result line is the only one
                        unlogged_failure = e
                    continue
                sessions += 1
                try:
                    await send_message(session, request, recipients, outcomes, self._timeouts, self._now, wire=wire)
                except BaseException:
                    session.abort()
                    raise
                await self._cache.release(destination.cache_key, session)
                deferred = self._for_next_peer(recipients, outcomes)
                if not deferred or sessions >= MX_SESSION_LIMIT:
                    if site.final or not deferred:  # (nothing to hand on: no call on a delivery's path)
                        return []
                    return await self._left_for_next_site(request, deferred, outcomes)
                # Postfix: a soft error at a server that is not the final one: the next one gets these recipients
                kept, recipients, peer_failure = await outcomes.take_back(deferred), deferred, None
                unlogged = kept
        if not site.final:  # the next site has them
            if unlogged is not None:
                await self._log_results(request, recipients, unlogged)
            return recipients
        if kept is not None and peer_failure is None:
            outcomes.restore(kept)  # that session was the last after all
            return []
        # Postfix's relayhost rule is for a hard result: a peer's failure or a soft DNS failure makes it soft
        await record_unreachable(outcomes, recipients, peer_failure, [] if kept is not None else dns_failures,
                           hard=partial(self._unless_misconfigured, site, request))
        return []

    def _for_next_peer(self, recipients: list[Recipient], outcomes: Outcomes) -> list[Recipient]:
        """The recipients a session left for the next peer, if there is one: those it deferred, and under
        soft_bounce those it refused for good too (Postfix's smtp_rcpt_fail and smtp_bulk_fail count a 5.X.X
        then as a soft error: a server that is not the final one does not have the last word)."""
        again = (Outcome.DEFERRED, Outcome.BOUNCED) if self._soft_bounce else (Outcome.DEFERRED,)
        return [r for r in recipients if outcomes.results[r].outcome in again]

    def _unless_misconfigured(self, site: Site, request: DeliveryRequest, error: DeliveryError) -> DeliveryError:
        """A permanent DNS or loop failure of a fallback relay (the final site) or of the relayhost is a
        configuration problem: deferred 4.3.5 with the same text, as Postfix's smtp_connect_inet does, instead of
        bouncing every message relayed (logged `warning: smtp_fallback_relay configuration problem`)."""
        if not error.permanent:
            return error
        if site.fallback:
            self._log.warning("smtp_fallback_relay configuration problem")
            return TemporaryError("4.3.5", error.text)
        if not self._relayhost or request.nexthop != self._relayhost:
            return error
        self._log.warning("%s: relayhost configuration problem: %s", request.queue_id, error.text)
        return TemporaryError("4.3.5", error.text)

    async def _without_myself(self, hosts: list[MX], nexthop: Nexthop,
                              dns_failures: list[DeliveryError]) -> tuple[Sequence[Candidate], bool]:
        """The hosts to try, each with its addresses when they had to be looked up here (None: later, as needed).
        When the next hop's port is one this server listens on (Postfix: port 25, so that a content filter on
        127.0.0.1:10025 is no loop), Postfix's loop detection (smtp_find_self, smtp_truncate_self, RFC 5321
        5.1): the hosts at or after the preference of the first one with one of this server's addresses are
        dropped. They are looked up one preference at a time (LOOKUP_BATCH at once, so a slow host does not hold
        up the others of its group and a hostile MX set never makes a hundred lookups at once), up to the group
        with this server, or up to the group that makes MX_ADDRESS_LIMIT addresses: later hosts would be dropped
        or never reached. Also says whether this server is among the hosts (then no fallback relay is tried,
        as Postfix's i_am_mx; with smtp.fallback_relay set the hosts past MX_ADDRESS_LIMIT are looked up for it
        too, as Postfix's smtp_find_self looks at the whole list). Raises PermanentError 5.4.6 "mail for X loops
        back to myself" when this server is (one of) the best, TemporaryError 4.4.4 "unable to find primary relay
        for X" when only better hosts without an address are left."""
        if not self._own_addresses or nexthop.port not in self._own_ports:
            return [(mx, None) for mx in hosts], False
        better: list[tuple[MX, list[str]]] = []
        found_myself = False
        groups = [list(group) for _, group in groupby(hosts, key=lambda mx: mx.preference)]
        for n, group in enumerate(groups):
            found = await self._look_up_all(group, dns_failures)
            found_myself = any(self._is_mine(a) for _, addresses in found for a in addresses)
            if found_myself:
                break
            better.extend(found)
            if sum(len(addresses) for _, addresses in better) >= MX_ADDRESS_LIMIT:
                if self._fallback_relays:  # whether to try them: Postfix's i_am_mx looks at every MX host
                    found_myself = await self._mine_among([mx for later in groups[n + 1:] for mx in later])
                break
        if not found_myself or any(addresses for _, addresses in better):
            return better, found_myself
        if better:
            raise TemporaryError("4.4.4", f"unable to find primary relay for {nexthop.host}")
        raise PermanentError("5.4.6", f"mail for {nexthop.host} loops back to myself")

    async def _mine_among(self, hosts: list[MX]) -> bool:
        """Whether one of `hosts` (not to be tried: past MX_ADDRESS_LIMIT) has an address of this server; their
        lookup failures change nothing."""
        found = await self._look_up_all(hosts, [])
        return any(self._is_mine(a) for _, addresses in found for a in addresses)

    async def _look_up_all(self, hosts: list[MX], dns_failures: list[DeliveryError]) -> list[tuple[MX, list[str]]]:
        """Each host with its addresses, LOOKUP_BATCH lookups at once; failures added to `dns_failures` in host
        order, whichever answers first."""
        found: list[tuple[MX, list[str]]] = []
        for start in range(0, len(hosts), LOOKUP_BATCH):
            batch = hosts[start:start + LOOKUP_BATCH]
            failures: list[list[DeliveryError]] = [[] for _ in batch]
            looked_up = await asyncio.gather(*(self._addresses(mx.host, f) for mx, f in zip(batch, failures)))
            dns_failures.extend(failure for host_failures in failures for failure in host_failures)
            found.extend(zip(batch, looked_up))
        return found

    def _is_mine(self, address: str) -> bool:
        try:
            return ipaddress.ip_address(address) in self._own_addresses
        except ValueError:
            return False

    async def _addresses(self, host: str, dns_failures: list[DeliveryError]) -> list[str]:
        """The host's addresses, each once, shuffled (Postfix's smtp_randomize_addresses = yes: the load spreads
        over a host's addresses); [] with the reason added to `dns_failures` when it has none."""
        try:
            addresses = unique(await self._resolver.addresses(host))
        except (NotFound, LookupRetry) as e:
            dns_failures.append(host_lookup_failure(e))
            return []
        if not addresses:
            dns_failures.append(no_address_failure(host))
        self._rng.shuffle(addresses)
        return addresses

    async def _peers(self, candidates: Sequence[Candidate], port: int, used: Peer | None,
                     dns_failures: list[DeliveryError]) -> AsyncGenerator[Peer, None]:
        """The addresses of the candidates, in order, looked up as they are needed: at most MX_ADDRESS_LIMIT, a
        cached session's peer (`used`, not tried again) counting as one. Lookup failures are added to
        `dns_failures`."""
        tried = 0 if used is None else 1
        for mx, known in candidates:
            if tried >= MX_ADDRESS_LIMIT:
                return
            host = mx.host
            addresses = known if known is not None else await self._addresses(host, dns_failures)
            for address in addresses:
                peer = Peer(host, address, port)
                if peer == used:
                    continue
                if tried >= MX_ADDRESS_LIMIT:
                    return
                tried += 1
                yield peer


@dataclass(frozen=True)
class Site:
    """One destination of a delivery, as written: the request's next hop or a fallback relay. `final`: the last to
    try (its failures are the recipients' results); `fallback`: one of smtp.fallback_relay."""

    written: str
    final: bool = True
    fallback: bool = False


def _is_loop(error: LookupRetry | DeliveryError) -> bool:
    """Mail for the site loops back to this server (5.4.6), or only better MX hosts without an address are left
    (4.4.4): Postfix tries no fallback relay then (it would make the loop worse)."""
    return isinstance(error, DeliveryError) and error.dsn in ("5.4.6", "4.4.4")


def _header_may_be_big(request: DeliveryRequest) -> bool:
    """Whether smtp_generic_maps' work for `request` belongs off the event loop: its content is in a file, or big
    enough for a header section that takes long to parse."""
    return not request.content.in_memory or request.content.size > GENERIC_ON_LOOP_SIZE
