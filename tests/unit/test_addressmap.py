"""cleanup's envelope address mapping (mailflow.routing.addressmap.AddressMapper).

Covered: `sender()` (null sender, qualification with myorigin, sender_canonical_maps before canonical_maps,
masquerade_domains with `!` exceptions and masquerade_exceptions, no masquerading of recipients);
`recipient()` (recipient_canonical_maps before canonical_maps, `@domain` results, extension propagation,
recursive mapping and loops, unqualified keys only for this host's domains); `expand()` (virtual_alias_maps:
one-to-many, order, recursion, self reference, loops, recursion and expansion limits, a table that cannot
answer); `recipients()` (duplicates, original/notify/orcpt, renumbering; the automatic BCC recipients: order,
NOTIFY=NEVER, which address each table is asked, the null sender, rewriting of the BCC address, duplicates, a
list value, a table that cannot answer); `is_mapped()`.
Tables are texthash files in tmp_path or inline: tables.
"""
from __future__ import annotations

import random
import threading
import tracemalloc
from pathlib import Path

import pytest

from mailflow.config import Config
from mailflow.content import Content
from mailflow.errors import LookupRetry, TemporaryError
from mailflow.logs import MailLog
from mailflow.model import ClientInfo, Envelope, Recipient, Submission
from mailflow.routing.addressmap import AddressMapper, MilterEdits
from mailflow.routing.rewrite import Rewriter
from mailflow.stages.cleanup import MAP_INLINE, MAP_INLINE_PLAIN, Cleanup
from tests.unit.test_cleanup_headers import FixedClock, RecordingStore

BASE = dict(myhostname="mx.example.test", mydestination=("example.test", "localhost"))


def mapper(**settings) -> AddressMapper:
    config = Config(**{**BASE, **settings})
    return AddressMapper(config, Rewriter(config))


