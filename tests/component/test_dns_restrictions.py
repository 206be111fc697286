"""The DNS-based restriction items of Postfix's smtpd_check.c (reject_unknown_helo_hostname, check_*_{mx,ns,a}_access,
permit_mx_backup, permit_dnswl_client, permit_rhswl_client) on their own: their configuration checks, and the
restriction lists evaluated with a plain `Facts` value by mailflow's resolver asking an in-process DNS server
(ZoneAuthority) on loopback. Postfix cannot be pointed at a DNS server on a port, so the expected replies come
from its source (postfix-3.7.11 src/smtpd/smtpd_check.c, check_server_access); the SMTP-level behaviour is in
tests/e2e/test_smtpd_dns_restrictions.py."""
from __future__ import annotations

import asyncio
import sqlite3
import time
import logging

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.dns import MX, AiodnsResolver, StaticResolver
from mailflow.errors import ConfigError
from mailflow.routing.addressmap import AddressMapper
from mailflow.routing.rewrite import Rewriter
from mailflow.stages.smtpd.restrictions import Facts, Restrictions
from mailflow.stages.smtpd.server_checks import SERVER_LIMIT
from mailflow.stages.smtpd.tls import ClientCert
from mailflow.tables import TableCache

BASE = {"myhostname": "mx.mailflow.test", "mydestination": ["local.test"], "relay_domains": ["relay.test"],
        "mynetworks": [], "local_recipient_maps": ["inline:{alice=ok}"]}
ZONE = """
client.test.            300 IN MX    10 mx.bad-hoster.test.
mx.bad-hoster.test.     300 IN A     198.51.100.66
9.113.0.203.in-addr.arpa. 300 IN PTR ptr.unverified.test.
ptr.unverified.test.    300 IN NS    ns.bad-dns.test.
ns.bad-dns.test.        300 IN A     192.0.2.53
10.113.0.203.in-addr.arpa. 300 IN PTR 192.0.2.53.
"""
TABLE = "inline:{bad-hoster.test=REJECT, 192.0.2.53=REJECT}"


def restrictions(resolver, **smtpd) -> Restrictions:
    config = config_from_dict({**BASE, "smtpd": smtpd})
    rewriter = Rewriter(config)
    return Restrictions(config, config.smtpd, rewriter, AddressMapper(config, rewriter), resolver)


def facts(**kw) -> Facts:
    kw.setdefault("client_addr", "203.0.113.9")
    kw.setdefault("sender", "s@remote.example")
    kw.setdefault("helo", "helo.example")
    kw.setdefault("recipient", "alice@local.test")
    return Facts(**kw)


@pytest.fixture
async def resolver(dns_zone):
    nameserver = dns_zone(ZONE)
    dns = AiodnsResolver(nameservers=(nameserver,), timeout=2.0, tries=1)
    yield dns
    await dns.close()


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("items, reason", [
    (["check_helo_mx_access"], "[0]: 'check_helo_mx_access' needs an argument"),
    (["check_sender_ns_access hash:/etc/x"], "[0]: check_sender_ns_access: 'hash:/etc/x' is not a lookup table"),
    (["check_reverse_client_hostname_a_access inline:{a=OK b}"],
     "[0]: check_reverse_client_hostname_a_access: inline: 'b' is not key=value"),
    (["permit_dnswl_client"], "[0]: 'permit_dnswl_client' needs an argument"),
    (["check_reverse_client_hostname_access"], "[0]: 'check_reverse_client_hostname_access' needs an argument"),
    (["permit_rhswl_client list.test=high"],
     "[0]: permit_rhswl_client: 'list.test=high' is not a DNS allowlist (domain, or domain=d.d.d.d where each d is "
     "a number or [a..b] / [a;b;c], as 127.0.0.[2..11])"),
    (["reject_rbl_client bl.test=127.0.0.[2..300]"],
     "[0]: reject_rbl_client: 'bl.test=127.0.0.[2..300]' is not a DNSBL (domain, or domain=d.d.d.d"),
    (["reject_rbl_client bl.test="], "[0]: reject_rbl_client: 'bl.test=' is not a DNSBL"),  # Postfix: empty pattern
    (["reject_rbl_client bl.test=127.0.0.2;3"], "[0]: reject_rbl_client: 'bl.test=127.0.0.2;3' is not a DNSBL"),
    (["reject_rbl_client bl.test=127.0.0.\u0661\u0661"], "[0]: reject_rbl_client: 'bl.test=127.0.0.\u0661\u0661' is "
                                                        "not a DNSBL"),  # (no digit to Postfix's ISDIGIT)
    (["permit_mx_backup example.com"], "[0]: 'permit_mx_backup' takes no argument"),
    (["reject_unknown_helo_hostname yes"], "[0]: 'reject_unknown_helo_hostname' takes no argument"),
])
def test_a_misconfigured_dns_item_fails_naming_the_list_and_the_item(items, reason):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": {"recipient_restrictions": items}}, "main.toml")
    assert str(info.value).startswith(f"main.toml: smtpd.recipient_restrictions{reason}")


