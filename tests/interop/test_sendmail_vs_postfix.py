"""Differential test of `mailflow sendmail` against Postfix 3.7's sendmail run on a private instance: the same
command lines, the same standard input, to each one's own sendmail (`sendmail -C <etc>`, `mailflow sendmail -C
<config>`).

What is compared per command line: whether it is refused, the reason in the words of Postfix's `fatal:` (or
getopt's) line, and the recipients of what was stored. Postfix's queued mail is read with `postqueue -j` (its
relayhost refuses connections, so the mail stays deferred); mailflow's stays in its maildrop (no server runs).
Under `-bs` (Postfix runs its smtpd there, with its default smtputf8_enable = yes), one command at a time: each
reply line, the queue ids left out.

Documented differences: the exit code of a refusal is 64 (EX_USAGE) for mailflow and 75 for Postfix's sendmail
(whose fatal errors all exit EX_TEMPFAIL, usage errors too; docs/sendmail.md); `-XV` (VERP) is taken by Postfix
and ignored with a warning by mailflow. Under -bs: EHLO without ETRN, DSN and CHUNKING, so the DSN parameters are
unsupported options (docs/sendmail.md). Both banners are set alike (mailflow's default names mailflow).
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.maildrop import maildrop_names, read_maildrop
from tests.support import eventually, postfix_instance

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
MESSAGE = b"Subject: probe\n\nbody\n"
# (command line, the recipients stored: None when it is refused)
COMMAND_LINES = [
    (["-Z", "a@x.test"], None),  # a letter Postfix does not know: never mail to the word after it
    (["-4", "a@x.test"], None),
    (["-n", "a@x.test"], None),
    (["-XQ", "a@x.test"], None),
    (["-qS"], None),
    (["-qR"], None),
    (["-t", "-bs"], None),
    (["-t", "-bv"], None),
    (["-bp", "a@x.test"], None),
    (["-bD"], None),
    (["-bh"], []),  # exits 0 at once, reading nothing
    (["-bH", "a@x.test"], []),
    (["-q30m"], []),
    (["-A", "c", "a@x.test"], ["a@x.test"]),  # -A and -e take a value, ignored
    (["-e", "x", "a@x.test"], ["a@x.test"]),
    (["-oem", "-odb", "-U", "-G", "-L", "lbl", "-h", "5", "-p", "smtp:x", "-c", "-x", "-m", "a@x.test"],
     ["a@x.test"]),
]


def fatal_lines(stderr: bytes) -> list[str]:
    """The reasons on sendmail's standard error, without the program name and `fatal: `."""
    lines = stderr.decode(errors="replace").splitlines()
    return [line.removeprefix("sendmail: ").removeprefix("fatal: ") for line in lines if line.startswith("sendmail: ")]


def postfix_queued(pf) -> list[list[str]]:
    listed = pf.run("postqueue", "-j").stdout.decode().splitlines()
    return [[r["address"] for r in json.loads(line)["recipients"]] for line in listed if line.strip()]


def mailflow_stored(maildrop: Path) -> list[list[str]]:
    return [list(read_maildrop(maildrop / name).recipients) for name in maildrop_names(maildrop)]


async def test_command_lines_are_refused_or_taken_as_a_real_postfix_takes_them(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", **COMMON)
    maildrop = tmp_path / "queue" / "maildrop"
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9"}) as pf:
        for args, stored in COMMAND_LINES:
            postfix = subprocess.run(["sendmail", "-C", str(pf.etc), *args], input=MESSAGE, capture_output=True,
                                     timeout=20)
            mailflow = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), *args],
                                      input=MESSAGE, capture_output=True, timeout=20)
            assert (postfix.returncode != 0, mailflow.returncode != 0) == (stored is None,) * 2, (args, postfix,
                                                                                                 mailflow)
            if stored is None:
                assert mailflow.returncode == 64 and postfix.returncode == 75
                reason = fatal_lines(mailflow.stderr)[0]
                assert reason in fatal_lines(postfix.stderr), (args, postfix.stderr, mailflow.stderr)
                continue
            if stored:
                await eventually(lambda: postfix_queued(pf), timeout=10, step=0.2, what=f"{args} queued by Postfix")
            else:
                assert not any((pf.root / "queue" / "maildrop").iterdir()), args
            assert postfix_queued(pf) == ([stored] if stored else []), args
            assert mailflow_stored(maildrop) == ([stored] if stored else []), args
            pf.run("postsuper", "-d", "ALL")
            for name in maildrop_names(maildrop):
                (maildrop / name).unlink()


# (command line, message): the recipients and sender both store are compared
RECIPIENT_CASES = [
    (["a@x.test b@x.test"], MESSAGE),  # `sendmail "$RECIPIENTS"`: a space-separated list in one argument
    (["Joe a@x.test,c@x.test\tb@x.test"], MESSAGE),
    (["-f", "a@x.test b@x.test", "c@x.test"], MESSAGE),  # -f: the first (with a warning)
    (["-t"], b"To: a@x.test b@x.test\nCc: Joe Q <c@x.test>, Team: d@x.test e@x.test;\nBcc: f@x.test g@x.test\n"
             b"Subject: probe\n\nbody\n"),
]


