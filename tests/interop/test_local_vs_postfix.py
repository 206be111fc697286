"""Differential test of local(8): the same aliases file through a private Postfix 3.7 and mailflow, configured
alike (local domain origin.test, mbox mailboxes in a spool directory: home_mailbox "" and mail_spool_directory),
the same scripts run as `nobody` (default_privs) recording their argv, environment and stdin.

Compared: each recipient's first delivery result in the mail log (to=, orig_to=, dsn, status and text: a
command's exit statuses, its output, a signal, a shell built-in, a command with shell metacharacters, a script
without `#!`, an executable /file, an alias to the mailbox, a Delivered-To loop met through an alias); the
environment and stdin of alias commands, one reached with an address extension and one of a mailing list with an
`owner-` alias (whose sender is the owner, without an original recipient); what /file destinations and the
mailbox receive; a /dir/ destination (a Maildir: its folders' and file's owner and mode, the message in new/) and
one in a folder nobody may write (the same text; Postfix bounces it 5.2.0, mailflow defers it 4.2.0: asserted).
Masked: dates, queue ids, the Received header, the scripts' folder, a Maildir file's unique name.

Not compared, differences docs/transports.md describes: the body's `>From ` lines (mboxrd; none in the message
here), the log lines of an alias with several destinations (mailflow logs one result per recipient), the
working directory and export_environment (LANG, MAIL_CONFIG), and a /file in a folder that does not exist
(Postfix bounces 5.2.0, mailflow defers 4.2.0; neither creates the folder: asserted).
"""
from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from tests.interop.test_agents_vs_postfix import masked_message
from tests.support import SmtpClient, base_settings, eventually, merged, postfix_instance, script_dir
from tests.support.maillog import mail_log_file

pytestmark = pytest.mark.interop

NOBODY = 65534
RECORD = ('f={out}/$1\n'
          '{{ printf "arg:%s\\n" "$@"; env | sort | sed "s/^/env:/"; echo stdin:; cat; }} > $f.part\n'
          'mv $f.part $f\n'
          'case "$1" in\n'
          ' x1) printf "line one\\n\\tline two\\r\\n\\001end  \\n"; exit 1;;\n'
          ' x67) echo "no such mailbox"; exit 67;;\n'
          ' x75) echo "try later"; exit 75;;\n'
          ' xdsn) echo "5.7.1 go away now"; exit 1;;\n'
          ' xdsn4) echo "4.2.2 over quota"; exit 1;;\n'
          ' xsig) kill -9 $$;;\n'
          'esac\n')
STATUS_CASES = ("x1", "x67", "x75", "xdsn", "xdsn4", "xsig")


def without_interpreter_line(script: Path) -> Path:
    """The same script without its `#!` line (execvp hands such a file to /bin/sh)."""
    return script.with_name("plain-" + script.name)


def aliases(script: Path, spool: Path) -> dict[str, str]:
    return {
        "mbox": "nobody",
        "upalias": "NoBody",
        "viaalias": "nobody",
        "cmd": f'"|{script} cmd arg"',
        "cmdext": f'"|{script} cmdext"',
        "plain": f'"|{without_interpreter_line(script)} plain"',
        "list": f'"|{script} list", {spool}/files/list',
        "owner-list": "nobody",
        "file": f"{spool}/files/file",
        "exe": f"{spool}/files/exe",
        "nodir": f"{spool}/nodir/file",
        "dir": f"{spool}/files/dir/",
        "closeddir": f"{spool}/closed/dir/",
        "builtin": '"|exit 75"',
        "shellcmd": '"|echo said; exit 67"',
        **{case: f'"|{script} {case}"' for case in STATUS_CASES},
    }


# (recipient's local part, a header line the message starts with)
TRAFFIC = [("mbox", ""), ("upalias", ""), ("viaalias", "Delivered-To: nobody@origin.test\r\n"), ("cmd", ""),
           ("cmdext+foo", ""), ("plain", ""), ("list", ""), ("file", ""), ("exe", ""), ("nodir", ""), ("dir", ""),
           ("closeddir", ""), ("builtin", ""),
           ("shellcmd", ""), *[(case, "") for case in STATUS_CASES]]
BODY = ("Subject: {name}\r\nMessage-ID: <{name}@client.test>\r\nDate: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
        "From: s@sender.test\r\n\r\nFrom the start\r\n..dot line\r\nlast\r\n")
COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test", "recipient_delimiter": "+"}
DISCARD_NOTICES = "inline:{sender.test=discard:}"
_TMP_NAME = re.compile(r"/tmp/[^/:]+:")  # a Maildir file's unique name in tmp/
_RESULT = re.compile(r"[ /]local(?:\[\d+\])?: \w+: to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig>[^>]*)>, )?relay=local, .*?"
                     r"dsn=(?P<dsn>[^,]+), status=(?P<status>\w+) \((?P<text>.*)\)$")


