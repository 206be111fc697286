"""ARC sealing (RFC 8617) of a message this host forwards, with dkimpy.

    await seal(message, key, authserv_id, resolver, now) -> bytes   the header fields to put on top: this host's
                                  Authentication-Results, then the new ARC set (ARC-Seal, ARC-Message-Signature,
                                  ARC-Authentication-Results), each CRLF-terminated
    await authentication_results(message, authserv_id, resolver) -> str    `authserv; dkim=…; arc=…`
    await txt_lookup(message, resolver) -> dnsfunc      the DKIM/ARC key records the message names, fetched through
                                  the Resolver beforehand (at most MAX_KEYS), as the sync lookup dkimpy calls

What the seal attests: DKIM (each DKIM-Signature verified; dkim=none without one) and the ARC chain already on the
message (arc=none/pass/fail: the seal's cv=). SPF is not evaluated by this host, so it is not claimed.
Only messages held in memory are sealed (mailflow.content's MEMORY_LIMIT, 256 KB): dkimpy hashes a body it
holds whole, and sealing must not make a big forwarded message a big allocation. The caller forwards a larger
one unsealed and logs it. dkimpy's arc_sign signs with RSA only.

Failure behaviour: a key that cannot be fetched counts as a temporary verification failure (dkim=temperror);
`dkim.DKIMException` from sealing (a header section dkimpy cannot parse) propagates: the caller forwards the
message unsealed and logs why.
"""
from __future__ import annotations

import asyncio
import re

import dkim

from mailflow.dns import NotFound, Resolver
from mailflow.message import header_values, split_header
from mailflow.signing.keytables import SigningKey

MAX_KEYS = 8  # key records fetched for one message: a message cannot make this host do more lookups than this
_TAG = re.compile(r"\b([sd])\s*=\s*([^;\s]+)")
_KEYED_FIELDS = ("dkim-signature", "arc-seal", "arc-message-signature")


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
            records[name] = answer[0].encode("utf-8") if answer else b""
        else:
            records[name] = b"" if isinstance(answer, NotFound) else None

    def lookup(name, timeout=5):
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).rstrip(".").lower()
        found = records.get(key, b"")
        if found is None:
            raise dkim.DnsTimeoutError(f"no answer for {key}")
        return found

    return lookup


def _dkim_results(message: bytes, dnsfunc) -> list[str]:
    head, _ = split_header(message)
    count = len(header_values(head, "dkim-signature"))
    results = []
    for index in range(count):
        verifier = dkim.DKIM(message)
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
            result = "pass" if ok else "fail"
        except dkim.DnsTimeoutError:
            result = "temperror"
        except dkim.DKIMException:
            result = "permerror"
        fields = verifier.signature_fields or {}
        d = fields.get(b"d", b"").decode("ascii", "replace")
        s = fields.get(b"s", b"").decode("ascii", "replace")
        results.append(f"dkim={result}" + (f" header.d={d}" if d else "") + (f" header.s={s}" if s else ""))
    return results or ["dkim=none"]


def _arc_result(message: bytes, dnsfunc) -> str:
    cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc)
    return f"arc={(cv or dkim.CV_None).decode('ascii')}"


async def authentication_results(message: bytes, authserv_id: str, resolver: Resolver) -> str:
    dnsfunc = await txt_lookup(message, resolver)

    def evaluate() -> str:
        return "; ".join([authserv_id, *_dkim_results(message, dnsfunc), _arc_result(message, dnsfunc)])

    return await asyncio.to_thread(evaluate)


async def seal(message: bytes, key: SigningKey, authserv_id: str, resolver: Resolver, now: float) -> bytes:
    results = await authentication_results(message, authserv_id, resolver)
    ar = f"Authentication-Results: {results}\r\n".encode("utf-8")

    def sign() -> bytes:
        arc_set = dkim.arc_sign(ar + message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                                key.private, authserv_id.encode("ascii"), timestamp=int(now))
        return b"".join(arc_set)

    return ar + await asyncio.to_thread(sign)
