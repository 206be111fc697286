"""mailflow.dns: the StaticResolver, and the AiodnsResolver against an in-process dnslib server."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import time

import pytest
from aiodns.error import ARES_EFORMERR, DNSError
from dnslib import EDNS0, QTYPE, RCODE, RR, TXT, DNSRecord, A
from dnslib import MX as MXData

from mailflow.app import build_resolver
from mailflow.config import DnsConfig
from mailflow.dns import (GAI_NODATA, MX, TRY_AGAIN, AiodnsResolver, InvalidReply, IsolatedAsker, NameServers, TxtCache,
                          NonRecoverable, NotFound, StaticResolver, UnreadableReply, checked_rr_name, client_name,
                          hostname_gripe, is_ip_literal, merge_address_answers)
from mailflow.errors import LookupRetry, PermanentError
from mailflow.address import literal_ip
from mailflow.transports.smtp import addr
from mailflow.transports.smtp.addr import MX_HOST_LIMIT, Nexthop, exchangers, parse_nexthop
from tests.support import free_port

ZONE = """
example.test.        300 IN MX 20 mx2.example.test.
example.test.        300 IN MX 10 mx1.example.test.
example.test.        300 IN MX 30 mx3.example.test.
mx1.example.test.    300 IN A 127.0.0.2
mx1.example.test.    300 IN AAAA ::1
mx2.example.test.    300 IN A 127.0.0.3
mx2.example.test.    300 IN A 127.0.0.4
implicit.test.       300 IN A 127.0.0.5
nullmx.test.         300 IN MX 0 .
textonly.test.       300 IN TXT "v=spf1 -all"
"""


def aiodns_resolver(nameserver: str) -> AiodnsResolver:
    return AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1)


# ---------------------------------------------------------------------------------------------------- StaticResolver


@pytest.fixture
def static() -> StaticResolver:
    return StaticResolver(
        mx={"example.test": [MX(20, "mx2.example.test"), MX(10, "mx1.example.test")]},
        addresses={"mx1.example.test": ["127.0.0.2", "::1"], "implicit.test": ["127.0.0.5"]},
    )


async def test_static_mx_is_sorted_by_preference(static):
    assert await static.mx("example.test") == [MX(10, "mx1.example.test"), MX(20, "mx2.example.test")]


async def test_static_mx_of_a_name_with_only_addresses_is_empty(static):
    assert await static.mx("implicit.test") == []


async def test_static_missing_names_raise_not_found(static):
    with pytest.raises(NotFound) as e:
        await static.mx("nowhere.test")
    assert isinstance(e.value, PermanentError)
    assert e.value.dsn == "5.1.2"
    assert "Host or domain name not found" in e.value.text
    with pytest.raises(NotFound):
        await static.addresses("nowhere.test")


async def test_static_addresses_keep_their_order(static):
    assert await static.addresses("mx1.example.test") == ["127.0.0.2", "::1"]


async def test_static_names_are_case_and_dot_insensitive(static):
    assert await static.addresses("MX1.Example.Test.") == ["127.0.0.2", "::1"]


@pytest.mark.parametrize("literal", ["127.0.0.1", "::1", "2001:db8::25"])
async def test_ip_literals_resolve_to_themselves(static, literal):
    assert is_ip_literal(literal)
    assert await static.addresses(literal) == [literal]
    assert await AiodnsResolver(nameservers=("127.0.0.1:9",), timeout=0.2, tries=1).addresses(literal) == [literal]


def test_names_are_not_ip_literals():
    assert not is_ip_literal("mx.example.test")
    assert not is_ip_literal("[127.0.0.1]")


# ---------------------------------------------------------------------------------------------------- AiodnsResolver


async def test_aiodns_mx_sorted_by_preference(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        assert await resolver.mx("example.test") == [
            MX(10, "mx1.example.test"),
            MX(20, "mx2.example.test"),
            MX(30, "mx3.example.test"),
        ]
    finally:
        await resolver.close()


async def test_aiodns_addresses_a_then_aaaa(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        assert await resolver.addresses("mx1.example.test") == ["127.0.0.2", "::1"]
        assert sorted(await resolver.addresses("mx2.example.test")) == ["127.0.0.3", "127.0.0.4"]
    finally:
        await resolver.close()


async def test_aiodns_implicit_mx_domain_has_no_mx_but_addresses(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        assert await resolver.mx("implicit.test") == []
        assert await resolver.addresses("implicit.test") == ["127.0.0.5"]
    finally:
        await resolver.close()


async def test_aiodns_name_without_addresses_is_empty_not_missing(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        assert await resolver.addresses("textonly.test") == []
    finally:
        await resolver.close()


async def test_aiodns_null_mx_reads_as_dot(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        assert await resolver.mx("nullmx.test") == [MX(0, ".")]
        assert (await resolver.mx("nullmx.test"))[0].is_null
    finally:
        await resolver.close()


MIXED_MX_ZONE = """
mixed.test.   300 IN MX 20 bad-.example.test.
mixed.test.   300 IN MX 10 mx.example.test.
numeric.test. 300 IN MX 10 192.0.2.9.
nullbad.test. 300 IN MX 10 bad-.example.test.
nullbad.test. 300 IN MX 0 .
allbad.test.  300 IN MX 10 bad-.example.test.
"""


async def test_aiodns_mx_drops_only_the_records_naming_no_host(dns_zone, caplog):
    """Postfix's dns_get_answer: a bad MX host is dropped with a warning, the answer is DNS_INVAL only when nothing
    is left; a null MX stands whatever comes before it."""
    resolver = aiodns_resolver(dns_zone(MIXED_MX_ZONE))
    try:
        assert await resolver.mx("mixed.test") == [MX(10, "mx.example.test")]
        assert "malformed domain name in resource data of MX record for mixed.test: bad-.example.test" in caplog.text
        assert [r.is_null for r in await resolver.mx("nullbad.test")] == [True]
        with pytest.raises(InvalidReply):
            await resolver.mx("allbad.test")
    finally:
        await resolver.close()


class EdnsIntolerantServer(asyncio.DatagramProtocol):
    """FORMERR, with an OPT record, to every query carrying EDNS; an MX answer to a plain one."""

    def __init__(self) -> None:
        self.asked_with_edns: list[bool] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        request = DNSRecord.parse(data)
        with_edns = any(record.rtype == QTYPE.OPT for record in request.ar)
        self.asked_with_edns.append(with_edns)
        reply = request.reply()
        if with_edns:
            reply.header.rcode = RCODE.FORMERR
            reply.add_ar(EDNS0())
        else:
            reply.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MXData("mx.example.org"), ttl=60))
        self.transport.sendto(reply.pack(), addr)


async def test_a_server_answering_formerr_to_edns_is_asked_without_it_as_postfix_asks(dns_zone):
    """Postfix's resolver sends no EDNS unless it wants DNSSEC, so such a server answers it; c-ares (EDNS by
    default) falls back to a plain query only for its first query to a server: later lookups were NonRecoverable,
    which bounces mail 5.4.3 and makes smtpd's domain checks say "not found"."""
    server = EdnsIntolerantServer()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: server,
                                                                             local_addr=("127.0.0.1", 0))
    resolver = aiodns_resolver(f"127.0.0.1:{transport.get_extra_info('sockname')[1]}")
    try:
        for n in range(3):
            assert await resolver.mx(f"d{n}.test") == [MX(10, "mx.example.org")]
        assert not any(server.asked_with_edns)
    finally:
        await resolver.close()
        transport.close()


