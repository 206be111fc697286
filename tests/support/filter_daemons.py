"""Real Debian filters started privately for the tests (RECIPES.md section 8): OpenDKIM as a milter, SpamAssassin's
spamd, ClamAV's clamd with a signature database the test writes. Each runs in the foreground as a child of the
test process, on a free port of 127.0.0.1, with its own folder, and is ready when it answers its protocol.

    Daemon(argv, port, ready).start() / .stop() / .kill()
    opendkim(folder, dns_records) -> Daemon     verifying (every client external), AR header always, a bad
                                                signature rejected; `dns_records`: TestDNSData lines
    spamd(folder) -> Daemon                     the stock rules (GTUBE), no network tests; `folder` from
                                                world_readable_folder() (spamd reads it as nobody)
    clamd(folder, signatures) -> Daemon         `signatures`: {"name.ndb": text, ...} written to its database
    MARKER                                      the body string the clamd test signature finds
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import require_tool
from tests.support import free_port

MARKER = b"MAILFLOW-TEST-MALWARE-7d1c"


class Daemon:
    def __init__(self, argv: list[str], port: int, ready, name: str, log: Path):
        self.argv, self.port, self._ready, self.name, self.log = argv, port, ready, name, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Daemon":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self._ready(self.port):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def _connect(port: int) -> socket.socket | None:
    try:
        s = socket.create_connection(("127.0.0.1", port), 0.5)
    except OSError:
        return None
    s.settimeout(2)
    return s


def milter_ready(port: int) -> bool:
    s = _connect(port)
    if s is None:
        return False
    with s:
        try:
            s.sendall(struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0x1FFFFF))
            return s.recv(5)[4:5] == b"O"
        except OSError:
            return False


def spamd_ready(port: int) -> bool:
    s = _connect(port)
    if s is None:
        return False
    with s:
        try:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in s.recv(100)
        except OSError:
            return False


def clamd_ready(port: int) -> bool:
    s = _connect(port)
    if s is None:
        return False
    with s:
        try:
            s.sendall(b"zPING\0")
            return s.recv(10).startswith(b"PONG")
        except OSError:
            return False


def opendkim(folder: Path, dns_records: list[str]) -> Daemon:
    binary = require_tool("opendkim")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dns.txt").write_text("".join(line + "\n" for line in dns_records))
    port = free_port()
    (folder / "opendkim.conf").write_text(
        f"Background no\nSocket inet:{port}@127.0.0.1\nPidFile {folder}/opendkim.pid\nMode v\n"
        "InternalHosts 192.0.2.1\nAuthservID mx.mailflow.test\nAlwaysAddARHeader yes\n"
        "On-BadSignature reject\nOn-NoSignature accept\n"
        f"TestDNSData file:{folder}/dns.txt\nRequireSafeKeys false\nSyslog no\n")
    return Daemon([binary, "-f", "-x", str(folder / "opendkim.conf")], port, milter_ready, "opendkim",
                  folder / "opendkim.log")


def spamd(folder: Path) -> Daemon:
    """`folder` must be readable by `nobody` (spamd reads its configuration after dropping privileges): see
    `world_readable_folder`."""
    binary = require_tool("spamd")
    site, home = folder / "site", folder / "home"
    site.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    shutil.chown(home, "nobody", "nogroup")
    for folder_of_pre in (Path("/etc/spamassassin"), Path("/etc/mail/spamassassin")):  # (Debian moved it)
        for pre in folder_of_pre.glob("*.pre"):
            shutil.copy(pre, site)
    (site / "local.cf").write_text("dns_available no\nskip_rbl_checks 1\nuse_bayes 0\nbayes_auto_learn 0\n"
                                   "use_razor2 0\nuse_pyzor 0\nreport_safe 0\n")
    port = free_port()
    argv = [binary, f"--siteconfigpath={site}", "--configpath=/usr/share/spamassassin", "-L", "-x", "-u", "nobody",
            "-g", "nogroup", f"--helper-home-dir={home}", f"--listen=127.0.0.1:{port}", "--allowed-ips=127.0.0.1",
            "--max-children=2", "--min-children=1", f"--pidfile={folder}/spamd.pid",
            f"--syslog={folder}/spamd-syslog.log"]
    return Daemon(argv, port, spamd_ready, "spamd", folder / "spamd.log")


def world_readable_folder(prefix: str) -> Path:
    """A new folder under the system's temporary directory that other users may read (pytest's are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def clamd(folder: Path, signatures: dict[str, str]) -> Daemon:
    binary = require_tool("clamd")
    database = folder / "db"
    database.mkdir(parents=True, exist_ok=True)
    for name, text in signatures.items():
        (database / name).write_text(text)
    port = free_port()
    (folder / "clamd.conf").write_text(
        f"Foreground yes\nTCPSocket {port}\nTCPAddr 127.0.0.1\nDatabaseDirectory {database}\n"
        f"PidFile {folder}/clamd.pid\nLogFile {folder}/clamd-own.log\nSelfCheck 0\nMaxThreads 4\n")
    if os.geteuid() == 0:
        with open(folder / "clamd.conf", "a") as conf:
            conf.write("User root\n")
    return Daemon([binary, f"--config-file={folder / 'clamd.conf'}"], port, clamd_ready, "clamd",
                  folder / "clamd.log")


def marker_signature() -> str:
    """A clamd .ndb line (name:type:offset:hex) that finds MARKER anywhere."""
    return f"Mailflow.Test.Marker:0:*:{MARKER.hex()}\n"
