"""trivial-rewrite (mailflow.routing.rewrite): address class and `transport:nexthop` for each recipient."""
from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.config import Config
from mailflow.model import AddressClass, Resolution
from mailflow.routing.rewrite import DomainNames, Rewriter, split_transport

LOCAL, RELAY, DEFAULT = AddressClass.LOCAL, AddressClass.RELAY, AddressClass.DEFAULT

BASE = dict(myhostname="mx.example.test", mydestination=("example.test", "localhost"),
            relay_domains=("relay.test", "other-relay.test"))


def rewriter(**overrides) -> Rewriter:
    return Rewriter(Config(**{**BASE, **overrides}))


# (config overrides, recipient, expected class, transport, nexthop)
CASES = [
    # local: mydestination -> local_transport, nexthop myhostname
    ({}, "user@example.test", LOCAL, "local", "mx.example.test"),
    ({}, "user@localhost", LOCAL, "local", "mx.example.test"),
    ({}, "User@EXAMPLE.Test", LOCAL, "local", "mx.example.test"),
    ({}, "user@example.test.", LOCAL, "local", "mx.example.test"),
    ({"relayhost": "[10.9.9.9]:25"}, "user@example.test", LOCAL, "local", "mx.example.test"),
    ({"local_transport": "discard:"}, "user@example.test", LOCAL, "discard", "mx.example.test"),
    ({"local_transport": "smtp:[127.0.0.1]:24"}, "user@example.test", LOCAL, "smtp", "[127.0.0.1]:24"),
    # relay: relay_domains -> relay_transport, nexthop relayhost if set, else the domain
    ({}, "user@relay.test", RELAY, "relay", "relay.test"),
    ({}, "user@RELAY.TEST.", RELAY, "relay", "relay.test"),
    ({"relayhost": "[10.0.0.1]:587"}, "user@relay.test", RELAY, "relay", "[10.0.0.1]:587"),
    ({"relay_transport": "relay"}, "user@relay.test", RELAY, "relay", "relay.test"),
    ({"relay_transport": "smtp:[10.0.0.2]:2525", "relayhost": "[10.0.0.1]:587"}, "user@relay.test", RELAY,
     "smtp", "[10.0.0.2]:2525"),
    # a relay_domains entry matches its subdomains (Postfix parent_domain_matches_subdomains default)
    ({}, "user@a.relay.test", RELAY, "relay", "a.relay.test"),
    ({}, "user@a.b.relay.test", RELAY, "relay", "a.b.relay.test"),
    ({}, "user@xrelay.test", DEFAULT, "smtp", "xrelay.test"),
    # mydestination is an exact list: a subdomain is another domain
    ({}, "user@a.example.test", DEFAULT, "smtp", "a.example.test"),
    # default: anything else -> default_transport
    ({}, "user@remote.test", DEFAULT, "smtp", "remote.test"),
    ({}, "User@Remote.TEST.", DEFAULT, "smtp", "remote.test"),
    ({"relayhost": "[10.0.0.1]:587"}, "user@remote.test", DEFAULT, "smtp", "[10.0.0.1]:587"),
    ({"relayhost": "smarthost.test"}, "user@remote.test", DEFAULT, "smtp", "smarthost.test"),
    ({"default_transport": "smtp:[10.0.0.1]:587"}, "user@remote.test", DEFAULT, "smtp", "[10.0.0.1]:587"),
    ({"default_transport": "smtp:[10.0.0.1]:587", "relayhost": "[10.9.9.9]"}, "user@remote.test", DEFAULT,
     "smtp", "[10.0.0.1]:587"),
    ({"default_transport": "discard:"}, "user@remote.test", DEFAULT, "discard", "remote.test"),
    ({"default_transport": "discard"}, "user@remote.test", DEFAULT, "discard", "remote.test"),
    ({}, "user@bücher.example", DEFAULT, "smtp", "xn--bcher-kva.example"),
    ({}, "user@[192.0.2.1]", DEFAULT, "smtp", "[192.0.2.1]"),
    # unqualified: user@myhostname (which is not in mydestination here)
    ({}, "user", DEFAULT, "smtp", "mx.example.test"),
    ({"mydestination": ("mx.example.test",)}, "user", LOCAL, "local", "mx.example.test"),
    # domain lists in the config are matched case- and trailing-dot-insensitively
    ({"mydestination": ("Example.TEST.",)}, "user@example.test", LOCAL, "local", "mx.example.test"),
    ({"relay_domains": ("Sub.Relay.Test.",)}, "user@a.sub.relay.test", RELAY, "relay", "a.sub.relay.test"),
    ({"mydestination": ("xn--bcher-kva.example",)}, "user@bücher.example", LOCAL, "local", "mx.example.test"),
    ({"mydestination": ()}, "user@example.test", DEFAULT, "smtp", "example.test"),
]


