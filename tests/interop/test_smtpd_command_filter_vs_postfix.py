"""Differential test: [smtpd] command_filter against a private Postfix 3.7 with the same smtpd_command_filter: the
same dialogue gets the same replies (a command rewritten before it is parsed), and the same log lines (`replacing
command`; for a table that cannot answer, the lookup error and `reject: CONNECT from ...: 421 4.3.0 ... Server local
data error`)."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import pytest

from mailflow.logs import printable
from tests.support import SmtpClient, eventually, postfix_instance

pytestmark = pytest.mark.interop

FILTER = ["/^(RCPT\\s+TO:\\s*<[^>]*>)\\s+XBROKEN=\\S+$/ $1", "/^NOOP(.*)$/ RSET$1", "/^HELP$/ NOOP"]
DIALOGUE = ["EHLO client.test", "MAIL FROM:<bob@remote.test>", "RCPT TO:<alice@box.local> XBROKEN=1",
            "RCPT TO:<carol@box.local> XOTHER=1", "NOOP", "HELP", "QUIT"]


async def replies(port: int) -> list[tuple[int | None, str]]:
    """Each command's reply code and its enhanced code (the texts name each server; EHLO's keywords differ)."""
    c = await SmtpClient.connect(port)
    out = []
    for line in DIALOGUE:
        reply = await c.cmd(line)
        enhanced = reply.text.split("\n")[-1][4:].split(" ")[0] if not line.startswith("EHLO") else ""
        out.append((reply.code, enhanced))
    return out


def filter_lines(lines) -> list[str]:
    out = []
    for line in lines:
        found = re.search(r"(localhost\[127\.0\.0\.1\]: replacing command .*|\S+ lookup error for .*"
                          r"|reject: \S+ from localhost\[127\.0\.0\.1\]: 421 4\.3\.0 )", line)
        if found:
            out.append(found.group(1))
    return out


@pytest.fixture
def table():
    with tempfile.TemporaryDirectory(prefix="mf-command-filter-") as folder:
        os.chmod(folder, 0o755)
        path = Path(folder) / "command_filter"
        path.write_text("".join(f"{line}\n" for line in FILTER))
        path.chmod(0o644)
        yield f"regexp:{path}"


async def test_smtpd_command_filter_matches_a_real_postfix(mailflow_server, table, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    main_cf = {"myhostname": "box.local", "mydestination": "box.local", "local_recipient_maps": "",
               "smtpd_command_filter": table}
    async with postfix_instance(main_cf) as pf:
        postfix_replies = await replies(pf.port)
        await eventually(lambda: "quit=1" in pf.maillog, what="Postfix logged the session's end")
        postfix_logged = filter_lines(pf.maillog.splitlines())
    mf = await mailflow_server(myhostname="box.local", mydestination=["box.local"], local_recipient_maps=[],
                               smtpd={"command_filter": [table]})
    mailflow_replies = await replies(mf.smtp_addresses[0][1])
    assert mailflow_replies == postfix_replies
    assert filter_lines(printable(r.getMessage()) for r in caplog.records) == postfix_logged
    assert postfix_replies[2][0] == 250 and postfix_replies[3][0] == 555  # (the edges themselves)
    assert 'localhost[127.0.0.1]: replacing command "NOOP" with "RSET"' in postfix_logged


async def test_a_command_filter_that_cannot_answer_matches_a_real_postfix(mailflow_server, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    async with postfix_instance({"myhostname": "box.local", "smtpd_command_filter": "fail:down"}) as pf:
        c = await SmtpClient.connect(pf.port)
        postfix_reply = await c.cmd("EHLO client.test")
        await eventually(lambda: "Server local data error" in pf.maillog, what="Postfix logged the refusal")
        postfix_logged = filter_lines(pf.maillog.splitlines())
    mf = await mailflow_server(myhostname="box.local", smtpd={"command_filter": ["fail:down"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd("EHLO client.test") == postfix_reply
    assert filter_lines(printable(r.getMessage()) for r in caplog.records) == postfix_logged
    assert postfix_reply.code == 421 and len(postfix_logged) == 2
