"""Message content: small messages stay in memory, big ones live in a spool file and are read as a stream.

What it owns
- `Content`: one message as an immutable sequence of parts, each bytes in memory or a byte range of a file
  (`FilePart`). Deriving one content from another (`prepend`, `after`) never copies the other's bytes.
  `before(offset)` likewise; content filters splice edited lines in this way.
  Reading never holds more than `size` (CHUNK) bytes of a file at once:
      chunks(size) -> Iterator[bytes]         sync, for worker threads (maildir, mbox)
      stream(size) -> AsyncIterator[bytes]    async; each file read runs in a worker thread
      read_prefix(n) -> bytes                 the first n bytes (header processing: sync, bounded by n)
      to_bytes() -> bytes                     all of it: for tests, tools and content known to be small
      held() -> context manager of Held       its files opened once, here: `held.content` reads them through
                                              those descriptors (`held.descriptors`, closed on exit), not by
                                              path; for a child forked to run as another user (asuser.call_as
                                              `keep`), which could not open the queue's root-only files itself
  In-memory parts are yielded as they are, without a copy (a view is turned into bytes first).
  `crlf`: its maker checked that every CR and LF in it is part of a CRLF pair (smtpd's DATA; cleanup keeps it
  for what it adds); the SMTP client then does not look for line ends to mend. Derived contents (`prepend`,
  `after`, `before`) do not carry it: False only means "not known".
- `Spool`: a message as it arrives (smtpd DATA and BDAT, pickup). Up to `memory_limit` bytes (MEMORY_LIMIT)
  stay in memory, so small messages never touch a file; past that everything goes to a temporary file
  `<directory>/.spool-<random>`, written in blocks of FLUSH_SIZE by a worker thread. Past `max_size` bytes it
  only counts (`exceeded`): memory and disk stay bounded whatever a client sends.
      append(data)            sync: copies `data` (which may be a view of the caller's buffer) into the spool
      await drain()           writes the buffer out once it is large enough (call it after append)
      await finish(crlf)      -> Content: everything appended (the store fsyncs what it keeps); `crlf`: the
                              caller checked its line ends (Content.crlf)
      discard()               closes and removes the temporary file; idempotent; always called by the owner
                              (the store keeps a message's file under a name of its own, a hard link)
  A file that cannot be written (a full disk, a permission) does not raise out of `drain`: the spool stops
  keeping data and `failure` holds the error, so the reader can finish reading the message and refuse it.
- `is_spool_name(name)`: a temporary spool file's name (the store's start-up sweep removes those).

Failures: OSError from reading a file part (its file is gone, an I/O error; `Truncated` when the file is
shorter than the part).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, NamedTuple, TypeVar, Union

from mailflow.errors import detached

CHUNK = 64 * 1024
MEMORY_LIMIT = 256 * 1024  # a message up to this size is never written to a spool file: the fast path
FLUSH_SIZE = 256 * 1024  # a spool file is written in blocks of this size
SPOOL_PREFIX = ".spool-"
T = TypeVar("T")


@dataclass(frozen=True)
class FilePart:
    """`length` bytes of the file at `path`, from `offset`; read through `fd` when set (Content.held: a descriptor
    of that file, owned by whoever opened it), else by opening `path` for each read."""

    path: str
    offset: int
    length: int
    fd: int | None = field(default=None, compare=False)


Part = Union[bytes, memoryview, FilePart]


class Truncated(OSError):
    """A file part's file ends before the part does (it was truncated or replaced)."""


def _length(part: Part) -> int:
    return part.length if isinstance(part, FilePart) else len(part)