async def test_aiodns_nxdomain_raises_not_found(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        with pytest.raises(NotFound) as e:
            await resolver.mx("nowhere.test")
        assert e.value.dsn == "5.1.2"
        assert "name=nowhere.test type=MX" in e.value.text
        with pytest.raises(NotFound):
            await resolver.addresses("nowhere.test")
    finally:
        await resolver.close()


async def test_aiodns_servfail_is_a_retry_not_not_found(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE, servfail=("broken.test",)))
    try:
        with pytest.raises(LookupRetry) as e:
            await resolver.mx("broken.test")
        assert not isinstance(e.value, NotFound)
        assert e.value.dsn.startswith("4.")
        with pytest.raises(LookupRetry):
            await resolver.addresses("broken.test")
    finally:
        await resolver.close()


async def test_aiodns_dead_nameserver_is_a_quick_retry():
    unused_port = free_port()
    resolver = AiodnsResolver(nameservers=(f"127.0.0.1:{unused_port}",), timeout=0.5, tries=1)
    started = time.monotonic()
    try:
        with pytest.raises(LookupRetry):
            await resolver.mx("example.test")
    finally:
        await resolver.close()
    assert time.monotonic() - started < 3.0


async def test_the_resolver_built_from_dns_config_uses_the_configured_nameserver(dns_zone):
    resolver = build_resolver(DnsConfig(nameservers=(dns_zone(ZONE),), timeout=1.0, tries=1))
    try:
        assert (await resolver.mx("example.test"))[0] == MX(10, "mx1.example.test")
    finally:
        await resolver.close()


async def test_aiodns_concurrent_lookups_share_one_channel(dns_zone):
    resolver = aiodns_resolver(dns_zone(ZONE))
    try:
        answers = await asyncio.gather(*(resolver.addresses("implicit.test") for _ in range(10)))
        assert answers == [["127.0.0.5"]] * 10
    finally:
        await resolver.close()


