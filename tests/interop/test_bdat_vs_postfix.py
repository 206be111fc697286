"""Differential test of CHUNKING (RFC 3030, BDAT) against a private Postfix 3.7.11: the same dialogues to both,
each server relaying to a capture peer of its own (which keeps the bytes it is sent), compared per dialogue: every
reply (a queue id masked) and what was delivered (the MAIL parameters but SIZE, the content with the Received field
each server adds, its generated Message-ID and Date masked).

From 127.0.0.1, a client in mynetworks and so in both servers' smtpd_forbid_bare_newline_exclusions: Postfix 3.7.11
as it ships (smtpd_forbid_bare_newline = no, cleanup_replace_stray_cr_lf = yes), mailflow as configured by default
(a bare LF taken, a stray CR mended as Postfix mends it: mailflow.stray_cr). Covered: bare LF, a CR ending a chunk
and the LF starting the next, NUL, a last line without CRLF, lines of 997 and 998 octets (999 and 1000 with their
CRLF), 2047-2049 and 5000, one of 4096 without its line end, a CR at the 2048-octet cut, a "." line (no
dot-stuffing), 8-bit bytes with and without BODY=8BITMIME, BODY=BINARYMIME (not offered by either: MAIL refused),
BDAT 0 LAST alone and after a chunk, BDAT 0, BDAT without MAIL or without an accepted RCPT, after a refused
DATA, DATA between chunks, sizes non-numeric, negative, `+5`, with leading zeros, 2^64, 2^63 (malformed: 521 and
the end), no size, three words, `last` in lower case, tab-separated words, a chunk past message_size_limit
declared and accumulated, SIZE= smaller than the chunks, several chunks in one write, a command after a chunk in
the same write, RSET and QUIT between chunks, a client half-closing in a chunk, after one and after LAST, a chunk
split in a header name, the header/body boundary across chunks (its CR in one chunk and LF in the next), an mbox
`From ` first line (not labelled, as Postfix: BDAT is not DATA); stray CRs (STRAY_CR: a space, the CRs before a
LF dropped, `a<CR><CR><LF>` stored `a`), in a header field, in the header/body blank line, at a chunk's end, at the
content's end, at the 2048-octet cut (the first of `<CR><CR><LF>` ending a full record: a space).

Differences kept (KEPT, each mailflow's reply asserted, and Postfix's and what it delivered, to see that it still
differs):
- a NUL: `554 5.6.0` (docs/security.md: message_reject_characters = \\0), Postfix takes it;
- a header section larger than header_size_limit: `552 5.3.4` (docs/config.md), Postfix takes it;
- KEPT_CONTENT: a CR at the 2048-octet cut that ends a chunk, the next chunk starting with CR LF: Postfix drops
  it (its BDAT reader peeks one octet past the chunk's end, finds a CR, then the LF: `<CR><CR><LF>`, all
  stripped), where its DATA, and mailflow in both, store the space of a full record's CR (the 250's size is then
  Postfix's plus 3); the same inside one chunk where that CR is the chunk's 4096th octet, the end of one of its
  reader's 4096-octet reads (`2047 CR at 4096 CR LF`; the same line elsewhere in a chunk, `2047 CR CR LF`, is
  stored with its space by both).
A client in no exclusion (test_a_client_outside_the_exclusions_...; Postfix's reject, mailflow's true): a bare
LF is mailflow's 521 and the end where Postfix's reject replies 550 and goes on; a bare CR mailflow's 521 where
Postfix takes it (a space): docs/security.md.
Not here: a chunk announced larger than what arrives, then the client silent (tests/interop/test_limits_vs_postfix.py,
`timeout after BDAT`).
"""
from __future__ import annotations

import asyncio
import re

import pytest

from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

HOST = "mx.origin.test"
HEADER = b"Subject: s\r\n\r\n"
HALF_CLOSE = b""  # a step that shuts the client's side of the connection
Step = tuple[bytes, int]  # (bytes written at once, replies then read); `{s}` is the case's sender


def bdat(data: bytes, last: bool = True) -> bytes:
    return f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data


