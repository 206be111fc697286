"""Differential test of address verification (reject_unverified_recipient) against a private Postfix 3.7: both
relay relay.test to an SMTP peer (its own for each) that accepts one address, refuses one 550 and defers one 450;
both have local.test, where `nosuchuser` is unknown, and the virtual alias `multi@relay.test` for the refused and
the deferred address (a one-to-many alias: deliverable, its members not probed). The replies to the first RCPT of each
address (the probe started and waited for) and to a later one (the cached result) must be the same, word for word; and
each server's probe must come from double-bounce@ its origin, with no message delivered.
Then qmgr's dead-destination memory as probes meet it (a next hop that refuses connections, a window of one: a
probe's failure does not make it dead, a message's does, and the next probe is deferred "delivery temporarily
suspended"), and
address_verify_sender_ttl (the stamp of the probe sender, which each server takes unrefused at RCPT)."""
from __future__ import annotations

import asyncio
import time

import pytest

from mailflow.clock import VirtualClock
from mailflow.stages.verify import ProbeSender
from tests.support import SmtpClient, eventually, free_port, postfix_instance
from tests.support.dialogue import send
from tests.support.peers import record_senders

pytestmark = pytest.mark.interop

REFUSALS = {
    "bad@relay.test": "550 5.1.1 <bad@relay.test>: Recipient address rejected: User unknown",
    "soft@relay.test": "450 4.2.0 <soft@relay.test>: Try again later",
}
ADDRESSES = ("good@relay.test", "bad@relay.test", "soft@relay.test", "nosuchuser@local.test", "postmaster@local.test",
             "multi@relay.test")
VIRTUAL = "inline:{ { multi@relay.test = bad@relay.test, soft@relay.test } }"
# Postfix's smtpd polls the verify service for a new probe's result address_verify_poll_count (3) times,
# address_verify_poll_delay apart: at the default 3 s every first RCPT of an address waited 3 s for a result that
# was there in a fraction of one. Both servers poll 1 s apart here (a result within 2 s is still waited for);
# mailflow's smtpd answers when the result comes, whatever the delay.
POLL_DELAY = "1s"


async def peer_for(smtp_peer):
    """A peer scripted with REFUSALS; the senders of the MAIL commands it got."""
    peer = await smtp_peer()
    peer.handler.rcpt_replies.update(REFUSALS)
    return peer, record_senders(peer)


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
        "address_verify_poll_delay": POLL_DELAY,
    }) as pf:
        mf_peer, mf_senders = await peer_for(smtp_peer)
        mf = await mailflow_server(mydestination=["local.test"], relay_domains=["relay.test"],
                                   relayhost=f"[127.0.0.1]:{mf_peer.port}", virtual_alias_maps=[VIRTUAL],
                                   address_verify={"poll_delay": POLL_DELAY},
                                   smtpd={"recipient_restrictions": ["reject_unverified_recipient"]})
        # each server has its own peer: the two run at once
        pf_replies, mf_replies = await asyncio.gather(two_rounds(pf.port), two_rounds(mf.smtp_addresses[0][1]))

    differ = {(round, a): (pf_replies[round][n], mf_replies[round][n]) for round in (0, 1)
              for n, a in enumerate(ADDRESSES) if pf_replies[round][n] != mf_replies[round][n]}
    assert differ == {}
    assert pf_replies[0][0] == pf_replies[0][5] == "250 2.1.5 Ok"
    assert "unverified address: host 127.0.0.1" in pf_replies[0][1]
    assert pf_replies[0] == pf_replies[1]
    assert set(pf_senders) == {"double-bounce@pf.test"} and set(mf_senders) == {"double-bounce@mx.mailflow.test"}
    assert len(mf_senders) == len(pf_senders) == 3  # one probe per relayed address, none for the alias's members
    assert pf_peer.messages == mf_peer.messages == []


def unverified(address: str, why: str) -> str:
    return f"450 4.1.1 <{address}>: Recipient address rejected: unverified address: {why}"


