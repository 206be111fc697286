"""trivial-rewrite at its simplest: which address class a recipient is in, and its `transport:nexthop`.

- local: the domain is in `mydestination` -> `local_transport`.
- relay: the domain is in `relay_domains` -> `relay_transport`.
- default: anything else -> `default_transport`.
A transport value may carry its own nexthop (`smtp:[10.0.0.1]:587`); otherwise relay and default mail
goes to `relayhost` when set, else to the recipient domain (MX lookup). An entry `.example.com` in a
domain list matches subdomains of example.com. Unqualified addresses are taken as `user@myhostname`.
Pure: config in, values out.
"""
from __future__ import annotations

from mailflow import address
from mailflow.model import AddressClass, Resolution


def split_transport(value: str) -> tuple[str, str]:
    """'smtp:[host]:25' -> ('smtp', '[host]:25'); 'local' -> ('local', '')."""
    name, _, nexthop = value.partition(":")
    return name, nexthop


def domain_in(domain: str, domains: tuple[str, ...]) -> bool:
    for entry in domains:
        if domain == entry or (entry.startswith(".") and domain.endswith(entry)):
            return True
    return False


class Rewriter:
    def __init__(self, config):
        self._config = config

    def qualify(self, addr: str) -> str:
        local, domain = address.split(addr)
        return addr if domain or not addr else f"{addr}@{self._config.myhostname}"

    def classify(self, addr: str) -> AddressClass:
        domain = address.normalise_domain(address.split(self.qualify(addr))[1])
        if domain_in(domain, self._config.mydestination):
            return AddressClass.LOCAL
        if domain_in(domain, self._config.relay_domains):
            return AddressClass.RELAY
        return AddressClass.DEFAULT

    def resolve(self, addr: str) -> Resolution:
        c = self._config
        qualified = self.qualify(addr)
        klass = self.classify(qualified)
        if klass is AddressClass.LOCAL:
            transport, nexthop = split_transport(c.local_transport)
            return Resolution(klass, transport, nexthop or c.myhostname, qualified)
        value = c.relay_transport if klass is AddressClass.RELAY else c.default_transport
        transport, nexthop = split_transport(value)
        domain = address.normalise_domain(address.split(qualified)[1])
        return Resolution(klass, transport, nexthop or c.relayhost or domain, qualified)

    def local_user(self, addr: str) -> str:
        """The mailbox name of a local address: its local part, lower-cased."""
        return address.split(self.qualify(addr))[0].lower()

    def is_known_local(self, addr: str) -> bool:
        recipients = self._config.local.recipients
        return not recipients or self.local_user(addr) in {r.lower() for r in recipients}
