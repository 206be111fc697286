"""SPF (RFC 7208) evaluation over mailflow's Resolver, for `check-deliverability`: would receivers accept mail from
this address for this domain?

    await check_host(resolver, ip, domain) -> SpfResult(result, record, reason)
        result: pass, fail, softfail, neutral, none, permerror, temperror (RFC 7208 2.6)

Mechanisms: all, ip4, ip6, a, mx (with /cidr and //cidr6), include, exists, ptr (deprecated: never matches here);
modifiers redirect= (exp= is read and ignored). Limits as RFC 7208 4.6.4: ten terms that cause lookups, two void
lookups, ten MX hosts. Macros (`%{...}`) are not expanded: a term that needs them gives permerror, naming it, so the
check never reports a pass it could not establish.
Why not pyspf: it asks DNS through dnspython's global default resolver, a second resolver path that tests could not
point at the in-process DNS without changing global state.
Failure behaviour: never raises; a DNS failure is `temperror` with its reason.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailflow.dns import NotFound, Resolver
from mailflow.errors import DeliveryError, LookupRetry

LOOKUP_LIMIT = 10
VOID_LIMIT = 2
MX_LIMIT = 10
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}


@dataclass(frozen=True)
class SpfResult:
    result: str
    record: str = ""
    reason: str = ""


class _Abort(Exception):
    def __init__(self, result: str, reason: str):
        super().__init__(reason)
        self.result, self.reason = result, reason


class _Evaluation:
    def __init__(self, resolver: Resolver, ip: str):
        self.resolver = resolver
        self.ip = ipaddress.ip_address(ip)
        self.lookups = 0
        self.voids = 0

    def count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise _Abort("permerror", f"more than {LOOKUP_LIMIT} DNS-querying terms")

    async def ask(self, kind: str, name: str) -> list:
        try:
            answer = await getattr(self.resolver, kind)(name)
        except NotFound:
            answer = []
        except (LookupRetry, DeliveryError) as e:
            raise _Abort("temperror", e.text) from None
        if not answer:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise _Abort("permerror", f"more than {VOID_LIMIT} lookups found nothing")
        return answer

    async def record(self, domain: str) -> str | None:
        found = [t for t in await self.ask("txt", domain) if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
        if len(found) > 1:
            raise _Abort("permerror", f"{domain} has {len(found)} SPF records")
        return found[0] if found else None

    async def evaluate(self, domain: str) -> tuple[str, str]:
        """(result, the record) for `domain`."""
        record = await self.record(domain)
        if record is None:
            return "none", ""
        redirect = None
        for term in record.split()[1:]:
            name, equals, value = term.partition("=")
            if equals and ":" not in name and "/" not in name:
                if name.lower() == "redirect":
                    redirect = value
                continue  # exp= and unknown modifiers
            qualifier = QUALIFIERS.get(term[0], None)
            mechanism = term[1:] if qualifier else term
            if await self.matches(mechanism, domain):
                return qualifier or "pass", record
        if redirect:
            self.count_lookup()
            result, _ = await self.evaluate(_plain(redirect))
            if result == "none":
                raise _Abort("permerror", f"redirect={redirect} has no SPF record")
            return result, record
        return "neutral", record

    async def matches(self, mechanism: str, domain: str) -> bool:
        kind, _, argument = mechanism.partition(":")
        kind = kind.lower()
        if "/" in kind:  # a/24, mx//64
            kind, slash, cidr = kind.partition("/")
            argument = f"{argument}/{cidr}" if argument else f"/{cidr}"
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            try:
                return self.ip in ipaddress.ip_network(argument, strict=False)
            except ValueError:
                raise _Abort("permerror", f"bad network in {mechanism}") from None
        if kind == "include":
            self.count_lookup()
            result, _ = await self.evaluate(_plain(argument))
            if result in ("temperror", "permerror"):
                raise _Abort(result, f"include:{argument}")
            if result == "none":
                raise _Abort("permerror", f"include:{argument} has no SPF record")
            return result == "pass"
        if kind in ("a", "mx"):
            self.count_lookup()
            target, v4, v6 = _cidr(argument, domain)
            hosts = [target]
            if kind == "mx":
                hosts = [mx.host for mx in await self.ask("mx", target)][:MX_LIMIT]
            for host in hosts:
                for address in await self.ask("addresses", host):
                    prefix = v6 if ":" in address else v4
                    if self.ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False):
                        return True
            return False
        if kind == "exists":
            self.count_lookup()
            return bool(await self.ask("addresses", _plain(argument)))
        if kind == "ptr":
            self.count_lookup()
            return False
        raise _Abort("permerror", f"unknown mechanism {mechanism!r}")


def _plain(domain_spec: str) -> str:
    if "%" in domain_spec:
        raise _Abort("permerror", f"{domain_spec!r} uses macros, which this check does not expand")
    return domain_spec.rstrip(".")


def _cidr(argument: str, domain: str) -> tuple[str, int, int]:
    """`host/24//64` -> (host, 24, 64); an empty host is the domain itself."""
    target, _, lengths = argument.partition("/")
    v4, _, v6 = lengths.partition("/")
    v6 = v6.lstrip("/")
    try:
        return _plain(target) if target else domain, int(v4 or 32), int(v6 or 128)
    except ValueError:
        raise _Abort("permerror", f"bad prefix length in {argument!r}") from None


async def check_host(resolver: Resolver, ip: str, domain: str) -> SpfResult:
    evaluation = _Evaluation(resolver, ip)
    try:
        result, record = await evaluation.evaluate(domain.rstrip("."))
    except _Abort as e:
        return SpfResult(e.result, "", e.reason)
    return SpfResult(result, record)
