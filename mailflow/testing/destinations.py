"""Fake remote destinations for the Sink: real SMTP peers on loopback behind a fake name service, so that the
real smtp transport, its TLS and timeouts, qmgr's backoff and slow start, bounces and delay notices run unchanged.

    Destinations(port)            all the fake destinations of one Sink: each has its own loopback address
                                  (127.0.0.3, .4, …) on the one `port` the Sink's smtp transport connects to
                                  ([smtp] port); 127.0.0.2 on that port is bound but never listens (refused)
        .resolver                 a mailflow.dns Resolver: `domain` MX 10 `mx.domain`; both have the destination's
                                  address and no other record (TXT, TLSA: none; no answer DNSSEC-validated); any
                                  other name, and every address's PTR name, does not exist (NXDOMAIN): smtpd's
                                  sender checks (SPF, DKIM, DMARC) find no record
        add(domain) -> FakeDestination    (its peer starts at once)     await stop()
    FakeDestination               accepts everything and records it (`messages`) unless scripted otherwise:
        answers(code, text="", at="rcpt")   reply `code` at "connect" (the greeting), "helo", "mail", "rcpt" or
                                  "data" (after the content); 2xx: accept
        refuses()                 connection refused (the name service gives the refusing address)
        times_out()               accepts the connection and says nothing (the client's timeout decides)
        fails_tls()               offers STARTTLS, then breaks the handshake
        drops(at="data")          closes the connection at that point without a reply
      each returns a Script: `.times(n)` (the last step is used n times; default: always), `.then(code, text,
      at)` (a next step); when the steps are used up the destination accepts. Calling one of the above on the
      destination again starts a new script.
      messages [Received], connections, transactions (counts)

When each step is used: refuses() at the name lookup of a delivery attempt; connect, helo and fails_tls()
steps at a new connection; mail, rcpt, data and drops() steps at MAIL, for the whole transaction (every RCPT of
it gets the same answer). A step waiting for a later point lets earlier ones pass (a 451 at RCPT does not
stop the connection before it).

Linux only: every 127.0.0.0/8 address is the host's own there.

Failure behaviour: `add` raises OSError when no loopback address is free on the port (after 250 tries).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP

from mailflow.dns import MX, NotFound, TlsaAnswer, is_ip_literal, normalize_name
from mailflow.listening import LISTEN_BACKLOG, Listening, serve_socket

log = logging.getLogger("mailflow.testing")

REFUSING_ADDRESS = "127.0.0.2"
FIRST_HOST = 3
POINTS = ("connect", "helo", "mail", "rcpt", "data")
CONNECTION_POINTS = ("connect", "helo")


@dataclass
class Step:
    kind: str  # "reply", "refuse", "timeout", "tls", "drop"
    code: int = 250
    text: str = ""
    at: str = "rcpt"
    times: int | None = None  # None: every time

    @property
    def used_at(self) -> str:
        """When the step is taken: "lookup", "connection" or "transaction"."""
        if self.kind == "refuse":
            return "lookup"
        if self.kind in ("timeout", "tls") or self.at in CONNECTION_POINTS:
            return "connection"
        return "transaction"


@dataclass
class Received:
    """One message a fake destination accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    helo: str
    tls: bool


class Script:
    """The steps of one destination (see the module docstring); safe to extend from another thread."""

    def __init__(self, first: Step):
        self._steps = [first]
        self._lock = threading.Lock()

    def times(self, n: int) -> "Script":
        if n < 1:
            raise ValueError("times takes at least 1")
        with self._lock:
            self._steps[-1].times = n
        return self

    def then(self, code: int = 250, text: str = "", at: str = "rcpt") -> "Script":
        step = _reply(code, text, at)
        with self._lock:
            self._steps.append(step)
        return self

    def take(self, moment: str) -> Step | None:
        """The step for `moment` ("lookup", "connection", "transaction"), used once; None: behave normally."""
        with self._lock:
            if not self._steps or self._steps[0].used_at != moment:
                return None
            step = self._steps[0]
            if step.times is not None:
                step.times -= 1
                if step.times <= 0:
                    self._steps.pop(0)
            return step


