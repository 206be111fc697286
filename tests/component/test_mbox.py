"""mbox delivery (mailflow.transports.local.mbox) with real files in tmp_path and real other processes.

Covered: the From_ line (Postfix's format, MAILER-DAEMON for the null sender, a quoted local part), mboxrd
quoting, CRLF and a missing final newline, two entries back to back byte for byte; a property: random bodies
written one after the other are read back exactly by Python's `mailbox.mbox` after mboxrd un-quoting;
20 concurrent deliveries from asyncio tasks, and from this process and another one at once, leave every entry
intact; a held dotlock makes a delivery wait then succeed, or time out with 4.2.0 leaving the lock alone; a stale
dotlock is broken, a fresh one is not; a delivery waiting for a lock holds no worker thread nor the locks it
took; an fcntl (lockf) or flock lock held by another process makes a delivery
wait or time out; an fcntl lock held by another thread of this process excludes too (OFD locks); a symlink
(live or dangling), a directory and a hard-linked file are refused with 5.2.0; a write cut short by
RLIMIT_FSIZE (another process) leaves the mailbox as it was (5.2.2); new files are 0600; mailbox_location for
the home_mailbox / mail_spool_directory combinations and the settings' validation.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import mailbox
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailflow import uncut as uncut_module
from mailflow.config import Config, LocalConfig, config_from_dict
from mailflow.errors import ConfigError, PermanentError, TemporaryError
from mailflow.transports.local import mbox
from mailflow.transports.local.mbox import append_mbox, format_mbox_entry, mailbox_location, mboxrd_unquote

ROOT = Path(__file__).resolve().parents[2]
NOV_2 = time.mktime((2026, 11, 2, 5, 11, 55, 0, 0, -1))  # a local time with a one-digit day
PREPEND = b"Return-Path: <s@remote.test>\nDelivered-To: alice@local.test\n"


def read_bodies(path: Path) -> list[bytes]:
    """Each message of an mbox file as Python's mailbox module splits it, mboxrd-unquoted."""
    box = mailbox.mbox(str(path), create=False)
    try:
        return [mboxrd_unquote(box.get_bytes(key)) for key in box.keys()]
    finally:
        box.close()


def expected_body(content: bytes, prepend: bytes = b"") -> bytes:
    text = (prepend + content).replace(b"\r\n", b"\n")
    return text + b"\n" if text and not text.endswith(b"\n") else text


# ------------------------------------------------------------------------------------------- format


def test_from_line_is_postfix_format_in_local_time():
    entry = format_mbox_entry(b"Subject: x\n\nbody\n", sender="s@remote.test", arrival=NOV_2)
    assert entry.split(b"\n")[0] == b"From s@remote.test  Mon Nov  2 05:11:55 2026"


def test_null_sender_is_mailer_daemon():
    assert format_mbox_entry(b"x\n", sender="", arrival=NOV_2).startswith(b"From MAILER-DAEMON  Mon Nov  2 ")


def test_local_part_that_is_not_a_dot_atom_is_quoted():
    line = format_mbox_entry(b"x\n", sender='john doe@remote.test', arrival=NOV_2).split(b"\n")[0]
    assert line.startswith(b'From "john doe"@remote.test  ')
    line = format_mbox_entry(b"x\n", sender='"already quoted"@r.test', arrival=NOV_2).split(b"\n")[0]
    assert line.startswith(b'From "already quoted"@r.test  ')


def test_from_lines_are_quoted_mboxrd_style_and_nothing_else():
    content = b"From: a@b\r\n\r\nFrom here\r\n>From there\r\n>>From far\r\nFromage\r\n From x\r\n>From\r\n"
    entry = format_mbox_entry(content, sender="s@r.test", arrival=NOV_2, prepend=PREPEND)
    head, rest = entry.split(b"\n", 1)
    assert head.startswith(b"From s@r.test  ")
    assert rest == (PREPEND + b"From: a@b\n\n>From here\n>>From there\n>>>From far\nFromage\n From x\n>From\n\n")


