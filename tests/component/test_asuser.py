"""asuser.call_as: the child's answer comes back within a deadline; a child that never answers (a .forward on a
hung NFS home, a FUSE file its user serves) is killed and reaped, and the call fails 4.3.0 instead of holding its
worker thread for ever. Forking as another user needs root: skipped otherwise."""
from __future__ import annotations

import math
import logging
import os
import pwd
import threading
import signal
import time

import pytest

from mailflow.errors import PermanentError, TemporaryError
from mailflow.transports.local import asuser

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def _hang() -> bytes:
    time.sleep(3600)
    return b""


def _answer(text: str) -> bytes:
    return f"{os.getuid()} {text}".encode()


def test_a_child_that_never_answers_is_killed_and_the_call_fails_at_its_deadline(monkeypatch):
    forked: list[int] = []
    real_fork = asuser.os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(asuser.os, "fork", fork)
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "read /hung/.forward", _hang, timeout=0.3)
    assert time.monotonic() - started < 10  # (the deadline, not the child's hour)
    assert failed.value.dsn == "4.3.0"
    assert failed.value.text == "cannot read /hung/.forward as nobody: no answer within 0.3s, the child was killed"
    [pid] = forked
    with pytest.raises(ChildProcessError):  # reaped: no longer this process's child (a reused number is not ours)
        os.waitpid(pid, os.WNOHANG)


def test_a_child_that_answers_in_time_gives_its_result():
    nobody = pwd.getpwnam("nobody").pw_uid
    text = "hello" * 20000  # (more than a pipe holds: read while the child writes)
    assert asuser.call_as("nobody", "say", _answer, text, timeout=30) == f"{nobody} {text}".encode()


def _marks_then_takes_long(*, writing) -> bytes:
    writing()
    time.sleep(1.0)
    return b"written"


def _hangs_before_marking(*, writing) -> bytes:
    time.sleep(3600)
    writing()
    return b""


def test_a_marked_child_is_not_killed_once_it_marked_its_start():
    """`marked` (a /file append): past mark() the child writes, and killed there it would leave a partial entry;
    its time limit ends there. Before, it runs as any child."""
    assert asuser.call_as("nobody", "write", _marks_then_takes_long, timeout=0.3, marked=True) == b"written"
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "write", _hangs_before_marking, timeout=0.3, marked=True)
    assert failed.value.text == "cannot write as nobody: no answer within 0.3s, the child was killed"


def _marks_then_hangs(*, writing) -> bytes:
    writing()
    time.sleep(3600)
    return b"written"


def test_a_marked_child_stopped_by_its_own_limit_reports_it():
    """`then`: a child hung after its first progress() (a write that never returns) held its thread until a restart;
    then it was killed, its roll back never run. Its own timer raises out of the hang: its failure path runs, and
    it reports the failure itself, long before the parent's last resort (`grace`)."""
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "write", _marks_then_hangs, timeout=30, marked=True, then=0.3, grace=30)
    assert time.monotonic() - started < 10
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.0", "cannot write as nobody: writing made no progress for 0.3s")
    assert asuser.call_as("nobody", "write", _marks_then_takes_long, timeout=0.3, marked=True, then=30) == b"written"


def _moves_slowly(*, writing) -> bytes:
    for _ in range(20):
        writing()
        time.sleep(0.1)
    writing()
    writing.ended()
    return b"written"


def test_the_limit_is_on_progress_not_on_the_whole_write():
    """A big message to a slow but working file (2 s, a piece every 0.1 s) outlasts then + grace (1.5 s) and was
    stopped at every attempt: the limit is the time between two progress() calls, in the child and in the parent
    (a piece takes a tenth of the limit: a margin a loaded machine keeps)."""
    assert asuser.call_as("nobody", "write", _moves_slowly, timeout=30, marked=True, then=1.0, grace=0.5) == b"written"


def _ends_then_lingers(*, writing) -> bytes:
    writing()
    writing.ended()
    time.sleep(0.5)  # (closing the file, removing the dotlock: an interruption here would fail a write that is done)
    return b"written"


def test_no_limit_after_the_work_ended():
    assert asuser.call_as("nobody", "write", _ends_then_lingers, timeout=30, marked=True, then=0.2) == b"written"


def _hangs_where_no_handler_runs(*, writing) -> bytes:
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # (as a write the kernel does not interrupt)
    writing()
    time.sleep(3600)
    return b"written"


def test_a_marked_child_that_does_not_stop_itself_is_killed_grace_seconds_later():
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "write", _hangs_where_no_handler_runs, timeout=30, marked=True, then=0.3, grace=0.3)
    assert 0.6 <= time.monotonic() - started < 10
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.0",
        "cannot write as nobody: writing made no progress for 0.3s, nor ended 0.3s later, the child was killed")


