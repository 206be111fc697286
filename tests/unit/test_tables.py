"""Lookup tables: every type found / not found, failure is LookupRetry (never None), reload, search order, CLI."""
from __future__ import annotations

import asyncio
import gc
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from functools import partial

import pytest
import re2

from mailflow.errors import ConfigError, LookupRetry
from mailflow.tables import cidr as cidr_module
from mailflow.tables import files as files_module
from mailflow.tables import regexp as regexp_module
from mailflow.tables import TableCache, lookup_address, lookup_local, open_table, split_extension
from mailflow.tables.cache import RUN_GRACE
from mailflow.tables.files import table_file_entries
from mailflow.tables.retire import RetiredTables
from mailflow.tables.search import (EXTERNAL_FIRST, address_keys, address_search, local_part_keys,
                                     mapped_addresses)
from tests.support import eventually, require_tool, settled_in


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- texthash

def test_texthash_found_not_found_comments_and_case(tmp_path):
    f = write(tmp_path / "virtual", "# comment\n\nJoe@Example.com   joe@elsewhere.test\n  # indented comment\n"
                                    "postmaster root\n")
    t = open_table(f"texthash:{f}")
    assert t.lookup("joe@example.COM") == "joe@elsewhere.test"
    assert t.lookup("POSTMASTER") == "root"
    assert t.lookup("nobody") is None
    assert t.lookup("#") is None


def test_texthash_continuation_lines_and_first_duplicate_wins(tmp_path):
    f = write(tmp_path / "aliases", "team alice,\n  bob,\n\tcarol\nteam dave\n")
    assert open_table(f"texthash:{f}").lookup("team") == "alice,  bob,\tcarol"


def test_a_line_starting_with_a_unicode_blank_is_an_entry_as_postfix_reads_it(tmp_path):
    """Postfix's readllines continues a line only at an ASCII blank (ISSPACE): a line starting with U+00A0 or U+2003
    is an entry of its own (checked with postmap -q: tests/interop/test_tables_vs_postfix.py), U+2028 ends no line,
    and a value keeps a trailing U+00A0."""
    f = write(tmp_path / "t", "erin one\n\u00a0nbsp two\n\u2003em three\u2028four\u00a0\n")
    t = open_table(f"texthash:{f}")
    assert [t.lookup(k) for k in ("erin", "\u00a0nbsp", "\u2003em")] == ["one", "two", "three\u2028four\u00a0"]
    f = write(tmp_path / "r", "/^a$/ first\n\u00a0/^b$/ second\n")
    with pytest.raises(LookupRetry, match="line 2"):  # (a rule whose delimiter is U+00A0, never closed)
        open_table(f"regexp:{f}").lookup("a")


def test_an_alias_table_with_a_value_mailflow_cannot_take_still_answers_every_key(tmp_path):
    """One bad value fails only its alias, when expanded (local's aliasing), never the table: smtpd's RCPT check
    for the other keys must not become 451 4.3.0 (differential seeds 21, 24, 30, 33)."""
    f = tmp_path / "aliases"
    f.write_text("a0: nobody\na3: nobody+x, ./mbox, :include:rel\n")
    t = open_table(f"texthash:{f}", aliases=True)
    assert t.lookup("a0") == "nobody"
    assert t.lookup("a3") == "nobody+x, ./mbox, :include:rel"


def test_texthash_relative_path_uses_base_dir(tmp_path):
    write(tmp_path / "t", "a b\n")
    assert open_table("texthash:t", base_dir=tmp_path).lookup("a") == "b"


def test_texthash_reloads_when_the_file_changes_at_most_once_a_second(tmp_path):
    clock = FakeClock()
    f = write(tmp_path / "t", "a one\n")
    t = open_table(f"texthash:{f}", clock=clock)
    assert t.lookup("a") == "one"
    write(f, "a two-longer\n")
    clock.now += 0.5
    assert t.lookup("a") == "one"  # not checked again yet
    clock.now += 0.6
    assert t.lookup("a") == "two-longer"


def test_texthash_unreadable_file_retries_then_answers_again(tmp_path):
    clock = FakeClock()
    f = write(tmp_path / "t", "a one\n")
    t = open_table(f"texthash:{f}", clock=clock)
    assert t.lookup("a") == "one"
    f.rename(tmp_path / "away")
    clock.now += 1
    with pytest.raises(LookupRetry, match="texthash:.*cannot read"):
        t.lookup("a")
    with pytest.raises(LookupRetry):  # also for keys that were never there: no "not found" while failing
        t.lookup("zzz")
    (tmp_path / "away").rename(f)  # same inode, size and mtime as before it went away
    clock.now += 1
    assert t.lookup("a") == "one"


def test_texthash_missing_at_first_lookup_is_retry_not_none(tmp_path):
    t = open_table(f"texthash:{tmp_path / 'nope'}")
    with pytest.raises(LookupRetry, match="nope"):
        t.lookup("a")


def test_texthash_malformed_line_fails_the_table_naming_the_line(tmp_path):
    f = write(tmp_path / "t", "a b\nlonely\n")
    with pytest.raises(LookupRetry, match="line 2"):
        open_table(f"texthash:{f}").lookup("a")


# ------------------------------------------------------------------------------------ inline, static, fail

def test_inline_plain_and_braced_elements():
    t = open_table("inline:{ Key=value, key2=value2 { key3 = text with spaces, and a comma } }")
    assert t.lookup("KEY") == "value"
    assert t.lookup("key2") == "value2"
    assert t.lookup("key3") == "text with spaces, and a comma"
    assert t.lookup("key4") is None


@pytest.mark.parametrize("spec", ["inline:key=value", "inline:{ key = value }", "inline:{ {a=b }",
                                  "inline:{ a=b } }", "inline:{ =b }"])
def test_inline_malformed_is_a_config_error(spec):
    with pytest.raises(ConfigError) as e:
        open_table(spec)
    assert e.value.key == spec and e.value.file == "" and "inline" in e.value.reason


def test_static_answers_every_key():
    assert open_table("static:smtp:[relay]:25").lookup("anything") == "smtp:[relay]:25"
    assert open_table("static:{ value with spaces }").lookup("x") == "value with spaces"
    with pytest.raises(ConfigError, match="needs a value"):
        open_table("static:")


def test_fail_always_retries():
    with pytest.raises(LookupRetry, match="fail:down") as e:
        open_table("fail:down").lookup("x")
    assert e.value.dsn == "4.3.0"


@pytest.mark.parametrize("spec", ["hash:/etc/postfix/virtual", "texthash", ":x", "texthash:", "regexp:  "])
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        open_table(spec)


def test_unknown_type_names_the_known_ones():
    with pytest.raises(ConfigError) as e:
        open_table("hash:/etc/postfix/virtual")
    assert e.value.reason == ("unknown table type 'hash'; mailflow has texthash, inline, static, regexp, pcre, cidr, "
                              "sqlite, accounts, unix, fail; name the source file as texthash:FILE (it is read as it "
                              "is, no postmap needed)")
    assert e.value.key == "hash:/etc/postfix/virtual"


# ----------------------------------------------------------------------------------------------- regexp

REGEXP = r"""
# first match wins
/^(.*)@old\.example$/        $1@new.example
/^admin@/                    root
/^(a)(b)?x@/                 [$1][$2][${1}]$$
/^CaseSensitive@/i           exact-case
!/@example\.(com|org)$/      not-ours
/@example\.com$/             catch-all
if /^list-/
/^list-(\w+)@/               lists+$1
endif
/^list-/                     after-the-if
/@example\.org$/             org
"""


def regexp_table(tmp_path, text=REGEXP, clock=None):
    f = write(tmp_path / "re", text)
    return open_table(f"regexp:{f}", **({"clock": clock} if clock else {})), f


class _UnbuildableSet:
    """An RE2 set past RE2's memory budget: it takes patterns but does not compile."""

    def Add(self, pattern) -> int:
        return 0

    def Compile(self) -> None:
        raise re2.error("pattern set too large")


@pytest.fixture(params=["prefilter", "small-sets", "rule-by-rule"])
def prefilter(request, monkeypatch):
    """Every way a regexp (or pcre) table is searched: one RE2 set pass over every rule, passes of several sets
    (SET_RULES rules each: 2 here), or (when RE2 cannot build a set within its memory budget) each rule in turn."""
    import mailflow.tables.regexp

    if request.param == "small-sets":
        monkeypatch.setattr(mailflow.tables.regexp, "SET_RULES", 2)
    if request.param == "rule-by-rule":
        monkeypatch.setattr(re2.Set, "SearchSet", staticmethod(lambda options: _UnbuildableSet()))
    return request.param


