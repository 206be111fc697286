"""Trusted front ends: the PROXY protocol of a load balancer (v1 and v2) and XCLIENT, and 8-bit headers without
SMTPUTF8. Raw sockets on 127.0.0.1 so that each byte sent and each reply (or its absence) is seen as it is.

The proxy listener is a second mta listener whose `overrides` turn the PROXY protocol on (master.cf -o), so
the plain `listen` address beside it shows the setting is per listener. mynetworks is 192.0.2.0/24: only a
client the header names from there may relay; the load balancer itself (127.0.0.1) may not.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import struct

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.stages.smtpd.frontends import ProxyError, XclientError, parse_xclient, read_proxy_header
from tests.support import Reply, SmtpClient, base_settings, client_hello, eventually, maildir_messages, merged

PROXY_TIMEOUT = 0.5


def v1(src: str, sport: int = 40000, family: str = "TCP4", dst: str = "203.0.113.1") -> bytes:
    return f"PROXY {family} {src} {dst} {sport} 25\r\n".encode()


def v2_tcp4(src: str, sport: int, dst: str = "203.0.113.1", dport: int = 25, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def proxy_settings(**overrides) -> dict:
    smtpd = {
        "listen": ["127.0.0.1:0"],
        "listeners": [{"address": "127.0.0.1:0", "role": "mta",
                       "overrides": {"upstream_proxy_protocol": "haproxy", "upstream_proxy_timeout": PROXY_TIMEOUT,
                                     **overrides}}],
    }
    return {"mynetworks": ["192.0.2.0/24"], "smtpd": smtpd}


def proxy_port(mf) -> int:
    listener = mf.smtpd.listeners[1]
    assert listener.smtpd.upstream_proxy_protocol == "haproxy"
    return listener.server.sockets[0].getsockname()[1]


async def relay_reply(client: SmtpClient) -> Reply:
    """EHLO, MAIL, then RCPT to a domain this server does not serve: what a relay attempt gets."""
    assert (await client.cmd("EHLO lb.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    return await client.cmd("RCPT TO:<someone@elsewhere.test>")


# -------------------------------------------------------------------------------- PROXY protocol

async def test_proxied_client_decides_mynetworks(mailflow_server):
    mf = await mailflow_server(**proxy_settings())
    inside = await SmtpClient.connect(proxy_port(mf), first=v1("192.0.2.10"))
    assert await relay_reply(inside) == status.RCPT_OK
    await inside.close()

    outside = await SmtpClient.connect(proxy_port(mf), first=v1("198.51.100.7"))
    assert await relay_reply(outside) == status.relay_denied("someone@elsewhere.test")
    await outside.close()


async def test_proxy_v2_header_names_the_client_and_received_shows_it(mailflow_server, tmp_path):
    mf = await mailflow_server(**proxy_settings())
    c = await SmtpClient.connect(proxy_port(mf), first=v2_tcp4("192.0.2.44", 51515))
    assert await relay_reply(c) == status.RCPT_OK
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    code, _ = await c.cmd(b"Subject: via the balancer\r\n\r\nhello\r\n.")
    assert code == 250
    await c.close()
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    messages = await eventually(lambda: maildir_messages(maildir))
    assert b"(unknown [192.0.2.44])" in messages[0]
    assert b"127.0.0.1" not in messages[0].split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("header", [
    v1("::ffff:192.0.2.10", family="TCP6", dst="::ffff:203.0.113.1"),
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + bytes(10) + b"\xff\xff" + socket.inet_aton("192.0.2.10")
    + bytes(10) + b"\xff\xff" + socket.inet_aton("203.0.113.1") + struct.pack("!HH", 40000, 25),
])
async def test_an_ipv4_mapped_client_is_an_ipv4_client(mailflow_server, caplog, header):
    """A dual-stack balancer names an IPv4 client `::ffff:192.0.2.10`; Postfix's haproxy_srvr makes it
    192.0.2.10 (normalize_v4mapped_sockaddr), for the logs, the Received header and the policy service."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(**proxy_settings())
    c = await SmtpClient.connect(proxy_port(mf), first=header)
    assert await relay_reply(c) == status.RCPT_OK
    await c.close()
    assert any(r.getMessage() == "connect from unknown[192.0.2.10]" for r in caplog.records)


