"""DKIM signatures (RFC 6376, RFC 8463) over a queued message, without holding its body; and the one streamed body
canonicalization, which inbound verification (mailflow.filters.senderauth) uses too.

    BodyHash(hasher, relaxed=True, length=None)   the body canonicalization (RFC 6376 3.4.3 simple, 3.4.4 relaxed)
                                    fed chunk by chunk, hashing at most `length` bytes (l=): feed(bytes), digest()
                                    -> the body hash; holds at most a line's trailing white space and the count of
                                    empty lines seen last (never a line or the body)
    await feed_body(body, hashers)  what follows a header section (its empty line first) to each BodyHash
    await body_hash(content, algorithm) -> bytes     the relaxed body hash of a Content, read as a stream
    header_fields_to_sign(head) -> [name]            dkimpy's RFC 6376 list of the fields present, From once more
    sign_header_set(head, key, body_hash, now) -> bytes   the `DKIM-Signature:` field (CRLF-terminated)
    await sign(head, body, key, now) -> bytes        both: the body hash streamed, the header set signed in a
                                                     worker thread (RSA is CPU work)
    sign_now(head, body, key, now) -> bytes          the same at once, for a small body held in memory (a notice)
    await verify(head, body, resolver, timeout, workers) -> (DkimResult, ...)   each DKIM-Signature of a message
                                    (at most MAX_SIGNATURES), the body hashed as it streams, once per
                                    (canonicalization, algorithm, l=), the keys through the Resolver, looked up at
                                    once (each within `timeout`), each check in one of `workers` (a BoundedWorkers
                                    of the caller's own, `checkers()`): smtpd's verdicts and the ARC seal
    checkers() -> BoundedWorkers    a pool for verify's checks (CHECKERS threads)
    DkimResult(result, domain, selector, reason)     result: pass, fail, temperror, permerror
    costly_key(record) -> str       why a key record's RSA key would cost too much to verify with ("" when not):
                                    its modulus past MAX_KEY_BITS or its exponent past MAX_EXPONENT_BITS (verify's
                                    permerror; the ARC seal's lookup gives no key for it)

How memory stays bounded: dkimpy canonicalizes and hashes a body it holds whole. Here the body is streamed
through `BodyHash` (64 KB chunks from the queue file for a big message), which computes the same hash (the
unit tests compare it with dkimpy's on many bodies), and dkimpy is given only the header section: it picks,
canonicalizes and hashes the header fields and folds the DKIM-Signature field, as its own sign() does; the signature
itself is made by `cryptography` (OpenSSL: about 1 ms for RSA-2048, where dkimpy's pure-Python RSA takes 30). The
signature: relaxed/relaxed, a= rsa-sha256 or ed25519-sha256 by the key, d= and s= from the KeyTable, t= from the
injected clock, the header fields of dkimpy's RFC 6376 list that are present (From, Sender, Reply-To, Subject, Date,
Message-ID, To, Cc, MIME-Version, Content-*, In-Reply-To, References, List-*), From signed once more than present
(oversigned: a second From added later breaks the signature).
Like dkimpy, a bare LF in the body counts as a line end; an empty body is one CRLF in simple canonicalization, nothing
in relaxed; a last line without its end is given one (relaxed: its white space made one space, not removed).

Verifying is the same split: dkimpy checks the signature over the header section, and its bh= is compared with the
hash BodyHash computed while the body streamed. dkimpy's RSA is pure Python: one pow() of the signature by the key,
which holds its thread and the GIL (a worker thread too) until it ends and cannot be cut by a timeout; its cost is
the key's, which the signer's DNS chooses (a 16384-bit modulus with a 16384-bit exponent: 7 s; 65536 bits: minutes).
So an RSA key is used only up to MAX_KEY_BITS (8192; RFC 8301's verifiers take 1024 to 4096) with an exponent
of at most MAX_EXPONENT_BITS (64, OpenSSL's limit beside a modulus over 3072 bits; 65537 in practice): at most
about 10 ms a signature. dkimpy's selection of the signed header fields is quadratic too (each name of h= looked
for among the fields, from the last): 10 000 names over 10 000 fields held the loop 4 s; a signature is checked
only for a header section of at most MAX_HEADER_FIELDS fields and an h= of at most MAX_SIGNED_FIELDS names (1000:
about 40-110 ms at worst; OpenDKIM checks 3000 x 3000 in C), else permerror. That check (the selection, the header
hash, the RSA) runs in a thread of the caller's `workers` (CHECKERS threads, not the default executor that the
queue's fsyncs and the mailbox writes share), its key fetched first on the loop: five such signatures held the loop
0.1 s each. Only the key's fetch is timed (`timeout`): the check's input is bounded, and a wait for a thread while
other messages' checks run is no failure of the signer's DNS (counted in, 100 messages of 5 signatures at once
gave 484 temperrors for valid signatures).

Failure behaviour: signing: `dkim.DKIMException` (a header section dkimpy cannot parse, a key it refuses) propagates;
the caller (cleanup) queues the message unsigned and logs why. Verifying raises nothing for a message or an answer:
a key that cannot be fetched within `timeout` is temperror ("key lookup failed"), and so is a check no thread
took (`workers` hung: "no worker free for DKIM checks…"); a signature that cannot be checked (a tag missing or
malformed, an unknown a=, x= past, t= to come) or whose key record holds key material that cannot be decoded
(p= not base64, or not a key) or costs too much (`costly_key`) permerror, as OpenDKIM reports it, and so is one
over too many header fields (MAX_HEADER_FIELDS, MAX_SIGNED_FIELDS); a key that is
missing, revoked (p= empty) or of an unknown type or version, or a body or header section that is not the one signed,
fail. OSError from reading a spooled body propagates.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
from dataclasses import dataclass

import dkim
import dkim.asyncsupport
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError
from dkim.util import InvalidTagValueList, parse_tag_value

from mailflow.content import Content
from mailflow.dns import NotFound, Resolver
from mailflow.errors import LookupRetry, TemporaryError
from mailflow.message import header_fields
from mailflow.workers import BoundedWorkers
from mailflow.signing.keytables import SigningKey
from mailflow.syntax import ascii_digits

log = logging.getLogger("mailflow.dkim")

_WSP = re.compile(rb"[\t ]+")
LONG_LINE = 64 * 1024  # past this, a line without its end yet is hashed up to its trailing white space
RELAXED = b"relaxed/relaxed"


class BodyHash:
    """See the module docstring. Each chunk is canonicalized whole by regular expressions (as dkimpy does a whole
    body), up to its last line end; what follows it waits for the next chunk."""

    def __init__(self, hasher=None, *, relaxed: bool = True, length: int | None = None):
        hasher = hasher or hashlib.sha256()
        self._hash = hasher if length is None else _Limited(hasher, length)
        self._relaxed = relaxed
        self._partial = b""  # the current line so far (raw), or its trailing white space once it started
        self._started = False  # part of the current line is hashed already (so the line is not empty)
        self._empty = 0  # empty lines held back: trailing ones are dropped
        self._hashed = False  # anything hashed (simple: an empty body is one CRLF)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            self._lines(_canonical(data[:cut], self._relaxed))
        if len(self._partial) > LONG_LINE:
            self._spill()

    def digest(self) -> bytes:
        if self._partial or self._started:  # a last line without its end: given one, its white space kept (dkimpy)
            self._flush_empty()
            self._update((_WSP.sub(b" ", self._partial) if self._relaxed else self._partial) + b"\r\n")
            self._partial, self._started = b"", False
        elif not self._hashed and not self._relaxed:
            self._update(b"\r\n")
        return self._hash.digest()

    def _update(self, data: bytes) -> None:
        self._hashed = True
        self._hash.update(data)

    def _lines(self, text: bytes) -> None:
        """Canonical complete lines: hashed, except a run of empty lines at the end (held: it may be the body's)."""
        if self._started:  # the rest of a line that was spilled: not an empty line, whatever is left of it
            end = text.index(b"\r\n") + 2
            self._update(text[:end])
            self._started = False
            text = text[end:]
        content_end = len(text) - 2  # before the last line end; then before each empty line at the end
        while content_end >= 2 and text.startswith(b"\r\n", content_end - 2):
            content_end -= 2
        if content_end == 0 and text.startswith(b"\r\n"):  # nothing but empty lines
            self._empty += len(text) // 2
            return
        self._flush_empty()
        self._update(text[:content_end + 2])  # up to the last non-empty line, with its line end
        self._empty = (len(text) - content_end) // 2 - 1

    def _spill(self) -> None:
        """A long line still without its end: hash it up to what may yet end it (a CR; relaxed: trailing white
        space, which its line end would remove)."""
        text = _WSP.sub(b" ", self._partial) if self._relaxed else self._partial
        keep_cr = text.endswith(b"\r")
        body = text[:-1] if keep_cr else text
        certain = body.rstrip(b" ") if self._relaxed else body
        if not certain:
            self._partial = text
            return
        self._flush_empty()
        self._update(certain)
        self._started = True
        self._partial = body[len(certain):] + (b"\r" if keep_cr else b"")

    def _flush_empty(self) -> None:
        if self._empty:
            self._update(b"\r\n" * self._empty)
            self._empty = 0


class _Limited:
    """A hash object that takes only the first `length` bytes given (a signature's l=)."""

    def __init__(self, hasher, length: int):
        self._hasher, self._left = hasher, length

    def update(self, data: bytes) -> None:
        if self._left > 0:
            self._hasher.update(data[:self._left])
            self._left -= min(len(data), self._left)

    def digest(self) -> bytes:
        return self._hasher.digest()


_LINE_END = re.compile(rb"\r?\n")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_TO_CHANGE = re.compile(rb"[\t ]{2,}|\t")  # runs that are not already one space


def _canonical(lines: bytes, relaxed: bool) -> bytes:
    """Complete lines: every line end CRLF (a bare LF too, as dkimpy reads a message); relaxed, white space at line
    ends removed, other runs of white space made one space (dkimpy's order). Each step runs only when a substring
    search says it has something to change: most text has no tab, no double space and no trailing space."""
    if lines.count(b"\n") != lines.count(b"\r\n"):
        lines = _LINE_END.sub(b"\r\n", lines)
    if not relaxed:
        return lines
    if b" \r\n" in lines or b"\t\r\n" in lines:
        lines = _TRAILING_WSP.sub(b"\r\n", lines)
    if b"  " in lines or b"\t" in lines:
        lines = _WSP_TO_CHANGE.sub(b" ", lines)
    return lines


async def body_hash(content: Content, algorithm: str) -> bytes:
    canonical = BodyHash(dkim.HASH_ALGORITHMS[algorithm.encode("ascii")]())
    async for chunk in content.stream():
        canonical.feed(chunk)
    return canonical.digest()


async def feed_body(body: Content, hashers: list[BodyHash]) -> None:
    """See the module docstring."""
    if not hashers:
        return
    async for chunk in body.after(_blank_line(body)).stream():
        for hasher in hashers:
            hasher.feed(chunk)


class _HeaderSigner(dkim.DKIM):
    """dkimpy's DKIM given the header section only: dkimpy chooses, canonicalizes and hashes the header fields and
    folds the field; the body hash comes from BodyHash, the signature from `cryptography` (OpenSSL): dkimpy's own
    pure-Python RSA takes some 30 ms a signature, OpenSSL about one."""

    def sign_with_body_hash(self, key: SigningKey, bh: bytes, now: int) -> bytes:
        algorithm = key.algorithm.encode("ascii")
        self.signature_algorithm = algorithm
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
            (b"b", b"0" * 60),  # folds b= onto a line of its own, so that the signed field folds the same
        ]
        # The header hash covers this field with b= empty (RFC 6376 3.7), folded as dkimpy's gen_header folds it.
        unsigned = dkim.RE_BTAG.sub(b"\\1", dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(FIELD)))
        hasher = hashlib.sha256()
        policy = CanonicalizationPolicy.from_c_value(RELAXED)
        self.signed_headers = dkim.hash_headers(hasher, policy, policy.canonicalize_headers(self.headers), include,
                                                (FIELD, b" " + unsigned), dict(fields))
        fields[-1] = (b"b", base64.b64encode(_signature(key, hasher.digest())))
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(FIELD))
        return FIELD + b": " + value


