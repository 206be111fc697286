"""The automatic BCC recipients end to end (always_bcc, sender_bcc_maps, recipient_bcc_maps; the address each map
is asked with is tests/interop/test_auto_bcc_vs_postfix.py's subject): only mail from outside gets a copy, never a
copy local delivery forwards nor a notice made here (so an archive cannot loop), a copy that fails is not
reported to the sender (NOTIFY=NEVER: neither its failure nor its delay past delay_warning_time), a requeued
message gets its copy again, as in Postfix, a header check's BCC copies the message once (not each forwarded copy
again), and a BCC table that cannot answer refuses the message (451 4.3.0), never taken for "not found"."""
from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from tests.support import eventually, free_port, maildir_messages, queue_becomes, send


async def recipients(mf, queue_id: str) -> list[tuple[str, str]]:
    """(address, NOTIFY) of each recipient of a queued message, sorted."""
    rows = (await mf.store.recipients_of([queue_id]))[queue_id]
    return sorted((row.address, row.notify) for row in rows)


async def test_forwarded_copies_and_notices_get_no_automatic_bcc(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    home = tmp_path / "mail" / "bob"
    home.mkdir(parents=True)
    (home / ".forward").write_text("bob@elsewhere.test\n")
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", always_bcc="archive@arch.test",
                               virtual_alias_domains=["valias.test"],
                               virtual_alias_maps=["inline:{info@valias.test=ghost@local.test}"])
    port = mf.smtp_addresses[0][1]
    await send(port, "s@remote.test", ["bob@local.test"], b"Subject: forwarded\r\n\r\nx\r\n")
    await send(port, "s@remote.test", ["info@valias.test"], b"Subject: bounced\r\n\r\nx\r\n")

    await eventually(lambda: len(peer.messages) >= 4)
    await queue_becomes(mf.store, {})
    envelopes = sorted((m.mail_from, sorted(m.rcpt_tos)) for m in peer.messages)
    assert envelopes == [
        ("<>", ["s@remote.test"]),  # ghost's bounce: no archive copy of the notice
        ("s@remote.test", ["archive@arch.test"]),  # the BCC copies of the two messages from outside
        ("s@remote.test", ["archive@arch.test"]),
        ("s@remote.test", ["bob@elsewhere.test"]),  # bob's .forward: the forwarded copy has no archive copy
    ]
    assert maildir_messages(home / "Maildir") == []


async def test_a_failed_bcc_copy_is_not_reported_to_the_sender(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["archive@arch.test"] = "550 5.1.1 no such archive"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"],
                               sender_bcc_maps=["inline:{alice@local.test=archive@arch.test}"])
    await send(mf.smtp_addresses[0][1], "alice@local.test", ["r@remote.test"], b"Subject: x\r\n\r\nx\r\n")
    [message] = await eventually(lambda: peer.messages)
    assert message.rcpt_tos == ["r@remote.test"]
    await queue_becomes(mf.store, {})
    assert maildir_messages(tmp_path / "mail" / "alice" / "Maildir") == []  # no bounce to the sender
    assert [m.rcpt_tos for m in peer.messages] == [["r@remote.test"]]


async def test_a_requeued_message_gets_its_automatic_bcc_again_as_postfixs_pickup_gives_it(mailflow_server):
    # Postfix 3.7: postsuper -r of a deferred message with always_bcc queues the copy with nrcpt=3 (the BCC copy
    # pending, and the one cleanup adds again: they differ in ORCPT, so neither is a duplicate of the other)
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{free_port()}", mynetworks=["127.0.0.0/8"],
                               always_bcc="big@arch.test", queue={"minimal_backoff_time": "1h",
                                                                  "maximal_backoff_time": "1h"})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["r@remote.test"], b"Subject: x\r\n\r\nx\r\n")
    await queue_becomes(mf.store, {"deferred": 1})
    [old] = await mf.store.message_ids(queues=["deferred"])
    assert await recipients(mf, old) == [("big@arch.test", "NEVER"), ("r@remote.test", "")]

    await mf.store.requeue_messages([old], time.time())
    mf.pickup.wake(requeued=True)
    [new] = await eventually(lambda: mf.store.message_ids(queues=["incoming", "active", "deferred"]), timeout=5,
                             what="the copy of the requeued message")
    assert new != old
    assert await recipients(mf, new) == [("big@arch.test", "NEVER"), ("big@arch.test", "NEVER"),
                                         ("r@remote.test", "")]


