"""pickup: feeds the maildrop directory (what `mailflow sendmail` wrote) to cleanup (Postfix pickup(8)).

It owns `<queue_directory>/maildrop/` on the server side (made mode 1733 at start, logged when one of its own had
another mode: any local user may leave a file there, docs/operations.md "Local submission"),
`<queue_directory>/corrupt/` and the wake-up socket `<queue_directory>/public/pickup` (a UNIX datagram socket,
mode 0666 in a 0755 directory, whatever the umask; any datagram means "look now", like Postfix's public/pickup
FIFO; mailflow.maildrop.REQUEUED, "the store's requeued mail too", only from root or the server's user, as the
kernel names the sender: SO_PASSCRED). It scans the maildrop when it starts, on every wake-up (not sooner than
WAKE_GAP after the end of the last scan: any local user may send wake-ups, a stream of them costs one scan per
gap), and at least every `pickup_interval` (a periodic scan, due however many wake-up scans came meanwhile). For
each file, oldest first:

- it opens the file once (`mailflow.maildrop.open_maildrop`: never a symbolic link, FIFO or file with a second
  link) and validates its envelope, and reads the content from that open file only; a corrupt entry, or one whose
  owner is neither the uid it claims nor root nor mailflow's own user (a forged identity), is set aside, logged,
  and the scan goes on with the next file: another user's is removed (as Postfix's pickup removes a malformed
  file; so is one of theirs this process may not read), root's and mailflow's own are moved to `corrupt/` for
  inspection (NAME.N when corrupt/NAME is taken), an empty directory of theirs removed; what stays (a directory of
  another user that is not empty, left in place; a file that cannot be read or moved) is logged once, then tried
  again by the periodic scans only, silently;
- a file of another user (its owner, the kernel's word, neither root nor this process's user) may have been written
  without sendmail's checks: its login is taken from that uid's passwd entry, whatever the file says, and it must
  pass `authorized_submit_users` and `local_login_sender_maps` for its sender (`policy`, the configuration;
  mailflow.sendmail.identity's checks); else it is removed, never returned (a notice would go to a sender the user
  may not use), logged `pickup: maildrop/NAME: uid=N from=<S>: refused: user LOGIN REASON; removed`; a table that
  cannot answer (or anything unexpected) leaves it, and the other users' files after it, for the next scan
  (logged at once, then a count once a minute: `faults.FailureLog`), and so does a uid without a passwd entry (NSS
  may be down: pwd cannot tell) until the file is PASSWD_PATIENCE old (its mtime), then named
  `uid<N>` as sendmail does;
- a message bigger than `size_limit` (message_size_limit; 0: none) is not loaded: it is returned to its sender
  ("message file too big", 5.3.4, its header section quoted) and its file removed, as Postfix's cleanup does;
- the content is copied, streamed, into a spool of the queue (cleanup.new_spool: in memory when small, else a
  file), so that the submitter can no longer change what is queued; a file whose content is not the size its
  envelope says by then is corrupt;
- it builds a Submission (protocol "local", the submitting user as `LocalUser`); with non_smtpd_milters
  (`milters`, mailflow.filters.milter.NonSmtpdMilters) the milters see it first, as mail from localhost: a
  rejection returns it to its sender (below), a tempfail (or a milter that is down, with milter_default_action
  tempfail) leaves the file for the next scan, a discard removes it (logged), a quarantine queues it on hold,
  and their edits are what is queued; then it awaits `cleanup.submit`; only once cleanup has committed is the
  file removed. A crash between the commit and the unlink delivers the
  message twice after the restart: at-least-once, as in Postfix (a message is never lost);
- a message cleanup refuses for good (a mail loop 5.4.0, a header section too large 5.3.4) is returned to its
  sender, as Postfix's cleanup bounces for pickup through bounce(8) (quoting it without the fields of
  message_drop_headers, a Bcc never shown: Cleanup.without_dropped_fields), and its file removed: the notices are
  qmgr's for a bounce (`notices`, qmgr.notices.NoticeWriter: bounce_template_file's failure template,
  notify_classes' postmaster copy, for a null sender the whole message to double_bounce_recipient; dropped with
  a log line when none is called for); under soft_bounce it is not returned and its file stays, tried
  (and refused, logged) again at each periodic scan (`interval`; a wake-up by sendmail passes it by, so that a
  kept file costs no work and no log line per submission; a reload tries it at once), as Postfix's cleanup,
  unable to bounce it, leaves it in the maildrop;
- a temporary failure (a table that cannot answer, a full write backlog, anything unexpected) leaves the file
  where it is, logged; it is tried again at the next scan. Other files are not held up.
- a fault of the queue itself (the store locked, the disk full, a spool it may not write: `store_fault`; never
  the file's own, whoever its owner) ends the scan: the files stay, as Postfix's pickup keeps a file its cleanup
  could not write, and the scans back off (0.5 s doubling to 10 s; wake-ups do not cut the wait short), logged
  once a minute with a count (`faults.Guard`), until a scan gets through.
A scan then copies the messages an operator requeued (`mailflow queue requeue`: the store's maildrop queue,
mailflow/store/requeue.py), as Postfix's pickup copies the queue files postsuper -r moved into maildrop/: at the
start, on the tools' wake-up (`mailflow.maildrop.REQUEUED`) and at each periodic scan (a sendmail's wake-up does
not query the store), a page at a time, oldest first (one still in qmgr's hands, `in_hand`, waits for the end
of its attempt: while any does, or an active message an operator requeued has not reached the maildrop queue
yet, every scan looks again, at least every REQUEUE_RECHECK seconds), each through `cleanup.resubmit` (a new
queue id; the address rewriting, content checks and after-queue filter of now; no milters, as Postfix runs none
on requeued mail) with only its pending recipients; the copy replaces the old message in one transaction, and
pickup logs `NEW: uid=N from=<s> orig_id=OLD`. A message cleanup refuses for good now (a loop, a content check's
REJECT) is put on hold, logged, rather than lost; one whose queue rows hold values of the wrong kind (edited by
hand: store/damage.py) is moved to the corrupt queue with one warning naming it and what is wrong, as qmgr sets
such mail aside, never copied from stand-ins; a temporary failure leaves it for the next scan; a store fault ends
the scan as above.
The hidden temporary files of sendmail processes that died writing them (SIGKILL, a crash) and were not
touched for a day are removed at each scan, logged (Postfix's postsuper -p purges such leftovers).
The receive_override_options of `[smtpd]` (its own value, not a listener's overrides) apply to all of it, as
Postfix's main.cf receive_override_options applies to its pickup (pickup.c): `no_address_mappings` (no canonical,
masquerading, virtual alias or automatic BCC: the after-queue filter set-up, whose return listener maps the mail,
so that sendmail's mail gets its BCC copies once), `no_header_body_checks`, `no_milters` (non_smtpd_milters off);
requeued mail included, as Postfix's pickup gives the same flags to mail postsuper -r requeued.
A socket that cannot be bound (e.g. a path longer than the UNIX limit) is logged; the periodic scan still runs.
A maildrop/ or public/ that is not a directory (a symbolic link: whoever can write the queue directory could point
it at root's files) is never followed: the maildrop is not scanned, public/ neither chmodded nor listened on, each
logged once (checked with lstat: the queue directory itself must stay the server's and root's alone).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mailflow.clock import Clock
from mailflow.config import DEFAULTS, Config
from mailflow.content import Content
from mailflow.errors import ContentRejected, DeliveryError, LookupRetry, MessageTooBig, PermanentError, TemporaryError
from mailflow.faults import FailureLog, Guard
from mailflow.filters.milter import NonSmtpdMilters
from mailflow.maildrop import DIRECTORY_MODE as MAILDROP_MODE
from mailflow.maildrop import (REQUEUED, CorruptMaildrop, MaildropFile, MaildropMessage, make_maildrop_directory,
                               maildrop_names, open_maildrop, pickup_socket, remove_stale_temporaries)
from mailflow.logs import printable
from mailflow.message import HEADER_READ_LIMIT
from mailflow.model import (ClientInfo, Envelope, LocalUser, Outcome, QueuedMessage, QueueId, RcptResult, Recipient,
                            Submission)
from mailflow.stages.qmgr.notices import Notice, NoticeWriter
from mailflow.sendmail.identity import identity_of, passwd_identity, submit_problem
from mailflow.store import RequeuedMessage, RequeueGone, Store, store_fault
from mailflow.under_way import UnderWay

logger = logging.getLogger("mailflow.pickup")

DIRECTORY_MODE = 0o700
PUBLIC_MODE = 0o755
SOCKET_MODE = 0o666
REQUEUE_PAGE = 100  # requeued messages read per query
REQUEUE_RECHECK = 1.0  # seconds between scans while requeued mail waits for the end of its attempt
PASSWD_PATIENCE = 86400.0  # seconds a file of a uid without a passwd entry waits for one (NSS may be down)
SCAN_TURN = 256  # maildrop entries a scan goes through at most before it lets the event loop's other tasks run
WAKE_READS = 64  # datagrams read from public/pickup at most in one turn of the event loop
WAKE_GAP = 0.1  # seconds at least from the end of a scan to a scan a wake-up asks for (any user may send them)


class UnreadableMaildrop(Exception):
    """A maildrop file's content could not be read (`error`, from the file itself, never from the queue's spool)."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


