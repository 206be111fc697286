"""Server replies of the SMTP family (SMTP, LMTP), sans-IO: bytes in, `Reply` values out (h11's style).

Owns the one reply parser and the one reply type of the SMTP and LMTP clients, and every limit on what a server
may send as a reply. No I/O, no clock: `chat` feeds it what the connection receives.

    ReplyParser(line_filter=None)     `line_filter(line) -> line`: each complete line (no CR LF, at most
                                      MAX_LINE_LENGTH bytes) before it is parsed, Postfix's smtp_reply_filter
                                      (mailflow.transports.smtp.reply_filter); what it gives is cut to
                                      MAX_LINE_LENGTH; it may raise ReplyFilterError (a table that cannot answer)
      .receive_data(data)             append received bytes
      .next_reply() -> Reply | None   the next complete reply, or None until more bytes arrive;
                                      raises MalformedReply (the parser is then of no further use)
      .buffered -> bool               bytes received and not yet returned as a reply
      .clear()                        forget what is buffered (STARTTLS: nothing sent before TLS counts)
    Reply(code, message, wire=(), garbage=(), garbage_count=0)  `message`: the text of every reply line (but see
                                      Limits), code and separator removed, each line stripped, joined by "\\n";
                                      `wire`: the lines of a multi-line reply as received (codes and separators
                                      kept, garbage too; not compared); `garbage`: the lines in it that were no reply
                                      lines (the first GARBAGE_KEPT), `garbage_count` how many there were
      .positive .protocol_error .lines .one_line .dsn(reply_class=None)

Rules (RFC 5321 4.2): a line is three digits, then a space, a hyphen or nothing, then text, ending in LF (a CR
before it is dropped). `ddd-` continues the reply. The code of a reply is its last line's, as Postfix's
smtp_chat_resp reads it: lines whose codes differ ("250-first" then "550 5.1.1 second") are one reply with the
last code, not garbage. Any three digits are taken as a code: what an odd code means is for the caller
(`protocol_error`: neither 2xx, 4xx nor 5xx; `trouble.reply_outcome`; its enhanced code is 5.5.0). A line that
is no reply line ("hello", "2500 ok", "250_ok") is read on past, as Postfix's smtp_chat_resp does (it only
warns, and caches no session after it): it belongs to the reply that the next `ddd ` line ends, kept whole in
`wire` ("oops 550 5.1.1 no" as `one_line`, the diagnostic) but not in `message`, so that what a reply offers is
read from its reply lines only (an EHLO reply's garbage line "SIZE 10" is no SIZE: Postfix's smtp_proto takes
the first word of every line as its code), and the reply says so in `garbage`. Text is UTF-8; bytes
that are not become U+FFFD, so a diagnostic is always a valid string. `one_line` is the reply as Postfix logs and
reports it: every line as received, joined by spaces ("550-5.1.1 The account does not exist. 550 5.1.1
https://…"); the enhanced code is the last line's.

Limits, here and nowhere else: of a line longer than MAX_LINE_LENGTH bytes the first MAX_LINE_LENGTH are kept and
the rest is read and dropped up to its line end, as Postfix's smtp_get does (line_length_limit = 2048): a long
refusal still refuses, with its beginning as the diagnostic, and nothing unbounded is held. The line, and so its
reply, is complete at its line end only: a line that never ends is a reply that never comes (the caller's timeout
ends it, naming the command it answers, as Postfix's up to 3.11; 3.12 stops reading after another 2048 bytes and
takes the cut line, then loses the connection at the next command). Of a multi-line reply
the lines are kept while those kept so far are shorter than MAX_LINE_LENGTH in all (Postfix's smtp_chat_resp):
`wire` and `one_line` end there; `message` has the last line too, for its enhanced code. A reply of more than
MAX_REPLY_LINES lines or MAX_REPLY_LENGTH bytes (garbage lines counted) is malformed, the one MalformedReply: a
server that sends that much is misbehaving (Postfix reads on while each line comes within the timeout). Of the
garbage lines of a reply the first GARBAGE_KEPT are kept (to be warned of), the rest only counted.
"""
from __future__ import annotations

from dataclasses import field
from typing import Callable

from mailflow.records import record
from mailflow.syntax import split_leading_dsn

MAX_LINE_LENGTH = 2048  # bytes of a reply line that are kept (Postfix line_length_limit; RFC 5321 allows 512)
MAX_REPLY_LINES = 1000  # lines in one reply
MAX_REPLY_LENGTH = 64 * 1024  # bytes in one reply, every line included
GARBAGE_KEPT = 3  # garbage lines of one reply kept (each is warned of; the rest are counted)



class MalformedReply(Exception):
    """What the server sent is not a reply: a bad line, a reply too long."""


class ReplyFilterError(Exception):
    """smtp_reply_filter could not answer for a line (Postfix: a local data error, the session ends)."""


