"""Differential tests of what a message looks like once through: the same message to a private Postfix and to
mailflow configured alike.

- cleanup's header rewriting: from 127.0.0.1 (a client on this host, as local_header_rewrite_clients' default sees
  it), relayed to a capture peer each, the message must come out with the same addresses in its address fields.
  The addresses are compared, not the bytes: Postfix writes a rewritten field anew, mailflow changes only its
  addresses (docs/config.md).
- a mailbox delivery (virtual(8) Maildir, through a virtual alias): the lines put before the message
  (Return-Path, X-Original-To, Delivered-To) must be the same; and local(8)'s mbox entry for an alias's member
  (From_ line, those lines, From quoting, the blank line after it).
"""
from __future__ import annotations

import email.utils
import glob
import os
import shutil
import tempfile

import pytest

from mailflow.message import header_values, split_header
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

MESSAGE = (b"From: bob\r\n"
           b"To: Alice <alice>, carol@relay.test, dave@host.origin.test\r\n"
           b"Cc: erin (Erin E.),\r\n \"Frank F\" <frank>, undisclosed: gina, <hal@other.test>;\r\n"
           b"Reply-To: ivan\r\n"
           b"Sender: <>\r\n"
           b"Subject: bob and alice\r\n"
           b"Message-ID: <probe@client.test>\r\n"
           b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
           b"\r\n"
           b"bob\r\n")
FIELDS = ("from", "to", "cc", "reply-to", "sender", "subject")


