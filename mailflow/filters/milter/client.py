"""The Milter client's asyncio edge: one connection to one milter for one SMTP session, and the session that
asks every milter of a listener in turn (Postfix smtpd_milters).

    MilterSettings.from_config(config, size_limit)    timeouts, default action, protocol version, soft_bounce,
                                                      and smtpd.message_size_limit (0: none) for the edits
    MilterSession(specs, settings, macros)            one per SMTP session (made at its greeting)
        await connect(client) / helo(name) / mail(sender, options, written=None) / rcpt(address, queue_id,
            written=None) -> Verdict     `written`: the address as the command gave it (default: the address), the
            milters' argument, as Postfix passes the command's own words (milter_argv); the macro ({mail_addr},
            {rcpt_addr}) is the address as smtpd took it (a stamped probe sender of this server's, unstamped)
        await end_of_message(head, body, queue_id) -> Verdict (with `edits` for the message)
        abort()  (the transaction ends without a message)     await close()  (QUIT, then the sockets)
        standing_refusal() -> Reply | None   what holds for the session (Postfix's milter_other_event)
    Verdict(action, reply, edits, reason)     action: continue, reject, tempfail, discard, quarantine
    Edits: header changes, sender and recipient changes, a replaced body, as the milters asked at end of message;
           `too_big`: they came to more than the size limit (only what fits was kept; see message); an edit that
           cannot be made (no header name, no address, a bad argument) is ignored with a warning, the first
           IGNORED_EDITS_LOGGED of each milter and message each, the rest in one line with their count
           (`ignored`), written when the milter's final reply comes or it fails

What a milter says (per Postfix): accept -> it is not asked again for this message; continue -> the next
milter is asked; reject / tempfail / replycode -> the command (or the message) is refused with that reply
(550 5.7.1 Command rejected, 451 4.7.1 Service unavailable - try again later, or the milter's own reply);
shutdown -> 421 4.7.0 Server closing connection (smtpd closes the session after any 421);
discard -> the message is accepted and dropped; quarantine -> it is queued on hold. A quarantine is no
final reply: the event's own reply follows it (continue: the message is held and the session goes on; a
refusal wins), as Postfix's milter8 reads on. Progress replies extend the deadline. A reply to connect or HELO
holds for the whole SMTP session (Postfix's milter8): accept -> the milter is not asked again; reject / tempfail
-> HELO is still answered 250, and that reply answers every later MAIL; discard is not allowed there (logged, it
means continue). A milter that cannot be reached, that times out (connect_timeout for the connection, command_timeout
for the negotiation and per command, content_timeout for the message: each bounds a whole reply however
slowly it comes, where Postfix's bounds each read; asyncio.timeout each: wait_for's task would be held in a cycle
with the failure it raised) or breaks the protocol is closed for the rest of the session and `default_action`
answers for it: tempfail (451 4.7.1), reject (550 5.5.0 Service unavailable), accept (as if it were not configured) or
quarantine (hold); one whose own reply is malformed (status.milter_reply) is closed as misconfigured: 451 4.3.5
Server configuration problem unless the action is accept or quarantine. Logged once per failure.

Macros: Postfix 3.7's default lists (DEFAULT_MACROS), or for a stage a milter asked for with SETSYMLIST its list,
of what mailflow has there: at connect j, {daemon_name}, {daemon_addr}, v, _ (by default), {client_addr},
{client_name}, {client_port}, {daemon_port} (the server's address and port: behind a PROXY header the ones it
names; no {daemon_port} for non_smtpd_milters); at HELO {tls_version}, {cipher}, {cipher_bits}, {cert_subject},
{cert_issuer}; at MAIL {mail_addr}, {auth_type}, {auth_authen}; at RCPT i (the queue id, once the transaction has
one: from the RCPT after its first accepted one, as Postfix's smtpd has it) and {rcpt_addr}; i with DATA, each
header, end of headers, each body chunk and end of message (Postfix's milter8 sends the end-of-header macros with
each header, the end-of-data ones with each body chunk). Of a SETSYMLIST list the first p.MACRO_NAMES_LIMIT
names are kept (a set), the rest ignored with a warning at the negotiation.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from mailflow import dsn_parameters, status
from mailflow.address import TOKENIZER_BLANKS, PathError, mailbox_syntax_error, parse_path, split
from mailflow.filters.edits import is_field_name
from mailflow.filters.milter import protocol as p
from mailflow.message import drop_header_names, header_fields
from mailflow.syntax import COMMAND_BLANKS, parse_endpoint

log = logging.getLogger("mailflow.smtpd")

DEFAULT_ACTIONS = ("tempfail", "accept", "reject", "quarantine")
# what one kept header or recipient edit costs in memory beyond its payload (its objects: strings, tuple, list slot;
# measured 63 to 125 bytes with CPython 3.11), counted against the size limit with it
EDIT_COST = 128
# what one kept body replacement chunk costs beyond its bytes (one bytes object, 33, and its list slot, 8): libmilter
# sends the chunks as the milter gave them, so one that rewrites the body line by line sends many small ones
BODY_CHUNK_COST = 48
# edits of one message (and milter) ignored with a warning of their own; past them they are counted, and the count is
# told in one line when the milter's final reply comes or it fails: a flood of bad edits costs a few lines, not one each
IGNORED_EDITS_LOGGED = 10
# end-of-message replies taken in one turn of the event loop at most: those of a milter's burst, already read, are taken
# without a pause (10 000 header edits held the loop 0.4 s), and the size limit bounds them only in bytes
REPLY_SLICE = 100


@dataclass(frozen=True)
class MilterSettings:
    default_action: str
    protocol: int
    connect_timeout: float
    command_timeout: float
    content_timeout: float
    size_limit: int = 0  # the most bytes of edits kept of one message (smtpd.message_size_limit; 0: no limit)
    soft_bounce: bool = False  # a milter's own 5xx reply (REPLYCODE) is read as a 4xx, as Postfix's milter8 reads it
    drop_headers: frozenset[str] = frozenset()  # message_drop_headers (lower-case): never shown to a milter

    @classmethod
    def from_config(cls, config, size_limit: int = 0) -> "MilterSettings":
        """`config`: the whole configuration (its [milter] section and soft_bounce)."""
        milter = config.milter
        return cls(milter.default_action, milter.protocol, milter.connect_timeout, milter.command_timeout,
                   milter.content_timeout, size_limit, config.soft_bounce,
                   drop_header_names(config.message_drop_headers))


@dataclass
class Edits:
    """What milters asked at the end of a message, in the order asked."""

    headers: list[tuple[str, int, str, str]] = field(default_factory=list)  # (add|insert|change, index, name, value)
    sender: tuple[str, str] | None = None  # (address, ESMTP arguments)
    add_recipients: list[str] = field(default_factory=list)
    add_recipient_dsn: list[tuple[str, str]] = field(default_factory=list)  # beside each: (NOTIFY, ORCPT), "" none
    delete_recipients: list[str] = field(default_factory=list)
    body: list[bytes] | None = None  # a replaced body, chunk by chunk
    quarantine: str | None = None
    size: int = 0  # bytes of the modification requests read
    too_big: bool = False  # more than the size limit: what came after it was dropped
    ignored: int = 0  # edits (or arguments of one) ignored, each with a warning up to IGNORED_EDITS_LOGGED

    def __bool__(self) -> bool:
        return bool(self.headers or self.sender or self.add_recipients or self.delete_recipients
                    or self.body is not None or self.quarantine or self.too_big)

    def fits(self, reply: p.Reply, limit: int) -> bool:
        """Count a modification request; False (and `too_big` from then on) once they exceed `limit` (0: none), as
        Postfix's queue file stops at message_size_limit: nothing past it is kept. Each counts its payload and
        EDIT_COST, what keeping one costs beyond it, so that what is kept stays within about the limit in memory too
        (counted by payload only, a flood of 3-byte DELRCPTs held 20 times the limit). A body chunk (REPLBODY) is
        one bytes object, its cost BODY_CHUNK_COST (at EDIT_COST a body replaced in 80-byte lines, about 1.6 times
        its size in memory, was counted 2.6 times: a 4 MB one was too big for a 10 MB limit)."""
        self.size += len(reply.payload) + (BODY_CHUNK_COST if reply.command == p.REPLBODY else EDIT_COST)
        self.too_big = self.too_big or 0 < limit < self.size
        return not self.too_big


@dataclass
class Verdict:
    action: str = "continue"  # continue, reject, tempfail, discard, quarantine
    reply: status.Reply | None = None
    edits: Edits = field(default_factory=Edits)
    reason: str = ""


CONTINUE = Verdict()


class MilterFailed(Exception):
    """The milter cannot be talked to (down, slow, broken)."""


class MilterConnection:
    """One milter for one SMTP session (one socket, opened at the session's greeting)."""

    def __init__(self, spec: str, settings: MilterSettings):
        self.spec = spec
        self._settings = settings
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = p.Decoder()
        self._replies: deque[p.Reply] = deque()
        self.negotiated: p.Negotiated | None = None
        self.failed = False  # closed for the rest of the session (default_action answered for it)
        self.accepted = False  # said accept: not asked again for this message
        # what answers for it for the rest of the session: its accept/reject/tempfail at connect or HELO, or
        # after a failure its default action
        self.session_verdict: Verdict | None = None
        self.in_message = False  # MAIL was sent and the message not ended

    async def open(self) -> None:
        """The connection within connect_timeout, the negotiation's reply within command_timeout (Postfix's
        milter8_connect)."""
        kind, host, port = parse_endpoint(self.spec)
        try:
            if kind == "unix":
                opening = asyncio.open_unix_connection(host)
            else:
                opening = asyncio.open_connection(host, port)
            async with asyncio.timeout(self._settings.connect_timeout):
                self._reader, writer = await opening
            self._writer = writer
            writer.write(p.optneg(self._settings.protocol))
            reply = await self._read(self._settings.command_timeout)
            self.negotiated = p.Negotiated.from_reply(reply)
            if self.negotiated.macro_lists_cut:
                log.warning("milter %s: macro list of stage %s longer than %d names: the rest ignored", self.spec,
                            ", ".join(map(str, self.negotiated.macro_lists_cut)), p.MACRO_NAMES_LIMIT)
            for stage in self.negotiated.macro_stages_unknown:  # (Postfix's milter8: one warning a list)
                log.warning("milter %s: ignoring unknown macro type %d", self.spec, stage)
        except (OSError, TimeoutError, p.ProtocolError, asyncio.IncompleteReadError) as e:
            raise MilterFailed(_why(e)) from None

    async def send(self, command: bytes, packet: bytes,
                   stage_macros: bytes = b"") -> tuple[p.Reply, str | None] | None:
        """Send one event (with its macros); its reply and the reason of a quarantine before it (`_event_reply`),
        or None when the milter asked for none."""
        assert self._writer is not None and self.negotiated is not None
        try:
            if stage_macros:
                self._writer.write(stage_macros)
            self._writer.write(packet)
            if not self.negotiated.answers(command):
                async with asyncio.timeout(self._settings.command_timeout):
                    await self._writer.drain()
                return None
            return await self._event_reply(self._settings.command_timeout)
        except (OSError, TimeoutError, p.ProtocolError, asyncio.IncompleteReadError) as e:
            raise MilterFailed(_why(e)) from None

    async def end_of_message(self, events: AsyncIterator[tuple[bytes, bytes]], macros: dict[bytes, bytes],
                             queue_id: str = "", counted: int = 0) -> tuple[p.Reply, Edits]:
        """DATA, headers, EOH, body chunks (stopped by a SKIP reply), EOB, each after its `macros` packet (by
        command; none when absent): the final reply and the edits (an edit ignored is logged under `queue_id`).
        `counted`: the size of the edits the milters before this one made to the message (the limit is the
        message's): the edits' `size` starts from it."""
        assert self._writer is not None and self.negotiated is not None
        n = self.negotiated
        edits = Edits(size=counted)
        timeout = self._settings.content_timeout
        skipping = False  # the milter answered a body chunk with SKIP: it wants no more of the body
        who = f"{queue_id or 'NOQUEUE'}: milter {self.spec}"
        try:
            async for command, packet in events:
                if n.skips(command) or (skipping and command == p.BODY):
                    continue
                if command in macros:  # (two writes: a body chunk is not copied to be joined to its macros)
                    self._writer.write(macros[command])
                self._writer.write(packet)
                if n.answers(command):
                    reply, held = await self._event_reply(timeout)
                    edits.quarantine = held or edits.quarantine
                    skipping = reply.command == p.SKIP
                    if reply.command not in (p.CONTINUE, p.SKIP):
                        return reply, edits
                else:
                    async with asyncio.timeout(timeout):
                        await self._writer.drain()
            self._writer.write(macros.get(p.BODYEOB, b"") + p.encode(p.BODYEOB))
            read = 0
            while True:  # read on to the final reply past edits too big to keep (the dialogue stays in step)
                reply = await self._read(timeout)
                if reply.command in p.FINAL:
                    return reply, edits
                if edits.fits(reply, self._settings.size_limit):
                    _collect(reply, edits, who)
                read += 1
                if read % REPLY_SLICE == 0:  # (replies already read are taken without a pause: one turn)
                    await asyncio.sleep(0)
        except (OSError, TimeoutError, p.ProtocolError, asyncio.IncompleteReadError) as e:
            raise MilterFailed(_why(e)) from None
        finally:  # (the milter failing after its edits too: a timeout, a reply out of place)
            _tell_unlogged(edits, who)

    def write(self, packet: bytes) -> None:
        """A command without reply (ABORT, QUIT); a failure to send shows at the next command."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(packet)

    async def close(self) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            if not writer.is_closing():
                writer.write(p.encode(p.QUIT))
            writer.close()
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (OSError, TimeoutError):  # a milter that does not take what is still unsent: it is dropped (the
            writer.transport.abort()  # close would keep the socket for as long as the milter keeps it open)
        except BaseException:  # the close cancelled (a stop): dropped too, as the cancellation goes on
            writer.transport.abort()
            raise

    async def _event_reply(self, timeout: float) -> tuple[p.Reply, str | None]:
        """An event's final reply, read past the quarantines before it (each one's reason kept: the last)."""
        held = None
        while True:
            reply = await self._read(timeout)
            if reply.command != p.QUARANTINE:
                return reply, held
            held = reply.text() or "milter quarantine"

    async def _read(self, timeout: float) -> p.Reply:
        """The next reply that is not PROGRESS, each whole within `timeout` (a reply dribbled a byte at a time ends
        there too, where a deadline per read would never come); each progress reply restarts the deadline."""
        while True:
            async with asyncio.timeout(timeout):
                reply = await self._next_packet()
            if reply.command != p.PROGRESS:
                return reply

    async def _next_packet(self) -> p.Reply:
        assert self._reader is not None
        while not self._replies:
            data = await self._reader.read(65536)
            if not data:
                raise p.ProtocolError("the milter closed the connection")
            self._replies.extend(self._decoder.feed(data))
        return self._replies.popleft()


def _collect(reply: p.Reply, edits: Edits, who: str) -> None:
    """One modification action of an end-of-message reply; `who` begins each warning (`QID: milter SPEC`, as
    Postfix's cleanup prefixes its queue id)."""
    c = reply.command
    if c in (p.ADDHEADER, p.INSHEADER, p.CHGHEADER):
        index, strings = reply.index_and_strings() if c != p.ADDHEADER else (0, reply.strings())
        name, value = (strings + ["", ""])[:2]
        if not is_field_name(name):  # (Postfix writes it, and a name with a space ends the header section)
            _ignored(edits, "%s: header name %r is not one: edit ignored", who, name[:100])
            return
        kind = {p.ADDHEADER: "add", p.INSHEADER: "insert", p.CHGHEADER: "change"}[c]
        edits.headers.append((kind, index, name, value))
    elif c == p.CHGFROM:
        strings = reply.strings()
        sender = _envelope_address(reply.text())
        if sender is None:
            _ignored(edits, "%s: new sender %r is not an address: edit ignored", who, reply.text()[:100])
            return
        edits.sender = (f"<{sender}>", " ".join(strings[1:]))
    elif c in (p.ADDRCPT, p.ADDRCPT_PAR):
        recipient = _envelope_address(reply.text())
        if not recipient:
            _ignored(edits, "%s: added recipient %r is not an address: edit ignored", who, reply.text()[:100])
            return
        edits.add_recipients.append(f"<{recipient}>")
        edits.add_recipient_dsn.append(_added_dsn(edits, who, reply.strings()[1] if c == p.ADDRCPT_PAR
                                                  and len(reply.strings()) > 1 else ""))
    elif c == p.DELRCPT:
        edits.delete_recipients.append(reply.text())
    elif c == p.REPLBODY:
        edits.body = edits.body if edits.body is not None else []
        edits.body.append(reply.payload)
    elif c == p.QUARANTINE:
        edits.quarantine = reply.text() or "milter quarantine"
    else:
        raise p.ProtocolError(f"unexpected reply {c!r} at end of message")


def _ignored(edits: Edits, text: str, who: str, *args: object) -> None:
    """An edit (or an argument of one) ignored: warned of if it is among the first IGNORED_EDITS_LOGGED of this
    milter for this message (`edits` are one milter's for one message), else only counted (`_tell_unlogged`)."""
    edits.ignored += 1
    if edits.ignored <= IGNORED_EDITS_LOGGED:
        log.warning(text, who, *args)


def _tell_unlogged(edits: Edits, who: str) -> None:
    """The one line for the ignored edits of a milter for a message that had no warning of their own (an ignored
    argument of an added recipient counts too: the recipient is added, its argument is not)."""
    if edits.ignored > IGNORED_EDITS_LOGGED:
        log.warning("%s: %d more edits or edit arguments ignored", who, edits.ignored - IGNORED_EDITS_LOGGED)


def _added_dsn(edits: Edits, who: str, arguments: str) -> tuple[str, str]:
    """The (NOTIFY, ORCPT) of an ADDRCPT_PAR's ESMTP arguments, as Postfix's cleanup takes them: values checked as
    smtpd checks them (mailflow.dsn_parameters); a bad one, one given twice or any other argument is logged and
    ignored (the recipient keeps the default)."""
    notify = orcpt = ""
    for argument in arguments.split():
        name, _, value = argument.partition("=")
        try:
            if name.upper() == "NOTIFY" and not notify:
                notify = dsn_parameters.notify(value)
            elif name.upper() == "ORCPT" and not orcpt:
                orcpt = dsn_parameters.orcpt(value) or orcpt
            else:
                _ignored(edits, "%s: ignoring ESMTP argument %r of an added recipient", who, argument[:100])
        except dsn_parameters.DsnError:
            _ignored(edits, "%s: bad %s parameter of an added recipient: %r", who, name.upper(), argument[:100])
    return notify, orcpt


def _envelope_address(text: str) -> str | None:
    """The address a milter's CHGFROM or ADDRCPT names ("" for `<>`), or None when it is not one: a path as
    MAIL FROM and RCPT TO take it, nothing after it, no control character, a valid domain when it has one.
    (Postfix makes something of anything, `not an address` becoming `not@$myorigin`; a milter's typo should not
    become a recipient.) One pair of angle brackets: a nested pair (`<<a@b>>`, `< <a@b> >`, `< <>>`), which MAIL FROM
    and RCPT TO take as Postfix's smtpd strips one, is none (Postfix's cleanup strips no pair: `< <>>` is the sender
    `">"@$myorigin` to it, never the null sender it would be here)."""
    path = text.lstrip(COMMAND_BLANKS)
    if path[:1] == "<" and path[1:].lstrip(TOKENIZER_BLANKS)[:1] == "<":
        return None
    try:
        address, rest = parse_path(text)
    except PathError:
        return None
    if rest:
        return None
    if address and mailbox_syntax_error(address if split(address)[1] else f"{address}@localhost"):
        return None  # too long, a control character, a bad domain
    return address


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, asyncio.IncompleteReadError):
        return "the milter closed the connection"
    return str(error) or type(error).__name__


