"""The mail log: one line per event, each starting with the queue id, from a fixed vocabulary.

Events (Postfix's words): received (client=), queued (from= size= nrcpt=), sent / deferred / bounced
(to= relay= delay= dsn= status=), notice (sender non-delivery notification: ID), removed, corrupt. `MailLog` has one method per event; nothing else in
mailflow writes to the `mailflow.mail` logger. `setup_logging(config)` chooses text or JSON lines.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from mailflow.model import Outcome, RcptResult

MAIL_LOGGER = "mailflow.mail"


class MailLog:
    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger(MAIL_LOGGER)

    def _emit(self, queue_id: str, event: str, text: str, **fields) -> None:
        self._log.info("%s: %s", queue_id, text, extra={"queue_id": queue_id, "event": event, "fields": fields})

    def received(self, queue_id: str, client: str, message_id: str) -> None:
        self._emit(queue_id, "received", f"client={client}, message-id={message_id}", client=client,
                   message_id=message_id)

    def queued(self, queue_id: str, sender: str, size: int, nrcpt: int) -> None:
        self._emit(queue_id, "queued", f"from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)",
                   sender=sender, size=size, nrcpt=nrcpt)

    def result(self, queue_id: str, result: RcptResult, delay: float) -> None:
        status = {Outcome.SENT: "sent", Outcome.DEFERRED: "deferred", Outcome.BOUNCED: "bounced"}[result.outcome]
        to = result.recipient.address
        orig = f", orig_to=<{result.recipient.original}>" if result.recipient.original != to else ""
        self._emit(queue_id, status,
                   f"to=<{to}>{orig}, relay={result.relay}, delay={delay:.2f}, dsn={result.dsn}, "
                   f"status={status} ({result.text})",
                   to=to, relay=result.relay, delay=round(delay, 3), dsn=result.dsn, status=status,
                   reason=result.text)

    def notice(self, queue_id: str, kind: str, notice_id: str) -> None:
        what = {"failure": "non-delivery", "delay": "delay", "success": "delivery status"}.get(kind, kind)
        self._emit(queue_id, "notice", f"sender {what} notification: {notice_id}", kind=kind, notice_id=notice_id)

    def removed(self, queue_id: str) -> None:
        self._emit(queue_id, "removed", "removed")

    def corrupt(self, queue_id: str, reason: str) -> None:
        self._emit(queue_id, "corrupt", f"moved to the corrupt queue: {reason}", reason=reason)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if hasattr(record, "queue_id"):
            out.update(queue_id=record.queue_id, event=record.event, **record.fields)
        else:
            out["message"] = record.getMessage()
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s mailflow[%(name)s] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's own per-command chatter
