"""DKIM body hashes computed while the body streams (mailflow.filters.senderauth.BodyHash) equal dkimpy's own
canonicalization of the whole body, for any body, split into chunks anywhere."""
from __future__ import annotations

import asyncio
import hashlib

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.content import Content
from mailflow.filters.senderauth import BodyHash, _hash_body

LINES = st.lists(st.sampled_from([b"", b" ", b"a", b"a  b", b"x\t", b"  lead", b"tail  ", b"\tmid \t end"]),
                 max_size=12)


def dkimpy_body(lines: list[bytes], final_newline: bool) -> bytes:
    """What dkimpy hashes: the body lines joined with CRLF (its rfc822_parse)."""
    return b"\r\n".join(lines + ([b""] if final_newline else []))


@settings(max_examples=300, deadline=None)
@given(lines=LINES, final_newline=st.booleans(), cut=st.integers(1, 7), relaxed=st.booleans(),
       length=st.one_of(st.none(), st.integers(0, 40)))
def test_streamed_body_hash_is_dkimpys(lines, final_newline, cut, relaxed, length):
    body = dkimpy_body(lines, final_newline)
    canon = (Relaxed if relaxed else Simple).canonicalize_body(body)
    expected = hashlib.sha256(canon if length is None else canon[:length]).digest()
    data = b"\r\n" + body  # the content after the header section starts with the empty line
    chunks = [data[i:i + cut] for i in range(0, len(data), cut)]
    hasher = BodyHash(b"relaxed" if relaxed else b"simple", b"rsa-sha256", length)
    asyncio.run(_hash_body(Content(chunks), [hasher]))
    assert hasher.digest() == expected