def envelope(mail_params: bytes = b"") -> list[Step]:
    return [(b"MAIL FROM:<{s}>" + mail_params + b"\r\n", 1), (b"RCPT TO:<r@x.test>\r\n", 1)]


def one_chunk(content: bytes, mail_params: bytes = b"") -> list[Step]:
    return [*envelope(mail_params), (bdat(HEADER + content), 1)]


CASES: dict[str, list[Step]] = {
    "bare LF": one_chunk(b"a\nb\r\n"),
    "LF line ends": [*envelope(), (bdat(b"Subject: lf\n\nbody\nline\n"), 1)],
    "CR | LF across chunks": [*envelope(), (bdat(HEADER + b"a\r", False), 1), (bdat(b"\nb\r\n"), 1)],
    "no last CRLF": one_chunk(b"abc"),
    **{f"line {n}": one_chunk(b"a" * n + b"\r\n") for n in (997, 998, 2047, 2048, 2049, 5000)},
    "line 4096 unended": one_chunk(b"a" * 4096),
    "CR at the 2048 cut | LF": [*envelope(), (bdat(HEADER + b"a" * 2047 + b"\r", False), 1), (bdat(b"\nx\r\n"), 1)],
    "dot lines": one_chunk(b"a\r\n.\r\nb\r\n..\r\n"),
    "8-bit": one_chunk(b"caf\xe9\r\n"),
    "8-bit BODY=8BITMIME": one_chunk(b"caf\xe9\r\n", b" BODY=8BITMIME"),
    "BODY=BINARYMIME": one_chunk(b"caf\xe9\r\n", b" BODY=BINARYMIME"),
    "BDAT 0 LAST": [*envelope(), (bdat(b""), 1)],
    "BDAT 0 LAST after a chunk": [*envelope(), (bdat(HEADER + b"x\r\n", False), 1), (bdat(b""), 1)],
    "BDAT 0": [*envelope(), (bdat(b"", False), 1), (bdat(HEADER + b"x\r\n"), 1)],
    "no MAIL": [(bdat(HEADER + b"x\r\n"), 1), (b"NOOP\r\n", 1)],
    "no RCPT": [(b"MAIL FROM:<{s}>\r\n", 1), (bdat(HEADER + b"x\r\n"), 1), (b"NOOP\r\n", 1)],
    "RCPT refused": [(b"MAIL FROM:<{s}>\r\n", 1), (b"RCPT TO:<r@>\r\n", 1), (bdat(HEADER + b"x\r\n"), 1),
                     (b"NOOP\r\n", 1)],
    "after a refused DATA": [(b"MAIL FROM:<{s}>\r\n", 1), (b"DATA\r\n", 1), (bdat(HEADER + b"x\r\n"), 1)],
    "DATA between chunks": [*envelope(), (bdat(HEADER + b"x\r\n", False), 1), (b"DATA\r\n", 1),
                            (bdat(b"y\r\n"), 1)],
    **{f"BDAT {size}": [*envelope(), (f"BDAT {size}\r\n".encode(), 1), (b"NOOP\r\n", 1)]
       for size in ("abc", "-5 LAST", "+5 LAST", "18446744073709551616 LAST", "9223372036854775808 LAST", "",
                    "3 LAST X")},
    "BDAT 0005 LAST": [*envelope(), (b"BDAT 0005 LAST\r\nabcde", 1)],
    "BDAT 3 last": [*envelope(), (b"BDAT 3 last\r\nab\n", 1)],
    "BDAT<TAB>3<TAB>LAST": [*envelope(), (b"BDAT\t3\tLAST\r\nabc", 1), (b"NOOP\r\n", 1)],
    "past the size limit": [*envelope(), (bdat(b"x" * 9000), 1), (b"NOOP\r\n", 1)],
    "past the size limit in two": [*envelope(), (bdat(HEADER + b"x" * 5000 + b"\r\n", False), 1),
                                   (bdat(b"y" * 5000 + b"\r\n"), 1), (b"NOOP\r\n", 1)],
    "SIZE=5": one_chunk(b"x" * 10 + b"\r\n", b" SIZE=5"),
    "three chunks in one write": [*envelope(), (bdat(HEADER + b"a", False) + bdat(b"b\r\n", False)
                                                + bdat(b"c\r\n"), 3)],
    "NOOP after LAST in one write": [*envelope(), (bdat(HEADER + b"a\r\n") + b"NOOP\r\n", 2)],
    "RSET between chunks": [*envelope(), (bdat(HEADER + b"a\r\n", False), 1), (b"RSET\r\n", 1),
                            (bdat(b"b\r\n"), 1), *envelope(), (bdat(HEADER + b"z\r\n"), 1)],
    "QUIT between chunks": [*envelope(), (bdat(HEADER + b"a\r\n", False), 1), (b"QUIT\r\n", 1)],
    "half-close in a chunk": [*envelope(), (b"BDAT 100 LAST\r\nabc", 0), (HALF_CLOSE, 1)],
    "half-close after a chunk": [*envelope(), (bdat(HEADER + b"a\r\n", False), 1), (HALF_CLOSE, 1)],
    "half-close after LAST": [*envelope(), (bdat(HEADER + b"a\r\n"), 0), (HALF_CLOSE, 2)],
    "header name split": [*envelope(), (bdat(b"Subj", False), 1), (bdat(b"ect: split\r\nX-A: b\r\n\r\nbody\r\n"), 1)],
    "empty line in the next chunk": [*envelope(), (bdat(b"Subject: x\r\n", False), 1), (bdat(b"\r\nbody\r\n"), 1)],
    "empty line's CR | LF": [*envelope(), (bdat(b"Subject: x\r\n\r", False), 1), (bdat(b"\nbody\r\n"), 1)],
    "mbox From line": [*envelope(), (bdat(b"From x@y Fri\r\nSubject: x\r\n\r\nbody\r\n"), 1)],
    "header section of 1024+": [*envelope(), (bdat(b"X-Big: " + b"a" * 600, False), 1),
                                (bdat(b"a" * 600 + b"\r\nX-After: 1\r\n\r\nbody\r\n"), 1)],
    "NUL": one_chunk(b"a\0b\r\n"),
}
A2047 = b"a" * 2047
# label: (the steps, bytes of the content Postfix delivered): a stray CR, as Postfix 3.7.11 stores it
STRAY_CR: dict[str, tuple[list[Step], bytes]] = {
    "bare CR": (one_chunk(b"a\rb\r\n"), b"\r\n\r\na b\r\n"),
    "CR CR LF": (one_chunk(b"a\r\r\nb\r\n"), b"\r\n\r\na\r\nb\r\n"),
    "CR SP CR LF": (one_chunk(b"a\r \r\nb\r\n"), b"\r\n\r\na  \r\nb\r\n"),
    "CR line ends": ([*envelope(), (bdat(b"Subject: cr\r\rbody\r"), 1)], b"Subject: cr  body \r\n"),
    "CR | CR LF": ([*envelope(), (bdat(HEADER + b"a\r", False), 1), (bdat(b"\r\nb\r\n"), 1)],
                   b"\r\n\r\na\r\nb\r\n"),
    "CR | b": ([*envelope(), (bdat(HEADER + b"a\r", False), 1), (bdat(b"b\r\n"), 1)], b"\r\n\r\na b\r\n"),
    "ends in CR": (one_chunk(b"abc\r"), b"\r\n\r\nabc \r\n"),
    "ends in CR CR": (one_chunk(b"abc\r\r"), b"\r\n\r\nabc  \r\n"),
    "CR | BDAT 0 LAST": ([*envelope(), (bdat(HEADER + b"abc\r", False), 1), (bdat(b""), 1)], b"\r\n\r\nabc \r\n"),
    "CR in a header field": ([*envelope(), (bdat(b"Subject: x\rBcc: y\r\n\r\nb\r\n"), 1)], b"Subject: x Bcc: y\r\n"),
    "CR CR LF blank line": ([*envelope(), (bdat(b"Subject: s\r\n\r\r\nbody\r\n"), 1)], b"\r\n\r\nbody\r\n"),
    "CR blank line": ([*envelope(), (bdat(b"Subject: s\r\n\rbody\r\n"), 1)], b"Subject: s\r\n body\r\n"),
    "LF and CRs": (one_chunk(b"a\nb\r\r\nc\rd\n"), b"\r\n\r\na\r\nb\r\nc d\r\n"),
    "2047 CR CR LF": (one_chunk(A2047 + b"\r\r\nz\r\n"), b"a \r\nz\r\n"),
    "2046 CR CR CR LF": (one_chunk(b"a" * 2046 + b"\r\r\r\nz\r\n"), b"a  \r\nz\r\n"),
    "2047 CR | CR x": ([*envelope(), (bdat(HEADER + A2047 + b"\r", False), 1), (bdat(b"\rx\r\n"), 1)],
                       b"a  x\r\n"),
    "2047 ends in CR": (one_chunk(A2047 + b"\r"), b"a \r\n"),
    "2047 CR | CR LF": ([*envelope(), (bdat(HEADER + A2047 + b"\r", False), 1), (bdat(b"\r\nz\r\n"), 1)],
                        b"a\r\nz\r\n"),
    # one chunk, the full record's CR its 4096th octet (2047 CR CR LF elsewhere in a chunk: a space at Postfix too)
    "2047 CR at 4096 CR LF": (one_chunk(b"b" * (4095 - 2047 - len(HEADER) - 2) + b"\r\n" + A2047 + b"\r\r\nz\r\n"),
                              b"a\r\nz\r\n"),
}
CASES.update({label: steps for label, (steps, _) in STRAY_CR.items()})
# label: mailflow's last reply, where Postfix's is a 250 (see the module doc)
KEPT = {"NUL": "554 5.6.0 Error: NUL character in message content",
        "header section of 1024+": "552 5.3.4 Error: message header size exceeds limit"}
