"""Log volume a stranger can cause: no line of the mail log carries more than Postfix's 2000 bytes of text after
its prefix (msg_logger's and msg_syslog's `%.2000s`), whatever a peer sends.

A relay peer refuses a recipient with a multi-line reply of two 1500-character lines: the SMTP client keeps both
(they come within line_length_limit, as Postfix's smtp_chat_resp keeps them), so the bounce's `status=bounced (host
… said: …)` text is over 3000 bytes; the line written to the log file is cut at 2000 bytes of text, its start (the
queue id, `to=`, `relay=`, `dsn=`, `status=bounced`) whole, as pflogsumm reads it."""
from __future__ import annotations

import re

from tests.support import eventually, maildir_messages, send
from tests.support.maillog import SYSLOG_NAME, mail_log_file

TEXT_LIMIT = 2000  # Postfix's MSG_LOGGER_RECLEN


def text_of(line: str) -> str:
    """What follows a line's `NAME/SERVICE[PID]: ` prefix."""
    return re.split(rf" {SYSLOG_NAME}/[\w/-]+\[\d+\]: ", line, maxsplit=1)[1]


async def test_a_peers_long_multi_line_refusal_is_logged_cut_at_2000_bytes(mailflow_server, smtp_peer, tmp_path):
    peer = await smtp_peer()
    peer.handler.rcpt_replies["gone@relay.test"] = f"550-5.1.1 {'a' * 1500}\r\n550 5.1.1 {'b' * 1500}"
    mf = await mailflow_server(relayhost=f"[127.0.0.1]:{peer.port}")
    log_file = tmp_path / "mail.log"
    with mail_log_file(log_file):
        await send(mf.smtp_addresses[0][1], "alice@local.test", ["gone@relay.test"], b"Subject: a\r\n\r\nx\r\n")
        await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"), what="the bounce")
    lines = log_file.read_text().splitlines()
    [bounced] = [line for line in lines if "to=<gone@relay.test>" in line]
    assert re.search(r": to=<gone@relay\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, delay=[\d.]+, "
                     r"delays=[\d./]+, dsn=5\.1\.1, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
                     r"550-5\.1\.1 a{1400}", bounced), bounced[:400]
    assert len(text_of(bounced).encode()) == TEXT_LIMIT, len(text_of(bounced).encode())
    assert all(len(text_of(line).encode()) <= TEXT_LIMIT for line in lines)