async def test_recipient_lists_are_read_as_a_real_postfix_reads_them(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", **COMMON)
    maildrop = tmp_path / "queue" / "maildrop"
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9"}) as pf:
        for args, message in RECIPIENT_CASES:
            postfix = subprocess.run(["sendmail", "-C", str(pf.etc), *args], input=message, capture_output=True,
                                     timeout=20)
            mailflow = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), *args],
                                      input=message, capture_output=True, timeout=20)
            assert postfix.returncode == mailflow.returncode == 0, (args, postfix.stderr, mailflow.stderr)
            assert fatal_lines(mailflow.stderr)[:-1] == fatal_lines(postfix.stderr), args  # (the last: no server)
            await eventually(lambda: postfix_queued(pf), timeout=10, step=0.2, what=f"{args} queued by Postfix")
            listed = pf.run("postqueue", "-j").stdout.decode()
            [postfix_sender] = [json.loads(line)["sender"] for line in listed.splitlines() if line.strip()]
            [stored] = [read_maildrop(maildrop / name) for name in maildrop_names(maildrop)]
            assert (stored.sender, sorted(stored.recipients)) == (postfix_sender, sorted(postfix_queued(pf)[0])), args
            pf.run("postsuper", "-d", "ALL")
            (maildrop / maildrop_names(maildrop)[0]).unlink()


# one command at a time (the lines of DATA's content sent with the command before them)
BS_DIALOGUE: list[str | bytes] = [
    "EHLO client.test", "HELO", "EHLO",
    "MAIL FROM:a@x.test", "RSET",  # a path without angle brackets, as Postfix's smtpd takes it
    "MAIL FROM:<a@x.test> SIZE=abc", "MAIL FROM:<a@x.test> SIZE=100 BODY=7bit FOO", "MAIL FROM:<a@x.test> BODY=bogus",
    "MAIL FROM:<a@x.test> SIZE=99999999999", "MAIL FROM:<a@x.test> SIZE=999999999999999999999999",
    "MAIL FROM:<a b@x.test>", "MAIL FROM:<a@x.test", "MAIL FROM:", "MAIL TO:<a@x.test>",
    "MAIL FROM:<@route.test:a@x.test> AUTH=<> SMTPUTF8 BODY=8BITMIME SIZE=10",
    "RCPT TO:<>", "RCPT TO:", "RCPT TO:<b@x.test> FOO", "RCPT TO:b@x.test", "RCPT TO:<a b@x.test>",
    "RCPT TO:<@r1.test,@r2.test:c@x.test>",
    "DATA\r\nSubject: bs\r\n\r\nhi\r\n.",
    "STARTTLS", "AUTH PLAIN", "XCLIENT ADDR=192.0.2.1", "XFORWARD NAME=x.test", "NOOP", "", "  ",
    b"MAIL FROM:<\xff@x.test>",  # not UTF-8: refused, never stored as a replacement character
    "QUIT",
]


async def bs_replies(command: list[str]) -> list[str]:
    """Each command's reply lines from a `-bs` session (`queued as ID` without the id)."""
    proc = await asyncio.create_subprocess_exec(*command, "-bs", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    replies = []

    async def reply() -> str:
        lines = []
        while not lines or lines[-1][3:4] == "-":
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, f"the session ended: {replies}"
            lines.append(line.decode().rstrip("\r\n"))
        return re.sub(r"queued as \w+", "queued as ID", "\n".join(lines))

    replies.append(await reply())  # the greeting
    for line in BS_DIALOGUE:
        proc.stdin.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        replies.append(await reply())
        if isinstance(line, str) and line.startswith("DATA"):
            replies[-1] += "\n" + await reply()
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 20)
    return replies


async def test_bs_answers_each_command_as_a_real_postfixs_smtpd_does(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": ["127.0.0.1:0"], "banner": "ESMTP probe",
                                                             "disable_vrfy_command": False}, **COMMON)
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9", "smtputf8_enable": "yes",
                                 "smtpd_banner": "$myhostname ESMTP probe"}) as pf:
        postfix = await bs_replies(["sendmail", "-C", str(pf.etc)])
    mailflow = await bs_replies([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)])
    offered = [line[4:] for line in postfix[1].splitlines()]
    assert [k for k in offered if k not in ("ETRN", "DSN", "CHUNKING")] == [k[4:] for k in mailflow[1].splitlines()]
    assert mailflow[:1] + mailflow[2:] == postfix[:1] + postfix[2:]
    # what both did, so that the same change on both sides cannot pass unnoticed
    assert postfix[0] == "220 mx.origin.test ESMTP probe" and postfix[4] == "250 2.1.0 Ok"
    assert postfix[22] == "354 End data with <CR><LF>.<CR><LF>\n250 2.0.0 Ok: queued as ID"
    assert [read_maildrop(tmp_path / "queue" / "maildrop" / name).recipients
            for name in maildrop_names(tmp_path / "queue" / "maildrop")] == [("b@x.test", "c@x.test")]
