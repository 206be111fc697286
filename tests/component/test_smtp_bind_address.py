"""smtp.bind_address / lmtp.bind_address (Postfix smtp_bind_address, lmtp_bind_address, *_enforce): the source
address of outgoing connections, seen by a real peer on loopback (127.0.0.2 is a loopback address on Linux);
a bind that fails (192.0.2.1, TEST-NET-1, is no address of this host: the bind fails locally, nothing is sent)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from mailflow.config import LmtpConfig, SmtpConfig, load_config
from mailflow.errors import ConfigError
from mailflow.model import Outcome
from mailflow.transports.lmtp import LmtpTransport
from tests.component.test_smtp_transport import deliver, make_request, make_transport

NOT_MINE = "192.0.2.1"


async def test_the_peer_sees_the_connection_come_from_the_bind_address(smtp_peer):
    peer = await smtp_peer()
    report = await deliver(make_transport(bind_address="127.0.0.2"), make_request(f"[127.0.0.1]:{peer.port}"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert [m.client for m in peer.messages] == ["127.0.0.2"]


async def test_without_a_bind_address_the_system_chooses(smtp_peer):
    peer = await smtp_peer()
    await deliver(make_transport(), make_request(f"[127.0.0.1]:{peer.port}"))
    assert [m.client for m in peer.messages] == ["127.0.0.1"]


async def test_the_ipv6_address_is_not_used_for_an_ipv4_peer(smtp_peer, caplog):
    """bind_address6 is no address of this host and enforced: were it tried for the IPv4 peer, the bind would fail
    and the mail be deferred."""
    peer = await smtp_peer()
    transport = make_transport(bind_address6="2001:db8::1", bind_address_enforce=True)
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert [m.client for m in peer.messages] == ["127.0.0.1"]
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.smtp" and r.levelno >= logging.WARNING] == []


async def test_a_bind_that_fails_is_a_warning_and_the_mail_goes_from_another_address(smtp_peer, caplog):
    """Postfix 3.7's default (smtp_bind_address_enforce = no): `warning: smtp_connect_addr: bind ...: %m`."""
    peer = await smtp_peer()
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(make_transport(bind_address=NOT_MINE), make_request(f"[127.0.0.1]:{peer.port}"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert [m.client for m in peer.messages] == ["127.0.0.1"]
    warnings = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mailflow.smtp"]
    assert warnings == [(logging.WARNING, f"smtp_connect_addr: bind {NOT_MINE}: Cannot assign requested address")]


async def test_with_enforce_a_bind_that_fails_defers_as_a_server_configuration_error(smtp_peer, caplog):
    """Postfix's smtp_connect_addr with smtp_bind_address_enforce = yes: 4.4.0 "server configuration error",
    logged alone (no queue id) after the warning; nothing reaches the peer; the site is not reached."""
    peer = await smtp_peer()
    transport = make_transport(bind_address=NOT_MINE, bind_address_enforce=True)
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request(f"[127.0.0.1]:{peer.port}"))
    assert [(r.outcome, r.dsn, r.text, r.relay) for r in report.results] == [
        (Outcome.DEFERRED, "4.4.0", "server configuration error", "none")]
    assert not report.site_ok
    assert peer.messages == []
    lines = [r.getMessage() for r in caplog.records if r.name == "mailflow.smtp"]
    assert lines == [f"smtp_connect_addr: bind {NOT_MINE}: Cannot assign requested address",
                     "server configuration error"]


async def test_an_ipv6_peer_gets_bind_address6_and_never_the_ipv4_one(smtp_peer, caplog):
    peer = await smtp_peer("::1")
    ipv4_only = make_transport(bind_address=NOT_MINE, bind_address_enforce=True)
    report = await deliver(ipv4_only, make_request(f"[IPv6:::1]:{peer.port}"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        refused = await deliver(make_transport(bind_address6="2001:db8::1", bind_address_enforce=True),
                                make_request(f"[IPv6:::1]:{peer.port}"))
    assert [(r.outcome, r.dsn) for r in refused.results] == [(Outcome.DEFERRED, "4.4.0")]
    assert "smtp_connect_addr: bind 2001:db8::1: Cannot assign requested address" in [
        r.getMessage() for r in caplog.records if r.name == "mailflow.smtp"]
    assert len(peer.messages) == 1


async def test_lmtp_binds_its_tcp_connections_too():
    """A listener that notes where each connection comes from and closes it (the delivery is deferred: what
    matters is the source address)."""
    seen: list[str] = []

    def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(note, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = LmtpConfig(bind_address="127.0.0.2", bind_address_enforce=True, connect_timeout=2, command_timeout=2)
    try:
        report = await deliver(LmtpTransport(config, helo_name="client.mailflow.test"),
                               make_request(f"[127.0.0.1]:{port}"))
    finally:
        server.close()
        await server.wait_closed()
    assert seen == ["127.0.0.2"]
    assert [r.outcome for r in report.results] == [Outcome.DEFERRED]


@pytest.mark.parametrize("section, key, value", [
    ("smtp", "bind_address", "::1"), ("smtp", "bind_address", "mx.example"), ("smtp", "bind_address6", "127.0.0.1"),
    ("lmtp", "bind_address", "[10.0.0.1"), ("lmtp", "bind_address6", "1.2.3.4")])
def test_a_bind_address_of_the_wrong_family_or_no_address_is_refused_at_load(tmp_path, section, key, value):
    path = tmp_path / "config.toml"
    path.write_text(f'[{section}]\n{key} = "{value}"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.key == f"{section}.{key}" and str(path) in str(refused.value)
    assert f"is not an IPv{6 if key.endswith('6') else 4} address" in str(refused.value)


def test_a_bind_address_in_brackets_is_taken_as_postfix_takes_it():
    assert SmtpConfig(bind_address="[127.0.0.2]").bind_address == "127.0.0.2"
    assert SmtpConfig(bind_address6="[::1]").bind_address6 == "::1"
