"""8BITMIME to 7BIT for a peer that does not offer 8BITMIME: Postfix's MIME output conversion (on by
default, `disable_mime_output_conversion = no`), as its mime_state module does it with MIME_OPT_DOWNGRADE.

    Downgrade()                 an encoder (see mailflow.transports.encode): feed(chunk) -> bytes, flush() -> bytes
    downgrade_8bit(content: bytes) -> bytes     the same over a whole message (tests, small content)
    await labelled_8bit(content: Content, header=None) -> bool   whether a header section (the message's, a
                                part's, an attached message's) labels its entity 8bit or binary: what Postfix's
                                cleanup marks 8BITMIME (auto_8bit_enc_hdr), read as this module reads the label
                                (see below); `header`: the message's header fields when the caller has them apart
    await utf8_header_section(content: Content, header=None) -> bool   whether a header section (the same ones)
                                holds a byte that is not ASCII: what Postfix's cleanup records as
                                SMTPUTF8_FLAG_HEADER (cleanup_out_header, for the message's and every MIME part's
                                header fields); read as labelled_8bit reads (a message with no part: its header)

- An entity labelled `Content-Transfer-Encoding: 8bit` or `binary` (any case, blanks before the colon allowed,
  comments ignored: Postfix's
  mime_state reads the label as a token and counts binary in the 8-bit domain; of several labels the last one it
  knows decides, `labelled_domain`) gets its body encoded as quoted-printable: the labels read while the entity
  is 8-bit are dropped and `Content-Transfer-Encoding: quoted-printable` ends its header section (`relabelled`),
  as mime_state writes them; the body byte for byte as mime_state_downgrade writes it:
  `=XX` for '=', control characters but tab, and bytes past '~'; a space or tab ending a line as `=20`/`=09`;
  a soft line break (`=` and the body's line end) as soon as an output line holds more than QP_SOFT_LIMIT
  characters and more of the line follows (lines of 74 to 76 characters with the `=`).
- A header section ends at its empty line, or before its first line that neither starts a field (Postfix's
  is_header: a name of printable ASCII but the colon, blanks, then the colon) nor continues one (`_ends_headers`):
  the label is written before that line, which is the body's first, as Postfix's mime_state writes them.
- multipart/* and message/rfc822 entities are descended into (parts split on their boundary); when they
  claim 8bit or binary themselves, their label becomes 7bit (written as above). A message/global entity is
  descended into too, but when converting (Downgrade's `converting`) one labelled 8bit or binary: that one's
  body is encoded as quoted-printable, as mime_state does with MIME_OPT_DOWNGRADE (cleanup's questions,
  labelled_8bit and utf8_header_section, are asked without it, so there every message/global is read within).
  Other message/* types are bodies, as there. The content type is read without RFC 822 comments
  (`Content-Type: (c) multipart/mixed` is multipart/mixed, as Postfix's header_token reads it).
- Everything else passes byte for byte: headers (8-bit bytes in headers stay: MIME has no body encoding
  for them, and Postfix sends them as they are), bodies without an 8bit label (a non-MIME message with
  8-bit text is sent as it is, as Postfix does), boundaries, preambles and epilogues.
- Nesting deeper than MAX_DEPTH is passed through unchanged. Never raises for bad MIME.

`labelled_8bit` reads the label as the conversion does (its first word, comments ignored), where Postfix's cleanup
compares the whole value: a label `8bit (comment)` marks the message here, so that every message the conversion
would change is marked (docs/transports.md; `8bit` then `7bit` too: the conversion drops the 8bit field, and
Postfix's cleanup marks any 8bit label). It stops at the first entity the conversion changes. cleanup asks this of every
message, and gives the header fields: a message that is one entity (no multipart or message Content-Type) is
judged by them alone, its body not read (a case-insensitive search of the whole content took 380 µs per 100 KB
message, a quarter of what mailflow spends on it); a MIME message is parsed in one pass, in a worker thread when
over READ_INLINE; there a part's header section with no Content-* field is not parsed (`entity_facts`: its default
type, no label; a message of 1.4M empty parts took 14 s with a parse per part). Without the header, a content in
which no `Content-Transfer-Encoding` can be (`ransfer-` or `RANSFER-` nowhere: the field name in any case people
write it) is not parsed at all.

It streams, like Postfix's mime_state: the content goes through line by line (runs of body lines at once),
keeping only the header section of the entity being read (at most MAX_HEADER bytes: a longer one, and its
body, pass through unchanged) and a partial line (at most MAX_LINE bytes: a longer line is handled in pieces;
in a quoted-printable body the encoded line goes on across the pieces, as Postfix's continues across records). A
boundary line is recognised only at the start of a line; the boundary of an outer multipart ends the inner parts, as the
boundaries nest.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Iterable

from mailflow.content import Content
from mailflow.message import normalized_field_names

MAX_DEPTH = 20
MAX_HEADER = 102400
MAX_LINE = 65536
_CTE = b"content-transfer-encoding"
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # (blanks before the colon: as parse_headers reads the name)
# the labels Postfix's mime_state knows (mime_encoding_map): whether each puts its entity in the 8-bit domain
_DOMAINS = {"7bit": False, "8bit": True, "binary": True, "quoted-printable": False, "base64": False}
QP_SOFT_LIMIT = 72  # mime_state.c: a soft line break once the output line is longer than this and more follows
_QP_ESCAPED = re.compile(rb"[\x00-\x08\x0a-\x1f=\x7f-\xff]")
# what the field name Content-Transfer-Encoding holds however it is written (Title-Case, lower, upper, mixed by word)
_LABEL_HINTS = (b"ransfer-", b"RANSFER-")
READ_INLINE = 1 << 20  # bytes of a MIME message labelled_8bit reads on the event loop; a bigger one in a thread
# a Content-Type whose entity holds others (parts with header sections of their own), its value maybe folded
# a line that starts a field named Content-something: without one, a header section decides nothing here
_CONTENT_FIELD = re.compile(rb"(?:\A|[\r\n])content-", re.IGNORECASE)  # (a bare CR ends a line for Python)
# (or a comment first: parsed, to be sure)
_NESTING_TYPE = re.compile(rb"^content-type:[ \t\r\n]*(?:\(|multipart|message)", re.IGNORECASE | re.MULTILINE)


@dataclass
class _Multipart:
    delimiter: bytes
    closing: bytes
    child_type: str
    depth: int


def downgrade_8bit(content: bytes) -> bytes:
    converter = Downgrade()
    return converter.feed(content) + converter.flush()


async def labelled_8bit(content: Content, header: bytes | None = None) -> bool:
    """See the module docstring. `header`: the message's header fields, when the caller has them apart (cleanup's
    content begins with its header block; its end, the empty line, may be in the next part)."""
    if header is not None and not _NESTING_TYPE.search(header):  # no part has a header: the message's decides
        return any(hint in header for hint in _LABEL_HINTS) and _relabels(header.rstrip(b"\r\n") + b"\r\n\r\n")
    if header is None and not await _names_a_label(content):  # (a MIME message almost always names one: no look)
        return False
    return await _parsed_until(content, "relabelled")


async def utf8_header_section(content: Content, header: bytes | None = None) -> bool:
    """See the module docstring. `header`: as labelled_8bit's."""
    if header is not None and not header.isascii():
        return True
    if header is not None and not _NESTING_TYPE.search(header):  # no part has a header section of its own
        return False
    return await _parsed_until(content, "utf8_header")


