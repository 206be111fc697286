"""`mailflow dns-records DOMAIN`: the records to publish, in zone file syntax, derived from the configuration.

    public_addresses(config) -> [ip]       deliverability.outbound_addresses, else smtp.bind_address and
                                           bind_address6 (the source of outgoing connections), else the listener
                                           addresses that are public (global unicast); [] when none is known
    domain_keys(config, domain) -> [SigningKey]   the KeyTable's keys for the domain (a "%" key stands for it)
    sts_policy_text(config, domain) -> str the MTA-STS policy file to serve (mode deliverability.mta_sts_mode)
    records(config, domain) -> [str]       zone lines (comments start with ';'): MX -> myhostname; myhostname's A/AAAA;
                                           SPF (`ip4:`/`ip6:` each address, `-all`); each DKIM key's TXT; DMARC
                                           (p=quarantine, relaxed alignment, reports to report_address); MTA-STS TXT
                                           (id from the policy's hash) and mta-sts.DOMAIN's addresses; TLS-RPT; a PTR
                                           line per address (to be set by whoever owns the address block); the
                                           policy file, as comments
Failure behaviour: ConfigError from reading the DKIM tables (the caller reports it); nothing else raises.
"""
from __future__ import annotations

import hashlib
import ipaddress

import dns.reversename

from mailflow.config import Config
from mailflow.signing import keygen
from mailflow.signing.keytables import SigningKey, keys_from_config
from mailflow.syntax import parse_hostport

STS_MAX_AGE = 604800  # a week: long enough for the cache to matter, short enough to change course


def public_addresses(config: Config) -> list[str]:
    if config.deliverability.outbound_addresses:
        return list(config.deliverability.outbound_addresses)
    bound = [address for address in (config.smtp.bind_address, config.smtp.bind_address6) if address]
    if bound:
        return bound
    found = []
    for value in list(config.smtpd.listen) + [listener.address for listener in config.smtpd.listeners]:
        host = parse_hostport(value)[0]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            continue
        if address.is_global and str(address) not in found:
            found.append(str(address))
    return found


def domain_keys(config: Config, domain: str) -> list[SigningKey]:
    keys = keys_from_config(config.dkim)
    if keys is None:
        return []
    found = []
    for name in keys.key_table.names:
        key = keys.named(name, domain)
        if key is not None and key.domain == domain and key not in found:
            found.append(key)
    return found


def report_address(config: Config, domain: str) -> str:
    return config.deliverability.report_address or f"postmaster@{domain}"


def sts_policy_text(config: Config, domain: str) -> str:
    return (f"version: STSv1\nmode: {config.deliverability.mta_sts_mode}\nmx: {config.myhostname}\n"
            f"max_age: {STS_MAX_AGE}\n")


def _address_record(name: str, address: str) -> str:
    kind = "AAAA" if ":" in address else "A"
    return f"{name}. IN {kind} {address}"


def records(config: Config, domain: str) -> list[str]:
    host = config.myhostname
    addresses = public_addresses(config)
    policy = sts_policy_text(config, domain)
    policy_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
    rua = report_address(config, domain)
    out = [f"; records for {domain}, from the configuration of {host} (mailflow dns-records)", "",
           "; where mail for the domain goes", f"{domain}. IN MX 10 {host}."]
    if not addresses:
        out.append("; no public address known: set deliverability.outbound_addresses, then run this again")
    out += [_address_record(host, a) for a in addresses]
    spf = " ".join(["v=spf1", *(f"ip{6 if ':' in a else 4}:{a}" for a in addresses), "-all"])
    out += ["", "; SPF: the addresses that send for the domain", f'{domain}. IN TXT "{spf}"']
    keys = domain_keys(config, domain)
    out += ["", "; DKIM: one record per selector"] + [keygen.txt_record(k) for k in keys]
    if not keys:
        out.append(f"; no DKIM key for {domain} in dkim.key_table: "
                   f"make one with `mailflow dkim keygen {domain} SELECTOR`")
    out += ["", "; DMARC: what receivers do with mail that fails SPF and DKIM alignment, and where reports go",
            f'_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:{rua}"',
            "", "; MTA-STS (RFC 8461) and TLS reporting (RFC 8460)",
            f'_mta-sts.{domain}. IN TXT "v=STSv1; id={policy_id}"']
    out += [_address_record(f"mta-sts.{domain}", a) for a in addresses]
    out += [f'_smtp._tls.{domain}. IN TXT "v=TLSRPTv1; rua=mailto:{rua}"', "",
            "; reverse DNS: set by whoever holds the address block (your provider), naming the HELO name"]
    out += [f"{dns.reversename.from_address(a).to_text()} IN PTR {host}." for a in addresses]
    out += ["", f"; the MTA-STS policy: serve it as text/plain at https://mta-sts.{domain}/.well-known/mta-sts.txt",
            "; with a certificate for mta-sts." + domain + " (change `id` above whenever it changes)"]
    out += [f";   {line}" for line in policy.splitlines()]
    return out