@dataclass
class Run:
    """What one server did with TRAFFIC."""

    results: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # recipient given: its first result
    logged_as: dict[str, tuple[str, str]] = field(default_factory=dict)  # recipient given: its result's to=, orig_to=
    records: dict[str, dict] = field(default_factory=dict)  # command name: its env (a list) and stdin
    files: dict[str, str] = field(default_factory=dict)  # file under the spool: its text, masked
    maildir: dict[str, tuple[int, int]] = field(default_factory=dict)  # files/dir/'s folders and files: uid, mode
    created_nodir: bool = False
    created_in_closed: list[str] = field(default_factory=list)


async def send_traffic(port: int) -> None:
    for name, header in TRAFFIC:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<s@sender.test>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{name}@origin.test>")).code == 250, name
        assert (await c.cmd("DATA")).code == 354
        await c.send((header + BODY.format(name=name)).encode() + b".\r\n")
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()


def first_results(log: str) -> dict[str, tuple[str, str, str, str, str]]:
    """Each recipient's first local result (to=, orig_to=, dsn, status, text), keyed by the local part the client
    gave (orig_to's, else to's)."""
    found: dict[str, tuple[str, str, str, str, str]] = {}
    for line in log.splitlines():
        m = _RESULT.search(line)
        if m:
            found.setdefault((m["orig"] or m["to"]).partition("@")[0],
                             (m["to"], m["orig"] or "", m["dsn"], m["status"], m["text"]))
    return found


async def logged(read_log) -> dict[str, tuple[str, str, str, str, str]]:
    """The first results, once every recipient of TRAFFIC has one (bounded), keyed by its name there."""
    names = {name for name, _ in TRAFFIC}
    try:
        await eventually(lambda: names <= set(first_results(read_log())), timeout=30, step=0.1)
    except AssertionError:
        raise AssertionError(f"no local result for {sorted(names - set(first_results(read_log())))}:\n"
                             f"{read_log()[-3000:]}") from None
    return first_results(read_log())


def prepared_spool(script: Path) -> tuple[Path, Path]:
    """A spool folder every user may write (the mailbox and files are written as nobody), its aliases file."""
    spool = Path(tempfile.mkdtemp(prefix="mailflow-spool-"))
    spool.chmod(0o1777)
    (spool / "files").mkdir()
    (spool / "files").chmod(0o1777)
    (spool / "closed").mkdir(mode=0o555)  # (root's: nobody may not make a Maildir there)
    exe = spool / "files" / "exe"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o700)
    shutil.chown(exe, NOBODY, NOBODY)
    table = spool / "aliases"
    table.write_text("".join(f"{name}: {value}\n" for name, value in aliases(script, spool).items()))
    return spool, table


def mbox_in_any_order(mbox: str) -> str:
    """The mbox's messages sorted: two deliveries to one mailbox may land in either order. (Each message begins
    with its `From ` line; one in the content is `>From `.)"""
    messages = ("\n\n" + mbox).split("\n\nFrom ")
    return "\n\n".join(sorted("From " + m.rstrip("\n") for m in messages if m))


def collect(run: Run, spool: Path, out: Path, script_folder: Path) -> Run:
    run.logged_as = {name: (to, orig) for name, (to, orig, *_) in run.results.items()}
    run.results = {name: (dsn, status, _TMP_NAME.sub("/tmp/NAME:", text.replace(str(script_folder), "SCRIPTS")
                                                                 .replace(str(spool), "SPOOL")))
                   for name, (_, _, dsn, status, text) in run.results.items()}
    for path in sorted(out.glob("*")):
        head, _, stdin = path.read_text().partition("stdin:\n")
        env = [line[4:] for line in head.splitlines()
               if line.startswith("env:") and not line.startswith(("env:LANG=", "env:MAIL_CONFIG=", "env:PWD="))]
        run.records[path.name] = {"env": env, "stdin": masked_message(stdin)}
        path.unlink()
    for name in ("files/file", "files/list", "files/exe"):
        run.files[name] = masked_message((spool / name).read_text())
    run.files["nobody"] = mbox_in_any_order(masked_message((spool / "nobody").read_text()))
    run.created_nodir = (spool / "nodir").exists()
    maildir = spool / "files" / "dir"
    for path in sorted(maildir.rglob("*")):
        key = str(path.relative_to(maildir).parent / ("FILE" if path.is_file() else path.name))
        run.maildir[key] = (path.lstat().st_uid, path.lstat().st_mode & 0o7777)
        if path.is_file():
            run.files[f"files/dir/{key}"] = masked_message(path.read_text())
    run.maildir["."] = (maildir.lstat().st_uid, maildir.lstat().st_mode & 0o7777)
    run.created_in_closed = sorted(p.name for p in (spool / "closed").iterdir())
    shutil.rmtree(spool, ignore_errors=True)
    return run