def table(tmp_path: Path, name: str, text: str) -> str:
    """A texthash table file with `text`; returns its spec."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return f"texthash:{path}"


def inline(entries: dict[str, str]) -> str:
    """inline:{ { key = value } ... } (the braces allow commas and spaces in values)."""
    body = " ".join(f"{{ {k} = {v} }}" for k, v in entries.items())
    return f"inline:{{ {body} }}"


def expansion_error(excinfo) -> bool:
    return type(excinfo.value) is TemporaryError and excinfo.value.dsn == "4.6.0"


# ------------------------------------------------------------------------------------------------- sender


def test_null_sender_stays_null(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "@example.test someone@example.test\n"),),
               masquerade_domains=("example.test",))
    assert m.sender("") == ""


def test_mailer_daemon_at_myorigin_is_the_null_sender(tmp_path):
    # Postfix cleanup_addr_sender: before the canonical maps, which are then not asked
    m = mapper(myorigin="origin.test", canonical_maps=(inline({"mailer-daemon": "md@x.test"}),))
    assert m.sender("MAILER-DAEMON@origin.test") == m.sender("mailer-daemon") == ""
    assert m.sender("Mailer-Daemon@ORIGIN.test") == ""
    assert m.sender("mailer-daemon@example.test") == "md@x.test"  # another of this host's domains: mapped


def test_unqualified_sender_gets_myorigin():
    assert mapper(myorigin="example.test").sender("alice") == "alice@example.test"


def test_myorigin_defaults_to_myhostname():
    assert mapper().sender("alice") == "alice@mx.example.test"


def test_qualified_sender_without_mapping_is_unchanged():
    assert mapper().sender("Alice@Remote.Test") == "Alice@Remote.Test"


def test_sender_canonical_maps_are_asked_before_canonical_maps(tmp_path):
    m = mapper(sender_canonical_maps=(table(tmp_path, "sender_canonical",
                                            "alice@example.test from-sender@example.test\n"),),
               canonical_maps=(table(tmp_path, "canonical", "alice@example.test from-canonical@example.test\n"),))
    assert m.sender("alice@example.test") == "from-sender@example.test"


def test_sender_mapping_continues_through_canonical_maps(tmp_path):
    # The first table with an answer wins at each step; the result is mapped again until it settles.
    m = mapper(sender_canonical_maps=(table(tmp_path, "sender_canonical", "alice@example.test a1@example.test\n"),),
               canonical_maps=(table(tmp_path, "canonical", "a1@example.test a2@example.test\n"),))
    assert m.sender("alice@example.test") == "a2@example.test"


def test_sender_canonical_maps_do_not_touch_recipients(tmp_path):
    m = mapper(sender_canonical_maps=(table(tmp_path, "sender_canonical", "alice@example.test other@example.test\n"),))
    assert m.recipient("alice@example.test") == "alice@example.test"


# ---------------------------------------------------------------------------------------------- masquerade


def masq(*domains: str, exceptions: tuple[str, ...] = ()) -> AddressMapper:
    return mapper(masquerade_domains=domains, masquerade_exceptions=exceptions)


def test_masquerade_strips_subdomains():
    m = masq("example.com")
    assert m.sender("user@host.example.com") == "user@example.com"
    assert m.sender("user@a.b.example.com") == "user@example.com"


def test_masquerade_leaves_the_domain_itself_and_other_domains():
    m = masq("example.com")
    assert m.sender("user@example.com") == "user@example.com"
    assert m.sender("user@notexample.com") == "user@notexample.com"
    assert m.sender("user@example.com.evil.test") == "user@example.com.evil.test"


def test_masquerade_exception_entry_keeps_that_host():
    m = masq("!host.example.com", "example.com")
    assert m.sender("user@host.example.com") == "user@host.example.com"
    assert m.sender("user@a.host.example.com") == "user@a.host.example.com"
    assert m.sender("user@other.example.com") == "user@example.com"


def test_masquerade_first_matching_entry_decides():
    # Listed after example.com, the exception never gets a say.
    m = masq("example.com", "!host.example.com")
    assert m.sender("user@host.example.com") == "user@example.com"


def test_masquerade_exceptions_name_users_never_masqueraded():
    m = masq("example.com", exceptions=("root",))
    assert m.sender("root@host.example.com") == "root@host.example.com"
    assert m.sender("Root@host.example.com") == "Root@host.example.com"
    assert m.sender("alice@host.example.com") == "alice@example.com"


def test_masquerade_applies_after_canonical_mapping(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "alice@example.test alice@host.example.com\n"),),
               masquerade_domains=("example.com",))
    assert m.sender("alice@example.test") == "alice@example.com"


def test_masquerading_does_not_apply_to_recipients():
    m = masq("example.com")
    assert m.recipient("user@host.example.com") == "user@host.example.com"
    assert m.recipients((Recipient(0, "user@host.example.com", "user@host.example.com"),))[0].address \
        == "user@host.example.com"


# ------------------------------------------------------------------------------------------------ recipient


def test_recipient_canonical_maps_are_asked_before_canonical_maps(tmp_path):
    m = mapper(recipient_canonical_maps=(table(tmp_path, "rcpt", "x@example.test from-rcpt@example.test\n"),),
               canonical_maps=(table(tmp_path, "canonical", "x@example.test from-canonical@example.test\n"),))
    assert m.recipient("x@example.test") == "from-rcpt@example.test"
    # ... and recipient_canonical_maps are not asked for senders.
    assert m.sender("x@example.test") == "from-canonical@example.test"


def test_unqualified_recipient_is_qualified_then_mapped(tmp_path):
    m = mapper(myorigin="example.test",
               canonical_maps=(table(tmp_path, "canonical", "alice@example.test al@example.test\n"),))
    assert m.recipient("alice") == "al@example.test"


def test_domain_result_keeps_the_local_part(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "@old.test @new.test\n"),))
    assert m.recipient("bob@old.test") == "bob@new.test"
    assert m.recipient("bob+tag@old.test") == "bob+tag@new.test"
    assert m.recipient("bob@other.test") == "bob@other.test"


def test_a_domain_result_keeps_a_quoted_local_part_quoted_once(tmp_path):
    """Postfix's mail_addr_map unquotes the local part, puts the value's @domain after it and quotes once: under a
    domain rename a quoted local part stays as it was, through a chain too (it gained a quote at every step)."""
    renames = "@old.test @new.test\n@a.test @b.test\n@b.test @c.test\n"
    m = mapper(canonical_maps=(table(tmp_path, "canonical", renames),))
    assert m.recipient('"john smith"@old.test') == '"john smith"@new.test'
    assert m.recipient('"a b"@a.test') == '"a b"@c.test'


def test_a_domain_mapped_to_itself_ends_for_a_quoted_local_part(tmp_path):
    """An address that maps to itself ends the expansion (it grew without end, on the loop, when the local part
    gained quotes at each step)."""
    m = mapper(virtual_alias_maps=(table(tmp_path, "virtual", "@v.test @v.test\n"),), virtual_alias_domains=("v.test",))
    assert m.expand('"a b"@v.test') == ['"a b"@v.test']


def test_an_unmatched_extension_goes_inside_the_quotes(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "tom@example.test \"t s\"@w.test\n"),))
    assert m.recipient("tom+e@example.test") == '"t s+e"@w.test'


def test_unmatched_extension_is_propagated(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "bob@example.test robert@example.net\n"),))
    assert m.recipient("bob+lists@example.test") == "robert+lists@example.net"
    assert m.recipient("bob@example.test") == "robert@example.net"


def test_matched_extension_is_not_added_again(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical",
                                     "bob+lists@example.test lists@example.net\n"
                                     "bob@example.test robert@example.net\n"),))
    assert m.recipient("bob+lists@example.test") == "lists@example.net"
    assert m.recipient("bob+other@example.test") == "robert+other@example.net"


def test_canonical_chain_settles(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical",
                                     "a@example.test b@example.test\n"
                                     "b@example.test c@example.test\n"),))
    assert m.recipient("a@example.test") == "c@example.test"


def test_canonical_entry_mapping_onto_itself_settles(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "a@example.test A@Example.test\n"),))
    assert m.recipient("a@example.test") == "a@example.test"


def test_canonical_loop_is_an_expansion_error(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical",
                                     "a@example.test b@example.test\n"
                                     "b@example.test a@example.test\n"),))
    with pytest.raises(TemporaryError) as excinfo:
        m.recipient("a@example.test")
    assert expansion_error(excinfo)
    assert excinfo.value.text == "Alias expansion error"


def test_key_without_domain_matches_local_domains_only(tmp_path):
    m = mapper(myorigin="origin.test",
               canonical_maps=(table(tmp_path, "canonical", "alice al@example.test\n"),))
    assert m.recipient("alice@example.test") == "al@example.test"      # mydestination
    assert m.recipient("alice@localhost") == "al@example.test"         # mydestination
    assert m.recipient("alice@origin.test") == "al@example.test"       # myorigin
    assert m.recipient("alice@remote.test") == "alice@remote.test"     # someone else's alice


def test_key_without_domain_with_extension_for_local_domains(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "alice al@example.test\n"),))
    assert m.recipient("alice+x@example.test") == "al+x@example.test"
    assert m.recipient("alice+x@remote.test") == "alice+x@remote.test"


def test_canonical_table_that_cannot_answer_raises_lookup_retry():
    m = mapper(canonical_maps=("fail:down",))
    with pytest.raises(LookupRetry) as excinfo:
        m.recipient("a@example.test")
    assert excinfo.value.dsn == "4.3.0"


# --------------------------------------------------------------------------------------------------- expand


def virtual(tmp_path: Path, text: str, **settings) -> AddressMapper:
    return mapper(virtual_alias_maps=(table(tmp_path, "virtual", text),), **settings)


def test_expand_without_entry_is_the_address_itself(tmp_path):
    assert virtual(tmp_path, "list@example.test a@x.test\n").expand("other@example.test") == ["other@example.test"]


def test_expand_one_to_many_keeps_order(tmp_path):
    m = virtual(tmp_path, "list@example.test c@x.test, a@x.test  b@x.test\n")
    assert m.expand("list@example.test") == ["c@x.test", "a@x.test", "b@x.test"]


def test_expand_applies_to_any_domain(tmp_path):
    m = virtual(tmp_path, "someone@remote.test other@x.test\n")
    assert m.expand("someone@remote.test") == ["other@x.test"]


def test_expand_is_recursive_in_cleanups_order(tmp_path):
    """cleanup_map1n: the first result takes the address's place, the others go to the end of the list."""
    m = virtual(tmp_path,
                "all@example.test team@example.test, z@x.test\n"
                "team@example.test a@x.test, b@x.test\n")
    assert m.expand("all@example.test") == ["a@x.test", "z@x.test", "b@x.test"]