def test_message_without_final_newline_gets_one_then_the_blank_line():
    entry = format_mbox_entry(b"Subject: x\r\n\r\nno newline", sender="s@r.test", arrival=NOV_2)
    assert entry.endswith(b"\n\nno newline\n\n")
    assert b"\r" not in entry


def test_two_entries_back_to_back(tmp_path):
    path = tmp_path / "alice"
    first = format_mbox_entry(b"Subject: 1\r\n\r\nFrom me\r\n", sender="a@r.test", arrival=NOV_2, prepend=PREPEND)
    second = format_mbox_entry(b"Subject: 2\r\n\r\nbye", sender="", arrival=NOV_2 + 1)

    async def both():
        await append_mbox(path, first)
        await append_mbox(path, second)

    asyncio.run(both())
    assert path.read_bytes() == first + second
    assert read_bodies(path) == [PREPEND + b"Subject: 1\n\nFrom me\n", b"Subject: 2\n\nbye\n"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not mbox.dotlock_path(path).exists()


_LINES = st.sampled_from([b"From x", b">From y", b">>From  z", b"From", b"From:", b"", b"text", b" From a",
                          b"\r", b"F", b">"])
_BODIES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(_LINES, st.binary(max_size=10)), max_size=12).flatmap(
        lambda lines: st.sampled_from([b"\n", b"\r\n"]).map(lambda eol: eol.join(lines))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(_BODIES, min_size=1, max_size=5), with_prepend=st.booleans())
def test_property_python_mailbox_reads_back_every_body_exactly(bodies, with_prepend):
    prepend = PREPEND if with_prepend else b""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "box"
        path.write_bytes(b"".join(format_mbox_entry(b, sender="s@r.test", arrival=NOV_2, prepend=prepend)
                                  for b in bodies))
        assert read_bodies(path) == [expected_body(b, prepend) for b in bodies]


# ------------------------------------------------------------------------------------------- concurrency


def marked_entry(tag: str, size: int = 64 * 1024) -> tuple[bytes, bytes]:
    """An entry whose body is `size` bytes of lines naming `tag` (so an interleaving would show), and that body."""
    line = f"{tag} From the middle of {tag}\r\nFrom {tag}\r\n".encode()
    content = f"Subject: {tag}\r\n\r\n".encode() + line * (size // len(line))
    return format_mbox_entry(content, sender=f"{tag}@r.test", arrival=NOV_2), expected_body(content)


async def test_twenty_concurrent_tasks_leave_every_entry_intact(tmp_path):
    path = tmp_path / "alice"
    entries = [marked_entry(f"task{i}") for i in range(20)]
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(append_mbox(path, e) for e, _ in entries)), 15)
    assert time.monotonic() - started < 15
    assert sorted(read_bodies(path)) == sorted(body for _, body in entries)
    assert path.stat().st_size == sum(len(e) for e, _ in entries)


CHILD_APPENDS = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.component.test_mbox import marked_entry
from mailflow.transports.local.mbox import append_mbox
async def main():
    print("ready", flush=True)
    await asyncio.gather(*(append_mbox({path!r}, marked_entry(f"proc{{i}}")[0]) for i in range(10)))
