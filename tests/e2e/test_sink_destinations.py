"""The Sink's outbound side: a relay configuration tested against fake remote destinations (real SMTP peers on
loopback addresses behind a fake name service), with the virtual clock running the retry schedule.

The smtp transport, qmgr's backoff, delay notices and bounces are the production ones; the notices they send
to the application's sender are captured like any message.
"""
from __future__ import annotations

import aiosmtplib
import pytest

from mailflow.testing import Sink


RELAY = {"relay_domains": ["example.com"], "relay_transport": "smtp",
         "queue": {"minimal_backoff_time": "5m", "maximal_backoff_time": "1h", "delay_warning_time": "4m",
                   "maximal_queue_lifetime": "1d"}}


async def send(sink: Sink, rcpt: str = "bob@example.com", subject: str = "Your order") -> None:
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("app@shop.test", [rcpt], f"Subject: {subject}\r\n\r\nThanks.\r\n".encode(),
                              rcpt_options=["NOTIFY=SUCCESS,DELAY,FAILURE"])


def events(sink: Sink, queue_id: str) -> list[tuple[str, str]]:
    return [(e.event, e.fields.get("dsn", "")) for e in sink.history(queue_id) if e.event in ("sent", "deferred",
                                                                                             "bounced")]


async def test_451_twice_then_250_with_a_delay_notice_then_a_success_notice():
    async with Sink(virtual_time=True, seed=1, **RELAY) as sink:
        dest = sink.destination("example.com")
        dest.answers(451, "4.7.1 Greylisted, come back later").times(2).then(250)
        await send(sink)
        await sink.settle()
        assert (dest.transactions, dest.messages) == (1, [])
        assert sink.messages == []  # nothing is due before the first retry: no notice yet
        await sink.advance(hours=2)
        [delivered] = dest.messages
        assert (delivered.mail_from, delivered.rcpt_tos, dest.transactions) == ("app@shop.test", ["bob@example.com"], 3)
        delay, success = await sink.wait_for(to="app@shop.test", count=2)
    assert delay.sender == "" and delay.message.get_content_type() == "multipart/report"
    assert delay.subject == "Delayed Mail (still being retried)"
    assert "Greylisted, come back later" in delay.raw.decode()
    assert "Action: delayed" in delay.raw.decode()
    assert success.subject == "Successful Mail Delivery Report" and "Action: relayed" in success.raw.decode()
    queue_id = delivered.content.split(b" id ")[1].split(b";")[0].split()[0].decode()
    assert events(sink, queue_id) == [("deferred", "4.7.1"), ("deferred", "4.7.1"), ("sent", "2.0.0")]
    first, second, sent = [e.time for e in sink.history(queue_id) if e.event in ("deferred", "sent")]
    assert 300 <= second - first <= 330 and 300 <= sent - second <= 700  # minimal_backoff_time, then the age


async def test_a_permanent_refusal_bounces_to_the_sender():
    async with Sink(virtual_time=True, **RELAY) as sink:
        sink.destination("example.com").answers(550, "5.1.1 No such user")
        await send(sink, subject="Lost")
        [bounce] = await sink.wait_for(to="app@shop.test")
    assert bounce.subject == "Undelivered Mail Returned to Sender"
    assert "5.1.1 No such user" in bounce.text or "No such user" in bounce.raw.decode()


async def test_a_destination_that_never_accepts_expires_at_the_queue_lifetime():
    settings = {**RELAY, "queue": {**RELAY["queue"], "delay_warning_time": "0", "maximal_queue_lifetime": "3h"}}
    async with Sink(virtual_time=True, **settings) as sink:
        dest = sink.destination("example.com")
        dest.answers(451, "4.2.2 Mailbox full")
        await send(sink, subject="Never")
        await sink.advance(hours=2)
        assert sink.messages == []  # still being retried
        await sink.advance(hours=2)
        [bounce] = await sink.wait_for(to="app@shop.test")
    assert bounce.subject == "Undelivered Mail Returned to Sender" and "Mailbox full" in bounce.raw.decode()
    assert 4 <= dest.transactions <= 12  # retried along the backoff schedule (5m, then the age, up to 1h)