def test_expand_keeps_an_address_in_its_own_expansion(tmp_path):
    m = virtual(tmp_path, "a@example.test a@example.test, b@example.test\n")
    assert m.expand("a@example.test") == ["a@example.test", "b@example.test"]


def test_expand_loop_is_an_expansion_error(tmp_path):
    m = virtual(tmp_path,
                "a@example.test b@example.test\n"
                "b@example.test a@example.test\n")
    with pytest.raises(TemporaryError) as excinfo:
        m.expand("a@example.test")
    assert expansion_error(excinfo)


def test_expand_longer_loop_is_an_expansion_error(tmp_path):
    m = virtual(tmp_path,
                "a@example.test b@example.test, ok@x.test\n"
                "b@example.test c@example.test\n"
                "c@example.test A@example.test\n")
    with pytest.raises(TemporaryError) as excinfo:
        m.expand("a@example.test")
    assert expansion_error(excinfo)


CHAIN = ("a@example.test b@example.test\n"
         "b@example.test c@example.test\n"
         "c@example.test d@example.test\n")


def test_expand_within_the_recursion_limit(tmp_path):
    # a -> b -> c -> d: three nested lookups that find an answer, and a fourth (for d) that finds none
    assert virtual(tmp_path, CHAIN, virtual_alias_recursion_limit=4).expand("a@example.test") == ["d@example.test"]


def test_expand_reaching_the_recursion_limit_is_an_expansion_error(tmp_path):
    # Postfix's cleanup_map1n: after `limit` nested lookups, one more is refused whatever it would answer, so a
    # chain of exactly `limit` rewrites is refused too (a real Postfix 3.7 answers 451 4.6.0 for it)
    m = virtual(tmp_path, CHAIN, virtual_alias_recursion_limit=2)
    for addr in ("a@example.test", "b@example.test"):
        with pytest.raises(TemporaryError) as excinfo:
            m.expand(addr)
        assert expansion_error(excinfo)
    assert m.expand("c@example.test") == ["d@example.test"]  # one rewrite, then a lookup that finds nothing


def test_expand_within_the_expansion_limit(tmp_path):
    m = virtual(tmp_path, "list@example.test a@x.test, b@x.test, c@x.test\n", virtual_alias_expansion_limit=3)
    assert m.expand("list@example.test") == ["a@x.test", "b@x.test", "c@x.test"]


def test_expand_beyond_the_expansion_limit_is_an_expansion_error(tmp_path):
    m = virtual(tmp_path, "list@example.test a@x.test, b@x.test, c@x.test, d@x.test\n",
                virtual_alias_expansion_limit=3)
    with pytest.raises(TemporaryError) as excinfo:
        m.expand("list@example.test")
    assert expansion_error(excinfo)


def test_expansion_limit_counts_the_addresses_produced_not_intermediate_ones(tmp_path):
    m = virtual(tmp_path,
                "all@example.test t1@example.test, t2@example.test\n"
                "t1@example.test a@x.test, b@x.test\n"
                "t2@example.test c@x.test, d@x.test\n", virtual_alias_expansion_limit=4)
    assert sorted(m.expand("all@example.test")) == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]


