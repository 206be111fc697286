"""Seeded messages whose header section and body stress a cleanup's parser, and what a relay made of them.

Used by tests/interop/test_cleanup_content_vs_postfix.py to compare mailflow's cleanup with Postfix 3.7's
(cleanup_message.c, is_header(), header_opts, line_length_limit, hopcount_limit) on the delivered bytes.

    generated(seed, count) -> [(label, message)]   `count` messages (CRLF lines, not dot-stuffed), the same ones
                                            for the same seed: an opening (OPENINGS), up to four header fields
                                            (HEADER_INGREDIENTS) in a random order and a body (BODIES); the label
                                            names them. A bare CR is in none of them: mailflow refuses it on
                                            purpose (docs/security.md), which would hide the rest of the message
    dot_stuffed(message) -> bytes           the message as it goes over SMTP DATA, without the final dot (a last
                                            line without its CRLF gets one)
    masked(content, hostname) -> list[bytes]    the lines of a delivered message, what must differ between two
                                            relays made alike masked: the Received field `hostname` added (the
                                            first, left out), the Message-ID and Date values a relay generated
                                            (`<GENERATED>`, under the name `Message-ID`: Postfix writes
                                            `Message-Id`); a Date of the ingredients (4 Dec 2026 12:00) is kept

Nothing here talks to a server.
"""
from __future__ import annotations

import random
import re

HOP = b"Received: from a.test by b.test; Fri, 04 Dec 2026 12:00:00 +0000\r\n"
HEADER_INGREDIENTS: dict[str, bytes] = {
    "plain": b"Subject: plain\r\n",
    "no-colon": b"This line has no colon\r\n",
    "space-before-colon": b"Subject : spaced name\r\n",
    "tab-before-colon": b"X-Tab\t: tabbed name\r\n",
    "empty-value": b"X-Empty:\r\n",
    "empty-value-space": b"X-Empty-Space: \r\n",
    "blank-continuation": b"X-Blank: one\r\n \r\n two\r\n",
    "folded": b"X-Folded: one\r\n\ttwo\r\n  three\r\n",
    "long-folded": b"X-Long: " + b"\r\n ".join(b"word%03d" % i * 20 for i in range(40)) + b"\r\n",
    "long-line": b"X-Long-Line: " + b"a" * 3000 + b"\r\n",
    "long-name": b"X-" + b"N" * 2100 + b": value\r\n",
    "latin1": b"X-Latin: caf\xe9\r\n",
    "utf8": "X-Utf8: caf\u00e9 \u2603\r\n".encode(),
    "utf8-subject": "Subject: \u00fcber\r\n".encode(),
    "dup-message-id": b"Message-ID: <one@client.test>\r\nMessage-ID: <two@client.test>\r\n",
    "dup-date": b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nDate: Sat, 05 Dec 2026 12:00:00 +0000\r\n",
    "dup-from": b"From: a@client.test\r\nFrom: b@client.test\r\n",
    "resent": b"Resent-From: r@client.test\r\nResent-To: t@x.test\r\n",
    "resent-full": b"Resent-Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nResent-From: r@client.test\r\n"
                   b"Resent-Message-ID: <resent@client.test>\r\n",
    "eight-bit-name": b"X-Caf\xe9: v\r\n",
    "empty-name": b": no name\r\n",
    "no-space": b"Subject:nospace\r\n",
    "trailing-blanks": b"X-Trail: x  \t\r\n",
    "cte-upper": b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: 8BIT\r\n",
    "cte-binary": b"MIME-Version: 1.0\r\nContent-Transfer-Encoding:  binary\r\n",
    "rfc822": b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n",
    "content-type-spaced": b"Content-Type : text/plain; charset=utf-8\r\nContent-Transfer-Encoding : 8bit\r\n",
    "resent-unknown": b"Resent-Comment: not a resent field Postfix knows\r\n",
    "bcc": b"Bcc: hidden@x.test\r\n",
    "resent-bcc": b"Resent-Bcc: hidden@x.test\r\n",
    "return-path": b"Return-Path: <old@client.test>\r\n",
    "delivered-to": b"Delivered-To: someone@x.test\r\n",
    "content-length": b"Content-Length: 12\r\n",
    "received": b"Received: from a.test by b.test; Fri, 04 Dec 2026 12:00:00 +0000\r\n",
    "received-folded": b"Received: from a.test\r\n\tby b.test; Fri, 04 Dec 2026 12:00:00 +0000\r\n",
    "mime-8bit": b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n",
    "mime-7bit": b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: 7bit\r\n",
    "mime-qp": b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n",
    "x-original-to": b"X-Original-To: x@x.test\r\n",
    "lowercase": b"message-id: <lower@client.test>\r\nfrom: low@client.test\r\n"
                 b"date: Fri, 04 Dec 2026 12:00:00 +0000\r\n",
    "odd-name": b"X-Odd!#$%&'*+-.^_`{|}~: punct\r\n",
    "hops-49": HOP * 49,
    "hops-48": HOP * 48,
    "delivered-to-many": b"Delivered-To: someone@x.test\r\n" * 60,
    "multipart": b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n",
    "ctl-in-value": b"X-Ctl: a\x01b\x7fc\r\n",
}
# lines whose length (the CRLF not counted) is at or next to a limit: Postfix's smtp_line_length_limit (998, where
# its SMTP client folds a longer line) and line_length_limit (2048, where its smtpd cuts a line into records)
AT_LIMITS = [997, 998, 999, 2047, 2048, 2049, 2998, 2999]
HEADER_INGREDIENTS.update({f"header-line-{n}": b"X-At-Limit: " + b"h" * (n - 12) + b"\r\n" for n in AT_LIMITS})
HEADER_INGREDIENTS.update({f"folded-line-{n}": b"X-Folded-At-Limit: a\r\n\t" + b"f" * (n - 1) + b"\r\n"
                           for n in AT_LIMITS})
