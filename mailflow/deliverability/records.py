"""`mailflow dns-records DOMAIN`: the records to publish, in zone file syntax, derived from the configuration.

    public_addresses(config) -> [ip]       deliverability.outbound_addresses, else per SMTP client ([smtp] and each
                                           [smtp.services.NAME]) and address family its bind_address /
                                           bind_address6 (the source of outgoing connections) when public, else (no
                                           bind address for the family) the listener addresses that are public
                                           (global unicast), each once; [] when none is known
    outbound_addresses(config) -> ([ip], [ip])   (those public addresses, the bind addresses left out as not public)
    outbound_clients(config) -> [OutboundClient]   each SMTP client's HELO name and public addresses
    domain_keys(config, domain) -> [SigningKey]   the KeyTable's keys for the domain (a "%" key stands for it)
    sts_policy_text(config, domain) -> str the MTA-STS policy file to serve (mode deliverability.mta_sts_mode)
    records(config, domain) -> [str]       zone lines (comments start with ';'): MX -> myhostname; myhostname's A/AAAA
                                           (a service's own HELO name's A/AAAA for its addresses);
                                           SPF (`ip4:`/`ip6:` each address, `-all`); each DKIM key's TXT; DMARC
                                           (p=quarantine, relaxed alignment, reports to report_address); MTA-STS TXT
                                           (id from the policy's hash) and mta-sts.DOMAIN's addresses; TLS-RPT; a PTR
                                           line per address naming its client's HELO name (myhostname for [smtp]; to
                                           be set by whoever owns the address block); the
                                           policy file, as comments
Failure behaviour: ConfigError from reading the DKIM tables (the caller reports it); nothing else raises.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

import dns.reversename

from mailflow.config import Config, SmtpConfig
from mailflow.signing import keygen
from mailflow.signing.keytables import SigningKey, keys_from_config
from mailflow.syntax import parse_hostport

STS_MAX_AGE = 604800  # a week: long enough for the cache to matter, short enough to change course


def public_addresses(config: Config) -> list[str]:
    return outbound_addresses(config)[0]


@dataclass(frozen=True)
class OutboundClient:
    """One SMTP client as receivers see it: where its settings are (`smtp`, `smtp.services.NAME`), the HELO name it
    sends (its helo_name, else myhostname) and the public addresses its connections leave from."""
    where: str
    helo: str
    addresses: list[str]


def outbound_clients(config: Config) -> list[OutboundClient]:
    """[smtp] and then each [smtp.services.NAME] (a second outbound IP and HELO name is a common reason for one),
    each with its public outbound addresses (see outbound_addresses); with deliverability.outbound_addresses set,
    the one entry [smtp]'s with those."""
    clients = _smtp_clients(config)
    if config.deliverability.outbound_addresses:
        clients = clients[:1]
    return [OutboundClient(where, client.helo_name or config.myhostname, _client_addresses(config, client)[0])
            for where, client in clients]


def _smtp_clients(config: Config) -> list[tuple[str, SmtpConfig]]:
    """(where its settings are, its settings) of each SMTP client: [smtp], then each [smtp.services.NAME] merged."""
    return [("smtp", config.smtp)] + [(f"smtp.services.{name}", config.smtp.for_service(name))
                                      for name in config.smtp.services]


def outbound_addresses(config: Config) -> tuple[list[str], list[str]]:
    """(the public outbound addresses, the bind addresses left out as not public) of every SMTP client ([smtp] and
    its services), each once: deliverability.outbound_addresses when set (the operator knows best), else per client
    and address family: a bind address (bind_address for IPv4, bind_address6 for IPv6: outgoing connections leave
    from it) stands for that family's listener addresses; one that is not global unicast (behind NAT, say) is left
    out, and the family's public address is then unknown; a family with no bind address has its public listener
    addresses."""
    if config.deliverability.outbound_addresses:
        return list(config.deliverability.outbound_addresses), []
    found: list[str] = []
    not_public: list[str] = []
    for _, client in _smtp_clients(config):
        public, private = _client_addresses(config, client)
        found += [a for a in public if a not in found]
        not_public += [a for a in private if a not in not_public]
    return found, not_public


def _client_addresses(config: Config, client: SmtpConfig) -> tuple[list[str], list[str]]:
    """(public, not public) outbound addresses of one SMTP client's settings (deliverability.outbound_addresses when
    set)."""
    if config.deliverability.outbound_addresses:
        return list(config.deliverability.outbound_addresses), []
    listeners = [address for address in _listener_addresses(config) if address.is_global]
    found: list[str] = []
    not_public: list[str] = []
    for version, bound in ((4, client.bind_address), (6, client.bind_address6)):
        if not bound:
            found += [str(address) for address in listeners if address.version == version]
        elif ipaddress.ip_address(bound).is_global:
            found.append(str(ipaddress.ip_address(bound)))
        else:
            not_public.append(bound)
    return found, not_public


def _listener_addresses(config: Config) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for value in list(config.smtpd.listen) + [listener.address for listener in config.smtpd.listeners]:
        try:
            address = ipaddress.ip_address(parse_hostport(value)[0])
        except ValueError:
            continue
        if address not in found:
            found.append(address)
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


def _own_helo_services(config: Config) -> list[OutboundClient]:
    """The services whose HELO name is not [smtp]'s (their own helo_name)."""
    first, *services = outbound_clients(config)
    return [client for client in services if client.helo != first.helo]


def _reverse_records(config: Config) -> list[str]:
    """A PTR line per outbound address naming the HELO name of the first client that sends from it ([smtp] names
    myhostname, as it always has; a service its own helo_name)."""
    own = _own_helo_services(config)
    named: dict[str, str] = {}
    for client in outbound_clients(config):
        for address in client.addresses:
            named.setdefault(address, client.helo if client in own else config.myhostname)
    return [f"{dns.reversename.from_address(a).to_text()} IN PTR {host}." for a, host in named.items()]


def records(config: Config, domain: str) -> list[str]:
    host = config.myhostname
    policy = sts_policy_text(config, domain)
    policy_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
    rua = report_address(config, domain)
    out = [f"; records for {domain}, from the configuration of {host} (mailflow dns-records)", "",
           "; where mail for the domain goes", f"{domain}. IN MX 10 {host}."]
    addresses, not_public = outbound_addresses(config)
    out += [f"; the bind address {a} is not public: set deliverability.outbound_addresses" for a in not_public]
    if not addresses:
        out.append("; no public address known: set deliverability.outbound_addresses, then run this again")
    out += [_address_record(host, a) for a in addresses]
    out += [_address_record(c.helo, a) for c in _own_helo_services(config) if c.helo != host for a in c.addresses]
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
    out += _reverse_records(config)
    out += ["", f"; the MTA-STS policy: serve it as text/plain at https://mta-sts.{domain}/.well-known/mta-sts.txt",
            "; with a certificate for mta-sts." + domain + " (change `id` above whenever it changes)"]
    out += [f";   {line}" for line in policy.splitlines()]
    return out
