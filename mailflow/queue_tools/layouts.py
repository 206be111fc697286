"""The reports of `mailflow queue …`: Postfix's mailq, postcat and qshape layouts, and qmgr's destinations.

- mailq: `write_mailq` (Postfix's layout, a page of CHUNK messages in memory at a time; `mailq_entry`,
  `mailq_footer`), `write_postqueue_json` (postqueue -j: a JSON object a line, Postfix's names) and
  `write_list_json` (one JSON array, streamed, every recipient with its status).
- postcat: `write_show` (envelope, recipients, headers and body in `*** … ***` sections, like postcat -q; the
  parts asked for, SHOW_PARTS by default, as postcat's -e, -h and -b choose them) and `write_show_json`; the body
  is streamed from the queue (`message_text`), never held whole.
- qshape: `shape_rows` (the store's counts -> TOTAL and the top domains), `format_shape`, `shape_json`.
- destinations: `format_destinations` (an aligned table), `destinations_json`.

Every function that reads takes the store and a text stream; only `show` reads message content. The rest are
pure and take the store's rows (mailflow.store: MessageRow, MessageDetail, RecipientRow, ShapeCount,
DestinationRow). Text from clients (senders, addresses, reasons, headers) goes through `printable()`.
A damaged message (`damage_of`: a row of it whose values the store could not take, shown with stand-ins) is listed
with the others, marked `(damaged queue row: …)` in mailq and `"damaged": "…"` in JSON; the listing writers also
tell `warn(queue_id, damage)` of it, once per message, as Postfix's showq warns about a bad queue file.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import time
from typing import IO, AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence

from mailflow.content import Content
from mailflow.logs import printable
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.queue_tools.selection import NULL_SENDER, Selection, pages
from mailflow.store import DestinationRow, MessageDetail, MessageRow, RecipientRow, ShapeCount

# postqueue's headings ("%-11s %7s %-20s %s" for short queue ids, "%-17s %8s %-19s %s" for long ones such as ours)
MAILQ_HEADER = "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------"
MAILQ_SHORT_HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
SHAPE_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's default: -t 5 -b 10
SHAPE_LABELS = ("T", *(str(m) for m in SHAPE_MINUTES), f"{SHAPE_MINUTES[-1]}+")
Warn = Callable[[str, str], None]  # (queue id, what is damaged)


def damage_of(row: MessageRow, recipients: Iterable[RecipientRow]) -> str:
    """What is wrong with a message's rows: its own values, then each recipient's; "" when nothing is."""
    parts = [row.damage] if row.damage else []
    parts += [f"recipient {printable(r.address) or '?'}: {r.damage}" for r in recipients if r.damage]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- mailq


def mailq_time(ts: float) -> str:
    """`Fri Dec  4 06:41:02`: the day of the month padded with a space, as postqueue writes it."""
    t = time.localtime(ts)
    return time.strftime("%a %b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S", t)


def mailq_entry(row: MessageRow, recipients: Sequence[RecipientRow]) -> list[str]:
    """One message in Postfix's mailq layout (postqueue's formats: `%-11s %7ld %20.20s %s` for short ids,
    `%-17s %8ld %19.19s %s` for long ones such as ours; recipients indented to the sender's column).
    `recipients`: its pending ones. They are grouped under their last reason (shown once, right-aligned like
    Postfix); those without a reason come last, under `(reason unavailable)` when others have one (postqueue's
    words, so they are not read as sharing the reason above them)."""
    qid = row.queue_id
    mark = {"active": "*", "hold": "!"}.get(row.queue, " ")
    who = printable(row.sender) if row.sender else NULL_SENDER
    if len(qid) < 11:  # Postfix's two layouts: short queue ids, and long ones (enable_long_queue_ids)
        first = f"{qid + mark:<11} {row.size:>7} {mailq_time(row.arrival):<20} {who}"
    else:
        first = f"{qid + mark:<17} {row.size:>8} {mailq_time(row.arrival):<19} {who}"
    indent = " " * (len(first) - len(who))
    groups: dict[str, list[str]] = {}
    for rcpt in recipients:
        groups.setdefault(printable(rcpt.reason), []).append(printable(rcpt.address))
    lines = [first]
    damage = damage_of(row, recipients)
    if damage:  # right-aligned, as the reasons are
        text = f"damaged queue row: {printable(damage)}"
        lines.append(f"{'':>{max(0, 76 - len(text))}}({text})")
    above = len(lines)  # a reason line below this one: those without a reason say so
    for reason, addresses in sorted(groups.items(), key=lambda kv: not kv[0]):
        shown = reason or ("reason unavailable" if len(lines) > above else "")
        if shown:
            lines.append(f"{'':>{max(0, 76 - len(shown))}}({shown})")
        lines.extend(indent + a for a in addresses)
    return lines


def mailq_header(queue_id: str) -> str:
    """postqueue's headings for the layout `mailq_entry` gives this queue id."""
    return MAILQ_SHORT_HEADER if len(queue_id) < 11 else MAILQ_HEADER


