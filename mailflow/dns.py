"""Name service for delivery and the inbound checks: MX, address, TXT, PTR, NS and TLSA lookups behind one small
protocol.

Owns: the `Resolver` protocol every component receives through its constructor, the `MX` and `Tlsa` values, the
real implementation (`AiodnsResolver`: aiodns for MX/A/AAAA/TXT/PTR; dnspython, against the same name servers,
for TLSA and the DNSSEC AD bit, which aiodns cannot give) and a dictionary-backed one for tests
(`StaticResolver`).
Nothing here is global: build a resolver, pass it in. It takes plain values, not the configuration: this
module imports nothing of mailflow but `errors`, `syntax` and `address` (leaves), so the configuration and every
component may use it.

    MX(preference, host)                      one MX record; host "." is RFC 7505's null MX
    Resolver.mx(domain) -> list[MX]           sorted by preference; [] = the domain exists but has no MX
    Resolver.addresses(host) -> list[str]     A records, then AAAA records, as IP strings; [] = no address; a
                                              failure of both names AAAA (the last asked, as Postfix reports it)
    Resolver.txt(name) -> list[str]           each TXT record, its strings joined (DKIM keys, SPF, DMARC, MTA-STS)
    Resolver.txt_strings(name)                each TXT record's strings apart, a tuple each (a DNS list's reason:
                                              Postfix keeps the first; optional: asked through
                                              `record_strings(resolver, name)`, `txt`'s records else); asked alone
                                              (c-ares joins them), at most `reason_asks=` (default REASON_ASKS) at
                                              once, in slots of their own: past them a LookupRetry at once;
                                              `tries` times, as c-ares asks; an answer kept for its TTL (TxtCache,
                                              bounded), as c-ares keeps `txt`'s
    Resolver.ptr(address) -> list[str]        the names of an IP address (reverse DNS)
    Resolver.ns(domain) -> list[str]          the name servers of a domain (smtpd's check_*_ns_access)
    Resolver.tlsa(name) -> TlsaAnswer         TLSA records (RFC 6698) and whether the answer was DNSSEC-validated
                                              (the AD bit of a validating upstream resolver: DANE trusts only that)
    Resolver.validated(name, qtype) -> bool   the answer for name/qtype carried the AD bit (an MX RRset for DANE)
    AiodnsResolver(nameservers=…, timeout=…, tries=…) / .close()    (app.py builds it from [dns]); a lookup
                                              takes at most `timeout` x `tries` seconds, and may take them all
                                              (what c-ares's own, shorter, timeouts give up is asked again on a
                                              second channel, shared too: `_query`); `isolated_asks=` (default
                                              ISOLATED_ASKS): lookups asked again alone at once (below)
    StaticResolver(mx={...}, addresses={...}, txt={...}, ptr={...}, tlsa={...}, ns={...}, secure=(names...))
                                              (a TXT record: a string, or a tuple of its strings)
    is_ip_literal(host) -> bool               an IP literal resolves to itself, without a query
                                              (mailflow.syntax.is_ip_address)
    await ptr_names(resolver, address)        its PTR names, at most PTR_NAMES_KEPT; [] for none
    await confirmed_name(resolver, address, names)   the first of `names` when its addresses include `address`
                                              (Postfix's verified client name); "" for none
    await client_name(resolver, address, names) -> ClientName   the same, with Postfix's warning of it
    failure_text(error) -> str                a LookupRetry's text as Postfix's SMTP client says it (below)
    valid_rr_name(name) -> bool               a name Postfix's dns_lookup takes in a reply (valid_rr_name)
    dns_name(name) -> str                     the name a lookup asks: an IDN as its A-labels (one that has
                                              none as given)

Failure behaviour (a failed lookup is never "not found"):
- the name does not exist (NXDOMAIN), or is malformed    -> raise `NotFound` (permanent, 5.1.2); malformed: what
  (`a..test`, a label over 63 octets)                       c-ares will not ask, as Postfix's dns_lookup answers
                                                            DNS_NOTFOUND for a name that is not valid_hostname
- SERVFAIL, REFUSED, timeout, no server, anything else   -> raise `mailflow.errors.LookupRetry` (temporary); its text
  "Name service error for name=N type=T: why", `why` as Postfix words TRY_AGAIN ("Host not found, try again")
  for a SERVFAIL, REFUSED or NOTIMP, a timeout or no server (the system's resolver, Postfix's, says TRY_AGAIN
  once every server answered so), else c-ares's reason
- a reply that cannot be read (garbled, a record cut     -> raise `UnreadableReply`, a LookupRetry whose text is
  short)                                                    Postfix's for its dns_get_answer's DNS_RETRY ("...:
                                                            Malformed or unexpected name server reply")
  one lookup's fault never reaches another: c-ares fails every query in flight on its UDP socket when one reply
  there cannot be read, so a query c-ares ends unreadable is asked again alone, once, on a socket of its own
  (`IsolatedAsker`: its answer, or failure, is the lookup's); at most `isolated_asks` at once per resolver, past
  them it waits for a slot (a flood of garbled replies opens no more sockets); within the same deadline (a lookup
  still waiting then is a LookupRetry, as a timeout); logged at debug only
- an MX, A or AAAA reply naming what is no host name     -> raise `InvalidReply` (Postfix's DNS_INVAL, after its
  (a record's owner, an MX host, a CNAME target: Postfix's  valid_rr_name's warning, logged alike): a LookupRetry for
  valid_rr_name)                                            whoever does not ask for it (a failure), the same text
- FORMERR (the server found the query malformed), and    -> raise `NonRecoverable` (Postfix's DNS_FAIL,
  an rcode not named here (YXDOMAIN, NXRRSET, NOTAUTH...)   "Non-recoverable error"): a LookupRetry for whoever does
                                                            not ask for it
- `failure_text(error)`: a failed lookup's text as Postfix's dns_lookup words it: "Host or domain name not found. "
  before a resolver's error, not before a reply found malformed
- the name exists without records of the type (NODATA)   -> an empty list
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

import aiodns
import aiodns.error
import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import pycares

from mailflow.address import ascii_domain, hostname_gripe
from mailflow.errors import LookupRetry, PermanentError
from mailflow.syntax import is_ip_address as is_ip_literal
from mailflow.syntax import is_ipv4

log = logging.getLogger("mailflow.dns")

NULL_MX_HOST = "."
# What Postfix's dns_lookup says for the resolver's TRY_AGAIN (dns_strerror), which is what a SERVFAIL, a timeout
# and a name server that cannot be reached come to.
TRY_AGAIN = "Host not found, try again"
# A query c-ares timed out is asked again only with this much of its budget left (c-ares's shortest timeout).
RETRY_FLOOR = 0.25
TRY_AGAIN_CODES = frozenset({aiodns.error.ARES_ESERVFAIL, aiodns.error.ARES_ETIMEOUT, aiodns.error.ARES_ECONNREFUSED,
                             aiodns.error.ARES_EREFUSED, aiodns.error.ARES_ENOTIMP})
# The answers whose names are checked as Postfix's dns_lookup checks them (smtpd's domain and HELO checks, the
# SMTP client's MX and host lookups ask these), and the names of record types for its warning.
CHECKED_NAMES = ("MX", "A", "AAAA")
RECORD_TYPES = {pycares.QUERY_TYPE_MX: "MX", pycares.QUERY_TYPE_A: "A", pycares.QUERY_TYPE_AAAA: "AAAA",
                pycares.QUERY_TYPE_CNAME: "CNAME"}
RESOLV_CONF = "/etc/resolv.conf"
# Queries asked again on a socket of their own (`IsolatedAsker`) at once, per resolver: past it, a query c-ares
# found unreadable waits, within its lookup's deadline, for one of them to end (a flood of garbled replies opens no
# more sockets than this).
ISOLATED_ASKS = 32
# DNS lists' reasons (`txt_strings`, each asked on a socket of its own) asked at once, per resolver, apart from the
# re-asks above (a flood of listed clients takes none of theirs); past it a reason is a LookupRetry at once (the
# reply then has none, as Postfix's when its TXT lookup fails).
REASON_ASKS = 32
# `txt_strings` answers kept, per resolver, for their TTL (at most REASON_TTL seconds: c-ares's qcache_max_ttl), as
# c-ares keeps `txt`'s: at most REASON_CACHE answers (the oldest go first), each of at most REASON_CACHED_CHARS
# characters (a longer one is asked again).
REASON_CACHE = 512
REASON_TTL = 3600
REASON_CACHED_CHARS = 1024
# A reply's rcode as the c-ares failure it comes to (ares_dns_query_reply_tostatus); NOERROR without an answer is
# ENODATA. An rcode not named here (YXDOMAIN, NXRRSET, NOTAUTH, ...), which c-ares leaves a success without records,
# is EFORMERR, NonRecoverable in both paths: the NO_RECOVERY Postfix's dns_query gets for it, its DNS_FAIL.
RCODE_FAILURES = {dns.rcode.NXDOMAIN: aiodns.error.ARES_ENOTFOUND, dns.rcode.SERVFAIL: aiodns.error.ARES_ESERVFAIL,
                  dns.rcode.REFUSED: aiodns.error.ARES_EREFUSED, dns.rcode.NOTIMP: aiodns.error.ARES_ENOTIMP,
                  dns.rcode.FORMERR: aiodns.error.ARES_EFORMERR}
# The failures after which the isolated re-ask tries the next name server (as c-ares and the system's resolver do).
NEXT_SERVER_FAILURES = frozenset({aiodns.error.ARES_EBADRESP, aiodns.error.ARES_ESERVFAIL, aiodns.error.ARES_EREFUSED,
                                  aiodns.error.ARES_ENOTIMP, aiodns.error.ARES_ETIMEOUT,
                                  aiodns.error.ARES_ECONNREFUSED})


@dataclass(frozen=True)
class MX:
    preference: int
    host: str

    @property
    def is_null(self) -> bool:
        return self.host == NULL_MX_HOST


MALFORMED = "Malformed or unexpected name server reply"  # Postfix's dns_lookup, for a reply it cannot use
NO_RECOVERY = "Non-recoverable error"  # Postfix's dns_strerror(NO_RECOVERY)
# getaddrinfo's words (gai_strerror), as Postfix's smtpd logs why a client's name gave no address.
GAI_NONAME, GAI_NODATA = "Name or service not known", "No address associated with hostname"
GAI_AGAIN, GAI_FAIL = "Temporary failure in name resolution", "Non-recoverable failure in name resolution"


class MalformedReply(LookupRetry):
    """A reply Postfix's dns_lookup cannot use, in its words (MALFORMED)."""

    def __init__(self, name: str, qtype: str):
        super().__init__(f"Name service error for name={name} type={qtype}: {MALFORMED}")


