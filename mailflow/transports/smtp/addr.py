"""Where a delivery goes (Postfix smtp_addr): the next hop as written, the peers behind it, the MX order.

One next-hop parser and one peer type for the SMTP and LMTP clients. The resolver and the RNG are arguments.

    parse_nexthop(written, default_port, lmtp=False) -> Nexthop     raises ValueError for an unusable next hop
        smtp: `[host]:port`, `[host]` (no MX lookup), `domain:port`, `domain` (MX lookup); an address in
              brackets may carry RFC 5321's `IPv6:` tag (`[IPv6:2001:db8::1]:25`), as Postfix's host_port takes it,
              and an IPv4 one leading zeros (`[192.0.2.01]` is 192.0.2.1, read as decimal)
        lmtp: `[host]:port`, `host:port`, `[host]`, `host`, optionally after `inet:` (never an MX lookup), or
              `unix:/path` (a UNIX-domain socket); the port defaults to `default_port`
    Peer(host, address, port)     one address of one host: `name` "host[address]" as diagnostics say it, `relay`
                                  "host[address]:port" as the log says it; port 0: `address` is a UNIX-domain
                                  socket's path and `relay` is the name alone
    await exchangers(resolver, nexthop, rng, log) -> [MX]     the hosts to try, in order: MX hosts by preference, ties
                                  shuffled with `rng` (RFC 5321 5.1); no MX record, or no such name: the domain
                                  itself (implicit MX; its address lookup says "not found", 5.4.4, as Postfix's
                                  smtp_host_addr after an MX lookup's NXDOMAIN); raises PermanentError 5.1.10
                                  (null MX, RFC 7505: a "." among the records, even beside others, as Postfix
                                  takes the RRset), 5.4.4 (an MX reply naming no host name, Postfix's
                                  DNS_INVAL) or 5.4.3 (FORMERR: DNS_FAIL), LookupRetry; at most MX_HOST_LIMIT
                                  (100) hosts, each once, chosen before ties are shuffled (kept_exchangers); an
                                  answer of more records than that is logged on `log` once, in Postfix's words,
                                  the name as asked (an IDN's A-label), before a null MX among them bounces:
                                  `warning: DNS record count limit (100) exceeded -- dropping excess record(s)
                                  after qname=example.com qtype=MX`;
                                  a [host] next hop or an implicit MX is the one host at preference 0
    order_exchangers(records, rng) -> [MX]
    kept_exchangers(records) -> [MX]   the hosts an MX set may be tried at (MX_HOST_LIMIT), before the shuffle
    host_lookup_failure(error) / no_address_failure(host) -> DeliveryError   an MX host without usable addresses:
                                  5.4.4 when DNS says no, 4.4.3 when DNS failed
    unique(items) -> list         the items in order, each once
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby

from mailflow.address import literal_ip
from mailflow.syntax import is_ipv4, parse_hostport
from mailflow.dns import (MX, InvalidReply, NonRecoverable, NotFound, Resolver, dns_name, failure_text,
                          is_ip_literal)
from mailflow.errors import DeliveryError, LookupRetry, PermanentError, TemporaryError


# MX hosts kept of one MX set, the most preferred (Postfix's dns_rr_list_limit keeps 100 records of an answer).
MX_HOST_LIMIT = 100


@dataclass(frozen=True)
class Nexthop:
    """A parsed next hop: a TCP `host` and `port` (with or without an MX lookup), or a UNIX-socket `path`."""

    host: str = ""
    port: int = 0
    mx_lookup: bool = False
    path: str = ""


@dataclass(frozen=True)
class Peer:
    """See the module docstring."""

    host: str
    address: str
    port: int = 0

    @property
    def name(self) -> str:
        return f"{self.host}[{self.address}]"

    @property
    def relay(self) -> str:
        return f"{self.name}:{self.port}" if self.port else self.name


def parse_nexthop(written: str, default_port: int, *, lmtp: bool = False) -> Nexthop:
    """See the module docstring."""
    value = written.strip()
    if lmtp:
        if value.startswith("unix:"):
            path = value.removeprefix("unix:")
            if not path:
                raise ValueError(f"{written!r} names no socket")
            return Nexthop(path=path)
        value = value.removeprefix("inet:")
    host, port = parse_hostport(value, default_port)
    host = host.strip().rstrip(".").lower()
    bracketed = value.startswith("[")
    if bracketed and host.startswith("ipv6:"):  # RFC 5321 4.1.3's tag, dropped as Postfix's host_port
        host = host.removeprefix("ipv6:")
        if not is_ip_literal(host) or is_ipv4(host):  # `::ffff:192.0.2.01`: taken at RCPT, read as RCPT reads it
            host = literal_ip(f"[IPv6:{host}]") or ""
            if not host:
                raise ValueError(f"{written!r}: malformed IPv6 address")
    elif bracketed and host and not is_ipv4(host):
        # `[192.0.2.01]`, an IPv4 literal with a leading zero that Postfix takes (valid_ipv4_hostaddr) and
        # `ipaddress` refuses: connected to as 192.0.2.1; any other bracketed name stays as written
        host = literal_ip(f"[{host}]") or host
    if not host:
        raise ValueError(f"{written!r} names no host")
    return Nexthop(host, port, mx_lookup=not lmtp and not bracketed)


async def exchangers(resolver: Resolver, nexthop: Nexthop, rng: random.Random, log: logging.Logger) -> list[MX]:
    """See the module docstring."""
    if not nexthop.mx_lookup:
        return [MX(0, nexthop.host)]
    try:
        records = await resolver.mx(nexthop.host)
    except NotFound:  # Postfix looks the name up as a host then: its "not found" bounces 5.4.4
        records = []
    except InvalidReply as e:  # Postfix's smtp_domain_addr: DNS_INVAL bounces 5.4.4, DNS_FAIL 5.4.3
        raise PermanentError("5.4.4", e.text) from None
    except NonRecoverable as e:
        raise PermanentError("5.4.3", failure_text(e)) from None
    if not records:
        return [MX(0, nexthop.host)]  # implicit MX (RFC 5321 5.1)
    if len(records) > MX_HOST_LIMIT:
        # Postfix's dns_rr_append_with_limit (src/dns/dns_rr.c), as dns_lookup collects the answer: its records,
        # not the hosts, named by the query's name
        log.warning("DNS record count limit (%d) exceeded -- dropping excess record(s) after qname=%s qtype=MX",
                    MX_HOST_LIMIT, dns_name(nexthop.host))
    if any(r.is_null for r in records):  # with other records too, as Postfix's dns_lookup takes the RRset
        raise PermanentError("5.1.10", f"Domain {nexthop.host} does not accept mail (nullMX)")
    return order_exchangers(kept_exchangers(records), rng)


def kept_exchangers(records: list[MX]) -> list[MX]:
    """Each host once at its best preference, the most preferred MX_HOST_LIMIT of them; at the limit's preference
    those first in the answer, as Postfix's dns_rr_append keeps the first records. Chosen before ties are
    shuffled, so which hosts a delivery may try (and whether this server is among them) never depends on the RNG."""
    best: dict[str, MX] = {}
    for record in records:
        if record.host not in best or record.preference < best[record.host].preference:
            best[record.host] = record
    return sorted(best.values(), key=lambda mx: mx.preference)[:MX_HOST_LIMIT]


def order_exchangers(records: list[MX], rng: random.Random) -> list[MX]:
    """By preference; equal preferences in random order (RFC 5321 5.1), so that load spreads."""
    ordered: list[MX] = []
    for _, group in groupby(sorted(records, key=lambda r: r.preference), key=lambda r: r.preference):
        tied = list(group)
        rng.shuffle(tied)
        ordered.extend(tied)
    return ordered


def host_lookup_failure(error: NotFound | LookupRetry) -> DeliveryError:
    """Postfix's smtp_host_addr: not found or an invalid reply (DNS_INVAL) 5.4.4, a non-recoverable one (DNS_FAIL)
    5.4.3, else 4.4.3, in dns_lookup's words (`failure_text`)."""
    if isinstance(error, (NotFound, InvalidReply)):
        return PermanentError("5.4.4", error.text)
    if isinstance(error, NonRecoverable):
        return PermanentError("5.4.3", failure_text(error))
    return TemporaryError("4.4.3", failure_text(error))


def no_address_failure(host: str) -> DeliveryError:
    return PermanentError(
        "5.4.4",
        f"Host or domain name not found. Name service error for name={host} type=AAAA: "
        "Host found but no data record of requested type",
    )


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
