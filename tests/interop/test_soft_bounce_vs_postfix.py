"""Differential tests of soft_bounce and relocated_maps against a private Postfix 3.7.11, configured alike.

- smtpd: the same conversation (a SIZE past message_size_limit, an unknown local user, relocated recipients keyed
  user@domain, a bare user of a local domain and @domain, a relay refusal, an unknown command), with soft_bounce
  off and on: the replies word for word, and the RCPT reject lines (`NOQUEUE: reject: RCPT from …: 450 4.1.6 …`).
- delivery: with soft_bounce on both, one message per scenario relayed to a scripted peer that refuses (at HELO,
  RCPT, the end of the content): each recipient's log outcome (`dsn=4.X.X, status=SOFTBOUNCE (text)`), and no
  notice on either side.
- `sendmail -bs` (Postfix runs its smtpd there): its refusals under soft_bounce, word for word.
- relocated mail that did not come by SMTP (sendmail): the error agent's line, `dsn=5.1.6, status=bounced (User
  has moved to …)`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys

import pytest

from tests.interop.test_sendmail_vs_postfix import bs_replies
from tests.interop.test_smtp_faults_vs_postfix import Scenario, outcomes, run_both
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

RELOCATED = "inline:{moved@origin.test=new@place.test, @oldco.test=newco.test, bob=bob@else.test}"
USERS = "inline:{alice=x, moved=x}"
POSTFIX = {"myhostname": "mx.origin.test", "mydestination": "origin.test", "local_recipient_maps": USERS,
           "relocated_maps": RELOCATED, "relay_domains": "oldco.test", "message_size_limit": "100000",
           "recipient_delimiter": "+",
           "mynetworks": "192.0.2.0/24", "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}
MAILFLOW = {"myhostname": "mx.origin.test", "mydestination": ["origin.test"], "local_recipient_maps": [USERS],
            "relocated_maps": [RELOCATED], "relay_domains": ["oldco.test"], "mynetworks": ["192.0.2.0/24"],
            "smtpd": {"message_size_limit": 100000}}
DIALOGUE = ["EHLO client.test", "MAIL FROM:<s@remote.test> SIZE=999999999", "RSET", "MAIL FROM:<s@remote.test>",
            "RCPT TO:<nobody@origin.test>", "RCPT TO:<moved@origin.test>", "RCPT TO:<Bob+tag@origin.test>",
            "RCPT TO:<x@oldco.test>", "RCPT TO:<x@elsewhere.test>", "RCPT TO:<alice@origin.test>", "FOO", "QUIT"]
REJECT = re.compile(r"(NOQUEUE: reject: RCPT from .*)$", re.MULTILINE)


async def replies(port: int) -> list[str]:
    """The reply to each command of DIALOGUE (EHLO's last line: mailflow offers no CHUNKING, documented)."""
    client = await SmtpClient.connect(port)
    said = [(await client.cmd(line)).text.splitlines()[-1] for line in DIALOGUE]
    said[0] = said[0][:3]
    await client.close()
    return said


@pytest.mark.parametrize("soft_bounce", [False, True])
async def test_smtpd_refuses_as_a_real_postfix_does(mailflow_server, caplog, soft_bounce):
    caplog.set_level(logging.INFO, logger="mailflow")
    async with postfix_instance({**POSTFIX, "soft_bounce": "yes" if soft_bounce else "no"}) as pf:
        postfix = await replies(pf.port)
        postfix_rejects = await eventually(lambda: len(REJECT.findall(pf.maillog)) == 5
                                           and REJECT.findall(pf.maillog))
    mf = await mailflow_server(**MAILFLOW, soft_bounce=soft_bounce)
    mailflow = await replies(mf.smtp_addresses[0][1])
    assert mailflow == postfix
    assert REJECT.findall(caplog.text) == postfix_rejects
    # what both did, so that the same change on both sides cannot pass unnoticed
    code, dsn = ("450", "4") if soft_bounce else ("550", "5")
    assert postfix[5] == f"{code} {dsn}.1.6 <moved@origin.test>: Recipient address rejected: User has moved to " \
                         "new@place.test"
    assert postfix[6] == f"{code} {dsn}.1.6 <Bob+tag@origin.test>: Recipient address rejected: User has moved to " \
                         "bob@else.test"
    assert postfix[7].endswith("User has moved to newco.test") and postfix[9].startswith("250 ")
    assert [line[:9] for line in (postfix[1], postfix[8], postfix[10])] == (
        ["452 4.3.4", "454 4.7.1", "400 4.5.2"] if soft_bounce else ["552 5.3.4", "554 5.7.1", "500 5.5.2"])


REFUSING = {
    "helo-refused": Scenario({"EHLO": b"500 5.5.1 no\r\n", "HELO": b"501 5.5.4 not you\r\n"}),
    "rcpt-550": Scenario({"RCPT": lambda a: b"550 5.1.1 no such user\r\n" if a.startswith("b@")
                          else b"250 2.1.5 Ok\r\n"}, ("a", "b")),
    "dot-554": Scenario({"DOT": b"554 5.7.1 rejected as spam\r\n"}, ("a", "b")),
}


async def test_soft_bounce_keeps_what_would_bounce_deferred_as_a_real_postfix_does(mailflow_server, smtp_peer):
    (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(
        mailflow_server, smtp_peer, REFUSING, postfix={"soft_bounce": "yes"}, mailflow={"soft_bounce": True})
    assert mf_ended == pf_ended
    assert mf_notices == pf_notices == {}
    # what both did
    assert pf_ended["b@rcpt-550.test"][1:] == (
        "4.1.1", "SOFTBOUNCE", "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)")
    assert pf_ended["a@rcpt-550.test"][2] == "sent"
    assert [pf_ended[f"{r}@dot-554.test"][1:3] for r in "ab"] == [("4.7.1", "SOFTBOUNCE")] * 2
    assert pf_ended["a@helo-refused.test"][1:3] == ("4.5.4", "SOFTBOUNCE")


async def test_relocated_mail_from_sendmail_bounces_as_with_a_real_postfix(mailflow_server, write_config, tmp_path,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="mailflow.mail")
    moved = ("moved@origin.test", "x@oldco.test")
    submit = ["-f", "s@remote.test", *moved]

    def ended(log: str) -> dict | None:  # (not the notice's line, to=<s@remote.test>)
        found = {r: got for r, got in outcomes(log).items() if r in moved}
        return found if len(found) == 2 else None

    message = b"Subject: moved\n\nhello\n"
    async with postfix_instance({**POSTFIX, "smtp_dns_support_level": "disabled"}) as pf:
        subprocess.run(["sendmail", "-C", str(pf.etc), *submit], input=message, check=True, timeout=20)
        postfix = await eventually(lambda: ended(pf.maillog), timeout=20)
    (tmp_path / "queue").mkdir(exist_ok=True)
    await mailflow_server(**MAILFLOW)
    config = write_config(tmp_path / "mailflow.toml", **MAILFLOW)
    done = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailflow", "sendmail", "-C", str(config),
                                                *submit, stdin=subprocess.PIPE)
    await done.communicate(message)
    assert done.returncode == 0
    mailflow = await eventually(lambda: ended(caplog.text), timeout=20)
    assert mailflow == postfix
    assert postfix["moved@origin.test"] == ("none", "5.1.6", "bounced", "User has moved to new@place.test")
    assert postfix["x@oldco.test"] == ("none", "5.1.6", "bounced", "User has moved to newco.test")


BS = ["EHLO client.test", "MAIL FROM:<s@remote.test> SIZE=999999999", "MAIL FROM:<s@remote.test> FOO",
      "RCPT TO:<b@x.test>", "FOO", "QUIT"]


async def test_sendmail_bs_refuses_as_a_real_postfix_does_under_soft_bounce(write_config, tmp_path):
    (tmp_path / "queue").mkdir(exist_ok=True)
    config = write_config(tmp_path / "mailflow.toml", **{**MAILFLOW, "soft_bounce": True,
                                                         "smtpd": {"message_size_limit": 100000,
                                                                   "error_sleep_time": 0}})
    async with postfix_instance({**POSTFIX, "soft_bounce": "yes", "smtpd_error_sleep_time": "0"}) as pf:
        postfix = await bs_replies(["sendmail", "-C", str(pf.etc)], BS)
    mailflow = await bs_replies([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], BS)
    assert mailflow[2:] == postfix[2:]  # (from MAIL on: the greeting and EHLO are each one's own)
    assert postfix[2:6] == ["452 4.3.4 Message size exceeds fixed limit", "455 4.5.4 Unsupported option: FOO",
                            "403 4.5.1 Error: need MAIL command", "400 4.5.2 Error: command not recognized"]


async def test_soft_bounced_mail_is_returned_at_its_age_as_a_real_postfix_returns_it(mailflow_server, smtp_peer):
    """maximal_queue_lifetime = 0 with soft_bounce: the first attempt's refusal is kept deferred, and the message,
    past its lifetime, is returned all the same (Postfix's defer_flush ignores soft_bounce): the same notice
    fields, a 4.X.X status with Action: failed."""
    (pf_ended, pf_notices), (mf_ended, mf_notices) = await run_both(
        mailflow_server, smtp_peer, {"rcpt-550": REFUSING["rcpt-550"]}, notice_for_all=True,
        postfix={"soft_bounce": "yes", "maximal_queue_lifetime": "0"}, mailflow={"soft_bounce": True},
        queue={"maximal_queue_lifetime": "0s"})
    assert mf_ended == pf_ended
    assert mf_notices == pf_notices
    assert pf_notices["b@rcpt-550.test"]["Action"] == "failed" and pf_notices["b@rcpt-550.test"]["Status"] == "4.1.1"