FIELD = b"DKIM-Signature"


def _signature(key: SigningKey, digest: bytes) -> bytes:
    private = _parsed_key(key.algorithm, key.private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 hash
    return private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@functools.lru_cache(maxsize=64)
def _parsed_key(algorithm: str, private: bytes):
    """The key as `cryptography` signs with it, parsed once (a process has a handful of keys)."""
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(private))
    return serialization.load_pem_private_key(private, password=None)


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
    canonical = BodyHash(dkim.HASH_ALGORITHMS[key.algorithm.encode("ascii")]())
    for chunk in body.after(_blank_line(body)).chunks():
        canonical.feed(chunk)
    return sign_header_set(head, key, canonical.digest(), int(now))


def _blank_line(body: Content) -> int:
    """The length of the empty line that separates the header section from the body (0 when there is none)."""
    start = body.read_prefix(2)
    return 2 if start == b"\r\n" else 1 if start[:1] == b"\n" else 0


# ---------------------------------------------------------------------------------------------- verifying

MAX_SIGNATURES = 5  # DKIM-Signature fields verified per message (a message cannot ask for more work than this)
MAX_HEADER_FIELDS = 1000  # a header section's fields, for a signature to be checked (see `_costly_selection`)
MAX_SIGNED_FIELDS = 1000  # the names of a signature's h=
MAX_KEY_BITS = 8192  # an RSA key's modulus (see the module docstring: what a key costs)
MAX_EXPONENT_BITS = 64  # an RSA key's public exponent
CHECKERS = 2  # threads of a verify pool (`checkers`): the checks are CPU work under the GIL, no more would run at once
CHECKERS_WAIT = 30.0  # seconds without any check ending before a wait for a thread gives up (they look hung)
_HASHES = {b"rsa-sha256": hashlib.sha256, b"rsa-sha1": hashlib.sha1, b"ed25519-sha256": hashlib.sha256}


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass, fail, neutral, temperror, permerror
    domain: str = ""
    selector: str = ""
    reason: str = ""


