"""smtp_parameters.checked_path: the one reading of MAIL's and RCPT's path for smtpd and `sendmail -bs`, and which
refusals Postfix's smtpd warns of (`Illegal address syntax`, quoting the path's first word)."""
from __future__ import annotations

import itertools

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
