"""sendmail's recipient arguments: an address list past the tokenizer's limit is a usage error, never a list
silently cut short."""
from __future__ import annotations

import pytest

from mailflow.sendmail.options import UsageError
from mailflow.sendmail.reading import argument_recipients


def test_a_long_recipient_list_is_taken_whole_or_refused():
    assert len(argument_recipients(", ".join(f"u{i}@x.test" for i in range(100)), "origin.test")) == 100
    with pytest.raises(UsageError):
        argument_recipients(", ".join(f"u{i}@x.test" for i in range(5000)), "origin.test")
