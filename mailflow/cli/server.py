"""The commands about the server and its configuration: serve, check-config, version, config show, address,
table query, auth hash-password. Each is a plain function; `mailflow.cli` registers them.

    serve(config, sink)      run until SIGTERM/SIGINT (`--sink` or [sink] enable: as a capture server, its queue
                             in a temporary directory); exit 2 for a configuration problem (the log file, a table
                             spec found while building the stages), 1 when it cannot start (an address taken, the
                             queue held by another server, named by its pid); SIGHUP reloads the same file; the
                             file descriptor limit raised to the hard limit first (`ensure_descriptors`)
    check_config(config)     validate, then read every file-backed table, the DKIM tables and keys (ARC's too), the
                             SRS secrets, the admin tokens, each listener's certificate and key, and the log
                             file's place: exit 2
                             listing each one that cannot be used (`FILE: KEY: REASON`), else print the listeners
    listener_summary(cfg)    (address, port, role) of every listener
    table_problems(cfg)      a ConfigError (file, setting, reason) per file-backed table that cannot answer now
    config_show(...)         postconf's views (mailflow.config.show.settings_view; `-h` the values alone); a
                             name that is no setting: a warning, exit 0, as postconf
    address_test(addresses, config)   how each address is routed, with the TLS policy of each SMTP next hop (exit
                             75 when a table cannot answer now)
    table_query(spec, keys, aliases)  postmap -q (`-`: the keys from standard input; --aliases: postalias -q,
                             an aliases(5) file): exit 1 nothing found, 2 bad table, 75 a lookup failed
    table_dump(spec, aliases)         postmap -s / postalias -s: every entry of a texthash: or inline: table;
                             exit 1 for a type that cannot list them
    auth_hash_password(user, stdin)   a scrypt hash for smtpd.sasl_user_maps

Failure behaviour: configuration problems through `common.fail_config`; never a traceback.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional

import typer

from mailflow import __version__
from mailflow.capture.settings import capture_server
from mailflow.bounce_templates import load_templates
from mailflow.cli.deliverability import tls_steps
from mailflow.cli.common import (ConfigOption, config_error_text, config_name, config_path, fail, fail_config,
                                     load)
from mailflow.config_source import MAX_FILE_BYTES
from mailflow.config import BUILTIN_TRANSPORTS, Config, LmtpConfig, SmtpConfig, flat_settings, load_config
from mailflow.config.base import transport_name
from mailflow.config.postfix_cf import printable
from mailflow.config.postfix_import import UnreadableFile, import_postfix
from mailflow.config.show import bare_value, format_setting, settings_view
from mailflow.config.smtpd import SmtpdConfig
from mailflow.errors import ConfigError, DeliveryError, LookupRetry
from mailflow.logs import printable as masked
from mailflow.logs import setup_logging
from mailflow.queuelock import QueueBusy
from mailflow.restriction_vocabulary import (ACCESS_CHECKS, REVERSE_CLIENT_ACCESS, SERVER_ACCESS_CHECKS, STAGES,
                                             expand)
from mailflow.sendmail.settings import remember_settings
from mailflow.syntax import parse_hostport, table_type
from mailflow.tables import open_table
from mailflow.tables.base import ListedTable, Table
from mailflow.tables.memory import table_entries
from mailflow.tables.check import table_problems as unreadable_tables
if TYPE_CHECKING:
    from mailflow.routing.router import Router


def serve(config: Optional[str] = ConfigOption,
          sink: bool = typer.Option(False, "--sink", help="run as a capture server: accept every recipient and keep "
                                    "each message for the HTTP capture API ([sink], [http]; docs/testing.md)")) -> None:
    """Run the mail server until SIGTERM or SIGINT."""
    from mailflow.app import serve as run

    cfg = load(config)
    path = config_path(config)
    where = config_name(path)
    if sink or cfg.sink.enable:
        with tempfile.TemporaryDirectory(prefix="mailflow-sink-") as queue:  # the capture is in memory
            try:
                cfg = capture_server(cfg, queue)
            except ConfigError as e:
                fail_config("mailflow", e, where)
            _serve(run, cfg, where, lambda: capture_server(load_config(path), queue))
        return
    _serve(run, cfg, where, lambda: remember_settings(path), started=lambda: _remember(path))


def _remember(path: Optional[str]) -> None:
    """The settings of the configuration file as it is now, for sendmail (mailflow/sendmail/settings.py)."""
    try:
        remember_settings(path)
    except ConfigError:  # changed since the server read it: sendmail loads it itself, and says what is wrong
        pass


def _serve(run, cfg: Config, where: str, reread, started=None) -> None:
    """`reread()`: the configuration a reload (SIGHUP, `mailflow reload`) puts in force, read again; `started()`:
    run once the server has started."""
    try:
        setup_logging(cfg.log, cfg.myhostname)
    except OSError as e:
        fail_config("mailflow", ConfigError(where, "log.file", f"cannot open {cfg.log.file}: {e.strerror}"))
    watch = ensure_descriptors(cfg)
    warn_at_start(cfg, where)
    try:
        asyncio.run(run(cfg, reread=reread, where=where, started=started, reloaded=watch.check))
    except QueueBusy as e:  # another server owns this queue: it was left untouched
        fail("mailflow", f"cannot start: {e}", 1)
    except ConfigError as e:  # found while building the stages (e.g. a lookup table spec)
        fail_config("mailflow", e, where)
    except OSError as e:  # typically: the listen address is taken or not ours
        fail("mailflow", f"cannot start: {e}", 1)
    except sqlite3.Error as e:  # the queue database cannot be opened: damaged, locked too long, unreadable
        fail("mailflow", f"cannot start: the queue database {cfg.queue_path / 'queue.db'}: {e}", 1)


def warn_at_start(cfg: Config, where: str) -> None:
    """Logs Config.warnings once, as serve starts, each after the file's name (a reload logs those it brings anew:
    app.reload_logged; check-config prints them)."""
    for warning in cfg.warnings():
        logging.getLogger("mailflow").warning("%s: %s", where, warning)


# the queue database, the log, tables, DNS (two c-ares channels, a few each), the admin server, a reload's new listeners
DESCRIPTOR_RESERVE = 64
NOFILE_CEILING = 1 << 20  # the soft limit asked for when the hard one is unlimited (Linux's default nr_open)


def descriptors_needed(cfg: Config) -> int:
    """What the configuration can hold open at once: each listener's sessions and as many waiting for a slot, the
    clients a postscreen listener screens before that (its pre_queue_limit), two per delivery (its connection or
    file, and its content), the idle sessions each SMTP and LMTP client's connection cache may keep and a
    reserve."""
    sessions = sum(2 * smtpd.max_sessions + (smtpd.postscreen.pre_queue_limit if smtpd.postscreen.enable else 0)
                   for _, _, smtpd, _ in cfg.smtpd.listener_settings())
    return sessions + 2 * cfg.queue.delivery_concurrency_limit + idle_sessions_cached(cfg) + DESCRIPTOR_RESERVE


def idle_sessions_cached(cfg: Config) -> int:
    """The idle SMTP and LMTP sessions the configuration's clients may keep at once: MAX_IDLE for each client whose
    connection cache is on and that mail can reach: [smtp]'s, relay's ([smtp]'s settings under its own name, unless
    an [smtp.services.relay] takes its place) and [lmtp]'s when `routed_transports` has them, each
    [smtp.services.NAME]'s and [lmtp.services.NAME]'s always (a service is defined to be used: a FILTER action may
    name it). A client no mail reaches opens no connection, so its cache stays empty."""
    from mailflow.transports.smtp.reuse import MAX_IDLE  # (only serve builds the clients; the rest need not load it)

    routed = routed_transports(cfg)
    clients: list[tuple[str, SmtpConfig | LmtpConfig]] = [
        *((name, settings) for name, _, settings in cfg.smtp_clients()),
        ("lmtp", cfg.lmtp), *((name, cfg.lmtp.for_service(name)) for name in cfg.lmtp.services)]
    return MAX_IDLE * sum(client.connection_cache_time_limit > 0 for name, client in clients
                          if name in routed or name not in BUILTIN_TRANSPORTS)


def routed_transports(cfg: Config) -> set[str]:
    """The transports the configuration can hand mail to: the address classes' (relay_transport only with
    relay_domains: no other mail is the relay class's), default_transport, those the transport tables
    (transport_maps, sender_dependent_default_transport_maps) can answer, local's mailbox_transport and
    fallback_transport, [smtpd]'s content_filter (pickup's mail takes it too, with no listener) and every
    listener's; address verification's overrides of these too. A transport table whose answers are not known at
    the start (a file, a database, a socket: it may change while the server runs) can name any, and so can a
    FILTER action (`filter_possible`): then every transport the configuration defines."""
    if filter_possible(cfg):
        return cfg.defined_transports()
    values: set[str] = {cfg.local.mailbox_transport, cfg.local.fallback_transport, cfg.smtpd.content_filter,
                        *(smtpd.content_filter for _, _, smtpd, _ in cfg.smtpd.listener_settings())}
    for routing in (cfg, cfg.for_probes()):
        values.update((routing.local_transport, routing.virtual_transport, routing.default_transport))
        if routing.relay_domains:
            values.add(routing.relay_transport)
        for spec in (*routing.transport_maps, *routing.sender_dependent_default_transport_maps):
            answers = fixed_answers(spec)
            if answers is None:
                return cfg.defined_transports()
            values.update(answers)
    return {name for value in values if (name := transport_name(value))}


# the restriction items that ask an access table or a policy service, whose answer may be FILTER transport:nexthop
FILTER_ANSWERING = frozenset((*ACCESS_CHECKS, *SERVER_ACCESS_CHECKS, REVERSE_CLIENT_ACCESS, "check_policy_service"))


def filter_possible(cfg: Config) -> bool:
    """A FILTER action can route mail (Postfix access(5), header_checks(5)): cleanup's header or body checks are
    configured, or a listener's restriction list (or a restriction class it names) asks an access table or a
    policy service. Its transport is known only once it answers."""
    checks = cfg.checks
    if checks.header_checks or checks.mime_header_checks or checks.nested_header_checks or checks.body_checks:
        return True
    for _, _, smtpd, _ in cfg.smtpd.listener_settings():
        items = [item for stage in STAGES for item in getattr(smtpd, f"{stage}_restrictions")]
        if expand(items, smtpd.restriction_classes) & FILTER_ANSWERING:
            return True
    return False


def fixed_answers(spec: str) -> tuple[str, ...] | None:
    """Every value an inline:, static: or fail: table can answer (its spec is all of it); None for another type."""
    entries = table_entries(spec)
    return None if entries is None else tuple(value for _, value in entries)


def ensure_descriptors(cfg: Config) -> "DescriptorWatch":
    """The process's file descriptor limit raised to its hard limit (as Go's runtime raises it for chasquid and
    maddy; the soft limit is often 1024 where the hard one is far higher), with a warning when even that is below
    what the configuration can hold open; the watch that checks each configuration a reload puts in force. Out of
    descriptors, the server goes on: the listeners pause accepting (mailflow.listening) and deliveries are
    deferred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
    watch = DescriptorWatch()
    watch.check(cfg)
    return watch


