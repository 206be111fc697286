"""The LMTP client transport (Postfix lmtp): final delivery to a mailbox server such as Dovecot.

Owns: one LMTP session (RFC 2033) per delivery, written by hand on asyncio streams, and the mapping of every reply
to a per-recipient result. LMTP is SMTP with LHLO for EHLO and, after the end of DATA, one reply per accepted
recipient, in RCPT order; aiosmtplib reads only one, hence this client. No connection is cached.

    LmtpTransport(config, *, helo_name)
    await deliver(request) -> DeliveryReport      one result per recipient, never raises for a delivery problem
    await close()                                 nothing cached

Nexthop forms (the part after `lmtp:` in a transport value; no MX lookup, unlike smtp):
- `[host]:port`, `host:port`, `[host]`, `host`   TCP; the port defaults to `config.port` (24). A host name is resolved
  by the system resolver and its addresses are tried in order until one connects. An `inet:` prefix is accepted.
- `unix:/path/to/socket`                         a UNIX-domain socket; diagnostics call it `helo_name[/path]`.

Dialogue: greeting, `LHLO helo_name` (capabilities), `MAIL FROM:<sender>` with `SIZE=n` when offered,
`BODY=8BITMIME` when the message is 8-bit and it is offered, `SMTPUTF8` when offered and the message is flagged or
needs it, RET and ENVID when DSN is offered; one `RCPT TO` per recipient (with ORCPT and NOTIFY when DSN is offered,
as smtp.py builds them; sent in one write with MAIL when PIPELINING is offered); DATA; the content
with CRLF line ends and dot-stuffing, streamed from the queue (smtp's encoder; a big message is never held
whole); then exactly one reply per accepted RCPT; QUIT.
Limits: connecting `connect_timeout`; greeting, LHLO, MAIL, RCPT, DATA `command_timeout`; the content and each
final reply `data_timeout`.

What each recipient gets (texts as Postfix words them, reply codes mapped as smtp.py maps them):
- 2xx after the end of DATA                        SENT, the server's reply ("250 2.0.0 <a@x> Saved")
- 4xx / 5xx to MAIL, RCPT, DATA or end of DATA     DEFERRED / BOUNCED, "host h[ip] said: 550 5.1.1 ... (in reply to
                                                   RCPT TO command)"; a reply without an enhanced code gets x.0.0
- needs SMTPUTF8, the server does not offer it     BOUNCED 5.6.7
- bigger than the server's advertised SIZE         BOUNCED 5.3.4
- address with a control character (CR, LF, NUL…)  that recipient BOUNCED 5.1.3 (in the sender: all, 5.1.7); such an
                                                   address never reaches the wire
- nexthop unparsable / host name not found         DEFERRED 4.3.5 / 4.4.3, site_ok=False
- cannot connect                                   DEFERRED 4.4.1, site_ok=False
- greeting or LHLO refused                         DEFERRED (the reply's code as 4.x.x), site_ok=False
- connection lost, timed out, malformed reply      those without a final answer DEFERRED 4.4.2 (4.5.0 for a malformed
                                                   reply), site_ok=False; answers already read stand

`site_ok` is False only when the server could not be talked to; refusals keep it True. `relay` is `host[ip]:port`
(TCP) or `helo_name[/path]` (UNIX socket), "none" when no connection was made.
"""
from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from mailflow.config import LmtpConfig
from mailflow.content import CHUNK, Content
from mailflow.dns import is_ip_literal
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, Recipient
from mailflow.syntax import parse_hostport
from mailflow.transports.smtp import (
    Failure,
    Outcomes,
    asmtp_data,
    dsn_mail_params,
    dsn_rcpt_params,
    needs_smtputf8,
    one_line,
    os_reason,
    reply_dsn,
    reply_results,
    screen_envelope,
    smtp_data,
)

log = logging.getLogger("mailflow.lmtp")

# The results are final once the end of DATA is answered; a server slow to answer QUIT must not hold them back.
QUIT_TIMEOUT = 10.0
# A reply longer than this many lines is not a reply but a misbehaving server.
MAX_REPLY_LINES = 1000
STREAM_LIMIT = 64 * 1024

