"""The SMTP client transport (Postfix smtp(8)): MX delivery and relaying to a fixed host.

Owns: turning a nexthop into an ordered list of peers, opening a session with one of them (connect, greeting,
EHLO, STARTTLS per the TLS policy, AUTH with the relay's credentials), one mail transaction per delivery,
mapping every reply to a per-recipient result, and keeping the session open for the next message to the same
nexthop. The resolver, RNG, clock and tables are injected; nothing here is global.

    SmtpTransport(config, *, resolver, helo_name, rng=None, clock=time.monotonic, tables=None)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 QUITs the cached sessions; no task or timer is left behind

The transaction: with PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write and the replies are
read in order (2 round trips per message on a cached session); without it each command waits for its reply.
aiosmtplib does the handshake (connect, EHLO, STARTTLS, AUTH); the transaction runs on smtp_session's reply
reader, because aiosmtplib's protocol drops replies to pipelined commands. QUIT is sent without waiting for
its reply (Postfix smtp_skip_quit_response). After a delivery the session is cached (RSET first only when a
transaction is still open: a finished DATA leaves the server in its initial state) for
connection_cache_time_limit.

Modules beside this one: smtp_tls (policy, contexts, certificate names), smtp_session (the wire after the
handshake, the connection cache), downgrade (8BITMIME to 7BIT).

Nexthop forms (Postfix semantics):
- `[host]` or `[host]:port`  no MX lookup; connect to host's addresses (port defaults to `config.port`).
- `domain` or `domain:port`  MX lookup of domain: by preference, ties shuffled with the injected RNG; no MX record
  means the domain itself (implicit MX). Each MX host's addresses (A, then AAAA) are tried in order, all on
  `port` (default `config.port`).

Which peer: the next MX host / address is tried when connecting fails or times out, or when the greeting, EHLO,
STARTTLS (as the TLS policy requires it) or AUTH fails. The first peer that completes the handshake gets the
message, whatever it answers afterwards. A cached session for the nexthop is used before any of that; one that
turns out dead before MAIL FROM is answered is dropped and the delivery goes on a fresh connection, counting
no failure.

TLS (`tls_security_level`, per nexthop `tls_policy_maps`; see smtp_tls):
- none: never STARTTLS. may: STARTTLS when offered, unverified; a refused STARTTLS continues in plaintext on
  the same session, a failed handshake reconnects in plaintext (not when AUTH credentials exist for the peer).
- encrypt/verify/secure: no STARTTLS offered -> 4.7.4 "TLS is required, but was not offered by host h[ip]";
  refused -> the reply's code; handshake failure -> 4.7.5 "Cannot start TLS: handshake failure"; untrusted
  chain -> 4.7.5 "Server certificate not trusted"; no matching name -> 4.7.5 "Server certificate not
  verified". Each fails that peer only; when no peer is left the recipients are DEFERRED with site_ok=False.
AUTH (`sasl_password_maps`): credentials by the peer's host name, then by the nexthop as written. Used only when
the peer offers AUTH (PLAIN, else LOGIN). Without TLS and with `sasl_tls_required` the password is not sent:
4.7.0 "SASL authentication failed; cannot authenticate to server h[ip]: ...". A refusal (535) fails that peer
with the server's words, the code made 4xx (Postfix smtp_sasl_auth_soft_bounce).

What each recipient gets:
- accepted after end of DATA                        SENT, the remote's reply ("250 2.0.0 Ok: queued as X")
- refused RCPT / MAIL / DATA / end of DATA          5xx BOUNCED, 4xx DEFERRED, with "host h[ip] said: ... (in reply
                                                    to X command)"; a reply without an enhanced code gets x.0.0
- domain does not exist (NXDOMAIN)                  BOUNCED 5.1.2
- null MX (RFC 7505)                                BOUNCED 5.1.10
- no MX host (or the [host]) has an address         BOUNCED 5.4.4
- DNS failure                                       DEFERRED 4.4.3, site_ok=False
- no peer could be talked to                        DEFERRED (4.4.1 connect, 4.4.2 timeout/lost, 4.7.x TLS/AUTH,
                                                    ...), naming the last peer tried, site_ok=False
- connection lost or timed out during the dialogue  those without a final answer DEFERRED 4.4.2, site_ok=False;
                                                    the text names the stage ("... timed out while sending RCPT TO")
- needs SMTPUTF8, the peer does not offer it        BOUNCED 5.6.7
- bigger than the peer's advertised SIZE            BOUNCED 5.3.4
- address with a control character (CR, LF, NUL…)   that recipient BOUNCED 5.1.3 (in the sender: all, 5.1.7)
- a TLS policy or password table cannot answer      DEFERRED 4.3.0 (an unusable TLS policy value: 4.7.0 "client TLS
                                                    configuration problem"), site_ok=True: the fault is ours

DSN (RFC 3461): to a peer that offers DSN, MAIL carries RET and ENVID (xtext) and each RCPT its NOTIFY and ORCPT (the
client's, else `rfc822;<the address first given>`), as Postfix's smtp(8) does; its accepted recipients are marked
`next_hop_notifies`, so qmgr sends no success notice of its own (the peer does what NOTIFY asks). To a peer without
DSN nothing is passed on, and a NOTIFY=SUCCESS recipient gets a "relayed" notice from here.
8BITMIME: a message received as 8BITMIME goes with BODY=8BITMIME to a peer that offers it; to one that does
not, it is converted (Postfix's default, disable_mime_output_conversion = no): parts labelled 8bit become
quoted-printable (see downgrade). Time limits: connect_timeout (TCP), helo_timeout (greeting, EHLO/HELO),
command_timeout (STARTTLS, AUTH, MAIL, each RCPT, DATA, RSET), data_timeout (the reply after the content).

`site_ok` is False only when the destination could not be talked to; refusals and bounces keep it True.
The envelope is sent exactly as queued (no re-parsing); the content as it is, dot-stuffed, ending in CRLF,
streamed from the queue chunk by chunk (mailflow.transports.encode.SmtpData; the 7-bit conversion streams
too): a big message is never held whole, and the SIZE given and checked is the queued size (as Postfix's).
A small message goes out in one write.
`relay` is `host[ip]:port`, or "none" before any session.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.auth import auth_login_encode, auth_plain_encode

from mailflow.config import SmtpConfig
from mailflow.content import CHUNK, Content
from mailflow.dns import MX, NotFound, Resolver, is_ip_literal
from mailflow.errors import LookupRetry
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.syntax import parse_hostport
from mailflow.tables import Table, TableCache
from mailflow.transports.downgrade import Downgrade
from mailflow.transports.encode import Encoder, SmtpData, aencode, encode
from mailflow.transports.smtp_session import CRLF, Session, SessionCache
from mailflow.transports.smtp_tls import (
    TlsContexts,
    TlsPolicy,
    TlsUnavailable,
    certificate_matches,
    certificate_names,
    default_policy,
    parse_policy,
    policy_keys,
)

log = logging.getLogger("mailflow.smtp")

# A peer slow to answer RSET (before a session is cached) must not hold the results back long.
RSET_TIMEOUT = 20.0  # Postfix smtp_rset_timeout

_ENHANCED_CODE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")

# Per command: what Postfix says it was doing when the connection broke, and how it names the command.
ACTIVITY = {
    "MAIL FROM": "sending MAIL FROM",
    "RCPT TO": "sending RCPT TO",
    "DATA": "sending DATA command",
    "message body": "sending message body",
    "end of DATA": "sending end of data -- message may be sent more than once",
}


# ---------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Nexthop:
    host: str
    port: int
    mx_lookup: bool


@dataclass(frozen=True)
class Destination:
    """One request's next hop: parsed, as written (the table lookup key), and the TLS policy for it."""

    nexthop: Nexthop
    written: str
    policy: TlsPolicy

    @property
    def cache_key(self) -> str:
        return self.written.strip().lower()


