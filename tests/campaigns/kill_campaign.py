"""A bounded random-SIGKILL campaign against a real `mailflow serve` (not collected by pytest; run it by hand).

    PYTHONPATH=$PWD python tests/campaigns/kill_campaign.py --kills 25 --seed 1 [--big 0.5] [--term 0.3] [--dovecot]
        [--workdir DIR]

Workload, each message carrying a unique token (X-Token and the envelope sender snd-TOKEN@relay.test):
- local: alice@local.test + ok-TOKEN@relay.test (small or big, spooled);
- alias: team@local.test, a virtual alias of bob@local.test and team-copy@relay.test;
- mixed: ok-, soft- (450) and hard- (550) recipients at the sink: a bounce and delay notices to snd-TOKEN;
- softonly: one soft- recipient (stays deferred; the ones `queue delete` may remove);
- sendmail: `mailflow sendmail -f snd-TOKEN@relay.test alice@local.test ok-TOKEN@relay.test`;
- lmtp (with --dovecot): alice and bob@example.test in a private Dovecot over LMTP, + ok-TOKEN@relay.test.
Meanwhile `queue hold/release/requeue/delete` and `reload` run, and the server is SIGKILLed at random moments and
restarted.
At the end (after release ALL and a settle), per accepted token and recipient: delivered once, or bounced to
the sender, or still queued (soft); duplicates are counted and printed with the log lines of their queue id;
content files without a row, rows left active, and the queue tool's view are checked. Exit status 1 on a loss.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support import (CaptureHandler, ServerProcess, base_settings, big_message, free_port,  # noqa: E402
                           merged, send, to_toml)
from tests.support.dovecot import Dovecot, dovecot_instance, lmtp_route  # noqa: E402
from tests.support.ports import accepts  # noqa: E402

WINDOW = 0.2  # seconds between a copy and the kill that kept its result from being recorded, at most
TOKEN_HEADER = re.compile(rb"^X-Token: (\w+)", re.M)
QUEUE_ID = re.compile(rb"by mx\.mailflow\.test[^;]*?id ([0-9A-F]{16})")


def notice_kind(head: bytes) -> str:
    subject = re.search(rb"^Subject: (.*)", head, re.M)
    return "delay" if subject and subject.group(1).startswith(b"Delayed Mail") else "failure"


class SinkHandler(CaptureHandler):
    """The relay sink: soft-* recipients get 450, hard-* get 550, everyone else is accepted; `arrivals` records
    (time, our queue id, recipients) of each message."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, str, list[str], str, str]] = []  # time, queue id, rcpts, token, kind

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("soft-"):
            return "450 4.2.0 try again later"
        if local.startswith("hard-"):
            return "550 5.1.1 no such user"
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        head = envelope.original_content[:8192]
        qid, token = QUEUE_ID.search(head), TOKEN_HEADER.search(head)
        kind = notice_kind(head) if envelope.mail_from in ("", "<>") else "mail"
        self.arrivals.append((time.time(), qid.group(1).decode() if qid else "?", list(envelope.rcpt_tos),
                              token.group(1).decode() if token else "?", kind))
        return await super().handle_DATA(server, session, envelope)


@dataclass
class Accepted:
    token: str
    kind: str
    recipients: list[str]
    queue_id: str = ""


