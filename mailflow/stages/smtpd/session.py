"""The SMTP protocol edge: an aiosmtpd `SMTP` subclass, one per client connection.

What it owns: reading the client (through `wire.Wire`, chunked and strict about CRLF, never aiosmtpd's
line-by-line readers), the command loop, DATA and BDAT (RFC 3030 CHUNKING, which aiosmtpd lacks) written as
they arrive into a spool from the handler's `new_spool(message_size_limit)` (mailflow.content.Spool: memory
for a small message, a file for a big one; discarded when the transaction ends, however it ends), the RFC 3461
DSN parameters of MAIL and RCPT (`dsn.py`), pipelining discipline, deadlines and error counting. aiosmtpd's
command methods (HELO, EHLO, MAIL, RCPT, RSET, STARTTLS, AUTH, ...) are reused; policy lives in the handler.
Every reply after the greeting, except EHLO/HELO's, carries an enhanced status code (RFC 2034).

Failure behaviour (each refusal is a reply from `mailflow.status`; the session never raises out):
- bare LF / bare CR in a command or content: 521 5.5.2 and the session closes; the message is not queued.
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

from mailflow import status
from mailflow.address import in_networks
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
    """The protocol settings of one listener (see SmtpdConfig: same names, same defaults)."""

    max_line_length: int = 2048
    forbid_bare_newline: bool = True
    forbid_unauth_pipelining: bool = True
    min_data_rate: int = 500
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    junk_command_limit: int = 100
    disable_vrfy_command: bool = True
    session_time_limit: float = 3600.0

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
        self._limits = protocol or ProtocolLimits()
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

    # --- connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self._original_transport is not None and self.transport is not None
        if starttls and self._wire is not None:
            self._wire.discard()  # plaintext pipelined after STARTTLS never reaches the TLS session
        if not starttls:
            self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        self._drop_bdat()
        super().connection_lost(error)

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

    # --- replies ------------------------------------------------------------------------------------------

    async def push(self, line) -> None:
        if isinstance(line, status.Reply):
            line = str(line)
        if self._replies_sent and not self._in_hello and isinstance(line, str):  # the first is the greeting
            line = status.with_enhanced_code(line)
        if self._replies_sent and _is_error_reply(line):
            self._errors += 1
        self._replies_sent += 1
        await super().push(line)

    async def _refuse_and_close(self, reply: status.Reply) -> None:
        log.info("smtpd: %s: %s", self._peer_text(), reply)
        try:
            await self.push(reply)
        finally:
            self._close()

    def _peer_text(self) -> str:
        peer = self.session.peer if self.session else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)

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
        assert self.session is not None
        self._wire = Wire(self._reader, self.hostname, self._on_input)
        if not await self._before_greeting():
            return
        self._xclient_allowed = in_networks(self._peer_ip(), self._frontends.xclient_hosts)
        await asyncio.sleep(0)  # let input sent before the greeting arrive, so that it is seen as such
        early = self._wire.pending()
        await self.push(f"220 {self.hostname} {self.__ident__}")
        self._greeted_at = asyncio.get_running_loop().time()
        if early and self._limits.forbid_unauth_pipelining:
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
                    log.exception("smtpd: error in handle_exception")
                    reply = str(status.INTERNAL_ERROR)
                await self.push(reply)

    async def _before_greeting(self) -> bool:
        """What must happen before the greeting; False when the connection was closed. Subclasses add admission
        (which must come after this, so that limits apply to the real client)."""
        return await self._upstream_proxy()

    async def _upstream_proxy(self) -> bool:
        """The PROXY header of a trusted load balancer (Postfix smtpd_upstream_proxy_protocol = haproxy): its
        client becomes the session's peer. Anything wrong: a warning, and the connection closes silently."""
        timeout = self._frontends.proxy_timeout
        if timeout is None:
            return True
        balancer = self._peer_ip()
        if not in_networks(balancer, self._frontends.proxy_clients):
            log.warning("smtpd: connect from [%s] dropped: not an upstream_proxy_clients address", balancer)
            self._close()
            return False
        try:
            client = await asyncio.wait_for(read_proxy_header(self._reader), timeout)
        except asyncio.TimeoutError:
            log.warning("smtpd: [%s]: PROXY header: time limit of %gs exceeded, dropped", balancer, timeout)
            self._close()
            return False
        except ProxyError as e:
            log.warning("smtpd: [%s]: %s, dropped", balancer, e)
            self._close()
            return False
        if client is not None:
            self.session.peer = (client.addr, client.port)
            self.session.proxied_by = balancer
        log.info("smtpd: connect from [%s]:%s via upstream proxy [%s]", self._peer_ip(),
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
            await self._refuse_and_close(status.too_many_errors(self.hostname))
            return False
        if self._errors > self._limits.soft_error_limit and self._limits.error_sleep_time:
            await asyncio.sleep(self._limits.error_sleep_time)
        return True

    async def _one_command(self) -> None:
        line = await self._wire.read_line(self._limits.max_line_length)
        if not line:
            await self.push(status.BAD_SYNTAX)
            return
        if b"\0" in line:
            await self.push(status.NUL_IN_COMMAND)
            return
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            await self.push(status.BAD_SYNTAX)
            return
        if self._out_of_sync(command):
            await self._refuse_and_close(status.protocol_sync(self.hostname))
            return
        arg = str(arg_bytes.strip(), "utf-8", errors="surrogateescape") if arg_bytes.strip() else None
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
        if not self._tls_handshake_okay and command != "QUIT":
            await self.push(status.LACK_OF_SECURITY)
            return
        if self.require_starttls and not self._tls_protocol and command not in ALLOWED_BEFORE_STARTTLS:
            await self.push(status.STARTTLS_FIRST)
            return
        method = self._smtp_methods.get(command)
        if method is None:
            log.info("smtpd: %s: unrecognised command %.20r", self._peer_text(), command)
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
            log.warning("smtpd: %s: XCLIENT refused: not in authorized_xclient_hosts", self._peer_text())
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
        before = self._peer_text()
        self._apply_xclient(attributes)
        log.info("smtpd: %s: XCLIENT: client is now %s[%s]:%s helo=<%s> login=%s", before,
                 getattr(self.session, "client_name", "unknown"), *self.session.peer[:2],
                 self.session.host_name or "", self.session.auth_data if self.session.authenticated else "-")
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

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self._drop_bdat()
        self.envelope.dsn_ret = ""
        self.envelope.dsn_envid = ""
        self.envelope.rcpt_dsn = []

    async def smtp_MAIL(self, arg: str | None) -> None:
        taken = await self._dsn_params(arg, "FROM:", dsn.MAIL_KEYS, dsn.mail_params)
        if taken is None:
            return
        arg, (ret, envid) = taken
        had_sender = bool(self.envelope.mail_from)
        await super().smtp_MAIL(arg)
        if self.envelope.mail_from and not had_sender:
            self.envelope.dsn_ret, self.envelope.dsn_envid = ret, envid

    async def smtp_RCPT(self, arg: str | None) -> None:
        taken = await self._dsn_params(arg, "TO:", dsn.RCPT_KEYS, dsn.rcpt_params)
        if taken is None:
            return
        arg, (notify, orcpt) = taken
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if len(self.envelope.rcpt_tos) > before:
            self.envelope.rcpt_dsn.append((notify, orcpt))

    async def _dsn_params(self, arg: str | None, keyword: str, keys: tuple[str, ...], parse):
        """(the argument without its DSN parameters, `parse` of them), or None when the command was refused
        (already answered: bad syntax, or a malformed parameter with 501 5.5.4)."""
        taken = await self._take_dsn_params(arg, keyword, keys)
        if taken is None:
            return None
        arg, found = taken
        try:
            return arg, parse(found)
        except dsn.DsnError as e:
            await self.push(status.bad_dsn_parameter(str(e)))
            return None

    async def _take_dsn_params(self, arg: str | None, keyword: str, keys: tuple[str, ...]):
        """(the command argument without its DSN parameters, those parameters), or None when a refusal was
        sent. Lines aiosmtpd cannot parse are passed through unchanged for aiosmtpd to refuse."""
        if not arg or not self.session.extended_smtp:
            return arg, {}
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return arg, {}
        address, rest = self._getaddr(stripped)
        if address is None or rest is None:
            return arg, {}
        try:
            found, others = dsn.split_params(rest.split(), keys)
        except dsn.DsnError as e:
            await self.push(status.bad_dsn_parameter(str(e)))
            return None
        head = stripped[:len(stripped) - len(rest)].rstrip()
        return f"{keyword}{head} {' '.join(others)}".rstrip(), found

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
                log.error("smtpd: %s: message not queued: cannot write its spool file: %s", self._peer_text(),
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


def _is_error_reply(line) -> bool:
    """A final 4xx/5xx reply line (what Postfix counts as a client error)."""
    text = line if isinstance(line, str) else line.decode("ascii", errors="replace")
    return text[:1] in ("4", "5") and text[3:4] == " "

