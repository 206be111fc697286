"""MTA-STS (RFC 8461): a receiving domain's published TLS policy, found and kept for the SMTP client.

    parse_record(txt_values) -> str | None       the policy id of the `_mta-sts` TXT record ("v=STSv1; id=…");
                                                 None without exactly one record beginning "v=STSv1;"
    parse_policy(text) -> StsPolicy              the policy file (`version: STSv1`, `mode:`, `mx:`…, `max_age:`);
                                                 raises ValueError naming what is wrong
    mx_allowed(host, patterns) -> bool           `mx.example.com`, or `*.example.com` for exactly one more label
    HttpsPolicyFetcher(resolver, ca_file="", timeout=10, port=443)
      await fetch(domain) -> str                 GET https://mta-sts.DOMAIN/.well-known/mta-sts.txt: the name
                                                 resolved through the Resolver, the certificate verified for that
                                                 name, 200 and text/plain only, no redirects, at most
                                                 MAX_POLICY_SIZE bytes, all within `timeout`; raises FetchError
    MtaSts(resolver, fetcher, now=time.monotonic, cache_size=1000)
      await policy(domain, log=SMTP_LOG) -> StsPolicy | None   the domain's policy (mode none counts as no policy
                                                 for callers); `log`: the asking client's logger (chat.client_log),
                                                 whose lines these are: one MtaSts serves smtp, relay and each
                                                 [smtp.services.NAME]

Caching (RFC 8461 3.3, 5.1): a fetched policy is kept until `max_age` (at most MAX_AGE_LIMIT) runs out, in a
least-recently-used cache of `cache_size` domains and CACHE_BYTES (a 64 KB policy of short mx lines is some
528 KB of strings once parsed), which, past its bytes, drops its largest policies first. The TXT record is asked
at each delivery: the same id means the cached policy stands; a new id fetches the policy again; a fetch or TXT
lookup that fails keeps the cached one (and without one, the destination has no policy: delivery is as without
MTA-STS). Concurrent deliveries to one domain
share one fetch.
Failure behaviour: nothing raises out of `policy()`; failures are logged once per fetch, with the domain, by the
logger of the client whose delivery asked (a fetch shared by several: the first's).
"""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import h11

from mailflow.dns import NotFound, Resolver
from mailflow.errors import DeliveryError, LookupRetry
from mailflow.files import TEXT_LIMIT, check_regular_file
from mailflow.syntax import ascii_digits

SMTP_LOG = logging.getLogger("mailflow.smtp")  # the lines of a caller that names no client's logger: smtp's

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3: a policy larger than this is not valid
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: a year
CACHE_BYTES = 8 * 2**20  # the cache's bytes at most, as _size counts them (cache_size ordinary policies fit)
ENTRY_COST = 500  # a cached policy's bytes besides its mx patterns (entry, dataclasses, id, key), near enough
POLICY_PATH = "/.well-known/mta-sts.txt"
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_VERSION = re.compile(r"\s*v=STSv1[ \t]*;")  # RFC 8461 3.1: how a record begins ("v=STSv10" is another)


class FetchError(Exception):
    """The policy could not be fetched (connection, TLS, HTTP status, content type, size, time)."""


@dataclass(frozen=True)
class StsPolicy:
    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""


def parse_record(values: list[str]) -> str | None:
    records = [v for v in values if _VERSION.match(v)]
    if len(records) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in records[0].split(";") if "=" in part)
    record_id = fields.get("id", "").strip()
    return record_id if _ID.fullmatch(record_id) else None


def parse_policy(text: str) -> StsPolicy:
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise ValueError("no `version: STSv1` line")
    mode = (fields.get("mode") or [""])[0].lower()
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not enforce, testing or none")
    max_age_text = (fields.get("max_age") or [""])[0]
    if not ascii_digits(max_age_text):  # (RFC 8461: 1*10DIGIT; int() takes +1, -1 and 1_0)
        raise ValueError("max_age is not a number of seconds")
    max_age = int(max_age_text)
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []) if m)
    if mode != "none" and not mx:
        raise ValueError("no mx line")
    return StsPolicy(mode, mx, min(max_age, MAX_AGE_LIMIT))


def mx_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            first, dot, rest = host.partition(".")
            if first and dot and rest == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