def test_a_table_of_30000_rules_answers_without_walking_them(tmp_path):
    """A file of 30 000 rules is past what one RE2 set holds: each rule was searched in turn, 0.1 s a key (0.5 s for
    100 000 rules), on the event loop for a small message's header_checks or an smtpd access check; and with a set,
    every rule was still walked to see whether the set named it (10 ms a key). The rules go into sets of SET_RULES,
    and a lookup looks at the rules they name."""
    f = tmp_path / "checks"
    f.write_text("".join(f"/^X-Spam-{i}: yes/ REJECT spam {i}\n" for i in range(30_000)))
    t = open_table(f"regexp:{f}")
    assert t.lookup("X-Spam-29999: yes") == "REJECT spam 29999"
    started = time.monotonic()
    for i in range(50):
        assert t.lookup(f"Subject: hello {i}") is None
    assert time.monotonic() - started < 1.0  # (before: 3.5 s)


def test_a_set_re2_refuses_is_split_until_its_halves_build(tmp_path, monkeypatch):
    """2 000 rules of this common shape are past RE2's memory budget for one set (500 are not): the whole set was
    left out and each of its rules searched in turn on every lookup (30 000 rules: 159 ms a miss, 100 000: 1.8 s
    and a gigabyte). A refused set is split in halves until they build."""
    import mailflow.tables.regexp

    monkeypatch.setattr(mailflow.tables.regexp, "SET_RULES", 2000)
    f = tmp_path / "checks"
    f.write_text("".join(f"/^X-Spam-{i}: .*(yes|sure)[a-z]{{0,20}}end/ REJECT spam {i}\n" for i in range(2000)))
    t = open_table(f"regexp:{f}")
    assert t.lookup("X-Spam-1999: yes, surelyweekend") == "REJECT spam 1999"
    started = time.monotonic()
    for i in range(300):
        assert t.lookup(f"Subject: hello {i}") is None
    assert time.monotonic() - started < 0.3  # (before: 1 s; sets of 500: 0.01 s)


def test_regexp_groups_flags_negation_and_order(tmp_path, prefilter):
    t, _ = regexp_table(tmp_path)
    assert t.fixed is False
    assert t.lookup("Joe@OLD.example") == "Joe@new.example"  # case-insensitive by default, key kept as is
    assert t.lookup("admin@old.example") == "admin@new.example"  # first match wins
    assert t.lookup("admin@example.com") == "root"
    assert t.lookup("ax@example.com") == "[a][][a]$"  # unmatched group is empty; $$ is $
    assert t.lookup("CaseSensitive@example.com") == "exact-case"
    assert t.lookup("casesensitive@example.com") == "catch-all"  # flag i toggled case-insensitivity off
    assert t.lookup("joe@elsewhere.test") == "not-ours"
    assert t.lookup("list-dev@example.org") == "lists+dev"
    assert t.lookup("list-@example.org") == "after-the-if"  # inside the if block nothing matched
    assert t.lookup("bob@example.org") == "org"


def test_regexp_dot_matches_a_line_break_as_posix_does(tmp_path, prefilter):
    """header_checks ask a folded header with its breaks kept: `.` matches a break, as in POSIX regexec, unless
    the rule has the m flag; `^` and `$` are the key's ends."""
    t, _ = regexp_table(tmp_path, """
/^x-dot: a.b$/       dot
/^ two$/m            multi-line
/^x-end: a$/         first-line
/^x-other: .$/       other
""")
    assert t.lookup("X-Dot: a\nb") == t.lookup("X-Dot: a b") == "dot"
    assert t.lookup("X-Multi: one\n two") == "multi-line"
    assert t.lookup("X-End: a\n b") is None  # `$` is the end of the whole header
    assert t.lookup("X-Other: \n") == "other"


def test_regexp_if_endif_skips_blocks_and_nests(tmp_path, prefilter):
    t, _ = regexp_table(tmp_path, """
if /@example\\.com$/
if !/^admin/
/^(.*)@/       user-$1
endif
/./            admin-rule
endif
/./            outside
""")
    assert t.lookup("joe@example.com") == "user-joe"
    assert t.lookup("admin@example.com") == "admin-rule"  # the negated inner if skipped its block
    assert t.lookup("joe@example.org") == "outside"  # the outer if skipped everything up to its endif


def test_regexp_takes_a_key_holding_bytes_that_were_not_utf8(tmp_path, prefilter):
    """`printf 'b\\xffb\\n' | mailflow table query regexp:F -` ended in UnicodeEncodeError (RE2 takes no
    surrogates); the byte is matched as one character, as Postfix's byte-wise regexec matches it."""
    t, _ = regexp_table(tmp_path, "/^b.b$/ one-character\n!/^plain/ not-plain\n")
    assert t.lookup("b\udcffb") == "one-character"
    assert t.lookup("\ud800x") == "not-plain"


def test_regexp_no_match_is_none(tmp_path):
    t, _ = regexp_table(tmp_path, "/^a$/ b\n")
    assert t.lookup("c") is None


@pytest.mark.parametrize("text,complaint", [
    ("/(unclosed/ x\n", "line 1: bad regular expression"),
    ("/a/ ok\n/b/\n", "line 2: no result"),
    ("/a/q x\n", "flag 'q'"),
    ("!/(a)/ $1\n", "negated"),
    ("/(a)/ $2\n", "out of range replacement index '2'"),
    ("/(a)/ $0\n", "out of range replacement index '0'"),
    ("/(a)/ $1st\n", "non-numeric replacement index '1st'"),
    ("/a x\n", "no closing"),
    ("if /a/\n/b/ c\n", "if without endif"),
    ("endif\n", "endif without if"),
])
def test_regexp_bad_file_is_retry_naming_the_line(tmp_path, text, complaint):
    t, _ = regexp_table(tmp_path, text)
    with pytest.raises(LookupRetry, match=complaint):
        t.lookup("a")


def test_regexp_bad_pattern_at_reload_is_retry_until_fixed(tmp_path):
    clock = FakeClock()
    t, f = regexp_table(tmp_path, "/^a/ one\n", clock)
    assert t.lookup("a") == "one"
    write(f, "/^a/ one\n/[/ broken\n")
    clock.now += 1
    with pytest.raises(LookupRetry, match="regexp:.*line 2"):
        t.lookup("a")
    write(f, "/^a/ fixed\n")
    clock.now += 1
    assert t.lookup("a") == "fixed"


# ------------------------------------------------------------------------------------------------- pcre

def pcre_table(tmp_path, text):
    f = write(tmp_path / "pcre", text)
    return open_table(f"pcre:{f}")


def test_pcre_matches_leftmost_first_where_regexp_matches_leftmost_longest(tmp_path, prefilter):
    """The reason pcre: is a type of its own: `config import` used to write pcre: as regexp:, which answers these
    as Postfix's regexp: does (leftmost-longest), not as its pcre: does (postmap -q)."""
    text = "/^(a|ab)/ $1\n/^<(.+?)>/ $1\n/^x(.*?)(y*)$/ lazy=$1 rest=$2\n"
    t = pcre_table(tmp_path, text)
    assert (t.lookup("abc"), t.lookup("<a>b>"), t.lookup("xyy")) == ("a", "a", "lazy= rest=yy")
    regexp = open_table(f"regexp:{tmp_path / 'pcre'}")
    assert (regexp.lookup("abc"), regexp.lookup("<a>b>")) == ("ab", "a>b")
    assert t.fixed is False


def test_pcre_flags_toggle_postfix_s_defaults(tmp_path, prefilter):
    t = pcre_table(tmp_path, r"""
/^exact$/i                  case-sensitive
/^x-dot: a.b$/              dot-all
/^x-nodot: a.b$/s           never
/^x-nodot:/                 no-dot-all
/^two$/m                    multi-line
/^ spaced \ word  # comment
   $/x                      extended
/b/A                        never
/[ ]q/x                     blank-in-class
/^u(a+)/U                   ungreedy=$1
/^e$/EX                     dollar-end-only
""")
    assert t.lookup("EXACT") is None and t.lookup("exact") == "case-sensitive"
    assert t.lookup("X-Dot: a\nb") == "dot-all"  # `.` matches a break by default, as PCRE_DOTALL
    assert t.lookup("X-NoDot: a\nb") == "no-dot-all"
    assert t.lookup("one\ntwo") == "multi-line"
    assert t.lookup("spaced word") == "extended"
    assert t.lookup("ab") is None  # anchored at the key's start
    assert t.lookup("p q") == "blank-in-class"
    assert t.lookup("uaaa") == "ungreedy=a"
    assert t.lookup("e") == "dollar-end-only"


