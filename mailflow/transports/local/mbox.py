"""mbox delivery: Postfix local(8)'s mailbox file delivery (mail_copy + mbox_open), as functions.

- `mailbox_location(local_config, user) -> (path, kind, home)`: where a local user's mailbox is (normalised),
  whether it is a "maildir" or an "mbox" file, and the user's home when it is a home mailbox (Postfix
  home_mailbox / mail_spool_directory rules, see the function).
- `mbox_entry(content, sender=…, arrival=…, prepend=…) -> Iterator[bytes]`: one mbox entry (From_ line, the
  prepended lines, the message with LF line ends and mboxrd quoting, a blank line), made chunk by chunk from a
  mailflow.content.Content (mailflow.transports.encode), so a big message is never held whole;
  `format_mbox_entry(content: bytes, …) -> bytes` is the same entry at once, for small messages and tests.
- `mboxrd_unquote(text) -> bytes`: the reverse of the quoting, for readers and tests.
- `append_mbox(path, entry, locks=…, lock_timeout=…)`: append one entry (bytes, or an iterable of chunks such
  as mbox_entry's, consumed in the worker) durably under the configured locks.
- `held_message(content)`: the queued message read through descriptors the calling thread opens (for a child
  writing as a user, who may not open the queue's files); 4.3.0 "error reading message" when they cannot be.

How an append works: attempts, each in one worker thread (`asyncio.to_thread`; as root for a /file destination, in a
child forked there with the user's rights), until one has the locks or `lock_timeout` (20 s like Postfix's
deliver_lock_attempts x deliver_lock_delay) has passed. An attempt opens the file's directory, creating it (a
mailbox's; not that of a /file destination); for a system user's home mailbox (`home`) the home following links
(it is the administrator's: `<maildir_base>/<user>`, made 0700 for the user when missing), then below it without
following a symbolic link, as a Maildir's (measured before: a user who made `Mail` in its home a link to a
directory only root may write got `Mail/inbox` created there, its own, with the mail in it); a mailbox in the
shared mail_spool_directory is not walked so (the spool stays the operator's, as Postfix's local(8) writes
spool mailboxes as root), only the file is the user's; then, through that directory, opens the file
O_RDWR|O_APPEND|O_CREAT|O_NOFOLLOW (mode 0600; O_WRONLY when it may not be read) and tries each
lock once, in the order given, without waiting; when one is held by someone else, lets go of those it took and
ends; else checks that the path still names the file it holds, notes its size, writes the entry and fsyncs.
Between attempts the delivery waits on the event loop (5 ms doubling up to 100 ms; 50 ms up to 1 s when each
attempt forks), holding no thread and no lock: a mailbox locked for ever by another program costs its own
delivery 20 s and a deferral, never a worker thread that the other deliveries, the queue's writes and smtpd
need (measured: 8 mailboxes locked by another process made a delivery to a ninth wait 19.7 s while each held one
of the 6 threads; now 0.0 s). Any failure while writing truncates the file back to the size it had, before the
locks are released, as Postfix's mail_copy does, so a reader that takes the locks never sees a partial entry. An
append as the user (a /file destination) that stops making progress (`write_limit`) fails the same way: its
child's own timer interrupts it and the roll back runs; the child is killed only when even that did not end
(asuser.call_as: a write the kernel does not interrupt), and only then may the file keep what was written. The
kernel locks go with the descriptor; the dotlock is removed last. A process killed outright (SIGKILL) runs no roll
back: the entry is gathered into writes of WRITE_BATCH (256 KB), so an entry up to that size is one write(2), whole
or cut only inside that call (before, the From_ line was a write of its own and a kill after it left an empty
message: bench/killhunt.py); a bigger entry can still be left cut, and a dotlock left by the kill holds the mailbox
for STALE_LOCK_TIME, as with Postfix's local(8) killed while it writes. An append to a file that does not end in a
newline (such a cut entry) writes one first, so the retry's From_ line starts a line and a reader sees it (it was
glued to the cut line: the retried copy read as the cut one's body; Postfix's mail_copy does not look).

Lock styles (Postfix mailbox_delivery_lock), tried in the order given. Every program that writes the mailbox must
use the same styles. The order only decides which lock is tried first: mailflow never waits while holding one (a
busy lock lets go of those taken, see "How an append works"), so it cannot wait for another writer that waits for
it, whatever the order (the review of this design raced a writer holding an fcntl read lock while it waited for the
dotlock, as Dovecot does, against 10 appends: with "dotlock, fcntl" and with "fcntl, dotlock" every entry was
written once). It mattered when mailflow held its locks while waiting: then "dotlock, fcntl" made most of 10
deliveries racing 10 `doveadm save` runs time out. The default, fcntl then dotlock, is Debian's policy. (Postfix's
own mbox_open always takes the dotlock first, whatever the order of the setting.)
- "fcntl": a POSIX write lock on the whole file. On Linux it is taken as an open-file-description lock
  (F_OFD_SETLK), which conflicts with every other process's fcntl()/lockf() lock exactly like a classic one but
  also excludes the other threads of this process (classic POSIX locks belong to the process, so two deliveries
  in our own worker threads would both "hold" it). Elsewhere `fcntl.lockf` is used.
- "flock": flock(2), per open file description.
- "dotlock": `<path>.lock` created with O_EXCL; a lock file whose mtime is older than `stale_lock_time`
  (500 s, Postfix's default) is removed as stale. Postfix looks at the ctime; the mtime is what liblockfile
  looks at, and what a holder refreshes with touch.
Every try is non-blocking (see "How an append works" for the waits between attempts).

Failures (exceptions from mailflow.errors, with Postfix's mbox_open/mbox_dsn as the reference). Each text is the
reason in Postfix's words (safe_open's, mbox_open's, mail_copy's), without the destination: the local agent puts
local(8)'s "cannot update mailbox PATH for user USER. " or "cannot append message to file PATH: " before it.
- a lock another holder keeps for all of `lock_timeout`: TemporaryError 4.2.0 "unable to create lock file
  PATH.lock: File exists" (dot_lockfile's words) or "unable to lock for exclusive access: Resource temporarily
  unavailable" (deliver_flock's);
- a dotlock that cannot be made for another reason: TemporaryError 4.2.0 "unable to create lock file …: <why>";
  for a /file destination (`file_destination`) only a warning, and the file is written without it, as local(8)'s
  MBOX_DOT_LOCK_MAY_FAIL (an alias's file in a directory its writer may not write);
- the final path component is a symbolic link ("file is a symbolic link"), a directory ("cannot open file: Is a
  directory"), not a regular file ("destination PATH is not a regular file", local/mailbox.c's; a FIFO without a
  reader opened write-only, when the file may not be read: "cannot open file: No such device or address", as
  Postfix's), or a file with more than one hard link ("file has N hard links"): PermanentError 5.2.0. Postfix's
  safe_open refuses these (bar root-owned symlinks, a Solaris exception we do not need) and local(8) bounces them
  with 5.2.0: the mailbox is unusable until someone fixes it, and following a link
  someone planted is how mail gets written over another file;
- with `file_destination`, a file with an execute bit: PermanentError 5.7.1 "file is executable", as local(8)
  refuses to append to a program;
- with `owner`, a mailbox another uid owns: TemporaryError 4.2.0 "destination … is not owned by recipient",
  Postfix's strict_mailbox_ownership text (someone must fix the owner; meanwhile the mail waits). One that a
  concurrent delivery has just created and not yet given to the owner (empty, ours) is waited for instead;
- the file replaced while being locked: TemporaryError 4.2.0 "target file status changed unexpectedly";
- an OS error, its status as mbox_dsn maps it: EDQUOT / EFBIG (a quota or the file size limit; `size_limit` too)
  PermanentError 5.2.2, ENOSPC TemporaryError 4.3.0; any other TemporaryError 4.2.0 where Postfix's local(8)
  bounces it (5.2.0 for safe_open's and mbox_open's steps, 5.3.0 for mail_copy's write): a permission or a disk the
  operator can fix, the mail waits for it. Its text says the step: "error writing message: <why>" (mail_copy),
  "cannot create file exclusively: <why>" / "cannot open file: <why>" (safe_open; the former too for a file whose
  directory is missing, the latter for one whose directory cannot be opened, a file standing in its place "Not a
  directory"), "unable to lock for exclusive access: <why>" (a kernel lock failing otherwise than busy: ENOLCK on
  NFS), "cannot change file ownership: <why>" (safe_open), "bad open file status: <why>" (an fstat), "error
  closing file: <why>" (a close: EIO at an NFS write-back);
- the queued message that cannot be read: TemporaryError 4.3.0 "error reading message: <why>" (mail_copy's
  words; it defers only EAGAIN and ESTALE so, and bounces the rest 5.3.0: mailflow keeps the mail).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator, Literal, NamedTuple, cast

from mailflow.config import DEFAULTS, LocalConfig
from mailflow.content import Content, Held
from mailflow.errors import DeliveryError, PermanentError, TemporaryError
from mailflow.syntax import mask_control
from mailflow.transports.encode import FinalNewline, ToLf, encode, mboxrd_quoting
from mailflow.transports.local.asuser import CALL_AS_TIMEOUT, Progress, call_as
from mailflow.transports.maildir import MessageUnreadable, Owner, open_directory, read_message
from mailflow.uncut import SettleLate, settling_late, uncut

log = logging.getLogger("mailflow.mbox")

LockStyle = Literal["fcntl", "flock", "dotlock"]
MailboxKind = Literal["maildir", "mbox"]

MAILER_DAEMON = "MAILER-DAEMON"  # the From_ line's sender for the null sender (Postfix MAIL_ADDR_MAIL_DAEMON)
DEFAULT_LOCK_TIMEOUT = 20.0  # Postfix: deliver_lock_attempts (20) x deliver_lock_delay (1s)
STALE_LOCK_TIME = 500.0  # Postfix stale_lock_time
# bytes of an entry gathered before a write(2): an entry up to this size is one write, so a process killed outright
# (SIGKILL: no roll back runs) leaves it whole, or cut only inside that one call, never a From_ line alone
WRITE_BATCH = 256 * 1024
NEWBORN_WAIT = 1.0  # how long a mailbox another delivery is creating for its owner may stay ours (_open_mailbox)
FILE_START_TIMEOUT = CALL_AS_TIMEOUT  # seconds an append as the user may take to open and lock (then killed: 4.3.0)
_FIRST_POLL, _MAX_POLL = 0.005, 0.1  # seconds between two attempts at the locks: first, at most
_FIRST_FORKED_POLL, _MAX_FORKED_POLL = 0.05, 1.0  # the same when each attempt forks a child (Postfix: 1 s apart)
_LOCK_STYLES: tuple[LockStyle, ...] = ("fcntl", "flock", "dotlock")

_QUOTED_FROM_LINE = re.compile(rb"^>(>*From )", re.MULTILINE)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")


# ------------------------------------------------------------------------------------------- where


class MailboxLocation(NamedTuple):
    path: Path  # absolute, normalised (no '..': what is compared with `home` is what is opened)
    kind: MailboxKind
    home: Path | None  # a home mailbox's home (the user's part starts there); None in mail_spool_directory


def mailbox_location(local: LocalConfig, user: str) -> MailboxLocation:
    """Where `user`'s mailbox is, as Postfix local(8) decides it (mailbox_command aside):

    - `home_mailbox` set: `<home>/<home_mailbox>`, a Maildir when it ends in "/", else an mbox file; the home
      is `<maildir_base>/<user>/` (mailflow's homes);
    - `home_mailbox` "": `<mail_spool_directory>/<user>`, an mbox file, or a Maildir `<dir>/<user>/` when
      mail_spool_directory ends in "/".
    `user` is a bare local user name (no "/", not "." or ".."), as the alias stage gives it."""
    if not user or "/" in user or user in (".", ".."):
        raise ValueError(f"{user!r} is not a local user name")
    if local.home_mailbox:
        kind: MailboxKind = "maildir" if local.home_mailbox.endswith("/") else "mbox"
        home = _normal(Path(local.maildir_base) / user)
        return MailboxLocation(_normal(home / local.home_mailbox), kind, home)
    kind = "maildir" if local.mail_spool_directory.endswith("/") else "mbox"
    return MailboxLocation(_normal(Path(local.mail_spool_directory) / user), kind, None)


def _normal(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


# ------------------------------------------------------------------------------------------- format


def mbox_entry(content: Content, *, sender: str, arrival: float, prepend: bytes = b"") -> Iterator[bytes]:
    """One mbox entry: `From <sender>  <asctime>`, `prepend` (whole lines, e.g. Return-Path and Delivered-To),
    the message, then an empty line so that the next From_ line starts after a blank line.

    The From_ line is Postfix's: the envelope sender with its local part quoted when it is not a dot-atom
    (MAILER-DAEMON for the null sender), two spaces, and `arrival` (seconds since the epoch) as asctime() in
    local time (`Wed Nov  2 05:11:55 2026`). Postfix writes the time of the delivery: pass the clock's now
    for that.

    CRLF line ends become LF (mbox files are LF text, as Postfix writes them); a message that does not end in
    a newline gets one. Quoting is mboxrd: every line matching `^>*From ` gets one more '>'. Postfix writes
    mboxo (only `From ` lines are quoted), which a reader cannot undo: a body line `>From x` and a quoted
    `From x` look the same. mboxrd can be undone exactly (`mboxrd_unquote`), and what an mboxo reader shows
    of it differs from Postfix's output only on lines that already started with '>'.
    """
    yield from_line(sender, arrival)
    yield from encode(content.prepend(prepend).chunks(), ToLf(), mboxrd_quoting(), FinalNewline())
    yield b"\n"


def format_mbox_entry(content: bytes, *, sender: str, arrival: float, prepend: bytes = b"") -> bytes:
    """`mbox_entry` of a message in memory, as one bytes object."""
    return b"".join(mbox_entry(Content.of(content), sender=sender, arrival=arrival, prepend=prepend))


def from_line(sender: str, when: float) -> bytes:
    who = _quote_local_part(mask_control(sender)) if sender else MAILER_DAEMON
    return f"From {who}  {time.asctime(time.localtime(when))}\n".encode("utf-8")


def mboxrd_unquote(text: bytes) -> bytes:
    """Remove one '>' from every line matching `^>+From ` (the reverse of format_mbox_entry's quoting)."""
    return _QUOTED_FROM_LINE.sub(rb"\1", text)


def _quote_local_part(address: str) -> str:
    """`a b@example.com` -> `"a b"@example.com` (Postfix quote_822_local); dot-atoms and quoted ones stay."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if _DOT_ATOM.fullmatch(local) or (len(local) >= 2 and local.startswith('"') and local.endswith('"')):
        return address
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{quoted}@{domain}" if at else quoted


# ------------------------------------------------------------------------------------------- append


class HeldEntry(NamedTuple):
    """An entry the writing thread builds (`build(content)`) from `content` read through descriptors that thread
    opens (Content.held: the queue's files, which a child running as another user may not open) and closes when its
    attempt ends. Opened by the caller instead, they were closed when a cancelled delivery stopped waiting while
    the thread went on writing: the next file opened took a descriptor's number, and its bytes went into the
    mailbox as the message's."""

    content: Content
    build: Callable[[Content], Iterable[bytes]]


async def append_mbox(path: Path, entry: bytes | Iterable[bytes] | HeldEntry, *,
                      locks: tuple[LockStyle, ...] = DEFAULTS.local.mailbox_delivery_lock,
                      lock_timeout: float = DEFAULT_LOCK_TIMEOUT, stale_lock_time: float = STALE_LOCK_TIME,
                      user: str | None = None, owner: tuple[int, int] | None = None, size_limit: int = 0,
                      create_parents: bool = True, file_destination: bool = False, home: Path | None = None,
                      workers: Callable[[Callable[[], LockStyle | None]], Awaitable[LockStyle | None]] | None = None,
                      write_limit: float | None = None, queue_id: str = "", settle_late: SettleLate | None = None,
                      late_results: Callable[[], list] = list) -> None:
    """Append `entry` (from format_mbox_entry) to the mbox file at `path`, durably, under `locks` (taken in
    that order), or raise a DeliveryError (TemporaryError / PermanentError, see the module docstring). A failed
    append is truncated back (see the module docstring). With `user` (mailflow running as root) each attempt runs in a
    child (forked by asuser's helper process) with that user's uid, gid and groups: the file system checks its rights.
    With `owner` (uid, gid: the recipient's, mailflow running as root) a mailbox created here is given to it,
    and an existing one that another uid owns is not written: TemporaryError 4.2.0 (Postfix's
    strict_mailbox_ownership); with `home` too (a home mailbox: the user's home, `<maildir_base>/<user>`), the home
    is opened following links (made 0700 for `owner` when missing) and the directories below it without following
    a symbolic link (4.2.0 "symbolic link … not followed"), made for `owner` (0700) when missing, as a Maildir's
    are; a mailbox not below `home` is refused (4.2.0). With `size_limit` (bytes, Postfix mailbox_size_limit) an
    entry that would make the file bigger is not kept: PermanentError 5.2.2, as the EFBIG of
    Postfix's file size limit.
    `create_parents`: make the missing directories above the file (a mailbox), or not (a /file destination an
    alias or .forward names: a missing directory is an OS error, TemporaryError 4.2.0). `file_destination`: local(8)'s
    rules for a /file: an existing file with an execute bit is not written, PermanentError 5.7.1 ("file is
    executable"), and a dotlock that cannot be made (not busy: a directory the writer may not write) is only warned
    about.
    `workers(call)`: runs each attempt in a thread of the caller's own pool instead of the default executor's (a
    file that never answers then holds one of those threads, never one that the queue and smtpd share).
    `queue_id`: keys the warning of a stop that cuts a stuck append off (mailflow.uncut), and the lines a child
    writing as `user` logs. `settle_late` (DeliveryRequest.settled_late): an attempt the stop cuts off past
    UNCUT_LIMIT is left to end, and `late_results()` (the recipient's result once appended) handed on when it
    appended the entry (uncut.settling_late); a stop's cancel between two attempts (a lock busy) goes through at once.
    `write_limit`: with `user`, the seconds the child's write may go without progress (a piece of the entry
    written, the fsync) before it is rolled back: 4.3.0 (None: no limit; asuser.call_as's `then`). A HeldEntry is
    built in the writing thread, each attempt, from descriptors that attempt opens, keeps open in the child
    (asuser.call_as's `keep`) and closes at its end; a queue file that cannot be opened is 4.3.0."""
    if len(set(locks)) != len(locks) or not set(locks) <= set(_LOCK_STYLES):
        raise ValueError(f"lock styles {locks!r}: each of {', '.join(_LOCK_STYLES)} at most once")
    rest = (tuple(locks), stale_lock_time, owner, size_limit, create_parents, file_destination, home)
    warn_no_dotlock = True  # (until an attempt has reached the dotlock: its may-fail warning is given once)

    def attempt() -> LockStyle | None:  # (in a worker thread)
        with _built(entry) as (body, keep):
            if user is None:
                return _append_once(Path(path), body, *rest, warn_no_dotlock)
            return _append_once_as(user, write_limit, keep, queue_id, Path(path), body, *rest, warn_no_dotlock)

    deadline = time.monotonic() + lock_timeout
    delay, most = (_FIRST_POLL, _MAX_POLL) if user is None else (_FIRST_FORKED_POLL, _MAX_FORKED_POLL)
    # (each attempt uncut: a stop's cancel waits for it, so an entry written is handed on as delivered: mailflow.uncut)
    late = None if settle_late is None else settling_late(
        settle_late, lambda busy: late_results() if busy is None else [])  # (a lock found busy: nothing appended)
    while (busy := await uncut(asyncio.to_thread(attempt) if workers is None else workers(attempt),
                               f"{queue_id}: the append to {path}", late=late)) is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _busy(Path(path), busy)
        warn_no_dotlock = warn_no_dotlock and not _past_dotlock(locks, busy)
        await asyncio.sleep(min(delay, left))  # (no thread waits: see the module docstring)
        delay = min(delay * 2, most)


@contextlib.contextmanager
def _built(entry: bytes | Iterable[bytes] | HeldEntry) -> Iterator[tuple[bytes | Iterable[bytes], tuple[int, ...]]]:
    """(the entry, the descriptors it reads through) for one attempt, in the attempt's own thread."""
    if not isinstance(entry, HeldEntry):
        yield entry, ()
        return
    with held_message(entry.content) as held:
        yield _Built(entry.build, held.content), held.descriptors


@dataclass(frozen=True)
class _Built:
    """A HeldEntry's chunks, built where they are read: in the child writing as a user (asuser.call_as sends it its
    arguments pickled; a generator cannot be), or in the writing thread."""

    build: Callable[[Content], Iterable[bytes]]
    content: Content

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.build(self.content))


@contextlib.contextmanager
def held_message(content: Content) -> Iterator[Held]:
    """The queued message read through descriptors this thread opens and closes (Content.held: a child writing as
    a user may not open the queue's files); 4.3.0 mail_copy's "error reading message" when they cannot be opened.
    A part in memory that is a view (of smtpd's buffer) is held as bytes: the child gets its arguments pickled."""
    with contextlib.ExitStack() as opened:
        try:
            held = opened.enter_context(content.held())
        except OSError as e:
            raise TemporaryError("4.3.0", f"error reading message: {e.strerror or e}") from None
        if any(isinstance(part, memoryview) for part in held.content.parts):
            parts = (bytes(part) if isinstance(part, memoryview) else part for part in held.content.parts)
            held = Held(Content(parts, crlf=held.content.crlf), held.descriptors)
        yield held


def _past_dotlock(locks: tuple[LockStyle, ...], busy: LockStyle) -> bool:
    """Whether an attempt that found `busy` held had tried the dotlock before it (made it, or warned that it could
    not: a retry of a busy kernel lock warned again each time, 25 times in 20 s, where Postfix warns once)."""
    return "dotlock" in locks and locks.index("dotlock") < locks.index(busy)


def _busy(path: Path, style: LockStyle) -> TemporaryError:
    """The lock another holder kept for the whole lock_timeout, in dot_lockfile's and deliver_flock's words."""
    if style == "dotlock":
        return TemporaryError("4.2.0", f"{_dotlock_failed(dotlock_path(path))}: {os.strerror(errno.EEXIST)}")
    return TemporaryError("4.2.0", f"unable to lock for exclusive access: {os.strerror(errno.EAGAIN)}")


def _append_once_as(user: str, write_limit: float | None, keep: tuple[int, ...], queue_id: str,
                    *args) -> LockStyle | None:
    """`_append_once` with `user`'s rights, in a child process asuser.call_as has its helper fork (this thread waits);
    its DeliveryError comes back as itself, the lock it found busy as its name. A child that has not started writing
    within FILE_START_TIMEOUT s (a file whose open, lock or stat never answers) is stopped by its own timer (the
    dotlock it made removed: 4.3.0 "not started writing"), with `write_limit` set; killed KILL_GRACE s later. Once
    it writes, a write or fsync that makes no progress for `write_limit` s (its thread is the caller's, and a hung
    one held it until a restart) is interrupted by the child's own timer and rolled back (truncated, the dotlock
    removed: 4.3.0 "writing made no progress"); the child is killed only asuser.KILL_GRACE s after that, when
    the roll back itself hangs (then the file may keep what was written). The child's log lines (a dotlock it
    could not make) are keyed by `queue_id`."""
    busy = call_as(user, "write", _appended, *args, timeout=FILE_START_TIMEOUT, marked=True,
                   then=write_limit, keep=keep, queue_id=queue_id).decode("ascii")
    return cast(LockStyle, busy) if busy else None


def _appended(*args, writing: Progress | None = None) -> bytes:
    return (_append_once(*args, writing=writing) or "").encode("ascii")


def _append_once(path: Path, entry: bytes | Iterable[bytes], locks: tuple[LockStyle, ...], stale_lock_time: float,
                 owner: tuple[int, int] | None = None, size_limit: int = 0, create_parents: bool = True,
                 file_destination: bool = False, home: Path | None = None, warn_no_dotlock: bool = True, *,
                 writing: Progress | None = None) -> LockStyle | None:
    """One attempt at the append: open the mailbox, try each lock once, write. None once written; the style of
    the first lock another holder has (every lock taken is let go again, nothing written) for a later attempt.
    The mailbox, its dotlock and the check that it is still there are all reached through one descriptor of its
    directory (`_open_folder`). `writing`: told of the write's progress (`_write_or_roll_back`). `warn_no_dotlock`:
    warn of a /file's dotlock that cannot be made (False: an earlier attempt of this delivery did)."""
    try:
        folder = _open_folder(path.parent, owner, home, create_parents)
    except OSError as e:  # (safe_open's words, as its open of the path fails so: ENOENT at the create, else the open)
        doing = "cannot create file exclusively" if e.errno == errno.ENOENT else "cannot open file"
        raise _os_error(e, doing) from None
    try:
        return _append_in(folder, path, entry, locks, stale_lock_time, owner, size_limit, file_destination, writing,
                          warn_no_dotlock)
    except DeliveryError:
        raise
    except OSError as e:  # (an fstat of the open file, which Postfix's safe_open finds fatal, in its words)
        raise _os_error(e, "bad open file status") from None
    finally:
        os.close(folder)


def _append_in(folder: int, path: Path, entry: bytes | Iterable[bytes], locks: tuple[LockStyle, ...],
               stale_lock_time: float, owner: tuple[int, int] | None, size_limit: int,
               file_destination: bool, writing: Progress | None = None, warn_no_dotlock: bool = True,
               ) -> LockStyle | None:
    """`_append_once` in the mailbox's directory, `folder`."""
    fd = _open_mailbox(path, owner, file_destination, folder)
    dotlocked = False
    try:
        for style in locks:
            if style == "dotlock":
                made = _try_dotlock(path, stale_lock_time, folder, may_fail=file_destination, warn=warn_no_dotlock)
                taken = made is not None
                if made is not None and made >= 0:
                    dotlocked = True  # (before its close: a close hung on NFS, stopped by the timer, removes it too)
                    _close(made, f"error closing lock file {dotlock_path(path)}")
            else:
                taken = _try_kernel_lock(fd, style)
            if not taken:
                return style
        _check_still_the_mailbox(fd, path, folder)
        _write_or_roll_back(fd, path, entry, size_limit, writing)
        return None
    finally:
        try:
            _close(fd, "error closing file")  # releases the fcntl/flock locks
        finally:  # (a close that fails, EIO at NFS write-back, or stopped by the timer, removes it too: mbox_release)
            if dotlocked:
                _remove_dotlock(path, folder)


def _open_folder(folder: Path, owner: tuple[int, int] | None, home: Path | None, create: bool) -> int:
    """A descriptor of the mailbox's directory. With `owner` and `home` (a system user's home mailbox, as root;
    the user owns its home, so it could make a directory there a link to anywhere): the home following links,
    then each directory below it opened without following a symbolic link, a missing one made 0700 for the owner
    (maildir.open_directory), as Postfix's local(8) reaches a home mailbox with the user's rights; one not below
    the home is refused (OSError EPERM). Otherwise the directory the path names, made when missing and `create`."""
    if owner is not None and home is not None:
        return open_directory(folder, Owner(owner[0], owner[1], home, home=True))
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # (a file in its place: what an open through it says)
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder)) from None
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_mailbox(path: Path, owner: tuple[int, int] | None = None, file_destination: bool = False,
                  folder: int | None = None) -> int:
    """The mailbox opened for appending, created 0600 if missing (and given to `owner`); never through a
    symlink, never a directory, a special file, a file with other hard links, with `owner` a file another
    uid owns or, with `file_destination`, an executable file. O_NONBLOCK keeps a FIFO planted there from
    hanging us. A mailbox another delivery of this server is creating for `owner` at this moment (empty, still
    ours until its fchown) is waited for, up to NEWBORN_WAIT, instead of being refused as another uid's. `folder`:
    a descriptor of its directory (None: the path is opened as it is)."""
    deadline = time.monotonic() + NEWBORN_WAIT
    while True:
        fd, created = _open_or_create(path, folder)
        try:
            if created and owner is not None:
                _chown(fd, owner)
            st = os.fstat(fd)
            wait = owner is not None and _newborn(st, owner) and time.monotonic() < deadline
            if not wait:
                _check_mailbox(path, st, owner, file_destination)
        except BaseException:
            os.close(fd)
            raise
        if not wait:
            return fd
        os.close(fd)
        time.sleep(_FIRST_POLL)