class UnreadableReply(MalformedReply):
    """A reply that cannot be read: temporary (Postfix's dns_get_answer answers DNS_RETRY)."""


class InvalidReply(MalformedReply):
    """A reply naming what is no host name (Postfix's DNS_INVAL): its MX lookup bounces (5.4.4), smtpd's unknown
    domain and HELO checks refuse ("Malformed DNS server reply"); elsewhere a failure like any other."""


class NonRecoverable(LookupRetry):
    """A server that found the query malformed (FORMERR), or another rcode than NOERROR, NXDOMAIN, SERVFAIL, REFUSED
    and NOTIMP (YXDOMAIN, NOTAUTH, ...): the system's resolver, Postfix's, says NO_RECOVERY, a
    DNS_FAIL: smtpd's unknown domain and HELO checks take it as not found, the SMTP client bounces (5.4.3);
    elsewhere a failure like any other."""

    def __init__(self, name: str, qtype: str):
        super().__init__(f"Name service error for name={name} type={qtype}: {NO_RECOVERY}")


def failure_text(error: LookupRetry) -> str:
    """The text of a failed lookup as Postfix's dns_lookup gives it to the SMTP client: "Host or domain name not
    found. " before a resolver's error (h_errno), nothing before a reply it could not use (MALFORMED)."""
    if isinstance(error, MalformedReply):
        return error.text
    return f"Host or domain name not found. {error.text}"


def valid_rr_name(name: str) -> bool:
    """A name Postfix's valid_rr_name takes in a reply: a valid host name (a leading `*` label too) or an IP
    address (which it only warns of: checked_rr_name)."""
    return is_ip_literal(name) or rr_name_gripe(name) is None


def rr_name_gripe(name: str) -> str | None:
    """hostname_gripe with Postfix's DO_WILDCARD: `*` alone, or as the first label, is taken."""
    return None if name == "*" else hostname_gripe(name[2:] if name.startswith("*.") else name)


