"""`mailflow dkim keygen`: a new DKIM key and the TXT record that publishes it (opendkim-genkey's job).

    generate(algorithm="rsa", bits=2048) -> bytes          a PKCS#8 PEM private key (RSA or Ed25519); OpenDKIM
                                                          2.11 and mailflow's KeyTable both read it
    write_key(path, pem)                                   creates the file 0600 (never replaces one: FileExistsError)
    txt_record(key) -> str                                 a BIND zone line:
                                                          `sel._domainkey.domain. IN TXT ( "…" "…" )`, the value
                                                          cut into strings of at most 255 characters
Failures: OSError from writing the file (the caller says which).
"""
from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailflow.signing.keytables import SigningKey

ALGORITHMS = ("rsa", "ed25519")
TXT_STRING = 255  # the longest character-string a TXT record holds


def generate(algorithm: str = "rsa", bits: int = 2048) -> bytes:
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        raise ValueError(f"{algorithm!r}: DKIM keys are {' or '.join(ALGORITHMS)}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: str, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def txt_strings(value: str) -> list[str]:
    return [value[i:i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or [""]


def txt_record(key: SigningKey, ttl: int | None = None) -> str:
    strings = " ".join(f'"{s}"' for s in txt_strings(key.public_record()))
    return f"{key.record_name}. {f'{ttl} ' if ttl else ''}IN TXT ( {strings} )"
