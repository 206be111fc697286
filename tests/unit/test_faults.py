"""mailflow.faults under a virtual clock: backoff, failure logs once per interval, guarded chores, the retrier."""
from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from mailflow.clock import VirtualClock
from mailflow.faults import Backoff, ErrorKindLog, FailureLog, Guard, Retrier, describe
from mailflow.store import store_fault

LOG = logging.getLogger("mailflow.test.faults")


def disk_full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorname = "SQLITE_FULL"
    return error


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def test_backoff_doubles_to_its_cap_and_starts_over():
    b = Backoff(0.5, 4.0)
    assert [b.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.succeeded()
    assert b.failed() == 0.5


def test_describe_gives_sqlites_own_words_and_code():
    assert describe(disk_full()) == "database or disk is full (SQLITE_FULL)"
    assert describe(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"


def test_a_repeating_failure_is_told_once_per_interval_with_a_count(caplog):
    clock = VirtualClock()
    log = FailureLog(LOG, "scan", clock, interval=60)
    with caplog.at_level(logging.WARNING, LOG.name):
        for _ in range(100):  # 100 failures, one a second
            log.failed(disk_full())
            clock.advance(1)
        log.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["scan failed: database or disk is full (SQLITE_FULL)",
                     "scan failed 60 more times in the last 60s (61 in a row): database or disk is full (SQLITE_FULL)",
                     "scan works again after 100 failures"]
    assert all(r.exc_info is None for r in caplog.records)  # a fault of the world: no traceback


def test_a_probable_bug_gets_its_traceback_once(caplog):
    log = FailureLog(LOG, "scan", VirtualClock())
    with caplog.at_level(logging.ERROR, LOG.name):
        for _ in range(3):
            log.failed(KeyError("oops"))
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


def raised(kind: type[Exception], text: str) -> Exception:
    """An error of `kind` with its traceback: raised at one place per kind (what ErrorKindLog tells apart)."""
    try:
        raise kind(text)
    except Exception as e:
        return e


def told(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_steady_bugs_count_is_told_each_interval_while_other_kinds_come_and_go(caplog):
    """One bug every second for ten minutes, two others each every 80 s, 40 s apart: the steady bug's failures are
    told once a minute with their count (a count's first failure and the 60 after it). Each other kind's line
    restarted the count's timer: no count was written in the ten minutes (599 failures untold)."""
    clock = VirtualClock()
    log = ErrorKindLog(LOG, "agent", clock, interval=60)
    with caplog.at_level(logging.WARNING, LOG.name):
        for second in range(600):
            log.failed(raised(RuntimeError, "steady"), f"A{second}")
            if second % 40 == 0:
                log.failed(raised(KeyError if second % 80 else ValueError, "other"), f"B{second}")
            clock.advance(1)
    counts = [line for line in told(caplog) if "more time" in line]
    assert counts == ["agent failed 61 more times in the last 60s: steady"] * 9, told(caplog)[:6]


def test_works_again_is_said_after_a_counted_run_only(caplog):
    """Two failures back to back (the jobs of one bad message, one per domain of its recipients) then a success: no
    "works again" line among good mail, even when a count of earlier failures comes due at the first of them; a
    run that went on long enough to be counted has one, with its total. Two failures in a row were enough for it."""
    clock = VirtualClock()
    log = ErrorKindLog(LOG, "agent", clock, interval=60)
    with caplog.at_level(logging.WARNING, LOG.name):
        for message in range(3):
            log.failed(raised(RuntimeError, "bad"), f"B{message}")
            log.failed(raised(RuntimeError, "bad"), f"B{message}")
            log.succeeded()
            clock.advance(10)
        assert told(caplog) == ["agent failed for B0: bad"]
        clock.advance(30)  # 60: the count of B0 to B2's other failures comes due as the next bad message fails
        log.failed(raised(RuntimeError, "bad"), "B3")
        log.failed(raised(RuntimeError, "bad"), "B3")
        log.succeeded()
        assert told(caplog)[1:] == ["agent failed 6 more times in the last 60s: bad"]
        for second in range(61):
            log.failed(raised(RuntimeError, "bad"), f"Q{second}")
            clock.advance(1)
        log.succeeded()
    assert told(caplog)[2:] == ["agent failed 62 more times in the last 60s: bad",  # (B3's second failure too)
                                "agent works again after 61 failures in a row"]


def test_a_pending_count_is_told_when_its_interval_is_over_though_no_failure_follows(caplog):
    """Bad inputs among good ones for half a minute, then none: the count is told a minute after its first failure
    by the next success or tick, its span that minute, and at a stop whatever its time. It waited for the next
    failure ("4 more times in the last 604830s" a week later), or was never told."""
    clock = VirtualClock()
    log = ErrorKindLog(LOG, "agent", clock, interval=60)
    with caplog.at_level(logging.WARNING, LOG.name):
        for message in range(5):  # at 0 (told whole), 6, 12, 18, 24
            log.failed(raised(RuntimeError, "bad"), f"B{message}")
            log.succeeded()
            clock.advance(6)
        clock.advance(36)  # 66: a minute after the first one counted (at 6)
        log.succeeded()
        assert told(caplog)[1:] == ["agent failed 4 more times in the last 60s: bad"]
        for message in range(5, 7):
            log.failed(raised(RuntimeError, "bad"), f"B{message}")
        log.tick()
        clock.advance(61)
        log.tick()
        assert told(caplog)[2:] == ["agent failed 2 more times in the last 61s: bad"]
        log.failed(raised(RuntimeError, "bad"), "B7")  # (told whole: not seen for a minute)
        clock.advance(5)
        log.failed(raised(RuntimeError, "bad"), "B8")
        clock.advance(5)
        log.flush()
        log.flush()
    assert told(caplog)[3:] == ["agent failed for B7: bad", "agent failed 1 more time in the last 5s: bad"]


def test_works_again_takes_in_the_count_not_told_yet(caplog):
    """A run of failures, counted, then one more and a success: the "works again" line's total has it; a minute on,
    the next failure is told whole and not counted again ("1 more time", after "works again after 63 failures")."""
    clock = VirtualClock()
    log = ErrorKindLog(LOG, "agent", clock, interval=60)
    with caplog.at_level(logging.WARNING, LOG.name):
        for second in range(63):  # the count told at 61 (Q1 to Q61), Q62 not yet
            log.failed(raised(RuntimeError, "bad"), f"Q{second}")
            clock.advance(1)
        log.succeeded()
        clock.advance(61)
        log.failed(raised(RuntimeError, "bad"), "Q63")
        log.tick()
        log.flush()
    assert told(caplog) == ["agent failed for Q0: bad", "agent failed 61 more times in the last 60s: bad",
                            "agent works again after 63 failures in a row", "agent failed for Q63: bad"]


async def test_a_guarded_chore_is_skipped_while_it_backs_off():
    clock = VirtualClock()
    guard = Guard("chore", clock, LOG, first=1, cap=4)
    calls = []

    async def failing():
        calls.append(clock.time())
        raise disk_full()

    t0 = clock.time()
    for _ in range(200):  # a loop turning as fast as it can for 10 virtual seconds
        await guard.run(failing)
        clock.advance(0.05)
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:])]
    assert calls[0] == t0 and len(gaps) == 3, calls  # not 200 tries
    assert all(want <= gap <= want + 0.1 for want, gap in zip((1, 2, 4), gaps)), gaps  # (up to a turn late)
    assert guard.backing_off

    async def works():
        calls.append(-1)

    clock.advance(guard.resume_at - clock.time())
    assert await guard.run(works) and not guard.backing_off


