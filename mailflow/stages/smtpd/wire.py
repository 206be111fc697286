"""smtpd's input side: command lines, DATA and BDAT content read from the client in chunks, strictly.

`Wire` owns the bytes received and not yet consumed: the session's protocol feeds it what the transport
delivers (`feed`, `feed_eof`, `set_exception`; no StreamReader in between, so a byte received is copied once
into this buffer and once more, unstuffed, into the message's spool). It scans for line ends and the DATA
terminator with bytes methods (C speed), not line by line. Past HIGH_WATER bytes waiting it pauses the
transport's reading, and resumes it when a reader needs more: what a client can make the server hold is bounded.

Rules (Postfix smtpd_forbid_bare_newline = reject):
- A command line ends only at CRLF. A line ended by a bare LF, or holding a bare CR, raises `WireError` with
  `521 5.5.2 ... bare <LF>/<CR> received`, fatal: the session ends.
- With `bare_lf=True` (forbid_bare_newline = false, or a client in its exclusions; Postfix's "no"), a bare LF
  ends a command line or a DATA line as CRLF would and is stored as CRLF, and a "." line ends DATA whatever its
  line ends (`\\n.\\n` too, as in Postfix: such a client is outside the smuggling guard). A stray CR in DATA or
  BDAT content is stored as Postfix 3.7.11 stores it (mailflow.stray_cr: dropped before a LF, else a space), before
  anything reads the content; in a command line it is refused either way.
- A command line longer than `limit` is read to its end and discarded: `500 5.5.2 Error: line too long`.
- Otherwise DATA ends only at CRLF "." CRLF. A bare LF or bare CR anywhere in the content is fatal at once (no
  `\\n.\\n`-style sequence can end the message or split it into two: nothing is queued and the session ends).
  Dot-stuffing is undone as the content is copied, once, from the input buffer into a `Spool`
  (mailflow.content): small messages stay in memory, big ones go to a spool file as they arrive. A NUL makes
  the message refused (554 5.6.0) once its end has been read. Content beyond the spool's `max_size` is counted
  but not kept, and refused (552 5.3.4) after the terminator; a spool file that cannot be written makes it
  refused with 451 4.3.0 (4.3.1 for a full disk) after the terminator: memory and disk stay bounded.
  The spool's writes are awaited, and input arrives meanwhile: a reader waits for more input only when it has
  looked at everything the buffer holds (a terminator that came during a write is found then, not left waiting
  for input its client, waiting for the reply, never sends).
- Before DATA's content is read, `mailbox_lines(limit)` looks (without consuming) for the mbox `From ` lines it
  starts with, in the lines as sent (Postfix's smtpd tests them before unstuffing); a content that does not start
  with `From ` or `>From ` is decided by its first bytes, no scan nor copy.
- BDAT chunks are read as exactly n bytes (RFC 3030: no dot-stuffing, no terminator) into the transaction's
  spool; the same bare-newline and NUL rules apply to their content (`ContentCheck`, as Postfix applies
  smtpd_forbid_bare_newline to BDAT), and the same mending of stray CRs where a bare LF is taken.

The size of each input is told to `progress` while it is set (smtpd sets it for DATA/BDAT content, whose data rate
its deadline follows; a command's input costs no call for it). End of input
raises `ConnectionResetError` (`readexactly`, for a PROXY header: `asyncio.IncompleteReadError`).
"""
from __future__ import annotations

import asyncio
import errno
from typing import Callable

from mailflow import status
from mailflow.content import Spool
from mailflow.message import MAILBOX_LINE, mailbox_line, mailbox_line_room
from mailflow.stray_cr import StrayCr

CHUNK = 65536
PARTIAL_LINE_KEEP = 65536  # a DATA line longer than this is passed on in pieces, never held whole
HIGH_WATER = 4 * CHUNK  # bytes waiting to be consumed past which the transport stops reading
TERMINATOR = b"\r\n.\r\n"
END_OF_MESSAGE = "END-OF-MESSAGE"  # the stage a refusal of content is logged at, as Postfix logs it


