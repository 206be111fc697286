"""The LMTP client transport (Postfix lmtp(8), which is its smtp(8) in LMTP mode): final delivery to a mailbox
server such as Dovecot.

Owns only what LMTP does differently; everything else is the SMTP client's core (mailflow.transports.smtp: replies,
commands, the connection, the transaction and what each recipient gets). LMTP says LHLO for EHLO and, after the
end of DATA, reads one reply per accepted recipient, in RCPT order (RFC 2033 4.2). No MX lookup, no TLS, no AUTH.

Connection cache: the SMTP client's (smtp.reuse.SessionCache, Postfix's lmtp(8) shares smtp(8)'s): after a
delivery the session waits `connection_cache_time_limit` for the next message to the same next hop (the UNIX
socket, or host and port), is used at most 1 + `connection_reuse_count_limit` times (0: no limit) and not after
`connection_reuse_time_limit`; the final replies end the transaction (refused ones too: no RSET as it is cached),
and a cached session is sent RSET before it is used again (the RSET probe, which Postfix's lmtp(8) and smtp(8) send
before each reuse; smtp.proto's, as the SMTP client's: in MAIL's write to a server that offers PIPELINING). One
cached session at most is tried per delivery: when the server closed it meanwhile (its RSET probe fails, or it dies
before MAIL FROM is answered) it is dropped and the message goes over a new one: no deferral. A session not kept is
QUIT without waiting for the reply (Postfix's lmtp_skip_quit_response = yes).

    LmtpTransport(config, *, helo_name, clock=time.monotonic, now=time.time, checks=None, generic=None)   (`now`:
                  qmgr's clock, as smtp's; `checks`: lmtp_header_checks and the like, mailflow.transports.smtp_checks;
                  `generic`: lmtp_generic_maps, mailflow.transports.generic, mapping as smtp's does; None: unset)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 QUITs the cached sessions; none is cached afterwards

Nexthop forms (the part after `lmtp:` in a transport value; see smtp.addr):
- `[host]:port`, `host:port`, `[host]`, `host`   TCP; the port defaults to `config.port` (24). A host name is resolved
  by the system resolver and its addresses are tried in order until one completes the greeting and LHLO. An `inet:`
  prefix is accepted.
- `unix:/path/to/socket`                         a UNIX-domain socket; diagnostics call it `helo_name[/path]`.

Dialogue: greeting, `LHLO helo_name` (capabilities), then smtp.proto's transaction: MAIL FROM with SIZE, BODY
(8BITMIME content to a server without 8BITMIME is converted to 7 bit), SMTPUTF8 and DSN's RET and ENVID as offered;
one RCPT TO per recipient (ORCPT and NOTIFY when DSN is offered); pipelined with DATA when PIPELINING is offered;
the content dot-stuffed and streamed; then exactly one reply per accepted RCPT.
Limits: connecting `connect_timeout`; greeting, LHLO, MAIL, RCPT, DATA `command_timeout`; the content and each
final reply `data_timeout`.

What each recipient gets, beyond smtp's (2xx SENT, 4xx DEFERRED, 5xx BOUNCED, with the server's words):
- nexthop unparsable / host name not found         DEFERRED 4.3.5 / 4.4.3, site_ok=False
- cannot connect                                   DEFERRED 4.4.1, site_ok=False
- greeting or LHLO refused                         DEFERRED (the reply's code as 4.x.x), site_ok=False; a 5xx to
                                                   LHLO BOUNCED with its code, no other address tried (Postfix)
- connection lost, timed out, malformed reply      those without a final answer DEFERRED 4.4.2 (4.5.0 for a malformed
                                                   reply), site_ok=False; answers already read stand

`relay` is `host[ip]:port` (TCP) or `helo_name[/path]` (UNIX socket), "none" when no connection was made.
Log lines besides the results, as Postfix's lmtp: `connect to h[ip]:port: Connection refused` (no queue id; none for
a UNIX socket), and `QID: reason` for an address that failed when another one is tried after it. These and the
lines of the core an LMTP session writes (`QID: non-LMTP response from h[ip]:port: …`, `host h[ip] offers SMTPUTF8
support, but not 8BITMIME`) go to the `mailflow.lmtp` logger, so the log names them `lmtp`, as Postfix's lmtp(8).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from typing import Callable

from mailflow.config import LmtpConfig
from mailflow.dns import is_ip_literal
from mailflow.errors import LookupRetry, TemporaryError
from mailflow.model import DeliveryReport, DeliveryRequest, Recipient
from mailflow.transports.generic import GenericMaps, WireForm
from mailflow.transports.smtp.addr import Nexthop, Peer, parse_nexthop, unique
from mailflow.transports.smtp.chat import Session, Timeouts
from mailflow.transports.smtp.commands import screen_envelope
from mailflow.transports.smtp.connect import SourceAddress, greet, hello, log_connect_failure, open_session
from mailflow.transports.smtp.proto import send_message
from mailflow.transports.smtp.reuse import SessionCache
from mailflow.transports.smtp_checks import OutboundChecks, outbound_wire_form
from mailflow.transports.smtp.trouble import ConnectFailure, Outcomes, SiteFailure, record_unreachable

log = logging.getLogger("mailflow.lmtp")


class LmtpTransport:
    """Delivers each request over a cached or a new LMTP session to its next hop (see the module docstring)."""

    program = "lmtp"  # the Postfix delivery agent whose name its result lines are logged under

    def __init__(self, config: LmtpConfig, *, helo_name: str, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], float] = time.time, checks: OutboundChecks | None = None,
                 generic: GenericMaps | None = None):
        self._config = config
        self._checks = checks
        self._generic = generic
        self._now = now
        self._helo_name = helo_name
        self._clock = clock
        self._source = SourceAddress.of(config, "lmtp")
        self._timeouts = Timeouts(config.connect_timeout, config.command_timeout, config.command_timeout,
                                  config.data_timeout)
        self._cache = SessionCache.of(config, clock)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes, sendable = screen_envelope(request)
        if sendable:
            await self._deliver(request, sendable, outcomes)
        return await outcomes.report(request, self._now)

    async def close(self) -> None:
        """QUIT every cached session; afterwards no session is cached again."""
        self._cache.close()

    async def _deliver(self, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes) -> None:
        wire = None
        if self._checks is not None or self._generic is not None:
            screened = dataclasses.replace(request, recipients=tuple(recipients))  # (a refused one is not mapped)
            blocking = any(maps is not None and maps.blocking for maps in (self._checks, self._generic)) or (
                self._checks is not None and self._checks.long_head(request.content))
            try:  # (the header section is read and checked: off the loop when the content is in a file, a table
                # may wait on I/O, or a header field is long (long_head); such a table has its own deadline, sqlite's
                # query timeout)
                wire = (outbound_wire_form(screened, self._checks, self._generic)
                        if request.content.in_memory and not blocking else
                        await asyncio.to_thread(outbound_wire_form, screened, self._checks, self._generic))
            except LookupRetry as e:  # (lmtp_generic_maps)
                error = TemporaryError("4.3.0", f"lmtp_generic_maps lookup error: {e.text}")
                await outcomes.fail_in_slices(recipients, error)
                return
            except TemporaryError as e:  # (lmtp_header_checks)
                await outcomes.fail_in_slices(recipients, e)
                return
        try:
            nexthop = parse_nexthop(request.nexthop, self._config.port, lmtp=True)
        except ValueError:
            error = TemporaryError("4.3.5", f"mail system configuration error: bad LMTP nexthop {request.nexthop!r}")
            (await outcomes.fail_in_slices(recipients, error)).site_failed(error)
            return
        key = f"unix:{nexthop.path}" if nexthop.path else f"[{nexthop.host}]:{nexthop.port}"
        session = await self._cache.reuse(key, lambda s: send_message(
            s, request, recipients, outcomes, self._timeouts, self._now, reused=True, lmtp=True, wire=wire,
            probe=self._cache.rset_timeout))
        if session is None:
            session = await self._deliver_on_new_session(nexthop, request, recipients, outcomes, wire)
        if session is not None:
            await self._cache.release(key, session)

    async def _deliver_on_new_session(self, nexthop: Nexthop, request: DeliveryRequest, recipients: list[Recipient],
                                      outcomes: Outcomes, wire: WireForm | None) -> Session | None:
        """The transaction over a new session: that session, to be released; None when none could be opened (the
        recipients' results say why)."""
        try:
            session = await self._open(nexthop, request.queue_id)
        except SiteFailure as e:
            await record_unreachable(outcomes, recipients, e, [])
            return None
        try:
            await send_message(session, request, recipients, outcomes, self._timeouts, self._now, lmtp=True,
                               wire=wire)
        except BaseException:
            session.abort()
            raise
        return session

    async def _open(self, nexthop: Nexthop, queue_id: str) -> Session:
        """A session past LHLO with the first address that completes it. Raises the last SiteFailure. Logged as
        Postfix's lmtp logs them: a failed TCP connection at once, without the queue id; a failure after
        connecting as `QID: reason` when another address is tried after it (at the last one the result lines
        are the only ones). The last failure propagates as raised: one kept in a local and raised again would
        hold this frame through its traceback, a reference cycle."""
        *others, last = await self._peers(nexthop)  # _peers never returns an empty list
        for peer in others:
            try:
                return await self._handshake(peer)
            except ConnectFailure as e:
                log_connect_failure(e, log)
            except SiteFailure as e:
                if e.hard:  # a 5xx to LHLO: the mail bounces with it, as Postfix's lmtp
                    raise
                log.info("%s: %s", queue_id, e.text)
        try:
            return await self._handshake(last)
        except ConnectFailure as e:
            log_connect_failure(e, log)
            raise

    async def _handshake(self, peer: Peer) -> Session:
        session = await open_session(peer, self._timeouts.connect, self._clock, self._source)
        try:
            await greet(session, self._timeouts.helo)
            await hello(session, self._helo_name, self._timeouts.helo, lmtp=True)
        except SiteFailure as e:
            session.abort()
            raise e.at(peer.relay) from None
        except BaseException:
            session.abort()
            raise
        return session

    async def _peers(self, nexthop: Nexthop) -> list[Peer]:
        """The UNIX socket, or the host's addresses in the system resolver's order (an IP literal is its own).
        Raises SiteFailure (4.4.3)."""
        if nexthop.path:
            return [Peer(self._helo_name, nexthop.path)]
        host, port = nexthop.host, nexthop.port
        if is_ip_literal(host):
            return [Peer(host, host, port)]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._config.connect_timeout or None):  # (0: the system's limit)
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:
            reason = "lookup timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise SiteFailure("4.4.3", f"Host or domain name not found. Name service error for "
                                       f"name={host}: {reason}") from None
        addresses = unique(str(info[4][0]) for info in infos)
        if not addresses:
            raise SiteFailure("4.4.3", f"Host or domain name not found: {host} has no address")
        return [Peer(host, address, port) for address in addresses]

