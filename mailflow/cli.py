"""The command line: `mailflow serve | check-config | version | queue … | mailq`. No logic of its own.

Configuration comes from `--config FILE`, else `$MAILFLOW_CONFIG`, else the embedded defaults. A bad
configuration prints `mailflow: FILE: KEY: REASON` and exits 2; never a traceback. `serve` exits 1 when it cannot
start: a listen address taken, or another server running on the same queue (named by its pid).

`mailflow queue …` (list, show, flush, hold, release, requeue, delete, shape, destinations) opens the queue
database the configuration names directly, whether or not `serve` runs; the work is in queue_tools.py.
A command line that does not say which messages exits 2; an unknown queue id for `show` exits 1.

`mailflow sendmail …` (also `sendmail`, `mailq`, `newaliases` through links) is the Sendmail-compatible local
submission command (mailflow/sendmail.py, docs/sendmail.md); its exit codes are sysexits values.

`mailflow table query TYPE:NAME KEY…` answers like `postmap -q` (tables.py): exit 1 when nothing is found,
2 for a bad table spec, 75 (EX_TEMPFAIL) when a lookup fails.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

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
    from mailflow.queuelock import QueueBusy

    cfg = _load(config)
    try:
        setup_logging(cfg.log, cfg.myhostname)
    except OSError as e:
        typer.echo(f"mailflow: log.file: cannot open {cfg.log.file}: {e.strerror}", err=True)
        raise typer.Exit(2)
    try:
        asyncio.run(run(cfg))
    except QueueBusy as e:  # another server owns this queue: it was left untouched
        typer.echo(f"mailflow: cannot start: {e}", err=True)
        raise typer.Exit(1)
    except ConfigError as e:  # found while building the stages (e.g. a lookup table spec)
        where = config or os.environ.get("MAILFLOW_CONFIG") or "built-in defaults"
        typer.echo(f"mailflow: {where}: {e.key}: {e.reason}" if not e.file else f"mailflow: {e}", err=True)
        raise typer.Exit(2)
    except OSError as e:  # typically: the listen address is taken or not ours
        typer.echo(f"mailflow: cannot start: {e}", err=True)
        raise typer.Exit(1)


@app.command("check-config")
def check_config(config: Optional[str] = ConfigOption) -> None:
    """Validate the configuration and read every file-backed lookup table it names (like `postfix check`).
    Exit 2 on the first bad setting, or after listing every table that cannot be read."""
    cfg = _load(config)
    where = config or os.environ.get("MAILFLOW_CONFIG") or "built-in defaults"
    problems = _table_problems(cfg)
    for problem in problems:
        typer.echo(f"{where}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{where}: ok (queue {cfg.queue_directory})")
    for host, port, role in listener_summary(cfg):
        typer.echo(f"  listener {host}:{port} ({role})")


def listener_summary(cfg: Config) -> list[tuple[str, int, str]]:
    """(address, port, role) of every listener the server opens: the `listen` addresses (mta) and each
    `[[smtpd.listeners]]` entry, in that order."""
    from mailflow.syntax import parse_hostport

    out = []
    for value, role in [(a, "mta") for a in cfg.smtpd.listen] + [(l.address, l.role) for l in cfg.smtpd.listeners]:
        host, port = parse_hostport(value)
        out.append((f"[{host}]" if ":" in host else host, port, role))
    return out


def _table_problems(cfg) -> list[str]:
    """`setting: reason` for each file-backed table (texthash, regexp, sqlite) that cannot answer now."""
    from mailflow.config import flat_settings
    from mailflow.syntax import FILE_TABLE_TYPES
    from mailflow.errors import LookupRetry
    from mailflow.tables import open_table

    problems = []
    for key, specs in flat_settings(cfg).items():
        if not key.endswith("_maps"):
            continue
        for spec in specs:
            if spec.partition(":")[0].strip().lower() not in FILE_TABLE_TYPES:
                continue
            try:
                open_table(spec, aliases=key == "alias_maps").lookup("mailflow-check-config-probe")
            except (ConfigError, LookupRetry) as e:
                problems.append(f"{key}: {getattr(e, 'reason', None) or e.text}")
    return problems


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"mailflow {__version__}")


# ---------------------------------------------------------------------------------------------- queue

queue_app = typer.Typer(no_args_is_help=True, help="Inspect and change the mail queue (mailq, postsuper, "
                        "postcat, qshape); works with or without a running server.")
app.add_typer(queue_app, name="queue")

IdsArgument = typer.Argument(None, metavar="QUEUE_ID|ALL|-",
                             help="queue ids, ALL, or - to read ids from standard input")
FromOption = typer.Option(None, "--from", metavar="ADDR", help="only mail from this sender ('<>': the null sender)")
ToDomainOption = typer.Option(None, "--to-domain", metavar="DOMAIN",
                              help="only mail with a pending recipient in this domain")
OlderThanOption = typer.Option(None, "--older-than", metavar="DURATION",
                               help="only mail that arrived longer ago than this (30m, 1h, 2d)")
JsonOption = typer.Option(False, "--json", help="JSON instead of text")


def _fail(command: str, message: str, code: int) -> None:
    typer.echo(f"mailflow queue {command}: {message}", err=True)
    raise typer.Exit(code)


def _tools(command: str, config: Optional[str], work) -> None:
    """Open the configured queue database, run `work(store)` on a fresh loop, close the store."""
    from mailflow.store import Store

    db = Path(_load(config).queue_path) / "queue.db"
    if not db.exists():
        _fail(command, f"no queue database at {db} (check queue_directory in the configuration)", 1)

    async def run():
        store = await Store.open(db)
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        asyncio.run(run())
    except BrokenPipeError:  # `mailflow mailq | head`: the reader has gone; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _selection(command: str, ids, sender, to_domain, older_than, *, required: bool):
    from mailflow.queue_tools import SelectionError, parse_selection

    try:
        return parse_selection(ids or [], sender=sender, to_domain=to_domain, older_than=older_than,
                               stdin=sys.stdin, required=required)
    except SelectionError as e:
        _fail(command, str(e), 2)


def _queues(command: str, value: str) -> tuple[str, ...]:
    from mailflow.queue_tools import SelectionError, parse_queues

    try:
        return parse_queues(value)
    except SelectionError as e:
        _fail(command, str(e), 2)


def _list(command, ids, config, as_json, queue, sender, to_domain, older_than) -> None:
    from mailflow import queue_tools as qt

    selection = _selection(command, ids, sender, to_domain, older_than, required=False)
    queues = _queues(command, queue) if queue else qt.LISTED_QUEUES

    async def work(store):
        now = time.time()
        if as_json:
            await qt.write_list_json(store, sys.stdout, queues, selection, now)
            return
        await qt.write_mailq(store, sys.stdout, queues, selection, now)
        corrupt = (await store.counts()).get("corrupt", 0) if "corrupt" not in queues else 0
        if corrupt:
            typer.echo(f"mailflow: {qt.plural(corrupt, 'corrupt message')} not shown (--queue corrupt)", err=True)

    _tools(command, config, work)


@queue_app.command("list")
def queue_list(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
               as_json: bool = JsonOption,
               queue: Optional[str] = typer.Option(None, "--queue", metavar="Q[,Q…]",
                                                   help="queues to list (default incoming,active,deferred,hold; "
                                                        "corrupt, or all)"),
               sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
               older_than: Optional[str] = OlderThanOption) -> None:
    """The queue in Postfix mailq layout: * active, ! on hold; each pending recipient under its last reason."""
    _list("list", ids, config, as_json, queue, sender, to_domain, older_than)


@app.command("mailq")
def mailq(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
          as_json: bool = JsonOption,
          queue: Optional[str] = typer.Option(None, "--queue", metavar="Q[,Q…]", help="queues to list"),
          sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
          older_than: Optional[str] = OlderThanOption) -> None:
    """Same as `mailflow queue list`."""
    _list("list", ids, config, as_json, queue, sender, to_domain, older_than)


@queue_app.command("show")
def queue_show(queue_id: str = typer.Argument(..., metavar="QUEUE_ID"), config: Optional[str] = ConfigOption,
               headers_only: bool = typer.Option(False, "--headers-only", help="the envelope and headers only"),
               as_json: bool = JsonOption) -> None:
    """One message like postcat -q: envelope, every recipient's status, then headers and body."""
    from mailflow import queue_tools as qt

    try:
        qid = qt.clean_id(queue_id)
    except qt.SelectionError as e:
        _fail("show", str(e), 2)

    async def work(store):
        detail = await store.message_detail(qid)
        if detail is None:
            _fail("show", f"{qid}: no such message in the queue", 1)
        recipients = (await store.recipients_of([qid])).get(qid, [])
        content = await store.content(qid)
        if as_json:
            qt.write_show_json(sys.stdout, detail, recipients, content, headers_only)
        else:
            qt.write_show(sys.stdout, detail, recipients, content, headers_only, time.time())

    _tools("show", config, work)


