#!/usr/bin/env python3
"""Built-in load generator: a stand-in for Postfix's `smtp-source` when Postfix is not installed.

    loadgen.py -s SESSIONS -l LENGTH -m COUNT -f FROM -t TO 127.0.0.1:PORT

Contract (the smtp-source semantics the benchmark relies on):
- Sends COUNT messages in total over SESSIONS concurrent workers; each message is its own TCP connection:
  greeting, EHLO, MAIL FROM, RCPT TO, DATA, From/To/Date/Message-Id headers + LENGTH bytes of body in
  80-column lines (no line starts with '.'), '.', QUIT.
- Exit 0 when every message got a 2xx reply after DATA; otherwise prints `loadgen: fatal: ...` to stderr
  and exits 1 at the first failure (as smtp-source does). Each reply is awaited at most 60 s.
- Only 127.0.0.0/8 and ports 2500-2599. Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import itertools
import os
import socket
import sys

REPLY_TIMEOUT = 60.0
LINE_WIDTH = 78


class SmtpFailure(Exception):
    """An unexpected reply or a lost connection; the message names the step."""


def make_body(length: int) -> bytes:
    """LENGTH bytes of CRLF-terminated lines like smtp-source's ('1XXX…', '2XXX…', …)."""
    lines, size = [], 0
    for n in itertools.count(1):
        if size >= length:
            break
        text = (str(n) + "X" * LINE_WIDTH)[: min(LINE_WIDTH, max(1, length - size - 2))]
        lines.append(text.encode() + b"\r\n")
        size += len(text) + 2
    return b"".join(lines)


async def read_reply(reader: asyncio.StreamReader, step: str) -> bytes:
    """One (possibly multi-line) reply; raises SmtpFailure unless it is 2xx or 3xx."""
    while True:
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise SmtpFailure(f"lost connection while {step}")
        if line[3:4] != b"-":
            break
    if line[:1] not in (b"2", b"3"):
        raise SmtpFailure(f"{step}: {line.decode(errors='replace').strip()}")
    return line


async def send_one(host: str, port: int, sender: str, rcpt: str, body: bytes, seq: int) -> None:
    """One connection, one message, QUIT."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REPLY_TIMEOUT)
    try:
        await read_reply(reader, "receiving the greeting")
        for command, step in ((b"EHLO loadgen.test", "sending EHLO"),
                              (f"MAIL FROM:<{sender}>".encode(), "sending sender"),
                              (f"RCPT TO:<{rcpt}>".encode(), "sending recipient"), (b"DATA", "sending DATA")):
            writer.write(command + b"\r\n")
            await read_reply(reader, step)
        headers = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nDate: {email.utils.formatdate()}\r\n"
                   f"Message-Id: <{os.getpid()}.{seq}@loadgen.test>\r\n\r\n").encode()
        writer.write(headers + body + b".\r\n")
        await read_reply(reader, "sending message")
        writer.write(b"QUIT\r\n")
        await read_reply(reader, "sending QUIT")
    finally:
        writer.close()


async def worker(host: str, port: int, a: argparse.Namespace, body: bytes, tickets: itertools.count) -> None:
    """Sends messages until COUNT tickets have been handed out across all workers."""
    while (seq := next(tickets)) < a.m:
        try:
            await send_one(host, port, a.f, a.t, body, seq)
        except (OSError, asyncio.TimeoutError) as e:
            raise SmtpFailure(f"message {seq}: {e.__class__.__name__}: {e}") from None


async def run(host: str, port: int, a: argparse.Namespace) -> int:
    body = make_body(a.l)
    tickets = itertools.count()
    try:
        await asyncio.gather(*(worker(host, port, a, body, tickets) for _ in range(max(1, a.s))))
    except SmtpFailure as e:
        print(f"loadgen: fatal: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-s", type=int, default=1, help="concurrent sessions")
    ap.add_argument("-l", type=int, default=0, help="body length in bytes")
    ap.add_argument("-m", type=int, default=1, help="messages in total")
    ap.add_argument("-f", default=f"foo@{socket.gethostname()}", help="sender")
    ap.add_argument("-t", default=f"foo@{socket.gethostname()}", help="recipient")
    ap.add_argument("address", help="127.0.0.1:PORT")
    a = ap.parse_args(argv)
    host, _, port = a.address.rpartition(":")
    if not host.startswith("127.") or not 2500 <= int(port) <= 2599:
        print(f"loadgen: refusing {a.address}: only 127.0.0.0/8 and ports 2500-2599", file=sys.stderr)
        return 2
    return asyncio.run(run(host, int(port), a))


if __name__ == "__main__":
    sys.exit(main())
