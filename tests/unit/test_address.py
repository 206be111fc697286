"""mailflow.address: split, normalise_domain and mailbox_syntax_error (RFC 5321, RFC 6531 for UTF-8)."""
from __future__ import annotations

import cProfile
import itertools
import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow import address
from mailflow.address import MAX_ADDRESS, is_utf8, mailbox_syntax_error, normalise_domain, split
from tests.support.calls import callees

# ---------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("addr, expected", [
    ("user@example.com", ("user", "example.com")),
    ("user", ("user", "")),
    ("", ("", "")),
    ('"a@b"@example.com', ('"a@b"', "example.com")),  # at the last '@'
    ("a@b@example.com", ("a@b", "example.com")),
    ("user@", ("user", "")),
    ("@example.com", ("", "example.com")),
    ("user@[10.0.0.1]", ("user", "[10.0.0.1]")),
])
def test_split(addr, expected):
    assert split(addr) == expected


# ---------------------------------------------------------------------------------------------- normalise_domain


@pytest.mark.parametrize("domain, expected", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("  example.com  ", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.Example.", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("[10.0.0.1]", "[10.0.0.1]"),
    ("", ""),
    ("a..bücher", ""),  # cannot be IDNA-encoded: "" rather than an exception
    # UTS 46 without transitional mapping, as Postfix (enable_idna2003_compatibility = no): ß and final sigma are
    # kept, not mapped to "ss" and "σ", which name other domains
    ("Straße.example", "xn--strae-oqa.example"),
    ("faß.bücher.example", "xn--fa-hia.xn--bcher-kva.example"),
    ("λόγος.example", "xn--oxapnm1c.example"),
])
def test_normalise_domain(domain, expected):
    assert normalise_domain(domain) == expected


_DOMAINISH = st.text(alphabet="abcXYZ019-.üßé", max_size=30)


@given(_DOMAINISH)
def test_normalise_domain_is_idempotent_and_ascii(domain):
    once = normalise_domain(domain)
    assert normalise_domain(once) == once
    assert once.isascii()
    assert once == once.lower()
    assert not once.endswith(".")


# ---------------------------------------------------------------------------------------------- syntax: accepted


@pytest.mark.parametrize("addr", [
    "user@example.com",
    "first.last@sub.example.com",
    "user+tag@example.com",
    "!#$%&'*+/=?^_`{|}~-@example.com",
    "USER@EXAMPLE.COM",
    "u@x",
    "user@ex_ample.com",  # against RFC 952, but in real names: Postfix's valid_hostname takes it too
    "user@_dmarc.example.com",
    "user@1.2.3.example",
    '"john doe"@example.com',
    '"a@b"@example.com',
    '"quote\\"inside"@example.com',
    '"back\\\\slash"@example.com',
    '""@example.com',
    "user@[10.0.0.1]",
    "user@[IPv6:2001:db8::1]",
    "user@[IPv6:::1]",
    "üser@example.com",
    "用户@例子.广告",
    "δοκιμή@παράδειγμα.δοκιμή",
    "user@bücher.example",
    "a" * 64 + "@example.com",
    # longer than RFC 5321's 64 octets, as VERP and SRS addresses are: accepted, as Postfix accepts them
    "a" * 65 + "@example.com",
    "SRS0=HHHH=TT=sender-domain.example=a.rather.long.local.part@forwarder.example",
    "ü" * 100 + "@example.com",
])
def test_valid_mailboxes(addr):
    assert mailbox_syntax_error(addr) is None


def test_trailing_dot_on_the_domain_is_accepted():
    # Not in RFC 5321's grammar, but accepted on purpose (Postfix does too); normalise_domain drops it.
    assert mailbox_syntax_error("user@example.com.") is None


# ---------------------------------------------------------------------------------------------- syntax: refused


