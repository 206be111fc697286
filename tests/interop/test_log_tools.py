"""The mail log as the tools people feed it to read it: real SMTP traffic through a real mailflow, its log in
`[log] format = "text"` written to a file, then Debian's pflogsumm and fail2ban-regex (with fail2ban's stock
`postfix` filters) run on that file, and their counts checked.

Traffic: one message accepted and delivered, one relay refusal, one unknown user, one failed AUTH.
"""
from __future__ import annotations

import base64
import re

import pytest

from mailflow.stages.smtpd.auth import hash_password
from tests.support import LOOPBACK_CLIENT, SmtpClient, eventually, maildir_messages, require_tool, run_tool
from tests.support.maillog import SYSLOG_NAME

pytestmark = pytest.mark.interop




async def test_pflogsumm_and_fail2ban_read_the_mail_log(mailflow_server, mail_log, tmp_path):
    pflogsumm, fail2ban_regex = require_tool("pflogsumm"), require_tool("fail2ban-regex")
    users = tmp_path / "users"
    users.write_text(f"alice {hash_password('s3cret', n=1024)}\n")
    mf = await mailflow_server(smtpd={"sasl_auth_enable": True, "sasl_user_maps": [f"texthash:{users}"],
                                      "allow_plaintext_auth_on_loopback": True, "auth_failure_delay": 0})
    port = mf.smtp_addresses[0][1]

    c = await SmtpClient.connect(port)
    assert (await c.cmd("EHLO client.remote.test")).code == 250
    assert (await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode())).code == 535
    assert (await c.cmd("MAIL FROM:<sender@remote.test>")).code == 250
    assert (await c.cmd("RCPT TO:<someone@elsewhere.test>")).code == 554  # relay access denied
    assert (await c.cmd("RCPT TO:<nobody@local.test>")).code == 550  # user unknown
    assert (await c.cmd("RCPT TO:<alice@local.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    assert (await c.cmd("Subject: log test\r\n\r\nhello\r\n.")).code == 250
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    mailbox = tmp_path / "mail" / "alice" / "Maildir"
    await eventually(lambda: maildir_messages(mailbox))
    await eventually(lambda: ": removed" in mail_log.read_text())
    await mf.stop()  # the disconnect line is written

    text = mail_log.read_text()
    client = re.escape(LOOPBACK_CLIENT)  # named as Postfix names it: localhost[127.0.0.1], from /etc/hosts
    assert re.search(rf"^\S+ mx\.mailflow\.test {SYSLOG_NAME}/smtpd\[\d+\]: [0-9A-F]+: client={client}$",
                     text, re.M), text
    assert re.search(rf"disconnect from {client} ehlo=1 auth=0/1 mail=1 rcpt=1/3 data=1 quit=1 "
                     r"commands=5/8$", text, re.M), text

    rc, summary = await run_tool(pflogsumm, f"--syslog-name={SYSLOG_NAME}", str(mail_log))
    assert rc == 0, summary
    totals = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(received|delivered|rejected)\b",
                                                             summary, re.M)}
    assert totals == {"received": 1, "delivered": 1, "rejected": 2}, summary

    rc, rejects = await run_tool(fail2ban_regex, str(mail_log), "postfix")
    assert rc == 0, rejects
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 2 matched", rejects, re.M), rejects
    rc, auth = await run_tool(fail2ban_regex, str(mail_log), "postfix[mode=auth]")
    assert rc == 0, auth
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 1 matched", auth, re.M), auth
    assert "127.0.0.1" in auth


async def test_fail2ban_reads_postscreens_reject_line(mailflow_server, mail_log, dns_zone):
    """postscreen's enforce line (`postfix-mailflow/postscreen`, the client as `[ip]:port`) is one fail2ban's stock
    postfix filter matches, as it matches Postfix's postscreen (its rbl mode does not: it wants smtpd's 554 and
    "Client host", for Postfix as for mailflow); its ddos mode matches the PREGREET line."""
    fail2ban_regex = require_tool("fail2ban-regex")
    nameserver = dns_zone("$ORIGIN bl.test.\n1.0.0.127 60 IN A 127.0.0.2\n")
    mf = await mailflow_server(dns={"nameservers": [nameserver]},
                               smtpd={"postscreen": {"enable": True, "access_list": [], "greet_wait": 0.1,
                                                     "dnsbl_sites": ["bl.test"], "dnsbl_action": "enforce"}})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO zombie.test")).code == 250
    assert (await c.cmd("MAIL FROM:<s@remote.test>")).code == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>")).code == 550
    assert (await c.cmd("QUIT")).code == 221
    zombie = await SmtpClient.connect(mf.smtp_addresses[0][1], first=b"EHLO zombie.test\r\n", greet=False)
    assert (await zombie.reply()).code == 220  # the teaser, then the dummy engine's greeting
    assert (await zombie.reply()).code == 250  # its EHLO, answered by the dummy engine (greet_action ignore)
    assert (await zombie.cmd("QUIT")).code == 221
    await eventually(lambda: mail_log.read_text().count("DISCONNECT [127.0.0.1]") == 2)

    text = mail_log.read_text()
    assert re.search(rf"^\S+ mx\.mailflow\.test {SYSLOG_NAME}/postscreen\[\d+\]: NOQUEUE: reject: RCPT from "
                     r"\[127\.0\.0\.1\]:\d+: 550 5\.7\.1 Service unavailable; client \[127\.0\.0\.1\] blocked using "
                     r"bl\.test; from=<s@remote\.test>, to=<alice@local\.test>, proto=ESMTP, helo=<zombie\.test>$",
                     text, re.M), text
    rc, rejects = await run_tool(fail2ban_regex, str(mail_log), "postfix")
    assert rc == 0, rejects
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 1 matched", rejects, re.M), rejects
    rc, ddos = await run_tool(fail2ban_regex, str(mail_log), "postfix[mode=ddos]")  # its PREGREET line
    assert rc == 0, ddos
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 1 matched", ddos, re.M), ddos
