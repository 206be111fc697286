"""trivial-rewrite: which address class a recipient is in, its `transport:nexthop`, and whether it exists.

Classes, in Postfix's order of precedence:
- local: the domain is in `mydestination`, or is an address literal `[ip]` naming one of this server's own
  addresses (an IP listener address, `proxy_interfaces`; Postfix inet_interfaces/proxy_interfaces)
  -> `local_transport`; its users are the keys of
  `local_recipient_maps` (empty: anyone) or of `alias_maps` (the local part, with or without extension).
- virtual alias: the domain is in `virtual_alias_domains` -> `error:5.1.1 User unknown in virtual alias table`
  (its addresses live only as keys of virtual_alias_maps, which cleanup expands before routing).
- virtual mailbox: the domain is in `virtual_mailbox_domains` -> `virtual_transport`; its users are the
  keys of `virtual_mailbox_maps` (`virtual_mailbox()` gives the Maildir path, `None` for an unknown user).
- relay: the domain is in `relay_domains` -> `relay_transport`.
- default: anything else -> `default_transport`.
A transport value may carry its own nexthop (`smtp:[10.0.0.1]:587`); otherwise relay and default mail
goes to `relayhost` when set, else to the recipient domain (MX lookup). Domain lists match as Postfix's
do with its default parent_domain_matches_subdomains: mydestination, virtual_alias_domains and
virtual_mailbox_domains are exact lists (string_list: a subdomain is another domain); an entry of
relay_domains matches the domain and every subdomain (domain_list, parent style). The virtual domain lists
may also name lookup tables (`DomainList`: a domain a table has as a key is in the list), so classifying an
address may raise LookupRetry. `qualify` tidies an address (needless quotes, a trailing dot) and appends
`@myorigin` to a bare `user` (and, with `append_dot_mydomain`, `.mydomain` to a dotless `user@host`); an address
without '@' that holds a `!` is swapped at its first one, `site!user` to `user@site` (swap_bangpath), else one that
holds a `%` has its rightmost `%` made the '@' instead (allow_percent_hack, Postfix's rewrite).
`own_addresses` are this server's IP addresses as `own_addresses(config)` finds them (the SMTP client's loop
detection takes them as itself). `resolved_address` is trivial-rewrite's resolve loop: while the domain is local and the
local part holds a `!` (swap_bangpath: `site!user` is `user@site`) or a `%` (allow_percent_hack), the local domain
is dropped and the `!` swapped, or the rightmost `%` becomes `@`
(`user%example.org@here` -> `user@example.org`, which then routes, and is relay-checked, as that address); a
quoted local part is opened to look for them, as Postfix's resolve_dequoted_address (default yes) does:
`"user@example.org"@here` is `user@example.org` too, not a local user of that name that a next hop could
take apart (no relaying through the quotes); an empty local part (`""@here`) is `MAILER-DAEMON@here`, as
Postfix's empty_address_recipient. `authorized_destination` is smtpd's relay question (Postfix's
permit_auth_destination): a resolved address that is not routed (`is_routed`: its local part still holds `@`, `!`
or `%`, which a next hop may take as routing whatever this host's settings, Postfix's RESOLVE_FLAG_ROUTED with
allow_untrusted_routing = no) and is not of the default class.

An address whose domain is no host name nor address literal (`bob@`, `bob@x..test`, `bob@[1.2.3]`, the
numeric `bob@192.0.2.1`: which only a local submission, an alias or a .forward can give, smtpd refusing them;
a literal never closed, `bob@[192.0.2.1`, is closed by their parsers as Postfix's tokenizer closes it)
resolves to `error:5.1.3 bad address syntax`: it bounces at once, as Postfix's trivial-rewrite flags it (its
valid_hostname and valid_mailhost_literal) and its qmgr bounces it, instead of waiting for a next hop that
cannot exist (a bad literal was deferred as "bad SMTP nexthop" until the queue lifetime ran out). So does one
beginning with '-' unless `allow_min_user` (`sendmail -- -oQ@example.org`, an alias, a .forward), whatever its
class or transport: Postfix's resolve puts that check where no transport can bypass it (an option to some command
further on).
`transport_maps` (transport(5)) override the class's choice, except for the virtual alias class and a bad
address. Search order: the address, the address without its extension, the domain, each parent domain as
`.parent`, then `*`; every table is asked one key before the next. A value `:nexthop` keeps the class's
transport; `transport:` (no nexthop) sends to the recipient domain, relayhost or not (transport(5)).
Given the envelope sender (`resolve(addr, sender)`: qmgr's, `mailflow address --sender`), relay and default
mail may route by it, before transport_maps (which overrule it), as Postfix's resolve does:
`sender_dependent_default_transport_maps` replaces default_transport (default class only) and
`sender_dependent_relayhost_maps` replaces relayhost (relay and default classes); a transport's own
`:nexthop` beats both. Keys as mail_addr_find (`user+ext@domain`, `user@domain`, `user` for this host's
domains, `@domain`); the null sender is looked up as `empty_address_*_lookup_key` (`<>`). A value `DUNNO`
(any case) or an empty one (warned of: `ignoring null lookup result`, as Postfix) ends the search without an
override. Without a sender, or with neither table set, nothing is looked up: the class's answer is the cached
one. With a `memo` (qmgr's, one per message) the tables are asked once per sender, not once per recipient.
Last, `relocated_maps` (relocated(5)), whatever the class: a listed address goes to `error:5.1.6 User has
moved to <value>` (keys as mail_addr_find's), so smtpd refuses it at RCPT and qmgr bounces what came another way.
`recipient_known(addr, klass)` answers whether the class's recipient tables list an address (`UNKNOWN_IN`
names the table for the 550 reply; its code per class: `unknown_reject_codes(smtpd)`):
local_recipient_maps/alias_maps, nothing for virtual alias domains (cleanup's mapper answers for those),
virtual_mailbox_maps, relay_recipient_maps (empty: anyone).
`recipient_refusal(addr, mapper, sender, what, reject_codes)` is smtpd's reject_unlisted_recipient (and, `what`
"Sender address", reject_unlisted_sender: Postfix check_rcpt_maps), in order:
an address a canonical or virtual alias table lists is accepted; one that resolves to the `error`
transport is refused with that error's status and text (550, the status's class made 5), so no bounce is
ever made for it (backscatter); in the local class postmaster, mailer-daemon and double-bounce are always
accepted (RFC 5321 4.5.1); otherwise the class's recipient table decides. The default class is not
checked: relaying is smtpd's decision. `await tables.run(...)` is how an event-loop caller asks (see
mailflow.tables: a blocking table is asked from a worker thread).
Failures: a table that cannot answer raises `LookupRetry` (smtpd says 451 4.3.0, qmgr defers), never
"not found".
A message's recipient is resolved three times (smtpd's RCPT checks, qmgr): the class's answer and the resolved
address (`resolved_address`), functions of the (frozen) configuration only, are remembered per address
(CLASS_CACHE_SIZE each at most, then forgotten whole; only addresses of at most MAX_ADDRESS UTF-8 bytes, so the
two hold ~5 MiB at most; Postfix's smtpd keeps a resolve cache too); transport_maps
and recipient tables, which a reload may change, are asked every time.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Iterable, Mapping

from mailflow import address, status
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass, Resolution
from mailflow.syntax import parse_hostport, parse_ip
from mailflow.tables import Table, TableCache, address_keys, find, find_address, split_extension
from mailflow.tables.search import EXTERNAL, EXTERNAL_FIRST, address_search, local_part_keys
from mailflow.transports.error import parse_error_nexthop


VIRTUAL_ALIAS_TRANSPORT = "error:5.1.1 User unknown in virtual alias table"
# Postfix's empty_address_recipient: what an empty local part of a local domain resolves to (resolve.c: "for
# consistency with our own From: message headers")
EMPTY_ADDRESS_RECIPIENT = "MAILER-DAEMON"
EMPTY_USER = '""'  # the quoted empty local part Postfix's rewrite_tree gives the percent hack's empty user
BAD_SYNTAX_TRANSPORT = "error:5.1.3 bad address syntax"  # a domain that is no host name (`bob@`), or a leading '-'
status_log = logging.getLogger("mailflow.smtpd")
log = logging.getLogger("mailflow.trivial_rewrite")

# Local parts every local domain accepts at RCPT, listed or not (Postfix check_rcpt_maps): RFC 5321 4.5.1's
# postmaster, and the senders of bounces, whose replies must not be refused.
ALWAYS_ACCEPTED = ("postmaster", "mailer-daemon", "double-bounce")
CLASS_CACHE_SIZE = 4096
OFF_HOST = (AddressClass.RELAY, AddressClass.DEFAULT)  # the classes a sender may route (Postfix's resolve)
SenderMemo = dict[tuple[int, str], str]  # (a sender-dependent table list's id, the sender) -> its choice
ERROR_TRANSPORT = "error"
RELOCATED_STATUS = "5.1.6"  # Postfix's choice for a user who has moved: "the closest match, but not perfect"
UNKNOWN_IN = {
    AddressClass.LOCAL: "local recipient table",
    AddressClass.VIRTUAL_ALIAS: "virtual alias table",
    AddressClass.VIRTUAL_MAILBOX: "virtual mailbox table",
    AddressClass.RELAY: "relay recipient table",
}


def keepable(addr: str) -> bool:
    """An address the resolve caches keep: at most MAX_ADDRESS UTF-8 bytes, the longest smtpd takes. A longer one
    (a local submission's, a header's) is resolved each time: kept, 4096 of 2 KB with an emoji held 32 MiB."""
    return len(addr) <= address.MAX_ADDRESS and (
        addr.isascii() or len(addr.encode("utf-8", "surrogatepass")) <= address.MAX_ADDRESS)


def _remember(cache: dict, key: str, value: object) -> None:
    """`value` kept under `key` when the key is keepable; a full cache (CLASS_CACHE_SIZE) is emptied first."""
    if keepable(key):
        if len(cache) >= CLASS_CACHE_SIZE:
            cache.clear()
        cache[key] = value


def unknown_reject_codes(smtpd) -> dict[AddressClass, int]:
    """The code of an unknown user per address class, from a SmtpdConfig (Postfix's unknown_local_recipient_,
    unknown_virtual_alias_, unknown_virtual_mailbox_ and unknown_relay_recipient_reject_code)."""
    return {AddressClass.LOCAL: smtpd.unknown_local_recipient_reject_code,
            AddressClass.VIRTUAL_ALIAS: smtpd.unknown_virtual_alias_reject_code,
            AddressClass.VIRTUAL_MAILBOX: smtpd.unknown_virtual_mailbox_reject_code,
            AddressClass.RELAY: smtpd.unknown_relay_recipient_reject_code}


def split_transport(value: str) -> tuple[str, str]:
    """'smtp:[host]:25' -> ('smtp', '[host]:25'); 'local' -> ('local', '')."""
    name, _, nexthop = value.partition(":")
    return name, nexthop


class DomainNames:
    """A list of domain names (normalised, as the configuration holds them) looked up as a set, whatever its length
    (a /file of 200 000 domains: one hash lookup a label, not a scan); with `parent` (Postfix's
    parent_domain_matches_subdomains style, relay_domains) an entry also matches every subdomain of itself."""

    def __init__(self, names: Iterable[str], *, parent: bool = False):
        self._names = frozenset(names)
        self._parent = parent
        self._longest = max(map(len, self._names), default=0)

    def __contains__(self, domain: str) -> bool:
        """Linear in the name's length: only the parents no longer than the longest entry are looked up (a name of
        100 KB, a local submission's, is one pass, not a copy of its rest at each of its 50 000 labels)."""
        if domain in self._names:
            return True
        if not self._parent:
            return False
        dot = domain.find(".", max(0, len(domain) - self._longest - 1))
        while dot >= 0:
            if domain[dot + 1:] in self._names:
                return True
            dot = domain.find(".", dot + 1)
        return False