async def run_postfix(script: Path, out: Path) -> Run:
    spool, table = prepared_spool(script)
    subprocess.run(["postalias", f"hash:{table}"], check=True, capture_output=True)
    run = Run()
    async with postfix_instance({**COMMON, "mydestination": "origin.test", "alias_maps": f"hash:{table}",
                                 "home_mailbox": "", "mail_spool_directory": str(spool),
                                 "transport_maps": DISCARD_NOTICES}) as pf:
        await send_traffic(pf.port)
        run.results = await logged(lambda: pf.maillog)
    return collect(run, spool, out, script.parent)


async def run_mailflow(script: Path, out: Path, tmp: Path) -> Run:
    spool, table = prepared_spool(script)
    settings = merged(base_settings(tmp), {
        **COMMON, "mydestination": ["origin.test"], "alias_maps": [f"texthash:{table}"],
        "local_recipient_maps": ["inline:{nobody=x}"], "transport_maps": [DISCARD_NOTICES],
        "local": {"home_mailbox": "", "mail_spool_directory": str(spool)}})
    run = Run()
    with mail_log_file(tmp / "mail.log") as log:
        mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
        await mf.start()
        try:
            await send_traffic(mf.smtp_addresses[0][1])
            run.results = await logged(log.read_text)
        finally:
            await mf.stop()
    return collect(run, spool, out, script.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """TRAFFIC through Postfix, then through mailflow, each on a loop of its own, with the same script."""
    with script_dir() as d:
        script = d.script("record.sh", RECORD.format(out=d.out))
        plain = without_interpreter_line(script)
        plain.write_text(RECORD.format(out=d.out))
        plain.chmod(0o755)
        postfix = asyncio.run(run_postfix(script, d.out))
        mailflow = asyncio.run(run_mailflow(script, d.out, tmp_path_factory.mktemp("local")))
    return {"postfix": postfix, "mailflow": mailflow}


def test_command_results_match_postfix(runs):
    """Exit statuses and output as pipe(8)'s; a command without shell metacharacters runs without a shell, so
    its death by a signal defers (a shell would turn it into status 137, a bounce); `exit 75` is a shell
    built-in, so that one goes to /bin/sh, and so does a script without a `#!` line (execvp's ENOEXEC)."""
    postfix, mailflow = runs["postfix"].results, runs["mailflow"].results
    commands = ("cmd", "cmdext+foo", "plain", "builtin", "shellcmd", *STATUS_CASES)
    assert {c: mailflow[c] for c in commands} == {c: postfix[c] for c in commands}
    assert postfix["xsig"] == ("4.3.0", "deferred", 'Command died with signal 9: "SCRIPTS/record.sh xsig"')
    assert postfix["builtin"] == ("4.3.0", "deferred", "temporary failure")
    assert postfix["shellcmd"] == ("5.1.1", "bounced", "user unknown. Command output: said ")
    assert postfix["cmdext+foo"] == ("2.0.0", "sent", "delivered to command: SCRIPTS/record.sh cmdext")
    assert postfix["plain"] == ("2.0.0", "sent", "delivered to command: SCRIPTS/plain-record.sh plain")


def test_command_environment_and_input_match_postfix(runs):
    """local(8)'s environment: no HOME or SHELL for an alias (it is nobody's account), EXTENSION only when there
    is one; under a list with an owner- alias the owner is the sender (SENDER, From_, Return-Path) and there is
    no original recipient (no ORIGINAL_RECIPIENT, no X-Original-To)."""
    postfix, mailflow = runs["postfix"].records, runs["mailflow"].records
    assert mailflow == postfix
    assert postfix["cmd"]["env"] == [
        "CLIENT_ADDRESS=127.0.0.1", "CLIENT_HELO=client.test", "CLIENT_HOSTNAME=localhost", "CLIENT_PROTOCOL=ESMTP",
        "DOMAIN=origin.test", "LOCAL=cmd", "LOGNAME=cmd", "ORIGINAL_RECIPIENT=cmd@origin.test", "PATH=/usr/bin:/bin",
        "RECIPIENT=cmd@origin.test", "SENDER=s@sender.test", "USER=cmd"]
    assert "EXTENSION=foo" in postfix["cmdext"]["env"] and "LOCAL=cmdext+foo" in postfix["cmdext"]["env"]
    listed = postfix["list"]
    assert "SENDER=owner-list@origin.test" in listed["env"]
    assert not [v for v in listed["env"] if v.startswith("ORIGINAL_RECIPIENT=")]
    assert listed["stdin"].startswith("From owner-list@origin.test  DATE\nReturn-Path: <owner-list@origin.test>\n"
                                      "Delivered-To: list@origin.test\nSubject: list\n")


def test_file_destinations_and_the_mailbox_match_postfix(runs):
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert mailflow.files == postfix.files
    assert postfix.files["files/list"].startswith(  # the list's owner, as for its command
        "From owner-list@origin.test  DATE\nReturn-Path: <owner-list@origin.test>\nDelivered-To: list@origin.test\n")
    assert postfix.files["files/file"].startswith(
        "From s@sender.test  DATE\nReturn-Path: <s@sender.test>\nX-Original-To: file@origin.test\n"
        "Delivered-To: file@origin.test\n")
    assert postfix.files["files/exe"] == "#!/bin/sh\n"
    for name in ("file", "mbox", "viaalias", "exe"):
        assert mailflow.results[name] == postfix.results[name], name
    assert postfix.results["viaalias"] == ("5.4.6", "bounced", "mail forwarding loop for nobody@origin.test")
    assert postfix.results["exe"] == ("5.7.1", "bounced",
                                      "cannot append message to file SPOOL/files/exe: file is executable")


def test_a_file_in_a_missing_folder_is_not_created(runs):
    """Postfix bounces it 5.2.0; mailflow defers it (an OS error the administrator can fix, docs/transports.md),
    in Postfix's words; neither makes the folder."""
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert postfix.results["nodir"] == ("5.2.0", "bounced", "cannot append message to file SPOOL/nodir/file: "
                                                            "cannot create file exclusively: No such file or directory")
    assert mailflow.results["nodir"] == ("4.2.0", "deferred", postfix.results["nodir"][2])
    assert not postfix.created_nodir and not mailflow.created_nodir


def test_a_delivery_through_an_alias_is_logged_about_the_member_as_postfixs(runs):
    """local(8) logs each delivery it makes: an alias that leads to one mailbox is `to=<member>,
    orig_to=<alias>` (the member as the alias writes it); a command or file is logged about the alias."""
    postfix, mailflow = runs["postfix"].logged_as, runs["mailflow"].logged_as
    assert mailflow == postfix
    assert postfix["mbox"] == ("nobody@origin.test", "mbox@origin.test")
    assert postfix["upalias"] == ("NoBody@origin.test", "upalias@origin.test")
    assert postfix["cmd"] == ("cmd@origin.test", "")


def test_a_directory_destination_is_a_maildir_as_postfixs(runs):
    """local(8) delivers an alias's name ending in "/" as a Maildir, with default_privs' rights: tmp/ new/ cur/ made
    0700, the copy (Return-Path, X-Original-To, Delivered-To; no From_ line, no quoting) in new/, 0600, all
    nobody's. mailflow appended an mbox file `dir` ("delivered to file: SPOOL/files/dir/")."""
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert mailflow.results["dir"] == postfix.results["dir"] == ("2.0.0", "sent", "delivered to maildir")
    assert mailflow.maildir == postfix.maildir == {
        ".": (NOBODY, 0o700), "tmp": (NOBODY, 0o700), "new": (NOBODY, 0o700), "cur": (NOBODY, 0o700),
        "new/FILE": (NOBODY, 0o600)}
    assert mailflow.files["files/dir/new/FILE"] == postfix.files["files/dir/new/FILE"]
    assert postfix.files["files/dir/new/FILE"].startswith(
        "Return-Path: <s@sender.test>\nX-Original-To: dir@origin.test\nDelivered-To: dir@origin.test\n")
    assert "\nFrom the start\n" in postfix.files["files/dir/new/FILE"]


def test_a_directory_destination_its_writer_may_not_make_is_told_in_postfixs_words(runs):
    """Postfix bounces it 5.2.0; mailflow defers it (an OS error the administrator can fix, docs/transports.md),
    in Postfix's words. Nothing is made there (the child writes as nobody, not as root)."""
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert postfix.results["closeddir"] == (
        "5.2.0", "bounced", "maildir delivery failed: create maildir file SPOOL/closed/dir/tmp/NAME: Permission denied")
    assert mailflow.results["closeddir"] == ("4.2.0", "deferred", postfix.results["closeddir"][2])
    assert postfix.created_in_closed == mailflow.created_in_closed == []
