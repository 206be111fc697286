"""`[accounts]`: the account database that `mailflow account …` changes and `mailflow dovecot-config` describes
(docs/accounts.md). Nothing here is needed to run mailflow: the routing stages read the database only through
the `accounts:PATH#MAP` tables a configuration names.

    AccountsConfig

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

from pydantic import Field

from mailflow.config.base import Section


class AccountsConfig(Section):
    """The account database (SQLite). `database_file` "" means `<queue_directory>/accounts.db`."""

    database_file: str = ""
    # `mailflow account user add/passwd` refuse shorter passwords (and one equal to the address or its local part).
    password_min_length: int = Field(8, ge=1, le=1024)
