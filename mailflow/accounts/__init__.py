"""The account database: hosted domains, mailboxes (address, password hash, quota, enabled), aliases (catch-all
`@domain` included) and per-mailbox sender logins, in one SQLite file that mailflow's lookup tables and Dovecot
(sql passdb/userdb on the same file) both read. docs/accounts.md tells the whole story.

The package, split by job (importing it loads nothing: each user imports the module it needs):
    schema.py     the tables (DDL, user_version), how a database is opened for reading, and the maps the routing
                  stages read (`MAPS`, `lookup(conn, map, key)`): domains, mailboxes, aliases, passwords,
                  senders, quotas; read by mailflow.tables.accounts (`accounts:PATH#MAP`)
    database.py   AccountDatabase: the changes `mailflow account …` makes, with their checks and errors
    dovecot.py    the Dovecot configuration for the database (`mailflow dovecot-config`), from plain values

A leaf: it imports the standard library, mailflow.address and mailflow.passwords only (tests/unit/test_layering.py).
"""