def checked_rr_name(name: str, location: str, rtype: str, query: str) -> bool:
    """valid_rr_name, with Postfix's warnings: "numeric domain name in ..." for an IP address (taken), else for a
    name refused "valid_hostname: <why>" then "malformed domain name in <location> of <TYPE> record for <query>"."""
    if is_ip_literal(name):
        log.warning("numeric domain name in %s of %s record for %s: %.100s", location, rtype, query, name)
        return True
    gripe = rr_name_gripe(name)
    if gripe is None:
        return True
    log.warning("valid_hostname: %s", gripe)
    log.warning("malformed domain name in %s of %s record for %s: %.100s", location, rtype, query, name)
    return False


class NotFound(PermanentError):
    """The name does not exist (NXDOMAIN): a permanent answer, unlike `LookupRetry`."""

    def __init__(self, name: str, qtype: str):
        super().__init__(
            "5.1.2",
            f"Host or domain name not found. Name service error for name={name} type={qtype}: Host not found",
        )
        self.name = name
        self.qtype = qtype


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True)
class TlsaAnswer:
    records: tuple[Tlsa, ...] = ()
    secure: bool = False  # the answer carried the AD bit


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[MX]: ...

    async def addresses(self, host: str) -> list[str]: ...

    async def ipv4_addresses(self, name: str) -> list[str]: ...  # A records only (DNSBL queries, as dnsblog)

    async def ipv6_addresses(self, name: str) -> list[str]:
        """AAAA records only (an IPv6 client's name); [] for a name with A records only (NODATA), failures as
        `addresses`'s."""
        ...

    async def txt(self, name: str) -> list[str]: ...

    async def txt_strings(self, name: str) -> list[tuple[str, ...]]:
        """Each TXT record's strings apart (a DNS list's reason: Postfix's dns_lookup keeps a record's first
        string); failures as `txt`'s. Optional: callers ask through `record_strings`, which takes each `txt` record
        as one string from a resolver without it (one given to `Mailflow(resolver=...)` before it was added)."""
        ...

    async def ptr(self, address: str) -> list[str]: ...

    async def ns(self, domain: str) -> list[str]: ...

    async def tlsa(self, name: str) -> TlsaAnswer: ...

    async def validated(self, name: str, qtype: str) -> bool: ...


async def record_strings(resolver: Resolver, name: str) -> list[tuple[str, ...]]:
    """`resolver.txt_strings(name)`; from a resolver without it, each `txt` record as one string."""
    strings = getattr(resolver, "txt_strings", None)
    if strings is None:
        return [(record,) for record in await resolver.txt(name)]
    return await strings(name)


PTR_NAMES_KEPT = 5  # an address's PTR names looked at (Postfix checks a few; hundreds would be an attack)


async def ptr_names(resolver: Resolver, address: str) -> list[str]:
    """The PTR names of `address` (the first PTR_NAMES_KEPT); [] when it has none or is no address. Raises
    LookupRetry when DNS cannot answer now."""
    try:
        return (await resolver.ptr(address))[:PTR_NAMES_KEPT]
    except (NotFound, ValueError):
        return []


@dataclass(frozen=True)
class ClientName:
    """What Postfix's smtpd (smtpd_peer.c) makes of an address's PTR names: `name` the verified name ("" for none),
    `retry` when the DNS could not tell now, `warning` the line it logs at connect ("" for none), `failure` the
    failed lookup's text."""

    name: str = ""
    retry: bool = False
    warning: str = ""
    failure: str = ""  # with `retry`: the failed lookup's own text


def ptr_name_gripe(name: str) -> str | None:
    """Why Postfix's smtpd takes a PTR name as no client name (sockaddr_to_hostname), in its warning's words: an IP
    address ("numeric hostname: ..."), or no valid host name ("valid_hostname: ..."); None when it takes it. c-ares
    hands a name over with some octets escaped (`caf\\195\\169`): the warning then names the escape's backslash (92),
    not the octet, where glibc would have dropped such a PTR name (res_hnok) and Postfix logged nothing."""
    if is_ip_literal(name):
        return f"numeric hostname: {name}"
    gripe = hostname_gripe(name)
    return None if gripe is None else f"valid_hostname: {gripe}"


async def client_name(resolver: Resolver, address: str, names: list[str]) -> ClientName:
    """The first of `names` (an address's PTR names) when its addresses include `address`: the name that leads back
    to it. Only the first, as Postfix's smtpd takes the one name getnameinfo gives (a later PTR name that would lead
    back makes no difference); a numeric or malformed one is no name (sockaddr_to_hostname). The name is asked for
    the client's family only, A records for an IPv4 address, AAAA for an IPv6 one (hostname_to_sockaddr_pf: the
    other family's failure is none of its business). The warnings are Postfix's, with getaddrinfo's words for why
    the name gave no address."""
    if not names:
        return ClientName()
    name = names[0].rstrip(".")
    gripe = ptr_name_gripe(name)
    if gripe is not None:
        return ClientName(warning=gripe)
    elsewhere = f"hostname {name} does not resolve to address {address}"
    try:
        found = await (resolver.ipv4_addresses(name) if is_ipv4(address) else resolver.ipv6_addresses(name))
    except NotFound:
        return ClientName(warning=f"{elsewhere}: {GAI_NONAME}")
    except NonRecoverable:
        return ClientName(warning=f"{elsewhere}: {GAI_FAIL}")
    except LookupRetry as e:
        return ClientName(retry=True, warning=f"{elsewhere}: {GAI_AGAIN}", failure=e.text)
    if address in found:
        return ClientName(names[0])
    return ClientName(warning=elsewhere if found else f"{elsewhere}: {GAI_NODATA}")


async def confirmed_name(resolver: Resolver, address: str, names: list[str]) -> str:
    """`client_name`'s name; raises LookupRetry (the failed lookup's text) when DNS cannot tell now."""
    verdict = await client_name(resolver, address, names)
    if verdict.retry:
        raise LookupRetry(verdict.failure or verdict.warning)
    return verdict.name


def sort_mx(records: list[MX]) -> list[MX]:
    """By preference; the order among equal preferences is left to the caller (the SMTP client shuffles)."""
    return sorted(records, key=lambda r: r.preference)