async def test_a_slow_answer_after_quick_ones_is_waited_for_as_long_as_the_timeout_says(dns_zone):
    """c-ares (1.32 on) times a query out after 5 times the server's average latency (at least 250 ms) once it
    has a few answers to average: after quick answers (a recursive resolver's cache), one that takes a second
    (its recursion) was a LookupRetry in 0.75 s with `timeout` 3 s. It is waited for; a server that never
    answers is still a LookupRetry within `timeout` x `tries`."""
    zone = ZONE + "far.test. 300 IN A 127.0.0.9\n" + "".join(f"n{i}.test. 300 IN A 127.0.0.5\n" for i in range(5))
    resolver = AiodnsResolver(nameservers=(dns_zone(zone, slow=("far.test",), delay=1.0),), timeout=3.0, tries=1)
    loop = asyncio.get_running_loop()
    try:
        for i in range(5):  # quick answers (each name once: c-ares answers a name again from its cache)
            assert await resolver.addresses(f"n{i}.test") == ["127.0.0.5"]
        started = loop.time()
        assert (await resolver._query("far.test", "A"))[0].data.addr == "127.0.0.9"
        assert 1.0 <= loop.time() - started < 3.0
    finally:
        await resolver.close()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # receives queries, answers none
    silent.bind(("127.0.0.1", 0))
    resolver = AiodnsResolver(nameservers=(f"127.0.0.1:{silent.getsockname()[1]}",), timeout=0.5, tries=2)
    try:
        started = loop.time()
        with pytest.raises(LookupRetry) as e:
            await resolver.mx("example.test")
        assert loop.time() - started < 1.5 and e.value.text.endswith("Host not found, try again")
    finally:
        await resolver.close()
        silent.close()


class QuickOrSilent(asyncio.DatagramProtocol):
    """A name server that answers names beginning with "n" at once and never answers the others."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = DNSRecord.parse(data)
        name = str(query.q.qname)
        if name.startswith("n"):
            reply = query.reply()
            reply.add_answer(RR(name, QTYPE.A, rdata=A("127.0.0.5"), ttl=300))
            self.transport.sendto(reply.pack(), addr)


def threads_and_descriptors() -> tuple[int, int]:
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


async def test_an_outage_after_quick_answers_holds_two_channels_whatever_the_number_of_lookups():
    """A resolver that stops answering after quick answers: each of 300 concurrent lookups is given up by the
    shared channel early (c-ares's short timeouts) and asked again, on the one retry channel. A channel per
    lookup (a thread, descriptors, an inotify instance each) made 300 threads and over 1000 descriptors, and
    ran the user's inotify instances out."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(QuickOrSilent, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    resolver = AiodnsResolver(nameservers=(f"127.0.0.1:{port}",), timeout=0.5, tries=2)
    try:
        for i in range(5):
            assert await resolver.addresses(f"n{i}.test") == ["127.0.0.5"]
        threads, descriptors = threads_and_descriptors()
        peak = [threads, descriptors]

        async def lookup(i: int) -> None:
            with pytest.raises(LookupRetry):
                await resolver._query(f"far{i}.test", "A")

        async def sample() -> None:
            while True:
                now = threads_and_descriptors()
                peak[:] = [max(peak[0], now[0]), max(peak[1], now[1])]
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        started = loop.time()
        await asyncio.gather(*(lookup(i) for i in range(300)))
        elapsed = loop.time() - started
        sampler.cancel()
        assert elapsed < 1.5  # timeout x tries, with a margin
        assert peak[0] <= threads + 2 and peak[1] <= descriptors + 16, (threads, descriptors, peak)
        assert await resolver.addresses("n9.test") == ["127.0.0.5"]
    finally:
        await resolver.close()
        transport.close()


async def test_answers_too_big_for_udp_come_over_tcp_and_are_used_within_bounds(dns_zone):
    """1000 MX records and a TXT record of 64 000 bytes (250 strings, as a DKIM key split in pieces): truncated
    over UDP, asked again over TCP; the MX set is used up to MX_HOST_LIMIT hosts, the TXT strings are joined."""
    zone = "".join(f"many.test. 300 IN MX {i % 50} mx{i}.many.test.\n" for i in range(1000))
    zone += "big.test. 300 IN TXT " + " ".join(f'"{chr(97 + i % 26) * 255}"' for i in range(250)) + "\n"
    resolver = AiodnsResolver(nameservers=(dns_zone(zone),), timeout=2.0, tries=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        records = await resolver.mx("many.test")
        hosts = await exchangers(resolver, parse_nexthop("many.test", 25), random.Random(1),
                                 logging.getLogger("mailflow.smtp"))
        [text] = await resolver.txt("big.test")
    finally:
        await resolver.close()
    assert len(records) == 1000 and [r.preference for r in records] == sorted(r.preference for r in records)
    assert len(hosts) == MX_HOST_LIMIT and {h.preference for h in hosts} == {0, 1, 2, 3, 4}  # the most preferred
    assert len(text) == 250 * 255 and text.startswith("a" * 255 + "b")
    assert loop.time() - started < 2


# ------------------------------------------------------------------------------------ one garbled reply, isolated

GARBLE_ZONE = ZONE + """
garbled.test.        300 IN MX 10 mx1.example.test.
badmx.test.          300 IN MX 10 bad-.example.test.
alias.test.          300 IN CNAME example.test.
example.test.        300 IN NS ns1.example.test.
5.0.0.127.in-addr.arpa. 300 IN PTR implicit.test.
big.test.            300 IN TXT """ + " ".join(f'"{chr(97 + i % 26) * 255}"' for i in range(20)) + """
""" + "".join(f"n{i}.test. 300 IN A 127.0.1.{i}\n" for i in range(40))
# Every lookup below but garbled.test's: answered after a while, so that each is in flight, on c-ares's socket,
# when garbled.test's reply (at once, cut short) arrives.
BESIDE = ("example.test", "mx1.example.test", "textonly.test", "nullmx.test", "implicit.test", "alias.test",
          "badmx.test", "nowhere.test", "broken.test", "5.0.0.127.in-addr.arpa", "big.test")


def lookups(resolver: AiodnsResolver) -> list:
    """One lookup of each kind the resolver makes (each answer type converted, each failure), none of garbled.test."""
    return [resolver.mx("example.test"), resolver.addresses("mx1.example.test"), resolver.txt("textonly.test"),
            resolver.mx("nullmx.test"), resolver.mx("implicit.test"), resolver.mx("alias.test"),
            resolver.ns("example.test"), resolver.ptr("127.0.0.5"), resolver.mx("badmx.test"),
            resolver.mx("nowhere.test"), resolver.mx("broken.test"), resolver.txt("big.test")]  # (big: over TCP)


def outcome(answer: object) -> object:
    """An answer, or a failure as its type and text (what callers read of it)."""
    return (type(answer).__name__, answer.text) if isinstance(answer, PermanentError | LookupRetry) else answer


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def bracketed(nameserver: str) -> str:
    """dns_zone's "address:port" as the configuration writes it ("[::1]:port" for an IPv6 address)."""
    address, _, port = nameserver.rpartition(":")
    return f"[{address}]:{port}" if ":" in address else nameserver


SERVER_ADDRESSES = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not ipv6_loopback(),
                                                                              reason="no IPv6 loopback"))]


