"""A small process of its own that forks call_as's children, so the server itself is never forked for them.

    Forker(entry)                     no helper yet; `entry`: the dotted name of the function each child runs,
                                      given the descriptors it got and the helper's pid (asuser's child_main)
    forker.launch(fds, modules, first, after_mark) -> Child
                                      a child of the helper given `fds`, once `modules` are imported in the helper;
                                      the helper started first when there is none, or when the one there ended;
                                      `first`, `after_mark`: its limits once its caller is gone (below)
    forker.pid                        the helper's pid (None: none started)
    forker.stop()                     the helper told to end (it does once its children have, which may be after
                                      the server's end: each within its limits, below); launch() refused from
                                      then on (HelperGone), and by a start under way (not waited for); blocks
                                      at most START_TICK + STOP_WAIT s: call it off the event loop
    forker.open()                     launch() taken again after a stop() (a server started in this process)
    child.kill()                      SIGKILL to the child (by the helper, which alone may reap it)
    child.done_within(wait) -> bool   whether the helper reaped it (or ended) within `wait` s
    child.status() -> int | None      then: its wait status; None when the helper ended first

A fork copies the forking process's page tables with the GIL held: forked from the server, each write as a user held
its event loop for 3-50 ms, more the bigger the server. The helper is a fresh interpreter (`python -I -c`, calling
main()) started with subprocess (a vfork and exec: nothing of the server's is copied, and no listening socket,
queue lock or connection is inherited: its request socket alone is passed), so it stays small. It runs as root from
/ : -I keeps the working directory (the spool, which the mail account may write to) and PYTHON* variables off its
sys.path, which is the server's, given as an argument (but its "": the working directory). Each request is one
message on a SOCK_SEQPACKET socket carrying descriptors (SCM_RIGHTS): the helper's end of the call's own control
socket, then those the child is given. The helper forks (after importing, once, the modules the child unpickles
its work from), and answers on the control socket `P` + the child's pid, then `X` + its wait status once it reaped
it; `E` + the reason when it could not fork. A `K` from the caller on the control socket has the helper SIGKILL
the child (through its pidfd: never a process that took a reaped child's number).

Containment: the helper and its children ignore SIGTERM, SIGINT and SIGHUP (a process group's kill, as systemd
and docker send, must not end a child mid-append). The helper learns of the server's end (or stop()) from its
request socket's end of file: from then it takes no request, and exits once its children have ended. A child whose
caller left without `K` (the server ended) is left to its own limits: a marked child ends its work, or rolls it
back when its next progress frame finds no reader; the helper kills it only past `first` s after its start or
`after_mark` s after its caller left, whichever is later (both sent with its request; None: no limit, it is never
killed). The children get PR_SET_PDEATHSIG SIGALRM (a marked child's timer signal: its work rolls back, 4.3.0
"the helper forking its children ended"; an unmarked one, a read, ends) when the helper ends.

Failure behaviour: launch() raises HelperGone (its text says why) when the helper ended (EPIPE, ECONNRESET, the
control socket's end of file), did not say READY within START_WAIT s of its start (its imports done) or did not
answer a request within ANSWER_WAIT s (then it is killed, logged: its children get SIGALRM and roll back, as after
an OOM kill; a helper that hangs would never end); the next launch() starts another (logged, with why, at most once
every RESTART_LOG_EVERY s); once every server that open()ed it has stop()ped (a count: servers in one process
do not stop each other's helper) it raises HelperGone(STOPPED) until the next open(), a start under way killing
the helper it started. It raises OSError with the helper's reason (`E`: a fork refused, EAGAIN) for that call
alone, and ValueError past MAX_FDS descriptors.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("mailflow.local")

STARTED, ENDED, FAILED, KILL, READY = b"P", b"X", b"E", b"K", b"R"
RESTART_LOG_EVERY = 60.0  # seconds between two logs of a helper started again
START_WAIT = 60.0  # seconds a new helper may take to say READY (its imports: 1-2 s, more on a loaded machine)
START_TICK = 0.1  # seconds between two looks at a stop() while a new helper's READY is awaited
ANSWER_WAIT = 30.0  # seconds a launch waits for `P` (a fork: milliseconds; a test's module imported first: seconds)
STOP_WAIT = 5.0  # seconds stop() waits for the helper to end before it leaves it to end by itself
MAX_FDS = 250  # descriptors in one request (SCM_RIGHTS carries 253 at most; a message's files are a handful)
PRELOADED = ("mailflow.transports.local.mbox", "mailflow.transports.local.maildir_file",
             "mailflow.transports.local.aliasing")  # what children unpickle their work from, imported at the start
_PID = struct.Struct("!i")
_PR_SET_PDEATHSIG = 1
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# the helper's whole program (run with -I from /): the server's sys.path, then main(its request socket, entry)
_MAIN = (f"import json, sys; sys.path[:] = json.loads(sys.argv[2]); from {__name__} import main; "
         "main(int(sys.argv[1]), sys.argv[3])")
STOPPED = "the helper forking its children was stopped (the server's stop)"  # (launch()'s refusal after stop())
_GONE = (BrokenPipeError, ConnectionResetError, EOFError)  # what says the helper ended (nothing else does)


class HelperGone(Exception):
    """The helper is not there (see the module docstring)."""


class Child:
    """A launched child: its pid (the helper's, for logs) and its control socket."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid, self._control = pid, control

    def kill(self) -> None:
        """SIGKILL by the helper (a child that ended already: nothing; the helper ended: its children got
        SIGALRM)."""
        _told(self._control, KILL)

    def done_within(self, wait: float) -> bool:
        """Whether the helper reaped it (or ended) within `wait` s: `X`, or an end of file, readable."""
        poller = select.poll()
        poller.register(self._control, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def status(self) -> int | None:
        """Once done: its wait status; None when the helper ended first. The control socket is closed."""
        try:
            message = self._control.recv(16)
        except OSError:
            message = b""
        self.close()
        return _PID.unpack(message[1:])[0] if message[:1] == ENDED and len(message) == 1 + _PID.size else None

    def close(self) -> None:
        self._control.close()


class Forker:
    """See the module docstring."""

    def __init__(self, entry: str) -> None:
        self._entry = entry
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._ended_why: str | None = None  # (why the last helper ended by itself: the next one is a restart, logged)
        self._logged = -math.inf  # (time.monotonic) when a restart was last logged
        self._users = 0  # servers that open()ed and have not stop()ped (the helper is theirs together)
        self._users_lock = threading.Lock()  # (not _lock: a stop must not wait behind a start holding it)
        self._stopped = False  # (the last user stopped: no helper is started, no request sent, until open())

    def stop(self) -> None:
        """A server's stop: the helper is told to end when it was the last user (else: nothing)."""
        with self._users_lock:
            self._users = max(0, self._users - 1)
            if self._users:
                return
            self._stopped = True  # (before _lock: a start under it gives up within START_TICK s, not START_WAIT)
        with self._lock:
            helper, self._helper, self._ended_why = self._helper, None, None
        if helper is not None:
            helper.end(STOP_WAIT)

    def open(self) -> None:
        """A server's start: one more user; calls are taken (again)."""
        with self._users_lock:
            self._users += 1
            self._stopped = False

    @property
    def pid(self) -> int | None:
        """The helper's pid (None: none started)."""
        helper = self._helper
        return None if helper is None else helper.process.pid

    def launch(self, fds: tuple[int, ...], modules: tuple[str, ...], first: float | None,
               after_mark: float | None) -> Child:
        """See the module docstring."""
        if len(fds) + 1 > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors to give the child, at most {MAX_FDS - 1}")
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            request = pickle.dumps((modules, first, after_mark))
            helper = self._sent(request, (far.fileno(), *fds))
            far.close()
            poller = select.poll()
            poller.register(near, select.POLLIN)
            if not poller.poll(ANSWER_WAIT * 1000):
                self._forget(helper, f"no answer within {ANSWER_WAIT:g}s", hung=True)
                raise HelperGone(f"the helper forking its children did not answer within {ANSWER_WAIT:g}s")
            try:
                message = near.recv(4096)
            except _GONE:
                message = b""
            if message[:1] == FAILED:
                raise OSError(message[1:].decode("utf-8", "replace"))
            if message[:1] != STARTED:
                self._forget(helper, "it ended")
                raise HelperGone("the helper forking its children ended")
            return Child(_PID.unpack(message[1:])[0], near)
        except BaseException:
            far.close()
            near.close()
            raise

    def _sent(self, request: bytes, fds: tuple[int, ...]) -> _Helper:
        """The request sent to the helper (started first when there is none; again, once, when the one there ended
        meanwhile); the helper it went to."""
        with self._lock:
            for _ in range(2):
                if self._stopped:
                    raise HelperGone(STOPPED)
                if self._helper is None:
                    self._helper = self._started()
                try:
                    socket.send_fds(self._helper.requests, [request], list(fds))
                    return self._helper
                except _GONE:
                    self._helper.end(0)
                    self._helper, self._ended_why = None, "it ended"
        raise HelperGone("the helper forking its children ended as it started")

    def _forget(self, helper: _Helper, why: str, hung: bool = False) -> None:
        """`helper` ended, or `hung` (it did not answer): the next launch starts another. The call that forgets it
        first ends it, and kills it when it hung (its children get SIGALRM and roll back, as after an OOM kill:
        a helper that hangs would never end, nor let them end); a call that finds it forgotten does nothing."""
        with self._lock:
            if self._helper is not helper:
                return
            self._helper, self._ended_why = None, why
        if hung:
            log.error("the process forking local delivery's children as users (pid %d): %s; killed",
                      helper.process.pid, why)
            helper.process.kill()
        helper.end(STOP_WAIT if hung else 0)

    def _started(self) -> _Helper:
        """(under the lock) a new helper"""
        if self._ended_why is not None:
            now = time.monotonic()
            if now - self._logged >= RESTART_LOG_EVERY:
                self._logged = now
                log.error("the process forking local delivery's children as users ended (%s): started again "
                          "(logged once every %gs)", self._ended_why, RESTART_LOG_EVERY)
        server_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen([sys.executable, "-I", "-c", _MAIN, str(helper_end.fileno()), _search_path(),
                                        self._entry], pass_fds=(helper_end.fileno(),), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, cwd="/")
        except BaseException:
            server_end.close()
            raise
        finally:
            helper_end.close()
        helper = _Helper(process, server_end)
        ready = self._ready(server_end)
        if ready != READY:
            if ready is None:  # (hung in its start, or stopped before it ended it: it would never end)
                process.kill()
            helper.end(STOP_WAIT if ready is None else 0)  # (killed: reaped here, in milliseconds)
            if self._stopped:
                raise HelperGone(STOPPED)
            self._ended_why = "it ended as it started" if ready is not None else f"not started within {START_WAIT:g}s"
            raise HelperGone("the helper forking its children ended as it started" if ready is not None else
                             f"the helper forking its children did not start within {START_WAIT:g}s")
        return helper

    def _ready(self, server_end: socket.socket) -> bytes | None:
        """What a new helper said first (READY, or b"": it ended); None when it said nothing within START_WAIT s, or
        stop() came first (looked at every START_TICK s)."""
        poller = select.poll()
        poller.register(server_end, select.POLLIN)
        deadline = time.monotonic() + START_WAIT
        while not self._stopped and (left := deadline - time.monotonic()) > 0:
            if poller.poll(min(left, START_TICK) * 1000):
                try:
                    return server_end.recv(16)
                except _GONE:
                    return b""
        return None


def _search_path() -> str:
    """The server's sys.path for the helper, as JSON, but its "" (the working directory: the helper runs from /)."""
    return json.dumps([entry for entry in sys.path if entry])


class _Helper:
    def __init__(self, process: subprocess.Popen, requests: socket.socket) -> None:
        self.process, self.requests = process, requests

    def end(self, wait: float) -> None:
        """Its request socket closed (it ends once its children have); reaped within `wait` s, else by a thread of
        its own when it ends (not killed here: its children would lose their supervisor mid-write)."""
        self.requests.close()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            threading.Thread(target=self.process.wait, name=f"helper-{self.process.pid}", daemon=True).start()


# --- the helper (its own interpreter) ---

class _Running:
    """One child in the helper: its pid, pidfd and control socket; once its caller left, the time past which it is
    killed (None: none)."""

    def __init__(self, pid: int, pidfd: int, control: socket.socket, first: float | None,
                 after_mark: float | None) -> None:
        self.pid, self.pidfd, self.control = pid, pidfd, control
        self._first = None if first is None else time.monotonic() + first
        self._after_mark = after_mark
        self.orphaned = False
        self.kill_at: float | None = None

    def orphan(self) -> None:
        """Its caller left: killed past its first deadline, or `after_mark` s from now, whichever is later; never
        when either is None (a marked child without a write limit: a kill would cut its append; it tells its
        progress to no one now: its next progress() fails and its work rolls back, or its own timer stops it)."""
        self.orphaned = True
        if self._first is not None and self._after_mark is not None:
            self.kill_at = max(self._first, time.monotonic() + self._after_mark)


def _serve(requests: socket.socket, entry: Callable[[list[int], int], None]) -> None:
    """The helper's loop: requests until their socket's end, then its children (each running `entry`) until they
    all ended."""
    poller = select.poll()
    poller.register(requests, select.POLLIN)
    by_pidfd: dict[int, _Running] = {}
    by_control: dict[int, _Running] = {}
    taking = True
    while taking or by_pidfd:
        now = time.monotonic()
        due = [c.kill_at for c in by_pidfd.values() if c.orphaned and c.kill_at is not None]
        wait = None if not due else max(min(due) - now, 0) * 1000
        for fd, _ in poller.poll(wait):
            if fd == requests.fileno():
                received = _request(requests)
                if received is None:  # the server ended, or stopped us: no more requests
                    poller.unregister(requests)
                    requests.close()
                    taking = False
                    continue
                if not received:
                    continue
                child = _started_child(entry, *received)
                if child is not None:
                    by_pidfd[child.pidfd] = by_control[child.control.fileno()] = child
                    poller.register(child.pidfd, select.POLLIN)
                    poller.register(child.control, select.POLLIN)
            elif fd in by_pidfd:  # ended: reaped, its caller told
                child = by_pidfd.pop(fd)
                poller.unregister(fd)
                if by_control.pop(child.control.fileno(), None) is not None:
                    poller.unregister(child.control)
                _, status = os.waitpid(child.pid, 0)
                _told(child.control, ENDED + _PID.pack(status))
                os.close(child.pidfd)
                child.control.close()
            elif fd in by_control:  # `K`, or the caller left (the server ended): it finishes within its limits
                child = by_control[fd]
                try:
                    order = child.control.recv(16)
                except OSError:
                    order = b""
                if order == KILL:
                    _kill(child.pidfd)
                if not order:
                    child.orphan()
                    by_control.pop(fd)
                    poller.unregister(fd)
        now = time.monotonic()
        for child in by_pidfd.values():
            if child.orphaned and child.kill_at is not None and now >= child.kill_at:
                _kill(child.pidfd)
                child.kill_at = None


def _request(requests: socket.socket) -> tuple[list[int], tuple[str, ...], float | None, float | None] | tuple[()] \
        | None:
    """The next request: its descriptors, modules and limits; () when it was refused; None at the end of file."""
    try:
        message, fds, flags, _ = socket.recv_fds(requests, 65536, MAX_FDS)
    except _GONE:
        return None
    if not message:
        return None
    if flags & socket.MSG_CTRUNC:  # (more descriptors than MAX_FDS: launch() sends none such)
        _refuse(fds, f"cannot start the child: more than {MAX_FDS} descriptors")
        return ()
    modules, first, after_mark = pickle.loads(message)
    return fds, modules, first, after_mark


def _started_child(entry: Callable[[list[int], int], None], fds: list[int], modules: tuple[str, ...],
                   first: float | None, after_mark: float | None) -> _Running | None:
    """A child forked and given fds[1:]; fds[0], its control socket, told `P` + its pid (or `E` + why not)."""
    control, given = socket.socket(fileno=fds[0]), fds[1:]
    try:
        for name in modules:
            importlib.import_module(name)
        helper = os.getpid()
        pid = os.fork()
    except Exception as e:  # noqa: BLE001 - an import or a fork refused (EAGAIN): that call fails, not the helper
        _refuse(fds, f"cannot start the child: {getattr(e, 'strerror', None) or e}")
        return None
    if pid == 0:
        try:
            die_with_parent(helper)
            entry(given, helper)
        finally:
            os._exit(1)
    for fd in given:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    if not _told(control, STARTED + _PID.pack(pid)):
        _kill(pidfd)  # (its caller is gone before it started: nothing to do)
    return _Running(pid, pidfd, control, first, after_mark)


def _refuse(fds: list[int], reason: str) -> None:
    """A request refused: its caller told `E` + `reason` on its control socket (fds[0]); every descriptor closed."""
    if fds:
        with socket.socket(fileno=fds[0]) as control:
            _told(control, FAILED + reason.encode("utf-8", "replace"))
    for fd in fds[1:]:
        os.close(fd)


def _told(control: socket.socket, message: bytes) -> bool:
    """`message` sent on `control`; False when it could not be (its other end closed)."""
    try:
        control.send(message)
        return True
    except OSError:
        return False


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:  # (it ended already)
        pass


def die_with_parent(helper: int) -> None:
    """In a child of the helper (`helper`: its pid, taken before the fork): SIGALRM when the helper ends
    (PR_SET_PDEATHSIG; cleared by a change of identity: set again after one); the helper already gone: SIGALRM now
    (the pid read after the fork could be a subreaper's that took the child)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGALRM, 0, 0, 0)
    if os.getppid() != helper:
        os.kill(os.getpid(), signal.SIGALRM)


def main(requests_fd: int, entry: str) -> None:
    """The helper: the signals that end a process group ignored, the children's modules and `entry` (what each
    child runs: a dotted name) imported, then its loop.
    (No PR_SET_PDEATHSIG of its own: the kernel sends it when the server's thread that started it ends, a worker
    thread; the request socket's end of file tells it of the server's end, in order after every request.)"""
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    requests = socket.socket(fileno=requests_fd)
    for name in PRELOADED:
        importlib.import_module(name)
    module, _, name = entry.rpartition(".")
    child_main = getattr(importlib.import_module(module), name)
    try:
        requests.send(READY)
    except _GONE:
        return
    _serve(requests, child_main)

