"""Differential test of 8-bit content on the way through: the same messages relayed by a private Postfix (3.7, its
default smtputf8_enable = yes) and by mailflow, each to two smtp-sinks (one offering 8BITMIME, one started with -8;
neither offers SMTPUTF8), must reach them with the same MAIL FROM parameters and the same bytes below the relay's
own Received header.

What decides it in Postfix: smtpd records BODY=8BITMIME or BODY=7BIT as the message's encoding (none when the client
gave no BODY), sendmail -B likewise; cleanup makes it 8bit when a header section (the message's or a MIME part's)
says `Content-Transfer-Encoding: 8bit` or `binary` (auto_8bit_enc_hdr); smtp(8) sends BODY=8BITMIME or BODY=7BIT
to a peer that offers 8BITMIME, and to one that does not converts the parts labelled 8bit to quoted-printable
unless the encoding is 7bit. 8-bit bytes alone mark nothing.

Header fields go byte for byte from both, 8-bit bytes too (Postfix's smtp(8) encodes no header field for a peer
without SMTPUTF8, and its MIME conversion leaves a part's header fields as they are but its label):
test_8bit_header_bytes_reach_peers_as_a_real_postfix_sends_them compares them for UTF-8 and Latin-1 in a Subject, a
From display name and a MIME part's header section.

Documented differences, compared as such: sendmail without -B declares 8-bit content 8BITMIME (docs/sendmail.md;
Postfix's declares nothing); a notice is labelled 8bit only where it has 8-bit bytes (docs/queue.md; Postfix with
smtputf8_enable = yes labels every notice 8bit, and so sends it BODY=8BITMIME), so notices are compared by their top
label, the labels of the returned message, MAIL FROM's parameters and whether the peer got 7-bit content.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postfix import smtp_sink
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
HEAD = (b"From: s@remote.test\r\nTo: r@eight.test\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
        b"Message-ID: <probe@client.test>\r\nSubject: probe: %s\r\n")
MIME = b"MIME-Version: 1.0\r\n"
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"
NESTED = (MIME + b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\n" + TEXT
          + b"\r\nfirst part\r\n--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2\r\n" + TEXT
          + b"Content-Transfer-Encoding: 8bit\r\n\r\nnested, %s\r\n--b2--\r\n--b1--\r\n")
UMLAUTS = b"Gr\xc3\xbc\xc3\x9fe"
PART = (MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n%s"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UMLAUTS + b"\r\n--b--\r\n")
LABELLED = MIME + TEXT + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
# name: (MAIL FROM parameters, what follows the probe's first header fields), sent over SMTP to both peers
SMTP_PROBES: dict[str, tuple[str, bytes]] = {
    "7-bit, no BODY": ("", b"\r\nall 7-bit\r\n"),
    "BODY=8BITMIME, 7-bit": (" BODY=8BITMIME", b"\r\ndeclared, all 7-bit\r\n"),
    "undeclared 8-bit body": ("", b"\r\nundeclared " + UMLAUTS + b"\r\n"),
    "undeclared 8-bit header": ("", b"X-Note: " + UMLAUTS + b"\r\n\r\nundeclared, in a header\r\n"),
    "labelled 8bit, 7-bit": ("", LABELLED + b"labelled, 7-bit\r\n"),
    "labelled 8bit in a nested part, 7-bit": ("", NESTED % b"7-bit"),
    "labelled binary": ("", LABELLED.replace(b"8bit", b"binary") + b"binary " + UMLAUTS + b"\r\n"),
    "BODY=7BIT, 8-bit body": (" BODY=7BIT", b"\r\nsaid 7BIT, " + UMLAUTS + b"\r\n"),
    "BODY=7BIT, labelled 8BIT": (" BODY=7BIT", LABELLED.replace(b"8bit", b"8BIT") + UMLAUTS + b"\r\n"),
    "BODY=8BITMIME, labelled in a nested part": (" BODY=8BITMIME", NESTED % UMLAUTS),
    "labelled 8bit then 7bit": ("", MIME + TEXT + b"Content-Transfer-Encoding: 8bit\r\n"
                                b"Content-Transfer-Encoding: 7bit\r\n\r\n" + UMLAUTS + b"\r\n"),
    "labelled 7bit then 8bit": ("", MIME + TEXT + b"Content-Transfer-Encoding: 7bit\r\n"
                                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UMLAUTS + b"\r\n"),
    "labelled 8bit then unknown": ("", MIME + TEXT + b"Content-Transfer-Encoding: 8bit\r\n"
                                   b"Content-Transfer-Encoding: x-unknown\r\n\r\n" + UMLAUTS + b"\r\n"),
    "labelled 8bit before its type": ("", MIME + b"Content-Transfer-Encoding: 8bit\r\n" + TEXT + b"\r\n"
                                      + UMLAUTS + b"\r\n"),
    "a nested part labelled 7bit then 8bit": ("", (NESTED % UMLAUTS).replace(
        b"Content-Transfer-Encoding: 8bit\r\n",
        b"Content-Transfer-Encoding: 7bit\r\nContent-Transfer-Encoding: 8bit\r\n")),
    # a part's header section ends at its first line that is no field (Postfix's is_header): the label goes there
    "a part's section ended by a From line": ("", PART % b"Content-Type: message/rfc822\r\n\r\nFrom x@y Mon\r\n"),
    "a part's section starting with a blank": ("", PART % b" x\r\n"),
    "a part's section starting with a colon": ("", PART % b":x\r\n"),
    "a part's label then a line that is no field": ("", PART.replace(b"%s", b"").replace(
        b"8bit\r\n\r\n", b"8bit\r\ngarbage line\r\nSubject: s\r\n\r\n")),
    # mime_state descends into message/global (converting: only one in the 7-bit domain), reads a type after a comment
    "a message/global part labelled 8bit": ("", PART % b"Content-Type: message/global\r\n"),
    "a message/global part, 8bit within": ("", PART.replace(b"%sContent-Transfer-Encoding: 8bit\r\n\r\n", (
        b"Content-Type: message/global\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"))),
    "a message/partial part, 8bit within": ("", PART.replace(b"%sContent-Transfer-Encoding: 8bit\r\n\r\n", (
        b"Content-Type: message/partial; id=1\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"))),
    "a type after a comment": ("", PART.replace(b"multipart/mixed", b"(c) multipart/mixed") % b""),
}
# name: (sendmail options, what follows the first header fields), submitted with each one's own sendmail
LOCAL_PROBES: dict[str, tuple[list[str], bytes]] = {
    "sendmail, 7-bit": ([], b"\nfrom sendmail, all 7-bit\n"),
    "sendmail, 8-bit": ([], b"\nfrom sendmail, " + UMLAUTS + b"\n"),
    "sendmail -B 7BIT, 8-bit": (["-B", "7BIT"], b"\nfrom sendmail -B 7BIT, " + UMLAUTS + b"\n"),
}
# name: (sender, MAIL FROM parameters, what follows the first header fields), to a recipient whose delivery fails
# (a third smtp-sink refuses every RCPT); the notice goes to the sender's peer
BOUNCED: dict[str, tuple[str, str, bytes]] = {
    "returned 8-bit, to eight": ("s@eight.test", " BODY=8BITMIME", LABELLED + b"returned " + UMLAUTS + b"\r\n"),
    "returned 8-bit, to seven": ("s@seven.test", " BODY=8BITMIME", LABELLED + b"returned " + UMLAUTS + b"\r\n"),
    "returned 7-bit": ("s@eight.test", "", b"\r\nreturned, all 7-bit\r\n"),
}
ROUTES = "inline:{{eight.test=smtp:[127.0.0.1]:{}, seven.test=smtp:[127.0.0.1]:{}, gone.test=smtp:[127.0.0.1]:{}}}"


def probe(name: str, rest: bytes) -> bytes:
    return HEAD % name.encode() + rest


async def send_probes(port: int) -> None:
    messages = [(name, "s@remote.test", params, ["r@eight.test", "r@seven.test"], rest)
                for name, (params, rest) in SMTP_PROBES.items()]
    messages += [(name, sender, params, ["x@gone.test"], rest) for name, (sender, params, rest) in BOUNCED.items()]
    for name, sender, params, rcpts, rest in messages:
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{sender}>{params}")).code == 250
        for rcpt in rcpts:
            assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(probe(name, rest) + b".\r\n")
        assert (await c.reply()).code == 250, name
        await c.close()


def submit_locally(sendmail: list[str]) -> None:
    for name, (options, rest) in LOCAL_PROBES.items():
        message = probe(name, rest.replace(b"\n", b"\r\n")).replace(b"\r\n", b"\n")
        done = subprocess.run([*sendmail, *options, "-f", "s@remote.test", "r@eight.test", "r@seven.test"],
                              input=message, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr


def arrivals(dump: Path) -> dict[str, tuple]:
    """Per probe: MAIL FROM's arguments after the address, and the message below the relay's Received header; for a
    notice: the arguments, the Content-Transfer-Encoding labels in it (in order) and
    whether it is all 7-bit."""
    out: dict[str, tuple] = {}
    data = dump.read_bytes() if dump.exists() else b""
    for record in data.split(b"X-Client-Addr: ")[1:]:
        mail_args = re.search(rb"^X-Mail-Args: <[^>]*>(.*)$", record, re.MULTILINE)
        found = re.search(rb"^Subject: probe: (.*)$", record, re.MULTILINE)
        if not (mail_args and found):
            continue
        args = mail_args.group(1).decode().strip()
        if record.find(b"\nSubject: probe: ") > record.find(b"\n\n"):  # the probe's notice
            labels = re.findall(rb"^Content-Transfer-Encoding: (.*)$", record, re.MULTILINE | re.IGNORECASE)
            out[found.group(1).decode()] = (args, [label.decode() for label in labels], record.isascii())
        else:
            out[found.group(1).decode()] = (args, below_received(record, 2))
    return out


def below_received(record: bytes, count: int) -> bytes:
    """What follows the first `count` Received fields (the sink's and the relay's)."""
    message = record.split(b"\nReceived: ", 1)[1]
    for _ in range(count):
        message = message.split(b"\n", 1)[1]
        while message[:1] in (b" ", b"\t"):
            message = message.split(b"\n", 1)[1]
        message = message.removeprefix(b"Received: ")
    return message


async def run(port: int, dumps: tuple[Path, Path], sendmail: list[str]) -> dict[str, dict]:
    await send_probes(port)
    submit_locally(sendmail)
    count = len(SMTP_PROBES) + len(LOCAL_PROBES)
    eight = count + sum(sender.endswith("eight.test") for sender, _, _ in BOUNCED.values())
    seven = count + sum(sender.endswith("seven.test") for sender, _, _ in BOUNCED.values())
    return await eventually(lambda: len(arrivals(dumps[0])) == eight and len(arrivals(dumps[1])) == seven
                            and {"eight": arrivals(dumps[0]), "seven": arrivals(dumps[1])}, timeout=30)


async def relay_both(mailflow_server, write_config, tmp_path) -> tuple[dict, dict]:
    """Every probe through a private Postfix and through mailflow: what each one's two peers got."""
    async with smtp_sink() as (pf8, pf8_dump), smtp_sink("-8") as (pf7, pf7_dump), \
            smtp_sink() as (mf8, mf8_dump), smtp_sink("-8") as (mf7, mf7_dump), \
            smtp_sink("-f", "RCPT") as (gone, _):
        async with postfix_instance({**COMMON, "smtputf8_enable": "yes", "mydestination": "",
                                     "transport_maps": ROUTES.format(pf8, pf7, gone)}) as pf:
            postfix = await run(pf.port, (pf8_dump, pf7_dump), ["sendmail", "-C", str(pf.etc)])
        settings = {**COMMON, "mydestination": [], "mynetworks": ["127.0.0.0/8"],
                    "relay_domains": ["eight.test", "seven.test", "gone.test"],
                    "transport_maps": [ROUTES.format(mf8, mf7, gone)], "smtp": {"tls_security_level": "none"}}
        mf = await mailflow_server(**settings)
        config = write_config(tmp_path / "mailflow.toml", **settings)
        mailflow = await run(mf.smtp_addresses[0][1], (mf8_dump, mf7_dump),
                             [sys.executable, "-m", "mailflow", "sendmail", "-C", str(config)])
    return postfix, mailflow


