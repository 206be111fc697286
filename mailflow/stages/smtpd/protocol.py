"""smtpd's protocol core: one client connection and its command loop, an aiosmtpd `SMTP` subclass. The command
layers stack on it in dialogue order (frontends, secure, transaction, data); session.py assembles them.

What it owns
- Construction: aiosmtpd's `SMTP.__init__` inspects the session class and the handler (`inspect.getmembers`,
  `dir`, `inspect.signature`) on every connection, several percent of the server's CPU when each message comes
  on a connection of its own. `ProtocolCore.__init__` sets what aiosmtpd's inherited methods read and takes the
  table of smtp_* verbs and the names of the handle_* hooks from a cache, built once per class (the hooks' methods
  fetched together: `hook_table`).
- The connection: `connection_made` (after STARTTLS the client stays who it was), `data_received` (straight into
  the session's `wire.Wire`, made with the session: no StreamReader copy in between), `eof_received` (input
  already received is answered first), `_session_ended` (once however the session ends, also after a TLS
  handshake asyncio never reports to connection_lost: frees what it held, calls the handler's `handle_CLOSE`
  hook when it has one, logs the disconnect, then `_let_go` breaks the cycles through the session so that
  reference counting frees it; a handshake completing after that is closed), `hang_up()`, `cut()` (a stop's
  end: hang up, and drop the connection if replies are unsent), `shut_down()` (421 at a stop; after the
  transaction under way), `in_transaction`. Replies still unsent when a session ends keep its socket one
  `timeout` at most (`Lingering`, in the server's set: a stop aborts what is left), the session slot and the
  client's per-client count held until it is gone (server.py).
- Replies: `push()` gives a library-written line its enhanced status code (RFC 2034; not the greeting nor
  HELO/EHLO; a `status.Reply` goes as the catalogue wrote it), counts 4xx/5xx toward the error limits and
  records each command's outcome (session_log.SessionLog). A 421 or 521 after the greeting ends the session (RFC
  5321 3.8; Postfix disconnects after any reply starting with either, a reject_footer under it or not). A reply
  the server volunteers (the timeout's, the stop's) is not written while TLS is yet to come (`_may_reply`): the
  connection just closes.
- Deadlines: a command within `timeout` of the previous one; a reply waiting for the client to read (drain) within
  `timeout` of progress (a write without progress, as Postfix's smtpd_timeout; at a timeout with replies unsent, or
  under TLS, the connection is dropped, not closed gracefully); DATA/BDAT content at `min_data_rate`; none during a
  TLS handshake (`_no_deadline`: it has its own, secure.py), nor while the milters are waited for (`untimed`:
  Postfix's smtpd_timeout bounds the client's I/O only). One loop timer per session: a new deadline is a float stored;
  the timer, when it fires before the deadline, sets itself again for what is left (not a TimerHandle made and
  cancelled per command).
- The greeting (`greet`, at connect and after XCLIENT): the handler's CLIENT hook may put a refusal in its place
  (the client list of delay_reject false: then every command but QUIT gets 503 5.7.0, `session.access_denied`;
  a milter's refusal of the connect event), and a 421 or 521 refusal ends it. HELO and EHLO ask the handler's
  HELLO hook first (the helo list): a refusal is the reply and changes nothing.
- The command loop (`_handle_client`): the greeting (input before it is early talk, answered 554 in its place),
  the error gate (session_time_limit, soft and hard error limits), a line through `wire.Wire`, malformed lines,
  the STARTTLS requirement, then RFC 2920 pipelining discipline, dispatch to the `smtp_*` methods, junk commands.
  Commands that had already arrived (pipelined) are answered without any wait for input, so every PIPELINED_TURN
  of them in a row the session hands the loop back (`asyncio.sleep(0)`): one client's burst (a thousand RCPTs, BDAT
  chunks) holds up the other sessions, deliveries and timers for a few dozen commands, not for all of them.
- EHLO (the layers' keywords, then the handler's hook), VRFY, ETRN, QUIT; HELO, RSET, NOOP are aiosmtpd's; its
  EXPN and HELP are left out (unknown commands, as in Postfix).
- Typed state through aiosmtpd's documented factories: `_create_session()` -> state.SessionState,
  `_create_envelope()` -> state.Transaction (freeing the BDAT content of the one it replaces).
- The transcript (transcript.py), only when the server has a session observer: each command line and each
  reply, the client's identity, a message queued, the end of the session.

aiosmtpd's private names, each used because aiosmtpd offers no other way:
- `_handle_client` (overridden): aiosmtpd's command loop reads line by line and knows neither strict CRLF,
  pipelining discipline, deadlines nor BDAT; it is the one place a session's input is read.
- `_timeout_cb` (overridden): aiosmtpd's only timeout hook; Postfix's "timeout after X" is logged there and its
  `421 4.4.2 <host> Error: timeout exceeded` written before the connection is closed.
- `_timeout_duration`, `_timeout_handle`, `_tls_protocol`, `_tls_handshake_okay`, `_original_transport`,
  `_handler_coroutine`, `_handle_hooks`, `_smtp_methods` (set in `__init__`): what `SMTP.__init__` would set
  for the inherited methods that read them (connection_made/lost, STARTTLS, HELO, RSET, NOOP);
  `AIOSMTPD_STATE` lists them and a test checks aiosmtpd still has them.
- `_writer`: the connection's output stream, kept by aiosmtpd under this name only (its `_reader` is made, as
  StreamReaderProtocol needs one, and never fed); used for its drain and close. Replies are written to the
  transport it writes to, kept as `_out` (a call fewer a reply than its write()).
- `_original_transport` (the socket's transport under TLS: read at the end, where a session that ends inside a TLS
  handshake never gets connection_lost, so its socket is closed there; and for what is still unsent to the
  client, in drain, at a timeout and after the end), `_timeout_handle` (read at the end: the timer is cancelled).
- `_reset_timeout` (overridden: one timer per session), `_call_handler_hook`: aiosmtpd's timer and hook call,
  shared with the inherited commands.
aiosmtpd's own PROXY support (`proxy_protocol_timeout`) is not used: see frontends.py.

Failure behaviour: the session never raises out. A `WireError` is answered (and ends the session when fatal:
bare LF/CR); the end of input closes the session (what was received has been answered); any other exception
is answered by the handler's `handle_exception` (451 4.3.0, logged) and the session goes on. A 4xx/5xx reply
gets the reject_footer under its last line (its template checked at load: reply_footer.py); an EHLO whose
discard_ehlo_keyword_address_maps or sasl_exceptions_networks table cannot answer gets `421 4.3.0 <host> Server
local data error` (logged as Postfix's) and the session ends; a keyword discard_ehlo_keywords names is left out of
EHLO (logged `discarding EHLO keywords: …`) and the feature it names is refused where its command or parameter
comes (Postfix's ehlo_discard_mask).

Size: about 960 lines, kept in one module on purpose. It is one class, aiosmtpd's SMTP subclassed: the command
loop, the deadline timer, the reply path and the end of the session share its state and aiosmtpd's private
names (listed above), and splitting it into mixins would scatter that list. The command layers are already
their own modules (frontends, secure, transaction, data), as are the wire, the state and the session log.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import operator
import re
import struct
import termios
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from mailflow import address, status
from mailflow.config import DEFAULTS
from mailflow.ehlo_keywords import discard_log_text, keyword_name
from mailflow.reply_footer import FooterClient, footer_lines, footer_values
from mailflow.junk_commands import JunkCount
from mailflow.session_log import SessionLog
from mailflow.stages.smtpd.command_filter import replacement
from mailflow.stages.smtpd.state import NULL_SENDER, SessionState, Transaction, helo_name
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript, tls_description
from mailflow.stages.smtpd.wire import CHUNK, Wire, WireError
from mailflow.syntax import command_words, verb_and_argument_bytes
from mailflow.tables import Table

log = logging.getLogger("mailflow.smtpd")

# RFC 2920 section 3.1: these end a command group; input already pending after them is out of sync. Not AUTH:
# Postfix's command table does not flag it, and clients pipeline `AUTH PLAIN <response>` with MAIL. Nor STARTTLS,
# which Postfix does not flag either: what is pipelined after it is discarded unread once TLS is up (RFC 3207). Nor
# QUIT (Postfix's table does not flag it: in an ESMTP session input after QUIT is never read, in an SMTP one every
# command is checked, QUIT too).
LAST_IN_GROUP = {"EHLO", "HELO", "DATA", "VRFY", "NOOP"}
# Postfix's SMTPD_CMD_FLAG_LIMIT commands: past junk_command_limit of them each one is an error as well (JunkCount)
JUNK_COMMANDS = frozenset({"HELO", "EHLO", "NOOP", "VRFY", "RSET", "ETRN"})
# aiosmtpd's, not offered: Postfix has neither (500 5.5.2 command not recognized). aiosmtpd's HELP listed only the
# commands it wrote itself ("HELP NOOP RSET") and refused `HELP MAIL`.
NOT_COMMANDS = {"EXPN", "HELP"}
# Where TLS is required (smtpd_tls_security_level = encrypt), what a client may say before STARTTLS: Postfix's
# SMTPD_CMD_FLAG_PRE_TLS commands (smtpd.c). HELO too: a client that greets with it may then say STARTTLS.
ALLOWED_BEFORE_STARTTLS = {"HELO", "EHLO", "XCLIENT", "STARTTLS", "NOOP", "QUIT"}
# EHLO keywords of the layers (ETRN here, DSN transaction.py, CHUNKING data.py), in the order offered
LAYER_KEYWORDS = ("ETRN", "DSN", "CHUNKING")
PIPELINED_TURN = 32  # commands answered from input already received before the session hands the loop back
AIOSMTPD_STATE = ("_timeout_duration", "_timeout_handle", "_tls_protocol", "_tls_handshake_okay",
                  "_original_transport", "_handler_coroutine", "_handle_hooks", "_smtp_methods")


@dataclass(frozen=True)
class ProtocolLimits:
    """The protocol settings of one listener: SmtpdConfig's, same names (the defaults: from_config(DEFAULTS.smtpd))."""

    max_line_length: int
    forbid_bare_newline: bool
    forbid_unauth_pipelining: bool
    min_data_rate: int
    soft_error_limit: int
    hard_error_limit: int
    error_sleep_time: float
    junk_command_limit: int
    disable_vrfy_command: bool
    helo_required: bool
    forbid_cmds: tuple[str, ...]
    session_time_limit: float
    recipient_limit: int
    recipient_overshoot_limit: int
    discard_ehlo_keywords: frozenset[str] = frozenset()  # lower case (mailflow.ehlo_keywords)
    strict_rfc821_envelopes: bool = False
    reject_footer: str = ""  # (mailflow.reply_footer)
    soft_bounce: bool = False  # the main setting (Config.soft_bounce): every 5xx reply goes out as 4xx
    header_size_limit: int = DEFAULTS.header_size_limit  # the main setting: how far DATA's mbox lines are labelled

    @classmethod
    def from_config(cls, smtpd, *, soft_bounce: bool = False,
                    header_size_limit: int = DEFAULTS.header_size_limit) -> "ProtocolLimits":
        """From a `SmtpdConfig` (the listener's effective settings) and the main `soft_bounce` and
        `header_size_limit`."""
        main = ("soft_bounce", "header_size_limit")
        values = {name: getattr(smtpd, name) for name in cls.__dataclass_fields__ if name not in main}
        values["discard_ehlo_keywords"] = frozenset(smtpd.discard_ehlo_keywords)
        return cls(**values, soft_bounce=soft_bounce, header_size_limit=header_size_limit)


