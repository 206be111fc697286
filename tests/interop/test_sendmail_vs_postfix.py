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
and ignored with a warning by mailflow. Under -bs: EHLO without ETRN and CHUNKING, and MAIL's ENVID and RET
queued (Postfix's stand-alone smtpd checks them and queues neither; docs/sendmail.md). Both banners are set alike
(mailflow's default names mailflow).
"""
from __future__ import annotations

import asyncio
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


def picked_up(pf) -> bool:
    """Something is queued, and nothing is still in the maildrop (where the sender is not yet qualified)."""
    listed = pf.listed()
    return bool(listed) and all(message["queue_name"] != "maildrop" for message in listed)


def postfix_queued(pf) -> list[list[str]]:
    return [[r["address"] for r in message["recipients"]] for message in pf.listed()]


def mailflow_stored(maildrop: Path) -> list[list[str]]:
    return [list(read_maildrop(maildrop / name).recipients) for name in maildrop_names(maildrop)]


async def mailflow_sendmail(config: Path, args: list[str], message: bytes) -> subprocess.CompletedProcess:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mailflow", "sendmail", "-C", str(config),
                                                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(message), 20)
    except asyncio.TimeoutError:  # no child left behind (it would outlive the test and hold its queue)
        proc.kill()
        await proc.wait()
        pytest.fail(f"mailflow sendmail {' '.join(args)} did not finish within 20 s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


async def each_on_its_own_queue(write_config, tmp_path: Path, cases: list[tuple[list[str], bytes]]
                                ) -> list[tuple[subprocess.CompletedProcess, Path]]:
    """`mailflow sendmail` for every (command line, standard input) at once (a Python start each: one after the
    other they took 6 s), each with a queue of its own: what it did and its maildrop."""
    configs = []
    for n in range(len(cases)):
        queue = tmp_path / f"line{n}" / "queue"
        queue.mkdir(parents=True)
        configs.append(write_config(tmp_path / f"line{n}" / "mailflow.toml", queue_directory=str(queue), **COMMON))
    done = await asyncio.gather(*(mailflow_sendmail(config, args, message)
                                  for config, (args, message) in zip(configs, cases)))
    return [(result, config.parent / "queue" / "maildrop") for result, config in zip(done, configs)]


async def test_command_lines_are_refused_or_taken_as_a_real_postfix_takes_them(write_config, tmp_path):
    ran = await each_on_its_own_queue(write_config, tmp_path, [(args, MESSAGE) for args, _ in COMMAND_LINES])
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9"}) as pf:
        for (args, stored), (mailflow, maildrop) in zip(COMMAND_LINES, ran):
            postfix = subprocess.run(["sendmail", "-C", str(pf.etc), *args], input=MESSAGE, capture_output=True,
                                     timeout=20)
            assert (postfix.returncode != 0, mailflow.returncode != 0) == (stored is None,) * 2, (args, postfix,
                                                                                                 mailflow)
            if stored is None:
                assert mailflow.returncode == 64 and postfix.returncode == 75
                reason = fatal_lines(mailflow.stderr)[0]
                assert reason in fatal_lines(postfix.stderr), (args, postfix.stderr, mailflow.stderr)
                continue
            if stored:
                await eventually(lambda: picked_up(pf), timeout=10, step=0.2, what=f"{args} queued by Postfix")
            else:
                assert not any((pf.root / "queue" / "maildrop").iterdir()), args
            assert postfix_queued(pf) == ([stored] if stored else []), args
            assert mailflow_stored(maildrop) == ([stored] if stored else []), args
            pf.run("postsuper", "-d", "ALL")


# (command line, message): the recipients and sender both store are compared
RECIPIENT_CASES = [
    (["a@x.test b@x.test"], MESSAGE),  # `sendmail "$RECIPIENTS"`: a space-separated list in one argument
    (["Joe a@x.test,c@x.test\tb@x.test"], MESSAGE),
    (["-f", "a@x.test b@x.test", "c@x.test"], MESSAGE),  # -f: the first (with a warning)
    (["-V", "", "-N", "", "c@x.test"], MESSAGE),  # empty -V and -N values: ignored, each with its warning
    (["-t"], b"To: a@x.test b@x.test\nCc: Joe Q <c@x.test>, Team: d@x.test e@x.test;\nBcc: f@x.test g@x.test\n"
             b"Subject: probe\n\nbody\n"),
    # a quoted string or literal never closed: closed at the end by both tokenizers (mailflow refused the first
    # with exit 64 and stored the literal unclosed)
    (["-f", '"al@x.test', 'b@x.test', '"joe@x.test', "bob@[192.0.2.1"], MESSAGE),
    (["-t"], b'To: bob@x.test, "joe@x.test\nSubject: probe\n\nbody\n'),
    # a Resent- field Postfix does not know (header_opts): no resent message, the To is read (mailflow took the
    # Resent-To/Cc/Bcc there were none of, and refused `no recipient addresses found`)
    (["-t"], b"Resent-Comment: c\nTo: a@x.test\nSubject: probe\n\nbody\n"),
    # local parts of words joined by dots, quoted pairs, a route: in Postfix's own quoting (test_quoting_vs_postfix.py)
    (["-f", 'a."b c"@x.test', 'a."b c"@x.test', '"a"."b"@x.test', "joe.@x.test", '"a\\b"@x.test', '"v w"'], MESSAGE),
    (["-t"], b'To: a."b c"@x.test, <"a"."b"@x.test>, joe.@x.test\nCc: <@r1.test:"x y"@x.test>, "a\\b"\n'
             b"Subject: probe\n\nbody\n"),
    # a Resent- field that is no recipient field: Postfix's sendmail goes on taking To/Cc/Bcc (mailflow took the
    # Resent-To/Cc/Bcc of any of cleanup's resent fields, and refused with exit 64)
    (["-t"], b"Resent-From: r@x.test\nTo: a@x.test\nSubject: probe\n\nbody\n"),
    (["-t"], b"Resent-Date: Fri, 04 Dec 2026 12:00:00 +0000\nResent-Message-ID: <m@x.test>\nTo: a@x.test\n\nbody\n"),
    (["-t"], b"Resent-Reply-To: rr@x.test\nTo: a@x.test\n\nbody\n"),
    (["-t"], b"To: a@x.test\nResent-Cc: b@x.test\n\nbody\n"),
]


async def test_recipient_lists_are_read_as_a_real_postfix_reads_them(write_config, tmp_path):
    ran = await each_on_its_own_queue(write_config, tmp_path, RECIPIENT_CASES)
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9"}) as pf:
        for (args, message), (mailflow, maildrop) in zip(RECIPIENT_CASES, ran):
            postfix = subprocess.run(["sendmail", "-C", str(pf.etc), *args], input=message, capture_output=True,
                                     timeout=20)
            assert postfix.returncode == mailflow.returncode == 0, (args, postfix.stderr, mailflow.stderr)
            assert fatal_lines(mailflow.stderr)[:-1] == fatal_lines(postfix.stderr), args  # (the last: no server)
            await eventually(lambda: picked_up(pf), timeout=10, step=0.2, what=f"{args} queued by Postfix")
            [postfix_sender] = [message["sender"] for message in pf.listed()]
            [stored] = [read_maildrop(maildrop / name) for name in maildrop_names(maildrop)]
            assert (stored.sender, sorted(stored.recipients)) == (postfix_sender, sorted(postfix_queued(pf)[0])), args
            pf.run("postsuper", "-d", "ALL")


# The -bs dialogues make more errors than smtpd_soft_error_limit (10): past it both sides wait
# smtpd_error_sleep_time (1 s) before every reply, which changes no reply (tests/e2e/test_sendmail.py times
# mailflow's wait under -bs, tests/component/test_smtpd_protocol.py its smtpd's)
NO_TARPIT = {"error_sleep_time": 0}
NO_TARPIT_PF = {"smtpd_error_sleep_time": "0"}
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


async def bs_replies(command: list[str], dialogue: list[str | bytes]) -> list[str]:
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
    for line in dialogue:
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
                                                             "disable_vrfy_command": False, **NO_TARPIT}, **COMMON)

    async def postfix_side() -> list[str]:
        async with postfix_instance({**COMMON, **NO_TARPIT_PF, "relayhost": "[127.0.0.1]:9", "smtputf8_enable": "yes",
                                     "smtpd_banner": "$myhostname ESMTP probe"}) as pf:
            return await bs_replies(["sendmail", "-C", str(pf.etc)], BS_DIALOGUE)

    postfix, mailflow = await asyncio.gather(  # the two sides share nothing: they run at once
        postfix_side(), bs_replies([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], BS_DIALOGUE))
    offered = [line[4:] for line in postfix[1].splitlines()]
    assert [k for k in offered if k not in ("ETRN", "CHUNKING")] == [k[4:] for k in mailflow[1].splitlines()]
    assert mailflow[:1] + mailflow[2:] == postfix[:1] + postfix[2:]
    # what both did, so that the same change on both sides cannot pass unnoticed
    assert postfix[0] == "220 mx.origin.test ESMTP probe" and postfix[4] == "250 2.1.0 Ok"
    assert postfix[22] == "354 End data with <CR><LF>.<CR><LF>\n250 2.0.0 Ok: queued as ID"
    assert [read_maildrop(tmp_path / "queue" / "maildrop" / name).recipients
            for name in maildrop_names(tmp_path / "queue" / "maildrop")] == [("b@x.test", "c@x.test")]


# RFC 3461 under -bs: each refusal, then a message whose DSN parameters both queue. Two sessions (no tarpit: see
# NO_TARPIT)
DSN_REFUSED_AT_MAIL: list[str | bytes] = [
    "EHLO client.test",
    "MAIL FROM:<a@x.test> RET=FULL RET=HDRS", "MAIL FROM:<a@x.test> RET=bogus", "MAIL FROM:<a@x.test> RET=",
    "MAIL FROM:<a@x.test> RET", "MAIL FROM:<a@x.test> ENVID=a+2", "MAIL FROM:<a@x.test> ENVID=x ENVID=y",
    "MAIL FROM:<a@x.test> ENVID=", "MAIL FROM:<a@x.test> ENVID=a+0Ab",  # (a line feed: not printable)
    "QUIT",
]
DSN_DIALOGUE: list[str | bytes] = [
    "EHLO client.test",
    "MAIL FROM:<a@x.test> NOTIFY=SUCCESS", "MAIL FROM:<a@x.test> RET=HDRS FOO",
    "MAIL FROM:<a@x.test> AUTH=<u@x.test> AUTH=<v@x.test>",
    "MAIL FROM:<a@x.test> ENVID=" + "E" * 130 + "+2Bid RET=hdrs",  # longer than -V takes, as smtpd takes it
    "RCPT TO:<b@x.test> NOTIFY=bogus", "RCPT TO:<b@x.test> NOTIFY=NEVER,SUCCESS", "RCPT TO:<b@x.test> NOTIFY=",
    "RCPT TO:<b@x.test> NOTIFY=SUCCESS NOTIFY=DELAY", "RCPT TO:<b@x.test> ORCPT=bogus",
    "RCPT TO:<b@x.test> ORCPT=rfc822;a+zz", "RSET",  # (errors so far: 8)
    "MAIL FROM:<a@x.test> ENVID=" + "E" * 130 + "+2Bid RET=hdrs",
    "RCPT TO:<b@x.test> ORCPT=rfc822;a@x.test ORCPT=rfc822;b@x.test",
    "RCPT TO:<b@x.test> RET=FULL", "RCPT TO:<b@x.test> NOTIFY=SUCCESS FOO",
    "RCPT TO:<b@x.test> NOTIFY=success,,delay,success ORCPT=rfc822;orig+2Bb@x.test",
    "RCPT TO:<c@x.test> NOTIFY=never", "RCPT TO:<d@x.test> ORCPT=UTF-8;\\x{E9}t\\x{E9}@x.test",
    "RCPT TO:<e@x.test>",
    "DATA\r\nSubject: dsn\r\n\r\nhi\r\n.",
    "QUIT",
]
NOTIFY_FLAGS = {1: "NEVER", 2: "SUCCESS", 4: "FAILURE", 8: "DELAY"}  # Postfix's dsn_mask bits


def postfix_rcpt_dsn(postcat: str) -> list[tuple[str, str, str]]:
    """[(recipient, NOTIFY, ORCPT)] of a queue file as postcat shows it. An ORCPT Postfix made up from the
    recipient itself (rfc822;<recipient>, when none was given) counts as none, as mailflow keeps none; its type as
    the client wrote it, as both keep it."""
    recipients, notify, orcpt = [], "", ""
    for line in postcat.splitlines():
        name, _, value = line.partition(": ")
        attribute, _, attr_value = value.partition("=")
        if name == "named_attribute" and attribute == "notify_flags":
            notify = ",".join(word for bit, word in NOTIFY_FLAGS.items() if int(attr_value) & bit)
        elif name == "named_attribute" and attribute == "dsn_orig_rcpt":
            orcpt = attr_value
        elif name == "recipient":
            recipients.append((value, notify, "" if orcpt == f"rfc822;{value}" else orcpt))
            notify, orcpt = "", ""
    return recipients


def whole_queue_file(pf) -> str:
    """postcat's text of the one message Postfix queued, "" while pickup has yet to take it from the maildrop
    (where it has another queue id: under load postqueue lists it there first) or postcat could not read it whole
    (the file moving between queues)."""
    listed = pf.listed()
    if len(listed) != 1 or listed[0]["queue_name"] == "maildrop":
        return ""
    text = pf.run("postcat", "-q", listed[0]["queue_id"]).stdout.decode()
    return text if "*** MESSAGE FILE END" in text else ""


async def test_bs_takes_dsn_parameters_as_a_real_postfixs_smtpd_does(write_config, tmp_path):
    """DSN under -bs: EHLO offers it, each malformed, repeated or misplaced parameter gets Postfix's reply, and
    the message is queued with the same per-recipient NOTIFY and ORCPT as Postfix queues it. ENVID and RET differ
    (docs/sendmail.md): Postfix's smtpd in stand-alone mode takes them and queues neither (they are written only
    when not stand-alone, smtpd.c mail_open_stream), so its notices lose the ENVID RFC 3461 says they must carry;
    mailflow queues both."""
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": ["127.0.0.1:0"], "banner": "ESMTP probe",
                                                             **NO_TARPIT}, **COMMON)

    async def replies(sendmail: list[str]) -> list[str]:
        return await bs_replies(sendmail, DSN_REFUSED_AT_MAIL) + await bs_replies(sendmail, DSN_DIALOGUE)

    async def postfix_side() -> tuple[list[str], str]:
        async with postfix_instance({**COMMON, **NO_TARPIT_PF, "relayhost": "[127.0.0.1]:9", "smtputf8_enable": "yes",
                                     "smtpd_banner": "$myhostname ESMTP probe"}) as pf:
            postfix = await replies(["sendmail", "-C", str(pf.etc)])
            return postfix, await eventually(lambda: whole_queue_file(pf), timeout=20, step=0.2,
                                             what="queued by Postfix")

    (postfix, postcat), mailflow = await asyncio.gather(  # the two sides share nothing: they run at once
        postfix_side(), replies([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)]))
    assert "250-DSN" in mailflow[1].splitlines()
    assert [r for r in mailflow if "250-" not in r] == [r for r in postfix if "250-" not in r]
    assert postfix[3:5] == ["501 5.5.4 Bad RET parameter syntax"] * 2 and postfix[-2].endswith("queued as ID")
    maildrop = tmp_path / "queue" / "maildrop"
    [stored] = [read_maildrop(maildrop / name) for name in maildrop_names(maildrop)]
    assert (stored.envid, stored.ret) == ("E" * 130 + "+id", "HDRS")
    assert "envelope_id=" not in postcat and "ret_flags=" not in postcat  # (Postfix's: see above; -V, -R write them)
    assert "notify_flags=10" in postcat
    assert list(zip(stored.recipients, stored.recipient_notify(), stored.rcpt_orcpt)) == postfix_rcpt_dsn(postcat) == [
        ("b@x.test", "SUCCESS,DELAY", "rfc822;orig+b@x.test"), ("c@x.test", "NEVER", ""),
        ("d@x.test", "", "UTF-8;\u00e9t\u00e9@x.test"), ("e@x.test", "", "")]


# Error counting under -bs, with small limits on both sides. Junk commands past the junk limit and a recipient
# past recipient_limit beyond the overshoot count (one before does not): the fifth error ends the session with a
# 421 before the next command is read
ERROR_LIMITS = {"soft_error_limit": 2, "hard_error_limit": 5, "junk_command_limit": 2, "recipient_limit": 1,
                "recipient_overshoot_limit": 1}
JUNK_AND_OVERSHOOT = [
    "HELO client.test", "NOOP", "RSET", "VRFY", "NOOP",  # errors: VRFY (its syntax, a junk command), NOOP (junk)
    "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "RCPT TO:<c@x.test>", "RCPT TO:<d@x.test>",  # error 4 (d)
    "RCPT TO:<e@x.test>",  # error 5
    "NOOP",  # never read
]
# a queued message forgives the errors before it: four on each side, and no 421
FORGIVEN = ["BOGUS", "", "STARTTLS", "AUTH PLAIN", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA",
            "Subject: limits", "", "hi", ".", "BOGUS", "", "STARTTLS", "AUTH PLAIN", "QUIT"]


async def bs_transcript(command: list[str], dialogue: list[str]) -> list[str]:
    """The reply lines of a `-bs` session given the whole dialogue at once (`queued as ID` without the id)."""
    proc = await asyncio.create_subprocess_exec(*command, "-bs", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate("".join(f"{line}\r\n" for line in dialogue).encode()), 30)
    assert proc.returncode == 0
    return [re.sub(r"queued as \w+", "queued as ID", line) for line in out.decode().splitlines()]


async def test_bs_counts_errors_and_ends_the_session_at_the_hard_limit_as_a_real_postfixs_smtpd_does(
        write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": ["127.0.0.1:0"], "banner": "ESMTP probe",
                                                             "error_sleep_time": 0, "disable_vrfy_command": False,
                                                             **ERROR_LIMITS}, **COMMON)
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9", "smtpd_banner": "$myhostname ESMTP probe",
                                 "smtputf8_enable": "yes", "smtpd_error_sleep_time": "0",
                                 **{f"smtpd_{name}": str(value) for name, value in ERROR_LIMITS.items()}}) as pf:
        postfix = [await bs_transcript(["sendmail", "-C", str(pf.etc)], dialogue)
                   for dialogue in (JUNK_AND_OVERSHOOT, FORGIVEN)]
    mailflow = [await bs_transcript([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], dialogue)
                for dialogue in (JUNK_AND_OVERSHOOT, FORGIVEN)]
    assert mailflow == postfix
    assert postfix[0][-3:] == ["452 4.5.3 Error: too many recipients"] * 2 + [
        "421 4.7.0 mx.origin.test Error: too many errors"]
    assert "250 2.0.0 Ok: queued as ID" in postfix[1] and postfix[1][-2:] == [
        "503 5.5.1 Error: authentication not enabled", "221 2.0.0 Bye"]


# The smtpd settings that change replies apply under -bs too (Postfix's stand-alone smtpd reads them all): the
# reject footer (its client: Postfix's "localhost[127.0.0.1]", port 0), strict_rfc821_envelopes, the discarded EHLO
# keywords (by the client address too: 127.0.0.1)
BS_SETTINGS = {"reject_footer": r"\nhelp: $client_address [$client] $client_name p=$client_port ${helo_name} s=$sender",
               "strict_rfc821_envelopes": True, "discard_ehlo_keywords": ["pipelining, dsn"],
               "discard_ehlo_keyword_address_maps": ["inline:{ {127.0.0.1 = dsn, smtputf8} }"]}
BS_SETTINGS_PF = {"smtpd_reject_footer": BS_SETTINGS["reject_footer"], "strict_rfc821_envelopes": "yes",
                  "smtpd_discard_ehlo_keywords": "pipelining, dsn",
                  "smtpd_discard_ehlo_keyword_address_maps": "inline:{ {127.0.0.1 = dsn, smtputf8} }"}
SETTINGS_DIALOGUE = ["EHLO client.test", "MAIL FROM:a@x.test", "MAIL FROM:<a@x.test> RET=FULL",
                     "MAIL FROM:<a@x.test> SMTPUTF8", "MAIL FROM:<a@x.test>", "RCPT TO:b@x.test",
                     "RCPT TO:<b@x.test> NOTIFY=NEVER", "RCPT TO:<b@x.test>", "RCPT TO:< b@x.test >",
                     "RCPT TO:<b@x.test (c)>", 'RCPT TO:"Joe"<b@x.test>', "BOGUS", "DATA", "Subject: s", "", "x",
                     ".", "QUIT"]


async def test_bs_applies_the_footer_strict_envelopes_and_discarded_keywords_as_a_real_postfixs_smtpd_does(
        write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": ["127.0.0.1:0"], "banner": "ESMTP probe",
                                                             "disable_vrfy_command": False, **NO_TARPIT, **BS_SETTINGS},
                          **COMMON)
    async with postfix_instance({**COMMON, **NO_TARPIT_PF, **BS_SETTINGS_PF, "relayhost": "[127.0.0.1]:9",
                                 "smtputf8_enable": "yes", "smtpd_banner": "$myhostname ESMTP probe"}) as pf:
        postfix = await bs_transcript(["sendmail", "-C", str(pf.etc)], SETTINGS_DIALOGUE)
    mailflow = await bs_transcript([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)],
                                   SETTINGS_DIALOGUE)
    pf_ehlo, pf_rest = ehlo_split(postfix)
    mf_ehlo, mf_rest = ehlo_split(mailflow)
    assert mf_ehlo == [keyword for keyword in pf_ehlo if keyword not in ("ETRN", "CHUNKING")]
    assert mf_rest == pf_rest
    # what both did, so that the same change on both sides cannot pass unnoticed
    assert "PIPELINING" in pf_ehlo and not {"DSN", "SMTPUTF8"} & set(pf_ehlo)  # the map's list for 127.0.0.1
    assert pf_rest[1:4] == ["501-5.1.7 Bad sender address syntax", "501-5.1.7 ",
                            "501 5.1.7 help: 127.0.0.1 [localhost[127.0.0.1]] localhost p=0 client.test s="]
    assert pf_rest[-2:] == ["250 2.0.0 Ok: queued as ID", "221 2.0.0 Bye"]


def ehlo_split(transcript: list[str]) -> tuple[list[str], list[str]]:
    """(EHLO's keywords, the other lines) of a transcript whose second reply is EHLO's."""
    end = next(i for i, line in enumerate(transcript) if i > 1 and line.startswith("250 "))
    return [line[4:] for line in transcript[2:end + 1]], transcript[:1] + transcript[end + 1:]


async def test_bs_answers_and_logs_ehlo_421_when_the_discard_maps_cannot_answer_as_a_real_postfixs_smtpd_does(
        write_config, tmp_path):
    """The log had `lost connection after EHLO` where Postfix's smtpd writes its table warning (as the session
    starts: for a HELO session too), `don't know what EHLO features to announce` and the NOQUEUE reject line."""
    (tmp_path / "queue").mkdir()
    mail_log = tmp_path / "mail.log"
    config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **COMMON,
                          smtpd={"listen": ["127.0.0.1:0"], "banner": "ESMTP probe",
                                 "discard_ehlo_keyword_address_maps": ["fail:x"]})
    dialogues = [["EHLO client.test", "NOOP"], ["HELO client.test", "NOOP"]]
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9", "smtpd_banner": "$myhostname ESMTP probe",
                                 "smtpd_discard_ehlo_keyword_address_maps": "fail:x"}) as pf:
        await eventually(lambda: "disconnect from" in pf.maillog, timeout=10)  # the instance's readiness probe
        before = len(pf.maillog)
        postfix = [await bs_transcript(["sendmail", "-C", str(pf.etc)], dialogue) for dialogue in dialogues]
        await eventually(lambda: pf.maillog[before:].count("disconnect from") == 2, timeout=10)
        postfix_log = smtpd_lines(pf.maillog[before:])
    mailflow = [await bs_transcript([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], dialogue)
                for dialogue in dialogues]
    mailflow_log = smtpd_lines(mail_log.read_text())
    assert mailflow == postfix
    assert postfix[0] == ["220 mx.origin.test ESMTP probe", "421 4.3.0 mx.origin.test Server local data error"]
    # the table's warning in each one's words (mailflow's smtpd's own), at the same place; the other lines alike
    table_warnings = ('warning: fail:x lookup error for "127.0.0.1"',
                      "warning: discard_ehlo_keyword_address_maps: 127.0.0.1: table fail:x is a fail: table")
    assert [line.startswith(table_warnings) for line in mailflow_log] == [
        line.startswith(table_warnings) for line in postfix_log]
    assert ([line for line in mailflow_log if not line.startswith(table_warnings)]
            == [line for line in postfix_log if not line.startswith(table_warnings)])
    assert postfix_log == [  # what Postfix wrote, so that the same change on both sides cannot pass unnoticed
        "connect from localhost[127.0.0.1]", table_warnings[0],
        "warning: don't know what EHLO features to announce to localhost[127.0.0.1]",
        "NOQUEUE: reject: EHLO from localhost[127.0.0.1]: 421 4.3.0 mx.origin.test Server local data error",
        "disconnect from localhost[127.0.0.1] ehlo=0/1 commands=0/1",
        "connect from localhost[127.0.0.1]", table_warnings[0],
        "lost connection after NOOP from localhost[127.0.0.1]",
        "disconnect from localhost[127.0.0.1] helo=1 noop=1 commands=2"]


# -bs sessions as Postfix's smtpd logs them (no restriction list runs there: no reject lines): a message with
# malformed recipients and an unknown command before it, then the input ends without QUIT; and a session ended at
# hard_error_limit, and one ended there by a message too big (after END-OF-MESSAGE, not DATA)
LOGGED_SESSIONS = [
    ["EHLO client.test", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "RCPT TO:<bad address>", "RCPT TO:<>", "XYZ",
     "DATA", "Subject: logged", "", "hi", ".", "NOOP"],
    ["HELO client.test", "BOGUS", "NOOP", "BOGUS", "BOGUS", "BOGUS", "NOOP"],
    ["EHLO client.test", "MAIL FROM:<a@x.test>", "RCPT TO:<a b>", "RCPT TO:<c d> NOTIFY=NEVER", "RCPT TO:<e f>",
     "RCPT TO:<b@x.test>", "DATA", "Subject: big", "", *["x" * 100] * 30, ".", "NOOP"],
    ["EHLO client.test", "MAIL FROM:<a@x.test>", "RCPT TO:<open@x.test NOTIFY=NEVER", "QUIT"],  # (no warning)
]
LOG_LIMITS = {"hard_error_limit": 4, "error_sleep_time": 0}
LOG_SIZE_LIMIT = 2000  # (Postfix's counts the queue file: its own headers too)


def smtpd_lines(log: str) -> list[str]:
    """smtpd's lines of a log (Postfix's or mailflow's text format), the text after `smtpd[pid]: `, ids masked."""
    lines = [line.split("]: ", 1)[1] for line in log.splitlines() if re.search(r"/smtpd\[\d+\]: ", line)]
    return [re.sub(r"^(warning: )?\S+: (client=|queue file size)", r"\1ID: \2", line) for line in lines]


async def test_bs_sessions_are_logged_as_a_real_postfixs_stand_alone_smtpd_logs_them(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    mail_log = tmp_path / "mail.log"
    config = write_config(tmp_path / "mailflow.toml", log={"file": str(mail_log)}, **COMMON,
                          smtpd={"listen": ["127.0.0.1:0"], "message_size_limit": LOG_SIZE_LIMIT, **LOG_LIMITS})
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9", "message_size_limit": str(LOG_SIZE_LIMIT),
                                 **{f"smtpd_{name}": str(value) for name, value in LOG_LIMITS.items()}}) as pf:
        await eventually(lambda: "disconnect from" in pf.maillog, timeout=10)  # the instance's readiness probe
        before = len(pf.maillog)
        for dialogue in LOGGED_SESSIONS:
            await bs_transcript(["sendmail", "-C", str(pf.etc)], dialogue)
        await eventually(lambda: pf.maillog[before:].count("disconnect from") == len(LOGGED_SESSIONS), timeout=10)
        postfix = smtpd_lines(pf.maillog[before:])
    for dialogue in LOGGED_SESSIONS:
        await bs_transcript([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], dialogue)
    mailflow = smtpd_lines(mail_log.read_text())
    # the message's client= line: Postfix's smtpd writes it at the first accepted RCPT (smtpd_delay_open: its
    # postdrop file made then), mailflow's -bs once the message is stored (its maildrop file's name known then):
    # after the RCPT lines, and only then (a message too big is not stored, its name never known: no client= line,
    # and its `queue file size limit exceeded` is NOQUEUE's, as mailflow's smtpd would log it without a queue id)
    assert [line for line in mailflow if "client=" not in line] == [line for line in postfix if "client=" not in line]
    assert mailflow[3] == postfix[1] == "ID: client=localhost[127.0.0.1]"
    assert "warning: NOQUEUE: queue file size limit exceeded" in mail_log.read_text()
    assert postfix == [  # what Postfix wrote, so that the same change on both sides cannot pass unnoticed
        "connect from localhost[127.0.0.1]", "ID: client=localhost[127.0.0.1]",
        "warning: Illegal address syntax from localhost[127.0.0.1] in RCPT command: <bad address>",
        "warning: Illegal address syntax from localhost[127.0.0.1] in RCPT command: <>",
        "lost connection after NOOP from localhost[127.0.0.1]",
        "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1/3 data=1 noop=1 unknown=0/1 commands=5/8",
        "connect from localhost[127.0.0.1]", "too many errors after UNKNOWN from localhost[127.0.0.1]",
        "disconnect from localhost[127.0.0.1] helo=1 noop=1 unknown=0/4 commands=2/6",
        "connect from localhost[127.0.0.1]",
        *[f"warning: Illegal address syntax from localhost[127.0.0.1] in RCPT command: <{a}>" for a in ("a b", "c d",
                                                                                                          "e f")],
        "ID: client=localhost[127.0.0.1]", "warning: ID: queue file size limit exceeded",
        "too many errors after END-OF-MESSAGE from localhost[127.0.0.1]",
        "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1/4 data=0/1 commands=3/7",
        "connect from localhost[127.0.0.1]",
        "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4"]


