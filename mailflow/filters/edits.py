"""Header section edits, as milters ask for them (smfi_addheader, smfi_insheader, smfi_chgheader).

    edit_header(head, edits) -> bytes     `head`: a header section (CRLF lines, without the empty line that
                                          ends it); edits: (add|insert|change, index, name, value) in order
    field_line(name, value) -> bytes      one header field as queued (a value's line ends become CRLF, each
                                          line after one a continuation: TAB-indented unless it is)
    is_field_name(name) -> bool           RFC 5322: printable ASCII but the colon, at least one character

Rules (libmilter's): add appends; insert puts the field at position `index` (0: first); change replaces the
`index`-th (1-based) field of that name, and an empty value deletes it; a change of a field that is not there
adds it (sendmail does). A value starting with a space or tab is written as given after the colon (the milter
negotiated HDR_LEADSPC), else after ": ".

Never raises: an index out of range appends (insert) or does nothing (change of a missing occurrence beyond
the first absent one adds it).
"""
from __future__ import annotations

from mailflow.message import header_fields


def field_line(name: str, value: str) -> bytes:
    lines = value.replace("\r\n", "\n").split("\n")
    # a line break the milter put in the value continues the field: a line not folded is given a TAB (as
    # Postfix's cleanup does), so a value can never end the field and start another one
    value = "\r\n".join([lines[0]] + [line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:]])
    separator = ":" if value[:1] in (" ", "\t") else ": "
    return f"{name}{separator}{value}\r\n".encode("utf-8", "surrogateescape")


def is_field_name(name: str) -> bool:
    return bool(name) and all(33 <= ord(c) <= 126 and c != ":" for c in name)


def edit_header(head: bytes, edits: list[tuple[str, int, str, str]]) -> bytes:
    if not edits:
        return head
    fields: list[tuple[str, bytes]] = [(name, b"".join(lines)) for name, lines in header_fields(head)]
    for kind, index, name, value in edits:
        if kind == "add":
            fields.append((name.lower(), field_line(name, value)))
        elif kind == "insert":
            fields.insert(min(max(index, 0), len(fields)), (name.lower(), field_line(name, value)))
        else:
            _change(fields, index, name, value)
    return b"".join(raw for _, raw in fields)


def _change(fields: list[tuple[str, bytes]], index: int, name: str, value: str) -> None:
    seen = 0
    for position, (existing, _) in enumerate(fields):
        if existing == name.lower():
            seen += 1
            if seen == max(index, 1):
                if value.strip():
                    fields[position] = (existing, field_line(name, value))
                else:
                    del fields[position]
                return
    if value.strip():
        fields.append((name.lower(), field_line(name, value)))
