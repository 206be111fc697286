"""Network lists as Postfix reads mynetworks and its other address match lists (namadr_list(3) over
match_list(3)): mynetworks, smtpd's authorized_xclient_hosts, upstream_proxy_clients, permit_mx_backup_networks
and sasl_exceptions_networks, the greylist's whitelist_networks.

    check_network_list(items) -> items     the list as configured, each network in its plain form
                                           (`[::1]/128` -> `::1/128`), several patterns of one item split;
                                           ValueError naming the pattern (and file:line) and the reason
    NetworkList.from_items(items, open_tables=None, parent_style=False, setting="")
                                           the list, its /files read now (at load and at each reload)
    NetworkList.holds(client_addr, name=None) -> bool
                                           first match wins: whether the client is in the list
    NetworkList.contains(client_addr, name=None) -> bool
                                           the same, a table that cannot answer meaning "no" (logged)

The patterns of an item (one TOML string may hold several, separated by commas or whitespace, as main.cf's):
    NETWORK           `10.0.0.0/8`, `192.0.2.7`, `[2001:db8::]/32`, `[2001:db8::/32]`, `[::1]`, `::1/128`
                      (brackets optional here; Postfix needs them in main.cf); host bits set (`10.0.0.1/8`) and
                      netmasks (`/255.0.0.0`) are refused: Postfix 3.7 takes such a list and then fails every
                      lookup that reaches the pattern (`451 4.3.0 Temporary lookup failure` to every RCPT from a
                      client of its family)
    !PATTERN          an exclusion: a client it matches is not in the list, whatever follows (`!` may repeat)
    /file/name        the patterns of the file (one or more per line, `#` comment lines, each line on its own as
                      Postfix's match_list reads it: mailflow.tables.match_list; a `#` after patterns ends the
                      line, as Postfix 3.7 drops it with a warning), with the same syntax; `!/file/name` excludes
                      each of them
    type:table        a client found in the table (whatever the value): its address is looked up, and, as
                      Postfix's namadr_list does, first its name when the caller knows it (permit_mynetworks:
                      the client's name, `unknown` without one; with `parent_style`, as mynetworks is in Postfix's
                      parent_domain_matches_subdomains, a fixed table is also asked the parent domains
                      `example.com`, `com`, else `.example.com`, `.com`). Only tables that answer from memory
                      (NETWORK_TABLE_TYPES): the check runs for every RCPT, inline. Tables are reread when their
                      file changes, as everywhere (files.Reloading); a /file is read at load and at reload.
A host name pattern (`example.com`) is refused: mailflow matches network lists by address.

Failure behaviour: check_network_list raises ValueError (the configuration makes it a ConfigError naming the file
and the key), from_items a ConfigError naming the setting (a /file gone or changed since the configuration was
checked: a start or a reload then fails in those words, not with a traceback); holds raises LookupRetry when a
table cannot answer.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from mailflow.address import client_ip
from mailflow.errors import ConfigError, LookupRetry
from mailflow.syntax import check_table_spec, table_type
from mailflow.tables.base import Table
from mailflow.tables.cache import TableCache
from mailflow.tables.match_list import FileLoop, PatternFiles, line_words

# the settings that are network lists (their key's last part), for mailflow.tables.check
NETWORK_LIST_SETTINGS = ("mynetworks", "authorized_xclient_hosts", "upstream_proxy_clients", "whitelist_networks",
                         "permit_mx_backup_networks", "sasl_exceptions_networks", "forbid_bare_newline_exclusions")
NETWORK_TABLE_TYPES = ("cidr", "texthash", "regexp", "pcre", "inline", "static")
log = logging.getLogger("mailflow.tables")

OpenTables = Callable[[Sequence[str]], list[Table]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Pattern:
    """One pattern of a list, files expanded: a network or a table spec, and whether it excludes."""
    negate: bool
    network: Network | None = None
    table: str = ""


def check_network_list(items: Iterable[str], files: PatternFiles | None = None) -> tuple[str, ...]:
    """The list as configured (networks in their plain form, one pattern per item); its files read to check them
    (by `files`, whose comments the caller wants, else a reader of its own)."""
    files = files or PatternFiles()
    checked: list[str] = []
    for item in items:
        for token in line_words(item):
            negate, pattern = _negations(token)
            if pattern.startswith("/"):
                _parse_file(pattern, negate, [], (), files)
                checked.append(token)
            elif _is_table(pattern):
                checked.append("!" * negate + _table_spec(pattern))
            else:
                checked.append("!" * negate + normalize_network(pattern))
    return tuple(checked)


def parse_network_list(items: Iterable[str]) -> list[Pattern]:
    patterns: list[Pattern] = []
    files = PatternFiles()
    for item in items:
        _parse_words(line_words(item), False, patterns, (), files)
    return patterns


def _parse_words(words: list[str], negate: bool, out: list[Pattern], reading: tuple[str, ...],
                 files: PatternFiles) -> None:
    """`reading`: the files being read, outermost first (a file among them would be a loop)."""
    for token in words:
        negated, pattern = _negations(token)
        negated = negated != negate
        if pattern.startswith("/"):
            _parse_file(pattern, negated, out, reading, files)
        elif _is_table(pattern):
            out.append(Pattern(negated, table=_table_spec(pattern)))
        else:
            out.append(Pattern(negated, network=ipaddress.ip_network(normalize_network(pattern))))


def _parse_file(path: str, negate: bool, out: list[Pattern], reading: tuple[str, ...], files: PatternFiles) -> None:
    for number, line in files.lines(path, reading):
        where = f"{path}, line {number}"
        try:
            _parse_words(files.words(line, path, number), negate, out, (*reading, path), files)
        except FileLoop:
            raise  # named once, with its chain, not again at every level of it
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _negations(token: str) -> tuple[bool, str]:
    pattern = token.lstrip("!")
    if not pattern:
        raise ValueError(f"no pattern after '!' in {token!r}")
    return (len(token) - len(pattern)) % 2 == 1, pattern


def _is_table(pattern: str) -> bool:
    """type:table, as Postfix tells it (a colon, no bracket first), unless it is an IPv6 network written without
    brackets (mailflow takes `::1/128`; main.cf needs `[::1]/128`)."""
    if pattern.startswith("[") or ":" not in pattern:
        return False
    try:
        ipaddress.ip_network(pattern.partition("/")[0])
        return False
    except ValueError:
        return True


def _table_spec(pattern: str) -> str:
    check_table_spec(pattern)
    kind = table_type(pattern)
    if kind not in NETWORK_TABLE_TYPES:
        raise ValueError(f"{pattern!r}: a network list takes tables that answer from memory "
                         f"({', '.join(NETWORK_TABLE_TYPES)}), not {kind}:")
    return pattern


def normalize_network(item: str) -> str:
    """One network as Postfix's mynetworks takes it: `addr`, `addr/len`, `[addr]`, `[addr]/len`, `[addr/len]`; the
    brackets dropped. ValueError for anything else, for host bits set, for a netmask."""
    item = item.strip()
    if item.startswith("[") and item.endswith("]"):  # `[addr/len]`: cidr_match_parse strips these brackets too
        item = item[1:-1]
    address, slash, length = item.partition("/")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if slash and not length.isdigit():
        raise ValueError(f"bad mask value in {item!r} (a prefix length: 10.0.0.0/8, 2001:db8::/32)")
    text = f"{address}{slash}{length}"
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a network or an address (host names are not taken: mailflow "
                             "matches network lists by address)") from None
        if network.prefixlen != int(length or network.max_prefixlen):
            raise e
        raise ValueError(f"non-null host address bits in {item!r}, perhaps you should use {str(network)!r} "
                         "instead") from None
    return text


class NetworkList:
    """A parsed list: `holds(client_addr, name)` walks its patterns, the first match deciding."""

    def __init__(self, patterns: Sequence[Pattern], tables: dict[str, Table], parent_style: bool = False):
        self._patterns = tuple(patterns)
        self._tables = tables
        self._parent_style = parent_style

    @classmethod
    def from_items(cls, items: Iterable[str], open_tables: OpenTables | None = None, parent_style: bool = False,
                   setting: str = "") -> NetworkList:
        """The list of `setting`; its /files and file tables read now. `open_tables`: how its tables are opened (a
        server's TableCache.open, so that they are read and reloaded once); None: a new cache of their own."""
        try:
            patterns = parse_network_list(items)
        except ValueError as e:  # a /file gone or changed since the configuration was checked
            raise ConfigError("", setting, str(e)) from None
        specs = list(dict.fromkeys(p.table for p in patterns if p.table))
        tables = dict(zip(specs, (open_tables or TableCache().open)(specs))) if specs else {}
        for table in tables.values():  # file tables read now, with the /files, not at the first client
            load = getattr(table, "load", None)
            if load is not None:
                load()
        return cls(patterns, tables, parent_style)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def holds(self, client_addr: str, name: str | None = None) -> bool:
        """Whether the client (its address; its name, when known, for the tables) is in the list: the first
        pattern that matches decides, an exclusion saying no. Raises LookupRetry when a table cannot answer."""
        if not self._patterns:
            return False
        ip = client_ip(client_addr)
        if ip is None:
            return False
        for pattern in self._patterns:
            if self._matches(pattern, ip, name):
                return not pattern.negate
        return False

    def contains(self, client_addr: str, name: str | None = None) -> bool:
        """`holds`, a table that cannot answer counting as "not in the list" (logged), as Postfix's callers that
        do not check the list's error see it: for an exemption or a trust, never an error."""
        try:
            return self.holds(client_addr, name)
        except LookupRetry as e:  # (a warning at each failed lookup, as Postfix's "table lookup problem")
            log.warning("%s: %s", client_addr, e.reason)
            return False

    def _matches(self, pattern: Pattern, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                 name: str | None) -> bool:
        if pattern.network is not None:
            return ip in pattern.network
        table = self._tables[pattern.table]
        if name and any(table.lookup(key) is not None for key in self._name_keys(table, name.lower())):
            return True
        return table.lookup(str(ip)) is not None

    def _name_keys(self, table: Table, name: str) -> list[str]:
        """match_hostname's keys: the name; for a fixed table its parent domains too (`example.com` with
        parent_style, else `.example.com`)."""
        if not table.fixed:
            return [name]
        keys, dot = [name], name.find(".", 1)
        while dot != -1:
            keys.append(name[dot + 1:] if self._parent_style else name[dot:])
            dot = name.find(".", dot + 1)
        return keys
