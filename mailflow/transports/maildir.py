"""Maildir delivery (Postfix virtual(8); local(8) writes its mailboxes with `MaildirWriter` too, and its `/dir/`
destinations with `write_maildir_file` in a child running as the user: mailflow.transports.local.maildir_file).

`MaildirWriter(clock).write(maildir, prefix, content)`: one message file, durably: `prefix` (whole LF lines) then
the content (a mailflow.content.Content) with LF line ends, converted chunk by chunk as it is written, so a big
message is never held whole; raises OSError (MessageUnreadable when the content's spool file cannot be read).
`MaildirTransport(locate, clock=…, relay=…)`: `locate(recipient) -> Path | None` finds the Maildir.
- `virtual_maildirs(base, rewriter)`: `<virtual_mailbox_base>/<virtual_mailbox_maps value>`; the value must
  end in "/" (Maildir) and stay inside the base.
Per recipient: write `Return-Path`, `X-Original-To` and `Delivered-To` then the message, with LF line endings
(the mailbox convention, as Postfix writes it) into `tmp/`, fsync the file, rename it into `new/`, fsync
`new/`. Only then is the recipient SENT (once the rename is done it is SENT even when that last fsync fails:
logged as a warning, never written twice; Postfix does not fsync the directory). The file work runs in a
worker thread. A stop's cancel waits for it (mailflow.uncut), UNCUT_LIMIT s at most; past that the write is left to
end, and its recipient's result handed on (DeliveryRequest.settled_late): recorded when it ends while qmgr records
the results back, else the recipient stays queued.
Quota (`quota(recipient) -> bytes`, 0 = none): the sizes of the files in new/ and cur/ plus the new message
(counted as queued, with its CRLF line ends: the file is at most that big) may not exceed it; over quota bounces 5.2.2,
or defers 4.2.2 when `overquota_bounce` is False. Success reads "delivered to maildir", as virtual(8) logs it (the path
is not named). Ownership (`owner(recipient) -> (uid, gid)`, Postfix virtual_uid_maps / virtual_gid_maps): directories
created below `base` (virtual_mailbox_base) are made 0700 and given to that uid and gid, the message file 0600 likewise,
every directory opened without following a symbolic link; without maps, what is created belongs to mailflow's
own user (directories 0700, files 0600). Giving a file away needs root (or CAP_CHOWN): otherwise the delivery
defers 4.2.0 naming the error.
Failures: an unknown virtual user bounces (5.1.1); a table that cannot answer or a map value mailflow
cannot use defers (4.3.0 / 4.3.5); an OS error defers (4.2.0: a permission the operator can fix; a full disk
4.3.0, as Postfix's mbox_dsn),
except a file system quota or file size limit (EDQUOT, EFBIG): a full mailbox, 5.2.2 as Postfix says (4.2.2 when
`overquota_bounce` is False) - `write_failure(error)` is that mapping, which local(8)'s Maildirs share
(with `warn_unsynced`, the warning of a message in new/ whose directory could not be fsynced). Its
texts are virtual(8)'s and local(8)'s, "maildir delivery failed: " then the step ("create maildir file PATH",
tmp/'s file or its link into new/, "error writing message", "error reading message") and the reason. The quota's
text is mailflow's own ("mailbox … is full: USED + SIZE bytes > quota QUOTA"): Postfix's virtual(8) has no quota of
its own to word it.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import weakref
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from typing import TYPE_CHECKING, AsyncIterator, BinaryIO, Callable, Iterable, Iterator, TypeVar

from mailflow import address
from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.errors import TemporaryError
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.transports.encode import ToLf, encode
from mailflow.uncut import Late, SettleLate, settling_late, uncut

if TYPE_CHECKING:  # (local imports this module: at run time the name is only an annotation)
    from mailflow.transports.local.asuser import Progress

Locate = Callable[[str], "Path | None"]
log = logging.getLogger("mailflow.maildir")
W = TypeVar("W")  # a write's result (what its new/ not synced was)
R = TypeVar("R")


def virtual_maildirs(base: str | Path, rewriter) -> Locate:
    root = Path(base)

    def locate(recipient: str) -> Path | None:
        path = rewriter.virtual_mailbox(recipient)  # LookupRetry (a TemporaryError) propagates
        if path is None:
            return None
        if not path.endswith("/"):
            raise TemporaryError("4.3.5",
                                 f"virtual_mailbox_maps gives {path!r}: only Maildirs (ending in /) are supported")
        base = Path(os.path.abspath(root))
        maildir = Path(os.path.normpath(base / path))  # not resolved: the write opens no symbolic link (Owner)
        if not maildir.is_relative_to(base):
            raise TemporaryError("4.3.5", f"virtual_mailbox_maps gives {path!r}, outside virtual_mailbox_base")
        return maildir

    return locate


class MaildirWriter:
    """Unique Maildir file names (time, pid, a counter, the host) and the durable write, in a worker thread."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._seq = count()

    async def write(self, maildir: Path, prefix: bytes, content: Content, owner: "Owner | None" = None,
                    size_limit: int = 0, *, queue_id: str = "", settle_late: SettleLate | None = None,
                    late_results: Callable[[], list[RcptResult]] = list) -> None:
        """`size_limit` (bytes, 0 = none; local's mailbox_size_limit): a bigger file raises OSError EFBIG. Once the
        file is in new/ the message is delivered: a failed fsync of new/ after it is a warning (keyed by
        `queue_id`), not an error: a retry would deliver a second copy (Postfix never fsyncs the directory). The
        write is not cut by a cancel (a stop's): it ends, and its result is handed on first (mailflow.uncut).
        `settle_late` (DeliveryRequest.settled_late): a write the stop cuts off past UNCUT_LIMIT is left to end, and
        `late_results()` (the recipient's result once written) handed on when it is in new/ (uncut.settling_late)."""
        name = self.unique_name()

        def written(unsynced: OSError | None) -> None:
            if unsynced is not None:
                warn_unsynced(queue_id, maildir, name, str(unsynced.strerror or unsynced))
        written(await uncut(asyncio.to_thread(write_maildir_file, maildir, name, prefix, content, owner, size_limit,
                                              queue_id=queue_id), f"{queue_id}: the write of {maildir}/new/{name}",
                            late=written_late(settle_late, written, late_results)))

    def unique_name(self) -> str:
        """A file name for a new message: no other this process gives is the same."""
        now = self._clock.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._seq)}.{self._host}"