def normalize_name(name: str) -> str:
    """Lower case without the trailing dot; the root (the null MX's target) stays '.'."""
    return name.strip().rstrip(".").lower() or NULL_MX_HOST


class StaticResolver:
    """A resolver answering from dictionaries, for unit tests. A name missing from every table raises `NotFound`;
    a name in another table answers NODATA ([]). `secure`: the names whose answers carry the AD bit. A TXT record
    is a string, or a tuple of its strings (`txt` joins them, `txt_strings` keeps them apart)."""

    def __init__(self, mx: dict[str, list[MX]] | None = None, addresses: dict[str, list[str]] | None = None,
                 txt: Mapping[str, Sequence[str | tuple[str, ...]]] | None = None,
                 ptr: dict[str, list[str]] | None = None,
                 tlsa: dict[str, list[Tlsa]] | None = None, secure: tuple[str, ...] = (),
                 ns: dict[str, list[str]] | None = None):
        self._mx = {normalize_name(k): list(v) for k, v in (mx or {}).items()}
        self._addresses = {normalize_name(k): list(v) for k, v in (addresses or {}).items()}
        self._txt = {normalize_name(k): [(r,) if isinstance(r, str) else tuple(r) for r in v]
                     for k, v in (txt or {}).items()}
        self._ptr = {normalize_name(k): list(v) for k, v in (ptr or {}).items()}
        self._tlsa = {normalize_name(k): tuple(v) for k, v in (tlsa or {}).items()}
        self._secure = {normalize_name(n) for n in secure}
        self._ns = {normalize_name(k): [normalize_name(h) for h in v] for k, v in (ns or {}).items()}

    def _exists(self, name: str) -> bool:
        return any(name in table for table in (self._mx, self._addresses, self._txt, self._ptr, self._tlsa, self._ns))

    async def ns(self, domain: str) -> list[str]:
        key = normalize_name(domain)
        if not self._exists(key):
            raise NotFound(domain, "NS")
        return list(self._ns.get(key, ()))

    async def txt(self, name: str) -> list[str]:
        return ["".join(strings) for strings in await self.txt_strings(name)]

    async def txt_strings(self, name: str) -> list[tuple[str, ...]]:
        key = normalize_name(name)
        if not self._exists(key):
            raise NotFound(name, "TXT")
        return list(self._txt.get(key, ()))

    async def ptr(self, address: str) -> list[str]:
        if address not in self._ptr:
            raise NotFound(address, "PTR")
        return list(self._ptr[address])

    async def tlsa(self, name: str) -> TlsaAnswer:
        key = normalize_name(name)
        if not self._exists(key):
            raise NotFound(name, "TLSA")
        return TlsaAnswer(self._tlsa.get(key, ()), key in self._secure)

    async def validated(self, name: str, qtype: str) -> bool:
        return normalize_name(name) in self._secure

    async def mx(self, domain: str) -> list[MX]:
        name = normalize_name(domain)
        if name in self._mx:
            return sort_mx(self._mx[name])
        if name in self._addresses:
            return []  # the name exists (it has addresses) but no MX
        raise NotFound(domain, "MX")

    async def addresses(self, host: str) -> list[str]:
        if is_ip_literal(host):
            return [host]
        name = normalize_name(host)
        if name in self._addresses:
            return list(self._addresses[name])
        if name in self._mx:
            return []  # the name exists (it has MX records) but no address
        raise NotFound(host, "AAAA")  # the last of the A and AAAA lookups, as AiodnsResolver

    async def ipv4_addresses(self, name: str) -> list[str]:
        try:
            return [a for a in await self.addresses(name) if is_ipv4(a)]
        except NotFound:
            raise NotFound(name, "A") from None

    async def ipv6_addresses(self, name: str) -> list[str]:
        return [a for a in await self.addresses(name) if not is_ipv4(a)]


