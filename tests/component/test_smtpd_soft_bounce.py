"""soft_bounce in smtpd: every 5xx reply goes out as 4xx, its enhanced status code too (Postfix smtpd_chat_reply),
and the reject line logs the reply as sent (smtpd_check_reject). The texts are Postfix 3.7.11's, seen on a
private instance with soft_bounce = yes (tests/interop/test_soft_bounce_vs_postfix.py compares the two)."""
from __future__ import annotations

import logging

from mailflow.config import config_from_dict
from tests.support import SmtpClient, eventually, rcpt_reply, send

SETTINGS = {"soft_bounce": True, "relocated_maps": ["inline:{moved@local.test=new@place.test}"],
            "smtpd": {"message_size_limit": 100000}}


async def test_every_5xx_reply_goes_out_as_4xx(mailflow_server, caplog):
    mf = await mailflow_server(**SETTINGS)
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    with caplog.at_level(logging.INFO, logger="mailflow"):
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test> SIZE=999999999")).text == \
            "452 4.3.4 Message size exceeds fixed limit"
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert (await client.cmd("RCPT TO:<nobody@local.test>")).text == \
            "450 4.1.1 <nobody@local.test>: Recipient address rejected: User unknown in local recipient table"
        assert (await client.cmd("RCPT TO:<moved@local.test>")).text == \
            "450 4.1.6 <moved@local.test>: Recipient address rejected: User has moved to new@place.test"
        assert (await client.cmd("RCPT TO:<x@elsewhere.test>")).text == \
            "454 4.7.1 <x@elsewhere.test>: Relay access denied"
        assert (await client.cmd("FOO")).text == "400 4.5.2 Error: command not recognized"
        assert (await client.cmd("RCPT TO:<alice@local.test>")).code == 250  # the rest is untouched
        await client.cmd("QUIT")
    assert ("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 450 4.1.1 <nobody@local.test>: Recipient address "
            "rejected: User unknown in local recipient table; from=<s@remote.test> to=<nobody@local.test> "
            "proto=ESMTP helo=<client.test>") in caplog.text
    assert ": 550 " not in caplog.text and ": 554 " not in caplog.text


async def test_without_soft_bounce_the_refusals_stay_5xx(mailflow_server):
    mf = await mailflow_server(**{**SETTINGS, "soft_bounce": False})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await client.cmd("RCPT TO:<moved@local.test>")).text == \
        "550 5.1.6 <moved@local.test>: Recipient address rejected: User has moved to new@place.test"
    await client.cmd("QUIT")


async def test_a_reload_turns_soft_bounce_on_and_off_for_smtpd_and_qmgr(mailflow_server, caplog):
    """The safety net follows the configuration in force: a reload that turns it on softens smtpd's refusals and
    keeps a bounce deferred (status=SOFTBOUNCE), one that turns it off makes them 5xx again."""
    mf = await mailflow_server(**{**SETTINGS, "soft_bounce": False,
                                  "transport_maps": ["inline:{ {gone@local.test=error:5.1.1 gone for good} }"],
                                  "smtpd": {"reject_unlisted_recipient": False}})
    port = mf.smtp_addresses[0][1]
    assert (await rcpt_reply(port, "x@elsewhere.test")).code == 554
    await mf.reload(config_from_dict({**mf.config.model_dump(), "soft_bounce": True}))
    assert (await rcpt_reply(port, "x@elsewhere.test")).text == "454 4.7.1 <x@elsewhere.test>: Relay access denied"
    with caplog.at_level(logging.INFO, logger="mailflow"):
        await send(port, "s@remote.test", ["gone@local.test"], b"Subject: soft\r\n\r\nbody\r\n")
        await eventually(lambda: "status=SOFTBOUNCE (gone for good)" in caplog.text, what="the bounce kept deferred")
    assert "dsn=4.1.1, status=SOFTBOUNCE" in caplog.text and "status=bounced" not in caplog.text
    await mf.reload(config_from_dict({**mf.config.model_dump(), "soft_bounce": False}))
    assert (await rcpt_reply(port, "x@elsewhere.test")).code == 554
