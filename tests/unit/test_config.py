"""mailflow.config: the embedded defaults, load_config of TOML files, and the errors it gives for bad ones."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mailflow.config import Config, QueueConfig, SmtpdConfig, config_from_dict, load_config, resolve_paths
from mailflow.errors import ConfigError
from mailflow.syntax import parse_duration, parse_hostport, parse_policy_service


def write(tmp_path: Path, text: str, name: str = "mailflow.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# ---------------------------------------------------------------------------------------------- defaults


def test_embedded_defaults():
    c = load_config(None)
    assert c == resolve_paths(Config(), Path.cwd())  # relative paths from the current directory, made absolute
    assert Config().queue_directory == "var"
    assert c.smtpd.listen == ("127.0.0.1:2525",)
    assert c.queue_path == Path.cwd() / "var"
    assert c.mydestination == ("localhost",)
    assert c.relay_domains == ()
    assert c.relayhost == ""
    assert (c.local_transport, c.relay_transport, c.default_transport) == ("local", "relay", "smtp")
    assert c.queue.minimal_backoff_time == 300.0
    assert c.queue.maximal_backoff_time == 4000.0


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == resolve_paths(Config(), tmp_path)


def test_load_config_reads_values_and_sections(tmp_path):
    path = write(tmp_path, """