async def test_a_header_checks_bcc_copies_the_message_once_not_each_forwarded_copy(mailflow_server, smtp_peer,
                                                                                   tmp_path):
    # Postfix's local submits a forwarded copy without CLEANUP_FLAG_FILTER (internal_mail_filter_classes, empty by
    # default): no content checks run on it, so the header check's BCC is not made again for it
    peer = await smtp_peer()
    home = tmp_path / "mail" / "bob"
    home.mkdir(parents=True)
    (home / ".forward").write_text("bob@elsewhere.test\n")
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: forward me/ BCC archive@arch.test\n")
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", checks={"header_checks": [f"regexp:{checks}"]})
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["bob@local.test"], b"Subject: forward me\r\n\r\nx\r\n")

    await eventually(lambda: len(peer.messages) >= 2)
    await queue_becomes(mf.store, {})
    assert sorted((m.mail_from, m.rcpt_tos) for m in peer.messages) == [
        ("s@remote.test", ["archive@arch.test"]),  # the header check's copy of the message as it came
        ("s@remote.test", ["bob@elsewhere.test"]),  # bob's .forward: checked no more, no second archive copy
    ]


async def test_a_bcc_copy_still_deferred_at_delay_warning_time_sends_no_delay_notice(mailflow_server, smtp_peer,
                                                                                      tmp_path):
    # NOTIFY=NEVER: the sender hears of a deferred recipient of its own (the control), never of its archive copy
    peer = await smtp_peer()
    peer.handler.rcpt_replies["archive@arch.test"] = "450 4.2.0 archive busy"
    peer.handler.rcpt_replies["slow@remote.test"] = "450 4.2.0 mailbox busy"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"],
                               sender_bcc_maps=["inline:{alice@local.test=archive@arch.test}"],
                               queue={"delay_warning_time": "1s", "minimal_backoff_time": "1s",
                                      "maximal_backoff_time": "1s"})
    port = mf.smtp_addresses[0][1]
    await send(port, "alice@local.test", ["r@remote.test"], b"Subject: archived\r\n\r\nx\r\n")
    await send(port, "bob@local.test", ["slow@remote.test"], b"Subject: control\r\n\r\nx\r\n")
    inbox = tmp_path / "mail"
    [notice] = await eventually(lambda: maildir_messages(inbox / "bob" / "Maildir"), timeout=10,
                                what="the control's delay notice")
    assert b"slow@remote.test" in notice
    await eventually(lambda: len(peer.messages) >= 1)
    assert [m.rcpt_tos for m in peer.messages] == [["r@remote.test"]]
    await asyncio.sleep(1.5)  # another backoff round past delay_warning_time
    assert maildir_messages(inbox / "alice" / "Maildir") == []
    queued = [await recipients(mf, q) for q in await mf.store.message_ids(queues=["deferred", "active", "incoming"])]
    assert any(("archive@arch.test", "NEVER") in rows for rows in queued)  # still deferred, past delay_warning_time


async def test_a_bcc_table_that_cannot_answer_refuses_the_message_451_4_3_0(mailflow_server, tmp_path):
    # never "not found": a copy that should exist is not silently lost (the client tries again)
    cf = tmp_path / "bcc.cf"
    cf.write_text(f"dbpath = {tmp_path / 'missing.db'}\nquery = SELECT bcc FROM bcc WHERE sender = '%s'\n")
    for settings in ({"recipient_bcc_maps": ["fail:bcc"]}, {"sender_bcc_maps": [f"sqlite:{cf}"]}):
        mf = await mailflow_server(**settings)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], b"Subject: x\r\n\r\nx\r\n")
        assert (refused.value.code, refused.value.message) == (451, "4.3.0 Temporary lookup failure"), settings
        assert await mf.store.counts() == {}
        await mf.stop()
