"""Differential test: [smtp] header_checks, mime_header_checks and body_checks against a private Postfix with the
same tables as smtp_header_checks, smtp_mime_header_checks and smtp_body_checks. Both relay every probe to one
smtp-sink on 127.0.0.1, whose dump shows each message as the next hop got it; each probe's X-Probe field names the
server and the probe. Compared: the probe's own header fields and body lines as they arrive, and the log lines of
the actions (`QID: replace: header ...`, `warning: unsupported command in smtp_header_checks map: REJECT`). And
[smtp] reply_filter against smtp_reply_filter: the same lines replaced (an EHLO line, a RCPT reply made a
deferral), logged alike, the recipients' status alike."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import aiosmtplib
import pytest

from mailflow.logs import printable
from tests.support import eventually, postfix_instance, queue_becomes
from tests.support.postfix import smtp_sink

pytestmark = pytest.mark.interop

TABLES = {
    "header": ["/^Received:.*with ESMTPSA/ IGNORE", "/^X-Originating-IP:/ IGNORE", "/^User-Agent:/ IGNORE",
               "/^Subject: (.*) secret$/ REPLACE Subject: $1 hidden", "/^X-Warn:/ WARN w-text", "/^X-Info:/ INFO",
               "/^X-Pre:/ PREPEND X-Added: yes", "/^X-Rej:/ REJECT no", "/^X-Bad:/ REPLACE not a header",
               "/^Content-Type:/ IGNORE", "/^X-Fold: a.[[:space:]]b$/ REPLACE X-Fold: joined",
               "/^X-Strip:/ STRIP stripped", "/^X-Tab:/ REPLACE\tX-Tab: replaced",
               "/^Content-Language:/ REPLACE X-Lang: header_checks"],
    "mime": ["/^Content-Description:/ IGNORE", "/^Content-Language:/ REPLACE X-Lang: mime_header_checks",
             "/^X-Garbage-Part:/ WARN part-header"],
    "body": ["/^secret/ REPLACE hidden line", "/^drop me/ IGNORE", "/^pre me/ PREPEND added line",
             "/^warn me/ WARN bw", "/^--b1/ WARN boundary", "/^after garbage/ REPLACE garbage seen"],
}
PROBES = [  # header lines, body lines
    (["Received: from pc (pc [10.0.0.5])\r\n\tby mx.example (Postfix) with ESMTPSA id 4AbC",
      "X-Originating-IP: 10.0.0.5", "User-Agent: Thunderbird", "Subject: a secret", "From: joe@box.local",
      "To: carol@remote.test"],
     ["hello", "secret stuff", "drop me", "pre me", "warn me", "end"]),
    (["X-Warn: 1", "X-Info: 2", "X-Pre: 3", "X-Rej: 4", "X-Bad: 5", "X-Fold: a\r\n\tb", "From: joe@box.local",
      "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b1"'],
     ["preamble", "--b1", "Content-Type: text/plain", "Content-Description: notes", "", "secret part", "--b1--",
      "epilogue"]),
    (["X-Strip: 1", "X-Tab: 1", "Content-Language: en", "From: joe@box.local", "MIME-Version: 1.0",
      'Content-Type: multipart/mixed; boundary="b1"'],  # (a part whose header section ends without an empty line)
     ["pre", "--b1", "X-Garbage-Part: 1", "not a header line", "after garbage", "--b1--"]),
]
SERVERS_OWN = (r"X-Client-Addr|X-Client-Proto|X-Helo-Args|X-Mail-Args|X-Rcpt-Args|X-Probe|Message-ID|Date"
               r"|Received: from (localhost|127|box\.local)")  # (the sink's, the servers', the probe's name)


async def send_probes(port: int, server: str) -> None:
    for i, (header, body) in enumerate(PROBES):
        content = "\r\n".join([*header, f"X-Probe: {server}-{i}", "", *body, ""])
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
            await client.sendmail("joe@box.local", ["carol@remote.test"], content.encode())


def received(dump: Path, server: str) -> dict[int, tuple[list[str], str]]:
    """Per probe: the header fields that are neither the servers' own (Received by either, Message-ID, Date,
    X-Probe) nor the sink's, and the body, as the sink got them."""
    out = {}
    text = dump.read_text(errors="replace") if dump.exists() else ""
    for message in text.split("X-Client-Addr:")[1:]:
        found = re.search(rf"^X-Probe: {server}-(\d+)", message, re.MULTILINE)
        if not found:
            continue
        head, _, body = message.replace("\r", "").partition("\n\n")
        fields = re.split(r"\n(?![ \t])", head)
        kept = [f for f in fields if ":" in f and not re.match(SERVERS_OWN, f, re.I)]
        out[int(found.group(1))] = (kept, body.strip())
    return out


def actions(lines) -> list[str]:
    """The action log lines, without the queue id."""
    out = []
    for line in lines:
        found = re.search(r"(?:[0-9A-F]{10,}: )?((?:replace|prepend|warning|info|strip): (?:header|body) .*"
                          r"|unsupported command in .*|bad REPLACE header text .*)$", line)
        if found:
            out.append(found.group(1))
    return out


@pytest.fixture
def tables():
    """The regexp files, where Postfix's unprivileged smtp can read them (pytest's tmp_path it cannot)."""
    with tempfile.TemporaryDirectory(prefix="mf-smtp-checks-") as folder:
        os.chmod(folder, 0o755)
        specs = {}
        for kind, lines in TABLES.items():
            path = Path(folder) / kind
            path.write_text("".join(f"{line}\n" for line in lines))
            path.chmod(0o644)
            specs[kind] = f"regexp:{path}"
        yield specs


