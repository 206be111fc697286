"""Work over a long list done a slice a loop turn, so that no turn of the event loop holds it all (the 100 000
recipients of one message: qmgr's expiry and its telling, the SMTP and LMTP clients' results and lines).

    await in_slices(items, each, size)   each(part) for the parts of `items`, `size` at a time, in order, the loop
                                         handed back between two (not before the first: `size` items or fewer
                                         are one call, with no suspension); a part is of the same type as `items`
                                         (a list's are lists)

    await in_slices_uncut(items, each, size)
                                         the same, but work that must not be left half done (what a peer already
                                         took): a cancel while the loop is handed back does all the parts left in
                                         one call, with no turn handed back (bounded by what `items` holds: a job's
                                         recipients, at most its recipient limit), then goes on (raised)

A cancel while the loop is handed back ends `in_slices` there: the parts done stay done, the rest are not done.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence, TypeVar, cast

S = TypeVar("S", bound=Sequence[Any])


async def in_slices(items: S, each: Callable[[S], object], size: int) -> None:
    """See the module docstring."""
    for start in range(0, len(items), size):
        if start:
            await asyncio.sleep(0)
        each(cast(S, items[start:start + size]))  # (a list's slice is a list, a tuple's a tuple)


async def in_slices_uncut(items: S, each: Callable[[S], object], size: int) -> None:
    """See the module docstring."""
    done = 0
    try:
        for start in range(0, len(items), size):
            if start:
                await asyncio.sleep(0)
            each(cast(S, items[start:start + size]))
            done = start + size
    except asyncio.CancelledError:
        if done < len(items):
            each(cast(S, items[done:]))
        raise
