"""The SMTP client transport (Postfix smtp): MX delivery and relaying to a fixed host, over aiosmtplib.

Owns: turning a nexthop into an ordered list of peers, one SMTP session per delivery, and mapping every
reply to a per-recipient result. The resolver and the RNG are injected; nothing here is global.

    SmtpTransport(config, *, resolver, helo_name, rng=None)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 nothing cached yet (a connection cache would be emptied here)

Nexthop forms (Postfix semantics):
- `[host]` or `[host]:port`  no MX lookup; connect to host's addresses (port defaults to `config.port`).
- `domain` or `domain:port`  MX lookup of domain: by preference, ties shuffled with the injected RNG; no MX record
  means the domain itself (implicit MX). Each MX host's addresses (A, then AAAA) are tried in order, all on
  `port` (default `config.port`).

Which peer: the next MX host / address is tried when connecting fails or times out, or when the greeting, EHLO or
STARTTLS fails. The first peer that completes EHLO gets the message, whatever it answers afterwards.

What each recipient gets:
- accepted after end of DATA                        SENT, the remote's reply ("250 2.0.0 Ok: queued as X")
- refused RCPT / MAIL / DATA                        5xx BOUNCED, 4xx DEFERRED, with "host h[ip] said: ... (in reply
                                                    to X command)"; a reply without an enhanced code gets x.0.0
- domain does not exist (NXDOMAIN)                  BOUNCED 5.1.2
- null MX (RFC 7505)                                BOUNCED 5.1.10
- no MX host (or the [host]) has an address         BOUNCED 5.4.4
- DNS failure                                       DEFERRED 4.4.3, site_ok=False
- no peer could be talked to                        DEFERRED (4.4.1 connect, 4.4.2 timeout/lost, ...), naming the
                                                    last peer tried, site_ok=False
- connection lost or timed out during the dialogue  those without a final answer DEFERRED 4.4.2, site_ok=False
- needs SMTPUTF8, the peer does not offer it        BOUNCED 5.6.7
- bigger than the peer's advertised SIZE            BOUNCED 5.3.4
- address with a control character (CR, LF, NUL…)   that recipient BOUNCED 5.1.3 (in the sender: all, 5.1.7)

`site_ok` is False only when the destination could not be talked to; refusals and bounces keep it True.
MAIL and RCPT go out through `execute_command`, not `sendmail()`: the envelope is sent exactly as queued (sendmail
re-parses addresses with email.utils) and every RCPT reply is kept. DATA goes through aiosmtplib's `data()`, which
dot-stuffs; the content is sent as it is (CRLF, complete). `relay` is `host[ip]:port`, or "none" before any session.
The session always ends with QUIT; `_open_session` / `_release_session` are the seams for a connection cache.
"""
from __future__ import annotations

import logging
import os
import random
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby

import aiosmtplib
from aiosmtplib import SMTPResponse

from mailflow.config import SmtpConfig, parse_hostport
from mailflow.dns import MX, NotFound, Resolver, is_ip_literal
from mailflow.errors import LookupRetry
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient

log = logging.getLogger("mailflow.smtp")

# The results are final once DATA is answered; a peer slow to answer QUIT must not hold them back long.
QUIT_TIMEOUT = 10.0

_ENHANCED_CODE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNSAFE_IN_ADDRESS = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Nexthop:
    host: str
    port: int
    mx_lookup: bool


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


class SessionFailed(Exception):
    """Opening a session with one peer failed (connect, greeting, EHLO, STARTTLS): try the next one."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


class ConversationLost(Exception):
    """The connection broke or timed out in the middle of the dialogue."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


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


# ---------------------------------------------------------------------------------------------------- transport