# label: (mailflow's last reply, the end of the content it delivered), where Postfix's differ (see the module doc)
KEPT_CONTENT = {"2047 CR | CR LF": ("250 2.0.0 Ok: 2069 bytes queued as ID", b"a \r\nz\r\n"),
                "2047 CR at 4096 CR LF": ("250 2.0.0 Ok: 4103 bytes queued as ID", b"a \r\nz\r\n")}
SETTINGS = {"myhostname": HOST, "myorigin": "origin.test", "header_size_limit": 1024}


async def dialogue(port: int, sender: str, steps: list[Step]) -> list[str]:
    """Each step's replies after EHLO (queue ids masked): `closed` when the server closed the connection."""
    replies: list[str] = []
    client = await SmtpClient.connect(port)
    assert (await client.cmd("EHLO client.test")).code == 250
    try:
        for data, count in steps:
            if data == HALF_CLOSE:
                client.writer.write_eof()
            else:
                await client.send(data.replace(b"{s}", sender.encode()))
            for _ in range(count):
                reply = await client.reply()
                replies.append(re.sub(r"queued as \w+", "queued as ID", reply.text) if reply.code else "closed")
                if reply.code is None:
                    return replies
    except ConnectionResetError:
        replies.append("closed")
    finally:
        client.writer.close()
    return replies


