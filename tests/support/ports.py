"""TCP ports on 127.0.0.1 for tests.

- `free_port()`: a port where nothing listens (bound, then released a moment ago), for a server a test starts
  later or for "nothing listens there". It is taken below the kernel's ephemeral range, so no outgoing connection
  (of this test, or of another pytest-xdist worker) takes it before the server binds it; from this worker's own
  share of that span (`worker_ports`), so no other worker of the run is handed it (but for a worker xdist starts
  in place of a crashed one, which shares a running worker's share); and not again by this process until it has
  handed out every port of its share. (Another pytest run on the machine at the same time shares the span: only
  bind-free is promised.)
- `accepts(port, host)`: True when something accepts a connection on host:port now (127.0.0.1 unless told): a
  listener that has started.
- `sockets_to(port)`: how many sockets of this process are connected to 127.0.0.1:port (its side of each
  connection it opened to a peer listening there, whatever its TCP state): what a closed client still holds.
- `LOOPBACK_NAME`: the name smtpd gives a client on 127.0.0.1 (its name in /etc/hosts, usually "localhost";
  "unknown" without one), and `LOOPBACK_CLIENT`, the `name[127.0.0.1]` of logs and transcripts.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import random
import re
import socket
from pathlib import Path
from typing import Iterator, Mapping

from mailflow.stages.smtpd.peername import UNKNOWN, PeerNames
from mailflow.syntax import ascii_digits

LOOPBACK_NAME = PeerNames(None).hosts_name("127.0.0.1") or UNKNOWN
LOOPBACK_CLIENT = f"{LOOPBACK_NAME}[127.0.0.1]"


def free_port() -> int:
    """The next port of this worker's share (`worker_ports`, walked in a shuffled order and again from its start
    once all handed out) that binds on 127.0.0.1 now; released at once. A port something else holds (in use, or
    refused to this user) is passed over; any other bind error is raised, as it would be at every port. Raises
    RuntimeError when no port of the share binds."""
    share = worker_ports()
    for _ in range(len(share)):
        port = next(_handed_out())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {share}")


SPAN = 12_000  # ports below the ephemeral range shared out among a run's workers


def worker_ports(environ: Mapping[str, str] = os.environ) -> range:
    """This pytest-xdist worker's slice of the span below the ephemeral range (SPAN ports, fewer when that range
    starts below 1024 + SPAN: the span never reaches below 1024): of PYTEST_XDIST_WORKER_COUNT equal slices, worker
    `gwN` takes slice N modulo that count. xdist names a worker it starts in place of a crashed one past the count
    (gw{count}, gw{count+1}, ...): it shares a running worker's slice, and no slice leaves the span. Outside xdist,
    under a name not `gwN`, or with a count that is no positive number or more than the span's ports: the span."""
    low = _ephemeral_range()[0]
    span = range(max(1024, low - SPAN), low)
    worker = re.fullmatch(r"gw(\d+)", environ.get("PYTEST_XDIST_WORKER", ""))
    count = environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker is None or not ascii_digits(count) or not 0 < int(count) <= len(span):
        return span
    size = len(span) // int(count)
    first = span.start + int(worker[1]) % int(count) * size
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


def sockets_to(port: int) -> int:
    """See the module doc: this process's descriptors (/proc/self/fd) whose socket's remote end (/proc/net/tcp) is
    127.0.0.1:port."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    remote = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if (fields := line.split())[2] == remote and fields[9] in inodes)
