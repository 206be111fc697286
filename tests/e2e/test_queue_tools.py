"""`mailflow queue …` against a running server: the CLI runs as a subprocess on the same queue database
while the server (in-process, on the test's loop) keeps delivering, deferring and polling the generation.

Two ways to keep mail queued:
- `dead_relay`: relayhost is a port where nothing listens; every attempt defers (connection refused) and is
  retried every 1-2 s (the test config's backoff), so "the server does not deliver it" means something.
- `busy_peer`: a capture peer answers 450 to the RCPTs we name (a per-recipient deferral: the site stays
  healthy) and the backoff is an hour, so only an operator's flush/requeue/release makes the mail due.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import sys
import time

import aiohttp
import pytest

from mailflow.config import config_from_dict
from mailflow.content import Content
from mailflow.model import Recipient
from mailflow.store import NewMessage, Store
from mailflow import status
from tests.support import ScanWatch, SmtpClient, base_settings, eventually, free_port, merged, send
from tests.support.maillog import mail_log_file

HOUR = {"queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}
BUSY = "450 4.2.1 Mailbox busy, try later"


async def cli(config, *args: str, stdin: bytes | None = None, timeout: float = 20) -> tuple[int, str, str]:
    """`python -m mailflow ARGS -c CONFIG` as a child process; the server on this loop keeps running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailflow", *args, "-c", str(config),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"mailflow {' '.join(args)} did not finish within {timeout}s")
    return proc.returncode, out.decode(), err.decode()


async def queue(config, *args: str, **kwargs) -> tuple[int, str, str]:
    return await cli(config, "queue", *args, **kwargs)


def message(subject: str, body: str = "hello from the queue tools test") -> bytes:
    return f"Subject: {subject}\r\nX-Test: yes\r\n\r\n{body}\r\n".encode()


async def submit(mf, sender: str, rcpts: list[str], subject: str = "test") -> str:
    refused, reply = await send(mf.smtp_addresses[0][1], sender, rcpts, message(subject))
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def deferred_reason(mf, qid: str, timeout: float = 10) -> str:
    """Wait until the message has been tried and deferred; its recipient's last reason."""
    async def reason():
        rows = await mf.store.recipients(qid)
        detail = await mf.store.message_detail(qid)
        return rows[0][3] if rows and rows[0][3] and detail and detail.queue == "deferred" else ""

    return await eventually(reason, timeout=timeout, step=0.05, what=f"{qid} deferred with a reason")


async def deferred_mail(mf, peer, rcpts: list[str]) -> list[str]:
    """One message to each of `rcpts`, each deferred by the peer's 450 (which stays until the caller clears
    `peer.handler.rcpt_replies`); their queue ids."""
    for rcpt in rcpts:
        peer.handler.rcpt_replies[rcpt] = BUSY
    ids = [await submit(mf, "someone@remote.test", [rcpt]) for rcpt in rcpts]
    for qid in ids:
        await deferred_reason(mf, qid)
    return ids


async def queue_state(mf, qid: str) -> str | None:
    detail = await mf.store.message_detail(qid)
    return detail.queue if detail else None


@pytest.fixture
async def dead_relay(mailflow_server, write_config, tmp_path):
    unused_port = free_port()
    settings = {"relayhost": f"[127.0.0.1]:{unused_port}"}
    mf = await mailflow_server(**settings)
    return mf, write_config(tmp_path / "mailflow.toml", **settings), unused_port


@pytest.fixture
async def busy_peer(mailflow_server, write_config, smtp_peer, tmp_path):
    peer = await smtp_peer()
    settings = {"relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": ["127.0.0.0/8"], "queue": HOUR}
    mf = await mailflow_server(**settings)
    return mf, write_config(tmp_path / "mailflow.toml", **settings), peer


# ---------------------------------------------------------------------------------------------- list, show


