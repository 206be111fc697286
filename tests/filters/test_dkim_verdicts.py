"""Inbound DKIM verdicts (mailflow.signing.dkim.verify) for signatures a hostile or broken sender writes, compared
with OpenDKIM's (verify mode, the verifier a Postfix setup runs as a milter) on the same message and key; and keys
that would cost the server's loop too much, for the verdicts and for the ARC seal's check of a chain."""
from __future__ import annotations

import asyncio
import base64
import random
import re
import threading

import dkim
import pytest

import mailflow.signing.dkim
from mailflow.content import Content
from mailflow.dns import AiodnsResolver, StaticResolver
from mailflow.message import read_header
from mailflow.signing import arc, keygen
from mailflow.signing.dkim import _StreamedBodyDKIM, checkers, verify
from tests.support import LoopLag
from tests.support.deliverability import dkim_signed, make_key, opendkim_verdict

MESSAGE = b"From: a@sig.test\r\nTo: b@rcpt.test\r\nSubject: hi\r\n\r\nhello world\r\n"
KEY_NAME = "sel._domainkey.sig.test"


@pytest.fixture(scope="module")
def signed_and_record(tmp_path_factory):
    key = make_key(tmp_path_factory.mktemp("key"), "sig.test", "sel")
    record = "".join(re.findall(r'"([^"]*)"', keygen.txt_record(key, 300)))
    return dkim_signed(key, MESSAGE), record


def _edit_signature(message: bytes, pattern: bytes, replacement: bytes) -> bytes:
    signature, rest = message.split(b"From: ", 1)
    edited = re.sub(pattern, replacement, signature, count=1)
    assert edited != signature
    return edited + b"From: " + rest


@pytest.mark.parametrize(("case", "edit", "expected"), [
    ("as signed", None, "pass"),
    ("body changed", lambda m: m.replace(b"hello", b"HELLO"), "fail"),
    ("subject changed", lambda m: m.replace(b"Subject: hi", b"Subject: ho"), "fail"),
    ("no bh=", lambda m: _edit_signature(m, rb" bh=[^;]*;", b""), "permerror"),
    ("v=2", lambda m: _edit_signature(m, rb"v=1;", b"v=2;"), "permerror"),
    ("unknown a=", lambda m: _edit_signature(m, rb"a=rsa-sha256", b"a=rsa-sha512"), "permerror"),
    ("x= past", lambda m: _edit_signature(m, rb"v=1;", b"v=1; x=1000000000;"), "permerror"),
    ("t= to come", lambda m: _edit_signature(m, rb"t=\d+", b"t=99999999999"), "permerror"),
])
async def test_a_signatures_verdict_is_opendkims(signed_and_record, tmp_path, case, edit, expected):
    signed, record = signed_and_record
    message = edit(signed) if edit else signed
    content = Content.of(message)
    head, _ = read_header(content, 1_000_000)
    results = await verify(head, content.after(len(head)), StaticResolver(txt={KEY_NAME: [record]}),
                           timeout=5, workers=checkers())
    assert [r.result for r in results] == [expected]
    opendkim = re.search(r"dkim=(\w+)", opendkim_verdict(message, {KEY_NAME: record}, tmp_path / "opendkim"))
    assert opendkim and opendkim.group(1) == expected  # (a permerror may name no header.d)


@pytest.mark.parametrize(("case", "record", "expected"), [
    ("a revoked key (p= empty)", lambda r: re.sub(r"p=[^;]*", "p=", r), "fail"),
    ("a key that is not base64", lambda r: re.sub(r"p=[^;]*", "p=@@not-a-key@@", r), "permerror"),
    ("base64 that is not a key", lambda r: re.sub(r"p=[^;]*", "p=aGVsbG8gd29ybGQ=", r), "permerror"),
    ("an unknown key type", lambda r: r.replace("k=rsa", "k=dsa"), "fail"),
    ("an unknown key version", lambda r: r.replace("v=DKIM1", "v=DKIM2"), "fail"),
])
async def test_a_key_record_that_cannot_be_used_gets_opendkims_verdict(signed_and_record, tmp_path, case, record,
                                                                       expected):
    """A hostile key record never raises out of verify (a p= that is not base64 did), and gets OpenDKIM's
    verdict: key material that cannot be decoded is permerror, a key refused for what it says is fail."""
    signed, good = signed_and_record
    edited = record(good)
    assert edited != good
    content = Content.of(signed)
    head, _ = read_header(content, 1_000_000)
    results = await verify(head, content.after(len(head)), StaticResolver(txt={KEY_NAME: [edited]}),
                           timeout=5, workers=checkers())
    assert [r.result for r in results] == [expected]
    opendkim = re.search(r"dkim=(\w+)", opendkim_verdict(signed, {KEY_NAME: edited}, tmp_path / "opendkim"))
    assert opendkim and opendkim.group(1) == expected