@pytest.mark.parametrize("addr, reason", [
    ("user", "no domain"),
    ("user@", "no domain"),
    ("", "no domain"),
    ("@example.com", "bad local part"),
    (".user@example.com", "bad local part"),
    ("user.@example.com", "bad local part"),
    ("us..er@example.com", "bad local part"),
    ("us er@example.com", "bad local part"),
    ("us(er)@example.com", "bad local part"),
    ("a@b@example.com", "bad local part"),
    ('"unclosed@example.com', "bad local part"),
    ('"a"b"@example.com', "bad local part"),
    ('"a\\"@example.com', "bad local part"),
    ("a" * 250 + "@example.com", "address too long"),
    ("user@-example.com", "bad domain"),
    ("user@example-.com", "bad domain"),
    ("user@exa mple.com", "bad domain"),
    ("user@example..com", "bad domain"),
    ("user@.example.com", "bad domain"),
    ("user@1.2.3.4", "bad domain"),  # an address without its brackets (Postfix: numeric hostname)
    ("user@1.2.3.4.", "bad domain"),
    ("user@[10.0.0.1", "bad domain"),
    ("user@[IPv7:::1]", "bad domain"),
    ("user@[10.0.0.1].com", "bad domain"),
    ("user@example.com\r\n", "control character in address"),
    ("user\x00@example.com", "control character in address"),
    ("user@exa\tmple.com", "control character in address"),
    ('"a\x7fb"@example.com', "control character in address"),
    ("u@" + "a" * 250 + ".com", "address too long"),
    ("ü" * 30 + "@" + "ü" * 100 + ".de", "address too long"),  # 134 characters but 264 octets
])
def test_invalid_mailboxes(addr, reason):
    assert mailbox_syntax_error(addr) == reason


def test_length_limit_counts_octets_at_the_boundary():
    local = "a" * 60
    domain = ".".join(["b" * 60, "c" * 60, "d" * 60, "e" * (MAX_ADDRESS - 61 - 3 * 61)])
    addr = f"{local}@{domain}"
    assert len(addr) == MAX_ADDRESS
    assert mailbox_syntax_error(addr) is None
    assert mailbox_syntax_error(addr + "e") == "address too long"


def test_is_utf8():
    assert is_utf8("üser@example.com")
    assert is_utf8("user@bücher.example")
    assert not is_utf8("user@example.com")


# ---------------------------------------------------------------------------------------------- labels, literals


def test_domain_label_longer_than_63_octets_is_refused():
    assert mailbox_syntax_error("user@" + "a" * 64 + ".com") == "bad domain"
    assert mailbox_syntax_error("user@" + "a" * 63 + ".com") is None
    assert mailbox_syntax_error("user@" + "a" * 63 + ".com.") is None


@pytest.mark.parametrize("domain", ["\u0301x.example", "ab--\u00fc.example", "x\u3000y.example"])
def test_a_u_label_without_an_a_label_is_refused(domain):
    """A private Postfix 3.7.11 (smtputf8_enable = yes) answers RCPT TO with such a domain 501 5.1.3: UTS 46 refuses
    a leading combining mark and hyphens in places 3 and 4, and U+3000 maps to a space, no host name."""
    assert mailbox_syntax_error(f"user@{domain}") == "bad domain"


@pytest.mark.parametrize("domain", ["b\u00fccher.example", "\u2603.example", "\uff21\u00fc.example",
                                    "\u00fc\u3002example", "ex_\u00e4.example"])
def test_u_labels_that_postfix_takes_are_taken(domain):
    assert mailbox_syntax_error(f"user@{domain}") is None


def test_utf8_label_length_counts_its_a_label():
    assert mailbox_syntax_error("user@" + "ü" * 55 + ".de") is None  # 110 UTF-8 octets, A-label of 61
    assert mailbox_syntax_error("user@" + "ü" * 58 + ".de") == "bad domain"  # A-label over 63


@pytest.mark.parametrize("literal", ["[...]", "[999.1.1.1]", "[1]", "[IPv6:::::]", "[IPv6:1:2:3]", "[0.1.2.3]",
                                     "[IPv4:192.0.2.1]", "[IPv6:192.0.2.1]", "[]", "[IPv6:]", "[ 192.0.2.1]"])
def test_malformed_address_literals_are_refused(literal):
    assert mailbox_syntax_error(f"user@{literal}") == "bad domain"