def mailq_footer(total_bytes: int, count: int) -> str:
    return f"-- {total_bytes // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}."


async def _entries(store, queues: Sequence[str], selection: Selection, now: float, *, pending_only: bool,
                   warn: Warn | None) -> AsyncIterator[tuple[MessageRow, Sequence[RecipientRow]]]:
    """Each selected message with its recipients (only those still pending, with `pending_only`), a page of
    CHUNK messages and their recipients in memory at a time; `warn` told of each damaged one."""
    async for page in pages(store, queues, selection, now, ids_only=False):
        rcpts = await store.recipients_of([row.queue_id for row in page], pending_only=pending_only)
        for row in page:
            recipients = rcpts.get(row.queue_id, ())
            damage = damage_of(row, recipients)
            if damage and warn is not None:
                warn(row.queue_id, damage)
            yield row, recipients


async def write_mailq(store, out: IO[str], queues: Sequence[str], selection: Selection, now: float,
                      warn: Warn | None = None) -> int:
    """Stream the queue in mailq layout, one page of CHUNK messages in memory at a time. Returns the count."""
    count = total = 0
    async for row, recipients in _entries(store, queues, selection, now, pending_only=True, warn=warn):
        out.write(mailq_header(row.queue_id) + "\n" if count == 0 else "\n")
        out.write("\n".join(mailq_entry(row, recipients)) + "\n")
        count += 1
        total += row.size
    out.write("\n" + mailq_footer(total, count) + "\n" if count else "Mail queue is empty\n")
    return count


def entry_json(row: MessageRow, recipients: Sequence[RecipientRow]) -> dict:
    return {"id": row.queue_id, "queue": row.queue, "size": row.size, "arrival": row.arrival,
            "sender": row.sender, "attempts": row.attempts, "next_attempt": row.next_attempt,
            "recipients": [{"address": r.address, "status": r.status, "dsn": r.dsn, "reason": r.reason}
                           for r in recipients], **_damaged(row, recipients)}


def _damaged(row: MessageRow, recipients: Iterable[RecipientRow]) -> dict:
    damage = damage_of(row, recipients)
    return {"damaged": damage} if damage else {}


def entry_postqueue_json(row: MessageRow, recipients: Sequence[RecipientRow]) -> dict:
    """One message as `postqueue -j` gives it (showq_json.c): its pending recipients, `delay_reason` only when
    there is one, the null sender as MAILER-DAEMON, whole seconds. mailflow has no forced expiry."""
    return {"queue_name": row.queue, "queue_id": row.queue_id, "arrival_time": int(row.arrival),
            "message_size": row.size, "forced_expire": False, "sender": row.sender or NULL_SENDER,
            "recipients": [{"address": r.address, **({"delay_reason": r.reason} if r.reason else {})}
                           for r in recipients], **_damaged(row, recipients)}


