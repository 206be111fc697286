#!/usr/bin/env python3
"""Built-in capture sink: a stand-in for Postfix's `smtp-sink -c` when Postfix is not installed.

    capture_sink.py [-c] [-M COUNT] 127.0.0.1:PORT [BACKLOG]

Contract:
- Listens on 127.0.0.1:PORT (loopback only, ports 2500-2599) and answers SMTP minimally: 220 greeting,
  EHLO/HELO (PIPELINING, 8BITMIME, SIZE), MAIL/RCPT/RSET/NOOP 250, DATA 354 ... 250, QUIT 221, anything
  else 502. Message content is discarded; only counted (DATA end = one message).
- With -c, after each message writes `sess=S quit=Q mesg=N dups=D\\r` to stdout (flushed), the same
  `mesg=N` counter format smtp-sink -c prints, so one parser reads both. D counts messages whose
  Message-Id header was already seen (a duplicate delivery).
- With -M COUNT, exits 0 right after answering the COUNT-th message. SIGTERM/SIGINT exit 0 after
  printing the final counter line. No other exit except a bind error (exit 1).
Pure asyncio, standard library only, so the harness also works on a machine without Postfix.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

GREETING = b"220 capture-sink ESMTP\r\n"
EHLO_REPLY = b"250-capture-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n"
MESSAGE_ID = re.compile(rb"^Message-Id:\s*(\S+)", re.IGNORECASE | re.MULTILINE)
STREAM_LIMIT = 64 * 1024 * 1024


class Counters:
    """Session, QUIT, message and duplicate counters shared by all connections."""

    def __init__(self, show: bool, stop_after: int, done: asyncio.Event) -> None:
        self.sessions = self.quits = self.messages = self.duplicates = 0
        self.show = show
        self.stop_after = stop_after
        self.done = done
        self.seen_ids: set[bytes] = set()

    def line(self) -> str:
        return f"sess={self.sessions} quit={self.quits} mesg={self.messages} dups={self.duplicates}\r"

    def emit(self) -> None:
        if self.show:
            sys.stdout.write(self.line())
            sys.stdout.flush()

    def add_message(self, content: bytes) -> None:
        self.messages += 1
        m = MESSAGE_ID.search(content[:8192])
        if m:
            if m.group(1) in self.seen_ids:
                self.duplicates += 1
            self.seen_ids.add(m.group(1))
        self.emit()
        if self.stop_after and self.messages >= self.stop_after:
            self.done.set()


async def read_data(reader: asyncio.StreamReader) -> bytes:
    """The DATA content after the 354 reply, up to and without the terminating '.' line."""
    lines = []
    while (line := await reader.readline()) not in (b".\r\n", b".\n"):
        if not line:
            raise asyncio.IncompleteReadError(b"".join(lines), None)
        lines.append(line)
    return b"".join(lines)


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Counters) -> None:
    """One SMTP conversation: answer each command until QUIT or EOF."""
    writer.write(GREETING)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(EHLO_REPLY)
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                content = await read_data(reader)
                writer.write(b"250 2.0.0 Ok: queued\r\n")
                await writer.drain()
                counters.add_message(content)
            elif verb == b"QUIT":
                counters.quits += 1
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 5.5.2 Error: command not recognized\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        counters.sessions += 1
        writer.close()


async def serve(host: str, port: int, backlog: int, show: bool, stop_after: int) -> int:
    done = asyncio.Event()
    counters = Counters(show, stop_after, done)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        server = await asyncio.start_server(lambda r, w: session(r, w, counters), host, port,
                                            backlog=backlog, limit=STREAM_LIMIT, reuse_address=True)
    except OSError as e:
        print(f"capture-sink: fatal: bind {host}:{port}: {e.strerror}", file=sys.stderr)
        return 1
    async with server:
        await done.wait()
    counters.show = True
    counters.emit()
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", action="store_true", help="print running counters")
    ap.add_argument("-M", type=int, default=0, metavar="COUNT", help="exit after COUNT messages")
    ap.add_argument("-u", metavar="USER", help="accepted for smtp-sink compatibility; ignored")
    ap.add_argument("address", help="127.0.0.1:PORT")
    ap.add_argument("backlog", nargs="?", type=int, default=1024)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    host, _, port = a.address.rpartition(":")
    if not host.startswith("127.") or not 2500 <= int(port) <= 2599:
        print(f"capture-sink: refusing {a.address}: only 127.0.0.0/8 and ports 2500-2599", file=sys.stderr)
        return 2
    return asyncio.run(serve(host, int(port), a.backlog, a.c, a.M))


if __name__ == "__main__":
    sys.exit(main())
