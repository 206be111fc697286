"""smtpd's TLS: the server certificate and key as an `ssl.SSLContext`, built at start and rebuilt on reload; what
a client's certificate says.

What it owns
- `ServerTls(cert_file, key_file, ca_file, ask_ccert)`: reads the certificate chain and key (Postfix
  smtpd_tls_cert_file / smtpd_tls_key_file; an empty key file means the key is in the certificate file) into
  `.context`. With `ask_ccert` (smtpd_tls_ask_ccert) the context asks the client for a certificate, verified
  against `ca_file` (smtpd_tls_CAfile; for the handshake a certificate listed there is a trust anchor itself, so
  a client certificate is pinned by listing it). A reload reads the files again into new ServerTls objects
  (server.Smtpd.reconfigure): new sessions get them, sessions already in TLS keep theirs.
- `ClientCert`, `client_cert(ssl_object, digest, client)`: the client's certificate as Postfix's tls_server.c describes
  it: subject and issuer CommonName, the fingerprints of the certificate and of its public key
  (smtpd_tls_fingerprint_digest over the DER certificate and the DER SubjectPublicKeyInfo, `AB:CD:…`), trusted.
  `fingerprint(data, digest)` makes one. A name is Postfix's tls_text_name's: one with a control character or
  NUL, or 256 bytes or longer, is "" (logged: `warning: tls_text_name: host[ip]: non-printable content in peer
  subject CN`), so it cannot reach a reply, a policy request or a milter macro.
- `ClientAnchors` (the context's `client_anchors`): trust as Postfix's OpenSSL sees it, without partial chains:
  a certificate is trusted when the chain the handshake verified ends at a listed certificate that leads,
  through the file, to a self-signed one there (at most MAX_INTERMEDIATES CAs between, all valid now); a pinned
  one or one from a listed intermediate without its root is untrusted.

What differs from Postfix (docs/security.md, "Client certificates"): OpenSSL, as Python's ssl drives it, ends the
handshake of a client certificate that `ca_file` does not vouch for (Python has no verify callback); Postfix's
callback lets it through untrusted and matches its fingerprint all the same. So a certificate is pinned by listing
it (or its CA) in `ca_file` as well as its fingerprint in relay_clientcerts; it is then untrusted unless it (or
its chain in the file) is self-signed, as in Postfix. A certificate for serverAuth only needs OpenSSL's TRUSTED
CERTIFICATE form there (`openssl x509 -addtrust clientAuth`, its CA not listed); an expired one cannot pass.

Failure behaviour: a missing, unreadable or mismatched file, or one that is not a regular file (a FIFO would hold
OpenSSL at open(): mailflow.files), raises `TlsError` naming the file and its setting, at start (so `mailflow
serve` refuses to start) and at a reload (the reload is refused; the contexts in use stay). `client_cert` does not
raise: a certificate cryptography cannot read has its fingerprints only (no names).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import re
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mailflow.errors import ConfigError
from mailflow.files import TEXT_LIMIT, check_regular_file

log = logging.getLogger("mailflow.smtpd")


class TlsError(ConfigError):
    """A certificate, key or CA file that cannot be used; the reason names the file (a ConfigError, so `mailflow
    serve` reports it as one and exits 2)."""

    def __init__(self, reason: str, key: str = "smtpd.tls_cert_file"):
        super().__init__("", key, reason)


def _check_file(path: str, what: str, key: str) -> None:
    try:  # OpenSSL opens it by name: a FIFO would hold the start (or a reload) at open() for ever
        check_regular_file(path, TEXT_LIMIT)
    except FileNotFoundError:
        raise TlsError(f"{path}: no such {what}", key) from None
    except OSError as e:  # RefusedFile ("is a FIFO, not a regular file"), a directory on the way not searchable
        raise TlsError(f"{path}: cannot read ({e.strerror})", key) from None


def build_context(cert_file: str, key_file: str = "", ca_file: str = "", ask_ccert: bool = False) -> ssl.SSLContext:
    """A server context with the chain and key, TLS 1.2 or newer; with `ask_ccert`, one that asks for a client
    certificate (not requiring one) and verifies it against `ca_file`, where a listed certificate is an anchor
    (X509_V_FLAG_PARTIAL_CHAIN: a leaf or intermediate listed there vouches for itself)."""
    for path in filter(None, (cert_file, key_file)):
        _check_file(path, "certificate or key file", "smtpd.tls_cert_file")
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.load_cert_chain(cert_file, key_file or None)
    except PermissionError as e:
        raise TlsError(f"{e.filename or cert_file}: cannot read ({e.strerror})") from None
    except (ssl.SSLError, OSError) as e:
        names = f"{cert_file} / {key_file}" if key_file else cert_file
        raise TlsError(f"{names}: not a usable certificate and key ({e})") from None
    if ask_ccert:
        _ask_client_certificate(ctx, ca_file)
    return ctx


def _ask_client_certificate(ctx: ssl.SSLContext, ca_file: str) -> None:
    if ca_file:
        _check_file(ca_file, "CA file", "smtpd.tls_ca_file")
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except PermissionError as e:
            raise TlsError(f"{ca_file}: cannot read ({e.strerror})", "smtpd.tls_ca_file") from None
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"{ca_file}: no usable certificates ({e})", "smtpd.tls_ca_file") from None
        if isinstance(ctx, ServerContext):
            ctx.client_anchors = ClientAnchors.read(ca_file)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_OPTIONAL


class ServerContext(ssl.SSLContext):
    """An SSLContext that also knows which client certificates Postfix would call trusted (`client_anchors`,
    None: no client certificate is asked for)."""

    client_anchors: "ClientAnchors | None" = None


class ServerTls:
    """The context of one certificate and key (and client certificate settings), read when made."""

    def __init__(self, cert_file: str, key_file: str = "", ca_file: str = "", ask_ccert: bool = False):
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = build_context(cert_file, key_file, ca_file, ask_ccert)


# ---------------------------------------------------------------------------------------------- client certificates


CCERT_BUFSIZ = 256  # a certificate name this long (UTF-8 bytes) or longer is refused, as Postfix's tls.h
VERIFY_DEPTH = 9  # Postfix's smtpd_tls_ccert_verifydepth; it gives OpenSSL one more (tls_server.c), and OpenSSL's
MAX_INTERMEDIATES = VERIFY_DEPTH + 1  # depth counts the intermediate CAs between the client's certificate and root
_PEM_BLOCK = re.compile(rb"-----BEGIN (TRUSTED |X509 )?CERTIFICATE-----(.*?)-----END \1?CERTIFICATE-----", re.S)


class ClientAnchors:
    """The certificates of tls_ca_file that Postfix's OpenSSL (no partial chains) would end a chain at: each one
    that leads, through the file's certificates, to a self-signed one there. The handshake (partial chains: any
    listed certificate is an anchor, to pin one) only says a client's chain ends at some listed certificate;
    `trusts(chain)` says whether that one is of these, all of the way valid now."""

    def __init__(self, certificates: list[x509.Certificate]):
        self._paths: dict[bytes, list[x509.Certificate]] = {}  # DER -> it and its issuers up to a self-signed one
        for cert in certificates:
            path = _path_to_self_signed(cert, certificates)
            if path is not None:
                self._paths[cert.public_bytes(Encoding.DER)] = path

    @classmethod
    def read(cls, ca_file: str) -> "ClientAnchors":
        """The file's certificates (PEM, `TRUSTED CERTIFICATE` blocks too: their certificate comes first); one
        cryptography cannot read is no anchor."""
        with open(ca_file, "rb") as f:
            text = f.read()
        certificates = []
        for block in _PEM_BLOCK.finditer(text):
            try:
                der = base64.b64decode(b"".join(block.group(2).split()))
                certificates.append(x509.load_der_x509_certificate(der[:_der_element(der, 0)[1]]))
            except (ValueError, IndexError):
                continue
        return cls(certificates)

    def trusts(self, verified_chain: list[bytes]) -> bool:
        """Whether the handshake's chain (the client's certificate first, the listed one it ended at last) is one
        Postfix would verify: it ends at a certificate that leads to a self-signed one, valid now, not too deep."""
        path = self._paths.get(verified_chain[-1]) if verified_chain else None
        if path is None or len(verified_chain) + len(path) - 3 > MAX_INTERMEDIATES:  # (the listed one in both)
            return False
        now = datetime.datetime.now(datetime.timezone.utc)
        return all(cert.not_valid_before_utc <= now <= cert.not_valid_after_utc for cert in path)


def _path_to_self_signed(cert: x509.Certificate, pool: list[x509.Certificate]) -> list[x509.Certificate] | None:
    path = [cert]
    while not _issued_by(path[-1], path[-1]):
        issuer = next((c for c in pool if c not in path and _may_issue(c) and _issued_by(path[-1], c)), None)
        if issuer is None or len(path) > MAX_INTERMEDIATES + 1:
            return None
        path.append(issuer)
    return path


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _may_issue(cert: x509.Certificate) -> bool:
    """A CA certificate (basicConstraints CA:TRUE), or a self-signed one without basicConstraints (OpenSSL takes
    an X.509 v1 root for a CA)."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.issuer == cert.subject
    except ValueError:  # (an extension cryptography cannot parse)
        return False