async def _parsed_until(content: Content, fact: str) -> bool:
    """Whether the conversion, fed `content`, finds `fact` (a Downgrade attribute: "relabelled", "utf8_header");
    it stops there. A content over READ_INLINE is read in a worker thread."""
    if content.size > READ_INLINE:
        return await asyncio.to_thread(_parts_found, content.chunks(), fact)
    converter = Downgrade(converting=False)
    async for chunk in content.stream():
        converter.feed(chunk)
        if getattr(converter, fact):
            return True
    converter.flush()
    return bool(getattr(converter, fact))


def _parts_found(chunks: Iterable[bytes], fact: str) -> bool:
    converter = Downgrade(converting=False)
    for chunk in chunks:
        converter.feed(chunk)
        if getattr(converter, fact):
            return True
    converter.flush()
    return bool(getattr(converter, fact))


def _relabels(header: bytes) -> bool:
    converter = Downgrade(converting=False)
    converter.feed(header)
    return converter.relabelled


async def _names_a_label(content: Content) -> bool:
    """Whether a Content-Transfer-Encoding field may be in `content` (see the module docstring)."""
    tail = b""
    async for chunk in content.stream():
        joint = tail + chunk[:len(_CTE)]  # (a name cut by a chunk's end)
        if any(hint in chunk or hint in joint for hint in _LABEL_HINTS):
            return True
        tail = chunk[-len(_CTE):]
    return False


