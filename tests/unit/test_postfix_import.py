"""`mailflow config import`: real-world main.cf/master.cf shapes become a configuration that `config check` passes,
every Postfix line either translated or named in a comment (exit 1), an unreadable file exit 2; and the name table
(mailflow.config.postfix_names) covers every Postfix name docs/config.md's tables cite."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from mailflow.config import DEFAULTS, config_from_dict, flat_settings, load_config
from mailflow.config import postfix_names as names
from mailflow.config.postfix_import import import_postfix
from mailflow.config.smtpd import PostscreenConfig
from mailflow.restriction_vocabulary import split_item
from tests.support.client_certs import ClientPki
from tests.support.tools import require_tool

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
STANDARD_SERVICES = """\
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
error     unix  -       -       y       -       -       error
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       y       -       -       lmtp
anvil     unix  -       -       y       -       1       anvil
"""


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def run_import(main_cf: str, master_cf: str | None, out: Path) -> tuple[int, str]:
    args = ["config", "import", main_cf, "-o", str(out), "--hostname", "mx.example.test"]
    result = CliRunner().invoke(cli, args + (["--master", master_cf] if master_cf else []))
    return result.exit_code, result.stderr


def checked(config: Path) -> dict:
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output + result.stderr
    return tomllib.loads(config.read_text())


# --- the name table and the docs ----------------------------------------------------------------------------------

def cited_postfix_names() -> set[str]:
    """The Postfix parameter names docs/config.md's "Postfix counterpart" columns cite: backticked words that
    `postconf -d` knows, and for the rows that say "the same", the mailflow names themselves."""
    listing = subprocess.run([require_tool("postconf"), "-d"], capture_output=True, text=True, check=True).stdout
    known = {line.partition("=")[0].strip() for line in listing.splitlines()}  # (an empty default: `name =`)
    cited, in_table = set(), False
    for line in DOCS.read_text().splitlines():
        if line.startswith("| mailflow |") and "Postfix counterpart" in line:
            in_table = True
            continue
        if not (in_table and line.startswith("|")):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 3 or cells[0].startswith("---"):
            continue
        words = re.findall(r"`([A-Za-z0-9_]+)", cells[2])
        if cells[2].startswith("the same"):
            words += [w.rpartition(".")[2] for w in re.findall(r"`([a-z0-9_.]+)`", cells[0])]
        cited |= {w for w in words if w in known}
    return cited


def test_every_postfix_name_the_docs_cite_is_in_the_name_table_or_said_not_importable():
    cited = cited_postfix_names()
    assert len(cited) > 150  # the tables were read
    covered = {*names.SETTINGS, *names.BUILT_IN, *names.NOT_NEEDED, *names.NOT_IMPORTABLE, *names.CONVERTED}
    assert sorted(n for n in cited - covered if names.per_transport(n) is None) == []


def test_every_setting_the_table_names_is_a_mailflow_setting():
    settings = set(flat_settings(DEFAULTS)) | {f"smtpd.postscreen.{name}" for name in PostscreenConfig.model_fields}
    assert sorted({key for keys in names.SETTINGS.values() for key in keys} - settings) == []


# --- realistic configurations -------------------------------------------------------------------------------------

def test_the_debian_main_cf_and_master_cf_load_and_keep_their_meaning(tmp_path):
    """The files the Debian postfix package installs (/etc/postfix, made by its postinst)."""
    main_cf, master_cf = Path("/etc/postfix/main.cf"), Path("/etc/postfix/master.cf")
    if not main_cf.exists() or "Debian" not in main_cf.read_text():
        pytest.skip("no Debian postfix package's /etc/postfix/main.cf")
    aliases = write(tmp_path, "aliases", "postmaster: root\n")
    main = write(tmp_path, "main.cf", main_cf.read_text().replace("/etc/aliases", aliases))
    master = write(tmp_path, "master.cf", master_cf.read_text())
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["alias_maps"] == [f"texthash:{aliases}"]
    assert doc["smtpd"]["banner"] == "ESMTP Postfix (Debian/GNU)"
    assert doc["append_dot_mydomain"] is False
    assert doc["pipe"]["maildrop"]["argv"] == ["/usr/bin/maildrop", "-d", "${recipient}"]
    # uucp's `argv=uux`: where Postfix's pipe finds it on its PATH (/usr/bin:/bin), noted; nothing is left out
    assert (code, err) == (0, "")
    assert doc["pipe"]["uucp"]["argv"][0] in ("/usr/bin/uux", "/bin/uux")


def test_the_debian_main_cf_template_gets_postfix_s_defaults_written_out(tmp_path):
    debian = Path("/usr/share/postfix/main.cf.debian")
    if not debian.exists():
        pytest.skip("the Debian postfix package's main.cf.debian is not installed")
    main = write(tmp_path, "main.cf", debian.read_text())
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["myhostname"] == "mx.example.test"  # --hostname: the system's name Postfix would take
    assert doc["mydestination"] == ["mx.example.test", "localhost.example.test", "localhost"]
    assert doc["smtpd"]["listen"] == ["0.0.0.0:25", "[::]:25"]
    text = (tmp_path / "mailflow.toml").read_text()
    assert "# (no mydestination in main.cf) Postfix's default: $myhostname, localhost.$mydomain, localhost" in text
    assert "biff = no is built in" in text


ISPMAIL_MAIN = """\
    # ISPmail (workaround.org) style: virtual mailboxes in Dovecot over LMTP, Dovecot SASL, rspamd as a milter
    myhostname = mx.example.org
    mydomain = example.org
    myorigin = $mydomain
    mydestination = $myhostname, localhost.$mydomain, localhost
    mynetworks = 127.0.0.0/8 [::1]/128
    inet_interfaces = all
    inet_protocols = ipv4
    smtpd_banner = $myhostname ESMTP
    biff = no
    append_dot_mydomain = no
    compatibility_level = 3.6
    smtpd_tls_cert_file = {cert}
    smtpd_tls_key_file = {cert}
    smtpd_tls_security_level = may
    smtp_tls_security_level = may
    smtpd_sasl_type = dovecot
    smtpd_sasl_path = private/auth
    smtpd_sasl_auth_enable = yes
    smtpd_tls_auth_only = yes
    virtual_mailbox_domains = hash:{domains}
    virtual_mailbox_maps = proxy:hash:{mailboxes}
    virtual_alias_maps = hash:{aliases}
    virtual_transport = lmtp:unix:private/dovecot-lmtp
    smtpd_relay_restrictions = permit_mynetworks
       permit_sasl_authenticated
       defer_unauth_destination
    smtpd_recipient_restrictions =
       check_policy_service inet:127.0.0.1:10023,
       check_policy_service unix:private/policyd-spf
    smtpd_milters = inet:127.0.0.1:11332
    non_smtpd_milters = $smtpd_milters
    milter_default_action = accept
    milter_protocol = 6
    message_size_limit = 52428800
    mailbox_size_limit = 0
    recipient_delimiter = +
    maximal_queue_lifetime = 3
    dovecot_destination_recipient_limit = 1
    """

ISPMAIL_MASTER = textwrap.dedent("""\
    smtp      inet  n       -       y       -       -       smtpd
    submission inet n       -       y       -       -       smtpd
      -o syslog_name=postfix/submission
      -o smtpd_tls_security_level=encrypt
      -o smtpd_sasl_auth_enable=yes
      -o smtpd_client_restrictions=permit_sasl_authenticated,reject
      -o milter_macro_daemon_name=ORIGINATING
    dovecot   unix  -       n       n       -       -       pipe
      flags=DRhu user=vmail:vmail argv=/usr/lib/dovecot/deliver -f ${sender} -d ${recipient}
    """) + STANDARD_SERVICES


def ispmail(tmp_path: Path) -> tuple[str, str]:
    pki = ClientPki(tmp_path)
    tables = {n: write(tmp_path, n, "example.org OK\n") for n in ("domains", "mailboxes", "aliases")}
    main = write(tmp_path, "main.cf", ISPMAIL_MAIN.format(cert=pki.server_cert, **tables))
    return main, write(tmp_path, "master.cf", ISPMAIL_MASTER)


def test_an_ispmail_style_virtual_mailbox_server_translates_whole(tmp_path):
    main, master = ispmail(tmp_path)
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["myorigin"] == "example.org"
    assert doc["mydestination"] == ["mx.example.org", "localhost.example.org", "localhost"]
    assert doc["virtual_mailbox_maps"] == [f"texthash:{tmp_path}/mailboxes"]  # proxy: dropped, hash: as texthash:
    # Postfix takes a relative unix: path from the queue directory
    assert doc["virtual_transport"] == "lmtp:unix:/var/spool/postfix/private/dovecot-lmtp"
    assert doc["smtpd"]["sasl_path"] == "/var/spool/postfix/private/auth"
    assert doc["smtpd"]["relay_restrictions"] == ["permit_mynetworks", "permit_sasl_authenticated",
                                                  "defer_unauth_destination"]  # continuation lines joined
    assert doc["smtpd"]["recipient_restrictions"] == [
        "check_policy_service inet:127.0.0.1:10023",
        "check_policy_service unix:/var/spool/postfix/private/policyd-spf"]  # from queue_directory too
    assert doc["milter"]["non_smtpd_milters"] == ["inet:127.0.0.1:11332"]
    assert doc["queue"]["maximal_queue_lifetime"] == "3d"  # a bare number in Postfix's unit for it
    assert doc["queue"]["transport_destination_recipient_limit"] == {"dovecot": 1}
    assert doc["smtpd"]["listen"] == ["0.0.0.0:25"]
    [submission] = doc["smtpd"]["listeners"]
    assert submission["address"] == "0.0.0.0:587" and submission["role"] == "submission"
    assert submission["overrides"]["client_restrictions"] == ["permit_sasl_authenticated", "reject"]
    assert submission["overrides"]["sasl_auth_required"] is True
    assert doc["pipe"]["dovecot"] == {"flags": "DRhu", "user": "vmail", "argv": [
        "/usr/lib/dovecot/deliver", "-f", "${sender}", "-d", "${recipient}"]}


def test_the_same_server_with_mysql_tables_exits_1_naming_each_line_left_out(tmp_path):
    main, master = ispmail(tmp_path)
    Path(main).write_text(Path(main).read_text().replace(
        f"virtual_alias_maps = hash:{tmp_path}/aliases", "virtual_alias_maps = mysql:/etc/postfix/mysql-aliases.cf"))
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "main.cf:23: virtual_alias_maps: mailflow has no mysql: lookup table" in err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "#   main.cf:23: virtual_alias_maps = mysql:/etc/postfix/mysql-aliases.cf  -- mailflow has no mysql:" in text
    assert "virtual_alias_maps" not in checked(tmp_path / "mailflow.toml")


RELAY_SATELLITE = """\
    # a null client: all mail to the provider's submission port, with a password
    myhostname = box.example.net
    myorigin = example.net
    mydestination =
    inet_interfaces = loopback-only
    relayhost = [smtp.provider.example]:587
    smtp_sasl_auth_enable = yes
    smtp_sasl_password_maps = hash:{passwords}
    smtp_sasl_security_options = noanonymous
    smtp_tls_security_level = encrypt
    smtp_tls_CAfile = {ca}
    default_destination_concurrency_limit = 2
    """


def test_a_relay_only_satellite_translates_whole(tmp_path):
    pki = ClientPki(tmp_path)
    passwords = write(tmp_path, "sasl_passwd", "[smtp.provider.example]:587 me:secret\n")
    main = write(tmp_path, "main.cf", RELAY_SATELLITE.format(passwords=passwords, ca=pki.ca_file))
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["relayhost"] == "[smtp.provider.example]:587" and doc["mydestination"] == []
    assert doc["smtp"]["sasl_password_maps"] == [f"texthash:{passwords}"]
    assert doc["smtp"]["sasl_tls_required"] is False  # noanonymous alone lets Postfix send it without TLS
    assert doc["smtpd"]["listen"] == ["127.0.0.1:25", "[::1]:25"]


def test_smtp_sasl_password_maps_without_smtp_sasl_auth_enable_is_left_out(tmp_path):
    main = write(tmp_path, "main.cf", "relayhost = [gw.example]\nsmtp_sasl_password_maps = inline:{x=y:z}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1 and "smtp_sasl_auth_enable is not yes" in err


POSTSCREEN_MAIN = """\
    myhostname = mx.example.com
    postscreen_access_list = permit_mynetworks, cidr:/etc/postfix/postscreen_access.cidr
    postscreen_blacklist_action = drop
    postscreen_dnsbl_sites = zen.spamhaus.org*2, b.barracudacentral.org=127.0.0.[2..11]*1,
        list.dnswl.org=127.0.[0..255].[1..3]*-4
    postscreen_dnsbl_threshold = 2
    postscreen_dnsbl_whitelist_threshold = -1
    postscreen_dnsbl_action = enforce
    postscreen_greet_action = enforce
    postscreen_greet_wait = 3
    postscreen_greet_ttl = 2
    postscreen_greet_banner = $smtpd_banner
    postscreen_dnsbl_max_ttl = 2
    postscreen_dnsbl_timeout = 5s
    postscreen_pre_queue_limit = 50
    postscreen_command_time_limit = 60
    postscreen_pipelining_enable = no
    postscreen_bare_newline_enable = yes
    postscreen_bare_newline_action = enforce
    postscreen_non_smtp_command_ttl = 7
    postscreen_forbidden_commands = $smtpd_forbidden_commands
    smtpd_forbidden_commands = CONNECT GET POST XYZZY regexp:{{/^[^A-Z]/ Bogus}}
    postscreen_whitelist_interfaces = !192.0.2.25 static:all
    postscreen_cache_map = btree:$data_directory/postscreen_cache
    postscreen_dnsbl_reply_map = texthash:/etc/postfix/dnsbl_reply
    smtpd_milters = inet:localhost:11332, unix:opendkim/opendkim.sock
    milter_default_action = accept
    smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,
        reject_rbl_client zen.spamhaus.org
    """

POSTSCREEN_MASTER = textwrap.dedent("""\
    smtp      inet  n       -       y       -       1       postscreen
    smtpd     pass  -       -       y       -       -       smtpd
      -o smtpd_helo_required=yes
    dnsblog   unix  -       -       y       -       0       dnsblog
    tlsproxy  unix  -       -       y       -       0       tlsproxy
    127.0.0.1:10025 inet n  -       n       -       -       smtpd
      -o smtpd_recipient_restrictions=permit_mynetworks,reject
    """) + STANDARD_SERVICES


def test_a_postscreen_front_is_translated_and_its_smtpd_kept(tmp_path):
    (tmp_path / "postscreen_access.cidr").write_text("192.0.2.0/24 reject\n")  # (check-config reads them)
    (tmp_path / "dnsbl_reply").write_text("zen.spamhaus.org Spamhaus\n")
    main = write(tmp_path, "main.cf", POSTSCREEN_MAIN.replace(" /etc/postfix/", f" {tmp_path}/").replace(
        ":/etc/postfix/", f":{tmp_path}/"))
    master = write(tmp_path, "master.cf", POSTSCREEN_MASTER)
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "mailflow has no postscreen" not in err
    assert "postscreen_cache_map" in err and "postscreen_dnsbl_reply_map" not in err
    assert err.count("main.cf:") == 1, err  # the cache map only
    doc = checked(tmp_path / "mailflow.toml")
    screen = doc["smtpd"]["postscreen"]
    assert screen == {"enable": True, "access_list": ["permit_mynetworks", f"cidr:{tmp_path}/postscreen_access.cidr"],
                      "denylist_action": "drop",
                      "dnsbl_sites": ["zen.spamhaus.org*2", "b.barracudacentral.org=127.0.0.[2..11]*1",
                                      "list.dnswl.org=127.0.[0..255].[1..3]*-4"],
                      "dnsbl_threshold": 2, "dnsbl_allowlist_threshold": -1, "dnsbl_action": "enforce",
                      "greet_action": "enforce", "greet_wait": "3s", "greet_ttl": "2d",  # Postfix's units
                      "greet_banner": "$smtpd_banner", "dnsbl_max_ttl": "2h", "dnsbl_timeout": "5s",
                      "pre_queue_limit": 50, "command_time_limit": "60s",
                      "pipelining_enable": False, "bare_newline_enable": True,
                      "bare_newline_action": "enforce", "non_smtp_command_ttl": "7d",  # (30d by default: days)
                      "allowlist_interfaces": ["!192.0.2.25", "static:all"],
                      "dnsbl_reply_map": f"texthash:{tmp_path}/dnsbl_reply"}
    assert doc["smtpd"]["forbid_cmds"] == ["CONNECT", "GET", "POST", "XYZZY"]  # (the regexp: mailflow's own rule)
    assert doc["smtpd"]["milters"] == ["inet:localhost:11332", "unix:/var/spool/postfix/opendkim/opendkim.sock"]
    assert doc["smtpd"]["recipient_restrictions"] == ["permit_mynetworks", "reject_unauth_destination",
                                                      "reject_rbl_client zen.spamhaus.org"]
    # the pass service's -o apply to port 25, on every address (inet_protocols = all: both families), screened;
    # the content filter's return listener is not (Postfix runs smtpd there, not postscreen)
    listeners = doc["smtpd"]["listeners"]
    assert [(x["address"], x["overrides"].get("helo_required"), x["overrides"].get("postscreen"))
            for x in listeners] == [("0.0.0.0:25", True, None), ("[::]:25", True, None),
                                    ("127.0.0.1:10025", None, {"enable": False})]
    assert doc["smtpd"]["listen"] == []


def test_forbidden_commands_are_words_and_the_default_rule_is_built_in(tmp_path):
    main = write(tmp_path, "main.cf", "smtpd_forbidden_commands = CONNECT texthash:/etc/postfix/bogus\n"
                                      "postscreen_forbidden_commands = GET, POST\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1 and "smtpd_forbidden_commands: texthash:/etc/postfix/bogus: mailflow's forbidden commands are " \
                         "words, not tables" in err, err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "postscreen_forbidden_commands: mailflow refuses a command that does not begin with a letter" in text
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["postscreen"]["forbidden_commands"] == ["GET", "POST"]
    assert "forbid_cmds" not in doc["smtpd"]


# --- syntax --------------------------------------------------------------------------------------------------------

def test_main_cf_syntax_as_postconf_reads_it(tmp_path):
    main = write(tmp_path, "main.cf", """\
        # comment
        myhostname = first.example
          # a comment line inside is skipped
        myhostname = mx.example.com
        relay_domains = ${mydomain}, $(myhostname)
            other.example
        smtpd_banner = ${myhostname} ${relay_domains?relaying} $${literal}
        """)
    result = import_postfix(main, hostname="unused.example")
    assert result.settings["myhostname"] == "mx.example.com"  # the last definition wins
    assert result.settings["relay_domains"] == ["example.com", "mx.example.com", "other.example"]
    assert result.settings["smtpd.banner"] == "relaying ${literal}"


def test_a_reference_to_an_unknown_parameter_is_left_out_not_guessed(tmp_path):
    main = write(tmp_path, "main.cf", "relay_domains = $virtual_maps\n")
    result = import_postfix(main, hostname="mx.example")
    assert "relay_domains" not in result.settings
    assert [(i.name, i.why) for i in result.left_out] == [
        ("relay_domains", "refers to $virtual_maps, a Postfix default the importer does not know")]


@pytest.mark.parametrize("text, where", [("myhostname mx.example\n", ":1: missing '='"),
                                         ("  relayhost = x\n", ":1: a continuation line"),
                                         (b"relayhost = \xff\n", ": not UTF-8")])
def test_an_unreadable_main_cf_exits_2_with_file_line_and_reason(tmp_path, text, where):
    main = tmp_path / "main.cf"
    main.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = run_import(str(main), None, tmp_path / "out.toml")
    assert code == 2 and f"{main}{where}" in err


def test_a_missing_file_exits_2(tmp_path):
    code, err = run_import(str(tmp_path / "nope.cf"), None, tmp_path / "out.toml")
    assert code == 2 and "nope.cf" in err


AMAVIS_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
smtp-amavis unix -      -       n       -       2       smtp
  -o smtp_data_done_timeout=1200
  -o syslog_name=postfix/amavis
127.0.0.1:10025 inet n  -       n       -       -       smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
"""


