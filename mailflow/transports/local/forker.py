"""A small process that forks call_as's children, so the server itself is never forked for them.

    Forker(child_main, kept)      not started yet; `child_main(fds)` runs in each child (it must end in os._exit),
                                  `kept()`: the descriptors the helper keeps for its children (the log handlers')
    forker.start()                forks the helper now (the server: before it opens the queue's lock, its listening
                                  sockets or any connection; the helper closes every descriptor but its own anyway)
    forker.launch(fds) -> Child   a child of the helper given `fds` (at the numbers they arrive at); forks the
                                  helper first when there is none, or when the one there has ended (logged)
    forker.stop()                 the helper ends (and its children with it); a later launch() forks another
    die_with_parent(helper)       in a child: SIGKILL when the helper ends (again after each change of identity)

A fork copies the forking process's page tables with the GIL held, and the forking process then takes copy-on-write
faults for as long as the child lives: forked from the server, each mailbox write as a user held its event loop for
milliseconds to tens of milliseconds, more the bigger the server. The helper is forked once, while the server is
small, closes what it inherited and stays small; each request is a message on a SOCK_SEQPACKET socketpair carrying
descriptors (SCM_RIGHTS): the child's end of a call socket, then the descriptors the child is given. The helper
forks, gives the child those descriptors (and no other of its own), and tells the caller on the call socket `P` +
the pid with a pidfd of the child (SCM_RIGHTS: the caller signals the child through it, never by a pid that the
helper may have reaped and the kernel reused), then `X` + the wait status once it has reaped it. A caller that
closes its call socket before then has its child killed (SIGKILL) by the helper.

The helper is single-threaded and touches no lock and logs nothing (it was forked from a threaded process). It
ends when the server's end of its request socket closes (stop(), or the server ended whatever way: it never
outlives it); its children are given PR_SET_PDEATHSIG SIGKILL, so none writes on unsupervised once it is gone.

Failure behaviour: launch() raises NotForked (its text says why) when the helper ended before its child started
or did not answer within ANSWER_WAIT s, or when a fork failed (EAGAIN: the helper's, or the server's forking a
helper); after the helper ended, the next launch() forks a new one (logged at most once every RESTART_LOG_EVERY s).
A call socket that ends (b"") before `X`: the helper ended, and the child with it.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable, NamedTuple

log = logging.getLogger("mailflow.local")

STARTED, ENDED, FAILED = b"P", b"X", b"E"
RESTART_LOG_EVERY = 60.0  # seconds between two logs of a helper forked again
ANSWER_WAIT = 10.0  # seconds a launch waits for the helper's `P` (it answers in microseconds: a longer wait is a hang)
_PID = struct.Struct("!i")
_PR_SET_PDEATHSIG = 1
_MAX_FDS = 64  # descriptors in one request (a message's content files are a handful)


class NotForked(Exception):
    """No child was forked: the helper is not there, or could not fork (see the module docstring)."""


class Child(NamedTuple):
    """A launched child: `pid` (the helper's, for logs), `pidfd` (to signal it) and the `call` socket (`X` on it
    once reaped, b"" when the helper died)."""

    pid: int
    pidfd: int
    call: socket.socket

    def close(self) -> None:
        os.close(self.pidfd)
        self.call.close()


class Forker:
    """See the module docstring."""

    def __init__(self, child_main: Callable[[list[int]], None], kept: Callable[[], tuple[int, ...]]) -> None:
        self._child_main, self._kept = child_main, kept
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._ended_by_itself = False  # (a helper forked next is a restart: logged)
        self._logged = -math.inf  # (time.monotonic) when a restart was last logged

    def start(self) -> None:
        with self._lock:
            if self._helper is None:
                self._helper = self._forked()

    def stop(self) -> None:
        with self._lock:
            if self._helper is not None:
                self._helper.end()
                self._helper, self._ended_by_itself = None, False

    def launch(self, fds: tuple[int, ...]) -> Child:
        """A new child given `fds` (see the module docstring); NotForked when none was forked."""
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            helper = self._sent(far.fileno(), fds)
            far.close()
            if not select.select([near], [], [], ANSWER_WAIT)[0]:
                self._forget(helper)
                raise NotForked(f"the helper forking its children did not answer within {ANSWER_WAIT:g}s")
            message, received, _, _ = socket.recv_fds(near, 256, 1)
            if message[:1] == FAILED:
                raise NotForked(f"the helper cannot fork: {message[1:].decode('utf-8', 'replace')}")
            if message[:1] != STARTED or len(received) != 1:
                for fd in received:
                    os.close(fd)
                self._forget(helper)
                raise NotForked("the helper forking its children ended")
            return Child(_PID.unpack(message[1:])[0], received[0], near)
        except BaseException:
            far.close()
            near.close()
            raise

    def _sent(self, call: int, fds: tuple[int, ...]) -> _Helper:
        """The request sent to the helper (forked first when there is none; forked again, once, when the one there
        has ended meanwhile); the helper it went to."""
        with self._lock:
            for _ in range(2):
                if self._helper is None:
                    self._helper = self._forked()
                try:
                    socket.send_fds(self._helper.requests, [b"F"], [call, *fds])
                    return self._helper
                except OSError:  # (EPIPE, ECONNRESET: it ended)
                    self._helper.end()
                    self._helper, self._ended_by_itself = None, True
        raise NotForked("the helper forking its children ended as it was forked")

    def _forget(self, helper: _Helper) -> None:
        """`helper` is gone (reaped; unless another call has done it already): the next launch forks another."""
        with self._lock:
            if self._helper is helper:
                helper.end()
                self._helper, self._ended_by_itself = None, True

    def _forked(self) -> _Helper:
        """(under the lock) a new helper"""
        if self._ended_by_itself:
            now = time.monotonic()
            if now - self._logged >= RESTART_LOG_EVERY:
                self._logged = now
                log.error("the process forking local delivery's children as users ended: forked again (logged "
                          "once every %gs)", RESTART_LOG_EVERY)
        kept = self._kept()
        server_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as e:
            server_end.close()
            helper_end.close()
            raise NotForked(f"cannot fork the helper: {e.strerror or e}") from None
        if pid == 0:
            try:
                server_end.close()
                _reset_inherited((helper_end.fileno(), *kept))
                _serve(helper_end, self._child_main)
            finally:
                os._exit(0)
        helper_end.close()
        return _Helper(pid, server_end)


class _Helper(NamedTuple):
    pid: int
    requests: socket.socket

    def end(self) -> None:
        """Its request socket closed, so it ends by itself; SIGKILL when it has not within a second (still our
        unreaped child: the pid is its own); reaped."""
        self.requests.close()
        deadline = time.monotonic() + 1.0
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() >= deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return
            time.sleep(0.005)


def _serve(requests: socket.socket, child_main: Callable[[list[int]], None]) -> None:
    """The helper's loop (single-threaded; see the module docstring)."""
    poller = select.poll()
    poller.register(requests, select.POLLIN)
    children: dict[int, tuple[int, int, socket.socket]] = {}  # pidfd -> (pid, pidfd, call socket)
    callers: dict[int, int] = {}  # call socket's descriptor -> its child's pidfd
    while True:
        for fd, _ in poller.poll():
            if fd == requests.fileno():
                try:
                    message, fds, _, _ = socket.recv_fds(requests, 16, _MAX_FDS)
                except OSError:
                    return
                if not message:  # the server's end closed: the server ended, or stopped us
                    return
                if fds and (started := _fork_child(requests, fds, child_main)) is not None:
                    pid, pidfd, call = started
                    children[pidfd], callers[call.fileno()] = started, pidfd
                    poller.register(pidfd, select.POLLIN)
                    poller.register(call, select.POLLIN)
            elif fd in children:  # the child ended: reaped, its caller told
                pid, pidfd, call = children.pop(fd)
                poller.unregister(pidfd)
                if callers.pop(call.fileno(), None) is not None:  # (else unregistered when its caller left)
                    poller.unregister(call)
                _, status = os.waitpid(pid, 0)
                try:
                    call.send(ENDED + _PID.pack(status))
                except OSError:
                    pass
                os.close(pidfd)
                call.close()
            elif fd in callers:  # the caller closed its end: its child is killed, reaped when it ends
                signal.pidfd_send_signal(callers.pop(fd), signal.SIGKILL)
                poller.unregister(fd)


