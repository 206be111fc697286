"""TCP ports on 127.0.0.1 for tests.

- `free_port()`: a port where nothing listens (bound, then released a moment ago), for a server a test starts
  later or for "nothing listens there".
- `accepts(port)`: True when something accepts a connection on the port now (a listener that has started).
- `LOOPBACK_NAME`: the name smtpd gives a client on 127.0.0.1 (its name in /etc/hosts, usually "localhost";
  "unknown" without one), and `LOOPBACK_CLIENT`, the `name[127.0.0.1]` of logs and transcripts.
"""
from __future__ import annotations

import socket

from mailflow.stages.smtpd.peername import UNKNOWN, PeerNames

LOOPBACK_NAME = PeerNames(None).hosts_name("127.0.0.1") or UNKNOWN
LOOPBACK_CLIENT = f"{LOOPBACK_NAME}[127.0.0.1]"


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    """Something listens on 127.0.0.1:`port` and accepted a connection (closed again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