class AiodnsResolver:
    """The real resolver: aiodns 4 (c-ares) `query_dns`, against `nameservers` or the system's resolv.conf.

    The aiodns channel binds to the event loop it was made in, so it is made on first use inside the running
    loop, and made again if a later call comes from another loop.
    """

    def __init__(self, *, nameservers: tuple[str, ...], timeout: float, tries: int,
                 isolated_asks: int = ISOLATED_ASKS, reason_asks: int = REASON_ASKS):
        """`nameservers`: "ip" or "ip:port" entries, () for the system's resolv.conf; `timeout` seconds per
        try; `tries` per query (c-ares); `isolated_asks`: queries asked again alone at once (`IsolatedAsker`);
        `reason_asks`: `txt_strings` lookups asked at once (more fail at once)."""
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._tries = tries
        self._channel: aiodns.DNSResolver | None = None
        self._retry_channel: aiodns.DNSResolver | None = None  # what `_channel` timed out, asked again
        self._servers = NameServers(self._nameservers)  # what dnspython asks (c-ares reads its own)
        self._dnspython: dns.asyncresolver.Resolver | None = None  # TLSA and the AD bit (no loop binding)
        self._dnspython_servers: list[tuple[str, int]] | None = None  # the servers it was given
        self._isolated = IsolatedAsker(self._servers, timeout, isolated_asks)  # what c-ares found unreadable
        # txt_strings (c-ares joins the strings): asked `tries` times, as c-ares asks; kept as c-ares keeps answers
        self._reasons = IsolatedAsker(self._servers, timeout, reason_asks, rounds=tries)
        self._reason_cache = TxtCache(REASON_CACHE, REASON_TTL, REASON_CACHED_CHARS)

    async def mx(self, domain: str) -> list[MX]:
        result = await self._query(domain, "MX")
        records = [
            MX(rec.data.priority, normalize_name(rec.data.exchange))
            for rec in result
            if rec.type == pycares.QUERY_TYPE_MX
        ]
        return sort_mx(usable_mx_records(records, domain))

    async def addresses(self, host: str) -> list[str]:
        if is_ip_literal(host):
            return [host]
        # (no local holds the answers: a failure raised from here must not be held by this frame)
        return merge_address_answers(await asyncio.gather(
            self._addresses_of_type(host, "A", pycares.QUERY_TYPE_A),
            self._addresses_of_type(host, "AAAA", pycares.QUERY_TYPE_AAAA),
            return_exceptions=True,
        ))

    async def ipv4_addresses(self, name: str) -> list[str]:
        return await self._addresses_of_type(name, "A", pycares.QUERY_TYPE_A)

    async def ipv6_addresses(self, name: str) -> list[str]:
        return await self._addresses_of_type(name, "AAAA", pycares.QUERY_TYPE_AAAA)

    async def txt(self, name: str) -> list[str]:
        result = await self._query(name, "TXT")
        return [_text(rec.data.data) for rec in result if rec.type == pycares.QUERY_TYPE_TXT]

    async def txt_strings(self, name: str) -> list[tuple[str, ...]]:
        """Asked alone (`IsolatedAsker.ask_unless_busy`: c-ares joins the strings) as c-ares asks `txt`: each
        server `tries` times (`timeout` each), within `timeout` x `tries`; an answer with records kept for its TTL
        (`TxtCache`), as c-ares's cache keeps it (a failure, NXDOMAIN or NODATA is asked again). Failures as `txt`'s;
        a LookupRetry at once while `reason_asks` are asked (the slots of re-asks are not theirs)."""
        cached = self._reason_cache.get(name)
        if cached is not None:
            return cached
        deadline = asyncio.get_running_loop().time() + self._timeout * self._tries
        reply = await answer_by(deadline, name, "TXT", self._reasons.ask_unless_busy(name, "TXT"))
        if isinstance(reply, list):  # NODATA
            return reply
        records = [tuple(_text(string) for string in rdata.strings)
                   for rrset in reply.answer if rrset.rdtype == dns.rdatatype.TXT for rdata in rrset]
        if records:
            self._reason_cache.put(name, records, min(rrset.ttl for rrset in reply.answer))
        return records

    async def ptr(self, address: str) -> list[str]:
        reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        result = await self._query(reverse, "PTR")
        return [normalize_name(rec.data.dname) for rec in result if rec.type == pycares.QUERY_TYPE_PTR]

    async def ns(self, domain: str) -> list[str]:
        result = await self._query(domain, "NS")
        return [normalize_name(rec.data.nsdname) for rec in result if rec.type == pycares.QUERY_TYPE_NS]

    async def tlsa(self, name: str) -> TlsaAnswer:
        answer = await self._dnssec_query(name, "TLSA")
        if answer is None:
            return TlsaAnswer((), False)
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)
        return TlsaAnswer(records, bool(answer.response.flags & dns.flags.AD))

    async def validated(self, name: str, qtype: str) -> bool:
        answer = await self._dnssec_query(name, qtype)
        return answer is not None and bool(answer.response.flags & dns.flags.AD)

    async def close(self) -> None:
        channels = [c for c in (self._channel, self._retry_channel) if c is not None]
        self._channel = self._retry_channel = None
        for channel in channels:
            await channel.close()

    async def _dnssec_query(self, name: str, qtype: str):
        """dnspython, asking for the AD bit (RFC 6840 5.7) with EDNS DO set; None for NODATA. Raises NotFound or
        LookupRetry."""
        try:
            return await self._dnssec_resolver().resolve(dns_name(name), qtype, raise_on_no_answer=True)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise NotFound(name, qtype) from None
        except (dns.exception.DNSException, OSError, ValueError) as e:
            log.debug("lookup %s %s failed: %r", name, qtype, e)
            raise LookupRetry(f"Name service error for name={name} type={qtype}: {e}") from None

    def _dnssec_resolver(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver, made once, asking `NameServers`'s servers (given again when they change)."""
        if self._dnspython is None:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.timeout = self._timeout
            resolver.lifetime = self._timeout * self._tries
            resolver.flags = dns.flags.RD | dns.flags.AD
            resolver.use_edns(0, dns.flags.DO, 1232)
            self._dnspython = resolver
        servers = self._servers.servers()
        if servers is not self._dnspython_servers:
            self._dnspython.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
            self._dnspython_servers = servers
        return self._dnspython

    async def _addresses_of_type(self, host: str, qtype: str, type_code: int) -> list[str]:
        result = await self._query(host, qtype)
        return [rec.data.addr for rec in result if rec.type == type_code]

    async def _query(self, name: str, qtype: str) -> list:
        """The answer section's records; NODATA gives []. Raises NotFound or LookupRetry.

        Within `timeout` x `tries` seconds, as the configuration says, whatever c-ares makes of it: once a server
        has answered a few queries, c-ares (1.32 on, always on) waits 5 times its average latency, at least 250 ms,
        instead of `timeout`; after quick answers (a recursive resolver's cache) a slow one (its recursion) timed
        out in 0.75 s. A query the shared channel gives up on is asked again on the one retry channel, which sees
        only such queries (`_query_until`). A query c-ares ends as unreadable is asked again alone, once
        (`IsolatedAsker`): one garbled reply fails every query in flight on c-ares's socket."""
        deadline = asyncio.get_running_loop().time() + self._timeout * self._tries
        result = await answer_by(deadline, name, qtype, self._query_until(name, qtype, deadline))
        if isinstance(result, list):  # NODATA
            return result
        if not result.answer:  # c-ares's success without records: an rcode it does not name (RCODE_FAILURES)
            raise NonRecoverable(name, qtype)
        if qtype in CHECKED_NAMES:
            check_reply_names(result.answer, name, qtype)
        return list(result.answer)

    async def _query_until(self, name: str, qtype: str, deadline: float):
        """c-ares's answer: the shared channel's, else (each time c-ares timed out with at least RETRY_FLOOR left
        before `deadline`, loop time) the retry channel's. Two channels whatever the load: in an outage every
        lookup waits on them, none makes a channel (a thread, descriptors, an inotify instance) of its own.
        Unreadable (EBADRESP): the isolated asker's answer, asked once."""
        loop = asyncio.get_running_loop()
        channel = self._resolver()
        while True:
            try:
                return await channel.query_dns(dns_name(name), qtype)
            except aiodns.error.DNSError as e:
                if error_code(e) == aiodns.error.ARES_EBADRESP:
                    return await self._isolated.ask_again(name, qtype)
                if not is_timeout(e) or deadline - loop.time() < RETRY_FLOOR:
                    raise
            log.debug("lookup %s %s: no answer within c-ares's time, asked again", name, qtype)
            channel = self._retry_resolver()

    def _resolver(self) -> aiodns.DNSResolver:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel.loop is not loop:
            self._channel = self._channel_for(loop)
        return self._channel

    def _retry_resolver(self) -> aiodns.DNSResolver:
        """The channel for queries the shared one timed out: its history is of slow answers only, so c-ares's
        latency-based timeouts there stay near `timeout`."""
        loop = asyncio.get_running_loop()
        if self._retry_channel is None or self._retry_channel.loop is not loop:
            self._retry_channel = self._channel_for(loop)
        return self._retry_channel

    def _channel_for(self, loop: asyncio.AbstractEventLoop) -> aiodns.DNSResolver:
        """A c-ares channel asking without EDNS (flags=0; c-ares's default is ARES_FLAG_EDNS), as Postfix's
        resolver asks unless it wants DNSSEC: a server that answers FORMERR to EDNS queries answers these (c-ares
        retries such a FORMERR without EDNS only while it still sends a DNS cookie, its first query to a server).
        A truncated answer is asked again over TCP; the AD bit (DANE, TLSA) is asked through dnspython. Without EDNS
        c-ares sends no DNS cookie either (RFC 7873, carried in EDNS), as Postfix's resolver sends none."""
        return aiodns.DNSResolver(nameservers=list(self._nameservers) or None, loop=loop, timeout=self._timeout,
                                  tries=self._tries, flags=0)


class IsolatedAsker:
    """Asks a query again on a UDP socket of its own (dnspython; over TCP when the reply is truncated), for a query
    c-ares ended as unreadable (EBADRESP). c-ares reads the replies of all its queries to a server on one UDP
    socket and, when one of them cannot be read, fails every query in flight there: asked alone, each gets its own
    answer, and a reply that is garbled indeed is unreadable again.

    Bounded: at most `limit` queries at once (past it a query waits for one to end: a flood of garbled replies
    opens no more sockets; the caller's deadline bounds the wait), each name server asked `rounds` times per query
    (in turn, as c-ares's tries), `timeout` seconds each (and the caller's deadline).
    The answer is what c-ares's query_dns gives (a pycares.DNSResult, answer records of the types this module
    reads: A, AAAA, MX, TXT, PTR, NS, CNAME), a failure the aiodns DNSError c-ares would raise for it."""

    def __init__(self, servers: NameServers, timeout: float, limit: int, rounds: int = 1):
        """`servers`: the name servers to ask, in order (the resolver's)."""
        self._servers = servers
        self._rounds = rounds
        self._timeout = timeout
        self._limit = limit
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    async def ask_again(self, name: str, qtype: str) -> pycares.DNSResult:
        """The answer for name/qtype asked alone, once fewer than `limit` queries are asked so (the wait is bounded
        by the caller's deadline: cancelled, it holds no slot). Raises the DNSError c-ares would raise."""
        log.debug("lookup %s %s: reply unreadable, asked again alone", name, qtype)
        return cares_result(await self.ask(name, qtype))

    async def ask(self, name: str, qtype: str) -> dns.message.Message:
        """`ask_again`'s reply as dnspython reads it (a NOERROR reply: another rcode raises its DNSError), for what
        c-ares cannot give (each TXT string apart)."""
        slots = self._slots_of(asyncio.get_running_loop())
        if slots.locked():
            log.debug("lookup %s %s: waits to be asked alone (%d asked alone now)", name, qtype, self._limit)
        async with slots:
            return await self._ask_servers(name, qtype)

    async def ask_unless_busy(self, name: str, qtype: str) -> dns.message.Message:
        """`ask`'s reply, but while `limit` queries are asked, no wait: the ETIMEOUT DNSError at once."""
        slots = self._slots_of(asyncio.get_running_loop())
        if slots.locked():
            log.debug("lookup %s %s: not asked (%d asked alone now)", name, qtype, self._limit)
            raise aiodns.error.DNSError(aiodns.error.ARES_ETIMEOUT, f"{self._limit} lookups asked at once")
        async with slots:  # (free: taken without a wait)
            return await self._ask_servers(name, qtype)

    def _slots_of(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        """The `limit` slots of this event loop (a semaphore serves one loop; the resolver may outlive one)."""
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._limit))
        return self._slots[1]

    async def _ask_servers(self, name: str, qtype: str) -> dns.message.Message:
        """The first server's answer; the next server's after a failure c-ares would try the next one for (after
        the last, the first again, `rounds` times in all); else the last failure."""
        failure = aiodns.error.DNSError(aiodns.error.ARES_ECONNREFUSED, "no name server")
        for host, port in self._servers.servers() * self._rounds:
            try:
                return await self._ask(host, port, name, qtype)
            except aiodns.error.DNSError as e:
                if error_code(e) not in NEXT_SERVER_FAILURES:
                    raise
                failure = e
        try:
            raise failure
        finally:  # (its traceback holds this frame, which must then not hold it)
            del failure

    async def _ask(self, host: str, port: int, name: str, qtype: str) -> dns.message.Message:
        """One server's NOERROR reply. Raises a DNSError as c-ares would: ETIMEOUT for no reply in time,
        EBADRESP for a reply that cannot be read, ECONNREFUSED for a server not reached (refused, unreachable, an
        address that cannot be used, TCP closed without an answer), the rcode's failure (RCODE_FAILURES) else."""
        try:
            reply = await self._exchange(dns.message.make_query(dns_name(name), qtype), host, port)
        except dns.exception.Timeout:
            raise aiodns.error.DNSError(aiodns.error.ARES_ETIMEOUT, "Timeout while contacting DNS servers") from None
        except dns.exception.DNSException as e:
            raise aiodns.error.DNSError(aiodns.error.ARES_EBADRESP, f"Misformatted DNS reply: {e!r}") from None
        except (OSError, ValueError, EOFError) as e:  # refused, unreachable, no descriptor, an address it cannot
            # use, a TCP connection closed before its answer (after a truncated one: c-ares, glibc try the next)
            log.debug("lookup %s %s: name server %s port %d not reached: %r", name, qtype, host, port, e)
            raise aiodns.error.DNSError(aiodns.error.ARES_ECONNREFUSED, "Could not contact DNS servers") from None
        rcode = reply.rcode()
        if rcode != dns.rcode.NOERROR:
            raise aiodns.error.DNSError(RCODE_FAILURES.get(rcode, aiodns.error.ARES_EFORMERR), dns.rcode.to_text(rcode))
        return reply

    async def _exchange(self, query: dns.message.Message, host: str, port: int) -> dns.message.Message:
        """The reply to `query` over UDP (over TCP when truncated), on a socket of its own connected to the server
        (the kernel drops datagrams from elsewhere). A datagram that reads as a reply to another query (one late
        for a socket that had this port before) is passed over, as c-ares passes over a reply of unknown id. Each
        record as sent (one_rr_per_rrset): dnspython would merge records sent twice, which c-ares keeps. One
        answer held at a time: the cut one (its socket too) is let go before TCP is asked."""
        expiration = time.time() + self._timeout  # (dnspython's clock)
        backend = dns.asyncbackend.get_default_backend()
        try:
            async with await backend.make_socket(dns.inet.af_for_address(host), socket.SOCK_DGRAM, 0, None,
                                                 (host, port)) as sock:
                # the socket's own peer address: a connected socket takes no other, and IPv6's is a 4-tuple
                peer = await sock.getpeername()
                await dns.asyncquery.send_udp(sock, query, peer, expiration)
                while True:
                    reply, _, _ = await dns.asyncquery.receive_udp(sock, peer, expiration, raise_on_truncation=True,
                                                                   one_rr_per_rrset=True)
                    if query.is_response(reply):
                        return reply
        except dns.message.Truncated:
            pass  # (the exception holds the cut answer: TCP is asked once it is handled)
        return await dns.asyncquery.tcp(query, host, timeout=max(expiration - time.time(), 0), port=port,
                                        one_rr_per_rrset=True)


