"""Forwarded mail stays authenticated: ARC sealing (the chain checked by dkimpy's ARC verifier against keys served by
the in-process DNS) and SRS (the forwarded copy's sender is this host's; a bounce to that address comes back to the
original sender; a forged or unknown SRS address is refused). Both are off by default."""
from __future__ import annotations

import threading

import dkim
import pytest

from tests.support.deliverability import dkim_settings, dnspython_txt, key_zone, make_key, start_zone
from tests.support import eventually, rcpt_reply, send


@pytest.fixture
def world(tmp_path):
    """The original sender's key (orig.test), this host's ARC key (local.test), a zone serving both."""
    directory = tmp_path / "keys"
    directory.mkdir()
    sender_key = make_key(directory, "orig.test", "o", "rsa")
    arc_key = make_key(directory, "local.test", "arc", "rsa")
    nameserver, stop = start_zone(key_zone([sender_key, arc_key]), ad=False)
    yield directory, sender_key, arc_key, nameserver
    stop()


def signed_by_sender(sender_key, subject: bytes = b"forward me") -> bytes:
    message = (b"From: Sam <s@orig.test>\r\nTo: team@local.test\r\nSubject: " + subject + b"\r\n"
               b"Message-ID: <m1@orig.test>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nhello team\r\n")
    return dkim.sign(message, b"o", b"orig.test", sender_key.private, canonicalize=(b"relaxed", b"relaxed")) + message


async def forwarding_server(mailflow_server, smtp_peer, tmp_path, world, **extra):
    directory, _, arc_key, nameserver = world
    peer = await smtp_peer()
    aliases = tmp_path / "aliases"
    aliases.write_text("team: carol@remote.test\n")
    secret = tmp_path / "srs.secret"
    secret.write_text("first-secret\nolder-secret\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}",
                               dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                               dkim={"key_table": dkim_settings(directory, [arc_key])["key_table"]},
                               arc={"enabled": True, "key": arc_key.name},
                               srs={"enabled": True, "domain": "local.test", "secret_file": str(secret)}, **extra)
    return mf, peer


@pytest.mark.parametrize("subject", [b"forward me", b"Gr\xc3\xbc\xc3\x9fe, caf\xe9"], ids=["ascii", "8-bit"])
async def test_a_forwarded_message_is_arc_sealed_and_its_chain_validates(mailflow_server, smtp_peer, tmp_path, world,
                                                                         subject):
    """8-bit header bytes (UTF-8, Latin-1) are sealed and sent as they came, so the sender's signature over them
    survives too (mailflow made them RFC 2047 words before sealing, which broke it)."""
    _, sender_key, _, nameserver = world
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    await send(mf.smtp_addresses[0][1], "s@orig.test", ["team@local.test"], signed_by_sender(sender_key, subject))
    [forwarded] = await eventually(lambda: peer.messages)
    content = forwarded.content
    assert b"\r\nSubject: " + subject + b"\r\n" in content
    assert forwarded.rcpt_tos == ["carol@remote.test"]
    for field in (b"ARC-Seal: i=1; ", b"ARC-Message-Signature: i=1; ", b"ARC-Authentication-Results: i=1; "):
        assert field in content
    assert b"dkim=pass header.d=orig.test" in content and b"arc=none" in content
    cv, results, reason = dkim.arc_verify(content, dnsfunc=dnspython_txt(nameserver))
    assert cv == dkim.CV_Pass, (reason, results)
    assert dkim.verify(content, dnsfunc=dnspython_txt(nameserver))  # the sender's own signature survived
    tampered = content.replace(b"hello team", b"hello Team")
    assert dkim.arc_verify(tampered, dnsfunc=dnspython_txt(nameserver))[0] == dkim.CV_Fail


async def test_the_forwarded_sender_is_rewritten_and_a_bounce_goes_back(mailflow_server, smtp_peer, tmp_path, world):
    _, sender_key, _, _ = world
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    port = mf.smtp_addresses[0][1]
    await send(port, "s@orig.test", ["team@local.test"], signed_by_sender(sender_key))
    [forwarded] = await eventually(lambda: peer.messages)
    srs_address = forwarded.mail_from
    assert srs_address.startswith("SRS0=") and srs_address.endswith("=orig.test=s@local.test"), srs_address

    # carol's server cannot deliver: its bounce (null sender) goes to the SRS address
    bounce = (b"From: MAILER-DAEMON@remote.test\r\nTo: " + srs_address.encode() +
              b"\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\ncarol is gone\r\n")
    refused, reply = await send(port, "", [srs_address], bounce)
    assert refused == {} and reply.startswith("2.0.0")
    returned = await eventually(lambda: peer.messages[1:])
    assert returned[0].rcpt_tos == ["s@orig.test"] and returned[0].mail_from == "<>"


