"""`mailflow config show` read the way scripts read `postconf`: `postconf -h NAME...` prints each value alone on a
line, no `name = ` (what `$(postconf -h queue_directory)` captures); `mailflow config show -h NAME...` must print
the same for the same settings (a string as it is; other values in TOML syntax, where Postfix has none)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from tests.support.postfix import write_cooled
from tests.support.tools import require_tool

SETTINGS = {"myhostname": "mx.example.test", "relayhost": "[192.0.2.1]:2525", "myorigin": "example.test"}


@pytest.fixture
def twins(tmp_path) -> tuple[Path, Path]:
    """The same SETTINGS (and a queue_directory) in a Postfix main.cf and a mailflow file: (main.cf's folder, the
    mailflow file)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    settings = {**SETTINGS, "queue_directory": str(tmp_path / "spool")}
    write_cooled(etc / "main.cf", "".join(f"{k} = {v}\n" for k, v in settings.items()))
    config = tmp_path / "mailflow.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in settings.items()))
    return etc, config


def postconf(etc: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("postconf"), "-c", str(etc), *argv], capture_output=True, text=True,
                          timeout=20)


def test_values_only_are_what_postconf_h_prints(twins, tmp_path):
    etc, config = twins
    spool = tmp_path / "spool"
    names = ["relayhost", "queue_directory", "myhostname", "myorigin"]

    expected = postconf(etc, "-h", *names)
    result = CliRunner().invoke(cli, ["config", "show", "-h", *names, "-c", str(config)])
    assert (result.exit_code, result.stdout) == (expected.returncode, expected.stdout)
    assert expected.stdout.splitlines() == ["[192.0.2.1]:2525", str(spool), "mx.example.test", "example.test"]

    result = CliRunner().invoke(cli, ["config", "show", "-h", "mydestination", "-c", str(config)])
    assert result.stdout == '["localhost"]\n'  # a list is TOML's (Postfix's is a string: "$myhostname, ...")


@pytest.mark.parametrize("options", [[], ["-h"], ["-n"], ["-d"]], ids=["plain", "h", "n", "d"])
def test_a_name_that_is_no_setting_is_a_warning_as_postconf_says(twins, options):
    """`postconf [-h|-n|-d] relayhost no_such_name myhostname` warns about the name it does not know on stderr
    ("postconf: warning: no_such_name: unknown parameter"), prints the others as asked and exits 0: a script's
    `$(postconf -h a b)` still gets the values it named. `mailflow config show` does the same (it exited 2 and
    printed nothing)."""
    etc, config = twins
    names = ["relayhost", "no_such_name", "myhostname"]
    expected = postconf(etc, *options, *names)
    warned = [line.split(": ", 1)[1] for line in expected.stderr.splitlines() if "no_such_name" in line]
    assert warned == ["warning: no_such_name: unknown parameter"]  # (after the program's path)
    result = CliRunner().invoke(cli, ["config", "show", *options, *names, "-c", str(config)])
    assert result.exit_code == expected.returncode == 0
    assert result.stderr == "mailflow config show: warning: no_such_name: unknown setting\n"
    if options != ["-d"]:  # (the built-in defaults differ: Postfix's myhostname is this machine's name)
        assert result.stdout.replace('"', "") == expected.stdout, options


@pytest.mark.parametrize("options", [[], ["-h"], ["-n"]], ids=["plain", "h", "n"])
def test_each_name_asked_for_is_shown_in_order_repeats_too_as_postconf_does(twins, options):
    """`postconf -h myhostname relayhost myhostname` prints three lines, in the order asked: a script reading
    one line per name it gave finds each where it expects it. `config show` showed a repeated name once."""
    etc, config = twins
    names = ["myhostname", "relayhost", "myhostname"]
    expected = postconf(etc, *options, *names)
    assert len(expected.stdout.splitlines()) == 3 and expected.returncode == 0
    result = CliRunner().invoke(cli, ["config", "show", *options, *names, "-c", str(config)])
    assert (result.exit_code, result.stdout.replace('"', "")) == (0, expected.stdout)