DOT_HOPS = 8  # dots looked at one by one before one search for CRLF "." takes over
STUFFED_ONE_BY_ONE = 16  # dotted lines unstuffed one by one (no copy) before one replace takes the rest


def _ignore(*_args) -> None:
    """A callback that does nothing (the wire's, when the session gave none or is over)."""


def _line_dot(buf: bytearray, pos: int, end: int) -> int:
    """Where the next CRLF "." in buf[pos:end] starts, or -1. A search for a 3-byte string looks at every byte
    (about 1 ns each); memchr finds a single byte far faster, so it hops from dot to dot first: a body without
    dots (base64, most big messages) and a header section with a few cost next to nothing; past DOT_HOPS dots
    (text full of them) one search takes over."""
    for _ in range(DOT_HOPS):
        dot = buf.find(b".", pos + 2, end)
        if dot < 0:
            return -1
        if buf[dot - 2] == 0x0D and buf[dot - 1] == 0x0A:
            return dot - 2
        pos = dot - 1  # a later match has its dot past this one
    return buf.find(b"\r\n.", pos, end)


class WireError(Exception):
    """Input that breaks the protocol. `reply` is what the client is told; `fatal`: then close the session. A
    fatal one's reject line says `logged` at `where` when given (else the reply, at the session's stage), as
    Postfix's log_whatsup words it: `reject: END-OF-MESSAGE from host[ip]: bare <LF> received; …` (`bare <CR>
    received` is mailflow's own line in that shape: Postfix takes a bare CR)."""

    def __init__(self, reply: status.Reply, fatal: bool, *, logged: str = "", where: str = ""):
        super().__init__(str(reply))
        self.reply = reply
        self.fatal = fatal
        self.logged = logged or str(reply)
        self.where = where


def bare_refusal(host: str, char: str, where: str = "") -> WireError:
    """A bare line end refused (in content: `where` END_OF_MESSAGE, the stage Postfix logs, having read on)."""
    return WireError(status.bare_newline(host, char), fatal=True, logged=status.bare_received(char), where=where)


