"""SIGKILL `mailflow serve` at random moments and check that nothing accepted is lost and nothing half-written is seen.

Not part of the test suite: a bounded randomized hunt (docs/testing.md). One private server (its own queue under a
temporary directory, SMTP on a free 127.0.0.1 port) delivers to Maildirs (alice, bob, the bounce box), an mbox file
(an alias to a /file), a pipe service (a script per recipient that records what it read), and a relay recorder on
127.0.0.1 (aiosmtpd) that refuses bounce@relay.test (550: a bounce is generated) and defers every defer.test
recipient until the final drain (deferred mail for `queue flush` and a bigger queue). Each round starts the server on
the same queue, sends mail (several SMTP sessions, some with 10 recipients, some 120 KB or 400 KB: over mbox's
256 KB write batch; `mailflow sendmail` too),
and SIGKILLs it at a moment the round's kind chooses: uniform over the traffic, right after the k-th 250, while
`mailflow queue flush` or `mailflow reload` runs, while a bounce is under way, while a burst of small messages is
being committed (the store checkpointing), and once more while the deferred mail drains at the end. After each
restart `mailflow queue list` must work. At the end every accepted message (250, or sendmail exit 0) must be at
every recipient, complete (a pipe run, the relay and mbox entries check the message's END line); the queue empty,
its database passing integrity_check; duplicates are counted by kind, and a delivery repeated after its result was
logged as sent (the log follows the commit: a later run logging it again, or a Maildir copy newer than that line)
is a failure. The pipe script reads and records in a subshell, a grandchild of the server as a wrapper that runs
its deliverer without exec (a cut input is kept in out/partial.PID; its temporary files live in out/tmp). An mbox
entry a kill cut is counted (`mbox_cut_entries`); one glued to the next (a From_ line inside a line) is a failure.
`--budget` bounds the whole hunt, drain included.

    PYTHONPATH=. .venv/bin/python bench/killhunt.py --rounds 40 --seed 1 [--keep DIR]

Exit 0 when every check held; the figures are printed as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiosmtplib
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ports import accepts, free_port  # noqa: E402
from tests.support.servers import base_settings, merged, queue_counts, to_toml  # noqa: E402

PY = sys.executable
LOCAL_BOXES = ("alice", "bob")
PIPE_RCPTS = ("p1@pipe.test", "p2@pipe.test")
RELAY_RCPTS = tuple(f"r{n}@relay.test" for n in range(1, 9))
KINDS = ("uniform", "after250", "bounce", "flush", "reload", "burst")
SENDER = "sender@local.test"  # a local user: bounces land in its Maildir
ROUND_RESERVE = 30.0  # seconds a round may take (its waits end by the budget's; the kill's reap and a start after)
DRAIN_RESERVE = 60.0  # seconds kept for the final start, kill, start, drain, list and checks


# ------------------------------------------------------------------------------------------------ the relay recorder


class Recorder:
    """The relay next hop: records (recipient, message-id, complete) of each message it takes."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, bool]] = []
        self.open_defer = False

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == "bounce@relay.test":
            return "550 5.1.1 no such user"
        if address.endswith("@defer.test") and not self.open_defer:
            return "450 4.2.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msgid, complete = identify(envelope.original_content or envelope.content)
        for rcpt in envelope.rcpt_tos:
            self.got.append((rcpt, msgid, complete))
        return "250 OK"


def identify(data: bytes) -> tuple[str, bool]:
    """(the X-Token of a message, whether its body ends with its END line)."""
    m = re.search(rb"^X-Token: (\S+)", data, re.M | re.I)
    token = m.group(1).decode() if m else "?"
    return token, f"END-{token}".encode() in data


# ------------------------------------------------------------------------------------------------ the server


