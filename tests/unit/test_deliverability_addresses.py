"""The addresses `mailflow dns-records` and `check-deliverability` take as this host's outbound ones."""
from __future__ import annotations

from mailflow.config import Config
from mailflow.deliverability.records import public_addresses, records


def config(**sections) -> Config:
    return Config(myhostname="mx.example.test", smtpd={"listen": ["192.0.2.1:25", "8.8.8.8:25"]}, **sections)


def test_the_smtp_bind_addresses_come_before_the_listener_addresses():
    """Outgoing connections leave from smtp.bind_address / bind_address6: those are what SPF must name."""
    bound = config(smtp={"bind_address": "9.9.9.9", "bind_address6": "2a00:1450::7"})
    assert public_addresses(bound) == ["9.9.9.9", "2a00:1450::7"]


def test_a_bind_address_stands_for_its_own_family_only():
    """Dual stack: an IPv4 bind address replaced the IPv6 listener too, so no AAAA and an SPF `-all` that failed
    the mail going out over IPv6."""
    dual = Config(myhostname="mx.example.test", smtp={"bind_address": "9.9.9.9"},
                  smtpd={"listen": ["8.8.8.8:25", "[2a00:1450::25]:25"]})
    assert public_addresses(dual) == ["9.9.9.9", "2a00:1450::25"]
    lines = records(dual, "example.test")
    assert "mx.example.test. IN AAAA 2a00:1450::25" in lines
    assert 'example.test. IN TXT "v=spf1 ip4:9.9.9.9 ip6:2a00:1450::25 -all"' in lines


def test_a_bind_address_that_is_not_public_is_not_published_and_the_records_say_so():
    """A bind address behind NAT (10.0.0.5) was published as the A record and in SPF."""
    natted = config(smtp={"bind_address": "10.0.0.5"})
    assert public_addresses(natted) == []
    lines = records(natted, "example.test")
    assert "; the bind address 10.0.0.5 is not public: set deliverability.outbound_addresses" in lines
    assert not any("10.0.0.5" in line for line in lines if not line.startswith(";"))
    assert 'example.test. IN TXT "v=spf1 -all"' in lines


def test_outbound_addresses_come_first_and_the_public_listener_addresses_last():
    assert public_addresses(config(smtp={"bind_address": "9.9.9.9"},
                                   deliverability={"outbound_addresses": ["198.51.100.1"]})) == ["198.51.100.1"]
    assert public_addresses(config()) == ["8.8.8.8"]
