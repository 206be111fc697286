"""smtpd's listeners: start them on the running loop (never aiosmtpd's threaded Controller) and stop them
gracefully: close the listeners, let messages being committed finish within a grace period, then close what
is left. A session cut mid-DATA loses nothing: its client got no 250 and sends the message again.

Listeners come from `smtpd.listen` (role mta) and `[[smtpd.listeners]]` (role mta, submission or
submissions, each with overrides of [smtpd] settings like master.cf `-o`). Each listener has its own effective
SmtpdConfig, its own handler (built by `handler_for(config)` with that config), its own connection limits
(anvil.py) and its own AUTH checker (auth.py). The roles:
- mta: STARTTLS offered when a certificate is configured (required with tls_security_level "encrypt");
  AUTH only when sasl_auth_enable, and only after STARTTLS.
- submission: STARTTLS required before anything but EHLO/NOOP/QUIT (530 5.7.0), AUTH required before MAIL
  (530 5.7.0).
- submissions: implicit TLS (the handshake comes first), AUTH required before MAIL.
AUTH (PLAIN, LOGIN; the exchange is ListenerSession's, the check auth.py's) is offered only over TLS, unless
`allow_plaintext_auth_on_loopback` and the client is on loopback. The failure table and the hashing threads
belong to the server: one for all its listeners. With reject_sender_login_mismatch, MAIL FROM an address the
login does not own gets 553 5.7.1 (auth.py). A session gives back its per-client count and its slot however
it ends (`_session_ended`).

Trusted front ends (session.py, frontends.py): with upstream_proxy_protocol "haproxy" the PROXY header is read
before the admission, so that connection limits, mynetworks and logs see the real client; XCLIENT from
authorized_xclient_hosts.

TLS: the certificate is read at start (a missing or unreadable file stops the start, naming it) and again by
`reload_tls()` (SIGHUP): new sessions use the new certificate, sessions already running keep theirs.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable

from aiosmtpd.smtp import MISSING

from mailflow import status
from mailflow.address import in_networks
from mailflow.clock import Clock, SystemClock
from mailflow.config import Config, SmtpdConfig
from mailflow.errors import LookupRetry
from mailflow.stages.smtpd.anvil import Anvil, SessionSlots
from mailflow.stages.smtpd.auth import (Authenticator, FailureCounter, PasswordHasher, SenderLogins, is_loopback,
                                        login_of)
from mailflow.stages.smtpd.session import FrontEnds, ProtocolLimits, SmtpSession
from mailflow.stages.smtpd.tls import ServerTls
from mailflow.syntax import parse_hostport
from mailflow.tables import TableCache

log = logging.getLogger("mailflow.smtpd")

AUTH_HASH_WORKERS = 2  # scrypt threads: an AUTH flood uses at most this many cores


@dataclass
class Listener:
    """One listening address with its role, effective settings, handler and limits."""

    host: str
    port: int
    role: str
    config: Config  # the whole config with `smtpd` replaced by this listener's effective settings
    handler: object
    anvil: Anvil
    slots: SessionSlots
    authenticator: Authenticator | None
    sender_logins: SenderLogins | None
    frontends: FrontEnds
    server: asyncio.base_events.Server | None = None

    @property
    def smtpd(self) -> SmtpdConfig:
        return self.config.smtpd


class ListenerSession(SmtpSession):
    """A session of one listener: admission (connection limits), AUTH over TLS, sender-login ownership."""

    def __init__(self, handler, *, listener: Listener, **kwargs):
        super().__init__(handler, **kwargs)
        self._listener = listener
        self._admitted_ip: str | None = None
        self._has_slot = False
        if listener.role == "submissions":  # the whole connection is TLS (aiosmtpd only knows STARTTLS)
            self._auth_require_tls = False

    # -------------------------------------------------------------------------------- admission

    async def _before_greeting(self) -> bool:
        """After the PROXY header (if any: the limits apply to the real client it names), the admission."""
        if not await super()._before_greeting():
            return False
        ip = _peer_ip(self.session.peer if self.session else None)
        anvil = self._listener.anvil
        refusal = anvil.admit(ip)
        if refusal is not None:
            rate = refusal == status.connection_rate_exceeded(ip)
            self._log.limit_exceeded("Connection rate" if rate else "Connection concurrency",
                                     anvil.rate(ip) if rate else anvil.sessions(ip) + 1, self._client_name(),
                                     "smtp" if self._listener.role == "mta" else self._listener.role)
            await self._refuse(refusal)
            return False
        self._admitted_ip = ip
        if not await self._listener.slots.acquire():
            log.warning("%s: refused: %d sessions and as many waiting", self._client_name(),
                        self._listener.smtpd.max_sessions)
            await self._refuse(status.SERVER_BUSY)
            return False
        self._has_slot = True
        if self._listener.role == "submissions" and self.transport is not None:
            self.session.ssl = {"ssl_object": self.transport.get_extra_info("ssl_object"),
                                "cipher": self.transport.get_extra_info("cipher")}
            self.log_tls()
        if self._listener.smtpd.allow_plaintext_auth_on_loopback and is_loopback(ip):
            self._auth_require_tls = False
        return True

    async def _refuse(self, reply: status.Reply) -> None:
        self._server_hung_up = True
        await self.push(str(reply))
        if self.transport is not None:
            self.transport.close()

    def _session_ended(self) -> None:
        """Give back the per-client count and the session slot, whatever ended the session."""
        if self._admitted_ip is not None:
            self._listener.anvil.release(self._admitted_ip)
            self._admitted_ip = None
        if self._has_slot:
            self._listener.slots.release()
            self._has_slot = False
        super()._session_ended()

    # -------------------------------------------------------------------------------- AUTH

    @property
    def _auth_enabled(self) -> bool:
        return self._listener.authenticator is not None

    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH PLAIN and LOGIN (with or without an initial response), checked by the listener's
        Authenticator; the login becomes `session.auth_data`, the mechanism `session.auth_mechanism`."""
        refusal = self._auth_refusal(arg)
        if refusal is not None:
            await self.push(refusal)
            return
        words = arg.split()
        mechanism, initial = words[0].upper(), (words[1] if len(words) == 2 else None)
        exchange = self._plain_exchange if mechanism == "PLAIN" else self._login_exchange
        credentials = await exchange(initial)
        if credentials is None:
            return  # answered already (aborted, bad base64, malformed)
        authzid, login, password = credentials
        outcome = await self._listener.authenticator.check(self._peer_ip(), mechanism, login, password,
                                                           authzid=authzid, client=self._client_name())
        if outcome.login is not None:
            self.session.authenticated = True
            self.session.auth_data = outcome.login
            self.session.auth_mechanism = mechanism
        await self.push(outcome.reply)

    def _auth_refusal(self, arg: str | None) -> status.Reply | None:
        if not self._auth_enabled:
            return status.AUTH_NOT_ENABLED
        if not self.session.host_name or not self.session.extended_smtp:
            return status.NEED_EHLO
        if self._auth_require_tls and not self._tls_protocol:
            return status.AUTH_ENCRYPTION_REQUIRED
        if self.session.authenticated:
            return status.ALREADY_AUTHENTICATED
        if self.envelope.mail_from:
            return status.TRANSACTION_IN_PROGRESS
        words = (arg or "").split()
        if not 1 <= len(words) <= 2:
            return status.syntax("AUTH mechanism")
        if words[0].upper() not in ("PLAIN", "LOGIN"):
            return status.AUTH_UNKNOWN_MECHANISM
        return None

    async def _plain_exchange(self, initial: str | None):
        """RFC 4616: (authzid, login, password) from `authzid NUL login NUL password`, or None (answered)."""
        blob = await self._auth_response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            await self.push(status.AUTH_MALFORMED)
            return None
        return parts[0], parts[1], parts[2]

    async def _login_exchange(self, initial: str | None):
        """The LOGIN mechanism: the customary `334 VXNlcm5hbWU6` (Username:) and `334 UGFzc3dvcmQ6` (Password:)."""
        login = await self._auth_response(initial, "Username:")
        if login is None:
            return None
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
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.push(status.AUTH_BAD_BASE64)
            return None

    # -------------------------------------------------------------------------------- hooks

    async def check_auth_needed(self, caller_method: str) -> bool:
        if self._auth_required and not (self.session and self.session.authenticated):
            await self.push(str(status.AUTH_REQUIRED))
            return True
        return False

    async def _call_handler_hook(self, command: str, *args):
        if command == "EHLO" and not self._auth_enabled and len(args) == 2:
            hostname, responses = args
            args = (hostname, [r for r in responses if not r[4:].startswith("AUTH")])
        if command == "MAIL" and self._listener.sender_logins is not None:
            refusal = self._sender_refusal(args[0])
            if refusal is not None:
                self.log_reject("MAIL", refusal, sender=args[0])
                return str(refusal)
        return await super()._call_handler_hook(command, *args)

    def _sender_refusal(self, sender: str) -> status.Reply | None:
        try:
            if self._listener.sender_logins.sender_login_mismatch(self.session, sender):
                return status.sender_login_mismatch(sender, login_of(self.session))
        except LookupRetry as e:
            log.warning("sender_login_maps: %s", e.text)
            return status.lookup_failed(sender)
        return None


