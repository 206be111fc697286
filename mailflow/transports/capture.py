"""capture: keep each message in the capture server's mailbox (`[sink]`, mailflow.capture), for tests and for
the HTTP capture API. Like discard(8) it delivers nowhere else; unlike it, the message is kept.

    CaptureTransport(mailbox)    every recipient of a request is sent (2.0.0, relay "capture") once the message
                                 is in the mailbox: one captured message per delivery, with its envelope (the
                                 recipients of this request in the order the client gave them, their DSN
                                 parameters) and its bytes as queued

Registered (`build_transports`) when the server has a mailbox: `mailflow serve --sink`, `[sink] enable`, the
embedded Sink. The mailbox is bounded ([sink] max_messages, max_bytes): the oldest messages make room.

Failure behaviour: a content read error defers every recipient (4.3.0), as any transport's would.
"""
from __future__ import annotations

from mailflow.capture.mailbox import CapturedEnvelope, Mailbox
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome, Recipient


class CaptureTransport:
    program = "capture"  # the Postfix delivery agent whose name its result lines are logged under

    def __init__(self, mailbox: Mailbox):
        self._mailbox = mailbox

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        try:
            raw = b"".join([chunk async for chunk in request.content.stream()])
        except OSError as e:
            return DeliveryReport.uniform(request.recipients, Outcome.DEFERRED, "4.3.0",
                                          f"cannot read the queued message: {e}", relay="capture")
        rcpts = tuple(sorted(request.recipients, key=_envelope_position))  # (qmgr hands them over in its order)
        envelope = CapturedEnvelope(
            sender=request.sender, recipients=tuple(r.address for r in rcpts),
            originals=tuple(r.original for r in rcpts), notify=tuple(r.notify for r in rcpts),
            orcpts=tuple(r.orcpt for r in rcpts), envid=request.envid, ret=request.ret,
            smtputf8=request.smtputf8, body_type=request.body_type)
        message = self._mailbox.add(envelope, raw, request.queue_id)
        return DeliveryReport.uniform(rcpts, Outcome.SENT, "2.0.0", f"captured as {message.id}", relay="capture")

    async def close(self) -> None:
        pass


def _envelope_position(rcpt: Recipient) -> int:
    return rcpt.index