def test_a_report_already_in_the_pipe_when_the_deadline_passes_is_read(monkeypatch):
    """A child that ended right at its limit: its report was in the pipe, but the parent gave up without reading it,
    killed it and reported a failure (the retry wrote a second copy)."""
    read_end, write_end = os.pipe()
    real_read = os.read

    def read(fd: int, size: int) -> bytes:  # the child's report arrives just after its MARK was read
        chunk = real_read(fd, size)
        if chunk.endswith(asuser.MARK):
            asuser._send_frame(write_end, asuser.RESULT + b"written")
        return chunk

    monkeypatch.setattr(asuser.os, "read", read)
    try:
        asuser._send_frame(write_end, asuser.MARK)
        assert asuser._framed_report(read_end, time.monotonic() + 30, 0) == asuser.RESULT + b"written"
        assert asuser._framed_report(read_end, time.monotonic() - 1) is None  # (nothing more: the deadline holds)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_killed_child_that_does_not_end_does_not_hold_the_callers_thread(monkeypatch, caplog):
    """waitpid(pid, 0) after SIGKILL blocked for ever on a child in an uninterruptible wait (a D-state write): the
    caller's thread with it. Here SIGKILL is held back to play that child; the reaper thread reaps it once it ends."""
    real_kill, held = os.kill, []

    def kill(pid: int, sig: int) -> None:
        if sig == signal.SIGKILL:
            held.append(pid)
        else:
            real_kill(pid, sig)

    monkeypatch.setattr(asuser.os, "kill", kill)
    monkeypatch.setattr(asuser, "REAP_WAIT", 0.2)
    started = time.monotonic()
    with pytest.raises(TemporaryError):
        asuser.call_as("nobody", "read", _hang, timeout=0.2)
    assert time.monotonic() - started < 5
    [pid] = held
    assert f"the child {pid} (read as nobody) has not ended 0.2s after SIGKILL" in caplog.text
    real_kill(pid, signal.SIGKILL)
    for _ in range(200):  # (the reaper thread's waitpid returns once the child is gone)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.025)
    else:
        pytest.fail("the killed child was never reaped")


def test_no_child_is_forked_while_too_many_killed_children_have_not_ended(monkeypatch, caplog):
    """Each attempt whose killed child does not end (a file on a hung mount, retried) left one more process and
    reaper thread, without bound, until fork or thread creation failed for every local delivery. At STUCK_LIMIT
    unreaped children call_as fails at once without forking, logged once an interval, until they end."""
    real_kill, real_fork, held, forked = os.kill, asuser.os.fork, [], []

    def kill(pid: int, sig: int) -> None:  # (SIGKILL held back: the child plays one in an uninterruptible wait)
        if sig == signal.SIGKILL:
            held.append(pid)
        else:
            real_kill(pid, sig)

    def fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(asuser.os, "kill", kill)
    monkeypatch.setattr(asuser.os, "fork", fork)
    monkeypatch.setattr(asuser, "REAP_WAIT", 0.05)
    monkeypatch.setattr(asuser, "STUCK_LIMIT", 3)
    monkeypatch.setattr(asuser._STUCK, "_logged", -math.inf)  # (a refusal logged by an earlier test: not this one's)
    try:
        for _ in range(3):
            with pytest.raises(TemporaryError):
                asuser.call_as("nobody", "read", _hang, timeout=0.1)
        assert len(forked) == 3
        for _ in range(2):
            with pytest.raises(TemporaryError) as failed:
                asuser.call_as("nobody", "read", _hang, timeout=0.1)
            assert (failed.value.dsn, failed.value.text) == (
                "4.3.0", "cannot read as nobody: 3 children stuck in uninterruptible waits")
        assert len(forked) == 3  # (none forked for the refused calls)
        assert caplog.text.count("read as nobody refused: 3 killed children have not ended") == 1
    finally:
        for pid in held:
            real_kill(pid, signal.SIGKILL)
        for _ in range(400):  # (the reaper threads count them out once they end)
            if asuser._STUCK.count == 0:
                break
            time.sleep(0.025)
    assert asuser._STUCK.count == 0
    assert asuser.call_as("nobody", "say", _answer, "again", timeout=30).endswith(b" again")


def _writes_nothing(*, writing) -> bytes:
    return b"busy"  # (an attempt that found the lock busy: no progress() made)


def test_the_start_timer_is_stopped_before_the_report(monkeypatch):
    """The child's timer runs from the fork; an attempt that ended without writing (a lock found busy) near the
    limit had it still armed while reporting: the alarm cut the report and the parent saw a failed child."""
    real_send = asuser._send_frame

    def slow_send(fd: int, frame: bytes) -> None:  # (a report written past the child's start limit)
        time.sleep(0.6)
        real_send(fd, frame)

    monkeypatch.setattr(asuser, "_send_frame", slow_send)
    assert asuser.call_as("nobody", "write", _writes_nothing, timeout=0.3, marked=True, then=30, grace=30) == b"busy"