async def _read_chunk(chunks: Iterator[bytes]) -> bytes | None:
    """The next chunk of a maildrop file's content (None at its end), read on a thread; UnreadableMaildrop when
    reading fails."""
    try:
        return await asyncio.to_thread(next, chunks, None)
    except OSError as e:
        raise UnreadableMaildrop(e) from e


class SubmitRefused(Exception):
    """A maildrop file of a user the policy does not let submit it (`reason` says which check)."""

    def __init__(self, uid: int, login: str, reason: str):
        super().__init__(reason)
        self.uid, self.login, self.reason = uid, login, reason


UCRED = struct.Struct("iII")  # Linux's struct ucred (pid, uid, gid): a datagram's sender, SCM_CREDENTIALS


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The uid the kernel gives for a datagram's sender (SO_PASSCRED); None without one."""
    credentials = getattr(socket, "SCM_CREDENTIALS", None)  # (Linux's)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == credentials and len(data) >= UCRED.size:
            return UCRED.unpack_from(data)[1]
    return None


def _trusted(uid: int | None) -> bool:
    """Whether `uid` is root or this process's user: their files are taken as they are, set aside to corrupt/ not
    removed, and their REQUEUED wake-ups count; every other user's are held to what that user may do."""
    return uid in (0, os.geteuid())


