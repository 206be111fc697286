"""Name service for delivery and the inbound checks: MX, address, TXT and PTR lookups behind one small protocol.

Owns: the `Resolver` protocol every component receives through its constructor, the `MX` value, the real
implementation over aiodns (`AiodnsResolver`) and a dictionary-backed one for unit tests (`StaticResolver`).
Nothing here is global: build a resolver, pass it in. It takes plain values, not the configuration: this
module imports nothing of mailflow but `errors` and `syntax`, so the configuration and every component may use it.

    MX(preference, host)                      one MX record; host "." is RFC 7505's null MX
    Resolver.mx(domain) -> list[MX]           sorted by preference; [] = the domain exists but has no MX
    Resolver.addresses(host) -> list[str]     A records, then AAAA records, as IP strings; [] = no address
    Resolver.txt(name) -> list[bytes]         TXT records, each one's strings joined (SPF, DKIM keys, DMARC)
    Resolver.ptr(ip) -> list[str]             the names of an IP address (its in-addr.arpa / ip6.arpa PTRs)
    AiodnsResolver(nameservers=…, timeout=…, tries=…) / .close()    (app.py builds it from [dns])
    StaticResolver(mx={...}, addresses={...}, txt={...}, ptr={...})
    reverse_name(ip) -> str                   4.3.2.1.in-addr.arpa / nibbles.ip6.arpa
    is_ip_literal(host) -> bool               an IP literal resolves to itself, without a query
                                              (mailflow.syntax.is_ip_address)

Failure behaviour (a failed lookup is never "not found"):
- the name does not exist (NXDOMAIN)                     -> raise `NotFound` (permanent, 5.1.2)
- SERVFAIL, REFUSED, timeout, no server, anything else   -> raise `mailflow.errors.LookupRetry` (temporary)
- the name exists without records of the type (NODATA)   -> an empty list
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Protocol

import aiodns
import aiodns.error
import pycares

from mailflow.errors import LookupRetry, PermanentError
from mailflow.syntax import is_ip_address as is_ip_literal

log = logging.getLogger("mailflow.dns")

NULL_MX_HOST = "."


@dataclass(frozen=True)
class MX:
    preference: int
    host: str

    @property
    def is_null(self) -> bool:
        return self.host == NULL_MX_HOST


class NotFound(PermanentError):
    """The name does not exist (NXDOMAIN): a permanent answer, unlike `LookupRetry`."""

    def __init__(self, name: str, qtype: str):
        super().__init__(
            "5.1.2",
            f"Host or domain name not found. Name service error for name={name} type={qtype}: Host not found",
        )
        self.name = name
        self.qtype = qtype


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[MX]: ...

    async def addresses(self, host: str) -> list[str]: ...

    async def txt(self, name: str) -> list[bytes]: ...

    async def ptr(self, address: str) -> list[str]: ...


def reverse_name(address: str) -> str:
    """The PTR query name of an IP address (ValueError for anything else)."""
    return ipaddress.ip_address(address).reverse_pointer


def sort_mx(records: list[MX]) -> list[MX]:
    """By preference; the order among equal preferences is left to the caller (the SMTP client shuffles)."""
    return sorted(records, key=lambda r: r.preference)


def normalize_name(name: str) -> str:
    """Lower case without the trailing dot; the root (the null MX's target) stays '.'."""
    return name.strip().rstrip(".").lower() or NULL_MX_HOST


class StaticResolver:
    """A resolver answering from dictionaries, for unit tests. A name missing from a table raises `NotFound`."""

    def __init__(self, mx: dict[str, list[MX]] | None = None, addresses: dict[str, list[str]] | None = None,
                 txt: dict[str, list[bytes]] | None = None, ptr: dict[str, list[str]] | None = None):
        self._mx = {normalize_name(k): list(v) for k, v in (mx or {}).items()}
        self._addresses = {normalize_name(k): list(v) for k, v in (addresses or {}).items()}
        self._txt = {normalize_name(k): list(v) for k, v in (txt or {}).items()}
        self._ptr = {k: [normalize_name(n) for n in v] for k, v in (ptr or {}).items()}

    async def txt(self, name: str) -> list[bytes]:
        key = normalize_name(name)
        if key in self._txt:
            return list(self._txt[key])
        if key in self._mx or key in self._addresses:
            return []
        raise NotFound(name, "TXT")

    async def ptr(self, address: str) -> list[str]:
        if address in self._ptr:
            return list(self._ptr[address])
        raise NotFound(reverse_name(address), "PTR")

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
        raise NotFound(host, "A")


class AiodnsResolver:
    """The real resolver: aiodns 4 (c-ares) `query_dns`, against `nameservers` or the system's resolv.conf.

    The aiodns channel binds to the event loop it was made in, so it is made on first use inside the running
    loop, and made again if a later call comes from another loop.
    """

    def __init__(self, *, nameservers: tuple[str, ...], timeout: float, tries: int):
        """`nameservers`: "ip" or "ip:port" entries, () for the system's resolv.conf; `timeout` seconds per
        try; `tries` per query (c-ares)."""
        self._nameservers = tuple(nameservers)
        self._timeout = timeout
        self._tries = tries
        self._channel: aiodns.DNSResolver | None = None

    async def mx(self, domain: str) -> list[MX]:
        result = await self._query(domain, "MX")
        records = [
            MX(rec.data.priority, normalize_name(rec.data.exchange))
            for rec in result
            if rec.type == pycares.QUERY_TYPE_MX
        ]
        return sort_mx(records)

    async def addresses(self, host: str) -> list[str]:
        if is_ip_literal(host):
            return [host]
        answers = await asyncio.gather(
            self._addresses_of_type(host, "A", pycares.QUERY_TYPE_A),
            self._addresses_of_type(host, "AAAA", pycares.QUERY_TYPE_AAAA),
            return_exceptions=True,
        )
        return merge_address_answers(answers)

    async def txt(self, name: str) -> list[bytes]:
        return [bytes(rec.data.data) for rec in await self._query(name, "TXT") if rec.type == pycares.QUERY_TYPE_TXT]

    async def ptr(self, address: str) -> list[str]:
        try:
            name = reverse_name(address)
        except ValueError:
            raise NotFound(address, "PTR") from None
        return [normalize_name(rec.data.dname) for rec in await self._query(name, "PTR")
                if rec.type == pycares.QUERY_TYPE_PTR]

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _addresses_of_type(self, host: str, qtype: str, type_code: int) -> list[str]:
        result = await self._query(host, qtype)
        return [rec.data.addr for rec in result if rec.type == type_code]

    async def _query(self, name: str, qtype: str) -> list:
        """The answer section's records; NODATA gives []. Raises NotFound or LookupRetry."""
        try:
            result = await self._resolver().query_dns(dns_name(name), qtype)
        except aiodns.error.DNSError as e:
            return classify_dns_error(e, name, qtype)
        except (OSError, ValueError, pycares.AresError) as e:
            log.debug("lookup %s %s failed: %r", name, qtype, e)
            raise LookupRetry(f"Name service error for name={name} type={qtype}: {e}") from None
        return list(result.answer)

    def _resolver(self) -> aiodns.DNSResolver:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._channel.loop is not loop:
            self._channel = aiodns.DNSResolver(
                nameservers=list(self._nameservers) or None,
                loop=loop,
                timeout=self._timeout,
                tries=self._tries,
            )
        return self._channel


def dns_name(name: str) -> str:
    """The ASCII (A-label) form of a possibly internationalised name; c-ares only takes ASCII."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name  # c-ares rejects it, and the error becomes a LookupRetry


def classify_dns_error(error: aiodns.error.DNSError, name: str, qtype: str) -> list:
    """NODATA -> [] (returned); NXDOMAIN -> NotFound; everything else -> LookupRetry."""
    code = error.args[0] if error.args else None
    if code == aiodns.error.ARES_ENODATA:
        return []
    if code == aiodns.error.ARES_ENOTFOUND:
        raise NotFound(name, qtype) from None
    reason = error.args[1] if len(error.args) > 1 else repr(error)
    log.debug("lookup %s %s failed: %s", name, qtype, reason)
    raise LookupRetry(f"Name service error for name={name} type={qtype}: {reason}") from None


def merge_address_answers(answers: list) -> list[str]:
    """A then AAAA. Any address wins; else a temporary failure wins over NotFound; else no address at all."""
    found = [addr for answer in answers if isinstance(answer, list) for addr in answer]
    if found:
        return found
    for answer in answers:
        if isinstance(answer, LookupRetry):
            raise answer
    for answer in answers:
        if isinstance(answer, NotFound):
            raise answer
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return []