def checkers() -> BoundedWorkers:
    """A pool for `verify`'s checks (they only read: daemon threads)."""
    return BoundedWorkers(CHECKERS, CHECKERS_WAIT, "DKIM checks", daemon=True)


async def verify(head: bytes, body: Content, resolver: Resolver, timeout: float,
                 workers: BoundedWorkers) -> tuple[DkimResult, ...]:
    """See the module docstring. `body` is everything after the header section (the empty line first)."""
    signatures: list[dict[bytes, bytes] | None] = []  # parsed tags (None: unparsable)
    fields = 0
    for name, lines in header_fields(head):
        fields += 1
        if name == "dkim-signature" and len(signatures) < MAX_SIGNATURES:
            value = b"".join(lines).partition(b":")[2]
            try:
                signatures.append(parse_tag_value(value))
            except InvalidTagValueList:
                signatures.append(None)
    if not signatures:
        return ()
    hashers = {key: _body_hasher(*key) for sig in signatures if sig and (key := _body_key(sig)) is not None}
    await feed_body(body, list(hashers.values()))
    digests = {key: h.digest() for key, h in hashers.items()}
    message = (head if head.endswith(b"\n") else head + b"\r\n") + b"\r\n"
    # at once: the key lookups of one message share the one `timeout` (one after another, each signature of a
    # slow domain would add its own)
    return tuple(await asyncio.gather(*(_verify_one(message, fields, index, sig, digests, resolver, timeout, workers)
                                        for index, sig in enumerate(signatures))))