@pytest.mark.parametrize("literal", ["[192.0.2.1]", "[0.0.0.0]", "[IPv6:2001:db8::1]", "[IPv6:::ffff:192.0.2.1]",
                                     "[IPv6:2001:db8:0:0:0:0:0:1]", "[IPV6:::1]", "[01.2.3.4]"])
def test_address_literals_holding_real_addresses_are_accepted(literal):
    """smtpd asks trivial-rewrite (smtpd_check_addr), whose valid_ipv4_hostaddr takes leading zeros."""
    assert mailbox_syntax_error(f"user@{literal}") is None


def test_ipv6_literal_with_a_zone_id_is_refused():
    assert mailbox_syntax_error("user@[IPv6:fe80::1%eth0]") == "bad domain"


def test_ipv6_literal_tag_is_case_insensitive():
    assert mailbox_syntax_error("user@[ipv6:::1]") is None
    assert mailbox_syntax_error("user@" + normalise_domain("[IPv6:::1]")) is None


@pytest.mark.parametrize("ch", ["\x85", "\x9b"])
def test_c1_control_characters_are_refused(ch):
    assert mailbox_syntax_error(f"us{ch}er@example.com") == "control character in address"


# ---------------------------------------------------------------------------------------------- properties

_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=10)
_locals = st.lists(_atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join).filter(lambda d: not d.replace(".", "").isdigit())


@given(_locals, _domains)
def test_any_dot_atom_at_a_domain_is_accepted(local, domain):
    # (a domain of digits and dots only is an IP address without its brackets: refused, see above)
    addr = f"{local}@{domain}"
    assert mailbox_syntax_error(addr) is None
    assert split(addr) == (local, domain)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), st.sampled_from("\r\n\x00"),
       st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
@settings(max_examples=100)
def test_any_string_with_cr_lf_or_nul_is_refused(before, bad, after):
    assert mailbox_syntax_error(before + bad + after) is not None


@given(_locals, _domains, st.sampled_from("\r\n\x00"), st.data())
def test_cr_lf_nul_anywhere_in_a_valid_address_is_refused(local, domain, bad, data):
    addr = f"{local}@{domain}"
    at = data.draw(st.integers(0, len(addr)))
    assert mailbox_syntax_error(addr[:at] + bad + addr[at:]) == "control character in address"


def test_client_ip_unmaps_ipv4_and_a_network_list_matches_it():
    from mailflow.address import client_ip
    from mailflow.tables.networks import NetworkList

    nets = NetworkList.from_items(["127.0.0.0/8", "2001:db8::/32"])
    assert str(client_ip("::ffff:127.0.0.1")) == "127.0.0.1"
    assert client_ip("unknown") is None and client_ip(None) is None
    assert nets.holds("::ffff:127.0.0.9") and nets.holds("2001:db8::1")
    assert not nets.holds("192.0.2.1") and not nets.holds("")


# ---------------------------------------------------------------------------------------------- parse_path

