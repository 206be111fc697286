"""mailflow.aliases: aliases(5), .forward and :include: syntax; errors name file and line; round trip."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.aliases import (
    AddressTarget,
    AliasSyntaxError,
    alias_values,
    CommandTarget,
    FileTarget,
    IncludeTarget,
    MailboxTarget,
    format_aliases,
    is_privileged,
    parse_aliases,
    parse_aliases_with_warnings,
    parse_forward,
    parse_include,
    parse_value,
)
from mailflow.errors import ConfigError

F = "/etc/mailflow/aliases"

# ---------------------------------------------------------------------------------------------- full syntax


def test_full_syntax():
    text = (
        "# system aliases\n"
        "\n"
        "MAILER-DAEMON: postmaster\n"
        "PostMaster:\troot\n"
        "staff: alice,\n"
        "   bob@Example.COM,\n"
        "   # a comment inside a continued entry\n"
        "\n"
        "   <carol@example.org>\n"
        'tool: "|/usr/bin/foo -x, y", |/usr/local/bin/bar\n'
        "archive: /var/mail/archive, \"/var/mail/with space\"\n"
        "list: :include:/etc/mail/list, :INCLUDE: /etc/mail/other\n"
        '"Quoted Name": \\root\n'
        '"a@b": "\\\\me"\n'
        'trailing: x,\n'
        'shell: "|sh -c \\"echo hi\\""\n'
    )
    assert parse_aliases(text, F) == {
        "mailer-daemon": (AddressTarget("postmaster"),),
        "postmaster": (AddressTarget("root"),),
        "staff": (AddressTarget("alice"), AddressTarget("bob@Example.COM"), AddressTarget("carol@example.org")),
        "tool": (CommandTarget("/usr/bin/foo -x, y"), CommandTarget("/usr/local/bin/bar")),
        "archive": (FileTarget("/var/mail/archive"), FileTarget("/var/mail/with space")),
        "list": (IncludeTarget("/etc/mail/list"), IncludeTarget("/etc/mail/other")),
        "quoted name": (AddressTarget("root"),),
        "a@b": (MailboxTarget("me"),),  # (in quotes a backslash is left: the mailbox form, as Postfix reads it)
        "trailing": (AddressTarget("x"),),
        "shell": (CommandTarget('sh -c "echo hi"'),),
    }


def test_unquoted_command_keeps_its_spaces_and_inner_quotes():
    assert parse_aliases('v: |/usr/bin/vacation js, |"/opt/my tool"\n', F) == {
        "v": (CommandTarget("/usr/bin/vacation js"), CommandTarget('"/opt/my tool"')),
    }


def test_quoted_local_part_address_is_kept_verbatim():
    assert parse_aliases('x: "john, doe"@example.com, <"a b"@example.com>\n', F) == {
        "x": (AddressTarget('"john, doe"@example.com'), AddressTarget('"a b"@example.com')),
    }


def test_crlf_line_ends_are_accepted():
    assert parse_aliases("a: b,\r\n  c\r\n", F) == {"a": (AddressTarget("b"), AddressTarget("c"))}


def test_empty_file_is_an_empty_map():
    assert parse_aliases("", F) == {}
    assert parse_aliases("# nothing\n\n   \n", F) == {}


def test_duplicate_name_first_wins_with_a_warning():
    aliases, warnings = parse_aliases_with_warnings("root: a\nother: x\nROOT: b\n", F)
    assert aliases == {"root": (AddressTarget("a"),), "other": (AddressTarget("x"),)}
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{F}: line 3: duplicate entry 'root'")
    assert "line 1" in warnings[0]


def test_no_warnings_without_duplicates():
    assert parse_aliases_with_warnings("a: b\nc: d\n", F)[1] == []


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, line, reason", [
    ("ok: a\njust words here\n", 2, "missing ':'"),
    ("ok: a\n: b\n", 2, "empty name"),
    ('ok: a\n"": b\n', 2, "empty name"),
    ("ok: a\n\nempty:\n", 3, "no values"),
    ("ok: a\nempty: , ,\n", 2, "no values"),
    ('"name: b\n', 1, "unterminated quote"),
    ("ok: a\ni: :include:etc/list\n", 2, ":include: needs an absolute path"),
    ("ok: a\ni: b,\n  :include:\n", 3, ":include: needs an absolute path"),
    ("ok: a\nc: |\n", 2, "empty command"),
    ("ok: a\nb: x\x01y\n", 2, "control character 0x01"),
    ("ok: a\n# comment \x1b[31m\n", 2, "control character 0x1b"),
    ("ok: a\nb: x\ry\n", 2, "control character 0x0d"),
    ("  indented: first\n", 1, "continuation line"),
    ("ok: a\nfoo bar: x\n", 2, "must be quoted"),
    ("ok: a\nb: a@b>x\n", 2, "bad address"),  # (`two words` is two addresses, as Postfix's local reads it)
    ("ok: a\nb: <>\n", 2, "bad address"),
    ("ok: a\nf: ./mbox\n", 2, "bad address"),
    ("ok: a\nb: \\\n", 2, "empty address"),
    ('ok: a\n"q" x: b\n', 2, "missing ':'"),
])
def test_syntax_errors_name_file_and_line(text, line, reason):
    with pytest.raises(AliasSyntaxError) as caught:
        parse_aliases(text, F)
    message = str(caught.value)
    assert message.startswith(f"{F}: line {line}: ")
    assert reason in message
    assert caught.value.line == line
    assert isinstance(caught.value, ConfigError)


# ---------------------------------------------------------------------------------------------- .forward and :include:


def test_forward_with_backslash_user_and_vacation():
    text = '# keep a copy\n\\js, "|/usr/bin/vacation js"\n\nother@example.org\n/home/js/mbox , :include:/home/js/list\n'
    assert parse_forward(text, "/home/js/.forward") == (
        AddressTarget("js"),
        CommandTarget("/usr/bin/vacation js"),
        AddressTarget("other@example.org"),
        FileTarget("/home/js/mbox"),
        IncludeTarget("/home/js/list"),
    )


def test_a_backslash_before_a_name_is_dropped_as_local8_reads_it():
    """Postfix's tokenizer drops the backslash (tok822_parse): `\\js` is the address js, quoted or not, with a
    domain too."""
    assert parse_forward('"\\js"\n\\js\n\\me@example.com\n', "f") == (
        AddressTarget("js"), AddressTarget("js"), AddressTarget("me@example.com"))


def test_two_backslashes_before_a_name_are_the_mailbox_form():
    """Postfix's tokenizer keeps one backslash of two, and recipient.c's `\\user` branch then gives the mailbox:
    `\\\\js` is MailboxTarget, and so is `"\\\\js"` (in quotes each backslash escapes the next character, so one
    is left; Postfix 3.7.11: WRITTEN case "a quoted backslashed user"); it writes back as itself."""
    assert parse_forward('\\\\js\n"\\\\js+x"\n"\\js"\n', "f") == (
        MailboxTarget("js"), MailboxTarget("js+x"), AddressTarget("js"))
    assert parse_aliases(format_aliases({"a": (MailboxTarget("js"),)}), "f") == {"a": (MailboxTarget("js"),)}


def test_two_backslashes_left_once_read_are_the_mailbox_of_a_backslashed_name():
    """`"\\\\\\\\js"` in quotes and `\\\\\\\\js` bare read as `\\\\js` (each backslash escapes the next); recipient.c's
    mailbox branch takes one, leaving the name `\\js`, no address: it was a bad value (the whole alias deferred
    4.3.5), where Postfix 3.7.11 bounces that member `unknown user: "\\js"` (WRITTEN cases "two backslashes left")
    and delivers the rest. A bare `\\\\\\js` (three) reads as `\\js`, js's mailbox; it writes back as itself."""
    assert parse_forward('"\\\\\\\\js"\n\\\\\\\\js\n\\\\\\js\n', "f") == (
        MailboxTarget("\\js"), MailboxTarget("\\js"), MailboxTarget("js"))
    assert parse_aliases(format_aliases({"a": (MailboxTarget("\\js"),)}), "f") == {"a": (MailboxTarget("\\js"),)}