class Pickup:
    def __init__(self, queue_directory: Path, cleanup, *, myhostname: str, clock: Clock,
                 interval: float = DEFAULTS.sendmail.pickup_interval,
                 notices: NoticeWriter | None = None, size_limit: int = 0,
                 milters: NonSmtpdMilters | None = None, store: Store | None = None,
                 in_hand: Callable[[str], bool] | None = None, soft_bounce: bool = False,
                 receive_override_options: Sequence[str] = (), policy: Config | None = None):
        """`milters`: non_smtpd_milters (None: none); `store`: the queue whose requeued mail it copies (None:
        none); `in_hand` (required with a store: TypeError): whether qmgr still has a message (its attempt under
        way), which is not copied yet; `soft_bounce`: a refused message is not returned (see the module doc);
        `receive_override_options`: [smtpd]'s (see the module doc); `policy`: the configuration whose
        authorized_submit_users and local_login_sender_maps (and myorigin) the files of users other than root and
        this process's own are held to (None: every such file is refused); `notices`: how a refused file's
        notices are planned and written (qmgr's: bounce_template_file, notify_classes, bounce_size_limit; None:
        Postfix's built-in texts and the default [queue] settings)."""
        if store is not None and in_hand is None:  # (a default of "never" would copy mail under delivery)
            raise TypeError("Pickup: a store needs in_hand, qmgr's word on the messages it has in hand")
        self.maildrop = Path(queue_directory) / "maildrop"
        self.corrupt = Path(queue_directory) / "corrupt"
        self.socket_path = pickup_socket(queue_directory)
        self._cleanup = cleanup
        self._myhostname = myhostname
        self._clock = clock
        self._interval = interval
        self._notices = notices or NoticeWriter(myhostname=myhostname, config=DEFAULTS.queue)
        self._size_limit = size_limit
        self._soft_bounce = soft_bounce
        self._milters = milters
        self._overrides = frozenset(receive_override_options)
        self._policy = policy
        self._store = store
        self._in_hand = in_hand or (lambda queue_id: False)  # (no store: no requeued mail to ask about)
        self._requeues_waiting = False  # requeued mail waits for the end of an attempt: scan again soon
        self._store_due = True  # the next scan looks at the store's requeued mail too
        # files refused under soft_bounce and kept: tried again by the periodic scans only, not at every wake-up
        self._kept: set[str] = set()
        # entries that cannot be taken nor set aside (a directory of another user, a file that cannot be read):
        # logged once, then tried by the periodic scans only
        self._stuck: set[str] = set()
        self._maildrop_refused = False  # the maildrop is not a directory (logged once): not scanned
        self._periodic = False  # the scan under way is a periodic one (it tries the kept files too)
        self._last_scan = -math.inf  # when the last scan ended (the event loop's clock): see WAKE_GAP
        self._wanted = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._taking = UnderWay()  # the file being handed over, by the reload whose settings it uses
        self._socket: socket.socket | None = None  # public/pickup, read by the event loop
        self._closing = False
        self._stopping = asyncio.Event()
        self._scans = Guard("pickup: maildrop scan", clock, logger)
        # the checks of other users' files (passwd, authorized_submit_users, local_login_sender_maps) that could not
        # answer: logged at once, then a count once a minute; the rest of that scan does not ask them again
        self._checks = FailureLog(logger, "pickup: checking other users' maildrop files (they stay for a retry)", clock)
        self._checks_down = False  # they could not answer in the scan under way

    async def start(self) -> None:
        """Create the directories, listen for wake-ups, and scan at once (mail left while the server was down)."""
        self.corrupt.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        self._prepare_maildrop()
        await self._listen()
        self._wanted.set()
        self._task = asyncio.create_task(self._run(), name="pickup")

    def _prepare_maildrop(self) -> None:
        """The maildrop as local users need it: MAILDROP_MODE (1733), owned by this process's user (the only one
        who may then remove the files of others). One of ours with another mode (0700 before mailflow let other
        users submit, or changed by hand) is made so, logged; one that is not ours is left alone, logged."""
        if make_maildrop_directory(self.maildrop):
            return
        st = os.lstat(self.maildrop)
        mode = stat.S_IMODE(st.st_mode)
        if not self._maildrop_is_directory():
            return
        if st.st_uid != os.geteuid():
            logger.warning("pickup: %s belongs to uid %d, not to this server's uid %d (mode %04o): files of other "
                           "users cannot be removed once picked up; make it ours, mode %04o", self.maildrop,
                           st.st_uid, os.geteuid(), mode, MAILDROP_MODE)
        elif mode != MAILDROP_MODE:
            os.chmod(self.maildrop, MAILDROP_MODE)
            logger.warning("pickup: %s: mode %04o changed to %04o: local users may leave mail there (whether it is "
                           "taken: authorized_submit_users)", self.maildrop, mode, MAILDROP_MODE)

    def _maildrop_is_directory(self) -> bool:
        """Whether the maildrop is a directory itself, not a symbolic link (never followed: its target's files
        would be taken, moved or removed as mail left there). One that is not is not scanned, logged once (again
        after it was one)."""
        try:
            is_directory = stat.S_ISDIR(os.lstat(self.maildrop).st_mode)
        except FileNotFoundError:
            is_directory = False
        if not is_directory and not self._maildrop_refused:
            logger.error("pickup: %s is not a directory (a symbolic link is never followed): not scanned; sendmail "
                         "cannot leave mail there", self.maildrop)
        self._maildrop_refused = not is_directory
        return is_directory

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening; let the file being handed over finish (within `grace`), so that a commit is
        followed by its unlink; the rest waits in the maildrop for the next start."""
        if self._socket:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            self.socket_path.unlink(missing_ok=True)
        if self._task:
            self._closing = True
            self._stopping.set()
            self._wanted.set()
            try:
                await asyncio.wait_for(self._task, grace)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            self._task = None

    def wake(self, *, requeued: bool = False) -> None:
        """Scan now; `requeued`: the store's requeued mail too (else only at the start, every `interval` and while
        requeued mail waits for the end of its attempt: a sendmail's wake-up costs no query of the store)."""
        self._store_due = self._store_due or requeued
        self._wanted.set()

    def reconfigure(self, *, myhostname: str, interval: float, notices: NoticeWriter, size_limit: int,
                    milters: NonSmtpdMilters | None, soft_bounce: bool,
                    receive_override_options: Sequence[str], policy: Config | None = None) -> None:
        """A reload: the files picked up from now on are handled with these settings."""
        self._myhostname, self._interval, self._milters = myhostname, interval, milters
        self._policy = policy
        self._overrides = frozenset(receive_override_options)
        self._soft_bounce = soft_bounce
        self._kept.clear()  # (soft_bounce off, or other checks: the kept files are tried at the next scan)
        self._notices, self._size_limit = notices, size_limit
        self._taking.reconfigured()

    @property
    def retiring(self) -> bool:
        """A file (or requeued message) taken before the last reload is still being handed to cleanup, with the
        settings (milters, notices, cleanup's) the reload replaced."""
        return self._taking.before_reload

    async def _listen(self) -> None:
        """Listen on public/pickup (`_socket`), the wake-up socket: public/ made (PUBLIC_MODE, chmodded only when
        it is this process's own), a stale socket replaced, the socket SOCKET_MODE with sender credentials when the
        system gives them. Without a socket (public/ not a directory: a symbolic link is never followed; a bind
        that fails), logged: only the periodic scans find the mail then."""
        public = self.socket_path.parent
        public.mkdir(mode=PUBLIC_MODE, parents=True, exist_ok=True)
        st = os.lstat(public)
        if not stat.S_ISDIR(st.st_mode):  # a symbolic link: its target is never chmodded nor emptied of `pickup`
            logger.error("pickup: %s is not a directory (a symbolic link is never followed): not listening there; "
                         "scanning every %gs", public, self._interval)
            return
        if st.st_uid == os.geteuid():  # (a umask of 077 made it 0700: no other user could wake us)
            os.chmod(public, PUBLIC_MODE)
        self.socket_path.unlink(missing_ok=True)  # left by a server that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.socket_path))
            sock.setblocking(False)
            self._pass_credentials(sock)
            os.chmod(self.socket_path, SOCKET_MODE)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read_wake_ups, sock)
            self._socket = sock
        except OSError as e:
            sock.close()
            logger.warning("pickup: cannot listen on %s (%s): sendmail cannot wake it; scanning every %gs",
                           self.socket_path, e, self._interval)

    def _pass_credentials(self, sock: socket.socket) -> None:
        """SO_PASSCRED on `sock`: each datagram then names its sender. Without it (not Linux, or refused), the
        socket still wakes pickup; every datagram is a plain wake-up then ("R" too: its sender is unknown), logged."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except (AttributeError, OSError) as e:
            logger.warning("pickup: %s: no sender credentials (%s): every wake-up is a plain one; requeued mail is "
                           "copied at the periodic scans", self.socket_path, e)

    def _read_wake_ups(self, sock: socket.socket) -> None:
        """The datagrams waiting, WAKE_READS at most (the rest at the loop's next turn: any user may flood the
        socket): each a wake-up. REQUEUED ("look at the store too") counts only from root or this process's user,
        the only ones who can requeue mail (queue.db is theirs alone); from anyone else it is a plain wake-up,
        which costs no query of the store."""
        for _ in range(WAKE_READS):
            try:
                data, ancillary, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                logger.warning("pickup: %s: %s", self.socket_path, e)
                return
            self.wake(requeued=data == REQUEUED and _trusted(_sender_uid(ancillary)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        periodic_at = loop.time() + self._interval  # (the start's scan looks at everything)
        while not self._closing:
            # after a failed scan, wait out the backoff: only stop() cuts it short, not a wake-up
            event, timeout = self._wanted, max(0.0, min(periodic_at, loop.time() + self._interval) - loop.time())
            if self._requeues_waiting:  # (every scan looks again, however it was woken)
                timeout, self._store_due = min(timeout, REQUEUE_RECHECK), True
            if self._scans.backing_off:
                event, timeout = self._stopping, max(0.0, self._scans.resume_at - self._clock.time())
            woken = await self._woken(event, timeout)
            if woken:
                await self._pause(self._last_scan + WAKE_GAP - loop.time())
            # a periodic scan (or a backoff's end) looks at everything; it is due every interval, however many
            # wake-up scans came meanwhile (they never put it off: any user may send wake-ups)
            if not woken or loop.time() >= periodic_at:
                self._store_due = self._periodic = True
                periodic_at = loop.time() + self._interval
            self._wanted.clear()  # (the wake-ups of the pause are this scan's)
            if self._closing:
                return
            await self._scans.run(self.scan)  # anything it raises backs the scans off; the files stay
            self._last_scan = asyncio.get_running_loop().time()

    @staticmethod
    async def _woken(event: asyncio.Event, timeout: float) -> bool:
        """Whether `event` was set within `timeout` seconds."""
        try:  # (not wait_for: in 3.11 it swallows a cancellation that comes as the event is set)
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` (none when not positive), cut short by stop()."""
        if seconds > 0:
            await self._woken(self._stopping, seconds)

    async def scan(self) -> int:
        """One pass over the maildrop; returns how many files were handed to cleanup. First, the temporary
        files of sendmail processes that died writing them (not touched for a day) are removed. A maildrop that is
        not a directory (a symbolic link) is not scanned: only the requeued mail is copied. The directory is listed
        on a thread, and the loop over its entries yields every SCAN_TURN of them: any user may fill it."""
        if not self._maildrop_is_directory():
            return await self._copy_requeued()
        stale = await asyncio.to_thread(remove_stale_temporaries, self.maildrop, time.time())  # (wall-clock times)
        for name in stale:
            logger.warning("pickup: maildrop/%s: removed: an unfinished file left by a sendmail that died", name)
        done, periodic, self._periodic = 0, self._periodic, False
        self._checks_down = False
        names = await asyncio.to_thread(maildrop_names, self.maildrop)  # (any user may make it long)
        self._kept.intersection_update(names)
        self._stuck.intersection_update(names)
        for position, name in enumerate(names, 1):
            if self._closing:
                break
            if position % SCAN_TURN == 0:
                await asyncio.sleep(0)  # (however many entries are passed by, the other tasks get their turn)
            if (name in self._kept or name in self._stuck) and not periodic:
                continue
            with self._taking.one():
                if await self._pick(name):
                    done += 1
        return done + await self._copy_requeued()

    async def _copy_requeued(self) -> int:
        """Every message of the store's maildrop queue (requeued by an operator), a page at a time, copied through
        cleanup; returns how many were copied."""
        if self._store is None or not self._store_due:
            return 0
        self._store_due = False
        done, in_hand = 0, 0
        after: tuple[float, QueueId] = (-math.inf, "")
        while not self._closing:
            page = await self._store.requeued_messages(after=after, limit=REQUEUE_PAGE)
            for requeued in page:
                if self._closing:
                    break
                if self._in_hand(requeued.queue_id):  # held or requeued while active: its attempt is not over
                    in_hand += 1
                    continue
                with self._taking.one():
                    done += await self._copy(requeued)
            if not page:  # (not a short page: one may be short of a message whose id is not text, left out)
                break
            after = (page[-1].requeued_at, page[-1].queue_id)
        self._requeues_waiting = bool(in_hand or await self._store.requeues_waiting())
        return done

    async def _copy(self, requeued: RequeuedMessage) -> bool:
        """One requeued message through cleanup.resubmit (its content streamed from the store, never whole in
        memory); one with no pending recipient left is removed instead, as Postfix's pickup removes a queue file
        cleanup refuses for having none. Raises only for a store fault."""
        assert self._store is not None
        old = requeued.queue_id
        if requeued.damage:  # values of the wrong kind (edited by hand): never copied from stand-ins
            await self._store.mark_corrupt([old])
            logger.warning("pickup: requeued %s: damaged queue row: %s; moved to the corrupt queue", old,
                           printable(requeued.damage))
            return False
        if not requeued.recipients:  # each was delivered or returned (Postfix's cleanup refuses a copy of none)
            await self._store.delete_messages([old])
            logger.warning("pickup: requeued %s: from=<%s>: no recipients specified (each was delivered or returned);"
                           " removed, not copied", old, requeued.sender)
            return False
        content = await self._store.content(old)
        if content is None:  # its content row or file is damaged (logged by the store)
            await self._store.mark_corrupt([old])
            logger.warning("pickup: requeued %s: its content is missing or damaged; moved to the corrupt queue", old)
            return False
        try:
            await self._cleanup.resubmit(requeued, self._requeued_submission(requeued, content))
        except RequeueGone:
            logger.info("pickup: requeued %s: removed meanwhile; not copied", old)
            return False
        except PermanentError as e:
            await self._store.hold_requeued(old)
            logger.warning("pickup: requeued %s: from=<%s>: refused: %s %s; put on hold", old, requeued.sender, e.dsn,
                           e.reason)
            return False
        except Exception as e:  # TemporaryError, Overloaded, anything else: it stays requeued, for the next scan
            if store_fault(e):
                raise
            logger.warning("pickup: requeued %s: not copied (%s); will retry", old,
                           e.reason if isinstance(e, DeliveryError) else e)
            return False
        return True

    def _requeued_submission(self, m: RequeuedMessage, content: Content) -> Submission:
        """A requeued message as cleanup takes it: its pending recipients with their originals and DSN parameters,
        submitted by this process's user (the Received header pickup adds names it, as Postfix's names the mail
        owner's uid). Header addresses are rewritten again only for a local submission (sendmail): the rewriting
        context of the others is not kept."""
        rcpts = m.recipients
        envelope = Envelope(m.sender, tuple(r.address for r in rcpts), smtputf8=m.smtputf8, body_type=m.body_type,
                            originals=tuple(r.original for r in rcpts), notify=tuple(r.notify for r in rcpts),
                            orcpts=tuple(r.orcpt for r in rcpts), envid=m.envid, ret=m.ret)
        local = not m.client_attributes.protocol
        return Submission(envelope, content, self._local_client(), submitter=LocalUser(os.geteuid(), ""),
                          client_attributes=m.client_attributes, add_missing_headers=local,
                          header_rewrite_domain="" if local else None, overrides=self._overrides)

    async def _pick(self, name: str) -> bool:
        """maildrop/NAME opened (never through a link) and taken in (`_take`); True when cleanup queued it. One that
        cannot be opened as a maildrop file is `_unreadable`; one gone meanwhile is passed by."""
        path = self.maildrop / name
        try:
            opened = await asyncio.to_thread(open_maildrop, path)  # an envelope line may be 16 MB of JSON
        except FileNotFoundError:
            return False  # taken by another scan or removed by an operator
        except (CorruptMaildrop, OSError) as e:
            return self._unreadable(name, e)
        try:
            return await self._take(name, path, opened)
        finally:
            opened.close()

    async def _take(self, name: str, path: Path, opened: MaildropFile) -> bool:
        """The file opened and its envelope read: its writer's rights checked, then into cleanup."""
        try:
            message = await self._admitted(opened.message, opened.modified())
        except CorruptMaildrop as e:
            return self._unreadable(name, e)
        except SubmitRefused as e:
            path.unlink(missing_ok=True)
            logger.warning("pickup: maildrop/%s: uid=%d from=<%s>: refused: user %s %s; removed", name, e.uid,
                           opened.message.sender, e.login, e.reason)
            return False
        except Exception as e:  # LookupRetry, a bug: the file stays; logged once per scan at most, through _checks
            if not self._checks_down:  # (any user may leave many files)
                self._checks_down = True
                self._checks.failed(e)
            return False
        if self._size_limit and message.size > self._size_limit:
            too_big = MessageTooBig("5.3.4", "message file too big",
                                    f"{message.size} bytes, more than message_size_limit {self._size_limit}")
            quoted = await asyncio.to_thread(opened.prefix,
                                             max(self._notices.bounce_size_limit, HEADER_READ_LIMIT) + 1)
            if await self._refused(name, message, Content.of(quoted), too_big, size=message.size):
                path.unlink(missing_ok=True)
            return False
        spool = self._cleanup.new_spool()
        try:
            try:
                content = await self._copy_in(opened, spool)
            except CorruptMaildrop as e:
                return self._unreadable(name, e)
            except UnreadableMaildrop as e:
                return self._unreadable(name, e.error)
            try:
                submission, hold = await self._filtered(name, self._submission(message, content))
                if submission is None:
                    path.unlink(missing_ok=True)
                    return False
                queue_id = await self._cleanup.submit(submission, hold=hold)
            except PermanentError as e:
                if await self._refused(name, message, content, e):
                    path.unlink(missing_ok=True)
                return False
            except Exception as e:  # TemporaryError, Overloaded, anything else: not queued, try again later
                if store_fault(e):
                    raise  # the queue itself is failing: end this scan, the loop backs off
                logger.warning("pickup: maildrop/%s: not queued (%s); will retry", name,
                               e.reason if isinstance(e, DeliveryError) else e)
                return False
        finally:
            spool.discard()
        path.unlink(missing_ok=True)
        # (cleanup logged Postfix's one `QID: uid=N from=<s>` line; this only ties the file to its queue id)
        logger.debug("%s: picked up maildrop/%s", queue_id, name)
        return True

    async def _filtered(self, name: str, sub: Submission) -> tuple[Submission | None, bool]:
        """The submission as non_smtpd_milters leave it, and whether to hold it; None when one discarded it.
        Raises PermanentError when one rejected it, TemporaryError when it is to be tried again later."""
        if self._milters is None or "no_milters" in self._overrides:
            return sub, False
        filtered = await self._milters.filter(sub)
        if filtered.action in ("reject", "tempfail"):
            assert filtered.reply is not None  # (a refusal always carries its reply)
            refusal = ContentRejected if filtered.action == "reject" else TemporaryError  # (Postfix: CLEANUP_STAT_CONT)
            raise refusal(filtered.reply.status, filtered.reply.text, filtered.reason)
        if filtered.action == "discard":
            logger.info("pickup: maildrop/%s: from=<%s>: milter-discard (%s)", name, sub.envelope.sender,
                        filtered.reason)
            return None, False
        if filtered.hold is not None:
            logger.info("pickup: maildrop/%s: from=<%s>: milter-hold (%s)", name, sub.envelope.sender, filtered.hold)
        return filtered.submission, filtered.hold is not None

    @staticmethod
    async def _copy_in(opened: MaildropFile, spool) -> Content:
        """The file's content, streamed into `spool` from the file opened (never by its name again). Raises
        CorruptMaildrop when it is not the size its envelope says, UnreadableMaildrop when the file cannot be read;
        an error of the spool (the queue's side: its directory's permissions, a full disk) as it is, which ends
        the scan and leaves every file where it is (a store fault: see the module doc)."""
        chunks = opened.chunks()
        while (chunk := await _read_chunk(chunks)) is not None:
            spool.append(chunk)
            await spool.drain()
        if spool.failure is not None:
            raise spool.failure
        if not opened.unchanged():
            raise CorruptMaildrop("changed while being read")
        return await spool.finish()

    async def _admitted(self, message: MaildropMessage, written: float) -> MaildropMessage:
        """The file's envelope as it may be taken: one written by root or the queue's owner as it is; one of
        another user (the kernel's word: the file's owner) only when it claims that user's uid (else
        CorruptMaildrop), under that user's login name from the passwd entry whatever it claims, and when that
        login passes authorized_submit_users and local_login_sender_maps for its sender (else SubmitRefused),
        since that user may have written the file without sendmail's checks. LookupRetry: a table cannot answer
        (the passwd database too: see PASSWD_PATIENCE, counted from `written`, when the file was)."""
        owner = message.owner_uid
        if owner is None or _trusted(owner):
            return message
        if owner != message.uid:
            raise CorruptMaildrop(f"owner uid {owner} differs from the submitting uid {message.uid} it claims")
        if self._policy is None:
            raise SubmitRefused(owner, f"uid{owner}", "not allowed to submit mail (no policy for other users)")
        if self._checks_down:
            raise LookupRetry("not checked: the checks could not answer earlier in this scan")
        policy = self._policy
        user = await asyncio.to_thread(passwd_identity, owner)
        if user is None:  # NSS down (LDAP, SSSD) or no entry: pwd says the same; it waits PASSWD_PATIENCE
            if time.time() - written < PASSWD_PATIENCE:  # (the file's mtime: an envelope's time may be absent)
                raise LookupRetry(f"no passwd entry for uid {owner} (the passwd database may not answer)")
            user = identity_of(owner)  # as sendmail names a uid without one
        problem = await asyncio.to_thread(submit_problem, user.login, message.sender, policy)
        self._checks.succeeded()
        if problem:
            raise SubmitRefused(owner, user.login, problem)
        return dataclasses.replace(message, user=user.login)

    def _submission(self, m: MaildropMessage, content: Content) -> Submission:
        envelope = Envelope(m.sender, m.recipients, smtputf8=not all(a.isascii() for a in (m.sender, *m.recipients)),
                            body_type=m.body_type, notify=m.recipient_notify(), orcpts=m.rcpt_orcpt, envid=m.envid,
                            ret=m.ret)
        return Submission(envelope, content, self._local_client(), submitter=LocalUser(m.uid, m.user, m.fullname),
                          overrides=self._overrides)

    def _local_client(self) -> ClientInfo:
        """The client of a local submission, as cleanup and the Received header name it."""
        return ClientInfo(addr="127.0.0.1", helo=self._myhostname, protocol="local", hostname="localhost")

    def _unreadable(self, name: str, error: CorruptMaildrop | OSError) -> bool:
        """An entry that cannot be taken in: a corrupt one, or one of another user this process may not read, is
        set aside (`_set_aside`); another that cannot be read is tried again (logged once: `_note`). Returns
        False (not picked up)."""
        try:
            st = os.lstat(self.maildrop / name)
        except OSError:
            return False  # taken by another scan or removed by an operator
        foreign = not _trusted(st.st_uid)
        if isinstance(error, CorruptMaildrop) or (foreign and isinstance(error, PermissionError)):
            self._set_aside(name, st, str(error))
        else:
            self._note(name, logging.WARNING, "pickup: maildrop/%s: cannot read: %s; will retry", name, error)
        return False

    def _set_aside(self, name: str, st: os.stat_result, reason: str) -> None:
        """Another user's entry (its owner, `st`, neither root nor this process's user) is removed, as Postfix's pickup
        removes a malformed file: nothing of theirs piles up where they cannot reach it; a directory of theirs is
        removed when empty, else left in place (logged once). Root's and this process's own (a fault, not an attack) are
        moved to corrupt/ for inspection, under a name of their own there (NAME.N when NAME is taken)."""
        path = self.maildrop / name
        if not _trusted(st.st_uid):
            if stat.S_ISDIR(st.st_mode):
                self._remove_directory(name, st, reason)
                return
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except OSError as e:
                self._note(name, logging.ERROR, "pickup: maildrop/%s: corrupt (%s) and cannot be removed: %s", name,
                           reason, e)
                return
            logger.warning("pickup: maildrop/%s: corrupt: %s; removed (uid %d)", name, reason, st.st_uid)
            return
        target = self._corrupt_target(name)
        try:
            os.rename(path, target)
        except OSError as e:
            self._note(name, logging.ERROR, "pickup: maildrop/%s: corrupt (%s) and cannot be moved to %s: %s", name,
                       reason, self.corrupt, e)
            return
        logger.warning("pickup: maildrop/%s: corrupt: %s; moved to %s", name, reason, target)

    def _remove_directory(self, name: str, st: os.stat_result, reason: str) -> None:
        """Another user's directory in the maildrop (never mail): removed when empty, so that none piles up there;
        else left in place (what it holds is theirs), logged once."""
        try:
            os.rmdir(self.maildrop / name)  # (never follows a symbolic link; fails when not empty)
        except FileNotFoundError:
            return
        except OSError:
            self._note(name, logging.WARNING, "pickup: maildrop/%s: corrupt: %s; left in place (a directory of uid "
                       "%d that is not empty: remove it by hand)", name, reason, st.st_uid)
            return
        logger.warning("pickup: maildrop/%s: corrupt: %s; removed (an empty directory of uid %d)", name, reason,
                       st.st_uid)

    def _corrupt_target(self, name: str) -> Path:
        """corrupt/NAME, or NAME.1, NAME.2, ... when taken (corrupt/ is this process's alone: no race)."""
        target, n = self.corrupt / name, 0
        while os.path.lexists(target):
            n += 1
            target = self.corrupt / f"{name}.{n}"
        return target

    def _note(self, name: str, level: int, message: str, *args) -> None:
        """An entry left in the maildrop that pickup cannot take: logged the first time only, then passed by until
        a periodic scan tries it again (silently), so that neither wake-ups nor scans make a log line each."""
        if name not in self._stuck:
            logger.log(level, message, *args)
            self._stuck.add(name)

    async def _refused(self, name: str, m: MaildropMessage, content: Content, error: PermanentError, *,
                       size: int | None = None) -> bool:
        """Return a message refused for good, as Postfix's cleanup bounces it for pickup through bounce(8): the
        notices qmgr's planning calls for (`plan`: the sender's failure notice, worded by bounce_template_file's
        failure template; with notify_classes bounce a headers-only copy to bounce_notice_recipient; for a null
        sender, with 2bounce or bounce, the whole original to double_bounce_recipient; never a bounce of a
        double bounce), quoting at most bounce_size_limit bytes of `content` (`size`: the message's, when
        `content` is only its start). False when a notice could not be queued: the file stays for the next scan
        (the ones queued are sent again then, as Postfix's cleanup, its bounce failed, leaves the file)."""
        logger.warning("pickup: maildrop/%s: from=<%s>: refused: %s %s", name, m.sender, error.dsn, error.reason)
        if self._soft_bounce:  # Postfix's cleanup cannot bounce it then (bounce_append): it stays in the maildrop
            logger.warning("pickup: maildrop/%s: not returned to <%s> (soft_bounce); will retry", name, m.sender)
            self._kept.add(name)
            return False
        now = self._clock.time()
        message, results = _as_bounced(name, m, error, now, size=content.size if size is None else size)
        try:
            returned = self._cleanup.without_dropped_fields(content)  # (no Bcc: cleanup had removed it)
            built = await self._notices.submissions(message, results, original=returned, now=now,
                                                    original_size=message.size)
        except OSError as e:
            logger.warning("pickup: maildrop/%s: cannot read the message to quote it: %s", name, e)
            built = await self._notices.submissions(message, results, original=Content.of(b""), now=now,
                                                    original_size=message.size)
        if not built:
            logger.warning("pickup: maildrop/%s: null sender or NOTIFY=NEVER: dropped without notice", name)
            return True
        # the notices that return the message first (the sender's, or a null sender's double bounce): only theirs
        # keep the file; a headers-only postmaster copy that cannot be queued is not critical (Postfix's
        # bounce_notify_service warns and goes on), or the sender would get theirs again at every scan
        for notice, submission in sorted(built, key=lambda pair: _only_a_copy(pair[0])):
            whose = "postmaster" if notice.postmaster_copy else "sender"
            try:
                queue_id = await self._cleanup.submit(submission)
            except Exception as e:
                if _only_a_copy(notice):
                    logger.warning("pickup: maildrop/%s: the postmaster copy of the non-delivery notification to "
                                   "<%s> could not be queued: %s", name, notice.to, e)
                    continue
                logger.error("pickup: maildrop/%s: the %s non-delivery notification to <%s> could not be queued: %s; "
                             "will retry", name, whose, notice.to, e)
                return False
            logger.info("pickup: maildrop/%s: %s non-delivery notification: %s", name, whose, queue_id)
        return True


