"""The EHLO keywords a session discards (discard_ehlo_keywords, discard_ehlo_keyword_address_maps): Postfix's
ehlo_discard_mask, chosen once per connection, after the PROXY header, from the client's address.

    EhloDiscards(default, maps, run)      one listener's: `default` its discard_ehlo_keywords (lower case), `maps`
                                          its discard_ehlo_keyword_address_maps (opened), `run` the table cache's
                                          way to ask them off the event loop when they block
    await discards.for_client(ip) -> (keywords, failed)
                                          the keywords the maps give for the address (unknown words skipped, as
                                          Postfix's ehlo_mask), else the default; `failed` when a table could not
                                          answer (the default then; the session refuses EHLO: protocol.py)

Failure behaviour: a table that cannot answer is logged once per connection (as Postfix's table warning) and
reported as `failed`; nothing raises.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

from mailflow.ehlo_keywords import discards_for
from mailflow.errors import LookupRetry
from mailflow.tables import Table

log = logging.getLogger("mailflow.smtpd")


class EhloDiscards:
    """See the module doc."""

    def __init__(self, default: frozenset[str], maps: list[Table] | None = None,
                 run: Callable[..., Awaitable] | None = None):
        self.default = default
        self._maps = maps or []
        self._run = run

    async def for_client(self, ip: str) -> tuple[frozenset[str], bool]:
        if not self._maps or self._run is None:
            return discards_for(self._maps, ip, self.default)
        try:
            return await self._run(discards_for, self._maps, ip, self.default)
        except LookupRetry as e:  # (the table cache's deadline passed)
            log.warning("discard_ehlo_keyword_address_maps: %s: %s", ip, e.reason)
            return self.default, True