def _chown(fd: int, owner: tuple[int, int]) -> None:
    try:
        os.fchown(fd, *owner)
    except OSError as e:
        raise _os_error(e, "cannot change file ownership") from None  # (safe_open's words)


def _close(fd: int, doing: str) -> None:
    """Close `fd`; its error (EIO at an NFS write-back) told as `doing: <why>`."""
    try:
        os.close(fd)
    except OSError as e:
        raise _os_error(e, doing) from None


def _newborn(st: os.stat_result, owner: tuple[int, int]) -> bool:
    """A mailbox someone of our uid has just created for `owner` and not yet given away (empty, ours)."""
    return st.st_uid != owner[0] and st.st_uid == os.geteuid() and st.st_size == 0 and stat.S_ISREG(st.st_mode)


def _check_mailbox(path: Path, st: os.stat_result, owner: tuple[int, int] | None, file_destination: bool) -> None:
    """Raise the DeliveryError that forbids appending to this file (see `_open_mailbox`), if any."""
    if not stat.S_ISREG(st.st_mode):
        raise PermanentError("5.2.0", f"destination {path} is not a regular file")  # (local/mailbox.c's words)
    if st.st_nlink != 1:
        raise PermanentError("5.2.0", f"file has {st.st_nlink} hard links")
    if file_destination and st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        raise PermanentError("5.7.1", "file is executable")
    if owner is not None and st.st_uid != owner[0]:  # (qmgr logs the deferral, with the queue id)
        raise TemporaryError("4.2.0", f"destination {path} is not owned by recipient")