@dataclass(frozen=True)
class ClientMacros:
    """What the connect and HELO macros say of the SMTP session."""

    myhostname: str
    daemon_name: str
    daemon_addr: str
    daemon_port: str  # as the session has it (XCLIENT DESTPORT's digits as sent); "": none
    client_addr: str
    client_name: str
    client_port: str  # the digits as the session has them (XCLIENT PORT's as sent: 00025), "0" when unknown


class MilterSession:
    """Every milter of one listener, for one SMTP session. See the module doc."""

    def __init__(self, specs: tuple[str, ...], settings: MilterSettings, client: ClientMacros):
        self._settings = settings
        self._client = client
        self._milters = [MilterConnection(spec, settings) for spec in specs]
        self._opened = False
        self._mail_macros: dict[str, str] = {}

    @property
    def size_limit(self) -> int:
        """The most a message may come to with the milters' edits (0: no limit)."""
        return self._settings.size_limit

    @property
    def drop_headers(self) -> frozenset[str]:
        """The header fields (lower-case names) cleanup removes, which no milter is shown (message_drop_headers)."""
        return self._settings.drop_headers

    # -------------------------------------------------------------------------------- events

    async def connect(self) -> Verdict:
        """Open every milter and send the connect event, once per session (later calls: continue; what a milter
        said at connect answers for it at each later event)."""
        if self._opened:
            return CONTINUE
        self._opened = True
        c = self._client
        port = {"{daemon_port}": c.daemon_port} if c.daemon_port else {}
        values = {"j": c.myhostname, "{daemon_name}": c.daemon_name, "{daemon_addr}": c.daemon_addr, **port,
                  "v": "mailflow", "_": f"{c.client_name} [{c.client_addr}]", "{client_addr}": c.client_addr,
                  "{client_name}": c.client_name, "{client_port}": c.client_port}
        number = int(c.client_port)  # (the packet's is a number; XCLIENT PORT takes five digits: 99999 too)
        port_ok = 0 <= number <= 65535
        packet = p.connect(c.client_name, c.client_addr, number if port_ok else 0)
        for milter in self._milters:
            try:
                await milter.open()
            except MilterFailed as e:
                verdict = self._failed(milter, e)
                if verdict.action != "continue":
                    return verdict
                continue
            if not port_ok:  # Postfix's milter8_conn_event: warned, and 0 sent, milter by milter
                log.warning("milter %s: bad client port number %s", milter.spec, c.client_port)
            verdict = await self._ask(milter, p.CONNECT, packet, values)
            if verdict.action in ("reject", "tempfail"):
                return verdict
        return CONTINUE

    async def helo(self, name: str, tls: dict[str, str] | None = None) -> Verdict:
        verdict = await self.connect()
        if verdict.action != "continue":
            return verdict
        return await self._each(p.HELO, p.helo(name), dict(tls or {}))

    async def mail(self, sender: str, options: list[str], auth: tuple[str, str] = ("", ""),
                   written: str | None = None) -> Verdict:
        verdict = await self.connect()
        if verdict.action != "continue":
            return verdict
        self.abort()  # a transaction that ended without its message
        for milter in self._milters:
            milter.accepted = False
        values = {"{mail_addr}": sender}
        if auth[1]:
            values.update({"{auth_type}": auth[0], "{auth_authen}": auth[1]})
        self._mail_macros = values
        verdict = await self._each(p.MAIL, p.mail([f"<{sender if written is None else written}>", *options]), values)
        for milter in self._milters:
            milter.in_message = milter.session_verdict is None
        return verdict

    async def rcpt(self, address: str, queue_id: str = "", written: str | None = None) -> Verdict:
        """`queue_id`: the transaction's ("" before its first accepted recipient), the `i` macro."""
        argument = f"<{address if written is None else written}>"
        return await self._each(p.RCPT, p.rcpt([argument]), {**_i(queue_id), "{rcpt_addr}": address})

    async def end_of_message(self, head: bytes, body, queue_id: str = "") -> Verdict:
        """The message (its header section, then its body: `body()` gives it as a stream, once per milter):
        the first milter that does not say continue/accept decides; the edits of all of them are gathered.
        `queue_id`: the message's (the `i` macro of its events), "" when it has none yet."""
        result = Verdict()
        for milter in self._milters:
            standing = milter.session_verdict  # it failed (its default action), or answered connect or HELO
            if standing is not None:
                if standing.action == "quarantine":
                    result.edits.quarantine = standing.reason
                elif standing.action != "continue":
                    return standing
                continue
            if milter.accepted or milter.negotiated is None:
                continue
            try:
                reply, edits = await milter.end_of_message(_events(head, body, milter.negotiated),
                                                           _message_macros(_i(queue_id), milter), queue_id,
                                                           result.edits.size)
            except MilterFailed as e:
                verdict = self._failed(milter, e)
            else:
                milter.in_message = False
                _merge(result.edits, edits)
                verdict = self._verdict(reply, milter)
            if verdict.action == "quarantine":
                result.edits.quarantine = verdict.reason or "milter quarantine"
                continue
            if verdict.action not in ("continue", "accept"):
                verdict.edits = result.edits
                return verdict
        if result.edits.quarantine:
            result.action = "quarantine"
        return result

    def standing_refusal(self) -> status.Reply | None:
        """Postfix's milter_other_event (asked before VRFY, ETRN, STARTTLS and AUTH): the first milter's answer that
        holds for the session (at connect or HELO, or its default action after a failure), when that is a refusal;
        None when it is not (a quarantine) or no milter has one."""
        for milter in self._milters:
            standing = milter.session_verdict
            if standing is not None and standing.action != "continue":
                return standing.reply if standing.action in ("reject", "tempfail") else None
        return None

    def abort(self) -> None:
        """The transaction ended without a message: milters in one are told to forget it."""
        for milter in self._milters:
            if milter.in_message and not milter.failed:
                milter.write(p.encode(p.ABORT))
            milter.in_message = False

    async def close(self) -> None:
        await asyncio.gather(*(m.close() for m in self._milters))

    # -------------------------------------------------------------------------------- asking

    async def _each(self, command: bytes, packet: bytes, values: dict[str, str]) -> Verdict:
        for milter in self._milters:
            # it failed (its default action answers for it) or answered connect or HELO: for the rest of the
            # session (Postfix)
            standing = milter.session_verdict
            if standing is not None:
                if standing.action != "continue":
                    return standing
                continue
            if milter.accepted or milter.negotiated is None:
                continue
            verdict = await self._ask(milter, command, packet, values)
            if verdict.action == "accept":
                milter.accepted = True
            elif verdict.action != "continue":
                return verdict
        return CONTINUE

    async def _ask(self, milter: MilterConnection, command: bytes, packet: bytes, values: dict[str, str]) -> Verdict:
        if milter.negotiated is None or milter.negotiated.skips(command):
            return CONTINUE
        try:
            answer = await milter.send(command, packet, _macro_packet(command, values, milter))
        except MilterFailed as e:
            return self._failed(milter, e)
        verdict = CONTINUE if answer is None else self._verdict(answer[0], milter)
        if answer is not None and answer[1] is not None and verdict.action in ("continue", "accept"):
            verdict = Verdict("quarantine", reason=answer[1])  # (held; a refusal after it wins, as in Postfix)
        return self._for_session(milter, verdict) if command in (p.CONNECT, p.HELO) else verdict

    @staticmethod
    def _for_session(milter: MilterConnection, verdict: Verdict) -> Verdict:
        """A reply to connect or HELO (Postfix's milter8): accept, reject and tempfail hold for the rest of the
        SMTP session (the milter is not asked again; a refusal answers every later MAIL), and discard is not
        allowed there (logged; it means continue)."""
        if verdict.action == "discard":
            log.warning("milter %s: DISCARD action is not allowed for connect or helo", milter.spec)
            return CONTINUE
        if verdict.action in ("accept", "reject", "tempfail"):
            milter.session_verdict = CONTINUE if verdict.action == "accept" else verdict
        return verdict

    def _verdict(self, reply: p.Reply, milter: MilterConnection) -> Verdict:
        c = reply.command
        if c == p.CONTINUE or c == p.SKIP:
            return CONTINUE
        if c == p.ACCEPT:
            milter.accepted = True
            return Verdict("accept")
        if c == p.REJECT:
            return Verdict("reject", status.MILTER_REJECTED, reason=f"milter {milter.spec}")
        if c == p.TEMPFAIL:
            return Verdict("tempfail", status.FILTER_UNAVAILABLE, reason=f"milter {milter.spec}")
        if c == p.DISCARD:
            return Verdict("discard", reason=f"milter {milter.spec}")
        if c == p.REPLYCODE:
            reply_text = status.milter_reply(reply.text(), soft_bounce=self._settings.soft_bounce)
            if reply_text is None:  # Postfix: a configuration error
                return self._failed(milter, MilterFailed(f"malformed reply: {reply.text()!r}"), configuration=True)
            return Verdict("reject" if reply_text.code >= 500 else "tempfail", reply_text,
                           reason=f"milter {milter.spec}")
        if c == p.SHUTDOWN:  # Postfix: 421, and the milter answers so for the rest of the session
            milter.session_verdict = Verdict("tempfail", status.MILTER_SHUTDOWN, reason=f"milter {milter.spec}")
            return milter.session_verdict
        return self._failed(milter, MilterFailed(f"unexpected reply {c!r}"))

    def _failed(self, milter: MilterConnection, error: MilterFailed, configuration: bool = False) -> Verdict:
        """A milter that cannot be talked to, or that is misconfigured (`configuration`: a malformed reply of its
        own): closed for this session; `default_action` answers for it from now on."""
        log.warning("milter %s: %s; milter_default_action %s", milter.spec, error, self._settings.default_action)
        milter.failed = True
        asyncio.get_running_loop().create_task(milter.close())
        milter.session_verdict = self._default_action(milter, str(error), configuration)
        return milter.session_verdict

    def _default_action(self, milter: MilterConnection, error: str, configuration: bool) -> Verdict:
        """Postfix's milter8_comm_error and milter8_conf_error: accept, quarantine, else a reply (a configuration
        error is 451 4.3.5 whatever the action)."""
        action, reason = self._settings.default_action, f"milter {milter.spec}: {error}"
        if action == "accept":
            return CONTINUE
        if action == "quarantine":
            return Verdict("quarantine", reason=reason)
        if configuration:
            return Verdict("tempfail", status.MILTER_CONFIGURATION_PROBLEM, reason=reason)
        if action == "reject":
            return Verdict("reject", status.MILTER_UNAVAILABLE, reason=reason)
        return Verdict("tempfail", status.FILTER_UNAVAILABLE, reason=reason)


