"""queue.destination_recipient_limit and queue.transport_destination_recipient_limit (Postfix
default_destination_recipient_limit, transport_destination_recipient_limit): recipients per delivery to one
destination; with 1, a destination per recipient (Postfix's per-recipient queues). qmgr with a real Store, the
fake transports and the virtual clock."""
from __future__ import annotations

import random
from itertools import islice

import pytest

from mailflow.config import QueueConfig
from mailflow.model import Recipient
import mailflow.stages.qmgr as qmgr_module
from mailflow.stages.qmgr import OVERLOOK_SLICE, ROUTE_SLICE, _postfix_order
from mailflow.stages.qmgr.destination import Destination
from tests.component.test_qmgr import Harness, queue_is_empty, relaying, reload_to
from tests.support import BlockingTransport, RecordingTransport, eventually, qmgr_turn
from tests.support.stalls import LoopTurns


@pytest.fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.stop()


def sizes(transport) -> list[int]:
    return sorted(len(request.recipients) for request in transport.requests)


async def test_a_message_for_many_recipients_of_one_destination_goes_fifty_at_a_time(h):
    """Postfix's default_destination_recipient_limit (50): 120 recipients are three deliveries, the message is
    removed once all three are back."""
    await h.start()
    await h.queue(*(f"u{i}@remote.test" for i in range(120)))
    await eventually(lambda: queue_is_empty(h))
    assert sizes(h.smtp) == [20, 50, 50]
    delivered = [r.address for request in h.smtp.requests for r in request.recipients]
    assert sorted(delivered) == sorted(f"u{i}@remote.test" for i in range(120))


async def test_a_message_for_many_recipients_does_not_hold_back_the_mail_queued_after_it(h):
    """1 000 recipients of one destination are 20 jobs; a one-recipient message queued after them is delivered
    within about a window's worth of deliveries (Postfix preempts the big message's job), not after all 20."""
    await h.start()
    big = await h.queue(*(f"u{i}@remote.test" for i in range(1000)), wake=False)
    small = await h.queue("late@remote.test")
    await eventually(lambda: queue_is_empty(h))
    order = [request.queue_id for request in h.smtp.requests]
    assert order.count(big) == 20
    assert order.index(small) < 5 + 1  # the initial window, then the small message's turn


async def test_recipients_split_by_the_limit_go_together_in_postfixs_order(h):
    """Postfix's qmgr sorts a message's recipients (qmgr_message_sort: the domain with its case folded, then the
    address byte for byte) before it cuts them into deliveries of the recipient limit, so which recipients share a
    delivery (and a UTF-8 one's SMTPUTF8 requirement) does not depend on the order they came in."""
    await h.start(transport_destination_recipient_limit={"smtp": 2})
    await h.queue("r1@b.test", "R2@a.test", "j\u00fcrgen@b.test", "r0@b.test", "x@a.test")
    await eventually(lambda: queue_is_empty(h))
    assert sorted([r.address for r in request.recipients] for request in h.smtp.requests) == [
        ["R2@a.test", "x@a.test"], ["j\u00fcrgen@b.test", "r0@b.test"], ["r1@b.test"]]


async def test_the_local_part_s_case_counts_in_postfixs_order(h):
    """Postfix's qmgr_message_sort_compare folds the domain's case only and compares the addresses with strcmp:
    `C@` comes before `a@`, so with a limit of 2 `C` and `a` share a delivery and `b` goes alone (folding the
    whole address put `a` and `b` together)."""
    await h.start(transport_destination_recipient_limit={"smtp": 2})
    await h.queue("b@remote.test", "C@remote.test", "a@remote.test")
    await eventually(lambda: queue_is_empty(h))
    assert sorted([r.address for r in request.recipients] for request in h.smtp.requests) == [
        ["C@remote.test", "a@remote.test"], ["b@remote.test"]]