@pytest.mark.parametrize("overrides, addr, klass, transport, nexthop", CASES)
def test_resolve(overrides, addr, klass, transport, nexthop):
    rw = rewriter(**overrides)
    res = rw.resolve(addr)
    assert res == Resolution(klass, transport, nexthop, rw.qualify(addr))
    assert rw.classify(addr) is klass


def test_mydestination_wins_over_relay_domains():
    rw = rewriter(relay_domains=("example.test",))
    assert rw.resolve("user@example.test").address_class is LOCAL


def test_resolution_keeps_the_address_as_given_but_qualified():
    rw = rewriter()
    assert rw.resolve("User@Remote.TEST.").address == "User@Remote.TEST"  # (a trailing dot goes, as in Postfix)
    assert rw.resolve("user").address == "user@mx.example.test"


def test_an_empty_local_part_of_a_local_domain_resolves_to_mailer_daemon():
    """Postfix's resolve.c (empty_address_recipient): against Postfix 3.7.11 in test_quoting_vs_postfix.py."""
    rw = rewriter()
    assert rw.resolved_address('""@example.test') == "MAILER-DAEMON@example.test"
    assert rw.resolved_address('""@remote.test') == '""@remote.test'  # not local: as it is


@pytest.mark.parametrize("addr, qualified", [
    ("user", "user@mx.example.test"),
    ("user@example.test", "user@example.test"),
    ('"a@b"@remote.test', '"a@b"@remote.test'),
    ("", ""),  # the null sender stays null
    # the percent hack of an address without '@' (Postfix rewrite_tree): the rightmost '%' becomes it
    ("user%remote.test", "user@remote.test"),
    ("a%b%remote", "a%b@remote"),
    ("user%", "user@"),  # no domain: left for the caller's syntax check
    ('"a%b"', 'a%b@mx.example.test'),  # a quoted '%' is none (the quotes, which add nothing, go)
    # tidied as Postfix's rewrite tidies: quotes that add nothing, one trailing dot
    ('"joe"@remote.test.', "joe@remote.test"),
    ('"j.k"', "j.k@mx.example.test"),
    ('"a b"@remote.test.', '"a b"@remote.test'),
    ("user@remote..", "user@remote.."),  # not a trailing dot: an empty label, for the syntax check
    ("user@.", "user@."),
    # a local part of words in Postfix's quoting (quote_822_local of its internal form); a source route dropped
    ('a."b c"@remote.test', '"a.b c"@remote.test'),
    ('"a"."b"@remote.test', "a.b@remote.test"),
    ("joe.@remote.test", '"joe."@remote.test'),
    ("a..b", '"a..b"@mx.example.test'),
    ("@r1.test,@r2.test:u@remote.test", "u@remote.test"),
    # the percent hack's '%' is looked for among the words as given (a header's: Postfix 3.7.11 rewrites them so,
    # test_quoting_vs_postfix.py)
    ('"<x>".user%remote.test', '"<x>.user"@remote.test'),
    ('"user%remote.test"', "user%remote.test@mx.example.test"),
    ("%remote.test", '""@remote.test'),  # an empty user is "" (Postfix's rewrite_tree; 3.7.11: seed 70005)
    ("%p.Z", '""@p.Z'),
    # an '@' in quotes is the local part's: unqualified (a header's words; 3.7.11: seed 70000); `""` is left alone
    ('"x@y"', '"x@y"@mx.example.test'),
    ('"a.".x-y."x@y"', '"a..x-y.x@y"@mx.example.test'),
    ('u!h."x@y"', '"h.x@y"@u'),
    ('""', '""'),
    ('@r1.test:""', '""@mx.example.test'),  # (Postfix's rewrite_tree drops the route after its `""` check)
    # swap_bangpath: the first '!' among the words as given, before the percent hack (Postfix's rewrite_tree)
    ("remote.test!user", "user@remote.test"),
    ("a.test!b!c", "b!c@a.test"),
    ("a.test!b%c.test", "b%c.test@a.test"),
    ("a%b.test!c", "c@a%b.test"),
    ('"a!b"', "a!b@mx.example.test"),
    ('"x y".test!"b c"', '"b c"@x y.test'),
])
def test_qualify(addr, qualified):
    assert rewriter().qualify(addr) == qualified


