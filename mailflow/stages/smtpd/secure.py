"""STARTTLS and AUTH: the session layer above frontends.FrontEndCommands.

What it owns
- STARTTLS (RFC 3207): offered when the listener has a certificate and TLS is not up yet; refused inside TLS (554
  5.5.1, as Postfix) and inside a mail transaction (503 5.5.1: the handshake would reset it). The handshake
  (`start_tls(context)`, aiosmtpd's way: asyncio's SSL layer put between the socket and the session, which the layer
  then tells of the connection again) also serves a submissions listener, where it comes first (after a PROXY
  header, whose following bytes the layer is given: `_handshake_input`); a handshake that
  fails or that the client abandons ends the session. A STARTTLS read once the client has closed its side gets its
  220 all the same and then ends the session as a handshake the client abandoned (no handshake can follow; Postfix
  answers, then its SSL_accept meets the end of input). The handshake must end within `starttls_timeout` (Postfix's
  smtpd_starttls_timeout), whatever the command `timeout` is: that deadline waits meanwhile, and no reply is
  volunteered into the handshake (`_may_reply`: a timeout's or a stop's 421 would reach the client in plaintext);
  past it the connection is closed without a word, as Postfix does. The TLS line of the log (`log_tls`: "Anonymous
  TLS connection established from host[ip]: TLSv1.3 with cipher ...", "Trusted ..." or "Untrusted ..." with a client
  certificate, which becomes `session.client_cert`: tls.client_cert (trusted as Postfix's OpenSSL would verify it),
  fingerprints by `fingerprint_digest`) with `tls_loglevel` 1 or more (Postfix's smtpd_tls_loglevel; 0 by default,
  as Postfix's), and for a failed handshake, at any level, Postfix's "SSL_accept error from host[ip]: Connection
  timed out" (`lost connection`; `-1` and "warning: TLS library problem: ..."), the STARTTLS then counted as failed.
- AUTH (RFC 4954) PLAIN and LOGIN, with or without an initial response, checked by the listener's
  `auth.Authenticator` (`sasl`; None: AUTH is not enabled; its back end is mailflow's user tables or Dovecot's
  auth server, told whether the session is on TLS and its addresses). Offered and accepted only over TLS unless
  `auth_require_tls` is false (a submissions listener, or allow_plaintext_auth_on_loopback); never offered to
  the clients of `auth_hidden_from` (sasl_exceptions_networks), who may use it all the same, as in Postfix. The
  login becomes `session.auth_data` (`authenticated`), the mechanism `session.auth_mechanism`. Answers read through the
  strict wire reader (`challenge_auth`), each at most SASL_RESPONSE_LIMIT bytes (Postfix's
  smtpd_sasl_response_limit; longer: 500 5.5.6 and the AUTH ends, the session goes on).
- Every AUTH command, before any other check, counts toward the client's AUTH rate (client_auth_rate_limit:
  the listener's anvil, as Postfix's smtpd_client_auth_rate_limit); past it 450 4.7.1, the session goes on.
- The client's new TLS session rate (client_new_tls_session_rate_limit, counted by the listener's anvil as
  Postfix's smtpd_client_new_tls_session_rate_limit: every handshake that resumes no session, failed ones
  too): `tls_session` answers the one past the limit with 421 4.7.0 over the new TLS and ends the session;
  a STARTTLS after it gets 454 4.7.0 and no handshake (the session goes on).
- `check_auth_needed`: with `auth_required` (submission), MAIL, RCPT, DATA, BDAT, VRFY and ETRN need a login
  first (530 5.7.0).
- `_sender_refusal(sender)`: reject_sender_login_mismatch (`sender_logins`: auth.SenderLogins, None: off),
  asked at MAIL before the handler, through `table_run` (TableCache.run: a sqlite table off the event loop).

Failure behaviour: every refusal is a `mailflow.status` reply: AUTH not enabled, or without TLS where TLS is
required, 503 5.5.1 (as Postfix with smtpd_tls_auth_only), before EHLO 503 5.5.1, twice 503 5.5.1, inside a
transaction 503 5.5.1, a milters' refusal that holds for the session as it is (a 4xx: 454 4.3.0, as Postfix;
STARTTLS too), a bad mechanism 504 5.5.4, bad base64 501 5.5.2, `*` 501 5.7.0 (logged as Postfix
logs it), wrong credentials or a malformed PLAIN message 535 5.7.8 (slowed down and logged by the
Authenticator), a user table that cannot answer 454 4.7.0; a sender the login does not own 553 5.7.1, a login
table that cannot answer 451 4.3.0; a sasl_exceptions_networks table that cannot answer, at EHLO 421 4.3.0 and the
end of the session (protocol.UnknownEhloFeature). Past the client's AUTH rate 450 4.7.1; past its new TLS session
rate 421 4.7.0 after the handshake (the session ends), then 454 4.7.0 to STARTTLS.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from asyncio import sslproto
from typing import Awaitable, Callable, TypeVar, cast

from aiosmtpd.smtp import MISSING, TLSSetupException

from mailflow import status
from mailflow.config import DEFAULTS
from mailflow.errors import LookupRetry, detached, tls_failure
from mailflow.logs import SmtpdLog
from mailflow.stages.smtpd.auth import Authenticator, SenderLogins, login_of, plausible_login
from mailflow.stages.smtpd.frontends import FrontEndCommands
from mailflow.stages.smtpd.protocol import UnknownEhloFeature
from mailflow.stages.smtpd.tls import ClientCert, client_cert
from mailflow.tables.networks import NetworkList
from mailflow.syntax import ascii_upper, command_words
from mailflow.stages.smtpd.wire import WireError

log = logging.getLogger("mailflow.smtpd")
T = TypeVar("T")

MECHANISMS = ("PLAIN", "LOGIN")  # offered in this order, as Postfix with Dovecot (auth_mechanisms = plain login)
SASL_RESPONSE_LIMIT = 12288  # bytes of one answer to a 334 challenge, CRLF not counted (smtpd_sasl_response_limit)


def decode_base64(blob: bytes) -> bytes | None:
    """RFC 4648 base64 as Dovecot and Cyrus read it, or None: only the alphabet, padding only at the end and only
    as much as the last quantum needs (Python's decoder takes `YWJj=` and `YWJj==` for `abc`)."""
    data = blob.rstrip(b"=")
    if len(blob) - len(data) != -len(data) % 4:
        return None
    try:
        return base64.b64decode(blob, validate=True)
    except binascii.Error:
        return None


def log_tls_summary(lines: SmtpdLog, client: str, ssl_object: ssl.SSLObject, cert: ClientCert | None) -> None:
    """tls_misc.c's summary of a server handshake done: `Anonymous` (no client certificate), `Trusted` or
    `Untrusted` (one, verified or not) `TLS connection established from client: TLSv1.3 with cipher … (n/n bits)`."""
    name, version, bits = ssl_object.cipher() or ("", "", 0)
    trust = "Anonymous" if cert is None else "Trusted" if cert.trusted else "Untrusted"
    lines.tls_established(client, ssl_object.version() or version, name, bits or 0, trust)


def handshake_failure(error: BaseException) -> tuple[str, str]:
    """Why a server handshake failed, in Postfix's words (tls_server.c): the reason of its `SSL_accept error from
    host[ip]: …` line and, for a TLS protocol error ("-1"), the library's description of it (else "")."""
    return tls_failure(error.__cause__ if isinstance(error, TLSSetupException) and error.__cause__ else error)


class SecureCommands(FrontEndCommands):
    """STARTTLS and AUTH: see the module doc."""

    def __init__(self, handler, *, sasl: Authenticator | None = None, sender_logins: SenderLogins | None = None,
                 auth_required: bool = False, auth_require_tls: bool = True,
                 starttls_timeout: float = DEFAULTS.smtpd.starttls_timeout,
                 tls_loglevel: int = DEFAULTS.smtpd.tls_loglevel,
                 fingerprint_digest: str = DEFAULTS.smtpd.tls_fingerprint_digest,
                 auth_hidden_from: NetworkList | None = None,
                 table_run: Callable[..., Awaitable] | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._auth_hidden_from = auth_hidden_from
        self._table_run = table_run  # TableCache.run: a lookup of a table that may wait (sqlite), off the loop
        self._starttls_timeout = starttls_timeout
        self._tls_loglevel = tls_loglevel
        self._fingerprint_digest = fingerprint_digest
        self._sasl = sasl
        self._sender_logins = sender_logins
        self._login_required = auth_required
        self._auth_needs_tls = auth_require_tls
        self._auth_mechanism = ""

    async def _lookup(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)`, a table lookup, through `table_run` (off the event loop when a table may wait)."""
        return await self._table_run(fn, *args) if self._table_run is not None else fn(*args)

    def _security_keywords(self) -> list[str]:
        keywords = ["STARTTLS"] if self.tls_context and self.session.ssl is None else []
        if self._sasl is not None and (not self._auth_needs_tls or self.session.ssl is not None) \
                and not self._auth_hidden():
            keywords.append("AUTH " + " ".join(MECHANISMS))
        return keywords

    def _auth_hidden(self) -> bool:
        """The client is one of sasl_exceptions_networks (by its address, or its name for a table): AUTH is not
        offered to it, though it may still use it (Postfix's sasl_client_exception). A table of the list that cannot
        answer: UnknownEhloFeature (EHLO gets 421 4.3.0: neither offering AUTH nor hiding it would be right)."""
        hidden = self._auth_hidden_from
        if hidden is None or not hidden:
            return False
        try:
            return hidden.holds(self.session.peer_ip, self.session.client_name)  # (memory tables only: networks.py)
        except LookupRetry as e:
            log.warning("%s: %s", self.session.peer_ip, e.reason)
            raise UnknownEhloFeature("AUTH") from None

    # --- STARTTLS -----------------------------------------------------------------------------------------

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """RFC 3207, refused while a milters' refusal holds for the session (`milters_refusal`, as Postfix), inside
        TLS (554 5.5.1, as Postfix) and inside a mail transaction (503 5.5.1: the handshake would reset it). A
        handshake that fails or that the client abandons ends the session, as does a STARTTLS read after the
        client closed its side (answered all the same, as Postfix answers it; no handshake can follow it)."""
        if arg:
            await self.push(status.syntax("STARTTLS"))
            return
        if await self.refused_by_milters(tls_or_auth=True):
            return
        if self.session.ssl is not None:
            await self.push(status.TLS_ALREADY_ACTIVE)
            return
        if not self.tls_context or "starttls" in self.discarded:  # not offered on this listener, or discarded
            await self.push(status.NOT_IMPLEMENTED)
            return
        if self.envelope.mail_from:
            await self.push(status.TRANSACTION_IN_PROGRESS)
            return
        if self._new_tls_refused("STARTTLS request"):
            await self.push(status.starttls_refused(self.session.client))
            return
        await self.push(status.READY_FOR_TLS)
        if self.wire.ended:  # the client closed its side: no handshake can come (asyncio would wait for it)
            self._handshake_failed(ConnectionResetError())  # as Postfix's SSL_accept meets the end of input
            raise ConnectionResetError("the client left before the TLS handshake")
        await self.tls_session(self.tls_context)

    def _may_reply(self) -> bool:
        """Not during the handshake (STARTTLS answered, TLS not up yet)."""
        return super()._may_reply() and (self._tls_protocol is None or self.session.ssl is not None)

    def _new_tls_refused(self, request: str) -> bool:
        """Before a handshake: the client is past its new TLS session rate (logged then). Here nothing is limited:
        server.ListenerSession asks the listener's anvil."""
        return False

    async def tls_session(self, context: ssl.SSLContext, timeout: float | None = None) -> bool:
        """The handshake (`start_tls`, whose exceptions pass through; `timeout` as there) and its log line, then the
        client's new TLS session rate, as Postfix counts it: every handshake that did not resume a session, a
        failed one too. Past the limit, `421 4.7.0 <host> Error: too many new TLS sessions from host[ip]` over the
        new TLS and the session ends: False."""
        try:
            await self.start_tls(context, timeout)
        except (TLSSetupException, ConnectionError) as error:
            self._handshake_failed(error)
            raise
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        self.session.client_cert = client_cert(ssl_object, self._fingerprint_digest, self.session.client)
        self.log_tls()
        if (ssl_object is not None and ssl_object.session_reused) or not self._rate_exceeded("newtls"):
            self.record.handshake_done()
            return True
        await self._refuse_and_close(status.too_many_new_tls_sessions(self.hostname, self.session.client))
        return False

    def _handshake_failed(self, error: BaseException) -> None:
        """Postfix's `SSL_accept error from host[ip]: …` line; the handshake counts as a new TLS session."""
        self.record.lines.tls_accept_failed(self.session.client, *handshake_failure(error))
        self._rate_exceeded("newtls")  # (logged; no reply can be sent)

    async def start_tls(self, context: ssl.SSLContext, timeout: float | None = None) -> None:
        """The TLS handshake on this connection, as the server, within `timeout` (None: starttls_timeout; the
        command deadline waits meanwhile: its 421 would go in plaintext into the handshake); returns once it is
        done, the session then on the TLS transport (the layer calls `connection_made` with it: a new SMTP
        session, the client's identity kept, the command deadline set again). TLSSetupException when it fails or
        takes too long, ConnectionResetError when the client leaves during it."""
        waiter = self.loop.create_future()
        self._no_deadline()
        limit = self._starttls_timeout if timeout is None else timeout
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, context, waiter, server_side=True,
            ssl_handshake_timeout=limit)  # type: ignore[arg-type]  # (typeshed: int; any number works)
        socket_transport = cast(asyncio.Transport, self.transport)
        self._original_transport = socket_transport
        socket_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(socket_transport)
        _feed(self._tls_protocol, self._handshake_input())
        socket_transport.resume_reading()  # (paused by a submissions listener until its admission)
        try:
            await waiter
        except Exception as error:  # (its traceback held this frame, which held `waiter`, which held it: a cycle
            raise TLSSetupException() from detached(error)  # through the session; asyncio's frames held it too)
        if self.transport is None or self.transport.is_closing():  # asyncio resolves the handshake as done
            raise ConnectionResetError("the client left during the TLS handshake")

    def _handshake_input(self) -> bytes:
        """What was received before the handshake and belongs to it: nothing after STARTTLS (plaintext pipelined
        after it is dropped once TLS is up, RFC 3207); server.ListenerSession hands over a submissions client's
        first TLS bytes that came with its PROXY header."""
        return b""

    def log_tls(self) -> None:
        """The TLS session, logged from tls_loglevel 1 on (tls_misc.c's summary, as smtpd_tls_loglevel 1 writes
        it): `Anonymous TLS connection established from host[ip]: TLSv1.3 with cipher … (256/256 bits)`,
        `Trusted` when the client sent a certificate (`session.client_cert`) that is trusted, else `Untrusted`."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is None or self._tls_loglevel < 1:
            return
        log_tls_summary(self.record.lines, self.session.client, ssl_object, self.session.client_cert)

    # --- AUTH ---------------------------------------------------------------------------------------------

    async def check_auth_needed(self, caller_method: str) -> bool:
        if self._login_required and not (self.session and self.session.authenticated):
            await self.push(status.AUTH_REQUIRED)
            return True
        return False

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH PLAIN and LOGIN (with or without an initial response), checked by the listener's
        Authenticator; the login becomes `session.auth_data`, the mechanism `session.auth_mechanism`. Every AUTH
        command counts toward the client's AUTH rate first, as in Postfix."""
        if await self.refused_for_rate("auth"):
            return
        refusal = self._auth_refusal(arg)
        if refusal is not None:
            await self.push(refusal)
            return
        assert arg is not None and self._sasl is not None
        words = command_words(arg)
        mechanism, initial = words[0], (words[1] if len(words) == 2 else None)  # (logged as written: Postfix)
        self._auth_mechanism = mechanism  # for the log line of an abort
        exchange = self._plain_exchange if ascii_upper(mechanism) == "PLAIN" else self._login_exchange
        credentials = await exchange(initial)
        if credentials is None:
            return  # answered already (aborted, bad base64, malformed)
        authzid, login, password = credentials
        outcome = await self._sasl.check(self.session.peer_ip, mechanism, login, password,
                                         authzid=authzid, client=self.session.client,
                                         secured=self.session.ssl is not None, local_ip=self.session.server_ip)
        if outcome.login is not None:
            self.session.authenticated = True
            self.session.auth_data = outcome.login
            self.session.auth_mechanism = mechanism
        await self.push(outcome.reply)


    def _auth_refusal(self, arg: str | None) -> status.Reply | None:
        if self._sasl is None or (self._auth_needs_tls and self.session.ssl is None) or "auth" in self.discarded:
            return status.AUTH_NOT_ENABLED  # Postfix with smtpd_tls_auth_only has no SASL before TLS
        if not self.session.host_name or not self.session.ehlo_said:  # (an EHLO since TLS began, not a HELO)
            return status.NEED_EHLO
        if self.envelope.mail_from:  # before "already authenticated", as Postfix checks them
            return status.TRANSACTION_IN_PROGRESS
        refusal = self.milters_refusal(tls_or_auth=True)
        if refusal is not None:
            return refusal
        if self.session.authenticated:
            return status.ALREADY_AUTHENTICATED
        words = command_words(arg)
        if not 1 <= len(words) <= 2:
            return status.syntax("AUTH mechanism")
        if ascii_upper(words[0]) not in MECHANISMS:
            return status.AUTH_UNKNOWN_MECHANISM
        return None

    async def _plain_exchange(self, initial: str | None):
        """RFC 4616: (authzid, login, password) from `authzid NUL login NUL password`, or None (answered). A
        message of another shape (`=`, no NUL, an empty login) is wrong credentials with no login, as Dovecot and
        Cyrus answer it behind Postfix: 535, slowed down, counted and logged."""
        blob = await self._auth_response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            return b"", None, b""
        return parts[0], parts[1], parts[2]

    async def _login_exchange(self, initial: str | None):
        """The LOGIN mechanism: the customary `334 VXNlcm5hbWU6` (Username:) and `334 UGFzc3dvcmQ6` (Password:). A
        login that cannot be one (empty, a NUL, white space: `plausible_login`) fails at once, no password asked,
        as Postfix with Dovecot SASL answers it."""
        login = await self._auth_response(initial, "Username:")
        if login is None:
            return None
        if not plausible_login(login.decode("utf-8", "replace")):  # (a name with a NUL is logged (unavailable),
            return b"", None if b"\0" in login else login, b""      # as Postfix logs Dovecot's refusal of it)
        password = await self._auth_response(None, "Password:")
        if password is None:
            return None
        return b"", login, password

    async def _auth_response(self, initial: str | None, prompt: str) -> bytes | None:
        """The client's answer, decoded: the initial response if given (`=` is empty), else the answer to a 334
        `prompt`. None when the client aborted or sent bad base64 (already answered)."""
        if initial is None:
            answer = await self.challenge_auth(prompt)
            return None if answer is MISSING else answer
        if initial == "=":
            return b""
        decoded = decode_base64(initial.encode())
        if decoded is None:
            await self.push(status.AUTH_BAD_BASE64)
        return decoded

    async def challenge_auth(self, challenge, encode_to_b64: bool = True, log_client_response: bool = False):
        """aiosmtpd's AUTH challenge, reading the answer through the strict wire reader."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        try:
            blob = (await self.wire.read_line(SASL_RESPONSE_LIMIT + 2)).strip()
        except WireError as e:
            if e.reply != status.LINE_TOO_LONG:
                raise
            await self.push(status.AUTH_RESPONSE_TOO_LONG)  # the rest of the line was skipped
            return MISSING
        if blob == b"*":
            self.record.lines.auth_aborted(self.session.client, self._auth_mechanism)
            await self.push(status.AUTH_ABORTED)
            return MISSING
        decoded = decode_base64(blob)
        if decoded is None:
            await self.push(status.AUTH_BAD_BASE64)
            return MISSING
        return decoded

    # --- who may send as whom -----------------------------------------------------------------------------

    async def _sender_refusal(self, sender: str) -> status.Reply | None:
        """reject_sender_login_mismatch for MAIL FROM `sender` ("<>": the null sender), or None."""
        if self._sender_logins is None:
            return None
        try:
            return await self._lookup(self._sender_logins.refusal, sender, login_of(self.session))
        except LookupRetry as e:
            log.warning("sender_login_maps: %s", e.reason)
            return status.error_reply(e, sender)


def _feed(protocol: sslproto.SSLProtocol, data: bytes) -> None:
    """`data` given to asyncio's SSL layer as if its socket had just delivered it (a BufferedProtocol's way)."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