def test_expand_table_that_cannot_answer_raises_lookup_retry():
    m = mapper(virtual_alias_maps=("fail:virtual",))
    with pytest.raises(LookupRetry) as excinfo:
        m.expand("a@example.test")
    assert excinfo.value.dsn == "4.3.0"


def test_expand_unreadable_table_file_raises_lookup_retry(tmp_path):
    m = mapper(virtual_alias_maps=(f"texthash:{tmp_path / 'missing'}",))
    with pytest.raises(LookupRetry):
        m.expand("a@example.test")


def test_expand_first_table_with_an_answer_wins(tmp_path):
    m = mapper(virtual_alias_maps=(table(tmp_path, "v1", "a@example.test first@x.test\n"),
                                   table(tmp_path, "v2", "a@example.test second@x.test\n"
                                                         "b@example.test other@x.test\n")))
    assert m.expand("a@example.test") == ["first@x.test"]
    assert m.expand("b@example.test") == ["other@x.test"]


# ----------------------------------------------------------------------------------------------- recipients


def test_what_recipients_holds_beside_the_recipients_it_returns_is_small(tmp_path):
    """The duplicate check of an expansion costs a set entry a final address, not a key tuple and a folded copy of
    each (a message of 1 000 RCPTs to lists of 1 000 held 250 bytes a recipient that way, 250 MB, on top of the
    Recipients themselves): 20 lists of 1 000, traced while they are expanded."""
    m = virtual(tmp_path, "".join(f"list{i}@example.test " + ", ".join(f"u{i}x{j}@x.test" for j in range(1000)) + "\n"
                                  for i in range(20)))
    rcpts = tuple(Recipient(i, f"list{i}@example.test", f"list{i}@example.test") for i in range(20))
    m.recipients(rcpts[:1])  # (the table read before the trace)
    tracemalloc.start()
    try:
        out = m.recipients(rcpts)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 20_000 and out[-1] == Recipient(19_999, "u19x999@x.test", "list19@example.test", "",
                                                       "rfc822;list19@example.test")
    assert (peak - kept) / len(out) < 100, f"{(peak - kept) / len(out):.0f} bytes a recipient beside them"


def test_the_duplicate_check_of_plain_recipients_holds_no_set_each(tmp_path):
    """A recipient that expands to one address (most of them) is kept as that address under its duplicate key, a
    set made only when a second address comes under it: 5 000 plain RCPTs held a set each, 439 bytes a recipient
    beside the Recipients returned (223 without; 364 before the sets)."""
    m = virtual(tmp_path, "list@example.test a@x.test, b@x.test\n")
    rcpts = tuple(Recipient(i, f"user{i}@example.test", f"user{i}@example.test") for i in range(5000))
    m.recipients(rcpts[:1])  # (the table read before the trace)
    tracemalloc.start()
    try:
        out = m.recipients(rcpts)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out) == 5000
    assert (peak - kept) / len(out) < 300, f"{(peak - kept) / len(out):.0f} bytes a recipient beside them"


def test_recipients_removes_duplicates_and_keeps_each_origin(tmp_path):
    """A duplicate as Postfix's cleanup keys it: the same address (any case), NOTIFY, ORCPT and original; for an
    alias's members SUCCESS does not count (Postfix turns it off for them)."""
    m = virtual(tmp_path,
                "list@example.test a@x.test, b@x.test\n"
                "team@example.test B@X.test, c@x.test, b@x.test\n")
    rcpts = (Recipient(3, "list@example.test", "List@Example.test", "SUCCESS,FAILURE", "rfc822;List@Example.test"),
             Recipient(4, "list@example.test", "list@example.test", "FAILURE", "rfc822;LIST@example.test"),
             Recipient(7, "team@example.test", "team@example.test", "NEVER", ""),
             Recipient(9, "a@x.test", "a@x.test"),
             Recipient(10, "A@x.test", "A@x.test"),
             Recipient(11, "a@x.test", "a@x.test", "SUCCESS"))
    assert m.recipients(rcpts) == (
        Recipient(0, "a@x.test", "List@Example.test", "SUCCESS,FAILURE", "rfc822;List@Example.test"),
        Recipient(1, "b@x.test", "List@Example.test", "SUCCESS,FAILURE", "rfc822;List@Example.test"),
        Recipient(2, "B@X.test", "team@example.test", "NEVER", "rfc822;team@example.test"),
        Recipient(3, "c@x.test", "team@example.test", "NEVER", "rfc822;team@example.test"),
        Recipient(4, "a@x.test", "a@x.test", "", "rfc822;a@x.test"),
        Recipient(5, "a@x.test", "a@x.test", "SUCCESS", "rfc822;a@x.test"),
    )


def test_recipients_applies_canonical_then_virtual(tmp_path):
    """Without ORCPT, a recipient gets Postfix cleanup's: the address after canonical mapping, before virtual."""
    m = mapper(canonical_maps=(table(tmp_path, "canonical", "old@example.test list@example.test\n"),),
               virtual_alias_maps=(table(tmp_path, "virtual", "list@example.test a@x.test, b@x.test\n"),))
    assert m.recipients((Recipient(0, "old@example.test", "old@example.test"),)) == (
        Recipient(0, "a@x.test", "old@example.test", "", "rfc822;list@example.test"),
        Recipient(1, "b@x.test", "old@example.test", "", "rfc822;list@example.test"),
    )


