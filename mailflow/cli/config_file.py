"""Where a command's configuration comes from and how a problem with it is told: the part of common.py that
needs no typer, so that `sendmail` (run once per message) loads the configuration without the command table.

    config_path(option) -> str | None       --config FILE, else $MAILFLOW_CONFIG, else None (built-in defaults)
    config_name(path) -> str                 the file, or "built-in defaults": what messages call it
    config_error_text(error, where) -> str   `FILE: KEY: REASON`; `where` stands in for an error without a file
                                             (a table spec found while building the stages)
"""
from __future__ import annotations

import os
from typing import Optional

from mailflow.errors import ConfigError


def config_path(option: Optional[str]) -> Optional[str]:
    return option or os.environ.get("MAILFLOW_CONFIG") or None


def config_name(path: Optional[str]) -> str:
    return path or "built-in defaults"


def config_error_text(error: ConfigError, where: str = "") -> str:
    return ": ".join(part for part in (error.file or where, error.key, error.reason) if part)
