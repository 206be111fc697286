"""The command line: `mailflow serve | reload | status | health | check-config | version | queue … | mailq | table |
config show|check|import | address | auth | account … | dovecot-config | dkim keygen | dns-records |
check-deliverability | sendmail`.
No logic of its own: each command calls the module that does the work.

Configuration comes from `--config FILE`, else `$MAILFLOW_CONFIG`, else the embedded defaults. A bad
configuration prints `mailflow: FILE: KEY: REASON` and exits 2 (config_file.py holds the one formatter); never a
traceback. `serve` exits 1 when it cannot start: a listen address taken, or another server running on the same
queue (named by its pid).

`mailflow queue …` (list, show, flush, hold, release, requeue, delete, shape, destinations) opens the queue
database the configuration names directly, whether or not `serve` runs; the work is in queue_tools.py.
A command line that does not say which messages exits 2; an unknown queue id for `show` exits 1.

A closed standard input, output or error is opened on /dev/null first, for every command (as Postfix's sendmail
does): never a traceback for it; nor for a reader that goes away (`… | head`): exit 1, as click makes it.

`mailflow sendmail …` (also `sendmail`, `mailq`, `newaliases` through links) is the Sendmail-compatible local
submission command (mailflow/sendmail/, docs/sendmail.md); its exit codes are sysexits values.

`mailflow table query TYPE:NAME KEY…` answers like `postmap -q` (mailflow.tables; `-` reads the keys from standard
input, as `postmap -q -` does): exit 1 when nothing is found,
2 for a bad table spec, 75 (EX_TEMPFAIL) when a lookup fails.

The package: config_file.py (where the configuration comes from, the one error formatter; no typer), common.py
(configuration loading and errors for typer's commands, shared options), server.py (serve, check-config, version,
config show, address, table query, auth), ops.py (reload, status, health: against a running server), queue.py (the
queue tools), submit.py (sendmail), accounts.py (`account …`, the account database, and `dovecot-config`),
deliverability.py (dkim keygen, dns-records, check-deliverability; docs/deliverability.md); commands.py is the
command table (typer). This file is the entry point only: `main()` hands `sendmail` (and the sendmail, mailq and
newaliases names) to submit.py before typer and the command table are imported, and `app` (the table) loads on first
use. Modules only some commands need (the server, the store, the router, smtpd's password hashing, the queue tools)
are imported inside those commands, so that `sendmail`, run once per message by scripts, starts fast
(docs/performance.md, "Start-up of the command-line tools").
"""
from __future__ import annotations

import os
import sys
from typing import Any

from mailflow.cli.submit import run_sendmail
from mailflow.sendmail.options import program_mode


def main() -> None:
    _standard_streams()
    extra = program_mode(sys.argv[0])
    if extra is not None:  # invoked as sendmail, mailq or newaliases (a link to this program)
        _sendmail(extra + sys.argv[1:])
    if sys.argv[1:2] == ["sendmail"]:  # before typer, so that "--" and Sendmail's option syntax stay intact
        _sendmail(sys.argv[2:])
    from mailflow.cli.commands import app

    app(prog_name="mailflow")


def _sendmail(args: list[str]) -> None:
    try:
        code = run_sendmail(args)
    except BrokenPipeError:  # `sendmail -bv … | head`: the reader has gone; exit 1 without a traceback, as click
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # makes it for the other commands
        code = 1
    sys.exit(code)


def _standard_streams() -> None:
    """A closed standard input, output or error (cron jobs and daemons run so) is /dev/null, as Postfix's
    sendmail makes it, for every command: closed input is an empty message (sendmail), no keys (`table query -`),
    an empty password (`--password-stdin`); output to a closed one goes nowhere. It was a traceback."""
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


def __getattr__(name: str) -> Any:
    """`mailflow.cli.app`: the command table, loaded on first use (typer costs sendmail's start-up ~30 ms)."""
    if name == "app":
        from mailflow.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
