"""The whole route of a recipient, from the address a client gives to each final `(address, transport, nexthop)`.

`Router(config)` puts together what the stages do to a recipient, in their order:
cleanup (qualify, recipient_canonical_maps + canonical_maps, virtual_alias_maps) -> trivial-rewrite (class,
transport_maps, transport:nexthop) -> for the local transport, local(8)'s alias_maps and .forward expansion, and
forwarded addresses (and the resubmitted members of :include: files and owner- lists) around again as the new
message local delivery queues (carrying Delivered-To, so a forwarding loop ends as it would in delivery, 5.4.6).

- `queued(addr) -> [(address, Resolution), ...]`: what cleanup queues for `addr` (canonical maps, virtual alias
  expansion), each as trivial-rewrite resolves it, one per Route (duplicates removed, the first kept): the start
  of the walk, and what address verification probes.
`sender` (every method's keyword, None: not given) is the envelope sender the sender-dependent routing tables
are asked with; a forwarded copy goes out from its list owner when it has one, else from the same sender.
- `route(addr) -> [Route, ...]`: the final destinations, duplicates removed. A command or file target is routed
  to the local transport with `|command` or `/path` as its address; a recipient local delivery would refuse
  routes to `error` with `dsn text` as nexthop, as Postfix's error transport is written.
- `explain(addr) -> [(depth, label, text), ...]`: the same walk, step by step, for `mailflow address`; a
  `sender` there is taken as given to cleanup (qualified, sender canonical maps) before it routes.
- `recipient_verdict(addr, sender=None)`: what smtpd would answer at RCPT for an untrusted client, as text (the
  same rule smtpd runs: `Rewriter.recipient_refusal`, with the MAIL FROM sender).
Failures: `LookupRetry` and `TemporaryError` from the stages propagate (the CLI exits 75).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mailflow import status
from mailflow.errors import TemporaryError
from mailflow.model import AddressClass, Resolution
from mailflow.routing.addressmap import AddressMapper
from mailflow.transports.local.aliasing import Command, File, Forward, LocalExpander, Mailbox, Refused
from mailflow.routing.rewrite import Rewriter, unknown_reject_codes
from mailflow.tables import TableCache

FORWARD_DEPTH = 20  # forwarded messages in a chain; a loop ends sooner, at a Delivered-To it already has
INDENT = 3  # explain() depth of one forwarding generation


@dataclass(frozen=True)
class Route:
    address: str
    transport: str
    nexthop: str


class Router:
    def __init__(self, config, tables: TableCache | None = None):
        tables = tables or TableCache()
        self._config = config
        self.tables = tables
        self.rewriter = Rewriter(config, tables)
        self.mapper = AddressMapper(config, self.rewriter, tables)
        self.local = LocalExpander(config, self.rewriter)

    def route(self, addr: str, sender: str | None = None) -> list[Route]:
        routes: list[Route] = []
        self._walk(addr, sender, frozenset(), 0, routes, [])
        return routes

    def queued(self, addr: str, step: Callable[[str, str], None] = lambda label, text: None,
               sender: str | None = None) -> list[tuple[str, Resolution]]:
        """The recipients cleanup queues for `addr` and how trivial-rewrite resolves each, one per route (see the
        module doc). `step(label, text)`: told of what the canonical and virtual alias maps changed (explain).
        May raise LookupRetry, TemporaryError (virtual alias limits)."""
        canonical = self.mapper.recipient(addr)
        if canonical != addr:
            step("canonical", canonical)
        expanded = self.mapper.expand(canonical)
        if expanded != [canonical]:
            step("virtual alias", ", ".join(expanded))
        found: dict[Route, tuple[str, Resolution]] = {}
        for final in expanded:
            res = self.rewriter.resolve(final, sender)
            found.setdefault(Route(res.address, res.transport, res.nexthop), (final, res))
        return list(found.values())

    def explain(self, addr: str, sender: str | None = None) -> list[tuple[int, str, str]]:
        steps: list[tuple[int, str, str]] = [(0, "address", addr), (0, "rcpt", self.recipient_verdict(addr, sender))]
        if sender is not None:
            queued = self.mapper.sender(sender)  # as cleanup queues it: qualified, canonical maps, masquerading
            shown = f"<{sender}>" + (f" -> <{queued}> (as queued)" if queued != sender else "")
            steps.insert(1, (0, "sender", shown))
            sender = queued
        self._walk(addr, sender, frozenset(), 0, [], steps)
        return steps

    def recipient_verdict(self, addr: str, sender: str | None = None) -> str:
        """smtpd's answer at RCPT (the relay check, then Rewriter.recipient_refusal with the MAIL FROM `sender`),
        as text; under soft_bounce a refusal as smtpd sends it (4xx)."""
        rw = self.rewriter
        refusal = rw.recipient_refusal(addr, self.mapper, sender,
                                       reject_codes=unknown_reject_codes(self._config.smtpd))
        refused = None if refusal is None else str(refusal)
        if refused is not None and self._config.soft_bounce:
            refused = status.soft_bounced(refused)
        if not rw.authorized_destination(addr):
            denied = str(status.relay_denied(addr, self._config.smtpd.relay_domains_reject_code))
            denied = status.soft_bounced(denied) if self._config.soft_bounce else denied
            relay = f"accepted from mynetworks only (others: {denied})"
            return relay if refused is None else f"{relay}; then {refused}"
        if refused is not None:
            return refused
        if self.mapper.is_mapped(rw.resolved_address(addr)):
            return "accepted (canonical or virtual alias maps list it)"
        return "accepted"

    # -- the walk --------------------------------------------------------------------------------------
    def _walk(self, addr: str, sender: str | None, delivered_to: frozenset[str], depth: int, routes: list[Route],
              steps: list) -> None:
        def step(label: str, text: str, extra: int = 0) -> None:
            steps.append((depth + extra, label, text))

        if depth > FORWARD_DEPTH * INDENT:
            raise TemporaryError("4.6.0", f"forwarded through more than {FORWARD_DEPTH} messages at {addr}")
        for final, res in self.queued(addr, step, sender):
            self._final(final, res, sender, delivered_to, depth, routes, steps, step)

    def _final(self, addr: str, res: Resolution, sender: str | None, delivered_to, depth: int, routes: list[Route],
               steps: list, step) -> None:
        step("recipient", addr, 1)
        for label, text in self.rewriter.explain(addr, sender):
            step(label, text, 2)
        local_name = self._config.local_transport.partition(":")[0]
        if not (res.address_class is AddressClass.LOCAL and res.transport == local_name):
            _add(routes, Route(res.address, res.transport, res.nexthop))
            return
        forwards: list[tuple[str, str | None]] = []
        for leaf in self.local.expand(res.address, delivered_to=delivered_to):
            if isinstance(leaf, Mailbox):
                step("mailbox", f"{leaf.user} ({leaf.address})", 2)
                _add(routes, Route(leaf.address, res.transport, res.nexthop))
            elif isinstance(leaf, Command):
                step("command", f"|{leaf.command} (from {leaf.source})", 2)
                _add(routes, Route(f"|{leaf.command}", res.transport, res.nexthop))
            elif isinstance(leaf, File):
                step("file", f"{leaf.path} (from {leaf.source})", 2)
                _add(routes, Route(leaf.path, res.transport, res.nexthop))
            elif isinstance(leaf, Refused):
                step("refused", f"{leaf.dsn} {leaf.text}", 2)
                _add(routes, Route(leaf.address, "error", f"{leaf.dsn} {leaf.text}"))
            elif isinstance(leaf, Forward):
                forwards.append((leaf.address, leaf.sender))
        for forward, owner in forwards:
            origin = f", from {owner}" if owner else ""
            step("forward", f"{forward} (a new message with Delivered-To: {addr}{origin})", 2)
            self._walk(forward, owner or sender, delivered_to | {addr.lower()}, depth + INDENT, routes, steps)


def _add(routes: list[Route], route: Route) -> None:
    if route not in routes:
        routes.append(route)
