"""Named SMTP and LMTP client services ([smtp.services.NAME], [lmtp.services.NAME]) delivering through a running
server to peers on 127.0.0.1: each is a transport of its own name that routing (transport_maps, content_filter)
names, with its own settings, its own connection cache and, in qmgr, its own concurrency; a reload adds and
removes them as it does [pipe.NAME] services (mail for a removed one is deferred, not lost)."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time

import trustme
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import AuthResult

from mailflow.config import config_from_dict
from tests.support import CaptureHandler, eventually, free_port, lines_logged, queue_becomes, send, stall_mail

MESSAGE = b"Subject: s\r\n\r\nbody\r\n"


def routes(**domains: str) -> list[str]:
    """transport_maps sending each domain (a_test -> a.test) to its `transport:nexthop`."""
    entries = ", ".join(f"{domain.replace('_', '.')}={route}" for domain, route in domains.items())
    return [f"inline:{{ {entries} }}"]


async def test_each_service_delivers_with_its_own_settings_and_smtp_with_its_own(mailflow_server, smtp_peer):
    """`amavis` says its own HELO name; `other` takes its port from its own setting (the next hop names none);
    [smtp] itself keeps myhostname: as master.cf's `-o smtp_helo_name=…` and `-o smtp_…` apply to one service. An
    [smtp.services.relay] is the relay transport (relay_transport's mail) with its own settings."""
    first, second = await smtp_peer(), await smtp_peer()
    mf = await mailflow_server(
        relay_domains=["a.test", "b.test", "c.test", "relay.test"], relay_transport=f"relay:[127.0.0.1]:{first.port}",
        transport_maps=routes(a_test=f"amavis:[127.0.0.1]:{first.port}", b_test="other:[127.0.0.1]",
                              c_test=f"smtp:[127.0.0.1]:{first.port}"),
        smtp={"services": {"amavis": {"helo_name": "amavis.client.test"}, "other": {"port": second.port},
                           "relay": {"helo_name": "relay.client.test"}}})
    port = mf.smtp_addresses[0][1]
    for domain in ("a.test", "b.test", "c.test", "relay.test"):
        await send(port, "s@remote.test", [f"u@{domain}"], MESSAGE)
    await queue_becomes(mf.store, {})
    helo = {m.rcpt_tos[0]: m.helo for m in first.messages + second.messages}
    assert helo == {"u@a.test": "amavis.client.test", "u@b.test": "mx.mailflow.test", "u@c.test": "mx.mailflow.test",
                    "u@relay.test": "relay.client.test"}
    assert [m.rcpt_tos for m in second.messages] == [["u@b.test"]]


async def test_relay_domain_mail_goes_over_relay_with_its_own_dead_destination_memory(mailflow_server, smtp_peer,
                                                                                     caplog):
    """relay_transport defaults to `relay` (Postfix's DEF_RELAY_TRANSPORT), [smtp]'s client under its own name:
    relay-domain mail and other mail to one relayhost are two queues. A relayhost that refused relay.test's
    connection is dead for `relay` (the next relay-domain message is suspended, no connection tried) and not for
    `smtp`, which delivers there at once; relay's lines are logged as `relay/smtp` (master.cf's `relay … smtp -o
    syslog_name=postfix/$service_name`), smtp's as `smtp`."""
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    port = free_port()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{port}", mynetworks=["127.0.0.0/8"],
                               smtp={"tls_security_level": "none"},  # (one failure: dead for 30 s)
                               queue={"initial_destination_concurrency": 1, "minimal_backoff_time": "30s",
                                      "maximal_backoff_time": "60s"})
    smtpd = mf.smtp_addresses[0][1]
    await send(smtpd, "s@remote.test", ["u1@relay.test"], MESSAGE)
    await eventually(lambda: results(caplog, "u1@relay.test"), what="relay's refused connection")
    peer = await smtp_peer(port=port)
    await send(smtpd, "s@remote.test", ["u@other.test"], MESSAGE)
    await send(smtpd, "s@remote.test", ["u2@relay.test"], MESSAGE)
    await eventually(lambda: results(caplog, "u@other.test") and results(caplog, "u2@relay.test"))
    assert [m.rcpt_tos for m in peer.messages] == [["u@other.test"]]
    assert results(caplog, "u@other.test") == [("smtp", "sent", "smtp")]
    assert results(caplog, "u1@relay.test") == [("relay/smtp", "deferred", "relay")]
    [(_, status, transport)] = results(caplog, "u2@relay.test")
    assert (status, transport) == ("deferred", "relay")
    assert "delivery temporarily suspended" in next(
        r.getMessage() for r in caplog.records if "to=<u2@relay.test>" in r.getMessage())


