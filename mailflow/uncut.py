"""Work a cancel must not cut in the middle: what a delivery agent does that happens whatever the cancel (a worker
thread writing a mailbox, a command that has exited). Cut there, the agent's coroutine loses the result while the
mail is delivered all the same: qmgr records only the results it gets, so after a restart the recipient is
delivered again (a stop cancels the deliveries still running at the end of its grace).

    await uncut(work) -> T    `work`'s result (or what it raised); a cancel that comes meanwhile waits for `work` to
                              end and is raised at the task's next wait after it (`postpone_cancel`), so that the
                              caller hands the result on first: returned or yielded with no await in between, it
                              reaches qmgr (DeliveryRequest.settled says the rest)
    postpone_cancel()         the cancel just caught, raised at the task's next wait instead (work that had ended
                              before the cancel reached its awaiting coroutine)

Bounded by the work alone: for work that ends on its own (a local file write, whose own limits hold), never for a
peer's answer, which a stop must be able to cut.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def uncut(work: Awaitable[T]) -> T:
    """See the module docstring."""
    running = asyncio.ensure_future(work)
    cut = False
    while not running.done():
        try:
            await asyncio.wait({running})  # (a cancel of this wait leaves `running` alone)
        except asyncio.CancelledError:
            cut = True
    if cut:
        postpone_cancel()
    return running.result()


def postpone_cancel() -> None:
    """See the module docstring."""
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()
    task.cancel()