async def test_list_shows_deferred_mail_with_its_reason(dead_relay):
    mf, config, _ = dead_relay
    qid = await submit(mf, "someone@remote.test", ["bob@relay.test"])
    reason = await deferred_reason(mf, qid)
    assert "127.0.0.1" in reason

    rc, out, err = await queue(config, "list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------"
    entry = next(line for line in lines if line.startswith(qid))
    # postqueue's long-id layout; "*" while an attempt runs
    assert re.fullmatch(rf"{qid}[ *] +\d+ \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d someone@remote\.test", entry), entry
    assert f"({reason})" in out
    assert lines[-1] == "-- 0 Kbytes in 1 Request." and lines[-2] == ""
    recipient = lines[lines.index(next(line for line in lines if line.lstrip().startswith("("))) + 1]
    assert recipient.strip() == "bob@relay.test" and recipient.index("bob") == entry.index("someone")

    rc, out, _ = await queue(config, "list", "--json")
    [item] = json.loads(out)
    assert item["id"] == qid and item["sender"] == "someone@remote.test" and item["queue"] in ("deferred", "active")
    [rcpt] = item["recipients"]
    assert rcpt["address"] == "bob@relay.test" and rcpt["status"] == "pending"
    assert rcpt["dsn"].startswith("4.") and "127.0.0.1" in rcpt["reason"]

    rc, alias, _ = await cli(config, "mailq")  # the alias prints the same layout
    assert rc == 0 and alias.splitlines()[0] == lines[0] and qid in alias


async def test_show_prints_envelope_recipients_headers_and_body(dead_relay):
    mf, config, _ = dead_relay
    qid = await submit(mf, "someone@remote.test", ["bob@relay.test", "carol@relay.test"], subject="inspect me")
    await deferred_reason(mf, qid)

    rc, out, err = await queue(config, "show", qid)
    assert rc == 0, err
    assert out.startswith(f"*** ENVELOPE RECORDS deferred/{qid} ***\n") or "active/" in out.splitlines()[0]
    for expected in (f"queue_id:       {qid}", "sender:         someone@remote.test", "client:         ",
                     "recipient:      bob@relay.test", "recipient:      carol@relay.test", "  status:       pending 4.",
                     "  reason:       ", "*** MESSAGE CONTENTS ", "\nSubject: inspect me\n", "\nX-Test: yes\n",
                     "\n\nhello from the queue tools test\n", "*** MESSAGE FILE END "):
        assert expected in out, expected
    assert f"with ESMTP id {qid}" in out  # the Received header cleanup added

    rc, out, _ = await queue(config, "show", qid, "--headers-only")
    assert "Subject: inspect me" in out and "hello from the queue tools test" not in out

    rc, out, _ = await queue(config, "show", qid, "--json")
    shown = json.loads(out)
    assert shown["id"] == qid and shown["attempts"] >= 1 and shown["client"]
    assert [r["address"] for r in shown["recipients"]] == ["bob@relay.test", "carol@relay.test"]
    assert "Subject: inspect me" in shown["headers"] and shown["body"] == "hello from the queue tools test\n"

    rc, out, err = await queue(config, "show", "0123456789ABCDEF")
    assert rc == 1 and "0123456789ABCDEF: no such message in the queue" in err


async def test_show_of_a_corrupt_entry_without_content_says_so_and_fails_when_its_text_is_asked_for(busy_peer):
    """postcat exits 1 on a damaged queue file ("fatal: record read error") after what it could print: `show -b ID
    > body` printed nothing and exited 0, an empty body file without a word. The envelope alone still shows (0),
    and the JSON says it with its null headers and body."""
    mf, config, _ = busy_peer
    await mf.store.insert(NewMessage("LOST1", "someone@remote.test", time.time(), Content((message("lost"),)),
                                     (Recipient(0, "bob@relay.test", "bob@relay.test"),), queue="corrupt"))
    await mf.store._committer.write([("DELETE FROM content WHERE message_id = ?", [("LOST1",)])])
    missing = "mailflow queue show: LOST1: the message content is missing (a corrupt entry)\n"
    for parts in (["-b"], ["-h"], ["-bh"]):
        assert await queue(config, "show", "LOST1", *parts) == (1, "", missing), parts
    rc, out, err = await queue(config, "show", "LOST1")
    assert (rc, err) == (1, missing) and out.startswith("*** ENVELOPE RECORDS corrupt/LOST1 ***\n")
    assert out.endswith("*** MESSAGE CONTENTS corrupt/LOST1: missing (a corrupt entry) ***\n")
    rc, out, err = await queue(config, "show", "LOST1", "-e")
    assert (rc, err) == (0, "") and "recipient:      bob@relay.test" in out
    rc, out, err = await queue(config, "show", "LOST1", "--json")
    assert (rc, err) == (0, "") and (json.loads(out)["headers"], json.loads(out)["body"]) == (None, None)


# ---------------------------------------------------------------------------------------------- changes


async def test_hold_stops_delivery_until_release_and_flush(dead_relay, smtp_peer):
    mf, config, relay_port = dead_relay
    qid = await submit(mf, "someone@remote.test", ["bob@relay.test"])
    await deferred_reason(mf, qid)
    retry_at = (await mf.store.message_detail(qid)).next_attempt

    rc, out, err = await queue(config, "hold", qid)
    assert (rc, out) == (0, "hold: 1 message\n"), err
    assert await queue_state(mf, qid) == "hold"
    rc, out, _ = await queue(config, "list")
    assert f"{qid}!" in out

    peer = await smtp_peer(port=relay_port)  # the relay answers now: only the hold stops delivery
    scans = ScanWatch(mf.store)
    await scans.scan_after(retry_at)  # a queue run after the retry was due passed it over
    assert qid not in scans.found and peer.messages == [] and await queue_state(mf, qid) == "hold"
    rc, out, _ = await queue(config, "flush")
    assert out == "flush: 0 messages\n"  # flush does not touch held mail

    rc, out, _ = await queue(config, "release", qid)
    assert out == "release: 1 message\n"
    rc, out, _ = await queue(config, "flush")
    assert rc == 0 and out.startswith("flush: ")  # 0 or 1: qmgr may already have taken it
    await eventually(lambda: peer.messages, timeout=5, what="released mail delivered")
    assert peer.messages[0].rcpt_tos == ["bob@relay.test"]
    assert await _gone(mf, qid)


async def _gone(mf, qid: str, timeout: float = 5) -> bool:
    async def gone() -> bool:
        return await queue_state(mf, qid) is None

    return await eventually(gone, timeout=timeout, step=0.05, what=f"{qid} left the queue")


async def test_flush_makes_deferred_mail_due_now(busy_peer):
    mf, config, peer = busy_peer
    peer.handler.rcpt_replies["late@relay.test"] = BUSY
    qid = await submit(mf, "someone@remote.test", ["late@relay.test"])
    reason = await deferred_reason(mf, qid)
    assert "450 4.2.1 Mailbox busy" in reason

    peer.handler.rcpt_replies.clear()
    scans = ScanWatch(mf.store)
    await scans.scan_after(time.time())  # the retry is an hour away: a queue run now passes it over
    assert qid not in scans.found and peer.messages == []
    rc, out, err = await queue(config, "flush")
    assert (rc, out) == (0, "flush: 1 message\n"), err
    await eventually(lambda: peer.messages, timeout=5, what="flushed mail delivered")
    assert await _gone(mf, qid)


async def test_etrn_makes_the_deferred_mail_of_a_relay_domain_due_now(mailflow_server, smtp_peer):
    """ETRN (RFC 1985) is Postfix's fast flush for relay_domains: that site's deferred mail is retried now, the
    rest waits for its time; a site that is not a relay domain gets 459."""
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"], queue=HOUR,
                               relay_domains=["relay.test"])
    flushed, waiting = await deferred_mail(mf, peer, ["late@sub.relay.test", "other@elsewhere.test"])
    peer.handler.rcpt_replies.clear()

    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert "ETRN" in (await client.cmd("EHLO client.test")).lines
    assert await client.cmd("ETRN elsewhere.test") == status.etrn_refused("elsewhere.test")
    assert await client.cmd("ETRN sub.relay.test") == status.ETRN_STARTED
    await client.close()
    await eventually(lambda: peer.messages, timeout=5, what="the relay domain's mail delivered")
    assert await _gone(mf, flushed)
    assert await queue_state(mf, waiting) == "deferred" and len(peer.messages) == 1


async def test_etrns_for_a_site_whose_flush_is_under_way_join_it(mailflow_server):
    """Clients repeating ETRN for one site cost one pass over the queue (each still gets its 250)."""
    mf = await mailflow_server(relay_domains=["relay.test"], mynetworks=["127.0.0.0/8"])
    passes, release = [], asyncio.Event()
    selecting = mf.store.message_ids

    async def slow_selection(**selection):
        passes.append(selection["after"])
        await release.wait()
        return await selecting(**selection)
    mf.store.message_ids = slow_selection
    clients = [await SmtpClient.connect(mf.smtp_addresses[0][1]) for _ in range(3)]
    for c in clients:
        await c.cmd("EHLO client.test")
    replies = [asyncio.ensure_future(c.cmd("ETRN relay.test")) for c in clients]
    await eventually(lambda: passes, timeout=5, what="the flush started")
    await asyncio.sleep(0.2)  # (the other two ETRNs have arrived and are waiting)
    release.set()
    assert [await r for r in replies] == [status.ETRN_STARTED] * 3
    assert passes == [""]  # one pass, which found nothing deferred
    for c in clients:
        await c.close()


