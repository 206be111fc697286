"""The Resolver's TXT, PTR and TLSA lookups and the AD bit: AiodnsResolver against the in-process DNS (aiodns for
TXT and PTR, dnspython for TLSA and AD), and the StaticResolver fake answering the same way."""
from __future__ import annotations

import pytest

from mailflow.dns import AiodnsResolver, NotFound, StaticResolver, Tlsa, split_nameserver
from mailflow.errors import LookupRetry
from tests.support.deliverability import start_zone
from tests.support import free_port

ZONE = """
example.test. 300 IN TXT "v=spf1 " "ip4:192.0.2.1 -all"
example.test. 300 IN TXT "second"
example.test. 300 IN MX 10 mx.example.test.
1.2.0.192.in-addr.arpa. 300 IN PTR mx.example.test.
_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
"""


@pytest.fixture(params=[True, False], ids=["validated", "insecure"])
def zone(request):
    nameserver, stop = start_zone(ZONE, ad=request.param)
    yield AiodnsResolver(nameservers=(nameserver,), timeout=2, tries=1), request.param
    stop()


async def test_txt_ptr_tlsa_and_the_ad_bit(zone):
    resolver, secure = zone
    assert sorted(await resolver.txt("example.test")) == ["second", "v=spf1 ip4:192.0.2.1 -all"]
    assert await resolver.ptr("192.0.2.1") == ["mx.example.test"]
    answer = await resolver.tlsa("_25._tcp.mx.example.test")
    assert answer.records == (Tlsa(3, 1, 1, bytes.fromhex("00112233445566778899aabbccddeeff" * 2)),)
    assert answer.secure is secure
    assert await resolver.validated("example.test", "MX") is secure
    assert (await resolver.tlsa("example.test")).records == ()  # NODATA
    with pytest.raises(NotFound):
        await resolver.tlsa("_25._tcp.nowhere.example.test")
    with pytest.raises(NotFound):
        await resolver.txt("nowhere.example.test")
    await resolver.close()


async def test_a_server_that_does_not_answer_is_a_lookup_retry():
    unused_port = free_port()
    resolver = AiodnsResolver(nameservers=(f"127.0.0.1:{unused_port}",), timeout=0.3, tries=1)
    with pytest.raises(LookupRetry):
        await resolver.tlsa("_25._tcp.mx.example.test")
    with pytest.raises(LookupRetry):
        await resolver.txt("example.test")
    await resolver.close()


async def test_the_static_resolver_answers_alike():
    record = Tlsa(3, 1, 1, b"\x00" * 32)
    resolver = StaticResolver(txt={"example.test": ["v=spf1 -all"]}, ptr={"192.0.2.1": ["mx.example.test"]},
                              tlsa={"_25._tcp.mx.example.test": [record]}, secure=("_25._tcp.mx.example.test",))
    assert await resolver.txt("Example.Test.") == ["v=spf1 -all"]
    assert await resolver.ptr("192.0.2.1") == ["mx.example.test"]
    answer = await resolver.tlsa("_25._tcp.mx.example.test")
    assert answer.records == (record,) and answer.secure
    assert await resolver.txt("_25._tcp.mx.example.test") == []  # exists, other type: NODATA
    with pytest.raises(NotFound):
        await resolver.tlsa("other.test")


def test_nameserver_forms():
    assert split_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert split_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert split_nameserver("[::1]:5353") == ("::1", 5353)
    assert split_nameserver("2001:db8::1") == ("2001:db8::1", 53)
