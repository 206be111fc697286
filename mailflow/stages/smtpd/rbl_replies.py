"""The replies of reject_rbl_client and reject_rhsbl_*: Postfix 3.7's rbl_reject_reply (smtpd_check.c).

    Listed(rbl, what, reply_class, reason)     what a DNS list named (dns_checks.DnsChecks.rbl / .rhsbl): the list
                                               as the restriction gave it (`domain=filter` too), what was looked up
                                               (the client address, a name, a sender or recipient address), its
                                               class ("Client host", "Sender address", ...) and the list's TXT reason
    RblReplies(smtpd, server_name, tables, fit_dsn)   (`tables`: the TableCache its maps open in)
        .reply(listed, facts) -> Reply         the refusal: the rbl_reply_maps template for the list (asked with
                                               the list as written, `domain=filter` too: Postfix 3.7 asks no more;
                                               later ones ask the domain alone next), else default_rbl_reply,
                                               expanded with $rbl_code (maps_rbl_reject_code), $rbl_domain (without
                                               its filter), $rbl_what, $rbl_class, $rbl_reason and smtpd's macros;
                                               the enhanced code fitted to what is refused (`fit_dsn`: smtpd_dsn_fix)

Failure behaviour (Postfix's): a map that cannot answer is the server's fault, 451 4.3.5 Server configuration
error (logged); a map's template that cannot be expanded is logged (`bad rbl reply template for domain …`) and
default_rbl_reply used; an expansion that does not start with a 4xx or 5xx code and a space is logged (`rbl
response code configuration error: …`) and answered 450 4.7.1 Service unavailable. Nothing raises.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mailflow import status
from mailflow.errors import LookupRetry
from mailflow.rbl_reply import check_rbl_template, rbl_expanded, rbl_reply_split
from mailflow.reply_footer import FooterClient, footer_values
from mailflow.tables import TableCache, find

if TYPE_CHECKING:
    from mailflow.stages.smtpd.restrictions import Facts

log = logging.getLogger("mailflow.smtpd")


@dataclass(frozen=True)
class Listed:
    """See the module doc."""

    rbl: str
    what: str
    reply_class: str
    reason: str


class RblReplies:
    """See the module doc."""

    def __init__(self, smtpd, server_name: str, tables: TableCache, fit_dsn: Callable[[str, str], str]):
        self._maps = tables.open(smtpd.rbl_reply_maps)
        self._run = tables.run
        self._default = smtpd.default_rbl_reply
        self._code = smtpd.maps_rbl_reject_code
        self._server_name = server_name
        self._fit_dsn = fit_dsn

    async def reply(self, listed: Listed, facts: Facts) -> status.Reply:
        try:
            template = await self._template(listed.rbl)
        except LookupRetry as e:
            log.warning("rbl_reply_maps lookup error for %r: %s", listed.rbl, e.reason)
            return status.SERVER_CONFIGURATION_ERROR
        values = self._values(listed, facts)
        template = self._usable(template, listed.rbl)
        expanded = rbl_expanded(template, values)  # (a checked template: the map's by _usable, the default at load)
        parts = rbl_reply_split(expanded)
        if parts is None:
            log.warning("rbl response code configuration error: %s", expanded)
            return status.RBL_REPLY_ERROR
        code, dsn, text = parts
        return status.rbl_listed(code, self._fit_dsn(dsn, listed.reply_class), text)

    async def _template(self, rbl: str) -> str | None:
        """The map's template for the list, asked with the list as the restriction names it (`domain=filter` too)."""
        if not self._maps:
            return None
        found = await self._run(find, self._maps, [rbl])
        return None if found is None else found[2]

    def _usable(self, template: str | None, rbl: str) -> str:
        """The map's template when it can be expanded, else default_rbl_reply (checked by the configuration): a bad
        one is logged and then counts as not found, as Postfix's rbl_reject_reply sets it to 0."""
        if template is None:
            return self._default
        try:
            return check_rbl_template(template)
        except ValueError:
            log.warning("rbl_reject_reply: bad rbl reply template for domain %s: %s", rbl, template)
        return self._default

    def _values(self, listed: Listed, facts: Facts) -> dict[str, str]:
        """The macros' values: the list's, then smtpd's own (as Postfix's smtpd_expand_lookup gives them)."""
        sender = facts.sender
        client = FooterClient(facts.client, facts.client_addr, facts.client_port,
                              facts.client_name, facts.helo)
        values = footer_values(self._server_name, sender, facts.recipient or None, client)
        values.update(rbl_code=str(self._code), rbl_domain=listed.rbl.partition("=")[0], rbl_reason=listed.reason,
                      rbl_txt=listed.reason, rbl_what=listed.what, rbl_class=listed.reply_class)
        return values