class HttpsPolicyFetcher:
    """See the module docstring. `port` is for tests (a policy server on loopback); RFC 8461 says 443."""

    def __init__(self, resolver: Resolver, *, ca_file: str = "", timeout: float = 10.0, port: int = 443):
        self._resolver = resolver
        self._timeout = timeout
        self._port = port
        self._ca_file = ca_file
        self._context: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        """Built on first use (the CA file is read then); an unreadable one is a FetchError, not a failed start."""
        if self._context is None:
            try:
                if self._ca_file:
                    check_regular_file(self._ca_file, TEXT_LIMIT)  # OpenSSL opens it by name: not a FIFO
                self._context = ssl.create_default_context(cafile=self._ca_file or None)
            except ssl.SSLError as e:
                raise FetchError(f"cannot load the trust anchors {self._ca_file}: {e}") from None
            except OSError as e:  # (RefusedFile's str names the file again: its reason alone)
                raise FetchError(f"cannot load the trust anchors {self._ca_file}: {e.strerror or e}") from None
        return self._context

    async def fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        context = self._tls()
        try:
            async with asyncio.timeout(self._timeout):
                addresses = await self._resolver.addresses(host)
                failure = "no address"
                for address in addresses:
                    try:
                        reader, writer = await asyncio.open_connection(address, self._port, ssl=context,
                                                                       server_hostname=host)
                    except (OSError, ssl.SSLError) as e:
                        failure = f"{address}: {e}"
                        continue
                    try:
                        return await _get(reader, writer, host)
                    finally:
                        writer.close()
                raise FetchError(f"cannot connect to {host}: {failure}")
        except TimeoutError:
            raise FetchError(f"{host}: timed out after {self._timeout:g}s") from None
        except (LookupRetry, DeliveryError) as e:
            raise FetchError(f"{host}: {e.text}") from None


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> str:
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=POLICY_PATH,
                          headers=[("Host", host), ("User-Agent", "mailflow"), ("Connection", "close")])
    writer.write(connection.send(request) + connection.send(h11.EndOfMessage()))
    body = bytearray()
    try:
        await writer.drain()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(16384))
            elif isinstance(event, h11.Response):
                _check_response(event, host)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_POLICY_SIZE:
                    raise FetchError(f"{host}: policy larger than {MAX_POLICY_SIZE} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except (h11.ProtocolError, OSError, ssl.SSLError) as e:
        raise FetchError(f"{host}: {e}") from None
    return body.decode("utf-8", "replace")


def _check_response(response: h11.Response, host: str) -> None:
    if response.status_code != 200:  # redirects are not followed (RFC 8461 3.3)
        raise FetchError(f"{host}: HTTP status {response.status_code}")
    content_type = dict(response.headers).get(b"content-type", b"").split(b";")[0].strip().lower()
    if content_type != b"text/plain":
        raise FetchError(f"{host}: content type {content_type.decode('latin-1')!r}, not text/plain")


@dataclass(frozen=True)
class _Cached:
    policy: StsPolicy
    expires: float
    size: int  # _size(policy)


def _size(policy: StsPolicy) -> int:
    return sys.getsizeof(policy.mx) + sum(sys.getsizeof(pattern) for pattern in policy.mx) + ENTRY_COST


class MtaSts:
    """See the module docstring."""

    def __init__(self, resolver: Resolver, fetcher, *, now: Callable[[], float] = time.monotonic,
                 cache_size: int = 1000):
        self._resolver = resolver
        self._fetcher = fetcher
        self._now = now
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_bytes = 0  # the entries' sizes
        self._fetching: dict[str, asyncio.Future] = {}

    async def policy(self, domain: str, log: logging.Logger = SMTP_LOG) -> StsPolicy | None:
        domain = domain.lower().rstrip(".")
        cached = self._cached(domain)
        try:
            record_id = parse_record(await self._resolver.txt(f"_mta-sts.{domain}"))
        except NotFound:
            record_id = None
        except (LookupRetry, DeliveryError) as e:
            log.info("MTA-STS: TXT lookup for %s failed: %s", domain, e.text)
            return cached
        if record_id is None or (cached is not None and cached.id == record_id):
            return cached
        return await self._fetch_shared(domain, record_id, cached, log)

    def _cached(self, domain: str) -> StsPolicy | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        if entry.expires <= self._now():
            self._drop(domain)
            return None
        self._cache.move_to_end(domain)
        return entry.policy

    async def _fetch_shared(self, domain: str, record_id: str, cached: StsPolicy | None,
                            log: logging.Logger) -> StsPolicy | None:
        pending = self._fetching.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(domain, record_id, cached, log))
            self._fetching[domain] = pending
            pending.add_done_callback(lambda _: self._fetching.pop(domain, None))
        return await asyncio.shield(pending)

    async def _fetch(self, domain: str, record_id: str, cached: StsPolicy | None,
                     log: logging.Logger) -> StsPolicy | None:
        try:
            fetched = parse_policy(await self._fetcher.fetch(domain))
        except (FetchError, ValueError) as e:
            log.warning("MTA-STS: policy of %s (id %s) not usable: %s%s", domain, record_id, e,
                        "; keeping the cached one" if cached else "")
            return cached
        policy = StsPolicy(fetched.mode, fetched.mx, fetched.max_age, record_id)
        self._keep(domain, _Cached(policy, self._now() + policy.max_age, _size(policy)))
        return policy

    def _keep(self, domain: str, entry: _Cached) -> None:
        """Past cache_size the least recently used policy goes; past CACHE_BYTES the largest (the least recently
        used of equals), so that a few huge policies of hostile domains cannot push out the ordinary ones."""
        self._drop(domain)
        self._cache[domain] = entry
        self._cache_bytes += entry.size
        while len(self._cache) > self._cache_size:
            self._drop(next(iter(self._cache)))
        while self._cache_bytes > CACHE_BYTES:
            self._drop(max(self._cache, key=lambda cached: self._cache[cached].size))

    def _drop(self, domain: str) -> None:
        entry = self._cache.pop(domain, None)
        if entry is not None:
            self._cache_bytes -= entry.size
