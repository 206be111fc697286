"""DKIM signing as cleanup queues mail from this host's users, checked by verifiers not written here: dkimpy reading
the keys from the in-process DNS (through dnspython, not mailflow's resolver) and OpenDKIM in verify mode.
RSA-2048 and Ed25519 (RFC 8463); a message larger than the in-memory limit (its body streamed for the hash);
mail that is not this host's users' left unsigned; `mailflow dkim keygen`."""
from __future__ import annotations

import os
import stat

import dkim
import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from mailflow.content import MEMORY_LIMIT
from tests.support.deliverability import (dkim_settings, dkim_signed, dnspython_txt, key_zone, make_key,
                                          opendkim_result, opendkim_verdict, start_zone)
from tests.support import eventually, send


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "dkim"
    directory.mkdir()
    return directory, [make_key(directory, "rsa.test", "sel1", "rsa"),
                       make_key(directory, "ed.test", "sel2", "ed25519")]


@pytest.fixture
def zone(keys):
    nameserver, stop = start_zone(key_zone(keys[1]))
    yield nameserver
    stop()


def message(domain: str, body: bytes = b"Hello  there, \r\n\r\nsecond paragraph\t\r\n") -> bytes:
    return (f"From: Alice <alice@{domain}>\r\nTo: bob@relay.test\r\nSubject: signed\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n").encode() + body


async def relayed(mailflow_server, smtp_peer, keys, **extra):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks=["127.0.0.0/8"],
                               dkim=dkim_settings(*keys), **extra)
    return mf, peer


@pytest.mark.parametrize(("domain", "algorithm"), [("rsa.test", b"rsa-sha256"), ("ed.test", b"ed25519-sha256")])
async def test_signed_mail_verifies_with_dkimpy_and_opendkim(mailflow_server, smtp_peer, keys, zone, tmp_path,
                                                             domain, algorithm):
    mf, peer = await relayed(mailflow_server, smtp_peer, keys)
    await send(mf.smtp_addresses[0][1], f"alice@{domain}", ["bob@relay.test"], message(domain))
    await eventually(lambda: peer.messages)
    signed = peer.messages[0].content
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + algorithm + b"; c=relaxed/relaxed; d=" + domain.encode())
    verifier = dkim.DKIM(signed)
    assert verifier.verify(dnsfunc=dnspython_txt(zone))
    assert verifier.signature_fields[b"h"].split(b" : ").count(b"from") == 2  # From oversigned
    key = next(k for k in keys[1] if k.domain == domain)
    verdict = opendkim_verdict(signed, {key.record_name: key.public_record()}, tmp_path / "opendkim")
    assert opendkim_result(verdict, domain) == "pass" and f"header.s={key.selector}" in verdict, verdict


async def test_a_tampered_message_fails_both_verifiers(mailflow_server, smtp_peer, keys, zone, tmp_path):
    mf, peer = await relayed(mailflow_server, smtp_peer, keys)
    await send(mf.smtp_addresses[0][1], "alice@rsa.test", ["bob@relay.test"], message("rsa.test"))
    await eventually(lambda: peer.messages)
    tampered = peer.messages[0].content.replace(b"second paragraph", b"second Paragraph")
    assert not dkim.verify(tampered, dnsfunc=dnspython_txt(zone))
    key = keys[1][0]
    verdict = opendkim_verdict(tampered, {key.record_name: key.public_record()}, tmp_path / "opendkim")
    assert opendkim_result(verdict, "rsa.test") == "fail", verdict


