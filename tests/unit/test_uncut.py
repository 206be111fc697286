"""mailflow.uncut: work a cancel waits for, the cancel raised at the task's next wait after it."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import pytest

from mailflow import uncut as uncut_module
from mailflow.uncut import settling_late, uncut


async def test_a_cancel_during_the_work_waits_for_it_and_lands_at_the_next_wait():
    gate = asyncio.Event()
    handed_on: list[str] = []

    async def work() -> str:
        await gate.wait()
        return "written"

    async def agent() -> None:
        handed_on.append(await uncut(work(), "Q1: the write"))
        await asyncio.sleep(10)  # the cancel lands here
        handed_on.append("never")

    task = asyncio.create_task(agent())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.01)
    assert not task.done(), "the cancel did not wait for the work"
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert handed_on == ["written"]


async def test_the_work_s_error_is_raised_and_the_cancel_still_comes():
    """The write failed while the stop's cancel waited for it: the agent makes its deferred result from the error
    and hands it on; the cancel lands at its next wait."""
    handed_on: list[str] = []

    async def work() -> str:
        await asyncio.sleep(0.01)
        raise OSError("disk full")

    async def agent() -> None:
        try:
            await uncut(work(), "Q1: the write")
        except OSError as e:
            handed_on.append(f"deferred: {e}")  # (made with no wait: handed on before the cancel)
        await asyncio.sleep(10)  # the cancel lands here
        handed_on.append("never")

    task = asyncio.create_task(agent())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # the task ends cancelled, its result handed on
        await asyncio.wait_for(task, 1)
    assert handed_on == ["deferred: disk full"]


async def test_without_a_cancel_it_is_the_work_s_result():
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await uncut(work(), "Q1: the write") == 7


async def test_work_stuck_past_the_limit_lets_the_cancel_through_with_one_warning(monkeypatch, caplog):
    """A write stuck in its thread (a dead NFS server) held the stop for ever: past UNCUT_LIMIT the cancel goes
    through, warned once under the queue id, and the thread is left to end on its own."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.2)
    release = threading.Event()

    async def agent() -> str:
        return await uncut(asyncio.to_thread(release.wait, 10), "Q1: the write of new/1")

    task = asyncio.create_task(agent())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert time.monotonic() - started < 1
    finally:
        release.set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Q1: the write of new/1 still under way 0.2s after a stop's cancel: cut off, the recipient "
                        "stays queued (a second copy may follow)"]


async def test_a_cut_off_of_work_around_another_uncut_write_warns_once(monkeypatch, caplog):
    """A recipient's several destinations (uncut) and, within them, one write (uncut) stuck past the limit: the
    outer cut-off cancelled the destinations, whose write's uncut took that as a cancel of its own, waited the
    limit again and warned a second time. The outer warning covers both: one line."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.2)
    release = threading.Event()

    async def destinations() -> str:
        return await uncut(asyncio.to_thread(release.wait, 10), "Q1: the write of new/1")

    async def agent() -> str:
        return await uncut(destinations(), "Q1: the delivery of <team@example.test> to its 2 destinations")

    task = asyncio.create_task(agent())
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        await asyncio.sleep(0.5)  # (past the inner write's own limit, had it started one at the outer cut-off)
    finally:
        release.set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Q1: the delivery of <team@example.test> to its 2 destinations still under way 0.2s after a "
                        "stop's cancel: cut off, the recipient stays queued (a second copy may follow)"]


async def test_work_cut_off_with_a_late_taker_is_left_running_and_its_results_handed_on(monkeypatch, caplog):
    """`settling_late`: at the cut-off the work is not cancelled; its taker (qmgr) waits for it and gets the
    results `made` makes of its result, while the stop goes on."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.1)
    release = threading.Event()
    taken: list = []

    async def agent() -> str:
        late = settling_late(lambda results: taken.append(results) or True, lambda written: [f"sent: {written}"])
        return await uncut(asyncio.to_thread(lambda: release.wait(10) and "new/1"), "Q1: the write of new/1",
                           late=late)

    task = asyncio.create_task(agent())
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        [results] = taken
        waiting = asyncio.create_task(results())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        release.set()
        assert await asyncio.wait_for(waiting, 2) == ["sent: new/1"]
    finally:
        release.set()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Q1: the write of new/1 still under way 0.1s after a stop's cancel: its result is recorded if it ends while "
        "the stop records results, else the recipient stays queued (a second copy may follow)"]


async def test_a_late_taker_that_gives_up_cuts_the_work_off_and_an_uncut_within_goes_through_unwarned(monkeypatch,
                                                                                                    caplog):
    """The taker's wait cancelled (the stop's records are done): the work is cancelled as cut off, so the write's
    own uncut within it does not wait the limit again nor warn; no results. With no taker the cut-off is at once."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.1)
    release = threading.Event()
    taken: list = []
    ended: list[str] = []

    async def destinations() -> str:
        try:
            return await uncut(asyncio.to_thread(release.wait, 10), "Q1: the write of new/1")
        except asyncio.CancelledError:
            ended.append("cut off")
            raise

    async def agent(take: bool) -> str:
        late = settling_late(lambda results: take and (taken.append(results) or True), lambda done: [done])
        return await uncut(destinations(), "Q1: the delivery of <a@example.test>", late=late)

    try:
        for take in (True, False):
            task = asyncio.create_task(agent(take))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 2)
            if take:
                waiting = asyncio.create_task(taken[0]())
                await asyncio.sleep(0.05)
                assert ended == []  # (left running while taken)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            await asyncio.sleep(0.05)
            assert ended == ["cut off"] * (1 + (not take)), take
    finally:
        release.set()
    await asyncio.sleep(0.3)  # (past the inner write's own limit, had it started one)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith("Q1: the delivery of <a@example.test> still under way")
                                      for w in warnings), warnings


async def test_work_taken_late_by_a_taker_that_never_waits_leaves_no_error_unretrieved(monkeypatch):
    """The taker's task cancelled before its first step (the stop ended its records at once) never waits for the
    work; the write then failed, and its error was logged at collection as never retrieved. It is retrieved."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.1)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    release = threading.Event()

    def failing_write() -> None:
        release.wait(10)
        raise OSError(5, "Input/output error")

    async def agent() -> None:
        late = settling_late(lambda results: True, lambda done: [done])  # (taken, never waited for)
        await uncut(asyncio.to_thread(failing_write), "Q1: the write of new/1", late=late)

    try:
        task = asyncio.create_task(agent())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        release.set()
        await asyncio.sleep(0.2)  # (the write failed)
        del task
        gc.collect()
    finally:
        release.set()
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_work_taken_late_that_fails_hands_on_no_results(monkeypatch):
    """A write left running past the limit, then failing: its taker gets no results (the recipient stays queued and
    the retry tells the failure), not the write's error raised in the stop's task of records."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.1)
    release = threading.Event()
    taken: list = []

    def failing_write() -> str:
        release.wait(10)
        raise OSError(5, "Input/output error")

    async def agent() -> str:
        late = settling_late(lambda results: taken.append(results) or True, lambda written: [f"sent: {written}"])
        return await uncut(asyncio.to_thread(failing_write), "Q1: the write of new/1", late=late)

    task = asyncio.create_task(agent())
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        [results] = taken
        waiting = asyncio.create_task(results())
        release.set()
        assert await asyncio.wait_for(waiting, 2) == []
    finally:
        release.set()