async def test_etrn_when_the_queue_cannot_be_changed_says_458_and_the_session_goes_on(mailflow_server):
    mf = await mailflow_server(relay_domains=["relay.test"], mynetworks=["127.0.0.0/8"])

    async def failing(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")
    mf.store.flush_messages = failing
    later = time.time() + 3600  # (arrival and first attempt: not due, qmgr leaves it deferred)
    await mf.store.insert(NewMessage("ETRN1", "s@remote.test", later, Content((b"Subject: x\r\n\r\nx\r\n",)),
                                     (Recipient(0, "r@relay.test", "r@relay.test"),), queue="deferred"))
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await client.cmd("EHLO client.test")
    assert await client.cmd("ETRN relay.test") == status.ETRN_FAILED
    assert (await client.cmd("NOOP")).code == 250
    await client.close()


async def test_all_followed_by_a_queue_name_takes_that_queue_only(busy_peer):
    """`postsuper -d ALL deferred`, `postsuper -H ALL deferred` (nothing: only held mail is released)."""
    mf, config, peer = busy_peer
    kept, gone = await deferred_mail(mf, peer, ["keep@relay.test", "drop@relay.test"])
    assert (await queue(config, "hold", kept))[1] == "hold: 1 message\n"
    assert await queue(config, "release", "ALL", "deferred") == (0, "release: 0 messages\n", "")
    assert await queue(config, "delete", "ALL", "deferred") == (0, "delete: 1 message\n", "")
    assert await queue_state(mf, gone) is None and await queue_state(mf, kept) == "hold"
    rc, out, _ = await cli(config, "mailq", "ALL", "hold")
    assert f"{kept}!" in out and out.endswith("-- 0 Kbytes in 1 Request.\n")


async def test_requeue_copies_deferred_and_held_mail_under_new_queue_ids(busy_peer):
    mf, config, peer = busy_peer
    first, second = await deferred_mail(mf, peer, ["one@relay.test", "two@relay.test"])
    rc, out, _ = await queue(config, "hold", second)
    assert out == "hold: 1 message\n"

    peer.handler.rcpt_replies.clear()
    rc, out, err = await queue(config, "requeue", "ALL")
    assert (rc, out) == (0, "requeue: 2 messages\n"), err
    await eventually(lambda: len(peer.messages) == 2, timeout=5, what="requeued mail delivered")
    assert sorted(m.rcpt_tos[0] for m in peer.messages) == ["one@relay.test", "two@relay.test"]
    ids = [re.search(rb"\tid ([0-9A-F]+);", m.content)[1].decode() for m in peer.messages]  # pickup's Received
    assert not {first, second} & set(ids) and await mf.store.counts() == {}


async def test_requeued_smtp_mail_with_an_8bit_subject_is_not_made_smtputf8(busy_peer):
    """A client's message with a raw UTF-8 Subject, not SMTPUTF8 (the autodetect is for sendmail's mail by
    default), deferred and requeued, goes to the peer without SMTPUTF8 as it would have first: the copy keeps
    the SMTPUTF8 it was stored with, as Postfix's pickup runs no autodetect on requeued mail (MAIL_IS_REQUEUED).
    It was taken for a local submission and returned 5.6.7."""
    mf, config, peer = busy_peer
    peer.handler.rcpt_replies["bob@relay.test"] = BUSY
    refused, reply = await send(mf.smtp_addresses[0][1], "someone@remote.test", ["bob@relay.test"],
                                "Subject: caf\u00e9\r\n\r\nhi\r\n".encode())
    assert refused == {}, reply
    await deferred_reason(mf, reply.rsplit(" ", 1)[1])
    peer.handler.rcpt_replies.clear()
    assert await queue(config, "requeue", "ALL") == (0, "requeue: 1 message\n", "")
    [got] = await eventually(lambda: peer.messages, timeout=20, what="the requeued message (or its bounce)")
    assert got.rcpt_tos == ["bob@relay.test"] and not got.smtputf8
    assert b"Subject: caf\xc3\xa9\r\n" in got.content


async def test_old_mail_requeued_is_tried_again_for_a_whole_lifetime_not_returned(busy_peer, tmp_path):
    """postsuper -r resets the expiration schedule (Postfix HISTORY 20060313): cleanup keeps the first arrival
    (delay=, the listings) but writes a new create_time, which qmgr's queue lifetime and backoff count from. A
    message older than maximal_queue_lifetime, requeued and deferred again, stays queued; it is not returned to its
    sender (`status=expired`) at its first attempt."""
    mf, config, peer = busy_peer
    arrival = time.time() - 10 * 86400  # twice the default lifetime of 5 days
    await mf.store.insert(NewMessage("OLD1", "someone@remote.test", arrival, Content((message("old"),)),
                                     (Recipient(0, "late@relay.test", "late@relay.test"),), queue="hold"))
    peer.handler.rcpt_replies["late@relay.test"] = BUSY
    log_file = tmp_path / "server.log"
    with mail_log_file(log_file):
        rc, out, err = await queue(config, "requeue", "ALL")
        assert (rc, out) == (0, "requeue: 1 message\n"), err
        [new] = await eventually(lambda: mf.store.message_ids(queues=["deferred"]), timeout=5,
                                 what="the copy deferred")
        await eventually(lambda: not mf.qmgr.active_count, timeout=5, what="the attempt over")
    assert await mf.store.counts() == {"deferred": 1} and peer.messages == []  # kept; no notice to the sender
    detail = await mf.store.message_detail(new)
    assert detail.arrival == arrival  # the first arrival, for delay= and the listings
    assert detail.next_attempt - time.time() > 1800  # the backoff of a new message (1h here), not of an old one
    assert "status=expired" not in log_file.read_text()
    # `queue show` names both times, as postcat names the arrival_time and create_time of every queue file
    rc, out, err = await queue(config, "show", new, "--headers-only")
    assert rc == 0, err
    shown = dict(line.split(":", 1) for line in out.splitlines() if line.startswith(("arrival_time:", "create_time:")))
    assert shown["arrival_time"].strip().endswith("(10d00h ago)") and shown["create_time"].strip().endswith("s ago)")
    rc, out, err = await queue(config, "show", new, "--headers-only", "--json")
    as_json = json.loads(out)
    assert (as_json["arrival"], as_json["created"]) == (arrival, detail.created) and time.time() - detail.created < 60


async def test_requeued_mail_with_no_pending_recipient_left_is_removed_not_copied(busy_peer, caplog):
    """Its recipients were all delivered (a stop came before the end of the attempt that removes it): Postfix's
    cleanup refuses a copy without recipients and pickup removes the file (pickup.c: 'This can happen with
    postsuper -r when a message is already delivered'). No `nrcpt=0` copy is made."""
    mf, config, peer = busy_peer
    await mf.store.insert(NewMessage("DONE1", "someone@remote.test", time.time(), Content((message("done"),)),
                                     (Recipient(0, "sent@relay.test", "sent@relay.test"),), queue="hold"))
    await mf.store._committer.write([("UPDATE recipient SET status = 'sent' WHERE message_id = ?", [("DONE1",)])])
    copies, resubmit = [], mf._cleanup.resubmit

    async def copied(requeued, sub):
        copies.append(await resubmit(requeued, sub))
        return copies[-1]
    mf._cleanup.resubmit = copied
    rc, out, err = await queue(config, "requeue", "ALL")
    assert (rc, out) == (0, "requeue: 1 message\n"), err

    async def empty() -> bool:
        return await mf.store.counts() == {}
    await eventually(empty, timeout=5, what="the requeued message removed")
    assert copies == [] and peer.messages == []
    assert "pickup: requeued DONE1: from=<someone@remote.test>: no recipients specified" in caplog.text


@pytest.mark.parametrize("held_first", [False, True], ids=["active", "held-while-active"])
async def test_an_active_message_requeued_is_copied_once_its_attempt_is_over(busy_peer, held_first):
    """Postfix's postsuper -r moves an active queue file too, racing the delivery under way. mailflow marks the
    message and copies it when the attempt ends: the recipient delivered meanwhile is not sent again, the one
    deferred is in the copy. The same for one held while active, then requeued (held, it is requeued at once,
    but pickup copies nothing qmgr still has in hand)."""
    mf, config, peer = busy_peer
    gate, at_data = asyncio.Event(), asyncio.Event()
    deliver = peer.handler.handle_DATA

    async def held_at_data(server, session, envelope):
        at_data.set()
        await gate.wait()
        return await deliver(server, session, envelope)

    peer.handler.handle_DATA = held_at_data
    peer.handler.rcpt_replies["stuck@relay.test"] = BUSY
    old = await submit(mf, "someone@remote.test", ["done@relay.test", "stuck@relay.test"])
    await asyncio.wait_for(at_data.wait(), 5)
    if held_first:
        assert (await queue(config, "hold", old))[1] == "hold: 1 message\n"
    rc, out, err = await queue(config, "requeue", old)
    assert (rc, out) == (0, "requeue: 1 message\n"), err
    await asyncio.sleep(0.3)  # pickup was woken: it must not copy a message whose delivery is under way
    assert await mf.store.counts() == {"maildrop" if held_first else "active": 1}
    gate.set()
    await eventually(lambda: mf.store.message_ids(queues=["deferred"]), timeout=5, what="the copy deferred")
    [new] = await mf.store.message_ids(queues=["deferred"])
    assert new != old and await queue_state(mf, old) is None and await mf.store.counts() == {"deferred": 1}
    assert [r.address for r in (await mf.store.recipients_of([new]))[new]] == ["stuck@relay.test"]
    assert [m.rcpt_tos for m in peer.messages] == [["done@relay.test"]]


async def test_mail_requeued_while_no_server_runs_is_copied_when_one_starts(mailflow_server, write_config,
                                                                           smtp_peer, tmp_path):
    """As Postfix's maildrop waits for pickup: the command only moves the mail to the maildrop state; the next
    server's pickup copies it at its start."""
    peer = await smtp_peer()
    settings = {"relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": ["127.0.0.0/8"], "queue": HOUR}
    config = write_config(tmp_path / "mailflow.toml", **settings)
    mf = await mailflow_server(**settings)
    [old] = await deferred_mail(mf, peer, ["later@relay.test"])
    await mf.stop()
    rc, out, err = await queue(config, "requeue", old)
    assert (rc, out) == (0, "requeue: 1 message\n"), err
    rc, out, _ = await queue(config, "list")
    assert re.search(rf"^{old} ", out, re.M), out  # listed, in the maildrop state

    peer.handler.rcpt_replies.clear()
    mf = await mailflow_server(**settings)
    await eventually(lambda: len(peer.messages) == 1, timeout=5, what="the copy delivered")
    assert re.search(rb"\tid ([0-9A-F]+);", peer.messages[0].content)[1].decode() != old
    assert await queue_state(mf, old) is None


async def test_a_damaged_row_in_the_maildrop_queue_is_set_aside_as_corrupt_with_one_warning(
        mailflow_server, write_config, smtp_peer, tmp_path, caplog):
    """Requeued mail whose rows were edited by hand (a time that is none, text that is not UTF-8, a recipient's
    status no code writes) is not copied from stand-in values, nor tried again at every scan: pickup moves it to
    the corrupt queue with one warning naming it and what is wrong, as qmgr sets aside damaged rows; the sound
    message beside it is copied and delivered."""
    peer = await smtp_peer()
    settings = {"relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": ["127.0.0.0/8"],
                "queue": HOUR, "sendmail": {"pickup_interval": 0.2}}
    from mailflow.store import Store

    db = tmp_path / "queue" / "queue.db"
    db.parent.mkdir(exist_ok=True)
    store = await Store.open(db)
    ids = [f"{'0' * 12}{letter * 4}" for letter in "ABCD"]
    for qid in ids:
        await store.insert(NewMessage(qid, "s@remote.test", time.time(), Content.of(message(qid)),
                                         (Recipient(0, "r@relay.test", "r@relay.test"),), queue="maildrop"))
    sound, late, odd_sender, odd_status = ids
    damage = {late: "arrival is 'x', not a time", odd_sender: "sender is b'\\xffs@remote.test', not text",
              odd_status: "recipient r@relay.test: status is 'odd', not pending, sent or bounced"}
    await store.close()
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA ignore_check_constraints = 1")
        con.execute("UPDATE message SET arrival = 'x' WHERE id = ?", (late,))
        con.execute("UPDATE message SET sender = CAST(x'ff734072656d6f74652e74657374' AS TEXT) WHERE id = ?",
                    (odd_sender,))
        con.execute("UPDATE recipient SET status = 'odd' WHERE message_id = ?", (odd_status,))
    mf = await mailflow_server(**settings)
    await eventually(lambda: len(peer.messages) == 1, timeout=5, what="the sound message copied and delivered")
    await eventually(lambda: mf.store.message_ids(queues=["corrupt"]), timeout=5, what="the damaged ones set aside")
    await asyncio.sleep(1)  # several pickup scans
    assert sorted(await mf.store.message_ids(queues=["corrupt"])) == sorted(damage)
    assert await mf.store.message_ids(queues=["maildrop"]) == [] and await queue_state(mf, sound) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "pickup" in r.getMessage()]
    assert sorted(warnings) == sorted(f"pickup: requeued {qid}: damaged queue row: {what}; moved to the corrupt queue"
                                      for qid, what in damage.items()), warnings