async def write_postqueue_json(store, out: IO[str], queues: Sequence[str], selection: Selection,
                               now: float, warn: Warn | None = None) -> int:
    """`postqueue -j`: one JSON object a line, a message each, streamed; nothing for an empty queue."""
    count = 0
    async for row, recipients in _entries(store, queues, selection, now, pending_only=True, warn=warn):
        out.write(json.dumps(entry_postqueue_json(row, recipients)) + "\n")
        count += 1
    return count


async def write_list_json(store, out: IO[str], queues: Sequence[str], selection: Selection, now: float,
                          warn: Warn | None = None) -> int:
    """One JSON array, streamed: every recipient of each message with its status (sent ones too)."""
    count = 0
    out.write("[")
    async for row, recipients in _entries(store, queues, selection, now, pending_only=False, warn=warn):
        out.write(("\n" if count == 0 else ",\n") + json.dumps(entry_json(row, recipients)))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


# ---------------------------------------------------------------------------------------------- show


def ago(seconds: float) -> str:
    """A short duration: 42s, 5m03s, 2h05m, 3d04h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(ts: float, now: float) -> str:
    """'2024-05-01 12:00:01 (in 42s)' or '… (3m05s ago)', local time."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({'in ' + ago(ts - now) if ts > now else ago(now - ts) + ' ago'})"


def message_text(content: Content) -> tuple[str, Iterator[str]]:
    """(header section, the body's pieces) as text with LF line ends, the body read chunk by chunk; the empty
    line between them belongs to neither. (The line-end conversion is the transports' encode.py: importing it
    loads the transports package, the SMTP client, dnspython and cryptography with it, ~100 ms that mailq and
    sendmail -bp, which show no message, would pay.)"""
    from mailflow.transports.encode import ToLf, encode

    head, _ = read_header(content, HEADER_READ_LIMIT)
    rest = content.after(len(head))
    first = rest.read_prefix(2)
    blank = 2 if first == b"\r\n" else 1 if first[:1] == b"\n" else 0
    return _text(head), _texts(encode(rest.after(blank).chunks(), ToLf()))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