@pytest.mark.parametrize("address", SERVER_ADDRESSES)
async def test_a_garbled_reply_spoils_no_other_lookup_in_flight(dns_zone, address):
    """c-ares reads the replies of all its queries to a server on one UDP socket and fails every query in flight
    there when one reply cannot be read (EBADRESP): a garbled reply for garbled.test made each lookup of another
    name beside it (other sessions', other deliveries') a "Malformed or unexpected name server reply", a deferral.
    Each is asked again alone and answered as if garbled.test had not been asked; garbled.test stays unreadable,
    in Postfix's words; all within one try's timeout. With an IPv6 name server too (where the re-ask once sent to
    an address its connected socket refused, and every lookup beside failed with that Python error's text)."""
    nameserver = bracketed(dns_zone(GARBLE_ZONE, servfail=("broken.test",), garbled=("garbled.test",), slow=BESIDE,
                                    delay=0.3, address=address))
    alone = AiodnsResolver(nameservers=(nameserver,), timeout=2.0, tries=2)
    try:
        expected = [outcome(a) for a in await asyncio.gather(*lookups(alone), return_exceptions=True)]
    finally:
        await alone.close()
    assert expected[0] == [MX(10, "mx1.example.test"), MX(20, "mx2.example.test"), MX(30, "mx3.example.test")]
    assert expected[6:8] == [["ns1.example.test"], ["implicit.test"]] and expected[9][0] == "NotFound"
    assert len(expected[11][0]) == 20 * 255
    assert expected[8] == ("InvalidReply", "Name service error for name=badmx.test type=MX: Malformed or unexpected "
                                           "name server reply")
    loop = asyncio.get_running_loop()
    for _ in range(3):  # (a resolver each time: c-ares answers a name again from its cache)
        resolver = AiodnsResolver(nameservers=(nameserver,), timeout=2.0, tries=2)
        started = loop.time()
        try:
            garbled, *beside = await asyncio.gather(resolver.mx("garbled.test"), *lookups(resolver),
                                                    return_exceptions=True)
        finally:
            await resolver.close()
        assert [outcome(a) for a in beside] == expected
        assert outcome(garbled) == ("UnreadableReply", "Name service error for name=garbled.test type=MX: "
                                                       "Malformed or unexpected name server reply")
        assert loop.time() - started < 2.0


@pytest.mark.parametrize("unusable", ["[fe80::1%nosuchif]:53", "[::1]:0"])
async def test_a_name_server_not_reached_when_asked_alone_gives_way_to_the_next(dns_zone, unusable):
    """As c-ares passes over a server it cannot reach: one whose address cannot be used (a scope no interface
    has, port 0) failed the whole re-ask with that Python error, and the good server after it was not asked."""
    good = dns_zone(ZONE)
    asker = IsolatedAsker(NameServers((unusable, good)), timeout=1.0, limit=1)
    answer = await asker.ask_again("example.test", "MX")
    assert sorted((rec.data.priority, rec.data.exchange) for rec in answer.answer) == \
        [(10, "mx1.example.test"), (20, "mx2.example.test"), (30, "mx3.example.test")]