class DomainList:
    """An exact domain list that may also hold lookup tables (Postfix's virtual_mailbox_domains = mysql:…): a
    domain is in it when it is written in it or a table has it as a key. May raise LookupRetry."""

    def __init__(self, entries: tuple[str, ...], tables: TableCache):
        self._names = DomainNames(e for e in entries if ":" not in e)
        self._tables = tables.open([e for e in entries if ":" in e])

    def __contains__(self, domain: str) -> bool:
        return domain in self._names or any(t.lookup(domain) is not None for t in self._tables)


def own_addresses(config) -> frozenset:
    """The IP addresses `user@[address]` may name to be local: the IP listener addresses (a wildcard
    listener stands for the loopback addresses only) and proxy_interfaces. Host names are not resolved."""
    hosts = [parse_hostport(a)[0] for a in config.smtpd.listen]
    hosts += [parse_hostport(listener.address)[0] for listener in config.smtpd.listeners]
    found = set()
    for host in list(hosts) + list(config.proxy_interfaces):
        ip = parse_ip(host)
        if ip is not None and ip.is_unspecified:
            found |= {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
        elif ip is not None:
            found.add(ip)
    return frozenset(found)


def ip_literal(domain: str):
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` -> the address (as address.literal_ip reads it: `[127.0.0.01]` is
    127.0.0.1, as to Postfix's resolve_local); None for anything else."""
    text = address.literal_ip(domain)
    return None if text is None else ipaddress.ip_address(text)


def transport_keys(addr: str, delimiter: str) -> tuple[list[str], tuple[int, ...]]:
    """transport(5)'s search keys for an address, most specific first, and the indices of the FULL ones: as
    Postfix's transport.c asks mail_addr_find (the legacy form: `"t 2"@d` then `t 2@d`, the extension split off
    the internal form), the domain and its parents as `.parent`, then `*`."""
    keys, full = address_search(addr, delimiter=delimiter, form=EXTERNAL_FIRST, at_domain=False,
                                domains=_transport_domains)
    keys.append("*")
    return keys, full


def _with_alternates(keys: list[str], full: tuple[int, ...],
                     alternates: list[str]) -> tuple[list[str], tuple[int, ...]]:
    """(keys, FULL indices) with each key followed by its alternate (the same key of another spelling of the
    address) where that differs, FULL where the key is; alternates that do not pair up go before the last key
    (`*`)."""
    if len(alternates) != len(keys):
        extra = [key for key in alternates if key not in keys]
        return keys[:-1] + extra + keys[-1:], full
    out: list[str] = []
    out_full: list[int] = []
    for i, (key, alternate) in enumerate(zip(keys, alternates)):
        for one in (key, alternate) if alternate != key else (key,):
            if i in full:
                out_full.append(len(out))
            out.append(one)
    return out, tuple(out_full)


def _transport_domains(domain: str) -> list[str]:
    labels = domain.split(".")
    return [domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def is_routed(resolved: str) -> bool:
    """Postfix resolve.c's RESOLVE_FLAG_ROUTED: the local part of a resolved address (opened when quoted) still holds
    a routing operator (`@`, `!`, `%`), whatever allow_percent_hack says here, as the next hop may honour it."""
    local = resolved.rpartition("@")[0]
    opened = address.unquoted_local(local)
    return any(op in (local if opened is None else opened) for op in "@!%")


class Rewriter:
    def __init__(self, config, tables: TableCache | None = None):
        tables = tables or TableCache()
        self._config = config
        self._transport_maps = tables.open(config.transport_maps)
        self._relocated_maps = tables.open(config.relocated_maps)
        self._sender_transport_maps = tables.open(config.sender_dependent_default_transport_maps)
        self._sender_relayhost_maps = tables.open(config.sender_dependent_relayhost_maps)
        self._by_sender = bool(self._sender_transport_maps or self._sender_relayhost_maps)
        self._relay_recipient_maps = tables.open(config.relay_recipient_maps)
        self._virtual_mailbox_maps = tables.open(config.virtual_mailbox_maps)
        self._virtual_limit_maps = tables.open(config.virtual_mailbox_limit_maps)
        self._local_recipient_maps = tables.open(config.local_recipient_maps)
        self._alias_maps = tables.open(config.alias_maps, aliases=True)
        self._mydestination = DomainNames(config.mydestination)
        self.relay_domains = DomainNames(config.relay_domains, parent=True)
        self._virtual_alias_domains = DomainList(config.virtual_alias_domains, tables)
        self._virtual_mailbox_domains = DomainList(config.virtual_mailbox_domains, tables)
        self._virtual_uid_maps = tables.open(config.virtual_uid_maps)
        self._virtual_gid_maps = tables.open(config.virtual_gid_maps)
        self._own_addresses = own_addresses(config)
        self._class_answers: dict[str, Resolution] = {}  # qualified address -> _class_default's answer
        self._resolved: dict[str, str] = {}  # address -> resolved_address's answer
        self.tables = tables

    @property
    def own_addresses(self) -> frozenset:
        """This server's own IP addresses (`own_addresses`): local as `[ip]`, and a loop for the SMTP client."""
        return self._own_addresses

    def qualify(self, addr: str, origin: str = "", *, envelope: bool = True) -> str:
        """`user` -> `user@origin` (default myorigin), but `site!user` -> `user@site` (swap_bangpath) and
        `user%domain` -> `user@domain` (allow_percent_hack); with
        append_dot_mydomain `user@host` -> `user@host.mydomain` (Postfix's rewrite_tree). Tidied first
        (`address.tidy`: `"joe"@x.test.` is `joe@x.test`, `a."b c"` is `"a.b c"`), as Postfix's rewrite does; an
        envelope address from smtpd is tidy already, one from a header, an alias or a table may not be. A quoted
        source route (`"@a.test:joe"@x.test` is `joe@x.test`) is dropped from an `envelope` address only (Postfix's
        internal form, whose quoting leaves the route bare), not from a header's (`envelope` False): there it stays,
        written back as Postfix writes it (`address.bared_route`: `@a.test:joe@x.test`; an unqualified
        `"@a.test:joe"` is `@a.test:joe@myorigin`). The percent
        hack's `%` is looked for in `addr` as given, outside quotes: a header's `"user%y.test"` is
        `user%y.test@myorigin`, the envelope's `user%y.test` (smtpd's form of the same) `user@y.test`, as in
        Postfix, whose rewrite sees the header's words as written and the envelope's in its own quoting."""
        qualified = self._qualified(addr, origin, envelope)
        return qualified if envelope else address.bared_route(qualified)

    def _qualified(self, addr: str, origin: str, envelope: bool) -> str:
        """`qualify` but for the way a header address is written back."""
        _, at, domain = addr.rpartition("@")
        dotted = "." in domain or not self._config.append_dot_mydomain
        if at and domain and dotted and address.is_tidy(addr):
            return addr  # tidy and qualified already: most addresses, asked ~10 times a message
        given, addr = addr, address.tidy(addr, envelope=envelope)
        local, domain = address.split_words(addr)
        if not addr or addr.endswith("@") or given == EMPTY_USER:
            return addr  # empty (a lone `""` too, as Postfix's rewrite_tree leaves it; after a source route it is
            # qualified), or no domain after the '@': a syntax error for the caller to report
        # swap_bangpath, else the percent hack, finds its operator among the words as given, outside quotes (see
        # address.bang_split, percent_split)
        routed = address.bang_split(given) if not domain and self._config.swap_bangpath else None
        if routed is None and not domain and self._config.allow_percent_hack:
            routed = address.percent_split(given)
        if routed is not None:
            user, via = routed  # an empty user is `""` (`%x.test` is `""@x.test`), as Postfix's rewrite_tree makes it
            # (`user%` is `user@`: returned as it is, above)
            return self._qualified(f"{user or EMPTY_USER}@{via}", origin, envelope)
        if not domain:
            return f"{addr}@{origin or self._config.origin}"
        if self._config.append_dot_mydomain and "." not in domain and not domain.startswith("["):
            return f"{local}@{domain}.{self._config.domain}"
        return addr

    def is_local_domain(self, domain: str) -> bool:
        """One of this host's domains: mydestination, its own address literals, or myorigin."""
        domain = address.normalise_domain(domain)
        return domain == self._config.origin or self.resolve_local(domain)

    def find_address(self, tables: list[Table], addr: str, form: str = EXTERNAL) -> tuple[str, str, str] | None:
        """(table, key, value) of the first entry for `addr`, keys as Postfix's mail_addr_find makes them:
        `user+ext@domain`, `user@domain`, `user+ext` and `user` only when the domain is one of this host's
        (`is_local_domain`), `@domain`; in `form` (mailflow.tables.search: EXTERNAL for canonical, virtual alias
        and generic maps, EXTERNAL_FIRST for the others). May raise LookupRetry."""
        return find(tables, *self.address_search(addr, form))

    def address_keys(self, addr: str, form: str = EXTERNAL) -> list[str]:
        """mail_addr_find's keys for `addr` (see find_address), in order."""
        return self.address_search(addr, form)[0]

    def address_search(self, addr: str, form: str = EXTERNAL) -> tuple[list[str], tuple[int, ...]]:
        """mail_addr_find's keys for `addr` (see find_address), in order, and the indices of those it asks pattern
        tables too (the whole address: FULL lookups; mailflow.tables.search.address_search)."""
        domain = address.split(addr)[1]
        if "@" not in addr:
            return address_keys(addr, delimiter=self._config.recipient_delimiter, form=form), (0,)
        return address_search(addr, delimiter=self._config.recipient_delimiter,
                              local_domain=bool(domain) and self.is_local_domain(domain), form=form)

    def resolve_local(self, domain: str) -> bool:
        """Postfix resolve_local: the (normalised) domain is in mydestination or names one of this server's
        own addresses as `[ip]`."""
        if domain in self._mydestination:
            return True
        ip = ip_literal(domain)
        return ip is not None and ip in self._own_addresses

    def resolved_address(self, addr: str) -> str:
        """The address qualified, then, while its domain is local, that domain dropped when the local part holds
        a routing operator (see the module doc). An address that is not `local@domain` comes back qualified
        only."""
        resolved = self._resolved.get(addr)
        if resolved is None:
            resolved = self._resolve_address(addr)
            _remember(self._resolved, addr, resolved)
        return resolved

    def _resolve_address(self, addr: str) -> str:
        current = self.qualify(addr)
        for _ in range(len(current)):
            local, at, domain = current.rpartition("@")
            routed = self._routed_local_part(local) if at else None
            if routed is None and local == '""' and at:
                routed = EMPTY_ADDRESS_RECIPIENT  # `""@here` is MAILER-DAEMON@here
            if routed is None or (domain and not self.resolve_local(address.normalise_domain(domain))):
                return current  # (no domain, `user@` of `user%`: routed on as local, as Postfix's resolve strips it)
            current = self.qualify(routed if "@" in routed else f"{routed}@{domain}")
        return current

    def _routed_local_part(self, local: str) -> str | None:
        """The address a local part stands for by its routing operator, or None: `site!user` (swap_bangpath) is
        `user@site`, else `user%domain` (allow_percent_hack) `user@domain` (an empty user is `""`); a quoted one is
        opened (Postfix's resolve_dequoted_address, on by default), so `"user@domain"` is `user@domain` (and
        `"user%domain"` too, then `"site!user"`: resolve.c looks for `@`, `%`, `!` in that order in the opened
        text, `!` before `%` among the words) rather than a local user of that name."""
        inner = address.unquoted_local(local)
        text = local if inner is None else inner
        swap, percent = self._config.swap_bangpath, self._config.allow_percent_hack
        if inner is None and swap and "!" in local:
            bang = address.bang_split(local)
            if bang is not None:
                return f"{bang[0]}@{bang[1]}"
        if inner is not None and "@" in inner:
            user, _, via = inner.rpartition("@")
        elif percent and "%" in text:
            user, _, via = text.rpartition("%")
        elif inner is not None and swap and "!" in inner:
            # rescanned as words, where a backslash quotes the next character and goes (tok822_scan):
            # `"a\\b.u!h"@here` is `h@ab.u`
            via, _, user = address.unescaped(inner).partition("!")
        else:
            return None
        if not user:  # `%x.test` is `""@x.test`, as Postfix's resolve makes it (`""@here` is then MAILER-DAEMON)
            return f"{EMPTY_USER}@{via}"
        return f"{address.quoted_local(user) if inner is not None else user}@{via}"

    def authorized_destination(self, addr: str) -> bool:
        """Postfix's permit_auth_destination: this host takes mail for the resolved address (any class but default)
        and it is not routed (`is_routed`). May raise LookupRetry."""
        resolved = self.resolved_address(addr)
        return not is_routed(resolved) and self.classify_resolved(resolved) is not AddressClass.DEFAULT

    def client_in_relay_domains(self, name: str) -> bool:
        """The client's host name is in relay_domains (or under one of its domains): what Postfix 3.7's
        check_relay_domains permits (`unknown`, no name, is in none)."""
        domain = address.normalise_domain(name) if name and name != "unknown" else ""
        return bool(domain) and domain in self.relay_domains

    def classify(self, addr: str) -> AddressClass:
        """The address class of `addr` once resolved (resolved_address). May raise LookupRetry."""
        return self.classify_resolved(self.resolved_address(addr))

    def classify_resolved(self, resolved: str) -> AddressClass:
        """The address class of an address resolved_address made already (its domain as it is: not resolved
        again); a domain that is no domain name nor address literal (empty, over 255 octets, `x..y`) is of the
        default class, no list asked, as Postfix's resolve short-cuts it. May raise LookupRetry."""
        raw = address.split(resolved)[1]
        if not raw or not address.is_valid_domain(raw):
            return AddressClass.DEFAULT
        domain = address.normalise_domain(raw)
        if self.resolve_local(domain):
            return AddressClass.LOCAL
        if domain in self._virtual_alias_domains:
            return AddressClass.VIRTUAL_ALIAS
        if domain in self._virtual_mailbox_domains:
            return AddressClass.VIRTUAL_MAILBOX
        if domain in self.relay_domains:
            return AddressClass.RELAY
        return AddressClass.DEFAULT

    def resolve(self, addr: str, sender: str | None = None, memo: SenderMemo | None = None) -> Resolution:
        """The class's transport and nexthop (for relay and default mail, the `sender`'s when the
        sender-dependent tables have it; None: no sender known), then transport_maps' override (never for the
        virtual alias class, as Postfix), then relocated_maps (`relocated`). A transport without a nexthop
        (`smtp:`) sends to the recipient domain, even when relayhost is set; a nexthop without a transport
        (`:[gw]`) keeps the class's transport. `memo` (a dict the caller keeps for one pass over a message's
        recipients, qmgr's): the sender-dependent tables are asked once per sender in it. May raise LookupRetry."""
        res = self._transported(self.resolved_address(addr), sender, memo)
        return self.relocated(res) or res

    def relocated(self, res: Resolution) -> Resolution | None:
        """The `error` route of an address relocated_maps lists (Postfix resolve.c, after transport_maps, whatever
        the class): `5.1.6 User has moved to <value>`; None when no table lists it. Keys as mail_addr_find's,
        the extension ignored: user@domain, user (a local domain or myorigin only), @domain. May raise LookupRetry."""
        if not self._relocated_maps or self._bad_syntax(res.address):
            return None
        found = self.find_address(self._relocated_maps, res.address, EXTERNAL_FIRST)
        if found is None:
            return None
        return Resolution(res.address_class, ERROR_TRANSPORT, f"{RELOCATED_STATUS} User has moved to "
                          f"{found[2].strip()}", res.address)

    def _transported(self, qualified: str, sender: str | None, memo: SenderMemo | None = None) -> Resolution:
        """The class's route for a resolved address (the sender's, see `resolve`), with transport_maps' override."""
        res = self._class_default(qualified)
        if not (self._by_sender or self._transport_maps):  # (nothing could change the class's route)
            return res
        if res.address_class is AddressClass.VIRTUAL_ALIAS or self._bad_syntax(res.address):
            return res
        if self._by_sender and sender is not None and res.address_class in OFF_HOST:
            res = self._sender_default(res, sender, {} if memo is None else memo)
        match = self._transport_override(res.address)
        if match is None:
            return res
        transport, nexthop = split_transport(match[2].strip())
        if transport and not nexthop:
            nexthop = address.normalise_domain(address.split(res.address)[1])
        return Resolution(res.address_class, transport or res.transport, nexthop or res.nexthop, res.address)

    def _bad_syntax(self, qualified: str) -> bool:
        """A domain that is no host name nor address literal (nothing after the '@', `x..test`, `[192.0.2.1`, a
        numeric `192.0.2.1`), or (allow_min_user off) a leading '-': Postfix's resolve flags each an error."""
        domain = address.split(qualified)[1]
        return (not domain or not address.is_valid_domain(domain)
                or (not self._config.allow_min_user and address.is_min_user(qualified)))

    def _class_default(self, qualified: str) -> Resolution:
        answer = self._class_answers.get(qualified)
        if answer is None:
            answer = self._class_of(qualified)
            _remember(self._class_answers, qualified, answer)
        return answer

    def _class_of(self, qualified: str) -> Resolution:
        c = self._config
        klass = self.classify(qualified)
        domain = address.normalise_domain(address.split(qualified)[1])
        if self._bad_syntax(qualified):  # `bob@`, `bob@x..y`, `-x@y` (sendmail, an alias, a .forward): 5.1.3
            return Resolution(klass, *split_transport(BAD_SYNTAX_TRANSPORT), qualified)
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

    def _sender_default(self, res: Resolution, sender: str, memo: SenderMemo) -> Resolution:
        """A relay or default class answer made again with the sender-dependent tables (see the module doc)."""
        c = self._config
        value = c.relay_transport
        if res.address_class is AddressClass.DEFAULT:
            value = self._sender_choice("sender_dependent_default_transport_maps", self._sender_transport_maps,
                                        sender, c.empty_address_default_transport_maps_lookup_key, memo) \
                or c.default_transport
        relay = self._sender_choice("sender_dependent_relayhost_maps", self._sender_relayhost_maps, sender,
                                    c.empty_address_relayhost_maps_lookup_key, memo)
        transport, nexthop = split_transport(value)
        domain = address.normalise_domain(address.split(res.address)[1])
        return Resolution(res.address_class, transport, nexthop or relay or c.relayhost or domain, res.address)

    def sender_override(self, tables: list[Table], sender: str, null_key: str) -> tuple[str, str, str] | None:
        """(table, key, value) of a sender-dependent table's entry for `sender` (the null sender as `null_key`),
        searched as mail_addr_find (a `null_key` too). May raise LookupRetry."""
        if not tables:
            return None
        return self.find_address(tables, sender or null_key, EXTERNAL_FIRST)

    def _sender_choice(self, setting: str, tables: list[Table], sender: str, null_key: str, memo: SenderMemo) -> str:
        """The override a sender-dependent table gives, "" for none (no entry, `DUNNO`, an empty value: warned of,
        as Postfix's resolve does); asked once per sender and table in `memo`."""
        remembered = memo.get((id(tables), sender))
        if remembered is not None:
            return remembered
        found = self.sender_override(tables, sender, null_key)
        value = found[2].strip() if found else ""
        if found and not value:
            log.warning("%s: ignoring null lookup result for %s", setting, sender or null_key)
        choice = memo[(id(tables), sender)] = "" if value.upper() == "DUNNO" else value
        return choice

    def _transport_override(self, qualified: str) -> tuple[str, str, str] | None:
        """The transport_maps entry for an address: its keys as written (a UTF-8 domain in UTF-8, as Postfix asks
        them), each followed by the same key with the domain's A-label form, so that either spelling of an IDNA
        domain in the table matches, before `*`."""
        if not self._transport_maps:
            return None
        local, _, domain = qualified.rpartition("@")
        local, written, a_label = local.lower(), domain.lower().rstrip("."), address.normalise_domain(domain)
        delimiter = self._config.recipient_delimiter
        keys, full = transport_keys(f"{local}@{written}", delimiter)
        if a_label and a_label != written:
            keys, full = _with_alternates(keys, full, transport_keys(f"{local}@{a_label}", delimiter)[0])
        return find(self._transport_maps, keys, full)

    def explain(self, addr: str, sender: str | None = None) -> list[tuple[str, str]]:
        """The steps of `resolve` as (label, text), for `mailflow address`; with a `sender`, what the
        sender-dependent tables said for it (relay and default mail). May raise LookupRetry."""
        c = self._config
        qualified = self.qualify(addr)
        steps = []
        if qualified != addr:
            steps.append(("qualified", f"{qualified} (myorigin / mydomain)"))
        resolved = self.resolved_address(qualified)
        if resolved != qualified:
            steps.append(("percent hack", f"{resolved} (allow_percent_hack; the local domain is dropped)"))
            qualified = resolved
        klass = self.classify(qualified)
        steps.append(("class", f"{klass.value} (domain in {CLASS_SETTING[klass]})"))
        if self._by_sender and sender is not None and klass in OFF_HOST:
            steps += self._explain_sender(sender, klass)
        if self._transport_maps:
            match = self._transport_override(qualified)
            steps.append(("transport_maps", f"{match[0]}: {match[1]} -> {match[2]}" if match else "no match"))
        res = self.resolve(addr, sender)
        if self._relocated_maps:
            moved = self.relocated(self._transported(qualified, sender))
            steps.append(("relocated_maps", moved.nexthop if moved else "no match"))
        steps.append(("transport", res.transport))
        steps.append(("nexthop", res.nexthop + ("  (relayhost)" if c.relayhost and res.nexthop == c.relayhost
                                                 else "")))
        client = c.smtp_client_of(res.transport)
        if client is not None and client[1].fallback_relay:
            source = c.smtp.key_source(res.transport, "fallback_relay")
            steps.append(("fallback", f"{', '.join(client[1].fallback_relay)}  ({source}: for the recipients the "
                                      "next hop defers or cannot be reached for)"))
        return steps

    def _explain_sender(self, sender: str, klass: AddressClass) -> list[tuple[str, str]]:
        c = self._config
        looked_up = [("sender_dependent_relayhost_maps", self._sender_relayhost_maps,
                      c.empty_address_relayhost_maps_lookup_key)]
        if klass is AddressClass.DEFAULT:
            looked_up.insert(0, ("sender_dependent_default_transport_maps", self._sender_transport_maps,
                                 c.empty_address_default_transport_maps_lookup_key))
        steps = []
        for setting, tables, null_key in looked_up:
            if tables:
                match = self.sender_override(tables, sender, null_key)
                text = f"{match[0]}: {match[1]} -> {match[2]}" if match else "no match"
                steps.append((setting.removesuffix("_maps"), f"<{sender}>: {text}"))
        return steps

    def recipient_refusal(self, addr: str, mapper, sender: str | None = None,
                          what: str = "Recipient address",
                          reject_codes: Mapping[AddressClass, int] | None = None) -> status.Reply | None:
        """smtpd's reject_unlisted_recipient for `addr` (see the module doc): None to accept, else the reply.
        A table that cannot answer gives 451 4.3.0. `mapper` is cleanup's AddressMapper (is_mapped); `sender` the
        MAIL FROM address as given (None: no MAIL), resolved with as Postfix's smtpd_resolve_addr does, so a
        sender-dependent `error:` transport is refused here too. `what` "Sender address": reject_unlisted_sender's
        question about the sender (Postfix's check_rcpt_maps for it: its words, an unknown user 5.1.0);
        `reject_codes`: the code of an unknown user per address class (smtpd's unknown_*_reject_code,
        `unknown_reject_codes`; 550 for a class not in it)."""
        try:
            res = self.resolve(addr, sender)
            if mapper.is_mapped(res.address):
                return None
            codes = reject_codes or {}
            if res.transport == ERROR_TRANSPORT:  # (an unknown user of a virtual alias domain: its class's code)
                return error_refusal(addr, res, what, codes.get(res.address_class)
                                     if res.address_class is AddressClass.VIRTUAL_ALIAS else None)
            if res.address_class is AddressClass.DEFAULT:
                return None
            if res.address_class is AddressClass.LOCAL and self._always_accepted(res.address):
                return None
            if not self.recipient_known(res.address, res.address_class):
                return status.user_unknown(addr, UNKNOWN_IN[res.address_class], what,
                                           codes.get(res.address_class, 550))
        except LookupRetry as e:
            status_log.warning("smtpd: %s <%s>: %s", what, addr, e.text)
            return status.lookup_failed(addr)
        return None

    def _always_accepted(self, addr: str) -> bool:
        return address.split(addr)[0].lower() in ALWAYS_ACCEPTED

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
        found = find_address(self._virtual_mailbox_maps, qualified, delimiter=self._config.recipient_delimiter,
                             form=EXTERNAL_FIRST)
        return found[2].strip() if found else None

    def virtual_mailbox_limit(self, addr: str) -> int:
        """The quota in bytes of a virtual mailbox (0: none): virtual_mailbox_limit_maps, else
        virtual_mailbox_limit. A map value that is not a number counts as a table failure. May raise LookupRetry."""
        qualified = self.qualify(addr)
        found = find_address(self._virtual_limit_maps, qualified, delimiter=self._config.recipient_delimiter,
                             form=EXTERNAL_FIRST)
        if found is None:
            return self._config.virtual_mailbox_limit
        table, key, value = found
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise LookupRetry(f"table {table}: {key}: {value.strip()!r} is not a number of bytes")
        return int(value)

    def virtual_owner(self, addr: str) -> tuple[int | None, int | None]:
        """(uid, gid) that virtual_uid_maps / virtual_gid_maps give a virtual mailbox (None where no table does).
        A value that is not a number counts as a table failure. May raise LookupRetry."""
        qualified = self.qualify(addr)
        return (self._owner_id(self._virtual_uid_maps, qualified), self._owner_id(self._virtual_gid_maps, qualified))

    def _owner_id(self, tables: list[Table], addr: str) -> int | None:
        found = (find_address(tables, addr, delimiter=self._config.recipient_delimiter, form=EXTERNAL_FIRST)
                 if tables else None)
        if found is None:
            return None
        table, key, value = found
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise LookupRetry(f"table {table}: {key}: {value.strip()!r} is not a numeric user or group id")
        return int(value)

    def is_known_relay(self, addr: str) -> bool:
        """A relay_domains recipient exists per relay_recipient_maps (any does when none are set).
        May raise LookupRetry."""
        if not self._relay_recipient_maps:
            return True
        qualified = self.qualify(addr)
        return find_address(self._relay_recipient_maps, qualified, delimiter=self._config.recipient_delimiter,
                            form=EXTERNAL_FIRST) is not None

    def local_user(self, addr: str) -> str:
        """The mailbox name of a local address: its local part without extension, lower-cased."""
        local = address.split(self.qualify(addr))[0].lower()
        return split_extension(local, self._config.recipient_delimiter)[0]

    def is_local_user(self, addr: str) -> bool:
        """local_recipient_maps list the address, as Postfix's smtpd asks them (check_rcpt_maps: mail_addr_find,
        each key quoted, then internal where that differs): `user+ext@domain`, `user@domain`, `user+ext`, `user`,
        `@domain`; empty maps: anyone is; and postmaster always is (RFC 5321 4.5.1: without an alias, its mail goes
        to the postmaster mailbox). May raise LookupRetry."""
        qualified = self.qualify(addr)
        if not self._local_recipient_maps or address.split(qualified)[0].lower() == "postmaster":
            return True
        return find_address(self._local_recipient_maps, qualified, delimiter=self._config.recipient_delimiter,
                            local_domain=True, form=EXTERNAL_FIRST) is not None

    def alias(self, addr: str) -> tuple[str, str, str] | None:
        """(table, key, value) of the alias_maps entry for a local address, or None. May raise LookupRetry."""
        return self._local_lookup(self._alias_maps, addr)

    def is_known_local(self, addr: str) -> bool:
        """A local user or a local alias. May raise LookupRetry."""
        return self.is_local_user(addr) or self.alias(addr) is not None

    def _local_lookup(self, tables: list[Table], addr: str) -> tuple[str, str, str] | None:
        """The local part with its extension, then without (split off the internal form), each asked in Postfix's
        quoting, then in internal form where that differs, as local(8)'s get_alias asks (`"al.1."`, `al.1.`)."""
        local = address.split(self.qualify(addr))[0]
        return find(tables, local_part_keys(local, delimiter=self._config.recipient_delimiter, form=EXTERNAL_FIRST))


def error_refusal(addr: str, res: Resolution, what: str = "Recipient address", code: int | None = None
                  ) -> status.Reply:
    """The RCPT reply for an address routed to the error transport: 550 with its status (5.1.1 when the error
    names none; 5.1.0 for a sender) and text (Postfix check_rcpt_maps: the error transport is undeliverable
    whatever its status says); `code`: this code instead (the virtual alias class's
    unknown_virtual_alias_reject_code). The status's class follows the code, as Postfix's smtpd_check_reject
    makes it (`error:4.7.0 later` is `550 5.7.0 ... later`); filed under bounce, as Postfix's check_rcpt_maps."""
    explicit = res.nexthop.strip()[:1] in ("4", "5")
    _, dsn, text = parse_error_nexthop(res.nexthop)
    if not explicit:
        dsn = "5.1.0" if what == "Sender address" else "5.1.1"
    if code is None:
        code = 550
    return status.restriction_rejected(code, f"{code // 100}{dsn[1:]}", addr, what, text, "bounce")


CLASS_SETTING = {
    AddressClass.LOCAL: "mydestination or an own [address]", AddressClass.VIRTUAL_ALIAS: "virtual_alias_domains",
    AddressClass.VIRTUAL_MAILBOX: "virtual_mailbox_domains", AddressClass.RELAY: "relay_domains",
    AddressClass.DEFAULT: "none of mydestination, virtual_*_domains, relay_domains",
}
