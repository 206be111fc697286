"""Aliases end to end: local aliases and .forward expanded by local delivery, virtual aliases by cleanup,
forwarded copies relayed with Delivered-To, loops stopped, an unreadable alias file deferring, not bouncing."""
from __future__ import annotations

import subprocess
import sys

import aiosmtplib
import pytest

from mailflow import status
from tests.support import eventually, maildir_messages, queue_becomes, rcpt_reply, rcpt_until, send


def header_lines(content: bytes) -> list[bytes]:
    return content.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].split(b"\n")


async def test_an_alias_to_two_users_and_a_remote_address(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    aliases = tmp_path / "aliases"
    aliases.write_text("# the team\nteam: alice,\n  bob, carol@remote.test\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}",
                               myorigin="local.test")  # bare names in the aliases file are local users
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["team@local.test"], b"Subject: hi team\r\n\r\nhello\r\n")

    for user in ("alice", "bob"):
        [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / user / "Maildir"))
        assert data.startswith(b"Return-Path: <s@remote.test>\nX-Original-To: team@local.test\n"
                               b"Delivered-To: team@local.test\n")  # the alias, as Postfix's local(8) writes it
        assert data.endswith(b"\n\nhello\n")
    [relayed] = await eventually(lambda: peer.messages)
    assert relayed.rcpt_tos == ["carol@remote.test"] and relayed.mail_from == "s@remote.test"
    assert b"Delivered-To: team@local.test" in header_lines(relayed.content)
    await queue_becomes(mf.store, {})


