"""Disk full for real (run by hand, as root: it mounts 20 MB tmpfs file systems and unmounts them at the end).

    PYTHONPATH=$PWD python tests/campaigns/disk_full.py [queue|maildir|log ...] [--workdir DIR]

- queue: the queue directory on the tmpfs. Load until smtpd refuses at MAIL (452 by queue_minfree's guard), then
  sessions stopped before the end of DATA while a filler file takes the rest of the space, then their final
  dots (the group commit meets SQLITE_FULL, big ones ENOSPC in the spool). Every reply is counted; then the
  space comes back, a sink starts, and every message that got 250 must arrive once.
- maildir: the Maildirs on the tmpfs, full: deliveries to alice defer (4.3.0), never bounce; space back,
  flush: each is delivered once.
- log: the log file on the tmpfs, full: mail still flows; what the server writes instead is counted.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support import (CaptureHandler, ServerProcess, SmtpClient, base_settings, big_message,  # noqa: E402
                           free_port, merged, queue_counts, to_toml)

SIZE_LIMIT = 2_000_000  # the guard at MAIL keeps 1.5 x this free: 3 MB of the 20


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "20m"):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, name: str = "filler", leave: int = 0) -> Path:
    """Write a file until the file system has `leave` bytes free (0: until ENOSPC)."""
    path = directory / name
    with open(path, "ab") as f:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(1 << 20, max(4096, free - leave)))
                f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    return path


def message(token: str, big: bool = False) -> bytes:
    head = f"Subject: {token}\r\nX-Token: {token}\r\n".encode()
    if big:
        return head + big_message(size=900_000, long_line=False).split(b"\r\n", 1)[1]
    return head + f"\r\nbody {token}\r\n".encode()


async def session_to_dot(port: int, token: str, rcpt: str, big: bool) -> tuple[SmtpClient | None, str]:
    """A session up to the content, without the final dot; (client, '') or (None, the refusal)."""
    client = await SmtpClient.connect(port, timeout=30)
    for command in ("EHLO x", f"MAIL FROM:<s-{token}@remote.test>", f"RCPT TO:<{rcpt}>", "DATA"):
        reply = await client.cmd(command, timeout=30)
        if not (reply.code and 200 <= reply.code < 400):
            await client.close()
            return None, f"{command.split()[0]} {reply.code} {reply.text[:60]}"
    await client.send(message(token, big).replace(b"\r\n.", b"\r\n.."))  # dot-stuffed
    return client, ""


async def send_one(port: int, token: str, rcpt: str, big: bool) -> str:
    client, refused = await session_to_dot(port, token, rcpt, big)
    if client is None:
        return refused
    reply = await client.cmd(b".", timeout=60)
    await client.close()
    return f"DOT {reply.code} {reply.text[:60]}"


class Experiment:
    def __init__(self, work: Path):
        self.work = work
        self.port = free_port()
        self.sink_port = free_port()
        self.accepted: dict[str, str] = {}  # token -> recipient
        self.replies: collections.Counter = collections.Counter()

    def server(self, **overrides) -> ServerProcess:
        settings = merged(base_settings(self.work), {
            "smtpd": {"listen": [f"127.0.0.1:{self.port}"], "message_size_limit": SIZE_LIMIT},
            "relayhost": f"[127.0.0.1]:{self.sink_port}", **overrides})
        config = self.work / "mailflow.toml"
        config.write_text(to_toml(settings))
        return ServerProcess(config, self.work / "server.log", self.port, cwd=self.work)

    async def send(self, token: str, rcpt: str, big: bool = False) -> str:
        try:
            outcome = await send_one(self.port, token, rcpt, big)
        except (OSError, asyncio.TimeoutError) as e:
            outcome = f"error {type(e).__name__}"
        self.replies[" ".join(outcome.split()[:2])] += 1
        if outcome.startswith("DOT 250"):
            self.accepted[token] = rcpt
        return outcome

    async def start_sink(self) -> CaptureHandler:
        handler = CaptureHandler()
        await asyncio.get_running_loop().create_server(lambda: AiosmtpdSMTP(handler, hostname="sink.test"),
                                                       "127.0.0.1", self.sink_port)
        return handler

    def arrived(self, sink: CaptureHandler) -> collections.Counter:
        found: collections.Counter = collections.Counter()
        for m in sink.messages:
            for line in m.content[:2048].splitlines():
                if line.startswith(b"X-Token: "):
                    found[line[9:].decode()] += len(m.rcpt_tos)
        for sub in ("new", "cur"):
            for user in ("alice", "bob"):
                folder = self.work / "mail" / user / "Maildir" / sub
                for p in folder.iterdir() if folder.is_dir() else []:
                    for line in p.read_bytes()[:4096].splitlines():
                        if line.startswith(b"X-Token: "):
                            found[line[9:].decode()] += 1
        return found

    def verdict(self, found: collections.Counter) -> str:
        lost = [t for t in self.accepted if found[t] == 0]
        doubled = [t for t in self.accepted if found[t] > 1]
        return f"accepted {len(self.accepted)}, lost {len(lost)} {lost[:5]}, doubled {len(doubled)} {doubled[:5]}"

    def traces(self) -> collections.Counter:
        text = (self.work / "server.log").read_text(errors="replace")
        return collections.Counter(line.split("]: ", 1)[-1][:90] for line in text.splitlines()
                                   if "error" in line.lower() or "warning" in line.lower() or "Trace" in line)


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.25)
    return predicate()


async def queue_experiment(work: Path) -> None:
    x = Experiment(work)
    with tmpfs(work / "queue"):
        server = x.server()
        await server.start()
        n = 0
        while x.replies["MAIL 452"] < 10 and n < 400:  # 1. load until the guard at MAIL refuses
            batch = [x.send(f"a{n + i}", f"r{n + i}@relay.test", big=(n + i) % 3 == 0) for i in range(6)]
            await asyncio.gather(*batch)
            n += 6
        counts = queue_counts(work / "queue" / "queue.db")
        print(f"queue 1 (load until MAIL is refused): {dict(x.replies)}; queue {counts}")
        # 2. sessions at the end of DATA, then the disk is filled to the last byte, then the dots
        filler = work / "queue" / "filler"
        x.replies.clear()
        await server.terminate()  # room for the sessions: the guard at MAIL is off for this step
        server = x.server(smtpd={"listen": [f"127.0.0.1:{x.port}"], "message_size_limit": 1_000_000})
        await server.start()
        open_sessions = []
        for i in range(8):
            client, refused = await session_to_dot(x.port, f"b{i}", f"b{i}@relay.test", big=i % 2 == 0)
            if client is None:
                x.replies[" ".join(refused.split()[:2])] += 1
            else:
                open_sessions.append((f"b{i}", client))
        fill(work / "queue")
        replies = await asyncio.gather(*(c.cmd(b".", timeout=60) for _, c in open_sessions), return_exceptions=True)
        for (token, client), reply in zip(open_sessions, replies):
            code = getattr(reply, "code", type(reply).__name__)
            x.replies[f"DOT {code}"] += 1
            if code == 250:
                x.accepted[token] = f"{token}@relay.test"
            print(f"   {token}: {getattr(reply, 'text', reply)!s:.90}")
            await client.close()
        outcome = await x.send("c0", "c0@relay.test")
        print(f"queue 2 (dots on a full disk): {dict(x.replies)}; a new message then: {outcome}")
        st = os.statvfs(work / "queue")
        print(f"   free {st.f_bavail * st.f_frsize}; queue {queue_counts(work / 'queue' / 'queue.db')}")
        # 3. space comes back: new mail is accepted, the sink starts, everything accepted arrives once
        filler.unlink()
        x.replies.clear()
        for i in range(5):
            await x.send(f"d{i}", f"d{i}@relay.test")
        print(f"queue 3 (space back): {dict(x.replies)}")
        sink = await x.start_sink()
        await wait_for(lambda: all(x.arrived(sink)[t] for t in x.accepted), 60)
        await asyncio.sleep(2)
        print(f"queue: {x.verdict(x.arrived(sink))}; queue at the end {queue_counts(work / 'queue' / 'queue.db')}")
        print(f"   log: {x.traces().most_common(8)}")
        await server.terminate()


async def maildir_experiment(work: Path) -> None:
    x = Experiment(work)
    with tmpfs(work / "mail"):
        server = x.server()
        await server.start()
        await x.send("m0", "alice@local.test")
        await wait_for(lambda: x.arrived(CaptureHandler())["m0"] == 1, 10)
        filler = fill(work / "mail")
        for i in range(1, 6):
            await x.send(f"m{i}", "alice@local.test", big=i == 5)
        await asyncio.sleep(3)
        log = (work / "server.log").read_text(errors="replace")
        deferred = [ln for ln in log.splitlines() if "to=<alice@local.test>" in ln and "status=deferred" in ln]
        bounced = [ln for ln in log.splitlines() if "to=<alice@local.test>" in ln and "status=bounced" in ln]
        print(f"maildir full: replies {dict(x.replies)}; deferred lines {len(deferred)}, bounced lines {len(bounced)}")
        print(f"   e.g. {deferred[0].split(': ', 1)[1][:200] if deferred else None}")
        print(f"   tmp files left in the Maildir: {list((work / 'mail' / 'alice' / 'Maildir' / 'tmp').iterdir())}")
        filler.unlink()
        await wait_for(lambda: all(x.arrived(CaptureHandler())[t] for t in x.accepted), 30)
        print(f"maildir: {x.verdict(x.arrived(CaptureHandler()))}; queue {queue_counts(work / 'queue' / 'queue.db')}")
        await server.terminate()


async def log_experiment(work: Path) -> None:
    x = Experiment(work)
    with tmpfs(work / "logs", size="2m"):
        server = x.server(log={"file": str(work / "logs" / "mail.log")})
        await server.start()
        await x.send("l0", "alice@local.test")
        filler = fill(work / "logs")
        before = (work / "server.log").stat().st_size
        for i in range(1, 21):
            await x.send(f"l{i}", "alice@local.test")
        await wait_for(lambda: all(x.arrived(CaptureHandler())[t] for t in x.accepted), 20)
        stderr = (work / "server.log").read_bytes()[before:]
        print(f"log full: replies {dict(x.replies)}; {x.verdict(x.arrived(CaptureHandler()))}")
        print(f"   stderr grew by {len(stderr)} bytes, {stderr.count(b'--- Logging error ---')} 'Logging error' blocks;"
              f" first lines: {stderr[:300]!r}")
        filler.unlink()
        await x.send("l99", "alice@local.test")
        await asyncio.sleep(1)
        tail = (work / "logs" / "mail.log").read_text(errors="replace").splitlines()[-3:]
        print(f"   space back: the log file's last lines {[t[:120] for t in tail]}")
        await server.terminate()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiments", nargs="*", default=["queue", "maildir", "log"])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="mailflow-diskfull-"))
    for name in args.experiments:
        work = base / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"== {name} in {work}", flush=True)
        await {"queue": queue_experiment, "maildir": maildir_experiment, "log": log_experiment}[name](work)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
