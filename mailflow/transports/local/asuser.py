"""Work done with another user's rights, without this process ever changing identity, or forking itself for it.

    call_as(user, doing, fn, *args, timeout=CALL_AS_TIMEOUT, marked=False, then=None, grace=KILL_GRACE,
            keep=(), queue_id="") -> bytes
                                                fn(*args) in a child forked for it by the helper (below), running
                                                with `user`'s uid, gid and groups; its bytes come back over a socket
                                                within `timeout` s;
                                                `marked`: fn(*args, writing=progress) (a Progress): from the
                                                child's first progress() on, `timeout` is over and the limit is
                                                `then` s without a progress() (None: no limit), see below;
                                                `keep`: descriptors of this process the child keeps open, at the same
                                                numbers (a message's content files, Content.held: the user may not
                                                open them), MAX_KEEP at most; `queue_id`: what the child's log lines
                                                are keyed by
    rights_for(rights, default_privs) -> str | None   whose rights a command, file or :include: of local delivery
                                                uses: as root `rights` (a .forward's system user) or else
                                                `default_privs`, never root's; not as root, None (mailflow's own)
    stop_helper()                               the server's stop: when no other server of the process is
                                                started, the helper told to end and later calls refused (blocks
                                                up to forker.STOP_WAIT s: call it off the event loop)
    open_helper()                               the server's start: one more user, calls taken (again)

The children are forked by a small process of its own (forker.Forker: a fresh interpreter, started at the first
call, and again after it ended), never by the server: a fork copies the forking process's page tables with the GIL
held, and the forking process takes copy-on-write faults for as long as its child lives; forked from the server,
each call held its event loop for 3-50 ms, more the bigger the server. `fn` and `args` go to the child pickled (a
module's function, by name: the helper imports its module once; a local function or a generator cannot be sent:
4.3.0), with the descriptors (SCM_RIGHTS): its socket and `keep`. A child's log lines come back as frames on its
socket, logged here (after `queue_id`): a log descriptor it inherited would go stale after a logrotate.

The child closes every descriptor it got but stdin, stdout, stderr, its socket and `keep` (put back at this
process's numbers): the helper's and other children's; the helper never had the queue's lock, listening sockets or
clients' connections (a child stuck on a hung mount must not keep a restarted server from the queue or its
ports). It switches identity, calls `fn`, writes what it returned (or the error it raised) to its socket and
exits; it touches nothing else. Call it from a worker thread (asyncio.to_thread): the caller blocks until the child
is done, or `timeout` seconds at most (a .forward on a hung NFS home, or a FUSE file the user serves itself, never
answers): then the child is killed (SIGKILL, by the helper, through its pidfd: never a process that took a reaped
child's number) and the call fails; `timeout` None: no limit. The report is framed by its length; a report already
in the socket when a deadline passes is read, not lost (a child that ended right at the limit is not reported as
failed).

A marked child's limit is its own first: `fn` calls progress() when it starts writing and after each piece it
wrote, and progress.ended() once its work is safe (its last fsync returned). `then` s without a progress(), a
SIGALRM in the child raises TemporaryError 4.3.0 out of what `fn` was doing, so `fn`'s own failure path runs (the
mbox append truncates the file back and removes its dotlock) and the child reports that error. The caller has it
killed (SIGKILL) only as a last resort: when no progress was heard for `then` + `grace` s (a write in an
uninterruptible wait, where no handler runs; what it wrote then stays). The child tells the caller of its
progress at most every `grace`/2 s (a frame on its socket), so it always has `grace`/2 s to undo its work. With
`then`, the child's timer runs from its start too: `timeout` s without a first progress() raise TemporaryError
4.3.0 (`cannot DOING as USER: not started writing within Ns`) out of what it was doing (a stat hung after the
dotlock was made: its failure path removes the dotlock), and the caller has it killed only `grace` s after
`timeout`. The helper and its children ignore SIGTERM, SIGINT and SIGHUP: a stop of the server's process group
(systemd, docker) does not end a child mid-append: one whose caller is gone ends its work, or rolls it back when
its next progress frame finds no reader, and the helper ends once its children have (forker's docstring).

A killed child is reaped by the helper; one the helper has not reaped within REAP_WAIT s (a wait the kernel does
not interrupt, even for SIGKILL), or one that reported but has not ended within REAP_WAIT s, is logged and counted
until the helper says it ended: the caller's thread is freed either way. While STUCK_LIMIT of them are counted
(process-wide), call_as starts no more children and fails at once, logged once every STUCK_LOG_EVERY s (every retry
of every message to a file on a hung mount would add one, until the helper could fork no more).

The helper ending (killed, out of memory) under a call: its children get SIGALRM (PR_SET_PDEATHSIG: a marked one's
work rolls back, or goes on when it has no `then`; a read ends), the calls fail 4.3.0 unless their child still
reported whole, and the next call starts a new helper (logged once every forker.RESTART_LOG_EVERY s). After
stop_helper() (or the server's end: its request socket's end of file) the helper takes no call and ends once its
children have, which may be after the server has ended: a marked child within its own limits (its write ends, or
rolls back at its next progress frame or its timer; without `then`, never cut), a read within `timeout` (+ `grace`
for a marked child); it never outlives them. A call after the last server's stop_helper() (each server's start
called open_helper(); the helper is theirs together) starts no helper: it fails at once.

Failure behaviour: `TemporaryError` 4.3.0 when `user` does not exist or is root (`refusing to DOING as USER: uid
0`), when the child gave no answer within `timeout` (`cannot DOING as USER: no answer within Ns, the child was
killed`, N: `timeout` + `grace` for a marked child with `then`; past `then` + `grace` after a progress(): `cannot
DOING as USER: writing made no progress for Ns, nor ended Gs later, the child was killed`), when the child stopped
itself (`… not started writing within Ns`, `… writing made no progress for Ns`), when `fn` raised anything but a
DeliveryError (`cannot DOING as USER: reason`), when `fn` or `args` cannot be pickled (`cannot DOING as USER:
reason`), when the helper ended under the call (`cannot DOING as USER: the helper forking its children ended`), did
not answer (`… did not answer within Ns`) or could not fork (`… cannot start the child: reason`), after
stop_helper() (`cannot DOING as USER: the helper forking its children was stopped (the server's stop)`), when `keep` is
longer than MAX_KEEP (`cannot DOING as USER: N descriptors to keep, at most M`), or when STUCK_LIMIT killed
children have not ended (`cannot DOING as USER: N children stuck in uninterruptible waits`, no child started); a
DeliveryError raised by `fn` is raised again here with its permanence, status and text.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import pickle
import pwd
import select
import signal
import socket
import struct
import threading
import time
from functools import partial
from typing import Callable

from mailflow.errors import DeliveryError, PermanentError, TemporaryError
from mailflow.transports.local.forker import MAX_FDS, Child, Forker, HelperGone, die_with_parent

log = logging.getLogger("mailflow.local")

RESULT, DELIVERY_ERROR, OTHER_ERROR = b"R", b"D", b"E"
MARK = b"M"  # a frame of its own, before the report: a marked child's progress (`marked`)
LOG = b"L"  # a frame of its own, before the report: a line the child logged, its level first
CALL_AS_TIMEOUT = 60.0  # seconds a child may take (a .forward or :include: read: milliseconds when all is well)
KILL_GRACE = 30.0  # seconds past a marked child's own limit before the caller kills it (it undoes its work meanwhile)
REAP_WAIT = 10.0  # seconds a killed (or reported) child is waited for before it is counted as stuck (the helper
#                   reaps it in milliseconds: seconds on a loaded machine, which must not count it as stuck)
STUCK_LIMIT = 8  # children counted as stuck past which no child is started
STUCK_LOG_EVERY = 60.0  # seconds between two logs of a call refused for them
MAX_KEEP = MAX_FDS - 2  # descriptors a child may keep (`keep`; its socket and its control socket go with them)
_LENGTH = struct.Struct("!Q")  # the report's length, before it


def rights_for(rights: str | None, default_privs: str) -> str | None:
    """See the module docstring."""
    return (rights or default_privs) if os.geteuid() == 0 else None


def call_as(user: str, doing: str, fn: Callable[..., bytes], *args,
            timeout: float | None = CALL_AS_TIMEOUT, marked: bool = False, then: float | None = None,
            grace: float = KILL_GRACE, keep: tuple[int, ...] = (), queue_id: str = "") -> bytes:
    """See the module docstring."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise TemporaryError("4.3.0", f"cannot {doing} as {user}: no such user") from None
    if pw.pw_uid == 0:
        raise TemporaryError("4.3.0", f"refusing to {doing} as {user}: uid 0")
    what = f"{doing} as {user}"
    if len(keep) > MAX_KEEP:
        raise TemporaryError("4.3.0", f"cannot {what}: {len(keep)} descriptors to keep, at most {MAX_KEEP}")
    _STUCK.refuse_when_full(what)
    first = None if timeout is None else timeout + (grace if marked and then is not None else 0)
    after_mark = (None if then is None else then + grace) if marked else 0.0  # (None: its write is never cut)
    order = _pickled(what, keep, os.getgrouplist(user, pw.pw_gid), pw.pw_gid, pw.pw_uid, doing, user, fn, args,
                     timeout, marked, then, grace)
    work, child_end = socket.socketpair()
    with contextlib.closing(work):
        try:
            child = _launched(what, (child_end.fileno(), *keep), _modules_of(fn, args), first, after_mark)
        finally:
            child_end.close()
        try:
            report = _answer(work.fileno(), order, first, after_mark, queue_id)
        except BaseException:
            child.kill()
            child.close()
            raise
    if report is None or report == MARK:  # past a deadline: the child is killed (a hung read ends with SIGKILL)
        child.kill()
        _reap(child, what, "SIGKILL")
        if report == MARK:
            raise TemporaryError("4.3.0", f"cannot {what}: writing made no progress for {then:g}s, nor ended "
                                          f"{grace:g}s later, the child was killed")
        raise TemporaryError("4.3.0", f"cannot {what}: no answer within {first:g}s, the child was killed")
    status = _reap(child, what, "its report")
    if not report:
        reason = "the helper forking its children ended" if status is None else "the child process failed"
        raise TemporaryError("4.3.0", f"cannot {what}: {reason}")
    kind, data = report[:1], report[1:]
    if status is not None and os.waitstatus_to_exitcode(status) != 0:  # killed while it wrote: its report may lie
        kind = b""
    if kind == RESULT:
        return data
    if kind == DELIVERY_ERROR:
        permanence, dsn, text = data.decode("utf-8", "replace").split(" ", 2)
        raise (PermanentError if permanence == "P" else TemporaryError)(dsn, text)
    reason = data.decode("utf-8", "replace") if kind == OTHER_ERROR else "the child process failed"
    raise TemporaryError("4.3.0", f"cannot {what}: {reason}")