class DescriptorWatch:
    """Warns when the descriptor limit is below what a configuration can hold open: at the start, and after a
    reload (relay_domains, mailbox_transport, max_sessions, delivery_concurrency_limit take effect without a
    restart) only when the need grew past what was already warned about, so a reload repeats no warning."""

    def __init__(self) -> None:
        self.warned = 0  # the largest need warned about

    def check(self, cfg: Config) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        needed = descriptors_needed(cfg)
        if soft == resource.RLIM_INFINITY or soft >= needed or needed <= self.warned:
            return
        self.warned = needed
        logging.getLogger("mailflow").warning(
            "the file descriptor limit (%d) is below the %d this configuration can use (smtpd max_sessions, "
            "queue delivery_concurrency_limit, the SMTP and LMTP clients' connection caches); connections wait in the "
            "kernel's queue when it runs out", soft, needed)


def check_config(config: Optional[str] = ConfigOption) -> None:
    """Validate the configuration and read every file-backed lookup table, DKIM key and listener certificate it
    names, and see that the log file can be written (like `postfix check`). Exit 2 on the first bad setting, or after
    listing every file that cannot be used. A valid configuration file's settings for sendmail are recorded in
    <queue_directory>/sendmail-settings.json when this user can write there, as `serve` records them (none for the
    built-in defaults; docs/sendmail.md)."""
    cfg = load(config, remember=True)
    where = config_name(config_path(config))
    problems = (table_problems(cfg, where) + signing_problems(cfg) + certificate_problems(cfg, where)
                + log_file_problems(cfg, where) + template_problems(cfg, where))
    for problem in problems:
        typer.echo(config_error_text(problem, where), err=True)
    if problems:
        raise typer.Exit(2)
    for warning in cfg.warnings():
        typer.echo(f"{where}: warning: {warning}", err=True)
    typer.echo(f"{where}: ok (queue {cfg.queue_directory})")
    for host, port, role in listener_summary(cfg):
        typer.echo(f"  listener {host}:{port} ({role})")


