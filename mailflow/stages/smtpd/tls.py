"""smtpd's TLS: the server certificate and key as an `ssl.SSLContext`, built at start and rebuilt on reload; what
a client's certificate says.

What it owns
- `ServerTls(cert_file, key_file, ca_file, ask_ccert)`: reads the certificate chain and key (Postfix
  smtpd_tls_cert_file / smtpd_tls_key_file; an empty key file means the key is in the certificate file) into
  `.context`. With `ask_ccert` (smtpd_tls_ask_ccert) the context asks the client for a certificate, verified
  against `ca_file` (smtpd_tls_CAfile; a certificate listed there is a trust anchor itself, so a self-signed
  client certificate is pinned by listing it). A reload reads the files again into new ServerTls objects
  (server.Smtpd.reconfigure): new sessions get them, sessions already in TLS keep theirs.
- `ClientCert`, `client_cert(ssl_object, digest)`: the client's certificate as Postfix's tls_server.c describes
  it: subject and issuer CommonName, the fingerprints of the certificate and of its public key
  (smtpd_tls_fingerprint_digest over the DER certificate and the DER SubjectPublicKeyInfo, `AB:CD:…`), trusted.
  `fingerprint(data, digest)` makes one.

What differs from Postfix (docs/security.md, "Client certificates"): OpenSSL, as Python's ssl drives it, ends the
handshake of a client certificate that `ca_file` does not vouch for (Python has no verify callback); Postfix's
callback lets it through untrusted and matches its fingerprint all the same. So every certificate mailflow sees is
trusted: `Untrusted TLS connection established …` never happens, and a certificate is pinned by listing it (or
its CA) in `ca_file` as well as its fingerprint in relay_clientcerts.

Failure behaviour: a missing, unreadable or mismatched file, or one that is not a regular file (a FIFO would hold
OpenSSL at open(): mailflow.files), raises `TlsError` naming the file and its setting, at start (so `mailflow
serve` refuses to start) and at a reload (the reload is refused; the contexts in use stay). `client_cert` does not
raise: a certificate cryptography cannot read has fingerprints of its DER only (no public key fingerprint).
"""
from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from mailflow.errors import ConfigError
from mailflow.files import TEXT_LIMIT, check_regular_file


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
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.verify_mode = ssl.CERT_OPTIONAL


class ServerTls:
    """The context of one certificate and key (and client certificate settings), read when made."""

    def __init__(self, cert_file: str, key_file: str = "", ca_file: str = "", ask_ccert: bool = False):
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = build_context(cert_file, key_file, ca_file, ask_ccert)


# ---------------------------------------------------------------------------------------------- client certificates


@dataclass(frozen=True)
class ClientCert:
    """A TLS client's certificate as Postfix's smtpd knows it (TLS_SESS_STATE's peer_CN, issuer_CN,
    peer_cert_fprint, peer_pkey_fprint and TLS_CERT_FLAG_TRUSTED)."""

    subject_cn: str
    issuer_cn: str
    fingerprint: str
    pkey_fingerprint: str
    trusted: bool = True  # (always, under Python's ssl: see the module doc)


def fingerprint(data: bytes, digest: str) -> str:
    """Postfix's tls_fingerprint: the digest of `data`, upper-case hex pairs joined by ':'."""
    return ":".join(f"{byte:02X}" for byte in hashlib.new(digest, data).digest())


def client_cert(ssl_object: ssl.SSLObject | None, digest: str) -> ClientCert | None:
    """What the client's certificate says (None: no TLS, or no certificate sent)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):  # (a key type cryptography does not know: no public key fingerprint)
        return ClientCert("", "", fingerprint(der, digest), "")
    return ClientCert(_common_name(cert.subject), _issuer_name(cert.issuer), fingerprint(der, digest),
                      fingerprint(spki, digest))


def _common_name(name: x509.Name) -> str:
    found = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else ""  # (the first, as tls_text_name)


def _issuer_name(name: x509.Name) -> str:
    """Postfix's tls_issuer_CN: the issuer's CommonName, else its organisation."""
    found = _common_name(name)
    if not found:
        org = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        found = str(org[0].value) if org else ""
    return found