def test_pcre_negation_delimiters_and_if_blocks(tmp_path, prefilter):
    t = pcre_table(tmp_path, """
if !/@example\\.com$/
|^(.*)@| other=$1
endif
! ! /^admin@/               double-negation
,^root@,                    comma-delimiter
/^a\\/b@/                   escaped-delimiter
!/^zzz/                     not-zzz
""")
    assert t.lookup("joe@elsewhere.test") == "other=joe"
    assert t.lookup("admin@example.com") == "double-negation"  # each ! toggles
    assert t.lookup("root@example.com") == "comma-delimiter"
    assert t.lookup("a/b@example.com") == "escaped-delimiter"
    assert t.lookup("joe@example.com") == "not-zzz"


def test_pcre_results_substitute_as_postfix_s_mac_parse(tmp_path, prefilter):
    t = pcre_table(tmp_path, r"/^(a)(b)?(c)(d)(e)(f)(g)(h)(i)(j)(k)(l)x/ [$1][$2][${3}][$(4)][$12]$$1" + "\n")
    assert t.lookup("acdefghijklx") == "[a][][c][d][l]$1"  # an unmatched group is empty; $12 is group 12


def test_pcre_patterns_and_keys_are_bytes_as_in_postfix_3_7(tmp_path, prefilter):
    """Postfix 3.7's dict_pcre never asks PCRE for UTF mode: `.` is a byte, caseless folds ASCII letters only; a
    key's bytes that were not UTF-8 are matched as those bytes."""
    t = pcre_table(tmp_path, "/^(.)x$/ first=$1\n/^.$/ one-byte\n/^..$/ two-bytes\n/^é!/ eacute\n")
    assert t.lookup("é") == "two-bytes" and t.lookup("e") == "one-byte"
    assert t.lookup("\udcff") == "one-byte"  # a byte that was not UTF-8 (surrogateescape)
    assert t.lookup("éx") is None
    with pytest.raises(LookupRetry, match="non-UTF-8 value 'first="):  # a result that is not UTF-8: as Postfix
        t.lookup("\udcc3x")
    assert t.lookup("é!") == "eacute" and t.lookup("É!") is None
    assert t.lookup("\ud800") is None  # a surrogate surrogateescape never makes: no failure


@pytest.mark.parametrize("text,complaint", [
    ("/(a)\\1/ x\n", "line 1: a back-reference is not supported"),
    ("/a(?=b)/ x\n", "a look-around assertion"),
    ("/(?<!a)b/ x\n", "a look-around assertion"),
    ("/a++/ x\n", "a possessive quantifier"),
    ("/(?>a)/ x\n", "an atomic group"),
    ("/a(?R)?/ x\n", "a recursion"),
    ("/(a)(?(1)b|c)/ x\n", "a conditional group"),
    ("/(unclosed/ x\n", "line 1: bad regular expression: missing ): (unclosed"),
    ("/a/ ok\n/a/q x\n", "line 2: unknown regexp option 'q'"),
    ("/(a)/ $0\n", "out of range replacement index '0'"),
    ("/(a)/ $2\n", "out of range replacement index '2'"),
    ("/(a)/ $1st\n", "non-numeric replacement index '1st'"),
    ("/(a)/ 5$\n", "bad replacement syntax"),
    ("!/(a)/ $1\n", "negated"),
    ("/a x\n", "no closing /"),
    ("if /a/\n/b/ c\n", "line 1: if without endif"),
    ("/a/\n", "no result"),
    ("word x\n", "expected /pattern/"),
    ("/a)|(b/A x\n", "line 1: bad regular expression: unexpected ): a)|(b"),
])
def test_pcre_line_postfix_skips_fails_the_table_naming_line_and_reason(tmp_path, text, complaint):
    with pytest.raises(LookupRetry, match=re.escape(complaint)):
        pcre_table(tmp_path, text).lookup("a")


# ----------------------------------------------------------------------------------------------- sqlite

def sqlite_table(tmp_path, query):
    db = tmp_path / "users.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (email TEXT, local TEXT, domain TEXT, dest TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?)", [
            ("joe@example.com", "joe", "example.com", "joe@mailbox.test"),
            ("o'brien@example.com", "o'brien", "example.com", "ob@mailbox.test"),
            ("team@example.com", "team", "example.com", "a@x.test"),
            ("team@example.com", "team", "example.com", "b@x.test"),
        ])
    conn.close()
    cf = write(tmp_path / "users.cf", f"# sqlite_table(5)\ndbpath = {db}\nquery = {query}\n")
    return open_table(f"sqlite:{cf}"), db


def test_sqlite_whole_key_quotes_and_case(tmp_path):
    t, _ = sqlite_table(tmp_path, "SELECT dest FROM users WHERE email='%s'")
    assert t.lookup("Joe@Example.com") == "joe@mailbox.test"
    assert t.lookup("O'Brien@example.com") == "ob@mailbox.test"
    assert t.lookup("team@example.com") == "a@x.test,b@x.test"
    assert t.lookup("nobody@example.com") is None
    assert t.lookup("x' OR '1'='1") is None  # the quote is data, not SQL


def test_sqlite_asks_the_key_casefolded_as_postfix_s_utf8_fold(tmp_path):
    """Postfix (smtputf8_enable = yes) casefolds the query key of a case-insensitive table: `ß` is `ss`."""
    t, db = sqlite_table(tmp_path, "SELECT dest FROM users WHERE email='%s'")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO users VALUES ('strasse@example.com', 'strasse', 'example.com', 's@x.test')")
    conn.close()
    assert t.lookup("Straße@example.com") == "s@x.test"


def test_sqlite_local_part_and_domain_expansion(tmp_path):
    t, _ = sqlite_table(tmp_path, "SELECT dest FROM users WHERE local='%u' AND domain='%d' AND '%%'='%%'")
    assert t.lookup("joe@example.com") == "joe@mailbox.test"
    assert t.lookup("o'brien@EXAMPLE.com") == "ob@mailbox.test"
    assert t.lookup("joe") is None  # no domain: %d suppresses the query
    assert t.lookup("@example.com") is None  # empty local part: %u suppresses the query


def test_sqlite_database_error_is_retry(tmp_path):
    t, _ = sqlite_table(tmp_path, "SELECT dest FROM nosuchtable WHERE email='%s'")
    with pytest.raises(LookupRetry, match="sqlite:.*nosuchtable"):
        t.lookup("joe@example.com")


def test_sqlite_missing_database_is_retry(tmp_path):
    t, db = sqlite_table(tmp_path, "SELECT dest FROM users WHERE email='%s'")
    db.unlink()
    with pytest.raises(LookupRetry, match="users.db"):
        t.lookup("joe@example.com")


def test_sqlite_opens_read_only(tmp_path):
    t, db = sqlite_table(tmp_path, "DELETE FROM users WHERE email='%s'")
    with pytest.raises(LookupRetry, match="readonly"):
        t.lookup("joe@example.com")
    assert sqlite3.connect(db).execute("SELECT count(*) FROM users").fetchone()[0] == 4


@pytest.mark.parametrize("cf,complaint", [
    ("dbpath = x.db\n", "query"),
    ("query = SELECT 1\n", "dbpath"),
    ("dbpath = x\nquery = SELECT '%x'\n", "%x"),
    ("dbpath = x\nquery = SELECT 1\nhosts = db\n", "unknown parameter"),
])
def test_sqlite_bad_cf_is_config_error(tmp_path, cf, complaint):
    f = write(tmp_path / "t.cf", cf)
    with pytest.raises(ConfigError, match=complaint):
        open_table(f"sqlite:{f}")


def test_sqlite_missing_cf_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        open_table(f"sqlite:{tmp_path / 'nope.cf'}")


# ---------------------------------------------------------------------------------------- search order

class Recording:
    """A fixed table that records the keys it is asked."""

    fixed = True
    name = "recording"

    def __init__(self, entries: dict[str, str]):
        self.entries, self.asked = entries, []

    def lookup(self, key: str) -> str | None:
        self.asked.append(key)
        return self.entries.get(key.lower())


def test_lookup_address_search_order():
    t = Recording({})
    assert lookup_address(t, "user+ext@example.com", delimiter="+") is None
    assert t.asked == ["user+ext@example.com", "user@example.com", "@example.com"]


def test_lookup_address_stops_at_the_first_answer():
    t = Recording({"user@example.com": "u", "@example.com": "catch-all"})
    assert lookup_address(t, "user+ext@example.com", delimiter="+") == ("user@example.com", "u")
    assert lookup_address(t, "other@example.com", delimiter="+") == ("@example.com", "catch-all")
    t2 = Recording({"user+ext@example.com": "exact", "user@example.com": "u"})
    assert lookup_address(t2, "user+ext@example.com", delimiter="+") == ("user+ext@example.com", "exact")


def test_lookup_address_case_folding_with_a_real_table():
    t = open_table("inline:{ joe@example.com=j, @example.org=catch }")
    assert lookup_address(t, "Joe+Tag@EXAMPLE.com", delimiter="+") == ("Joe@EXAMPLE.com", "j")
    assert lookup_address(t, "x@Example.ORG", delimiter="+") == ("@Example.ORG", "catch")