def _reply(code: int, text: str, at: str) -> Step:
    if at not in POINTS:
        raise ValueError(f"at={at!r}: one of {', '.join(POINTS)}")
    if not 200 <= code <= 599:
        raise ValueError(f"{code} is not an SMTP reply code")
    return Step("reply", code, text, at)


class FakeDestination:
    """See the module docstring."""

    def __init__(self, domain: str, address: str):
        self.domain = domain
        self.mx_host = f"mx.{domain}"
        self.address = address
        self.script: Script | None = None
        self.messages: list[Received] = []
        self.connections = 0
        self.transactions = 0
        self.listening: Listening | None = None  # the peer's server
        self.sessions: set["PeerSession"] = set()

    def answers(self, code: int, text: str = "", at: str = "rcpt") -> Script:
        return self._start(_reply(code, text, at))

    def refuses(self) -> Script:
        return self._start(Step("refuse"))

    def times_out(self) -> Script:
        return self._start(Step("timeout"))

    def fails_tls(self) -> Script:
        return self._start(Step("tls"))

    def drops(self, at: str = "data") -> Script:
        if at not in ("mail", "rcpt", "data"):
            raise ValueError("drops(at=...): mail, rcpt or data")
        return self._start(Step("drop", at=at))

    def _start(self, step: Step) -> Script:
        self.script = Script(step)
        for session in list(self.sessions):  # a new script speaks to new connections, not cached old ones
            session.close()
        return self.script

    def take(self, moment: str) -> Step | None:
        return self.script.take(moment) if self.script is not None else None

    def lookup(self) -> str:
        """The address a name lookup gives now (the refusing one while the script says so)."""
        step = self.take("lookup")
        return REFUSING_ADDRESS if step is not None else self.address


class PeerHandler:
    """aiosmtpd hooks of one fake destination."""

    def __init__(self, destination: FakeDestination):
        self.destination = destination

    async def handle_EHLO(self, server: "PeerSession", session, envelope, hostname, responses):
        session.host_name = hostname
        if server.step is not None and server.step.at == "helo" and server.step.kind == "reply":
            return [f"{server.step.code} {server.step.text or 'Go away'}"]
        if server.step is not None and server.step.kind == "tls":
            responses.insert(-1, "250-STARTTLS")
        return responses

    async def handle_HELO(self, server: "PeerSession", session, envelope, hostname):
        session.host_name = hostname
        if server.step is not None and server.step.at == "helo" and server.step.kind == "reply":
            return f"{server.step.code} {server.step.text or 'Go away'}"
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: "PeerSession", session, envelope, address, options):
        self.destination.transactions += 1
        server.transaction = self.destination.take("transaction")
        refusal = server.answer("mail")
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: "PeerSession", session, envelope, address, options):
        refusal = server.answer("rcpt")
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: "PeerSession", session, envelope):
        refusal = server.answer("data")
        if refusal is not None:
            return refusal
        self.destination.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                                  envelope.original_content, session.host_name or "",
                                                  session.ssl is not None))
        return f"250 2.0.0 Ok: queued as {self.destination.domain}-{len(self.destination.messages)}"