def _fork_child(requests: socket.socket, fds: list[int],
                child_main: Callable[[list[int]], None]) -> tuple[int, int, socket.socket] | None:
    """Fork a child given fds[1:]; tell fds[0] (the call socket) `P` + its pid, with its pidfd (`E` and why when
    the fork failed: None)."""
    call, given = socket.socket(fileno=fds[0]), fds[1:]
    helper = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:  # (EAGAIN: a process limit) the caller is told, the helper goes on
        for fd in given:
            os.close(fd)
        with contextlib.suppress(OSError):
            call.send(FAILED + (e.strerror or str(e)).encode())
        call.close()
        return None
    if pid == 0:
        try:
            die_with_parent(helper)
            requests.close()
            call.close()
            child_main(given)
        finally:
            os._exit(1)
    for fd in given:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(call, [STARTED + _PID.pack(pid)], [pidfd])
    except OSError:  # (the caller is gone already)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    return pid, pidfd, call


def _reset_inherited(kept: tuple[int, ...]) -> None:
    """In the helper: the server's signal handlers and wakeup descriptor undone, its descriptors but `kept` closed."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    low = 3
    for fd in sorted(set(kept)):
        os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def die_with_parent(parent: int) -> None:
    """In a child: SIGKILL when its parent, the helper (`parent`), ends (PR_SET_PDEATHSIG; the kernel clears it at
    each change of identity, so it is set again after one); an end already past exits now."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
