"""The client's name at connect (mailflow.stages.smtpd.peername.PeerNames), as Postfix's smtpd names it.

Covered: the hosts file first (first name of the first line, only when that name leads back to the address;
comments, aliases, IPv6, an IPv4-mapped client address), re-read when it changes (at most once per interval);
then DNS: the first PTR name when its addresses include the client's, else "unknown" — no PTR, a
name that does not lead back, a lookup that cannot answer now, an address that is not one, too many lookups
under way.
"""
from __future__ import annotations

import asyncio
import logging

from mailflow.dns import AiodnsResolver, StaticResolver
from mailflow.errors import LookupRetry
from mailflow.stages.smtpd.peername import HOSTS_RECHECK, LOOKUPS_IN_FLIGHT, UNKNOWN, PeerNames

HOSTS = """# a comment
127.0.0.1   localhost loopback
127.0.1.1   box.example.test box   # this host
::1         localhost ip6-localhost
192.0.2.9   shared.example.test
192.0.2.10  shared.example.test
"""


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Failing:
    async def ptr(self, address: str) -> list[str]:
        raise LookupRetry("SERVFAIL")


def names(tmp_path, resolver=None, text=HOSTS, clock=None) -> PeerNames:
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    return PeerNames(resolver, str(hosts), clock or Clock())


async def test_the_hosts_file_names_an_address_that_its_name_leads_back_to(tmp_path):
    n = names(tmp_path)
    assert await n.name("127.0.0.1") == "localhost"
    assert await n.name("127.0.1.1") == "box.example.test"
    assert await n.name("::1") == "localhost"
    assert await n.name("::ffff:127.0.0.1") == "localhost"  # a dual-stack listener's IPv4 client
    assert await n.name("192.0.2.9") == "shared.example.test" and await n.name("192.0.2.10") == "shared.example.test"
    assert await n.name("192.0.2.99") == UNKNOWN  # not in the file, no resolver
    assert await n.name("not an address") == UNKNOWN


async def test_a_changed_hosts_file_is_read_again_after_the_interval(tmp_path):
    clock = Clock()
    n = names(tmp_path, clock=clock)
    assert await n.name("192.0.2.99") == UNKNOWN
    (tmp_path / "hosts").write_text(HOSTS + "192.0.2.99 new.example.test\n")
    assert await n.name("192.0.2.99") == UNKNOWN  # not looked at again yet
    clock.now += HOSTS_RECHECK
    assert await n.name("192.0.2.99") == "new.example.test"


async def test_dns_gives_the_first_ptr_name_when_it_leads_back(tmp_path):
    """Only the first PTR name counts, as the one Postfix's smtpd gets from getnameinfo (a private Postfix 3.7.11
    with PTRs elsewhere.test and client.ok.test for its client logged "warning: hostname elsewhere.test does not
    resolve to address 127.0.0.1" and named it unknown); mailflow took the first that led back."""
    resolver = StaticResolver(ptr={"198.51.100.7": ["liar.example.test.", "mail.example.test."],
                                   "198.51.100.6": ["mail.example.test.", "liar.example.test."]},
                              addresses={"liar.example.test": ["203.0.113.1"],
                                         "mail.example.test": ["198.51.100.7", "198.51.100.6"]})
    n = names(tmp_path, resolver)
    assert await n.name("198.51.100.7") == UNKNOWN
    assert await n.name("198.51.100.6") == "mail.example.test"
    assert await n.name("127.0.0.1") == "localhost"  # the hosts file first


async def test_no_ptr_a_name_that_does_not_lead_back_or_no_answer_now_is_unknown(tmp_path):
    resolver = StaticResolver(ptr={"198.51.100.8": ["forged.example.test"]},
                              addresses={"forged.example.test": ["203.0.113.1"]})
    n = names(tmp_path, resolver)
    assert await n.name("198.51.100.8") == UNKNOWN  # forward confirmation fails
    assert await n.name("198.51.100.9") == UNKNOWN  # no PTR record
    assert await names(tmp_path, Failing()).name("198.51.100.8") == UNKNOWN


async def test_a_missing_hosts_file_leaves_dns(tmp_path):
    n = PeerNames(None, str(tmp_path / "none"), Clock())
    assert await n.name("127.0.0.1") == UNKNOWN and n.hosts_name("127.0.0.1") is None


