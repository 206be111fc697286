"""asuser.call_as: the child's answer comes back within a deadline; a child that never answers (a .forward on a
hung NFS home, a FUSE file its user serves) is killed and reaped, and the call fails 4.3.0 instead of holding its
worker thread for ever. Forking as another user needs root: skipped otherwise."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mailflow.errors import PermanentError, TemporaryError
from mailflow.transports.local import asuser, forker
from tests.support.inchild import patched_in_child
from tests.support.stalls import LoopWatch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture(autouse=True)
def helper_started():
    """The helper started before each test (a second or more on a loaded machine: not a call's deadline)."""
    if asuser._FORKER.pid is None:
        asuser.call_as("nobody", "say", _answer, "ready", timeout=60)


def _hang() -> bytes:
    time.sleep(3600)
    return b""


def _answer(text: str) -> bytes:
    return f"{os.getuid()} {text}".encode()


def _launched(monkeypatch) -> list[forker.Child]:
    """The children the helper starts for this test's calls, as they are launched."""
    launched, real_launch = [], asuser._FORKER.launch

    def launch(*args, **kwargs) -> forker.Child:
        child = real_launch(*args, **kwargs)
        launched.append(child)
        return child

    monkeypatch.setattr(asuser._FORKER, "launch", launch)
    return launched


def _held_kills(monkeypatch) -> list[forker.Child]:
    """SIGKILL held back (each child plays one in an uninterruptible wait): the children it was meant for."""
    held: list[forker.Child] = []
    monkeypatch.setattr(forker.Child, "kill", lambda child: held.append(child))
    return held


def _gone(pid: int) -> bool:
    """Whether `pid` ended and was reaped (by the helper: it is not this process's child), within 10 s."""
    for _ in range(400):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.025)
    return False