async def test_a_utf8_domain_s_case_is_folded_in_postfixs_order(h):
    """Postfix with smtputf8_enable compares domains with strcasecmp_utf8, which case-folds UTF-8 too: `x@Ö.test`
    sorts as `x@ö.test`, after `x@ä.test` (byte for byte Ö's \xc3\x96 came first). Through one relay, one
    delivery, its RCPTs in that order."""
    resolve, _ = relaying("[relay.test]")
    await h.start(resolve=resolve)
    await h.queue("x@\u00d6.test", "x@\u00e4.test", "y@B.test", "x@a.test")
    await eventually(lambda: queue_is_empty(h))
    assert [[r.address for r in request.recipients] for request in h.smtp.requests] == [
        ["x@a.test", "y@B.test", "x@\u00e4.test", "x@\u00d6.test"]]


def test_addresses_without_an_at_sign_sort_last_in_postfixs_order():
    """qmgr_message_sort_compare: an address without `@` (or the empty one) after every address with one."""
    rcpts = [Recipient(i, a, a) for i, a in enumerate(["root", "", "b@x.test", "A@x.test"])]
    assert [r.address for r in sorted(rcpts, key=_postfix_order)] == ["A@x.test", "b@x.test", "", "root"]


@pytest.mark.parametrize("settings, smtp, local", [
    ({"transport_destination_recipient_limit": {"smtp": 2}}, [1, 2, 2], [2]),
    ({"destination_recipient_limit": 0}, [5], [2]),  # no limit
    ({"destination_recipient_limit": 1, "transport_destination_recipient_limit": {"smtp": 0}}, [5], [2]),
    ({"transport_destination_recipient_limit": {"local": 1}}, [5], [1, 1]),
])
async def test_a_transport_s_own_recipient_limit_comes_first(h, settings, smtp, local):
    await h.start(**settings)
    await h.queue(*(f"u{i}@remote.test" for i in range(5)), "alice@example.test", "bob@example.test")
    await eventually(lambda: queue_is_empty(h))
    assert (sizes(h.smtp), sizes(h.local)) == (smtp, local)


async def test_with_a_limit_of_one_each_recipient_is_a_destination_of_its_own(h):
    """Postfix's qmgr_message_resolve: queue `user@nexthop` (the extension left out, lower case), so the
    destination concurrency is per recipient; extensions of one user share a destination."""
    blocking = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": blocking}, destination_recipient_limit=1,
                  default_destination_concurrency_limit=1)
    await h.queue("a+x@remote.test", "A+y@remote.test", "b@remote.test")
    await eventually(lambda: blocking.in_flight == 2, what="one delivery for a, one for b")
    await qmgr_turn(h.qmgr, h.clock)
    assert blocking.in_flight == 2
    queues = sorted((row[1], row[3], row[4]) for row in h.qmgr.destinations())
    assert queues == [("a@remote.test", 1, 1), ("b@remote.test", 1, 0)]
    assert all(len(request.recipients) == 1 and request.nexthop == "remote.test" for request in blocking.requests)
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    assert len(blocking.requests) == 3


async def test_with_a_limit_of_one_a_delivery_ending_looks_at_its_own_destination_not_at_all_of_them(h, monkeypatch):
    """With a limit of 1 each of 1 000 recipients is a destination; the work each delivery's end costs stays
    about constant (it used to walk every destination: a million looks here, 8 000 recipients stalled the
    process for seconds)."""
    looks = []
    is_dead = Destination.is_dead
    monkeypatch.setattr(Destination, "is_dead", lambda self, now: looks.append(1) or is_dead(self, now))
    await h.start(destination_recipient_limit=1)
    await h.queue(*(f"u{i}@remote.test" for i in range(1000)))
    await eventually(lambda: queue_is_empty(h))
    assert len(h.smtp.requests) == 1000
    assert len(looks) < 10 * 1000