def _only_a_copy(notice: Notice) -> bool:
    """A postmaster's headers-only copy of a notice that goes to someone else (not a double bounce)."""
    return notice.postmaster_copy and notice.ret == "HDRS"


def _as_bounced(name: str, m: MaildropMessage, error: PermanentError, now: float, *,
                size: int) -> tuple[QueuedMessage, list[RcptResult]]:
    """A refused maildrop file as qmgr's notice planning sees a message whose every recipient bounced."""
    notify = m.recipient_notify() or ("",) * len(m.recipients)
    orcpts = m.rcpt_orcpt or ("",) * len(m.recipients)
    recipients = tuple(Recipient(i, r, r, notify[i], orcpts[i]) for i, r in enumerate(m.recipients))
    message = QueuedMessage(queue_id=name, sender=m.sender, arrival=m.time or now, size=size,
                            smtputf8=not m.sender.isascii(), body_type=m.body_type, attempts=0,
                            recipients=recipients, envid=m.envid,
                            # content a check or a milter refused, or too big, goes back as its headers only:
                            # Postfix's cleanup_bounce (CLEANUP_STAT_CONT, CLEANUP_STAT_SIZE) sends no unfiltered body
                            ret="HDRS" if isinstance(error, (ContentRejected, MessageTooBig)) else m.ret)
    return message, [RcptResult(r, Outcome.BOUNCED, error.dsn, error.text) for r in recipients]