def test_recipients_without_mapping_are_kept_in_order(tmp_path):
    m = virtual(tmp_path, "list@example.test a@x.test\n")
    rcpts = (Recipient(0, "z@x.test", "z@x.test"), Recipient(1, "y@x.test", "Y@x.test"))
    assert m.recipients(rcpts) == (Recipient(0, "z@x.test", "z@x.test", "", "rfc822;z@x.test"),
                                   Recipient(1, "y@x.test", "Y@x.test", "", "rfc822;y@x.test"))


def test_recipients_errors_propagate(tmp_path):
    m = virtual(tmp_path, "a@example.test b@example.test\nb@example.test a@example.test\n")
    with pytest.raises(TemporaryError) as excinfo:
        m.recipients((Recipient(0, "ok@x.test", "ok@x.test"), Recipient(1, "a@example.test", "a@example.test")))
    assert expansion_error(excinfo)


# ------------------------------------------------------------------------------------------------ is_mapped


def test_is_mapped_for_recipient_side_tables_only():
    m = mapper(virtual_alias_maps=(inline({"v@example.test": "x@x.test"}),),
               canonical_maps=(inline({"c@example.test": "x@x.test"}),),
               recipient_canonical_maps=(inline({"r@example.test": "x@x.test"}),),
               sender_canonical_maps=(inline({"s@example.test": "x@x.test"}),))
    assert m.is_mapped("v@example.test")
    assert m.is_mapped("c@example.test")
    assert m.is_mapped("r@example.test")
    assert m.is_mapped("V@Example.TEST")
    assert not m.is_mapped("s@example.test")
    assert not m.is_mapped("nobody@example.test")


def test_is_mapped_through_domain_and_extension_keys():
    m = mapper(virtual_alias_maps=(inline({"@hosted.test": "x@x.test", "v@example.test": "x@x.test"}),))
    assert m.is_mapped("anyone@hosted.test")
    assert m.is_mapped("v+tag@example.test")
    assert not m.is_mapped("anyone@other.test")


def test_is_mapped_qualifies_the_address():
    m = mapper(myorigin="example.test", virtual_alias_maps=(inline({"v@example.test": "x@x.test"}),))
    assert m.is_mapped("v")


def test_is_mapped_table_that_cannot_answer_raises_lookup_retry():
    with pytest.raises(LookupRetry):
        mapper(virtual_alias_maps=("fail:v",)).is_mapped("a@example.test")


# -------------------------------------------------------------------------------------- header addresses

def test_header_addresses_are_qualified_with_myorigin_or_the_domain_given():
    m = mapper(myorigin="example.test")
    assert m.header_sender("bob") == "bob@example.test"
    assert m.header_recipient("carol", "remote.example") == "carol@remote.example"
    assert m.header_sender("") == "" and m.header_recipient("bob@") == "bob@"  # nothing to qualify


def test_header_recipients_are_masqueraded_unlike_envelope_recipients(tmp_path):
    m = mapper(masquerade_domains=("example.test",),
               recipient_canonical_maps=(table(tmp_path, "rc", "old@example.test new@host.example.test\n"),))
    assert m.header_recipient("old@example.test") == "new@example.test"  # canonical, then masquerading
    assert m.recipient("old@example.test") == "new@host.example.test"  # the envelope is not masqueraded
    assert m.header_sender("a@host.example.test") == "a@example.test"


def test_unmapped_header_addresses_are_only_qualified(tmp_path):
    m = mapper(canonical_maps=(table(tmp_path, "c", "bob@example.test robert@example.test\n"),))
    assert m.header_sender("bob", mapped=False) == "bob@mx.example.test"
    assert m.header_sender("bob@example.test", mapped=False) == "bob@example.test"
    assert m.header_sender("bob@example.test") == "robert@example.test"


def test_header_addresses_are_tidied_before_the_tables_are_asked(tmp_path):
    # as Postfix's rewrite tidies them: a header's "joe"@x.test. is looked up, and written, as joe@x.test
    m = mapper(canonical_maps=(inline({"joe@x.test": "joe.smith@x.test"}),))
    assert m.header_sender('"joe"@x.test.') == m.header_recipient("joe@x.test.") == "joe.smith@x.test"
    assert m.header_recipient('"j.k"@x.test.', mapped=False) == "j.k@x.test"
    assert m.header_sender('"a b"@x.test.') == '"a b"@x.test'  # quotes that are needed stay


# ------------------------------------------------------------------------------------ automatic BCC


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(i, a, a) for i, a in enumerate(addresses)]


def pairs(recipients) -> list[tuple[str, str, str, str]]:
    return [(r.address, r.original, r.notify, r.orcpt) for r in recipients]


