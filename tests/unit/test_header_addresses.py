"""The addresses of address header fields, found and rewritten in place (mailflow.header_addresses).

Covered: which spans of a field value are addresses (bare, in angle brackets, with a source route, quoted local
parts, literals; group names, display names, comments, `<>` and malformed mailboxes are not); which fields are
rewritten and through which class's function; a field rewritten keeps everything but its addresses, and a
header section with nothing to change comes back as the same object; any bytes at all never raise.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailflow.header_addresses import (RECIPIENT_FIELDS, SENDER_FIELDS, TOKEN_LIMIT, VALUE_CACHE_BYTES,
                                       _spans_of_tokens, address_spans, closed_address, mailbox_spans,
                                       rewrite_address_fields, value_addresses)


def addresses(value: bytes) -> list[bytes]:
    return [value[start:end] for start, end in address_spans(value)]


def qualify(addr: str) -> str:
    return addr if "@" in addr or not addr else addr + "@example.test"


def test_the_address_of_each_mailbox_is_found():
    assert addresses(b" bob\r\n") == [b"bob"]
    assert addresses(b" Bob Smith <bob>, carol@x.test (Carol), <dave@y.test>\r\n") == [b"bob", b"carol@x.test",
                                                                                     b"dave@y.test"]
    assert addresses(b' "Smith, Bob" <bob@x>, "a b"@c, u@[192.0.2.1]\r\n') == [b"bob@x", b'"a b"@c', b"u@[192.0.2.1]"]
    # a source route is part of the span: the rewrite drops it, as Postfix's rewrite_tree does
    assert addresses(b" <@r1.test,@r2.test:u@d.test>\r\n") == [b"@r1.test,@r2.test:u@d.test"]
    assert addresses(b" friends: a, b@x;, c\r\n") == [b"a", b"b@x", b"c"]  # a group's name is none
    assert addresses(b" (only (nested) comment) a (x)\r\n\t, b\r\n") == [b"a", b"b"]


def test_what_is_not_one_address_is_left_out():
    assert addresses(b" <>\r\n") == []
    assert addresses(b" undisclosed-recipients:;\r\n") == []
    assert addresses(b" John Smith\r\n") == []  # two words: no address to qualify
    assert addresses(b" a (c) @b\r\n") == []  # a comment inside
    assert addresses(b" <a@b\r\n") == []  # never closed


def test_mailbox_spans_add_the_commas_postfix_adds_between_words_side_by_side():
    """sendmail's recipients (command line, -t): `a@x b@y` is two addresses, as Postfix's tok822_parse makes it;
    words inside angle brackets' mailbox stay its display name, and what is still not one address is None."""
    def mailboxes(value: bytes) -> list[bytes | None]:
        return [value[span[0]:span[1]] if span else None for span in mailbox_spans(value)]

    assert mailboxes(b"a@x.test b@y.test, c@z.test") == [b"a@x.test", b"b@y.test", b"c@z.test"]
    assert mailboxes(b'Joe a@x.test "q s" (c) [1.2.3.4]') == [b"Joe", b"a@x.test", b'"q s"', b"[1.2.3.4]"]
    assert mailboxes(b"Joe Q <j@x.test>, j@x.test (Joe Q)") == [b"j@x.test", b"j@x.test"]
    assert mailboxes(b"a (c) @b") == [None]
    # a dot is an operator of Postfix's tokenizer, not part of an atom: words it joins are one local part (they
    # were cut into two mailboxes: `a."b c"@x.test` went to a.@origin and "b c"@x.test)
    assert mailboxes(b'a."b c"@x.test, "a"."b"@x.test') == [b'a."b c"@x.test', b'"a"."b"@x.test']
    assert mailboxes(b'"a b".c@x.test d@y.test') == [b'"a b".c@x.test', b"d@y.test"]


def test_sender_and_recipient_fields_go_through_their_own_function():
    head = (b"From: bob\r\nSender: s\r\nReply-To: r\r\nTo: t\r\nCc: c\r\nResent-To: rt\r\nSubject: bob\r\n"
            b"X-Other: bob\r\n")
    out = rewrite_address_fields(head, lambda a: f"S.{a}", lambda a: f"R.{a}")
    assert out == (b"From: S.bob\r\nSender: S.s\r\nReply-To: S.r\r\nTo: R.t\r\nCc: R.c\r\nResent-To: R.rt\r\n"
                   b"Subject: bob\r\nX-Other: bob\r\n")
    assert {"from", "sender", "reply-to", "errors-to"} <= SENDER_FIELDS
    assert {"to", "cc", "resent-to", "apparently-to"} <= RECIPIENT_FIELDS


def test_a_rewritten_field_keeps_its_names_comments_and_folding():
    head = b'to: "Bob" <bob>,\r\n  carol (the boss),\r\n\tdave@x.test\r\nFROM :MAILER-DAEMON (Mail System)\r\n'
    assert rewrite_address_fields(head, qualify, qualify) == (
        b'to: "Bob" <bob@example.test>,\r\n  carol@example.test (the boss),\r\n\tdave@x.test\r\n'
        b"FROM :MAILER-DAEMON@example.test (Mail System)\r\n")