async def test_8bit_content_reaches_peers_as_a_real_postfix_sends_it(mailflow_server, write_config, tmp_path):
    postfix, mailflow = await relay_both(mailflow_server, write_config, tmp_path)
    sendmail_8bit = postfix["eight"].pop("sendmail, 8-bit"), mailflow["eight"].pop("sendmail, 8-bit")
    assert (sendmail_8bit[0][0], sendmail_8bit[1][0]) == ("", "BODY=8BITMIME")  # (documented)
    assert sendmail_8bit[0][1] == sendmail_8bit[1][1]
    for peer in ("eight", "seven"):
        for name in [*SMTP_PROBES, *LOCAL_PROBES]:
            if name in postfix[peer]:
                assert mailflow[peer][name] == postfix[peer][name], (peer, name)
    for peer, name in (("eight", "returned 8-bit, to eight"), ("seven", "returned 8-bit, to seven")):
        (pf_args, pf_labels, pf_ascii), (mf_args, mf_labels, mf_ascii) = postfix[peer][name], mailflow[peer][name]
        assert (mf_args, mf_labels[0], mf_labels[-2:], mf_ascii) == (pf_args, pf_labels[0], pf_labels[-2:], pf_ascii)
    assert postfix["eight"]["returned 8-bit, to eight"][0] == "BODY=8BITMIME"
    assert postfix["seven"]["returned 8-bit, to seven"][1:] == (["7bit", "quoted-printable", "7bit",
                                                                 "quoted-printable"], True)
    assert postfix["eight"]["returned 7-bit"][:2] == ("BODY=8BITMIME", ["8bit"] * 3)  # (documented)
    assert mailflow["eight"]["returned 7-bit"][:2] == ("", ["7bit", "7bit"])
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    eight = {name: arrived[0] for name, arrived in postfix["eight"].items()}
    assert eight["7-bit, no BODY"] == eight["undeclared 8-bit body"] == ""
    assert eight["labelled 8bit in a nested part, 7-bit"] == eight["BODY=7BIT, labelled 8BIT"] == "BODY=8BITMIME"
    assert eight["BODY=7BIT, 8-bit body"] == eight["sendmail -B 7BIT, 8-bit"] == "BODY=7BIT"
    assert b"Content-Transfer-Encoding: quoted-printable\n\nGr=C3=BC=C3=9Fe\n" in postfix["seven"][
        "BODY=7BIT, labelled 8BIT"][1]