def masked(content: bytes) -> bytes:
    content = re.sub(rb"^Received: .*?\r?\n(?![ \t])", b"", content, count=1, flags=re.S)
    content = re.sub(rb"(?m)^Message-I[dD]: <[^>\r\n]*>", b"Message-ID: <ID>", content)
    return re.sub(rb"(?m)^Date: [^\r\n]*", b"Date: DATE", content)


EXTRA_DELIVERY_WINDOW = 1.0  # seconds a late extra (duplicate, bounce) delivery is given once the count is reached


async def run(port: int, peer) -> tuple[dict[str, list[str]], dict[str, list]]:
    """(the replies, what `peer` got: MAIL parameters but SIZE, masked content), by label (`<>`: a bounce)."""
    labels = list(CASES)
    replies = {label: await dialogue(port, f"c{n}@client.test", CASES[label]) for n, label in enumerate(labels)}
    queued = sum(reply.startswith("250 2.0.0 Ok: ") and "queued" in reply for r in replies.values() for reply in r)
    await eventually(lambda: len(peer.messages) >= queued, timeout=30)
    await asyncio.sleep(EXTRA_DELIVERY_WINDOW)  # (not a synchronisation: the time a delivery not due has to show)
    delivered: dict[str, list] = {}
    for m in peer.messages:
        sender = re.fullmatch(r"c(\d+)@client\.test", m.mail_from)
        label = labels[int(sender.group(1))] if sender else f"<{m.mail_from}>"
        delivered.setdefault(label, []).append(([o for o in m.mail_options if not o.startswith("SIZE=")],
                                                masked(m.content)))
    assert len(peer.messages) == queued, delivered.keys()
    return replies, delivered


