"""queue.destination_rate_delay and queue.transport_destination_rate_delay (Postfix default_destination_rate_delay,
transport_destination_rate_delay): the pause between two deliveries to one destination, concurrency 1 meanwhile.
qmgr with a real Store, the fake transports, and the virtual clock (deliveries take no time unless a test says)."""
from __future__ import annotations

import pytest

from mailflow.config import QueueConfig, load_config
from mailflow.errors import ConfigError
from mailflow.model import Outcome
from tests.component.test_qmgr import T0, Harness, queue_is_empty
from tests.support import BlockingTransport, RecordingTransport, ScriptedTransport, always, eventually, qmgr_turn


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


def times(transport: RecordingTransport) -> list[tuple[float, list[str]]]:
    return [(when - T0, [r.address for r in request.recipients]) for when, request in transport.calls]


async def test_deliveries_to_one_destination_are_the_rate_delay_apart(h):
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=10)
    for user in ("a", "b", "c"):
        await h.queue(f"{user}@remote.test")
    await eventually(lambda: len(h.smtp.calls) == 1, what="the first delivery")
    await qmgr_turn(h.qmgr, h.clock)
    h.clock.advance(9.5)
    await qmgr_turn(h.qmgr, h.clock)
    assert len(h.smtp.calls) == 1, "started before the rate delay was over"
    h.clock.advance(0.5)
    await eventually(lambda: len(h.smtp.calls) == 2, what="the second delivery once the delay is over")
    h.clock.advance(10)
    await eventually(lambda: queue_is_empty(h))
    assert times(h.smtp) == [(0.0, ["a@remote.test"]), (10.0, ["b@remote.test"]), (20.0, ["c@remote.test"])]


async def test_the_end_of_a_pause_starts_the_next_delivery_without_a_queue_scan(h):
    """A scan is a writer transaction; the wake-up at the end of a destination's pause only starts deliveries."""
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=10, tick=3600)
    take, scans = h.store.take, []

    async def counted(now, limit):
        scans.append(now)
        return await take(now, limit)
    h.store.take = counted
    await h.queue("a@remote.test")
    await h.queue("b@remote.test")
    await eventually(lambda: len(h.smtp.calls) == 1)
    await qmgr_turn(h.qmgr, h.clock)
    before, turns = len(scans), len(h.clock.sleeps)
    h.clock.advance(10)
    await eventually(lambda: len(h.smtp.calls) == 2)
    await eventually(lambda: queue_is_empty(h))
    await eventually(lambda: len(h.clock.sleeps) > turns, what="the loop sleeps again after the pause's turn")
    assert len(scans) == before


async def test_the_delay_counts_from_the_end_of_the_delivery_before(h):
    """Postfix's qmgr suspends the queue when a delivery ends (qmgr_entry_done), so a slow delivery adds to it."""
    class ThreeSeconds(RecordingTransport):
        async def deliver(self, request):
            self.clock.advance(3.0)
            return await super().deliver(request)

    h.smtp = ThreeSeconds("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=10)
    await h.queue("a@remote.test")
    await h.queue("b@remote.test")
    await eventually(lambda: len(h.smtp.calls) == 1)
    h.clock.advance(9.5)  # 12.5 s after the first began, 9.5 s after it ended
    await qmgr_turn(h.qmgr, h.clock)
    assert len(h.smtp.calls) == 1
    h.clock.advance(0.5)
    await eventually(lambda: len(h.smtp.calls) == 2)
    assert [t for t, _ in times(h.smtp)] == [3.0, 16.0]  # (each recorded as it ends, three seconds in)


async def test_a_rate_delay_makes_the_destination_concurrency_one(h):
    blocking = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": blocking}, destination_rate_delay=1,
                  initial_destination_concurrency=5)
    for user in ("a", "b", "c"):
        await h.queue(f"{user}@remote.test")
    await eventually(lambda: blocking.in_flight == 1)
    await qmgr_turn(h.qmgr, h.clock)
    assert blocking.in_flight == 1 and [row[2] for row in h.qmgr.destinations()] == [1]


