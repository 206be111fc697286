"""Routing through lookup tables: a table that goes unreadable makes RCPT answer 451 and queued mail defer
(4.3.0, never a bounce), and mail flows again once the file is back."""
from __future__ import annotations

import logging

from mailflow import status
from tests.support import eventually, lines_logged, queue_becomes, rcpt_reply, rcpt_until, send


async def test_unreadable_tables_defer_and_recover(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    recipients = tmp_path / "relay_recipients"
    recipients.write_text("known@relay.test OK\n")
    transports = tmp_path / "transport"
    transports.write_text(f"relay.test smtp:[127.0.0.1]:{peer.port}\n")
    mf = await mailflow_server(relay_recipient_maps=[f"texthash:{recipients}"],
                               transport_maps=[f"texthash:{transports}"])
    port = mf.smtp_addresses[0][1]

    assert (await rcpt_reply(port, "unknown@relay.test"))[0] == 550
    await send(port, "s@remote.test", ["known@relay.test"], b"Subject: one\r\n\r\nfirst\r\n")
    await eventually(lambda: len(peer.messages) == 1)  # routed by transport_maps to the peer

    recipients.rename(tmp_path / "away")
    assert await rcpt_until(port, "known@relay.test", 451) == status.lookup_failed("known@relay.test")
    (tmp_path / "away").rename(recipients)
    await rcpt_until(port, "known@relay.test", 250)  # the table answers again

    # accepted while the tables answer; the next hop is busy, so it waits in the queue ...
    peer.handler.mail_reply = "451 4.3.2 not now"
    await send(port, "s@remote.test", ["known@relay.test"], b"Subject: two\r\n\r\nsecond\r\n")
    await queue_becomes(mf.store, {"deferred": 1})
    qid = (await mf.store.due(2e9, 1))[0].queue_id
    # ... then the transport table goes away: the retry defers with 4.3.0, it does not bounce
    transports.rename(tmp_path / "away")
    await rcpt_until(port, "known@relay.test", 451)  # the server has seen it go
    peer.handler.mail_reply = None

    async def retried():
        [row] = await mf.store.recipients(qid)
        return row if "resolver" in row[3] else None
    _, state, dsn, text = await eventually(retried, step=0.1)
    assert (state, dsn) == ("pending", "4.3.0") and "address resolver failure" in text
    assert len(peer.messages) == 1
    (tmp_path / "away").rename(transports)
    await eventually(lambda: len(peer.messages) == 2, timeout=10)
    await queue_becomes(mf.store, {})


async def test_mail_routed_to_an_undefined_transport_is_deferred_in_postfix_s_words(mailflow_server, caplog):
    """Postfix's qmgr, finding no master.cf service for a transport, defers 4.3.0 "mail transport unavailable" and
    warns, naming it (connect to transport private/NAME); the mail waits for the configuration to be mended."""
    caplog.set_level(logging.INFO)
    mf = await mailflow_server(transport_maps=["inline:{ {far.test = nosuch:} }"], relay_domains=["far.test"])
    await send(mf.smtp_addresses[0][1], "a@local.test", ["u@far.test"], b"Subject: x\r\n\r\nhi\r\n")
    await queue_becomes(mf.store, {"deferred": 1})
    lines = await lines_logged(caplog, "status=deferred (mail transport unavailable)")
    assert any(line.endswith("dsn=4.3.0, status=deferred (mail transport unavailable)") for line in lines), lines
    assert ("transport 'nosuch' is not defined (no built-in transport nor [pipe.nosuch], [smtp.services.nosuch] or "
            "[lmtp.services.nosuch])") in lines