@pytest.mark.parametrize("text, expected", [
    ("<a@b.test>", ("a@b.test", "")),
    ("  <a@b.test> SIZE=10  BODY=8BITMIME", ("a@b.test", "SIZE=10  BODY=8BITMIME")),
    ("<>", ("", "")),
    ('<""> NOTIFY=NEVER', ("", "NOTIFY=NEVER")),  # an empty quoted string is the empty path, as in Postfix
    ('<""@b.test>', ('""@b.test', "")),
    ("a@b.test SIZE=10", ("a@b.test", "SIZE=10")),
    ("<a@b.test.>", ("a@b.test", "")),
    ("<@x.test,@y.test:a@b.test>", ("a@b.test", "")),
    ('<"a b>c"@b.test>', ('"a b>c"@b.test', "")),
    ('<"a\\"b"@b.test>', ('"a\\"b"@b.test', "")),
    ('<"alice"@b.test>', ("alice@b.test", "")),  # the quotes add nothing: dropped, as Postfix does
    ('<"a.\\l"@b.test>', ("a.l@b.test", "")),
    ('<"a..b"@b.test>', ('"a..b"@b.test', "")),  # not a dot-atom: the quotes stay
    ("<postmaster>", ("postmaster", "")),
    ("<jörg@bü.test>", ("jörg@bü.test", "")),
    ("\t<a@b.test>\tNOTIFY=NEVER", ("a@b.test", "NOTIFY=NEVER")),  # a tab separates words, as in Postfix
    # a vertical tab or form feed too (Postfix's smtpd_token: ISSPACE), against Postfix 3.7.11: test_smtpd_vs_postfix
    ("\x0b<a@b.test>\x0bSIZE=1", ("a@b.test", "SIZE=1")), ("<a@b.test>\x0cNOTIFY=NEVER", ("a@b.test", "NOTIFY=NEVER")),
    ("a@b.test\x0bSIZE=1", ("a@b.test", "SIZE=1")), ("a@b.test\tSIZE=1", ("a@b.test", "SIZE=1")),
    ("<<a@b.test>> SIZE=1", ("a@b.test", "SIZE=1")),  # brackets in brackets: Postfix takes them too
    ('<<"a>b"@b.test>>', ('"a>b"@b.test', "")),
    # words joined by dots, a dot first, last or doubled: in Postfix's own quoting (smtpd's tok822 internal form,
    # quoted again as its SMTP client sends it; against Postfix 3.7.11: test_quoting_vs_postfix.py)
    ('<a."b c"@b.test>', ('"a.b c"@b.test', "")),
    ('<"a"."b"@b.test>', ("a.b@b.test", "")),
    ('<"a\\b"@b.test>', ("ab@b.test", "")),  # a quoted pair that needs no quotes: undone
    ('<"a\\\\b"@b.test>', ('"a\\\\b"@b.test', "")),
    ("<a..b@b.test>", ('"a..b"@b.test', "")),
    ("<.a@b.test>", ('".a"@b.test', "")),
    ("<joe.@b.test.>", ('"joe."@b.test', "")),
    ('<"".u."a(b)"@b.test>', ('".u.a(b)"@b.test', "")),
    # no '@' outside quotes, one inside: Postfix keeps the internal form and splits it at its last '@' (its
    # quote_822_local), relaying `"x@y"` to y (against Postfix 3.7.11: test_quoting_vs_postfix.py, seed 70000)
    ('<"x@y">', ("x@y", "")),
    ('<"a.".x-y."x@y">', ('"a..x-y.x"@y', "")),
    ('<"x@y"."x@y".x-y>', ('"x@y.x"@y.x-y', "")),
    ('<"a;b"."x@y"@b.test>', ('"a;b.x@y"@b.test', "")),  # an '@' outside quotes: the domain's
])
def test_parse_path_accepts_what_postfix_accepts(text, expected):
    assert address.parse_path(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('<"joe"@X.Test.> NOTIFY=NEVER', ("joe@X.Test", '"joe"@X.Test.', "NOTIFY=NEVER")),
    ("<@relay.test:Route@x.test>", ("Route@x.test", "@relay.test:Route@x.test", "")),
    ("<<a@b.test.>>", ("a@b.test", "a@b.test.", "")),
])
def test_parse_written_path_gives_the_address_as_the_client_wrote_it(text, expected):
    """Postfix's original recipient (checked against Postfix 3.7's ORCPT): brackets off, the rest as written."""
    assert address.parse_written_path(text) == expected


def test_an_original_recipient_is_shown_as_postfix_shows_it():
    assert address.shown_original('"Team"@VDomain.Test.') == "Team@VDomain.Test."  # Postfix's X-Original-To
    assert address.shown_original('"a b"@x.test') == '"a b"@x.test' and address.shown_original('"joe"') == "joe"
    assert address.shown_original("@relay.test:route@x.test") == "route@x.test"  # (Postfix logs no orig_to)
    assert address.shown_original('"a.".x-y."x@y"') == '"a..x-y.x"@y'  # (its internal form split: seed 70000)
    assert address.shown_original('"joe@x.test') == '"joe@x.test'  # a quote never closed: it lost its last letter
    assert address.shown_original("joe.@x.test.") == '"joe."@x.test.'  # in Postfix's quoting, the domain as it is
    assert address.shown_original('@r.test:a."b c"@x.test') == '"a.b c"@x.test'
    assert address.shown_original("@[IPv6:2001:db8::1],@r.test:a@x.test") == "a@x.test"  # `:` inside [] is no end