@pytest.mark.parametrize("smtpd, reason", [
    ({"log_access_permit_actions": ["hash:/etc/postfix/permits"]},
     "smtpd.log_access_permit_actions: 'hash:/etc/postfix/permits' is not a permit action name nor static:all "
     "(mailflow logs the permits of permit, permit_mynetworks, permit_sasl_authenticated, permit_tls_clientcerts, "
     "permit_tls_all_clientcerts, permit_dnswl_client, permit_rhswl_client, permit_mx_backup, "
     "permit_auth_destination, permit_naked_ip_address, permit_inet_interfaces, check_relay_domains and the access "
     "values OK, RELAY, DISCARD, <digits>)"),
    ({"permit_mx_backup_networks": ["10.0.0.1/8"]}, "smtpd.permit_mx_backup_networks"),
    ({"unknown_helo_hostname_tempfail_action": "reject"}, "smtpd.unknown_helo_hostname_tempfail_action"),
])
def test_the_new_settings_are_checked(smtpd, reason):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": smtpd}, "main.toml")
    assert str(info.value).startswith(f"main.toml: {reason}")


async def test_log_access_permit_actions_takes_postfixs_names_and_static_all(caplog):
    # a converted main.cf loads: static:all (Postfix's documented example) logs every permit, a permit name
    # mailflow does not know is warned of
    resolver = StaticResolver(addresses={"9.113.0.203.wl.test": ["127.0.0.2"]})
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        r = restrictions(resolver, client_restrictions=["permit_dnswl_client wl.test", "reject"],
                         log_access_permit_actions=["static:all"])
        assert await r.check_rcpt(facts()) is None
        restrictions(resolver, log_access_permit_actions=["permit_no_such", "PERMIT_MYNETWORKS", "ok"])
    assert ("log_access_permit_actions: the permits of permit_no_such are not logged (mailflow logs those "
            "of permit, permit_mynetworks, permit_sasl_authenticated, permit_tls_clientcerts, "
            "permit_tls_all_clientcerts, permit_dnswl_client, permit_rhswl_client, permit_mx_backup, "
            "permit_auth_destination, permit_naked_ip_address, permit_inet_interfaces, check_relay_domains, and access "
            "actions: OK, RELAY, DISCARD, <digits>)"
            ) in caplog.messages
    assert [m for m in caplog.messages if "action=permit_dnswl_client" in m]


def test_every_postfix_server_access_name_is_known():
    names = [f"check_{who}_{rr}_access inline:{{x=DUNNO}}" for who in
             ("client", "reverse_client_hostname", "helo", "sender", "recipient") for rr in ("mx", "ns", "a")]
    config = config_from_dict({"smtpd": {"client_restrictions": names}})
    assert len(config.smtpd.client_restrictions) == 15


# ---------------------------------------------------------------------------------------------- the client's names


async def test_client_mx_access_names_the_client_as_postfix_does(resolver):
    r = restrictions(resolver, client_restrictions=[f"check_client_mx_access {TABLE}"])
    assert await r.check_rcpt(facts(client_name="client.test")) == \
        status.access_denied("client.test[203.0.113.9]", "Client host")
    assert await r.check_rcpt(facts(client_name="unknown")) is None  # no (verified) name: nothing asked


async def test_reverse_client_ns_access_asks_about_the_unverified_name(resolver):
    r = restrictions(resolver, client_restrictions=[f"check_reverse_client_hostname_ns_access {TABLE}"])
    assert await r.check_rcpt(facts()) == status.access_denied("ptr.unverified.test", "Unverified Client host")


# ---------------------------------------------------------------------------------------------- bounds


