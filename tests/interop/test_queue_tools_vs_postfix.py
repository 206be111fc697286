"""Differential test of the operator's queue listing: a private Postfix (long queue ids, like mailflow's) and mailflow
take the same mail, relayed to the same closed port on 127.0.0.1 (so it is deferred, "Connection refused") and one
message held by an smtpd HOLD restriction; then what a script parsing `postqueue -p` sees must be what it sees in
`mailflow mailq`: the heading line, the columns, the `!` mark, the null sender, the reason lines, the recipients and
the footer; and what a script reading `postqueue -j` sees in `mailflow mailq -j`: the same field names, order and
types, the same values but for the queue id, the arrival time and the size.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

from tests.support import eventually, free_port, postfix_instance, require_tool, send
from tests.support.postfix import postqueue_listed

pytestmark = pytest.mark.interop

HOUR = {"queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "1h"}
MAIL = [("alice@src.test", ["bob@dest.test", "carol@dest.test"]),
        ("", ["notice@dest.test"]),
        ("dave@src.test", ["held@dest.test"]),
        ("list@src.test", [f"member@d{n:02}.test" for n in range(1, 23)])]  # more domains than a screen's 20
BODY = b"Subject: queue tools\r\n\r\nhello\r\n"


async def submit(port: int) -> None:
    for sender, rcpts in MAIL:
        refused, _ = await send(port, sender, rcpts, BODY)
        assert refused == {}


async def mailflow_cli(config, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailflow", *args, "-c", str(config), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode, out.decode(), err.decode()


def tried(messages: list[dict]) -> bool:
    """Every message not on hold has been tried: each of its recipients has a reason."""
    return len(messages) == len(MAIL) and all(
        m["queue_name"] == "hold" or (m["queue_name"] == "deferred" and all(r.get("delay_reason")
                                                                            for r in m["recipients"]))
        for m in messages)


def entries(mailq: str) -> tuple[str, dict[str, list[str]], str]:
    """(heading, {sender: the entry's lines with the first one's id, size and time checked and taken out}, footer)
    after checking the columns of postqueue's long-id layout ("%-17s %8ld %19.19s %s")."""
    lines = mailq.splitlines()
    heading, footer = lines[0], lines[-1]
    by_sender = {}
    for block in "\n".join(lines[1:-1]).strip("\n").split("\n\n"):
        first, *rest = block.split("\n")
        assert re.fullmatch(r"[0-9A-Za-z]{12,16}[*!]? *", first[:18]), first
        assert re.fullmatch(r" *\d+ ", first[18:27]) and first[26:27] == " ", first
        assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d ", first[27:47]), first
        mark = first[:17].rstrip()[-1] if first[:17].rstrip()[-1] in "*!" else ""
        by_sender[first[47:]] = [mark, *rest]
    return heading, by_sender, footer


@pytest.fixture
async def twins(mailflow_server, write_config, tmp_path):
    """A private Postfix and mailflow, each holding MAIL, tried (deferred) or held: (the Postfix, mailflow's
    configuration file)."""
    closed = free_port()
    postfix_cf = {"relayhost": f"[127.0.0.1]:{closed}", "enable_long_queue_ids": "yes",
                  "smtpd_recipient_restrictions":
                      "check_recipient_access inline:{held@dest.test=HOLD}, permit_mynetworks, reject"}
    settings = {"relayhost": f"[127.0.0.1]:{closed}", "mynetworks": ["127.0.0.0/8"], "queue": HOUR,
                "smtpd": {"recipient_restrictions": ["check_recipient_access inline:{held@dest.test=HOLD}"]}}
    async with postfix_instance(postfix_cf) as pf:
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        await submit(pf.port)
        await submit(mf.smtp_addresses[0][1])

        def postfix_tried():
            return tried(pf.listed())

        async def mailflow_tried():
            rc, out, _ = await mailflow_cli(config, "queue", "list", "--json")
            return rc == 0 and tried([{"queue_name": m["queue"], "recipients": [
                {"delay_reason": r["reason"]} for r in m["recipients"]]} for m in json.loads(out)])

        await eventually(postfix_tried, timeout=15, step=0.2, what="Postfix tried its mail")
        await eventually(mailflow_tried, timeout=15, step=0.2, what="mailflow tried its mail")
        yield pf, config