def test_lookup_address_delimiters():
    t = Recording({})
    lookup_address(t, "user-ext@d", delimiter="")
    assert t.asked == ["user-ext@d", "@d"]
    t = Recording({})
    lookup_address(t, "user-ext@d", delimiter="+-")
    assert t.asked == ["user-ext@d", "user@d", "@d"]
    t = Recording({})
    lookup_address(t, "+ext@d", delimiter="+")  # never an empty user
    assert t.asked == ["+ext@d", "@d"]


def test_lookup_address_asks_pattern_tables_the_full_address_only(tmp_path):
    f = write(tmp_path / "re", "/^user@/ plain\n/^@example\\.com$/ domain\n")
    t = open_table(f"regexp:{f}")
    assert lookup_address(t, "user+ext@example.com", delimiter="+") is None  # neither user@example.com nor @example.com
    assert lookup_address(t, "user@example.com", delimiter="+") == ("user@example.com", "plain")


def test_lookup_address_passes_retry_through():
    with pytest.raises(LookupRetry):
        lookup_address(open_table("fail:x"), "a@b", delimiter="+")


def test_lookup_local():
    t = Recording({"user": "u"})
    assert lookup_local(t, "user+ext", delimiter="+") == ("user", "u")
    assert t.asked == ["user+ext", "user"]
    assert lookup_local(t, "other", delimiter="+") is None
    assert lookup_address(t, "user+x", delimiter="+") == ("user", "u")  # no domain: alias-style keys
    assert split_extension("a+b+c", "+") == ("a", "+b+c")

# ------------------------------------------------------------------------------------------------- cidr

CIDR = """
# first match wins
192.0.2.1            one-address
192.0.2.0/24         net24
192.0.2.0/25         never-reached
[2001:db8::1]        v6-bracketed
[2001:db8::]/32      v6-bracket-then-length
[2001:db9::/32]      v6-length-inside
!10.0.0.0/8          not-ten
if ::/0
::1                  v6-loopback
endif
"""


def cidr_table(tmp_path, text=CIDR, clock=None):
    f = write(tmp_path / "cidr", text)
    return open_table(f"cidr:{f}", **({"clock": clock} if clock else {})), f


def test_cidr_first_match_wins_over_networks_addresses_and_negation(tmp_path):
    t, _ = cidr_table(tmp_path)
    assert t.fixed is False  # a pattern table: check_client_access asks it the name and the address only
    assert t.lookup("192.0.2.1") == "one-address"
    assert t.lookup("192.0.2.3") == "net24"  # the /25 below it is never reached
    assert t.lookup("2001:db8::1") == t.lookup("2001:DB8:0::1") == "v6-bracketed"
    assert t.lookup("2001:db8:ffff::9") == "v6-bracket-then-length"
    assert t.lookup("2001:db9::9") == "v6-length-inside"
    assert t.lookup("198.51.100.7") == "not-ten"
    assert t.lookup("10.1.2.3") is None
    assert t.lookup("::1") == "v6-loopback"  # a negated IPv4 pattern never holds an IPv6 address
    assert t.lookup("2001:dba::1") is None


@pytest.mark.parametrize("key", ["[192.0.2.1]", "IPv6:2001:db8::1", "192.0.2", "01.2.3.4", "192.0.2.1 ",
                                 "fe80::1%lo", "host.example", "", "192.0.2.1\x00", "b\udcff"])
def test_cidr_a_key_that_is_not_an_address_is_not_found(tmp_path, key):
    t, _ = cidr_table(tmp_path, "0.0.0.0/0 any4\n::/0 any6\n")
    assert t.lookup(key) is None


def test_cidr_if_blocks_nest_negate_and_skip_the_other_family(tmp_path):
    t, _ = cidr_table(tmp_path, """
IF 198.51.100.0/24
if ! 198.51.100.0/25
198.51.100.200    upper-half
endif
0.0.0.0/0         in-the-24
ENDIF
if !203.0.113.0/24
0.0.0.0/0         not-203
endif
::/0              v6
""")
    assert t.lookup("198.51.100.200") == "upper-half"
    assert t.lookup("198.51.100.7") == "in-the-24"
    assert t.lookup("203.0.113.5") is None
    assert t.lookup("192.0.2.1") == "not-203"
    assert t.lookup("2001:db8::1") == "v6"  # `if !IPv4` does not hold an IPv6 address: its block is skipped


def test_cidr_continuation_lines_join_the_result(tmp_path):
    t, _ = cidr_table(tmp_path, "192.0.2.0/24 REJECT\n  go away\n")
    assert t.lookup("192.0.2.9") == "REJECT  go away"


def test_cidr_many_rules_answer_from_the_index_in_file_order(tmp_path, monkeypatch):
    lines = [f"10.{i // 256}.{i % 256}.0/24 net-{i}" for i in range(20000)] + ["10.0.0.0/8 the-8"]
    t, _ = cidr_table(tmp_path, "\n".join(lines) + "\n!10.0.0.0/8 outside\n10.255.255.0/24 after-the-negation\n")
    t.lookup("192.0.2.1")  # loaded
    matched = []
    holds = cidr_module._Network.holds
    monkeypatch.setattr(cidr_module._Network, "holds", lambda net, address: matched.append(net) or holds(net, address))
    assert t.lookup("10.78.31.5") == "net-19999"
    assert len(matched) <= 2  # the index answers: a linear walk would match the address against 20000 rules
    assert t.lookup("10.100.0.1") == "the-8"
    assert t.lookup("10.255.255.1") == "the-8"  # the /8 comes first
    assert t.lookup("192.0.2.1") == "outside"


@pytest.mark.parametrize("text,complaint", [
    ("10.1.2.3/8 x\n", 'line 1: non-null host address bits in "10.1.2.3/8", perhaps you should use "10.0.0.0/8" '
                       'instead'),
    ("# c\n2001:db8::1/32 x\n", 'line 2: non-null host address bits in "2001:db8::1/32", perhaps you should use '
                                 '"2001:db8::/32" instead'),
    ("10.0.0.0/33 x\n", 'line 1: bad mask length in "10.0.0.0/33"'),
    ("10.0.0.0/ x\n", 'line 1: bad mask value in "10.0.0.0/"'),
    ("10.0.0.0/255.0.0.0 x\n", 'line 1: bad mask value in "10.0.0.0/255.0.0.0"'),
    ("10.0.0/8 x\n", 'line 1: bad network value in "10.0.0/8"'),
    ("[1.2.3.0/8]/24 x\n", 'line 1: bad network value in "1.2.3.0/8/24"'),
    ("192.0.2.1\n", "line 1: no lookup result"),
    ("host.example x\n", 'line 1: bad address pattern: "host.example"'),
    ("[2001:db8::1 x\n", "line 1: missing ']' character after \"\\[2001:db8::1\""),
    ("[2001:db8::1]x y\n", 'line 1: garbage after "\\[2001:db8::1\\]"'),
    ("if\n", "line 1: no address pattern"),
    ("! x\n", 'line 1: bad address pattern: "x"'),
    ("if 192.0.2.0/24\n192.0.2.1 x\n", "line 1: IF has no matching ENDIF"),
    ("endif\n", "line 1: ENDIF without IF"),
    ("if 192.0.2.0/24\nendif x\n", "line 2: garbage after ENDIF"),
    ("ifx 1.2.3.4 y\n", 'line 1: bad address pattern: "ifx"'),
])
def test_cidr_a_line_postfix_skips_fails_the_table_naming_it(tmp_path, text, complaint):
    t, f = cidr_table(tmp_path, text)
    with pytest.raises(LookupRetry, match=f"table cidr:{f}: {f}, {complaint}"):
        t.lookup("192.0.2.1")


def test_cidr_bad_line_at_reload_is_retry_until_fixed(tmp_path):
    clock = FakeClock()
    t, f = cidr_table(tmp_path, "192.0.2.0/24 one\n", clock)
    assert t.lookup("192.0.2.1") == "one"
    write(f, "192.0.2.0/24 one\n192.0.2.1/24 broken\n")
    clock.now += 1
    with pytest.raises(LookupRetry, match="line 2: non-null host address bits"):
        t.lookup("192.0.2.1")
    write(f, "192.0.2.0/24 fixed\n")
    clock.now += 1
    assert t.lookup("192.0.2.1") == "fixed"



# ---------------------------------------------------------------------------------------------- the CLI

def mailflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailflow", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_query_one_key_prints_the_value(tmp_path):
    f = write(tmp_path / "t", "a one\n")
    result = mailflow("table", "query", f"texthash:{f}", "A")
    assert (result.returncode, result.stdout) == (0, "one\n")


def test_cli_query_several_keys_prints_key_tab_value():
    result = mailflow("table", "query", "inline:{a=1, b=2}", "a", "x", "b")
    assert (result.returncode, result.stdout) == (0, "a\t1\nb\t2\n")


