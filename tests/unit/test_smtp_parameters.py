"""smtp_parameters.checked_path: the one reading of MAIL's and RCPT's path for smtpd and `sendmail -bs`, and which
refusals Postfix's smtpd warns of (`Illegal address syntax`, quoting the path's first word)."""
from __future__ import annotations

import itertools
import time

import pytest

from mailflow import status
from mailflow.smtp_parameters import PathRefusal, checked_path

BAD = status.RECIPIENT_SYNTAX


@pytest.mark.parametrize("text, command, strict, expected", [
    ("<a@b.test> NOTIFY=NEVER", "RCPT", False, ("a@b.test", "a@b.test", "NOTIFY=NEVER")),
    ("a@b.test", "MAIL", False, ("a@b.test", "a@b.test", "")),
    ("<>", "MAIL", False, ("", "", "")),
    ("<a@b.test NOTIFY=NEVER", "RCPT", False, PathRefusal(BAD)),  # unterminated: no warning
    ('"a@b.test', "RCPT", False, PathRefusal(BAD)),
    ("<a b> NOTIFY=NEVER", "RCPT", False, PathRefusal(BAD, "<a b>")),
    ("<>", "RCPT", False, PathRefusal(BAD, "<>")),
    ("a@b.test", "MAIL", True, PathRefusal(BAD, "a@b.test")),
    # RFC 822 forms Postfix's extract_addr takes (strict_rfc821_envelopes = no): the one address, as written too
    ("<a@b.test>(c) NOTIFY=NEVER", "RCPT", False, ("a@b.test", "a@b.test", "NOTIFY=NEVER")),
    ('"Joe"<a@b.test>', "RCPT", False, ("a@b.test", "a@b.test", "")),
    ("<Joe <a@b.test>> NOTIFY=NEVER", "RCPT", False, ("a@b.test", "a@b.test", "NOTIFY=NEVER")),
    ("<a(x)@b(y).test (z)>", "RCPT", False, ("a@b.test", "a@b.test", "")),
    ("< >", "MAIL", False, ("", "", "")),
    ("<(c)>", "MAIL", False, ("", "", "")),
    ("< a@b.test> SIZE=1", "MAIL", False, ("a@b.test", "a@b.test", "SIZE=1")),
    ("<a@b.test\t> SIZE=1", "MAIL", False, ("a@b.test", "a@b.test", "SIZE=1")),  # (not `a@b.test\t`)
    ("<a @b.test>", "MAIL", False, PathRefusal(BAD, "<a @b.test>")),  # (a blank inside the address: refused)
    # a vertical tab or form feed is an atom's to Postfix's tokenizer, not a blank it skips: part of the address
    ("<\va@b.test>", "MAIL", False, PathRefusal(BAD, "<\va@b.test>")),
    ("<\f>", "MAIL", False, PathRefusal(BAD, "<\f>")),
    ("<a@b.test\v>", "RCPT", False, ("a@b.test\v", "a@b.test\v", "")),  # (its domain is the handler's to refuse)
    ("AUTH=<>", "MAIL", False, ("", "", "")),  # (the phrase `AUTH=`)
    ('<"a(b)"@c.test>(d)', "RCPT", False, ('"a(b)"@c.test', '"a(b)"@c.test', "")),  # (no comment in quotes)
    # the address judged is the address, never the comment or the phrase beside it
    ("<alice@local.test (x@evil.test)>", "RCPT", False, ("alice@local.test", "alice@local.test", "")),
    ('<"alice@local.test" <x@evil.test>>', "RCPT", False, ("x@evil.test", "x@evil.test", "")),
    ("<x@evil.test>(<alice@local.test>)", "RCPT", False, ("x@evil.test", "x@evil.test", "")),
    # a comment separates words (Postfix: two addresses, 501): never dropped so as to join two into one
    ("<ali(c)ce@local.test>", "RCPT", False, PathRefusal(BAD, "<ali(c)ce@local.test>")),
    ("<a@b(c)test>", "MAIL", False, PathRefusal(BAD, "<a@b(c)test>")),
    ("<x@evil.te(c)st>", "RCPT", False, PathRefusal(BAD, "<x@evil.te(c)st>")),
    ("a(b)(c)d@x.test", "RCPT", False, PathRefusal(BAD, "a(b)(c)d@x.test")),
    ('<"a"(c)b@x.test>', "RCPT", False, PathRefusal(BAD, '<"a"(c)b@x.test>')),
    (r"<a(c)\b@x.test>", "RCPT", False, PathRefusal(BAD, r"<a(c)\b@x.test>")),
    ("<x@[1.2.3.4](c)y>", "RCPT", False, PathRefusal(BAD, "<x@[1.2.3.4](c)y>")),
    ("<a(c).b(d)@(e)x.test(f)>", "RCPT", False, ("a.b@x.test", "a.b@x.test", "")),  # (beside an operator: taken)
    # a comment between two words of a phrase separates them, as a blank does: taken (the address is the one judged)
    ("Jo(c)e<a@b.test>", "MAIL", False, ("a@b.test", "a@b.test", "")),
    ('"Joe"(c)"Smith"<a@b.test>', "MAIL", False, ("a@b.test", "a@b.test", "")),
    ("<Jo(c)e <a@b.test>> SIZE=1", "MAIL", False, ("a@b.test", "a@b.test", "SIZE=1")),
    ('"J"(c)oe<a@b.test>', "MAIL", False, ("a@b.test", "a@b.test", "")),
    ("Al(c)ice<x@evil.test>", "RCPT", False, ("x@evil.test", "x@evil.test", "")),
    ("Jo(c)e<a(c)b@b.test>", "RCPT", False, PathRefusal(BAD, "Jo(c)e<a(c)b@b.test>")),
    ("Jo(c)e<a@b.test>", "MAIL", True, PathRefusal(BAD, "Jo(c)e<a@b.test>")),
    # refused as before: a group, several addresses, text after the brackets, a comment never closed, strictness
    ("<g: a@b.test;>", "RCPT", False, PathRefusal(BAD, "<g: a@b.test;>")),
    ("<a@b.test, c@d.test>", "RCPT", False, PathRefusal(BAD, "<a@b.test, c@d.test>")),
    ("<a@b.test>;", "RCPT", False, PathRefusal(BAD, "<a@b.test>;")),
    ("<a@b.test>>", "RCPT", False, PathRefusal(BAD, "<a@b.test>>")),
    ("<a@b.test>(c", "RCPT", False, PathRefusal(BAD, "<a@b.test>(c")),
    ("<@r.test:Joe <a@b.test>>", "RCPT", False, PathRefusal(BAD, "<@r.test:Joe <a@b.test>>")),
    ("<a@b.test>(c)", "RCPT", True, PathRefusal(BAD, "<a@b.test>(c)")),
    ("<a@b.test (c)>", "RCPT", True, PathRefusal(BAD, "<a@b.test (c)>")),
    ("<a(c)@b.test>", "RCPT", True, PathRefusal(BAD, "<a(c)@b.test>")),
    ("<Joe <a@b.test>>", "RCPT", True, PathRefusal(BAD, "<Joe <a@b.test>>")),
    # strict, Postfix still takes blanks at either end inside the brackets (its tokenizer skips them)
    ("< >", "MAIL", True, ("", "", "")),
    ("<a@b.test > SIZE=1", "MAIL", True, ("a@b.test", "a@b.test", "SIZE=1")),
    ("<\ta@b.test\t>", "RCPT", True, ("a@b.test", "a@b.test", "")),
    ('"Joe"<a@b.test>', "RCPT", True, PathRefusal(BAD, '"Joe"<a@b.test>')),
    # blanks at the ends around a nested path, skipped as Postfix's tokenizer skips them, strict or not
    ("< <a@b.test> > SIZE=1", "MAIL", True, ("a@b.test", "a@b.test", "SIZE=1")),
    ("<< a@b.test> >", "RCPT", True, ("a@b.test", "a@b.test", "")),
    ("<\t<a@b.test>>", "RCPT", False, ("a@b.test", "a@b.test", "")),
    ("<Joe <a@b.test> >", "MAIL", False, ("a@b.test", "a@b.test", "")),
    ('<"Joe" <a@b.test> >', "MAIL", True, PathRefusal(BAD, '<"Joe" <a@b.test> >')),
    ("<<a@b.test>(c)>", "RCPT", False, ("a@b.test", "a@b.test", "")),
    ("<<a@b.test>(c)>", "RCPT", True, PathRefusal(BAD, "<<a@b.test>(c)>")),
    ("<<a@b.test> x>", "RCPT", False, PathRefusal(BAD, "<<a@b.test> x>")),
    ("<a@b.test> > SIZE=1", "MAIL", False, ("a@b.test", "a@b.test", "> SIZE=1")),  # (one pair, then a word `>`)
    # two pairs at most (depth 3 refused), the outer one stripped only where the word ends in it (not before a comment)
    *[(form, "MAIL", strict, PathRefusal(BAD, form)) for strict in (False, True) for form in [
        "<<<a@b.test> > >", "<< <a@b.test>> >", "<<<a@b.test>>>", "<<a@b.test>>(c)", "< <a@b.test> >(c)",
        "<<<> > >", "<<>>(c)"]],
    # strict, a source route after a blank is refused, as strict Postfix refuses it (it cuts a route only first)
    ("< @r.test:a@b.test>", "MAIL", True, PathRefusal(BAD, "< @r.test:a@b.test>")),
    ("<\t@local.test:x@evil.test>", "RCPT", True, PathRefusal(BAD, "<\t@local.test:x@evil.test>")),
    ("<@r.test:a@b.test >", "MAIL", True, ("a@b.test", "@r.test:a@b.test", "")),
    # ... and so is one inside a nested pair, blanks or not (the route is not right after the first `<`)
    ("< <@r.test:a@b.test>>", "MAIL", True, PathRefusal(BAD, "< <@r.test:a@b.test>>")),
    ("<\t<@r.test:a@b.test> >", "MAIL", True, PathRefusal(BAD, "<\t<@r.test:a@b.test> >")),
    ("<<@local.test:x@evil.test>>", "RCPT", True, PathRefusal(BAD, "<<@local.test:x@evil.test>>")),
    ("< <@r.test:a@b.test>>", "MAIL", False, ("a@b.test", "@r.test:a@b.test", "")),
    # strict, a parenthesis inside a quoted string is no comment: a valid path
    ('<"a(b)"@b.test>', "MAIL", True, ('"a(b)"@b.test', '"a(b)"@b.test', "")),
    ('<"(x)"@b.test> SIZE=10', "MAIL", True, ('"(x)"@b.test', '"(x)"@b.test', "SIZE=10")),
    ('<"a)"@b.test>', "RCPT", True, ('"a)"@b.test', '"a)"@b.test', "")),
    ('<"a"(c)@b.test>', "RCPT", True, PathRefusal(BAD, '<"a"(c)@b.test>')),
])
def test_a_path_is_read_or_refused_and_warned_of_as_postfix(text, command, strict, expected):
    assert checked_path(text, command, BAD, strict) == expected