async def test_mailq_reads_like_postqueue_p(twins):
    pf, config = twins
    expected = pf.run("postqueue", "-p")
    rc, out, err = await mailflow_cli(config, "mailq")
    assert (rc, err) == (expected.returncode, "")
    postfix_heading, postfix_entries, postfix_footer = entries(expected.stdout.decode())
    heading, listed, footer = entries(out)
    assert heading == postfix_heading
    assert listed == postfix_entries
    assert re.fullmatch(r"-- \d+ Kbytes in 4 Requests\.", footer) and footer == postfix_footer

    expected = pf.run("postqueue", "-j")
    rc, out, err = await mailflow_cli(config, "mailq", "-j")
    assert (rc, err) == (expected.returncode, "")
    for text in (out, expected.stdout.decode()):
        assert text.endswith("}\n") and "\n\n" not in text  # a JSON object a line, each line ended
    ours = [json.loads(line) for line in out.splitlines()]
    assert len({m["queue_id"] for m in ours}) == len(ours) == len(MAIL)  # (one read: a message twice is a fault)
    assert postqueue_json(ours) == postqueue_json(postqueue_listed(expected.stdout))  # (showq's reads: each once)

    pf.run("postsuper", "-d", "ALL").check_returncode()
    assert pf.run("postqueue", "-p").stdout.decode() == "Mail queue is empty\n"
    await mailflow_cli(config, "queue", "delete", "ALL")
    assert await mailflow_cli(config, "mailq") == (0, "Mail queue is empty\n", "")
    assert pf.run("postqueue", "-j").stdout == b""
    assert await mailflow_cli(config, "mailq", "-j") == (0, "", "")


async def test_a_word_after_all_that_names_no_queue_is_refused_by_name(twins):
    """`postsuper -d ALL deferd` (a typo for deferred) refuses the word by name and deletes nothing; so does
    `mailflow queue delete ALL deferd` (exit 2, a bad command line), rather than blaming ids mixed with ALL."""
    pf, config = twins
    expected = pf.run("postsuper", "-d", "ALL", "deferd")
    assert expected.returncode == 1 and b"invalid directory name: deferd" in expected.stderr
    rc, out, err = await mailflow_cli(config, "queue", "delete", "ALL", "deferd")
    assert (rc, out) == (2, "") and "with ALL come queue names only" in err and "not 'deferd'" in err
    assert len(pf.listed()) == len(MAIL)
    rc, out, _ = await mailflow_cli(config, "mailq", "-j")
    assert rc == 0 and len(out.splitlines()) == len(MAIL)


async def test_show_parts_read_like_postcat(twins):
    """postcat -q's -b, -h and -e choose the parts of a message, and scripts use them: `postcat -bq ID` is the body
    alone (from the empty line after the headers), `-hq` the header fields alone, `-bhq` the message as queued,
    all without postcat's `*** ... ***` lines, which come with the envelope (-e). `mailflow queue show` with the
    same letters prints the same parts of the same message (the header fields each server added are its own: their
    names and order are compared), and exits as postcat does, also for an id that is not queued."""
    pf, config = twins
    postfix_id = sent_by("alice@src.test", pf.listed())
    ours = (await mailflow_cli(config, "mailq", "-j"))[1]
    mailflow_id = sent_by("alice@src.test", [json.loads(line) for line in ours.splitlines()])

    def postcat(*flags: str, queue_id: str = postfix_id) -> tuple[int, str, str]:
        done = pf.run("postcat", *flags, "-q", queue_id)
        return done.returncode, done.stdout.decode(), ""

    assert await mailflow_cli(config, "queue", "show", "-b", mailflow_id) == postcat("-b") == (0, "\nhello\n", "")
    for flags in ("-h", "-bh"):
        rc, out, err = await mailflow_cli(config, "queue", "show", flags, mailflow_id)
        expected = postcat(flags)
        assert (rc, err) == (expected[0], "") and message_form(out) == message_form(expected[1]), flags
    assert message_form(postcat("-bh")[1]) == (["received", "subject", "message-id", "date", "from"], "hello\n")
    for flags in ("-e", "-eb"):
        rc, out, _ = await mailflow_cli(config, "queue", "show", flags, mailflow_id)
        expected = postcat(flags)[1]
        for text in (out, expected):
            assert text.startswith("*** ENVELOPE RECORDS ")
            assert re.search(r"\n\*\*\* MESSAGE FILE END \S+ \*\*\*\n$", text)
            assert ("\nhello\n" in text) == (flags == "-eb") and "Subject:" not in text
    rc, _, err = await mailflow_cli(config, "queue", "show", "-b", "0000000000000000")
    assert rc == postcat("-b", queue_id="0000000000000000")[0] == 1 and "no such message" in err


def sent_by(sender: str, listed: list[dict]) -> str:
    """The queue id of the message from `sender` among postqueue -j's messages."""
    [queue_id] = [m["queue_id"] for m in listed if m["sender"] == sender]
    return queue_id