def test_cli_query_dash_reads_the_keys_from_stdin_as_postmap_q_dash():
    result = subprocess.run([sys.executable, "-m", "mailflow", "table", "query", "inline:{a=1, b=2}", "-"],
                            input="a\nx\nb\n", capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "a\t1\nb\t2\n")  # key TAB value even for one key


def test_inline_last_of_duplicate_keys_wins_as_in_postfix():
    assert open_table("inline:{a=1, A=2}").lookup("a") == "2"


def test_cli_query_nothing_found_exits_1():
    result = mailflow("table", "query", "inline:{a=1}", "x", "y")
    assert (result.returncode, result.stdout) == (1, "")


def test_cli_query_bad_spec_exits_2_without_traceback():
    result = mailflow("table", "query", "hash:/etc/postfix/virtual", "x")
    assert result.returncode == 2
    assert "unknown table type 'hash'" in result.stderr and "Traceback" not in result.stderr


def test_cli_query_lookup_failure_exits_75(tmp_path):
    result = mailflow("table", "query", f"texthash:{tmp_path / 'missing'}", "x")
    assert result.returncode == 75
    assert "lookup failed" in result.stderr and "missing" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------- bounded lookup cost

# A query that counts to a hundred million for the key 'slow' and answers at once for any other key.
SLOW_QUERY = ("SELECT 'OK' FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
              "WHERE '%u' = 'slow' AND x < 100000000) SELECT max(x) FROM c)")


def test_regexp_catastrophic_pattern_answers_at_once(tmp_path):
    """`^(a+)+$` backtracks exponentially on `aaaa…b` in a backtracking engine (Python's re needs hours for
    40 a's); RE2 answers in linear time."""
    t, _ = regexp_table(tmp_path, "/^(a+)+$/ matched\n/^(a|aa)+b@/ other\n")
    started = time.thread_time()  # the CPU the lookups cost (in this thread), not the time others took meanwhile
    assert t.lookup("a" * 60 + "b@example.com") == "other"
    assert t.lookup("a" * 5000 + "!") is None
    assert time.thread_time() - started < 0.5


def test_regexp_rejects_back_references_with_the_line(tmp_path):
    t, _ = regexp_table(tmp_path, "/^a/ one\n/(a)\\1/ two\n")
    with pytest.raises(LookupRetry, match="line 2: bad regular expression"):
        t.lookup("a")


def test_regexp_matches_leftmost_longest_as_posix(tmp_path):
    t, _ = regexp_table(tmp_path, "/^(a|ab)/ $1\n")
    assert t.lookup("abc") == "ab"  # POSIX: the longest match, not the first alternative that matches


def test_sqlite_query_past_its_timeout_is_retry_and_the_next_works(tmp_path):
    t, db = sqlite_table(tmp_path, SLOW_QUERY)
    cf = write(tmp_path / "slow.cf", f"dbpath = {db}\nquery = {SLOW_QUERY}\ntimeout = 0.2\n")
    t = open_table(f"sqlite:{cf}")
    assert t.blocking and t.timeout == 0.2
    started = time.process_time()  # the CPU the query cost: the count to a hundred million needs seconds of it
    with pytest.raises(LookupRetry, match="no answer within 0.2s"):
        t.lookup("slow@example.com")
    assert time.process_time() - started < 2.0
    assert t.lookup("quick@example.com") == "OK"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "7200"])
def test_sqlite_bad_timeout_is_a_config_error(tmp_path, value):
    cf = write(tmp_path / "t.cf", f"dbpath = x.db\nquery = SELECT 1\ntimeout = {value}\n")
    with pytest.raises(ConfigError) as e:
        open_table(f"sqlite:{cf}")
    assert e.value.key == "timeout"


async def test_run_is_inline_for_memory_tables_and_threaded_for_sqlite(tmp_path):
    import threading

    cache = TableCache()
    cache.open(["inline:{a=b}"])
    assert not cache.blocking
    assert await cache.run(threading.get_ident) == threading.get_ident()  # no thread hop
    _, db = sqlite_table(tmp_path, "SELECT 1")
    cf = write(tmp_path / "slow.cf", f"dbpath = {db}\nquery = {SLOW_QUERY}\ntimeout = 0.3\n")
    [slow] = cache.open([f"sqlite:{cf}"])
    assert cache.blocking
    assert await cache.run(threading.get_ident) != threading.get_ident()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(LookupRetry):
            await cache.run(slow.lookup, "slow@example.com")
    finally:
        task.cancel()
    assert ticks >= 10, "the loop went on while the query ran"


async def test_views_share_each_table_and_run_inline_unless_one_of_their_own_may_block(tmp_path):
    """A server generation opens its tables through views of one cache: a spec two views name is one table (read
    once), and a part whose own tables answer from memory keeps its lookups inline when another part has sqlite."""
    cache = TableCache()
    routing, listener = cache.view(), cache.view()
    [shared] = routing.open(["inline:{a=b}"])
    assert listener.open(["inline:{a=b}"]) == [shared] and cache.open(["inline:{a=b}"]) == [shared]
    quick_sqlite(routing, tmp_path)
    assert routing.blocking and not listener.blocking and not cache.blocking
    assert await listener.run(threading.get_ident) == threading.get_ident()


def test_a_built_generations_views_hold_only_their_own_tables(tmp_path):
    """Once the generation is built, a part still in use after its replacement (an open session, a delivery) keeps
    its own tables alive, not every table of the generation: each view held them all."""
    (tmp_path / "checks").write_text("/^X-Bad: / REJECT\n")
    (tmp_path / "access").write_text("alice@relay.test OK\n")
    generation = TableCache()
    content_checks, listener = generation.view(), generation.view()
    [checks] = content_checks.open([f"regexp:{tmp_path}/checks"])
    [access] = listener.open([f"texthash:{tmp_path}/access"])
    generation.built()
    assert sorted(map(id, generation.file_tables())) == sorted(map(id, [checks, access]))
    checks_gone = weakref.finalize(checks, lambda: None)
    del generation, content_checks, checks  # (replaced; the listener still in use by an open session)
    gc.collect()
    assert not checks_gone.alive and listener.open([f"texthash:{tmp_path}/access"]) == [access]


def test_a_file_table_only_the_check_opened_is_kept_by_the_generation_for_the_next_reload(tmp_path):
    """A reload's check opens every table its settings name, through a view of the generation's cache; a file table
    no part opened (postscreen's access list with postscreen off) stays with the generation, for the next reload
    to take over while its file is unchanged (it was read again at every reload); another kind (nothing to read
    again) is let go."""
    for name in ("relay", "unused"):
        (tmp_path / name).write_text("alice@relay.test OK\n")
    time.sleep(settled_in(tmp_path / "relay", tmp_path / "unused"))
    specs = [f"texthash:{tmp_path}/relay", f"texthash:{tmp_path}/unused", "inline:{a=b}"]
    generation = TableCache()
    check, routing = generation.view(), generation.view()
    [relay, unused, inline] = check.open(specs)
    for table in (relay, unused, inline):
        table.lookup("probe")  # (as the check asks each)
    assert routing.open(specs[:1]) == [relay]
    assert generation.built(check) == [] and generation.file_tables() == [relay, unused]
    assert generation.read_itself() == [relay, unused] and inline not in generation._held().values()
    following = TableCache(previous=generation)
    assert following.view().open(specs[1:2]) == [unused] and following.taken_over() == [unused]
    assert following.built() == [relay]  # (the replaced generation's table the new one did not name)


def built_generation(specs: list[str], previous: TableCache | None = None) -> tuple[TableCache, list]:
    """A generation built as a reload builds one: its check (a view) opens and asks every table, then a part (a
    view) opens them; `previous`: the generation in force. Returns it (built) and its tables."""
    generation = TableCache(previous=previous)
    check, part = generation.view(), generation.view()
    for table in check.open(specs):
        table.lookup("probe")
    tables = part.open(specs)
    generation.built(check)
    return generation, tables


