"""The DNS-based restrictions of Postfix's smtpd_check.c through a real mailflow over SMTP, its resolver asking an
in-process DNS server (tests/support/peers.py ZoneAuthority) on loopback: reject_unknown_helo_hostname,
check_*_{mx,ns,a}_access, check_reverse_client_hostname_access, permit_mx_backup (with
permit_mx_backup_networks), permit_dnswl_client and permit_rhswl_client, reject_unknown_client_hostname and
reject_unknown_reverse_client_hostname, reject_unknown_sender_domain and reject_unknown_recipient_domain.

Postfix cannot be pointed at a DNS server on a port, so its replies and log lines here are taken from its source
(postfix-3.7.11 src/smtpd/smtpd_check.c: reject_unknown_client / _reverse_name with smtpd_peer.c's name statuses,
reject_unknown_hostname, reject_unknown_mailhost (DEFER_IF_PERMIT2 with
unknown_address_tempfail_action), check_server_access, forbid_allowlist,
permit_mx_backup / i_am_mx / all_auth_mx_addr, permit_dnswl_addr / permit_dnswl_domain, smtpd_acl_permit;
smtpd_check_reject makes the enhanced code's class the reply code's)."""
from __future__ import annotations

import logging

import pytest

from mailflow import status
from mailflow.config import load_config
from mailflow.errors import ConfigError
from tests.support import SmtpClient

ZONE = """
known.test.             300 IN A     192.0.2.1
mxonly.test.            300 IN MX    10 mx.known.test.
mx.known.test.          300 IN A     192.0.2.2
spam.test.              300 IN MX    10 mx.bad-hoster.test.
mx.bad-hoster.test.     300 IN A     198.51.100.66
implicit.test.          300 IN A     203.0.113.77
nullmx.test.            300 IN MX    0 .
nullmx.test.            300 IN A     203.0.113.77
nsdomain.test.          300 IN NS    ns1.bad-dns.test.
sub.nsdomain.test.      300 IN A     192.0.2.9
ns1.bad-dns.test.       300 IN A     192.0.2.53
allowed.test.           300 IN MX    10 mx.allowed.test.
mx.allowed.test.        300 IN A     192.0.2.3
backup.test.            300 IN MX    10 primary.other.test.
backup.test.            300 IN MX    20 mine.test.
named.test.             300 IN MX    10 primary.other.test.
named.test.             300 IN MX    20 localhost.
best.test.              300 IN MX    10 mine.test.
best.test.              300 IN MX    20 primary.other.test.
notmx.test.             300 IN MX    10 primary.other.test.
outside.test.           300 IN MX    10 primary.outside.test.
outside.test.           300 IN MX    20 mine.test.
lost.test.              300 IN MX    10 primary.other.test.
lost.test.              300 IN MX    20 gone.test.
primary.other.test.     300 IN A     192.0.2.10
primary.outside.test.   300 IN A     198.51.100.10
mine.test.              300 IN A     127.0.0.1
1.0.0.127.wl.test.      300 IN A     127.0.0.2
1.0.0.127.in-addr.arpa. 300 IN PTR   client.known.test.
client.known.test.      300 IN A     127.0.0.1
client.known.test.rhswl.test. 300 IN A 127.0.0.2
given.test.rhswl.test.  300 IN A     127.0.0.2
"""
RELAY_FROM_HERE = ["check_client_access inline:{127.0.0.1=OK}", "reject"]  # (the test client relays)
MANY_REFUSALS = {"error_sleep_time": 0, "hard_error_limit": 1000}  # (one session meets them all, unhurried)
SERVFAIL = ("broken.test", "nsfail.test", "wl-broken.test", "1.0.0.127.wl-broken.test",
            "client.known.test.wl-broken.test")
ACCESS = """
mx.allowed.test   OK
bad-hoster.test   REJECT bad mail exchanger
203.0.113.77      REJECT implicit MX
bad-dns.test      REJECT bad name server
192.0.2.1         REJECT that address
"""


async def dns_checked(mailflow_server, nameserver: str, **settings) -> int:
    """The SMTP port of a mailflow server with `settings` asking `nameserver` (2 s, one try)."""
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1}, **settings)
    return mf.smtp_addresses[0][1]


async def start(mailflow_server, dns_zone, **smtpd):
    return await dns_checked(mailflow_server, dns_zone(ZONE, servfail=SERVFAIL), smtpd=smtpd)


async def rcpt(port: int, rcpt_to: str = "alice@local.test", sender: str = "s@remote.test",
               helo: str = "client.test") -> tuple[int | None, str]:
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd(f"EHLO {helo}")).code == 250
        mail = await client.cmd(f"MAIL FROM:<{sender}>")
        if mail.code != 250:
            return mail
        return await client.cmd(f"RCPT TO:<{rcpt_to}>")
    finally:
        await client.close()


def said(reply: status.Reply) -> tuple[int, str]:
    return reply.code, str(reply)


def access_file(tmp_path) -> str:
    path = tmp_path / "server_access"
    path.write_text(ACCESS)
    return f"texthash:{path}"


# ---------------------------------------------------------------------------------------------- the HELO name


async def test_a_helo_name_without_address_or_mx_is_refused_as_postfix_does(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, helo_restrictions=["reject_unknown_helo_hostname"])
    assert (await rcpt(port, helo="known.test"))[0] == 250
    assert (await rcpt(port, helo="mxonly.test"))[0] == 250  # an MX record is enough
    assert (await rcpt(port, helo="[192.0.2.1]"))[0] == 250  # an address literal: only its syntax counts
    assert await rcpt(port, helo="nowhere.test") == (450, "450 4.7.1 <nowhere.test>: Helo command rejected: Host "
                                                          "not found")
    assert await rcpt(port, helo="192.0.2.1") == (450, "450 4.7.1 <192.0.2.1>: Helo command rejected: Host not found")
    assert await rcpt(port, helo="[not.an.address]") == \
        (501, "501 5.5.2 <[not.an.address]>: Helo command rejected: invalid ip address")
    assert (await rcpt(port, helo="[IPv6:2001:db8::1]"))[0] == 250
    assert (await rcpt(port, helo="[2001:db8::1]"))[0] == 501  # (an IPv6 literal needs its tag)


async def test_the_unknown_hostname_code_sets_the_class_and_a_dns_failure_defers_if_permitted(mailflow_server,
                                                                                            dns_zone):
    port = await start(mailflow_server, dns_zone, unknown_hostname_reject_code=550,
                       helo_restrictions=["reject_unknown_hostname"],  # (the old name, which Postfix takes too)
                       recipient_restrictions=["check_recipient_access inline:{no@local.test=REJECT}"])
    assert await rcpt(port, helo="nowhere.test") == (550, "550 5.7.1 <nowhere.test>: Helo command rejected: Host "
                                                          "not found")
    # the DNS cannot tell: 450 if the rest permits (DEFER_IF_PERMIT), a later refusal wins
    assert await rcpt(port, helo="broken.test") == (450, "450 4.7.1 <broken.test>: Helo command rejected: Host not "
                                                         "found")
    assert await rcpt(port, "no@local.test", helo="broken.test") == \
        said(status.access_denied("no@local.test", "Recipient address"))


async def test_a_malformed_helo_name_is_not_found_not_a_dns_failure(mailflow_server, dns_zone):
    # c-ares will not ask about it; Postfix's dns_lookup answers DNS_NOTFOUND for a name that is not valid_hostname
    port = await start(mailflow_server, dns_zone, unknown_hostname_reject_code=550,
                       helo_restrictions=["reject_unknown_helo_hostname"])
    for helo in ("a..test", "a" * 64 + ".test"):
        assert await rcpt(port, helo=helo) == (550, f"550 5.7.1 <{helo}>: Helo command rejected: Host not found")


async def test_the_tempfail_action_defer_defers_at_once(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, unknown_helo_hostname_tempfail_action="defer",
                       helo_restrictions=["reject_unknown_helo_hostname"],
                       recipient_restrictions=["check_recipient_access inline:{no@local.test=REJECT}"])
    assert await rcpt(port, "no@local.test", helo="broken.test") == \
        (450, "450 4.7.1 <broken.test>: Helo command rejected: Host not found")


# ---------------------------------------------------------------------------------------------- the client's name

CLIENT_ITEMS = ("reject_unknown_client_hostname", "reject_unknown_reverse_client_hostname")