def _der_element(der: bytes, at: int) -> tuple[int, int]:
    """(where its content starts, where it ends) of the DER element at offset `at`. IndexError past the end."""
    first = der[at + 1]
    if first < 0x80:
        return at + 2, at + 2 + first
    count = first & 0x7F
    start = at + 2 + count
    if count == 0 or start > len(der):
        raise IndexError("not a DER length")
    return start, start + int.from_bytes(der[at + 2:start], "big")


def subject_public_key_info(der: bytes) -> bytes:
    """The certificate's own SubjectPublicKeyInfo bytes, as Postfix's tls_fprint.c hashes them (i2d_X509_PUBKEY of
    the certificate's key: its encoding as sent, a compressed EC point or RSA-PSS parameters kept): the element of
    TBSCertificate after the optional [0] version, serial, signature algorithm, issuer, validity and subject.
    IndexError when `der` is not shaped so."""
    tbs = _der_element(der, 0)[0]
    at = _der_element(der, tbs)[0]
    if der[at] == 0xA0:  # [0] EXPLICIT version
        at = _der_element(der, at)[1]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        at = _der_element(der, at)[1]
    end = _der_element(der, at)[1]
    if der[at] != 0x30 or end > len(der):
        raise IndexError("no SubjectPublicKeyInfo")
    return der[at:end]