async def test_other_destinations_are_not_held_up(h):
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=60)
    for domain in ("a.test", "b.test", "a.test", "c.test"):
        await h.queue(f"u@{domain}")
    await eventually(lambda: len(h.smtp.calls) == 3, what="one delivery to each destination at once")
    await qmgr_turn(h.qmgr, h.clock)
    assert sorted(addresses for _, addresses in times(h.smtp)) == [["u@a.test"], ["u@b.test"], ["u@c.test"]]
    h.clock.advance(60)
    await eventually(lambda: queue_is_empty(h))
    assert times(h.smtp)[-1] == (60.0, ["u@a.test"])


async def test_a_transport_s_own_rate_delay_comes_first(h):
    """transport_destination_rate_delay: local mail goes at once while smtp's destination waits."""
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    h.local = RecordingTransport("local", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=30,
                  transport_destination_rate_delay={"local": 0})
    for user in ("a", "b"):
        await h.queue(f"{user}@remote.test")
        await h.queue(f"{user}@example.test")
    await eventually(lambda: len(h.local.calls) == 2 and len(h.smtp.calls) == 1)
    await qmgr_turn(h.qmgr, h.clock)
    assert len(h.smtp.calls) == 1


async def test_a_destination_that_dies_under_a_rate_delay_is_tried_again_after_the_delay(h):
    """Postfix's qmgr_entry_done ("XXX"): a rate-limited queue that was just throttled is unthrottled and suspended
    for the rate delay: the jobs waiting are deferred, the next mail is tried after the delay, not after
    minimal_backoff_time (300 s here)."""
    failing = ScriptedTransport(h.clock, always(Outcome.DEFERRED, "4.4.1", "connect to remote.test: refused", False))
    await h.start(transports={"local": h.local, "smtp": failing}, destination_rate_delay=5)
    await h.queue("a@remote.test")
    await h.queue("b@remote.test")
    await eventually(lambda: _deferred(h, 2), what="both deferred: the second without an attempt")
    assert len(failing.requests) == 1
    await h.queue("c@remote.test")
    await qmgr_turn(h.qmgr, h.clock)
    assert len(failing.requests) == 1, "tried again before the rate delay was over"
    h.clock.advance(5)
    await eventually(lambda: len(failing.requests) == 2, what="the new mail tried after the delay")


async def _deferred(h: Harness, n: int) -> bool:
    return (await h.counts()).get("deferred") == n


@pytest.mark.parametrize("setting", ['destination_rate_delay = "-1s"',
                                     'transport_destination_rate_delay = { smtp = "x" }'])
def test_a_rate_delay_that_is_no_duration_is_refused_at_load(tmp_path, setting):
    path = tmp_path / "config.toml"
    path.write_text(f"[queue]\n{setting}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.key.startswith(f"queue.{setting.split()[0]}")


def test_the_rate_delay_of_a_transport():
    q = QueueConfig(destination_rate_delay="1m", transport_destination_rate_delay={"smtp": "5s"})
    assert (q.rate_delay("smtp"), q.rate_delay("lmtp")) == (5.0, 60.0)
    assert QueueConfig().rate_delay("smtp") == 0.0


async def test_mail_paused_by_the_delay_waits_only_for_a_timer_a_driver_can_step_to(h):
    """What a driver of the virtual clock (the Sink's settle and advance) reads: while the jobs in hand wait out a
    pause, qmgr waits for nothing but its timer, and says when that rings; once it rang, it is busy again."""
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_rate_delay=10)
    assert h.qmgr.next_timer() is None
    await h.queue("a@remote.test")
    await h.queue("b@remote.test")
    await eventually(lambda: len(h.smtp.calls) == 1 and not h.qmgr.busy)
    await qmgr_turn(h.qmgr, h.clock)
    assert h.qmgr.active_count == 1 and h.qmgr.waiting_for_timers()
    assert h.qmgr.next_timer() == h.clock.time() + 10
    h.clock.advance(10)
    assert not h.qmgr.waiting_for_timers()  # the pause is over: the next delivery is to start, not settled
    await eventually(lambda: queue_is_empty(h))
