"""Message content for tests, and where it ends up.

- `big_message(size)`: a message bigger than the in-memory limit whose lines exercise every content transformation
  (leading dots, From_ lines, '>' runs, a line longer than a read); `spooled(directory, data)` is such content as
  the store keeps it (header section in memory, the rest in a file).
- `maildir_messages(maildir)`: the messages in a Maildir's new/, oldest name first.
- `lookups_seen(monkeypatch, module)`: each `module.lookup_action` call's key (its first 5 characters) and whether
  it ran on the main thread (the event loop's), in order: the content checks' long keys go to a worker thread.
"""
from __future__ import annotations

import random
import threading
from pathlib import Path

from mailflow.content import Content, FilePart
from mailflow.message import split_header


def big_message(size: int = 1_000_000, seed: int = 1, long_line: bool = True) -> bytes:
    """A CRLF message of about `size` bytes; its body lines start with '.', 'From ', '>From ', '>>' now and then,
    and (`long_line`) one is 100 KB long, so that chunk boundaries fall everywhere that matters. (aiosmtpd
    peers refuse lines over 1000 bytes.)"""
    rng = random.Random(seed)
    starts = [b"", b"", b"", b".", b"..", b"From ", b">From ", b">>", b"F", b"x"]
    lines = [b"Subject: big %d\r\nX-Big: yes\r\n\r\n" % seed]
    total = len(lines[0])
    while total < size:
        line = rng.choice(starts) + b"w" * rng.randint(0, 120) + b" \xc3\xa9" * rng.randint(0, 2) + b"\r\n"
        if len(lines) == 300 and long_line:
            line = b"L" * 100_000 + b"\r\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def spooled(directory: Path, data: bytes) -> Content:
    """`data` as the store keeps a big message: the header section in memory, the rest in a file."""
    head, _ = split_header(data)
    path = directory / f"spooled-{len(data)}"
    path.write_bytes(data)
    return Content((head, FilePart(str(path), len(head), len(data) - len(head))))


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def lookups_seen(monkeypatch, module) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []
    lookup = module.lookup_action

    def recorded(tables, key):
        seen.append((key[:5], threading.current_thread() is threading.main_thread()))
        return lookup(tables, key)

    monkeypatch.setattr(module, "lookup_action", recorded)
    return seen
