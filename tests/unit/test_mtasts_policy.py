"""MTA-STS policy parsing and the policy cache (mailflow.transports.smtp.mtasts), with a fake fetcher and a
StaticResolver."""
from __future__ import annotations

import asyncio
import logging
import tracemalloc

import pytest

from mailflow.dns import StaticResolver
from mailflow.errors import LookupRetry
from mailflow.logs import service_of
from mailflow.transports.smtp.chat import client_log
from mailflow.transports.smtp.mtasts import (CACHE_BYTES, MAX_POLICY_SIZE, FetchError, MtaSts, mx_allowed, parse_policy,
                                             parse_record)

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.backup.test\r\nmax_age: 86400\r\n"


def test_record():
    assert parse_record(["v=STSv1; id=20240101T00"]) == "20240101T00"
    assert parse_record(["v=spf1 -all", "v=STSv1;id=abc;"]) == "abc"
    assert parse_record(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert parse_record(["v=STSv1; id=not-alnum!"]) is None and parse_record([]) is None
    # RFC 8461 3.1: records not beginning with "v=STSv1;" (blanks allowed before the ";") are discarded first
    assert parse_record(["v=STSv10; id=b", "v=STSv1 ; id=a", "v=STSv1x; id=c"]) == "a"


def test_policy():
    policy = parse_policy(POLICY)
    assert (policy.mode, policy.mx, policy.max_age) == ("enforce", ("mx1.example.test", "*.backup.test"), 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 99999999999\n").max_age == 31557600


@pytest.mark.parametrize(("text", "why"), [
    ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n", "max_age"),
])
def test_bad_policies(text, why):
    with pytest.raises(ValueError, match=why):
        parse_policy(text)


def test_mx_patterns():
    patterns = ("mx1.example.test", "*.backup.test")
    assert mx_allowed("MX1.example.test.", patterns) and mx_allowed("a.backup.test", patterns)
    assert not mx_allowed("a.b.backup.test", patterns) and not mx_allowed("backup.test", patterns)


class FakeFetcher:
    def __init__(self, text=POLICY):
        self.text, self.calls = text, 0

    async def fetch(self, domain):
        self.calls += 1
        await asyncio.sleep(0)
        if isinstance(self.text, Exception):
            raise self.text
        return self.text


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def sts(record="v=STSv1; id=one", fetcher=None, clock=None):
    resolver = StaticResolver(txt={"_mta-sts.example.test": [record]})
    fetcher = fetcher or FakeFetcher()
    return MtaSts(resolver, fetcher, now=clock or Clock(), cache_size=2), resolver, fetcher


async def test_cached_until_max_age_and_shared_between_deliveries():
    clock = Clock()
    cache, _, fetcher = sts(clock=clock)
    policies = await asyncio.gather(*(cache.policy("example.test") for _ in range(5)))
    assert fetcher.calls == 1 and all(p.mode == "enforce" and p.id == "one" for p in policies)
    clock.now += 86399
    await cache.policy("example.test")
    assert fetcher.calls == 1
    clock.now += 2
    await cache.policy("example.test")
    assert fetcher.calls == 2


async def test_a_new_id_fetches_again_and_a_failed_fetch_keeps_the_cached_policy():
    cache, resolver, fetcher = sts()
    first = await cache.policy("example.test")
    resolver._txt["_mta-sts.example.test"] = ["v=STSv1; id=two"]
    fetcher.text = FetchError("down")
    assert await cache.policy("example.test") == first and fetcher.calls == 2
    fetcher.text = POLICY.replace("enforce", "testing")
    assert (await cache.policy("example.test")).mode == "testing"


async def test_no_record_means_no_policy_unless_one_is_cached():
    cache, resolver, _ = sts(record="v=spf1 -all")
    assert await cache.policy("example.test") is None
    cache, resolver, _ = sts()
    cached = await cache.policy("example.test")
    resolver._txt["_mta-sts.example.test"] = []
    assert await cache.policy("example.test") == cached  # RFC 8461 5.1: the cached policy stands


async def test_a_dns_failure_uses_the_cached_policy():
    class Flaky(StaticResolver):
        failing = False

        async def txt(self, name):
            if self.failing:
                raise LookupRetry("SERVFAIL")
            return await super().txt(name)

    resolver = Flaky(txt={"_mta-sts.example.test": ["v=STSv1; id=one"]})
    cache = MtaSts(resolver, FakeFetcher(), now=Clock())
    cached = await cache.policy("example.test")
    resolver.failing = True
    assert await cache.policy("example.test") == cached
    assert await MtaSts(resolver, FakeFetcher(), now=Clock()).policy("example.test") is None


async def test_a_failed_txt_lookup_is_logged_by_the_asking_clients_logger(caplog):
    """One MtaSts serves every SMTP client: its lines are the asking client's (`relay/smtp`), not smtp's."""
    class Failing(StaticResolver):
        async def txt(self, name):
            raise LookupRetry("SERVFAIL")

    with caplog.at_level(logging.INFO, logger="mailflow"):
        assert await MtaSts(Failing(), FakeFetcher(), now=Clock()).policy("example.test",
                                                                           client_log("relay/smtp")) is None
    assert [(service_of(r), r.getMessage()) for r in caplog.records] == [
        ("relay/smtp", "MTA-STS: TXT lookup for example.test failed: SERVFAIL")]


async def test_the_cache_is_bounded():
    resolver = StaticResolver(txt={f"_mta-sts.d{i}.test": ["v=STSv1; id=x"] for i in range(5)})
    fetcher = FakeFetcher()
    cache = MtaSts(resolver, fetcher, now=Clock(), cache_size=2)
    for i in range(5):
        await cache.policy(f"d{i}.test")
    assert len(cache._cache) == 2


def widest_policy() -> str:
    """A policy of MAX_POLICY_SIZE bytes at most, as many short mx lines as fit: each a string once parsed."""
    lines = ["version: STSv1", "mode: enforce", "max_age: 86400"]
    size, n = sum(len(line) + 1 for line in lines), 0
    while size + len(f"mx:{n:x}\n") <= MAX_POLICY_SIZE:
        lines.append(f"mx:{n:x}")
        size, n = size + len(lines[-1]) + 1, n + 1
    return "\n".join(lines) + "\n"


async def test_the_cache_is_bounded_in_bytes_too():
    """A policy of 64 KB of short mx lines is about 528 KB once parsed: cache_size (1000 by default) such
    policies, from as many domains that a hostile sender makes this server write to, held half a gigabyte.
    The cache keeps CACHE_BYTES at most, the largest policies going first (the least recently used of equals)."""
    domains = [f"d{i}.test" for i in range(40)]
    policy = widest_policy()

    class PerDomain:
        async def fetch(self, domain):
            return policy

    resolver = StaticResolver(txt={f"_mta-sts.{domain}": ["v=STSv1; id=x"] for domain in domains})
    cache = MtaSts(resolver, PerDomain(), now=Clock())
    tracemalloc.start()
    try:
        for domain in domains:
            assert (await cache.policy(domain)).mode == "enforce"
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < CACHE_BYTES + 1_000_000, held  # (21 MB for these 40 before: 7.9 MB, 15 kept)
    assert await cache.policy(domains[-1]) is not None and len(cache._cache) < len(domains)


async def test_huge_policies_leave_the_cache_before_ordinary_ones():
    """Past CACHE_BYTES the largest policies go first: the least recently used went, and 16 policies of 64 KB from
    domains a hostile sender makes this server write to pushed out all the ordinary ones."""
    ordinary = [f"o{i}.test" for i in range(980)]  # with the hostile ones: cache_size (1000) domains
    hostile = [f"h{i}.test" for i in range(20)]
    wide = widest_policy()

    class Fetcher:
        async def fetch(self, domain):
            return wide if domain.startswith("h") else POLICY

    resolver = StaticResolver(txt={f"_mta-sts.{domain}": ["v=STSv1; id=x"] for domain in ordinary + hostile})
    cache = MtaSts(resolver, Fetcher(), now=Clock())
    for domain in ordinary + hostile:
        assert await cache.policy(domain) is not None
    assert all(domain in cache._cache for domain in ordinary)
    assert cache._cache_bytes <= CACHE_BYTES
