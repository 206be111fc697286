"""Differential test of the queue manager's per-destination limits: a private Postfix 3.7 and mailflow, configured
alike, relay the same mail to one peer on loopback, which must see the same deliveries.

- default_destination_recipient_limit (Postfix's 50, mailflow's queue.destination_recipient_limit): one message
  for 120 recipients of one destination arrives as transactions of 50, 50 and 20 recipients;
- default_destination_rate_delay (queue.destination_rate_delay): three messages for one destination arrive one at
  a time, at least the delay apart.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.support import eventually, postfix_instance, send

pytestmark = pytest.mark.interop

SENDER = "someone@sender.test"
MESSAGE = b"Subject: limits\r\n\r\nhello\r\n"


def timed(peer) -> list[float]:
    """The loop time of each message the peer accepts, in order."""
    times: list[float] = []
    accept = peer.handler.handle_DATA

    async def handle_data(server, session, envelope):
        times.append(asyncio.get_running_loop().time())
        return await accept(server, session, envelope)

    peer.handler.handle_DATA = handle_data
    return times


async def through_postfix(peer, main_cf: dict[str, str], messages: list[list[str]]) -> None:
    async with postfix_instance({"myhostname": "pf.test", "mydestination": "",
                                 "relayhost": f"[127.0.0.1]:{peer.port}", **main_cf}) as pf:
        for rcpts in messages:
            await send(pf.port, SENDER, rcpts, MESSAGE)
        await pf.queue_empty(timeout=30)


async def through_mailflow(mailflow_server, peer, queue: dict, messages: list[list[str]], tmp_path) -> None:
    mf = await mailflow_server(mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{peer.port}", queue=queue,
                               queue_directory=str(tmp_path / "mailflow"))
    for rcpts in messages:
        await send(mf.smtp_addresses[0][1], SENDER, rcpts, MESSAGE)


async def test_a_message_for_many_recipients_goes_fifty_at_a_time_as_postfix_s(mailflow_server, smtp_peer, tmp_path):
    rcpts = [f"u{i}@far.test" for i in range(120)]
    sizes = {}
    for server in ("postfix", "mailflow"):
        peer = await smtp_peer()
        if server == "postfix":
            await through_postfix(peer, {}, [rcpts])
        else:
            await through_mailflow(mailflow_server, peer, {}, [rcpts], tmp_path)
        await eventually(lambda: sum(len(m.rcpt_tos) for m in peer.messages) == 120, timeout=30,
                         what=f"{server} delivered every recipient")
        sizes[server] = sorted(len(m.rcpt_tos) for m in peer.messages)
    assert sizes["mailflow"] == sizes["postfix"] == [20, 50, 50]


async def test_deliveries_to_one_destination_are_the_rate_delay_apart_as_postfix_s(mailflow_server, smtp_peer,
                                                                                   tmp_path):
    messages = [[f"u{i}@far.test"] for i in range(3)]
    gaps = {}
    for server in ("postfix", "mailflow"):
        peer = await smtp_peer()
        times = timed(peer)
        if server == "postfix":
            await through_postfix(peer, {"default_destination_rate_delay": "1s"}, messages)
        else:
            await through_mailflow(mailflow_server, peer, {"destination_rate_delay": "1s"}, messages, tmp_path)
        await eventually(lambda: len(peer.messages) == 3, timeout=30, what=f"{server} delivered the three")
        gaps[server] = [later - earlier for earlier, later in zip(times, times[1:])]
    for server, between in gaps.items():
        assert all(gap >= 0.95 for gap in between), (server, between)  # (one delivery's own time before each)
        assert all(gap < 3 for gap in between), (server, between)
