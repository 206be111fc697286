"""postscreen's pure parts: postscreen_dnsbl_sites entries (Postfix's syntax) and the bounded cache of passes."""
from __future__ import annotations

import pytest

from mailflow.dnsbl_sites import parse_dnsbl_site
from mailflow.stages.smtpd.postscreen import PassCache, _address, _logged


def test_a_site_with_filter_and_weight():
    site = parse_dnsbl_site("zen.spamhaus.org=127.0.0.[2..11;20]*3")
    assert (site.domain, site.weight) == ("zen.spamhaus.org", 3)
    assert [site.matches(f"127.0.0.{n}") for n in (1, 2, 11, 12, 20)] == [False, True, True, False, True]
    assert parse_dnsbl_site("list.dnswl.org=127.0.[0..255].[1..3]*-2").weight == -2
    assert parse_dnsbl_site("bl.test").matches("127.0.0.99") and parse_dnsbl_site("bl.test").weight == 1


@pytest.mark.parametrize("entry", ["bl.test=127.0.0", "bl.test=127.0.0.[3..2]", "bl.test=127.0.0.256",
                                   "bl.test*x", "bl.test=127.0.[1.2"])
def test_malformed_sites_are_refused(entry):
    with pytest.raises(ValueError):
        parse_dnsbl_site(entry)


def test_the_cache_keeps_unexpired_passes_and_drops_the_oldest_client():
    cache = PassCache(limit=2)
    cache.record("192.0.2.1", {"pregreet": 100.0, "dnsbl": 50.0}, 0.0)
    assert cache.passed("192.0.2.1", ("pregreet",), 60.0)
    assert not cache.passed("192.0.2.1", ("pregreet", "dnsbl"), 60.0)  # one test's pass has expired
    cache.record("192.0.2.2", {"pregreet": 100.0}, 0.0)
    cache.record("192.0.2.3", {"pregreet": 100.0}, 0.0)
    assert not cache.passed("192.0.2.1", ("pregreet",), 0.0)
    assert cache.passed("192.0.2.3", ("pregreet",), 0.0)


def test_beyond_its_bound_the_cache_drops_the_expired_then_the_least_recently_used():
    """A steady client that keeps passing (PASS OLD) outlives one-off clients; a client whose passes have all expired
    goes before any live one (Postfix's cache cleanup keeps the valid entries)."""
    cache = PassCache(limit=3)
    cache.record("192.0.2.1", {"pregreet": 1000.0, "pipelining": 3000.0}, 0.0)  # the steady sender
    for i in range(5):  # one-off clients, the steady one looked up between them
        assert cache.passed("192.0.2.1", ("pregreet", "pipelining"), 10.0)
        cache.record(f"2001:db8::{i}", {"pregreet": 1000.0}, 10.0)
    assert cache.passed("192.0.2.1", ("pregreet",), 10.0)
    assert cache.due("2001:db8::0", ("pregreet",), 10.0) is None
    cache.record("2001:db8::9", {"pregreet": 50.0}, 10.0)  # will expire first
    cache.record("192.0.2.7", {"pregreet": 2000.0}, 60.0)  # 2001:db8::9 expired by now: it goes, not the oldest
    assert cache.due("2001:db8::9", ("pregreet",), 60.0) is None
    assert cache.passed("2001:db8::4", ("pregreet",), 60.0) and cache.passed("192.0.2.7", ("pregreet",), 60.0)
    for i in range(100):  # the heap of expiries stays bounded however many records come
        cache.record("192.0.2.7", {"pregreet": 2000.0 + i}, 60.0)
    assert len(cache._expiries) <= 2 * 3 + 16


def test_a_client_is_complete_once_every_test_has_a_pass_expired_or_not():
    """Postfix's PSC_STATE_FLAG_NEW: a cached client that never passed one of the tests is still `PASS NEW`."""
    cache = PassCache(limit=10)
    cache.record("192.0.2.1", {"pregreet": 100.0, "pipelining": 0.0}, 0.0)
    assert cache.complete("192.0.2.1", ("pregreet", "pipelining"))
    assert not cache.complete("192.0.2.1", ("pregreet", "pipelining", "bare_newline"))
    assert not cache.complete("192.0.2.9", ("pregreet",))


@pytest.mark.parametrize("argument, address, logged", [
    ("<alice@example.test>", "alice@example.test", "alice@example.test"),
    (" <alice@example.test> SIZE=10", "alice@example.test", "alice@example.test"),
    ("bob@example.test SIZE=10", "bob@example.test", "bob@example.test"),
    ('<"a b"@example.test>', "a b@example.test", '"a b"@example.test'),
    ("<@relay.test,@other.test:carol@example.test>", "carol@example.test", "carol@example.test"),
    ("<>", "", ""),
])
def test_the_dummy_engine_takes_addresses_as_psc_extract_addr(argument, address, logged):
    assert _address(argument) == address
    assert _logged(address) == logged


def test_a_smaller_limit_drops_clients_at_once_the_expired_first():
    cache = PassCache(limit=3)
    cache.record("192.0.2.1", {"pregreet": 100.0}, 0.0)
    cache.record("192.0.2.2", {"pregreet": 10.0}, 0.0)
    cache.record("192.0.2.3", {"pregreet": 100.0}, 0.0)
    cache.resize(1, 50.0)
    assert cache.limit == 1
    assert [ip for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3") if cache.entry(ip)] == ["192.0.2.3"]