def _pickled(what: str, *order) -> bytes:
    """The child's order (see child_main); TemporaryError 4.3.0 when `fn` or its arguments cannot be sent."""
    try:
        return pickle.dumps(order, pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - pickle raises what the object's reduction raises
        raise TemporaryError("4.3.0", f"cannot {what}: {e}") from None


def _launched(what: str, fds: tuple[int, ...], modules: tuple[str, ...], first: float | None,
              after_mark: float | None) -> Child:
    """A child of the helper given `fds`; TemporaryError 4.3.0 when the helper is gone (started again next time),
    refused the child, or `fds` are too many."""
    try:
        return _FORKER.launch(fds, modules, first, after_mark)
    except (HelperGone, OSError, ValueError) as e:
        raise TemporaryError("4.3.0", f"cannot {what}: {e}") from None


def _modules_of(*sent) -> tuple[str, ...]:
    """The modules of the functions the child unpickles (`fn`, and those in its arguments: a partial's, a
    HeldEntry's build; in tuples, lists and objects' attributes, three levels down): the helper imports them
    once, before it forks, not each child (a test's module: a second and more)."""
    found: dict[str, None] = {}
    pending = [(one, 0) for one in sent]
    while pending:
        one, depth = pending.pop()
        if isinstance(one, (str, bytes, bytearray, memoryview, int, float)) or depth > 3:
            continue
        if isinstance(one, partial):
            pending.extend((part, depth + 1) for part in (one.func, *one.args, *one.keywords.values()))
        elif isinstance(one, (tuple, list)):
            pending.extend((part, depth + 1) for part in one)
        elif callable(one) and isinstance(module := getattr(one, "__module__", None), str):
            found[module] = None
        elif isinstance(attributes := getattr(one, "__dict__", None), dict):
            pending.extend((part, depth + 1) for part in attributes.values())
    return tuple(found)


def _answer(fd: int, order: bytes, first: float | None, after_mark: float | None, queue_id: str) -> bytes | None:
    """The child's report to `order` (see _framed_report): b"" when it ended before it read the order."""
    try:
        _send_frame(fd, order)
    except OSError:
        return b""
    return _framed_report(fd, None if first is None else time.monotonic() + first, after_mark, queue_id)


def _reap(child: Child, what: str, after: str) -> int | None:
    """The child's wait status once the helper reaped it, within REAP_WAIT s; None when the helper ended first, or
    when it has not ended by then (a wait the kernel does not interrupt, even for SIGKILL): counted as stuck."""
    if child.done_within(REAP_WAIT):
        return child.status()
    log.error("the child %d (%s) has not ended %gs after %s (an uninterruptible wait): it is reaped when it ends",
              child.pid, what, REAP_WAIT, after)
    _STUCK.leave(child)
    return None


class Progress:
    """A marked child's clock (see the module docstring): `progress()` each time the work moves (the first: it
    starts), `progress.ended()` once it is safe. Made in the child, after the fork: with a limit (`then`), its
    timer runs from here, `start` s until the first progress() (`late` raised past them), `then` s after each.
    `gone`: the helper's pid and what is raised when the alarm is the helper's end (PR_SET_PDEATHSIG), not the timer.
    """

    def __init__(self, fd: int, then: float | None, grace: float, stalled: str, start: float | None, late: str,
                 gone: tuple[int, str]):
        self._fd, self._then, self._every = fd, then, grace / 2
        self._helper, self._gone = gone
        self._late, self._stalled = late, stalled  # (raised before the first progress(), and after it)
        self._started = False
        self._told = -math.inf  # (time.monotonic) when the caller last heard of progress
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
            if os.getppid() != self._helper:
                raise TemporaryError("4.3.0", self._gone)
            raise TemporaryError("4.3.0", self._stalled if self._started else self._late)


class _StuckChildren:
    """The killed children not reaped yet (see the module docstring): each done once the helper reaped it (or
    ended)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: list[Child] = []
        self._logged = -math.inf  # (time.monotonic) when a refusal was last logged

    def refuse_when_full(self, what: str) -> None:
        with self._lock:
            stuck = self._count()
            if stuck < STUCK_LIMIT:
                return
            now, log_it = time.monotonic(), False
            if now - self._logged >= STUCK_LOG_EVERY:
                self._logged, log_it = now, True
        if log_it:
            log.error("%s refused: %d killed children have not ended (uninterruptible waits: a hung file system?); "
                      "no child is started until they do (logged once every %gs)", what, stuck, STUCK_LOG_EVERY)
        raise TemporaryError("4.3.0", f"cannot {what}: {stuck} children stuck in uninterruptible waits")

    def leave(self, child: Child) -> None:
        with self._lock:
            self._children.append(child)

    def _count(self) -> int:
        """(under the lock) those not ended yet; the others closed and forgotten."""
        for child in [c for c in self._children if c.done_within(0)]:
            child.close()
            self._children.remove(child)
        return len(self._children)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count()


_STUCK = _StuckChildren()  # (process-wide, as the children are)


def _framed_report(fd: int, deadline: float | None, after_mark: float | None = None,
                   queue_id: str = "") -> bytes | None:
    """The child's report (each frame its length first; in the child: its order), b"" when the socket ends before
    it is whole (the child died), None when `deadline` (time.monotonic; None: none) passes first. Each MARK frame
    before it puts the deadline `after_mark` s on (None: none), and MARK is returned when that one passes first.
    What is in the socket when a deadline passes is read first."""
    late = None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    received = bytearray()
    while True:
        if len(received) >= _LENGTH.size and len(received) >= (end := _LENGTH.size + _LENGTH.unpack_from(received)[0]):
            frame = bytes(received[_LENGTH.size:end])
            del received[:end]
            if frame[:1] == LOG:
                _log_line(frame[1:], queue_id)
                continue
            if frame != MARK:
                return frame
            deadline, late = (None if after_mark is None else time.monotonic() + after_mark), MARK
            continue
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        if left is not None and not poller.poll(left * 1000):
            return late
        chunk = os.read(fd, 65536)
        if not chunk:
            return b""
        received += chunk


def _log_line(frame: bytes, queue_id: str) -> None:
    """A line the child logged (see _FrameHandler), logged here at its level, after `queue_id` when there is one."""
    level, _, text = frame.decode("utf-8", "replace").partition(" ")
    log.log(int(level) if level.isdigit() else logging.WARNING, "%s%s", f"{queue_id}: " if queue_id else "", text)


class _FrameHandler(logging.Handler):
    """In a child: each line logged goes to the caller as a frame (LOG, its level, its text), which it logs as its
    own; a log descriptor inherited would be the one the helper started with, stale after a logrotate."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send_frame(self._fd, LOG + f"{record.levelno} {record.getMessage()}".encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - a line that cannot be told must not fail the work
            pass


def child_main(given: list[int], helper: int) -> None:
    """In a child of the helper: its order read from its socket (given[0]); the descriptors it was given put back
    at the numbers they have in the server (its order names them), every other closed; its log lines sent as
    frames; then identity switched, `fn` called, its report written, exit."""
    try:
        order = _framed_report(given[0], None)  # (its one frame, from the caller)
        if not order:
            raise EOFError("the order was cut short")
        keep, groups, gid, uid, doing, user, fn, args, timeout, marked, then, grace = pickle.loads(order)
        work_at = _place(given[0], given[1:], keep)
    except BaseException as e:  # noqa: BLE001 - reported as fn's own failure would be
        _report_and_exit(given[0], partial(_raise, e))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_FrameHandler(work_at))
    root.setLevel(logging.INFO)
    if marked and then is None:  # (no timer to roll its write back: the helper's end must not cut it either)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)

    def work() -> bytes:  # (a Progress made here: whatever it raises is reported, and the child exits)
        if not marked:
            return _switched(groups, gid, uid, fn, args, helper)
        stalled = f"cannot {doing} as {user}: writing made no progress for {then or 0:g}s"
        late = f"cannot {doing} as {user}: not started writing within {timeout or 0:g}s"
        gone = f"cannot {doing} as {user}: the helper forking its children ended"
        progress = Progress(work_at, then, grace, stalled, timeout, late, (helper, gone))
        try:
            return _switched(groups, gid, uid, partial(fn, writing=progress), args, helper)
        finally:  # (the timer stopped before the report: an attempt that wrote nothing may end near the limit)
            try:
                progress.ended()
            except TemporaryError:  # its alarm came after the work ended, before ended() disarmed it: the
                progress.ended()    # work's own result stands (an EFBIG stays 5.2.2), the timer is stopped

    _report_and_exit(work_at, work)


