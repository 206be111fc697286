"""Message content in the queue: `content` rows, and the content files of big messages beside the database.

The layout
- A message up to MEMORY_LIMIT bytes (mailflow.content) lives in its `content` row: `data` (the header section
  cleanup wrote) and `body` (the rest), two BLOBs so that neither is copied into the other. A bigger one keeps
  `data` in the row and the rest in the file `content/<queue id>` (`file_offset`: where the rest starts in it).
  That file is a hard link to the spool file the message arrived in (or, for a forwarded copy, to the
  original's file): queuing never copies a big message. A row made by schema v1 has the whole message in `data`.

Functions
- `storable(msg, content_dir, temporaries)`: the message with content the writer can link in (its file part,
  if any, last, whole, in content/, fsynced); anything else is first copied into a new spool file (added to
  `temporaries`, which the caller discards after the commit).
- `insert_ops(messages)`: the statements that add new messages (message, recipient, content rows, and the
  `LINK_CONTENT` pseudo-statement that links their files in before the transaction); a message row holds its
  client attributes in `CLIENT_COLUMNS` (`client_values`).
- `content_of(queue_id, data, body, file_offset, content_dir, size)`: a row as a Content (its file part read
  lazily); None when its file is missing or its length disagrees with the message's size (logged: a corrupt
  entry). `row_content(data, body)`: one without a
  file.
- `sweep(content_dir, kept)`: remove temporary spool files and content files whose row is gone.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from mailflow.content import Content, FilePart, Spool, is_spool_name
from mailflow.model import ClientAttributes, NewMessage
from mailflow.store.engine import LINK_CONTENT, Op, fsync_path

log = logging.getLogger("mailflow.store")


async def storable(msg: NewMessage, content_dir: Path, temporaries: list[Spool]) -> NewMessage:
    """`msg` with content the writer can link in: its file part (if any) last, whole, in content/, and
    fsynced. Anything else is copied into a new spool file first (added to `temporaries`)."""
    content = msg.content
    if content.in_memory:
        return msg
    if not _linkable(content, content_dir):
        head = b"".join(p for p in _leading_bytes(content.parts))
        spool = Spool(content_dir, memory_limit=0)
        temporaries.append(spool)
        async for chunk in content.after(len(head)).stream():
            spool.append(chunk)
            await spool.drain()
        content = Content((head, *(await spool.finish()).parts))
        msg = dataclasses.replace(msg, content=content)
    file = content.parts[-1]
    assert isinstance(file, FilePart)  # linkable, or just made so
    await asyncio.to_thread(fsync_path, file.path)
    return msg


# The message row's columns of its ClientAttributes, in the order of `client_values`.
CLIENT_COLUMNS = ("client_name", "client_address", "client_port", "helo_name", "protocol_name", "sasl_method",
                  "sasl_username", "sasl_sender")


# The columns a new message row is written with, in the order of `insert_ops`'s values.
_INSERT_COLUMNS = ("id", "queue", "sender", "arrival", "created", "next_attempt", "size", "smtputf8", "body_type",
                   "client", "envid", "ret", "filter", "from_logged", *CLIENT_COLUMNS)
_INSERT_MESSAGE = (f"INSERT INTO message ({', '.join(_INSERT_COLUMNS)})"
                   f" VALUES ({', '.join('?' * len(_INSERT_COLUMNS))})")


def client_values(c: ClientAttributes) -> tuple[str, ...]:
    return c.name, c.address, c.port, c.helo, c.protocol, c.sasl_method, c.sasl_username, c.sasl_sender


def _created(m: NewMessage) -> float:
    """The base of its queue lifetime and backoff; also its first next_attempt (incoming mail goes in that order)."""
    return m.arrival if m.created is None else m.created


def insert_ops(messages: Sequence[NewMessage]) -> list[Op]:
    content_rows, links = [], []
    for m in messages:
        data, body, file = _content_row(m.content)
        content_rows.append((m.queue_id, data, body, None if file is None else file.offset))
        if file is not None:
            links.append((file.path, m.queue_id))
    return [
        (_INSERT_MESSAGE,
         [(m.queue_id, m.queue, m.sender, m.arrival, _created(m), _created(m), m.content.size, int(m.smtputf8),
           m.body_type, m.client, m.envid, m.ret, m.content_filter, int(m.queue != "hold"),
           *client_values(m.client_attributes))
          for m in messages]),
        ("INSERT INTO recipient (message_id, idx, address, original, notify, orcpt) VALUES (?, ?, ?, ?, ?, ?)",
         [(m.queue_id, r.index, r.address, r.original, r.notify, r.orcpt) for m in messages for r in m.recipients]),
        (LINK_CONTENT, links),
        ("INSERT INTO content (message_id, data, body, file_offset) VALUES (?, ?, ?, ?)", content_rows),
    ]


def content_of(queue_id: str, data: bytes, body: bytes | None, file_offset: int | None,
               content_dir: Path, size: int | None = None) -> Content | None:
    """A content row as a Content; None (logged) when its file is missing, or is not as long as the message's
    `size` (its row's) says: a file cut short or grown is damaged, never delivered as if it were the message."""
    if file_offset is None:
        return row_content(data, body)
    path = content_dir / queue_id
    try:
        file_size = os.stat(path).st_size
    except FileNotFoundError:
        log.error("%s: content file %s is missing", queue_id, path)
        return None
    parts = _row_parts(data, body)
    if size is not None and sum(map(len, parts)) + file_size - file_offset != size:
        log.error("%s: content file %s has %d bytes, %d expected", queue_id, path, file_size,
                  size - sum(map(len, parts)) + file_offset)
        return None
    return Content((*parts, FilePart(str(path), file_offset, file_size - file_offset)))


def row_content(data: bytes, body: bytes | None) -> Content:
    """A content row without a file (`file_offset` NULL) as a Content."""
    return Content(_row_parts(data, body))


def _row_parts(data: bytes, body: bytes | None) -> tuple[bytes, ...]:
    return (data,) if body is None else (data, body)


def sweep(content_dir: Path, kept: set[str]) -> int:
    """Remove temporary spool files and content files not in `kept` (the ids of rows with a file). Returns how
    many files were removed."""
    removed = 0
    for entry in os.scandir(content_dir):
        if is_spool_name(entry.name) or entry.name not in kept:
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError as e:
                log.error("store: cannot remove %s: %s", entry.path, e)
    if removed:
        log.info("store: removed %d content files left by an earlier run", removed)
    return removed


def _content_row(content: Content) -> tuple:
    """(data, body, file part) of a content row. In memory: the first part and the rest (joined only when
    there are several); with a file: every part before it (the header section) and the file part, last."""
    parts = content.parts
    file = parts[-1] if parts and isinstance(parts[-1], FilePart) else None
    in_row = [p for p in (parts[:-1] if file else parts) if not isinstance(p, FilePart)]
    if len(in_row) != len(parts) - (file is not None):
        raise ValueError(f"content not prepared for the store: {content!r}")
    if file is not None:
        return (in_row[0] if len(in_row) == 1 else b"".join(in_row)), None, file
    rest = in_row[1:]
    body = None if not rest else rest[0] if len(rest) == 1 else b"".join(rest)
    return (in_row[0] if in_row else b""), body, None


def _leading_bytes(parts: Iterable) -> list:
    out = []
    for part in parts:
        if isinstance(part, FilePart):
            break
        out.append(part)
    return out


def _linkable(content: Content, content_dir: Path) -> bool:
    """Whether the writer can hard-link the content's file part as it is: the only file part, last, in the
    content directory and running to the file's end."""
    *head, last = content.parts
    if not isinstance(last, FilePart) or any(isinstance(p, FilePart) for p in head):
        return False
    path = Path(last.path)
    return path.parent == content_dir and os.stat(path).st_size == last.offset + last.length
