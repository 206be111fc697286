"""cleanup's envelope address mapping: canonical(5), masquerading and virtual(5) alias expansion.

What it owns (Postfix cleanup(8), envelope part):
- `sender(addr)`: qualify (trivial-rewrite), `sender_canonical_maps` then `canonical_maps`, then
  `masquerade_domains`. The null sender "" stays "".
- `recipient(addr)`: qualify, `recipient_canonical_maps` then `canonical_maps`.
- `expand(addr) -> [addr, ...]`: `virtual_alias_maps`, for recipients of every domain, recursively.
- `recipients(rcpts) -> (Recipient, ...)`: `recipient()` then `expand()` for each, duplicates removed (the first
  keeps its place and its original address, for DSN ORCPT), indexes renumbered.
- `is_mapped(addr)`: a recipient-side table has an entry for it (smtpd then takes it as a known recipient).

Table semantics (as Postfix's mail_addr_map):
- Keys are tried as `user+ext@domain`, `user@domain`, `user+ext` and `user` (only for this host's domains:
  mydestination and myorigin), `@domain`; the first table with an answer wins.
- A result `@other.domain` keeps the local part: `user@domain` -> `user@other.domain`.
- When the match ignored the address extension, the extension goes onto the result
  (`user+ext@domain` via `user@domain -> bob@example.com` gives `bob+ext@example.com`);
  Postfix's propagate_unmatched_extensions default (canonical, virtual).
- Canonical mapping is one-to-one and repeats until the address maps onto itself or no longer maps, at most
  CANONICAL_RECURSION_LIMIT times. Virtual alias expansion is one-to-many; an address that appears in its own
  expansion is kept as it is (`a@x -> a@x, b@x`), an address that comes back through others is a loop.

Failures (the message is not accepted; smtpd answers 451, as Postfix does): `LookupRetry` (4.3.0) when a table
cannot answer; `TemporaryError("4.6.0", "Alias expansion error")` for a loop, more nesting than
`virtual_alias_recursion_limit`, more addresses than `virtual_alias_expansion_limit`, or a canonical chain that
does not settle. The log line names the address and the reason.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from mailflow import address
from mailflow.errors import TemporaryError
from mailflow.model import Recipient
from mailflow.tables import Table, TableCache, lookup_address, split_extension

log = logging.getLogger("mailflow.cleanup")

CANONICAL_RECURSION_LIMIT = 10
_LIST_ITEM = re.compile(r'(?:"(?:\\.|[^"\\])*"|[^,\s"])+')


def expansion_error(addr: str, why: str) -> TemporaryError:
    log.warning("cleanup: <%s>: %s; message not accepted", addr, why)
    return TemporaryError("4.6.0", "Alias expansion error")


def split_address_list(value: str) -> list[str]:
    """'a@x, <b@y>  c@z' -> ['a@x', 'b@y', 'c@z']: commas or whitespace separate, quotes protect."""
    return [item.removeprefix("<").removesuffix(">") for item in _LIST_ITEM.findall(value)]


class AddressMapper:
    def __init__(self, config, rewriter, tables: TableCache | None = None):
        tables = tables or TableCache()
        self._config = config
        self._rewriter = rewriter
        self._sender_canonical = tables.open(config.sender_canonical_maps) + tables.open(config.canonical_maps)
        self._recipient_canonical = (tables.open(config.recipient_canonical_maps)
                                     + tables.open(config.canonical_maps))
        self._virtual = tables.open(config.virtual_alias_maps)

    # -- senders ---------------------------------------------------------------------------------------
    def sender(self, addr: str) -> str:
        if not addr:
            return addr
        return self.masquerade(self._canonical(self._rewriter.qualify(addr), self._sender_canonical))

    def masquerade(self, addr: str) -> str:
        """`user@host.example.com` -> `user@example.com` when example.com is in masquerade_domains; the first
        entry the domain falls under decides, and a `!domain` entry means "leave it"."""
        local, domain = address.split(addr)
        if not domain or local.lower() in {u.lower() for u in self._config.masquerade_exceptions}:
            return addr
        domain = address.normalise_domain(domain)
        for entry in self._config.masquerade_domains:
            keep = entry.startswith("!")
            parent = entry.lstrip("!")
            if domain == parent:
                return addr
            if domain.endswith("." + parent):
                return addr if keep else f"{local}@{parent}"
        return addr

    # -- recipients ------------------------------------------------------------------------------------
    def recipient(self, addr: str) -> str:
        return self._canonical(self._rewriter.qualify(addr), self._recipient_canonical)

    def recipients(self, rcpts: Sequence[Recipient]) -> tuple[Recipient, ...]:
        out: list[Recipient] = []
        seen: set[str] = set()
        for rcpt in rcpts:
            for final in self.expand(self.recipient(rcpt.address)):
                if final.lower() not in seen:
                    seen.add(final.lower())
                    out.append(Recipient(len(out), final, rcpt.original, rcpt.notify, rcpt.orcpt))
        return tuple(out)

    def is_mapped(self, addr: str) -> bool:
        """recipient_canonical_maps, canonical_maps or virtual_alias_maps have an entry. May raise LookupRetry."""
        qualified = self._rewriter.qualify(addr)
        return any(self._find(t, qualified) is not None for t in self._recipient_canonical + self._virtual)

    def expand(self, addr: str) -> list[str]:
        """virtual_alias_maps, depth first, in table order. The expansion limit counts the addresses of the
        expansion so far (done and still to expand), as Postfix does. Raises TemporaryError (see the module doc)."""
        c = self._config
        out: list[str] = []
        stack: list[tuple[str, tuple[str, ...], bool]] = [(addr, (), False)]  # (address, ancestors, leaf)
        while stack:
            current, ancestors, leaf = stack.pop()
            results = None if leaf else self._map(current, self._virtual)
            if results is None:
                out.append(current)
                continue
            if len(ancestors) >= c.virtual_alias_recursion_limit:
                raise expansion_error(addr, f"virtual_alias_maps nesting deeper than {len(ancestors)}")
            if len(out) + len(stack) + len(results) > c.virtual_alias_expansion_limit:
                raise expansion_error(addr, f"virtual_alias_maps expansion larger than "
                                            f"{c.virtual_alias_expansion_limit} addresses")
            path = ancestors + (current.lower(),)
            children = []
            for result in results:
                if result.lower() == current.lower():
                    children.append((result, path, True))  # in its own expansion: deliver it as it is
                elif result.lower() in path:
                    raise expansion_error(addr, f"virtual alias loop: {' -> '.join(path)} -> {result}")
                else:
                    children.append((result, path, False))
            stack.extend(reversed(children))
        return out

    # -- table work ------------------------------------------------------------------------------------
    def _canonical(self, addr: str, tables: list[Table]) -> str:
        current = addr
        for _ in range(CANONICAL_RECURSION_LIMIT):
            results = self._map(current, tables)
            if results is None or results[0].lower() == current.lower():
                return current
            if len(results) > 1:
                log.warning("cleanup: canonical mapping of <%s> has %d addresses; using the first",
                            current, len(results))
            current = results[0]
        raise expansion_error(addr, f"canonical mapping does not settle after {CANONICAL_RECURSION_LIMIT} steps")

    def _map(self, addr: str, tables: list[Table]) -> list[str] | None:
        """The first table's answer for `addr` as qualified addresses, or None."""
        for table in tables:
            found = self._find(table, addr)
            if found is not None:
                key, value = found
                return [self._result(addr, key, item) for item in split_address_list(value)] or None
        return None

    def _find(self, table: Table, addr: str) -> tuple[str, str] | None:
        domain = address.split(addr)[1]
        return lookup_address(table, addr, delimiter=self._config.recipient_delimiter,
                              local_domain=self._rewriter.is_local_domain(domain))

    def _result(self, addr: str, key: str, item: str) -> str:
        local, _ = address.split(addr)
        if item.startswith("@"):
            return local + item
        user, ext = split_extension(local, self._config.recipient_delimiter)
        result = self._rewriter.qualify(item)
        matched_extension = ext and address.split(key)[0].lower() == local.lower()
        if ext and not matched_extension:
            result_local, result_domain = address.split(result)
            result = f"{result_local}{ext}@{result_domain}"
        return result
