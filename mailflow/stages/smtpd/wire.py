"""smtpd's input side: command lines, DATA and BDAT content read from the client in chunks, strictly.

`Wire` owns the bytes received and not yet consumed (a buffer in front of aiosmtpd's StreamReader). It reads
64 KB at a time and scans for line ends and the DATA terminator with bytes methods (C speed), not line by line.

Rules (Postfix smtpd_forbid_bare_newline = reject):
- A command line ends only at CRLF. A line ended by a bare LF, or holding a bare CR, raises `WireError` with
  `521 5.5.2 ... bare <LF>/<CR> received`, fatal: the session ends.
- With `bare_lf=True` (forbid_bare_newline = false; Postfix's "normalize"), a bare LF ends a command line or a
  DATA line as CRLF would and is stored as CRLF, but DATA still ends only at CRLF "." CRLF (so no `\n.\n`
  form can end it or smuggle a second message). A bare CR is refused either way.
- A command line longer than `limit` is read to its end and discarded: `500 5.5.2 Error: line too long`.
- DATA ends only at CRLF "." CRLF. A bare LF or bare CR anywhere in the content is fatal at once (no
  `\\n.\\n`-style sequence can end the message or split it into two: nothing is queued and the session ends).
  Dot-stuffing is undone. A NUL makes the message refused (554 5.6.0) once its end has been read. Content
  beyond `max_size` is counted but not kept, and refused (552 5.3.4) after the terminator: memory stays bounded.
- BDAT chunks are read as exactly n bytes (RFC 3030: no dot-stuffing, no terminator); the same bare-newline
  and NUL rules apply to their content (as Postfix applies smtpd_forbid_bare_newline to BDAT).

Every wait for input goes through `progress`, which the session uses to enforce its deadlines. End of input
raises `ConnectionResetError`.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from mailflow import status

CHUNK = 65536
PARTIAL_LINE_KEEP = 65536  # a DATA line longer than this is passed on in pieces, never held whole
TERMINATOR = b"\r\n.\r\n"


class WireError(Exception):
    """Input that breaks the protocol. `reply` is what the client is told; `fatal`: then close the session."""

    def __init__(self, reply: status.Reply, fatal: bool):
        super().__init__(str(reply))
        self.reply = reply
        self.fatal = fatal


@dataclass
class Content:
    """Message content as read: the bytes (unstuffed), or `refusal` when it must not be queued."""

    data: bytes
    size: int
    refusal: status.Reply | None = None


def bare_newline_in(data: bytes) -> str:
    """'LF' or 'CR' when `data` holds a line end other than CRLF, else ''."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf:
        return "LF"
    if data.count(b"\r") != crlf:
        return "CR"
    return ""


class _ContentSink:
    """Collects content pieces while counting size; past `max_size` it keeps counting but drops the bytes."""

    def __init__(self, max_size: int | None):
        self.max_size = max_size
        self.pieces: list[bytes] = []
        self.size = 0
        self.nul = False

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if not self.nul and b"\0" in piece:
            self.nul = True
        if self.max_size and self.size > self.max_size:
            self.pieces.clear()
        else:
            self.pieces.append(piece)

    def result(self) -> Content:
        if self.max_size and self.size > self.max_size:
            return Content(b"", self.size, status.MESSAGE_TOO_BIG)
        if self.nul:
            return Content(b"", self.size, status.NUL_IN_DATA)
        return Content(b"".join(self.pieces), self.size)