def test_qualify_without_the_percent_hack():
    assert rewriter(allow_percent_hack=False).qualify("user%remote.test") == "user%remote.test@mx.example.test"


def test_swap_bangpath_off_leaves_a_bang_path_a_local_part():
    rw = rewriter(swap_bangpath=False)
    assert rw.qualify("remote.test!user") == "remote.test!user@mx.example.test"
    assert rw.qualify("a.test!b%c.test") == "a.test!b@c.test"  # (the percent hack then)
    assert rw.resolved_address("remote.test!user@example.test") == "remote.test!user@example.test"


@pytest.mark.parametrize("addr, resolved", [
    ("remote.test!user@example.test", "user@remote.test"),  # the local domain dropped, then the path swapped
    ("a.test!b%c.test@example.test", "b%c.test@a.test"),  # '!' before '%' among the words
    ('"a.test!b"@example.test', "b@a.test"),  # (needless quotes: words to Postfix's tokenizer too)
    ('"a b!c%d.test"@example.test', '"a b!c"@d.test'),  # opened (resolve_dequoted_address): '%' before '!'
    ('"a\\\\b.u!h"@example.test', "h@ab.u"),  # opened, then words: a backslash goes (3.7.11: seed 70005)
    ("relay.test!u@remote.test", "relay.test!u@remote.test"),  # not a local domain: left to the next hop
])
def test_resolve_swaps_a_bang_path_of_a_local_domain_as_postfix(addr, resolved):
    assert rewriter().resolved_address(addr) == resolved


@pytest.mark.parametrize("value, expected", [
    ("smtp", ("smtp", "")),
    ("smtp:", ("smtp", "")),
    ("discard:", ("discard", "")),
    ("smtp:[10.0.0.1]:587", ("smtp", "[10.0.0.1]:587")),
    ("smtp:[::1]:25", ("smtp", "[::1]:25")),
    ("relay:mx.example", ("relay", "mx.example")),
])
def test_split_transport(value, expected):
    assert split_transport(value) == expected


@pytest.mark.parametrize("domain, domains, parent, expected", [
    ("example.com", ("example.com",), False, True),
    ("a.example.com", ("example.com",), False, False),
    ("example.com", ("example.com",), True, True),
    ("a.example.com", ("example.com",), True, True),
    ("a.b.example.com", ("example.com",), True, True),
    ("badexample.com", ("example.com",), True, False),
    ("x.test", (), True, False),
    ("x.test", ("y.test", "x.test"), False, True),
])
def test_domain_names(domain, domains, parent, expected):
    assert (domain in DomainNames(domains, parent=parent)) is expected


