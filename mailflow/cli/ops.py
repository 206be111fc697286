"""The commands an operator (or a container runtime) runs against a running server: reload, status, health.

    reload(config)           like `postfix reload`: check the configuration as `check-config` does (exit 2
                             naming FILE: KEY: REASON), then send SIGHUP to the server that holds the queue's
                             lock (its pid file, `<queue_directory>/mailflow.pid`); exit 1 when none runs. The
                             server re-reads and applies what it can (its log says what, and what waits for a
                             restart; a configuration it refuses leaves the one in force).
    status(config)           like `postfix status`: exit 0 when a server holds the queue's lock (saying its pid),
                             1 when none does (or the pid file cannot be read), as scripts and monitors test it.
    health(config, timeout)  a container HEALTHCHECK: connect to the server's first SMTP listener and read its
                             greeting; exit 0 on 220, 1 otherwise, saying why. A listener behind a balancer
                             (upstream_proxy_protocol) is sent a PROXY v2 LOCAL header first, as HAProxy's own
                             checks do; an implicit-TLS one is greeted after the handshake (not verified: the
                             probe asks whether the server answers, not who it is). A --timeout that is not a
                             number of seconds above 0 and at most DURATION_MAX (nan, inf) is a usage error (2).

Failure behaviour: configuration problems through `common.fail_config` (exit 2); never a traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
from typing import Optional

import typer

from mailflow.cli.common import ConfigOption, config_error_text, config_name, config_path, fail, load
from mailflow.cli.server import table_problems
from mailflow.config import Config, SmtpdConfig
from mailflow.queuelock import queue_owner
from mailflow.syntax import DURATION_MAX, parse_hostport

GREETING_LIMIT = 4096  # bytes of greeting the probe reads at most
WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # a wildcard listener is probed on loopback


def reload(config: Optional[str] = ConfigOption) -> None:
    """Make the running server re-read its configuration, the lookup table files that changed (one unchanged is
    kept as read) and its certificates (like postfix reload).
    The configuration is checked first, as check-config does; exit 1 when no server runs on the queue."""
    cfg = load(config)
    problems = table_problems(cfg, config_name(config_path(config)))
    for problem in problems:
        typer.echo(config_error_text(problem), err=True)
    if problems:
        raise typer.Exit(2)
    pid = _queue_owner(cfg, "mailflow reload")
    if not pid:
        fail("mailflow reload", f"a server holds the queue {cfg.queue_path}, but its pid cannot be read", 1)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        fail("mailflow reload", f"cannot signal the server (pid {pid}): {e.strerror}", 1)
    typer.echo(f"mailflow reload: the server (pid {pid}) is reloading; its log says what changed")


def _queue_owner(cfg: Config, tool: str) -> int:
    """The pid of the server running on the configured queue (0: one runs, its pid unknown); exit 1 saying why
    when none does or the pid file cannot be read."""
    try:
        pid = queue_owner(cfg.queue_path)
    except OSError as e:  # the pid file a symbolic link or a FIFO (never followed nor waited on), unreadable
        fail(tool, f"cannot read the pid file {e.filename or cfg.queue_path}: {e.strerror}", 1)
    if pid is None:
        fail(tool, f"no server is running on the queue {cfg.queue_path}", 1)
    return pid


def status(config: Optional[str] = ConfigOption) -> None:
    """Exit 0 when a server runs on the configured queue, saying its pid, else 1 (like postfix status)."""
    cfg = load(config)
    pid = _queue_owner(cfg, "mailflow status")
    typer.echo(f"mailflow status: a server is running on the queue {cfg.queue_path}: "
               + (f"PID: {pid}" if pid else "its pid cannot be read (its pid file missing, or not written yet)"))


def _probe_timeout(seconds: float) -> float:
    if not 0 < seconds <= DURATION_MAX:  # (nan is refused too: it compares false); inf overflowed the socket's
        raise typer.BadParameter(f"{seconds} is not a number of seconds above 0 and at most {DURATION_MAX}")
    return seconds


def health(config: Optional[str] = ConfigOption,
           timeout: float = typer.Option(5.0, "--timeout", callback=_probe_timeout,
                                         help="seconds to wait for the greeting")) -> None:
    """Exit 0 when the server greets with 220 on its first SMTP listener (a container HEALTHCHECK), else 1."""
    cfg = load(config)
    host, port, role, smtpd = probe_target(cfg)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if not port:
        fail("mailflow health", f"{where}: the listener's port is chosen at start (0): nothing to probe", 1)
    try:
        reply = greeting(host, port, implicit_tls=role == "submissions", proxy=bool(smtpd.upstream_proxy_protocol),
                         timeout=timeout)
    except (OSError, ValueError) as e:
        fail("mailflow health", f"{where}: {e}", 1)
    if not reply.startswith("220"):
        fail("mailflow health", f"{where}: {reply or 'connection closed without a greeting'}", 1)
    typer.echo(f"{where}: {reply}")


def probe_target(cfg: Config) -> tuple[str, int, str, SmtpdConfig]:
    """(host, port, role, effective settings) of the listener to probe: the first that is not implicit TLS,
    else the first; a wildcard address as loopback."""
    candidates = [(address, "mta", cfg.smtpd) for address in cfg.smtpd.listen]
    candidates += [(spec.address, spec.role, cfg.smtpd.for_listener(spec)) for spec in cfg.smtpd.listeners]
    if not candidates:
        fail("mailflow health", "no SMTP listener is configured", 1)
    address, role, smtpd = next((c for c in candidates if c[1] != "submissions"), candidates[0])
    host, port = parse_hostport(address)
    return WILDCARDS.get(host, host), port, role, smtpd


def greeting(host: str, port: int, *, implicit_tls: bool, proxy: bool, timeout: float) -> str:
    """The server's greeting (its last line), after which the probe says QUIT. Raises OSError."""
    from mailflow.stages.smtpd.frontends import V2_SIGNATURE

    with socket.create_connection((host, port), timeout=timeout) as raw:
        if proxy:
            raw.sendall(V2_SIGNATURE + bytes((0x20, 0x00, 0x00, 0x00)))  # v2, LOCAL, no address
        sock: socket.socket = raw
        if implicit_tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(raw, server_hostname=host)
        reply = _reply(sock)
        if reply.startswith("220"):
            sock.sendall(b"QUIT\r\n")
        return reply


def _reply(sock: socket.socket) -> str:
    """The last line of one (multi-line) reply, or "" when the server closes first."""
    data = b""
    while len(data) < GREETING_LIMIT:
        chunk = sock.recv(GREETING_LIMIT)
        if not chunk:
            break
        data += chunk
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) < 4 or line[3:4] != b"-":
                return line.decode("utf-8", "replace")
    return data.decode("utf-8", "replace").strip()