def _peer_ip(peer) -> str:
    try:
        return str(peer[0])
    except (TypeError, IndexError):
        return "unknown"


class Smtpd:
    """The listeners. `await start()`, `addresses`, `reload_tls()`, `await stop(grace)`."""

    def __init__(self, config: Config, handler_for: Callable[[Config], object], *, clock: Clock | None = None):
        """`handler_for(config)` builds the handler of one listener from its effective config."""
        self._config = config
        self._handler_for = handler_for
        self._clock = clock or SystemClock()
        self._tables = TableCache()
        self._tls: dict[tuple[str, str], ServerTls] = {}
        # AUTH state of the whole server, whichever listener a client uses: failures per client IP, and the
        # threads that compute password hashes (AUTH_HASH_WORKERS of them, created on first use).
        self.auth_failures = FailureCounter(self._clock, config.smtpd.anvil_rate_time_unit)
        self._hasher: PasswordHasher | None = None
        self.listeners: list[Listener] = []
        self.sessions: set[SmtpSession] = set()

    # -------------------------------------------------------------------------------- building

    def _listener_specs(self) -> list[tuple[str, str, SmtpdConfig]]:
        smtpd = self._config.smtpd
        specs = [(item, "mta", smtpd) for item in smtpd.listen]
        specs += [(spec.address, spec.role, smtpd.for_listener(spec)) for spec in smtpd.listeners]
        return specs

    def _build_listener(self, address: str, role: str, smtpd: SmtpdConfig) -> Listener:
        host, port = parse_hostport(address)
        config = self._config if smtpd is self._config.smtpd else self._config.model_copy(update={"smtpd": smtpd})
        networks = [ipaddress.ip_network(n, strict=False) for n in self._config.mynetworks]
        anvil = Anvil(count_limit=smtpd.client_connection_count_limit, rate_limit=smtpd.client_connection_rate_limit,
                      time_unit=smtpd.anvil_rate_time_unit, clock=self._clock,
                      exempt=lambda ip: in_networks(ip, networks))
        authenticator = None
        if smtpd.sasl_auth_enable:
            if self._hasher is None:
                self._hasher = PasswordHasher(AUTH_HASH_WORKERS)
            authenticator = Authenticator(self._tables.open(smtpd.sasl_user_maps), clock=self._clock,
                                          failures=self.auth_failures, hasher=self._hasher,
                                          delay=smtpd.auth_failure_delay, delay_limit=smtpd.auth_failure_delay_limit)
        sender_logins = None
        if smtpd.reject_sender_login_mismatch:
            sender_logins = SenderLogins(self._tables.open(smtpd.sender_login_maps),
                                         delimiter=self._config.recipient_delimiter)
        if smtpd.tls_cert_file:
            self._server_tls(smtpd)  # read now: a bad file stops the start
        return Listener(host, port, role, config, self._handler_for(config), anvil, SessionSlots(smtpd.max_sessions),
                        authenticator, sender_logins, FrontEnds.from_config(smtpd))

    def _server_tls(self, smtpd: SmtpdConfig) -> ServerTls:
        """The certificate of these settings, read once per (cert, key) pair. Raises TlsError."""
        key = (smtpd.tls_cert_file, smtpd.tls_key_file)
        if key not in self._tls:
            self._tls[key] = ServerTls(*key)
        return self._tls[key]

    def _session(self, listener: Listener) -> SmtpSession:
        c, smtpd = listener.config, listener.smtpd
        tls = self._server_tls(smtpd) if smtpd.tls_cert_file else None
        starttls = tls is not None and listener.role != "submissions" and smtpd.tls_security_level != "none"
        return ListenerSession(
            listener.handler,
            listener=listener,
            sessions=self.sessions,
            protocol=ProtocolLimits.from_config(smtpd),
            frontends=listener.frontends,
            hostname=c.myhostname,
            ident=smtpd.banner,
            data_size_limit=smtpd.message_size_limit or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=smtpd.timeout,
            tls_context=tls.context if starttls else None,
            require_starttls=starttls and smtpd.tls_security_level == "encrypt",
            auth_required=smtpd.sasl_auth_required,
            auth_require_tls=True,
        )

    # -------------------------------------------------------------------------------- running

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.listeners = [self._build_listener(*spec) for spec in self._listener_specs()]
        for listener in self.listeners:
            ssl = self._server_tls(listener.smtpd).listener_context() if listener.role == "submissions" else None
            listener.server = await loop.create_server(lambda li=listener: self._session(li), listener.host,
                                                       listener.port, ssl=ssl)

    def reload_tls(self) -> None:
        """Re-read every certificate and key (SIGHUP). New sessions use them; running sessions keep theirs.
        A file that cannot be read is logged and the old certificate stays in use."""
        for tls in self._tls.values():
            try:
                tls.reload()
                log.info("TLS certificate %s reloaded", tls.cert_file)
            except Exception as e:
                log.error("TLS reload failed, keeping the previous certificate: %s", e)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [li.server.sockets[0].getsockname()[:2] for li in self.listeners if li.server and li.server.sockets]

    def address_of(self, role: str) -> tuple[str, int]:
        """The first listening address of a role (tests, logs)."""
        for li in self.listeners:
            if li.role == role and li.server and li.server.sockets:
                return li.server.sockets[0].getsockname()[:2]
        raise LookupError(f"no {role} listener")

    @property
    def _submitting(self) -> int:
        return sum(getattr(li.handler, "submitting", 0) for li in self.listeners)

    async def stop(self, grace: float = 10.0) -> None:
        """Close the listeners, wait (within `grace`) for messages being committed, close every session.

        A session cut mid-DATA loses nothing: its client got no 250 and will send the message again.
        """
        loop = asyncio.get_running_loop()
        servers = [li.server for li in self.listeners if li.server]
        for server in servers:
            server.close()
        deadline = loop.time() + grace
        while self._submitting and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            session.hang_up()
        for server in servers:
            await server.wait_closed()
        for li in self.listeners:
            li.server = None
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None
