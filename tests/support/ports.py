"""TCP ports on 127.0.0.1 for tests.

- `free_port()`: a port where nothing listens (bound, then released a moment ago), for a server a test starts
  later or for "nothing listens there". It is taken below the kernel's ephemeral range, so no outgoing connection
  (of this test, or of another pytest-xdist worker) takes it before the server binds it; from this worker's own
  share of that span (PYTEST_XDIST_WORKER `gwN` of PYTEST_XDIST_WORKER_COUNT; all of it outside xdist), so no
  other worker of the run is ever handed it; and not again by this process until it has handed out every port of
  its share. (Another pytest run on the machine at the same time shares the span: only bind-free is promised.)
- `accepts(port, host)`: True when something accepts a connection on host:port now (127.0.0.1 unless told): a
  listener that has started.
- `LOOPBACK_NAME`: the name smtpd gives a client on 127.0.0.1 (its name in /etc/hosts, usually "localhost";
  "unknown" without one), and `LOOPBACK_CLIENT`, the `name[127.0.0.1]` of logs and transcripts.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
import socket
from pathlib import Path
from typing import Iterator, Mapping

from mailflow.stages.smtpd.peername import UNKNOWN, PeerNames

LOOPBACK_NAME = PeerNames(None).hosts_name("127.0.0.1") or UNKNOWN
LOOPBACK_CLIENT = f"{LOOPBACK_NAME}[127.0.0.1]"


def free_port() -> int:
    """The next port of this worker's share (`worker_ports`, walked in a shuffled order and again from its start
    once all handed out) that binds on 127.0.0.1 now; released at once. Raises when no port of the share binds."""
    share = worker_ports()
    for _ in range(len(share)):
        port = next(_handed_out())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {share}")


def worker_ports(environ: Mapping[str, str] = os.environ) -> range:
    """This pytest-xdist worker's slice of the 12,000 ports below the ephemeral range: worker `gwN` of
    PYTEST_XDIST_WORKER_COUNT workers takes the Nth of that many equal slices (the whole span outside xdist)."""
    low = _ephemeral_range()[0]
    span = range(max(1024, low - 12_000), low)
    worker = environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return span
    count = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = len(span) // count
    first = span.start + int(worker.removeprefix("gw")) * size
    return range(first, first + size)


@functools.cache
def _handed_out() -> Iterator[int]:
    """This process's walk through its share, made at the first call (once xdist has named the worker)."""
    order = list(worker_ports())
    random.Random().shuffle(order)  # seeded from the OS: each worker its own order
    return itertools.cycle(order)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on `host`:`port` (127.0.0.1 unless told) and accepted a connection (closed again at
    once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0
