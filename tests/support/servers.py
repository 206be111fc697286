"""A mailflow under test: its settings, and `mailflow serve` as a child process.

- `base_settings(tmp_path)`: the test config: local domain local.test with users alice and bob, Maildirs under
  tmp_path/mail, relay domain relay.test, no trusted networks, fast retries, a DNS server that answers nothing.
  `merged(base, overrides)` overlays settings (one level deep); `to_toml(settings)` writes them as TOML (lists of
  tables, such as `smtpd.listeners`, as arrays of inline tables).
- `ServerProcess(config, log, port)`: `python -m mailflow serve -c CONFIG` as a child process (launch, start,
  terminate, kill, CPU seconds, log lines); `queue_counts(db)` reads a queue database read-only beside a running server.
- `ServerThread(settings)`: mailflow in this process, on an event loop of its own in a thread, for tests that drive
  it with blocking sockets (`port`, `counts()`, `settle(maildir, count)`: the messages delivered once the queue is
  empty, `stop()`).
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mailflow.app import Mailflow
from mailflow.config import config_from_dict
from mailflow.config.load import load_config
from mailflow.syntax import parse_hostport
from tests.support.content import maildir_messages
from tests.support.ports import accepts
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


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
    """Enough TOML for these settings: scalars, lists and inline tables (json strings are TOML strings), in
    top-level tables one level deep."""
    top = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in settings.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def toml_value(value) -> str:
    """A TOML value: a list as an array, a dict as an inline table (`[{address = "…", role = "mta"}]`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


class ServerProcess:
    """`python -m mailflow serve -c CONFIG` as a child process, its output appended to `log_path`."""

    def __init__(self, config_path, log_path, port: int, cwd: Path | None = None, nofile: int | None = None):
        """`nofile`: the process's file descriptor limit, soft and hard (None: this process's)."""
        self.config_path, self.log_path, self.port = config_path, log_path, port
        self.cwd = cwd or Path.cwd()
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the process, without waiting for it to listen."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "-c", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=self._limits)
        log.close()

    def _limits(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    async def start(self) -> None:
        """Launch, then wait until every SMTP listener of the configuration accepts connections. The server binds
        its listeners one after another (each address resolved off the loop first): one listening says nothing
        of the next, least of all on a loaded machine."""
        self.launch()
        waiting = listener_addresses(self.config_path) | {("127.0.0.1", self.port)}
        try:
            await eventually(lambda: all(accepts(port, host) for host, port in waiting), timeout=15, step=0.05)
        except AssertionError:
            self.kill()
            silent = sorted(f"{host}:{port}" for host, port in waiting if not accepts(port, host))
            pytest.fail(f"server did not listen on {', '.join(silent)}:\n{self.log_path.read_text()[-2000:]}")

    async def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait (without blocking the loop) for the exit; returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await eventually(lambda: self.proc.poll() is not None, timeout=timeout, step=0.05)
        except AssertionError:
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


def listener_addresses(config_path: Path) -> set[tuple[str, int]]:
    """(host, port) of every SMTP listener a configuration file names with a fixed port; a wildcard host as
    127.0.0.1 (where a test connects)."""
    config = load_config(config_path)
    addresses = set()
    for address, _role, _settings, _key in config.smtpd.listener_settings():
        host, port = parse_hostport(address)
        if port:
            addresses.add((host or "127.0.0.1", port))
    return addresses


def queue_counts(db: Path) -> dict:
    """{queue: messages} of a queue database, read-only beside a running server."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(con.execute("SELECT queue, count(*) FROM message GROUP BY queue").fetchall())
    finally:
        con.close()


class ServerThread:
    """mailflow on its own loop in a thread; `port` (its first SMTP listener), `counts()`, `settle()`, `stop()`."""

    def __init__(self, settings: dict, start_within: float = 10):
        self._settings = settings
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(start_within), "mailflow did not start"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.mf = Mailflow(config_from_dict(self._settings), shutdown_grace=1.0)
        await self.mf.start()
        self.port = self.mf.smtp_addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await self.mf.stop()

    def counts(self) -> dict:
        return asyncio.run_coroutine_threadsafe(self.mf.store.counts(), self._loop).result(5)

    def settle(self, maildir: Path, count: int, within: float = 20.0) -> list[bytes]:
        """The messages in `maildir` once it holds `count` and the queue is empty (`within` seconds at most; an
        AssertionError when the queue is not empty by then)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and (len(maildir_messages(maildir)) < count or self.counts()):
            time.sleep(0.05)
        assert self.counts() == {}, self.counts()
        return maildir_messages(maildir)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
