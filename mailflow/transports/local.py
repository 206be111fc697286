"""local: delivery for the local address class (Postfix local(8)).

Per recipient of the request:
1. `LocalExpander.expand` (aliases, .forward; see mailflow.stages.aliasing), given the addresses already in the
   message's `Delivered-To:` headers so that a forwarding loop bounces (5.4.6).
2. Mailboxes: `<maildir_base>/<user>/Maildir/`, each copy starting with Return-Path and Delivered-To; one copy
   per user per request, however many of its recipients lead there (Postfix's duplicate filter).
3. Forwarded addresses: one new message per recipient, queued through cleanup by `forward(...)` with the same
   sender, `Delivered-To: <recipient>` prepended, each new recipient keeping the original one (ORCPT).
4. Commands and files (allowed ones): deferred (4.3.5) until the pipe and file agents exist, before anything
   else of that recipient is delivered, so that a retry does not duplicate.
The recipient's result: deferred if any part must be retried (a retry repeats the parts already done, as
local(8) does); else bounced when a part was refused (unknown user, loop, restricted command), the rest
being delivered; else sent, naming every destination.

Failures: never raises for a delivery problem; an OS error writing a Maildir defers (4.2.0); a table or
file that cannot be read defers (4.3.0); a forward cleanup cannot queue defers (4.3.0).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Awaitable, Callable

from mailflow.errors import DeliveryError, TemporaryError
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, RcptResult, Recipient
from mailflow.stages.aliasing import Command, File, Forward, LocalExpander, Mailbox, Refused
from mailflow.stages.cleanup import header_values, split_header
from mailflow.transports.maildir import MaildirWriter, mailbox_prefix

log = logging.getLogger("mailflow.local")

# forward(request, recipient, addresses, content) -> queue id of the new message
ForwardFn = Callable[[DeliveryRequest, Recipient, tuple[str, ...], bytes], Awaitable[str]]


def delivered_to(content: bytes) -> frozenset[str]:
    """The addresses of every Delivered-To header, lower-cased."""
    head, _ = split_header(content)
    return frozenset(v.strip().strip("<>").lower() for v in header_values(head, "delivered-to"))


class LocalTransport:
    def __init__(self, expander: LocalExpander, *, writer: MaildirWriter, maildir_base: str | Path,
                 forward: ForwardFn | None = None, relay: str = "local"):
        self._expander = expander
        self._writer = writer
        self._base = Path(maildir_base)
        self._forward = forward
        self._relay = relay

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        seen = delivered_to(request.content)
        body = request.content.replace(b"\r\n", b"\n")
        filled: dict[str, str] = {}  # user -> what its mailbox got, so a user gets one copy per message
        results = []
        for rcpt in request.recipients:
            results.append(await self._deliver_recipient(request, rcpt, seen, body, filled))
        return DeliveryReport(tuple(results))

    async def close(self) -> None:
        pass

    async def _deliver_recipient(self, request: DeliveryRequest, rcpt: Recipient, seen: frozenset[str],
                                 body: bytes, filled: dict[str, str]) -> RcptResult:
        try:
            leaves = self._expander.expand(rcpt.address, delivered_to=seen)
        except DeliveryError as e:
            return self._result(rcpt, Outcome.DEFERRED, e.dsn, e.text)
        privileged = [leaf for leaf in leaves if isinstance(leaf, (Command, File))]
        if privileged:
            what = ", ".join(f"|{x.command}" if isinstance(x, Command) else x.path for x in privileged)
            return self._result(rcpt, Outcome.DEFERRED, "4.3.5",
                                f"delivery to commands and files is not available yet: {what}")
        done: list[str] = []
        try:
            for leaf in leaves:
                if isinstance(leaf, Mailbox):
                    if leaf.user not in filled:
                        filled[leaf.user] = await self._mailbox(request, leaf, body)
                    done.append(filled[leaf.user])
            forwards = tuple(leaf.address for leaf in leaves if isinstance(leaf, Forward))
            if forwards:
                done.append(await self._forward_copy(request, rcpt, forwards))
        except TemporaryError as e:
            return self._result(rcpt, Outcome.DEFERRED, e.dsn, e.text)
        refused = [leaf for leaf in leaves if isinstance(leaf, Refused)]
        if refused:
            text = "; ".join(r.text if r.address.lower() == rcpt.address.lower() else f"{r.address}: {r.text}"
                             for r in refused)
            return self._result(rcpt, Outcome.BOUNCED, refused[0].dsn, text + _also(done))
        return self._result(rcpt, Outcome.SENT, "2.0.0", "; ".join(done))

    async def _mailbox(self, request: DeliveryRequest, leaf: Mailbox, body: bytes) -> str:
        maildir = self._base / leaf.user / "Maildir"
        try:
            await self._writer.write(maildir, mailbox_prefix(request.sender, leaf.address) + body)
        except OSError as e:
            raise TemporaryError("4.2.0", f"cannot write to maildir {maildir}: {e.strerror}") from None
        return f"delivered to maildir {maildir}"

    async def _forward_copy(self, request: DeliveryRequest, rcpt: Recipient, addresses: tuple[str, ...]) -> str:
        if self._forward is None:
            raise TemporaryError("4.3.5", "forwarding is not possible here (no cleanup to queue it)")
        content = f"Delivered-To: {rcpt.address}\r\n".encode("utf-8") + request.content
        try:
            queue_id = await self._forward(request, rcpt, addresses, content)
        except DeliveryError as e:
            raise TemporaryError("4.3.0", f"cannot forward to {', '.join(addresses)}: {e.text}") from None
        except Exception as e:
            log.exception("%s: forwarding to %s failed", request.queue_id, ", ".join(addresses))
            raise TemporaryError("4.3.0", f"cannot forward to {', '.join(addresses)}: {e}") from None
        return f"forwarded as {queue_id} to {', '.join(addresses)}"

    def _result(self, rcpt: Recipient, outcome: Outcome, dsn: str, text: str) -> RcptResult:
        return RcptResult(rcpt, outcome, dsn, text, relay=self._relay)


def _also(done: list[str]) -> str:
    return f" (also: {'; '.join(done)})" if done else ""