@dataclass
class World:
    root: Path
    port: int
    recorder: Recorder
    recorder_port: int
    mailbox: str = "maildir"
    config: Path = field(init=False)
    proc: subprocess.Popen | None = None
    run: int = 0

    def __post_init__(self) -> None:
        r = self.root
        (r / "out").mkdir(parents=True)
        r.chmod(0o755)  # deliveries to /file and to the pipe service run as default_privs (nobody)
        (r / "out").chmod(0o777)
        self.pipe_log = r / "out" / "pipe.log"
        self.mbox = r / "out" / "mb.mbox"
        script = r / "deliver.sh"
        (r / "out" / "tmp").mkdir()
        (r / "out" / "tmp").chmod(0o777)
        # The reading and the delivery run in a subshell, a grandchild of the server (as a wrapper that runs its
        # deliverer without exec): what outlives the server there is what a real deliverer would do.
        script.write_text("#!/bin/sh\n(\nf=$(mktemp -p " + str(r / "out" / "tmp") + ")\ncat > \"$f\"\n"
                          "tok=$(sed -n 's/^X-Token: //p' \"$f\" | head -1)\n"
                          "if grep -q \"^END-$tok\" \"$f\"; then c=ok; else c=partial; fi\n"
                          "echo \"$1 ${tok:-?} $c $PPID $(date +%s.%N) $(wc -c < \"$f\")\" >> "
                          f"{self.pipe_log} || exit 75\n"
                          "if [ $c = ok ]; then rm -f \"$f\"; else mv \"$f\" " + str(r / "out") + "/partial.$$; fi\n"
                          ")\n")
        script.chmod(0o755)
        aliases = r / "aliases"
        aliases.write_text(f"mb: {self.mbox}\n")
        settings = merged(base_settings(r), {
            "smtpd": {"listen": [f"127.0.0.1:{self.port}"]},
            "relay_domains": ["relay.test", "pipe.test", "defer.test"],
            "relayhost": f"[127.0.0.1]:{self.recorder_port}",
            "local_recipient_maps": ["inline:{alice=ok, bob=ok, mb=ok, sender=ok}"],
            "alias_maps": [f"texthash:{aliases}"],
            "transport_maps": ["inline:{pipe.test=deliver:}"],
            "pipe": {"deliver": {"argv": [str(script), "${recipient}"], "flags": "D"}},
            "queue": {"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"},
        })
        if self.mailbox == "mbox":  # alice's and bob's mailboxes are mbox files in their homes (written in-process)
            # fcntl only: a dotlock left by the SIGKILL holds the mailbox for stale_lock_time (500 s, as Postfix's)
            settings["local"] = {**settings["local"], "home_mailbox": "mbox", "mailbox_delivery_lock": ["fcntl"]}
        self.config = r / "mailflow.toml"
        self.config.write_text(to_toml(settings))

    def log(self, run: int) -> Path:
        return self.root / f"server-{run}.log"

    async def start(self) -> None:
        self.run += 1
        out = open(self.log(self.run), "ab")
        self.proc = subprocess.Popen([PY, "-m", "mailflow", "serve", "-c", str(self.config)], stdout=out,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out.close()
        deadline = time.monotonic() + 20
        while not accepts(self.port, "127.0.0.1"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log(self.run).read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def tool(self, *args: str, stdin: bytes | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "mailflow", *args], input=stdin, capture_output=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "MAILFLOW_CONFIG": str(self.config)})

    async def atool(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(self.tool, *args, stdin=stdin)

    def counts(self) -> dict:
        return queue_counts(self.root / "queue" / "queue.db")


# ------------------------------------------------------------------------------------------------ the mail


@dataclass
class Accepted:
    token: str
    rcpts: list[str]
    run: int
    via: str


def make_message(token: str, lines: int) -> bytes:
    """`lines` body lines of about 80 bytes (0: one short line)."""
    body = ("".join(f"line {n} {token} " + "x" * 60 + "\r\n" for n in range(lines)) if lines else f"body {token}\r\n")
    return (f"From: {SENDER}\r\nSubject: kill {token}\r\nMessage-ID: <{token}@killhunt>\r\nX-Token: {token}\r\n\r\n"
            f"{body}END-{token}\r\n").encode()


def pick_rcpts(rng: random.Random, kind: str) -> list[str]:
    if rng.random() < 0.3:  # ten recipients
        rcpts = ["alice@local.test", "bob@local.test", "mb@local.test", *PIPE_RCPTS, *RELAY_RCPTS[:5]]
    else:
        pool = ["alice@local.test", "bob@local.test", "mb@local.test", *PIPE_RCPTS, *RELAY_RCPTS]
        rcpts = rng.sample(pool, rng.randint(1, 3))
    if kind == "bounce" or rng.random() < 0.1:
        rcpts.append("bounce@relay.test")
    if kind in ("flush", "burst") or rng.random() < 0.1:
        rcpts.append(f"d{rng.randint(1, 3)}@defer.test")
    return rcpts


class Traffic:
    """Senders of one round; `acked` is set at each 250."""

    def __init__(self, world: World, rng: random.Random, accepted: list[Accepted], kind: str):
        self.world, self.rng, self.accepted, self.kind = world, rng, accepted, kind
        self.acked = asyncio.Event()
        self.n_acked = 0

    def token(self) -> str:
        return f"t{self.world.run}x{self.rng.getrandbits(40):010x}"

    async def session(self, count: int, small: bool = False) -> None:
        try:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.world.port, timeout=10)
            await client.connect()
            for _ in range(count):
                token = self.token()
                rcpts = ([f"d{self.rng.randint(1, 3)}@defer.test", "r1@relay.test"] if small
                         else pick_rcpts(self.rng, self.kind))
                size = self.rng.random()
                # 20% big: about 120 KB, or 400 KB (over mbox's WRITE_BATCH, 256 KB: an entry of several writes)
                data = make_message(token, 0 if small or size >= 0.2 else 1500 if size < 0.1 else 5000)
                refused, _ = await client.sendmail(SENDER, rcpts, data)  # returns only after a 250 at the end
                self.accepted.append(Accepted(token, [r for r in rcpts if r not in refused], self.world.run, "smtp"))
                self.n_acked += 1
                self.acked.set()
            await client.quit()
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            pass  # the server was killed: what got no 250 is not owed

    async def sendmail(self) -> None:
        token = self.token()
        rcpts = pick_rcpts(self.rng, self.kind)
        done = await self.world.atool("sendmail", "-f", SENDER, "-i", *rcpts, stdin=make_message(token, 0))
        if done.returncode == 0:
            self.accepted.append(Accepted(token, rcpts, self.world.run, "sendmail"))


