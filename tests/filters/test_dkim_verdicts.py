"""Inbound DKIM verdicts (mailflow.signing.dkim.verify) for signatures a hostile or broken sender writes, compared
with OpenDKIM's (verify mode, the verifier a Postfix setup runs as a milter) on the same message and key."""
from __future__ import annotations

import re

import pytest

from mailflow.content import Content
from mailflow.dns import StaticResolver
from mailflow.message import read_header
from mailflow.signing import keygen
from mailflow.signing.dkim import verify
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
    results = await verify(head, content.after(len(head)), StaticResolver(txt={KEY_NAME: [record]}), timeout=5)
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
    results = await verify(head, content.after(len(head)), StaticResolver(txt={KEY_NAME: [edited]}), timeout=5)
    assert [r.result for r in results] == [expected]
    opendkim = re.search(r"dkim=(\w+)", opendkim_verdict(signed, {KEY_NAME: edited}, tmp_path / "opendkim"))
    assert opendkim and opendkim.group(1) == expected