def _act(name: str, ids, config, sender, to_domain, older_than, *, required: bool = True) -> None:
    from mailflow import queue_tools as qt

    action = qt.ACTIONS[name]
    selection = _selection(name, ids, sender, to_domain, older_than, required=required)

    async def work(store):
        done, missed = await qt.apply(store, action, selection, time.time(), sys.stderr)
        for qid in missed:
            typer.echo(f"mailflow queue {name}: {qid}: not in the {qt.either(action.sources)} queue", err=True)
        typer.echo(f"{name}: {qt.plural(done, 'message')}")

    _tools(name, config, work)


# The commands that change the queue differ only in their action and help text.
_ACTION_COMMANDS = (
    ("flush", "Make deferred mail due now (all of it unless ids or selectors narrow it), like postqueue -f.", False),
    ("hold", "Put mail on hold (postsuper -h): incoming, deferred and active mail stop being delivered.", True),
    ("release", "Release held mail (postsuper -H): it becomes deferred and due now.", True),
    ("requeue", "Requeue mail (postsuper -r): incoming, deferred or held mail becomes incoming, due now, "
                "routed afresh.", True),
    ("delete", "Delete mail from any queue (postsuper -d). No bounce is sent.", True),
)


def _action_command(name: str, help_text: str, required: bool) -> None:
    def command(ids: Optional[List[str]] = IdsArgument, config: Optional[str] = ConfigOption,
                sender: Optional[str] = FromOption, to_domain: Optional[str] = ToDomainOption,
                older_than: Optional[str] = OlderThanOption) -> None:
        _act(name, ids, config, sender, to_domain, older_than, required=required)

    command.__name__ = f"queue_{name}"
    command.__doc__ = help_text
    queue_app.command(name)(command)


