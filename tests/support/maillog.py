"""mailflow's text mail log written to a file, as `mailflow serve` writes it with `[log] file`, for the tests that feed
it to pflogsumm and fail2ban.

    SYSLOG_NAME                          the program name each line carries (`postfix-mailflow/smtpd[pid]: ...`)
    mail_log_file(path, myhostname)      a context manager: logging set up so, put back as it was afterwards
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from mailflow.config import LogConfig
from mailflow.logs import setup_logging

SYSLOG_NAME = "postfix-mailflow"


@contextlib.contextmanager
def mail_log_file(path: Path, myhostname: str = "mx.mailflow.test"):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(LogConfig(file=str(path), syslog_name=SYSLOG_NAME), myhostname)
    try:
        yield path
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
