#!/usr/bin/env python3
"""Deterministic cost per message of `mailflow serve`: Python calls on its loop thread (cProfile), or
instructions of the whole process (valgrind's callgrind), for one smtp-source load after a warm-up.

    .venv/bin/python bench/calls.py                      COUNT=1000 SIZE=2000 SESSIONS=1 WARMUP=100 TOP=25
    TOOL=callgrind .venv/bin/python bench/calls.py       (slow: COUNT=300 or so)
    KEEP=/tmp/p.prof ...                                  (keep the stats, for pstats or callgrind_annotate: one
                                                          file per thread with callgrind, KEEP-01 the loop's)

Contract:
- A fresh `mailflow serve` with make bench's configuration (bench/servers.py) relays to Postfix's smtp-sink;
  `smtp-source -s SESSIONS -l SIZE -m WARMUP` warms it up and the queue drains; then measurement is switched on
  (cProfile: SIGUSR1 to this script's `--serve` wrapper, which enables a profiler on the loop thread; callgrind:
  `callgrind_control -i on`), `smtp-source -s SESSIONS -l SIZE -m COUNT` sends COUNT messages, the queue
  drains (every message delivered to the sink), and measurement is switched off (SIGUSR2 dumps the profile).
- Prints calls (or instructions: all threads, and the event loop's) per message, and with cProfile the TOP functions
  by calls per message.
  The figure does not depend on the machine's load (up to the event loop's idle turns, a few per message).
- Exits 0 (a measurement); non-zero when a tool is missing or a step times out. Only 127.0.0.1 is used;
  everything lives in a temporary directory, removed at the end.
"""
from __future__ import annotations

import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from servers import MAILFLOW_CONFIG
from smtp_tools import free_port, installed, queued_messages, wait_listening, wait_until

ROOT = Path(__file__).resolve().parents[1]
COUNT = int(os.environ.get("COUNT", 1000))
SIZE = int(os.environ.get("SIZE", 2000))
SESSIONS = int(os.environ.get("SESSIONS", 1))
WARMUP = int(os.environ.get("WARMUP", 100))
TOP = int(os.environ.get("TOP", 25))
TOOL = os.environ.get("TOOL", "cprofile")
KEEP = os.environ.get("KEEP", "")  # a path: the cProfile stats (or callgrind's output) are copied there
DRAIN_TIMEOUT = 600.0


def measure(server: subprocess.Popen, profile: str, *, on: bool) -> None:
    """Measurement switched on or off in the running server: callgrind's instrumentation, or the profiler of the
    `--serve` wrapper (SIGUSR1 / SIGUSR2, and the mark it leaves when done)."""
    if TOOL == "callgrind":
        subprocess.run([installed("callgrind_control"), "-i", "on" if on else "off", str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL)
    elif on:
        server.send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(profile + ".on"), 30, "the profiler starts")
    else:
        server.send_signal(signal.SIGUSR2)
        wait_until(lambda: os.path.exists(profile + ".done"), 60, "the profile is written")


def serve_profiled(config: str, out: str) -> None:
    """The `--serve` wrapper: `mailflow serve`, with SIGUSR1 starting a profiler on this (the loop's) thread and
    SIGUSR2 stopping it and writing its stats to `out` (then `out`.done)."""
    import cProfile

    profiler = cProfile.Profile()

    def start(*_: object) -> None:
        profiler.enable()
        Path(out + ".on").touch()

    def stop(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)
        Path(out + ".done").touch()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = ["mailflow", "serve", "--config", config]
    from mailflow.cli import main

    main()


def send(port: int, count: int) -> None:
    subprocess.run([installed("smtp-source"), "-s", str(SESSIONS), "-l", str(SIZE), "-m", str(count),
                    "-f", "bench@source.test", "-t", "bench@dest.test", f"127.0.0.1:{port}"], check=True,
                   stdout=subprocess.DEVNULL, timeout=DRAIN_TIMEOUT)