def _at(path: Path, folder: int | None) -> str:
    """What names `path` for a call given dir_fd=`folder`: its last component in that directory, else itself."""
    return path.name if folder is not None else str(path)


def _open_or_create(path: Path, folder: int | None = None) -> tuple[int, bool]:
    """(fd, whether this call created the file)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (read: its last byte)
    doing = "cannot create file exclusively"  # (safe_open's words for each step)
    try:
        try:
            return os.open(_at(path, folder), flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=folder), True
        except FileExistsError:
            doing = "cannot open file"
        try:
            return os.open(_at(path, folder), flags, dir_fd=folder), False
        except PermissionError:  # a file we may write but not read: appended to without the look at its end
            return os.open(_at(path, folder), flags & ~os.O_RDWR | os.O_WRONLY, dir_fd=folder), False
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PermanentError("5.2.0", "file is a symbolic link") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # (ENXIO: a FIFO without a reader)
            raise PermanentError("5.2.0", f"cannot open file: {e.strerror}") from None
        raise _os_error(e, doing) from None


def _try_kernel_lock(fd: int, style: LockStyle) -> bool:
    try:
        if style == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif hasattr(fcntl, "F_OFD_SETLK"):
            # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid}: whole file, pid 0.
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise _os_error(e, "unable to lock for exclusive access") from None  # (ENOLCK on NFS: deliver_flock's words)
    return True


def dotlock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _try_dotlock(path: Path, stale_lock_time: float, folder: int | None, may_fail: bool = False,
                 warn: bool = True) -> int | None:
    """Create `<path>.lock`: its descriptor, for the caller to close once it has noted the lock as its own (the
    close of a new file can hang on NFS), -1 when it cannot be made and `may_fail` (a /file destination in a
    directory the user may not write: warned about and written without it, as mbox_open's
    MBOX_DOT_LOCK_MAY_FAIL; `warn`: that warning given); or None: it is there, removed when stale for the next
    attempt."""
    lock = dotlock_path(path)
    try:
        return os.open(_at(lock, folder), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=folder)
    except FileExistsError:
        try:
            _break_stale_dotlock(lock, stale_lock_time, folder)
        except OSError as e:  # (another user's stale lock in a sticky directory: EPERM, dot_lockfile gives up)
            return _no_dotlock(lock, e, may_fail, warn)
        return None
    except OSError as e:
        return _no_dotlock(lock, e, may_fail, warn)


def _no_dotlock(lock: Path, e: OSError, may_fail: bool, warn: bool) -> int:
    """-1 (written without the dotlock, warned when `warn`) when `may_fail`, else the deferral of a dotlock that
    cannot be made."""
    if may_fail:
        if warn:
            log.warning("%s: %s", _dotlock_failed(lock), e.strerror)
        return -1
    raise _os_error(e, _dotlock_failed(lock)) from None


def _dotlock_failed(lock: Path) -> str:
    """dot_lockfile's words for `lock` not made (a reason follows)."""
    return f"unable to create lock file {lock}"