class StrayFirstServer(asyncio.DatagramProtocol):
    """To each query, first a reply to another one (another id, or another question) naming stray.test, then the
    right reply naming mx.example.org."""

    def __init__(self, stray: str) -> None:
        self.stray = stray

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        request = DNSRecord.parse(data)
        stray = DNSRecord.parse(data).reply()
        if self.stray == "id":
            stray.header.id = (request.header.id + 1) % 65536
        else:
            stray.q.qname = "other.test"
        stray.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MXData("stray.test"), ttl=60))
        right = request.reply()
        right.add_answer(RR(request.q.qname, QTYPE.MX, rdata=MXData("mx.example.org"), ttl=60))
        self.transport.sendto(stray.pack(), addr)
        self.transport.sendto(right.pack(), addr)


@pytest.mark.parametrize("stray", ["id", "question"])
async def test_asked_alone_a_reply_to_another_query_is_passed_over(stray):
    """A datagram on the re-ask's socket that answers another query (a late reply for a socket that had this port
    before, a forgery) is not taken for the answer: the reply with the query's id and question is."""
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: StrayFirstServer(stray),
                                                                             local_addr=("127.0.0.1", 0))
    try:
        server = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
        asker = IsolatedAsker(NameServers((server,)), timeout=1.0, limit=1)
        answer = await asker.ask_again("example.test", "MX")
    finally:
        transport.close()
    assert [rec.data.exchange for rec in answer.answer] == ["mx.example.org"]


@pytest.mark.parametrize("rcode", ["YXDOMAIN", "NXRRSET", "NOTAUTH", "NOTZONE"])
async def test_an_rcode_neither_path_names_is_non_recoverable_in_both_as_postfix_takes_it(dns_zone, rcode):
    """Postfix's dns_query says NO_RECOVERY (DNS_FAIL) for an rcode other than NOERROR, NXDOMAIN and SERVFAIL (REFUSED
    and NOTIMP: the next server, then TRY_AGAIN). c-ares leaves these a success without records, which read as
    NODATA (an MX lookup then fell back to the domain's address); asked alone the same reply was unreadable."""
    nameserver = dns_zone(ZONE, rcodes={"example.test": rcode})
    resolver = aiodns_resolver(nameserver)
    try:
        with pytest.raises(NonRecoverable):
            await resolver.mx("example.test")
    finally:
        await resolver.close()
    with pytest.raises(DNSError) as alone:
        await IsolatedAsker(NameServers((nameserver,)), timeout=1.0, limit=1).ask_again("example.test", "MX")
    assert alone.value.args[0] == ARES_EFORMERR


async def test_lookups_are_asked_alone_once_and_only_so_many_at_once(dns_zone):
    """A query c-ares found unreadable is asked alone once (a reply garbled again is unreadable, not asked a
    third time), and at most `isolated_asks` at once: past them a flood of garbled replies opens no more
    sockets, and the queries past them wait for a slot within their deadline (they stayed unreadable: a
    deferral for each lookup past the cap)."""
    asked: list[tuple[str, str]] = []
    names = [f"n{i}.test" for i in range(30)]
    nameserver = dns_zone(GARBLE_ZONE, garbled=("garbled.test",), slow=tuple(names), delay=0.3, asked=asked)
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=4.0, tries=1, isolated_asks=4)
    loop = asyncio.get_running_loop()
    assert await resolver.mx("example.test")  # (c-ares's channel made: its descriptors are counted before)
    threads, descriptors = threads_and_descriptors()
    peak = [descriptors]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], threads_and_descriptors()[1])
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    started = loop.time()
    try:
        beside = [asyncio.ensure_future(resolver.ipv4_addresses(n)) for n in names]
        await asyncio.sleep(0.1)  # (all sent: c-ares sends from a thread of its own)
        answers = await asyncio.gather(resolver.mx("garbled.test"), *beside, return_exceptions=True)
    finally:
        sampler.cancel()
        await resolver.close()
    assert loop.time() - started < 4.0  # (8 rounds of 4 re-asks, 0.3 s each)
    times_asked = {name: sum(1 for n, _ in asked if n.rstrip(".") == name) for name in ["garbled.test", *names]}
    # c-ares's one try (none for a query still unsent when it failed them all), then at most once alone
    assert max(times_asked.values()) <= 2
    assert isinstance(answers[0], UnreadableReply)
    assert answers[1:] == [[f"127.0.1.{name[1:].split('.')[0]}"] for name in names]
    assert peak[0] <= descriptors + 8, (descriptors, peak)


async def test_a_lookup_waiting_to_be_asked_alone_waits_no_longer_than_its_deadline(dns_zone):
    """Past the cap a lookup waits for a slot only until its deadline (timeout x tries), then fails as a timeout."""
    names = [f"n{i}.test" for i in range(6)]
    nameserver = dns_zone(GARBLE_ZONE, garbled=("garbled.test",), slow=tuple(names), delay=0.6)
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1, isolated_asks=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        beside = [asyncio.ensure_future(resolver.ipv4_addresses(n)) for n in names]
        await asyncio.sleep(0.1)
        answers = await asyncio.gather(resolver.mx("garbled.test"), *beside, return_exceptions=True)
    finally:
        await resolver.close()
    assert loop.time() - started < 1.6
    late = [answer for answer in answers if isinstance(answer, LookupRetry) and answer.text.endswith(TRY_AGAIN)]
    assert late and all(isinstance(answer, list) or answer in late for answer in answers[1:]), answers
    await asyncio.sleep(0.6)  # (the server's answers to the lookups given up, before it closes)