def test_nothing_to_change_gives_the_same_header_section_back():
    head = b"From: bob@x.test\r\nTo: <>\r\nSubject: hi\r\n"
    assert rewrite_address_fields(head, qualify, qualify) is head


def test_8bit_addresses_and_display_names_come_back_as_they_were():
    head = "From: Jöhn <jöhn>\r\nTo: ünqualified\r\n".encode() + b"Cc: \xff <x>, <\xff>\r\n"
    assert rewrite_address_fields(head, qualify, qualify) == (
        "From: Jöhn <jöhn@example.test>\r\nTo: ünqualified@example.test\r\n".encode()
        + b"Cc: \xff <x@example.test>, <\xff>\r\n")  # an address that is not UTF-8 is left alone


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_any_value_is_scanned_without_error_and_identity_keeps_it(value):
    for start, end in address_spans(value):
        assert 0 <= start < end <= len(value)
    head = b"To:" + value.replace(b"\n", b"\n ") + b"\r\n"
    assert rewrite_address_fields(head, lambda a: a, lambda a: a) is head


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"", b" ", b"\t", b"  "]), st.booleans(),
       st.from_regex(rb"[a-z0-9.+_-]{1,8}(@[a-z0-9.-]{1,8})?", fullmatch=True),
       st.sampled_from([b"", b" ", b"\r\n", b" \r\n", b"\n"]))
def test_the_fast_path_for_one_plain_address_agrees_with_the_tokenizer(lead, angle, addr, end):
    value = lead + (b"<" + addr + b">" if angle else addr) + end
    assert address_spans(value) == _spans_of_tokens(value)


def test_addresses_past_the_token_limit_are_left_as_they_came():
    value = b" " + b", ".join(b"u%d" % i for i in range(TOKEN_LIMIT)) + b"\r\n"  # 3 tokens an address
    spans = address_spans(value)
    assert 0 < len(spans) <= TOKEN_LIMIT // 3
    out = rewrite_address_fields(b"To:" + value, qualify, qualify)
    assert out.count(b"@example.test") == len(spans) and out.endswith(b", u%d\r\n" % (TOKEN_LIMIT - 1))
    assert b"@example.test@" not in out


@pytest.mark.parametrize("written, address", [
    ('"joe@x.test', "joe@x.test"), ('"joe smith@x.test', '"joe smith"@x.test'), ('"jo\\"e@x.test', '"jo\\"e"@x.test'),
    ("bob@[192.0.2.1", "bob@[192.0.2.1]"), ('"', ""), ('"a b"@x.test', '"a b"@x.test'),
    ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
    ('"[x@y.test', '"[x"@y.test')])
def test_a_quoted_string_or_literal_never_closed_is_closed_as_postfixs_tokenizer_closes_it(written, address):
    """What Postfix 3.7 queued for each (its internal form written back with quote_822_local); table values
    (canonical, virtual, aliases) are closed so too."""
    assert closed_address(written) == address
    assert value_addresses(written) == ((address,) if address else (None,))


@pytest.mark.parametrize("written, address", [
    ('a\\"b@x.test', '"a\\"b"@x.test'), ('a\\.b@x.test', "a.b@x.test"), ('"a\\"b@x.test', '"a\\"b"@x.test'),
    ("bob@[192.0.2.1\\]", "bob@[192.0.2.1\\]]")])
def test_a_backslash_outside_quotes_escapes_the_next_character_as_in_postfixs_tokenizer(written, address):
    """tok822_scan's atoms take a quoted-pair too: `a\\"b@x.test` opens no quoted string (it was closed as
    "a\\\\b"@x.test, another local part); the internal form a"b is written back quoted, as Postfix queues it."""
    assert closed_address(written) == address


def list_value(i: int, members: int = 1000) -> str:
    return ",".join(f"u{i}x{j}@lists.example" for j in range(members))


def test_parsed_table_values_are_remembered_up_to_a_budget_of_bytes():
    # a virtual alias list of 1 000 members is a 22 KB value: 1 024 of them remembered held ~70 MB of addresses
    value_addresses.cache_clear()
    try:
        for i in range(400):
            assert len(value_addresses(list_value(i))) == 1000
        kept = value_addresses.cache_info().currsize
        assert 0 < kept <= VALUE_CACHE_BYTES // (2 * len(list_value(0)))
        value_addresses(list_value(399))  # the most recent is still remembered
        assert value_addresses.cache_info().hits == 1
        huge = list_value(0, members=VALUE_CACHE_BYTES // 20)  # past the whole budget: parsed, never kept
        value_addresses(huge)
        assert value_addresses.cache_info().currsize <= kept
        value_addresses("@example.com")
        value_addresses("@example.com")
        assert value_addresses.cache_info().hits == 2
    finally:
        value_addresses.cache_clear()
