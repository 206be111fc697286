"""The server's Prometheus metrics: one `CollectorRegistry` per `Metrics`, so that several servers in one process
(tests, embedding) each count their own. Served as `/metrics` by the admin listener (mailflow.admin); the names,
labels and meanings are listed in docs/operations.md, "Metrics".

Fed by the seams that already exist, never by code added to the path of a message:
- `mail_event(queue_id, event, fields)`: the mail log's observer (logs.MailLog(observer=...)): messages received,
  queued, removed, notices; each recipient's result (sent, deferred, bounced) by transport and DSN class; the
  queue residence time of recipients that reached a final state. It also keeps the latest RECENT_LIMIT results
  (`recent`, for the queue page).
- `sessions`: smtpd's session observer (stages.smtpd.transcript): sessions and replies by code. It asks for no
  transcript (line_limit 0), so a session records nothing for it.
- `delivered(transport, seconds)`: qmgr's hook, once per delivery job: how long the delivery agent took.
- `committed(requests, seconds)`: the store's hook, once per group commit: its size and latency.
- Read at scrape time (`await render()`): queue sizes by state (one read of the store), open SMTP sessions,
  messages in qmgr's hands, each destination's window, load and dead timer (qmgr's memory), and the process's
  RSS, CPU and file descriptors (prometheus_client's ProcessCollector).

    Metrics(clock)
        registry                        the CollectorRegistry
        watch(server)                   what scrapes read: an object with `store`, `qmgr`, `smtpd` (None while
                                        stopped), e.g. the Mailflow
        mail_event, sessions, delivered, committed     the feeds above
        recent                          deque of Delivery, newest last
        await render() -> bytes         the text exposition format

Cost: each feed is a dict lookup and an integer added (histograms: a bucket search), counted in plain Python
(`Counts`, `Buckets`) and turned into metric families only when scraped; measured in docs/operations.md.

Failure behaviour: a feed never raises (unknown events and odd values are ignored); a scrape whose store read
fails still answers, without the queue sizes (the failure is logged).
"""
from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections import deque
from typing import Iterator, NamedTuple

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mailflow.clock import Clock
from mailflow.stages.smtpd.transcript import SessionObserver, Transcript

log = logging.getLogger("mailflow.admin")

QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt", "maildrop")
RECENT_LIMIT = 1000  # results kept for the queue page
DESTINATION_SERIES = 100  # destinations given series of their own (the busiest; dead ones first)
RESIDENCE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_DSN = re.compile(r"[245]\.[0-7]\.[0-9]{1,3}")  # RFC 3463: classes 2, 4, 5; subjects 0 (other) to 7 (security)


class Delivery(NamedTuple):
    """One recipient's result as the mail log told it (for the queue page's "last deliveries")."""

    time: float
    queue_id: str
    recipient: str
    transport: str
    relay: str
    status: str  # sent, deferred, bounced
    dsn: str
    delay: float
    reason: str


def dsn_class(dsn: str) -> str:
    """The class and subject of an enhanced status code ("5.1.1" -> "5.1"; RFC 3463's, 24 values); "other" for
    anything else ("5.9.1", "5.12.1"): a remote server chooses the code, and must not make new series."""
    return dsn[:3] if _DSN.fullmatch(dsn) else "other"


