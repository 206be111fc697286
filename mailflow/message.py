"""The message format, as every stage and transport reads it: the RFC 5322 header section and its fields.

One set of helpers, so that cleanup, the transports, bounce, sendmail and the queue tools agree on where a
header section ends. A leaf module: it imports nothing from the stages or the transports.

Content is bytes with CRLF line ends as queued; a header section whose lines (or the empty line that ends it)
end in a bare LF is accepted too: a sloppy client's headers still count as headers. The header section ends,
as Postfix's cleanup ends it (is_header), at the empty line or at the first line that is neither a header
field (`name:`, the name printable ASCII without a colon, blanks allowed before the colon, the colon within
the line's first 2048 bytes, Postfix's line_length_limit) nor a continuation of one (after a field); such a line
is the first of the body, and cleanup puts the missing empty line before it.

    header_end(data) -> int | None        length of the header section at the start of `data` (its final line end
                                          included) once the line ending it is in `data`; 0 when `data` starts
                                          with the empty line or with a line that is no header field; None when
                                          it is not (yet) there
    split_header(content) -> (head, rest) for a complete message: the header section and the rest, which starts
                                          with the empty line, or with the first line that is no header field; a
                                          message of header fields only is all header section (a missing final
                                          CRLF is supplied)
    read_header(content, limit) -> (head, complete)   the header section of a `Content` (mailflow.content), read
                                          in growing steps, never more than `limit` + 2 + LINE_LENGTH bytes (the
                                          line after the fields is read as far as Postfix's is_header looks); when
                                          it is longer than `limit`, its first `limit` bytes and complete=False
    header_fits(data, limit) -> bool      the header section at the start of `data` (at least `limit` + 2 +
                                          LINE_LENGTH bytes of it) ends within `limit` bytes (a long line that
                                          starts as no field ends it: the body's first line)
    normalized_field_names(head) -> bytes  the header section with the obsolete `name SP :` written `name:` (blanks
                                          before a field's colon removed), as Postfix's cleanup (mime_state) writes
                                          every header field it keeps
    mailbox_line(data, pos) -> bool | None   the line at `pos` of `data` (as received: before dot-unstuffing) is
                                          an mbox `From ` line (`>From ` too), the one test of smtpd's DATA,
                                          sendmail -bs and sendmail's reading, as Postfix's smtpd and sendmail make
                                          it, in its first LINE_LENGTH bytes (Postfix's first record);
                                          None when `data` ends before it is known
    MAILBOX_LINE                          `X-Mailbox-Line: `, the label of such a line
    mailbox_line_room(labelled, limit) -> int   the most bytes the next leading From line may have to be labelled
                                          within `limit` (header_size_limit): smtpd's DATA and sendmail -bs share it
    unlabelled(data, count) -> bytes      `data` with the label taken off its first `count` lines
    mailbox_labels_kept(labelled, unlabelled_form, fits)   labelled content, or its unlabelled form where only that
                                          fits header_size_limit: the one rule of smtpd's DATA and sendmail -bs
    mailbox_lines(data, count) -> (length, labelled)   the first `count` lines of `data` (line ends made CRLF),
                                          each labelled `X-Mailbox-Line: ` as Postfix's smtpd labels the mbox lines
                                          DATA content starts with (a header field, not a line that ends the header
                                          section), and the bytes of `data` they were
    header_lines(head)                    the lines, without their line ends
    header_fields(head)                   (lower-case name, the field's raw lines with continuations) in order
    starts_header_field(text) -> bool     a header field's start, a name and a colon (Postfix's is_header)
    without_fields(head, names)           the header section less the fields named (lower-case names)
    drop_header_names(names) -> frozenset[str]   message_drop_headers as cleanup removes them and milters never
                                          see them (lower-case): the one derivation of both
    header_names(head)                    lower-case names, in order
    header_values(head, name) / header_value(head, name)   unfolded values (every one / the first, or '')
    delivered_to(head) -> frozenset[str]  the addresses of the Delivered-To headers, lower-case (loop detection)
    quoted_original(content, size_limit)  what a delivery notice quotes of a Content: all of it when it is at most
                                          `size_limit` bytes, else its header section (mailflow.stages.bounce)
    rfc5322_date(now) -> str              `Tue, 14 Nov 2023 22:13:20 +0000`
    comment_sanitized(text) -> str        a text made safe inside a (comment) as Postfix's smtpd comment_sanitize:
                                          non-printable, non-ASCII and backslash as `?`, parentheses balanced
    RESENT_FIELDS                         the lower-case names of the Resent-* fields (cleanup)

Nothing here raises for malformed input: a line that is not a header field is skipped by the readers.
"""
from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TypeVar