async def client_name_replies(mailflow_server, dns_zone, zone: str, servfail=()) -> list[tuple[int, str]]:
    """The RCPT replies under each of CLIENT_ITEMS alone, with unknown_client_reject_code 550."""
    nameserver = dns_zone(zone, servfail=servfail)
    said_by = []
    for item in CLIENT_ITEMS:
        mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                                   smtpd={"unknown_client_reject_code": 550, "client_restrictions": [item]})
        said_by.append(tuple(await rcpt(mf.smtp_addresses[0][1])))
        await mf.stop()
    return said_by


async def test_a_client_without_a_name_gets_the_unknown_client_code_and_postfixs_enhanced_codes(mailflow_server,
                                                                                                dns_zone):
    """Postfix's reject_unknown_client answers 4.7.25 (RFC 7372), its reject_unknown_reverse_name 4.7.1, both
    with unknown_client_reject_code for a name that is not there (mailflow answered 4.7.1, and always 450)."""
    no_ptr = '0.0.0.127.in-addr.arpa. 300 IN TXT "nothing here"\n'
    assert await client_name_replies(mailflow_server, dns_zone, no_ptr) == [
        (550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
        (550, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]")]
    forged = "1.0.0.127.in-addr.arpa. 300 IN PTR elsewhere.test.\nelsewhere.test. 300 IN A 192.0.2.1\n"
    assert await client_name_replies(mailflow_server, dns_zone, forged) == [
        (550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"), (250, "250 2.1.5 Ok")]


async def test_only_the_first_ptr_name_can_be_the_client_s_verified_name(mailflow_server, dns_zone):
    """A private Postfix 3.7.11 (its resolver pointed at a server giving 127.0.0.1 the PTR names elsewhere.test,
    then client.ok.test, which leads back) answered 550 5.7.25 "cannot find your hostname" and logged "warning:
    hostname elsewhere.test does not resolve to address 127.0.0.1": smtpd_peer takes the one name getnameinfo
    gives. The names the other way round: 250. mailflow verified the client by its second PTR name."""
    both = ("1.0.0.127.in-addr.arpa. 300 IN PTR {}.\n1.0.0.127.in-addr.arpa. 300 IN PTR {}.\n"
            "elsewhere.test. 300 IN A 192.0.2.1\nclient.known.test. 300 IN A 127.0.0.1\n")
    assert await client_name_replies(mailflow_server, dns_zone, both.format("elsewhere.test", "client.known.test")) == [
        (550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"), (250, "250 2.1.5 Ok")]
    assert await client_name_replies(mailflow_server, dns_zone, both.format("client.known.test", "elsewhere.test")) == [
        (250, "250 2.1.5 Ok"), (250, "250 2.1.5 Ok")]


async def test_an_ipv4_client_s_name_is_asked_for_a_records_only(mailflow_server, dns_zone):
    """The same private Postfix (hostname_to_sockaddr_pf in the client's family): a PTR name without A records whose
    AAAA lookup fails is 550 5.7.25 ("No address associated with hostname"); one whose A lookup fails though it has
    an AAAA is 450 4.7.25 ("Temporary failure in name resolution"). mailflow asked A and AAAA and said the other."""
    zone = ("1.0.0.127.in-addr.arpa. 300 IN PTR {}.\nv6fail.test. 300 IN TXT \"no A\"\n"
            "v6only.test. 300 IN AAAA ::1\n")
    servfail = ("v6fail.test/AAAA", "v6only.test/A")
    assert (await client_name_replies(mailflow_server, dns_zone, zone.format("v6fail.test"), servfail))[0] == \
        (550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]")
    assert (await client_name_replies(mailflow_server, dns_zone, zone.format("v6only.test"), servfail))[0] == \
        (450, "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]")


async def test_a_numeric_or_malformed_first_ptr_name_is_no_reverse_name(mailflow_server, dns_zone):
    """The same private Postfix with the PTR names bad-.example.test (then client.ok.test), or 192.0.2.7: "warning:
    valid_hostname: misplaced hyphen: bad-.example.test" (or "numeric hostname: 192.0.2.7"), the client unknown,
    refused by both checks (sockaddr_to_hostname answers EAI_NONAME: a permanent status). mailflow took the PTR name
    as a reverse name."""
    for first in ("bad-.example.test.", "192.0.2.7."):
        zone = (f"1.0.0.127.in-addr.arpa. 300 IN PTR {first}\n1.0.0.127.in-addr.arpa. 300 IN PTR client.known.test.\n"
                "client.known.test. 300 IN A 127.0.0.1\n")
        assert await client_name_replies(mailflow_server, dns_zone, zone) == [
            (550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
            (550, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]")], first


async def test_a_client_name_the_dns_cannot_tell_is_450_whatever_the_code(mailflow_server, dns_zone, caplog):
    """smtpd_peer.c: a temporary failure is SMTPD_PEER_CODE_TEMP, and reject_unknown_client / _reverse_name
    answer it 450 at once (no tempfail action), the forward lookup's failure too."""
    assert await client_name_replies(mailflow_server, dns_zone, "", servfail=("1.0.0.127.in-addr.arpa",)) == [
        (450, "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
        (450, "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]")]
    forward_fails = "1.0.0.127.in-addr.arpa. 300 IN PTR broken.test.\n"
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert await client_name_replies(mailflow_server, dns_zone, forward_fails, servfail=("broken.test",)) == [
            (450, "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"), (250, "250 2.1.5 Ok")]
    # the lookup error names the lookup that failed (it said the connect warning again)
    assert "127.0.0.1: lookup error: Name service error for name=broken.test type=A: Host not found, try again" \
        in caplog.messages


async def test_without_peername_lookup_the_name_checks_see_unknown_and_ask_no_dns(mailflow_server, dns_zone):
    """postfix-3.7.11 smtpd_peer.c: smtpd_peername_lookup = no makes state->name and state->reverse_name "unknown",
    their status SMTPD_PEER_CODE_PERM: reject_unknown_client_hostname and _reverse_client_hostname refuse with
    unknown_client_reject_code, the RHS lists skip "unknown". mailflow's name checks asked the DNS all the same and
    passed a client whose name leads back to its address."""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ZONE, asked=asked)
    said_by = []
    for item in (*CLIENT_ITEMS, "permit_rhswl_client rhswl.test",
                 "check_reverse_client_hostname_access inline:{client.known.test=REJECT}"):
        mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                                   smtpd={"peername_lookup": False, "unknown_client_reject_code": 550,
                                          "client_restrictions": [item, "reject"] if "rhswl" in item else [item]})
        said_by.append(tuple(await rcpt(mf.smtp_addresses[0][1])))
        await mf.stop()
    assert said_by == [(550, "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
                       (550, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]"),
                       said(status.access_denied("unknown[127.0.0.1]", "Client host")),
                       (250, "250 2.1.5 Ok")]
    assert not [q for q in asked if q[1] == "PTR" or "known.test" in q[0]], asked


# ---------------------------------------------------------------------------------------------- server access


async def test_mx_access_asks_the_table_with_each_mx_host_and_its_addresses(mailflow_server, dns_zone, tmp_path):
    table = access_file(tmp_path)
    port = await start(mailflow_server, dns_zone, sender_restrictions=[f"check_sender_mx_access {table}"])
    # the MX host's parent domain
    assert await rcpt(port, sender="x@spam.test") == \
        (554, "554 5.7.1 <x@spam.test>: Sender address rejected: bad mail exchanger")
    # no MX: the name is its own MX host, and its address is asked
    assert await rcpt(port, sender="x@implicit.test") == \
        (554, "554 5.7.1 <x@implicit.test>: Sender address rejected: implicit MX")
    assert (await rcpt(port, sender="x@nullmx.test"))[0] == 250  # a null MX: nothing is asked
    assert (await rcpt(port, sender="x@mxonly.test"))[0] == 250  # (mx.known.test and 192.0.2.2 are not listed)
    assert (await rcpt(port, sender="x@[192.0.2.1]"))[0] == 554  # an address literal is its own MX host
    assert (await rcpt(port, sender="x@broken.test"))[0] == 250  # the DNS cannot tell: no opinion
    assert (await rcpt(port, sender=""))[0] == 250  # the null sender has no domain


async def test_an_ok_from_a_server_access_table_is_a_configuration_error(mailflow_server, dns_zone, tmp_path, caplog):
    table = access_file(tmp_path)
    port = await start(mailflow_server, dns_zone, sender_restrictions=[f"check_sender_mx_access {table}"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert await rcpt(port, sender="x@allowed.test") == (451, "451 4.3.5 Server configuration error")
    warned = [r.getMessage() for r in caplog.records if r.name == "mailflow.smtpd" and r.levelno == logging.WARNING]
    assert warned[-3:] == ["restriction check_sender_mx_access returns OK for x@allowed.test",
                           "this is not allowed for security reasons",
                           "use DUNNO instead of OK if you want to make an exception"]


async def test_ns_access_walks_up_to_the_parent_with_name_servers(mailflow_server, dns_zone, tmp_path, caplog):
    table = access_file(tmp_path)
    port = await start(mailflow_server, dns_zone, helo_restrictions=[f"check_helo_ns_access {table}"])
    assert await rcpt(port, helo="sub.nsdomain.test") == \
        (554, "554 5.7.1 <sub.nsdomain.test>: Helo command rejected: bad name server")
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert (await rcpt(port, helo="known.test"))[0] == 250
        assert (await rcpt(port, helo="a.nsfail.test"))[0] == 250
    assert caplog.messages == ["Unable to look up NS host for known.test: Host not found",
                               "Unable to look up NS host for nsfail.test: Host not found, try again"]


async def test_a_access_asks_the_names_addresses_only(mailflow_server, dns_zone, tmp_path):
    table = access_file(tmp_path)
    port = await start(mailflow_server, dns_zone, helo_restrictions=[f"check_helo_a_access {table}"])
    assert await rcpt(port, helo="known.test") == (554, "554 5.7.1 <known.test>: Helo command rejected: that "
                                                        "address")
    assert (await rcpt(port, helo="mx.bad-hoster.test"))[0] == 250  # a name key is not asked for "A"


async def test_a_failing_mx_lookup_is_logged_in_postfix_words(mailflow_server, dns_zone, tmp_path, caplog):
    table = access_file(tmp_path)
    port = await start(mailflow_server, dns_zone, helo_restrictions=[f"check_helo_mx_access {table}"])
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        assert (await rcpt(port, helo="broken.test"))[0] == 250
    assert "Unable to look up MX host for broken.test: Host not found, try again" in caplog.messages


async def test_reverse_client_hostname_access_asks_the_ptr_name_and_may_not_permit(mailflow_server, dns_zone):
    table = "inline:{known.test=REJECT}"  # (a parent domain of the PTR name)
    port = await start(mailflow_server, dns_zone, client_restrictions=[f"check_reverse_client_hostname_access {table}"])
    assert await rcpt(port) == said(status.access_denied("client.known.test", "Unverified Client host"))


async def test_reverse_client_hostname_access_refuses_an_ok(mailflow_server, dns_zone):
    table = "inline:{client.known.test=OK}"
    port = await start(mailflow_server, dns_zone, client_restrictions=[f"check_reverse_client_hostname_access {table}"])
    assert await rcpt(port) == (451, "451 4.3.5 Server configuration error")


# ---------------------------------------------------------------------------------------------- MX backup


async def test_permit_mx_backup_relays_for_domains_this_host_is_a_backup_mx_of(mailflow_server, dns_zone, caplog):
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"],
                       log_access_permit_actions=["permit_mx_backup"])
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        assert (await rcpt(port, "x@backup.test"))[0] == 250  # by address: mine.test is 127.0.0.1, a listener's
    assert (await rcpt(port, "x@named.test"))[0] == 250  # by name: localhost is in mydestination
    assert (await rcpt(port, "x@relay.test"))[0] == 250  # a relay domain
    assert await rcpt(port, "x@best.test") == said(status.relay_denied("x@best.test"))  # the best MX: no
    assert await rcpt(port, "x@notmx.test") == said(status.relay_denied("x@notmx.test"))
    assert await rcpt(port, "x@[192.0.2.1]") == said(status.relay_denied("x@[192.0.2.1]"))
    permits = [m.partition(": ")[2] for m in caplog.messages if ": permit: " in m]
    assert permits == ["permit: RCPT from localhost[127.0.0.1]: action=permit_mx_backup for Recipient "
                       "address=x@backup.test ; from=<s@remote.test> to=<x@backup.test> proto=ESMTP helo=<client.test>"]


async def test_permit_mx_backup_asks_about_the_recipient_as_resolved(mailflow_server, dns_zone):
    # Postfix's permit_mx_backup resolves the address first (compared with a private Postfix 3.7.11: 554 for both):
    # `user%victim.example` is user@victim.example, `user` is user@myorigin (mx.mailflow.test, not local here)
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"])
    for recipient in ("user%victim.example", "user"):
        assert await rcpt(port, recipient) == said(status.relay_denied(recipient))
    assert (await rcpt(port, "alice%local.test"))[0] == 250  # alice@local.test: a local domain's


async def test_permit_mx_backup_refuses_routed_recipients(mailflow_server, dns_zone):
    # Postfix's RESOLVE_FLAG_ROUTED (allow_untrusted_routing = no): the primary MX would relay to victim.example
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"])
    for recipient, named in (("user%victim.example@backup.test",) * 2, ("victim.example!user@backup.test",) * 2,
                             ('"user@victim.example"@backup.test', "user@victim.example@backup.test")):
        assert await rcpt(port, recipient) == said(status.relay_denied(named))  # (named in the internal form)
    assert (await rcpt(port, "user@backup.test"))[0] == 250


async def test_permit_mx_backup_networks_must_hold_the_best_mx_hosts(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"],
                       permit_mx_backup_networks=["192.0.2.0/24"])
    assert (await rcpt(port, "x@backup.test"))[0] == 250
    assert await rcpt(port, "x@outside.test") == said(status.relay_denied("x@outside.test"))


async def test_an_mx_lookup_failure_turns_the_relay_refusal_into_a_deferral(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_mx_backup", "reject_unauth_destination"])
    assert await rcpt(port, "x@broken.test") == \
        (450, "450 4.4.4 <x@broken.test>: Recipient address rejected: Unable to look up mail exchanger information: "
              "Host not found, try again")
    assert await rcpt(port, "x@lost.test") == \
        (450, "450 4.4.4 <x@lost.test>: Recipient address rejected: Unable to look up mail exchanger host gone.test: "
              "Name or service not known")


async def test_an_mx_reply_naming_no_host_or_formerr_is_no_reason_to_defer_a_relay_refusal(mailflow_server,
                                                                                              dns_zone):
    """Postfix's permit_mx_backup turns a refusal into a deferral only for DNS_RETRY (and DNS_POLICY); DNS_INVAL (a
    reply naming no host) and DNS_FAIL (FORMERR) are DUNNO: reject_unauth_destination's 554 stands. mailflow
    deferred."""
    nameserver = dns_zone(ZONE + "badmx.test. 300 IN MX 10 bad-.example.test.\n", rcodes={"formerr.test": "FORMERR"})
    port = await dns_checked(mailflow_server, nameserver,
                             smtpd={"relay_restrictions": ["permit_mx_backup", "reject_unauth_destination"]})
    for domain in ("badmx.test", "formerr.test"):
        assert await rcpt(port, f"x@{domain}") == \
            (554, f"554 5.7.1 <x@{domain}>: Relay access denied"), domain


# ---------------------------------------------------------------------------------------------- DNS allowlists


async def test_a_client_on_a_dns_allowlist_is_permitted_and_logged(mailflow_server, dns_zone, caplog):
    port = await start(mailflow_server, dns_zone, client_restrictions=["permit_dnswl_client wl.test", "reject"],
                       log_access_permit_actions=["permit_dnswl_client"])
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        assert (await rcpt(port))[0] == 250
    permits = [m.partition(": ")[2] for m in caplog.messages if ": permit: " in m]
    assert permits == ["permit: RCPT from localhost[127.0.0.1]: action=permit_dnswl_client for Client "
                       "host=localhost[127.0.0.1] ; from=<s@remote.test> to=<alice@local.test> proto=ESMTP "
                       "helo=<client.test>"]
    # never for a recipient this host would not take without it (no relaying for an allowlisted client)
    assert await rcpt(port, "x@elsewhere.test") == said(status.access_denied("localhost[127.0.0.1]", "Client host"))


async def test_a_dns_allowlist_in_the_relay_list_permits_no_routed_recipient(mailflow_server, dns_zone):
    # Postfix's permit_dnswl_addr asks permit_auth_destination first, which refuses a routed recipient
    port = await start(mailflow_server, dns_zone, relay_restrictions=["permit_dnswl_client wl.test",
                                                                      "reject_unauth_destination"])
    assert (await rcpt(port, "user@relay.test"))[0] == 250
    for recipient in ("user%victim.example@relay.test", "x@elsewhere.test"):
        assert await rcpt(port, recipient) == said(status.relay_denied(recipient))


async def test_a_dns_allowlist_filter_and_a_failing_lookup(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, client_restrictions=["permit_dnswl_client wl.test=127.0.0.5",
                                                                       "permit_dnswl_client wl-broken.test", "reject"])
    # not listed with that answer; the other list cannot be asked: DEFER_IF_REJECT makes the refusal a 450
    assert await rcpt(port) == (450, "450 4.7.1 <127.0.0.1>: Client host rejected: Service unavailable")


async def test_a_list_stops_once_both_conditional_deferrals_are_set(mailflow_server, dns_zone):
    # Postfix's generic_checks: with DEFER_IF_PERMIT and DEFER_IF_REJECT both set, the rest of the list is not
    # asked (the outcome is a 450 either way): the HELO name's deferral is the answer, not the allowlist's
    port = await start(mailflow_server, dns_zone, client_restrictions=[
        "reject_unknown_helo_hostname", "permit_dnswl_client wl-broken.test", "reject"])
    assert await rcpt(port, helo="broken.test") == (450, "450 4.7.1 <broken.test>: Helo command rejected: Host not "
                                                         "found")


async def test_a_client_name_on_an_rhs_allowlist_is_permitted(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, client_restrictions=["permit_rhswl_client rhswl.test", "reject"])
    assert (await rcpt(port))[0] == 250


async def test_an_xclient_name_is_the_client_name_and_reverse_name(mailflow_server, dns_zone):
    # Postfix's XCLIENT NAME sets state->name and state->reverse_name: no PTR of 192.0.2.77 is asked for
    port = await start(mailflow_server, dns_zone, authorized_xclient_hosts=["127.0.0.0/8"], client_restrictions=[
        "check_reverse_client_hostname_access inline:{bad.test=REJECT}", "permit_rhswl_client rhswl.test", "reject"])
    for name, expected in (("given.test", (250, "250 2.1.5 Ok")),
                           ("bad.test", said(status.access_denied("bad.test", "Unverified Client host")))):
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO front.test")).code == 250
            assert (await client.cmd(f"XCLIENT ADDR=192.0.2.77 NAME={name}")).code == 220
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
            assert await client.cmd("RCPT TO:<alice@local.test>") == expected
        finally:
            await client.close()


async def test_an_xclient_name_the_front_ends_dns_could_not_tell_is_450_whatever_the_code(mailflow_server,
                                                                                          dns_zone):
    """Postfix's xclient_cmd makes NAME=[TEMPUNAVAIL] SMTPD_PEER_CODE_TEMP, which reject_unknown_client answers 450
    whatever unknown_client_reject_code says ([UNAVAILABLE]: the code); mailflow took it for [UNAVAILABLE] (550)."""
    port = await start(mailflow_server, dns_zone, authorized_xclient_hosts=["127.0.0.0/8"],
                       unknown_client_reject_code=550, client_restrictions=["reject_unknown_client_hostname"])
    for name, expected in (("[TEMPUNAVAIL]", "450 4.7.25"), ("[UNAVAILABLE]", "550 5.7.25")):
        client = await SmtpClient.connect(port)
        try:
            assert (await client.cmd("EHLO front.test")).code == 250
            assert (await client.cmd(f"XCLIENT NAME={name}")).code == 220
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
            assert (await client.cmd("RCPT TO:<alice@local.test>")).text == \
                f"{expected} Client host rejected: cannot find your hostname, [127.0.0.1]"
        finally:
            await client.close()


async def xclient_rcpt(port: int, xclient: str) -> tuple[int | None, str]:
    """RCPT's reply after the front end's `XCLIENT <xclient>` and the client's EHLO."""
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO front.test")).code == 250
        assert (await client.cmd(f"XCLIENT {xclient}")).code == 220
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        return await client.cmd("RCPT TO:<alice@local.test>")
    finally:
        await client.close()


async def test_what_xclient_does_not_give_stays_the_front_ends_as_in_postfix(mailflow_server, dns_zone):
    """smtpd.c xclient_cmd sets each name only from the attribute that gives it, in the order given: ADDR alone
    keeps the names smtpd_peer found for the connection (the front end's: here localhost, from the hosts file,
    verified and reverse; the DNS's PTR client.known.test is not asked, as neither peername.py nor Postfix's
    getnameinfo asks it when the hosts file names the address), NAME=[UNAVAILABLE] leaves the reverse name as it
    was, REVERSE_NAME sets only the reverse name, and a NAME after it sets both. (Not a differential: Postfix's
    resolver reads /etc/resolv.conf, which cannot name this test's DNS server and its port.) mailflow asked the
    DNS about the front end's address after ADDR, where the logs named it from the hosts file."""
    nameserver = dns_zone(ZONE + "localhost.rhswl.test. 300 IN A 127.0.0.2\n", servfail=SERVFAIL)
    port = await dns_checked(mailflow_server, nameserver, smtpd={
        "authorized_xclient_hosts": ["127.0.0.0/8"], "client_restrictions": [
            "check_reverse_client_hostname_access inline:{ { localhost = REJECT reverse kept }, "
            "{ bad.test = REJECT reverse bad } }", "permit_rhswl_client rhswl.test", "reject"]})
    reverse_kept = (554, "554 5.7.1 <localhost>: Unverified Client host rejected: reverse kept")
    for xclient, expected in (
            ("ADDR=192.0.2.77", reverse_kept),
            ("ADDR=192.0.2.77 NAME=[UNAVAILABLE]", reverse_kept),
            ("NAME=[UNAVAILABLE] ADDR=192.0.2.77", reverse_kept),
            ("ADDR=192.0.2.77 REVERSE_NAME=given.test", (250, "250 2.1.5 Ok")),  # verified: the front end's
            ("ADDR=192.0.2.77 NAME=[UNAVAILABLE] REVERSE_NAME=other.test",
             said(status.access_denied("unknown[192.0.2.77]", "Client host"))),
            ("ADDR=192.0.2.77 REVERSE_NAME=given.test NAME=bad.test",
             (554, "554 5.7.1 <bad.test>: Unverified Client host rejected: reverse bad")),
            ("ADDR=192.0.2.77 NAME=bad.test REVERSE_NAME=given.test",
             said(status.access_denied("bad.test[192.0.2.77]", "Client host")))):
        assert await xclient_rcpt(port, xclient) == expected, xclient


async def test_after_xclient_addr_alone_the_name_checks_take_the_name_found_at_connect(mailflow_server, dns_zone):
    """Postfix's xclient_cmd keeps name_status from connect: the front end (localhost in the hosts file) has a
    name, so reject_unknown_client_hostname passes the client ADDR names, though the DNS has no PTR for 127.0.0.1.
    mailflow asked the DNS about the front end's address and answered 450 cannot find your hostname."""
    zone = "".join(line + "\n" for line in ZONE.splitlines() if "in-addr.arpa" not in line)
    port = await dns_checked(mailflow_server, dns_zone(zone), smtpd={
        "authorized_xclient_hosts": ["127.0.0.0/8"], "client_restrictions": ["reject_unknown_client_hostname"]})
    assert await xclient_rcpt(port, "ADDR=192.0.2.77") == (250, "250 2.1.5 Ok")
    assert await xclient_rcpt(port, "ADDR=192.0.2.77 NAME=[UNAVAILABLE]") == \
        said(status.unknown_client("192.0.2.77", 450, False))


async def test_an_xclient_reverse_name_the_front_end_could_not_tell_is_450(mailflow_server, dns_zone):
    """REVERSE_NAME=[TEMPUNAVAIL] is SMTPD_PEER_CODE_TEMP for the reverse name (reject_unknown_reverse_client_hostname
    answers 450 whatever the code), [UNAVAILABLE] a permanent none; the verified name is left alone."""
    port = await start(mailflow_server, dns_zone, authorized_xclient_hosts=["127.0.0.0/8"],
                       unknown_client_reject_code=550, client_restrictions=[
                           "reject_unknown_reverse_client_hostname", "reject_unknown_client_hostname"])
    for name, expected in (("[TEMPUNAVAIL]", "450 4.7.1"), ("[UNAVAILABLE]", "550 5.7.1")):
        assert (await xclient_rcpt(port, f"ADDR=192.0.2.77 REVERSE_NAME={name}")).text == \
            f"{expected} Client host rejected: cannot find your reverse hostname, [192.0.2.77]"
    assert (await xclient_rcpt(port, "ADDR=192.0.2.77 REVERSE_NAME=given.test"))[0] == 250


LISTED_UNKNOWN = ZONE + """
unknown.rhsbl.test.     300 IN A     127.0.0.2
unknown.rhswl.test.     300 IN A     127.0.0.2
unknown.                300 IN A     192.0.2.1
"""


async def test_an_xclient_name_unknown_is_a_name_the_dns_checks_skip_as_postfix_does(mailflow_server, dns_zone):
    """XCLIENT NAME=unknown is a name to Postfix (xclient_cmd's name_code: its status OK), so
    reject_unknown_client_hostname passes it; smtpd_check.c skips a name "unknown" for the RHS lists and the server
    access checks (strcasecmp(state->name, "unknown")), so no list or table is asked about it. mailflow took it for
    no name."""
    asked: list[tuple[str, str]] = []
    port = await dns_checked(mailflow_server, dns_zone(LISTED_UNKNOWN, asked=asked), smtpd={
        "authorized_xclient_hosts": ["127.0.0.0/8"], "client_restrictions": [
            "reject_unknown_client_hostname", "reject_unknown_reverse_client_hostname",
            "reject_rhsbl_client rhsbl.test", "reject_rhsbl_reverse_client rhsbl.test",
            "check_client_a_access inline:{192.0.2.1=REJECT}",
            "check_reverse_client_hostname_a_access inline:{192.0.2.1=REJECT}", "permit_rhswl_client rhswl.test",
            "check_client_access inline:{ { unknown = REJECT named unknown } }"]})
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO front.test")).code == 250
        assert (await client.cmd("XCLIENT ADDR=192.0.2.77 NAME=unknown")).code == 220
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@remote.test>")).code == 250
        assert await client.cmd("RCPT TO:<alice@local.test>") == \
            (554, "554 5.7.1 <unknown[192.0.2.77]>: Client host rejected: named unknown")
    finally:
        await client.close()
    assert not [q for q in asked if q[0].lower().startswith("unknown")], asked


async def test_a_failing_rhs_allowlist_lookup_turns_a_refusal_into_a_deferral(mailflow_server, dns_zone):
    # Postfix's permit_dnswl_domain: DEFER_IF_REJECT2 450 4.7.1 <name>: Client host rejected: Service unavailable
    port = await start(mailflow_server, dns_zone, client_restrictions=["permit_rhswl_client wl-broken.test", "reject"])
    assert await rcpt(port) == (450, "450 4.7.1 <client.known.test>: Client host rejected: Service unavailable")


async def test_a_client_name_not_on_the_rhs_allowlist_goes_on(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, client_restrictions=["permit_rhswl_client wl.test", "reject"])
    assert await rcpt(port) == said(status.access_denied("localhost[127.0.0.1]", "Client host"))


async def test_with_delay_reject_off_the_helo_name_is_checked_at_ehlo(mailflow_server, dns_zone):
    port = await start(mailflow_server, dns_zone, delay_reject=False,
                       helo_restrictions=["reject_unknown_helo_hostname"])
    client = await SmtpClient.connect(port)
    try:
        assert await client.cmd("EHLO nowhere.test") == \
            (450, "450 4.7.1 <nowhere.test>: Helo command rejected: Host not found")
        assert (await client.cmd("EHLO known.test")).code == 250
    finally:
        await client.close()


async def test_the_unknown_domain_checks_ask_the_dns_once_a_session(mailflow_server, dns_zone):
    """Under delay_reject the sender list runs again at every RCPT: the sender's domain (and each recipient domain)
    is asked about once a session, its answer (records or NXDOMAIN) kept with the session's other DNS answers. (The
    resolver's own cache keeps only answers with records: a domain that has none is what a sender check meets.)"""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ZONE, servfail=SERVFAIL, asked=asked)
    port = await dns_checked(mailflow_server, nameserver,
                             mynetworks=["127.0.0.0/8"],
                             smtpd={"sender_restrictions": ["reject_unknown_sender_domain"],
                                    "relay_restrictions": ["permit_mynetworks", "reject"],
                                    "recipient_restrictions": ["reject_unknown_recipient_domain"], **MANY_REFUSALS})
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@nowhere.test>")).code == 250
        for n in range(50):
            assert (await client.cmd(f"RCPT TO:<r{n}@mxonly.test>")).text.startswith("450 4.1.8 <s@nowhere.test>")
        assert (await client.cmd("RSET")).code == 250
        assert (await client.cmd("MAIL FROM:<s@known.test>")).code == 250
        for n in range(2):
            assert (await client.cmd(f"RCPT TO:<r{n}@mxonly.test>")).code == 250
    finally:
        await client.close()
    domains = [(name, qtype) for name, qtype in asked if name.endswith(("known.test.", "nowhere.test."))]
    assert sorted(domains) == [("known.test.", "A"), ("known.test.", "AAAA"), ("known.test.", "MX"),
                               ("nowhere.test.", "A"), ("nowhere.test.", "AAAA"), ("nowhere.test.", "MX")], domains


async def test_a_sender_domain_with_a_null_mx_is_refused_though_it_has_an_address(mailflow_server, dns_zone):
    """Postfix's reject_unknown_mailhost stops at a null MX (DNS_REQ_FLAG_STOP_NULLMX): the sender is refused 550
    5.7.27 (smtpd_check_reject makes 4.7.27 the reply's class), its A record not asked; it used to be accepted."""
    port = await start(mailflow_server, dns_zone, sender_restrictions=["reject_unknown_sender_domain"])
    assert (await rcpt(port, sender="x@nullmx.test")).text == \
        ("550 5.7.27 <x@nullmx.test>: Sender address rejected: Domain nullmx.test does not accept mail (nullMX)")
    assert (await rcpt(port, sender="x@implicit.test"))[0] == 250  # (an address and no MX: accepted)


async def test_a_temporary_dns_failure_is_asked_again_at_the_next_rcpt_and_transaction(mailflow_server, dns_zone):
    """Postfix's reject_unknown_mailhost asks the DNS at each RCPT (smtpd_check.c: no cache): a SERVFAIL defers
    that recipient only (450), and once the DNS works the same session's next transaction is accepted; it used to
    be kept for the whole session."""
    asked: list[tuple[str, str]] = []
    failing = {"later.test"}
    nameserver = dns_zone(ZONE + "later.test. 300 IN MX 10 mx.known.test.\n", servfail=failing, asked=asked)
    port = await dns_checked(mailflow_server, nameserver,
                             mynetworks=["127.0.0.0/8"],
                             smtpd={"relay_restrictions": ["permit_mynetworks", "reject"],
                                    "recipient_restrictions": ["reject_unknown_recipient_domain"],
                                    "error_sleep_time": 0})
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@known.test>")).code == 250
        for rcpt in ("r@later.test", "s@later.test"):
            assert (await client.cmd(f"RCPT TO:<{rcpt}>")).text.startswith(f"450 4.1.2 <{rcpt}>")
        # (as Postfix's dns_lookup_l, the addresses are asked when the MX lookup fails)
        assert sorted(q[1] for q in asked if q[0] == "later.test.") == ["A", "A", "AAAA", "AAAA", "MX", "MX"]
        assert (await client.cmd("RSET")).code == 250
        failing.clear()  # the DNS works again
        assert (await client.cmd("MAIL FROM:<s@known.test>")).code == 250
        assert (await client.cmd("RCPT TO:<r@later.test>")).code == 250
    finally:
        await client.close()


async def test_a_recipient_domain_the_dns_cannot_tell_is_domain_not_found_deferred_if_permitted(mailflow_server,
                                                                                                   dns_zone):
    """Postfix's reject_unknown_mailhost on DNS_RETRY: DEFER_IF_PERMIT2(unk_addr_tf_act, 450, "4.1.2", "<%s>: %s
    rejected: Domain not found"); mailflow answered 450 4.4.3 at once, before a later refusal could win."""
    port = await start(mailflow_server, dns_zone, relay_restrictions=RELAY_FROM_HERE, recipient_restrictions=[
        "reject_unknown_recipient_domain", "check_recipient_access inline:{no@broken.test=REJECT}"])
    assert await rcpt(port, "r@broken.test") == \
        (450, "450 4.1.2 <r@broken.test>: Recipient address rejected: Domain not found")
    assert await rcpt(port, "no@broken.test") == said(status.access_denied("no@broken.test", "Recipient address"))


async def test_a_sender_domain_the_dns_cannot_tell_is_deferred_only_if_the_lists_permit(mailflow_server, dns_zone):
    """The same DEFER_IF_PERMIT for the sender (4.1.8): a later refusal wins; mailflow deferred at once."""
    port = await start(mailflow_server, dns_zone, sender_restrictions=["reject_unknown_sender_domain"],
                       recipient_restrictions=["check_recipient_access inline:{no@local.test=REJECT}"])
    assert await rcpt(port, sender="s@broken.test") == \
        (450, "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found")
    assert await rcpt(port, "no@local.test", sender="s@broken.test") == \
        said(status.access_denied("no@local.test", "Recipient address"))


async def test_a_failing_mx_lookup_goes_on_to_the_addresses(mailflow_server, dns_zone):
    """Postfix's reject_unknown_mailhost asks MX, A and AAAA in turn (dns_lookup_l, STOP_OK): an MX lookup that
    fails is followed by the address lookups, and an address found accepts the domain; only when none is found does
    the failure defer (450). mailflow deferred on the MX failure alone."""
    nameserver = dns_zone(ZONE + 'noaddress.test. 300 IN TXT "no A, no AAAA"\n',
                          servfail=("known.test/MX", "noaddress.test/MX"))
    port = await dns_checked(mailflow_server, nameserver,
                             smtpd={"relay_restrictions": RELAY_FROM_HERE,
                                    "sender_restrictions": ["reject_unknown_sender_domain"],
                                    "recipient_restrictions": ["reject_unknown_recipient_domain"]})
    assert await rcpt(port, "r@known.test", sender="s@known.test") == (250, "250 2.1.5 Ok")
    assert await rcpt(port, "r@noaddress.test", sender="s@known.test") == \
        (450, "450 4.1.2 <r@noaddress.test>: Recipient address rejected: Domain not found")
    assert await rcpt(port, "r@known.test", sender="s@noaddress.test") == \
        (450, "450 4.1.8 <s@noaddress.test>: Sender address rejected: Domain not found")


async def test_a_domain_the_dns_cannot_tell_is_logged_as_its_reject_line_only(mailflow_server, dns_zone, caplog):
    """Postfix's reject_unknown_mailhost logs nothing of a DNS_RETRY (dns_lookup_l is given no `why`): the trace is
    the `NOQUEUE: reject: RCPT from …: 450 4.1.8 …` line. mailflow warned "MAIL <s>: Name service error…" at each
    RCPT (delay_reject reruns the sender list), and also when a later refusal won."""
    port = await start(mailflow_server, dns_zone, sender_restrictions=["reject_unknown_sender_domain"],
                       recipient_restrictions=["check_recipient_access inline:{no@local.test=REJECT}"])
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        assert (await rcpt(port, sender="s@broken.test"))[0] == 450
        assert (await rcpt(port, "no@local.test", sender="s@broken.test"))[0] == 554
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mailflow.smtpd"]
    assert not [m for level, m in logged if level >= logging.WARNING], logged
    rejects = [m for _, m in logged if "reject: RCPT from" in m]
    assert len(rejects) == 2 and "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found" in rejects[0]


async def test_a_permit_after_the_deferral_becomes_its_450(mailflow_server, dns_zone):
    """Postfix's smtpd_check_rcpt: `status != REJECT && defer_if_permit.active` answers the DEFER_IF_PERMIT's 450
    though a later item (here an explicit permit) permits."""
    port = await start(mailflow_server, dns_zone, relay_restrictions=RELAY_FROM_HERE,
                       recipient_restrictions=["reject_unknown_recipient_domain", "permit"])
    assert await rcpt(port, "r@broken.test") == \
        (450, "450 4.1.2 <r@broken.test>: Recipient address rejected: Domain not found")


async def test_under_soft_bounce_a_later_refusal_still_wins_over_the_deferral_as_a_4xx(mailflow_server, dns_zone):
    """soft_bounce touches only 5xx replies (Postfix's smtpd_check_reject): a pending DEFER_IF_PERMIT loses to a
    later REJECT, which goes out as 454 4.7.1; without the REJECT the deferral's 450 4.1.8 is sent unchanged."""
    nameserver = dns_zone(ZONE, servfail=SERVFAIL)
    port = await dns_checked(mailflow_server, nameserver, soft_bounce=True,
                             smtpd={"sender_restrictions": ["reject_unknown_sender_domain"], "recipient_restrictions":
                                    ["check_recipient_access inline:{no@local.test=REJECT}"]})
    assert await rcpt(port, "no@local.test", sender="s@broken.test") == \
        (454, "454 4.7.1 <no@local.test>: Recipient address rejected: Access denied")
    assert await rcpt(port, sender="s@broken.test") == \
        (450, "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found")


async def test_unknown_address_tempfail_action_defer_defers_at_once(mailflow_server, dns_zone):
    """Postfix's DEFER_IF_PERMIT2 with unknown_address_tempfail_action = defer answers the 450 at once: a later
    refusal does not win (the sender's and the recipient's)."""
    port = await start(mailflow_server, dns_zone, unknown_address_tempfail_action="defer",
                       relay_restrictions=RELAY_FROM_HERE,
                       sender_restrictions=["reject_unknown_sender_domain"],
                       recipient_restrictions=["reject_unknown_recipient_domain",
                                               "check_recipient_access inline:{no@local.test=REJECT no@broken.test="
                                               "REJECT}"])
    assert await rcpt(port, "no@local.test", sender="s@broken.test") == \
        (450, "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found")
    assert await rcpt(port, "no@broken.test", sender="s@known.test") == \
        (450, "450 4.1.2 <no@broken.test>: Recipient address rejected: Domain not found")


async def test_without_delay_reject_the_tempfail_action_defer_answers_mail(mailflow_server, dns_zone):
    """delay_reject off, unknown_address_tempfail_action = defer: Postfix's smtpd_check_mail answers MAIL itself
    (smtpd_check_reject there), 450 4.1.8."""
    port = await start(mailflow_server, dns_zone, delay_reject=False, unknown_address_tempfail_action="defer",
                       sender_restrictions=["reject_unknown_sender_domain"])
    assert await rcpt(port, sender="s@broken.test") == \
        (450, "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found")


async def test_without_delay_reject_a_sender_domain_dns_failure_is_carried_to_rcpt(mailflow_server, dns_zone):
    """Postfix's smtpd_check_mail keeps the sender list's DEFER_IF_PERMIT (defer_if_permit_sender): MAIL is
    accepted, the RCPT lists decide."""
    port = await start(mailflow_server, dns_zone, delay_reject=False,
                       sender_restrictions=["reject_unknown_sender_domain"],
                       recipient_restrictions=["check_recipient_access inline:{no@local.test=REJECT}"])
    assert await rcpt(port, sender="s@broken.test") == \
        (450, "450 4.1.8 <s@broken.test>: Sender address rejected: Domain not found")
    assert await rcpt(port, "no@local.test", sender="s@broken.test") == \
        said(status.access_denied("no@local.test", "Recipient address"))


async def test_the_session_memo_drops_the_least_recently_read_answers_not_all(mailflow_server, dns_zone):
    """Past 32 answers the memo drops the least recently read ones: a client sending to many domains makes those be
    asked again, not the answer every RCPT reads (its DNSBL query here: NXDOMAIN, which the resolver's own cache
    does not keep). The memo used to be cleared whole at its 33rd answer."""
    asked: list[tuple[str, str]] = []
    nameserver = dns_zone(ZONE, asked=asked)
    port = await dns_checked(mailflow_server, nameserver,
                             mynetworks=["127.0.0.0/8"],
                             smtpd={"client_restrictions": ["reject_rbl_client rbl.test"],
                                    "relay_restrictions": ["permit_mynetworks", "reject"],
                                    "recipient_restrictions": ["reject_unknown_recipient_domain"], **MANY_REFUSALS})
    client = await SmtpClient.connect(port)
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd("MAIL FROM:<s@known.test>")).code == 250
        for n in range(40):
            assert (await client.cmd(f"RCPT TO:<r@nx{n}.test>")).text.startswith(f"450 4.1.2 <r@nx{n}.test>")
    finally:
        await client.close()
    assert [q for q in asked if q[0] == "1.0.0.127.rbl.test."] == [("1.0.0.127.rbl.test.", "A")]
    assert len([q for q in asked if q[0].startswith("nx")]) == 40 * 3  # (MX, A, AAAA: each domain asked once)


async def test_under_warn_if_reject_an_address_domain_dns_failure_is_only_warned_of(mailflow_server, dns_zone,
                                                                                    caplog):
    """Postfix's DEFER_IF_PERMIT2 calls smtpd_check_reject under warn_if_reject: a reject_warning line with the
    450, and the recipient is accepted."""
    port = await start(mailflow_server, dns_zone, relay_restrictions=RELAY_FROM_HERE,
                       recipient_restrictions=["warn_if_reject", "reject_unknown_recipient_domain"])
    with caplog.at_level(logging.INFO, logger="mailflow.smtpd"):
        assert (await rcpt(port, "r@broken.test", sender="s@known.test"))[0] == 250
    assert any("reject_warning: RCPT from " in r.getMessage() and
               ": 450 4.1.2 <r@broken.test>: Recipient address rejected: Domain not found;" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# ----------------------------------------------------- every MX/A/AAAA answer through Postfix's reject_unknown_mailhost

# Postfix's dns.h status values: the larger wins (dns_lookup_rl keeps the "highest-priority" status it met).
DNS_OK, DNS_RETRY, DNS_NULLMX, DNS_NOTFOUND = 0, -2, -5, -6
ANSWER_STATUS = {"records": DNS_OK, "nodata": DNS_NOTFOUND, "nxdomain": DNS_NOTFOUND, "servfail": DNS_RETRY,
                 "timeout": DNS_RETRY, "null": DNS_NULLMX}
ADDRESS_ANSWERS = ("records", "nodata", "nxdomain", "servfail")
MX_ANSWERS = (*ADDRESS_ANSWERS, "null")
TIMED_OUT = (("timeout", "nxdomain", "nxdomain"), ("nxdomain", "timeout", "nodata"), ("nodata", "nodata", "timeout"))
COMBINATIONS = [(mx, a, aaaa) for mx in MX_ANSWERS for a in ADDRESS_ANSWERS for aaaa in ADDRESS_ANSWERS]
COMBINATIONS += TIMED_OUT


def postfix_lookup_status(answers: tuple[str, ...], stop_nullmx: bool) -> int:
    """dns_lookup_rl(name, ..., lflags, types...) as postfix-3.7.11 src/dns/dns_lookup.c has it, for `answers` to
    its types in turn: DNS_OK stops (DNS_REQ_FLAG_STOP_OK), DNS_NULLMX too with DNS_REQ_FLAG_STOP_NULLMX; NXDOMAIN
    does not ("XXX Stop after NXDOMAIN error" is only a comment); at the end the highest status met wins."""
    statuses = [ANSWER_STATUS[answer] for answer in answers]
    best = None
    for n, status_ in enumerate(statuses):
        if status_ == DNS_OK or (stop_nullmx and status_ == DNS_NULLMX) or n == len(statuses) - 1:
            break
        if best is None or status_ >= best:
            best = status_
    return best if best is not None and status_ < best else status_


def postfix_mailhost_status(mx: str, a: str, aaaa: str) -> int:
    """reject_unknown_mailhost's lookup: MX, A, AAAA with STOP_OK | STOP_INVAL | STOP_NULLMX | STOP_MX_POLICY."""
    return postfix_lookup_status((mx, a, aaaa), stop_nullmx=True)


def combination_zone(combinations, base: str = ZONE) -> tuple[str, list[str], list[str], list[str]]:
    """A zone (`base` and) where `<mx>-<a>-<aaaa>.combo.test` answers MX, A and AAAA queries as its name says: (zone
    text, its SERVFAIL, NXDOMAIN and slow name/TYPE entries). Every name has a TXT record: it exists (NODATA
    elsewhere)."""
    lines, servfail, nxdomain, slow = [], [], [], []
    records = {"MX": "MX 10 mx.known.test.", "A": "A 192.0.2.1", "AAAA": "AAAA 2001:db8::1"}
    for combination in combinations:
        name = "-".join(combination) + ".combo.test"
        lines.append(f'{name}. 300 IN TXT "exists"')
        for qtype, answer in zip(("MX", "A", "AAAA"), combination):
            if answer == "records":
                lines.append(f"{name}. 300 IN {records[qtype]}")
            elif answer == "null":
                lines.append(f"{name}. 300 IN MX 0 .")
            else:
                {"servfail": servfail, "nxdomain": nxdomain, "timeout": slow}.get(answer, []).append(f"{name}/{qtype}")
    return base + "\n".join(lines) + "\n", servfail, nxdomain, slow


def postfix_reply(combination: tuple[str, str, str], side: str) -> tuple[int, str]:
    """reject_unknown_mailhost's reply (unknown_address_reject_code 550), through smtpd's lists: a DNS_RETRY is a
    DEFER_IF_PERMIT (450), answered as the list ends in a permit."""
    name = "-".join(combination) + ".combo.test"
    addr, what = (f"s@{name}", "Sender address") if side == "sender" else (f"r@{name}", "Recipient address")
    found = postfix_mailhost_status(*combination)
    if found == DNS_OK:
        return 250, "250 2.1.5 Ok"
    if found == DNS_NULLMX:
        code = (550, "5.7.27") if side == "sender" else (556, "5.1.10")
        return code[0], f"{code[0]} {code[1]} <{addr}>: {what} rejected: Domain {name} does not accept mail (nullMX)"
    detail = "4.1.8" if side == "sender" else "4.1.2"
    code = 450 if found == DNS_RETRY else 550
    return code, f"{code} {code // 100}.{detail[2:]} <{addr}>: {what} rejected: Domain not found"


@pytest.mark.parametrize("side", ["sender", "recipient"])
async def test_every_mx_a_and_aaaa_answer_is_decided_as_postfix_s_reject_unknown_mailhost(mailflow_server, dns_zone,
                                                                                           side):
    """Postfix asks MX, then A, then AAAA; records or a null MX stop it, and a failure (SERVFAIL, a timeout) met on
    any step wins over "not found" at the end. mailflow took an MX lookup's NXDOMAIN as the domain's verdict: the
    A lookup that failed after it (or found an address) was never asked, and the domain was refused for good."""
    zone, servfail, nxdomain, slow = combination_zone(COMBINATIONS)
    nameserver = dns_zone(zone, servfail=servfail, nxdomain=nxdomain, slow=tuple(slow), delay=0.6)
    mf = await mailflow_server(dns={"nameservers": [nameserver], "timeout": 0.3, "tries": 1}, smtpd={
        "relay_restrictions": RELAY_FROM_HERE, "unknown_address_reject_code": 550, **MANY_REFUSALS,
        f"{side}_restrictions": [f"reject_unknown_{side}_domain"]})
    client = await SmtpClient.connect(mf.smtp_addresses[0][1])
    seen, expected = {}, {}
    try:
        assert (await client.cmd("EHLO client.test")).code == 250
        for combination in COMBINATIONS:
            name = "-".join(combination) + ".combo.test"
            sender, recipient = (f"s@{name}", "r@known.test") if side == "sender" else ("s@known.test", f"r@{name}")
            assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
            reply = await client.cmd(f"RCPT TO:<{recipient}>")
            seen[combination], expected[combination] = tuple(reply), postfix_reply(combination, side)
            assert (await client.cmd("RSET")).code == 250
    finally:
        await client.close()
    assert seen == expected


async def test_every_a_aaaa_and_mx_answer_is_decided_as_postfix_s_reject_unknown_hostname(mailflow_server, dns_zone):
    """Postfix's reject_unknown_hostname asks A, AAAA, then MX (dns_lookup_l with STOP_OK only) and takes a null MX
    as known, unless an address lookup failed before it: the failure (DNS_RETRY) is the higher status, a 450
    DEFER_IF_PERMIT. mailflow took the null MX as known whatever the address lookups had said."""
    combinations = [(mx, a, aaaa) for mx in MX_ANSWERS for a in ADDRESS_ANSWERS for aaaa in ADDRESS_ANSWERS]
    zone, servfail, nxdomain, _ = combination_zone(combinations)
    nameserver = dns_zone(zone, servfail=servfail, nxdomain=nxdomain)
    port = await dns_checked(mailflow_server, nameserver, smtpd={
        "unknown_hostname_reject_code": 550, **MANY_REFUSALS,
        "helo_restrictions": ["reject_unknown_helo_hostname"]})
    client = await SmtpClient.connect(port)
    seen, expected = {}, {}
    try:
        for mx, a, aaaa in combinations:
            name = f"{mx}-{a}-{aaaa}.combo.test"
            assert (await client.cmd(f"EHLO {name}")).code == 250
            assert (await client.cmd("MAIL FROM:<s@known.test>")).code == 250
            seen[name] = tuple(await client.cmd("RCPT TO:<alice@local.test>"))
            found = postfix_lookup_status((a, aaaa, mx), stop_nullmx=False)
            code = 450 if found == DNS_RETRY else 550
            expected[name] = (250, "250 2.1.5 Ok") if found in (DNS_OK, DNS_NULLMX) else \
                (code, f"{code} {code // 100}.7.1 <{name}>: Helo command rejected: Host not found")
            assert (await client.cmd("RSET")).code == 250
    finally:
        await client.close()
    assert seen == expected


# ---------------------------------------------------------------------------------------------- malformed replies

# names whose replies Postfix's valid_rr_name refuses (bad-.example.test), and one whose reply is cut short
MALFORMED_RECORDS = """
badmx.test.             300 IN MX    10 bad-.example.test.
badmxaddr.test.         300 IN MX    10 bad-.example.test.
badmxaddr.test.         300 IN A     192.0.2.1
badcname.test.          300 IN CNAME bad-.example.test.
bad-.example.test.      300 IN A     192.0.2.1
garbled.test.           300 IN MX    10 mx.known.test.
garbled.test.           300 IN A     192.0.2.1
"""
MALFORMED_ZONE = ZONE + MALFORMED_RECORDS


async def test_a_reply_naming_no_host_is_refused_and_a_garbled_one_deferred_as_postfix_does(mailflow_server,
                                                                                           dns_zone, caplog):
    """A real Postfix 3.7.11 (its resolver pointed at a server giving these replies, unknown_address_reject_code and
    unknown_hostname_reject_code 550) answered: an MX host, or a CNAME target, that is no host name is DNS_INVAL,
    "Malformed DNS server reply" with the reject code (reject_unknown_mailhost stops there; reject_unknown_hostname
    takes the A record found first), after the warning of its dns_lookup; a reply cut short is DNS_RETRY, 450
    "Domain not found". mailflow took the bad MX host as an MX found."""
    nameserver = dns_zone(MALFORMED_ZONE, garbled=("garbled.test",))
    port = await dns_checked(mailflow_server, nameserver, smtpd={
        "relay_restrictions": RELAY_FROM_HERE, "unknown_address_reject_code": 550, "unknown_hostname_reject_code": 550,
        "helo_restrictions": ["reject_unknown_helo_hostname"], "sender_restrictions": ["reject_unknown_sender_domain"],
        "recipient_restrictions": ["reject_unknown_recipient_domain"]})
    seen = {}
    with caplog.at_level(logging.WARNING, logger="mailflow.dns"):
        for name in ("badmx", "badmxaddr", "badcname", "garbled"):
            seen[name] = [(await rcpt(port, helo=f"{name}.test", sender="s@known.test", rcpt_to="r@known.test"))[1],
                          (await rcpt(port, sender=f"s@{name}.test", rcpt_to="r@known.test", helo="known.test"))[1],
                          (await rcpt(port, rcpt_to=f"r@{name}.test", sender="s@known.test", helo="known.test"))[1]]
    malformed = "Malformed DNS server reply"
    assert seen == {
        "badmx": [f"550 5.7.1 <badmx.test>: Helo command rejected: {malformed}",
                  f"550 5.1.8 <s@badmx.test>: Sender address rejected: {malformed}",
                  f"550 5.1.2 <r@badmx.test>: Recipient address rejected: {malformed}"],
        "badmxaddr": ["250 2.1.5 Ok",
                      f"550 5.1.8 <s@badmxaddr.test>: Sender address rejected: {malformed}",
                      f"550 5.1.2 <r@badmxaddr.test>: Recipient address rejected: {malformed}"],
        "badcname": [f"550 5.7.1 <badcname.test>: Helo command rejected: {malformed}",
                     f"550 5.1.8 <s@badcname.test>: Sender address rejected: {malformed}",
                     f"550 5.1.2 <r@badcname.test>: Recipient address rejected: {malformed}"],
        "garbled": ["450 4.7.1 <garbled.test>: Helo command rejected: Host not found",
                    "450 4.1.8 <s@garbled.test>: Sender address rejected: Domain not found",
                    "450 4.1.2 <r@garbled.test>: Recipient address rejected: Domain not found"]}
    warned = {r.getMessage() for r in caplog.records if r.name == "mailflow.dns"}
    assert warned == {"valid_hostname: misplaced hyphen: bad-.example.test",
                      "malformed domain name in resource data of MX record for badmx.test: bad-.example.test",
                      "malformed domain name in resource data of MX record for badmxaddr.test: bad-.example.test",
                      "malformed domain name in resource data of CNAME record for badcname.test: bad-.example.test"}


async def test_formerr_is_not_found_and_refused_or_notimp_a_failure_as_postfix_s_resolver_has_them(mailflow_server,
                                                                                                  dns_zone):
    """The same real Postfix: FORMERR is the system's resolver's NO_RECOVERY, DNS_FAIL, which its checks refuse as
    not found (550 with the reject codes); REFUSED and NOTIMP come to TRY_AGAIN (450). mailflow deferred FORMERR."""
    nameserver = dns_zone(ZONE, rcodes={"formerr.test": "FORMERR", "refused.test": "REFUSED", "notimp.test": "NOTIMP"})
    port = await dns_checked(mailflow_server, nameserver, smtpd={
        "relay_restrictions": RELAY_FROM_HERE, "unknown_address_reject_code": 550, "unknown_hostname_reject_code": 550,
        "helo_restrictions": ["reject_unknown_helo_hostname"], "sender_restrictions": ["reject_unknown_sender_domain"],
        "recipient_restrictions": ["reject_unknown_recipient_domain"]})
    seen = {}
    for name in ("formerr", "refused", "notimp"):
        seen[name] = [(await rcpt(port, helo=f"{name}.test", sender="s@known.test", rcpt_to="r@known.test"))[1],
                      (await rcpt(port, sender=f"s@{name}.test", rcpt_to="r@known.test", helo="known.test"))[1],
                      (await rcpt(port, rcpt_to=f"r@{name}.test", sender="s@known.test", helo="known.test"))[1]]
    assert seen == {name: [f"{code} {code // 100}.7.1 <{name}.test>: Helo command rejected: Host not found",
                           f"{code} {code // 100}.1.8 <s@{name}.test>: Sender address rejected: Domain not found",
                           f"{code} {code // 100}.1.2 <r@{name}.test>: Recipient address rejected: Domain not found"]
                    for name, code in (("formerr", 550), ("refused", 450), ("notimp", 450))}


async def test_reject_maps_rbl_asks_each_of_maps_rbl_domains_as_postfix_3_7_does(mailflow_server, dns_zone, caplog):
    """Postfix 3.7's old reject_maps_rbl: reject_rbl_client with each of maps_rbl_domains in turn (the first that
    lists the client refuses), its going-away warning logged once; mailflow refused the item as unknown."""
    zone = ZONE + "1.0.0.127.bl2.test.     300 IN A     127.0.0.2\n"
    port = await dns_checked(mailflow_server, dns_zone(zone), mynetworks=["127.0.0.0/8"],
                             smtpd={"client_restrictions": ["reject_maps_rbl"],
                                    "maps_rbl_domains": ["bl1.test", "bl2.test"], "maps_rbl_reject_code": 550,
                                    "relay_restrictions": ["permit_mynetworks", "reject"]})
    with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
        for _ in range(2):
            assert await rcpt(port) == (550, "550 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
                                             "bl2.test")
    assert [r.getMessage() for r in caplog.records if "reject_maps_rbl" in r.getMessage()] == [
        'support for restriction "reject_maps_rbl" will be removed from Postfix; use "reject_rbl_client domain-name" '
        "instead"]


def test_maps_rbl_domains_are_checked_at_load(tmp_path):
    path = tmp_path / "mailflow.toml"
    path.write_text("[smtpd]\nmaps_rbl_domains = ['bl.test=127.0.0.300']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "smtpd.maps_rbl_domains")
    assert "is not a DNSBL" in info.value.reason
