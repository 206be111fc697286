"""sendmail's recipient arguments: an address list past the tokenizer's limit is a usage error, never a list
silently cut short; so is an address whose quoted string is never closed."""
from __future__ import annotations

import pytest

from mailflow.sendmail.options import UsageError
from mailflow.sendmail.reading import argument_recipients, argument_sender, clean_recipient


def test_a_long_recipient_list_is_taken_whole_or_refused():
    assert len(argument_recipients(", ".join(f"u{i}@x.test" for i in range(100)), "origin.test")) == 100
    with pytest.raises(UsageError):
        argument_recipients(", ".join(f"u{i}@x.test" for i in range(5000)), "origin.test")


@pytest.mark.parametrize("value", ['"joe@x.test', 'a"b@x.test', '"a""b@x.test'])
def test_a_quoted_string_never_closed_is_bad_address_syntax(value):
    """It was stored as it is (`"joe@x.test` routed to x.test with that local part, its orig_to `joe@x` cut
    short); -t's header addresses go through clean_recipient too."""
    with pytest.raises(UsageError, match="a quoted string is not closed"):
        argument_recipients(value, "origin.test")
    with pytest.raises(UsageError, match="a quoted string is not closed"):
        clean_recipient(value, "origin.test")


@pytest.mark.parametrize("value, address", [('"joe smith"@x.test', '"joe smith"@x.test'), ('""@x.test', '""@x.test'),
                                            ('"a\\"b"@x.test', '"a\\"b"@x.test')])
def test_closed_quoted_strings_are_taken(value, address):
    assert argument_recipients(value, "origin.test") == [address]


def test_a_sender_with_a_quoted_string_never_closed_is_taken_as_postfix_takes_it():
    assert argument_sender('"', "origin.test", print) == '"@origin.test'
