"""Work a cancel must not cut in the middle: what a delivery agent does that happens whatever the cancel (a worker
thread writing a mailbox, a command that has exited). Cut there, the agent's coroutine loses the result while the
mail is delivered all the same: qmgr records only the results it gets, so after a restart the recipient is
delivered again (a stop cancels the deliveries still running at the end of its grace).

    await uncut(work, what, late=None, within=None) -> T
                              `work`'s result (or what it raised); a cancel that comes meanwhile waits for `work` to
                              end and is raised at the task's next wait after it (`postpone_cancel`), so that the
                              caller hands the result on first: returned or yielded with no await in between, it
                              reaches qmgr (DeliveryRequest.settled says the rest). The wait is bounded: `work`
                              still running UNCUT_LIMIT seconds after the cancel (a write stuck on a dead NFS
                              server, a disk that does not answer) is cancelled itself (a worker thread is left to
                              end on its own) and the cancel goes through, with one warning naming `what` (its
                              queue id first): the recipient stays queued, and may get a second copy after a
                              restart, as when Postfix's delivery agent is killed in the middle of a write. An
                              uncut within `work` (a recipient's destinations, one of its writes) goes through at
                              once then, unwarned: one cut-off, one warning. `late(running)`, called at the cut-off,
                              may take the work still running over instead (True: it is not cancelled here, and the
                              warning says its result may still be recorded; `settling_late` makes one).
                              `within` (a `Within`) counts the uncuts under way within `work` (its task's and those
                              it awaits): whether, at the cut-off, `work` is in a write or between two (a lock wait)
    settling_late(settle_late, made) -> late
                              a `late` that hands qmgr the work's results to come: `settle_late(results)`
                              (DeliveryRequest.settled_late: False, no one takes them) given `results()`, which
                              waits for the work and returns `made(its result)` (none when it failed); a cancel of
                              that wait (the stop gave up on it) cuts the work off (`cut_off`). Work that failed
                              hands on nothing: its recipient stays queued, and the retry tells the failure (for
                              local's several destinations the work is their walk, whose result is one from all
                              their parts: a failed last write's deferral is handed on with the others')
    cut_off(work)             `work` cancelled as cut off: an uncut within it goes through at once, unwarned (a
                              worker thread is left to end on its own)
    postpone_cancel()         the cancel just caught, raised at the task's next wait instead (work that had ended
                              before the cancel reached its awaiting coroutine)

For work that ends on its own (a local file write, whose own limits hold), and for local's delivery of one
recipient to several destinations (one result for all: cut between two, one part would be done twice or another
never); a peer's answer is never waited for otherwise (UNCUT_LIMIT at most there). A write left running past the
limit ends whole or not at all all the same (its own limits, its roll back): local's and virtual's agents hand on
the result it will make (`settling_late`), which qmgr records when it comes while the stop records results.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
Late = Callable[["asyncio.Future[T]"], bool]  # uncut's `late`
SettleLate = Callable[[Callable[[], Awaitable[list]]], bool]  # settling_late's `settle_late` (DeliveryRequest's)

log = logging.getLogger("mailflow.uncut")

UNCUT_LIMIT = 3.0  # seconds a cancel waits for the work under way (a local write takes milliseconds)
_CUT_OFF = "cut off by the stop's uncut wait around it"  # (the cancel's message to the work cut off)


class Within:
    """The uncuts under way within a work (uncut's `within`): `count`."""

    def __init__(self) -> None:
        self.count = 0


_WITHIN: contextvars.ContextVar[Within | None] = contextvars.ContextVar("uncut_within", default=None)


async def uncut(work: Awaitable[T], what: str, late: Late | None = None, within: Within | None = None) -> T:
    """See the module docstring."""
    around = _WITHIN.get()  # (the count of an uncut this one is within)
    if around is not None:
        around.count += 1
    try:
        return await _uncut(_started(work, within), what, late)
    finally:
        if around is not None:
            around.count -= 1


def _started(work: Awaitable[T], within: Within | None) -> asyncio.Future[T]:
    """`work` as a future; a coroutine run in a task whose uncuts count in `within`."""
    if within is None or not asyncio.iscoroutine(work):
        return asyncio.ensure_future(work)
    context = contextvars.copy_context()
    context.run(_WITHIN.set, within)
    return asyncio.get_running_loop().create_task(work, context=context)


async def _uncut(running: asyncio.Future[T], what: str, late: Late | None) -> T:
    limit = UNCUT_LIMIT  # (read at each call: a test sets it)
    loop = asyncio.get_running_loop()
    cut_off_at: float | None = None  # (when the work must have ended: set by the first cancel)
    while not running.done():
        try:
            await asyncio.wait({running}, timeout=None if cut_off_at is None else cut_off_at - loop.time())
        except asyncio.CancelledError as cancel:  # (a cancel of this wait leaves `running` alone)
            if cancel.args == (_CUT_OFF,):  # (the uncut around this work cut it off, and warned for both)
                cut_off(running)
                raise
            if cut_off_at is None:
                cut_off_at = loop.time() + limit
            continue
        if cut_off_at is not None and not running.done() and loop.time() >= cut_off_at:
            taken = late is not None and late(running)
            log.warning("%s still under way %gs after a stop's cancel: %s the recipient stays queued (a second copy "
                        "may follow)", what, limit, "its result is recorded if it ends while the stop records "
                        "results, else" if taken else "cut off,")
            if not taken:
                cut_off(running)
            raise asyncio.CancelledError
    if cut_off_at is not None:
        postpone_cancel()
    return running.result()


def cut_off(work: asyncio.Future) -> None:
    """See the module docstring. (What it raises in the end is retrieved: no error left unretrieved.)"""
    work.add_done_callback(_retrieved)
    work.cancel(_CUT_OFF)


def settling_late(settle_late: Callable[[Callable[[], Awaitable[list[R]]]], bool],
                  made: Callable[[T], list[R]]) -> Late:
    """See the module docstring."""
    def late(running: asyncio.Future[T]) -> bool:
        running.add_done_callback(_retrieved)  # (a wait for it cancelled before its first step: no error unretrieved)

        async def results() -> list[R]:
            try:
                await asyncio.wait({running})
            except asyncio.CancelledError:
                cut_off(running)
                raise
            if running.cancelled() or running.exception() is not None:
                return []
            return made(running.result())
        return settle_late(results)
    return late


def _retrieved(work: asyncio.Future) -> None:
    """(work left running past the limit: what it raises in the end is not an error left unretrieved)"""
    if not work.cancelled():
        work.exception()


def postpone_cancel() -> None:
    """See the module docstring."""
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()
    task.cancel()
