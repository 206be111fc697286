"""The Sender Rewriting Scheme (postsrsd's job): a forwarded message keeps SPF passing because its envelope sender
becomes an address of this host, and a bounce to that address finds its way back to the original sender.

    Srs(domain, secrets, max_age, now=time.time)
      .forward(sender) -> str        user@other.example -> SRS0=HHHH=TT=other.example=user@<domain>;
                                     an SRS0 address of another forwarder -> SRS1=HHHH=fwd.example==HHHH=TT=…@<domain>;
                                     the null sender and addresses already at <domain> stay as they are
      .reverse(address) -> str | None    SRS0 at <domain> -> the original sender; SRS1 -> the first forwarder's SRS0
                                     address; None when the address is not an SRS address at <domain>
      .is_srs(address) -> bool       an SRS0/SRS1 local part at <domain> (valid or not)
    srs_from_config(config) -> Srs | None     [srs], the secrets read from secret_file; None when off

HHHH is the first four characters of base64(HMAC-SHA1(secret, lower-cased timestamp + domain + local part)), TT the
day (days since the epoch, modulo 1024) in base32, as libsrs2 and postsrsd write them. A reverse mapping checks the
hash against every secret (the first one signs) and the age against `max_age` (at most 1024 days can be told).
Failure behaviour: `reverse` returns None for a forged or expired address (the caller treats it as an unknown
recipient: 550 5.1.1); `srs_from_config` raises ConfigError for a secret file it cannot read or that is empty.
"""
from __future__ import annotations

import base64
import hmac
import time
from hashlib import sha1
from typing import Callable

from mailflow.address import normalise_domain
from mailflow.errors import ConfigError
from mailflow.files import TEXT_LIMIT, read_regular_file

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
PERIOD = 1024  # days: the timestamp's range
HASH_LENGTH = 4
SEPARATORS = "=+-"


class Srs:
    def __init__(self, domain: str, secrets: tuple[bytes, ...], max_age: float,
                 now: Callable[[], float] = time.time):
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        self.domain = normalise_domain(domain)
        self._secrets = secrets
        self._max_days = min(int(max_age // DAY), PERIOD - 1)
        self._now = now

    def _hash(self, secret: bytes, *parts: str) -> str:
        mac = hmac.new(secret, "".join(parts).lower().encode("utf-8"), sha1).digest()
        return base64.b64encode(mac).decode("ascii")[:HASH_LENGTH]

    def _timestamp(self) -> str:
        day = int(self._now() // DAY) % PERIOD
        return BASE32[day >> 5] + BASE32[day & 31]

    def _fresh(self, stamp: str) -> bool:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in BASE32 for c in stamp):
            return False
        then = BASE32.index(stamp[0]) << 5 | BASE32.index(stamp[1])
        today = int(self._now() // DAY) % PERIOD
        return (today - then) % PERIOD <= self._max_days

    def _valid(self, given: str, *parts: str) -> bool:
        return any(hmac.compare_digest(given.lower(), self._hash(s, *parts).lower()) for s in self._secrets)

    def is_srs(self, address: str) -> bool:
        local, at, domain = address.rpartition("@")
        return bool(at) and normalise_domain(domain) == self.domain and local[:4].upper() in ("SRS0", "SRS1") \
            and local[4:5] in SEPARATORS and len(local) > 5

    def forward(self, sender: str) -> str:
        local, at, domain = sender.rpartition("@")
        if not at or not local or normalise_domain(domain) == self.domain:
            return sender
        upper = local[:4].upper()
        if upper == "SRS1" and local[4:5] in SEPARATORS:  # SRS1=HHHH=first==rest: the first hop stays, new hash
            return self._srs1(*_srs1_parts(local[5:]))
        if upper == "SRS0" and local[4:5] in SEPARATORS:  # another forwarder's: SRS1 naming that forwarder
            return self._srs1(domain, "=" + local[5:])
        stamp = self._timestamp()
        digest = self._hash(self._secrets[0], stamp, domain, local)
        return f"SRS0={digest}={stamp}={domain}={local}@{self.domain}"

    def _srs1(self, first_hop: str, rest: str) -> str:
        digest = self._hash(self._secrets[0], first_hop, rest)
        return f"SRS1={digest}={first_hop}={rest}@{self.domain}"

    def reverse(self, address: str) -> str | None:
        if not self.is_srs(address):
            return None
        local = address.rpartition("@")[0]
        kind, body = local[:4].upper(), local[5:]
        if kind == "SRS0":
            parts = body.split("=", 3)
            if len(parts) != 4:
                return None
            digest, stamp, domain, user = parts
            if not (user and domain and self._fresh(stamp) and self._valid(digest, stamp, domain, user)):
                return None
            return f"{user}@{domain}"
        digest, _, tail = body.partition("=")
        first_hop, sep, rest = tail.partition("==")
        if not (sep and first_hop and rest and self._valid(digest, first_hop, "=" + rest)):
            return None
        return f"SRS0={rest}@{first_hop}"


def _srs1_parts(body: str) -> tuple[str, str]:
    """`HHHH=first.hop==rest` -> (first.hop, "=" + rest): the rest as it followed SRS0 in the original."""
    _, _, tail = body.partition("=")
    first_hop, _, rest = tail.partition("==")
    return first_hop, "=" + rest


def srs_from_config(config) -> Srs | None:
    """See the module docstring. `config` is the whole Config."""
    srs = config.srs
    if not srs.enabled:
        return None
    try:
        data = read_regular_file(srs.secret_file, TEXT_LIMIT)
        secrets = tuple(line.strip() for line in data.splitlines() if line.strip())
    except OSError as e:
        raise ConfigError(srs.secret_file, "srs.secret_file", f"cannot read: {e.strerror}") from None
    if not secrets:
        raise ConfigError(srs.secret_file, "srs.secret_file", "no secret in the file")
    return Srs(srs.domain, secrets, srs.max_age)
