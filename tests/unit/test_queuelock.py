"""mailflow.queuelock: one server per queue directory, and who holds it."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from mailflow import queuelock
from mailflow.queuelock import LOCK_NAME, QueueBusy, QueueLock, queue_owner


def test_the_lock_is_exclusive_even_within_one_process_and_names_the_holder(tmp_path):
    queue = tmp_path / "queue"
    assert queue_owner(queue) is None  # no file yet
    lock = QueueLock.acquire(queue)  # creates the directory
    assert (queue / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert queue_owner(queue) == os.getpid()
    with pytest.raises(QueueBusy) as info:
        QueueLock.acquire(queue)
    assert info.value.pid == os.getpid() and f"pid {os.getpid()}" in str(info.value)
    lock.release()
    assert queue_owner(queue) is None
    QueueLock.acquire(queue).release()


def test_a_dead_holder_leaves_no_lock_behind(tmp_path):
    """The lock goes with the process (a crash, SIGKILL): its stale pid file does not block the next server."""
    queue = tmp_path / "queue"
    code = f"from mailflow.queuelock import QueueLock; QueueLock.acquire({str(queue)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert (queue / LOCK_NAME).exists() and queue_owner(queue) is None
    QueueLock.acquire(queue).release()


def test_a_removed_pid_file_does_not_let_a_second_server_in(tmp_path):
    """Someone cleans up the pid file (a tmp reaper, an operator): the queue stays owned; the second server is
    refused (naming nobody it cannot know) and writes no pid file of its own."""
    queue = tmp_path / "queue"
    lock = QueueLock.acquire(queue)
    (queue / LOCK_NAME).unlink()
    with pytest.raises(QueueBusy):
        QueueLock.acquire(queue)
    assert not (queue / LOCK_NAME).exists()
    lock.release()
    QueueLock.acquire(queue).release()


def test_a_removed_pid_file_still_shows_the_queue_owned(tmp_path):
    """`mailflow status` (and reload) ask queue_owner: with the pid file removed under a running server it said
    no server runs (exit 1) while the directory's lock was held; the lock says one does, its pid unknown (0)."""
    queue = tmp_path / "queue"
    lock = QueueLock.acquire(queue)
    (queue / LOCK_NAME).unlink()
    assert queue_owner(queue) == 0
    lock.release()
    assert queue_owner(queue) is None
    assert queue_owner(tmp_path / "nowhere") is None


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
def test_a_fifo_or_a_symbolic_link_as_the_pid_file_is_refused_at_once(tmp_path, plant):
    """The queue's owner may put a FIFO (root's sendmail would wait on it for ever after storing each message) or a
    symbolic link (to a file it may not read) in place of the pid file: OSError at once, neither followed."""
    queue = tmp_path / "queue"
    queue.mkdir()
    if plant == "fifo":
        os.mkfifo(queue / LOCK_NAME)
    else:
        (tmp_path / "elsewhere").write_text("4242\n")
        os.symlink(tmp_path / "elsewhere", queue / LOCK_NAME)
    code = ("from mailflow.queuelock import queue_owner\n"
            f"try:\n    print(queue_owner({str(queue)!r}))\nexcept OSError as e:\n    print('OSError', e.errno)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.startswith("OSError"), done.stdout + done.stderr


def test_a_held_pid_file_names_the_pid_of_the_file_it_locked_not_of_one_renamed_over_it(tmp_path, monkeypatch):
    """The pid is read through the descriptor whose lock was refused, not by name again."""
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / LOCK_NAME).write_text("4242\n")
    (tmp_path / "other").write_text("999\n")
    real = queuelock._try_flock

    def held_then_swapped(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            return real(fd, operation)
        if (tmp_path / "other").exists():  # (swapped once: the lock is tried again for LOCK_PATIENCE)
            os.replace(tmp_path / "other", queue / LOCK_NAME)
        return False

    monkeypatch.setattr(queuelock, "_try_flock", held_then_swapped)
    with pytest.raises(QueueBusy) as info:
        QueueLock.acquire(queue)
    assert info.value.pid == 4242


def test_a_fifo_as_a_held_queues_pid_file_does_not_hold_the_second_server(tmp_path):
    """The directory held, the pid file replaced by a FIFO: the second server is refused at once, naming nobody
    (it opened the FIFO by name to read the pid, and waited there for a writer)."""
    queue = tmp_path / "queue"
    lock = QueueLock.acquire(queue)
    (queue / LOCK_NAME).unlink()
    os.mkfifo(queue / LOCK_NAME)
    code = ("from mailflow.queuelock import QueueBusy, QueueLock\n"
            f"try:\n    QueueLock.acquire({str(queue)!r})\nexcept QueueBusy as e:\n    print('busy', e.pid)")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        lock.release()
    assert done.stdout == "busy None\n", done.stdout + done.stderr


@pytest.mark.parametrize("plant, said", [("symlink", "is a symbolic link (never followed), not a regular file"),
                                         ("hardlink", "has 2 hard links, not 1 (a link to another file would be "
                                                      "truncated)"),
                                         ("fifo", "is a FIFO, not a regular file"),
                                         ("directory", "is a directory, not a regular file")])
def test_a_server_refuses_a_pid_file_that_is_no_regular_file_of_its_own_and_changes_nothing(tmp_path, plant, said):
    """The queue's owner may put a link to another file in place of the pid file: a server run by root truncated
    and chmodded that file (a symbolic or hard link), or failed to start on a FIFO with a bare EINVAL. Each is
    refused, saying what is there, and the file linked to is left as it was."""
    queue, victim = tmp_path / "queue", tmp_path / "victim"
    queue.mkdir()
    victim.write_text("precious data\n")
    os.chmod(victim, 0o600)
    {"symlink": lambda p: p.symlink_to(victim), "hardlink": lambda p: os.link(victim, p),
     "fifo": os.mkfifo, "directory": os.mkdir}[plant](queue / LOCK_NAME)
    with pytest.raises(OSError) as info:
        QueueLock.acquire(queue)
    assert str(info.value) == f"{queue / LOCK_NAME}: {said}"
    assert victim.read_text() == "precious data\n" and stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    QueueLock.acquire(tmp_path / "other").release()  # (nothing left held: no descriptor leaked with the lock)


def test_an_error_opening_the_pid_file_names_its_full_path(tmp_path, monkeypatch):
    """The pid file is opened by name in the queue directory's descriptor: a server that could not open it (run as
    a user who may not write it) said `Permission denied: 'mailflow.pid'`, no directory. The error names the path."""
    real_open = os.open

    def refusing_open(name, flags, *args, **kwargs):
        if name == LOCK_NAME:
            raise PermissionError(13, "Permission denied", name)  # (what open(2) gives a user who may not write it)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(PermissionError) as info:
        QueueLock.acquire(tmp_path)
    assert str(info.value) == f"[Errno 13] Permission denied: '{tmp_path / LOCK_NAME}'"


def test_a_start_is_not_refused_for_a_status_or_sendmail_probing_the_queue(tmp_path):
    """`queue_owner` (mailflow status, every mailflow sendmail) takes a shared lock for a moment; a start that
    met it took the queue for busy and refused itself, with no server running (the review: 1 395 of 3 000)."""
    stop = threading.Event()

    def probe():
        deadline = time.monotonic() + 30
        for _ in range(1_000_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            queue_owner(tmp_path)

    prober = threading.Thread(target=probe)
    prober.start()
    refused = 0
    try:
        for _ in range(300):
            try:
                QueueLock.acquire(tmp_path).release()
            except QueueBusy:
                refused += 1
    finally:
        stop.set()
        prober.join()
    assert refused == 0