def test_an_after_queue_content_filter_gets_its_return_listener_and_its_own_smtp_service(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ncontent_filter = smtp-amavis:[127.0.0.1]:10024\n"
                                      "receive_override_options = no_address_mappings\n")
    code, err = run_import(main, write(tmp_path, "master.cf", AMAVIS_MASTER), tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["content_filter"] == "smtp-amavis:[127.0.0.1]:10024"  # master.cf's service, as named
    assert doc["smtp"]["services"] == {"smtp-amavis": {"data_timeout": "1200s"}}
    assert doc["queue"]["transport_concurrency_limit"] == {"smtp-amavis": 2}
    [back] = doc["smtpd"]["listeners"]
    assert back["address"] == "127.0.0.1:10025" and back["role"] == "mta"
    assert back["overrides"] == {"content_filter": "", "receive_override_options": [
        "no_unknown_recipient_checks", "no_header_body_checks"], "recipient_restrictions": ["permit_mynetworks",
                                                                                            "reject"]}
    assert code == 1
    assert err.splitlines()[1:] == [
        "  master.cf:5: master.cf 127.0.0.1:10025 -o mynetworks: not a per-listener setting in mailflow"]


FILTER_README_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
smtp-amavis unix - - n - 2 smtp -o smtp_data_done_timeout=1200 -o smtp_send_xforward_command=yes
  -o disable_dns_lookups=yes -o max_use=20
relay     unix  -       -       n       -       -       smtp -o smtp_tls_security_level=encrypt -o smtp_fallback_relay=
slow      unix  -       -       n       -       1       smtp -o syslog_name=postfix-slow
  -o smtp_helo_name=slow.example.com
dovecot-lmtp unix -     -       n       -       4       lmtp -o lmtp_connect_timeout=10s -o lmtp_rcpt_timeout=60s
"""


def test_filter_readme_s_client_services_are_named_services_with_their_own_settings(tmp_path):
    """master.cf's second smtp/lmtp services (FILTER_README's smtp-amavis, a slow one, a Dovecot LMTP one) are
    [smtp.services.NAME] / [lmtp.services.NAME] with each -o mailflow has, maxproc their concurrency limits; what
    mailflow has no use for is noted (syslog_name, max_use), what it lacks left out with the reason."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ncontent_filter = smtp-amavis:[127.0.0.1]:10024\n"
                                      "transport_maps = inline:{slow.example=slow:}\n")
    code, err = run_import(main, write(tmp_path, "master.cf", FILTER_README_MASTER), tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["content_filter"] == "smtp-amavis:[127.0.0.1]:10024"
    assert doc["transport_maps"] == ["inline:{slow.example=slow:}"]
    assert doc["smtp"]["services"] == {"smtp-amavis": {"data_timeout": "1200s"},
                                       "relay": {"tls_security_level": "encrypt", "fallback_relay": []},
                                       "slow": {"helo_name": "slow.example.com"}}
    assert doc["lmtp"]["services"] == {"dovecot-lmtp": {"connect_timeout": "10s"}}
    assert doc["queue"]["transport_concurrency_limit"] == {"smtp-amavis": 2, "slow": 1, "dovecot-lmtp": 4}
    assert code == 1
    left_out = err.splitlines()[1:]
    assert left_out[:2] == [
        "  master.cf:2: master.cf smtp-amavis -o smtp_send_xforward_command: no mailflow counterpart (not in "
        "docs/config.md's tables)",
        "  master.cf:2: master.cf smtp-amavis -o disable_dns_lookups: only disable_dns_lookups = no is "
        "mailflow's behaviour: mailflow always uses the DNS (a [host] next hop, as a content filter's "
        "[127.0.0.1]:10024, is never looked up as MX)"]
    assert left_out[2:] == [
        "  master.cf:7: master.cf dovecot-lmtp -o lmtp_rcpt_timeout: mailflow's lmtp.command_timeout is one value for "
        "4 Postfix timeouts, and they differ (lmtp_lhlo_timeout = 300s, lmtp_mail_timeout = 300s, lmtp_rcpt_timeout "
        "= 60s, lmtp_data_init_timeout = 120s)"]
    text = (tmp_path / "mailflow.toml").read_text()
    assert "smtp-amavis -o max_use=20 not needed" in text
    assert ("slow -o syslog_name=postfix-slow not carried over: mailflow logs this service's lines under "
            "log.syslog_name as smtp's; Postfix's as postfix-slow/smtp") in text
    assert '[smtp.services.smtp-amavis]\ndata_timeout = "1200s"\n' in text


RELAY_DOMAIN_MAIN = "myhostname = mx.example.com\nrelay_domains = relay.example\nrelayhost = [10.0.0.1]\n"


@pytest.mark.parametrize("relay_line, relay_transport, section", [
    ("", "relay-absent", None),
    ("relay unix - - n - - lmtp\n  -o syslog_name=postfix/$service_name\n", "lmtp", None),
    ("relay unix - - n - 3 lmtp -o lmtp_connect_timeout=10s\n", "relay-lmtp",
     ("lmtp", "services", "relay-lmtp", {"connect_timeout": "10s"})),
    ("relay unix - n n - - pipe flags=F user=nobody argv=/usr/bin/relay-in ${recipient}\n", "relay-pipe",
     ("pipe", "relay-pipe", "argv", ["/usr/bin/relay-in", "${recipient}"])),
    ("relay unix - - n - - discard\n", "discard", None),
    ("relay unix - - n - - error\n", "error", None),
], ids=["missing", "lmtp", "lmtp-o", "pipe", "discard", "error"])
def test_relay_domain_mail_goes_where_master_cf_s_relay_sends_it_as_in_postfix(tmp_path, relay_line,
                                                                               relay_transport, section):
    """Postfix hands relay_transport's mail (its default: master.cf's `relay`) to whatever master.cf's relay runs,
    and defers it when there is none (checked on a private Postfix: qmgr's `warning: connect to transport
    private/relay`, error's `dsn=4.3.0, status=deferred (mail transport unavailable)`); mailflow's `relay` is its
    SMTP relay, so relay_transport names what does the same (it went out over SMTP)."""
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n" + relay_line)
    code, err = run_import(write(tmp_path, "main.cf", RELAY_DOMAIN_MAIN), master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert doc["relay_transport"] == relay_transport
    result = CliRunner().invoke(cli, ["address", "-c", str(tmp_path / "mailflow.toml"), "u@relay.example"])
    assert re.search(rf"transport:\s+{relay_transport.partition(':')[0]}\b", result.output), result.output
    if section is not None:
        *path, key, value = section
        table = doc
        for name in path:
            table = table[name]
        assert table[key] == value
    if relay_transport == "relay-absent":  # (a transport mailflow does not define: qmgr defers its mail, 4.3.0)
        assert "relay-absent" not in config_from_dict(doc).defined_transports()


@pytest.mark.parametrize("main_cf", ["", "relay_transport = relay:[10.0.0.2]\n"], ids=["default", "main.cf"])
def test_main_cf_s_relay_transport_naming_relay_follows_master_cf_s_relay_and_keeps_its_next_hop(tmp_path, main_cf):
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - - lmtp\n")
    code, err = run_import(write(tmp_path, "main.cf", RELAY_DOMAIN_MAIN + main_cf), master, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert checked(tmp_path / "mailflow.toml")["relay_transport"] == ("lmtp:[10.0.0.2]" if main_cf else "lmtp")


def test_a_relay_master_cf_runs_with_a_daemon_mailflow_lacks_is_reported_with_relay_transport(tmp_path):
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - - bounce\n")
    code, err = run_import(write(tmp_path, "main.cf", RELAY_DOMAIN_MAIN), master, tmp_path / "mailflow.toml")
    assert code == 1
    assert [line.split(": ")[1] for line in err.splitlines()[1:]] == ["master.cf relay", "relay_transport"]
    assert "relay_domains mail would go over mailflow's SMTP relay where Postfix's goes to that bounce service" in err


RELAY_ROUTES_MAIN = ("myhostname = mx.example.com\nmydestination =\ndefault_transport = relay\n"
                     "transport_maps = inline:{ a.example=relay:[10.0.0.3], b.example=smtp:[10.0.0.4] }\n"
                     "address_verify_transport_maps = static:relay\n")


@pytest.mark.parametrize("relay_line, route", [
    ("", "relay-absent"),
    ("relay unix - - n - - lmtp\n", "lmtp"),
    ("relay unix - n n - - pipe flags=F user=nobody argv=/usr/bin/relay-in ${recipient}\n", "relay-pipe"),
], ids=["missing", "lmtp", "pipe"])
def test_default_transport_and_transport_maps_naming_relay_go_where_master_cf_s_relay_sends_them(tmp_path, relay_line,
                                                                                              route):
    """Not relay_transport alone: default_transport = relay, a transport_maps entry `relay:[host]` (and address
    verification's) reach master.cf's relay in Postfix too (trivial-rewrite names the transport, qmgr hands it to
    that service or defers, 4.3.0, when there is none): each is written to name what does the same, its next hop
    kept (but for relay-absent, whose mail is deferred); a route to smtp stays."""
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n" + relay_line)
    code, err = run_import(write(tmp_path, "main.cf", RELAY_ROUTES_MAIN), master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert doc["default_transport"] == route
    hop = "" if route == "relay-absent" else ":[10.0.0.3]"
    assert doc["transport_maps"] == [f"inline:{{ {{ a.example = {route}{hop} }}, {{ b.example = smtp:[10.0.0.4] }} }}"]
    assert doc["address_verify"]["transport_maps"] == [f"static:{{ {route} }}"]
    for address, transport in [("u@a.example", route), ("u@b.example", "smtp"), ("u@c.example", route)]:
        result = CliRunner().invoke(cli, ["address", "-c", str(tmp_path / "mailflow.toml"), address])
        assert re.search(rf"transport:\s+{transport}\b", result.output), result.output


def test_a_listener_s_content_filter_naming_relay_follows_master_cf_s_relay(tmp_path):
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd -o content_filter=relay:[127.0.0.1]:10025\n"
                                          "relay unix - - n - - lmtp\n")
    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.example.com\n"), master,
                           tmp_path / "mailflow.toml")
    assert code == 0, err
    listeners = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert [listener["overrides"]["content_filter"] for listener in listeners] == ["lmtp:[127.0.0.1]:10025"] * 2


def test_a_transport_file_entry_naming_relay_is_reported_with_its_line_and_what_to_write(tmp_path):
    """The import writes no table file: a texthash entry naming relay, read as it is, would go over mailflow's SMTP
    relay, so it is reported (exit 1) with its line and the route that does what Postfix does; other entries and
    the table stay."""
    table = write(tmp_path, "transport", "b.example smtp:[10.0.0.4]\n# relay\na.example relay:[10.0.0.3]\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - - lmtp\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ntransport_maps = texthash:{table}\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert f"{table}:3: transport_maps entry a.example" in err
    assert "write lmtp:[10.0.0.3] there (master.cf's relay runs lmtp (master.cf:2)" in err
    assert checked(tmp_path / "mailflow.toml")["transport_maps"] == [f"texthash:{table}"]


LMTP_RELAY = "smtp inet n - y - - smtpd\nrelay unix - - n - - lmtp\n"


@pytest.mark.parametrize("kind, line, lookup", [
    ("pcre", "/@a\\.example$/ relay:[10.0.0.3]", "/@a\\.example$/"),
    ("regexp", "!/@b\\.example$/i relay:[10.0.0.3]", "!/@b\\.example$/i"),
    ("cidr", "10.0.0.0/8 relay:[10.0.0.3]", "10.0.0.0/8"),
])
def test_a_regexp_or_cidr_transport_file_entry_naming_relay_is_reported_with_its_line(tmp_path, kind, line, lookup):
    """A regexp:, pcre: or cidr: transport table naming relay was written unchanged with no word (exit 0), and
    mailflow sent that mail over its SMTP relay where Postfix speaks master.cf's relay (LMTP here): reported with
    its line, as a texthash entry is."""
    table = write(tmp_path, "transport", f"# routes\n/x/ smtp:[10.0.0.4]\n{line}\n" if kind != "cidr"
                  else f"# routes\n192.0.2.0/24 smtp:[10.0.0.4]\n{line}\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ntransport_maps = {kind}:{table}\n")
    code, err = run_import(main, write(tmp_path, "master.cf", LMTP_RELAY), tmp_path / "mailflow.toml")
    assert code == 1
    assert f"{table}:3: transport_maps entry {lookup}" in err
    assert "write lmtp:[10.0.0.3] there (master.cf's relay runs lmtp (master.cf:2)" in err


@pytest.mark.parametrize("setting, kind, line, lookup", [
    ("smtpd_client_restrictions = check_client_access", "cidr", "10.0.0.0/8 FILTER relay:[127.0.0.1]:10025",
     "10.0.0.0/8"),
    ("smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination, check_sender_access", "hash",
     "a@b.example filter relay:[127.0.0.1]:10025", "a@b.example"),
    ("header_checks =", "regexp", "/^Subject:/ FILTER relay:[127.0.0.1]:10025", "/^Subject:/"),
])
def test_a_filter_action_naming_relay_is_reported_with_its_line(tmp_path, setting, kind, line, lookup):
    """An access table's or a header check's FILTER relay:… goes to master.cf's relay in Postfix (LMTP here),
    to mailflow's SMTP relay as written: reported with its line and what to write (the import exited 0)."""
    table = write(tmp_path, "table", f"{line}\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\n{setting} {kind}:{table}\n")
    code, err = run_import(main, write(tmp_path, "master.cf", LMTP_RELAY), tmp_path / "mailflow.toml")
    assert code == 1, err
    assert f"{table}:1: " in err and f"entry {lookup}" in err
    assert "write filter lmtp:[127.0.0.1]:10025 there (master.cf's relay runs lmtp (master.cf:2)" in err.lower()


def test_an_inline_access_table_s_filter_naming_relay_is_reported(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nsmtpd_client_restrictions = "
                                      "check_client_access inline:{ {10.0.0.1 = FILTER relay:[127.0.0.1]:10025} }\n")
    code, err = run_import(main, write(tmp_path, "master.cf", LMTP_RELAY), tmp_path / "mailflow.toml")
    assert code == 1
    assert "smtpd.client_restrictions entry 10.0.0.1" in err and "write FILTER lmtp:[127.0.0.1]:10025 there" in err


def test_a_listener_s_access_table_filter_naming_relay_is_reported(tmp_path):
    table = write(tmp_path, "access", "10.0.0.0/8 FILTER relay:[127.0.0.1]:10025\n")
    master = write(tmp_path, "master.cf", f"smtp inet n - y - - smtpd -o smtpd_client_restrictions="
                                          f"check_client_access,cidr:{table}\nrelay unix - - n - - lmtp\n")
    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.example.com\n"), master,
                           tmp_path / "mailflow.toml")
    assert code == 1
    assert f"{table}:1: " in err and "write FILTER lmtp:[127.0.0.1]:10025 there" in err


def test_a_transport_table_the_import_cannot_read_is_reported_when_master_cf_s_relay_is_not_smtp(tmp_path):
    """An sqlite: table's answers are not read by the import: that it may name relay is said (it was not)."""
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ntransport_maps = sqlite:{tmp_path}/t.cf\n")
    code, err = run_import(main, write(tmp_path, "master.cf", LMTP_RELAY), tmp_path / "mailflow.toml")
    assert code == 1
    assert "the import cannot read this table's entries: an entry naming relay would go over mailflow's SMTP" in err


def test_filter_tables_are_not_reported_when_master_cf_s_relay_is_smtp(tmp_path):
    table = write(tmp_path, "access", "10.0.0.0/8 FILTER relay:[127.0.0.1]:10025\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\n"
                                      f"smtpd_client_restrictions = check_client_access cidr:{table}\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - - smtp\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err


def test_default_transport_naming_a_relay_mailflow_cannot_run_is_reported(tmp_path):
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - - bounce\n")
    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.example.com\ndefault_transport = relay\n"),
                           master, tmp_path / "mailflow.toml")
    assert code == 1
    assert [line.split(": ")[1] for line in err.splitlines()[1:]] == ["master.cf relay", "default_transport"]
    assert "default_transport's mail would go over mailflow's SMTP relay where Postfix's goes to that bounce" in err
    assert "default_transport" not in checked(tmp_path / "mailflow.toml")


@pytest.mark.parametrize("relay_line, told", [
    ("relay unix - - n - - smtp\n  -o syslog_name=postfix/$service_name\n",
     "relay -o syslog_name=postfix/$service_name not carried over: mailflow logs every line of relay's client as "
     "relay/smtp (under log.syslog_name), as this makes Postfix's"),
    ("relay unix - - n - - smtp\n", "relay has no -o syslog_name: Postfix logs its lines as smtp (a master.cf from "
     "before Postfix 3.3); mailflow logs them as relay/smtp"),
], ids=["stock", "before-3.3"])
def test_the_relay_service_s_log_name_is_noted_as_it_is(tmp_path, relay_line, told):
    """Postfix 3.3+'s master.cf logs relay as postfix/relay/smtp (-o syslog_name=postfix/$service_name), as mailflow
    does; an older master.cf kept across upgrades has no such -o: Postfix logs relay's lines as smtp."""
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n" + relay_line)
    code, err = run_import(write(tmp_path, "main.cf", RELAY_DOMAIN_MAIN), master, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert f"# Note: master.cf:2: {told}\n" in (tmp_path / "mailflow.toml").read_text()


def test_a_main_cf_that_is_not_a_regular_file_exits_2(tmp_path):
    code, err = run_import(str(tmp_path), None, tmp_path / "out.toml")
    assert code == 2 and str(tmp_path) in err


# --- refusals of a listener's override or of a check across settings: left out, never a crash ----------------------

@pytest.mark.parametrize("main_cf, master_cf, left_out", [
    ("smtpd_sasl_auth_enable = yes\nsmtpd_sasl_type = cyrus\n", None,
     ["main.cf:2: smtpd_sasl_type", "main.cf:1: smtpd_sasl_auth_enable"]),
    ("smtpd_sasl_type = dovecot\nsmtpd_sasl_path = /run/dovecot/auth\nsmtpd_tls_security_level = encrypt\n", None,
     ["main.cf:3: smtpd_tls_security_level"]),
    ("myhostname = mx.example.com\n", "smtp inet n - y - - smtpd\n2525 inet n - y - - smtpd\n"
     "  -o smtpd_tls_security_level=bogus\n",
     ["master.cf:2: listener 0.0.0.0:2525 -o smtpd_tls_security_level=bogus",
      "master.cf:2: listener [::]:2525 -o smtpd_tls_security_level=bogus"]),
    ("myhostname = mx.example.com\n", "smtp inet n - y - - smtpd\nsmtps inet n - y - - smtpd\n"
     "  -o smtpd_tls_wrappermode=yes\n  -o smtpd_sasl_auth_enable=yes\n",
     ["master.cf:2: listener 0.0.0.0:465", "master.cf:2: listener [::]:465"]),
])
def test_what_mailflow_refuses_is_left_out_with_its_line(tmp_path, main_cf, master_cf, left_out):
    master = write(tmp_path, "master.cf", master_cf) if master_cf else None
    code, err = run_import(write(tmp_path, "main.cf", main_cf), master, tmp_path / "mailflow.toml")
    assert code == 1, err
    assert [line.partition(": mailflow refuses it")[0].strip() for line in err.splitlines()[1:]] == left_out
    checked(tmp_path / "mailflow.toml")


@pytest.mark.parametrize("main_cf, told", [
    ("smtpd_sasl_path = smtpd\n", "smtpd_sasl_type is cyrus (Postfix's default: no smtpd_sasl_type line)"),
    ("smtpd_sasl_type = cyrus\nsmtpd_sasl_path = smtpd\n", "smtpd_sasl_type is cyrus"),
])
def test_a_sasl_path_under_postfixs_default_sasl_type_is_left_out_as_a_cyrus_name(tmp_path, main_cf, told):
    """Postfix's smtpd_sasl_type defaults to cyrus (postconf -d): its smtpd_sasl_path is then a Cyrus SASL
    application name (its default `smtpd`), not a socket; it used to become /var/spool/postfix/smtpd, which nothing
    serves."""
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                                          "  -o smtpd_sasl_path=private/auth\n")
    code, err = run_import(write(tmp_path, "main.cf", main_cf), master, tmp_path / "mailflow.toml")
    assert code == 1, err
    line = main_cf.count("\n")
    assert f"  main.cf:{line}: smtpd_sasl_path: {told}, so smtpd names a Cyrus SASL application, not Dovecot's " \
           "auth socket; mailflow speaks only Dovecot's protocol (smtpd.sasl_type = \"dovecot\")" in err.splitlines()
    assert f"  master.cf:2: master.cf submission -o smtpd_sasl_path: {told}, so private/auth names a Cyrus SASL " \
           "application" in err  # (main.cf's type, or its default, applies to a service's path too)
    assert "sasl_path" not in "".join(line for line in (tmp_path / "mailflow.toml").read_text().splitlines(True)
                                      if not line.startswith("#"))
    checked(tmp_path / "mailflow.toml")


def test_a_submission_service_s_relative_smtpd_sasl_path_is_in_queue_directory_as_postfix_opens_it(tmp_path):
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                                      f"smtpd_tls_key_file = {pki.server_cert}\nqueue_directory = /var/spool/pf\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
                   "  -o smtpd_sasl_type=dovecot\n  -o smtpd_sasl_path=private/auth\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    listeners = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert {x["overrides"]["sasl_path"] for x in listeners} == {"/var/spool/pf/private/auth"}


def test_main_cf_s_sasl_path_serves_a_service_whose_own_sasl_type_is_dovecot(tmp_path):
    """main.cf `smtpd_sasl_path = private/auth` with no type (cyrus there) and a submission service's
    `-o smtpd_sasl_type=dovecot`: Postfix's smtpd on 587 reads the path it inherits as Dovecot's socket, so that
    listener keeps Dovecot AUTH (it lost it when main.cf's path was judged under main.cf's type only)."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_sasl_path = private/auth\nqueue_directory = /var/spool/pf\n"
                                      f"smtpd_tls_cert_file = {pki.server_cert}\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_type=dovecot\n"
                   "  -o smtpd_sasl_auth_enable=yes\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    imported = checked(tmp_path / "mailflow.toml")
    assert "sasl_path" not in imported["smtpd"]
    assert [{k: x["overrides"][k] for k in ("sasl_type", "sasl_path", "sasl_auth_enable")}
            for x in imported["smtpd"]["listeners"]] == \
        [{"sasl_type": "dovecot", "sasl_path": "/var/spool/pf/private/auth", "sasl_auth_enable": True}] * 2


EXTRA_CLIENTS_MASTER = """\
smtp      inet  n       -       y       -       -       smtpd
smtp-amavis unix -      -       n       -       -       smtp
slow      unix  -       -       n       -       -       smtp
local2    unix  -       n       n       -       -       local
"""
EXTRA_CLIENTS_MAIN = """\
myhostname = mx.example.com
content_filter = smtp-amavis:[127.0.0.1]:10024
default_transport = slow
local_transport = local2
"""


def test_extra_smtp_services_without_o_are_services_of_their_own_and_another_local_is_left_out(tmp_path):
    main = write(tmp_path, "main.cf", EXTRA_CLIENTS_MAIN)
    code, err = run_import(main, write(tmp_path, "master.cf", EXTRA_CLIENTS_MASTER), tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert (doc["smtpd"]["content_filter"], doc["default_transport"]) == ("smtp-amavis:[127.0.0.1]:10024", "slow")
    assert doc["smtp"]["services"] == {"smtp-amavis": {}, "slow": {}}
    assert "local_transport" not in doc
    assert code == 1
    assert [line.split(": ")[1] for line in err.splitlines()[1:]] == ["master.cf local2", "local_transport"]


def test_a_transport_no_master_cf_defines_is_left_out_not_written(tmp_path):
    code, err = run_import(write(tmp_path, "main.cf", EXTRA_CLIENTS_MAIN), None, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert not {"default_transport", "local_transport"} & set(doc) and "content_filter" not in doc.get("smtpd", {})
    assert code == 1
    assert [line.split(": ")[1] for line in err.splitlines()[1:]] == ["content_filter", "default_transport",
                                                                     "local_transport"]


def test_an_smtpd_service_s_maxproc_is_its_listener_s_max_sessions(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      "inet_protocols = ipv4\ndefault_process_limit = 30\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - 20 smtpd\n2525 inet n - y - - smtpd\n"
                   "2526 inet n - y - 20 smtpd\n2527 inet n - y - 0 smtpd\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert smtpd["max_sessions"] == 20  # the smtp service's; 2525's is default_process_limit's
    assert [x["overrides"].get("max_sessions") for x in smtpd["listeners"]] == [30, None, None]
    assert code == 1 and err.splitlines()[1:] == [
        "  master.cf:4: master.cf 2527 maxproc: mailflow's max_sessions is a number of sessions, at least 1 "
        "(maxproc 0: no limit)"]


def test_a_submission_service_with_syslog_name_of_service_name_is_translated_and_an_unknown_reference_left_out(
        tmp_path):
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                                      "inet_interfaces = loopback-only\ninet_protocols = ipv4\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o syslog_name=postfix/$service_name\n  -o smtpd_tls_security_level=encrypt\n"
                   "  -o smtpd_sasl_auth_enable=yes\n  -o smtpd_sasl_type=dovecot\n"
                   "  -o smtpd_sasl_path=/run/dovecot/auth\n  -o smtpd_helo_required=$nope\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    [submission] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert (submission["address"], submission["role"]) == ("127.0.0.1:587", "submission")
    assert code == 1 and err.splitlines()[1:] == [
        "  master.cf:2: master.cf submission -o smtpd_helo_required: refers to $nope, a Postfix default the "
        "importer does not know"]


@pytest.mark.parametrize("main_cf", [
    "smtp_destination_recipient_limit = 20\ndovecot_destination_recipient_limit = 1\n",
    "dovecot_destination_recipient_limit = 1\nsmtp_destination_recipient_limit = 20\n"])
def test_one_bad_entry_of_a_per_transport_table_is_left_out_alone(tmp_path, main_cf):
    code, err = run_import(write(tmp_path, "main.cf", main_cf), None, tmp_path / "mailflow.toml")
    assert checked(tmp_path / "mailflow.toml")["queue"]["transport_destination_recipient_limit"] == {"smtp": 20}
    assert code == 1 and [line.split(": ")[1] for line in err.splitlines()[1:]] == [
        "dovecot_destination_recipient_limit"]


def test_a_per_transport_entry_for_a_master_cf_pipe_is_kept_and_a_non_numeric_maxproc_left_out(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ndovecot_destination_recipient_limit = 1\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nrelay unix - - n - x smtp\n"
                   "dovecot unix - n n - 4 pipe\n  flags=DRhu user=vmail argv=/usr/bin/deliver -d ${recipient}\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    queue = checked(tmp_path / "mailflow.toml")["queue"]
    assert queue["transport_destination_recipient_limit"] == {"dovecot": 1}
    assert queue["transport_concurrency_limit"] == {"dovecot": 4}
    assert code == 1 and err.splitlines()[1:] == ["  master.cf:2: master.cf relay maxproc: not a number"]


def test_a_delivery_client_s_o_on_an_smtpd_service_applies_to_nothing_by_its_prefix(tmp_path):
    """An -o smtp_*/lmtp_* on an smtpd service is read by no smtpd: a note whether or not mailflow has a key for the
    name (smtp_tls_security_level was a note, smtp_send_xforward_command, smtp_dns_support_level and
    lmtp_tls_protocols were left out, exit 1)."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n127.0.0.1:10025 inet n - n - - smtpd\n"
                   "  -o smtp_tls_security_level=none\n  -o smtp_send_xforward_command=yes\n"
                   "  -o smtp_dns_support_level=disabled\n  -o lmtp_tls_protocols=!SSLv2\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    [listener] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert (code, err) == (0, "")
    text = (tmp_path / "mailflow.toml").read_text()
    for option in ("smtp_tls_security_level=none", "smtp_send_xforward_command=yes",
                   "smtp_dns_support_level=disabled", "lmtp_tls_protocols=!SSLv2"):
        assert f"master.cf:2: 127.0.0.1:10025 -o {option} applies to nothing: Postfix's smtpd does not read" in text


def test_a_pipe_s_bare_command_name_is_where_postfix_s_pipe_finds_it_on_its_path(tmp_path):
    """Postfix's pipe runs argv through execvp with PATH=_PATH_DEFPATH (/usr/bin:/bin on Linux: pipe_command.c):
    Debian 12's stock `uucp … argv=uux …` was left out (mailflow's argv[0] is an absolute path), its import exit 1."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n"
                   "shell unix - n n - - pipe\n  user=nobody argv=sh -c true\n"
                   "gone unix - n n - - pipe\n  user=nobody argv=no-such-command-here -x\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    pipes = checked(tmp_path / "mailflow.toml")["pipe"]
    sh = next(f"{d}/sh" for d in ("/usr/bin", "/bin") if os.access(f"{d}/sh", os.X_OK))
    assert code == 0, err
    assert pipes["shell"]["argv"] == [sh, "-c", "true"]
    assert pipes["gone"]["argv"] == ["/usr/bin/no-such-command-here", "-x"]
    text = (tmp_path / "mailflow.toml").read_text()
    assert (f"master.cf:2: pipe shell: argv=sh is {sh} (Postfix's pipe runs a command through execvp with "
            "PATH=/usr/bin:/bin, _PATH_DEFPATH: the first of those that holds sh)") in text
    assert "argv=no-such-command-here is /usr/bin/no-such-command-here (" in text and ", none here)" in text


@pytest.mark.parametrize("main_cf, left_out", [
    ("mydomain = $nope\n", ["mydestination (Postfix's default)", "mydomain"]),
    ("myhostname = $nope\n", ["mydestination (Postfix's default)", "myhostname"]),
    ("inet_interfaces = $nope\n", ["inet_interfaces"]),
    ("queue_directory = $nope\nsmtpd_milters = unix:opendkim/sock\n", ["queue_directory", "smtpd_milters"]),
])
def test_a_reference_the_importer_cannot_know_leaves_its_lines_out_never_a_traceback(tmp_path, main_cf, left_out):
    code, err = run_import(write(tmp_path, "main.cf", main_cf), None, tmp_path / "mailflow.toml")
    assert code == 1 and [line.split(": ")[1] for line in err.splitlines()[1:]] == left_out
    checked(tmp_path / "mailflow.toml")


def test_an_importer_bug_exits_70_with_one_line(tmp_path, monkeypatch):
    import mailflow.cli.server

    def broken(*args: object) -> None:
        raise KeyError("x")
    monkeypatch.setattr(mailflow.cli.server, "import_postfix", broken)
    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.example.com\n"), None, tmp_path / "o.toml")
    assert code == 70 and err.count("\n") == 1 and "internal error (KeyError" in err


@pytest.mark.parametrize("value, expanded", [
    ("${empty?{one}:{two}} ${a?{three}:{four}}", "two three"),  # Postfix 3.0's ${name?{text}:{text}}
    ("${a?{x}} ${empty:{y}} ${ a ? {sp} }", "x y sp"),
    ("${a?x:y}|${empty:{p}q}", None),  # text after } : Postfix refuses it
    ("${a?x:y}", "x:y"),  # without braces the rest is the text, as mac_expand takes it
    ("$(a)${a}$a$$a", "xxx$a"),
    ("${a?{${a?{in}}}:{no}}", "in"),  # nested braces balanced as mac_parse counts them
    ("$d29", "x"),  # 30 levels: Postfix allows 100
])
def test_expansion_follows_mac_parse_and_mac_expand(value, expanded):
    from mailflow.config.postfix_cf import Expander, Unsupported
    raw = {"a": "x", "empty": "", "d0": "x", **{f"d{n}": f"$d{n - 1}" for n in range(1, 30)}}
    if expanded is None:
        with pytest.raises(Unsupported):
            Expander(raw, "mx.example.test").expand(value)
    else:
        assert Expander(raw, "mx.example.test").expand(value) == expanded


def test_an_expansion_form_the_importer_does_not_evaluate_is_left_out_not_written_wrong(tmp_path):
    main = write(tmp_path, "main.cf", "a = x\nrelay_domains = ${{$a} == {x}?{eq.example}:{ne.example}}\n"
                                      "mynetworks = $b\nb = $mynetworks\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert "relay_domains" not in checked(tmp_path / "mailflow.toml")
    assert code == 1 and "main.cf:2: relay_domains: expansion form not supported: ${{$a} == {x}?" in err
    assert "main.cf:3: mynetworks: a $name loop ($b -> $mynetworks -> $b): Postfix refuses it" in err


def test_parameters_postfix_reads_raw_are_written_as_is(tmp_path):
    main = write(tmp_path, "main.cf", """\
        mailbox_command = /usr/bin/procmail -a "$$EXTENSION" -f "$SENDER" $home
        luser_relay = $user@other.example
        smtpd_reject_footer = Contact postmaster, client $client_address
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["local"]["mailbox_command"] == '/usr/bin/procmail -a "$$EXTENSION" -f "$SENDER" $home'  # the shell's
    assert doc["local"]["luser_relay"] == "$user@other.example"  # local(8)'s $user
    assert doc["smtpd"]["reject_footer"] == "Contact postmaster, client $client_address"


def test_the_dnsbl_reply_settings_and_the_restriction_codes_are_imported(tmp_path):
    write(tmp_path, "rbl_replies", "zen.example 550 5.7.1 Listed by $rbl_domain: $rbl_reason\n")
    main = write(tmp_path, "main.cf", f"""\
        default_rbl_reply = $rbl_code 5.7.1 Blocked: $rbl_class [$rbl_what] by $rbl_domain${{rbl_reason?; $rbl_reason}}
        rbl_reply_maps = texthash:{tmp_path}/rbl_replies
        maps_rbl_reject_code = 550
        access_map_reject_code = 553
        access_map_defer_code = 451
        reject_code = 550
        defer_code = 452
        relay_domains_reject_code = 551
        invalid_hostname_reject_code = 555
        non_fqdn_reject_code = 450
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["default_rbl_reply"] == \
        "$rbl_code 5.7.1 Blocked: $rbl_class [$rbl_what] by $rbl_domain${rbl_reason?; $rbl_reason}"  # raw
    assert doc["smtpd"]["rbl_reply_maps"] == [f"texthash:{tmp_path}/rbl_replies"]
    assert doc["smtpd"]["maps_rbl_reject_code"] == 550
    assert {key: doc["smtpd"][key] for key in ("access_map_reject_code", "access_map_defer_code", "reject_code",
                                               "defer_code", "relay_domains_reject_code",
                                               "invalid_hostname_reject_code", "non_fqdn_reject_code")} == {
        "access_map_reject_code": 553, "access_map_defer_code": 451, "reject_code": 550, "defer_code": 452,
        "relay_domains_reject_code": 551, "invalid_hostname_reject_code": 555, "non_fqdn_reject_code": 450}


def test_a_policy_service_with_its_own_settings_in_braces_is_one_item(tmp_path):
    main = write(tmp_path, "main.cf", """\
        smtpd_recipient_restrictions = permit_mynetworks,
            check_policy_service { inet:127.0.0.1:9998, timeout=10s, { default_action = 451 4.3.5 later } },
            reject_unauth_destination
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    assert checked(tmp_path / "mailflow.toml")["smtpd"]["recipient_restrictions"] == [
        "permit_mynetworks",
        "check_policy_service { inet:127.0.0.1:9998, timeout=10s, { default_action = 451 4.3.5 later } }",
        "reject_unauth_destination"]


def test_a_hash_table_without_its_source_file_is_left_out_and_a_stale_db_noted(tmp_path):
    import os
    (tmp_path / "only.db").write_bytes(b"")
    write(tmp_path, "access", "spam.example REJECT\n")
    (tmp_path / "access.db").write_bytes(b"")
    os.utime(tmp_path / "access.db", (1_000_000_000, 1_000_000_000))  # postmap not run since access changed
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nvirtual_alias_maps = hash:{tmp_path}/only\n"
                                      f"smtpd_sender_restrictions = check_sender_access hash:{tmp_path}/access\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n2525 inet n - y - - smtpd\n"
                   f"  -o smtpd_client_restrictions=check_client_access,hash:{tmp_path}/only\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert "virtual_alias_maps" not in doc and doc["smtpd"]["listeners"]  # the -o left out, not its service
    assert doc["smtpd"]["sender_restrictions"] == [f"check_sender_access texthash:{tmp_path}/access"]
    assert f"{tmp_path}/access is newer than {tmp_path}/access.db" in (tmp_path / "mailflow.toml").read_text()
    assert code == 1 and [line.split(": ")[1] for line in err.splitlines()[1:]] == [
        "virtual_alias_maps", "master.cf 2525 -o smtpd_client_restrictions"]
    assert "its source file" in err and "only.db is there" in err


@pytest.mark.parametrize("system, main_cf, myhostname", [
    ("box", "mydomain = example.org\n", "box.example.org"),
    ("box", "relay_domains = example.net\n", "box.localdomain"),
    ("box.example.com", "mydomain = example.org\n", "box.example.com"),
])
def test_the_default_myhostname_is_postfix_s_gethostname_not_a_dns_look_up(monkeypatch, tmp_path, system, main_cf,
                                                                           myhostname):
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: system)
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "from-dns.example")
    result = import_postfix(write(tmp_path, "main.cf", main_cf))
    assert result.settings["myhostname"] == myhostname


def test_control_characters_are_escaped_in_comments_and_on_stderr_and_only_newline_ends_a_line(tmp_path):
    main = tmp_path / "main.cf"
    main.write_bytes(b"myhostname = mx.example.com\nsmtpd_banner = $myhostname hi\x7fthere\x01\n"
                     b"foo_bar = a\x00b\x1b[2Jc\nrelay_domains = a.example\x1cmynetworks = 10.0.0.0/8\n")
    code, err = run_import(str(main), None, tmp_path / "mailflow.toml")
    doc = tomllib.loads((tmp_path / "mailflow.toml").read_text())  # a NUL in a comment would not load
    assert "mynetworks" not in doc  # \x1c does not end a line for Postfix
    assert code == 1 and all(c.isprintable() for line in err.splitlines() for c in line)
    assert "foo_bar = a\\x00b\\x1b[2Jc" in (tmp_path / "mailflow.toml").read_text()


def test_a_helper_parameter_used_through_its_name_is_a_note_not_left_out(tmp_path):
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                 "mua_client_restrictions = permit_sasl_authenticated, reject\nunused_helper = x\n"
                 "smtpd_sasl_type = dovecot\nsmtpd_sasl_path = /run/dovecot/auth\n"
                 "inet_interfaces = loopback-only\ninet_protocols = ipv4\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
                   "  -o smtpd_client_restrictions=$mua_client_restrictions\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    [submission] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert submission["overrides"]["client_restrictions"] == ["permit_sasl_authenticated", "reject"]
    assert code == 1 and [line.split(": ")[1] for line in err.splitlines()[1:]] == ["unused_helper"]
    assert ("main.cf:3: mua_client_restrictions is a helper parameter, used by master.cf submission through "
            "$mua_client_restrictions") in (tmp_path / "mailflow.toml").read_text()


def test_a_timeout_mailflow_merges_with_others_is_written_only_when_they_all_agree(tmp_path):
    main = write(tmp_path, "main.cf", "smtp_rset_timeout = 20s\nlmtp_mail_timeout = 60s\nlmtp_rcpt_timeout = 1m\n"
                                      "lmtp_lhlo_timeout = 60\nlmtp_data_init_timeout = 60s\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert set(doc["smtp"]) == {"tls_security_level"}  # 20s would be MAIL's and RCPT's timeout too (Postfix: 300s)
    assert doc["lmtp"]["command_timeout"] in ("60s", 60, 60.0)
    assert code == 1 and [line.split(": ")[1] for line in err.splitlines()[1:]] == ["smtp_rset_timeout"]
    assert "smtp_mail_timeout = 300s (default)" in err


def test_postfix_s_default_alias_maps_and_local_recipient_maps_are_written_out(tmp_path):
    aliases = write(tmp_path, "aliases", "postmaster: root\n")
    code, err = run_import(write(tmp_path, "main.cf", f"myhostname = mx.example.com\nalias_maps = hash:{aliases}\n"),
                           None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["local_recipient_maps"] == ["unix:passwd.byname", f"texthash:{aliases}"]  # proxy:unix:… $alias_maps
    text = (tmp_path / "mailflow.toml").read_text()
    assert "# (no local_recipient_maps in main.cf) Postfix's default: proxy:unix:passwd.byname $alias_maps" in text
    assert "(no compatibility_level in main.cf) Postfix keeps its pre-3.0 defaults" in text

    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.example.com\n"), None, tmp_path / "2.toml")
    assert (code, err) == (0, "")
    expected = ["texthash:/etc/aliases"] if Path("/etc/aliases").is_file() else []
    assert checked(tmp_path / "2.toml")["alias_maps"] == expected
    assert "nis:mail.aliases of Postfix's default is not written" in (tmp_path / "2.toml").read_text()


def test_an_o_in_braces_with_spaces_is_read_as_postfix_3_reads_it(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      "inet_protocols = ipv4\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n2525 inet n - y - - smtpd\n"
                   "  -o { smtpd_client_restrictions = permit_mynetworks, reject }\n  -o smtpd_helo_required=yes\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    [listener] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert listener["overrides"]["client_restrictions"] == ["permit_mynetworks", "reject"]
    assert listener["overrides"]["helo_required"] is True


def test_the_outgoing_content_checks_and_the_filters_are_imported(tmp_path):
    """smtp_/lmtp_*_checks, smtp_reply_filter and smtpd_command_filter have mailflow counterparts of the same
    meaning: imported, not reported as having none."""
    table = write(tmp_path, "checks", "/^X-Secret:/ IGNORE\n")
    main = write(tmp_path, "main.cf", "".join(f"{name} = regexp:{table}\n" for name in (
        "smtp_header_checks", "smtp_mime_header_checks", "smtp_nested_header_checks", "smtp_body_checks",
        "lmtp_header_checks", "lmtp_body_checks", "smtp_reply_filter", "smtpd_command_filter")))
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0 and "no mailflow counterpart" not in err, err
    imported = checked(tmp_path / "mailflow.toml")
    spec = [f"regexp:{table}"]
    assert all(imported["smtp"][name] == spec for name in ("header_checks", "mime_header_checks",
                                                           "nested_header_checks", "body_checks", "reply_filter"))
    assert imported["lmtp"]["header_checks"] == imported["lmtp"]["body_checks"] == spec
    assert imported["smtpd"]["command_filter"] == spec


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_a_certificate_or_key_file_that_is_not_there_is_left_out_naming_it(tmp_path, missing):
    """Postfix's smtpd runs on without the file (`cannot get RSA certificate from file ...: disabling TLS
    support`, STARTTLS answered 454 4.7.0); mailflow's would not start: the pair is left out, the file named, exit 1,
    and the output starts (checked)."""
    pki = ClientPki(tmp_path)
    files = {"cert": str(pki.server_cert), "key": str(pki.server_cert)}  # (the key is in the certificate's file)
    files[missing] = str(tmp_path / "gone" / f"{missing}.pem")
    main_cf = (f"smtpd_tls_cert_file = {files['cert']}\nsmtpd_tls_key_file = {files['key']}\n"
               "smtpd_tls_security_level = may\n")
    code, err = run_import(write(tmp_path, "main.cf", main_cf), None, tmp_path / "mailflow.toml")
    assert code == 1, err
    line = 1 if missing == "cert" else 2
    assert f"  main.cf:{line}: smtpd_tls_{missing}_file: {files[missing]}: no such file; mailflow does not start " \
           "without it, Postfix's smtpd runs on without TLS (STARTTLS: 454 4.7.0): set " \
           f"smtpd.tls_{missing}_file (and its pair) once the file is there" in err.splitlines()
    other = "key" if missing == "cert" else "cert"
    assert f"  main.cf:{3 - line}: smtpd_tls_{other}_file: left out with smtpd.tls_{missing}_file, whose file is " \
           "not there" in err.splitlines()
    assert checked(tmp_path / "mailflow.toml")["smtpd"]["tls_security_level"] == "may"
    # the files there: both imported
    main_cf = f"smtpd_tls_cert_file = {pki.server_cert}\nsmtpd_tls_key_file = {pki.server_cert}\n"
    code, err = run_import(write(tmp_path, "main.cf", main_cf), None, tmp_path / "mailflow.toml")
    assert code == 0, err


@pytest.mark.parametrize("master_cf", [
    "relay unix - - n - - smtp -o syslog_name=postfix/$service_name -o smtp_tls_security_level=encrypt\n",
    "relay unix - - n - 4 smtp\n",
])
def test_a_relay_service_of_its_own_gets_relay_domain_mail_as_in_postfix(tmp_path, master_cf):
    """relay_transport defaults to `relay` in both (Postfix's mail_params.h DEF_RELAY_TRANSPORT): master.cf's
    `relay` with an -o (an [smtp.services.relay]) or a maxproc gets relay-domain mail without a relay_transport
    written out."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nrelay_domains = example.net\n")
    code, err = run_import(main, write(tmp_path, "master.cf", master_cf), tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert "relay_transport" not in doc
    result = CliRunner().invoke(cli, ["address", "-c", str(tmp_path / "mailflow.toml"), "u@example.net"])
    assert re.search(r"transport:\s+relay\b", result.output), result.output


def test_main_cf_s_own_relay_transport_is_kept_whatever_master_cf_s_relay(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nrelay_domains = example.net\n"
                                      "relay_transport = smtp\n")
    master = write(tmp_path, "master.cf", "relay unix - - n - - smtp -o smtp_tls_security_level=encrypt\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert checked(tmp_path / "mailflow.toml")["relay_transport"] == "smtp"


@pytest.mark.parametrize("master_cf", [
    "virtual unix - - n - - smtp -o smtp_helo_name=v.example\n",
    "lmtp unix - - n - - smtp\n",
    "local unix - n n - - pipe user=nobody argv=/bin/true\n",
])
def test_a_service_under_a_built_in_transport_s_name_it_cannot_replace_is_left_out_not_a_crash(tmp_path, master_cf):
    """Only `relay … smtp` replaces a built-in transport; another client or a pipe under a built-in's name used to
    write an [smtp.services.virtual] / [pipe.local] mailflow refuses: exit 70. (A `relay` run by lmtp or pipe is a
    service of its own relay_transport names: test_relay_domain_mail_goes_where_master_cf_s_relay_sends_it…)"""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\n")
    code, err = run_import(main, write(tmp_path, "master.cf", master_cf), tmp_path / "mailflow.toml")
    assert code == 1, err
    name = master_cf.split()[0]
    assert f"  master.cf:1: master.cf {name}: a " in err and "one of mailflow's built-in transports" in err, err
    doc = checked(tmp_path / "mailflow.toml")
    assert name not in doc.get("pipe", {}) and "services" not in doc.get("smtp", {}) | doc.get("lmtp", {})


@pytest.mark.parametrize("maxproc", ["-", "10"])
def test_a_client_service_refused_across_settings_loses_only_the_offending_option(tmp_path, maxproc):
    """`-o smtp_tls_cert_file=` under main.cf's certificate and key: mailflow refuses the merged settings at
    tls_key_file, which no -o set; the whole service used to go (its valid helo_name too) while content_filter still
    named it (all mail deferred), and with a maxproc the import crashed (exit 70)."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtp_tls_cert_file = {pki.server_cert}\n"
                                      f"smtp_tls_key_file = {pki.server_cert}\n"
                                      "content_filter = scan:[127.0.0.1]:10025\n")
    master = write(tmp_path, "master.cf", f"scan unix - - n - {maxproc} smtp -o smtp_tls_cert_file= "
                                          "-o smtp_helo_name=scan.example\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 1, err
    assert doc["smtp"]["services"] == {"scan": {"helo_name": "scan.example"}}
    assert doc["smtpd"]["content_filter"] == "scan:[127.0.0.1]:10025"
    [left_out] = err.splitlines()[1:]
    assert left_out.startswith("  master.cf:1: master.cf scan -o smtp_tls_cert_file=: mailflow refuses it: ")
    assert "needs tls_cert_file" in left_out


def test_a_pipe_left_out_takes_its_maxproc_entry_with_it(tmp_path):
    """A refused pipe's queue.transport_concurrency_limit entry named a transport no more: the import crashed."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\n")
    master = write(tmp_path, "master.cf", "x unix - n n - 2 pipe user=root argv=/bin/true\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 1, err
    assert "pipe" not in doc and "transport_concurrency_limit" not in doc.get("queue", {})
    assert "master.cf x maxproc" in err and "x is not a transport mailflow has" in err, err


@pytest.mark.parametrize("master_cf, limits", [
    ("smtp unix - - n - 10 smtp -o max_use=20\n", {"smtp": 10}),
    ("relay unix - - n - - smtp -o max_use=20 -o syslog_name=postfix/$service_name\n", None),
])
def test_an_option_mailflow_does_not_need_is_noted_for_postfix_s_own_smtp_and_relay_too(tmp_path, master_cf, limits):
    """`-o max_use=20` was noted for a named service but left Postfix's own `smtp` line out whole (its maxproc
    lost), and made an empty [smtp.services.relay] of `relay`."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\n")
    code, err = run_import(main, write(tmp_path, "master.cf", master_cf), tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert doc.get("queue", {}).get("transport_concurrency_limit") == limits
    assert "services" not in doc.get("smtp", {}) and "relay_transport" not in doc
    assert "-o max_use=20 not needed" in (tmp_path / "mailflow.toml").read_text()
def refused_by_check(config: Path) -> str:
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code != 0, result.output
    return result.output + result.stderr


ENCRYPT_SUBMISSION = "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n" \
                     "  -o smtpd_tls_security_level=encrypt\n"


@pytest.mark.parametrize("where", ["main.cf", "master.cf"])
def test_a_missing_certificate_under_level_encrypt_is_kept_so_the_output_fails_closed(tmp_path, where):
    """Postfix 3.7.11 with smtpd_tls_security_level = encrypt (main.cf's, or a submission service's -o) and its
    certificate not there takes no mail: STARTTLS `454 4.7.0`, MAIL `530 5.7.0 Must issue a STARTTLS command
    first`. Leaving the pair out made the output take that mail in the clear; it is kept, reported (exit 1), and
    `config check` fails naming the file."""
    cert = str(tmp_path / "gone" / "cert.pem")
    level = "encrypt" if where == "main.cf" else "may"
    main_cf = f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {cert}\nsmtpd_tls_security_level = {level}\n"
    master = write(tmp_path, "master.cf", ENCRYPT_SUBMISSION) if where == "master.cf" else None
    code, err = run_import(write(tmp_path, "main.cf", main_cf), master, tmp_path / "mailflow.toml")
    assert code == 1, err
    requirer = "main.cf:3: smtpd_tls_security_level = encrypt" if where == "main.cf" else \
        "master.cf:2 -o smtpd_tls_security_level=encrypt"
    assert f"  main.cf:1: smtpd_tls_cert_file: {cert}: no such file; kept as written: {requirer} requires TLS, and " \
           "Postfix's smtpd then takes no mail without it (MAIL: 530 5.7.0): the output fails `config check` and " \
           "the start until the file is there" in err.splitlines()
    assert len(err.splitlines()) == 2, err  # (the level and the listeners kept: no other line)
    assert f"{cert}: no such certificate or key file" in refused_by_check(tmp_path / "mailflow.toml")


@pytest.mark.parametrize("level", ["encrypt", "may"])
def test_a_listeners_own_missing_certificate_is_named_with_its_master_cf_line(tmp_path, level):
    """A master.cf `-o smtpd_tls_cert_file` naming a file that is not there is judged as main.cf's: under encrypt
    kept (exit 1, `config check` fails); under may left out, the listener without TLS, as Postfix's smtpd there
    (not with main.cf's certificate)."""
    pki = ClientPki(tmp_path)
    gone = str(tmp_path / "gone" / "sub.pem")
    main_cf = f"smtpd_tls_cert_file = {pki.server_cert}\nsmtpd_tls_key_file = {pki.server_cert}\n"
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   f"  -o smtpd_tls_cert_file={gone}\n  -o smtpd_tls_key_file={gone}\n"
                   f"  -o smtpd_tls_security_level={level}\n")
    code, err = run_import(write(tmp_path, "main.cf", main_cf), master, tmp_path / "mailflow.toml")
    assert code == 1, err
    told = [line for line in err.splitlines() if "-o smtpd_tls_cert_file" in line]
    assert told and all(line.startswith("  master.cf:2: listener ") and f"{gone}: no such file; " in line
                        for line in told), err
    if level == "encrypt":
        assert all("kept as written: master.cf:2 -o smtpd_tls_security_level=encrypt requires TLS" in line
                   for line in told)
        assert f"{gone}: no such certificate or key file" in refused_by_check(tmp_path / "mailflow.toml")
    else:
        listeners = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
        assert {(x["overrides"]["tls_cert_file"], x["overrides"]["tls_key_file"]) for x in listeners} == {("", "")}


def test_a_relative_tls_file_is_taken_from_queue_directory_whatever_the_import_s_directory(tmp_path, monkeypatch):
    """Postfix's daemons chdir to queue_directory before they read their TLS files (master/multi_server.c): a
    relative smtpd_tls_cert_file is that directory's file. It was checked against the importer's working directory
    (the same input passing or not by where the import ran) and written relative, which the output's loader takes
    from the output file's directory."""
    pki = ClientPki(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    (tmp_path / "out").mkdir()
    (spool / "good.pem").write_bytes(Path(pki.server_cert).read_bytes())
    main_cf = write(tmp_path, "main.cf", f"queue_directory = {spool}\nsmtpd_tls_cert_file = good.pem\n"
                                         "smtpd_tls_key_file = good.pem\nsmtpd_tls_security_level = may\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_cert_file=good.pem\n  -o smtpd_tls_key_file=good.pem\n")
    for cwd in (spool, tmp_path):
        monkeypatch.chdir(cwd)
        code, err = run_import(main_cf, master, tmp_path / "out" / "mailflow.toml")
        assert (code, err) == (0, "")
    imported = checked(tmp_path / "out" / "mailflow.toml")
    assert imported["smtpd"]["tls_cert_file"] == imported["smtpd"]["tls_key_file"] == str(spool / "good.pem")
    assert {x["overrides"]["tls_cert_file"] for x in imported["smtpd"]["listeners"]} == {str(spool / "good.pem")}


def test_reject_tempfail_action_sets_the_tempfail_actions_main_cf_leaves_unset(tmp_path):
    """Postfix 3.7.11's unknown_helo_hostname_tempfail_action, unknown_address_tempfail_action and
    unverified_*_tempfail_action default to $reject_tempfail_action (postconf -d): setting it alone changes them all;
    one given in main.cf keeps its own value. It used to be left out (no counterpart)."""
    main = write(tmp_path, "main.cf", "reject_tempfail_action = defer\n"
                                      "unverified_sender_tempfail_action = defer_if_permit\n")
    result = import_postfix(main, hostname="mx.example")
    assert result.left_out == []
    assert {k: v for k, v in result.settings.items() if k.endswith("tempfail_action")} == {
        "smtpd.unknown_helo_hostname_tempfail_action": "defer", "smtpd.unknown_address_tempfail_action": "defer",
        "smtpd.unverified_recipient_tempfail_action": "defer",
        "smtpd.unverified_sender_tempfail_action": "defer_if_permit"}


def test_tempfail_actions_are_read_in_any_case_and_a_bad_one_is_left_out_once(tmp_path):
    """Postfix reads the tempfail actions with name_code, without regard to case: DEFER is defer. A
    reject_tempfail_action that is neither is one left-out line saying which settings it stands for; it used to be
    four, each with pydantic's "(and 3 more problems)", and DEFER was refused."""
    main = write(tmp_path, "main.cf", "reject_tempfail_action = DEFER\nunknown_address_tempfail_action = Defer\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["unknown_helo_hostname_tempfail_action"] == "defer"
    assert doc["smtpd"]["unknown_address_tempfail_action"].lower() == "defer"  # (as written: config check takes it)
    result = import_postfix(write(tmp_path, "main.cf", "reject_tempfail_action = bogus\n"), hostname="mx.example")
    assert [(i.where.rpartition("/")[2], i.name, i.why) for i in result.left_out] == [
        ("main.cf:1", "reject_tempfail_action", "not defer_if_permit or defer (the value of "
         "smtpd.unknown_helo_hostname_tempfail_action, unknown_address_tempfail_action, "
         "unverified_recipient_tempfail_action, unverified_sender_tempfail_action unless set)")]


def test_reject_tempfail_action_in_master_cf_sets_that_listeners_tempfail_actions(tmp_path):
    """`-o reject_tempfail_action=…` is the service's default of the four tempfail actions (Postfix reads
    $reject_tempfail_action in the service): the ones neither main.cf nor the service's own -o set become its
    listener's overrides; a bad value is left out once. It used to be left out as having no counterpart."""
    main = write(tmp_path, "main.cf", "unverified_sender_tempfail_action = defer_if_permit\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n"
                                          "submission inet n - y - - smtpd\n  -o reject_tempfail_action=Defer\n"
                                          "  -o unknown_helo_hostname_tempfail_action=defer_if_permit\n"
                                          "2525 inet n - y - - smtpd\n  -o reject_tempfail_action=bogus\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert err.splitlines()[1:] == ["  master.cf:5: master.cf 2525 -o reject_tempfail_action: "
                                    "not defer_if_permit or defer (the value of smtpd.unknown_helo_hostname_tempfail"
                                    "_action, unknown_address_tempfail_action, unverified_recipient_tempfail_action, "
                                    "unverified_sender_tempfail_action unless set)"]
    doc = checked(tmp_path / "mailflow.toml")
    listeners = {x["address"]: x.get("overrides", {}) for x in doc["smtpd"]["listeners"]}
    assert {k: v for k, v in listeners["0.0.0.0:587"].items() if k.endswith("tempfail_action")} == {
        "unknown_helo_hostname_tempfail_action": "defer_if_permit", "unknown_address_tempfail_action": "defer",
        "unverified_recipient_tempfail_action": "defer"}
    assert not any(k.endswith("tempfail_action") for k in listeners["0.0.0.0:2525"])


def test_the_lmtp_connection_cache_parameters_and_a_service_s_become_lmtp_settings(tmp_path):
    """lmtp_connection_cache_time_limit and the reuse limits (lmtp(8)'s cache, which mailflow's LMTP client has),
    in main.cf and as a dovecot service's -o; caching on demand (Postfix's default) is built in."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nlmtp_connection_cache_time_limit = 5s\n"
                                      "lmtp_connection_reuse_count_limit = 10\nlmtp_connection_reuse_time_limit = 60\n"
                                      "lmtp_connection_cache_on_demand = yes\n")
    master = write(tmp_path, "master.cf", "dovecot unix - - n - - lmtp -o lmtp_connection_cache_time_limit=0\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert {k: v for k, v in doc["lmtp"].items() if k.startswith("connection_")} == {
        "connection_cache_time_limit": "5s", "connection_reuse_count_limit": 10, "connection_reuse_time_limit": "60s"}
    assert doc["lmtp"]["services"]["dovecot"] == {"connection_cache_time_limit": "0s"}


@pytest.mark.parametrize("level", ["secure", "verify", "fingerprint"])
def test_postscreens_levels_beyond_encrypt_are_encrypt_as_postfix_takes_them(tmp_path, level):
    """psc_smtpd_init: `unsupported TLS level "secure", using "encrypt"`; the import says so."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"postscreen_tls_security_level = {level}\nsmtpd_tls_cert_file = "
                                      f"{pki.server_cert}\nsmtpd_tls_key_file = {pki.server_cert}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert checked(tmp_path / "mailflow.toml")["smtpd"]["postscreen"]["tls_security_level"] == "encrypt"
    assert f"postscreen_tls_security_level = {level} is encrypt" in (tmp_path / "mailflow.toml").read_text()


def test_postscreens_encrypt_without_a_certificate_is_left_out_and_said(tmp_path):
    """mailflow refuses postscreen encrypt without smtpd's certificate (Postfix's would answer STARTTLS 454)."""
    main = write(tmp_path, "main.cf", "postscreen_tls_security_level = encrypt\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert "main.cf:1: postscreen_tls_security_level: mailflow refuses it: postscreen.tls_security_level " \
           "\"encrypt\" needs tls_cert_file" in err, err
    assert "tls_security_level" not in checked(tmp_path / "mailflow.toml").get("smtpd", {}).get("postscreen", {})


def test_caching_on_demand_off_without_cache_destinations_turns_the_client_s_cache_off(tmp_path):
    """`*_connection_cache_on_demand = no` with no `*_connection_cache_destinations`: Postfix caches no session
    (checked on a private Postfix: 12 messages in a burst to one LMTP next hop, 12 sessions, no RSET probe; 6 with
    `yes`), whatever *_connection_cache_time_limit says, so the client's cache is off (0s). It was refused, leaving
    mailflow's cache on."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nsmtp_connection_cache_time_limit = 5s\n"
                                      "smtp_connection_cache_on_demand = no\nlmtp_connection_cache_on_demand = no\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert code == 0, err
    assert doc["smtp"]["connection_cache_time_limit"] == doc["lmtp"]["connection_cache_time_limit"] == "0s"
    text = (tmp_path / "mailflow.toml").read_text()
    assert ("# main.cf:3: smtp_connection_cache_on_demand = no (no smtp_connection_cache_destinations: Postfix caches "
            "no session)\nconnection_cache_time_limit = \"0s\"") in text
    assert "main.cf:2: smtp_connection_cache_time_limit = 5s applies to nothing" in text


def test_caching_on_demand_off_with_cache_destinations_is_left_out_with_the_reason(tmp_path):
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\nsmtp_connection_cache_on_demand = no\n"
                                      "smtp_connection_cache_destinations = example.net\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1 and "connection_cache_time_limit" not in checked(tmp_path / "mailflow.toml").get("smtp", {})
    assert ("main.cf:2: smtp_connection_cache_on_demand: with smtp_connection_cache_destinations, Postfix caches "
            "those destinations' sessions only; mailflow's smtp client caches every destination's or none") in err


def test_postscreens_footer_maps_and_expansion_filter_are_translated(tmp_path):
    """postscreen_reject_footer_maps ($names expanded) and postscreen_expansion_filter as written (Postfix reads it
    raw); the filter's default reference is mailflow's default."""
    (tmp_path / "footers").write_text("/^5/ call us\n")
    main = write(tmp_path, "main.cf", f"footers = regexp:{tmp_path}/footers\n"
                                      "postscreen_reject_footer_maps = $footers\n"
                                      "postscreen_expansion_filter = \\t\\40abc$\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    screen = checked(tmp_path / "mailflow.toml")["smtpd"]["postscreen"]
    assert screen == {"reject_footer_maps": [f"regexp:{tmp_path}/footers"], "expansion_filter": "\\t\\40abc$"}
    main = write(tmp_path, "main.cf", "postscreen_expansion_filter = $smtpd_expansion_filter\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert "postscreen" not in checked(tmp_path / "mailflow.toml").get("smtpd", {})


@pytest.mark.parametrize("smtpd_lines", ["smtpd_expansion_filter = abc\nsmtpd_reject_footer_maps = $footers\n",
                                         "smtpd_expansion_filter = abc\nsmtpd_reject_footer_maps = $footers\n"
                                         "postscreen_expansion_filter = ${smtpd_expansion_filter}\n"
                                         "postscreen_reject_footer_maps = $smtpd_reject_footer_maps\n"])
def test_smtpds_footer_maps_and_expansion_filter_are_postscreens_unless_it_has_its_own(tmp_path, smtpd_lines):
    """postscreen_expansion_filter's default is $smtpd_expansion_filter, postscreen_reject_footer_maps's
    $smtpd_reject_footer_maps: smtpd's values (which mailflow's smtpd has no setting for) are postscreen's, and
    left out for smtpd with a reason that says so. The import took mailflow's default filter and dropped the maps."""
    (tmp_path / "footers").write_text("/^5/ call us\n")
    main = write(tmp_path, "main.cf", f"footers = regexp:{tmp_path}/footers\n{smtpd_lines}")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1
    screen = checked(tmp_path / "mailflow.toml")["smtpd"]["postscreen"]
    assert screen == {"reject_footer_maps": [f"regexp:{tmp_path}/footers"], "expansion_filter": "abc"}
    assert ("main.cf:3: smtpd_reject_footer_maps: mailflow's smtpd has reject_footer (one text, its macros), not a "
            "map by reply; postscreen takes it (postscreen_reject_footer_maps's default $smtpd_reject_footer_maps: "
            "smtpd.postscreen.reject_footer_maps)") in err
    assert "main.cf:2: smtpd_expansion_filter: mailflow's smtpd filters" in err
    main = write(tmp_path, "main.cf", f"{smtpd_lines}postscreen_expansion_filter = xyz\n"
                                      "postscreen_reject_footer_maps =\n")  # (postscreen's own, the last line's)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1
    assert checked(tmp_path / "mailflow.toml")["smtpd"]["postscreen"] == {"expansion_filter": "xyz",
                                                                          "reject_footer_maps": []}
    assert "postscreen takes it" not in err


@pytest.mark.parametrize("tls_lines, level", [
    ("postscreen_enforce_tls = yes\nsmtpd_use_tls = yes\n", "encrypt"),
    ("postscreen_use_tls = yes\n", "may"),
    ("postscreen_use_tls = no\nsmtpd_use_tls = yes\n", "none"),
    ("postscreen_use_tls = yes\nsmtpd_tls_security_level = none\n", None),  # (a level wins: smtpd's, inherited)
    ("postscreen_tls_security_level = encrypt\npostscreen_use_tls = no\n", "encrypt"),
    ("postscreen_tls_security_level = secure\n", "encrypt"),  # (with Postfix's warning: see below)
])
def test_postscreens_dummy_engine_settings_are_translated(tmp_path, tls_lines, level):
    """postscreen_discard_ehlo_keywords and its address maps, command filter and reject footer as they are;
    postscreen_use_tls and postscreen_enforce_tls (defaults: smtpd's) as Postfix 3.7 maps them to a level, only
    when no security level applies."""
    pki = ClientPki(tmp_path)
    tls_lines += f"smtpd_tls_cert_file = {pki.server_cert}\nsmtpd_tls_key_file = {pki.server_cert}\n"
    (tmp_path / "discards").write_text("127.0.0.3 dsn\n")
    (tmp_path / "commands").write_text("/^NOOP x$/ NOOP\n")
    main = write(tmp_path, "main.cf", f"postscreen_discard_ehlo_keywords = silent-discard, dsn\n"
                                      f"postscreen_discard_ehlo_keyword_address_maps = texthash:{tmp_path}/discards\n"
                                      f"postscreen_command_filter = regexp:{tmp_path}/commands\n"
                                      "postscreen_reject_footer = \\c see $server_name\n" + tls_lines)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    screen = checked(tmp_path / "mailflow.toml")["smtpd"]["postscreen"]
    assert screen.pop("tls_security_level", None) == level
    assert screen == {"discard_ehlo_keywords": ["silent-discard", "dsn"],
                      "discard_ehlo_keyword_address_maps": [f"texthash:{tmp_path}/discards"],
                      "command_filter": [f"regexp:{tmp_path}/commands"], "reject_footer": "\\c see $server_name"}


def test_the_postmaster_notice_settings_are_imported(tmp_path):
    """notify_classes (its words in any case, as Postfix's name_mask reads them) and the notice recipients."""
    main = write(tmp_path, "main.cf", """\
        notify_classes = Bounce, delay,policy protocol
        bounce_notice_recipient = bounces@example.test
        delay_notice_recipient = delays
        error_notice_recipient = errors@example.test
        2bounce_notice_recipient = doubles
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    queue = checked(tmp_path / "mailflow.toml")["queue"]
    assert {k: queue[k] for k in ("notify_classes", "bounce_notice_recipient", "delay_notice_recipient",
                                  "error_notice_recipient", "double_bounce_recipient")} == {
        "notify_classes": ["Bounce", "delay", "policy", "protocol"], "bounce_notice_recipient": "bounces@example.test",
        "delay_notice_recipient": "delays", "error_notice_recipient": "errors@example.test",
        "double_bounce_recipient": "doubles"}
    assert config_from_dict({"queue": {"notify_classes": queue["notify_classes"]}}).queue.notify_classes == (
        "bounce", "delay", "policy", "protocol")


@pytest.mark.parametrize("line, classes", [
    ("", ["resource", "software"]),  # Postfix's default, written out: mailflow's own adds 2bounce
    ("notify_classes = bounce, 2bounce\n", ["bounce", "2bounce"]),
    ("notify_classes =\n", []),
])
def test_notify_classes_are_postfixs_whether_main_cf_names_them_or_not(tmp_path, line, classes):
    """A main.cf without notify_classes gets Postfix's default written, so that the postmaster hears of what the
    Postfix being replaced told them (no failed bounce: bounce_notify_service.c), not mailflow's default."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.test\n" + line)
    assert run_import(main, None, tmp_path / "mailflow.toml") == (0, "")
    assert checked(tmp_path / "mailflow.toml")["queue"]["notify_classes"] == classes
    if not line:
        assert ("# (no notify_classes in main.cf) Postfix's default: resource, software (mailflow's own adds "
                "2bounce)") in (tmp_path / "mailflow.toml").read_text()


def test_postfix_3_7_s_old_restriction_names_import_and_load(tmp_path):
    """reject_invalid_hostname, reject_non_fqdn_hostname, reject_unknown_hostname, reject_unknown_client, reject_rbl
    (with its argument) and check_recipient_maps: Postfix 3.7's smtpd_check.c still takes them, as its new names;
    mailflow refused all but reject_unknown_hostname as unknown restrictions. reject_maps_rbl, with its
    maps_rbl_domains, too."""
    main = write(tmp_path, "main.cf", """\
        myhostname = mx.example.test
        smtpd_helo_required = yes
        smtpd_helo_restrictions = reject_invalid_hostname, reject_non_fqdn_hostname, Reject_Unknown_Hostname
        smtpd_client_restrictions = reject_unknown_client, reject_rbl zen.example.test, reject_maps_rbl
        maps_rbl_domains = bl1.example.test, bl2.example.test=127.0.0.2
        smtpd_recipient_restrictions = check_recipient_maps, permit_mynetworks, reject_unauth_destination
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert smtpd["client_restrictions"] == ["reject_unknown_client", "reject_rbl zen.example.test", "reject_maps_rbl"]
    assert smtpd["maps_rbl_domains"] == ["bl1.example.test", "bl2.example.test=127.0.0.2"]
    assert [split_item(item) for item in smtpd["helo_restrictions"] + smtpd["client_restrictions"] +
            smtpd["recipient_restrictions"][:1]] == [
        ("reject_invalid_helo_hostname", ""), ("reject_non_fqdn_helo_hostname", ""),
        ("reject_unknown_helo_hostname", ""),
        ("reject_unknown_client_hostname", ""), ("reject_rbl_client", "zen.example.test"), ("reject_maps_rbl", ""),
        ("reject_unlisted_recipient", "")]


def test_permit_inet_interfaces_check_relay_domains_and_the_null_key_import_and_load(tmp_path):
    """A main.cf naming permit_inet_interfaces or check_relay_domains in a list, or setting
    smtpd_null_access_lookup_key, made a configuration mailflow refused to start with (unknown restriction, the
    key not imported); check_relay_domains guards the relay by itself, as in Postfix's rcpt_required."""
    main = write(tmp_path, "main.cf", """\
        myhostname = mx.example.test
        smtpd_null_access_lookup_key = <null>
        smtpd_relay_restrictions = permit_inet_interfaces, check_relay_domains
        smtpd_sender_restrictions = permit_inet_interfaces, check_sender_access inline:{<null>=REJECT}
        """)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert smtpd["relay_restrictions"] == ["permit_inet_interfaces", "check_relay_domains"]
    assert smtpd["null_access_lookup_key"] == "<null>"


def test_a_pcre_table_stays_pcre(tmp_path):
    """pcre: was written as regexp:, whose leftmost-longest matching answers `/^(a|ab)/ $1` with `ab` where
    Postfix's pcre answers `a`: mailflow has pcre: itself now, so the spec is kept as it is, with no note."""
    table = write(tmp_path, "header_checks", "/^Subject: (win|winner)/ REJECT $1\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nheader_checks = pcre:{table}\n"
                                      f"smtpd_sender_restrictions = check_sender_access proxy:pcre:{table}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    assert doc["checks"]["header_checks"] == [f"pcre:{table}"]
    assert doc["smtpd"]["sender_restrictions"] == [f"check_sender_access pcre:{table}"]
    assert "regexp" not in (tmp_path / "mailflow.toml").read_text()


@pytest.mark.parametrize("kind", ["pcre", "regexp"])
def test_each_pattern_line_mailflow_refuses_is_reported_with_file_line_and_reason(tmp_path, kind):
    """A migrated header_checks with `\\1` (line 2) and `$2` (line 4) imported with exit 0 and no word, and then
    every message got 451 4.3.0 (the table fails whole) where Postfix only skipped those lines: each line reported
    with its file, line and reason (exit 1, as a relay route), the table kept as written."""
    table = write(tmp_path, "header_checks", "# checks\n/^Subject: (a)\\1/ REJECT doubled\n/^X-Ok:/ WARN fine\n"
                                             "/^X-(b)/ REJECT $2\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nheader_checks = {kind}:{table}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1, err
    assert re.findall(rf"{re.escape(str(table))}:(\d+): {kind}: rule /", err) == ["2", "4"], err
    assert "rule /^Subject: (a)\\1/ REJECT doubled: mailflow's" in err and "fails the whole table" in err
    assert tomllib.loads((tmp_path / "mailflow.toml").read_text())["checks"]["header_checks"] == [f"{kind}:{table}"]
    # the table is kept, not left out: the output says so (it listed them under "Postfix setting(s) left out")
    assert "left out" not in err and "2 table line(s) mailflow refuses: the tables are kept as written" in err
    written = (tmp_path / "mailflow.toml").read_text()
    assert "# Table lines mailflow refuses (2): each table is kept as written" in written
    assert "# Left out" not in written


@pytest.mark.parametrize("kind", ["pcre", "regexp"])
def test_a_pattern_file_that_is_not_utf8_is_reported(tmp_path, kind):
    """A Latin-1 header_checks imported with exit 0 and no word; `config check` then refused it and serve answered
    4.3.0 to every message (Postfix reads the file's bytes): reported with its file, line and byte (exit 1), also
    when it is named by a restriction in a path holding a quote (the import scanned repr() of the settings)."""
    folder = tmp_path / "it's"
    folder.mkdir()
    table = folder / "header_checks"
    table.write_bytes(b"# checks\n/^Subject: ok/ WARN fine\n/^Subject: Rabatt f\xfcr/ REJECT no\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\n"
                                      f"smtpd_sender_restrictions = check_sender_access {kind}:{table}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1, err
    assert f"{table}:3: {kind}: file: not UTF-8 (byte 0xfc): mailflow's {kind}: cannot read it" in err, err
    assert "\\xfc" in err


@pytest.mark.parametrize("kind", ["pcre", "regexp"])
def test_a_pattern_file_that_is_a_fifo_is_reported_not_waited_for(tmp_path, kind):
    """A FIFO named as a regexp:/pcre: table held `config import` at open() for ever (its scans read the file with a
    bare open()): it is refused as the tables refuse it, and reported naming it (exit 1); /dev/null is an empty
    table, as for the tables. (A subprocess: a hang fails the test at its timeout.)"""
    fifo = tmp_path / "checks.fifo"
    os.mkfifo(fifo)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nheader_checks = {kind}:{fifo}\n"
                                      f"body_checks = {kind}:/dev/null\ntransport_maps = {kind}:{fifo}\n")
    done = subprocess.run([sys.executable, "-m", "mailflow", "config", "import", main, "-o",
                           str(tmp_path / "mailflow.toml"), "--hostname", "mx.example.test"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"{fifo}: {kind}: file: is a FIFO, not a regular file: mailflow's {kind}: cannot read it" in done.stderr
    assert "/dev/null" not in done.stderr


@pytest.mark.parametrize("value, forbid", [("no", False), ("yes", False), ("Normalize", False), ("reject", True)])
def test_forbid_bare_newline_is_translated_by_its_value(tmp_path, value, forbid):
    """smtpd_forbid_bare_newline (Postfix 3.7.11: no, normalize, yes, reject; any case) sets smtpd.forbid_bare_newline:
    reject is true, the others false (Postfix's `no`; normalize and yes note that Postfix's DATA ends only at
    CRLF.CRLF for the clients outside its exclusions); in
    main.cf and as a listener's -o. Each notes the bare CR in a command line mailflow refuses and Postfix takes
    (`no` noted nothing). It was taken for a built-in `no`: every other value left out, `no` written as
    nothing (mailflow's default, reject)."""
    main = write(tmp_path, "main.cf", f"smtpd_forbid_bare_newline = {value}\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   f"submission inet n - y - - smtpd\n  -o smtpd_forbid_bare_newline={value}\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["smtpd"]["forbid_bare_newline"] is forbid
    assert {listener["overrides"]["forbid_bare_newline"] for listener in doc["smtpd"]["listeners"]} == {forbid}
    text = (tmp_path / "mailflow.toml").read_text()
    assert ("Postfix's normalize ends DATA only at <CR><LF>.<CR><LF>" in text) is (value in ("yes", "Normalize"))
    assert "a bare <CR> in a command line gets 521 5.5.2 and a disconnect from mailflow" in text  # (all four)



def test_a_main_cf_without_forbid_bare_newline_notes_that_postfix_3_7_took_bare_lf_from_everyone(tmp_path):
    """Postfix 3.7.11's default is no; mailflow's stays true (a security default), so outside clients whose bare LF
    Postfix took now get 521: a note says so (nothing did)."""
    code, err = run_import(write(tmp_path, "main.cf", "myhostname = mx.test\n"), None, tmp_path / "mailflow.toml")
    assert code == 0, err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "(no smtpd_forbid_bare_newline in main.cf) Postfix 3.7.11's default is no" in text
    assert "a stray <CR> stored as a space: cleanup_replace_stray_cr_lf" in text and "for a bare <CR> too" in text
    assert "but under false too, a bare <CR> in a command line gets 521 5.5.2 and a disconnect" in text
    code, err = run_import(write(tmp_path, "main.cf", "smtpd_forbid_bare_newline = reject\n"), None,
                           tmp_path / "mailflow.toml")
    assert code == 0, err
    assert "(no smtpd_forbid_bare_newline in main.cf)" not in (tmp_path / "mailflow.toml").read_text()

def test_forbid_bare_newline_reject_is_imported_with_its_exclusions_and_its_differences_noted(tmp_path):
    """reject: Postfix 3.7.11's reply (550, a disconnect only after a command) noted; its exclusions translated
    (`$mynetworks`, its default, is mailflow's); reject_code = 521 is mailflow's behaviour (built in), another
    code is left out, and the bare <CR> it refuses too (Postfix stores a space: cleanup_replace_stray_cr_lf) is
    noted. normalize and yes: the end of DATA they keep for the clients outside the exclusions, which false does
    not, is noted (the bare <CR> false refused, noted too, is now a space as in Postfix). The exclusions were always
    left out and no difference was noted."""
    main = write(tmp_path, "main.cf", "smtpd_forbid_bare_newline = reject\n"
                                      "smtpd_forbid_bare_newline_exclusions = 192.0.2.0/24, [2001:db8::]/32\n"
                                      "smtpd_forbid_bare_newline_reject_code = 521\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    doc, text = checked(tmp_path / "mailflow.toml"), (tmp_path / "mailflow.toml").read_text()
    assert doc["smtpd"]["forbid_bare_newline_exclusions"] == ["192.0.2.0/24", "[2001:db8::]/32"]
    assert "mailflow replies 521 5.5.2 and disconnects, after a command as in DATA" in text
    assert "mailflow also refuses a bare <CR> so, which Postfix takes" in text
    assert "stored as a space; but a bare <CR> in a command line gets 521 5.5.2 and a disconnect" in text  # (excluded)
    assert "smtpd_forbid_bare_newline_reject_code = 521 is built in" in text
    main = write(tmp_path, "main.cf", "smtpd_forbid_bare_newline = normalize\n"
                                      "smtpd_forbid_bare_newline_exclusions = $mynetworks\n"
                                      "smtpd_forbid_bare_newline_reject_code = 550\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1
    assert "smtpd_forbid_bare_newline_reject_code: only smtpd_forbid_bare_newline_reject_code = 521" in err, err
    doc, text = checked(tmp_path / "mailflow.toml"), (tmp_path / "mailflow.toml").read_text()
    assert "forbid_bare_newline_exclusions" not in doc["smtpd"]
    assert "smtpd_forbid_bare_newline_exclusions = $mynetworks is mailflow's default" in text
    assert "mailflow's false is Postfix's no" in text and "refuses a bare <CR>" not in text


def test_forbid_bare_newline_of_another_value_is_left_out(tmp_path):
    main = write(tmp_path, "main.cf", "smtpd_forbid_bare_newline = maybe\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 1 and "smtpd_forbid_bare_newline: not normalize, yes, reject or no" in err, err
    assert "forbid_bare_newline" not in checked(tmp_path / "mailflow.toml").get("smtpd", {})


def test_a_listeners_built_in_or_unneeded_option_is_noted_not_left_out(tmp_path):
    """Debian's stock submission service: `-o smtpd_tls_auth_only=yes` is mailflow's behaviour and
    `-o smtpd_sasl_security_options=noanonymous` is not needed, as in main.cf (they were left out as having "no
    mailflow counterpart", exit 1); `-o smtpd_tls_auth_only=no` asks another behaviour (left out, with why);
    `-o smtpd_use_tls` beside a level applies to nothing (noted)."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\nsmtpd_sasl_auth_enable = no\n"
                                      "smtpd_sasl_type = dovecot\nsmtpd_sasl_path = /run/dovecot/auth\n")
    submission = ("submission inet n - y - - smtpd\n  -o smtpd_tls_security_level=encrypt\n"
                  "  -o smtpd_sasl_auth_enable=yes\n  -o smtpd_tls_auth_only=yes\n"
                  "  -o smtpd_sasl_security_options=noanonymous\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n" + submission)
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "submission -o smtpd_tls_auth_only=yes is built in: mailflow offers AUTH only after TLS" in text
    assert "submission -o smtpd_sasl_security_options=noanonymous not needed: mailflow offers PLAIN and LOGIN" in text
    assert {listener["role"] for listener in checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]} == {
        "submission"}
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   + submission.replace("=encrypt", "=may") + "  -o smtpd_tls_auth_only=no\n  -o smtpd_use_tls=yes\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "submission -o smtpd_tls_auth_only: only smtpd_tls_auth_only = yes is mailflow's behaviour" in err, err
    assert "submission -o smtpd_use_tls=yes applies to nothing: smtpd_tls_security_level is set" in (
        tmp_path / "mailflow.toml").read_text()


@pytest.mark.parametrize("tls", ["  -o smtpd_tls_security_level=encrypt\n", "  -o smtpd_tls_wrappermode=yes\n",
                                 "  -o smtpd_enforce_tls=yes\n"])
def test_auth_only_no_where_tls_is_required_is_noted_as_postfix_forces_it(tmp_path, tls):
    """Postfix forces smtpd_tls_auth_only where TLS is required (smtpd.c: wrapper mode, encrypt, enforce), so
    `-o smtpd_tls_auth_only=no` there is mailflow's behaviour: noted. It was left out, exit 1."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n" + tls + "  -o smtpd_tls_auth_only=no\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert "-o smtpd_tls_auth_only" not in err, err
    assert "submission -o smtpd_tls_auth_only=no applies to nothing: Postfix forces" in (
        tmp_path / "mailflow.toml").read_text()


def test_sasl_security_options_that_drop_plain_and_login_are_left_out(tmp_path):
    """noplaintext (or mutual_auth) makes Postfix offer neither PLAIN nor LOGIN, mailflow's mechanisms: left out
    with why, in main.cf and as an -o (both were noted "not needed" whatever the value)."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n"
                                      "smtpd_sasl_security_options = noanonymous, noplaintext\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n  -o smtpd_sasl_security_options=mutual_auth\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "smtpd_sasl_security_options: with noplaintext, Postfix offers neither PLAIN nor LOGIN" in err, err
    assert "submission -o smtpd_sasl_security_options: with mutual_auth, Postfix offers neither" in err, err



def test_sasl_security_options_are_judged_with_the_tls_ones_as_postfix_judges_a_tls_session(tmp_path):
    """SASL_README's recommended pair (noanonymous, noplaintext; tls: noanonymous) offers PLAIN and LOGIN only after
    STARTTLS, as mailflow: noted, not left out (it was, as if PLAIN and LOGIN were never offered, and the tls
    options had "no counterpart"); noplaintext in the tls options is left out, in main.cf and as an -o."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n"
                                      "smtpd_sasl_security_options = noanonymous, noplaintext\n"
                                      "smtpd_sasl_tls_security_options = noanonymous\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n  -o smtpd_sasl_security_options=noplaintext\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "smtpd_sasl_security_options = noanonymous, noplaintext noplaintext outside TLS only" in text
    assert "submission -o smtpd_sasl_security_options=noplaintext noplaintext outside TLS only" in text
    assert "smtpd_sasl_tls_security_options = noanonymous not needed" in text
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n"
                                      "smtpd_sasl_tls_security_options = noplaintext\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n  -o smtpd_sasl_tls_security_options=mutual_auth\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "smtpd_sasl_tls_security_options: with noplaintext, Postfix offers neither PLAIN nor LOGIN in TLS" in err
    assert "submission -o smtpd_sasl_tls_security_options: with mutual_auth, Postfix offers neither" in err, err


def test_the_plain_sasl_options_note_says_outside_tls_only_only_when_the_tls_ones_refuse_neither(tmp_path):
    """tls options of $smtpd_sasl_security_options (noplaintext too): TLS sessions refuse PLAIN and LOGIN as well, so
    the plain options' note must not say Postfix offers them after STARTTLS (it did, review LOW 4); the tls line is
    left out (exit 1), in main.cf and as an -o."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n"
                                      "smtpd_sasl_security_options = noanonymous, noplaintext\n"
                                      "smtpd_sasl_tls_security_options = $smtpd_sasl_security_options\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n  -o smtpd_sasl_security_options=noplaintext\n"
                   "  -o smtpd_sasl_tls_security_options=mutual_auth\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 1
    assert "smtpd_sasl_tls_security_options: with noplaintext, Postfix offers neither PLAIN nor LOGIN in TLS" in err
    assert "submission -o smtpd_sasl_tls_security_options: with mutual_auth, Postfix offers neither" in err, err
    text = (tmp_path / "mailflow.toml").read_text()
    assert "outside TLS only" not in text
    assert "smtpd_sasl_security_options = noanonymous, noplaintext not needed: noplaintext judges sessions " \
           "outside TLS, where mailflow offers no AUTH" in text
    assert "submission -o smtpd_sasl_security_options=noplaintext not needed: noplaintext judges sessions" in text


def test_a_services_legacy_tls_options_set_its_listeners_level_as_postfix_3_7_maps_them(tmp_path):
    """-o smtpd_enforce_tls=yes is encrypt (a submission listener with AUTH: it was left out as "main.cf only",
    leaving main.cf's none, no STARTTLS and so no AUTH), -o smtpd_use_tls=yes may; with a
    smtpd_tls_security_level Postfix takes that instead (noted)."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n"
                                      "smtpd_sasl_type = dovecot\nsmtpd_sasl_path = /run/dovecot/auth\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "submission inet n - y - - smtpd\n  -o smtpd_enforce_tls=yes\n  -o smtpd_sasl_auth_enable=yes\n"
                   "  -o smtpd_tls_auth_only=no\n"
                   "2525 inet n - y - - smtpd\n  -o smtpd_use_tls=yes\n"
                   "2526 inet n - y - - smtpd\n  -o smtpd_use_tls=yes\n  -o smtpd_tls_security_level=none\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    doc, text = checked(tmp_path / "mailflow.toml"), (tmp_path / "mailflow.toml").read_text()
    assert doc["smtpd"]["tls_security_level"] == "none"
    listeners = {listener["address"].rpartition(":")[2]: listener for listener in doc["smtpd"]["listeners"]}
    assert listeners["587"]["role"] == "submission"
    assert listeners["587"]["overrides"]["tls_security_level"] == "encrypt"
    assert listeners["2525"]["overrides"]["tls_security_level"] == "may"
    assert listeners["2526"]["overrides"]["tls_security_level"] == "none"
    assert "submission -o smtpd_enforce_tls=yes is tls_security_level = encrypt" in text
    assert "2526 -o smtpd_use_tls=yes applies to nothing: smtpd_tls_security_level is set" in text
    assert "submission -o smtpd_tls_auth_only=no applies to nothing: Postfix forces" in text

def test_a_listeners_option_note_names_its_service(tmp_path):
    """A note convert() makes for an -o (smtpd_forbid_bare_newline's) names the service; it named only the
    parameter, as if main.cf's."""
    main = write(tmp_path, "main.cf", "smtpd_forbid_bare_newline = reject\n")
    master = write(tmp_path, "master.cf", STANDARD_SERVICES + "smtp inet n - y - - smtpd\n"
                   "2525 inet n - y - - smtpd\n  -o smtpd_forbid_bare_newline=normalize\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert re.search(r"master\.cf:\d+: 2525 -o smtpd_forbid_bare_newline = normalize: mailflow's false is",
                     (tmp_path / "mailflow.toml").read_text())


@pytest.mark.parametrize("lines, smtpd, smtp", [
    ("smtpd_use_tls = no\nsmtp_use_tls = no\n", "none", "none"),
    ("smtpd_use_tls = yes\nsmtp_use_tls = yes\n", "may", "may"),
    ("smtpd_use_tls = no\nsmtpd_tls_security_level = may\nsmtp_use_tls = no\nsmtp_tls_security_level = encrypt\n",
     "may", "encrypt"),  # (a level wins, as Postfix's)
    # enforce wins over use_tls (smtpd.c; smtp_tls_policy.c: verify with smtp_tls_enforce_peername, its default yes)
    ("smtpd_use_tls = yes\nsmtpd_enforce_tls = yes\nsmtp_use_tls = yes\nsmtp_enforce_tls = yes\n", "encrypt",
     "verify"),
    ("smtpd_use_tls = no\nsmtpd_enforce_tls = yes\nsmtp_enforce_tls = yes\nsmtp_tls_enforce_peername = no\n",
     "encrypt", "encrypt"),
    ("smtpd_use_tls = no\nsmtpd_enforce_tls = no\nsmtp_use_tls = no\nsmtp_enforce_tls = no\n", "none", "none"),
    # an empty level is unset, as Postfix takes it
    ("smtpd_use_tls = no\nsmtpd_tls_security_level =\nsmtp_use_tls = yes\nsmtp_tls_security_level =\n", "none",
     "may"),
    ("", "none", "none"),  # Postfix 3.7's defaults: no use_tls, no level (mailflow's own default, may, is not it)
])
def test_use_tls_sets_the_level_either_way(tmp_path, lines, smtpd, smtp):
    """smtpd_use_tls and smtp_use_tls (Postfix 3.7: the level when *_tls_security_level is not set) are `may` for
    yes and `none` for no; no was dropped without a word, so mailflow's default (may) offered and used STARTTLS
    where Postfix did not."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"smtpd_tls_cert_file = {pki.server_cert}\n" + lines)
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    doc = checked(tmp_path / "mailflow.toml")
    assert (doc["smtpd"]["tls_security_level"], doc["smtp"]["tls_security_level"]) == (smtpd, smtp)


def test_an_smtpd_service_s_inet_interfaces_is_a_note_and_does_not_break_the_listeners(tmp_path):
    """master.cf's `-o inet_interfaces=` (content filter return services carry it): Postfix's master binds the
    service where main.cf's inet_interfaces or its host:port say, the -o reaching only its smtpd; it was a
    listener override of `listen` that mailflow refused, taking every listener with it."""
    main = write(tmp_path, "main.cf", "myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      "inet_protocols = ipv4\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\n127.0.0.1:10025 inet n - n - - smtpd\n"
                   "  -o inet_interfaces=127.0.0.1\n  -o inet_protocols=ipv4\n"
                   "  -o smtpd_client_restrictions=permit_mynetworks,reject\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert smtpd["listen"] == ["127.0.0.1:25"]
    [filter_return] = smtpd["listeners"]
    assert (filter_return["address"], filter_return["overrides"]["client_restrictions"]) == (
        "127.0.0.1:10025", ["permit_mynetworks", "reject"])
    assert "# Note: master.cf:2: 127.0.0.1:10025 -o inet_interfaces=127.0.0.1 not needed: Postfix's master(8) " \
           "binds" in (tmp_path / "mailflow.toml").read_text()


def test_the_sasl_options_of_a_service_are_judged_with_its_service_name(tmp_path):
    """smtpd_sasl_tls_security_options reached from a service's -o through a main.cf helper naming $service_name
    (Postfix's smtpd expands it with its service's name): noanonymous in TLS sessions, so the service's noplaintext
    is for sessions outside TLS only, a note; the helper is a note too, not a line left out."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                                      "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"
                                      "tls_sasl = ${service_name?{noanonymous}:{noplaintext}}\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
                   "  -o smtpd_sasl_type=dovecot\n  -o smtpd_sasl_path=/run/dovecot/auth\n"
                   "  -o smtpd_sasl_security_options=noanonymous,noplaintext\n"
                   "  -o smtpd_sasl_tls_security_options=$tls_sasl\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    [submission] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert (submission["address"], submission["role"]) == ("127.0.0.1:587", "submission")
    written = (tmp_path / "mailflow.toml").read_text()
    assert "noplaintext outside TLS only (smtpd_sasl_tls_security_options = noanonymous)" in written
    assert "# Note: main.cf:5: tls_sasl is a helper parameter, used by master.cf submission through $tls_sasl" \
        in written


def test_a_domain_list_s_file_is_written_as_its_path_read_by_mailflow_and_a_missing_one_left_out(tmp_path):
    """Postfix's domain lists take `/file/name` (postconf(5), match_list(3)); docker-mailserver's
    `virtual_mailbox_domains = /etc/postfix/vhost`, rewritten when accounts change. The import writes the path as
    it is (mailflow reads the file at start and reload, as Postfix at its daemons' start): the output loads, and a
    domain added to the file after the import is in the list; a file larger than the limit of a configuration
    file's lines leaves the output loadable; a file that cannot be read is left out naming it, its words unprinted."""
    vhost = write(tmp_path, "vhost", "# hosted\n  example.org, Example.NET #x.example\n")
    secret = write(tmp_path, "secret", "root:$y$SECRETHASH:19000\n")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nvirtual_mailbox_domains = {vhost}\n"
                                      f"virtual_transport = lmtp:inet:127.0.0.1:24\n"
                                      f"relay_domains = {tmp_path / 'absent'}\nmydestination = {secret}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert doc["virtual_mailbox_domains"] == [vhost]
    assert "relay_domains" not in doc and "mydestination" not in doc
    lines = sorted(err.splitlines()[1:])
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith(f"  main.cf:4: relay_domains: mailflow refuses it: open file {tmp_path / 'absent'}: "
                               "No such file or directory")
    assert lines[1].startswith(f"  main.cf:5: mydestination: mailflow refuses it: {secret}, line 1: a word is not a "
                               "domain name")
    assert "SECRETHASH" not in err
    assert "SECRETHASH" not in (tmp_path / "mailflow.toml").read_text()
    Path(vhost).write_text("example.org\nexample.net\nadded.example\n")
    assert load_config(tmp_path / "mailflow.toml").virtual_mailbox_domains == (
        "example.org", "example.net", "added.example")


def test_a_translation_larger_than_a_configuration_file_is_refused_not_written(tmp_path):
    """A long inline list (written as a value and as its main.cf line's comment) made an output past the 4 MB the
    loader reads: exit 0, then `config check`: "larger than 4 MB: not a configuration file"."""
    domains = ", ".join(f"d{n:06d}.example.org" for n in range(110_000))
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nmydestination = {domains}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 2 and not (tmp_path / "mailflow.toml").exists()
    assert "more than the 4 MB mailflow reads as a configuration file: put long lists in files" in err


def test_a_domain_list_file_s_size_is_not_the_output_s(tmp_path):
    """A pattern file was written inline: one just under the 4 MB limit made an output past a configuration file's
    4 MB (import rc 0, then `config check`: "larger than 4 MB"). The output names the file, whatever it holds."""
    vhost = write(tmp_path, "vhost", "".join(f"d{n:06d}.example.org\n" for n in range(20_000)))
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nvirtual_mailbox_domains = {vhost}\n"
                                      f"virtual_transport = lmtp:inet:127.0.0.1:24\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert checked(tmp_path / "mailflow.toml")["virtual_mailbox_domains"] == [vhost]
    assert (tmp_path / "mailflow.toml").stat().st_size < 4096


def split_pem(path: str, folder: Path) -> tuple[str, str]:
    """A key-and-chain PEM file as a key file and a certificates file."""
    text = Path(path).read_text()
    cut = text.index("-----BEGIN CERTIFICATE-----")
    return write(folder, "key.pem", text[:cut]), write(folder, "certs.pem", text[cut:])


@pytest.mark.parametrize("layout", ["one file", "key then certificates"])
def test_smtpd_tls_chain_files_of_one_key_is_the_certificate_pair_and_the_legacy_files_apply_to_nothing(
        tmp_path, layout):
    """docker-mailserver's `smtpd_tls_chain_files = KEY CERT` (postconf(5): the files concatenated are key1, cert1,
    [chain1], …; the legacy smtpd_tls_cert_file/key_file are then ignored): mailflow's one pair, so that the
    submission listeners that require TLS load (they were refused for want of a certificate)."""
    pki = ClientPki(tmp_path)
    key, certs = (pki.server_cert, pki.server_cert) if layout == "one file" else split_pem(pki.server_cert, tmp_path)
    files = pki.server_cert if layout == "one file" else f"{key} {certs}"
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      f"inet_protocols = ipv4\nsmtpd_tls_cert_file = /nowhere/cert.pem\n"
                                      f"smtpd_tls_chain_files = {files}\nsmtpd_tls_security_level = may\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmissions inet n - y - - smtpd\n"
                   "  -o smtpd_tls_wrappermode=yes\n  -o smtpd_sasl_auth_enable=yes\n  -o smtpd_sasl_type=dovecot\n"
                   "  -o smtpd_sasl_path=/run/dovecot/auth\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert (smtpd["tls_cert_file"], smtpd["tls_key_file"]) == (certs, key)
    assert [x["role"] for x in smtpd["listeners"]] == ["submissions"]
    assert "main.cf:4: smtpd_tls_cert_file = /nowhere/cert.pem applies to nothing: smtpd_tls_chain_files is set" \
        in (tmp_path / "mailflow.toml").read_text()


def test_smtpd_tls_chain_files_of_two_keys_is_left_out_saying_mailflow_serves_one_certificate(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    pki, other = ClientPki(tmp_path / "a"), ClientPki(tmp_path / "b")
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\n"
                                      f"smtpd_tls_chain_files = {pki.server_cert}, {other.server_cert}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert "tls_cert_file" not in checked(tmp_path / "mailflow.toml").get("smtpd", {})
    assert code == 1 and err.splitlines()[1:] == [
        "  main.cf:2: smtpd_tls_chain_files: 2 keys with their certificates: mailflow's smtpd serves one certificate "
        "(set smtpd.tls_cert_file and smtpd.tls_key_file to one of the pairs)"]


def two_pkis(tmp_path: Path) -> tuple[ClientPki, ClientPki]:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    return ClientPki(tmp_path / "a"), ClientPki(tmp_path / "b")


SUBMISSION = "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n  -o smtpd_tls_security_level=encrypt\n"


def test_a_service_s_legacy_certificate_o_applies_to_nothing_under_main_cf_s_chain_files(tmp_path):
    """Postfix's smtpd takes smtpd_tls_chain_files whenever it is set and ignores the legacy files (tls_certkey.c,
    tls_set_my_certificate_key_info): a service's -o smtpd_tls_cert_file/key_file under main.cf's chain_files is not
    its certificate (mailflow served the -o's certificate where Postfix serves the chain's)."""
    pki, other = two_pkis(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      f"inet_protocols = ipv4\nsmtpd_tls_chain_files = {pki.server_cert}\n")
    master = write(tmp_path, "master.cf", SUBMISSION + f"  -o smtpd_tls_cert_file={other.server_cert}\n"
                                                       f"  -o smtpd_tls_key_file={other.server_cert}\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    doc = checked(tmp_path / "mailflow.toml")
    assert (code, err) == (0, "")
    assert doc["smtpd"]["tls_cert_file"] == pki.server_cert
    [submission] = doc["smtpd"]["listeners"]
    assert "tls_cert_file" not in submission["overrides"] and "tls_key_file" not in submission["overrides"]
    assert (f"master.cf:2: submission -o smtpd_tls_cert_file={other.server_cert} applies to nothing: "
            "smtpd_tls_chain_files is set for the service") in (tmp_path / "mailflow.toml").read_text()


@pytest.mark.parametrize("main_cf_chain", [False, True])
def test_a_service_s_o_smtpd_tls_chain_files_is_its_certificate_pair_and_an_empty_one_the_legacy_files(
        tmp_path, main_cf_chain):
    """-o smtpd_tls_chain_files was left out ("translated from main.cf only"); it is the listener's pair as
    main.cf's is [smtpd]'s, and over main.cf's legacy files too. Empty, the legacy files apply (main.cf's)."""
    pki, other = two_pkis(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\ninet_interfaces = loopback-only\n"
                                      f"inet_protocols = ipv4\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                                      + (f"smtpd_tls_chain_files = {pki.server_cert}\n" if main_cf_chain else ""))
    master = write(tmp_path, "master.cf", SUBMISSION + f"  -o smtpd_tls_chain_files={other.server_cert}\n"
                   f"smtps inet n - y - - smtpd\n  -o smtpd_tls_wrappermode=yes\n  -o smtpd_tls_chain_files=\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    submission, smtps = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert (code, err) == (0, "")
    assert (submission["overrides"]["tls_cert_file"], submission["overrides"]["tls_key_file"]) == (
        other.server_cert, other.server_cert)
    assert (smtps["overrides"].get("tls_cert_file"), smtps["overrides"].get("tls_key_file")) == (
        (pki.server_cert, pki.server_cert) if main_cf_chain else (None, None))  # ([smtpd]'s are main.cf's then)


def test_relative_chain_files_are_taken_from_queue_directory_as_the_legacy_files_are(tmp_path):
    """Postfix's smtpd opens its TLS files from queue_directory (it chdirs there): the chain files were read from
    the importer's directory and refused as unreadable while the legacy pair imported."""
    queue = tmp_path / "spool"
    queue.mkdir()
    pki = ClientPki(tmp_path)
    key, certs = split_pem(pki.server_cert, queue)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nqueue_directory = {queue}\n"
                                      f"smtpd_tls_chain_files = key.pem, certs.pem\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    smtpd = checked(tmp_path / "mailflow.toml")["smtpd"]
    assert (code, err) == (0, "")
    assert (smtpd["tls_cert_file"], smtpd["tls_key_file"]) == (certs, key)


def test_one_key_whose_certificate_and_chain_are_in_two_files_is_left_out_saying_concatenate(tmp_path):
    """`key+cert, chain` and `key, cert, chain` are one key for Postfix; mailflow takes the certificates in one
    file: the reason says how to make it."""
    pki = ClientPki(tmp_path)
    text = Path(pki.server_cert).read_text()
    first_cert_end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")
    key_and_cert = write(tmp_path, "key_cert.pem", text[:first_cert_end])
    chain = write(tmp_path, "chain.pem", Path(pki.ca_file).read_text())  # (the issuer's certificate as the chain)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_chain_files = {key_and_cert} {chain}\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert "tls_cert_file" not in checked(tmp_path / "mailflow.toml").get("smtpd", {})
    assert code == 1 and "concatenate the certificate files into one (cat cert.pem chain.pem > fullchain.pem)" in err


def test_main_cf_s_sasl_path_a_service_inherits_is_expanded_with_its_service_name(tmp_path):
    """main.cf's smtpd_sasl_path read by a service whose own -o smtpd_sasl_type=dovecot makes it Dovecot's socket:
    its $service_name is the service's, as Postfix's smtpd expands main.cf's values."""
    pki = ClientPki(tmp_path)
    main = write(tmp_path, "main.cf", f"myhostname = mx.example.com\nsmtpd_tls_cert_file = {pki.server_cert}\n"
                                      "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"
                                      "smtpd_sasl_path = private/auth-$service_name\n")
    master = write(tmp_path, "master.cf", "smtp inet n - y - - smtpd\nsubmission inet n - y - - smtpd\n"
                   "  -o smtpd_tls_security_level=encrypt\n  -o smtpd_sasl_auth_enable=yes\n"
                   "  -o smtpd_sasl_type=dovecot\n")
    code, err = run_import(main, master, tmp_path / "mailflow.toml")
    [submission] = checked(tmp_path / "mailflow.toml")["smtpd"]["listeners"]
    assert submission["overrides"]["sasl_path"] == "/var/spool/postfix/private/auth-submission"
    assert (code, err) == (0, "")  # ([smtpd]'s, under Postfix's cyrus, a note)


def test_cleanup_replace_stray_cr_lf_is_built_in_and_its_no_left_out(tmp_path):
    """yes (Postfix 3.7.10+'s default) is what mailflow does with a stray <CR>; no (kept as sent) it cannot do. The
    name had no counterpart."""
    main = write(tmp_path, "main.cf", "cleanup_replace_stray_cr_lf = yes\n")
    code, err = run_import(main, None, tmp_path / "mailflow.toml")
    assert code == 0, err
    assert "cleanup_replace_stray_cr_lf = yes is built in: mailflow stores a stray <CR>" in (
        tmp_path / "mailflow.toml").read_text()
    code, err = run_import(write(tmp_path, "main.cf", "cleanup_replace_stray_cr_lf = no\n"), None,
                           tmp_path / "mailflow.toml")
    assert code == 1 and "cleanup_replace_stray_cr_lf: only cleanup_replace_stray_cr_lf = yes" in err, err