_REPLY_LINE = re.compile(rb"(\d{3})(?:([ -])(.*))?")


# ---------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens: a TCP `host` and `port`, or a UNIX-socket `path` (then host and port are unused)."""

    host: str = ""
    port: int = 0
    path: str = ""


@dataclass(frozen=True)
class Peer:
    """The server of one session: `name` as diagnostics say it (`host[ip]`), `relay` as the log says it."""

    name: str
    relay: str


@dataclass(frozen=True)
class Reply:
    """One complete server reply: the code and the text of every line, without codes, joined by newlines."""

    code: int
    message: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def lines(self) -> list[str]:
        return self.message.split("\n")


class SiteFailure(Exception):
    """The server could not be talked to (connect, greeting, LHLO, a lost or timed-out connection): every recipient
    still without an answer is deferred, and the destination counts as failed."""

    def __init__(self, failure: Failure):
        super().__init__(failure.text)
        self.failure = failure


# ---------------------------------------------------------------------------------------------------- transport


class LmtpTransport:
    """Delivers each request over a fresh LMTP session to its nexthop (see the module docstring)."""

    def __init__(self, config: LmtpConfig, *, helo_name: str):
        self._config = config
        self._helo_name = helo_name

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        outcomes, sendable = screen_envelope(request)
        if sendable:
            await self._deliver(request, sendable, outcomes)
        return outcomes.report(request)

    async def close(self) -> None:
        """Nothing is cached: every session ends with its message."""

    async def _deliver(self, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes) -> None:
        relay = "none"
        try:
            endpoint = parse_nexthop(request.nexthop, self._config.port)
        except ValueError:
            text = f"mail system configuration error: bad LMTP nexthop {request.nexthop!r}"
            outcomes.set_all(recipients, Outcome.DEFERRED, "4.3.5", text).site_failed(text)
            return
        try:
            session = await self._connect(endpoint)
            relay = session.peer.relay
            try:
                await self._converse(session, request, recipients, outcomes)
            except BaseException:
                session.abort()
                raise
            await session.quit(min(QUIT_TIMEOUT, self._config.command_timeout))
        except SiteFailure as e:
            log.info("%s: %s", request.queue_id, e.failure.text)
            pending = [r for r in recipients if r not in outcomes.results]
            outcomes.set_all(pending, Outcome.DEFERRED, e.failure.dsn, e.failure.text, relay)
            outcomes.site_failed(e.failure.text)

    # -- connecting

    async def _connect(self, endpoint: Endpoint) -> LmtpSession:
        """A connected session (nothing read yet). Raises SiteFailure when no address could be connected to."""
        if endpoint.path:
            name = f"{self._helo_name}[{endpoint.path}]"
            peer = Peer(name, name)
            return await self._open(peer, partial(asyncio.open_unix_connection, endpoint.path, limit=STREAM_LIMIT))
        failure: SiteFailure | None = None
        for ip in await self._addresses(endpoint):
            peer = Peer(f"{endpoint.host}[{ip}]", f"{endpoint.host}[{ip}]:{endpoint.port}")
            try:
                return await self._open(peer, partial(asyncio.open_connection, ip, endpoint.port, limit=STREAM_LIMIT))
            except SiteFailure as e:
                failure = e
        assert failure is not None  # _addresses never returns an empty list
        raise failure

    async def _addresses(self, endpoint: Endpoint) -> list[str]:
        """The host's addresses in the resolver's order: an IP literal is its own. Raises SiteFailure (4.4.3)."""
        if is_ip_literal(endpoint.host):
            return [endpoint.host]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:
            reason = "lookup timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise SiteFailure(Failure("4.4.3", f"Host or domain name not found. Name service error for "
                                               f"name={endpoint.host}: {reason}")) from None
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not ips:
            raise SiteFailure(Failure("4.4.3", f"Host or domain name not found: {endpoint.host} has no address"))
        return ips

    async def _open(
        self, peer: Peer, connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
    ) -> LmtpSession:
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                reader, writer = await connect()
        except (OSError, TimeoutError) as e:
            raise SiteFailure(Failure("4.4.1", f"connect to {peer.relay}: {os_reason(e)}")) from None
        return LmtpSession(reader, writer, peer)

    # -- the dialogue

    async def _converse(
        self, session: LmtpSession, request: DeliveryRequest, recipients: list[Recipient], outcomes: Outcomes
    ) -> None:
        """Greeting to the last reply after DATA; every recipient ends with a result unless SiteFailure is raised."""
        capabilities = await self._greet(session)
        refusal = server_cannot_take(capabilities, session.peer, request)
        if refusal is not None:
            outcomes.set_all(recipients, Outcome.BOUNCED, refusal.dsn, refusal.text, session.peer.relay)
            return
        accepted = await self._envelope(session, request, recipients, capabilities, outcomes)
        if accepted:
            await self._data(session, request.content, accepted, outcomes, next_hop_notifies="DSN" in capabilities)

    async def _greet(self, session: LmtpSession) -> dict[str, str]:
        """The greeting and LHLO; returns the server's capabilities. A refusal of either is a site failure."""
        timeout = self._config.command_timeout
        greeting = await session.read_reply(timeout, "receiving the initial server greeting")
        if not greeting.positive:
            text = f"host {session.peer.name} refused to talk to me: {one_line(greeting.code, greeting.message)}"
            raise SiteFailure(Failure(reply_dsn(greeting.code, greeting.message, "4"), text))
        lhlo = await session.command(b"LHLO " + self._helo_name.encode("ascii", "replace") + b"\r\n", timeout,
                                     "performing the LHLO handshake")
        if not lhlo.positive:
            text = f"host {session.peer.name} said: {one_line(lhlo.code, lhlo.message)} (in reply to LHLO command)"
            raise SiteFailure(Failure(reply_dsn(lhlo.code, lhlo.message, "4"), text))
        return capabilities(lhlo)

    async def _envelope(
        self,
        session: LmtpSession,
        request: DeliveryRequest,
        recipients: list[Recipient],
        capabilities: dict[str, str],
        outcomes: Outcomes,
    ) -> list[Recipient]:
        """MAIL FROM and the RCPTs; refused recipients get their result now, the accepted are returned in order."""
        commands = [mail_command(request, capabilities), *(rcpt_command(r, capabilities) for r in recipients)]
        if "PIPELINING" in capabilities:
            replies = await self._pipelined(session, commands)
        else:
            replies = await self._lockstep(session, commands)
        mail_reply, rcpt_replies = replies[0], replies[1:]
        if not mail_reply.positive:
            outcomes.results.update(reply_results(recipients, mail_reply, session.peer, "MAIL FROM"))
            return []
        accepted = []
        for r, reply in zip(recipients, rcpt_replies, strict=True):
            if reply.positive:
                accepted.append(r)
            else:
                outcomes.results.update(reply_results([r], reply, session.peer, "RCPT TO"))
        return accepted

    async def _pipelined(self, session: LmtpSession, commands: list[bytes]) -> list[Reply]:
        """All commands in one write (RFC 2920), then one reply each, in order."""
        timeout = self._config.command_timeout
        await session.send(b"".join(commands), timeout, "sending MAIL FROM")
        replies = [await session.read_reply(timeout, "sending MAIL FROM")]
        for _ in commands[1:]:
            replies.append(await session.read_reply(timeout, "sending RCPT TO"))
        return replies

    async def _lockstep(self, session: LmtpSession, commands: list[bytes]) -> list[Reply]:
        """One command, one reply; stops after a refused MAIL FROM (only its reply is returned then)."""
        timeout = self._config.command_timeout
        replies = [await session.command(commands[0], timeout, "sending MAIL FROM")]
        if replies[0].positive:
            for command in commands[1:]:
                replies.append(await session.command(command, timeout, "sending RCPT TO"))
        return replies

    async def _data(
        self, session: LmtpSession, content: Content, accepted: list[Recipient], outcomes: Outcomes, *,
        next_hop_notifies: bool = False,
    ) -> None:
        """DATA, the content, then one final reply per accepted recipient, in RCPT order (RFC 2033 4.2).
        `next_hop_notifies`: the server offered DSN and got the DSN parameters."""
        reply = await session.command(b"DATA\r\n", self._config.command_timeout, "sending DATA command")
        if reply.code != 354:
            if reply.code < 400:
                text = f"host {session.peer.name} said: {one_line(reply.code, reply.message)} " \
                       "(unexpected reply to DATA command)"
                raise SiteFailure(Failure("4.5.0", text))
            outcomes.results.update(reply_results(accepted, reply, session.peer, "DATA"))
            return
        if content.in_memory:
            await session.send(b"".join(smtp_data(content)), self._config.data_timeout, "sending message body")
        else:
            await session.send_stream(asmtp_data(content), self._config.data_timeout, "sending message body")
        for r in accepted:
            reply = await session.read_reply(
                self._config.data_timeout, "sending end of data -- message may be sent more than once"
            )
            outcomes.results.update(reply_results([r], reply, session.peer, "end of DATA",
                                                  next_hop_notifies=next_hop_notifies))


