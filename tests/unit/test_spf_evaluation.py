"""The one SPF evaluation (mailflow.filters.spf_query: pyspf, its DNS through mailflow's Resolver), behind smtpd's
verdicts and check-deliverability, over a StaticResolver (and, for a slow sender's DNS, the in-process DNS
server)."""
from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from mailflow.filters.spf_query import check_host
from mailflow.dns import MX, AiodnsResolver, StaticResolver
from mailflow.errors import LookupRetry


def resolver(**txt) -> StaticResolver:
    return StaticResolver(
        txt={name.replace("_", "."): values for name, values in txt.items()},
        mx={"mx.test": [MX(10, "mail.mx.test")]},
        addresses={"mail.mx.test": ["198.51.100.7"], "host.test": ["203.0.113.5", "2001:db8::5"],
                   "192.0.2.66.bl.test": ["127.0.0.2"]})


@pytest.mark.parametrize(("record", "ip", "result"), [
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.10", "pass"),
    ("v=spf1 ip4:192.0.2.0/24 -all", "198.51.100.1", "fail"),
    ("v=spf1 ip4:192.0.2.0/24 ~all", "198.51.100.1", "softfail"),
    ("v=spf1 ip4:192.0.2.0/24", "198.51.100.1", "neutral"),
    ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::5", "pass"),
    ("v=spf1 a:host.test -all", "203.0.113.5", "pass"),
    ("v=spf1 a:host.test/24 -all", "203.0.113.99", "pass"),
    ("v=spf1 a:host.test//64 -all", "2001:db8::99", "pass"),
    ("v=spf1 mx:mx.test -all", "198.51.100.7", "pass"),
    ("v=spf1 include:inc.test -all", "192.0.2.77", "pass"),
    ("v=spf1 -include:inc.test +all", "192.0.2.77", "fail"),
    ("v=spf1 redirect=inc.test", "192.0.2.77", "pass"),
    ("v=spf1 redirect=inc.test", "10.0.0.1", "softfail"),
    ("v=spf1 exists:%{i}.bl.test -all", "192.0.2.1", "fail"),  # (macros expanded: 192.0.2.1.bl.test exists not)
    ("v=spf1 exists:%{i}.bl.test -all", "192.0.2.66", "pass"),
    ("v=spf1 include:nothing.test -all", "192.0.2.1", "permerror"),
    ("v=spf1 ptr -all", "192.0.2.1", "fail"),
])
async def test_results(record, ip, result):
    r = resolver(example_test=[record, "unrelated text"], inc_test=["v=spf1 ip4:192.0.2.77 ~all"],
                 nothing_test=["no spf here"])
    assert (await check_host(r, ip, "example.test", timeout=5)).result == result


async def test_no_record_and_two_records():
    assert (await check_host(resolver(example_test=["hello"]), "192.0.2.1", "example.test", timeout=5)).result == "none"
    two = resolver(example_test=["v=spf1 -all", "v=spf1 +all"])
    assert (await check_host(two, "192.0.2.1", "example.test", timeout=5)).result == "permerror"


async def test_the_lookup_limit_is_kept():
    chain = {f"l{i}_test": [f"v=spf1 include:l{i + 1}.test -all"] for i in range(12)}
    result = await check_host(resolver(**chain, l12_test=["v=spf1 +all"]), "192.0.2.1", "l0.test", timeout=5)
    assert result.result == "permerror" and "Too many DNS lookups" in result.reason


async def test_a_dns_failure_is_a_temperror():
    class Failing(StaticResolver):
        async def txt(self, name):
            raise LookupRetry("SERVFAIL")

    result = await check_host(Failing(), "192.0.2.1", "example.test", timeout=5)
    assert result.result == "temperror" and "SERVFAIL" in result.reason


async def test_a_resolver_that_does_not_answer_is_a_temperror_within_the_timeout():
    class Silent(StaticResolver):
        async def txt(self, name):
            await asyncio.sleep(30)
            return []

    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await check_host(Silent(), "192.0.2.1", "someone@example.test", timeout=0.3)
    assert result.result == "temperror" and loop.time() - started < 5