async def test_a_copy_cleanup_refuses_for_good_leaves_the_message_on_hold(busy_peer, caplog):
    """The copy gets one Received header more (pickup's): past hopcount_limit cleanup refuses it (5.4.0). The
    message is not lost: it goes on hold, logged."""
    mf, config, peer = busy_peer
    peer.handler.rcpt_replies["far@relay.test"] = BUSY
    hops = "".join(f"Received: from hop{i}.test by hop{i}.test; Sat, 5 Dec 2026 10:00:00 +0000\r\n"
                   for i in range(mf.config.hopcount_limit - 2))  # with this host's: one short of the limit
    refused, reply = await send(mf.smtp_addresses[0][1], "someone@remote.test", ["far@relay.test"],
                                f"{hops}Subject: far\r\n\r\nbody\r\n".encode())
    old = reply.rsplit(" ", 1)[1]
    await deferred_reason(mf, old)
    rc, out, err = await queue(config, "requeue", old)
    assert (rc, out) == (0, "requeue: 1 message\n"), err
    async def held() -> bool:
        return await queue_state(mf, old) == "hold"

    await eventually(held, timeout=5, what="the message on hold")
    assert await mf.store.counts() == {"hold": 1}
    assert f"pickup: requeued {old}: from=<someone@remote.test>: refused: 5.4.0" in caplog.text
    assert peer.messages == []