# ------------------------------------------------------------------------------------------------ a round


async def round_(world: World, rng: random.Random, accepted: list[Accepted], kind: str, stats: Counter,
                 deadline: float) -> None:
    """One round; its waits end by `deadline` (monotonic)."""
    await world.start()
    listing = await world.atool("queue", "list")
    if listing.returncode != 0:
        raise RuntimeError(f"queue list failed after restart {world.run}: {listing.stderr.decode()[-2000:]}")
    traffic = Traffic(world, rng, accepted, kind)
    tasks = [asyncio.create_task(traffic.session(rng.randint(2, 8))) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.5:
        tasks.append(asyncio.create_task(traffic.sendmail()))
    if kind == "burst":
        tasks += [asyncio.create_task(traffic.session(60, small=True)) for _ in range(4)]
    if kind == "after250":
        k = rng.randint(1, 12)
        t0 = time.monotonic()
        while traffic.n_acked < k and time.monotonic() - t0 < 6 and time.monotonic() < deadline:
            traffic.acked.clear()
            try:
                await asyncio.wait_for(traffic.acked.wait(), 6)
            except asyncio.TimeoutError:
                break
    elif kind in ("flush", "reload"):
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        tool = asyncio.create_task(world.atool("queue", "flush") if kind == "flush" else world.atool("reload"))
        await asyncio.sleep(rng.uniform(0, 0.6))
        if tool.done():
            stats[f"{kind}_done_before_kill"] += 1
    elif kind == "bounce":
        await asyncio.sleep(rng.uniform(0.3, 2.5))
    else:
        await asyncio.sleep(rng.uniform(0, 3.0))
    world.kill()
    stats["kills"] += 1
    stats[f"kind_{kind}"] += 1
    await asyncio.wait(tasks, timeout=max(1.0, min(15.0, deadline - time.monotonic())))


# ------------------------------------------------------------------------------------------------ the checks


def maildir_tokens(box: Path) -> tuple[Counter, list[str]]:
    counts: Counter = Counter()
    partial = []
    new = box / "new"
    for f in (sorted(new.iterdir()) if new.exists() else []):
        token, complete = identify(f.read_bytes())
        counts[token] += 1
        if not complete:
            partial.append(f.name)
    return counts, partial


def mbox_tokens(path: Path, stats: Counter | None = None, notices: bool = False) -> tuple[Counter, list[str]]:
    """(whole entries by token, problems). An entry a kill cut (between two writes of one over WRITE_BATCH, as
    with Postfix's local(8)) is counted in stats["mbox_cut_entries"], not as a copy. A problem: a From_ line that
    does not start a line (glued to a cut entry: two X-Token lines in one entry). A whole entry without its
    blank line is counted (stats["mbox_entries_without_blank_line"]) and kept: the message is whole. `notices`: a
    bounce box, whose entries carry the returned message's X-Token without its END line (RET=HDRS): all count."""
    counts: Counter = Counter()
    bad = []
    if not path.exists():
        return counts, bad
    data = path.read_bytes()
    if data and not data.startswith(b"From "):
        bad.append("does not start with From_")
    entries = re.split(rb"\n(?=From )", data)  # (each but the last loses the newline before the next From_)
    for n, entry in enumerate(entries):
        if not entry.strip():
            continue
        token, complete = identify(entry)
        if len(re.findall(rb"^X-Token: ", entry, re.M | re.I)) > 1:
            bad.append(f"entries glued together {token}: a From_ line inside a line")
        elif not complete and not notices:
            if stats is not None:
                stats["mbox_cut_entries"] += 1
        else:
            counts[token] += 1
            if not entry.endswith(b"\n\n" if n == len(entries) - 1 else b"\n") and stats is not None:
                stats["mbox_entries_without_blank_line"] += 1
    return counts, bad


def sent_before(world: World, last_run: int) -> dict[tuple[str, str], tuple[int, float]]:
    """(token, recipient) -> (the run whose log said status=sent first, the line's time); from the logs'
    message-id and to= lines."""
    first: dict[tuple[str, str], tuple[int, float]] = {}
    for run in range(1, last_run + 1):
        qid_token: dict[str, str] = {}
        path = world.log(run)
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = re.search(r": ([0-9A-Za-z]+): message-id=<(t[0-9]+x[0-9a-f]+)@killhunt>", line)
            if m:
                qid_token[m.group(1)] = m.group(2)
            m = re.search(r": ([0-9A-Za-z]+): to=<([^>]*)>.*status=sent", line)
            if m and m.group(1) in qid_token:
                when = datetime.fromisoformat(line.split()[0]).timestamp()
                first.setdefault((qid_token[m.group(1)], m.group(2)), (run, when))
    return first


def check(world: World, accepted: list[Accepted], stats: Counter) -> list[str]:
    problems: list[str] = []
    if world.mailbox == "mbox":
        boxes = {f"{u}@local.test": mbox_tokens(world.root / "mail" / u / "mbox", stats) for u in LOCAL_BOXES}
    else:
        boxes = {f"{u}@local.test": maildir_tokens(world.root / "mail" / u / "Maildir") for u in LOCAL_BOXES}
    boxes["mb@local.test"] = mbox_tokens(world.mbox, stats)
    for rcpt, (_, bad) in boxes.items():
        problems += [f"{rcpt}: {b}" for b in bad]
    for user in (*LOCAL_BOXES, "sender"):
        tmp = world.root / "mail" / user / "Maildir" / "tmp"
        stats["maildir_tmp_leftovers"] += len(list(tmp.iterdir())) if tmp.exists() else 0
    pipe: Counter = Counter()
    for line in (world.pipe_log.read_text().splitlines() if world.pipe_log.exists() else []):
        rcpt, token, state = line.split()[:3]
        pipe[(rcpt, token)] += 1
        if state != "ok":
            problems.append(f"pipe {rcpt} read a partial message {token}")
    relay: Counter = Counter()
    for rcpt, token, complete in world.recorder.got:
        relay[(rcpt, token)] += 1
        if not complete:
            problems.append(f"relay {rcpt} got a partial message {token}")
    # a notice carries the returned message's X-Token header (its END line only with RET=FULL)
    bounces = (mbox_tokens(world.root / "mail" / "sender" / "mbox", notices=True) if world.mailbox == "mbox"
               else maildir_tokens(world.root / "mail" / "sender" / "Maildir"))[0]
    sent = sent_before(world, world.run)
    for acc in accepted:
        for rcpt in acc.rcpts:
            if rcpt == "bounce@relay.test":
                n, kind = bounces[acc.token], "bounce"
            elif rcpt in boxes:
                n, kind = boxes[rcpt][0][acc.token], "maildir" if world.mailbox == "maildir" else "mbox"
                kind = "file" if rcpt.startswith("mb@") else kind
            elif rcpt.endswith("@pipe.test"):
                n, kind = pipe[(rcpt, acc.token)], "pipe"
            else:
                n, kind = relay[(rcpt, acc.token)], "relay"
            stats["deliveries_checked"] += 1
            if n == 0:
                problems.append(f"LOST {acc.token} ({acc.via}, run {acc.run}) to {rcpt}")
            elif n > 1:
                stats[f"dup_{kind}"] += n - 1
                first = sent.get((acc.token, rcpt))
                later = first is not None and any(
                    run > first[0] for run in runs_delivering(world, acc.token, rcpt))
                if kind == "maildir" and first is not None:  # a copy written after the record was logged
                    later = later or any(when > first[1] + 0.05 for when in maildir_times(world, rcpt, acc.token))
                if later and kind != "bounce":
                    problems.append(f"DUP after recorded {kind} {acc.token} to {rcpt} (sent in run {first[0]})")
    con = sqlite3.connect(f"file:{world.root / 'queue' / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        verdict = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    if verdict != "ok":
        problems.append(f"queue.db integrity_check: {verdict}")
    counts = world.counts()
    if counts:
        problems.append(f"queue not empty: {counts}")
    stats["accepted"] = len(accepted)
    stats["accepted_sendmail"] = sum(a.via == "sendmail" for a in accepted)
    return problems


def maildir_times(world: World, rcpt: str, token: str) -> list[float]:
    """The mtimes of the copies of `token` in `rcpt`'s Maildir."""
    new = world.root / "mail" / rcpt.split("@")[0] / "Maildir" / "new"
    return [f.stat().st_mtime for f in new.iterdir() if identify(f.read_bytes())[0] == token]


def runs_delivering(world: World, token: str, rcpt: str) -> list[int]:
    """The runs whose log says a delivery of `token` to `rcpt` was sent (each log follows its commit)."""
    runs = []
    for run in range(1, world.run + 1):
        text = world.log(run).read_text(errors="replace") if world.log(run).exists() else ""
        qids = set(re.findall(rf": ([0-9A-Za-z]+): message-id=<{token}@killhunt>", text))
        for qid in qids:
            runs += [run] * len(re.findall(rf": {qid}: to=<{re.escape(rcpt)}>.*status=sent", text))
    return runs


# ------------------------------------------------------------------------------------------------ main


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="work under this directory and keep it")
    ap.add_argument("--mailbox", choices=("maildir", "mbox"), default="maildir", help="alice's and bob's")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole hunt, drain included")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = args.keep or Path(tempfile.mkdtemp(prefix="killhunt-"))
    recorder = Recorder()
    rport = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=rport)
    controller.start()
    world = World(root=root, port=free_port(), recorder=recorder, recorder_port=rport,
                  mailbox=args.mailbox)
    accepted: list[Accepted] = []
    stats: Counter = Counter()
    started = time.monotonic()
    end = started + args.budget
    try:
        for n in range(args.rounds):
            if time.monotonic() + ROUND_RESERVE + DRAIN_RESERVE > end:
                break
            kind = KINDS[n % len(KINDS)]
            await round_(world, rng, accepted, kind, stats, end - DRAIN_RESERVE)
            stats["rounds"] += 1
        recorder.open_defer = True  # the deferred mail drains: one more kill while it is removed (vacuum, checkpoint)
        await world.start()
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        world.kill()
        stats["kills"] += 1
        stats["kind_drain"] += 1
        await world.start()
        deadline = max(time.monotonic() + 10, end - 15)
        while world.counts() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # pipe children of the killed runs finish their writes
        listing = world.tool("queue", "list")
        stats["final_queue_list_rc"] = listing.returncode
        problems = check(world, accepted, stats)
        stats["pipe_tmp_leftovers"] = len(list((root / "out" / "tmp").iterdir()))
        world.kill()
    finally:
        world.kill()
        controller.stop()
    stats["seconds"] = round(time.monotonic() - started)
    print(json.dumps({"root": str(root), "stats": dict(stats), "problems": problems[:50],
                      "problem_count": len(problems)}, indent=1))
    if not args.keep and not problems:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
