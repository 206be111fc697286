"""Opening a session (Postfix smtp_connect, with smtp_proto's handshake): connect, greeting, EHLO/HELO or LHLO,
and for SMTP STARTTLS as the TLS policy asks and AUTH with the relay's credentials.

    await open_session(peer, timeout, clock, source=None, reply_filter=None, log=None) -> Session     TCP, or a
                                UNIX-domain socket (port 0), within `timeout` (`reply_filter`: smtp_reply_filter, the
                                session's reply lines through it: mailflow.transports.smtp.reply_filter; `log`: the
                                client's logger, the session's lines' and the bind warning's); ConnectFailure
                                4.4.1 "connect to h[ip]:port: Connection refused" (or timed out), which the
                                caller logs with log_connect_failure. `source`
                                (SourceAddress.of(config, "smtp" or "lmtp"): bind_address, bind_address6), the
                                address a TCP connection goes from, by the peer's family, as Postfix's
                                smtp_connect_addr: a bind that fails is logged `warning: smtp_connect_addr: bind
                                192.0.2.1: Cannot assign requested address` and the connection goes from any
                                address; with bind_address_enforce the peer fails instead, BindFailure 4.4.0
                                "server configuration error" (each address tried, then the mail deferred)
    log_connect_failure(failure, log)   a TCP peer's failed connection at once, alone, no queue id (Postfix's
                                smtp_connect_inet); none for a UNIX-domain socket's; on the caller's logger (the
                                log names smtp or lmtp)
    await greet(session, timeout)                            the greeting must be 2xx
    await hello(session, helo_name, timeout, lmtp=False, queue_id="")
                                EHLO (HELO after a refused EHLO but 421), or LHLO; sets
                                `session.extensions` (a server that offers SMTPUTF8 but not 8BITMIME is taken as
                                offering both, as Postfix does, logged as smtp_proto.c logs it: `host h[ip] offers
                                SMTPUTF8 support, but not 8BITMIME`, no queue id: a session may serve several
                                messages); `queue_id` names the message in the session's other lines; after a
                                refusal, QUIT (as Postfix says it) and close
        a refused greeting, EHLO, HELO or LHLO: SiteFailure "host h[ip] refused to talk to me: 554 ..." (class 4;
        a 5xx to EHLO/HELO/LHLO, or a code neither 2xx, 4xx nor 5xx anywhere, greeting included, is `hard`: the
        mail bounces with it, 5.5.0 for an odd code, no other peer is tried, as with Postfix)
    Destination(nexthop, written, policy, fallback, mx_secure, sender)   one request's next hop, as parsed and as
                                written (the table key), its TLS policy, what a `dane` policy falls back to without
                                TLSA records (MTA-STS's, else may), whether its MX records were DNSSEC-validated, and
                                (sender-dependent authentication: None when off) the envelope sender, whose
                                credentials a session uses and whose own cached sessions it goes to (`cache_key`)
    SmtpHandshake(config, helo_name, tls, password_tables, tables, clock, resolver, plaintext_after, sender_keys,
                  source, reply_filter, log)   `log`: the client's logger (chat.client_log(program)): every line
                                of the handshake and of its sessions, so that the relay transport's are relay/smtp's
      await .open(peer, destination, queue_id, queued_for=None) -> Session   a session past the whole SMTP
                                handshake (`queued_for`: the message's time in the queue, None: long); raises
                                SiteFailure (try the next peer; once connected, its `relay` names the peer) or
                                LocalProblem (our side: stop)

TLS (levels in smtp.tls): none never says STARTTLS. may: STARTTLS when offered, unverified (its reply and the
handshake each within `starttls_timeout`, Postfix's smtp_starttls_timeout; no reply to STARTTLS fails the peer
as any command's: "conversation with h[ip] timed out while receiving the STARTTLS response", 4.4.2, or "lost
connection with …", and at no level is the mail retried in plaintext for it); a refused STARTTLS goes on in
plaintext on the same session; a failed handshake connects again in plaintext when the message has been
queued for `plaintext_after` seconds (the minimal backoff time) and there are no AUTH credentials for the peer,
else it fails that peer with 4.7.5 "Cannot start TLS: handshake failure" (Postfix's
PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE: new mail is not sent in plaintext at the first TLS trouble). A
failed handshake is logged in tls_client.c's words, `SSL_connect error to h[ip]:port: lost connection` (or
"Connection timed out", or "-1" then `warning: TLS library problem: …`), and before the plaintext retry `QID:
Cannot start TLS: handshake failure`; a successful one, with `smtp.tls_loglevel` 1 or more (Postfix's
smtp_tls_loglevel; 0 by default, as Postfix's), as `Untrusted TLS connection established to h[ip]:port: TLSv1.3
with cipher … (256/256 bits)` ("Verified" when the certificate was verified or matched TLSA records).
encrypt and above: not offered -> 4.7.4 "TLS is required, but was not offered by host h[ip]"; refused (any
reply but 2xx) -> the reply's code (a 5xx or an odd code is hard: the mail bounces); a failed handshake -> 4.7.5
"Cannot start TLS: handshake failure"; an untrusted chain, or no matching name -> 4.7.5 "Server certificate not
verified", its reason on a line of its own at any tls_loglevel (Postfix's tls_verify.c: `certificate verification
failed for h[ip]:port: self-signed certificate`, `server certificate verification failed for h[ip]:port:
num=62:hostname mismatch`: see _not_verified); TLS unavailable here (unreadable CA or certificate file) ->
LocalProblem 4.7.5. After TLS, EHLO again. Per peer, before connecting: a dane/dane-only policy becomes the peer's
(smtp.dane: its TLSA records, or the fallback, or 4.7.5 for dane-only); a certificate that matches none of a DANE
peer's TLSA records -> 4.7.5 "Server certificate not verified" (logged `… num=65:No matching DANE TLSA records`).
An MTA-STS policy (smtp.mtasts) names the MX hosts it allows: another host -> 4.7.5 "MX host h does not match the
MTA-STS policy" in enforce mode (the next one is tried), a log line in testing mode, which also logs a missing
STARTTLS, a failed handshake and a certificate without the host's name.
AUTH (`sasl_password_maps`): credentials by the envelope sender first when `sender_keys` is given (Postfix's
smtp_sender_dependent_authentication: the keys mail_addr_find asks, `user@domain`, `@domain`, ...; not for the
null sender), then by the peer's host name, then by the next hop as written, looked up before connecting
(LocalProblem 4.3.0 when a table cannot answer); used only when the peer offers AUTH, PLAIN else LOGIN. Without
TLS and with `sasl_tls_required` the password is not sent: 4.7.0 "SASL authentication failed; cannot
authenticate to server h[ip]: ...". A refusal fails that peer with the server's words as 4xx
(Postfix smtp_sasl_auth_soft_bounce); any 2xx at the end is success, as Postfix takes it.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, NoReturn

from mailflow.config import LmtpConfig, SmtpConfig
from mailflow.dns import Resolver, is_ip_literal
from mailflow.syntax import is_ipv4
from mailflow.errors import LookupRetry, detached, os_reason, tls_failure
from mailflow.tables import Table, TableCache, find
from mailflow.transports.smtp.addr import Nexthop, Peer, unique
from mailflow.transports.smtp.chat import CLIENT_LOGS, CRLF, Session, Wire, client_log
from mailflow.transports.smtp.commands import Extensions
from mailflow.transports.smtp import dane
from mailflow.transports.smtp.mtasts import mx_allowed
from mailflow.transports.smtp.reply_filter import ReplyFilter
from mailflow.transports.smtp.tls import (
    TlsContexts,
    TlsPolicy,
    TlsUnavailable,
    certificate_matches,
    der_names,
    mismatch_error,
    without_dane,
)
from mailflow.transports.smtp.trouble import (
    BindFailure,
    ConnectFailure,
    LocalProblem,
    RetryPlaintext,
    SiteFailure,
    is_hard,
    refused_to_talk,
)

GREETING = "receiving the initial server greeting"
STARTTLS = "receiving the STARTTLS response"
AUTH = "performing the AUTH handshake"
HANDSHAKE_FAILURE = "Cannot start TLS: handshake failure"  # Postfix's status texts (smtp_proto.c)
NOT_VERIFIED = "Server certificate not verified"


@dataclass(frozen=True)
class SourceAddress:
    """See the module docstring: the `bind_address`, `bind_address6` and `bind_address_enforce` of [smtp] or
    [lmtp] (`program`: which, for the settings' names and the warning)."""

    ipv4: str = ""
    ipv6: str = ""
    enforce: bool = False
    program: str = "smtp"

    @classmethod
    def of(cls, config: SmtpConfig | LmtpConfig, program: str) -> "SourceAddress | None":
        """None when neither address is set (nothing to bind: the connection path stays as it is)."""
        if not config.bind_address and not config.bind_address6:
            return None
        return cls(config.bind_address, config.bind_address6, config.bind_address_enforce, program)

    def for_peer(self, address: str) -> str:
        """The source address for a connection to `address` (of its family), "" for none."""
        return self.ipv4 if is_ipv4(address) else self.ipv6


async def open_session(peer: Peer, timeout: float, clock: Callable[[], float],
                       source: SourceAddress | None = None, reply_filter: ReplyFilter | None = None,
                       log: logging.Logger | None = None) -> Session:
    """See the module docstring. `timeout` 0: none of mailflow's, the system's connect limit (Postfix's
    smtp_connect_timeout / lmtp_connect_timeout 0)."""
    loop = asyncio.get_running_loop()
    opened = clock()
    wire = Wire(reply_filter.for_peer(peer.relay) if reply_filter is not None else None)
    bound = source.for_peer(peer.address) if source is not None and peer.port else ""
    try:
        async with asyncio.timeout(timeout or None):
            if bound:
                assert source is not None
                await loop.create_connection(lambda: wire, sock=await _bound_socket(peer, bound, source, log))
            elif peer.port:
                await loop.create_connection(lambda: wire, peer.address, peer.port)
            else:
                await loop.create_unix_connection(lambda: wire, peer.address)
    except (OSError, TimeoutError) as e:
        raise ConnectFailure(f"connect to {peer.relay}: {os_reason(e)}", tcp=bool(peer.port)) from None
    return Session(wire, peer, opened, log)


async def _bound_socket(peer: Peer, bound: str, source: SourceAddress, log: logging.Logger | None) -> socket.socket:
    """A socket connected to `peer` from `bound`, as Postfix's smtp_connect_addr: a failed bind is a warning
    (`smtp_connect_addr: bind 192.0.2.1: Cannot assign requested address`), then the connection goes from any
    address, or with `enforce` the peer fails with 4.4.0 "server configuration error" (BindFailure)."""
    family = socket.AF_INET if is_ipv4(peer.address) else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.bind((bound, 0))
        except OSError as e:
            (log or client_log(source.program)).warning("%s_connect_addr: bind %s: %s", source.program, bound,
                                                        os_reason(e))
            if source.enforce:
                raise BindFailure() from None
        await asyncio.get_running_loop().sock_connect(sock, (peer.address, peer.port))
    except BaseException:
        sock.close()
        raise
    return sock


def log_connect_failure(failure: ConnectFailure, log: logging.Logger) -> None:
    """See the module docstring."""
    if failure.logged_alone:
        log.info("%s", failure.text)


async def greet(session: Session, timeout: float) -> None:
    greeting = await session.reply(timeout, GREETING)
    if not greeting.positive:
        session.quit()  # (not after a 421: that closed the session already)
        raise refused_to_talk(session.peer, greeting, greeting=True)


async def hello(session: Session, helo_name: str, timeout: float, *, lmtp: bool = False, queue_id: str = "") -> None:
    name = helo_name.encode("ascii", "replace")
    session.queue_id, session.dialect = queue_id, "LMTP" if lmtp else "ESMTP"
    if lmtp:
        reply = await session.command(b"LHLO " + name + CRLF, timeout, "performing the LHLO handshake")
    else:
        reply = await session.command(b"EHLO " + name + CRLF, timeout, "performing the EHLO handshake")
        # RFC 5321 4.1.4: an old server; HELO offers nothing. Postfix says HELO after any refusal but 421.
        if not reply.positive and reply.code != 421 and session.alive:
            reply = await session.command(b"HELO " + name + CRLF, timeout, "performing the HELO handshake")
            if reply.positive:
                session.extensions = Extensions()
                return
    if not reply.positive:
        session.quit()
        raise refused_to_talk(session.peer, reply)
    extensions = Extensions.from_reply(reply)
    if extensions.smtputf8_without_8bitmime():  # Postfix: "Our primary mission is to deliver mail"
        session.log.info("host %s offers SMTPUTF8 support, but not 8BITMIME", session.peer.name)  # (no queue id)
        extensions = extensions.with_8bitmime()
    session.extensions = extensions


@dataclass(frozen=True)
class Destination:
    """See the module docstring."""

    nexthop: Nexthop
    written: str
    policy: TlsPolicy
    fallback: TlsPolicy | None = None
    mx_secure: bool = True
    sender: str | None = None

    @property
    def cache_key(self) -> str:
        written = self.written.strip().lower()
        return written if self.sender is None else f"{written}\0{self.sender.lower()}"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


@dataclass(frozen=True, kw_only=True)
class SmtpHandshake:
    """See the module docstring."""

    config: SmtpConfig
    helo_name: str
    tls: TlsContexts
    password_tables: list[Table]
    tables: TableCache
    clock: Callable[[], float]
    resolver: Resolver | None = None  # TLSA lookups (dane, dane-only)
    plaintext_after: float = 0.0  # a failed TLS handshake at level may: plaintext for mail queued this long
    # a sender's sasl_password_maps keys and the indices of those pattern tables are asked; None: not asked
    sender_keys: Callable[[str], tuple[list[str], tuple[int, ...]]] | None = None
    source: SourceAddress | None = None  # bind_address, bind_address6 (None: neither set)
    reply_filter: ReplyFilter | None = None  # smtp_reply_filter (None: unset, each reply line as received)
    log: logging.Logger = CLIENT_LOGS["ESMTP"]  # the client's (chat.client_log(program)): every line, its sessions'

    async def open(self, peer: Peer, destination: Destination, queue_id: str,
                   queued_for: float | None = None) -> Session:
        """See the module docstring."""
        policy = await self.peer_policy(peer, destination)
        self._check_mx(policy, peer, queue_id)
        credentials = await self._credentials(peer, destination)
        fallback = queued_for is None or queued_for >= self.plaintext_after
        try:
            return await self._handshake(peer, destination, policy, credentials, queue_id, tls_allowed=True,
                                         fallback=fallback)
        except RetryPlaintext:
            self.log.info("%s: %s", queue_id, HANDSHAKE_FAILURE)  # (Postfix's line for a peer it goes on from)
            return await self._handshake(peer, destination, policy, credentials, queue_id, tls_allowed=False)

    async def peer_policy(self, peer: Peer, destination: Destination) -> TlsPolicy:
        """The destination's policy, or for dane/dane-only what the peer's TLSA records make of it (smtp.dane)."""
        policy = destination.policy
        if not policy.dane or self.resolver is None:
            return policy
        fallback = destination.fallback or without_dane(policy.level)
        return await dane.peer_policy(self.resolver, policy, peer.host, peer.port, destination.mx_secure, fallback)

    def _check_mx(self, policy: TlsPolicy, peer: Peer, queue_id: str) -> None:
        if policy.mx_patterns is None or mx_allowed(peer.host, policy.mx_patterns):
            return
        text = f"MX host {peer.host} does not match the MTA-STS policy ({', '.join(policy.mx_patterns)})"
        if not policy.testing:
            raise SiteFailure("4.7.5", text)
        self.log.info("%s: MTA-STS testing: %s", queue_id, text)

    async def _handshake(self, peer: Peer, destination: Destination, policy: TlsPolicy,
                         credentials: Credentials | None, queue_id: str, tls_allowed: bool,
                         fallback: bool = False) -> Session:
        session = await open_session(peer, self.config.connect_timeout, self.clock, self.source, self.reply_filter,
                                     self.log)
        session.queue_id = queue_id  # (the handshake's log lines are the message's too)
        try:
            await greet(session, self.config.helo_timeout)
            await hello(session, self.helo_name, self.config.helo_timeout, queue_id=queue_id)
            if tls_allowed:
                await self._start_tls(session, destination, policy, credentials, queue_id, fallback)
            if credentials is not None and session.extensions.supports("auth"):
                await self._authenticate(session, credentials)
            return session
        except SiteFailure as e:
            session.abort()
            raise e.at(peer.relay) from None
        except BaseException:
            session.abort()
            raise

    # -- STARTTLS

    async def _start_tls(self, session: Session, destination: Destination, policy: TlsPolicy,
                         credentials: Credentials | None, queue_id: str, fallback: bool) -> None:
        """STARTTLS as the policy asks; on success the session is encrypted and EHLO said again. Raises
        SiteFailure, RetryPlaintext (`fallback`: the message may go in plaintext) or LocalProblem."""
        peer = session.peer
        if policy.level == "none":
            return
        if not session.extensions.supports("starttls"):
            if policy.required:
                raise SiteFailure("4.7.4", f"TLS is required, but was not offered by host {peer.name}")
            _testing(session, policy, f"TLS was not offered by host {peer.name}")
            return
        context = self._tls_context(policy)
        if context is None:
            return
        timeout = self.config.starttls_timeout
        # no reply (a timeout, a lost connection) fails the peer as any command's would: no TLS was tried
        reply = await session.command(b"STARTTLS" + CRLF, timeout, STARTTLS)
        if not reply.positive:  # refused: the session itself is still fine (any 2xx goes on, as with Postfix)
            if policy.required:
                raise SiteFailure(reply.dsn("4"),
                                  f"TLS is required, but host {peer.name} refused to start TLS: {reply.one_line}",
                                  hard=is_hard(reply))
            return
        try:
            await session.start_tls(context, None if is_ip_literal(peer.host) else peer.host, timeout)
        except ssl.SSLCertVerificationError as e:
            detached(e)  # (the wire keeps it, the cause of its loss: its traceback would hold the session, a cycle)
            _not_verified(session, e.verify_code, e.verify_message)
        except (SiteFailure, OSError, TimeoutError) as e:
            detached(e)  # (likewise)
            _log_connect_error(session, e)
            _testing(session, policy, f"TLS handshake failure with host {peer.name}")
            if policy.level in ("may", "dane") and not policy.tlsa and credentials is None and fallback:
                raise RetryPlaintext() from None
            raise SiteFailure("4.7.5", HANDSHAKE_FAILURE) from None
        if policy.verifies:
            self._verify_peer_name(session, destination, policy)
        elif policy.tlsa:
            self._verify_tlsa(session, policy)
        elif policy.testing and not certificate_matches({"subjectAltName": [("DNS", n) for n in
                                                         der_names(session.peercert_der)]}, ("hostname",), peer.host,
                                                        destination.nexthop.host):
            _testing(session, policy, f"the certificate of host {peer.name} does not name {peer.host}")
        if self.config.tls_loglevel >= 1:
            _log_established(session, verified=policy.verifies or bool(policy.tlsa))
        await hello(session, self.helo_name, self.config.helo_timeout, queue_id=queue_id)

    def _tls_context(self, policy: TlsPolicy) -> ssl.SSLContext | None:
        """The context for the level; None (plaintext) at level may when TLS cannot be set up here."""
        try:
            return self.tls.for_level(policy.level)
        except TlsUnavailable as e:
            if policy.required:
                raise LocalProblem("4.7.5", f"TLS is required, but our TLS engine is unavailable: {e}") from None
            self.log.warning("TLS is unavailable (%s): sending in plaintext", e)
            return None

    @staticmethod
    def _verify_tlsa(session: Session, policy: TlsPolicy) -> None:
        if not dane.matches(session.peercert_der, policy.tlsa):
            _not_verified(session, *dane.NO_MATCH)

    @staticmethod
    def _verify_peer_name(session: Session, destination: Destination, policy: TlsPolicy) -> None:
        peer, patterns, nexthop = session.peer, policy.match, destination.nexthop.host
        if not certificate_matches(session.peercert, patterns, peer.host, nexthop):
            _not_verified(session, *mismatch_error(patterns, peer.host, nexthop))

    # -- AUTH

    async def _credentials(self, peer: Peer, destination: Destination) -> Credentials | None:
        """user:password for the envelope sender (sender-dependent authentication), else for the peer's host name,
        else for the next hop as written, a pattern table (regexp, pcre) asked each of these but the sender's
        partial keys (`@domain`, ...), as Postfix's smtp_sasl_passwd_lookup asks them. Raises LocalProblem."""
        if not self.password_tables:
            return None
        keys = unique([peer.host, destination.written.strip().lower()])
        try:
            found = None
            if self.sender_keys is not None and destination.sender:
                found = await self.tables.run(find, self.password_tables, *self.sender_keys(destination.sender))
            if found is None:
                found = await self.tables.run(find, self.password_tables, keys, range(len(keys)))
        except LookupRetry as e:
            raise LocalProblem("4.3.0", f"sasl_password_maps lookup error: {e.text}") from None
        if found is None:
            return None
        user, _, password = found[2].strip().partition(":")
        return Credentials(user, password)

    async def _authenticate(self, session: Session, credentials: Credentials) -> None:
        """AUTH PLAIN (else LOGIN). Raises SiteFailure."""
        peer = session.peer
        cannot = f"SASL authentication failed; cannot authenticate to server {peer.name}"
        if not session.tls and self.config.sasl_tls_required:
            raise SiteFailure("4.7.0", f"{cannot}: the session is not encrypted (sasl_tls_required)")
        offered = session.extensions.auth_methods
        user, password = credentials.user.encode("utf-8"), credentials.password.encode("utf-8")
        if "plain" in offered:
            steps = [b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password)]
        elif "login" in offered:
            steps = [b"AUTH LOGIN " + base64.b64encode(user), base64.b64encode(password)]
        else:
            raise SiteFailure("4.7.0", f"{cannot}: no mechanism available (offered: {' '.join(offered)})")
        for i, step in enumerate(steps):
            reply = await session.command(step + CRLF, self.config.command_timeout, AUTH)
            if reply.code != 334 or i == len(steps) - 1:
                break
        if not reply.positive:
            raise SiteFailure(reply.dsn("4"),
                              f"SASL authentication failed; server {peer.name} said: {reply.one_line}")


