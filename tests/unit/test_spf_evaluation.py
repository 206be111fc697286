"""The SPF evaluation behind check-deliverability (mailflow.deliverability.spf), over a StaticResolver."""
from __future__ import annotations

import pytest

from mailflow.deliverability.spf import check_host
from mailflow.dns import MX, StaticResolver
from mailflow.errors import LookupRetry


def resolver(**txt) -> StaticResolver:
    return StaticResolver(
        txt={name.replace("_", "."): values for name, values in txt.items()},
        mx={"mx.test": [MX(10, "mail.mx.test")]},
        addresses={"mail.mx.test": ["198.51.100.7"], "host.test": ["203.0.113.5", "2001:db8::5"]})


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
    ("v=spf1 exists:%{i}.bl.test -all", "192.0.2.1", "permerror"),
    ("v=spf1 include:nothing.test -all", "192.0.2.1", "permerror"),
    ("v=spf1 ptr -all", "192.0.2.1", "fail"),
])
async def test_results(record, ip, result):
    r = resolver(example_test=[record, "unrelated text"], inc_test=["v=spf1 ip4:192.0.2.77 ~all"],
                 nothing_test=["no spf here"])
    assert (await check_host(r, ip, "example.test")).result == result


async def test_no_record_and_two_records():
    assert (await check_host(resolver(example_test=["hello"]), "192.0.2.1", "example.test")).result == "none"
    two = resolver(example_test=["v=spf1 -all", "v=spf1 +all"])
    assert (await check_host(two, "192.0.2.1", "example.test")).result == "permerror"


async def test_the_lookup_limit_is_kept():
    chain = {f"l{i}_test": [f"v=spf1 include:l{i + 1}.test -all"] for i in range(12)}
    result = await check_host(resolver(**chain, l12_test=["v=spf1 +all"]), "192.0.2.1", "l0.test")
    assert result.result == "permerror" and "10" in result.reason


async def test_a_dns_failure_is_a_temperror():
    class Failing(StaticResolver):
        async def txt(self, name):
            raise LookupRetry("SERVFAIL")

    result = await check_host(Failing(), "192.0.2.1", "example.test")
    assert result.result == "temperror" and "SERVFAIL" in result.reason