async def test_bdat_dialogues_and_the_content_delivered_match_a_real_postfix(mailflow_server, smtp_peer):
    pf_peer, mf_peer = await smtp_peer(), await smtp_peer()
    async with postfix_instance({**{k: str(v) for k, v in SETTINGS.items()}, "mydestination": "",
                                 "message_size_limit": "8000",
                                 "relayhost": f"[127.0.0.1]:{pf_peer.port}"}) as pf:
        postfix = await run(pf.port, pf_peer)
    mf = await mailflow_server(**SETTINGS, mydestination=[], mynetworks=["127.0.0.0/8"],
                               relayhost=f"[127.0.0.1]:{mf_peer.port}", smtpd={"message_size_limit": 8000})
    mailflow = await run(mf.smtp_addresses[0][1], mf_peer)
    found = []
    for label in CASES:
        if label in KEPT:
            assert postfix[0][label][-1].startswith("250 2.0.0 Ok: "), (label, postfix[0][label])
            assert mailflow[0][label] == [*postfix[0][label][:-1], KEPT[label]], (label, mailflow[0][label])
            assert label not in mailflow[1], label
            continue
        if label in KEPT_CONTENT:
            reply, content = KEPT_CONTENT[label]
            assert (mailflow[0][label][-1], postfix[0][label][:-1]) == (reply, mailflow[0][label][:-1]), label
            assert postfix[0][label][-1] != reply and postfix[1][label][0][1] != mailflow[1][label][0][1], label
            assert mailflow[1][label][0][1].endswith(content), (label, mailflow[1][label])
            continue
        if postfix[0][label] != mailflow[0][label]:
            found.append(f"{label}: replies postfix {postfix[0][label]} mailflow {mailflow[0][label]}")
        if postfix[1].get(label) != mailflow[1].get(label):
            found.append(f"{label}: delivered postfix {postfix[1].get(label)!r:.600} "
                         f"mailflow {mailflow[1].get(label)!r:.600}")
    assert not found, "\n".join(found)
    # what Postfix did, so that the same change on both sides cannot pass unnoticed
    assert postfix[0]["BDAT 0"][-2:] == ["551 5.7.1 Null BDAT request",
                                         "551 5.0.0 Discarded 17 bytes after earlier error"]
    assert postfix[0]["RCPT refused"][-2] == "554 5.5.1 Error: no valid recipients"
    assert postfix[0]["BDAT 9223372036854775808 LAST"][-2:] == ["521 5.5.4 Syntax: BDAT count [LAST]", "closed"]
    assert postfix[0]["past the size limit in two"][-2] == "552 5.3.4 Chunk exceeds message size limit"
    assert postfix[0]["DATA between chunks"][-2] == "503 5.5.1 Error: DATA after BDAT"
    assert postfix[1]["dot lines"][0][1].endswith(b"\r\n\r\na\r\n.\r\nb\r\n..\r\n")
    assert postfix[1]["CR | LF across chunks"][0][1].endswith(b"\r\n\r\na\r\nb\r\n")
    assert postfix[1]["8-bit BODY=8BITMIME"][0][0] == ["BODY=8BITMIME"]
    assert postfix[1]["mbox From line"][0][1].endswith(b"\r\n\r\nFrom x@y Fri\r\nSubject: x\r\n\r\nbody\r\n")
    assert "half-close in a chunk" not in postfix[1]
    assert postfix[0]["half-close after LAST"][-1] == "closed"
    assert len(postfix[1]["RSET between chunks"]) == 1
    for label, (_, content) in STRAY_CR.items():
        assert content in postfix[1][label][0][1], (label, postfix[1][label])
    assert postfix[1]["NUL"][0][1].endswith(b"\r\n\r\na\0b\r\n")
    assert postfix[0]["2047 CR at 4096 CR LF"][-1] == "250 2.0.0 Ok: 4100 bytes queued as ID"  # (its CR dropped)
    big_header = postfix[1]["header section of 1024+"][0][1]  # (X-After still a header field)
    assert b"\r\nX-After: 1\r\nMessage-ID: <ID>\r\n" in big_header and big_header.endswith(b"\r\n\r\nbody\r\n")


