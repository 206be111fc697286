"""mailflow.uncut: work a cancel waits for, the cancel raised at the task's next wait after it."""
from __future__ import annotations

import asyncio

import pytest

from mailflow.uncut import uncut


async def test_a_cancel_during_the_work_waits_for_it_and_lands_at_the_next_wait():
    gate = asyncio.Event()
    handed_on: list[str] = []

    async def work() -> str:
        await gate.wait()
        return "written"

    async def agent() -> None:
        handed_on.append(await uncut(work()))
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
    async def work() -> str:
        await asyncio.sleep(0.01)
        raise OSError("disk full")

    async def agent() -> str:
        try:
            await uncut(work())
        except OSError as e:
            return f"deferred: {e}"  # (a result made with no wait: handed on before the cancel)
        return "sent"

    task = asyncio.create_task(agent())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # the task ends cancelled, its result made
        await task


async def test_without_a_cancel_it_is_the_work_s_result():
    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await uncut(work()) == 7
