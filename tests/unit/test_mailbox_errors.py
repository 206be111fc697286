"""What an OS error while writing a mailbox means for the recipient, mbox and Maildir alike, as Postfix's
mbox_dsn maps it: a full disk defers 4.3.0, a quota or file size limit bounces 5.2.2, anything else defers
4.2.0 (Postfix bounces that one 5.2.0; mailflow keeps the mail for the operator to fix)."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from mailflow.errors import PermanentError
from mailflow.model import Outcome
from mailflow.transports.local.mbox import _os_error
from mailflow.transports.maildir import write_failure

CASES = [(errno.ENOSPC, Outcome.DEFERRED, "4.3.0"), (errno.EDQUOT, Outcome.BOUNCED, "5.2.2"),
         (errno.EFBIG, Outcome.BOUNCED, "5.2.2"), (errno.EACCES, Outcome.DEFERRED, "4.2.0")]


@pytest.mark.parametrize("code, outcome, dsn", CASES)
def test_mbox_and_maildir_map_an_os_error_alike(code, outcome, dsn):
    error = OSError(code, "reason")
    assert write_failure(Path("/m"), error)[:2] == (outcome, dsn)
    mapped = _os_error(Path("/m"), error, "write")
    assert (isinstance(mapped, PermanentError), mapped.dsn) == (outcome is Outcome.BOUNCED, dsn)
