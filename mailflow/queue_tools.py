"""The operator tools behind `mailflow queue …`: Postfix's mailq, postsuper, postcat and qshape over the store.

What it owns
- Selections (`parse_selection`): queue ids, `ALL`, `-` (ids on stdin, as `postsuper -d -` reads them),
  and the selectors `--from`, `--to-domain`, `--older-than`, combined with AND.
- The actions (`ACTIONS`: hold, release, requeue, delete, flush): which queues each applies to, and
  `apply()`, which walks the selection in chunks of `CHUNK` ids, one store transaction each (the store
  bumps the generation counter in it, so a running qmgr rescans), with progress on stderr past
  `PROGRESS_OVER` messages.
- The reports: `write_mailq` (Postfix mailq layout), `write_list_json`, `write_show` / `write_show_json` (like
  postcat -q; the body streamed from the queue, never held whole),
  `shape_rows`/`format_shape` (qshape's age buckets and layout), `format_destinations`.

Every function that reads takes the store and a text stream; nothing here speaks SQL, and only `show`
reads message content. Formatting helpers are pure and take plain values.
"""
from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import dataclass
from typing import IO, AsyncIterator, Iterable, Iterator, Sequence

from mailflow.address import normalise_domain
from mailflow.logs import printable
from mailflow.content import Content
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.syntax import parse_duration
from mailflow.transports.encode import ToLf, encode

QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
LISTED_QUEUES = ("incoming", "active", "deferred", "hold")  # what mailq shows, like Postfix's showq
CHUNK = 1000  # ids per transaction (and per page read)
ID_CHUNK = 500  # explicit ids per IN (...) query
PROGRESS_OVER = 3000  # messages; a bigger operation reports progress on stderr

MAILQ_HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
SHAPE_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's default: -t 5 -b 10
SHAPE_LABELS = ("T", *(str(m) for m in SHAPE_MINUTES), f"{SHAPE_MINUTES[-1]}+")
NULL_SENDER = "MAILER-DAEMON"


class SelectionError(ValueError):
    """The command line does not say which messages: the message says what to give."""


# ---------------------------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class Selection:
    """Which messages: `ids` (None: any), and selectors that must all hold."""

    ids: tuple[str, ...] | None = None
    sender: str | None = None  # '' is the null sender
    rcpt_domain: str | None = None
    older_than: float | None = None  # seconds

    @property
    def everything(self) -> bool:
        return self.ids is None and self.sender is None and self.rcpt_domain is None and self.older_than is None

    def filters(self, now: float) -> dict:
        """The selectors as the store's keyword arguments."""
        return {"sender": self.sender, "rcpt_domain": self.rcpt_domain,
                "arrived_before": None if self.older_than is None else now - self.older_than}


_ID = re.compile(r"[0-9A-Za-z]+")


def clean_id(token: str) -> str:
    """A queue id as typed or pasted from mailq (a trailing `*` or `!` is dropped)."""
    qid = token.strip().rstrip("*!")
    if not _ID.fullmatch(qid):
        raise SelectionError(f"{token!r} is not a queue id")
    return qid


def parse_sender(value: str) -> str:
    """'<a@b>' -> 'a@b'; '<>', '' and MAILER-DAEMON -> '' (the null sender)."""
    v = value.strip()
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1].strip()
    return "" if v.upper() == NULL_SENDER else v


def parse_domain(value: str) -> str:
    d = normalise_domain(value.strip().lstrip("@"))
    if not d:
        raise SelectionError(f"{value!r} is not a domain")
    return d


