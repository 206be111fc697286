"""trivial-rewrite: which address class a recipient is in, its `transport:nexthop`, and whether it exists.

Classes, in Postfix's order of precedence:
- local: the domain is in `mydestination` -> `local_transport`; its users are the keys of
  `local_recipient_maps` (empty: anyone) or of `alias_maps` (the local part, with or without extension).
- virtual alias: the domain is in `virtual_alias_domains` -> `error:5.1.1 User unknown in virtual alias table`
  (its addresses live only as keys of virtual_alias_maps, which cleanup expands before routing).
- virtual mailbox: the domain is in `virtual_mailbox_domains` -> `virtual_transport`; its users are the
  keys of `virtual_mailbox_maps` (`virtual_mailbox()` gives the Maildir path, `None` for an unknown user).
- relay: the domain is in `relay_domains` -> `relay_transport`.
- default: anything else -> `default_transport`.
A transport value may carry its own nexthop (`smtp:[10.0.0.1]:587`); otherwise relay and default mail
goes to `relayhost` when set, else to the recipient domain (MX lookup). An entry `.example.com` in a
domain list matches subdomains of example.com. `qualify` appends `@myorigin` to a bare `user` (and, with
`append_dot_mydomain`, `.mydomain` to a dotless `user@host`).

`transport_maps` (transport(5)) override the class's choice. Search order: the address, the address
without its extension, the domain, each parent domain as `.parent`, then `*`. A value `transport:nexthop`
with an empty side keeps the class's transport or nexthop (`:[gw.example]`, `smtp:`).
`recipient_known(addr, klass)` answers whether the class's recipient tables list an address (smtpd asks it
at RCPT; `UNKNOWN_IN` names the table for the 550 reply): local_recipient_maps/alias_maps, nothing for
virtual alias domains (cleanup's mapper answers for those), virtual_mailbox_maps, relay_recipient_maps
(empty: anyone). The default class is not checked: relaying is smtpd's decision.
Failures: a table that cannot answer raises `LookupRetry` (smtpd says 451 4.3.0, qmgr defers), never
"not found".
"""
from __future__ import annotations

from mailflow import address
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass, Resolution
from mailflow.tables import Table, TableCache, lookup_address, lookup_local, split_extension

