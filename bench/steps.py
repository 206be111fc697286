#!/usr/bin/env python3
"""Where one session's time goes, reply by reply: mailflow and Postfix side by side (docs/performance.md, "Sixth
pass").

    .venv/bin/python bench/steps.py     COUNT=1000 RUNS=3 SIZE=2000 SERVERS=postfix,mailflow CLIENT_CPU=(any)

Contract:
- Starts the servers as `make bench` does (servers.py: each relays to its own smtp-sink), then, RUNS times and
  alternating which server goes first, sends COUNT messages to each, one connection per message and one command
  at a time (as smtp-source at one session): connect and greeting, EHLO, MAIL, RCPT, DATA, the message (SIZE
  bytes of body), QUIT. It times the wait for each reply with a monotonic clock; the first tenth of a run is a
  warm-up and not counted.
- Prints, for each server, the median and 90th percentile µs of each step (the median of the runs' figures) and
  the whole dialogue, then the difference mailflow - Postfix per step. CLIENT_CPU pins this client to one CPU
  (the servers go where the kernel puts them): on a VM a reply that crosses CPUs costs a wake-up of the other
  one, which the figures then show.
- Only 127.0.0.1, ports 2500-2599; everything lives in a temporary directory, removed at the end. Exits 0 (a
  measurement), 2 when a server cannot start or a reply is not the expected one.
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import free_ports  # noqa: E402
from servers import MailflowServer, PostfixServer, ServerError  # noqa: E402
from smtp_tools import Sink, Tools  # noqa: E402

COUNT = int(os.environ.get("COUNT", 1000))
RUNS = int(os.environ.get("RUNS", 3))
SIZE = int(os.environ.get("SIZE", 2000))
SERVERS = [s for s in os.environ.get("SERVERS", "postfix,mailflow").split(",") if s]
CLIENT_CPU = os.environ.get("CLIENT_CPU")
STEPS = ("connect+220", "EHLO", "MAIL", "RCPT", "DATA", "message", "QUIT")
EXPECTED = ("220", "250", "250", "250", "354", "250", "221")
TIMEOUT = 30.0


def message(size: int) -> bytes:
    head = b"From: <bench@source.test>\r\nTo: <bench@dest.test>\r\nSubject: steps\r\n\r\n"
    lines = max(1, size // 80)
    return head + (b"x" * 78 + b"\r\n") * lines + b".\r\n"


def read_reply(sock: socket.socket) -> bytes:
    """The whole reply (every line up to the one with a space after its code); its first line's code."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] in (b" ", b""):
            return buf[:3]


def one_dialogue(port: int, body: bytes) -> list[float]:
    """µs waited for each reply of STEPS."""
    commands = (b"EHLO steps.test\r\n", b"MAIL FROM:<bench@source.test>\r\n", b"RCPT TO:<bench@dest.test>\r\n",
                b"DATA\r\n", body, b"QUIT\r\n")
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        codes, marks = [read_reply(sock)], [start, time.perf_counter()]
        for command in commands:
            sock.sendall(command)
            codes.append(read_reply(sock))
            marks.append(time.perf_counter())
    if tuple(c.decode() for c in codes) != EXPECTED:
        raise SystemExit(f"unexpected replies on port {port}: {codes}")
    return [(b - a) * 1e6 for a, b in zip(marks, marks[1:])]


def one_run(port: int, body: bytes) -> dict[str, tuple[float, float]]:
    """Per step (and 'total'): the median and 90th percentile µs of one run."""
    warmup = COUNT // 10
    samples = [one_dialogue(port, body) for _ in range(COUNT)][warmup:]
    columns = dict(zip(STEPS, zip(*samples)))
    columns["total"] = tuple(sum(s) for s in samples)
    return {step: (statistics.median(v), statistics.quantiles(v, n=10)[-1]) for step, v in columns.items()}


def main() -> int:
    if CLIENT_CPU is not None:
        os.sched_setaffinity(0, {int(CLIENT_CPU)})
    tools = Tools.detect()
    body = message(SIZE)
    ports = iter(free_ports(2 * len(SERVERS)))
    results: dict[str, list[dict]] = {name: [] for name in SERVERS}
    with tempfile.TemporaryDirectory(prefix="mailflow-steps-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's daemons (user postfix) must traverse it
        servers, sinks = [], []
        try:
            for name in SERVERS:
                cls = MailflowServer if name == "mailflow" else PostfixServer
                server = cls(Path(tmp) / name, next(ports), next(ports))
                sinks.append(Sink.start(tools, server.sink_port))
                servers.append(server)
                server.start()
            for run in range(RUNS):
                for server in (servers if run % 2 == 0 else servers[::-1]):
                    results[server.name].append(one_run(server.port, body))
                    print(f"run {run + 1} {server.name}: {results[server.name][-1]['total'][0]:.0f} µs a message",
                          flush=True)
        except ServerError as e:
            print(f"steps: {e}")
            return 2
        finally:
            for server in servers:
                server.stop()
            for sink in sinks:
                sink.stop()
    report(results)
    return 0


def report(results: dict[str, list[dict]]) -> None:
    where = f"client on CPU {CLIENT_CPU}" if CLIENT_CPU is not None else "client unpinned"
    print(f"\n{COUNT} messages of {SIZE} B a run, {RUNS} runs, one connection per message; {where}. "
          "µs: median | 90th percentile (median of the runs)")
    steps = (*STEPS, "total")
    print(f"{'server':10s}" + "".join(f"{s:>16s}" for s in steps))
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        medians[name] = {s: statistics.median(r[s][0] for r in runs) for s in steps}
        p90 = {s: statistics.median(r[s][1] for r in runs) for s in steps}
        print(f"{name:10s}" + "".join(f"{medians[name][s]:>9.0f} |{p90[s]:>5.0f}" for s in steps))
    if {"mailflow", "postfix"} <= medians.keys():
        print(f"{'mf - pf':10s}" + "".join(f"{medians['mailflow'][s] - medians['postfix'][s]:>+9.0f}       "
                                           for s in steps))


if __name__ == "__main__":
    sys.exit(main())