CLEAN = b"Subject: s\r\n\r\nline\r\n"
OUTSIDE: dict[str, list[Step]] = {  # label: a client spared by no exclusion
    "clean": [*envelope(), (bdat(CLEAN), 1)],
    "bare LF": [*envelope(), (bdat(CLEAN + b"a\nb\r\n"), 1), (b"NOOP\r\n", 1)],
    "bare CR": [*envelope(), (bdat(CLEAN + b"a\rb\r\n"), 1), (b"NOOP\r\n", 1)],
}


async def test_a_client_outside_the_exclusions_gets_mailflow_s_stricter_replies(mailflow_server, smtp_peer):
    """Postfix's reject and mailflow's true with no exclusions: the same clean message; a bare LF 550 and the
    session on in Postfix, 521 and the end here; a bare CR taken by Postfix (a space), 521 and the end here (the
    differences docs/security.md lists)."""
    pf_peer, mf_peer = await smtp_peer(), await smtp_peer()
    async with postfix_instance({**SETTINGS, "header_size_limit": "102400", "mydestination": "",
                                 "smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": "",
                                 "relayhost": f"[127.0.0.1]:{pf_peer.port}"}) as pf:
        postfix = {label: await dialogue(pf.port, f"c{n}@client.test", steps)
                   for n, (label, steps) in enumerate(OUTSIDE.items())}
        await eventually(lambda: len(pf_peer.messages) >= 2, timeout=30)
    mf = await mailflow_server(**SETTINGS, mydestination=[], mynetworks=["127.0.0.0/8"],
                               relayhost=f"[127.0.0.1]:{mf_peer.port}", smtpd={"forbid_bare_newline_exclusions": []})
    mailflow = {label: await dialogue(mf.smtp_addresses[0][1], f"c{n}@client.test", steps)
                for n, (label, steps) in enumerate(OUTSIDE.items())}
    await eventually(lambda: mf_peer.messages, timeout=30)
    await asyncio.sleep(EXTRA_DELIVERY_WINDOW)
    refused = "521 5.5.2 mx.origin.test Error: bare <{}> received"
    assert (postfix["clean"], postfix["bare LF"][-2:], postfix["bare CR"][-2:]) == (
        mailflow["clean"], ["550 5.5.2 mx.origin.test Error: bare <LF> received", "250 2.0.0 Ok"],
        ["250 2.0.0 Ok: 25 bytes queued as ID", "250 2.0.0 Ok"])
    assert (mailflow["bare LF"][-2:], mailflow["bare CR"][-2:]) == (
        [refused.format("LF"), "closed"], [refused.format("CR"), "closed"])
    theirs = {m.mail_from: masked(m.content) for m in pf_peer.messages}
    assert len(pf_peer.messages) == 2 and theirs["c2@client.test"].endswith(b"\r\n\r\nline\r\na b\r\n")
    assert [(m.mail_from, masked(m.content)) for m in mf_peer.messages] == [("c0@client.test",
                                                                           theirs["c0@client.test"])]