async def test_proxy_v2_local_keeps_the_balancer_as_the_client(mailflow_server):
    """HAProxy's health check (check-send-proxy) sends LOCAL: the balancer itself is the client, as in Postfix."""
    mf = await mailflow_server(**{**proxy_settings(), "mynetworks": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(proxy_port(mf), first=b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
    assert await relay_reply(c) == status.RCPT_OK
    await c.close()


@pytest.mark.parametrize("header", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN 192.0.2.10 203.0.113.1 40000 25\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00",  # v2 PROXY, family UNSPEC
])
async def test_a_proxied_client_without_an_address_is_refused(mailflow_server, header):
    """Postfix's haproxy_srvr refuses these: a proxied client would get the balancer's address, here in
    mynetworks, and relay through it."""
    mf = await mailflow_server(**{**proxy_settings(), "mynetworks": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(proxy_port(mf), first=header, greet=False)
    assert await c.reply() == status.proxy_failed("mx.mailflow.test")  # Postfix's answer, then it hangs up
    assert await c.rest() == b""
    await c.close()


async def test_proxy_header_from_a_peer_outside_upstream_proxy_clients_is_dropped(mailflow_server):
    mf = await mailflow_server(**proxy_settings(upstream_proxy_clients=["192.0.2.0/24"]))
    c = await SmtpClient.connect(proxy_port(mf), first=v1("192.0.2.10"), greet=False)
    assert await c.reply() == status.proxy_failed("mx.mailflow.test")  # Postfix's answer, then it hangs up
    assert await c.rest() == b""
    await c.close()


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.10 203.0.113.1 40000\r\n",              # a field missing
    b"PROXY TCP4 192.0.2.300 203.0.113.1 40000 25\r\n",          # not an address
    b"PROXY TCP6 192.0.2.10 203.0.113.1 40000 25\r\n",           # family and address disagree
    b"PROXY TCP4 192.0.2.10 203.0.113.1 040000 25\r\n",          # leading zero
    b"PROXY TCP4 192.0.2.10 203.0.113.1 40000 25\n",             # bare LF
    b"PROXY TCP4 " + b"1" * 120 + b"\r\n",                        # longer than 107 bytes
    b"EHLO client.test\r\n",                                     # no header at all
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x00",                    # v2, UDP
    b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12),          # v2 header of version 1
    b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + bytes(12),          # v2, command 2
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x08" + bytes(8),           # v2, TCP4 address field too short
    b"\r\n\r\n\x01\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12),          # v2, wrong signature
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x02\x09" + bytes(521),         # v2 of 537 bytes: longer than Postfix takes
])
async def test_malformed_or_missing_proxy_header_gets_421_instead_of_the_greeting(mailflow_server, header):
    mf = await mailflow_server(**proxy_settings())
    c = await SmtpClient.connect(proxy_port(mf), first=header, greet=False)
    assert await c.reply() == status.proxy_failed("mx.mailflow.test")  # Postfix's answer, then it hangs up
    assert await c.rest() == b""
    await c.close()


async def test_proxy_v2_tlvs_are_skipped(mailflow_server):
    """TLVs (here ALPN and a 500-byte NOOP, 536 bytes in all: Postfix's maximum) are read and ignored."""
    tlvs = b"\x01\x00\x04smtp" + b"\x04\x01\xf2" + bytes(498)  # PP2_TYPE_ALPN, PP2_TYPE_NOOP
    header = v2_tcp4("192.0.2.10", 40000)
    header = header[:14] + struct.pack("!H", 12 + len(tlvs)) + header[16:] + tlvs
    assert len(header) == 536
    mf = await mailflow_server(**proxy_settings())
    c = await SmtpClient.connect(proxy_port(mf), first=header)
    assert await relay_reply(c) == status.RCPT_OK  # 192.0.2.10: in mynetworks
    await c.close()


async def test_a_tcp_health_check_is_no_warning_but_a_cut_header_is(mailflow_server, caplog):
    """A prober that connects and closes at once (a TCP check) is logged at info level, not as a warning at each
    check as Postfix's "haproxy read: EOF" (docs/security.md); a header cut short is still a warning."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(**proxy_settings())
    for first in (b"", b"PROXY TCP4 192.0.2.10"):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy_port(mf))
        writer.write(first)
        writer.close()
        await writer.wait_closed()
    await eventually(lambda: len([r for r in caplog.records if "PROXY header" in r.getMessage()]) == 2)
    levels = {r.getMessage(): r.levelname for r in caplog.records if "PROXY header" in r.getMessage()}
    assert levels == {"unknown[127.0.0.1]: closed before the PROXY header": "INFO",
                      "unknown[127.0.0.1]: connection closed inside the PROXY header, dropped": "WARNING"}


async def test_a_connection_reset_before_it_is_accepted_is_no_warning(mailflow_server, caplog):
    """HAProxy's check (check-send-proxy) sends its header and closes with a reset at once: accepted after that,
    the connection has no peer address left. An info line, not a warning that its (unknown) address is not an
    upstream_proxy_clients one, at every check."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    mf = await mailflow_server(**proxy_settings())
    with socket.create_connection(("127.0.0.1", proxy_port(mf))) as s:  # (blocking: the server accepts it later)
        s.sendall(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await eventually(lambda: any("PROXY header" in r.getMessage() or "dropped" in r.getMessage()
                                 for r in caplog.records))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "unknown[unknown]: connection reset before the PROXY header")]