# Postfix 3.7's milter_connect_macros, milter_helo_macros, milter_mail_macros, milter_rcpt_macros, milter_data_macros,
# milter_end_of_header_macros and milter_end_of_data_macros (postconf -d; names without braces): what a milter that
# asked for none of a stage's (SETSYMLIST) is sent there, of what mailflow has (not {auth_author}, {mail_host},
# {mail_mailer}, {rcpt_host}, {rcpt_mailer})
DEFAULT_MACROS: dict[bytes, frozenset[str]] = {
    p.CONNECT: frozenset({"j", "daemon_name", "daemon_addr", "v", "_"}),
    p.HELO: frozenset({"tls_version", "cipher", "cipher_bits", "cert_subject", "cert_issuer"}),
    p.MAIL: frozenset({"i", "auth_type", "auth_authen", "auth_author", "mail_addr", "mail_host", "mail_mailer"}),
    p.RCPT: frozenset({"i", "rcpt_addr", "rcpt_host", "rcpt_mailer"}),
    p.DATA: frozenset({"i"}), p.EOH: frozenset({"i"}), p.BODYEOB: frozenset({"i"}),
}

# the macro stage whose macros each message event carries (Postfix's milter8: the end-of-header macros with each
# header, the end-of-data ones with each body chunk)
MESSAGE_MACRO_STAGES = {p.DATA: p.DATA, p.HEADER: p.EOH, p.EOH: p.EOH, p.BODY: p.BODYEOB, p.BODYEOB: p.BODYEOB}


