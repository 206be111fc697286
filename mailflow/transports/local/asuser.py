"""Work done with another user's rights, without this process ever changing identity.

    call_as(user, doing, fn, *args, timeout=CALL_AS_TIMEOUT, marked=False, then=None, grace=KILL_GRACE,
            keep=()) -> bytes
                                                fn(*args) in a child forked for it, running with `user`'s uid, gid
                                                and groups; its bytes come back over a pipe within `timeout` s;
                                                `marked`: fn(*args, writing=progress) (a Progress): from the
                                                child's first progress() on, `timeout` is over and the limit is
                                                `then` s without a progress() (None: no limit), see below;
                                                `keep`: descriptors of this process the child keeps open (a
                                                message's content files, Content.held: the user may not open them)
    rights_for(rights, default_privs) -> str | None   whose rights a command, file or :include: of local delivery
                                                uses: as root `rights` (a .forward's system user) or else
                                                `default_privs`, never root's; not as root, None (mailflow's own)

The child closes every descriptor it inherited but stdin, stdout, stderr, its report pipe and `keep` (the queue's
lock, listening sockets, clients' connections: a child stuck on a hung mount must not keep a restarted server from
the queue or its ports), switches identity, calls `fn`, writes what it returned (or the error it raised) to the
pipe and exits; it touches nothing else, so no lock another thread of this process holds can matter to it. Call
it from a worker thread (asyncio.to_thread): the parent blocks until the child is done, or `timeout` seconds at most (a
.forward on a hung NFS home, or a FUSE file the user serves itself, never answers): then the child is killed
(SIGKILL) and the call fails; `timeout` None: no limit. The report is framed by its length, so the parent
never waits for an end of file that a sibling child (forked by another thread while this pipe was open) could
hold back; a report already in the pipe when a deadline passes is read, not lost (a child that ended right at
the limit is not reported as failed).

A marked child's limit is its own first: `fn` calls progress() when it starts writing and after each piece it
wrote, and progress.ended() once its work is safe (its last fsync returned). `then` s without a progress(), a
SIGALRM in the child raises TemporaryError 4.3.0 out of what `fn` was doing, so `fn`'s own failure path runs (the
mbox append truncates the file back and removes its dotlock) and the child reports that error. The parent kills
it (SIGKILL) only as a last resort: when no progress was heard for `then` + `grace` s (a write in an
uninterruptible wait, where no handler runs; what it wrote then stays). The child tells the parent of its
progress at most every `grace`/2 s (a frame in the pipe), so it always has `grace`/2 s to undo its work. With
`then`, the child's timer runs from the fork too: `timeout` s without a first progress() raise TemporaryError 4.3.0
(`cannot DOING as USER: not started writing within Ns`) out of what it was doing (a stat hung after the dotlock was
made: its failure path removes the dotlock), and the parent kills it only `grace` s after `timeout`.

A killed child is reaped within REAP_WAIT s (waitpid WNOHANG); one that still has not ended (a wait the kernel
does not interrupt, even for SIGKILL) is logged and left to a daemon thread that reaps it when it ends: the
caller's thread is freed either way. Such children are counted (process-wide: they are this process's children,
whoever forked them): while STUCK_LIMIT of them are unreaped (each a process, and a thread), call_as forks no
more and fails at once, logged once every STUCK_LOG_EVERY s (every
retry of every message to a file on a hung mount would add one, until fork or thread creation failed for all).

Failure behaviour: `TemporaryError` 4.3.0 when `user` does not exist or is root (`refusing to DOING as USER: uid
0`), when the child gave no answer within `timeout` (`cannot DOING as USER: no answer within Ns, the child was
killed`, N: `timeout` + `grace` for a marked child with `then`; past `then` + `grace` after a progress(): `cannot
DOING as USER: writing made no progress for Ns, nor ended Gs later, the child was killed`), when the child stopped
itself (`… not started writing within Ns`, `… writing made no progress for Ns`), when `fn` raised anything but a
DeliveryError (`cannot DOING as USER: reason`), or when STUCK_LIMIT killed children have not ended (`cannot DOING as
USER: N children stuck in uninterruptible waits`, no child forked); a DeliveryError raised by
`fn` is raised again here with its permanence, status and text.
"""
from __future__ import annotations

import logging
import math
import os
import pwd
import select
import signal
import struct
import threading
import time
from functools import partial
from typing import Callable

from mailflow.errors import DeliveryError, PermanentError, TemporaryError

log = logging.getLogger("mailflow.local")

RESULT, DELIVERY_ERROR, OTHER_ERROR = b"R", b"D", b"E"
MARK = b"M"  # a frame of its own, before the report: a marked child's progress (`marked`)
CALL_AS_TIMEOUT = 60.0  # seconds a child may take (a .forward or :include: read: milliseconds when all is well)
KILL_GRACE = 30.0  # seconds past a marked child's own limit before the parent kills it (it undoes its work meanwhile)
REAP_WAIT = 2.0  # seconds a killed child is waited for before it is left to a reaper thread
STUCK_LIMIT = 8  # killed children not yet ended (left to reaper threads) past which no child is forked
STUCK_LOG_EVERY = 60.0  # seconds between two logs of a call refused for them
_LENGTH = struct.Struct("!Q")  # the report's length, before it