def test_a_child_that_never_answers_is_killed_and_the_call_fails_at_its_deadline(monkeypatch):
    launched = _launched(monkeypatch)
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "read /hung/.forward", _hang, timeout=0.3)
    assert time.monotonic() - started < 10  # (the deadline, not the child's hour)
    assert failed.value.dsn == "4.3.0"
    assert failed.value.text == "cannot read /hung/.forward as nobody: no answer within 0.3s, the child was killed"
    [child] = launched
    assert _gone(child.pid)  # (killed, and reaped by the helper)


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
    caller's thread with it. Here SIGKILL is held back to play that child; it is counted as stuck until the helper
    reaped it."""
    real_kill, held = forker.Child.kill, _held_kills(monkeypatch)
    monkeypatch.setattr(asuser, "REAP_WAIT", 0.2)
    started = time.monotonic()
    with pytest.raises(TemporaryError):
        asuser.call_as("nobody", "read", _hang, timeout=0.2)
    assert time.monotonic() - started < 5
    [child] = held
    assert f"the child {child.pid} (read as nobody) has not ended 0.2s after SIGKILL" in caplog.text
    assert asuser._STUCK.count == 1
    real_kill(child)
    assert _gone(child.pid)
    for _ in range(200):  # (counted out once the helper said it reaped it)
        if asuser._STUCK.count == 0:
            break
        time.sleep(0.025)
    else:
        pytest.fail("the killed child is still counted")


def _answers_after_a_marker(marker: str) -> bytes:
    with open(marker, "w"):
        pass
    time.sleep(0.3)
    return b"answered"


def test_a_helper_slow_to_reap_a_child_does_not_count_it_as_stuck(public_dir, caplog):
    """A child that reported and ended is reaped by the helper; on a loaded machine the helper takes seconds (held
    back here for 3 s): the call waits for its status, neither logging the child as stuck nor counting it."""
    marker = public_dir / "answering"
    answers: list[bytes] = []
    caller = threading.Thread(target=lambda: answers.append(
        asuser.call_as("nobody", "say", _answers_after_a_marker, str(marker), timeout=30)))
    caller.start()
    for _ in range(400):
        if marker.exists():
            break
        time.sleep(0.025)
    helper = asuser._FORKER.pid
    assert helper is not None and marker.exists()
    os.kill(helper, signal.SIGSTOP)
    try:
        time.sleep(3)
    finally:
        os.kill(helper, signal.SIGCONT)
    caller.join(10)
    assert answers == [b"answered"]
    assert "has not ended" not in caplog.text and asuser._STUCK.count == 0


def test_no_child_is_forked_while_too_many_killed_children_have_not_ended(monkeypatch, caplog):
    """Each attempt whose killed child does not end (a file on a hung mount, retried) left one more process and
    reaper thread, without bound, until fork or thread creation failed for every local delivery. At STUCK_LIMIT
    unreaped children call_as fails at once without forking, logged once an interval, until they end."""
    real_kill, held, forked = forker.Child.kill, _held_kills(monkeypatch), _launched(monkeypatch)
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
        for child in held:
            real_kill(child)
        for _ in range(400):  # (counted out once the helper reaped them)
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
    late = patched_in_child(sys.modules[__name__], "_writes_nothing", (asuser, "_send_frame", _slow_send))
    assert asuser.call_as("nobody", "write", late, timeout=0.3, marked=True, then=30, grace=30) == b"busy"


_real_send = asuser._send_frame  # (in the child too: its import of this module comes before the patch)


def _slow_send(fd: int, frame: bytes) -> None:  # (in the child: a report written past its start limit)
    time.sleep(0.6)
    _real_send(fd, frame)


def _fails_too_big(writing) -> bytes:
    raise PermanentError("5.2.2", "file too big")


def _has_nothing_to_write(writing) -> bytes:
    return b"nothing to write"


def test_an_alarm_after_the_work_ended_keeps_its_result(monkeypatch):
    """The start alarm handled just after the work ended, before ended() disarmed it, replaced the work's own
    result with "not started writing" (an EFBIG, 5.2.2, became 4.3.0). The work's result stands."""
    here = sys.modules[__name__]
    with pytest.raises(PermanentError) as failed:
        asuser.call_as("nobody", "write", patched_in_child(here, "_fails_too_big", _ALARM_FIRST), timeout=30,
                       marked=True, then=30)
    assert (failed.value.dsn, failed.value.text) == ("5.2.2", "file too big")
    assert asuser.call_as("nobody", "write", patched_in_child(here, "_has_nothing_to_write", _ALARM_FIRST),
                          timeout=30, marked=True, then=30) == b"nothing to write"


_real_ended = asuser.Progress.ended  # (in the child too: its import of this module comes before the patch)


def _alarm_first(self) -> None:  # (in the child: the alarm handled at ended()'s first step)
    self._alarm(signal.SIGALRM, None)
    _real_ended(self)


_ALARM_FIRST = (asuser, "Progress.ended", _alarm_first)


