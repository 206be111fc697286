"""Differential test of what cleanup adds to a message that lacks it, against a real Postfix 3.7: the same messages
to a private Postfix and to mailflow configured alike, each relaying to its own smtp-sink, from an SMTP client on
this host (local_header_rewrite_clients' default) and from each one's own sendmail (a local submission).

What is compared per message: the names of the header fields below the Received header (in order, without case:
Postfix writes `Message-Id`), the From or Resent-From added (Postfix's `From: address`; `From: MAILER-DAEMON` for
the null sender, unqualified; a local user's full name before the address), the form of the Message-ID added
(`<YYYYMMDDhhmmss.QUEUEID@myhostname>`), and whether the Received header has a `for` clause. The dates themselves
are not compared (Postfix pads the day with a space and adds the zone's name as a comment).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.message import header_names, header_value, split_header
from tests.support.postfix import smtp_sink
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
# (envelope sender, header fields) sent over SMTP; each is one message to r@x.test
SMTP_PROBES = [
    ("s@remote.test", "Subject: probe-0\r\n"),
    ("", "Subject: probe-1\r\n"),
    ("s@remote.test", "Subject: probe-2\r\nResent-To: t@x.test\r\nFrom: a@b.test\r\n"),
]
# (sendmail arguments, message) submitted locally
LOCAL_PROBES: list[tuple[list, bytes]] = [
    (["-f", "s@remote.test", "r@x.test"], b"Subject: probe-3\n\nx\n"),
    (["-f", "", "r@x.test"], b"Subject: probe-4\n\nx\n"),
    # -F full names (the From added): UTF-8 with two blanks, Latin-1 bytes, `%`, specials and quotes, `|` and a
    # control character, blanks only (a UTF-8 sender's is in tests/unit/test_cleanup_headers.py: smtp-sink offers no
    # SMTPUTF8, which mailflow's smtp client asks for such a sender)
    (["-F", "Jos\u00e9  M\u00fcller", "-f", "s@remote.test", "r@x.test"], b"Subject: probe-5\n\nx\n"),
    ([b"-F", b"Jos\xe9 Caf\xe9", b"-f", b"s@remote.test", b"r@x.test"], b"Subject: probe-6\n\nx\n"),
    (["-F", "50% off", "-f", "s@remote.test", "r@x.test"], b"Subject: probe-7\n\nx\n"),
    (["-F", 'Ann "A." \\ (x)', "-f", "s@remote.test", "r@x.test"], b"Subject: probe-8\n\nx\n"),
    (["-F", "a | b  c\x01d", "-f", "s@remote.test", "r@x.test"], b"Subject: probe-9\n\nx\n"),
    (["-F", "  ", "-f", "s@remote.test", "r@x.test"], b"Subject: probe-10\n\nx\n"),
]
ADDED = ("from", "resent-from")


async def send_probes(port: int) -> None:
    for sender, head in SMTP_PROBES:
        client = await SmtpClient.connect(port)
        assert (await client.cmd("EHLO client.test")).code == 250
        assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
        assert (await client.cmd("RCPT TO:<r@x.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        assert (await client.cmd(f"{head}\r\nx\r\n.")).code == 250
        await client.close()


def submit_locally(sendmail: list[str]) -> None:
    for args, message in LOCAL_PROBES:
        done = subprocess.run([*sendmail, *args], input=message, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr


def arrivals(dump: Path, hostname: str = COMMON["myhostname"]) -> dict[int, tuple]:
    """Per probe: (header names below this host's Received, the From/Resent-From added, the Message-ID's form,
    whether this host's Received has a `for` clause)."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if not subject:
            continue
        head, _ = split_header(message.split("\n", 5)[5].replace("\n", "\r\n").encode())
        names = header_names(head)
        received = re.findall(r"^Received: (.*(?:\n[ \t].*)*)", message, re.MULTILINE)
        ours = [v for v in received if f"by {hostname} " in v][0]
        ids = [header_value(head, n) for n in ("message-id", "resent-message-id") if header_value(head, n)]
        form = [re.sub(r"^<\d{14}\.[0-9A-F]+@", "<STAMP.QUEUEID@", i) for i in ids]
        out[int(subject.group(1))] = (names[names.index("received", 1) + 1:],
                                      {n: header_value(head, n) for n in ADDED if header_value(head, n)}, form,
                                      "\n\tfor <" in ours or " for <" in ours)
    return out


def added_from_bytes(dump: Path) -> dict[int, bytes]:
    """Per probe: the From line as the sink got it, byte for byte."""
    data = dump.read_bytes() if dump.exists() else b""
    out = {}
    for message in data.split(b"X-Client-Addr:")[1:]:
        subject, line = re.search(rb"^Subject: probe-(\d+)", message, re.M), re.search(rb"^From: .*$", message, re.M)
        if subject and line:
            out[int(subject.group(1))] = line.group(0)
    return out


async def run(port: int, dump: Path, sendmail: list) -> tuple[dict[int, tuple], dict[int, bytes]]:
    await send_probes(port)
    submit_locally(sendmail)
    count = len(SMTP_PROBES) + len(LOCAL_PROBES)
    arrived = await eventually(lambda: len(arrivals(dump)) == count and arrivals(dump), timeout=20)
    return arrived, added_from_bytes(dump)


async def test_missing_header_fields_are_added_as_a_real_postfix_adds_them(mailflow_server, write_config, tmp_path):
    async with smtp_sink() as (pf_sink, pf_dump), smtp_sink() as (mf_sink, mf_dump):
        async with postfix_instance({**COMMON, "relayhost": f"[127.0.0.1]:{pf_sink}"}) as pf:
            postfix = await run(pf.port, pf_dump, ["sendmail", "-C", str(pf.etc)])
        settings = {**COMMON, "relayhost": f"[127.0.0.1]:{mf_sink}", "relay_domains": ["x.test"]}
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        mailflow = await run(mf.smtp_addresses[0][1], mf_dump, [sys.executable, "-m", "mailflow", "sendmail", "-C",
                                                                str(config)])
    (postfix, pf_from), (mailflow, mf_from) = postfix, mailflow
    assert mailflow == postfix
    assert mf_from == pf_from
    # what both did, so that the same change on both sides cannot pass unnoticed
    assert postfix[0] == (["subject", "message-id", "date", "from"], {"from": "s@remote.test"},
                          ["<STAMP.QUEUEID@mx.origin.test>"], True)
    assert postfix[1][1] == postfix[4][1] == {"from": "MAILER-DAEMON"}
    assert postfix[2][:2] == (["subject", "resent-to", "from", "resent-message-id", "resent-date", "resent-from"],
                              {"from": "a@b.test", "resent-from": "s@remote.test"})
    assert postfix[3][1] == {"from": "root <s@remote.test>"}
    assert not postfix[3][3] and not postfix[4][3]  # pickup's Received names no recipient (it may be a Bcc)
    assert pf_from[6] == b"From: Jos\xe9 Caf\xe9 <s@remote.test>"  # raw bytes, as given (not RFC 2047)