def listener_summary(cfg: Config) -> list[tuple[str, int, str]]:
    """(address, port, role) of every listener the server opens: the `listen` addresses (mta) and each
    `[[smtpd.listeners]]` entry, in that order."""
    out = []
    for value, role, _, _ in cfg.smtpd.listener_settings():
        host, port = parse_hostport(value)
        out.append((f"[{host}]" if ":" in host else host, port, role))
    return out


def table_problems(cfg: Config, where: str) -> list[ConfigError]:
    """One ConfigError(where, setting, reason) for each file-backed table (texthash, regexp, pcre, cidr, sqlite) that
    cannot answer now."""
    return unreadable_tables(flat_settings(cfg, effective=True), where)  # (a /file's tables too)


def template_problems(cfg: Config, where: str) -> list[ConfigError]:
    """`queue.bounce_template_file` when it cannot be read or parsed (mailflow.bounce_templates)."""
    path = cfg.queue.bounce_template_file
    try:
        load_templates(path)
    except (OSError, ValueError) as e:
        return [ConfigError(where, "queue.bounce_template_file", f"{path}: {e}")]
    return []


def log_file_problems(cfg: Config, where: str) -> list[ConfigError]:
    """`log.file` when `serve` could not open it for appending (the file, else its directory, not writable)."""
    if not cfg.log.file:
        return []
    path = Path(cfg.log.file)
    try:
        if os.access(path, os.W_OK) or (not path.exists() and os.access(path.parent, os.W_OK | os.X_OK)):
            return []
        reason = "permission denied" if path.exists() or path.parent.is_dir() else "no such directory"
    except OSError as e:  # a directory on the way not searchable, a name too long
        reason = e.strerror or str(e)
    return [ConfigError(where, "log.file", f"cannot open {path}: {reason}")]