@dataclass
class Campaign:
    work: Path
    rng: random.Random
    port: int = 0
    sink_port: int = 0
    accepted: dict[str, Accepted] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    refused: collections.Counter = field(default_factory=collections.Counter)
    ops: collections.Counter = field(default_factory=collections.Counter)
    kills: list[float] = field(default_factory=list)
    big_share: float = 0.15
    term_share: float = 0.0  # the share of kills that come up to a second after a SIGTERM
    dovecot: Dovecot | None = None  # with one: the lmtp kind, to alice and bob@example.test over LMTP
    stop: bool = False

    @property
    def config(self) -> Path:
        return self.work / "mailflow.toml"

    def write_config(self) -> None:
        settings = merged(base_settings(self.work), {
            "smtpd": {"listen": [f"127.0.0.1:{self.port}"]},
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "virtual_alias_maps": ["inline:{ {team@local.test=bob@local.test,team-copy@relay.test} }"],
            "queue": {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
                      "delay_warning_time": "2s"},
        })
        if self.dovecot:
            settings.update(relay_domains=["relay.test", "example.test"], transport_maps=lmtp_route(self.dovecot))
        self.config.write_text(to_toml(settings))

    # ------------------------------------------------------------------------------------------------ workload
    def message(self, token: str, big: bool) -> bytes:
        head = f"Subject: campaign {token}\r\nX-Token: {token}\r\n"
        if big:
            return head.encode() + big_message(seed=hash(token) & 0xFFFF, long_line=False).split(b"\r\n", 1)[1]
        return f"{head}\r\nbody {token}\r\n".encode()

    def recipients(self, kind: str, token: str) -> list[str]:
        return {
            "local": ["alice@local.test", f"ok-{token}@relay.test"],
            "alias": ["team@local.test"],
            "mixed": [f"ok-{token}@relay.test", f"soft-{token}@relay.test", f"hard-{token}@relay.test"],
            "softonly": [f"soft-{token}@relay.test"],
            "lmtp": ["alice@example.test", "bob@example.test", f"ok-{token}@relay.test"],
        }[kind]

    def maildir(self, mailbox: str) -> Path:
        user, domain = mailbox.split("@")
        if domain == "example.test":
            assert self.dovecot is not None
            return self.dovecot.root / "mail" / domain / user / "Maildir"
        return self.work / "mail" / user / "Maildir"

    async def smtp_sender(self) -> None:
        while not self.stop:
            token = os.urandom(8).hex()
            kind = self.rng.choice(["local", "local", "alias", "mixed", "softonly"] + ["lmtp"] * bool(self.dovecot))
            rcpts = self.recipients(kind, token)
            big = self.rng.random() < self.big_share
            try:
                refused, reply = await send(self.port, f"snd-{token}@relay.test", rcpts, self.message(token, big))
            except Exception as error:  # noqa: BLE001 - a killed server: not accepted
                self.refused[type(error).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            if reply.startswith("2.0.0 Ok: queued as") and not refused:
                self.accepted[token] = Accepted(token, kind, rcpts, reply.split()[-1])
            await asyncio.sleep(self.rng.random() * 0.1)

    async def sendmail_sender(self) -> None:
        while not self.stop:
            token = os.urandom(8).hex()
            rcpts = ["alice@local.test", f"ok-{token}@relay.test"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailflow", "sendmail", "-C", str(self.config), "-f",
                f"snd-{token}@relay.test", *rcpts, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
            await proc.communicate(self.message(token, self.rng.random() < 0.1))
            if proc.returncode == 0:
                self.accepted[token] = Accepted(token, "sendmail", rcpts)
            else:
                self.refused[f"sendmail exit {proc.returncode}"] += 1
            await asyncio.sleep(self.rng.random() * 0.3)

    async def queue_tool(self, *args: str) -> int:
        return await self.mailflow("queue", *args)

    async def mailflow(self, *args: str) -> int:
        """`mailflow ARGS -c CONFIG`; a failure is counted in `ops` with its last words."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailflow", *args, "-c", str(self.config),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, err = await proc.communicate()
        if proc.returncode:
            self.ops[f"{' '.join(args[:2])} exit {proc.returncode}: {err.decode()[-200:]}"] += 1
        return proc.returncode

    async def operator(self) -> None:
        while not self.stop:
            await asyncio.sleep(0.5 + self.rng.random() * 2)
            op = self.rng.choice(["hold", "release", "requeue", "delete", "flush", "reload"])
            if op == "reload":  # SIGHUP: the kills come during reloads too
                await self.mailflow("reload")
            elif op == "delete":
                soft = [a for a in self.accepted.values() if a.kind == "softonly" and a.token not in self.deleted]
                if not soft:
                    continue
                victim = self.rng.choice(soft)
                self.deleted.add(victim.token)  # before the tool runs: it may succeed and still be killed
                await self.queue_tool("delete", victim.queue_id)
            else:
                await self.queue_tool(op, "ALL")
            self.ops[op] += 1

    # ---------------------------------------------------------------------------------------------- the kills
    async def killer(self, server: ServerProcess, kills: int) -> None:
        for n in range(kills):
            await asyncio.sleep(0.3 + self.rng.random() * 4)
            if self.rng.random() < self.term_share:  # a stop under way (the grace period), cut short
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(self.rng.random())
            server.kill()
            self.kills.append(time.time())
            await asyncio.sleep(self.rng.random() * 0.5)
            await server.start()
            print(f"kill {n + 1}/{kills} at {time.strftime('%H:%M:%S')}: {len(self.accepted)} accepted", flush=True)

    # ------------------------------------------------------------------------------------------------ checks
    def local_counts(self) -> collections.Counter:
        found: collections.Counter = collections.Counter()
        boxes = ["alice@local.test", "bob@local.test"] + ["alice@example.test", "bob@example.test"] * bool(self.dovecot)
        for box in boxes:
            for sub in ("new", "cur"):
                folder = self.maildir(box) / sub
                for path in folder.iterdir() if folder.is_dir() else []:
                    match = TOKEN_HEADER.search(path.read_bytes()[:4096])
                    if match:
                        found[(match.group(1).decode(), box)] += 1
        return found

    def rows(self) -> tuple[dict, dict, list]:
        con = sqlite3.connect(f"file:{self.work / 'queue' / 'queue.db'}?mode=ro", uri=True, timeout=10)
        try:
            messages = {qid: queue for qid, queue in con.execute("SELECT id, queue FROM message")}
            pending = collections.defaultdict(list)
            for qid, address in con.execute("SELECT message_id, address FROM recipient WHERE status = 'pending'"):
                pending[qid].append(address)
            senders = con.execute("SELECT id, sender FROM message").fetchall()
        finally:
            con.close()
        return messages, pending, senders


def report(c: Campaign, sink: SinkHandler) -> int:
    relay: collections.Counter = collections.Counter()
    notices: collections.Counter = collections.Counter()
    for msg in sink.messages:
        match = TOKEN_HEADER.search(msg.content[:8192])
        if msg.mail_from in ("", "<>"):
            kind = notice_kind(msg.content[:8192])
            for rcpt in msg.rcpt_tos:
                notices[(rcpt.split("@")[0].removeprefix("snd-"), kind)] += 1
            continue
        for rcpt in msg.rcpt_tos:
            relay[(match.group(1).decode() if match else "?", rcpt)] += 1
    local = c.local_counts()
    messages, pending, senders = c.rows()
    queued_tokens = collections.defaultdict(list)
    for qid, sender in senders:
        if sender.startswith("snd-"):
            queued_tokens[sender.split("@")[0].removeprefix("snd-")].append(qid)
    losses, duplicates = [], []
    for token, acc in c.accepted.items():
        expected = ["bob@local.test", "team-copy@relay.test"] if acc.kind == "alias" else acc.recipients
        for rcpt in expected:
            got = (local if rcpt.endswith(("@local.test", "@example.test")) else relay)[(token, rcpt)]
            if rcpt == "team-copy@relay.test":
                got = relay[(token, rcpt)]
            if got > 1:
                duplicates.append((token, rcpt, got, queued_tokens.get(token) or acc.queue_id))
            if got:
                continue
            if rcpt.startswith("hard-") and notices[(token, "failure")]:
                continue
            still = any(rcpt in pending.get(qid, ()) for qid in queued_tokens.get(token, ()))
            if still or token in c.deleted:
                continue
            losses.append((token, acc.kind, rcpt, acc.queue_id))
    for (token, kind), n in notices.items():
        if n > 1:
            duplicates.append((token, f"{kind} notice", n, queued_tokens.get(token)))
    content = c.work / "queue" / "content"
    orphans = [p.name for p in content.iterdir() if p.name not in messages] if content.is_dir() else []
    states = collections.Counter(messages.values())
    print(f"accepted {len(c.accepted)} ({collections.Counter(a.kind for a in c.accepted.values())}); "
          f"deleted {len(c.deleted)}; refused while down {dict(c.refused)}")
    print(f"operator ops {dict(c.ops)}")
    kinds = collections.Counter(k for _, k in notices.elements())
    print(f"relay deliveries {sum(relay.values())}, local {sum(local.values())}, notices {dict(kinds)}")
    print(f"queue after the stop {dict(states)} (active: in the server's hands at the stop); orphan content files"
          f" {orphans}")
    print(f"LOSSES {len(losses)}: {losses[:20]}")
    print(f"DUPLICATES {len(duplicates)}:")
    unexplained = 0
    for dup in duplicates:
        why = explain(c, sink, dup)
        unexplained += why.startswith("NOT")
        print("   ", dup, why)
    return 1 if losses or unexplained or orphans else 0


def explain(c: Campaign, sink: SinkHandler, duplicate: tuple) -> str:
    """Whether a duplicate is in the window SMTP allows: its first copy reached the sink (or the Maildir) at most a
    second before a kill and the log records only the later delivery (the first one's result was never written).
    Different queue ids for one notice kind mean the notice itself was made twice: not that window; a message's
    different queue ids are that window when one is a requeued copy of the other (its pending recipients went
    along, the one cut off too)."""
    token, rcpt = duplicate[0], duplicate[1]
    if rcpt.endswith(("@local.test", "@example.test")):
        times = sorted(p.stat().st_mtime for sub in ("new", "cur")
                       for p in (c.maildir(rcpt) / sub).iterdir()
                       if f"X-Token: {token}".encode() in p.read_bytes()[:4096])
        qids: set[str] = set()
    elif "notice" in rcpt:
        kind = rcpt.split()[0]
        hits = [(t, q) for t, q, _, tok, k in sink.arrivals if k == kind and f"snd-{token}@relay.test" in _]
        times, qids = sorted(t for t, _ in hits), {q for _, q in hits}
    else:
        hits = [(t, q) for t, q, rcpts, tok, _ in sink.arrivals if tok == token and rcpt in rcpts]
        times, qids = sorted(t for t, _ in hits), {q for _, q in hits}
    kills = [k for k in c.kills if times and times[0] - 1.0 <= k <= times[-1]]
    gap = min((k - times[0] for k in kills), key=abs, default=None)  # the kill nearest the first copy
    # one notice made once, or one message (a requeue's copy, under a new queue id, is the same message)
    one_message = len(qids if "notice" in rcpt else copies_of(c, qids)) <= 1
    verdict = "window" if gap is not None and abs(gap) <= WINDOW and one_message else "NOT THE WINDOW"
    return (f"{verdict}: queue ids {sorted(qids)}, copies at {[round(t % 1000, 2) for t in times]}, "
            f"kills {[round(k % 1000, 2) for k in kills]}, the first copy {gap if gap is None else round(gap, 3)}s"
            " before a kill")


REQUEUED = re.compile(r": ([0-9A-F]{16}): uid=\d+ from=<[^>]*> orig_id=([0-9A-F]{16})")


def copies_of(c: Campaign, qids: set[str]) -> set[str]:
    """`qids` with each requeued copy (pickup's `NEW: uid=N from=<s> orig_id=OLD`) named by its first queue id."""
    first: dict[str, str] = {}
    for new, old in REQUEUED.findall((c.work / "server.log").read_text(errors="replace")):
        first[new] = first.get(old, old)
    return {first.get(qid, qid) for qid in qids}


STUCK = 10.0  # seconds a message may stay active while its retries come every 1-2 s


async def settle(c: Campaign, server: ServerProcess, sink: SinkHandler, timeout: float) -> list[str]:
    """Release everything, then wait until nothing but soft-deferred mail is left and the counts stop moving.
    Returns the messages that stayed active all along for STUCK seconds or more (rows stuck active: a stopped
    server leaves the ones in its hands active, by design, until the next start recovers them)."""
    await c.queue_tool("release", "ALL")
    last, still_since = None, time.monotonic()
    active_since: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        messages, pending, _ = c.rows()
        active_since = {q: active_since.get(q, time.monotonic()) for q, state in messages.items() if state == "active"}
        only_soft = all(all(a.startswith("soft-") for a in pending.get(q, ())) for q in messages)
        now = (len(sink.messages), sum(c.local_counts().values()), len(messages))
        if now != last:
            last, still_since = now, time.monotonic()
        elif only_soft and time.monotonic() - still_since > max(4.0, STUCK):
            break
    else:
        print("settle: timed out", flush=True)
    return [q for q, since in active_since.items() if time.monotonic() - since >= STUCK]


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--big", type=float, default=0.15, help="the share of big (spooled) messages")
    parser.add_argument("--term", type=float, default=0.0, help="the share of kills that follow a SIGTERM")
    parser.add_argument("--dovecot", action="store_true", help="also mail to a private Dovecot over LMTP")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dovecot = stack.enter_context(dovecot_instance()) if args.dovecot else None
        return await campaign(args, dovecot)


async def campaign(args: argparse.Namespace, dovecot: Dovecot | None) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mailflow-kills-"))
    print(f"work directory {work}", flush=True)
    handler = SinkHandler()
    sink = await asyncio.get_running_loop().create_server(
        lambda: AiosmtpdSMTP(handler, hostname="sink.test"), "127.0.0.1", 0)
    c = Campaign(work, random.Random(args.seed), port=free_port(), sink_port=sink.sockets[0].getsockname()[1],
                 big_share=args.big, term_share=args.term, dovecot=dovecot)
    c.write_config()
    server = ServerProcess(c.config, work / "server.log", c.port, cwd=work)
    await server.start()
    workers = [asyncio.create_task(w) for w in (c.smtp_sender(), c.smtp_sender(), c.smtp_sender(),
                                                c.sendmail_sender(), c.operator())]
    try:
        await c.killer(server, args.kills)
    finally:
        c.stop = True
        await asyncio.gather(*workers, return_exceptions=True)
    server.kill()  # one more crash, then a clean start and a settle
    c.kills.append(time.time())
    await server.start()
    stuck = await settle(c, server, handler, timeout=90)
    await server.terminate()
    status = report(c, handler)
    print(f"rows stuck active for {STUCK:.0f}s while the server ran: {len(stuck)} {stuck[:5]}")
    status |= bool(stuck)
    listing = subprocess.run([sys.executable, "-m", "mailflow", "queue", "list", "-c", str(c.config)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    requests = re.search(r"in (\d+) Requests?", listing.stdout)
    in_store = sum(1 for _ in c.rows()[0])
    print(f"queue list: exit {listing.returncode}, {requests.group(0) if requests else listing.stdout[-80:]!r};"
          f" the store holds {in_store}; stderr {listing.stderr[-200:]!r}")
    if not requests or int(requests.group(1)) != in_store:
        status = 1
    sink.close()
    assert not accepts(c.port)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
