"""Shared fixtures: real local peers on 127.0.0.1, port 0.

- `dns_zone(zone_text, servfail=())` starts an in-process authoritative DNS server (dnslib) for a BIND-style zone
  and returns its "127.0.0.1:port" nameserver string. Names in the zone without records of the asked type answer
  NODATA; names not in the zone answer NXDOMAIN; names in `servfail` answer SERVFAIL.
- `smtp_peer(host="127.0.0.1", port=0, **smtp_kwargs)` starts a capturing aiosmtpd server on the test's own loop
  (never aiosmtpd's threaded Controller) and returns a `CapturePeer`: `.port`, `.messages` (one `Captured` per
  accepted DATA) and `.handler`, whose `mail_reply`, `rcpt_replies[address]` and `data_reply` script refusals.
- `unused_port` is a TCP port on 127.0.0.1 where nothing listens.
- `mailflow_server(**settings)` starts a real `Mailflow` on the test's loop (port 0) with the config of
  `tests.helpers.base_settings` overlaid with `settings`; it is stopped after the test.
- `write_config(path, **settings)` writes the same config as TOML, for tests that run `mailflow serve`.
- `require_tool(name)` finds an external program, or skips (fails when MAILFLOW_REQUIRE_TOOLS=1).
"""
from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)  # tests of the mailflow pytest plugin (tests/e2e/test_sink_pytest_plugin.py)

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from dnslib import RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from tests.helpers import base_settings, merged, to_toml

# ---------------------------------------------------------------------------------------------------- DNS


class ZoneAuthority(BaseResolver):
    """Authoritative answers from zone text, with NODATA (dnslib's ZoneResolver says NXDOMAIN there)."""

    def __init__(self, zone_text: str, servfail: tuple[str, ...] = ()):
        self.records = RR.fromZone(zone_text)
        self.names = {str(rr.rname).lower() for rr in self.records}
        self.servfail = {name.lower().rstrip(".") + "." for name in servfail}

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower()
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
        elif qname not in self.names:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for rr in self.records:
                if str(rr.rname).lower() == qname and rr.rtype == request.q.qtype:
                    reply.add_answer(rr)
        return reply


@pytest.fixture
def dns_zone():
    servers: list[DNSServer] = []

    def start(zone_text: str, servfail: tuple[str, ...] = ()) -> str:
        quiet = DNSLogger("-request,-reply,-truncated,-recv,-send,-error,-data", False)
        server = DNSServer(ZoneAuthority(zone_text, servfail), port=0, address="127.0.0.1", logger=quiet)
        # DNSServer.start_thread() polls every 0.5 s, which is what stopping it would cost each test.
        threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server.server_address[1]}"

    yield start
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


# ---------------------------------------------------------------------------------------------------- SMTP


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


@dataclass
class CaptureHandler:
    """An aiosmtpd handler that records messages and can be scripted to refuse MAIL, some RCPTs or DATA."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages: list[Captured] = field(default_factory=list)

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
def unused_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- tools


def require_tool(name: str) -> str:
    """The path of an external program a test needs. Missing: skip, or fail when MAILFLOW_REQUIRE_TOOLS=1
    (CI sets it, so an interop test can never pass by skipping there)."""
    import os
    import shutil

    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    message = f"{name} is not installed (Debian: see .ci/run)"
    if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


# ---------------------------------------------------------------------------------------------------- mailflow


@pytest.fixture
async def mailflow_server(tmp_path):
    running: list[Mailflow] = []

    async def start(**overrides) -> Mailflow:
        config = config_from_dict(merged(base_settings(tmp_path), overrides))
        mf = Mailflow(config, shutdown_grace=2.0)
        await mf.start()
        running.append(mf)
        return mf

    yield start
    for mf in running:
        await mf.stop()


@pytest.fixture
def write_config(tmp_path):
    def write(path: Path, **overrides) -> Path:
        path.write_text(to_toml(merged(base_settings(tmp_path), overrides)))
        return path

    return write