def test_a_source_route_ends_at_the_first_colon_outside_an_address_literal():
    assert address.route_length("@r.test,@q.test:a@x.test") == len("@r.test,@q.test:")
    assert address.route_length("@[IPv6:2001:db8::1]:a@x.test") == len("@[IPv6:2001:db8::1]:")
    assert address.route_length("a@x.test") == address.route_length("@[IPv6:2001:db8::1]") == 0
    assert address.route_length("@[IPv6:1:" + "[" * 50_000) == 0  # an unclosed literal: no route, in linear time


@pytest.mark.parametrize("local, internal, external", [
    ("alice", "alice", "alice"),
    ('a."b c"', "a.b c", '"a.b c"'),
    ('"a"."b"', "a.b", "a.b"),
    ('"a\\"b"', 'a"b', '"a\\"b"'),
    ('""', "", '""'),
    ("a..b", "a..b", '"a..b"'),
    ('"a""b"', None, '"a""b"'),  # words side by side: two addresses to Postfix, none here
    ('"never closed', None, '"never closed'),
])
def test_a_local_part_has_postfix_s_internal_and_external_forms(local, internal, external):
    assert address.internal_local(local) == internal and address.external_local(local) == external


def test_the_percent_hack_splits_at_the_last_percent_outside_quotes():
    assert address.percent_split("user%y.test") == ("user", "y.test")
    assert address.percent_split('"<x>".a%b%y.test') == ('"<x>.a%b"', "y.test")
    assert address.percent_split('"user%y.test"') is None and address.percent_split("user") is None


def test_an_envelope_route_ends_at_its_first_colon_as_postfix_s_smtpd_cuts_it():
    """smtpd.c extract_addr: `if (*text == '@' && (colon = strchr(text, ':')) != 0) text = colon + 1`, then
    trivial-rewrite drops what route is left (`@b:` of `@a:@b:u@x`); an address literal does not hide a colon."""
    assert address.parse_written_path("<@a.test:@b.test:u@x.test>")[:2] == ("u@x.test", "@a.test:@b.test:u@x.test")
    assert address.parse_written_path("<@[192.0.2.1],@[192.0.2.2]:u@x.test>")[0] == "u@x.test"
    # deliberate difference (docs/security.md): three hops are cut whole; Postfix keeps `@c.test:u@x.test`
    assert address.parse_written_path("<@a.test:@b.test:@c.test:u@x.test>")[0] == "u@x.test"
    for text in ("<@[IPv6:2001:db8::1]:u@x.test>", "<@[IPv6:2001:db8::1],@b.test:u@x.test>"):
        with pytest.raises(address.PathError):
            address.parse_written_path(text)


def test_a_bang_path_splits_at_its_first_bang_outside_quotes():
    assert address.bang_split('"a\\b".u!h') == ("h", "ab.u")
    assert address.bang_split("a!b!c") == ("b!c", "a")
    assert address.bang_split('x!"b c"') == ('"b c"', "x")
    assert address.bang_split('"a!b"') is None and address.bang_split("ab") is None


def test_tidy_writes_the_local_part_in_postfix_s_quoting_and_drops_a_route():
    assert address.tidy('a."b c"@x.test.') == '"a.b c"@x.test'
    assert address.tidy('@r1.test,@r2.test:"a"."b"@x.test') == "a.b@x.test"
    assert address.tidy("a b@x.test") == "a b@x.test"  # no words: as it is


