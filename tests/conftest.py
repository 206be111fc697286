"""Shared fixtures: real local peers on 127.0.0.1, port 0. What they build on is in tests/support/.

- `dns_zone(zone_text, servfail=(), tcp="answer", tcp_delay=0.0, asked=None, nxdomain=(), garbled=(), rcodes=None)`
  starts an in-process authoritative DNS server (dnslib, `ZoneAuthority`) for a BIND-style zone and returns its
  "127.0.0.1:port" nameserver string. Sized as a real server: a UDP answer holds at most 512 bytes without EDNS,
  the advertised size with it; past that it is cut at a record boundary with TC set, and the resolver asks again
  over TCP on the same port (length-prefixed, several queries a connection, each answered as soon as it can be,
  out of order as BIND's). `tcp`: "answer", "refuse" (the port held, connections refused), "close" (each query
  read, the connection closed unanswered) or "drop" (connection attempts dropped, as by a firewall: a connect
  times out); `tcp_delay`: seconds before each TCP answer. `asked`: a list that gets the (name, type) of each
  query (UDP and TCP, "close"'s too); `nxdomain`: names (or "name/TYPE") answered NXDOMAIN though in the zone;
  `garbled`: the ones whose replies are cut short; `rcodes`: {name or name/TYPE: "FORMERR"} for other answers;
  `address`, `port`: where it listens (a private Postfix's resolver asks port 53 of the address its resolv.conf
  names: tests.support.postfix, `postfix_instance(nameserver=...)`).
- `private_dns_zone(zone_text, servfail=(), ...)`: `dns_zone` on port 53 of a fresh 127.53.x.y address for a
  private Postfix to ask (`private_nameserver_address`: skips without what that needs); returns the address. An
  address in use (another worker's, another run's) gives way to another.
- `smtp_peer(host="127.0.0.1", port=0, **smtp_kwargs)` starts a capturing aiosmtpd server on the test's own loop
  (never aiosmtpd's threaded Controller) and returns a `CapturePeer`: `.port`, `.messages` (one `Captured` per
  accepted DATA) and `.handler`, whose `mail_reply`, `rcpt_replies[address]` and `data_reply` script refusals.
- `mailflow_server(**settings)` starts a real `Mailflow` on the test's loop (port 0) with the config of
  `tests.support.base_settings` overlaid with `settings`; it is stopped after the test.
- `write_config(path, **settings)` writes the same config as TOML, for tests that run `mailflow serve`.
- `dovecot`: a private Dovecot (`tests.support.dovecot_instance`: LMTP and IMAP on free ports, users alice and
  bob of example.test), stopped after the test.
- `pki`: (trustme CA, a certificate file for localhost and 127.0.0.1, a client SSLContext trusting the CA);
  `users`: a `texthash:` table of scrypt hashes (alice/s3cret, bob/hunter2), cheap to compute.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Collection
from pathlib import Path

import pytest
import trustme

pytest_plugins = ("pytester",)  # tests of the mailflow pytest plugin (tests/e2e/test_sink_pytest_plugin.py)

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from dnslib import QTYPE, DNSError, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from mailflow.stages.smtpd.auth import hash_password
from mailflow.transports.local import asuser
from tests.support import postfix as postfix_support
from tests.support import CaptureHandler, CapturePeer, ZoneAuthority, base_settings, dovecot_instance, merged, to_toml


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A report's captured sections (logs, output) made UTF-8 encodable: a test of non-UTF-8 mail logs text with
    surrogate escapes (`caf\\udce9`), which pytest-xdist cannot send from its worker (an INTERNALERROR that ends the
    whole run, when another test of the worker left the level at which such a line is captured)."""
    report = (yield).get_result()
    report.sections = [(title, _encodable(text)) for title, text in report.sections]


