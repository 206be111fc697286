"""Plain helpers for tests that talk to a real mailflow (the fixtures live in tests/conftest.py).

- `base_settings(tmp_path)`: the test config: local domain local.test with users alice and bob, Maildirs
  under tmp_path/mail, relay domain relay.test, no trusted networks, fast retries, a DNS server that
  answers nothing. `merged(base, overrides)` overlays settings; `to_toml(settings)` writes them as TOML.
- `send(port, sender, rcpts, content)` speaks SMTP with aiosmtplib and returns (refused, final reply).
- `eventually(pred)`, `queue_becomes(store, counts)`, `rcpt_until(port, rcpt, code)`: bounded polling. `maildir_messages(dir)`, `free_port()`.
- `ServerProcess(config, log, port)`: `mailflow serve` as a child process (start, terminate, kill, CPU seconds);
  `queue_counts(db)` reads a queue database read-only beside it; `stall_mail(peer)` makes a capturing peer hold
  every MAIL command until the returned event is set (a slow destination).
- `big_message(size)`: a message bigger than the in-memory limit whose lines exercise every content transformation
  (leading dots, From_ lines, '>' runs, a line longer than a read); `spooled(directory, data)` is such content
  as the store keeps it (header section in memory, the rest in a file).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest


def base_settings(tmp_path: Path) -> dict:
    return {
        "myhostname": "mx.mailflow.test",
        "mydestination": ["localhost", "local.test"],
        "relay_domains": ["relay.test"],
        "mynetworks": [],
        "queue_directory": str(tmp_path / "queue"),
        "smtpd": {"listen": ["127.0.0.1:0"]},
        "local_recipient_maps": ["inline:{alice=ok, bob=ok}"],
        "local": {"maildir_base": str(tmp_path / "mail")},
        "queue": {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s", "tries": 1},
    }


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def to_toml(settings: dict) -> str:
    """Enough TOML for these settings: scalars and lists of strings (json strings are TOML strings)."""
    top = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


async def send(port: int, sender: str, rcpts: list[str], content: bytes, **kwargs):
    """One message over a fresh session; returns (refused recipients, final reply text)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as client:
        return await client.sendmail(sender, rcpts, content, **kwargs)


async def rcpt_reply(port: int, rcpt: str, sender: str = "s@remote.test") -> tuple[int, str]:
    """The server's reply to RCPT TO:<rcpt> in a fresh session, refused or not."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10) as c:
        await c.mail(sender)
        try:
            reply = await c.rcpt(rcpt)
            return reply.code, reply.message
        except aiosmtplib.SMTPRecipientRefused as e:
            return e.code, e.message


async def eventually(predicate, timeout: float = 10.0, step: float = 0.02):
    """Poll `predicate` until it is truthy or `timeout` passes; returns its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value or loop.time() >= deadline:
            return value
        await asyncio.sleep(step)


async def queue_becomes(store, expected: dict, timeout: float = 10.0) -> dict:
    """Poll the store's per-queue counts until they equal `expected`; returns the last counts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        counts = await store.counts()
        if counts == expected or loop.time() >= deadline:
            return counts
        await asyncio.sleep(0.02)


async def rcpt_until(port: int, rcpt: str, code: int, tries: int = 30) -> tuple[int, str]:
    """RCPT (fresh sessions, 0.1 s apart, at most `tries`) until the reply has `code`; returns the last reply.
    A changed table file is re-read in a worker thread, and lookups answer from the previous contents until
    the new ones are in: this waits until the server has seen the change."""
    for _ in range(tries):
        reply = await rcpt_reply(port, rcpt)
        if reply[0] == code:
            break
        await asyncio.sleep(0.1)
    return reply


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m mailflow serve -c CONFIG` as a child process, its output appended to `log_path`."""

    def __init__(self, config_path, log_path, port: int, cwd: Path | None = None):
        self.config_path, self.log_path, self.port = config_path, log_path, port
        self.cwd = cwd or Path.cwd()
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        log.close()
        if not await eventually(self._listening, timeout=15, step=0.05):
            self.kill()
            pytest.fail(f"server did not listen on {self.port}:\n{self.log_path.read_text()[-2000:]}")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    async def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait (without blocking the loop) for the exit; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout, step=0.05)
        if self.proc.poll() is None:
            self.kill()
            pytest.fail(f"server did not stop within {timeout}s of SIGTERM")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


    def cpu_seconds(self) -> float:
        """User + system CPU time of the running server."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_lines(self, *words: str) -> list[str]:
        """Lines of the server's output holding every one of `words`."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if all(w in line for w in words)]


def big_message(size: int = 1_000_000, seed: int = 1, long_line: bool = True) -> bytes:
    """A CRLF message of about `size` bytes; its body lines start with '.', 'From ', '>From ', '>>' now and then,
    and (`long_line`) one is 100 KB long, so that chunk boundaries fall everywhere that matters. (aiosmtpd
    peers refuse lines over 1000 bytes.)"""
    rng = random.Random(seed)
    starts = [b"", b"", b"", b".", b"..", b"From ", b">From ", b">>", b"F", b"x"]
    lines = [b"Subject: big %d\r\nX-Big: yes\r\n\r\n" % seed]
    total = len(lines[0])
    while total < size:
        line = rng.choice(starts) + b"w" * rng.randint(0, 120) + b" \xc3\xa9" * rng.randint(0, 2) + b"\r\n"
        if len(lines) == 300 and long_line:
            line = b"L" * 100_000 + b"\r\n"
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def spooled(directory: Path, data: bytes):
    """`data` as the store keeps a big message: the header section in memory, the rest in a file."""
    from mailflow.content import Content, FilePart
    from mailflow.message import split_header

    head, _ = split_header(data)
    path = directory / f"spooled-{len(data)}"
    path.write_bytes(data)
    return Content((head, FilePart(str(path), len(head), len(data) - len(head))))


def queue_counts(db: Path) -> dict:
    """{queue: messages} of a queue database, read-only beside a running server."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(con.execute("SELECT queue, count(*) FROM message GROUP BY queue").fetchall())
    finally:
        con.close()


def stall_mail(peer) -> asyncio.Event:
    """Make `peer` (tests.conftest.CapturePeer) hold each MAIL until the event is set; `peer.stalled` counts
    the MAIL commands that waited."""
    gate = asyncio.Event()
    handler = peer.handler
    handler.stalled = 0
    answer = type(handler).handle_MAIL

    async def held(server, session, envelope, address, options):
        handler.stalled += 1
        await gate.wait()
        return await answer(handler, server, session, envelope, address, options)

    handler.handle_MAIL = held
    return gate
