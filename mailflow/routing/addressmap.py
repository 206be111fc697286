"""cleanup's envelope address mapping: canonical(5), masquerading and virtual(5) alias expansion.

What it owns (Postfix cleanup(8), envelope part):
- `sender(addr)`: qualify (trivial-rewrite), `sender_canonical_maps` then `canonical_maps`, then
  `masquerade_domains`. The null sender "" stays "", and `MAILER-DAEMON@myorigin` (or `MAILER-DAEMON`, any case)
  becomes it before any table is asked, as Postfix's cleanup_addr_sender makes it (bounces sent as that address).
- `header_sender(addr, origin)`, `header_recipient(addr, origin)`: an address of a header field (cleanup's header
  rewriting, mailflow.header_addresses): tidied (`"joe"@x.test.` is `joe@x.test`; a quoted source route,
  `"@a.test:joe"@x.test`, kept and written back bare, `@a.test:joe@x.test`, as Postfix does in a header) and
  qualified with `origin` by trivial-rewrite's `qualify`, then canonical maps and masquerading (both classes:
  Postfix's masquerade_classes masquerade header recipients too).
- `recipient(addr)`: qualify, `recipient_canonical_maps` then `canonical_maps`; with [srs] on, a valid SRS address of
  the SRS domain (a bounce of forwarded mail coming back) becomes the original sender instead (mailflow.routing.srs,
  postsrsd's reverse map as a recipient canonical map).
- `expand(addr) -> [addr, ...]`: `virtual_alias_maps`, for recipients of every domain, recursively.
- `recipients(rcpts) -> (Recipient, ...)`: `recipient()` then `expand()` for each, duplicates removed (the first
  keeps its place and its original address), indexes renumbered. A recipient without ORCPT gets
  `rfc822;ADDRESS` with the address after `recipient()` (Postfix's cleanup makes it up so; smtpd gives one always),
  `utf-8;ADDRESS` for a non-ASCII one when the message asked for SMTPUTF8 (`smtputf8=True`).
  A duplicate is what Postfix's cleanup_out_recipient takes for one (its been_here key, without case): the same
  address with the same NOTIFY (as a set of words), ORCPT and original recipient. For the
  members of an alias of more than one address, SUCCESS does not count in that NOTIFY, as Postfix turns it off
  for them (it reports the alias "expanded" itself; mailflow does not, so their NOTIFY goes on as it was).
- `recipients(rcpts, auto_bcc_sender=sender)`: the same with the automatic BCC recipients (Postfix cleanup_addr.c), in
  Postfix's order: sender_bcc_maps' address for the rewritten sender first (none for the null sender), each
  recipient's recipient_bcc_maps address (asked with the recipient after canonical mapping, before virtual alias
  expansion) after that recipient, `always_bcc` last. A BCC address is qualified, canonical-mapped and virtual-
  expanded as any recipient, with NOTIFY=NEVER and no ORCPT; it is a duplicate of another BCC recipient only (so
  a BCC address the client also named is delivered twice, as Postfix does). A table value of several addresses
  gives its first (logged; Postfix takes the whole value as one address). `bcc=`: the content checks' BCC
  addresses (header_checks `BCC`), added after them the same way. `milter=`: the milters' envelope edits
  (MilterEdits), as Postfix's cleanup meets them after its lookups: a recipient a milter added gets no
  recipient_bcc_maps copy, one it deleted keeps its copy, and a CHGFROM sender's copy is added to the first
  sender's.
- `for_message(queue_id)`: the same mapper, its warnings under the message's queue id (cleanup maps each message
  with one).
- `is_mapped(addr)`: a recipient-side table has an entry for it, or it is a valid SRS address (smtpd then takes it as
  a known recipient). `srs`: the Srs codec, or None when [srs] is off (cleanup rewrites forwarded senders with it).

Table semantics (as Postfix's mail_addr_map):
- Keys are tried as `user+ext@domain`, `user@domain`, `user+ext` and `user` (only for this host's domains:
  mydestination and myorigin), `@domain`; each key is asked of every table before the next key.
- A value is an RFC 822 address list, parsed as Postfix's mail_addr_crunch parses it (`table_value_addresses`,
  mailflow.header_addresses): `Joe <joe@x>` is `joe@x`, comments and a group's name are dropped, words side by side
  are an address each; a value with no address is a lookup failure (LookupRetry), as Postfix's "non-address
  result" is.
- A result `@other.domain` keeps the local part: `user@domain` -> `user@other.domain`; only a value that starts
  with it is rewritten so, the whole value (virtual(5); Postfix then quotes all before the last '@'): a later
  `@other.domain` of a list stays an address with an empty local part, `""@other.domain`, as Postfix's cleanup
  makes it.
- When a `user@domain` or `user` key matched without the address extension, the extension goes onto the
  result (`user+ext@domain` via `user@domain -> bob@example.com` gives `bob+ext@example.com`); Postfix's
  propagate_unmatched_extensions default (canonical, virtual).
- Canonical mapping is one-to-one: recipient_canonical_maps (or sender_) to a fixed point, then canonical_maps
  to a fixed point, each at most CANONICAL_RECURSION_LIMIT steps. Virtual alias expansion is one-to-many (see
  `expand`); an address that appears in its own expansion is kept as it is (`a@x -> a@x, b@x`), an address
  that comes back through others is a loop.

Failures (the message is not accepted; smtpd answers 451, as Postfix does): `LookupRetry` (4.3.0) when a table
cannot answer; `TemporaryError("4.6.0", "Alias expansion error")` for a loop, an address still to be looked up
after `virtual_alias_recursion_limit` nested lookups (as Postfix's cleanup_map1n counts: a chain of exactly that
many rewrites is refused too), more addresses than `virtual_alias_expansion_limit`, or a canonical chain that
does not settle (Postfix only logs that one, and goes on with the address reached: a deliberate difference,
docs/config.md); its `reason` names the address and why, for the log of whoever refuses the message.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

from mailflow import address
from mailflow.dsn_parameters import made_up_orcpt
from mailflow.errors import LookupRetry, TemporaryError
from mailflow.header_addresses import value_addresses
from mailflow.model import Recipient
from mailflow.routing.srs import srs_from_config
from mailflow.tables import Table, TableCache
from mailflow.tables.search import EXTERNAL_FIRST, mapped_addresses

log = logging.getLogger("mailflow.cleanup")

CANONICAL_RECURSION_LIMIT = 10
MAILER_DAEMON = "MAILER-DAEMON"  # @myorigin, as an envelope sender: the null sender (Postfix MAIL_ADDR_MAIL_DAEMON)
BCC_NOTIFY = "NEVER"  # an automatic BCC recipient's NOTIFY (Postfix cleanup's NO_DSN_NOTIFY)


@dataclass(frozen=True)
class MilterEdits:
    """What the milters changed in the envelope, for the automatic BCC lookups, which Postfix's cleanup makes on
    each envelope record as it arrives, before the milters: `added`, the recipients a milter added (no
    recipient_bcc_maps lookup: cleanup_milter.c adds them with cleanup_addr_bcc_dsn); `deleted`, those a milter
    removed (their copy stays, made at RCPT time); `sender`, the sender a milter's CHGFROM gave, rewritten (its
    sender_bcc_maps copy is added too, the first sender's kept; None: no CHGFROM)."""

    added: frozenset[str] = frozenset()
    deleted: tuple[str, ...] = ()
    sender: str | None = None