T = TypeVar("T")
CRLF = b"\r\n"
FIRST_READ = 8192  # read_header's first step; most header sections fit
HEADER_READ_LIMIT = 1_000_000  # how much of a header section readers other than cleanup (which refuses more than
#                                header_size_limit) look at: transports looking for Delivered-To, notices

LINE_LENGTH = 2048  # Postfix's line_length_limit: is_header decides on a line's first record, this long
# header fields (Postfix is_header: a name of printable ASCII but the colon, blanks, the colon within the line's
# first LINE_LENGTH bytes) and their continuation lines, each complete (its line end included)
_FIELD_NAME = rb"(?=[!-9;-~ \t]{0,%d}:)[!-9;-~]+[ \t]*:" % (LINE_LENGTH - 1)
_FIELDS = re.compile(rb"(?:%s[^\n]*\n(?:[ \t][^\n]*\n)*)*" % _FIELD_NAME)
_FIELD_START = re.compile(_FIELD_NAME)
_MAY_START_FIELD = re.compile(rb"[!-9;-~]*[ \t]*")  # what a field's start may be before its colon is read


def starts_header_field(text: str) -> bool:
    """`text` starts as a header field does, a name and a colon (Postfix's is_header)."""
    return bool(_FIELD_START.match(text.encode("utf-8", "replace")))


def _fields_end(data: bytes) -> int:
    """Where the run of complete header fields at the start of `data` ends."""
    return _FIELDS.match(data).end()  # type: ignore[union-attr]  # (it matches the empty string at least)


def header_end(data: bytes) -> int | None:
    end = _fields_end(data)
    return end if data.find(b"\n", end) >= 0 else None  # the complete line after the fields ends them


def split_header(content: bytes) -> tuple[bytes, bytes]:
    return _split_at(content, _fields_end(content))


def _split_at(content: bytes, end: int) -> tuple[bytes, bytes]:
    """split_header, the fields' end (`_fields_end`) found already."""
    # ended by a complete line, or by a last line (without its line end) that is no header field: the body
    if content.find(b"\n", end) >= 0 or (end < len(content) and not _FIELD_START.match(content, end)):
        return content[:end], content[end:]
    head = content if content.endswith(b"\n") or not content else content + CRLF  # all header fields
    return head, b""


def read_header(content, limit: int) -> tuple[bytes, bool]:
    """See the module docstring. `content` is a mailflow.content.Content (anything with `read_prefix` and `size`)."""
    most = limit + 2 + LINE_LENGTH  # (the line after the fields, up to the limit, read as far as is_header looks)
    want = min(FIRST_READ, most)
    while True:
        prefix = content.read_prefix(want)
        fields = _fields_end(prefix)  # (once a read: the one scan of up to `most` bytes)
        if prefix.find(b"\n", fields) >= 0:  # ended by the complete line after the fields
            head = prefix[:fields]
        elif len(prefix) >= content.size:  # the whole message, without a complete line after its fields
            head = _split_at(prefix, fields)[0]
        elif want >= most:
            return (prefix[:fields], True) if _fits(prefix, limit, fields) else (prefix[:limit], False)
        else:
            want = min(want * 8, most)
            continue
        return (head, True) if len(head) <= limit else (head[:limit], False)


