"""8-bit header fields to 7 bit for a peer without SMTPUTF8: an encoder (mailflow.transports.encode) that rewrites the
header section as it streams past and passes the body on untouched.

    HeaderDowngrade(limit=MAX_HEADER)     feed(chunk) -> bytes, flush() -> bytes
    needs_header_downgrade(extensions_support_smtputf8, message_smtputf8) -> bool

A message whose header section is ASCII passes byte for byte (one `isascii()` over the header section; when the
first chunk holds the whole header section, as it does for a message in memory, it is passed on without a copy).
Otherwise each field with 8-bit bytes becomes RFC 2047 encoded words (mailflow.message.encode_8bit_fields: the value of
an unstructured field, the display names of an address field); a field whose addresses are not ASCII stays as it is.
A message that came with SMTPUTF8 is not this encoder's: to a peer without SMTPUTF8 it bounces 5.6.7
(commands.cannot_take). Memory: the header section is held until its end is seen, at most `limit` bytes; a longer
one passes unchanged. A DKIM signature over an 8-bit field of someone else's message does not survive this (mail
this host signs is encoded before it is signed: mailflow.signing.outbound). Never raises for malformed input.
"""
from __future__ import annotations

from mailflow.message import encode_8bit_fields, header_end

MAX_HEADER = 102400


def needs_header_downgrade(peer_smtputf8: bool, message_smtputf8: bool) -> bool:
    return not peer_smtputf8 and not message_smtputf8


class HeaderDowngrade:
    """See the module docstring."""

    def __init__(self, limit: int = MAX_HEADER) -> None:
        self._limit = limit
        self._held = bytearray()
        self._done = False

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return data
        if not self._held:  # the usual case: the whole header section in the first chunk, passed on without a copy
            end = header_end(data)
            if end is not None:
                self._done = True
                head = data[:end]
                return data if head.isascii() else encode_8bit_fields(head) + data[end:]
        self._held += data
        end = header_end(bytes(self._held))
        if end is None and len(self._held) <= self._limit:
            return b""
        self._done = True
        held, self._held = bytes(self._held), bytearray()
        if end is None:  # a header section longer than the limit: passed on unchanged
            return held
        return encode_8bit_fields(held[:end]) + held[end:]

    def flush(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        held, self._held = bytes(self._held), bytearray()
        return encode_8bit_fields(held)