# name: (MAIL FROM parameters, the message), each sent over SMTP to r@eight.test and r@seven.test; the name is the
# Message-ID's local part
UTF8, LATIN1 = b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln", b"caf\xe9 cr\xe8me"
DATED = b"To: r@eight.test\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <%s@client.test>\r\n"
ATTACHED = (MIME + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain; charset=utf-8; name=\"" + UTF8 + b".txt\"\r\n"
            b"Content-Disposition: attachment; filename=\"" + LATIN1 + b".txt\"\r\nX-Note: " + UTF8 + b"\r\n"
            b"Content-Transfer-Encoding: %s\r\n\r\n" + UMLAUTS + b" inside\r\n--b--\r\n")
HEADER_PROBES: dict[str, tuple[str, bytes]] = {
    "utf8-subject": ("", b"From: s@remote.test\r\nSubject: " + UTF8 + b"\r\n\r\nbody\r\n"),
    "latin1-subject-folded": ("", b"From: s@remote.test\r\nSubject: " + LATIN1 + b"\r\n\t" + UTF8
                              + b"\r\n\r\nbody\r\n"),
    "utf8-from": (" BODY=8BITMIME", b"From: Jos\xc3\xa9 M\xc3\xbcller <s@remote.test>\r\nSubject: plain\r\n\r\n"
                  + UMLAUTS + b"\r\n"),
    "latin1-from": ("", b"From: \"Jos\xe9\" <s@remote.test>\r\nSubject: plain\r\n\r\nbody\r\n"),
    "part-header-8bit": ("", b"From: s@remote.test\r\nSubject: " + UTF8 + b"\r\n" + ATTACHED % b"8bit"),
    "part-header-unlabelled": ("", b"From: s@remote.test\r\nSubject: plain\r\n"
                               + (ATTACHED % b"7bit").replace(b"Content-Transfer-Encoding: 7bit\r\n", b"")),
    # an attached message labelled 8bit whose own header fields have 8-bit bytes (only its label is converted)
    "attached-message-8bit": ("", b"From: s@remote.test\r\nSubject: plain\r\n" + MIME
                              + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                              b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                              b"From: Jos\xc3\xa9 <j@inner.test>\r\nSubject: " + LATIN1 + b"\r\n" + TEXT
                              + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UMLAUTS + b" inside\r\n--b--\r\n"),
    # a Subject line of 1521 bytes, 8-bit (past RFC 5322's 998: broken into a continuation line, not encoded)
    "long-8bit-subject": ("", b"From: s@remote.test\r\nSubject: " + (UTF8 + b" ") * 84 + b"\r\n\r\nbody\r\n"),
}