def _scanned(domain: str, domains, parent: bool) -> bool:
    """The list as Postfix's match_list scans it: the name itself, or (parent style) a name ending in `.entry`."""
    return any(domain == entry or (parent and domain.endswith("." + entry)) for entry in domains)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.text(alphabet="ab.", max_size=6), max_size=6), st.text(alphabet="ab.", max_size=12), st.booleans())
def test_domain_names_answer_as_the_scan(domains, domain, parent):
    assert (domain in DomainNames(domains, parent=parent)) is _scanned(domain, domains, parent)


class _CountingSet(frozenset):
    looked_up = 0

    def __contains__(self, key):
        type(self).looked_up += 1
        return super().__contains__(key)


def test_a_long_name_is_looked_up_at_the_parents_no_longer_than_the_longest_entry():
    """A 100 KB domain of 50 000 labels (a local submission's) is not looked up at each label: only the parents that
    could be an entry (the review's sendmail of 10 such recipients held the event loop 5 s)."""
    names = DomainNames(("x.example", "y.test"), parent=True)
    names._names = _CountingSet(names._names)
    assert "a." * 50_000 + "x.example" in names
    assert "a." * 50_000 + "com" not in names
    assert _CountingSet.looked_up <= 2 + 2 * len("x.example")


@pytest.mark.parametrize("key", ["mydestination", "virtual_alias_domains", "virtual_mailbox_domains", "relay_domains"])
def test_a_leading_dot_entry_is_a_config_error_naming_the_entry(key):
    """Postfix matches `.example.com` against nothing in these lists (exact lists; relay_domains already covers
    subdomains), so mailflow says so instead of routing differently."""
    with pytest.raises(ValueError, match=r"'\.example\.com'"):
        Config(**{key: (".example.com",)})


# ---------------------------------------------------------------------------------------------- local users


def test_is_known_local_with_local_recipient_maps():
    rw = Rewriter(Config(**BASE, local_recipient_maps=("inline:{postmaster=x, Alice=x}",)))
    assert rw.is_known_local("postmaster@example.test")
    assert rw.is_known_local("alice@example.test")
    assert rw.is_known_local("ALICE@localhost")
    assert rw.is_known_local("alice")  # unqualified
    assert not rw.is_known_local("bob@example.test")
    assert not rw.is_known_local("alice.smith@example.test")
    assert rw.is_known_local("alice+tag@example.test")  # the extension is ignored when the user is listed


