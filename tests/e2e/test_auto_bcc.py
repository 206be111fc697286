"""The automatic BCC recipients end to end (always_bcc, sender_bcc_maps, recipient_bcc_maps; the address each map
is asked with is tests/interop/test_auto_bcc_vs_postfix.py's subject): only mail from outside gets a copy, never a
copy local delivery forwards nor a notice made here (so an archive cannot loop), and a copy that fails is not
reported to the sender (NOTIFY=NEVER)."""
from __future__ import annotations

from tests.support import eventually, maildir_messages, queue_becomes, send


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
