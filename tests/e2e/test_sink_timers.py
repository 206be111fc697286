"""The Sink's virtual clock and qmgr's own timers: a destination's rate-delay pause and its dead-site memory are
timers qmgr sets on the clock, not due times in the store; `advance` stops at each of them on the way and `settle`
counts mail that waits only for one as settled (nothing can happen before the clock moves)."""
from __future__ import annotations

import aiosmtplib

from mailflow.testing import Sink


RELAY = {"relay_domains": ["example.com"], "relay_transport": "smtp",
         "queue": {"minimal_backoff_time": "5m", "maximal_backoff_time": "1h", "initial_destination_concurrency": 1}}


async def send(sink: Sink, rcpt: str, subject: str) -> None:
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("app@shop.test", [rcpt], f"Subject: {subject}\r\n\r\nHello.\r\n".encode())


def sent_times(sink: Sink) -> list[float]:
    history = sink.server.capture.history._events
    return sorted(e.time for events in history.values() for e in events if e.event == "sent")


def reasons(sink: Sink) -> list[str]:
    history = sink.server.capture.history._events
    return [e.fields.get("reason", "") for events in history.values() for e in events if e.event == "deferred"]


async def test_advance_delivers_rate_delayed_mail_the_delay_apart():
    """settle() and advance() raised TimeoutError ({'active': 2}): the paused jobs waited on qmgr's timer, which
    advance never stepped to, while settle counted them as busy."""
    async with Sink(virtual_time=True, queue={"destination_rate_delay": "10s"}) as sink:
        start = sink.clock.time()
        for n in range(3):
            await send(sink, "bob@example.org", f"n{n}")
        await sink.settle()  # the first delivered, the others paused: settled, as nothing happens before 10 s
        assert len(sink.messages) == 1
        await sink.advance(30)
        assert len(sink.messages) == 3
        first, second, third = sent_times(sink)
        assert first - start < 1 and (second - first, third - second) == (10, 10)
        assert sink.clock.time() == start + 30


async def test_settle_returns_while_mail_waits_out_the_rate_delay():
    async with Sink(virtual_time=True, queue={"destination_rate_delay": "1h"}) as sink:
        for n in range(2):
            await send(sink, "bob@example.org", f"n{n}")
        await sink.settle(timeout=5)
        assert len(sink.messages) == 1
        await sink.advance(minutes=59)
        assert len(sink.messages) == 1
        await sink.advance(minutes=1)
        assert len(sink.messages) == 2


async def test_a_dead_destination_s_memory_runs_out_under_advance():
    """A destination that refused is dead for minimal_backoff_time: mail for it then is deferred unattempted, and
    once that time is over under advance() qmgr holds it dead no longer."""
    async with Sink(virtual_time=True, **RELAY) as sink:
        dest = sink.destination("example.com")
        dest.refuses().times(1).then(250)
        start = sink.clock.time()
        await send(sink, "bob@example.com", "first")
        await sink.settle()
        [(_, _, _, _, _, failures, dead_until, _)] = sink.server.qmgr.destinations()
        assert failures == 1 and dead_until >= start + 300
        await sink.advance(minutes=2)
        await send(sink, "carol@example.com", "second")  # deferred unattempted: the site is held dead
        await sink.settle()
        assert dest.messages == [] and any("delivery temporarily suspended" in reason for reason in reasons(sink))
        await sink.advance(seconds=dead_until - sink.clock.time())
        assert sink.server.qmgr.destinations() == []  # its memory ran out on time: alive, forgotten
        await sink.advance(minutes=10)
        assert sorted(m.rcpt_tos[0] for m in dest.messages) == ["bob@example.com", "carol@example.com"]


async def test_advance_fires_pauses_and_retries_in_order():
    """The rate delay's pauses (qmgr's timers) and a deferred message's retry (the store's due time) in one span:
    each happens at its own time, in order."""
    settings = {**RELAY, "queue": {**RELAY["queue"], "transport_destination_rate_delay": {"smtp": "10s"}}}
    async with Sink(virtual_time=True, **settings) as sink:
        dest = sink.destination("example.com")
        dest.answers(451, "4.2.0 Try later").times(1).then(250)
        start = sink.clock.time()
        for user in ("ann", "bob", "cat"):
            await send(sink, f"{user}@example.com", user)
        await sink.advance(minutes=10)
        assert [m.rcpt_tos for m in dest.messages] == [["bob@example.com"], ["cat@example.com"], ["ann@example.com"]]
        first, second, retried = (t - start for t in sent_times(sink))
        assert (first, second) == (10, 20) and 300 <= retried <= 340
