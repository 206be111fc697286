"""The store's operator API: what `mailflow queue …` (mailflow/queue_tools/) reads and changes.

The tools open the queue in a process of their own, beside a running server. A selection is: `queues`, and
optionally `ids`, `sender` (exact, any case), `rcpt_domain` (the domain of a pending recipient) and
`arrived_before` (unix time). Reads go in pages keyed on the queue id (the primary key; ids are time-ordered),
so walking 100 000 messages never holds more than one page. Every change is one transaction per chunk that also
bumps the generation counter, so a running qmgr notices within a second. Only `show` touches content (through
`Store.content()`).

`OperatorQueries` is a part of `Store` (mailflow/store/daemon.py), which supplies its connections.
- Reads, as frozen rows with named fields: `message_page` (MessageRow), `message_detail` (MessageDetail),
  `recipients_of` (RecipientRow), `shape_counts` (ShapeCount), `destination_rows` (DestinationRow); and
  `message_ids`, `count_messages`, `last_message_id`. A message or recipient row whose values are not of their
  kind (edited by hand: `arrival = 'x'`, a negative size, an unknown status) comes with stand-in values and
  `damage` saying what is wrong (store/damage.py), so that one bad row does not stop a listing; the tools warn
  about it.
- Changes: `hold_messages`, `release_messages`, `requeue_messages` (to the maildrop queue, for the server's
  pickup: requeue.py; an active message when its attempt ends), `flush_messages` (also counts a flush
  request, which qmgr reads with `flush_requests`), `delete_messages` (content files go after the commit).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mailflow.content import Content
from mailflow.model import QueueId
from mailflow.store.damage import Columns, checked
from mailflow.store.engine import MAX_VARS, GroupCommitter, Op, Reader, chunks, marks, remove_ops
from mailflow.store.requeue import OWES_NOTICES


@dataclass(frozen=True)
class MessageRow:
    """One message as mailq lists it."""

    queue_id: QueueId
    queue: str  # incoming, active, deferred, hold, corrupt or maildrop (requeued, not yet copied)
    size: int  # bytes of content
    arrival: float  # unix time
    sender: str  # '' is the null sender
    next_attempt: float
    attempts: int
    damage: str = field(default="", kw_only=True)  # what is wrong with the row's values; "" when sound


@dataclass(frozen=True)
class MessageDetail(MessageRow):
    """One message as `mailflow queue show` prints its envelope."""

    client: str  # name[addr] of the submitting client
    envid: str  # DSN ENVID, '' if none
    ret: str  # DSN RET: FULL, HDRS or ''
    smtputf8: bool
    body_type: str  # 8BITMIME, 7BIT (BODY=7BIT given) or "" (no BODY)
    warned: bool  # the "delayed" notice went out
    created: float  # the base of its queue lifetime and backoff (postcat's create_time): the arrival, or when a
    #                 requeued message's copy was made


@dataclass(frozen=True)
class RecipientRow:
    """One recipient of a message, in envelope order."""

    address: str
    original: str  # as the client gave it
    status: str  # pending, sent or bounced
    dsn: str  # last enhanced status code
    reason: str  # last diagnostic
    damage: str = ""  # what is wrong with the row's values; "" when sound
    notify: str = ""  # RFC 3461 NOTIFY as given ("" none)
    orcpt: str = ""  # RFC 3461 ORCPT as `type;address` ("" none)


@dataclass(frozen=True)
class ShapeCount:
    """How many pending recipients of one domain are in one age bucket (qshape's cells)."""

    domain: str
    bucket: int  # 1-based: see `shape_counts`
    count: int


@dataclass(frozen=True)
class DestinationRow:
    """What qmgr last published of one destination."""

    transport: str
    nexthop: str
    window: int  # concurrency allowed now
    in_flight: int
    queued: int  # jobs waiting in memory
    failures: int  # site failures in a row
    dead_until: float  # unix time; 0 = alive
    reason: str  # last site failure
    updated: float  # when qmgr wrote it
    paused_until: float = 0.0  # unix time its rate delay's pause ends; 0 = not paused


# The columns of each read, in the order of the rows' fields, with the kind of each (store/damage.py).
_MESSAGE_COLUMNS = (("id", "text"), ("queue", "queue"), ("size", "size"), ("arrival", "time"), ("sender", "text"),
                    ("next_attempt", "time"), ("attempts", "count"))
_MESSAGE_KINDS = Columns(*_MESSAGE_COLUMNS)
_DETAIL_KINDS = Columns(*_MESSAGE_COLUMNS, ("client", "text"), ("envid", "text"), ("ret", "text"),
                        ("smtputf8", "flag"), ("body_type", "text"), ("warned", "flag"), ("created", "time"))
_RECIPIENT_KINDS = Columns(("address", "text"), ("original", "text"), ("status", "status"), ("dsn", "text"),
                           ("reason", "text"), ("notify", "text"), ("orcpt", "text"))
_DESTINATION_ROW = ("transport, nexthop, window, in_flight, queued, failures, dead_until, reason, updated,"
                    " paused_until")
# The domain after the LAST '@' (rtrim drops every character but '@' from the right), lower-cased.
_RCPT_DOMAIN = "lower(rtrim(replace({a}, rtrim({a}, replace({a}, '@', '')), ''), '.'))"
BUMP_GENERATION = ("INSERT INTO control (key, value) VALUES ('generation', 1)"
                   " ON CONFLICT (key) DO UPDATE SET value = value + 1")


class OperatorQueries:
    """The operator tools' queries and changes (a part of Store)."""

    _reader: Reader
    _committer: GroupCommitter
    _scanned: dict[QueueId, Content]  # see Store.due

    async def message_page(self, *, queues: Sequence[str], ids: Sequence[QueueId] | None = None, after: str = "",
                           limit: int = 1000, sender: str | None = None, rcpt_domain: str | None = None,
                           arrived_before: float | None = None) -> list[MessageRow]:
        """Up to `limit` selected messages with ids after `after`, in id order. `ids` at most 500."""
        where, params = _tool_where(queues, ids, after, sender, rcpt_domain, arrived_before)
        rows = await self._reader.fetchall(
            f"SELECT {_MESSAGE_KINDS.select_list} FROM message WHERE {where} ORDER BY id LIMIT ?", (*params, limit))
        return [_message_row(r) for r in rows]

    async def message_ids(self, **selection) -> list[QueueId]:
        """The ids of `message_page(**selection)`."""
        return [row.queue_id for row in await self.message_page(**selection)]

    async def last_message_id(self) -> QueueId:
        """The largest queue id in the queue now ('' when empty): a mass change walks no further, so the messages
        made meanwhile (ids are time-ordered), such as pickup's copies of requeued mail, are not taken."""
        [(last,)] = await self._reader.fetchall("SELECT max(id) FROM message")
        return last or ""

    async def count_messages(self, *, queues: Sequence[str], sender: str | None = None,
                             rcpt_domain: str | None = None, arrived_before: float | None = None) -> int:
        where, params = _tool_where(queues, None, "", sender, rcpt_domain, arrived_before)
        rows = await self._reader.fetchall(f"SELECT count(*) FROM message WHERE {where}", params)
        return rows[0][0]

    async def recipients_of(self, ids: Sequence[QueueId], *, pending_only: bool = False
                            ) -> dict[QueueId, list[RecipientRow]]:
        """Each message's recipients (only the pending ones with `pending_only`, and any with a status no code
        writes: damaged), in envelope order; a message without any is missing from the answer."""
        out: dict[QueueId, list[RecipientRow]] = {}
        only = " AND status NOT IN ('sent', 'bounced')" if pending_only else ""
        for chunk in chunks(list(ids), MAX_VARS):
            rows = await self._reader.fetchall(
                f"SELECT message_id, {_RECIPIENT_KINDS.select_list} FROM recipient"
                f" WHERE message_id IN ({marks(len(chunk))}){only} ORDER BY message_id, idx", tuple(chunk))
            for qid, *fields in rows:
                (address, original, status, dsn, reason, notify, orcpt), damage = checked(fields, _RECIPIENT_KINDS)
                out.setdefault(qid, []).append(RecipientRow(address, original, status, dsn, reason, damage, notify,
                                                            orcpt))
        return out

    async def message_detail(self, queue_id: QueueId) -> MessageDetail | None:
        """One message's envelope, or None."""
        rows = await self._reader.fetchall(f"SELECT {_DETAIL_KINDS.select_list} FROM message WHERE id = ?",
                                                   (queue_id,))
        if not rows:
            return None
        values, damage = checked(rows[0], _DETAIL_KINDS)
        (qid, queue, size, arrival, sender, next_attempt, attempts, client, envid, ret, utf8, body_type, warned,
         created) = values
        return MessageDetail(qid, queue, size, arrival, sender, next_attempt, attempts, client, envid, ret,
                             smtputf8=bool(utf8), body_type=body_type, warned=bool(warned), created=created,
                             damage=damage)

    async def hold_messages(self, ids: Sequence[QueueId]) -> None:
        """incoming/deferred/active -> hold. An active message's delivery finishes; `record` keeps it held. The hold
        wins over a requeue asked while it was active (its mark is cleared)."""
        await self._tool_write("UPDATE message SET queue = 'hold', requeue = 0"
                               " WHERE id = ? AND queue IN ('incoming', 'deferred', 'active')", [(i,) for i in ids])

    async def release_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """hold -> deferred, due `now`."""
        await self._tool_write("UPDATE message SET queue = 'deferred', next_attempt = ?, from_logged = 0"
                               " WHERE id = ? AND queue = 'hold'", [(now, i) for i in ids])

    async def requeue_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """incoming/deferred/hold -> maildrop (as of `now`), where qmgr never takes it: the server's pickup copies
        it through cleanup into a new message (mailflow/store/requeue.py), as Postfix's pickup copies a queue file
        that postsuper -r moved into maildrop/. An active message is marked instead: the end of its attempt (or a
        restart's recovery) moves it to maildrop, so no copy is made while a delivery of it may be under way. One
        that still owes notices goes to incoming, marked: the end of its next attempt queues them, then moves it to
        maildrop (requeue.py). A held one goes at once, even if held during an attempt still under way: pickup
        copies no message qmgr still has in hand (`QueueManager.in_hand`), so no copy is made beside that delivery
        either (its end records its results first, and the copy takes only the recipients still pending)."""
        await self._tool_write(f"UPDATE message SET queue = CASE WHEN {OWES_NOTICES} THEN 'incoming' ELSE 'maildrop'"
                               f" END, requeue = {OWES_NOTICES}, next_attempt = ?"
                               " WHERE id = ? AND queue IN ('incoming', 'deferred', 'hold')", [(now, i) for i in ids],
                               ("UPDATE message SET requeue = 1 WHERE id = ? AND queue = 'active'",
                                [(i,) for i in ids]))

    async def flush_messages(self, ids: Sequence[QueueId], now: float) -> None:
        """Deferred messages due `now`; also counts a flush request (`flush_requests`)."""
        await self._tool_write("UPDATE message SET next_attempt = ? WHERE id = ? AND queue = 'deferred'",
                               [(now, i) for i in ids],
                               ("INSERT INTO control (key, value) VALUES ('flush', 1)"
                                " ON CONFLICT (key) DO UPDATE SET value = value + 1", [()]))

    async def delete_messages(self, ids: Sequence[QueueId]) -> None:
        """Remove messages in any state: message, recipient and content rows."""
        id_rows = [(i,) for i in ids]
        for qid in ids:
            self._scanned.pop(qid, None)
        await self._committer.write([*remove_ops(id_rows), (BUMP_GENERATION, [()])])

    async def _tool_write(self, sql: str, rows: list[tuple], *more: Op) -> None:
        await self._committer.write([(sql, rows), *more, (BUMP_GENERATION, [()])])

    async def shape_counts(self, queues: Sequence[str], now: float, limits: Sequence[float], *,
                           senders: bool = False) -> list[ShapeCount]:
        """Pending recipients per (recipient domain, age bucket), counted in SQL; with `senders`, messages per
        (sender domain, age bucket), as qshape -s. Bucket i (1-based) holds ages below limits[i-1] seconds;
        bucket len(limits)+1 the rest. The null sender's domain is ''."""
        cases = " ".join(f"WHEN ? - m.arrival < ? THEN {i}" for i in range(1, len(limits) + 1))
        case_params = [p for limit in limits for p in (now, limit)]
        if senders:
            address, source = "m.sender", "FROM message m WHERE"
        else:
            address, source = "r.address", ("FROM message m JOIN recipient r ON r.message_id = m.id"
                                             " WHERE r.status = 'pending' AND")
        rows = await self._reader.fetchall(
            f"SELECT {_RCPT_DOMAIN.format(a=address)} AS domain,"
            f" CASE {cases} ELSE {len(limits) + 1} END AS bucket, count(*)"
            f" {source} m.queue IN ({marks(len(queues))}) GROUP BY domain, bucket",
            (*case_params, *queues))
        return [ShapeCount(*r) for r in rows]

    async def destination_rows(self) -> list[DestinationRow]:
        """qmgr's last destination snapshot, by transport and nexthop."""
        rows = await self._reader.fetchall(
            f"SELECT {_DESTINATION_ROW} FROM destination ORDER BY transport, nexthop")
        return [DestinationRow(*r) for r in rows]


def _message_row(row: Sequence[object]) -> MessageRow:
    values, damage = checked(row, _MESSAGE_KINDS)
    return MessageRow(*values, damage=damage)


def _tool_where(queues: Sequence[str], ids: Sequence[QueueId] | None, after: str, sender: str | None,
                rcpt_domain: str | None, arrived_before: float | None) -> tuple[str, list]:
    # `+queue` keeps the planner on the primary key, so pages come in id order without a sort.
    clauses = [f"+queue IN ({marks(len(queues))})"]
    params: list[object] = list(queues)
    if ids is not None:
        clauses.append(f"id IN ({marks(len(ids))})")
        params += ids
    if after:
        clauses.append("id > ?")
        params.append(after)
    if sender is not None:
        clauses.append("lower(sender) = lower(?)")
        params.append(sender)
    if rcpt_domain is not None:
        clauses.append("EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = message.id"
                       f" AND r.status = 'pending' AND {_RCPT_DOMAIN.format(a='r.address')} = lower(?))")
        params.append(rcpt_domain)
    if arrived_before is not None:
        clauses.append("arrival < ?")
        params.append(arrived_before)
    return " AND ".join(clauses), params