for _name, _help, _required in _ACTION_COMMANDS:
    _action_command(_name, _help, _required)


@queue_app.command("shape")
def queue_shape(config: Optional[str] = ConfigOption,
                queue: str = typer.Option("incoming,active,deferred", "--queue", metavar="Q[,Q…]",
                                          help="queues to count (incoming, active, deferred, hold, corrupt; all)"),
                top: int = typer.Option(20, "--top", min=0, help="how many domains to show (0: all)"),
                as_json: bool = JsonOption) -> None:
    """Pending recipients by domain and age in minutes, like qshape: T is the total, each column counts ages
    below its label."""
    import json

    from mailflow import queue_tools as qt

    queues = _queues("shape", queue)

    async def work(store):
        counts = await store.shape_counts(queues, time.time(), qt.shape_limits())
        total, domains = qt.shape_rows(counts, top)
        if as_json:
            sys.stdout.write(json.dumps(qt.shape_json(queues, total, domains), indent=2) + "\n")
        else:
            sys.stdout.write(qt.format_shape(total, domains))

    _tools("shape", config, work)


@queue_app.command("destinations")
def queue_destinations(config: Optional[str] = ConfigOption, as_json: bool = JsonOption) -> None:
    """What qmgr last said of each destination (transport, nexthop): window, load, failures, dead timer."""
    import json

    from mailflow import queue_tools as qt

    async def work(store):
        rows = await store.destination_rows()
        if as_json:
            sys.stdout.write(json.dumps(qt.destinations_json(rows), indent=2) + "\n")
        elif not rows:
            typer.echo("no destination state yet (is the server running?)")
        else:
            sys.stdout.write(qt.format_destinations(rows, time.time()))

    _tools("destinations", config, work)


