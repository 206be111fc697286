"""What every command of the command line shares: where the configuration comes from, how it is loaded, and the
one way a configuration problem is told.

    config_path(option) -> str | None       --config FILE, else $MAILFLOW_CONFIG, else None (built-in defaults)
    config_name(path) -> str                 the file, or "built-in defaults": what messages call it
    load(option) -> Config                   a bad configuration: `mailflow: FILE: KEY: REASON`, exit 2
    config_error_text(error, where) -> str   `FILE: KEY: REASON`; `where` stands in for an error without a file
                                             (a table spec found while building the stages)
    fail_config(prefix, error, where)        `PREFIX: FILE: KEY: REASON` on stderr, exit 2
    fail(prefix, message, code)              `PREFIX: MESSAGE` on stderr, exit `code`

Shared options: ConfigOption, JsonOption (typer). config_path, config_name and config_error_text live in
config_file.py (no typer: sendmail's start-up) and are named here too.
Never a traceback for a configuration problem: every command reports it through `config_error_text`.
"""
from __future__ import annotations

from typing import NoReturn, Optional

import typer

from mailflow.cli.config_file import config_error_text, config_name, config_path
from mailflow.config import Config, load_config
from mailflow.errors import ConfigError
from mailflow.sendmail.settings import remember_settings

__all__ = ["ConfigOption", "JsonOption", "config_error_text", "config_name", "config_path", "fail", "fail_config",
           "load"]

ConfigOption = typer.Option(None, "--config", "-c",
                            help="TOML config file (default: $MAILFLOW_CONFIG, else built-in defaults)")
JsonOption = typer.Option(False, "--json", help="JSON instead of text")


def fail(prefix: str, message: str, code: int) -> NoReturn:
    typer.echo(f"{prefix}: {message}", err=True)
    raise typer.Exit(code)


def fail_config(prefix: str, error: ConfigError, where: str = "") -> NoReturn:
    fail(prefix, config_error_text(error, where), 2)


def load(option: Optional[str], remember: bool = False) -> Config:
    """The configuration (a bad one: its line, exit 2); with `remember`, its settings recorded for sendmail
    (mailflow/sendmail/settings.py: check-config)."""
    path = config_path(option)
    try:
        if remember:
            return remember_settings(path)
        return load_config(path)
    except ConfigError as e:
        fail_config("mailflow", e, config_name(path))
