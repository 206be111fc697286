"""One server per queue: an exclusive lock on `<queue_directory>/mailflow.pid` (Postfix's master.pid).

- `QueueLock.acquire(directory) -> QueueLock`: creates the directory if needed, takes an exclusive `flock` on
  the directory and on the pid file and writes this process's pid into it (the directory's lock holds even when
  the pid file is removed under a running server). Each lock is tried again for up to LOCK_PATIENCE (0.1 s): a
  `queue_owner` probe (`mailflow status`, every `mailflow sendmail`) holds a shared one for a moment, and a start
  must not take it for a server running. Raises `QueueBusy` (naming the pid that
  holds it, read through a descriptor: the locked file's, or one opened as queue_owner opens it) when another
  server runs on this queue, OSError when the directory or file cannot be made, `files.RefusedFile` (an OSError:
  "PATH: is a FIFO, not a regular file") when what is there is no regular file of one link (opened as
  queue_owner opens it: a link to another file would be truncated; Postfix's safe_open refuses it too).
  `release()` gives it back (the file stays; the next server overwrites it). The lock belongs to the open
  file, so two servers in one process also exclude each other, and a crashed server's lock goes with it.
- `queue_owner(directory) -> int | None`: the pid of the server running on this queue (0 when its pid cannot be read:
  its pid file removed under it, or not written yet), or None when none is (a shared lock that can be had, on the pid
  file and then on the directory, means nobody holds the exclusive one; a directory this user cannot open tells
  nothing). For `mailflow sendmail`, which runs as any user: the file is world-readable. The file is opened without
  following a symbolic link nor waiting on a FIFO (the queue's owner could put either there for root's sendmail) and
  must be a regular file, else RefusedFile.

The server takes the lock before it opens the store and before recovery, so a second `mailflow serve` on the
same queue changes nothing and exits.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from mailflow.files import RefusedFile, refuse_special

LOCK_NAME = "mailflow.pid"
FILE_MODE = 0o644
LOCK_PATIENCE = 0.1  # seconds `acquire` tries a lock again: a server holds it for good, a probe for a moment
LOCK_RETRY = 0.002  # seconds between those tries


class QueueBusy(Exception):
    def __init__(self, directory: Path, pid: int | None):
        self.directory = directory
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"the queue {directory} is in use by another mailflow server ({who}); "
                         "one server per queue_directory")


class QueueLock:
    def __init__(self, fd: int, path: Path, directory_fd: int | None = None):
        self._fd: int | None = fd
        self._directory_fd = directory_fd
        self.path = path

    @classmethod
    def acquire(cls, directory: Path) -> "QueueLock":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        # The directory itself is locked first: a pid file removed under a running server (a tmp reaper, an
        # operator) must not let a second one in, nor have it write a pid file before it is refused.
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fd = None
        try:
            if not _flock_patiently(directory_fd):
                raise QueueBusy(directory, _read_pid(path, directory_fd))
            fd = _open_pid_file(path, os.O_RDWR | os.O_CREAT, directory_fd)
            links = os.fstat(fd).st_nlink
            if links != 1:  # (a hard link to another file: Postfix's safe_open refuses it too)
                raise RefusedFile(f"has {links} hard links, not 1 (a link to another file would be truncated)", path)
            if not _flock_patiently(fd):
                raise QueueBusy(directory, _pid_in(fd))  # (the file locked, not one renamed over it since)
            os.fchmod(fd, FILE_MODE)  # (whatever the umask: sendmail, run by any user, reads it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            if fd is not None:
                os.close(fd)
            os.close(directory_fd)
            raise
        return cls(fd, path, directory_fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None
        if self._directory_fd is not None:
            os.close(self._directory_fd)
            self._directory_fd = None


def queue_owner(directory: Path) -> int | None:
    try:
        fd = _open_pid_file(Path(directory) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return _directory_held(directory)
    try:
        if not _try_flock(fd, fcntl.LOCK_SH):
            return _pid_in(fd) or 0  # held, though its pid cannot be read (yet)
    finally:
        os.close(fd)
    return _directory_held(directory)


def _directory_held(directory: Path) -> int | None:
    """0 when a server holds the queue directory's lock though its pid file says nothing (removed under it, or
    not locked yet at its start), else None (the directory missing or not this user's to open: nothing known)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return None if _try_flock(fd, fcntl.LOCK_SH) else 0
    finally:
        os.close(fd)


def _try_flock(fd: int, operation: int) -> bool:
    """`flock(fd, operation)` without waiting: False when another open file holds a conflicting lock."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return False
    return True


def _flock_patiently(fd: int) -> bool:
    """An exclusive `flock` on `fd`, tried for up to LOCK_PATIENCE: False when another open file still holds a
    conflicting lock then (a server's; a probe's shared lock is let go of at once)."""
    deadline = time.monotonic() + LOCK_PATIENCE
    while not _try_flock(fd, fcntl.LOCK_EX):
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_RETRY)
    return True


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _read_pid(path: Path, directory_fd: int) -> int | None:
    """The pid in the pid file of a queue whose directory (open as `directory_fd`) another server holds, read
    through one descriptor (`_open_pid_file`); None when it cannot be read."""
    try:
        fd = _open_pid_file(path, os.O_RDONLY, directory_fd)
    except OSError:
        return None
    try:
        return _pid_in(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_pid_file(path: Path, flags: int, directory_fd: int | None = None) -> int:
    """The pid file, opened with `flags` (its name in the directory open as `directory_fd`, when given), never
    through a symbolic link nor waiting on a FIFO: the queue's owner may put either there, where root's sendmail
    (cron) reads it after storing each message and a server run by root writes it. RefusedFile (an OSError:
    "is a FIFO, not a regular file") unless it is a regular file; other OSErrors as open(2) gives them."""
    name = path.name if directory_fd is not None else path
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE, dir_fd=directory_fd)
    except OSError as e:
        if e.errno not in _NOT_REGULAR:  # (named by its full path, not the bare name opened in the directory)
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise RefusedFile(f"is {_NOT_REGULAR[e.errno]}, not a regular file", path) from None
    try:
        refuse_special(os.fstat(fd).st_mode, path)
    except OSError:
        os.close(fd)
        raise
    return fd


# what open(2) of the pid file, no symbolic link followed, says when it is no regular file
_NOT_REGULAR = {errno.ELOOP: "a symbolic link (never followed)", errno.EISDIR: "a directory", errno.ENXIO: "a socket"}
