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
  starts it holds a session slot, for starttls_timeout at most, so max_sessions and the per-client limits bound
  such clients too; nothing is written to it before its handshake is done). The admission's refusal (421: the
  per-client limits, the sessions and their waiting places all taken) comes after a handshake too, over TLS, as
  Postfix's wrapper mode completes the handshake before its anvil check: logged once the handshake is done, as
  Postfix logs it then. Such handshakes are bounded apart from the sessions: each by starttls_timeout or
  REFUSAL_HANDSHAKE_TIMEOUT, whichever is shorter, and at most REFUSAL_HANDSHAKES at once per listener; beyond
  them (or when the handshake fails) the connection is closed without a word; and they hold no per-client count
  (a connection refused for want of a slot gives its count back first). AUTH required before MAIL.
AUTH (PLAIN, LOGIN; the exchange is secure.py's, the check auth.py's) is offered only over TLS, unless
`allow_plaintext_auth_on_loopback` and the client is on loopback. The failure table and the hashing threads
belong to the server: one for all its listeners and every reload; so does the connection to Dovecot's auth
server when `sasl_type` is "dovecot" (one per `sasl_path`, closed at the stop). With reject_sender_login_mismatch,
MAIL FROM an address the login does not own gets 553 5.7.1 (auth.py). `ListenerSession` adds the admission to the
session (session.py): it gives back its per-client count and its slot however it ends (`_session_ended`). It also
counts the session's per-client events (MAIL: client_message_rate_limit; RCPT and VRFY:
client_recipient_rate_limit; AUTH: client_auth_rate_limit; TLS handshakes: client_new_tls_session_rate_limit) in
its listener's anvil, with the limits it started with.

