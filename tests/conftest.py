"""Shared fixtures: real local peers on 127.0.0.1, port 0. What they build on is in tests/support/.

- `dns_zone(zone_text, servfail=(), tcp=False, asked=None, nxdomain=(), garbled=(), rcodes=None)` starts an
  in-process authoritative DNS server (dnslib, `ZoneAuthority`) for a BIND-style zone and returns its
  "127.0.0.1:port" nameserver string; `tcp`: on TCP too (the same port), for answers too big for UDP (then truncated
  there past 1232 bytes); `asked`: a list that gets the (name, type) of each query; `nxdomain`: names (or
  "name/TYPE") answered NXDOMAIN though in the zone; `garbled`: the ones whose replies are cut short; `rcodes`:
  {name or name/TYPE: "FORMERR"} for other answers; `address`, `port`: where it listens (a private Postfix's
  resolver asks port 53 of the address its resolv.conf names: tests.support.postfix,
  `postfix_instance(nameserver=...)`).
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
import ssl
import threading
from collections.abc import Collection
from pathlib import Path

import pytest
import trustme

pytest_plugins = ("pytester",)  # tests of the mailflow pytest plugin (tests/e2e/test_sink_pytest_plugin.py)

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from dnslib import DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from mailflow.stages.smtpd.auth import hash_password
from tests.support import postfix as postfix_support
from tests.support import CaptureHandler, CapturePeer, ZoneAuthority, base_settings, dovecot_instance, merged, to_toml


class _TruncatingHandler(DNSHandler):
    """A UDP answer past the EDNS size resolvers ask for (1232) is truncated as a real server does: the question
    kept, no records, TC set (dnslib's own truncate() drops the question, which c-ares refuses as misformatted)."""

    def get_reply(self, data):
        answer = super().get_reply(data)
        if self.protocol != "udp" or len(answer) <= 1232:
            return answer
        reply = DNSRecord.parse(answer)
        reply.rr, reply.auth, reply.ar = [], [], []
        reply.header.tc = 1
        return reply.pack()


def _dns_servers(authority, logger, tcp: bool, address: str = "127.0.0.1", port: int = 0) -> list[DNSServer]:
    """A UDP server on a port the kernel picks (or `port`) and, with `tcp`, a TCP one on the same number (where a
    truncated UDP answer makes the resolver ask again); that number may be taken for TCP (another worker's
    connection), so a few ports are tried. A given `port` is tried once: OSError EADDRINUSE when it is taken."""
    for _ in range(20):
        udp = DNSServer(authority, port=port, address=address, logger=logger,
                        handler=_TruncatingHandler if tcp else DNSHandler)
        if not tcp:
            return [udp]
        try:
            return [udp, DNSServer(authority, port=udp.server.server_address[1], address=address, logger=logger,
                                   tcp=True)]
        except OSError as e:
            udp.server.server_close()
            if e.errno != errno.EADDRINUSE or port:
                raise
    raise AssertionError("no port free for both UDP and TCP")


@pytest.fixture
def dns_zone():
    servers: list[DNSServer] = []

    def start(zone_text: str, servfail: Collection[str] = (), slow: tuple[str, ...] = (), delay: float = 0.0,
              tcp: bool = False, asked: list[tuple[str, str]] | None = None, address: str = "127.0.0.1",
              port: int = 0, nxdomain: Collection[str] = (), garbled: Collection[str] = (),
              rcodes: dict[str, str] | None = None) -> str:
        quiet = DNSLogger("-request,-reply,-truncated,-recv,-send,-error,-data", False)
        authority = ZoneAuthority(zone_text, servfail, slow, delay, asked, nxdomain, garbled, rcodes)
        started = _dns_servers(authority, quiet, tcp, address, port)
        port = started[0].server.server_address[1]
        for each in started:
            # DNSServer.start_thread() polls every 0.5 s, which is what stopping it would cost each test.
            threading.Thread(target=each.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
            servers.append(each)
        return f"{address}:{port}"

    yield start
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


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

    async def start(*, resolver=None, session_observer=None, smtpd_policy=None, **overrides) -> Mailflow:
        """`overrides` of base_settings; `resolver`: the DNS resolver (a Destinations' fake DNS, say);
        `session_observer`, `smtpd_policy`: smtpd's observer and in-process policy hook (none by default)."""
        config = config_from_dict(merged(base_settings(tmp_path), overrides))
        mf = Mailflow(config, shutdown_grace=2.0, resolver=resolver, session_observer=session_observer,
                      smtpd_policy=smtpd_policy)
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