def _texts(chunks: Iterable[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def _envelope(detail: MessageDetail, recipients: Sequence[RecipientRow]) -> dict:
    d = detail
    return {**_damaged(d, recipients),
            "id": d.queue_id, "queue": d.queue, "size": d.size, "arrival": d.arrival, "created": d.created,
            "sender": d.sender,
            "attempts": d.attempts, "next_attempt": d.next_attempt, "client": d.client, "envid": d.envid,
            "ret": d.ret, "smtputf8": d.smtputf8, "body_type": d.body_type, "warned": d.warned,
            "recipients": [{k: v for k, v in dataclasses.asdict(r).items() if k != "damage"} for r in recipients],
            "headers": None, "body": None}


_BODY_PLACE = "\x00body\x00"  # where write_show_json streams the body into its JSON


SHOW_PARTS = frozenset({"envelope", "header", "body"})  # postcat's -e, -h, -b; all three by default (-beh)
HEADERS_ONLY = frozenset({"envelope", "header"})  # `show --headers-only` (postcat -eh)


def write_show_json(out: IO[str], detail: MessageDetail, recipients: Sequence[RecipientRow], content: Content | None,
                    parts: Collection[str] = SHOW_PARTS) -> None:
    """The message as one JSON object (`mailflow queue show --json`), the body streamed into it; `headers` is null
    without the "header" part, `body` without the "body" part (the envelope is the object itself)."""
    shown = _envelope(detail, recipients)
    body: Iterator[str] = iter(())
    if content is not None:
        headers, body = message_text(content)
        if "header" in parts:
            shown["headers"] = headers
        if "body" in parts:
            shown["body"] = _BODY_PLACE
    before, place, after = json.dumps(shown, indent=2).partition(json.dumps(_BODY_PLACE))
    out.write(before)
    if place:
        out.write('"')
        for text in body:
            out.write(json.dumps(text)[1:-1])
        out.write('"')
    out.write(after + "\n")


def write_show(out: IO[str], detail: MessageDetail, recipients: Sequence[RecipientRow], content: Content | None,
               parts: Collection[str], now: float) -> None:
    """The `parts` of the message as postcat prints them: with the envelope, in its `*** … ***` sections
    (envelope and recipients, then the headers and the body asked for); without it, the header section and the
    body (from the empty line that ends the header section, as postcat -b starts there) bare, so that `show -b` is
    the body alone and `show -bh` the message as queued. The body is streamed."""
    where = f"{detail.queue}/{detail.queue_id}"
    envelope = "envelope" in parts
    if envelope:
        out.write("\n".join(_envelope_lines(detail, recipients, now)) + "\n")
    if content is None:
        if envelope:
            out.write(f"*** MESSAGE CONTENTS {where}: missing (a corrupt entry) ***\n")
        return
    head, pieces = message_text(content)
    if envelope:
        out.write(f"*** MESSAGE CONTENTS {where} ***\n")
    if "header" in parts:
        out.write(_printable_lines(head))
    if "body" in parts:
        out.write("\n")
        ends_in_newline = True
        for text in (_printable_lines(piece) for piece in pieces):
            out.write(text)
            ends_in_newline = text.endswith("\n")
        if not ends_in_newline:
            out.write("\n")
    if envelope:
        out.write(f"*** MESSAGE FILE END {where} ***\n")


def _envelope_lines(d: MessageDetail, recipients: Sequence[RecipientRow], now: float) -> list[str]:
    """show's envelope section, from its `*** ENVELOPE RECORDS … ***` line: the message's fields, then each
    recipient with its status and last reason."""
    if d.queue == "hold":
        due = "- (on hold: `mailflow queue release` makes it due)"
    elif d.queue == "corrupt":
        due = "- (corrupt: kept for inspection)"
    elif d.queue == "active":
        due = "- (being delivered now)"
    elif d.queue == "maildrop":
        due = "- (requeued: pickup copies it to a new queue id)"
    else:
        due = when(d.next_attempt, now) if d.next_attempt > now else "now"
    damage = damage_of(d, recipients)
    lines = [f"*** ENVELOPE RECORDS {d.queue}/{d.queue_id} ***",
             f"queue_id:       {d.queue_id}",
             f"queue:          {d.queue}",
             *([f"damaged:        {printable(damage)}"] if damage else []),
             f"message_size:   {d.size}",
             f"arrival_time:   {when(d.arrival, now)}",
             f"create_time:    {when(d.created, now)}",  # (postcat prints it for every queue file)
             f"sender:         {printable(d.sender) if d.sender else NULL_SENDER}",
             f"client:         {printable(d.client) or '-'}",
             f"attempts:       {d.attempts}",
             f"next_attempt:   {due}",
             f"body_type:      {d.body_type}"]
    if d.envid or d.ret:
        lines.append(f"dsn:            envid={printable(d.envid) or '-'} ret={d.ret or '-'}")
    for r in recipients:
        lines.append(f"recipient:      {printable(r.address)}")
        if r.original and r.original != r.address:
            lines.append(f"  original:     {printable(r.original)}")
        if r.notify or r.orcpt:  # (as postcat's notify_flags and dsn_orig_rcpt)
            lines.append(f"  dsn:          notify={r.notify or '-'} orcpt={printable(r.orcpt) or '-'}")
        lines.append(f"  status:       {r.status}{' ' + r.dsn if r.dsn else ''}")
        if r.reason:
            lines.append(f"  reason:       {printable(r.reason)}")
    return lines


def _printable_lines(text: str) -> str:
    """Message text for a terminal: each line through printable(), its tabs kept (character by character, so
    a body can go through it piece by piece)."""
    return "\n".join("\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------- shape


def shape_limits() -> tuple[float, ...]:
    """Upper age limits in seconds of every bucket but the last (which has none)."""
    return tuple(m * 60.0 for m in SHAPE_MINUTES)


def shape_rows(counts: Iterable[ShapeCount], top: int) -> tuple[list[int], list[tuple[str, list[int]]]]:
    """The store's counts -> (the TOTAL row, the `top` biggest domains). A row is [total, bucket 1, …,
    bucket N]; domains are sorted by total, then by name length, like qshape."""
    width = len(SHAPE_LABELS)
    total = [0] * width
    by_domain: dict[str, list[int]] = {}
    for cell in counts:
        row = by_domain.setdefault(cell.domain or NULL_SENDER, [0] * width)
        for r in (row, total):
            r[0] += cell.count
            r[cell.bucket] += cell.count
    ranked = sorted(by_domain.items(), key=lambda kv: (-kv[1][0], len(kv[0]), kv[0]))
    return total, ranked[:top] if top > 0 else ranked


def format_shape(total: list[int], domains: list[tuple[str, list[int]]], width: int = 80) -> str:
    """qshape's layout: columns as wide as TOTAL's counts (at least 3), domains right-aligned in what is
    left of `width` (at least 18), a long domain cut on the left behind '+'."""
    cols = []
    for label, n in zip(SHAPE_LABELS, total):
        w = max(len(str(n)), len(label))
        cols.append(w + 1 if w > 2 else 3)
    dw = max(18, width - sum(cols))

    def line(name: str, values: Sequence) -> str:
        if len(name) > dw:
            name = "+" + name[len(name) - dw + 1:]
        return f"{name:>{dw}}" + "".join(f"{str(v):>{w}}" for v, w in zip(values, cols))

    rows = [line("", SHAPE_LABELS), line("TOTAL", total)]
    rows += [line(printable(domain), counts) for domain, counts in domains]
    return "\n".join(rows) + "\n"


def shape_json(queues: Sequence[str], total: list[int], domains: list[tuple[str, list[int]]]) -> dict:
    return {"queues": list(queues), "buckets": list(SHAPE_LABELS[1:]),
            "total": {"total": total[0], "counts": total[1:]},
            "domains": [{"domain": d, "total": c[0], "counts": c[1:]} for d, c in domains]}


# ---------------------------------------------------------------------------------------------- destinations

DESTINATION_HEADER = ("TRANSPORT", "NEXTHOP", "WINDOW", "IN-FLIGHT", "QUEUED", "FAILURES", "DEAD-UNTIL",
                      "PAUSED-UNTIL", "UPDATED", "REASON")


def format_destinations(rows: Sequence[DestinationRow], now: float) -> str:
    """An aligned table; the reason (the longest column) goes last. A dead destination says until when (DEAD-UNTIL),
    one paused by its rate delay when the pause ends (PAUSED-UNTIL)."""
    table = [DESTINATION_HEADER]
    for d in rows:
        table.append((d.transport, d.nexthop, str(d.window), str(d.in_flight), str(d.queued), str(d.failures),
                      when(d.dead_until, now) if d.dead_until else "-",
                      when(d.paused_until, now) if d.paused_until else "-", when(d.updated, now),
                      printable(d.reason) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(DESTINATION_HEADER) - 1)]
    numeric = {2, 3, 4, 5}
    lines = []
    for r in table:
        cells = [f"{c:>{w}}" if i in numeric else f"{c:<{w}}" for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def destinations_json(rows: Sequence[DestinationRow]) -> list[dict]:
    """The rows as objects: `dead_until` and `paused_until` null when the destination is not dead, not paused."""
    return [{**dataclasses.asdict(row), "dead_until": row.dead_until or None, "paused_until": row.paused_until or None}
            for row in rows]