def parse_age(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise SelectionError(f"--older-than: {e}") from None


def parse_selection(args: Sequence[str], *, sender: str | None = None, to_domain: str | None = None,
                    older_than: str | None = None, stdin: IO[str] | None = None, required: bool = True) -> Selection:
    """Queue ids, `ALL` or `-` (ids from `stdin`, one or more a line) plus selectors -> a Selection.

    `required`: refuse an empty selection (a bare `mailflow queue delete` must not mean everything).
    """
    everything = "ALL" in args
    tokens = [a for a in args if a not in ("ALL", "-")]
    if "-" in args:
        if stdin is None:
            raise SelectionError("'-' reads queue ids from standard input, but there is none")
        tokens += [t for line in stdin for t in line.split()]
    if everything and tokens:
        raise SelectionError("give either queue ids or ALL, not both")
    ids = tuple(dict.fromkeys(clean_id(t) for t in tokens)) if tokens or "-" in args else None
    selection = Selection(
        ids=ids,
        sender=None if sender is None else parse_sender(sender),
        rcpt_domain=None if to_domain is None else parse_domain(to_domain),
        older_than=None if older_than is None else parse_age(older_than),
    )
    if required and selection.everything and not everything:
        raise SelectionError("say which messages: queue ids, ALL, '-' (ids on stdin), "
                             "or a selector (--from, --to-domain, --older-than)")
    return selection


def parse_queues(value: str) -> tuple[str, ...]:
    """'incoming,deferred' -> ('incoming', 'deferred'); 'all' -> every queue."""
    names = tuple(dict.fromkeys(q.strip().lower() for q in value.split(",") if q.strip()))
    if names == ("all",):
        return QUEUES
    bad = [q for q in names if q not in QUEUES]
    if bad or not names:
        raise SelectionError(f"unknown queue {', '.join(bad) or repr(value)} (use {', '.join(QUEUES)})")
    return names


async def pages(store, queues: Sequence[str], selection: Selection, now: float, *, ids_only: bool,
                size: int = CHUNK) -> AsyncIterator[list]:
    """The selected messages in id order, a page at a time: message rows, or ids when `ids_only`."""
    fetch = store.message_ids if ids_only else store.message_page
    filters = selection.filters(now)
    if selection.ids is not None:
        for i in range(0, len(selection.ids), ID_CHUNK):
            chunk = sorted(selection.ids[i:i + ID_CHUNK])
            page = await fetch(queues=queues, ids=chunk, limit=len(chunk), **filters)
            if page:
                yield page
        return
    after = ""
    while True:
        page = await fetch(queues=queues, after=after, limit=size, **filters)
        if not page:
            return
        yield page
        after = page[-1] if ids_only else page[-1][0]


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    name: str
    sources: tuple[str, ...]  # the queues it applies to
    method: str  # the Store coroutine: (ids) or (ids, now)
    needs_now: bool


ACTIONS = {
    "hold": Action("hold", ("incoming", "active", "deferred"), "hold_messages", False),
    "release": Action("release", ("hold",), "release_messages", True),
    "requeue": Action("requeue", ("incoming", "deferred", "hold"), "requeue_messages", True),
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
                chunk: int = CHUNK, progress_over: int = PROGRESS_OVER) -> tuple[int, list[str]]:
    """Apply `action` to the selection, `chunk` ids per transaction. Returns (how many messages it took,
    the explicitly named ids that were not in one of its queues)."""
    change = getattr(store, action.method)
    if selection.ids is not None:
        total = len(selection.ids)
    else:
        total = await store.count_messages(queues=action.sources, **selection.filters(now))
    progress = Progress(err, action.name, total) if total > progress_over else None
    done, seen = 0, set()
    async for ids in pages(store, action.sources, selection, now, ids_only=True, size=chunk):
        await (change(ids, now) if action.needs_now else change(ids))
        done += len(ids)
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


# ---------------------------------------------------------------------------------------------- mailq


def mailq_time(ts: float) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(ts))


def mailq_entry(row: tuple, recipients: Iterable[tuple]) -> list[str]:
    """One message in Postfix's mailq layout (postqueue's formats: `%-11s %7ld %20.20s %s` for short ids,
    `%-17s %8ld %19.19s %s` for long ones such as ours; recipients indented to the sender's column).
    `row` as Store.message_page gives it; `recipients` its pending (address, original, status, dsn, reason). Recipients are grouped under their last reason (shown
    once, right-aligned like Postfix); those without a reason come last."""
    qid, queue, size, arrival, sender = row[:5]
    mark = {"active": "*", "hold": "!"}.get(queue, " ")
    who = printable(sender) if sender else NULL_SENDER
    if len(qid) < 11:  # Postfix's two layouts: short queue ids, and long ones (enable_long_queue_ids)
        first = f"{qid + mark:<11} {size:>7} {mailq_time(arrival):<20} {who}"
    else:
        first = f"{qid + mark:<17} {size:>8} {mailq_time(arrival):<19} {who}"
    indent = " " * (len(first) - len(who))
    groups: dict[str, list[str]] = {}
    for address, _original, _status, _dsn, reason in recipients:
        groups.setdefault(printable(reason), []).append(printable(address))
    lines = [first]
    for reason, addresses in sorted(groups.items(), key=lambda kv: not kv[0]):
        if reason:
            lines.append(f"{'':>{max(0, 76 - len(reason))}}({reason})")
        lines.extend(indent + a for a in addresses)
    return lines


