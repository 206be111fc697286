"""Differential test of the delivery agents: Postfix 3.7's pipe(8) and virtual(8) against mailflow's `[pipe.NAME]`
services and virtual transport. The same messages go over SMTP to a private Postfix (pipe services in master.cf)
and to a mailflow configured alike; both run the same scripts as `nobody`, which record their argv, environment
and stdin. Compared: each command's argv and stdin, which recipients share one run, the environment, each
recipient's first delivery result in the mail log (relay, dsn, status and text: exit statuses, command output,
signals, the time limit, a command that does not read its input, size=), the Maildir files virtual writes (bytes,
owner, mode) and the RCPT reply for a user the virtual mailbox maps do not know. Masked: queue ids, dates, the
Received header (test_added_headers_vs_postfix compares it), ${size} and ${client_port}.

Not compared, differences docs/config.md and docs/transports.md describe:
- the environment beyond PATH (Postfix's pipe(8) also passes export_environment: LANG, MAIL_CONFIG, TZ) and the
  working directory (Postfix: the queue directory; mailflow: `directory`, else /);
- flag D or O with several recipients in one request (Postfix defers 4.3.5 unless
  NAME_destination_recipient_limit = 1; mailflow runs the command once per recipient): here one per request;
- eol=, user=NAME:GROUP and chroot= (not implemented: a config error); flag X changes only a success notice's
  Action (test_notices_vs_postfix compares it);
- virtual_mailbox_limit (Postfix: the size of one file, at least message_size_limit; mailflow: a Maildir quota, as
  the VDA patch), mbox files under virtual_mailbox_base (mailflow writes Maildirs only), virtual_minimum_uid;
- how much command output a log line keeps (Postfix's logger cuts lines near 2 KB; mailflow's output_limit).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from tests.support import SmtpClient, base_settings, eventually, merged, postfix_instance, script_dir
from tests.support.maillog import mail_log_file

pytestmark = pytest.mark.interop

MACROS = ("sender", "recipient", "original_recipient", "user", "extension", "domain", "nexthop", "mailbox",
          "client_address", "client_hostname", "client_helo", "client_protocol", "client_port", "size",
          "sasl_method", "sasl_username", "sasl_sender", "queue_id")
ADDRESS_MACROS = ("sender", "recipient", "original_recipient", "user", "extension", "mailbox", "domain", "nexthop")
RECORD = ('f={out}/$(date +%s%N).$$\n'
          '{{ printf "arg:%s\\n" "$@"; env | sed "s/^/env:/"; echo stdin:; cat; }} > $f.part\n'
          'mv $f.part $f\n')
STATUS = ('case "$2" in\n'
          ' x0) echo "all fine";;\n'
          ' x1) printf "line one\\n\\tline two\\r\\n\\001end  \\n"; exit 1;;\n'
          ' x2) printf oops; exit 2;;\n'
          ' x67) echo "no such mailbox"; exit 67;;\n'
          ' x75) exit 75;;\n'
          ' x78) echo "bad conf"; exit 78;;\n'
          ' xdsn) echo "5.7.1 go away now"; exit 1;;\n'
          ' xdsn4) echo "4.2.2 over quota"; exit 1;;\n'
          ' xdsn2) echo "2.0.0 handed on elsewhere"; exit 75;;\n'
          ' xdsn2x1) echo "2.1.5 ok"; exit 1;;\n'
          ' xsig) kill -9 $$;;\n'
          ' xslow) sleep 30;;\n'
          'esac\n'
          'cat > /dev/null\n')
NOBODY = 65534
# name: (flags, script, macros); the script's first argument is the service's name
SERVICES = {
    "phead": ("FRODB.>", "record", MACROS),
    "pmulti": ("R", "record", ("recipient",)),
    "pquote": ("hqu", "record", ADDRESS_MACROS),
    "pstatus": ("", "status", ("user",)),
    "pslow": ("", "status", ("user",)),
    "pnoread": ("", "noread", ()),
    "psmall": ("", "record", ("recipient",)),
}
ROUTES = {"pipe.test": "phead", "multi.test": "pmulti", "quote.test": "pquote", "status.test": "pstatus",
          "slow.test": "pslow", "noread.test": "pnoread", "small.test": "psmall"}
TRANSPORT_MAPS = "inline:{ " + ", ".join(f"{{{d}={s}:}}" for d, s in ROUTES.items()) + ", {sender.test=discard:} }"
VIRTUAL_MAPS = "inline:{ {a@virt.test=a/}, {b@virt.test=b/} }"
STATUS_CASES = ("x0", "x1", "x2", "x67", "x75", "x78", "xdsn", "xdsn4", "xdsn2", "xdsn2x1", "xsig")

BODY = (b"Subject: agents\r\nMessage-ID: <agents-1@client.test>\r\n\r\nFrom the start\r\n..dot line\r\n"
        b">From quoted\r\nlast\r\n")
BIG = BODY + b"0123456789" * 7 + b"\r\n" * 3000  # more than a pipe holds: the command's exit beats the writes
S = "s@sender.test"
TRAFFIC: list[tuple[str, list[str], bytes]] = [
    (S, ["Ann+Ext@pipe.test"], BODY),
    ("", ["bob@pipe.test"], BODY),
    (S, ['"C D+x"@pipe.test'], BODY),
    (S, ["one@multi.test", "two@multi.test"], BODY),
    ('"S x"@Sender.test', ['"A B+X"@Quote.Test', "Up+Ext@QUOTE.test"], BODY),
    *[(S, [f"{case}@status.test"], BODY) for case in STATUS_CASES],
    (S, ["xslow@slow.test"], BODY),
    (S, ["a@noread.test"], BIG),
    (S, ["big@small.test"], BODY),
    (S, ["a@virt.test", "b@virt.test", "ghost@virt.test"], BODY),
]
_STATUS_LINE = re.compile(r": \w+: to=<(?P<to>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>[^,]+), .*?"
                          r"dsn=(?P<dsn>[^,]+), status=(?P<status>\w+) \((?P<text>.*)\)$")


@dataclass
class Run:
    """What one server did with TRAFFIC."""

    replies: list[list[str]] = field(default_factory=list)  # per message: each RCPT reply
    records: dict[str, list[dict]] = field(default_factory=dict)  # per service: what each command run saw
    results: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)  # recipient: first log result
    maildirs: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)  # name: (text, uid, gid, mode)


def master_cf(scripts: dict[str, Path]) -> str:
    lines = []
    for name, (flags, script, macros) in SERVICES.items():
        size = " size=100" if name == "psmall" else ""
        argv = " ".join([str(scripts[script]), name, *(f"${{{m}}}" for m in macros)])
        lines.append(f"{name} unix - n n - - pipe flags={flags} user=nobody{size} argv={argv}\n")
    return "".join(lines)


def pipe_settings(scripts: dict[str, Path]) -> dict:
    services = {name: {"argv": [str(scripts[script]), name, *(f"${{{m}}}" for m in macros)], "flags": flags,
                       "user": "nobody"} for name, (flags, script, macros) in SERVICES.items()}
    services["psmall"]["size_limit"] = 100
    services["pslow"]["time_limit"] = "1s"
    return services


async def send_traffic(port: int) -> list[list[str]]:
    replies = []
    for sender, rcpts, content in TRAFFIC:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
        replies.append([(await c.cmd(f"RCPT TO:<{r}>")).text for r in rcpts])
        assert (await c.cmd("DATA")).code == 354
        await c.send(content + b".\r\n")
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()
    return replies


def expected_recipients() -> set[str]:
    return {r for _, rcpts, _ in TRAFFIC for r in rcpts if not r.startswith("ghost@")}


def first_results(log: str) -> dict[str, tuple[str, str, str, str]]:
    """Each recipient's first delivery result in a mail log: (relay, dsn, status, text)."""
    found: dict[str, tuple[str, str, str, str]] = {}
    for line in log.splitlines():
        m = _STATUS_LINE.search(line)
        if m and m["relay"] != "none":
            found.setdefault(m["to"], (m["relay"], m["dsn"], m["status"], m["text"]))
    return found


