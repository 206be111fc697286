"""Differential test of address verification (reject_unverified_recipient) against a private Postfix 3.7: both
relay relay.test to an SMTP peer (its own for each) that accepts one address, refuses one 550 and defers one 450;
both have local.test, where `nosuchuser` is unknown, and the virtual alias `multi@relay.test` for the refused and
the deferred address (a one-to-many alias: deliverable, its members not probed). The replies to the first RCPT of each address (the probe started
and waited for) and to a later one (the cached result) must be the same, word for word; and each server's probe
must come from double-bounce@ its origin, with no message delivered."""
from __future__ import annotations

import asyncio

import pytest

from tests.support import SmtpClient, postfix_instance

pytestmark = pytest.mark.interop

REFUSALS = {
    "bad@relay.test": "550 5.1.1 <bad@relay.test>: Recipient address rejected: User unknown",
    "soft@relay.test": "450 4.2.0 <soft@relay.test>: Try again later",
}
ADDRESSES = ("good@relay.test", "bad@relay.test", "soft@relay.test", "nosuchuser@local.test", "postmaster@local.test",
             "multi@relay.test")
VIRTUAL = "inline:{ { multi@relay.test = bad@relay.test, soft@relay.test } }"


async def peer_for(smtp_peer):
    """A peer scripted with REFUSALS; the senders of the MAIL commands it got."""
    peer = await smtp_peer()
    peer.handler.rcpt_replies.update(REFUSALS)
    senders: list[str] = []
    answer = type(peer.handler).handle_MAIL

    async def recorded(server, session, envelope, address, options):
        senders.append(address)
        return await answer(peer.handler, server, session, envelope, address, options)

    peer.handler.handle_MAIL = recorded
    return peer, senders


async def rcpt_text(port: int, address: str) -> str:
    client = await SmtpClient.connect(port)
    try:
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<s@remote.test>")
        return (await client.cmd(f"RCPT TO:<{address}>", timeout=15)).text
    finally:
        await client.close()


async def two_rounds(port: int) -> list[list[str]]:
    """The replies to every address at once (the probes), then again (the cache)."""
    return [list(await asyncio.gather(*(rcpt_text(port, a) for a in ADDRESSES))) for _ in range(2)]


async def test_unverified_recipients_get_postfix_replies_first_and_from_the_cache(smtp_peer, mailflow_server):
    pf_peer, pf_senders = await peer_for(smtp_peer)
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
        "relayhost": f"[127.0.0.1]:{pf_peer.port}", "mynetworks": "127.0.0.2/32",
        "smtpd_recipient_restrictions": "reject_unverified_recipient", "virtual_alias_maps": VIRTUAL,
    }) as pf:
        pf_replies = await two_rounds(pf.port)
    mf_peer, mf_senders = await peer_for(smtp_peer)
    mf = await mailflow_server(mydestination=["local.test"], relay_domains=["relay.test"],
                               relayhost=f"[127.0.0.1]:{mf_peer.port}", virtual_alias_maps=[VIRTUAL],
                               smtpd={"recipient_restrictions": ["reject_unverified_recipient"]})
    mf_replies = await two_rounds(mf.smtp_addresses[0][1])

    differ = {(round, a): (pf_replies[round][n], mf_replies[round][n]) for round in (0, 1)
              for n, a in enumerate(ADDRESSES) if pf_replies[round][n] != mf_replies[round][n]}
    assert differ == {}
    assert pf_replies[0][0] == pf_replies[0][5] == "250 2.1.5 Ok"
    assert "unverified address: host 127.0.0.1" in pf_replies[0][1]
    assert pf_replies[0] == pf_replies[1]
    assert set(pf_senders) == {"double-bounce@pf.test"} and set(mf_senders) == {"double-bounce@mx.mailflow.test"}
    assert len(mf_senders) == len(pf_senders) == 3  # one probe per relayed address, none for the alias's members
    assert pf_peer.messages == mf_peer.messages == []
