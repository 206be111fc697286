"""The SMTP and LMTP clients' generic mapping (Postfix's smtp_generic_maps and lmtp_generic_maps, smtp(8) with
smtp_map11.c): the addresses of mail that leaves this host, rewritten as it goes on the wire, for a host whose own
domain names are not valid on the Internet (`joe@box.local` -> `joe.user@example.com`). The queue, the logs and
the notices keep the addresses as queued; so does ORCPT: to a next hop that offers DSN, RCPT TO's `ORCPT=rfc822;…`
still names the queued recipient (the one the client gave), as Postfix's smtp sends it.

    GenericMaps(tables, *, delimiter, qualify, find_address, program="smtp", log=None)   (`program`: "lmtp" for
                                       the LMTP client's: its log lines name lmtp_generic_maps, under lmtp; `log`:
                                       the client's logger when it is another, relay/smtp's, else `program`'s)
      .address(addr, queue_id="") -> str   one address mapped, or itself: the entry `find_address(tables, addr)`
                                       finds (Rewriter.find_address: keys as mail_addr_find, `user+ext@domain`,
                                       `user@domain`, `user+ext` and `user` for this host's domains, `@domain`);
                                       the first address of the value as
                                       Postfix's mail_addr_map makes it (mailflow.tables.search.mapped_addresses:
                                       `Joe <joe@x>` is `joe@x`; Postfix warns of more and takes the first);
                                       `@other.domain` keeps the local part (without the extension when the key
                                       matched without it; `@x, b@y` quotes all before the last '@'); a
                                       value without a domain is qualified (`qualify`: @myorigin), as Postfix's
                                       mail_addr_crunch; an unmatched extension is not carried over (Postfix's default
                                       propagate_unmatched_extensions leaves out `generic`). The null sender is
                                       never looked up. A result that cannot go on the wire as it is
                                       (`wire_problem`: a control character, `<`, `>` or a blank outside quotes,
                                       not local@domain; a first mailbox that is not one address; a value of
                                       none) is logged and raises LookupRetry: what screen_envelope keeps from
                                       the wire for a queued address, a table's value must not put there.
      .wire_form(request, head=None) -> WireForm  the envelope sender, each recipient and the message's header
                                       section as they go out; may raise LookupRetry (a table that cannot
                                       answer, or a value that holds no address: the delivery is deferred);
                                       `head`: (the queued header section, smtp_header_checks' form of it) whose
                                       addresses are mapped; `head_as_queued`: the header is left alone (the
                                       caller found it too long and said so)
    WireForm(sender, recipients, head, utf8_head, body)   `recipient(addr)`; `encoders()`: what the content goes
                                       through (a new HeaderSwap each transaction, none when no header changed;
                                       first a new `body()`, smtp_body_checks' encoder, when set);
                                       `utf8_head`: a header address was mapped to a UTF-8 one (SMTPUTF8 needed)
    HeaderSwap(old_length, new_head)   an encoder (mailflow.transports.encode) that puts `new_head` in place of
                                       the first `old_length` bytes of the content and passes the body on as it
                                       streams: memory is the header section, never the message

Header fields: the address fields of the message's own header section (Postfix's primary header, not those of
an attached message), sender and recipient classes alike (mailflow.header_addresses: From, Sender, Reply-To,
To, Cc, Resent-*, ...); a field none of whose addresses changed stays byte for byte, in one that changed only
the addresses do (Postfix writes a changed field anew, folded its own way). A header section longer than
HEADER_READ_LIMIT goes unchanged (a warning under the queue id says so). A DKIM signature made before (cleanup
signs mail this host sends) covers From, and Sender, Reply-To, To, Cc and the Resent-* fields when present (dkimpy's
default signed fields), so rewriting one breaks the signature: sign with the mapped
addresses (or map before signing), as Postfix's documentation warns too. A header address with a source route
(`<@r.test:a@z.test>`) is looked up as Postfix's smtp_map11 asks it, the route part of its local part
(`"@r.test:a"@z.test`: only an `@domain` key finds it); a result goes out without the route (`<a@w.test>`), and
no result leaves the address as it is, route and all.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, NoReturn

from mailflow.address import (as_internal_local, has_unsafe_characters, printable, quoted_local, route_length,
                              unquoted_local)
from mailflow.errors import LookupRetry
from mailflow.header_addresses import rewrite_address_fields
from mailflow.message import HEADER_READ_LIMIT, read_header
from mailflow.model import DeliveryRequest
from mailflow.tables import Table
from mailflow.tables.search import mapped_addresses
from mailflow.transports.encode import Encoder

_QUOTED_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_NOT_OUTSIDE_QUOTES = frozenset("<> \t")  # would end the path, or start a parameter, of MAIL FROM / RCPT TO


def wire_problem(address: str) -> str | None:
    """Why `address` must not go in a MAIL FROM or RCPT TO command as it is (None: it may): a control character
    (mailflow.address.has_unsafe_characters, the rule screen_envelope applies to queued addresses), `<`, `>` or
    a blank outside quotes, or it is not `local@domain`."""
    if has_unsafe_characters(address):
        return "holds a control character"
    outside_quotes = _QUOTED_STRING.sub('""', address)
    if _NOT_OUTSIDE_QUOTES.intersection(outside_quotes):
        return "holds '<', '>' or a blank outside quotes"
    local, at, domain = outside_quotes.rpartition("@")
    if not (local and at and domain):
        return "is not local@domain"
    return None


class HeaderSwap:
    """See the module docstring."""

    def __init__(self, old_length: int, new_head: bytes) -> None:
        self._skip = old_length
        self._head = new_head

    def feed(self, data: bytes) -> bytes:
        if not self._skip and not self._head:
            return data
        taken = min(self._skip, len(data))
        self._skip -= taken
        head, self._head = self._head, b""
        return head + data[taken:]

    def flush(self) -> bytes:
        head, self._head = self._head, b""
        return head


@dataclass(frozen=True)
class WireForm:
    """See the module docstring."""

    sender: str
    recipients: dict[str, str] = field(default_factory=dict)  # queued address -> mapped, for those that change
    head: tuple[int, bytes] | None = None  # (length of the queued header section, the one sent instead)
    utf8_head: bool = False  # a header address was mapped to a UTF-8 one: the message needs SMTPUTF8 as sent
    body: Callable[[], Encoder] | None = None  # a new encoder of the queued content's body (smtp_body_checks)

    def recipient(self, addr: str) -> str:
        return self.recipients.get(addr, addr)

    def encoders(self) -> tuple[Encoder, ...]:
        body = (self.body(),) if self.body is not None else ()
        return (*body, HeaderSwap(*self.head)) if self.head is not None else body


class GenericMaps:
    """See the module docstring."""

    def __init__(self, tables: list[Table], *, delimiter: str, qualify: Callable[[str], str],
                 find_address: Callable[[list[Table], str], tuple[str, str, str] | None],
                 program: str = "smtp", log: logging.Logger | None = None) -> None:
        self._tables = tables
        self._name = f"{program}_generic_maps"  # (Postfix's parameter, as its log lines name it)
        self._log = log if log is not None else logging.getLogger(f"mailflow.{program}")
        self._delimiter = delimiter
        self._qualify = qualify
        self._find_address = find_address

    @property
    def blocking(self) -> bool:
        """A table may wait on I/O (sqlite:, unix:)."""
        return any(table.blocking for table in self._tables)

    def address(self, addr: str, queue_id: str = "") -> str:
        if not addr:
            return addr
        found = self._find_address(self._tables, addr)
        if found is None:
            return addr
        table, key, value = found
        addresses = mapped_addresses(addr, key, value, delimiter=self._delimiter, qualify=self._qualify,
                                     propagate=False)
        if not addresses:
            self._refuse(table, key, value.strip(), "holds no address", queue_id)
        if len(addresses) > 1:
            self._log.warning("%s: multi-valued %s result for %s", queue_id or "NOQUEUE", self._name, addr)
        first = addresses[0]
        if first is None:
            self._refuse(table, key, value.strip(), "is not one address", queue_id)
        problem = wire_problem(first)
        if problem is not None:
            self._refuse(table, key, first, problem, queue_id)
        return first

    def _refuse(self, table: str, key: str, result: str, problem: str, queue_id: str) -> NoReturn:
        """A result that cannot go on the wire as it is: logged, and LookupRetry (the delivery is deferred)."""
        name = printable(table)  # (an inline table's name holds its values)
        self._log.warning("%s: %s: table %s: %s: result <%s> %s", queue_id or "NOQUEUE", self._name, name,
                          printable(key), printable(result), problem)
        raise LookupRetry(f"table {name}: {printable(key)}: result <{printable(result)}> {problem}")

    def wire_form(self, request: DeliveryRequest, head: tuple[bytes, bytes] | None = None, *,
                  head_as_queued: bool = False) -> WireForm:
        mapped = partial(self.address, queue_id=request.queue_id)
        recipients = {}
        for rcpt in request.recipients:
            if (sent := mapped(rcpt.address)) != rcpt.address:
                recipients[rcpt.address] = sent
        if request.verify:
            return WireForm(mapped(request.sender), recipients)
        utf8_results: list[str] = []

        def in_header(addr: str) -> str:
            route, bare = _route_split(addr)
            if route:
                key = _route_key(route, bare)
                sent = mapped(key)
                if sent == key:
                    return addr  # no result: the address as it is, its route too
                sent = _without_route(sent)
            else:
                sent = mapped(addr)
            if sent != addr and not sent.isascii():
                utf8_results.append(sent)
            return sent

        swap = None if head_as_queued else self._head(request, in_header, head, self._log, self._name)
        return WireForm(mapped(request.sender), recipients, swap, utf8_head=bool(utf8_results))

    @staticmethod
    def _head(request: DeliveryRequest, mapped: Callable[[str], str], given: tuple[bytes, bytes] | None,
              log: logging.Logger, name: str) -> tuple[int, bytes] | None:
        """`given`: (the queued header section, the one smtp_header_checks made of it); None: read it here."""
        if given is not None:
            queued, head = given
        else:
            queued, whole = read_header(request.content, HEADER_READ_LIMIT)
            if not whole:
                log.warning("%s: header section longer than %d bytes: %s leaves its addresses as queued",
                            request.queue_id or "NOQUEUE", HEADER_READ_LIMIT, name)
                return None
            head = queued
        new_head = rewrite_address_fields(head, mapped, mapped)
        return None if new_head == queued else (len(queued), new_head)


def _route_split(addr: str) -> tuple[str, str]:
    """(`@a,@b:`, the address after it) of a header address with a source route; ("", addr) without one."""
    end = route_length(addr)
    return addr[:end], addr[end:]


def _route_key(route: str, bare: str) -> str:
    """The address Postfix's smtp_map11 looks up for a routed header address: the route is part of its internal
    form's local part (`@r.test:a b@z.test`), quoted as a whole (`"@r.test:a b"@z.test`)."""
    local, _, domain = bare.rpartition("@")
    return f"{quoted_local(route + as_internal_local(local))}@{domain}"


def _without_route(addr: str) -> str:
    """A result written as Postfix's smtp writes a header address it mapped: a route inside its local part
    (`"@r.test:a"@w.test`, from an `@domain` value) dropped (`a@w.test`)."""
    local, _, domain = addr.rpartition("@")
    inner = unquoted_local(local)
    if inner is None:
        return addr
    end = route_length(inner)
    return f"{quoted_local(inner[end:])}@{domain}" if end else addr