def mailq_footer(total_bytes: int, count: int) -> str:
    return f"-- {total_bytes // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}."


async def write_mailq(store, out: IO[str], queues: Sequence[str], selection: Selection, now: float) -> int:
    """Stream the queue in mailq layout, one page of CHUNK messages in memory at a time. Returns the count."""
    count = total = 0
    async for page in pages(store, queues, selection, now, ids_only=False):
        rcpts = await store.recipients_of([r[0] for r in page], pending_only=True)
        for row in page:
            out.write(MAILQ_HEADER + "\n" if count == 0 else "\n")
            out.write("\n".join(mailq_entry(row, rcpts.get(row[0], ()))) + "\n")
            count += 1
            total += row[2]
    out.write("\n" + mailq_footer(total, count) + "\n" if count else "Mail queue is empty\n")
    return count


def entry_json(row: tuple, recipients: Iterable[tuple]) -> dict:
    qid, queue, size, arrival, sender, next_attempt, attempts = row[:7]
    return {"id": qid, "queue": queue, "size": size, "arrival": arrival, "sender": sender,
            "attempts": attempts, "next_attempt": next_attempt,
            "recipients": [{"address": a, "status": s, "dsn": d, "reason": r} for a, _o, s, d, r in recipients]}


async def write_list_json(store, out: IO[str], queues: Sequence[str], selection: Selection, now: float) -> int:
    """One JSON array, streamed: every recipient of each message with its status (sent ones too)."""
    count = 0
    out.write("[")
    async for page in pages(store, queues, selection, now, ids_only=False):
        rcpts = await store.recipients_of([r[0] for r in page])
        for row in page:
            out.write(("\n" if count == 0 else ",\n") + json.dumps(entry_json(row, rcpts.get(row[0], ()))))
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
    line between them belongs to neither."""
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


def _envelope(detail: tuple, recipients: Iterable[tuple]) -> dict:
    qid, queue, size, arrival, sender, next_attempt, attempts, client, envid, ret, utf8, body_type, warned = detail
    return {"id": qid, "queue": queue, "size": size, "arrival": arrival, "sender": sender, "attempts": attempts,
            "next_attempt": next_attempt, "client": client, "envid": envid, "ret": ret, "smtputf8": bool(utf8),
            "body_type": body_type, "warned": bool(warned),
            "recipients": [{"address": a, "original": o, "status": s, "dsn": d, "reason": r}
                           for a, o, s, d, r in recipients],
            "headers": None, "body": None}


_BODY_PLACE = "\x00body\x00"  # where write_show_json streams the body into its JSON


def write_show_json(out: IO[str], detail: tuple, recipients: Iterable[tuple], content: Content | None,
                    headers_only: bool) -> None:
    """The message as one JSON object (`mailflow queue show --json`), the body streamed into it."""
    shown = _envelope(detail, recipients)
    body: Iterator[str] = iter(())
    if content is not None:
        shown["headers"], body = message_text(content)
        if not headers_only:
            shown["body"] = _BODY_PLACE
    before, place, after = json.dumps(shown, indent=2).partition(json.dumps(_BODY_PLACE))
    out.write(before)
    if place:
        out.write('"')
        for text in body:
            out.write(json.dumps(text)[1:-1])
        out.write('"')
    out.write(after + "\n")


def write_show(out: IO[str], detail: tuple, recipients: Iterable[tuple], content: Content | None,
               headers_only: bool, now: float) -> None:
    """Envelope, recipients, headers and body, in postcat's `*** … ***` sections; the body streamed."""
    qid, queue, size, arrival, sender, next_attempt, attempts, client, envid, ret, _utf8, body_type, _w = detail
    where = f"{queue}/{qid}"
    if queue == "hold":
        due = "- (on hold: `mailflow queue release` makes it due)"
    elif queue == "corrupt":
        due = "- (corrupt: kept for inspection)"
    elif queue == "active":
        due = "- (being delivered now)"
    else:
        due = when(next_attempt, now) if next_attempt > now else "now"
    lines = [f"*** ENVELOPE RECORDS {where} ***",
             f"queue_id:       {qid}",
             f"queue:          {queue}",
             f"message_size:   {size}",
             f"arrival_time:   {when(arrival, now)}",
             f"sender:         {printable(sender) if sender else NULL_SENDER}",
             f"client:         {printable(client) or '-'}",
             f"attempts:       {attempts}",
             f"next_attempt:   {due}",
             f"body_type:      {body_type}"]
    if envid or ret:
        lines.append(f"dsn:            envid={printable(envid) or '-'} ret={ret or '-'}")
    for address, original, status, dsn, reason in recipients:
        lines.append(f"recipient:      {printable(address)}")
        if original and original != address:
            lines.append(f"  original:     {printable(original)}")
        lines.append(f"  status:       {status}{' ' + dsn if dsn else ''}")
        if reason:
            lines.append(f"  reason:       {printable(reason)}")
    if content is None:
        lines.append(f"*** MESSAGE CONTENTS {where}: missing (a corrupt entry) ***")
        out.write("\n".join(lines) + "\n")
        return
    head, pieces = message_text(content)
    head, body = _printable_lines(head), (_printable_lines(piece) for piece in pieces)
    lines.append(f"*** MESSAGE CONTENTS {where} ***")
    out.write("\n".join(lines) + "\n" + head)
    if not headers_only:
        out.write("\n")
        ends_in_newline = True
        for text in body:
            out.write(text)
            ends_in_newline = text.endswith("\n")
        if not ends_in_newline:
            out.write("\n")
    out.write(f"*** MESSAGE FILE END {where} ***\n")


