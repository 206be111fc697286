"""mailflow's text mail log written to a file, as `mailflow serve` writes it with `[log] file`, for the tests that feed
it to pflogsumm and fail2ban.

    SYSLOG_NAME                          the program name each line carries (`postfix-mailflow/smtpd[pid]: ...`)
    mail_log_file(path, myhostname)      a context manager: logging set up so, put back as it was afterwards
    library_reason(line)                 a `TLS library problem: …` line with the library's reason alone, as
                                         Postfix (OpenSSL's error string) and mailflow (Python's ssl) both give it
"""
from __future__ import annotations

import contextlib
import logging
import re
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


# The library's description of a TLS protocol error, as OpenSSL's error string writes it after Postfix's "TLS
# library problem: " (error:0A00009C:SSL routines::http request:../ssl/record/ssl3_record.c:341:) and as
# Python's ssl module does ([SSL: HTTP_REQUEST] http request): its reason, compared alone.
LIBRARY_PROBLEM = re.compile(r"(TLS library problem: )(?:error:[^:]*:[^:]*:[^:]*:([^:]*):.*|\[[^]]*\] (.*))")


def library_reason(line: str) -> str:
    return LIBRARY_PROBLEM.sub(lambda m: m.group(1) + (m.group(2) or m.group(3)), line)
