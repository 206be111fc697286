"""What smtpd answers at RCPT where a Postfix admin would expect Postfix's answer: an address that
transport_maps send to the error transport is refused then (no accept-then-bounce backscatter), postmaster of
every local domain is taken listed or not, the percent hack cannot be used to relay, and user@[own address]
is local."""
from __future__ import annotations

from mailflow import status
from tests.support import rcpt_reply

ERRORS = ("inline:{ {gone@local.test = error:5.7.1 moved away}, {old.test = error:no longer here}, "
          "{busy@local.test = error:4.2.1 try tomorrow} }")


async def test_error_transport_addresses_are_refused_at_rcpt(mailflow_server):
    mf = await mailflow_server(transport_maps=[ERRORS], mynetworks=["127.0.0.0/8"])
    port = mf.smtp_addresses[0][1]
    assert await rcpt_reply(port, "gone@local.test") == status.restriction_rejected(
        550, "5.7.1", "gone@local.test", "Recipient address", "moved away")
    assert await rcpt_reply(port, "x@old.test") == status.restriction_rejected(
        550, "5.1.1", "x@old.test", "Recipient address", "no longer here")
    assert await rcpt_reply(port, "busy@local.test") == status.restriction_rejected(  # as Postfix 3.7: a 4.X.X
        550, "5.2.1", "busy@local.test", "Recipient address", "try tomorrow")  # status is 5.X.X under the 550
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 250
    assert await mf.store.counts() == {}


async def test_postmaster_of_each_local_domain_is_always_accepted(mailflow_server):
    mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok}"], mydestination=["local.test", "other.test"])
    port = mf.smtp_addresses[0][1]
    for rcpt in ("postmaster@local.test", "Postmaster@other.test", "MAILER-DAEMON@local.test"):
        assert (await rcpt_reply(port, rcpt))[0] == 250, rcpt
    assert (await rcpt_reply(port, "postmaster+x@local.test"))[0] == 550
    assert (await rcpt_reply(port, "root@local.test"))[0] == 550


async def test_percent_hack_is_relay_checked_as_the_address_it_becomes(mailflow_server):
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    assert await rcpt_reply(port, "dave%remote.test@local.test") == status.relay_denied("dave%remote.test@local.test")
    assert (await rcpt_reply(port, "alice%localhost@local.test"))[0] == 250


async def test_user_at_own_address_literal_is_local(mailflow_server):
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    assert (await rcpt_reply(port, "alice@[127.0.0.1]"))[0] == 250
    assert (await rcpt_reply(port, "nobody@[127.0.0.1]"))[0] == 550  # local, and unknown there
    assert (await rcpt_reply(port, "alice@[192.0.2.1]"))[0] == 554  # someone else's: relaying