_COMMANDS: dict[type, dict[str, Callable]] = {}  # per session class: its smtp_* methods by verb
_HOOKS: dict[type, tuple[tuple[str, ...], Callable[[Any], tuple]]] = {}  # per handler class: see hook_table


def command_table(cls: type) -> dict[str, Callable]:
    """The `smtp_*` methods of a session class by verb (functions: called with the session), built once."""
    table = _COMMANDS.get(cls)
    if table is None:
        table = _COMMANDS[cls] = {name[5:]: getattr(cls, name) for name in dir(cls)
                                  if name.startswith("smtp_") and name[5:] not in NOT_COMMANDS}
    return table


def hook_table(handler: Any) -> dict[str, Callable]:
    """A handler's hooks as aiosmtpd keeps them (`_handle_hooks`: the name without `handle_`, the bound method as
    the handler has it now). The names a handler class has are found once; the methods are fetched by one
    attrgetter for all of them, not a getattr call each (fifteen a connection)."""
    found = _HOOKS.get(type(handler))
    if found is None:
        names = tuple(name for name in dir(type(handler)) if name.startswith("handle_"))
        fetch = operator.attrgetter(*names) if len(names) > 1 else lambda h: tuple(getattr(h, n) for n in names)
        found = _HOOKS[type(handler)] = (tuple(name[7:] for name in names), fetch)
    keys, fetch = found
    return dict(zip(keys, fetch(handler)))


