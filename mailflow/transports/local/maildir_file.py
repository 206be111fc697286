"""A Maildir file destination of local delivery: a `/dir/` path (ending in "/") that an alias, an :include: file or a
.forward names, delivered as Postfix's local(8) does (local/file.c hands such a name to deliver_maildir).

`deliver_maildir_file(maildir, prefix, content, name=…, user=…, size_limit=…, workers=…, write_limit=…, queue_id=…,
settle_late=…, late_results=…)`: one message file written with maildir.write_maildir_file's steps: `tmp/`, `new/` and
`cur/` made when missing (and the directories above them: Postfix's make_dirs, each 0700), `prefix` (Return-Path,
X-Original-To, Delivered-To, as a `/file` gets them) then the message with LF line ends into `tmp/NAME` (0600), fsynced,
renamed into `new/`. With `user` (mailflow running as root: the alias owner's, the .forward's user's or default_privs,
never root's) the whole write runs in a child forked with that user's rights (asuser.call_as), so the file system checks
that user's rights, as local(8)'s set_eugid does: nothing is made as root and given away (a .forward naming
`/etc/cron.d/` must not get root's files there). Without `user`, as mailflow's own user. The write runs in a thread
`workers` gives (the agent's FILE_WRITERS, as a `/file` append), the message read through descriptors that thread opens
and the child keeps (Content.held: the user may not open the queue's files). The child's clock is the `/file` append's:
FILE_START_TIMEOUT s to start writing, then `write_limit` s without progress (a piece written, the fsync) interrupt it,
the file removed from tmp/: 4.3.0 (asuser.call_as's texts); a child still not ended KILL_GRACE s later is killed and its
partial file may stay in tmp/ (Maildir readers clean tmp/ after 36 hours; the retry writes under a new name).
`size_limit` (local.mailbox_size_limit; Postfix's local(8) sets it as the process's file size limit, so its
Maildir files are bound by it too): a bigger file is not kept.

Failures: a DeliveryError. An OS error is maildir.write_failure's status and text ("maildir delivery failed:
create maildir file PATH/tmp/NAME: Permission denied" 4.2.0, "…: error writing message: File too large" 5.2.2);
Postfix bounces a permission error 5.2.0, mailflow defers it, as every OS error writing a mailbox. A failed
fsync of new/ after the rename is a warning keyed by `queue_id`: the message is delivered.
Stop: a stop's cancel waits for the write, UNCUT_LIMIT s at most (mailflow.uncut); past that it is left to end, and
with `settle_late` (DeliveryRequest.settled_late) `late_results()` is handed on once the file is in new/.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from mailflow.content import Content
from mailflow.errors import PermanentError, TemporaryError
from mailflow.model import Outcome
from mailflow.transports.local.asuser import Progress, call_as
from mailflow.transports.local.mbox import FILE_START_TIMEOUT, held_message
from mailflow.transports.maildir import warn_unsynced, write_failure, write_maildir_file, written_late
from mailflow.uncut import SettleLate, uncut

log = logging.getLogger("mailflow.local")

Workers = Callable[[Callable[[], bytes]], Awaitable[bytes]]


async def deliver_maildir_file(maildir: Path, prefix: bytes, content: Content, *, name: str, user: str | None,
                               size_limit: int = 0, workers: Workers | None = None,
                               write_limit: float | None = None, queue_id: str = "",
                               settle_late: SettleLate | None = None, late_results: Callable[[], list] = list) -> None:
    """See the module docstring."""
    def attempt() -> bytes:  # (in a worker thread)
        with held_message(content) as held:
            args = (maildir, name, prefix, held.content, size_limit)
            if user is None:
                return _written(*args, queue_id)
            return call_as(user, "write", _written, *args, timeout=FILE_START_TIMEOUT, marked=True,
                           then=write_limit, keep=held.descriptors, queue_id=queue_id)

    def written(unsynced: bytes) -> None:
        if unsynced:
            warn_unsynced(queue_id, maildir, name, unsynced.decode("utf-8", "replace"))
    # (a stop's cancel waits for the write: the file is in new/ or not, and the result is handed on: mailflow.uncut)
    written(await uncut(asyncio.to_thread(attempt) if workers is None else workers(attempt),
                        f"{queue_id}: the write of {maildir}/new/{name}",
                        late=written_late(settle_late, written, late_results)))


def _written(maildir: Path, name: str, prefix: bytes, content: Content, size_limit: int, queue_id: str = "", *,
             writing: Progress | None = None) -> bytes:
    """The file written (in the child, as the user, or as mailflow): b"" once in new/, the reason new/ could not
    be synced after it; an OS error raised as the DeliveryError write_failure makes of it (a child reports that one
    as itself: an OSError would come back as 4.3.0 "cannot write as USER"). Its warning keyed by `queue_id` (none
    in the child: call_as keys the lines it sends)."""
    try:
        unsynced = write_maildir_file(maildir, name, prefix, content, size_limit=size_limit, writing=writing,
                                      queue_id=queue_id)
    except OSError as e:
        outcome, dsn, text = write_failure(e)
        raise (PermanentError if outcome is Outcome.BOUNCED else TemporaryError)(dsn, text) from None
    return b"" if unsynced is None else str(unsynced.strerror or unsynced).encode("utf-8", "replace")
