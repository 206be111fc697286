"""The mail log as the tools people feed it to read it: real SMTP traffic through a real mailflow, its log in
`[log] format = "text"` written to a file, then Debian's pflogsumm and fail2ban-regex (with fail2ban's stock
`postfix` filters) run on that file, and their counts checked.

Traffic: one message accepted and delivered, one relay refusal, one unknown user, one failed AUTH.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re

import pytest

from mailflow.config import LogConfig
from mailflow.logs import setup_logging
from mailflow.stages.smtpd.auth import hash_password
from tests.conftest import require_tool
from tests.helpers import eventually, maildir_messages

pytestmark = pytest.mark.interop
SYSLOG_NAME = "postfix-mailflow"


async def run(*argv: str, timeout: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[0]} did not finish within {timeout}s")
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.fixture
def mail_log(tmp_path):
    """mailflow's logging set up as `mailflow serve` does with `[log] file`, put back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    path = tmp_path / "mail.log"
    setup_logging(LogConfig(file=str(path), syslog_name=SYSLOG_NAME), "mx.mailflow.test")
    yield path
    for handler in root.handlers:
        handler.close()
    root.handlers[:], level = saved
    root.setLevel(level)


class Talk:
    """A raw SMTP client: `cmd(line)` -> reply code."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Talk":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        talk = cls(reader, writer)
        assert await talk.reply() == 220
        return talk

    async def reply(self) -> int:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if line[3:4] != b"-":
                return int(line[:3])

    async def cmd(self, line: str) -> int:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def quit(self) -> None:
        assert await self.cmd("QUIT") == 221
        self.writer.close()


async def test_pflogsumm_and_fail2ban_read_the_mail_log(mailflow_server, mail_log, tmp_path):
    pflogsumm, fail2ban_regex = require_tool("pflogsumm"), require_tool("fail2ban-regex")
    users = tmp_path / "users"
    users.write_text(f"alice {hash_password('s3cret', n=1024)}\n")
    mf = await mailflow_server(smtpd={"sasl_auth_enable": True, "sasl_user_maps": [f"texthash:{users}"],
                                      "allow_plaintext_auth_on_loopback": True, "auth_failure_delay": 0})
    port = mf.smtp_addresses[0][1]

    c = await Talk.open(port)
    assert await c.cmd("EHLO client.remote.test") == 250
    assert await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode()) == 535
    assert await c.cmd("MAIL FROM:<sender@remote.test>") == 250
    assert await c.cmd("RCPT TO:<someone@elsewhere.test>") == 554  # relay access denied
    assert await c.cmd("RCPT TO:<nobody@local.test>") == 550  # user unknown
    assert await c.cmd("RCPT TO:<alice@local.test>") == 250
    assert await c.cmd("DATA") == 354
    assert await c.cmd("Subject: log test\r\n\r\nhello\r\n.") == 250
    await c.quit()
    mailbox = tmp_path / "mail" / "alice" / "Maildir"
    assert await eventually(lambda: maildir_messages(mailbox))
    assert await eventually(lambda: ": removed" in mail_log.read_text())
    await mf.stop()  # the disconnect line is written

    text = mail_log.read_text()
    assert re.search(rf"^\S+ mx\.mailflow\.test {SYSLOG_NAME}/smtpd\[\d+\]: [0-9A-F]+: client=unknown\[127\.0\.0\.1\]$",
                     text, re.M), text
    assert re.search(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 auth=0/1 mail=1 rcpt=1/3 data=1 quit=1 "
                     r"commands=5/8$", text, re.M), text

    summary = await run(pflogsumm, f"--syslog-name={SYSLOG_NAME}", str(mail_log))
    totals = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(received|delivered|rejected)\b",
                                                             summary, re.M)}
    assert totals == {"received": 1, "delivered": 1, "rejected": 2}, summary

    rejects = await run(fail2ban_regex, str(mail_log), "postfix")
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 2 matched", rejects, re.M), rejects
    auth = await run(fail2ban_regex, str(mail_log), "postfix[mode=auth]")
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 1 matched", auth, re.M), auth
    assert "127.0.0.1" in auth
