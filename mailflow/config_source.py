"""A configuration file before validation: what the model (mailflow.config) and sendmail's settings record
(mailflow/sendmail/settings.py, which must not load the model: pydantic costs ~100 ms) both need, written once.

A leaf: it imports only the standard library.

    MAX_FILE_BYTES                  the largest configuration file load_config reads (a Postfix main.cf too)
    QUEUE_DIRECTORY, LOG_FILE       the defaults of `queue_directory` and `[log] file` ("": none, standard error)
    LOG_LEVELS, LOG_FORMATS         the values `[log] level` and `format` take (mailflow.config.log's Literals:
                                    tests/unit/test_sendmail_settings.py compares them)
    SYSLOG_NAME                     the pattern `[log] syslog_name` matches
    CONTROL                         a character no setting holds but a pipe command's argument: a line break or
                                    any other C0 control character but TAB, or DEL
    resolve_path(value, base) -> str   a relative path taken from directory `base`; "" and absolute ones as they are

Never raises.
"""
from __future__ import annotations

import re
from pathlib import Path

MAX_FILE_BYTES = 4 << 20  # a hundred times the annotated example; /dev/zero is refused, not read to the end
QUEUE_DIRECTORY = "var"
LOG_FILE = ""
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SYSLOG_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def resolve_path(value: str, base: Path) -> str:
    return value if not value or Path(value).is_absolute() else str(base / value)
