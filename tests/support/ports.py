"""TCP ports on 127.0.0.1 for tests.

- `free_port()`: a port where nothing listens (bound, then released a moment ago), for a server a test starts
  later or for "nothing listens there". It is taken below the kernel's ephemeral range, so no outgoing connection
  (of this test, or of another pytest-xdist worker) takes it before the server binds it.
- `accepts(port, host)`: True when something accepts a connection on host:port now (127.0.0.1 unless told): a
  listener that has started.
- `LOOPBACK_NAME`: the name smtpd gives a client on 127.0.0.1 (its name in /etc/hosts, usually "localhost";
  "unknown" without one), and `LOOPBACK_CLIENT`, the `name[127.0.0.1]` of logs and transcripts.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

from mailflow.stages.smtpd.peername import UNKNOWN, PeerNames

LOOPBACK_NAME = PeerNames(None).hosts_name("127.0.0.1") or UNKNOWN
LOOPBACK_CLIENT = f"{LOOPBACK_NAME}[127.0.0.1]"


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released), below the ephemeral range (where the
    kernel picks the source ports of connections and the ports of `bind(0)`), at random so that two workers rarely
    try the same one; the kernel's own pick when that range is taken."""
    low = _ephemeral_range()[0]
    for port in _RANDOM.sample(range(max(1024, low - 12_000), low), 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANDOM = random.Random()  # seeded from the OS: each worker its own sequence


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