# ---------------------------------------------------------------------------------------------- table

table_app = typer.Typer(no_args_is_help=True, help="Query lookup tables (texthash, inline, static, regexp, "
                        "sqlite, fail) the way the server sees them, like postmap -q.")
app.add_typer(table_app, name="table")


@table_app.command("query")
def table_query(spec: str = typer.Argument(..., metavar="TYPE:NAME", help="the table, e.g. texthash:/etc/virtual"),
                keys: List[str] = typer.Argument(..., metavar="KEY", help="keys to look up, as given")) -> None:
    """Print each key's value (key<TAB>value when several keys). Exit 1 when none is found, 2 for a bad
    table, 75 (EX_TEMPFAIL) when a lookup fails."""
    from mailflow.errors import LookupRetry
    from mailflow.tables import open_table

    try:
        table = open_table(spec)
    except ConfigError as e:
        where = f"{e.file}: {e.key}" if e.file else e.key
        _fail_table(f"{where}: {e.reason}", 2)
    found = 0
    for key in keys:
        try:
            value = table.lookup(key)
        except LookupRetry as e:
            _fail_table(f"{key}: lookup failed: {e.text}", 75)
        if value is not None:
            found += 1
            typer.echo(f"{key}\t{value}" if len(keys) > 1 else value)
    if not found:
        raise typer.Exit(1)


def _fail_table(message: str, code: int) -> None:
    typer.echo(f"mailflow table query: {message}", err=True)
    raise typer.Exit(code)


config_app = typer.Typer(no_args_is_help=True, help="Show the configuration (postconf).")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: Optional[str] = ConfigOption,
                changed: bool = typer.Option(False, "-n", "--changed", help="only settings that differ from the defaults (postconf -n)"),
                defaults: bool = typer.Option(False, "-d", "--defaults", help="the built-in defaults (postconf -d)"),
                names: Optional[List[str]] = typer.Argument(None, metavar="[SETTING]...",
                                                            help="only these settings (e.g. relayhost queue.active_limit)")) -> None:
    """Every setting as `key = value` (valid TOML), like postconf; `-n` what the file changes, `-d` the defaults."""
    from mailflow.config import show_settings

    lines = show_settings(_load(config), defaults=defaults, changed_only=changed)
    if names:
        wanted = {n: [line for line in lines if line.split(" = ", 1)[0] == n] for n in names}
        unknown = [n for n, found in wanted.items() if not found]
        if unknown and not changed:
            typer.echo(f"mailflow config show: unknown setting: {', '.join(unknown)}", err=True)
            raise typer.Exit(2)
        lines = [line for found in wanted.values() for line in found]
    for line in lines:
        typer.echo(line)