async def test_proxy_header_timeout_gets_421_instead_of_the_greeting(mailflow_server):
    mf = await mailflow_server(**proxy_settings())
    loop = asyncio.get_running_loop()
    started = loop.time()
    c = await SmtpClient.connect(proxy_port(mf), first=b"PROXY TCP4 192.0.2.10", greet=False)  # and then nothing
    assert await c.reply() == status.proxy_failed("mx.mailflow.test")  # Postfix's answer, then it hangs up
    assert await c.rest() == b""
    waited = loop.time() - started
    assert PROXY_TIMEOUT * 0.8 <= waited < PROXY_TIMEOUT + 2
    await c.close()


async def test_plain_listener_beside_the_proxy_listener_needs_no_header(mailflow_server):
    mf = await mailflow_server(**proxy_settings())
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    await c.close()


async def test_connection_limits_apply_to_the_proxied_client(mailflow_server):
    mf = await mailflow_server(**proxy_settings(client_connection_count_limit=1))
    port = proxy_port(mf)
    first = await SmtpClient.connect(port, first=v1("198.51.100.1"))
    other = await SmtpClient.connect(port, first=v1("198.51.100.2"))  # same balancer, another client: admitted
    again = await SmtpClient.connect(port, first=v1("198.51.100.1"), greet=False)
    assert await again.reply() == status.too_many_connections("mx.mailflow.test", "198.51.100.1")
    for c in (first, other, again):
        await c.close()


# -------------------------------------------------------------------------------- XCLIENT

async def test_xclient_from_an_authorized_host_replaces_the_client(mailflow_server):
    mf = await mailflow_server(mynetworks=["192.0.2.0/24"],
                               smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8",
                                                                                              "192.0.2.1"],
                                      "helo_required": True})  # (to see that XCLIENT forgets the HELO)
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    ehlo = await c.cmd("EHLO filter.test")
    assert ehlo.code == 250 and "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT" in ehlo.lines
    assert await c.cmd("XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]") == status.greeting("mx.mailflow.test",
                                                                                       "ESMTP mailflow")
    assert await c.cmd("MAIL FROM:<s@remote.test>") == status.NEED_HELO  # reset
    assert await relay_reply(c) == status.RCPT_OK  # 192.0.2.1 is in mynetworks
    assert await c.cmd("XCLIENT ADDR=198.51.100.9") == status.XCLIENT_IN_TRANSACTION
    assert (await c.cmd("RSET"))[0] == 250
    assert (await c.cmd("XCLIENT ADDR=IPV6:2001:db8::7 PORT=4242"))[0] == 220
    assert (await relay_reply(c))[0] == 554  # no longer in mynetworks
    await c.close()


async def bare_lf(c: SmtpClient, line: bytes) -> int:
    """The reply code to `line` ended by a bare LF."""
    await c.send(line + b"\n")
    return (await c.reply())[0]


async def test_forbid_bare_newline_exclusions_judge_the_client_xclient_names(mailflow_server):
    """As Postfix's xclient_cmd, the bare newline exclusions are judged again on the client XCLIENT names: a
    front end in mynetworks (spared) that names an outside client no longer spares it, and the other way round."""
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                               smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert await bare_lf(c, b"EHLO filter.test") == 250  # (the front end is in mynetworks)
    assert (await c.cmd("XCLIENT ADDR=127.0.0.9"))[0] == 220
    assert await bare_lf(c, b"EHLO filter.test") == 250  # (so is 127.0.0.9)
    assert (await c.cmd("XCLIENT ADDR=192.0.2.1"))[0] == 220
    assert await bare_lf(c, b"EHLO client.test") == 521
    assert await c.closed()


async def test_forbid_bare_newline_exclusions_spare_a_client_xclient_names(mailflow_server):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"],
                                      "forbid_bare_newline_exclusions": ["192.0.2.0/24"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("XCLIENT ADDR=192.0.2.1"))[0] == 220
    assert await bare_lf(c, b"EHLO client.test") == 250
    await c.close()



async def test_a_session_keeps_the_exclusions_it_began_with_for_the_clients_xclient_names(mailflow_server):
    """A reload to `[]` spares no new session; one opened before it keeps its list (as its other settings), also for
    a client XCLIENT names after the reload (it read the listener's list live: 521)."""
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"],
                               smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"]})
    port = mf.smtpd.address_of("mta")[1]
    old = await SmtpClient.connect(port)
    assert await bare_lf(old, b"EHLO filter.test") == 250
    settings = mf.config.model_dump()
    smtpd = {**settings["smtpd"], "forbid_bare_newline_exclusions": []}
    await mf.reload(config_from_dict({**settings, "smtpd": smtpd}))
    new = await SmtpClient.connect(port)
    assert await bare_lf(new, b"EHLO filter.test") == 521
    assert (await old.cmd("XCLIENT ADDR=127.0.0.9"))[0] == 220
    assert await bare_lf(old, b"EHLO filter.test") == 250
    await old.close()


