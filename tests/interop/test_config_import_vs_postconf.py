"""`mailflow config import` compared by meaning: Postfix 3.7's own `postconf -c DIR -n -x` reads the input main.cf
(each setting as Postfix's programs see it, $name expanded), `mailflow config show` reads the output, and each
Postfix setting the name table maps has the same value in both (lists, yes/no, numbers, durations in seconds with
the unit Postfix's default for the parameter carries)."""
from __future__ import annotations

import re
import textwrap
import subprocess
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from mailflow.cli import app as cli
from mailflow.config import postfix_names as names
from mailflow.config.show import format_setting
from tests.support.client_certs import ClientPki
from tests.support.tools import require_tool
from tests.support.postfix import write_cooled
from tests.unit.test_postfix_import import POSTSCREEN_MAIN, POSTSCREEN_MASTER, RELAY_SATELLITE, ispmail, write

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def postconf(*args: str) -> dict[str, str]:
    out = subprocess.run([require_tool("postconf"), *args], capture_output=True, text=True, check=True).stdout
    return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "") for line in out.splitlines())


def mailflow_settings(config: Path) -> dict[str, str]:
    """`config show`'s settings; [smtpd.postscreen]'s (one inline table there) each as `smtpd.postscreen.name`."""
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(config)])
    assert result.exit_code == 0, result.output
    settings = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    screen = tomllib.loads("screen = " + settings["smtpd.postscreen"])["screen"]
    settings.update({f"smtpd.postscreen.{name}": format_setting(name, value).split(" = ", 1)[1]
                     for name, value in screen.items()})
    return settings


def postfix_meaning(value: str, default: str, mine: str) -> object:
    """A postconf value in the form `config show` prints: yes/no where mailflow's is a boolean, a time value in
    seconds (a bare number in the unit of Postfix's default for the parameter)."""
    if mine in ("true", "false"):
        return {"yes": "true", "no": "false"}.get(value.lower(), value)
    unit = re.fullmatch(r"(?:\d+|\$\{.*\})([smhdw])", default)  # 10s, ${stress?{2}:{6}}s
    if unit and re.fullmatch(r"\d+[smhdw]?", value):
        number, suffix = re.fullmatch(r"(\d+)([smhdw]?)", value).groups()  # type: ignore[union-attr]
        return str(int(number) * UNITS[suffix or unit.group(1)])
    return value


def entry(text: str) -> str:
    """A list entry's meaning: a hash:-like table is its texthash: source, `[::1]/128` is `::1/128`."""
    text = re.sub(r"^(?:hash|lmdb|btree|cdb):", "texthash:", text.removeprefix("proxy:"))
    return re.sub(r"^\[([0-9A-Fa-f:.]+)\](/\d+)?$", r"\1\2", text)


def mailflow_meaning(value: str) -> object:
    if value.startswith("["):
        return [entry(v) for v in re.findall(r'"((?:[^"\\]|\\.)*)"', value)]
    return value.strip('"')


def as_postfix_list(value: str) -> list[str]:
    return [entry(v) for v in re.split(r"[\s,]+", value) if v]


def from_queue_directory(value: object) -> object:
    """Postfix takes a relative `unix:` path (a transport's, a policy service's) from queue_directory."""
    if isinstance(value, list):
        return [from_queue_directory(v) for v in value]
    return re.sub(r"(^|[\s:])unix:(?=[^/])", r"\1unix:/var/spool/postfix/", value) if isinstance(value, str) else value


def compare(folder: Path, main_cf: str, master_cf: str | None) -> list[str]:
    """The mapped settings of main.cf whose meaning differs between postconf and mailflow (empty: none)."""
    etc = folder / "etc"
    etc.mkdir()
    write_cooled(etc / "main.cf", Path(main_cf).read_text())
    if master_cf:
        (etc / "master.cf").write_text(Path(master_cf).read_text())
    out = folder / "mailflow.toml"
    args = ["config", "import", main_cf, "-o", str(out), "--hostname", "mx.example.test"]
    result = CliRunner().invoke(cli, args + (["--master", master_cf] if master_cf else []))
    assert result.exit_code == 0, result.stderr
    explicit, defaults, ours = postconf("-c", str(etc), "-n", "-x"), postconf("-d"), mailflow_settings(out)
    differ = []
    compared = 0
    for name, value in explicit.items():
        for key in names.SETTINGS.get(name, ()):
            if name in names.CONVERTED or key == "smtpd.listen":
                continue
            mine = mailflow_meaning(ours[key])
            theirs: object = (as_postfix_list(value) if isinstance(mine, list)
                              else postfix_meaning(value, defaults.get(name, ""), ours[key]))
            if name.endswith("_restrictions") and isinstance(mine, list):
                mine = " ".join(mine).split()
            theirs = from_queue_directory(theirs)
            compared += 1
            if mine != theirs:
                differ.append(f"{name} = {value!r} (postconf) vs {key} = {ours[key]} (mailflow)")
    assert compared >= 8
    return differ


def test_an_ispmail_server_means_the_same_to_postconf_and_to_mailflow(tmp_path):
    main, master = ispmail(tmp_path)
    assert compare(tmp_path, main, master) == []


def test_a_relay_satellite_means_the_same_to_postconf_and_to_mailflow(tmp_path):
    pki = ClientPki(tmp_path)
    passwords = write(tmp_path, "sasl_passwd", "[smtp.provider.example]:587 me:secret\n")
    main = write(tmp_path, "main.cf", textwrap.dedent(RELAY_SATELLITE).format(passwords=passwords, ca=pki.ca_file)
                 + "maximal_queue_lifetime = 2\ndelay_warning_time = 4\nminimal_backoff_time = 10m\n"
                 + "message_drop_headers = bcc resent-bcc\n")
    assert compare(tmp_path, main, None) == []


def test_a_postscreen_front_means_the_same_to_postconf_and_to_mailflow(tmp_path):
    untranslated = ("postscreen_cache_map",)
    main_cf = "".join(line for line in textwrap.dedent(POSTSCREEN_MAIN).splitlines(keepends=True)
                      if not line.startswith(untranslated))
    main = write(tmp_path, "main.cf", main_cf)
    master = write(tmp_path, "master.cf", POSTSCREEN_MASTER)
    assert compare(tmp_path, main, master) == []