def _raise(e: BaseException) -> bytes:
    raise e


def _place(work: int, given: list[int], numbers: tuple[int, ...]) -> int:
    """In the child: `given` moved to `numbers` (the server's numbers for them, which its arguments name), every
    other descriptor but stdin, stdout, stderr and its socket `work` closed (the helper's request socket, other
    children's); the number `work` is at now."""
    above = max((work, *given, *numbers, 2)) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for fd in (work, *given)]
    low = 3
    for fd in sorted(moved):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    for fd, number in zip(moved[1:], numbers):
        os.dup2(fd, number)
        os.close(fd)
    return moved[0]


def _switched(groups: list[int], gid: int, uid: int, fn: Callable[..., bytes], args: tuple, helper: int) -> bytes:
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    die_with_parent(helper)  # (the switch cleared it)
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


# process-wide, as the stuck children's count; its helper started at the first call, its children run child_main
_FORKER = Forker(f"{__name__}.child_main")


def stop_helper() -> None:
    """A server's stop. The last started server's: the helper told to end (blocks up to forker.STOP_WAIT s: off the
    event loop) and a later call_as refused, 4.3.0, until open_helper(): a helper started after the stop would
    outlive the server. Another server of the process still started: nothing (the helper is theirs too)."""
    _FORKER.stop()


def open_helper() -> None:
    """A server's start: one more user of the helper (started at the first call); call_as taken (again)."""
    _FORKER.open()