# ---------------------------------------------------------------------------------------------------- one session


class LmtpSession:
    """One connection: send bytes and read complete replies, each within a limit. Every I/O problem becomes
    SiteFailure naming the peer and what was being done. `quit` ends an intact dialogue, `abort` any other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer):
        self._reader = reader
        self._writer = writer
        self.peer = peer

    async def command(self, line: bytes, timeout: float, activity: str) -> Reply:
        await self.send(line, timeout, activity)
        return await self.read_reply(timeout, activity)

    async def send(self, data: bytes, timeout: float, activity: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(data)
                await self._writer.drain()
        except (OSError, TimeoutError) as e:
            raise self._lost(activity, e) from None

    async def send_stream(self, chunks: AsyncIterator[bytes], timeout: float, activity: str) -> None:
        """Write the chunks CHUNK bytes at a time, each write taken by the server within `timeout`."""
        pieces: list[bytes] = []
        size = 0
        async for chunk in chunks:
            pieces.append(chunk)
            size += len(chunk)
            if size >= CHUNK:
                await self.send(b"".join(pieces) if len(pieces) > 1 else pieces[0], timeout, activity)
                pieces, size = [], 0
        await self.send(b"".join(pieces), timeout, activity)

    async def read_reply(self, timeout: float, activity: str) -> Reply:
        try:
            async with asyncio.timeout(timeout):
                return await self._read_reply()
        except (OSError, TimeoutError, EOFError) as e:
            raise self._lost(activity, e) from None
        except MalformedReply as e:
            text = f"host {self.peer.name} sent a malformed reply while {activity}: {e}"
            raise SiteFailure(Failure("4.5.0", text)) from None

    async def _read_reply(self) -> Reply:
        parser = ReplyParser()
        while True:
            try:
                line = await self._reader.readline()
            except ValueError:  # longer than the stream limit
                raise MalformedReply("line too long") from None
            if not line.endswith(b"\n"):
                raise EOFError("connection closed")
            reply = parser.feed(line)
            if reply is not None:
                return reply

    def _lost(self, activity: str, error: BaseException) -> SiteFailure:
        if isinstance(error, TimeoutError):
            return SiteFailure(Failure("4.4.2", f"conversation with {self.peer.name} timed out while {activity}"))
        return SiteFailure(Failure("4.4.2", f"lost connection with {self.peer.name} while {activity}"))

    async def quit(self, timeout: float) -> None:
        """QUIT, briefly (the answers already read stand whatever happens), and close the connection."""
        try:
            await self.command(b"QUIT\r\n", timeout, "sending QUIT")
        except SiteFailure as e:
            log.debug("QUIT failed: %s", e.failure.text)
        finally:
            self._writer.close()
            try:
                async with asyncio.timeout(timeout):
                    await self._writer.wait_closed()
            except (OSError, TimeoutError):
                pass

    def abort(self) -> None:
        """Close at once, without QUIT: the dialogue broke, or the delivery was cancelled."""
        self._writer.transport.abort()


# ---------------------------------------------------------------------------------------------------- replies (sans-IO)


class MalformedReply(Exception):
    """A line that is not `NNN[ -]text`, or a multi-line reply whose codes disagree or never end."""


class ReplyParser:
    """Feed it reply lines (bytes ending in LF); it returns the Reply when its last line came, else None."""

    def __init__(self) -> None:
        self._code: int | None = None
        self._texts: list[str] = []

    def feed(self, line: bytes) -> Reply | None:
        match = _REPLY_LINE.fullmatch(line.rstrip(b"\r\n"))
        if not match:
            raise MalformedReply(repr(line[:80]))
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise MalformedReply(f"reply code changed from {self._code} to {code} within one reply")
        self._code = code
        self._texts.append((match.group(3) or b"").decode("utf-8", "replace").strip())
        if match.group(2) != b"-":
            return Reply(code, "\n".join(self._texts))
        if len(self._texts) >= MAX_REPLY_LINES:
            raise MalformedReply(f"reply longer than {MAX_REPLY_LINES} lines")
        return None


def capabilities(lhlo: Reply) -> dict[str, str]:
    """The LHLO reply's extensions (every line but the first): upper-case keyword -> its parameters."""
    out = {}
    for line in lhlo.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.upper()] = params.strip()
    return out