def _log_connect_error(session: Session, error: BaseException) -> None:
    """A failed client handshake, logged as Postfix's tls_client.c logs it: `SSL_connect error to host[ip]:port:
    reason` ("lost connection", "Connection timed out", "-1" for a TLS protocol error, whose description follows
    as `warning: TLS library problem: …`)."""
    reason, problem = tls_failure(error)
    session.log.info("SSL_connect error to %s: %s", session.peer.relay, reason)
    if problem:
        session.log.warning("TLS library problem: %s", problem)


# OpenSSL's default verification depth (intermediate CAs at most), which Python's ssl leaves as it is: Postfix's
# smtp_tls_scert_verifydepth 99 (it sets one more); a longer chain fails with X509_V_ERR_CERT_CHAIN_TOO_LONG
VERIFY_DEPTH = 100
# tls_verify.c's words for OpenSSL's verification errors (X509_V_ERR_*) that it names itself; any other is
# `server certificate verification failed for h[ip]:port: num=N:text`
_CERTIFICATE_FAILURES = {
    18: "self-signed certificate",
    19: "untrusted issuer <unknown>", 20: "untrusted issuer <unknown>",  # (the issuer: see _not_verified)
    22: f"certificate chain longer than limit({VERIFY_DEPTH})",  # (Postfix: the error's depth less one)
    26: "not designated for use as a server certificate",
    27: "not trusted by local or TLSA policy",
}
_SERVER_CERTIFICATE_FAILURES = {9: "certificate not yet valid", 13: "certificate not yet valid",
                                10: "certificate has expired", 14: "certificate has expired"}


