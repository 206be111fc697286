"""TLS client certificates for the tests of smtpd's client certificate checks (tls_ask_ccert and the restrictions
permit_tls_clientcerts, permit_tls_all_clientcerts, check_ccert_access).

    pki = ClientPki(folder)            # a trustme CA (its PEM in pki.ca_file), the server's certificate for
                                       # localhost (pki.server_cert: key and chain in one file), everything written
                                       # readable by the `postfix` user
    card = pki.client("name")          # a client certificate from that CA, CN=name: card.cert_file, card.key_file,
                                       # card.fingerprint / card.pkey_fingerprint (sha256, as Postfix writes them)
    pki.client("x", issuer=None)       # self-signed
    pki.client("y", issuer=trustme.CA())   # from a CA the server does not know
    pki.openssl_client("z", COMPRESSED_EC)  # made by the openssl CLI from this PKI's CA, with a key OpenSSL makes
                                       # (COMPRESSED_EC: a P-256 key whose point is written compressed)
    card.context(pki)                  # a client ssl context that trusts the server and presents this certificate

The public key fingerprint is worked out by the openssl CLI, as docs/security.md tells an administrator to (and
as Postfix's i2d_X509_PUBKEY keeps the certificate's own encoding), independently of mailflow.stages.smtpd.tls.
Nothing here starts anything long-lived; files and openssl runs only.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUSTED = object()  # ClientPki.client's default issuer: the PKI's own CA
COMPRESSED_EC = ("sh", "-c", 'openssl ecparam -name prime256v1 -genkey -noout | '
                 'openssl ec -conv_form compressed -out "$0" 2>/dev/null')  # (the key file's path follows)


def colon_hex(data: bytes, digest: str = "sha256") -> str:
    """A fingerprint as Postfix writes it, computed here independently of mailflow.stages.smtpd.tls."""
    return ":".join(f"{b:02X}" for b in hashlib.new(digest, data).digest())


@dataclass
class ClientCard:
    name: str
    cert_file: str
    key_file: str
    der: bytes
    spki: bytes

    @property
    def fingerprint(self) -> str:
        return colon_hex(self.der)

    @property
    def pkey_fingerprint(self) -> str:
        return colon_hex(self.spki)

    def context(self, pki: "ClientPki") -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        pki.ca.configure_trust(ctx)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


class ClientPki:
    def __init__(self, folder: Path):
        self.folder = folder
        os.chmod(folder, 0o755)
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.server_cert = self._write("server.pem", server.private_key_and_cert_chain_pem.bytes())

    def client(self, name: str, issuer: object = TRUSTED, common_name: str | None = None) -> ClientCard:
        """A client certificate with CN `name` (or `common_name`): from this PKI's CA, from another trustme.CA, or
        self-signed (None)."""
        if issuer is None:
            key_pem, cert_pem = _self_signed(common_name or name)
        else:
            ca = self.ca if issuer is TRUSTED else issuer
            assert isinstance(ca, trustme.CA)
            leaf = ca.issue_cert(name, common_name=common_name or name)
            key_pem, cert_pem = leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes()
        return self._card(name, cert_pem, self._write(f"{name}.key", key_pem))

    def openssl_client(self, name: str, keygen: tuple[str, ...] = COMPRESSED_EC,
                       extensions: str = "extendedKeyUsage=clientAuth") -> ClientCard:
        """A client certificate with CN `name` from this PKI's CA, its key made by `keygen` (a command the key
        file's path is added to) and the certificate by `openssl req` and `openssl x509 -req` (with `extensions`,
        an openssl extension file's lines)."""
        key_file = str(self.folder / f"{name}.key")
        subprocess.run([*keygen, key_file], check=True)
        os.chmod(key_file, 0o644)
        ca_key = self._write("ca.key", self.ca.private_key_pem.bytes())
        extension_file = self._write(f"{name}.ext", f"{extensions}\n".encode())
        csr = subprocess.run(["openssl", "req", "-new", "-key", key_file, "-subj", f"/CN={name}"], check=True,
                             capture_output=True).stdout
        cert_pem = subprocess.run(["openssl", "x509", "-req", "-CA", self.ca_file, "-CAkey", ca_key, "-days", "2",
                                   "-set_serial", str(x509.random_serial_number()), "-extfile", extension_file],
                                  input=csr, check=True, capture_output=True).stdout
        return self._card(name, cert_pem, key_file)

    def _card(self, name: str, cert_pem: bytes, key_file: str) -> ClientCard:
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
        return ClientCard(name, self._write(f"{name}.crt", cert_pem), key_file, der, _openssl_spki(der))

    def _write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        os.chmod(path, 0o644)
        return str(path)


def _openssl_spki(der: bytes) -> bytes:
    """The certificate's DER public key as docs/security.md's openssl commands give it."""
    pem = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-pubkey"], input=der, check=True,
                         capture_output=True).stdout
    return subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem, check=True,
                          capture_output=True).stdout


def _self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