async def test_requeue_after_a_virtual_alias_change_sends_the_undelivered_recipients_to_the_new_target(
        busy_peer, tmp_path):
    """postsuper -r after a map change: the message goes through cleanup again, as Postfix's pickup hands it over
    (seen with a private Postfix 3.7.11): a new queue id (the old one is gone, with no `removed` line), the
    virtual alias expansion of now applied to the recipients still pending (the one delivered is not sent again),
    each keeping its original, the first arrival time kept, and pickup's Received header on top. The log says
    `OLD: requeued`, then `NEW: uid=N from=<sender> orig_id=OLD`, `NEW: message-id=...` and qmgr's `from=` line
    counting the pending recipients only."""
    mf, config, peer = busy_peer
    log_file = tmp_path / "server.log"
    with mail_log_file(log_file):
        peer.handler.rcpt_replies["stuck@relay.test"] = BUSY
        old = await submit(mf, "someone@remote.test", ["done@relay.test", "stuck@relay.test"])
        await deferred_reason(mf, old)
        assert [m.rcpt_tos for m in peer.messages] == [["done@relay.test"]]
        arrival = (await mf.store.message_detail(old)).arrival

        settings = {"relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": ["127.0.0.0/8"], "queue": HOUR,
                    "virtual_alias_maps": ["inline:{stuck@relay.test=moved@relay.test}"]}
        await mf.reload(config_from_dict(merged(base_settings(tmp_path), settings)))
        peer.handler.rcpt_replies["moved@relay.test"] = BUSY  # kept queued, to look at the copy
        rc, out, err = await queue(config, "requeue", old)
        assert (rc, out) == (0, "requeue: 1 message\n"), err
        new = await eventually(lambda: mf.store.message_ids(queues=["deferred"]), timeout=5, what="the copy deferred")
        [new] = new
        detail = await mf.store.message_detail(new)
        assert new != old and await queue_state(mf, old) is None
        assert detail.arrival == arrival  # the first arrival: the queue lifetime still counts from it
        [rcpt] = (await mf.store.recipients_of([new]))[new]
        assert (rcpt.address, rcpt.original) == ("moved@relay.test", "stuck@relay.test")

        peer.handler.rcpt_replies.clear()
        assert (await queue(config, "flush"))[0] == 0
        await eventually(lambda: len(peer.messages) == 2, timeout=5, what="the copy delivered")
        await eventually(lambda: not mf.qmgr.active_count, timeout=5, what="the copy finished")
    copy = peer.messages[1]
    assert copy.rcpt_tos == ["moved@relay.test"]  # done@relay.test, delivered before, is not sent again
    assert re.match(rb"Received: by mx\.mailflow\.test \(mailflow, from userid \d+\)\r\n\tid " + new.encode(),
                    copy.content), copy.content[:200]
    lines = [line.split(": ", 1)[1] for line in log_file.read_text().splitlines()
             if re.search(rf"\]: ({new}|{old}): ", line)]
    message_id = next(line for line in lines if line.startswith(f"{old}: message-id="))[len(old) + 2:]
    assert [line for line in lines if re.match(rf"{new}: (uid|message-id|from)=", line)][:3] == [
        f"{new}: uid={os.geteuid()} from=<someone@remote.test> orig_id={old}", f"{new}: {message_id}",
        f"{new}: from=<someone@remote.test>, size={detail.size}, nrcpt=1 (queue active)"]
    assert not [line for line in lines if line.startswith(f"{old}: removed")]


async def test_delete_removes_messages_by_id_and_from_stdin(dead_relay):
    mf, config, _ = dead_relay
    first = await submit(mf, "someone@remote.test", ["bob@relay.test"])
    second = await submit(mf, "someone@remote.test", ["carol@relay.test"])

    rc, out, err = await queue(config, "delete", first, "FEDCBA9876543210")
    assert (rc, out) == (0, "delete: 1 message\n")
    assert "FEDCBA9876543210: not in the incoming, active, deferred, hold, corrupt or maildrop queue" in err
    assert await queue_state(mf, first) is None
    rc, out, _ = await queue(config, "list")
    assert first not in out and second in out
    rc, _, err = await queue(config, "show", first)
    assert rc == 1

    rc, out, _ = await queue(config, "delete", "-", stdin=f"{second}*\n".encode())  # as pasted from mailq
    assert out == "delete: 1 message\n"
    rc, out, _ = await queue(config, "list")
    assert out == "Mail queue is empty\n"
    assert await mf.store.counts() == {}


async def test_a_token_that_is_no_queue_id_is_skipped_with_a_warning(dead_relay):
    """As `postsuper -d -` does ("warning: invalid mail queue id"): the ids that are ids are still acted on, so
    a pipeline that lets a stray word through does not stop the whole change; the word is never used as a path
    or in a query, and is shown escaped."""
    mf, config, _ = dead_relay
    first = await submit(mf, "someone@remote.test", ["bob@relay.test"])
    second = await submit(mf, "someone@remote.test", ["carol@relay.test"])
    hostile = f"{first}\n../../etc/passwd\n$(touch /tmp/x);\n\x1b[2J\n".encode()
    rc, out, err = await queue(config, "hold", "-", stdin=hostile)
    assert (rc, out) == (0, "hold: 1 message\n")
    assert err.splitlines() == ["mailflow queue hold: warning: '../../etc/passwd' is not a queue id",
                                "mailflow queue hold: warning: '$(touch' is not a queue id",
                                "mailflow queue hold: warning: '/tmp/x);' is not a queue id",
                                "mailflow queue hold: warning: '\\x1b[2J' is not a queue id"]
    rc, out, err = await queue(config, "delete", "a;b", second)
    assert (rc, out, err) == (0, "delete: 1 message\n", "mailflow queue delete: warning: 'a;b' is not a queue id\n")
    rc, out, _ = await queue(config, "release", "-", stdin=b"../x\n")  # nothing named is left: nothing selected
    assert (rc, out) == (0, "release: 0 messages\n")
    assert await queue_state(mf, first) == "hold" and await queue_state(mf, second) is None