class Wire:
    """The client's input not yet consumed. One per session; `discard()` after STARTTLS."""

    def __init__(self, reader: asyncio.StreamReader, host: str, progress: Callable[[int], None] | None = None,
                 *, bare_lf: bool = False):
        self._reader = reader
        self._host = host
        self._progress = progress or (lambda n: None)
        self._bare_lf = bare_lf
        self._buf = bytearray()

    def discard(self) -> None:
        """Drop everything received and not yet consumed (plaintext pipelined after STARTTLS, RFC 3207)."""
        self._buf.clear()

    def pending(self) -> bool:
        """True when input beyond what was consumed has already arrived (pipelining checks)."""
        return bool(self._buf) or bool(getattr(self._reader, "_buffer", b""))

    def peek(self, limit: int = 100) -> bytes:
        """The first bytes received and not consumed (for the log of a pipelining violation)."""
        return bytes(self._buf[:limit]) or bytes(getattr(self._reader, "_buffer", b""))[:limit]

    async def _fill(self) -> None:
        data = await self._reader.read(CHUNK)
        if not data:
            raise ConnectionResetError("client closed the connection")
        self._progress(len(data))
        self._buf += data

    def _bare(self, char: str) -> WireError:
        return WireError(status.bare_newline(self._host, char), fatal=True)

    async def read_line(self, limit: int) -> bytes:
        """One command line without its CRLF (limit counts the CRLF)."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                break
            if len(self._buf) > limit:
                await self._skip_line()
                raise WireError(status.LINE_TOO_LONG, fatal=False)
            start = len(self._buf)
            await self._fill()
        line = bytes(self._buf[:end + 1])
        del self._buf[:end + 1]
        if not line.endswith(b"\r\n"):
            if not self._bare_lf:
                raise self._bare("LF")
            line = line[:-1] + b"\r\n"
        if b"\r" in line[:-2]:
            raise self._bare("CR")
        if len(line) > limit:
            raise WireError(status.LINE_TOO_LONG, fatal=False)
        return line[:-2]

    async def _skip_line(self) -> None:
        """Consume input through the next LF without keeping it."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                del self._buf[:end + 1]
                return
            self._buf.clear()
            await self._fill()

    async def read_data(self, max_size: int | None) -> Content:
        """DATA content through CRLF.CRLF (the terminator is consumed; what follows stays for the next command)."""
        sink = _ContentSink(max_size)
        lead = b"\r\n"  # how the previous line ended: CRLF, a bare LF (bare_lf mode), or b"" inside a line
        while True:
            last_lf = self._buf.rfind(b"\n")
            if last_lf < 0:
                if len(self._buf) > PARTIAL_LINE_KEEP:
                    self._take_partial_line(sink, bool(lead))
                    lead = b""
                await self._fill()
                continue
            region = bytes(self._buf[:last_lf + 1])
            scan = lead + region
            end = scan.find(TERMINATOR)  # in the bytes as sent: only CRLF "." CRLF ends DATA
            if end >= 0:
                sink.add(self._unstuffed(scan[:end + 2], lead))
                del self._buf[:end + len(TERMINATOR) - len(lead)]
                return sink.result()
            sink.add(self._unstuffed(scan, lead))
            del self._buf[:last_lf + 1]
            lead = b"\r\n" if region.endswith(b"\r\n") else b"\n"
            await self._fill()

    def _unstuffed(self, scan: bytes, lead: bytes) -> bytes:
        """Complete lines (after `lead`, the previous line's end) checked, normalised and dot-unstuffed."""
        if self._bare_lf:
            scan = scan.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            lead = b"\r\n" if lead else b""
        self._check_content(scan)
        return scan.replace(b"\r\n.", b"\r\n")[len(lead):]

    def _take_partial_line(self, sink: _ContentSink, at_line_start: bool) -> None:
        """Pass on the buffered part of a very long line (keeping a trailing CR, which a LF may yet follow)."""
        keep = 1 if self._buf.endswith(b"\r") else 0
        piece = bytes(self._buf[:len(self._buf) - keep])
        if b"\r" in piece:
            raise self._bare("CR")
        if at_line_start and piece.startswith(b"."):
            piece = piece[1:]
        sink.add(piece)
        del self._buf[:len(self._buf) - keep]

    def _check_content(self, data: bytes) -> None:
        char = bare_newline_in(data)
        if char:
            raise self._bare(char)

    async def read_chunk(self, count: int, sink: _ContentSink) -> None:
        """Exactly `count` bytes of BDAT content into `sink` (never holding more than one read in memory)."""
        left = count
        while left:
            if not self._buf:
                await self._fill()
            piece = bytes(self._buf[:left])
            del self._buf[:len(piece)]
            left -= len(piece)
            sink.add(piece)

    @staticmethod
    def content_sink(max_size: int | None) -> _ContentSink:
        return _ContentSink(max_size)
