"""Scripted SMTP sessions replayed against a private Postfix and mailflow alike (the differential tests of
restriction lists), and what to compare of their logs.

- `xclient(n)`: the XCLIENT command that makes a session's client 192.0.2.n (the lists' tables name those).
- `connected(port, source)`: a socket from the loopback address `source` to 127.0.0.1:`port`.
- `replay_sessions(port, sessions, sources)`: each session's (command, reply) pairs, the greeting (or what comes
  in its place) first under the command "", None once the server has closed the connection.
- `restriction_settings(settings)`: Postfix's `smtpd_*_restrictions` settings as mailflow's [smtpd] keys.
- `disconnects(lines)`, `every_session_ended(pf)`: smtpd's disconnect lines (their command counts), and a wait
  until the private Postfix has written one for every session.
- `POSTFIX_BASE`: the private Postfix's settings these tests share (XCLIENT from loopback, no error sleep);
  `await replayed(pf, replay)`: a test's `replay(port)` run against it, with its log once every session has ended.
"""
from __future__ import annotations

import re
import socket

from tests.support.dialogue import Reply, SmtpClient
from tests.support.waiting import eventually


def xclient(n: int) -> str:
    return f"XCLIENT ADDR=192.0.2.{n} NAME=[UNAVAILABLE]"


def connected(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def replay_sessions(port: int, sessions: dict[str, list[str]], sources: dict[str, str] | None = None
                          ) -> dict[str, list[tuple[str, Reply | None]]]:
    got = {}
    for name, commands in sessions.items():
        source = (sources or {}).get(name, "127.0.0.1")
        client = await SmtpClient.connect(port, greet=False, sock=connected(port, source))
        replies: list[Reply | None] = [await client.reply()]
        for command in commands:
            last = replies[-1]
            if last is None or last.code is None:
                break
            try:
                replies.append(await client.cmd(command))
            except ConnectionError:
                replies.append(None)
        await client.close()
        got[name] = list(zip(["", *commands], replies))
    return got


def restriction_settings(settings: dict[str, str]) -> dict[str, list[str]]:
    """`smtpd_client_restrictions = a, b` -> client_restrictions = ["a", "b"]."""
    return {name[6:]: [item.strip() for item in value.split(",")] for name, value in settings.items()}


DISCONNECT = re.compile(r"(?:.*/smtpd\[\d+\]: )?(disconnect from \S+ .*)")


def disconnects(lines) -> list[str]:
    """The disconnect lines with their command counts (what pflogsumm and log watchers read), without syslog's
    prefix; not the private Postfix's own probe that saw it listen (no command)."""
    found = (DISCONNECT.fullmatch(line) for line in lines)
    return [m[1] for m in found if m and not m[1].endswith(" commands=0/0")]


async def every_session_ended(pf) -> None:
    """The private Postfix has logged the end of every session (its disconnect lines are written after the
    client has gone)."""
    await eventually(lambda: pf.maillog.count(": disconnect from") == pf.maillog.count(": connect from"), timeout=10,
                     what="a disconnect line for every session")


POSTFIX_BASE = {"myhostname": "pf.test", "mydestination": "local.test", "relay_domains": "relay.test",
                "relayhost": "[127.0.0.1]:9", "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                "smtpd_error_sleep_time": "0"}


async def replayed(pf, replay):
    """(what `replay(pf.port)` returns, the private Postfix's log lines once every session has ended)."""
    replies = await replay(pf.port)
    await every_session_ended(pf)
    return replies, pf.maillog.splitlines()

