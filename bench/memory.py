#!/usr/bin/env python3
"""Memory under big messages: SESSIONS concurrent sessions each send one SIZE-byte message to `mailflow serve`.

    python bench/memory.py      (SESSIONS=100 SIZE=10000000 TOOLS=auto RUN_TIMEOUT=300 SETTLE=5 KEEP_TMP=0)

Contract:
- Starts mailflow as bench/run.py does (bench/servers.py: `mailflow serve`, relaying everything to a sink on
  127.0.0.1, so every byte is spooled, queued, read back and sent again) and a sink (smtp-sink, or
  capture_sink.py), then reads the server's memory from /proc/PID/status:
    idle    VmRSS once started, before any load;
    peak    VmHWM (the high-water mark of RSS) after the load;
    after   VmRSS once the load has drained (every message at the sink, the queue empty) and SETTLE s passed.
  The load is smtp-source -s SESSIONS -m SESSIONS -l SIZE (or loadgen.py): every session sends its one message
  at the same time. It prints the three figures, the goals (peak < 300 MB; after within 50 MB of idle) and the
  times taken (all accepted; all at the sink).
- Exit 0 when every message arrived and both goals hold, 1 otherwise, 130 on interrupt.
- Bounded: RUN_TIMEOUT s for the load and again for the drain; the server and the sink are stopped and the
  temp dir removed on every exit path. Only 127.0.0.1, ports 2500-2599.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_ports, interrupt_on_signals, log  # noqa: E402
from servers import MailflowServer  # noqa: E402
from smtp_tools import Sink, Tools, run_source  # noqa: E402

PEAK_GOAL_MB = 300
AFTER_GOAL_MB = 50


def memory_mb(pid: int, field: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def queued(server: MailflowServer) -> int:
    with sqlite3.connect(f"file:{server.queue_dir / 'queue.db'}?mode=ro", uri=True, timeout=2) as db:
        return db.execute("SELECT count(*) FROM message").fetchone()[0]


def wait_until(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def measure(tools: Tools, server: MailflowServer, sink: Sink, sessions: int, size: int, timeout: float,
            settle: float) -> bool:
    pid = server.proc.pid
    time.sleep(1.0)  # let start-up finish
    idle = memory_mb(pid, "VmRSS")
    log(f"idle:  RSS {idle:.0f} MB")
    t0 = time.perf_counter()
    ok, accepted, error = run_source(tools, server.port, sessions, size, sessions, timeout)
    if not ok:
        log(f"the load failed: {error}")
        return False
    arrived = sink.wait_for(sessions, timeout)
    drained = arrived is not None and wait_until(lambda: queued(server) == 0, timeout)
    peak = memory_mb(pid, "VmHWM")
    log(f"load:  {sessions} x {size / 1e6:.1f} MB accepted in {accepted:.1f} s"
        + (f", all at the sink after {arrived - t0:.1f} s" if arrived is not None else ", NOT all delivered"))
    log(f"peak:  RSS {peak:.0f} MB (goal < {PEAK_GOAL_MB} MB)")
    time.sleep(settle)
    after = memory_mb(pid, "VmRSS")
    log(f"after: RSS {after:.0f} MB, {after - idle:+.0f} MB from idle (goal within {AFTER_GOAL_MB} MB), "
        f"{settle:.0f} s after the queue drained")
    return drained and peak < PEAK_GOAL_MB and after - idle <= AFTER_GOAL_MB


def main() -> int:
    env = os.environ
    sessions, size = int(env.get("SESSIONS", 100)), int(env.get("SIZE", 10_000_000))
    timeout, settle = float(env.get("RUN_TIMEOUT", 300)), float(env.get("SETTLE", 5))
    tools = Tools.detect(env.get("TOOLS", "auto"))
    port, sink_port = free_ports(2)
    tmp = Path(tempfile.mkdtemp(prefix="mailflow-memory-"))
    interrupt_on_signals()
    server = MailflowServer(tmp / "mailflow", port, sink_port)
    sink = None
    try:
        log(f"mailflow memory bench: SESSIONS={sessions} SIZE={size}; tools: {tools.describe()}; "
            f"{os.cpu_count()} CPUs")
        sink = Sink.start(tools, sink_port)
        server.start()
        ok = measure(tools, server, sink, sessions, size, timeout, settle)
        log("memory bench: " + ("ok" if ok else "FAILED"))
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        if env.get("KEEP_TMP") == "1":
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