@pytest.mark.parametrize("name", ["\\x y, z@evil.test", '\\x"y', "\\a (c)", "a#b", "js+x", "\\js"])
def test_a_mailbox_form_name_that_is_not_a_plain_atom_writes_back_quoted_as_itself(name):
    """`MailboxTarget('\\x y, z@evil.test')` (read from `"\\\\\\\\x y, z@evil.test"`, one quoted token as local(8)
    reads it) was written bare and read back as two members, `\\x y`'s mailbox and the address z@evil.test."""
    aliases = {"a": (MailboxTarget(name),)}
    assert parse_aliases(format_aliases(aliases), "f") == aliases


def test_a_backslashed_name_with_a_comment_is_the_name():
    """`\\nobody (copy)`: the backslash dropped, the comment too, as local(8) reads it (Postfix 3.7.11 delivers
    to nobody)."""
    assert parse_forward("\\nobody (copy)\n", "f") == (AddressTarget("nobody"),)


def test_forward_lines_do_not_continue_each_other():
    assert parse_forward("a\n  b\n", "f") == (AddressTarget("a"), AddressTarget("b"))


def test_empty_forward_is_empty():
    assert parse_forward("# only a comment\n\n", "f") == ()


def test_forward_errors_name_file_and_line():
    with pytest.raises(AliasSyntaxError, match=r"^/home/js/\.forward: line 2: bad address"):
        parse_forward("js@example.org\n./mbox\n", "/home/js/.forward")