def test_alias_names_are_known_local_recipients(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("staff: alice, bob\n")
    rw = Rewriter(Config(**BASE, local_recipient_maps=("inline:{alice=x}",), alias_maps=(f"texthash:{aliases}",)))
    assert rw.is_known_local("staff@example.test") and rw.is_known_local("Staff+x@localhost")
    assert not rw.is_local_user("staff@example.test")
    assert rw.alias("staff@example.test")[1:] == ("staff", "alice, bob")  # the value as written, read when expanded
    assert not rw.is_known_local("carol@example.test")


def test_an_alias_value_mailflow_cannot_take_leaves_every_name_a_known_local_recipient(tmp_path):
    """smtpd's RCPT check asks only for the name: a bad value (read when expanded) never makes it 451 4.3.0."""
    aliases = tmp_path / "aliases"
    aliases.write_text("a0: nobody\na3: nobody+x, ./mbox\n")
    rw = Rewriter(Config(**BASE, local_recipient_maps=("inline:{nobody=x}",), alias_maps=(f"texthash:{aliases}",)))
    assert rw.is_known_local("a0@example.test") and rw.is_known_local("a3@example.test")


def test_is_known_local_with_an_empty_list_accepts_anyone():
    rw = Rewriter(Config(**BASE, local_recipient_maps=()))
    assert rw.is_known_local("anyone@example.test")
    assert rw.is_known_local("x")


def test_default_local_recipients_are_postmaster_only():
    rw = Rewriter(Config())
    assert rw.is_known_local("postmaster@localhost")
    assert not rw.is_known_local("root@localhost")


def test_local_user_is_the_lower_cased_local_part():
    rw = rewriter()
    assert rw.local_user("Alice@Example.test") == "alice"
    assert rw.local_user("bob") == "bob"
    assert rw.local_user("Bob+Tag@example.test") == "bob"


# ---------------------------------------------------------------------------------------------- UTF-8 domains


@pytest.mark.parametrize("overrides, klass", [
    ({"mydestination": ("bücher.example",)}, LOCAL),
    ({"relay_domains": ("bücher.example",)}, RELAY),
])
def test_utf8_domain_in_the_config_matches_utf8_recipients(overrides, klass):
    rw = rewriter(**overrides)
    assert rw.classify("user@bücher.example") is klass
    assert rw.classify("user@a.bücher.example") is (RELAY if klass is RELAY else AddressClass.DEFAULT)


@pytest.mark.parametrize("overrides, addr, authorized", [
    ({}, "user@example.test", True),
    ({}, "user@relay.test", True),
    ({}, "user@remote.test", False),
    ({}, "user%relay.test@example.test", True),  # the percent hack: user@relay.test
    ({}, "user%remote.test@example.test", False),  # user@remote.test
    # routed (Postfix's RESOLVE_FLAG_ROUTED, allow_untrusted_routing = no): the next hop may honour the operator
    ({}, "user%remote.test@relay.test", False),
    ({}, "remote.test!user@relay.test", False),
    ({}, '"user@remote.test"@relay.test', False),
    ({}, "remote.test!user@example.test", False),
    ({}, "relay.test!user@example.test", True),  # swap_bangpath: user@relay.test
    ({"swap_bangpath": False}, "relay.test!user@example.test", False),
    ({"allow_percent_hack": False}, "user%remote.test@example.test", False),
    ({"allow_percent_hack": False}, "user%relay.test@example.test", False),  # (all compared with Postfix 3.7.11)
    ({}, "user", False),  # user@mx.example.test: myorigin is not one of this host's domains here
    ({"myhostname": "example.test"}, "user", True),
])
def test_authorized_destination_is_postfix_permit_auth_destination(overrides, addr, authorized):
    assert rewriter(**overrides).authorized_destination(addr) is authorized


def test_a_failed_unlisted_check_is_logged_with_what_it_was_asked_about(caplog):
    """reject_unlisted_sender asks the same rule: its failure's log line names a sender, not an RCPT."""
    from mailflow.routing.addressmap import AddressMapper
    config = Config(**{**BASE, "local_recipient_maps": ("fail:down",)})
    r = Rewriter(config)
    refusal = r.recipient_refusal("s@example.test", AddressMapper(config, r), None, "Sender address")
    assert refusal is not None and str(refusal) == "451 4.3.0 <s@example.test>: Temporary lookup failure"
    assert "smtpd: Sender address <s@example.test>: " in caplog.text


def test_classify_resolved_takes_the_domain_as_it_is():
    """authorized_destination and permit_mx_backup resolve once, then classify what they resolved."""
    r = rewriter()
    assert r.classify("u%relay.test@example.test") is RELAY  # the percent hack: u@relay.test
    assert r.classify_resolved("u%relay.test@example.test") is LOCAL
    assert r.classify_resolved(r.resolved_address("u%relay.test@example.test")) is RELAY


@pytest.mark.parametrize("addr", ["bob@", "bob@x..test", "bob@.x.test", "bob@-x.test", "bob@[192.0.2.1",
                                  "bob@[IPv6:zz]", "bob@[300.1.1.1]", "bob@192.0.2.1", "bob@exa mple.test",
                                  "bob@[0.1.2.3]", "bob@[1.2.3]", "bob@[IPv6:fe80::1%eth0]", "bob@[192.0.2.010]",
                                  "bob@[192.0.2.09]"])
def test_a_domain_that_is_no_host_name_nor_address_literal_resolves_to_bad_address_syntax(addr):
    """Postfix's resolve flags such a domain an error (valid_hostname, valid_mailhost_literal) and its qmgr bounces
    it at once, 5.1.3; a bad literal used to be deferred as "bad SMTP nexthop" until the queue lifetime ran out,
    and the others went to the DNS."""
    rw = rewriter(relayhost="[10.0.0.1]:587", transport_maps=("inline:{ *=smtp:[10.0.0.2] }",))
    res = rw.resolve(addr)
    assert (res.transport, res.nexthop) == ("error", "5.1.3 bad address syntax")


@pytest.mark.parametrize("addr", ["bob@x.test", "bob@x_y.test", "bob@[192.0.2.1]", "bob@[IPv6:2001:db8::1]",
                                  "bob@bücher.example", "bob@x.test.", "bob@1x.test", "bob@[192.0.2.01]",
                                  "bob@[0.0.0.0]"])
def test_a_host_name_or_address_literal_is_no_bad_syntax(addr):
    """Literals as Postfix 3.7's valid_ipv4_hostaddr takes them: it queued bob@[192.0.2.01] for its smtp and
    bounced bob@[0.1.2.3] ("bad initial octet value"), as the test above."""
    assert rewriter().resolve(addr).transport == "smtp"


def test_an_alias_key_is_asked_in_postfix_s_quoting_then_in_internal_form():
    """local(8)'s get_alias: `"al.1."` then `al.1.`, the extension split off the internal form (against Postfix
    3.7.11: test_quoting_vs_postfix.py)."""
    rw = rewriter(alias_maps=('inline:{ {al.1. = a@x.test}, {"b c" = b@x.test} }',))
    assert rw.alias('"al.1."@example.test')[1] == "al.1."
    assert rw.alias('"al.1.+x"@example.test')[1] == "al.1."
    assert rw.alias('"b c+x"@example.test')[1] == '"b c"'


def test_addresses_longer_than_smtpd_takes_are_resolved_but_not_kept():
    """The resolve caches keep CLASS_CACHE_SIZE addresses each; kept too, 4096 addresses of 2 KB with an emoji
    (a local submission's, a header's: smtpd refuses those over 254 UTF-8 bytes) held 32.6 MiB at the peak."""
    rw = rewriter()
    assert rw.resolve("warm@relay.test").address_class is RELAY
    tracemalloc.start()
    try:
        for n in range(4000):
            long = f"{n:08d}{'x' * 1986}\U0001F600@relay.test"
            assert rw.resolve(long) == Resolution(RELAY, "relay", "relay.test", long)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0660"])
def test_a_virtual_owner_or_limit_of_other_digits_than_ascii_is_a_table_failure(value):
    """`²` passes str.isdigit and made int() raise (not the LookupRetry a bad value is); `١٠` int() read as 10."""
    from mailflow.errors import LookupRetry
    rw = rewriter(virtual_uid_maps=(f"inline:{{v@x.test={value}}}",),
                  virtual_mailbox_limit_maps=(f"inline:{{v@x.test={value}}}",))
    with pytest.raises(LookupRetry, match="not a numeric user or group id"):
        rw.virtual_owner("v@x.test")
    with pytest.raises(LookupRetry, match="not a number of bytes"):
        rw.virtual_mailbox_limit("v@x.test")


def test_a_domain_that_is_no_domain_name_is_of_the_default_class_whatever_the_lists():
    """Postfix's resolve short-cuts a domain valid_hostname refuses (over 255 octets, an empty label) to the default
    class, no list asked: a subdomain of a relay_domains entry that long was relayed, after a lookup of each label."""
    rw = rewriter(relay_domains=("x.example",))
    assert rw.classify("u@" + "a." * 130 + "x.example") is AddressClass.DEFAULT
    assert rw.classify("u@a..x.example") is AddressClass.DEFAULT
    assert rw.classify("u@" + "a." * 100 + "x.example") is AddressClass.RELAY