def test_a_quoted_local_part_that_is_a_source_route_loses_the_route_as_postfix_s_rewrite_drops_it():
    assert address.tidy('"@a.test:alice"@x.test') == "alice@x.test"
    assert address.tidy('"@a.test,@b.test:al ice"@x.test') == '"al ice"@x.test'
    assert address.tidy('"@x:y@z"@x.test') == '"y@z"@x.test'
    assert address.tidy('"@x:"@x.test') == '""@x.test'
    assert address.tidy('"@x:y"') == "y"
    assert address.tidy('"@x:u@y.test"') == "u@y.test"  # (unqualified: split at its last `@`, as Postfix's quoting)
    # a route whose first `:` is inside an address literal is left whole (cut there, it would leave no address)
    assert address.tidy('"@[IPv6:2001:db8::1]:a"@x.test') == '"@[IPv6:2001:db8::1]:a"@x.test'
    assert address.tidy('"@x:a b@y.test"') == '"a b"@y.test'
    assert address.tidy('"@x:"') == '"@x:"'  # (nothing after the route, no domain: no route to Postfix either)
    assert address.tidy('"@x"@[IPv6:::1]') == '"@x"@[IPv6:::1]'  # (no `:` in the local part: smtpd refuses it)
    assert address.parse_path('<"@x:u@y.test">')[0] == '"@x:u@y.test"'  # (kept as written: rewriting drops it)
    assert address.internal_form('"@x:u@y.test"') == "@x:u@y.test"  # (as Postfix's replies name it)


def test_a_header_address_keeps_its_quoted_source_route_as_postfix_s_rewrite_of_header_words_does():
    assert address.tidy('"@a.test:joe"@x.test', envelope=False) == '"@a.test:joe"@x.test'
    assert address.tidy('"@a.test:joe"', envelope=False) == '"@a.test:joe"'
    assert address.tidy('@r.test:"joe"@x.test.', envelope=False) == "joe@x.test"  # (a written route still goes)
    assert address.bared_route('"@a.test:joe"@x.test') == "@a.test:joe@x.test"  # (as Postfix writes it back)
    assert address.bared_route('"@a:b c"@x.test') == '@a:"b c"@x.test'
    assert address.bared_route('"@a:"@x.test') == '@a:""@x.test'
    assert address.bared_route('"@a.test:joe"') == '"@a.test:joe"'  # (unqualified: as it is)
    assert address.bared_route('"a b"@x.test') == '"a b"@x.test'


def test_a_source_route_ends_at_its_first_colon_outside_an_address_literal():
    assert address.tidy("@[IPv6:2001:db8::1]:u@x.test") == "u@x.test"
    assert address.tidy("@r.test,@[IPv6:2001:db8::1]:u@x.test.") == "u@x.test"
    assert address.percent_split("@[IPv6:2001:db8::1]:u%y.test") == ("u", "y.test")


@pytest.mark.parametrize("text", ["<a@b.test", "<a@b.test>x", "<a b@b.test>", "<a\\b@b.test>", "<a,b@b.test>",
                                  "<a@>", '<"a""b"@b.test>', "a@b<x>", '<"a@b.test>', "<(c)a@b.test>", '<"a"b@b.test>',
                                  "<<a@b.test>", "<a@b.test>>", "<a@b.test>\x1cSIZE=1", "<a@b.test>\u00a0SIZE=1",
                                  # three pairs: Postfix's smtpd strips one, its tokenizer reads one route-addr
                                  "<<<a@b.test>>>", "<<<a@b.test> > >", "< < <a@b.test> > >"])
def test_parse_path_refuses_malformed_paths(text):
    with pytest.raises(address.PathError):
        address.parse_path(text)


def test_min_user():
    assert address.is_min_user("-oQ/x@y.test") and not address.is_min_user("a-b@y.test")


@pytest.mark.parametrize("char", [chr(c) for c in range(0x100)] + ["\u0100", "\u3002", "\ud800", "\uffff",
                                                                    "\U00010000", "\U0010ffff"])
def test_the_character_classes_are_rfc_5322s_and_every_non_ascii_character(char):
    """The classes are written as what they leave out of ASCII (a class ranging to U+10FFFF costs re 10-20 ms to
    compile at every start of sendmail): atext, qtext and a label's characters, plus all of non-ASCII."""
    atext = char.isascii() and (char.isalnum() or char in "!#$%&'*+/=?^_`{|}~-") or not char.isascii()
    qtext = not char.isascii() or 0x20 <= ord(char) <= 0x7e and char not in '"\\'
    label = not char.isascii() or char.isalnum() or char == "_"
    assert bool(address._DOT_ATOM_RE.fullmatch(char)) == atext
    assert bool(address._LOCAL_RE.fullmatch(f'"{char}"')) == qtext
    assert bool(address._DOMAIN_RE.fullmatch(char)) == label
    assert bool(address._DOMAIN_RE.fullmatch(f"a{char}b")) == (label or char in "-.")