async def logged(read_log, timeout: float = 20) -> dict[str, tuple[str, str, str, str]]:
    """The first results once every recipient has one (bounded)."""
    await eventually(lambda: expected_recipients() <= set(first_results(read_log())), timeout=timeout, step=0.1,
                     what="a delivery result for every recipient")
    return first_results(read_log())


def masked_message(text: str) -> str:
    """A delivered message with the Received header dropped and dates masked."""
    lines: list[str] = []
    skipping = False
    for line in text.split("\n"):
        if line.startswith("Received:") or (skipping and line[:1] in (" ", "\t")):
            skipping = True
            continue
        skipping = False
        line = re.sub(r"^(From \S+  ).*", r"\1DATE", line)
        lines.append(re.sub(r"^Date: .*", "Date: DATE", line))
    return "\n".join(lines)


def read_records(out: Path) -> dict[str, list[dict]]:
    """Per service, what each run recorded (sorted, so that runs compare as sets), then out/ emptied."""
    records: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*")):
        if path.name.endswith(".part"):
            continue
        head, _, stdin = path.read_text().partition("stdin:\n")
        args = [line[4:] for line in head.splitlines() if line.startswith("arg:")]
        env = sorted(line[4:] for line in head.splitlines() if line.startswith("env:"))
        if args[0] == "phead":  # ${size}, ${client_port} and ${queue_id} differ by nature
            named = dict(zip(MACROS, args[1:]))
            assert named["size"].isdigit() and named["client_port"].isdigit() and named["queue_id"].isalnum()
            named.update(size="SIZE", client_port="PORT", queue_id="QID")
            args = [args[0], *named.values()]
        records.setdefault(args[0], []).append({"args": args, "env": env, "stdin": masked_message(stdin)})
        path.unlink()
    return {name: sorted(runs, key=repr) for name, runs in records.items()}