def test_the_closed_path_shortcut_answers_as_the_character_scan_on_every_short_word():
    """`unterminated_command_word` answers the common `<addr> PARAMS` form with one regexp match instead of the
    character scan (2.5 us a path on the bench's path): every string of up to five of these characters gets the
    scan's answer (a shortcut that called an open word closed would let Postfix's tokenizer refusal through)."""
    from mailflow.syntax import _command_word, unterminated_command_word
    for length in range(6):
        for chars in itertools.product('<>"\\ \ta\n', repeat=length):
            text = "".join(chars)
            assert unterminated_command_word(text) == _command_word(text, 0)[2], repr(text)


HOSTILE_WORDS = [  # each about 10 000 octets, none a path: every one must be refused in linear time
    "a" * 10_000 + "@<x@y.test>",  # a long atom before `<`, not a phrase (the `@`)
    '"J"' * 3_000 + "a" * 1_000 + ";<x@y.test>",  # many quoted strings, then atoms, then no phrase
    "<" + "a." * 5_000 + "@<x@y.test>>",  # a phrase of dotted atoms in the brackets, spoiled at its end
    "(" * 5_000 + ")" * 5_000 + "a" * 100 + "@<x@y.test>",  # nested parentheses, then no phrase
    "\\" * 10_000 + "<x@y.test>",  # backslashes
    '"' + "\\a" * 5_000 + '"' + "a" * 100 + "@<x@y.test>",  # quoted pairs in a quoted string
    "(" + "a" * 10_000 + ")" + "b" * 100 + "@<x@y.test>",  # a long comment
    "Jo(c)e" * 1_700 + "@<x@y.test>",  # comments between phrase words (blanks to the phrase), then no phrase
    '"J"(c)' * 1_700 + ";<x@y.test>",  # quoted phrase words and comments, then no phrase
    "<J(c)o <" + "a(c)" * 2_500 + "b@y.test>>",  # a phrase, then an address of words a comment separates
    "< " * 2_500 + "a@y.test" + " >" * 2_499,  # blanks between nested brackets, one '>' short
]


