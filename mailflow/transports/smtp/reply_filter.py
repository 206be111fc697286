"""smtp_reply_filter ([smtp] reply_filter): each line of a server's reply rewritten by a table before it is parsed
(Postfix's smtp_chat_resp_filter in smtp_chat.c), to work around a broken server or to inject faults. Use with care:
a reply rewritten from 5xx to 4xx defers mail for good.

    ReplyFilter(tables, log)                        (`log`: the client's logger, chat.client_log)
      .for_peer(relay) -> Callable[[bytes], bytes]   the ReplyParser's line filter for one session with `relay`
                                                    (host[ip]:port)

The key: each line of a reply (of a multi-line one each line alone) as received, without its line end, cut to the
parser's MAX_LINE_LENGTH, every non-printable character as '?' (Postfix printable(): the key Postfix looks up). A
value replaces the line (the reply parser cuts it to MAX_LINE_LENGTH), logged as Postfix's smtp does: `host[ip]:port:
replacing server reply "old" with "new"`. A table that cannot answer raises ReplyFilterError (`table T lookup error
for LINE`); the session (chat) logs it under the queue id and ends with Postfix's SMTP_ERR_DATA, 4.3.0 "local data
error while talking to h[ip]".
"""
from __future__ import annotations

import logging
from typing import Callable

from mailflow.errors import LookupRetry
from mailflow.logs import printable
from mailflow.tables import Table
from mailflow.transports.smtp.reply import ReplyFilterError


class ReplyFilter:
    """See the module docstring."""

    def __init__(self, tables: list[Table], log: logging.Logger) -> None:
        self._tables = tables
        self._log = log

    def for_peer(self, relay: str) -> Callable[[bytes], bytes]:
        def line_filter(line: bytes) -> bytes:
            key = printable(line.decode("utf-8", "replace"))
            value = self._lookup(key)
            if value is None:
                return line
            self._log.info('%s: replacing server reply "%s" with "%s"', relay, key, value)
            return value.encode("utf-8")
        return line_filter

    def _lookup(self, key: str) -> str | None:
        for table in self._tables:
            try:
                value = table.lookup(key)
            except LookupRetry:
                raise ReplyFilterError(f"table {printable(table.name)} lookup error for {key}") from None
            if value is not None:
                return value
        return None