def read_maildirs(base: Path) -> dict[str, list[tuple[str, int, int, int]]]:
    found: dict[str, list[tuple[str, int, int, int]]] = {}
    for path in sorted(base.glob("*/new/*")):
        st = path.stat()
        found.setdefault(path.parent.parent.name, []).append(
            (masked_message(path.read_text()), st.st_uid, st.st_gid, st.st_mode & 0o7777))
    return found


async def run_postfix(scripts: dict[str, Path], out: Path, vmail: Path) -> Run:
    run = Run()
    async with postfix_instance({
        "myhostname": "pf.test", "mydestination": "", "relay_domains": ", ".join(ROUTES),
        "recipient_delimiter": "+", "transport_maps": TRANSPORT_MAPS, "phead_destination_recipient_limit": "1",
        "pslow_time_limit": "1s", "virtual_mailbox_domains": "virt.test", "virtual_mailbox_maps": VIRTUAL_MAPS,
        "virtual_mailbox_base": str(vmail), "virtual_uid_maps": f"static:{NOBODY}",
        "virtual_gid_maps": f"static:{NOBODY}",
    }, master_cf=master_cf(scripts)) as pf:
        run.replies = await send_traffic(pf.port)
        run.results = await logged(lambda: pf.maillog)
    run.records = read_records(out)
    run.maildirs = read_maildirs(vmail)
    return run


