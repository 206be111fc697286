"""sendmail's recipient arguments: an address list past the tokenizer's limit is a usage error, never a list
silently cut short; an address whose quoted string or literal is never closed is closed, as Postfix's tokenizer
closes it."""
from __future__ import annotations

import pytest

from mailflow.sendmail.options import UsageError
from mailflow.sendmail.reading import argument_recipients, argument_sender, clean_recipient


def test_a_long_recipient_list_is_taken_whole_or_refused():
    assert len(argument_recipients(", ".join(f"u{i}@x.test" for i in range(100)), "origin.test")) == 100
    with pytest.raises(UsageError):
        argument_recipients(", ".join(f"u{i}@x.test" for i in range(5000)), "origin.test")


@pytest.mark.parametrize("value, address", [('"joe@x.test', "joe@x.test"), ('"joe smith@x.test', '"joe smith"@x.test'),
                                            ('"jo\\"e@x.test', '"jo\\"e"@x.test'), ('"joe', "joe@origin.test"),
                                            ("bob@[192.0.2.1", "bob@[192.0.2.1]")])
def test_a_quoted_string_or_literal_never_closed_is_closed_at_the_end_as_postfix_closes_it(value, address):
    """Postfix 3.7's sendmail queued `"joe@x.test` as joe@x.test, `"joe smith@x.test` as "joe smith"@x.test and
    `bob@[192.0.2.1` as bob@[192.0.2.1] (exit 0): its tokenizer closes them at the end. A refusal (exit 64) lost
    every recipient of the submission; -t's header addresses and -f go through clean_address too."""
    assert argument_recipients(value, "origin.test") == [address]
    assert clean_recipient(value, "origin.test") == address
    assert argument_sender(value, "origin.test", print) == address


@pytest.mark.parametrize("value, address", [('"joe smith"@x.test', '"joe smith"@x.test'), ('""@x.test', '""@x.test'),
                                            ('"a\\"b"@x.test', '"a\\"b"@x.test')])
def test_closed_quoted_strings_are_taken(value, address):
    assert argument_recipients(value, "origin.test") == [address]


def test_words_beside_a_quoted_string_never_closed_are_addresses_of_their_own_as_in_postfix():
    """Postfix 3.7 queued `a"b@x.test` as a@myorigin and b@x.test; `-f '"'` is the null sender there."""
    assert argument_recipients('a"b@x.test', "origin.test") == ["a@origin.test", "b@x.test"]
    assert argument_sender('"', "origin.test", print) == ""