async def test_the_destination_snapshot_writes_only_the_rows_that_changed(h):
    """A tick after one more destination appears writes its row alone, not the 20 there were: with a limit of 1,
    thousands of per-recipient destinations were all rewritten every second."""
    blocking = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": blocking}, destination_recipient_limit=1)
    save, writes = h.store.save_destinations, []

    async def counted(rows, now, gone=None):
        writes.append((len(rows), gone))
        await save(rows, now, gone)
    h.store.save_destinations = counted
    await h.queue(*(f"u{i}@remote.test" for i in range(20)))
    await eventually(lambda: blocking.in_flight == 20)
    h.clock.advance(1)
    await eventually(lambda: writes and writes[-1][0] == 20, what="the 20 new rows")
    await h.queue("late@remote.test")
    await eventually(lambda: blocking.in_flight == 21)
    h.clock.advance(1)
    await eventually(lambda: len(writes) == 3)
    assert writes == [(0, None), (20, []), (1, [])]  # (the first write replaces what an earlier run left)
    assert len(await h.store.destination_rows()) == 21
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    h.clock.advance(1)
    await eventually(lambda: len(writes) == 4)
    assert writes[3][0] == 0 and len(writes[3][1]) == 21
    assert await h.store.destination_rows() == []


async def test_a_tick_looks_at_the_destinations_that_changed_not_at_all_of_them(h, monkeypatch):
    """With a limit of 1 each recipient is a destination; each tick snapshotted every one of them to find the rows
    that changed, and its safety net asked every one whether it could start (a million destinations: 1.6 s of
    loop per 1 s tick). A tick now snapshots the destinations that changed, and its safety net looks at
    OVERLOOK_SLICE of them in turn, still reaching every one."""
    calls = {"snapshot": 0, "can_start": 0}
    for name in calls:
        method = getattr(Destination, name)
        monkeypatch.setattr(Destination, name, lambda self, *a, _m=method, _n=name: calls.__setitem__(
            _n, calls[_n] + 1) or _m(self, *a))
    blocking = BlockingTransport("smtp")
    await h.start(transports={"local": h.local, "smtp": blocking}, destination_recipient_limit=1,
                  delivery_concurrency_limit=10)
    count = 3 * OVERLOOK_SLICE
    await h.queue(*(f"u{i}@remote.test" for i in range(count)))
    await eventually(lambda: blocking.in_flight == 10)
    h.clock.advance(1)
    await qmgr_turn(h.qmgr, h.clock)  # the first tick writes every row
    assert len(await h.store.destination_rows()) == count
    for name in calls:
        calls[name] = 0
    h.clock.advance(1)
    await qmgr_turn(h.qmgr, h.clock)
    assert calls["snapshot"] == 0 and 0 < calls["can_start"] <= OVERLOOK_SLICE
    lost = h.qmgr._destinations[("smtp", f"u{count - 1}@remote.test")]
    for turns in h.qmgr._ready.values():
        for group in turns.values():
            group.pop(lost.key, None)  # (a mark lost: the last destination of the safety net's round)
    for _ in range(3):
        h.clock.advance(1)
        await qmgr_turn(h.qmgr, h.clock)
    assert h.qmgr._marked_for_next_job(lost)
    blocking.release.set()
    await eventually(lambda: queue_is_empty(h))
    assert len(blocking.requests) == count


async def test_with_a_limit_of_one_the_rate_delay_is_per_recipient(h):
    """postconf(5), default_destination_rate_delay: with a recipient limit of 1, "the rate delay specifies the
    time between deliveries to the same recipient"."""
    h.smtp = RecordingTransport("smtp", clock=h.clock)
    await h.start(transports={"local": h.local, "smtp": h.smtp}, destination_recipient_limit=1,
                  destination_rate_delay=10)
    await h.queue("a@remote.test", "b@remote.test")
    await h.queue("a@remote.test")
    await eventually(lambda: len(h.smtp.calls) == 2, what="a and b at once")
    await qmgr_turn(h.qmgr, h.clock)
    assert len(h.smtp.calls) == 2
    h.clock.advance(10)
    await eventually(lambda: queue_is_empty(h))
    assert [when - h.smtp.calls[0][0] for when, _ in h.smtp.calls] == [0.0, 0.0, 10.0]


