"""The message as `mailflow sendmail` reads it: addresses from the command line, lines from standard input, the
header section (for -t), streamed so that a big message is never held whole.

    clean_address(value, origin) -> address        `<a@b>` -> `a@b`; a bare local part gets @myorigin; a quoted
                                                   string or literal never closed is closed (`"joe@x` is joe@x)
    clean_recipient(value, origin) -> address      the same, but "" and "<>" (the null address) are refused
    argument_sender(value, origin, warn) -> address
                                                   -f/-r as Postfix's sendmail parses it: the first address of the
                                                   list (`Joe <joe@x>`, `joe@x (Joe)`), `warn` told of any more
    argument_recipients(value, origin) -> addresses
                                                   a command-line argument as an address list, as Postfix's
                                                   sendmail parses it: `a@x, b@y`, `Joe <joe@x>`, `"a,b"@x`,
                                                   `a@x (comment)`, and `a@x b@y` (two: Postfix adds the comma)
    read_message(stream, ignore_dots) -> lines     CRLF line ends; a lone "." (its line end or not) ends the input
                                                   unless ignore_dots; a CR inside a line becomes a space;
                                                   leading mbox "From " lines (each shorter than LINE_LENGTH)
                                                   are dropped; a line longer than
                                                   LINE_PIECE comes in pieces
    line_pieces(stream) -> (text, complete, last)  what both read_message and -bs's DATA read: lines, or pieces
                                                   of LINE_PIECE, without their line ends
    split_input(lines, limit) -> (header section, the rest)
    header_overflows(head, limit) -> bool           the header section goes on past the limit (split_input cut it)
    header_recipients(header) -> addresses         -t: To, Cc, Bcc (Resent-* when the message is a resent one)

Failure behaviour: `clean_address` raises UsageError for an address with spaces or brackets (outside a quoted
local part: `"john smith"@example.org` is an address, as Postfix takes it), CR, LF, NUL or bytes that are not
UTF-8 (`clean_recipient` also for an empty one: a
maildrop file must name real recipients, else pickup sets it aside as corrupt after sendmail said it was stored;
`argument_recipients` also for a mailbox of the list that is not one address: none is dropped unsaid); the rest
never raise.
"""
from __future__ import annotations

import itertools
import re
from typing import BinaryIO, Callable, Iterable, Iterator

from mailflow.address import external_local
from mailflow.header_addresses import closed_address, mailbox_spans
from mailflow.message import CRLF, LINE_LENGTH, header_fields, header_fits, mailbox_line, split_header
from mailflow.sendmail.options import UsageError
from mailflow.stray_cr import lone_cr_as_space
from mailflow.syntax import is_utf8_text

LINE_PIECE = 65536  # standard input is read a line at a time, a longer line in pieces of this size
_RESENT_RECIPIENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def clean_address(value: str, origin: str) -> str:
    """`<a@b>` -> `a@b`; "" and "<>" stay the null sender; a bare local part gets @myorigin; a quoted string or
    literal never closed is closed at the end (`"joe@x.test` is joe@x.test, `bob@[192.0.2.1` bob@[192.0.2.1]), as
    Postfix's tokenizer closes it; the local part in Postfix's quoting (`a."b c"@x` is `"a.b c"@x`: sendmail
    stores the internal form, which Postfix's cleanup quotes so)."""
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    address = closed_address(address)
    outside = _QUOTED_STRING.sub('""', address)  # `"john smith"@x` is an address: its quoted string may hold these
    if any(c in address for c in "\r\n\0") or any(c in "<>" or c.isspace() for c in outside):
        raise UsageError(f"{value!r}: bad address syntax")
    if not is_utf8_text(address):  # bytes of the command line that are not UTF-8 (they cannot be stored)
        raise UsageError(f"{value!r}: bad address syntax: not UTF-8")
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, origin
    return f"{external_local(local)}@{domain}" if address else address


def clean_recipient(value: str, origin: str) -> str:
    """clean_address for a recipient: the null address `<>` (or an empty one) is a usage error."""
    address = clean_address(value, origin)
    if not address:
        raise UsageError(f"{value!r}: bad address syntax: an empty recipient address")
    return address


def argument_sender(value: str, origin: str, warn: Callable[[str], object]) -> str:
    """-f/-r as Postfix's sendmail parses it: the address of the first mailbox (`Joe <joe@x>` and `joe@x (Joe)` are
    joe@x; "" and `<>` the null sender); `warn` is told when the value holds more than one."""
    raw = value.encode("utf-8", "surrogateescape")
    spans = mailbox_spans(raw)
    if not spans or spans[0] is None:
        return clean_address(value, origin)  # the null sender, or a usage error
    if len(spans) > 1:
        warn(f"warning: -f option specified malformed sender: {value}")
    return clean_address(raw[spans[0][0]:spans[0][1]].decode("utf-8", "surrogateescape"), origin)


