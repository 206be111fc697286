"""The SMTP client's TLS policy: table keys, policy values, certificate name matching (pure functions)."""
from __future__ import annotations

import pytest

from mailflow.transports.smtp.tls import TlsPolicy, certificate_matches, mismatch_error, parse_policy, policy_keys


def cert(*dns: str, ips: tuple[str, ...] = (), cn: str = "") -> dict:
    san = tuple(("DNS", n) for n in dns) + tuple(("IP Address", ip) for ip in ips)
    return {"subject": ((("commonName", cn),),) if cn else (), "subjectAltName": san}


@pytest.mark.parametrize(("written", "host", "keys"), [
    ("mail.example.com", "mail.example.com", ["mail.example.com", ".example.com", ".com"]),
    ("[Relay.Example.com]:587", "relay.example.com", ["[relay.example.com]:587"]),
    ("[relay.example.com]", "relay.example.com", ["[relay.example.com]"]),
    ("example.com:2525", "example.com", ["example.com:2525"]),  # with a port: no parent domains
])
def test_policy_keys_follow_postfix(written, host, keys):
    assert policy_keys(written, host) == keys


@pytest.mark.parametrize(("value", "policy"), [
    ("none", TlsPolicy("none")),
    ("MAY", TlsPolicy("may")),
    ("encrypt", TlsPolicy("encrypt")),
    ("verify", TlsPolicy("verify", ("hostname",))),
    ("secure", TlsPolicy("secure", ("nexthop", "dot-nexthop"))),
    ("verify match=hostname:.example.com", TlsPolicy("verify", ("hostname", ".example.com"))),
    ("secure, match=mx.example.com match=nexthop", TlsPolicy("secure", ("mx.example.com", "nexthop"))),
])
def test_policy_values(value, policy):
    assert parse_policy(value) == policy


@pytest.mark.parametrize(("value", "reason"), [
    ("", "empty"),
    ("fingerprint", "unsupported TLS security level .fingerprint."),
    ("fingerprint match=AA:BB", "unsupported TLS security level"),
    ("encrypt protocols=TLSv1.2", "unsupported TLS policy attribute 'protocols=TLSv1.2'"),
    ("encrypt match=x.example", "match= needs level verify or secure"),
])
def test_unusable_policy_values_are_refused(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_policy(value)


def test_required_and_verifies():
    assert [parse_policy(lv).required for lv in ("none", "may", "encrypt", "verify", "secure")] == [
        False, False, True, True, True]
    assert [parse_policy(lv).verifies for lv in ("none", "may", "encrypt", "verify", "secure")] == [
        False, False, False, True, True]


@pytest.mark.parametrize(("certificate", "patterns", "expected"), [
    (cert("mx.example.com"), ("hostname",), True),
    (cert("MX.Example.COM."), ("hostname",), True),
    (cert("other.example.com"), ("hostname",), False),
    (cert("*.example.com"), ("hostname",), True),  # a wildcard stands for one label
    (cert("*.com"), ("hostname",), False),
    (cert("*.mx.example.com"), ("hostname",), False),
    (cert("example.com"), ("nexthop",), True),
    (cert("mx.example.com"), ("nexthop",), False),
    (cert("mx.example.com"), ("dot-nexthop",), True),
    (cert("example.com"), ("dot-nexthop",), False),
    (cert("a.b.example.com"), (".example.com",), True),
    (cert("example.com"), (".example.com",), False),
    (cert("other.test"), ("hostname", "other.test"), True),
    (cert(cn="mx.example.com"), ("hostname",), True),  # no DNS names: the CN counts
    (cert("x.test", cn="mx.example.com"), ("hostname",), False),  # DNS names present: the CN does not
])
def test_certificate_name_matching(certificate, patterns, expected):
    assert certificate_matches(certificate, patterns, "mx.example.com", "example.com") is expected


def test_an_ip_literal_host_matches_an_ip_address_entry():
    assert certificate_matches(cert("x.test", ips=("127.0.0.1",)), ("hostname",), "127.0.0.1", "127.0.0.1")
    assert not certificate_matches(cert("127.0.0.1"), ("hostname",), "127.0.0.2", "127.0.0.2")


@pytest.mark.parametrize(("patterns", "host", "expected"), [
    (("hostname",), "127.0.0.1", (64, "IP address mismatch")),  # as Postfix logs a [127.0.0.1] next hop's
    (("hostname",), "mx.example.com", (62, "hostname mismatch")),
    (("nexthop", "dot-nexthop"), "127.0.0.1", (62, "hostname mismatch")),  # a name was asked for too
])
def test_a_certificate_without_the_name_is_named_by_openssl_s_error(patterns, host, expected):
    assert mismatch_error(patterns, host, "example.com") == expected