@pytest.mark.parametrize("literal, ip", [
    ("[192.0.2.01]", "192.0.2.1"), ("[192.0.2.001]", "192.0.2.1"), ("[0.0.0.0]", "0.0.0.0"),
    ("[255.1.2.3]", "255.1.2.3"),
    ("[0.1.2.3]", None), ("[1.2.3]", None), ("[1.2.3.256]", None), ("[1..2.3]", None), ("[1.2.3.4.]", None),
    ("[192.0.2.1 x]", None), ("[IPv6:2001:DB8::1]", "2001:db8::1"), ("[ipv6:::1]", "::1"), ("[IPv6:1::]", "1::"),
    ("[IPv6:fe80::1%eth0]", None), ("[IPv6:1::2::3]", None), ("[IPv6:12345::]", None), ("[IPv6::1]", None),
    ("[IPv6:1:2:3:4:5:6:7:8:9]", None), ("[IPv6:::1.2.3]", None), ("[IPv6:::ffff:192.0.2.01]", "::ffff:c000:201")])
def test_address_literals_as_postfixs_valid_ipv4_and_ipv6_hostaddr_take_them(literal, ip):
    """Postfix 3.7.11's trivial-rewrite took [192.0.2.01], [192.0.2.001] and [255.1.2.3] and refused [0.1.2.3]
    ("bad initial octet value"), [1.2.3] ("invalid octet count") and [1.2.3.256] ("invalid octet value")."""
    assert address.literal_ip(literal) == ip


@pytest.mark.parametrize("literal, ip", [
    ("[192.0.2.07]", "192.0.2.7"), ("[007.0.2.1]", "7.0.2.1"), ("[192.0.2.010]", None), ("[192.0.2.09]", None),
    ("[192.0.2.0255]", None), ("[IPv6:::ffff:192.0.2.010]", None)])
def test_a_zero_padded_octet_is_taken_only_where_decimal_and_octal_agree(literal, ip):
    """Postfix takes [192.0.2.010] and connects through glibc's inet_aton, to 192.0.2.8 (octal); [192.0.2.09] it
    takes and cannot connect to. mailflow read them as .10 and .9: another host than the one Postfix reaches.
    An octet with a leading zero is taken when both readings agree (below 8); the others are no address (5.1.3)."""
    assert address.literal_ip(literal) == ip
    if ip is not None and ":" not in literal:
        assert socket.inet_ntoa(socket.inet_aton(literal[1:-1])) == ip  # the host Postfix connects to


@pytest.mark.parametrize("name, valid", [
    ("relay.test", True), ("a_b.relay.test", True), ("123.relay.test", True), ("relay.test.", False),
    ("r\u00e9lay.test", False), ("1.2.3.4", False), ("[192.0.2.1]", False), ("a..test", False), ("-a.test", False),
    (".".join(["a" * 63] * 4), True), (".".join(["a" * 63] * 4) + "b", False), ("a" * 64 + ".test", False),
    ("", False)])
def test_is_valid_hostname_is_postfixs_valid_hostname(name, valid):
    """One check for ETRN's site, myhostname and XCLIENT's NAME: hostname_gripe's (255 octets, no literal)."""
    assert address.is_valid_hostname(name) is valid
    assert (address.hostname_gripe(name) is None) is valid