class Downgrade:
    """See the module docstring. `relabelled`: an entity's 8bit or binary label was changed; `utf8_header`: a header
    section read so far holds a byte that is not ASCII. `converting`: as mime_state with MIME_OPT_DOWNGRADE (the
    SMTP client's conversion); False: as cleanup's mime_state reads (only the facts are wanted)."""

    def __init__(self, converting: bool = True) -> None:
        self._converting = converting
        self._partial = b""  # the start of a line whose end has not arrived
        self._mid_line = False  # the current line was already passed on in pieces (a very long line)
        self._multiparts: list[_Multipart] = []  # open multiparts, outermost first
        self._mode = "headers"  # of the current entity: "headers", then its body: "qp" or "pass"
        self._headers: list[bytes] = []
        self._header_size = 0
        self._default_type = "text/plain"
        self._depth = 0
        self._eol = b"\r\n"  # the quoted-printable body's line end, from its first line
        self._qp_open = b""  # the encoded start of an output line whose input line goes on (a very long line)
        self.relabelled = False
        self.utf8_header = False

    def feed(self, data: bytes) -> bytes:
        if self._partial:
            data, self._partial = self._partial + data, b""
        out: list[bytes] = []
        end = data.rfind(b"\n") + 1
        pos = 0
        while pos < end:
            pos = self._lines(data, pos, end, out)
        if end < len(data):
            self._partial = data[end:]
            if len(self._partial) > MAX_LINE:  # (a CR at its end waits: it may be the line's end)
                cut = len(self._partial) - self._partial.endswith(b"\r")
                piece, self._partial = self._partial[:cut], self._partial[cut:]
                self._piece(piece, out)
        return b"".join(out)

    def flush(self) -> bytes:
        out: list[bytes] = []
        if self._partial:
            piece, self._partial = self._partial, b""
            if self._mode == "headers" and not self._ends_headers(piece):
                self._headers.append(piece)
            elif self._mode == "headers":
                self._end_headers_early(piece, out)
            else:
                self._body(piece, out)
        if self._qp_open:  # a long line whose pieces all came: its end
            out.append(self._qp_line(b"", more=False))
        if self._mode == "headers":
            self._end_headers(out, body_follows=False)
        return b"".join(out)

    # -- lines

    def _lines(self, data: bytes, pos: int, end: int, out: list[bytes]) -> int:
        """Handle complete lines from `pos` (a line start) up to `end`; returns where it stopped."""
        if self._mid_line:  # the rest of a long line (in a body by now): never a header line or a boundary
            nl = data.index(b"\n", pos) + 1
            self._mid_line = False
            self._body(data[pos:nl], out)
            return nl
        if self._mode != "headers":
            stop = self._next_dash_line(data, pos, end)
            if stop > pos:  # ordinary body lines: as one run
                self._body(data[pos:stop], out)
                return stop
        nl = data.index(b"\n", pos) + 1
        self._line(data[pos:nl], out)
        return nl

    def _next_dash_line(self, data: bytes, pos: int, end: int) -> int:
        """Where the next line that may be a boundary (it starts with "--") begins; `end` when none can be."""
        if not self._multiparts:
            return end
        if data.startswith(b"--", pos):
            return pos
        found = data.find(b"\n--", pos, end)
        return end if found < 0 else found + 1

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if self._boundary(line, out):
            return
        if self._mode != "headers":
            self._body(line, out)
        elif line in (b"\r\n", b"\n"):
            self._end_headers(out, body_follows=True)
            out.append(line)
        elif self._ends_headers(line):
            self._end_headers_early(line, out)
        else:
            self._headers.append(line)
            self._header_size += len(line)
            if self._header_size > MAX_HEADER:
                self._overflow(b"", out)

    def _ends_headers(self, line: bytes) -> bool:
        """Whether `line` (not empty) ends the header section being read: the one decision of where it ends, as
        Postfix's mime_state makes it: a line that neither continues a field (a blank first, after a field) nor
        starts one (is_header: a name of printable ASCII but the colon, blanks, then the colon)."""
        if self._headers and line[:1] in (b" ", b"\t"):
            return False
        return not _FIELD_NAME.match(line)

    def _end_headers_early(self, line: bytes, out: list[bytes]) -> None:
        """A line that is no field ended the header section: as Postfix's mime_state writes it (a private Postfix
        3.7.11 compared), the section ends before it, with the new label if any and no blank line, and the line is
        the first of the body, encoded as the entity's labels decided (an attached message is not descended into)."""
        if self._end_headers(out, body_follows=False):
            self._mode = "qp"
        self._line(line, out)

    def _boundary(self, line: bytes, out: list[bytes]) -> bool:
        """A delimiter of an open multipart (the outermost that matches): ends the current entity."""
        if not self._multiparts or not line.startswith(b"--"):
            return False
        bare = line.rstrip(b"\r\n").rstrip(b" \t")
        for i, mp in enumerate(self._multiparts):
            if bare == mp.delimiter or bare == mp.closing:
                if self._mode == "headers":
                    self._end_headers(out, body_follows=False)
                out.append(line)
                if bare == mp.closing:  # what follows is that multipart's epilogue
                    del self._multiparts[i:]
                    self._mode = "pass"
                else:
                    del self._multiparts[i + 1:]
                    self._start_entity(mp.child_type, mp.depth + 1)
                return True
        return False

    def _piece(self, piece: bytes, out: list[bytes]) -> None:
        """The first MAX_LINE bytes of a line that goes on: passed on now, the rest of the line follows."""
        if self._mode == "headers":  # a header line this long: the section is not kept
            self._overflow(piece, out)
        else:
            self._body(piece, out, more=True)
        self._mid_line = True

    # -- entities

    def _start_entity(self, default_type: str, depth: int) -> None:
        self._headers, self._header_size = [], 0
        self._default_type, self._depth = default_type, depth
        self._mode = "headers" if depth <= MAX_DEPTH else "pass"

    def _overflow(self, more: bytes, out: list[bytes]) -> None:
        """A header section too long to keep: it and its body pass through unchanged."""
        self.utf8_header = self.utf8_header or not (more.isascii() and all(h.isascii() for h in self._headers))
        out.extend(self._headers)
        if more:
            out.append(more)
        self._headers, self._header_size = [], 0
        self._mode = "pass"

    def _end_headers(self, out: list[bytes], *, body_follows: bool) -> bool:
        """The header section is complete: relabel it if need be, and decide how its body goes. Returns whether its
        labels put the entity in the 8-bit domain."""
        joined = b"".join(self._headers)
        names_content = bool(_CONTENT_FIELD.search(joined))  # (asked once: both below need it)
        self.utf8_header = self.utf8_header or not joined.isascii()
        content_type, eight_bit, boundary = entity_facts(self._headers, self._default_type, names_content)
        relabel = None
        mode = "pass"
        nested = content_type == "message/rfc822" or (
            content_type == "message/global" and not (eight_bit and self._converting))
        if boundary:
            delimiter = b"--" + boundary.encode("ascii", "replace")
            child = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
            self._multiparts.append(_Multipart(delimiter, delimiter + b"--", child, self._depth))
            relabel = b"7bit" if eight_bit else None
        elif nested:
            relabel = b"7bit" if eight_bit else None
        elif eight_bit:
            relabel, mode = b"quoted-printable", "qp"
        headers = self._headers
        if relabel is not None or names_content:
            downgraded = relabelled(headers, relabel)
            if downgraded != headers:
                headers, self.relabelled = downgraded, True
        out.extend(headers)
        self._eol = b""
        if nested and not boundary and body_follows:
            self._start_entity("text/plain", self._depth + 1)
            return eight_bit
        self._headers, self._header_size = [], 0
        self._mode = mode
        return eight_bit

    def _body(self, data: bytes, out: list[bytes], *, more: bool = False) -> None:
        """Body lines (`more`: the start of a line that goes on; else its end, or the body's unended last line)."""
        if self._mode != "qp":
            out.append(data)
            return
        if not self._eol:  # the body's first line end decides the soft breaks' (LF alone: LF)
            nl = data.find(b"\n")
            self._eol = b"\n" if nl == 0 or (nl > 0 and data[nl - 1] != 0x0D) else b"\r\n"
        *lines, last = data.split(b"\n")
        for line in lines:
            crlf = line.endswith(b"\r")
            out.append(self._qp_line(line[:-1] if crlf else line, more=False) + (b"\r\n" if crlf else b"\n"))
        if last:
            out.append(self._qp_line(last, more=more))

    def _qp_line(self, text: bytes, *, more: bool) -> bytes:
        """One input line (or, with `more`, the start of one) as Postfix's mime_state_downgrade encodes it."""
        encoded = self._qp_open + _QP_ESCAPED.sub(_qp_escape, text)
        self._qp_open = b""
        pieces = []
        start = 0
        while len(encoded) - start > QP_SOFT_LIMIT + 1:
            end = _qp_break(encoded, start)
            if end >= len(encoded):
                break
            pieces.append(encoded[start:end] + b"=" + self._eol)
            start = end
        rest = encoded[start:]
        if more:  # whether a soft break follows depends on what comes
            self._qp_open = rest
            return b"".join(pieces)
        if rest[-1:] in (b" ", b"\t"):
            rest = rest[:-1] + _qp_escape_byte(rest[-1])
        return b"".join(pieces) + rest


