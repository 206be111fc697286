"""Differential test of the milter macros that name the message: one scripted milter (tests/support/milters.py)
behind a private Postfix 3.7 (smtpd_milters) and behind mailflow, the same session through each.

Postfix's defaults send `i` (the queue id) with MAIL, RCPT, DATA, each header and end of headers, each body chunk
and the end of the message (milter_*_macros; smtpd_milter.c and cleanup_milter.c answer it with the queue id,
milter8.c sends the end-of-header macros with each header and the end-of-data ones with each body chunk); its
smtpd has the id from the first accepted RCPT on (smtpd.c opens its queue file there), so MAIL and the first RCPT
go without it.
"""
from __future__ import annotations

import logging

import pytest

from mailflow.clock import SystemClock
from mailflow.stages.verify import ProbeSender
from tests.support import SmtpClient, postfix_instance
from tests.support.milters import ScriptedMilter, scripted_milter

pytestmark = pytest.mark.interop

STAGES = b"MRTLNBE"  # MAIL, RCPT, DATA, header, end of headers, body, end of message
USERS = "inline:{alice=ok, bob=ok}"
DAY = 86400


async def one_message(port: int) -> str:
    """Two recipients and a message; the queue id the 250 names."""
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@local.test>",
                    "RCPT TO:<bob@local.test>", "DATA"):
        assert (await client.cmd(command)).code in (250, 354), command
    queued = await client.cmd(b"From: s@remote.test\r\nSubject: t\r\n\r\nbody\r\n.")
    assert queued.code == 250
    await client.close()
    return queued.text.rpartition(" ")[2]


def i_macros(milter: ScriptedMilter, queue_id: str) -> list[tuple[str, str]]:
    """(stage, `QID` when its macros name `queue_id` as i, "" when they have no i) of each macro packet of the
    message's events, in order, repeats in a row (one packet per header, per body chunk) folded into one."""
    found: list[tuple[str, str]] = []
    for command, payload in milter.sessions[-1]:
        if command == b"D" and payload[:1] and payload[:1] in STAGES:
            parts = payload[1:].split(b"\0")[:-1]
            macros = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}
            named = "QID" if macros.get("i") == queue_id else macros.get("i", "")
            if not found or found[-1] != (payload[:1].decode(), named):
                found.append((payload[:1].decode(), named))
    return found


async def test_the_i_macro_names_the_queue_id_where_postfix_sends_it(mailflow_server):
    async with scripted_milter() as milter:
        async with postfix_instance({"myhostname": "pf.test", "mydestination": "local.test",
                                     "local_recipient_maps": USERS, "relayhost": "[127.0.0.1]:9",
                                     "smtpd_milters": milter.spec}) as pf:
            postfix = i_macros(milter, await one_message(pf.port))
        mf = await mailflow_server(local_recipient_maps=[USERS], relayhost="[127.0.0.1]:9",
                                   smtpd={"milters": [milter.spec]})
        mailflow = i_macros(milter, await one_message(mf.smtp_addresses[0][1]))
    assert postfix == [("M", ""), ("R", ""), ("R", "QID"), ("T", "QID"), ("L", "QID"), ("N", "QID"), ("B", "QID"),
                       ("E", "QID")]
    assert mailflow == postfix


def address_events(milter: ScriptedMilter, domain: str) -> list[tuple[str, str]]:
    """(what, address) of the last session's MAIL and RCPT: each macro packet's {mail_addr} or {rcpt_addr} and
    each command's argument, `domain` as D."""
    found = []
    for command, payload in milter.sessions[-1]:
        if command == b"D" and payload[:1] in (b"M", b"R"):
            parts = payload[1:].split(b"\0")[:-1]
            macros = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)}
            name = "{mail_addr}" if payload[:1] == b"M" else "{rcpt_addr}"
            found.append((name, macros[name]))
        elif command in (b"M", b"R"):
            found.append((command.decode(), payload.split(b"\0")[0].decode()))
    return [(what, address.replace(domain, "D")) for what, address in found]


async def probe_sender_session(port: int, stamped: str) -> None:
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", f"MAIL FROM:<{stamped}>", f"RCPT TO:<{stamped}>", "RSET"):
        assert (await client.cmd(command)).code == 250, command
    await client.close()


async def test_a_stamped_probe_sender_reaches_milters_as_written_its_macro_unstamped_as_postfix_does(
        mailflow_server):
    """address_verify_sender_ttl: smtpd takes its own stamped probe sender (MAIL, RCPT) as the plain address. Postfix's
    milters get the command's own words as the argument (milter_argv: stamped) and the address as smtpd took it in
    {mail_addr} and {rcpt_addr} (unstamped)."""
    def stamped(domain: str) -> str:
        return ProbeSender("double-bounce", DAY, lambda bare: f"{bare}@{domain}", SystemClock()).address()

    async with scripted_milter() as milter:
        async with postfix_instance({"myhostname": "pf.test", "mydestination": "local.test",
                                     "relayhost": "[127.0.0.1]:9", "address_verify_sender_ttl": "1d",
                                     "smtpd_milters": milter.spec}) as pf:
            await probe_sender_session(pf.port, stamped("pf.test"))
        postfix = address_events(milter, "pf.test")
        mf = await mailflow_server(relayhost="[127.0.0.1]:9", address_verify={"sender_ttl": "1d"},
                                   smtpd={"milters": [milter.spec]})
        await probe_sender_session(mf.smtp_addresses[0][1], stamped("mx.mailflow.test"))
        mailflow = address_events(milter, "mx.mailflow.test")
    written = f"<{stamped('D')}>"
    assert postfix == [("{mail_addr}", "double-bounce@D"), ("M", written),
                       ("{rcpt_addr}", "double-bounce@D"), ("R", written)]
    assert mailflow == postfix