def test_without_configured_name_servers_resolv_conf_is_read_again_when_it_changes(tmp_path):
    """As c-ares follows resolv.conf: the isolated re-ask and dnspython's DNSSEC queries kept the servers they
    first read, forever; configured servers are taken as written, resolv.conf not read."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 192.0.2.53\n")
    servers = NameServers((), resolv_conf=str(resolv_conf))
    assert servers.servers() == [("192.0.2.53", 53)] and servers.servers() is servers.servers()
    resolv_conf.write_text("nameserver 2001:db8::53\nnameserver 192.0.2.54\n")
    later = os.stat(resolv_conf).st_mtime_ns + 1_000_000_000
    os.utime(resolv_conf, ns=(later, later))
    assert servers.servers() == [("2001:db8::53", 53), ("192.0.2.54", 53)]
    resolv_conf.unlink()
    assert servers.servers() == []
    assert NameServers(("[::1]:5353", "127.0.0.1"), resolv_conf=str(resolv_conf)).servers() == \
        [("::1", 5353), ("127.0.0.1", 53)]


async def test_dnssec_queries_ask_the_servers_resolv_conf_names_now(tmp_path):
    """dnspython's resolver is given the servers again when resolv.conf changes (it was made once with the servers
    first read). (The resolver's NameServers is pointed at a file of the test's: /etc/resolv.conf is not ours.)"""
    resolver = AiodnsResolver(nameservers=(), timeout=1.0, tries=1)
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 192.0.2.53\n")
    resolver._servers = NameServers((), resolv_conf=str(resolv_conf))
    assert [(n.address, n.port) for n in resolver._dnssec_resolver().nameservers] == [("192.0.2.53", 53)]
    resolv_conf.write_text("nameserver 192.0.2.54\n")
    later = os.stat(resolv_conf).st_mtime_ns + 1_000_000_000
    os.utime(resolv_conf, ns=(later, later))
    assert [(n.address, n.port) for n in resolver._dnssec_resolver().nameservers] == [("192.0.2.54", 53)]


LONG_NAME = ("a" * 60 + ".") * 5 + "test"


@pytest.mark.parametrize("name, gripe", [
    ("mail.example.test", None), ("under_score.test", None), ("xn--bcher-kva.test", None), ("9.example.test", None),
    ("a..test", "misplaced delimiter: a..test"), ("trailing.test.", "misplaced delimiter: trailing.test."),
    ("-lead.test", "misplaced hyphen: -lead.test"), ("trail-.test", "misplaced hyphen: trail-.test"),
    ("a" * 64 + ".test", "hostname label too long: " + "a" * 64 + ".test"),
    ("sp ace.test", "invalid character 32(decimal): sp ace.test"), ("1.2.3", "numeric hostname: 1.2.3"),
    ("", "empty hostname"), (LONG_NAME, f"bad length 309 for {LONG_NAME[:100]}...")])
def test_hostname_gripe_says_what_postfix_s_valid_hostname_warns(name, gripe):
    """postfix-3.7.11 src/util/valid_hostname.c: the warning after "valid_hostname: " (the name cut at 100)."""
    assert hostname_gripe(name) == gripe


# Postfix's dns.h order, written out here (not taken from mailflow.dns): DNS_RETRY (a failure now, a reply that
# cannot be read), DNS_INVAL, DNS_FAIL, DNS_NOTFOUND, then NODATA.
ANSWER_KINDS = {"addresses": 9, "retry": 6, "unreadable": 6, "invalid": 5, "formerr": 4, "nxdomain": 2, "nodata": 1}


def answer_of(kind: str):
    return {"addresses": ["192.0.2.1"], "nodata": [], "nxdomain": NotFound("h.test", "A"),
            "formerr": NonRecoverable("h.test", "A"), "invalid": InvalidReply("h.test", "A"),
            "unreadable": UnreadableReply("h.test", "A"), "retry": LookupRetry("h.test: Host not found, try again")
            }[kind]


@pytest.mark.parametrize("a", ANSWER_KINDS)
@pytest.mark.parametrize("aaaa", ANSWER_KINDS)
def test_the_a_and_aaaa_answers_merge_as_postfix_ranks_their_statuses(a, aaaa):
    """Any address wins; else the worst status met (the AAAA one of equals, as dns_lookup_rv keeps the last)."""
    answers = [answer_of(a), answer_of(aaaa)]
    expected = answers[0] if ANSWER_KINDS[a] > ANSWER_KINDS[aaaa] else answers[1]
    if isinstance(expected, list):
        assert merge_address_answers(answers) == [addr for answer in answers if isinstance(answer, list)
                                                  for addr in answer]
    else:
        with pytest.raises(type(expected)) as raised:
            merge_address_answers(answers)
        assert raised.value is expected


async def test_an_ipv6_client_s_name_is_asked_for_aaaa_records_only(dns_zone):
    """Postfix's smtpd_peer.c asks hostname_to_sockaddr_pf in the client's family: a name without AAAA whose A
    lookup fails is "No address associated with hostname" (a permanent verdict), not a temporary failure."""
    resolver = aiodns_resolver(dns_zone('v6.test. 300 IN TXT "no AAAA"\n', servfail=("v6.test/A",)))
    try:
        verdict = await client_name(resolver, "2001:db8::7", ["v6.test"])
        assert (verdict.name, verdict.retry) == ("", False)
        assert verdict.warning == f"hostname v6.test does not resolve to address 2001:db8::7: {GAI_NODATA}"
    finally:
        await resolver.close()


async def test_names_in_replies_are_warned_of_as_postfix_s_valid_rr_name_warns(dns_zone, caplog):
    """postfix-3.7.11 src/dns/dns_lookup.c valid_rr_name: valid_hostname(DO_GRIPE | DO_WILDCARD) logs its own
    warning before "malformed domain name in ..."; an IP address passes with "numeric domain name in ..."; a `*`
    label alone is a name."""
    resolver = aiodns_resolver(dns_zone(MIXED_MX_ZONE))
    try:
        await resolver.mx("mixed.test")
        assert await resolver.mx("numeric.test") == [MX(10, "192.0.2.9")]
    finally:
        await resolver.close()
    assert [m for m in caplog.messages if "domain name" in m or "valid_hostname" in m] == [
        "valid_hostname: misplaced hyphen: bad-.example.test",
        "malformed domain name in resource data of MX record for mixed.test: bad-.example.test",
        "numeric domain name in resource data of MX record for numeric.test: 192.0.2.9"]
    assert checked_rr_name("*", "resource name", "A", "x.test") and checked_rr_name("*.x.test", "resource name",
                                                                                      "A", "x.test")


async def test_dns_list_reasons_take_no_slot_of_the_re_asks_and_fail_at_once_past_their_own(dns_zone):
    """A DNS list's reason (txt_strings) is asked alone, but in slots of its own: a flood of listed clients once
    took every re-ask slot, and the lookups a garbled reply spoiled beside it (other sessions', other deliveries')
    waited past their deadline (a 450, a deferral). Past `reason_asks` a reason fails at once (the reply then has
    none, as Postfix's when the TXT lookup fails), without waiting for a slot."""
    reasons = [f"r{i}.test" for i in range(10)]
    zone = GARBLE_ZONE + "".join(f'{name}. 300 IN TXT "listed"\n' for name in reasons)
    names = [f"n{i}.test" for i in range(4)]
    nameserver = dns_zone(zone, garbled=("garbled.test",), slow=(*reasons, *names), delay=0.6)
    resolver = AiodnsResolver(nameservers=(nameserver,), timeout=1.0, tries=1, isolated_asks=4, reason_asks=2)
    loop = asyncio.get_running_loop()
    try:
        flood = [asyncio.ensure_future(resolver.txt_strings(name)) for name in reasons]
        await asyncio.sleep(0)  # (each has taken its slot, or failed)
        started = loop.time()
        refused = await asyncio.wait_for(asyncio.gather(*flood[2:], return_exceptions=True), 0.3)
        failed_in = loop.time() - started
        beside = [asyncio.ensure_future(resolver.ipv4_addresses(n)) for n in names]
        await asyncio.sleep(0.1)  # (all sent: c-ares sends from a thread of its own)
        answers = await asyncio.gather(resolver.mx("garbled.test"), *beside, return_exceptions=True)
        listed = await asyncio.gather(*flood[:2])
    finally:
        await resolver.close()
    assert all(isinstance(r, LookupRetry) and r.text.endswith(TRY_AGAIN) for r in refused), refused
    assert failed_in < 0.3
    assert isinstance(answers[0], UnreadableReply)
    assert answers[1:] == [[f"127.0.1.{i}"] for i in range(4)]
    assert listed == [[("listed",)]] * 2
    await asyncio.sleep(0.6)  # (the server's answers to the lookups given up, before it closes)


class LosesFirstServer(asyncio.DatagramProtocol):
    """Drops the first query it gets (a datagram lost on the way); answers each later one with a TXT record of two
    strings."""

    def __init__(self) -> None:
        self.queries = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.queries += 1
        if self.queries == 1:
            return
        request = DNSRecord.parse(data)
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(["listed here", "second"]), ttl=60))
        self.transport.sendto(reply.pack(), addr)