def header_fits(data: bytes, limit: int) -> bool:
    """Whether the header section at the start of `data` (the first `limit` + 2 + LINE_LENGTH bytes of a message,
    or more) ends within `limit` bytes: at the empty line, at a complete line that is no header field, or at a line
    longer than the rest of `data` that does not start as one (neither a name and a colon in its first LINE_LENGTH
    bytes nor, after a field, a continuation's blank: a long first body line, a log piped to sendmail, is body as
    Postfix's is_header takes it at its start, its first line_length_limit bytes; so is a first line that starts
    with a blank, no field before it to continue; it was taken for an endless header section and the message
    refused 5.3.4)."""
    return _fits(data, limit, _fields_end(data))


def _fits(data: bytes, limit: int, fields: int) -> bool:
    """header_fits, the fields' end (`_fields_end`) found already."""
    if data.find(b"\n", fields) >= 0:
        return fields <= limit
    line = data[fields:fields + LINE_LENGTH]
    continues = fields > 0 and line[:1] in (b" ", b"\t")
    if fields > limit or not line or continues or _FIELD_START.match(line):
        return False
    return len(line) >= LINE_LENGTH or not _MAY_START_FIELD.fullmatch(line)  # (else its colon may yet come)


_BLANKS_BEFORE_COLON = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)  # (a continuation starts with a blank)


def normalized_field_names(head: bytes) -> bytes:
    if b" :" not in head and b"\t:" not in head:
        return head
    return _BLANKS_BEFORE_COLON.sub(rb"\1:", head)


MAILBOX_LINE = b"X-Mailbox-Line: "
_MAILBOX_LINE = re.compile(rb">*From ")
_MAILBOX_LINE_BEGUN = re.compile(rb">*(?:F(?:r(?:om?)?)?)?")  # what may yet turn out to be one


def mailbox_line(data: bytes | bytearray, pos: int = 0) -> bool | None:
    if pos < len(data) and data[pos] not in b">F":  # (most content: its first byte decides, no regex)
        return False
    record = pos + LINE_LENGTH  # (tested in the line's first record, as Postfix's smtpd tests it: a longer run of
    if _MAILBOX_LINE.match(data, pos, record):  # `>` is no From line, whatever follows it)
        return True
    begun = _MAILBOX_LINE_BEGUN.match(data, pos, record)
    return None if begun is not None and begun.end() == len(data) < record else False


def mailbox_line_room(labelled: int, limit: int) -> int:
    """The most bytes (its line end included) the next leading mbox `From ` line may have, as sent, to be labelled
    `X-Mailbox-Line: ` after `labelled` bytes of labelled lines (their label and CRLF counted) within `limit`
    (header_size_limit): the one rule of smtpd's DATA (Wire.mailbox_lines) and sendmail -bs, decided on the whole
    line, so that the labelled lines themselves never make a header section too big. The header fields after
    them may still pass the limit: smtpd's DATA then keeps the content unlabelled (labelled_mailbox_lines), and
    so does sendmail -bs (StdioSmtp: `unlabelled` on the header section it holds) (docs/config.md)."""
    return limit - labelled - len(MAILBOX_LINE)


def mailbox_lines(data: bytes, count: int) -> tuple[int, bytes]:
    labelled, pos = [], 0
    for _ in range(count):
        end = data.find(b"\n", pos) + 1
        if not end:
            break
        labelled.append(MAILBOX_LINE + data[pos:end].rstrip(b"\r\n") + CRLF)
        pos = end
    return pos, b"".join(labelled)


def mailbox_labels_kept(labelled: T, unlabelled_form: Callable[[], T], fits: Callable[[T], bool]) -> T:
    """The one rule of smtpd's DATA (labelled_mailbox_lines) and sendmail -bs for content whose leading mbox `From `
    lines were labelled `X-Mailbox-Line: `: `labelled` when its header section `fits` (header_size_limit), or when
    the unlabelled form's does not either; else the unlabelled form (its From lines body, a header section that
    fits), rather than a message refused for a header section that labelling made too big."""
    if fits(labelled):
        return labelled
    unlabelled_content = unlabelled_form()
    return unlabelled_content if fits(unlabelled_content) else labelled