@dataclass(frozen=True)
class Peer:
    """One address of one MX host: `name` is `host[ip]` as diagnostics say it, `relay` adds the port."""

    host: str
    ip: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}[{self.ip}]"

    @property
    def relay(self) -> str:
        return f"{self.name}:{self.port}"


@dataclass(frozen=True)
class Failure:
    """Why a destination, host or peer could not take the message: an enhanced code and a diagnostic."""

    dsn: str
    text: str


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


class SessionFailed(Exception):
    """Opening a session with one peer failed (connect, greeting, EHLO, STARTTLS, AUTH): try the next one."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


class LocalProblem(Exception):
    """Our side cannot go on (a table that cannot answer, an unusable TLS policy, no TLS engine): another peer
    would not help. The recipients are deferred; the destination is not blamed."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


class RetryPlaintext(Exception):
    """At level may the TLS handshake failed: connect again to the same peer without TLS (Postfix does)."""


class ConversationLost(Exception):
    """The connection broke or timed out in the middle of the dialogue."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


class StaleSession(Exception):
    """A cached session died before MAIL FROM was answered: nothing was delivered; use a fresh connection."""


class NullMX(Exception):
    """The domain publishes RFC 7505's null MX: it accepts no mail."""


@dataclass
class Outcomes:
    """Results gathered while delivering, by recipient, plus the site verdict."""

    results: dict[Recipient, RcptResult] = field(default_factory=dict)
    site_ok: bool = True
    site_reason: str = ""

    def set_all(
        self, recipients: Iterable[Recipient], outcome: Outcome, dsn: str, text: str, relay: str = "none"
    ) -> "Outcomes":
        for r in recipients:
            self.results[r] = RcptResult(r, outcome, dsn, text, relay)
        return self

    def site_failed(self, reason: str) -> "Outcomes":
        self.site_ok, self.site_reason = False, reason
        return self

    def report(self, request: DeliveryRequest) -> DeliveryReport:
        return DeliveryReport(
            tuple(self.results[r] for r in request.recipients), site_ok=self.site_ok, site_reason=self.site_reason
        )


@dataclass
class Payload:
    """The content as one peer gets it: as queued, or converted to 7 bit for a peer without 8BITMIME."""

    request: DeliveryRequest

    def for_session(self, session: Session) -> tuple[tuple[Encoder, ...], str | None]:
        """(the encoders the content goes through before dot-stuffing, BODY= parameter or None)."""
        if self.request.body_type.upper() != "8BITMIME":
            return (), None
        if session.supports("8bitmime"):
            return (), "BODY=8BITMIME"
        log.debug("%s: %s offers no 8BITMIME: content converted to 7 bit", self.request.queue_id, session.peer.relay)
        return (Downgrade(),), None