def _not_verified(session: Session, code: int, text: str) -> NoReturn:
    """A certificate that a verifying level (verify, secure, DANE) refuses, by OpenSSL's error `code` and `text`:
    logged as Postfix's tls_verify.c logs it at any smtp_tls_loglevel (`certificate verification failed for
    h[ip]:port: untrusted issuer …`, `server certificate verification failed for h[ip]:port: num=62:hostname
    mismatch`), then SiteFailure 4.7.5 "Server certificate not verified", Postfix's status text. Python's ssl
    module gives neither the certificate of a failed handshake nor the depth of the error: an untrusted issuer is
    `<unknown>` (Postfix's word for an issuer it cannot name), and a failure is the server certificate's (Postfix
    says `CA certificate verification failed` for an expired intermediate, which the depth tells it; Python's ssl
    cannot)."""
    log, relay = session.log, session.peer.relay
    if code in _CERTIFICATE_FAILURES:
        log.info("certificate verification failed for %s: %s", relay, _CERTIFICATE_FAILURES[code])
    elif code in _SERVER_CERTIFICATE_FAILURES:
        log.info("server certificate verification failed for %s: %s", relay, _SERVER_CERTIFICATE_FAILURES[code])
    else:
        log.info("server certificate verification failed for %s: num=%d:%s", relay, code, text)
    raise SiteFailure("4.7.5", NOT_VERIFIED)


def _log_established(session: Session, *, verified: bool) -> None:
    """tls_misc.c's summary of a session (smtp_tls_loglevel 1): `Verified TLS connection established to
    h[ip]:port: TLSv1.3 with cipher … (256/256 bits)` ("Untrusted" when the certificate was not verified), without
    a queue id (a connection may serve several messages)."""
    cipher, _, bits = session.cipher
    session.log.info("%s TLS connection established to %s: %s with cipher %s (%d/%d bits)",
             "Verified" if verified else "Untrusted", session.peer.relay, session.tls_version, cipher, bits, bits)


def _testing(session: Session, policy: TlsPolicy, what: str) -> None:
    """MTA-STS testing mode: what enforce would have refused, logged (RFC 8461 5)."""
    if policy.testing:
        session.log.info("%s: MTA-STS testing: enforce would defer: %s", session.queue_id, what)