asyncio.run(main())
"""


async def test_concurrent_deliveries_from_two_processes_stay_well_formed(tmp_path):
    path = tmp_path / "alice"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_APPENDS.format(root=str(ROOT), path=str(path)),
        stdout=subprocess.PIPE, cwd=ROOT)
    assert await asyncio.wait_for(child.stdout.readline(), 10) == b"ready\n"
    ours = [marked_entry(f"task{i}") for i in range(10)]
    await asyncio.wait_for(asyncio.gather(*(append_mbox(path, e) for e, _ in ours)), 15)
    assert await asyncio.wait_for(child.wait(), 15) == 0
    theirs = [marked_entry(f"proc{i}")[1] for i in range(10)]
    assert sorted(read_bodies(path)) == sorted([body for _, body in ours] + theirs)


# ------------------------------------------------------------------------------------------- dotlock


async def test_held_dotlock_makes_delivery_wait_then_succeed(tmp_path):
    path = tmp_path / "alice"
    lock = mbox.dotlock_path(path)
    lock.touch()
    entry, body = marked_entry("waiting", 100)
    delivery = asyncio.create_task(append_mbox(path, entry, lock_timeout=5))
    await asyncio.sleep(0.3)
    assert not delivery.done() and path.stat().st_size == 0
    lock.unlink()
    await asyncio.wait_for(delivery, 2)
    assert read_bodies(path) == [body]
    assert not lock.exists()


async def test_held_dotlock_times_out_with_4_2_0_and_is_left_alone(tmp_path):
    path = tmp_path / "alice"
    path.write_bytes(b"")
    lock = mbox.dotlock_path(path)
    lock.touch()
    started = time.monotonic()
    with pytest.raises(TemporaryError) as e:
        await append_mbox(path, format_mbox_entry(b"x\n", sender="s@r.test", arrival=NOV_2), lock_timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert (e.value.dsn, e.value.text) == ("4.2.0", f"unable to create lock file {lock}: File exists")  # Postfix's
    assert lock.exists() and path.read_bytes() == b""


async def test_stale_dotlock_is_broken_and_a_fresh_one_is_not(tmp_path):
    path = tmp_path / "alice"
    lock = mbox.dotlock_path(path)
    lock.touch()
    os.utime(lock, (time.time() - 400, time.time() - 400))  # younger than stale_lock_time (500 s)
    with pytest.raises(TemporaryError):
        await append_mbox(path, b"From x  y\n\n", lock_timeout=0.2)
    assert lock.exists()
    os.utime(lock, (time.time() - 600, time.time() - 600))
    started = time.monotonic()
    await append_mbox(path, format_mbox_entry(b"x\n", sender="s@r.test", arrival=NOV_2), lock_timeout=5)
    assert time.monotonic() - started < 1
    assert read_bodies(path) == [b"x\n"] and not lock.exists()



@pytest.fixture
async def one_worker_thread():
    """The running loop's default executor made a single thread, so that a delivery holding it shows."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    asyncio.get_running_loop().set_default_executor(pool)
    yield
    pool.shutdown(wait=True)


@pytest.mark.parametrize("as_user", [None, "nobody"])
async def test_a_delivery_waiting_for_a_lock_holds_no_worker_thread_nor_the_locks_it_took(as_user, one_worker_thread,
                                                                                          monkeypatch):
    """A mailbox locked for ever by another program must not take a worker thread from the other deliveries (nor
    from the queue's writes and smtpd, which share the default executor) for its lock_timeout; while it waits it
    holds none of its own locks either (here the fcntl lock, taken before the dotlock that is busy)."""
    if as_user and os.geteuid() != 0:
        pytest.skip("only root writes as another user")
    place = Path(tempfile.mkdtemp(dir="/tmp", prefix="mailflow-mbox-"))  # (nobody may write there)
    try:
        place.chmod(0o1777)
        path = place / "alice"
        path.touch()
        path.chmod(0o666)
        mbox.dotlock_path(path).touch()
        tried_twice = attempts_counted(monkeypatch, "_append_once" if as_user is None else "_append_once_as")
        delivery = asyncio.create_task(append_mbox(path, b"From x  y\n\n", locks=("fcntl", "dotlock"),
                                                   lock_timeout=4, user=as_user, create_parents=False))
        await asyncio.wait_for(tried_twice.wait(), 3)  # (waiting between attempts now)
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 1)  # (never done while the one thread is held)
        assert not delivery.done()
        fd = os.open(path, os.O_WRONLY)
        try:
            assert mbox._try_kernel_lock(fd, "fcntl")
        finally:
            os.close(fd)
        mbox.dotlock_path(path).unlink()
        await asyncio.wait_for(delivery, 3)
        assert path.read_bytes() == b"From x  y\n\n"
    finally:
        shutil.rmtree(place, ignore_errors=True)


def attempts_counted(monkeypatch, name: str) -> asyncio.Event:
    """An event set once mbox's attempt function `name` has returned twice."""
    loop = asyncio.get_running_loop()
    twice, done = asyncio.Event(), [0]
    real = getattr(mbox, name)

    def counted(*args):
        try:
            return real(*args)
        finally:
            done[0] += 1
            if done[0] == 2:
                loop.call_soon_threadsafe(twice.set)

    monkeypatch.setattr(mbox, name, counted)
    return twice