# what may open a message, before the ingredients
OPENINGS: dict[str, bytes] = {
    "none": b"",
    "from-line": b"From sender@client.test Fri Dec  4 12:00:00 2026\r\n",
    "from-lines": b"From sender@client.test Fri Dec  4 12:00:00 2026\r\n>From again\r\n>>From more\r\n",
    "continuation-first": b" continued first\r\n",
    "blank-first": b"\r\n",
}
BODIES: dict[str, bytes] = {
    "parts": b"\r\npreamble\r\n--BB\r\nContent-Type : text/plain\r\nX-Part\t: x\r\n\r\npart \xe9\r\n--BB\r\n"
             b"Content-Type: message/rfc822\r\n\r\nSubject : inner\r\nFrom here\r\n\r\ninner body\r\n--BB--\r\n",
    "plain": b"\r\nbody line\r\n",
    "no-blank-line": b"body without a blank line\r\n",
    "empty": b"",
    "inner-message": b"\r\nSubject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\ninner \xe9\r\n",
    "blank-only": b"\r\n",
    "from-body": b"\r\nFrom here\r\n>From there\r\n",
    "8bit": "\r\ncaf\u00e9\r\n".encode(),
    "long-body-line": b"\r\n" + b"b" * 5000 + b"\r\n",
    "header-like-body": b"\r\nX-Not-A-Header: body\r\n",
    "dots": b"\r\n.\r\n..\r\n.x\r\n",
    "trailing-space": b"\r\nline \r\n\t\r\n",
    "no-final-newline": b"\r\nlast line\r\n",  # (sendmail: without its last line end)
    "no-final-newline-head": b"X-Last: header\r\n",
    **{f"body-line-{n}": b"\r\n" + b"b" * n + b"\r\nnext\r\n" for n in AT_LIMITS},
    **{f"body-spaced-{n}": b"\r\n" + b"word " * (n // 5) + b"w" * (n % 5) + b"\r\n" for n in AT_LIMITS},
}


def generated(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        opening = rng.choice(sorted(OPENINGS))
        names = rng.sample(sorted(HEADER_INGREDIENTS), rng.randint(0, 4))
        body = rng.choice(sorted(BODIES))
        label = f"{opening}|{','.join(names)}|{body}"
        out.append((label, OPENINGS[opening] + b"".join(HEADER_INGREDIENTS[n] for n in names) + BODIES[body]))
    return out


def dot_stuffed(message: bytes) -> bytes:
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    return stuffed if stuffed.endswith(b"\r\n") or not stuffed else stuffed + b"\r\n"


_GENERATED_ID = re.compile(rb"^((?:Resent-)?Message-I[dD]: )<\d{14}\.[0-9A-F]+@[^>]+>$", re.IGNORECASE)


def masked(content: bytes, hostname: str) -> list[bytes]:
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[0].startswith(b"Received: ") and hostname.encode() in b" ".join(lines[:4]):
        lines.pop(0)
        while lines and lines[0][:1] in (b" ", b"\t"):
            lines.pop(0)
    out = []
    for line in lines:
        if _GENERATED_ID.match(line):  # (Postfix names it Message-Id, mailflow Message-ID: a known difference)
            line = line[:line.index(b":") - 1] + b"D: <GENERATED>"
        if re.match(rb"^(Resent-)?Date: \w{3}, [ \d]\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}( \(\w+\))?$", line,
                    re.IGNORECASE) and b"Dec 2026 12:00:00" not in line:
            line = line.split(b":")[0] + b": <GENERATED>"
        out.append(line)
    return out
