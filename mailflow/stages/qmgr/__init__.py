"""qmgr: takes due messages from the store, schedules them per destination, records what happened.

The loop
- A scan runs when cleanup queues new mail (`wake()`), when a message finishes, when an operator tool
  changed the queue (the store's generation counter, polled every second), when the earliest deferred
  message comes due (known from its own deferrals, and from an index lookup at each timed scan, so it
  survives restarts and operator changes), and at least every `queue_run_delay`. It takes up to `active_limit - active` due messages,
  new and deferred mail alternating, marks them active and resolves each pending recipient to
  `(transport, nexthop)` through trivial-rewrite.
- Each destination gets one job per message and runs as many at once as its window allows
  (`destination.py`: slow start, throttle on site failure, dead-site memory). `delivery_concurrency_limit`
  caps all deliveries, `transport_concurrency_limit` each transport. A dead destination's jobs are
  deferred without a connection attempt.
- When every job of a message is back, one `store.record()` (group-committed with others) marks each
  recipient sent / bounced / pending, removes the message or defers it to
  `now + clamp(age, minimal_backoff_time, maximal_backoff_time)` plus up to 10 % jitter, and queues the
  notices the results call for (`notices.py`) in the same transaction. A message still pending after
  `maximal_queue_lifetime` (`bounce_queue_lifetime` for null-sender mail) is returned: its pending
  recipients count as bounced. After `delay_warning_time` the sender gets one "delayed" notice.
- About once a second the destinations' state is written to the store for `mailflow queue destinations`.

Failure behaviour
- A resolver or transport that raises, a content read error, a recipient the agent does not report on:
  that recipient is deferred (4.3.0), never lost. Unknown transport: deferred 4.3.5. Missing content:
  the message goes to the corrupt queue.
- A message an operator holds or deletes while it is active: its jobs not yet started are dropped at the
  next tick (held: its recipients stay pending; deleted: nothing is recorded); one in flight finishes.
  `mailflow queue flush` also revives dead destinations, like `postqueue -f`.
- A failed `record()` is retried; if the store stays broken the message is left `active`, and the next
  start makes it due again (start-up is recovery).
- The wake-up event carries no state: a lost wake-up costs at most one tick.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

from mailflow.clock import Clock
from mailflow.content import Content
from mailflow.logs import MailLog
from mailflow.model import (Delivered, DeliveryReport, DeliveryRequest, Outcome, QueuedMessage, RcptResult,
                            Resolution)
from mailflow.stages.qmgr.backoff import next_attempt
from mailflow.stages.qmgr.destination import Destination, Job
from mailflow.store import Store

log = logging.getLogger("mailflow.qmgr")

TICK = 1.0  # default seconds between polls of the tools' generation counter and destination snapshots
JITTER = 0.1  # retries spread over up to 10 % of their delay, so mail that arrived together does not retry in step
RECORD_TRIES = 3


@dataclass
class ActiveMessage:
    message: QueuedMessage
    jobs_left: int
    results: list[RcptResult] = field(default_factory=list)
    content: asyncio.Future | None = None  # read once however many destinations (a Content: big ones stay in files)
    withdrawn: str = ""  # "hold" or "deleted" when an operator took it back while it was active


class QueueManager:
    def __init__(self, store: Store, *, resolve: Callable[[str], Resolution], transports: dict, config,
                 clock: Clock, rng, log: MailLog, notices=None, tick: float = TICK):
        self._store = store
        self._resolve = resolve
        self._transports = transports
        self._config = config
        self._clock = clock
        self._rng = rng
        self._log = log
        self._notices = notices
        self._tick_seconds = tick
        self._active: dict[str, ActiveMessage] = {}
        self._destinations: dict[tuple[str, str], Destination] = {}
        self._in_flight = 0
        self._in_flight_by_transport: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()
        self._next_scan = 0.0
        self._generation = 0
        self._flushes = 0
        self._snapshot: list[tuple] | None = None
        self._loop_task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await self._store.recover()
        if recovered:
            log.info("qmgr: %d messages were active when the server stopped; they are due again", recovered)
        self._generation = await self._store.generation()
        self._flushes = await self._store.flush_requests()
        self._loop_task = asyncio.create_task(self._run(), name="qmgr")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking new work, let deliveries in flight finish within `grace`, cancel the rest."""
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.close()

    def wake(self) -> None:
        """New mail is queued, or room was freed: scan soon. Carries no state."""
        self._wakeup.set()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def busy(self) -> bool:
        """Deliveries or records are under way (a driver of a virtual clock waits for this to clear)."""
        return bool(self._tasks)

    def destinations(self) -> list[tuple]:
        return [d.snapshot() for d in self._destinations.values()]

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self._tick()  # first: operator changes (holds, flushes) must be seen before a scan acts
                await self._scan()
            except Exception:  # the store is unhappy: keep the loop alive and try again later
                log.exception("qmgr: queue scan failed")
            await self._idle(min(self._tick_seconds, max(0.0, self._next_scan - self._clock.time())))

    async def _idle(self, seconds: float) -> None:
        """Wait for a wake-up or until `seconds` pass on the injected clock, whichever comes first."""
        woken = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def _tick(self) -> None:
        """The once-a-second chores: notice operator changes; publish destination state when it changed."""
        generation = await self._store.generation()
        if generation != self._generation:
            self._generation = generation
            await self._withdraw_taken_back()
            self._next_scan = self._clock.time()
            self.wake()
        flushes = await self._store.flush_requests()
        if flushes != self._flushes:  # `mailflow queue flush`: like postqueue -f, dead sites get another try
            self._flushes = flushes
            for dest in self._destinations.values():
                dest.revive()
        self._pump()  # also revives destinations whose dead timer ran out
        rows = self.destinations()
        if rows != self._snapshot:
            await self._store.save_destinations(rows, self._clock.time())
            self._snapshot = rows

    async def _withdraw_taken_back(self) -> None:
        """Messages an operator held or deleted while active: their jobs not yet started are dropped."""
        states = await self._store.queue_states(list(self._active))
        for queue_id, active in list(self._active.items()):
            state = states.get(queue_id, "deleted")
            if state == "active" or active.withdrawn:
                continue
            active.withdrawn = state
            for dest in self._destinations.values():
                for job in dest.withdraw(queue_id):
                    text = "delivery suspended: the message was put on hold"
                    self._job_done(job, DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.0.0", text))

    async def _scan(self) -> None:
        now = self._clock.time()
        room = self._config.active_limit - len(self._active)
        due = [m for m in await self._store.due(now, room) if m.queue_id not in self._active] if room > 0 else []
        if due:
            await self._store.activate([m.queue_id for m in due])
            for message in due:
                self._admit(message)
            self._pump()
        if now >= self._next_scan:  # a timed scan: sleep next until the earliest deferred message is due
            next_due = await self._store.next_due_time()  # (an index lookup), at most a queue run
            self._next_scan = min(now + self._config.queue_run_delay, next_due if next_due is not None else now + 1e9)

    def _admit(self, message: QueuedMessage) -> None:
        groups: dict[tuple[str, str], list] = {}
        unresolved: list[RcptResult] = []
        for rcpt in message.recipients:
            try:
                res = self._resolve(rcpt.address)
            except Exception as e:  # a table or DNS lookup failed: not "not found", so try again later
                log.warning("%s: cannot resolve <%s>: %s", message.queue_id, rcpt.address, e)
                unresolved.append(RcptResult(rcpt, Outcome.DEFERRED, "4.3.0", f"address resolver failure: {e}"))
                continue
            if res.address != rcpt.address:  # trivial-rewrite's form (the percent hack), as Postfix's qmgr uses it
                rcpt = dataclasses.replace(rcpt, address=res.address)
            groups.setdefault((res.transport, res.nexthop), []).append(rcpt)
        active = ActiveMessage(message, jobs_left=len(groups), results=unresolved)
        self._active[message.queue_id] = active
        if not groups:  # nothing to deliver now: record what we know (or remove a message with no one left)
            self._spawn(self._finish(active))
            return
        for (transport, nexthop), rcpts in groups.items():
            self._destination(transport, nexthop).jobs.append(Job(message.queue_id, transport, nexthop, tuple(rcpts)))

    def _destination(self, transport: str, nexthop: str) -> Destination:
        key = (transport, nexthop)
        dest = self._destinations.get(key)
        if dest is None:
            q = self._config
            dest = Destination(transport, nexthop, initial=q.initial_destination_concurrency,
                               limit=q.default_destination_concurrency_limit,
                               cohort_limit=q.destination_concurrency_failed_cohort_limit)
            self._destinations[key] = dest
        return dest

    def _pump(self) -> None:
        """Start every job the windows and caps allow; defer the jobs of dead destinations unattempted."""
        now = self._clock.time()
        for dest in list(self._destinations.values()):
            if dest.is_dead(now):
                self._suspend(dest, dest.drain())
                continue
            while dest.can_start(now) and self._room_for(dest.transport):
                self._in_flight += 1
                self._in_flight_by_transport[dest.transport] = self._in_flight_by_transport.get(dest.transport, 0) + 1
                self._spawn(self._run_job(dest, dest.take()))
            if dest.idle:
                del self._destinations[dest.key]

    def _room_for(self, transport: str) -> bool:
        cap = self._config.transport_concurrency_limit.get(transport)
        if cap is not None and self._in_flight_by_transport.get(transport, 0) >= cap:
            return False
        return self._in_flight < self._config.delivery_concurrency_limit

    def _suspend(self, dest: Destination, jobs: list[Job]) -> None:
        text = f"delivery temporarily suspended: {dest.reason or 'destination is not responding'}"
        for job in jobs:
            self._job_done(job, DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.4.1", text,
                                                       site_ok=False))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one job ----------------------------------------------------------------------------------
    async def _run_job(self, dest: Destination, job: Job) -> None:
        report = None
        try:
            report = await self._deliver(self._active[job.queue_id], job)
        finally:
            self._in_flight -= 1
            self._in_flight_by_transport[job.transport] -= 1
            site_ok = report.site_ok if report is not None else True
            reason = report.site_reason if report is not None else ""
            self._suspend(dest, dest.done(site_ok, reason, self._clock.time(), self._config.minimal_backoff_time))
        self._job_done(job, report)
        self._pump()

    def _job_done(self, job: Job, report: DeliveryReport) -> None:
        active = self._active[job.queue_id]
        active.results.extend(_complete(job, report))
        active.jobs_left -= 1
        if active.jobs_left == 0:
            self._spawn(self._finish(active))

    async def _deliver(self, active: ActiveMessage, job: Job) -> DeliveryReport:
        msg = active.message
        transport = self._transports.get(job.transport)
        if transport is None:
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.5",
                                          f"mail transport unavailable: {job.transport!r} is not defined")
        try:
            content = await self._content(active)
        except Exception as e:
            log.error("%s: cannot read the queued content: %s", msg.queue_id, e)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", f"queue file read error: {e}")
        if content is None:
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", "queue file content missing")
        request = DeliveryRequest(msg.queue_id, msg.sender, job.recipients, job.nexthop, content,
                                  msg.smtputf8, msg.body_type, msg.arrival, envid=msg.envid, ret=msg.ret)
        try:
            return await transport.deliver(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s: transport %s failed", msg.queue_id, job.transport)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0",
                                          f"delivery agent {job.transport} failed: {e}")

    async def _content(self, active: ActiveMessage) -> Content | None:
        if active.content is None:
            active.content = asyncio.ensure_future(self._store.content(active.message.queue_id))
        return await active.content

    # -- the end of an attempt ------------------------------------------------------------------------
    async def _finish(self, active: ActiveMessage) -> None:
        msg = active.message
        now = self._clock.time()
        if active.withdrawn == "deleted" or (_content_missing(active) and not await self._still_queued(msg)):
            self._active.pop(msg.queue_id, None)
            self._log.removed(msg.queue_id)  # by an operator; nothing left to record
            return
        if _content_missing(active):
            await self._store.mark_corrupt([msg.queue_id])
            self._log.corrupt(msg.queue_id, "content missing")
            self._active.pop(msg.queue_id, None)
            return
        q = self._config
        lifetime = q.bounce_queue_lifetime if not msg.sender else q.maximal_queue_lifetime
        results = _expire(active.results, now - msg.arrival, lifetime)
        pending = any(r.outcome is Outcome.DEFERRED for r in results)
        warn = bool(pending and q.delay_warning_time and not msg.warned
                    and now - msg.arrival >= q.delay_warning_time)
        retry_at = None
        if pending:
            retry_at = next_attempt(now, msg.arrival, q.minimal_backoff_time, q.maximal_backoff_time,
                                    jitter=JITTER, rng=self._rng)
        notices = await self._make_notices(active, results, now, warn, msg.arrival + lifetime)
        delivered = Delivered(msg.queue_id, tuple(results), retry_at, warned=msg.warned or warn)
        try:
            await self._record(delivered, [n for _, n in notices])
        except Exception:
            log.critical("%s: the attempt could not be recorded; the message stays active until the next start",
                         msg.queue_id)
            return
        finally:
            self._active.pop(msg.queue_id, None)
        self._log_attempt(msg, results, notices, retry_at, now)
        if retry_at is not None and retry_at < self._next_scan:
            self._next_scan = retry_at
        self.wake()

    async def _still_queued(self, msg: QueuedMessage) -> bool:
        return msg.queue_id in await self._store.queue_states([msg.queue_id])

    async def _make_notices(self, active: ActiveMessage, results, now: float, warn: bool, retry_until: float):
        if self._notices is None:
            return []
        wanted = any(r.outcome is not Outcome.DEFERRED for r in results) or warn
        if not wanted:
            return []
        try:
            original = await self._content(active) or Content()
        except Exception:
            original = Content()  # the notice still says what happened, without the original
        return self._notices.for_attempt(active.message, results, original=original, now=now, warn_delay=warn,
                                         retry_until=retry_until)

    async def _record(self, delivered: Delivered, notices: list) -> None:
        for attempt in range(1, RECORD_TRIES + 1):
            try:
                await self._store.record([delivered], notices)
                return
            except Exception as e:
                log.error("%s: cannot record the delivery attempt (try %d of %d): %s", delivered.queue_id,
                          attempt, RECORD_TRIES, e)
                if attempt == RECORD_TRIES:
                    raise
                await self._clock.sleep(attempt)

    def _log_attempt(self, msg: QueuedMessage, results, notices, retry_at, now: float) -> None:
        for result in results:
            self._log.result(msg.queue_id, result, now - msg.arrival)
        for notice, queued in notices:
            self._log.notice(msg.queue_id, notice.kind, queued.queue_id)
            self._log.queued(queued.queue_id, queued.sender, queued.content.size, len(queued.recipients))
        if retry_at is None:
            self._log.removed(msg.queue_id)


def _expire(results: list[RcptResult], age: float, lifetime: float) -> list[RcptResult]:
    """Past its lifetime a message gives up: pending recipients are returned, with their last reason."""
    if age < lifetime:
        return results
    return [RcptResult(r.recipient, Outcome.BOUNCED, r.dsn, f"message expired: {r.text}", r.relay)
            if r.outcome is Outcome.DEFERRED else r for r in results]


def _complete(job: Job, report: DeliveryReport) -> list[RcptResult]:
    """The report's results for this job's recipients; one the agent did not mention stays queued (4.3.0)."""
    mine = {r.index: r for r in job.recipients}
    results = [r for r in report.results if mine.get(r.recipient.index) == r.recipient]
    told = {r.recipient.index for r in results}
    results += [RcptResult(r, Outcome.DEFERRED, "4.3.0", "delivery agent reported no result")
                for r in job.recipients if r.index not in told]
    return results


def _content_missing(active: ActiveMessage) -> bool:
    """True when the store had no content for the message (a corrupt entry), not when reading it failed."""
    f = active.content
    return f is not None and f.done() and not f.cancelled() and f.exception() is None and f.result() is None
