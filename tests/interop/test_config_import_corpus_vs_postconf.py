"""`mailflow config import` on the configurations people run: tests/interop/postfix_corpus holds Debian 12's stock
files, docker-mailserver's, mailcow-dockerized's, iRedMail's samples and the main.cf Mail-in-a-Box's setup scripts
make (each file says where it came from). For each: no traceback; every line left out is named by its file:line,
parameter and reason; the output loads (with the configuration loader, its files read: a domain list's /file/name
too); and each setting it writes means what Postfix 3.7 means, main.cf's as `postconf -n -x` shows them (the
converted ones too: smtpd_banner, smtpd_tls_chain_files, inet_interfaces), each master.cf service's -o (a listener's
overrides, the role's presets included; a client service's settings) as `postconf -P -x` shows them, $service_name
and the service's own -o values expanded; and every -o `postconf -P` lists is accounted for: carried, noted, or
named as left out."""
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
from mailflow.config.postfix_master import PORTS
from tests.interop.test_config_import_vs_postconf import (UNITS, as_postfix_list, entry, from_queue_directory,
                                                          mailflow_meaning, mailflow_settings, postconf,
                                                          postfix_meaning)
from tests.support.client_certs import ClientPki
from tests.support.postfix import write_cooled

CORPUS = Path(__file__).parent / "postfix_corpus"
# taken as docs/config.md says, their own tests comparing them (normalize: false, noted)
MAPPED_OWN_WAY = ("smtpd_forbid_bare_newline",)
SETS = ("smtpd_discard_ehlo_keywords", "postscreen_discard_ehlo_keywords")  # their order means nothing
# files the configurations name that matter to what is compared (the others are missing here, and reported)
FILES = {"docker-mailserver": {"/etc/ssl/private/ssl-cert-snakeoil.key": "key",
                               "/etc/ssl/certs/ssl-cert-snakeoil.pem": "certificates",
                               "/etc/postfix/vhost": "# written by the container's start\n  example.org\n"
                                                     "example.net #example.com, as a comment\n"}}


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


def converted_differences(etc: Path, doc: dict) -> tuple[int, list[str]]:
    """main.cf's settings the import converts (names.CONVERTED, which main_cf_differences skips), those the corpus
    sets: smtpd_banner (myhostname and smtpd.banner), smtpd_tls_chain_files (the certificate pair),
    inet_interfaces with inet_protocols (smtpd.listen's addresses), against postconf -x."""
    explicit, expanded = postconf("-c", str(etc), "-n"), postconf("-c", str(etc), "-x")
    smtpd = doc.get("smtpd", {})
    differ, compared = [], 0
    if "smtpd_banner" in explicit:
        compared += 1
        mine = f"{expanded['myhostname']} {smtpd.get('banner', '')}".strip()
        if mine.split() != expanded["smtpd_banner"].split():
            differ.append(f"smtpd_banner = {expanded['smtpd_banner']!r} (postconf) vs {mine!r} (mailflow)")
    if explicit.get("smtpd_tls_chain_files"):
        compared += 1
        files = set(expanded["smtpd_tls_chain_files"].replace(",", " ").split())
        pair = {smtpd.get("tls_cert_file"), smtpd.get("tls_key_file")}
        if pair != files:
            differ.append(f"smtpd_tls_chain_files = {files} (postconf) vs {pair} (mailflow)")
    if "inet_interfaces" in explicit and smtpd.get("listen"):
        compared += 1
        wildcards = {"ipv4": {"0.0.0.0"}, "ipv6": {"[::]"}, "all": {"0.0.0.0", "[::]"}}
        wanted = (wildcards[expanded["inet_protocols"]] if expanded["inet_interfaces"] == "all"
                  else set(expanded["inet_interfaces"].replace(",", " ").split()))
        mine = {address.rpartition(":")[0] for address in smtpd["listen"]}
        if mine != wanted:
            differ.append(f"inet_interfaces = {expanded['inet_interfaces']!r} (postconf) vs smtpd.listen {mine}")
    return compared, differ


def postconf_p(etc: Path, *flags: str) -> list[tuple[str, str, str, str]]:
    """(service, type, name, value) of each -o of master.cf, as `postconf -P` lists them (with `-x` expanded)."""
    listing = subprocess.run(["postconf", "-c", str(etc), "-P", *flags], capture_output=True, text=True).stdout
    return [(m[1], m[2], m[3], m[4] or "") for m in P_LINE.finditer(listing)]


P_LINE = re.compile(r"^(\S+)/(\S+)/(\S+) =(?: (.*))?$", re.MULTILINE)  # service/type/name = value ("": `name =`)