class ProtocolCore(SMTP):
    """One client connection: see the module doc."""

    session: SessionState
    envelope: Transaction

    def __init__(self, handler, *, sessions: set, protocol: ProtocolLimits | None = None, hostname: str,
                 ident: str = "ESMTP", data_size_limit: int | None = None, enable_SMTPUTF8: bool = True,
                 decode_data: bool = False, timeout: float = 300, tls_context=None, require_starttls: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None, observer: SessionObserver | None = None,
                 lingering: set[Lingering] | None = None):
        self.loop = loop or asyncio.get_running_loop()
        # StreamReaderProtocol wants a reader; data_received feeds the session's wire instead (one copy less, and
        # no reader's pause and resume of the socket).
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=CHUNK, loop=self.loop),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        # aiosmtpd's public attributes
        self.event_handler = handler
        self.hostname = hostname
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self.tls_context = tls_context
        self.require_starttls = bool(tls_context and require_starttls)
        self.session: SessionState | None = None  # type: ignore[assignment]
        self.envelope: Transaction | None = None  # type: ignore[assignment]
        self.transport = None
        self._out: asyncio.WriteTransport = None  # type: ignore[assignment]  # (set by connection_made)
        # aiosmtpd's private attributes, for its inherited methods (see the module doc)
        self._timeout_duration = timeout
        self._timeout_handle = self._tls_protocol = self._original_transport = self._handler_coroutine = None
        self._tls_handshake_okay = True
        self._handle_hooks = hook_table(handler)
        self._smtp_methods = command_table(type(self))
        # this session's
        self._sessions = sessions
        self._limits = protocol or ProtocolLimits.from_config(DEFAULTS.smtpd)
        self._banner = ident
        self._eight_bit = not decode_data
        self._command_timeout = timeout
        self.record = SessionLog(self._client_name)
        self._forbid_bare_newline = self._limits.forbid_bare_newline  # (off for an excluded client: server.py)
        self._wire = Wire(hostname, bare_lf=not self._forbid_bare_newline,
                          reading=self._reading, loop=self.loop, line_limit=self._limits.max_line_length)
        self._replies_sent = 0
        self._footer = self._limits.reject_footer  # (read at each reply line: one look-up, not two)
        self._in_hello = False  # HELO/EHLO replies carry no enhanced codes (RFC 2034)
        self._errors = 0
        self._junk = JunkCount(JUNK_COMMANDS, self._limits.junk_command_limit)
        self._in_a_row = 0  # commands answered since the session last waited for input or handed the loop back
        # the EHLO keywords neither announced nor accepted in this session (Postfix's ehlo_discard_mask; a listener
        # chooses them by the client's address before the greeting: server.py), and whether the table that
        # chooses them could not answer (EHLO is refused then)
        self.discarded: frozenset[str] = self._limits.discard_ehlo_keywords
        self.discards_unknown = False
        self.command_line = b""  # the command being answered, as sent (what a warning that quotes it quotes)
        self.command_filter: list[Table] = []  # smtpd_command_filter (a listener's: server.ListenerSession)
        # how its lookups run: inline, or the listener's TableCache.run (off the loop, with a deadline, when a table
        # may wait on I/O: sqlite:, unix:)
        self.command_filter_run: Callable[..., Awaitable] | None = None
        self._greeted_at = 0.0
        self._data_started = 0.0  # loop time the last DATA/BDAT content began, for the rate deadline
        self._data_bytes = 0
        self._deadline = 0.0  # loop time the session times out, unless moved again before
        self._timer_at: float | None = None  # when the pending timer fires; None when none is pending
        self._ended = False
        self._sent_mark: int | None = None  # while a reply waits in drain: what was unsent when last looked at
        self._linger_handle: Lingering | None = None  # after the end: drops replies left unread too long
        # the server's sockets still sending after their session's end (stop() drops them)
        self._lingering = lingering if lingering is not None else set()
        self._quit = False  # QUIT answered: the command loop ends
        self._stopping = False  # the server stops: once no transaction is under way, 421 and the end
        self._observer = observer
        self.transcript: Transcript | None = None  # only with an observer (transcript.py)

    def exempt_from_bare_newline_rule(self, exempt: bool) -> None:
        """Whether this client may end a line with a bare LF (smtpd.forbid_bare_newline_exclusions, Postfix's
        smtpd_forbid_bare_newline_exclusions): its lines are then taken as forbid_bare_newline = false takes them."""
        self._forbid_bare_newline = self._limits.forbid_bare_newline and not exempt
        self._wire.allow_bare_lf(not self._forbid_bare_newline)

    # --- typed state --------------------------------------------------------------------------------------

    def _create_session(self) -> SessionState:
        return SessionState(self.loop)

    def _create_envelope(self) -> Transaction:
        if self.envelope is not None:
            self.envelope.discard_bdat()
        return Transaction()

    @property
    def wire(self) -> Wire:
        """The client's input."""
        return self._wire

    def _reading(self, on: bool) -> None:
        """The wire's flow control: pause or resume reading from the client."""
        # (a stream transport of any event loop: uvloop's are not asyncio.ReadTransport subclasses)
        transport = cast(asyncio.ReadTransport, self.transport)
        if transport is not None and not transport.is_closing():
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _reset_transaction(self) -> None:
        """The transaction ends without a message (what RSET does)."""
        self.envelope = self._create_envelope()

    # --- connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._ended:  # a TLS handshake that completed after the session gave up on it: nothing left to serve
            transport.close()
            return
        # what aiosmtpd's `_writer` writes to from now on (the TLS transport after STARTTLS): every reply is
        # written to it (`_write`, and the 421s of a timeout and of a stop); the writer is for drain and close
        self._out = transport  # type: ignore[assignment]  # (a stream transport; not typing.cast: a call)
        if self.transport is None:  # the connection
            self._sessions.add(self)
            super().connection_made(transport)
            sockname = transport.get_extra_info("sockname")
            if isinstance(sockname, tuple) and sockname:
                self.session.server_ip, self.session.server_port = str(sockname[0]), int(sockname[1])
            return
        self._wire.discard()  # STARTTLS done: plaintext pipelined after it never reaches TLS (RFC 3207)
        before = self.session
        super().connection_made(transport)  # aiosmtpd starts a new session
        self.session.carry_identity(before)

    def data_received(self, data: bytes) -> None:
        self._wire.feed(data)

    def connection_lost(self, error: Exception | None) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        self._sessions.discard(self)
        self.envelope.discard_bdat()
        self._wire.feed_eof(error)
        super().connection_lost(error)  # (aiosmtpd cancels the command loop's task here)
        self._handler_coroutine = None  # a cancelled task's traceback holds the session's frames: no cycle back

    def _session_ended(self) -> None:
        """The session is over, however it ended (QUIT, a drop, a failed or abandoned TLS handshake, a
        refusal): free what it held. Runs once, from `_handle_client`'s finally; subclasses release more."""
        if self._ended:
            return
        self._ended = True
        self._sessions.discard(self)
        self.envelope.discard_bdat()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        for transport in (self.transport, self._original_transport):
            if transport is not None and not transport.is_closing():
                transport.close()
        self._drop_unsent_later()
        closing = self._handle_hooks.get("CLOSE")  # the handler frees what it held for the session
        if closing is not None:
            closing(self, self.session, self.envelope)
        if self.transcript is not None and not self.transcript.reason and self.record.client_left:
            self.transcript.reason = "lost connection"  # (Postfix's REASON_LOST_CONNECTION, at EOF)
        self.record.ended()
        if self.transcript is not None:
            self._observe_identity(self.transcript)
            self.transcript.ended()
        self._let_go()

    def _let_go(self) -> None:
        """Break the reference cycles through the session (its bound methods held by its wire, its log, its
        transcript; the stream writer's protocol; asyncio's connect callback), so that reference counting frees
        it when the connection is gone rather than the garbage collector, which would otherwise carry every
        ended session (socket, buffers, about 60 objects) through its generations."""
        self._wire.let_go()
        self._client_connected_cb = None
        self._writer = None  # type: ignore[assignment]  # nothing writes after the end (no timer, not in _sessions)
        self._out = None  # type: ignore[assignment]
        self._stream_writer = None  # asyncio's, dropped by connection_lost, which a failed TLS handshake never gets

    def _observe_identity(self, t: Transcript) -> None:
        """What the transcript says of the client, as known now (after PROXY, XCLIENT, STARTTLS, AUTH)."""
        t.client, t.helo, t.login = self.session.client, self.session.host_name or "", self.session.login
        ssl = self.session.ssl
        t.tls = tls_description(ssl) if ssl is not None else ""  # (plaintext: no call for it)

    def _observe_queued(self, queue_id: str) -> None:
        """A message of this session was committed as `queue_id` (its 250 is in the transcript)."""
        if self.transcript is not None:
            self._observe_identity(self.transcript)
            self.transcript.queued(queue_id)

    def _client_name(self) -> str:
        return self.session.client

    def _timeout_cb(self) -> None:
        if self.transcript is not None and not self.record.server_hung_up:
            self.transcript.reason = "timeout"
        self.record.timed_out()
        if self._may_reply() and self.transport is not None and not self.transport.is_closing():
            self._out.write(self._reply_bytes(status.session_timeout(self.hostname), False))  # as Postfix says it
        super()._timeout_cb()
        # asyncio's close() keeps the connection until what is buffered for the client is written: a client that
        # never reads its replies kept it, and its session, waiting to write, for good. The timer fires here only
        # after a whole timeout without input, nor, in drain, any reply taken (`_timer_fired`): what is still
        # unsent is dropped with the connection (Postfix's smtpd_timeout bounds writes as well as reads). Under
        # TLS, close() is asyncio's SSL shutdown, which waits for the client's close_notify (30 s): a silent client
        # would keep its session that long. The 421 and the server's close_notify were handed to the socket first.
        if self._unsent() or self._original_transport is not None:
            self._drop_connection()

    def _socket_transport(self) -> asyncio.WriteTransport | None:
        """The transport on the client's socket: under TLS, the one beneath asyncio's SSL layer."""
        return cast(asyncio.WriteTransport | None, self._original_transport or self.transport)

    def _tls_transport(self) -> asyncio.WriteTransport | None:
        """asyncio's SSL transport, above the socket's, under TLS; None in plaintext."""
        return cast(asyncio.WriteTransport | None, self.transport if self._original_transport is not None else None)

    def _unsent(self) -> int:
        """Bytes written for the client that its socket has not taken yet (`unsent`)."""
        transport = self._socket_transport()
        return unsent(transport, self._tls_transport()) if transport is not None else 0

    def _drop_connection(self) -> None:
        """Close the client's socket now, whatever is still buffered for it (the SSL layer's close_notify too);
        connection_lost follows."""
        transport = self._socket_transport()
        if transport is not None:
            transport.abort()

    def _drop_unsent_later(self) -> None:
        """After the session's close: a client that leaves its last replies unread (a QUIT's, a 421's, a refusal's
        pipelined behind many others) would keep the socket open, asyncio's close() waiting to write them, after
        its session slot and per-client count were given back: one client could hold any number of sockets. What
        is still buffered then goes on being sent for one timeout at most, and the connection is dropped
        (`Lingering`). connection_lost cancels it. (Under TLS the socket transport was closed with the SSL one:
        nothing waits for the client's close_notify, as it leaves as soon as its buffer is empty.)"""
        # (inlined: it runs at every session's end; `_socket_transport`, `_tls_transport` and `_unsent` spelled out)
        sock: asyncio.WriteTransport | None = self._original_transport or self.transport  # type: ignore[assignment]
        if sock is None or self._linger_handle is not None:
            return
        tls: asyncio.WriteTransport | None = self.transport if self._original_transport else None  # type: ignore[assignment]
        if not (sock.get_write_buffer_size() if tls is None else unsent(sock, tls)):
            return
        self._linger_handle = Lingering(self.loop, self._command_timeout, sock, self._lingering)

    def _may_reply(self) -> bool:
        """Whether a reply the server volunteers (a timeout's 421, a stop's) may be written now: not while TLS
        is yet to come on a connection whose client speaks it (secure.py, server.py): it would reach the client
        in plaintext, in the middle of its handshake."""
        return True

    def eof_received(self) -> bool | None:
        """The client closed its sending side: unlike aiosmtpd, do not cancel the session at once; input already
        received is processed and answered (a message whose end arrived is queued and gets its 250), then the
        wire reports the end of input and the session closes. Over TLS, aiosmtpd's handling stands."""
        self._wire.feed_eof()
        if self.session is None or self.session.ssl is not None:
            return super().eof_received()
        return True  # (the writing side stays open for the answers)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def hang_up(self) -> None:
        """The server ends the session (shutdown): no "lost connection" is logged for it."""
        self.record.server_hung_up = True
        self._close()

    def cut(self) -> None:
        """The end of a stop's grace: hang up, and drop the connection if replies are still unsent (asyncio's
        close() would wait for its client to read them: a session waiting in drain outlived the stop, up to its
        timeout, longer while its client reads a little). connection_lost follows."""
        self.hang_up()
        if self._unsent():
            self._drop_connection()

    def shut_down(self) -> None:
        """The server is stopping: `421 4.3.2 <host> Service shutting down` and the session ends (RFC 5321 3.8).
        A session in a transaction may end it first (else its client would send the message again): the 421
        comes after, at the latest as the answer to its next command, which starts nothing."""
        self._stopping = True
        if self.in_transaction or self.transport is None or self.transport.is_closing():
            return
        if not self._may_reply():
            self.hang_up()
            return
        self._out.write(self._reply_bytes(status.shutting_down(self.hostname), False))  # (a footer too)
        self.hang_up()

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted and the transaction has not ended (with its message queued, RSET or a refusal)."""
        return self.envelope is not None and bool(self.envelope.mail_from)

    # --- replies ------------------------------------------------------------------------------------------

    async def push(self, line: Any, *, counts_as_error: bool = True) -> None:
        """Send one reply line. A final 4xx/5xx counts toward the error limits (unless `counts_as_error` is
        False) and marks the command being answered as failed in the disconnect statistics. After a 421 or 521 (not
        the greeting) the server closes the connection: decided on the code the reply starts with, as Postfix's
        smtpd_chat_reply, whether one line or several (a reject_footer's, a milter's)."""
        data = self._reply_bytes(line, counts_as_error)
        await self._write(data)
        if data[:3] in _HANG_UP_CODES and self._replies_sent > 1:
            self.hang_up()

    async def push_lines(self, lines: list[str]) -> None:
        """The lines of a multi-line reply (EHLO's), each as `push` sends it, in one write: the client gets one
        segment rather than one per line. A reject_footer goes once, under the last."""
        await self._write(b"".join(self._reply_bytes(line, True) for line in lines))

    def _reply_bytes(self, line: Any, counts_as_error: bool) -> bytes:
        """One reply line as sent, counted (errors, the disconnect statistics) and in the transcript (a refusal
        with the class its Reply was given where it was made: status.Reply.error_class). A 4xx or 5xx
        gets the reject_footer (status.with_footer) under its last line, then under soft_bounce a 5xx goes out as 4xx
        (status.soft_bounced), whoever wrote it: this is where every reply passes, as Postfix's smtpd_chat_reply.
        A continuation line sent on its own (`push_lines`) gets no footer: the reply's last line does."""
        error_class: str | None = "protocol"  # (a library-written refusal: aiosmtpd's syntax and sequence errors)
        if isinstance(line, status.Reply):  # one final line, as the catalogue wrote it
            final, line, text, error_class = line.code, str(line), True, line.error_class
        else:
            text = isinstance(line, str)  # (else bytes, as sent: AUTH's 334 challenges)
            if not text:
                final = _final_code(line[:4].decode("ascii", errors="replace"))
            else:
                if self._replies_sent and not self._in_hello:  # the first is the greeting
                    line = status.with_enhanced_code(line)
                final = _final_code(line)
        if self._footer and text and line[:1] in ("4", "5") and _ends_a_reply(line):
            line = status.with_footer(line, *footer_lines(self._footer, self._footer_values()))
        if self._limits.soft_bounce and text:
            line = status.soft_bounced(line)
            final -= 100 if final >= 500 else 0
        if self._replies_sent and final >= 400 and counts_as_error:
            self._errors += 1
        self.record.replied(final)
        self._replies_sent += 1
        if self.transcript is not None:
            self.transcript.reply(line, error_class if final >= 400 else None)
        data = line.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if text else line
        return data + b"\r\n"

    def _footer_values(self) -> dict[str, str]:
        """The reject footer's macros now, as Postfix's smtpd_expand_lookup gives them: $recipient is the
        transaction's first accepted recipient; $reverse_client_name is the client's name as smtpd knows it."""
        session, envelope = self.session, self.envelope
        client = None if session is None else FooterClient(session.client, session.peer_ip, session.port_text,
                                                           session.client_name, session.host_name or "")
        sender = envelope.mail_from if envelope is not None else None
        recipients = envelope.rcpt_tos if envelope is not None else []
        return footer_values(self.hostname, None if sender is None else "" if sender == NULL_SENDER else sender,
                             recipients[0] if recipients else None, client)

    async def _write(self, data: bytes) -> None:
        """aiosmtpd's push, without its per-line debug record; drained only when the socket did not take it all.
        Straight to the transport the stream writer writes to (`_out`): its write() and transport property are
        two calls a reply more."""
        out = self._out
        out.write(data)
        if out.get_write_buffer_size():
            await self._drain()

    async def _drain(self) -> None:
        """Wait for the client to take what is buffered for it, as Postfix's smtpd_timeout bounds a write: a
        whole `timeout` from now, moved on by another each time the timer finds the client took some since
        (`_timer_fired`); a client that reads slowly but steadily keeps its session. (Not while no deadline runs:
        `_no_deadline`.)"""
        if self._deadline != math.inf:
            self._reset_timeout()
        self._sent_mark = self._unsent()
        try:
            await self._writer.drain()
        finally:
            self._sent_mark = None

    async def _refuse_and_close(self, reply: status.Reply) -> None:
        self.record.server_hung_up = True
        try:
            await self.push(reply)
        finally:
            self._close()

    def log_reject(self, stage: str, reply, recipient: str = "", *, action: str = "reject",
                   sender: str | None = None, helo: str | None = None) -> None:
        """`QID: reject: STAGE from host[ip]: reply; from=<s> to=<r> proto=… helo=<…>` (Postfix's form: QID the
        transaction's queue id, taken at its first accepted recipient, `NOQUEUE` before; `action` milter-reject for
        a milter's refusal (Postfix's check_milter_reply), hold or discard for a message a filter held or
        discarded; `sender` the one refused at MAIL, else the transaction's; `helo` the name refused at HELO/EHLO,
        else the session's). Under soft_bounce a reject is logged as sent (4xx); a milter-reject as the milter gave
        it, as Postfix's check_milter_reply logs it (milter8 made its own 5xx a 4xx when it read it: client.py)."""
        if sender is None:
            sender = self.envelope.sender
        elif sender == NULL_SENDER:
            sender = ""
        helo = self.session.host_name or "" if helo is None else helo
        text = str(reply)
        if self._limits.soft_bounce and action == "reject":  # the reply as sent
            text = status.soft_bounced(text)
        self.record.lines.reject(stage, self.session.client, text, sender=sender, recipient=recipient,
                                 protocol=self.session.protocol, helo=helo,
                                 action=action, queue_id=self.envelope.queue_id)

    # --- deadlines ----------------------------------------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The session times out `duration` (default: `timeout`) from now. aiosmtpd's version makes a new
        TimerHandle each time; here the pending timer stays when it fires no later than the new deadline."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timer_at is not None and self._timer_at <= self._deadline:
            return
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = self._deadline
        self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)

    def _no_deadline(self) -> None:
        """No command deadline until the next `_reset_timeout` (a TLS handshake has its own; so does postscreen).
        The pending timer stays (aiosmtpd's connection_lost asserts there is a handle, and no TimerHandle is
        cancelled only to make another): one that fires meanwhile lets go (`_timer_fired`), and the next
        `_reset_timeout` sets a new one then."""
        self._deadline = math.inf

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """A wait that is not on the client (the milters): no command deadline meanwhile, as Postfix's smtpd_timeout
        bounds the client's input and output only (the milters' own timeouts bound the wait); a whole `timeout`
        from its end on."""
        self._no_deadline()
        try:
            yield
        finally:
            self._reset_timeout()

    def _timer_fired(self) -> None:
        self._timer_at = None
        if self.loop.time() < self._deadline:  # moved since the timer was set
            if self._deadline != math.inf:  # (inf: `_no_deadline`; the next `_reset_timeout` sets it again)
                self._timer_at = self._deadline
                self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        if self._sent_mark is not None and (left := self._unsent()) < self._sent_mark:  # a reply in drain: read on
            self._sent_mark = left
            self._reset_timeout()
            return
        self._timeout_cb()

    def _on_input(self, count: int) -> None:
        """Bytes arrived during DATA/BDAT content (the wire tells it only then: `_content_begins`): the deadline
        moves with the data rate (smtpd_min_data_rate): never later than `timeout` after this input, nor than
        `timeout` plus what min_data_rate allows."""
        self._data_bytes += count
        now = self.loop.time()
        allowed = self._command_timeout + self._data_bytes / self._limits.min_data_rate  # (at least 1: config)
        deadline = min(self._data_started + allowed, now + self._command_timeout)
        self._reset_timeout(max(deadline - now, 0.001))

    def _content_begins(self) -> None:
        self._data_started = self.loop.time()
        self._data_bytes = 0
        self._wire.progress = self._on_input
        self._reset_timeout()

    def _content_ends(self) -> None:
        self._wire.progress = None  # (commands' input: no call for it)
        self._reset_timeout()

    def _talk_before_greeting_counts(self) -> bool:
        """Whether input sent before the greeting is refused (554 5.5.0 synchronization; a listener whose client
        speaks first, implicit TLS, says otherwise)."""
        return True

    # --- the command loop ---------------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        """The whole session; whatever ends it (even a TLS handshake that never completes, after which asyncio
        never calls connection_lost), `_session_ended` frees what it held."""
        try:
            await self._serve_client()
        finally:
            self._session_ended()

    async def _serve_client(self) -> None:
        assert self.session is not None
        if self._observer is not None and self._observer.active:
            self.transcript = Transcript(self._observer, self.session.client, self.hang_up, self._observe_identity)
            self.transcript.started()
        if not await self._before_greeting():
            return
        early = self._talk_before_greeting_counts() and \
            (self._wire.pending() or _input_waiting(self.transport))  # sent before the greeting (Postfix's peek)
        if early:
            await asyncio.sleep(0)  # the transport reads it first: a close with input unread would reset the client
        if early and self._flag_ill_pipelining("CONNECT", self._wire.peek()):
            await self._refuse_and_close(status.PROTOCOL_SYNC)  # in place of the greeting, as Postfix's smtpd
            return
        if not await self.greet("CONNECT"):
            return
        self._greeted_at = self.loop.time()
        while self._taking_commands():
            try:
                if not await self._error_gate():
                    return
                await self._one_command()
                if self._wire.pending():  # the next command is here already (pipelined)
                    await self._take_turns()
                else:
                    self._in_a_row = 0  # (the next command is waited for)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except ConnectionResetError:  # end of input (or a reset): what was received has been answered
                self._close()
                return
            except WireError as e:
                self._content_ends()
                if e.fatal:
                    self.log_reject(e.where or self.record.where, e.logged,
                                    self.envelope.single_recipient if e.where else "")
                    self._reset_transaction()
                    await self._refuse_and_close(e.reply)
                    return
                await self.push(e.reply)
            except TLSSetupException:
                self._close()
                return
            except Exception as error:  # a bug must not end the session silently, nor the server
                try:
                    reply: str | status.Reply = await self.handle_exception(error)
                except Exception:
                    log.exception("error in handle_exception")
                    reply = status.INTERNAL_ERROR
                await self.push(reply)

    async def _take_turns(self) -> None:
        """After a command, when the next one has already arrived: no wait for input gives the loop to anyone else,
        so the session hands it back every PIPELINED_TURN such commands in a row."""
        self._in_a_row += 1
        if self._in_a_row >= PIPELINED_TURN:
            self._in_a_row = 0
            await asyncio.sleep(0)

    def _taking_commands(self) -> bool:
        """The command loop goes on: no QUIT, and the connection is neither lost nor being closed by the server
        (after a refusal that ends the session, input the client had already sent is never read as commands: a
        message completed in it would be queued although its client was told goodbye)."""
        return self.transport is not None and not self.transport.is_closing() and not self._quit

    async def _before_greeting(self) -> bool:
        """What must happen before the greeting; False when the connection was closed: the handler's CONNECT
        hook names the client (handler.py), then "connect from" is logged. The layers above add the PROXY header
        before it (frontends.py) and the admission after it (server.py); postscreen (`_screen`) comes first."""
        if not await self._screen():
            return False
        connected = self._handle_hooks.get("CONNECT")
        if connected is not None:
            await connected(self, self.session, self.envelope)
        self.record.connect()
        return True

    async def _screen(self) -> bool:
        """Before smtpd sees the client (server.py: a listener's postscreen); False when the connection is over."""
        return True

    async def greet(self, command: str) -> bool:
        """The greeting, at connect or after XCLIENT (`command`). The handler's CLIENT hook (delay_reject false:
        the client list; the milters' connect event) may put a refusal in its place: it counts as an error, and a
        421 or 521 ends the session (Postfix); the client list's also gets every later command but QUIT refused
        (`session.access_denied`, set by the hook). False when the session ended."""
        hook = self._handle_hooks.get("CLIENT")
        refusal = await hook(self, self.session, self.envelope, command) if hook is not None else None
        if refusal is None:
            await self.push(status.greeting(self.hostname, self._banner))
            return True
        if not self._replies_sent:  # (push counts no error for the greeting's place)
            self._errors += 1
        if refusal.code in (421, 521):
            await self._refuse_and_close(refusal)
            return False
        await self.push(refusal)
        return True

    async def _error_gate(self) -> bool:
        """End a session past session_time_limit; tarpit from soft_error_limit errors on (every reply then
        waits error_sleep_time, as Postfix's smtpd_chat_reply sleeps once error_count >= the soft limit), end
        the session at hard_error_limit (Postfix smtpd error counting)."""
        limit = self._limits.session_time_limit
        if limit and self.loop.time() - self._greeted_at > limit:
            await self._refuse_and_close(status.session_too_long(self.hostname))
            return False
        if self._errors >= self._limits.hard_error_limit:
            self.record.too_many_errors()
            if self.transcript is not None:
                self.transcript.reason = "too many errors"
            await self._refuse_and_close(status.too_many_errors(self.hostname))
            return False
        if self._errors >= self._limits.soft_error_limit and self._limits.error_sleep_time:
            await asyncio.sleep(self._limits.error_sleep_time)
        return True

    async def _one_command(self) -> None:
        line = await self._wire.read_line(self._limits.max_line_length)
        if self._stopping and not self.in_transaction:  # its transaction ended during the stop: no other begins
            self.shut_down()
            return
        if self.transcript is not None:
            self.transcript.command(line)
        if self.command_filter and _unreadable(line) is None:  # (Postfix: UTF-8 validity first, then the filter)
            filtered = await self._filtered_command(line)
            if filtered is None:
                return
            line = filtered
        self.command_line = line
        command_bytes, arg_bytes = verb_and_argument_bytes(line)
        # a line that cannot be a command at all: a NUL, invalid UTF-8 (checked for the whole line first, as Postfix
        # does with SMTPUTF8 on: nothing later has to cope with undecodable text), no verb (empty or only blanks)
        refusal = _unreadable(line)
        if refusal is None and not command_bytes:
            refusal = status.BAD_SYNTAX
        if refusal is not None:  # Postfix counts these as unknown commands
            self.record.command(None)
            await self.push(refusal)
            return
        command = command_bytes.upper().decode("utf-8")  # (bytes.upper: ASCII letters only, as strcasecmp)
        if command not in self._smtp_methods and self._not_smtp(command):
            self.record.failed_command()  # (`unknown=0/1` in the disconnect line, as Postfix counts it)
            self.record.lines.non_smtp_command(self.session.client, line)
            await self._refuse_and_close(status.NON_SMTP_COMMAND)
            return
        if self.session.access_denied is not None and command != "QUIT":  # (before the pipelining check: Postfix)
            self.record.command(command if command in self._smtp_methods else None, moves_where=False)
            await self.push(status.client_access_denied(self.session.client))
            return
        arg_bytes = arg_bytes.strip()
        arg = arg_bytes.decode("utf-8") if arg_bytes else None
        await self._dispatch(command, arg)

    async def _filtered_command(self, line: bytes) -> bytes | None:
        """Postfix's smtpd_command_filter: the line (leading blanks skipped) looked up, a value in its place, logged.
        None: the table could not answer; 421 4.3.0 has been sent and the session ends (Postfix's SMTP_ERR_DATA)."""
        key = line.lstrip(b" \t").decode("utf-8", "replace")
        value, failure = await replacement(self.command_filter, key, self.command_filter_run)
        if failure is not None:
            refusal = status.local_data_error(self.hostname)
            self.record.lines.command_filter_failed(self.envelope.queue_id, failure[0], key, self.record.where,
                                                    self.session.client, str(refusal))
            await self._refuse_and_close(refusal)
            return None
        if value is None:
            return line
        self.record.lines.command_replaced(self.session.client, line.decode("utf-8", "replace"), value)
        return value.encode("utf-8")

    def _not_smtp(self, command: str) -> bool:
        """Postfix's smtpd_forbid_cmds, and its rules for a command that looks like a message header or does not
        begin with a letter (its default smtpd_forbidden_commands' `/^[^A-Z]/ Bogus`: a line of message content,
        an address, a number, binary junk)."""
        return command in self._limits.forbid_cmds or _HEADER_NAME.match(command) is not None or \
            _LETTER.match(command) is None

    def _flag_ill_pipelining(self, after: str, pending: bytes) -> bool:
        """A pipelining violation: logged the first time in a session whether or not it is refused (Postfix's
        smtpd_flag_ill_pipelining, which fail2ban's filter matches); True when it is to be refused
        (smtpd_forbid_unauth_pipelining)."""
        if not self.session.ill_pipelining:
            self.session.ill_pipelining = True
            self.record.lines.improper_pipelining(after, self.session.client, pending)
        return self._limits.forbid_unauth_pipelining

    def _out_of_sync(self, command: str) -> bool:
        """RFC 2920 pipelining rules (smtpd_forbid_unauth_pipelining): input must not already be waiting after
        a command that ends a group, nor after any command (QUIT too) of a client that did not say EHLO. Not asked
        again once a violation is logged; asked after the answers Postfix gives first (access denied, an unknown
        command, STARTTLS required). Asked only when input is waiting already (`_dispatch` looks first: a client that
        waits for each reply costs no call for it)."""
        if self.session.ill_pipelining:
            return False
        return command in LAST_IN_GROUP or not self.session.extended_smtp

    async def _dispatch(self, command: str, arg: str | None) -> None:
        method = self._smtp_methods.get(command)
        # (an unknown command is answered before the STARTTLS requirement, as Postfix answers it)
        needs_tls = method is not None and self.require_starttls and self.session.ssl is None and \
            command not in ALLOWED_BEFORE_STARTTLS
        self.record.command(command if method is not None else None, moves_where=not needs_tls)
        if method is None:
            log.debug("%s: unrecognised command %.20r", self.session.client, command)
            await self.push(status.NOT_RECOGNIZED)
            return
        if needs_tls:
            await self.push(status.STARTTLS_FIRST)
            return
        if self._wire.pending() and self._out_of_sync(command) and \
                self._flag_ill_pipelining(command, self._wire.peek()):
            await self._refuse_and_close(status.PROTOCOL_SYNC)
            return
        self._reset_timeout()  # a complete command: the per-command deadline starts again
        await method(self, arg)
        if self._junk.answered(command):  # counted once answered, in a transaction too
            self._errors += 1

    def _message_accepted(self) -> None:
        """A message was queued: the error counts start again (Postfix)."""
        self._errors = 0
        self._junk.forgive()

    # --- HELO, EHLO, VRFY -----------------------------------------------------------------------------------

    async def smtp_HELO(self, hostname: str) -> None:
        """aiosmtpd's HELO, except that a session that said EHLO stays an ESMTP one, as Postfix keeps its protocol
        name: its pipelining rules, the Received header's `with` and the log's proto= stay ESMTP's. AUTH is not:
        it waits for the next EHLO (`ehlo_said`)."""
        self._in_hello = True
        extended = self.session.extended_smtp
        try:
            if hostname and await self._hello_refused("HELO", hostname):
                return
            if hostname:
                self.session.ehlo_said = False  # (AUTH needs an EHLO again: docs/security.md)
                self._checkpoint()
            await super().smtp_HELO(hostname)
        finally:  # (aiosmtpd's HELO clears it before the handler's hook, which may fail)
            self.session.extended_smtp = extended
            self._in_hello = False

    async def _hello_refused(self, command: str, hostname: str) -> bool:
        """The handler's HELLO hook (delay_reject false: the helo list) before HELO or EHLO changes anything: its
        refusal is the reply, and the session stays as it was (its HELO name, its transaction), as in Postfix."""
        hook = self._handle_hooks.get("HELLO")
        refusal = await hook(self, self.session, self.envelope, command, hostname) if hook is not None else None
        if refusal is None:
            return False
        await self.push(refusal)
        return True

    async def smtp_EHLO(self, hostname: str | None) -> None:
        """The keywords aiosmtpd would offer (SIZE, 8BITMIME, SMTPUTF8; VRFY when enabled), the layers' (STARTTLS
        and AUTH; DSN, CHUNKING and XCLIENT), then the handler's `handle_EHLO` edits the list (it adds PIPELINING
        and ENHANCEDSTATUSCODES; after a milter's 5xx only ENHANCEDSTATUSCODES, an `OnlyKeywords` no layer adds to)
        or answers in its place (a Reply: the milters' 421); those of `discarded` are left out (discard_ehlo_keywords,
        logged as Postfix logs it). A new transaction begins; the replies carry no enhanced code (RFC 2034)."""
        self._in_hello = True
        try:
            if not hostname:
                await self.push(status.hello_syntax("EHLO"))
                return
            if await self._hello_refused("EHLO", hostname):
                return
            if self.discards_unknown:  # Postfix: its ehlo_discard_maps failed; the 421 ends the session
                self._log_discarded()
                await self._local_data_error()
                return
            try:
                keywords = self._base_keywords()
            except UnknownEhloFeature as e:  # Postfix's cant_announce_feature: the same 421
                await self._local_data_error(e.feature)
                return
            self._reset_transaction()
            self._checkpoint()
            lines = status.ehlo_lines(self.hostname, keywords)
            edited = await self._call_handler_hook("EHLO", hostname, lines)  # (the log's proto= is still the old)
            if isinstance(edited, status.Reply):  # the milters' 421 (the session ends)
                await self.push(edited)
                return
            self.session.extended_smtp = self.session.ehlo_said = True
            if edited is MISSING:  # a handler without the hook: aiosmtpd's default
                self.session.host_name = helo_name(hostname)
                edited = lines
            if not isinstance(edited, OnlyKeywords):  # (a milter's 5xx: Postfix's mask is then silent)
                self._log_discarded()  # (after the milters' line, as Postfix's ehlo_cmd logs them)
                edited = _with_keywords(edited, self._ehlo_keywords())
            await self.push_lines(_without_keywords(edited, self.discarded))
        finally:
            self._in_hello = False

    async def _local_data_error(self, feature: str = "") -> None:
        """EHLO cannot be answered: a table that decides what to announce (`feature`, or the keywords to discard)
        could not answer. `421 4.3.0 <host> Server local data error`, logged as Postfix logs it; the session ends."""
        refusal = status.local_data_error(self.hostname)
        self.record.lines.local_data_error(self.envelope.queue_id, "EHLO", self.session.client, str(refusal), feature)
        await self.push(refusal)

    def _log_discarded(self) -> None:
        """Postfix's `discarding EHLO keywords: ...` line at each EHLO (ehlo_keywords.discard_log_text)."""
        text = discard_log_text(self.discarded)
        if text:
            self.record.lines.discarding_ehlo_keywords(text)

    def _base_keywords(self) -> list[str]:
        """The EHLO keywords before the handler's hook: the message's, then the security layer's."""
        # without a limit, a bare SIZE (RFC 1870: no fixed maximum), as Postfix offers it
        keywords = [f"SIZE {self.data_size_limit}" if self.data_size_limit else "SIZE"]
        keywords += [] if self._limits.disable_vrfy_command else ["VRFY"]  # (Postfix offers VRFY when it takes it)
        keywords += ["8BITMIME"] if self._eight_bit else []
        keywords += ["SMTPUTF8"] if self.enable_SMTPUTF8 else []
        return keywords + self._security_keywords()

    def _security_keywords(self) -> list[str]:
        """STARTTLS and AUTH, when offered (secure.py); UnknownEhloFeature when that cannot be told."""
        return []

    def _ehlo_keywords(self) -> tuple[str, ...]:
        """EHLO keywords the layers implement, added after the handler's hook (XCLIENT: frontends.py)."""
        return LAYER_KEYWORDS

    async def smtp_RSET(self, arg: str | None) -> None:
        """aiosmtpd's RSET, at which Postfix's smtpd flushes a long history (`_checkpoint`)."""
        if not arg:
            self._checkpoint()
        await super().smtp_RSET(arg)

    def _checkpoint(self, everything: bool = False) -> None:
        """Where Postfix's smtpd calls chat_reset (HELO, EHLO, RSET, the end of a message; XCLIENT: `everything`):
        the transcript's observers may flush what they hold (postmaster.py's notices), naming the client as known now
        (Transcript.identify, asked by the observer that flushes: after a PROXY header or XCLIENT, Postfix's
        state->namaddr)."""
        if self.transcript is not None:
            self.transcript.checkpoint(everything)

    async def smtp_QUIT(self, arg: str | None) -> None:
        """221, then the session ends, arguments or not: a client that wants to leave is let go, as Postfix does
        (aiosmtpd answers 501 and keeps it; its QUIT also cancels the session's own task to get out of its loop:
        an exception through every frame, for every message that comes on a connection of its own)."""
        await self.push(status.BYE)
        self._quit = True
        self._close()

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        """MAIL, RCPT and DATA before HELO/EHLO: refused only with `helo_required` (Postfix's
        smtpd_helo_required, default no); a client that never said hello is logged and checked as `unknown`.
        (AUTH always needs EHLO: secure.py.)"""
        if self.session.host_name or not self._limits.helo_required:
            return False
        await self.push(status.NEED_HELO)
        return True

    def _rate_exceeded(self, event: str) -> bool:
        """Count one of the session's per-client events (anvil.EVENT_LIMITS) and say whether its client is past
        that event's rate limit (logged then). Here nothing is limited: server.ListenerSession counts."""
        return False

    async def refused_for_rate(self, event: str) -> bool:
        """Count `event`; past its per-client rate limit, `450 4.7.1 Error: too much mail from IP` (its event's
        words) and True: the command is refused and the session goes on, as in Postfix."""
        if not self._rate_exceeded(event):
            return False
        await self.push(status.event_rate_exceeded(event, self.session.peer_ip))
        return True

    def milters_refusal(self, tls_or_auth: bool = False) -> status.Reply | None:
        """The handler's OTHER hook, asked before VRFY, ETRN, STARTTLS and AUTH as Postfix asks milter_other_event:
        the reply a milter's refusal at connect or HELO (or a failed milter's default action) holds for the session;
        for STARTTLS and AUTH (`tls_or_auth`) a 4xx is `454 4.3.0 Try again later`, as Postfix maps it."""
        hook = self._handle_hooks.get("OTHER")
        refusal = hook(self, self.session, self.envelope) if hook is not None else None
        if refusal is not None and tls_or_auth and refusal.code < 500:
            return status.MILTER_TRY_AGAIN
        return refusal

    async def refused_by_milters(self, tls_or_auth: bool = False) -> bool:
        """`milters_refusal` answered, and True: the command goes no further."""
        refusal = self.milters_refusal(tls_or_auth)
        if refusal is None:
            return False
        await self.push(refusal)
        return True

    async def smtp_VRFY(self, arg: str | None) -> None:
        """Off by default (disable_vrfy_command). On, as Postfix's vrfy_cmd: the address (a path, or a phrase and
        a path in angle brackets; a last word SMTPUTF8 dropped, RFC 6531) is checked by the handler's
        `handle_VRFY(server, session, envelope, address, written, smtputf8)` as RCPT checks a recipient, its refusal the
        reply; else `252 2.0.0` and the argument as written: VRFY says no more than RCPT would. A malformed
        address gets 501 5.1.3 (logged as Postfix's "Illegal address syntax"). It counts toward the client's
        recipient rate, as in Postfix (450 4.7.1 past it); a milters' refusal that holds for the session answers it
        before the address is looked at (`milters_refusal`)."""
        if self._limits.disable_vrfy_command:
            await self.push(status.VRFY_DISABLED)
            return
        if await self.check_auth_needed("VRFY"):
            return
        written, smtputf8 = address.vrfy_argument(arg or "", "smtputf8" not in self.discarded)
        if not written:
            await self.push(status.VRFY_SYNTAX)
            return
        if await self.refused_for_rate("rcpt"):
            return
        if await self.refused_by_milters():
            return
        addr = address.vrfy_address(written)
        if not addr:
            self.record.lines.illegal_address(self.session.client, "VRFY", written)
            await self.push(status.RECIPIENT_SYNTAX)
            return
        reply = await self._call_handler_hook("VRFY", addr, written, smtputf8)
        await self.push(status.vrfy_answer(written) if reply is MISSING or reply is None else reply)

    async def smtp_ETRN(self, arg: str | None) -> None:
        """RFC 1985, as Postfix answers it: not inside a transaction, one site (a leading `@` or `#` dropped, the
        argument split at ASCII white space only: `command_words`), a host name as Postfix's valid_hostname takes
        it or an address literal; the handler's
        `handle_ETRN(server, session, envelope, site)` answers the rest (without one: 459 for every site). A
        milters' refusal that holds for the session answers it first (`milters_refusal`)."""
        if await self.check_helo_needed("ETRN") or await self.check_auth_needed("ETRN"):
            return
        if await self.refused_by_milters():
            return
        if self.in_transaction:
            await self.push(status.TRANSACTION_IN_PROGRESS)
            return
        words = command_words(arg)
        if len(words) != 1:
            await self.push(status.ETRN_SYNTAX)
            return
        site = words[0][1:] if words[0][0] in "@#" else words[0]
        if not (address.is_valid_hostname(site) or address.is_address_literal(site)):
            await self.push(status.ETRN_BAD_SITE)
            return
        reply = await self._call_handler_hook("ETRN", site)
        await self.push(status.etrn_refused(site) if reply is MISSING else reply)


class OnlyKeywords(list):
    """EHLO reply lines from the handler's hook that no layer adds to (a milter's 5xx: Postfix's ehlo_cmd offers
    ENHANCEDSTATUSCODES alone, XCLIENT's access control included); discard_ehlo_keywords still applies."""


def _with_keywords(lines: list[str], keywords: tuple[str, ...]) -> list[str]:
    """EHLO reply lines with `keywords` added before the last one (each once)."""
    have = {line[4:].split(" ", 1)[0].upper() for line in lines[1:]}
    extra = [f"250-{k}" for k in keywords if k not in have]
    if not extra:
        return lines
    *head, last = lines
    if len(lines) == 1:  # only the greeting line: it becomes a continuation line
        return [f"250-{last[4:]}", *extra[:-1], f"250 {extra[-1][4:]}"]
    return [*head, *extra, last]


def _without_keywords(lines: list[str], discarded: frozenset[str]) -> list[str]:
    """EHLO reply lines without the `discarded` keywords (the greeting line kept), the last one final."""
    if not discarded:
        return lines
    kept = [lines[0]] + [line for line in lines[1:] if keyword_name(line[4:]) not in discarded]
    kept = [f"250-{line[4:]}" for line in kept]
    kept[-1] = f"250 {kept[-1][4:]}"
    return kept


_HEADER_NAME = re.compile(r"[!-9;-~]+:")  # RFC 5322 field name, then the colon
_LETTER = re.compile(r"[A-Za-z]")
_HANG_UP_CODES = (b"421", b"521")  # a reply starting with one ends the session (Postfix: SMTPD_FLAG_HANGUP)


def _unreadable(line: bytes) -> status.Reply | None:
    """A NUL or invalid UTF-8 in a command line (checked before smtpd_command_filter, as Postfix), or None."""
    if b"\0" in line:
        return status.NUL_IN_COMMAND
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return status.BAD_UTF8
    return None


def _input_waiting(transport) -> bool:
    """Bytes the client sent that the kernel holds and the transport has not read yet (FIONREAD, as Postfix's
    smtpd peeks before its greeting); False when it cannot tell."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):
        return False


class UnknownEhloFeature(Exception):
    """Whether to announce this EHLO keyword cannot be told now: a table that decides it could not answer (Postfix's
    cant_announce_feature)."""

    def __init__(self, feature: str):
        super().__init__(feature)
        self.feature = feature


def unsent(socket_transport: asyncio.WriteTransport, tls_transport: asyncio.WriteTransport | None) -> int:
    """Bytes written for a client that its socket has not taken yet: what the socket transport holds and, under TLS,
    what asyncio's SSL layer holds above it (its records wait there while the socket transport is paused, and go
    down to it in a batch when it resumes: the socket transport's own count grows again as the client reads)."""
    size = socket_transport.get_write_buffer_size()
    if tls_transport is not None:
        with contextlib.suppress(AttributeError):  # (an SSL transport closed twice has let go of its layer)
            size += tls_transport.get_write_buffer_size()
    return size


class Lingering:
    """A client socket still sending after its session's end: asyncio's close() waits to write what is buffered
    for it. It gets one `timeout` in all, never extended (a client reading a little at a time cannot keep it for
    longer: Postfix's close() hands what is left to the kernel and holds nothing), and is aborted then. Until its
    end it is in `within` (the server's set: `stop()` aborts what is left); then `on_end` (what the session keeps
    for its socket: its per-client count) is called, once. `cancel()` when the connection is lost."""

    __slots__ = ("_socket", "_within", "_handle", "on_end")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, socket_transport: asyncio.WriteTransport,
                 within: set[Lingering]):
        self._socket, self._within = socket_transport, within
        self.on_end: Callable[[], None] | None = None
        self._handle = loop.call_later(timeout, self.abort)
        within.add(self)

    def abort(self) -> None:
        """Drop the socket now, whatever is still unsent."""
        self.cancel()
        self._socket.abort()

    def cancel(self) -> None:
        self._handle.cancel()
        self._within.discard(self)
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()


def _ends_a_reply(text: str) -> bool:
    """Whether the last line of `text` (one line, or several joined by CRLF) is a final one (`550 ...`, not
    `550-...`)."""
    return text[text.rfind("\n") + 1:][3:4] != "-"


def _final_code(text: str) -> int:
    """The code of a final reply line (`250 ...`, not `250-...`), else 0."""
    code = text[:3]  # (ascii_digits' test, written out: every reply line passes here)
    return int(code) if code.isascii() and code.isdigit() and text[3:4] in (" ", "") else 0