def _der(tag: int, body: bytes) -> bytes:
    length = len(body)
    size = bytes([length]) if length < 128 else bytes([0x80 | ((length.bit_length() + 7) // 8)]) + length.to_bytes(
        (length.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def rsa_key_record(modulus_bits: int, exponent_bits: int) -> str:
    """A key record of an RSA public key (SubjectPublicKeyInfo) of the sizes given: a modulus and an exponent of
    that many bits, whatever their values (a hostile signer's DNS chooses them)."""
    numbers = random.Random(modulus_bits * 7 + exponent_bits)

    def number(bits: int) -> bytes:
        value = numbers.getrandbits(bits) | (1 << (bits - 1)) | 1
        return _der(0x02, value.to_bytes(bits // 8 + 1, "big"))

    algorithm = bytes.fromhex("300d06092a864886f70d0101010500")  # rsaEncryption, NULL
    key = _der(0x30, algorithm + _der(0x03, b"\0" + _der(0x30, number(modulus_bits) + number(exponent_bits))))
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(key).decode()


def zone_txt(name: str, value: str) -> str:
    """A zone line for a TXT record of any length: strings of at most 255 characters."""
    strings = " ".join(f'"{value[at:at + 255]}"' for at in range(0, len(value), 255))
    return f"{name}. 300 IN TXT {strings}\n"


async def verify_timed(message: bytes, nameserver: str) -> tuple[list, LoopLag]:
    """The message's DKIM verdicts, its keys asked of `nameserver`, and what the check cost the event loop."""
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=2, tries=1)
    content = Content.of(message)
    head, _ = read_header(content, 1_000_000)
    try:
        async with LoopLag() as lag:
            results = await verify(head, content.after(len(head)), resolver, timeout=5, workers=checkers())
    finally:
        await resolver.close()
    return results, lag


@pytest.mark.parametrize(("modulus", "exponent", "reason"), [
    (16384, 16384, "public key too large: 16384 bits (at most 8192)"),  # 7 s of dkimpy's pow, the GIL held
    (8192, 8192, "public key exponent too large: 8192 bits (at most 64)"),  # 1 s of pow
])
async def test_a_key_too_costly_to_verify_with_is_permerror_at_once(signed_and_record, dns_zone, tmp_path, modulus,
                                                                    exponent, reason):
    """dkimpy's RSA is one pure-Python pow() whose cost the signer's key chooses, and which no timeout can cut:
    a key past MAX_KEY_BITS, or with an exponent past MAX_EXPONENT_BITS, is not used (permerror, as OpenDKIM,
    which refuses such key records too). Served over TCP by a real name server (the record is too big for UDP)."""
    signed, _ = signed_and_record
    record = rsa_key_record(modulus, exponent)
    results, lag = await verify_timed(signed, dns_zone(zone_txt(KEY_NAME, record)))
    # (the bound is loose, for a loaded host: the reason says the pow() was skipped; it would take 1 s at least)
    assert [(r.result, r.reason) for r in results] == [("permerror", reason)] and lag.longest < 0.5
    opendkim = re.search(r"dkim=(\w+)", opendkim_verdict(signed, {KEY_NAME: record}, tmp_path / "opendkim"))
    assert opendkim and opendkim.group(1) == "permerror"


async def test_an_arc_key_too_costly_to_verify_with_is_no_key_to_the_seals_check(signed_and_record, dns_zone,
                                                                                  tmp_path):
    """The ARC seal checks the chain already on a forwarded message with dkimpy's arc_verify, in a worker thread:
    whose pow() holds the GIL all the same. A costly key is given to it as no key: arc=fail, at once."""
    signed, _ = signed_and_record
    forwarder = make_key(tmp_path, "fwd.test", "arc")
    message = b"Authentication-Results: fwd.test; dkim=pass\r\n" + signed
    sealed = b"".join(dkim.arc_sign(message, b"arc", b"fwd.test", forwarder.private, b"fwd.test")) + message
    record = rsa_key_record(16384, 16384)
    resolver = AiodnsResolver(nameservers=(dns_zone(zone_txt("arc._domainkey.fwd.test", record)),),
                              timeout=2, tries=1)
    try:
        async with LoopLag() as lag:
            results = await arc.authentication_results(sealed, "me.test", resolver, checkers())
    finally:
        await resolver.close()
    assert results.endswith("; arc=fail") and lag.longest < 0.5  # (the pow() it stops: 7 s)


def _fields(n: int) -> bytes:
    return b"".join(b"X-F%d: v\r\n" % i for i in range(n))


@pytest.mark.parametrize(("case", "fields", "signed", "expected"), [
    ("h= of 20 000 names", 950, [b"n%d" % i for i in range(20_000)], "h= names 20001 fields (at most 1000)"),
    ("12 000 header fields", 12_000, [b"n%d" % i for i in range(900)], "header section of 12004 fields (at most 1000)"),
    ("600 fields, 512 signed", 600, [b"x-f%d" % i for i in range(512)], ""),
])
async def test_a_signature_over_too_many_header_fields_is_permerror_at_once(dns_zone, tmp_path, case, fields, signed,
                                                                            expected):
    """dkimpy selects the signed fields by looking for each name of h= among the fields from the last: 20 000 names
    over 950 fields held the server's loop 0.7 s, 10 000 over 10 000 fields 4 s, per signature. Past
    MAX_SIGNED_FIELDS names or MAX_HEADER_FIELDS fields a signature is permerror, unchecked (OpenDKIM, in C,
    checks them); within both it is checked as OpenDKIM checks it (which fails an h= of 900 names)."""
    message = MESSAGE.replace(b"Subject: hi\r\n", b"Subject: hi\r\n" + _fields(fields))
    key = make_key(tmp_path, "sig.test", "sel")
    record = "".join(re.findall(r'"([^"]*)"', keygen.txt_record(key, 300)))
    signed_message = dkim.sign(message, b"sel", b"sig.test", key.private, include_headers=[b"from", *signed]) + message
    results, lag = await verify_timed(signed_message, dns_zone(zone_txt(KEY_NAME, record)))
    assert [(r.result, r.reason) for r in results] == [("permerror", expected) if expected else ("pass", "")]
    assert lag.longest < 0.5  # (loose, for a loaded host: the verdict's reason says the selection was skipped)
    if not expected:
        verdict = opendkim_verdict(signed_message, {KEY_NAME: record}, tmp_path / "opendkim")
        assert re.search(r"dkim=(\w+)", verdict).group(1) == "pass"


async def test_many_messages_at_once_with_the_default_executor_busy_all_pass(signed_and_record):
    """The checks ran in the default executor (the queue's fsyncs', the mailbox writes') and the key's timeout
    counted the wait for its thread: with that executor busy, or many messages checked at once, valid signatures
    came back temperror "key lookup failed" (100 messages x 5 signatures: 484), everyone's DKIM and DMARC results
    turned by whoever sent the load. The checks have threads of their own (dkim.checkers) and only the key's fetch
    is timed."""
    signed, record = signed_and_record
    content = Content.of(signed)
    head, _ = read_header(content, 1_000_000)
    resolver = StaticResolver(txt={KEY_NAME: [record]})
    workers = checkers()
    release = threading.Event()
    loop = asyncio.get_running_loop()
    busy = [loop.run_in_executor(None, release.wait, 10) for _ in range(40)]  # (every default thread: fsyncs)
    try:
        results = await asyncio.gather(*(verify(head, content.after(len(head)), resolver, timeout=0.5,
                                                workers=workers) for _ in range(60)))
    finally:
        release.set()
        await asyncio.gather(*busy)
        workers.close()
    assert [r.result for verdicts in results for r in verdicts] == ["pass"] * 60


async def test_a_check_no_thread_takes_is_a_temperror_saying_so(signed_and_record, monkeypatch):
    monkeypatch.setattr(mailflow.signing.dkim, "CHECKERS_WAIT", 0.2)
    signed, record = signed_and_record
    content = Content.of(signed)
    head, _ = read_header(content, 1_000_000)
    workers = checkers()
    release = threading.Event()
    hung = [asyncio.ensure_future(workers.run(lambda: release.wait(10))) for _ in range(mailflow.signing.dkim.CHECKERS)]
    try:
        [result] = await verify(head, content.after(len(head)), StaticResolver(txt={KEY_NAME: [record]}), timeout=5,
                                workers=workers)
    finally:
        release.set()
        await asyncio.gather(*hung)
        workers.close()
    assert (result.result, result.reason) == ("temperror", "no worker free for DKIM checks within 0.2s: 2 busy")


async def test_signatures_at_the_field_limits_are_checked_off_the_event_loop(dns_zone, tmp_path, monkeypatch):
    """Five signatures (MAX_SIGNATURES), each over 990 fields and an h= of 995 names, within the bounds: dkimpy's
    quadratic selection of each held the server's loop 0.1 s, one signature after another. The check of a
    signature (selection, header hash, RSA) runs in a worker thread, its key fetched on the loop."""
    threads: list[threading.Thread] = []
    checked = _StreamedBodyDKIM.verify_sig_process

    def watched(self, *args):
        threads.append(threading.current_thread())
        return checked(self, *args)

    monkeypatch.setattr(_StreamedBodyDKIM, "verify_sig_process", watched)
    message = MESSAGE.replace(b"Subject: hi\r\n", b"Subject: hi\r\n" + _fields(990))
    names = [b"from", b"subject"] + [b"x-f%d" % i for i in range(990)] + [b"x-absent"] * 3
    zone = ""
    for number in range(5):
        key = make_key(tmp_path, "sig.test", f"s{number}")
        zone += zone_txt(f"s{number}._domainkey.sig.test", "".join(re.findall(r'"([^"]*)"',
                                                                             keygen.txt_record(key, 300))))
        message = dkim.sign(message, key.selector.encode(), b"sig.test", key.private, include_headers=names) + message
    results, _ = await verify_timed(message, dns_zone(zone))
    assert [r.result for r in results] == ["pass"] * 5
    assert len(threads) == 5 and threading.current_thread() not in threads


@pytest.mark.parametrize(("case", "fields", "signed", "reason"), [
    ("an ARC-Message-Signature over 20 000 names", 950, 20_000, "h= names more than 1000 fields"),
    ("a header section of 5000 fields", 5000, 0, "header section of 5008 fields"),
])
async def test_a_chain_too_costly_to_check_is_forwarded_unsealed_at_once(signed_and_record, tmp_path, monkeypatch,
                                                                         case, fields, signed, reason):
    """dkimpy checks a chain with the same quadratic selection of the signed fields as a DKIM signature's: an
    ARC set sealed by its own signer over an ARC-Message-Signature of 20 000 names and 950 fields cost 0.7 s of a
    worker thread's CPU (and of the GIL). Such a message, or one of more than MAX_HEADER_FIELDS fields, is not
    sealed (DKIMException: forwarded unsealed, logged), at once; a chain within bounds is sealed."""
    signed_message, record = signed_and_record
    forwarder = make_key(tmp_path, "fwd.test", "arc")
    forwarder_record = "".join(re.findall(r'"([^"]*)"', keygen.txt_record(forwarder, 300)))
    resolver = StaticResolver(txt={KEY_NAME: [record], "arc._domainkey.fwd.test": [forwarder_record]})
    message = b"Authentication-Results: fwd.test; dkim=pass\r\n" + signed_message.replace(
        b"Subject: hi\r\n", b"Subject: hi\r\n" + _fields(fields))
    names = [b"from", *(b"n%d" % i for i in range(signed))]
    hostile = b"".join(dkim.arc_sign(message, b"arc", b"fwd.test", forwarder.private, b"fwd.test",
                                     include_headers=names)) + message
    checked = []
    real_check = arc.authentication_results

    async def check(*args):
        checked.append(args[0])
        return await real_check(*args)
    monkeypatch.setattr(arc, "authentication_results", check)
    with pytest.raises(dkim.DKIMException, match=f"not sealed: .*{reason}"):
        await arc.seal(hostile, forwarder, "me.test", resolver, 0, checkers())
    # at once: the chain's check (0.7 s of CPU and more under load) is never begun; a time bound on a loaded
    # 2-vCPU host (the full suite beside other work) failed now and then
    assert checked == []
    plain = b"Authentication-Results: fwd.test; dkim=pass\r\n" + signed_message
    within = b"".join(dkim.arc_sign(plain, b"arc", b"fwd.test", forwarder.private, b"fwd.test")) + plain
    assert b"ARC-Seal: i=2; cv=pass;" in await arc.seal(within, forwarder, "me.test", resolver, 0, checkers())
    assert checked == [within]  # (the check is what it was: the bound skipped it above)