def results(caplog, rcpt: str) -> list[tuple[str, str, str]]:
    """(the program its line is logged as, status, transport) of each result line for `rcpt`."""
    return [(r.service, r.fields["status"], r.fields["transport"]) for r in caplog.records
            if getattr(r, "event", None) in ("sent", "deferred", "bounced") and r.fields.get("to") == rcpt]


async def test_two_services_to_one_peer_never_share_a_cached_session(mailflow_server, smtp_peer):
    """Each service has its connection cache: a session `one` opened (and cached) to a next hop is not the one
    `two` uses for the same next hop, which says its own HELO name."""
    peer = await smtp_peer()
    mf = await mailflow_server(
        relay_domains=["a.test", "b.test"],
        transport_maps=routes(a_test=f"one:[127.0.0.1]:{peer.port}", b_test=f"two:[127.0.0.1]:{peer.port}"),
        smtp={"services": {"one": {"helo_name": "one.test", "connection_cache_time_limit": "30s"},
                           "two": {"helo_name": "two.test", "connection_cache_time_limit": "30s"}}})
    port = mf.smtp_addresses[0][1]
    await send(port, "s@remote.test", ["u@a.test"], MESSAGE)
    await queue_becomes(mf.store, {})
    await send(port, "s@remote.test", ["u@b.test"], MESSAGE)
    await queue_becomes(mf.store, {})
    assert [(m.rcpt_tos, m.helo) for m in peer.messages] == [(["u@a.test"], "one.test"), (["u@b.test"], "two.test")]


async def test_a_services_concurrency_limit_is_its_own(mailflow_server, smtp_peer):
    """queue.transport_concurrency_limit.slow = 1 (master.cf `slow … 1 smtp`): never two deliveries over `slow` at
    once, while [smtp]'s deliveries to another peer run side by side."""
    slow_peer, fast_peer = await smtp_peer(), await smtp_peer()
    slow_gate, fast_gate = stall_mail(slow_peer), stall_mail(fast_peer)
    mf = await mailflow_server(
        relay_domains=["slow.test", "fast.test"],
        transport_maps=routes(slow_test=f"slow:[127.0.0.1]:{slow_peer.port}",
                              fast_test=f"smtp:[127.0.0.1]:{fast_peer.port}"),
        smtp={"services": {"slow": {}}}, queue={"transport_concurrency_limit": {"slow": 1}})
    port = mf.smtp_addresses[0][1]
    for i in range(3):
        await send(port, "s@remote.test", [f"u{i}@slow.test"], MESSAGE)
        await send(port, "s@remote.test", [f"u{i}@fast.test"], MESSAGE)
    await eventually(lambda: fast_peer.handler.stalled == 3, what="three deliveries over smtp at once")
    await eventually(lambda: slow_peer.handler.stalled >= 1, what="a delivery over slow")  # (a slow handshake)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # (the limit holds while smtp's run: never a second one over slow)
        assert slow_peer.handler.stalled == 1
        await asyncio.sleep(0.02)
    slow_gate.set()
    fast_gate.set()
    await queue_becomes(mf.store, {})
    assert len(slow_peer.messages) == 3 and len(fast_peer.messages) == 3


async def test_a_content_filter_names_a_service(mailflow_server, smtp_peer):
    """FILTER_README's `content_filter = smtp-amavis:[127.0.0.1]:10024` with master.cf's `smtp-amavis … smtp -o
    smtp_helo_name=…`: mail goes to the filter over that service, with its settings."""
    amavis = await smtp_peer()
    mf = await mailflow_server(smtpd={"content_filter": f"smtp-amavis:[127.0.0.1]:{amavis.port}"},
                               smtp={"services": {"smtp-amavis": {"helo_name": "to-filter.test",
                                                                  "data_timeout": "20m"}}})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], MESSAGE)
    await queue_becomes(mf.store, {})
    assert [(m.rcpt_tos, m.helo) for m in amavis.messages] == [(["alice@local.test"], "to-filter.test")]


