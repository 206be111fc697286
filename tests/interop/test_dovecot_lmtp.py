"""mailflow's lmtp transport against a real Dovecot (LMTP in, IMAP out), on a private config and free ports.

Dovecot runs as root with its own base_dir, state and log in a fresh 0755 folder under /tmp (its mail processes
run as uid 65534, who cannot enter pytest's private tmp_path); it is stopped by its process group at teardown,
and the system instance is never touched. Mail is read back with stdlib imaplib."""
from __future__ import annotations

import asyncio
import email
import email.policy
import imaplib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import accepts, eventually, free_port, queue_becomes, require_tool, send

pytestmark = pytest.mark.interop

MAIL_UID = 65534  # nobody: Dovecot refuses uid 0 for mail (first_valid_uid)
USERS = {"alice@example.test": "alicepw", "bob@example.test": "bobpw"}
MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.test, bob@example.test\r\n"
    b"Subject: lmtp interop\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"Message-ID: <lmtp-interop-1@remote.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9\r\n"
    b"last line\r\n"
)
CONFIG = """\
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%d/%n/Maildir
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={root}/mail/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
"""


@dataclass
class Dovecot:
    root: Path
    lmtp_port: int
    imap_port: int

    @property
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def fetch_all(self, user: str) -> list[bytes]:
        """Every message in the user's INBOX, as IMAP returns it (RFC822, CRLF)."""
        with imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10) as imap:
            imap.login(user, USERS[user])
            imap.select("INBOX", readonly=True)
            _, [numbers] = imap.search(None, "ALL")
            messages = []
            for number in numbers.split():
                _, data = imap.fetch(number, "(RFC822)")
                messages.append(data[0][1])
            return messages


def wait_for_listeners(ports: list[int], proc: subprocess.Popen, root: Path, timeout: float = 15.0) -> None:
    """Poll until every port accepts a connection; fail when Dovecot exits or the time is up."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc.poll() is not None:
                output = [(root / name).read_text(errors="replace") for name in ("stderr.log", "dovecot.log")
                          if (root / name).exists()]
                pytest.fail(f"dovecot exited with {proc.returncode}: {' '.join(output)}")
            if accepts(port):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"dovecot did not listen on {port} within {timeout}s")
            time.sleep(0.05)


@pytest.fixture
def dovecot():
    binary = require_tool("dovecot")
    root = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-", dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "mail").mkdir()
    os.chown(root / "mail", MAIL_UID, MAIL_UID)
    (root / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in USERS.items()))
    server = Dovecot(root, free_port(), free_port())
    conf = root / "dovecot.conf"
    conf.write_text(CONFIG.format(root=root, uid=MAIL_UID, lmtp_port=server.lmtp_port, imap_port=server.imap_port))
    with open(root / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen([binary, "-F", "-c", str(conf)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_listeners([server.lmtp_port, server.imap_port], proc, root)
        yield server
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the private instance's process group (master and children), then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def lmtp_route(dovecot: Dovecot, **more: str) -> list[str]:
    routes = {"example.test": f"lmtp:[127.0.0.1]:{dovecot.lmtp_port}", **more}
    return ["inline:{" + ", ".join(f"{k}={v}" for k, v in routes.items()) + "}"]


def added_headers(stored: bytes, original: bytes) -> list[str]:
    """The header fields put before `original` on the way (asserting that `stored` is exactly them + original)."""
    assert stored.endswith(original), stored
    prefix = stored[: len(stored) - len(original)].decode()
    assert prefix.endswith("\r\n") or prefix == ""
    fields = re.split(r"\r\n(?![ \t])", prefix.removesuffix("\r\n")) if prefix else []
    assert all(re.match(r"[!-9;-~]+:", f) for f in fields), fields
    return [f.split(":", 1)[0] for f in fields]


# ---------------------------------------------------------------------------------------------------- tests


async def test_one_transaction_for_two_mailboxes_read_back_byte_exact(mailflow_server, dovecot, caplog):
    caplog.set_level(logging.INFO, logger="mailflow")
    mf = await mailflow_server(relay_domains=["example.test"], transport_maps=lmtp_route(dovecot))
    await send(mf.smtp_addresses[0][1], "sender@remote.test", ["alice@example.test", "bob@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])
    await queue_becomes(mf.store, {}, timeout=15)

    for user in ("alice@example.test", "bob@example.test"):
        [stored] = await asyncio.to_thread(dovecot.fetch_all, user)
        names = added_headers(stored, MESSAGE)
        # Dovecot's Return-Path and Received (naming our LHLO), then mailflow's Received, then the original as sent
        assert names == ["Return-Path", "Received", "Received"], names
        assert stored.startswith(b"Return-Path: <sender@remote.test>\r\nReceived: from mx.mailflow.test ([127.0.0.1])")
        assert b"with LMTP" in stored.split(b"\r\nReceived: from localhost")[0]
        assert b"by mx.mailflow.test (mailflow) with ESMTP" in stored

    relay = f"relay=127.0.0.1[127.0.0.1]:{dovecot.lmtp_port}"
    sent = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert len(sent) == 2 and all(relay in line for line in sent), sent
    assert len({line.split(":")[0] for line in sent}) == 1  # one queue id, one delivery
    # Dovecot's log: both saves in one LMTP session (same session id, bob's is ":R2"), and exactly one LMTP session
    # that got past the greeting (the other connection is the readiness probe), ended by QUIT
    logged_out = await eventually(lambda: dovecot.log.count("Disconnect from 127.0.0.1: Logged out"), timeout=5)
    assert logged_out == 1, dovecot.log
    assert len(re.findall(r"lmtp\(\d+\): Info: Connect from 127.0.0.1", dovecot.log)) == 2, dovecot.log
    saves = re.findall(r"lmtp\((\S+?)\)<\d+><([^>:]+)[^>]*>: Info: msgid=<lmtp-interop-1@remote.test>: "
                       r"saved mail to INBOX",
                       dovecot.log)
    assert sorted(user for user, _ in saves) == ["alice@example.test", "bob@example.test"], dovecot.log
    assert len({session for _, session in saves}) == 1, dovecot.log


async def test_unknown_user_bounces_with_dovecots_5_1_1(mailflow_server, dovecot, smtp_peer):
    sender_mx = await smtp_peer()
    routes = lmtp_route(dovecot, **{"remote.test": f"smtp:[127.0.0.1]:{sender_mx.port}"})
    mf = await mailflow_server(relay_domains=["example.test"], transport_maps=routes)
    await send(mf.smtp_addresses[0][1], "sender@remote.test", ["nobody@example.test", "alice@example.test"], MESSAGE,
               mail_options=["BODY=8BITMIME"])

    bounces = await eventually(lambda: [m for m in sender_mx.messages if m.mail_from == "<>"], timeout=15)
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["sender@remote.test"]
    await queue_becomes(mf.store, {}, timeout=15)
    notice = email.message_from_bytes(bounces[0].content, policy=email.policy.default)
    status = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status").get_payload()
    [fields] = status[1:]
    assert fields["Final-Recipient"] == "rfc822; nobody@example.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test"
    readable = next(p for p in notice.walk() if p.get_content_type() == "text/plain").get_content()
    assert "User doesn't exist" in readable
    # the known recipient of the same message was delivered
    [stored] = await asyncio.to_thread(dovecot.fetch_all, "alice@example.test")
    assert stored.endswith(MESSAGE)
