"""The repository's config.toml loads unchanged and documents the defaults; the CLI reports bad config."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import resource
import select
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailflow.app import _reloads
from mailflow.cli import server as cli_server
from mailflow.config import Config, flat_settings, load_config, resolve_paths
from mailflow.errors import ConfigError
from mailflow.queuelock import LOCK_NAME
from mailflow.store import Store
from tests.support.deliverability import dkim_settings, make_key

ROOT = Path(__file__).resolve().parents[2]


def mailflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailflow", *args], capture_output=True, text=True, timeout=30)


def test_example_config_loads_and_states_the_defaults():
    assert load_config(ROOT / "config.toml") == resolve_paths(Config(), ROOT)  # its relative paths from its directory


def test_example_config_states_every_setting():
    """config.toml is the annotated list of every setting: one that only the code knows is undocumented."""
    def keys(table, prefix=""):
        for key, value in table.items():
            yield prefix + key
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")

    text = (ROOT / "config.toml").read_text()
    stated = set(keys(tomllib.loads(text)))
    settings = flat_settings(Config())
    assert [name for name, value in settings.items() if value is not None and name not in stated] == []
    # an unset one (TOML has no null) is stated by a line commented out
    assert [name for name, value in settings.items()
            if value is None and f"\n# {name.rsplit('.', 1)[-1]} = " not in text] == []


def test_example_config_lines_are_at_most_120_characters_as_the_codes_are():
    lines = (ROOT / "config.toml").read_text().splitlines()
    assert [(number, len(line)) for number, line in enumerate(lines, 1) if len(line) > 120] == []


def zero_offers(text: str) -> list[tuple[int, str]]:
    """(line, dotted key) of each setting whose comment line just above it offers 0 ("0: no limit", "0 means")
    without naming another setting."""
    offers, section, comment = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            section, comment = stripped.strip("[]"), None
        elif stripped.startswith("#"):
            comment = stripped
        elif (found := re.match(r"(\w+)\s*=", stripped)) and comment is not None:
            others = set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", comment)) - {found[1]}
            if re.search(r"(?<![\w.-])0(?:: | means)", comment) and not others:
                offers.append((number, f"{section}.{found[1]}".lstrip(".")))
            comment = None
        else:
            comment = None
    return offers


def test_every_0_the_example_config_offers_is_taken():
    """config.toml said of min_data_rate "0: only `timeout`", a value the range sweep made a refusal."""
    offers = zero_offers((ROOT / "config.toml").read_text())
    assert len(offers) >= 3
    refused = []
    for number, key in offers:
        *sections, name = key.split(".")
        settings: dict = {}
        table = settings
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = 0
        try:
            Config.model_validate(settings)
        except ValueError as e:
            refused.append((number, key, str(e).splitlines()[2].strip()))
    assert refused == []


def test_check_config_accepts_the_example():
    result = mailflow("check-config", "--config", str(ROOT / "config.toml"))
    assert result.returncode == 0 and "ok" in result.stdout


def test_every_doc_the_example_config_names_exists_with_the_named_section():

    text = (ROOT / "config.toml").read_text()
    links = re.findall(r'(docs/[\w.-]+\.md)(?:, "([^"]+)")?', text)
    assert links
    for doc, section in links:
        assert (ROOT / doc).is_file(), doc
        if section:
            assert re.search(rf"^#+ {re.escape(section)}$", (ROOT / doc).read_text(), re.MULTILINE), (doc, section)


def test_check_config_names_every_listener_with_its_role(tmp_path, pki):
    cfg = tmp_path / "m.toml"
    _, cert, _ = pki
    cfg.write_text('[smtpd]\nlisten = ["127.0.0.1:2525", "[::1]:2525"]\nsasl_user_maps = ["inline:{a=b}"]\n'
                   f'tls_cert_file = "{cert}"\n'
                   '[[smtpd.listeners]]\naddress = "0.0.0.0:587"\nrole = "submission"\n'
                   '[[smtpd.listeners]]\naddress = "0.0.0.0:465"\nrole = "submissions"\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["  listener 127.0.0.1:2525 (mta)", "  listener [::1]:2525 (mta)",
                                              "  listener 0.0.0.0:587 (submission)",
                                              "  listener 0.0.0.0:465 (submissions)"]


def test_sendmail_help_prints_the_usage_and_exits_0():
    result = mailflow("sendmail", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sendmail ") and "-bv" in result.stdout
    assert "no recipients" not in result.stdout + result.stderr


def test_queue_shape_help_names_every_queue_it_counts():
    """maildrop (requeued mail waiting for pickup) too, as Postfix's qshape takes it."""
    result = mailflow("queue", "shape", "--help")
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"))