async def test_smtp_content_checks_match_a_real_postfix(mailflow_server, tables, caplog):
    caplog.set_level(logging.INFO, logger="mailflow.smtp")
    async with smtp_sink() as (sink, dump):
        async with postfix_instance({"myhostname": "box.local", "mydestination": "box.local",
                                     "relayhost": f"[127.0.0.1]:{sink}", "smtp_header_checks": tables["header"],
                                     "smtp_mime_header_checks": tables["mime"],
                                     "smtp_body_checks": tables["body"]}) as pf:
            await send_probes(pf.port, "pf")
            await pf.queue_empty()
            await eventually(lambda: pf.maillog.count("status=sent") == len(PROBES), what="Postfix's log written")
            postfix_logged = actions(line for line in pf.maillog.splitlines() if "/smtp[" in line)
        mf = await mailflow_server(myhostname="box.local", mydestination=["box.local"], mynetworks=["127.0.0.0/8"],
                                   relayhost=f"[127.0.0.1]:{sink}",
                                   smtp={"header_checks": [tables["header"]], "mime_header_checks": [tables["mime"]],
                                         "body_checks": [tables["body"]]})
        await send_probes(mf.smtp_addresses[0][1], "mf")
        await queue_becomes(mf.store, {})
        every = set(range(len(PROBES)))
        await eventually(lambda: set(received(dump, "pf")) == every and set(received(dump, "mf")) == every,
                         what="every probe at the sink")
        postfix_got, mailflow_got = received(dump, "pf"), received(dump, "mf")
    for i in every:
        assert mailflow_got[i] == postfix_got[i], PROBES[i]
    # (as the log writes them; sorted: Postfix's smtp processes may deliver the probes in either order)
    assert sorted(actions(printable(r.getMessage()) for r in caplog.records)) == sorted(postfix_logged)
    # the edges themselves, so that a change in both cannot pass unnoticed
    assert postfix_got[0] == (["Subject: a hidden", "From: joe@box.local", "To: carol@remote.test"],
                              "hello\nhidden line\nadded line\npre me\nwarn me\nend")
    assert "Content-Type: multipart/mixed; boundary=\"b1\"" in postfix_got[1][0]
    assert "Content-Description" not in postfix_got[1][1] and "X-Added: yes" in postfix_got[1][0]
    assert "unsupported command in smtp_header_checks map: REJECT no" in postfix_logged
    assert "replace: header X-Fold: a??b: X-Fold: joined" in postfix_logged
    assert postfix_got[2] == (["X-Tab: replaced", "X-Lang: header_checks", "From: joe@box.local", "MIME-Version: 1.0",
                               'Content-Type: multipart/mixed; boundary="b1"'],
                              "pre\n--b1\nX-Garbage-Part: 1\nnot a header line\ngarbage seen\n--b1--")
    assert {"strip: header X-Strip: 1: stripped", "warning: body --b1: boundary", "warning: body --b1--: boundary",
            "warning: header X-Garbage-Part: 1: part-header"} <= set(postfix_logged)


REPLY_FILTER = ["/^250-PIPELINING$/ 250-XPIPELINING", "/^250 2\\.1\\.5 (.*)$/ 450 4.1.5 filtered: $1"]


def reply_filter_lines(lines) -> list[str]:
    """The reply filter's log lines and the recipient's status, the servers' own parts (port, queue id) out."""
    out = []
    for line in lines:
        if (found := re.search(r"\]:\d+: (replacing server reply .*)$", line)) is not None:
            out.append(found.group(1))
        elif (found := re.search(r"(status=deferred \(.*\))$", line)) is not None:
            out.append(found.group(1))
    return out


async def test_smtp_reply_filter_matches_a_real_postfix(mailflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    with tempfile.TemporaryDirectory(prefix="mf-reply-filter-") as folder:
        os.chmod(folder, 0o755)
        table = Path(folder) / "reply_filter"
        table.write_text("".join(f"{line}\n" for line in REPLY_FILTER))
        table.chmod(0o644)
        async with smtp_sink() as (sink, dump):
            async with postfix_instance({"myhostname": "box.local", "mydestination": "box.local",
                                         "relayhost": f"[127.0.0.1]:{sink}",
                                         "smtp_reply_filter": f"regexp:{table}"}) as pf:
                await send_probes(pf.port, "pf")
                await eventually(lambda: pf.maillog.count("status=deferred") == len(PROBES),
                                 what="Postfix deferred every probe")
                postfix_logged = reply_filter_lines(pf.maillog.splitlines())
            mf = await mailflow_server(myhostname="box.local", mydestination=["box.local"],
                                       mynetworks=["127.0.0.0/8"], relayhost=f"[127.0.0.1]:{sink}",
                                       smtp={"reply_filter": [f"regexp:{table}"]})
            await send_probes(mf.smtp_addresses[0][1], "mf")
            await eventually(lambda: caplog.text.count("status=deferred") == len(PROBES),
                             what="mailflow deferred every probe")
            mailflow_logged = reply_filter_lines(printable(r.getMessage()) for r in caplog.records)
    assert set(mailflow_logged) == set(postfix_logged)  # (how many sessions each opened is the connection cache's)
    assert 'replacing server reply "250-PIPELINING" with "250-XPIPELINING"' in postfix_logged
    assert ("status=deferred (host 127.0.0.1[127.0.0.1] said: 450 4.1.5 filtered: Ok (in reply to RCPT TO "
            "command))") in postfix_logged
