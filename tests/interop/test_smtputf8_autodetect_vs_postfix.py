"""Differential test of smtputf8_autodetect_classes for mail submitted with sendmail: the same messages submitted with
each one's sendmail to a private Postfix 3.7 (its defaults: smtputf8_enable = yes, smtputf8_autodetect_classes =
sendmail, verify) and to mailflow (the same default), each relaying to a peer that offers SMTPUTF8 and to smtp-sink,
which does not. A byte that is not ASCII in a header field (the message's, a MIME part's) makes the message SMTPUTF8:
MAIL FROM says SMTPUTF8 to the first peer, and the second gets nothing, the sender a 5.6.7 notice (Postfix's
cleanup_out_header, then smtp(8); a message/global part's header fields and a type after a comment, as
mime_state reads them, too). 8-bit bytes in a body alone make nothing SMTPUTF8, nor does the From cleanup
adds from a full name that is not ASCII (`-F`, UTF-8 or Latin-1: Postfix writes it past cleanup_out_header).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import eventually, postfix_instance
from tests.support.peers import recording_peer
from tests.support.postfix import smtp_sink

pytestmark = pytest.mark.interop

UTF8 = b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln"
FROM = b"From: %s@notices.test\n"
HEAD = b"To: r@utf.test, r@plain.test\nMessage-ID: <%s@client.test>\n"
PART = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n"
        b"Content-Disposition: attachment; filename=\"" + UTF8 + b".txt\"\n\nfirst\n--b--\n")
# name (the sender's local part): what follows its first header fields
PROBES: dict[str, bytes] = {
    "subject": b"Subject: " + UTF8 + b"\n\nbody\n",
    "latin1": b"Subject: caf\xe9\n\nbody\n",
    "part": b"Subject: plain\n" + PART,
    "body": b"Subject: plain\n\nbody " + UTF8 + b"\n",
    "global": b"Subject: plain\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
              b"Content-Type: message/global\nContent-Transfer-Encoding: 8bit\n\nSubject: " + UTF8
              + b"\n\ninner\n--b--\n",
    "comment": b"Subject: plain\n" + PART.replace(b"multipart/mixed", b"(c) multipart/mixed"),
    "fullname": b"Subject: plain\n\nbody\n",
    "latin1name": b"Subject: plain\n\nbody\n",
}
# the probes without a From, sent with -F: the From cleanup adds (its bytes as given) counts for nothing
FULL_NAMES = {"fullname": "Jos\u00e9 M\u00fcller".encode(), "latin1name": b"Jos\xe9"}
ROUTES = "inline:{{utf.test=smtp:[127.0.0.1]:{}, plain.test=smtp:[127.0.0.1]:{}, notices.test=smtp:[127.0.0.1]:{}}}"
# Postfix's smtp(8) makes the 5.6.7 decision in smtp_helo (smtp_proto.c), so a message sent over a cached session
# never gets it: such a message reaches a peer without SMTPUTF8 (seen with a private 3.7.11). Its sessions are not
# cached here, so that each message is judged; mailflow judges each message, cached session or not.
NO_REUSE = {"smtp_connection_cache_on_demand": "no"}
COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}


def submit(sendmail: list[str]) -> None:
    for name, rest in PROBES.items():
        full_name = FULL_NAMES.get(name)
        message = (b"" if full_name else FROM % name.encode()) + HEAD % name.encode() + rest
        done = subprocess.run([*sendmail, *([b"-F", full_name] if full_name else []), "-f", f"{name}@notices.test",
                               "r@utf.test", "r@plain.test"], input=message, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr


def mail_from(lines: list[bytes]) -> dict[str, set[str]]:
    """Per sender's local part: MAIL FROM's parameters (the sender's only: a notice's null sender is left out)."""
    out = {}
    for line in lines:
        found = re.match(rb"MAIL FROM:<([a-z0-9]+)@notices\.test>(.*)", line)
        if found:
            out[found.group(1).decode()] = set(found.group(2).decode().split())
    return out


def notified(lines: list[bytes]) -> set[str]:
    """The senders a notice went to (RCPT TO after MAIL FROM:<>)."""
    out, null = set(), False
    for line in lines:
        if line.startswith(b"MAIL FROM:"):
            null = line.startswith(b"MAIL FROM:<>")
        elif null and (found := re.match(rb"RCPT TO:<([a-z0-9]+)@notices\.test>", line)):
            out.add(found.group(1).decode())
    return out


def sunk(dump: Path) -> set[str]:
    data = dump.read_bytes() if dump.exists() else b""
    return {m.decode() for m in re.findall(rb"^X-Mail-Args: <([a-z0-9]+)@notices\.test>", data, re.MULTILINE)}


async def run(sendmail: list[str], utf: list[bytes], notices: list[bytes], dump: Path) -> dict:
    submit(sendmail)

    def settled():
        arrived = mail_from(utf)
        done = sunk(dump) | notified(notices)
        return len(arrived) == len(PROBES) and done >= set(PROBES) and {
            "utf peer": {name: "SMTPUTF8" in params for name, params in arrived.items()},
            "plain peer": sunk(dump), "notified": notified(notices)}
    return await eventually(settled, timeout=30)


async def test_sendmail_mail_with_8bit_header_bytes_is_smtputf8_as_a_real_postfix_makes_it(mailflow_server,
                                                                                           write_config, tmp_path):
    async with recording_peer("SMTPUTF8") as (pf_utf, pf_utf_lines), recording_peer("SMTPUTF8") as (
            pf_notices, pf_notice_lines), smtp_sink() as (pf_plain, pf_dump):
        async with postfix_instance({**COMMON, "smtputf8_enable": "yes", "mydestination": "", **NO_REUSE,
                                     "transport_maps": ROUTES.format(pf_utf, pf_plain, pf_notices)}) as pf:
            postfix = await run(["sendmail", "-C", str(pf.etc)], pf_utf_lines, pf_notice_lines, pf_dump)
    async with recording_peer("SMTPUTF8") as (mf_utf, mf_utf_lines), recording_peer("SMTPUTF8") as (
            mf_notices, mf_notice_lines), smtp_sink() as (mf_plain, mf_dump):
        settings = {**COMMON, "mydestination": [], "relay_domains": ["utf.test", "plain.test", "notices.test"],
                    "transport_maps": [ROUTES.format(mf_utf, mf_plain, mf_notices)],
                    "smtp": {"tls_security_level": "none"}}
        await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        mailflow = await run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)], mf_utf_lines,
                             mf_notice_lines, mf_dump)
    assert mailflow == postfix
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert postfix["utf peer"] == {"subject": True, "latin1": True, "part": True, "body": False, "global": True,
                                   "comment": True, "fullname": False, "latin1name": False}
    assert postfix["plain peer"] == {"body", "fullname", "latin1name"}
    assert postfix["notified"] == {"subject", "latin1", "part", "global", "comment"}
