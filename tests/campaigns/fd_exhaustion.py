"""File descriptors run out while delivering (run by hand; bounded: a minute or so).

    PYTHONPATH=$PWD python tests/campaigns/fd_exhaustion.py [--nofile 64] [--workdir DIR]

`mailflow serve` with RLIMIT_NOFILE small; many concurrent SMTP sessions submit mail for local Maildirs (files),
a relay sink (sockets) and big messages (content files), while idle connections hold descriptors. Counts the
replies, then releases the idle connections and checks that every message that got 250 arrives exactly once,
that the server still serves, and what it logged (warnings, tracebacks).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support import (CaptureHandler, ServerProcess, base_settings, big_message, free_port,  # noqa: E402
                           merged, queue_counts, send, to_toml)


def message(token: str, big: bool) -> bytes:
    head = f"Subject: {token}\r\nX-Token: {token}\r\n".encode()
    if big:
        return head + big_message(size=400_000, long_line=False).split(b"\r\n", 1)[1]
    return head + f"\r\nbody {token}\r\n".encode()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nofile", type=int, default=64)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mailflow-fds-"))
    handler = CaptureHandler()
    sink = await asyncio.get_running_loop().create_server(lambda: AiosmtpdSMTP(handler, hostname="sink.test"),
                                                          "127.0.0.1", 0)
    port = free_port()
    config = work / "mailflow.toml"
    config.write_text(to_toml(merged(base_settings(work), {
        "smtpd": {"listen": [f"127.0.0.1:{port}"]},
        "relayhost": f"[127.0.0.1]:{sink.sockets[0].getsockname()[1]}"})))
    server = ServerProcess(config, work / "server.log", port, cwd=work, nofile=args.nofile)
    await server.start()
    accepted: dict[str, list[str]] = {}
    replies: collections.Counter = collections.Counter()

    async def one(n: int) -> None:
        token = f"t{n}"
        rcpts = ["alice@local.test", "bob@local.test", f"far{n}@relay.test"]
        try:
            refused, reply = await send(port, "s@remote.test", rcpts, message(token, n % 5 == 0))
        except Exception as e:  # noqa: BLE001 - counted
            replies[f"{type(e).__name__}: {str(e)[:50]}"] += 1
            return
        replies[reply[:5]] += 1
        if reply.startswith("2.0.0") and not refused:
            accepted[token] = rcpts

    idle = []
    for _ in range(args.nofile // 2):  # descriptors held by clients that say nothing
        idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
    started = time.monotonic()
    for wave in range(4):
        await asyncio.gather(*(one(wave * 40 + i) for i in range(40)))
    print(f"with {len(idle)} idle clients: replies {dict(replies)} in {time.monotonic() - started:.1f}s")
    for writer in idle:
        writer.close()
    replies.clear()
    await asyncio.gather(*(one(1000 + i) for i in range(20)))
    print(f"idle clients gone: replies {dict(replies)}")

    def arrived() -> collections.Counter:
        found: collections.Counter = collections.Counter()
        for m in handler.messages:
            token = m.content.split(b"X-Token: ", 1)[1].split(b"\r\n", 1)[0].decode()
            found[(token, "relay")] += len(m.rcpt_tos)
        for user in ("alice", "bob"):
            for sub in ("new", "cur"):
                folder = work / "mail" / user / "Maildir" / sub
                for p in folder.iterdir() if folder.is_dir() else []:
                    data = p.read_bytes()[:4096]
                    token = data.split(b"X-Token: ", 1)[1].split(b"\n", 1)[0].strip().decode()
                    found[(token, user)] += 1
        return found

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and queue_counts(work / "queue" / "queue.db"):
        await asyncio.sleep(0.5)
    found = arrived()
    lost = [(t, w) for t in accepted for w in ("alice", "bob", "relay") if found[(t, w)] == 0]
    doubled = [(t, w) for t in accepted for w in ("alice", "bob", "relay") if found[(t, w)] > 1]
    log = (work / "server.log").read_text(errors="replace")
    notable = collections.Counter(line.split("]: ", 1)[-1][:100] for line in log.splitlines()
                                  if "warning" in line or "error" in line or "status=deferred" in line)
    print(f"accepted {len(accepted)}; lost {len(lost)} {lost[:5]}; doubled {len(doubled)} {doubled[:5]}; "
          f"queue {queue_counts(work / 'queue' / 'queue.db')}")
    print(f"log: {len(log.splitlines())} lines, {log.count('Traceback')} tracebacks; {notable.most_common(10)}")
    await server.terminate()
    sink.close()
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