class TxtCache:
    """TXT answers by name, each until its TTL (at most `longest` seconds) has passed; at most `size` of them (the
    oldest put goes first) and none of more than `chars` characters in all, so at most about `size` x `chars`."""

    def __init__(self, size: int, longest: float, chars: int, clock: Callable[[], float] = time.monotonic):
        self._size = size
        self._longest = longest
        self._chars = chars
        self._clock = clock
        self._answers: dict[str, tuple[float, list[tuple[str, ...]]]] = {}  # name -> (when it expires, records)

    def get(self, name: str) -> list[tuple[str, ...]] | None:
        """The records kept for `name` (a copy), None when none are, or no longer."""
        key = normalize_name(name)
        kept = self._answers.get(key)
        if kept is None:
            return None
        if kept[0] <= self._clock():
            del self._answers[key]
            return None
        return list(kept[1])

    def put(self, name: str, records: list[tuple[str, ...]], ttl: float) -> None:
        if ttl <= 0 or sum(len(string) for strings in records for string in strings) > self._chars:
            return
        key = normalize_name(name)
        self._answers.pop(key, None)
        while len(self._answers) >= self._size:
            del self._answers[next(iter(self._answers))]
        self._answers[key] = (self._clock() + min(ttl, self._longest), list(records))


class NameServers:
    """The name servers a resolver asks besides c-ares (the isolated re-ask, dnspython's DNSSEC queries), in order,
    as (address, port): the configured entries ("ip", "ip:port", "[v6]:port"), else resolv.conf's, read again when
    its modification time changes (as c-ares follows resolv.conf). `servers()` gives the same list object until
    they change; [] when resolv.conf names none or cannot be read."""

    def __init__(self, configured: tuple[str, ...], resolv_conf: str = RESOLV_CONF):
        self._configured = [split_nameserver(entry) for entry in configured]
        self._resolv_conf = resolv_conf
        self._read: tuple[int | None, list[tuple[str, int]]] | None = None  # (resolv.conf's mtime, its servers)

    def servers(self) -> list[tuple[str, int]]:
        if self._configured:
            return self._configured
        stamp = modified_at(self._resolv_conf)
        if self._read is None or self._read[0] != stamp:
            self._read = (stamp, [split_nameserver(entry) for entry in system_nameservers(self._resolv_conf)])
        return self._read[1]


