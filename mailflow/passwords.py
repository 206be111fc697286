"""Password hashes: the formats mailflow writes and verifies (a leaf: the standard library and argon2-cffi only).

Formats, as stored in a user table (smtpd.sasl_user_maps) or the account database:
- `{ARGON2ID}$argon2id$v=19$m=…,t=…,p=…$SALT$HASH`: Argon2id with Dovecot's scheme prefix, so that Dovecot
  verifies the very same string natively (`doveadm pw -t`). What `argon2id_password()` makes (the account
  database's scheme): ARGON2_MEMORY KiB, ARGON2_TIME passes, one lane (libsodium, Dovecot's argon2, verifies
  one lane on every version). `{ARGON2I}` and the bare `$argon2id$`/`$argon2i$` forms are verified too.
- `$scrypt$n=16384,r=8,p=1$SALT$HASH` (stdlib `hashlib.scrypt`; SALT and HASH in unpadded standard base64; a
  16-byte salt and a 32-byte hash): what `hash_password()` makes (`mailflow auth hash-password`); mailflow's own
  format, which Dovecot cannot read.

    hash_password(password, n=, r=, p=, salt=) -> "$scrypt$…"
    argon2id_password(password) -> "{ARGON2ID}$argon2id$…"
    parse_hash(encoded) -> ScryptHash | None          the parts of a scrypt hash this module accepts
    verify_password(password, encoded, dummy=None)    True when it matches; constant time in the password
    text_problem(password) -> str | None              why a password typed or read from standard input is none
                                                      a client can send (not UTF-8, a NUL, CR or LF), or None

Failure behaviour: never raises for a bad or hostile stored hash: it does not match. Cost parameters above
MAX_N/MAX_R/MAX_P (scrypt) or ARGON2_MAX_MEMORY/ARGON2_MAX_TIME/ARGON2_MAX_LANES (Argon2) are refused, so that a
table entry cannot pin the CPU or the memory. A missing or unusable hash costs as much as the `dummy` hash (a
default-cost Argon2id when none is given) and is False, so the time taken does not say whether the user exists.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from argon2 import Type, extract_parameters
from argon2 import PasswordHasher as Argon2Hasher
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.low_level import verify_secret

DEFAULT_N, DEFAULT_R, DEFAULT_P = 16384, 8, 1
MAX_N, MAX_R, MAX_P = 1 << 20, 32, 16
SALT_BYTES, HASH_BYTES = 16, 32
_SCRYPT = re.compile(r"\$scrypt\$n=([0-9]+),r=([0-9]+),p=([0-9]+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")

# Argon2id as OWASP's password storage guide sets it (19 MiB, 2 passes, 1 lane): about 25 ms per check here.
ARGON2_MEMORY, ARGON2_TIME = 19456, 2
ARGON2_MAX_MEMORY, ARGON2_MAX_TIME, ARGON2_MAX_LANES = 262144, 16, 8
_ARGON2_TYPES = {"argon2id": Type.ID, "argon2i": Type.I}
_PREFIXES = {"{ARGON2ID}": "argon2id", "{ARGON2I}": "argon2i"}
_argon2 = Argon2Hasher(time_cost=ARGON2_TIME, memory_cost=ARGON2_MEMORY, parallelism=1)


# ---------------------------------------------------------------------------------------------- scrypt


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * r * (n + p + 2))


def hash_password(password: str | bytes, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P,
                  salt: bytes | None = None) -> str:
    """`$scrypt$n=N,r=R,p=P$SALT$HASH` for `password` (UTF-8 when a str)."""
    secret = password.encode() if isinstance(password, str) else password
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p, HASH_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def text_problem(password: str) -> str | None:
    """Why `password` is no password a mail client can send, or None. Standard input's bytes that are not UTF-8
    arrive as surrogates (Python's surrogateescape): AUTH PLAIN carries UTF-8 (RFC 4616); a NUL ends its fields."""
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return "not UTF-8 text (AUTH PLAIN carries UTF-8)"
    if any(c in password for c in "\0\r\n"):
        return "a NUL, CR or LF character (no mail client can send it)"
    return None


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(encoded: str) -> ScryptHash | None:
    """The parts of a stored scrypt hash, or None when it is not one this module accepts."""
    m = _SCRYPT.fullmatch(encoded.strip())
    if not m:
        return None
    n, r, p = (int(g) for g in m.group(1, 2, 3))
    if n < 2 or n & (n - 1) or n > MAX_N or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        return None
    salt, digest = _unb64(m.group(4)), _unb64(m.group(5))
    if not salt or len(digest) < 16:
        return None
    return ScryptHash(n, r, p, salt, digest)


def _verify_scrypt(password: bytes, stored: ScryptHash) -> bool:
    computed = _scrypt(password, stored.salt, stored.n, stored.r, stored.p, len(stored.digest))
    return hmac.compare_digest(computed, stored.digest)


# ---------------------------------------------------------------------------------------------- argon2


def argon2id_password(password: str | bytes) -> str:
    """`{ARGON2ID}$argon2id$v=19$m=…` for `password` (UTF-8 when a str): Dovecot's scheme prefix, then the
    PHC string argon2-cffi (libargon2) makes."""
    return "{ARGON2ID}" + _argon2.hash(password)


def _argon2_string(encoded: str) -> str | None:
    """The PHC string of an Argon2 hash (its `{ARGON2ID}`/`{ARGON2I}` prefix dropped), or None when it is none
    or its costs are above the limits."""
    for prefix, kind in _PREFIXES.items():
        if encoded.upper().startswith(prefix):
            encoded = encoded[len(prefix):]
            if not encoded.startswith(f"${kind}$"):
                return None
            break
    kind = encoded[1:].partition("$")[0]
    if kind not in _ARGON2_TYPES:
        return None
    try:
        params = extract_parameters(encoded)
    except (InvalidHashError, ValueError):
        return None
    if (params.memory_cost > ARGON2_MAX_MEMORY or params.time_cost > ARGON2_MAX_TIME
            or params.parallelism > ARGON2_MAX_LANES):
        return None
    return encoded


def _verify_argon2(password: bytes, encoded: str) -> bool:
    kind = encoded[1:].partition("$")[0]
    try:
        return verify_secret(encoded.encode("ascii"), password, _ARGON2_TYPES[kind])
    except (VerificationError, InvalidHashError, ValueError, UnicodeEncodeError):
        return False


# ---------------------------------------------------------------------------------------------- checking


_DUMMY_ARGON2 = _argon2.hash(secrets.token_bytes(16))


def verify_password(password: bytes, encoded: str | None, *, dummy: str | None = None) -> bool:
    """True when `password` matches `encoded` (any format of the module doc). A missing or unusable hash costs
    a check against `dummy` (a hash from the same table, so that the cost is the same; default: an Argon2id of
    the default cost) and is False: the time taken does not say whether the user exists."""
    text = encoded.strip() if encoded else ""
    argon2 = _argon2_string(text) if text else None
    if argon2 is not None:
        return _verify_argon2(password, argon2)
    scrypt = parse_hash(text) if text else None
    if scrypt is not None:
        return _verify_scrypt(password, scrypt)
    _spend_as(password, dummy)
    return False


def _spend_as(password: bytes, dummy: str | None) -> None:
    """A check that fails, costing what checking `dummy` costs."""
    scrypt = parse_hash(dummy) if dummy else None
    if scrypt is not None:
        _verify_scrypt(password, scrypt)
        return
    argon2 = _argon2_string(dummy.strip()) if dummy else None
    _verify_argon2(password, argon2 or _DUMMY_ARGON2)