async def test_a_virtual_alias_domain(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    mf = await mailflow_server(virtual_alias_domains=["valias.test"],
                               virtual_alias_maps=[
                                   "inline:{ {info@valias.test = alice@local.test, dave@remote.test} }"],
                               relayhost=f"[127.0.0.1]:{peer.port}")
    port = mf.smtp_addresses[0][1]
    assert await rcpt_reply(port, "nobody@valias.test") == status.restriction_rejected(
        550, "5.1.1", "nobody@valias.test", "Recipient address", "User unknown in virtual alias table")

    await send(port, "s@remote.test", ["info@valias.test"], b"Subject: info\r\n\r\nvia virtual\r\n")
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert b"Delivered-To: alice@local.test\n" in data
    [relayed] = await eventually(lambda: peer.messages)
    assert relayed.rcpt_tos == ["dave@remote.test"]
    assert b"Delivered-To" not in relayed.content, "expanded by cleanup: one message, no forwarding"


async def test_a_virtual_alias_loop_refuses_the_message_with_451(mailflow_server):
    mf = await mailflow_server(virtual_alias_maps=["inline:{a@local.test=b@local.test, b@local.test=a@local.test}"])
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await send(mf.smtp_addresses[0][1], "s@remote.test", ["a@local.test"], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.code == 451 and refused.value.message.startswith("4.6.0")
    await queue_becomes(mf.store, {})


async def test_a_forwarding_loop_bounces_instead_of_delivering(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    looped = b"Delivered-To: alice@local.test\r\nSubject: round and round\r\n\r\nagain\r\n"
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["alice@local.test"], looped)

    [bounce] = await eventually(lambda: peer.messages)
    assert bounce.rcpt_tos == ["s@remote.test"] and bounce.mail_from in ("", "<>")
    unfolded = bounce.content.replace(b"\r\n ", b" ")
    assert b"Status: 5.4.6" in unfolded and b"mail forwarding loop for alice@local.test" in unfolded
    assert maildir_messages(tmp_path / "mail" / "alice" / "Maildir") == []


async def test_dot_forward_keeps_a_copy_and_forwards_one(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    home = tmp_path / "mail" / "bob"
    home.mkdir(parents=True)
    (home / ".forward").write_text("\\bob, bob@elsewhere.test\n")
    # (`\bob` is bob@myorigin, as Postfix's local reads it: myorigin must be local for the copy to stay here)
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", myorigin="local.test")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["bob@local.test"], b"Subject: fwd\r\n\r\nbody\r\n")
    [kept] = await eventually(lambda: maildir_messages(home / "Maildir"))
    assert kept.endswith(b"\n\nbody\n")
    [relayed] = await eventually(lambda: peer.messages)
    assert relayed.rcpt_tos == ["bob@elsewhere.test"]


async def test_a_kept_copy_leaves_when_myorigin_is_not_local(mailflow_server, smtp_peer, tmp_path, write_config):
    """docs/config.md, "Upgrading: `\\user`": `\\bob` is bob@myorigin, as Postfix's local reads it; with myorigin
    (here myhostname, mx.mailflow.test) outside mydestination that copy is relayed, not kept, and check-config
    (serve too, as it starts) warns of it."""
    peer = await smtp_peer()
    home = tmp_path / "mail" / "bob"
    home.mkdir(parents=True)
    (home / ".forward").write_text("\\bob, bob@elsewhere.test\n")
    settings = {"relayhost": f"[127.0.0.1]:{peer.port}"}
    checked = subprocess.run([sys.executable, "-m", "mailflow", "check-config", "--config",
                              str(write_config(tmp_path / "m.toml", **settings))],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "warning: myorigin (myhostname) 'mx.mailflow.test' is not in mydestination" in checked.stderr
    mf = await mailflow_server(**settings)
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["bob@local.test"], b"Subject: fwd\r\n\r\nbody\r\n")
    relayed = await eventually(lambda: [r for m in peer.messages for r in m.rcpt_tos][1:] and
                               sorted(r for m in peer.messages for r in m.rcpt_tos))
    assert relayed == ["bob@elsewhere.test", "bob@mx.mailflow.test"]
    assert maildir_messages(home / "Maildir") == []


async def test_an_unreadable_alias_file_defers_then_delivers(mailflow_server, tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], myorigin="local.test")
    port = mf.smtp_addresses[0][1]

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as c:
        await c.mail("s@remote.test")
        await c.rcpt("team@local.test")  # known while the file is there ...
        aliases.rename(tmp_path / "away")  # ... gone before delivery
        await rcpt_until(port, "team@local.test", 451)  # the server has seen it go
        await c.data(b"Subject: later\r\n\r\nwait for it\r\n")
    await queue_becomes(mf.store, {"deferred": 1})
    [(_, state, dsn, text)] = await mf.store.recipients((await mf.store.due(2e9, 1))[0].queue_id)
    assert (state, dsn) == ("pending", "4.3.0") and "cannot read" in text

    assert await rcpt_reply(port, "team@local.test") == status.lookup_failed("team@local.test"), \
        "RCPT cannot check the alias either"
    assert (await rcpt_reply(port, "alice@local.test"))[0] == 250, "users need no alias table"

    (tmp_path / "away").rename(aliases)
    [data] = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    assert data.endswith(b"\n\nwait for it\n")
    await queue_becomes(mf.store, {})


async def test_a_bounce_names_the_address_the_sender_used(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(virtual_alias_domains=["valias.test"],
                               virtual_alias_maps=["inline:{info@valias.test=ghost@local.test}"],
                               relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@remote.test", ["info@valias.test"], b"Subject: x\r\n\r\nx\r\n")
    [bounce] = await eventually(lambda: peer.messages)
    unfolded = bounce.content.replace(b"\r\n ", b" ")
    assert b"Final-Recipient: rfc822; ghost@local.test" in unfolded
    assert b"Original-Recipient: rfc822;info@valias.test" in unfolded  # (smtpd's made-up ORCPT, as Postfix's)
    assert b"Status: 5.1.1" in unfolded and b'unknown user: "ghost"' in unfolded


async def test_canonical_maps_and_masquerading_rewrite_the_envelope(mailflow_server, smtp_peer):
    peer = await smtp_peer()
    mf = await mailflow_server(sender_canonical_maps=["inline:{root@host1.corp.test=admin@host1.corp.test}"],
                               masquerade_domains=["corp.test"],
                               recipient_canonical_maps=["inline:{@old.test=@relay.test}"],
                               transport_maps=[f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}}}"],
                               mynetworks=["127.0.0.0/8"])  # old.test is not ours: a trusted client may relay
    await send(mf.smtp_addresses[0][1], "root@host1.corp.test", ["bob+x@old.test"], b"Subject: x\r\n\r\nx\r\n")
    [relayed] = await eventually(lambda: peer.messages)
    assert relayed.mail_from == "admin@corp.test"  # canonical, then the host masqueraded away
    assert relayed.rcpt_tos == ["bob+x@relay.test"]  # @domain -> @domain keeps the user and its extension
