"""A private, throwaway Postfix instance for interop tests (never the default one, never port 25).

    async with postfix_instance(main_cf={...}) as pf:   # smtpd on 127.0.0.1:pf.port
                                                         # master_cf="...": service lines added to master.cf
        pf.run("postqueue", "-p")                        # a tool pointed at this instance with -c
        pf.listed()                                      # its queue as `postqueue -j` lists it, each message once
        await pf.queue_empty()                           # bounded wait until its queue is empty (read so twice)
        pf.maillog                                       # its log so far
        pf.mail_version                                  # `postconf -h mail_version` as numbers: (3, 7, 11)
        pf.keeps_refused_transactions                    # 3.7.21 or earlier: the reset bugs fixed in 3.7.22
        offset = await pf.sessions_ended()               # where the log stands once every smtpd session so
                                                         # far (the readiness probe's) has its disconnect line
                                                         # (the error counts the sessions still open)
        offset = await pf.flushed()                      # once a postlog(1) mark sent now is in the log, so is
                                                         # every line sent before it: read after "nothing more
                                                         # comes" waits
        await pf.logged("disconnect from", count=2, since=offset)
                                                         # its log from `offset` once it holds the text that
                                                         # often (postlogd writes a moment after the replies:
                                                         # wait for a line, never sleep and read once)
    write_cooled(path, text)                             # a main.cf or texthash: table a Postfix tool reads at
                                                         # once (a fresh one it waits 1-2 s to cool; the
                                                         # texthash: tables an instance's main.cf and master.cf
                                                         # name are dated back as it starts)
    with readable_pki() as (root, context):              # root/cert.pem and root/key.pem for localhost in a
                                                         # folder the postfix user can read; a client context
                                                         # that trusts them
    ours, theirs = await side_by_side(with_mailflow(), with_postfix())
                                                         # a differential's two sides at once, Postfix's on a
                                                         # thread (its tools block): as long as the longer one
    postfix_instance(main_cf, nameserver="127.53.x.y")  # its resolver asks that address, port 53 (a dns_zone
                                                         # started there), nothing else: the instance runs in
                                                         # its own mount namespace (unshare -m) where a
                                                         # resolv.conf of its own is bound over /etc/resolv.conf
    private_nameserver_address()                         # a loopback address for that, unlikely to be in use
                                                         # (both skip, or fail under MAILFLOW_REQUIRE_TOOLS=1,
                                                         # without unshare, mount or the privilege to use them)

Everything lives in a fresh folder under the system temp dir (pytest's tmp_path is not traversable by the
`postfix` user): etc/ (main.cf, master.cf copied from /etc/postfix with chroot off and smtpd moved to the port),
queue/, data/, maillog. `stop` sends the master SIGTERM (as `postfix stop` does), waits at most 10 s for it to
go (a zombie is gone: the master is not our child, and this machine's reaper took 1.4 s to collect it, at every
one of some 80 instances the suite starts), kills it if it did not, and deletes the folder. Needs root (Postfix's master
starts as root) and the postfix package: `postfix_instance` calls `require_postfix()` (skips, or fails under
MAILFLOW_REQUIRE_TOOLS=1).

Postfix's smtp-sink as the next hop the differential tests compare at:

    async with smtp_sink() as (port, dump):   # every message received appended to `dump` (-D), from its
                                              # `X-Client-Addr:` line, with `X-Mail-Args:`/`X-Rcpt-Args:` lines
    dumped_messages(dump)                     # the messages so far, one string each
    probe_envelopes(dump)                     # {N: (MAIL args, sorted RCPT args)} of the messages whose
                                              # Subject is `probe-N`

    postqueue_listed(stdout)                  # `postqueue -j` output as messages, each queue id once (showq
                                              # reads the queues one after the other: a message moving to a
                                              # queue read later is listed twice). Every test reading
                                              # `postqueue -j` goes through it (or pf.listed()).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from tests.support.ports import accepts, free_port
from tests.support.tools import require_tool
from tests.support.waiting import eventually

BASE_MAIN_CF = {
    "compatibility_level": "3.6",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "smtputf8_enable": "no",
    "biff": "no",
    "alias_maps": "",
    "alias_database": "",
    "smtp_dns_support_level": "disabled",
    "maillog_file_prefixes": "/var, /dev/stdout, /tmp",
}


# Postfix reads main.cf again, 0.3 s apart, until its mtime is more than a second old ("hot" files may be half
# written: util/dict.c dict_load_file_xt): `postfix start` and every tool run in the next two seconds waited up to
# 2 s. A fresh instance's main.cf, written whole before any reader, is dated this many seconds back.
MAIN_CF_COOL_DOWN = 10
# the first Postfix 3.7 whose skip_bdat and data_cmd end a refused transaction (`keeps_refused_transactions`)
FIXED_TRANSACTION_RESETS = (3, 7, 22)


def write_cooled(path: Path, text: str) -> Path:
    """A file Postfix waits for to cool (main.cf, a texthash: table) written whole and dated MAIN_CF_COOL_DOWN
    seconds back, so that a Postfix program run on it at once (postconf -c, postmap -q) reads it at once, not a
    second or two later."""
    path.write_text(text)
    cooled = time.time() - MAIN_CF_COOL_DOWN
    os.utime(path, (cooled, cooled))
    return path


def cooled_texthash_tables(text: str) -> None:
    """Every existing `texthash:PATH` file `text` names (a main.cf value, master.cf lines) dated back as
    write_cooled dates main.cf: Postfix reads a texthash file again, 0.3 s apart, until its mtime is more than a
    second old (util/dict_thash.c), so each daemon that opened a table a test had just written waited 1-2 s."""
    for path in re.findall(r"texthash:([^\s,{}]+)", text):
        with contextlib.suppress(OSError):
            if os.stat(path).st_mtime > time.time() - MAIN_CF_COOL_DOWN:
                cooled = time.time() - MAIN_CF_COOL_DOWN
                os.utime(path, (cooled, cooled))


def require_postfix() -> None:
    require_tool("postfix")
    if os.geteuid() != 0:
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail("a private Postfix instance needs root")
        pytest.skip("a private Postfix instance needs root")


def require_private_nameserver() -> None:
    """What a private Postfix with a nameserver of its own needs: root and Postfix, `unshare` and `mount`, and the
    privilege to make a mount namespace (a container without CAP_SYS_ADMIN has not): skips, or fails under
    MAILFLOW_REQUIRE_TOOLS=1, naming what is missing."""
    require_postfix()
    refused = _mount_namespace_refused(require_tool("unshare"), require_tool("mount"))
    if refused is not None:
        message = f"a private Postfix's own resolv.conf needs a mount namespace (unshare -m: {refused})"
        if os.environ.get("MAILFLOW_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@functools.cache
def _mount_namespace_refused(unshare: str, mount: str) -> str | None:
    """Why `unshare -m` cannot make a mount namespace here (its error), None when it can: probed once per pair of
    tools, not at each address drawn (the skip or fail decision is not cached: MAILFLOW_REQUIRE_TOOLS changes)."""
    probe = subprocess.run([unshare, "-m", "--propagation", "private", mount, "--version"], capture_output=True,
                           timeout=20)
    return None if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip()


def private_nameserver_address() -> str:
    """A random address in 127.53.0.0/16 for a DNS server on port 53 that one private Postfix asks (port 53 is
    the only one libc's resolver asks; each test its own address, so that concurrent ones do not meet). Asked
    before the server binds port 53, it skips (or fails) first where a private Postfix cannot run with it
    (`require_private_nameserver`), as `postfix_instance` would: binding port 53 needs root too."""
    require_private_nameserver()
    return f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"


def postqueue_listed(stdout: bytes | str) -> list[dict]:
    """`postqueue -j` output as its messages, each queue id once, in the order first listed, with what it was
    listed as last (where it went). Postfix 3.7's showq reads maildrop, active, incoming, deferred, then hold, so a
    message that moves to a queue read later between two reads (active or incoming to deferred or hold, deferred to
    hold) is listed in both (the project's CI met it); one that moves the other way (incoming or deferred to active,
    hold to deferred) may be in neither listing: no listing taken while mail moves promises every message."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    messages = (json.loads(line) for line in text.splitlines() if line.strip())
    return list({message["queue_id"]: message for message in messages}.values())


class PostfixInstance:
    def __init__(self, root: Path, port: int, nameserver: str | None = None):
        self.root = root
        self.etc = root / "etc"
        self.port = port
        self.nameserver = nameserver
        self._marks = 0  # postlog(1) marks sent (flushed)

    @property
    def maillog(self) -> str:
        log = self.root / "maillog"
        return log.read_text(errors="replace") if log.exists() else ""

    @functools.cached_property
    def mail_version(self) -> tuple[int, ...]:
        """Its `postconf -h mail_version` as numbers, (3, 7, 11); a snapshot's date is left out."""
        found = self.run("postconf", "-h", "mail_version")
        found.check_returncode()
        return tuple(int(part) for part in found.stdout.decode().strip().split("-")[0].split(".") if part.isdigit())

    @property
    def keeps_refused_transactions(self) -> bool:
        """Postfix 3.7.11 and earlier (fixed in 3.7.22; the versions between not checked): after a refused BDAT
        LAST its skip_bdat resets the transaction without its recipient state (rcpt_reset), and after an
        end_of_data_restrictions refusal its data_cmd returns before the reset, so the next commands are judged on
        the refused transaction's state. mailflow ends the transaction in both cases, as 3.7.22 does
        (docs/security.md); the differential tests mask these sessions only for such a Postfix."""
        return self.mail_version < FIXED_TRANSACTION_RESETS

    def run(self, *argv: str, stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess:
        """A Postfix tool with `-c <this instance>` inserted after its name."""
        return subprocess.run([argv[0], "-c", str(self.etc), *argv[1:]], input=stdin, capture_output=True,
                              timeout=timeout)

    def listed(self) -> list[dict]:
        """Its queue as `postqueue -j` lists it, each message once (postqueue_listed)."""
        return postqueue_listed(self.run("postqueue", "-j").stdout)

    async def queue_empty(self, timeout: float = 20) -> None:
        """Wait until two `postqueue -p` in a row, 0.2 s apart, say the instance's queue is empty (one alone may
        miss a message moving from incoming to active: showq reads active first); fails with its log after
        `timeout` seconds."""
        empty_reads = 0

        def empty_twice() -> bool:
            nonlocal empty_reads
            empty = b"Mail queue is empty" in self.run("postqueue", "-p").stdout
            empty_reads = empty_reads + 1 if empty else 0
            return empty_reads == 2

        try:
            await eventually(empty_twice, timeout=timeout, step=0.2)
        except AssertionError:
            raise AssertionError(f"the private Postfix's queue is not empty after {timeout}s:\n"
                                 f"{self.maillog[-3000:]}") from None

    def delivering(self) -> bool:
        """A message is on its way: a file in the incoming, active or maildrop queue (one left deferred is not)."""
        queue = self.root / "queue"
        return any(path.is_file() for name in ("maildrop", "incoming", "active")
                   for path in (queue / name).rglob("*"))

    async def logged(self, text: str, count: int = 1, since: int = 0, timeout: float = 20) -> str:
        """The log from offset `since` once `text` occurs there `count` times or more; fails with the log's tail
        after `timeout` seconds (a bound for a failure: a loaded machine's postlogd may be seconds late)."""
        try:
            await eventually(lambda: self.maillog[since:].count(text) >= count, timeout=timeout, step=0.05)
        except AssertionError:
            raise AssertionError(f"the private Postfix did not log {text!r} {count} time(s) within {timeout}s:\n"
                                 f"{self.maillog[since:][-3000:]}") from None
        return self.maillog[since:]

    async def flushed(self, timeout: float = 20) -> int:
        """The log's length once a mark sent now through postlogd with postlog(1) is in it: then so is every line
        sent to postlogd before it (postlogd is one process reading one socket). After a wait for "nothing more
        comes", this makes the log read the log of everything that came meanwhile, however late postlogd is."""
        self._marks += 1
        mark = f"mailflow-test mark {self._marks}"
        assert self.run("postlog", "-t", "mailflow-test/mark", mark).returncode == 0
        await self.logged_line(rf"{mark}$", timeout)
        return len(self.maillog)

    async def logged_line(self, pattern: str, timeout: float = 20) -> None:
        """Until a line of the log matches `pattern` (a regular expression, MULTILINE)."""
        try:
            await eventually(lambda: re.search(pattern, self.maillog, re.MULTILINE), timeout=timeout, step=0.05)
        except AssertionError:
            raise AssertionError(f"the private Postfix did not log a line matching {pattern!r} within {timeout}s:\n"
                                 f"{self.maillog[-3000:]}") from None

    def open_sessions(self) -> int:
        """smtpd sessions with a `connect from` line and no `disconnect from` line yet (-1: not one has ended)."""
        log = self.maillog
        disconnects = len(re.findall(r"/smtpd\[\d+\]: disconnect from ", log))
        return len(re.findall(r"/smtpd\[\d+\]: connect from ", log)) - disconnects if disconnects else -1

    async def sessions_ended(self, timeout: float = 20) -> int:
        """The log's length once every smtpd session begun so far has its `disconnect from` line (`start`'s
        readiness probe's at least): an offset after which every smtpd line is of the sessions that follow.
        `flushed` first: once its mark is in the log, so is the `connect from` of every session begun; then the
        sessions' ends. (An offset taken while a session's lines are still on their way to postlogd shifts
        another's lines in or out.) The error says how many are still open: a test that left a client open (one
        not closed in `finally`, or kept by a failed test's traceback) holds its session for smtpd_timeout."""
        await self.flushed(timeout)
        try:
            await eventually(lambda: self.open_sessions() == 0, timeout=timeout, step=0.05)
        except AssertionError:
            open_now = self.open_sessions()
            raise AssertionError(
                f"a private Postfix's smtpd sessions did not all end in its log within {timeout}s: "
                + ("not one has ended" if open_now < 0 else
                   f"{open_now} still open (connect from lines without their disconnect from; did a test leave a "
                   f"client open?)") + f"\n{self.maillog[-3000:]}") from None
        return len(self.maillog)

    def _master_pid(self) -> int | None:
        """The running master's pid; None once it has ended (a zombie too: it is not our child, and its reaper
        may take a second or more to collect it)."""
        pid_file = self.root / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().strip())
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return None if state in ("Z", "X") else pid

    async def start(self, main_cf: dict[str, str], master_cf: str = "") -> None:
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True)
        shutil.chown(self.root / "data", "postfix")
        master = Path("/etc/postfix/master.cf").read_text()
        master, n = re.subn(r"^smtp\s+inet\s+n\s+-\s+\S+", f"127.0.0.1:{self.port} inet n - n", master, count=1,
                            flags=re.MULTILINE)
        assert n == 1, "no smtpd line in /etc/postfix/master.cf"
        (self.etc / "master.cf").write_text(master + master_cf)
        settings = {**BASE_MAIN_CF, "queue_directory": str(self.root / "queue"),
                    "data_directory": str(self.root / "data"), "maillog_file": str(self.root / "maillog"),
                    "multi_instance_name": f"mailflow-test-{self.port}", **main_cf}
        write_cooled(self.etc / "main.cf", "".join(f"{k} = {v}\n" for k, v in settings.items()))
        cooled_texthash_tables("\n".join(settings.values()) + "\n" + master_cf)
        self.run("postconf", "-F", "*/*/chroot = n").check_returncode()
        started = self._start_master()
        assert started.returncode == 0, started.stderr.decode(errors="replace")
        await eventually(lambda: accepts(self.port), timeout=10, step=0.1,
                         what=f"the private Postfix listens on 127.0.0.1:{self.port}")

    def _start_master(self) -> subprocess.CompletedProcess:
        """`postfix start` (which runs `postfix check`, which makes the queue folders, first); with a nameserver,
        in a mount namespace of its own where /etc/resolv.conf names only that server (the master and every
        daemon it starts live in it; the machine's own file is untouched)."""
        if self.nameserver is None:
            return self.run("postfix", "start")
        resolv = self.root / "resolv.conf"
        resolv.write_text(f"nameserver {self.nameserver}\noptions attempts:1 timeout:2\n")
        script = 'mount --bind "$1" /etc/resolv.conf && exec postfix -c "$2" start'
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(resolv),
                               str(self.etc)], capture_output=True, timeout=20)

    async def stop(self) -> None:
        """SIGTERM to the master (what `postfix stop` sends, without the script around it), at most 10 s for it
        to end its children and go, then SIGKILL; the folder is removed."""
        pid = self._master_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await eventually(lambda: self._master_pid() is None, timeout=10, step=0.1)
            if self._master_pid() is not None:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.asynccontextmanager