# ---------------------------------------------------------------------------------------------------- transport


class SmtpTransport:
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
        self._helo_name = helo_name
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        tables = tables or TableCache()
        self._policy_tables: list[Table] = tables.open(config.tls_policy_maps)
        self._password_tables: list[Table] = tables.open(config.sasl_password_maps)
        self._tls = TlsContexts(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
        self._cache = SessionCache(
            config.connection_cache_time_limit,
            config.connection_reuse_count_limit,
            config.connection_reuse_time_limit,
            clock=clock,
        )

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes, sendable = screen_envelope(request)
        if sendable:
            await self._deliver_to_nexthop(request, sendable, outcomes)
        return outcomes.report(request)

    async def close(self) -> None:
        """QUIT every cached session; afterwards no session is cached again."""
        self._cache.close()

    # -- routing

    async def _deliver_to_nexthop(
        self, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes
    ) -> None:
        try:
            destination = self._destination(request.nexthop)
        except ValueError:
            text = f"mail system configuration error: bad SMTP nexthop {request.nexthop!r}"
            outcomes.set_all(recipients, Outcome.DEFERRED, "4.3.5", text).site_failed(text)
            return
        except LocalProblem as e:
            outcomes.set_all(recipients, Outcome.DEFERRED, e.failure.dsn, e.failure.text)
            return
        payload = Payload(request)
        if await self._deliver_on_cached_session(destination, request, payload, recipients, outcomes):
            return
        try:
            hosts = await self._exchangers(destination.nexthop)
        except NotFound as e:
            outcomes.set_all(recipients, Outcome.BOUNCED, e.dsn, e.text)
            return
        except NullMX:
            text = f"Domain {destination.nexthop.host} does not accept mail (nullMX)"
            outcomes.set_all(recipients, Outcome.BOUNCED, "5.1.10", text)
            return
        except LookupRetry as e:
            text = f"Host or domain name not found. {e.text}"
            outcomes.set_all(recipients, Outcome.DEFERRED, "4.4.3", text).site_failed(text)
            return
        try:
            await self._deliver_to_first_reachable(hosts, destination, request, payload, recipients, outcomes)
        except LocalProblem as e:
            pending = [r for r in recipients if r not in outcomes.results]
            outcomes.set_all(pending, Outcome.DEFERRED, e.failure.dsn, e.failure.text)

    def _destination(self, written: str) -> Destination:
        """Raises ValueError (no usable nexthop) or LocalProblem (the TLS policy cannot be had)."""
        nexthop = parse_nexthop(written, self._config.port)
        return Destination(nexthop, written, self._tls_policy(written, nexthop))

    def _tls_policy(self, written: str, nexthop: Nexthop) -> TlsPolicy:
        try:
            value = first_answer(self._policy_tables, policy_keys(written, nexthop.host))
        except LookupRetry as e:
            raise LocalProblem(Failure("4.3.0", f"TLS policy lookup for {written.strip()}: {e.text}")) from None
        if value is None:
            return default_policy(self._config.tls_security_level)
        try:
            return parse_policy(value)
        except ValueError as e:
            log.warning("TLS policy for %s: %s", written.strip(), e)
            raise LocalProblem(Failure("4.7.0", f"client TLS configuration problem: {e}")) from None

    async def _exchangers(self, nexthop: Nexthop) -> list[str]:
        """The hosts to try, in order. Raises NotFound, NullMX or LookupRetry."""
        if not nexthop.mx_lookup:
            return [nexthop.host]
        records = await self._resolver.mx(nexthop.host)
        if not records:
            return [nexthop.host]  # implicit MX (RFC 5321 5.1)
        if len(records) == 1 and records[0].host == ".":
            raise NullMX(nexthop.host)
        return unique(r.host for r in order_exchangers(records, self._rng) if r.host != ".")

    async def _deliver_on_cached_session(
        self,
        destination: Destination,
        request: DeliveryRequest,
        payload: Payload,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> bool:
        """Deliver over a cached session when one is idle for this nexthop; False when none could be used."""
        while (session := self._cache.take(destination.cache_key)) is not None:
            try:
                await self._send_message(session, request, payload, recipients, outcomes, reused=True)
            except StaleSession:
                log.debug("%s: cached session with %s is gone; using a new one", request.queue_id,
                          session.peer.relay)
                session.abort()
                continue
            except BaseException:
                session.abort()
                raise
            await self._release_session(session, destination)
            return True
        return False

    async def _deliver_to_first_reachable(
        self,
        hosts: list[str],
        destination: Destination,
        request: DeliveryRequest,
        payload: Payload,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> None:
        peer_failure: Failure | None = None
        dns_failures: list[Failure] = []
        for host in hosts:
            try:
                ips = await self._resolver.addresses(host)
            except (NotFound, LookupRetry) as e:
                dns_failures.append(host_lookup_failure(e))
                continue
            if not ips:
                dns_failures.append(no_address_failure(host))
            for ip in unique(ips):
                peer = Peer(host, ip, destination.nexthop.port)
                try:
                    session = await self._open_session(peer, destination, request.queue_id)
                except SessionFailed as e:
                    log.info("%s: %s", request.queue_id, e.failure.text)
                    peer_failure = e.failure
                    continue
                try:
                    await self._send_message(session, request, payload, recipients, outcomes, reused=False)
                except BaseException:
                    session.abort()
                    raise
                await self._release_session(session, destination)
                return
        record_unreachable(outcomes, recipients, peer_failure, dns_failures)

    # -- opening a session

    async def _open_session(self, peer: Peer, destination: Destination, queue_id: str) -> Session:
        """A session past the handshake. Raises SessionFailed (try another peer) or LocalProblem."""
        try:
            return await self._handshake(peer, destination, queue_id, tls_allowed=True)
        except RetryPlaintext:
            log.info("%s: TLS handshake with %s failed; trying again in plaintext", queue_id, peer.relay)
            return await self._handshake(peer, destination, queue_id, tls_allowed=False)

    async def _handshake(self, peer: Peer, destination: Destination, queue_id: str, tls_allowed: bool) -> Session:
        opened = self._clock()
        client = await self._connect(peer)
        try:
            await self._say_hello(client, peer)
            tls = tls_allowed and await self._start_tls(client, peer, destination, queue_id)
            credentials = self._credentials(peer, destination)
            if credentials is not None and client.supports_extension("auth"):
                await self._authenticate(client, peer, credentials, tls)
            return Session(client, peer, tls=tls, opened=opened)
        except BaseException:
            client.close()
            raise

    async def _connect(self, peer: Peer) -> aiosmtplib.SMTP:
        """TCP within connect_timeout, then the greeting within helo_timeout. Raises SessionFailed."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in peer.ip else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (peer.ip, peer.port)), self._config.connect_timeout)
        except (OSError, TimeoutError) as e:
            sock.close()
            raise SessionFailed(Failure("4.4.1", f"connect to {peer.relay}: {os_reason(e)}")) from None
        except BaseException:
            sock.close()
            raise
        client = aiosmtplib.SMTP(
            sock=sock, timeout=self._config.command_timeout, start_tls=False, local_hostname=self._helo_name
        )
        try:
            await client.connect(timeout=self._config.helo_timeout)
        except aiosmtplib.SMTPConnectResponseError as e:
            reply = one_line(e.code, e.message)
            raise SessionFailed(
                Failure(reply_dsn(e.code, e.message, "4"), f"host {peer.name} refused to talk to me: {reply}")
            ) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise SessionFailed(lost_failure(peer, "receiving the initial server greeting", e)) from None
        except BaseException:
            client.close()
            raise
        return client

    async def _say_hello(self, client: aiosmtplib.SMTP, peer: Peer) -> None:
        """EHLO; a 5xx EHLO falls back to HELO (RFC 5321 4.1.4). Raises SessionFailed."""
        timeout = self._config.helo_timeout
        try:
            try:
                await client.ehlo(timeout=timeout)
            except aiosmtplib.SMTPHeloError as e:
                if e.code < 500 or not client.is_connected:
                    raise
                await client.helo(timeout=timeout)
        except aiosmtplib.SMTPResponseException as e:
            reply = one_line(e.code, e.message)
            raise SessionFailed(
                Failure(reply_dsn(e.code, e.message, "4"), f"host {peer.name} refused to talk to me: {reply}")
            ) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise SessionFailed(lost_failure(peer, "performing the EHLO handshake", e)) from None

    async def _start_tls(self, client: aiosmtplib.SMTP, peer: Peer, destination: Destination, queue_id: str) -> bool:
        """STARTTLS as the policy asks; True when the session is now encrypted (and EHLO said again).
        Raises SessionFailed, RetryPlaintext or LocalProblem."""
        policy = destination.policy
        if policy.level == "none":
            return False
        if not client.supports_extension("starttls"):
            if policy.required:
                raise SessionFailed(Failure("4.7.4", f"TLS is required, but was not offered by host {peer.name}"))
            return False
        context = self._tls_context(policy)
        if context is None:
            return False
        try:
            await client.starttls(
                tls_context=context,
                server_hostname=None if is_ip_literal(peer.host) else peer.host,
                timeout=self._config.command_timeout,
            )
        except aiosmtplib.SMTPResponseException as e:  # STARTTLS refused: the session itself is still fine
            if policy.required:
                reply = one_line(e.code, e.message)
                raise SessionFailed(Failure(
                    reply_dsn(e.code, e.message, "4"),
                    f"TLS is required, but host {peer.name} refused to start TLS: {reply}",
                )) from None
            return False
        except ssl.SSLCertVerificationError as e:
            raise SessionFailed(
                Failure("4.7.5", f"Server certificate not trusted: host {peer.name}: {e.verify_message}")
            ) from None
        except (aiosmtplib.SMTPException, OSError) as e:
            log.debug("%s: TLS handshake with %s: %r", queue_id, peer.relay, e)
            if policy.level == "may" and self._credentials(peer, destination) is None:
                raise RetryPlaintext() from None
            failure = Failure("4.7.5", f"Cannot start TLS: handshake failure with host {peer.name}")
            raise SessionFailed(failure) from None
        if policy.verifies:
            self._verify_peer_name(client, peer, destination)
        cipher = client.get_transport_info("cipher") or ("?", "?", 0)
        log.info("%s: %s TLS connection established to %s: %s with cipher %s", queue_id,
                 "Verified" if policy.verifies else "Untrusted", peer.relay, cipher[1], cipher[0])
        await self._say_hello(client, peer)
        return True

    def _tls_context(self, policy: TlsPolicy) -> ssl.SSLContext | None:
        """The context for the level; None (plaintext) at level may when TLS cannot be set up here."""
        try:
            return self._tls.for_level(policy.level)
        except TlsUnavailable as e:
            if policy.required:
                raise LocalProblem(
                    Failure("4.7.5", f"TLS is required, but our TLS engine is unavailable: {e}")
                ) from None
            log.warning("TLS is unavailable (%s): sending in plaintext", e)
            return None

    def _verify_peer_name(self, client: aiosmtplib.SMTP, peer: Peer, destination: Destination) -> None:
        certificate = client.get_transport_info("peercert") or {}
        patterns = destination.policy.match
        if not certificate_matches(certificate, patterns, peer.host, destination.nexthop.host):
            names = ", ".join(sum(certificate_names(certificate), [])) or "no name"
            raise SessionFailed(Failure(
                "4.7.5",
                f"Server certificate not verified: host {peer.name} presented {names}, "
                f"expected {':'.join(patterns)}",
            ))

    def _credentials(self, peer: Peer, destination: Destination) -> Credentials | None:
        """user:password for the peer's host name, else for the nexthop as written. Raises LocalProblem."""
        if not self._password_tables:
            return None
        try:
            value = first_answer(self._password_tables, unique([peer.host, destination.written.strip().lower()]))
        except LookupRetry as e:
            raise LocalProblem(Failure("4.3.0", f"sasl_password_maps lookup error: {e.text}")) from None
        if value is None:
            return None
        user, _, password = value.strip().partition(":")
        return Credentials(user, password)

    async def _authenticate(self, client: aiosmtplib.SMTP, peer: Peer, credentials: Credentials, tls: bool) -> None:
        """AUTH PLAIN (else LOGIN); any 2xx at the end is success, as Postfix takes it. Raises SessionFailed."""
        cannot = f"SASL authentication failed; cannot authenticate to server {peer.name}"
        if not tls and self._config.sasl_tls_required:
            raise SessionFailed(Failure("4.7.0", f"{cannot}: the session is not encrypted (sasl_tls_required)"))
        offered = client.server_auth_methods
        if "plain" in offered:
            steps = [b"AUTH PLAIN " + auth_plain_encode(credentials.user, credentials.password)]
        elif "login" in offered:
            user, password = auth_login_encode(credentials.user, credentials.password)
            steps = [b"AUTH LOGIN " + user, password]
        else:
            raise SessionFailed(Failure("4.7.0", f"{cannot}: no mechanism available (offered: {' '.join(offered)})"))
        try:
            for i, step in enumerate(steps):
                reply = await client.execute_command(step, timeout=self._config.command_timeout)
                if reply.code != 334 or i == len(steps) - 1:
                    break
        except (aiosmtplib.SMTPException, OSError) as e:
            raise SessionFailed(lost_failure(peer, "performing the AUTH handshake", e)) from None
        if not is_positive(reply):
            raise SessionFailed(Failure(
                reply_dsn(reply.code, reply.message, "4"),
                f"SASL authentication failed; server {peer.name} said: {one_line(reply.code, reply.message)}",
            ))

    # -- one mail transaction

    async def _send_message(
        self,
        session: Session,
        request: DeliveryRequest,
        payload: Payload,
        recipients: list[Recipient],
        outcomes: Outcomes,
        *,
        reused: bool,
    ) -> None:
        """One mail transaction; every recipient ends with a result in `outcomes`. A reused session that dies
        before MAIL FROM is answered raises StaleSession and leaves `outcomes` untouched."""
        encoders, body = payload.for_session(session)
        refusal = peer_cannot_take(session, request)
        if refusal is not None:
            outcomes.set_all(recipients, Outcome.BOUNCED, refusal.dsn, refusal.text, session.peer.relay)
            return
        session.uses += 1
        try:
            await self._transaction(session, request, encoders, body, recipients, outcomes, reused)
        except ConversationLost as e:
            pending = [r for r in recipients if r not in outcomes.results]
            outcomes.set_all(pending, Outcome.DEFERRED, e.failure.dsn, e.failure.text, session.peer.relay)
            outcomes.site_failed(e.failure.text)

    async def _transaction(
        self,
        session: Session,
        request: DeliveryRequest,
        encoders: tuple[Encoder, ...],
        body: str | None,
        recipients: list[Recipient],
        outcomes: Outcomes,
        reused: bool,
    ) -> None:
        """MAIL, RCPT..., DATA, the content. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one
        write and the replies are read in order, as Postfix does; without it each command waits for its reply."""
        peer = session.peer
        utf8 = uses_smtputf8(session, request)
        encoding = "utf-8" if utf8 else "ascii"
        dsn = session.supports("dsn")
        mail = b" ".join([b"MAIL FROM:<" + request.sender.encode(encoding) + b">",
                          *mail_options(session, request, body, utf8), *(dsn_mail_params(request) if dsn else [])])
        rcpts = [b" ".join([b"RCPT TO:<" + r.address.encode(encoding) + b">", *(dsn_rcpt_params(r) if dsn else [])])
                 for r in recipients]
        pipelining = session.supports("pipelining")
        batch = [mail, *rcpts, b"DATA"] if pipelining else [mail]
        try:
            self._send(session, b"".join(c + CRLF for c in batch), "MAIL FROM")
            reply = await self._reply(session, "MAIL FROM")
        except ConversationLost:
            if reused:
                raise StaleSession() from None
            raise
        if reused and reply.code == 421:
            raise StaleSession()
        if not is_positive(reply):
            outcomes.results.update(reply_results(recipients, reply, peer, "MAIL FROM"))
            if pipelining:
                await self._abandon_pipelined(session, len(rcpts))
            return
        session.transaction_open = True
        accepted = []
        for r, command in zip(recipients, rcpts):
            if not pipelining:
                self._send(session, command + CRLF, "RCPT TO")
            reply = await self._reply(session, "RCPT TO")
            if is_positive(reply):
                accepted.append(r)
            else:
                outcomes.results.update(reply_results([r], reply, peer, "RCPT TO"))
        if not accepted:
            if pipelining:
                await self._abandon_pipelined(session, 0)
            return
        if not pipelining:
            self._send(session, b"DATA" + CRLF, "DATA")
        reply = await self._reply(session, "DATA")
        if reply.code != 354:
            outcomes.results.update(reply_results(accepted, data_refusal(reply), peer, "DATA"))
            return
        await self._send_body(session, request.content, encoders)
        reply = await self._reply(session, "end of DATA", self._config.data_timeout)
        session.transaction_open = False
        outcomes.results.update(reply_results(accepted, reply, peer, "end of DATA", next_hop_notifies=dsn))

    async def _abandon_pipelined(self, session: Session, rcpt_replies: int) -> None:
        """The results are in, but replies to pipelined commands are still coming: read them (RCPTs, then DATA).
        A DATA that was accepted anyway gets an empty message, "." alone, as RFC 2920 says. Any trouble here
        only closes the session."""
        timeout = self._config.command_timeout
        try:
            for _ in range(rcpt_replies):
                await session.reply(timeout)
            if (await session.reply(timeout)).code == 354:
                session.send(b"." + CRLF)
                await session.reply(timeout)
                session.transaction_open = False
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            session.abort()

    async def _send_body(self, session: Session, content: Content, encoders: tuple[Encoder, ...]) -> None:
        """The content, dot-stuffed, and the terminator. A message in memory goes in one write; a spooled one
        CHUNK bytes at a time, each write waiting (within data_timeout) until the peer has taken the last."""
        if content.in_memory:
            self._send(session, list(smtp_data(content, encoders)), "message body")
            return
        pieces: list[bytes] = []
        size = 0
        async for piece in asmtp_data(content, encoders):
            pieces.append(piece)
            size += len(piece)
            if size >= CHUNK:
                self._send(session, pieces, "message body")
                pieces, size = [], 0
                try:
                    await session.drain(self._config.data_timeout)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                    session.abort()
                    raise ConversationLost(lost_failure(session.peer, ACTIVITY["message body"], e)) from None
        self._send(session, pieces, "message body")

    def _send(self, session: Session, data: bytes | list[bytes], command: str) -> None:
        if session.aborted:
            raise ConversationLost(lost_failure(session.peer, ACTIVITY[command], aiosmtplib.SMTPServerDisconnected("")))
        try:
            session.send(data) if isinstance(data, bytes) else session.send_many(data)
        except (aiosmtplib.SMTPException, OSError) as e:
            session.abort()
            raise ConversationLost(lost_failure(session.peer, ACTIVITY[command], e)) from None

    async def _reply(self, session: Session, command: str, timeout: float | None = None) -> SMTPResponse:
        """The next reply, within `timeout` (command_timeout). A 421 closes the session (RFC 5321 3.8): what
        would follow on it is lost. Raises ConversationLost naming the stage."""
        activity = ACTIVITY[command]
        if session.aborted:
            raise ConversationLost(lost_failure(session.peer, activity, aiosmtplib.SMTPServerDisconnected("")))
        try:
            reply = await session.reply(self._config.command_timeout if timeout is None else timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            session.abort()
            raise ConversationLost(lost_failure(session.peer, activity, e)) from None
        if reply.code == 421:
            session.abort()
        return reply

    async def _release_session(self, session: Session, destination: Destination) -> None:
        """Cache the session for the next message to this nexthop (RSET first when a transaction is still open),
        or QUIT it."""
        if session.aborted or not self._cache.accepts(session):
            session.quit()
            return
        if session.transaction_open and not await self._reset(session):
            session.abort()
            return
        self._cache.put(destination.cache_key, session)

    async def _reset(self, session: Session) -> bool:
        try:
            session.send(b"RSET" + CRLF)
            reply = await session.reply(min(RSET_TIMEOUT, self._config.command_timeout))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            log.debug("RSET to %s: %r", session.peer.relay, e)
            return False
        session.transaction_open = not is_positive(reply)
        return is_positive(reply)


# ---------------------------------------------------------------------------------------------------- routing helpers


def parse_nexthop(nexthop: str, default_port: int) -> Nexthop:
    """`[host]:port`, `[host]`, `domain:port`, `domain`. Brackets turn the MX lookup off. Raises ValueError."""
    host, port = parse_hostport(nexthop, default_port)
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ValueError(f"{nexthop!r} names no host")
    return Nexthop(host, port, mx_lookup=not nexthop.strip().startswith("["))


def first_answer(tables: list[Table], keys: list[str]) -> str | None:
    """Postfix maps_find over several keys: the first table's answer for the first key, and so on by key."""
    for key in keys:
        for table in tables:
            value = table.lookup(key)
            if value is not None:
                return value
    return None


def order_exchangers(records: list[MX], rng: random.Random) -> list[MX]:
    """By preference; equal preferences in random order (RFC 5321 5.1), so that load spreads."""
    ordered: list[MX] = []
    for _, group in groupby(sorted(records, key=lambda r: r.preference), key=lambda r: r.preference):
        tied = list(group)
        rng.shuffle(tied)
        ordered.extend(tied)
    return ordered


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def host_lookup_failure(error: NotFound | LookupRetry) -> Failure:
    if isinstance(error, NotFound):
        return Failure("5.4.4", error.text)
    return Failure("4.4.3", f"Host or domain name not found. {error.text}")


def no_address_failure(host: str) -> Failure:
    return Failure(
        "5.4.4",
        f"Host or domain name not found. Name service error for name={host} type=A: "
        "Host found but no data record of requested type",
    )


def record_unreachable(
    outcomes: Outcomes, recipients: list[Recipient], peer_failure: Failure | None, dns_failures: list[Failure]
) -> None:
    """No peer took a session. A peer we could not talk to or a DNS failure defers; only DNS 'no' bounces."""
    temporary_dns = [f for f in dns_failures if f.dsn.startswith("4")]
    if peer_failure is not None:
        failure = peer_failure
    elif temporary_dns:
        failure = temporary_dns[-1]
    elif dns_failures:
        outcomes.set_all(recipients, Outcome.BOUNCED, dns_failures[-1].dsn, dns_failures[-1].text)
        return
    else:
        failure = Failure("4.4.3", "no SMTP server to try")
    outcomes.set_all(recipients, Outcome.DEFERRED, as_temporary(failure.dsn), failure.text)
    outcomes.site_failed(failure.text)


# ---------------------------------------------------------------------------------------------------- session helpers


def lost_failure(peer: Peer, activity: str, error: BaseException) -> Failure:
    if isinstance(error, TimeoutError):
        return Failure("4.4.2", f"conversation with {peer.name} timed out while {activity}")
    return Failure("4.4.2", f"lost connection with {peer.name} while {activity}")


def os_reason(error: BaseException | None) -> str:
    if isinstance(error, TimeoutError):
        return "Connection timed out"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


def needs_smtputf8(request: DeliveryRequest) -> bool:
    """UTF-8 in the envelope always needs SMTPUTF8; UTF-8 headers need it when the client asked for it."""
    envelope = [request.sender, *(r.address for r in request.recipients)]
    if not all(a.isascii() for a in envelope):
        return True
    return request.smtputf8 and not read_header(request.content, HEADER_READ_LIMIT)[0].isascii()


def uses_smtputf8(session: Session, request: DeliveryRequest) -> bool:
    return session.supports("smtputf8") and (request.smtputf8 or needs_smtputf8(request))


def peer_cannot_take(session: Session, request: DeliveryRequest) -> Failure | None:
    """A reason to bounce before MAIL FROM: the message needs an extension or a size the peer does not offer."""
    peer = session.peer
    if needs_smtputf8(request) and not session.supports("smtputf8"):
        return Failure("5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer.name}")
    limit = session.size_limit
    size = request.content.size
    if limit and size > limit:
        return Failure("5.3.4", f"message size {size} exceeds size limit {limit} of server {peer.name}")
    return None


def mail_options(session: Session, request: DeliveryRequest, body: str | None, utf8: bool) -> list[bytes]:
    options = []
    if session.supports("size"):
        options.append(f"SIZE={request.content.size}")
    if body:
        options.append(body)
    if utf8:
        options.append("SMTPUTF8")
    return [o.encode("ascii") for o in options]


def dsn_mail_params(request: DeliveryRequest) -> list[bytes]:
    """RET and ENVID (xtext) for a next hop that offers DSN (RFC 3461 4.3, 4.4), as the client gave them."""
    params = []
    if request.ret:
        params.append(f"RET={request.ret.upper()}")
    if request.envid:
        params.append(f"ENVID={xtext(request.envid)}")
    return [p.encode("ascii") for p in params]


def dsn_rcpt_params(recipient: Recipient) -> list[bytes]:
    """ORCPT and NOTIFY for a next hop that offers DSN (RFC 3461 4.1, 4.2): the ORCPT the client gave, else one
    made from the address the client first gave (`rfc822;original`, `utf-8;` with RFC 6533's escapes when it is
    not ASCII), as Postfix's smtp(8) does; NOTIFY as given (none given: none sent, the next hop's default)."""
    params = []
    orcpt = recipient.orcpt or (f"rfc822;{recipient.original}" if recipient.original else "")
    if orcpt:
        addr_type, _, addr = orcpt.partition(";")
        if addr_type.lower() == "utf-8" or not addr.isascii():
            params.append(f"ORCPT=utf-8;{utf8_addr_xtext(addr)}")
        else:
            params.append(f"ORCPT={addr_type};{xtext(addr)}")
    if recipient.notify:
        params.append(f"NOTIFY={recipient.notify.upper()}")
    return [p.encode("ascii") for p in params]


def xtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII but '+' and '=' as is, every other byte (of the UTF-8) as +HH."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in text.encode("utf-8"))


def utf8_addr_xtext(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: like xtext, but a character outside printable ASCII (or '+', '=', '\\')
    is written \\x{HEX} by its code point."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}" for c in text)


def screen_envelope(request: DeliveryRequest) -> tuple[Outcomes, list[Recipient]]:
    """Addresses with CR, LF or other control characters never reach the wire: a bad sender bounces every
    recipient (5.1.7), a bad recipient bounces itself (5.1.3). Returns the outcomes so far and the recipients
    that may be sent."""
    outcomes = Outcomes()
    if has_unsafe_characters(request.sender):
        text = f"<{printable(request.sender)}>: Bad sender address syntax"
        outcomes.set_all(request.recipients, Outcome.BOUNCED, "5.1.7", text)
        return outcomes, []
    sendable = []
    for r in request.recipients:
        if has_unsafe_characters(r.address):
            outcomes.set_all([r], Outcome.BOUNCED, "5.1.3", f"<{printable(r.address)}>: Bad recipient address syntax")
        else:
            sendable.append(r)
    return outcomes, sendable


def smtp_data(content: Content, encoders: tuple[Encoder, ...] = ()) -> Iterator[bytes]:
    """The DATA of a message in memory: the content through `encoders`, dot-stuffed, then the terminator."""
    yield from encode(content.chunks(), *encoders, SmtpData())
    yield b"." + CRLF


async def asmtp_data(content: Content, encoders: tuple[Encoder, ...] = ()) -> AsyncIterator[bytes]:
    """`smtp_data` of a spooled message, its file read chunk by chunk."""
    async for piece in aencode(content.stream(), *encoders, SmtpData()):
        yield piece
    yield b"." + CRLF


def data_refusal(reply: SMTPResponse) -> SMTPResponse:
    """The reply to DATA when it is not 354; an odd positive one counts as a temporary refusal."""
    if 200 <= reply.code < 400:
        return SMTPResponse(451, f"4.5.0 unexpected reply to DATA: {reply.code} {reply.message}")
    return reply




# ---------------------------------------------------------------------------------------------------- replies


def is_positive(reply: SMTPResponse) -> bool:
    return 200 <= reply.code < 300


def reply_outcome(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.SENT
    if 500 <= code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED  # 4xx, and anything odd: temporary by default


def reply_dsn(code: int, message: str, reply_class: str | None = None) -> str:
    """The reply's enhanced code when it has one of the right class, else x.0.0 for the reply's class."""
    wanted = reply_class or (str(code)[0] if 200 <= code < 600 else "4")
    if wanted == "3":
        wanted = "4"
    match = _ENHANCED_CODE.match(message.strip())
    if match:
        return f"{wanted}.{match.group(2)}.{match.group(3)}"
    return f"{wanted}.0.0"


def one_line(code: int, message: str) -> str:
    """`250 2.0.0 Ok` from a possibly multi-line reply, the repeated enhanced codes of later lines dropped."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    first, rest = lines[0], lines[1:]
    match = _ENHANCED_CODE.match(first)
    if match:
        rest = [line.removeprefix(match.group(0)).strip() for line in rest]
    return " ".join([str(code), first, *rest]).strip()


def reply_results(
    recipients: Iterable[Recipient], reply: SMTPResponse, peer: Peer, command: str, *, next_hop_notifies: bool = False
) -> dict[Recipient, RcptResult]:
    """The same reply for each of `recipients`: accepted -> SENT with the reply, refused -> the remote's words.
    `next_hop_notifies`: the peer offered DSN and got the DSN parameters (marks the SENT results)."""
    outcome = reply_outcome(reply.code)
    dsn = reply_dsn(reply.code, reply.message)
    if outcome is Outcome.SENT:
        text = one_line(reply.code, reply.message)
    else:
        text = f"host {peer.name} said: {one_line(reply.code, reply.message)} (in reply to {command} command)"
    notifies = next_hop_notifies and outcome is Outcome.SENT
    return {r: RcptResult(r, outcome, dsn, text, peer.relay, next_hop_notifies=notifies) for r in recipients}


def as_temporary(dsn: str) -> str:
    return "4" + dsn[1:] if dsn[:1] in ("2", "5") else dsn


# ---------------------------------------------------------------------------------------------------- addresses


def has_unsafe_characters(address: str) -> bool:
    """CR, LF, NUL or another control character would end or forge an SMTP command line."""
    return bool(_UNSAFE_IN_ADDRESS.search(address))


def printable(address: str) -> str:
    return _UNSAFE_IN_ADDRESS.sub("?", address)
