"""The store's side of a requeue (Postfix's postsuper -r, then pickup and cleanup copying the queue file).

An operator's requeue (`OperatorQueries.requeue_messages`) only moves a message to the `maildrop` queue, where
qmgr never takes it (Postfix's postsuper renames the queue file into maildrop/); an active one goes there when its
attempt ends (`finish`) or at a restart's recovery. The server's pickup then copies
each such message through cleanup into a new message with a new queue id:
- `requeued_messages(after, limit)`: a page of them, oldest requeue first (paged by (requeued_at, id) on the
  queue index, so a walk of the whole maildrop queue costs one index range per page, no sort), each with its
  envelope and only the
  recipients still pending (those delivered or bounced are not copied, as Postfix's cleanup skips the
  recipients a queue file marks done); the content is `Store.content(id)` (its file part read lazily). Its values
  are checked as every read of queue rows checks them (store/damage.py): one that is not of its kind (a row
  edited by hand: `arrival = 'x'`, text that is not UTF-8, a recipient's status no code writes) comes as a
  stand-in, and `damage` says what is wrong, for pickup to set the message aside rather than copy it. A message
  whose id is such text is left out (it cannot be named in a query), as qmgr's scan leaves it.
- `requeues_waiting()`: how many messages were requeued (marked: active, or incoming owing notices) and wait for
  the end of their attempt.
- `hold_requeued(old_id)`: one cleanup refuses for good now (a loop, a content check's REJECT) goes on hold.
- `replace_requeued(old_id, msg)`: in one transaction, `msg` is committed and `old_id` removed (recipients,
  content row, message row; its content file goes after the commit, while the new message holds its own hard link
  to the same file). A crash before the commit leaves the old message in the maildrop queue (copied again at the
  next start), after it the new message alone: never both, never neither.
  If `old_id` is no longer in the maildrop queue by then (an operator deleted it meanwhile), the copy's rows go in
  the same transaction and it returns False: nothing is kept, and no error fails the group commit it shared.

A message that still owes notices (a recipient's result recorded, its notice not queued: a stop came before the
end of its attempt) never reaches the maildrop queue, where only pending recipients are copied: a requeue (or
the recovery of one requeued while active) sends it to `incoming`, marked (`requeue`), so that the end of its next
attempt queues the notices and then moves it to maildrop. Nothing already accepted is lost.

`RequeueQueries` is a part of `Store` (mailflow/store/daemon.py), which supplies its connections.
"""
from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from mailflow.content import Spool
from mailflow.model import ClientAttributes, NewMessage, QueueId, Recipient
from mailflow.store.contents import CLIENT_COLUMNS, insert_ops, storable
from mailflow.store.damage import Columns, checked
from mailflow.store.engine import MAX_VARS, GroupCommitter, Reader, chunks, marks


# Whether a message (the row `message` of an UPDATE) still owes a failure or success notice.
OWES_NOTICES = "EXISTS (SELECT 1 FROM recipient WHERE message_id = message.id AND notice = 1)"


class RequeueGone(Exception):
    """The requeued message left the maildrop queue (deleted) before its copy was committed (raised by cleanup's
    resubmit when `replace_requeued` says so)."""


@dataclass(frozen=True)
class RequeuedMessage:
    """A message in the maildrop queue, as pickup copies it: its envelope and its pending recipients."""

    queue_id: QueueId
    sender: str
    arrival: float  # the first arrival: the copy keeps it (Postfix's cleanup keeps the queue file's time record)
    smtputf8: bool
    body_type: str
    client: str  # name[addr] of the submitting client
    envid: str
    ret: str
    client_attributes: ClientAttributes
    recipients: tuple[Recipient, ...]  # the pending ones, in envelope order
    warned: bool = False  # its "delayed" notice went out: the copy sends none again (Postfix copies its warn record)
    requeued_at: float = 0.0  # when it entered the maildrop queue (its next_attempt there): the order pickup reads
    #                           (as read, even when it is no time: it is the key of the next page)
    damage: str = ""  # what is wrong with its rows' values (then stand-ins); "" when sound


# The columns pickup reads of a requeued message (after its id and next_attempt) and of a recipient, with the kind of
# each (store/damage.py).
_ENVELOPE_KINDS = Columns(("sender", "text"), ("arrival", "time"), ("smtputf8", "flag"), ("body_type", "text"),
                          ("client", "text"), ("envid", "text"), ("ret", "text"), ("warned", "flag"),
                          *((name, "text") for name in CLIENT_COLUMNS))
_RECIPIENT_KINDS = Columns(("idx", "count"), ("address", "text"), ("original", "text"), ("notify", "text"),
                           ("orcpt", "text"), ("status", "status"))
# on the partial index message_requeue: the marked messages only, not every incoming and active row
REQUEUES_WAITING = "SELECT count(*) FROM message WHERE queue IN ('active', 'incoming') AND requeue = 1"
# A page of the maildrop queue after a (requeued_at, id) key: a range of the (queue, next_attempt) index (the table
# is WITHOUT ROWID, so the index holds the id too), read in its order.
REQUEUED_PAGE = (f"SELECT id, next_attempt, {_ENVELOPE_KINDS.select_list} FROM message"
                 " WHERE queue = 'maildrop' AND (next_attempt, id) > (?, ?) ORDER BY next_attempt, id LIMIT ?")