class Stalled:
    """A resolver whose PTR lookups wait until released."""

    def __init__(self):
        self.release = asyncio.Event()
        self.asked = 0

    async def ptr(self, address: str) -> list[str]:
        self.asked += 1
        await self.release.wait()
        return ["mail.example.test"]

    async def addresses(self, name: str) -> list[str]:
        return ["198.51.100.7"]

    async def ipv4_addresses(self, name: str) -> list[str]:  # (an IPv4 client's name is asked for A records only)
        return ["198.51.100.7"]


async def test_lookups_under_way_are_bounded_and_the_rest_are_unknown_at_once(tmp_path):
    resolver = Stalled()
    n = names(tmp_path, resolver)
    waiting = [asyncio.ensure_future(n.name("198.51.100.7")) for _ in range(LOOKUPS_IN_FLIGHT)]
    await asyncio.sleep(0)
    assert await n.name("198.51.100.7") == UNKNOWN and resolver.asked == LOOKUPS_IN_FLIGHT
    resolver.release.set()
    assert set(await asyncio.gather(*waiting)) == {"mail.example.test"}
    assert await n.name("198.51.100.7") == "mail.example.test"  # room again


async def test_dns_is_never_asked_about_a_loopback_address(tmp_path):
    resolver = Stalled()  # would hang
    n = names(tmp_path, resolver, text="")
    assert await n.name("127.0.0.1") == UNKNOWN and await n.name("::1") == UNKNOWN and resolver.asked == 0


async def test_a_hosts_file_that_cannot_be_read_for_a_while_keeps_the_names_and_is_read_again(tmp_path, monkeypatch,
                                                                                            caplog):
    """No descriptor left when the changed file is looked at: the names read last stay, one warning, and the file is
    read at the next look once it can be (a passing shortage must not leave the server on DNS names for good)."""
    clock = Clock()
    n = names(tmp_path, clock=clock)
    assert await n.name("127.0.0.1") == "localhost"
    (tmp_path / "hosts").write_text(HOSTS + "192.0.2.99 new.example.test\n")
    real_open = open

    def out_of_descriptors(path, *args, **kwargs):
        if str(path) == str(tmp_path / "hosts"):
            raise OSError(24, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", out_of_descriptors)
    for _ in range(3):
        clock.now += HOSTS_RECHECK
        assert await n.name("127.0.0.1") == "localhost"  # the names read before
    assert len([r for r in caplog.records if "cannot read" in r.getMessage()]) == 1
    monkeypatch.setattr("builtins.open", real_open)
    clock.now += HOSTS_RECHECK
    assert await n.name("192.0.2.99") == "new.example.test"


async def test_a_first_ptr_name_that_is_no_name_is_warned_of_in_postfix_s_words(tmp_path, dns_zone, caplog):
    """A private Postfix 3.7.11 (its resolver pointed at a server giving its client these PTR names) logged, at
    connect: "warning: hostname gone.test does not resolve to address A: Name or service not known" (NXDOMAIN),
    "...: No address associated with hostname" (no A), "...: Temporary failure in name resolution" (SERVFAIL), no
    reason for a name whose addresses are others, "numeric hostname: 192.0.2.7" and "valid_hostname: misplaced
    hyphen: bad-.example.test". mailflow logged nothing."""
    ptr = {10: "gone.test", 11: "noaddr.test", 12: "broken.test", 13: "elsewhere.test", 14: "192.0.2.7",
           15: "bad-.example.test", 16: "mail.example.test"}
    zone = "".join(f"{n}.100.51.198.in-addr.arpa. 300 IN PTR {name}.\n" for n, name in ptr.items()) + (
        'noaddr.test. 300 IN TXT "no address"\nelsewhere.test. 300 IN A 192.0.2.1\n'
        "mail.example.test. 300 IN A 198.51.100.16\n")
    resolver = AiodnsResolver(nameservers=(dns_zone(zone, servfail=("broken.test",)),), timeout=1.0, tries=1)
    n = names(tmp_path, resolver)
    try:
        with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
            found = [await n.name(f"198.51.100.{last}") for last in ptr]
    finally:
        await resolver.close()
    assert found == [UNKNOWN] * 6 + ["mail.example.test"]
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.smtpd"] == [
        "hostname gone.test does not resolve to address 198.51.100.10: Name or service not known",
        "hostname noaddr.test does not resolve to address 198.51.100.11: No address associated with hostname",
        "hostname broken.test does not resolve to address 198.51.100.12: Temporary failure in name resolution",
        "hostname elsewhere.test does not resolve to address 198.51.100.13",
        "numeric hostname: 192.0.2.7",
        "valid_hostname: misplaced hyphen: bad-.example.test"]