def test_bcc_recipients_come_in_postfixs_order_with_notify_never():
    m = mapper(sender_bcc_maps=(inline({"s@x.test": "s-copy@arch.test"}),),
               recipient_bcc_maps=(inline({"a@x.test": "a-copy@arch.test"}),), always_bcc="all@arch.test")
    assert pairs(m.recipients(rcpts("a@x.test", "b@x.test"), auto_bcc_sender="s@x.test")) == [
        ("s-copy@arch.test", "s-copy@arch.test", "NEVER", ""), ("a@x.test", "a@x.test", "", "rfc822;a@x.test"),
        ("a-copy@arch.test", "a-copy@arch.test", "NEVER", ""), ("b@x.test", "b@x.test", "", "rfc822;b@x.test"),
        ("all@arch.test", "all@arch.test", "NEVER", "")]
    assert [r.index for r in m.recipients(rcpts("a@x.test"), auto_bcc_sender="s@x.test")] == [0, 1, 2, 3]


def test_no_bcc_recipients_unless_asked_and_no_sender_lookup_for_the_null_sender():
    m = mapper(sender_bcc_maps=("static:s-copy@arch.test",), always_bcc="all@arch.test")
    assert pairs(m.recipients(rcpts("a@x.test"))) == [("a@x.test", "a@x.test", "", "rfc822;a@x.test")]
    assert [r.address for r in m.recipients(rcpts("a@x.test"), auto_bcc_sender="")] == ["a@x.test", "all@arch.test"]


def test_recipient_bcc_maps_are_asked_after_canonical_mapping_before_virtual_expansion():
    m = mapper(recipient_canonical_maps=(inline({"old@x.test": "new@x.test"}),),
               virtual_alias_maps=(inline({"new@x.test": "v1@d.test, v2@d.test"}),),
               recipient_bcc_maps=(inline({"old@x.test": "wrong@arch.test", "new@x.test": "copy@arch.test",
                                           "v1@d.test": "wrong@arch.test"}),))
    assert [r.address for r in m.recipients(rcpts("old@x.test"), auto_bcc_sender="s@x.test")] == [
        "v1@d.test", "v2@d.test", "copy@arch.test"]


def test_bcc_lookup_keys_are_mail_addr_finds_without_extension_carried_over():
    m = mapper(myorigin="example.test", recipient_delimiter="+",
               sender_bcc_maps=(inline({"joe": "joe-copy@arch.test"}),),
               recipient_bcc_maps=(inline({"u@y.test": "u-copy@arch.test", "@z.test": "z-copy@arch.test"}),))
    got = m.recipients(rcpts("u+ext@y.test", "w@z.test"), auto_bcc_sender=m.sender("joe+tag"))
    assert [r.address for r in got] == ["joe-copy@arch.test", "u+ext@y.test", "u-copy@arch.test", "w@z.test",
                                        "z-copy@arch.test"]


def test_a_bcc_address_is_qualified_canonical_mapped_and_virtual_expanded():
    m = mapper(myorigin="origin.test", recipient_bcc_maps=(inline({"a@x.test": "arch", "b@x.test": "c@arch.test"}),),
               recipient_canonical_maps=(inline({"c@arch.test": "c-out@arch.test"}),),
               virtual_alias_maps=(inline({"arch@origin.test": "a1@d.test, a2@d.test"}),))
    assert pairs(m.recipients(rcpts("a@x.test", "b@x.test"), auto_bcc_sender="s@x.test")) == [
        ("a@x.test", "a@x.test", "", "rfc822;a@x.test"), ("a1@d.test", "arch@origin.test", "NEVER", ""),
        ("a2@d.test", "arch@origin.test", "NEVER", ""), ("b@x.test", "b@x.test", "", "rfc822;b@x.test"),
        ("c-out@arch.test", "c-out@arch.test", "NEVER", "")]


def test_a_bcc_copy_is_a_duplicate_of_another_bcc_copy_only():
    # as Postfix's been_here key: a BCC recipient has no ORCPT, a recipient the client gave one (or its own address)
    m = mapper(sender_bcc_maps=(inline({"s@x.test": "copy@arch.test"}),),
               recipient_bcc_maps=(inline({"a@x.test": "copy@arch.test", "b@x.test": "copy@arch.test",
                                           "self@x.test": "self@x.test"}),), always_bcc="copy@arch.test")
    got = m.recipients(rcpts("a@x.test", "b@x.test", "self@x.test", "copy@arch.test"), auto_bcc_sender="s@x.test")
    assert pairs(got) == [("copy@arch.test", "copy@arch.test", "NEVER", ""),
                          ("a@x.test", "a@x.test", "", "rfc822;a@x.test"),
                          ("b@x.test", "b@x.test", "", "rfc822;b@x.test"),
                          ("self@x.test", "self@x.test", "", "rfc822;self@x.test"),
                          ("self@x.test", "self@x.test", "NEVER", ""),
                          ("copy@arch.test", "copy@arch.test", "", "rfc822;copy@arch.test")]


def test_a_bcc_table_value_of_several_addresses_gives_its_first(caplog):
    m = mapper(sender_bcc_maps=(inline({"s@x.test": "m1@arch.test, m2@arch.test"}),))
    assert [r.address for r in m.recipients(rcpts("a@x.test"), auto_bcc_sender="s@x.test")] == [
        "m1@arch.test", "a@x.test"]
    assert "list of 2 addresses; using the first" in caplog.text


