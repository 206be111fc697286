"""`mailflow check-deliverability [DOMAIN]`: asks DNS what receivers will see, one finding per point.

    Finding(point, verdict, text, advice)   verdict "pass", "warn" or "fail"; advice: what to change ('' for a pass)
    await check(config, domain, resolver, fetcher) -> [Finding]   in this order:
      mx        the domain's MX hosts each resolve (no MX: warn, mail goes to the domain's own address)
      helo      smtp.helo_name (else myhostname) resolves to each outbound address; then each [smtp.services.NAME]
                whose HELO name or bind addresses differ, its own
      ptr       each outbound address has a PTR naming a host that resolves back to it (forward-confirmed), and
                that name is its client's HELO name (another name: warn); per client as helo
      spf       the domain's one SPF record passes each outbound address (mailflow.filters.spf_query)
      dkim      each key of the domain in dkim.key_table is published, with the same public key (none: warn)
      dmarc     a DMARC record with a policy, and an aligned way to pass it: a DKIM key of the domain (or, with
                relaxed alignment, a parent or child), or SPF passing for senders of the domain
      mta-sts   the `_mta-sts` record, the policy it announces fetched over HTTPS and valid, and every MX host of the
                domain allowed by it (nothing published: warn)
      tls-rpt   an `_smtp._tls` TLSRPTv1 record (none: warn)
    exit_code(findings) -> 0 (no fail) or 1
The outbound addresses are mailflow.deliverability.records.public_addresses (without any, the points that need one
warn). `fetcher` is the MTA-STS policy fetcher (mailflow.transports.smtp.mtasts.HttpsPolicyFetcher).
Failure behaviour: a DNS failure makes its point fail, naming the lookup; nothing raises but ConfigError (the DKIM
tables cannot be read).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

from mailflow.config import Config
from mailflow.deliverability.records import OutboundClient, domain_keys, outbound_clients, public_addresses
from mailflow.filters.spf_query import check_host
from mailflow.dns import NotFound, Resolver
from mailflow.errors import DeliveryError, LookupRetry
from mailflow.transports.smtp.mtasts import FetchError, mx_allowed, parse_policy, parse_record


@dataclass(frozen=True)
class Finding:
    point: str
    verdict: str
    text: str
    advice: str = ""


class _Lookup:
    """The resolver, answering NXDOMAIN as nothing (other failures propagate: the point fails, naming them)."""

    def __init__(self, resolver: Resolver):
        self.resolver = resolver

    async def __call__(self, kind: str, name: str) -> list:
        try:
            return await getattr(self.resolver, kind)(name)
        except NotFound:
            return []


def _tags(record: str) -> dict[str, str]:
    return {k.strip().lower(): v.strip() for k, _, v in (p.partition("=") for p in record.split(";")) if k.strip()}


async def _mx(ask: _Lookup, domain: str) -> tuple[Finding, list[str]]:
    records = await ask("mx", domain)
    hosts = [r.host for r in records if not r.is_null]
    if not hosts:
        return Finding("mx", "warn", f"{domain} has no MX record: mail goes to the domain's own address",
                       f"publish `{domain}. IN MX 10 <your mail host>.`"), []
    unresolved = [h for h in hosts if not await ask("addresses", h)]
    if unresolved:
        return Finding("mx", "fail", f"MX host(s) without an address: {', '.join(unresolved)}",
                       "give each MX host an A or AAAA record, or remove it from the MX records"), hosts
    return Finding("mx", "pass", f"MX hosts {', '.join(hosts)} resolve"), hosts


async def _helo(ask: _Lookup, helo: str, addresses: list[str], where: str = "smtp") -> Finding:
    if not addresses:
        return Finding("helo", "warn", "no outbound address known", "set deliverability.outbound_addresses")
    found = await ask("addresses", helo)
    missing = [a for a in addresses if a not in found]
    if missing:
        return Finding("helo", "fail", f"HELO name {helo} resolves to {', '.join(found) or 'nothing'}, not "
                                       f"{', '.join(missing)}", f"publish an A/AAAA record of {helo} for "
                                                                f"{', '.join(missing)} (or set {where}.helo_name)")
    return Finding("helo", "pass", f"HELO name {helo} resolves to {', '.join(addresses)}")


async def _ptr(ask: _Lookup, helo: str, addresses: list[str], where: str = "smtp") -> list[Finding]:
    out = []
    for address in addresses:
        names = await ask("ptr", address)
        if not names:
            out.append(Finding("ptr", "fail", f"{address} has no PTR record",
                               f"ask whoever holds {address} to set its PTR to {helo}"))
            continue
        confirmed = [n for n in names if address in await ask("addresses", n)]
        if not confirmed:
            out.append(Finding("ptr", "fail", f"PTR of {address} names {', '.join(names)}, which does not resolve "
                                              f"back to it", f"set the PTR of {address} to {helo}, or give "
                                                             f"{names[0]} an address record for {address}"))
        elif helo.lower() not in confirmed:
            out.append(Finding("ptr", "warn", f"PTR of {address} is {confirmed[0]} (forward-confirmed), not the HELO "
                                              f"name {helo}", f"set {where}.helo_name to {confirmed[0]} or the PTR "
                                                              f"to {helo}"))
        else:
            out.append(Finding("ptr", "pass", f"PTR of {address} is {helo}, forward-confirmed"))
    return out


async def _spf(ask: _Lookup, domain: str, addresses: list[str], timeout: float) -> tuple[list[Finding], bool]:
    out, passes = [], bool(addresses)
    for address in addresses:
        result = await check_host(ask.resolver, address, domain, timeout=timeout)
        if result.result == "pass":
            out.append(Finding("spf", "pass", f"SPF of {domain} passes {address}{await _spf_record(ask, domain)}"))
            continue
        passes = False
        mechanism = f"ip{6 if ':' in address else 4}:{address}"
        if result.result == "none":
            out.append(Finding("spf", "fail", f"{domain} has no SPF record",
                               f'publish `{domain}. IN TXT "v=spf1 {mechanism} -all"`'))
        else:
            why = f" ({result.reason})" if result.reason else ""
            out.append(Finding("spf", "fail", f"SPF of {domain} gives {result.result} for {address}{why}",
                               f"add {mechanism} to the SPF record of {domain}"))
    if not addresses:
        out.append(Finding("spf", "warn", "no outbound address known", "set deliverability.outbound_addresses"))
    return out, passes


async def _spf_record(ask: _Lookup, domain: str) -> str:
    """`: v=spf1 …`, the record that passed, for the report ("" when it cannot be read again)."""
    try:
        records = [r for r in await ask("txt", domain) if r.lower().startswith("v=spf1")]
    except (LookupRetry, DeliveryError):
        return ""
    return f": {records[0]}" if records else ""


async def _dkim(ask: _Lookup, config: Config, domain: str) -> list[Finding]:
    keys = domain_keys(config, domain)
    if not keys:
        return [Finding("dkim", "warn", f"no DKIM key for {domain} in dkim.key_table: its mail goes unsigned",
                        f"`mailflow dkim keygen {domain} SELECTOR`, then list the key in dkim.key_table and "
                        f"dkim.signing_table")]
    out = []
    for key in keys:
        published = [_tags(t) for t in await ask("txt", key.record_name)]
        public = base64.b64encode(key.public).decode()
        if not published:
            out.append(Finding("dkim", "fail", f"{key.record_name} is not published",
                               f"publish `{key.record_name}. IN TXT \"{key.public_record()}\"`"))
        elif not any(p.get("p", "").replace(" ", "") == public for p in published):
            out.append(Finding("dkim", "fail", f"{key.record_name} publishes another key than {key.name}",
                               f"publish `{key.public_record()}` there (or sign with the key published)"))
        else:
            out.append(Finding("dkim", "pass", f"{key.record_name} publishes the signing key ({key.algorithm})"))
    return out


def _aligned(key_domain: str, domain: str, strict: bool) -> bool:
    if key_domain == domain:
        return True
    return not strict and (key_domain.endswith("." + domain) or domain.endswith("." + key_domain))


async def _dmarc(ask: _Lookup, config: Config, domain: str, spf_passes: bool, dkim_ok: bool) -> Finding:
    records = [t for t in await ask("txt", f"_dmarc.{domain}") if t.strip().lower().startswith("v=dmarc1")]
    advice = f'publish `_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"`'
    if len(records) != 1:
        return Finding("dmarc", "fail", f"_dmarc.{domain}: {len(records) or 'no'} DMARC records", advice)
    tags = _tags(records[0])
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return Finding("dmarc", "fail", f"the DMARC record of {domain} has no valid policy (p=)", advice)
    strict = tags.get("adkim", "r").lower() == "s"
    aligned = [k.domain for k in domain_keys(config, domain) if _aligned(k.domain, domain, strict)]
    if not (aligned and dkim_ok) and not spf_passes:
        return Finding("dmarc", "fail", f"DMARC p={policy}, but neither DKIM nor SPF can pass aligned with {domain}",
                       "publish the DKIM key of the domain and sign with it, or make SPF pass (see above)")
    note = " (reports only: move to quarantine once the reports are clean)" if policy == "none" else ""
    ways = " and ".join(w for w, ok in (("DKIM", aligned and dkim_ok), ("SPF", spf_passes)) if ok)
    return Finding("dmarc", "pass", f"DMARC p={policy}, passing aligned through {ways}{note}")


async def _mta_sts(ask: _Lookup, fetcher, domain: str, mx_hosts: list[str]) -> Finding:
    record_id = parse_record(await ask("txt", f"_mta-sts.{domain}"))
    if record_id is None:
        return Finding("mta-sts", "warn", f"{domain} publishes no MTA-STS policy: senders may deliver without TLS",
                       "publish the `_mta-sts` record and the policy `mailflow dns-records` shows")
    try:
        policy = parse_policy(await fetcher.fetch(domain))
    except (FetchError, ValueError) as e:
        return Finding("mta-sts", "fail", f"MTA-STS policy of {domain} (id {record_id}) not usable: {e}",
                       f"serve the policy at https://mta-sts.{domain}/.well-known/mta-sts.txt (text/plain, a "
                       f"certificate for mta-sts.{domain})")
    outside = [h for h in mx_hosts if not mx_allowed(h, policy.mx)]
    if outside and policy.mode != "none":
        return Finding("mta-sts", "fail", f"MTA-STS policy of {domain} does not allow MX host(s) {', '.join(outside)}",
                       "add them to the policy's mx: lines (and change the record's id)")
    if policy.mode == "none":
        return Finding("mta-sts", "warn", f"MTA-STS policy of {domain} is mode none", "use testing, then enforce")
    return Finding("mta-sts", "pass", f"MTA-STS policy of {domain}: mode {policy.mode}, mx {', '.join(policy.mx)}")


async def _tls_rpt(ask: _Lookup, domain: str) -> Finding:
    if any(t.strip().startswith("v=TLSRPTv1") for t in await ask("txt", f"_smtp._tls.{domain}")):
        return Finding("tls-rpt", "pass", f"_smtp._tls.{domain} asks for TLS reports")
    return Finding("tls-rpt", "warn", f"{domain} asks for no TLS reports (RFC 8460)",
                   f'publish `_smtp._tls.{domain}. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@{domain}"`')


def _helo_pairs(config: Config) -> list[OutboundClient]:
    """The (HELO name, addresses) each SMTP client shows receivers: [smtp]'s, then each service's that differs
    (another HELO name or bind address); a service like [smtp] adds nothing to check."""
    first, *services = outbound_clients(config)
    return [first] + [c for c in services if (c.helo, c.addresses) != (first.helo, first.addresses)]


async def check(config: Config, domain: str, resolver: Resolver, fetcher) -> list[Finding]:
    domain = domain.lower().rstrip(".")
    ask = _Lookup(resolver)
    addresses = public_addresses(config)
    findings: list[Finding] = []

    async def point(name: str, run):
        try:
            return await run
        except (LookupRetry, DeliveryError) as e:
            return Finding(name, "fail", f"DNS lookup failed: {e.text}", "try again; check the DNS servers")

    mx = await point("mx", _mx(ask, domain))
    mx_finding, mx_hosts = mx if isinstance(mx, tuple) else (mx, [])
    findings.append(mx_finding)
    for client in _helo_pairs(config):
        findings.append(await point("helo", _helo(ask, client.helo, client.addresses, client.where)))
        ptr = await point("ptr", _ptr(ask, client.helo, client.addresses, client.where))
        findings += ptr if isinstance(ptr, list) else [ptr]
    spf_findings, spf_passes = await _spf(ask, domain, addresses, config.sender_auth.timeout)
    findings += spf_findings
    dkim = await point("dkim", _dkim(ask, config, domain))
    dkim = dkim if isinstance(dkim, list) else [dkim]
    findings += dkim
    dkim_ok = any(f.verdict == "pass" for f in dkim)
    findings.append(await point("dmarc", _dmarc(ask, config, domain, spf_passes, dkim_ok)))
    findings.append(await point("mta-sts", _mta_sts(ask, fetcher, domain, mx_hosts)))
    findings.append(await point("tls-rpt", _tls_rpt(ask, domain)))
    return findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.verdict == "fail" for f in findings) else 0
