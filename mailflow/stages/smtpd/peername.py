"""The client's name at connect, as Postfix's smtpd finds it (smtpd_peername_lookup): the name logs, the Received
header, check_client_access and the policy service see.

    PeerNames(resolver, hosts_file="/etc/hosts", clock=time.monotonic)
    await PeerNames.name(ip) -> str     a name of `ip` whose addresses include `ip` (forward-confirmed), else
                                        "unknown"
    PeerNames.hosts_name(ip) -> str | None   the hosts file's part of it (no DNS)

The name comes from the hosts file first (as the system's resolver, which Postfix uses, reads it: the first name
of the first line naming the address; `127.0.0.1` is `localhost` on most hosts), else from DNS: the first PTR
name when its A/AAAA records include the address (mailflow.dns.confirmed_name, as reject_unknown_client_hostname
asks it; Postfix's getnameinfo gives one name). DNS is never asked about a loopback address (a test suite's sink
on a host whose DNS is out of reach must not wait for it at every connection). The hosts file is read again when
it changed (looked at no more than once a second); when it cannot be read then (no file descriptor left, say),
the names read last stay in use and it is tried again at the next look (one warning until it is read).

Failure behaviour: never raises; a name DNS cannot give now (no PTR record, a lookup error or timeout, a name
that does not lead back to the address, LOOKUPS_IN_FLIGHT lookups already under way) is "unknown", as in
Postfix (which then tells the two apart only for reject_unknown_client_hostname, a check restrictions.py makes
with lookups of its own).
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import time
from typing import Callable

from mailflow.dns import client_name, ptr_names
from mailflow.errors import LookupRetry

log = logging.getLogger("mailflow.smtpd")

UNKNOWN = "unknown"
HOSTS_FILE = "/etc/hosts"
HOSTS_RECHECK = 1.0  # seconds between looks at the hosts file's modification time
# DNS lookups under way at once, at most; a client that would make one more is "unknown" at once. The lookup
# comes before the admission (connection limits, session slots), as in Postfix, whose process limit bounds it.
LOOKUPS_IN_FLIGHT = 100


class PeerNames:
    def __init__(self, resolver, hosts_file: str = HOSTS_FILE, clock: Callable[[], float] = time.monotonic):
        self._resolver = resolver
        self._in_flight = 0
        self._hosts_file = hosts_file
        self._clock = clock
        self._hosts_version: tuple[int, int] | None = None
        self._hosts_checked = float("-inf")
        self._hosts_unreadable = False  # logged once until it is read again
        self._names: dict[str, str] = {}  # address -> its first name in the hosts file
        self._addresses: dict[str, set[str]] = {}  # lower-case name -> its addresses in the hosts file

    async def name(self, ip: str) -> str:
        address = _normalised(ip)
        if address is None:
            return UNKNOWN
        name = self._hosts_name(address)
        if name is not None:
            return name
        if self._resolver is None or self._in_flight >= LOOKUPS_IN_FLIGHT or _is_loopback(address):
            return UNKNOWN
        self._in_flight += 1
        try:
            return await self._dns_name(address)
        finally:
            self._in_flight -= 1

    def hosts_name(self, ip: str) -> str | None:
        """The address's first name in the hosts file, when that name leads back to it there; else None."""
        address = _normalised(ip)
        return self._hosts_name(address) if address is not None else None

    def _hosts_name(self, address: str) -> str | None:
        self._refresh_hosts()
        name = self._names.get(address)
        if name is not None and address in self._addresses.get(name.lower(), ()):
            return name
        return None

    async def _dns_name(self, address: str) -> str:
        """The verified name; Postfix's warning when the first PTR name is none (numeric, malformed, not leading
        back to the address)."""
        try:
            names = await ptr_names(self._resolver, address)
        except LookupRetry as e:
            log.debug("%s: no client name now: %s", address, e)
            return UNKNOWN
        verdict = await client_name(self._resolver, address, names)
        if verdict.warning:
            log.warning("%s", verdict.warning)
        return verdict.name.rstrip(".") or UNKNOWN

    def _refresh_hosts(self) -> None:
        now = self._clock()
        if now - self._hosts_checked < HOSTS_RECHECK:
            return
        self._hosts_checked = now
        try:
            st = os.stat(self._hosts_file)
        except OSError:
            self._names, self._addresses, self._hosts_version = {}, {}, None
            return
        version = (st.st_mtime_ns, st.st_size)
        if version == self._hosts_version:
            return
        try:
            with open(self._hosts_file, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError as e:  # (no descriptor left, say): the names read last kept, tried again at the next look
            if not self._hosts_unreadable:
                log.warning("cannot read %s: %s (trying again each %gs)", self._hosts_file, e, HOSTS_RECHECK)
            self._hosts_unreadable = True
            return
        self._hosts_unreadable = False
        self._names, self._addresses = _parse_hosts(lines)
        self._hosts_version = version


def _parse_hosts(lines: list[str]) -> tuple[dict[str, str], dict[str, set[str]]]:
    names: dict[str, str] = {}
    addresses: dict[str, set[str]] = {}
    for line in lines:
        fields = line.split("#", 1)[0].split()
        address = _normalised(fields[0]) if len(fields) >= 2 else None
        if address is None:
            continue
        names.setdefault(address, fields[1])
        for name in fields[1:]:
            addresses.setdefault(name.lower(), set()).add(address)
    return names, addresses


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


@functools.lru_cache(maxsize=4096)  # (an address parse costs ~2 µs; clients come back)
def _normalised(ip: str) -> str | None:
    """The address as ipaddress writes it (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)
