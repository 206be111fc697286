"""The changes an operator makes to the queue (Postfix's postsuper and postqueue -f) over a selection.

- `ACTIONS` (hold, release, requeue, delete, flush): which queues each applies to and the Store method that
  does it; requeue (to the maildrop queue) leaves the server's pickup work, so its callers wake pickup
  (the command line: mailflow.maildrop.wake_pickup, as sendmail does; the admin API: Pickup.wake).
- `apply(store, action, selection, now, err, log=)` walks the selection in chunks of CHUNK ids, one store
  transaction each (the store bumps the generation counter in it, so a running qmgr rescans), with progress
  on stderr (`Progress`) past PROGRESS_OVER messages; without named ids it takes only the messages there when it
  starts (no id past the largest then: pickup's copies of requeued mail get new, larger ids). It returns how many
  messages it took and the explicitly named ids that were not in one of its queues; a store error propagates
  (chunks already done stay done).
  With `log` (a MailLog: the server's for the admin API, `logs.tool_mail_log` for the command line) it writes
  what postsuper logs: a line for each message a chunk took (`QID: removed`…; none for a bare `ALL`, as
  postsuper's mass operations), then the summary (`Deleted: N messages`…; none when a store error stops it,
  as postsuper ends at a fatal error); flush logs nothing, as postqueue -f.
- `either(names)`, `plural(n, word)`: the words the CLI reports with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Sequence

from mailflow.logs import POSTSUPER, MailLog
from mailflow.queue_tools.selection import CHUNK, QUEUES, Selection, pages

PROGRESS_OVER = 3000  # messages; a bigger operation reports progress on stderr


@dataclass(frozen=True)
class Action:
    name: str
    sources: tuple[str, ...]  # the queues it applies to
    method: str  # the Store coroutine: (ids) or (ids, now)
    needs_now: bool
    wakes_pickup: bool = False  # the server's pickup has work once it took a message: its caller wakes it


ACTIONS = {
    "hold": Action("hold", ("incoming", "active", "deferred"), "hold_messages", False),
    "release": Action("release", ("hold",), "release_messages", True),
    "requeue": Action("requeue", ("incoming", "active", "deferred", "hold"), "requeue_messages", True,
                      wakes_pickup=True),
    "delete": Action("delete", QUEUES, "delete_messages", False),
    "flush": Action("flush", ("deferred",), "flush_messages", True),
}


class Progress:
    """A plain counter on stderr: rewritten in place on a terminal, else a line every tenth of the way."""

    def __init__(self, err: IO[str], label: str, total: int):
        self._err, self._label, self._total = err, label, max(total, 1)
        self._tty = bool(getattr(err, "isatty", lambda: False)())
        self._next_tenth = 1

    def update(self, done: int) -> None:
        if self._tty:
            self._err.write(f"\r{self._label}: {done}/{self._total} messages")
            self._err.flush()
            return
        while done * 10 >= self._next_tenth * self._total and self._next_tenth <= 10:
            self._err.write(f"{self._label}: {done}/{self._total} messages\n")
            self._next_tenth += 1

    def finish(self) -> None:
        if self._tty:
            self._err.write("\n")


async def apply(store, action: Action, selection: Selection, now: float, err: IO[str], *,
                log: MailLog | None = None, chunk: int = CHUNK,
                progress_over: int = PROGRESS_OVER) -> tuple[int, list[str]]:
    """Apply `action` to the selection, `chunk` ids per transaction, logged to `log` as postsuper logs. Returns
    (how many messages it took, the explicitly named ids that were not in one of its queues)."""
    logged = log if action.name in POSTSUPER else None
    done, missed = await _walk(store, action, selection, now, err, None if selection.mass else logged,
                               chunk=chunk, progress_over=progress_over)
    if logged is not None:
        logged.operator_total(action.name, done)
    return done, missed


async def _walk(store, action: Action, selection: Selection, now: float, err: IO[str], each: MailLog | None, *,
                chunk: int, progress_over: int) -> tuple[int, list[str]]:
    """`apply` without its summary: `each` logs each message a chunk took."""
    change = getattr(store, action.method)
    sources = selection.within(action.sources)
    if not sources:  # e.g. `release ALL deferred`: release takes held mail only
        return 0, list(selection.ids or ())
    through = None  # (named ids: those only)
    if selection.ids is not None:
        total = len(selection.ids)
    else:  # the messages there as it starts: pickup's copies of those it requeues get new, larger ids
        through = await store.last_message_id()
        total = await store.count_messages(queues=sources, **selection.filters(now))
    progress = Progress(err, action.name, total) if total > progress_over else None
    done, seen = 0, set()
    async for ids in pages(store, sources, selection, now, ids_only=True, size=chunk, through=through):
        await (change(ids, now) if action.needs_now else change(ids))
        done += len(ids)
        if each is not None:
            for qid in ids:
                each.operator(qid, action.name)
        if selection.ids is not None:
            seen.update(ids)
        if progress:
            progress.update(done)
    if progress:
        progress.finish()
    missed = [i for i in selection.ids if i not in seen] if selection.ids is not None else []
    return done, missed


def either(names: Sequence[str]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
