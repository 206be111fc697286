"""Differential test of a milter's refusals under soft_bounce and at the end of the message: one scripted milter
(tests/support/milters.py) behind a private Postfix 3.7 (smtpd_milters) and behind mailflow, the same sessions
through each, soft_bounce off and on.

Postfix's milter8 makes a milter's own reply (SMFIR_REPLYCODE) 4xx as it reads it under soft_bounce (each line's
code and enhanced code): a `550 5.7.1` at connect is then a 4xx, which leaves the 220. Its REJECT stays `550 5.7.1
Command rejected`, logged so by check_milter_reply (and by cleanup at the end of the message); only the reply sent
is made 4xx (smtpd_chat_reply). A refusal at the end of the message is logged by cleanup, not smtpd:
`QID: milter-reject: END-OF-MESSAGE from host[ip]: 5.7.1 Command rejected; from=<s> to=<the last recipient>
proto=ESMTP helo=<h>` (cleanup_milter_apply: the reply without its code).
"""
from __future__ import annotations

import re

import pytest

from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.maillog import SYSLOG_NAME
from tests.support.milters import replycode, reply, scripted_milter

pytestmark = pytest.mark.interop

PF_HOST, MF_HOST = "pf.test", "mx.mailflow.test"
SCENARIOS = {  # the milter's answers, by scenario
    "connect reject": {b"C": reply(b"r")}, "connect own 550": {b"C": replycode("550 5.7.1 not you")},
    "message reject": {b"E": reply(b"r")}, "message tempfail": {b"E": reply(b"t")},
    "message own 554": {b"E": replycode("554 5.7.1 no thanks")},
}
COMMANDS = ("EHLO client.test", "MAIL FROM:<s@remote.test>", "RCPT TO:<r@remote.test>", "RCPT TO:<q@remote.test>",
            "DATA", "Subject: milter\r\n\r\nbody\r\n.", "QUIT")


async def dialogue(port: int, host: str) -> list[str]:
    """The greeting and the commands, each reply's first line (a 220's code, EHLO's keyword count): up to the end
    of the session or the first refused command after EHLO."""
    client = await SmtpClient.connect(port, greet=False)
    replies = [await client.reply()]
    for command in COMMANDS:
        if replies[-1].code in (None, 421) or (len(replies) > 2 and replies[-1].code >= 400):
            break
        replies.append(await client.cmd(command))
    await client.close()
    shown = [f"250 {len(r.text.splitlines()) - 1} keywords" if r.text.startswith("250-") else
             "220" if r.code == 220 else r.text.splitlines()[0] if r.code else "closed" for r in replies]
    return [line.replace(host, "HOST") for line in shown]


def refusal_lines(log: str) -> list[str]:
    """smtpd's and cleanup's reject and milter-reject lines, the queue id as QID, the client as CLIENT."""
    found = re.findall(rf"{SYSLOG_NAME}/(smtpd|cleanup)\[\d+\]: ((?:NOQUEUE|[0-9A-F]+): (?:milter-)?reject: .*)$",
                       log, re.M)
    return [f"{service}: " + re.sub(r"^[0-9A-F]+:", "QID:", re.sub(r"from \S+\[127\.0\.0\.1\]", "from CLIENT", line))
            for service, line in found]


@pytest.mark.parametrize("soft_bounce", [False, True], ids=["", "soft_bounce"])
async def test_a_milters_refusals_are_answered_and_logged_as_in_postfix(mailflow_server, mail_log, soft_bounce):
    current = ["connect reject"]

    def answer(command: bytes):
        return lambda _, __: SCENARIOS[current[0]].get(command, reply(b"c"))

    async with scripted_milter({command: answer(command) for command in (b"C", b"E")}) as milter:
        async with postfix_instance({"myhostname": PF_HOST, "syslog_name": SYSLOG_NAME, "smtpd_milters": milter.spec,
                                     "mynetworks": "127.0.0.0/8", "smtputf8_enable": "yes",
                                     "soft_bounce": "yes" if soft_bounce else "no"}) as pf:
            started = await pf.sessions_ended()
            postfix = []
            for scenario in SCENARIOS:
                current[0] = scenario
                postfix.append(await dialogue(pf.port, PF_HOST))
            ended = await pf.sessions_ended()
            pf_log = pf.maillog[started:ended]
        mf = await mailflow_server(myhostname=MF_HOST, mynetworks=["127.0.0.0/8"], soft_bounce=soft_bounce,
                                   smtpd={"milters": [milter.spec], "disable_vrfy_command": False})
        mailflow = []
        for scenario in SCENARIOS:
            current[0] = scenario
            mailflow.append(await dialogue(mf.smtp_addresses[0][1], MF_HOST))
        await eventually(lambda: mail_log.read_text().count("disconnect from") >= len(SCENARIOS), timeout=10)
        mf_log = mail_log.read_text()
    assert dict(zip(SCENARIOS, mailflow)) == dict(zip(SCENARIOS, postfix))
    assert refusal_lines(mf_log) == refusal_lines(pf_log)
    # the edges themselves, so that the same change on both sides cannot pass unnoticed
    message_reject = ("cleanup: QID: milter-reject: END-OF-MESSAGE from CLIENT: 5.7.1 Command rejected; "
                      "from=<s@remote.test> to=<q@remote.test> proto=ESMTP helo=<client.test>")
    assert message_reject in refusal_lines(pf_log)
    if soft_bounce:
        assert postfix[0][:3] == ["454 HOST ESMTP not accepting connections", "250 1 keywords",
                                  "450 4.7.1 Command rejected"]
        assert postfix[1][-2:] == ["250 9 keywords", "450 4.7.1 not you"]
