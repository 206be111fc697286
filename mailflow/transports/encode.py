"""The content transformations delivery agents apply, chunk by chunk, the line state carried across chunks.

An encoder is sans-IO: `feed(chunk) -> bytes` gives what can go out now, `flush() -> bytes` what is left at the
end. None holds back more than a few bytes (a CR that a LF may follow, the start of a line that may become
`From `), so memory stays bounded whatever the message and its line lengths.

    ToLf()              CRLF -> LF (mailbox files, commands' input)
    SmtpData(crlf)      the content of DATA (smtp, lmtp): every line end made CRLF, a line longer than
                        LINE_LIMIT (998) octets broken with CRLF SPACE (Postfix's smtp_line_length_limit; RFC
                        5321 4.5.3.1.6), a leading '.' doubled (RFC 5321 4.5.2), a final CRLF; the caller sends
                        ".\\r\\n" after it. `crlf`: the content's line ends are known to be CRLF already
                        (Content.crlf): not looked at again
    QuoteLines(starts, could_start, mark)   on LF text: `mark` inserted at the start of each line that starts
                        with the regex `starts`; `could_start` fully matches what may still become such a start
    mboxrd_quoting()    `>*From ` lines get one more '>' (mbox files, see mailflow.transports.local.mbox)
    from_quoting()      `From ` lines get a '>' (pipe flag >)   dot_quoting()  '.' doubled (pipe flag .)
    FinalNewline()      a LF at the end when the content does not end in one
    encode(chunks, *encoders) / aencode(async chunks, *encoders, off_loop=False)   the chunks through the encoders
                        in order (`off_loop`: in a worker thread, chunk by chunk)
"""
from __future__ import annotations

import re
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Protocol

from mailflow.content import crlf_only

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
LINE_LIMIT = 998  # octets of a line sent in DATA, its CRLF not counted (RFC 5321 4.5.3.1.6)
MAX_HOLD = 64  # QuoteLines: past this the held line start can only be a run of '>' (mboxrd): sent on


class Encoder(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class ToLf:
    def __init__(self) -> None:
        self._cr = False  # the last chunk ended in CR

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        return b"\r" if self._cr else b""


class SmtpData:
    def __init__(self, crlf: bool = False) -> None:
        self._mend = not crlf  # look for bare CR and LF (three counts: ~0.2 ms per 100 KB)
        self._cr = False  # the last chunk ended in CR (a lone one, or the first half of a CRLF)
        self._line_start = True
        self._sent = False
        self._column = 0  # octets of the line under way (before dot-stuffing)

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data, self._cr = b"\r" + data, False
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], True
        if not data:
            return b""
        if self._mend and not crlf_only(data):
            data = _LINE_ENDINGS.sub(b"\r\n", data)
        if _has_long_line(data, self._column):  # (rare: ~25 us per 100 KB to tell)
            data = _fold_long_lines(data, self._column)
        last_end = data.rfind(b"\n")
        self._column = len(data) - last_end - 1 if last_end >= 0 else self._column + len(data)
        if b"." in data:  # (memchr: a chunk without dots, such as base64, is not scanned again)
            data = data.replace(b"\n.", b"\n..")
        if self._line_start and data[:1] == b".":
            data = b"." + data
        self._line_start = data.endswith(b"\n")
        self._sent = True
        return data

    def flush(self) -> bytes:
        if self._cr:  # a lone CR at the very end
            self._cr, self._line_start, self._sent = False, True, True
            return b"\r\n"
        return b"" if self._line_start and self._sent else b"\r\n"


def _has_long_line(data: bytes, column: int) -> bool:
    """Whether a line of CRLF-ended `data` (whose first line already had `column` octets) is longer than
    LINE_LIMIT: one backward search per LINE_LIMIT octets, for the last line end within reach."""
    start, reach = 0, LINE_LIMIT + 2 - column  # a line may span LINE_LIMIT octets and its CRLF
    while start + reach < len(data):
        end = data.rfind(b"\n", start, start + reach)
        if end < 0:
            return True
        start, reach = end + 1, LINE_LIMIT + 2
    last_end = data.rfind(b"\n")  # the line still under way at the end of the chunk, so far
    return len(data) - last_end - 1 + (column if last_end < 0 else 0) > LINE_LIMIT