def test_one_bcc_address_for_many_recipients_is_expanded_once_and_a_list_value_logged_once(caplog):
    """A thousand recipients meeting one `@domain` entry: the archive address is mapped and expanded once per
    message (its later copies would all be duplicates; each expansion ran on the loop), and the warning about a
    list value is one line per message, not one per recipient."""
    m = mapper(recipient_bcc_maps=(inline({"@x.test": "archive@arch.test, other@arch.test"}),),
               virtual_alias_maps=(inline({"archive@arch.test": "a1@d.test, a2@d.test"}),))
    expanded = []
    expand = m.expand
    m.expand = lambda addr: expanded.append(addr) or expand(addr)
    got = m.recipients(rcpts(*(f"u{n}@x.test" for n in range(50))), auto_bcc_sender="s@x.test")
    assert [r.address for r in got][:4] == ["u0@x.test", "a1@d.test", "a2@d.test", "u1@x.test"]
    assert len(got) == 52 and expanded.count("archive@arch.test") == 1
    assert caplog.text.count("list of 2 addresses; using the first") == 1


def test_a_bcc_table_that_cannot_answer_defers_the_message():
    with pytest.raises(LookupRetry):
        mapper(recipient_bcc_maps=("fail:bcc",)).recipients(rcpts("a@x.test"), auto_bcc_sender="s@x.test")
    with pytest.raises(LookupRetry):
        mapper(sender_bcc_maps=("fail:bcc",)).recipients(rcpts("a@x.test"), auto_bcc_sender="s@x.test")


@pytest.mark.parametrize("setting", ["sender_bcc_maps", "recipient_bcc_maps"])
def test_a_bcc_value_that_holds_no_address_defers_the_message_as_a_canonical_one_does(setting):
    value = inline({"s@x.test": "(a comment)", "a@x.test": "(a comment)"})
    with pytest.raises(LookupRetry, match="non-address result"):
        mapper(**{setting: (value,)}).recipients(rcpts("a@x.test"), auto_bcc_sender="s@x.test")
    with pytest.raises(LookupRetry, match="non-address result"):
        mapper(canonical_maps=(value,)).recipient("a@x.test")


@pytest.mark.parametrize("settings, wanted", [
    ({}, False),
    ({"sender_bcc_maps": ("static:copy@arch.test",)}, True),
    ({"recipient_bcc_maps": ("static:copy@arch.test",)}, True),
    ({"always_bcc": "copy@arch.test"}, True),
])
def test_the_mapper_knows_whether_any_automatic_bcc_is_configured(settings, wanted):
    assert mapper(**settings).auto_bcc is wanted


async def test_cleanup_asks_no_bcc_table_when_none_is_configured(monkeypatch):
    # the per-message cost when unset: no lookup per recipient (and no Bcc made per message)
    m = mapper()
    monkeypatch.setattr(m, "_bcc_address", lambda *args: pytest.fail("a BCC table asked though none is configured"))
    store = RecordingStore()
    cleanup = Cleanup(store, myhostname="mx.example.test", clock=FixedClock(), rng=random.Random(7), log=MailLog(),
                      on_queued=lambda: None, mapper=m)
    sub = Submission(Envelope("s@remote.test", ("a@example.test", "b@example.test")),
                     Content.of(b"Subject: x\r\n\r\n"), ClientInfo(addr="192.0.2.7", helo="client.test"))
    await cleanup.submit(sub)
    assert len(store.contents) == 1


async def test_cleanup_maps_an_envelope_of_many_recipients_in_a_worker_thread(tmp_path, monkeypatch):
    """Each recipient may expand to virtual_alias_expansion_limit addresses (some 20 ms for 1 000): 100 of them
    held the loop 1.9 s. Past MAP_INLINE recipients the envelope is mapped in a worker thread; a message of a
    few stays on the loop (no thread hop for the common case)."""
    members = ", ".join(f"m{j}@x.test" for j in range(1000))
    m = virtual(tmp_path, "".join(f"list{i}@example.test {members}\n" for i in range(MAP_INLINE + 1)))
    expanded_on: list[int] = []
    expand = m.expand
    monkeypatch.setattr(m, "expand", lambda addr: expanded_on.append(threading.get_ident()) or expand(addr))
    store = RecordingStore()
    cleanup = Cleanup(store, myhostname="mx.example.test", clock=FixedClock(), rng=random.Random(7), log=MailLog(),
                      on_queued=lambda: None, mapper=m)
    client = ClientInfo(addr="192.0.2.7", helo="client.test")
    for count in (MAP_INLINE, MAP_INLINE + 1):
        expanded_on.clear()
        lists = tuple(f"list{i}@example.test" for i in range(count))
        await cleanup.submit(Submission(Envelope("s@remote.test", lists), Content.of(b"Subject: x\r\n\r\n"), client))
        assert len(store.inserted[-1].recipients) == 1000 * count  # (each list's members keep its original)
        on_loop = {threading.get_ident()} == set(expanded_on)
        assert len(expanded_on) == count and on_loop is (count <= MAP_INLINE), (count, expanded_on)