def argument_recipients(value: str, origin: str) -> list[str]:
    """A command-line recipient argument as the address list Postfix's sendmail parses it as (`a@x, b@y`,
    `Joe <joe@x>`, `"a,b"@x`, comments dropped), each through clean_recipient; a mailbox of the list that is not
    one address is a UsageError."""
    raw = value.encode("utf-8", "surrogateescape")
    found = []
    for span in mailbox_spans(raw):
        if span is None:
            raise UsageError(f"{value!r}: bad address syntax")
        found.append(clean_recipient(raw[span[0]:span[1]].decode("utf-8", "surrogateescape"), origin))
    return found


def read_message(stream: BinaryIO, ignore_dots: bool) -> Iterator[bytes]:
    """The message from standard input, as lines ending in CRLF (a line longer than LINE_PIECE comes in pieces,
    the last ending in CRLF); a lone "." ends it unless `ignore_dots` (also as the last line without a line end,
    as Postfix's sendmail takes it); the mbox "From " lines it starts with (`>From ` too) are dropped, as Postfix's
    sendmail drops them: each shorter than LINE_LENGTH (a longer one, and what follows it, is kept). A CR that is
    not part of the line end becomes a space (mailflow.stray_cr.lone_cr_as_space, smtpd's too), as with Postfix."""
    leading, at_start, skipping = True, True, False
    for text, complete, last in line_pieces(stream):
        if at_start:
            # mbox separators, no header: a line of one record only (Postfix's REC_TYPE_NORM, shorter than
            # line_length_limit); a longer one is kept, and so is what follows
            skipping = leading = leading and complete and len(text) < LINE_LENGTH and mailbox_line(text) is True
            if not skipping and not ignore_dots and text == b"." and (complete or last):
                return  # ("." at the very end of the input, without its line end, counts too)
        if not skipping:
            yield lone_cr_as_space(text) + (CRLF if complete else b"")
        at_start = complete
    if not at_start and not skipping:  # the last line had no line end
        yield CRLF


def line_pieces(stream: BinaryIO) -> Iterator[tuple[bytes, bool, bool]]:
    """`stream` read a line at a time, a line longer than LINE_PIECE in pieces of about that size: (text,
    complete, last) for each piece, where `text` is the piece without its line end (the LF and any CRs before it;
    a CR inside is left as it is), `complete` says the line ends with this piece, and `last` that the input ends
    with it, without a line end (a read shorter than LINE_PIECE that found no LF). A CR at the end of a piece is
    held back and put before the next one, as it may be the first half of a CRLF split between two reads; at the
    end of the input it is dropped. The one reader of sendmail's standard input (deliver mode's read_message,
    -bs's DATA)."""
    carry = b""
    while raw := stream.readline(LINE_PIECE):
        complete = raw.endswith(b"\n")
        data, carry = carry + raw, b""
        if complete:
            yield data.rstrip(b"\r\n"), True, False
        else:
            text = data.rstrip(b"\r")
            carry = data[len(text):]
            yield text, False, len(raw) < LINE_PIECE


def split_input(lines: Iterable[bytes], limit: int) -> tuple[bytes, Iterator[bytes]]:
    """(the header section of `lines` - at most about `limit` bytes of it -, the lines that follow, starting with
    the empty line). A header section longer than `limit` is cut there: the rest goes on as body."""
    head: list[bytes] = []
    size, at_start = 0, True
    rest = iter(lines)
    for line in rest:
        if at_start and line == CRLF:
            return b"".join(head), itertools.chain((line,), rest)
        head.append(line)
        size += len(line)
        at_start = line.endswith(CRLF)
        if size > limit:
            break
    return b"".join(head), rest


def header_overflows(head: bytes, limit: int) -> bool:
    """Whether `head` (split_input's) is a header section cut at `limit`: its fields go on past it, so that
    cleanup would refuse the message (header section larger than header_size_limit) and -t would miss the
    recipients after the cut. A message whose first lines are no header fields (a log piped in) is none."""
    return len(head) > limit and not header_fits(head, limit)


def header_recipients(content: bytes) -> list[str]:
    """-t: the addresses of To, Cc and Bcc, or of Resent-To/-Cc/-Bcc when the message has one of these (Postfix's
    sendmail output_header switches on a recipient field that is HDR_OPT_RR, not on cleanup's wider RESENT_FIELDS:
    a message with a Resent-From but no Resent-To goes to its To), found as Postfix's sendmail finds them
    (mailflow.header_addresses.mailbox_spans): a mailbox with `<...>` is that address only (`To: a@x <b@y>` is
    b@y alone); words side by side without one are an address each (`To: a@x b@y`: both, as Postfix adds the
    missing comma); group names, display names and comments are none."""
    fields = header_fields(split_header(content)[0])
    resent = any(name in _RESENT_RECIPIENT_FIELDS for name, _ in fields)
    wanted = _RESENT_RECIPIENT_FIELDS if resent else ("to", "cc", "bcc")
    found = []
    for name, field_lines in fields:
        if name in wanted:
            value = b"".join(field_lines).split(b":", 1)[1]
            found += [value[span[0]:span[1]].decode("utf-8", "replace") for span in mailbox_spans(value) if span]
    return found

