#!/usr/bin/env python3
"""What the metrics cost per message: the server's CPU seconds for the same load with `[admin] enable` off and on.

    .venv/bin/python bench/metrics_cost.py            COUNT=2000 RUNS=3 SIZE=2000 SESSIONS=10 by default

Contract:
- For each run and each mode (off, on; the order alternating run by run, so that a change in the machine's load
  hits both alike), a fresh `mailflow serve` relays to Postfix's smtp-sink (`[log] level = "warning"`, as
  `make bench` runs it); `smtp-source -s SESSIONS -l SIZE -m COUNT` sends COUNT messages; once the queue is empty
  the server's CPU time (utime + stime from /proc) since the load began is divided by COUNT.
- With admin on, /metrics is scraped once at the end (its counts are checked: every message received).
- Prints the median µs of CPU per message for each mode, every run, and the difference. Exits 0 (a measurement).
Only 127.0.0.1 is used; everything lives in a temporary directory.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from servers import MAILFLOW_CONFIG
from smtp_tools import free_port, installed, queued_messages, wait_listening, wait_until

ROOT = Path(__file__).resolve().parents[1]
COUNT = int(os.environ.get("COUNT", 2000))
RUNS = int(os.environ.get("RUNS", 3))
SIZE = int(os.environ.get("SIZE", 2000))
SESSIONS = int(os.environ.get("SESSIONS", 10))
# make bench's server configuration, with the admin listener on or off
CONFIG = MAILFLOW_CONFIG + """\
[admin]
enable = {admin}
listen = ["127.0.0.1:{admin_port}"]
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")




def one_run(admin: bool, work: Path) -> float:
    """µs of server CPU per message."""
    port, sink_port, admin_port = free_port(), free_port(), free_port()
    config = work / "mailflow.toml"
    config.write_text(CONFIG.format(sink_port=sink_port, queue_dir=work / "queue", port=port,
                                    admin="true" if admin else "false", admin_port=admin_port))
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([installed("smtp-sink"), *user, f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(work / "mailflow.log", "ab") as log:  # (the server has its own copy of the descriptor)
        server = subprocess.Popen([sys.executable, "-m", "mailflow", "serve", "-c", str(config)], cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        if not (wait_listening(port, 30) and wait_listening(sink_port, 30)):
            raise SystemExit("timed out: the server and the sink listen")
        before = cpu_seconds(server.pid)
        subprocess.run([installed("smtp-source"), "-s", str(SESSIONS), "-l", str(SIZE), "-m", str(COUNT),
                        "-f", "bench@source.test", "-t", "bench@dest.test", f"127.0.0.1:{port}"], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        queue = work / "queue" / "queue.db"
        wait_until(lambda: queued_messages(queue) == 0, 120, "the queue drains")
        used = cpu_seconds(server.pid) - before
        if admin:
            text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
            assert f'mailflow_messages_received_total{{source="smtpd"}} {float(COUNT)}' in text, "counts"
        return used / COUNT * 1e6
    finally:
        for proc in (server, sink):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work / "queue", ignore_errors=True)


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f}; {COUNT} x {SIZE} B, {SESSIONS} sessions, {RUNS} runs")
    results: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="mailflow-metrics-cost-") as tmp:
        for run in range(RUNS):
            for admin in ((False, True) if run % 2 == 0 else (True, False)):
                results[admin].append(one_run(admin, Path(tmp)))
                print(f"run {run + 1} admin {'on ' if admin else 'off'}: {results[admin][-1]:.0f} µs CPU/message")
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"median: off {off:.0f} µs, on {on:.0f} µs per message: +{on - off:.0f} µs ({(on - off) / off:+.1%})")


if __name__ == "__main__":
    main()
