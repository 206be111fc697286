"""Fixtures shared by the interop tests."""
from __future__ import annotations

import pytest

from tests.support.maillog import mail_log_file


@pytest.fixture
def mail_log(tmp_path):
    """mailflow's logging set up as `mailflow serve` does with `[log] file` (tmp_path/mail.log), put back
    afterwards; the path."""
    with mail_log_file(tmp_path / "mail.log") as path:
        yield path