def test_a_reloads_generation_takes_over_the_file_tables_whose_file_is_unchanged_and_opens_the_rest_anew(tmp_path):
    """A reload's generation reads a table file again only when it changed: the table in force (its parsed
    contents) is taken over, as is, for an unchanged file; a changed one is read anew (its new contents answer);
    tables without a file are made again (they cost nothing). The swap lets go only what it did not take over."""
    kept, changed = tmp_path / "kept.regexp", tmp_path / "changed"
    kept.write_text("/^a/ kept\n")
    changed.write_text("a before\n")
    specs = [f"regexp:{kept}", f"texthash:{changed}", "inline:{a=inline}"]
    time.sleep(settled_in(kept, changed))  # (read sooner, their stamps are not trusted: read again)
    first, [regexp, texthash, inline] = built_generation(specs)
    parsed = regexp.contents()
    changed.write_text("a after, longer\n")
    generation = TableCache(previous=first)
    check, part = generation.view(), generation.view()
    opened = check.open(specs)
    assert opened[0] is regexp and opened[1] is not texthash and opened[2] is not inline
    assert part.open(specs) == opened and generation.taken_over() == [regexp]
    assert generation.read_itself() == [opened[1]]  # (file tables only: the inline one is no file's)
    assert [table.lookup("a") for table in opened] == ["kept", "after, longer", "inline"]
    assert regexp.contents() is parsed  # (not read again)
    assert generation.built(check) == [texthash]  # (what the swap lets go: the replaced table, not the one kept)
    assert sorted(map(id, generation.file_tables())) == sorted(map(id, opened[:2]))


def test_a_reloads_generation_holds_nothing_of_the_one_it_replaced_but_what_it_took_over(tmp_path):
    """Once built, a reload's generation (and each of its views, which an open session may hold for long) keeps
    none of the replaced generation's tables but those it took over: a table the new configuration no longer
    names goes with the replaced generation, to be retired."""
    for name in ("kept", "dropped"):
        (tmp_path / name).write_text("a b\n")
    time.sleep(settled_in(tmp_path / "kept"))
    first, [kept, dropped] = built_generation([f"texthash:{tmp_path}/kept", f"texthash:{tmp_path}/dropped"])
    second, [taken] = built_generation([f"texthash:{tmp_path}/kept"], previous=first)
    view = second.view()
    dropped_gone = weakref.finalize(dropped, lambda: None)
    del first, dropped
    gc.collect()
    assert not dropped_gone.alive and taken is kept and second.file_tables() == [kept]
    assert view.open([f"texthash:{tmp_path}/kept"])[0].lookup("a") == "b"


def test_a_refused_reloads_generation_lets_go_only_the_tables_it_read_itself(tmp_path):
    """A reload refused after its check took a table over from the generation in force lets go (to retire) only
    what it read itself: the table it took over is still in force, untouched."""
    (tmp_path / "kept").write_text("a kept\n")
    (tmp_path / "new").write_text("a new\n")
    time.sleep(settled_in(tmp_path / "kept"))
    first, [kept] = built_generation([f"texthash:{tmp_path}/kept"])
    refused = TableCache(previous=first)
    [taken, new] = refused.view().open([f"texthash:{tmp_path}/kept", f"texthash:{tmp_path}/new"])
    assert taken is kept and refused.abandoned() == [new]
    assert first.file_tables() == [kept] and kept.lookup("a") == "kept"


def test_a_table_taken_over_is_the_one_used_whatever_its_truth_value(tmp_path, monkeypatch):
    """The takeover asks whether there is a table to take over, not whether it is true: a table type that has a
    length (as NetworkList has) and is empty is taken over too, not replaced by a table read anew."""
    from mailflow.tables.files import TexthashTable

    (tmp_path / "empty").write_text("")
    time.sleep(settled_in(tmp_path / "empty"))
    first, [empty] = built_generation([f"texthash:{tmp_path}/empty"])
    monkeypatch.setattr(TexthashTable, "__len__", lambda table: len(table.contents() or ()), raising=False)
    assert not empty
    second, [taken] = built_generation([f"texthash:{tmp_path}/empty"], previous=first)
    assert taken is empty and second.taken_over() == [empty]


def test_a_file_rewritten_to_its_size_and_mtime_is_read_anew_for_its_ctime(tmp_path):
    """A table file rewritten in place to the same size, its mtime set back (`touch -d`, a copy keeping times), has
    another ctime, which nothing sets back: a reload reads it anew (inode, size and mtime alone kept the old
    contents in force)."""
    path = tmp_path / "access"
    path.write_text("a before\n")
    time.sleep(settled_in(path))  # (read sooner, its stamp would not be trusted whatever the rewrite)
    first, [table] = built_generation([f"texthash:{path}"])
    before = os.stat(path)
    assert table.unchanged()
    after = rewritten_with_its_times(path, "a after!\n", before)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns and not table.unchanged()
    _, [reread] = built_generation([f"texthash:{path}"], previous=first)
    assert reread is not table and reread.lookup("a") == "after!"


def test_a_table_read_as_its_file_was_just_written_is_read_again_by_a_reload(tmp_path, monkeypatch):
    """A read's stamp hides a write made within the file system's timestamp tick after it (a same-size rewrite keeps
    size, mtime and ctime on a coarse file system): a table whose file was changed less than RACY_MARGIN before its
    read began is read again by a reload however unchanged its stamp looks; read later, it is taken over. (The
    margin is 60 s for the first read: a runner stalled a second between the write and the read would make it late.)"""
    margin = files_module.RACY_MARGIN
    monkeypatch.setattr(files_module, "RACY_MARGIN", 60_000_000_000)
    path = tmp_path / "access"
    path.write_text("a before\n")
    first, [fresh] = built_generation([f"texthash:{path}"])
    assert not fresh.unchanged()
    monkeypatch.setattr(files_module, "RACY_MARGIN", margin)
    time.sleep(settled_in(path))
    assert not fresh.unchanged()  # (its read stays unsure, however long ago the write now is)
    second, [reread] = built_generation([f"texthash:{path}"], previous=first)
    assert reread is not fresh and reread.unchanged()  # (this read began well after the write)
    third, [taken] = built_generation([f"texthash:{path}"], previous=second)
    assert taken is reread and third.taken_over() == [reread]


def test_a_reload_looks_at_a_table_file_through_an_open_of_it(tmp_path, monkeypatch):
    """Whether a table file is unchanged is asked of the file opened (its descriptor's fstat), not of a bare
    stat(): an NFS client answers stat() from its attribute cache for up to acregmax (60 s) but revalidates a file
    at open (close-to-open), as the re-read a reload did before took for granted."""
    import mailflow.files

    path = tmp_path / "access"
    path.write_text("a b\n")
    time.sleep(settled_in(path))
    [table] = TableCache().open([f"texthash:{path}"])
    table.load()
    opened, real_open = [], os.open

    def recorded(name, *args):
        opened.append(str(name))
        return real_open(name, *args)
    monkeypatch.setattr(mailflow.files.os, "open", recorded)  # (os itself, for this test's length)
    assert table.unchanged() and opened == [str(path)]