def loop_turns(stats: pstats.Stats) -> tuple[int, int, int]:
    """(loop turns, callbacks run, calls made by the turning itself: `_run_once`, the selector's `select` and
    what each calls but the callbacks). How many turns a load takes varies a little with the machine's load
    (an idle turn ends at a timer), so "calls beside the turning" is the steadier figure to compare."""
    turns = handles = idling = 0
    for (file, _line, name), (_, calls, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for (caller_file, _, caller), (_, from_caller, _, _) in callers.items():
            if caller in ("_run_once", "select") and caller_file.endswith(("base_events.py", "selectors.py")):
                if name == "_run" and file.endswith("events.py"):
                    handles += from_caller
                elif name != "<method 'popleft' of 'collections.deque' objects>":
                    idling += from_caller
            if name == "<built-in method time.monotonic>" and caller == "time" \
                    and caller_file.endswith("base_events.py"):
                idling += from_caller  # (the loop's clock, read each turn)
        if name == "_run_once" and file.endswith("base_events.py"):
            turns = calls
    return turns, handles, idling + turns


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mailflow-calls-") as tmp:
        work = Path(tmp)
        port, sink_port = free_port(), free_port()
        config = work / "config.toml"
        config.write_text(MAILFLOW_CONFIG.format(sink_port=sink_port, port=port, queue_dir=work / "queue"))
        profile = str(work / "profile")
        serve = [sys.executable, __file__, "--serve", str(config), profile]
        if TOOL == "callgrind":
            serve = [installed("valgrind"), "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                     f"--callgrind-out-file={work}/callgrind.out", *serve]
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = subprocess.Popen([installed("smtp-sink"), *user, f"127.0.0.1:{sink_port}", "256"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # (a fixed hash seed: the dicts' and sets' collisions, hence the instruction counts, the same every run)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
        with open(work / "mailflow.log", "ab") as log:  # (the server has its own copy of the descriptor)
            server = subprocess.Popen(serve, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        db = work / "queue" / "queue.db"
        try:
            if not (wait_listening(port, 300) and wait_listening(sink_port, 30)):
                raise SystemExit("timed out: the server and the sink listen")
            send(port, WARMUP)
            wait_until(lambda: queued_messages(db) == 0, DRAIN_TIMEOUT, "the warm-up drains")
            measure(server, profile, on=True)
            send(port, COUNT)
            wait_until(lambda: queued_messages(db) == 0, DRAIN_TIMEOUT, "the load drains")
            measure(server, profile, on=False)
        finally:
            server.terminate()
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
            sink.terminate()
            sink.wait(15)
        if KEEP:
            for out in sorted(work.glob("callgrind.out*")) if TOOL == "callgrind" else [Path(profile)]:
                shutil.copyfile(out, KEEP + out.name.removeprefix("callgrind.out").removeprefix("profile"))
        label = f"{COUNT} x {SIZE} B, {SESSIONS} session(s), after {WARMUP}"
        if TOOL == "callgrind":
            threads = {}  # callgrind.out-NN: thread NN's instructions (01: the main thread, the event loop's)
            for out in work.glob("callgrind.out-*"):
                found = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
                threads[out.name.rsplit("-", 1)[1]] = int(found.group(1)) if found else 0
            if not threads:  # ("summary:" stays 0 with --instr-atstart=no: "totals:" is the count)
                raise SystemExit("no instruction count in callgrind's output")
            print(f"{label}: {sum(threads.values()) / COUNT / 1e6:.3f} M instructions per message, "
                  f"{threads.get('01', 0) / COUNT / 1e6:.3f} M of them on the event loop's thread")
            return
        stats = pstats.Stats(profile)
        turns, handles, idling = loop_turns(stats)
        print(f"{label}: {stats.total_calls / COUNT:.1f} Python calls per message on the loop thread, "
              f"{(stats.total_calls - idling) / COUNT:.1f} of them beside the loop's own turning; "
              f"{turns / COUNT:.2f} loop turns and {handles / COUNT:.2f} callbacks per message "
              f"({stats.total_tt / COUNT * 1e6:.0f} µs profiled own time per message)")
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][1])[:TOP]  # type: ignore[attr-defined]
        for (file, line, name), (_, calls, tottime, _, _) in rows:
            where = file.replace(str(ROOT) + "/", "").replace(sys.prefix, "PY")
            print(f"{calls / COUNT:8.2f} {tottime / COUNT * 1e6:7.1f} µs  {name}  {where}:{line}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve_profiled(sys.argv[2], sys.argv[3])
    else:
        main()