def listeners_of(etc: Path, doc: dict, service: str, kind: str) -> list[dict]:
    """The listeners an smtpd inet service became (`smtpd pass`: the postscreen service's)."""
    screened = re.search(r"^(\S+)\s+inet\s.*\spostscreen\s*$", (etc / "master.cf").read_text(), re.MULTILINE)
    if kind == "pass" and screened:
        service, kind = screened.group(1), "inet"
    if kind != "inet":
        return []
    host, _, port = service.rpartition(":")
    port_number = PORTS.get(port) or (int(port) if port.isdigit() else None)
    return [listener for listener in doc.get("smtpd", {}).get("listeners", [])
            if int(listener["address"].rpartition(":")[2]) == port_number
            and (not host or listener["address"].rpartition(":")[0].strip("[]") == host)]


def client_service(doc: dict, service: str) -> tuple[str, dict] | None:
    """("smtp" or "lmtp", its table) of the [smtp.services.NAME] or [lmtp.services.NAME] a master.cf service became."""
    for section in ("smtp", "lmtp"):
        table = doc.get(section, {}).get("services", {}).get(service)
        if table is not None:
            return section, table
    return None


def service_differences(etc: Path, doc: dict) -> tuple[int, list[str]]:
    """Each -o of an smtpd service, or of an smtp/lmtp client service, as postconf -P -x expands it, against the
    overrides of its listeners or the settings of its [smtp.services.NAME]."""
    defaults = postconf("-d")
    differ, compared = [], 0
    for service, kind, name, value in postconf_p(etc, "-x"):
        keys = () if name in MAPPED_OWN_WAY else names.SETTINGS.get(name, ())
        if not keys:
            continue
        targets: list[tuple[str, dict, str]] = []  # (what, its table, the prefix of its keys)
        if all(k.startswith("smtpd.") for k in keys):
            targets = [(listener["address"], listener["overrides"], "smtpd.")
                       for listener in listeners_of(etc, doc, service, kind)]
        elif (client := client_service(doc, service)) is not None and all(k.startswith(client[0] + ".") for k in keys):
            targets = [(f"[{client[0]}.services.{service}]", client[1], client[0] + ".")]
        for what, table, prefix in targets:
            for key in keys:
                leaf = key.removeprefix(prefix)
                if leaf not in table:
                    continue  # (every -o is accounted for: unaccounted_options)
                compared += 1
                if not same(table[leaf], value, name, defaults.get(name, "")):
                    differ.append(f"{service}/{kind}/{name} = {value!r} (postconf -P) vs {what} {leaf} = "
                                  f"{table[leaf]!r} (mailflow)")
    return compared, differ


# -o's that leave no override of their name: what the listener became instead (its role, its TLS)
CONSUMED = {"smtpd_tls_wrappermode": lambda listener: listener["role"] == "submissions"}


def unaccounted_options(etc: Path, doc: dict, text: str) -> list[str]:
    """Each -o of `postconf -P` that the output neither carries (a listener's override, a client service's setting,
    what the listener became: CONSUMED), notes, nor names as left out (the -o or its whole service)."""
    missing = []
    for service, kind, name, value in postconf_p(etc):
        if f"{service} -o {name}" in text or f"master.cf {service} = " in text:
            continue
        keys = names.SETTINGS.get(name, ())
        listeners = listeners_of(etc, doc, service, kind)
        client = client_service(doc, service)
        leaves = {key.partition(".")[2] for key in keys}
        if listeners and (all(leaves & set(listener["overrides"]) for listener in listeners) and leaves
                          or name in CONSUMED and all(CONSUMED[name](listener) for listener in listeners)):
            continue
        if client is not None and leaves & set(client[1]):
            continue
        missing.append(f"{service}/{kind}/{name} = {value}")
    return missing


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
    assert converted_differences(main_cf.parent, tomllib.loads(out.read_text()))[1] == []
    doc, text = tomllib.loads(out.read_text()), out.read_text()
    compared, differ = service_differences(main_cf.parent, doc)
    assert differ == []
    assert unaccounted_options(main_cf.parent, doc, text) == []
    load_config(out)  # (a `config check`: the output loads, its files read)
    EXPECTED[name](tmp_path, doc, text, lines, compared)


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
    # Postfix takes the header from any peer, mailflow from upstream_proxy_clients (loopback): HAProxy in its own
    # container would have every connection dropped, so the import says which key to write
    notes = [line for line in text.splitlines() if "takes the PROXY protocol" in line]
    assert [line.split(" takes ")[0] for line in notes] == [
        "# Note: master.cf:16: listener 0.0.0.0:10465, [::]:10465",
        "# Note: master.cf:31: listener 0.0.0.0:10587, [::]:10587"]
    assert all("mailflow only from smtpd.upstream_proxy_clients (127.0.0.0/8, ::1/128): write the load balancer's "
               "addresses there" in line for line in notes), notes
    assert all("upstream_proxy_clients" not in x["overrides"] for x in proxied)
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
