"""`mailflow config show` read the way scripts read `postconf`: `postconf -h NAME...` prints each value alone on a
line, no `name = ` (what `$(postconf -h queue_directory)` captures); `mailflow config show -h NAME...` must print
the same for the same settings (a string as it is; other values in TOML syntax, where Postfix has none)."""
from __future__ import annotations

import subprocess

from typer.testing import CliRunner

from mailflow.cli import app as cli
from tests.support.postfix import write_cooled
from tests.support.tools import require_tool

SETTINGS = {"myhostname": "mx.example.test", "relayhost": "[192.0.2.1]:2525", "myorigin": "example.test"}


def test_values_only_are_what_postconf_h_prints(tmp_path):
    postconf = require_tool("postconf")
    etc = tmp_path / "etc"
    etc.mkdir()
    spool = tmp_path / "spool"
    settings = {**SETTINGS, "queue_directory": str(spool)}
    write_cooled(etc / "main.cf", "".join(f"{k} = {v}\n" for k, v in settings.items()))
    config = tmp_path / "mailflow.toml"
    config.write_text("".join(f'{k} = "{v}"\n' for k, v in settings.items()))
    names = ["relayhost", "queue_directory", "myhostname", "myorigin"]

    expected = subprocess.run([postconf, "-c", str(etc), "-h", *names], capture_output=True, text=True, timeout=20)
    result = CliRunner().invoke(cli, ["config", "show", "-h", *names, "-c", str(config)])
    assert (result.exit_code, result.stdout) == (expected.returncode, expected.stdout)
    assert expected.stdout.splitlines() == ["[192.0.2.1]:2525", str(spool), "mx.example.test", "example.test"]

    result = CliRunner().invoke(cli, ["config", "show", "-h", "mydestination", "-c", str(config)])
    assert result.stdout == '["localhost"]\n'  # a list is TOML's (Postfix's is a string: "$myhostname, ...")