async def xclient_session(port: int) -> None:
    """A front end's session: EHLO (its own), XCLIENT naming the client and the server it connected to, EHLO and
    MAIL of the client."""
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO front.test")).code == 250
    xclient = "XCLIENT NAME=client.example ADDR=192.0.2.10 PORT=40001 DESTADDR=203.0.113.5 DESTPORT=2525"
    assert (await client.cmd(xclient)).code == 220
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    await client.close()


def connects(milter: ScriptedMilter) -> list[tuple[bytes, str] | bytes]:
    """The milter connections of the session, each once (postfix_instance's readiness probe made one like the front
    end's, whose milter connection may come late): each one's connect packet host name and address (not the front
    end's ephemeral port) and the {daemon_addr} sent with it, then the commands of the client's (after XCLIENT; the
    negotiation, macros, and the ABORT and QUIT of the session's end, which may come after the test looks, left
    out). Both connect each at its greeting: the front end's at the connection, the client's at XCLIENT's 220."""
    found: dict[tuple[bytes, str], bytes] = {}
    for session in list(milter.sessions):
        connect = next((payload for command, payload in session if command == b"C"), None)
        if connect is None:  # (a connection that has yet to send its connect: the probe's, late)
            continue
        macros = next(payload for command, payload in session if command == b"D" and payload[:1] == b"C")
        parts = macros[1:].split(b"\0")
        daemon = parts[parts.index(b"{daemon_addr}") + 1].decode() if b"{daemon_addr}" in parts else ""
        name, _, rest = connect.partition(b"\0")
        found[(name + b" " + rest[3:], daemon)] = bytes(c[0] for c, _ in session if c not in (b"O", b"D", b"A", b"Q"))
    return [*sorted(found), found.get((b"client.example 192.0.2.10\0", "203.0.113.5"), b"")]


async def test_after_xclient_the_milters_connect_again_for_the_new_client_as_postfix_does(mailflow_server):
    """Postfix's xclient_cmd ends the milters' session (milter_disc_event, teardown_milters) and starts new ones:
    the new greeting connects again naming the client XCLIENT gave, and {daemon_addr} the DESTADDR. mailflow kept
    the front end's milter session, which judged every proxied client as the front end."""
    async with scripted_milter() as milter:
        async with postfix_instance({"myhostname": "pf.test", "smtpd_milters": milter.spec,
                                     "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}) as pf:
            await xclient_session(pf.port)
        postfix = connects(milter)
    async with scripted_milter() as milter:
        mf = await mailflow_server(smtpd={"milters": [milter.spec], "authorized_xclient_hosts": ["127.0.0.0/8"]})
        await xclient_session(mf.smtp_addresses[0][1])
        mailflow = connects(milter)
    assert postfix == [(b"client.example 192.0.2.10\0", "203.0.113.5"), (b"localhost 127.0.0.1\0", "127.0.0.1"),
                       b"CHM"]
    assert mailflow == postfix


async def test_a_client_port_above_65535_reaches_the_milters_as_0_as_postfix_sends_it(mailflow_server, caplog):
    """XCLIENT PORT takes five digits (99999 too); Postfix's milter8_conn_event warns `milter M: bad client port
    number 99999` and sends 0 in the connect packet. mailflow sent it wrapped (99999 & 0xFFFF: 34463)."""
    async def session(port: int) -> bytes:
        client = await SmtpClient.connect(port)
        assert (await client.cmd("XCLIENT NAME=client.example ADDR=192.0.2.10 PORT=99999")).code == 220
        assert (await client.cmd("EHLO client.test")).code == 250
        await client.close()
        return next(payload for session in reversed(milter.sessions) for command, payload in session
                    if command == b"C" and payload.startswith(b"client.example"))  # (not the readiness probe's)

    async with scripted_milter() as milter:
        async with postfix_instance({"myhostname": "pf.test", "smtpd_milters": milter.spec,
                                     "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}) as pf:
            postfix = await session(pf.port)
        mf = await mailflow_server(smtpd={"milters": [milter.spec], "authorized_xclient_hosts": ["127.0.0.0/8"]})
        with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
            mailflow = await session(mf.smtp_addresses[0][1])
    assert postfix == b"client.example\x004\x00\x00192.0.2.10\x00"
    assert mailflow == postfix
    assert f"milter {milter.spec}: bad client port number 99999" in caplog.messages