async def test_a_timed_out_evaluation_gives_its_thread_back_at_once(dns_zone):
    """A sender's DNS that answers each include slowly, but within the resolver's timeout: the evaluation is a
    temperror at `timeout`, and pyspf's thread stops there (the lookup in flight and any later one fail at once).
    It went on through every include, holding a thread of the SPF pool past the verdict: the next session's
    check waited its turn beyond its own timeout, a temperror for a sender whose DNS is fine."""
    includes = " ".join(f"include:i{n}.slow.test" for n in range(8))
    zone = "\n".join([f'hostile.test. 60 IN TXT "v=spf1 {includes} -all"',
                      *(f'i{n}.slow.test. 60 IN TXT "v=spf1 -all"' for n in range(8)),
                      'good.test. 60 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"']) + "\n"
    server = dns_zone(zone, slow=tuple(f"i{n}.slow.test" for n in range(8)), delay=0.4)
    resolver = AiodnsResolver(nameservers=(server,), timeout=1.0, tries=1)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (smtpd's has SPF_THREADS)
    try:
        hostile = await check_host(resolver, "192.0.2.1", "x@hostile.test", timeout=1.0, executor=pool)
        good = await check_host(resolver, "192.0.2.1", "y@good.test", timeout=1.0, executor=pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        await resolver.close()
        await asyncio.sleep(0.5)  # (the slow answers still in flight are sent before the server closes)
    assert hostile.result == "temperror"
    assert good.result == "pass", good


async def test_a_check_whose_session_is_gone_gives_its_thread_back_at_once(dns_zone):
    """The same slow includes, but the caller goes before the timeout (a client that drops the connection at MAIL
    FROM is a cancelled session): pyspf's thread stops asking then too, so a client that sends slow senders and
    hangs up cannot hold the SPF pool."""
    includes = " ".join(f"include:i{n}.slow.test" for n in range(8))
    zone = "\n".join([f'hostile.test. 60 IN TXT "v=spf1 {includes} -all"',
                      *(f'i{n}.slow.test. 60 IN TXT "v=spf1 -all"' for n in range(8)),
                      'good.test. 60 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"']) + "\n"
    server = dns_zone(zone, slow=tuple(f"i{n}.slow.test" for n in range(8)), delay=0.4)
    resolver = AiodnsResolver(nameservers=(server,), timeout=1.0, tries=1)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        gone = asyncio.ensure_future(check_host(resolver, "192.0.2.1", "x@hostile.test", timeout=10.0, executor=pool))
        await asyncio.sleep(0.2)  # the first include asked
        gone.cancel()
        good = await check_host(resolver, "192.0.2.1", "y@good.test", timeout=1.0, executor=pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        await resolver.close()
        await asyncio.sleep(0.5)
    assert good.result == "pass", good


async def test_a_domain_spec_longer_than_253_characters_loses_labels_from_the_left_until_it_fits(dns_zone):
    """RFC 7208 7.3: a sender whose local part makes `%{l}.%{l}.bl.test` 617 characters long has the name
    truncated, label by label from the left, to the 251 that fit; the name asked is the one the record's owner
    publishes. pyspf dropped one label only: the 556-character name was asked of no DNS server, a void lookup,
    and the mechanism never matched (fail)."""
    local = ".".join(letter * 60 for letter in "abcde")
    kept = ".".join(letter * 60 for letter in "bcde") + ".bl.test"
    asked: list[tuple[str, str]] = []
    server = dns_zone(f'long.test. 60 IN TXT "v=spf1 exists:%{{l}}.%{{l}}.bl.test -all"\n{kept}. 60 IN A 127.0.0.2\n',
                      asked=asked)
    resolver = AiodnsResolver(nameservers=(server,), timeout=1.0, tries=1)
    try:
        result = await check_host(resolver, "192.0.2.1", f"{local}@long.test", timeout=3)
    finally:
        await resolver.close()
    assert len(kept) == 251 and (f"{kept}.", "A") in asked
    assert result.result == "pass", result
