"""`mailflow config import`'s $name expansion and Postfix defaults compared with Postfix 3.7's own `postconf -c DIR
-x -h` on the same main.cf: the `${name?{text}:{text}}` forms, a `?` without braces, a parameter Postfix reads raw,
a $name loop (postconf: fatal, the importer: left out), and the default alias_maps/local_recipient_maps."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mailflow.config.postfix_cf import Expander, Unsupported
from mailflow.config.postfix_import import import_postfix
from tests.support.tools import require_tool
from tests.support.postfix import write_cooled


def postconf(folder: Path, main_cf: str, *args: str) -> subprocess.CompletedProcess:
    write_cooled(folder / "main.cf", main_cf)
    (folder / "master.cf").write_text("")
    return subprocess.run([require_tool("postconf"), "-c", str(folder), *args], capture_output=True, text=True)


@pytest.mark.parametrize("value", ["${empty?{one}:{two}} ${a?{three}:{four}}", "${a?x:y}", "${ a ? {sp} }",
                                   "${a?{${a?{in}}}:{no}}", "$(a)${a}$a", "${empty:{p}}"])
def test_expansion_matches_postconf(tmp_path, value):
    main_cf = f"a = x\nempty =\nrelay_domains = {value}\n"
    postfix = postconf(tmp_path, main_cf, "-x", "-h", "relay_domains")
    assert postfix.returncode == 0, postfix.stderr
    assert Expander({"a": "x", "empty": ""}, "mx.example.test").expand(value) == postfix.stdout.strip()


def test_a_loop_postconf_refuses_is_left_out(tmp_path):
    main_cf = "myhostname = mx.example.com\na = $b\nb = $a\nrelay_domains = $a\n"
    assert postconf(tmp_path, main_cf, "-x", "-h", "relay_domains").returncode != 0  # fatal: macro processing error
    with pytest.raises(Unsupported):
        Expander({"a": "$b", "b": "$a"}, "mx.example.test").expand("$a")
    result = import_postfix(str(tmp_path / "main.cf"))
    assert "relay_domains" not in result.settings and "relay_domains" in [x.name for x in result.left_out]


def test_raw_parameters_and_table_defaults_are_postfix_s(tmp_path):
    main_cf = 'myhostname = mx.example.com\nmailbox_command = /usr/bin/procmail -a "$$EXTENSION" $home\n'
    postfix = postconf(tmp_path, main_cf, "-x", "-h", "mailbox_command", "alias_maps", "local_recipient_maps")
    command, aliases, recipients = postfix.stdout.splitlines()
    result = import_postfix(str(tmp_path / "main.cf"))
    assert result.settings["local.mailbox_command"] == command  # not expanded, $$ kept
    assert (aliases, recipients) == ("hash:/etc/aliases, nis:mail.aliases",
                                     "proxy:unix:passwd.byname hash:/etc/aliases, nis:mail.aliases")
    expected = ["texthash:/etc/aliases"] if Path("/etc/aliases").is_file() else []
    assert result.settings["alias_maps"] == expected  # nis: is a note
    assert result.settings["local_recipient_maps"] == ["unix:passwd.byname", *expected]


def test_a_service_s_sasl_options_are_judged_on_the_value_postconf_P_x_gives_it(tmp_path):
    """A service's -o naming a main.cf helper that names $service_name and another of the service's -o: the
    importer judges smtpd_sasl_tls_security_options on the value Postfix's `postconf -P -x` shows for the service."""
    main_cf = ("myhostname = mx.example.com\ntls_sasl = ${service_name?{$smtpd_sasl_security_options}:{none}}\n")
    master_cf = ("submission inet n - y - - smtpd\n  -o smtpd_sasl_security_options=noanonymous,noplaintext\n"
                 "  -o smtpd_sasl_tls_security_options=$tls_sasl,forward_secrecy\n")
    write_cooled(tmp_path / "main.cf", main_cf)
    (tmp_path / "master.cf").write_text(master_cf)
    postfix = subprocess.run([require_tool("postconf"), "-c", str(tmp_path), "-P", "-x",
                              "submission/inet/smtpd_sasl_tls_security_options"], capture_output=True, text=True)
    value = postfix.stdout.strip().split(" = ", 1)[1]
    assert value == "noanonymous,noplaintext,forward_secrecy"
    result = import_postfix(str(tmp_path / "main.cf"), str(tmp_path / "master.cf"))
    assert any(f"(TLS sessions: smtpd_sasl_tls_security_options = {value}, judged on its own)" in note
               for note in result.notes)
    assert [item.why for item in result.left_out] == [
        "with noplaintext, Postfix offers neither PLAIN nor LOGIN in TLS sessions; mailflow offers both (over TLS)"]