def certificate_problems(cfg: Config, where: str) -> list[ConfigError]:
    """Each listener's certificate and key (and CA file when it asks for client certificates), read as `serve`
    reads them at start (where one that cannot be used stops the start): one ConfigError per unusable set."""
    from mailflow.stages.smtpd.tls import TlsError, build_context

    smtpd = cfg.smtpd
    users: list[tuple[str, SmtpdConfig, dict]] = [("smtpd", smtpd, {})] if smtpd.listen else []
    users += [(f"smtpd.listeners[{i}]", smtpd.for_listener(spec), dict(spec.overrides))
              for i, spec in enumerate(smtpd.listeners)]
    files: dict[tuple, tuple[str, dict]] = {}
    for prefix, s, overrides in users:
        files.setdefault((s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.tls_ask_ccert), (prefix, overrides))
    problems = []
    for (cert, key, ca_file, ask_ccert), (prefix, overrides) in files.items():
        if cert:
            try:
                build_context(cert, key, ca_file, ask_ccert)
            except TlsError as e:
                problems.append(ConfigError(where, _tls_file_key(e.key, prefix, overrides), e.reason))
    return problems


def _tls_file_key(key: str, prefix: str, overrides: dict) -> str:
    """A TLS file's key (`smtpd.tls_cert_file`, for the certificate or its key) as the listener whose override
    names the file: `smtpd.listeners[N].overrides.tls_key_file`; `key` when it is [smtpd]'s."""
    name = key.rpartition(".")[2]
    own = [n for n in ((name,) if name != "tls_cert_file" else ("tls_cert_file", "tls_key_file")) if n in overrides]
    return f"{prefix}.overrides.{own[0]}" if own else key