def modified_at(path: str) -> int | None:
    """A file's modification time (ns); None when it cannot be read."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def system_nameservers(resolv_conf: str = RESOLV_CONF) -> list[str]:
    """resolv.conf's name servers, as c-ares reads them; [] when there is none to read."""
    try:
        return [str(server) for server in dns.resolver.Resolver(filename=resolv_conf, configure=True).nameservers]
    except (dns.exception.DNSException, OSError):
        return []


def cares_result(reply: dns.message.Message) -> pycares.DNSResult:
    """A dnspython NOERROR reply as c-ares's query_dns gives it: its answer records (none: the DNSError ENODATA)."""
    if not reply.answer:
        raise aiodns.error.DNSError(aiodns.error.ARES_ENODATA, "DNS server returned answer with no data")
    records = [pycares.DNSRecord(rrset.name.to_text(omit_final_dot=True), rrset.rdtype, rrset.rdclass, rrset.ttl,
                                 RECORD_DATA[rrset.rdtype](rdata))
               for rrset in reply.answer if rrset.rdtype in RECORD_DATA for rdata in rrset]
    return pycares.DNSResult(records, [], [])


def _target(name: dns.name.Name) -> str:
    """A name in a record's data as pycares gives it: without the final dot, in dnspython's presentation form
    (which escapes a space as \\032 where c-ares leaves it; such a name is no host name either way)."""
    return name.to_text(omit_final_dot=True)


CaresRecordData = (pycares.ARecordData | pycares.AAAARecordData | pycares.MXRecordData | pycares.TXTRecordData
                   | pycares.PTRRecordData | pycares.NSRecordData | pycares.CNAMERecordData)
# Answer records as pycares gives them, by type (dnspython rdata -> pycares record data).
RECORD_DATA: dict[int, Callable[[Any], CaresRecordData]] = {
    dns.rdatatype.A: lambda rdata: pycares.ARecordData(rdata.address),
    dns.rdatatype.AAAA: lambda rdata: pycares.AAAARecordData(rdata.address),
    dns.rdatatype.MX: lambda rdata: pycares.MXRecordData(rdata.preference, _target(rdata.exchange)),
    dns.rdatatype.TXT: lambda rdata: pycares.TXTRecordData(b"".join(rdata.strings)),
    dns.rdatatype.PTR: lambda rdata: pycares.PTRRecordData(_target(rdata.target)),
    dns.rdatatype.NS: lambda rdata: pycares.NSRecordData(_target(rdata.target)),
    dns.rdatatype.CNAME: lambda rdata: pycares.CNAMERecordData(_target(rdata.target)),
}


def error_code(error: aiodns.error.DNSError) -> int | None:
    """A c-ares failure's ARES_* code; None for one without."""
    return error.args[0] if error.args else None