@app.command("address")
def address_test(addresses: List[str] = typer.Argument(..., metavar="ADDRESS..."),
                 config: Optional[str] = ConfigOption) -> None:
    """How each address would be routed, step by step (like sendmail -bv / exim -bt): the RCPT verdict,
    canonical and virtual alias rewriting, class, transport, next hop, local aliases and .forward, and
    where forwarded copies go. Exit 75 when a table or file cannot be read now."""
    from mailflow.errors import DeliveryError
    from mailflow.routing.router import Router

    cfg = _load(config)
    try:
        router = Router(cfg)
    except ConfigError as e:
        typer.echo(f"mailflow address: {e.key}: {e.reason}", err=True)
        raise typer.Exit(2)
    for n, addr in enumerate(addresses):
        if n:
            typer.echo("")
        try:
            steps = router.explain(addr)
        except DeliveryError as e:
            typer.echo(f"mailflow address: {addr}: {e.dsn} {e.text}", err=True)
            raise typer.Exit(75)
        for depth, label, text in steps:
            typer.echo(f"{'  ' * depth}{label + ':':<{max(16 - 2 * depth, len(label) + 1)}} {text}")


# ---------------------------------------------------------------------------------------------- auth

auth_app = typer.Typer(no_args_is_help=True, help="AUTH users for smtpd.sasl_user_maps.")
app.add_typer(auth_app, name="auth")


@auth_app.command("hash-password")
def auth_hash_password(user: Optional[str] = typer.Argument(None, help="print a `user hash` line for the table"),
                       stdin: bool = typer.Option(False, "--stdin", help="read the password from standard input")) -> None:
    """Print a scrypt password hash ($scrypt$n=16384,r=8,p=1$SALT$HASH); asks for the password twice."""
    from mailflow.stages.smtpd.auth import hash_password

    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        typer.echo("mailflow auth hash-password: empty password", err=True)
        raise typer.Exit(2)
    encoded = hash_password(password)
    typer.echo(f"{user} {encoded}" if user else encoded)


# ---------------------------------------------------------------------------------------------- sendmail


@app.command("sendmail", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sendmail_command(ctx: typer.Context) -> None:
    """Sendmail-compatible local submission (docs/sendmail.md): -t -i -f -F -N -bs -bp -bv -bi -q -v …"""
    raise typer.Exit(run_sendmail(list(ctx.args)))


def run_sendmail(args: list[str]) -> int:
    """`mailflow sendmail ARGS` (also reached as `sendmail`, `mailq`, `newaliases` through a link): deliver and
    -bs are mailflow/sendmail.py; -bp, -q and -bv are the queue list, queue flush and address commands."""
    from mailflow import sendmail as sm

    try:
        opts = sm.parse_args(args)
    except sm.UsageError as e:
        typer.echo(f"sendmail: {e}\n{sm.USAGE}", err=True)
        return sm.EX_USAGE
    if opts.mode == "help":
        typer.echo(sm.HELP)
        return 0
    config = sm.config_path(opts)
    try:
        if opts.mode == "mailq":
            _list("list", None, config, False, None, None, None, None)
        elif opts.mode == "flush":
            _act("flush", None, config, None, opts.flush_site or None, None, required=False)
        elif opts.mode == "verify":
            if not opts.recipients:
                typer.echo(f"sendmail: -bv needs addresses\n{sm.USAGE}", err=True)
                return sm.EX_USAGE
            address_test(opts.recipients, config)
        elif opts.mode == "newaliases":
            problems = [p for p in _table_problems(_load(config)) if p.startswith("alias_maps")]
            for problem in problems:
                typer.echo(f"newaliases: {problem}", err=True)
            return 75 if problems else 0  # mailflow reads alias files directly: nothing to rebuild
        else:
            return sm.run(opts, _load(config), sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    except typer.Exit as e:
        return 78 if e.exit_code == 2 and opts.mode in ("deliver", "smtp") else e.exit_code  # EX_CONFIG
    return 0


def main() -> None:
    from mailflow.sendmail import program_mode

    extra = program_mode(sys.argv[0])
    if extra is not None:  # invoked as sendmail, mailq or newaliases (a link to this program)
        sys.exit(run_sendmail(extra + sys.argv[1:]))
    if sys.argv[1:2] == ["sendmail"]:  # before typer, so that "--" and Sendmail's option syntax stay intact
        sys.exit(run_sendmail(sys.argv[2:]))
    app(prog_name="mailflow")


if __name__ == "__main__":
    sys.exit(main())