async def test_a_bare_change_is_refused(dead_relay):
    mf, config, _ = dead_relay
    qid = await submit(mf, "someone@remote.test", ["bob@relay.test"])
    commands = ("hold", "release", "requeue", "delete")
    *bare, (rc, _, err) = await asyncio.gather(  # each refused before it changes anything: they run at once
        *(queue(config, command) for command in commands), queue(config, "delete", "--older-than", "soon"))
    for command, (code, out, error) in zip(commands, bare):
        assert code == 2 and out == "" and "say which messages" in error, command
    assert rc == 2 and "--older-than" in err
    assert await queue_state(mf, qid) is not None


async def test_changes_log_postsupers_lines_from_the_command_and_from_the_admin_api_alike(
        mailflow_server, write_config, tmp_path):
    """Postfix's postsuper logs `QID: placed on hold`, `released from hold`, `requeued`, `removed` for each
    message it is named, then `Placed on hold: N messages`… (a mass `ALL` only that); pflogsumm readers and
    admins grep for them. The command writes them to `[log] file` with its own pid, the admin API through the
    server's mail log: the same lines."""
    log_file = tmp_path / "mail.log"
    settings = {"relayhost": f"[127.0.0.1]:{free_port()}", "queue": HOUR, "admin": {"enable": True,
                "listen": ["127.0.0.1:0"]}}
    config = write_config(tmp_path / "mailflow.toml", log={"file": str(log_file)}, **settings)
    with mail_log_file(log_file):
        mf = await mailflow_server(**settings)
        by_cli, by_api = await submit(mf, "a@remote.test", ["bob@relay.test"]), await submit(
            mf, "b@remote.test", ["carol@relay.test"])
        left = await submit(mf, "c@remote.test", ["dave@relay.test"])  # for `delete ALL`
        for qid in (by_cli, by_api, left):
            await deferred_reason(mf, qid)
        admin = "http://%s:%d/api/queue/" % mf.admin.addresses[0]
        async with aiohttp.ClientSession() as http:
            for action in ("hold", "release", "hold", "requeue"):
                rc, out, err = await queue(config, action, by_cli)
                assert (rc, out) == (0, f"{action}: 1 message\n"), err
                async with http.post(admin + action, json={"ids": [by_api]}) as answer:
                    assert (await answer.json())["messages"] == 1
        async def copied() -> bool:
            return "maildrop" not in await mf.store.counts()

        await eventually(copied, timeout=5, what="both requeued messages copied (new queue ids)")
        for qid in (by_cli, by_api):
            assert await queue_state(mf, qid) is None
        rc, out, err = await queue(config, "delete", "ALL")
        assert (rc, out) == (0, "delete: 3 messages\n"), err
        await mf.stop()
    lines = re.findall(r"^\S+ mx\.mailflow\.test postfix-mailflow/postsuper\[(\d+)\]: (.*)$", log_file.read_text(),
                       re.M)
    server = [line for pid, line in lines if int(pid) == os.getpid()]
    tools = [line for pid, line in lines if int(pid) != os.getpid()]
    assert [line.replace(by_api, "QID") for line in server] == [
        line.replace(by_cli, "QID") for line in tools[:-1]] == [
        "QID: placed on hold", "Placed on hold: 1 message", "QID: released from hold", "Released from hold: 1 message",
        "QID: placed on hold", "Placed on hold: 1 message", "QID: requeued", "Requeued: 1 message"]
    assert tools[-1] == "Deleted: 3 messages"  # `ALL`: the summary alone, as postsuper's mass operations
    assert not [line for line in tools if line.startswith(left)]


async def test_a_queue_database_locked_past_the_busy_timeout_is_one_line_and_exit_1(write_config, tmp_path):
    """Another process holds the write lock longer than the tools wait (5 s): a change fails with no
    traceback, the path and SQLite's word for it; once the lock is gone the same command works. A listing
    only reads, and works meanwhile, as mailq does however busy Postfix's queue is."""
    from mailflow.store import Store

    config = write_config(tmp_path / "mailflow.toml")
    store = await Store.open(tmp_path / "queue" / "queue.db")
    qid = "0" * 12 + "A0A0"
    await store.insert(NewMessage(qid, "s@remote.test", time.time(), Content.of(message("held up")),
                                  (Recipient(0, "r@relay.test", "r@relay.test"),), queue="deferred"))
    await store.close()
    holder = sqlite3.connect(tmp_path / "queue" / "queue.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE control SET value = value")
        listing, (rc, out, err) = await asyncio.gather(cli(config, "mailq"), cli(config, "queue", "hold", "ALL"))
        assert listing[0] == 0 and qid in listing[1] and listing[2] == ""
        assert rc == 1 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"mailflow queue hold: the queue database {tmp_path / 'queue' / 'queue.db'}: "
                              "database is locked"), err
    finally:
        holder.rollback()
        holder.close()
    assert (await cli(config, "queue", "hold", "ALL"))[0] == 0


async def test_a_damaged_queue_row_is_listed_marked_warned_about_once_and_the_tools_exit_0(write_config, tmp_path):
    """Rows edited by hand: `arrival = 'x'`, a negative size with `next_attempt = 'y'`, a recipient status no code
    writes. Every listing still shows every message (Postfix's showq lists what it can of a bad queue file, with a
    warning naming it), each damaged one marked and warned about once on stderr by queue id, and exits 0 (postqueue
    -p does: scripts check mailq's status); `show` too; a sound message is shown as ever; shape counts on."""
    from mailflow.store import Store

    config = write_config(tmp_path / "mailflow.toml")
    db = tmp_path / "queue" / "queue.db"
    store = await Store.open(db)
    ids = [f"{'0' * 12}{letter * 4}" for letter in "ABCD"]
    for qid in ids:
        await store.insert(NewMessage(qid, "s@remote.test", time.time(), Content.of(message(qid)),
                                      (Recipient(0, "r@relay.test", "r@relay.test"),), queue="deferred"))
    await store.close()
    sound, late, small, odd = ids
    damage = {late: "arrival is 'x', not a time",
              small: "size is -5, not a size; next_attempt is 'y', not a time",
              odd: "recipient r@relay.test: status is 'odd', not pending, sent or bounced"}
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA ignore_check_constraints = 1")
        con.execute("UPDATE message SET arrival = 'x' WHERE id = ?", (late,))
        con.execute("UPDATE message SET size = -5, next_attempt = 'y' WHERE id = ?", (small,))
        con.execute("UPDATE recipient SET status = 'odd' WHERE message_id = ?", (odd,))

    def warned(command: str, err: str, *qids: str) -> None:
        assert "Traceback" not in err, err
        assert sorted(err.splitlines()) == sorted(f"mailflow queue {command}: warning: {qid}: damaged queue row: "
                                                  f"{damage[qid]} (`mailflow queue delete` removes it)"
                                                  for qid in qids), err

    # the tools only read here: they run at once (a Python start each)
    listing, as_json, mailq_json, shown_odd, shown_sound, shape = await asyncio.gather(
        queue(config, "list"), queue(config, "list", "--json"), cli(config, "mailq", "-j"),
        queue(config, "show", odd), queue(config, "show", sound), queue(config, "shape", "--queue", "deferred"))
    rc, out, err = listing
    assert rc == 0 and all(qid in out for qid in ids) and "-- 0 Kbytes in 4 Requests." in out, out
    assert out.count("(damaged queue row: ") == 3 and f"(damaged queue row: {damage[late]})" in out
    warned("list", err, late, small, odd)
    rc, out, err = as_json
    assert rc == 0
    listed = {m["id"]: m for m in json.loads(out)}
    assert listed.keys() == set(ids) and "damaged" not in listed[sound]
    assert {qid: listed[qid]["damaged"] for qid in damage} == damage
    warned("list", err, late, small, odd)
    rc, out, err = mailq_json
    assert rc == 0 and {json.loads(line)["queue_id"] for line in out.splitlines()} == set(ids)
    warned("list", err, late, small, odd)
    rc, out, err = shown_odd
    assert rc == 0 and f"damaged:        {damage[odd]}" in out and "  status:       odd" in out, out
    warned("show", err, odd)
    rc, out, err = shown_sound
    assert (rc, err) == (0, "") and "damaged" not in out and f"queue_id:       {sound}" in out
    rc, out, err = shape
    assert rc == 0 and err == "" and "TOTAL" in out