class Counts:
    """A counter family as plain integers by label values: the feeds run on the event loop, one at a time, so an
    increment is a dict update (prometheus_client's Counter takes a lock and checks per increment: measured,
    several times the cost). Turned into a metric family at scrape time."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], int] = {} if labels else {(): 0}

    def inc(self, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0) + 1

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class Buckets:
    """A histogram family the same way: per label values, a count per bucket (the last: above every bound)
    and the sum."""

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.doc, self.bounds, self.labels = name, doc, bounds, labels
        self.series: dict[tuple[str, ...], list] = {} if labels else {(): self._empty()}

    def _empty(self) -> list:
        return [0] * (len(self.bounds) + 1) + [0.0]

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = self._empty()
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for labels, series in self.series.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*(str(float(b)) for b in self.bounds), "+Inf"), series[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(labels, buckets, series[-1])
        return family


class SessionCounter(SessionObserver):
    """smtpd's session observer for the metrics: counts, keeps no transcript."""

    line_limit = 0
    byte_limit = 0

    def __init__(self) -> None:
        self.sessions = Counts("mailflow_smtpd_sessions", "SMTP sessions accepted (connections)")
        self.replies = Counts("mailflow_smtpd_replies", "SMTP replies sent, by code (final lines only)", ("code",))

    def started(self, transcript: Transcript) -> None:
        self.sessions.values[()] += 1

    def replied(self, transcript: Transcript, line: str) -> None:
        code = line[:3]
        if line[3:4] != "-" and code.isascii() and code.isdigit():  # not a continuation line (ascii_digits, inline)
            self.replies.inc(code)