def signing_problems(cfg: Config) -> list[ConfigError]:
    """The DKIM tables and keys, ARC's key among them, the SRS secrets and the admin listener's tokens, read as the
    server will read them at start."""
    from mailflow.routing.srs import srs_from_config
    from mailflow.signing.keytables import arc_key_from_config, keys_from_config

    def dkim_and_arc() -> None:
        arc_key_from_config(cfg.arc, cfg.dkim, keys_from_config(cfg.dkim))

    def admin_tokens() -> None:
        if cfg.admin.enable and cfg.admin.token_file:
            from mailflow.admin.access import read_tokens

            read_tokens(cfg.admin.token_file)

    problems = []
    for read in (dkim_and_arc, lambda: srs_from_config(cfg), admin_tokens):
        try:
            read()
        except ConfigError as e:
            problems.append(e)
    return problems


def version() -> None:
    """Print the version."""
    typer.echo(f"mailflow {__version__}")


def config_show(config: Optional[str] = ConfigOption,
                changed: bool = typer.Option(False, "-n", "--changed",
                                             help="only settings that differ from the defaults (postconf -n)"),
                defaults: bool = typer.Option(False, "-d", "--defaults", help="the built-in defaults (postconf -d)"),
                values_only: bool = typer.Option(False, "-h", "--values",
                                                 help="the values only, without `key = `, a string unquoted "
                                                      "(postconf -h)"),
                names: Optional[List[str]] = typer.Argument(
                    None, metavar="[SETTING]...", help="only these settings (e.g. relayhost queue.active_limit)")
                ) -> None:
    """Every setting as `key = value` (valid TOML), like postconf; `-n` what the file changes, `-d` the defaults,
    `-h` the values alone. Named settings are shown in the order given, a name given twice twice (postconf's). A
    name that is no setting is a warning on stderr and is skipped, the others shown and the exit status 0, as
    postconf's "warning: NAME: unknown parameter"."""
    cfg = load(config)
    view = settings_view(cfg, defaults=defaults, changed_only=changed)
    shown = list(view.items())
    if names:
        known = flat_settings(cfg)  # (every setting, unset or unchanged ones too)
        for name in names:
            if name not in known:
                typer.echo(f"mailflow config show: warning: {masked(name)}: unknown setting", err=True)
        shown = [(name, view[name]) for name in names if name in view]  # in order, a repeated name again
    for key, value in shown:
        typer.echo(bare_value(value) if values_only else format_setting(key, value))