async def test_mx_hosts_past_postfixs_list_limit_are_dropped_with_its_warning(caplog):
    hosts = [f"mx{i}.many.test" for i in range(SERVER_LIMIT + 1)]
    resolver = StaticResolver(mx={"many.test": [MX(10, h) for h in hosts]}, addresses={h: [] for h in hosts})
    r = restrictions(resolver, sender_restrictions=[f"check_sender_mx_access inline:{{{hosts[-1]}=REJECT}}"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert await r.check_rcpt(facts(sender="x@many.test")) is None
    assert "DNS record count limit (100) exceeded -- dropping excess record(s) after qname=many.test qtype=MX" \
        in caplog.messages
    r = restrictions(resolver, sender_restrictions=[f"check_sender_mx_access inline:{{{hosts[-2]}=REJECT}}"])
    assert await r.check_rcpt(facts(sender="x@many.test")) == status.access_denied("x@many.test", "Sender address")


async def test_a_numeric_ptr_name_is_no_reverse_client_name(resolver):
    # Postfix's sockaddr_to_hostname refuses a numeric name: the reverse client name is `unknown`
    r = restrictions(resolver, client_restrictions=["check_reverse_client_hostname_access "
                                                    "inline:{192.0.2.53=REJECT, { unknown = REJECT unknown name }}"])
    assert await r.check_rcpt(facts(client_addr="203.0.113.10")) == \
        status.access_denied("unknown", "Unverified Client host", "unknown name")


async def test_server_addresses_past_postfixs_list_limit_are_ignored_with_a_warning(caplog):
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(SERVER_LIMIT + 1)]
    resolver = StaticResolver(mx={"many.test": [MX(10, "big.test")]}, addresses={"big.test": addresses})
    last = addresses[-1]
    r = restrictions(resolver, sender_restrictions=[f"check_sender_mx_access inline:{{{last}=REJECT}}"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert await r.check_rcpt(facts(sender="x@many.test")) is None
    assert "check_server_access: MX server address count limit (100) exceeded for Sender address x@many.test -- " \
           "ignoring the remainder" in caplog.messages
    r = restrictions(resolver, sender_restrictions=[f"check_sender_mx_access inline:{{{addresses[-2]}=REJECT}}"])
    assert await r.check_rcpt(facts(sender="x@many.test")) == status.access_denied("x@many.test", "Sender address")


# ---------------------------------------------------------------------------------------------- bounds

SLOW_HOSTS = [f"s{i}.slow.test" for i in range(SERVER_LIMIT)]
SLOW_ZONE = "slow.test. 300 IN MX 10 primary.slow.test.\nprimary.slow.test. 300 IN A 192.0.2.200\n" + \
    "".join(f"slow.test. 300 IN MX 20 {h}.\n{h}. 300 IN A 192.0.2.{i}\n" for i, h in enumerate(SLOW_HOSTS))


def slow_restrictions(resolver, **smtpd) -> Restrictions:
    config = config_from_dict({**BASE, "dns": {"timeout": "1s", "tries": 1}, "smtpd": smtpd})
    rewriter = Rewriter(config)
    return Restrictions(config, config.smtpd, rewriter, AddressMapper(config, rewriter), resolver)


@pytest.fixture
async def slow_resolver(dns_zone):
    dns = AiodnsResolver(nameservers=(dns_zone(SLOW_ZONE, slow=tuple(SLOW_HOSTS), delay=0.3),), timeout=1.0, tries=1)
    yield dns
    await dns.close()


async def test_a_server_check_takes_three_lookups_time_at_most(slow_resolver, caplog):
    # 100 MX hosts answering in 0.3 s each: ~30 s one after the other; the check gives up after 3 x 1 s
    r = slow_restrictions(slow_resolver, sender_restrictions=["check_sender_mx_access inline:{192.0.2.99=REJECT}"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        async with asyncio.timeout(8):
            assert await r.check_rcpt(facts(sender="x@slow.test")) is None
    assert "check_server_access: MX lookups for Sender address x@slow.test took over 3s -- ignoring the remainder" \
        in caplog.messages


async def test_permit_mx_backup_past_its_time_defers_the_refusal(slow_resolver, caplog):
    r = slow_restrictions(slow_resolver, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        async with asyncio.timeout(8):
            reply = await r.check_rcpt(Facts(client_addr="203.0.113.9", sender="s@remote.example", helo="h.example",
                                             recipient="x@slow.test"))
    assert str(reply) == "450 4.4.4 <x@slow.test>: Recipient address rejected: Unable to look up mail exchanger " \
                         "information: Host not found, try again"
    assert "permit_mx_backup: lookups for slow.test took over 3s" in caplog.messages


class CountingResolver(StaticResolver):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.asked: list[str] = []

    async def mx(self, domain: str):
        self.asked.append(f"MX {domain}")
        return await super().mx(domain)

    async def addresses(self, host: str):
        self.asked.append(f"A {host}")
        return await super().addresses(host)


async def test_the_servers_answers_are_kept_for_the_session():
    # delay_reject runs the sender list again at each RCPT: the DNS is asked once per session (failures too)
    resolver = CountingResolver(mx={"two.test": [MX(10, "a.two.test"), MX(20, "gone.two.test")]},
                                addresses={"a.two.test": ["192.0.2.1"]})
    r = restrictions(resolver, sender_restrictions=["check_sender_mx_access inline:{192.0.2.99=REJECT}"])
    session = facts(sender="x@two.test")
    for rcpt in ("alice@local.test", "alice@local.test"):
        session.recipient = rcpt
        assert await r.check_rcpt(session) is None
    assert sorted(resolver.asked) == ["A a.two.test", "A gone.two.test", "MX two.test"]


async def test_a_server_check_asks_each_key_once(monkeypatch):
    # 100 MX hosts of one long domain share their parent domains: each key is asked once in the check
    suffix = ".".join(["l"] * 50) + ".evil.test"
    hosts = [f"h{i}.{suffix}" for i in range(SERVER_LIMIT)]
    resolver = StaticResolver(mx={"evil.test": [MX(10, h) for h in hosts]}, addresses={h: [] for h in hosts})
    spec = "inline:{x.test=REJECT}"
    cache = TableCache()
    [table] = cache.open([spec])
    asked: list[str] = []

    def lookup(key: str, original=table.lookup):
        asked.append(key)
        return original(key)
    monkeypatch.setattr(table, "lookup", lookup)
    config = config_from_dict({**BASE, "smtpd": {"sender_restrictions": [f"check_sender_mx_access {spec}"]}})
    rewriter = Rewriter(config)
    r = Restrictions(config, config.smtpd, rewriter, AddressMapper(config, rewriter), resolver, cache)
    assert await r.check_rcpt(facts(sender="x@evil.test")) is None
    assert len(asked) == len(set(asked)) == SERVER_LIMIT + 52  # the hosts, and their 52 parent domains once


@pytest.fixture
def locked_sqlite(tmp_path):
    """A sqlite: table (its .cf: a 1 s timeout) whose database another connection holds locked."""
    db = tmp_path / "access.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE access (k TEXT PRIMARY KEY, v TEXT)")
    holder.execute("BEGIN EXCLUSIVE")
    cf = tmp_path / "access.cf"
    cf.write_text(f"dbpath = {db}\nquery = SELECT v FROM access WHERE k='%s'\ntimeout = 1\n")
    yield f"sqlite:{cf}"
    holder.execute("ROLLBACK")
    holder.close()


async def longest_stall(work) -> tuple[object, float]:
    """What `work` returns, and the longest the event loop was held while it ran (seconds)."""
    done, longest = False, 0.0

    async def ticker():
        nonlocal longest
        last = time.monotonic()
        while not done:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await work
    finally:
        done = True
        await ticking
    return result, longest


@pytest.mark.parametrize("item", ["check_client_access", "check_sender_mx_access"])
async def test_a_locked_sqlite_access_table_holds_no_other_session(locked_sqlite, item):
    resolver = StaticResolver(mx={"remote.example": [MX(10, "mx.remote.example")]},
                              addresses={"mx.remote.example": ["192.0.2.7"]})
    r = restrictions(resolver, sender_restrictions=[f"{item} {locked_sqlite}"])
    reply, stall = await longest_stall(r.check_rcpt(facts(sender="x@remote.example")))
    assert reply is not None and reply.code == 451  # the table cannot answer: Postfix's 451 4.3.5
    assert stall < 0.5  # the query waited for the lock in a worker thread


CERT = ClientCert("client.test", "ca.test", "AA:BB", "CC:DD")
# (the item, its table's setting, the facts: each asks its sqlite table only when the table cannot answer quickly)
LOCKED_LOOKUPS = {
    "permit_tls_clientcerts": ({"relay_clientcerts": "{}"}, {"client_cert": CERT, "encryption_protocol": "TLSv1.3"}),
    "reject_sender_login_mismatch": ({"sender_login_maps": "{}", "sasl_auth_enable": True,
                                      "sasl_user_maps": ["inline:{alice=x}"]}, {"sasl_username": "alice"}),
}


@pytest.mark.parametrize("item", sorted(LOCKED_LOOKUPS))
async def test_a_locked_sqlite_table_of_an_item_holds_no_other_session(locked_sqlite, item):
    """relay_clientcerts and sender_login_maps are asked through TableCache.run, as the access tables are: a locked
    database holds up only the session that asks it. (A network list takes no sqlite table: networks.py.)"""
    settings, session = LOCKED_LOOKUPS[item]
    settings = {k: [locked_sqlite] if v == "{}" else v for k, v in settings.items()}
    r = restrictions(StaticResolver(), recipient_restrictions=[item, "reject"], **settings)
    _, stall = await longest_stall(r.check_rcpt(facts(**session)))
    assert stall < 0.5  # the query waited for the lock in a worker thread