class ContentCheck:
    """What BDAT content must be checked for across its chunks: NUL, line ends other than CRLF (`bare_lf`,
    `bare_cr`; a CR ending one piece may pair with a LF starting the next); and its size as Postfix's smtpd reports
    it (`octets`, for the `250 2.0.0 Ok: N bytes queued as ID` of BDAT LAST). With `mend` (a client whose bare
    LF is taken) its stray CRs are mended first (mailflow.stray_cr: a space, or dropped before a LF, as Postfix
    3.7.11 stores them), and what it checks and counts is the content so mended: `feed` returns it."""

    def __init__(self, line_limit: int = 2048, *, mend: bool = False) -> None:
        """`line_limit`: Postfix's line_length_limit, the longest piece of a line it stores as one record."""
        self.nul = False
        self.bare_lf = False
        self.bare_cr = False
        self._mender = StrayCr(line_limit) if mend else None
        self._cr_pending = False
        self._line_limit = line_limit
        self._counted = 0  # the bytes fed, and 2 for each piece of a long complete line
        self._line = 0  # the bytes of the line under way (since the last LF)

    @property
    def octets(self) -> int:
        """Postfix's act_size of the content fed: each line stored as records of at most line_limit bytes,
        each record counted with 2 for its line end (so a last line without one counts 2 more, one ended by a bare
        LF 1 more)."""
        last = self._line
        return self._counted + (2 + 2 * ((last - 1) // self._line_limit) if last else 0)

    @property
    def stored(self) -> int:
        """`octets` of what Postfix has stored so far: not the last line while it is incomplete, but the
        line_limit pieces of it already cut off (not the last one when it ends in a CR: Postfix holds it to see
        whether a LF follows)."""
        pieces = self._line // self._line_limit
        if pieces and self._cr_pending and not self._line % self._line_limit:
            pieces -= 1
        return self._counted - self._line + pieces * (self._line_limit + 2)

    def feed(self, buf: bytearray, end: int) -> bytes | None:
        """The first `end` bytes of `buf`; returns them mended (None: unchanged, or not mending)."""
        mended = self._mender.feed(buf, end) if self._mender is not None else None
        if mended is not None:
            self._check(mended, len(mended))
        else:
            self._check(buf, end)
        return mended

    def end(self) -> bytes:
        """The content's last octets once it is complete: the CRs the mender held back, as spaces (b"" mostly)."""
        tail = self._mender.end() if self._mender is not None else b""
        self._check(tail, len(tail))
        return tail

    def _check(self, buf: bytes | bytearray, end: int) -> None:
        if not end:
            return
        self._count(buf, end)
        lf, cr, crlf = buf.count(b"\n", 0, end), buf.count(b"\r", 0, end), buf.count(b"\r\n", 0, end)
        if self._cr_pending:
            if buf[0] == 0x0A:
                crlf, cr = crlf + 1, cr + 1
            else:
                self.bare_cr = True
        self._cr_pending = buf[end - 1] == 0x0D
        if self._cr_pending:
            cr -= 1
        self._counted += lf - crlf  # a line ended by a bare LF: Postfix counts 2 for its end, as for CRLF
        self.bare_lf = self.bare_lf or lf != crlf
        self.bare_cr = self.bare_cr or cr != crlf
        if not self.nul and buf.find(b"\0", 0, end) >= 0:
            self.nul = True

    def _count(self, buf: bytes | bytearray, end: int) -> None:
        """`octets` for the first `end` bytes of `buf`. Only a line of line_limit bytes or more counts more than
        its bytes: it hops from window to window of line_limit bytes to the last LF in each (memchr, at C speed),
        and looks at a line by itself only where a window holds no LF."""
        self._counted += end
        last_lf = buf.rfind(b"\n", 0, end)
        if last_lf < 0:
            self._line += end
            return
        limit = self._line_limit
        start = -self._line  # where the line under way starts, relative to buf
        while last_lf - start >= limit:  # (a line ending at last_lf or before may be as long as limit)
            lf = buf.rfind(b"\n", max(start, 0), start + limit) if start + limit > 0 else -1
            if lf >= 0:  # the lines ending in this window are all shorter than limit
                start = lf + 1
                continue
            lf = buf.find(b"\n", max(start + limit, 0), last_lf + 1)
            cr = buf[lf - 1] == 0x0D if lf else self._cr_pending
            self._counted += 2 * ((lf - start - cr) // limit)  # each piece cut off counts 2 for its end
            start = lf + 1
        self._line = end - last_lf - 1

    def finish(self) -> str:
        """The bare line end the content holds, once it is complete: `LF` when it holds a bare LF (Postfix names
        only that one), else `CR`, else "": whatever its chunks."""
        self.bare_cr = self.bare_cr or self._cr_pending
        return "LF" if self.bare_lf else "CR" if self.bare_cr else ""


def refusal(spool: Spool, nul: bool) -> status.Reply | None:
    """Why content read into `spool` must not be queued: too big, not stored, or holding a NUL."""
    if spool.exceeded:
        return status.MESSAGE_TOO_BIG
    if spool.failure is not None:
        return status.QUEUE_FULL if spool.failure.errno == errno.ENOSPC else status.QUEUE_ERROR
    if nul:
        return status.NUL_IN_DATA
    return None


class Wire:
    """The client's input not yet consumed. One per session; `discard()` after STARTTLS."""

    def __init__(self, host: str, progress: Callable[[int], None] | None = None, *, bare_lf: bool = False,
                 reading: Callable[[bool], None] | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 line_limit: int = 2048):
        """`reading(False)` pauses the transport's reading, `reading(True)` resumes it; `loop`: the session's
        (asked for at the first wait when not given); `line_limit`: Postfix's line_length_limit, the records a
        stray CR is mended in (mailflow.stray_cr)."""
        self._host = host
        self._line_limit = line_limit
        self._loop = loop
        self.progress = progress  # told of each input's size (None: nobody; smtpd sets it for content only)
        self._bare_lf = bare_lf
        self._reading = reading or _ignore
        self._buf = bytearray()
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None  # the connection's failure
        self._waiter: asyncio.Future | None = None

    def allow_bare_lf(self, allowed: bool) -> None:
        """From now on, whether a bare LF ends a line (a client excluded from forbid_bare_newline, or XCLIENT's)."""
        self._bare_lf = allowed

    # -- what the protocol feeds

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self.progress is not None:
            self.progress(len(data))
        if len(self._buf) > HIGH_WATER and not self._paused:
            self._paused = True
            self._reading(False)
        self._wake()

    def feed_eof(self, error: BaseException | None = None) -> None:
        """No more input: the client closed its side, or the connection failed with `error`."""
        self._eof = True
        if self._error is None:
            self._error = error
        self._wake()

    def let_go(self) -> None:
        """The session is over: drop its callbacks (what still arrives is buffered, then dropped with the wire),
        so that no reference cycle holds the session until the garbage collector runs."""
        self.progress = None
        self._reading = _ignore

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the session's side

    def discard(self) -> None:
        """Drop everything received and not yet consumed (plaintext pipelined after STARTTLS, RFC 3207)."""
        self._tls_takes_over()

    def take(self) -> bytes:
        """Everything received and not yet consumed, handed over (a submissions listener's first TLS bytes, which
        came in with its PROXY header: the TLS layer reads them)."""
        data = bytes(self._buf)
        self._tls_takes_over()
        return data

    def _tls_takes_over(self) -> None:
        """The buffer emptied as the TLS layer takes the connection over (it reads afresh whatever paused the
        plaintext reading): the high-water mark counts again from nothing, so what comes over TLS pauses the reading
        again past it. (A pause left set let a client that filled the buffer before STARTTLS send without bound.)"""
        self._buf.clear()
        self._paused = False

    def pending(self) -> bool:
        """True when input beyond what was consumed has already arrived (pipelining checks)."""
        return bool(self._buf)

    @property
    def ended(self) -> bool:
        """No more input will come: the client closed its side, or the connection failed."""
        return self._eof or self._error is not None

    def peek(self, limit: int = 100) -> bytes:
        """The first bytes received and not consumed (for the log of a pipelining violation)."""
        return bytes(self._buf[:limit])

    async def _fill(self, have: int | None = None) -> None:
        """Wait until more than what the buffer holds now has arrived (`have`: its length, when the caller has just
        measured it: the buffer cannot grow before this waits, input comes in a turn of the loop of its own). That
        holds as long as `reading(True)` (the transport's resume_reading(), called here when reading was paused)
        never feeds the wire before it returns: asyncio's socket and TLS transports only watch the socket again,
        or schedule their read, for a later turn. A transport that delivered input from within resume_reading()
        would have it counted in `have` too late, and this would wait past input already here."""
        if have is None:
            have = len(self._buf)
        if self._paused:
            self._paused = False
            self._reading(True)
        while True:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise ConnectionResetError("client closed the connection")
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            await self._waiter
            if len(self._buf) != have:
                return

    async def wait_input(self) -> bool:
        """Wait until some input is here (True) or none will come (False): postscreen's greet wait."""
        if self._buf:
            return True
        try:
            await self._fill()
        except (ConnectionError, OSError):
            return False
        return True

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes (asyncio.StreamReader's contract, for the PROXY header)."""
        while len(self._buf) < n:
            try:
                await self._fill()
            except ConnectionError:
                raise asyncio.IncompleteReadError(bytes(self._buf), n) from None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _bare(self, char: str, where: str = "") -> WireError:
        return bare_refusal(self._host, char, where)

    async def read_line(self, limit: int) -> bytes:
        """One command line without its CRLF (limit counts the CRLF)."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                break
            start = len(self._buf)
            if start > limit:
                await self._skip_line()
                raise WireError(status.LINE_TOO_LONG, fatal=False)
            await self._fill(start)
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

    async def read_lenient_line(self, limit: int) -> tuple[bytes, bool] | None:
        """One line ended by CRLF or a bare LF, without its end, and whether that end was a bare LF; None when it
        holds `limit` bytes or more before its end (postscreen's dummy engine: Postfix 3.7's psc_smtpd_read_event,
        its COMMAND LENGTH LIMIT and its bare newline test)."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start, limit + 2)
            if end >= 0:
                break
            if len(self._buf) >= limit + 2:
                return None
            start = len(self._buf)
            await self._fill()
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        bare = not line.endswith(b"\r")
        line = line if bare else line[:-1]
        return (line, bare) if len(line) < limit else None

    async def _skip_line(self) -> None:
        """Consume input through the next LF without keeping it."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                del self._buf[:end + 1]
                return
            self._buf.clear()
            await self._fill()

    async def mailbox_lines(self, limit: int) -> tuple[int, int, bool]:
        """At the start of DATA content: (how many lines, how many bytes) of it, as sent, are mbox `From ` lines
        (mailflow.message.mailbox_line: tested on the line as sent, before unstuffing, as Postfix's smtpd tests it:
        `.From x` is none), whole lines that fit, labelled and stored with CRLF (a bare LF too), within `limit`
        bytes (header_size_limit: what a header section may be; mailflow.message.mailbox_line_room), and whether
        the line after them starts with a blank (Postfix's smtpd ends the header section there). Nothing is
        consumed; when the content does not start with `From ` or `>From `, its first bytes decide at once."""
        count = pos = labelled = 0  # (labelled: the bytes of the lines as stored, label and CRLF included)
        scanned = 0  # (where the search for the line end at `pos` goes on: a trickled line is searched once)
        while True:
            buf = self._buf
            found = mailbox_line(buf, pos)
            if found is None and len(buf) - pos <= limit:
                await self._fill()  # (the line's start is not all here yet)
                continue
            if not found:
                return count, pos, count > 0 and buf.startswith((b" ", b"\t"), pos)
            room = mailbox_line_room(labelled, limit)
            end = buf.find(b"\n", max(scanned, pos), pos + room) + 1  # (as sent, no longer than stored with CRLF)
            if not end and len(buf) < pos + room:
                scanned = len(buf)
                await self._fill()
                continue
            stored = len(buf[pos:end].rstrip(b"\r\n")) + 2 if end else room + 1  # (a bare LF is stored as CRLF)
            if stored > room:
                return count, pos, False  # (labelled, more than a header section may be: it stays unlabelled)
            count, pos, labelled = count + 1, end, labelled + len(MAILBOX_LINE) + stored

    async def read_data(self, spool: Spool) -> status.Reply | None:
        """DATA content through CRLF.CRLF into `spool`, unstuffed (the terminator is consumed; what follows stays
        for the next command). Returns why it must not be queued (too big, NUL, not stored), or None. A client
        allowed bare LF is read strictly too until its first bare LF or stray CR, then by `_read_data_mended`
        (clean CRLF input, the usual case, at the strict path's cost: the mended one costs twice as much per
        byte)."""
        nul = False
        at_line_start = True
        line = 0  # the octets of the line under way already passed on (a long line's pieces)
        while True:
            buf = self._buf
            last_lf = buf.rfind(b"\n")
            if last_lf < 0:
                if len(buf) <= PARTIAL_LINE_KEEP:
                    await self._fill()
                    continue
                if self._bare_lf and buf.find(b"\r", 0, len(buf) - 1) >= 0:
                    return await self._read_data_mended(spool, at_line_start, nul, line)
                taken, nul_here = self._take_partial_line(spool, at_line_start)
                nul, line, at_line_start = nul or nul_here, line + taken, False
                await spool.drain()
                continue  # (input that arrived during the drain is looked at before waiting for more)
            end = last_lf + 1  # complete lines only
            if self._bare_lf:
                crlf = buf.count(b"\r\n", 0, end)
                if ((buf.count(b"\n", 0, end) != crlf or buf.count(b"\r", 0, end) != crlf)
                        and self._mending_before_end(end, at_line_start)):
                    return await self._read_data_mended(spool, at_line_start, nul, line)
                # (every CR and LF through the end of DATA in CRLF pairs: nothing to check)
                stop, consumed = self._unstuff_into(spool, end, at_line_start)
            else:
                stop, consumed = self._unstuff_into(spool, end, at_line_start)
                # (a failure ends the session: what went into the spool is dropped)
                self._check_line_ends(stop)
            nul = nul or buf.find(b"\0", 0, stop) >= 0
            del buf[:consumed]
            await spool.drain()
            if consumed != end or stop != end:
                return refusal(spool, nul)
            at_line_start, line = True, 0

    def _mending_before_end(self, end: int, at_line_start: bool) -> bool:
        """Whether a bare LF or a stray CR is among the complete lines in the first `end` bytes of the buffer
        before the end of DATA (the first CRLF.CRLF, a "." CRLF line first), knowing one is among them: one after
        that end belongs to the next command or a BDAT chunk, and must not take a finished message off the strict
        path."""
        buf = self._buf
        if at_line_start and buf.startswith(b".\r\n"):
            return False
        term = buf.find(TERMINATOR, 0, end)
        if term < 0:
            return True
        stop = term + len(TERMINATOR)
        crlf = buf.count(b"\r\n", 0, stop)
        return buf.count(b"\n", 0, stop) != crlf or buf.count(b"\r", 0, stop) != crlf

    async def _read_data_mended(self, spool: Spool, at_line_start: bool, nul: bool, line: int) -> status.Reply | None:
        """`read_data` in bare_lf mode (Postfix's smtpd_forbid_bare_newline = no, which its exclusions also give):
        complete lines as sent, their stray CRs mended (mailflow.stray_cr: dropped before a LF, else a space, as
        Postfix 3.7.11's smtp_get and cleanup store them), normalised to CRLF, then unstuffed; a line holding only
        "." ends DATA whatever its line end and the previous line's (CRLF or a bare LF: `\\n.\\n` and `\\r\\n.\\n`
        end it, as do `.\\r\\r\\n`; Postfix 3.7.11's smtp_get with bare LF detection off takes them). What follows
        that line is the next command's, a BDAT chunk's, not the message's. `lead`: CRLF at a line start, b""
        inside a long line (passed on in pieces). No smuggling guard for such a client (docs/security.md).
        `at_line_start`, `nul`, `line`: where read_data left off, whether it saw a NUL, the octets of the line
        under way it passed on."""
        lead = b"\r\n" if at_line_start else b""
        mender = StrayCr(self._line_limit, line)
        while True:
            last_lf = self._buf.rfind(b"\n")
            if last_lf < 0:
                if len(self._buf) <= PARTIAL_LINE_KEEP:
                    await self._fill()
                    continue
                nul = self._take_mended_piece(spool, mender, bool(lead)) or nul
                lead = b""
                await spool.drain()
                continue  # (as in read_data)
            region = bytes(self._buf[:last_lf + 1])
            mended = mender.feed(region, len(region))  # (line ends CRLF; None: no CR but in CRLF pairs)
            scan = lead + (region.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if mended is None else mended)
            end = scan.find(TERMINATOR)  # in the lines as mended: a "." line ends DATA
            if end >= 0:
                lines = scan.count(b"\n", len(lead), end + len(TERMINATOR))  # the lines sent through the "." line
                del self._buf[:len(region) - len(region.split(b"\n", lines)[-1])]
                scan = scan[:end + 2]
            else:
                del self._buf[:last_lf + 1]
            nul = nul or b"\0" in scan
            spool.append(scan.replace(b"\r\n.", b"\r\n")[len(lead):])
            await spool.drain()
            if end >= 0:
                return refusal(spool, nul)
            lead = b"\r\n"

    def _unstuff_into(self, spool: Spool, end: int, at_line_start: bool) -> tuple[int, int]:
        """The complete lines in the first `end` bytes of the buffer into `spool`, each line's leading dot removed,
        up to the terminator: one copy, straight from the input buffer, and one scan for CRLF "." that finds
        both the stuffed dots and the terminator; past STUFFED_ONE_BY_ONE dotted lines, one search for the
        terminator and one replace do the rest. Returns (where the content stops, where the input consumed
        ends): (end, end) when the terminator is not among these lines."""
        buf = self._buf
        pos = 0
        if at_line_start and buf.startswith(b"."):
            if buf.startswith(b".\r\n"):
                return 0, 3
            pos = 1
        with memoryview(buf) as view:
            for _ in range(STUFFED_ONE_BY_ONE):
                dot = _line_dot(buf, pos, end)
                if dot < 0:
                    spool.append(view[pos:end])
                    return end, end
                spool.append(view[pos:dot + 2])
                if buf.startswith(b"\r\n", dot + 3):  # CRLF "." CRLF (its LF is within `end`: the last LF is)
                    return dot + 2, dot + 3 + 2
                pos = dot + 3
        # Text full of dotted lines: the rest in one search for the terminator and one replace, at C speed
        # (one Python step per line would let a client make each byte of its message cost 60 times more).
        # No terminator starts at pos: the line there had its dot and goes on.
        term = buf.find(TERMINATOR, pos, end)
        stop, consumed = (term + 2, term + 5) if term >= 0 else (end, end)
        spool.append(buf[pos:stop].replace(b"\r\n.", b"\r\n"))
        return stop, consumed

    def _take_partial_line(self, spool: Spool, at_line_start: bool) -> tuple[int, bool]:
        """Pass on the buffered part of a very long line (keeping a trailing CR, which a LF may yet follow).
        Returns how many octets it passed on, and whether they held a NUL."""
        keep = 1 if self._buf.endswith(b"\r") else 0
        end = len(self._buf) - keep
        if self._buf.find(b"\r", 0, end) >= 0:
            raise self._bare("CR", END_OF_MESSAGE)
        start = 1 if at_line_start and self._buf.startswith(b".") else 0
        with memoryview(self._buf) as view:
            spool.append(view[start:end])
        nul = self._buf.find(b"\0", 0, end) >= 0
        del self._buf[:end]
        return end, nul

    def _take_mended_piece(self, spool: Spool, mender: StrayCr, at_line_start: bool) -> bool:
        """`_take_partial_line` for `_read_data_mended`: all the buffer holds, through `mender` (which holds back
        a trailing CR itself), a leading dot unstuffed. Returns whether it held a NUL."""
        buf = self._buf
        mended = mender.feed(buf, len(buf))
        piece = bytes(buf) if mended is None else mended  # (the same first octet: at a line start, no CR is held)
        nul = piece.find(b"\0") >= 0
        spool.append(piece[1:] if at_line_start and piece.startswith(b".") else piece)
        buf.clear()
        return nul

    def _check_line_ends(self, stop: int) -> None:
        """Complete lines in the first `stop` bytes of the buffer must all end in CRLF."""
        buf = self._buf
        crlf = buf.count(b"\r\n", 0, stop)
        if buf.count(b"\n", 0, stop) != crlf:
            raise self._bare("LF", END_OF_MESSAGE)
        if buf.count(b"\r", 0, stop) != crlf:
            raise self._bare("CR", END_OF_MESSAGE)

    async def read_chunk(self, count: int, spool: Spool | None, check: ContentCheck | None = None) -> None:
        """Exactly `count` bytes of BDAT content into `spool` (None: read and drop them), checked by `check`;
        never more than one read of input held at once."""
        left = count
        while left:
            if not self._buf:
                await self._fill()
            n = min(left, len(self._buf))
            mended = check.feed(self._buf, n) if check is not None else None
            if spool is not None:
                if mended is not None:
                    spool.append(mended)
                else:
                    with memoryview(self._buf) as view:
                        spool.append(view[:n])
            del self._buf[:n]
            left -= n
            if spool is not None:
                await spool.drain()
