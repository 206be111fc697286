"""asuser.call_as: the child's answer comes back within a deadline; a child that never answers (a .forward on a
hung NFS home, a FUSE file its user serves) is killed and reaped, and the call fails 4.3.0 instead of holding its
worker thread for ever. Forking as another user needs root: skipped otherwise."""
from __future__ import annotations

import os
import pwd
import time

import pytest

from mailflow.errors import TemporaryError
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


def test_a_marked_child_is_killed_when_its_write_outlasts_then():
    """`then`: a child hung after mark() (a write or fsync that never returns) held its thread until a restart."""
    started = time.monotonic()
    with pytest.raises(TemporaryError) as failed:
        asuser.call_as("nobody", "write", _marks_then_hangs, timeout=30, marked=True, then=0.3)
    assert time.monotonic() - started < 10
    assert (failed.value.dsn, failed.value.text) == (
        "4.3.0", "cannot write as nobody: not done within 0.3s of starting to write, the child was killed")
    assert asuser.call_as("nobody", "write", _marks_then_takes_long, timeout=0.3, marked=True, then=30) == b"written"