@pytest.mark.parametrize("lookup", ["txt", "txt_strings"])
async def test_a_dns_list_reason_is_asked_again_after_a_lost_datagram_as_c_ares_asks(lookup):
    """txt_strings is asked `tries` times, as c-ares asks `txt` (and Postfix's res_query, RES_RETRY): asked once, a
    datagram lost made the reason a LookupRetry, and the reply said "blocked using D" without it, where Postfix's
    has it."""
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        LosesFirstServer, local_addr=("127.0.0.1", 0))
    resolver = AiodnsResolver(nameservers=(f"127.0.0.1:{transport.get_extra_info('sockname')[1]}",), timeout=0.5,
                              tries=2)
    try:
        records = await getattr(resolver, lookup)("reason.test")
    finally:
        await resolver.close()
        transport.close()
    assert records == ([("listed here", "second")] if lookup == "txt_strings" else ["listed heresecond"])
    assert server.queries == 2


async def test_a_dns_list_reason_is_kept_for_its_ttl_as_c_ares_keeps_txt(dns_zone):
    """Each listed session asked the list's TXT again (a socket and a query each), where c-ares answers `txt` from
    its cache: the reason is kept for its TTL; one of TTL 0 is not kept, nor is a failure."""
    asked: list[tuple[str, str]] = []
    zone = 'reason.test. 60 IN TXT "listed" "why"\nfleeting.test. 0 IN TXT "listed"\n'
    resolver = AiodnsResolver(nameservers=(dns_zone(zone, servfail=("broken.test",), asked=asked),), timeout=1.0,
                              tries=1)
    try:
        kept = [await resolver.txt_strings(name) for name in ("reason.test", "Reason.Test.", "reason.test")]
        fleeting = [await resolver.txt_strings("fleeting.test") for _ in range(2)]
        for _ in range(2):
            with pytest.raises(LookupRetry):
                await resolver.txt_strings("broken.test")
    finally:
        await resolver.close()
    assert kept == [[("listed", "why")]] * 3 and fleeting == [[("listed",)]] * 2
    times_asked = {name: sum(1 for n, _ in asked if n.rstrip(".").lower() == name) for name in
                   ("reason.test", "fleeting.test", "broken.test")}
    assert times_asked == {"reason.test": 1, "fleeting.test": 2, "broken.test": 2}


