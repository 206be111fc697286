"""The SMTP client's content checks (Postfix smtp_header_checks, smtp_mime_header_checks, smtp_nested_header_checks
and smtp_body_checks: smtp(8) with header_body_checks.c): the content of mail that leaves this host, edited as it
goes on the wire. The queue keeps the message as it was; a DKIM signature made before (cleanup signs) breaks when
a signed header field is changed or removed here, as in Postfix.

    OutboundChecks(header, mime, nested, body, program="smtp", log=None)   the tables (lists of
                                     mailflow.tables.Table); each unset one is empty: unlike cleanup's, mime and
                                     nested do not fall back to header (Postfix's smtp_mime/nested_header_checks
                                     default to nothing); `program`: smtp or lmtp, the maps' names in warnings and
                                     the logger (mailflow.smtp, mailflow.lmtp) unless `log` is given: the client's
                                     when it is another (relay/smtp's)
      .head(queue_id, head) -> bytes | None   the primary header section as it goes out (None: unchanged); a MIME
                                     header (is_mime_header: Content-Type, ...) is looked up in `mime`, the others
                                     in `header`
      .walks_body -> bool             body lines or part headers are looked up (an encoder is needed)
      .blocking -> bool               a table may wait on I/O: .head is called off the event loop
      .long_head(content) -> bool     .head belongs off the event loop (as cleanup's checks: content_checks.LONG_KEY):
                                     the header section is longer than LONG_KEY (content in a file: not read, True)
      .body(queue_id, head) -> Encoder   the content after `head` (the queued header section, passed on as it is),
                                     line by line as it streams: each MIME part's headers (`mime`; those of an
                                     attached message/rfc822 `nested`, their MIME headers `mime`) and each body line
                                     (`body`; boundaries are, part headers are not; a part's header section
                                     ends at a line that is no header field, a body line: Postfix's mime_state).
                                     A line is looked up in pieces of LINE_PIECE bytes (as Postfix's queue file
                                     records of line_length_limit; the tail of a line sent in pieces is never a
                                     boundary); a part's header line or field longer than FIELD_LIMIT goes out
                                     unchecked as it streams. Memory: one field or one piece. The SMTP client
                                     feeds it off the event loop when the content is longer than LONG_KEY
                                     (body_off_loop; the lines' order is the content's).

    outbound_wire_form(request, checks, generic) -> WireForm   what the SMTP client sends (see the function)

What is matched, as cleanup's checks (mailflow.filters.content_checks): a header field with its lines joined by LF,
no final line end; a body line without its line end. The actions are smtp(8)'s (Postfix 3.7's hbc_action; the
word ends at a space or a TAB):
    WARN [text], INFO [text]   logged (`QID: warning: header Subject: x: text`), the line goes on
    REPLACE text               the line is replaced by `text` (for a header: one that is no header field is logged
                               as Postfix logs it and ignored)
    PREPEND text               `text` goes out before the line (same rule for a header)
    IGNORE                     the line is removed (not logged, as Postfix)
    STRIP [text]               the same, logged (`QID: strip: header X-A: 1: text`; Postfix 3.2)
    DUNNO, OK                  nothing
Any other action (REJECT, HOLD, DISCARD, ...) is logged `unsupported command in smtp_header_checks map: REJECT`
and ignored. A table that cannot answer (LookupRetry) for the header section defers the delivery (the caller:
4.3.0, `smtp header checks lookup error`); one in the body raises out of the encoder, and the SMTP client
(mailflow.transports.smtp.proto) ends the session: 4.3.0 "local data error while talking to h[ip]", as Postfix's
longjmp out of the DATA phase (SMTP_ERR_DATA).
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial

from mailflow.errors import LookupRetry, TemporaryError
from mailflow.content import Content
from mailflow.filters.content_checks import (LONG_KEY, Boundaries, as_key, entity_type, header_key, is_mime_header,
                                             long_head, lookup_action, split_action)
from mailflow.message import HEADER_READ_LIMIT, header_fields, read_header, starts_header_field
from mailflow.model import DeliveryRequest
from mailflow.tables import Table
from mailflow.transports.generic import GenericMaps, WireForm


LINE_PIECE = 2048  # Postfix's line_length_limit: a longer line is queued (and matched) in pieces of this size
FIELD_LIMIT = 64 * 1024  # a MIME part's header field longer than this goes out unchecked
SHOWN = 200  # of the matched text, in the log line (Postfix's %.200s)
TABLE_NAMES = {"header": "header_checks", "mime": "mime_header_checks", "nested": "nested_header_checks",
               "body": "body_checks"}  # (after the program's name: smtp_header_checks, lmtp_header_checks)


class OutboundChecks:
    """See the module docstring."""

    def __init__(self, header: list[Table], mime: list[Table], nested: list[Table], body: list[Table], *,
                 program: str = "smtp", log: logging.Logger | None = None) -> None:
        self._tables = {"header": header, "mime": mime, "nested": nested, "body": body}
        self.program = program
        self.log = log if log is not None else logging.getLogger(f"mailflow.{program}")

    @property
    def blocking(self) -> bool:
        """A table may wait on I/O (sqlite:, unix:; only header_checks may be one: config refuses them elsewhere)."""
        return any(table.blocking for tables in self._tables.values() for table in tables)

    def long_head(self, content: Content) -> bool:
        if not (self._tables["header"] or self._tables["mime"]) or content.size <= LONG_KEY:
            return False
        return not content.in_memory or long_head(read_header(content, HEADER_READ_LIMIT)[0])

    @property
    def walks_body(self) -> bool:
        return any(self._tables[kind] for kind in ("mime", "nested", "body"))

    def head(self, queue_id: str, head: bytes) -> bytes | None:
        if not (self._tables["header"] or self._tables["mime"]):
            return None
        out = [self.header_field(queue_id, "header", b"".join(lines)) for _, lines in header_fields(head)]
        new_head = b"".join(out)
        return None if new_head == head else new_head

    @property
    def checks_body_lines(self) -> bool:
        return bool(self._tables["body"])

    def body(self, queue_id: str, head: bytes) -> BodyChecks:
        return BodyChecks(self, queue_id, head)

    def header_field(self, queue_id: str, kind: str, raw: bytes) -> bytes:
        """One header field (its lines, line ends included) as it goes out, looked up in the `kind` tables (a MIME
        header in `mime`'s)."""
        name, colon, _ = raw.partition(b":")
        if not colon or raw[:1] in (b" ", b"\t"):
            return raw  # (not a field: a line the header section holds anyway)
        if is_mime_header(name.strip().decode("latin-1").lower()):
            kind = "mime"
        key = header_key(raw)
        value = lookup_action(self._tables[kind], key)
        if value is None:
            return raw
        return self._act(queue_id, kind, "header", key, value, raw, _line_end(raw))

    def _map(self, kind: str) -> str:
        return f"{self.program}_{TABLE_NAMES[kind]}"

    def body_line(self, queue_id: str, line: bytes, line_end: bytes) -> bytes:
        """One body line (or piece of one) without its line end, and the line end; what goes out instead."""
        key = as_key(line)
        value = lookup_action(self._tables["body"], key)
        if value is None:
            return line + line_end
        return self._act(queue_id, "body", "body", key, value, line + line_end, line_end)

    def _act(self, queue_id: str, kind: str, where: str, key: str, value: str, original: bytes,
             line_end: bytes) -> bytes:
        """Postfix's hbc_action for smtp(8): what goes out in place of `original`."""
        command, text = split_action(value)
        if command in ("WARN", "INFO"):
            self._log(queue_id, "warning" if command == "WARN" else "info", where, key, text)
            return original
        if command in ("REPLACE", "PREPEND"):
            if not text:
                self.log.warning("%s action without text in %s map", command, self._map(kind))
                return original
            if where == "header" and not starts_header_field(text):
                self.log.warning('bad %s header text "%s" in %s map -- need "headername: headervalue"', command,
                                 text, self._map(kind))
                return original
            self._log(queue_id, command.lower(), where, key, text)
            new = text.replace("\n", "\r\n").encode("utf-8", "surrogateescape")
            return new + line_end if command == "REPLACE" else new + (line_end or b"\r\n") + original
        if command == "STRIP":  # (Postfix 3.2: IGNORE, logged)
            self._log(queue_id, "strip", where, key, text)
            return b""
        if command == "IGNORE":
            return b""
        if command not in ("DUNNO", "OK"):
            self.log.warning("unsupported command in %s map: %s", self._map(kind), value.strip())
        return original


    def _log(self, queue_id: str, action: str, where: str, key: str, text: str) -> None:
        """Postfix's smtp_hbc_logger: `QID: warning: header Subject: x: text` (`: text` only when there is one)."""
        if text:
            self.log.info("%s: %s: %s %.200s: %s", queue_id, action, where, key, text)
        else:
            self.log.info("%s: %s: %s %.200s", queue_id, action, where, key)


class BodyChecks:
    """The encoder of OutboundChecks.body (mailflow.transports.encode's feed/flush). Each byte is handled a bounded
    number of times: what is held is at most LINE_PIECE bytes (a body line) or FIELD_LIMIT (a part's header field),
    the open boundaries are Boundaries (bounded in number and length)."""

    def __init__(self, checks: OutboundChecks, queue_id: str, head: bytes) -> None:
        self._checks = checks
        self._queue_id = queue_id
        self._skip = len(head)
        self._rest = b""  # the line under way (less than LINE_PIECE bytes, or a part's header field under way)
        self._continued = False  # pieces of the line under way went out already: its tail is no line of its own
        self._passing = False  # a part's header line under way went out unchecked: so does the rest of it
        content_type, boundary = entity_type(head)
        self._top_is_message = content_type == "message/rfc822"
        self._boundaries = Boundaries(boundary)
        self._state = "first"  # first (the empty line after the primary header), body, mime, nested
        self._field: list[bytes] = []  # the part's header field under way: its lines
        self._field_bytes = 0
        self._part_head: list[bytes] = []  # the part's header section so far (its type and boundary), bounded
        self._part_head_bytes = 0
        self._unchecked = False  # the field under way grew past FIELD_LIMIT: it goes out as it is

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            out.append(data[:taken])
            data = data[taken:]
        if self._rest:
            data = self._rest + data  # (bounded: see the class docstring)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            out.append(self._line(data[start:end + 1]))
            start = end + 1
        out.append(self._hold(data, start))
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._rest = self._rest, b""
        out = self._line(rest) if rest else b""
        self._continued = False
        return out + self._end_field()

    def _hold(self, data: bytes, start: int) -> bytes:
        """`data[start:]`, a line under way: kept for its line end, or (too long) sent on in part."""
        if self._state in ("mime", "nested"):
            if self._passing:
                self._rest = b""
                return data[start:]
            if len(data) - start + self._field_bytes <= FIELD_LIMIT:
                self._rest = data[start:]
                return b""
            folded = data[start:start + 1] in (b" ", b"\t")  # (a field or a line this long goes out unchecked)
            held = (b"".join(self._field) if folded else self._end_field()) + data[start:]
            self._rest, self._field, self._field_bytes = b"", [b""], FIELD_LIMIT + 1
            self._unchecked = self._passing = True
            return held
        out: list[bytes] = []
        while len(data) - start > LINE_PIECE + 1:  # (held: a whole piece and a CR, so that a line's pieces are the
            out.append(self._body_piece(data[start:start + LINE_PIECE], b""))  # same wherever the chunks end)
            start += LINE_PIECE
            self._continued = True
        self._rest = data[start:]
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        text = line.rstrip(b"\r\n")
        line_end = line[len(text):]
        if self._continued:  # the tail of a line sent on in pieces: no boundary, no header section's end
            self._continued = False
            self._state = "body" if self._state == "first" else self._state
            return self._body_pieces(text, line_end)
        if self._state == "first":
            if not text:
                self._state = "nested" if self._top_is_message else "body"
                return line
            self._state = "body"  # (a header section read whole ends with an empty line; this is a body line)
        if self._state in ("mime", "nested"):
            return self._part_header_line(line, text)
        return self._body_line(text, line_end)

    def _body_line(self, text: bytes, line_end: bytes) -> bytes:
        """A body line; a boundary is one too (Postfix's body_checks see it), and starts a part or ends one."""
        delimiter = self._boundaries.delimiter(text)
        if delimiter is not None:
            self._state = "mime" if delimiter == "part" else "body"
            self._part_head, self._part_head_bytes = [], 0
        return self._body_pieces(text, line_end)

    def _body_pieces(self, text: bytes, line_end: bytes) -> bytes:
        pieces = [text[i:i + LINE_PIECE] for i in range(0, len(text), LINE_PIECE)] or [b""]
        return b"".join(self._body_piece(piece, b"") for piece in pieces[:-1]) + self._body_piece(pieces[-1], line_end)

    def _body_piece(self, text: bytes, line_end: bytes) -> bytes:
        if not self._checks.checks_body_lines:
            return text + line_end
        return self._checks.body_line(self._queue_id, text, line_end)

    def _part_header_line(self, line: bytes, text: bytes) -> bytes:
        """A line of a MIME part's header section: fields are held until complete, then checked. An empty line
        ends the section; so does a line that is no header field (Postfix's mime_state: it is a body line)."""
        if self._passing:  # the end of a line that went out unchecked
            self._passing = False
            return line
        if text and line[:1] in (b" ", b"\t") and self._field:
            self._field_bytes += len(line)
            if self._unchecked or self._field_bytes > FIELD_LIMIT:
                self._unchecked = True
                held, self._field = b"".join(self._field) + line, [b""]  # (the field goes on: its next lines pass)
                return held
            self._field.append(line)
            return b""
        out = self._end_field()
        if not text or not starts_header_field(text.decode("latin-1")):
            self._end_part_head(blank=not text)
            return out + (line if not text else self._body_line(text, line[len(text):]))
        self._field, self._field_bytes = [line], len(line)
        return out

    def _end_part_head(self, *, blank: bool) -> None:
        content_type, boundary = entity_type(b"".join(self._part_head))
        self._boundaries.push(boundary)
        self._state = "nested" if blank and content_type == "message/rfc822" else "body"
        self._part_head, self._part_head_bytes = [], 0

    def _end_field(self) -> bytes:
        field, self._field, self._field_bytes = b"".join(self._field), [], 0
        unchecked, self._unchecked = self._unchecked, False
        if not field:
            return b""
        if self._part_head_bytes < FIELD_LIMIT:
            self._part_head.append(field)
            self._part_head_bytes += len(field)
        if unchecked:
            return field
        return self._checks.header_field(self._queue_id, self._state, field)


def body_off_loop(wire: WireForm | None, content: Content) -> bool:
    """The content goes through body checks (`wire.body`) and is longer than LONG_KEY: it is fed to them in a
    worker thread, as cleanup walks such a body (a part header's key may be FIELD_LIMIT long; RE2 releases the
    GIL)."""
    return wire is not None and wire.body is not None and content.size > LONG_KEY


def _line_end(raw: bytes) -> bytes:
    return b"\r\n" if raw.endswith(b"\r\n") or not raw.endswith(b"\n") else b"\n"


def outbound_wire_form(request: DeliveryRequest, checks: OutboundChecks | None,
                       generic: GenericMaps | None) -> WireForm:
    """The envelope and content as they go on the wire: smtp_header_checks first, smtp_generic_maps on their result
    (Postfix's smtp_header_rewrite order), the body through smtp_body_checks (and the part headers through the
    mime/nested checks) as it streams. An address probe sends no content: nothing is looked up for it.
    Raises LookupRetry (generic maps) or TemporaryError 4.3.0 (a header check that cannot answer)."""
    if checks is None or request.verify:
        return generic.wire_form(request) if generic is not None else WireForm(request.sender)
    queued, whole = read_header(request.content, HEADER_READ_LIMIT)
    if not whole:  # (one warning, one read: the generic maps leave the header as queued too)
        checks.log.warning("%s: header section longer than %d bytes: %s header and body checks%s leave the message "
                           "as queued", request.queue_id, HEADER_READ_LIMIT, checks.program,
                           f" and {checks.program}_generic_maps" if generic is not None else "")
        return generic.wire_form(request, head_as_queued=True) if generic is not None else WireForm(request.sender)
    try:
        checked = checks.head(request.queue_id, queued)
    except LookupRetry as e:
        checks.log.warning("%s: %s header checks lookup error", request.queue_id, checks.program)
        raise TemporaryError("4.3.0", f"{checks.program} header checks lookup error", e.text) from None
    if generic is not None:
        wire = generic.wire_form(request, head=(queued, checked if checked is not None else queued))
    else:
        wire = WireForm(request.sender, head=(len(queued), checked) if checked is not None else None)
    if checks.walks_body:
        wire = dataclasses.replace(wire, body=partial(checks.body, request.queue_id, queued))
    return wire
