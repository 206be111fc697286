"""The addresses `mailflow dns-records` and `check-deliverability` take as this host's outbound ones."""
from __future__ import annotations

from mailflow.config import Config
from mailflow.deliverability.records import public_addresses


def config(**sections) -> Config:
    return Config(myhostname="mx.example.test", smtpd={"listen": ["192.0.2.1:25", "8.8.8.8:25"]}, **sections)


def test_the_smtp_bind_addresses_come_before_the_listener_addresses():
    """Outgoing connections leave from smtp.bind_address / bind_address6: those are what SPF must name."""
    bound = config(smtp={"bind_address": "203.0.113.7", "bind_address6": "2001:db8::7"})
    assert public_addresses(bound) == ["203.0.113.7", "2001:db8::7"]


def test_outbound_addresses_come_first_and_the_public_listener_addresses_last():
    assert public_addresses(config(smtp={"bind_address": "203.0.113.7"},
                                   deliverability={"outbound_addresses": ["198.51.100.1"]})) == ["198.51.100.1"]
    assert public_addresses(config()) == ["8.8.8.8"]
