"""A stray CR in message content, mended as Postfix 3.7.11 mends it: made a space, or dropped before a line end.

A CR is no line end in SMTP content, yet header parsing and a next hop may take it for one (`Subject: x\\rBcc: y`
would add a recipient, `\\r\\r` would end the header section early, `\\r.\\r` ends DATA at some servers). Postfix
3.7.10+'s cleanup (cleanup_replace_stray_cr_lf = yes, its default) makes each CR left inside a record a space,
before header checks, milters and signing see it; its smtpd's line reader (smtp_get, bare LF detection off: a
client whose bare LF is taken) has already dropped every CR before a LF. mailflow takes the same content the same
way for smtpd's clients whose bare LF is taken (DATA and BDAT: wire.py: StrayCr). sendmail's standard input
shares only lone_cr_as_space: its lines end as its own reader (mailflow.sendmail.reading) ends them, with no
record model.

    lone_cr_as_space(text) -> bytes   `text` (no line end in it) with each CR a space: sendmail's lines, and
                                      what the mender keeps of a line
    StrayCr(limit, line)              the mender of one message's content, fed in pieces of any size
      .feed(buf, end) -> bytes | None the first `end` octets of `buf`, the content's next, mended; None when they
                                      go on as they are (no CR but those of CRLF pairs, and none held: a bare LF
                                      then stays as sent); else each line end is written CRLF. CRs at the end of
                                      them are held back (a LF may follow)
      .end() -> bytes                 the held CRs as spaces: the content ended without a line end after them

The rule, in Postfix's records: a line is stored as records of at most `limit` raw octets (line_length_limit,
2048; a CR ending a full record and the LF after it end the line together). The CRs that end a line's last record
are dropped; every other CR is a space (`a\\r\\r\\n` is `a`, `a\\r \\r\\n` `a  `, a line of 2047 octets then
`\\r\\r\\n` ends in one space: its first CR ended a full record). Cost: a clean piece costs two counts and a
search (C speed); a piece with stray CRs a search for the lines of `limit` octets or longer (C speed), a Python
call for each of those, and between them a split at the CRLFs and a strip of each part (50 MB of 80-octet lines,
each with stray CRs, read by smtpd in 0.3 s, clean ones in 0.2 s; 10 MB of LF-ended empty lines among lines of 2048
octets with stray CRs, 0.3 s).
Memory: what it returns, nothing kept but two counts. Never raises.
"""
from __future__ import annotations

import re

CRLF = b"\r\n"


def lone_cr_as_space(text: bytes) -> bytes:
    """`text` (without its line end) with each CR a space, as Postfix's cleanup stores it."""
    return text.replace(b"\r", b" ")


def _short_lines(lines: bytes) -> bytes:
    """Whole lines, each shorter than a record and none begun before, their last LF left off: CRLF-ended, each
    without the CRs before its LF, its other CRs spaces. (Split at the CRLFs only: a run of LF-ended lines costs
    nothing per line.)"""
    joined = b"\n".join([text.rstrip(b"\r") for text in lines.split(CRLF)])
    return joined.replace(b"\r", b" ").replace(b"\n", CRLF) + CRLF


class StrayCr:
    """See the module doc."""

    __slots__ = ("_limit", "_long", "_col", "_held")

    def __init__(self, limit: int = 2048, line: int = 0) -> None:
        """`line`: the octets of the line under way that were passed on before the mender took over (no CR among
        them)."""
        self._limit = limit
        self._long = re.compile(rb"(?m)^[^\n]{%d,}\n" % limit)  # a line that spans records
        self._col = 0  # raw octets in the line's current record, the held CRs included (`limit`: it is full)
        self._held = 0  # CRs at the end of what was fed, not yet passed on
        self._advance(line, -1)

    def feed(self, buf: bytes | bytearray, end: int) -> bytes | None:
        """The first `end` octets of `buf`, mended; None when they go on as they are."""
        if not end:
            return None
        if not self._held and buf[end - 1] != 0x0D and buf.count(b"\r", 0, end) == buf.count(b"\r\n", 0, end):
            last_lf = buf.rfind(b"\n", max(0, end - self._limit), end)
            if last_lf < 0 and end > self._limit:
                last_lf = buf.rfind(b"\n", 0, end)  # (a long line: where it starts decides its records)
            self._advance(end, last_lf)
            return None
        return self._mend(bytes(buf[:end]))

    def end(self) -> bytes:
        spaces, self._held, self._col = b" " * self._held, 0, 0
        return spaces

    def _advance(self, size: int, last_lf: int) -> None:
        """The record state after `size` clean octets whose last LF is at `last_lf` (-1: none)."""
        col = self._col + size if last_lf < 0 else size - last_lf - 1
        self._col = (col - 1) % self._limit + 1 if col else 0

    def _mend(self, data: bytes) -> bytes:
        first = data.find(b"\n")
        if first < 0:
            return self._partial(data)
        out = [self._line(data[:first])]
        last, at = data.rfind(b"\n"), first + 1
        # the lines that span records (found at C speed) one by one; the runs of lines between them at once
        for long in self._long.finditer(data, at, last + 1):
            if long.start() > at:
                out.append(_short_lines(data[at:long.start() - 1]))
            out.append(self._line(data[long.start():long.end() - 1]))
            at = long.end()
        if at <= last:
            out.append(_short_lines(data[at:last]))
        out.append(self._partial(data[last + 1:]))
        return b"".join(out)

    def _line(self, text: bytes) -> bytes:
        """The rest of a line (the mender's held CRs and record state before it), its LF just read: CRLF-ended."""
        limit, held = self._limit, self._held
        raw = b"\r" * held + text
        before = self._col - held  # raw octets of the current record before `raw`
        total = before + len(raw)  # the LF's place, counted from the current record's start
        final = total // limit * limit  # where the LF's record starts
        if final and final == total and raw.endswith(b"\r"):
            final -= limit  # a full record ending in CR: the LF joins it
        keep = max(len(raw.rstrip(b"\r")), final - before, 0)
        self._col = self._held = 0
        return lone_cr_as_space(raw[:keep]) + CRLF

    def _partial(self, text: bytes) -> bytes:
        """Octets of a line whose end is still to come: all but the CRs at their end that a LF may yet drop."""
        if not text:
            return b""
        limit, raw = self._limit, b"\r" * self._held + text
        before = self._col - self._held
        total = before + len(raw)
        current = (total - 1) // limit * limit  # where the record holding the last octet starts
        keep = max(len(raw.rstrip(b"\r")), current - before)
        self._held = len(raw) - keep
        self._col = total - current
        return lone_cr_as_space(raw[:keep])
