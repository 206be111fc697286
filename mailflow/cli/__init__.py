"""The command line: `mailflow serve | reload | health | check-config | version | queue … | mailq | table | config
show|check|import | address | auth | account … | dovecot-config | dkim keygen | dns-records | check-deliverability |
sendmail`.
No logic of its own: each command calls the module that does the work.

Configuration comes from `--config FILE`, else `$MAILFLOW_CONFIG`, else the embedded defaults. A bad
configuration prints `mailflow: FILE: KEY: REASON` and exits 2 (common.py holds the one formatter); never a
traceback. `serve` exits 1 when it cannot start: a listen address taken, or another server running on the same
queue (named by its pid).

`mailflow queue …` (list, show, flush, hold, release, requeue, delete, shape, destinations) opens the queue
database the configuration names directly, whether or not `serve` runs; the work is in queue_tools.py.
A command line that does not say which messages exits 2; an unknown queue id for `show` exits 1.

`mailflow sendmail …` (also `sendmail`, `mailq`, `newaliases` through links) is the Sendmail-compatible local
submission command (mailflow/sendmail/, docs/sendmail.md); its exit codes are sysexits values.

`mailflow table query TYPE:NAME KEY…` answers like `postmap -q` (mailflow.tables; `-` reads the keys from standard
input, as `postmap -q -` does): exit 1 when nothing is found,
2 for a bad table spec, 75 (EX_TEMPFAIL) when a lookup fails.

The package: common.py (configuration loading and errors, shared options), server.py (serve, check-config,
version, config show, address, table query, auth), ops.py (reload, health: against a running server), queue.py (the
queue tools), submit.py (sendmail), accounts.py (`account …`, the account database, and `dovecot-config`),
deliverability.py (dkim keygen, dns-records, check-deliverability; docs/deliverability.md). This file
is the command table. Modules only some commands need (the server, the store, the router, smtpd's password
hashing) are imported inside those commands, so that `sendmail`, run once per message by scripts, starts fast.
"""
from __future__ import annotations

import sys

import typer

from mailflow.cli import accounts, deliverability, ops, queue, server, submit
from mailflow.sendmail import program_mode

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mailflow: a mail server in one asyncio process.")
queue_app = typer.Typer(no_args_is_help=True, help="Inspect and change the mail queue (mailq, postsuper, "
                        "postcat, qshape); works with or without a running server.")
table_app = typer.Typer(no_args_is_help=True, help="Query lookup tables (texthash, inline, static, regexp, "
                        "cidr, sqlite, accounts, unix, fail) the way the server sees them, like postmap -q.")
config_app = typer.Typer(no_args_is_help=True, help="Show the configuration (postconf), check it (postfix check; "
                         "the same as check-config) or import a Postfix main.cf and master.cf.")
auth_app = typer.Typer(no_args_is_help=True, help="AUTH users for smtpd.sasl_user_maps.")
account_app = typer.Typer(no_args_is_help=True, help="The account database: hosted domains, mailboxes, aliases and "
                          "sender logins for AUTH, delivery and Dovecot (docs/accounts.md).")
dkim_app = typer.Typer(no_args_is_help=True, help="DKIM keys for dkim.key_table (opendkim-genkey).")

app.command()(server.serve)
app.command()(ops.reload)
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
app.command("sendmail", add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(submit.sendmail_command)

run_sendmail = submit.run_sendmail


def main() -> None:
    extra = program_mode(sys.argv[0])
    if extra is not None:  # invoked as sendmail, mailq or newaliases (a link to this program)
        sys.exit(run_sendmail(extra + sys.argv[1:]))
    if sys.argv[1:2] == ["sendmail"]:  # before typer, so that "--" and Sendmail's option syntax stay intact
        sys.exit(run_sendmail(sys.argv[2:]))
    app(prog_name="mailflow")


if __name__ == "__main__":
    main()
