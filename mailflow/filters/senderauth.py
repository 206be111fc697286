"""Sender authentication verdicts: SPF (pyspf), DKIM verification (dkimpy), DMARC (RFC 7489), and the
Authentication-Results header (authres) that cleanup writes.

    SenderAuth(config.sender_auth, resolver, authserv_id=…, also=())
    await auth.spf(client_ip, helo, sender) -> (result, domain)          one SPF evaluation
    await auth.verdicts(client_ip, helo, sender, content, spf=None) -> Verdicts
    Verdicts.header() -> "Authentication-Results: …"    Verdicts.dmarc_policy: what a failing From domain asks
    body_hasher(c, a, l) / BodyHash                      DKIM body canonicalization as a stream (RFC 6376 3.4)
    auth.close()

Every lookup goes through mailflow's `Resolver` (mailflow.dns: txt, mx, addresses, ptr): tests serve the
zones from the in-process DNS. pyspf is synchronous: it runs in this object's own small thread pool (so a
slow SPF domain cannot take the threads that spool files use), its DNS questions handed back to the event
loop's resolver. dkimpy verifies the signature over the header section; the body hash is computed here while
the body is read as a stream (a big message is never loaded whole). DMARC policy discovery and alignment are
written here (they are a few lines), with the organizational domain from the Public Suffix List that
authheaders ships.

Failure behaviour: nothing raises for a message or a DNS answer. A lookup that fails is `temperror`; a broken
record or signature `permerror`/`fail` (RFC 7208/6376 words); all of one message's lookups are bounded by
`timeout` (then temperror).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass, field

import authres
import authres.dmarc
import dkim
import dkim.asyncsupport
import spf
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffix2 import PublicSuffixList

from mailflow.address import split as split_address
from mailflow.content import Content
from mailflow.dns import NotFound
from mailflow.errors import LookupRetry
from mailflow.message import header_fields, header_values, read_header

log = logging.getLogger("mailflow.smtpd")

SPF_THREADS = 4  # SPF evaluations at once; more wait their turn
MAX_SIGNATURES = 5  # DKIM-Signature headers verified per message
HEADER_LIMIT = 1_000_000
_WSP = re.compile(rb"[\t ]+")
_HASHES = {b"rsa-sha256": hashlib.sha256, b"rsa-sha1": hashlib.sha1, b"ed25519-sha256": hashlib.sha256}


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass, fail, neutral, temperror, permerror
    domain: str = ""
    selector: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Verdicts:
    """One message's verdicts, as the Authentication-Results header reports them."""

    authserv_id: str
    spf: str = ""  # "" not evaluated; else pass, fail, softfail, neutral, none, temperror, permerror
    spf_mailfrom: str = ""
    spf_helo: str = ""
    dkim: tuple[DkimResult, ...] | None = None  # None not evaluated; () no signature
    dmarc: str = ""  # "" not evaluated; else pass, fail, none, temperror, permerror
    dmarc_domain: str = ""
    dmarc_policy: str = ""  # the policy of a failing domain: none, quarantine, reject

    def header(self) -> str:
        results: list = []
        if self.spf:
            results.append(authres.SPFAuthenticationResult(result=self.spf, smtp_mailfrom=self.spf_mailfrom or None,
                                                           smtp_helo=self.spf_helo or None))
        if self.dkim is not None:
            for sig in self.dkim or (DkimResult("none"),):
                results.append(authres.DKIMAuthenticationResult(
                    result=sig.result, header_d=sig.domain or None, header_s=sig.selector or None,
                    reason=sig.reason or None))
        if self.dmarc:
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc, header_from=self.dmarc_domain or None, policy=self.dmarc_policy or None))
        return str(authres.AuthenticationResultsHeader(authserv_id=self.authserv_id, results=results))


