"""The SMTP protocol edge: an aiosmtpd `SMTP` subclass, one per client connection.

What it owns: reading the client (through `wire.Wire`, chunked and strict about CRLF, never aiosmtpd's
line-by-line readers), the command loop, MAIL and RCPT (the path syntax of `address.parse_path`, their
parameters: SIZE, BODY, SMTPUTF8, AUTH=, and the RFC 3461 DSN ones of `dsn.py`), DATA and BDAT (RFC 3030
CHUNKING, which aiosmtpd lacks) written as they arrive into a spool from the handler's
`new_spool(message_size_limit)` (mailflow.content.Spool: memory for a small message, a file for a big one;
discarded when the transaction ends, however it ends), STARTTLS's refusals, pipelining discipline, deadlines, error counting, and the
session's log lines (`logs.SmtpdLog`: connect, disconnect with Postfix's per-command counts, NOQUEUE reject,
TLS, lost connection, timeout). aiosmtpd's HELO, EHLO, RSET, NOOP, QUIT and the STARTTLS handshake are reused;
policy lives in the handler. Every reply after the greeting, except EHLO/HELO's, carries an enhanced status
code (RFC 2034). Whatever ends a session (QUIT, a drop, a refusal, a TLS handshake that fails or is abandoned,
which asyncio never reports to connection_lost), `_session_ended` runs once and frees what it held.

Failure behaviour (each refusal is a reply from `mailflow.status`; the session never raises out):
- bare LF / bare CR in a command or content: 521 5.5.2 and the session closes; the message is not queued
  (with forbid_bare_newline false a bare LF is a line end, normalised to CRLF; see wire.py).
- a command line that is not valid UTF-8: 500 5.5.2 Error: bad UTF-8 syntax (Postfix with SMTPUTF8).
- MAIL/RCPT: no FROM:/TO: 501 5.5.4; a malformed path 501 5.1.7 / 5.1.3 (logged as Postfix's "Illegal
  address syntax"); an unknown parameter 555 5.5.4; past recipient_limit 452 4.5.3, counted as an error only
  past recipient_overshoot_limit.
- STARTTLS inside TLS: 554 5.5.1; inside a mail transaction: 503 5.5.1.
- input before the greeting, or pipelined after a command that must end a group (RFC 2920: EHLO, HELO, DATA,
  VRFY, EXPN, NOOP, STARTTLS, AUTH, HELP), or any pipelining after HELO: 554 5.5.0 and the session closes.
- over `hard_error_limit` errors: 421 4.7.0 and close; over `soft_error_limit` each reply waits
  `error_sleep_time`; junk commands (NOOP, VRFY, RSET, HELP) beyond `junk_command_limit` count as errors.
- a command not complete within `timeout` of the previous one, or DATA slower than `min_data_rate` beyond
  `timeout`, closes the session (slowloris); a session older than `session_time_limit` gets 421 4.4.2 at its
  next command.
- trusted front ends (`frontends.py`): with upstream_proxy_protocol "haproxy" the PROXY header is read before
  the greeting and its client becomes the session's peer; a peer outside upstream_proxy_clients, a malformed
  header or none within upstream_proxy_timeout: a warning is logged and the connection closes without a
  greeting. XCLIENT from authorized_xclient_hosts (judged on the client as it was at the greeting) replaces
  the client's attributes and starts the session again with a new 220; from others 550 5.7.0.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, TLSSetupException

from mailflow import address, status
from mailflow.address import in_networks
from mailflow.config import DEFAULTS
from mailflow.logs import COMMAND_ORDER, SmtpdLog, client_name, printable
from mailflow.stages.smtpd import dsn
from mailflow.stages.smtpd.frontends import ProxyError, XclientError, parse_xclient, read_proxy_header
from mailflow.content import Spool
from mailflow.stages.smtpd.wire import ContentCheck, Wire, WireError, refusal

log = logging.getLogger("mailflow.smtpd")

# RFC 2920 section 3.1: these end a command group; input already pending after them is out of sync.
LAST_IN_GROUP = {"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "STARTTLS", "AUTH", "QUIT"}
EXTRA_KEYWORDS = ("DSN", "CHUNKING")  # EHLO keywords this module implements, added to the handler's list
XCLIENT_KEYWORD = "XCLIENT NAME ADDR PORT PROTO HELO LOGIN"  # offered to authorized_xclient_hosts only
JUNK_COMMANDS = {"NOOP", "VRFY", "RSET", "HELP", "EXPN", "ETRN"}
ALLOWED_BEFORE_STARTTLS = {"NOOP", "EHLO", "STARTTLS", "QUIT"}


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
    session_time_limit: float
    recipient_limit: int
    recipient_overshoot_limit: int

    @classmethod
    def from_config(cls, smtpd) -> "ProtocolLimits":
        """From a `SmtpdConfig` (the listener's effective settings)."""
        return cls(**{name: getattr(smtpd, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FrontEnds:
    """The trusted front ends of one listener (SmtpdConfig upstream_proxy_*, authorized_xclient_hosts)."""

    proxy_timeout: float | None = None  # None: no PROXY protocol
    proxy_clients: tuple = field(default=())  # ip networks
    xclient_hosts: tuple = field(default=())

    @classmethod
    def from_config(cls, smtpd) -> "FrontEnds":
        def networks(items):
            return tuple(ipaddress.ip_network(n, strict=False) for n in items)
        return cls(proxy_timeout=smtpd.upstream_proxy_timeout if smtpd.upstream_proxy_protocol == "haproxy" else None,
                   proxy_clients=networks(smtpd.upstream_proxy_clients),
                   xclient_hosts=networks(smtpd.authorized_xclient_hosts))


class SmtpSession(SMTP):
    """One client connection."""

    def __init__(self, handler, *, sessions: set, protocol: ProtocolLimits | None = None,
                 frontends: FrontEnds | None = None, **kwargs):
        super().__init__(handler, **kwargs)
        self._sessions = sessions
        self._limits = protocol or ProtocolLimits.from_config(DEFAULTS.smtpd)
        self._frontends = frontends or FrontEnds()
        self._xclient_allowed = False
        self._replies_sent = 0
        self._in_hello = False  # EHLO/HELO replies carry no enhanced codes (RFC 2034)
        self._wire: Wire | None = None
        self._errors = 0
        self._junk = 0
        self._data_started: float | None = None  # loop time DATA/BDAT content began, for the rate deadline
        self._data_bytes = 0
        self._bdat: tuple[Spool, ContentCheck] | None = None  # the current transaction's BDAT content, if begun
        self._log = SmtpdLog()
        self._connected = False  # "connect from" was logged: "disconnect from" will be
        self._ended = False
        self._commands: dict[str, list[int]] = {}  # Postfix's per-command [succeeded, total]
        self._pending_command: str | None = None  # counted; its final reply not sent yet
        self._where = "CONNECT"  # the last command received (Postfix "... after RCPT from ...")
        self._overshoot = 0  # recipients refused for the recipient limit in this transaction
        self._server_hung_up = False  # the server ended the session (a refusal, a timeout), not the client

    # --- connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None and self.transport is not None
        if starttls and self._wire is not None:
            self._wire.discard()  # plaintext pipelined after STARTTLS never reaches the TLS session
        if not starttls:
            self._sessions.add(self)
            super().connection_made(transport)
            return
        before = self.session  # aiosmtpd starts a new session: the client stays who PROXY/XCLIENT said it is
        super().connection_made(transport)
        for name in ("peer", "proxied_by", "client_name"):
            if hasattr(before, name):
                setattr(self.session, name, getattr(before, name))

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        self._drop_bdat()
        super().connection_lost(error)

    def _session_ended(self) -> None:
        """The session is over, however it ended (QUIT, a drop, a failed or abandoned TLS handshake, a
        refusal): free what it held. Runs once, from `_handle_client`'s finally; subclasses release more."""
        if self._ended:
            return
        self._ended = True
        self._sessions.discard(self)
        self._drop_bdat()
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        for transport in (self.transport, self._original_transport):
            if transport is not None and not transport.is_closing():
                transport.close()
        if self._connected:
            if not self._server_hung_up and "quit" not in self._commands:
                self._log.lost_connection(self._where, self._client_name())
            self._log.disconnect(self._client_name(), self._commands)

    def _timeout_cb(self) -> None:
        if self._connected and not self._server_hung_up:
            self._log.timeout(self._where, self._client_name())
        self._server_hung_up = True
        super()._timeout_cb()

    def _client_name(self) -> str:
        """`host[ip]` of the client as known now (after PROXY and XCLIENT)."""
        return client_name(getattr(self.session, "client_name", "unknown"), self._peer_ip())

    def eof_received(self) -> bool | None:
        """The client closed its sending side: unlike aiosmtpd, do not cancel the session at once; input already
        received is processed and answered (a message whose end arrived is queued and gets its 250), then the
        wire reports the end of input and the session closes. Over TLS, aiosmtpd's handling stands."""
        if self.session is None or self.session.ssl is not None or self._wire is None:
            return super().eof_received()
        return asyncio.StreamReaderProtocol.eof_received(self)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def hang_up(self) -> None:
        """The server ends the session (shutdown): no "lost connection" is logged for it."""
        self._server_hung_up = True
        self._close()

    # --- replies ------------------------------------------------------------------------------------------

    async def push(self, line, *, counts_as_error: bool = True) -> None:
        """Send one reply line. A final 4xx/5xx counts toward the error limits (unless `counts_as_error` is
        False) and marks the command being answered as failed in the disconnect statistics."""
        if isinstance(line, status.Reply):
            line = str(line)
        if self._replies_sent and not self._in_hello and isinstance(line, str):  # the first is the greeting
            line = status.with_enhanced_code(line)
        final = _final_code(line)
        if self._replies_sent and final >= 400 and counts_as_error:
            self._errors += 1
        if final and final not in (334, 354) and self._pending_command is not None:
            self._commands[self._pending_command][0] += final < 400
            self._pending_command = None
        self._replies_sent += 1
        await super().push(line)

    def _count_command(self, name: str) -> None:
        """One more `name` command (Postfix's disconnect statistics); its final reply says if it succeeded."""
        self._commands.setdefault(name, [0, 0])[1] += 1
        self._pending_command = name

    async def _refuse_and_close(self, reply: status.Reply) -> None:
        self._server_hung_up = True
        try:
            await self.push(reply)
        finally:
            self._close()

    def _peer_ip(self) -> str:
        peer = self.session.peer if self.session else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    # --- deadlines ----------------------------------------------------------------------------------------

    def _on_input(self, count: int) -> None:
        """Bytes arrived. During DATA/BDAT content the deadline moves with the data rate (smtpd_min_data_rate):
        never later than `timeout` after this input, nor than `timeout` plus what min_data_rate allows."""
        if self._data_started is None:
            return
        self._data_bytes += count
        now = self.loop.time()
        allowed = self._timeout_duration
        if self._limits.min_data_rate:
            allowed += self._data_bytes / self._limits.min_data_rate
        deadline = min(self._data_started + allowed, now + self._timeout_duration)
        self._reset_timeout(max(deadline - now, 0.001))

    def _content_begins(self) -> None:
        self._data_started = self.loop.time()
        self._data_bytes = 0
        self._reset_timeout()

    def _content_ends(self) -> None:
        self._data_started = None
        self._reset_timeout()

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
        self._wire = Wire(self._reader, self.hostname, self._on_input, bare_lf=not self._limits.forbid_bare_newline)
        if not await self._before_greeting():
            return
        self._xclient_allowed = in_networks(self._peer_ip(), self._frontends.xclient_hosts)
        await asyncio.sleep(0)  # let input sent before the greeting arrive, so that it is seen as such
        early = self._wire.pending()
        await self.push(f"220 {self.hostname} {self.__ident__}")
        self._greeted_at = asyncio.get_running_loop().time()
        if early and self._limits.forbid_unauth_pipelining:
            self._log.improper_pipelining("CONNECT", self._client_name(), self._wire.peek())
            await self._refuse_and_close(status.protocol_sync(self.hostname))
            return
        while self.transport is not None:
            try:
                if not await self._error_gate():
                    return
                await self._one_command()
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except ConnectionResetError:  # end of input (or a reset): what was received has been answered
                self._close()
                return
            except WireError as e:
                self._content_ends()
                if e.fatal:
                    self.log_reject(self._where, e.reply)
                    self._set_rset_state()
                    await self._refuse_and_close(e.reply)
                    return
                await self.push(e.reply)
            except Exception as error:  # a bug must not end the session silently, nor the server
                if isinstance(error, TLSSetupException):
                    self._close()
                    return
                try:
                    reply = await self.handle_exception(error)
                except Exception:
                    log.exception("error in handle_exception")
                    reply = str(status.INTERNAL_ERROR)
                await self.push(reply)

    async def _before_greeting(self) -> bool:
        """What must happen before the greeting; False when the connection was closed. Subclasses add admission
        (which must come after this, so that limits apply to the real client)."""
        if not await self._upstream_proxy():
            return False
        self._connected = True
        self._log.connect(self._client_name())
        return True

    def log_reject(self, stage: str, reply, recipient: str = "", *, action: str = "reject",
                   queue_id: str = "NOQUEUE", sender: str | None = None) -> None:
        """`NOQUEUE: reject: STAGE from host[ip]: reply; from=<s> to=<r> proto=… helo=<…>` (Postfix's form;
        `action` hold or discard with the message's queue id for those restriction actions; `sender` the one
        refused at MAIL, else the transaction's)."""
        if sender is None and self.envelope is not None:
            sender = self.envelope.mail_from
        self._log.reject(stage, self._client_name(), str(reply), sender=None if sender is None else
                         ("" if sender == "<>" else sender), recipient=recipient,
                         protocol="ESMTP" if self.session.extended_smtp else "SMTP",
                         helo=self.session.host_name or "", action=action, queue_id=queue_id)

    async def _upstream_proxy(self) -> bool:
        """The PROXY header of a trusted load balancer (Postfix smtpd_upstream_proxy_protocol = haproxy): its
        client becomes the session's peer. Anything wrong: a warning, and the connection closes silently."""
        timeout = self._frontends.proxy_timeout
        if timeout is None:
            return True
        balancer = self._peer_ip()
        if not in_networks(balancer, self._frontends.proxy_clients):
            log.warning("connect from unknown[%s] dropped: not an upstream_proxy_clients address", balancer)
            self._close()
            return False
        try:
            client = await asyncio.wait_for(read_proxy_header(self._reader), timeout)
        except asyncio.TimeoutError:
            log.warning("unknown[%s]: PROXY header: time limit of %gs exceeded, dropped", balancer, timeout)
            self._close()
            return False
        except ProxyError as e:
            log.warning("unknown[%s]: %s, dropped", balancer, e)
            self._close()
            return False
        if client is not None:
            self.session.peer = (client.addr, client.port)
            self.session.proxied_by = balancer
        log.debug("[%s]:%s via upstream proxy [%s]", self._peer_ip(),
                  self.session.peer[1] if len(self.session.peer) > 1 else "?", balancer)
        return True

    async def _error_gate(self) -> bool:
        """End a session past session_time_limit; tarpit past soft_error_limit, end the session at
        hard_error_limit (Postfix smtpd error counting)."""
        limit = self._limits.session_time_limit
        if limit and asyncio.get_running_loop().time() - self._greeted_at > limit:
            await self._refuse_and_close(status.session_too_long(self.hostname))
            return False
        if self._errors >= self._limits.hard_error_limit:
            self._log.too_many_errors(self._where, self._client_name())
            await self._refuse_and_close(status.too_many_errors(self.hostname))
            return False
        if self._errors > self._limits.soft_error_limit and self._limits.error_sleep_time:
            await asyncio.sleep(self._limits.error_sleep_time)
        return True

    async def _one_command(self) -> None:
        line = await self._wire.read_line(self._limits.max_line_length)
        refusal = _malformed(line)
        if refusal is not None:  # Postfix counts these as unknown commands
            self._count_command("unknown")
            await self.push(refusal)
            return
        command_bytes, _, arg_bytes = line.partition(b" ")
        command = command_bytes.upper().decode("ascii")
        if self._out_of_sync(command):
            self._log.improper_pipelining(command, self._client_name(), self._wire.peek())
            await self._refuse_and_close(status.protocol_sync(self.hostname))
            return
        arg = arg_bytes.strip().decode("utf-8") if arg_bytes.strip() else None
        await self._dispatch(command, arg)

    def _out_of_sync(self, command: str) -> bool:
        """RFC 2920 pipelining rules (smtpd_forbid_unauth_pipelining): input must not already be waiting after
        a command that ends a group, nor after any command of a client that did not say EHLO."""
        if not self._limits.forbid_unauth_pipelining or not self._wire.pending():
            return False
        if command == "QUIT":
            return False
        return command in LAST_IN_GROUP or not self.session.extended_smtp

    async def _dispatch(self, command: str, arg: str | None) -> None:
        method = self._smtp_methods.get(command)
        counted = command.lower() if method is not None and command.lower() in COMMAND_ORDER else "unknown"
        self._count_command(counted)
        if counted != "unknown":
            self._where = command
        if not self._tls_handshake_okay and command != "QUIT":
            await self.push(status.LACK_OF_SECURITY)
            return
        if self.require_starttls and not self._tls_protocol and command not in ALLOWED_BEFORE_STARTTLS:
            await self.push(status.STARTTLS_FIRST)
            return
        if method is None:
            log.debug("%s: unrecognised command %.20r", self._client_name(), command)
            await self.push(status.NOT_RECOGNIZED)
            return
        if command in JUNK_COMMANDS and self.envelope is not None and not self.envelope.mail_from:
            self._junk += 1
            if self._junk > self._limits.junk_command_limit:
                self._errors += 1
        self._reset_timeout()  # a complete command: the per-command deadline starts again
        await method(arg)

    # --- commands aiosmtpd lacks or does differently ------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_hello = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_hello = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_hello = False

    async def _call_handler_hook(self, command: str, *args):
        reply = await super()._call_handler_hook(command, *args)
        if command == "EHLO" and isinstance(reply, list) and reply:
            reply = _with_keywords(reply, EXTRA_KEYWORDS + ((XCLIENT_KEYWORD,) if self._xclient_allowed else ()))
        return reply

    async def smtp_VRFY(self, arg: str) -> None:
        if self._limits.disable_vrfy_command:
            await self.push(status.VRFY_DISABLED)
            return
        await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push(status.EXPN_DISABLED)

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """Postfix XCLIENT: an authorized front end names the real client; the session starts again."""
        if not self._xclient_allowed:
            log.warning("%s: XCLIENT refused: not in authorized_xclient_hosts", self._client_name())
            await self.push(status.XCLIENT_DENIED)
            return
        if self.envelope.mail_from:
            await self.push(status.XCLIENT_IN_TRANSACTION)
            return
        try:
            attributes = parse_xclient(arg)
        except XclientError as e:
            await self.push(e.reply)
            return
        before = self._client_name()
        self._apply_xclient(attributes)
        log.info("%s: XCLIENT: client is now %s:%s helo=<%s> login=%s", before, self._client_name(),
                 self.session.peer[1], printable(self.session.host_name or ""),
                 printable(self.session.auth_data) if self.session.authenticated else "-")
        self._set_rset_state()
        await self.push(f"220 {self.hostname} {self.__ident__}".encode())  # a greeting: no enhanced code

    def _apply_xclient(self, attributes: dict) -> None:
        """The given attributes replace the session's; [UNAVAILABLE] (None) makes one unknown. The session
        starts again: HELO name, protocol and login are forgotten unless given (the client sends EHLO again)."""
        session = self.session
        session.host_name, session.extended_smtp = None, False
        session.authenticated, session.auth_data = False, None
        addr, port = (list(session.peer[:2]) + [0])[:2] if isinstance(session.peer, tuple) else ("unknown", 0)
        if "ADDR" in attributes:
            addr = attributes["ADDR"] or "unknown"
        if "PORT" in attributes:
            port = int(attributes["PORT"] or 0)
        session.peer = (addr, port)
        if "NAME" in attributes:
            session.client_name = attributes["NAME"] or "unknown"
        if "HELO" in attributes:
            session.host_name = attributes["HELO"]
        if "PROTO" in attributes:
            session.extended_smtp = attributes["PROTO"] == "ESMTP"
        if "LOGIN" in attributes:
            session.authenticated = attributes["LOGIN"] is not None
            session.auth_data = attributes["LOGIN"]
            session.auth_mechanism = "XCLIENT"  # what Postfix logs as sasl_method for an XCLIENT login

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self._drop_bdat()
        self._overshoot = 0
        self.envelope.dsn_ret = ""
        self.envelope.dsn_envid = ""
        self.envelope.rcpt_dsn = []

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """RFC 3207, refused inside TLS (554 5.5.1, as Postfix) and inside a mail transaction (503 5.5.1: the
        handshake would reset it). A handshake that fails or that the client abandons ends the session."""
        if arg:
            await self.push(status.syntax("STARTTLS"))
            return
        if self._tls_protocol is not None or self.session.ssl is not None:
            await self.push(status.TLS_ALREADY_ACTIVE)
            return
        if self.tls_context and self.envelope.mail_from:
            await self.push(status.TRANSACTION_IN_PROGRESS)
            return
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is None:
            return  # not offered here: aiosmtpd answered
        if self.transport is None or self.transport.is_closing():  # asyncio resolves the handshake as done
            raise ConnectionResetError("the client left during the TLS handshake")
        self.log_tls()

    def log_tls(self) -> None:
        """`Anonymous TLS connection established from host[ip]: TLSv1.3 with cipher … (256/256 bits)`."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is None:
            return
        name, version, bits = ssl_object.cipher() or ("", "", 0)
        self._log.tls_established(self._client_name(), ssl_object.version() or version, name, bits or 0)

    async def smtp_MAIL(self, arg: str | None) -> None:
        """`MAIL FROM:<address> [params]` (RFC 5321 4.1.1.2): the path syntax of `address.parse_path`; SIZE,
        BODY, SMTPUTF8, AUTH (RFC 4954: accepted, not trusted), RET and ENVID (RFC 3461)."""
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        if self.envelope.mail_from:
            await self.push(status.NESTED_MAIL)
            return
        parsed = await self._path_argument(arg, "FROM:", "MAIL", status.SENDER_SYNTAX)
        if parsed is None:
            return
        sender, words = parsed
        taken = await self._mail_params(words)
        if taken is None:
            return
        options, ret, envid = taken
        self.envelope.smtp_utf8 = "SMTPUTF8" in options
        reply = await self._call_handler_hook("MAIL", sender or "<>", options)
        if self.envelope.mail_from:
            self.envelope.dsn_ret, self.envelope.dsn_envid = ret, envid
        await self.push(reply)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """`RCPT TO:<address> [NOTIFY=… ORCPT=…]`. Past `recipient_limit` the answer is 452 4.5.3, which
        counts as an error only past `recipient_overshoot_limit` (RFC 5321 4.5.3.1.10: the client may go on
        and send the message to the recipients already accepted)."""
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        if not self.envelope.mail_from:
            await self.push(status.NEED_MAIL)
            return
        parsed = await self._path_argument(arg, "TO:", "RCPT", status.RECIPIENT_SYNTAX)
        if parsed is None:
            return
        rcpt, words = parsed
        try:
            found, others = dsn.split_params(words, dsn.RCPT_KEYS)
            notify, orcpt = dsn.rcpt_params(found)
        except dsn.DsnError as e:
            await self.push(status.bad_dsn_parameter(str(e)))
            return
        if others:
            await self.push(status.unsupported_option(others[0]))
            return
        if len(self.envelope.rcpt_tos) >= self._limits.recipient_limit:
            self._overshoot += 1
            await self.push(status.TOO_MANY_RECIPIENTS,
                            counts_as_error=self._overshoot > self._limits.recipient_overshoot_limit)
            return
        before = len(self.envelope.rcpt_tos)
        reply = await self._call_handler_hook("RCPT", rcpt, [])
        if len(self.envelope.rcpt_tos) > before:
            self.envelope.rcpt_dsn.append((notify, orcpt))
        await self.push(reply)

    async def _path_argument(self, arg: str | None, keyword: str, command: str, bad: status.Reply):
        """(address, parameter words) of `FROM:<address> params` or `TO:…`, or None when a refusal was sent:
        501 5.5.4 usage without the keyword, `bad` (501 5.1.7 / 5.1.3) for a malformed path."""
        usage = f"{command} {keyword}<address>"
        if not arg or arg[:len(keyword)].upper() != keyword:
            await self.push(status.syntax(usage))
            return None
        text = arg[len(keyword):]
        try:
            addr, rest = address.parse_path(text)
        except address.PathError:
            self._log.illegal_address(self._client_name(), command, text)
            await self.push(bad)
            return None
        if command == "RCPT" and not addr:
            self._log.illegal_address(self._client_name(), command, text)
            await self.push(bad)
            return None
        words = rest.split()
        if words and not self.session.extended_smtp:
            await self.push(status.syntax(usage))
            return None
        return addr, words

    async def _mail_params(self, words: list[str]):
        """(options for the handler, RET, ENVID), or None when a refusal was sent. Options are upper case:
        `BODY=8BITMIME`, `SIZE=n`, `SMTPUTF8`."""
        try:
            found, others = dsn.split_params(words, dsn.MAIL_KEYS)
            ret, envid = dsn.mail_params(found)
        except dsn.DsnError as e:
            await self.push(status.bad_dsn_parameter(str(e)))
            return None
        options = []
        for word in others:
            key, eq, value = word.partition("=")
            key, upper_value = key.upper(), value.upper()
            if key == "BODY" and upper_value in ("7BIT", "8BITMIME"):
                options.append(f"BODY={upper_value}")
            elif key == "SIZE" and eq:
                if not (value.isascii() and value.isdigit()) or len(value) > 20:
                    await self.push(status.BAD_SIZE_SYNTAX)
                    return None
                if self.data_size_limit and int(value) > self.data_size_limit:
                    await self.push(status.SIZE_EXCEEDS_LIMIT)
                    return None
                options.append(f"SIZE={int(value)}")
            elif key == "SMTPUTF8" and not eq:
                options.append("SMTPUTF8")
            elif key == "AUTH" and eq:
                continue  # RFC 4954 section 5: accepted from anyone, trusted from no one
            else:
                await self.push(status.unsupported_option(word))
                return None
        return options, ret, envid

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if self._bdat is not None:
            await self.push(status.BDAT_MIXED)
            return
        if not self.envelope.rcpt_tos:
            await self.push(status.NEED_RCPT)
            return
        if arg:
            await self.push(status.syntax("DATA"))
            return
        await self.push(status.START_DATA)
        spool = self._new_spool()
        try:
            self._content_begins()
            try:
                why_not = await self._wire.read_data(spool)
            finally:
                self._content_ends()
            await self._finish_message(spool, why_not)
        finally:
            spool.discard()

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030: `BDAT <size> [LAST]`; the chunk follows at once, without dot-stuffing or terminator."""
        words = (arg or "").split()
        if not words or len(words) > 2 or not words[0].isdigit() or len(words[0]) > 12 \
                or (len(words) == 2 and words[1].upper() != "LAST"):
            await self.push(status.BDAT_SYNTAX)
            return
        size, last = int(words[0]), len(words) == 2
        refused = await self._bdat_refusal()
        if refused is not None:
            await self._skip_chunk(size)  # the chunk is on its way regardless; it must not be read as commands
            await self.push(refused)
            return
        if self._bdat is None:
            self._bdat = (self._new_spool(), ContentCheck())
        spool, check = self._bdat
        self._content_begins()
        try:
            await self._wire.read_chunk(size, spool, check)
        finally:
            self._content_ends()
        if not last:
            await self.push(status.bdat_chunk(size))
            return
        self._bdat = None  # the spool is this method's now
        try:
            why_not = refusal(spool, check.nul)
            bare = check.finish()
            if why_not is None and self._limits.forbid_bare_newline and bare:
                self._set_rset_state()
                await self._refuse_and_close(status.bare_newline(self.hostname, bare))
                return
            await self._finish_message(spool, why_not)
        finally:
            spool.discard()

    async def _bdat_refusal(self):
        if not self.session.host_name:
            return status.NEED_HELO
        if self._auth_required and not self.session.authenticated:
            return status.AUTH_REQUIRED
        if not self.envelope.rcpt_tos:
            self._set_post_data_state()
            return status.NEED_RCPT
        return None

    async def _skip_chunk(self, size: int) -> None:
        self._content_begins()
        try:
            await self._wire.read_chunk(size, None)
        finally:
            self._content_ends()

    def _new_spool(self) -> Spool:
        """Where this transaction's content goes (the handler's, i.e. the queue's spool directory)."""
        return self.event_handler.new_spool(self.data_size_limit)

    def _drop_bdat(self) -> None:
        if self._bdat is not None:
            self._bdat[0].discard()
            self._bdat = None

    async def _finish_message(self, spool: Spool, why_not: status.Reply | None) -> None:
        """Hand complete content to the handler (or refuse it); either way the transaction ends. The handler
        finds the content (a mailflow.content.Content) as `envelope.content`."""
        if why_not is not None:
            if spool.failure is not None:
                log.error("%s: message not queued: cannot write its spool file: %s", self._peer_text(),
                          spool.failure)
            self._set_post_data_state()
            await self.push(why_not)
            return
        self.envelope.content = self.envelope.original_content = await spool.finish()
        reply = await self._call_handler_hook("DATA")
        spool.discard()  # what was queued has the queue's own name for its file by now
        self._set_post_data_state()
        if isinstance(reply, str) and reply.startswith("250"):
            self._errors = 0
            self._junk = 0
        await self.push(reply if isinstance(reply, str) else status.OK)

    async def challenge_auth(self, challenge, encode_to_b64: bool = True, log_client_response: bool = False):
        """aiosmtpd's AUTH challenge, reading the answer through the strict wire reader."""
        from base64 import b64decode, b64encode
        import binascii
        from aiosmtpd.smtp import MISSING

        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(raw) if encode_to_b64 else raw))
        blob = (await self._wire.read_line(self._limits.max_line_length)).strip()
        if blob == b"*":
            await self.push(status.AUTH_ABORTED)
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(status.AUTH_BAD_BASE64)
            return MISSING


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


def _malformed(line: bytes) -> status.Reply | None:
    """Why a command line cannot be a command at all (empty, NUL, a non-ASCII verb, invalid UTF-8), or None.
    Valid UTF-8 is checked for the whole line, as Postfix does with SMTPUTF8 on: nothing later has to cope
    with undecodable text."""
    if not line:
        return status.BAD_SYNTAX
    if b"\0" in line:
        return status.NUL_IN_COMMAND
    if not line.partition(b" ")[0].isascii():
        return status.BAD_SYNTAX
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return status.BAD_UTF8
    return None


def _final_code(line) -> int:
    """The code of a final reply line (`250 ...`, not `250-...`), else 0."""
    text = line if isinstance(line, str) else line[:4].decode("ascii", errors="replace")
    return int(text[:3]) if text[:3].isdigit() and text[3:4] in (" ", "") else 0