async def test_a_reload_removes_and_adds_a_service_and_mail_for_a_removed_one_waits(mailflow_server, smtp_peer,
                                                                                 caplog):
    """As for a [pipe.NAME]: after a reload that removes a service, mail routed to it is deferred with Postfix's
    text for a transport master.cf lacks (4.3.0 mail transport unavailable), not lost; a reload that adds it back
    delivers it, with the settings the new configuration gives."""
    caplog.set_level(logging.INFO)
    peer = await smtp_peer()
    settings = dict(relay_domains=["a.test"], transport_maps=routes(a_test=f"filter:[127.0.0.1]:{peer.port}"),
                    queue={"minimal_backoff_time": "1h", "maximal_backoff_time": "1h"})
    mf = await mailflow_server(**settings, smtp={"services": {"filter": {"helo_name": "first.test"}}})
    port = mf.smtp_addresses[0][1]
    await send(port, "s@remote.test", ["u1@a.test"], MESSAGE)
    await queue_becomes(mf.store, {})

    without = mf.config.model_dump()
    without["smtp"]["services"] = {}
    await mf.reload(config_from_dict(without))
    _, reply = await send(port, "s@remote.test", ["u2@a.test"], MESSAGE)
    await queue_becomes(mf.store, {"deferred": 1})
    lines = await lines_logged(caplog, "to=<u2@a.test>", "status=deferred")
    assert any("to=<u2@a.test>" in line and line.endswith("dsn=4.3.0, status=deferred (mail transport unavailable)")
               for line in lines), lines

    back = mf.config.model_dump()
    back["smtp"]["services"] = {"filter": {"helo_name": "second.test"}}
    await mf.reload(config_from_dict(back))
    await mf.store.flush_messages([reply.rsplit(" ", 1)[1]], time.time())
    await queue_becomes(mf.store, {})
    assert [(m.rcpt_tos, m.helo) for m in peer.messages] == [(["u1@a.test"], "first.test"),
                                                             (["u2@a.test"], "second.test")]


async def test_an_lmtp_service_delivers_with_its_own_port(mailflow_server):
    """[lmtp.services.NAME] (master.cf `dovecot-lmtp … lmtp -o …`): its port where the next hop names none."""
    handler = CaptureHandler()
    server = await asyncio.get_running_loop().create_server(lambda: LMTP(handler), "127.0.0.1", 0)
    try:
        mf = await mailflow_server(relay_domains=["box.test"], transport_maps=routes(box_test="box:[127.0.0.1]"),
                                   lmtp={"services": {"box": {"port": server.sockets[0].getsockname()[1]}}})
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["u@box.test"], MESSAGE)
        await queue_becomes(mf.store, {})
        assert [m.rcpt_tos for m in handler.messages] == [["u@box.test"]]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_service_rewrites_checks_authenticates_and_encrypts_by_its_own_settings(mailflow_server, smtp_peer,
                                                                                          tmp_path):
    """master.cf's `-o smtp_tls_security_level=none -o smtp_generic_maps=… -o smtp_header_checks=…` and another's
    `-o smtp_sasl_password_maps=…` apply to their service only: to one peer offering STARTTLS and AUTH, `plain` sends
    no STARTTLS and the mapped sender and edited Subject; `authed` logs in; [smtp] does neither and uses TLS (a
    service reading [smtp]'s values, or [smtp] a service's, fails here)."""
    logins: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append(auth_data.login)
        return AuthResult(success=True)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)
    peer = await smtp_peer(tls_context=context, authenticator=authenticator)
    (tmp_path / "generic").write_text("s@remote.test mapped@out.test\n")
    (tmp_path / "checks").write_text("/^Subject: s$/ REPLACE Subject: edited\n")
    (tmp_path / "passwords").write_text(f"[127.0.0.1]:{peer.port} relay-user:secret\n")
    hop = f"[127.0.0.1]:{peer.port}"
    mf = await mailflow_server(
        relay_domains=["a.test", "b.test", "c.test"],
        transport_maps=routes(a_test=f"smtp:{hop}", b_test=f"plain:{hop}", c_test=f"authed:{hop}"),
        smtp={"services": {"plain": {"tls_security_level": "none", "generic_maps": [f"texthash:{tmp_path}/generic"],
                                     "header_checks": [f"regexp:{tmp_path}/checks"]},
                           "authed": {"sasl_password_maps": [f"texthash:{tmp_path}/passwords"]}}})
    for domain in ("a.test", "b.test", "c.test"):
        await send(mf.smtp_addresses[0][1], "s@remote.test", [f"u@{domain}"], MESSAGE)
        await queue_becomes(mf.store, {})
    seen = {m.rcpt_tos[0]: (m.tls, m.mail_from, b"Subject: edited" in m.content) for m in peer.messages}
    assert seen == {"u@a.test": (True, "s@remote.test", False), "u@b.test": (False, "mapped@out.test", True),
                    "u@c.test": (True, "s@remote.test", False)}
    assert logins == [b"relay-user"]