@pytest.mark.timeout(10)  # (the broken check took hours: a failure, not a hang)
def test_hostile_path_words_are_refused_in_linear_time():
    """A phrase check that backtracks (`(atom+)*`) took seconds for 27 octets and hours for 40: one MAIL line froze
    every session of the server (one event loop). 110 000 octets of hostile words are read in well under a second
    (a few milliseconds each where the check is linear)."""
    started = time.perf_counter()
    for word in HOSTILE_WORDS:
        assert isinstance(checked_path(word, "MAIL", BAD, False), PathRefusal)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("text, reads", [
    ("<a@b.test> NOTIFY=NEVER", 0), ('"Joe"<a@b.test>', 1), ("<a@b.test>(c) SIZE=1", 1),
    ('"Joe"<a@b.test> ENVID=(x)', 1),  # (a parenthesis after the word: parsed, refused, then undressed)
])
def test_the_path_word_is_read_once_at_most(monkeypatch, text, reads):
    """The usual path (no parenthesis) costs one look for one, no word reading; any other, one reading."""
    from mailflow import smtp_parameters, syntax
    calls: list[str] = []
    monkeypatch.setattr(smtp_parameters, "next_command_word", lambda t: calls.append(t) or syntax.next_command_word(t))
    assert not isinstance(checked_path(text, "RCPT", BAD, False), PathRefusal)
    assert len(calls) == reads
