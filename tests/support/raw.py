"""SMTP over a blocking socket, for the tests that send bytes no SMTP client would (fuzz, hostile dialogues), and a
process's memory as /proc tells it.

- `converse(port, data, limit=5.0)`: the greeting, then `data` and a half-close; everything the server said (the
  greeting included) until it closed the connection, `limit` seconds at most. `read_until_closed(sock, limit)`:
  the same reading, on a socket of the caller's.
- `answers_noop(port, within)`: seconds a new session took to be greeted and to answer NOOP with `250 2.0.0 Ok`
  (an AssertionError past `within`, or for another answer).
- `rss_mb(pid)`, `peak_rss_mb(pid)`: a process's resident memory now (VmRSS) and at its peak (VmHWM), in MB: the
  peak is the kernel's, so a short burst between two samples is not missed; 0.0 for a process that has exited and
  not been waited for (a zombie has neither). `reset_peak_rss(pid)`: the peak set back to what it holds now (a
  child of this user's: /proc/PID/clear_refs), so that a peak measures what came after, not the start-up.
"""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path


def converse(port: int, data: bytes, limit: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        out = s.recv(4096)  # the greeting first: what follows is input after it
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server closed first: what it said is still read below
        return out + read_until_closed(s, limit)


def read_until_closed(s: socket.socket, limit: float) -> bytes:
    out = b""
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except OSError:  # (TimeoutError among them)
            break
        if not chunk:
            break
        out += chunk
    return out


def answers_noop(port: int, within: float) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"220 "), "no greeting"
        s.sendall(b"NOOP\r\n")
        assert reader.readline() == b"250 2.0.0 Ok\r\n"
    took = time.monotonic() - started
    assert took < within, f"a NOOP session took {took:.2f} s"
    return took


def rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_mb(pid: int, field: str) -> float:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else 0.0
