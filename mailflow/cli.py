"""The command line: `mailflow serve | check-config | version`. No logic of its own.

Configuration comes from `--config FILE`, else `$MAILFLOW_CONFIG`, else the embedded defaults. A bad
configuration prints `mailflow: FILE: KEY: REASON` and exits 2; never a traceback.
"""
from __future__ import annotations

import asyncio
import os
import sys
from typing import Optional

import typer

from mailflow import __version__
from mailflow.config import Config, load_config
from mailflow.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mailflow: a mail server in one asyncio process.")

ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file (default: $MAILFLOW_CONFIG, else built-in defaults)")


def _load(path: Optional[str]) -> Config:
    path = path or os.environ.get("MAILFLOW_CONFIG") or None
    try:
        return load_config(path)
    except ConfigError as e:
        typer.echo(f"mailflow: {e}", err=True)
        raise typer.Exit(2)


@app.command()
def serve(config: Optional[str] = ConfigOption) -> None:
    """Run the mail server until SIGTERM or SIGINT."""
    from mailflow.app import serve as run
    from mailflow.logs import setup_logging

    cfg = _load(config)
    setup_logging(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(run(cfg))
    except OSError as e:  # typically: the listen address is taken or not ours
        typer.echo(f"mailflow: cannot start: {e}", err=True)
        raise typer.Exit(1)


@app.command("check-config")
def check_config(config: Optional[str] = ConfigOption) -> None:
    """Validate the configuration and say so."""
    cfg = _load(config)
    where = config or os.environ.get("MAILFLOW_CONFIG") or "built-in defaults"
    typer.echo(f"{where}: ok (listen {', '.join(cfg.smtpd.listen)}; queue {cfg.queue_directory})")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"mailflow {__version__}")


def main() -> None:
    app(prog_name="mailflow")


if __name__ == "__main__":
    sys.exit(main())