def is_timeout(error: aiodns.error.DNSError) -> bool:
    return error_code(error) == aiodns.error.ARES_ETIMEOUT


def split_nameserver(entry: str) -> tuple[str, int]:
    """ "ip", "ip:port", "[v6]:port" or a bare IPv6 address -> (ip, port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, port = entry[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, int(port)
    return entry, 53


def _text(data) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


def dns_name(name: str) -> str:
    """The ASCII (A-label) form of a possibly internationalised name; c-ares only takes ASCII."""
    if name.isascii():
        return name
    try:
        return ascii_domain(name)
    except UnicodeError:
        return name  # c-ares rejects it, and the error becomes a LookupRetry


def check_reply_names(records, name: str, qtype: str) -> None:
    """Raises InvalidReply when a record's owner name, or a CNAME's target, is no host name (Postfix's
    dns_get_answer: valid_rr_name on each "resource name", and on the "resource data" of a CNAME it follows),
    after Postfix's warning."""
    for rec in records:
        rtype = RECORD_TYPES.get(rec.type, str(rec.type))
        if not checked_rr_name(normalize_name(rec.name), "resource name", rtype, name):
            raise InvalidReply(name, qtype)
        if rec.type == pycares.QUERY_TYPE_CNAME and not checked_rr_name(normalize_name(rec.data.cname),
                                                                         "resource data", rtype, name):
            raise InvalidReply(name, qtype)


def usable_mx_records(records: list[MX], domain: str) -> list[MX]:
    """The records of an MX answer Postfix's dns_get_answer keeps: each record whose host is no host name is
    dropped after Postfix's warning; a null MX is kept (its callers take the answer as a null MX, as Postfix's
    DNS_NULLMX, whatever else it holds); InvalidReply only when none is left (Postfix's DNS_INVAL only when no
    record was found)."""
    usable = [record for record in records
              if record.is_null or checked_rr_name(record.host, "resource data", "MX", domain)]
    if records and not usable:
        raise InvalidReply(domain, "MX")
    return usable


async def answer_by(deadline: float, name: str, qtype: str, asking: Awaitable[Any]) -> Any:
    """What `asking` (a lookup of name/qtype) answers by `deadline` (loop time); [] for NODATA. Raises NotFound or
    LookupRetry: its DNSError as `classify_dns_error` says, no answer by then as TRY_AGAIN, an OSError, ValueError
    or c-ares error (a descriptor, an address it cannot use) with its text."""
    try:
        async with asyncio.timeout_at(deadline):
            return await asking
    except TimeoutError:
        raise LookupRetry(f"Name service error for name={name} type={qtype}: {TRY_AGAIN}") from None
    except aiodns.error.DNSError as e:
        return classify_dns_error(e, name, qtype)
    except (OSError, ValueError, pycares.AresError) as e:
        log.debug("lookup %s %s failed: %r", name, qtype, e)
        raise LookupRetry(f"Name service error for name={name} type={qtype}: {e}") from None


def classify_dns_error(error: aiodns.error.DNSError, name: str, qtype: str) -> list:
    """NODATA -> [] (returned); NXDOMAIN, and a malformed name c-ares will not ask (`a..test`, a label over 63
    octets: Postfix's dns_lookup finds such a name not valid_hostname and answers DNS_NOTFOUND) -> NotFound;
    a reply c-ares cannot read -> UnreadableReply; everything else -> LookupRetry, a SERVFAIL, a timeout, no server,
    REFUSED or NOTIMP (where the system's resolver, Postfix's, tries the next server and then says TRY_AGAIN) in
    Postfix's words ("Host not found, try again")."""
    code = error_code(error)
    if code == aiodns.error.ARES_ENODATA:
        return []
    if code in (aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_EBADNAME):
        raise NotFound(name, qtype) from None
    if code == aiodns.error.ARES_EBADRESP:
        log.debug("lookup %s %s failed: %s", name, qtype, error.args[1:] or error)
        raise UnreadableReply(name, qtype) from None
    if code == aiodns.error.ARES_EFORMERR:
        raise NonRecoverable(name, qtype) from None
    reason = error.args[1] if len(error.args) > 1 else repr(error)
    log.debug("lookup %s %s failed: %s", name, qtype, reason)
    if code in TRY_AGAIN_CODES:
        reason = TRY_AGAIN
    raise LookupRetry(f"Name service error for name={name} type={qtype}: {reason}") from None


def merge_address_answers(answers: Sequence[object]) -> list[str]:
    """A then AAAA. Any address wins; else a temporary failure wins over an invalid reply, which wins over a
    non-recoverable one, which wins over NotFound; else no address at all. Of two equal failures the last (AAAA's)
    is raised, as Postfix's dns_lookup_rv reports the last of equals."""
    found = [addr for answer in answers if isinstance(answer, list) for addr in answer]
    if found:
        return found
    failure = worst_failure(answers)
    if failure is None:
        return []
    try:
        raise failure
    finally:  # its traceback holds this frame, which must then not hold it (a cycle for the garbage collector)
        del failure, answers


def worst_failure(answers: Sequence[object]) -> BaseException | None:
    """Of the failures among `answers`, the one Postfix's dns_lookup_rl keeps (failure_rank), the last of equals."""
    failures = [answer for answer in answers if isinstance(answer, BaseException)]
    return max(reversed(failures), key=failure_rank) if failures else None  # (max keeps the first of equals)


# Postfix's dns.h statuses, negated: the higher the worse, as dns_lookup_rl keeps the worst met.
DNS_RETRY, DNS_INVAL, DNS_FAIL, DNS_NULLMX, DNS_NOTFOUND = 6, 5, 4, 3, 2


def failure_rank(failure: BaseException | None) -> int:
    """A lookup's failure as Postfix's status: a temporary one (UnreadableReply too) DNS_RETRY, InvalidReply
    DNS_INVAL, NonRecoverable DNS_FAIL, NotFound DNS_NOTFOUND; 0 for none. (A null MX, no failure, is DNS_NULLMX.)"""
    if isinstance(failure, InvalidReply):
        return DNS_INVAL
    if isinstance(failure, NonRecoverable):
        return DNS_FAIL
    if isinstance(failure, LookupRetry):
        return DNS_RETRY
    return DNS_NOTFOUND if isinstance(failure, NotFound) else 0
