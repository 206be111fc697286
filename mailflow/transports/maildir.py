"""Maildir delivery (Postfix virtual(8); local(8) writes its mailboxes with `MaildirWriter` too).

`MaildirWriter(clock).write(maildir, prefix, content)`: one message file, durably: `prefix` (whole LF lines) then
the content (a mailflow.content.Content) with LF line ends, converted chunk by chunk as it is written, so a big
message is never held whole; raises OSError (also when the content's spool file cannot be read).
`MaildirTransport(locate, clock=…, relay=…)`: `locate(recipient) -> Path | None` finds the Maildir.
- `virtual_maildirs(base, rewriter)`: `<virtual_mailbox_base>/<virtual_mailbox_maps value>`; the value must
  end in "/" (Maildir) and stay inside the base.
Per recipient: write `Return-Path` and `Delivered-To` then the message, with LF line endings (the mailbox
convention, as Postfix writes it) into `tmp/`, fsync the file, rename it into `new/`, fsync `new/`. Only then
is the recipient SENT. The file work runs in a worker thread.
Quota (`quota(recipient) -> bytes`, 0 = none): the sizes of the files in new/ and cur/ plus the new message
(counted as queued, with its CRLF line ends: the file is at most that big) may not exceed it; over quota bounces 5.2.2, or defers 4.2.2 when `overquota_bounce` is False.
Failures: an unknown virtual user bounces (5.1.1); a table that cannot answer or a map value mailflow
cannot use defers (4.3.0 / 4.3.5); an OS error defers (4.2.0: a full disk, a permission the operator can fix).
"""
from __future__ import annotations

import asyncio
import os
import socket
from itertools import count
from pathlib import Path

from typing import Callable

from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.errors import TemporaryError
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.transports.encode import ToLf, encode

Locate = Callable[[str], "Path | None"]


def virtual_maildirs(base: str | Path, rewriter) -> Locate:
    root = Path(base)

    def locate(recipient: str) -> Path | None:
        path = rewriter.virtual_mailbox(recipient)  # LookupRetry (a TemporaryError) propagates
        if path is None:
            return None
        if not path.endswith("/"):
            raise TemporaryError("4.3.5", f"virtual_mailbox_maps gives {path!r}: only Maildirs (ending in /) are supported")
        maildir = (root / path).resolve()
        if not maildir.is_relative_to(root.resolve()):
            raise TemporaryError("4.3.5", f"virtual_mailbox_maps gives {path!r}, outside virtual_mailbox_base")
        return maildir

    return locate


class MaildirWriter:
    """Unique Maildir file names (time, pid, a counter, the host) and the durable write, in a worker thread."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._seq = count()

    async def write(self, maildir: Path, prefix: bytes, content: Content) -> None:
        await asyncio.to_thread(_write_maildir_file, maildir, self._unique_name(), prefix, content)

    def _unique_name(self) -> str:
        now = self._clock.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._seq)}.{self._host}"


def mailbox_prefix(sender: str, delivered_to: str) -> bytes:
    """The lines a mailbox copy starts with (LF line ends, as mailbox files keep them)."""
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode("utf-8")


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
    def __init__(self, locate: Locate, *, clock: Clock, relay: str = "virtual",
                 quota: Callable[[str], int] = lambda recipient: 0, overquota_bounce: bool = True):
        self._locate = locate
        self._relay = relay
        self._writer = MaildirWriter(clock)
        self._quota = quota
        self._overquota_bounce = overquota_bounce

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        results = []
        for rcpt in request.recipients:
            results.append(await self._deliver_one(request, rcpt))
        return DeliveryReport(tuple(results))

    async def close(self) -> None:
        pass

    async def _deliver_one(self, request: DeliveryRequest, rcpt: Recipient) -> RcptResult:
        try:
            maildir = self._locate(rcpt.address)
        except TemporaryError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, e.dsn, e.text, relay=self._relay)
        if maildir is None:
            return RcptResult(rcpt, Outcome.BOUNCED, "5.1.1", "user unknown in virtual mailbox table",
                              relay=self._relay)
        prefix = mailbox_prefix(request.sender, rcpt.address)
        try:
            refusal = await self._over_quota(rcpt, maildir, len(prefix) + request.content.size)
            if refusal is not None:
                return refusal
            await self._writer.write(maildir, prefix, request.content)
        except TemporaryError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, e.dsn, e.text, relay=self._relay)
        except OSError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, "4.2.0", f"cannot write to maildir {maildir}: {e.strerror}",
                              relay=self._relay)
        return RcptResult(rcpt, Outcome.SENT, "2.0.0", f"delivered to maildir {maildir}", relay=self._relay)

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


def _write_maildir_file(maildir: Path, name: str, prefix: bytes, content: Content) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix)
            for chunk in encode(content.chunks(), ToLf()):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial message in tmp/
        raise
    os.rename(tmp, maildir / "new" / name)
    dir_fd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
