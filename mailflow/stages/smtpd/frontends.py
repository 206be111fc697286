"""What a trusted front end tells smtpd about the real client: the PROXY protocol header of a load balancer
(haproxy's proxy-protocol.txt, v1 and v2; Postfix smtpd_upstream_proxy_protocol = haproxy) and the XCLIENT
command (Postfix XCLIENT_README).

What it owns: reading and checking the bytes, nothing else. `read_proxy_header(reader)` reads exactly the
header and not one byte more (what the client sends next stays for the SMTP reader) and returns the real
client (`ProxiedClient`), or None when the header says to keep the connection's own peer (v1 `PROXY UNKNOWN`,
v2 LOCAL or UNSPEC). `parse_xclient(arg)` turns `NAME=... ADDR=...` into checked values.

Failure behaviour: a malformed header raises `ProxyError` (the session logs a warning and closes without a
greeting, as Postfix does); so does a connection that ends inside the header. The caller bounds the wait
(upstream_proxy_timeout). A bad XCLIENT attribute raises `XclientError` with the reply to send (501 5.5.4).
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
from dataclasses import dataclass

from mailflow import status
from mailflow.syntax import is_hostname

V1_MAX = 107  # the longest v1 header, CRLF included (proxy-protocol.txt section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_TCP4, V2_TCP6, V2_UNSPEC = 0x11, 0x21, 0x00

XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN")
UNAVAILABLE, TEMPUNAVAIL = "[UNAVAILABLE]", "[TEMPUNAVAIL]"


class ProxyError(Exception):
    """A PROXY header that is missing, malformed or unsupported; the text says why (for the log)."""


@dataclass(frozen=True)
class ProxiedClient:
    """The real client as the load balancer saw it."""

    addr: str
    port: int


async def read_proxy_header(reader: asyncio.StreamReader) -> ProxiedClient | None:
    """The PROXY header at the start of the connection (v1 or v2). Raises ProxyError."""
    try:
        start = await reader.readexactly(5)
        if start == b"PROXY":
            return _parse_v1(await _read_v1_line(reader, start))
        if start == V2_SIGNATURE[:5]:
            return await _read_v2(reader, start)
    except asyncio.IncompleteReadError:
        raise ProxyError("connection closed inside the PROXY header") from None
    raise ProxyError(f"no PROXY header: the connection starts with {start!r}")


async def _read_v1_line(reader: asyncio.StreamReader, start: bytes) -> bytes:
    """Byte by byte through the LF (at most 107 bytes): nothing after the header is consumed."""
    line = bytearray(start)
    while not line.endswith(b"\n"):
        if len(line) >= V1_MAX:
            raise ProxyError(f"PROXY v1 header longer than {V1_MAX} bytes")
        line += await reader.readexactly(1)
    if not line.endswith(b"\r\n"):
        raise ProxyError("PROXY v1 header not ended by CRLF")
    return bytes(line[:-2])


def _parse_v1(line: bytes) -> ProxiedClient | None:
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 header with non-ASCII bytes") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return None
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"malformed PROXY v1 header {line[:V1_MAX]!r}")
    version = 4 if words[1] == "TCP4" else 6
    src, _dst = (_v1_address(w, version) for w in words[2:4])
    src_port, _dst_port = (_v1_port(w) for w in words[4:6])
    return ProxiedClient(src, src_port)


def _v1_address(word: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(word)
    except ValueError:
        raise ProxyError(f"PROXY v1 header: {word!r} is not an address") from None
    if addr.version != version or "%" in word:
        raise ProxyError(f"PROXY v1 header: {word!r} is not an IPv{version} address")
    return str(addr)


def _v1_port(word: str) -> int:
    if not word.isdigit() or not word.isascii() or (len(word) > 1 and word[0] == "0") or int(word) > 65535:
        raise ProxyError(f"PROXY v1 header: {word!r} is not a port")
    return int(word)


async def _read_v2(reader: asyncio.StreamReader, start: bytes) -> ProxiedClient | None:
    head = start + await reader.readexactly(11)  # 12-byte signature, version/command, family, length
    if head[:12] != V2_SIGNATURE:
        raise ProxyError("PROXY v2 header with a wrong signature")
    version_command, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    body = await reader.readexactly(length)
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return None
    if command != 1:
        raise ProxyError(f"PROXY v2 header with command {command}")
    if family == V2_UNSPEC:
        return None
    if family == V2_TCP4 and length >= 12:
        return ProxiedClient(str(ipaddress.IPv4Address(body[0:4])), struct.unpack("!H", body[8:10])[0])
    if family == V2_TCP6 and length >= 36:
        return ProxiedClient(str(ipaddress.IPv6Address(body[0:16])), struct.unpack("!H", body[32:34])[0])
    raise ProxyError(f"PROXY v2 header of unsupported family/protocol {family:#04x} (or too short)")


# -------------------------------------------------------------------------------- XCLIENT

class XclientError(Exception):
    """A refused XCLIENT command; `reply` says why."""

    def __init__(self, reply: status.Reply):
        super().__init__(str(reply))
        self.reply = reply


def parse_xclient(arg: str | None) -> dict[str, str | None]:
    """{attribute: value} from `NAME=... ADDR=...` (xtext-decoded and checked); None for [UNAVAILABLE]
    (and for NAME's [TEMPUNAVAIL]). ADDR is normalised ("IPV6:" prefix removed); PROTO is upper case."""
    if not arg or not arg.strip():
        raise XclientError(status.XCLIENT_SYNTAX)
    found: dict[str, str | None] = {}
    for word in arg.split():
        name, equals, raw = word.partition("=")
        name = name.upper()
        if not equals or name not in XCLIENT_ATTRIBUTES:
            raise XclientError(status.xclient_bad("name", word))
        value = _xtext_decode(raw, word)
        found[name] = _checked(name, value, word)
    return found


def _xtext_decode(raw: str, word: str) -> str:
    """RFC 3461 xtext: "+XX" is the byte XX; other characters are printable ASCII other than "+" and "="."""
    out, i = [], 0
    while i < len(raw):
        char = raw[i]
        if char == "+":
            hexa = raw[i + 1:i + 3]
            if len(hexa) != 2 or not re.fullmatch(r"[0-9A-F]{2}", hexa):
                raise XclientError(status.xclient_bad("value", word))
            out.append(chr(int(hexa, 16)))
            i += 3
            continue
        if not ("!" <= char <= "~") or char == "=":
            raise XclientError(status.xclient_bad("value", word))
        out.append(char)
        i += 1
    return "".join(out)


def _checked(name: str, value: str, word: str) -> str | None:
    if value == UNAVAILABLE or (name == "NAME" and value == TEMPUNAVAIL):
        return None
    bad = XclientError(status.xclient_bad("value", word))
    if not value or not all("!" <= c <= "~" for c in value):
        raise bad
    if name == "NAME":
        if not is_hostname(value):
            raise bad
        return value.lower()
    if name == "ADDR":
        text = value[5:] if value.upper().startswith("IPV6:") else value
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise bad from None
        if "%" in text or (addr.version == 4 and text != value):
            raise bad
        return str(addr)
    if name == "PORT":
        if not value.isdigit() or int(value) > 65535:
            raise bad
        return str(int(value))
    if name == "PROTO":
        if value.upper() not in ("SMTP", "ESMTP"):
            raise bad
        return value.upper()
    if len(value) > 255:  # HELO, LOGIN
        raise bad
    return value