async def postfix_instance(main_cf: dict[str, str] | None = None, master_cf: str = "", nameserver: str | None = None):
    require_postfix() if nameserver is None else require_private_nameserver()
    root = Path(tempfile.mkdtemp(prefix="mailflow-pf-"))
    os.chmod(root, 0o755)
    pf = PostfixInstance(root, free_port(), nameserver)
    try:
        await pf.start(main_cf or {}, master_cf)
        yield pf
    finally:
        await pf.stop()


async def side_by_side(ours, theirs):
    """Two coroutines at once: `ours` (with mailflow, on this loop) and `theirs` (with a private Postfix) on a
    thread with a loop of its own, as Postfix's tools block their caller while they run (on mailflow's loop they
    would hold up its timers); both awaited whatever happens: (ours' result, theirs'). A differential test's two
    sides, each waiting on its own server, then take as long as the longer one, not the sum."""
    their_side = asyncio.ensure_future(asyncio.to_thread(asyncio.run, theirs))
    try:
        ours = await ours
    finally:
        await asyncio.wait([their_side])
    return ours, their_side.result()


@contextlib.asynccontextmanager
async def smtp_sink(*options: str):
    """smtp-sink on a free port, dumping every message (with its envelope arguments) to a file: (port, dump)."""
    sink = require_tool("smtp-sink")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="mailflow-sink-"))
    os.chmod(folder, 0o777)  # as root smtp-sink runs as nobody
    dump = folder / "dump.txt"
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(sink, *user, *options, "-D", str(dump), f"127.0.0.1:{port}", "16",
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await eventually(lambda: accepts(port), timeout=5, step=0.05, what=f"smtp-sink listens on {port}")
        yield port, dump
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def dumped_messages(dump: Path) -> list[str]:
    """The messages an smtp-sink dump holds so far, each from its `X-Client-Addr:` line on."""
    text = dump.read_text(errors="replace") if dump.exists() else ""
    return text.split("X-Client-Addr:")[1:]


def probe_envelopes(dump: Path) -> dict[int, tuple[list[str], list[str]]]:
    """Per message whose Subject is `probe-N`: (its `X-Mail-Args` addresses, its sorted `X-Rcpt-Args` lines: the
    address with ORCPT and NOTIFY as the sink got them)."""
    out = {}
    for message in dumped_messages(dump):
        subject = re.search(r"^Subject: probe-(\d+)", message, re.MULTILINE)
        if subject:
            out[int(subject.group(1))] = (re.findall(r"^X-Mail-Args: <(.*?)>", message, re.MULTILINE),
                                          sorted(re.findall(r"^X-Rcpt-Args: (.*)$", message, re.MULTILINE)))
    return out


@contextlib.contextmanager
def readable_pki() -> Iterator[tuple[Path, ssl.SSLContext]]:
    """See the module doc (pytest's tmp_path is not traversable by the postfix user)."""
    root = Path(tempfile.mkdtemp(prefix="mailflow-pki-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(root / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        yield root, context
    finally:
        shutil.rmtree(root, ignore_errors=True)