async def test_a_name_in_the_exclusions_matches_its_subdomains_as_mynetworks_does(mailflow_server):
    """Postfix builds the list with match_parent_style(mynetworks) (smtpd.c 3.7.11): a table's `example.com` spares
    mail.example.com, as in mynetworks (it was asked `.example.com` only)."""
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"],
                                      "forbid_bare_newline_exclusions": ["127.0.0.1", "inline:{example.com=ok}"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("XCLIENT ADDR=192.0.2.1 NAME=mail.example.com"))[0] == 220
    assert await bare_lf(c, b"EHLO client.test") == 250
    await c.close()



@pytest.mark.parametrize("mynetworks, client, code", [(["127.0.0.0/8"], "198.51.100.7", 521),
                                                      (["192.0.2.0/24"], "192.0.2.10", 250)],
                         ids=["balancer-spared-client-not", "client-spared-balancer-not"])
async def test_the_exclusions_judge_the_client_a_proxy_header_names_not_the_balancer(mailflow_server, mynetworks,
                                                                                    client, code):
    settings = proxy_settings()
    settings["mynetworks"] = mynetworks
    settings["smtpd"]["upstream_proxy_clients"] = ["127.0.0.0/8"]
    mf = await mailflow_server(**settings)
    c = await SmtpClient.connect(proxy_port(mf), greet=False)
    await c.send(v1(client))
    assert (await c.reply())[0] == 220
    assert await bare_lf(c, b"EHLO client.test") == code
    await c.close()


async def test_a_reload_of_mynetworks_moves_the_exclusions_left_unset(mailflow_server):
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"])
    port = mf.smtp_addresses[0][1]
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "mynetworks": ["192.0.2.0/24"]}))
    c = await SmtpClient.connect(port)
    assert await bare_lf(c, b"EHLO client.test") == 521


async def test_a_listeners_override_of_the_exclusions_leaves_the_others_alone(mailflow_server):
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], smtpd={"listen": ["127.0.0.1:0"], "listeners": [
        {"address": "127.0.0.1:0", "role": "mta", "overrides": {"forbid_bare_newline_exclusions": []}}]})
    for listener, code in zip(mf.smtpd.listeners, (250, 521)):
        c = await SmtpClient.connect(listener.server.sockets[0].getsockname()[1])
        assert await bare_lf(c, b"EHLO client.test") == code
        await c.close()

async def test_xclient_is_judged_again_on_the_client_it_names(mailflow_server):
    """smtpd.c xclient_cmd evaluates xclient_allowed again for the client it names: a front end that named a client
    outside authorized_xclient_hosts has handed the session over, and that client can no longer rename itself.
    mailflow judged XCLIENT on the client of the connection for the whole session."""
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("EHLO filter.test"))[0] == 250
    assert (await c.cmd("XCLIENT ADDR=127.0.0.9"))[0] == 220  # (still an authorized one)
    assert "XCLIENT" in (await c.cmd("EHLO filter.test")).text
    assert (await c.cmd("XCLIENT ADDR=192.0.2.1"))[0] == 220
    assert "XCLIENT" not in (await c.cmd("EHLO filter.test")).text
    assert await c.cmd("XCLIENT ADDR=127.0.0.1") == status.XCLIENT_DENIED
    await c.close()


@pytest.mark.parametrize("line, reply", [
    ("XCLIENT", status.XCLIENT_SYNTAX),
    ("XCLIENT FOO=bar", status.xclient_bad_name("FOO")),
    ("XCLIENT ADDR", status.XCLIENT_VALUE_EXPECTED),
    ("XCLIENT ADDR=192.0.2.999", status.xclient_bad_syntax("ADDR", "192.0.2.999")),
    ("XCLIENT PROTO=LMTP", status.xclient_bad_syntax("PROTO", "LMTP")),
    ("XCLIENT NAME=a+2", status.xclient_bad_syntax("NAME", "a+2")),  # (not xtext: taken as sent)
])
async def test_xclient_bad_attributes_get_501(mailflow_server, line, reply):
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.1/32"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("EHLO filter.test"))[0] == 250
    assert await c.cmd(line) == reply
    await c.close()


async def test_xclient_from_others_is_refused_and_not_offered(mailflow_server):
    mf = await mailflow_server(mynetworks=["192.0.2.0/24"])  # authorized_xclient_hosts: default, nobody
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    code, text = await c.cmd("EHLO filter.test")
    assert code == 250 and "XCLIENT" not in text
    assert await c.cmd("XCLIENT ADDR=192.0.2.1") == status.XCLIENT_DENIED
    assert (await relay_reply(c))[0] == 554  # still 127.0.0.1
    await c.close()


