"""`mailflow config import` on the configurations people run: tests/interop/postfix_corpus holds Debian 12's stock
files, docker-mailserver's, mailcow-dockerized's, iRedMail's samples and the main.cf Mail-in-a-Box's setup scripts
make (each file says where it came from). For each: no traceback; every line left out is named by its file:line,
parameter and reason; the output loads; and each setting it writes means what Postfix 3.7 means, main.cf's as
`postconf -n -x` shows them, each master.cf service's -o (a listener's overrides, the role's presets included) as
`postconf -P -x` shows them, $service_name and the service's own -o values expanded."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from mailflow.config import load_config
from mailflow.config import postfix_names as names
from mailflow.config.postfix_import import import_postfix
from tests.interop.test_config_import_vs_postconf import (UNITS, as_postfix_list, entry, from_queue_directory,
                                                          mailflow_meaning, mailflow_settings, postconf,
                                                          postfix_meaning)
from tests.support.client_certs import ClientPki
from tests.support.postfix import write_cooled

CORPUS = Path(__file__).parent / "postfix_corpus"
# taken as docs/config.md says, their own tests comparing them (normalize: false, noted)
MAPPED_OWN_WAY = ("smtpd_forbid_bare_newline",)
SETS = ("smtpd_discard_ehlo_keywords", "postscreen_discard_ehlo_keywords")  # their order means nothing
PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465}
# files the configurations name that matter to what is compared (the others are missing here, and reported)
FILES = {"docker-mailserver": {"/etc/ssl/private/ssl-cert-snakeoil.key": "key",
                               "/etc/ssl/certs/ssl-cert-snakeoil.pem": "certificates",
                               "/etc/postfix/vhost": "# written by the container's start\nexample.org\nexample.net\n"}}


def corpus(folder: Path, name: str) -> tuple[Path, Path]:
    """The corpus's main.cf and master.cf copied to `folder`, the files of FILES made there and named instead."""
    texts = {f: (CORPUS / name / f).read_text() for f in ("main.cf", "master.cf")}
    pki = None
    for path, content in FILES.get(name, {}).items():
        local = folder / Path(path).name
        if content in ("key", "certificates"):
            pki = pki or ClientPki(folder)
            pem = Path(pki.server_cert).read_text()
            cut = pem.index("-----BEGIN CERTIFICATE-----")
            content = pem[:cut] if content == "key" else pem[cut:]
        local.write_text(content)
        texts = {f: text.replace(path, str(local)) for f, text in texts.items()}
    if not re.search(r"^myhostname\s*=", texts["main.cf"], re.MULTILINE):  # (set at run time: mailcow's)
        texts["main.cf"] += "myhostname = mx.example.test\n"  # as --hostname says, for postconf too
    etc = folder / "etc"
    etc.mkdir()
    return write_cooled(etc / "main.cf", texts["main.cf"]), write_cooled(etc / "master.cf", texts["master.cf"])


