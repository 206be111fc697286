"""`[log]`: where and how the mail log is written (mailflow.logs).

    LogConfig
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mailflow.config.base import Section


class LogConfig(Section):
    """The mail log (mailflow.logs): "text" is Postfix's syslog layout (`TIME HOST syslog_name/service[pid]: …`,
    what pflogsumm and fail2ban read); "json" one object per line. `file` (Postfix maillog_file): "" is stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # Postfix syslog_name: "postfix-<name>" is how Postfix names a second instance, which fail2ban's stock
    # postfix filter matches as it is; pflogsumm wants --syslog-name=postfix-mailflow.
    syslog_name: str = Field("postfix-mailflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    file: str = ""