def _qp_break(encoded: bytes, start: int) -> int:
    """Where Postfix's output line that starts at `start` ends: it takes characters while it holds at most
    QP_SOFT_LIMIT, so it ends with the character, or the `=XX` triplet, at offset QP_SOFT_LIMIT."""
    limit = start + QP_SOFT_LIMIT
    for back in (0, 1, 2):  # a triplet starting at the limit, or one or two before it, is kept whole
        if encoded[limit - back:limit - back + 1] == b"=":
            return limit - back + 3
    return limit + 1


def _qp_escape(match: re.Match) -> bytes:
    return _qp_escape_byte(match.group()[0])


def _qp_escape_byte(byte: int) -> bytes:
    return b"=%02X" % byte


def transfer_encoding(value: str) -> str:
    """A Content-Transfer-Encoding field's mechanism, lower case, without its RFC 822 comments."""
    words = _uncommented(value).split()
    return words[0].lower() if words else ""


def _uncommented(value: str) -> str:
    """`value` without its RFC 822 comments (nested ones too)."""
    depth, kept = 0, []
    for c in value:
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(c)
    return "".join(kept)


def content_type_of(info: Message) -> str:
    """The entity's content type, lower case, as Python's parser reads it but without RFC 822 comments and blanks
    (`(c) multipart/mixed`, `multipart / mixed`: multipart/mixed, as Postfix's header_token reads them)."""
    value = info.get("content-type")
    if value is None:
        return info.get_content_type()
    found = "".join(_uncommented(str(value)).split(";", 1)[0].split()).lower()
    return found if found.count("/") == 1 else "text/plain"