class SmtpTransport:
    def __init__(
        self, config: SmtpConfig, *, resolver: Resolver, helo_name: str, rng: random.Random | None = None
    ):
        self._config = config
        self._resolver = resolver
        self._helo_name = helo_name
        self._rng = rng if rng is not None else random.Random()
        self._tls_context = opportunistic_tls_context()

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes = Outcomes()
        if has_unsafe_characters(request.sender):
            text = f"<{printable(request.sender)}>: Bad sender address syntax"
            return outcomes.set_all(request.recipients, Outcome.BOUNCED, "5.1.7", text).report(request)
        sendable = []
        for r in request.recipients:
            if has_unsafe_characters(r.address):
                text = f"<{printable(r.address)}>: Bad recipient address syntax"
                outcomes.set_all([r], Outcome.BOUNCED, "5.1.3", text)
            else:
                sendable.append(r)
        if sendable:
            await self._deliver_to_nexthop(request, sendable, outcomes)
        return outcomes.report(request)

    async def close(self) -> None:
        """Nothing is cached yet: every session ends with its message."""

    # -- routing

    async def _deliver_to_nexthop(
        self, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes
    ) -> None:
        try:
            nexthop = parse_nexthop(request.nexthop, self._config.port)
        except ValueError:
            text = f"mail system configuration error: bad SMTP nexthop {request.nexthop!r}"
            outcomes.set_all(recipients, Outcome.DEFERRED, "4.3.5", text).site_failed(text)
            return
        try:
            hosts = await self._exchangers(nexthop)
        except NotFound as e:
            outcomes.set_all(recipients, Outcome.BOUNCED, e.dsn, e.text)
            return
        except NullMX:
            text = f"Domain {nexthop.host} does not accept mail (nullMX)"
            outcomes.set_all(recipients, Outcome.BOUNCED, "5.1.10", text)
            return
        except LookupRetry as e:
            text = f"Host or domain name not found. {e.text}"
            outcomes.set_all(recipients, Outcome.DEFERRED, "4.4.3", text).site_failed(text)
            return
        await self._deliver_to_first_reachable(hosts, nexthop.port, request, recipients, outcomes)

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

    async def _deliver_to_first_reachable(
        self, hosts: list[str], port: int, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes
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
                peer = Peer(host, ip, port)
                try:
                    client = await self._open_session(peer)
                except SessionFailed as e:
                    log.debug("%s: %s", peer.relay, e.failure.text)
                    peer_failure = e.failure
                    continue
                try:
                    await self._send_message(client, peer, request, recipients, outcomes)
                finally:
                    await self._release_session(client)
                return
        record_unreachable(outcomes, recipients, peer_failure, dns_failures)

    # -- one session

    async def _open_session(self, peer: Peer) -> aiosmtplib.SMTP:
        """A connected client past EHLO (and STARTTLS when offered). Raises SessionFailed."""
        client = aiosmtplib.SMTP(
            hostname=peer.ip,
            port=peer.port,
            timeout=self._config.command_timeout,
            start_tls=False,
            local_hostname=self._helo_name,
        )
        stage = "connect"
        try:
            await client.connect(timeout=self._config.connect_timeout)
            stage = "EHLO"
            await self._say_hello(client)
            if self._wants_tls(client):
                stage = "STARTTLS"
                await client.starttls(
                    tls_context=self._tls_context,
                    server_hostname=None if is_ip_literal(peer.host) else peer.host,
                    timeout=self._config.command_timeout,
                )
                stage = "EHLO"
                await self._say_hello(client)
        except (aiosmtplib.SMTPException, OSError) as e:
            client.close()
            raise SessionFailed(session_failure(peer, stage, e)) from None
        except BaseException:
            client.close()
            raise
        return client

    async def _say_hello(self, client: aiosmtplib.SMTP) -> None:
        """EHLO; a 5xx EHLO falls back to HELO (RFC 5321 4.1.4). Raises SMTPHeloError when both fail."""
        try:
            await client.ehlo(timeout=self._config.command_timeout)
        except aiosmtplib.SMTPHeloError as e:
            if e.code < 500 or not client.is_connected:
                raise
            await client.helo(timeout=self._config.command_timeout)

    def _wants_tls(self, client: aiosmtplib.SMTP) -> bool:
        return self._config.tls_security_level == "may" and client.supports_extension("starttls")

    async def _release_session(self, client: aiosmtplib.SMTP) -> None:
        """QUIT and close. A connection cache would keep the client here instead."""
        try:
            if client.is_connected:
                await client.quit(timeout=min(QUIT_TIMEOUT, self._config.command_timeout))
        except (aiosmtplib.SMTPException, OSError) as e:
            log.debug("QUIT failed: %r", e)
        finally:
            client.close()

    async def _send_message(
        self,
        client: aiosmtplib.SMTP,
        peer: Peer,
        request: DeliveryRequest,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> None:
        """One mail transaction on an open session; every recipient ends with a result in `outcomes`."""
        refusal = peer_cannot_take(client, peer, request)
        if refusal is not None:
            outcomes.set_all(recipients, Outcome.BOUNCED, refusal.dsn, refusal.text, peer.relay)
            return
        try:
            await self._transaction(client, peer, request, recipients, outcomes)
        except ConversationLost as e:
            pending = [r for r in recipients if r not in outcomes.results]
            outcomes.set_all(pending, Outcome.DEFERRED, e.failure.dsn, e.failure.text, peer.relay)
            outcomes.site_failed(e.failure.text)

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        peer: Peer,
        request: DeliveryRequest,
        recipients: list[Recipient],
        outcomes: Outcomes,
    ) -> None:
        utf8 = uses_smtputf8(client, request)
        encoding = "utf-8" if utf8 else "ascii"
        mail_from = b"FROM:<" + request.sender.encode(encoding) + b">"
        reply = await self._command(client, peer, "MAIL FROM", b"MAIL", mail_from, *mail_options(client, request, utf8))
        if not is_positive(reply):
            outcomes.results.update(reply_results(recipients, reply, peer, "MAIL FROM"))
            return
        accepted = await self._send_recipients(client, peer, recipients, encoding, outcomes)
        if accepted:
            reply = await self._data(client, peer, request.content)
            outcomes.results.update(reply_results(accepted, reply, peer, "DATA"))

    async def _send_recipients(
        self, client: aiosmtplib.SMTP, peer: Peer, recipients: list[Recipient], encoding: str, outcomes: Outcomes
    ) -> list[Recipient]:
        """RCPT TO for each recipient; the refused get their result now, the accepted are returned."""
        accepted = []
        for r in recipients:
            reply = await self._command(client, peer, "RCPT TO", b"RCPT", b"TO:<" + r.address.encode(encoding) + b">")
            if is_positive(reply):
                accepted.append(r)
            else:
                outcomes.results.update(reply_results([r], reply, peer, "RCPT TO"))
        return accepted

    async def _command(self, client: aiosmtplib.SMTP, peer: Peer, stage: str, *args: bytes) -> SMTPResponse:
        try:
            return await client.execute_command(*args, timeout=self._config.command_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
            raise ConversationLost(lost_failure(peer, f"sending {stage}", e)) from None

    async def _data(self, client: aiosmtplib.SMTP, peer: Peer, content: bytes) -> SMTPResponse:
        """DATA, the content (dot-stuffed by aiosmtplib), the final reply; a refusal comes back as a reply."""
        try:
            return await client.data(content, timeout=self._config.data_timeout)
        except aiosmtplib.SMTPDataError as e:
            return SMTPResponse(e.code, e.message)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as e:
            raise ConversationLost(lost_failure(peer, "sending message body", e)) from None


# ---------------------------------------------------------------------------------------------------- routing helpers


def parse_nexthop(nexthop: str, default_port: int) -> Nexthop:
    """`[host]:port`, `[host]`, `domain:port`, `domain`. Brackets turn the MX lookup off. Raises ValueError."""
    host, port = parse_hostport(nexthop, default_port)
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ValueError(f"{nexthop!r} names no host")
    return Nexthop(host, port, mx_lookup=not nexthop.strip().startswith("["))


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


def opportunistic_tls_context() -> ssl.SSLContext:
    """TLS without verification (smtp_tls_security_level = may): encryption against passive eavesdroppers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def session_failure(peer: Peer, stage: str, error: Exception) -> Failure:
    """Why a session could not be opened, worded like Postfix's smtp(8)."""
    if isinstance(error, aiosmtplib.SMTPConnectResponseError):
        reply = one_line(error.code, error.message)
        return Failure(reply_dsn(error.code, error.message, "4"), f"host {peer.name} refused to talk to me: {reply}")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reply = one_line(error.code, error.message)
        return Failure(
            reply_dsn(error.code, error.message, "4"), f"host {peer.name} said: {reply} (in reply to {stage} command)"
        )
    cause = socket_error(error)
    if stage == "connect" and cause is not None:
        return Failure("4.4.1", f"connect to {peer.relay}: {os_reason(cause)}")
    if stage == "STARTTLS" or isinstance(error, ssl.SSLError):
        return Failure("4.7.5", f"Cannot start TLS with {peer.name}: handshake failure ({error})")
    activity = "receiving the initial server greeting" if stage == "connect" else "performing the EHLO handshake"
    return lost_failure(peer, activity, error)


def socket_error(error: Exception) -> OSError | None:
    """The OS-level error under aiosmtplib's wrapper (refused, unreachable, timed out), if that is what it was."""
    cause = error.__cause__ if isinstance(error, aiosmtplib.SMTPException) else error
    if isinstance(cause, OSError) and not isinstance(cause, aiosmtplib.SMTPException):
        return cause
    return None


def lost_failure(peer: Peer, activity: str, error: Exception) -> Failure:
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
    return request.smtputf8 and not header_block(request.content).isascii()


def header_block(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0]


def uses_smtputf8(client: aiosmtplib.SMTP, request: DeliveryRequest) -> bool:
    return client.supports_extension("smtputf8") and (request.smtputf8 or needs_smtputf8(request))


def advertised_size(client: aiosmtplib.SMTP) -> int:
    """The peer's SIZE limit; 0 = none advertised or unlimited."""
    value = client.esmtp_extensions.get("size", "").strip()
    return int(value) if value.isdigit() else 0


def peer_cannot_take(client: aiosmtplib.SMTP, peer: Peer, request: DeliveryRequest) -> Failure | None:
    """A reason to bounce before MAIL FROM: the message needs an extension or a size the peer does not offer."""
    if needs_smtputf8(request) and not client.supports_extension("smtputf8"):
        return Failure("5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer.name}")
    limit = advertised_size(client)
    if limit and len(request.content) > limit:
        return Failure("5.3.4", f"message size {len(request.content)} exceeds size limit {limit} of server {peer.name}")
    return None


def mail_options(client: aiosmtplib.SMTP, request: DeliveryRequest, utf8: bool) -> list[bytes]:
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(request.content)}")
    if request.body_type.upper() == "8BITMIME" and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if utf8:
        options.append("SMTPUTF8")
    return [o.encode("ascii") for o in options]


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
    recipients: Iterable[Recipient], reply: SMTPResponse, peer: Peer, command: str
) -> dict[Recipient, RcptResult]:
    """The same reply for each of `recipients`: accepted -> SENT with the reply, refused -> the remote's words."""
    outcome = reply_outcome(reply.code)
    dsn = reply_dsn(reply.code, reply.message)
    if outcome is Outcome.SENT:
        text = one_line(reply.code, reply.message)
    else:
        text = f"host {peer.name} said: {one_line(reply.code, reply.message)} (in reply to {command} command)"
    return {r: RcptResult(r, outcome, dsn, text, peer.relay) for r in recipients}


def as_temporary(dsn: str) -> str:
    return "4" + dsn[1:] if dsn[:1] in ("2", "5") else dsn


# ---------------------------------------------------------------------------------------------------- addresses


def has_unsafe_characters(address: str) -> bool:
    """CR, LF, NUL or another control character would end or forge an SMTP command line."""
    return bool(_UNSAFE_IN_ADDRESS.search(address))


def printable(address: str) -> str:
    return _UNSAFE_IN_ADDRESS.sub("?", address)
