"""A lookup table that is slow (or could be) costs only the lookup that asks it, never the other sessions:
a pathological regexp answers at once (RE2), and a sqlite query past its deadline gets 451 4.3.0 while another
session completes a whole transaction in the meantime."""
from __future__ import annotations

import asyncio
import sqlite3
import time

from mailflow import status
from tests.support import eventually, maildir_messages, rcpt_reply, send

SLOW_QUERY = ("SELECT 'OK' FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
              "WHERE '%u' = 'slow' AND x < 1000000000) SELECT max(x) FROM c)")


async def timed(coro) -> tuple[object, float]:
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


async def test_pathological_regexp_does_not_hold_up_another_session(mailflow_server, tmp_path):
    patterns = tmp_path / "virtual.regexp"
    patterns.write_text("/^(a+)+$/ alice@local.test\n/^(x|xx)+y@/ bob@local.test\n")
    mf = await mailflow_server(virtual_alias_maps=[f"regexp:{patterns}"])
    port = mf.smtp_addresses[0][1]
    evil = rcpt_reply(port, "a" * 60 + "b@local.test")  # exponential for a backtracking engine
    normal = send(port, "s@remote.test", ["alice@local.test"], b"Subject: normal\r\n\r\nhello\r\n")
    ((code, _), evil_time), (_, normal_time) = await asyncio.wait_for(
        asyncio.gather(timed(evil), timed(normal)), 10)
    assert code == 550  # matched nothing, and a@local.test-like users are unknown here
    assert evil_time < 2 and normal_time < 2
    assert (await rcpt_reply(port, "x" * 60 + "y@local.test"))[0] == 250  # the table does answer


async def test_slow_sqlite_lookup_is_451_while_another_session_completes(mailflow_server, tmp_path):
    db = tmp_path / "relay.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    cf = tmp_path / "relay.cf"
    cf.write_text(f"dbpath = {db}\nquery = {SLOW_QUERY}\ntimeout = 1.5\n")
    mf = await mailflow_server(relay_recipient_maps=[f"sqlite:{cf}"])
    port = mf.smtp_addresses[0][1]
    slow = asyncio.ensure_future(timed(rcpt_reply(port, "slow@relay.test")))
    await eventually(lambda: any(session.envelope.mail_from for session in mf.smtpd.sessions))  # RCPT is next
    _, normal_time = await asyncio.wait_for(
        timed(send(port, "s@remote.test", ["alice@local.test"], b"Subject: normal\r\n\r\nhello\r\n")), 10)
    assert not slow.done(), "the other session finished first"
    reply, slow_time = await asyncio.wait_for(slow, 10)
    assert reply == status.lookup_failed("slow@relay.test")
    assert normal_time < 1.0 and 1.0 < slow_time < 5
    assert (await rcpt_reply(port, "quick@relay.test"))[0] == 250
    await eventually(lambda: len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 1)