def test_parse_xclient_values():
    assert parse_xclient("NAME=Mail.Example.COM ADDR=192.0.2.1 PORT=25 PROTO=esmtp HELO=x+2By LOGIN=bob") == [
        ("NAME", "Mail.Example.COM"), ("ADDR", "192.0.2.1"), ("PORT", "25"), ("PROTO", "ESMTP"), ("HELO", "x+y"),
        ("LOGIN", "bob")]
    assert parse_xclient("NAME=[TEMPUNAVAIL] ADDR=[UNAVAILABLE]") == [("NAME", "[TEMPUNAVAIL]"), ("ADDR", None)]
    # Postfix's REVERSE_NAME, DESTADDR and DESTPORT, in the order given; a port of up to five digits (alldig), kept
    # as sent (xclient_cmd's UPDATE_STR)
    assert parse_xclient("REVERSE_NAME=r.test DESTADDR=IPV6:2001:db8::1 DESTPORT=99999 PORT=00025 "
                         "REVERSE_NAME=[tempunavail]") == [
        ("REVERSE_NAME", "r.test"), ("DESTADDR", "2001:db8::1"), ("DESTPORT", "99999"), ("PORT", "00025"),
        ("REVERSE_NAME", "[TEMPUNAVAIL]")]
    # an IPv4-mapped address as IPv4, as Postfix's normalize_mailhost_addr (and the PROXY header's _canonical)
    assert parse_xclient("ADDR=IPV6:::ffff:192.0.2.11 DESTADDR=ipv6:::FFFF:c633:6406") == [
        ("ADDR", "192.0.2.11"), ("DESTADDR", "198.51.100.6")]
    # split at ASCII white space only, as Postfix's smtpd_token: U+00A0 is part of NAME's value, not a separator
    assert parse_xclient("NAME=a.test\tADDR=192.0.2.1") == [("NAME", "a.test"), ("ADDR", "192.0.2.1")]
    for bad in ("NAME=a.test\u00a0ADDR=192.0.2.1", "NAME=a.test\x1cADDR=192.0.2.1",
                "ADDR=[TEMPUNAVAIL]", "PORT=123456", "DESTPORT=-1", "DESTADDR=IPV6:192.0.2.1", "REVERSE_NAME=1.2.3.4",
                "ADDR=2001:db8::1", "DESTADDR=2001:db8::1", "PROTO=[UNAVAILABLE]"):
        with pytest.raises(XclientError):
            parse_xclient(bad)


def test_xclient_values_are_masked_as_postfixs_printable_with_smtputf8():
    """Valid UTF-8 kept, sent or xtext-encoded; a control or stray byte one "?" each; a run Postfix would keep but
    that is not UTF-8 (a lead byte one continuation short) one "?" per byte too: no reply carries invalid UTF-8."""
    assert parse_xclient("HELO=\u20ac+C3+A9 LOGIN=a+0Ab+FF") == [("HELO", "\u20ac\u00e9"), ("LOGIN", "a?b?")]
    with pytest.raises(XclientError) as refused:
        parse_xclient("NAME=a+E2+82.test")
    assert refused.value.reply.text.endswith("Bad NAME syntax: a??.test")


async def test_read_proxy_header_consumes_exactly_the_header():
    reader = asyncio.StreamReader()
    reader.feed_data(v1("2001:db8::1", 1234, family="TCP6", dst="2001:db8::2") + b"EHLO x\r\n")
    client = await read_proxy_header(reader)
    assert (client.addr, client.port) == ("2001:db8::1", 1234)
    assert await reader.readexactly(8) == b"EHLO x\r\n"
    reader = asyncio.StreamReader()
    reader.feed_data(b"PROXY TCP4 192.0.2.1")
    reader.feed_eof()
    with pytest.raises(ProxyError):
        await read_proxy_header(reader)


# -------------------------------------------------------------------------------- 8-bit headers

async def test_8bit_header_without_smtputf8_is_accepted_and_kept_byte_for_byte(mailflow_server, tmp_path):
    """Postfix's default (strict_8bitmime = no, message_reject_characters empty): accepted, passed on as is."""
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>"))[0] == 250  # neither SMTPUTF8 nor BODY=8BITMIME
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    subject = "Subject: caf\u00e9 \u00fcber na\u00efve".encode("utf-8") + b" \xe9latin1\r\n"
    assert (await c.cmd(subject + b"From: s@remote.test\r\n\r\nbody\r\n."))[0] == 250
    await c.close()
    maildir = tmp_path / "mail" / "alice" / "Maildir"
    messages = await eventually(lambda: maildir_messages(maildir))
    assert subject.replace(b"\r\n", b"\n") in messages[0]  # Maildir files end lines with LF


# -------------------------------------------------------------------------------- PROXY before implicit TLS (465)

