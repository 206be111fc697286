"""Peers a mailflow under test talks to, run in-process on the test's own loop.

- `CapturePeer` / `CaptureHandler` / `Captured`: an aiosmtpd SMTP server (started by the `smtp_peer` fixture of
  tests/conftest.py) that records each accepted message as a `Captured`; the handler's `mail_reply`,
  `rcpt_replies[address]` and `data_reply` script refusals (reply lines as the peer would send them).
- `stall_mail(peer)`: the peer holds each MAIL until the returned event is set (a slow destination);
  `peer.handler.stalled` counts the MAIL commands that waited.
- `record_senders(peer)`: the list of the senders of every MAIL the peer gets, messages or not (address probes).
- `garbling_lmtp(reader, writer)`: an `asyncio.start_server` LMTP server that offers PIPELINING and SMTPUTF8
  without 8BITMIME and puts a line that is no reply before its answer to MAIL (the LMTP client's own log lines).
- `recording_peer(*keywords)`: an SMTP server on 127.0.0.1 that offers `keywords` (say "DSN", "SMTPUTF8"),
  answers 250 to every command (354 to DATA) and records each command line as sent (bytes, CRLF removed):
  (port, lines). For what a client writes where aiosmtpd would refuse it (RCPT parameters such as ORCPT).
- `ZoneAuthority(zone_text, servfail=(), slow=(), delay=0.0, nxdomain=(), garbled=(), rcodes=None)`: a dnslib
  resolver answering authoritatively from zone text (started by the `dns_zone` fixture): NODATA for a name in the
  zone without records of the asked type, NXDOMAIN for a name not in it, SERVFAIL for the names in `servfail` (or
  only a type: "name/MX"), NXDOMAIN for the ones in `nxdomain` (a name, or one type of it: a server that
  contradicts itself), a reply cut short (3 octets less: garbled) for the ones in `garbled`, the rcode `rcodes`
  names for a name or "name/TYPE" ({"bad.test": "FORMERR"}), the names in `slow` (or "name/TYPE") answered after
  `delay` seconds (each query in a thread of its own); a CNAME
  is followed as a recursive resolver follows it.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver


async def garbling_lmtp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An LMTP server that offers PIPELINING and SMTPUTF8 without 8BITMIME, and puts a line that is no reply
    before its answer to MAIL; one recipient a message."""
    replies = {b"LHLO": b"250-lmtp.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n",
               b"MAIL": b"hello, this is not LMTP\r\n250 2.1.0 Ok\r\n", b"RCPT": b"250 2.1.5 Ok\r\n",
               b"DATA": b"354 go on\r\n", b"QUIT": b"221 2.0.0 Bye\r\n"}
    writer.write(b"220 lmtp.test LMTP\r\n")
    in_data = False
    while line := await reader.readline():
        if in_data:
            in_data = line != b".\r\n"
            writer.write(b"" if in_data else b"250 2.0.0 Ok: delivered\r\n")
            continue
        verb = line[:4].upper()
        writer.write(replies.get(verb, b"250 2.0.0 Ok\r\n"))
        in_data = verb == b"DATA"
    writer.close()