def header_arrivals(dump: Path) -> dict[str, tuple[str, bytes]]:
    """Per header probe: MAIL FROM's arguments after the address, and the message's bytes below the relay's Received
    field (the sink writes its lines with LF)."""
    out = {}
    for record in (dump.read_bytes() if dump.exists() else b"").split(b"X-Client-Addr: ")[1:]:
        mail_args = re.search(rb"^X-Mail-Args: <[^>]*>(.*)$", record, re.MULTILINE)
        name = re.search(rb"^Message-ID: <([a-z0-9-]+)@client\.test>$", record, re.MULTILINE)
        if mail_args and name:
            out[name.group(1).decode()] = (mail_args.group(1).decode().strip(), below_received(record, 2))
    return out


async def relay_header_probes(port: int, dumps: tuple[Path, Path]) -> dict[str, dict]:
    for name, (params, message) in HEADER_PROBES.items():
        c = await SmtpClient.connect(port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<s@remote.test>{params}")).code == 250
        for rcpt in ("r@eight.test", "r@seven.test"):
            assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(DATED % name.encode() + message + b".\r\n")
        assert (await c.reply()).code == 250, name
        await c.close()
    return await eventually(lambda: all(len(header_arrivals(d)) == len(HEADER_PROBES) for d in dumps) and {
        "eight": header_arrivals(dumps[0]), "seven": header_arrivals(dumps[1])}, timeout=30)


async def test_8bit_header_bytes_reach_peers_as_a_real_postfix_sends_them(mailflow_server):
    """To a peer offering 8BITMIME without SMTPUTF8 (smtp-sink) and to one offering neither (smtp-sink -8), a message
    that did not come with SMTPUTF8 keeps its 8-bit header bytes, UTF-8 or Latin-1, in a Subject (folded too), a From
    display name and a MIME part's header section: Postfix 3.7's smtp(8) encodes none of them (smtp_proto.c: 'XXX
    Should we try to encode headers with RFC 2047 when delivering to a non-SMTPUTF8 server?'), and its conversion
    for a peer without 8BITMIME changes a part's label and body only (mime_state.c). mailflow made them RFC 2047
    words, which broke every DKIM signature made upstream over such a field."""
    async with smtp_sink() as (pf8, pf8_dump), smtp_sink("-8") as (pf7, pf7_dump), \
            smtp_sink() as (mf8, mf8_dump), smtp_sink("-8") as (mf7, mf7_dump):
        routes = "inline:{{eight.test=smtp:[127.0.0.1]:{}, seven.test=smtp:[127.0.0.1]:{}}}"
        async with postfix_instance({**COMMON, "smtputf8_enable": "yes", "mydestination": "",
                                     "transport_maps": routes.format(pf8, pf7)}) as pf:
            postfix = await relay_header_probes(pf.port, (pf8_dump, pf7_dump))
        mf = await mailflow_server(**COMMON, mydestination=[], mynetworks=["127.0.0.0/8"],
                                   relay_domains=["eight.test", "seven.test"],
                                   transport_maps=[routes.format(mf8, mf7)], smtp={"tls_security_level": "none"})
        mailflow = await relay_header_probes(mf.smtp_addresses[0][1], (mf8_dump, mf7_dump))
    for peer in ("eight", "seven"):
        for name in HEADER_PROBES:
            assert mailflow[peer][name] == postfix[peer][name], (peer, name)
    # what Postfix did, so that the same mistake on both sides cannot pass unnoticed
    assert b"\nSubject: " + LATIN1 + b"\n\t" + UTF8 + b"\n" in postfix["seven"]["latin1-subject-folded"][1]
    assert postfix["seven"]["utf8-from"][1].startswith(b"To: r@eight.test\n")
    assert b"\nFrom: Jos\xc3\xa9 M\xc3\xbcller <s@remote.test>\n" in postfix["seven"]["utf8-from"][1]
    assert postfix["eight"]["utf8-from"][0] == "BODY=8BITMIME"
    long_lines = postfix["seven"]["long-8bit-subject"][1].split(b"\n")  # broken at smtp_line_length_limit (998)
    assert len(max(long_lines, key=len)) == 998 and long_lines[long_lines.index(max(long_lines, key=len)) + 1][:1] in (
        b" ", b"\t")
    assert b"\nSubject: " + LATIN1 + b"\n" in postfix["seven"]["attached-message-8bit"][1]
    converted = postfix["seven"]["part-header-8bit"][1]
    assert (b"filename=\"" + LATIN1 + b".txt\"\nX-Note: " + UTF8 + b"\nContent-Transfer-Encoding: quoted-printable"
            b"\n\nGr=C3=BC=C3=9Fe inside\n") in converted, converted