def written_late(settle_late: SettleLate | None, written: Callable[[W], None],
                 late_results: Callable[[], list[R]]) -> Late | None:
    """The `late` of a Maildir write's uncut (none without `settle_late`): past a stop's cut-off the write is left
    to end, its end told to `written` (the warning of a new/ not synced) and `late_results()` handed on
    (uncut.settling_late)."""
    if settle_late is None:
        return None

    def made(unsynced: W) -> list[R]:
        written(unsynced)
        return late_results()
    return settling_late(settle_late, made)


def warn_unsynced(queue_id: str, maildir: Path, name: str, why: str) -> None:
    """The message is in new/, so delivered, but new/ could not be fsynced after it: a warning keyed by the queue
    id, not a failure (a retry would deliver a second copy; Postfix never fsyncs the directory)."""
    log.warning("%s: maildir %s: new/%s delivered, but new/ could not be synced to disk: %s",
                queue_id or "NOQUEUE", maildir, name, why)


def write_failure(e: OSError, *, bounce_full: bool = True) -> tuple[Outcome, str, str]:
    """What an OS error writing a Maildir (MaildirWriter.write's: its step and reason) means for the recipient, as
    Postfix's mbox_dsn maps it: a quota or the file size limit (EDQUOT, EFBIG) is a full mailbox, 5.2.2 (deferred
    4.2.2 when not `bounce_full`); a full disk (ENOSPC) defers 4.3.0; anything else defers 4.2.0 (a permission the
    operator can fix; for "create maildir file" Postfix's virtual(8) defers 4.2.0 too and its local(8) bounces
    5.2.0, for mail_copy's "error writing message" both bounce 5.3.0); the queued message that cannot be read
    (MessageUnreadable) defers 4.3.0, mail_copy's "error reading message" (which bounces 5.3.0 but for EAGAIN and
    ESTALE). The text is local(8)'s and virtual(8)'s: "maildir delivery failed: create maildir file …: Permission
    denied", "…: error writing message: File too large"; a missing mail spool's is spool_missing's alone."""
    if isinstance(e, SpoolMissing):
        return Outcome.DEFERRED, "4.2.0", e.strerror or str(e)
    text = f"maildir delivery failed: {e.strerror or e}"
    if isinstance(e, MessageUnreadable):
        return Outcome.DEFERRED, "4.3.0", text
    if e.errno in (errno.EDQUOT, errno.EFBIG):
        return (Outcome.BOUNCED, "5.2.2", text) if bounce_full else (Outcome.DEFERRED, "4.2.2", text)
    dsn = "4.3.0" if e.errno == errno.ENOSPC else "4.2.0"
    return Outcome.DEFERRED, dsn, text


