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
- submissions: implicit TLS (the handshake comes first, once the connection is admitted: a client that never
  starts it holds a session slot, so max_sessions and the per-client limits bound such clients too), AUTH
  required before MAIL.
AUTH (PLAIN, LOGIN; the exchange is secure.py's, the check auth.py's) is offered only over TLS, unless
`allow_plaintext_auth_on_loopback` and the client is on loopback. The failure table and the hashing threads
belong to the server: one for all its listeners; so does the connection to Dovecot's auth server when
`sasl_type` is "dovecot" (one per `sasl_path`). With reject_sender_login_mismatch, MAIL FROM an address the
login does not own gets 553 5.7.1 (auth.py). `ListenerSession` adds the admission to the session (session.py):
it gives back its per-client count and its slot however it ends (`_session_ended`).

Trusted front ends (frontends.py): with upstream_proxy_protocol "haproxy" the PROXY header is read
before the admission, so that connection limits, mynetworks and logs see the real client; XCLIENT from
authorized_xclient_hosts.

Transcripts (transcript.py): with a session `observer`, every session records its dialogue for it.

TLS: the certificate is read at start (a missing or unreadable file stops the start, naming it) and again at a
reload (`reconfigure`): new sessions use the new certificate, sessions already running keep theirs.

Reload (`reconfigure(config, handler_for)`, two steps: everything is built and read first, and only a reload
that built completely is put in use): each listener gets its new settings, handler (restrictions and tables),
AUTH and sender-login tables, certificate and session limit (max_sessions: a lowered one cuts no session, new
connections wait until enough end); its address, sockets, session slots and per-client counts stay.
New sessions use all of it; a running session goes on, to its end, with what it started with (as a Postfix
smtpd process finishes its client under the old main.cf), so nothing per session (a milter conversation, the
handler's state) ever changes hands. The replaced handlers' kept policy service connections are closed (a
running session that asks again uses a connection of its own for it).

Stop (`stop(grace)`): the listeners close; sessions between transactions get 421 4.3.2 and are closed; a
session in a transaction may finish it within the grace period; then the kept policy connections are closed.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from typing import Callable

from aiosmtpd.smtp import TLSSetupException

from mailflow import status
from mailflow.address import in_networks
from mailflow.clock import Clock, SystemClock
from mailflow.config import Config, SmtpdConfig
from mailflow.stages.smtpd.anvil import Anvil, SessionSlots
from mailflow.stages.smtpd.auth import (Authenticator, Backend, DovecotBackend, FailureCounter, PasswordHasher,
                                        SenderLogins, TableBackend, is_loopback)
from mailflow.stages.smtpd.dovecot_auth import DovecotAuth
from mailflow.stages.smtpd.frontends import FrontEnds
from mailflow.stages.smtpd.handler import SmtpdHandler
from mailflow.stages.smtpd.session import ProtocolLimits, SmtpSession
from mailflow.stages.smtpd.tls import ServerTls
from mailflow.stages.smtpd.transcript import SessionObserver
from mailflow.syntax import parse_hostport
from mailflow.tables import TableCache

log = logging.getLogger("mailflow.smtpd")

AUTH_HASH_WORKERS = 2  # scrypt threads: an AUTH flood uses at most this many cores
STOP_POLL = 0.05  # seconds between looks at the sessions of a stopping server
# What a reload replaces in a running listener (its address, sockets, session slots and counts stay).
RELOADED = ("config", "handler", "authenticator", "sender_logins", "frontends", "limits")


@dataclass
class Listener:
    """One listening address with its role, effective settings, handler and limits."""

    host: str
    port: int
    role: str
    config: Config  # the whole config with `smtpd` replaced by this listener's effective settings
    handler: SmtpdHandler
    anvil: Anvil
    slots: SessionSlots
    authenticator: Authenticator | None
    sender_logins: SenderLogins | None
    frontends: FrontEnds
    limits: ProtocolLimits  # of every session of this listener: made once, not at each connection
    server: asyncio.base_events.Server | None = None

    @property
    def smtpd(self) -> SmtpdConfig:
        return self.config.smtpd


class ListenerSession(SmtpSession):
    """A session of one listener: the admission (connection limits and the session cap) before the greeting,
    TLS from the first byte on a submissions listener, plaintext AUTH on loopback when allowed."""

    def __init__(self, handler, *, listener: Listener, implicit_tls: ssl.SSLContext | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._listener = listener
        self._implicit_tls = implicit_tls  # a submissions listener's certificate: TLS from the first byte
        self._admitted_ip: str | None = None
        self._has_slot = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connecting = self.transport is None
        super().connection_made(transport)
        if connecting and self._implicit_tls is not None:
            transport.pause_reading()  # type: ignore[attr-defined]  # the handshake waits for the admission

    async def _before_greeting(self) -> bool:
        """After the PROXY header (if any: the limits apply to the real client it names), the admission."""
        if not await super()._before_greeting():
            return False
        ip = self.session.peer_ip
        anvil = self._listener.anvil
        refusal = anvil.admit(ip)
        if refusal is not None:
            rate = refusal == status.connection_rate_exceeded(ip)
            self.record.lines.limit_exceeded("Connection rate" if rate else "Connection concurrency",
                                             anvil.rate(ip) if rate else anvil.sessions(ip) + 1,
                                             self.session.client,
                                             "smtp" if self._listener.role == "mta" else self._listener.role)
            await self._refuse_and_close(refusal)
            return False
        self._admitted_ip = ip
        if not await self._listener.slots.acquire():
            log.warning("%s: refused: %d sessions and as many waiting", self.session.client,
                        self._listener.smtpd.max_sessions)
            await self._refuse_and_close(status.SERVER_BUSY)
            return False
        self._has_slot = True
        if self._implicit_tls is not None:
            try:
                await self.start_tls(self._implicit_tls)
            except (TLSSetupException, ConnectionError):
                self._close()
                return False
            self.log_tls()
        if self._listener.smtpd.allow_plaintext_auth_on_loopback and is_loopback(ip):
            self._auth_needs_tls = False
        return True

    def _session_ended(self) -> None:
        """Give back the per-client count and the session slot, whatever ended the session."""
        if self._admitted_ip is not None:
            self._listener.anvil.release(self._admitted_ip)
            self._admitted_ip = None
        if self._has_slot:
            self._listener.slots.release()
            self._has_slot = False
        super()._session_ended()


class Smtpd:
    """The listeners. `await start()`, `addresses`, `reconfigure(config, handler_for)` (a reload),
    `handlers_in_use()`, `await stop(grace)`."""

    def __init__(self, config: Config, handler_for: Callable[[Config], SmtpdHandler], *, clock: Clock | None = None,
                 observer: SessionObserver | None = None):
        """`handler_for(config)` builds the handler of one listener from its effective config; `observer` (None:
        no transcripts) gets every session's transcript (transcript.py)."""
        self._config = config
        self._observer = observer
        self._handler_for = handler_for
        self._clock = clock or SystemClock()
        self._tables = TableCache()
        self._tls: dict[tuple[str, str], ServerTls] = {}
        # AUTH state of the whole server, whichever listener a client uses: failures per client IP, and the
        # threads that compute password hashes (AUTH_HASH_WORKERS of them, created on first use).
        self.auth_failures = FailureCounter(self._clock, config.smtpd.anvil_rate_time_unit)
        self._hasher: PasswordHasher | None = None
        self._dovecots: dict[str, DovecotAuth] = {}  # sasl_type "dovecot": one connection per auth socket
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
            authenticator = Authenticator(backend=self._auth_backend(smtpd), clock=self._clock,
                                          failures=self.auth_failures, delay=smtpd.auth_failure_delay,
                                          delay_limit=smtpd.auth_failure_delay_limit)
        sender_logins = None
        if smtpd.reject_sender_login_mismatch:
            sender_logins = SenderLogins(self._tables.open(smtpd.sender_login_maps),
                                         delimiter=self._config.recipient_delimiter)
        if smtpd.tls_cert_file:
            self._server_tls(smtpd)  # read now: a bad file stops the start
        return Listener(host, port, role, config, self._handler_for(config), anvil, SessionSlots(smtpd.max_sessions),
                        authenticator, sender_logins, FrontEnds.from_config(smtpd), ProtocolLimits.from_config(smtpd))

    def _auth_backend(self, smtpd: SmtpdConfig) -> Backend:
        """Who checks a listener's AUTH passwords: Dovecot's auth server (one connection per socket, shared by
        the listeners naming it) or the user tables (with the server's hashing threads)."""
        if smtpd.sasl_type == "dovecot":
            if smtpd.sasl_path not in self._dovecots:
                self._dovecots[smtpd.sasl_path] = DovecotAuth(smtpd.sasl_path, timeout=smtpd.sasl_timeout,
                                                              clock=self._clock)
            return DovecotBackend(self._dovecots[smtpd.sasl_path])
        if self._hasher is None:
            self._hasher = PasswordHasher(AUTH_HASH_WORKERS)
        return TableBackend(self._tables.open(smtpd.sasl_user_maps), self._hasher, run=self._tables.run)

    def _server_tls(self, smtpd: SmtpdConfig) -> ServerTls:
        """The certificate of these settings, read once per (cert, key) pair. Raises TlsError."""
        key = (smtpd.tls_cert_file, smtpd.tls_key_file)
        if key not in self._tls:
            self._tls[key] = ServerTls(*key)
        return self._tls[key]

    def _session(self, listener: Listener) -> SmtpSession:
        c, smtpd = listener.config, listener.smtpd
        tls = self._server_tls(smtpd) if smtpd.tls_cert_file else None
        implicit = listener.role == "submissions"
        starttls = tls is not None and not implicit and smtpd.tls_security_level != "none"
        return ListenerSession(
            listener.handler,
            listener=listener,
            implicit_tls=tls.context if tls is not None and implicit else None,
            sessions=self.sessions,
            protocol=listener.limits,
            frontends=listener.frontends,
            hostname=c.myhostname,
            ident=smtpd.banner,
            data_size_limit=smtpd.message_size_limit or None,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=smtpd.timeout,
            tls_context=tls.context if tls is not None and starttls else None,
            require_starttls=starttls and smtpd.tls_security_level == "encrypt",
            sasl=listener.authenticator,
            sender_logins=listener.sender_logins,
            auth_required=smtpd.sasl_auth_required,
            auth_require_tls=listener.role != "submissions",  # there the whole connection is TLS
            observer=self._observer,
        )

    # -------------------------------------------------------------------------------- running

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.listeners = [self._build_listener(*spec) for spec in self._listener_specs()]
        await self._tables.preload()  # the user and sender-login tables, read off the event loop
        for listener in self.listeners:
            listener.server = await loop.create_server(functools.partial(self._session, listener), listener.host,
                                                       listener.port)

    def reconfigure(self, config: Config, handler_for: Callable[[Config], SmtpdHandler]) -> Callable[[], None]:
        """A reload: the listeners' settings, handlers, AUTH and sender-login tables and certificates, built from
        `config` as a start would build them (the files read now), but not yet in use. Raises ConfigError (a
        TlsError for a certificate) and changes nothing then. The function returned puts them in use for new
        sessions; a running session keeps what it started with, to its end (Postfix: an smtpd process serves
        its client under the configuration it started with). Addresses and roles stay as they are (the caller
        passes a config that keeps them: mailflow.config.in_force)."""
        fresh = Smtpd(config, handler_for, clock=self._clock, observer=self._observer)
        fresh.auth_failures, fresh._hasher = self.auth_failures, self._hasher  # the server's, whatever the config
        built = [fresh._build_listener(*spec) for spec in fresh._listener_specs()]

        def commit() -> None:
            self._config, self._handler_for, self._tables, self._tls = config, handler_for, fresh._tables, fresh._tls
            self._hasher = fresh._hasher
            for listener, new in zip(self.listeners, built):
                listener.handler.restrictions.close()  # its kept policy connections (its sessions may go on)
                for name in RELOADED:
                    setattr(listener, name, getattr(new, name))
                listener.anvil.adopt_limits(new.anvil)
                listener.slots.resize(new.smtpd.max_sessions)

        return commit

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [li.server.sockets[0].getsockname()[:2] for li in self.listeners if li.server and li.server.sockets]

    def address_of(self, role: str) -> tuple[str, int]:
        """The first listening address of a role (tests, logs)."""
        for li in self.listeners:
            if li.role == role and li.server and li.server.sockets:
                return li.server.sockets[0].getsockname()[:2]
        raise LookupError(f"no {role} listener")

    def handlers_in_use(self) -> list[SmtpdHandler]:
        """The handlers of the listeners and of the open sessions (a session keeps its own over a reload), once
        each."""
        handlers = {id(h): h for h in [li.handler for li in self.listeners] + [s.event_handler for s in self.sessions]}
        return list(handlers.values())

    @property
    def _submitting(self) -> int:
        """Messages being committed, by every handler in use."""
        return sum(h.submitting for h in self.handlers_in_use())

    async def stop(self, grace: float = 10.0) -> None:
        """Drain: close the listeners; a session between transactions gets `421 4.3.2 … shutting down` and is
        closed, one in a transaction may finish it (up to its 250) within `grace`, and is closed after it; at
        the end of `grace` whatever is left is cut (a message being committed is waited for first, within
        `grace` too).

        A session cut mid-DATA loses nothing: its client got no 250 and will send the message again.
        """
        loop = asyncio.get_running_loop()
        servers = [li.server for li in self.listeners if li.server]
        for server in servers:
            server.close()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            for session in list(self.sessions):
                session.shut_down()  # (one in a transaction: once it ends)
            if not self.sessions and not self._submitting:
                break
            await asyncio.sleep(min(STOP_POLL, max(0.0, deadline - loop.time())))
        for session in list(self.sessions):
            session.hang_up()
        for server in servers:
            await server.wait_closed()
        for li in self.listeners:
            li.server = None
            li.handler.restrictions.close()
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None
        for dovecot in self._dovecots.values():
            await dovecot.close()
        self._dovecots.clear()