def _i(queue_id: str) -> dict[str, str]:
    """The `i` macro (the queue id), when there is one."""
    return {"i": queue_id} if queue_id else {}


def _message_macros(values: dict[str, str], milter: MilterConnection) -> dict[bytes, bytes]:
    """The macro packet sent before each message event, by event (empty: none)."""
    return {event: _macro_packet(event, values, milter, stage) for event, stage in MESSAGE_MACRO_STAGES.items()}


def _macro_packet(command: bytes, values: dict[str, str], milter: MilterConnection, stage: bytes = b"") -> bytes:
    """The macros of one event: of those mailflow has there, the ones the milter asked for at its `stage` (by
    default the event's own) with SETSYMLIST, else Postfix's default list for that stage (its MILTER_MACRO_EVAL)."""
    asked = milter.negotiated.macros.get(stage or command) if milter.negotiated else None
    wanted = DEFAULT_MACROS.get(stage or command, frozenset()) if asked is None else asked
    values = {k: v for k, v in values.items() if k.strip("{}") in wanted}
    return p.macros(command, values) if values else b""


def _merge(into: Edits, edits: Edits) -> None:
    into.headers += edits.headers
    into.sender = edits.sender or into.sender
    into.add_recipients += edits.add_recipients
    into.add_recipient_dsn += edits.add_recipient_dsn
    into.delete_recipients += edits.delete_recipients
    into.body = edits.body if edits.body is not None else into.body
    into.quarantine = edits.quarantine or into.quarantine
    into.size = edits.size  # (it started from into.size: end_of_message's `counted`)
    into.too_big = into.too_big or edits.too_big


async def _events(head: bytes, body, negotiated: p.Negotiated):
    """DATA, each header, EOH, the body in chunks: (command, packet) in order."""
    yield p.DATA, p.encode(p.DATA)
    leading_space = bool(negotiated.protocol & p.HDR_LEADSPC)
    for name, lines in header_fields(head):
        if not name:
            continue
        raw = b"".join(lines).decode("utf-8", "replace")
        field_name, _, value = raw.partition(":")
        value = value.rstrip("\r\n").replace("\r\n", "\n")
        if not leading_space and value.startswith(" "):
            value = value[1:]
        yield p.HEADER, p.header(field_name, value)
    yield p.EOH, p.encode(p.EOH)
    if body is not None and not negotiated.skips(p.BODY):
        async for chunk in body():
            for i in range(0, len(chunk), p.BODY_CHUNK):
                yield p.BODY, p.encode(p.BODY, chunk[i:i + p.BODY_CHUNK])