async def test_cleanup_maps_an_envelope_on_the_loop_up_to_many_more_recipients_when_none_may_expand(monkeypatch):
    """With no virtual alias map no recipient becomes many: every message of 5 recipients or more went through a
    worker thread (some 400 us a message instead of 130 us on the loop). Past MAP_INLINE_PLAIN recipients only."""
    m = mapper()
    mapped_on: list[int] = []
    expand = m.expand
    monkeypatch.setattr(m, "expand", lambda addr: mapped_on.append(threading.get_ident()) or expand(addr))
    store = RecordingStore()
    cleanup = Cleanup(store, myhostname="mx.example.test", clock=FixedClock(), rng=random.Random(7), log=MailLog(),
                      on_queued=lambda: None, mapper=m)
    client = ClientInfo(addr="192.0.2.7", helo="client.test")
    for count in (MAP_INLINE + 1, MAP_INLINE_PLAIN, MAP_INLINE_PLAIN + 1):
        mapped_on.clear()
        rcpts = tuple(f"u{i}@example.test" for i in range(count))
        await cleanup.submit(Submission(Envelope("s@remote.test", rcpts), Content.of(b"Subject: x\r\n\r\n"), client))
        assert len(store.inserted[-1].recipients) == count
        on_loop = {threading.get_ident()} == set(mapped_on)
        assert len(mapped_on) == count and on_loop is (count <= MAP_INLINE_PLAIN), (count, set(mapped_on))


async def test_cleanup_warns_of_a_table_value_under_the_queue_id(caplog):
    m = mapper(sender_bcc_maps=(inline({"s@remote.test": "m1@arch.test, m2@arch.test"}),),
               canonical_maps=(inline({"b@example.test": "(no address)"}),))
    cleanup = Cleanup(RecordingStore(), myhostname="mx.example.test", clock=FixedClock(), rng=random.Random(7),
                      log=MailLog(), on_queued=lambda: None, mapper=m)
    client = ClientInfo(addr="192.0.2.7", helo="client.test")
    queue_id = await cleanup.submit(Submission(Envelope("s@remote.test", ("a@example.test",)),
                                               Content.of(b"Subject: x\r\n\r\n"), client))
    with pytest.raises(LookupRetry):
        await cleanup.submit(Submission(Envelope("x@remote.test", ("b@example.test",)),
                                        Content.of(b"Subject: x\r\n\r\n"), client, queue_id="Q2"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith(f"{queue_id}: the BCC address of <s@remote.test> is a list") for w in warnings), warnings
    assert any(w.startswith("Q2: table inline:") and "non-address result" in w for w in warnings), warnings


def test_milter_edits_keep_the_bcc_lookups_of_the_envelope_as_received():
    # Postfix's cleanup looks up each envelope record before its milters run: an added recipient gets no copy, a
    # deleted one keeps its copy, a CHGFROM adds the new sender's copy (last, as the milters run last)
    m = mapper(sender_bcc_maps=(inline({"s@x.test": "s-copy@arch.test", "new@x.test": "new-copy@arch.test"}),),
               recipient_bcc_maps=(inline({"a@x.test": "a-copy@arch.test", "added@x.test": "added-copy@arch.test",
                                           "del@x.test": "del-copy@arch.test"}),))
    edits = MilterEdits(added=frozenset({"added@x.test"}), deleted=("del@x.test",), sender="new@x.test")
    got = m.recipients(rcpts("a@x.test", "added@x.test"), auto_bcc_sender="s@x.test", milter=edits)
    assert [(r.address, r.notify) for r in got] == [
        ("s-copy@arch.test", "NEVER"), ("a@x.test", ""), ("a-copy@arch.test", "NEVER"), ("added@x.test", ""),
        ("del-copy@arch.test", "NEVER"), ("new-copy@arch.test", "NEVER")]
    assert [r.address for r in m.recipients(rcpts("added@x.test"), milter=edits)] == ["added@x.test"]  # none asked


def test_a_recipient_a_milter_added_gets_no_made_up_original_recipient():
    """Postfix's cleanup adds a milter's recipient without an ORCPT (its notices then write `rfc822; addr`, bounce's
    own form); a recipient of the envelope without one gets `rfc822;<address>` made up."""
    edits = MilterEdits(added=frozenset({"added@x.test"}))
    got = pairs(mapper().recipients(rcpts("a@x.test", "added@x.test"), milter=edits))
    assert got == [("a@x.test", "a@x.test", "", "rfc822;a@x.test"), ("added@x.test", "added@x.test", "", "")]


def test_a_made_up_orcpt_is_utf8_only_for_a_non_ascii_address_of_a_message_that_asked_for_smtputf8():
    """cleanup_addr.c: `utf-8;` when the address is not ASCII and the message asked for SMTPUTF8, else `rfc822;`
    (a local list's forwarded copy of a message without SMTPUTF8, say)."""
    m = mapper()
    assert pairs(m.recipients(rcpts("jöe@x.test", "a@x.test"))) == [
        ("jöe@x.test", "jöe@x.test", "", "rfc822;jöe@x.test"), ("a@x.test", "a@x.test", "", "rfc822;a@x.test")]
    assert pairs(m.recipients(rcpts("jöe@x.test", "a@x.test"), smtputf8=True)) == [
        ("jöe@x.test", "jöe@x.test", "", "utf-8;jöe@x.test"), ("a@x.test", "a@x.test", "", "rfc822;a@x.test")]
