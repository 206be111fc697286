"""DANE for SMTP (RFC 7672), as Postfix's `dane` and `dane-only` levels: the peer's TLSA records, when DNSSEC
validated them, say which certificate it must present.

    tlsa_name(host, port) -> str                 `_25._tcp.mx.example.com`
    usable(records) -> tuple[Tlsa, ...]          the records SMTP may use: DANE-EE(3) and DANE-TA(2), selector 0
                                                 (certificate) or 1 (public key), matching 0 (exact), 1 (SHA-256) or 2
                                                 (SHA-512); PKIX-TA(0)/PKIX-EE(1) are unusable for SMTP (RFC 7672
                                                 3.1.3); so is full data (matching 0) that is no certificate
                                                 (selector 0) or SubjectPublicKeyInfo (1), as OpenSSL's
                                                 SSL_dane_tlsa_add, which Postfix uses, says: parsed, never tested
                                                 (a key's numbers are not checked: a DH prime is no primality test
                                                 on the event loop); a digest of the wrong length never gets here:
                                                 dnspython refuses the whole answer
    await peer_policy(resolver, policy, host, port, mx_secure) -> TlsPolicy   for a `dane` or `dane-only` policy
                                                 and one peer: a policy carrying the usable records (TLS required,
                                                 the certificate checked against them), or what is left without
    matches(certificate_der, records) -> bool    the certificate matches a DANE-EE record (names and dates are not
                                                 checked, RFC 7672 3.1.1), on its own bytes (its DER, or the
                                                 SubjectPublicKeyInfo cut from it: the key is never loaded)
    NO_MATCH                                     (65, "No matching DANE TLSA records"): OpenSSL's error for a
                                                 certificate that matches none, as Postfix logs it

What decides, per peer (Postfix's order):
- the MX RRset was not DNSSEC-validated (`mx_secure` False), or the TLSA answer carried no AD bit: no DANE.
  `dane` then falls back to the destination's MTA-STS policy if it has one, else to `may`; `dane-only` fails
  (SiteFailure 4.7.5 "no TLSA records", next peer).
- validated records, none usable: `encrypt` (TLS required, unverified: RFC 7672 2.2), the records named in the log.
- usable records: TLS required; the certificate must match a DANE-EE record. DANE-TA records need the peer's chain,
  which Python's ssl module (3.11) does not give: a peer with only DANE-TA records fails verification (4.7.5),
  never passes unchecked.
Failure behaviour: a TLSA lookup that fails (SERVFAIL, timeout) is a SiteFailure 4.7.5 for that peer for both
levels (RFC 7672 2.1.1: a failed lookup is not "no records"); NXDOMAIN / NODATA is "no records".
"""
from __future__ import annotations

import hashlib
import re
import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import serialization

from mailflow.dns import NotFound, Resolver, Tlsa
from mailflow.errors import LookupRetry
from mailflow.transports.smtp.tls import TlsPolicy
from mailflow.transports.smtp.trouble import SiteFailure

DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)
MATCHING = {0: None, 1: hashlib.sha256, 2: hashlib.sha512}


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


def usable(records: tuple[Tlsa, ...]) -> tuple[Tlsa, ...]:
    return tuple(r for r in records
                 if r.usage in (DANE_TA, DANE_EE) and r.selector in SELECTORS and r.mtype in MATCHING
                 and _well_formed(r))


def _well_formed(record: Tlsa) -> bool:
    if record.mtype != 0:
        return True
    try:
        if record.selector == 0:
            _certificate(record.data)
        else:
            _check_public_key(record.data)
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


# the DER of the algorithm OIDs whose keys cryptography loads in microseconds (an RSA modulus or an EC point is
# read, never tested): rsaEncryption, RSASSA-PSS, id-ecPublicKey, Ed25519, Ed448, X25519, X448
_CHEAP_TO_LOAD = frozenset(bytes.fromhex(oid) for oid in (
    "2a864886f70d010101", "2a864886f70d01010a", "2a8648ce3d0201", "2b6570", "2b6571", "2b656e", "2b656f"))
# the algorithms whose keys are walked, never loaded (a DH prime would be tested): their parameters, a SEQUENCE of
# so many INTEGERs (fewest, most), as OpenSSL 3.0 takes them: DSA (p, q, g), X9.42 DH (p, g, q, j), PKCS #3 DH
# (p, g, privateValueLength)
_WALKED = {bytes.fromhex("2a8648ce380401"): (3, 3), bytes.fromhex("2a8648ce3e0201"): (3, 4),
           bytes.fromhex("2a864886f70d010301"): (2, 3)}
_SEQUENCE, _INTEGER, _BIT_STRING, _OID, _VERSION = 0x30, 0x02, 0x03, 0x06, 0xA0  # (_VERSION: [0] EXPLICIT)