# A -bs command line split as smtpd splits one: the verb at space, tab, VT and FF; the argument's edges stripped of
# ASCII white space only (\x1c and U+00A0 are part of it, as to Postfix's smtpd_token)
BS_BLANKS: list[str | bytes] = [
    "EHLO client.test", "NOOP\vx", "MAIL\tFROM:<a@x.test>", "RSET", "MAIL FROM:<a@x.test> SIZE=1\x1c",
    "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>\xa0", 'RCPT TO:<b@x.test> ORCPT=rfc822;"x y"@x.test', "QU\u0131T",
    "QUIT"]


async def test_bs_splits_a_command_line_at_ascii_blanks_as_a_real_postfixs_smtpd_does(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": ["127.0.0.1:0"], **NO_TARPIT}, **COMMON)

    async def postfix_side() -> list[str]:
        async with postfix_instance({**COMMON, **NO_TARPIT_PF, "relayhost": "[127.0.0.1]:9",
                                     "smtputf8_enable": "yes"}) as pf:
            return await bs_replies(["sendmail", "-C", str(pf.etc)], BS_BLANKS)

    postfix, mailflow = await asyncio.gather(
        postfix_side(), bs_replies([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], BS_BLANKS))
    codes = [reply[:3] for reply in postfix]
    assert codes == ["220", "250", "250", "250", "250", "501", "250", "501", "250", "500", "221"], postfix
    assert [reply[:3] for reply in mailflow] == codes, mailflow