def message_form(text: str) -> tuple[list[str], str | None]:
    """A message's text as two servers' copies agree on it: the names of its header fields in order (lower case;
    folded lines left out), and its body after the empty line (None when the text has no body part)."""
    head, blank, body = text.partition("\n\n")
    names = [line.split(":", 1)[0].lower() for line in head.splitlines() if line and not line[0].isspace()]
    assert "***" not in text
    return names, body if blank else None


def postqueue_json(messages: list[dict]) -> dict[str, tuple]:
    """postqueue -j's messages -> {sender: (its keys in order, each value's type, the values that must agree)}."""
    return {m["sender"]: (list(m), [type(v).__name__ for v in m.values()],
                          {k: v for k, v in m.items() if k not in ("queue_id", "arrival_time", "message_size")})
            for m in messages}


async def test_shape_reads_like_qshape(twins):
    pf, config = twins
    for options, queues in (([], []), ([], ["deferred"]), ([], ["hold"]), (["-s"], ["deferred"]),
                            (["-s"], ["deferred,hold"])):
        expected = pf.run("qshape", *options, *(queues[0].split(",") if queues else []))
        rc, out, err = await mailflow_cli(config, "queue", "shape", *options,
                                          *(["--queue", *queues] if queues else []))
        assert (rc, err) == (expected.returncode, "")
        assert shape_table(out) == shape_table(expected.stdout.decode()), (options, queues)


def shape_table(text: str) -> tuple[list[str], set[str]]:
    """qshape's table: (the heading and TOTAL lines, the domain lines; the order among equal totals is Perl's hash
    order)."""
    lines = text.splitlines()
    return lines[:2], set(lines[2:])


ABSENT = "0000000000000000"  # well formed, in no queue
MALFORMED = "bad-id!"


async def test_ids_that_are_not_queued_exit_as_postfixs_tools_do(mailflow_server, write_config, tmp_path):
    """Each id-taking command given a well-formed id in no queue, a word that is no queue id, or ALL on an empty
    queue, exits as its Postfix tool does (3.7.11): postsuper -d/-h/-H/-r warn about a bad id ("invalid mail
    queue id") and exit 0; postqueue -i refuses one ("Cannot flush queue ID - invalid name", 69, EX_UNAVAILABLE),
    where `flush` warned and exited 0; postcat -q exits 1 for both ("bad mail queue ID", "open queue file"), where
    `show` exited 2 for a bad one."""
    settings = {"queue": HOUR}
    await mailflow_server(**settings)
    config = write_config(tmp_path / "mailflow.toml", **settings)
    postsuper_flags = {"delete": "-d", "hold": "-h", "release": "-H", "requeue": "-r"}
    async with postfix_instance() as pf:
        for command, flag in postsuper_flags.items():
            for arg in (ABSENT, MALFORMED, "ALL"):
                expected = pf.run("postsuper", flag, arg)
                rc, out, err = await mailflow_cli(config, "queue", command, arg)
                assert (rc, out) == (expected.returncode, f"{command}: 0 messages\n") == (0, out), (command, arg)
                assert ("invalid mail queue id" in expected.stderr.decode()) == (arg == MALFORMED)
                assert ("is not a queue id" in err) == (arg == MALFORMED), err
        for arg in (ABSENT, MALFORMED):
            expected = pf.run("postqueue", "-i", arg)
            rc, out, err = await mailflow_cli(config, "queue", "flush", arg)
            assert rc == expected.returncode == (69 if arg == MALFORMED else 0), (arg, expected.stderr)
            assert out == ("" if arg == MALFORMED else "flush: 0 messages\n")
            if arg == MALFORMED:
                assert b"Cannot flush queue ID - invalid name" in expected.stderr
                assert err == f"mailflow queue flush: cannot flush: {MALFORMED!r} is not a queue id\n"
            expected = subprocess.run([require_tool("sendmail"), "-C", str(pf.etc), f"-qI{arg}"], capture_output=True,
                                      timeout=20)
            ours = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), f"-qI{arg}"],
                                  capture_output=True, timeout=20)
            assert (ours.returncode, ours.stdout) == (expected.returncode, b"") and ours.returncode == (
                69 if arg == MALFORMED else 0), (arg, ours.stderr)  # (sendmail -qI is postqueue -i)

            expected = pf.run("postcat", "-q", arg)
            rc, out, err = await mailflow_cli(config, "queue", "show", arg)
            assert (rc, out) == (expected.returncode, expected.stdout.decode()) == (1, ""), (arg, expected.stderr)
            assert ("bad mail queue ID" in expected.stderr.decode()) == ("is not a queue id" in err) == (
                arg == MALFORMED), err