def _fold_long_lines(data: bytes, column: int) -> bytes:
    """Each line longer than LINE_LIMIT broken into pieces of at most LINE_LIMIT octets, every piece after the
    first begun with a space: CRLF SPACE inserted, as Postfix's smtp client does."""
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        complete = i < len(lines) - 1
        text = line[:-1] if complete and line.endswith(b"\r") else line
        first = max(LINE_LIMIT - (column if i == 0 else 0), 0)
        pieces = [text[:first]] + [b" " + text[at:at + LINE_LIMIT - 1]
                                   for at in range(first, len(text), LINE_LIMIT - 1)]
        out.append(b"\r\n".join(pieces) + (b"\r" if complete else b""))
    return b"\n".join(out)


class QuoteLines:
    def __init__(self, starts: bytes, could_start: bytes, mark: bytes):
        self._at_start = re.compile(rb"(?m)^(?=" + starts + rb")")
        self._after_lf = re.compile(rb"(?<=\n)(?=" + starts + rb")")
        self._could = re.compile(could_start)
        self._mark = mark
        self._line_start = True
        self._held = b""  # the start of a line that may still become one to quote

    def feed(self, data: bytes) -> bytes:
        text, self._held = self._held + data, b""
        if not text:
            return b""
        last = text.rfind(b"\n") + 1  # the start of the last, unfinished line
        if last or self._line_start:
            tail = text[last:]
            if tail and self._could.fullmatch(tail):
                # Undecided. Quoting inserts the mark at the line start, which for a run of '>' is the same
                # as inserting it after the run: a long run goes on, the rest (a partial "From") waits.
                keep = len(tail) if len(tail) <= MAX_HOLD else 4
                self._held, text = text[len(text) - keep:], text[:len(text) - keep]
        pattern = self._at_start if self._line_start else self._after_lf
        out = pattern.sub(self._mark, text) if text else b""
        self._line_start = bool(self._held) or (text.endswith(b"\n") if text else self._line_start)
        return out

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held  # an unfinished line that never became one to quote


def mboxrd_quoting() -> QuoteLines:
    return QuoteLines(rb">*From ", rb">*(?:F(?:r(?:o(?:m)?)?)?)?", b">")


def from_quoting() -> QuoteLines:
    return QuoteLines(rb"From ", rb"F(?:r(?:o(?:m)?)?)?", b">")


def dot_quoting() -> QuoteLines:
    return QuoteLines(rb"\.", rb"(?!)", b".")


class FinalNewline:
    def __init__(self) -> None:
        self._ends_in_newline = True  # nothing yet: nothing to end

    def feed(self, data: bytes) -> bytes:
        if data:
            self._ends_in_newline = data.endswith(b"\n")
        return data

    def flush(self) -> bytes:
        return b"" if self._ends_in_newline else b"\n"


def _through(data: bytes, encoders: tuple[Encoder, ...]) -> bytes:
    for encoder in encoders:
        if not data:
            break
        data = encoder.feed(data)
    return data


def _flushed(encoders: tuple[Encoder, ...]) -> bytes:
    tail = b""
    for encoder in encoders:
        tail = (encoder.feed(tail) if tail else b"") + encoder.flush()
    return tail


def encode(chunks: Iterable[bytes], *encoders: Encoder) -> Iterator[bytes]:
    for chunk in chunks:
        if out := _through(chunk, encoders):
            yield out
    if tail := _flushed(encoders):
        yield tail


async def aencode(chunks: AsyncIterable[bytes], *encoders: Encoder, off_loop: bool = False) -> AsyncIterator[bytes]:
    """`encode` over an async stream (a spool file read chunk by chunk); `off_loop`: each chunk goes through the
    encoders in a worker thread (one at a time, in order: an encoder's state is never shared by two threads)."""
    import asyncio  # (here, not at the top, as mailflow.content does: asyncio costs a command ~20 ms to import)

    async for chunk in chunks:
        if out := (await asyncio.to_thread(_through, chunk, encoders) if off_loop else _through(chunk, encoders)):
            yield out
    if tail := (await asyncio.to_thread(_flushed, encoders) if off_loop else _flushed(encoders)):
        yield tail

