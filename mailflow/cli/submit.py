"""`mailflow sendmail …` (also reached as `sendmail`, `mailq`, `newaliases` through a link to the program): the
Sendmail-compatible command line. Deliver and -bs are mailflow/sendmail/; -bp, -q and -bv are the queue list,
queue flush and address commands (-bv as mail from -f's sender, else from the login name, as Postfix's); -bh,
-bH and -q30m (a queue runner's interval) do nothing, as with Postfix.

    run_sendmail(args) -> exit code       sysexits values; a configuration problem is 78 (EX_CONFIG) for deliver
                                          and -bs (other modes keep the command's own code)

Deliver and -bs, run once per message, load neither typer nor the other commands' modules (the queue tools, the
router), and with the settings the server recorded for this exact configuration (mailflow/sendmail/settings.py)
not the configuration model either (pydantic); without them, the configuration is loaded and validated as by
every command. The modes that are other commands import them when they run. The typer command `mailflow sendmail`
is in commands.py; `mailflow.cli.main` calls run_sendmail before typer is imported.

Failure behaviour: a usage error prints the usage and returns 64 (EX_USAGE); nothing raises. The warnings of
parse_args (a bad -N, -R or -V value, ignored) are printed on standard error first, in every mode. (A closed standard
input, output or error is /dev/null here: mailflow.cli.main opens it so for every command.)
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional

from mailflow import sendmail as sm
from mailflow.cli.config_file import config_error_text, config_name, config_path
from mailflow.errors import ConfigError
from mailflow.sendmail.identity import current_identity
from mailflow.sendmail.settings import SubmitSettings, cached_settings, settings_of

if TYPE_CHECKING:
    from mailflow.config import Config


def run_sendmail(args: list[str]) -> int:
    try:
        opts = sm.parse_args(args)
    except sm.UsageError as e:
        _say(f"sendmail: {e}\n{sm.USAGE}")
        return os.EX_USAGE
    for warning in opts.warnings:
        _say(f"sendmail: warning: {warning}")
    if opts.mode == "help":
        print(sm.HELP, flush=True)
        return 0
    if opts.mode == "ignore":  # -bh, -bH, -q30m: Postfix's sendmail exits 0 at once, reading nothing
        return 0
    config = config_path(opts.config)
    if opts.mode in ("deliver", "smtp"):  # the per-message modes: no typer, no other command's module
        settings = cached_settings(config) or _loaded_settings(config)
        if settings is None:
            return os.EX_CONFIG
        return sm.run(opts, settings, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    return _command_mode(opts, config)


def _loaded_settings(config: Optional[str]) -> Optional[SubmitSettings]:
    """The full path: the configuration loaded and validated (the model, ~100 ms); None when it is bad, after
    saying why as every command does."""
    from mailflow.config import load_config

    try:
        return settings_of(load_config(config, read_domain_files=False))  # (as Postfix's sendmail: not read)
    except ConfigError as e:
        _say(f"mailflow: {config_error_text(e, config_name(config))}")  # common.load's line
        return None


def _command_mode(opts: sm.Options, config: Optional[str]) -> int:
    """-bp, -q, -bv and -bi: the queue list, queue flush, address and table commands, exit codes theirs."""
    import typer

    from mailflow.cli.common import load
    from mailflow.cli.queue import act, list_queue
    from mailflow.cli.server import address_test

    try:
        if opts.mode == "mailq":
            list_queue("list", None, config, False, None, None, None, None)
        elif opts.mode == "flush":
            act("flush", [opts.flush_id] if opts.flush_id else None, config, None, opts.flush_site or None, None,
                required=False, quiet=True)
        elif opts.mode == "verify":
            if not opts.recipients:
                _say(f"sendmail: -bv needs addresses\n{sm.USAGE}")
                return os.EX_USAGE
            address_test(opts.recipients, config, _verify_sender(opts.sender, config))
        elif opts.mode == "newaliases":
            return _newaliases(load(config), config)
    except typer.Exit as e:
        return e.exit_code
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _verify_sender(given: str | None, config: str | None) -> str:
    """The sender -bv routes as (sender-dependent routing): -f's, else the login name at myorigin, the sender of
    the mail sendmail would submit (Postfix's sendmail -bv submits a probe from the login name)."""
    from mailflow.cli.common import load

    if given is not None:
        return given
    return f"{current_identity().login}@{load(config).origin}"


def _newaliases(cfg: Config, config: str | None) -> int:
    """mailflow reads alias files directly: nothing to rebuild; say which alias table cannot be read (75)."""
    from mailflow.cli.server import table_problems

    problems = [p for p in table_problems(cfg, config_name(config)) if p.key == "alias_maps"]
    for problem in problems:
        _say(f"newaliases: {config_error_text(problem)}")
    return 75 if problems else 0