def run_import(main_cf: Path, master_cf: Path, out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["config", "import", str(main_cf), "--master", str(master_cf), "-o", str(out),
                                      "--hostname", "mx.example.test"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def same(mine: object, theirs: str, name: str, default: str) -> bool:
    """A mailflow value (as the output holds it) and Postfix's expanded one mean the same."""
    if isinstance(mine, bool):
        return mine == (theirs.lower() in ("yes", "true"))
    if isinstance(mine, int):
        return theirs.strip().lstrip("-").isdigit() and mine == int(theirs)
    if isinstance(mine, dict):
        return mine == {} and not theirs.strip()
    if isinstance(mine, list):
        items = [entry(str(v)) for v in mine]
        wanted = from_queue_directory(as_postfix_list(theirs))
        if name in SETS:
            return sorted(items) == sorted(wanted)
        return (" ".join(items).split() == " ".join(wanted).split()) if name.endswith("_restrictions") \
            else items == wanted
    theirs = str(from_queue_directory(theirs))
    if re.fullmatch(r"\d+[smhdw]", str(mine)) and re.fullmatch(r"\d+[smhdw]?", theirs):
        seconds = postfix_meaning(theirs, default, "")
        return str(int(str(mine)[:-1]) * UNITS[str(mine)[-1]]) == seconds
    return mine == theirs


def main_cf_differences(etc: Path, out: Path, imported) -> tuple[int, list[str]]:
    """main.cf's settings the import wrote whose meaning differs from postconf -n -x's (and how many compared)."""
    explicit, defaults, ours = postconf("-c", str(etc), "-n", "-x"), postconf("-d"), mailflow_settings(out)
    left_out = {item.name for item in imported.left_out}
    differ, compared = [], 0
    for name, value in explicit.items():
        for key in names.SETTINGS.get(name, ()):
            if name in names.CONVERTED or name in left_out or name in MAPPED_OWN_WAY or key == "smtpd.listen" or \
                    key not in imported.settings:
                continue
            mine = mailflow_meaning(ours[key])
            theirs: object = (as_postfix_list(value) if isinstance(mine, list)
                              else postfix_meaning(value, defaults.get(name, ""), ours[key]))
            if isinstance(mine, str) and mine.isdigit() and re.fullmatch(r"\d+[smhdw]", value):
                theirs = str(int(value[:-1]) * UNITS[value[-1]])  # (a name postconf -d no longer knows)
            if name.endswith("_restrictions") and isinstance(mine, list):
                mine, theirs = " ".join(mine).split(), " ".join(theirs).split()  # type: ignore[arg-type]
            if name in SETS:
                mine, theirs = sorted(mine), sorted(theirs)  # type: ignore[type-var, arg-type]
            compared += 1
            if mine != from_queue_directory(theirs):
                differ.append(f"{name} = {value!r} (postconf) vs {key} = {ours[key]} (mailflow)")
    return compared, differ


def service_differences(etc: Path, out: Path) -> tuple[int, list[str]]:
    """Each smtpd service's -o, as postconf -P -x expands it, against the overrides of its listeners."""
    listing = subprocess.run(["postconf", "-c", str(etc), "-P", "-x"], capture_output=True, text=True).stdout
    defaults = postconf("-d")
    listeners = tomllib.loads(out.read_text()).get("smtpd", {}).get("listeners", [])
    screened = re.search(r"^(\S+)\s+inet\s.*\spostscreen\s*$", (etc / "master.cf").read_text(), re.MULTILINE)
    differ, compared = [], 0
    for line in listing.splitlines():
        where, _, value = line.partition(" = ")
        service, kind, name = where.split("/")
        if kind == "pass" and screened:
            service, kind = screened.group(1), "inet"
        keys = () if name in MAPPED_OWN_WAY else names.SETTINGS.get(name, ())
        if kind != "inet" or not keys or not all(k.startswith("smtpd.") for k in keys):
            continue
        host, _, port = service.rpartition(":")
        port_number = PORTS.get(port) or (int(port) if port.isdigit() else None)
        for listener in listeners:
            address_host, _, address_port = listener["address"].rpartition(":")
            if int(address_port) != port_number or (host and address_host.strip("[]") != host):
                continue
            for key in keys:
                leaf = key.removeprefix("smtpd.")
                if leaf not in listener["overrides"]:
                    continue  # (left out, and reported, or noted)
                compared += 1
                if not same(listener["overrides"][leaf], value, name, defaults.get(name, "")):
                    differ.append(f"{where} = {value!r} (postconf -P) vs {listener['address']} "
                                  f"{leaf} = {listener['overrides'][leaf]!r} (mailflow)")
    return compared, differ


LEFT_OUT_LINE = re.compile(r"  (?:(?:main|master)\.cf:\d+|\(no [a-z_, ]+ in main\.cf\)[^:]*): .+: \S.*")


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_a_corpus_configuration_imports_with_every_left_out_line_named_and_its_meaning_postfix_s(tmp_path, name):
    main_cf, master_cf = corpus(tmp_path, name)
    out = tmp_path / "mailflow.toml"
    code, err = run_import(main_cf, master_cf, out)
    assert code in (0, 1), err
    lines = err.splitlines()[1:]
    assert [line for line in lines if not LEFT_OUT_LINE.fullmatch(line)] == []
    imported = import_postfix(str(main_cf), str(master_cf), "mx.example.test")
    assert len(lines) == len(imported.left_out) and (code == 1) == bool(lines)
    compared, differ = main_cf_differences(main_cf.parent, out, imported)
    assert differ == [] and compared >= 3
    compared, differ = service_differences(main_cf.parent, out)
    assert differ == []
    EXPECTED[name](tmp_path, tomllib.loads(out.read_text()), out.read_text(), lines, compared)


def debian(folder: Path, doc: dict, text: str, lines: list[str], compared: int) -> None:
    assert lines == []  # (uucp's `argv=uux …` is found on Postfix's PATH, noted)
    assert doc["pipe"]["uucp"]["argv"][0] in ("/usr/bin/uux", "/bin/uux")
    assert "pipe uucp: argv=uux is /" in text
    assert doc["smtpd"]["banner"] == "ESMTP Postfix (Debian/GNU)"


def docker_mailserver(folder: Path, doc: dict, text: str, lines: list[str], compared: int) -> None:
    assert doc["virtual_mailbox_domains"] == [str(folder / "vhost")]  # /etc/postfix/vhost, read by mailflow
    assert load_config(folder / "mailflow.toml").virtual_mailbox_domains == ("example.org", "example.net")
    assert (doc["smtpd"]["tls_cert_file"], doc["smtpd"]["tls_key_file"]) == (
        str(folder / "ssl-cert-snakeoil.pem"), str(folder / "ssl-cert-snakeoil.key"))  # smtpd_tls_chain_files
    assert sorted(x["role"] for x in doc["smtpd"]["listeners"]) == ["submission"] * 2 + ["submissions"] * 2
    assert compared >= 10


def mailcow(folder: Path, doc: dict, text: str, lines: list[str], compared: int) -> None:
    assert doc["smtpd"]["hard_error_limit"] == 5  # ${stress?1}${stress:5}, not under stress
    assert "is '5', Postfix's value when not under stress (under stress, every process of a service busy: '1'" \
        in text
    assert "main.cf:49: proxy_read_maps = " in text and "proxy_read_maps: " not in "".join(lines)
    assert any(line.startswith("  master.cf:87: master.cf lmtp: flags=O: Postfix 3.5's lmtp(8) flags")
               for line in lines)
    assert "master.cf:45: 590 -o non_smtpd_milters= applies to nothing" in text
    # 10465: implicit TLS behind HAProxy (the PROXY header in clear, then the handshake), as Postfix serves it
    proxied = [x for x in doc["smtpd"]["listeners"] if x["address"].endswith(":10465")]
    assert [(x["role"], x["overrides"]["upstream_proxy_protocol"]) for x in proxied] == [("submissions", "haproxy")] * 2
    assert "10465 -o smtpd_upstream_proxy_protocol" not in text
    assert compared >= 20


def iredmail(folder: Path, doc: dict, text: str, lines: list[str], compared: int) -> None:
    reinjection = [x for x in doc["smtpd"]["listeners"] if x["address"] == "127.0.0.1:10025"]
    assert [x["overrides"]["restriction_classes"] for x in reinjection] == [{}]  # -o smtpd_restriction_classes=
    assert "10025 -o smtp_tls_security_level=none applies to nothing" in text
    assert compared >= 20


def mailinabox(folder: Path, doc: dict, text: str, lines: list[str], compared: int) -> None:
    assert "reject_rbl_client zen.spamhaus.org=127.0.0.[2..11]" in doc["smtpd"]["recipient_restrictions"]
    assert "reject_rhsbl_sender dbl.spamhaus.org=127.0.1.[2..99]" in doc["smtpd"]["sender_restrictions"]
    assert compared >= 4


EXPECTED = {"debian": debian, "docker-mailserver": docker_mailserver, "mailcow": mailcow, "iredmail": iredmail,
            "mailinabox": mailinabox}