def mailbox_prefix(sender: str, delivered_to: str, original: str = "") -> bytes:
    """The lines a mailbox copy starts with (LF line ends, as mailbox files keep them), in Postfix's order:
    Return-Path, X-Original-To (`original`: the recipient as the client gave it, before aliases and
    rewriting, its needless quotes dropped as Postfix drops them; none when empty) and Delivered-To."""
    original_to = f"X-Original-To: {address.shown_original(original)}\n" if original else ""
    return f"Return-Path: <{sender}>\n{original_to}Delivered-To: {delivered_to}\n".encode("utf-8")


def maildir_size(maildir: Path) -> int:
    """Bytes of the messages in new/ and cur/ (missing folders count as empty)."""
    total = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as entries:
                total += sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            pass
    return total


class MaildirTransport:
    program = "virtual"  # the Postfix delivery agent whose name its result lines are logged under

    def __init__(self, locate: Locate, *, clock: Clock, relay: str = "virtual",
                 quota: Callable[[str], int] = lambda recipient: 0, overquota_bounce: bool = True,
                 owner: Callable[[str], tuple[int | None, int | None]] | None = None, base: str | Path = ""):
        """`owner(recipient) -> (uid, gid)` (None: mailflow's own) for what is created below `base`."""
        self._locate = locate
        self._relay = relay
        self._writer = MaildirWriter(clock)
        self._quota = quota
        self._overquota_bounce = overquota_bounce
        self._owner = owner
        self._base = Path(os.path.abspath(base)) if base else None

    def _owner_of(self, recipient: str) -> "Owner | None":
        """Raises LookupRetry."""
        if self._owner is None or self._base is None:
            return None
        uid, gid = self._owner(recipient)
        if uid is None and gid is None:
            return None
        return Owner(-1 if uid is None else uid, -1 if gid is None else gid, self._base)

    delivers_each = True  # one recipient after another: qmgr records each result as it comes (`deliver_each`)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        return await DeliveryReport.gathered(request.recipients, self.deliver_each(request))

    async def deliver_each(self, request: DeliveryRequest) -> AsyncIterator[RcptResult]:
        """Each recipient's result as its file is written, one after another (qmgr records each at once)."""
        for rcpt in request.recipients:
            yield await self._deliver_one(request, rcpt)

    async def close(self) -> None:
        pass

    async def _deliver_one(self, request: DeliveryRequest, rcpt: Recipient) -> RcptResult:
        try:
            maildir = self._locate(rcpt.address)
        except TemporaryError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, e.dsn, e.text, relay=self._relay)
        if maildir is None:
            return RcptResult(rcpt, Outcome.BOUNCED, "5.1.1", f'unknown user: "{rcpt.address}"',  # virtual(8)'s
                              relay=self._relay)
        prefix = mailbox_prefix(request.sender, rcpt.address, rcpt.original or rcpt.address)
        try:
            refusal = await self._over_quota(rcpt, maildir, len(prefix) + request.content.size)
            if refusal is not None:
                return refusal
            await self._writer.write(maildir, prefix, request.content, self._owner_of(rcpt.address),
                                     queue_id=request.queue_id, settle_late=request.settled_late,
                                     late_results=lambda: [self._sent(rcpt)])
        except TemporaryError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, e.dsn, e.text, relay=self._relay)
        except OSError as e:
            outcome, dsn, text = write_failure(e, bounce_full=self._overquota_bounce)
            return RcptResult(rcpt, outcome, dsn, text, relay=self._relay)
        return self._sent(rcpt)

    def _sent(self, rcpt: Recipient) -> RcptResult:
        return RcptResult(rcpt, Outcome.SENT, "2.0.0", "delivered to maildir", relay=self._relay)  # virtual(8)'s

    async def _over_quota(self, rcpt: Recipient, maildir: Path, size: int) -> RcptResult | None:
        quota = self._quota(rcpt.address)  # LookupRetry propagates
        if not quota:
            return None
        used = await asyncio.to_thread(maildir_size, maildir)
        if used + size <= quota:
            return None
        text = f"mailbox {maildir} is full: {used} + {size} bytes > quota {quota}"
        if self._overquota_bounce:
            return RcptResult(rcpt, Outcome.BOUNCED, "5.2.2", text, relay=self._relay)
        return RcptResult(rcpt, Outcome.DEFERRED, "4.2.2", text, relay=self._relay)