VIRTUAL_ALIAS_TRANSPORT = "error:5.1.1 User unknown in virtual alias table"
UNKNOWN_IN = {
    AddressClass.LOCAL: "local recipient table",
    AddressClass.VIRTUAL_ALIAS: "virtual alias table",
    AddressClass.VIRTUAL_MAILBOX: "virtual mailbox table",
    AddressClass.RELAY: "relay recipient table",
}


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
    def __init__(self, config, tables: TableCache | None = None):
        tables = tables or TableCache()
        self._config = config
        self._transport_maps = tables.open(config.transport_maps)
        self._relay_recipient_maps = tables.open(config.relay_recipient_maps)
        self._virtual_mailbox_maps = tables.open(config.virtual_mailbox_maps)
        self._virtual_limit_maps = tables.open(config.virtual_mailbox_limit_maps)
        self._local_recipient_maps = tables.open(config.local_recipient_maps)
        self._alias_maps = tables.open(config.alias_maps, aliases=True)

    def qualify(self, addr: str) -> str:
        local, domain = address.split(addr)
        if not addr or addr.endswith("@"):
            return addr  # empty, or no domain after the '@': a syntax error for the caller to report
        if not domain:
            return f"{addr}@{self._config.origin}"
        if self._config.append_dot_mydomain and "." not in domain and not domain.startswith("["):
            return f"{local}@{domain}.{self._config.domain}"
        return addr

    def is_local_domain(self, domain: str) -> bool:
        """One of this host's domains: mydestination or myorigin (Postfix also counts its interfaces)."""
        domain = address.normalise_domain(domain)
        return domain == self._config.origin or domain_in(domain, self._config.mydestination)

    def classify(self, addr: str) -> AddressClass:
        domain = address.normalise_domain(address.split(self.qualify(addr))[1])
        c = self._config
        if domain_in(domain, c.mydestination):
            return AddressClass.LOCAL
        if domain_in(domain, c.virtual_alias_domains):
            return AddressClass.VIRTUAL_ALIAS
        if domain_in(domain, c.virtual_mailbox_domains):
            return AddressClass.VIRTUAL_MAILBOX
        if domain_in(domain, c.relay_domains):
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
        if klass is AddressClass.VIRTUAL_ALIAS:
            return Resolution(klass, *split_transport(VIRTUAL_ALIAS_TRANSPORT), qualified)
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
        steps = []
        if qualified != addr:
            steps.append(("qualified", f"{qualified} (myorigin / mydomain)"))
        klass = self.classify(qualified)
        steps.append(("class", f"{klass.value} (domain in {CLASS_SETTING[klass]})"))
        if self._transport_maps:
            match = self._transport_override(qualified)
            steps.append(("transport_maps", f"{match[0]}: {match[1]} -> {match[2]}" if match else "no match"))
        res = self.resolve(addr)
        steps.append(("transport", res.transport))
        steps.append(("nexthop", res.nexthop + ("  (relayhost)" if c.relayhost and res.nexthop == c.relayhost
                                                 else "")))
        return steps

    def recipient_known(self, addr: str, klass: AddressClass) -> bool:
        """The class's recipient tables list `addr` (see the module doc). May raise LookupRetry."""
        if klass is AddressClass.LOCAL:
            return self.is_known_local(addr)
        if klass is AddressClass.VIRTUAL_ALIAS:
            return False
        if klass is AddressClass.VIRTUAL_MAILBOX:
            return self.virtual_mailbox(addr) is not None
        if klass is AddressClass.RELAY:
            return self.is_known_relay(addr)
        return True

    def virtual_mailbox(self, addr: str) -> str | None:
        """The Maildir path (relative to virtual_mailbox_base) of a virtual mailbox user, None if unknown.
        May raise LookupRetry."""
        qualified = self.qualify(addr)
        for table in self._virtual_mailbox_maps:
            found = lookup_address(table, qualified, delimiter=self._config.recipient_delimiter)
            if found is not None:
                return found[1].strip()
        return None

    def virtual_mailbox_limit(self, addr: str) -> int:
        """The quota in bytes of a virtual mailbox (0: none): virtual_mailbox_limit_maps, else
        virtual_mailbox_limit. A map value that is not a number counts as a table failure. May raise LookupRetry."""
        qualified = self.qualify(addr)
        for table in self._virtual_limit_maps:
            found = lookup_address(table, qualified, delimiter=self._config.recipient_delimiter)
            if found is not None:
                value = found[1].strip()
                if not value.isdigit():
                    raise LookupRetry(f"table {table.name}: {found[0]}: {value!r} is not a number of bytes")
                return int(value)
        return self._config.virtual_mailbox_limit

    def is_known_relay(self, addr: str) -> bool:
        """A relay_domains recipient exists per relay_recipient_maps (any does when none are set).
        May raise LookupRetry."""
        if not self._relay_recipient_maps:
            return True
        qualified = self.qualify(addr)
        return any(lookup_address(t, qualified, delimiter=self._config.recipient_delimiter) is not None
                   for t in self._relay_recipient_maps)

    def local_user(self, addr: str) -> str:
        """The mailbox name of a local address: its local part without extension, lower-cased."""
        local = address.split(self.qualify(addr))[0].lower()
        return split_extension(local, self._config.recipient_delimiter)[0]

    def is_local_user(self, addr: str) -> bool:
        """local_recipient_maps list the local part (with or without extension); empty maps: anyone is.
        May raise LookupRetry."""
        if not self._local_recipient_maps:
            return True
        return self._local_lookup(self._local_recipient_maps, addr) is not None

    def alias(self, addr: str) -> tuple[str, str, str] | None:
        """(table, key, value) of the alias_maps entry for a local address, or None. May raise LookupRetry."""
        return self._local_lookup(self._alias_maps, addr)

    def is_known_local(self, addr: str) -> bool:
        """A local user or a local alias. May raise LookupRetry."""
        return self.is_local_user(addr) or self.alias(addr) is not None

    def _local_lookup(self, tables: list[Table], addr: str) -> tuple[str, str, str] | None:
        local = address.split(self.qualify(addr))[0]
        for table in tables:
            found = lookup_local(table, local, delimiter=self._config.recipient_delimiter)
            if found is not None:
                return table.name, *found
        return None


CLASS_SETTING = {
    AddressClass.LOCAL: "mydestination", AddressClass.VIRTUAL_ALIAS: "virtual_alias_domains",
    AddressClass.VIRTUAL_MAILBOX: "virtual_mailbox_domains", AddressClass.RELAY: "relay_domains",
    AddressClass.DEFAULT: "none of mydestination, virtual_*_domains, relay_domains",
}