def test_the_recipient_limit_of_a_transport():
    q = QueueConfig(transport_destination_recipient_limit={"local": 1})
    assert (q.recipient_limit("local"), q.recipient_limit("smtp")) == (1, 50)


async def test_local_takes_every_recipient_of_a_message_in_one_delivery_unless_its_own_limit_says_otherwise(h):
    """The local agent writes one copy per local part per delivery (an alias and its member): a split at the default 50
    would deliver twice; so `local` has no limit unless transport_destination_recipient_limit sets one."""
    await h.start()
    await h.queue(*(f"user{i}@example.test" for i in range(120)))
    await eventually(lambda: queue_is_empty(h))
    assert sizes(h.local) == [120]


async def test_a_scan_resolves_a_message_of_many_recipients_a_slice_at_a_time(h):
    """As a hand-over (test_qmgr_handoff): a scan resolves a message's recipients ROUTE_SLICE at a time, the loop
    handed back in between, and the jobs are the same."""
    await h.start()
    n = 3 * ROUTE_SLICE + 1
    async with LoopTurns() as turns:
        h.qmgr._resolve = turns.at_each(h.qmgr._resolve)
        await h.queue(*(f"u{i:05d}@remote.test" for i in range(n)))
        await eventually(lambda: queue_is_empty(h))
    assert len(turns.seen) == n and len(set(turns.seen)) >= 4, "the loop had no turn between the slices"
    assert sizes(h.smtp) == [1] + [50] * (n // 50)
    delivered = [r.address for request in h.smtp.requests for r in request.recipients]
    assert delivered == sorted(delivered) and len(delivered) == n  # (in Postfix's order, the jobs as before)


async def test_a_message_of_many_recipients_is_put_in_postfixs_order_a_slice_at_a_time(h, monkeypatch):
    """Sorting 100 000 recipients of one message (their keys made and compared in one turn) held the loop 0.2-0.5 s:
    a message resolved in slices has its sort keys made with each slice, and its groups sorted ORDER_SLICE a turn
    (runs, then merged), in the same order as one sort: by domain, its case folded, then the address as it is."""
    monkeypatch.setattr(qmgr_module, "ORDER_SLICE", 100)
    resolve, _ = relaying("[relay.test]")
    await h.start(resolve=resolve, transport_destination_recipient_limit={"smtp": 0})  # one job: RCPTs in order
    addresses = [f"u{i % 7}x{i:04d}@{'ABCD'[i % 4]}.Remote.test" for i in range(3 * ROUTE_SLICE + 1)]
    addresses += [f"u{i}x0001@a.remote.TEST" for i in range(20)]  # (ties of domain; the local part decides)
    random.Random(7).shuffle(addresses)
    async with LoopTurns() as turns:
        made = qmgr_module._postfix_order
        monkeypatch.setattr(qmgr_module, "_postfix_order", lambda rcpt: turns.seen.append(turns.count) or made(rcpt))
        sorts, merges = sorts_and_merges(monkeypatch, turns)
        await h.queue(*addresses)
        await eventually(lambda: queue_is_empty(h))
    assert len(turns.seen) == len(addresses) and len(set(turns.seen)) >= 4, "the keys were made in one turn"
    runs = -(-len(addresses) // 100)
    assert [size for _, size in sorts] == [100] * (runs - 1) + [len(addresses) % 100]
    assert len(merges) == runs
    steps = [turn for turn, _ in sorts] + merges
    assert len(set(steps)) == len(steps), "two runs sorted or merge steps taken in one turn"
    [request] = h.smtp.requests
    by_domain = sorted(addresses, key=lambda a: (a.rpartition("@")[2].lower(), a.encode()))
    assert [r.address for r in request.recipients] == by_domain


def sorts_and_merges(monkeypatch, turns: LoopTurns) -> tuple[list[tuple[int, int]], list[int]]:
    """qmgr's sorts by the keys a message's slices made (`_put_in_order`, `_order_in_slices`: turn and size each)
    and the merge steps of its runs (the turn of each), as they come."""
    sorts: list[tuple[int, int]] = []
    merges: list[int] = []

    def sorting(items, key=None):
        if getattr(key, "__name__", "") == "__getitem__":
            sorts.append((turns.count, len(items)))
        return sorted(items, key=key)

    def merging(iterable, *limits):
        if limits == (qmgr_module.ORDER_SLICE,):
            merges.append(turns.count)
        return islice(iterable, *limits)

    monkeypatch.setattr(qmgr_module, "sorted", sorting, raising=False)
    monkeypatch.setattr(qmgr_module, "islice", merging)
    return sorts, merges


async def test_a_message_of_many_small_groups_is_put_in_order_order_slice_recipients_a_turn(h, monkeypatch):
    """`_put_in_order` sorts each group of fewer than ORDER_SLICE recipients at once, and hands the loop back once
    the groups it sorted have that many in all."""
    monkeypatch.setattr(qmgr_module, "ORDER_SLICE", 100)
    await h.start()
    domains = 11
    addresses = [f"u{i:04d}@d{i % domains}.remote.test" for i in range(domains * 50)]
    assert len(addresses) > ROUTE_SLICE  # (resolved in slices, then put in order)
    async with LoopTurns() as turns:
        sorts, _ = sorts_and_merges(monkeypatch, turns)
        await h.queue(*reversed(addresses))
        await eventually(lambda: queue_is_empty(h))
    assert [size for _, size in sorts] == [50] * domains
    assert len({turn for turn, _ in sorts}) == 6, "the groups were sorted in one turn"
    assert sorted(sizes(h.smtp)) == [50] * domains
    assert all([r.address for r in request.recipients] == sorted(r.address for r in request.recipients)
               for request in h.smtp.requests)


async def test_a_message_resolved_in_slices_makes_no_sort_keys_for_a_recipient_limit_of_1(h, monkeypatch):
    """With a recipient limit of 1 each recipient is a destination of its own: nothing to sort, so the slices make
    no `_postfix_order` key for them (they were made, then passed over), only for the other groups."""
    await h.start(transport_destination_recipient_limit={"smtp": 1})
    made: list[str] = []
    order = qmgr_module._postfix_order
    monkeypatch.setattr(qmgr_module, "_postfix_order", lambda rcpt: made.append(rcpt.address) or order(rcpt))
    remote = [f"u{i:04d}@remote.test" for i in range(ROUTE_SLICE + 1)]
    local = [f"user{i}@example.test" for i in range(9, 0, -1)]
    await h.queue(*remote, *local)
    await eventually(lambda: queue_is_empty(h))
    assert sorted(made) == sorted(local)
    assert sizes(h.smtp) == [1] * len(remote)
    assert [[r.address for r in request.recipients] for request in h.local.requests] == [sorted(local)]


async def test_a_reload_while_a_message_is_put_in_order_reroutes_it(h, monkeypatch):
    """A reload between two turns of `_put_in_order` (the resolution done the old way): the message is admitted,
    then its jobs are resolved again by the new routing (`_reroute`); every recipient is delivered once, there."""
    monkeypatch.setattr(qmgr_module, "ORDER_SLICE", 100)
    resolve, _ = relaying("[old.test]")
    await h.start(resolve=resolve, transport_destination_recipient_limit={"smtp": 0})
    ordering = qmgr_module._order_in_slices
    reloads = []

    async def reloaded_meanwhile(keys):
        order = await ordering(keys)
        if not reloads:
            reloads.append(1)
            reload_to(h, "[new.test]", {"local": h.local, "smtp": h.smtp}, transport_destination_recipient_limit={
                "smtp": 0})
        return order

    monkeypatch.setattr(qmgr_module, "_order_in_slices", reloaded_meanwhile)
    addresses = [f"u{i:04d}@remote.test" for i in range(2 * ROUTE_SLICE + 1)]
    await h.queue(*reversed(addresses))
    await eventually(lambda: queue_is_empty(h))
    assert reloads == [1]
    assert [(request.nexthop, [r.address for r in request.recipients]) for request in h.smtp.requests] == [
        ("[new.test]", addresses)]
