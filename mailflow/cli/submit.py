"""`mailflow sendmail …` (also reached as `sendmail`, `mailq`, `newaliases` through a link to the program): the
Sendmail-compatible command line. Deliver and -bs are mailflow/sendmail/; -bp, -q and -bv are the queue list,
queue flush and address commands (-bv as mail from -f's sender, else from the login name, as Postfix's); -bh,
-bH and -q30m (a queue runner's interval) do nothing, as with Postfix.

    run_sendmail(args) -> exit code       sysexits values; a configuration problem is 78 (EX_CONFIG) for deliver
                                          and -bs (other modes keep the command's own code)
    sendmail_command(ctx)                 the typer command (Sendmail's option syntax passes through untouched)

Failure behaviour: a usage error prints the usage and returns 64 (EX_USAGE); nothing raises. The warnings of
parse_args (a bad -N, -R or -V value, ignored) are printed on standard error first, in every mode. A closed standard
input, output or error is opened on /dev/null first (Postfix's sendmail does the same).
"""
from __future__ import annotations

import os
import sys

import typer

from mailflow import sendmail as sm
from mailflow.cli.common import config_error_text, config_name, config_path, load
from mailflow.cli.queue import act, list_queue
from mailflow.cli.server import address_test, table_problems
from mailflow.config import Config
from mailflow.sendmail.identity import current_identity

def sendmail_command(ctx: typer.Context) -> None:
    """Sendmail-compatible local submission (docs/sendmail.md): -t -i -f -F -N -bs -bp -bv -bi -q -v …"""
    raise typer.Exit(run_sendmail(list(ctx.args)))


def run_sendmail(args: list[str]) -> int:
    _standard_streams()
    try:
        opts = sm.parse_args(args)
    except sm.UsageError as e:
        typer.echo(f"sendmail: {e}\n{sm.USAGE}", err=True)
        return os.EX_USAGE
    for warning in opts.warnings:
        typer.echo(f"sendmail: warning: {warning}", err=True)
    if opts.mode == "help":
        typer.echo(sm.HELP)
        return 0
    if opts.mode == "ignore":  # -bh, -bH, -q30m: Postfix's sendmail exits 0 at once, reading nothing
        return 0
    config = config_path(opts.config)
    try:
        if opts.mode == "mailq":
            list_queue("list", None, config, False, None, None, None, None)
        elif opts.mode == "flush":
            act("flush", [opts.flush_id] if opts.flush_id else None, config, None, opts.flush_site or None, None,
                required=False, quiet=True)
        elif opts.mode == "verify":
            if not opts.recipients:
                typer.echo(f"sendmail: -bv needs addresses\n{sm.USAGE}", err=True)
                return os.EX_USAGE
            address_test(opts.recipients, config, _verify_sender(opts.sender, config))
        elif opts.mode == "newaliases":
            return _newaliases(load(config), config)
        else:
            return sm.run(opts, load(config), sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    except typer.Exit as e:
        return os.EX_CONFIG if e.exit_code == 2 and opts.mode in ("deliver", "smtp") else e.exit_code
    return 0


def _verify_sender(given: str | None, config: str | None) -> str:
    """The sender -bv routes as (sender-dependent routing): -f's, else the login name at myorigin, the sender of
    the mail sendmail would submit (Postfix's sendmail -bv submits a probe from the login name)."""
    if given is not None:
        return given
    return f"{current_identity().login}@{load(config).origin}"


def _standard_streams() -> None:
    """A closed standard input, output or error (cron jobs and daemons run so) is /dev/null, as Postfix's
    sendmail makes it: closed input is an empty message, not a traceback."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # (the lowest free descriptor: `fd` when those below are open)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        setattr(sys, name, open(fd, mode, closefd=False))


def _newaliases(cfg: Config, config: str | None) -> int:
    """mailflow reads alias files directly: nothing to rebuild; say which alias table cannot be read (75)."""
    problems = [p for p in table_problems(cfg, config_name(config)) if p.key == "alias_maps"]
    for problem in problems:
        typer.echo(f"newaliases: {config_error_text(problem)}", err=True)
    return 75 if problems else 0
