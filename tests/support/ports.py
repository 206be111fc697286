"""TCP ports on 127.0.0.1 for tests.

- `free_port()`: a port where nothing listens (bound, then released a moment ago), for a server a test starts
  later or for "nothing listens there".
- `accepts(port)`: True when something accepts a connection on the port now (a listener that has started).
"""
from __future__ import annotations

import socket


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