def test_the_reasons_kept_are_bounded_in_time_number_and_size():
    now = [0.0]
    cache = TxtCache(size=2, longest=100, chars=10, clock=lambda: now[0])
    cache.put("a.test", [("x",)], ttl=5)
    cache.put("long.test", [("x" * 6, "y" * 5)], ttl=60)  # 11 characters: not kept
    cache.put("b.test", [("y",)], ttl=1000)  # kept 100 s at most
    assert cache.get("A.test.") == [("x",)] and cache.get("long.test") is None
    now[0] = 5.0
    assert cache.get("a.test") is None and cache.get("b.test") == [("y",)]
    cache.put("c.test", [("z",)], ttl=60)
    cache.put("d.test", [("w",)], ttl=60)  # the third kept: the oldest put (b.test) goes
    assert cache.get("b.test") is None and cache.get("c.test") == [("z",)] and cache.get("d.test") == [("w",)]
    now[0] = 65.0
    assert cache.get("c.test") is None


def test_a_bracketed_ipv4_next_hop_with_leading_zeros_is_that_address():
    """bob@[192.0.2.01] routes (Postfix's valid_ipv4_hostaddr takes it): its next hop is 192.0.2.1, not a name."""
    assert parse_nexthop("[192.0.2.01]:25", 25).host == "192.0.2.1"
    assert parse_nexthop("[192.0.2.1]", 25).host == "192.0.2.1"


def test_a_bracketed_next_hop_is_parsed_as_an_address_literal_once(monkeypatch):
    """`[192.0.2.01]` was read by literal_ip twice (is it one? then: which?); a bracketed name stays as written."""
    calls = []

    def counted(text):
        calls.append(text)
        return literal_ip(text)

    monkeypatch.setattr(addr, "literal_ip", counted)
    assert parse_nexthop("[192.0.2.01]:25", 25).host == "192.0.2.1"
    assert calls == ["[192.0.2.01]"]
    assert parse_nexthop("[MX.Example.test.]", 25) == Nexthop("mx.example.test", 25)


def test_a_bracketed_ipv6_next_hop_with_a_zero_padded_ipv4_tail_is_that_address():
    """bob@[IPv6:::ffff:192.0.2.01] is taken at RCPT (Postfix's valid_ipv6_hostaddr takes the tail as
    valid_ipv4_hostaddr does): its next hop is read the same way, not deferred "bad SMTP nexthop" for the queue
    lifetime; one that is no address stays malformed."""
    assert ipaddress.ip_address(parse_nexthop("[IPv6:::ffff:192.0.2.01]", 25).host) == \
        ipaddress.ip_address("::ffff:192.0.2.1")
    assert parse_nexthop("[IPv6:2001:DB8::1]:26", 25).host == "2001:db8::1"
    for bad in ("[IPv6:::ffff:192.0.2.256]", "[IPv6:192.0.2.1]", "[IPv6:2001:db8::g]"):
        with pytest.raises(ValueError, match="malformed IPv6 address"):
            parse_nexthop(bad, 25)
