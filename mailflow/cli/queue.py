"""`mailflow queue …` and `mailflow mailq`: the operator tools, on the queue database the configuration names,
whether or not `serve` runs (the work is in mailflow/queue_tools.py). Each command is a plain function;
`mailflow.cli` registers them.

    queue_list / mailq                   Postfix mailq layout (or postqueue -j, or JSON)
    queue_show                           one message like postcat -q (-e, -h, -b: its parts)
    action_command(name, help, required) flush, hold, release, requeue, delete (postqueue -f, postsuper -h/-H/-r/-d)
    queue_shape                          qshape
    queue_destinations                   qmgr's last word on each destination
    list_queue(...), act(...)            the same for sendmail's -bp and -q

A change (hold, release, requeue, delete) writes postsuper's lines to the configured `[log] file` (queue_tools.apply,
logs.tool_mail_log); a log file that cannot be opened is a warning on stderr, and the change is made.

Failure behaviour: a queue database error (say, locked by another process for longer than the store's busy
timeout) is one line on stderr and exit 1; a command line that does not say which messages exits 2; a token
that is no queue id is a warning and is skipped (postsuper's way), but `flush` exits 69 (EX_UNAVAILABLE) before
flushing anything, as `postqueue -i` does, and `show` exits 1, as `postcat -q` does; an unknown queue id for `show`
exits 1 (postcat's), one for the other commands is named on stderr and the command exits 0 (postsuper's and
postqueue -i's); no queue database exits 1 naming the path; `mailq | head` closing the pipe is not an error. A
damaged message (a row of it holding values of the wrong kind: `arrival = 'x'`, a negative size, an unknown status)
is listed or shown with the rest, marked, with a warning on stderr naming its queue id and what is wrong, once per
message; the command still exits 0, as Postfix's postqueue -p (showq warns about a bad queue file and lists the rest):
scripts that check mailq's status see a listing that worked.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from mailflow.cli.common import ConfigOption, JsonOption, fail, load
from mailflow.config import Config
from mailflow.logs import POSTSUPER, MailLog, printable, tool_mail_log
from mailflow.maildrop import REQUEUED, wake_pickup

IdsArgument = typer.Argument(None, metavar="QUEUE_ID|ALL|-",
                             help="queue ids, ALL, or - to read ids from standard input")
FromOption = typer.Option(None, "--from", metavar="ADDR", help="only mail from this sender ('<>': the null sender)")
ToDomainOption = typer.Option(None, "--to-domain", metavar="DOMAIN",
                              help="only mail with a pending recipient in this domain")
OlderThanOption = typer.Option(None, "--older-than", metavar="DURATION",
                               help="only mail that arrived longer ago than this (30m, 1h, 2d)")
PostqueueJsonOption = typer.Option(False, "-j", "--postqueue-json",
                                   help="postqueue -j: a JSON object a line with Postfix's field names")
QueuesOption = typer.Option(None, "--queue", metavar="Q[,Q…]",
                            help="queues to list (default maildrop,incoming,active,deferred,hold; corrupt, or all)")

# The commands that change the queue differ only in their action and help text.
ACTION_COMMANDS = (
    ("flush", "Make deferred mail due now (all of it unless ids or selectors narrow it), like postqueue -f.", False),
    ("hold", "Put mail on hold (postsuper -h): incoming, deferred and active mail stop being delivered.", True),
    ("release", "Release held mail (postsuper -H): it becomes deferred and due now.", True),
    ("requeue", "Requeue mail (postsuper -r): incoming, deferred, held or (once its attempt ends) active mail goes "
                "through cleanup again (the rewriting and routing of now) under a new queue id, its pending recipients "
                "only.", True),
    ("delete", "Delete mail from any queue (postsuper -d). No bounce is sent.", True),
)


def _fail(command: str, message: str, code: int) -> NoReturn:
    fail(f"mailflow queue {command}", message, code)


def _tools(command: str, cfg: Config, work):
    """Open the configured queue database, run `work(store)` on a fresh loop, close the store; what work returned
    (None when the reader of the output went away)."""
    from mailflow.store import Store

    db = Path(cfg.queue_path) / "queue.db"
    if not db.exists():
        _fail(command, f"no queue database at {db} (check queue_directory in the configuration)", 1)

    async def run():
        store = await Store.open(db, upgrade=False)  # (an older server may run on it: it upgrades at its start)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except BrokenPipeError:  # `mailflow mailq | head`: the reader has gone; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except sqlite3.Error as e:  # locked longer than the busy timeout, damaged, unreadable: a line, no traceback
        changes = {name for name, *_ in ACTION_COMMANDS}
        done = " (a change stops there; the chunks done before it stay done)" if command in changes else ""
        _fail(command, f"the queue database {db}: {e}{done}", 1)


def _selection(command: str, ids, sender, to_domain, older_than, *, required: bool):
    """The selection; a token that is no queue id is a warning on stderr and is skipped, as with postsuper; for
    `flush` it ends the command (exit 69, EX_UNAVAILABLE, nothing flushed), as postqueue -i refuses it."""
    from mailflow.queue_tools import SelectionError, parse_selection

    def invalid(message: str) -> None:
        typer.echo(f"mailflow queue {command}: warning: {message}", err=True)

    def cannot_flush(message: str) -> NoReturn:
        _fail(command, f"cannot flush: {message}", os.EX_UNAVAILABLE)

    try:
        return parse_selection(ids or [], sender=sender, to_domain=to_domain, older_than=older_than,
                               stdin=sys.stdin, required=required,
                               invalid=cannot_flush if command == "flush" else invalid)
    except SelectionError as e:
        _fail(command, str(e), 2)


def _queues(command: str, value: str) -> tuple[str, ...]:
    from mailflow.queue_tools import SelectionError, parse_queues

    try:
        return parse_queues(value)
    except SelectionError as e:
        _fail(command, str(e), 2)


def list_queue(command, ids, config, as_json, queue, sender, to_domain, older_than, *,
               postqueue_json: bool = False) -> None:
    from mailflow import queue_tools as qt

    selection = _selection(command, ids, sender, to_domain, older_than, required=False)
    queues = selection.within(_queues(command, queue) if queue else qt.LISTED_QUEUES)
    if as_json and postqueue_json:
        _fail(command, "give --json or -j, not both", 2)

    damaged = _DamageWarnings(command)

    async def work(store):
        now = time.time()
        if as_json or postqueue_json:
            write = qt.write_list_json if as_json else qt.write_postqueue_json
            await write(store, sys.stdout, queues, selection, now, warn=damaged.warn)
            return
        await qt.write_mailq(store, sys.stdout, queues, selection, now, warn=damaged.warn)
        corrupt = (await store.counts()).get("corrupt", 0) if "corrupt" not in queues else 0
        if corrupt:
            typer.echo(f"mailflow: {qt.plural(corrupt, 'corrupt message')} not shown (--queue corrupt)", err=True)

    _tools(command, load(config), work)


class _DamageWarnings:
    """A warning on stderr for each damaged message a command meets (the exit status stays 0, as postqueue's)."""

    def __init__(self, command: str):
        self._command = command

    def warn(self, queue_id: str, damage: str) -> None:
        typer.echo(f"mailflow queue {self._command}: warning: {queue_id}: damaged queue row: {printable(damage)}"
                   " (`mailflow queue delete` removes it)", err=True)


def queue_list(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
               as_json: bool = JsonOption, postqueue_json: bool = PostqueueJsonOption,
               queue: Optional[str] = QueuesOption,
               sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
               older_than: Optional[str] = OlderThanOption) -> None:
    """The queue in Postfix mailq layout: * active, ! on hold; each pending recipient under its last reason."""
    list_queue("list", ids, config, as_json, queue, sender, to_domain, older_than, postqueue_json=postqueue_json)


def mailq(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
          as_json: bool = JsonOption, postqueue_json: bool = PostqueueJsonOption,
          queue: Optional[str] = typer.Option(None, "--queue", metavar="Q[,Q…]", help="queues to list"),
          sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
          older_than: Optional[str] = OlderThanOption) -> None:
    """Same as `mailflow queue list`."""
    list_queue("list", ids, config, as_json, queue, sender, to_domain, older_than, postqueue_json=postqueue_json)


def queue_show(queue_id: str = typer.Argument(..., metavar="QUEUE_ID"), config: Optional[str] = ConfigOption,
               envelope: bool = typer.Option(False, "-e", "--envelope", help="the envelope (postcat -e)"),
               header: bool = typer.Option(False, "-h", "--header", help="the header section (postcat -h)"),
               body: bool = typer.Option(False, "-b", "--body",
                                         help="the body, from the empty line after the headers (postcat -b)"),
               headers_only: bool = typer.Option(False, "--headers-only", help="the envelope and headers (-eh)"),
               as_json: bool = JsonOption) -> None:
    """One message like postcat -q: envelope, every recipient's status, then headers and body; -e, -h and -b
    choose among them as postcat's do (-h or -b without -e: the message text alone, no `***` lines). A corrupt
    entry's missing content, asked for, is an error (exit 1, after what could be shown), as postcat's fatal
    "record read error" on a damaged queue file: `show -b ID > body` does not leave an empty body silently."""
    from mailflow import queue_tools as qt

    try:
        qid = qt.clean_id(queue_id)
    except qt.SelectionError as e:  # (postcat -q: "fatal: bad mail queue ID", exit 1)
        _fail("show", str(e), 1)
    chosen = {name for name, on in (("envelope", envelope), ("header", header), ("body", body)) if on}
    parts = chosen | qt.HEADERS_ONLY if headers_only else chosen or qt.SHOW_PARTS

    damaged = _DamageWarnings("show")

    async def work(store):
        detail = await store.message_detail(qid)
        if detail is None:
            _fail("show", f"{qid}: no such message in the queue", 1)
        recipients = (await store.recipients_of([qid])).get(qid, [])
        damage = qt.damage_of(detail, recipients)
        if damage:
            damaged.warn(qid, damage)
        content = await store.content(qid)
        if as_json:  # (its null headers and body say the content is missing)
            qt.write_show_json(sys.stdout, detail, recipients, content, parts)
            return
        qt.write_show(sys.stdout, detail, recipients, content, parts, time.time())
        if content is None and parts & {"header", "body"}:  # as postcat's "record read error": not an empty text
            sys.stdout.flush()
            _fail("show", f"{qid}: the message content is missing (a corrupt entry)", 1)

    _tools("show", load(config), work)


def act(name: str, ids, config, sender, to_domain, older_than, *, required: bool = True, quiet: bool = False) -> None:
    """`quiet`: no count on stdout (sendmail -q, silent as Postfix's, which cron runs and would mail each output)."""
    from mailflow import queue_tools as qt

    action = qt.ACTIONS[name]
    selection = _selection(name, ids, sender, to_domain, older_than, required=required)
    cfg = load(config)

    async def work(store):
        with contextlib.ExitStack() as opened:  # (opened once the queue is known to be there)
            log = _mail_log(name, cfg, opened) if name in POSTSUPER else None  # (flush logs nothing)
            done, missed = await qt.apply(store, action, selection, time.time(), sys.stderr, log=log)
        if done and action.wakes_pickup:
            wake_pickup(cfg.queue_path, REQUEUED)  # (no server: it copies them at start)
        for qid in missed:
            typer.echo(f"mailflow queue {name}: {qid}: not in the {qt.either(action.sources)} queue", err=True)
        if not quiet:
            typer.echo(f"{name}: {qt.plural(done, 'message')}")

    _tools(name, cfg, work)


def _mail_log(command: str, cfg: Config, opened: contextlib.ExitStack) -> Optional[MailLog]:
    """The configured mail log for postsuper's lines (mailflow.logs.tool_mail_log), closed with `opened`. One that
    cannot be opened is a warning: the change goes on, unlogged."""
    try:
        return opened.enter_context(tool_mail_log(cfg.log, cfg.myhostname))
    except OSError as e:
        typer.echo(f"mailflow queue {command}: warning: cannot write the mail log {cfg.log.file}: {e.strerror}",
                   err=True)
        return None


def action_command(name: str, help_text: str, required: bool):
    """The command function of one queue action (its name and help set for typer)."""
    def command(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
                sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
                older_than: Optional[str] = OlderThanOption) -> None:
        act(name, ids, config, sender, to_domain, older_than, required=required)

    command.__name__ = f"queue_{name}"
    command.__doc__ = help_text
    return command


def queue_shape(config: Optional[str] = ConfigOption,
                queue: str = typer.Option("incoming,active", "--queue", metavar="Q[,Q…]",
                                          help="queues to count, like qshape's (default incoming,active; maildrop, "
                                               "deferred, hold, corrupt; all)"),
                top: Optional[int] = typer.Option(None, "--top", "-n", min=0,
                                                  help="how many domains to show (0: all; default, as qshape: "
                                                       "20 on a terminal, else all)"),
                senders: bool = typer.Option(False, "--senders", "-s",
                                             help="messages by sender domain instead, like qshape -s"),
                as_json: bool = JsonOption) -> None:
    """Pending recipients by domain and age in minutes, like qshape: T is the total, each column counts ages
    below its label."""
    from mailflow import queue_tools as qt

    queues = _queues("shape", queue)
    shown = top if top is not None else 20 if sys.stdout.isatty() else 0

    async def work(store):
        counts = await store.shape_counts(queues, time.time(), qt.shape_limits(), senders=senders)
        total, domains = qt.shape_rows(counts, shown)
        if as_json:
            sys.stdout.write(json.dumps(qt.shape_json(queues, total, domains), indent=2) + "\n")
        else:
            sys.stdout.write(qt.format_shape(total, domains))

    _tools("shape", load(config), work)


def queue_destinations(config: Optional[str] = ConfigOption, as_json: bool = JsonOption) -> None:
    """What qmgr last said of each destination (transport, nexthop): window, load, failures, dead timer."""
    from mailflow import queue_tools as qt

    async def work(store):
        rows = await store.destination_rows()
        if as_json:
            sys.stdout.write(json.dumps(qt.destinations_json(rows), indent=2) + "\n")
        elif not rows:
            typer.echo("no destination state yet (is the server running?)")
        else:
            sys.stdout.write(qt.format_destinations(rows, time.time()))

    _tools("destinations", load(config), work)
