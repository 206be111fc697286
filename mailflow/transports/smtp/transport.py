"""The SMTP client transport (Postfix smtp(8)): one delivery from its next hop to every recipient's result.

Owns the order of things (the package docstring says what each recipient gets): screen the envelope, parse the
next hop and find its TLS policy, use a cached session for it when one is idle, else find the peers (addr) and
open a session with the first that completes the handshake (connect), run the transaction (proto), then cache
the session (reuse) or QUIT it.

    SmtpTransport(config, *, resolver, helo_name, rng=None, clock=time.monotonic, tables=None)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 QUITs the cached sessions; no task or timer is left behind

Table lookups (tls_policy_maps, sasl_password_maps) go through `TableCache.run` (mailflow.tables): Postfix's
search order, pattern tables asked the full key only, a table that may block in a worker thread.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable

from mailflow.config import SmtpConfig
from mailflow.dns import NotFound, Resolver
from mailflow.errors import DeliveryError, LookupRetry, PermanentError, TemporaryError
from mailflow.model import DeliveryReport, DeliveryRequest, Recipient
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
from mailflow.transports.smtp.chat import Session, Timeouts
from mailflow.transports.smtp.commands import screen_envelope
from mailflow.transports.smtp.connect import Destination, SmtpHandshake
from mailflow.transports.smtp.proto import reset, send_message
from mailflow.transports.smtp.reuse import SessionCache
from mailflow.transports.smtp.tls import TlsContexts, TlsPolicy, default_policy, parse_policy, policy_keys
from mailflow.transports.smtp.trouble import (
    LocalProblem,
    Outcomes,
    SiteFailure,
    StaleSession,
    record_unreachable,
)

log = logging.getLogger("mailflow.smtp")

# A peer slow to answer RSET (before a session is cached) must not hold the results back long.
RSET_TIMEOUT = 20.0  # Postfix smtp_rset_timeout


class SmtpTransport:
    """See the module docstring."""

    def __init__(
        self,
        config: SmtpConfig,
        *,
        resolver: Resolver,
        helo_name: str,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        tables: TableCache | None = None,
    ):
        self._config = config
        self._resolver = resolver
        self._rng = rng if rng is not None else random.Random()
        self._tables = tables or TableCache()
        self._policy_tables: list[Table] = self._tables.open(config.tls_policy_maps)
        self._default_policy = default_policy(config.tls_security_level)
        self._timeouts = Timeouts(config.connect_timeout, config.helo_timeout, config.command_timeout,
                                  config.data_timeout)
        self._handshake = SmtpHandshake(
            config=config, helo_name=helo_name, tls=TlsContexts(config.tls_ca_file, config.tls_cert_file, config.tls_key_file),
            password_tables=self._tables.open(config.sasl_password_maps), tables=self._tables, clock=clock)
        self._cache = SessionCache(config.connection_cache_time_limit, config.connection_reuse_count_limit,
                                   config.connection_reuse_time_limit, clock=clock)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes, sendable = screen_envelope(request)
        if sendable:
            await self._deliver_to_nexthop(request, sendable, outcomes)
        return outcomes.report(request)

    async def close(self) -> None:
        """QUIT every cached session; afterwards no session is cached again."""
        self._cache.close()

    # -- routing

    async def _deliver_to_nexthop(self, request: DeliveryRequest, recipients: list[Recipient],
                                  outcomes: Outcomes) -> None:
        try:
            destination = await self._destination(request.nexthop)
        except ValueError:
            text = f"mail system configuration error: bad SMTP nexthop {request.nexthop!r}"
            outcomes.fail(recipients, TemporaryError("4.3.5", text)).site_failed(text)
            return
        except LocalProblem as e:
            outcomes.fail(recipients, e)
            return
        if await self._deliver_on_cached_session(destination, request, recipients, outcomes):
            return
        try:
            hosts = await exchangers(self._resolver, destination.nexthop, self._rng)
        except LookupRetry as e:
            text = f"Host or domain name not found. {e.text}"
            outcomes.fail(recipients, SiteFailure("4.4.3", text)).site_failed(text)
            return
        except PermanentError as e:  # NotFound (5.1.2), null MX (5.1.10)
            outcomes.fail(recipients, e)
            return
        try:
            await self._deliver_to_first_reachable(hosts, destination, request, recipients, outcomes)
        except LocalProblem as e:
            outcomes.fail(outcomes.pending(recipients), e)

    async def _destination(self, written: str) -> Destination:
        """Raises ValueError (no usable next hop) or LocalProblem (the TLS policy cannot be had)."""
        nexthop = parse_nexthop(written, self._config.port)
        return Destination(nexthop, written, await self._tls_policy(written, nexthop))

    async def _tls_policy(self, written: str, nexthop: Nexthop) -> TlsPolicy:
        if not self._policy_tables:
            return self._default_policy
        try:
            found = await self._tables.run(find, self._policy_tables, policy_keys(written, nexthop.host))
        except LookupRetry as e:
            raise LocalProblem("4.3.0", f"TLS policy lookup for {written.strip()}: {e.text}") from None
        if found is None:
            return self._default_policy
        try:
            return parse_policy(found[2])
        except ValueError as e:
            log.warning("TLS policy for %s: %s", written.strip(), e)
            raise LocalProblem("4.7.0", f"client TLS configuration problem: {e}") from None

    async def _deliver_on_cached_session(self, destination: Destination, request: DeliveryRequest,
                                         recipients: list[Recipient], outcomes: Outcomes) -> bool:
        """Deliver over a cached session when one is idle for this next hop; False when none could be used."""
        while (session := self._cache.take(destination.cache_key)) is not None:
            try:
                await send_message(session, request, recipients, outcomes, self._timeouts, reused=True)
            except StaleSession:
                log.debug("%s: cached session with %s is gone; using a new one", request.queue_id,
                          session.peer.relay)
                session.abort()
                continue
            except BaseException:
                session.abort()
                raise
            await self._release(session, destination)
            return True
        return False

    async def _deliver_to_first_reachable(self, hosts: list[str], destination: Destination,
                                          request: DeliveryRequest, recipients: list[Recipient],
                                          outcomes: Outcomes) -> None:
        peer_failure: DeliveryError | None = None
        dns_failures: list[DeliveryError] = []
        for host in hosts:
            try:
                addresses = await self._resolver.addresses(host)
            except (NotFound, LookupRetry) as e:
                dns_failures.append(host_lookup_failure(e))
                continue
            if not addresses:
                dns_failures.append(no_address_failure(host))
            for address in unique(addresses):
                peer = Peer(host, address, destination.nexthop.port)
                try:
                    session = await self._handshake.open(peer, destination, request.queue_id)
                except SiteFailure as e:
                    log.info("%s: %s", request.queue_id, e.text)
                    peer_failure = e
                    continue
                try:
                    await send_message(session, request, recipients, outcomes, self._timeouts)
                except BaseException:
                    session.abort()
                    raise
                await self._release(session, destination)
                return
        record_unreachable(outcomes, recipients, peer_failure, dns_failures)

    async def _release(self, session: Session, destination: Destination) -> None:
        """Cache the session for the next message to this next hop (RSET first when a transaction is still
        open), or QUIT it."""
        if session.aborted or not self._cache.accepts(session):
            session.quit()
            return
        if session.transaction_open and not await reset(session, min(RSET_TIMEOUT, self._config.command_timeout)):
            session.abort()
            return
        self._cache.put(destination.cache_key, session)