def unlabelled(data: bytes, count: int) -> bytes:
    """`data` with the `X-Mailbox-Line: ` label taken off its first `count` lines (mailbox_lines' labels)."""
    kept, pos = [], 0
    for _ in range(count):
        if not data.startswith(MAILBOX_LINE, pos):
            break
        end = data.find(b"\n", pos) + 1 or len(data)
        kept.append(data[pos + len(MAILBOX_LINE):end])
        pos = end
    return b"".join(kept) + data[pos:]


def header_lines(head: bytes) -> list[bytes]:
    return [line.removesuffix(b"\r") for line in head.split(b"\n")]


def header_fields(head: bytes) -> list[tuple[str, list[bytes]]]:
    """Each field as (lower-case name, its lines with their line ends, continuations included). A line that is
    neither a field nor a continuation is kept as a field named ''."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            name, colon, _ = line.partition(b":")
            fields.append((name.strip().decode("latin-1").lower() if colon else "", [line]))
    return fields


def without_fields(head: bytes, names: frozenset[str] | set[str]) -> bytes:
    return b"".join(line for name, lines in header_fields(head) if name not in names for line in lines)


def drop_header_names(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


def header_names(head: bytes) -> list[str]:
    names = []
    for line in header_lines(head):
        if line and line[:1] not in (b" ", b"\t"):
            name, colon, _ = line.partition(b":")
            if colon:
                names.append(name.strip().decode("latin-1").lower())
    return names


def header_values(head: bytes, wanted: str) -> list[str]:
    lines = header_lines(head)
    key = wanted.lower().encode()
    values = []
    for i, line in enumerate(lines):
        name, colon, value = line.partition(b":")
        if colon and line[:1] not in (b" ", b"\t") and name.strip().lower() == key:
            while i + 1 < len(lines) and lines[i + 1][:1] in (b" ", b"\t"):
                i += 1
                value += b" " + lines[i].strip()
            values.append(value.strip().decode("utf-8", "replace"))
    return values


def header_value(head: bytes, wanted: str) -> str:
    values = header_values(head, wanted)
    return values[0] if values else ""


def delivered_to(head: bytes) -> frozenset[str]:
    return frozenset(v.strip().strip("<>").lower() for v in header_values(head, "delivered-to"))


def quoted_original(content, size_limit: int) -> bytes:
    if content.size <= size_limit:
        return content.read_prefix(content.size)
    return read_header(content, HEADER_READ_LIMIT)[0]


def comment_sanitized(text: str) -> str:
    """`text` fit for a header comment, as Postfix's smtpd comment_sanitize: a byte that is not printable ASCII,
    or a backslash, becomes `?`, and so does a `)` that closes nothing; a `(` left open is closed at the end."""
    out = []
    depth = 0
    for ch in text.encode("utf-8").decode("latin-1"):  # (byte by byte, as Postfix: a UTF-8 letter is `??`)
        if not " " <= ch <= "~" or ch == "\\":
            ch = "?"
        elif ch == "(":
            depth += 1
        elif ch == ")":
            if depth:
                depth -= 1
            else:
                ch = "?"
        out.append(ch)
    return "".join(out) + ")" * depth


def rfc5322_date(now: float) -> str:
    return _date_of_second(int(now))


@functools.lru_cache(maxsize=4)  # the messages of one second share it (a pure function of the second)
def _date_of_second(second: int) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(second, timezone.utc))


# the Resent- fields that make a message a resent one for cleanup (Postfix's header_opts, HDR_OPT_RR): cleanup adds
# the Resent-Message-ID, Resent-Date and Resent-From it lacks; another Resent- name (Resent-Comment) is an ordinary
# field. (sendmail -t switches to the Resent- recipients only on a Resent-To, -Cc or -Bcc: mailflow.sendmail.reading)
RESENT_FIELDS = frozenset({"resent-bcc", "resent-cc", "resent-date", "resent-from", "resent-message-id",
                           "resent-reply-to", "resent-sender", "resent-to"})