async def relay_through(port: int, peer) -> dict[str, list]:
    """Send MESSAGE through the server on `port`; the address fields of what `peer` received."""
    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<bob@client.test>")).code == 250
    assert (await c.cmd("RCPT TO:<carol@relay.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(MESSAGE + b".\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    await eventually(lambda: peer.messages, timeout=20)
    head, _ = split_header(peer.messages[0].content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    values = {name: header_values(head, name) for name in FIELDS}
    return {name: [email.utils.getaddresses(values[name])] if name != "subject" else values[name]
            for name in FIELDS}


async def test_header_addresses_are_rewritten_as_a_real_postfix_rewrites_them(mailflow_server, smtp_peer):
    pf_peer, mf_peer = await smtp_peer(), await smtp_peer()
    async with postfix_instance({
        "myhostname": "mx.origin.test", "myorigin": "origin.test", "mydestination": "",
        "masquerade_domains": "origin.test", "relayhost": f"[127.0.0.1]:{pf_peer.port}",
    }) as pf:
        postfix = await relay_through(pf.port, pf_peer)
    mf = await mailflow_server(myhostname="mx.origin.test", myorigin="origin.test", mydestination=[],
                               masquerade_domains=["origin.test"], relayhost=f"[127.0.0.1]:{mf_peer.port}")
    mailflow = await relay_through(mf.smtp_addresses[0][1], mf_peer)
    assert mailflow == postfix
    # what both did, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["from"] == [[("", "bob@origin.test")]]
    assert [a for _, a in postfix["to"][0]] == ["alice@origin.test", "carol@relay.test", "dave@origin.test"]
    assert [a for _, a in postfix["cc"][0]][-3:] == ["frank@origin.test", "gina@origin.test", "hal@other.test"]
    assert postfix["subject"] == ["bob and alice"]


async def test_a_mailbox_copy_starts_as_a_real_postfix_starts_it(mailflow_server, tmp_path):
    postfix, mailflow = await virtual_alias_copies(mailflow_server, tmp_path, "team@vdomain.test")
    assert mailflow == postfix == [b"Return-Path: <bob@client.test>", b"X-Original-To: team@vdomain.test",
                                   b"Delivered-To: alice@vdomain.test"]


async def virtual_alias_copies(mailflow_server, tmp_path, rcpt: str) -> tuple[list[bytes], list[bytes]]:
    """One message to `rcpt` (a form of the virtual alias team@vdomain.test, whose member alice has a virtual(8)
    Maildir), through a private Postfix and through mailflow configured alike: the lines each copy starts with,
    up to its Received header (Postfix's, then mailflow's)."""
    async def deliver(port: int) -> None:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<bob@client.test>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply()).code == 250
        await c.close()

    def first_lines(maildir: str) -> list[bytes]:
        [path] = glob.glob(f"{maildir}/new/*")
        with open(path, "rb") as f:
            return f.read().split(b"\nReceived: ")[0].split(b"\n")

    base = tempfile.mkdtemp(prefix="mailflow-vmail-")  # (tmp_path is not traversable by Postfix's virtual user)
    os.chmod(base, 0o777)
    try:
        postfix = await _postfix_virtual_delivery(base, deliver, first_lines)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    mf = await mailflow_server(myhostname="mx.origin.test", mydestination=[],
                               virtual_mailbox_domains=["vdomain.test"], virtual_mailbox_base=str(tmp_path / "vmail"),
                               virtual_mailbox_maps=["inline:{alice@vdomain.test=alice/}"],
                               virtual_alias_maps=["inline:{team@vdomain.test=alice@vdomain.test}"])
    await deliver(mf.smtp_addresses[0][1])
    mailflow = await eventually(lambda: glob.glob(f"{tmp_path}/vmail/alice/new/*") and first_lines(
        f"{tmp_path}/vmail/alice"))
    return postfix, mailflow


async def _postfix_virtual_delivery(base: str, deliver, first_lines) -> list[bytes]:
    async with postfix_instance({
        "myhostname": "mx.origin.test", "mydestination": "", "virtual_mailbox_domains": "vdomain.test",
        "virtual_mailbox_base": base, "virtual_mailbox_maps": "inline:{alice@vdomain.test=alice/}",
        "virtual_alias_maps": "inline:{team@vdomain.test=alice@vdomain.test}",
        "virtual_uid_maps": "static:65534", "virtual_gid_maps": "static:65534",
    }) as pf:
        await deliver(pf.port)
        return await eventually(lambda: glob.glob(f"{base}/alice/new/*") and first_lines(f"{base}/alice"))


async def test_an_alias_members_mbox_entry_is_written_as_a_real_postfix_writes_it(mailflow_server, tmp_path):
    """local(8) to an mbox in the mail spool: the From_ line (sender, two spaces; MAILER-DAEMON for <>), the
    lines put before the message (Delivered-To: the recipient local(8) was given, the alias, not its member),
    a body `From ` line quoted, and the blank line that ends each entry."""
    async def deliver(port: int) -> None:
        for sender, body in (("bob@client.test", b"From here\r\nlast\r\n"), ("", b"null sender\r\n")):
            c = await SmtpClient.connect(port)
            assert (await c.cmd("EHLO client.test")).code == 250
            assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
            assert (await c.cmd("RCPT TO:<team@origin.test>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            await c.send(b"Subject: hi\r\n\r\n" + body + b".\r\n")
            assert (await c.reply()).code == 250
            await c.close()

    def entries(path: str) -> list[list[bytes]] | None:
        """Each entry's From_ line without its date, its first three header lines and its body, once both
        entries are there."""
        text = open(path, "rb").read() if os.path.exists(path) else b""
        found = [e for e in text.split(b"\n\nFrom ") if e]
        if len(found) < 2 or not text.endswith(b"\n\n"):
            return None
        out = []
        for entry in found:
            lines = entry.removeprefix(b"From ").split(b"\n")
            body = entry.split(b"\n\n", 1)[1].rstrip(b"\n").split(b"\n")
            out.append([lines[0].split(b"  ")[0], *lines[1:4], *body])
        return sorted(out)  # (the two may be delivered in either order)

    spool = tempfile.mkdtemp(prefix="mailflow-spool-")  # (tmp_path is not traversable by the recipient)
    os.chmod(spool, 0o1777)
    try:
        async with postfix_instance({
            "myhostname": "mx.origin.test", "myorigin": "origin.test", "mydestination": "origin.test",
            "alias_maps": "inline:{team=nobody}", "mail_spool_directory": spool, "home_mailbox": "",
        }) as pf:
            await deliver(pf.port)
            postfix = await eventually(lambda: entries(f"{spool}/nobody"), timeout=20)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    (tmp_path / "spool").mkdir(mode=0o1777)  # (a missing spool is never made, as Postfix's local(8))
    mf = await mailflow_server(myhostname="mx.origin.test", myorigin="origin.test", mydestination=["origin.test"],
                               alias_maps=["inline:{team=nobody}"], local_recipient_maps=["inline:{nobody=x}"],
                               local={"home_mailbox": "", "mail_spool_directory": str(tmp_path / "spool")})
    await deliver(mf.smtp_addresses[0][1])
    mailflow = await eventually(lambda: entries(f"{tmp_path}/spool/nobody"))
    assert mailflow == postfix == [
        [b"MAILER-DAEMON", b"Return-Path: <>", b"X-Original-To: team@origin.test",
         b"Delivered-To: team@origin.test", b"null sender"],
        [b"bob@client.test", b"Return-Path: <bob@client.test>", b"X-Original-To: team@origin.test",
         b"Delivered-To: team@origin.test", b">From here", b"last"]]
