"""A private HAProxy in TCP mode in front of SMTP servers, passing each client on with a PROXY v2 header
(../shared/docs/RECIPES.md, 8f): what sits in front of several mailflow nodes.

    with haproxy_instance([port1, port2]) as balancer:   # round robin, send-proxy-v2, health checks every 100 ms
        balancer.port                                    # the front end, on 127.0.0.1 (bind="::1": on ::1)
        balancer.states()                                # {"n1": "UP", "n2": "DOWN"} from its stats socket
        balancer.log                                     # its log so far (one tcplog line per connection)

The back ends are n1, n2, … in the order given. A back end that refuses a connection is marked DOWN after one
failed check and UP after one good one (each check sends a PROXY v2 LOCAL header, as HAProxy's check-send-proxy
does); a client whose connection to a back end fails is sent to another (`option redispatch`, 3 retries), so
clients see a dead node only when it dies under their session. Everything lives in a fresh folder under /tmp;
HAProxy runs in the foreground as a child of the test and is stopped by its pid. Needs haproxy (`require_tool`).
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.ports import accepts, free_port
from tests.support.tools import require_tool

CONFIG = """\
global
    log stderr format raw local0
    stats socket {root}/admin.sock mode 600 level admin
defaults
    mode tcp
    log global
    option tcplog
    option redispatch
    retries 3
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind {bind}:{port}
    default_backend mailflow
backend mailflow
    balance roundrobin
{servers}
"""
SERVER = "    server n{n} 127.0.0.1:{port} send-proxy-v2 check inter 100ms fall 1 rise 1 check-send-proxy"
UP = "2"  # srv_op_state in `show servers state`


@dataclass
class Balancer:
    root: Path
    port: int
    host: str = "127.0.0.1"  # where its front end listens: a client from ::1 is told apart from the balancer

    @property
    def log(self) -> str:
        return (self.root / "haproxy.log").read_text(errors="replace")

    def states(self) -> dict[str, str]:
        """Each back end's state as HAProxy's checks see it: "UP" or "DOWN"."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.root / "admin.sock"))
            s.sendall(b"show servers state mailflow\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        rows = [line.split() for line in answer.decode().splitlines()[1:] if line and not line.startswith("#")]
        return {row[3]: "UP" if row[5] == UP else "DOWN" for row in rows}  # be_id be_name srv_id srv_name addr state


@contextlib.contextmanager
def haproxy_instance(backends: list[int], bind: str = "127.0.0.1") -> Iterator[Balancer]:
    binary = require_tool("haproxy")
    root = Path(tempfile.mkdtemp(prefix="mailflow-haproxy-", dir="/tmp"))
    try:
        for attempt in range(3):  # (a free port can be taken by another test before HAProxy binds it: it exits)
            balancer = Balancer(root, free_port(), bind)
            proc = _started(binary, balancer, backends)
            if proc is not None:
                break
        else:
            pytest.fail(f"haproxy did not start: {balancer.log[-2000:]}")
        try:
            yield balancer
        finally:
            _stopped(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _started(binary: str, balancer: Balancer, backends: list[int]) -> subprocess.Popen | None:
    """HAProxy for `balancer`, once it listens and its stats socket is there; None when it exited first."""
    root = balancer.root
    servers = "\n".join(SERVER.format(n=n, port=port) for n, port in enumerate(backends, 1))
    (root / "haproxy.cfg").write_text(CONFIG.format(root=root, bind=balancer.host, port=balancer.port,
                                                    servers=servers))
    check = subprocess.run([binary, "-c", "-f", str(root / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(root / "haproxy.log", "wb") as log:
        proc = subprocess.Popen([binary, "-db", "-f", str(root / "haproxy.cfg")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while not ((root / "admin.sock").exists() and accepts(balancer.port, balancer.host)):  # (the port may be another's)
        if proc.poll() is not None:
            return None
        if time.monotonic() > deadline:
            _stopped(proc)
            pytest.fail(f"haproxy did not listen on {balancer.port}: {balancer.log[-2000:]}")
        time.sleep(0.02)
    if proc.poll() is not None:
        return None
    return proc


def _stopped(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