async def test_a_message_larger_than_memory_is_signed_from_its_stream(mailflow_server, smtp_peer, keys, zone,
                                                                       tmp_path):
    mf, peer = await relayed(mailflow_server, smtp_peer, keys)
    lines = b"".join(b"line %d  with   spaces \t\r\n" % i + (b"\r\n" if i % 50 == 0 else b"")
                     for i in range(MEMORY_LIMIT // 10))
    body = lines + b"\r\n\r\n\r\n"  # trailing empty lines: dropped by the relaxed body canonicalization
    big = message("ed.test", body)
    assert len(big) > 2 * MEMORY_LIMIT
    await send(mf.smtp_addresses[0][1], "alice@ed.test", ["bob@relay.test"], big)
    await eventually(lambda: peer.messages, timeout=20)
    signed = peer.messages[0].content
    assert dkim.verify(signed, dnsfunc=dnspython_txt(zone))
    key = keys[1][1]
    verdict = opendkim_verdict(signed, {key.record_name: key.public_record()}, tmp_path / "opendkim")
    assert opendkim_result(verdict, "ed.test") == "pass", verdict


async def test_mail_from_outside_and_unlisted_domains_is_not_signed(mailflow_server, smtp_peer, keys):
    peer = await smtp_peer()
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}", dkim=dkim_settings(*keys))  # no mynetworks
    port = mf.smtp_addresses[0][1]
    await send(port, "alice@rsa.test", ["bob@relay.test"], message("rsa.test"))  # an outside client: relayed only
    await eventually(lambda: peer.messages)
    assert b"DKIM-Signature" not in peer.messages[0].content


async def test_an_unlisted_from_domain_is_not_signed(mailflow_server, smtp_peer, keys):
    mf, peer = await relayed(mailflow_server, smtp_peer, keys)
    await send(mf.smtp_addresses[0][1], "alice@other.test", ["bob@relay.test"], message("other.test"))
    await eventually(lambda: peer.messages)
    assert b"DKIM-Signature" not in peer.messages[0].content


def test_keygen_writes_a_private_key_and_prints_its_record(tmp_path):
    for algorithm in ("rsa", "ed25519"):
        key_file = tmp_path / f"{algorithm}.private"
        result = CliRunner().invoke(cli, ["dkim", "keygen", "example.test", "sel", "--algorithm", algorithm,
                                          "--output", str(key_file)])
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert result.output.startswith("sel._domainkey.example.test. IN TXT ( \"v=DKIM1; k=" +
                                        ("rsa" if algorithm == "rsa" else "ed25519"))
        again = CliRunner().invoke(cli, ["dkim", "keygen", "example.test", "sel", "--output", str(key_file)])
        assert again.exit_code == 1 and "exists" in again.output


@pytest.mark.parametrize("args, words", [
    (["dkim", "keygen", "", "sel"], "mailflow dkim keygen: '' is not a domain name"),
    (["dkim", "keygen", "a b", "sel"], "mailflow dkim keygen: 'a b' is not a domain name"),
    (["dkim", "keygen", "example.test", "sel\nforged KeyTable line"], "is not a DKIM selector"),
    (["dkim", "keygen", "example.test", "../sel"], "'../sel' is not a DKIM selector"),
    (["dkim", "keygen", "example.test", "sel", "--bits", "100000"], "Invalid value for '--bits'"),
    (["dns-records", "a b"], "mailflow dns-records: 'a b' is not a domain name"),
    (["dns-records", ""], "mailflow dns-records: '' is not a domain name"),
    (["check-deliverability", "example..test"], "'example..test' is not a domain name"),
])
def test_keygen_and_the_dns_commands_refuse_what_is_no_domain_or_selector(tmp_path, monkeypatch, args, words):
    """They printed records for `a b` and made a key (a minutes-long one for 100000 bits) whose KeyTable line a
    selector with a line break would split."""
    monkeypatch.chdir(tmp_path)  # where keygen writes SELECTOR.private
    (tmp_path / "m.toml").write_text("")
    result = CliRunner().invoke(cli, [*args, *([] if args[0] == "dkim" else ["-c", str(tmp_path / "m.toml")])])
    assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]  # no key file


async def test_an_8bit_subject_is_signed_and_sent_as_it_is_to_a_peer_without_smtputf8(mailflow_server, smtp_peer,
                                                                                       keys, zone, tmp_path):
    """The signature covers the header bytes as queued, and the SMTP client sends those bytes (as Postfix's smtp(8):
    no RFC 2047 encoding for a peer without SMTPUTF8)."""
    mf, peer = await relayed(mailflow_server, smtp_peer, keys)  # aiosmtpd offers no SMTPUTF8 by default
    content = "From: Ålice <alice@rsa.test>\r\nSubject: Grüße\r\n\r\nbody\r\n".encode("utf-8")
    await send(mf.smtp_addresses[0][1], "alice@rsa.test", ["bob@relay.test"], content)
    await eventually(lambda: peer.messages)
    signed = peer.messages[0].content
    assert "From: Ålice <alice@rsa.test>\r\nSubject: Grüße\r\n".encode("utf-8") in signed
    assert dkim.verify(signed, dnsfunc=dnspython_txt(zone))
    key = keys[1][0]
    verdict = opendkim_verdict(signed, {key.record_name: key.public_record()}, tmp_path / "opendkim")
    assert opendkim_result(verdict, "rsa.test") == "pass", verdict


async def test_a_signature_made_upstream_over_8bit_fields_survives_the_relay(mailflow_server, smtp_peer, keys,
                                                                           tmp_path):
    """mail signed elsewhere over header fields with 8-bit bytes (UTF-8, Latin-1), relayed by mailflow (a backup MX,
    a smarthost) to a peer without SMTPUTF8: the fields go as they came, so the signature still verifies (mailflow
    made them RFC 2047 words, which broke it)."""
    upstream = make_key(keys[0], "upstream.test", "up", "rsa")
    nameserver, stop = start_zone(key_zone([upstream]))
    try:
        mf, peer = await relayed(mailflow_server, smtp_peer, keys)
        original = (b"From: Jos\xc3\xa9 M\xc3\xbcller <jose@upstream.test>\r\nTo: bob@relay.test\r\n"
                    b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n caf\xe9 cr\xe8me\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
                    b"Message-ID: <up@upstream.test>\r\n\r\nbody \xc3\xa9\r\n")
        signed = dkim_signed(upstream, original, (b"from", b"to", b"subject", b"date", b"message-id"))
        assert dkim.verify(signed, dnsfunc=dnspython_txt(nameserver))
        await send(mf.smtp_addresses[0][1], "jose@upstream.test", ["bob@relay.test"], signed)
        [relayed_message] = await eventually(lambda: peer.messages)
        assert relayed_message.content.endswith(signed)  # below mailflow's Received, byte for byte
        assert dkim.verify(relayed_message.content, dnsfunc=dnspython_txt(nameserver))
    finally:
        stop()
