"""`[log]`: where and how the mail log is written (mailflow.logs).

    LogConfig
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mailflow.config.base import Section
from mailflow.config_source import LOG_FILE, SYSLOG_NAME


class LogConfig(Section):
    """The mail log (mailflow.logs): "text" is Postfix's syslog layout (`TIME HOST syslog_name/service[pid]: …`,
    what pflogsumm and fail2ban read); "json" one object per line. `file` (Postfix maillog_file): "" is stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"  # (config_source.LOG_LEVELS: the same)
    format: Literal["text", "json"] = "text"  # (config_source.LOG_FORMATS)
    # Postfix syslog_name: "postfix-<name>" is how Postfix names a second instance, which fail2ban's stock
    # postfix filter matches as it is; pflogsumm wants --syslog-name=postfix-mailflow.
    syslog_name: str = Field("postfix-mailflow", pattern=SYSLOG_NAME)
    file: str = LOG_FILE