async def test_refused_connections_then_delivery():
    async with Sink(virtual_time=True, **RELAY) as sink:
        dest = sink.destination("example.com")
        dest.refuses().times(2).then(250)
        await send(sink)
        await sink.advance(hours=1)
        assert len(dest.messages) == 1 and dest.connections == 1
    reasons = [e.fields["reason"] for e in sink.history(_delivered_id(dest)) if e.event == "deferred"]
    assert len(reasons) == 2 and all("Connection refused" in r for r in reasons)


async def test_a_silent_peer_times_out_and_a_broken_tls_handshake_fails():
    settings = {**RELAY, "smtp": {"helo_timeout": "0.3s", "tls_security_level": "encrypt"}}
    async with Sink(virtual_time=True, **settings) as sink:
        dest = sink.destination("example.com")
        dest.times_out().times(1).then(421, "4.3.2 Busy", at="connect").times(1).then(250)
        await send(sink)
        await sink.advance(minutes=6)
        assert dest.messages == []
        dest.fails_tls()
        await sink.advance(hours=1)
        assert dest.messages == []
    reasons = [e.fields["reason"] for e in sink.history(_queue_ids(sink)[0]) if e.event == "deferred"]
    assert "timed out while receiving the initial server greeting" in reasons[0]
    assert "refused to talk to me: 421 4.3.2 Busy" in reasons[1]
    assert any("TLS" in r for r in reasons[2:]), reasons


async def test_dropped_after_the_content_is_retried():
    async with Sink(virtual_time=True, **RELAY) as sink:
        dest = sink.destination("example.com")
        dest.drops(at="data").times(1).then(250)
        await send(sink)
        await sink.advance(minutes=10)
        assert len(dest.messages) == 1 and dest.transactions == 2


async def test_advance_without_virtual_time_is_an_error():
    async with Sink() as sink:
        with pytest.raises(RuntimeError, match="virtual_time"):
            await sink.advance(hours=1)


def _delivered_id(dest) -> str:
    return dest.messages[0].content.split(b" id ")[1].split(b";")[0].split()[0].decode()


def _queue_ids(sink: Sink) -> list[str]:
    """Queue ids the mail log spoke of, in order of their first event (the Sink's history recorder)."""
    return list(sink.server.capture.history._events)


async def test_the_virtual_clock_never_goes_back():
    """A negative span used to be a silent no-op, and an infinite one set the server's clock to inf."""
    async with Sink(virtual_time=True) as sink:
        now = sink.clock.time()
        for span in ({"seconds": -5}, {"hours": -1}, {"seconds": float("inf")}, {"seconds": float("nan")}):
            with pytest.raises(ValueError, match="never goes back"):
                await sink.advance(**span)
        assert sink.clock.time() == now
        await sink.advance(minutes=1)
        assert sink.clock.time() == now + 60


async def test_a_client_service_s_own_port_is_the_fake_destinations_one_too():
    """The Sink forces [smtp] port (where its destinations listen): a service that set its own port dialled that
    one instead, and its mail never reached the destination."""
    settings = {**RELAY, "relay_transport": "ip2", "smtp": {"services": {"ip2": {"port": 2525,
                                                                               "helo_name": "mx2.shop.test"}}}}
    async with Sink(virtual_time=True, **settings) as sink:
        dest = sink.destination("example.com")
        await send(sink)
        await sink.settle()
        [delivered] = dest.messages
    assert delivered.helo == "mx2.shop.test"


async def test_under_virtual_time_no_client_keeps_a_session_lmtp_ones_too():
    """Under virtual time a retry hours later comes moments later in real time: a cached session would be reused
    where Postfix's had long closed it. The Sink turned the cache off for [smtp] and its services only; [lmtp] has
    the same cache (and its services theirs)."""
    settings = {"smtp": {"services": {"own": {"connection_cache_time_limit": "30s"}}},
                "lmtp": {"connection_cache_time_limit": "30s",
                         "services": {"dovecot": {"connection_cache_time_limit": "30s"}, "plain": {}}}}
    async with Sink(settings, virtual_time=True) as sink:  # (a setting given as a keyword would win)
        config = sink.config
        assert config is not None
        clients = [config.smtp, config.smtp.for_service("own"), config.lmtp, config.lmtp.for_service("dovecot"),
                   config.lmtp.for_service("plain")]
    assert [c.connection_cache_time_limit for c in clients] == [0, 0, 0, 0, 0]
