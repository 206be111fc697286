"""Work done with another user's rights, without this process ever changing identity.

    call_as(user, doing, fn, *args, timeout=CALL_AS_TIMEOUT, marked=False, then=None) -> bytes
                                                fn(*args) in a child forked for it, running with `user`'s uid, gid
                                                and groups; its bytes come back over a pipe within `timeout` s;
                                                `marked`: fn(*args, writing=mark), and when the child calls mark()
                                                (work follows that is killed only as a last resort) the time
                                                limit becomes `then` s from there (None: no limit)
    rights_for(rights, default_privs) -> str | None   whose rights a command, file or :include: of local delivery
                                                uses: as root `rights` (a .forward's system user) or else
                                                `default_privs`, never root's; not as root, None (mailflow's own)

The child switches identity, calls `fn`, writes what it returned (or the error it raised) to the pipe and
exits; it touches nothing else, so no lock another thread of this process holds can matter to it. Call it from a
worker thread (asyncio.to_thread): the parent blocks until the child is done, or `timeout` seconds at most (a
.forward on a hung NFS home, or a FUSE file the user serves itself, never answers): then the child is killed
(SIGKILL, reaped) and the call fails; `timeout` None: no limit. The report is framed by its length, so the parent
never waits for an end of file that a sibling child (forked by another thread while this pipe was open) could
hold back.

Failure behaviour: `TemporaryError` 4.3.0 when `user` does not exist or is root (`refusing to DOING as USER: uid
0`), when the child gave no answer within `timeout` (`cannot DOING as USER: no answer within Ns, the child was
killed`; past `then` after the mark: `cannot DOING as USER: not done within Ns of starting to write, the child was
killed`), or when `fn` raised anything but a DeliveryError (`cannot DOING as USER: reason`); a DeliveryError raised by
`fn` is raised again here with its permanence, status and text.
"""
from __future__ import annotations

import os
import pwd
import select
import signal
import struct
import time
from functools import partial
from typing import Callable

from mailflow.errors import DeliveryError, PermanentError, TemporaryError

RESULT, DELIVERY_ERROR, OTHER_ERROR = b"R", b"D", b"E"
MARK = b"M"  # a frame of its own, before the report: the child's time limit ends (`marked`)
CALL_AS_TIMEOUT = 60.0  # seconds a child may take (a .forward or :include: read: milliseconds when all is well)
_LENGTH = struct.Struct("!Q")  # the report's length, before it


def rights_for(rights: str | None, default_privs: str) -> str | None:
    """See the module docstring."""
    return (rights or default_privs) if os.geteuid() == 0 else None


def call_as(user: str, doing: str, fn: Callable[..., bytes], *args,
            timeout: float | None = CALL_AS_TIMEOUT, marked: bool = False, then: float | None = None) -> bytes:
    """See the module docstring."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise TemporaryError("4.3.0", f"cannot {doing} as {user}: no such user") from None
    if pw.pw_uid == 0:
        raise TemporaryError("4.3.0", f"refusing to {doing} as {user}: uid 0")
    groups = os.getgrouplist(user, pw.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: switch identity, call, report, exit
        os.close(read_end)
        if marked:
            fn = partial(fn, writing=partial(_send_frame, write_end, MARK))
        _report_and_exit(write_end, lambda: _switched(groups, pw.pw_gid, pw.pw_uid, fn, args))
    os.close(write_end)
    try:
        report = _framed_report(read_end, None if timeout is None else time.monotonic() + timeout, then)
    finally:
        os.close(read_end)
    if report is None or report == MARK:  # past a deadline: the child is killed (a hung read ends with SIGKILL), reaped
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if report == MARK:
            raise TemporaryError("4.3.0", f"cannot {doing} as {user}: not done within {then:g}s of starting to "
                                          "write, the child was killed")
        raise TemporaryError("4.3.0", f"cannot {doing} as {user}: no answer within {timeout:g}s, the child was killed")
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


def _framed_report(fd: int, deadline: float | None, then: float | None = None) -> bytes | None:
    """The child's report (each frame its length first), b"" when the pipe ends before it is whole (the child
    died), None when `deadline` (time.monotonic; None: none) passes first. A MARK frame before it puts the
    deadline `then` s on (None: none), and MARK is returned when that one passes first."""
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
            deadline, late = (None if then is None else time.monotonic() + then), MARK
            continue
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and (left <= 0 or not poller.poll(left * 1000)):
            return late
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        received += chunk


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