async def test_text_that_is_not_utf8_in_a_queue_row_is_listed_as_damaged(write_config, tmp_path):
    """A sender and a recipient address set by hand to bytes that are not UTF-8 (`CAST(x'ff61' AS TEXT)`): Python's
    sqlite3 cannot decode them, and such a row failed every listing. Now mailq, `list --json` and `show` list the
    message with U+FFFD in their place, marked and warned about by queue id."""
    from mailflow.store import Store

    config = write_config(tmp_path / "mailflow.toml")
    db = tmp_path / "queue" / "queue.db"
    store = await Store.open(db)
    sound, bad = (f"{'0' * 12}{letter * 4}" for letter in "AB")
    for qid in (sound, bad):
        await store.insert(NewMessage(qid, "s@remote.test", time.time(), Content.of(message(qid)),
                                      (Recipient(0, "r@relay.test", "r@relay.test"),), queue="deferred"))
    await store.close()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE message SET sender = CAST(x'ff61' AS TEXT) WHERE id = ?", (bad,))
        con.execute("UPDATE recipient SET address = CAST(x'ff62' AS TEXT) WHERE message_id = ?", (bad,))
    damage = "sender is b'\\xffa', not text; recipient \ufffdb: address is b'\\xffb', not text"
    mailq, as_json, shown = await asyncio.gather(  # (they only read: at once)
        cli(config, "mailq"), queue(config, "list", "--json"), queue(config, "show", bad))
    rc, out, err = mailq
    assert rc == 0 and "Traceback" not in err and sound in out and bad in out and "\ufffda" in out, (out, err)
    assert err == (f"mailflow queue list: warning: {bad}: damaged queue row: {damage}"
                   " (`mailflow queue delete` removes it)\n"), err
    rc, out, err = as_json
    assert {m["id"]: m.get("damaged") for m in json.loads(out)} == {sound: None, bad: damage}
    rc, out, err = shown
    assert "damaged:        sender is b'\\xffa', not text" in out and "\ufffdb" in out, (out, err)


# ---------------------------------------------------------------------------------------------- selectors, shape


@pytest.fixture
async def mixed(busy_peer):
    """Four deferred messages: A alice→a.example, B bob→b.example, C alice→b.example (two recipients),
    D carol→a.example, three hours old (put in the store directly, the way cleanup would)."""
    mf, config, peer = busy_peer
    rcpts = ["u@a.example", "u@b.example", "v@b.example", "w@b.example", "x@a.example"]
    peer.handler.rcpt_replies.update({r: BUSY for r in rcpts})
    a = await submit(mf, "alice@x.test", ["u@a.example"])
    b = await submit(mf, "bob@y.test", ["u@b.example"])
    c = await submit(mf, "alice@x.test", ["v@b.example", "w@b.example"])
    d = "0" * 12 + "D0D0"  # sorts first, like the old message it is
    await mf.store.insert(NewMessage(d, "carol@z.test", time.time() - 3 * 3600, Content.of(message("old")),
                                     (Recipient(0, "x@a.example", "x@a.example"),), client="old[192.0.2.1]"))
    mf.qmgr.wake()
    for qid in (a, b, c, d):
        await deferred_reason(mf, qid)
    return mf, config, {"A": a, "B": b, "C": c, "D": d}


async def listed(config, *args: str) -> set[str]:
    rc, out, err = await queue(config, "list", "--json", "--queue", "all", *args)
    assert rc == 0, err
    return {item["id"] for item in json.loads(out)}


async def test_selectors_pick_the_right_subset(mixed):
    mf, config, ids = mixed
    A, B, C, D = ids["A"], ids["B"], ids["C"], ids["D"]
    assert await asyncio.gather(  # listings only: at once
        listed(config, "--from", "ALICE@x.test"), listed(config, "--to-domain", "B.Example"),
        listed(config, "--older-than", "1h"), listed(config, "--from", "alice@x.test", "--to-domain", "b.example"),
        listed(config, A, B, "--to-domain", "a.example")) == [{A, C}, {B, C}, {D}, {C}, {A}]

    rc, out, _ = await queue(config, "hold", "--from", "alice@x.test")
    assert out == "hold: 2 messages\n"
    assert await listed(config, "--queue", "hold") == {A, C}
    rc, out, _ = await queue(config, "release", "--to-domain", "b.example")
    assert out == "release: 1 message\n"  # C; B was never held
    assert await queue_state(mf, A) == "hold" and await queue_state(mf, C) in ("deferred", "active")
    rc, out, _ = await queue(config, "delete", "--older-than", "2h")
    assert out == "delete: 1 message\n"
    assert await queue_state(mf, D) is None and await queue_state(mf, A) == "hold"