def config_import(main_cf: str = typer.Argument(..., metavar="MAIN_CF", help="Postfix's main.cf"),
                  master: Optional[str] = typer.Option(None, "--master", metavar="MASTER_CF",
                                                       help="Postfix's master.cf: listeners and pipe services"),
                  output: Optional[str] = typer.Option(None, "-o", "--output", metavar="FILE",
                                                       help="write the TOML here rather than to standard output"),
                  hostname: Optional[str] = typer.Option(None, "--hostname", help="what $myhostname is when "
                                                         "main.cf does not set it (default: this system's name)")
                  ) -> None:
    """Translate a Postfix main.cf (and master.cf) into mailflow's TOML, with a comment for every line left out.
    Exit 0 when everything was translated, 1 when something was left out, 2 for a file that cannot be read or a
    translation larger than a configuration file may be (nothing written), 70 for a fault of the importer (one
    line)."""
    try:
        result = import_postfix(main_cf, master, hostname)
    except UnreadableFile as e:
        fail("mailflow config import", str(e), 2)
    except Exception as e:  # a bug in the importer: one line, EX_SOFTWARE, never a traceback
        fail("mailflow config import", f"internal error ({type(e).__name__}: {e}); please report it with the "
                                       "Postfix files", 70)
    text = result.toml()
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:  # (the loader would refuse it: no output, rather than one that cannot load)
        fail("mailflow config import", f"the translation is {size} bytes, more than the {MAX_FILE_BYTES >> 20} MB "
                                       "mailflow reads as a configuration file: put long lists in files (a domain "
                                       "list's /file/name, a table)", 2)
    if output:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as e:
            fail("mailflow config import", f"{output}: {e.strerror or e}", 2)
    else:
        typer.echo(text, nl=False)
    if result.left_out:
        typer.echo(f"mailflow config import: {len(result.left_out)} Postfix setting(s) left out "
                   "(each is a comment at the top of the output):", err=True)
        for item in result.left_out:
            typer.echo(printable(f"  {item.where}: {item.name}: {item.why}"), err=True)
    if result.refused_table_lines:
        typer.echo(f"mailflow config import: {len(result.refused_table_lines)} table line(s) mailflow refuses: the "
                   "tables are kept as written and each fails whole (4.3.0 on every lookup) until its lines are "
                   "fixed (each is a comment at the top of the output):", err=True)
        for item in result.refused_table_lines:
            typer.echo(printable(f"  {item.where}: {item.name}: {item.why}"), err=True)
    if result.left_out or result.refused_table_lines:
        raise typer.Exit(1)


def address_test(addresses: List[str] = typer.Argument(..., metavar="ADDRESS..."),
                 config: Optional[str] = ConfigOption,
                 sender: Optional[str] = typer.Option(None, "--sender", "-f", metavar="SENDER",
                                                      help="route as mail from this envelope sender "
                                                      "(sender_dependent_*_maps); <> or '' is the null sender")
                 ) -> None:
    """How each address would be routed, step by step (like sendmail -bv / exim -bt): the RCPT verdict,
    canonical and virtual alias rewriting, class, transport, next hop (by the sender's tables with --sender),
    local aliases and .forward, and where forwarded copies go, and the TLS policy a delivery to each SMTP next hop
    would use. Exit 75 when a table or file cannot be read now. Control characters (an escape sequence, a line
    break) are shown as `?`, as the queue tools show them."""
    from mailflow.routing.router import Router

    cfg = load(config)
    try:
        router = Router(cfg)
    except ConfigError as e:
        fail_config("mailflow address", e, config_name(config_path(config)))
    for n, addr in enumerate(addresses):  # (a lookup that fails is logged: commands.command_warnings shows it)
        _explain(cfg, router, addr, sender, first=not n)


def _explain(cfg: Config, router: Router, addr: str, sender: str | None, first: bool) -> None:
    """One address's steps, printed (after a blank line unless `first`); exit 75 when a table cannot answer."""
    if not first:
        typer.echo("")
    try:
        steps = tls_steps(cfg, router.explain(addr, _envelope_sender(sender)))
    except DeliveryError as e:
        fail("mailflow address", masked(f"{addr}: {e.dsn} {e.text}"), 75)
    for depth, label, text in steps:  # (the address's control characters as `?`, as the queue tools show them)
        typer.echo(f"{'  ' * depth}{label + ':':<{max(16 - 2 * depth, len(label) + 1)}} {masked(text)}")


def _envelope_sender(given: str | None) -> str | None:
    """--sender as an envelope sender: `<>` (or '') is the null sender, angle brackets around one are dropped."""
    return None if given is None else given.strip().removeprefix("<").removesuffix(">")


AliasesOption = typer.Option(False, "--aliases", help="a texthash: file is in aliases(5) form, as alias_maps read "
                             "it (postalias); several answers are `name:<TAB>value`")