def _descriptors() -> bytes:
    """The child's descriptors past stdin, stdout and stderr, as what they point to."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}") if int(fd) > 2 else "")
        except OSError:
            pass  # (listdir's own descriptor, closed by now)
    return "\n".join(n for n in names if n).encode()


def test_the_child_holds_none_of_the_servers_descriptors(tmp_path):
    """The forked child kept every descriptor of the server: the queue's lock, the listening sockets, clients'
    connections. A child stuck on a hung mount then kept a restarted server from locking the queue and binding
    its port for as long. It keeps only its own socket now; the helper that forks it (started here, after they were
    opened) holds none of them either."""
    import fcntl
    import socket
    lock_path = tmp_path / "queue.lock"
    with open(lock_path, "w") as lock, socket.socket() as listener:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        asuser.stop_helper()
        asuser.open_helper()
        held = asuser.call_as("nobody", "look", _descriptors, timeout=30).decode().split("\n")
        listening = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        helper = asuser._FORKER.pid
        assert helper is not None
        helpers = _opened_by(helper)
    assert len(held) == 1 and held[0].startswith("socket:"), held  # (its own socket to the caller only)
    assert str(lock_path) not in helpers and listening not in helpers, helpers  # (nor has the helper)


def _opened_by(pid: int) -> list[str]:
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # (a call's socket the helper closed meanwhile)
            pass
    return names


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


def test_the_childs_log_lines_go_to_the_servers_log_never_into_a_file_it_opened(caplog):
    """The child closed every descriptor but its report pipe, its log handlers' too: a line it logged (a stale
    dotlock removed) was lost, or written into the file it had opened at the handler's old number (a mailbox).
    Its lines come to the caller as frames, which logs them (through the handlers the server has now: a descriptor
    inherited from the helper's start would be stale after a logrotate): never into the child's own file."""
    with caplog.at_level(logging.INFO, logger="mailflow.local"):
        assert asuser.call_as("nobody", "log", _log_after_opening, timeout=30) == b"pipe:"
        assert asuser.call_as("nobody", "log", _log_after_opening, timeout=30, queue_id="4Q1D") == b"pipe:"
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if "a line from the child" in r.getMessage()]
    assert lines == [("mailflow.local", logging.WARNING, "a line from the child"),
                     ("mailflow.local", logging.WARNING, "4Q1D: a line from the child")]


INFLATED = 768 * 1024 * 1024  # bytes of RSS the server is given before it delivers as a user
CALLS = 20
LOST_PER_CALL = 0.005  # s of the loop's time a call may cost (a fork of that much cost it 25-70 ms, and more)


def test_a_call_as_a_user_does_not_fork_a_big_server_on_its_loop():
    """Each call forked the whole server from a worker thread: the page tables copied with the GIL held, then
    copy-on-write faults while the child lived; at 768 MB of RSS the event loop lost tens of milliseconds a call.
    The children are forked by the helper, a small interpreter of its own: the loop loses no more than a loaded
    machine's noise, whatever the server's size. (Bounded generously.)"""
    asuser.call_as("nobody", "say", _answer, "first", timeout=30)  # (the helper started: not a call's cost)
    inflated = bytearray(INFLATED)
    for page in range(0, INFLATED, 4096):
        inflated[page] = 1
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    watch = LoopWatch(loop, threshold=0.005)
    try:
        for _ in range(CALLS):
            said = asyncio.run_coroutine_threadsafe(
                asyncio.to_thread(asuser.call_as, "nobody", "say", _answer, "hi", timeout=30), loop).result(30)
            assert said == f"{pwd.getpwnam('nobody').pw_uid} hi".encode()
            time.sleep(0.02)  # (the copy-on-write faults of a fork land while its child lives, and after)
    finally:
        watch.close()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
    del inflated
    lost = sum(seconds for seconds, _ in watch.stalls)
    assert lost < CALLS * LOST_PER_CALL, watch.stalls


def test_the_helper_dying_mid_call_fails_the_call_and_the_next_call_starts_another(monkeypatch, caplog):
    """The helper killed (the OOM killer) while a child it forked works: the call fails 4.3.0 at once (its child
    is told by SIGALRM, PR_SET_PDEATHSIG, and ends: it never writes on unsupervised), and the next call starts a
    new helper, logged once."""
    launched = _launched(monkeypatch)
    monkeypatch.setattr(asuser._FORKER, "_logged", -math.inf)  # (a restart logged by an earlier test: not ours)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            asuser.call_as("nobody", "read", _hang, timeout=60)
        except BaseException as e:  # noqa: BLE001 - what the call raised, for the assertions
            failures.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    for _ in range(400):
        if launched:
            break
        time.sleep(0.025)
    helper = asuser._FORKER.pid
    assert helper is not None and launched
    started = time.monotonic()
    os.kill(helper, signal.SIGKILL)
    caller.join(10)
    assert not caller.is_alive() and time.monotonic() - started < 5
    [failed] = failures
    assert isinstance(failed, TemporaryError)
    assert (failed.dsn, failed.text) == ("4.3.0", "cannot read as nobody: the helper forking its children ended")
    assert _gone(launched[0].pid)
    assert asuser.call_as("nobody", "say", _answer, "again", timeout=30).endswith(b" again")
    assert asuser._FORKER.pid not in (None, helper)
    assert caplog.text.count("started again") == 1


def _writes_slowly(*, writing) -> bytes:
    for _ in range(10):
        writing()
        time.sleep(0.1)
    writing.ended()
    return b"done"


def test_a_helper_that_hangs_is_killed_once_and_the_next_call_starts_another(monkeypatch, caplog):
    """A helper that stops answering without ending (stopped here, SIGSTOP): the calls waiting on it fail 4.3.0
    at ANSWER_WAIT; the first to give up kills it (logged once) and it is reaped: no process or thread is left
    waiting for it. The next call starts another."""
    monkeypatch.setattr(forker, "ANSWER_WAIT", 1.0)
    hung = asuser._FORKER.pid
    assert hung is not None
    failures: list[BaseException] = []

    def call() -> None:
        try:
            asuser.call_as("nobody", "say", _answer, "lost", timeout=30)
        except BaseException as e:  # noqa: BLE001 - what the call raised, for the assertions
            failures.append(e)

    os.kill(hung, signal.SIGSTOP)
    try:
        callers = [threading.Thread(target=call) for _ in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        assert len(failures) == 3 and all(isinstance(failed, TemporaryError) for failed in failures)
        assert "cannot say as nobody: the helper forking its children did not answer within 1s" in {
            failed.text for failed in failures}
        assert _gone(hung)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    assert f"helper-{hung}" not in {thread.name for thread in threading.enumerate()}
    assert caplog.text.count(f"children as users (pid {hung}): no answer within 1s; killed") == 1
    assert asuser.call_as("nobody", "say", _answer, "again", timeout=30).endswith(b" again")
    assert asuser._FORKER.pid not in (None, hung)


def test_the_servers_stop_lets_a_call_in_flight_end_and_ends_the_helper():
    """stop_helper (the server's stop) with a child writing: the helper takes no more requests, waits for its
    child, whose call gets its answer, and exits. A call after the stop (a delivery's thread left past the grace)
    starts no helper, which would outlive the server: it fails at once; the next start (open_helper) takes them."""
    asuser.call_as("nobody", "say", _answer, "first", timeout=30)
    helper = asuser._FORKER.pid
    answers: list[bytes] = []
    caller = threading.Thread(target=lambda: answers.append(
        asuser.call_as("nobody", "write", _writes_slowly, timeout=30, marked=True, then=30)))
    caller.start()
    time.sleep(0.3)  # (the child writing)
    started = time.monotonic()
    asuser.stop_helper()
    assert time.monotonic() - started < forker.STOP_WAIT
    caller.join(10)
    assert answers == [b"done"]
    assert helper is not None and _gone(helper)
    with pytest.raises(TemporaryError) as refused:
        asuser.call_as("nobody", "say", _answer, "late", timeout=30)
    assert (refused.value.dsn, refused.value.text) == (
        "4.3.0", "cannot say as nobody: the helper forking its children was stopped (the server's stop)")
    assert asuser._FORKER.pid is None
    asuser.open_helper()
    assert asuser.call_as("nobody", "say", _answer, "again", timeout=30).endswith(b" again")


def test_one_servers_stop_leaves_the_helper_to_another_server_of_the_process():
    """Two servers in one process (an embedding test suite's sinks) share the helper: the first one's stop neither
    ends it nor refuses the other's calls; the last one's does both."""
    asuser.open_helper()
    asuser.open_helper()
    asuser.call_as("nobody", "say", _answer, "first", timeout=30)
    helper = asuser._FORKER.pid
    asuser.stop_helper()
    assert asuser.call_as("nobody", "say", _answer, "still", timeout=30).endswith(b" still")
    assert asuser._FORKER.pid == helper
    asuser.stop_helper()
    assert helper is not None and _gone(helper)
    with pytest.raises(TemporaryError, match="was stopped"):
        asuser.call_as("nobody", "say", _answer, "late", timeout=30)


def test_the_servers_stop_does_not_wait_behind_a_helper_starting(monkeypatch):
    """A helper slow to say READY (a loaded machine: up to START_WAIT s) holds the start's lock: the stop does not
    wait behind it; the start gives up, its process killed, and its call fails as stopped."""
    asuser.stop_helper()
    asuser.open_helper()
    monkeypatch.setattr(forker, "START_WAIT", 8.0)
    monkeypatch.setattr(forker, "_MAIN", "import time; time.sleep(30)")
    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(forker.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    failures: list[BaseException] = []

    def call() -> None:
        try:
            asuser.call_as("nobody", "say", _answer, "late", timeout=30)
        except BaseException as e:  # noqa: BLE001 - what the call raised, for the assertions
            failures.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    for _ in range(400):
        if started:
            break
        time.sleep(0.025)
    time.sleep(0.2)
    stopping = time.monotonic()
    asuser.stop_helper()
    assert time.monotonic() - stopping < 2
    caller.join(10)
    [failed] = failures
    assert isinstance(failed, TemporaryError) and failed.text == f"cannot say as nobody: {forker.STOPPED}"
    assert started[0].poll() is not None  # (killed and reaped)
    asuser.open_helper()


def test_the_helper_imports_nothing_from_the_servers_working_directory(tmp_path):
    """The helper runs as root; the server's working directory (the spool) is the mail account's to write in: a
    module planted there is never imported by the helper (`python -c` put the working directory first on sys.path,
    before the helper's first statement, `import json, sys`, could set it)."""
    marker = tmp_path / "imported"
    for planted in ("json.py", "ctypes.py"):
        (tmp_path / planted).write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n")
    asuser.stop_helper()
    asuser.open_helper()
    was = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert asuser.call_as("nobody", "say", _answer, "safe", timeout=60).endswith(b" safe")
    finally:
        os.chdir(was)
    assert not marker.exists()


def test_a_descriptor_above_1024_is_kept_at_its_number(tmp_path):
    """The descriptors of a busy server go past 1024 (select's limit): the call's own sockets do (1100 opened
    first), and one given to the child is read through, at its number; more than MAX_KEEP are refused, not cut
    short."""
    secret = tmp_path / "content"
    secret.write_bytes(b"queued bytes")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    busy = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    fd = os.open(secret, os.O_RDONLY)
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 1500)
    os.close(fd)
    try:
        assert max(busy) > 1024
        assert asuser.call_as("nobody", "read", os.pread, high, 100, 0, timeout=30, keep=(high,)) == b"queued bytes"
        many = (high,) * (asuser.MAX_KEEP + 1)
        with pytest.raises(TemporaryError) as failed:
            asuser.call_as("nobody", "read", os.pread, high, 100, 0, timeout=30, keep=many)
        assert failed.value.text == f"cannot read as nobody: {len(many)} descriptors to keep, at most {asuser.MAX_KEEP}"
    finally:
        os.close(high)
        for one in busy:
            os.close(one)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_the_servers_stop_ends_the_helper_off_its_loop(tmp_path):
    """Mailflow.stop ends local delivery's helper in a thread: the helper waits here for a child that writes for
    two seconds, and the stop with it, while the loop goes on."""
    from mailflow.app import Mailflow
    from mailflow.config import Config
    loop = asyncio.get_running_loop()
    writing = asyncio.create_task(asyncio.to_thread(
        asuser.call_as, "nobody", "write", _writes_for_two_seconds, timeout=30, marked=True, then=30))
    await asyncio.sleep(0.3)  # (the child writing)
    helper = asuser._FORKER.pid
    assert helper is not None
    watch = await asyncio.to_thread(LoopWatch, loop, 0.25)
    try:
        started = time.monotonic()
        server = Mailflow(Config(queue_directory=str(tmp_path / "queue")))  # (never started: only its stop)
        asuser.open_helper()
        server._helper_opened = True  # (as its start does)
        await server.stop()
        stopping = time.monotonic() - started
    finally:
        await asyncio.to_thread(watch.close)
    assert await writing == b"done"
    assert asuser._FORKER.pid is None and _gone(helper)
    assert stopping > 1.0 and watch.longest < 0.5, (stopping, watch.stalls)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory of /tmp the children may write in (a test's tmp_path is not reachable as nobody)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="mailflow-asuser-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _appends_slowly(path: str, *, writing) -> bytes:
    with open(path, "ab") as out:
        for piece in range(20):
            writing()
            out.write(b"%d\n" % piece)
            out.flush()
            time.sleep(0.15)
        out.write(b"END\n")
    writing.ended()
    return b"done"


def test_a_write_without_a_limit_is_not_cut_when_its_caller_is_gone(public_dir):
    """The server killed while a marked child without a write limit appends: the helper does not kill it at its
    start deadline, long past (it was torn there); it ends its write, and then ends."""
    box = public_dir / "box"
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mailflow.transports.local import asuser; "
         "from tests.component.test_asuser import _appends_slowly; "
         "asuser.call_as('nobody', 'write', _appends_slowly, sys.argv[1], timeout=2, marked=True)", str(box)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for _ in range(600):
            if box.exists() and box.read_bytes():
                break
            time.sleep(0.025)
    finally:
        server.kill()
        server.wait()
    assert box.read_bytes()[:2] == b"0\n"
    for _ in range(600):
        if box.read_bytes().endswith(b"END\n"):
            break
        time.sleep(0.025)
    assert box.read_bytes() == b"".join(b"%d\n" % piece for piece in range(20)) + b"END\n"


def _writes_for_two_seconds(*, writing) -> bytes:
    for _ in range(20):
        writing()
        time.sleep(0.1)
    writing.ended()
    return b"done"


def test_the_helper_dying_under_a_marked_write_says_so(monkeypatch):
    """The helper killed while a marked child with a limit writes: its SIGALRM (PR_SET_PDEATHSIG) rolls the write
    back, and the reason is the helper's end, not a stall of the write."""
    launched = _launched(monkeypatch)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            asuser.call_as("nobody", "write", _writes_for_two_seconds, timeout=30, marked=True, then=1000)
        except BaseException as e:  # noqa: BLE001 - what the call raised, for the assertions
            failures.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    for _ in range(400):
        if launched:
            break
        time.sleep(0.025)
    time.sleep(0.3)  # (the child writing)
    helper = asuser._FORKER.pid
    assert helper is not None and launched
    os.kill(helper, signal.SIGKILL)
    caller.join(10)
    [failed] = failures
    assert isinstance(failed, TemporaryError)
    assert (failed.dsn, failed.text) == ("4.3.0", "cannot write as nobody: the helper forking its children ended")


def test_the_helper_dying_under_a_write_without_a_limit_does_not_cut_it(monkeypatch):
    """A marked child without `then` has no timer whose signal rolls its write back: the helper's end (its
    PR_SET_PDEATHSIG SIGALRM) killed it mid-write. It ignores that signal: its write ends and its caller, still
    there, gets its answer."""
    launched = _launched(monkeypatch)
    answers: list[bytes] = []
    caller = threading.Thread(target=lambda: answers.append(
        asuser.call_as("nobody", "write", _writes_slowly, timeout=30, marked=True)))
    caller.start()
    for _ in range(400):
        if launched:
            break
        time.sleep(0.025)
    time.sleep(0.3)  # (the child writing)
    helper = asuser._FORKER.pid
    assert helper is not None
    os.kill(helper, signal.SIGKILL)
    caller.join(10)
    assert answers == [b"done"]
