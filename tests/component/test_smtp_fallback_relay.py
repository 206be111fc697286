"""smtp.fallback_relay (Postfix smtp_fallback_relay, smtp_connect_inet's list of sites): the relays tried, in
order, for the recipients the next hop's MX hosts left for a temporary reason or whose destination was not found;
never after a 5xx, never for a domain this server is an MX host of. Real peers on 127.0.0.1 (aiosmtpd), the DNS
a StaticResolver; a port nothing listens on is a host that cannot be reached."""
from __future__ import annotations

import ipaddress
import logging

import pytest

from mailflow.config import SmtpConfig, load_config
from mailflow.dns import MX, StaticResolver
from mailflow.errors import ConfigError
from mailflow.model import Outcome
from tests.component.test_smtp_transport import deliver, make_request, make_transport
from tests.support import free_port

RESOLVER = StaticResolver(mx={"example.test": [MX(10, "mx.example.test")]},
                          addresses={"mx.example.test": ["127.0.0.1"], "relay.test": ["127.0.0.1"]})


def smtp_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailflow.smtp"]


async def test_when_the_mx_hosts_cannot_be_reached_the_fallback_relay_delivers(smtp_peer, caplog):
    fallback = await smtp_peer()
    down = free_port()
    transport = make_transport(RESOLVER, port=down, fallback_relay=(f"[127.0.0.1]:{fallback.port}",))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request("example.test"))
    [result] = report.results
    assert (result.outcome, result.relay) == (Outcome.SENT, f"127.0.0.1[127.0.0.1]:{fallback.port}")
    assert report.site_ok  # the site verdict is the final server's: qmgr does not throttle the next hop
    assert len(fallback.messages) == 1
    assert smtp_lines(caplog) == [f"connect to mx.example.test[127.0.0.1]:{down}: Connection refused"]


async def test_a_destination_not_found_goes_to_the_fallback_relay(smtp_peer):
    """Postfix: "Don't give up after a hard host lookup error until we have tried the fallback relay servers"."""
    fallback = await smtp_peer()
    transport = make_transport(RESOLVER, fallback_relay=(f"[127.0.0.1]:{fallback.port}",))
    report = await deliver(transport, make_request("nowhere.test", "x@nowhere.test"))
    assert [r.outcome for r in report.results] == [Outcome.SENT]
    assert fallback.messages[0].rcpt_tos == ["x@nowhere.test"]


async def test_a_temporary_refusal_by_the_last_mx_host_leaves_the_recipient_to_the_fallback(smtp_peer, caplog):
    """The MX host is not the final server: its 4xx is logged on a line of its own (Postfix's smtp_rcpt_fail at a
    server that is not the final one), the recipient goes on; one it refused for good stays bounced."""
    primary, fallback = await smtp_peer(), await smtp_peer()
    primary.handler.rcpt_replies["b@example.test"] = "451 4.7.1 greylisted"
    primary.handler.rcpt_replies["c@example.test"] = "550 5.1.1 no such user"
    transport = make_transport(RESOLVER, port=primary.port, fallback_relay=(f"[127.0.0.1]:{fallback.port}",))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request("example.test", "b@example.test", "c@example.test",
                                                       "d@example.test"))
    assert [(r.outcome, r.relay) for r in report.results] == [
        (Outcome.SENT, f"127.0.0.1[127.0.0.1]:{fallback.port}"),
        (Outcome.BOUNCED, f"mx.example.test[127.0.0.1]:{primary.port}"),
        (Outcome.SENT, f"mx.example.test[127.0.0.1]:{primary.port}")]
    assert [m.rcpt_tos for m in fallback.messages] == [["b@example.test"]]
    assert smtp_lines(caplog) == ["Q1: host mx.example.test[127.0.0.1] said: 451 4.7.1 greylisted (in reply to RCPT "
                                  "TO command)"]


async def test_a_5xx_refusal_of_the_handshake_bounces_without_the_fallback(smtp_peer):
    primary, fallback = await smtp_peer(), await smtp_peer()

    async def refuse_ehlo(server, session, envelope, hostname, responses):
        return ["554 5.7.1 go away"]

    async def refuse_helo(server, session, envelope, hostname):
        return "554 5.7.1 go away"

    primary.handler.handle_EHLO, primary.handler.handle_HELO = refuse_ehlo, refuse_helo
    transport = make_transport(RESOLVER, port=primary.port, fallback_relay=(f"[127.0.0.1]:{fallback.port}",))
    report = await deliver(transport, make_request("example.test"))
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.BOUNCED, "5.7.1")]
    assert fallback.messages == []