async def test_each_lmtp_client_caches_its_own_sessions_which_a_reload_and_stop_close(mailflow_server):
    """[lmtp] and an [lmtp.services.box] to one LMTP server: each keeps its own session (two connections for four
    messages), as Postfix's lmtp(8) processes of two master.cf services never share one; a reload closes the idle
    sessions of the transports it replaces (box's, removed, and [lmtp]'s, rebuilt), stop the one opened after."""
    handler = CaptureHandler()
    sessions: list[LMTP] = []

    def session() -> LMTP:
        sessions.append(LMTP(handler))
        return sessions[-1]

    def closed(s: LMTP) -> bool:
        return s.transport is None or s.transport.is_closing()

    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    hop = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
    try:
        mf = await mailflow_server(relay_domains=["a.test", "b.test"],
                                   transport_maps=routes(a_test=f"lmtp:{hop}", b_test=f"box:{hop}"),
                                   lmtp={"connection_cache_time_limit": "30s", "services": {"box": {}}})
        port = mf.smtp_addresses[0][1]
        for n in range(2):
            for domain in ("a.test", "b.test"):
                await send(port, "s@remote.test", [f"u{n}@{domain}"], MESSAGE)
                await queue_becomes(mf.store, {})
        assert len(handler.messages) == 4 and len(sessions) == 2 and not any(closed(s) for s in sessions)
        without = mf.config.model_dump()
        without["lmtp"]["services"] = {}
        await mf.reload(config_from_dict(without))
        await eventually(lambda: all(closed(s) for s in sessions), what="the replaced clients' sessions closed")
        await send(port, "s@remote.test", ["u2@a.test"], MESSAGE)
        await queue_becomes(mf.store, {})
        assert len(sessions) == 3 and not closed(sessions[2])
        await mf.stop()
        await eventually(lambda: closed(sessions[2]), what="[lmtp]'s idle session closed at stop")
    finally:
        server.close()
        await server.wait_closed()


async def test_an_lmtp_service_rewrites_and_checks_by_its_own_settings(mailflow_server, tmp_path):
    """[lmtp.services.box]'s generic_maps and header_checks apply to its mail only, not to [lmtp]'s."""
    (tmp_path / "generic").write_text("s@remote.test mapped@out.test\n")
    (tmp_path / "checks").write_text("/^Subject: s$/ REPLACE Subject: edited\n")
    handler = CaptureHandler()
    server = await asyncio.get_running_loop().create_server(lambda: LMTP(handler), "127.0.0.1", 0)
    hop = f"[127.0.0.1]:{server.sockets[0].getsockname()[1]}"
    try:
        mf = await mailflow_server(
            relay_domains=["a.test", "b.test"], transport_maps=routes(a_test=f"lmtp:{hop}", b_test=f"box:{hop}"),
            lmtp={"services": {"box": {"generic_maps": [f"texthash:{tmp_path}/generic"],
                                       "header_checks": [f"regexp:{tmp_path}/checks"]}}})
        for domain in ("a.test", "b.test"):
            await send(mf.smtp_addresses[0][1], "s@remote.test", [f"u@{domain}"], MESSAGE)
            await queue_becomes(mf.store, {})
        seen = {m.rcpt_tos[0]: (m.mail_from, b"Subject: edited" in m.content) for m in handler.messages}
        assert seen == {"u@a.test": ("s@remote.test", False), "u@b.test": ("mapped@out.test", True)}
    finally:
        server.close()
        await server.wait_closed()