def table_query(spec: str = typer.Argument(..., metavar="TYPE:NAME", help="the table, e.g. texthash:/etc/virtual, "
                                     "cidr:/etc/client_access.cidr"),
                keys: List[str] = typer.Argument(..., metavar="KEY", help="keys to look up, as given; - reads "
                                                 "them from standard input, one a line"),
                aliases: bool = AliasesOption) -> None:
    """Print each key's value (key<TAB>value when several keys, or with `-`, which reads the keys from standard
    input, one a line, as `postmap -q - TABLE` does). With --aliases, as `postalias -q`: a texthash: file read in
    aliases(5) form (`name: value`, continuation lines), a value as postalias stores it (`a, b`; another type's as
    written), and `name:` before the TAB. Exit 1 when none is found, 2 for a bad table, 75 (EX_TEMPFAIL) when a
    lookup fails."""
    table = _open_for_query("mailflow table query", spec, aliases)
    shown = _value_shown(spec, aliases)
    several = len(keys) > 1 or keys == ["-"]
    asked: Iterable[str] = keys
    if keys == ["-"]:  # one key a line, looked up as it is read (postmap -q - streams them too)
        asked = (line.removesuffix("\n") for line in sys.stdin)
    found = 0
    for key in asked:
        try:
            value = table.lookup(key)
        except LookupRetry as e:
            fail("mailflow table query", f"{key}: lookup failed: {e.text}", 75)
        if value is not None:
            found += 1
            typer.echo(_table_line(key, shown(value), aliases) if several else shown(value))
    if not found:
        raise typer.Exit(1)


def table_dump(spec: str = typer.Argument(..., metavar="TYPE:NAME", help="a texthash: or inline: table"),
               aliases: bool = AliasesOption) -> None:
    """Print every entry as key<TAB>value, like `postmap -s` (`postalias -s` with --aliases: `name:<TAB>value`), in
    the table's order, keys case-folded. Exit 1 for a type whose entries cannot be listed (regexp, pcre, cidr,
    static, sqlite, ...: Postfix's "sequence operation is not supported"), 2 for a bad table, 75 when the file
    cannot be read."""
    table = _open_for_query("mailflow table dump", spec, aliases)
    if not isinstance(table, ListedTable):
        fail("mailflow table dump", f"{spec}: its entries cannot be listed (only texthash: and inline: tables "
                                    "can, as postmap -s lists those)", 1)
    try:
        entries = table.entries()
    except LookupRetry as e:
        fail("mailflow table dump", e.text, 75)
    shown = _value_shown(spec, aliases)
    for key, value in entries:
        typer.echo(_table_line(key, shown(value), aliases))


def _open_for_query(command: str, spec: str, aliases: bool) -> Table:
    try:
        return open_table(spec, aliases=aliases)
    except ConfigError as e:
        fail_config(command, e)


def _value_shown(spec: str, aliases: bool) -> Callable[[str], str]:
    """How a value is printed: one of a texthash: file read in aliases(5) form as postalias stores it (`a, b`),
    tokens and all (aliases.stored_value); any other table's as it is (`postalias -q KEY inline:{...}` prints the
    value as written: only postalias's own file is stored tokenized)."""
    if not (aliases and table_type(spec) == "texthash"):
        return str
    from mailflow.aliases import stored_value  # (the parser loads only for --aliases: every command starts here)

    return stored_value


def _table_line(key: str, value: str, aliases: bool) -> str:
    """postmap's `key<TAB>value`; postalias's `name:<TAB>value`."""
    return f"{key}{':' if aliases else ''}\t{value}"


def auth_hash_password(user: Optional[str] = typer.Argument(None, help="print a `user hash` line for the table"),
                       stdin: bool = typer.Option(False, "--stdin", help="read the password from standard input")
                       ) -> None:
    """Print a scrypt password hash ($scrypt$n=16384,r=8,p=1$SALT$HASH); asks for the password twice."""
    from mailflow.passwords import hash_password, text_problem

    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    problem = "empty password" if not password else text_problem(password)
    if problem:
        fail("mailflow auth hash-password", problem, 2)
    encoded = hash_password(password)
    typer.echo(f"{user} {encoded}" if user else encoded)
