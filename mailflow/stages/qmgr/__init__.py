"""qmgr: takes due messages from the store, groups recipients by destination, dispatches, records.

The loop
- A scan runs when cleanup queues new mail (`wake()`), when a message finishes, and every
  `queue_run_delay` (or sooner, when a deferral made here comes due). It takes up to
  `active_limit - len(active)` due messages, marks them active in the store, and resolves each pending
  recipient to `(transport, nexthop)` through trivial-rewrite.
- Each destination gets one job per message (all that message's recipients for it) and runs at most
  `default_destination_concurrency_limit` jobs at once; `delivery_concurrency_limit` caps all of them.
- When every job of a message has reported, one `store.record()` (group-committed with others) marks
  each recipient sent / bounced / still pending, then removes the message, or defers it to
  `now + clamp(age, minimal_backoff_time, maximal_backoff_time)`.

Failure behaviour
- A transport that raises counts as a temporary failure (4.3.0) for every recipient of the job; an unknown
  transport name defers with 4.3.5. A message whose content is missing goes to the corrupt queue.
- The store holds the state; the wake-up event carries none. A lost wake-up costs at most one
  `queue_run_delay`; a crash leaves messages `active`, and `store.recover()` makes them due again.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from mailflow.clock import Clock
from mailflow.logs import MailLog
from mailflow.model import (Delivered, DeliveryReport, DeliveryRequest, Outcome, QueuedMessage, RcptResult,
                            Resolution)
from mailflow.stages.qmgr.backoff import next_attempt
from mailflow.stages.qmgr.destination import Destination, Job
from mailflow.store import Store

log = logging.getLogger("mailflow.qmgr")


@dataclass
class ActiveMessage:
    message: QueuedMessage
    jobs_left: int
    results: list[RcptResult] = field(default_factory=list)
    content: asyncio.Future | None = None  # the content, read once however many destinations


class QueueManager:
    def __init__(self, store: Store, *, resolve: Callable[[str], Resolution], transports: dict, config,
                 clock: Clock, rng, log: MailLog):
        self._store = store
        self._resolve = resolve
        self._transports = transports
        self._config = config
        self._clock = clock
        self._rng = rng
        self._log = log
        self._active: dict[str, ActiveMessage] = {}
        self._destinations: dict[tuple[str, str], Destination] = {}
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()
        self._next_scan = 0.0
        self._loop_task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        recovered = await self._store.recover()
        if recovered:
            log.info("qmgr: %d messages were active when the server stopped; they are due again", recovered)
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

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self._scan()
            except Exception:  # the store is unhappy: keep the loop alive and try again later
                log.exception("qmgr: queue scan failed")
                self._next_scan = self._clock.time() + min(self._config.queue_run_delay, 5.0)
            await self._idle(max(0.0, self._next_scan - self._clock.time()))

    async def _idle(self, seconds: float) -> None:
        """Wait for a wake-up or until `seconds` pass on the injected clock, whichever comes first."""
        woken = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def _scan(self) -> None:
        now = self._clock.time()
        if now >= self._next_scan:
            self._next_scan = now + self._config.queue_run_delay
        room = self._config.active_limit - len(self._active)
        if room <= 0:
            return
        due = [m for m in await self._store.due(now, room) if m.queue_id not in self._active]
        if not due:
            return
        await self._store.activate([m.queue_id for m in due])
        for message in due:
            self._admit(message)
        self._pump()

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
            groups.setdefault((res.transport, res.nexthop), []).append(rcpt)
        active = ActiveMessage(message, jobs_left=len(groups), results=unresolved)
        self._active[message.queue_id] = active
        if not groups:  # nothing to deliver now: record what we know (or remove a message with no one left)
            self._spawn(self._finish(active))
            return
        for (transport, nexthop), rcpts in groups.items():
            dest = self._destination(transport, nexthop)
            dest.jobs.append(Job(message.queue_id, transport, nexthop, tuple(rcpts)))

    def _destination(self, transport: str, nexthop: str) -> Destination:
        key = (transport, nexthop)
        dest = self._destinations.get(key)
        if dest is None:
            dest = Destination(transport, nexthop, self._config.default_destination_concurrency_limit)
            self._destinations[key] = dest
        return dest

    def _pump(self) -> None:
        """Start every job that a destination window and the global cap allow."""
        limit = self._config.delivery_concurrency_limit
        for dest in list(self._destinations.values()):
            while self._in_flight < limit and dest.can_start():
                self._in_flight += 1
                self._spawn(self._run_job(dest, dest.take()))
            if dest.idle:
                del self._destinations[dest.key]

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one job ----------------------------------------------------------------------------------
    async def _run_job(self, dest: Destination, job: Job) -> None:
        active = self._active[job.queue_id]
        try:
            report = await self._deliver(active, job)
        finally:
            dest.done()
            self._in_flight -= 1
        active.results.extend(_complete(job, report))
        active.jobs_left -= 1
        if active.jobs_left == 0:
            await self._finish(active)
        self._pump()

    async def _deliver(self, active: ActiveMessage, job: Job) -> DeliveryReport:
        msg = active.message
        transport = self._transports.get(job.transport)
        if transport is None:
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.5", f"mail transport unavailable: {job.transport!r} is not defined")
        try:
            content = await self._content(active)
        except Exception as e:
            log.error("%s: cannot read the queued content: %s", msg.queue_id, e)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", f"queue file read error: {e}")
        if content is None:
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", "queue file content missing")
        request = DeliveryRequest(msg.queue_id, msg.sender, job.recipients, job.nexthop, content,
                                  msg.smtputf8, msg.body_type, msg.arrival)
        try:
            return await transport.deliver(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("%s: transport %s failed", msg.queue_id, job.transport)
            return DeliveryReport.uniform(job.recipients, Outcome.DEFERRED, "4.3.0", f"delivery agent {job.transport} failed: {e}")

    async def _content(self, active: ActiveMessage) -> bytes | None:
        """Load the content once per active message, however many destinations it goes to."""
        if active.content is None:
            active.content = asyncio.ensure_future(self._store.content(active.message.queue_id))
        return await active.content

    async def _finish(self, active: ActiveMessage) -> None:
        msg = active.message
        now = self._clock.time()
        if _content_missing(active):
            await self._store.mark_corrupt([msg.queue_id])
            self._log.corrupt(msg.queue_id, "content missing")
            self._active.pop(msg.queue_id, None)
            return
        pending = any(r.outcome is Outcome.DEFERRED for r in active.results)
        retry_at = None
        if pending:
            q = self._config
            retry_at = next_attempt(now, msg.arrival, q.minimal_backoff_time, q.maximal_backoff_time)
        try:
            await self._store.record([Delivered(msg.queue_id, tuple(active.results), retry_at)])
        finally:
            self._active.pop(msg.queue_id, None)
        for result in active.results:
            self._log.result(msg.queue_id, result, now - msg.arrival)
        if retry_at is None:
            self._log.removed(msg.queue_id)
        elif retry_at < self._next_scan:
            self._next_scan = retry_at
        self.wake()


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
