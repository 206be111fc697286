"""`mailflow account …` (the account database: docs/accounts.md) and `mailflow dovecot-config`.

    account init                                   create the database; print the settings that use it
    account domain add|remove|list
    account user add|remove|list|passwd|disable|enable|quota
    account alias add|remove|list
    account sender add|remove|list                 which addresses a mailbox may use as MAIL FROM
    dovecot-config [--sql]                         Dovecot's configuration for the database (mailflow.accounts.dovecot)

The database is `--database`, else `[accounts] database_file`, else `<queue_directory>/accounts.db`; a running
server sees each change within a second (mailflow.tables.accounts), without a restart. Passwords come from a prompt
(asked twice) or, with `--password-stdin`, from the first line of standard input; never from an argument.
`--json` prints the result as JSON.

Exit codes: 0 done; 1 the database refuses (unknown domain or user, duplicate, domain still in use, no database);
2 bad input (address syntax, weak password, bad size, bad configuration); 75 the database is locked or cannot be
written now (EX_TEMPFAIL). Errors go to standard error as `mailflow account: MESSAGE` (`{"error": …}` with --json).
"""
from __future__ import annotations

import grp
import json
import pwd
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, NoReturn, Optional

import typer

from mailflow.accounts import dovecot
from mailflow.cli.common import ConfigOption, JsonOption, load
from mailflow.config import Config
from mailflow.errors import ConfigError, LookupRetry
from mailflow.tables import open_table

if TYPE_CHECKING:
    from mailflow.accounts.database import AccountDatabase

DatabaseOption = typer.Option(None, "--database", "-d", metavar="FILE",
                              help="the account database (default: [accounts] database_file, else "
                                   "<queue_directory>/accounts.db)")
PasswordStdin = typer.Option(False, "--password-stdin", help="read the password from the first line of standard "
                             "input instead of asking")
PREFIX = "mailflow account"


def database_path(cfg: Config, option: Optional[str] = None) -> Path:
    if option:
        return Path(option).absolute()
    return cfg.accounts_path


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    typer.echo(json.dumps({"error": message, "code": code}) if as_json else f"{PREFIX}: {message}", err=True)
    raise typer.Exit(code)


class _Session:
    """One command's database, opened from the configuration; AccountError -> message and exit code."""

    def __init__(self, config: Optional[str], database: Optional[str], as_json: bool, *, create: bool = False):
        self.cfg = load(config)
        self.as_json = as_json
        self._path = database_path(self.cfg, database)
        self._create = create
        self.db: AccountDatabase = None  # type: ignore[assignment]  # opened by __enter__

    def __enter__(self):
        from mailflow.accounts.database import AccountDatabase, AccountError

        self._error = AccountError
        try:
            self.db = AccountDatabase.open(self._path, create=self._create)
        except AccountError as e:
            _fail(e.message, e.code, self.as_json)
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self.db is not None:
            self.db.close()
        if isinstance(error, self._error):
            _fail(error.message, error.code, self.as_json)

    def password(self, address: str, from_stdin: bool) -> str:
        from mailflow.accounts.database import EX_INPUT, check_password

        if from_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = typer.prompt(f"Password for {address}", hide_input=True, confirmation_prompt=True)
        problem = check_password(password, address, self.cfg.accounts.password_min_length)
        if problem:
            _fail(f"password for {address} refused: {problem}", EX_INPUT, self.as_json)
        return password

    def say(self, text: str, data: object) -> None:
        typer.echo(json.dumps(data, indent=2) if self.as_json else text)


def _size(text: str, as_json: bool) -> int:
    from mailflow.accounts.database import AccountError, parse_size

    try:
        return parse_size(text)
    except AccountError as e:
        _fail(e.message, e.code, as_json)


# ---------------------------------------------------------------------------------------------- init