def test_is_valid_domain_and_is_valid_hostname_agree_on_ascii_names():
    """Two codings of Postfix's valid_hostname (a domain's expression, hostname_gripe's loop with its words) that
    must differ only where a domain may: UTF-8 labels, one trailing dot, an address literal."""
    rng = random.Random(7)
    names = ["".join(rng.choice("a1-_.Z9 :[") for _ in range(rng.randrange(12))) for _ in range(20000)]
    names += ["a" * 63, "a" * 64, "b." + "a" * 63, ".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4) + "b"]
    for name in (n for n in names if not n.endswith(".")):
        assert address.is_valid_domain(name) is address.is_valid_hostname(name), name


def test_an_ascii_domain_is_judged_by_its_labels_lengths_in_one_match():
    """Labels of 1-63 characters, counted as they are (ASCII: their A-label form), one trailing dot at most: the
    same verdict as the label by label count for each length around the limit, without a call a label (a
    domain is judged for every MAIL and RCPT)."""
    rng = random.Random(11)
    for _ in range(3000):
        labels = ["".join(rng.choice("ab9_-") for _ in range(rng.choice([0, 1, 2, 61, 62, 63, 64, 65])))
                  for _ in range(rng.randint(1, 4))]
        name = ".".join(labels) + rng.choice(["", ".", ".."])
        by_labels = (len(name) <= 255 and bool(address._DOMAIN_RE.fullmatch(name))
                     and all(0 < len(label) <= 63 for label in name.rstrip(".").split("."))
                     and not address._NUMERIC_DOMAIN.fullmatch(name))
        assert address.is_valid_domain(name) is by_labels, name
    profile = cProfile.Profile()
    profile.runcall(address.is_valid_domain, "dest." + "a" * 63 + ".sub.domain.test")
    made = callees(profile, "is_valid_domain", "address.py")
    assert "_labels_fit" not in made and sum(made.values()) <= 5  # (startswith, len, isascii, two matches)


def test_vrfy_argument_splits_words_at_ascii_white_space_only():
    assert address.vrfy_argument("Joe\t <a@b.test>  SMTPUTF8") == ("Joe <a@b.test>", True)
    assert address.vrfy_argument("a@b.test\u00a0SMTPUTF8") == ("a@b.test\u00a0SMTPUTF8", False)
    assert address.vrfy_argument("a@b.test\x1cSMTPUTF8") == ("a@b.test\x1cSMTPUTF8", False)


@pytest.mark.parametrize("text, expected", [
    ("<a@b.test>", "a@b.test"), ("a@b.test", "a@b.test"), ("<@r.test:a@b.test>", "a@b.test"),
    ("Joe <a@b.test>", "a@b.test"), ('"Joe X" <a@b.test>', "a@b.test"),
    # the RFC 822 forms MAIL and RCPT read (Postfix's extract_addr reads VRFY's argument as theirs)
    ("<a@b.test>(c)", "a@b.test"), ("<Joe <a@b.test>>", "a@b.test"), ("<a@b.test >", "a@b.test"),
    ("a@b.test (c)", "a@b.test"), ("<a(c)@b.test>", "a@b.test"), ('<"a(b)"@b.test>', '"a(b)"@b.test'),
    ("<Joe <a@b.test> >", "a@b.test"), ("< <a@b.test> >", "a@b.test"), ("<a@b.test> (c)", "a@b.test"),
    ("(c) <a@b.test>", "a@b.test"), ("Jo(c)e <a@b.test>", "a@b.test"),  # (a comment between phrase words)
    ("<Al(c)ice <x@evil.test>>", "x@evil.test"),
    # none, or more than one
    ("<>", ""), ("a@b.test c@d.test", ""), ("<ali(c)ce@b.test>", ""), ("<a@b.test>(", ""), ("<a@b.test>;", ""),
    ("J@e <a@b.test>", ""),
    # two pairs at most, the outer one only where the word ends in it
    ("<<<alice@local.test> > >", ""), ("<<alice@local.test>>(c)", ""), ("< <a@b.test> >(c)", ""),
])
def test_vrfy_address_is_read_as_a_mail_or_rcpt_path_word(text, expected):
    assert address.vrfy_address(text) == expected


@pytest.mark.parametrize("local, internal", [("a.b", "a.b"), ('a."b c"', "a.b c"), ('"a\\\\b"', "a\\b"),
                                             ('"a""b"', 'a""b'), ("a b", "a b"), ("", "")])
def test_any_local_part_has_an_internal_form(local, internal):
    assert address.as_internal_local(local) == internal


def test_an_address_is_tidy_only_when_tidy_leaves_it_as_it_is():
    for n in range(6):
        for chars in itertools.product('a".@:', repeat=n):
            addr = "".join(chars)
            assert not address.is_tidy(addr) or address.tidy(addr) == addr, addr
    assert address.is_tidy("joe@x.test") and not address.is_tidy("joe.") and not address.is_tidy('"joe"@x.test')