def entity_facts(header_lines: list[bytes], default_type: str,
                 names_content: bool | None = None) -> tuple[str, bool, str | None]:
    """What an entity's header section decides here: its content type, whether it is labelled 8bit or binary, and
    its boundary (a multipart's). A section with no field named Content-* (most parts of a message of many small
    ones) has its default type and no label: it is not parsed (Python's parser cost ~9 µs a part). `names_content`:
    whether it names one, when the caller has looked already."""
    if names_content is None:
        names_content = bool(_CONTENT_FIELD.search(b"".join(header_lines)))
    if not names_content:
        return default_type, False, None
    info = parse_headers(header_lines, default_type)
    content_type = content_type_of(info)
    eight_bit = labelled_domain(info.get_all("content-transfer-encoding") or [])
    boundary = info.get_boundary() if content_type.startswith("multipart/") else None
    return content_type, eight_bit, boundary


def parse_headers(header_lines: list[bytes], default_type: str) -> Message:
    """An entity's header section, its field names read as Postfix's mime_state reads them: `Content-Transfer-Encoding
    : 8bit` (blanks before the colon) is the label (Python's parser takes such a line for no field)."""
    head = normalized_field_names(b"".join(header_lines))
    info = BytesHeaderParser(policy=compat32).parsebytes(head or b"\r\n")
    info.set_default_type(default_type)
    return info