class SenderAuth:
    """See the module doc."""

    def __init__(self, config, resolver, *, authserv_id: str, also: tuple[str, ...] = ()):
        """`also`: verdicts needed besides config.verify (reject_dmarc_policy needs "dmarc")."""
        self._verify = set(config.verify) | set(also)
        if "dmarc" in self._verify:
            self._verify |= {"spf", "dkim"}
        self._resolver = resolver
        self._timeout = config.timeout
        self.authserv_id = config.authserv_id or authserv_id
        self._pool = concurrent.futures.ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="spf")
        self._psl: PublicSuffixList | None = None
        if "dmarc" in self._verify:
            with importlib.resources.as_file(importlib.resources.files("authheaders") / "public_suffix_list.txt") \
                    as path, open(path, encoding="utf-8") as f:
                self._psl = PublicSuffixList(f)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------------------------- SPF

    async def spf(self, client_ip: str, helo: str, sender: str) -> tuple[str, str]:
        """(result, the domain checked): MAIL FROM's domain, or the HELO name for the null sender."""
        domain = split_address(sender)[1] if sender else helo
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._spf_blocking, loop, client_ip, helo, sender), self._timeout)
        except TimeoutError:
            result = "temperror"
        except Exception as e:  # pyspf on a record it cannot read: its words
            log.warning("SPF check of %s for [%s] failed: %r", domain, client_ip, e)
            result = "permerror"
        return result, domain

    def _spf_blocking(self, loop, client_ip: str, helo: str, sender: str) -> str:
        query = _SpfQuery(client_ip, sender or f"postmaster@{helo}", helo, lookup=_Bridge(self._resolver, loop,
                                                                                          self._timeout))
        return query.check()[0]

    # -------------------------------------------------------------------------------- all of them

    async def verdicts(self, client_ip: str, helo: str, sender: str, content: Content,
                       spf_result: tuple[str, str] | None = None) -> Verdicts:
        head, _ = read_header(content, HEADER_LIMIT)
        found: dict = {"authserv_id": self.authserv_id}
        if "spf" in self._verify:
            result, domain = spf_result or await self.spf(client_ip, helo, sender)
            found.update(spf=result, spf_mailfrom=sender if sender else "", spf_helo="" if sender else helo)
        if "dkim" in self._verify:
            found["dkim"] = await self._dkim(head, content.after(len(head)))
        if "dmarc" in self._verify:
            found.update(await self._dmarc(head, sender or f"postmaster@{helo}", found.get("spf", ""),
                                           found.get("dkim") or ()))
        return Verdicts(**found)

    # -------------------------------------------------------------------------------- DKIM

    async def _dkim(self, head: bytes, rest: Content) -> tuple[DkimResult, ...]:
        signatures = []
        for name, lines in header_fields(head):
            if name == "dkim-signature" and len(signatures) < MAX_SIGNATURES:
                value = b"".join(lines).partition(b":")[2]
                try:
                    signatures.append(parse_tag_value(value))
                except InvalidTagValueList:
                    signatures.append(None)
        if not signatures:
            return ()
        hashers = {key: BodyHash(*key) for sig in signatures if sig and (key := _body_key(sig)) is not None}
        await _hash_body(rest, list(hashers.values()))
        digests = {key: h.digest() for key, h in hashers.items()}
        message = head if head.endswith(b"\n") else head + b"\r\n"
        results = []
        for index, sig in enumerate(signatures):
            results.append(await self._verify_one(message + b"\r\n", index, sig, digests))
        return tuple(results)

    async def _verify_one(self, message: bytes, index: int, sig, digests) -> DkimResult:
        if sig is None:
            return DkimResult("permerror", reason="malformed signature")
        domain = sig.get(b"d", b"").decode("ascii", "replace")
        selector = sig.get(b"s", b"").decode("ascii", "replace")
        key = _body_key(sig)
        verifier = _StreamedBodyDKIM(message, logger=log, timeout=self._timeout)
        verifier.body_hash = digests.get(key) if key is not None else None
        try:
            ok = await asyncio.wait_for(verifier.verify(idx=index, dnsfunc=self._dkim_key), self._timeout)
        except (LookupRetry, TimeoutError):
            return DkimResult("temperror", domain, selector, "key lookup failed")
        except dkim.ValidationError as e:
            return DkimResult("fail", domain, selector, str(e)[:80])
        except dkim.DKIMException as e:
            return DkimResult("permerror", domain, selector, str(e)[:80])
        return DkimResult("pass" if ok else "fail", domain, selector, "" if ok else "signature verification failed")

    async def _dkim_key(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            records = await self._resolver.txt(name.decode("ascii", "replace").rstrip("."))
        except NotFound:
            return None
        return records[0].encode() if records else None

    # -------------------------------------------------------------------------------- DMARC

    async def _dmarc(self, head: bytes, mail_from: str, spf_result: str, dkim_results) -> dict:
        froms = header_values(head, "from")
        domain = _from_domain(froms[0]) if len(froms) == 1 else ""
        if not domain:
            return {"dmarc": "permerror" if froms else "none"}
        org = self._org_domain(domain)
        try:
            record = await self._dmarc_record(domain)
            subdomain = False
            if record is None and org != domain:
                record, subdomain = await self._dmarc_record(org), True
        except LookupRetry:
            return {"dmarc": "temperror", "dmarc_domain": domain}
        if record is None:
            return {"dmarc": "none", "dmarc_domain": domain}
        policy = record.get("sp", record.get("p", "none")) if subdomain else record.get("p", "none")
        aligned = self._aligned
        spf_ok = spf_result == "pass" and aligned(split_address(mail_from)[1], domain, record.get("aspf", "r"))
        dkim_ok = any(r.result == "pass" and aligned(r.domain, domain, record.get("adkim", "r")) for r in dkim_results)
        verdict = "pass" if spf_ok or dkim_ok else "fail"
        return {"dmarc": verdict, "dmarc_domain": domain, "dmarc_policy": policy if policy in
                ("none", "quarantine", "reject") else "none"}

    def _aligned(self, other: str, domain: str, mode: str) -> bool:
        other = other.lower().rstrip(".")
        if mode == "s":
            return other == domain
        return bool(other) and self._org_domain(other) == self._org_domain(domain)

    def _org_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix (an unlisted top-level domain is one, the PSL's "*" rule) and one
        label more."""
        assert self._psl is not None
        suffix = self._psl.get_tld(domain) or domain.rpartition(".")[2]
        labels = domain.split(".")
        return ".".join(labels[-(suffix.count(".") + 2):])

    async def _dmarc_record(self, domain: str) -> dict | None:
        try:
            records = await self._resolver.txt(f"_dmarc.{domain}")
        except NotFound:
            return None
        found = [r for r in records if r.startswith("v=DMARC1")]
        if len(found) != 1:
            return None  # none, or more than one: no policy (RFC 7489 6.6.3)
        tags = {}
        for item in found[0].split(";"):
            name, eq, value = item.partition("=")
            if eq:
                tags[name.strip().lower()] = value.strip().lower()
        return tags if "p" in tags else None


def _from_domain(value: str) -> str:
    """The domain of a From header's (single) address, lower case; "" when it has none."""
    addresses = email.utils.getaddresses([value])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return ""
    return addresses[0][1].rpartition("@")[2].strip().lower().rstrip(".")


# ---------------------------------------------------------------------------------------------- pyspf's DNS


class _Bridge:
    """pyspf's DNS questions (asked in a worker thread) answered by the event loop's resolver."""

    def __init__(self, resolver, loop, timeout: float):
        self._resolver, self._loop, self._timeout = resolver, loop, timeout

    def __call__(self, name: str, qtype: str) -> list:
        future = asyncio.run_coroutine_threadsafe(self._ask(name, qtype), self._loop)
        try:
            return future.result(self._timeout)
        except (LookupRetry, concurrent.futures.TimeoutError) as e:
            future.cancel()
            raise spf.TempError(f"DNS {e}") from None

    async def _ask(self, name: str, qtype: str) -> list:
        r = self._resolver
        try:
            if qtype in ("A", "AAAA"):
                return [a for a in await r.addresses(name) if (":" in a) == (qtype == "AAAA")]
            if qtype == "MX":
                return [(mx.preference, mx.host) for mx in await r.mx(name) if not mx.is_null]
            if qtype == "TXT":
                return [(record.encode(),) for record in await r.txt(name)]
            if qtype == "PTR":
                return await r.ptr(_address_of_reverse(name))
        except NotFound:
            return []
        return []


def _address_of_reverse(name: str) -> str:
    """1.0.0.127.in-addr.arpa -> 127.0.0.1 (pyspf asks PTR by name)."""
    labels = name.rstrip(".").split(".")
    if name.endswith("in-addr.arpa"):
        return ".".join(reversed(labels[:-2]))
    nibbles = "".join(reversed(labels[:-2]))
    return ":".join(nibbles[i:i + 4] for i in range(0, 32, 4))


class _SpfQuery(spf.query):
    """pyspf with its DNS through `lookup` (mailflow's resolver) instead of its module's dnspython default.
    The resolver follows CNAMEs; the RFC 7208 void lookup limit is kept."""

    def __init__(self, i: str, s: str, h: str, *, lookup):
        super().__init__(i=i, s=s, h=h)
        self._lookup = lookup

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self.cache:
            self.cache[key] = self._lookup(name, qtype)
        result = self.cache[key]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


# ---------------------------------------------------------------------------------------------- DKIM bodies


class _StreamedBodyDKIM(dkim.asyncsupport.DKIM):
    """dkimpy's verifier, given the header section only: the body hash (bh=) is checked against the one this
    module computed while streaming the body, then dkimpy checks the signature over the headers."""

    body_hash: bytes | None = None

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (ValueError, TypeError) as e:
            raise dkim.MessageFormatError(str(e)) from None
        if self.body_hash is None or self.body_hash != expected:
            raise dkim.ValidationError("body hash mismatch")
        return super().verify_sig_process({k: v for k, v in sig.items() if k != b"bh"}, include_headers,
                                          sig_header, dnsfunc)


def _body_key(sig: dict) -> tuple[bytes, bytes, int | None] | None:
    """(body canonicalization, algorithm, l=) of a signature; None when one of them is unusable."""
    canon = sig.get(b"c", b"simple/simple").split(b"/")
    body = canon[1] if len(canon) > 1 else b"simple"
    algorithm = sig.get(b"a", b"")
    try:
        length = int(sig[b"l"]) if b"l" in sig else None
    except ValueError:
        return None
    if body not in (b"simple", b"relaxed") or algorithm not in _HASHES:
        return None
    return body, algorithm, length


class BodyHash:
    """RFC 6376 body canonicalization (simple or relaxed) and hash, fed line by line as the body streams."""

    def __init__(self, canonicalization: bytes, algorithm: bytes, length: int | None = None):
        self._relaxed = canonicalization == b"relaxed"
        self._hash = _HASHES[algorithm]()
        self._left = length  # bytes still hashed under l=; None: all
        self._empty_lines = 0  # empty lines held back (they count only if a non-empty line follows)
        self._wrote = False

    def line(self, text: bytes, complete: bool = True) -> None:
        """One body line without its line end (`complete` False: the last one, without a line end)."""
        if self._relaxed:
            text = _WSP.sub(b" ", text.rstrip(b" \t") if complete else text)
        if not text:
            if complete:
                self._empty_lines += 1
            return
        self._write(b"\r\n" * self._empty_lines + text + b"\r\n")
        self._empty_lines = 0

    def digest(self) -> bytes:
        if not self._wrote and not self._relaxed:
            self._write(b"\r\n")  # an empty body is one CRLF in simple canonicalization
        return self._hash.digest()

    def _write(self, data: bytes) -> None:
        self._wrote = True
        if self._left is not None:
            data = data[:self._left]
            self._left -= len(data)
        if data:
            self._hash.update(data)


async def _hash_body(rest: Content, hashers: list[BodyHash]) -> None:
    """Feed the body (what follows the header section: the empty line first) to every hasher, line by line."""
    if not hashers:
        return
    pending = b""
    first = True
    async for chunk in rest.stream():
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for line in lines:
            if first:  # the empty line that ends the header section
                first = False
                continue
            line = line[:-1] if line.endswith(b"\r") else line
            for h in hashers:
                h.line(line)
    if pending and not first:
        for h in hashers:
            h.line(pending, complete=False)