# ------------------------------------------------------------------------------------------- kernel locks


CHILD_HOLDS_LOCK = """
import fcntl, os, sys
fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT, 0o600)
if {style!r} == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX)
else:
    fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


async def hold_lock_in_other_process(path: Path, style: str):
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_HOLDS_LOCK.format(path=str(path), style=style),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert await asyncio.wait_for(child.stdout.readline(), 10) == b"locked\n"
    return child


async def release(child) -> None:
    child.stdin.write(b"go\n")
    await child.stdin.drain()
    assert await asyncio.wait_for(child.wait(), 10) == 0


@pytest.mark.parametrize("style", ["fcntl", "flock"])
async def test_kernel_lock_held_by_another_process_makes_delivery_wait(tmp_path, style):
    path = tmp_path / "alice"
    child = await hold_lock_in_other_process(path, style)
    entry, body = marked_entry("after-lock", 100)
    delivery = asyncio.create_task(append_mbox(path, entry, locks=(style,), lock_timeout=5))
    await asyncio.sleep(0.3)
    assert not delivery.done() and path.stat().st_size == 0
    await release(child)
    await asyncio.wait_for(delivery, 2)
    assert read_bodies(path) == [body]


@pytest.mark.parametrize("style", ["fcntl", "flock"])
async def test_kernel_lock_held_by_another_process_times_out(tmp_path, style):
    path = tmp_path / "alice"
    child = await hold_lock_in_other_process(path, style)
    try:
        with pytest.raises(TemporaryError) as e:
            await append_mbox(path, b"From x  y\n\n", locks=(style,), lock_timeout=0.3)
        assert (e.value.dsn, e.value.text) == (  # deliver_flock's words
            "4.2.0", "unable to lock for exclusive access: Resource temporarily unavailable")
        assert path.stat().st_size == 0
    finally:
        await release(child)


async def test_fcntl_lock_excludes_other_threads_of_this_process(tmp_path):
    """Classic POSIX locks belong to the process; the OFD lock used on Linux excludes our own threads too."""
    path = tmp_path / "alice"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert mbox._try_kernel_lock(fd, "fcntl")
        with pytest.raises(TemporaryError):
            await append_mbox(path, b"From x  y\n\n", locks=("fcntl",), lock_timeout=0.2)
    finally:
        os.close(fd)
    await append_mbox(path, format_mbox_entry(b"x\n", sender="", arrival=NOV_2), locks=("fcntl",))
    assert read_bodies(path) == [b"x\n"]


# ------------------------------------------------------------------------------------------- refusals


async def test_symlink_is_refused_with_5_2_0_and_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    link = tmp_path / "alice"
    link.symlink_to(target)
    with pytest.raises(PermanentError) as e:
        await append_mbox(link, b"From x  y\n\n")
    assert e.value.dsn == "5.2.0" and "symbolic link" in e.value.text
    assert target.read_bytes() == b"precious\n"
    dangling = tmp_path / "bob"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PermanentError):
        await append_mbox(dangling, b"From x  y\n\n")
    assert not (tmp_path / "nowhere").exists()


async def test_directory_and_hard_linked_file_are_refused_with_5_2_0(tmp_path):
    (tmp_path / "alice").mkdir()
    with pytest.raises(PermanentError) as e:
        await append_mbox(tmp_path / "alice", b"From x  y\n\n")
    assert e.value.dsn == "5.2.0" and "directory" in e.value.text
    (tmp_path / "other").write_bytes(b"")
    os.link(tmp_path / "other", tmp_path / "bob")
    with pytest.raises(PermanentError) as e:
        await append_mbox(tmp_path / "bob", b"From x  y\n\n")
    assert e.value.dsn == "5.2.0" and "hard links" in e.value.text
    assert (tmp_path / "other").read_bytes() == b""


async def test_unwritable_place_defers_with_4_2_0_naming_the_path(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    path = tmp_path / "file" / "alice"  # its parent is a file: ENOTDIR
    with pytest.raises(TemporaryError) as e:
        await append_mbox(path, b"From x  y\n\n")
    assert (e.value.dsn, e.value.text) == ("4.2.0", "cannot open file: Not a directory")  # (Postfix's open)


CHILD_SMALL_FSIZE = """
import asyncio, resource, sys
sys.path.insert(0, {root!r})
from mailflow.errors import DeliveryError
from mailflow.transports.local.mbox import append_mbox
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    asyncio.run(append_mbox({path!r}, b"From x  y\\n" + b"z" * 10000 + b"\\n\\n"))
except DeliveryError as e:
    print(e.dsn, e.text)