async def run_mailflow(scripts: dict[str, Path], out: Path, vmail: Path, tmp: Path) -> Run:
    run = Run()
    settings = merged(base_settings(tmp), {
        "mydestination": ["localhost"], "relay_domains": list(ROUTES), "transport_maps": [TRANSPORT_MAPS],
        "virtual_mailbox_domains": ["virt.test"], "virtual_mailbox_maps": [VIRTUAL_MAPS],
        "virtual_mailbox_base": str(vmail), "virtual_uid_maps": [f"static:{NOBODY}"],
        "virtual_gid_maps": [f"static:{NOBODY}"], "pipe": pipe_settings(scripts)})
    with mail_log_file(tmp / "mail.log") as log:
        mf = Mailflow(config_from_dict(settings), shutdown_grace=2.0)
        await mf.start()
        try:
            run.replies = await send_traffic(mf.smtp_addresses[0][1])
            run.results = await logged(log.read_text)
        finally:
            await mf.stop()
    run.records = read_records(out)
    run.maildirs = read_maildirs(vmail)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """TRAFFIC through Postfix, then through mailflow (each on a loop of its own, as the servers are processes
    and services with their own lifetimes), with the same scripts."""
    vmail = Path(tempfile.mkdtemp(prefix="mailflow-vmail-"))
    try:
        os.chmod(vmail, 0o755)
        with script_dir() as d:
            scripts = {"record": d.script("record.sh", RECORD.format(out=d.out)),
                       "status": d.script("status.sh", STATUS), "noread": d.script("noread.sh", "exit 0\n")}
            for side in ("pf", "mf"):
                (vmail / side).mkdir()
                shutil.chown(vmail / side, NOBODY, NOBODY)
            postfix = asyncio.run(run_postfix(scripts, d.out, vmail / "pf"))
            mailflow = asyncio.run(run_mailflow(scripts, d.out, vmail / "mf", tmp_path_factory.mktemp("agents")))
            for run in (postfix, mailflow):  # the scripts' folder, in the texts that name a command
                run.results = {rcpt: (*result[:3], result[3].replace(str(d.path), "SCRIPTS"))
                               for rcpt, result in run.results.items()}
    finally:
        shutil.rmtree(vmail, ignore_errors=True)
    return {"postfix": postfix, "mailflow": mailflow}


def results(run: Run, domain: str) -> dict[str, tuple[str, str, str, str]]:
    return {rcpt: result for rcpt, result in run.results.items() if rcpt.lower().endswith("@" + domain)}


# ---------------------------------------------------------------------------------------------- pipe(8)


def test_pipe_argv_macros_match_postfix(runs):
    postfix, mailflow = runs["postfix"].records, runs["mailflow"].records
    for service in ("phead", "pquote"):
        assert [r["args"] for r in mailflow[service]] == [r["args"] for r in postfix[service]]
    # the edges themselves, so that a change on both sides cannot pass unnoticed
    assert postfix["phead"][0]["args"][1:9] == ["MAILER-DAEMON", "bob@pipe.test", "bob@pipe.test", "bob", "",
                                                "pipe.test", "pipe.test", "bob"]
    assert ["s@sender.test", "Ann+Ext@pipe.test", "Ann+Ext@pipe.test", "Ann", "Ext"] in [
        r["args"][1:6] for r in postfix["phead"]]
    # a quoted local part in its internal form; flag q quotes it again
    assert ["s@sender.test", "C D+x@pipe.test", "C D+x@pipe.test", "C D", "x"] in [
        r["args"][1:6] for r in postfix["phead"]]
    assert [r["args"][1:9] for r in postfix["pquote"]] == [[
        '"S x"@Sender.test', '"a b+x"@quote.test', "up+ext@quote.test", '"a b+x"@quote.test', "up+ext@quote.test",
        "a b", "up", "x"]]


def test_pipe_recipients_share_a_run_as_in_postfix(runs):
    postfix, mailflow = runs["postfix"].records, runs["mailflow"].records
    assert [r["args"] for r in mailflow["pmulti"]] == [r["args"] for r in postfix["pmulti"]] == [
        ["pmulti", "one@multi.test", "two@multi.test"]]
    assert len(mailflow["phead"]) == len(postfix["phead"]) == 3  # flags D and O: one recipient per run


