"""The command table of `mailflow …` (typer): each command is a function of the module that does the work
(mailflow/cli/__init__.py describes the commands). Loaded by `main()` for every command but `sendmail` (and the
sendmail, mailq and newaliases names), which is dispatched before typer and this table are imported.
"""
from __future__ import annotations

import sys

import typer

from mailflow.cli import accounts, deliverability, ops, queue, server, submit
from mailflow.logs import tool_warnings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mailflow: a mail server in one asyncio process.")


@app.callback()
def command_warnings(ctx: typer.Context) -> None:
    """The warnings and errors the code under a command logs (a store's missing content file, a table lookup that
    failed) go to stderr as `mailflow queue show: warning: TEXT`, printable, while it runs, as the command's own
    errors do; they went through Python's last-resort handler, raw. Not for `serve`, whose logging is its own
    (setup_logging)."""
    if ctx.invoked_subcommand in (None, "serve", "sendmail"):
        return
    ctx.with_resource(tool_warnings(command_path(ctx, sys.argv[1:])))


def command_path(ctx: typer.Context, argv: list[str]) -> str:
    """`mailflow queue show`: the command words that start `argv`, as far as they name commands of the table (the
    subcommand the root callback knows, when argv is not this command line's)."""
    words, command = ["mailflow"], ctx.command
    for word in argv:
        found = command.get_command(ctx, word) if hasattr(command, "get_command") else None
        if found is None:
            break
        words.append(word)
        command = found
    return " ".join(words) if len(words) > 1 else f"mailflow {ctx.invoked_subcommand}"
queue_app = typer.Typer(no_args_is_help=True, help="Inspect and change the mail queue (mailq, postsuper, "
                        "postcat, qshape); works with or without a running server.")
table_app = typer.Typer(no_args_is_help=True, help="Query lookup tables (texthash, inline, static, regexp, "
                        "pcre, cidr, sqlite, accounts, unix, fail) the way the server sees them, like postmap -q "
                        "and -s (postalias with --aliases).")
config_app = typer.Typer(no_args_is_help=True, help="Show the configuration (postconf), check it (postfix check; "
                         "the same as check-config) or import a Postfix main.cf and master.cf.")
auth_app = typer.Typer(no_args_is_help=True, help="AUTH users for smtpd.sasl_user_maps.")
account_app = typer.Typer(no_args_is_help=True, help="The account database: hosted domains, mailboxes, aliases and "
                          "sender logins for AUTH, delivery and Dovecot (docs/accounts.md).")
dkim_app = typer.Typer(no_args_is_help=True, help="DKIM keys for dkim.key_table (opendkim-genkey).")

app.command()(server.serve)
app.command()(ops.reload)
app.command()(ops.status)
app.command()(ops.health)
app.command("check-config")(server.check_config)
app.command()(server.version)
app.add_typer(queue_app, name="queue")
queue_app.command("list")(queue.queue_list)
app.command("mailq")(queue.mailq)
queue_app.command("show")(queue.queue_show)
for _name, _help, _required in queue.ACTION_COMMANDS:
    queue_app.command(_name)(queue.action_command(_name, _help, _required))
queue_app.command("shape")(queue.queue_shape)
queue_app.command("destinations")(queue.queue_destinations)
app.add_typer(table_app, name="table")
table_app.command("query")(server.table_query)
table_app.command("dump")(server.table_dump)
app.add_typer(config_app, name="config")
config_app.command("show")(server.config_show)
config_app.command("check")(server.check_config)
config_app.command("import")(server.config_import)
app.command("address")(server.address_test)
app.add_typer(auth_app, name="auth")
auth_app.command("hash-password")(server.auth_hash_password)
app.add_typer(account_app, name="account")
account_app.command("init")(accounts.init)
for _noun, _verbs in (("domain", ("add", "remove", "list")),
                      ("user", ("add", "remove", "list", "passwd", "disable", "enable", "quota")),
                      ("alias", ("add", "remove", "list")), ("sender", ("add", "remove", "list"))):
    _plural = "Aliases" if _noun == "alias" else f"{_noun.capitalize()}s"
    _group = typer.Typer(no_args_is_help=True, help=f"{_plural} of the account database.")
    account_app.add_typer(_group, name=_noun)
    for _verb in _verbs:
        _group.command(_verb)(getattr(accounts, f"{_noun}_{_verb}"))
app.command("dovecot-config")(accounts.dovecot_config)
app.add_typer(dkim_app, name="dkim")
dkim_app.command("keygen")(deliverability.dkim_keygen)
app.command("dns-records")(deliverability.dns_records)
app.command("check-deliverability")(deliverability.check_deliverability)


@app.command("sendmail", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sendmail_command(ctx: typer.Context) -> None:
    """Sendmail-compatible local submission (docs/sendmail.md): -t -i -f -F -N -bs -bp -bv -bi -q -v …"""
    raise typer.Exit(submit.run_sendmail(list(ctx.args)))
