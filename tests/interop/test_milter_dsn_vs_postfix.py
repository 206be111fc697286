"""Differential test: a milter's envelope edits at the end of the message (ADDRCPT, DELRCPT, CHGFROM) against a
private Postfix 3.7 with the same scripted milter. Each server relays to its own smtp-sink, which offers DSN, so
its dump shows per recipient the NOTIFY and ORCPT the next hop got. Postfix's cleanup (cleanup_milter.c) edits
the queue file in place: a recipient the milter did not touch keeps its NOTIFY, its ORCPT and its original
address (shown as the ORCPT when none was given: a source route dropped); an added one has none of its own. The
recipients: NOTIFY=SUCCESS,FAILURE with ORCPT, NOTIFY=NEVER alone, ORCPT alone, nothing, and one written with a
source route. An added recipient takes the NOTIFY and ORCPT of an ADDRCPT_PAR; bad ones and other arguments are
ignored (Postfix warns)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.postfix import smtp_sink
from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.milters import reply, scripted_milter

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
RECIPIENTS = [
    ("<r1@d.test>", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x1@orig.test"]),
    ("<r2@d.test>", ["NOTIFY=NEVER"]),
    ("<r3@d.test>", ["ORCPT=rfc822;x3@orig.test"]),
    ("<r4@d.test>", []),
    ("<@hop.test:r5@d.test>", ["NOTIFY=DELAY"]),
]
EDITS = [  # per probe, what the milter answers at the end of the message
    reply(b"+", b"<added@d.test>\0"),
    reply(b"-", b"<r4@d.test>\0"),
    reply(b"e", b"<new@remote.test>\0"),
    reply(b"+", b"<added@d.test>\0") + reply(b"-", b"<r2@d.test>\0") + reply(b"e", b"<new@remote.test>\0"),
    reply(b"2", b"<par@d.test>\0NOTIFY=FAILURE,DELAY ORCPT=rfc822;orig+2Bx@o.test\0"),  # ADDRCPT_PAR
    reply(b"2", b"<bad@d.test>\0NOTIFY=BOGUS ORCPT=none XYZ=1\0") + reply(b"2", b"<plain@d.test>\0\0"),
]


def arrivals(dump: Path) -> dict[int, tuple[list[str], list[str]]]:
    """Per probe (its Subject): the MAIL and the RCPT arguments the sink got, MAIL's parameters and the recipients
    sorted."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if subject and "X-Mail-Args: <>" not in message:
            mail = re.search(r"^X-Mail-Args: (.*)$", message, re.MULTILINE).group(1).split()
            out[int(subject.group(1))] = (mail[:1] + sorted(mail[1:]),  # (each server orders RET and ENVID its way)
                                          sorted(re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE)))
    return out


async def send(port: int, probe: int) -> None:
    """One probe: RCPT TO as RECIPIENTS write them (a source route too, which aiosmtplib would not send)."""
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd(f"MAIL FROM:<s@remote.test> RET=HDRS ENVID=env-{probe}")).code == 250
    for path, params in RECIPIENTS:
        assert (await client.cmd(" ".join([f"RCPT TO:{path}", *params]))).code == 250, path
    assert (await client.cmd("DATA")).code == 354
    assert (await client.cmd(f"From: s@remote.test\r\nSubject: probe-{probe}\r\n\r\nx\r\n.")).code == 250
    await client.close()


async def run(port: int, dump: Path) -> dict[int, tuple]:
    for i in range(len(EDITS)):
        await send(port, i)
    return await eventually(lambda: len(arrivals(dump)) == len(EDITS) and arrivals(dump), timeout=20)


async def test_milter_recipient_edits_keep_the_dsn_data_of_the_others_as_postfix(mailflow_server):
    answers = iter(EDITS * 2)  # Postfix's probes, then mailflow's, one after the other

    def end_of_message(_session: int, _payload: bytes) -> bytes:
        return next(answers) + reply(b"c")

    async with scripted_milter({b"E": end_of_message}) as milter, smtp_sink() as (pf_sink, pf_dump), \
            smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "mydestination": "", "smtpd_milters": milter.spec,
                                     "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            postfix = await run(pf.port, pf_dump)
        mf = await mailflow_server(**COMMON, mydestination=[], relayhost=f"[127.0.0.1]:{mf_sink}",
                                   mynetworks=["127.0.0.0/8"], smtpd={"listen": ["127.0.0.1:0"],
                                                                      "milters": [milter.spec]},
                                   milter={"command_timeout": "2s", "content_timeout": "2s"})
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump)
        assert sum(milter.commands(i).count(b"E") for i in range(len(milter.sessions))) == 2 * len(EDITS)
    assert mailflow == postfix
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    assert "<r1@d.test> ORCPT=rfc822;x1@orig.test NOTIFY=SUCCESS,FAILURE" in postfix[3][1]
    assert "<r5@d.test> ORCPT=rfc822;@hop.test:r5@d.test NOTIFY=DELAY" in postfix[3][1]  # the original as written
    assert "<added@d.test> ORCPT=rfc822;added@d.test" in postfix[3][1]  # added: no DSN parameters of its own
    assert "<par@d.test> ORCPT=rfc822;orig+2Bx@o.test NOTIFY=FAILURE,DELAY" in postfix[4][1]  # ADDRCPT_PAR's
    assert "<bad@d.test> ORCPT=rfc822;bad@d.test" in postfix[5][1]