async def test_when_the_fallback_cannot_be_reached_either_its_failure_is_the_result(caplog):
    down, also_down = free_port(), free_port()
    transport = make_transport(RESOLVER, port=down, fallback_relay=(f"[127.0.0.1]:{also_down}",))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request("example.test"))
    [result] = report.results
    assert (result.outcome, result.dsn, result.text) == (
        Outcome.DEFERRED, "4.4.1", f"connect to 127.0.0.1[127.0.0.1]:{also_down}: Connection refused")
    assert not report.site_ok
    assert smtp_lines(caplog) == [f"connect to mx.example.test[127.0.0.1]:{down}: Connection refused",
                                  f"connect to 127.0.0.1[127.0.0.1]:{also_down}: Connection refused"]


async def test_fallback_relays_are_tried_in_order(smtp_peer):
    second = await smtp_peer()
    transport = make_transport(RESOLVER, port=free_port(),
                               fallback_relay=(f"[127.0.0.1]:{free_port()}", f"[127.0.0.1]:{second.port}"))
    report = await deliver(transport, make_request("example.test"))
    assert [r.outcome for r in report.results] == [Outcome.SENT] and len(second.messages) == 1


async def test_a_fallback_relay_that_is_not_found_is_a_configuration_problem(caplog):
    """Postfix: the final site is a fallback relay and its error is not soft: 4.3.5, its text kept, and
    `warning: smtp_fallback_relay configuration problem`."""
    transport = make_transport(RESOLVER, port=free_port(), fallback_relay=("ghost.test",))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request("example.test"))
    [result] = report.results
    assert (result.outcome, result.dsn) == (Outcome.DEFERRED, "4.3.5")
    assert result.text.startswith("Host or domain name not found. Name service error for name=ghost.test")
    assert "smtp_fallback_relay configuration problem" in smtp_lines(caplog)


def as_backup_mx(port: int, relay_port: int, records: list[MX]):
    """This server (127.0.0.1 on `port`) among the domain's MX hosts, another at 127.0.0.2."""
    resolver = StaticResolver(mx={"example.test": records},
                              addresses={"me.test": ["127.0.0.1"], "other.test": ["127.0.0.2"],
                                         "five.test": [f"127.0.0.{n}" for n in range(2, 7)]})
    return make_transport(resolver, port=port, own_addresses=frozenset({ipaddress.ip_address("127.0.0.1")}),
                          own_ports=frozenset({port}), fallback_relay=(f"[127.0.0.1]:{relay_port}",))


@pytest.mark.parametrize("records, dsn", [
    ([MX(10, "other.test"), MX(20, "me.test")], "4.4.1"),  # a backup MX host: only better ones are tried
    ([MX(10, "me.test")], "5.4.6"),  # the best MX host: mail loops back to myself
    # past the five addresses tried (smtp_mx_address_limit): Postfix's smtp_find_self looks at every MX host
    ([MX(10, "five.test"), MX(20, "me.test")], "4.4.1"),
])
async def test_no_fallback_for_a_domain_this_server_is_an_mx_host_of(smtp_peer, records, dsn):
    """Postfix 2.2 and later (smtp_domain_addr's found_myself; a 5.4.6 loop): the fallback relay could send it back."""
    fallback = await smtp_peer()
    report = await deliver(as_backup_mx(free_port(), fallback.port, records), make_request("example.test"))
    assert [r.dsn for r in report.results] == [dsn]
    assert fallback.messages == []


@pytest.mark.parametrize("value", ["relay.test, other.test", "[127.0.0.1", ""])
def test_a_fallback_relay_that_is_no_next_hop_is_refused_at_load(tmp_path, value):
    path = tmp_path / "config.toml"
    path.write_text(f'[smtp]\nfallback_relay = ["{value}"]\n')
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.key == "smtp.fallback_relay" and "is not an SMTP next hop" in refused.value.reason


def test_fallback_relay_forms():
    relays = ("[192.0.2.1]:587", "[relay.example]", "relay.example:2525", "example.net")
    assert SmtpConfig(fallback_relay=relays).fallback_relay == relays


async def test_under_soft_bounce_a_refusal_by_the_last_mx_host_goes_to_the_fallback(smtp_peer, caplog):
    """Postfix's smtp_rcpt_fail: with soft_bounce a 5xx at a server that is not the final one is kept for the next,
    and the MX hosts' last server is not the final one when a fallback relay follows."""
    primary, fallback = await smtp_peer(), await smtp_peer()
    primary.handler.rcpt_replies["b@example.test"] = "550 5.1.1 no such user"
    transport = make_transport(RESOLVER, port=primary.port, soft_bounce=True,
                               fallback_relay=(f"[127.0.0.1]:{fallback.port}",))
    with caplog.at_level(logging.INFO, logger="mailflow.smtp"):
        report = await deliver(transport, make_request("example.test"))
    assert [(r.outcome, r.relay) for r in report.results] == [(Outcome.SENT, f"127.0.0.1[127.0.0.1]:{fallback.port}")]
    assert smtp_lines(caplog) == ["Q1: host mx.example.test[127.0.0.1] said: 550 5.1.1 no such user (in reply to "
                                  "RCPT TO command)"]