def _check_public_key(spki: bytes) -> None:
    """Raises ValueError unless `spki` is a SubjectPublicKeyInfo, as OpenSSL's d2i_PUBKEY (Postfix's) takes it:
    SEQUENCE {SEQUENCE {OID, parameters}, BIT STRING} covering the data exactly, of an algorithm OpenSSL knows,
    parsed, never tested. An RSA, EC, EdDSA or X25519/X448 key is loaded (cheap); a DSA or DH key is walked: its
    parameters a SEQUENCE of INTEGERs, its key an INTEGER in a BIT STRING of whole bytes. Loading a DH key runs a
    primality test of its prime, seconds of the event loop for a 4096-bit one a stranger's TLSA record carries."""
    tag, start, end = _der_item(spki, 0)
    if tag != _SEQUENCE or end != len(spki):
        raise ValueError("not a SEQUENCE covering the data")
    tag, algorithm, key = _der_item(spki, start)
    oid_tag, oid, oid_end = _der_item(spki, algorithm) if tag == _SEQUENCE else (0, 0, 0)
    bits_tag, bits, bits_end = _der_item(spki, key)
    if oid_tag != _OID or oid_end > key or bits_tag != _BIT_STRING or bits_end != end:
        raise ValueError("not SEQUENCE {SEQUENCE {OID, ...}, BIT STRING}")
    name = spki[oid:oid_end]
    if name in _CHEAP_TO_LOAD:
        serialization.load_der_public_key(spki)
        return
    if name not in _WALKED:
        raise ValueError("an algorithm OpenSSL does not know")
    _integers(spki, oid_end, key, *_WALKED[name])
    if bits == bits_end or spki[bits] != 0:
        raise ValueError("a key that is not whole bytes")
    _integers(spki, bits + 1, bits_end, 1, 1, wrapped=False)


def _integers(data: bytes, at: int, end: int, fewest: int, most: int, wrapped: bool = True) -> None:
    """Raises ValueError unless data[at:end] is a SEQUENCE of `fewest` to `most` INTEGERs (`wrapped`), or the
    INTEGERs themselves."""
    if wrapped:
        tag, at, inner_end = _der_item(data, at)
        if tag != _SEQUENCE or inner_end != end:
            raise ValueError("not a SEQUENCE covering its place")
    count = 0
    while at < end:
        tag, _, at = _der_item(data, at)
        count += 1
        if tag != _INTEGER or at > end or count > most:
            raise ValueError("not INTEGERs covering their place")
    if count < fewest:
        raise ValueError("too few INTEGERs")


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where its contents start, where they end) of the DER item at `at`; ValueError past the data."""
    if at + 2 > len(data):
        raise ValueError("truncated")
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4 or at + size > len(data):
            raise ValueError("bad length")
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    if at + length > len(data):
        raise ValueError("truncated")
    return tag, at, at + length


def _certificate(der: bytes) -> x509.Certificate:
    """The certificate (ValueError if it is none). cryptography's deprecation warning for a serial number that is
    not positive is filtered out for this module, once (a stranger's certificate or TLSA record is not this
    program's deprecated use): a catch_warnings() per certificate reset every module's record of the warnings it
    had shown, and is not thread-safe."""
    return x509.load_der_x509_certificate(der)


warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=re.escape(__name__) + "$")


async def peer_policy(resolver: Resolver, policy: TlsPolicy, host: str, port: int, mx_secure: bool,
                      fallback: TlsPolicy) -> TlsPolicy:
    """See the module docstring. `fallback`: what `dane` becomes without DANE (MTA-STS's policy, else may)."""
    name = tlsa_name(host, port)
    records: tuple[Tlsa, ...] = ()
    secure = False
    if mx_secure:
        try:
            answer = await resolver.tlsa(name)
            records, secure = answer.records, answer.secure
        except NotFound:
            pass
        except LookupRetry as e:
            raise SiteFailure("4.7.5", f"TLSA lookup error for {name}: {e.text}") from None
    if not (secure and records):
        if policy.level == "dane-only":
            why = "the MX records are not DNSSEC-validated" if not mx_secure else \
                "no DNSSEC-validated TLSA records" if records else "no TLSA records"
            raise SiteFailure("4.7.5", f"DANE is required (dane-only), but {name}: {why}")
        return fallback
    found = usable(records)
    if not found:
        return TlsPolicy("encrypt", source=f"dane: {name} has no usable TLSA records")
    return TlsPolicy(policy.level, tlsa=found, source=f"dane: {name}")


def _selected(certificate_der: bytes, selector: int) -> bytes:
    """What a record's selector names, as the peer sent it: the whole certificate (0) or its SubjectPublicKeyInfo
    (1), cut from the certificate's DER as OpenSSL hashes it, never re-encoded, and the key never loaded (a key
    cryptography cannot load raised UnsupportedAlgorithm out of the match)."""
    if selector == 0:
        return certificate_der
    _, at, _ = _der_item(certificate_der, 0)  # Certificate: SEQUENCE {TBSCertificate, ...}
    _, at, _ = _der_item(certificate_der, at)  # TBSCertificate's contents
    if certificate_der[at] == _VERSION:
        at = _der_item(certificate_der, at)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        at = _der_item(certificate_der, at)[2]
    tag, _, end = _der_item(certificate_der, at)
    if tag != _SEQUENCE:
        raise ValueError("no SubjectPublicKeyInfo where X.509 puts it")
    return certificate_der[at:end]


NO_MATCH = (65, "No matching DANE TLSA records")  # X509_V_ERR_DANE_NO_MATCH and its text


def matches(certificate_der: bytes, records: tuple[Tlsa, ...]) -> bool:
    if not certificate_der:
        return False
    try:
        _certificate(certificate_der)  # (a certificate: what is not one matches nothing)
    except ValueError:
        return False
    for record in records:
        if record.usage != DANE_EE:
            continue
        data = _selected(certificate_der, record.selector)
        digest = MATCHING[record.mtype]
        if (data if digest is None else digest(data).digest()) == record.data:
            return True
    return False
