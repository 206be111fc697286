"""leaf: postscreen_dnsbl_sites entries, as Postfix's postscreen_dnsbl.c reads them.

    parse_dnsbl_site("zen.spamhaus.org=127.0.0.[2..11]*3") -> DnsblSite(domain, filter, weight)
    DnsblSite.matches(reply_address)   whether an A record of the list counts (no filter: any)
    reply_filter("127.0.0.[2..11]") -> octet sets    a filter alone (smtpd's reject_rbl_client D=filter too)
    filter_matches(octets, reply_address) -> bool    whether an A record passes it

An entry is `domain[=filter][*weight]`: the weight (default 1; negative weights allowlist) is added to the
client's score once when the filter accepts any of the list's replies (Postfix's psc_dnsbl_receive). A filter is
four dot-separated octet patterns, each a number or `[a..b]` / `[a;b;c]` lists of numbers and ranges, as Postfix's
ip_match.

Failure behaviour: a malformed entry raises ValueError saying what is wrong (the configuration names the key).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_ENTRY = re.compile(r"(?P<domain>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>-?\d+))?")
_OCTET_PATTERNS = re.compile(r"\[[^\]]*\]|[^.\[]+")
_RANGE = re.compile(r"(\d{1,3})(?:\.\.(\d{1,3}))?")


@dataclass(frozen=True)
class DnsblSite:
    """One postscreen_dnsbl_sites entry: the list's domain, the octet sets a reply must match (None: any)."""

    domain: str
    octets: tuple[frozenset[int], ...] | None
    weight: int

    def matches(self, reply: str) -> bool:
        return self.octets is None or filter_matches(self.octets, reply)


def filter_matches(octets: tuple[frozenset[int], ...], reply: str) -> bool:
    try:
        parts = ipaddress.IPv4Address(reply).packed
    except ValueError:
        return False
    return all(part in allowed for part, allowed in zip(parts, octets))


def parse_dnsbl_site(entry: str) -> DnsblSite:
    found = _ENTRY.fullmatch(entry.strip())
    if found is None:
        raise ValueError(f"{entry!r} is not domain[=filter][*weight]")
    pattern = found.group("filter")
    weight = int(found.group("weight") or 1)
    return DnsblSite(found.group("domain").lower().rstrip("."), reply_filter(pattern) if pattern else None, weight)


def reply_filter(pattern: str) -> tuple[frozenset[int], ...]:
    parts = _OCTET_PATTERNS.findall(pattern)
    if len(parts) != 4 or ".".join(parts) != pattern:
        raise ValueError(f"filter {pattern!r} has not four octets")
    return tuple(_octet(part, pattern) for part in parts)


def _octet(part: str, pattern: str) -> frozenset[int]:
    inner = part[1:-1] if part.startswith("[") and part.endswith("]") else part
    values: set[int] = set()
    for item in inner.split(";"):
        found = _RANGE.fullmatch(item)
        if found is None:
            raise ValueError(f"filter {pattern!r}: {part!r} is not a number, [a..b] or [a;b]")
        low, high = int(found.group(1)), int(found.group(2) or found.group(1))
        if high > 255 or low > high:
            raise ValueError(f"filter {pattern!r}: {part!r} is not within 0..255")
        values.update(range(low, high + 1))
    return frozenset(values)