# ---------------------------------------------------------------------------------------------------- commands (pure)


def parse_nexthop(nexthop: str, default_port: int) -> Endpoint:
    """`unix:/path`, `[host]:port`, `host:port`, `[host]`, `host`, optionally after `inet:`. Raises ValueError."""
    value = nexthop.strip()
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path:
            raise ValueError(f"{nexthop!r} names no socket")
        return Endpoint(path=path)
    host, port = parse_hostport(value.removeprefix("inet:"), default_port)
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ValueError(f"{nexthop!r} names no host")
    return Endpoint(host=host, port=port)


def uses_smtputf8(capabilities: dict[str, str], request: DeliveryRequest) -> bool:
    return "SMTPUTF8" in capabilities and (request.smtputf8 or needs_smtputf8(request))


def server_cannot_take(capabilities: dict[str, str], peer: Peer, request: DeliveryRequest) -> Failure | None:
    """A reason to bounce before MAIL FROM: the message needs an extension or a size the server does not offer."""
    if needs_smtputf8(request) and "SMTPUTF8" not in capabilities:
        return Failure("5.6.7", f"SMTPUTF8 is required, but was not offered by host {peer.name}")
    limit = capabilities.get("SIZE", "")
    if limit.isdigit() and int(limit) and request.content.size > int(limit):
        return Failure("5.3.4", f"message size {request.content.size} exceeds size limit {limit} of server {peer.name}")
    return None


def mail_command(request: DeliveryRequest, capabilities: dict[str, str]) -> bytes:
    """`MAIL FROM:<sender>` with the parameters the server offers and the message calls for, CRLF-terminated."""
    params = []
    if "SIZE" in capabilities:
        params.append(f"SIZE={request.content.size}")
    if request.body_type.upper() == "8BITMIME" and "8BITMIME" in capabilities:
        params.append("BODY=8BITMIME")
    if uses_smtputf8(capabilities, request):
        params.append("SMTPUTF8")
    if "DSN" in capabilities:
        params += [p.decode("ascii") for p in dsn_mail_params(request)]
    line = f"MAIL FROM:<{request.sender}>" + "".join(" " + p for p in params)
    return line.encode("utf-8") + b"\r\n"


def rcpt_command(recipient: Recipient, capabilities: dict[str, str] | None = None) -> bytes:
    """`RCPT TO:<address>`, with ORCPT and NOTIFY when the server offers DSN, CRLF-terminated."""
    params = dsn_rcpt_params(recipient) if capabilities and "DSN" in capabilities else []
    return b" ".join([b"RCPT TO:<" + recipient.address.encode("utf-8") + b">", *params]) + b"\r\n"