def _costly_selection(fields: int, sig: dict[bytes, bytes]) -> str:
    """Why selecting the signed header fields would cost too much (dkimpy's selection is quadratic: each name of
    h= looked for among the fields from the end): a header section past MAX_HEADER_FIELDS fields, or h= past
    MAX_SIGNED_FIELDS names; "" when it would not."""
    if fields > MAX_HEADER_FIELDS:
        return f"header section of {fields} fields (at most {MAX_HEADER_FIELDS})"
    signed = sig.get(b"h", b"").count(b":") + 1
    if signed > MAX_SIGNED_FIELDS:
        return f"h= names {signed} fields (at most {MAX_SIGNED_FIELDS})"
    return ""


async def _verify_one(message: bytes, fields: int, index: int, sig: dict[bytes, bytes] | None,
                      digests: dict[tuple[bytes, bytes, int | None], bytes], resolver: Resolver,
                      timeout: float, workers: BoundedWorkers) -> DkimResult:
    if sig is None:
        return DkimResult("permerror", reason="malformed signature")
    domain = sig.get(b"d", b"").decode("ascii", "replace")
    selector = sig.get(b"s", b"").decode("ascii", "replace")
    costly = _costly_selection(fields, sig)
    if costly:
        return DkimResult("permerror", domain, selector, costly)
    key = _body_key(sig)
    verifier = _StreamedBodyDKIM(message, logger=log, timeout=timeout)
    verifier.body_hash = digests.get(key) if key is not None else None
    verifier.workers = workers

    async def key_record(name: bytes, timeout: float = timeout) -> bytes | None:
        try:  # (asyncio.timeout, not wait_for, whose frame would hold its task, and the task a failure held by it)
            async with asyncio.timeout(timeout):
                records = await resolver.txt(name.decode("ascii", "replace").rstrip("."))
        except NotFound:
            return None
        return records[0].encode() if records else None

    try:
        ok = await verifier.verify(idx=index, dnsfunc=key_record)
    except (LookupRetry, TimeoutError):
        return DkimResult("temperror", domain, selector, "key lookup failed")
    except TemporaryError as e:  # (no thread of `workers` free: they look hung)
        return DkimResult("temperror", domain, selector, e.text[:80])
    except BodyHashMismatch as e:
        return DkimResult("fail", domain, selector, str(e))
    except dkim.DKIMException as e:  # (dkimpy's ValidationError too: a tag missing or bad, x= past, t= to come)
        return DkimResult("permerror", domain, selector, str(e)[:80])
    return DkimResult("pass" if ok else "fail", domain, selector, "" if ok else "signature verification failed")


