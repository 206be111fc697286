"""local delivery into Maildirs: `<maildir_base>/<user>/Maildir/{tmp,new,cur}`.

Per recipient: write `Return-Path` and `Delivered-To` then the message, with LF line endings (the local
mailbox convention, as Postfix's local and virtual agents write it) into `tmp/`, fsync the file, rename it
into `new/`, fsync `new/`. Only then is the recipient SENT. The file work runs in a worker thread.
The user is the recipient's local part, lower-cased. An OS error defers the recipient (4.2.0, e.g. a
full disk or a permission problem the operator can fix); nothing here bounces.
"""
from __future__ import annotations

import asyncio
import os
import socket
from itertools import count
from pathlib import Path

from mailflow import address
from mailflow.clock import Clock
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient


class MaildirTransport:
    def __init__(self, config, *, clock: Clock):
        self._base = Path(config.maildir_base)
        self._clock = clock
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._seq = count()

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        body = request.content.replace(b"\r\n", b"\n")
        results = []
        for rcpt in request.recipients:
            results.append(await self._deliver_one(request, rcpt, body))
        return DeliveryReport(tuple(results))

    async def close(self) -> None:
        pass

    def maildir_of(self, recipient: str) -> Path:
        user = address.split(recipient)[0].lower()
        return self._base / user / "Maildir"

    async def _deliver_one(self, request: DeliveryRequest, rcpt: Recipient, body: bytes) -> RcptResult:
        maildir = self.maildir_of(rcpt.address)
        prefix = f"Return-Path: <{request.sender}>\nDelivered-To: {rcpt.address}\n".encode("utf-8")
        name = self._unique_name()
        try:
            await asyncio.to_thread(_write_maildir_file, maildir, name, prefix + body)
        except OSError as e:
            return RcptResult(rcpt, Outcome.DEFERRED, "4.2.0", f"cannot write to maildir {maildir}: {e.strerror}",
                              relay="local")
        return RcptResult(rcpt, Outcome.SENT, "2.0.0", f"delivered to maildir {maildir}", relay="local")

    def _unique_name(self) -> str:
        now = self._clock.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._seq)}.{self._host}"


def _write_maildir_file(maildir: Path, name: str, data: bytes) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, maildir / "new" / name)
    dir_fd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