Trusted front ends (frontends.py): with upstream_proxy_protocol "haproxy" the PROXY header is read
before the admission, so that connection limits, mynetworks and logs see the real client; XCLIENT from
authorized_xclient_hosts. On a submissions listener the header comes in clear before the handshake (465 behind
a balancer that does not terminate TLS, as Postfix's wrapper mode reads it): the connection is read for it,
then not again until the admission; what came after it in the same reads (the ClientHello) is handed to the
TLS layer (`_handshake_input`), and a bad header gets the plain listeners' 421, in clear, before any handshake.

Transcripts (transcript.py): with a session `observer`, every session records its dialogue for it.

TLS: the certificate is read at start (a missing or unreadable file stops the start, naming it) and again at a
reload (`reconfigure`): new sessions use the new certificate, sessions already running keep theirs.

Reload (`await reconfigure(config, handler_for)`, two steps: everything is built and read first, new addresses
bound and listening, and only a reload that built completely is put in use, as Postfix's master applies master.cf
at `postfix reload`): a listener is identified by its configured address (host:port, as master.cf names a
service by its endpoint). One that stays keeps its socket (no connection waiting in the kernel's queue is
lost), session slots and per-client counts, and gets its new role, settings, handler (restrictions and tables),
AUTH and sender-login tables, certificate and limits (a lowered max_sessions cuts no session: new connections
wait until enough end). An address added is listened on; one that cannot be bound refuses the whole reload
(ConfigError naming its key: `smtpd.listeners[1].address: cannot listen on 127.0.0.1:587: Address already in
use`), the listeners bound for it closed again. An address removed stops listening; its open sessions go on.
New sessions use the new listeners; a running session goes on, to its end, with what it started with (its
role too, as a Postfix smtpd process finishes its client under the old main.cf and master.cf), so nothing per
session (a milter conversation, the handler's state) ever changes hands, and it counts against the limits of
the listener it came in by. The replaced handlers' kept policy service connections are closed (a running
session that asks again uses a connection of its own for it).

Stop (`stop(grace)`): the listeners close; sessions between transactions get 421 4.3.2 and are closed; a
session in a transaction may finish it within the grace period; then the sockets still sending the replies of
ended sessions are dropped and the kept policy connections are closed.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiosmtpd.smtp import TLSSetupException

from mailflow import status
from mailflow.clock import Clock, SystemClock
from mailflow.config import Config, SmtpdConfig
from mailflow.errors import ConfigError, os_reason
from mailflow.listening import Listening, listen
from mailflow.logs import SmtpdLog
from mailflow.stages.smtpd.anvil import EVENT_LIMITS, Anvil, Places, SessionSlots
from mailflow.stages.smtpd.auth import (Authenticator, Backend, DovecotBackend, FailureCounter, PasswordHasher,
                                        SenderLogins, TableBackend, is_loopback)
from mailflow.stages.smtpd.dovecot_auth import DovecotAuth
from mailflow.stages.smtpd.frontends import FrontEnds
from mailflow.stages.smtpd.handler import SmtpdHandler
from mailflow.stages.smtpd.ehlo_discards import EhloDiscards
from mailflow.stages.smtpd.protocol import Lingering
from mailflow.stages.smtpd.postscreen import Client, EngineTraits, PassCache, Postscreen, Verdict
from mailflow.stages.smtpd.secure import handshake_failure, log_tls_summary
from mailflow.stages.smtpd.session import ProtocolLimits, SmtpSession
from mailflow.stages.smtpd.tls import ServerTls, client_cert
from mailflow.stages.smtpd.transcript import SessionObserver
from mailflow.syntax import parse_hostport
from mailflow.tables import Table, TableCache
from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.smtpd")

AUTH_HASH_WORKERS = 2  # scrypt threads: an AUTH flood uses at most this many cores
STOP_POLL = 0.05  # seconds between looks at the sessions of a stopping server
CUT_TURNS = 5  # turns of the loop a stop gives the sessions it cut to be gone (an abort's connection_lost: 1, TLS: 2)
# Implicit-TLS connections being refused that may be in their TLS handshake at once, per listener (the refusal goes
# over TLS; beyond this, such a connection is closed without a word)
REFUSAL_HANDSHAKES = 10
REFUSAL_HANDSHAKE_TIMEOUT = 10.0  # seconds, at most, for each of those handshakes (else starttls_timeout's 300)
# What a reload replaces in a running listener (its address, socket, session slots and counts stay).
RELOADED = ("role", "config", "handler", "authenticator", "sender_logins", "frontends", "limits",
            "auth_hidden_from", "ehlo_discards", "bare_newline_exempt", "postscreen", "command_filter",
            "command_filter_run")


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
    auth_hidden_from: NetworkList  # sasl_exceptions_networks: the clients AUTH is not offered to
    ehlo_discards: EhloDiscards  # the EHLO keywords each session discards (by its client's address)
    # forbid_bare_newline_exclusions (unset: mynetworks): the clients whose bare LF ends a line (None: no one)
    bare_newline_exempt: NetworkList | None = None
    postscreen: Postscreen | None = None  # [smtpd.postscreen] enabled: the screen before smtpd (postscreen.py)
    setting: str = ""  # the configuration key that names it ("smtpd.listen[0]", "smtpd.listeners[1].address")
    command_filter: list[Table] = field(default_factory=list)  # smtpd_command_filter (empty: unset)
    command_filter_run: Callable[..., Awaitable] | None = None  # its TableCache.run (a table may wait: off the loop)
    server: Listening | None = None
    refusing: Places = field(default_factory=lambda: Places(REFUSAL_HANDSHAKES))  # (implicit TLS: see REFUSAL_...)

    @property
    def smtpd(self) -> SmtpdConfig:
        return self.config.smtpd


class ListenerSession(SmtpSession):
    """A session of one listener: the admission (connection limits and the session cap) before the greeting,
    TLS from the first byte on a submissions listener, plaintext AUTH on loopback when allowed."""

    def __init__(self, handler, *, listener: Listener, implicit_tls: ssl.SSLContext | None = None,
                 certificate: ssl.SSLContext | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._certificate = certificate  # the listener's TLS context, for postscreen's STARTTLS too
        self._listener = listener  # its admission (anvil, slots) stays across reloads
        # what a reload may change on the listener, as this session started with it (it keeps that to its end)
        self._role, self._smtpd = listener.role, listener.smtpd
        self.command_filter, self.command_filter_run = listener.command_filter, listener.command_filter_run
        self._postscreen = listener.postscreen
        self._bare_newline_exempt = listener.bare_newline_exempt  # (XCLIENT judges its client on it too)
        self._implicit_tls = implicit_tls  # a submissions listener's certificate: TLS from the first byte
        self._admitted_ip: str | None = None
        self._has_slot = False

    async def _screen(self) -> bool:
        """The listener's postscreen (as it was when the session started), if any, after the PROXY header; smtpd's
        command deadline is off meanwhile and starts again at the hand-over."""
        screen = self._postscreen
        if screen is None:
            return True
        s = self.session
        client = Client(s.peer_ip, str(s.peer_port), s.server_ip or "", str(s.server_port or 0))
        self._no_deadline()  # the screen keeps its own: the greet wait, the dummy engine's per command
        if await screen.screen(self, client) is not Verdict.PASS:
            return False
        self._reset_timeout()  # smtpd's, from the hand-over on
        return True

    def send(self, text: str) -> None:
        """postscreen's words, written as they are (no reply bookkeeping: smtpd has not started)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(text.encode("utf-8", "replace"))  # type: ignore[attr-defined]

    async def tls_handshake(self, timeout: float, client: str, lines: SmtpdLog | None) -> tuple[bool, str]:
        """postscreen's STARTTLS (Postfix's tlsproxy): the handshake with the listener's certificate within
        `timeout`, smtpd's command deadline kept off (the screen has its own): (True, "") once done, its summary
        written to `lines` as `client`'s (None: not written), with the client certificate's trust; (False, the TLS
        library's problem, "" when none) when it failed."""
        if self._certificate is None:
            return False, ""
        try:
            await self.start_tls(self._certificate, timeout)
        except (TLSSetupException, ConnectionError) as error:
            return False, handshake_failure(error)[1]
        finally:
            self._no_deadline()
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if lines is not None and ssl_object is not None:
            log_tls_summary(lines, client, ssl_object, client_cert(ssl_object, self._fingerprint_digest, client))
        return True, ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connecting = self.transport is None
        super().connection_made(transport)
        if connecting and self._implicit_tls is not None and self._frontends.proxy_timeout is None:
            transport.pause_reading()  # type: ignore[attr-defined]  # the handshake waits for the admission

    async def _upstream_proxy(self) -> bool:
        """On a submissions listener the PROXY header comes in clear before the handshake (Postfix's wrapper mode
        reads it so): read, then reading stops again until the admission; the client's first TLS bytes that came
        with the header wait in the wire for the handshake (`_handshake_input`)."""
        if not await super()._upstream_proxy():
            return False
        if self._implicit_tls is not None:
            self._reading(False)
        return True

    def _handshake_input(self) -> bytes:
        """A submissions listener's first handshake: what arrived after the PROXY header is the ClientHello's."""
        if self._implicit_tls is not None and self.session.ssl is None:
            return self.wire.take()
        return super()._handshake_input()

    async def _before_greeting(self) -> bool:
        """After the PROXY header (if any: the limits apply to the real client it names), the admission. On a
        submissions listener, a client already past its new TLS session rate is closed first, without a word
        (as Postfix refuses a wrapper-mode client before its handshake)."""
        if not await super()._before_greeting():
            return False
        if self._implicit_tls is not None and self._new_tls_refused("TLS service request"):
            self.hang_up()
            return False
        ip = self.session.peer_ip
        refusal = self._listener.anvil.admit(ip)
        if refusal is not None:
            await self._refuse(status.too_many_connections(self.hostname, ip), functools.partial(
                self.record.lines.limit_exceeded, refusal.limit, refusal.number, self.session.client, self._service))
            return False
        self._admitted_ip = ip
        if not await self._listener.slots.acquire():
            self._release_count()  # (a refused client's handshake holds none of its connection count)
            await self._refuse(status.SERVER_BUSY, functools.partial(
                log.warning, "%s: refused: %d sessions and as many waiting", self.session.client,
                self._listener.slots.limit))
            return False
        self._has_slot = True
        if self._implicit_tls is not None:
            try:
                if not await self.tls_session(self._implicit_tls):
                    return False
            except (TLSSetupException, ConnectionError):
                self._close()
                return False
        if self._smtpd.allow_plaintext_auth_on_loopback and is_loopback(ip):
            self._auth_needs_tls = False
        self.discarded, self.discards_unknown = await self._listener.ehlo_discards.for_client(ip)
        self._client_changed()
        return True

    def _client_changed(self) -> None:
        """The client, at connect or as XCLIENT names it, judged against forbid_bare_newline_exclusions (its address
        and name, as Postfix's namadr_list, again after XCLIENT as xclient_cmd does)."""
        exempt = self._bare_newline_exempt
        self.exempt_from_bare_newline_rule(exempt is not None
                                           and exempt.contains(self.session.peer_ip, self.session.client_name))

    async def _refuse(self, reply: status.Reply, log_refusal: Callable[[], None]) -> None:
        """The admission's refusal: `log_refusal()`, `reply` and the end of the connection. On a submissions
        listener only after a TLS handshake (within starttls_timeout or REFUSAL_HANDSHAKE_TIMEOUT, whichever is
        shorter, one of the listener's REFUSAL_HANDSHAKES places held meanwhile), the reply then going over TLS,
        as Postfix's wrapper mode refuses; with no place free the connection is closed at once without a word, and
        so it is when the handshake fails (logged as any failed handshake; then the refusal is not, as in Postfix,
        which never got to its limits)."""
        if self._implicit_tls is None:
            log_refusal()
            await self._refuse_and_close(reply)
            return
        if not self._listener.refusing.take():
            log_refusal()
            self.hang_up()
            return
        try:
            timeout = min(self._starttls_timeout, REFUSAL_HANDSHAKE_TIMEOUT)
            if await self.tls_session(self._implicit_tls, timeout):  # (False: refused for its new TLS session rate)
                log_refusal()
                await self._refuse_and_close(reply)
        except (TLSSetupException, ConnectionError):
            self._close()
        finally:
            self._listener.refusing.give_back()

    def _talk_before_greeting_counts(self) -> bool:
        """Not on a submissions listener: its client speaks first (the handshake), and may send EHLO with its last
        handshake message, before the greeting it has not yet seen; Postfix's smtpd.c: the check "MUST NOT apply
        to TLS wrappermode connections" (a private Postfix 3.7 answers 220, then the EHLO)."""
        return self._implicit_tls is None

    def _may_reply(self) -> bool:
        """Not on a submissions listener before its handshake is done (its client's first bytes are TLS's)."""
        return super()._may_reply() and (self._implicit_tls is None or self.session.ssl is not None)

    @property
    def _service(self) -> str:
        """The service a limit's warning names, as master.cf names Postfix's: smtp, submission, submissions."""
        return "smtp" if self._role == "mta" else self._role

    def _rate_exceeded(self, event: str) -> bool:
        """Count `event` for the client as named now (after XCLIENT, the one it names) against the limit this
        session started with (anvil.EVENT_LIMITS); past it, Postfix's anvil warning. Exempt, as in Postfix:
        mynetworks (the anvil's exemption) and authorized XCLIENT hosts."""
        limit = getattr(self._smtpd, EVENT_LIMITS[event].setting)
        if not limit:
            return False
        ip = self.session.peer_ip
        if self._frontends.xclient_hosts.contains(ip):
            return False
        refusal = self._listener.anvil.event(event, ip, limit)
        if refusal is None:
            return False
        self.record.lines.limit_exceeded(refusal.limit, refusal.number, self.session.client, self._service)
        return True

    def _new_tls_refused(self, request: str) -> bool:
        """Before a handshake: the client already has more new TLS sessions than this session's limit in its time
        unit (nothing counted; exempt as in `_rate_exceeded`); logged then, in Postfix's words."""
        ip = self.session.peer_ip
        limit = self._smtpd.client_new_tls_session_rate_limit
        if not limit or self._frontends.xclient_hosts.contains(ip):
            return False
        if not self._listener.anvil.new_tls_over(ip, limit):
            return False
        self.record.lines.tls_refused(request, self.session.client, self._service)
        return True

    def _release_count(self) -> None:
        """Give back the per-client connection count the admission took (once)."""
        if self._admitted_ip is not None:
            self._listener.anvil.release(self._admitted_ip)
            self._admitted_ip = None

    def _session_ended(self) -> None:
        """Give back the session slot and the per-client count, whatever ended the session: now, or when a socket
        left sending its last replies is gone (`Lingering`). Until then it is still one of the client's
        connections and one of the listener's, an fd that client_connection_count_limit and max_sessions bound
        (a Postfix smtpd blocked writing to its client holds its process as long): clients from many addresses
        leaving their replies unread cannot pile up sockets past max_sessions."""
        super()._session_ended()
        if self._linger_handle is not None:
            self._linger_handle.on_end = self._release_admission
        else:
            self._release_admission()

    def _release_admission(self) -> None:
        """Give back the session slot and the per-client count (each once)."""
        if self._has_slot:
            self._listener.slots.release()
            self._has_slot = False
        self._release_count()


class Smtpd:
    """The listeners. `await start()`, `addresses`, `reconfigure(config, handler_for, tables)` (a reload),
    `handlers_in_use()`, `await stop(grace)`."""

    def __init__(self, config: Config, handler_for: Callable[[Config, TableCache], SmtpdHandler], *,
                 clock: Clock | None = None, observer: SessionObserver | None = None, resolver=None,
                 screened: PassCache | None = None, tables: TableCache | None = None):
        """`tables`: the cache the listeners' tables are opened through (a view of the server's generation's,
        TableCache.view; default: one of their own); `handler_for(config, view)` builds the handler of one listener
        from its effective config, opening its tables through `view` (a view of `tables`: a table several
        listeners name is read once); `observer` (None: no transcripts) gets every session's transcript
        (transcript.py); `resolver` answers postscreen's DNSBL queries; `screened` is postscreen's cache of clients
        that passed (the server's: kept across reloads)."""
        self._config = config
        self._resolver = resolver
        self.screened = screened or PassCache(config.smtpd.postscreen.cache_limit)
        self._observer = observer
        self._handler_for = handler_for
        self._clock = clock or SystemClock()
        self._tables = tables or TableCache()
        self._tls: dict[tuple[str, str, str, bool], ServerTls] = {}
        # AUTH state of the whole server, whichever listener a client uses: failures per client IP, and the
        # threads that compute password hashes (AUTH_HASH_WORKERS of them, created on first use).
        self.auth_failures = FailureCounter(self._clock, config.smtpd.anvil_rate_time_unit)
        self._hasher: PasswordHasher | None = None
        # sasl_type "dovecot": one connection per auth socket, the server's: every reload uses it
        self._dovecots: dict[str, DovecotAuth] = {}
        self.listeners: list[Listener] = []
        self.sessions: set[SmtpSession] = set()
        self.lingering: set[Lingering] = set()  # sockets still sending after their session's end (protocol.py)

    # -------------------------------------------------------------------------------- building

    def _build_listener(self, address: str, role: str, smtpd: SmtpdConfig, setting: str) -> Listener:
        host, port = parse_hostport(address)
        config = self._config if smtpd is self._config.smtpd else self._config.model_copy(update={"smtpd": smtpd})
        networks = NetworkList.from_items(self._config.mynetworks, self._tables.open, parent_style=True,
                                          setting="mynetworks")
        anvil = Anvil(count_limit=smtpd.client_connection_count_limit, rate_limit=smtpd.client_connection_rate_limit,
                      time_unit=smtpd.anvil_rate_time_unit, clock=self._clock,
                      exempt=networks.contains,
                      count_events=any(getattr(smtpd, e.setting) for e in EVENT_LIMITS.values()))
        authenticator = None
        if smtpd.sasl_auth_enable:
            # the failure delay is waited by a client on the wire: real time, as error_sleep_time's, whatever the
            # server's clock (a virtual one stands still while the client waits for its reply)
            authenticator = Authenticator(backend=self._auth_backend(smtpd), clock=SystemClock(),
                                          failures=self.auth_failures, delay=smtpd.auth_failure_delay,
                                          delay_limit=smtpd.auth_failure_delay_limit)
        if smtpd.tls_cert_file:
            self._server_tls(smtpd)  # read now: a bad file stops the start
        handler = self._handler_for(config, self._tables.view())
        sender_logins = None
        if smtpd.reject_sender_login_mismatch:
            sender_logins = SenderLogins(self._tables.open(smtpd.sender_login_maps), resolve=handler.resolved_address,
                                         delimiter=self._config.recipient_delimiter, own_address_without_maps=True)
        return Listener(host, port, role, config, handler, anvil, SessionSlots(smtpd.max_sessions),
                        authenticator, sender_logins, FrontEnds.from_config(smtpd),
                        ProtocolLimits.from_config(smtpd, soft_bounce=self._config.soft_bounce,
                                                   header_size_limit=self._config.header_size_limit),
                        NetworkList.from_items(smtpd.sasl_exceptions_networks, self._tables.open,
                                               setting="smtpd.sasl_exceptions_networks"),
                        EhloDiscards(frozenset(smtpd.discard_ehlo_keywords),
                                     self._tables.open(smtpd.discard_ehlo_keyword_address_maps), self._tables.run),
                        self._bare_newline_exempt(smtpd, networks),
                        self._postscreen(smtpd, networks, config.myhostname), setting,
                        command_filter=self._tables.open(smtpd.command_filter) if smtpd.command_filter else [],
                        command_filter_run=self._tables.run)

    def _bare_newline_exempt(self, smtpd: SmtpdConfig, mynetworks: NetworkList) -> NetworkList | None:
        """The clients forbid_bare_newline spares (its exclusions; unset: mynetworks, as Postfix's default)."""
        if not smtpd.forbid_bare_newline:
            return None
        if smtpd.forbid_bare_newline_exclusions is None:
            return mynetworks
        return NetworkList.from_items(smtpd.forbid_bare_newline_exclusions, self._tables.open, parent_style=True,
                                      setting="smtpd.forbid_bare_newline_exclusions")  # (as mynetworks: smtpd.c)

    def _postscreen(self, smtpd: SmtpdConfig, mynetworks: NetworkList, hostname: str) -> Postscreen | None:
        """A listener's screen when [smtpd.postscreen] (or its overrides) enables it; else none, at no cost."""
        if not smtpd.postscreen.enable:
            return None
        return Postscreen(smtpd.postscreen, mynetworks=mynetworks, tables=self._tables, resolver=self._resolver,
                          cache=self.screened, clock=self._clock, hostname=hostname, banner=smtpd.banner,
                          smtpd_timeout=smtpd.timeout,
                          smtpd_connection_limit=smtpd.client_connection_count_limit,
                          smtpd_forbid_cmds=smtpd.forbid_cmds,
                          engine=EngineTraits.from_config(smtpd, soft_bounce=self._config.soft_bounce))

    def _auth_backend(self, smtpd: SmtpdConfig) -> Backend:
        """Who checks a listener's AUTH passwords: Dovecot's auth server (one connection per socket, shared by
        the listeners naming it) or the user tables (with the server's hashing threads)."""
        if smtpd.sasl_type == "dovecot":
            if smtpd.sasl_path not in self._dovecots:
                self._dovecots[smtpd.sasl_path] = DovecotAuth(smtpd.sasl_path, timeout=smtpd.sasl_timeout,
                                                              clock=self._clock)
            return DovecotBackend(self._dovecots[smtpd.sasl_path], smtpd.sasl_timeout)
        if self._hasher is None:
            self._hasher = PasswordHasher(AUTH_HASH_WORKERS)
        return TableBackend(self._tables.open(smtpd.sasl_user_maps), self._hasher, run=self._tables.run)

    def _server_tls(self, smtpd: SmtpdConfig) -> ServerTls:
        """The certificate of these settings, read once per (cert, key, CA file, ask_ccert). Raises TlsError."""
        key = (smtpd.tls_cert_file, smtpd.tls_key_file, smtpd.tls_ca_file, smtpd.tls_ask_ccert)
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
            certificate=tls.context if tls is not None else None,
            sessions=self.sessions,
            lingering=self.lingering,
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
            auth_hidden_from=listener.auth_hidden_from,
            table_run=self._tables.run,
            sender_logins=listener.sender_logins,
            auth_required=smtpd.sasl_auth_required,
            auth_require_tls=listener.role != "submissions",  # there the whole connection is TLS
            starttls_timeout=smtpd.starttls_timeout,
            tls_loglevel=smtpd.tls_loglevel,
            fingerprint_digest=smtpd.tls_fingerprint_digest,
            observer=self._observer,
        )

    # -------------------------------------------------------------------------------- running

    async def start(self) -> None:
        self.listeners = [self._build_listener(*spec) for spec in self._config.smtpd.listener_settings()]
        await self._preload(self.listeners)
        for listener in self.listeners:
            listener.server = await listen(functools.partial(self._session, listener), listener.host, listener.port,
                                           logger=log)

    async def reconfigure(self, config: Config, handler_for: Callable[[Config, TableCache], SmtpdHandler],
                          tables: TableCache | None = None) -> Callable[[], Awaitable[None]]:
        """A reload, as `postfix reload` applies master.cf: the listeners of `config`, built as a start would
        build them (the files read now, the new addresses bound and listening: their connections wait in the
        kernel's queue), but not yet in use. Raises ConfigError (a TlsError for a certificate; an address that
        cannot be bound, named by its key) and changes nothing then. The function returned puts them in use:

        - a listener whose address was already listened on keeps its socket (nothing queued in the kernel is
          lost), its session slots and per-client counts; its role, settings, handler, AUTH and sender-login
          tables, certificate and limits are the new ones for new connections;
        - a new address is served from then on;
        - an address gone stops listening; its open sessions go on to their end.

        A running session keeps what it started with, to its end (Postfix: an smtpd process serves its client
        under the configuration it started with). `tables`: as the constructor's, for the new listeners."""
        fresh = Smtpd(config, handler_for, clock=self._clock, observer=self._observer, resolver=self._resolver,
                      screened=self.screened, tables=tables)
        # the server's, whatever the config: the AUTH failures, the hashing threads, the auth server connections
        # (the auth server connections copied: a refused reload leaves the running server's as they are; one it
        # added connects only when asked, so a refused reload opens none)
        fresh.auth_failures, fresh._hasher, fresh._dovecots = self.auth_failures, self._hasher, dict(self._dovecots)
        built = [fresh._build_listener(*spec) for spec in fresh._config.smtpd.listener_settings()]
        await fresh._preload(built)
        pairs, gone = _continued(self.listeners, built)
        added = [new for running, new in pairs if running is None]
        await self._listen(added)

        async def commit() -> None:
            self._config, self._handler_for, self._tables, self._tls = config, handler_for, fresh._tables, fresh._tls
            self.screened.resize(config.smtpd.postscreen.cache_limit, self._clock.time())  # (the server's cache)
            self.auth_failures.retime(config.smtpd.anvil_rate_time_unit)  # (the server's, as the cache)
            self._hasher, self._dovecots = fresh._hasher, fresh._dovecots
            for listener in gone:
                self._close_listener(listener)
            self.listeners = [new if running is None else _renewed(running, new) for running, new in pairs]
            for listener in added:
                assert listener.server is not None  # bound by _listen
                await listener.server.start_serving()
                log.info("reload: listening on %s (%s)", _bound(listener), listener.role)

        return commit

    async def _preload(self, listeners: list[Listener]) -> None:
        """The user, sender-login and restriction tables of `listeners` read off the event loop, before anyone
        asks (a table nobody preloaded is read by its first lookup, on the loop)."""
        await self._tables.preload()
        for listener in listeners:
            await listener.handler.restrictions.preload()

    async def _listen(self, listeners: list[Listener]) -> None:
        """Bind each listener's address and listen there, without serving yet. Raises ConfigError naming the
        first address that cannot be used; none stays bound then."""
        failed = None
        try:
            for failed in listeners:
                # listening from here on (connections queue in the kernel), so that another listener of this reload
                # on the same address cannot bind
                failed.server = await listen(functools.partial(self._session, failed), failed.host, failed.port,
                                             logger=log, start_serving=False)
        except BaseException as e:  # (cancelled too: what was bound is let go)
            for listener in listeners:
                if listener.server is not None:
                    listener.server.close()
                    listener.server = None
            if not isinstance(e, OSError) or failed is None:
                raise
            reason = f"cannot listen on {failed.host}:{failed.port}: {os_reason(e)}"
            raise ConfigError("", failed.setting, reason) from None

    def _close_listener(self, listener: Listener) -> None:
        """Stop accepting on a listener a reload removed; its open sessions go on."""
        if listener.server is not None:
            log.info("reload: no longer listening on %s (%s)", _bound(listener), listener.role)
            listener.server.close()
        listener.handler.restrictions.close()  # its kept policy connections (its sessions may go on)

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
        the end of `grace` whatever is left is cut, replies its client has not read dropped (a message being
        committed is waited for first, within `grace` too).

        A session cut mid-DATA loses nothing: its client got no 250 and will send the message again.
        """
        loop = asyncio.get_running_loop()
        servers = [li.server for li in self.listeners if li.server]
        for server in servers:
            server.close()
        for server in servers:  # connections accepted already become sessions first, so that they are drained too
            await server.wait_closed()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            for session in list(self.sessions):
                session.shut_down()  # (one in a transaction: once it ends)
            if not self.sessions and not self._submitting:
                break
            await asyncio.sleep(min(STOP_POLL, max(0.0, deadline - loop.time())))
        for session in list(self.sessions):
            session.cut()
        for lingering in list(self.lingering):  # replies still unread after their session's end: no one is served
            lingering.abort()
        for _ in range(CUT_TURNS):  # their connection_lost (the session gone, its fd closed) comes in a turn or two
            if not self.sessions:
                break
            await asyncio.sleep(0)
        for li in self.listeners:
            li.server = None
            li.handler.restrictions.close()
        if self._hasher is not None:
            self._hasher.close()
            self._hasher = None
        for dovecot in self._dovecots.values():
            await dovecot.close()
        self._dovecots.clear()


def _continued(running: list[Listener], built: list[Listener]) -> tuple[list[tuple[Listener | None, Listener]],
                                                                        list[Listener]]:
    """Each listener a reload built, with the running one it continues (or None: a new address), and the running
    ones it does not continue. A listener continues the one with the same configured address (host and port; the
    same role first, then any), as Postfix's master identifies a master.cf service by its endpoint."""
    left = list(running)
    found: dict[int, Listener] = {}
    for same_role in (True, False):
        for index, new in enumerate(built):
            if index in found:
                continue
            match = next((old for old in left if (old.host, old.port) == (new.host, new.port)
                          and (old.role == new.role or not same_role)), None)
            if match is not None:
                found[index] = match
                left.remove(match)
    return [(found.get(index), new) for index, new in enumerate(built)], left


def _renewed(running: Listener, new: Listener) -> Listener:
    """`running` (its socket, slots and counts) with what a reload replaces taken from `new`."""
    running.handler.restrictions.close()  # its kept policy connections (its sessions may go on)
    for name in RELOADED:
        setattr(running, name, getattr(new, name))
    running.anvil.adopt_limits(new.anvil)
    running.slots.resize(new.smtpd.max_sessions)
    return running


def _bound(listener: Listener) -> str:
    """Where a listener listens: its socket's address (the port given to a port 0)."""
    if listener.server is not None and listener.server.sockets:
        return listener.server.where
    host, port = listener.host, listener.port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


