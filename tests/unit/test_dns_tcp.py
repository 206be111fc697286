"""Answers too big for a UDP reply without EDNS (512 bytes): the server sends the records that fit with TC set, and
the resolver must ask again over TCP and use only that answer (c-ares's path and the isolated re-ask's; dnspython's
DNSSEC queries past their 1232 bytes). When TCP cannot be had (refused, closed unanswered, too slow) the lookup is a
temporary failure, as Postfix's resolver (res_send: TC, then TCP; no answer there: TRY_AGAIN), never the cut record
set and never "not found"; within the lookup's timeout."""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc

import dns.asyncquery
import dns.flags
import dns.message
import pytest
from aiodns.error import DNSError

from mailflow.dns import (TRY_AGAIN, AiodnsResolver, IsolatedAsker, NameServers, NotFound, Tlsa, classify_dns_error,
                          client_name)
from mailflow.filters.spf_query import check_host
from mailflow.errors import LookupRetry
from tests.support import eventually

# A "slow" TCP answer comes after SLOW_TCP seconds, far past any lookup's deadline here (TIMEOUT x 1 try), so that a
# lookup that waited for it would be told from one that gave up at its deadline by a wide margin, whatever the load.
TIMEOUT = 1.0
SLOW_TCP = 60.0  # (the test server's wait ends when it stops: no test waits this long unless the resolver does)
DEADLINE_MARGIN = 10  # the deadline a lookup must keep: TIMEOUT x tries x this

# 30 MX hosts: about 1 100 bytes; the one of preference 0 comes last, past where a UDP answer is cut.
MANY_MX = "".join(f"many.test. 60 IN MX {i + 1} mail-exchanger-{i:02d}.many.test.\n" for i in range(29))
MANY_MX += "many.test. 60 IN MX 0 mail-exchanger-best.many.test.\n"
SPF_STRINGS = [f"ip4:192.0.2.{i}" for i in range(60)]
SPF = "v=spf1 " + " ".join(SPF_STRINGS) + " -all"
LONG_SPF = "spf.test. 60 IN TXT " + " ".join(f'"{SPF[i:i + 200]}"' for i in range(0, len(SPF), 200)) + "\n"
TLSA_DATA = [bytes([i]) * 64 for i in range(24)]  # 24 records of 64 octets: about 2 000 bytes, past 1232
TLSA = "".join(f"_25._tcp.mx.tlsa.test. 60 IN TLSA 3 1 2 {data.hex()}\n" for data in TLSA_DATA)
ADDRESSES = "".join(f"crowd.test. 60 IN A 192.0.2.{i}\n" for i in range(1, 61))  # 60 x 16 octets
PTRS = "".join(f"9.2.0.192.in-addr.arpa. 60 IN PTR host-with-a-long-name-{i:02d}.ptr.test.\n" for i in range(20))
# the first PTR name's 60 addresses, the client's last (past the UDP cut)
PTRS += "".join(f"host-with-a-long-name-00.ptr.test. 60 IN A 198.51.100.{i}\n" for i in range(1, 60))
PTRS += "host-with-a-long-name-00.ptr.test. 60 IN A 192.0.2.9\n"
ZONE = MANY_MX + LONG_SPF + TLSA + ADDRESSES + PTRS + "small.test. 60 IN A 192.0.2.1\n"


@pytest.mark.parametrize("payload", [None, 600, 4096])
async def test_the_test_server_cuts_udp_answers_as_a_real_server(dns_zone, payload):
    """What the tests above stand on: 512 bytes without EDNS, the advertised size with it; past that the records
    that fit (some, not none: a resolver that took them would act on a partial set), TC set."""
    host, port = dns_zone(ZONE).split(":")
    query = dns.message.make_query("many.test", "MX", use_edns=payload is not None, payload=payload or 512)
    reply = await dns.asyncquery.udp(query, host, port=int(port), timeout=2, ignore_trailing=True)
    size = len(reply.to_wire())
    if payload == 4096:
        assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 30
    else:
        assert reply.flags & dns.flags.TC and 0 < len(reply.answer[0]) < 30 and size <= (payload or 512)


