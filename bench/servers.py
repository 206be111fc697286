"""The servers under test: mailflow (a subprocess) and a throwaway Postfix relay instance.

Contract (both classes):
- `start()` brings the server up listening on 127.0.0.1:port, relaying every non-local message to
  [127.0.0.1]:sink_port, and returns only once a TCP connect succeeds (bounded wait); raises
  `ServerError` with the reason (and the log tail) otherwise.
- `stop()` is idempotent and never raises; `reset()` = stop + start with an empty queue (used after a
  failed run, so left-over mail cannot leak into the next cell).
- `state()` (while running) -> dict of what is worth reporting after the load: messages still queued, and
  for mailflow its RSS and CPU seconds so far. Best effort: a key is missing when it cannot be read.
- `pid()` (while running) -> the process whose tree is the server (bench/procstat.py meters it): mailflow's
  process; Postfix's master, whose children are its daemons.
- `cpus` (constructor, None by default): a CPU list for `taskset -c` (the pinned mode of bench/run.py); the
  server and every process it starts run only there.
- Everything lives under the run's temp dir; nothing outside it is written. Only loopback, ports 2500-2599.

MailflowServer writes `config.toml` (the keys bench/README.md lists), runs `mailflow serve --config FILE` with
stdout+stderr to `mailflow.log`, stops with SIGTERM then SIGKILL after 10 s.
PostfixServer drives bench/postfix_instance.sh (own config/queue dirs, never the default instance), with the
same queue/backoff timers as mailflow.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from smtp_tools import check_loopback_port, end_process, wait_listening

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 30.0
STOP_GRACE = 10.0

MAILFLOW_CONFIG = """\
myhostname = "bench.mailflow.test"
mydestination = ["localhost"]
mynetworks = ["127.0.0.0/8"]
relayhost = "[127.0.0.1]:{sink_port}"
queue_directory = "{queue_dir}"
[smtpd]
listen = ["127.0.0.1:{port}"]
[queue]
queue_run_delay = "1s"
minimal_backoff_time = "1s"
maximal_backoff_time = "2s"
[log]
level = "warning"
"""
POSTFIX_TIMERS = "queue_run_delay=1s minimal_backoff_time=1s maximal_backoff_time=2s"


class ServerError(RuntimeError):
    """The server could not be started (the message says why)."""


def mailflow_command() -> list[str]:
    """$MAILFLOW_CMD, else the `mailflow` console script on PATH, else `python -m mailflow`."""
    if os.environ.get("MAILFLOW_CMD"):
        cmd = shlex.split(os.environ["MAILFLOW_CMD"])
        if os.sep in cmd[0] and not os.path.isabs(cmd[0]):
            cmd[0] = os.path.abspath(cmd[0])  # the server runs in its own work dir
        return cmd
    exe = shutil.which("mailflow")
    return [exe] if exe else [sys.executable, "-m", "mailflow"]


def pinned(cpus: str | None) -> list[str]:
    """The command prefix that runs a program on `cpus` only (none when None)."""
    return ["taskset", "-c", cpus] if cpus else []


def process_usage(pid: int) -> dict:
    """RSS (MB) and user+system CPU seconds of a running process, from /proc (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    rss_kb = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), 0)
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_mb": round(rss_kb / 1024, 1), "cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 1)}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class MailflowServer:
    name = "mailflow"

    def __init__(self, workdir: Path, port: int, sink_port: int, cpus: str | None = None) -> None:
        check_loopback_port(port)
        check_loopback_port(sink_port)
        self.workdir = workdir
        self.port = port
        self.sink_port = sink_port
        self.cpus = cpus
        self.config_path = workdir / "config.toml"
        self.queue_dir = workdir / "queue"
        self.log_path = workdir / "mailflow.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(MAILFLOW_CONFIG.format(sink_port=self.sink_port, port=self.port,
                                                           queue_dir=self.queue_dir))

    def start(self) -> None:
        self.write_config()
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"--- bench: start #{self.starts}\n".encode())
        log.flush()
        cmd = [*pinned(self.cpus), *mailflow_command(), "serve", "--config", str(self.config_path)]
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, start_new_session=True)
        except OSError as e:
            raise ServerError(f"cannot run {shlex.join(cmd)}: {e}") from None
        finally:
            log.close()
        if not wait_listening(self.port, START_TIMEOUT, alive=lambda: self.proc.poll() is None):
            rc = self.proc.poll()
            self.stop()
            state = f"exited with {rc}" if rc is not None else f"not listening after {START_TIMEOUT:.0f} s"
            raise ServerError(f"mailflow ({shlex.join(cmd)}) {state}; log tail:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, grace=STOP_GRACE)
            self.proc = None

    def reset(self) -> None:
        self.stop()
        shutil.rmtree(self.queue_dir, ignore_errors=True)
        self.start()

    def crashed(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def pid(self) -> int:
        assert self.proc is not None, "mailflow is not running"
        return self.proc.pid

    def state(self) -> dict:
        out: dict = {}
        if self.proc is not None and self.proc.poll() is None:
            out.update(process_usage(self.proc.pid))
        try:  # the store's schema (mailflow/schema.sql): table `message`, column `queue`
            with sqlite3.connect(f"file:{self.queue_dir / 'queue.db'}?mode=ro", uri=True, timeout=2) as db:
                out["queued"] = dict(db.execute("SELECT queue, count(*) FROM message GROUP BY queue").fetchall())
        except sqlite3.Error as e:
            out["queued"] = f"unreadable: {e}"
        return out


class PostfixServer:
    name = "postfix"
    script = HERE / "postfix_instance.sh"

    def __init__(self, workdir: Path, port: int, sink_port: int, cpus: str | None = None) -> None:
        check_loopback_port(port)
        check_loopback_port(sink_port)
        self.workdir = workdir
        self.port = port
        self.sink_port = sink_port
        self.cpus = cpus
        self.running = False

    @staticmethod
    def available() -> tuple[bool, str]:
        """(usable, why not): needs the postfix binary, its master.cf and root."""
        if not shutil.which("postfix") and not os.path.exists("/usr/sbin/postfix"):
            return False, "the postfix binary is not installed"
        if not os.path.exists("/etc/postfix/master.cf"):
            return False, "/etc/postfix/master.cf is missing"
        if os.geteuid() != 0:
            return False, "a private Postfix instance needs root"
        return True, ""

    def _script(self, *args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PF_BASE=str(self.workdir), PF_EXTRA=POSTFIX_TIMERS)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return subprocess.run([*pinned(self.cpus), "bash", str(self.script), *args], env=env, capture_output=True,
                              text=True, timeout=START_TIMEOUT + 30, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.running = True
        try:
            res = self._script("start", str(self.port), str(self.sink_port))
        except subprocess.TimeoutExpired:
            self.stop()
            raise ServerError("postfix_instance.sh start timed out") from None
        if res.returncode != 0:
            self.stop()
            output = (res.stderr or res.stdout).strip()[-500:]
            raise ServerError(f"postfix_instance.sh start failed ({res.returncode}): {output}")

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            self._script("stop", str(self.port))
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.workdir / f"pf-relay-{self.port}", ignore_errors=True)

    def reset(self) -> None:
        self.stop()
        self.start()

    def crashed(self) -> bool:
        return False

    def pid(self) -> int:
        """The master's (its daemons are its children)."""
        return int((self.workdir / f"pf-relay-{self.port}" / "queue" / "pid" / "master.pid").read_text().strip())

    def state(self) -> dict:
        queue = self.workdir / f"pf-relay-{self.port}" / "queue"
        counts = {}
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            counts[name] = sum(len(files) for _, _, files in os.walk(queue / name))
        return {"queued": {k: v for k, v in counts.items() if v}}
