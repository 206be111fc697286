"""ARC sealing (RFC 8617) of a message this host forwards, with dkimpy.

    await seal(message, key, authserv_id, resolver, now, workers) -> bytes   the header fields to put on top: this
                                  host's Authentication-Results, then the new ARC set (ARC-Seal,
                                  ARC-Message-Signature, ARC-Authentication-Results), each CRLF-terminated
    await authentication_results(message, authserv_id, resolver, workers) -> str    `authserv; dkim=…; arc=…`
                                  (`workers`: a pool for dkim.verify's checks, dkim.checkers())
    costly_chain(head) -> str     why checking and sealing the chain would cost too much ("" when it would not)
    await txt_lookup(message, resolver) -> dnsfunc      the ARC key records the message names, fetched through
                                  the Resolver beforehand (at most MAX_KEYS), as the sync lookup dkimpy calls;
                                  a key that costs too much to verify with (dkim.costly_key) as no key (arc=fail)

What the seal attests: DKIM (each DKIM-Signature verified by mailflow.signing.dkim.verify, the verifier smtpd's
verdicts use; dkim=none without one) and the ARC chain already on the message (arc=none/pass/fail: the seal's cv=).
SPF, which cannot be checked from the message itself, is not claimed.
Only messages held in memory are sealed (mailflow.content's MEMORY_LIMIT, 256 KB): dkimpy hashes a body it
holds whole, and sealing must not make a big forwarded message a big allocation. The caller forwards a larger
one unsealed and logs it. dkimpy's arc_sign signs with RSA only.

Failure behaviour: a key that cannot be fetched counts as a temporary verification failure (dkim=temperror);
`dkim.DKIMException` from sealing (a header section dkimpy cannot parse, or one that would cost too much to check
and seal: `costly_chain`) propagates: the caller forwards the message unsealed and logs why.
"""
from __future__ import annotations

import asyncio
import re

import dkim

from mailflow.content import Content
from mailflow.dns import NotFound, Resolver
from mailflow.message import header_fields, header_values, read_header, split_header
from mailflow.signing.dkim import MAX_HEADER_FIELDS, MAX_SIGNED_FIELDS, DkimResult, costly_key, verify
from mailflow.signing.keytables import SigningKey
from mailflow.workers import BoundedWorkers

MAX_KEYS = 8  # ARC key records fetched for one message: a message cannot make this host do more lookups than this
KEY_TIMEOUT = 10.0  # seconds for the DKIM key lookups of one message (as [sender_auth] timeout's default)
HEADER_LIMIT = 256 * 1024  # (only messages held in memory are sealed)
_TAG = re.compile(r"\b([sd])\s*=\s*([^;\s]+)")
_SIGNED = re.compile(r"(?:^|;)\s*h\s*=([^;]*)")
_KEYED_FIELDS = ("arc-seal", "arc-message-signature")


def _key_names(head: bytes) -> list[str]:
    names: list[str] = []
    for field in _KEYED_FIELDS:
        for value in header_values(head, field):
            tags = dict(_TAG.findall(value))
            if "s" in tags and "d" in tags:
                name = f"{tags['s']}._domainkey.{tags['d']}".lower()
                if name not in names:
                    names.append(name)
    return names[:MAX_KEYS]


async def txt_lookup(message: bytes, resolver: Resolver):
    """The dnsfunc dkimpy calls (sync, in a worker thread), answering from records fetched here first."""
    head, _ = split_header(message)
    names = _key_names(head)
    answers = await asyncio.gather(*(resolver.txt(name) for name in names), return_exceptions=True)
    records: dict[str, bytes | None] = {}  # None: the lookup failed (temperror); b"": no key (NXDOMAIN, NODATA)
    for name, answer in zip(names, answers):
        if isinstance(answer, list):
            record = answer[0].encode("utf-8") if answer else b""
            records[name] = b"" if costly_key(record) else record  # (no key: dkimpy's pow would hold the GIL)
        else:
            records[name] = b"" if isinstance(answer, NotFound) else None

    def lookup(name, timeout=5):
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).rstrip(".").lower()
        found = records.get(key, b"")
        if found is None:
            raise dkim.DnsTimeoutError(f"no answer for {key}")
        return found

    return lookup


def _dkim_words(results: tuple[DkimResult, ...]) -> list[str]:
    words = [f"dkim={r.result}" + (f" header.d={r.domain}" if r.domain else "") +
             (f" header.s={r.selector}" if r.selector else "") for r in results]
    return words or ["dkim=none"]


def _arc_result(message: bytes, dnsfunc) -> str:
    cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc)
    return f"arc={(cv or dkim.CV_None).decode('ascii')}"


async def authentication_results(message: bytes, authserv_id: str, resolver: Resolver,
                                 workers: BoundedWorkers) -> str:
    content = Content.of(message)
    head, _ = read_header(content, HEADER_LIMIT)
    dkim_results = await verify(head, content.after(len(head)), resolver, KEY_TIMEOUT, workers)
    dnsfunc = await txt_lookup(message, resolver)
    arc_result = await asyncio.to_thread(_arc_result, message, dnsfunc)
    return "; ".join([authserv_id, *_dkim_words(dkim_results), arc_result])


def costly_chain(head: bytes) -> str:
    """Why checking and sealing a message's ARC chain would cost too much, as mailflow.signing.dkim's verify
    refuses a DKIM signature (dkimpy's selection of the signed fields is quadratic; the seal's own ARC-Seal signs
    every ARC field there is): a header section past MAX_HEADER_FIELDS fields, or an ARC-Message-Signature whose
    h= names more than MAX_SIGNED_FIELDS; "" when it would not."""
    fields = len(header_fields(head))
    if fields > MAX_HEADER_FIELDS:
        return f"header section of {fields} fields (at most {MAX_HEADER_FIELDS})"
    for value in header_values(head, "arc-message-signature"):
        signed = _SIGNED.search(value)
        if signed and signed.group(1).count(":") + 1 > MAX_SIGNED_FIELDS:
            return f"an ARC-Message-Signature's h= names more than {MAX_SIGNED_FIELDS} fields"
    return ""


async def seal(message: bytes, key: SigningKey, authserv_id: str, resolver: Resolver, now: float,
               workers: BoundedWorkers) -> bytes:
    head, _ = read_header(Content.of(message), HEADER_LIMIT)
    costly = costly_chain(head)
    if costly:
        raise dkim.DKIMException(f"not sealed: {costly}")
    results = await authentication_results(message, authserv_id, resolver, workers)
    ar = f"Authentication-Results: {results}\r\n".encode("utf-8")

    def sign() -> bytes:
        arc_set = dkim.arc_sign(ar + message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                                key.private, authserv_id.encode("ascii"), timestamp=int(now))
        return b"".join(arc_set)

    return ar + await asyncio.to_thread(sign)