class Metrics(Collector):
    """See the module docstring."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._received = Counts("mailflow_messages_received",
                                "Messages received, by source (smtpd, pickup); smtpd's at a transaction's first "
                                "accepted recipient, as pflogsumm counts Postfix's client= lines", ("source",))
        self._queued = Counts("mailflow_messages_queued", "Messages committed to the queue (notices and forwarded "
                              "copies included)")
        self._removed = Counts("mailflow_messages_removed", "Messages removed from the queue (every recipient done, "
                               "or deleted)")
        self._notices = Counts("mailflow_notices", "Delivery status notifications queued, by kind (failure, delay, "
                               "success)", ("kind",))
        self._results = Counts("mailflow_deliveries", "Recipient results, by transport, status (sent, deferred, "
                               "bounced) and DSN class.subject", ("transport", "status", "dsn_class"))
        self._residence = Buckets("mailflow_queue_residence_seconds", "Time from arrival to a recipient's final "
                                  "result (sent or bounced)", RESIDENCE_BUCKETS)
        self._delivery = Buckets("mailflow_delivery_duration_seconds", "Time a delivery agent took for one "
                                 "delivery (one message, one destination)", DELIVERY_BUCKETS, ("transport",))
        self._batch = Buckets("mailflow_store_commit_batch_requests", "Write requests merged into one store commit",
                              BATCH_BUCKETS)
        self._commit = Buckets("mailflow_store_commit_seconds", "Store commit latency (one transaction and its "
                               "fsync, as the event loop waits for it)", COMMIT_BUCKETS)
        self._events = {"received": self._on_received, "queued": self._on_queued, "removed": self._on_removed,
                        "notice": self._on_notice, "sent": self._on_result, "deferred": self._on_result,
                        "bounced": self._on_result}
        self.sessions = SessionCounter()
        self.recent: deque[Delivery] = deque(maxlen=RECENT_LIMIT)
        self._state = _ServerState()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(self)
        self.registry.register(self._state)

    def collect(self) -> Iterator[Metric]:
        for counted in (self._received, self._queued, self._removed, self._notices, self._results, self._residence,
                        self._delivery, self._batch, self._commit, self.sessions.sessions, self.sessions.replies):
            yield counted.family()

    def watch(self, server) -> None:
        """Read `server.store`, `.qmgr` and `.smtpd` at each scrape."""
        self._state.server = server

    async def render(self) -> bytes:
        await self._state.refresh()
        return generate_latest(self.registry)

    # -- feeds ------------------------------------------------------------------------------------------------
    def mail_event(self, queue_id: str, event: str, fields: dict) -> None:
        handler = self._events.get(event)
        if handler is not None:
            handler(queue_id, event, fields)

    def delivered(self, transport: str, seconds: float) -> None:
        self._delivery.observe(seconds, transport)

    def committed(self, requests: int, seconds: float) -> None:
        self._batch.observe(requests)
        self._commit.observe(seconds)

    def _on_received(self, queue_id: str, event: str, fields: dict) -> None:
        self._received.inc("pickup" if "uid" in fields else "smtpd")

    def _on_queued(self, queue_id: str, event: str, fields: dict) -> None:
        self._queued.values[()] += 1

    def _on_removed(self, queue_id: str, event: str, fields: dict) -> None:
        self._removed.values[()] += 1

    def _on_notice(self, queue_id: str, event: str, fields: dict) -> None:
        self._notices.inc(str(fields.get("kind", "")))

    def _on_result(self, queue_id: str, status: str, fields: dict) -> None:
        transport = fields.get("transport") or "none"
        dsn = fields.get("dsn", "")
        self._results.inc(transport, status, dsn_class(dsn))
        delay = fields.get("delay", 0.0)
        if status != "deferred":
            self._residence.observe(delay)
        self.recent.append(Delivery(self._clock.time(), queue_id, fields.get("to", ""), transport,
                                    fields.get("relay", ""), status, dsn, delay, fields.get("reason", "")))


class _ServerState(Collector):
    """The gauges read from the running server at scrape time."""

    def __init__(self) -> None:
        self.server = None
        self._counts: dict[str, int] | None = None

    async def refresh(self) -> None:
        """What needs the store (an await) is read before the registry is walked."""
        store = getattr(self.server, "store", None)
        self._counts = None
        if store is None:
            return
        try:
            self._counts = await store.counts()
        except Exception as e:
            log.warning("metrics: cannot read the queue sizes: %s", e)

    def collect(self) -> Iterator[Metric]:
        server = self.server
        if self._counts is not None:
            queue = GaugeMetricFamily("mailflow_queue_messages", "Messages in the queue, by state", labels=["queue"])
            for state in QUEUE_STATES:
                queue.add_metric([state], self._counts.get(state, 0))
            yield queue
        smtpd = getattr(server, "smtpd", None)
        yield GaugeMetricFamily("mailflow_smtpd_sessions_open", "SMTP sessions open now",
                                value=len(smtpd.sessions) if smtpd is not None else 0)
        qmgr = getattr(server, "qmgr", None)
        yield GaugeMetricFamily("mailflow_qmgr_active_messages", "Messages in qmgr's hands (the active queue)",
                                value=qmgr.active_count if qmgr is not None else 0)
        yield from _destinations(qmgr.destinations() if qmgr is not None else [])


def _destinations(rows: list[tuple]) -> Iterator[Metric]:
    """Counts of destinations alive and dead, and series of their own for the DESTINATION_SERIES busiest."""
    dead = sum(1 for row in rows if row[6])
    counts = GaugeMetricFamily("mailflow_destinations", "Destinations qmgr holds, alive or dead (a dead site "
                               "is not tried until its timer ends)", labels=["state"])
    counts.add_metric(["alive"], len(rows) - dead)
    counts.add_metric(["dead"], dead)
    yield counts
    families = {name: GaugeMetricFamily(f"mailflow_destination_{name}", text, labels=["transport", "nexthop"])
                for name, text in (("window", "Deliveries a destination may run at once now (its window)"),
                                   ("in_flight", "Deliveries running to a destination"),
                                   ("queued_jobs", "Deliveries waiting for a destination's window"),
                                   ("dead", "1 while a destination is dead (its dead-site timer runs)"))}
    busiest = sorted(rows, key=lambda row: (not row[6], -(row[3] + row[4])))[:DESTINATION_SERIES]
    for transport, nexthop, window, in_flight, queued, _failures, dead_until, *_ in busiest:
        labels = [transport, nexthop]
        families["window"].add_metric(labels, window)
        families["in_flight"].add_metric(labels, in_flight)
        families["queued_jobs"].add_metric(labels, queued)
        families["dead"].add_metric(labels, 1 if dead_until else 0)
    yield from families.values()
