"""What an OS error while writing a mailbox means for the recipient, mbox and Maildir alike, as Postfix's
mbox_dsn maps it: a full disk defers 4.3.0, a quota or file size limit bounces 5.2.2, anything else defers
4.2.0 (Postfix's local(8) bounces that one 5.2.0, 5.3.0 for a write; mailflow keeps the mail for the operator to
fix)."""
from __future__ import annotations

import errno
import logging
import os
import re
import stat

import pytest

from mailflow.clock import VirtualClock
from mailflow.content import Content
from mailflow.errors import PermanentError, TemporaryError
from mailflow.model import DeliveryRequest, Outcome, Recipient
from mailflow.transports import maildir
from mailflow.transports.local import mbox
from mailflow.transports.local.mbox import _os_error
from mailflow.transports.maildir import MaildirTransport, MaildirWriter, write_failure

CASES = [(errno.ENOSPC, Outcome.DEFERRED, "4.3.0"), (errno.EDQUOT, Outcome.BOUNCED, "5.2.2"),
         (errno.EFBIG, Outcome.BOUNCED, "5.2.2"), (errno.EACCES, Outcome.DEFERRED, "4.2.0")]


@pytest.mark.parametrize("code, outcome, dsn", CASES)
def test_mbox_and_maildir_map_an_os_error_alike(code, outcome, dsn):
    """The status alike, each text in local(8)'s words: "error writing message: <why>" (mail_copy), after
    "maildir delivery failed: " for a Maildir."""
    error = OSError(code, "error writing message: reason")
    assert write_failure(error) == (outcome, dsn, "maildir delivery failed: error writing message: reason")
    mapped = _os_error(OSError(code, "reason"), "error writing message")
    assert (isinstance(mapped, PermanentError), mapped.dsn) == (outcome is Outcome.BOUNCED, dsn)
    assert mapped.text == "error writing message: reason"


