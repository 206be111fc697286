"""DKIM body hashes computed while the body streams (mailflow.signing.dkim.BodyHash, the one canonicalization that
signing and inbound verification share) equal dkimpy's own canonicalization of the whole body, for any body, split
into chunks anywhere, in simple and relaxed canonicalization, with and without l=."""
from __future__ import annotations

import asyncio
import hashlib

from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.content import Content
from mailflow.signing.dkim import LONG_LINE, BodyHash, feed_body

LINES = st.lists(st.sampled_from([b"", b" ", b"a", b"a  b", b"x\t", b"  lead", b"tail  ", b"\tmid \t end"]),
                 max_size=12)


def dkimpy_body(lines: list[bytes], final_newline: bool) -> bytes:
    """What dkimpy hashes: the body lines joined with CRLF (its rfc822_parse)."""
    return b"\r\n".join(lines + ([b""] if final_newline else []))


def expected(body: bytes, relaxed: bool, length: int | None) -> bytes:
    canon = (Relaxed if relaxed else Simple).canonicalize_body(body)
    return hashlib.sha256(canon if length is None else canon[:length]).digest()


def streamed(body: bytes, cut: int, relaxed: bool, length: int | None) -> bytes:
    data = b"\r\n" + body  # the content after the header section starts with the empty line
    hasher = BodyHash(hashlib.sha256(), relaxed=relaxed, length=length)
    asyncio.run(feed_body(Content([data[i:i + cut] for i in range(0, len(data), cut)]), [hasher]))
    return hasher.digest()


@settings(max_examples=100, deadline=None)
@given(lines=LINES, final_newline=st.booleans(), cut=st.integers(1, 7), relaxed=st.booleans(),
       length=st.one_of(st.none(), st.integers(0, 40)))
def test_streamed_body_hash_is_dkimpys(lines, final_newline, cut, relaxed, length):
    body = dkimpy_body(lines, final_newline)
    assert streamed(body, cut, relaxed, length) == expected(body, relaxed, length)


def test_a_line_longer_than_the_limit_is_hashed_without_being_held():
    for relaxed in (False, True):
        bodies = (b"a b  " * LONG_LINE + b"\r\n\r\nend  \r\n\r\n", b"x\t" * LONG_LINE, b"y" * (3 * LONG_LINE) + b"\r")
        for body in bodies:
            assert streamed(body, 50_000, relaxed, None) == expected(body, relaxed, None), (relaxed, body[-10:])
