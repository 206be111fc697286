"""8BITMIME to 7BIT for a peer that does not offer 8BITMIME: Postfix's MIME output conversion (on by
default, `disable_mime_output_conversion = no`), as its mime_state module does it with MIME_OPT_DOWNGRADE.

    downgrade_8bit(content: bytes) -> bytes

- An entity labelled `Content-Transfer-Encoding: 8bit` gets its body encoded as quoted-printable and the
  label changed to `quoted-printable`.
- multipart/* and message/rfc822 entities are descended into (parts split on their boundary); when they
  claim 8bit themselves, their label becomes 7bit.
- Everything else passes byte for byte: headers (8-bit bytes in headers stay: MIME has no body encoding
  for them, and Postfix sends them as they are), bodies without an 8bit label (a non-MIME message with
  8-bit text is sent as it is, as Postfix does), boundaries, preambles and epilogues.
- Nesting deeper than MAX_DEPTH is passed through unchanged. Pure: no I/O, never raises for bad MIME.
"""
from __future__ import annotations

import binascii
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_DEPTH = 20
_CTE = b"content-transfer-encoding"


def downgrade_8bit(content: bytes) -> bytes:
    return _entity(content, "text/plain", 0)


def _entity(data: bytes, default_type: str, depth: int) -> bytes:
    header_lines, body = split_entity(data)
    if depth > MAX_DEPTH:
        return data
    info = parse_headers(header_lines, default_type)
    content_type = info.get_content_type()
    label = str(info.get("content-transfer-encoding", "")).strip().lower()
    boundary = info.get_boundary() if content_type.startswith("multipart/") else None
    if boundary:
        child_type = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        body = _multipart(body, boundary.encode("ascii", "replace"), child_type, depth)
        relabel = b"7bit" if label == "8bit" else None
    elif content_type == "message/rfc822":
        body = _entity(body, "text/plain", depth + 1)
        relabel = b"7bit" if label == "8bit" else None
    elif label == "8bit":
        body = binascii.b2a_qp(body, istext=True)
        relabel = b"quoted-printable"
    else:
        relabel = None
    if relabel is not None:
        header_lines = relabelled(header_lines, relabel)
    return b"".join(header_lines) + body


def split_entity(data: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (folded lines kept as they are, the empty line ending them included) and the body."""
    lines = data.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            return lines[: i + 1], b"".join(lines[i + 1:])
    return lines, b""  # headers only


def parse_headers(header_lines: list[bytes], default_type: str) -> Message:
    info = BytesHeaderParser(policy=compat32).parsebytes(b"".join(header_lines) or b"\r\n")
    info.set_default_type(default_type)
    return info


def relabelled(header_lines: list[bytes], encoding: bytes) -> list[bytes]:
    """The header lines with each Content-Transfer-Encoding field (and its folded lines) replaced."""
    out: list[bytes] = []
    in_field = False
    for line in header_lines:
        if in_field and line[:1] in (b" ", b"\t"):
            continue  # a folded line of the field being replaced
        name, colon, _ = line.partition(b":")
        in_field = bool(colon) and name.strip().lower() == _CTE
        if in_field:
            out.append(b"Content-Transfer-Encoding: " + encoding + line_ending(line))
        else:
            out.append(line)
    return out


def line_ending(line: bytes) -> bytes:
    return b"\r\n" if line.endswith(b"\r\n") else b"\n"


def _multipart(body: bytes, boundary: bytes, child_type: str, depth: int) -> bytes:
    """Each part between `--boundary` lines downgraded; the delimiter lines, preamble and epilogue as they are."""
    delimiter, closing = b"--" + boundary, b"--" + boundary + b"--"
    out: list[bytes] = []
    part: list[bytes] | None = None  # None: in the preamble (or, after the closing delimiter, the epilogue)
    closed = False
    for line in body.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n").rstrip(b" \t")
        if not closed and bare in (delimiter, closing):
            if part is not None:
                out.append(_entity(b"".join(part), child_type, depth + 1))
            out.append(line)
            closed = bare == closing
            part = None if closed else []
        elif part is not None:
            part.append(line)
        else:
            out.append(line)
    if part is not None:  # no closing delimiter: the last part runs to the end
        out.append(_entity(b"".join(part), child_type, depth + 1))
    return b"".join(out)