@dataclass(frozen=True)
class ClientCert:
    """A TLS client's certificate as Postfix's smtpd knows it (TLS_SESS_STATE's peer_CN, issuer_CN,
    peer_cert_fprint, peer_pkey_fprint and TLS_CERT_FLAG_TRUSTED)."""

    subject_cn: str
    issuer_cn: str
    fingerprint: str
    pkey_fingerprint: str
    trusted: bool = False


def fingerprint(data: bytes, digest: str) -> str:
    """Postfix's tls_fingerprint: the digest of `data`, upper-case hex pairs joined by ':'."""
    return ":".join(f"{byte:02X}" for byte in hashlib.new(digest, data).digest())


def client_cert(ssl_object: ssl.SSLObject | None, digest: str, client: str = "") -> ClientCert | None:
    """What the client's certificate says (None: no TLS, or no certificate sent); trusted as `ClientAnchors`
    says of the chain the handshake verified. `client` (host[addr]) is named by a warning about a name."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der or ssl_object is None:
        return None
    trusted = _trusted(ssl_object)
    try:
        pkey_fingerprint = fingerprint(subject_public_key_info(der), digest)
    except IndexError:  # (OpenSSL took it, so it has one; kept as a certificate without a key fingerprint)
        pkey_fingerprint = ""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:  # (one cryptography cannot read: its fingerprints only)
        return ClientCert("", "", fingerprint(der, digest), pkey_fingerprint, trusted)
    return ClientCert(_subject_name(cert.subject, client), _issuer_name(cert.issuer, client),
                      fingerprint(der, digest), pkey_fingerprint, trusted)


def _trusted(ssl_object: ssl.SSLObject) -> bool:
    anchors = ssl_object.context.client_anchors if isinstance(ssl_object.context, ServerContext) else None
    if anchors is None:
        return False
    # (Python 3.13's SSLObject.get_verified_chain; before it, its _ssl object's)
    chain = getattr(ssl_object, "get_verified_chain", None) or ssl_object._sslobj.get_verified_chain  # type: ignore
    return anchors.trusts([ssl.PEM_cert_to_DER_cert(cert.public_bytes()) for cert in chain() or ()])


def _text_name(name: x509.Name, oid: x509.ObjectIdentifier, label: str, client: str) -> str | None:
    """Postfix's tls_text_name: the first `oid` attribute of `name`, trailing NULs dropped; None when there is none,
    or (with Postfix's warning) when it is CCERT_BUFSIZ bytes or longer, holds a NUL or a non-printable ASCII
    character: such a name never reaches a reply, a log line, a policy server or a milter."""
    found = name.get_attributes_for_oid(oid)
    if not found:
        return None
    value = found[0].value
    text = (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).rstrip("\0")
    problem = None
    if len(text.encode("utf-8", "surrogatepass")) >= CCERT_BUFSIZ:
        problem = f"peer {label} too long: {len(text.encode('utf-8', 'surrogatepass'))}"
    elif "\0" in text:
        problem = f"NULL character in peer {label}"
    elif any(c < " " or c == "\x7f" for c in text):
        problem = f"non-printable content in peer {label}"
    if problem is not None:
        log.warning("tls_text_name: %s: %s", client, problem)
        return None
    return text


def _subject_name(name: x509.Name, client: str) -> str:
    """Postfix's tls_peer_CN: the subject's CommonName, else \"\"."""
    return _text_name(name, NameOID.COMMON_NAME, "subject CN", client) or ""


def _issuer_name(name: x509.Name, client: str) -> str:
    """Postfix's tls_issuer_CN: the issuer's CommonName, else its organisation, else \"\"."""
    found = _text_name(name, NameOID.COMMON_NAME, "issuer CN", client)
    if found is None:
        found = _text_name(name, NameOID.ORGANIZATION_NAME, "issuer Organization", client)
    return found or ""