def write_maildir_file(maildir: Path, name: str, prefix: bytes, content: Content, owner: Owner | None = None,
                       size_limit: int = 0, *, writing: Progress | None = None, queue_id: str = "") -> OSError | None:
    """The message into tmp/, fsynced, renamed into new/, new/ fsynced; returns the error of that last fsync (the
    message is delivered by then), None when it worked. With `owner`, the directories created (from `owner.base`
    down, through fds that never follow a symbolic link) and the file get that uid and gid. `writing` (a child's
    clock, asuser.Progress): told before the first write and after each piece, ended once the file is fsynced
    (then nothing interrupts the rename: a message renamed into new/ is never reported as failed); an
    interruption before that removes the file from tmp/ as any failure does (a removal that fails is warned about,
    keyed by `queue_id`; "" in call_as's child, whose caller keys its lines)."""
    creating = f"create maildir file {maildir / 'tmp' / name}"  # (the step of all before the write, in Postfix's words)
    with _step(creating):
        dir_fd = open_directory(maildir, owner)
    subs: dict[str, int] = {}
    try:
        with _step(creating):
            for sub in ("tmp", "new", "cur"):
                subs[sub] = _subdirectory(dir_fd, sub, owner, maildir / sub)
        fd = -1
        try:  # (the open in here: a child's timer going off right after it must not leave the file in tmp/)
            with _step(creating):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=subs["tmp"])
            with _step("error writing message"), os.fdopen(fd, "wb") as f:
                if owner is not None:
                    os.fchown(f.fileno(), owner.uid, owner.gid)
                _write_message(f, prefix, content, size_limit, writing)
            with _step(f"create maildir file {maildir / 'new' / name}"):  # (the link into new/: Postfix's words too)
                os.rename(name, name, src_dir_fd=subs["tmp"], dst_dir_fd=subs["new"])
        except BaseException as e:
            if writing is not None:
                writing.ended()  # (the unlink is not interrupted: only the parent's last resort stops it)
            if fd >= 0 or not isinstance(e, OSError):  # (an OSError of the open: no file of ours to remove)
                _remove_from_tmp(name, subs["tmp"], maildir, queue_id)
            raise
        try:
            os.fsync(subs["new"])
        except OSError as e:
            return e
        return None
    finally:
        for fd in (*subs.values(), dir_fd):
            os.close(fd)


def _remove_from_tmp(name: str, tmp_fd: int, maildir: Path, queue_id: str) -> None:
    """Never leave a message in tmp/, partial or not moved (Postfix's too). A file already gone (the Maildir is the
    user's: it may remove it) or one that cannot be removed is warned about, as Postfix's `remove %s: %m`, and the
    failure that brought us here stays the one told."""
    try:
        os.unlink(name, dir_fd=tmp_fd)
    except OSError as e:
        log.warning("%sremove %s: %s", f"{queue_id}: " if queue_id else "", maildir / "tmp" / name, e.strerror or e)


def _write_message(f: BinaryIO, prefix: bytes, content: Content, size_limit: int,
                   writing: Progress | None) -> None:
    """`prefix` then the content with LF line ends into `f`, flushed and fsynced (see write_maildir_file)."""
    def moved() -> None:
        if writing is not None:
            writing()

    moved()
    f.write(prefix)
    written = len(prefix)
    for chunk in encode(read_message(content.chunks()), ToLf()):
        written += len(chunk)
        if size_limit and written > size_limit:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        f.write(chunk)
        moved()
    f.flush()
    moved()
    os.fsync(f.fileno())
    if writing is not None:
        writing.ended()


@contextlib.contextmanager
def _step(doing: str) -> Iterator[None]:
    """An OSError in the block told as `doing: <its reason>` (local(8)'s and virtual(8)'s words for the step of
    a Maildir delivery that failed), its errno kept for write_failure."""
    try:
        yield
    except (MessageUnreadable, SpoolMissing):
        raise
    except OSError as e:
        raise OSError(e.errno, f"{doing}: {e.strerror or e}") from e