def resolver_for(nameserver: str, timeout: float = 1.0) -> AiodnsResolver:
    return AiodnsResolver(nameservers=(nameserver,), timeout=timeout, tries=1)


async def test_large_answers_come_whole_over_tcp_through_c_ares(dns_zone):
    asked: list[tuple[str, str]] = []
    resolver = resolver_for(dns_zone(ZONE, asked=asked))
    try:
        records = await resolver.mx("many.test")
        [spf] = await resolver.txt("spf.test")
        addresses = await resolver.ipv4_addresses("crowd.test")
        names = await resolver.ptr("192.0.2.9")
        tlsa = await resolver.tlsa("_25._tcp.mx.tlsa.test")
    finally:
        await resolver.close()
    assert len(records) == 30 and records[0].host == "mail-exchanger-best.many.test"
    assert spf == SPF  # RFC 7208 3.3: the strings joined
    assert sorted(addresses) == sorted(f"192.0.2.{i}" for i in range(1, 61))
    assert len(names) == 20
    assert sorted(record.data for record in tlsa.records) == TLSA_DATA
    assert tlsa.records[0] == Tlsa(3, 1, 2, tlsa.records[0].data)
    # each asked twice: over UDP (cut, TC) then over TCP
    assert asked.count(("many.test.", "MX")) == 2 and asked.count(("spf.test.", "TXT")) == 2
    assert asked.count(("_25._tcp.mx.tlsa.test.", "TLSA")) == 2


@pytest.mark.parametrize(("name", "qtype", "count"), [("many.test", "MX", 30), ("spf.test", "TXT", 1),
                                                      ("crowd.test", "A", 60), ("9.2.0.192.in-addr.arpa", "PTR", 20)])
async def test_the_isolated_re_ask_follows_tc_to_tcp(dns_zone, name, qtype, count):
    asked: list[tuple[str, str]] = []
    asker = IsolatedAsker(NameServers((dns_zone(ZONE, asked=asked),)), timeout=1.0, limit=1)
    answer = await asker.ask_again(name, qtype)
    assert len(answer.answer) == count
    assert asked == [(name + ".", qtype)] * 2
    if qtype == "TXT":
        assert answer.answer[0].data.data == SPF.encode()


LOOKUPS = {"mx": "many.test", "txt": "spf.test", "ipv4_addresses": "crowd.test", "ptr": "192.0.2.9",
           "tlsa": "_25._tcp.mx.tlsa.test"}


@pytest.mark.parametrize("tcp", ["refuse", "close", "slow", "drop"])
@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
async def test_a_truncated_answer_without_tcp_is_a_temporary_failure_never_the_cut_records(dns_zone, tcp, lookup):
    """Postfix's resolver asks again over TCP; when TCP cannot answer it says TRY_AGAIN (DNS_RETRY): a deferral,
    never a bounce, never the records that fitted in the cut UDP answer; at the lookup's own deadline (timeout x
    tries), not after the slow TCP answer."""
    nameserver = dns_zone(ZONE, tcp="answer" if tcp == "slow" else tcp, tcp_delay=SLOW_TCP if tcp == "slow" else 0.0)
    resolver = resolver_for(nameserver, timeout=TIMEOUT)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(LookupRetry) as failure:
            await getattr(resolver, lookup)(LOOKUPS[lookup])
        took = loop.time() - started
        assert await resolver.ipv4_addresses("small.test") == ["192.0.2.1"]  # what fits in UDP is answered
    finally:
        await resolver.close()
    assert not isinstance(failure.value, NotFound)
    if lookup != "tlsa":
        qtype = {"ipv4_addresses": "A", "mx": "MX", "txt": "TXT", "ptr": "PTR"}[lookup]
        name = "9.2.0.192.in-addr.arpa" if lookup == "ptr" else LOOKUPS[lookup]
        assert failure.value.text == f"Name service error for name={name} type={qtype}: {TRY_AGAIN}"
    assert took < TIMEOUT * DEADLINE_MARGIN < SLOW_TCP