myhostname = "mx.example.test"
mydestination = ["Example.TEST.", "localhost"]
relayhost = "[10.0.0.1]:587"
[smtpd]
listen = ["[::1]:25", "0.0.0.0:2525"]
[queue]
minimal_backoff_time = "5m"
maximal_backoff_time = 7200
""")
    c = load_config(str(path))  # a str works as well as a Path
    assert c.myhostname == "mx.example.test"
    assert c.mydestination == ("example.test", "localhost")  # lower case, no trailing dot
    assert c.relayhost == "[10.0.0.1]:587"
    assert c.smtpd.listen == ("[::1]:25", "0.0.0.0:2525")
    assert c.queue.minimal_backoff_time == 300.0
    assert c.queue.maximal_backoff_time == 7200.0


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, key", [
    ("bogus = 1\n", "bogus"),
    ("[queue]\nbogus_time = '5m'\n", "queue.bogus_time"),
    ("[smtpd]\nlisten = ['127.0.0.1:25']\nbanner_text = 'x'\n", "smtpd.banner_text"),
    ("[nosuchsection]\nx = 1\n", "nosuchsection"),
])
def test_unknown_key_names_file_key_and_reason(tmp_path, text, key):
    path = write(tmp_path, text)
    err = config_error(path)
    assert err.file == str(path)
    assert err.key == key
    assert err.reason == "unknown setting"
    assert str(err) == f"{path}: {key}: unknown setting"


@pytest.mark.parametrize("text, key, reason", [
    ("mynetworks = '127.0.0.0/8, 192.0.2.0/24'\n", "mynetworks",
     'takes a list (a TOML array): ["127.0.0.0/8", "192.0.2.0/24"], not one string'),
    ("[smtpd]\nrecipient_restrictions = 'permit_mynetworks,reject'\n", "smtpd.recipient_restrictions",
     'takes a list (a TOML array): ["permit_mynetworks", "reject"], not one string'),
    ("[smtpd]\nlisten = 25\n", "smtpd.listen", "takes a list (a TOML array): [...], not int '25'"),
    ("[smtpd.listeners]\naddress = '127.0.0.1:587'\n", "smtpd.listeners",
     "takes a list of tables ([[smtpd.listeners]] before each one), not one table"),
    # split as `config import` splits main.cf's lists: at commas and blanks, a restriction's argument kept with it
    ("mynetworks = '127.0.0.0/8 [::1]/128, 10.0.0.0/8'\n", "mynetworks",
     'takes a list (a TOML array): ["127.0.0.0/8", "[::1]/128", "10.0.0.0/8"], not one string'),
    ("[smtpd]\nrecipient_restrictions = 'permit_mynetworks check_client_access texthash:/etc/postfix/access, "
     "reject_unauth_destination'\n", "smtpd.recipient_restrictions",
     'takes a list (a TOML array): ["permit_mynetworks", "check_client_access texthash:/etc/postfix/access", '
     '"reject_unauth_destination"], not one string'),
    # non-ASCII as TOML writes it (not JSON's \u00e4 and \ud83d\ude00 surrogates, which TOML refuses)
    ("relay_domains = 'exämple.test 😀.test'\n", "relay_domains",
     'takes a list (a TOML array): ["exämple.test", "😀.test"], not one string'),
    # a list of strings given a table is told nothing of [[...]] (smtpd.listeners is the one list of tables)
    ("mynetworks = { a = 'b' }\n", "mynetworks", "takes a list (a TOML array): [...], not a table"),
    ("[queue]\ntransport_concurrency_limit = 'smtp=2'\n", "queue.transport_concurrency_limit",
     "takes a table (TOML { key = value }, or a [section]), not str 'smtp=2'"),
])
def test_a_value_of_the_wrong_shape_says_what_to_write(tmp_path, text, key, reason):
    # main.cf's "a, b" written as is was refused with pydantic's words: "Input should be a valid tuple"; a
    # [smtpd.listeners] for [[smtpd.listeners]], "Input should be a valid list"
    err = config_error(write(tmp_path, text))
    assert (err.key, err.reason) == (key, reason)


@pytest.mark.parametrize("text, key, words", [
    ("[queue]\nminimal_backoff_time = '5 fortnights'\n", "queue.minimal_backoff_time", "not a duration"),
    ("[queue]\nmaximal_backoff_time = '-5s'\n", "queue.maximal_backoff_time", "not a duration"),
    ("[queue]\nqueue_run_delay = -1\n", "queue.queue_run_delay", "negative"),
    ("[smtpd]\ntimeout = true\n", "smtpd.timeout", "duration"),
    ("mynetworks = ['300.0.0.0/8']\n", "mynetworks", "300.0.0.0/8"),
    ("mynetworks = ['not a network']\n", "mynetworks", "not a network"),
    # Postfix fails every lookup of such a list (451 4.3.0 at each relay check); mailflow refuses it at once
    ("mynetworks = ['10.0.0.1/8']\n", "mynetworks",
     "non-null host address bits in '10.0.0.1/8', perhaps you should use '10.0.0.0/8' instead"),
    ("mynetworks = ['2001:db8::1/64']\n", "mynetworks", "perhaps you should use '2001:db8::/64' instead"),
    ("mynetworks = ['127.0.0.0/255.0.0.0']\n", "mynetworks", "bad mask value"),
    ("[greylist]\nwhitelist_networks = ['192.0.2.1/24']\n", "greylist.whitelist_networks", "host address bits"),
    ("[smtpd]\nlisten = ['127.0.0.1']\n", "smtpd.listen", "needs a port"),
    ("[smtpd]\nlisten = ['127.0.0.1:99999']\n", "smtpd.listen", "port out of range"),
    ("[smtpd]\nlisten = ['a:b:c']\n", "smtpd.listen", "not host:port"),
    ("relayhost = '[10.0.0.1]:70000'\n", "relayhost", "port out of range"),
    ("default_transport = 'no spaces allowed'\n", "default_transport", "transport"),
    ("[address_verify]\nrelayhost = '[10.0.0.1]:70000'\n", "address_verify.relayhost", "port out of range"),
    ("[address_verify]\nrelay_transport = 'no spaces'\n", "address_verify.relay_transport", "transport"),
    ("[address_verify]\ntransport_maps = ['hash:/etc/x']\n", "address_verify.transport_maps", "hash"),
    ("[address_verify]\nsender = 'owner@'\n", "address_verify.sender", "must not begin or end with '@'"),
    ("[address_verify]\nsender_ttl = '-1h'\n", "address_verify.sender_ttl", "not a duration"),
    ("[queue]\nactive_limit = 0\n", "queue.active_limit", "greater than or equal to 1"),
    ("[log]\nformat = 'xml'\n", "log.format", "json"),
    ("[queue]\ncommit_batch_limit = '999999999999999999999'\n", "queue.commit_batch_limit", "too large (at most 92233"),
    ("[queue]\nactive_limit = 2147483648\n", "queue.active_limit", "less than or equal to 2147483647"),  # a C int
    ('[dkim]\nkey_table = "keys\\u0000x"\n', "dkim.key_table", "contains a NUL character"),
    ('[pipe.x]\nargv = ["/bin/cat", "a\\u0000"]\n', "pipe.x.argv[1]", "contains a NUL character"),
    ('[smtpd]\nbanner = "ESMTP\\r\\n250 forged"\n', "smtpd.banner", "line break or another control character"),
    ('[smtp]\nhelo_name = "a\\nMAIL FROM:<x>"\n', "smtp.helo_name", "line break"),
    ('[queue]\ndouble_bounce_recipient = "pm\\u001b"\n', "queue.double_bounce_recipient", "control character"),
    # durations Postfix's conv_time refuses too (an int of seconds, at most INT_MAX); inf made serve's start overflow
    ("[smtpd]\ntimeout = nan\n", "smtpd.timeout", "nan is not a duration"),
    ("[address_verify]\nsender_ttl = inf\n", "address_verify.sender_ttl", "longer than 2147483647 seconds"),
    ("[queue]\nmaximal_queue_lifetime = '3551w'\n", "queue.maximal_queue_lifetime", "longer than 2147483647"),
    (f"[smtpd]\ntimeout = 1{'0' * 400}\n", "smtpd.timeout", "longer than 2147483647 seconds"),
    # Postfix's valid_hostname: "file main.cf: parameter myhostname: bad parameter value"
    ("myhostname = 'mail server'\n", "myhostname", "'mail server' is not a host name"),
    ("myhostname = ''\n", "myhostname", "'' is not a host name"),
    ("myhostname = '192.0.2.1'\n", "myhostname", "not a host name"),
    ("myhostname = 'mx-.example.com'\n", "myhostname", "not a host name"),
    ("mydomain = 'example com'\n", "mydomain", "not a domain name"),
    ("myorigin = 'a,b'\n", "myorigin", "not a domain name"),
    # a table held in the spec itself opens when the configuration is read (serve refused it, check-config did not)
    ("transport_maps = ['inline:{example.com=smtp:']\n", "transport_maps", "inline: expected inline:{"),
    ("alias_maps = ['static:']\n", "alias_maps", "static: needs a value"),
    ("local_recipient_maps = ['unix:passwd']\n", "local_recipient_maps", "unix: knows passwd.byname"),
    ("[sendmail]\nauthorized_submit_users = ['inline:{root']\n", "sendmail.authorized_submit_users", "inline:"),
    ("sender_bcc_maps = ['hash:/etc/postfix/sender_bcc']\n", "sender_bcc_maps", "hash"),
    ("recipient_bcc_maps = ['inline:{a@x.test=']\n", "recipient_bcc_maps", "inline:"),
    # always_bcc is one address (Postfix takes one too; a list was one address no one could deliver to)
    ("always_bcc = 'a@x.test, b@x.test'\n", "always_bcc", "is not an address"),
    ("always_bcc = 'archive team'\n", "always_bcc", "not one address"),
    # pydantic took true as 1 (every message a mail loop); Postfix: "bad numerical configuration: ... = yes"
    ("hopcount_limit = true\n", "hopcount_limit", "true is not a number"),
    ("[smtpd]\nmessage_size_limit = false\n", "smtpd.message_size_limit", "false is not a number"),
    ("[clamd]\naddress = '127.0.0.1:0'\n", "clamd.address", "port 0 is no port to connect to"),
    # a domain list's entry is a domain name: a main.cf habit was taken as a domain that never matched
    ("mydestination = ['$myhostname', 'localhost']\n", "mydestination", "there is no $name expansion"),
    ("mydestination = ['hash:/etc/postfix/local_domains']\n", "mydestination", "lookup tables are taken by"),
    ("relay_domains = ['example com']\n", "relay_domains", "'example com' is not a domain name"),
    ("virtual_alias_domains = ['-bad-.example']\n", "virtual_alias_domains", "not a domain name"),
    ("relayhost = 'smtp relay.example'\n", "relayhost", "is not a host name or an IP address"),
    ("[address_verify]\nrelayhost = '/'\n", "address_verify.relayhost", "is not a host name or an IP address"),
    ("[dns]\nnameservers = ['resolver.example']\n", "dns.nameservers", "is not a name server (ip, ip:port"),
    ("[dns]\nnameservers = ['127.0.0.1:0']\n", "dns.nameservers", "is not a name server"),
    # Postfix's TLS log levels are 0 to 4 (its 5 to 9 are 4 again)
    ("[smtpd]\ntls_loglevel = 5\n", "smtpd.tls_loglevel", "less than or equal to 4"),
    ("[smtpd]\n[[smtpd.listeners]]\naddress = '127.0.0.1:2526'\noverrides = { tls_loglevel = -1 }\n", "smtpd",
     "listener 0 (127.0.0.1:2526, mta): overrides.tls_loglevel: Input should be greater than or equal to 0"),
    ("[smtp]\ntls_loglevel = 5\n", "smtp.tls_loglevel", "less than or equal to 4"),
    # Postfix's error classes (mail_error.c)
    ("[queue]\nnotify_classes = ['resource', 'bounces']\n", "queue.notify_classes",
     "'bounces': not one of bounce, 2bounce, data, delay, policy, protocol, resource, software"),
    # Postfix's smtputf8_autodetect_classes names
    ("smtputf8_autodetect_classes = ['sendmial']\n", "smtputf8_autodetect_classes",
     "'sendmial': not one of sendmail, smtpd, qmqpd, forward, bounce, notify, verify, all"),
])
def test_bad_value_names_file_key_and_reason(tmp_path, text, key, words):
    path = write(tmp_path, text)
    err = config_error(path)
    assert err.file == str(path)
    assert err.key == key
    assert words in err.reason
    assert str(err).startswith(f"{path}: {key}: ")


def test_a_pipe_command_argument_may_hold_a_line_break(tmp_path):
    config = load_config(write(tmp_path, '[pipe.x]\nargv = ["/bin/sh", "-c", "read line\\ncat"]\n'))
    assert config.pipe["x"].argv[2] == "read line\ncat"


def test_several_problems_are_counted(tmp_path):
    err = config_error(write(tmp_path, "bogus = 1\nother = 2\n[queue]\nthird = 3\n"))
    assert err.reason.endswith("(and 2 more problems)")


def test_bad_toml_syntax_names_file_and_reason(tmp_path):
    path = write(tmp_path, "myhostname = \n")
    err = config_error(path)
    assert err.file == str(path)
    assert err.key == ""
    assert err.reason.startswith("not valid TOML")
    assert str(err).startswith(f"{path}: not valid TOML")


def test_missing_file_names_file_and_reason(tmp_path):
    path = tmp_path / "nowhere.toml"
    err = config_error(path)
    assert (err.file, err.key, err.reason) == (str(path), "", "no such file")
    assert str(err) == f"{path}: no such file"


def test_unreadable_path_names_file_and_reason(tmp_path):
    err = config_error(tmp_path)  # a directory
    assert err.file == str(tmp_path)
    assert err.reason.startswith("cannot read")


@pytest.mark.parametrize("content, key, reason", [
    (b'myhostname = "caf\xe9.example"\n', "", "not valid TOML: not UTF-8 (byte 0xe9 on line 1)"),  # saved as Latin-1
    ("# \u00e9\nmyhostname = 'a'\n".encode("utf-16"), "", "not valid TOML: not UTF-8 (byte 0xff on line 1)"),
    (b"\xef\xbb\xbfmyhostname = 'a'\n", "", "not valid TOML: it starts with a byte order mark"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "", "tables or arrays nested too deeply to read"),
    (b"[a" + b".a" * 40 + b"]\n", "a" + ".a" * 32, "tables or arrays nested deeper than 32 levels (no setting is)"),
    (b"x = 1" + b"0" * 5000 + b"\n", "", "not valid TOML: Exceeds the limit (4300 digits)"),
    (b"# a comment\n" * 400_000, "", "larger than 4 MB: not a configuration file"),  # (/dev/zero: read no further)
], ids=["latin-1", "utf-16", "byte-order-mark", "deep-arrays", "deep-tables", "huge-integer", "huge-file"])
def test_a_file_that_is_no_toml_document_names_file_and_reason(tmp_path, content, key, reason):
    path = tmp_path / "mailflow.toml"
    path.write_bytes(content)
    err = config_error(path)
    assert (err.file, err.key) == (str(path), key)
    assert err.reason.startswith(reason)


# ---------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("5d", 432000.0), ("1w", 604800.0),
    ("45", 45.0), (" 2m ", 120.0), ("1.5h", 5400.0), (90, 90.0), (0.5, 0.5), (0, 0.0),
    ("3550w", 2147040000.0), (2**31 - 1, 2147483647.0),  # Postfix's longest: INT_MAX seconds
])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds
    assert QueueConfig(delay_warning_time=text).delay_warning_time == seconds


@pytest.mark.parametrize("bad", ["", "5x", "m5", "5 m s", "-5s", -1, True, None, [5], float("nan"), float("inf"),
                                 2**31, 10**400, "3551w", "9" * 400, "1e3s"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_durations_in_a_file(tmp_path):
    c = load_config(write(tmp_path, "[queue]\nqueue_run_delay = '30s'\nminimal_backoff_time = '5m'\n"
                                    "maximal_backoff_time = '1h'\n[smtpd]\ntimeout = '5d'\n"))
    assert (c.queue.queue_run_delay, c.queue.minimal_backoff_time, c.queue.maximal_backoff_time) == (30, 300, 3600)
    assert c.smtpd.timeout == 432000


@pytest.mark.parametrize("value, default, expected", [
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("[::1]:25", None, ("::1", 25)),
    ("[10.0.0.1]", 25, ("10.0.0.1", 25)),
    ("mx.example:587", None, ("mx.example", 587)),
    ("mx.example", 25, ("mx.example", 25)),
])
def test_parse_hostport(value, default, expected):
    assert parse_hostport(value, default) == expected


# ---------------------------------------------------------------------------------------------- frozen


def test_models_are_frozen():
    c = Config()
    with pytest.raises(ValidationError):
        c.myhostname = "other"
    with pytest.raises(ValidationError):
        c.queue.active_limit = 5
    with pytest.raises(ValidationError):
        c.smtpd.listen = ("0.0.0.0:25",)
    assert isinstance(c.mydestination, tuple)  # no list to mutate in place either
    assert hash(c.smtpd) == hash(SmtpdConfig())


def test_models_reject_unknown_keys_in_code_too():
    with pytest.raises(ValidationError):
        Config(bogus=1)
    with pytest.raises(ValidationError):
        QueueConfig(minimal_backoff=1)


def test_a_mailbox_limit_below_the_message_limit_is_refused_as_postfix_refuses_it(tmp_path):
    err = config_error(write(tmp_path, "[local]\nmailbox_size_limit = 1000000\n"))
    assert err.key == "local.mailbox_size_limit" and "smaller than smtpd.message_size_limit (10240000)" in err.reason
    for unlimited in ("[local]\nmailbox_size_limit = 0\n", "[smtpd]\nmessage_size_limit = 0\n"):
        assert load_config(write(tmp_path, "[local]\nmailbox_size_limit = 1000000\n" + unlimited
                                 if "smtpd" in unlimited else unlimited))


def test_minimal_backoff_above_maximal_is_refused(tmp_path):
    err = config_error(write(tmp_path, "[queue]\nminimal_backoff_time = '2h'\nmaximal_backoff_time = '1h'\n"))
    assert err.key.startswith("queue.")
    assert "minimal_backoff_time" in err.reason


def test_maximal_backoff_below_the_default_minimal_is_refused(tmp_path):
    err = config_error(write(tmp_path, "[queue]\nmaximal_backoff_time = '1m'\n"))  # default minimal: 5m
    assert err.key == "queue.maximal_backoff_time"


def test_equal_backoff_times_are_accepted():
    q = QueueConfig(minimal_backoff_time="1h", maximal_backoff_time="1h")
    assert q.minimal_backoff_time == q.maximal_backoff_time == 3600


def test_minimal_backoff_above_the_default_maximal_is_refused(tmp_path):
    err = config_error(write(tmp_path, "[queue]\nminimal_backoff_time = '2h'\n"))
    assert err.key.startswith("queue.")


def test_networks_in_brackets_are_taken_as_postfix_writes_them(tmp_path):
    # Debian's main.cf: mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128
    path = write(tmp_path, "mynetworks = ['127.0.0.0/8', '[::ffff:127.0.0.0]/104', '[::1]/128', '[192.0.2.7]']\n")
    assert load_config(path).mynetworks == ("127.0.0.0/8", "::ffff:127.0.0.0/104", "::1/128", "192.0.2.7")


def test_domain_lists_are_idna_normalised(tmp_path):
    c = load_config(write(tmp_path, "mydestination = ['Bücher.example.', 'localhost']\n"
                                    "relay_domains = ['Sub.Bücher.Example.', 'RELAY.test']\n"))
    assert c.mydestination == ("xn--bcher-kva.example", "localhost")
    assert c.relay_domains == ("sub.xn--bcher-kva.example", "relay.test")


def test_a_dotted_relay_domain_is_refused_with_the_reason(tmp_path):
    err = config_error(write(tmp_path, "relay_domains = ['.example.com']\n"))
    assert err.key == "relay_domains"
    assert "already matches its subdomains" in err.reason


def test_a_domain_that_cannot_be_encoded_is_refused(tmp_path):
    err = config_error(write(tmp_path, "relay_domains = ['a..bücher']\n"))
    assert err.key == "relay_domains"
    assert "not a domain name" in err.reason


# ---------------------------------------------------------------------------------------------- relative paths


def test_relative_paths_are_taken_from_the_configuration_files_directory(tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # wherever the command runs (cron, PHP), the file's directory decides
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(etc, """
queue_directory = "spool"
alias_maps = ["texthash:aliases", "inline:{a=b}", "texthash:/abs/aliases"]
transport_maps = ["regexp:maps/transport.re"]
[smtpd]
tls_cert_file = "tls/cert.pem"
recipient_restrictions = ["check_recipient_access texthash:access", "reject_unauth_destination"]
restriction_classes = { strict = ["check_sender_access texthash:senders", "reject"] }
[[smtpd.listeners]]
address = "127.0.0.1:587"
role = "submission"
overrides = { tls_cert_file = "sub.pem", sasl_user_maps = ["texthash:users"] }
[local]
maildir_base = "/var/mail"
home_mailbox = "Maildir/"
[sendmail]
authorized_submit_users = ["texthash:submitters", "root", "!guest"]
""")
    c = load_config(path)
    assert c.queue_path == etc / "spool"
    assert c.alias_maps == (f"texthash:{etc}/aliases", "inline:{a=b}", "texthash:/abs/aliases")
    assert c.transport_maps == (f"regexp:{etc}/maps/transport.re",)
    assert c.smtpd.tls_cert_file == f"{etc}/tls/cert.pem"
    assert c.smtpd.recipient_restrictions == (f"check_recipient_access texthash:{etc}/access",
                                              "reject_unauth_destination")
    assert c.smtpd.restriction_classes == {"strict": (f"check_sender_access texthash:{etc}/senders", "reject")}
    assert c.smtpd.listeners[0].overrides == {"tls_cert_file": f"{etc}/sub.pem",
                                              "sasl_user_maps": (f"texthash:{etc}/users",)}
    assert c.local.maildir_base == "/var/mail"  # absolute: as written
    assert c.local.home_mailbox == "Maildir/"  # relative to each home, not to the file
    assert c.local.mail_spool_directory == f"{etc}/var/spool/mail"  # a default is a relative path too
    assert c.sendmail.authorized_submit_users == (f"texthash:{etc}/submitters", "root", "!guest")


def test_show_changed_does_not_list_defaults_made_absolute(tmp_path):
    from mailflow.config import settings_view

    c = load_config(write(tmp_path, 'relayhost = "[10.0.0.1]:25"\nqueue_directory = "q"\n'))
    assert settings_view(c, changed_only=True) == {"relayhost": "[10.0.0.1]:25", "queue_directory": f"{tmp_path}/q"}


def test_queue_minfree_is_a_byte_count(tmp_path):
    assert Config().queue.queue_minfree == 0
    assert load_config(write(tmp_path, "[queue]\nqueue_minfree = 50000000\n")).queue.queue_minfree == 50_000_000
    assert "queue.queue_minfree" in str(config_error(write(tmp_path, "[queue]\nqueue_minfree = -1\n")))



def test_probes_are_routed_by_the_address_verify_settings_that_are_set_the_main_ones_otherwise():
    main = {"relayhost": "[10.0.0.1]", "transport_maps": ["inline:{a.test=smtp:}"], "relay_transport": "relay"}
    probes = config_from_dict({**main, "address_verify": {
        "relayhost": "[10.0.0.2]:2525", "local_transport": "lmtp:[10.0.0.3]", "virtual_transport": "lmtp:[10.0.0.4]",
        "default_transport": "error:5.7.1 no"}}).for_probes()
    assert (probes.relayhost, probes.transport_maps, probes.local_transport, probes.virtual_transport,
            probes.relay_transport, probes.default_transport) == (
        "[10.0.0.2]:2525", ("inline:{a.test=smtp:}",), "lmtp:[10.0.0.3]", "lmtp:[10.0.0.4]", "relay",
        "error:5.7.1 no")
    probes = config_from_dict({**main, "address_verify": {"transport_maps": ["inline:{b.test=discard:}"]}}).for_probes()
    assert (probes.relayhost, probes.transport_maps) == ("[10.0.0.1]", ("inline:{b.test=discard:}",))
    config = config_from_dict(main)
    assert config.for_probes() is config


# ---------------------------------------------------------------------------------------------- smtpd keywords


def test_discard_ehlo_keywords_are_read_in_any_case_and_an_unknown_one_is_named(tmp_path):
    c = load_config(write(tmp_path, '[smtpd]\ndiscard_ehlo_keywords = ["PIPELINING, dsn", "Silent-Discard"]\n'))
    assert c.smtpd.discard_ehlo_keywords == ("dsn", "pipelining", "silent-discard")
    path = write(tmp_path, '[smtpd]\ndiscard_ehlo_keywords = ["pipelining", "pipelinning"]\n')
    err = config_error(path)
    assert (err.file, err.key) == (str(path), "smtpd.discard_ehlo_keywords")
    assert "'pipelinning' is not an EHLO keyword that can be discarded" in err.reason


def test_sasl_exceptions_networks_is_a_network_list(tmp_path):
    path = write(tmp_path, '[smtpd]\nsasl_exceptions_networks = ["10.0.0.1/8"]\n')
    err = config_error(path)
    assert (err.file, err.key) == (str(path), "smtpd.sasl_exceptions_networks")


@pytest.mark.parametrize("table", ["transport_concurrency_limit", "transport_destination_rate_delay",
                                   "transport_destination_recipient_limit"])
def test_a_queue_table_naming_no_transport_is_refused(tmp_path, table):
    """`{ dovecott = 1 }` (misspelt) was ignored without a word; a [pipe.NAME] is a transport."""
    value = '"1s"' if table.endswith("rate_delay") else "1"
    err = config_error(write(tmp_path, f"[queue]\n{table} = {{ dovecott = {value} }}\n"))
    assert f"queue.{table}: 'dovecott' is not a transport" in err.reason
    piped = f"[queue]\n{table} = {{ dovecot = {value} }}\n[pipe.dovecot]\nargv = ['/bin/true']\n"
    assert getattr(load_config(write(tmp_path, piped)).queue, table)["dovecot"]


@pytest.mark.parametrize("option, words", [
    ("bogus=1", "unknown policy service option 'bogus'"),
    ("timeout=0", "timeout=0: whole seconds (or m, h, d, w), at least 1s"),
    # what Postfix 3.7's attr_override refuses too: conv_time reads whole numbers only, a count is a C int
    ("timeout=1.5s", "timeout=1.5s: whole seconds"),
    ("{ max_idle = 5 s }", "max_idle=5 s: whole seconds"),
    ("max_ttl=3551w", "max_ttl=3551w: whole seconds"),
    ("request_limit=99999999999", "request_limit=99999999999: a number"),
    ("request_limit=-1", "request_limit=-1: a number, at least 0"),
    ("try_limit=0", "try_limit=0: a number, at least 1"),
    ("default_action=", "default_action= is empty"),
    ("timeout", "'timeout' is not name=value"),
])
def test_a_policy_service_option_postfix_would_refuse_names_file_key_and_reason(tmp_path, option, words):
    path = write(tmp_path, f'[smtpd]\nrecipient_restrictions = ["check_policy_service {{ inet:127.0.0.1:9998, '
                           f'{option} }}"]\n')
    err = config_error(path)
    assert err.key.startswith("smtpd.recipient_restrictions") and words in err.reason, (err.key, err.reason)


def test_a_policy_service_in_braces_with_known_options_is_taken():
    item = "check_policy_service { inet:127.0.0.1:9998, timeout=10s, max_idle=1m, max_ttl=1h, retry_delay=1s, " \
           "request_limit=0, try_limit=2, { default_action = 451 4.3.5 try later }, policy_context=submission }"
    assert config_from_dict({"smtpd": {"recipient_restrictions": [item]}}).smtpd.recipient_restrictions == (item,)


def test_policy_service_options_are_read_as_postfix_reads_them():
    # attr_override: strtol into an int (`+5` is 5), conv_time (no unit: seconds; only the character after the
    # number is read, so `10sx` is 10s)
    item = "{ inet:127.0.0.1:9998, request_limit=+5, timeout=10sx, max_idle=2, max_ttl=1w }"
    assert parse_policy_service(item).overrides == {"request_limit": 5, "timeout": 10, "max_idle": 2,
                                                    "max_ttl": 604800}
