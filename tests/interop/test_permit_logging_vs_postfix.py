"""Differential test of log_access_permit_actions (Postfix's smtpd_log_access_permit_actions): a private Postfix 3.7
and mailflow, configured alike with `static:all`, each permit's `NOQUEUE: permit: ...` line compared word for word
(permit, permit_mynetworks, an access table's OK, RELAY, all-digit and DISCARD values and a policy service's OK,
its item in braces named as written, in the helo, sender and relay lists and a restriction class), with the
replies."""
from __future__ import annotations

import logging

import pytest

from tests.support import SmtpClient, eventually, postfix_instance
from tests.support.policy import RecordingPolicy

pytestmark = pytest.mark.interop

VALUES = {"ok": "OK", "okwithtext": "OK fine", "relay": "RELAY", "digits": "1234567", "discard": "DISCARD",
          "lower": "ok"}
ACCESS = "inline:{ " + ", ".join(f"{{ {name}@remote.test = {value} }}" for name, value in VALUES.items()) + " }"
CLASSES = {"permitclass": "permit", "mynetworksclass": "permit_mynetworks"}
POLICY_CLASS = "policyclass"  # check_policy_service in braces, its server answering OK
SENDERS = [*(f"{name}@remote.test" for name in VALUES), *(f"{name}@remote.test" for name in (*CLASSES, POLICY_CLASS))]
SELECT = "inline:{ " + ", ".join(f"{name}@remote.test={name}" for name in (*CLASSES, POLICY_CLASS)) + " }"


async def replies(port: int) -> dict[str, str]:
    answers = {}
    for sender in SENDERS:
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO client.test")).code == 250
            reply = await client.cmd(f"MAIL FROM:<{sender}>")
            answers[sender] = (await client.cmd("RCPT TO:<alice@local.test>")).text if reply.code == 250 \
                else reply.text
        finally:
            await client.close()
    return answers


def permit_lines(lines) -> list[str]:
    picked = [line.split("]: ", 1)[1] if "/smtpd[" in line else line for line in lines]
    return [line for line in picked if line.startswith(("NOQUEUE: permit: ", "NOQUEUE: discard: "))]


async def test_permits_are_logged_as_postfix_logs_them(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    async with RecordingPolicy("OK") as policy:
        await compare_permits(mailflow_server, caplog, {
            **CLASSES, POLICY_CLASS: f"check_policy_service {{ {policy.spec}, timeout=10s }}"})


async def compare_permits(mailflow_server, caplog, classes: dict[str, str]) -> None:
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "local_recipient_maps": "inline:{alice=ok}",
        "smtpd_restriction_classes": ", ".join(classes), **classes,
        "smtpd_sender_restrictions": f"check_sender_access {ACCESS}, check_sender_access {SELECT}",
        "smtpd_helo_restrictions": "permit", "smtpd_log_access_permit_actions": "static:all",
    }) as pf:
        postfix = await replies(pf.port)
        # (Postfix's smtpd logs through postlogd: the last session's lines may come after its last reply)
        postfix_logged = await eventually(lambda: len(lines := permit_lines(pf.maillog.splitlines())) >= 27 and lines,
                                          what="the private Postfix's 27 permit and discard lines")
    mf = await mailflow_server(mydestination=["local.test"], mynetworks=["127.0.0.0/8"], smtpd={
        "restriction_classes": {name: [item] for name, item in classes.items()},
        "sender_restrictions": [f"check_sender_access {ACCESS}", f"check_sender_access {SELECT}"],
        "helo_restrictions": ["permit"], "log_access_permit_actions": ["static:all"]})
    mailflow = await replies(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert permit_lines(r.getMessage() for r in caplog.records) == postfix_logged
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["relay@remote.test"] == "250 2.1.5 Ok"  # (RELAY is OK)
    assert ("NOQUEUE: permit: RCPT from localhost[127.0.0.1]: action=ok for Sender address=lower@remote.test from "
            f"{ACCESS}; from=<lower@remote.test> to=<alice@local.test> proto=ESMTP helo=<client.test>") \
        in postfix_logged
    assert ("NOQUEUE: permit: RCPT from localhost[127.0.0.1]: action=permit for Helo command=client.test ; "
            "from=<ok@remote.test> to=<alice@local.test> proto=ESMTP helo=<client.test>") in postfix_logged
    assert ("NOQUEUE: permit: RCPT from localhost[127.0.0.1]: action=OK for Sender address=policyclass@remote.test "
            f"from {classes[POLICY_CLASS].removeprefix('check_policy_service ')}; from=<policyclass@remote.test> "
            "to=<alice@local.test> proto=ESMTP helo=<client.test>") in postfix_logged
    assert len(postfix_logged) == 27  # three a session: the helo list, the sender list, the relay list (Postfix's
    # default permit_mynetworks) or the discard line
