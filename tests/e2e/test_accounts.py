"""A running server and the account database (no Dovecot: tests/interop/test_accounts_dovecot.py has it): it
starts before the database exists and answers 451 4.3.0 for the hosted domains meanwhile, then sees every change
within CHECK_INTERVAL, without a restart: a new mailbox is accepted and delivered, an alias is expanded, a
removed mailbox is refused with 550 5.1.1."""
from __future__ import annotations

import asyncio

from mailflow.accounts.database import AccountDatabase
from mailflow.tables.accounts import CHECK_INTERVAL
from tests.support import eventually, rcpt_reply, send

MESSAGE = b"From: s@remote.test\r\nSubject: accounts\r\n\r\nhello\r\n"


async def test_a_running_server_follows_the_database(mailflow_server, tmp_path):
    path = tmp_path / "accounts.db"
    mf = await mailflow_server(
        mydestination=["localhost"],
        virtual_mailbox_domains=["example.test", f"accounts:{path}#domains"],
        virtual_mailbox_maps=[f"accounts:{path}#mailboxes"], virtual_alias_maps=[f"accounts:{path}#aliases"],
        virtual_mailbox_base=str(tmp_path / "vmail"))
    port = mf.smtp_addresses[0][1]
    code, text = await rcpt_reply(port, "alice@example.test")
    assert (code, text.split()[1]) == (451, "4.3.0"), text  # no database yet: try again later, not "unknown"

    db = AccountDatabase.open(path, create=True)
    db.add_domain("example.test")
    db.add_user("alice@example.test", "correct horse")
    db.add_alias("team@example.test", ["alice@example.test"])
    await asyncio.sleep(CHECK_INTERVAL)
    assert (await rcpt_reply(port, "team@example.test"))[0] == 250
    await send(port, "s@remote.test", ["team@example.test"], MESSAGE)
    new = tmp_path / "vmail" / "example.test" / "alice" / "Maildir" / "new"
    [stored] = await eventually(lambda: list(new.glob("*")) if new.is_dir() else None, timeout=10)
    assert stored.read_bytes().endswith(b"hello\n")

    db.remove_user("alice@example.test")
    db.close()
    await asyncio.sleep(CHECK_INTERVAL)
    code, text = await rcpt_reply(port, "alice@example.test")
    assert (code, text.split()[1]) == (550, "5.1.1"), text