def init(config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
         as_json: bool = JsonOption) -> None:
    """Create the account database (if missing) and print the settings that make mailflow use it."""
    with _Session(config, database, as_json, create=True) as s:
        path = s.db.path
        settings = {
            "virtual_mailbox_domains": [f"accounts:{path}#domains"],
            "virtual_mailbox_maps": [f"accounts:{path}#mailboxes"],
            "virtual_alias_maps": [f"accounts:{path}#aliases"],
            "virtual_mailbox_limit_maps": [f"accounts:{path}#quotas"],
            "smtpd.sasl_user_maps": [f"accounts:{path}#passwords"],
            "smtpd.sender_login_maps": [f"accounts:{path}#senders"],
        }
        lines = [f"# {path}: add these settings to the configuration (see docs/accounts.md)"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items() if "." not in k]
        lines += ["", "[smtpd]"] + [f"{k.split('.')[1]} = {json.dumps(v)}" for k, v in settings.items() if "." in k]
        s.say("\n".join(lines), {"database": str(path), "settings": settings})


# ---------------------------------------------------------------------------------------------- domains


def domain_add(domain: str = typer.Argument(..., help="e.g. example.com"), config: Optional[str] = ConfigOption,
               database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """Host a domain (its mailboxes and aliases live in the database). Creates the database if needed."""
    with _Session(config, database, as_json, create=True) as s:
        name = s.db.add_domain(domain)
        s.say(f"domain {name} added", {"domain": name, "added": True})


def domain_remove(domain: str = typer.Argument(...), config: Optional[str] = ConfigOption,
                  database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """Stop hosting a domain: refused while it has mailboxes or aliases."""
    with _Session(config, database, as_json) as s:
        name = s.db.remove_domain(domain)
        s.say(f"domain {name} removed", {"domain": name, "removed": True})


def domain_list(config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
                as_json: bool = JsonOption) -> None:
    """The hosted domains."""
    with _Session(config, database, as_json) as s:
        domains = s.db.list_domains()
        s.say("\n".join(domains), domains)


# ---------------------------------------------------------------------------------------------- users


def _user_line(user) -> str:
    quota = f"quota {user.quota}" if user.quota else "no quota"
    return f"{user.address}\t{'enabled' if user.enabled else 'disabled'}\t{quota}\t{user.home}/"


def user_add(address: str = typer.Argument(..., help="local@domain (the domain must be hosted)"),
             quota: str = typer.Option("0", "--quota", help="bytes, or 500M, 1G (0: none)"),
             password_stdin: bool = PasswordStdin, config: Optional[str] = ConfigOption,
             database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """Create a mailbox: its login (the address) and password for SMTP AUTH, IMAP and POP3."""
    with _Session(config, database, as_json) as s:
        size = _size(quota, as_json)
        address = s.db.check_new_user(address)
        user = s.db.add_user(address, s.password(address, password_stdin), quota=size)
        s.say(f"user {user.address} added (mailbox {user.home}/Maildir/)", user.as_dict())


def user_remove(address: str = typer.Argument(...), config: Optional[str] = ConfigOption,
                database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """Delete a mailbox's account: mail to it is refused (550 5.1.1); its Maildir files stay on disk."""
    with _Session(config, database, as_json) as s:
        user = s.db.remove_user(address)
        s.say(f"user {user.address} removed (its mail stays in {user.home}/)", {**user.as_dict(), "removed": True})


def user_list(domain: Optional[str] = typer.Argument(None), config: Optional[str] = ConfigOption,
              database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """The mailboxes (of one domain): address, enabled, quota, home."""
    with _Session(config, database, as_json) as s:
        users = s.db.list_users(domain)
        s.say("\n".join(_user_line(u) for u in users), [u.as_dict() for u in users])


def user_passwd(address: str = typer.Argument(...), password_stdin: bool = PasswordStdin,
                config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
                as_json: bool = JsonOption) -> None:
    """Set a new password (the old one stops working for SMTP, IMAP and POP3)."""
    with _Session(config, database, as_json) as s:
        user = s.db.set_password(s.db.get_user(address).address, s.password(address, password_stdin))
        s.say(f"password of {user.address} changed", {**user.as_dict(), "password_changed": True})


def user_disable(address: str = typer.Argument(...), config: Optional[str] = ConfigOption,
                 database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """No more logins (SMTP AUTH, IMAP, POP3); mail still arrives."""
    with _Session(config, database, as_json) as s:
        user = s.db.set_enabled(address, False)
        s.say(f"user {user.address} disabled", user.as_dict())


def user_enable(address: str = typer.Argument(...), config: Optional[str] = ConfigOption,
                database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """Allow logins again."""
    with _Session(config, database, as_json) as s:
        user = s.db.set_enabled(address, True)
        s.say(f"user {user.address} enabled", user.as_dict())


def user_quota(address: str = typer.Argument(...),
               size: str = typer.Argument(..., help="bytes, or 500M, 1G (0: none)"),
               config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
               as_json: bool = JsonOption) -> None:
    """Set a mailbox's quota (enforced at delivery: over it, mail bounces 5.2.2)."""
    with _Session(config, database, as_json) as s:
        user = s.db.set_quota(address, _size(size, as_json))
        s.say(f"quota of {user.address}: {user.quota or 'none'}", user.as_dict())


# ---------------------------------------------------------------------------------------------- aliases


def alias_add(address: str = typer.Argument(..., help="local@domain, or @domain for a catch-all"),
              targets: List[str] = typer.Argument(..., metavar="TARGET...", help="addresses mail goes to"),
              config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
              as_json: bool = JsonOption) -> None:
    """Send mail for an address (or every unknown address of a domain) to other addresses."""
    with _Session(config, database, as_json) as s:
        alias = s.db.add_alias(address, targets)
        s.say(f"{alias.address} -> {', '.join(alias.targets)}", alias.as_dict())


def alias_remove(address: str = typer.Argument(...),
                 targets: Optional[List[str]] = typer.Argument(None, metavar="[TARGET]...",
                                                               help="only these targets (default: all)"),
                 config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
                 as_json: bool = JsonOption) -> None:
    """Remove an alias, or some of its targets."""
    with _Session(config, database, as_json) as s:
        alias = s.db.remove_alias(address, targets or ())
        s.say(f"alias {alias.address} changed", {**alias.as_dict(), "removed": list(targets or alias.targets)})


def alias_list(domain: Optional[str] = typer.Argument(None), config: Optional[str] = ConfigOption,
               database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """The aliases (of one domain)."""
    with _Session(config, database, as_json) as s:
        aliases = s.db.list_aliases(domain)
        s.say("\n".join(f"{a.address}\t{', '.join(a.targets)}" for a in aliases), [a.as_dict() for a in aliases])


# ---------------------------------------------------------------------------------------------- sender logins


def sender_add(login: str = typer.Argument(..., help="the mailbox that logs in"),
               sender: str = typer.Argument(..., help="an address (or @domain) it may use as MAIL FROM"),
               config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
               as_json: bool = JsonOption) -> None:
    """Let a mailbox send as another address (smtpd.sender_login_maps; each mailbox owns its own address)."""
    with _Session(config, database, as_json) as s:
        owned, user = s.db.add_sender(login, sender)
        s.say(f"{user} may send as {owned}", {"login": user, "sender": owned})


def sender_remove(login: str = typer.Argument(...), sender: str = typer.Argument(...),
                  config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
                  as_json: bool = JsonOption) -> None:
    """Take back a sender address from a mailbox."""
    with _Session(config, database, as_json) as s:
        owned, user = s.db.remove_sender(login, sender)
        s.say(f"{user} may no longer send as {owned}", {"login": user, "sender": owned, "removed": True})


def sender_list(login: Optional[str] = typer.Argument(None), config: Optional[str] = ConfigOption,
                database: Optional[str] = DatabaseOption, as_json: bool = JsonOption) -> None:
    """The extra sender addresses (of one mailbox)."""
    with _Session(config, database, as_json) as s:
        pairs = s.db.list_senders(login)
        s.say("\n".join(f"{user}\t{owned}" for owned, user in pairs),
              [{"login": user, "sender": owned} for owned, user in pairs])


# ---------------------------------------------------------------------------------------------- dovecot


def _static_id(cfg: Config, setting: str, option: Optional[int]) -> int:
    """--uid/--gid, else what a `static:N` virtual_uid_maps / virtual_gid_maps gives."""
    if option is not None:
        return option
    specs = getattr(cfg, setting)
    try:
        values = {open_table(spec).lookup("any@mailbox.invalid") for spec in specs}
    except (ConfigError, LookupRetry):
        values = set()
    value = next(iter(values)) if len(values) == 1 else None
    if value is not None and value.strip().isdigit():
        return int(value.strip())
    _fail(f"Dovecot needs one owner for every Maildir: set {setting} = [\"static:N\"] (N not 0: Dovecot refuses "
          f"root for mail) or give --{setting.split('_')[1]}", 2, False)


def _primary_group(user: str) -> str:
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        return user


def dovecot_config(config: Optional[str] = ConfigOption, database: Optional[str] = DatabaseOption,
                   sql: bool = typer.Option(False, "--sql", help="print the sql driver's file instead"),
                   sql_file: str = typer.Option("/etc/dovecot/mailflow-sql.conf.ext", "--sql-file",
                                                help="where the --sql output is kept (dovecot.conf names it)"),
                   uid: Optional[int] = typer.Option(None, "--uid", help="mail owner (default: virtual_uid_maps)"),
                   gid: Optional[int] = typer.Option(None, "--gid", help="mail group (default: virtual_gid_maps)"),
                   ssl_cert: Optional[str] = typer.Option(None, "--ssl-cert", help="default: smtpd.tls_cert_file"),
                   ssl_key: Optional[str] = typer.Option(None, "--ssl-key", help="default: smtpd.tls_key_file"),
                   listen: str = typer.Option("*, ::", "--listen", help="addresses of the IMAP/POP3 listeners"),
                   imap_port: int = typer.Option(143, "--imap-port"),
                   imaps_port: int = typer.Option(993, "--imaps-port"),
                   pop3_port: int = typer.Option(110, "--pop3-port"),
                   pop3s_port: int = typer.Option(995, "--pop3s-port"),
                   base_dir: str = typer.Option("/run/dovecot", "--base-dir", help="Dovecot's sockets"),
                   state_dir: str = typer.Option("", "--state-dir", help="default: Dovecot's"),
                   log_path: str = typer.Option("", "--log-path", help="default: syslog"),
                   socket_user: str = typer.Option("root", "--socket-user",
                                                   help="the user mailflow runs as (owns the auth and LMTP "
                                                        "sockets)")) -> None:
    """Print a Dovecot 2.3 configuration serving the account database's mailboxes over IMAP and POP3 (with
    TLS), with an auth socket for smtpd.sasl_type = "dovecot" and an LMTP socket for mailflow."""
    cfg = load(config)
    cert = ssl_cert or cfg.smtpd.tls_cert_file
    if not cert:
        _fail("Dovecot needs a certificate: set smtpd.tls_cert_file or give --ssl-cert", 2, False)
    settings = dovecot.DovecotSettings(
        database=database_path(cfg, database), mail_base=Path(cfg.virtual_mailbox_base).absolute(),
        uid=_static_id(cfg, "virtual_uid_maps", uid), gid=_static_id(cfg, "virtual_gid_maps", gid),
        sql_file=Path(sql_file), ssl_cert=cert, ssl_key=ssl_key or cfg.smtpd.tls_key_file or cert,
        listen=listen, imap_port=imap_port, imaps_port=imaps_port, pop3_port=pop3_port, pop3s_port=pop3s_port,
        base_dir=base_dir, state_dir=state_dir, log_path=log_path, socket_user=socket_user,
        socket_group=_primary_group(socket_user))
    if settings.uid == 0:
        _fail("the mail owner cannot be root (Dovecot refuses uid 0 for mail)", 2, False)
    typer.echo(dovecot.render_sql(settings) if sql else dovecot.render_config(settings), nl=False)

