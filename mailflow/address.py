"""Pure address handling: split, normalise domains, check RFC 5321 syntax. No I/O, no config.

- `split(addr) -> (local, domain)`: at the last '@'; domain "" for an unqualified address.
- `normalise_domain(d)`: lower case, no trailing dot, IDNA A-label for matching ("" if it cannot be).
- `mailbox_syntax_error(addr) -> str | None`: why an address is not an RFC 5321 mailbox (None if it is).
"""
from __future__ import annotations

import re

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"'
_LOCAL_RE = re.compile(rf"(?:{_DOT_ATOM}|{_QUOTED})")
_LABEL = r"[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\-\x80-\U0010ffff]*[A-Za-z0-9\x80-\U0010ffff])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_LITERAL_RE = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
MAX_LOCAL = 64
MAX_ADDRESS = 254


def split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def normalise_domain(domain: str) -> str:
    d = domain.strip().rstrip(".").lower()
    if d.startswith("[") or d.isascii():
        return d
    try:
        return d.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


def mailbox_syntax_error(address: str) -> str | None:
    """None when `address` is `local@domain` per RFC 5321 (RFC 6531 for UTF-8); else the reason."""
    if len(address.encode("utf-8")) > MAX_ADDRESS:
        return "address too long"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        return "control character in address"
    local, domain = split(address)
    if not domain:
        return "no domain"
    if not _LOCAL_RE.fullmatch(local):
        return "bad local part"
    if len(local.encode("utf-8")) > MAX_LOCAL:
        return "local part too long"
    if not (_DOMAIN_RE.fullmatch(domain) or _LITERAL_RE.fullmatch(domain)):
        return "bad domain"
    return None


def is_utf8(address: str) -> bool:
    return not address.isascii()
