"""The command filter smtpd and postscreen's dummy engine share (smtpd_command_filter, postscreen_command_filter;
Postfix's smtpd.c and postscreen_smtpd.c): a command line looked up in each table in turn, the first answer in its
place. Postscreen asks its EHLO discard maps the same way (the key: the client's address).

    await replacement(tables, key, run, answered=None) -> (value, failure)
        value: the first answer of `tables` for `key` (None: none answered); failure: (the table's name, its
        LookupRetry) when a table could not answer before one did (value None then). `run(fn, *args)` asks a table
        off the event loop (None: in place). `answered(name)` is told of each table that answered (a value or
        none), in turn: the tables after the one with the value are not asked, so not told. Each caller keeps its
        own key (smtpd's, postscreen's UTF-8 rule), action on a failure and log lines.

Failure behaviour: nothing raises for a table that cannot answer; it is reported as `failure`.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from mailflow.errors import LookupRetry
from mailflow.tables import Table


async def replacement(tables: list[Table], key: str, run: Callable[..., Awaitable] | None,
                      answered: Callable[[str], None] | None = None
                      ) -> tuple[str | None, tuple[str, LookupRetry] | None]:
    for table in tables:
        try:
            value = await run(table.lookup, key) if run is not None else table.lookup(key)
        except LookupRetry as error:
            return None, (table.name, error)
        if answered is not None:
            answered(table.name)
        if value is not None:
            return value, None
    return None, None