async def test_a_forged_or_foreign_srs_address_is_refused(mailflow_server, smtp_peer, tmp_path, world):
    mf, _ = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    port = mf.smtp_addresses[0][1]
    code, _ = await rcpt_reply(port, "SRS0=AAAA=G3=orig.test=s@local.test", sender="")
    assert code == 550


async def test_mail_of_this_hosts_own_domain_keeps_its_sender(mailflow_server, smtp_peer, tmp_path, world):
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    await send(mf.smtp_addresses[0][1], "alice@local.test", ["team@local.test"], b"Subject: x\r\n\r\nown\r\n")
    [forwarded] = await eventually(lambda: peer.messages)
    assert forwarded.mail_from == "alice@local.test"


async def test_without_the_settings_nothing_is_rewritten_or_sealed(mailflow_server, smtp_peer, tmp_path, world):
    peer = await smtp_peer()
    aliases = tmp_path / "aliases"
    aliases.write_text("team: carol@remote.test\n")
    mf = await mailflow_server(alias_maps=[f"texthash:{aliases}"], relayhost=f"[127.0.0.1]:{peer.port}")
    await send(mf.smtp_addresses[0][1], "s@orig.test", ["team@local.test"], signed_by_sender(world[1]))
    [forwarded] = await eventually(lambda: peer.messages)
    assert forwarded.mail_from == "s@orig.test" and b"ARC-Seal" not in forwarded.content


async def test_a_virtual_alias_to_a_remote_domain_is_forwarding_too(mailflow_server, smtp_peer, tmp_path, world):
    _, sender_key, _, nameserver = world
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world,
                                       virtual_alias_domains=["valias.test"],
                                       virtual_alias_maps=["inline:{ {info@valias.test = dave@remote.test} }"])
    await send(mf.smtp_addresses[0][1], "s@orig.test", ["info@valias.test"], signed_by_sender(sender_key))
    [forwarded] = await eventually(lambda: peer.messages)
    assert forwarded.rcpt_tos == ["dave@remote.test"] and forwarded.mail_from.startswith("SRS0=")
    assert dkim.arc_verify(forwarded.content, dnsfunc=dnspython_txt(nameserver))[0] == dkim.CV_Pass


async def test_this_hosts_own_bounce_of_a_forwarded_copy_reaches_the_original_sender(mailflow_server, smtp_peer,
                                                                                   tmp_path, world):
    _, sender_key, _, _ = world
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    peer.handler.rcpt_replies["carol@remote.test"] = "550 5.1.1 carol is gone"
    await send(mf.smtp_addresses[0][1], "s@orig.test", ["team@local.test"], signed_by_sender(sender_key))
    [bounce] = await eventually(lambda: peer.messages)  # the forwarded copy was refused; its bounce comes here
    assert bounce.rcpt_tos == ["s@orig.test"] and bounce.mail_from == "<>"
    assert b"carol is gone" in bounce.content


def seal_check_threads() -> int:
    return sum(thread.name.startswith("DKIM-checks") for thread in threading.enumerate())


async def test_reloads_leave_no_idle_threads_of_the_seals_dkim_checks(mailflow_server, smtp_peer, tmp_path, world):
    """The ARC seal checks the message's DKIM signatures in a pool of threads: the server's one, kept across
    reloads. Each reload's own (never closed) left its idle threads behind: one more per reload that sealed."""
    _, sender_key, _, _ = world
    before = seal_check_threads()
    mf, peer = await forwarding_server(mailflow_server, smtp_peer, tmp_path, world)
    for sealed in range(1, 11):
        await send(mf.smtp_addresses[0][1], "s@orig.test", ["team@local.test"], signed_by_sender(sender_key))
        await eventually(lambda: len(peer.messages) == sealed, what=f"forwarded copy {sealed} relayed")
        await mf.reload(mf.config)
    assert all(b"ARC-Seal: i=1; " in message.content for message in peer.messages)
    assert seal_check_threads() - before <= 2  # (dkim.CHECKERS; 10 without the server's one pool)