class Content:
    """An immutable message: see the module docstring. Equal contents need not compare equal (no __eq__)."""

    __slots__ = ("parts", "size", "crlf")

    def __init__(self, parts: Iterable[Part] = (), *, crlf: bool = False):
        kept, size = [], 0
        for part in parts:
            n = part.length if isinstance(part, FilePart) else len(part)
            if n:
                kept.append(part)
                size += n
        self.parts: tuple[Part, ...] = tuple(kept)
        self.size: int = size
        self.crlf = crlf

    @classmethod
    def of(cls, data: bytes) -> "Content":
        return cls((data,))

    def __repr__(self) -> str:
        kinds = ", ".join(f"file {p.path}[{p.offset}:+{p.length}]" if isinstance(p, FilePart) else f"{len(p)} bytes"
                          for p in self.parts)
        return f"Content({self.size} bytes: {kinds})"

    @property
    def in_memory(self) -> bool:
        return not any(isinstance(p, FilePart) for p in self.parts)

    def prepend(self, data: bytes) -> "Content":
        return Content((data, *self.parts))

    def after(self, offset: int) -> "Content":
        """The content from byte `offset` on."""
        parts: list[Part] = []
        skip = offset
        for part in self.parts:
            n = _length(part)
            if skip >= n:
                skip -= n
                continue
            if skip:
                part = (replace(part, offset=part.offset + skip, length=part.length - skip)
                        if isinstance(part, FilePart) else memoryview(part)[skip:])
                skip = 0
            parts.append(part)
        return Content(parts)

    def before(self, offset: int) -> "Content":
        """The content up to byte `offset` (what `after(offset)` leaves out); nothing is copied."""
        parts: list[Part] = []
        left = offset
        for part in self.parts:
            if left <= 0:
                break
            n = _length(part)
            if n > left:
                part = replace(part, length=left) if isinstance(part, FilePart) \
                    else memoryview(part)[:left]
                n = left
            parts.append(part)
            left -= n
        return Content(parts)

    def read_prefix(self, n: int) -> bytes:
        out: list = []
        left = n
        for part in self.parts:
            if left <= 0:
                break
            data = _read_part(part, min(left, part.length), part.offset) if isinstance(part, FilePart) \
                else part[:left]
            out.append(data)
            left -= len(data)
        return b"".join(out)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        for part in self.parts:
            if not isinstance(part, FilePart):
                yield part if type(part) is bytes else bytes(part)
                continue
            if part.fd is not None:
                offset, end = part.offset, part.offset + part.length
                while offset < end:
                    data = _read_part(part, min(size, end - offset), offset)
                    offset += len(data)
                    yield data
                continue
            with open(part.path, "rb") as f:
                f.seek(part.offset)
                left = part.length
                while left:
                    data = f.read(min(size, left))
                    if not data:
                        raise Truncated(f"{part.path}: shorter than expected")
                    left -= len(data)
                    yield data

    async def stream(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        for part in self.parts:
            if not isinstance(part, FilePart):
                yield part if type(part) is bytes else bytes(part)
                continue
            offset, end = part.offset, part.offset + part.length
            while offset < end:
                data = await _in_thread(_read_part, part, min(size, end - offset), offset)
                offset += len(data)
                yield data

    def to_bytes(self) -> bytes:
        return b"".join(self.chunks())

    @contextlib.contextmanager
    def held(self) -> Iterator["Held"]:
        """See the module docstring. Raises OSError when a file cannot be opened (nothing is left open then)."""
        opened: dict[str, int] = {}
        try:
            for part in self.parts:
                if isinstance(part, FilePart) and part.fd is None and part.path not in opened:
                    opened[part.path] = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
            parts = [replace(p, fd=opened[p.path]) if isinstance(p, FilePart) and p.fd is None else p
                     for p in self.parts]
            yield Held(Content(parts, crlf=self.crlf), tuple(opened.values()))
        finally:
            for fd in opened.values():
                os.close(fd)


class Held(NamedTuple):
    """Content.held's: the content reading through `descriptors` (open until the `with` ends)."""

    content: Content
    descriptors: tuple[int, ...]


def _read_part(part: FilePart, size: int, offset: int) -> bytes:
    """`size` bytes of `part`'s file at `offset`: through its descriptor when it has one, else `_pread`."""
    if part.fd is None:
        return _pread(part.path, size, offset)
    data = os.pread(part.fd, size, offset)
    if len(data) != size:
        raise Truncated(f"{part.path}: shorter than expected")
    return data


def _pread(path: str, size: int, offset: int) -> bytes:
    """`size` bytes of `path` at `offset` (a file opened for this read only: nothing is left open if the reader
    stops half-way)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise Truncated(f"{path}: shorter than expected")
    return data


def crlf_only(data: bytes) -> bool:
    """Every CR and LF in `data` is part of a CRLF pair."""
    pairs = data.count(b"\r\n")
    return data.count(b"\n") == pairs and data.count(b"\r") == pairs


def is_spool_name(name: str) -> bool:
    return name.startswith(SPOOL_PREFIX)


class Spool:
    """See the module docstring."""

    def __init__(self, directory: str | Path, *, max_size: int | None = None, memory_limit: int = MEMORY_LIMIT):
        self._directory = directory
        self._max_size = max_size or None
        self._memory_limit = memory_limit
        self._buffer = bytearray()
        self._fd: int | None = None
        self._path: Path | None = None
        self._written = 0  # bytes in the file
        self._closed = False
        self.size = 0  # bytes appended, counted also past max_size
        self.failure: OSError | None = None

    @property
    def exceeded(self) -> bool:
        return self._max_size is not None and self.size > self._max_size

    @property
    def keeping(self) -> bool:
        """False once the spool only counts (over max_size, or a write failed)."""
        return not self.exceeded and self.failure is None

    def append(self, data) -> None:
        if self._closed:
            raise ValueError("append to a finished or discarded spool")
        self.size += len(data)
        if not self.keeping:
            self._forget()
            return
        self._buffer += data

    async def drain(self) -> None:
        if not self.keeping:
            return
        try:
            if self._fd is None:
                if len(self._buffer) <= self._memory_limit:
                    return
                self._open()
            if len(self._buffer) >= FLUSH_SIZE:
                await self._flush()
        except OSError as e:
            self.failure = detached(e)  # (kept: its traceback would hold this frame, and so the spool, a cycle)
            self._forget()

    async def finish(self, *, crlf: bool = False) -> Content:
        """The content appended; raises the write failure if there was one (check `keeping` first). `crlf`: the
        caller checked its line ends (see Content)."""
        if self.failure is not None:
            raise self.failure
        self._closed = True
        if self._fd is None:
            return Content((memoryview(self._buffer),), crlf=crlf)
        if self._buffer:
            await self._flush()
        os.close(self._fd)
        self._fd = None
        return Content((FilePart(str(self._path), 0, self._written),), crlf=crlf)

    def discard(self) -> None:
        self._closed = True
        self._forget()

    def _open(self) -> None:
        path = Path(self._directory) / f"{SPOOL_PREFIX}{secrets.token_hex(8)}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._path = path

    async def _flush(self) -> None:
        assert self._fd is not None, "flushed before the file was opened"
        data, self._buffer = self._buffer, bytearray()
        # The worker writes through its own descriptor: if this task is cancelled while it writes, discard()
        # may close ours at once without the worker ever writing to a reused descriptor number.
        await _in_thread(_write_all, os.dup(self._fd), data)
        self._written += len(data)

    def _forget(self) -> None:
        """Drop whatever is kept: the buffer, the file (closed and removed)."""
        self._buffer = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            try:
                self._path.unlink()
            except OSError:
                pass  # the start-up sweep removes what is left
            self._path = None


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """asyncio.to_thread, asyncio imported here: this module is a leaf every program loads (sendmail too, which
    never streams content through a loop and would pay ~20 ms at each start for asyncio)."""
    import asyncio

    return await asyncio.to_thread(fn, *args)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