def rights_for(rights: str | None, default_privs: str) -> str | None:
    """See the module docstring."""
    return (rights or default_privs) if os.geteuid() == 0 else None


def call_as(user: str, doing: str, fn: Callable[..., bytes], *args,
            timeout: float | None = CALL_AS_TIMEOUT, marked: bool = False, then: float | None = None,
            grace: float = KILL_GRACE, keep: tuple[int, ...] = ()) -> bytes:
    """See the module docstring."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise TemporaryError("4.3.0", f"cannot {doing} as {user}: no such user") from None
    if pw.pw_uid == 0:
        raise TemporaryError("4.3.0", f"refusing to {doing} as {user}: uid 0")
    _STUCK.refuse_when_full(f"{doing} as {user}")
    groups = os.getgrouplist(user, pw.pw_gid)
    logs = _log_descriptors()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: switch identity, call, report, exit
        _keep_only(write_end, *keep, *logs)

        def work() -> bytes:  # (a Progress made here: whatever it raises is reported, and the child exits)
            if not marked:
                return _switched(groups, pw.pw_gid, pw.pw_uid, fn, args)
            stalled = f"cannot {doing} as {user}: writing made no progress for {then or 0:g}s"
            late = f"cannot {doing} as {user}: not started writing within {timeout or 0:g}s"
            progress = Progress(write_end, then, grace, stalled, timeout, late)
            try:
                return _switched(groups, pw.pw_gid, pw.pw_uid, partial(fn, writing=progress), args)
            finally:  # (the timer stopped before the report: an attempt that wrote nothing may end near the limit)
                try:
                    progress.ended()
                except TemporaryError:  # its alarm came after the work ended, before ended() disarmed it: the
                    progress.ended()    # work's own result stands (an EFBIG stays 5.2.2), the timer is stopped

        _report_and_exit(write_end, work)
    os.close(write_end)
    try:
        first = None if timeout is None else timeout + (grace if marked and then is not None else 0)
        report = _framed_report(read_end, None if first is None else time.monotonic() + first,
                                None if then is None else then + grace)
    finally:
        os.close(read_end)
    if report is None or report == MARK:  # past a deadline: the child is killed (a hung read ends with SIGKILL)
        os.kill(pid, signal.SIGKILL)
        _reap(pid, f"{doing} as {user}")
        if report == MARK:
            raise TemporaryError("4.3.0", f"cannot {doing} as {user}: writing made no progress for {then:g}s, nor "
                                          f"ended {grace:g}s later, the child was killed")
        raise TemporaryError("4.3.0", f"cannot {doing} as {user}: no answer within {first:g}s, the child was killed")
    _, status = os.waitpid(pid, 0)
    kind, data = report[:1], report[1:]
    if os.waitstatus_to_exitcode(status) != 0:  # killed while it wrote: its report may be cut short
        kind = b""
    if kind == RESULT:
        return data
    if kind == DELIVERY_ERROR:
        permanence, dsn, text = data.decode("utf-8", "replace").split(" ", 2)
        raise (PermanentError if permanence == "P" else TemporaryError)(dsn, text)
    reason = data.decode("utf-8", "replace") if kind == OTHER_ERROR else "the child process failed"
    raise TemporaryError("4.3.0", f"cannot {doing} as {user}: {reason}")


class Progress:
    """A marked child's clock (see the module docstring): `progress()` each time the work moves (the first: it
    starts), `progress.ended()` once it is safe. Made in the child, after the fork: with a limit (`then`), its
    timer runs from here, `start` s until the first progress() (`late` raised past them), `then` s after each."""

    def __init__(self, fd: int, then: float | None, grace: float, stalled: str, start: float | None, late: str):
        self._fd, self._then, self._every = fd, then, grace / 2
        self._late, self._stalled = late, stalled  # (raised before the first progress(), and after it)
        self._started = False
        self._told = -math.inf  # (time.monotonic) when the parent last heard of progress
        self._armed = False
        if then is not None:
            signal.signal(signal.SIGALRM, self._alarm)
            if start is not None:
                self._armed = True
                signal.setitimer(signal.ITIMER_REAL, start)

    def __call__(self) -> None:
        if self._then is not None:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self._then)
            self._started = True
        if (now := time.monotonic()) - self._told >= self._every:
            self._told = now
            _send_frame(self._fd, MARK)

    def ended(self) -> None:
        self._armed = False  # (first: an alarm handled after this raises nothing)
        if self._then is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _alarm(self, signum, frame) -> None:
        if self._armed:
            self._armed = False
            raise TemporaryError("4.3.0", self._stalled if self._started else self._late)


def _reap(pid: int, what: str) -> None:
    """Reap the killed child `pid` within REAP_WAIT s, else leave it to a daemon thread (see the module docstring)."""
    deadline, pause = time.monotonic() + REAP_WAIT, 0.001
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() >= deadline:
            log.error("the child %d (%s) has not ended %gs after SIGKILL (an uninterruptible wait): it is reaped "
                      "when it ends", pid, what, REAP_WAIT)
            _STUCK.leave(pid)
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class _StuckChildren:
    """The killed children left to reaper threads (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._logged = -math.inf  # (time.monotonic) when a refusal was last logged

    def refuse_when_full(self, what: str) -> None:
        with self._lock:
            stuck = len(self._pids)
            if stuck < STUCK_LIMIT:
                return
            now, log_it = time.monotonic(), False
            if now - self._logged >= STUCK_LOG_EVERY:
                self._logged, log_it = now, True
        if log_it:
            log.error("%s refused: %d killed children have not ended (uninterruptible waits: a hung file system?); "
                      "no child is forked until they do (logged once every %gs)", what, stuck, STUCK_LOG_EVERY)
        raise TemporaryError("4.3.0", f"cannot {what}: {stuck} children stuck in uninterruptible waits")

    def leave(self, pid: int) -> None:
        """`pid` to a reaper thread of its own, counted once that thread runs (under the lock its end takes, so it
        cannot be counted out before it is counted in). When no thread can start (the process's thread limit),
        the caller reaps it, blocking: a count never counted out would refuse every child until a restart."""
        with self._lock:
            try:
                threading.Thread(target=self._reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()
            except RuntimeError as e:
                started = e
            else:
                self._pids.add(pid)
                return
        log.error("the child %d: no reaper thread (%s): waiting for it to end here", pid, started)
        os.waitpid(pid, 0)

    def _reap(self, pid: int) -> None:
        try:
            os.waitpid(pid, 0)
        finally:
            with self._lock:
                self._pids.discard(pid)

    @property
    def count(self) -> int:
        return len(self._pids)


_STUCK = _StuckChildren()  # (process-wide, as the children are)


def _framed_report(fd: int, deadline: float | None, after_mark: float | None = None) -> bytes | None:
    """The child's report (each frame its length first), b"" when the pipe ends before it is whole (the child
    died), None when `deadline` (time.monotonic; None: none) passes first. Each MARK frame before it puts the
    deadline `after_mark` s on (None: none), and MARK is returned when that one passes first. What is in the pipe
    when a deadline passes is read first."""
    late = None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    received = bytearray()
    while True:
        if len(received) >= _LENGTH.size and len(received) >= (end := _LENGTH.size + _LENGTH.unpack_from(received)[0]):
            frame = bytes(received[_LENGTH.size:end])
            if frame != MARK:
                return frame
            del received[:end]
            deadline, late = (None if after_mark is None else time.monotonic() + after_mark), MARK
            continue
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        if left is not None and not poller.poll(left * 1000):
            return late
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        received += chunk


def _log_descriptors() -> tuple[int, ...]:
    """The descriptors the process's log handlers write to (a stream's, a syslog socket's), kept in the child: its
    lines (a stale dotlock removed) go where the server's go. Closed, their numbers could be a mailbox's by the time
    a line is written, and the line would go into the mailbox."""
    loggers = [logging.getLogger(), *(one for one in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(one, logging.Logger))]
    found = []
    for handler in (handler for logger in loggers for handler in logger.handlers):
        for holder in (getattr(handler, "stream", None), getattr(handler, "socket", None)):
            try:
                found.append(holder.fileno())  # type: ignore[union-attr]
            except (AttributeError, OSError, ValueError):
                pass
    return tuple(found)


def _keep_only(*kept: int) -> None:
    """In the child, right after the fork: close every descriptor of the server but stdin, stdout, stderr and
    `kept` (its report pipe, call_as's `keep`, the log handlers'): the queue's lock, listening sockets, clients'
    connections, other commands' pipes, which a child stuck on a hung mount would otherwise hold for as long (a
    restart refused: the queue busy, the address in use). The signal wakeup descriptor goes first: the number of
    the loop's closed one could be a mailbox's by the time an alarm writes to it."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # (not the main thread: cannot be, after a fork; nothing was set then)
        pass
    low = 3
    for fd in sorted(set(kept)):
        os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _switched(groups: list[int], gid: int, uid: int, fn: Callable[..., bytes], args: tuple) -> bytes:
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    return fn(*args)


def _report_and_exit(fd: int, work: Callable[[], bytes]) -> None:
    try:
        report = RESULT + work()
    except DeliveryError as e:
        report = DELIVERY_ERROR + f"{'P' if e.permanent else 'T'} {e.dsn} {e.text}".encode("utf-8", "replace")
    except BaseException as e:  # noqa: BLE001 - the child must always exit here
        report = OTHER_ERROR + str(getattr(e, "strerror", None) or e).encode("utf-8", "replace")
    try:
        _send_frame(fd, report)
    finally:
        os._exit(0)


def _send_frame(fd: int, frame: bytes) -> None:
    view = memoryview(_LENGTH.pack(len(frame)) + frame)
    while view:
        view = view[os.write(fd, view):]