async def test_a_next_hop_made_dead_by_mail_defers_probes_unattempted_a_probe_failure_makes_none_dead(
        mailflow_server):
    """A next hop that refuses connections, a window of one: two probes each try it (a probe's failure makes it
    not dead: Postfix's qmgr hears no site failure from a probe), a message's failure makes it dead, and the probe
    after that is deferred without a connection, then cached."""
    down = free_port()  # nothing listens there
    mail = "mail@relay.test"
    probed = ("b@relay.test", "c@relay.test", "a@relay.test", "a@relay.test")
    restrictions = [f"check_recipient_access inline:{{ {{{mail} = OK}} }}", "reject_unverified_recipient"]
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
        "relayhost": f"[127.0.0.1]:{down}", "mynetworks": "127.0.0.2/32", "initial_destination_concurrency": "1",
        "smtpd_recipient_restrictions": ", ".join(restrictions), "address_verify_poll_delay": POLL_DELAY,
    }) as pf:
        pf_replies = [await rcpt_text(pf.port, a) for a in probed[:2]]
        await send(pf.port, "s@remote.test", [mail], b"Subject: x\r\n\r\nx\r\n")
        await eventually(lambda: f"to=<{mail}>" in pf.maillog and "status=deferred" in pf.maillog, timeout=20,
                         step=0.2, what="Postfix's attempt of the message")
        pf_replies += [await rcpt_text(pf.port, a) for a in probed[2:]]
    mf = await mailflow_server(relay_domains=["relay.test"], relayhost=f"[127.0.0.1]:{down}",
                               queue={"initial_destination_concurrency": 1, "minimal_backoff_time": "300s",
                                      "maximal_backoff_time": "4000s"},
                               address_verify={"poll_delay": POLL_DELAY},
                               smtpd={"recipient_restrictions": restrictions})
    port = mf.smtp_addresses[0][1]
    mf_replies = [await rcpt_text(port, a) for a in probed[:2]]
    await send(port, "s@remote.test", [mail], b"Subject: x\r\n\r\nx\r\n")
    await eventually(lambda: [d for d in mf.qmgr.destinations() if d[6]], what="mailflow's attempt")
    mf_replies += [await rcpt_text(port, a) for a in probed[2:]]

    refused = f"connect to 127.0.0.1[127.0.0.1]:{down}: Connection refused"
    assert pf_replies == [unverified(a, refused) for a in probed[:2]] + \
        [unverified("a@relay.test", f"delivery temporarily suspended: {refused}")] * 2
    assert mf_replies == pf_replies


DAY = 86400


def stamped(sender: str, periods: int) -> str:
    """The probe sender (double-bounce@ the domain of `sender`) stamped `periods` days (sender_ttl) from now."""
    domain = sender.partition("@")[2]
    return ProbeSender("double-bounce", DAY, lambda bare: f"{bare}@{domain}",
                       VirtualClock(time.time() + periods * DAY)).address()


async def test_a_sender_ttl_stamps_the_probe_sender_as_postfix_does_and_each_takes_its_own_unrefused(
        smtp_peer, mailflow_server):
    """Both probe from double-bounce + the day's stamp; at RCPT each takes its own probe sender, stamped with the
    day before, the day or the day after, without restrictions (its domain is neither's), and refuses it
    unstamped or two days off."""
    pf_peer, pf_senders = await peer_for(smtp_peer)
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
        "relayhost": f"[127.0.0.1]:{pf_peer.port}", "mynetworks": "127.0.0.2/32",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "reject_unverified_recipient", "address_verify_sender_ttl": "1d",
        "address_verify_poll_delay": POLL_DELAY,
    }) as pf:
        mf_peer, mf_senders = await peer_for(smtp_peer)
        mf = await mailflow_server(mydestination=["local.test"], relay_domains=["relay.test"],
                                   relayhost=f"[127.0.0.1]:{mf_peer.port}",
                                   address_verify={"sender_ttl": "1d", "poll_delay": POLL_DELAY},
                                   smtpd={"recipient_restrictions": ["reject_unverified_recipient"]})

        async def own_senders(port: int, senders: list[str], bare: str) -> tuple[list[str], list[str]]:
            """The probe senders stamped around the one the probe of good@ came from, and the replies to them."""
            assert await rcpt_text(port, "good@relay.test") == "250 2.1.5 Ok"
            own = [stamped(senders[0], n) for n in (-1, 0, 1, 2)] + [bare]
            return own, [await rcpt_text(port, a) for a in own]

        # each server has its own peer: the two run at once
        (pf_own, pf_replies), (_, mf_replies) = await asyncio.gather(
            own_senders(pf.port, pf_senders, "double-bounce@pf.test"),
            own_senders(mf.smtp_addresses[0][1], mf_senders, "double-bounce@mx.mailflow.test"))

    assert pf_senders[0].partition("@")[0] == mf_senders[0].partition("@")[0] != "double-bounce"
    assert pf_own[1] == pf_senders[0]
    assert [r.replace("pf.test", "D") for r in pf_replies] == [r.replace("mx.mailflow.test", "D") for r in mf_replies]
    assert pf_replies[:3] == ["250 2.1.5 Ok"] * 3
    assert pf_replies[3:] == [f"554 5.7.1 <{a}>: Relay access denied" for a in pf_own[3:]]
