"""What the capture server records beside the messages, keyed by queue id, and the bundle that holds it all.

    TranscriptBook(limit, line_limit, byte_limit)   an smtpd session observer (stages.smtpd.transcript): the
                          transcript of the session that submitted each queued message; get(queue_id)
    QueueHistory(clock, limit)   a mail-log observer (logs.MailLog(observer=...)): each queue id's events in
                          order (received, queued, deferred, sent, bounced, notice, removed…); events(queue_id)
    Capture(sink_config, clock)  the mailbox (mailbox.Mailbox) with both recorders: what `Mailflow` wires in
                          (`session_observer` to smtpd, `mail_observer` to the mail log, `mailbox` to the
                          `capture` transport)

Bounded: each recorder keeps the latest `limit` queue ids (the oldest forgotten first), a queue id at most
EVENTS_PER_MESSAGE events, a transcript the observer's line and byte limits.

Failure behaviour: recording never raises (and the session and the mail log guard their observers anyway).
"""
from __future__ import annotations

from collections import OrderedDict

from mailflow.capture.mailbox import Mailbox, QueueEvent
from mailflow.clock import Clock
from mailflow.config import SinkConfig
from mailflow.model import SessionTranscript
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript

EVENTS_PER_MESSAGE = 200


def _remember(book: OrderedDict, key: str, value, limit: int) -> None:
    book[key] = value
    book.move_to_end(key)
    while len(book) > limit:
        book.popitem(last=False)


class TranscriptBook(SessionObserver):
    """See the module docstring."""

    def __init__(self, *, limit: int, line_limit: int, byte_limit: int):
        self._limit = limit
        self.line_limit = line_limit
        self.byte_limit = byte_limit
        self._by_queue_id: OrderedDict[str, SessionTranscript] = OrderedDict()

    def queued(self, transcript: Transcript, queue_id: str) -> None:
        _remember(self._by_queue_id, queue_id, transcript.snapshot(), self._limit)

    def get(self, queue_id: str) -> SessionTranscript | None:
        return self._by_queue_id.get(queue_id)


class QueueHistory:
    """See the module docstring."""

    def __init__(self, clock: Clock, *, limit: int):
        self._clock = clock
        self._limit = limit
        self._events: OrderedDict[str, list[QueueEvent]] = OrderedDict()

    def record(self, queue_id: str, event: str, fields: dict) -> None:
        events = self._events.get(queue_id)
        if events is None:
            events = []
            _remember(self._events, queue_id, events, self._limit)
        if len(events) < EVENTS_PER_MESSAGE:
            events.append(QueueEvent(self._clock.time(), event, dict(fields)))

    def events(self, queue_id: str) -> list[QueueEvent]:
        return list(self._events.get(queue_id, ()))


class Capture:
    """See the module docstring. `session_observer` may be replaced (before the server starts) by a subclass
    of TranscriptBook that does more with the session's events (the Sink's inbound faults)."""

    def __init__(self, config: SinkConfig, clock: Clock, session_observer: TranscriptBook | None = None):
        self.config = config
        self.session_observer = session_observer or TranscriptBook(
            limit=config.history_limit, line_limit=config.transcript_line_limit,
            byte_limit=config.transcript_byte_limit)
        self.history = QueueHistory(clock, limit=config.history_limit)
        self.mailbox = Mailbox(max_messages=config.max_messages, max_bytes=config.max_bytes, clock=clock,
                               transcripts=self.session_observer, history=self.history)

    @property
    def mail_observer(self):
        return self.history.record