@pytest.fixture(autouse=True)
def _root_log_level_kept():
    """The root logger's level as it was before the test: a reload (app.reload_logged) sets it from the
    configuration, and a test that reloads left INFO on for the worker's later tests, whose logs then held lines
    they did not expect."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _local_helper_as_in_a_fresh_process():
    """Local delivery's helper counts no server as its user and takes calls, as in a fresh process: the servers an
    earlier test of the worker started and stopped counted themselves out, the last one's stop refusing calls as it
    must, and a server a test left running must not keep the next test's stops from ending the helper."""
    forker = asuser._FORKER
    with forker._users_lock:
        forker._users, forker._stopped = 0, False


def _encodable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


UDP_PLAIN = 512  # RFC 1035 4.2.1: the most a UDP answer to a query without EDNS may hold
TCP_QUERIES = 64  # queries answered on one TCP connection, at most (a client sends several: c-ares, glibc)
TCP_IDLE = 5.0  # seconds a TCP connection may wait for its next query (or a client for its answer) before closing
TCP_MODES = ("answer", "refuse", "close", "drop")
DROP_FILL = 8  # connections made to fill a `tcp="drop"` listener's backlog, at most (the kernel takes 1 past 0)
DROP_WAIT = 0.2  # seconds a connection to it waits before it is taken as dropped


class _SizedHandler(DNSHandler):
    """Answers as a real server sizes them. UDP: at most 512 bytes to a query without an OPT record, the size its
    OPT advertises (at least 512) to one with it; a larger answer is cut after the last whole answer record that
    fits, TC set, the question kept (as BIND renders a partial answer section; dnslib's truncate() drops the
    question, which c-ares refuses), other sections dropped. TCP (length-prefixed): the queries of the connection
    answered each in a thread of its own, as they come (c-ares and glibc send several on one; dnslib's own handler
    answers one, then closes), so a quick answer overtakes a slow one, as BIND's and Unbound's (RFC 7766 6.2.1.1);
    per the server's `tcp_mode`: "answer", or "close" (the query read, given to `asked`, the connection closed
    unanswered); each answer after `tcp_delay` seconds. Bounded: TCP_QUERIES a connection (and threads), TCP_IDLE
    seconds of silence; the connection closes once its answers are sent."""

    def handle(self):
        if self.server.socket_type != socket.SOCK_STREAM:
            return super().handle()
        self.protocol = "tcp"
        connection = self.request
        connection.settimeout(TCP_IDLE)
        writing = threading.Lock()
        answering: list[threading.Thread] = []
        try:
            for _ in range(TCP_QUERIES):
                length = _read_exactly(connection, 2)
                query = length and _read_exactly(connection, struct.unpack("!H", length)[0])
                if not query:
                    break
                if self.server.tcp_mode == "close":
                    self._record(query)
                    break
                answering.append(threading.Thread(target=self._answer, args=(connection, writing, query),
                                                  daemon=True))
                answering[-1].start()
        except (OSError, DNSError):
            pass
        for thread in answering:  # (the connection is closed when this returns)
            thread.join()

    def _answer(self, connection: socket.socket, writing: threading.Lock, query: bytes) -> None:
        """One TCP query's answer, after `tcp_delay` (none once the server stops)."""
        try:
            answer = self.get_reply(query)  # (`asked` has it now)
            if self.server.tcp_delay and self.server.stopping.wait(self.server.tcp_delay):
                return
            with writing:
                connection.sendall(struct.pack("!H", len(answer)) + answer)
        except (OSError, DNSError):
            return

    def _record(self, query: bytes) -> None:
        """`query` given to the zone's `asked`, as answering it would."""
        asked = self.server.resolver.asked
        request = DNSRecord.parse(query)
        if asked is not None:
            asked.append((str(request.q.qname).lower(), QTYPE[request.q.qtype]))

    def get_reply(self, data):
        answer = super().get_reply(data)
        if self.protocol != "udp":
            return answer
        limit = udp_limit(DNSRecord.parse(data))
        return answer if len(answer) <= limit else truncated(answer, limit)


def udp_limit(query: DNSRecord) -> int:
    """The largest UDP answer `query` takes: 512 bytes, or its OPT record's payload size when larger."""
    sizes = [rr.rclass for rr in query.ar if rr.rtype == QTYPE.OPT]
    return max([UDP_PLAIN, *sizes])