class MessageUnreadable(OSError):
    """The queued message could not be read (its spool file): mail_copy's "error reading message: <why>", which
    mailflow defers 4.3.0 whatever the errno (the mailbox is not at fault; Postfix bounces it 5.3.0 but for EAGAIN
    and ESTALE)."""


def read_message(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks` (the queued message's, read as they are taken), an OSError from reading them raised as
    MessageUnreadable, so that it is not taken for the mailbox's write failing."""
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            return
        except OSError as e:
            raise MessageUnreadable(e.errno, f"error reading message: {e.strerror or e}") from e
        yield chunk


@dataclass(frozen=True)
class Owner:
    """Who owns what a delivery creates below `base` (-1: leave that id as the process's). `base` is reached
    following symbolic links (the operator's: a link there is the administrator's); what is below it is opened
    without following one. With `home` (a local user's home, `<maildir_base>/<user>`, as Postfix's local(8)
    writes a home mailbox with the user's rights; or a spool Maildir `<spool>/<user>`) `base` is the owner's: made
    0700 for it when missing, followed when it is a symbolic link only if root owns the link (Postfix's safe_open
    rule), and it and every directory below it must be the owner's or root's (else OSError EPERM naming the path
    and its owner). With `spool` (the `<spool>/<user>` of a spool Maildir) the spool above it must exist: mailflow
    does not make it, as Postfix does not (the operator's, 1777 or 2775 root:mail); a home's `<maildir_base>` is
    made when missing. Without `home` (virtual_mailbox_base) `base` is made as mailflow when missing and stays
    mailflow's."""

    uid: int
    gid: int
    base: Path
    home: bool = False
    spool: bool = False


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY


def open_directory(maildir: Path, owner: Owner | None) -> int:
    """An fd of the Maildir directory, created if missing. Without an owner: as mkdir -p would, each directory
    made 0700. With one: `owner.base` opened following links (made when missing, see Owner), then each component
    below it created 0700 and given to the owner, and opened without following a symbolic link, so a link planted
    in a user's directories cannot send the write elsewhere: OSError ELOOP "symbolic link … not followed". Both
    paths are compared normalised (no '..'); a directory not below `owner.base` is never written for the owner:
    OSError EPERM naming both."""
    if owner is None:
        _make_dirs(maildir)
        return os.open(maildir, _DIRECTORY)
    base, target = Path(os.path.normpath(os.path.abspath(owner.base))), Path(os.path.normpath(os.path.abspath(maildir)))
    if not target.is_relative_to(base):
        raise OSError(errno.EPERM, f"{target} is not below {base}: not written for its owner")
    fd = _open_base(base, owner)
    here = base
    try:
        for part in target.relative_to(base).parts:
            here = here / part
            child = _subdirectory(fd, part, owner, here)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_dirs(path: Path) -> None:
    """`path` and the directories above it that are missing, each made 0700 (Postfix's make_dirs(path, 0700))."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(made, 0o700)


def _open_base(base: Path, owner: Owner) -> int:
    """An fd of `owner.base`, following links (a home's only when root owns it); made when missing (for the owner,
    0700, when it is a home: see Owner)."""
    if not owner.home:
        base.mkdir(parents=True, exist_ok=True)
        return os.open(base, _DIRECTORY)
    if not owner.spool:
        base.parent.mkdir(parents=True, exist_ok=True)
    elif not base.parent.is_dir():
        raise SpoolMissing(errno.ENOENT, spool_missing(base.parent))
    _make_for(owner, base)
    return _owned(_open_home(base), owner, base)


def spool_missing(spool: Path) -> str:
    """Why a spool mailbox cannot be delivered to when its spool directory is missing (mailflow, as Postfix, does
    not make it): the whole text of that deferral, a Maildir's (SpoolMissing, as write_failure tells it) and an
    mbox's alike (mailflow's own words: no step of Postfix's fails so)."""
    return f"mail spool directory {spool} does not exist (mailflow does not make it)"


class SpoolMissing(OSError):
    """A spool Maildir's mail_spool_directory is missing (`spool_missing`'s text): no step of the write, so told
    without one and without the attempt's file name."""


def _open_home(base: Path) -> int:
    """An fd of the directory `base` names, following it only when it is a symbolic link root owns (OSError EPERM
    naming the link's owner otherwise). Race-free: the name is opened once (O_PATH|O_NOFOLLOW), and that fd is the
    one whose owner is checked and whose text is read; a link's text never changes (replacing a link makes another
    one), and the target is opened relative to the link's own directory, as the kernel would follow it. A link
    swapped in after the check is never the one followed (an lstat then an open by name followed the new one)."""
    parent = os.open(base.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        named = os.open(base.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent)
        try:
            st = os.fstat(named)
            if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
                raise OSError(errno.EPERM, f"symbolic link {base} is owned by uid {st.st_uid}, not root: not followed")
            try:
                if stat.S_ISLNK(st.st_mode):
                    return os.open(os.readlink("", dir_fd=named), _DIRECTORY, dir_fd=parent)
                return os.open(".", _DIRECTORY, dir_fd=named)
            except OSError as e:  # (named as the user wrote it, not '.' or the link's text)
                raise OSError(e.errno, e.strerror, str(base)) from None
        finally:
            os.close(named)
    finally:
        os.close(parent)


class _DirectoryLock:
    """A lock of one directory being made and given away (weakly held: gone when no delivery holds it)."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


# The process's deliveries run in threads; a directory's make-and-give must not interleave with another delivery
# finding it made (it would make its Maildir in a directory not yet given away, which then is not the one just
# made). One lock per directory, so that a hung filesystem holds only its own directories' deliveries.
_MAKING: weakref.WeakValueDictionary[str, _DirectoryLock] = weakref.WeakValueDictionary()
_MAKING_GUARD = threading.Lock()


def _making(path: Path) -> _DirectoryLock:
    with _MAKING_GUARD:
        held = _MAKING.get(str(path))
        if held is None:
            held = _MAKING[str(path)] = _DirectoryLock()
        return held


def _make_for(owner: Owner, path: Path, name: str | Path | None = None, parent: int | None = None) -> None:
    """Make directory `name` (in `parent`, an fd; else `path`) 0700 and give it to `owner`, unless it exists. Given
    away through an fd of the name opened without following a link, and only when that fd is an empty directory of
    ours on the parent's filesystem: never chown by path, where whoever may write the parent could swap the new
    directory for a link, a hard link to a file, or another root-owned directory (one with content: another
    user's home being made, a spool Maildir made in advance) that root would give away (OSError EPERM). Made under
    a lock of the directory (`_making`): a delivery running alongside that finds it made waits until it was given
    away, so it cannot have content of ours yet (refusing then left the home root's 0700 for good)."""
    name = path if name is None else name
    held = _making(path)
    with held.lock:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            return
        fd = os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        try:
            made = os.fstat(fd)
            above = os.fstat(parent) if parent is not None else os.stat(Path(path).parent)
            if (not stat.S_ISDIR(made.st_mode) or made.st_uid != os.geteuid() or made.st_dev != above.st_dev
                    or os.listdir(fd)):
                raise OSError(errno.EPERM, f"{path} was replaced after it was made: not given to uid {owner.uid}")
            os.fchown(fd, owner.uid, owner.gid)
        finally:
            os.close(fd)


def _owned(fd: int, owner: Owner, path: Path) -> int:
    """`fd`, a home's directory (`path`), when it is the owner's or root's (an administrator's); else it is closed
    and OSError EPERM raised: another user's directory never receives the mail (Postfix, writing as the user, would
    fail on it)."""
    try:
        uid = os.fstat(fd).st_uid
        if owner.home and owner.uid >= 0 and uid not in (owner.uid, 0):
            raise OSError(errno.EPERM, f"{path} is owned by uid {uid}, neither uid {owner.uid} nor root")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _subdirectory(parent: int, name: str, owner: Owner | None, path: Path) -> int:
    """An fd of `parent/name` (`path`, for the error), made (0700, given to `owner`) when missing; with an owner a
    symbolic link there is not followed: OSError ELOOP "symbolic link … not followed", and in a home another
    user's directory is refused (`_owned`)."""
    if owner is not None:
        _make_for(owner, path, name, parent)
    else:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
    try:
        fd = os.open(name, _DIRECTORY | (os.O_NOFOLLOW if owner is not None else 0), dir_fd=parent)
    except OSError as e:  # (O_DIRECTORY | O_NOFOLLOW on a link: ENOTDIR on Linux, ELOOP elsewhere)
        if owner is None or e.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_link(parent, name):
            raise
        raise OSError(errno.ELOOP, f"symbolic link {path} not followed") from None
    return fd if owner is None else _owned(fd, owner, path)


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
