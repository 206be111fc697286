"""smtp_parameters.checked_path: the one reading of MAIL's and RCPT's path for smtpd and `sendmail -bs`, and which
refusals Postfix's smtpd warns of (`Illegal address syntax`, quoting the path's first word)."""
from __future__ import annotations

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