"""


def test_write_cut_short_rolls_back_to_the_old_size(tmp_path):
    path = tmp_path / "alice"
    first = format_mbox_entry(b"Subject: 1\n\nkept\n", sender="s@r.test", arrival=NOV_2)
    asyncio.run(append_mbox(path, first))
    limit = len(first) + 1000  # room for part of the next entry only
    result = subprocess.run([sys.executable, "-c", CHILD_SMALL_FSIZE.format(root=str(ROOT), limit=limit,
                                                                             path=str(path))],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.stdout == "5.2.2 error writing message: File too large\n", result.stderr
    assert path.read_bytes() == first
    assert not mbox.dotlock_path(path).exists()
    asyncio.run(append_mbox(path, format_mbox_entry(b"Subject: 2\n\nnext\n", sender="", arrival=NOV_2)))
    assert read_bodies(path) == [b"Subject: 1\n\nkept\n", b"Subject: 2\n\nnext\n"]


CHILD_KILLED_AT_SECOND_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from mailflow.content import Content
from mailflow.transports.local import mbox
writes, real_write = [], os.write
def write(fd, data):
    writes.append(len(data))
    if len(writes) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the server killed between two writes: no roll back runs
    return real_write(fd, data)
os.write = write
entry = mbox.mbox_entry(Content.of({body!r}), sender="s@r.test", arrival=0)
fd = os.open({path!r}, os.O_WRONLY | os.O_APPEND)
mbox._write_or_roll_back(fd, Path({path!r}), entry)
"""


def test_an_entry_is_one_write_so_a_process_killed_while_it_appends_leaves_no_from_line_alone(tmp_path):
    """A delivery SIGKILLed between two write(2)s of one entry leaves what was written (no roll back runs): the
    From_ line was a write of its own, so a kill there left an empty message in the mailbox (found by
    bench/killhunt.py). An entry up to WRITE_BATCH is gathered into one write: there is no second write to be
    killed before."""
    path = tmp_path / "alice"
    first = format_mbox_entry(b"Subject: 1\n\nkept\n", sender="s@r.test", arrival=NOV_2)
    path.write_bytes(first)
    body = b"Subject: 2\n\n" + b"line of a body\n" * 3000  # 45 KB: several chunks of the content
    result = subprocess.run([sys.executable, "-c", CHILD_KILLED_AT_SECOND_WRITE.format(
        root=str(ROOT), path=str(path), body=body)], capture_output=True, timeout=30, cwd=ROOT)
    assert result.returncode in (0, -9), result.stderr
    assert read_bodies(path) == [b"Subject: 1\n\nkept\n", body], "a killed append left a part of its entry"


async def test_an_append_after_a_cut_entry_starts_a_new_line_so_the_retry_is_a_message_of_its_own(tmp_path):
    """A delivery killed between two writes of a big entry (or cut inside its one write: SIGKILL, the power) leaves
    it without its final newline: the retry's From_ line was glued to the cut line, and a reader saw one corrupt
    message with the retried copy hidden in its body. The append starts a line first."""
    path = tmp_path / "alice"
    whole = format_mbox_entry(b"Subject: 1\n\nkept\n", sender="s@r.test", arrival=NOV_2)
    retry = format_mbox_entry(b"Subject: 2\n\nwhole\n", sender="s@r.test", arrival=NOV_2)
    path.write_bytes(whole + retry[:30])  # the cut entry: its From_ line and part of a header line
    await append_mbox(path, retry)
    assert path.read_bytes() == whole + retry[:30] + b"\n" + retry
    assert read_bodies(path)[-1] == b"Subject: 2\n\nwhole\n", "the retried copy is not a message of its own"
    before = path.read_bytes()
    await append_mbox(path, whole)  # (a file that ends a line gets nothing more)
    assert path.read_bytes() == before + whole


