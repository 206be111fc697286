"""Differential test of cleanup's header rewriting: the same message, from 127.0.0.1 (a client on this host, as
local_header_rewrite_clients' default sees it), relayed by a private Postfix and by mailflow configured alike to a
capture peer each, must come out with the same addresses in its address fields. The addresses are compared, not
the bytes: Postfix writes a rewritten field anew, mailflow changes only its addresses (docs/config.md).
"""
from __future__ import annotations

import email.utils

import pytest

from mailflow.message import header_values, split_header
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

MESSAGE = (b"From: bob\r\n"
           b"To: Alice <alice>, carol@relay.test, dave@host.origin.test\r\n"
           b"Cc: erin (Erin E.),\r\n \"Frank F\" <frank>, undisclosed: gina, <hal@other.test>;\r\n"
           b"Reply-To: ivan\r\n"
           b"Sender: <>\r\n"
           b"Subject: bob and alice\r\n"
           b"Message-ID: <probe@client.test>\r\n"
           b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
           b"\r\n"
           b"bob\r\n")
FIELDS = ("from", "to", "cc", "reply-to", "sender", "subject")


async def relay_through(port: int, peer) -> dict[str, list]:
    """Send MESSAGE through the server on `port`; the address fields of what `peer` received."""
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<bob@client.test>")).code == 250
    assert (await c.cmd("RCPT TO:<carol@relay.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(MESSAGE + b".\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    await eventually(lambda: peer.messages, timeout=20)
    head, _ = split_header(peer.messages[0].content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    values = {name: header_values(head, name) for name in FIELDS}
    return {name: [email.utils.getaddresses(values[name])] if name != "subject" else values[name]
            for name in FIELDS}


async def test_header_addresses_are_rewritten_as_a_real_postfix_rewrites_them(mailflow_server, smtp_peer):
    pf_peer, mf_peer = await smtp_peer(), await smtp_peer()
    async with postfix_instance({
        "myhostname": "mx.origin.test", "myorigin": "origin.test", "mydestination": "",
        "masquerade_domains": "origin.test", "relayhost": f"[127.0.0.1]:{pf_peer.port}",
    }) as pf:
        postfix = await relay_through(pf.port, pf_peer)
    mf = await mailflow_server(myhostname="mx.origin.test", myorigin="origin.test", mydestination=[],
                               masquerade_domains=["origin.test"], relayhost=f"[127.0.0.1]:{mf_peer.port}")
    mailflow = await relay_through(mf.smtp_addresses[0][1], mf_peer)
    assert mailflow == postfix
    # what both did, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["from"] == [[("", "bob@origin.test")]]
    assert [a for _, a in postfix["to"][0]] == ["alice@origin.test", "carol@relay.test", "dave@origin.test"]
    assert [a for _, a in postfix["cc"][0]][-3:] == ["frank@origin.test", "gina@origin.test", "hal@other.test"]
    assert postfix["subject"] == ["bob and alice"]
