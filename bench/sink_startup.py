#!/usr/bin/env python3
"""What an embedded sink costs a test: mailflow.testing.Sink beside aiosmtpd's Controller, in the same run.

    .venv/bin/python bench/sink_startup.py            RUNS=50 by default

Contract:
- Four figures, each measured RUNS times after WARMUP unmeasured rounds, the kinds interleaved round by round so
  that a change in the machine's load hits all alike:
    sink start+stop           `async with Sink(): pass` (the real store in a fresh temporary directory, qmgr,
                              smtpd on 127.0.0.1 port 0; the directory removed at the end); QUEUE_ROOT=/tmp
                              puts the directory on a disk instead of the Sink's default (/dev/shm)
    sink first message        start, one message sent with smtplib (in a worker thread: the Sink is on this
                              loop), `wait_for` until it is captured (committed, delivered by qmgr), stop
    Controller start+stop     aiosmtpd's Controller (its own thread and loop) with a handler that keeps messages,
                              on a port found free just before (it cannot take port 0)
    Controller first message  start, the same smtplib message, its 250 (the handler has it), stop
- Prints the load average, a table of median / p90 / min in milliseconds, the goal line for the Sink's
  start+stop median (< 30 ms), and exits 0 (a measurement, not a test). Only 127.0.0.1 is used.
"""
from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiosmtpd.controller import Controller  # noqa: E402

from mailflow.testing import Sink  # noqa: E402

RUNS = int(os.environ.get("RUNS", "50"))
WARMUP = int(os.environ.get("WARMUP", "5"))
# Where the Sink's temporary directory goes: "" its default (/dev/shm when there is one), else this directory
# (e.g. /tmp: a disk, with real fsyncs).
QUEUE_ROOT = os.environ.get("QUEUE_ROOT", "") or None
GOAL_MS = 30.0
MESSAGE = b"From: a@shop.test\r\nTo: b@example.com\r\nSubject: bench\r\n\r\nhello\r\n"


class Keep:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content)
        return "250 OK"


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@shop.test", ["b@example.com"], MESSAGE)


async def sink_start_stop() -> None:
    async with Sink(temporary_root=QUEUE_ROOT):
        pass


async def sink_first_message() -> None:
    async with Sink(temporary_root=QUEUE_ROOT) as sink:
        await asyncio.to_thread(send, sink.port)
        await sink.wait_for(to="b@example.com")


def free_port() -> int:
    """aiosmtpd 1.4's Controller cannot listen on port 0 (its start-up probe connects to the port it was given):
    a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def controller_start_stop() -> None:
    controller = Controller(Keep(), hostname="127.0.0.1", port=free_port())
    controller.start()
    controller.stop()


def controller_first_message() -> None:
    handler = Keep()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        send(controller.port)
        assert handler.messages
    finally:
        controller.stop()


KINDS = [("sink start+stop", sink_start_stop), ("sink first message", sink_first_message),
         ("Controller start+stop", controller_start_stop), ("Controller first message", controller_first_message)]


async def timed(work) -> float:
    started = time.perf_counter()
    if asyncio.iscoroutinefunction(work):
        await work()
    else:
        work()  # the Controller blocks this loop, which serves nothing then
    return (time.perf_counter() - started) * 1000


async def measure() -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {name: [] for name, _ in KINDS}
    for round_ in range(WARMUP + RUNS):
        order = KINDS if round_ % 2 == 0 else list(reversed(KINDS))
        for name, work in order:
            elapsed = await timed(work)
            if round_ >= WARMUP:
                figures[name].append(elapsed)
    return figures


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> int:
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; RUNS={RUNS} WARMUP={WARMUP}; "
          f"Sink queue under {QUEUE_ROOT or 'its default (/dev/shm when there is one)'}")
    figures = asyncio.run(measure())
    print(f"{'':28}{'median':>9}{'p90':>9}{'min':>9}   (ms)")
    for name, values in figures.items():
        print(f"{name:28}{statistics.median(values):9.2f}{p90(values):9.2f}{min(values):9.2f}")
    median = statistics.median(figures["sink start+stop"])
    print(f"sink start+stop median {median:.2f} ms: goal < {GOAL_MS:g} ms {'met' if median < GOAL_MS else 'NOT met'}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
