"""The virtual mailbox class: hosted users with a Maildir each under virtual_mailbox_base."""
from __future__ import annotations

import aiosmtplib
import pytest

from mailflow.clock import SystemClock
from mailflow.content import Content
from mailflow.errors import TemporaryError
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports.maildir import MaildirTransport, virtual_maildirs
from tests.support import eventually, maildir_messages, queue_becomes, send

MAPS = "inline:{carol@virtual.test=virtual.test/carol/, dave@virtual.test=virtual.test/dave/}"


async def test_each_virtual_user_lands_in_its_own_maildir(mailflow_server, tmp_path):
    mf = await mailflow_server(virtual_mailbox_domains=["virtual.test"], virtual_mailbox_maps=[MAPS],
                               virtual_mailbox_base=str(tmp_path / "vmail"))
    port = mf.smtp_addresses[0][1]
    await send(port, "s@remote.test", ["carol@virtual.test", "dave+news@virtual.test"],
               b"Subject: hosted\r\n\r\nfor carol and dave\r\n")
    for user, given in (("carol", b"carol"), ("dave", b"dave+news")):
        maildir = tmp_path / "vmail" / "virtual.test" / user
        [data] = await eventually(lambda: maildir_messages(maildir))
        assert data.startswith(b"Return-Path: <s@remote.test>\nX-Original-To: %s@virtual.test\nDelivered-To: "
                               % given)
        assert data.endswith(b"\n\nfor carol and dave\n")
    assert not (tmp_path / "mail").exists(), "nothing went to the local class"

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as c:
        await c.mail("s@remote.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await c.rcpt("nobody@virtual.test")
    assert refused.value.code == 550 and "virtual mailbox table" in refused.value.message


class Maps:
    def __init__(self, value):
        self.value = value

    def virtual_mailbox(self, addr):
        return self.value


def test_a_map_value_outside_the_base_or_not_a_maildir_defers(tmp_path):
    with pytest.raises(TemporaryError) as outside:
        virtual_maildirs(tmp_path, Maps("../../etc/"))("x@virtual.test")
    assert outside.value.dsn == "4.3.5" and "outside" in outside.value.text
    with pytest.raises(TemporaryError) as mbox:
        virtual_maildirs(tmp_path, Maps("virtual.test/x"))("x@virtual.test")
    assert "Maildir" in mbox.value.text
    assert virtual_maildirs(tmp_path, Maps(None))("x@virtual.test") is None
    assert virtual_maildirs(tmp_path, Maps("d/x/"))("x@d") == (tmp_path / "d" / "x").resolve()


async def test_a_full_virtual_mailbox_bounces_or_defers(mailflow_server, tmp_path):
    mf = await mailflow_server(virtual_mailbox_domains=["virtual.test"], virtual_mailbox_maps=[MAPS],
                               virtual_mailbox_base=str(tmp_path / "vmail"), virtual_mailbox_limit=1200,
                               virtual_mailbox_limit_maps=["inline:{dave@virtual.test=100000}"])
    port = mf.smtp_addresses[0][1]
    await send(port, "s@remote.test", ["carol@virtual.test"], b"Subject: 1\r\n\r\n" + b"x" * 600 + b"\r\n")
    carol = tmp_path / "vmail" / "virtual.test" / "carol"
    await eventually(lambda: maildir_messages(carol))
    # the second would take carol past her 1200 bytes; dave's own limit is larger
    await send(port, "alice@local.test", ["carol@virtual.test", "dave@virtual.test"],
               b"Subject: 2\r\n\r\n" + b"y" * 600 + b"\r\n")
    await eventually(lambda: maildir_messages(tmp_path / "vmail" / "virtual.test" / "dave"))
    [bounce] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"Final-Recipient: rfc822; carol@virtual.test" in bounce and b"Status: 5.2.2" in bounce
    assert len(maildir_messages(carol)) == 1


async def test_an_over_quota_mailbox_defers_when_configured(mailflow_server, tmp_path):
    mf = await mailflow_server(virtual_mailbox_domains=["virtual.test"], virtual_mailbox_maps=[MAPS],
                               virtual_mailbox_base=str(tmp_path / "vmail"), virtual_mailbox_limit=100,
                               virtual_overquota_bounce=False)
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["carol@virtual.test"], b"Subject: big\r\n\r\n" + b"z" * 200)
    await queue_becomes(mf.store, {"deferred": 1})
    [(_, status, dsn, text)] = await mf.store.recipients((await mf.store.due(2e9, 1))[0].queue_id)
    assert (status, dsn) == ("pending", "4.2.2") and "quota 100" in text


async def test_a_user_gone_since_rcpt_bounces_as_virtual8_says_it(tmp_path):
    transport = MaildirTransport(lambda recipient: None, clock=SystemClock())
    request = DeliveryRequest("Q1", "s@remote.test", (Recipient(0, "ghost@virtual.test", "ghost@virtual.test"),),
                              "virtual.test", Content.of(b"Subject: x\r\n\r\nbody\r\n"))
    [result] = (await transport.deliver(request)).results
    assert (result.outcome, result.dsn, result.text) == (Outcome.BOUNCED, "5.1.1", 'unknown user: "ghost@virtual.test"')
