"""DKIM signatures (RFC 6376, RFC 8463) over a queued message, without holding its body.

    RelaxedBody(hasher)             the relaxed body canonicalization (RFC 6376 3.4.4) fed chunk by chunk:
                                    feed(bytes), digest() -> the body hash; holds at most a line's trailing white
                                    space and the count of empty lines seen last (never a line or the body)
    await body_hash(content, algorithm) -> bytes     the relaxed body hash of a Content, read as a stream
    header_fields_to_sign(head) -> [name]            dkimpy's RFC 6376 list of the fields present, From once more
    sign_header_set(head, key, body_hash, now) -> bytes   the `DKIM-Signature:` field (CRLF-terminated)
    await sign(head, body, key, now) -> bytes        both: the body hash streamed, the header set signed in a
                                                     worker thread (RSA is CPU work)
    sign_now(head, body, key, now) -> bytes          the same at once, for a small body held in memory (a notice)

How memory stays bounded: dkimpy canonicalizes and hashes a body it holds whole. Here the body is streamed
through `RelaxedBody` (64 KB chunks from the queue file for a big message), which computes the same hash (the
unit tests compare it with dkimpy's on many bodies), and dkimpy is given only the header section to canonicalize,
hash and sign (`DKIM.gen_header`, with our body hash in bh=). The signature: relaxed/relaxed, a= rsa-sha256 or
ed25519-sha256 by the key, d= and s= from the KeyTable, t= from the injected clock, the header fields of dkimpy's
RFC 6376 list that are present (From, Sender, Reply-To, Subject, Date, Message-ID, To, Cc, MIME-Version,
Content-*, In-Reply-To, References, List-*), From signed once more than present (oversigned: a second From added
later breaks the signature).
Like dkimpy, a bare LF in the body counts as a line end.

Failure behaviour: `dkim.DKIMException` (a header section dkimpy cannot parse, a key it refuses) propagates; the
caller (cleanup) queues the message unsigned and logs why. OSError from reading a spooled body propagates.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import re

import dkim
import nacl.encoding
import nacl.signing
from dkim.canonicalization import CanonicalizationPolicy

from mailflow.content import Content
from mailflow.signing.keytables import SigningKey

_WSP = re.compile(rb"[\t ]+")
LONG_LINE = 64 * 1024  # past this, a line without its end yet is hashed up to its trailing white space
RELAXED = b"relaxed/relaxed"


class RelaxedBody:
    """See the module docstring."""

    def __init__(self, hasher=None):
        self._hash = hasher or hashlib.sha256()
        self._partial = b""  # the current line so far (raw), or its trailing white space once it started
        self._started = False  # part of the current line is hashed already (so the line is not empty)
        self._empty = 0  # empty lines held back: trailing ones are dropped

    def feed(self, data: bytes) -> None:
        if not data:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._end_line(line[:-1] if line.endswith(b"\r") else line)
        if len(self._partial) > LONG_LINE:
            self._spill()

    def digest(self) -> bytes:
        if self._partial or self._started:  # a last line without its end: given one, its white space kept (dkimpy)
            self._end_line(self._partial, final=True)
            self._partial = b""
        return self._hash.digest()

    def _end_line(self, raw: bytes, final: bool = False) -> None:
        text = _WSP.sub(b" ", raw)
        if not final:
            text = text.rstrip(b" ")
        if not text and not self._started:
            self._empty += 1
            return
        self._flush_empty()
        self._hash.update(text + b"\r\n")
        self._started = False

    def _spill(self) -> None:
        """A long line still without its end: hash it up to its trailing white space (which may yet end it)."""
        text = _WSP.sub(b" ", self._partial)
        keep_cr = text.endswith(b"\r")
        body = text[:-1] if keep_cr else text
        certain = body.rstrip(b" ")
        if not certain:
            self._partial = text
            return
        self._flush_empty()
        self._hash.update(certain)
        self._started = True
        self._partial = body[len(certain):] + (b"\r" if keep_cr else b"")

    def _flush_empty(self) -> None:
        if self._empty:
            self._hash.update(b"\r\n" * self._empty)
            self._empty = 0


async def body_hash(content: Content, algorithm: str) -> bytes:
    canonical = RelaxedBody(dkim.HASH_ALGORITHMS[algorithm.encode("ascii")]())
    async for chunk in content.stream():
        canonical.feed(chunk)
    return canonical.digest()


class _HeaderSigner(dkim.DKIM):
    """dkimpy's DKIM, given the header section only, signing with a body hash computed elsewhere."""

    def sign_with_body_hash(self, key: SigningKey, bh: bytes, now: int) -> bytes:
        algorithm = key.algorithm.encode("ascii")
        self.signature_algorithm = algorithm
        self.hasher = dkim.HASH_ALGORITHMS[algorithm]
        include = tuple(name.lower() for name in self.default_sign_headers())
        if b"from" not in include:
            raise dkim.ParameterError("The From header field MUST be signed")
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", RELAXED),
            (b"d", key.domain.encode("ascii")),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(now).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(bh)),
            (b"b", b"0" * 60),  # folds b= onto a line of its own, as dkimpy's sign does
        ]
        policy = CanonicalizationPolicy.from_c_value(RELAXED)
        return b"DKIM-Signature: " + self.gen_header(fields, include, policy, b"DKIM-Signature", _private(key))


def _private(key: SigningKey):
    return _parsed_key(key.algorithm, key.private)


@functools.lru_cache(maxsize=64)
def _parsed_key(algorithm: str, private: bytes):
    """The key as dkimpy's signing takes it, parsed once (a process has a handful of keys)."""
    if algorithm == "ed25519-sha256":
        return nacl.signing.SigningKey(private, encoder=nacl.encoding.Base64Encoder)
    return dkim.parse_pem_private_key(private)


def header_fields_to_sign(head: bytes) -> list[str]:
    return [name.decode("latin-1") for name in _HeaderSigner(head + b"\r\n").default_sign_headers()]


def sign_header_set(head: bytes, key: SigningKey, bh: bytes, now: int) -> bytes:
    """See the module docstring. `head` is the header section as it will be sent (its final CRLF included)."""
    return _HeaderSigner(head + b"\r\n").sign_with_body_hash(key, bh, now)


async def sign(head: bytes, body: Content, key: SigningKey, now: float) -> bytes:
    """See the module docstring. `body` is everything after the header section (the empty line first)."""
    bh = await body_hash(body.after(_blank_line(body)), key.algorithm)
    return await asyncio.to_thread(sign_header_set, head, key, bh, int(now))


def sign_now(head: bytes, body: Content, key: SigningKey, now: float) -> bytes:
    canonical = RelaxedBody(dkim.HASH_ALGORITHMS[key.algorithm.encode("ascii")]())
    for chunk in body.after(_blank_line(body)).chunks():
        canonical.feed(chunk)
    return sign_header_set(head, key, canonical.digest(), int(now))


def _blank_line(body: Content) -> int:
    """The length of the empty line that separates the header section from the body (0 when there is none)."""
    start = body.read_prefix(2)
    return 2 if start == b"\r\n" else 1 if start[:1] == b"\n" else 0
