"""OpenDKIM's SigningTable and KeyTable, read as OpenDKIM reads them, so that an existing setup moves over as it is.

    SigningKey(name, domain, selector, algorithm, private)    one key: "rsa-sha256" or "ed25519-sha256"; `private`
                                  in dkimpy's form (RSA: PKCS#1 PEM; Ed25519: the base64 seed); `public_record()`
                                  is its `v=DKIM1; k=…; p=…` TXT value
    load_private_key(data) -> (algorithm, dkimpy form, public key bytes)   PEM (PKCS#1 or PKCS#8, RSA or Ed25519)
                                  or a bare base64 Ed25519 seed (dkimpy's own form)
    KeyTable.load(path) -> KeyTable            `keyname domain:selector:keyfile` lines; `.get(name, from_domain)`
    SigningTable.load(kind, path)              kind "refile": `pattern keyname` lines, `*` wildcards, first match
                                  wins; kind "file": exact keys, asked in OpenDKIM's order (`lookup_keys`)
      .key_name(address) -> str | None         the key name for a From address ("%" becomes the address's domain)
    Keys(signing_table, key_table).for_address(address) -> SigningKey | None
    keys_from_config(dkim_config, where) -> Keys | None        None when no signing table is configured
    arc_key_from_config(arc, dkim, keys) -> SigningKey | None  the RSA key `[arc] key` names; None with ARC off

Lines: `#` starts a comment, blank lines are skipped, the key and the value are separated by white space. A key
file path that is relative is taken from the KeyTable's directory; a third field that is not a path is the key
itself (PEM or base64), as OpenDKIM allows.
Failure behaviour: a table or key file that cannot be read (one that is not a regular file, a FIFO or /dev/zero,
included: mailflow.files) or parsed raises `ConfigError(file, setting, reason)`
at load time (the server does not start with a signing setup it cannot use); a From address no entry matches
gives None (the message is not signed).
"""
from __future__ import annotations

import base64
import fnmatch
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mailflow.config import ArcConfig, DkimConfig, opendkim_dataset
from mailflow.errors import ConfigError
from mailflow.files import TABLE_LIMIT, TEXT_LIMIT, read_regular_file

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"