def labelled_domain(labels: Iterable[str], eight_bit: bool = False) -> bool:
    """Whether an entity with these Content-Transfer-Encoding values (in order) is in the 8-bit domain, as Postfix's
    mime_state reads them: each label it knows (_DOMAINS) sets the domain, so the last such one decides; one it does
    not know changes nothing. `eight_bit`: the domain before them."""
    for label in labels:
        eight_bit = _DOMAINS.get(transfer_encoding(str(label)), eight_bit)
    return eight_bit


def relabelled(header_lines: list[bytes], encoding: bytes | None) -> list[bytes]:
    """The header lines as Postfix's mime_state writes them when it converts 8-bit content (MIME_OPT_DOWNGRADE):
    a Content-Transfer-Encoding field (with its folded lines) is dropped when, once it is read, the entity is in the
    8-bit domain (labelled_domain: `8bit` then `7bit` keeps the 7bit field only), kept otherwise; and the new label
    `encoding` (None: none), when the entity ends in the 8-bit domain, is added at the end of the section.
    `header_lines` are fields and their folded lines only (Downgrade._ends_headers ends the section before any other
    line), so the label is inside the section, where Postfix writes it."""
    out: list[bytes] = []
    fields: list[list[bytes]] = []
    for line in header_lines:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    eight_bit = False
    for field in fields:
        name, colon, value = field[0].partition(b":")
        if name.strip().lower() == _CTE:
            eight_bit = labelled_domain([b"".join((value, *field[1:])).decode("latin-1")], eight_bit)
            if eight_bit:
                continue
        out.extend(field)
    if encoding is not None:
        last = out[-1] if out else b""
        eol = line_ending(last) if last.endswith(b"\n") else b"\r\n"
        out.extend(([eol] if last and not last.endswith(b"\n") else [])
                   + [b"Content-Transfer-Encoding: " + encoding + eol])
    return out


def line_ending(line: bytes) -> bytes:
    return b"\r\n" if line.endswith(b"\r\n") else b"\n"