class PeerSession(SMTP):
    """One connection to a fake destination."""

    def __init__(self, destination: FakeDestination):
        super().__init__(PeerHandler(destination), hostname=destination.mx_host, ident="ESMTP fake destination",
                         decode_data=False, enable_SMTPUTF8=True)
        self.destination = destination
        self.step: Step | None = None  # this connection's
        self.transaction: Step | None = None  # the current transaction's

    def connection_made(self, transport):
        self.destination.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error):
        self.destination.sessions.discard(self)
        super().connection_lost(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _handle_client(self):
        self.destination.connections += 1
        self.step = self.destination.take("connection")
        step = self.step
        if step is not None and step.kind == "timeout":
            await asyncio.get_running_loop().create_future()  # until the client gives up (the session is cancelled)
        if step is not None and step.kind == "reply" and step.at == "connect":
            await self.push(f"{step.code} {step.text or 'Service not available'}")
            self.close()
            return
        await super()._handle_client()

    async def smtp_STARTTLS(self, arg):
        if self.step is None or self.step.kind != "tls":
            await self.push("502 5.5.1 Command not implemented")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(b"this is not a TLS server hello\r\n" * 4)
        self.close()

    def answer(self, point: str) -> str | None:
        """The transaction step's reply at `point`, None to go on; a drop closes the connection."""
        step = self.transaction
        if step is None or step.at != point:
            return None
        if step.kind == "drop":
            self.close()
            return "421 4.4.2 closing"  # never reaches the client: the connection is gone
        if 200 <= step.code < 300:
            return None
        return f"{step.code} {step.text or _DEFAULT_TEXT[step.code // 100]}"


_DEFAULT_TEXT = {4: "4.3.0 Try again later", 5: "5.7.1 Rejected"}


class FakeDns:
    """The name service of the fake destinations (a mailflow.dns Resolver)."""

    def __init__(self, destinations: dict[str, FakeDestination]):
        self._destinations = destinations

    def _find(self, name: str) -> FakeDestination | None:
        name = normalize_name(name)
        for destination in self._destinations.values():
            if name in (destination.domain, destination.mx_host):
                return destination
        return None

    async def mx(self, domain: str) -> list[MX]:
        found = self._find(domain)
        if found is None:
            raise NotFound(domain, "MX")
        return [MX(10, found.mx_host)] if normalize_name(domain) == found.domain else []

    async def addresses(self, host: str) -> list[str]:
        if is_ip_literal(host):
            return [host]
        found = self._find(host)
        if found is None:
            raise NotFound(host, "AAAA")
        return [found.lookup()]

    async def ipv4_addresses(self, name: str) -> list[str]:
        return [a for a in await self.addresses(name) if ":" not in a]

    async def ipv6_addresses(self, name: str) -> list[str]:
        return [a for a in await self.addresses(name) if ":" in a]

    async def ns(self, domain: str) -> list[str]:
        """No name servers (smtpd's check_*_ns_access): a destination's domain has none, others do not exist."""
        return self._none_of(domain, "NS")

    async def txt(self, name: str) -> list[str]:
        """No TXT records (SPF, DKIM keys, DMARC policies): a destination's names have none, others do not exist."""
        return self._none_of(name, "TXT")

    async def ptr(self, address: str) -> list[str]:
        raise NotFound(address, "PTR")

    async def tlsa(self, name: str) -> TlsaAnswer:
        self._none_of(name, "TLSA")
        return TlsaAnswer()

    async def validated(self, name: str, qtype: str) -> bool:
        return False

    def _none_of(self, name: str, qtype: str) -> list:
        """[] for a name of a destination (it has no such record), NotFound for any other."""
        if self._find(name) is None:
            raise NotFound(name, qtype)
        return []


class Destinations:
    """See the module docstring."""

    def __init__(self):
        self._refusing = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._refusing.bind((REFUSING_ADDRESS, 0))  # bound, never listening: connections are refused
        except OSError:
            self._refusing.close()
            raise
        self.port = self._refusing.getsockname()[1]
        self._by_domain: dict[str, FakeDestination] = {}
        self.resolver = FakeDns(self._by_domain)
        self._next_host = FIRST_HOST

    def add(self, domain: str) -> FakeDestination:
        domain = normalize_name(domain)
        if domain in self._by_domain:
            return self._by_domain[domain]
        sock = self._listening_socket()
        destination = FakeDestination(domain, sock.getsockname()[0])
        self._by_domain[domain] = destination
        destination.listening = serve_socket(sock, lambda: PeerSession(destination), logger=log)
        return destination

    def _listening_socket(self) -> socket.socket:
        for _ in range(250):
            host = f"127.0.0.{self._next_host}"
            self._next_host = self._next_host + 1 if self._next_host < 254 else FIRST_HOST
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, self.port))
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            return sock
        raise OSError(f"no loopback address is free on port {self.port} for another destination")

    async def stop(self) -> None:
        for destination in self._by_domain.values():
            if destination.listening is not None:  # first: a connection accepted meanwhile is closed below too
                destination.listening.close()
                await destination.listening.wait_closed()
            for session in list(destination.sessions):
                session.close()
        self._refusing.close()