@pytest.mark.parametrize("tcp", ["refuse", "close", "slow", "drop"])
async def test_asked_alone_a_truncated_answer_without_tcp_fails_as_c_ares_would(dns_zone, tcp):
    """The isolated re-ask, meeting TC then no TCP answer: the failure c-ares gives (a try-again), not the cut
    records; at its own deadline, not after the slow TCP answer. (A TCP connection closed unanswered was a
    "Malformed or unexpected name server reply" here, where c-ares and glibc try the next server, then say
    TRY_AGAIN.) The server had the TCP query unless it refused or dropped the connection."""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ZONE, tcp="answer" if tcp == "slow" else tcp, tcp_delay=SLOW_TCP if tcp == "slow" else 0.0,
                          asked=asked)
    asker = IsolatedAsker(NameServers((nameserver,)), timeout=TIMEOUT, limit=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DNSError) as failure:
        await asker.ask_again("many.test", "MX")
    assert loop.time() - started < TIMEOUT * DEADLINE_MARGIN < SLOW_TCP
    with pytest.raises(LookupRetry) as classified:
        classify_dns_error(failure.value, "many.test", "MX")
    assert classified.value.text == f"Name service error for name=many.test type=MX: {TRY_AGAIN}"
    assert asked == [("many.test.", "MX")] * (1 if tcp in ("refuse", "drop") else 2)


async def test_the_test_server_answers_a_connection_s_queries_as_each_is_ready(dns_zone):
    """What a test of TCP lookups side by side stands on: the server answers the queries of one TCP connection
    each when ready, a quick one before a slow one asked first, as BIND and Unbound (RFC 7766 6.2.1.1); it
    answered them in turn, and a quick answer waited behind the slow one. The order of the replies shows it."""
    host, port = dns_zone(ZONE, slow=("many.test",), delay=1.0).split(":")
    slow, quick = dns.message.make_query("many.test", "MX"), dns.message.make_query("small.test", "A")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for query in (slow, quick):
            wire = query.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
        replies = []
        for _ in range(2):
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
            replies.append(dns.message.from_wire(await reader.readexactly(size)))
    finally:
        writer.close()
    first, second = replies
    assert quick.is_response(first) and slow.is_response(second)


async def test_a_slow_answer_over_tcp_holds_up_no_other_lookup_on_the_connection(dns_zone):
    """c-ares sends each TCP query on its one connection to the server: a quick answer there is not waited for
    behind a slow one (as a real server sends it, out of order): it is answered while the slow one is pending."""
    zone = "".join(f"{domain}. 60 IN MX {i} mail-exchanger-number-{i:02d}.hoster.test.\n"
                   for domain in ("slow.test", "warm.test", "quick.test") for i in range(30))
    asked: list[tuple[str, str]] = []
    resolver = AiodnsResolver(nameservers=(dns_zone(zone, slow=("slow.test",), delay=1.5, asked=asked),),
                              timeout=6.0, tries=1)
    try:
        await resolver.mx("warm.test")  # (c-ares's TCP connection made)
        slow = asyncio.ensure_future(resolver.mx("slow.test"))
        await eventually(lambda: asked.count(("slow.test.", "MX")) == 2, timeout=3, what="slow.test asked over TCP")
        quick = await resolver.mx("quick.test")
        assert not slow.done()
        assert len(await slow) == 30
    finally:
        await resolver.close()
    assert len(quick) == 30


async def test_the_test_server_s_drop_mode_drops_connection_attempts_as_a_firewall(dns_zone):
    """tcp="drop": a connection to the TCP port is neither made nor refused; the attempt times out."""
    host, port = dns_zone(ZONE, tcp="drop").split(":")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.open_connection(host, int(port)), 0.5)