def _break_stale_dotlock(lock: Path, stale_lock_time: float, folder: int | None) -> None:
    """Remove `lock` when nobody has touched it for stale_lock_time (its holder is presumed dead)."""
    try:
        age = time.time() - os.stat(_at(lock, folder), dir_fd=folder, follow_symlinks=False).st_mtime
        if age > stale_lock_time:
            os.unlink(_at(lock, folder), dir_fd=folder)
            log.warning("removed stale lock file %s (%.0f s old)", lock, age)
    except FileNotFoundError:
        pass


def _remove_dotlock(path: Path, folder: int | None) -> None:
    try:
        os.unlink(_at(dotlock_path(path), folder), dir_fd=folder)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.error("cannot remove lock file %s: %s", dotlock_path(path), e.strerror)


def _check_still_the_mailbox(fd: int, path: Path, folder: int | None) -> None:
    """The file we locked is still the one at `path` (nobody removed or replaced it while we waited: some
    POP servers write a new mailbox and rename it over the old one)."""
    held = os.fstat(fd)
    try:
        now = os.stat(_at(path, folder), dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    if now is None or held.st_nlink != 1 or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise TemporaryError("4.2.0", "target file status changed unexpectedly")  # (mbox_open's words)


def _write_or_roll_back(fd: int, path: Path, entry: bytes | Iterable[bytes], size_limit: int = 0,
                        progress: Progress | None = None) -> None:
    """Append `entry` and fsync, or truncate the file back to its size and raise. `progress`: called before the
    first write and after each write(2) (its limit is on the time between two), ended after the fsync (an
    interruption after that would undo a whole entry reported as failed: a second copy at the retry)."""
    size = os.fstat(fd).st_size
    try:
        gathered = bytearray(b"" if _ends_a_line(fd, size) else b"\n")  # (a cut entry's retry starts a line)
        end = size + len(gathered)
        if progress is not None:
            progress()
        for chunk in (entry,) if isinstance(entry, bytes) else read_message(entry):
            end += len(chunk)
            if size_limit and end > size_limit:  # what RLIMIT_FSIZE does to Postfix's write
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            if len(chunk) >= WRITE_BATCH:  # (big: written as it is, never copied; the entry is over a batch anyway)
                _write_all(fd, gathered, progress)
                _write_all(fd, chunk, progress)
                gathered = bytearray()
                continue
            gathered += chunk
            if len(gathered) >= WRITE_BATCH:
                _write_all(fd, gathered, progress)
                gathered = bytearray()
        _write_all(fd, gathered, progress)
        os.fsync(fd)
        if progress is not None:  # (an alarm before this rolls the whole entry back: the failure it reports is true)
            progress.ended()
    except BaseException as e:  # (OSError: the write, or reading the message's spool file)
        try:  # (an alarm pending since a write blocked past the limit is handled here, in ended(): it raises)
            if progress is not None:
                progress.ended()  # (the roll back is not interrupted: only the parent's last resort stops it)
        finally:  # (the timer is one-shot and its handler disarms itself first: nothing interrupts this)
            _truncate(fd, path, size)
        if isinstance(e, MessageUnreadable):  # (the queued message's spool file, not the mailbox: mail_copy's 4.3.0)
            raise TemporaryError("4.3.0", e.strerror or str(e)) from None
        if isinstance(e, OSError):
            raise _os_error(e, "error writing message") from None
        raise


def _ends_a_line(fd: int, size: int) -> bool:
    """Whether the file is empty or ends in a newline (or cannot be read: opened write-only). An entry a crash cut
    off (a kill between two writes of a big one, the power) ends inside a line: the next From_ line would be glued
    to it, and a reader would take the retried copy for part of the cut one's body."""
    if size == 0:
        return True
    try:
        return os.pread(fd, 1, size - 1) == b"\n"
    except OSError as e:
        if e.errno == errno.EBADF:
            return True
        raise


def _write_all(fd: int, data: bytes | bytearray, progress: Progress | None) -> None:
    """`data` written whole (write(2) may take part of it; through a view: never copied), `progress` told after
    each write; nothing for no data."""
    rest = memoryview(data)
    while rest:
        rest = rest[os.write(fd, rest):]
        if progress is not None:
            progress()


def _truncate(fd: int, path: Path, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        log.error("cannot truncate mailbox %s back to %d bytes after a failed write: %s", path, size, e.strerror)


def _os_error(e: OSError, doing: str) -> DeliveryError:
    """`doing: <the error>` with mbox_dsn's status: a quota or the file size limit bounces 5.2.2, a full disk
    defers 4.3.0, anything else defers 4.2.0 (Postfix bounces that one 5.2.0, or 5.3.0 for mail_copy's write: see
    the module docstring)."""
    text = f"{doing}: {e.strerror or e}"
    if e.errno in (errno.EDQUOT, errno.EFBIG):
        return PermanentError("5.2.2", text)
    if e.errno == errno.ENOSPC:
        return TemporaryError("4.3.0", text)
    return TemporaryError("4.2.0", text)