def tls_proxy_settings(cert: str, users: str, **overrides) -> dict:
    """A submissions listener behind a balancer (mailcow's 10465: -o smtpd_upstream_proxy_protocol=haproxy
    -o smtpd_tls_wrappermode=yes)."""
    listener = {"address": "127.0.0.1:0", "role": "submissions",
                "overrides": {"upstream_proxy_protocol": "haproxy", "upstream_proxy_timeout": PROXY_TIMEOUT,
                              "starttls_timeout": 5, **overrides}}
    return {"mynetworks": ["192.0.2.0/24"],
            "smtpd": {"tls_cert_file": cert, "sasl_user_maps": [users], "auth_failure_delay": 0,
                      "listeners": [listener]}}


async def tls_after(port: int, header: bytes, ctx: ssl.SSLContext, *, greet: bool = True) -> SmtpClient:
    """The header in clear, then the TLS handshake on the same connection (what HAProxy's send-proxy-v2 passes on
    from a 465 client), then the greeting over TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header)
    await asyncio.wait_for(writer.start_tls(ctx, server_hostname="localhost"), 5)
    client = SmtpClient(reader, writer)
    if greet:
        client.greeting = await client.reply()
        assert client.greeting.code == 220, client.greeting
    return client


@contextlib.asynccontextmanager
async def front_end(port: int, pieces: list[bytes]):
    """A one-connection balancer on 127.0.0.1: it writes the header's `pieces` one by one to `port`, the last in
    the same write as its client's first bytes (its ClientHello: one segment, as HAProxy sends them), then relays
    both ways. Yields its own port."""
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in pieces[:-1]:
            up_writer.write(piece)
            await up_writer.drain()
        up_writer.write(pieces[-1] + await reader.read(65536))
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def authenticated_delivery(client: SmtpClient, subject: str) -> None:
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode()))[0] == 235
    assert (await client.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    assert (await client.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.".encode()))[0] == 250


def connects(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("connect from")]


async def test_a_v1_header_then_tls_on_a_submissions_listener(mailflow_server, pki, users, caplog, tmp_path):
    """Postfix's smtpd with smtpd_tls_wrappermode=yes and smtpd_upstream_proxy_protocol=haproxy reads the header
    in clear, then the handshake: the client it names is the session's (log, Received header)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    mf = await mailflow_server(**tls_proxy_settings(cert, users))
    c = await tls_after(mf.smtpd.address_of("submissions")[1], v1("192.0.2.10", dst="203.0.113.1"), ctx)
    assert c.writer.get_extra_info("ssl_object") is not None
    await authenticated_delivery(c, "behind the balancer")
    await c.close()
    assert connects(caplog) == ["connect from unknown[192.0.2.10]"]
    messages = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"from client.test (unknown [192.0.2.10])" in messages[0]
    assert b"with ESMTPSA" in messages[0]  # (TLS and AUTH)


@pytest.mark.parametrize("pieces", [
    [v2_tcp4("192.0.2.20", 51515, dport=465)],  # the header and the ClientHello in one segment
    [v2_tcp4("192.0.2.20", 51515, dport=465)[:7], v2_tcp4("192.0.2.20", 51515, dport=465)[7:]],  # in two writes
    # HAProxy's send-proxy-v2-ssl: TLVs (PP2_TYPE_SSL with a PP2_SUBTYPE_SSL_VERSION) read and ignored, as Postfix
    [v2_tcp4("192.0.2.20", 51515, dport=465, tlvs=b"\x20\x00\x0c\x01\x00\x00\x00\x00" + b"\x21\x00\x03TLS")],
])
async def test_a_v2_header_and_the_clienthello_together(mailflow_server, pki, users, caplog, pieces):
    """What came after the header (the ClientHello, in the same read) is the handshake's, not lost."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    mf = await mailflow_server(**tls_proxy_settings(cert, users))
    async with front_end(mf.smtpd.address_of("submissions")[1], pieces) as port:
        c = await SmtpClient.connect(port, tls=ctx)
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert await c.cmd("QUIT") == status.BYE
        await c.close()
    assert connects(caplog) == ["connect from unknown[192.0.2.20]"]


async def test_a_clienthello_without_a_header_gets_postfixs_421_at_once(mailflow_server, pki, users, caplog):
    """A client that talks TLS straight to the proxied port is no header: warned, and Postfix's 421 (in clear, as
    Postfix's smtpd sends it before its wrapper-mode handshake), then the connection closes; no wait for the
    header's time limit (5 s here)."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, _ = pki
    mf = await mailflow_server(**tls_proxy_settings(cert, users, upstream_proxy_timeout=5))
    hello = client_hello()
    started = asyncio.get_running_loop().time()
    c = await SmtpClient.connect(mf.smtpd.address_of("submissions")[1], first=hello, greet=False)
    assert await c.reply() == status.proxy_failed("mx.mailflow.test")
    assert await c.rest() == b""
    assert asyncio.get_running_loop().time() - started < 2
    await c.close()
    assert f"unknown[127.0.0.1]: no PROXY header: the connection starts with {hello[:5]!r}, dropped" in [
        r.getMessage() for r in caplog.records]