def test_a_killed_child_whose_reaper_thread_cannot_start_is_reaped_by_the_caller_and_not_counted(monkeypatch):
    """The killed child was counted before its reaper thread started: when no thread could start (the process's
    thread limit) the count was never taken back (STUCK_LIMIT such failures refused every child until a restart),
    and call_as raised RuntimeError ("unknown mail transport error"). The caller reaps it (it ends 0.3 s after
    SIGKILL here), it is not counted, and the call fails as a child that never answered."""
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:  # (SIGKILL late: the child plays one in an uninterruptible wait, a while)
        if sig == signal.SIGKILL:
            threading.Timer(0.3, real_kill, (pid, sig)).start()
        else:
            real_kill(pid, sig)

    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(asuser.os, "kill", kill)
    monkeypatch.setattr(asuser, "REAP_WAIT", 0.05)
    before = asuser._STUCK.count
    monkeypatch.setattr(asuser.threading, "Thread", NoThread)
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "read", _hang, timeout=0.1)
    monkeypatch.undo()
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.0", "cannot read as nobody: no answer within 0.1s, the child was killed")
    assert asuser._STUCK.count == before


def _fails_too_big(writing) -> bytes:
    raise PermanentError("5.2.2", "file too big")


def _has_nothing_to_write(writing) -> bytes:
    return b"nothing to write"


def test_an_alarm_after_the_work_ended_keeps_its_result(monkeypatch):
    """The start alarm handled just after the work ended, before ended() disarmed it, replaced the work's own
    result with "not started writing" (an EFBIG, 5.2.2, became 4.3.0). The work's result stands."""
    real_ended = asuser.Progress.ended

    def alarm_first(self) -> None:  # (in the forked child: the alarm handled at ended()'s first step)
        self._alarm(signal.SIGALRM, None)
        real_ended(self)

    monkeypatch.setattr(asuser.Progress, "ended", alarm_first)
    with pytest.raises(PermanentError) as failed:
        asuser.call_as("nobody", "write", _fails_too_big, timeout=30, marked=True, then=30)
    assert (failed.value.dsn, failed.value.text) == ("5.2.2", "file too big")
    assert asuser.call_as("nobody", "write", _has_nothing_to_write, timeout=30, marked=True,
                          then=30) == b"nothing to write"


def _descriptors() -> bytes:
    """The child's descriptors past stdin, stdout, stderr and the log handlers' (kept: see the log test below), as
    what they point to."""
    names = []
    logs = set(asuser._log_descriptors())
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}") if int(fd) > 2 and int(fd) not in logs else "")
        except OSError:
            pass  # (listdir's own descriptor, closed by now)
    return "\n".join(n for n in names if n).encode()


def test_the_child_holds_none_of_the_servers_descriptors(tmp_path):
    """The forked child kept every descriptor of the server: the queue's lock, the listening sockets, clients'
    connections. A child stuck on a hung mount then kept a restarted server from locking the queue and binding
    its port for as long. It keeps only its report pipe now."""
    import fcntl
    import socket
    lock_path = tmp_path / "queue.lock"
    with open(lock_path, "w") as lock, socket.socket() as listener:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        held = asuser.call_as("nobody", "look", _descriptors, timeout=30).decode().split("\n")
    assert len(held) == 1 and held[0].startswith("pipe:"), held  # (the report pipe only)


def test_the_child_keeps_the_descriptors_it_is_given_and_reads_through_them(tmp_path):
    """`keep`: a root-only file (the queue's content, 0700 directory) opened by the parent is read by the child
    as `nobody` through the kept descriptor, which it could not open itself; every other descriptor is closed."""
    secret = tmp_path / "content"
    secret.write_bytes(b"queued bytes")
    secret.chmod(0o600)
    with open(tmp_path / "other", "w"):  # (open in the parent: the child must not hold it)
        fd = os.open(secret, os.O_RDONLY | os.O_CLOEXEC)
        try:
            read = asuser.call_as("nobody", "read", os.pread, fd, 100, 0, timeout=30, keep=(fd,))
            held = asuser.call_as("nobody", "look", _descriptors, timeout=30, keep=(fd,)).decode().split("\n")
            with pytest.raises(TemporaryError, match="Permission denied"):
                asuser.call_as("nobody", "open", secret.read_bytes, timeout=30)
        finally:
            os.close(fd)
    assert read == b"queued bytes"
    assert len(held) == 2 and str(secret) in held and str(tmp_path / "other") not in held, held


def _log_after_opening() -> bytes:
    """In the child: a pipe takes the lowest free numbers (a closed handler's, once), a line is logged, and what
    reached the pipe comes back."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    logging.getLogger("tests.asuser.child").warning("a line from the child")
    try:
        return b"pipe:" + os.read(read_end, 4096)
    except BlockingIOError:
        return b"pipe:"


def test_the_childs_log_lines_go_to_the_servers_log_never_into_a_file_it_opened(tmp_path):
    """The child closed every descriptor but its report pipe, its log handlers' too: a line it logged (a stale
    dotlock removed) was lost, or written into the file it had opened at the handler's old number (a mailbox).
    The handlers' descriptors are kept: the line reaches the log, never the child's own file."""
    log_file = tmp_path / "server.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("tests.asuser.child")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        assert asuser.call_as("nobody", "log", _log_after_opening, timeout=30) == b"pipe:"
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "a line from the child" in log_file.read_text()