def truncated(answer: bytes, limit: int) -> bytes:
    """`answer` cut to `limit` bytes at a record boundary: the question and the answer records that fit, TC set. A
    reply that cannot be read (a `garbled` one) is sent as it is."""
    try:
        reply = DNSRecord.parse(answer)
    except DNSError:
        return answer
    records = reply.rr
    reply.auth, reply.ar = [], []
    reply.header.tc = 1
    fits, too_many = 0, len(records)  # the most records that fit (bisected: a pack costs what the records cost)
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        reply.rr = records[:middle]
        if len(reply.pack()) <= limit:
            fits = middle
        else:
            too_many = middle
    reply.rr = records[:fits]
    return reply.pack()


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    """`size` bytes from `connection`; b"" when it closes first."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


class _Servers:
    """A zone's UDP server and its TCP one (or, for `tcp="refuse"`, a TCP socket bound but not listening: the port
    is held, and a connection to it refused; for `tcp="drop"`, one listening that accepts nothing, its backlog kept
    full: a connection to it is never made, as behind a firewall that drops TCP/53)."""

    def __init__(self, authority, logger, tcp: str, tcp_delay: float, address: str, port: int):
        if tcp not in TCP_MODES:
            raise ValueError(f"dns_zone tcp={tcp!r}: one of {TCP_MODES}")
        self.stopping = threading.Event()
        self.udp, self.tcp, self.held = _dns_servers(authority, logger, tcp, address, port)
        self.filling = _fill_backlog(self.held) if tcp == "drop" else []
        for server in (self.udp, self.tcp):
            if server is not None:
                server.server.stopping, server.server.tcp_mode = self.stopping, tcp
                server.server.tcp_delay = tcp_delay
                # DNSServer.start_thread() polls every 0.5 s, which is what stopping it would cost each test.
                threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02},
                                 daemon=True).start()

    @property
    def port(self) -> int:
        return self.udp.server.server_address[1]

    def stop(self) -> None:
        self.stopping.set()
        for server in (self.udp, self.tcp):
            if server is not None:
                server.server.shutdown()
                server.server.server_close()
        for held in (*self.filling, self.held):
            if held is not None:
                held.close()


def _dns_servers(authority, logger, tcp: str, address: str = "127.0.0.1", port: int = 0):
    """(UDP server, TCP server, held TCP socket): UDP on a port the kernel picks (or `port`), TCP on the same
    number; that number may be taken for TCP (another worker's connection), so a few ports are tried. A given
    `port` is tried once: OSError EADDRINUSE when it is taken."""
    for _ in range(20):
        udp = DNSServer(authority, port=port, address=address, logger=logger, handler=_SizedHandler)
        number = udp.server.server_address[1]
        try:
            if tcp not in ("refuse", "drop"):
                return udp, DNSServer(authority, port=number, address=address, logger=logger, tcp=True,
                                      handler=_SizedHandler), None
            held = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                held.bind((address, number))
                if tcp == "drop":
                    held.listen(0)
            except OSError:
                held.close()
                raise
            return udp, None, held
        except OSError as e:
            udp.server.server_close()
            if e.errno != errno.EADDRINUSE or port:
                raise
    raise AssertionError("no port free for both UDP and TCP")


def _fill_backlog(listening: socket.socket) -> list[socket.socket]:
    """Connections to `listening` (which never accepts) until one is not made within DROP_WAIT: its backlog is
    full, and the kernel drops each later connection attempt (SYN) unanswered. The connections made, to be held."""
    made: list[socket.socket] = []
    for _ in range(DROP_FILL):
        connection = socket.socket(listening.family, socket.SOCK_STREAM)
        connection.settimeout(DROP_WAIT)
        try:
            connection.connect(listening.getsockname()[:2])
        except TimeoutError:
            connection.close()
            return made
        made.append(connection)
    for connection in made:
        connection.close()
    raise AssertionError(f"the backlog of a listener that accepts nothing took {DROP_FILL} connections")


@pytest.fixture
def dns_zone():
    started: list[_Servers] = []

    def start(zone_text: str, servfail: Collection[str] = (), slow: tuple[str, ...] = (), delay: float = 0.0,
              tcp: str = "answer", tcp_delay: float = 0.0, asked: list[tuple[str, str]] | None = None,
              address: str = "127.0.0.1", port: int = 0, nxdomain: Collection[str] = (),
              garbled: Collection[str] = (), rcodes: dict[str, str] | None = None) -> str:
        quiet = DNSLogger("-request,-reply,-truncated,-recv,-send,-error,-data", False)
        authority = ZoneAuthority(zone_text, servfail, slow, delay, asked, nxdomain, garbled, rcodes)
        servers = _Servers(authority, quiet, tcp, tcp_delay, address, port)
        started.append(servers)
        return f"{address}:{servers.port}"

    yield start
    for servers in started:
        servers.stop()


PRIVATE_ADDRESS_TRIES = 20


@pytest.fixture
def private_dns_zone(dns_zone):
    def start(zone_text: str, **options) -> str:
        for _ in range(PRIVATE_ADDRESS_TRIES):
            address = postfix_support.private_nameserver_address()
            try:
                dns_zone(zone_text, address=address, port=53, **options)
                return address
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
        raise AssertionError(f"no 127.53.x.y address free on port 53 in {PRIVATE_ADDRESS_TRIES} tries")

    return start


@pytest.fixture
async def smtp_peer():
    peers: list[CapturePeer] = []
    loop = asyncio.get_running_loop()

    async def start(host: str = "127.0.0.1", port: int = 0, **smtp_kwargs) -> CapturePeer:
        """A capturing SMTP peer on host:port (port 0: the kernel's choice). Peers that share one port on several
        loopback addresses take it from `free_port()`: an ephemeral port the kernel gave the first may be any
        outgoing connection's on the others' addresses by the time they bind."""
        handler = CaptureHandler()
        smtp_kwargs.setdefault("hostname", "peer.test")
        server = await loop.create_server(lambda: AiosmtpdSMTP(handler, **smtp_kwargs), host, port)
        peer = CapturePeer(host, server.sockets[0].getsockname()[1], handler, server)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.server.close()
        await peer.server.wait_closed()


@pytest.fixture
async def mailflow_server(tmp_path):
    running: list[Mailflow] = []

    async def start(*, resolver=None, session_observer=None, smtpd_policy=None, rng=None, **overrides) -> Mailflow:
        """`overrides` of base_settings; `resolver`: the DNS resolver (a Destinations' fake DNS, say);
        `session_observer`, `smtpd_policy`: smtpd's observer and in-process policy hook (none by default); `rng`:
        the server's random.Random (a Sink's `seed` makes one)."""
        config = config_from_dict(merged(base_settings(tmp_path), overrides))
        mf = Mailflow(config, shutdown_grace=2.0, resolver=resolver, session_observer=session_observer,
                      smtpd_policy=smtpd_policy, rng=rng)
        await mf.start()
        running.append(mf)
        return mf

    yield start
    for mf in running:
        await mf.stop()


@pytest.fixture
def dovecot():
    with dovecot_instance() as server:
        yield server


@pytest.fixture
def write_config(tmp_path):
    def write(path: Path, **overrides) -> Path:
        path.write_text(to_toml(merged(base_settings(tmp_path), overrides)))
        return path

    return write


@pytest.fixture
def pki(tmp_path):
    ca = trustme.CA()
    cert_file = tmp_path / "cert.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return ca, str(cert_file), client_ctx


@pytest.fixture
def users(tmp_path):
    cheap = {"n": 1024, "r": 8, "p": 1}  # the format is the same as the default cost's
    path = tmp_path / "users"
    path.write_text(f"alice {hash_password('s3cret', **cheap)}\nbob {hash_password('hunter2', **cheap)}\n")
    return f"texthash:{path}"