def test_pipe_stdin_matches_postfix(runs):
    postfix, mailflow = runs["postfix"].records, runs["mailflow"].records
    for service in ("phead", "pmulti", "pquote"):
        assert [r["stdin"] for r in mailflow[service]] == [r["stdin"] for r in postfix[service]], service
    bob = next(r["stdin"] for r in postfix["phead"] if "bob@pipe.test" in r["args"])
    assert bob.startswith("From MAILER-DAEMON  DATE\nReturn-Path: <MAILER-DAEMON>\nX-Original-To: bob@pipe.test\n"
                          "Delivered-To: bob@pipe.test\nSubject: agents\n")
    assert bob.endswith("\n\n>From the start\n..dot line\n>From quoted\nlast\n\n")  # flags > . and B


def test_pipe_environment_is_path_as_in_postfix(runs):
    """Beyond PATH, Postfix passes export_environment (LANG, MAIL_CONFIG, TZ); mailflow nothing (docs/config.md)."""
    for run in runs.values():
        for record in (r for records in run.records.values() for r in records):
            env = [v for v in record["env"] if not v.startswith(("LANG=", "MAIL_CONFIG=", "TZ=", "PWD="))]
            assert env == ["PATH=/usr/bin:/bin"]


def test_pipe_delivery_results_match_postfix(runs):
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    for domain in ("pipe.test", "multi.test", "quote.test", "status.test", "slow.test", "noread.test", "small.test"):
        assert results(mailflow, domain) == results(postfix, domain), domain
    assert postfix.results["x75@status.test"] == ("pstatus", "4.3.0", "deferred", "temporary failure")
    assert postfix.results["x67@status.test"] == ("pstatus", "5.1.1", "bounced",
                                                  "user unknown. Command output: no such mailbox ")
    assert postfix.results["x1@status.test"][3].endswith(". Command output: line one  line two_ _end   ")
    assert postfix.results["xdsn@status.test"] == ("pstatus", "5.7.1", "bounced", "go away now ")
    # a failed command's 2.X.X is taken before its exit status, and a bounce's status is a 5.X.X
    assert postfix.results["xdsn2@status.test"] == ("pstatus", "5.0.0", "bounced", "handed on elsewhere ")
    assert postfix.results["xdsn2x1@status.test"] == ("pstatus", "5.0.0", "bounced", "ok ")
    assert postfix.results["x2@status.test"][1:] == (
        "5.3.0", "bounced", 'Command died with status 2: "SCRIPTS/status.sh". Command output: oops')
    assert postfix.results["xslow@slow.test"] == (
        "pslow", "5.3.0", "bounced", 'Command time limit exceeded: "SCRIPTS/status.sh"')
    assert postfix.results["a@noread.test"] == ("pnoread", "2.0.0", "sent", "delivered via pnoread service")
    assert postfix.results["big@small.test"] == ("psmall", "5.2.3", "bounced", "message too large")


# ---------------------------------------------------------------------------------------------- virtual(8)


def test_virtual_maildir_delivery_matches_postfix(runs):
    postfix, mailflow = runs["postfix"], runs["mailflow"]
    assert mailflow.maildirs == postfix.maildirs
    assert mailflow.replies[-1] == postfix.replies[-1] == [
        "250 2.1.5 Ok", "250 2.1.5 Ok",
        "550 5.1.1 <ghost@virt.test>: Recipient address rejected: User unknown in virtual mailbox table"]
    assert results(mailflow, "virt.test") == results(postfix, "virt.test") == {
        f"{u}@virt.test": ("virtual", "2.0.0", "sent", "delivered to maildir") for u in "ab"}
    [(text, uid, gid, mode)] = postfix.maildirs["a"]
    assert text.startswith("Return-Path: <s@sender.test>\nX-Original-To: a@virt.test\nDelivered-To: a@virt.test\n")
    assert (uid, gid, mode) == (NOBODY, NOBODY, 0o600)