async def test_each_txt_record_s_strings_apart_whole_and_as_sent(dns_zone):
    """txt_strings (a DNS list's reason) keeps each record's strings apart, over TCP past 512 bytes, and a record
    sent twice twice, as c-ares's txt does (dnspython merged the two, and the reason lost a ' / ' part)."""
    twice = 'twice.test. 60 IN TXT "' + "x" * 200 + '"\n'
    resolver = resolver_for(dns_zone(ZONE + twice * 3))
    try:
        [spf] = await resolver.txt_strings("spf.test")
        repeated = await resolver.txt_strings("twice.test")
        assert len(await resolver.txt("twice.test")) == 3
    finally:
        await resolver.close()
    assert spf == tuple(SPF[i:i + 200] for i in range(0, len(SPF), 200))
    assert repeated == [("x" * 200,)] * 3


@pytest.mark.parametrize("tcp", ["answer", "refuse"])
async def test_spf_of_several_strings_past_512_bytes(dns_zone, tcp):
    """RFC 7208 3.3: the strings of a TXT record joined; the address allowed is in the last string, past the UDP
    cut. Without TCP a temperror (a DNS error, RFC 7208 4.4), never a fail from the cut record."""
    resolver = resolver_for(dns_zone(ZONE, tcp=tcp))
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        allowed = await check_host(resolver, "192.0.2.59", "s@spf.test", timeout=2.0, executor=pool)
        other = await check_host(resolver, "198.51.100.1", "s@spf.test", timeout=2.0, executor=pool)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        await resolver.close()
    if tcp == "answer":
        assert (allowed.result, other.result) == ("pass", "fail")
    else:
        assert (allowed.result, other.result) == ("temperror", "temperror")


@pytest.mark.parametrize("tcp", ["answer", "refuse"])
async def test_the_client_name_from_ptr_and_a_sets_past_512_bytes(dns_zone, tcp):
    """smtpd's verified client name: 20 PTR names, the first one's 60 addresses with the client's last. Without
    TCP the DNS cannot tell now (retry: reject_unknown_client_hostname answers 450), not "no name"."""
    resolver = resolver_for(dns_zone(ZONE, tcp=tcp))
    try:
        if tcp == "answer":
            names = await resolver.ptr("192.0.2.9")
            verdict = await client_name(resolver, "192.0.2.9", names)
            assert (verdict.name, verdict.retry) == ("host-with-a-long-name-00.ptr.test", False)
        else:
            with pytest.raises(LookupRetry):
                await resolver.ptr("192.0.2.9")
            verdict = await client_name(resolver, "192.0.2.9", ["host-with-a-long-name-00.ptr.test"])
            assert (verdict.name, verdict.retry) == ("", True)
    finally:
        await resolver.close()


async def test_asked_alone_the_cut_answer_is_let_go_before_tcp_is_asked(dns_zone):
    """One answer held per lookup: while the TCP answer (up to 64 KB) is awaited, the cut UDP one (up to 64 KB
    from a server that sends a large datagram with TC) is no longer held (it was, by the exception being
    handled around the TCP query). Looked at while the TCP answer is still awaited (else nothing was checked)."""
    asked: list[tuple[str, str]] = []
    asker = IsolatedAsker(NameServers((dns_zone(ZONE, asked=asked, tcp_delay=1.5),)), timeout=4.0, limit=1)
    asking = asyncio.ensure_future(asker.ask_again("many.test", "MX"))
    await eventually(lambda: len(asked) == 2, timeout=2, what="the query asked again over TCP")
    gc.collect()
    held = [m for m in gc.get_objects() if isinstance(m, dns.message.Message) and m.flags & dns.flags.TC]
    assert not asking.done()
    answer = await asking
    assert len(answer.answer) == 30
    assert held == []
