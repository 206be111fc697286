"""Differential test of the milter macros that name the message: one scripted milter (tests/support/milters.py)
behind a private Postfix 3.7 (smtpd_milters) and behind mailflow, the same session through each.

Postfix's defaults send `i` (the queue id) with MAIL, RCPT, DATA, each header and end of headers, each body chunk
and the end of the message (milter_*_macros; smtpd_milter.c and cleanup_milter.c answer it with the queue id,
milter8.c sends the end-of-header macros with each header and the end-of-data ones with each body chunk); its
smtpd has the id from the first accepted RCPT on (smtpd.c opens its queue file there), so MAIL and the first RCPT
go without it.
"""
from __future__ import annotations

import pytest

from tests.support import SmtpClient, postfix_instance
from tests.support.milters import ScriptedMilter, scripted_milter

pytestmark = pytest.mark.interop

STAGES = b"MRTLNBE"  # MAIL, RCPT, DATA, header, end of headers, body, end of message
USERS = "inline:{alice=ok, bob=ok}"


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