class RequeueQueries:
    """pickup's reads and its one change of requeued messages (a part of Store)."""

    _reader: Reader
    _committer: GroupCommitter
    content_dir: Path

    async def requeued_messages(self, *, after: tuple[float, QueueId] = (-math.inf, ""),
                                limit: int = 100) -> list[RequeuedMessage]:
        """Up to `limit` messages of the maildrop queue after the key `after` (the last one's (requeued_at, id)),
        oldest requeue first."""
        rows = await self._reader.fetchall(REQUEUED_PAGE, (*after, limit))
        named = [row for row in rows if type(row[0]) is str]  # (an id that is not UTF-8 cannot be bound)
        pending, recipient_damage = await self._pending_recipients([row[0] for row in named])
        return [_requeued(row, pending.get(row[0], ()), recipient_damage.get(row[0], [])) for row in named]

    async def _pending_recipients(self, ids: list[QueueId]
                                  ) -> tuple[dict[QueueId, tuple[Recipient, ...]], dict[QueueId, list[str]]]:
        """Each message's pending recipients, and what is wrong with those of its recipient rows that are damaged
        (a status no code writes among them: neither pending nor done)."""
        found: dict[QueueId, list[Recipient]] = {}
        damaged: dict[QueueId, list[str]] = {}
        for chunk in chunks(ids, MAX_VARS):
            rows = await self._reader.fetchall(
                f"SELECT message_id, {_RECIPIENT_KINDS.select_list} FROM recipient"
                f" WHERE message_id IN ({marks(len(chunk))}) AND status NOT IN ('sent', 'bounced')"
                " ORDER BY message_id, idx", tuple(chunk))
            for qid, *values in rows:
                fields, damage = checked(values, _RECIPIENT_KINDS)
                if damage:
                    damaged.setdefault(qid, []).append(f"recipient {fields[1]}: {damage}")
                else:
                    found.setdefault(qid, []).append(Recipient(*fields[:5]))
        return {qid: tuple(recipients) for qid, recipients in found.items()}, damaged

    async def requeues_waiting(self) -> int:
        [(n,)] = await self._reader.fetchall(REQUEUES_WAITING)
        return n

    async def hold_requeued(self, old_id: QueueId) -> None:
        await self._committer.write([("UPDATE message SET queue = 'hold', from_logged = 0"
                                      " WHERE id = ? AND queue = 'maildrop'", [(old_id,)])])

    async def replace_requeued(self, old_id: QueueId, msg: NewMessage, *, warned: bool = False) -> bool:
        """Commit `msg` (`warned`: its "delayed" notice went out already) and remove `old_id` in one transaction
        (see the module doc). False when `old_id` is no longer in the maildrop queue: then nothing is kept (the
        copy's rows go in the same transaction, which never fails for it, so the other writes of its group commit
        are not disturbed). May raise Overloaded like `insert`."""
        temporaries: list[Spool] = []
        try:
            ready = await storable(msg, self.content_dir, temporaries)
            ops = [*insert_ops([ready]),  # (the UPDATE after the INSERT: merged statements keep that order)
                   ("UPDATE message SET warned = 1 WHERE id = ?", [(msg.queue_id,)] if warned else [])]
            replaced, file_gone = await self._committer.write(
                ops, may_refuse=True, call=lambda con: _replace_requeued(con, old_id, msg.queue_id))
        finally:
            for spool in temporaries:
                spool.discard()
        if file_gone:  # (after the commit: the copy holds its own link to the same file; a crash here: the sweep)
            (self.content_dir / file_gone).unlink(missing_ok=True)
        return replaced


def _requeued(row: tuple, pending: tuple[Recipient, ...], recipient_damage: list[str]) -> RequeuedMessage:
    """A row of REQUEUED_PAGE as pickup copies it, its values checked."""
    qid, requeued_at, *envelope = row
    values, damage = checked(envelope, _ENVELOPE_KINDS)
    sender, arrival, utf8, body_type, client, envid, ret, warned, *attributes = values
    return RequeuedMessage(qid, sender, arrival, bool(utf8), body_type, client, envid, ret,
                           ClientAttributes(*attributes), pending, bool(warned), requeued_at,
                           damage="; ".join([damage] * bool(damage) + recipient_damage))


def _replace_requeued(con: sqlite3.Connection, old_id: QueueId, new_id: QueueId) -> tuple[bool, QueueId | None]:
    """The last step of `replace_requeued`'s transaction: the old message's rows go, and only if it is still in
    the maildrop queue; else the copy's rows go instead. Returns (replaced, the name in content/ whose file is to
    be removed after the commit, if any)."""
    if con.execute("DELETE FROM message WHERE id = ? AND queue = 'maildrop'", (old_id,)).rowcount == 1:
        kept, gone = new_id, old_id
    else:
        kept, gone = old_id, new_id
        con.execute("DELETE FROM message WHERE id = ?", (gone,))
    [(files,)] = con.execute("SELECT count(*) FROM content WHERE message_id = ? AND file_offset IS NOT NULL",
                             (gone,)).fetchall()
    con.execute("DELETE FROM recipient WHERE message_id = ?", (gone,))
    con.execute("DELETE FROM content WHERE message_id = ?", (gone,))
    return kept == new_id, gone if files else None