def test_only_a_value_starting_with_a_slash_is_a_file_as_in_postfixs_local():
    """Postfix's local (alias.c / token.c): `/` starts a file, `|` a command, `:include:` an include; anything else,
    `files/rel` or `~/mbox`, is an address (differential seeds 21, 24, 30, 33: `a3: nobody+x, files/rel`)."""
    assert parse_value("nobody+x, files/rel, ~/mbox", F) == (
        AddressTarget("nobody+x"), AddressTarget("files/rel"), AddressTarget("~/mbox"))
    assert parse_forward("mail/inbox\n", "f") == (AddressTarget("mail/inbox"),)


def test_alias_values_checks_the_structure_and_leaves_the_values_unread():
    """A table's view: a value mailflow cannot take is found when its alias is expanded, not at load."""
    assert alias_values("a0: alice\na3: bob, ./mbox,\n  :include:rel\nA0: dup\n", F) == {
        "a0": "alice", "a3": "bob, ./mbox,  :include:rel"}
    with pytest.raises(AliasSyntaxError, match="no values"):
        alias_values("a0: alice\nempty: , ,\n", F)


def test_a_quote_never_closed_in_a_value_is_closed_at_its_end_as_postfixs_local_closes_it():
    """tok822_scan closes it: `"|/bin/x` is a command, `"joe@x.test` an address, commas after the quote are in
    it; an aliases file failed to parse, a .forward or an alias table value deferred the mail 4.3.5."""
    assert parse_aliases('ok: a\ncmd: "|/bin/x,\n   y\nlast: b,\n   "|/bin/z\n', "f") == {
        "ok": (AddressTarget("a"),), "cmd": (CommandTarget("/bin/x,   y"),),
        "last": (AddressTarget("b"), CommandTarget("/bin/z"))}
    assert parse_forward('"|/bin/x\nbob, "joe@x.test\n', "/home/js/.forward") == (
        CommandTarget("/bin/x"), AddressTarget("bob"), AddressTarget("joe@x.test"))
    assert parse_value('"/var/mail/x', "table") == (FileTarget("/var/mail/x"),)