def test_a_big_entry_is_written_without_a_copy(tmp_path):
    """The batching gathered every chunk into a bytearray and wrote bytes() of it: a 20 MB entry in one piece cost
    40 MB more at its peak. A chunk of a batch or more is written as it is; what is gathered is written through a
    view."""
    import tracemalloc
    line = b"x" * 75 + b"\n"
    entry = b"From s@r.test  Mon Nov  2 00:00:00 2026\n" + line * (20 * 2**20 // len(line)) + b"\n"
    path = tmp_path / "alice"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        tracemalloc.start()
        try:
            mbox._write_or_roll_back(fd, path, entry)
            mbox._write_or_roll_back(fd, path, [entry[i:i + 65536] for i in range(0, len(entry), 65536)])
            peak = tracemalloc.get_traced_memory()[1] - len(entry)  # (less the second call's list of chunks)
        finally:
            tracemalloc.stop()
    finally:
        os.close(fd)
    assert peak < 2**20, f"{peak / 2**20:.1f} MB more at the peak"
    assert path.read_bytes() == entry * 2


# ------------------------------------------------------------------------------------------- where


def test_mailbox_location_follows_home_mailbox_and_mail_spool_directory():
    base = {"maildir_base": "/h"}
    assert mailbox_location(LocalConfig(**base), "alice") == (Path("/h/alice/Maildir"), "maildir", Path("/h/alice"))
    assert mailbox_location(LocalConfig(**base, home_mailbox="Mailbox"), "alice") == (Path("/h/alice/Mailbox"), "mbox",
                                                                                      Path("/h/alice"))
    assert mailbox_location(LocalConfig(**base, home_mailbox="mail/inbox"), "bob") == (Path("/h/bob/mail/inbox"),
                                                                                        "mbox", Path("/h/bob"))
    spool = LocalConfig(**base, home_mailbox="", mail_spool_directory="/var/mail")
    assert mailbox_location(spool, "alice") == (Path("/var/mail/alice"), "mbox", None)
    spool_maildirs = LocalConfig(**base, home_mailbox="", mail_spool_directory="/var/mail/")
    assert mailbox_location(spool_maildirs, "alice") == (Path("/var/mail/alice"), "maildir", None)
    assert mailbox_location(Config().local, "carol") == (Path.cwd() / "var/mail/carol/Maildir", "maildir",
                                                         Path.cwd() / "var/mail/carol")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            mailbox_location(spool, bad)


def test_mailbox_location_is_normalised():
    """A maildir_base with '..' (a relative one resolved against the config's directory keeps them) gives the path
    that is opened, so that comparing it with the home is comparing what is written."""
    dotted = LocalConfig(maildir_base="/etc/mailflow/../mail", home_mailbox="Mail/inbox")
    assert mailbox_location(dotted, "bob") == (Path("/etc/mail/bob/Mail/inbox"), "mbox", Path("/etc/mail/bob"))
    spool = LocalConfig(home_mailbox="", mail_spool_directory="/var/x/../mail")
    assert mailbox_location(spool, "bob").path == Path("/var/mail/bob")


@pytest.mark.parametrize("local, reason", [
    ({"home_mailbox": "/var/mail/x"}, "relative"),
    ({"home_mailbox": "../x"}, "relative"),
    ({"mail_spool_directory": ""}, "directory"),
    ({"mailbox_delivery_lock": []}, "at least one"),
    ({"mailbox_delivery_lock": ["fcntl", "fcntl"]}, "at most once"),
    ({"mailbox_delivery_lock": ["lockf"]}, "local.mailbox_delivery_lock"),
])
def test_bad_mailbox_settings_are_refused(local, reason):
    with pytest.raises(ConfigError, match=re.escape(reason)):
        config_from_dict({"local": local})


async def test_a_cancelled_append_of_held_content_never_reads_another_file_through_a_reused_descriptor(tmp_path):
    """The /file append read the queue's content through descriptors its caller opened (Content.held) and closed
    when a cancelled delivery stopped waiting, while the writing thread went on: the next file the process opened
    took that number, and its bytes went into the mailbox as the message (the review's probe: another message's
    300 KB). The writing thread now opens and closes them itself: what it writes is the message, whole."""
    from mailflow.content import Content, FilePart
    from mailflow.transports.local.mbox import HeldEntry, mbox_entry

    queued = tmp_path / "queued"
    queued.write_bytes(b"Subject: mine\n\n" + b"A" * 300_000 + b"\n")
    other = tmp_path / "other"
    other.write_bytes(b"Subject: SECRET OTHER\n\n" + b"S" * 400_000 + b"\n")
    box = tmp_path / "mbox"
    content = Content((FilePart(str(queued), 0, queued.stat().st_size),))
    entry = HeldEntry(content, lambda c: mbox_entry(c, sender="a@b.test", arrival=0))
    started = threading.Event()
    ended = threading.Event()

    async def late_workers(call):
        def later():  # (a busy pool: the call starts after its caller gave up)
            started.wait(10)
            try:
                return call()
            finally:
                ended.set()
        return await asyncio.to_thread(later)

    delivery = asyncio.ensure_future(append_mbox(box, entry, locks=("fcntl",), workers=late_workers))
    await asyncio.sleep(0.05)
    delivery.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivery
    fds = [os.open(other, os.O_RDONLY) for _ in range(4)]  # (another delivery's files, at the freed numbers)
    try:
        started.set()
        assert await asyncio.to_thread(ended.wait, 10)
    finally:
        for fd in fds:
            os.close(fd)
    written = box.read_bytes()
    assert b"SECRET" not in written
    assert written.count(b"A" * 300_000) == 1 and b"Subject: mine" in written


async def test_a_fifo_or_a_device_is_refused_in_postfixs_words(tmp_path):
    """A FIFO or a device where the mailbox should be: local/mailbox.c's "destination PATH is not a regular file",
    5.2.0 (it read "file is not a regular file"). (Postfix's write-only open of a FIFO without a reader fails ENXIO
    first, "cannot open file: No such device or address", as mailflow's does when it may not read the file; its
    read-write open, for the look at the file's last byte, does not fail so.)"""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(PermanentError) as e:
        await append_mbox(fifo, b"From x  y\n\n")
    assert (e.value.dsn, e.value.text) == ("5.2.0", f"destination {fifo} is not a regular file")
    if os.geteuid() != 0:
        return  # (mknod of a device needs root)
    device = tmp_path / "null"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(PermanentError) as e:
        await append_mbox(device, b"From x  y\n\n")
    assert (e.value.dsn, e.value.text) == ("5.2.0", f"destination {device} is not a regular file")


async def test_an_attempt_past_a_stop_s_limit_that_finds_the_lock_busy_hands_on_no_result(tmp_path, monkeypatch):
    """An append's attempt still running past UNCUT_LIMIT at a stop is left to end, its recipient's result handed
    on (`settle_late`) for when it appended; one that found the lock busy appended nothing: no result (the recipient
    stays queued), not the recipient recorded delivered with nothing written."""
    monkeypatch.setattr(uncut_module, "UNCUT_LIMIT", 0.1)

    def slow_and_busy(*args):
        time.sleep(0.4)
        return "dotlock"  # (the lock style found busy)
    monkeypatch.setattr(mbox, "_append_once", slow_and_busy)
    taken: list = []
    path = tmp_path / "Mailbox"
    task = asyncio.create_task(append_mbox(path, b"From x\nSubject: s\n\nb\n", queue_id="Q1",
                                           settle_late=lambda results: taken.append(results) or True,
                                           late_results=lambda: ["sent"]))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    [results] = taken
    assert await asyncio.wait_for(results(), 2) == []
    assert not path.exists()