def rewritten_with_its_times(path, text: str, before: os.stat_result) -> os.stat_result:
    """`path` rewritten to `text`, its times set back to `before`'s, once its ctime differs from `before`'s (a
    file system's timestamp tick may be a second or two: tried again until then, at most ~2 s, else the test is
    skipped); returns its stat."""
    give_up = time.monotonic() + 2.5
    while True:
        path.write_text(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        if after.st_ctime_ns != before.st_ctime_ns:
            return after
        if time.monotonic() > give_up:
            pytest.skip("this file system's ctime did not move in 2.5 s")
        time.sleep(0.05)


class Unwatchable:
    __slots__ = ("rules",)  # (no __weakref__: weakref.finalize refuses it)

    def __init__(self) -> None:
        self.rules = list(range(10))

    @property
    def reading(self) -> list[int]:
        return self.rules


async def test_retiring_a_table_that_cannot_be_watched_is_no_failure():
    """A reload retires the replaced tables once nothing may fail: a table class without a weakref slot is left to
    the collector's pass (its contents with it), the others kept apart as ever."""
    tables = RetiredTables()
    watched = open_table("texthash:/dev/null")
    watched.load()
    tables.retire([Unwatchable(), watched])
    assert len(tables._kept) == 1
    await tables.close()


async def test_a_retired_table_that_re_reads_its_file_has_its_last_contents_taken_apart_not_freed_with_it(tmp_path):
    """A table an old session still uses re-reads its changed file after the reload retired it: the contents taken
    apart on the loop once it goes are those it holds then (they outlive it by a turn), not the ones of the reload's
    time (the new ones were freed with the table, in the collector's pass)."""
    rules = tmp_path / "checks.regexp"
    rules.write_text("/^a/ OK\n")
    table = open_table(f"regexp:{rules}")
    table.load()
    tables = RetiredTables()
    tables.retire([table])
    rules.write_text("/^b/ OK\n/^c/ OK\n")
    table.load()
    parsed = weakref.ref(table.contents())
    loop, outlived = asyncio.get_running_loop(), []
    weakref.finalize(table, lambda: loop.call_soon_threadsafe(lambda: outlived.append(parsed() is not None)))
    del table
    await eventually(lambda: outlived and parsed() is None, timeout=5, what="the table gone, its rules taken apart")
    assert outlived == [True] and tables._kept == []
    await tables.close()


def test_a_retired_table_gone_as_its_loop_closes_is_no_error():
    """A retired table's finalizer runs in whichever thread drops its last reference: the loop may close between
    a look at it and the call handing it the drop."""
    from mailflow.tables.retire import _gone

    class ClosingLoop:
        def is_closed(self) -> bool:
            return False  # (still open when looked at)

        def call_soon_threadsafe(self, *args) -> None:
            raise RuntimeError("Event loop is closed")

    _gone(ClosingLoop(), print, [])  # type: ignore[arg-type]


def test_taking_retired_contents_apart_empties_parsed_rules_and_nothing_else_of_the_tables_modules(tmp_path):
    """Retired contents are taken apart a piece at a time: the parsed rules (regexp's, cidr's) are emptied, any
    other object met in them (a table, say, still in use elsewhere) is dropped whole, untouched."""
    from mailflow.tables.retire import _pieces

    (tmp_path / "access").write_text("alice@relay.test OK\n")
    [in_use] = TableCache().open([f"texthash:{tmp_path}/access"])
    parsed = regexp_module.parse_regexp("/^X-Bad: / REJECT\n")
    for _ in _pieces([parsed, in_use]):
        pass
    assert vars(parsed) == {} and in_use.lookup("alice@relay.test") == "OK"


async def test_run_off_the_loop_takes_a_thread_for_memory_tables_and_keeps_a_blocking_tables_deadline(tmp_path):
    """Work too long for the loop (a list of thousands of members) runs in a worker thread whatever the tables;
    with a sqlite table opened, still within its deadline."""
    cache = TableCache()
    cache.open(["inline:{a=b}"])
    assert await cache.run(threading.get_ident, off_loop=True) != threading.get_ident()
    _, db = sqlite_table(tmp_path, "SELECT 1")
    cf = write(tmp_path / "slow.cf", f"dbpath = {db}\nquery = SELECT 1\ntimeout = 0.2\n")
    cache.open([f"sqlite:{cf}"])
    started = time.monotonic()
    release = threading.Event()  # set once the deadline has been seen: the worker thread ends then, not 5 s on
    try:
        with pytest.raises(LookupRetry):
            await cache.run(release.wait, 5, off_loop=True)
        assert time.monotonic() - started < 3
    finally:
        release.set()


def quick_sqlite(cache: TableCache, tmp_path, timeout: float = 0.1) -> float:
    """A sqlite table (`timeout`) opened in `cache`: run's deadline."""
    _, db = sqlite_table(tmp_path, "SELECT 1")
    cf = write(tmp_path / "quick.cf", f"dbpath = {db}\nquery = SELECT 1\ntimeout = {timeout}\n")
    cache.open([f"sqlite:{cf}"])
    return timeout + RUN_GRACE


async def test_run_in_the_default_executor_counts_the_wait_for_a_thread_in_the_deadline(tmp_path):
    """The default executor is shared (Maildir writes, mbox appends, getpwnam, DKIM) and nothing else bounds a wait
    for one of its threads: with every thread held by a hung job, a lookup waited for ever (an SMTP client held at
    RCPT until its own timeout) where it deferred at the deadline."""
    from concurrent.futures import ThreadPoolExecutor

    cache = TableCache()
    deadline = quick_sqlite(cache, tmp_path)
    loop = asyncio.get_running_loop()
    release = threading.Event()
    pool = ThreadPoolExecutor(1)
    loop.set_default_executor(pool)  # (this test's loop only)
    try:
        hung = loop.run_in_executor(None, release.wait, 30)
        started = time.monotonic()
        with pytest.raises(LookupRetry):
            await asyncio.wait_for(cache.run(lambda: "answer"), 5)
        assert deadline <= time.monotonic() - started < deadline + 1
    finally:
        release.set()
        await hung


async def test_run_in_a_reserved_thread_counts_the_deadline_from_the_call(tmp_path):
    """With a thread of the caller's own pool reserved first (BoundedWorkers.slot, the content checks' and local
    delivery's), the wait for it is that pool's (bounded by its threads' progress), not the table's deadline: a
    lookup queued behind a call longer than the deadline answers; a call that itself outlasts it gets LookupRetry."""
    from mailflow.workers import BoundedWorkers

    cache = TableCache()
    deadline = quick_sqlite(cache, tmp_path)
    workers = BoundedWorkers(1, 30, "test lookups")
    try:
        busy = asyncio.create_task(workers.run(partial(time.sleep, deadline + 0.4)))  # longer than the deadline
        await asyncio.sleep(0)  # (it takes the one thread first)
        started = time.monotonic()
        async with workers.slot() as submit:
            assert await cache.run(lambda: "answer", workers=submit) == "answer"
        assert time.monotonic() - started >= deadline  # (it did wait for the thread)
        await busy
        release = threading.Event()
        try:
            with pytest.raises(LookupRetry):
                async with workers.slot() as submit:
                    await cache.run(release.wait, 5, workers=submit)
        finally:
            release.set()
    finally:
        assert await workers.close_within(10)


async def test_a_changed_file_is_reread_off_the_loop_and_old_contents_answer_meanwhile(tmp_path):
    clock = FakeClock()
    f = write(tmp_path / "map", "a one\n")
    t = open_table(f"texthash:{f}", clock=clock)
    loop_thread = threading.get_ident()
    reads, release = [], threading.Event()
    real_read = t._file._read

    def read(previous):
        reads.append(threading.get_ident())
        if threading.get_ident() != loop_thread:
            release.wait(5)  # a slow re-read: the loop must not wait for it
        return real_read(previous)

    t._file._read = read
    assert t.lookup("a") == "one"  # first read: in the caller (nobody preloaded)
    f.write_text("a two\nb three\n")
    clock.now += 2
    assert t.lookup("a") == "one" and t.lookup("b") is None  # the re-read waits in a worker thread
    await eventually(lambda: len(reads) == 2, timeout=1)
    assert reads[1] != loop_thread
    assert t.lookup("a") == "one"  # still the old contents while the re-read is held
    release.set()
    await eventually(lambda: t.lookup("b") == "three", timeout=1)
    assert (t.lookup("a"), t.lookup("b")) == ("two", "three")
    assert reads[0] == loop_thread and len(reads) == 2


# ---------------------------------------------------------------------------------------------- unix:


def test_unix_passwd_answers_the_entry_as_postmap_does():
    import pwd
    me = pwd.getpwuid(os.getuid())
    t = open_table("unix:passwd.byname")
    assert t.blocking and t.fixed
    assert t.lookup(me.pw_name) == (f"{me.pw_name}:{me.pw_passwd}:{me.pw_uid}:{me.pw_gid}:{me.pw_gecos}:"
                                    f"{me.pw_dir}:{me.pw_shell}")
    assert t.lookup("no-such-user-here") is None
    assert t.lookup(f"{me.pw_name}@example.test") is None  # a user name, not an address


def test_unix_group_and_an_unknown_map():
    import grp
    g = grp.getgrgid(os.getgid())
    assert open_table("unix:group.byname").lookup(g.gr_name) == f"{g.gr_name}:{g.gr_passwd}:{g.gr_gid}:" + \
        ",".join(g.gr_mem)
    with pytest.raises(ConfigError, match="passwd.byname and group.byname"):
        open_table("unix:shadow.byname")


def test_unix_passwd_agrees_with_postfix():
    import pwd
    postmap = require_tool("postmap")
    me = pwd.getpwuid(os.getuid()).pw_name
    expected = subprocess.run([postmap, "-q", me, "unix:passwd.byname"], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert open_table("unix:passwd.byname").lookup(me) == expected


def _myorigin(addr: str) -> str:
    return addr if "@" in addr or not addr else f"{addr}@origin.test"


@pytest.mark.parametrize("addr, key, value, propagate, expected", [
    ("joe+x@a.test", "joe@a.test", "@b.test", False, ("joe@b.test",)),  # generic: the extension left out
    ("joe+x@a.test", "joe@a.test", "@b.test", True, ("joe+x@b.test",)),  # canonical, virtual: carried over
    ("joe+x@a.test", "@a.test", "bob", True, ("bob@origin.test",)),  # an @domain key carries nothing
    ("joe+x@a.test", "joe@a.test", "@b.test, c@d.test", True, ('"joe@b.test, c+x"@d.test',)),  # quoted once
    ("joe@a.test", "joe@a.test", "bob, (a comment)", True, ("bob@origin.test", None)),  # None: no address
    ("joe@a.test", "joe@a.test", "<>", True, ("",)),  # the null address
])
def test_mapped_addresses_is_postfix_mail_addr_map(addr, key, value, propagate, expected):
    assert mapped_addresses(addr, key, value, delimiter="+", qualify=_myorigin, propagate=propagate) == expected


@pytest.mark.parametrize("addr, local_domain, keys", [
    ("joe+x@a.test", True, ["joe+x@a.test", "joe@a.test", "joe+x", "joe", "@a.test"]),
    # a quoted local part: the extension is split off its internal form and the rest quoted again, as Postfix 3.7
    # asks (against Postfix: test_quoting_vs_postfix.py, a virtual alias `"v 3"@x.test`)
    ('"a b+x"@a.test', False, ['"a b+x"@a.test', '"a b"@a.test', "@a.test"]),
    ('"a b+x"@a.test', True, ['"a b+x"@a.test', '"a b"@a.test', '"a b+x"', '"a b"', "@a.test"]),
    ('"a b+"@a.test', False, ['"a b+"@a.test', '"a b"@a.test', "@a.test"]),
])
def test_address_keys_split_the_extension_as_postfix_does(addr, local_domain, keys):
    assert address_keys(addr, delimiter="+", local_domain=local_domain) == keys


@pytest.mark.parametrize("addr, local_domain, keys", [
    ("joe+x@a.test", True, ["joe+x@a.test", "joe@a.test", "joe+x", "joe", "@a.test"]),
    ('"a b+x"@a.test', False, ['"a b+x"@a.test', "a b+x@a.test", '"a b"@a.test', "a b@a.test", "@a.test"]),
    ('"r.1."@a.test', True, ['"r.1."@a.test', "r.1.@a.test", '"r.1."', "r.1.", "@a.test"]),
    # `r.1.+e` is a dot-atom: Postfix's quoting leaves it bare, so its one form is asked once
    ('"r.1.+e"@a.test', False, ["r.1.+e@a.test", '"r.1."@a.test', "r.1.@a.test", "@a.test"]),
])
def test_address_keys_in_the_legacy_form_ask_each_key_quoted_then_internal(addr, local_domain, keys):
    """mail_addr_find's legacy form (MA_FORM_EXTERNAL_FIRST): relay_recipient_maps, virtual_mailbox_maps,
    relocated_maps, the bcc maps and the others Postfix asks with mail_addr_find (review of hunt-quote #2)."""
    assert address_keys(addr, delimiter="+", local_domain=local_domain, form=EXTERNAL_FIRST) == keys
    assert address_search(addr, delimiter="+", form=EXTERNAL_FIRST)[1] == ((0, 1) if keys[0][0] == '"' else (0,))


def test_local_part_keys_ask_quoted_then_internal():
    assert local_part_keys('"al 1+x"', delimiter="+", form=EXTERNAL_FIRST) == ['"al 1+x"', "al 1+x", '"al 1"',
                                                                                "al 1"]
    assert local_part_keys('"al.1.+x"', delimiter="+", form=EXTERNAL_FIRST) == ["al.1.+x", '"al.1."', "al.1."]
    assert local_part_keys("joe+x", delimiter="+", form=EXTERNAL_FIRST) == ["joe+x", "joe"]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_a_pattern_file_names_every_line_it_refuses_not_only_the_first(tmp_path, kind):
    """A migrated file is fixed in one pass: each bad line named (Postfix warns about each line it skips), a bad
    `if` still opening its block (its endif is no error), each `if` left open named as postmap names them."""
    f = write(tmp_path / "t", "/(a)/ $2\n/ok/ fine\nif /(/\n/b/ c\nendif\n/x/q y\nif /a/\nif /b/\n")
    with pytest.raises(LookupRetry) as e:
        open_table(f"{kind}:{f}").lookup("a")
    lines = re.findall(r"line (\d+): ", str(e.value))
    assert lines == ["1", "3", "6", "7", "8"], str(e.value)


@pytest.mark.parametrize("pattern, named", [
    (r"/\Ga/", r"RE2 has no \G"), (r"/a\Kb/", r"RE2 has no \K"), (r"/a\R/", r"RE2 has no \R"),
    (r"/^.{1001,}/", "RE2 has no repetition count over 1000 ({1001,})"), (r"/(?|(a)|(b))/", "RE2 has no branch reset"),
    (r"/(*UTF)a/", "RE2 has no (*VERB)"), (r"/a(?#b/", "a (?# comment without its closing )"),
    (r"/(a(?x) b)/", "RE2 has no inline (?x) but one outside any group"), (r"/(?x: a)/", "RE2 has no inline (?x)"),
    (r"/(?i)(?-x)a/", "RE2 has no inline (?x)"), (r"/\o{400}/", r"a character code over 0xff in \o{400}"),
    (r"/^a{2,}+b/", "a possessive quantifier is not supported"),
])
def test_pcre_syntax_re2_has_no_equivalent_of_is_named(tmp_path, pattern, named):
    with pytest.raises(LookupRetry, match=re.escape(f"line 1: {named}")):
        pcre_table(tmp_path, f"{pattern} x\n").lookup("a")


def test_pcre_caseless_folds_no_byte_above_0x7f_as_postfix_s_pcre(tmp_path, prefilter):
    """Postfix 3.7's PCRE (no UTF mode) folds ASCII letters only; so does RE2's Latin-1 mode here: a caseless
    pattern's UTF-8 lead byte (П: D0 9F) never matches another lead byte (😀: F0 9F …), À never matches à."""
    t = pcre_table(tmp_path, "/П/ cyrillic\n/^À$/ a-grave\n")
    assert [t.lookup(key) for key in ("😀", "xПx", "à", "À")] == [None, "cyrillic", None, "a-grave"]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_the_import_s_scan_reads_a_rule_s_negations_as_the_table_does(kind):
    """`config import` reports a pattern file's routes to relay from table_file_entries: it read one `!` only, so
    `!!/b/ FILTER relay:x` and `! ! /^a@/ relay:[mx]` went unreported (one scanner now, the tables')."""
    text = "!!/b/ FILTER relay:x\n! ! /^a@/  relay:[mx]\nif !!/c/\n/d/ e\nendif\n"
    assert table_file_entries(kind, text) == [(1, "!!/b/", "FILTER relay:x"), (2, "! ! /^a@/", "relay:[mx]"),
                                              (4, "/d/", "e")]


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_if_and_endif_are_told_as_postfix_tells_them_by_the_tables_and_the_import_s_scan(kind):
    """One test of both (files.pattern_keyword): the table read `ıf` as `if` (Python's case folding, where
    Postfix's strncasecmp is ASCII) and `endif junk` as a bad rule (its block left open: two errors), where
    Postfix takes an ENDIF there and warns about the rest."""
    from mailflow.tables.pcre import parse_pcre
    from mailflow.tables.regexp import RuleErrors, parse_regexp

    parse = parse_regexp if kind == "regexp" else parse_pcre
    with pytest.raises(RuleErrors) as e:
        parse("if /a/\n/b/ x\nENDIF junk\n\u0131f /c/ y\n")
    assert e.value.lines == ["line 3: text after endif",
                             "line 4: expected /pattern/ (optionally !/pattern/ or if /pattern/)"]
    parse("IF/a/\n/b/ x\nEndif\n")  # (the word in any case, a delimiter right after it)
    text = "IF/a/\n/b/ x\nENDIF junk\n/c/ y\n"
    assert table_file_entries(kind, text) == [(2, "/b/", "x"), (4, "/c/", "y")]


def test_pcre_hex_escape_in_braces_is_no_repetition_count(tmp_path):
    """`\\x{1001}` is a code point (too big without UTF mode: RE2's Latin-1 refuses it as PCRE does), not a count."""
    assert pcre_table(tmp_path, "/^\\x{41}\\x{3e}$/ hex\n").lookup("A>") == "hex"
    with pytest.raises(LookupRetry) as e:
        pcre_table(tmp_path, "/\\x{1001}/ x\n").lookup("a")
    assert "repetition" not in str(e.value)


@pytest.mark.parametrize("kind", ["regexp", "pcre"])
def test_the_dollar_forms_an_earlier_release_took_are_each_named_with_how_to_write_a_dollar(tmp_path, kind):
    """`US$ 5`, `x$`, `$x`, `$1st`, `$0` loaded before and fail the table now (Postfix skips each such line with a
    warning; mailflow fails closed): an upgrade must see each line, and how to write a literal `$`, before the
    restart: `check-config` and `table query` name every one."""
    f = write(tmp_path / "t", "/^a/ REJECT price in US$ 5\n/^b/ REJECT x$\n/(c)/ REJECT $x\n/(d)/ REJECT $1st\n"
                              "/(e)/ REJECT $0\n/^f/ REJECT costs $$5\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[checks]\nheader_checks = ["{kind}:{f}"]\n')
    for result in (mailflow("check-config", "--config", str(cfg)), mailflow("table", "query", f"{kind}:{f}", "f")):
        assert result.returncode != 0, result.stdout
        named = re.findall(r"line (\d+): [^;]*; write \$\$ for a literal \$", result.stderr)
        assert named == ["1", "2", "3", "4", "5"], result.stderr
    assert pcre_table(tmp_path, "/^f/ REJECT costs $$5\n").lookup("f") == "REJECT costs $5"