def test_include_file_has_forward_syntax():
    assert parse_include("alice, bob@example.com\n# x\ncarol\n", "/etc/mail/list") == (
        AddressTarget("alice"), AddressTarget("bob@example.com"), AddressTarget("carol"),
    )


def test_is_privileged():
    assert is_privileged(CommandTarget("/bin/true"))
    assert is_privileged(FileTarget("/dev/null"))
    assert is_privileged(IncludeTarget("/etc/list"))
    assert not is_privileged(AddressTarget("a@example.com"))


def test_angle_brackets_never_make_a_privileged_target():
    [target] = parse_forward("<|evil@example.com>\n", "f")
    assert target == AddressTarget("|evil@example.com")
    assert not is_privileged(target)


# ---------------------------------------------------------------------------------------------- round trip

_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éß日\t"),
    min_size=1,
    max_size=20,
)
_NAMES = _TEXT.map(str.casefold).filter(lambda s: s.strip() != "" and s == s.casefold())  # (names are folded)
_STRIPPED = _TEXT.filter(lambda s: s == s.strip() and s != "")
_LOCAL = st.from_regex(r"[A-Za-z0-9_+=-]{1,8}(\.[A-Za-z0-9_+=-]{1,8}){0,2}", fullmatch=True) | st.from_regex(
    r'"[a-z ,<>#:@]{1,8}"', fullmatch=True)
_DOMAIN = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z]{2,5}){1,2}", fullmatch=True)
_ADDRESS = st.one_of(_LOCAL, st.builds(lambda lp, d: f"{lp}@{d}", _LOCAL, _DOMAIN))
_PATH = _STRIPPED.map(lambda s: "/" + s)
_TARGETS = st.one_of(
    _ADDRESS.map(AddressTarget),
    _STRIPPED.map(CommandTarget),
    _PATH.map(FileTarget),
    _PATH.map(IncludeTarget),
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_NAMES, st.lists(_TARGETS, min_size=1, max_size=4).map(tuple), max_size=6))
def test_parse_of_format_is_identity(aliases):
    text = format_aliases(aliases)
    assert parse_aliases_with_warnings(text, F) == (aliases, [])


def test_an_item_that_is_not_one_address_is_read_as_postfixs_local_reads_it():
    # Postfix's local parses every alias value with tok822 (tests/interop/test_alias_values_vs_postfix.py)
    assert parse_value('Joe <joe@x.test>, "Smith, J" <js@x.test>, ann@x.test (Ann), grp: g1, g2;, s1 s2', F) == (
        AddressTarget("joe@x.test"), AddressTarget("js@x.test"), AddressTarget("ann@x.test"), AddressTarget("g1"),
        AddressTarget("g2"), AddressTarget("s1"), AddressTarget("s2"))
    assert parse_value('"|/bin/cmd arg", /var/mail/x y', F) == (CommandTarget("/bin/cmd arg"),
                                                                FileTarget("/var/mail/x y"))  # (Postfix: x and y)


def test_an_address_literal_never_closed_is_closed_at_the_end_as_postfixs_local_closes_it():
    """Postfix's local reads a value with its tokenizer, which closes `[` at the end: bob@[192.0.2.1] (it was a
    syntax error here, and sendmail's copy bounced 5.1.3)."""
    assert parse_forward("bob@[192.0.2.1\n", "f") == (AddressTarget("bob@[192.0.2.1]"),)
    assert parse_aliases("team: alice, bob@[192.0.2.1\n", "aliases")["team"] == (
        AddressTarget("alice"), AddressTarget("bob@[192.0.2.1]"))


def test_a_line_starting_with_a_unicode_blank_is_an_entry_as_postalias_reads_it():
    """Postfix's readllines continues an entry only at an ASCII blank: a line starting with U+00A0 is an entry whose
    name (an atom to Postfix's tokenizer) holds it; it was read as a continuation of the entry above."""
    assert alias_values("a: x\n\u00a0b: y\n", F) == {"a": "x", "\u00a0b": "y"}