async def test_the_retrier_waits_out_a_store_fault_with_one_probe_at_a_time():
    clock = VirtualClock()
    retrier = Retrier(clock, LOG, "records", shared=store_fault, first=1, cap=4)
    broken = True
    attempts = []

    async def write(n):
        attempts.append((n, clock.time()))
        if broken:
            raise disk_full()
        return n

    t0 = clock.time()
    tasks = [asyncio.ensure_future(retrier.run(lambda n=n: write(n))) for n in range(50)]
    for _ in range(40):  # 20 virtual seconds of a broken store
        await settle()
        clock.advance(0.5)
    await settle()
    # the first failure puts everyone behind one probe: at 1, 2, 4, 4, 4, 4 s, not 50 callers each time
    assert len(attempts) <= 50 + 8, f"{len(attempts)} attempts: every waiting caller retried on its own"
    assert not any(t.done() for t in tasks)
    broken = False
    for _ in range(10):
        clock.advance(0.5)
        await settle()
    assert sorted(await asyncio.gather(*tasks)) == list(range(50))
    assert retrier.healthy
    assert clock.time() - t0 < 26


async def test_the_retrier_backs_off_a_callers_own_error_without_blocking_the_others():
    clock = VirtualClock()
    retrier = Retrier(clock, LOG, "records", shared=store_fault, first=1, cap=4)
    bad_tries = []

    async def bad():
        bad_tries.append(clock.time())
        raise sqlite3.IntegrityError("UNIQUE constraint failed")

    async def good():
        return "ok"

    stuck = asyncio.ensure_future(retrier.run(bad))
    await settle()
    assert await retrier.run(good) == "ok"  # not behind the bad one
    for _ in range(20):
        clock.advance(0.5)
        await settle()
    assert 3 <= len(bad_tries) <= 6
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck


async def test_the_retrier_tells_a_clock_driver_when_its_callers_wait_for_the_clock_alone():
    """What the Sink's settle/advance read (qmgr's `working`, `next_timer`): callers asleep until a retry time, or in
    line behind a probe that is, rest; a caller at work, or one whose retry time has come, does not."""
    clock = VirtualClock(1000.0)
    retrier = Retrier(clock, LOG, "writes", shared=store_fault, first=1.0, cap=8.0)
    broken = True
    answer = asyncio.Event()  # the store answers

    async def write():
        await answer.wait()
        if broken:
            raise disk_full()
        return "ok"

    assert retrier.resting() and retrier.next_retry() is None  # no caller
    calls = [asyncio.create_task(retrier.run(write)) for _ in range(2)]
    await settle()
    assert not retrier.resting()  # at work: waiting for the store, not for the clock
    answer.set()
    await settle()
    assert retrier.callers == frozenset(calls)
    assert retrier.resting() and retrier.next_retry() == 1001.0  # one probe asleep, the other in line behind it
    clock.advance(1.0)
    assert not retrier.resting()  # its time has come: it is about to try
    await settle()
    assert retrier.resting() and retrier.next_retry() == 1003.0  # failed again: the next probe at +2 s
    broken = False
    clock.advance(2.0)
    assert await asyncio.gather(*calls) == ["ok", "ok"]
    assert retrier.callers == frozenset() and retrier.resting() and retrier.next_retry() is None