def _printable_lines(text: str) -> str:
    """Message text for a terminal: each line through printable(), its tabs kept (character by character, so
    a body can go through it piece by piece)."""
    return "\n".join("\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n"))


# ---------------------------------------------------------------------------------------------- shape


def shape_limits() -> tuple[float, ...]:
    """Upper age limits in seconds of every bucket but the last (which has none)."""
    return tuple(m * 60.0 for m in SHAPE_MINUTES)


def shape_rows(counts: Iterable[tuple[str, int, int]], top: int) -> tuple[list[int], list[tuple[str, list[int]]]]:
    """(domain, bucket, n) triples -> (the TOTAL row, the `top` biggest domains). A row is
    [total, bucket 1, …, bucket N]; domains are sorted by total, then by name length, like qshape."""
    width = len(SHAPE_LABELS)
    total = [0] * width
    by_domain: dict[str, list[int]] = {}
    for domain, bucket, n in counts:
        row = by_domain.setdefault(domain or NULL_SENDER, [0] * width)
        for r in (row, total):
            r[0] += n
            r[bucket] += n
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
                      "UPDATED", "REASON")


def format_destinations(rows: Sequence[tuple], now: float) -> str:
    """An aligned table; the reason (the longest column) goes last."""
    table = [DESTINATION_HEADER]
    for transport, nexthop, window, in_flight, queued, failures, dead_until, reason, updated in rows:
        table.append((transport, nexthop, str(window), str(in_flight), str(queued), str(failures),
                      when(dead_until, now) if dead_until else "-", when(updated, now), printable(reason) or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(DESTINATION_HEADER) - 1)]
    numeric = {2, 3, 4, 5}
    lines = []
    for r in table:
        cells = [f"{c:>{w}}" if i in numeric else f"{c:<{w}}" for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def destinations_json(rows: Sequence[tuple]) -> list[dict]:
    keys = ("transport", "nexthop", "window", "in_flight", "queued", "failures", "dead_until", "reason", "updated")
    out = []
    for row in rows:
        d = dict(zip(keys, row))
        d["dead_until"] = d["dead_until"] or None
        out.append(d)
    return out
