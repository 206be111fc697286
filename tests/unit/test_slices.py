"""mailflow.slices.in_slices: the parts in order, the loop handed back between two and not before the first;
in_slices_uncut: a cancel between two does the rest at once."""
from __future__ import annotations

import asyncio

import pytest

from mailflow.slices import in_slices, in_slices_uncut


async def turns_while(work) -> int:
    """How many times another task ran while `work` was awaited."""
    ran = 0
    done = False

    async def counting() -> None:
        nonlocal ran
        while not done:
            await asyncio.sleep(0)
            ran += 1

    counter = asyncio.ensure_future(counting())
    await asyncio.sleep(0)  # (the counter started)
    ran = 0
    await work
    during, done = ran, True
    await counter
    return during


async def test_each_part_in_order_with_a_turn_between_two():
    parts: list = []
    turns = await turns_while(in_slices(list(range(25)), parts.append, 10))
    assert parts == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert turns == 2


async def test_a_list_of_one_slice_or_less_is_one_call_with_no_turn():
    parts: list = []
    assert await turns_while(in_slices((1, 2, 3), parts.append, 3)) == 0
    assert parts == [(1, 2, 3)]
    assert await turns_while(in_slices([], parts.append, 3)) == 0 and parts == [(1, 2, 3)]


async def test_a_cancel_between_two_parts_does_all_the_parts_left_at_once_then_is_raised():
    """What a peer took is told whole: the cancel between the first and second part gets the rest in one call."""
    parts: list = []
    task = asyncio.ensure_future(in_slices_uncut(list(range(25)), parts.append, 10))
    await asyncio.sleep(0)  # (the first part done, the loop handed back)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert parts == [list(range(10)), list(range(10, 25))]


async def test_in_slices_cut_by_a_cancel_leaves_the_rest_undone():
    parts: list = []
    task = asyncio.ensure_future(in_slices(list(range(25)), parts.append, 10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert parts == [list(range(10))]
