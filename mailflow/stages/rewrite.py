"""trivial-rewrite: which address class a recipient is in, and its `transport:nexthop`.

- local: the domain is in `mydestination` -> `local_transport`.
- virtual mailbox: the domain is in `virtual_mailbox_domains` -> `virtual_transport`; its users are the
  keys of `virtual_mailbox_maps` (`virtual_mailbox()` gives the Maildir path, `None` for an unknown user).
- relay: the domain is in `relay_domains` -> `relay_transport`.
- default: anything else -> `default_transport`.
A transport value may carry its own nexthop (`smtp:[10.0.0.1]:587`); otherwise relay and default mail
goes to `relayhost` when set, else to the recipient domain (MX lookup). An entry `.example.com` in a
domain list matches subdomains of example.com. Unqualified addresses are taken as `user@myhostname`.

`transport_maps` (transport(5)) override the class's choice. Search order: the address, the address
without its extension, the domain, each parent domain as `.parent`, then `*`. A value `transport:nexthop`
with an empty side keeps the class's transport or nexthop (`:[gw.example]`, `smtp:`).
`relay_recipient_maps`, when set, list the recipients of relay_domains that exist (`is_known_relay`).
Failures: a table that cannot answer raises `LookupRetry` (smtpd says 451 4.3.0, qmgr defers), never
"not found".
"""
from __future__ import annotations

from mailflow import address
from mailflow.model import AddressClass, Resolution
from mailflow.tables import Table, lookup_address, open_table, split_extension


def split_transport(value: str) -> tuple[str, str]:
    """'smtp:[host]:25' -> ('smtp', '[host]:25'); 'local' -> ('local', '')."""
    name, _, nexthop = value.partition(":")
    return name, nexthop


def domain_in(domain: str, domains: tuple[str, ...]) -> bool:
    for entry in domains:
        if domain == entry or (entry.startswith(".") and domain.endswith(entry)):
            return True
    return False


def transport_keys(addr: str, delimiter: str) -> list[str]:
    """transport(5)'s search keys for an address, most specific first."""
    local, _, domain = addr.rpartition("@")
    keys = [addr]
    user, ext = split_extension(local, delimiter)
    if ext:
        keys.append(f"{user}@{domain}")
    labels = domain.split(".")
    keys.append(domain)
    keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
    keys.append("*")
    return keys


def first_answer(tables: list[Table], keys: list[str]) -> tuple[str, str, str] | None:
    """(table, key, value) of the first table's answer for the first key it knows, tables in order.
    LookupRetry propagates."""
    for table in tables:
        for key in keys:
            value = table.lookup(key)
            if value is not None:
                return table.name, key, value
    return None