async def test_no_handshake_after_the_header_is_cut_at_starttls_timeout(mailflow_server, pki, users, caplog):
    """The header, then silence: the handshake's own limit (starttls_timeout) ends it, without a word (Postfix),
    and the failed handshake is logged with the proxied client."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, _ = pki
    mf = await mailflow_server(**tls_proxy_settings(cert, users, starttls_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", mf.smtpd.address_of("submissions")[1])
    writer.write(v1("192.0.2.30"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await eventually(lambda: any("SSL_accept error from unknown[192.0.2.30]" in r.getMessage()
                                 for r in caplog.records))


async def test_a_header_then_the_end_of_input_ends_the_session_at_once(mailflow_server, pki, users, caplog):
    """A check that sends its header and closes its side (no handshake can follow): the session ends at once, as a
    handshake the client left, not at starttls_timeout (30 s here) with a session slot held meanwhile."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, _ = pki
    mf = await mailflow_server(**tls_proxy_settings(cert, users, starttls_timeout=30))
    reader, writer = await asyncio.open_connection("127.0.0.1", mf.smtpd.address_of("submissions")[1])
    writer.write(v2_tcp4("192.0.2.50", 40000))
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await eventually(lambda: "SSL_accept error from unknown[192.0.2.50]: lost connection" in [
        r.getMessage() for r in caplog.records])
    await eventually(lambda: not mf.smtpd.sessions)


async def test_the_connection_limits_count_the_proxied_client_and_refuse_it_over_tls(mailflow_server, pki, users,
                                                                                     caplog):
    """The admission judges the client the header names: a second session of 192.0.2.40 gets its 421 over TLS
    after the handshake (_refuse, Postfix's wrapper mode), logged with that client; 192.0.2.41 is served."""
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    mf = await mailflow_server(**{**tls_proxy_settings(cert, users, client_connection_count_limit=1),
                                  "mynetworks": ["198.51.100.0/24"]})
    port = mf.smtpd.address_of("submissions")[1]
    first = await tls_after(port, v1("192.0.2.40"), ctx)
    refused = await tls_after(port, v1("192.0.2.40", sport=40001), ctx, greet=False)
    assert await refused.reply() == status.too_many_connections("mx.mailflow.test", "192.0.2.40")
    assert await refused.closed()
    await refused.close()
    other = await tls_after(port, v1("192.0.2.41"), ctx)
    assert (await other.cmd("EHLO client.test"))[0] == 250
    for c in (first, other):
        await c.close()
    assert ("Connection concurrency limit exceeded: 2 from unknown[192.0.2.40] for service submissions"
            in [r.getMessage() for r in caplog.records])


def test_proxy_protocol_on_an_implicit_tls_listener_is_taken(tmp_path):
    listener = {"address": "127.0.0.1:0", "role": "submissions", "overrides": {"upstream_proxy_protocol": "haproxy"}}
    settings = merged(base_settings(tmp_path), {"smtpd": {"listen": ["127.0.0.1:0"], "tls_cert_file": "cert.pem",
                                                          "sasl_user_maps": ["inline:{}"], "listeners": [listener]}})
    config = config_from_dict(settings)
    assert config.smtpd.for_listener(config.smtpd.listeners[0]).upstream_proxy_protocol == "haproxy"


# -------------------------------------------------------------------------------- headers by client

HEADLESS = b"Subject: no origin headers\r\n\r\nbody\r\n"


