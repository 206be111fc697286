"""SPF (RFC 7208) by pyspf, with every DNS question answered by mailflow's Resolver: the one SPF evaluation,
for smtpd's verdicts (senderauth) and for `check-deliverability`.

    await check_host(resolver, ip, sender, helo="", *, timeout, executor=None) -> SpfResult(result, reason)
        result: pass, fail, softfail, neutral, none, permerror, temperror (RFC 7208 2.6); `sender` is the MAIL
        FROM address (or a bare domain), "" for the null sender (then postmaster@helo is checked)

pyspf is synchronous: it runs in a worker thread (`executor`, default the loop's), and each DNS question it
asks there is handed back to the event loop's resolver (`_Bridge`), so tests serve the zones from the in-process
DNS and no second resolver path exists. pyspf expands macros and keeps the RFC's limits (ten lookups, two void
lookups).
Failure behaviour: never raises for a record or an answer: a lookup that fails (or `timeout` for the whole
evaluation) is temperror, a record pyspf cannot read permerror, each with its reason. An evaluation out of time
stops where it is (its lookups fail at once): a slow sender's DNS holds no worker thread past its verdict.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass

import spf

from mailflow.dns import NotFound, Resolver
from mailflow.errors import LookupRetry

log = logging.getLogger("mailflow.smtpd")

DOMAIN_LIMIT = 253  # RFC 7208 7.3: an expanded domain name is cut to this many characters


@dataclass(frozen=True)
class SpfResult:
    result: str
    reason: str = ""  # pyspf's explanation (why a fail, an error)


async def check_host(resolver: Resolver, ip: str, sender: str, helo: str = "", *, timeout: float,
                     executor: concurrent.futures.Executor | None = None) -> SpfResult:
    """See the module doc."""
    loop = asyncio.get_running_loop()
    identity = sender if "@" in sender else (f"postmaster@{sender}" if sender else f"postmaster@{helo}")
    bridge = _Bridge(resolver, loop, timeout)
    query = _SpfQuery(ip, identity, helo or identity.rpartition("@")[2], lookup=bridge)
    try:
        result, _, reason = await asyncio.wait_for(loop.run_in_executor(executor, query.check), timeout)
    except TimeoutError:
        return SpfResult("temperror", f"no answer within {timeout:g}s")
    except Exception as e:  # pyspf on a record it cannot read: its words
        log.warning("SPF check of %s for [%s] failed: %r", identity, ip, e)
        return SpfResult("permerror", str(e))
    finally:  # out of time, or the session gone (cancelled): the thread stops asking and goes back to its pool
        bridge.abandon()
    return SpfResult(result, reason)


class _Bridge:
    """pyspf's DNS questions (asked in a worker thread) answered by the event loop's resolver. Once abandoned (the
    evaluation's time is up), the question in flight and every later one fail at once, so that the thread comes
    back to its pool instead of going on through the record's includes, each lookup within the resolver's own
    timeout, while other sessions' checks wait for a thread."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop, timeout: float):
        self._resolver, self._loop, self._timeout = resolver, loop, timeout
        self._abandoned = False
        self._asking: concurrent.futures.Future | None = None  # the question in flight

    def abandon(self) -> None:
        """(on the loop's thread)"""
        self._abandoned = True
        asking = self._asking  # (read once: the worker clears it when its question is answered)
        if asking is not None:
            asking.cancel()

    def __call__(self, name: str, qtype: str) -> list:
        if self._abandoned:
            raise spf.TempError("DNS lookups abandoned: out of time")
        self._asking = future = asyncio.run_coroutine_threadsafe(self._ask(name, qtype), self._loop)
        if self._abandoned:  # (abandoned between the test above and the question)
            future.cancel()
        try:
            return future.result(self._timeout)
        except (LookupRetry, concurrent.futures.TimeoutError, concurrent.futures.CancelledError) as e:
            future.cancel()
            raise spf.TempError(f"DNS {str(e) or 'no answer in time'}") from None
        finally:
            self._asking = None

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
    The resolver follows CNAMEs; the RFC 7208 void lookup limit is kept; an expanded domain-spec is cut to
    DOMAIN_LIMIT as RFC 7208 7.3 says."""

    def __init__(self, i: str, s: str, h: str, *, lookup: _Bridge):
        super().__init__(i=i, s=s, h=h)
        self._lookup = lookup

    def expand_domain(self, arg):
        """RFC 7208 7.3: a name longer than DOMAIN_LIMIT loses labels from the left until it fits (pyspf drops
        one label, whatever the length: a local part of 300 characters in `%{l}` made a name no DNS server
        is asked for, a void lookup instead of the name the record's owner publishes)."""
        name = super().expand_domain(arg)
        if len(name) <= DOMAIN_LIMIT:
            return name
        cut = name.find(".", len(name) - DOMAIN_LIMIT - 1)  # the first dot that leaves at most DOMAIN_LIMIT after it
        return name[cut + 1:] if cut >= 0 else name.rpartition(".")[2]

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