@record
class Reply:
    """One complete server reply."""

    code: int
    message: str
    wire: tuple[str, ...] = field(default=(), compare=False)
    garbage: tuple[str, ...] = field(default=(), compare=False)
    garbage_count: int = field(default=0, compare=False)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def protocol_error(self) -> bool:
        """A code that is neither 2xx, 4xx nor 5xx: no reply SMTP knows here (Postfix's dsn 5.5.0)."""
        return self.code // 100 not in (2, 4, 5)

    @property
    def lines(self) -> list[str]:
        return self.message.split("\n")

    @property
    def one_line(self) -> str:
        """The reply on one line as Postfix writes it: `250 2.0.0 Ok`; a multi-line reply's lines as received,
        joined by spaces (`550-5.1.1 first 550 5.1.1 second`)."""
        if self.wire:
            return " ".join(self.wire).strip()  # (an empty garbage line first adds nothing, as with Postfix)
        lines = self.lines
        return " ".join([*(f"{self.code}-{line}".strip() for line in lines[:-1]),
                         f"{self.code} {lines[-1]}".strip()])

    def dsn(self, reply_class: str | None = None) -> str:
        """The enhanced code of the reply's last line when its class is the reply's, else x.0.0 (`550 4.2.2 full`
        is 5.0.0), as Postfix's smtp_chat_resp keeps a server's code; then given `reply_class`'s class, as
        Postfix's callers change a status's first digit. A code that is neither 2xx, 4xx nor 5xx is a protocol
        error: 5.5.0 (x.5.0)."""
        if self.protocol_error:
            return f"{reply_class or '5'}.5.0"
        own_class = str(self.code)[0]
        found, _ = split_leading_dsn(self.lines[-1].strip())
        kept = found if found and found[0] == own_class else f"{own_class}.0.0"
        return (reply_class or own_class) + kept[1:]


class ReplyParser:
    """See the module docstring."""

    def __init__(self, line_filter: Callable[[bytes], bytes] | None = None) -> None:
        self._line_filter = line_filter
        self._buffer = bytearray()
        self._reading = False  # between the lines of a multi-line reply
        self._cut: bytearray | None = None  # the beginning of an overlong line, its rest dropped up to its end
        self._texts: list[str] = []
        self._wire: list[str] = []
        self._length = 0  # bytes of the reply read
        self._kept = 0  # bytes of its lines kept (`wire`)
        self._count = 0  # its lines read but the last
        self._garbage: list[str] = []  # its first GARBAGE_KEPT lines that are no reply lines
        self._garbage_count = 0  # how many there are

    @property
    def buffered(self) -> bool:
        return bool(self._buffer or self._reading or self._cut is not None)

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def clear(self) -> None:
        self._buffer.clear()
        self._reset()
        self._cut = None

    def _reset(self) -> None:
        """Ready for the next reply."""
        self._reading, self._texts, self._wire, self._length, self._kept, self._count = False, [], [], 0, 0, 0
        self._garbage, self._garbage_count = [], 0

    def next_reply(self) -> Reply | None:
        while (line := self._next_line()) is not None:
            if line[-1:] == b"\r":  # (a slice's test, not a method call: every reply line passes here)
                line = line.rstrip(b"\r")
            length = len(line)
            if self._line_filter is not None:
                line = bytearray(self._line_filter(bytes(line))[:MAX_LINE_LENGTH])
            reply = self._line(line, length)
            if reply is not None:
                return reply
        return None

    def _next_line(self) -> bytearray | None:
        """The next line without its LF, or None until its line end has come. Of an overlong line the beginning
        is kept and the rest dropped as it arrives; the line is returned at its line end, as Postfix's smtp_get
        skips the rest before it returns the line (within the same time limit)."""
        buffer = self._buffer
        if self._cut is None:
            end = buffer.find(b"\n", 0, MAX_LINE_LENGTH + 1)
            if end != -1:
                line = buffer[:end]
                del buffer[:end + 1]
                return line
            if len(buffer) <= MAX_LINE_LENGTH:
                return None
            self._cut = buffer[:MAX_LINE_LENGTH]
            del buffer[:MAX_LINE_LENGTH]
        end = buffer.find(b"\n")
        if end == -1:
            buffer.clear()
            return None
        del buffer[:end + 1]
        line, self._cut = self._cut, None
        return line

    def _line(self, line: bytearray, length: int) -> Reply | None:
        separator: bytes | bytearray = line[3:4]  # a bytearray equals the bytes it holds
        garbage = len(line) < 3 or not line[:3].isdigit() or separator not in (b"", b" ", b"-")
        if garbage:  # read on
            text = line.strip().decode("utf-8", "replace")
            self._garbage_count += 1
            if len(self._garbage) < GARBAGE_KEPT:
                self._garbage.append(text)
            code, last = 0, False
        else:
            code = int(line[:3])
            text = line[4:].strip().decode("utf-8", "replace")
            if not self._reading and separator != b"-":  # a reply of one line: most of them
                return Reply(code, text)
            last = separator != b"-"
        self._reading = True
        if self._kept < MAX_LINE_LENGTH:  # the text of a long reply stops there, as Postfix's (smtp_chat_resp)
            if not garbage:  # (a garbage line's text is in `wire` only)
                self._texts.append(text)
            self._wire.append(line.decode("utf-8", "replace").strip())
            self._kept += len(line) + 1
        elif last:
            self._texts.append(text)  # (for its enhanced code; the text as written stays cut)
        self._length += length
        if self._length > MAX_REPLY_LENGTH:
            raise MalformedReply(f"reply too long (over {MAX_REPLY_LENGTH} bytes)")
        if last:  # the last line, whose code is the reply's (Postfix smtp_chat_resp)
            reply = Reply(code, "\n".join(self._texts), tuple(self._wire), tuple(self._garbage), self._garbage_count)
            self._reset()
            return reply
        self._count += 1
        if self._count >= MAX_REPLY_LINES:
            raise MalformedReply(f"reply too long (over {MAX_REPLY_LINES} lines)")
        return None