def test_check_config_warns_when_myorigin_is_not_local(tmp_path):
    """Unqualified names in aliases and .forward files (`\\bob` too) go to NAME@myorigin, as Postfix's local sends
    them: a myorigin outside mydestination sends them away, so check-config says so (and still accepts it)."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('myhostname = "mx.example.test"\nmydestination = ["example.test"]\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert (f"{cfg}: warning: myorigin (myhostname) 'mx.example.test' is not in mydestination: unqualified names "
            "in aliases and .forward files") in result.stderr
    cfg.write_text('myhostname = "mx.example.test"\nmyorigin = "example.test"\nmydestination = ["example.test"]\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_serve_warns_at_start_when_myorigin_is_not_local(caplog):
    caplog.set_level(logging.WARNING, logger="mailflow")
    cli_server.warn_at_start(Config(myhostname="mx.example.test", mydestination=("example.test",)), "m.toml")
    cli_server.warn_at_start(Config(myhostname="mx.example.test", mydestination=("mx.example.test",)), "m.toml")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("m.toml: myorigin (myhostname) 'mx.example.test' is not in mydestination")


def test_a_listeners_postscreen_cache_limit_is_a_warning_not_an_error(tmp_path, caplog):
    """A listener's overrides.postscreen.cache_limit has no effect (the server has one cache of passed clients):
    check-config and serve warn, naming file, key and why; it stopped a configuration accepted before from
    starting."""
    cfg = tmp_path / "mailflow.toml"
    cfg.write_text('myhostname = "mx.example.test"\n[smtpd]\n[[smtpd.listeners]]\naddress = "127.0.0.1:2526"\n'
                   "overrides = { postscreen = { cache_limit = 5 } }\n")
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    words = (": warning: smtpd.listeners: listener 0 (127.0.0.1:2526, mta): overrides.postscreen.cache_limit: ignored: "
             "the server has one cache of passed clients for every listener, bounded by [smtpd.postscreen] cache_limit")
    assert f"{cfg}{words}" in result.stderr, result.stderr
    caplog.set_level(logging.WARNING, logger="mailflow")
    cli_server.warn_at_start(load_config(cfg), str(cfg))
    [warning] = [m for m in (r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
                 if "cache_limit" in m]
    assert warning.startswith(f"{cfg}: smtpd.listeners: listener 0 (127.0.0.1:2526, mta): overrides.postscreen.")


def test_check_config_names_file_key_and_reason_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[queue]\nminimal_backoff_time = "soon"\n')
    result = mailflow("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: queue.minimal_backoff_time: 'soon' is not a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reads_every_table_file_and_names_the_bad_line(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice\nbroken line\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'alias_maps = ["texthash:{aliases}"]\ntransport_maps = ["texthash:{tmp_path}/missing"]\n'
                   f'virtual_alias_maps = ["fail:on-purpose", "inline:{{a=b}}"]\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"alias_maps: table texthash:{aliases}: {aliases}, line 2: missing ':'" in result.stderr
    assert f"transport_maps: table texthash:{tmp_path}/missing: cannot read" in result.stderr
    assert "fail:" not in result.stderr, "fail: tables are deliberate"
    aliases.write_text("team: alice\n")
    (tmp_path / "missing").write_text("example.com smtp:\n")
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


def test_check_config_reads_the_tables_of_restriction_lists_and_submit_users(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[smtpd]\n'
                   f'recipient_restrictions = ["permit_mynetworks", "check_recipient_access texthash:access"]\n'
                   f'[smtpd.restriction_classes]\nstrict = ["check_sender_access texthash:senders", "reject"]\n'
                   f'[sendmail]\nauthorized_submit_users = ["texthash:{tmp_path}/users"]\n'
                   f'[[smtpd.listeners]]\naddress = "127.0.0.1:0"\nrole = "mta"\n[smtpd.listeners.overrides]\n'
                   f'client_restrictions = ["check_client_access regexp:client"]\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"smtpd.recipient_restrictions: table texthash:{tmp_path}/access: cannot read" in result.stderr
    assert f"sendmail.authorized_submit_users: table texthash:{tmp_path}/users: cannot read" in result.stderr
    assert f"smtpd.restriction_classes: table texthash:{tmp_path}/senders: cannot read" in result.stderr
    assert f"smtpd.listeners[0].overrides.client_restrictions: table regexp:{tmp_path}/client: cannot read" \
        in result.stderr
    (tmp_path / "access").write_text("bad.test REJECT\n")
    (tmp_path / "users").write_text("root ok\n")
    (tmp_path / "senders").write_text("bad@bad.test REJECT\n")
    (tmp_path / "client").write_text("/^192\\.0\\.2\\./ REJECT\n")
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


def test_check_config_names_a_cidr_line_postfix_would_skip(tmp_path):
    """A cidr: table of a restriction list is read as the other table files are: a network with host bits set
    (Postfix skips it with a warning) is reported with its line, and the table in a relative path is found."""
    check_config_names_the_line_then_passes(
        tmp_path, '[smtpd]\nclient_restrictions = ["check_client_access cidr:client.cidr"]\n', "client.cidr",
        "192.0.2.0/24 REJECT\n10.1.2.3/8 OK\n", "192.0.2.0/24 REJECT\n10.0.0.0/8 OK\n",
        f"smtpd.client_restrictions: table cidr:{tmp_path}/client.cidr: {tmp_path}/client.cidr, line 2: "
        f'non-null host address bits in "10.1.2.3/8", perhaps you should use "10.0.0.0/8" instead')


def check_config_names_the_line_then_passes(tmp_path, toml: str, table: str, bad: str, good: str, named: str):
    """`check-config` of the configuration `toml` refuses the table file `table` holding `bad` (exit 2, `named` on
    standard error) and passes it holding `good`."""
    (tmp_path / table).write_text(bad)
    cfg = tmp_path / "m.toml"
    cfg.write_text(toml)
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert named in result.stderr
    (tmp_path / table).write_text(good)
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


def test_check_config_names_a_pcre_pattern_re2_cannot_take(tmp_path):
    """header_checks = pcre:, as Postfix guides write it: a back-reference (PCRE has them, RE2 not) is reported
    with its line and what it is; the pattern rewritten, the file passes."""
    check_config_names_the_line_then_passes(
        tmp_path, '[checks]\nheader_checks = ["pcre:header_checks"]\n', "header_checks",
        "/^Subject: ok/ OK\n/^Subject: (\\w+) \\1/ REJECT doubled\n",
        "/^Subject: ok/ OK\n/^Subject: (\\w+) \\w+/ REJECT two words\n",
        f"checks.header_checks: table pcre:{tmp_path}/header_checks: {tmp_path}/header_checks, line 2: "
        "a back-reference is not supported (mailflow's pcre: runs on RE2: invalid escape sequence: \\1)")


def test_check_config_reads_each_listeners_certificate_as_serve_does(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[smtpd]\ntls_cert_file = "missing.pem"\n[[smtpd.listeners]]\naddress = "127.0.0.1:0"\n'
                   'role = "submissions"\n[smtpd.listeners.overrides]\ntls_cert_file = "other.pem"\n'
                   'sasl_user_maps = ["inline:{a=b}"]\n')
    (tmp_path / "other.pem").write_text("not a certificate\n")
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"{cfg}: smtpd.tls_cert_file: {tmp_path}/missing.pem: no such certificate or key file" in result.stderr
    assert f"{cfg}: smtpd.listeners[0].overrides.tls_cert_file: {tmp_path}/other.pem: not a usable certificate " \
           "and key" in result.stderr  # (the listener's own file: named by its key)
    served = mailflow("serve", "--config", str(cfg))
    assert served.returncode == 2 and "missing.pem: no such certificate or key file" in served.stderr


def test_check_config_reads_the_ca_file_of_a_listener_that_asks_for_client_certificates(tmp_path, pki):
    _, cert, _ = pki
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[smtpd]\ntls_cert_file = "{cert}"\n[[smtpd.listeners]]\naddress = "127.0.0.1:0"\n'
                   '[smtpd.listeners.overrides]\ntls_ask_ccert = true\ntls_ca_file = "clients.pem"\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"{cfg}: smtpd.listeners[0].overrides.tls_ca_file: {tmp_path}/clients.pem: no such CA file" in result.stderr
    (tmp_path / "clients.pem").write_text("no certificates here\n")
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2 and f"overrides.tls_ca_file: {tmp_path}/clients.pem: no usable certificates" in \
        result.stderr, result.stderr
    (tmp_path / "clients.pem").write_text(open(cert).read())
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


def test_a_path_that_cannot_be_looked_at_is_named_not_a_traceback(tmp_path):
    """A name too long (or, for a user other than root, a directory on the way that is not searchable): os.stat
    fails with something else than "no such file"."""
    unreachable = tmp_path / ("x" * 300) / "cert.pem"
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[smtpd]\nlisten = ["127.0.0.1:0"]\ntls_cert_file = "{unreachable}"\n'
                   f'[log]\nfile = "{unreachable}.log"\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{cfg}: smtpd.tls_cert_file: {unreachable}: cannot read (File name too long)" in result.stderr
    assert f"{cfg}: log.file: cannot open {unreachable}.log: File name too long" in result.stderr
    cfg.write_text(f'[smtpd]\nlisten = ["127.0.0.1:0"]\ntls_cert_file = "{unreachable}"\n')
    served = mailflow("serve", "--config", str(cfg))
    assert served.returncode == 2, served.stderr
    assert f"{unreachable}: cannot read (File name too long)" in served.stderr


def test_check_config_reads_the_arc_key_and_the_admin_tokens_as_serve_does(tmp_path):
    key = make_key(tmp_path, "a.test", "sel", "ed25519")  # ARC seals with RSA only
    tables = dkim_settings(tmp_path, [key])
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[smtpd]\nlisten = ["127.0.0.1:0"]\n[dkim]\nsigning_table = "{tables["signing_table"]}"\n'
                   f'key_table = "{tables["key_table"]}"\n[arc]\nenabled = true\nkey = "{key.name}"\n'
                   f'[admin]\nenable = true\nlisten = ["127.0.0.1:0"]\ntoken_file = "tokens"\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert (f"{tmp_path}/KeyTable: arc.key: '{key.name}' is not an RSA key of dkim.key_table (ARC seals with RSA)"
            in result.stderr)
    assert f"{tmp_path}/tokens: admin.token_file: cannot read: No such file or directory" in result.stderr
    cfg.write_text('[smtpd]\nlisten = ["127.0.0.1:0"]\n[arc]\nenabled = true\nkey = "k"\n')  # no key table
    for command in ("check-config", "serve"):
        result = mailflow(command, "--config", str(cfg))
        assert result.returncode == 2, result.stderr
        assert f"{cfg}: arc.key: 'k' is not an RSA key of dkim.key_table" in result.stderr, result.stderr


def test_a_password_on_standard_input_that_is_not_utf8_is_refused_not_a_traceback(tmp_path):
    database = str(tmp_path / "accounts.db")
    assert mailflow("account", "domain", "add", "example.test", "--database", database).returncode == 0
    for command in (["auth", "hash-password", "--stdin"],
                    ["account", "user", "add", "bob@example.test", "--password-stdin", "--database", database]):
        result = subprocess.run([sys.executable, "-m", "mailflow", *command], input=b"caf\xe9 latte\n",
                                capture_output=True, timeout=30)  # typed on a Latin-1 terminal
        stderr = result.stderr.decode()
        assert result.returncode == 2 and "Traceback" not in stderr, stderr
        assert stderr.endswith("not UTF-8 text (AUTH PLAIN carries UTF-8)\n"), stderr


def test_every_command_takes_a_closed_standard_stream_as_dev_null_not_a_traceback(tmp_path):
    """cron jobs and daemons may run a command with standard input or output closed: sendmail took that as
    /dev/null (as Postfix's does), the other commands died with a traceback (`sys.stdin` or `sys.stdout` None)."""
    table = tmp_path / "table"
    table.write_text("a b\n")
    database = str(tmp_path / "accounts.db")
    assert mailflow("account", "domain", "add", "example.test", "--database", database).returncode == 0
    closed_input = ["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-m", "mailflow"]
    for command, code, said in ((["table", "query", f"texthash:{table}", "-"], 1, ""),  # no keys: none found
                                (["auth", "hash-password", "--stdin"], 2, "empty password"),
                                (["account", "user", "add", "bob@example.test", "--password-stdin", "--database",
                                  database], 2, "too short")):
        done = subprocess.run(closed_input + command, capture_output=True, text=True, timeout=30)
        assert (done.returncode, "Traceback" in done.stderr) == (code, False), done.stderr
        assert said in done.stderr
    queue = tmp_path / "queue"
    queue.mkdir()
    asyncio.run(_empty_queue(queue / "queue.db"))
    config = tmp_path / "m.toml"
    config.write_text(f'queue_directory = "{queue}"\n')
    closed_output = ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "mailflow"]
    done = subprocess.run(closed_output + ["queue", "list", "--config", str(config)], capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


async def _empty_queue(path: Path) -> None:
    await (await Store.open(path)).close()


def test_table_query_reads_keys_from_standard_input_as_they_come(tmp_path):
    """`table query TABLE -` answers each key as it is read, as postmap -q - does: it held every key of standard
    input in memory first (3 million keys: 257 MB; now 46 MB, whatever their number)."""
    table = tmp_path / "table"
    table.write_text("a b\n")
    proc = subprocess.Popen([sys.executable, "-m", "mailflow", "table", "query", f"texthash:{table}", "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"a\n")
        proc.stdin.flush()
        answered = select.select([proc.stdout], [], [], 20)[0]  # before standard input ends
        assert answered and proc.stdout.readline() == b"a\tb\n"
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_check_config_sees_a_log_file_that_serve_could_not_open(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[log]\nfile = "no/such/dir/mail.log"\n')
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"{cfg}: log.file: cannot open {tmp_path}/no/such/dir/mail.log: no such directory" in result.stderr
    assert mailflow("serve", "--config", str(cfg)).returncode == 2
    (tmp_path / "no/such/dir").mkdir(parents=True)
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


def test_serve_refuses_a_bad_config_before_starting(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtpd]\nlisten = ['127.0.0.1']\nbogus = 1\n")
    result = mailflow("serve", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: smtpd.listen: '127.0.0.1' needs a port" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_named(tmp_path):
    result = mailflow("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "nope.toml: no such file" in result.stderr


def test_config_check_is_check_config(tmp_path):
    """`mailflow config check` (beside `config show`) checks as `check-config` does: a bad key is named, a good
    file passes."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtpd]\nlisten = ['127.0.0.1']\n")
    result = mailflow("config", "check", "--config", str(bad))
    assert result.returncode == 2 and f"{bad}: smtpd.listen: '127.0.0.1' needs a port" in result.stderr
    assert mailflow("config", "check", "--config", str(ROOT / "config.toml")).returncode == 0


def test_the_account_groups_are_named_in_the_plural():
    result = mailflow("account", "--help")
    assert "Aliases of the account database" in result.stdout and "Aliass" not in result.stdout, result.stdout


def test_version():
    result = mailflow("version")
    assert result.returncode == 0 and result.stdout.startswith("mailflow 0.")


LOADED_BY_VERSION = """\
import atexit, sys
atexit.register(lambda: print("loaded:", " ".join(sorted(sys.modules))))
sys.argv = ["mailflow", "version"]
from mailflow.cli import main
main()
"""


def test_a_command_start_leaves_the_aliases_parser_unloaded():
    """Every command that goes through the command table (`mailflow version` here; `sendmail -bv`, `queue ...`)
    imports mailflow.cli.server: the aliases(5) parser loads only when
    an aliases file is read (`table query --aliases`, an alias_maps table), as mailflow.tables.spec keeps it."""
    done = subprocess.run([sys.executable, "-c", LOADED_BY_VERSION], capture_output=True, text=True, timeout=30)
    [loaded] = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("loaded:")]
    assert "mailflow.cli.server" in loaded and "mailflow.aliases" not in loaded


def test_config_show_changed_lists_what_the_file_sets(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('relayhost = "[127.0.0.1]:2526"\n[queue]\nactive_limit = 50\n')
    result = mailflow("config", "show", "-n", "--config", str(cfg))
    assert result.returncode == 0
    assert result.stdout.splitlines() == ['relayhost = "[127.0.0.1]:2526"', "queue.active_limit = 50"]


def test_config_show_named_settings_and_unknown_names(tmp_path):
    result = mailflow("config", "show", "smtpd.listen", "myhostname")
    assert result.stdout.splitlines() == ['smtpd.listen = ["127.0.0.1:2525"]', 'myhostname = "localhost"']
    bad = mailflow("config", "show", "no_such_setting", "myhostname")  # (postconf's way: a warning, exit 0)
    assert (bad.returncode, bad.stdout) == (0, 'myhostname = "localhost"\n')
    assert bad.stderr == "mailflow config show: warning: no_such_setting: unknown setting\n"


class Limits:
    """resource.getrlimit and setrlimit of RLIMIT_NOFILE over a (soft, hard) pair kept here, not the process's."""

    def __init__(self, soft: int, hard: int):
        self.limits = (soft, hard)

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and limits[0] <= limits[1] == self.limits[1]
        self.limits = limits


def test_the_descriptor_estimate_counts_each_smtp_client_connection_cache():
    """Each SMTP and LMTP client ([smtp], relay, [lmtp], each [smtp.services.NAME] and [lmtp.services.NAME]) keeps
    its own idle sessions, up to MAX_IDLE, each a socket: a service whose cache is off keeps none. An
    [smtp.services.relay] is the relay client, not one more."""
    base = Config.model_validate({"relay_domains": ["example.com"], "transport_maps": ["inline:{a.example=lmtp:h}"]})
    services = base.model_copy(update={"smtp": Config.model_validate({"smtp": {"services": {
        "out2": {"bind_address": "192.0.2.2"}, "nocache": {"connection_cache_time_limit": 0}}}}).smtp,
        "lmtp": Config.model_validate({"lmtp": {"services": {
            "dovecot": {"port": 24}, "uncached": {"connection_cache_time_limit": 0}}}}).lmtp})
    assert cli_server.descriptors_needed(services) - cli_server.descriptors_needed(base) == 2 * 200
    lmtp_uncached = base.model_copy(update={"lmtp": Config.model_validate(
        {"lmtp": {"connection_cache_time_limit": 0}}).lmtp})
    assert cli_server.descriptors_needed(base) - cli_server.descriptors_needed(lmtp_uncached) == 200
    relay_uncached = base.model_copy(update={"smtp": Config.model_validate(
        {"smtp": {"services": {"relay": {"connection_cache_time_limit": 0}}}}).smtp})
    assert cli_server.descriptors_needed(base) - cli_server.descriptors_needed(relay_uncached) == 200


@pytest.mark.parametrize("settings, cached", [
    ({}, {"smtp"}),
    ({"relay_domains": ["example.com"]}, {"smtp", "relay"}),
    ({"relay_domains": ["example.com"], "relay_transport": "lmtp:inet:[127.0.0.1]:24"}, {"smtp", "lmtp"}),
    ({"relay_transport": "relay:[mx.example.net]"}, {"smtp"}),  # no relay_domains: no mail is the relay class's
    ({"default_transport": "relay"}, {"relay"}),
    ({"virtual_mailbox_domains": ["example.org"], "virtual_transport": "lmtp:unix:/run/dovecot/lmtp"},
     {"smtp", "lmtp"}),
    ({"local": {"mailbox_transport": "lmtp:unix:/run/dovecot/lmtp"}}, {"smtp", "lmtp"}),
    ({"smtpd": {"content_filter": "relay:[127.0.0.1]:10024"}}, {"smtp", "relay"}),
    ({"transport_maps": ["inline:{example.com=relay:[mx.example.net], example.org=:[mx2.example.net]}"]},
     {"smtp", "relay"}),
    ({"transport_maps": ["static:lmtp:inet:[127.0.0.1]:24"]}, {"smtp", "lmtp"}),
    ({"sender_dependent_default_transport_maps": ["inline:{<>=relay}"]}, {"smtp", "relay"}),
    ({"address_verify": {"default_transport": "lmtp:inet:[127.0.0.1]:24"}}, {"smtp", "lmtp"}),
    ({"transport_maps": ["regexp:/etc/mailflow/transport.re"]}, {"smtp", "relay", "lmtp"}),  # any, and may change
    ({"smtpd": {"listen": [], "content_filter": "lmtp:inet:127.0.0.1:10024"}}, {"smtp", "lmtp"}),  # pickup's mail
    # a FILTER action can name any client: an access table, a policy service, cleanup's checks
    ({"smtpd": {"recipient_restrictions": ["check_client_access inline:{ {127.0.0.1 = FILTER lmtp:unix:/run/a} }"]}},
     {"smtp", "relay", "lmtp"}),
    ({"smtpd": {"restriction_classes": {"scan": ["check_sender_access inline:{ {a@b = FILTER relay:[h]} }"]},
                "recipient_restrictions": ["scan"]}}, {"smtp", "relay", "lmtp"}),
    ({"smtpd": {"recipient_restrictions": ["check_policy_service inet:127.0.0.1:10040"]}}, {"smtp", "relay", "lmtp"}),
    ({"checks": {"body_checks": ["regexp:{ {/^x/ FILTER relay:[127.0.0.1]:10025} }"]}}, {"smtp", "relay", "lmtp"}),
    ({"smtpd": {"listeners": [{"address": "127.0.0.1:0", "role": "mta", "overrides": {
        "recipient_restrictions": ["check_recipient_access inline:{ {a@b = FILTER lmtp:h} }"]}}]}},
     {"smtp", "relay", "lmtp"}),
])
def test_the_descriptor_estimate_counts_a_client_cache_only_when_mail_can_reach_the_client(settings, cached):
    """A client no mail is routed to never connects, so its connection cache stays empty: relay's counts with
    relay_domains (relay_transport's mail) or when a setting or fixed table names it, [lmtp]'s likewise; a table
    read from a file can name any client (and change while the server runs)."""
    cfg = Config.model_validate(settings)
    assert cli_server.idle_sessions_cached(cfg) == 200 * len(cached)
    assert cli_server.routed_transports(cfg) & {"smtp", "relay", "lmtp"} == cached


def test_the_descriptor_estimate_counts_the_clients_postscreen_screens():
    """postscreen screens up to pre_queue_limit clients a listener before they reach a session slot: each holds a
    socket on top of the sessions' (the estimate left them out: 664 for pre_queue_limit 5000)."""
    screened = Config.model_validate({"smtpd": {"postscreen": {"enable": True, "pre_queue_limit": 5000}}})
    assert cli_server.descriptors_needed(screened) == 5000 + 2 * 100 + 2 * 100 + 200 + 64


def test_the_default_configuration_is_quiet_under_the_common_1024_descriptor_limit(monkeypatch, caplog):
    """1024 is the soft and hard limit of many hosts and containers: the default configuration (100 sessions, 100
    deliveries, the smtp client's cache: 664 descriptors) is not warned about there."""
    limits = Limits(1024, 1024)
    monkeypatch.setattr(cli_server.resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(cli_server.resource, "setrlimit", limits.setrlimit)
    caplog.set_level(logging.WARNING, logger="mailflow")
    cli_server.ensure_descriptors(Config.model_validate({}))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == []
    assert cli_server.descriptors_needed(Config.model_validate({})) == 2 * 100 + 2 * 100 + 200 + 64


def test_a_reload_that_needs_more_descriptors_than_the_limit_warns_once(monkeypatch, caplog):
    """relay_domains, mailbox_transport, max_sessions and delivery_concurrency_limit take effect at a reload: the
    watch serve keeps warns when a reloaded configuration needs more than the limit, and not again for the same
    need at the next reload."""
    limits = Limits(1024, 1024)
    monkeypatch.setattr(cli_server.resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(cli_server.resource, "setrlimit", limits.setrlimit)
    caplog.set_level(logging.WARNING, logger="mailflow")
    watch = cli_server.ensure_descriptors(Config.model_validate({}))
    grown = Config.model_validate({"relay_domains": ["example.com"],
                                   "local": {"mailbox_transport": "lmtp:unix:/run/dovecot/lmtp"}})
    watch.check(grown)
    watch.check(grown)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("the file descriptor limit (1024) is below the 1064")


async def test_serve_hands_each_configuration_a_reload_put_in_force_to_its_watch():
    """Only a reload that succeeded is checked: a refused one leaves the configuration in force as it was."""
    new = Config.model_validate({"relay_domains": ["example.com"]})
    outcomes = [ConfigError("", "relay_domains", "refused"), None]
    refused, checked_once = asyncio.Event(), asyncio.Event()
    checked: list[Config] = []
    mf = SimpleNamespace(config=Config.model_validate({}), replaced_in_use=False)

    async def reload(config: Config) -> None:
        refusal = outcomes.pop(0)
        if refusal:
            refused.set()
            raise refusal
        mf.config = config

    def reloaded(config: Config) -> None:
        checked.append(config)
        checked_once.set()

    mf.reload = reload
    wanted = asyncio.Event()
    level = logging.getLogger().level  # a reload puts the configuration's log level in force
    reloads = asyncio.create_task(_reloads(mf, wanted, lambda: new, "", reloaded))
    try:
        wanted.set()
        await asyncio.wait_for(refused.wait(), 5)
        wanted.set()  # (cleared before the reload it asked for began)
        await asyncio.wait_for(checked_once.wait(), 5)
    finally:
        reloads.cancel()
        await asyncio.gather(reloads, return_exceptions=True)
        gc.unfreeze()
        logging.getLogger().setLevel(level)
    assert checked == [new]


@pytest.mark.parametrize("hard, warned", [(4096, True), (10000, False)])
def test_serve_raises_the_descriptor_limit_to_the_hard_one_and_warns_when_it_is_too_low(monkeypatch, caplog, hard,
                                                                                         warned):
    """A soft limit of 64 under a hard one of 4096 (a shell's 1024 under a service manager's 524288, say) would cut
    the server off at a few dozen sessions: serve takes the hard one; a configuration needing more than even that
    is warned about at the start."""
    limits = Limits(64, hard)
    monkeypatch.setattr(cli_server.resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(cli_server.resource, "setrlimit", limits.setrlimit)
    caplog.set_level(logging.WARNING, logger="mailflow")
    cfg = Config.model_validate({"smtpd": {"max_sessions": 2000}})
    cli_server.ensure_descriptors(cfg)
    assert limits.limits == (hard, hard) and cli_server.descriptors_needed(cfg) == 4464  # 2*2000 + 2*100 + 200 + 64
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(warnings) == 1 and warnings[0].startswith("the file descriptor limit (4096) is below the 4464")
    else:
        assert warnings == []


@pytest.mark.parametrize("pid_file", ["symlink", "fifo"])
def test_reload_says_why_it_cannot_read_a_pid_file_that_is_a_link_or_a_fifo(tmp_path, write_config, pid_file):
    """queue_owner refuses (never follows nor waits on) such a pid file: `mailflow reload` says so, exit 1, where
    it ended in a traceback."""
    config = write_config(tmp_path / "mailflow.toml")
    queue = load_config(config).queue_path
    queue.mkdir(parents=True, exist_ok=True)
    if pid_file == "symlink":
        (tmp_path / "elsewhere").write_text("1\n")
        os.symlink(tmp_path / "elsewhere", queue / LOCK_NAME)
    else:
        os.mkfifo(queue / LOCK_NAME)
    done = mailflow("reload", "-c", str(config))
    assert done.returncode == 1, done.stderr
    assert f"mailflow reload: cannot read the pid file {queue / LOCK_NAME}: " in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
