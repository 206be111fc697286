"""mailflow.queuelock: one server per queue directory, and who holds it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
