"""The load and sink programs: Postfix's smtp-source/smtp-sink, or the built-in stand-ins.

Contract:
- `Tools.detect(mode)` picks the programs: mode "auto" uses /usr/sbin/smtp-source and smtp-sink when both are
  installed, else loadgen.py and capture_sink.py (this directory, run with the current Python); "builtin"
  forces the stand-ins. Both pairs have the same command line and the same `mesg=N` counter output.
- `Sink.start(tools, port)` runs the sink with running counters (-c) on 127.0.0.1:PORT, waits (bounded, 5 s)
  until it accepts connections, and tracks the message counter from a reader thread. `wait_for(n, timeout)`
  returns the perf_counter time the n-th message arrived, or None. `stop()` always ends the process
  (SIGTERM, then SIGKILL) and returns the final count.
  The sink is not given -M: smtp-sink -M N exits on the N-th message *before* answering it, which leaves
  that message deferred in the server under test and re-delivered into the next run. The counter ticks at
  the same moment -M would exit, so end-to-end time is the same; the sink then stays up for a drain window
  so that late or duplicate deliveries are counted instead of leaking into the next run.
- `run_source(...)` runs one load (N messages over C sessions, size L) against a target, bounded by timeout;
  returns (ok, seconds, error text).
- For the one-server probes (calls.py, metrics_cost.py): `free_port()` a free 127.0.0.1 port; `installed(name)`
  a program's path (PATH, then /usr/sbin) or exit; `wait_until(predicate, timeout, what)` polls every 50 ms and
  exits with "timed out: WHAT" past `timeout`; `queued_messages(db)` the messages in a queue database (-1 when
  it cannot be read yet).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
COUNTER = re.compile(rb"mesg=(\d+)")
DUPS = re.compile(rb"dups=(\d+)")
SENDER = "bench@source.test"
RECIPIENT = "bench@dest.test"


def check_loopback_port(port: int) -> None:
    if not 2500 <= port <= 2599:
        raise ValueError(f"port {port} outside 2500-2599")


def wait_listening(port: int, timeout: float, alive=lambda: True) -> bool:
    """Bounded TCP-connect loop on 127.0.0.1:port; False on timeout or when alive() turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def end_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; never raises for an already-gone process."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed(name: str) -> str:
    found = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(found):
        sys.exit(f"{name} is not installed")
    return found


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {what}")
        time.sleep(0.05)


def queued_messages(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM message").fetchone()[0]
    except sqlite3.Error:
        return -1


def _if_exists(path: str) -> str | None:
    return path if os.path.exists(path) else None


@dataclass(frozen=True)
class Tools:
    """Command prefixes for the load generator and the sink, and whether they are Postfix's."""

    source: tuple[str, ...]
    sink: tuple[str, ...]
    postfix_tools: bool

    @classmethod
    def detect(cls, mode: str = "auto") -> "Tools":
        source = shutil.which("smtp-source") or _if_exists("/usr/sbin/smtp-source")
        sink = shutil.which("smtp-sink") or _if_exists("/usr/sbin/smtp-sink")
        if mode == "auto" and source and sink:
            user = ("-u", "nobody") if os.geteuid() == 0 else ()
            return cls((source,), (sink, *user), True)
        return cls((sys.executable, str(HERE / "loadgen.py")), (sys.executable, str(HERE / "capture_sink.py")), False)

    def describe(self) -> str:
        return "smtp-source + smtp-sink (Postfix)" if self.postfix_tools else "built-in loadgen.py + capture_sink.py"


class Sink:
    """A running sink process and its live message counter."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self.count = 0
        self.duplicates = 0
        self.arrivals: dict[int, float] = {}
        self._changed = threading.Condition()
        self._stderr = b""
        self._reader = threading.Thread(target=self._read_counters, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, tools: Tools, port: int) -> "Sink":
        check_loopback_port(port)
        proc = subprocess.Popen([*tools.sink, "-c", f"127.0.0.1:{port}", "1024"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        sink = cls(proc, port)
        try:
            listening = wait_listening(port, 5.0, alive=lambda: proc.poll() is None)
        except BaseException:
            sink.stop()
            raise
        if not listening:
            sink.stop()
            raise RuntimeError(f"sink did not listen on 127.0.0.1:{port}: {sink.error_text()}")
        return sink

    def _read_counters(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            now = time.perf_counter()
            counts = COUNTER.findall(chunk)
            dups = DUPS.findall(chunk)
            with self._changed:
                for c in map(int, counts):
                    self.arrivals.setdefault(c, now)
                if counts:
                    self.count = max(self.count, int(counts[-1]))
                if dups:
                    self.duplicates = int(dups[-1])
                self._changed.notify_all()

    def wait_for(self, n: int, timeout: float) -> float | None:
        """perf_counter time at which the n-th message arrived, or None after `timeout` seconds."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._changed.wait(min(left, 0.5))
            return min(t for c, t in self.arrivals.items() if c >= n)

    def stop(self) -> int:
        end_process(self.proc, grace=3.0)
        self._reader.join(timeout=3.0)
        if self.proc.stderr:
            self._stderr = self.proc.stderr.read() or b""
        return self.count

    def error_text(self) -> str:
        return self._stderr.decode(errors="replace").strip()[-300:]


def run_source(tools: Tools, port: int, sessions: int, size: int, count: int,
               timeout: float) -> tuple[bool, float, str]:
    """One smtp-source load; (ok, seconds until it exited, error text). Killed after `timeout` seconds."""
    check_loopback_port(port)
    cmd = [*tools.source, "-s", str(sessions), "-l", str(size), "-m", str(count),
           "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        return False, time.perf_counter() - t0, f"load generator still running after {timeout:.0f} s (killed)"
    except BaseException:  # Ctrl-C: do not leave it running in its own session
        proc.kill()
        proc.wait(timeout=5)
        raise
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, elapsed, f"load generator exit {proc.returncode}: {err.decode(errors='replace').strip()[-300:]}"
    return True, elapsed, ""