async def test_a_maildir_file_that_cannot_be_moved_into_new_is_not_left_in_tmp(tmp_path, monkeypatch):
    """The rename into new/ failing (the disk full or an I/O error on the directory) left the whole message in
    tmp/, a copy no reader sees and nothing removes, at every retry; now it goes as a failed write's does (Postfix's
    maildir delivery unlinks its tmp file when the link into new/ fails)."""
    def rename(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(maildir.os, "rename", rename)
    box = tmp_path / "Maildir"
    with pytest.raises(OSError) as failed:
        await MaildirWriter(VirtualClock()).write(box, b"Delivered-To: a@b\n", Content.of(b"Subject: s\r\n\r\nb\r\n"))
    assert write_failure(failed.value)[:2] == (Outcome.DEFERRED, "4.3.0")
    assert [list((box / sub).iterdir()) for sub in ("tmp", "new")] == [[], []]


async def test_a_tmp_file_already_gone_at_the_cleanup_leaves_the_failure_that_brought_it(tmp_path, monkeypatch,
                                                                                          caplog):
    """A Maildir the user owns (a local /dir/ destination) may lose its tmp/ file before the cleanup's unlink: that
    unlink's ENOENT replaced the write's own failure (EFBIG past the size limit, a bounce 5.2.2, became `No such file
    or directory`, a deferral). Postfix warns `remove PATH: why` and keeps its result; the warning is keyed by the
    queue id."""
    real_unlink = os.unlink

    def unlink_gone(path, *, dir_fd=None):
        real_unlink(path, dir_fd=dir_fd)
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    monkeypatch.setattr(maildir.os, "unlink", unlink_gone)
    box = tmp_path / "Maildir"
    with caplog.at_level(logging.WARNING, logger="mailflow.maildir"), pytest.raises(OSError) as failed:
        big = Content.of(b"Subject: s\r\n\r\n" + b"b" * 500)
        await MaildirWriter(VirtualClock()).write(box, b"Delivered-To: a@b\n", big, size_limit=100, queue_id="Q1")
    assert write_failure(failed.value) == (Outcome.BOUNCED, "5.2.2",
                                                "maildir delivery failed: error writing message: File too large")
    assert [r.getMessage().startswith(f"Q1: remove {box}/tmp/") for r in caplog.records] == [True], caplog.text


async def test_a_message_in_new_is_delivered_when_the_fsync_of_new_fails_after_it(tmp_path, monkeypatch, caplog):
    """The fsync of new/ after the rename failing (EIO) deferred 4.2.0 a message already in new/, and the retry
    wrote a second copy; Postfix never fsyncs the directory: once the link into new/ works it is delivered. The
    failure is a warning keyed by the queue id."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)
    monkeypatch.setattr(maildir.os, "fsync", fsync)
    box = tmp_path / "Maildir"
    transport = MaildirTransport(lambda rcpt: box, clock=VirtualClock())
    rcpt = Recipient(0, "a@example.test", "a@example.test")
    request = DeliveryRequest("Q1", "s@example.test", (rcpt,), "example.test", Content.of(b"Subject: s\r\n\r\nb\r\n"))
    with caplog.at_level(logging.WARNING, logger="mailflow.maildir"):
        report = await transport.deliver(request)
    assert [(r.outcome, r.dsn) for r in report.results] == [(Outcome.SENT, "2.0.0")]
    assert len(list((box / "new").iterdir())) == 1 and not list((box / "tmp").iterdir())
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Q1: maildir ")], caplog.text


@pytest.mark.parametrize("file_destination", [False, True])
async def test_a_stale_dotlock_that_cannot_be_removed_is_a_dotlock_that_cannot_be_made(tmp_path, monkeypatch, caplog,
                                                                                       file_destination):
    """Another user's stale lock in a sticky directory: its unlink fails EPERM. That error escaped to the catch-all
    ("cannot open file: Operation not permitted"); Postfix's dot_lockfile gives up with it: a mailbox defers
    "unable to create lock file P.lock: Operation not permitted", a /file is warned about and written without it."""
    box = tmp_path / "box"
    lock = mbox.dotlock_path(box)
    lock.touch()
    os.utime(lock, (1, 1))
    real_unlink = os.unlink

    def unlink(name, *args, **kwargs):
        if str(name).endswith(".lock"):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        real_unlink(name, *args, **kwargs)
    monkeypatch.setattr(mbox.os, "unlink", unlink)
    append = mbox.append_mbox(box, b"From a  Thu Jan  1 00:00:00 1970\nb\n\n", locks=("dotlock",), lock_timeout=0.1,
                              file_destination=file_destination)
    if file_destination:
        with caplog.at_level(logging.WARNING, "mailflow.mbox"):
            await append
        assert box.read_bytes().endswith(b"b\n\n")
        assert f"unable to create lock file {lock}: Operation not permitted" in caplog.text
    else:
        with pytest.raises(TemporaryError) as failed:
            await append
        assert (failed.value.dsn, failed.value.text) == ("4.2.0",
                                                         f"unable to create lock file {lock}: Operation not permitted")


async def test_a_kernel_lock_failing_otherwise_than_busy_is_told_as_the_lock(tmp_path, monkeypatch):
    """ENOLCK (an NFS without a lock manager) read "cannot open file: No locks available"; Postfix's deliver_flock
    says "unable to lock for exclusive access: No locks available"."""
    def no_locks(*args, **kwargs):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(mbox.fcntl, "fcntl", no_locks)
    monkeypatch.setattr(mbox.fcntl, "lockf", no_locks)
    with pytest.raises(TemporaryError) as failed:
        await mbox.append_mbox(tmp_path / "box", b"From a  Thu Jan  1 00:00:00 1970\nb\n\n", locks=("fcntl",))
    assert (failed.value.dsn, failed.value.text) == ("4.2.0", "unable to lock for exclusive access: No locks available")


async def test_a_mailbox_close_that_fails_is_told_as_the_close(tmp_path, monkeypatch):
    """An EIO from the mailbox's close (an NFS write-back) read "cannot open file: Input/output error": it names the
    close now."""
    box = tmp_path / "box"
    real_close = os.close

    def close(fd):
        named = os.readlink(f"/proc/self/fd/{fd}")
        real_close(fd)
        if named == str(box):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(mbox.os, "close", close)
    with pytest.raises(TemporaryError) as failed:
        await mbox.append_mbox(box, b"From a  Thu Jan  1 00:00:00 1970\nb\n\n", locks=("fcntl",))
    assert (failed.value.dsn, failed.value.text) == ("4.2.0", "error closing file: Input/output error")


class _UnreadableContent:
    """A queued message whose spool file fails (EIO) after its first chunk."""

    def chunks(self):
        yield b"Subject: s\r\n\r\n"
        raise OSError(errno.EIO, os.strerror(errno.EIO))


async def test_a_queued_message_that_cannot_be_read_is_not_a_write_failure(tmp_path):
    """The queued message's read failing (EIO) read "error writing message: Input/output error", 4.2.0, as if the
    mailbox were at fault; Postfix's mail_copy says "error reading message: <why>", 4.3.0. Maildir and mbox alike,
    and nothing is left of the copy."""
    box = tmp_path / "Maildir"
    with pytest.raises(OSError) as failed:
        await MaildirWriter(VirtualClock()).write(box, b"Delivered-To: a@b\n", _UnreadableContent())
    assert write_failure(failed.value) == (Outcome.DEFERRED, "4.3.0",
                                                "maildir delivery failed: error reading message: Input/output error")
    assert list((box / "tmp").iterdir()) == []
    mailbox = tmp_path / "box"
    with pytest.raises(TemporaryError) as deferred:
        await mbox.append_mbox(mailbox, _UnreadableContent().chunks(), locks=("fcntl",))
    assert (deferred.value.dsn, deferred.value.text) == ("4.3.0", "error reading message: Input/output error")
    assert mailbox.read_bytes() == b""


async def test_a_maildir_file_that_cannot_be_moved_into_new_names_the_new_file(tmp_path, monkeypatch):
    """The rename into new/ failing read "link to BOX/new/NAME: <why>"; Postfix's local(8) and virtual(8) say
    "create maildir file BOX/new/NAME: <why>" for that step too."""
    def rename(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(maildir.os, "rename", rename)
    box = tmp_path / "Maildir"
    with pytest.raises(OSError) as failed:
        await MaildirWriter(VirtualClock()).write(box, b"Delivered-To: a@b\n", Content.of(b"Subject: s\r\n\r\nb\r\n"))
    text = write_failure(failed.value)[2]
    assert re.fullmatch(rf"maildir delivery failed: create maildir file {re.escape(str(box))}/new/[^/]+: "
                        r"Permission denied", text), text


async def test_a_files_dotlock_that_cannot_be_made_is_warned_about_once_per_delivery(tmp_path, monkeypatch, caplog):
    """A /file whose dotlock cannot be made, and whose kernel lock another holder keeps: each retry warned again
    (about 25 times in 20 s); Postfix's local(8) warns once. The held lock is an open-file-description lock, which
    conflicts with this process's own attempts."""
    box = tmp_path / "file"
    box.write_bytes(b"")
    real_open = os.open

    def open_(name, *args, **kwargs):
        if str(name).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(name, *args, **kwargs)
    holder = real_open(box, os.O_RDWR)
    try:
        mbox._try_kernel_lock(holder, "fcntl")
        monkeypatch.setattr(mbox.os, "open", open_)
        with caplog.at_level(logging.WARNING, "mailflow.mbox"), pytest.raises(TemporaryError) as failed:
            await mbox.append_mbox(box, b"From a  Thu Jan  1 00:00:00 1970\nb\n\n", locks=("dotlock", "fcntl"),
                                   lock_timeout=0.5, file_destination=True)
    finally:
        os.close(holder)
    assert failed.value.text == "unable to lock for exclusive access: Resource temporarily unavailable"
    assert [r.getMessage() for r in caplog.records] == [f"unable to create lock file {box}.lock: Permission denied"]