@dataclass(frozen=True)
class SigningKey:
    name: str
    domain: str
    selector: str
    algorithm: str
    private: bytes = b""
    public: bytes = b""  # RSA: SubjectPublicKeyInfo DER; Ed25519: the raw 32 bytes (RFC 8463)

    def public_record(self) -> str:
        kind = "rsa" if self.algorithm == RSA else "ed25519"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(self.public).decode('ascii')}"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def load_private_key(data: bytes) -> tuple[str, bytes, bytes]:
    """(algorithm, the key as dkimpy takes it, the public key as published). Raises ValueError."""
    text = data.strip()
    key: PrivateKeyTypes
    if not text.startswith(b"-----"):
        seed = base64.b64decode(text, validate=True)
        if len(seed) != 32:
            raise ValueError("neither a PEM key nor a base64 Ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        key = serialization.load_pem_private_key(text, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return RSA, pem, public
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return ED25519, base64.b64encode(seed), public
    raise ValueError(f"a {type(key).__name__}: DKIM signs with RSA or Ed25519 keys")


def _entries(path: str, setting: str) -> list[tuple[str, str]]:
    try:
        text = read_regular_file(path, TABLE_LIMIT, null_is_empty=True).decode("utf-8")
    except (OSError, UnicodeError) as e:
        raise ConfigError(path, setting, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ") if " " in line else line.partition("\t")
        if not value.strip():
            raise ConfigError(path, setting, f"line {number}: {key!r} has no value")
        out.append((key.strip(), value.strip()))
    return out


class KeyTable:
    def __init__(self, keys: dict[str, tuple[str, str, str]], path: str):
        self._keys = keys  # name -> (domain, selector, key file or key text)
        self._path = path
        self._loaded: dict[tuple[str, str], SigningKey] = {}

    @classmethod
    def load(cls, path: str, setting: str = "dkim.key_table") -> "KeyTable":
        keys = {}
        for name, value in _entries(path, setting):
            parts = value.split(":", 2)
            if len(parts) != 3 or not all(p.strip() for p in parts):
                raise ConfigError(path, setting, f"{name}: expected domain:selector:keyfile, got {value!r}")
            keys[name] = (parts[0].strip().lower(), parts[1].strip(), parts[2].strip())
        table = cls(keys, path)
        for name, (domain, _, _) in keys.items():
            if domain != "%":
                table.get(name, domain)  # read every key now: a bad one stops the start, not a delivery
        return table

    @property
    def names(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str, from_domain: str = "") -> SigningKey | None:
        if name not in self._keys:
            return None
        domain, selector, source = self._keys[name]
        domain = from_domain.lower() if domain == "%" else domain
        cached = self._loaded.get((name, domain))
        if cached is None:
            algorithm, private, public = self._read_key(name, source.replace("%", domain))
            cached = self._loaded[(name, domain)] = SigningKey(name, domain, selector, algorithm, private, public)
        return cached

    def _read_key(self, name: str, source: str) -> tuple[str, bytes, bytes]:
        where = self._path
        try:
            if source.startswith(("/", "./", "../")):
                where = str(Path(self._path).parent / source)
                data = read_regular_file(where, TEXT_LIMIT)
            else:
                data = source.encode("ascii")
            return load_private_key(data)
        except (OSError, ValueError, TypeError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ConfigError(where, "dkim.key_table", f"key {name}: {reason}") from None


def lookup_keys(address: str) -> list[str]:
    """OpenDKIM's order for a `file:` SigningTable: user@host, host, user@.parent…, .parent…, user@*, *."""
    user, _, host = address.lower().rpartition("@")
    labels = host.split(".")
    parents = [".".join(labels[i:]) for i in range(1, len(labels))]
    keys = [address.lower(), host] + [f"{user}@.{p}" for p in parents] + [f".{p}" for p in parents]
    return keys + [f"{user}@*", "*"]


class SigningTable:
    def __init__(self, kind: str, entries: list[tuple[str, str]]):
        self._kind = kind
        self._entries = entries
        self._exact = {key.lower(): value for key, value in reversed(entries)}  # the first entry of a key wins

    @classmethod
    def load(cls, kind: str, path: str, setting: str = "dkim.signing_table") -> "SigningTable":
        return cls(kind, _entries(path, setting))

    def key_name(self, address: str) -> str | None:
        value = self._value(address)
        if value is None:
            return None
        name = value.split()[0]
        return address.rpartition("@")[2].lower() if name == "%" else name

    def _value(self, address: str) -> str | None:
        if self._kind == "refile":
            return next((value for pattern, value in self._entries
                         if fnmatch.fnmatchcase(address.lower(), pattern.lower())), None)
        return next((self._exact[key] for key in lookup_keys(address) if key in self._exact), None)


@dataclass(frozen=True)
class Keys:
    signing_table: SigningTable
    key_table: KeyTable

    def for_address(self, address: str) -> SigningKey | None:
        if "@" not in address:
            return None
        name = self.signing_table.key_name(address)
        return None if name is None else self.key_table.get(name, address.rpartition("@")[2])

    def named(self, name: str, domain: str = "") -> SigningKey | None:
        return self.key_table.get(name, domain)


def keys_from_config(dkim: DkimConfig) -> Keys | None:
    """The tables `[dkim]` names, read now; None when there is no signing table. Raises ConfigError."""
    if not dkim.key_table:
        return None
    key_table = KeyTable.load(opendkim_dataset(dkim.key_table)[1])
    if not dkim.signing_table:
        return Keys(SigningTable("file", []), key_table)
    kind, path = opendkim_dataset(dkim.signing_table)
    return Keys(SigningTable.load(kind, path), key_table)


def arc_key_from_config(arc: ArcConfig, dkim: DkimConfig, keys: Keys | None) -> SigningKey | None:
    """The key of the DKIM key table that `[arc] key` names, when ARC is on; None when it is off. Raises
    ConfigError (naming the key table, the configuration when there is none) unless it is an RSA key there."""
    if not arc.enabled:
        return None
    key = keys.named(arc.key) if keys is not None else None
    if key is None or key.algorithm != RSA:
        raise ConfigError(dkim.key_table, "arc.key",
                          f"{arc.key!r} is not an RSA key of dkim.key_table (ARC seals with RSA)")
    return key