async def test_shape_counts_pending_recipients_by_domain_and_age(mixed):
    mf, config, ids = mixed
    default, deferred, top = await asyncio.gather(  # (they only read: at once)
        queue(config, "shape"), queue(config, "shape", "--queue", "deferred"),
        queue(config, "shape", "--json", "--top", "1", "--queue", "deferred"))
    rc, out, err = default  # qshape's default: the incoming and active queues
    assert rc == 0 and out.splitlines()[1].split() == ["TOTAL"] + ["0"] * 11, err
    rc, out, err = deferred
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
    assert rows["TOTAL"] == [5, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # D is 180 minutes old: the 320 column
    assert rows["b.example"] == [3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert rows["a.example"] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert lines.index(next(line for line in lines if "b.example" in line)) == 2  # sorted by total

    rc, out, _ = top
    shape = json.loads(out)
    assert shape["total"]["total"] == 5 and [d["domain"] for d in shape["domains"]] == ["b.example"]

    await queue(config, "hold", ids["D"])
    rc, out, _ = await queue(config, "shape", "--queue", "hold", "--json")
    shape = json.loads(out)
    assert shape["total"] == {"total": 1, "counts": [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]}
    assert shape["domains"] == [{"domain": "a.example", "total": 1, "counts": [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]}]


# ---------------------------------------------------------------------------------------------- destinations


async def test_the_tools_do_not_upgrade_an_older_queue_under_its_server(write_config, tmp_path):
    """`mailflow queue destinations` against a queue of schema 11 (an older server still running on it) moved it
    to the current schema without a word, and the older server then refused to start again. Now the tools refuse
    an older queue, saying the server upgrades it, and leave it as it was."""
    config = write_config(tmp_path / "mailflow.toml")
    db = tmp_path / "queue" / "queue.db"
    await (await Store.open(db)).close()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE schema_version SET version = 11")
    for command in (["destinations"], ["list"]):
        rc, out, err = await queue(config, *command)
        assert (rc, out) == (1, ""), err
        assert f"the queue database {db}: queue schema version 11 is older than this mailflow" in err
        assert "the server upgrades it when it starts" in err
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(11,)]


async def test_destinations_shows_what_qmgr_published(mailflow_server, write_config, tmp_path):
    # A peer that accepts the connection and never greets: the delivery stays in flight, so the row qmgr
    # publishes (about once a second) stays put while the CLI reads it.
    sessions: list[asyncio.StreamWriter] = []

    async def silent(reader, writer):
        sessions.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = {"relayhost": f"[127.0.0.1]:{port}", "smtp": {"connect_timeout": "30s", "command_timeout": "30s"}}
    try:
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        rc, out, _ = await queue(config, "destinations")
        assert (rc, out) == (0, "no destination state yet (is the server running?)\n")

        await submit(mf, "someone@remote.test", ["bob@relay.test"])
        await eventually(mf.store.destination_rows, timeout=5, step=0.05, what="qmgr published its destinations")
        rc, out, err = await queue(config, "destinations")
        assert rc == 0, err
        header, row = out.splitlines()
        assert header.split() == ["TRANSPORT", "NEXTHOP", "WINDOW", "IN-FLIGHT", "QUEUED", "FAILURES",
                                  "DEAD-UNTIL", "PAUSED-UNTIL", "UPDATED", "REASON"]
        cells = row.split()
        # relay.test is a relay domain: relay_transport, `relay` as Postfix's default
        assert cells[:8] == ["relay", f"[127.0.0.1]:{port}", "5", "1", "0", "0", "-", "-"]
        assert cells[-2:] == ["ago)", "-"]  # updated "… (0s ago)", no reason

        rc, out, _ = await queue(config, "destinations", "--json")
        [dest] = json.loads(out)
        assert dest["nexthop"] == f"[127.0.0.1]:{port}" and dest["in_flight"] == 1 and dest["dead_until"] is None
        assert dest["paused_until"] is None
    finally:
        for writer in sessions:
            writer.close()
        server.close()


async def test_destinations_shows_a_destination_paused_by_its_rate_delay(mailflow_server, write_config, smtp_peer,
                                                                        tmp_path):
    """A destination_rate_delay pauses a destination after each delivery: its row said window 1, nothing in flight
    and a job queued, as if a delivery were about to start, with nothing to say it waits an hour. Now the row says
    until when it is paused, as a dead one says until when it is dead: the CLI's text and JSON, the admin API."""
    peer = await smtp_peer()
    settings = {"relayhost": f"[127.0.0.1]:{peer.port}", "mynetworks": ["127.0.0.0/8"],
                "queue": {"destination_rate_delay": "1h"}, "admin": {"enable": True, "listen": ["127.0.0.1:0"]}}
    mf = await mailflow_server(**settings)
    config = write_config(tmp_path / "mailflow.toml", **settings)
    await submit(mf, "someone@remote.test", ["bob@relay.test"], "first")
    await eventually(lambda: peer.messages, timeout=5, what="the first message delivered")
    delivered = time.time()
    await submit(mf, "someone@remote.test", ["carol@relay.test"], "second")

    async def paused_row():
        return [row for row in await mf.store.destination_rows() if row.queued == 1 and row.paused_until]

    [row] = await eventually(paused_row, timeout=5, step=0.05, what="qmgr published the paused destination")
    assert delivered - 1 < row.paused_until - 3600 < time.time() and len(peer.messages) == 1

    rc, out, err = await queue(config, "destinations")
    assert rc == 0, err
    header, line = out.splitlines()
    assert header.split() == ["TRANSPORT", "NEXTHOP", "WINDOW", "IN-FLIGHT", "QUEUED", "FAILURES", "DEAD-UNTIL",
                              "PAUSED-UNTIL", "UPDATED", "REASON"]
    cells = re.split(r"\s{2,}", line)
    assert cells[2:7] == ["1", "0", "1", "0", "-"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in (59m\d\ds|1h00m)\)", cells[7]), cells[7]

    rc, out, _ = await queue(config, "destinations", "--json")
    [dest] = json.loads(out)
    assert dest["paused_until"] == row.paused_until and dest["dead_until"] is None and dest["queued"] == 1
    host, port = mf.admin.addresses[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{host}:{port}/api/destinations") as response:
            assert response.status == 200 and await response.json() == [dest]


async def test_a_message_held_and_released_during_its_delivery_is_delivered_once(mailflow_server, write_config,
                                                                                 smtp_peer, tmp_path):
    """An operator holds a message while it is being delivered (its peer has not greeted yet), then releases it:
    the release makes it due, but the attempt under way still has it. The scan after the release must not start
    a second delivery of it beside the first (which, once the peer answers both, delivers it twice): the attempt
    under way concludes it, as for a hold alone."""
    peer = await smtp_peer()
    gate, sessions = asyncio.Event(), []

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A next hop that greets only once the gate opens: then it relays both ways to the capture peer."""
        sessions.append(writer)
        await gate.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", peer.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    front = await asyncio.start_server(gated, "127.0.0.1", 0)
    try:
        settings = {"relayhost": f"[127.0.0.1]:{front.sockets[0].getsockname()[1]}", "mynetworks": ["127.0.0.0/8"],
                    "queue": HOUR}
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        qid = await submit(mf, "someone@remote.test", ["bob@relay.test"])
        await eventually(lambda: len(sessions) == 1, timeout=10, what="the delivery waiting for its greeting")

        assert (await queue(config, "hold", qid))[1] == "hold: 1 message\n"
        assert (await queue(config, "release", qid))[1] == "release: 1 message\n"
        scans = ScanWatch(mf.store)
        await scans.scan_after(time.time())  # qmgr saw the release and scanned the queue (due: the message)
        assert len(sessions) == 1  # no second delivery of it while the first is under way

        gate.set()
        await eventually(lambda: peer.messages, timeout=10, what="the message delivered")
        assert await _gone(mf, qid)
        assert [m.rcpt_tos for m in peer.messages] == [["bob@relay.test"]] and len(sessions) == 1
    finally:
        front.close()