class Rewriter:
    def __init__(self, config, *, clock=None):
        self._config = config
        extra = {"clock": clock} if clock is not None else {}
        self._transport_maps = [open_table(spec, **extra) for spec in config.transport_maps]
        self._relay_recipient_maps = [open_table(spec, **extra) for spec in config.relay_recipient_maps]
        self._virtual_mailbox_maps = [open_table(spec, **extra) for spec in config.virtual_mailbox_maps]

    def qualify(self, addr: str) -> str:
        local, domain = address.split(addr)
        return addr if domain or not addr else f"{addr}@{self._config.myhostname}"

    def classify(self, addr: str) -> AddressClass:
        domain = address.normalise_domain(address.split(self.qualify(addr))[1])
        if domain_in(domain, self._config.mydestination):
            return AddressClass.LOCAL
        if domain_in(domain, self._config.virtual_mailbox_domains):
            return AddressClass.VIRTUAL_MAILBOX
        if domain_in(domain, self._config.relay_domains):
            return AddressClass.RELAY
        return AddressClass.DEFAULT

    def resolve(self, addr: str) -> Resolution:
        """The class's transport and nexthop, then transport_maps' override. May raise LookupRetry."""
        res = self._class_default(self.qualify(addr))
        match = self._transport_override(res.address)
        if match is None:
            return res
        transport, nexthop = split_transport(match[2].strip())
        return Resolution(res.address_class, transport or res.transport, nexthop or res.nexthop, res.address)

    def _class_default(self, qualified: str) -> Resolution:
        c = self._config
        klass = self.classify(qualified)
        domain = address.normalise_domain(address.split(qualified)[1])
        if klass is AddressClass.LOCAL:
            transport, nexthop = split_transport(c.local_transport)
            return Resolution(klass, transport, nexthop or c.myhostname, qualified)
        if klass is AddressClass.VIRTUAL_MAILBOX:
            transport, nexthop = split_transport(c.virtual_transport)
            return Resolution(klass, transport, nexthop or domain, qualified)
        value = c.relay_transport if klass is AddressClass.RELAY else c.default_transport
        transport, nexthop = split_transport(value)
        return Resolution(klass, transport, nexthop or c.relayhost or domain, qualified)

    def _transport_override(self, qualified: str) -> tuple[str, str, str] | None:
        if not self._transport_maps:
            return None
        local, _, domain = qualified.rpartition("@")
        key = f"{local.lower()}@{address.normalise_domain(domain)}"
        return first_answer(self._transport_maps, transport_keys(key, self._config.recipient_delimiter))

    def explain(self, addr: str) -> list[tuple[str, str]]:
        """The steps of `resolve` as (label, text), for `mailflow address`. May raise LookupRetry."""
        c = self._config
        qualified = self.qualify(addr)
        steps = [("address", addr)]
        if qualified != addr:
            steps.append(("qualified", f"{qualified} (unqualified: @myhostname)"))
        klass = self.classify(qualified)
        why = {AddressClass.LOCAL: "domain in mydestination", AddressClass.RELAY: "domain in relay_domains",
               AddressClass.VIRTUAL_MAILBOX: "domain in virtual_mailbox_domains",
               AddressClass.DEFAULT: "domain in neither mydestination nor relay_domains"}[klass]
        steps.append(("class", f"{klass.value} ({why})"))
        steps.append(("recipient", self._recipient_verdict(klass, qualified)))
        if self._transport_maps:
            match = self._transport_override(qualified)
            steps.append(("transport_maps", f"{match[0]}: {match[1]} -> {match[2]}" if match else "no match"))
        res = self.resolve(addr)
        steps.append(("transport", res.transport))
        steps.append(("nexthop", res.nexthop + ("  (relayhost)" if c.relayhost and res.nexthop == c.relayhost
                                                 else "")))
        return steps

    def _recipient_verdict(self, klass: AddressClass, qualified: str) -> str:
        if klass is AddressClass.LOCAL:
            return "known local user" if self.is_known_local(qualified) else "unknown: 550 5.1.1 at RCPT"
        if klass is AddressClass.VIRTUAL_MAILBOX:
            path = self.virtual_mailbox(qualified)
            return f"mailbox {path} (virtual_mailbox_maps)" if path else "unknown: 550 5.1.1 at RCPT"
        if klass is AddressClass.RELAY:
            if not self._relay_recipient_maps:
                return "accepted (no relay_recipient_maps)"
            return ("known (relay_recipient_maps)" if self.is_known_relay(qualified)
                    else "unknown: 550 5.1.1 at RCPT")
        return "accepted only from mynetworks (others: 554 5.7.1 relay access denied)"

    def virtual_mailbox(self, addr: str) -> str | None:
        """The Maildir path (relative to virtual_mailbox_base) of a virtual mailbox user, None if unknown.
        May raise LookupRetry."""
        qualified = self.qualify(addr)
        for table in self._virtual_mailbox_maps:
            found = lookup_address(table, qualified, delimiter=self._config.recipient_delimiter)
            if found is not None:
                return found[1].strip()
        return None

    def is_known_relay(self, addr: str) -> bool:
        """A relay_domains recipient exists per relay_recipient_maps (any does when none are set).
        May raise LookupRetry."""
        if not self._relay_recipient_maps:
            return True
        qualified = self.qualify(addr)
        return any(lookup_address(t, qualified, delimiter=self._config.recipient_delimiter) is not None
                   for t in self._relay_recipient_maps)

    def local_user(self, addr: str) -> str:
        """The mailbox name of a local address: its local part, lower-cased."""
        return address.split(self.qualify(addr))[0].lower()

    def is_known_local(self, addr: str) -> bool:
        recipients = self._config.local.recipients
        return not recipients or self.local_user(addr) in {r.lower() for r in recipients}