def costly_key(record: bytes) -> str:
    """Why the RSA key of a DKIM key record would cost too much to verify with (see the module docstring); ""
    when it would not, or when it is no RSA key dkimpy can read (dkimpy then says what is wrong with it)."""
    try:
        key, _, _, _ = dkim.evaluate_pk(b"", record)
    except Exception:  # (dkimpy's own errors, base64's, ASN.1's: reported by dkimpy when it reads the key itself)
        return ""
    return _costly(key)


def _costly(key: object) -> str:
    if not isinstance(key, dict) or "modulus" not in key:  # (ed25519: 32 bytes)
        return ""
    modulus, exponent = key["modulus"].bit_length(), key["publicExponent"].bit_length()
    if modulus > MAX_KEY_BITS:
        return f"public key too large: {modulus} bits (at most {MAX_KEY_BITS})"
    if exponent > MAX_EXPONENT_BITS:
        return f"public key exponent too large: {exponent} bits (at most {MAX_EXPONENT_BITS})"
    return ""


class BodyHashMismatch(dkim.ValidationError):
    """The body is not the one signed (a fail, where dkimpy's own ValidationErrors are a signature that cannot be
    checked: permerror)."""


class UnreadableKey(dkim.DKIMException):
    """The key record's p= is not base64 or not a key: the signature cannot be checked (permerror, as OpenDKIM)."""


def _revoked(record: bytes | None) -> bool:
    """RFC 6376 3.6.1: an empty p= is a revoked key (a fail, where key material that cannot be decoded is not)."""
    try:
        return parse_tag_value(record or b"").get(b"p", b"x") == b""
    except InvalidTagValueList:
        return False


class _StreamedBodyDKIM(dkim.asyncsupport.DKIM):
    """dkimpy's verifier, given the header section only: the body hash (bh=) is checked against the one computed
    while the body streamed, then dkimpy checks the signature over the headers."""

    body_hash: bytes | None = None
    workers: BoundedWorkers  # the threads the check runs in

    async def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        """dkimpy's, but for key material that cannot be decoded or costs too much (UnreadableKey): dkimpy takes
        the first as a failed signature, or lets base64's error out, and uses the second whatever it costs."""
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        record = await dnsfunc(name, timeout=self.timeout)
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = dkim.evaluate_pk(name, record)
        except (binascii.Error, ValueError) as e:
            raise UnreadableKey(f"public key is not base64: {e}") from None
        except dkim.KeyFormatError as e:
            if isinstance(e.__context__, (UnparsableKeyError, TypeError, ValueError)) and not _revoked(record):
                raise UnreadableKey("public key cannot be parsed") from None
            self.logger.info("%s", e)
            return False
        costly = _costly(self.pk)
        if costly:
            raise UnreadableKey(costly)
        return await self.workers.run(functools.partial(self.verify_sig_process, sig, include_headers, sig_header,
                                                        dnsfunc))

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (ValueError, TypeError) as e:
            raise dkim.MessageFormatError(str(e)) from None
        if self.body_hash is None or self.body_hash != expected:
            raise BodyHashMismatch("body hash mismatch")
        return super().verify_sig_process({k: v for k, v in sig.items() if k != b"bh"}, include_headers,
                                          sig_header, dnsfunc)


def _body_hasher(canonicalization: bytes, algorithm: bytes, length: int | None) -> BodyHash:
    return BodyHash(_HASHES[algorithm](), relaxed=canonicalization == b"relaxed", length=length)


def _body_key(sig: dict[bytes, bytes]) -> tuple[bytes, bytes, int | None] | None:
    """(body canonicalization, algorithm, l=) of a signature; None when one of them is unusable."""
    canon = sig.get(b"c", b"simple/simple").split(b"/")
    body = canon[1] if len(canon) > 1 else b"simple"
    algorithm = sig.get(b"a", b"")
    if b"l" in sig and not ascii_digits(sig[b"l"]):  # (RFC 6376: 1*76DIGIT; int() takes -1 and 1_0)
        return None
    length = int(sig[b"l"]) if b"l" in sig else None
    if body not in (b"simple", b"relaxed") or algorithm not in _HASHES:
        return None
    return body, algorithm, length
