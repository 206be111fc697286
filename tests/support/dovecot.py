"""A private Dovecot (LMTP in, IMAP out) for interop tests, on its own config and free ports; the system instance
is never touched (../shared/docs/RECIPES.md, section 2).

    with dovecot_instance() as dovecot:      # the `dovecot` fixture of tests/conftest.py
        dovecot.lmtp_port, dovecot.imap_port
        dovecot.fetch_all(user)              # every message of the user's INBOX (imaplib, RFC822, CRLF)
        dovecot.log                          # its log so far
        dovecot.auth_socket                  # its auth server's client socket (SASL for Postfix and mailflow)
        dovecot.pause() / dovecot.resume()   # SIGSTOP / SIGCONT the whole instance: a mailbox store that stalls
    lmtp_route(dovecot, **more)              # transport_maps sending example.test (and `more`) to its LMTP

Users: USERS (alice@example.test, bob@example.test). Dovecot runs as root with its own base_dir, state and log
in a fresh 0755 folder under /tmp (its mail processes run as uid 65534, who cannot enter pytest's private
tmp_path); it is stopped by its process group (SIGTERM, then SIGKILL) and the folder removed. Needs Dovecot
(`require_tool`: skips, or fails under MAILFLOW_REQUIRE_TOOLS=1).
"""
from __future__ import annotations

import contextlib
import imaplib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.ports import accepts, free_port
from tests.support.tools import require_tool

MAIL_UID = 65534  # nobody: Dovecot refuses uid 0 for mail (first_valid_uid)
USERS = {"alice@example.test": "alicepw", "bob@example.test": "bobpw"}

CONFIG = """\
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
ssl = no
auth_failure_delay = 0
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
service auth {{
  unix_listener auth-sasl {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@dataclass
class Dovecot:
    root: Path
    lmtp_port: int
    imap_port: int
    proc: subprocess.Popen | None = None

    def pause(self) -> None:
        """SIGSTOP the instance (master and children): connections are accepted by the kernel, nothing answers."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    @property
    def auth_socket(self) -> Path:
        """The auth server's client socket (mode 0666: Postfix's smtpd, as the postfix user, and mailflow ask it)."""
        return self.root / "run" / "auth-sasl"

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


@contextlib.contextmanager
def dovecot_instance() -> Iterator[Dovecot]:
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
        proc = server.proc = subprocess.Popen([binary, "-F", "-c", str(conf)], start_new_session=True,
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
        os.killpg(proc.pid, signal.SIGCONT)  # a paused instance cannot act on SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def lmtp_route(dovecot: Dovecot, **more: str) -> list[str]:
    routes = {"example.test": f"lmtp:[127.0.0.1]:{dovecot.lmtp_port}", **more}
    return ["inline:{" + ", ".join(f"{k}={v}" for k, v in routes.items()) + "}"]