NO_MILTER_EDITS = MilterEdits()


def expansion_error(addr: str, why: str) -> TemporaryError:
    """4.6.0 "Alias expansion error" for the client; its `reason` (address and why) is for the log line."""
    return TemporaryError("4.6.0", "Alias expansion error", f"<{addr}>: {why}")


def table_value_addresses(value: str) -> list[str]:
    """The addresses of a table value, as Postfix's mail_addr_crunch finds them (mailflow.header_addresses, RFC 822
    tokens): `Joe <joe@x>, (a comment) b@y` -> ['joe@x', 'b@y']; a group's members without its name, words side by
    side an address each, a source route dropped; a mailbox that is no address (a comment alone, `<>` in a list) is
    none. A value that is empty or `<>` is the null address [''] (Postfix's workaround for it)."""
    if value.strip() in ("", "<>"):
        return [""]
    return [item for item in value_addresses(value) if item is not None]


class AddressMapper:
    def __init__(self, config, rewriter, tables: TableCache | None = None):
        tables = tables or TableCache()
        self._config = config
        self._rewriter = rewriter
        self.tables = tables  # `await mapper.tables.run(...)` on the event loop (see mailflow.tables)
        canonical = tables.open(config.canonical_maps)
        self._sender_passes = [t for t in (tables.open(config.sender_canonical_maps), canonical) if t]
        self._recipient_passes = [t for t in (tables.open(config.recipient_canonical_maps), canonical) if t]
        self._virtual = tables.open(config.virtual_alias_maps)
        # whether a recipient may become many (virtual alias expansion): cleanup maps a long envelope off the loop
        self.expands = bool(self._virtual)
        self._sender_bcc = tables.open(config.sender_bcc_maps)
        self._recipient_bcc = tables.open(config.recipient_bcc_maps)
        # whether any automatic BCC is configured: when not, cleanup asks for none (nothing per recipient)
        self.auto_bcc = bool(self._sender_bcc or self._recipient_bcc or config.always_bcc)
        self.srs = srs_from_config(config)
        self._log_id = "cleanup"  # what the warnings begin with: the queue id of the message mapped (`for_message`)

    def for_message(self, queue_id: str) -> AddressMapper:
        """This mapper (the same tables) for one message: its warnings begin with `queue_id`, as Postfix's
        cleanup logs under the queue id."""
        mapper = object.__new__(type(self))  # a shallow copy (copy.copy's, without its protocol: ~8 calls a message)
        mapper.__dict__.update(self.__dict__)
        mapper._log_id = queue_id or "cleanup"
        return mapper

    # -- senders ---------------------------------------------------------------------------------------
    def sender(self, addr: str) -> str:
        qualified = self._rewriter.qualify(addr)
        if not qualified or qualified.lower() == f"{MAILER_DAEMON}@{self._config.origin}".lower():
            return ""
        return self.masquerade(self._canonical(qualified, self._sender_passes))

    def masquerade(self, addr: str) -> str:
        """`user@host.example.com` -> `user@example.com` when example.com is in masquerade_domains; the first
        entry the domain falls under decides, and a `!domain` entry means "leave it"."""
        if not self._config.masquerade_domains:  # (none: every address is left as it is)
            return addr
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

    # -- header addresses ------------------------------------------------------------------------------
    def header_sender(self, addr: str, origin: str = "", *, mapped: bool = True) -> str:
        """An address of a sender header field (From, Sender, Reply-To...): qualified with `origin` (default
        myorigin), then (`mapped`) as an envelope sender: canonical maps and masquerading."""
        qualified = self._rewriter.qualify(addr, origin, envelope=False)
        return self.masquerade(self._canonical(qualified, self._sender_passes)) if mapped else qualified

    def header_recipient(self, addr: str, origin: str = "", *, mapped: bool = True) -> str:
        """An address of a recipient header field (To, Cc...): qualified, then (`mapped`) through the recipient
        canonical maps and masquerading (Postfix masquerades header recipients, not envelope ones)."""
        qualified = self._rewriter.qualify(addr, origin, envelope=False)
        return self.masquerade(self._canonical(qualified, self._recipient_passes)) if mapped else qualified

    # -- recipients ------------------------------------------------------------------------------------
    def recipient(self, addr: str) -> str:
        qualified = self._rewriter.qualify(addr)
        original = self.srs.reverse(qualified) if self.srs is not None else None
        return original if original is not None else self._canonical(qualified, self._recipient_passes)

    def recipients(self, rcpts: Sequence[Recipient], *, auto_bcc_sender: str | None = None,
                   bcc: Sequence[str] = (), milter: MilterEdits = NO_MILTER_EDITS,
                   smtputf8: bool = False) -> tuple[Recipient, ...]:
        """See the module doc. `smtputf8`: the message asked for SMTPUTF8 (the type of a made-up ORCPT);
        `auto_bcc_sender`: the message's sender as received, rewritten (`sender()`), when
        the automatic BCC recipients apply, None when they do not; `bcc`: the content checks' BCC addresses, added
        as the automatic ones are (Postfix's cleanup_extracted_finish: after always_bcc); `milter`: the milters'
        envelope edits (MilterEdits), whose BCC copies come last, as Postfix's milters run last."""
        out: list[Recipient] = []
        seen: set[tuple[str, ...]] = set()
        # the final addresses met, folded, by the rest of their duplicate key (`_duplicate_key`): the one address
        # of a key, a set once a second comes (a list's), each the address itself when already lower case; not a
        # tuple and a folded copy per address (a million recipients expanded held 250 bytes each that way), nor a
        # set per plain recipient. The BCC recipients' keys go in `seen`: a recipient's never equals one (its
        # ORCPT is never empty, a BCC recipient's is).
        met: dict[tuple[str, ...], str | set[str]] = {}
        auto = auto_bcc_sender is not None
        if auto_bcc_sender:  # (the null sender is not looked up)
            self._add_bcc(self._bcc_address(self._sender_bcc, auto_bcc_sender, seen), out, seen)
        for rcpt in rcpts:
            canonical = self.recipient(rcpt.address)
            if not rcpt.orcpt and canonical and rcpt.address not in milter.added:  # (Postfix adds those without)
                rcpt = dataclasses.replace(rcpt, orcpt=made_up_orcpt(canonical, smtputf8))
            finals = self.expand(canonical)
            if len(finals) == 1 and len(rcpts) == 1 and not auto and not bcc:  # alone: no duplicate, nothing after it
                out.append(Recipient(len(out), finals[0], rcpt.original, rcpt.notify, rcpt.orcpt))
                continue
            rcpt_key = _duplicate_key(rcpt, expanded=len(finals) > 1)  # (once per recipient, not per address)
            finals_met = met.get(rcpt_key)
            for final in finals:
                folded = final.lower()
                if folded == final:
                    folded = final  # (the str itself, not an equal copy)
                if finals_met is None:
                    finals_met = met[rcpt_key] = folded
                elif isinstance(finals_met, str):
                    if folded == finals_met:
                        continue
                    finals_met = met[rcpt_key] = {finals_met, folded}
                elif folded in finals_met:
                    continue
                else:
                    finals_met.add(folded)
                out.append(Recipient(len(out), final, rcpt.original, rcpt.notify, rcpt.orcpt))
            if auto and canonical and rcpt.address not in milter.added:
                self._add_bcc(self._bcc_address(self._recipient_bcc, canonical, seen), out, seen)
        if auto:
            self._add_milter_deleted_bcc(milter.deleted, out, seen)
        if auto and rcpts:
            self._add_bcc(self._config.always_bcc or None, out, seen)
        for checks_bcc in bcc if rcpts else ():
            self._add_bcc(checks_bcc, out, seen)
        if auto and milter.sender:
            self._add_bcc(self._bcc_address(self._sender_bcc, milter.sender, seen), out, seen)
        return tuple(out)

    def _add_milter_deleted_bcc(self, deleted: Sequence[str], out: list[Recipient],
                                seen: set[tuple[str, ...]]) -> None:
        """The recipient_bcc_maps copies of the recipients a milter deleted: Postfix's cleanup wrote them at RCPT
        time, before the milter asked, so they stay."""
        for addr in deleted:
            canonical = self.recipient(addr)
            if canonical:
                self._add_bcc(self._bcc_address(self._recipient_bcc, canonical, seen), out, seen)

    def _bcc_address(self, tables: list[Table], addr: str, seen: set[tuple[str, ...]]) -> str | None:
        """The BCC address a sender_/recipient_bcc_maps table has for `addr` (keys as mail_addr_find makes them, in
        its legacy form: quoted, then internal; no extension carried onto the result); None without one. One
        address: of a list, the first (logged once per message and entry: `seen` is the message's, a thousand
        recipients meeting one `@domain` entry make one line). A value that holds no address raises LookupRetry,
        as one of canonical or virtual maps does."""
        found = self._rewriter.find_address(tables, addr, EXTERNAL_FIRST) if tables else None
        if found is None:
            return None
        table, key, value = found
        items = table_value_addresses(value)
        if not items:
            raise self._non_address_result(table, key, value, addr)
        if len(items) > 1 and ("<bcc list>", table, key) not in seen:
            seen.add(("<bcc list>", table, key))
            log.warning("%s: the BCC address of <%s> is a list of %d addresses; using the first",
                        self._log_id, addr, len(items))
        return items[0] if items else None

    def _add_bcc(self, bcc: str | None, out: list[Recipient], seen: set[tuple[str, ...]]) -> None:
        """An automatic BCC recipient, as Postfix's cleanup_addr_bcc adds one: qualified, canonical maps, virtual
        alias expansion; NOTIFY=NEVER (a copy that fails is never reported to the sender), no ORCPT, the address
        after canonical mapping as its original. Its duplicate key has no ORCPT, so it is a duplicate of another
        BCC recipient only, never of a recipient the client gave (Postfix then delivers both). An address already
        added for this message (`seen`) is not mapped and expanded again: its copies would all be duplicates, and
        a thousand recipients with one archive address made a thousand expansions on the loop."""
        if not bcc or ("<bcc>", bcc.lower()) in seen:
            return
        seen.add(("<bcc>", bcc.lower()))
        canonical = self.recipient(bcc)
        for final in self.expand(canonical):
            key = (final.lower(), BCC_NOTIFY, "", address.shown_original(canonical).lower())
            if key not in seen:
                seen.add(key)
                out.append(Recipient(len(out), final, canonical, BCC_NOTIFY, ""))

    def is_mapped(self, addr: str) -> bool:
        """recipient_canonical_maps, canonical_maps or virtual_alias_maps have an entry. May raise LookupRetry."""
        qualified = self._rewriter.qualify(addr)
        if self.srs is not None and self.srs.reverse(qualified) is not None:
            return True
        return any(self._find(tables, qualified) is not None for tables in self._recipient_passes + [self._virtual])

    def expand(self, addr: str) -> list[str]:
        """virtual_alias_maps as Postfix's cleanup_map1n: the first result replaces the address in place and
        is looked up again, the others are appended to the list; an address met as a result of its own
        lookup is final from then on (delivered as it is wherever it turns up). A chain that comes back to
        an address already in it is a loop. The expansion limit counts the list. Raises TemporaryError."""
        c = self._config
        expansion = [addr]
        final: set[str] = set()
        i = 0
        while i < len(expansion):
            chain: list[str] = []
            while expansion[i].lower() not in final:
                current = expansion[i]
                if current.lower() in chain:
                    raise expansion_error(addr, f"virtual alias loop: {' -> '.join(chain)} -> {current}")
                if len(chain) >= c.virtual_alias_recursion_limit:  # before the lookup, whatever it would answer
                    raise expansion_error(addr, f"virtual_alias_maps nesting reaches {len(chain)} lookups")
                results = self._map(current, [self._virtual])
                if results is None:
                    break
                chain.append(current.lower())
                if any(r.lower() == current.lower() for r in results):
                    final.add(current.lower())
                expansion[i:i + 1] = results[:1]
                expansion.extend(results[1:])
                if len(expansion) > c.virtual_alias_expansion_limit:
                    raise expansion_error(addr, f"virtual_alias_maps expansion larger than "
                                                f"{c.virtual_alias_expansion_limit} addresses")
            i += 1
        return expansion

    # -- table work ------------------------------------------------------------------------------------
    def _canonical(self, addr: str, passes: list[list[Table]]) -> str:
        """Each pass (recipient_/sender_canonical_maps, then canonical_maps) maps the address until it maps
        onto itself or no longer maps, at most CANONICAL_RECURSION_LIMIT times."""
        current = addr
        for tables in passes:
            current = self._settle(current, tables, addr)
        return current

    def _settle(self, current: str, tables: list[Table], original: str) -> str:
        for _ in range(CANONICAL_RECURSION_LIMIT):
            results = self._map(current, [tables])
            if results is None or results[0].lower() == current.lower():
                return current
            if len(results) > 1:
                log.warning("%s: canonical mapping of <%s> has %d addresses; using the first",
                            self._log_id, current, len(results))
            current = results[0]
        raise expansion_error(original, f"canonical mapping does not settle after {CANONICAL_RECURSION_LIMIT} steps")

    def _map(self, addr: str, passes: list[list[Table]]) -> list[str] | None:
        """The answer for `addr` from the first group of tables that has one, as qualified addresses."""
        for tables in passes:
            found = self._find(tables, addr)
            if found is not None:
                return self._results(addr, *found)
        return None

    def _find(self, tables: list[Table], addr: str) -> tuple[str, str, str] | None:
        if not tables:  # (a setting left empty, the default: no keys to make)
            return None
        return self._rewriter.find_address(tables, addr)

    def _results(self, addr: str, table: str, key: str, value: str) -> list[str]:
        """The addresses of a table's value for `addr`, qualified, as Postfix's mail_addr_map makes them
        (`mapped_addresses`, mailflow.tables.search: `@domain` values, the unmatched extension carried onto
        each). A value that holds no address raises LookupRetry (Postfix: "returns non-address result", the
        message is not accepted)."""
        items = [item for item in mapped_addresses(addr, key, value, delimiter=self._config.recipient_delimiter,
                                                   qualify=self._rewriter.qualify, propagate=True)
                 if item is not None]
        if not items:
            raise self._non_address_result(table, key, value, addr)
        return items

    def _non_address_result(self, table: str, key: str, value: str, addr: str) -> LookupRetry:
        """A table's value that holds no address: the message is not accepted (Postfix's "non-address result")."""
        log.warning("%s: table %s: lookup of <%s> returns non-address result %r",
                    self._log_id, address.printable(table), addr, value)
        return LookupRetry(f"table {address.printable(table)}: {address.printable(key)}: non-address result")



def _duplicate_key(rcpt: Recipient, *, expanded: bool) -> tuple[str, ...]:
    """What, with the final address, makes a result of `rcpt` a duplicate of an earlier recipient, as Postfix's
    cleanup keys it."""
    notify = set(rcpt.notify.upper().split(",")) - {""}
    if expanded and "SUCCESS" in notify:
        notify = (notify - {"SUCCESS"}) or {"NEVER"}
    orcpt = rcpt.orcpt or f"rfc822;{rcpt.original}"
    return ",".join(sorted(notify)), orcpt.lower(), address.shown_original(rcpt.original).lower()