@contextlib.asynccontextmanager
async def recording_peer(*keywords: str):
    """See the module docstring."""
    lines: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        while line := (await reader.readline()).rstrip(b"\r\n"):
            lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                offered = [b"250-" + k.encode() + b"\r\n" for k in ("peer.test", *keywords)]
                writer.write(b"".join(offered) + b"250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], lines
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Captured:
    """One message as the peer received it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    smtputf8: bool
    helo: str
    tls: bool
    client: str = ""  # the address the connection came from


@dataclass
class CaptureHandler:
    """An aiosmtpd handler that records messages and can be scripted to refuse MAIL, some RCPTs or DATA."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages: list[Captured] = field(default_factory=list)
    stalled: int = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            Captured(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                mail_options=list(envelope.mail_options),
                smtputf8=envelope.smtp_utf8,
                helo=session.host_name,
                tls=session.ssl is not None,
                client=session.peer[0] if session.peer else "",
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"


@dataclass
class CapturePeer:
    host: str
    port: int
    handler: CaptureHandler
    server: asyncio.AbstractServer

    @property
    def messages(self) -> list[Captured]:
        return self.handler.messages


def stall_mail(peer: CapturePeer) -> asyncio.Event:
    """Make `peer` hold each MAIL until the event is set; `peer.handler.stalled` counts the MAIL commands that
    waited."""
    gate = asyncio.Event()
    handler = peer.handler
    answer = type(handler).handle_MAIL

    async def held(server, session, envelope, address, options):
        handler.stalled += 1
        await gate.wait()
        return await answer(handler, server, session, envelope, address, options)

    handler.handle_MAIL = held
    return gate


class ZoneAuthority(BaseResolver):
    """Authoritative answers from zone text, with NODATA (dnslib's ZoneResolver says NXDOMAIN there)."""

    def __init__(self, zone_text: str, servfail: Collection[str] = (), slow: tuple[str, ...] = (), delay: float = 0.0,
                 asked: list[tuple[str, str]] | None = None, nxdomain: Collection[str] = (),
                 garbled: Collection[str] = (), rcodes: Mapping[str, str] | None = None):
        """`asked`, when given, gets (name, type) of every query, as it arrives; `servfail` is read at each query
        (a set the test changes makes a name fail, or work again, while the server runs)."""
        self.asked = asked
        self.records = RR.fromZone(zone_text)
        self.names = {str(rr.rname).lower() for rr in self.records}
        self.servfail = servfail
        self.nxdomain = nxdomain
        self.garbled = garbled
        self.rcodes = rcodes or {}
        self.slow = slow
        self.delay = delay

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower()
        if self.asked is not None:
            self.asked.append((qname, QTYPE[request.q.qtype]))
        qtype = QTYPE[request.q.qtype]
        if _names(self.slow, qname, qtype):
            time.sleep(self.delay)  # (dnslib's server answers each query in a thread of its own)
        rcode = next((code for entry, code in self.rcodes.items() if _names((entry,), qname, qtype)), None)
        if rcode is not None:
            reply.header.rcode = getattr(RCODE, rcode)
        elif _names(self.servfail, qname, qtype):
            reply.header.rcode = RCODE.SERVFAIL
        elif qname not in self.names or _names(self.nxdomain, qname, qtype):
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            self._answer(reply, qname, request.q.qtype)
        if _names(self.garbled, qname, qtype):
            packed = reply.pack()[:-3]  # its last record cut short: no resolver can read it
            reply.pack = lambda: packed  # (what dnslib's handler sends)
        return reply

    def _answer(self, reply, qname: str, qtype: int) -> None:
        """The records of qname/qtype; through CNAMEs as a recursive resolver gives them (the chain, then the
        target's records), at most 8 deep."""
        for _ in range(8):
            found = [rr for rr in self.records if str(rr.rname).lower() == qname and rr.rtype == qtype]
            aliases = [rr for rr in self.records if str(rr.rname).lower() == qname and rr.rtype == QTYPE.CNAME]
            for rr in found or aliases[:1]:
                reply.add_answer(rr)
            if found or not aliases:
                return
            qname = str(aliases[0].rdata.label).lower()
            if qname not in self.names:
                reply.header.rcode = RCODE.NXDOMAIN
                return


def _names(entries: Collection[str], qname: str, qtype: str) -> bool:
    """`entries` name `qname` (all its types) or `name/TYPE` (that type only: "known.test/MX")."""
    for entry in entries:
        name, _, only = entry.lower().partition("/")
        if name.rstrip(".") + "." == qname and only in ("", qtype.lower()):
            return True
    return False


def record_senders(peer: CapturePeer) -> list[str]:
    """The senders of every MAIL command `peer` gets from now on, whether a message follows or not."""
    senders: list[str] = []
    handler = peer.handler
    answer = handler.handle_MAIL

    async def recorded(server, session, envelope, address, options):
        senders.append(address)
        return await answer(server, session, envelope, address, options)

    handler.handle_MAIL = recorded
    return senders