async def delivered_head(mailflow_server, tmp_path, settings: dict, client: str, message: bytes) -> bytes:
    """The header section alice's Maildir got for `message`, sent as the client XCLIENT ADDR=`client` names."""
    mf = await mailflow_server(**settings, smtpd={"listen": ["127.0.0.1:0"],
                                                  "authorized_xclient_hosts": ["127.0.0.1/32"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    assert (await c.cmd("EHLO filter.test"))[0] == 250
    assert (await c.cmd(f"XCLIENT ADDR={client}"))[0] == 220
    assert (await c.send_message(message))[0] == 250
    await c.close()
    mail = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    return mail[0].split(b"\n\n")[0]


@pytest.mark.parametrize("settings, client, added", [
    # a remote client's mail is passed on as it came (Postfix 2.6 and later)
    ({"local_header_rewrite_clients": ["permit_mynetworks"]}, "192.0.2.1", False),
    ({}, "127.0.0.1", True),  # a client on this host: permit_inet_interfaces, the default
    # permit_inet_interfaces asks the connection (127.0.0.1 here, this host), not XCLIENT's ADDR: Postfix's
    # smtpd_check_rewrite asks state->sockaddr, so a same-host front end's clients all count as local
    ({}, "192.0.2.1", True),
    ({"always_add_missing_headers": True}, "192.0.2.1", True),
    ({"local_header_rewrite_clients": ["permit_mynetworks"], "mynetworks": ["192.0.2.0/24"]}, "192.0.2.1", True),
    ({"local_header_rewrite_clients": ["permit_sasl_authenticated"]}, "192.0.2.1 LOGIN=bob", True),
    ({"local_header_rewrite_clients": ["permit_mynetworks", "permit_sasl_authenticated"]}, "192.0.2.1", False),
    # a mynetworks table is asked the client's name here too, as at permit_mynetworks (Postfix's namadr_list)
    ({"local_header_rewrite_clients": ["permit_mynetworks"], "mynetworks": ["inline:{ mx.trusted.test=ok }"]},
     "192.0.2.1 NAME=mx.trusted.test", True),
    ({"local_header_rewrite_clients": []}, "127.0.0.1", False),
])
async def test_missing_headers_are_added_only_for_local_header_rewrite_clients(mailflow_server, tmp_path, settings,
                                                                               client, added):
    head = await delivered_head(mailflow_server, tmp_path, settings, client, HEADLESS)
    assert f"[{client.split()[0]}])".encode() in head  # the Received header names the client XCLIENT gave
    for field in (b"\nMessage-ID: <", b"\nDate: ", b"\nFrom: s@remote.test"):
        assert (field in head) == added, head


UNQUALIFIED = b"From: bob\r\nTo: Alice <alice>, carol@local.test\r\nSubject: bob\r\n\r\nbody\r\n"


@pytest.mark.parametrize("settings, client, from_, to", [
    ({}, "127.0.0.1", b"From: bob@mx.mailflow.test", b"To: Alice <alice@mx.mailflow.test>, carol@local.test"),
    # a remote client's stay as they came (permit_inet_interfaces would count the same-host front end)
    ({"local_header_rewrite_clients": []}, "192.0.2.1", b"From: bob", b"To: Alice <alice>, carol@local.test"),
    ({"local_header_rewrite_clients": [], "remote_header_rewrite_domain": "remote.example"}, "192.0.2.1",
     b"From: bob@remote.example", b"To: Alice <alice@remote.example>, carol@local.test"),
    ({"local_header_rewrite_clients": [], "myorigin": "local.test"}, "127.0.0.1", b"From: bob", b"To: Alice <alice>"),
    ({"myorigin": "local.test", "canonical_maps": ["inline:{bob@local.test=robert@local.test}"]}, "127.0.0.1",
     b"From: robert@local.test", b"To: Alice <alice@local.test>, carol@local.test"),
])
async def test_header_addresses_are_rewritten_for_local_header_rewrite_clients(mailflow_server, tmp_path, settings,
                                                                              client, from_, to):
    head = await delivered_head(mailflow_server, tmp_path, settings, client, UNQUALIFIED)
    assert b"\n" + from_ + b"\n" in head and b"\n" + to in head, head
    assert b"\nSubject: bob" in head  # (not an address field)
    assert f"(localhost [{client}])".encode() in head  # XCLIENT ADDR without NAME keeps the name (Postfix)


def test_local_header_rewrite_clients_names_the_bad_entry(tmp_path):
    with pytest.raises(ConfigError, match="local_header_rewrite_clients.*permit_auth_destination"):
        config_from_dict(merged(base_settings(tmp_path), {"local_header_rewrite_clients": ["permit_auth_destination"]}))


async def test_xclient_addr_without_name_says_once_a_session_that_the_front_ends_name_is_kept(mailflow_server,
                                                                                             caplog):
    """ADDR alone keeps the front end's name (Postfix's rule): a name-based permit then covers every client it
    names. An upgrade hazard (mailflow named such a client `unknown` before), said at info level once a session."""
    mf = await mailflow_server(smtpd={"listen": ["127.0.0.1:0"], "authorized_xclient_hosts": ["127.0.0.0/8"]})
    c = await SmtpClient.connect(mf.smtpd.address_of("mta")[1])
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        for xclient in ("XCLIENT ADDR=127.0.0.8", "XCLIENT ADDR=127.0.0.9", "XCLIENT NAME=n.test ADDR=127.0.0.7"):
            assert (await c.cmd("EHLO filter.test"))[0] == 250
            assert (await c.cmd(xclient))[0] == 220
        await c.close()
    kept = [m for m in caplog.messages if "XCLIENT ADDR without NAME" in m]
    assert kept == ["localhost[127.0.0.8]: XCLIENT ADDR without NAME: the client keeps the name localhost found for "
                    "the front end (name-based permits apply to it)"]
