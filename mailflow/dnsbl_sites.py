"""leaf: postscreen_dnsbl_sites entries, as Postfix's postscreen_dnsbl.c reads them.

    parse_dnsbl_site("zen.spamhaus.org=127.0.0.[2..11]*3") -> DnsblSite(domain, filter, weight)
    DnsblSite.matches(reply_address)   whether an A record of the list counts (no filter: any)
    reply_filter("127.0.0.[2..11]") -> octet sets    a filter alone (smtpd's reject_rbl_client D=filter too)
    filter_matches(octets, reply_address) -> bool    whether an A record passes it

An entry is `domain[=filter][*weight]`: the weight (default 1; negative weights allowlist) is added to the
client's score once when the filter accepts any of the list's replies (Postfix's psc_dnsbl_receive). A filter is
four dot-separated octet patterns, each a number or `[a..b]` / `[a;b;c]` lists of numbers and ranges, as Postfix's
ip_match (ASCII digits, leading zeros taken; `;` only inside brackets; one pair of brackets around the whole pattern
dropped; an empty pattern refused).

Failure behaviour: a malformed entry raises ValueError saying what is wrong (the configuration names the key).
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

_ENTRY = re.compile(r"(?P<domain>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>-?[0-9]+))?")
# ip_match's grammar (ip_match.c): four fields separated by ".", each a decimal number 0..255 (ASCII digits, leading
# zeros taken) or "[" items separated by ";" "]", an item a number or a range "a..b" (a <= b)
_NUMBER = r"[0-9]+"
_ITEM = rf"{_NUMBER}(?:\.\.{_NUMBER})?"
_FIELD = rf"(?:{_NUMBER}|\[{_ITEM}(?:;{_ITEM})*\])"
_PATTERN = re.compile(rf"{_FIELD}(?:\.{_FIELD}){{3}}")
_FIELDS = re.compile(rf"{_NUMBER}|\[[^\]]*\]")
_RANGE = re.compile(rf"({_NUMBER})(?:\.\.({_NUMBER}))?")


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


@functools.lru_cache(maxsize=256)
def reply_filter(pattern: str) -> tuple[frozenset[int], ...]:
    """The octet sets of a filter as Postfix's ip_match_parse takes it: one pair of brackets around the whole
    pattern dropped (`[127.0.0.[2..11]]`), then four fields; ValueError saying why, an empty pattern too. Kept
    per pattern: smtpd asks at each DNS list check."""
    text = _without_outer_brackets(pattern)
    if not text:
        raise ValueError(f"filter {pattern!r}: empty address pattern")
    if not _PATTERN.fullmatch(text):
        raise ValueError(f"filter {pattern!r} is not four octets, each a number or [a..b] / [a;b]")
    return tuple(_octet(part, pattern) for part in _FIELDS.findall(text))


def _without_outer_brackets(pattern: str) -> str:
    """`pattern` without brackets around all of it (ip_match.c: "Strip [] around the entire pattern")."""
    if not pattern.startswith("["):
        return pattern
    level = 0
    for index, char in enumerate(pattern):
        level += (char == "[") - (char == "]")
        if char == "]" and level == 0:
            return pattern[1:-1] if index == len(pattern) - 1 else pattern
    raise ValueError(f"filter {pattern!r}: missing \"]\" character")


def _octet(part: str, pattern: str) -> frozenset[int]:
    inner = part[1:-1] if part.startswith("[") else part
    values: set[int] = set()
    for item in inner.split(";"):
        found = _RANGE.fullmatch(item)
        assert found is not None  # (the pattern matched)
        low, high = int(found.group(1)), int(found.group(2) or found.group(1))
        if high > 255:
            raise ValueError(f"filter {pattern!r}: {part!r} is not within 0..255")
        if low > high:
            raise ValueError(f"filter {pattern!r}: {part!r} is a numeric range error (a..b needs a <= b)")
        values.update(range(low, high + 1))
    return frozenset(values)
